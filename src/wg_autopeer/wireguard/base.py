"""WireGuard control: the data it speaks and the one interface every backend implements.

A backend changes one peer at a time. No operation replaces the peer set of a
device, so peers that wg-autopeer does not own are never disturbed, and
re-applying an identical peer keeps its session.
"""

from __future__ import annotations

import abc
import base64
import binascii
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

KEY_LEN = 32


def is_valid_key(key: str) -> bool:
    """True when ``key`` is standard base64 of exactly 32 bytes (a WireGuard key)."""
    if len(key) != 44:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == KEY_LEN
    except (binascii.Error, ValueError):
        return False


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """A UDP endpoint: address and port."""

    address: IPAddress
    port: int

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class PeerConfig:
    """What a peer should look like after ``set_peer``."""

    public_key: str
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None


@dataclass(frozen=True)
class PeerState:
    """A peer as the device reports it."""

    public_key: str
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: Endpoint | None = None
    # Seconds since the epoch of the latest completed handshake; None when there was none.
    latest_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int | None = None

    def as_config(self) -> PeerConfig:
        return PeerConfig(
            public_key=self.public_key,
            allowed_ips=self.allowed_ips,
            endpoint=self.endpoint,
            persistent_keepalive=self.persistent_keepalive,
        )


@dataclass(frozen=True)
class DeviceState:
    """A WireGuard device. ``private_key`` is only filled when asked for, and never printed."""

    name: str
    public_key: str | None
    listen_port: int | None
    peers: tuple[PeerState, ...] = ()
    fwmark: int | None = None
    private_key: str | None = field(default=None, repr=False)

    def peer(self, public_key: str) -> PeerState | None:
        for peer in self.peers:
            if peer.public_key == public_key:
                return peer
        return None


class WireGuardControl(abc.ABC):
    """Incremental control of the WireGuard devices of the current network namespace.

    Every method raises ``NoSuchInterface``, ``WireGuardPermissionDenied`` or
    ``DeviceRefused`` (all ``WireGuardError``) naming the interface.
    """

    @abc.abstractmethod
    async def list_interfaces(self) -> list[str]:
        """Names of the WireGuard devices this backend can drive in this namespace."""

    @abc.abstractmethod
    async def get_device(self, interface: str, *, with_private_key: bool = False) -> DeviceState:
        """Read the device and all its peers."""

    @abc.abstractmethod
    async def set_peer(self, interface: str, peer: PeerConfig) -> None:
        """Add ``peer`` or update it in place; its allowed IPs become ``peer.allowed_ips``."""

    @abc.abstractmethod
    async def remove_peer(self, interface: str, public_key: str) -> None:
        """Remove one peer. Removing a peer that is not there is not an error."""

    @abc.abstractmethod
    async def set_allowed_ips(
        self, interface: str, public_key: str, allowed_ips: tuple[IPNetwork, ...]
    ) -> None:
        """Replace the allowed IPs of one existing peer, touching nothing else."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release sockets held by the backend."""
