"""Who shares a LAN with whom: pure functions of registrations, no I/O.

Two clients are LAN neighbours when they sit behind the same public identity
(the IPv4 address, or the IPv6 /64, that the hub sees as their endpoint) and
each reported an address in the same network behind the same gateway, with the
same gateway MAC address where both reported one, and the policy lets both
peer directly. Registrations are indexed by that
``GroupKey`` so one answer costs O(size of the LAN group), never O(all clients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from wg_autopeer.protocol import LanEntry, PeerOffer
from wg_autopeer.wireguard.base import IPAddress, IPNetwork

# An IPv4 address, or the /64 an IPv6 endpoint sits in (its privacy address rotates).
PublicIdentity = IPv4Address | IPv6Network

IPV6_SITE_PREFIX = 64


def public_identity(address: IPAddress) -> PublicIdentity:
    """Normalise the hub's view of a client's endpoint address into its public identity."""
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        return IPv6Network((address, IPV6_SITE_PREFIX), strict=False)
    return address


@dataclass(frozen=True, order=True, slots=True)
class ReportedLan:
    """One address a client reported on its LAN, with that LAN's gateway."""

    address: IPAddress
    prefix: int
    gateway: IPAddress
    listen_port: int | None = None
    # The gateway's MAC address as the client saw it; None when it did not say.
    gateway_mac: str | None = None

    @property
    def network(self) -> IPNetwork:
        # From the integer: building it from text re-parses the address every time.
        if self.address.version == 4:
            return IPv4Network((int(self.address), self.prefix), strict=False)
        return IPv6Network((int(self.address), self.prefix), strict=False)

    @classmethod
    def from_entry(cls, entry: LanEntry) -> ReportedLan:
        return cls(entry.ip, entry.netmask, entry.gateway, entry.listen_port, entry.gateway_mac)

    def same_lan_as(self, other: ReportedLan) -> bool:
        """Same gateway and network, and no fingerprint that tells the two LANs apart:
        homes behind one carrier-grade NAT with the same router defaults
        (192.168.1.0/24 via 192.168.1.1) differ in their router's MAC address."""
        # Same network, compared as integers: building both networks costs more than
        # the whole rest of an answer.
        mine, theirs = self.address, other.address
        return (
            self.gateway == other.gateway
            and self.prefix == other.prefix
            and mine.version == theirs.version
            and (int(mine) ^ int(theirs)) >> (mine.max_prefixlen - self.prefix) == 0
            and (
                self.gateway_mac is None
                or other.gateway_mac is None
                or self.gateway_mac == other.gateway_mac
            )
        )

    def sort_key(self) -> tuple[int, int, str, int, int, int, str, bool, int, str]:
        """A total order for any two entries; the dataclass order is not one: IPv4 and IPv6
        addresses refuse to compare, and so do None and an int ``listen_port``."""
        return (
            self.address.version,
            int(self.address),
            str(self.address),
            self.prefix,
            self.gateway.version,
            int(self.gateway),
            str(self.gateway),
            self.listen_port is None,
            self.listen_port or 0,
            self.gateway_mac or "",
        )


@dataclass(frozen=True, slots=True)
class GroupKey:
    """A LAN as seen from the internet: public identity, gateway and network."""

    public_ip: PublicIdentity
    gateway: IPAddress
    network: IPNetwork


@dataclass(frozen=True, slots=True)
class Registration:
    """What the server knows about one client; soft state that expires at ``expires_at``."""

    pubkey: str
    # The client's host addresses in the tunnel: its /32 and /128 allowed IPs on the hub.
    tunnel_ips: tuple[IPAddress, ...]
    public_ip: PublicIdentity
    lans: tuple[ReportedLan, ...]
    expires_at: float
    # Which hub saw the client (``ServerConfig.hub``): with one registry shared by several
    # hubs, only that hub's server judges it (roamed, stale handshake, gone).
    hub: str = ""

    def group_keys(self) -> frozenset[GroupKey]:
        return frozenset(GroupKey(self.public_ip, lan.gateway, lan.network) for lan in self.lans)

    def same_content(self, other: Registration | None) -> bool:
        """True when ``other`` differs at most in its expiry (answers would not change)."""
        return (
            other is not None
            and self.pubkey == other.pubkey
            and self.tunnel_ips == other.tunnel_ips
            and self.public_ip == other.public_ip
            and self.lans == other.lans
            and self.hub == other.hub
        )


