"""The pure topology and the lab's pure helpers: no root, no network."""

from __future__ import annotations

import dataclasses
import os
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface
from pathlib import Path

import pytest

from wg_autopeer.errors import LabError
from wg_autopeer.lab import ClientSpec, LanSpec, Topology, default_topology
from wg_autopeer.lab.netns import ProcessRecord, process_alive, process_start_time
from wg_autopeer.lab.state import LabState, read_state, state_path
from wg_autopeer.lab.wgtools import parse_wg_dump
from wg_autopeer.wireguard.base import Endpoint

KEY_A = "n8rU/Hz18z42huEV01LS1/Xc4TLgRfE8pdB87qVZ+xw="
KEY_B = "IZuzfmEPvsPD/gYIC2HrDx0fxW4DRcFGDrMfomIMJWQ="


def test_default_topology_names_every_namespace_and_interface_after_the_prefix() -> None:
    topo = default_topology("wap")
    assert topo.namespaces() == (
        "wap-sw",
        "wap-hub",
        "wap-r1",
        "wap-r2",
        "wap-alice",
        "wap-bob",
        "wap-carol",
    )
    assert topo.wg_interface("alice") == "wap-alice"
    assert topo.wg_hosts() == ("hub", "alice", "bob", "carol")
    assert topo.client("bob").address == IPv4Interface("192.168.50.11/24")
    assert topo.client("carol").tunnel == IPv4Interface("10.99.0.4/24")
    assert topo.lan("lan2").gateway.ip == IPv4Address("192.168.60.1")
    assert topo.hub.rate_mbit == 20.0


def test_wireguard_interface_longer_than_15_characters_is_refused() -> None:
    topo = default_topology("wl").with_client(
        ClientSpec(
            "verylongnames",
            "lan1",
            IPv4Interface("192.168.50.20/24"),
            IPv4Interface("10.99.0.9/24"),
        )
    )
    with pytest.raises(LabError, match=r"wl-verylongnames.*15"):
        topo.validate()


def test_prefix_with_hyphen_is_refused_so_cleanup_never_matches_another_lab() -> None:
    with pytest.raises(LabError, match="prefix"):
        default_topology("wap-x")


@pytest.mark.parametrize("prefix", ["", "Wap", "1ab", "abcdefghi", "a_b"])
def test_malformed_prefix_is_refused(prefix: str) -> None:
    assert any("prefix" in p for p in Topology(prefix=prefix).problems())


def test_duplicate_lan_address_is_refused() -> None:
    topo = default_topology("wl")
    bob = dataclasses.replace(topo.client("bob"), address=IPv4Interface("192.168.50.10/24"))
    with pytest.raises(LabError, match=r"192\.168\.50\.10 is already alice's"):
        topo.with_client_replaced(bob).validate()


def test_client_on_the_gateway_address_is_refused() -> None:
    topo = default_topology("wl")
    bob = dataclasses.replace(topo.client("bob"), address=IPv4Interface("192.168.50.1/24"))
    assert any("already r1's" in p for p in topo.with_client_replaced(bob).problems())


def test_duplicate_tunnel_address_is_refused() -> None:
    topo = default_topology("wl")
    carol = dataclasses.replace(topo.client("carol"), tunnel=IPv4Interface("10.99.0.2/24"))
    with pytest.raises(LabError, match=r"10\.99\.0\.2 is already alice's"):
        topo.with_client_replaced(carol).validate()


def test_duplicate_wan_address_is_refused() -> None:
    topo = default_topology("wl")
    lan3 = LanSpec("lan3", "r3", IPv4Interface("203.0.113.10/24"), IPv4Interface("192.168.70.1/24"))
    with pytest.raises(LabError, match=r"203\.0\.113\.10 is already r1's"):
        topo.with_lan(lan3).validate()


def test_duplicate_host_and_lan_names_are_refused() -> None:
    topo = default_topology("wl")
    twin = ClientSpec(
        "bob", "lan2", IPv4Interface("192.168.60.11/24"), IPv4Interface("10.99.0.8/24")
    )
    assert any("'bob' is used twice" in p for p in topo.with_client(twin).problems())
    lan = LanSpec("lan1", "r9", IPv4Interface("203.0.113.90/24"), IPv4Interface("10.1.0.1/24"))
    assert any("'lan1' is used twice" in p for p in topo.with_lan(lan).problems())
    switch = ClientSpec(
        "sw", "lan2", IPv4Interface("192.168.60.12/24"), IPv4Interface("10.99.0.7/24")
    )
    assert any(
        "'sw' is used twice (or is reserved)" in p for p in topo.with_client(switch).problems()
    )


def test_addresses_outside_their_network_and_unknown_lan_are_refused() -> None:
    topo = default_topology("wl")
    stray = ClientSpec(
        "dave", "lan9", IPv4Interface("192.168.50.30/24"), IPv4Interface("10.98.0.5/24")
    )
    problems = topo.with_client(stray).problems()
    assert any("unknown LAN 'lan9'" in p for p in problems)
    assert any("tunnel address 10.98.0.5/24 is not in 10.99.0.0/24" in p for p in problems)
    lan = LanSpec("lan3", "r3", IPv4Interface("198.51.100.3/24"), IPv4Interface("192.168.70.1/24"))
    assert any("is not in 203.0.113.0/24" in p for p in topo.with_lan(lan).problems())


