"""Finding the hub, the tunnel network and the default server: pure, no device needed."""

from __future__ import annotations

from ipaddress import ip_address, ip_interface, ip_network

from agent_keys import key

from wg_autopeer.agent.tunnel import FROM_ADDRESS, FROM_HUB, FROM_OPTION, Tunnel, find_tunnel
from wg_autopeer.netview.model import IPInterface
from wg_autopeer.wireguard.base import DeviceState, Endpoint, IPNetwork, PeerState

OWN, HUB, HAND, BOB = key(1), key(2), key(3), key(4)
HUB_ENDPOINT = Endpoint(ip_address("203.0.113.1"), 51820)


def addr(text: str) -> IPInterface:
    interface = ip_interface(text)
    assert not isinstance(interface, str)
    return interface


def device(*peers: PeerState) -> DeviceState:
    return DeviceState("wg0", OWN, 51820, peers)


def hub(*allowed: str) -> PeerState:
    return PeerState(HUB, tuple(ip_network(a) for a in allowed), HUB_ENDPOINT)


HAND_PEER = PeerState(HAND, (ip_network("10.99.0.200/32"),))


def found(
    dev: DeviceState,
    address: str,
    *,
    server: str | None = None,
    option: IPNetwork | None = None,
    own: tuple[str, ...] = (),
) -> Tunnel:
    result = find_tunnel(dev, (addr(address),), own, server=server, tunnel_network=option)
    assert isinstance(result, Tunnel), result
    return result


def test_slash_32_address_takes_the_network_from_the_hub_peer() -> None:
    tunnel = found(device(hub("10.99.0.0/24"), HAND_PEER), "10.99.0.2/32")
    assert tunnel.hub_key == HUB
    assert tunnel.networks == (ip_network("10.99.0.0/24"),)
    assert tunnel.network_source == FROM_HUB
    assert tunnel.server_url == "http://10.99.0.1/peering-request"


def test_full_tunnel_hub_falls_back_to_the_interface_prefix() -> None:
    tunnel = found(device(hub("0.0.0.0/0"), HAND_PEER), "10.99.0.2/24")
    assert tunnel.hub_key == HUB
    assert tunnel.networks == (ip_network("10.99.0.0/24"),)
    assert tunnel.network_source == FROM_ADDRESS


def test_slash_32_behind_a_full_tunnel_needs_the_option() -> None:
    result = find_tunnel(
        device(hub("0.0.0.0/0")), (addr("10.99.0.2/32"),), (), server=None, tunnel_network=None
    )
    assert isinstance(result, str)
    assert "tunnel_network" in result
    tunnel = found(device(hub("0.0.0.0/0")), "10.99.0.2/32", option=ip_network("10.99.0.0/24"))
    assert tunnel.network_source == FROM_OPTION
    assert tunnel.server_url == "http://10.99.0.1/peering-request"


def test_configured_server_picks_the_hub_that_routes_it() -> None:
    tunnel = found(
        device(HAND_PEER, hub("10.99.0.0/24")),
        "10.99.0.2/32",
        server="http://10.99.0.1:8080/peering-request",
    )
    assert tunnel.hub_key == HUB
    assert tunnel.server_url == "http://10.99.0.1:8080/peering-request"


def test_peers_the_agent_added_are_never_the_hub() -> None:
    ours = PeerState(BOB, (ip_network("10.99.0.3/32"),))
    tunnel = found(device(ours, hub("10.99.0.0/24")), "10.99.0.2/24", own=(BOB,))
    assert tunnel.hub_key == HUB


def test_no_address_and_no_hub_are_reasons() -> None:
    assert isinstance(
        find_tunnel(device(hub("10.99.0.0/24")), (), (), server=None, tunnel_network=None), str
    )
    lonely = find_tunnel(device(), (addr("10.99.0.2/24"),), (), server=None, tunnel_network=None)
    assert isinstance(lonely, str)
    assert "no hub peer" in lonely
