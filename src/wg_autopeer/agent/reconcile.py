"""From desired direct peers to device operations: a pure diff, then an apply.

``plan`` compares what the agent wants with what the device has and what the
ledger says the agent added, and returns the operations to run in order plus
the ledger to keep. It only ever removes or changes peers that are in the
ledger; a peer on the device that the agent did not add is never touched.
Applying a plan and planning again yields no operation.

Host routes and the hub: WireGuard moves an allowed IP to the last peer that
claims it. When the hub peer carries a neighbour's /32 explicitly, adding the
direct peer takes that route from the hub; the ledger records it and, when the
direct peer goes, the route is given back to the hub peer, so traffic to that
neighbour falls back through the hub. (A hub carrying the whole tunnel network
as one prefix loses nothing: the longer /32 simply wins.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from wg_autopeer.agent.ledger import InterfaceLedger, LedgerPeer, LedgerStore
from wg_autopeer.agent.safety import DirectPeer, Refusal
from wg_autopeer.wireguard.base import (
    DeviceState,
    IPNetwork,
    PeerConfig,
    PeerState,
    WireGuardControl,
)

DEFAULT_KEEPALIVE = 25


@dataclass(frozen=True)
class SetPeer:
    """Add a peer or update it in place."""

    peer: PeerConfig


@dataclass(frozen=True)
class RemovePeer:
    public_key: str


@dataclass(frozen=True)
class SetAllowedIps:
    """Replace one peer's allowed IPs (used to give host routes back to the hub)."""

    public_key: str
    allowed_ips: tuple[IPNetwork, ...]


Operation = SetPeer | RemovePeer | SetAllowedIps


@dataclass(frozen=True)
class Plan:
    """Operations to run in order, the ledger before them and the ledger after them.

    ``skipped`` lists desired peers reconcile refused defensively (the safety
    filter should already have refused them).
    """

    operations: tuple[Operation, ...]
    ledger: InterfaceLedger
    previous: InterfaceLedger
    skipped: tuple[Refusal, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to write: neither the device nor the ledger changes."""
        return not self.operations and self.ledger == self.previous


def _same(peer: PeerState, want: DirectPeer, keepalive: int) -> bool:
    return (
        peer.endpoint == want.endpoint
        and set(peer.allowed_ips) == set(want.allowed_ips)
        # Devices report "off" as None or 0.
        and (peer.persistent_keepalive or 0) == keepalive
    )


def plan(
    desired: Sequence[DirectPeer],
    device: DeviceState,
    ledger: InterfaceLedger,
    hub_key: str,
    keepalive: int = DEFAULT_KEEPALIVE,
    *,
    now: float | None = None,
) -> Plan:
    """Operations that turn ``device`` into hub + foreign peers + ``desired``.

    Order: removals first, then host routes given back to the hub, then adds and
    updates — so a route freed by one peer can be taken by another in the same plan.
    ``now`` (epoch seconds) stamps new or changed ledger entries.
    """
    stamp = time.time() if now is None else now
    on_device = {p.public_key: p for p in device.peers}
    hub = on_device.get(hub_key)
    hub_ips = hub.allowed_ips if hub is not None else ()
    foreign_ips = {
        ip
        for key, peer in on_device.items()
        if key != hub_key and key not in ledger
        for ip in peer.allowed_ips
    }

    wanted: dict[str, DirectPeer] = {}
    skipped: list[Refusal] = []
    claimed: set[IPNetwork] = set()
    for peer in desired:
        reason = None
        if peer.public_key == hub_key:
            reason = "is the hub peer"
        elif peer.public_key in on_device and peer.public_key not in ledger:
            reason = "is a peer the agent did not add"
        elif peer.public_key in wanted:
            reason = "is desired twice"
        elif foreign_ips.intersection(peer.allowed_ips) or claimed.intersection(peer.allowed_ips):
            reason = "claims an allowed IP another peer owns"
        if reason is not None:
            skipped.append(Refusal(peer.public_key, f"not applied: {reason}"))
            continue
        wanted[peer.public_key] = peer
        claimed.update(peer.allowed_ips)

    # Routes the agent took from the hub earlier, whoever in the ledger holds them now.
    taken_before = {ip for entry in ledger for ip in entry.taken_from_hub}

    operations: list[Operation] = [
        RemovePeer(entry.public_key)
        for entry in ledger
        if entry.public_key not in wanted and entry.public_key in on_device
    ]

    give_back = [
        ip
        for ip in sorted(taken_before, key=lambda n: (n.version, n))
        if ip not in claimed and ip not in hub_ips and ip not in foreign_ips
    ]
    # With the hub peer gone there is nobody to give the routes back to; they lapse.
    if give_back and hub is not None:
        operations.append(SetAllowedIps(hub_key, (*hub_ips, *give_back)))

    entries: list[LedgerPeer] = []
    for key, want in wanted.items():
        current = on_device.get(key)
        old = ledger.get(key)
        changed = current is None or not _same(current, want, keepalive)
        if changed:
            operations.append(
                SetPeer(
                    PeerConfig(
                        public_key=key,
                        allowed_ips=want.allowed_ips,
                        endpoint=want.endpoint,
                        persistent_keepalive=keepalive,
                    )
                )
            )
        taken = tuple(ip for ip in want.allowed_ips if ip in hub_ips or ip in taken_before)
        added_at = old.added_at if old is not None and not changed else stamp
        entries.append(LedgerPeer(key, want.endpoint, want.allowed_ips, taken, added_at))

    return Plan(tuple(operations), InterfaceLedger.of(entries), ledger, tuple(skipped))


def removal_plan(device: DeviceState, ledger: InterfaceLedger, hub_key: str) -> Plan:
    """Remove every peer the agent added that is still on the device and give the
    hub its host routes back (shutdown, no gateway, recovery after a crash).
    Ledger entries whose peer is already gone are simply dropped."""
    return plan((), device, ledger, hub_key)


async def apply(
    plan: Plan, control: WireGuardControl, interface: str, ledger_store: LedgerStore
) -> None:
    """Run ``plan`` on ``interface`` and persist its ledger.

    The ledger is first written as the union of before and after, so that a crash
    in the middle still knows every peer the agent may have added; then the
    operations run in order; then the final ledger is written. A failing operation
    raises its ``WireGuardError`` and leaves the union ledger on disk, which the
    next plan starts from. An empty plan writes nothing.
    """
    if plan.empty:
        return
    if plan.operations:
        ledger_store.update_interface(interface, plan.previous.union(plan.ledger))
    for operation in plan.operations:
        match operation:
            case SetPeer(peer=peer):
                await control.set_peer(interface, peer)
            case RemovePeer(public_key=key):
                await control.remove_peer(interface, key)
            case SetAllowedIps(public_key=key, allowed_ips=allowed):
                await control.set_allowed_ips(interface, key, allowed)
    ledger_store.update_interface(interface, plan.ledger)
