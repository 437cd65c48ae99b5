"""NetlinkControl against the kernel, in namespaces of our own.

Tests marked ``kernel`` need the WireGuard module: the host's kernel may lack it, so
scripts/test.sh runs them in a VM with Debian's kernel (scripts/vm.sh); elsewhere they skip
with the reason. The error path runs everywhere and proves a missing module is reported as such.
"""

from __future__ import annotations

import base64
import os
import subprocess
from ipaddress import ip_address, ip_network

import pytest
from pyroute2 import AsyncWireGuard
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from wgt_lab import KernelDevice, Lab, inside, run, wait_until

from wg_autopeer.errors import NoSuchInterface
from wg_autopeer.wireguard import (
    Endpoint,
    NetlinkControl,
    PeerConfig,
    open_control,
)
from wg_autopeer.wireguard.netlink import (
    MODULE_MISSING,
    get_device_message,
    parse_device_messages,
)

pytestmark = pytest.mark.lab

# Read once, outside the event loop.
MODULE_LOADED = os.path.exists("/sys/module/wireguard")


def kernel_device(lab: Lab) -> tuple[str, str]:
    netns = lab.netns("k")
    ifname = lab.ifname("k")
    run("ip", "-n", netns, "link", "add", ifname, "type", "wireguard")
    return netns, ifname


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def test_missing_module_or_device_is_no_such_interface(lab: Lab) -> None:
    netns = lab.netns("k")
    with inside(netns):
        control = NetlinkControl()
        try:
            with pytest.raises(NoSuchInterface) as caught:
                await control.get_device("wgtnothere")
        finally:
            await control.close()
    assert caught.value.interface == "wgtnothere"
    if not MODULE_LOADED:
        assert caught.value.reason == MODULE_MISSING


@pytest.mark.kernel
async def test_each_backend_lists_its_own_kind_and_auto_routes_each_device(lab: Lab) -> None:
    netns = lab.netns("a")
    userspace = lab.wireguard_go(netns, "u", listen_port=51820)
    kernel = lab.kernel_wireguard(netns, "k", listen_port=51821)
    with inside(netns):
        control = open_control()
        try:
            netlink_names = await control.netlink.list_interfaces()
            uapi_names = await control.uapi.list_interfaces()
            both = await control.list_interfaces()
            routes = {name: control.backend_for(name) for name in both}
            ports = {name: (await control.get_device(name)).listen_port for name in both}
        finally:
            await control.close()
    assert netlink_names == [kernel.ifname]
    assert uapi_names == [userspace.ifname]
    assert routes == {kernel.ifname: control.netlink, userspace.ifname: control.uapi}
    assert ports == {kernel.ifname: 51821, userspace.ifname: 51820}


@pytest.mark.kernel
async def test_kernel_device_peer_lifecycle(lab: Lab) -> None:
    netns, ifname = kernel_device(lab)
    key = base64.b64encode(os.urandom(32)).decode()
    peer = PeerConfig(key, (ip_network("10.77.0.2/32"),), Endpoint(ip_address("192.0.2.1"), 1), 0)
    with inside(netns):
        control = open_control()
        try:
            assert control.backend_for(ifname) is control.netlink
            assert ifname in await control.list_interfaces()
            await control.set_peer(ifname, peer)
            added = (await control.get_device(ifname)).peer(key)
            await control.set_allowed_ips(ifname, key, (ip_network("10.77.9.0/24"),))
            moved = (await control.get_device(ifname)).peer(key)
            await control.remove_peer(ifname, key)
            gone = await control.get_device(ifname)
        finally:
            await control.close()
    assert added is not None
    assert added.as_config() == PeerConfig(key, peer.allowed_ips, peer.endpoint, None)
    assert moved is not None
    assert moved.allowed_ips == (ip_network("10.77.9.0/24"),)
    assert gone.peers == ()


@pytest.mark.kernel
async def test_read_matches_what_wg_configured(lab: Lab) -> None:
    device = lab.kernel_wireguard(lab.netns("r"), "r", listen_port=41000)
    v4, v6 = random_key(), random_key()
    device.wg("set", device.ifname, "fwmark", "0x77")
    device.wg(
        "set", device.ifname,
        "peer", v4, "endpoint", "192.0.2.10:51820", "persistent-keepalive", "25",
        "allowed-ips", "10.77.1.0/24,10.77.2.1/32",
        "peer", v6, "endpoint", "[2001:db8::7]:443", "allowed-ips", "2001:db8:77::/64",
    )  # fmt: skip
    with inside(device.netns):
        control = NetlinkControl()
        try:
            state = await control.get_device(device.ifname, with_private_key=True)
            without = await control.get_device(device.ifname)
        finally:
            await control.close()
    assert state.public_key == device.public_key
    assert state.private_key == device.private_key
    assert without.private_key is None
    assert (state.listen_port, state.fwmark) == (41000, 0x77)
    first, second = state.peer(v4), state.peer(v6)
    assert first is not None
    assert second is not None
    assert first.as_config() == PeerConfig(
        v4,
        (ip_network("10.77.1.0/24"), ip_network("10.77.2.1/32")),
        Endpoint(ip_address("192.0.2.10"), 51820),
        25,
    )
    assert second.as_config() == PeerConfig(
        v6, (ip_network("2001:db8:77::/64"),), Endpoint(ip_address("2001:db8::7"), 443), None
    )
    assert (first.latest_handshake, first.rx_bytes) == (None, 0)


