"""What the network looks like at one moment, and what changed between two moments.

OS events are only wake-ups: a backend re-reads the full state into a
``NetSnapshot`` and publishes a ``NetChange`` when the part that matters to
LAN peering differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface

from wg_autopeer.wireguard.base import IPAddress

IPInterface = IPv4Interface | IPv6Interface

# Link-layer types (linux/if_arp.h). A LAN a neighbour can share is Ethernet-like
# (wired, Wi-Fi, bridges, VLANs, bonds); tun, ppp, WireGuard and IPsec links are
# ARPHRD_NONE, PPP or a tunnel type.
ARPHRD_ETHER = 1
# Link kinds that carry a default route but are never a LAN: VPN and tunnel devices.
TUNNEL_KINDS = frozenset(
    {"tun", "wireguard", "ipip", "gre", "gretap", "sit", "vti", "vti6", "ip6tnl", "xfrm",
     "ipsec", "vxlan", "geneve"}
)  # fmt: skip
# Container and VM bridges (and what hangs off them): never the LAN the host is on.
CONTAINER_LINK_PREFIXES = ("docker", "br-", "cni", "podman", "virbr", "lxcbr", "flannel")
# Carrier-grade NAT space (RFC 6598): the ISP's side of a NAT, or another VPN's
# addresses (Tailscale), never a LAN of one's own.
CGNAT = IPv4Network("100.64.0.0/10")


@dataclass(frozen=True, order=True)
class Link:
    """A network interface. ``up`` means administratively up and operationally up (or
    UNKNOWN, which carrier-less drivers like tun report while working)."""

    index: int
    name: str
    up: bool
    kind: str | None = None
    is_wireguard: bool = False
    is_loopback: bool = False
    link_type: int = ARPHRD_ETHER

    @property
    def lan_capable(self) -> bool:
        """Could this link be a LAN that neighbours share (see ``lan_uplinks``)?"""
        return (
            self.link_type == ARPHRD_ETHER
            and not self.is_wireguard
            and not self.is_loopback
            and (self.kind or "") not in TUNNEL_KINDS
            and not self.name.startswith(CONTAINER_LINK_PREFIXES)
        )


@dataclass(frozen=True, order=True)
class Address:
    ifindex: int
    ifname: str
    interface: IPInterface
    # "global", "site", "link" or "host", as the kernel scopes it.
    scope: str = "global"
    # An IPv6 privacy (temporary) address, a deprecated or a tentative one: it rotates
    # or goes away, so it is never reported (a report per rotation would make the
    # server re-read the hub and neighbours re-add us at every change).
    fleeting: bool = False


@dataclass(frozen=True, order=True)
class DefaultRoute:
    ifindex: int
    ifname: str
    gateway: IPAddress | None
    metric: int = 0


@dataclass(frozen=True, order=True)
class Neighbour:
    """A neighbour-table entry with a link-layer address (only gateways are read)."""

    ifindex: int
    address: IPAddress
    lladdr: str


@dataclass(frozen=True, order=True)
class LanUplink:
    """An address on a default-route interface, with that route's gateway: one LAN to report.

    ``gateway_mac`` fingerprints the LAN (two homes with the same router defaults
    behind one carrier-grade NAT have different routers); None while unknown."""

    ifname: str
    address: IPInterface
    gateway: IPAddress
    gateway_mac: str | None = None


@dataclass(frozen=True)
class NetSnapshot:
    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    default_routes: tuple[DefaultRoute, ...] = ()
    # The gateways' entries in the neighbour table.
    neighbours: tuple[Neighbour, ...] = ()

    def link(self, ifindex: int) -> Link | None:
        for link in self.links:
            if link.index == ifindex:
                return link
        return None

    def lan_uplinks(self) -> tuple[LanUplink, ...]:
        """The LANs this host sits on: per address family, the preferred default route
        (lowest metric) that has a gateway and leaves through an up, LAN-capable link
        (not a tunnel or VPN, not a container bridge), with each global address of
        that link of the family that is not carrier-grade NAT space."""
        best: dict[int, int] = {}
        candidates: list[tuple[DefaultRoute, Link, list[IPInterface]]] = []
        for route in self.default_routes:
            link = self.link(route.ifindex)
            if route.gateway is None or link is None or not link.up or not link.lan_capable:
                continue
            family = route.gateway.version
            addresses = [
                a.interface
                for a in self.addresses
                if a.ifindex == route.ifindex
                and a.scope == "global"
                and not a.fleeting
                and a.interface.version == family
                and a.interface.ip not in CGNAT
            ]
            if not addresses:
                continue
            candidates.append((route, link, addresses))
            best[family] = min(best.get(family, route.metric), route.metric)
        macs = {(n.ifindex, n.address): n.lladdr for n in self.neighbours}
        uplinks = {
            LanUplink(link.name, address, route.gateway, macs.get((route.ifindex, route.gateway)))
            for route, link, addresses in candidates
            if route.gateway is not None and route.metric == best[route.gateway.version]
            for address in addresses
        }
        return tuple(sorted(uplinks, key=lambda u: (u.ifname, u.address.version, str(u.address))))

    def wireguard_links(self) -> tuple[Link, ...]:
        return tuple(link for link in self.links if link.is_wireguard)


@dataclass(frozen=True)
class NetChange:
    """A relevant difference between two snapshots."""

    before: NetSnapshot | None
    after: NetSnapshot
    # Human-readable reasons, e.g. "address added on eth0: 192.168.50.10/24".
    reasons: tuple[str, ...] = ()
