"""The in-memory registry: registrations by key, an index by LAN group, and wake-ups.

Every change (register, leave, expiry, hub-side invalidation) wakes the waiting
blocking queries of the clients in the groups it touched, old and new. A waiter
costs one awaited ``asyncio.Event``: clients of the same key share it, and it
is replaced each time it fires, so nothing polls.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wg_autopeer.protocol import PeeringAnswer
from wg_autopeer.server.matching import (
    GroupKey,
    Policy,
    Registration,
    neighbour_lans,
    neighbours,
    offer_fields,
)
from wg_autopeer.server.store import GroupCommit, RegistrationStore

log = logging.getLogger(__name__)


def etag_of(answer: PeeringAnswer, *, registered: bool = True) -> str:
    """A strong ETag (quoted) of the canonical JSON of ``answer``.

    Whether the client is registered at all is part of the version: when the
    server drops a client (it roamed, its handshake went stale, its TTL ran out)
    its own blocking query must end even if its peer list was empty before and
    after, so that it reports again at once instead of at the next timeout.
    """
    return etag_of_body(answer_bytes(answer), registered=registered)


def etag_of_body(body: bytes, *, registered: bool = True) -> str:
    """``etag_of`` the answer whose ``answer_bytes`` are ``body``."""
    digest = hashlib.sha256(body + (b"" if registered else b"\0unregistered"))
    return f'"{digest.hexdigest()[:20]}"'


def answer_bytes(answer: PeeringAnswer) -> bytes:
    """The answer exactly as it goes on the wire: absent fields omitted, keys sorted."""
    return _encode(answer.to_json())


def _encode(answer: dict[str, object]) -> bytes:
    return json.dumps(answer, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Dropped:
    """A registration the registry let go, and why (``expired``, ``left``, ``roamed``...)."""

    pubkey: str
    reason: str


class Registry:
    """Registrations of the clients that reported their LANs, with change notification."""

    def __init__(self, policy: Policy, store: RegistrationStore | None = None) -> None:
        self.policy = policy
        self._store = store
        self._writes = None if store is None else GroupCommit(store)
        self._regs: dict[str, Registration] = {}
        self._index: dict[GroupKey, set[str]] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        # Each client's last answer (body, ETag) and until when it holds (the earliest
        # expiry among the requester and the neighbours it names). Dropped with every
        # wake-up of that client, i.e. at every change that may alter its answer.
        self._answers: dict[str, tuple[bytes, str, float]] = {}
        # Expiry deadlines: (expires_at, key), at most one entry per key. An entry may be
        # older than its registration's current expiry (refreshes do not touch the heap);
        # the sweep then queues the key again at its current expiry.
        self._expiry: list[tuple[float, str]] = []
        self._expiry_queued: set[str] = set()
        # Keys learnt from a store shared with other server instances (``learn``): another
        # instance wrote them, so dropping one here writes nothing.
        self.learnt: set[str] = set()

    @property
    def writes(self) -> GroupCommit | None:
        """The group commit in front of the store (None without a store)."""
        return self._writes

    # -- reading ---------------------------------------------------------------------------

    def get(self, pubkey: str) -> Registration | None:
        return self._regs.get(pubkey)

    @property
    def client_count(self) -> int:
        return len(self._regs)

    @property
    def group_count(self) -> int:
        return len(self._index)

    def answer_for(self, pubkey: str, now: float) -> PeeringAnswer:
        """The peer list ``pubkey`` gets right now (empty when it is not registered)."""
        requester = self._regs.get(pubkey)
        if requester is None:
            return PeeringAnswer(peers=[])
        return PeeringAnswer(peers=neighbours(requester, self._index, self._regs, self.policy, now))

    def answer(self, pubkey: str, now: float) -> tuple[bytes, str]:
        """The body and ETag of ``answer_for(pubkey, now)``, computed once per change."""
        cached = self._answers.get(pubkey)
        if cached is not None and now < cached[2]:
            return cached[0], cached[1]
        requester = self._regs.get(pubkey)
        chosen = (
            []
            if requester is None
            else neighbour_lans(requester, self._index, self._regs, self.policy, now)
        )
        # The bytes ``answer_bytes(self.answer_for(pubkey, now))`` gives, without the models.
        body = _encode({"peers": [offer_fields(reg, lan) for reg, lan in chosen]})
        etag = etag_of_body(body, registered=requester is not None)
        if requester is not None and requester.expires_at > now:
            valid = min([requester.expires_at, *(reg.expires_at for reg, _ in chosen)])
            self._answers[pubkey] = (body, etag, valid)
        return body, etag

    def change_event(self, pubkey: str) -> asyncio.Event:
        """An event set at the next change that may alter the answer of ``pubkey``.

        Take it *before* computing the answer you compare against, so no change slips
        between the two.
        """
        event = self._waiters.get(pubkey)
        if event is None:
            event = self._waiters[pubkey] = asyncio.Event()
        return event

    # -- changing --------------------------------------------------------------------------

    def load(self, is_own: Callable[[Registration], bool] = lambda _: True) -> int:
        """Fill the registry from the store; returns how many registrations were loaded.
        Those not ``is_own`` were written by other server instances: they are learnt."""
        if self._store is None:
            return 0
        loaded = self._store.load_all()
        for registration in loaded:
            self._insert(registration)
            if not is_own(registration):
                self.learnt.add(registration.pubkey)
        return len(loaded)

    def learn(self, registration: Registration, now: float) -> bool:
        """Take ``registration`` as another server instance stored it: as ``put``, but
        nothing is written back. True when answers may have changed."""
        return self.put(registration, now, learnt=True)

    def put(
        self, registration: Registration, now: float | None = None, *, learnt: bool = False
    ) -> bool:
        """Register or refresh a client; True when its neighbours' answers may have changed.

        An unchanged report only pushes the expiry back: no re-indexing, no wake-up, and
        its store write waits for a later batch (``GroupCommit``). One that comes back
        after its expiry (``now``), before the sweep dropped it, counts as a change: its
        neighbours' answers left it out meanwhile.
        """
        old = self._regs.get(registration.pubkey)
        alive = old is not None and (now is None or old.expires_at > now)
        # A report here of a key learnt from another instance takes it over: its store
        # row must be written now, as a change.
        taken_over = not learnt and registration.pubkey in self.learnt
        if old is not None and alive and registration.same_content(old) and not taken_over:
            self._regs[registration.pubkey] = registration
            # A learnt one's expiry entry may have been taken by the sweep (see sweep).
            self._queue_expiry(registration)
            if self._writes is not None and not learnt:
                self._writes.refresh(registration)
            return False
        touched: set[GroupKey] = set()
        if old is not None:
            touched |= self._remove_from_index(old)
        self._insert(registration)
        touched |= registration.group_keys()
        if learnt:
            self.learnt.add(registration.pubkey)
        else:
            self.learnt.discard(registration.pubkey)
            if self._writes is not None:
                self._writes.put(registration)
        self._wake(touched, registration.pubkey)
        return True

    async def durable(self) -> None:
        """Return once every change of content so far is in the store."""
        if self._writes is not None:
            await self._writes.durable()

    def flush_due(self) -> None:
        """Write queued expiry refreshes and drops if their batch is due (the timer)."""
        if self._writes is not None:
            self._writes.flush_due()

    def flush(self) -> None:
        """Write everything queued now (shutdown)."""
        if self._writes is not None:
            self._writes.flush()

    def remove(self, pubkey: str, reason: str) -> Dropped | None:
        """Drop a client at once and wake its former neighbours."""
        old = self._regs.pop(pubkey, None)
        if old is None:
            return None
        touched = self._remove_from_index(old)
        if pubkey in self.learnt:
            self.learnt.discard(pubkey)
        elif self._writes is not None:
            self._writes.delete(old)
        self._wake(touched, pubkey)
        log.info("dropped key=%s reason=%s", pubkey[:8], reason)
        return Dropped(pubkey, reason)

    def sweep(self, now: float, recheck: set[str] | None = None) -> list[Dropped]:
        """Drop every registration whose TTL ran out; O(due deadlines), not O(clients).

        With ``recheck``, learnt registrations that ran out are added to it instead of
        dropped: their owner may have pushed their expiry back in the store since (the
        caller re-reads them, then ``learn``s or drops each).
        """
        dropped = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, pubkey = heapq.heappop(heap)
            self._expiry_queued.discard(pubkey)
            registration = self._regs.get(pubkey)
            if registration is None:
                continue
            if registration.expires_at <= now:
                if recheck is not None and pubkey in self.learnt:
                    recheck.add(pubkey)
                elif (d := self.remove(pubkey, "expired")) is not None:
                    dropped.append(d)
            else:
                self._queue_expiry(registration)
        return dropped

    def judge(
        self, pubkeys: Iterable[str], verdict: Callable[[Registration], str | None]
    ) -> list[Dropped]:
        """Drop each registered one of ``pubkeys`` for which ``verdict`` names a reason."""
        doomed = [
            (pk, reason)
            for pk in pubkeys
            if (reg := self._regs.get(pk)) is not None and (reason := verdict(reg)) is not None
        ]
        return [d for pk, reason in doomed if (d := self.remove(pk, reason)) is not None]

    def reconcile(self, verdict: Callable[[Registration], str | None]) -> list[Dropped]:
        """Drop every registration for which ``verdict`` names a reason (roamed, stale...)."""
        return self.judge(list(self._regs), verdict)

    @property
    def pubkeys(self) -> Iterable[str]:
        return self._regs.keys()

    def members(self, key: GroupKey) -> set[str]:
        """The keys registered in LAN group ``key`` (a copy)."""
        return set(self._index.get(key, ()))

    def wake_all(self) -> None:
        """Wake every waiter (shutdown: let blocking queries answer now)."""
        self._answers.clear()
        waiters, self._waiters = self._waiters, {}
        for event in waiters.values():
            event.set()

    # -- internals -------------------------------------------------------------------------

    def _queue_expiry(self, registration: Registration) -> None:
        if registration.pubkey not in self._expiry_queued:
            self._expiry_queued.add(registration.pubkey)
            heapq.heappush(self._expiry, (registration.expires_at, registration.pubkey))

    def _insert(self, registration: Registration) -> None:
        self._regs[registration.pubkey] = registration
        self._queue_expiry(registration)
        for key in registration.group_keys():
            self._index.setdefault(key, set()).add(registration.pubkey)

    def _remove_from_index(self, registration: Registration) -> set[GroupKey]:
        keys = set(registration.group_keys())
        for key in keys:
            members = self._index.get(key)
            if members is None:
                continue
            members.discard(registration.pubkey)
            if not members:
                del self._index[key]
        return keys

    def _wake(self, groups: Iterable[GroupKey], changed: str) -> None:
        # O(members of the touched groups): nobody else's answer can have changed.
        self._wake_key(changed)
        for key in groups:
            for pubkey in self._index.get(key, ()):
                self._wake_key(pubkey)

    def _wake_key(self, pubkey: str) -> None:
        self._answers.pop(pubkey, None)
        event = self._waiters.pop(pubkey, None)
        if event is not None:
            event.set()