@dataclass(frozen=True)
class Policy:
    """Which keys may peer directly: everyone (``allow is None``) or an allow-list, minus
    ``exclude``."""

    allow: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()

    def permits(self, pubkey: str) -> bool:
        if pubkey in self.exclude:
            return False
        return self.allow is None or pubkey in self.allow


def _offer(neighbour: Registration, lan: ReportedLan) -> PeerOffer:
    ips = [str(ip) for ip in neighbour.tunnel_ips]
    if lan.listen_port is None:
        # Without the neighbour's own port its LAN address is useless: the hub's view of the
        # port is the NAT's. wireguard-web omits both for such peers too.
        return PeerOffer(pubkey=neighbour.pubkey, ip=ips)
    return PeerOffer(
        pubkey=neighbour.pubkey, endpoint=str(lan.address), port=lan.listen_port, ip=ips
    )


def offer_fields(neighbour: Registration, lan: ReportedLan) -> dict[str, object]:
    """``_offer(neighbour, lan)`` as its wire JSON object (``exclude_none``), built without
    the dataclass: the answer's hot path encodes these directly."""
    ips = [str(ip) for ip in neighbour.tunnel_ips]
    if lan.listen_port is None:
        return {"pubkey": neighbour.pubkey, "ip": ips}
    return {
        "pubkey": neighbour.pubkey,
        "endpoint": str(lan.address),
        "port": lan.listen_port,
        "ip": ips,
    }


def neighbours(
    requester: Registration,
    index: Mapping[GroupKey, Iterable[str]],
    registrations: Mapping[str, Registration],
    policy: Policy,
    now: float,
) -> list[PeerOffer]:
    """The LAN neighbours of ``requester``, sorted by key so the answer's ETag is stable.

    ``index`` maps each group to the keys registered in it; only the requester's groups
    are visited. Expired registrations and keys the policy refuses are left out.
    """
    return [
        _offer(reg, lan)
        for reg, lan in neighbour_lans(requester, index, registrations, policy, now)
    ]


def neighbour_lans(
    requester: Registration,
    index: Mapping[GroupKey, Iterable[str]],
    registrations: Mapping[str, Registration],
    policy: Policy,
    now: float,
) -> list[tuple[Registration, ReportedLan]]:
    """What ``neighbours`` offers, before it is made offers: each neighbour's registration
    and the LAN entry to offer, sorted by key."""
    if not policy.permits(requester.pubkey) or requester.expires_at <= now:
        return []
    # Per neighbour, the LAN entry to offer: one with a listen port wins, then entry order.
    chosen: dict[str, tuple[Registration, ReportedLan]] = {}
    for lan in requester.lans:
        key = GroupKey(requester.public_ip, lan.gateway, lan.network)
        for pubkey in index.get(key, ()):
            if pubkey == requester.pubkey or not policy.permits(pubkey):
                continue
            other = registrations.get(pubkey)
            if other is None or other.expires_at <= now or other.public_ip != key.public_ip:
                continue
            previous = chosen.get(pubkey)
            if previous is not None and previous[1].listen_port is not None:
                continue
            for other_lan in other.lans:
                if other_lan.same_lan_as(lan):
                    if previous is None or other_lan.listen_port is not None:
                        chosen[pubkey] = (other, other_lan)
                    break
    return [chosen[key] for key in sorted(chosen)]
