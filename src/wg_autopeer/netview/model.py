"""What the network looks like at one moment, and what changed between two moments.

OS events are only wake-ups: a backend re-reads the full state into a
``NetSnapshot`` and publishes a ``NetChange`` when the part that matters to
LAN peering differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface

from wg_autopeer.wireguard.base import IPAddress

IPInterface = IPv4Interface | IPv6Interface


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


@dataclass(frozen=True, order=True)
class Address:
    ifindex: int
    ifname: str
    interface: IPInterface
    # "global", "site", "link" or "host", as the kernel scopes it.
    scope: str = "global"


@dataclass(frozen=True, order=True)
class DefaultRoute:
    ifindex: int
    ifname: str
    gateway: IPAddress | None
    metric: int = 0


@dataclass(frozen=True, order=True)
class LanUplink:
    """An address on a default-route interface, with that route's gateway: one LAN to report."""

    ifname: str
    address: IPInterface
    gateway: IPAddress


@dataclass(frozen=True)
class NetSnapshot:
    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    default_routes: tuple[DefaultRoute, ...] = ()

    def link(self, ifindex: int) -> Link | None:
        for link in self.links:
            if link.index == ifindex:
                return link
        return None

    def lan_uplinks(self) -> tuple[LanUplink, ...]:
        """The LANs this host sits on: every global address of an up, non-WireGuard,
        non-loopback interface carrying a default route with a gateway of its family."""
        uplinks: set[LanUplink] = set()
        for route in self.default_routes:
            link = self.link(route.ifindex)
            if route.gateway is None or link is None or not link.up:
                continue
            if link.is_wireguard or link.is_loopback:
                continue
            for addr in self.addresses:
                if addr.ifindex != route.ifindex or addr.scope != "global":
                    continue
                if addr.interface.version != route.gateway.version:
                    continue
                uplinks.add(LanUplink(link.name, addr.interface, route.gateway))
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
