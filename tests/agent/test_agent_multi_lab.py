"""Several WireGuard interfaces and several default-route interfaces (issue 4, item 12).

One agent per client manages every WireGuard device of its namespace, and reports
the LAN of its preferred default route per address family. Each test builds the
default lab (alice and bob behind NAT router r1 on lan1, carol behind r2 on lan2)
with its own prefix, adds what it needs
(a second tunnel, or a second LAN link per client), and starts the real servers and
agents; the lab is torn down even when a test fails.

Why the second LAN of the uplink test sits behind its own router r3 rather than
behind r1: the server groups clients by the public address the *hub* sees for them,
one per client (where its tunnel goes out), not one per reported LAN. So while
alice and bob both leave through r1, they match on lan1 and on lan3 alike, whoever
routes lan3; r3 matters only once a client's tunnel leaves through it, which is what
the test's second half is about.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface, ip_network
from typing import Any

import pytest

from wg_autopeer.agent.localapi import AgentNotRunning
from wg_autopeer.lab import Lab, LanSpec, default_topology
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import (
    agent_call,
    direct_both_ways,
    direct_peers,
    has_direct_peer,
    start_agent,
    start_server,
)
from wg_autopeer.lab.topology import ExtraTunnel, Uplink
from wg_autopeer.lab.wgtools import parse_wg_dump
from wg_autopeer.wireguard.base import DeviceState, PeerState

T2_HUB = IPv4Interface("10.98.0.1/24")
T2_CLIENTS = {"alice": IPv4Interface("10.98.0.2/24"), "bob": IPv4Interface("10.98.0.3/24")}
T2_PORT = 51821
LAN3 = LanSpec(
    name="lan3",
    router="r3",
    wan=IPv4Interface("203.0.113.30/24"),
    gateway=IPv4Interface("192.168.70.1/24"),
)
LAN3_ADDRESSES = {
    "alice": IPv4Interface("192.168.70.10/24"),
    "bob": IPv4Interface("192.168.70.11/24"),
}
UPLINK_METRIC = 100

_SOURCE_RE = re.compile(r"method=POST path=/peering-request source=(\S+) ")


# ------------------------------------------------------------------------ descriptions (pure)
# The lab tests below need root; these check the descriptions they build from, anywhere.


def test_extra_tunnel_names_its_devices_apart_from_every_first_device() -> None:
    topo = default_topology("mu1a2")
    t2 = ExtraTunnel("t2", T2_HUB, T2_CLIENTS, T2_PORT)
    assert t2.problems(topo) == []
    names = [t2.interface(topo, h) for h in t2.hosts(topo)]
    assert names == ["mu1a2-hub-t2", "mu1a2-alice-t2", "mu1a2-bob-t2"]
    # A host may be called "alicet2"; the hyphen keeps its first device apart from ours.
    assert not set(names) & {topo.wg_interface(h) for h in (*topo.wg_hosts(), "alicet2")}


def test_extra_tunnel_that_cannot_be_built_is_refused_with_every_reason() -> None:
    topo = default_topology("mu1a2345")
    bad = ExtraTunnel(
        "t-2",
        IPv4Interface("10.99.0.1/16"),
        {"alice": IPv4Interface("10.98.0.2/24"), "dave": IPv4Interface("10.99.0.1/16")},
        51820,
    )
    text = "; ".join(bad.problems(topo))
    for reason in (
        "tunnel name 't-2'",
        "'dave' is not a client",
        "is longer than 15 characters",
        "overlaps 10.99.0.0/24",
        "alice's 10.98.0.2/24 is not in 10.99.0.0/16",
        "dave's 10.99.0.1 is already hub's",
        "listen port 51820 is already hub's",
        "listen port 51820 is already alice's",
    ):
        assert reason in text


def test_uplink_outside_its_lan_or_on_a_taken_address_is_refused() -> None:
    topo = default_topology("mu1a2").with_lan(LAN3)
    assert Uplink("alice", "lan3", LAN3_ADDRESSES["alice"], UPLINK_METRIC).problems(topo) == []
    assert Uplink("alice", "lan1", IPv4Interface("192.168.50.11/24"), 1).problems(topo) == [
        "uplink alice: 192.168.50.11 is already taken on lan1"
    ]
    text = "; ".join(Uplink("hub", "lan3", IPv4Interface("192.168.71.1/24"), -1).problems(topo))
    assert "'hub' is not a client" in text
    assert "is not in 192.168.70.0/24" in text
    assert "metric -1 is out of range" in text
    assert Uplink("bob", "lan9", LAN3_ADDRESSES["bob"], 1).problems(topo) == [
        "uplink: no LAN named 'lan9'"
    ]


# ------------------------------------------------------------------------ helpers


def _device(lab: Lab, host: str, iface: str) -> DeviceState:
    return parse_wg_dump(iface, lab.run(host, "wg", "show", iface, "dump").stdout)


def _t2_direct(lab: Lab, t2: ExtraTunnel, host: str) -> dict[str, PeerState]:
    """``host``'s peers on its tunnel-2 device other than that tunnel's hub, by key."""
    hub_key = t2.public_key(lab.topology.hub.name)
    device = _device(lab, host, t2.interface(lab.topology, host))
    return {p.public_key: p for p in device.peers if p.public_key != hub_key}


def _t2_paired(lab: Lab, t2: ExtraTunnel, host: str, other: str) -> bool:
    """``host`` holds ``other`` on tunnel 2 at its LAN address and tunnel-2 port, handshaken,
    with ``other``'s tunnel-2 address routed there (the path is proven)."""
    peer = _t2_direct(lab, t2, host).get(t2.public_key(other))
    return (
        peer is not None
        and peer.endpoint is not None
        and peer.endpoint.address == lab.lan_ip(other)
        and peer.endpoint.port == T2_PORT
        and bool(peer.latest_handshake)
        and any(T2_CLIENTS[other].ip in net for net in peer.allowed_ips)
    )


