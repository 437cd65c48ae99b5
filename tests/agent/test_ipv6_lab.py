"""IPv6 LANs for real: a routed /64 behind one router, the hub reached over IPv6.

lan1 also carries 2001:db8:50::/64, routed by r1 without NAT, so the hub sees each
client's own IPv6 address and groups them by the /64. bob has no IPv4 default
route: the only LAN he and alice share is the IPv6 one, and they peer over it.
"""

from __future__ import annotations

import dataclasses
import time
from ipaddress import IPv6Interface, ip_address

import pytest

from labkit import LabFactory
from wg_autopeer.lab import Topology, default_topology
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import (
    agent_call,
    direct_both_ways,
    direct_peers,
    start_agent,
    start_server,
)

pytestmark = pytest.mark.lab

ADDRESS6 = {
    "alice": IPv6Interface("2001:db8:50::10/64"),
    "bob": IPv6Interface("2001:db8:50::11/64"),
}


def dual_stack(prefix: str) -> Topology:
    base = default_topology(prefix)
    lans = tuple(
        dataclasses.replace(
            lan,
            wan6=IPv6Interface("2001:db8::10/64"),
            gateway6=IPv6Interface("2001:db8:50::1/64"),
        )
        if lan.name == "lan1"
        else lan
        for lan in base.lans
    )
    clients = tuple(
        dataclasses.replace(c, address6=ADDRESS6[c.name], hub_over_ipv6=True)
        if c.name in ADDRESS6
        else c
        for c in base.clients
    )
    return dataclasses.replace(base, lans=lans, clients=clients)


def test_neighbours_sharing_only_an_ipv6_lan_peer_over_it_and_rotation_changes_nothing(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(dual_stack)
    # The hub sees each of them by its own IPv6 address (no NAT): the /64 is the identity.
    assert str(lab.hub_peer("alice").endpoint) == "[2001:db8:50::10]:51820"
    lab.set_default_route("bob", None)
    start_server(lab)
    start_agent(lab, "alice")
    start_agent(lab, "bob")
    assert wait_for(lambda: direct_both_ways(lab, "alice", "bob"), timeout=20)
    bob = direct_peers(lab, "alice")[lab.public_key("bob")]
    assert bob.endpoint is not None
    assert bob.endpoint.address == ip_address("2001:db8:50::11")
    assert lab.ping("alice", lab.tunnel_ip("bob"), count=3, timeout=1)

    # Privacy addresses come and go (here: added already deprecated, as a rotated-out
    # temporary address is): no report, no change on either side.
    writes = {h: agent_call(lab, h, "status")["writes"] for h in ("alice", "bob")}

    def network_changes() -> int:
        return lab.log_path("agent-alice").read_text().count("network change:")

    changes = network_changes()
    for n in range(3):
        lab.run(
            "alice", "ip", "-6", "addr", "add", f"2001:db8:50::a{n}/64", "dev", "eth0",
            "nodad", "preferred_lft", "0",
        )  # fmt: skip
        time.sleep(0.5)
    time.sleep(1.0)
    assert {h: agent_call(lab, h, "status")["writes"] for h in ("alice", "bob")} == writes
    assert network_changes() == changes  # alice was not even woken
    assert direct_both_ways(lab, "alice", "bob")
