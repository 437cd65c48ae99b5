"""The agent end to end on kernel WireGuard: real server, real agents, real wireguard.ko.

One lab, as every Python process costs an emulated CPU a minute to start: the hub and
alice and bob run kernel WireGuard, carol (on the same LAN) runs wireguard-go. So the
kernel-only pair, a kernel hub serving a wireguard-go client, and direct peering across the
two backends (the per-interface choice in ``AutoControl``) all run in one go.

The host's kernel may have no WireGuard module: scripts/test.sh runs this in a VM with
Debian's kernel (scripts/vm.sh), hence deadlines of minutes; each wait still ends as soon as
its condition holds.
"""

from __future__ import annotations

import dataclasses
import signal
from ipaddress import IPv4Interface

import pytest

from labkit import LabFactory
from wg_autopeer.lab import Lab, Topology, default_topology
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import direct_peers, has_direct_peer, start_agent, start_server

pytestmark = [pytest.mark.lab, pytest.mark.kernel]

CLIENTS = ("alice", "bob", "carol")
# Starting the server or an agent under emulation takes tens of seconds each, serially.
STARTUP = 600.0
# Every look at the devices runs `ip netns exec ... wg` six times: under emulation that is
# CPU the agents need, so look rarely.
POLL = 1.0


def _kernel_lab(prefix: str) -> Topology:
    """The hub, and alice, bob and carol behind r1; all kernel WireGuard but carol."""
    topology = default_topology(prefix)
    carol = dataclasses.replace(
        topology.client("carol"),
        lan="lan1",
        address=IPv4Interface("192.168.50.12/24"),
        wireguard="userspace",
    )
    return dataclasses.replace(
        topology,
        hub=dataclasses.replace(topology.hub, wireguard="kernel"),
        lans=(topology.lan("lan1"),),
        clients=(
            dataclasses.replace(topology.client("alice"), wireguard="kernel"),
            dataclasses.replace(topology.client("bob"), wireguard="kernel"),
            carol,
        ),
    )


def _link_kinds(lab: Lab) -> dict[str, str]:
    """What the kernel says each WireGuard interface is: its own device, or a TUN."""
    kinds = {}
    for host in lab.topology.wg_hosts():
        shown = lab.run(host, "ip", "-d", "-o", "link", "show", "dev", lab.wg_interface(host))
        kinds[host] = "wireguard" if " wireguard " in shown.stdout else "tun"
    return kinds


def _all_paired(lab: Lab) -> bool:
    return all(
        has_direct_peer(lab, host, other) for host in CLIENTS for other in CLIENTS if host != other
    )


def _ping_skips_the_hub(lab: Lab, src: str, dst: str) -> None:
    count, size = 10, 1000
    before = {h: lab.hub_peer(h) for h in (src, dst)}
    lab.run(src, "ping", "-n", "-q", "-c", str(count), "-s", str(size), "-i", "0.1",
            str(lab.tunnel_ip(dst)), timeout=60)  # fmt: skip
    after = {h: lab.hub_peer(h) for h in (src, dst)}
    for host in (src, dst):
        grew = (after[host].rx_bytes - before[host].rx_bytes) + (
            after[host].tx_bytes - before[host].tx_bytes
        )
        assert grew < count * size / 4, f"{src}->{dst}: {host}'s hub counters grew by {grew} B"


def test_kernel_and_wireguard_go_clients_peer_directly_and_clean_up_on_sigterm(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(_kernel_lab, base="k")
    assert _link_kinds(lab) == {
        "hub": "wireguard",
        "alice": "wireguard",
        "bob": "wireguard",
        "carol": "tun",
    }
    start_server(lab, timeout=STARTUP)
    # One at a time, each waited for by its READY=1: on one emulated CPU starting them
    # together saves nothing, and polling them would take the CPU they start on.
    agents = {host: start_agent(lab, host, ready_within=STARTUP) for host in CLIENTS}

    assert wait_for(lambda: _all_paired(lab), timeout=STARTUP, interval=POLL), (
        f"the three never all peered directly; see {lab.log_path('agent-alice')}"
    )
    assert all(agent.poll() is None for agent in agents.values())
    assert set(direct_peers(lab, "alice")) == {lab.public_key("bob"), lab.public_key("carol")}
    _ping_skips_the_hub(lab, "alice", "bob")  # kernel to kernel
    _ping_skips_the_hub(lab, "carol", "alice")  # wireguard-go to kernel

    assert lab.stop(agents["alice"], signal.SIGTERM, timeout=60) == 0
    assert direct_peers(lab, "alice") == {}

    def alice_dropped() -> bool:
        return all(lab.public_key("alice") not in direct_peers(lab, h) for h in ("bob", "carol"))

    assert wait_for(alice_dropped, timeout=60, interval=POLL), (
        "bob or carol still holds alice as a direct peer"
    )
    before = lab.hub_peer("alice").rx_bytes
    assert lab.ping("alice", lab.tunnel_ip("bob"), count=3, timeout=2)
    assert lab.hub_peer("alice").rx_bytes > before, "alice->bob did not go through the hub"
    assert has_direct_peer(lab, "bob", "carol"), "bob and carol lost each other"
