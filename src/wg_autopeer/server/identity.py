"""Who is calling: the hub peer whose allowed IPs hold the request's source address.

WireGuard's cryptokey routing guarantees that a packet from a peer's allowed IP
was sent with that peer's key, so the source address is the identity. The hub's
device state is cached and indexed by allowed IP (a dict lookup per request,
never a scan of all peers), refreshed on a timer and on an unknown source,
rate-limited so unknown sources cannot hammer the device. Reads happen in a worker
thread and only the peers that changed reach the index (``server.hubread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_network

from wg_autopeer.errors import WireGuardError
from wg_autopeer.server.hubread import DeviceReader, HubDelta, reader_for
from wg_autopeer.server.matching import PublicIdentity, public_identity
from wg_autopeer.wireguard.base import (
    DeviceState,
    Endpoint,
    IPAddress,
    IPNetwork,
    PeerState,
    WireGuardControl,
)

log = logging.getLogger(__name__)

# At most one read of the device per this many seconds, whoever asks.
READ_GAP_S = 0.15
# Changed peers applied to the index (and judged) per turn of the event loop.
APPLY_SLICE = 200


@dataclass(frozen=True, slots=True)
class HubPeer:
    """A client as the hub's WireGuard device sees it."""

    public_key: str
    # Host routes (/32, /128) among its allowed IPs: its addresses in the tunnel.
    tunnel_ips: tuple[IPAddress, ...]
    endpoint: Endpoint | None
    latest_handshake: float | None

    @property
    def public_ip(self) -> PublicIdentity | None:
        return None if self.endpoint is None else public_identity(self.endpoint.address)

    def handshake_age(self, now: float) -> float | None:
        return None if self.latest_handshake is None else max(0.0, now - self.latest_handshake)


class HubSnapshot:
    """The device's peers, indexed for lookups by key and by source address.

    Kept up to date in place by ``apply`` with what changed since the previous read,
    so a read costs the loop O(changed peers), never O(clients).
    """

    def __init__(self) -> None:
        self.peers: dict[str, HubPeer] = {}
        self.hosts: dict[IPAddress, str] = {}
        # For allowed IPs wider than a host: (version, prefix) -> network -> key.
        self._nets: dict[tuple[int, int], dict[IPNetwork, str]] = {}
        # The same tables, longest prefix first.
        self.networks: tuple[tuple[int, int, dict[IPNetwork, str]], ...] = ()
        # Allowed IPs wider than a host, of the peers that have any (few do: the host
        # routes are the peer's ``tunnel_ips``, so no network object is kept for them).
        self._wider: dict[str, tuple[IPNetwork, ...]] = {}

    @classmethod
    def build(cls, device: DeviceState) -> HubSnapshot:
        snapshot = cls()
        snapshot.apply(HubDelta({p.public_key: p for p in device.peers}, full=True))
        return snapshot

    def apply(self, delta: HubDelta) -> None:
        """Bring the index up to ``delta``'s read."""
        leaving = self.peers.keys() - delta.changed.keys() if delta.full else delta.removed
        # Unindex every peer that left or changed first: an allowed IP may move between two
        # changed peers within one read, and must end with its new owner.
        for key in (*leaving, *delta.changed):
            self._unindex(key)
        for key in leaving:
            self.peers.pop(key, None)
        for peer in delta.changed.values():
            self._index(peer)
        # A handful of distinct prefix lengths at most: cheap to re-sort every time.
        self.networks = tuple(
            (version, prefix, table)
            for (version, prefix), table in sorted(self._nets.items(), key=lambda kv: -kv[0][1])
        )

    def _index(self, peer: PeerState) -> None:
        # Interned: the registry holds the same key (store.decode interns it too), and
        # at 100 000 clients every copy of it costs 10 MB.
        key = sys.intern(peer.public_key)
        tunnel_ips = []
        wider = []
        for net in peer.allowed_ips:
            if net.prefixlen == net.max_prefixlen:
                tunnel_ips.append(net.network_address)
                self.hosts[net.network_address] = key
            else:
                wider.append(net)
                self._nets.setdefault((net.version, net.prefixlen), {})[net] = key
        if wider:
            self._wider[key] = tuple(wider)
        self.peers[key] = HubPeer(key, tuple(tunnel_ips), peer.endpoint, peer.latest_handshake)

    def _unindex(self, key: str) -> None:
        peer = self.peers.get(key)
        for address in () if peer is None else peer.tunnel_ips:
            if self.hosts.get(address) == key:
                del self.hosts[address]
        for net in self._wider.pop(key, ()):
            table = self._nets.get((net.version, net.prefixlen))
            if table is not None and table.get(net) == key:
                del table[net]
                if not table:
                    del self._nets[(net.version, net.prefixlen)]

    def lookup(self, source: IPAddress) -> HubPeer | None:
        key = self.hosts.get(source)
        if key is None:
            # Longest prefix first, one dict lookup per distinct prefix length.
            for version, prefix, table in self.networks:
                if version != source.version:
                    continue
                key = table.get(ip_network((source, prefix), strict=False))
                if key is not None:
                    break
        return None if key is None else self.peers.get(key)


