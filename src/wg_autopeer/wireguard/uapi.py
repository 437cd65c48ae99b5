"""WireGuard control over the cross-platform userspace API (wireguard-go, boringtun).

The protocol is the ``key=value`` text of https://www.wireguard.com/xplatform/
spoken over the unix socket ``<socket_dir>/<ifname>.sock``. It is written by hand
because no library does incremental changes: ``wg setconf`` and the bindings
built on wireguard-tools always send ``replace_peers=true``, which tears down the
sessions of every peer. Here every change names one peer and never replaces the
peer set, so re-applying an identical peer keeps its handshake and counters.

The socket folder is shared by all network namespaces while the interface lives
in one of them, so a socket only counts when a link of that name exists in the
namespace of the caller.

The request building (``set_peer_request`` ...) and the answer parsing
(``parse_device``) are pure functions; ``UapiControl`` only adds the socket.
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
from pathlib import Path

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

DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
# A device that does not answer within this time is treated as broken, not waited for.
DEFAULT_TIMEOUT = 5.0
IFNAMSIZ = 16

Line = tuple[str, str]


def is_valid_ifname(name: str) -> bool:
    """True for a name Linux accepts for a link, which also keeps it inside the socket folder."""
    if not 0 < len(name) < IFNAMSIZ or name in (".", ".."):
        return False
    return not any(c in "/:\0" or c.isspace() for c in name)


def link_exists(name: str) -> bool:
    """True when a link called ``name`` exists in the network namespace of the calling thread.

    ``if_nametoindex`` asks the kernel through a socket of the current namespace,
    unlike ``/sys/class/net`` which shows the namespace sysfs was mounted in.
    """
    if not is_valid_ifname(name):
        return False
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def socket_path(socket_dir: Path, interface: str) -> Path:
    return socket_dir / f"{interface}.sock"


def has_uapi_socket(interface: str, socket_dir: Path = DEFAULT_SOCKET_DIR) -> bool:
    """True when a UAPI socket for ``interface`` exists and its link is in this namespace."""
    if not is_valid_ifname(interface):
        return False
    try:
        is_socket = socket_path(socket_dir, interface).is_socket()
    except OSError:
        return False
    return is_socket and link_exists(interface)


# --- serialising -------------------------------------------------------------------------------


def key_to_hex(interface: str, key: str) -> str:
    """Base64 key → the lowercase hex the UAPI speaks; refuses anything but a 32-byte key."""
    if not is_valid_key(key):
        raise DeviceRefused(interface, f"not a WireGuard key: {key[:8]!r}…")
    return base64.b64decode(key).hex()


def key_from_hex(value: str) -> str:
    raw = bytes.fromhex(value)
    if len(raw) != 32:
        raise ValueError(f"key of {len(raw)} bytes")
    return base64.b64encode(raw).decode("ascii")


def _check_u16(interface: str, what: str, value: int) -> int:
    if not 0 <= value <= 0xFFFF:
        raise DeviceRefused(interface, f"{what} {value} out of range 0-65535")
    return value


def _peer_header(interface: str, public_key: str) -> list[Line]:
    return [("public_key", key_to_hex(interface, public_key))]


def _allowed_ip_lines(interface: str, allowed_ips: Iterable[IPNetwork]) -> list[Line]:
    lines = [("replace_allowed_ips", "true")]
    for net in allowed_ips:
        # Re-parsing turns whatever the caller smuggled in into a plain network or an error.
        try:
            lines.append(("allowed_ip", str(ip_network(str(net)))))
        except ValueError as exc:
            raise DeviceRefused(interface, f"bad allowed IP {str(net)[:50]!r}") from exc
    return lines


def _endpoint_value(interface: str, endpoint: Endpoint) -> str:
    try:
        address = ip_address(str(endpoint.address))
    except ValueError as exc:
        raise DeviceRefused(interface, "bad endpoint address") from exc
    return str(Endpoint(address, _check_u16(interface, "endpoint port", int(endpoint.port))))


def set_peer_request(interface: str, peer: PeerConfig) -> list[Line]:
    """The ``set=1`` lines that add ``peer`` or update it in place (never ``replace_peers``)."""
    lines = _peer_header(interface, peer.public_key)
    if peer.endpoint is not None:
        lines.append(("endpoint", _endpoint_value(interface, peer.endpoint)))
    keepalive = _check_u16(interface, "persistent keepalive", peer.persistent_keepalive or 0)
    lines.append(("persistent_keepalive_interval", str(keepalive)))
    lines.extend(_allowed_ip_lines(interface, peer.allowed_ips))
    return lines


def remove_peer_request(interface: str, public_key: str) -> list[Line]:
    """The ``set=1`` lines that remove one peer."""
    return [*_peer_header(interface, public_key), ("remove", "true")]


def set_allowed_ips_request(
    interface: str, public_key: str, allowed_ips: Sequence[IPNetwork]
) -> list[Line]:
    """The ``set=1`` lines replacing one peer's allowed IPs; ``update_only`` never creates it."""
    return [
        *_peer_header(interface, public_key),
        ("update_only", "true"),
        *_allowed_ip_lines(interface, allowed_ips),
    ]


