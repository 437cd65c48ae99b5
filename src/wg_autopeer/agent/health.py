"""Is a direct peer working? A pure judgement, plus back-off for peers that failed.

A direct peer is judged from what the device reports (its latest handshake),
when the agent last configured it, and the current wall-clock time (WireGuard
reports handshakes in seconds since the epoch, so ``now`` must be ``time.time()``).

- ``PENDING``: no handshake yet, but configured less than ``handshake_timeout`` ago.
- ``HEALTHY``: a handshake younger than ``stale_after``. WireGuard rekeys every
  120 s while packets flow, and the agent sets a persistent keepalive, so a live
  peer always has a handshake younger than about two minutes; 135 s leaves a margin.
- ``FAILED``: no handshake within ``handshake_timeout``, or the latest one is stale.

Kept simple on purpose: when the agent updates a peer in place (new endpoint),
WireGuard keeps its last handshake, so the peer stays ``HEALTHY`` until that
handshake goes stale and only then fails. A peer that was removed and added
again starts with no handshake and gets a fresh ``handshake_timeout``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wg_autopeer.wireguard.base import PeerState

HANDSHAKE_TIMEOUT = 10.0
STALE_AFTER = 135.0
SUPPRESS_BASE = 30.0
SUPPRESS_CAP = 600.0


class HealthState(enum.Enum):
    PENDING = "pending"
    HEALTHY = "healthy"
    FAILED = "failed"


@dataclass(frozen=True)
class Health:
    """The verdict on one direct peer; ``reason`` is set when it ``FAILED``."""

    state: HealthState
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.state is HealthState.FAILED


PENDING = Health(HealthState.PENDING)
HEALTHY = Health(HealthState.HEALTHY)


def judge(
    peer: PeerState | None,
    added_at: float,
    now: float,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    stale_after: float = STALE_AFTER,
) -> Health:
    """Judge one direct peer configured at ``added_at`` (epoch seconds) as of ``now``.

    ``peer`` is None when the peer is no longer on the device: that is a failure,
    since the agent put it there and something else took it away.
    """
    if peer is None:
        return Health(HealthState.FAILED, "peer is no longer on the device")
    # Backends report "never" as None, but the kernel's raw value for it is 0.
    handshake = peer.latest_handshake or None
    if handshake is not None and now - handshake <= stale_after:
        return HEALTHY
    if now - added_at < handshake_timeout:
        return PENDING
    if handshake is None:
        return Health(HealthState.FAILED, f"no handshake within {handshake_timeout:g} s")
    return Health(HealthState.FAILED, f"handshake stale for {int(now - handshake)} s")


@dataclass
class _Record:
    failures: int = 0
    until: float = 0.0


class Suppressions:
    """Peers that failed and must not be re-added for a while.

    The period doubles per consecutive failure, from ``base`` up to ``cap``;
    ``record_healthy`` forgets the failures. ``clock`` is monotonic seconds by
    default; tests inject their own.
    """

    def __init__(
        self,
        base: float = SUPPRESS_BASE,
        cap: float = SUPPRESS_CAP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def record_failure(self, public_key: str) -> float:
        """Suppress ``public_key``; returns for how many seconds."""
        record = self._records.setdefault(public_key, _Record())
        period = min(self.cap, self.base * 2.0 ** min(record.failures, 32))
        record.failures += 1
        record.until = self._clock() + period
        return period

    def record_healthy(self, public_key: str) -> None:
        """The peer worked: its next failure starts from ``base`` again."""
        self._records.pop(public_key, None)

    def is_suppressed(self, public_key: str) -> bool:
        record = self._records.get(public_key)
        return record is not None and self._clock() < record.until

    def remaining(self, public_key: str) -> float:
        """Seconds until ``public_key`` may be added again (0 when it may now)."""
        record = self._records.get(public_key)
        return 0.0 if record is None else max(0.0, record.until - self._clock())

    def failures(self, public_key: str) -> int:
        """Consecutive failures recorded since the peer was last healthy."""
        record = self._records.get(public_key)
        return 0 if record is None else record.failures

    def suppressed(self) -> frozenset[str]:
        """Every key suppressed right now."""
        now = self._clock()
        return frozenset(key for key, rec in self._records.items() if now < rec.until)

    def retain(self, public_keys: Iterable[str]) -> None:
        """Forget keys not in ``public_keys`` (peers the server no longer offers) whose
        suppression ended more than ``cap`` ago, so the table does not grow without
        bound while a peer that drops out of the offers for a moment keeps its count."""
        keep = set(public_keys)
        horizon = self._clock() - self.cap
        for key in [k for k, rec in self._records.items() if k not in keep and rec.until < horizon]:
            del self._records[key]
