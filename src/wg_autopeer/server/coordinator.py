"""The server's core behind the HTTP face: registry, hub view, metrics, background work.

``Coordinator`` keeps the registry true to the hub: every refresh of the hub
view drops registrations whose client roamed, went stale or left the hub, and a
sweep drops those whose TTL ran out. ``app.py`` turns HTTP into calls on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from wg_autopeer.errors import WireGuardError
from wg_autopeer.server.config import ServerConfig
from wg_autopeer.server.identity import HubPeer, HubSnapshot, HubView
from wg_autopeer.server.matching import Registration
from wg_autopeer.server.metrics import ServerMetrics
from wg_autopeer.server.registry import Dropped, Registry
from wg_autopeer.server.store import RegistrationStore
from wg_autopeer.wireguard.base import WireGuardControl

log = logging.getLogger(__name__)

# How long a leave is remembered, to refuse reports that were in flight when it came.
LEFT_MEMORY_S = 60.0


class Coordinator:
    """Registry + hub view + metrics, and the background work that keeps them true."""

    def __init__(
        self,
        config: ServerConfig,
        control: WireGuardControl,
        *,
        store: RegistrationStore | None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        # Blocking queries waiting right now.
        self.waiting = 0
        # When each key last left (DELETE), monotonic: a report that arrived before
        # its client's leave but finished after it must not register that client again.
        self.left_at: dict[str, float] = {}
        self.registry = Registry(config.policy, store)
        self.hub = HubView(
            control,
            config.interface,
            min_refresh_gap=config.unknown_source_refresh_gap,
            monotonic=monotonic,
            on_refresh=self._on_hub_refresh,
        )
        self.metrics = ServerMetrics(
            clients=lambda: self.registry.client_count,
            groups=lambda: self.registry.group_count,
        )
        loaded = self.registry.load()
        if loaded:
            log.info("reloaded %d registrations; each is checked at the first hub read", loaded)

    def handshake_is_fresh(self, peer: HubPeer) -> bool:
        age = peer.handshake_age(self.clock())
        return age is not None and age <= self.config.handshake_max_age

    def _verdict(self, registration: Registration) -> str | None:
        peer = self.hub.snapshot.peers.get(registration.pubkey)
        if peer is None:
            return "gone from hub"
        if peer.public_ip != registration.public_ip:
            return "roamed"
        if not self.handshake_is_fresh(peer):
            return "handshake stale"
        if peer.tunnel_ips != registration.tunnel_ips:
            return "tunnel addresses changed"
        return None

    def _count(self, dropped: list[Dropped]) -> None:
        for item in dropped:
            self.metrics.dropped.labels(reason=item.reason).inc()

    def _on_hub_refresh(self, snapshot: HubSnapshot) -> None:
        self._count(self.registry.reconcile(self._verdict))

    async def tick(self) -> None:
        """One round of background work: re-read the hub, then expire old registrations."""
        try:
            await self.hub.refresh()
        except WireGuardError as exc:
            log.warning("reading hub interface %s failed: %s", self.config.interface, exc)
        self.sweep()

    def sweep(self) -> None:
        self._count(self.registry.sweep(self.clock()))
        # A report is over long before this: reads of the hub are its only waits.
        horizon = self.monotonic() - LEFT_MEMORY_S
        for key in [k for k, t in self.left_at.items() if t < horizon]:
            del self.left_at[key]

    def left_since(self, pubkey: str, moment: float) -> bool:
        """True when ``pubkey`` left (DELETE) at or after ``moment`` (monotonic)."""
        left = self.left_at.get(pubkey)
        return left is not None and left >= moment

    async def run(self) -> None:
        """Background loop until cancelled."""
        while True:
            try:
                await self.tick()
            except Exception:
                # A bug here must not stop expiry and roaming detection for good.
                log.exception("background refresh failed")
            await asyncio.sleep(self.config.refresh_interval)
