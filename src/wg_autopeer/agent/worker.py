"""The report-and-apply loop of one WireGuard interface.

``InterfaceWorker`` reports this interface's LANs to its server (holding a
blocking query open when the server offers one), runs every answer through the
safety filter, and applies the reconcile plan; it also judges the health of the
direct peers it added. The ``Agent`` in ``daemon.py`` owns the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from wg_autopeer.agent.backoff import Backoff
from wg_autopeer.agent.client import PeeringClient
from wg_autopeer.agent.health import (
    ACTIVE_TICK,
    ADD_STAGGER,
    CONFIRM_WITHIN,
    DEADLINE_SLACK,
    HEARTBEAT_INTERVAL,
    IDLE_TICK,
    PENDING_TICK,
    NextLook,
    PathState,
    RxWatch,
    Suppressions,
    TrafficWatch,
    adds_later,
    carries_data,
    judge,
    recreate_due,
)
from wg_autopeer.agent.ledger import InterfaceLedger, LedgerPeer
from wg_autopeer.agent.reconcile import (
    Plan,
    apply,
    keep_working_endpoints,
    plan,
    recreate_plan,
    removal_plan,
)
from wg_autopeer.agent.safety import DirectPeer, SafetyContext, filter_offers
from wg_autopeer.agent.tunnel import Tunnel, find_hub, find_tunnel
from wg_autopeer.clock import GRID_SLACK, next_on_grid
from wg_autopeer.errors import (
    NoSuchInterface,
    ServerError,
    UnsafeAnswer,
    WireGuardError,
)
from wg_autopeer.netview.model import IPInterface, LanUplink
from wg_autopeer.protocol import LanEntry
from wg_autopeer.wireguard.base import DeviceState, IPAddress, IPNetwork

if TYPE_CHECKING:
    from wg_autopeer.agent.daemon import Agent

log = logging.getLogger(__name__)
T = TypeVar("T")

# A server that answers at once every time must not make us spin.
MIN_REQUEST_SPACING = 1.0
# Failed reports are retried after 1, 2, 4 … s with full jitter, at most this far apart.
REPORT_RETRY_CAP = 60.0
QUICK_ANSWERS_ALLOWED = 3
# Refusals remembered so each is logged once: four full answers' worth (256 offers each).
MAX_REMEMBERED_REFUSALS = 1024
# An interface the user did not name is probed (GET, nothing about the LAN) before
# it is sent a report; one whose server is not a peering server is asked again
# this much later, or at the next network change or sync.
NOT_A_HUB_RECHECK = 600.0
# Heartbeats go to the discard port: nothing needs to listen there. What counts is
# that the datagram crosses the direct path and shows in the neighbour's received
# bytes (and a port-unreachable answer, if it sends one, shows in ours).
HEARTBEAT_PORT = 9
HEARTBEAT_PAYLOAD = b"wg-autopeer heartbeat\n"


@dataclass
class DirectPeerStatus:
    public_key: str
    endpoint: str
    allowed_ips: list[str]
    handshake_age: float | None
    rx_bytes: int
    tx_bytes: int
    # pending (being proven, no routes), passive (waits for the neighbour's
    # handshake), active (proven, carries the routes), failed.
    health: str
    # The neighbour's tunnel routes are on this peer now.
    routed: bool = False


@dataclass
class InterfaceStatus:
    """What ``wg-autopeer status`` shows for one WireGuard interface."""

    interface: str
    server: str | None = None
    last_contact: float | None = None
    last_outcome: str = "not contacted yet"
    blocking: bool = False
    tunnel_network: list[str] = field(default_factory=list)
    tunnel_network_source: str | None = None
    lan: list[str] = field(default_factory=list)
    direct_peers: list[DirectPeerStatus] = field(default_factory=list)
    # Why this interface gets no report (an auto-discovered one whose server is not a
    # peering server: another company's tunnel, a commercial VPN); None when it does.
    skipped: str | None = None


class InterfaceWorker:
    """The report-and-apply loop of one WireGuard interface."""

    def __init__(self, agent: Agent, interface: str) -> None:
        self.agent = agent
        self.interface = interface
        self.wake = asyncio.Event()
        self.status = InterfaceStatus(interface)
        self.accepted: tuple[DirectPeer, ...] = ()
        clock = agent.clock
        self.suppressions = Suppressions(clock=clock.monotonic)
        # Keys whose direct path is proven: only they get the neighbour's routes.
        self.proven: set[str] = set()
        # New peers held back a moment before they go on the device (see
        # health.ADD_STAGGER): key -> monotonic time from which they may.
        self._held_back: dict[str, float] = {}
        # Proven, routed a moment ago, and no data received from the neighbour since:
        # it must arrive within CONFIRM_WITHIN (see health.py). Key -> the received
        # bytes count at the last look, and when the routes moved (monotonic).
        self.unconfirmed: dict[str, tuple[int, float]] = {}
        # Loop time until which heartbeats go out every PENDING_TICK instead of every
        # second: the first CONFIRM_WITHIN after a path was moved onto, so that the
        # neighbour's confirmation never hangs on one heartbeat (or on an answer to ours
        # that its firewall may never send).
        self._fast_heartbeats_until = 0.0
        self.rx_watch = RxWatch(clock.monotonic)
        self.traffic = TrafficWatch(clock.monotonic)
        # Pending peers re-created once already to restart their handshake: key -> the
        # ledger entry's ``added_at``. Keyed by the addition, not only the key, so that a
        # neighbour who leaves and comes back is a new peer that may be re-created again
        # (it is pruned only when the path watch runs, which it may not in between).
        self.recreated: dict[str, float] = {}
        # Set whenever direct peers were added or changed: the path watch looks at once.
        self.paths_changed = asyncio.Event()
        # Wall-clock time from which every path's grace runs at least (see restart_paths).
        self._grace_from = 0.0
        self._heartbeat_sockets: dict[int, socket.socket] = {}
        # The server URL a probe showed to be a peering server (see _not_a_hub).
        self._verified_server: str | None = None
        self._refused_logged: set[tuple[str, str]] = set()
        self._etag: str | None = None
        self._quick_answers = 0
        self._etag_for: tuple[LanEntry, ...] = ()
        self._client: PeeringClient | None = None
        self._local_address: str | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._backoff = Backoff(base=1.0, cap=REPORT_RETRY_CAP)
        # Set once the first report has been tried (whatever its outcome): readiness.
        self.first_cycle_done = asyncio.Event()

    def _ledger(self) -> InterfaceLedger:
        """The direct peers this agent added on this interface (from the cached ledger)."""
        return self.agent.ledger_store.load().interface(self.interface)

    # -- inputs -----------------------------------------------------------------

    def _addresses(self) -> tuple[IPInterface, ...]:
        return tuple(
            a.interface for a in self.agent.snapshot.addresses if a.ifname == self.interface
        )

    def _tunnel(self, device: DeviceState) -> Tunnel | None:
        found = find_tunnel(
            device,
            self._addresses(),
            self._ledger().peers.keys(),
            server=self.agent.config.server,
            tunnel_network=self.agent.config.tunnel_network,
        )
        if isinstance(found, str):
            self._set_outcome(found)
            return None
        self.status.tunnel_network = [str(n) for n in found.networks]
        self.status.tunnel_network_source = found.network_source
        return found

    def _hub_key(self, device: DeviceState) -> str:
        """The hub's key for giving routes back ("" when no hub can be told apart)."""
        hub = find_hub(
            device, self._addresses(), self._ledger().peers.keys(), self.agent.config.server
        )
        return hub.public_key if hub is not None else ""

    def _entries(self, device: DeviceState, uplinks: tuple[LanUplink, ...]) -> tuple[LanEntry, ...]:
        assert device.public_key is not None  # checked by the caller
        return tuple(
            LanEntry(
                pubkey=device.public_key,
                ip=u.address.ip,
                netmask=u.address.network.prefixlen,
                gateway=u.gateway,
                listen_port=device.listen_port,
                gateway_mac=u.gateway_mac,
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
        watch = asyncio.create_task(
            self.agent.supervisor.run(f"path watch {self.interface}", self.watch_paths),
            name=f"paths-{self.interface}",
        )
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
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            for sock in self._heartbeat_sockets.values():
                sock.close()
            self._heartbeat_sockets.clear()
            # A worker that dies still counts as done: readiness must not wait for it.
            self.first_cycle_done.set()
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    async def _cycle(self) -> float | None:
        """One report and apply. Returns how long to wait for a wake-up before the
        next one, or None to go again at once (a blocking query just returned)."""
        agent = self.agent
        uplinks = agent.snapshot.lan_uplinks()
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
        tunnel = self._tunnel(device)
        if tunnel is None:
            return agent.config.interval
        self.status.server = tunnel.server_url
        entries = self._entries(device, uplinks)
        if agent.stopping.is_set():
            # Shutdown is telling the server we leave; a report now would register us
            # again and neighbours would add a peer that is about to go.
            return agent.config.interval
        client = self._client_for(tunnel)
        try:
            not_a_hub = await self._not_a_hub(client, tunnel.server_url)
        except ServerError as exc:
            self._set_outcome(f"server unreachable: {exc.reason}", contact=False)
            return self._backoff.next_delay()
        if not_a_hub is not None:
            if self.status.skipped != not_a_hub:
                log.warning("%s: not reporting our LAN here: %s", self.interface, not_a_hub)
            self.status.skipped = not_a_hub
            self._set_outcome(f"skipped: {not_a_hub}")
            await self.withdraw("its server is not a peering server")
            return NOT_A_HUB_RECHECK
        self.status.skipped = None
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

    async def _not_a_hub(self, client: PeeringClient, url: str) -> str | None:
        """Why ``url`` must not get our LAN details, or None when it may.

        The LAN address, prefix, gateway and key go only to a hub that asked for
        them: an interface the user named is trusted; any other is first probed
        with a request that says nothing about the LAN, once per server URL."""
        if self.interface in self.agent.config.interfaces or url == self._verified_server:
            return None
        # Not raced against wake-ups like a report: it is over within two seconds.
        reason = await client.serves_peering(url)
        if reason is None:
            self._verified_server = url
        return reason

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
        """Make the device hold exactly the accepted, unsuppressed direct peers, with
        the neighbour's routes on the proven ones only."""
        desired = [p for p in self.accepted if not self.suppressions.is_suppressed(p.public_key)]
        lans = tuple(u.address.network for u in self.agent.snapshot.lan_uplinks())
        config = self.agent.config

        def make_plan(device: DeviceState, ledger: InterfaceLedger) -> Plan:
            held = self._hold_back(desired, device.public_key, ledger)
            wanted = keep_working_endpoints(
                [p for p in desired if p.public_key not in held],
                device,
                ledger,
                lans,
                self.agent.clock.wall(),
                fresh_within=config.handshake_stale_after,
            )
            return plan(
                wanted,
                device,
                ledger,
                hub_key,
                config.persistent_keepalive,
                routed=self.proven,
                now=self.agent.clock.wall(),
            )

        await self._apply(make_plan)

    async def withdraw(self, why: str) -> None:
        """Remove every direct peer this agent added here, giving routes back to the hub."""
        self.accepted = ()
        self._etag = None
        self.proven.clear()
        ledger = self._ledger()
        if not len(ledger):
            return
        device = await self.agent.control.get_device(self.interface)
        hub_key = self._hub_key(device)
        log.info("%s: removing %d direct peer(s): %s", self.interface, len(ledger), why)
        await self._apply(lambda device, ledger: removal_plan(device, ledger, hub_key))

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
            # A peer re-added at a new endpoint lost its routes: it must prove itself again.
            self.proven.intersection_update(p.public_key for p in the_plan.ledger if p.allowed_ips)
            self._status_after(the_plan.ledger)
            self.paths_changed.set()

    def _hold_back(
        self, desired: Sequence[DirectPeer], own_key: str | None, ledger: InterfaceLedger
    ) -> set[str]:
        """The new peers of ``desired`` (ones we would initiate to) that must wait a
        moment longer before they go on the device, because our key is the greater of
        the pair (see health.ADD_STAGGER). The path watch adds them when that is over."""
        now = self.agent.clock.monotonic()
        new = {p.public_key for p in desired if p.endpoint and p.public_key not in ledger}
        held = {key: until for key, until in self._held_back.items() if key in new}
        fresh = [key for key in new if key not in held]
        for key in fresh:
            if own_key is not None and adds_later(own_key, key):
                held[key] = now + ADD_STAGGER
        self._held_back = held
        waiting = {key for key, until in held.items() if until > now}
        if waiting and fresh:
            self.paths_changed.set()  # so that the watch looks again when they may go on
        return waiting

    def _still_held_back(self) -> dict[str, float]:
        """Held-back peers still waiting: key -> seconds until they may go on."""
        now = self.agent.clock.monotonic()
        return {key: until - now for key, until in self._held_back.items() if until > now}

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
        hub_key = self._hub_key(device)
        hub = device.peer(hub_key) if hub_key else None
        if hub is None or hub.endpoint is None:
            return
        async with self.agent.apply_lock:
            await self.agent.control.set_peer(self.interface, hub.as_config())
        log.debug(
            "%s: re-applied the hub endpoint %s after a LAN change", self.interface, hub.endpoint
        )

    # -- direct paths -------------------------------------------------------------

    async def watch_paths(self) -> None:
        """Look at the direct paths when something is due, and only then: on a 0.2 s
        grid while one is being proven, on a 0.5 s grid while one carries traffic, on
        the 1 s grid of the heartbeats (in the same wake-up) while the active ones carry
        only heartbeats, at a silent path's exact deadline, when a suppression runs out;
        not at all while there is none. Every worker uses the same grids, so the
        interfaces' looks share their wake-ups (see health.py for the figures)."""
        loop = asyncio.get_running_loop()
        next_heartbeat = 0.0
        while True:
            self.paths_changed.clear()
            due: float | None = None
            if self.agent.enabled and self.agent.snapshot.lan_uplinks():
                try:
                    due = (await self.check_paths()).due(loop.time())
                except WireGuardError as exc:
                    log.debug("%s: path check failed: %s", self.interface, exc)
                    due = next_on_grid(loop.time(), ACTIVE_TICK)
            if self._active_routes():
                now = loop.time()
                # A look woken at the grid instant may read the clock a hair before it.
                if now >= next_heartbeat - GRID_SLACK:
                    self._send_heartbeats()
                    fast = now < self._fast_heartbeats_until
                    next_heartbeat = next_on_grid(now, PENDING_TICK if fast else HEARTBEAT_INTERVAL)
                due = next_heartbeat if due is None else min(due, next_heartbeat)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await self.paths_changed.wait()

    def restart_paths(self) -> None:
        """Treat every direct path as unproven from now on, with a full grace (after a
        resume or a clock jump): routes go back to the hub at the next look, and each
        path moves back onto its peer once a new handshake proves it."""
        self.proven.clear()
        self._grace_from = self.agent.clock.wall()
        self.rx_watch.retain(())
        self.traffic.retain(())
        self.paths_changed.set()

    def _active_routes(self) -> list[IPAddress]:
        """The tunnel addresses of the neighbours reached over a proven, non-passive path."""
        return [
            ip.network_address
            for entry in self._ledger()
            if entry.endpoint is not None
            for ip in entry.allowed_ips
        ]

    def _send_heartbeats(self) -> None:
        """One datagram through each active direct path (see health.py for why)."""
        for address in self._active_routes():
            sock = self._heartbeat_socket(address.version)
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.sendto(HEARTBEAT_PAYLOAD, (str(address), HEARTBEAT_PORT))

    def _heartbeat_socket(self, family: int) -> socket.socket | None:
        """A non-blocking UDP socket bound to our tunnel address of that family, so the
        heartbeat leaves through the tunnel whatever else routes the neighbour."""
        sock = self._heartbeat_sockets.get(family)
        if sock is not None:
            return sock
        own = next((a.ip for a in self._addresses() if a.version == family), None)
        if own is None:
            return None
        sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.bind((str(own), 0))
        except OSError as exc:
            sock.close()
            log.debug("%s: no heartbeat socket on %s: %s", self.interface, own, exc)
            return None
        self._heartbeat_sockets[family] = sock
        return sock

    async def check_paths(self) -> NextLook:
        """Judge every direct path; move the routes of proven ones onto them, take the
        routes of failed ones back to the hub. Returns when to look again."""
        # Ledger and device are read under the apply lock: an apply writes the ledger
        # first and the device next, so in between a peer being added would look as if
        # something had taken it off the device, and fail for nothing.
        async with self.agent.apply_lock:
            ledger = self._ledger()
            if not len(ledger) and not self.accepted:
                self.status.direct_peers = []
                return NextLook()
            # An empty ledger with accepted offers still goes on: a peer whose suppression
            # ran out is re-added below, even when it was the only one (the server's answer
            # has not changed, so no new answer would bring it back).
            device = await self.agent.control.get_device(self.interface)
        config = self.agent.config
        now = self.agent.clock.wall()
        changed = False
        busy = False
        peers: list[DirectPeerStatus] = []
        states: list[PathState] = []
        recreate: list[str] = []
        newly_proven = False
        for entry in ledger:
            state = device.peer(entry.public_key)
            # Routes on a peer whose proof was withdrawn (restart_paths) go back to the
            # hub unless the path proves itself again right here.
            routed = bool(entry.allowed_ips) and entry.public_key in self.proven
            changed = changed or (bool(entry.allowed_ips) and not routed)
            rx_bytes = state.rx_bytes if state else 0
            unconfirmed_for: float | None = None
            if routed and entry.public_key in self.unconfirmed:
                last_rx, routed_at = self.unconfirmed[entry.public_key]
                if carries_data(rx_bytes - last_rx):
                    del self.unconfirmed[entry.public_key]
                else:
                    self.unconfirmed[entry.public_key] = (rx_bytes, routed_at)
                    unconfirmed_for = self.agent.clock.monotonic() - routed_at
            verdict = judge(
                state,
                routed=routed,
                passive=entry.endpoint is None,
                added_at=max(entry.added_at, self._grace_from),
                now=now,
                rx_idle=self.rx_watch.observe(entry.public_key, rx_bytes),
                handshake_timeout=self._handshake_timeout(),
                dead_after=config.persistent_keepalive,
                stale_after=config.handshake_stale_after,
                unconfirmed_for=unconfirmed_for,
            )
            if verdict.failed:
                changed = True
                self._path_failed(entry, verdict.reason or "failed", routed=routed)
            elif verdict.routable and routed:
                # Keeps the pair "recently healthy": a failure now is retried soon.
                self.suppressions.record_healthy(entry.public_key)
                if state is not None and entry.endpoint is not None:
                    busy |= self.traffic.observe(entry.public_key, state.rx_bytes, state.tx_bytes)
            elif verdict.routable and not routed:
                changed = True
                newly_proven = True
                self.proven.add(entry.public_key)
                if entry.endpoint is not None:
                    self.unconfirmed[entry.public_key] = (rx_bytes, self.agent.clock.monotonic())
                self.rx_watch.restart(entry.public_key, rx_bytes)
                self.suppressions.record_healthy(entry.public_key)
                log.info(
                    "%s: direct path to %.10s… at %s proven; routes %s move onto it",
                    self.interface,
                    entry.public_key,
                    state.endpoint if state else entry.endpoint,
                    ", ".join(str(ip) for ip in self._offered_routes(entry.public_key)),
                )
            if (
                verdict.state is PathState.PENDING
                and self.recreated.get(entry.public_key) != entry.added_at
                and device.public_key is not None
                and recreate_due(device.public_key, entry.public_key, now - entry.added_at)
            ):
                recreate.append(entry.public_key)
            states.append(verdict.state)
            handshake = state.latest_handshake if state else None
            peers.append(
                DirectPeerStatus(
                    public_key=entry.public_key,
                    endpoint=str(state.endpoint if state and state.endpoint else entry.endpoint),
                    allowed_ips=[str(ip) for ip in entry.allowed_ips],
                    handshake_age=round(now - handshake, 1) if handshake else None,
                    rx_bytes=state.rx_bytes if state else 0,
                    tx_bytes=state.tx_bytes if state else 0,
                    health=verdict.state.value,
                    routed=routed,
                )
            )
        self.status.direct_peers = peers
        if recreate:
            await self._recreate({key: ledger.peers[key].added_at for key in recreate})
        self.recreated = {k: v for k, v in self.recreated.items() if k in ledger.peers}
        self.rx_watch.retain(ledger.peers.keys())
        self.traffic.retain(ledger.peers.keys())
        # A peer whose suppression ran out comes back here: the server's answer has not
        # changed, so no new answer would bring it back.
        # So does one held back a moment (see _hold_back) once that moment is over.
        held = self._still_held_back()
        returning = any(
            p.public_key not in ledger
            and not self.suppressions.is_suppressed(p.public_key)
            and p.public_key not in held
            for p in self.accepted
        )
        self.unconfirmed = {k: v for k, v in self.unconfirmed.items() if k in self.proven}
        if changed or returning:
            await self.reconcile(self._hub_key(device))
        if newly_proven:
            # The neighbour's answer to it confirms the path (see CONFIRM_WITHIN) without
            # waiting for the next heartbeat on the grid; more follow in quick succession.
            self._send_heartbeats()
            self._fast_heartbeats_until = asyncio.get_running_loop().time() + CONFIRM_WITHIN
        look = self._next_look(ledger, states, changed=changed, busy=busy, now=now)
        held = self._still_held_back()
        if held:
            # Also when the first held-back peer may go on the device.
            soonest = min(held.values())
            within = soonest if look.within is None else min(look.within, soonest)
            look = NextLook(look.tick, within)
        return look

    def _next_look(
        self,
        ledger: InterfaceLedger,
        states: list[PathState],
        *,
        changed: bool,
        busy: bool,
        now: float,
    ) -> NextLook:
        """When the path watch must look again, given this look's verdicts."""
        if changed or PathState.PENDING in states:
            return NextLook(PENDING_TICK)
        if self.unconfirmed:
            # A path just moved onto waits for the neighbour's data: look often, and at
            # its deadline exactly.
            return NextLook(PENDING_TICK, self._first_deadline(ledger))
        if PathState.PASSIVE in states:
            # A passive peer is proven by the neighbour's handshake, which may come
            # whenever the neighbour learns of us: watch closely at first, then calmly.
            young = any(
                e.endpoint is None and now - e.added_at < self._handshake_timeout() for e in ledger
            )
            if young:
                return NextLook(PENDING_TICK)
        if PathState.ACTIVE in states or PathState.PASSIVE in states:
            # A passive path is judged by its handshake's age: a second is close enough.
            tick = ACTIVE_TICK if busy else IDLE_TICK
            return NextLook(tick, self._first_deadline(ledger))
        # Nothing on the device; a suppression running out brings a peer back.
        remaining = [self.suppressions.remaining(p.public_key) for p in self.accepted]
        waiting = [r for r in remaining if r > 0]
        return NextLook(within=min(waiting) if waiting else None)

    async def _recreate(self, added: dict[str, float]) -> None:
        """Re-create pending peers (key -> when added) once, in one plan, so that the
        device initiates their handshakes at once instead of after WireGuard's 5 s retry
        (see ``health.RECREATE_AFTER``)."""
        self.recreated.update(added)
        keepalive = self.agent.config.persistent_keepalive
        for public_key in added:
            log.info("%s: no handshake with %.10s… yet: re-adding it", self.interface, public_key)

        def make_plan(device: DeviceState, ledger: InterfaceLedger) -> Plan:
            return recreate_plan(ledger, added, keepalive)

        await self._apply(make_plan)

    def _first_deadline(self, ledger: InterfaceLedger) -> float | None:
        """Seconds until the first routed, non-passive path has been silent for longer
        than the keepalive (or, just moved onto, than CONFIRM_WITHIN): it is judged
        then, not up to a tick later."""
        keepalive = self.agent.config.persistent_keepalive
        now = self.agent.clock.monotonic()
        left = [
            CONFIRM_WITHIN - (now - self.unconfirmed[entry.public_key][1]) + DEADLINE_SLACK
            if entry.public_key in self.unconfirmed
            else keepalive - silent + DEADLINE_SLACK
            for entry in ledger
            if entry.endpoint is not None and entry.public_key in self.proven
            for silent in [self.rx_watch.silent_for(entry.public_key)]
            if silent is not None
        ]
        return min(left, default=None)

    def _status_after(self, ledger: InterfaceLedger) -> None:
        """Make ``status`` show what was just applied, before the path watch looks: a
        new peer is there at once (``pending`` or ``passive``), a removed one is gone."""
        known = {p.public_key: p for p in self.status.direct_peers}
        peers: list[DirectPeerStatus] = []
        for entry in ledger:
            old = known.get(entry.public_key)
            routed = bool(entry.allowed_ips)
            if old is None:
                waiting = PathState.PASSIVE if entry.endpoint is None else PathState.PENDING
                old = DirectPeerStatus(
                    entry.public_key, str(entry.endpoint), [], None, 0, 0, waiting.value
                )
            health = PathState.ACTIVE.value if routed else old.health
            peers.append(
                dataclasses.replace(
                    old,
                    allowed_ips=[str(ip) for ip in entry.allowed_ips],
                    routed=routed,
                    health=health,
                )
            )
        self.status.direct_peers = peers

    def _offered_routes(self, public_key: str) -> tuple[IPNetwork, ...]:
        offer = next((p for p in self.accepted if p.public_key == public_key), None)
        return offer.allowed_ips if offer is not None else ()

    def _path_failed(self, entry: LedgerPeer, reason: str, *, routed: bool) -> None:
        """Give a failed path's routes back to the hub (the next plan does it at once).

        A passive peer stays on the device without routes: its neighbour (the seed's
        agent, say) may keep sending to us directly, and only a peer that knows its
        key lets that handshake prove the path again. Any other is removed and not
        retried for a back-off period; a path that never carried traffic fails
        quietly (logged once), since trying it cost nothing.
        """
        self.proven.discard(entry.public_key)
        if entry.endpoint is None:
            log.warning(
                "%s: passive direct path to %.10s… failed: %s; routes back to the hub",
                self.interface,
                entry.public_key,
                reason,
            )
            return
        period = self.suppressions.record_failure(entry.public_key)
        quiet = not routed and self.suppressions.failures(entry.public_key) > 1
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "%s: direct path to %.10s… at %s failed: %s; %s; next try in %.0f s",
            self.interface,
            entry.public_key,
            entry.endpoint,
            reason,
            "routes back to the hub" if routed else "traffic never left the hub",
            period,
        )
