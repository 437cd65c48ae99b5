"""NetlinkControl against the kernel, in namespaces of our own. Without the kernel module the
device tests skip, and the error path proves the missing module is reported as such."""

from __future__ import annotations

import base64
import os
import subprocess
from ipaddress import ip_address, ip_network

import pytest
from wgt_lab import Lab, inside

from wg_autopeer.errors import NoSuchInterface
from wg_autopeer.wireguard import (
    Endpoint,
    NetlinkControl,
    PeerConfig,
    UapiControl,
    open_control,
)
from wg_autopeer.wireguard.netlink import MODULE_MISSING

pytestmark = pytest.mark.lab

# Read once, outside the event loop.
MODULE_LOADED = os.path.exists("/sys/module/wireguard")


def kernel_device(lab: Lab) -> tuple[str, str]:
    netns = lab.netns("k")
    ifname = lab.ifname("k")
    done = subprocess.run(
        ["ip", "-n", netns, "link", "add", ifname, "type", "wireguard"], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("kernel WireGuard module not available")
    return netns, ifname


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


async def test_netlink_listing_ignores_userspace_devices(lab: Lab) -> None:
    device = lab.wireguard_go(lab.netns("a"), "a")
    with inside(device.netns):
        kernel = await NetlinkControl().list_interfaces()
        userspace = await UapiControl().list_interfaces()
    assert device.ifname not in kernel
    assert userspace == [device.ifname]


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
