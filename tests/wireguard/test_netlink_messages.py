"""Kernel netlink requests and answers, built and parsed without a kernel: every message is
encoded to bytes and decoded back, as the kernel would see it."""

from __future__ import annotations

import base64
import errno
import socket
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    wgmsg,
)

from wg_autopeer.errors import DeviceRefused, NoSuchInterface, WireGuardPermissionDenied
from wg_autopeer.wireguard.base import Endpoint, PeerConfig
from wg_autopeer.wireguard.netlink import (
    MODULE_MISSING,
    get_device_message,
    parse_device_messages,
    remove_peer_message,
    set_allowed_ips_message,
    set_peer_message,
    translate_error,
)

KEY = base64.b64encode(bytes(range(32))).decode()
OTHER = base64.b64encode(bytes(range(1, 33))).decode()


def on_the_wire(msg: Any) -> Any:
    """Encode as sent, decode as the kernel (or we, for answers) would read it."""
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def only_peer(msg: Any) -> Any:
    (peer,) = msg.get_attr("WGDEVICE_A_PEERS")
    return peer


def allowed(peer: Any) -> list[str]:
    return [a["addr"] for a in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()]


def test_set_peer_replaces_allowed_ips_and_never_the_peer_set() -> None:
    peer = PeerConfig(
        KEY,
        (ip_network("10.0.0.2/32"), ip_network("fd00::/64")),
        Endpoint(ip_address("192.0.2.1"), 51820),
        25,
    )
    msg = on_the_wire(set_peer_message("wg0", peer))
    assert msg["cmd"] == WG_CMD_SET_DEVICE
    assert msg.get_attr("WGDEVICE_A_IFNAME") == "wg0"
    assert msg.get_attr("WGDEVICE_A_FLAGS") is None
    wire_peer = only_peer(msg)
    assert wire_peer.get_attr("WGPEER_A_PUBLIC_KEY").decode() == KEY
    assert wire_peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    endpoint = wire_peer.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["addr"], endpoint["port"]) == ("192.0.2.1", 51820)
    assert wire_peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    assert allowed(wire_peer) == ["10.0.0.2/32", "fd00::/64"]


def test_set_peer_with_ipv6_endpoint_and_no_ips_clears_them() -> None:
    peer = PeerConfig(KEY, (), Endpoint(ip_address("2001:db8::1"), 443))
    wire_peer = only_peer(on_the_wire(set_peer_message("wg0", peer)))
    endpoint = wire_peer.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["family"], endpoint["addr"], endpoint["port"]) == (
        socket.AF_INET6,
        "2001:db8::1",
        443,
    )
    assert wire_peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert allowed(wire_peer) == []
    assert wire_peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 0


def test_remove_peer_sets_remove_me_only() -> None:
    msg = on_the_wire(remove_peer_message("wg0", KEY))
    wire_peer = only_peer(msg)
    assert wire_peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert [name for name, _ in wire_peer["attrs"]] == ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_FLAGS"]
    assert msg.get_attr("WGDEVICE_A_FLAGS") is None


def test_set_allowed_ips_is_update_only() -> None:
    msg = on_the_wire(set_allowed_ips_message("wg0", KEY, [ip_network("10.9.0.0/16")]))
    wire_peer = only_peer(msg)
    assert (
        wire_peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS
    )
    assert allowed(wire_peer) == ["10.9.0.0/16"]
    assert wire_peer.get_attr("WGPEER_A_ENDPOINT") is None


def test_get_device_message_names_the_device() -> None:
    msg = on_the_wire(get_device_message("wg0"))
    assert msg["cmd"] == WG_CMD_GET_DEVICE
    assert msg.get_attr("WGDEVICE_A_IFNAME") == "wg0"


