"""Who is calling: the hub peer whose allowed IPs hold the request's source address.

WireGuard's cryptokey routing guarantees that a packet from a peer's allowed IP
was sent with that peer's key, so the source address is the identity. The hub's
device state is cached and indexed by allowed IP (a dict lookup per request,
never a scan of all peers), refreshed on a timer and on an unknown source,
rate-limited so unknown sources cannot hammer the device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_network

from wg_autopeer.errors import WireGuardError
from wg_autopeer.server.matching import PublicIdentity, public_identity
from wg_autopeer.wireguard.base import (
    DeviceState,
    Endpoint,
    IPAddress,
    IPNetwork,
    WireGuardControl,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class HubSnapshot:
    """The device state, indexed for lookups by key and by source address."""

    peers: Mapping[str, HubPeer]
    hosts: Mapping[IPAddress, str]
    # For allowed IPs wider than a host: (version, prefix) -> network -> key, longest first.
    networks: tuple[tuple[int, int, Mapping[IPNetwork, str]], ...]

    @classmethod
    def build(cls, device: DeviceState) -> HubSnapshot:
        peers: dict[str, HubPeer] = {}
        hosts: dict[IPAddress, str] = {}
        nets: dict[tuple[int, int], dict[IPNetwork, str]] = {}
        for peer in device.peers:
            tunnel_ips = []
            for net in peer.allowed_ips:
                if net.prefixlen == net.max_prefixlen:
                    tunnel_ips.append(net.network_address)
                    hosts[net.network_address] = peer.public_key
                else:
                    nets.setdefault((net.version, net.prefixlen), {})[net] = peer.public_key
            peers[peer.public_key] = HubPeer(
                peer.public_key, tuple(tunnel_ips), peer.endpoint, peer.latest_handshake
            )
        ordered = tuple(
            (version, prefix, table)
            for (version, prefix), table in sorted(nets.items(), key=lambda kv: -kv[0][1])
        )
        return cls(peers, hosts, ordered)

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


EMPTY = HubSnapshot({}, {}, ())


def normalise_source(address: IPAddress) -> IPAddress:
    """A dual-stack socket shows IPv4 callers as ``::ffff:a.b.c.d``: use the IPv4 form."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if isinstance(address, IPv6Address) and address.scope_id is not None:
        return IPv6Address(str(address).split("%", 1)[0])
    return address


class HubView:
    """Cached view of the hub's WireGuard device ``interface``."""

    def __init__(
        self,
        control: WireGuardControl,
        interface: str,
        *,
        min_refresh_gap: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        on_refresh: Callable[[HubSnapshot], None] | None = None,
    ) -> None:
        self.control = control
        self.interface = interface
        self.min_refresh_gap = min_refresh_gap
        self._monotonic = monotonic
        self._on_refresh = on_refresh
        self.snapshot: HubSnapshot = EMPTY
        self.refreshed_at: float | None = None
        self.last_error: WireGuardError | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()

    async def refresh(self) -> HubSnapshot:
        """Re-read the device now; raises ``WireGuardError`` (the old snapshot stays)."""
        async with self._lock:
            return await self._refresh_locked()

    async def _refresh_locked(self) -> HubSnapshot:
        self._attempted_at = self._monotonic()
        try:
            device = await self.control.get_device(self.interface)
        except WireGuardError as exc:
            self.last_error = exc
            raise
        self.last_error = None
        self.snapshot = HubSnapshot.build(device)
        self.refreshed_at = self._monotonic()
        if self._on_refresh is not None:
            self._on_refresh(self.snapshot)
        return self.snapshot

    async def refresh_soon(self) -> bool:
        """Refresh unless one was attempted within ``min_refresh_gap``; True if refreshed.

        Concurrent callers share one refresh: whoever waited on the lock finds the gap
        not yet passed and uses the fresh snapshot.
        """
        return await self._refresh_unless(
            lambda attempted: self._monotonic() - attempted < self.min_refresh_gap
        )

    async def refresh_since(self, moment: float) -> bool:
        """Make sure the view was read after ``moment`` (monotonic); True if it re-read.

        Concurrent callers share one read: whoever waited on the lock finds a read
        that started after its moment and uses it.
        """
        return await self._refresh_unless(lambda attempted: attempted >= moment)

    async def _refresh_unless(self, recent_enough: Callable[[float], bool]) -> bool:
        """Re-read the device unless the last attempt is ``recent_enough``; never raises."""
        async with self._lock:
            attempted = self._attempted_at
            if attempted is not None and recent_enough(attempted):
                return False
            try:
                await self._refresh_locked()
            except WireGuardError as exc:
                log.warning("reading %s failed: %s", self.interface, exc)
                return False
            return True

    def peek(self, source: IPAddress) -> HubPeer | None:
        """The cached peer owning ``source``, without touching the device."""
        return self.snapshot.lookup(normalise_source(source))

    async def identify(self, source: IPAddress) -> HubPeer | None:
        """The peer owning ``source``; an unknown source triggers a rate-limited refresh."""
        peer = self.peek(source)
        if peer is None and await self.refresh_soon():
            peer = self.peek(source)
        return peer
