"""An in-memory WireGuard backend for unit tests of the server and the agent.

It behaves like a device: peers are kept in insertion order, ``set_peer`` on an
existing key updates it in place and keeps its handshake and counters, and an
allowed IP moves to the last peer that claims it, as WireGuard does.
"""

from __future__ import annotations

import dataclasses

from wg_autopeer.errors import NoSuchInterface
from wg_autopeer.wireguard.base import (
    DeviceState,
    IPNetwork,
    PeerConfig,
    PeerState,
    WireGuardControl,
)


class FakeWireGuard(WireGuardControl):
    def __init__(self) -> None:
        self.devices: dict[str, DeviceState] = {}
        # Every change call, in order: ("set_peer" | "remove_peer" | "set_allowed_ips", iface, key).
        self.writes: list[tuple[str, str, str]] = []

    def add_device(
        self,
        name: str,
        public_key: str,
        listen_port: int | None = 51820,
        peers: tuple[PeerState, ...] = (),
        private_key: str | None = None,
    ) -> None:
        self.devices[name] = DeviceState(name, public_key, listen_port, peers, None, private_key)

    def update_peer(self, interface: str, public_key: str, **changes: object) -> None:
        """Test hook: change what the device reports for a peer (handshake, endpoint, ...)."""
        device = self._device(interface)
        peers = tuple(
            dataclasses.replace(p, **changes) if p.public_key == public_key else p  # type: ignore[arg-type]
            for p in device.peers
        )
        self.devices[interface] = dataclasses.replace(device, peers=peers)

    def _device(self, interface: str) -> DeviceState:
        try:
            return self.devices[interface]
        except KeyError:
            raise NoSuchInterface(interface, "no such WireGuard interface") from None

    async def list_interfaces(self) -> list[str]:
        return sorted(self.devices)

    async def get_device(self, interface: str, *, with_private_key: bool = False) -> DeviceState:
        device = self._device(interface)
        return device if with_private_key else dataclasses.replace(device, private_key=None)

    def _take_ips(
        self, peers: list[PeerState], owner: str, allowed_ips: tuple[IPNetwork, ...]
    ) -> list[PeerState]:
        claimed = set(allowed_ips)
        return [
            p
            if p.public_key == owner
            else dataclasses.replace(
                p, allowed_ips=tuple(ip for ip in p.allowed_ips if ip not in claimed)
            )
            for p in peers
        ]

    async def set_peer(self, interface: str, peer: PeerConfig) -> None:
        device = self._device(interface)
        self.writes.append(("set_peer", interface, peer.public_key))
        peers = self._take_ips(list(device.peers), peer.public_key, peer.allowed_ips)
        for i, old in enumerate(peers):
            if old.public_key == peer.public_key:
                peers[i] = dataclasses.replace(
                    old,
                    allowed_ips=peer.allowed_ips,
                    endpoint=peer.endpoint or old.endpoint,
                    persistent_keepalive=peer.persistent_keepalive,
                )
                break
        else:
            peers.append(
                PeerState(
                    public_key=peer.public_key,
                    allowed_ips=peer.allowed_ips,
                    endpoint=peer.endpoint,
                    persistent_keepalive=peer.persistent_keepalive,
                )
            )
        self.devices[interface] = dataclasses.replace(device, peers=tuple(peers))

    async def remove_peer(self, interface: str, public_key: str) -> None:
        device = self._device(interface)
        self.writes.append(("remove_peer", interface, public_key))
        peers = tuple(p for p in device.peers if p.public_key != public_key)
        self.devices[interface] = dataclasses.replace(device, peers=peers)

    async def set_allowed_ips(
        self, interface: str, public_key: str, allowed_ips: tuple[IPNetwork, ...]
    ) -> None:
        device = self._device(interface)
        if device.peer(public_key) is None:
            raise NoSuchInterface(interface, f"no peer {public_key[:8]}… on this device")
        self.writes.append(("set_allowed_ips", interface, public_key))
        peers = self._take_ips(list(device.peers), public_key, allowed_ips)
        peers = [
            dataclasses.replace(p, allowed_ips=allowed_ips) if p.public_key == public_key else p
            for p in peers
        ]
        self.devices[interface] = dataclasses.replace(device, peers=tuple(peers))
