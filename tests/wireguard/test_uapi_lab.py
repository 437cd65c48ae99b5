"""UapiControl against real wireguard-go devices in namespaces of our own."""

from __future__ import annotations

import base64
import os
import time
from ipaddress import ip_address, ip_network

import pytest
from wgt_lab import Lab, Star, WgGoDevice, inside

from wg_autopeer.errors import DeviceRefused, NoSuchInterface
from wg_autopeer.wireguard import (
    AutoControl,
    Endpoint,
    PeerConfig,
    PeerState,
    UapiControl,
    is_wireguard_link,
    open_control,
)

pytestmark = pytest.mark.lab


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def test_get_device_reads_key_port_and_no_peers(wg_device: WgGoDevice) -> None:
    with inside(wg_device.netns):
        control = UapiControl()
        device = await control.get_device(wg_device.ifname)
        secret = await control.get_device(wg_device.ifname, with_private_key=True)
    assert device.public_key == wg_device.public_key
    assert device.listen_port == wg_device.listen_port
    assert device.peers == ()
    assert device.private_key is None
    assert secret.private_key == wg_device.private_key
    assert wg_device.private_key not in repr(secret)


async def test_set_peer_adds_then_updates_in_place_then_removes(wg_device: WgGoDevice) -> None:
    key = random_key()
    first = PeerConfig(
        key,
        (ip_network("10.77.0.2/32"),),
        Endpoint(ip_address("192.0.2.7"), 51820),
        persistent_keepalive=0,
    )
    second = PeerConfig(
        key,
        (ip_network("10.77.0.2/32"), ip_network("10.77.9.0/24")),
        Endpoint(ip_address("2001:db8::7"), 51821),
        persistent_keepalive=25,
    )
    with inside(wg_device.netns):
        control = UapiControl()
        await control.set_peer(wg_device.ifname, first)
        added = (await control.get_device(wg_device.ifname)).peer(key)
        await control.set_peer(wg_device.ifname, second)
        updated = await control.get_device(wg_device.ifname)
        seen_by_wg = wg_device.dump()
        await control.remove_peer(wg_device.ifname, key)
        removed = await control.get_device(wg_device.ifname)
        # Removing what is gone is not an error.
        await control.remove_peer(wg_device.ifname, key)

    assert added is not None
    assert added.as_config() == PeerConfig(key, first.allowed_ips, first.endpoint, None)
    assert len(updated.peers) == 1
    assert updated.peers[0].as_config() == second
    assert seen_by_wg[key][1] == "[2001:db8::7]:51821"
    assert sorted(seen_by_wg[key][2].split(",")) == ["10.77.0.2/32", "10.77.9.0/24"]
    assert removed.peers == ()
    assert key not in wg_device.dump()


async def test_set_allowed_ips_replaces_only_the_ips(wg_device: WgGoDevice) -> None:
    key = random_key()
    peer = PeerConfig(
        key, (ip_network("10.77.0.2/32"),), Endpoint(ip_address("192.0.2.7"), 51820), 15
    )
    with inside(wg_device.netns):
        control = UapiControl()
        await control.set_peer(wg_device.ifname, peer)
        await control.set_allowed_ips(wg_device.ifname, key, (ip_network("10.77.5.0/24"),))
        after = (await control.get_device(wg_device.ifname)).peer(key)
    assert after is not None
    assert after.allowed_ips == (ip_network("10.77.5.0/24"),)
    assert after.endpoint == peer.endpoint
    assert after.persistent_keepalive == 15


async def test_set_allowed_ips_on_missing_peer_raises_and_creates_nothing(
    wg_device: WgGoDevice,
) -> None:
    key = random_key()
    with inside(wg_device.netns):
        control = UapiControl()
        with pytest.raises(NoSuchInterface) as caught:
            await control.set_allowed_ips(wg_device.ifname, key, (ip_network("10.77.5.0/24"),))
        device = await control.get_device(wg_device.ifname)
    assert caught.value.interface == wg_device.ifname
    assert device.peers == ()


async def test_missing_interface_raises_no_such_interface(wg_device: WgGoDevice) -> None:
    with inside(wg_device.netns):
        control = UapiControl()
        with pytest.raises(NoSuchInterface) as caught:
            await control.get_device("wgtnothere")
    assert caught.value.interface == "wgtnothere"


async def test_bad_key_is_refused_and_device_left_unchanged(wg_device: WgGoDevice) -> None:
    with inside(wg_device.netns):
        control = UapiControl()
        with pytest.raises(DeviceRefused) as caught:
            await control.set_peer(
                wg_device.ifname, PeerConfig("not-a-key", (ip_network("10.0.0.0/8"),))
            )
        device = await control.get_device(wg_device.ifname)
    assert caught.value.interface == wg_device.ifname
    assert device.peers == ()