def _report_sources(lab: Lab, log_name: str) -> set[str]:
    """Source addresses of the peering requests a server logged."""
    return set(_SOURCE_RE.findall(lab.log_path(log_name).read_text()))


def _status(lab: Lab, host: str) -> dict[str, dict[str, Any]]:
    """``host``'s agent status, per WireGuard interface."""
    answer = agent_call(lab, host, "status")
    assert answer["ok"], answer
    return {i["interface"]: i for i in answer["interfaces"]}


def _answered(lab: Lab, host: str) -> bool:
    """True once ``host``'s agent runs and each of its devices got an answer from its server."""
    try:
        statuses = _status(lab, host)
    except AgentNotRunning:  # still starting: its control socket is not there yet
        return False
    return bool(statuses) and all(s["last_outcome"].startswith("ok") for s in statuses.values())


def _hub_bytes(device: DeviceState, keys: Iterable[str]) -> int:
    return sum(p.rx_bytes + p.tx_bytes for p in device.peers if p.public_key in keys)


def _ping_volume(lab: Lab, src: str, dst: IPv4Address, count: int = 10, size: int = 1000) -> int:
    """Ping ``dst`` from ``src`` quickly; the payload volume sent (fails the test if lost)."""
    result = lab.run(
        src, "ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-s", str(size), str(dst),
        check=False,
        timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, f"{src} -> {dst}: {result.stdout}"
    return count * size


def _peer_view(peers: dict[str, PeerState]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """What reconfiguring a peer would change: endpoint and allowed IPs."""
    return {k: (str(p.endpoint), tuple(map(str, p.allowed_ips))) for k, p in peers.items()}


# ------------------------------------------------------------------------ two tunnels


@pytest.mark.lab
def test_two_tunnels_each_peer_directly_and_losing_one_server_keeps_healthy_peers(
    lab_factory: Any,
) -> None:
    lab: Lab = lab_factory(base="mu")
    topo = lab.topology
    hub = topo.hub.name
    t2 = lab.add_tunnel("t2", T2_HUB, T2_CLIENTS, T2_PORT)
    t2_hub_iface = t2.interface(topo, hub)
    start_server(lab)
    server2 = start_server(lab, log_name="server-t2", interface=t2_hub_iface, address=T2_HUB.ip)
    agents = {host: start_agent(lab, host) for host in ("alice", "bob", "carol")}
    started = time.monotonic()

    def all_paired() -> bool:
        return all(
            has_direct_peer(lab, a, b) and _t2_paired(lab, t2, a, b)
            for a, b in (("alice", "bob"), ("bob", "alice"))
        )

    assert wait_for(all_paired, timeout=20), (
        f"alice/bob not direct on both tunnels; see {lab.log_path('agent-alice')}"
    )
    paired = time.monotonic() - started
    assert all(a.poll() is None for a in agents.values())

    # Each device holds exactly the neighbour's key of *that* tunnel, routing only its
    # tunnel address there.
    for host, other in (("alice", "bob"), ("bob", "alice")):
        first = direct_peers(lab, host)
        assert set(first) == {lab.public_key(other)}
        assert first[lab.public_key(other)].allowed_ips == (
            ip_network(f"{lab.tunnel_ip(other)}/32"),
        )
        second = _t2_direct(lab, t2, host)
        assert set(second) == {t2.public_key(other)}
        assert second[t2.public_key(other)].allowed_ips == (
            ip_network(f"{T2_CLIENTS[other].ip}/32"),
        )
    # carol (tunnel 1 only, another LAN) gets nobody, and her agent manages one device.
    assert wait_for(lambda: _answered(lab, "carol"), timeout=15), lab.log_path("agent-carol")
    assert direct_peers(lab, "carol") == {}
    assert list(_status(lab, "carol")) == [lab.wg_interface("carol")]

    # Each device reported to its own server, from its own tunnel address.
    first_sources = _report_sources(lab, "server")
    second_sources = _report_sources(lab, "server-t2")
    assert {str(lab.tunnel_ip(h)) for h in ("alice", "bob", "carol")} <= first_sources
    assert {str(a.ip) for a in T2_CLIENTS.values()} == second_sources
    assert not any(s.startswith("10.98.") for s in first_sources), first_sources
    statuses = _status(lab, "alice")
    assert statuses[lab.wg_interface("alice")]["server"].startswith(f"http://{topo.hub.tunnel.ip}")
    assert statuses[t2.interface(topo, "alice")]["server"].startswith(f"http://{T2_HUB.ip}")

    # Tunnel 2's traffic goes direct too: its hub device barely sees it.
    t2_keys = {t2.public_key(h) for h in T2_CLIENTS}
    before = _hub_bytes(_device(lab, hub, t2_hub_iface), t2_keys)
    volume = _ping_volume(lab, "alice", T2_CLIENTS["bob"].ip)
    grew = _hub_bytes(_device(lab, hub, t2_hub_iface), t2_keys) - before
    assert grew < volume / 4, f"tunnel 2's hub device saw {grew} bytes of a {volume}-byte ping"

    # Tunnel 2's server goes away: nothing changes on either device while peers handshake.
    views = {
        h: (_peer_view(direct_peers(lab, h)), _peer_view(_t2_direct(lab, t2, h)))
        for h in T2_CLIENTS
    }
    writes = {h: agent_call(lab, h, "status")["writes"] for h in T2_CLIENTS}
    stopping = time.monotonic()
    lab.stop(server2)

    def noticed() -> bool:
        return all(
            _status(lab, h)[t2.interface(topo, h)]["last_outcome"].startswith("server unreachable")
            for h in T2_CLIENTS
        )

    assert wait_for(noticed, timeout=15), "the agents never noticed tunnel 2's server had gone"
    noticed_after = time.monotonic() - stopping
    # Proving an absence needs a window: a few health ticks (1 s) and retries to the dead
    # server must pass without any change to the devices.
    time.sleep(3.0)
    for host in T2_CLIENTS:
        assert (_peer_view(direct_peers(lab, host)), _peer_view(_t2_direct(lab, t2, host))) == (
            views[host]
        )
        assert agent_call(lab, host, "status")["writes"] == writes[host]
        t2_status = _status(lab, host)[t2.interface(topo, host)]
        assert [p["health"] for p in t2_status["direct_peers"]] == ["active"], t2_status
    assert has_direct_peer(lab, "alice", "bob")
    assert _t2_paired(lab, t2, "alice", "bob")
    _ping_volume(lab, "alice", lab.tunnel_ip("bob"), count=3)
    _ping_volume(lab, "alice", T2_CLIENTS["bob"].ip, count=3)
    assert all(a.poll() is None for a in agents.values())
    print(
        f"direct on both tunnels after {paired:.2f} s; server loss noticed in {noticed_after:.2f} s"
    )


# ------------------------------------------------------------------------ two uplinks


def _endpoint(lab: Lab, host: str, other: str, *, handshake: bool = True) -> IPv4Address | None:
    """Where ``host`` reaches ``other`` directly (with ``handshake``: once it handshook), or
    None."""
    peer = direct_peers(lab, host).get(lab.public_key(other))
    if peer is None or peer.endpoint is None or (handshake and not peer.latest_handshake):
        return None
    return IPv4Address(str(peer.endpoint.address))


@pytest.mark.lab
def test_of_two_uplinks_the_preferred_is_reported_and_losing_it_keeps_traffic_flowing(
    lab_factory: Any,
) -> None:
    lab: Lab = lab_factory(base="mu")
    lab.add_lan(LAN3)
    lan1, lan3 = lab.topology.lan("lan1"), lab.topology.lan("lan3")
    for host, address in LAN3_ADDRESSES.items():
        assert lab.add_uplink(host, "lan3", address, metric=UPLINK_METRIC) == "eth1"
    start_server(lab)
    agents = {host: start_agent(lab, host) for host in ("alice", "bob")}

    assert wait_for(
        lambda: (
            _endpoint(lab, "alice", "bob") == lab.lan_ip("bob")
            and _endpoint(lab, "bob", "alice") == lab.lan_ip("alice")
        ),
        timeout=15,
    ), f"alice/bob never peered directly; see {lab.log_path('agent-alice')}"
    # Only the preferred default route's LAN is reported (eth0, metric 0; eth1 has
    # UPLINK_METRIC): the agent's status shows the entries it sends.
    alice_iface = lab.wg_interface("alice")
    assert _status(lab, "alice")[alice_iface]["lan"] == [
        f"eth0 {lab.topology.client('alice').address} via {lan1.gateway.ip}",
    ]
    first_endpoint = _endpoint(lab, "alice", "bob")

    # alice's first link goes down: her tunnel now leaves through r3 (another public
    # address), so the server no longer groups her with bob; traffic must keep flowing.
    lab.link_set("alice", False)
    down = time.monotonic()
    # The bound for a roam (2 s), plus a margin: this is a roam and a pair break-up.
    assert wait_for(lambda: lab.ping("alice", lab.tunnel_ip("bob"), timeout=0.2), timeout=4), (
        f"alice could not reach bob within 4 s of losing eth0; see {lab.log_path('agent-alice')}"
    )
    recovered = time.monotonic() - down
    assert wait_for(
        lambda: (
            _status(lab, "alice")[alice_iface]["lan"]
            == [f"eth1 {LAN3_ADDRESSES['alice']} via {lan3.gateway.ip}"]
        ),
        timeout=5,
    )

    # Settled: no direct path over the lost LAN on either side; either none (hub) or lan3.
    def settled() -> bool:
        return all(
            _endpoint(lab, a, b, handshake=False) in (None, LAN3_ADDRESSES[b].ip)
            for a, b in (("alice", "bob"), ("bob", "alice"))
        )

    assert wait_for(settled, timeout=15), (
        f"a direct peer stayed on lost lan1: {direct_peers(lab, 'alice')} / "
        f"{direct_peers(lab, 'bob')}"
    )
    assert lab.ping("alice", lab.tunnel_ip("bob"), count=3, timeout=1)

    # bob's first link goes down too: both leave through r3 now, share its public address
    # and lan3 again, so the direct path comes back on lan3.
    lab.link_set("bob", False)
    assert wait_for(
        lambda: (
            _endpoint(lab, "alice", "bob") == LAN3_ADDRESSES["bob"].ip
            and _endpoint(lab, "bob", "alice") == LAN3_ADDRESSES["alice"].ip
            # Proven, so traffic goes direct (not only the endpoint set: that comes first).
            and direct_both_ways(lab, "alice", "bob")
        ),
        timeout=20,
    ), f"alice/bob never peered on lan3; see {lab.log_path('agent-bob')}"
    hub_keys = {lab.public_key(h) for h in ("alice", "bob")}
    hub_iface = lab.wg_interface(lab.topology.hub.name)
    before = _hub_bytes(_device(lab, lab.topology.hub.name, hub_iface), hub_keys)
    volume = _ping_volume(lab, "alice", lab.tunnel_ip("bob"))
    grew = _hub_bytes(_device(lab, lab.topology.hub.name, hub_iface), hub_keys) - before
    assert grew < volume / 4, f"the hub saw {grew} bytes of a {volume}-byte ping over lan3"
    assert all(a.poll() is None for a in agents.values())
    print(f"first endpoint {first_endpoint}; hub path back {recovered:.2f} s after eth0 down")


@pytest.mark.lab
def test_a_tunnel_whose_hub_is_no_peering_server_never_gets_our_lan(lab_factory: Any) -> None:
    # Tunnel 2 is someone else's (another company's, a commercial VPN): its hub runs a
    # web server, but no peering server. Nothing about alice's LAN may reach it.
    lab = lab_factory()
    t2 = lab.add_tunnel("t2", T2_HUB, T2_CLIENTS, T2_PORT)
    hub = lab.topology.hub.name
    web = lab.spawn(
        hub,
        [sys.executable, "-m", "http.server", "--bind", str(T2_HUB.ip), "80"],
        log_name="web-t2",
    )
    assert wait_for(
        lambda: (
            lab.run(hub, "curl", "-s", "-m", "1", f"http://{T2_HUB.ip}/", check=False).returncode
            == 0
        ),
        timeout=10,
    )
    start_server(lab)
    start_agent(lab, "alice")
    start_agent(lab, "bob")
    t2_iface = t2.interface(lab.topology, "alice")

    def skipped() -> dict[str, Any] | None:
        try:
            statuses = _status(lab, "alice")
        except AgentNotRunning:
            return None
        t2_status = statuses.get(t2_iface)
        return t2_status if t2_status and t2_status.get("skipped") else None

    assert wait_for(lambda: skipped() is not None, timeout=15)
    t2_status = skipped()
    assert t2_status is not None
    assert "does not serve peering requests (GET answered HTTP 404)" in t2_status["skipped"]
    # The office tunnel, auto-discovered too, passed the probe and works as before.
    assert wait_for(
        lambda: has_direct_peer(lab, "alice", "bob") and has_direct_peer(lab, "bob", "alice"),
        timeout=15,
    )
    lab.stop(web)
    requests = lab.log_path("web-t2").read_text()
    assert '"GET /peering-request' in requests
    assert "POST" not in requests
