"""Where this interface sits in the VPN: its hub peer, tunnel network and server. Pure.

The tunnel network is not read off the interface address alone: hand-written
wg-quick configurations often say ``Address = 10.99.0.2/32``, and a /32 would
make the agent's own address the default server and refuse every neighbour as
"outside the tunnel network". In order:

1. the ``tunnel_network`` option, when the user set one (an explicit setting wins
   over anything inferred);
2. the hub peer's allowed IPs that hold this interface's address (the hub routes
   the whole tunnel, e.g. ``AllowedIPs = 10.99.0.0/24``), default routes excepted;
3. the interface address itself, when its prefix is shorter than a host route.

The default server is ``http://<first host of that network>/peering-request``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

from wg_autopeer.agent.client import default_server_url
from wg_autopeer.netview.model import IPInterface
from wg_autopeer.wireguard.base import DeviceState, IPNetwork, PeerState

FROM_OPTION = "tunnel_network option"
FROM_HUB = "hub peer's allowed IPs"
FROM_ADDRESS = "interface address"


@dataclass(frozen=True)
class Tunnel:
    """This interface's place in the VPN."""

    addresses: tuple[IPInterface, ...]
    networks: tuple[IPNetwork, ...]
    # Where ``networks`` came from (shown by ``status``): one of the FROM_* strings.
    network_source: str
    server_url: str
    hub_key: str


def _is_default(network: IPNetwork) -> bool:
    return network.prefixlen == 0


def _holding(peer: PeerState, addresses: Sequence[IPInterface]) -> list[IPNetwork]:
    """The peer's allowed IPs (default routes excepted) that hold one of ``addresses``."""
    return [
        net
        for net in peer.allowed_ips
        if not _is_default(net)
        and net.prefixlen < net.max_prefixlen
        and any(a.ip.version == net.version and a.ip in net for a in addresses)
    ]


def _router_of(host: str, peers: Sequence[PeerState]) -> PeerState | None:
    """The peer whose allowed IPs route ``host`` (longest prefix wins)."""
    try:
        address = ip_address(host)
    except ValueError:
        return None
    best: tuple[int, PeerState] | None = None
    for peer in peers:
        for net in peer.allowed_ips:
            covers = address.version == net.version and address in net
            if covers and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, peer)
    return best[1] if best else None


def find_hub(
    device: DeviceState,
    addresses: Sequence[IPInterface],
    own_peers: Collection[str],
    server: str | None,
) -> PeerState | None:
    """The hub peer: one the agent did not add that routes the server's address, or,
    with no server configured, the one routing this interface's tunnel network."""
    foreign = [p for p in device.peers if p.public_key not in own_peers]
    if server is not None:
        host = urlsplit(server).hostname or ""
        hub = _router_of(host, foreign)
        if hub is None and len(foreign) == 1:
            try:
                ip_address(host)
            except ValueError:
                # A server named by DNS: the sole foreign peer is all we can go by.
                return foreign[0]
        return hub
    holders = [
        (min(n.prefixlen for n in nets), p) for p in foreign if (nets := _holding(p, addresses))
    ]
    if holders:
        # The widest route to our own address is the hub's; a hand-made peer
        # beside it carries narrower routes.
        return min(holders, key=lambda item: item[0])[1]
    if len(foreign) == 1:
        return foreign[0]
    for address in addresses:
        if address.network.prefixlen < address.max_prefixlen:
            hub = _router_of(str(next(iter(address.network.hosts()))), foreign)
            if hub is not None:
                return hub
    return None


def find_tunnel(
    device: DeviceState,
    addresses: Sequence[IPInterface],
    own_peers: Collection[str],
    *,
    server: str | None,
    tunnel_network: IPNetwork | None,
) -> Tunnel | str:
    """This interface's ``Tunnel``, or why there is none (a line for ``status``)."""
    if not addresses:
        return "the interface has no tunnel address"
    hub = find_hub(device, addresses, own_peers, server)
    if hub is None:
        return "no hub peer found (no peer routes the server's or the tunnel's address)"
    networks: tuple[IPNetwork, ...]
    if tunnel_network is not None:
        networks, source = (tunnel_network,), FROM_OPTION
    elif held := _holding(hub, addresses):
        networks, source = tuple(dict.fromkeys(held)), FROM_HUB
    else:
        networks = tuple(
            dict.fromkeys(a.network for a in addresses if a.network.prefixlen < a.max_prefixlen)
        )
        source = FROM_ADDRESS
    if not networks:
        return (
            "cannot tell the tunnel network: the address is a host route and the hub"
            " peer routes no network holding it; set tunnel_network"
        )
    url = server or default_server_url(networks[0])
    return Tunnel(tuple(addresses), networks, source, url, hub.public_key)