async def test_device_errno_is_refused_with_reason(wg_device: WgGoDevice) -> None:
    # Every value our builders emit is checked first, so only a raw request can reach the
    # device with something it refuses: a listen port out of range.
    with inside(wg_device.netns):
        control = UapiControl()
        with pytest.raises(DeviceRefused) as caught:
            await control._set(wg_device.ifname, [("listen_port", "99999")])
        device = await control.get_device(wg_device.ifname)
    assert caught.value.interface == wg_device.ifname
    assert "invalid value" in caught.value.reason
    assert "errno 22" in caught.value.reason
    assert device.listen_port == wg_device.listen_port


async def test_socket_of_link_in_other_namespace_is_ignored(lab: Lab) -> None:
    device = lab.wireguard_go(lab.netns("a"), "a")
    elsewhere = lab.netns("b")
    with inside(elsewhere):
        listed_elsewhere = await UapiControl().list_interfaces()
        auto_elsewhere = await open_control().list_interfaces()
        link_elsewhere = is_wireguard_link(device.ifname)
        with pytest.raises(NoSuchInterface):
            await UapiControl().get_device(device.ifname)
    with inside(device.netns):
        listed_home = await UapiControl().list_interfaces()
        link_home = is_wireguard_link(device.ifname)
    assert device.socket.is_socket()
    assert device.ifname not in listed_elsewhere
    assert device.ifname not in auto_elsewhere
    assert not link_elsewhere
    assert device.ifname in listed_home
    assert link_home


async def test_open_control_drives_userspace_device_through_uapi(wg_device: WgGoDevice) -> None:
    key = random_key()
    with inside(wg_device.netns):
        control = open_control()
        try:
            assert isinstance(control, AutoControl)
            assert isinstance(control.backend_for(wg_device.ifname), UapiControl)
            assert wg_device.ifname in await control.list_interfaces()
            await control.set_peer(wg_device.ifname, PeerConfig(key, (ip_network("10.77.0.9/32"),)))
            device = await control.get_device(wg_device.ifname)
        finally:
            await control.close()
    assert device.public_key == wg_device.public_key
    assert [p.public_key for p in device.peers] == [key]


def session(peer: PeerState | None) -> tuple[float | None, int, int]:
    assert peer is not None
    return (peer.latest_handshake, peer.rx_bytes, peer.tx_bytes)


async def test_changing_one_peer_leaves_live_sessions_of_others_untouched(star: Star) -> None:
    """The issue's acceptance test: three live peers keep handshake and counters while a
    fourth is added, updated and removed, one live peer is re-applied identically, and
    one live peer's allowed IPs change and it is then removed."""
    hub = star.hub
    keys = [s.public_key for s in star.spokes]
    star.ping_all()
    # The pinger sends a passive keepalive 10 s after the last reply; all below takes
    # milliseconds, and the check at the end proves we stayed well inside that window.
    started = time.monotonic()
    with inside(hub.netns):
        control = UapiControl()
        before = await control.get_device(hub.ifname)
        assert all(session(before.peer(k))[0] is not None for k in keys), before
        assert all(session(before.peer(k))[1] > 0 for k in keys), before

        fourth = random_key()
        endpoint = Endpoint(ip_address("192.168.77.99"), 51820)
        await control.set_peer(
            hub.ifname, PeerConfig(fourth, (ip_network("10.77.0.99/32"),), endpoint)
        )
        await control.set_peer(
            hub.ifname,
            PeerConfig(
                fourth, (ip_network("10.77.0.99/32"), ip_network("10.77.99.0/24")), endpoint, 5
            ),
        )
        after_fourth = await control.get_device(hub.ifname)
        await control.remove_peer(hub.ifname, fourth)
        after_remove_fourth = await control.get_device(hub.ifname)

        live = before.peer(keys[0])
        assert live is not None
        await control.set_peer(hub.ifname, live.as_config())
        after_reapply = await control.get_device(hub.ifname)

        await control.set_allowed_ips(
            hub.ifname, keys[2], (ip_network("10.77.0.4/32"), ip_network("10.77.44.0/24"))
        )
        after_allowed = await control.get_device(hub.ifname)
        await control.remove_peer(hub.ifname, keys[2])
        after_remove_live = await control.get_device(hub.ifname)
    elapsed = time.monotonic() - started
    assert elapsed < 8, f"took {elapsed:.1f}s: a passive keepalive may have moved counters"

    assert after_fourth.peer(fourth) is not None
    assert after_remove_fourth.peer(fourth) is None
    for state in (after_fourth, after_remove_fourth, after_reapply, after_allowed):
        for key in keys:
            assert session(state.peer(key)) == session(before.peer(key)), key
    # Re-applying an identical live peer kept its session and config.
    assert after_reapply.peer(keys[0]) == before.peer(keys[0])
    changed = after_allowed.peer(keys[2])
    assert changed is not None
    assert changed.allowed_ips == (ip_network("10.77.0.4/32"), ip_network("10.77.44.0/24"))
    assert after_remove_live.peer(keys[2]) is None
    for key in keys[:2]:
        assert session(after_remove_live.peer(key)) == session(before.peer(key)), key
    # And the tunnels still carry traffic afterwards, without a new handshake being needed.
    star.spokes = star.spokes[:2]
    star.ping_all()
