"""The UAPI text protocol: building requests, parsing answers, and the socket edge cases,
against a stand-in device on a unix socket (no root, no wireguard-go)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from wg_autopeer.errors import (
    DeviceRefused,
    NoSuchInterface,
    WireGuardError,
    WireGuardPermissionDenied,
)
from wg_autopeer.wireguard.base import Endpoint, PeerConfig
from wg_autopeer.wireguard.uapi import (
    UapiControl,
    is_valid_ifname,
    parse_device,
    parse_endpoint,
    public_key_of,
    remove_peer_request,
    serialise,
    set_allowed_ips_request,
    set_peer_request,
)

KEY_HEX = "22" * 32
KEY = base64.b64encode(bytes.fromhex(KEY_HEX)).decode()
# RFC 7748 section 6.1: Alice's X25519 key pair.
ALICE_PRIVATE_HEX = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC_HEX = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def b64(hex_text: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_text)).decode()


def test_set_peer_request_is_incremental_and_complete() -> None:
    peer = PeerConfig(
        KEY,
        (ip_network("10.0.0.2/32"), ip_network("fd00::/64")),
        Endpoint(ip_address("192.0.2.1"), 51820),
        25,
    )
    wire = serialise("wg0", "set", set_peer_request("wg0", peer))
    assert (
        wire
        == (
            f"set=1\npublic_key={KEY_HEX}\nendpoint=192.0.2.1:51820\n"
            "persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
            "allowed_ip=10.0.0.2/32\nallowed_ip=fd00::/64\n\n"
        ).encode()
    )
    assert b"replace_peers" not in wire


def test_set_peer_without_endpoint_or_keepalive_sends_keepalive_zero() -> None:
    lines = set_peer_request("wg0", PeerConfig(KEY))
    assert lines == [
        ("public_key", KEY_HEX),
        ("persistent_keepalive_interval", "0"),
        ("replace_allowed_ips", "true"),
    ]


def test_ipv6_endpoint_is_bracketed() -> None:
    peer = PeerConfig(KEY, (), Endpoint(ip_address("2001:db8::1"), 443))
    assert ("endpoint", "[2001:db8::1]:443") in set_peer_request("wg0", peer)


def test_remove_and_set_allowed_ips_requests() -> None:
    assert remove_peer_request("wg0", KEY) == [("public_key", KEY_HEX), ("remove", "true")]
    assert set_allowed_ips_request("wg0", KEY, [ip_network("10.1.0.0/16")]) == [
        ("public_key", KEY_HEX),
        ("update_only", "true"),
        ("replace_allowed_ips", "true"),
        ("allowed_ip", "10.1.0.0/16"),
    ]


@pytest.mark.parametrize(
    "peer",
    [
        PeerConfig("not a key"),
        PeerConfig(KEY[:-1] + "\n"),
        PeerConfig(KEY, (ip_network("10.0.0.0/8"),), None, 70000),
        PeerConfig(KEY, (), Endpoint(ip_address("192.0.2.1"), 65536)),
        # Wrong types slipping past the type checker must not smuggle in a line.
        PeerConfig(KEY, ("10.0.0.0/8\nreplace_peers=true",)),  # type: ignore[arg-type]
        PeerConfig(KEY, (), Endpoint("192.0.2.1\nremove=true", 1)),  # type: ignore[arg-type]
    ],
    ids=["bad-key", "newline-key", "keepalive", "port", "ip-injection", "endpoint-injection"],
)
def test_bad_peer_is_refused_before_sending(peer: PeerConfig) -> None:
    with pytest.raises(DeviceRefused) as caught:
        serialise("wg0", "set", set_peer_request("wg0", peer))
    assert caught.value.interface == "wg0"


@pytest.mark.parametrize("line", [("a", "b\nc"), ("a\nb", "c"), ("a=b", "c"), ("", "x")])
def test_serialise_refuses_line_breaks_and_bad_keys(line: tuple[str, str]) -> None:
    with pytest.raises(DeviceRefused):
        serialise("wg0", "set", [line])


def test_interface_names_cannot_escape_socket_dir() -> None:
    assert is_valid_ifname("wg0")
    for bad in ("", "..", "a/b", "../../etc", "x" * 16, "a b", "a\nb"):
        assert not is_valid_ifname(bad), bad


ANSWER = f"""private_key={ALICE_PRIVATE_HEX}
listen_port=51999
fwmark=0
public_key={KEY_HEX}
preshared_key={"00" * 32}
protocol_version=1
endpoint=[2001:db8::1]:51820
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=25
allowed_ip=10.0.0.2/32
allowed_ip=fd00::/64
public_key={"33" * 32}
endpoint=192.0.2.9:4500
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500000000
tx_bytes=1234
rx_bytes=5678
persistent_keepalive_interval=0
some_future_key=whatever""".splitlines()


def test_parse_device_reads_every_field() -> None:
    device = parse_device("wg0", ANSWER)
    assert device.name == "wg0"
    assert device.listen_port == 51999
    assert device.fwmark is None
    assert device.public_key == b64(ALICE_PUBLIC_HEX)
    assert device.private_key is None
    first, second = device.peers
    assert first.public_key == KEY
    assert first.endpoint == Endpoint(ip_address("2001:db8::1"), 51820)
    assert first.allowed_ips == (ip_network("10.0.0.2/32"), ip_network("fd00::/64"))
    assert first.latest_handshake is None
    assert first.persistent_keepalive == 25
    assert second.public_key == b64("33" * 32)
    assert second.endpoint == Endpoint(ip_address("192.0.2.9"), 4500)
    assert second.allowed_ips == ()
    assert second.latest_handshake == 1700000000.5
    assert (second.rx_bytes, second.tx_bytes) == (5678, 1234)
    assert second.persistent_keepalive is None


def test_private_key_only_on_request_and_never_in_repr() -> None:
    device = parse_device("wg0", ANSWER, with_private_key=True)
    assert device.private_key == b64(ALICE_PRIVATE_HEX)
    assert device.private_key not in repr(device)
    assert ALICE_PRIVATE_HEX not in repr(device)


def test_unreadable_value_is_refused_without_echoing_it() -> None:
    with pytest.raises(DeviceRefused) as caught:
        parse_device("wg0", ["private_key=zz" + ALICE_PRIVATE_HEX[2:]])
    assert ALICE_PRIVATE_HEX[2:] not in str(caught.value)


def test_public_key_of_matches_rfc7748() -> None:
    assert public_key_of(b64(ALICE_PRIVATE_HEX)) == b64(ALICE_PUBLIC_HEX)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1:51820", Endpoint(ip_address("192.0.2.1"), 51820)),
        ("[2001:db8::1]:1", Endpoint(ip_address("2001:db8::1"), 1)),
        ("[fe80::1%eth0]:7", Endpoint(ip_address("fe80::1"), 7)),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


# --- a stand-in device on a unix socket ----------------------------------------------------------
# Named "lo.sock" because the control only trusts a socket whose link exists in this
# namespace, and every namespace has "lo".


@dataclass
class StandIn:
    socket_dir: Path
    answer: Callable[[bytes], bytes]
    requests: list[bytes] = field(default_factory=list)


@pytest.fixture
async def stand_in(tmp_path: Path) -> AsyncIterator[StandIn]:
    device = StandIn(tmp_path, lambda request: b"errno=0\n\n")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\n\n")
        device.requests.append(request)
        writer.write(device.answer(request))
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(tmp_path / "lo.sock"))
    try:
        yield device
    finally:
        server.close()
        await server.wait_closed()


async def test_get_device_over_socket(stand_in: StandIn) -> None:
    stand_in.answer = lambda _: ("\n".join(ANSWER) + "\nerrno=0\n\n").encode()
    device = await UapiControl(stand_in.socket_dir).get_device("lo")
    assert stand_in.requests == [b"get=1\n\n"]
    assert len(device.peers) == 2


async def test_errno_answer_becomes_device_refused(stand_in: StandIn) -> None:
    stand_in.answer = lambda _: b"errno=-22\n\n"
    with pytest.raises(DeviceRefused) as caught:
        await UapiControl(stand_in.socket_dir).remove_peer("lo", KEY)
    assert caught.value.interface == "lo"
    assert "invalid value" in caught.value.reason


async def test_answer_cut_short_becomes_device_refused(stand_in: StandIn) -> None:
    stand_in.answer = lambda _: b"listen_port=1\n"
    with pytest.raises(DeviceRefused):
        await UapiControl(stand_in.socket_dir).get_device("lo")


async def test_bad_key_sends_nothing(stand_in: StandIn) -> None:
    with pytest.raises(DeviceRefused):
        await UapiControl(stand_in.socket_dir).set_peer("lo", PeerConfig("AAAA"))
    assert stand_in.requests == []


async def test_set_allowed_ips_checks_peer_exists_first(stand_in: StandIn) -> None:
    stand_in.answer = lambda _: b"listen_port=1\nerrno=0\n\n"
    with pytest.raises(NoSuchInterface):
        await UapiControl(stand_in.socket_dir).set_allowed_ips("lo", KEY, ())
    assert stand_in.requests == [b"get=1\n\n"]


async def test_list_interfaces_skips_sockets_without_a_link_here(stand_in: StandIn) -> None:
    orphan = await asyncio.start_unix_server(
        lambda r, w: None, path=str(stand_in.socket_dir / "wgtnolink0.sock")
    )
    try:
        (stand_in.socket_dir / "notasocket.sock").write_text("")
        control = UapiControl(stand_in.socket_dir)
        assert await control.list_interfaces() == ["lo"]
        with pytest.raises(NoSuchInterface):
            await control.get_device("wgtnolink0")
    finally:
        orphan.close()
        await orphan.wait_closed()


async def test_missing_socket_dir_lists_nothing(tmp_path: Path) -> None:
    assert await UapiControl(tmp_path / "absent").list_interfaces() == []


async def test_link_without_socket_is_no_such_interface(tmp_path: Path) -> None:
    with pytest.raises(NoSuchInterface) as caught:
        await UapiControl(tmp_path).get_device("lo")
    assert caught.value.interface == "lo"


async def test_permission_error_becomes_permission_denied(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root ignores socket modes, so the refusal the OS would give is injected.
    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(asyncio, "open_unix_connection", refuse)
    with pytest.raises(WireGuardPermissionDenied) as caught:
        await UapiControl(stand_in.socket_dir).get_device("lo")
    assert caught.value.interface == "lo"


async def test_silent_device_times_out(tmp_path: Path) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_unix_server(hang, path=str(tmp_path / "lo.sock"))
    try:
        with pytest.raises(WireGuardError, match="no answer") as caught:
            await UapiControl(tmp_path, timeout=0.2).get_device("lo")
        assert not isinstance(caught.value, NoSuchInterface)
    finally:
        server.close()
        await server.wait_closed()
