"""The server's core behind the HTTP face: registry, hub view, metrics, background work.

``Coordinator`` keeps the registry true to the hub: every read of the hub judges the
registered clients whose peer changed or left (roamed, tunnel addresses changed, gone),
and deadline heaps drop those whose handshake went stale or whose TTL ran out: the
background round costs O(changes + due deadlines), never O(clients). ``app.py`` turns
HTTP into calls on it.

With a store shared by several instances (``SharedStore``), it also follows the store's
change feed: the registrations other instances wrote in the LAN groups they changed are
re-read and learnt, which wakes the local waiters of those groups only. A registration
learnt from another hub is judged by that hub's server alone: this one cannot see the
client's handshake. While the database is unreachable it serves from memory, says so
(``degraded``), retries with back-off and re-reads everything when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Iterable

from wg_autopeer.server.config import ServerConfig
from wg_autopeer.server.hubread import DeviceReader, HubDelta
from wg_autopeer.server.identity import HubPeer, HubView
from wg_autopeer.server.matching import Registration
from wg_autopeer.server.metrics import ServerMetrics
from wg_autopeer.server.registry import Dropped, Registry
from wg_autopeer.server.store import (
    RETRY_MAX_S,
    RETRY_MIN_S,
    RegistrationStore,
    SharedStore,
    StoreError,
    parse_group_text,
)
from wg_autopeer.wireguard.base import WireGuardControl

log = logging.getLogger(__name__)

# How long a leave is remembered, to refuse reports that were in flight when it came.
LEFT_MEMORY_S = 60.0
# How long a client that routes at once waits for its proving neighbours to hear of
# it, and the margin they get to apply what they heard (see hold_for_neighbours).
HOLD_MAX = 1.5
APPLY_MARGIN = 0.25
# How often a shared store is rid of registrations that expired (a dead instance's), and
# how long after their expiry.
PURGE_EVERY_S = 60.0
PURGE_AFTER_S = 60.0


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
        reader: DeviceReader | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        # Blocking queries waiting right now.
        self.waiting = 0
        # When each key last left (DELETE), monotonic: a report that arrived before
        # its client's leave but finished after it must not register that client again.
        self.left_at: dict[str, float] = {}
        # The body each registered client last reported: the same bytes again (an agent's
        # periodic report) reuse its registration's parsed LANs, skipping JSON, entry checks
        # and address parsing. Dropped with the registration.
        self.report_bodies: dict[str, bytes] = {}
        # For the hold of clients that route at once (see hold_for_neighbours): when each
        # client's registration last changed, and when each was last sent an answer.
        self.changed_at: dict[str, float] = {}
        self.answered_at: dict[str, float] = {}
        self._answered = asyncio.Condition()
        # Holds waiting on ``_answered`` right now: without any, an answer notifies nobody.
        self._holding = 0
        self.registry = Registry(config.policy, store)
        self.shared = store if isinstance(store, SharedStore) else None
        # The shared store's change feed: connected or not, and the groups to re-read.
        self.feed_up = False
        self.feed_error: StoreError | None = None
        self._pending_groups: set[str] = set()
        self._fetcher: asyncio.Task[None] | None = None
        self._recheck: set[str] = set()
        self._purged_at = monotonic()
        self._resyncing: asyncio.Task[None] | None = None
        # One read of the shared store at a time, each learnt before the next starts: a
        # read that began earlier (a resync's snapshot) must not undo what a later one
        # (a notified group's re-read) learnt.
        self._store_reads = asyncio.Lock()
        # Handshake deadlines of registered clients: (latest handshake + max age, key), at
        # most one entry per key; a newer handshake just moves the key on when it comes due.
        self._handshakes: list[tuple[float, str]] = []
        self._handshake_queued: set[str] = set()
        self.hub = HubView(
            control,
            config.interface,
            reader=reader,
            min_refresh_gap=config.unknown_source_refresh_gap,
            monotonic=monotonic,
            on_change=self._on_hub_change,
        )
        self.metrics = ServerMetrics(
            clients=lambda: self.registry.client_count,
            groups=lambda: self.registry.group_count,
            degraded=lambda: 0.0 if self.degraded is None else 1.0,
            store_queued=lambda: (
                0.0 if self.registry.writes is None else self.registry.writes.queued
            ),
            store_failures=lambda: (
                0.0 if self.registry.writes is None else self.registry.writes.failures
            ),
        )
        loaded = self.registry.load(lambda r: self.shared is None or r.hub == config.hub)
        for pubkey in list(self.registry.pubkeys):
            self._queue_handshake(pubkey, None)
        if loaded:
            log.info("reloaded %d registrations; each is checked at the first hub read", loaded)

    def handshake_is_fresh(self, peer: HubPeer) -> bool:
        age = peer.handshake_age(self.clock())
        return age is not None and age <= self.config.handshake_max_age

    def _verdict(self, registration: Registration) -> str | None:
        if registration.hub != self.config.hub and registration.pubkey in self.registry.learnt:
            # Another hub's client: only that hub sees its handshake.
            return None
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
            self.report_bodies.pop(item.pubkey, None)
            self.changed_at.pop(item.pubkey, None)
            self.answered_at.pop(item.pubkey, None)
            self.metrics.dropped.labels(reason=item.reason).inc()

    async def register(self, registration: Registration) -> bool:
        """Register or refresh a client (``Registry.put``) and watch its handshake; returns
        once a change of content is in the store, so an answered registration is kept."""
        changed = self.registry.put(registration, self.clock())
        peer = self.hub.snapshot.peers.get(registration.pubkey)
        self._queue_handshake(registration.pubkey, peer)
        if changed:
            self.changed_at[registration.pubkey] = self.monotonic()
            await self.registry.durable()
        return changed

    async def answered(self, pubkey: str) -> None:
        """Record that ``pubkey`` was just sent an answer (its current neighbours)."""
        self.answered_at[pubkey] = self.monotonic()
        if self._holding:
            async with self._answered:
                self._answered.notify_all()

    async def hold_for_neighbours(self, registration: Registration) -> None:
        """Make before break for clients that route at once (the seed's agent reports no
        listen port and puts every neighbour it is offered on its device with routes):
        before such a client learns of a neighbour that proves paths first, give that
        neighbour the time to hear of the client and add it as a passive peer. Else
        the client's first handshake reaches a neighbour that does not know its key yet,
        is dropped, and WireGuard tries again only 5 s later, all that time routing the
        pair's traffic into the void. Waits at most ``HOLD_MAX``; a neighbour that polls
        instead of holding a query cannot be waited for."""
        if any(lan.listen_port is not None for lan in registration.lans):
            return
        changed = self.changed_at.get(registration.pubkey)
        if changed is None:
            return
        offered = self.registry.answer_for(registration.pubkey, self.clock()).peers
        proving = [
            offer.pubkey
            for offer in offered
            # A neighbour served by another instance (learnt) is answered there: this
            # one cannot tell when, so it is not waited for.
            if offer.pubkey not in self.registry.learnt
            and (other := self.registry.get(offer.pubkey)) is not None
            and any(lan.listen_port is not None for lan in other.lans)
        ]
        if not proving:
            return

        def told() -> bool:
            return all(self.answered_at.get(key, 0.0) >= changed for key in proving)

        if told():
            return
        self._holding += 1
        try:
            async with self._answered:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HOLD_MAX):
                        await self._answered.wait_for(told)
        finally:
            self._holding -= 1
        # The neighbour's agent applies its answer in milliseconds; leave it a margin.
        await asyncio.sleep(APPLY_MARGIN)

    async def leave(self, pubkey: str) -> None:
        """Drop a client at its request; returns once that is in the store."""
        self.left_at[pubkey] = self.monotonic()
        self.report_bodies.pop(pubkey, None)
        self.changed_at.pop(pubkey, None)
        self.answered_at.pop(pubkey, None)
        self.registry.remove(pubkey, "left")
        await self.registry.durable()

    def _queue_handshake(self, pubkey: str, peer: HubPeer | None) -> None:
        if pubkey in self._handshake_queued:
            return
        self._handshake_queued.add(pubkey)
        # No handshake known yet (a reloaded registration): judged at the first read.
        seen = peer.latest_handshake if peer is not None else None
        due = (seen if seen is not None else self.clock()) + self.config.handshake_max_age
        heapq.heappush(self._handshakes, (due, pubkey))

    def _judge(self, pubkeys: Iterable[str]) -> None:
        self._count(self.registry.judge(pubkeys, self._verdict))

    def _on_hub_change(self, delta: HubDelta) -> None:
        if delta.full:
            self._judge(list(self.registry.pubkeys))
        else:
            self._judge([*delta.changed, *delta.removed])
        # Every read also settles the handshakes gone stale by now, as a full check of every
        # registration would: a report that made the read must not see a stale neighbour.
        self._stale_handshakes(self.clock())

    async def tick(self) -> None:
        """One round of background work: a read of the hub (judging the clients whose peer
        changed), then the deadlines that are due."""
        await self.hub.refresh_since(self.monotonic())
        self.sweep()
        await self.recheck_learnt()
        if self.shared is not None and self.monotonic() - self._purged_at >= PURGE_EVERY_S:
            self._purged_at = self.monotonic()
            try:
                await asyncio.to_thread(self.shared.purge_expired, self.clock() - PURGE_AFTER_S)
            except StoreError as exc:
                log.warning("purge of expired registrations failed: %s", exc)

    def sweep(self) -> None:
        """Drop what is due: expired registrations and stale handshakes."""
        now = self.clock()
        recheck = self._recheck if self.shared is not None else None
        self._count(self.registry.sweep(now, recheck))
        self._stale_handshakes(now)
        self.registry.flush_due()
        # A report is over long before this: reads of the hub are its only waits.
        horizon = self.monotonic() - LEFT_MEMORY_S
        for key in [k for k, t in self.left_at.items() if t < horizon]:
            del self.left_at[key]

    def _stale_handshakes(self, now: float) -> None:
        """Judge the registered clients whose handshake deadline has come."""
        heap = self._handshakes
        due = []
        while heap and heap[0][0] <= now:
            _, pubkey = heapq.heappop(heap)
            self._handshake_queued.discard(pubkey)
            if self.registry.get(pubkey) is not None:
                due.append(pubkey)
        self._judge(due)
        for pubkey in due:
            if self.registry.get(pubkey) is not None:
                # Fresh after all (a newer handshake): watch its new deadline.
                self._queue_handshake(pubkey, self.hub.snapshot.peers.get(pubkey))

    def left_since(self, pubkey: str, moment: float) -> bool:
        """True when ``pubkey`` left (DELETE) at or after ``moment`` (monotonic)."""
        left = self.left_at.get(pubkey)
        return left is not None and left >= moment

    # -- a store shared with other instances -----------------------------------------------

    @property
    def degraded(self) -> str | None:
        """Why this instance serves from memory only, or None when its store works."""
        writes = self.registry.writes
        if writes is not None and writes.failing is not None:
            return f"registry store failing: {writes.failing.reason}"
        if self.shared is not None and not self.feed_up and self.feed_error is not None:
            return f"registry change feed down: {self.feed_error.reason}"
        return None

    def learn(self, rows: list[Registration], scope: set[str]) -> None:
        """Take what other instances stored: ``rows`` as read now, covering every key of
        ``scope`` (a learnt key of the scope that is not among them is gone)."""
        now = self.clock()
        present = set()
        for row in rows:
            if row.expires_at <= now:
                continue
            present.add(row.pubkey)
            current = self.registry.get(row.pubkey)
            if current is not None and row.expires_at < current.expires_at:
                # An older report than the one known here: the store has moved on since.
                continue
            if current is not None and row.pubkey not in self.registry.learnt:
                # Ours, as reported to this instance; another report, later and different
                # (the client moved to another hub or instance), takes it over.
                if row.same_content(current) or row.expires_at <= current.expires_at:
                    continue
                self.report_bodies.pop(row.pubkey, None)
            self.registry.learn(row, now)
        gone = [key for key in scope - present if key in self.registry.learnt]
        self._count([d for key in gone if (d := self.registry.remove(key, "gone")) is not None])

    def _on_groups(self, groups: set[str]) -> None:
        self._pending_groups |= groups
        if self._fetcher is None or self._fetcher.done():
            self._fetcher = asyncio.create_task(self._fetch_groups(), name="store-groups")

    async def _fetch_groups(self) -> None:
        assert self.shared is not None
        # Notifications arriving during a read join the next one.
        while self._pending_groups:
            groups, self._pending_groups = self._pending_groups, set()
            scope: set[str] = set()
            for text in groups:
                try:
                    scope |= self.registry.members(parse_group_text(text))
                except ValueError:
                    log.warning("ignoring a change notification for group %r", text)
            async with self._store_reads:
                try:
                    rows = await asyncio.to_thread(self.shared.load_groups, groups)
                except StoreError as exc:
                    # The feed reconnects and re-reads everything.
                    log.warning("re-reading %d changed groups failed: %s", len(groups), exc)
                    return
                self.learn(rows, scope)

    async def resync(self) -> None:
        """Re-read every stored registration (the feed reconnected: changes were missed)."""
        assert self.shared is not None
        async with self._store_reads:
            rows = await asyncio.to_thread(self.shared.load_all)
            self.learn(rows, set(self.registry.learnt))

    async def recheck_learnt(self) -> None:
        """Learnt registrations that ran out here: their owner may have pushed their expiry
        back in the store since (refreshes notify nobody); drop those it did not."""
        if not self._recheck or self.shared is None:
            return
        keys, self._recheck = self._recheck, set()
        async with self._store_reads:
            try:
                rows = await asyncio.to_thread(self.shared.load_keys, keys)
            except StoreError as exc:
                log.warning("re-reading %d expired registrations failed: %s", len(keys), exc)
                rows = []
            self.learn(rows, keys)

    async def follow_store(self) -> None:
        """Until cancelled: follow the shared store's change feed, reconnecting with
        back-off; each (re)connection re-reads everything."""
        assert self.shared is not None
        delay = RETRY_MIN_S

        def connected() -> None:
            nonlocal delay
            if self.feed_error is not None:
                log.warning("registry change feed back; re-reading the registry")
            self.feed_up, self.feed_error, delay = True, None, RETRY_MIN_S
            self._resyncing = asyncio.create_task(self._resync_logged(), name="store-resync")
            if self.registry.writes is not None:
                self.registry.writes.retry_now()

        while True:
            try:
                await self.shared.follow(self._on_groups, connected)
            except StoreError as exc:
                if self.feed_up or self.feed_error is None:
                    log.error("registry change feed down, serving from memory: %s", exc)
                self.feed_up, self.feed_error = False, exc
            except Exception as exc:
                # A bug must not end the feed for good: logged, and the feed restarts.
                log.exception("registry change feed failed")
                self.feed_up = False
                self.feed_error = StoreError(self.shared.location, f"bug: {exc!r}")
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, 2 * delay)

    async def _resync_logged(self) -> None:
        try:
            await self.resync()
        except StoreError as exc:
            log.warning("re-reading the registry failed: %s", exc)

    async def run(self) -> None:
        """Background loop until cancelled."""
        while True:
            try:
                await self.tick()
            except Exception:
                # A bug here must not stop expiry and roaming detection for good.
                log.exception("background refresh failed")
            await asyncio.sleep(self.config.refresh_interval)