@pytest.mark.parametrize(
    "build",
    [
        lambda: set_peer_message("wg0", PeerConfig("bad")),
        lambda: remove_peer_message("wg0", "bad"),
        lambda: set_allowed_ips_message("wg0", KEY[:-2], []),
        lambda: set_peer_message("wg0", PeerConfig(KEY, (), None, 1 << 16)),
        lambda: set_peer_message("wg0", PeerConfig(KEY, ("x",))),  # type: ignore[arg-type]
    ],
    ids=["set", "remove", "allowed", "keepalive", "ip"],
)
def test_bad_values_are_refused_while_building(build: Any) -> None:
    with pytest.raises(DeviceRefused):
        build()


def test_bad_interface_name_is_no_such_interface() -> None:
    with pytest.raises(NoSuchInterface):
        get_device_message("../x")


def kernel_answer(
    peers: list[list[list[Any]]], *, private: bytes = bytes(32), port: int = 51820
) -> Any:
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
    msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", base64.b64encode(private).decode()])
    msg["attrs"].append(["WGDEVICE_A_PUBLIC_KEY", OTHER])
    msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", port])
    msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": attrs} for attrs in peers]])
    return on_the_wire(msg)


def ip_attr(text: str) -> dict[str, Any]:
    net = ip_network(text)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
            ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen],
        ]
    }


def test_parse_merges_a_peer_split_over_two_messages() -> None:
    first = kernel_answer(
        [
            [
                ["WGPEER_A_PUBLIC_KEY", KEY],
                ["WGPEER_A_ENDPOINT", {"addr": "192.0.2.1", "port": 51820}],
                ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 250000000}],
                ["WGPEER_A_RX_BYTES", 10],
                ["WGPEER_A_TX_BYTES", 20],
                ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                ["WGPEER_A_ALLOWEDIPS", [ip_attr("10.0.0.2/32")]],
            ]
        ]
    )
    second = kernel_answer(
        [
            [["WGPEER_A_PUBLIC_KEY", KEY], ["WGPEER_A_ALLOWEDIPS", [ip_attr("fd00::/64")]]],
            [
                ["WGPEER_A_PUBLIC_KEY", OTHER],
                ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}],
            ],
        ]
    )
    device = parse_device_messages("wg0", [first, second])
    assert device.public_key == OTHER
    assert device.listen_port == 51820
    assert device.private_key is None
    peer, other = device.peers
    assert peer.public_key == KEY
    assert peer.allowed_ips == (ip_network("10.0.0.2/32"), ip_network("fd00::/64"))
    assert peer.endpoint == Endpoint(ip_address("192.0.2.1"), 51820)
    assert peer.latest_handshake == 1700000000.25
    assert (peer.rx_bytes, peer.tx_bytes, peer.persistent_keepalive) == (10, 20, 25)
    assert other.public_key == OTHER
    assert other.latest_handshake is None
    assert other.persistent_keepalive is None


def test_parse_keeps_private_key_only_on_request() -> None:
    secret = bytes(range(5, 37))
    answer = kernel_answer([], private=secret)
    assert parse_device_messages("wg0", [answer]).private_key is None
    with_key = parse_device_messages("wg0", [answer], with_private_key=True)
    assert with_key.private_key == base64.b64encode(secret).decode()
    # All zeroes is the kernel's "no key".
    unset = parse_device_messages("wg0", [kernel_answer([])], with_private_key=True)
    assert unset.private_key is None


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENODEV, NoSuchInterface),
        (errno.ENOENT, NoSuchInterface),
        (errno.EOPNOTSUPP, NoSuchInterface),
        (errno.EPERM, WireGuardPermissionDenied),
        (errno.EACCES, WireGuardPermissionDenied),
        (errno.EINVAL, DeviceRefused),
        (errno.ENOMEM, DeviceRefused),
    ],
)
def test_netlink_errors_map_to_our_tree(code: int, kind: type[Exception]) -> None:
    error = translate_error("wg0", NetlinkError(code))
    assert type(error) is kind
    assert error.interface == "wg0"


def test_missing_module_reason_is_explicit() -> None:
    assert translate_error("wg0", NetlinkError(errno.ENOENT)).reason == MODULE_MISSING