def _ipv6_pair(lab: Lab) -> tuple[KernelDevice, KernelDevice]:
    """Two kernel devices in two namespaces joined by a veth over IPv6 only, peered, talking."""
    left, right = lab.netns("l"), lab.netns("r")
    run("ip", "-n", left, "link", "add", "eth0", "type", "veth", "peer", "eth0", "netns", right)
    for netns, address in ((left, "2001:db8:7::1/64"), (right, "2001:db8:7::2/64")):
        run("ip", "-n", netns, "addr", "add", address, "dev", "eth0", "nodad")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
    a = lab.kernel_wireguard(left, "a", address="10.77.0.1/24")
    b = lab.kernel_wireguard(right, "b", address="10.77.0.2/24")
    a.wg("set", a.ifname, "peer", b.public_key, "endpoint", "[2001:db8:7::2]:51820",
         "allowed-ips", "10.77.0.2/32")  # fmt: skip
    b.wg("set", b.ifname, "peer", a.public_key, "endpoint", "[2001:db8:7::1]:51820",
         "allowed-ips", "10.77.0.1/32")  # fmt: skip

    def answered() -> bool:
        ping = ["ip", "netns", "exec", left, "ping", "-c1", "-W1", "10.77.0.2"]
        return subprocess.run(ping, capture_output=True).returncode == 0

    wait_until("a ping through the IPv6-carried tunnel", answered, deadline=30)
    return a, b


@pytest.mark.kernel
async def test_incremental_changes_keep_the_other_peers_session(lab: Lab) -> None:
    a, b = _ipv6_pair(lab)
    other = random_key()
    with inside(a.netns):
        control = NetlinkControl()
        try:
            before = (await control.get_device(a.ifname)).peer(b.public_key)
            await control.set_peer(
                a.ifname, PeerConfig(other, (ip_network("10.77.5.0/24"),), None, None)
            )
            added = (await control.get_device(a.ifname)).peer(other)
            moved = Endpoint(ip_address("2001:db8:7::99"), 4500)
            await control.set_peer(
                a.ifname, PeerConfig(other, (ip_network("10.77.6.0/24"),), moved, 15)
            )
            updated = (await control.get_device(a.ifname)).peer(other)
            # The agent rewrites a live peer's allowed IPs (a neighbour's routes come and go).
            await control.set_allowed_ips(
                a.ifname, b.public_key, (ip_network("10.77.0.2/32"), ip_network("10.77.8.0/24"))
            )
            await control.remove_peer(a.ifname, other)
            after = await control.get_device(a.ifname)
        finally:
            await control.close()
    assert before is not None
    assert before.latest_handshake is not None
    assert added is not None
    assert added.allowed_ips == (ip_network("10.77.5.0/24"),)
    assert updated is not None
    assert updated.as_config() == PeerConfig(other, (ip_network("10.77.6.0/24"),), moved, 15)
    assert after.peer(other) is None
    kept = after.peer(b.public_key)
    assert kept is not None
    assert kept.latest_handshake == before.latest_handshake, "the session was renegotiated"
    assert kept.rx_bytes >= before.rx_bytes > 0
    assert kept.tx_bytes >= before.tx_bytes > 0
    assert kept.endpoint == Endpoint(ip_address("2001:db8:7::2"), 51820)
    assert set(kept.allowed_ips) == {ip_network("10.77.0.2/32"), ip_network("10.77.8.0/24")}
    # And the session still carries traffic, on the same keys.
    run("ip", "netns", "exec", a.netns, "ping", "-c1", "-W2", "10.77.0.2")
    assert b.dump()[a.public_key][3] == str(int(before.latest_handshake))


@pytest.mark.kernel
async def test_hundreds_of_peers_come_back_from_a_multi_message_dump(lab: Lab) -> None:
    device = lab.kernel_wireguard(lab.netns("m"), "m")
    # A dump message holds at most 32 KiB: 300 peers with an endpoint and two allowed IPs each
    # take several, and the 2000 allowed IPs of one peer (~56 KiB) cannot fit in one, so the
    # kernel continues that peer in the next message under the same key.
    wide = random_key()
    wide_ips = [f"10.{100 + i // 250}.{i % 250}.0/24" for i in range(2000)]
    lines = [f"[Peer]\nPublicKey = {wide}\nAllowedIPs = {', '.join(wide_ips)}"]
    expected: dict[str, set[str]] = {wide: set(wide_ips)}
    for i in range(300):
        key = random_key()
        ips = {f"10.{i // 200}.{i % 200}.1/32", str(ip_network(f"2001:db8:{i:x}::/48"))}
        expected[key] = ips
        lines.append(
            f"[Peer]\nPublicKey = {key}\nAllowedIPs = {', '.join(sorted(ips))}\n"
            f"Endpoint = 192.0.2.{1 + i % 250}:{10000 + i}"
        )
    device.wg("addconf", device.ifname, "/dev/stdin", stdin="\n".join(lines) + "\n")
    with inside(device.netns):
        raw = AsyncWireGuard()
        try:
            await raw.setup_endpoint()
            request = get_device_message(device.ifname)
            messages = [
                m
                async for m in await raw.nlm_request(
                    request, msg_type=raw.prid, msg_flags=NLM_F_REQUEST | NLM_F_DUMP
                )
            ]
        finally:
            raw.close()
        control = NetlinkControl()
        try:
            state = await control.get_device(device.ifname)
        finally:
            await control.close()
    carrying_wide = [
        m
        for m in messages
        if any(
            p.get_attr("WGPEER_A_PUBLIC_KEY") == wide.encode()
            for p in m.get_attr("WGDEVICE_A_PEERS") or ()
        )
    ]
    assert len(messages) > 2
    assert len(carrying_wide) >= 2, "the wide peer was not split across messages"
    assert parse_device_messages(device.ifname, messages) == state
    got = {peer.public_key: {str(ip) for ip in peer.allowed_ips} for peer in state.peers}
    assert got == expected
    independent = device.dump()
    for peer in state.peers:
        assert str(peer.endpoint or "(none)") == independent[peer.public_key][1]
