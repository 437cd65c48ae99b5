"""WireGuard control of Linux kernel devices over generic netlink (pyroute2's AsyncWireGuard).

pyroute2's ``AsyncWireGuard.set`` takes a loosely typed peer dict; here the
messages are built by pure functions from our own data (``set_peer_message``
...) so the incremental semantics are visible and tested without a kernel:

* adding or updating a peer sets ``WGPEER_F_REPLACE_ALLOWEDIPS`` and nothing else,
* removal sets ``WGPEER_F_REMOVE_ME``,
* ``set_allowed_ips`` adds ``WGPEER_F_UPDATE_ONLY`` so a missing peer is never created,
* no message ever carries ``WGDEVICE_F_REPLACE_PEERS``.

``NetlinkControl`` only sends them and translates ``NetlinkError`` into our tree.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from typing import Any

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    AsyncWireGuard,
    wgmsg,
)

from wg_autopeer.errors import (
    DeviceRefused,
    NoSuchInterface,
    WireGuardError,
    WireGuardPermissionDenied,
)
from wg_autopeer.wireguard.base import (
    DeviceState,
    Endpoint,
    IPNetwork,
    PeerConfig,
    PeerState,
    WireGuardControl,
    is_valid_key,
)
from wg_autopeer.wireguard.uapi import is_valid_ifname

# A pyroute2 message object; the library is untyped.
Message = Any

MODULE_MISSING = "kernel WireGuard module not available"


# --- building ----------------------------------------------------------------------------------


def _checked_key(interface: str, key: str) -> str:
    if not is_valid_key(key):
        raise DeviceRefused(interface, f"not a WireGuard key: {key[:8]!r}…")
    return key


def _allowed_ips_attr(interface: str, allowed_ips: Iterable[IPNetwork]) -> list[dict[str, Any]]:
    entries = []
    for net in allowed_ips:
        try:
            parsed = ip_network(str(net))
        except ValueError as exc:
            raise DeviceRefused(interface, f"bad allowed IP {str(net)[:50]!r}") from exc
        family = socket.AF_INET if parsed.version == 4 else socket.AF_INET6
        entries.append(
            {
                "attrs": [
                    ["WGALLOWEDIP_A_FAMILY", family],
                    ["WGALLOWEDIP_A_IPADDR", parsed.network_address.packed],
                    ["WGALLOWEDIP_A_CIDR_MASK", parsed.prefixlen],
                ]
            }
        )
    return entries


def _endpoint_attr(interface: str, endpoint: Endpoint) -> dict[str, Any]:
    try:
        address = ip_address(str(endpoint.address))
    except ValueError as exc:
        raise DeviceRefused(interface, "bad endpoint address") from exc
    if not 0 < int(endpoint.port) <= 0xFFFF:
        raise DeviceRefused(interface, f"endpoint port {endpoint.port} out of range")
    if address.version == 4:
        return {"addr": str(address), "port": int(endpoint.port)}
    return {"addr": str(address), "port": int(endpoint.port), "flowinfo": 0, "scope_id": 0}


def _checked_ifname(interface: str) -> str:
    if not is_valid_ifname(interface):
        raise NoSuchInterface(interface, "not a valid interface name")
    return interface


def _set_device_message(interface: str, peer_attrs: list[list[Any]]) -> Message:
    _checked_ifname(interface)
    msg = wgmsg()
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"].append(["WGDEVICE_A_IFNAME", interface])
    msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": peer_attrs}]])
    return msg


def set_peer_message(interface: str, peer: PeerConfig) -> Message:
    """A SET_DEVICE message adding ``peer`` or updating it in place."""
    attrs: list[list[Any]] = [
        ["WGPEER_A_PUBLIC_KEY", _checked_key(interface, peer.public_key)],
        ["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS],
    ]
    if peer.endpoint is not None:
        attrs.append(["WGPEER_A_ENDPOINT", _endpoint_attr(interface, peer.endpoint)])
    keepalive = peer.persistent_keepalive or 0
    if not 0 <= keepalive <= 0xFFFF:
        raise DeviceRefused(interface, f"persistent keepalive {keepalive} out of range")
    attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", keepalive])
    attrs.append(["WGPEER_A_ALLOWEDIPS", _allowed_ips_attr(interface, peer.allowed_ips)])
    return _set_device_message(interface, attrs)


def remove_peer_message(interface: str, public_key: str) -> Message:
    """A SET_DEVICE message removing one peer."""
    return _set_device_message(
        interface,
        [
            ["WGPEER_A_PUBLIC_KEY", _checked_key(interface, public_key)],
            ["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME],
        ],
    )


def set_allowed_ips_message(
    interface: str, public_key: str, allowed_ips: Sequence[IPNetwork]
) -> Message:
    """A SET_DEVICE message replacing the allowed IPs of one existing peer."""
    return _set_device_message(
        interface,
        [
            ["WGPEER_A_PUBLIC_KEY", _checked_key(interface, public_key)],
            ["WGPEER_A_FLAGS", WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS],
            ["WGPEER_A_ALLOWEDIPS", _allowed_ips_attr(interface, allowed_ips)],
        ],
    )


def get_device_message(interface: str) -> Message:
    """A GET_DEVICE dump request for one device."""
    _checked_ifname(interface)
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"].append(["WGDEVICE_A_IFNAME", interface])
    return msg


# --- parsing -----------------------------------------------------------------------------------


def _key_text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


@dataclass
class _PeerBuilder:
    public_key: str
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoint: Endpoint | None = None
    handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0


def _merge_peer(builder: _PeerBuilder, peer: Message) -> None:
    endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
    if endpoint is not None and endpoint.get("addr"):
        builder.endpoint = Endpoint(ip_address(endpoint["addr"]), int(endpoint["port"]))
    handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    if handshake is not None and (handshake["tv_sec"] or handshake["tv_nsec"]):
        builder.handshake = handshake["tv_sec"] + handshake["tv_nsec"] / 1e9
    for attr, name in (("WGPEER_A_RX_BYTES", "rx_bytes"), ("WGPEER_A_TX_BYTES", "tx_bytes")):
        value = peer.get_attr(attr)
        if value is not None:
            setattr(builder, name, int(value))
    keepalive = peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
    if keepalive is not None:
        builder.keepalive = int(keepalive)
    for allowed in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ():
        if "addr" in allowed:
            builder.allowed_ips.append(ip_network(allowed["addr"], strict=False))


def parse_device_messages(
    interface: str, messages: Iterable[Message], *, with_private_key: bool = False
) -> DeviceState:
    """Fold the messages of a GET_DEVICE dump into one DeviceState.

    The kernel splits a large device over several messages, and may split one
    peer's allowed IPs too: a continued peer starts the next message again with
    the same public key, so consecutive entries with one key are merged.
    """
    private_key: str | None = None
    public_key: str | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    peers: list[_PeerBuilder] = []
    for msg in messages:
        if (value := msg.get_attr("WGDEVICE_A_PRIVATE_KEY")) is not None:
            private_key = _key_text(value)
        if (value := msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) is not None:
            public_key = _key_text(value)
        if (value := msg.get_attr("WGDEVICE_A_LISTEN_PORT")) is not None:
            listen_port = int(value) or None
        if (value := msg.get_attr("WGDEVICE_A_FWMARK")) is not None:
            fwmark = int(value) or None
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _key_text(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            if not peers or peers[-1].public_key != key:
                peers.append(_PeerBuilder(key))
            _merge_peer(peers[-1], peer)
    # An all-zero key is how the kernel says "none set".
    zero = base64.b64encode(bytes(32)).decode("ascii")
    return DeviceState(
        name=interface,
        public_key=public_key if public_key not in (None, zero) else None,
        listen_port=listen_port,
        peers=tuple(
            PeerState(
                public_key=p.public_key,
                allowed_ips=tuple(p.allowed_ips),
                endpoint=p.endpoint,
                latest_handshake=p.handshake,
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
                persistent_keepalive=p.keepalive or None,
            )
            for p in peers
        ),
        fwmark=fwmark,
        private_key=private_key if with_private_key and private_key != zero else None,
    )


def translate_error(interface: str, exc: NetlinkError | OSError) -> WireGuardError:
    """Map a netlink or socket error to our tree, with a readable reason."""
    code = getattr(exc, "code", None) or getattr(exc, "errno", None) or 0
    reason = os.strerror(code) if code else str(exc)
    if code in (errno.ENODEV, errno.ENXIO):
        return NoSuchInterface(interface, f"no such WireGuard interface ({reason})")
    if code == errno.ENOENT:
        # Only the genl family lookup answers ENOENT: the module is not loaded.
        return NoSuchInterface(interface, MODULE_MISSING)
    if code == errno.EOPNOTSUPP:
        return NoSuchInterface(interface, f"not a WireGuard interface ({reason})")
    if code in (errno.EPERM, errno.EACCES):
        return WireGuardPermissionDenied(interface, f"needs CAP_NET_ADMIN ({reason})")
    return DeviceRefused(interface, f"kernel refused the request: {reason} (errno {code})")


# --- I/O ---------------------------------------------------------------------------------------


class NetlinkControl(WireGuardControl):
    """Drives kernel WireGuard devices of the namespace the first call runs in."""

    def __init__(self) -> None:
        self._wg: Any = None
        self._lock = asyncio.Lock()

    async def _socket(self, interface: str) -> Any:
        async with self._lock:
            if self._wg is None:
                wg = AsyncWireGuard()
                try:
                    await wg.setup_endpoint()
                except (NetlinkError, OSError) as exc:
                    wg.close()
                    raise translate_error(interface, exc) from exc
                self._wg = wg
            return self._wg

    async def _request(self, interface: str, msg: Message, flags: int) -> list[Message]:
        wg = await self._socket(interface)
        try:
            return [m async for m in await wg.nlm_request(msg, msg_type=wg.prid, msg_flags=flags)]
        except (NetlinkError, OSError) as exc:
            raise translate_error(interface, exc) from exc

    async def list_interfaces(self) -> list[str]:
        try:
            async with AsyncIPRoute() as ipr:
                names = [
                    link.get("ifname")
                    async for link in await ipr.get_links()
                    if link.get(("linkinfo", "kind")) == "wireguard"
                ]
        except (NetlinkError, OSError) as exc:
            raise translate_error("*", exc) from exc
        return sorted(names)

    async def get_device(self, interface: str, *, with_private_key: bool = False) -> DeviceState:
        messages = await self._request(
            interface, get_device_message(interface), NLM_F_REQUEST | NLM_F_DUMP
        )
        return parse_device_messages(interface, messages, with_private_key=with_private_key)

    async def _set(self, interface: str, msg: Message) -> None:
        await self._request(interface, msg, NLM_F_REQUEST | NLM_F_ACK)

    async def set_peer(self, interface: str, peer: PeerConfig) -> None:
        await self._set(interface, set_peer_message(interface, peer))

    async def remove_peer(self, interface: str, public_key: str) -> None:
        await self._set(interface, remove_peer_message(interface, public_key))

    async def set_allowed_ips(
        self, interface: str, public_key: str, allowed_ips: tuple[IPNetwork, ...]
    ) -> None:
        msg = set_allowed_ips_message(interface, public_key, allowed_ips)
        # UPDATE_ONLY makes a missing peer a silent no-op; callers (and the fake) expect an error.
        if (await self.get_device(interface)).peer(public_key) is None:
            raise NoSuchInterface(interface, f"no peer {public_key[:8]}… on this device")
        await self._set(interface, msg)

    async def close(self) -> None:
        async with self._lock:
            if self._wg is not None:
                self._wg.close()
                self._wg = None
