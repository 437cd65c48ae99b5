"""Strangers behind one carrier-grade NAT are never matched, real neighbours still are.

A carrier-grade NAT (router ``cgn``, public 203.0.113.50) in front of two home
routers that both use the defaults 192.168.1.0/24 via 192.168.1.1: alice and bob
live in home 1, carol in home 2. To the hub all three have the same public IP,
gateway and network; only the gateway's MAC address (the LAN fingerprint the
agents report) tells the homes apart.
"""

from __future__ import annotations

import time
from ipaddress import IPv4Interface

import pytest

from labkit import LabFactory
from wg_autopeer.lab import ClientSpec, LanSpec, Topology, default_topology
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import (
    curl_peering,
    direct_peers,
    has_direct_peer,
    start_agent,
    start_server,
)

pytestmark = pytest.mark.lab

HOME_GATEWAY = IPv4Interface("192.168.1.1/24")


def cgnat_topology(prefix: str) -> Topology:
    base = default_topology(prefix)
    return Topology(
        prefix=prefix,
        wan=base.wan,
        hub=base.hub,
        lans=(
            LanSpec("isp", "cgn", IPv4Interface("203.0.113.50/24"), IPv4Interface("100.64.0.1/24")),
            LanSpec("home1", "h1", IPv4Interface("100.64.0.10/24"), HOME_GATEWAY, upstream="isp"),
            LanSpec("home2", "h2", IPv4Interface("100.64.0.20/24"), HOME_GATEWAY, upstream="isp"),
        ),
        clients=(
            ClientSpec(
                "alice", "home1", IPv4Interface("192.168.1.10/24"), IPv4Interface("10.99.0.2/24")
            ),
            ClientSpec(
                "bob", "home1", IPv4Interface("192.168.1.11/24"), IPv4Interface("10.99.0.3/24")
            ),
            ClientSpec(
                "carol", "home2", IPv4Interface("192.168.1.12/24"), IPv4Interface("10.99.0.4/24")
            ),
        ),
    )


def test_homes_with_identical_addressing_behind_one_cgnat_are_never_matched(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(cgnat_topology)
    public = {str(lab.hub_peer(h).endpoint) for h in ("alice", "bob", "carol")}
    assert {p.split(":")[0] for p in public} == {"203.0.113.50"}  # one public IP for all three
    start_server(lab)
    for host in ("alice", "bob", "carol"):
        start_agent(lab, host)
    assert wait_for(
        lambda: has_direct_peer(lab, "alice", "bob") and has_direct_peer(lab, "bob", "alice"),
        timeout=20,
    )
    # For a while, carol's key never shows on alice's or bob's device, nor theirs on hers:
    # the server never offered them to each other.
    carol = lab.public_key("carol")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert carol not in direct_peers(lab, "alice")
        assert carol not in direct_peers(lab, "bob")
        assert direct_peers(lab, "carol") == {}
        time.sleep(0.2)
    # What the fingerprint prevents: the same report without it would be matched.
    entry = {"pubkey": carol, "ip": "192.168.1.12", "netmask": 24, "gateway": "192.168.1.1",
             "listen_port": 51820}  # fmt: skip
    status, body = curl_peering(lab, "carol", [entry])
    assert status == 200
    assert lab.public_key("alice") in body
