"""The report-and-apply loop of one WireGuard interface.

``InterfaceWorker`` reports this interface's LANs to its server (holding a
blocking query open when the server offers one), runs every answer through the
safety filter, and applies the reconcile plan; it also judges the health of the
direct peers it added. The ``Agent`` in ``daemon.py`` owns the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from wg_autopeer.agent.backoff import Backoff
from wg_autopeer.agent.client import PeeringClient, default_server_url
from wg_autopeer.agent.health import Suppressions, judge
from wg_autopeer.agent.ledger import InterfaceLedger
from wg_autopeer.agent.reconcile import Plan, apply, plan, removal_plan
from wg_autopeer.agent.safety import DirectPeer, SafetyContext, filter_offers
from wg_autopeer.errors import (
    NoSuchInterface,
    ServerError,
    UnsafeAnswer,
    WireGuardError,
)
from wg_autopeer.netview.model import IPInterface, LanUplink, NetSnapshot
from wg_autopeer.protocol import LanEntry
from wg_autopeer.wireguard.base import DeviceState, IPAddress, IPNetwork

if TYPE_CHECKING:
    from wg_autopeer.agent.daemon import Agent

log = logging.getLogger(__name__)
T = TypeVar("T")

# A server that answers at once every time must not make us spin.
MIN_REQUEST_SPACING = 1.0
QUICK_ANSWERS_ALLOWED = 3
# Refusals remembered so each is logged once: four full answers' worth (256 offers each).
MAX_REMEMBERED_REFUSALS = 1024


@dataclass
class DirectPeerStatus:
    public_key: str
    endpoint: str
    allowed_ips: list[str]
    handshake_age: float | None
    rx_bytes: int
    tx_bytes: int
    health: str


@dataclass
class InterfaceStatus:
    """What ``wg-autopeer status`` shows for one WireGuard interface."""

    interface: str
    server: str | None = None
    last_contact: float | None = None
    last_outcome: str = "not contacted yet"
    blocking: bool = False
    lan: list[str] = field(default_factory=list)
    direct_peers: list[DirectPeerStatus] = field(default_factory=list)


@dataclass(frozen=True)
class Tunnel:
    """This interface's place in the VPN, worked out from its addresses and peers."""

    addresses: tuple[IPInterface, ...]
    server_url: str
    hub_key: str

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(a.network for a in self.addresses)


