"""The network-view interface, and the pure comparison every backend shares.

A backend only has to read a full ``NetSnapshot``; deciding whether something
changed that matters to LAN peering is ``diff_snapshots``, a pure function of
two snapshots, so every platform agrees on what counts as a change.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from wg_autopeer.netview.model import (
    DefaultRoute,
    IPInterface,
    LanUplink,
    Link,
    NetChange,
    NetSnapshot,
)

# Link-local and host addresses never identify a LAN (every interface has an fe80::/64),
# so they would only wake the agent for nothing.
_LAN_SCOPES = frozenset({"global", "site"})


class NetView(abc.ABC):
    """Where the agent learns which LANs this host sits on, and when that changes."""

    @abc.abstractmethod
    async def snapshot(self) -> NetSnapshot:
        """Read links, addresses and default routes now.

        Raises ``NetViewError`` when the platform cannot be read.
        """

    @abc.abstractmethod
    def changes(self) -> AsyncIterator[NetChange]:
        """Yield a ``NetChange`` each time the relevant network state differs.

        The first snapshot read when iteration starts is the baseline; nothing is
        yielded for it. Each item carries the new full snapshot in ``after`` and
        non-empty ``reasons``. Iteration ends only by the caller closing it (or
        ``close()``); read failures raise ``NetViewError``.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release sockets and stop background work. Safe to call twice."""


def _is_lan_link(link: Link | None) -> bool:
    return link is not None and not link.is_loopback and not link.is_wireguard


def _fmt_route(route: DefaultRoute) -> str:
    via = f"via {route.gateway} " if route.gateway is not None else ""
    metric = f" metric {route.metric}" if route.metric else ""
    return f"default route {via}on {route.ifname}{metric}"


def _fmt_uplink(uplink: LanUplink) -> str:
    return f"{uplink.ifname} {uplink.address} via {uplink.gateway}"


def _lan_links(snap: NetSnapshot) -> dict[int, Link]:
    return {link.index: link for link in snap.links if _is_lan_link(link)}


def _lan_addresses(snap: NetSnapshot) -> set[tuple[str, IPInterface]]:
    """Addresses that may describe a LAN, with the link's current name."""
    out: set[tuple[str, IPInterface]] = set()
    for addr in snap.addresses:
        link = snap.link(addr.ifindex)
        # An address whose link is missing raced a link removal; the next read settles it.
        if link is None or not _is_lan_link(link) or addr.scope not in _LAN_SCOPES:
            continue
        # A privacy address rotating is no news: it is never reported.
        if addr.fleeting:
            continue
        out.add((link.name, addr.interface))
    return out


def _routes(snap: NetSnapshot) -> set[DefaultRoute]:
    # Compared without the ifindex: a link re-created under the same name is reported as a
    # link change, and the route on it reads the same to a human.
    out: set[DefaultRoute] = set()
    for route in snap.default_routes:
        link = snap.link(route.ifindex)
        if link is not None and link.is_loopback:
            continue
        out.add(DefaultRoute(0, route.ifname, route.gateway, route.metric))
    return out


def diff_snapshots(before: NetSnapshot, after: NetSnapshot) -> tuple[str, ...]:
    """Readable reasons why ``after`` differs from ``before`` for LAN peering.

    Empty means nothing that matters changed. What matters: up/down, appearance and
    renaming of non-loopback, non-WireGuard links; global addresses on those links;
    default routes (any link but loopback); the set of WireGuard links; and, as a
    summary, the LAN uplinks themselves.
    """
    reasons: list[str] = []

    old_links, new_links = _lan_links(before), _lan_links(after)
    for index in sorted(old_links.keys() | new_links.keys()):
        old, new = old_links.get(index), new_links.get(index)
        if old is not None and new is not None:
            if old.name != new.name:
                reasons.append(f"link {old.name} renamed to {new.name}")
            if old.up != new.up:
                reasons.append(f"link {new.name} {'up' if new.up else 'down'}")
        elif new is not None:
            # A link that appears down carries no LAN yet; its coming up will be reported.
            if new.up:
                reasons.append(f"link {new.name} added")
        elif old is not None and old.up:
            reasons.append(f"link {old.name} removed")

    old_keys, new_keys = _lan_addresses(before), _lan_addresses(after)
    for name, iface in sorted(old_keys - new_keys, key=_addr_sort_key):
        reasons.append(f"address removed on {name}: {iface}")
    for name, iface in sorted(new_keys - old_keys, key=_addr_sort_key):
        reasons.append(f"address added on {name}: {iface}")

    old_routes, new_routes = _routes(before), _routes(after)
    for route in sorted(old_routes - new_routes, key=_route_sort_key):
        reasons.append(f"{_fmt_route(route)} removed")
    for route in sorted(new_routes - old_routes, key=_route_sort_key):
        reasons.append(f"{_fmt_route(route)} added")

    old_wg = {link.name for link in before.wireguard_links()}
    new_wg = {link.name for link in after.wireguard_links()}
    for name in sorted(old_wg - new_wg):
        reasons.append(f"WireGuard link {name} disappeared")
    for name in sorted(new_wg - old_wg):
        reasons.append(f"WireGuard link {name} appeared")

    old_up, new_up = set(before.lan_uplinks()), set(after.lan_uplinks())
    for uplink in sorted(old_up - new_up, key=_fmt_uplink):
        reasons.append(f"LAN uplink lost: {_fmt_uplink(uplink)}")
    for uplink in sorted(new_up - old_up, key=_fmt_uplink):
        reasons.append(f"LAN uplink gained: {_fmt_uplink(uplink)}")
    return tuple(reasons)


def _addr_sort_key(item: tuple[str, object]) -> tuple[str, str]:
    return item[0], str(item[1])


def _route_sort_key(route: DefaultRoute) -> tuple[str, str, int]:
    return route.ifname, str(route.gateway), route.metric


def make_change(before: NetSnapshot | None, after: NetSnapshot) -> NetChange | None:
    """The ``NetChange`` from ``before`` to ``after``, or None when nothing relevant differs."""
    if before is None:
        return None
    reasons = diff_snapshots(before, after)
    return NetChange(before, after, reasons) if reasons else None
