"""diff_snapshots and lan_uplinks: pure, no root needed."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_interface

from wg_autopeer.netview import (
    Address,
    DefaultRoute,
    LanUplink,
    Link,
    NetSnapshot,
    diff_snapshots,
    make_change,
)

LO = Link(1, "lo", up=True, is_loopback=True)
ETH = Link(2, "eth0", up=True, kind="veth")
WG = Link(3, "wg0", up=True, kind="tun", is_wireguard=True)


def addr(ifindex: int, ifname: str, text: str, scope: str = "global") -> Address:
    return Address(ifindex, ifname, ip_interface(text), scope)


def route(ifindex: int, ifname: str, gateway: str | None, metric: int = 0) -> DefaultRoute:
    return DefaultRoute(ifindex, ifname, ip_address(gateway) if gateway else None, metric)


BASE = NetSnapshot(
    links=(LO, ETH, WG),
    addresses=(
        addr(1, "lo", "127.0.0.1/8", "host"),
        addr(2, "eth0", "192.168.50.10/24"),
        addr(2, "eth0", "fe80::1/64", "link"),
        addr(3, "wg0", "10.8.0.2/24"),
    ),
    default_routes=(route(2, "eth0", "192.168.50.1"),),
)


def test_identical_snapshots_have_no_reasons() -> None:
    assert diff_snapshots(BASE, BASE) == ()
    assert make_change(BASE, BASE) is None


def test_first_snapshot_is_a_baseline_not_a_change() -> None:
    assert make_change(None, BASE) is None


def test_address_change_names_both_addresses_and_the_uplink() -> None:
    after = replace(
        BASE,
        addresses=(*BASE.addresses[:1], addr(2, "eth0", "192.168.50.11/24"), *BASE.addresses[2:]),
    )
    reasons = diff_snapshots(BASE, after)
    assert "address removed on eth0: 192.168.50.10/24" in reasons
    assert "address added on eth0: 192.168.50.11/24" in reasons
    assert "LAN uplink lost: eth0 192.168.50.10/24 via 192.168.50.1" in reasons
    assert "LAN uplink gained: eth0 192.168.50.11/24 via 192.168.50.1" in reasons


def test_gateway_change_is_a_route_removal_and_addition() -> None:
    after = replace(BASE, default_routes=(route(2, "eth0", "192.168.50.254"),))
    reasons = diff_snapshots(BASE, after)
    assert reasons[:2] == (
        "default route via 192.168.50.1 on eth0 removed",
        "default route via 192.168.50.254 on eth0 added",
    )


def test_metric_appears_in_the_reason_when_set() -> None:
    after = replace(BASE, default_routes=(route(2, "eth0", "192.168.50.1", 100),))
    assert "default route via 192.168.50.1 on eth0 metric 100 added" in diff_snapshots(BASE, after)


def test_link_down_is_reported_and_loses_the_uplink() -> None:
    after = replace(BASE, links=(LO, replace(ETH, up=False), WG))
    reasons = diff_snapshots(BASE, after)
    assert reasons[0] == "link eth0 down"
    assert after.lan_uplinks() == ()
    assert "LAN uplink lost: eth0 192.168.50.10/24 via 192.168.50.1" in reasons


def test_loopback_address_is_irrelevant() -> None:
    after = replace(BASE, addresses=(*BASE.addresses, addr(1, "lo", "127.0.0.2/8", "host")))
    assert diff_snapshots(BASE, after) == ()
    after = replace(BASE, addresses=(*BASE.addresses, addr(1, "lo", "192.0.2.7/32")))
    assert diff_snapshots(BASE, after) == ()


def test_address_on_wireguard_link_is_irrelevant() -> None:
    after = replace(BASE, addresses=(*BASE.addresses, addr(3, "wg0", "10.8.0.3/24")))
    assert diff_snapshots(BASE, after) == ()


def test_wireguard_link_up_down_is_irrelevant_but_its_appearance_matters() -> None:
    assert diff_snapshots(BASE, replace(BASE, links=(LO, ETH, replace(WG, up=False)))) == ()
    without = replace(BASE, links=(LO, ETH))
    assert diff_snapshots(BASE, without) == ("WireGuard link wg0 disappeared",)
    assert diff_snapshots(without, BASE) == ("WireGuard link wg0 appeared",)


def test_tun_link_becoming_wireguard_counts_as_appearance() -> None:
    # wireguard-go's tun link exists a moment before its UAPI socket does.
    plain = NetSnapshot(links=(LO, ETH, replace(WG, is_wireguard=False, up=False)))
    assert diff_snapshots(plain, NetSnapshot(links=(LO, ETH, replace(WG, up=False)))) == (
        "WireGuard link wg0 appeared",
    )


def test_link_local_address_churn_is_irrelevant() -> None:
    after = replace(BASE, addresses=(*BASE.addresses, addr(2, "eth0", "fe80::2/64", "link")))
    assert diff_snapshots(BASE, after) == ()


def test_new_link_matters_only_once_it_is_up() -> None:
    down = Link(9, "veth9", up=False, kind="veth")
    with_down = replace(BASE, links=(*BASE.links, down))
    assert diff_snapshots(BASE, with_down) == ()
    with_up = replace(BASE, links=(*BASE.links, replace(down, up=True)))
    assert diff_snapshots(with_down, with_up) == ("link veth9 up",)
    assert diff_snapshots(BASE, replace(BASE, links=(*BASE.links, replace(down, up=True)))) == (
        "link veth9 added",
    )


def test_renamed_link_is_reported_with_both_names() -> None:
    after = NetSnapshot(
        links=(LO, replace(ETH, name="lan0"), WG),
        addresses=tuple(replace(a, ifname="lan0") if a.ifindex == 2 else a for a in BASE.addresses),
        default_routes=(route(2, "lan0", "192.168.50.1"),),
    )
    reasons = diff_snapshots(BASE, after)
    assert reasons[0] == "link eth0 renamed to lan0"
    assert "address added on lan0: 192.168.50.10/24" in reasons


def test_default_route_through_wireguard_matters() -> None:
    after = replace(BASE, default_routes=(*BASE.default_routes, route(3, "wg0", None, 50)))
    assert diff_snapshots(BASE, after) == ("default route on wg0 metric 50 added",)


def test_lan_uplinks_pair_each_family_with_its_gateway() -> None:
    snap = replace(
        BASE,
        addresses=(*BASE.addresses, addr(2, "eth0", "2001:db8::10/64")),
        default_routes=(*BASE.default_routes, route(2, "eth0", "fe80::1", 1024)),
    )
    assert snap.lan_uplinks() == (
        LanUplink("eth0", ip_interface("192.168.50.10/24"), ip_address("192.168.50.1")),
        LanUplink("eth0", ip_interface("2001:db8::10/64"), ip_address("fe80::1")),
    )


def test_lan_uplinks_skip_wireguard_loopback_down_and_gatewayless_routes() -> None:
    snap = NetSnapshot(
        links=(LO, replace(ETH, up=False), WG, Link(4, "eth1", up=True)),
        addresses=(
            addr(1, "lo", "192.0.2.1/32"),
            addr(2, "eth0", "192.168.50.10/24"),
            addr(3, "wg0", "10.8.0.2/24"),
            addr(4, "eth1", "198.51.100.7/24"),
        ),
        default_routes=(
            route(1, "lo", "192.0.2.254"),
            route(2, "eth0", "192.168.50.1"),
            route(3, "wg0", "10.8.0.1"),
            route(4, "eth1", None),
        ),
    )
    assert snap.lan_uplinks() == ()


def _uplink_names(snap: NetSnapshot) -> list[str]:
    return [u.ifname for u in snap.lan_uplinks()]


def test_vpn_tunnels_are_never_a_lan() -> None:
    # A tun (OpenVPN), a ppp link and an IPsec/xfrm device, each with a default
    # route and a gateway, beside the real LAN with a worse metric.
    snap = NetSnapshot(
        links=(
            ETH,
            Link(5, "tun0", up=True, kind="tun", link_type=0xFFFE),
            Link(6, "ppp0", up=True, link_type=512),
            Link(7, "ipsec0", up=True, kind="xfrm", link_type=0xFFFE),
        ),
        addresses=(
            addr(2, "eth0", "192.168.50.10/24"),
            addr(5, "tun0", "10.200.0.2/24"),
            addr(6, "ppp0", "10.201.0.2/24"),
            addr(7, "ipsec0", "10.202.0.2/24"),
        ),
        default_routes=(
            route(2, "eth0", "192.168.50.1", 600),
            route(5, "tun0", "10.200.0.1", 50),
            route(6, "ppp0", "10.201.0.1", 50),
            route(7, "ipsec0", "10.202.0.1", 50),
        ),
    )
    assert _uplink_names(snap) == ["eth0"]


def test_container_bridges_and_cgnat_space_are_never_a_lan() -> None:
    snap = NetSnapshot(
        links=(
            ETH,
            Link(8, "docker0", up=True, kind="bridge"),
            Link(9, "br-3f2a1c", up=True, kind="bridge"),
            Link(10, "wwan0", up=True),
        ),
        addresses=(
            addr(2, "eth0", "192.168.50.10/24"),
            addr(8, "docker0", "172.17.0.1/16"),
            addr(9, "br-3f2a1c", "172.18.0.1/16"),
            addr(10, "wwan0", "100.72.14.9/10"),
        ),
        default_routes=(
            route(2, "eth0", "192.168.50.1", 100),
            route(8, "docker0", "172.17.0.254", 10),
            route(9, "br-3f2a1c", "172.18.0.254", 10),
            route(10, "wwan0", "100.64.0.1", 10),
        ),
    )
    assert _uplink_names(snap) == ["eth0"]


def test_of_two_uplinks_the_preferred_default_route_wins_per_family() -> None:
    wifi = Link(11, "wlan0", up=True)
    snap = NetSnapshot(
        links=(ETH, wifi),
        addresses=(
            addr(2, "eth0", "192.168.50.10/24"),
            addr(11, "wlan0", "192.168.60.10/24"),
            addr(11, "wlan0", "2001:db8:60::10/64"),
        ),
        default_routes=(
            route(2, "eth0", "192.168.50.1", 100),
            route(11, "wlan0", "192.168.60.1", 600),
            route(11, "wlan0", "fe80::1", 600),
        ),
    )
    # IPv4: the wired route (metric 100) is preferred; IPv6 only leaves by Wi-Fi.
    assert [(u.ifname, str(u.address)) for u in snap.lan_uplinks()] == [
        ("eth0", "192.168.50.10/24"),
        ("wlan0", "2001:db8:60::10/64"),
    ]


def test_rotating_ipv6_privacy_addresses_are_never_reported() -> None:
    stable = addr(2, "eth0", "2001:db8:50::10/64")
    temporary = replace(addr(2, "eth0", "2001:db8:50::7a3f/64"), fleeting=True)
    snap = replace(
        BASE,
        addresses=(*BASE.addresses, stable, temporary),
        default_routes=(*BASE.default_routes, route(2, "eth0", "fe80::1", 1024)),
    )
    reported = [str(u.address) for u in snap.lan_uplinks() if u.address.version == 6]
    assert reported == ["2001:db8:50::10/64"]
    # A rotation (a new temporary address, the old one deprecated) changes no report.
    rotated = replace(
        snap,
        addresses=(
            *BASE.addresses,
            stable,
            temporary,
            replace(addr(2, "eth0", "2001:db8:50::91c2/64"), fleeting=True),
        ),
    )
    assert rotated.lan_uplinks() == snap.lan_uplinks()


def test_a_privacy_address_rotating_wakes_nobody() -> None:
    stable = addr(2, "eth0", "2001:db8:50::10/64")
    before = replace(BASE, addresses=(*BASE.addresses, stable))
    rotated = replace(
        before,
        addresses=(
            *before.addresses,
            replace(addr(2, "eth0", "2001:db8:50::91c2/64"), fleeting=True),
        ),
    )
    assert diff_snapshots(before, rotated) == ()