class InterfaceWorker:
    """The report-and-apply loop of one WireGuard interface."""

    def __init__(self, agent: Agent, interface: str) -> None:
        self.agent = agent
        self.interface = interface
        self.wake = asyncio.Event()
        self.status = InterfaceStatus(interface)
        self.accepted: tuple[DirectPeer, ...] = ()
        self.suppressions = Suppressions()
        self._refused_logged: set[tuple[str, str]] = set()
        self._etag: str | None = None
        self._quick_answers = 0
        self._etag_for: tuple[LanEntry, ...] = ()
        self._client: PeeringClient | None = None
        self._local_address: str | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._backoff = Backoff(base=1.0, cap=60.0)
        # Set once the first report has been tried (whatever its outcome): readiness.
        self.first_cycle_done = asyncio.Event()

    def _ledger(self) -> InterfaceLedger:
        """The direct peers this agent added on this interface (from the cached ledger)."""
        return self.agent.ledger_store.load().interface(self.interface)

    # -- inputs -----------------------------------------------------------------

    def _tunnel(self, device: DeviceState, snapshot: NetSnapshot) -> Tunnel | None:
        addresses = tuple(a.interface for a in snapshot.addresses if a.ifname == self.interface)
        if not addresses:
            self._set_outcome("the interface has no tunnel address")
            return None
        url = self.agent.config.server or default_server_url(addresses[0].network)
        hub_key = self._find_hub(device, url)
        if hub_key is None:
            self._set_outcome("no hub peer found (no peer routes the server's address)")
            return None
        return Tunnel(addresses, url, hub_key)

    def _find_hub(self, device: DeviceState, url: str) -> str | None:
        """The hub is the peer (not one of ours) that routes the server's address."""
        ledger = self._ledger()
        foreign = [p for p in device.peers if p.public_key not in ledger]
        host = urlsplit(url).hostname or ""
        try:
            server = ip_address(host)
        except ValueError:
            return foreign[0].public_key if len(foreign) == 1 else None
        best: tuple[int, str] | None = None
        for peer in foreign:
            for net in peer.allowed_ips:
                covers = server.version == net.version and server in net
                if covers and (best is None or net.prefixlen > best[0]):
                    best = (net.prefixlen, peer.public_key)
        return best[1] if best else None

    def _entries(self, device: DeviceState, uplinks: tuple[LanUplink, ...]) -> tuple[LanEntry, ...]:
        assert device.public_key is not None  # checked by the caller
        return tuple(
            LanEntry(
                pubkey=device.public_key,
                ip=u.address.ip,
                netmask=u.address.network.prefixlen,
                gateway=u.gateway,
                listen_port=device.listen_port,
            )
            for u in uplinks
        )

    def _context(
        self, device: DeviceState, tunnel: Tunnel, uplinks: tuple[LanUplink, ...]
    ) -> SafetyContext:
        assert device.public_key is not None
        ledger = self._ledger()
        server_host = urlsplit(tunnel.server_url).hostname or ""
        hub_ips: list[IPAddress] = []
        with contextlib.suppress(ValueError):
            hub_ips.append(ip_address(server_host))
        for net in tunnel.networks:
            first = next(iter(net.hosts()), None)
            if first is not None and first not in hub_ips:
                hub_ips.append(ip_address(str(first)))
        return SafetyContext(
            own_key=device.public_key,
            hub_key=tunnel.hub_key,
            tunnel_networks=tunnel.networks,
            own_tunnel_ips=tuple(a.ip for a in tunnel.addresses),
            hub_tunnel_ips=tuple(hub_ips),
            lan_networks=tuple(u.address.network for u in uplinks),
            foreign_peers={
                p.public_key: p.allowed_ips for p in device.peers if p.public_key not in ledger
            },
            own_lan_ips=tuple(u.address.ip for u in uplinks),
        )

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        try:
            # After a restart on a new network wireguard-go may still hold the old
            # source address for the hub (see rebind_hub): clear it before reporting.
            with contextlib.suppress(WireGuardError):
                await self.rebind_hub()
            if self.agent.config.first_report_delay > 0:
                await asyncio.sleep(self.agent.config.first_report_delay)
            while True:
                self.wake.clear()
                delay = await self._cycle()
                self.first_cycle_done.set()
                if delay is None:
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self.wake.wait()
        except NoSuchInterface as exc:
            log.warning("%s: interface went away (%s); worker stops", self.interface, exc.reason)
        finally:
            # A worker that dies still counts as done: readiness must not wait for it.
            self.first_cycle_done.set()
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    async def _cycle(self) -> float | None:
        """One report and apply. Returns how long to wait for a wake-up before the
        next one, or None to go again at once (a blocking query just returned)."""
        agent = self.agent
        snapshot = agent.snapshot
        uplinks = snapshot.lan_uplinks()
        if not agent.enabled or not uplinks:
            why = "paused" if not agent.enabled else "no default gateway"
            await self.withdraw(why)
            # The health loop skips this state, so clear what `status` would show stale.
            self.status.lan = []
            self.status.direct_peers = []
            self._set_outcome(why, contact=False)
            return None if self.wake.is_set() else agent.config.interval
        self.status.lan = [f"{u.ifname} {u.address} via {u.gateway}" for u in uplinks]
        device = await agent.control.get_device(self.interface)
        if device.public_key is None:
            self._set_outcome("the interface has no key")
            return agent.config.interval
        tunnel = self._tunnel(device, snapshot)
        if tunnel is None:
            return agent.config.interval
        self.status.server = tunnel.server_url
        entries = self._entries(device, uplinks)
        if agent.stopping.is_set():
            # Shutdown is telling the server we leave; a report now would register us
            # again and neighbours would add a peer that is about to go.
            return agent.config.interval
        client = self._client_for(tunnel)
        blocking = agent.config.push and self._etag is not None and entries == self._etag_for
        started = time.monotonic()
        try:
            result = await self._race(
                client.report(
                    tunnel.server_url,
                    entries,
                    etag=self._etag if blocking else None,
                    wait=agent.config.wait if blocking else None,
                )
            )
        except ServerError as exc:
            # Keep the direct peers that still handshake; the health checker judges them.
            self._set_outcome(f"server unreachable: {exc.reason}", contact=False)
            log.warning("%s: %s", self.interface, exc)
            self._etag = None
            return self._backoff.next_delay() if exc.retryable else agent.config.interval
        except UnsafeAnswer as exc:
            self._set_outcome(f"answer refused: {exc}")
            log.warning("%s: answer refused whole: %s", self.interface, exc)
            self._etag = None
            return agent.config.interval
        if result is None:  # woken by a trigger: report again with fresh inputs
            return None
        self._backoff.reset()
        # Push is in use only if we asked for it and the server offers it.
        self.status.blocking = agent.config.push and result.blocking_supported
        if result.not_modified:
            self._set_outcome("no change")
        else:
            assert result.answer is not None
            filtered = filter_offers(result.answer.peers, self._context(device, tunnel, uplinks))
            for refusal in filtered.refused:
                self._log_refusal_once(refusal.pubkey, refusal.reason)
            self.accepted = filtered.accepted
            await self.reconcile(tunnel.hub_key)
            self._set_outcome(
                f"ok: {len(filtered.accepted)} neighbour(s), {len(filtered.refused)} refused"
            )
        if agent.config.push and result.blocking_supported and result.etag:
            self._etag, self._etag_for = result.etag, entries
            # A held query that answers at once is normal after a change, but a server
            # that does it every time would make us spin: after a few in a row, pace.
            quick = time.monotonic() - started < MIN_REQUEST_SPACING
            self._quick_answers = self._quick_answers + 1 if quick else 0
            if self._quick_answers > QUICK_ANSWERS_ALLOWED:
                return MIN_REQUEST_SPACING
            return None
        self._etag = None
        return agent.config.interval

    async def _race(self, request: Coroutine[Any, Any, T]) -> T | None:
        """Run the request until it finishes or a trigger wakes this worker."""
        task = asyncio.ensure_future(request)
        waker = asyncio.ensure_future(self.wake.wait())
        try:
            done, _ = await asyncio.wait({task, waker}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            return None
        finally:
            for pending in (task, waker):
                pending.cancel()
            # Not `suppress(CancelledError)` around each await: a cancellation of this
            # worker landing there (shutdown cancels it just as its held query returns)
            # would be swallowed and the worker would report on, hanging shutdown.
            # gather() re-raises our own cancellation and keeps theirs as results.
            await asyncio.gather(task, waker, return_exceptions=True)

    def _client_for(self, tunnel: Tunnel) -> PeeringClient:
        host = urlsplit(tunnel.server_url).hostname or ""
        try:
            family = ip_address(host).version
        except ValueError:
            family = 4
        local = next((str(a.ip) for a in tunnel.addresses if a.version == family), None)
        self._local_address = local
        if self._client is None or self._client.local_address != local:
            if self._client is not None:
                self._closing.add(asyncio.ensure_future(self._client.aclose()))
            self._client = PeeringClient(local)
        return self._client

    def _set_outcome(self, outcome: str, *, contact: bool = True) -> None:
        self.status.last_outcome = outcome
        if contact:
            self.status.last_contact = time.time()

    def _log_refusal_once(self, pubkey: str, reason: str) -> None:
        if (pubkey, reason) not in self._refused_logged:
            if len(self._refused_logged) >= MAX_REMEMBERED_REFUSALS:
                # A server offering fresh junk keys in every answer must not grow this
                # set without bound; forgetting only means a repeat is logged again.
                self._refused_logged.clear()
            self._refused_logged.add((pubkey, reason))
            log.warning("%s: refused peer %.10s…: %s", self.interface, pubkey, reason)

    # -- applying ---------------------------------------------------------------

    async def reconcile(self, hub_key: str) -> None:
        """Make the device hold exactly the accepted, unsuppressed direct peers."""
        desired = [p for p in self.accepted if not self.suppressions.is_suppressed(p.public_key)]
        await self._apply(
            lambda device, ledger: plan(
                desired, device, ledger, hub_key, self.agent.config.persistent_keepalive
            )
        )

    async def withdraw(self, why: str) -> None:
        """Remove every direct peer this agent added here, giving routes back to the hub."""
        self.accepted = ()
        self._etag = None
        ledger = self._ledger()
        if not len(ledger):
            return
        device = await self.agent.control.get_device(self.interface)
        hub_key = self._hub_key_for_removal(device)
        log.info("%s: removing %d direct peer(s): %s", self.interface, len(ledger), why)
        await self._apply(lambda device, ledger: removal_plan(device, ledger, hub_key))

    def _hub_key_for_removal(self, device: DeviceState) -> str:
        url = self.agent.config.server
        if url is None:
            addresses = [
                a.interface for a in self.agent.snapshot.addresses if a.ifname == self.interface
            ]
            url = default_server_url(addresses[0].network) if addresses else ""
        return self._find_hub(device, url) or ""

    async def _apply(self, make_plan: Callable[[DeviceState, InterfaceLedger], Plan]) -> None:
        async with self.agent.apply_lock:
            device = await self.agent.control.get_device(self.interface)
            ledger = self._ledger()
            the_plan = make_plan(device, ledger)
            for skipped in the_plan.skipped:
                self._log_refusal_once(skipped.pubkey, skipped.reason)
            if the_plan.empty:
                return
            for op in the_plan.operations:
                log.info("%s: %s", self.interface, op)
            await apply(the_plan, self.agent.control, self.interface, self.agent.ledger_store)
            self.agent.writes += len(the_plan.operations)

    def forget_etag(self) -> None:
        """Make the next report a plain one that gets a fresh answer at once."""
        self._etag = None

    def _handshake_timeout(self) -> float:
        """How long a new direct peer may take to handshake.

        Against a server without blocking queries (wireguard-web) the neighbour learns
        of us only at its next poll, up to an interval later, and WireGuard drops our
        handshakes until then: judging it earlier would remove every pair before it
        could form. With push, both sides learn within a second.
        """
        config = self.agent.config
        if self.status.blocking:
            return config.handshake_timeout
        return config.handshake_timeout + config.interval

    async def leave(self) -> None:
        """Tell this interface's server that we go (DELETE; best effort, about 1 s)."""
        url = self.status.server
        if url is None:
            return
        if self._client is not None:
            await self._client.leave(url)
            return
        async with PeeringClient(self._local_address) as client:
            await client.leave(url)

    async def rebind_hub(self) -> None:
        """Re-apply the hub peer's own endpoint, unchanged, after the LAN changed.

        wireguard-go on Linux keeps the source address it last used for a peer
        ("sticky sockets"); after a roam that address is gone and every packet to
        the hub fails until the endpoint is set again. Setting the identical value
        changes no configuration and keeps the session, but clears that cache, so
        the hub path (and the report that rides on it) works at once.
        """
        device = await self.agent.control.get_device(self.interface)
        hub_key = self._hub_key_for_removal(device)
        hub = device.peer(hub_key) if hub_key else None
        if hub is None or hub.endpoint is None:
            return
        async with self.agent.apply_lock:
            await self.agent.control.set_peer(self.interface, hub.as_config())
        log.debug(
            "%s: re-applied the hub endpoint %s after a LAN change", self.interface, hub.endpoint
        )

    async def check_health(self) -> None:
        """Drop direct peers that do not handshake; they fall back to the hub."""
        # Ledger and device are read under the apply lock: an apply writes the ledger
        # first and the device next, so in between a peer being added would look as if
        # something had taken it off the device, and fail for nothing.
        async with self.agent.apply_lock:
            ledger = self._ledger()
            if not len(ledger) and not self.accepted:
                self.status.direct_peers = []
                return
            # An empty ledger with accepted offers still goes on: a peer whose suppression
            # ran out is re-added below, even when it was the only one (the server's answer
            # has not changed, so no new answer would bring it back).
            device = await self.agent.control.get_device(self.interface)
        now = time.time()
        failed: list[str] = []
        peers: list[DirectPeerStatus] = []
        for entry in ledger:
            state = device.peer(entry.public_key)
            verdict = judge(
                state,
                entry.added_at,
                now,
                handshake_timeout=self._handshake_timeout(),
                stale_after=self.agent.config.handshake_stale_after,
            )
            if verdict.failed:
                period = self.suppressions.record_failure(entry.public_key)
                log.warning(
                    "%s: direct peer %.10s… at %s failed: %s; back to the hub for %.0f s",
                    self.interface,
                    entry.public_key,
                    entry.endpoint,
                    verdict.reason,
                    period,
                )
                failed.append(entry.public_key)
            elif verdict.state.value == "healthy":
                self.suppressions.record_healthy(entry.public_key)
            handshake = state.latest_handshake if state else None
            peers.append(
                DirectPeerStatus(
                    public_key=entry.public_key,
                    endpoint=str(entry.endpoint),
                    allowed_ips=[str(ip) for ip in entry.allowed_ips],
                    handshake_age=round(now - handshake, 1) if handshake else None,
                    rx_bytes=state.rx_bytes if state else 0,
                    tx_bytes=state.tx_bytes if state else 0,
                    health=verdict.state.value,
                )
            )
        self.status.direct_peers = peers
        hub_key = self._hub_key_for_removal(device)
        if failed or self.accepted:
            # Also re-adds peers whose suppression ran out; a no-op plan writes nothing.
            await self.reconcile(hub_key)