def serialise(interface: str, operation: str, lines: Sequence[Line]) -> bytes:
    """Frame a request; refuses any key or value that could break out of its line."""
    out = [f"{operation}=1"]
    for key, value in lines:
        if not key.isidentifier() or any(c in value for c in "\n\r\0") or "=" in key:
            raise DeviceRefused(interface, f"refusing to send line {key[:30]!r}")
        out.append(f"{key}={value}")
    return ("\n".join(out) + "\n\n").encode("ascii", errors="strict")


# --- parsing -----------------------------------------------------------------------------------


def reason_for_errno(code: int) -> str:
    """A readable reason for the ``errno`` a userspace device answers (it sends it negated)."""
    code = abs(code)
    readable = {
        errno.EINVAL: "invalid value (bad key, address, port or allowed IP)",
        errno.EPROTO: "protocol error (unknown key or operation)",
        errno.EADDRINUSE: "listen port already in use",
        errno.EIO: "I/O error inside the device",
        errno.ENOANO: "unknown error inside the device",
    }
    return f"device refused the change: {readable.get(code, os.strerror(code))} (errno {code})"


def parse_endpoint(value: str) -> Endpoint:
    """``192.0.2.1:51820`` or ``[2001:db8::1]:51820``."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"endpoint without port: {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # A scope (``fe80::1%eth0``) has no place in ip_address; the port still identifies the peer.
    host = host.split("%", 1)[0]
    return Endpoint(ip_address(host), int(port))


@dataclass
class _PeerBuilder:
    public_key: str
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoint: Endpoint | None = None
    handshake_sec: int = 0
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0

    def build(self) -> PeerState:
        handshake = None
        if self.handshake_sec or self.handshake_nsec:
            handshake = self.handshake_sec + self.handshake_nsec / 1e9
        return PeerState(
            public_key=self.public_key,
            allowed_ips=tuple(self.allowed_ips),
            endpoint=self.endpoint,
            latest_handshake=handshake,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            persistent_keepalive=self.keepalive or None,
        )


def parse_device(
    interface: str, lines: Iterable[str], *, with_private_key: bool = False
) -> DeviceState:
    """Turn the lines of a ``get=1`` answer (without the final ``errno``) into a DeviceState.

    Unknown keys are skipped so newer devices keep working. The UAPI reports
    no public key, so it is derived from the private key.
    """
    private_key: str | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    peers: list[_PeerBuilder] = []
    for line in lines:
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise DeviceRefused(interface, f"malformed line in answer: {line[:40]!r}")
        try:
            if key == "public_key":
                peers.append(_PeerBuilder(key_from_hex(value)))
            elif not peers:
                if key == "private_key":
                    private_key = key_from_hex(value)
                elif key == "listen_port":
                    listen_port = int(value) or None
                elif key == "fwmark":
                    fwmark = int(value) or None
            else:
                peer = peers[-1]
                if key == "endpoint":
                    peer.endpoint = parse_endpoint(value)
                elif key == "allowed_ip":
                    peer.allowed_ips.append(ip_network(value, strict=False))
                elif key == "last_handshake_time_sec":
                    peer.handshake_sec = int(value)
                elif key == "last_handshake_time_nsec":
                    peer.handshake_nsec = int(value)
                elif key == "rx_bytes":
                    peer.rx_bytes = int(value)
                elif key == "tx_bytes":
                    peer.tx_bytes = int(value)
                elif key == "persistent_keepalive_interval":
                    peer.keepalive = int(value)
        except ValueError as exc:
            # Never echo the value: it may be the private key.
            raise DeviceRefused(interface, f"unreadable {key!r} in answer") from exc
    return DeviceState(
        name=interface,
        public_key=public_key_of(private_key) if private_key else None,
        listen_port=listen_port,
        peers=tuple(p.build() for p in peers),
        fwmark=fwmark,
        private_key=private_key if with_private_key else None,
    )


def public_key_of(private_key: str) -> str:
    """The base64 public key of a base64 private key (X25519, as WireGuard clamps it)."""
    # PyNaCl (libsodium) rather than cryptography: the same curve operation for about
    # 2 MiB of the agent's memory instead of 9.6 (cryptography links a second OpenSSL).
    # Imported here: only a read with the private key needs it, not every importer.
    from nacl.bindings import crypto_scalarmult_base

    return base64.b64encode(crypto_scalarmult_base(base64.b64decode(private_key))).decode("ascii")


# --- I/O ---------------------------------------------------------------------------------------


class UapiControl(WireGuardControl):
    """Drives userspace WireGuard devices through their UAPI sockets.

    Each call opens its own short connection, so calls may run concurrently and
    a restarted device is picked up without reconnect logic.
    """

    def __init__(
        self, socket_dir: Path | str = DEFAULT_SOCKET_DIR, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.socket_dir = Path(socket_dir)
        self.timeout = timeout

    def has_device(self, interface: str) -> bool:
        """True when this backend can drive ``interface`` in the current namespace."""
        return has_uapi_socket(interface, self.socket_dir)

    async def list_interfaces(self) -> list[str]:
        try:
            entries = list(self.socket_dir.iterdir())
        except FileNotFoundError:
            return []
        except PermissionError as exc:
            raise WireGuardPermissionDenied(str(self.socket_dir), "cannot list sockets") from exc
        names = (e.name.removesuffix(".sock") for e in entries if e.name.endswith(".sock"))
        return sorted(n for n in names if self.has_device(n))

    async def _exchange(self, interface: str, request: bytes) -> list[str]:
        """Send one request, return the answer's lines up to (not including) ``errno``."""
        if not is_valid_ifname(interface) or not link_exists(interface):
            raise NoSuchInterface(interface, "no such link in this network namespace")
        path = socket_path(self.socket_dir, interface)
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    writer.write(request)
                    await writer.drain()
                    return await self._read_answer(interface, reader)
                finally:
                    writer.close()
                    # The device may already have hung up; that is not our error.
                    await asyncio.gather(writer.wait_closed(), return_exceptions=True)
        except TimeoutError as exc:
            raise WireGuardError(interface, f"no answer on {path} within {self.timeout}s") from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoSuchInterface(interface, f"no userspace device behind {path}") from exc
        except PermissionError as exc:
            raise WireGuardPermissionDenied(interface, f"cannot open {path}") from exc
        except OSError as exc:
            raise DeviceRefused(interface, f"socket error: {exc.strerror or exc}") from exc

    async def _read_answer(self, interface: str, reader: asyncio.StreamReader) -> list[str]:
        lines: list[str] = []
        while True:
            raw = await reader.readline()
            if not raw:
                raise DeviceRefused(interface, "device closed the socket before answering")
            line = raw.decode("ascii", errors="replace").rstrip("\n")
            if line.startswith("errno="):
                try:
                    code = int(line.removeprefix("errno="))
                except ValueError:
                    raise DeviceRefused(interface, "unreadable errno in answer") from None
                if code:
                    raise DeviceRefused(interface, reason_for_errno(code))
                return lines
            lines.append(line)

    async def _set(self, interface: str, lines: Sequence[Line]) -> None:
        await self._exchange(interface, serialise(interface, "set", lines))

    async def get_device(self, interface: str, *, with_private_key: bool = False) -> DeviceState:
        lines = await self._exchange(interface, b"get=1\n\n")
        return parse_device(interface, lines, with_private_key=with_private_key)

    async def set_peer(self, interface: str, peer: PeerConfig) -> None:
        await self._set(interface, set_peer_request(interface, peer))

    async def remove_peer(self, interface: str, public_key: str) -> None:
        await self._set(interface, remove_peer_request(interface, public_key))

    async def set_allowed_ips(
        self, interface: str, public_key: str, allowed_ips: tuple[IPNetwork, ...]
    ) -> None:
        request = set_allowed_ips_request(interface, public_key, allowed_ips)
        # update_only makes a missing peer a silent no-op; callers (and the fake) expect an error.
        device = await self.get_device(interface)
        if device.peer(public_key) is None:
            raise NoSuchInterface(interface, f"no peer {public_key[:8]}… on this device")
        await self._set(interface, request)