def normalise_source(address: IPAddress) -> IPAddress:
    """A dual-stack socket shows IPv4 callers as ``::ffff:a.b.c.d``: use the IPv4 form."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if isinstance(address, IPv6Address) and address.scope_id is not None:
        return IPv6Address(str(address).split("%", 1)[0])
    return address


class HubView:
    """Cached view of the hub's WireGuard device ``interface``, read off the event loop.

    Reads run one at a time in a worker thread (``DeviceReader``) and are shared: whoever
    asks for a read that started after some moment joins the one running or the next
    one, and reads start at most once per ``min_read_gap`` whoever asks, so a burst of
    roaming reports costs one read of the device, not one each.
    """

    def __init__(
        self,
        control: WireGuardControl,
        interface: str,
        *,
        reader: DeviceReader | None = None,
        min_refresh_gap: float = 1.0,
        min_read_gap: float = READ_GAP_S,
        monotonic: Callable[[], float] = time.monotonic,
        on_change: Callable[[HubDelta], None] | None = None,
    ) -> None:
        self.interface = interface
        self.reader = reader_for(control, interface) if reader is None else reader
        self.min_refresh_gap = min_refresh_gap
        self.min_read_gap = min_read_gap
        self._monotonic = monotonic
        self._on_change = on_change
        self.snapshot = HubSnapshot()
        self.refreshed_at: float | None = None
        self.last_error: WireGuardError | None = None
        # Device reads done, for tests and metrics.
        self.reads = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-read")
        # When the latest read started (monotonic), and when the latest good one did.
        self.attempted_at: float | None = None
        self._good_started_at: float | None = None
        self._current: asyncio.Task[bool] | None = None
        self._current_started = 0.0
        self._next: asyncio.Task[bool] | None = None
        # The reader's previous read may not be what the snapshot shows: read in full.
        self._resync = False

    async def refresh_since(self, moment: float) -> bool:
        """Make sure the view reflects a read that started at or after ``moment``
        (monotonic), joining a shared read if need be; False when that read failed."""
        if self._good_started_at is not None and self._good_started_at >= moment:
            return True
        self._forget_other_loops()
        task = self._current
        if task is None or self._current_started < moment:
            task = self._next_read()
        # Shielded: one asker giving up must not cancel the read the others wait for.
        return await asyncio.shield(task)

    async def refresh_soon(self) -> bool:
        """Read unless a read started within ``min_refresh_gap``; True if it read.

        For unknown sources: they must not be able to hammer the device.
        """
        attempted = self.attempted_at
        if attempted is not None and self._monotonic() - attempted < self.min_refresh_gap:
            return False
        return await self.refresh_since(self._monotonic())

    def _forget_other_loops(self) -> None:
        # Reads left behind by an event loop that stopped (tests run several in turn).
        loop = asyncio.get_running_loop()
        if self._current is not None and self._current.get_loop() is not loop:
            self._current, self._resync = None, True
        if self._next is not None and self._next.get_loop() is not loop:
            self._next = None

    def _next_read(self) -> asyncio.Task[bool]:
        if self._next is None:
            self._next = asyncio.create_task(self._queued_read(), name=f"hub-read-{self.interface}")
        return self._next

    async def _queued_read(self) -> bool:
        current = self._current
        if current is not None:
            await asyncio.wait([current])
        if self.attempted_at is not None:
            wait = self.attempted_at + self.min_read_gap - self._monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        self._next = None
        self._current = asyncio.current_task()
        self._current_started = self._monotonic()
        try:
            return await self._read(self._current_started)
        finally:
            self._current = None

    async def _read(self, started: float) -> bool:
        self.attempted_at = started
        # Until this read's delta is applied. A view that never read asks for every peer.
        full, self._resync = self._resync or self.refreshed_at is None, True
        loop = asyncio.get_running_loop()
        self.reads += 1
        try:
            delta, fresh = await loop.run_in_executor(self._executor, self._read_in_thread, full)
        except WireGuardError as exc:
            # The reader keeps its previous read on failure: still in step with the snapshot.
            self._resync = full
            self.last_error = exc
            log.warning("reading hub interface %s failed: %s", self.interface, exc)
            return False
        if fresh is not None:
            self.snapshot = fresh
            parts = [delta]
        else:
            # A few hundred peers at a time, letting requests run in between: a burst of
            # handshakes must not stall the loop. An allowed IP moving between peers of
            # two slices still ends with its new owner (unindexing checks the owner).
            parts = list(delta.slices(APPLY_SLICE))
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0)
            if fresh is None:
                self.snapshot.apply(part)
            if self._on_change is not None:
                self._on_change(part)
        self._resync = False
        self.last_error = None
        self._good_started_at = started
        self.refreshed_at = self._monotonic()
        return True

    def _read_in_thread(self, full: bool) -> tuple[HubDelta, HubSnapshot | None]:
        if full:
            # Every peer (the first read, or a resync): indexed here, off the loop, as
            # they come, so that no full set of parsed peers is ever held.
            fresh = HubSnapshot()
            delta = self.reader.read_each(
                lambda peers: fresh.apply(HubDelta({p.public_key: p for p in peers})), full=True
            )
            return delta, fresh
        changed: dict[str, PeerState] = {}
        delta = self.reader.read_each(
            lambda peers: changed.update((p.public_key, p) for p in peers)
        )
        delta = HubDelta(changed, delta.removed, full=delta.full, peers=delta.peers)
        if not delta.full:
            return delta, None
        # The reader started afresh by itself (it lost track): every peer is in ``changed``.
        fresh = HubSnapshot()
        fresh.apply(delta)
        return delta, fresh

    async def close(self) -> None:
        """Stop reading; the worker thread closes the reader's connection."""
        for task in (self._next, self._current):
            if task is not None:
                task.cancel()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(self._executor, self.reader.close)
        self._executor.shutdown(wait=False)

    def peek(self, source: IPAddress) -> HubPeer | None:
        """The cached peer owning ``source``, without touching the device."""
        return self.snapshot.lookup(normalise_source(source))

    async def identify(self, source: IPAddress) -> HubPeer | None:
        """The peer owning ``source``; an unknown source triggers a rate-limited refresh."""
        peer = self.peek(source)
        if peer is None and await self.refresh_soon():
            peer = self.peek(source)
        return peer