def test_two_nat_lans_may_share_one_private_network() -> None:
    # Different homes often both use 192.168.1.0/24; only the public IP tells them apart.
    topo = default_topology("wl")
    lan3 = LanSpec("lan3", "r3", IPv4Interface("203.0.113.30/24"), IPv4Interface("192.168.50.1/24"))
    dave = ClientSpec(
        "dave", "lan3", IPv4Interface("192.168.50.10/24"), IPv4Interface("10.99.0.5/24")
    )
    topo.with_lan(lan3).with_client(dave).validate()


def test_second_hub_gets_a_namespace_and_clients_of_its_own() -> None:
    topo = default_topology("wl")
    hubb = dataclasses.replace(
        topo.hub, name="hubb", wan=IPv4Interface("203.0.113.2/24"), listen_port=51821
    )
    bob = dataclasses.replace(topo.client("bob"), hub="hubb")
    # Both hubs sit on one WAN bridge: the IPv6 address must differ as well.
    assert topo.with_hub(hubb).with_client_replaced(bob).problems() == [
        "hubb: WAN address 2001:db8::1/64 is already hub's"
    ]
    hubb = dataclasses.replace(hubb, wan6=IPv6Interface("2001:db8::2/64"))
    two = topo.with_hub(hubb).with_client_replaced(bob)
    two.validate()
    assert "wl-hubb" in two.namespaces()
    assert two.wg_hosts()[:2] == ("hub", "hubb")
    assert two.hub_of("bob") == hubb
    assert two.hub_of("alice") == topo.hub
    assert [c.name for c in two.hub_clients("hubb")] == ["bob"]
    assert [c.name for c in two.hub_clients("hub")] == ["alice", "carol"]


def test_second_hub_on_a_taken_address_or_another_tunnel_plan_is_refused() -> None:
    topo = default_topology("wl")
    clash = dataclasses.replace(
        topo.hub, name="hubb", wan=IPv4Interface("203.0.113.10/24"),
        tunnel=IPv4Interface("10.98.0.1/24"),
    )  # fmt: skip
    problems = topo.with_hub(clash).problems()
    assert any("hubb: WAN address 203.0.113.10 is already r1's" in p for p in problems)
    assert any("2001:db8::1/64 is already hub's" in p for p in problems)
    assert any("is not the first hub's 10.99.0.1/24" in p for p in problems)
    stray = dataclasses.replace(topo.client("bob"), hub="nohub")
    assert any("unknown hub 'nohub'" in p for p in topo.with_client_replaced(stray).problems())


def test_non_positive_rate_is_refused_and_none_means_unlimited() -> None:
    assert default_topology("wl", rate_mbit=None).problems() == []
    topo = default_topology("wl")
    stalled = dataclasses.replace(topo, hub=dataclasses.replace(topo.hub, rate_mbit=0))
    assert any("rate 0" in p for p in stalled.problems())


def test_wg_dump_is_parsed_into_peer_state() -> None:
    dump = (
        f"PRIV\t{KEY_A}\t51820\toff\n"
        f"{KEY_B}\t(none)\t203.0.113.10:40123\t10.99.0.2/32\t1700000000\t436\t348\toff\n"
        f"{KEY_A}\t(none)\t(none)\t10.99.0.3/32,10.99.0.9/32\t0\t0\t0\t25\n"
    )
    device = parse_wg_dump("wl-hub", dump)
    assert device.public_key == KEY_A
    assert device.listen_port == 51820
    assert device.fwmark is None
    seen = device.peer(KEY_B)
    assert seen is not None
    assert seen.endpoint == Endpoint(IPv4Address("203.0.113.10"), 40123)
    assert seen.latest_handshake == 1700000000.0
    assert (seen.rx_bytes, seen.tx_bytes) == (436, 348)
    assert seen.allowed_ips == (IPv4Network("10.99.0.2/32"),)
    unseen = device.peers[1]
    assert unseen.endpoint is None
    assert unseen.latest_handshake is None
    assert unseen.persistent_keepalive == 25
    assert len(unseen.allowed_ips) == 2


def test_malformed_wg_dump_raises_lab_error() -> None:
    with pytest.raises(LabError, match="wl-hub"):
        parse_wg_dump("wl-hub", "garbage\n")


def test_torn_state_file_reads_as_empty_state(tmp_path: Path) -> None:
    path = state_path("wl", tmp_path)
    path.write_text('{"version": 1, "namespaces": ["wl-hub"')
    state = read_state("wl", tmp_path)
    assert state == LabState(prefix="wl")


def test_state_round_trips_through_json() -> None:
    state = LabState(
        prefix="wl",
        namespaces=["wl-sw", "wl-hub"],
        interfaces=["wl-hub"],
        sockets=["/var/run/wireguard/wl-hub.sock"],
        processes=[ProcessRecord(42, 1234, "hub:wireguard-go-hub", ("wireguard-go", "-f"))],
        public_keys={"hub": KEY_A},
        lab_dir="/tmp/x",
    )
    assert LabState.from_json("wl", state.to_json()) == state


def test_reused_pid_with_other_start_time_is_not_alive() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    assert process_alive(me, start)
    assert not process_alive(me, start + 1)
