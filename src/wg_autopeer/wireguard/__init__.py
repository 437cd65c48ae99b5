"""WireGuard control: one interface (``WireGuardControl``), one backend per kind of device.

``open_control()`` is the entry point: it returns an ``AutoControl`` that picks,
per interface, the userspace UAPI backend when a socket for that name exists and
its link is in this network namespace, and kernel netlink otherwise.

Importing this package loads no backend: the data types come from ``base`` (a leaf
module), and the netlink backend (pyroute2) is imported on first use, through
``open_control`` or the module ``__getattr__`` below (PEP 562).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wg_autopeer.errors import NoSuchInterface
from wg_autopeer.wireguard.base import (
    DeviceState,
    Endpoint,
    IPAddress,
    IPNetwork,
    PeerConfig,
    PeerState,
    WireGuardControl,
    is_valid_key,
)
from wg_autopeer.wireguard.fake import FakeWireGuard
from wg_autopeer.wireguard.uapi import (
    DEFAULT_SOCKET_DIR,
    UapiControl,
    has_uapi_socket,
    link_exists,
    public_key_of,
)

if TYPE_CHECKING:
    from wg_autopeer.wireguard.netlink import NetlinkControl

__all__ = [
    "DEFAULT_SOCKET_DIR",
    "AutoControl",
    "DeviceState",
    "Endpoint",
    "FakeWireGuard",
    "IPAddress",
    "IPNetwork",
    "NetlinkControl",
    "PeerConfig",
    "PeerState",
    "UapiControl",
    "WireGuardControl",
    "is_valid_key",
    "is_wireguard_link",
    "open_control",
    "public_key_of",
]


def __getattr__(name: str) -> Any:
    # pyroute2 costs tens of MiB and a few hundred ms: loaded only by who uses it.
    if name == "NetlinkControl":
        from wg_autopeer.wireguard.netlink import NetlinkControl

        return NetlinkControl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_wireguard_link(
    name: str, kind: str | None = None, *, socket_dir: Path | str = DEFAULT_SOCKET_DIR
) -> bool:
    """True when the link ``name`` of this namespace is a WireGuard device.

    ``kind`` is the link kind netlink reports (IFLA_INFO_KIND), when the caller
    has it: ``"wireguard"`` is a kernel device. A userspace device is a plain
    TUN link, recognised by its UAPI socket. Cheap and synchronous (a stat and
    one ioctl), so a network snapshot can call it for every link.
    """
    if kind == "wireguard":
        return True
    return has_uapi_socket(name, Path(socket_dir))


class AutoControl(WireGuardControl):
    """Routes each call to the UAPI or the netlink backend, decided per interface per call."""

    def __init__(
        self,
        uapi: UapiControl,
        netlink: WireGuardControl,
        *,
        link_exists: Callable[[str], bool] = link_exists,
    ) -> None:
        self.uapi = uapi
        self.netlink = netlink
        self._link_exists = link_exists

    def backend_for(self, interface: str) -> WireGuardControl:
        """The backend for ``interface`` now; asked every call, as a device may come back as the
        other kind. A link that does not exist at all is ``NoSuchInterface`` here, rather
        than whatever the netlink backend would say about it (e.g. "module not available")."""
        if self.uapi.has_device(interface):
            return self.uapi
        if not self._link_exists(interface):
            raise NoSuchInterface(interface, "no such interface in this network namespace")
        return self.netlink

    async def list_interfaces(self) -> list[str]:
        names = set(await self.uapi.list_interfaces())
        names.update(await self.netlink.list_interfaces())
        return sorted(names)

    async def get_device(self, interface: str, *, with_private_key: bool = False) -> DeviceState:
        backend = self.backend_for(interface)
        return await backend.get_device(interface, with_private_key=with_private_key)

    async def set_peer(self, interface: str, peer: PeerConfig) -> None:
        await self.backend_for(interface).set_peer(interface, peer)

    async def remove_peer(self, interface: str, public_key: str) -> None:
        await self.backend_for(interface).remove_peer(interface, public_key)

    async def set_allowed_ips(
        self, interface: str, public_key: str, allowed_ips: tuple[IPNetwork, ...]
    ) -> None:
        await self.backend_for(interface).set_allowed_ips(interface, public_key, allowed_ips)

    async def close(self) -> None:
        await self.uapi.close()
        await self.netlink.close()


def open_control(socket_dir: Path | str = DEFAULT_SOCKET_DIR) -> AutoControl:
    """The WireGuard control for this host: userspace devices by socket, kernel ones by netlink.

    Sockets are opened lazily, in the network namespace of the first call.
    """
    from wg_autopeer.wireguard.netlink import NetlinkControl

    return AutoControl(UapiControl(socket_dir), NetlinkControl())
