"""From desired direct peers to device operations: a pure diff, then an apply.

``plan`` compares what the agent wants with what the device has and what the
ledger says the agent added, and returns the operations to run in order plus
the ledger to keep. It only ever removes or changes peers that are in the
ledger; a peer on the device that the agent did not add is never touched.
Applying a plan and planning again yields no operation.

Make before break: a direct peer carries the neighbour's tunnel routes only once
its path is proven (see ``health``); until then it sits on the device with its
endpoint and keepalive only, and traffic keeps flowing through the hub.

Host routes and the hub: WireGuard moves an allowed IP to the last peer that
claims it. When the hub peer carries a neighbour's /32 explicitly, adding the
direct peer takes that route from the hub; the ledger records it and, when the
direct peer goes, the route is given back to the hub peer, so traffic to that
neighbour falls back through the hub. (A hub carrying the whole tunnel network
as one prefix loses nothing: the longer /32 simply wins.)
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from wg_autopeer.agent.ledger import InterfaceLedger, LedgerPeer, LedgerStore
from wg_autopeer.agent.safety import DirectPeer, Refusal
from wg_autopeer.wireguard.base import (
    DeviceState,
    IPNetwork,
    PeerConfig,
    WireGuardControl,
)

DEFAULT_KEEPALIVE = 3


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


def plan(
    desired: Sequence[DirectPeer],
    device: DeviceState,
    ledger: InterfaceLedger,
    hub_key: str,
    keepalive: int = DEFAULT_KEEPALIVE,
    *,
    routed: Collection[str] = frozenset(),
    now: float | None = None,
) -> Plan:
    """Operations that turn ``device`` into hub + foreign peers + ``desired``.

    Make before break: only the peers named in ``routed`` (paths already proven)
    carry the neighbour's tunnel routes; every other desired peer is put on the
    device with its endpoint and keepalive and no routes, so traffic stays on the
    hub until it is proven. A peer whose offered endpoint changed is removed and
    added afresh, unrouted: the new endpoint has to prove itself, and WireGuard
    starts a new handshake only for a new peer. The endpoint that the device
    reports is never written back: WireGuard roams it to where the neighbour's
    packets really come from.

    Order: removals first, then host routes given back to the hub, then adds and
    updates, so a route freed by one peer can be taken by another in the same plan.
    ``now`` (epoch seconds) stamps new or re-added ledger entries.
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
    offered: set[IPNetwork] = set()
    for peer in desired:
        reason = None
        if peer.public_key == hub_key:
            reason = "is the hub peer"
        elif peer.public_key in on_device and peer.public_key not in ledger:
            reason = "is a peer the agent did not add"
        elif peer.public_key in wanted:
            reason = "is desired twice"
        elif foreign_ips.intersection(peer.allowed_ips) or offered.intersection(peer.allowed_ips):
            reason = "claims an allowed IP another peer owns"
        if reason is not None:
            skipped.append(Refusal(peer.public_key, f"not applied: {reason}"))
            continue
        wanted[peer.public_key] = peer
        offered.update(peer.allowed_ips)

    fresh = {
        key
        for key, want in wanted.items()
        if key not in on_device or (old := ledger.get(key)) is None or old.endpoint != want.endpoint
    }
    routes = {
        key: want.allowed_ips if key in routed and key not in fresh else ()
        for key, want in wanted.items()
    }
    claimed = {ip for ips in routes.values() for ip in ips}

    # Routes the agent took from the hub earlier, whoever in the ledger holds them now.
    taken_before = {ip for entry in ledger for ip in entry.taken_from_hub}

    operations: list[Operation] = [
        RemovePeer(entry.public_key)
        for entry in ledger
        if entry.public_key in on_device
        and (entry.public_key not in wanted or entry.public_key in fresh)
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
        allowed = routes[key]
        if key in fresh or current is None or old is None:
            operations.append(SetPeer(PeerConfig(key, allowed, want.endpoint, keepalive)))
            added_at = stamp
        else:
            # Devices report "off" as None or 0.
            if (current.persistent_keepalive or 0) != keepalive:
                # No endpoint in the update: the one WireGuard roamed to stays.
                operations.append(SetPeer(PeerConfig(key, allowed, None, keepalive)))
            elif set(current.allowed_ips) != set(allowed):
                operations.append(SetAllowedIps(key, allowed))
            added_at = old.added_at
        taken = tuple(ip for ip in allowed if ip in hub_ips or ip in taken_before)
        entries.append(LedgerPeer(key, want.endpoint, allowed, taken, added_at))

    return Plan(tuple(operations), InterfaceLedger.of(entries), ledger, tuple(skipped))


def keep_working_endpoints(
    desired: Sequence[DirectPeer],
    device: DeviceState,
    ledger: InterfaceLedger,
    lan_networks: Sequence[IPNetwork],
    now: float,
    *,
    fresh_within: float,
) -> tuple[DirectPeer, ...]:
    """``desired`` with the offered endpoint of each working peer replaced by the one
    the agent configured before, so ``plan`` leaves that peer alone.

    A peer works when it has a handshake younger than ``fresh_within`` seconds and
    WireGuard has it at an address on one of our LANs. A server may offer another
    port for it at any answer (wireguard-web offers the port its NAT showed the
    hub); re-adding a working peer at that port would break a proven path.
    """
    kept: list[DirectPeer] = []
    for want in desired:
        old = ledger.get(want.public_key)
        current = device.peer(want.public_key)
        handshake = current.latest_handshake if current is not None else None
        working = (
            old is not None
            and current is not None
            and current.endpoint is not None
            and handshake is not None
            and handshake > 0
            and now - handshake <= fresh_within
            and any(current.endpoint.address in net for net in lan_networks)
        )
        if working and old is not None and old.endpoint != want.endpoint:
            want = DirectPeer(want.public_key, old.endpoint, want.allowed_ips)
        kept.append(want)
    return tuple(kept)


def recreate_plan(ledger: InterfaceLedger, public_keys: Iterable[str], keepalive: int) -> Plan:
    """Take pending peers (ours, no routes) off the device and put them back as they
    were, so that the device starts their handshakes afresh; the ledger is unchanged
    (the grace keeps running from the first add). Keys of peers that are not ours and
    pending are left out."""
    operations: list[Operation] = []
    for public_key in public_keys:
        entry = ledger.peers.get(public_key)
        if entry is None or entry.allowed_ips or entry.endpoint is None:
            continue
        again = PeerConfig(public_key, (), entry.endpoint, keepalive)
        operations += (RemovePeer(public_key), SetPeer(again))
    return Plan(tuple(operations), ledger, ledger)


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
