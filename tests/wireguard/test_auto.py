"""AutoControl: the backend is chosen per interface, and listings merge both backends."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wg_autopeer.errors import NoSuchInterface
from wg_autopeer.wireguard import (
    AutoControl,
    FakeWireGuard,
    PeerConfig,
    UapiControl,
    is_wireguard_link,
    open_control,
)

KEY = base64.b64encode(bytes(32)).decode()


@pytest.fixture
async def lo_socket(tmp_path: Path) -> AsyncIterator[Path]:
    """A socket folder with a stand-in UAPI socket for ``lo``, the one link every netns has."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n\n")
        writer.write(b"listen_port=7\nerrno=0\n\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, path=str(tmp_path / "lo.sock"))
    try:
        yield tmp_path
    finally:
        server.close()
        await server.wait_closed()


async def test_interface_with_socket_goes_to_uapi_others_to_netlink(lo_socket: Path) -> None:
    kernel = FakeWireGuard()
    kernel.add_device("wg0", KEY, listen_port=51820)
    control = AutoControl(UapiControl(lo_socket), kernel, link_exists=lambda name: True)
    assert isinstance(control.backend_for("lo"), UapiControl)
    assert control.backend_for("wg0") is kernel
    assert (await control.get_device("lo")).listen_port == 7
    assert (await control.get_device("wg0")).listen_port == 51820
    await control.set_peer("wg0", PeerConfig(KEY))
    assert kernel.writes == [("set_peer", "wg0", KEY)]
    assert await control.list_interfaces() == ["lo", "wg0"]


async def test_missing_link_is_no_such_interface_not_a_netlink_error(tmp_path: Path) -> None:
    control = AutoControl(UapiControl(tmp_path), FakeWireGuard())
    with pytest.raises(NoSuchInterface) as caught:
        await control.get_device("wgtnolink0")
    assert caught.value.interface == "wgtnolink0"


async def test_socket_without_link_here_is_not_uapi(tmp_path: Path) -> None:
    (tmp_path / "lo.sock").write_text("")  # a file, not a socket
    control = AutoControl(UapiControl(tmp_path), FakeWireGuard())
    assert control.backend_for("lo") is control.netlink


async def test_is_wireguard_link(lo_socket: Path) -> None:
    assert is_wireguard_link("anything", "wireguard")
    assert is_wireguard_link("lo", "tun", socket_dir=lo_socket)
    assert not is_wireguard_link("lo", None, socket_dir=lo_socket / "elsewhere")
    assert not is_wireguard_link("wgtnolink0", None, socket_dir=lo_socket)


async def test_open_control_builds_both_backends(tmp_path: Path) -> None:
    control = open_control(socket_dir=tmp_path)
    try:
        assert control.uapi.socket_dir == tmp_path
    finally:
        await control.close()
