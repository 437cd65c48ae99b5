from __future__ import annotations

import random

import pytest
from agent_keys import key

from wg_autopeer.agent.backoff import Backoff
from wg_autopeer.agent.health import (
    HEALTHY,
    PENDING,
    HealthState,
    Suppressions,
    judge,
)
from wg_autopeer.wireguard.base import PeerState

ADDED = 1_700_000_000.0
BOB = key(4)


def peer(handshake: float | None) -> PeerState:
    return PeerState(BOB, latest_handshake=handshake)


def test_no_handshake_shortly_after_add_is_pending() -> None:
    assert judge(peer(None), ADDED, ADDED + 9.9) == PENDING


def test_kernel_zero_handshake_means_never() -> None:
    verdict = judge(peer(0.0), ADDED, ADDED + 11)
    assert verdict.state is HealthState.FAILED
    assert verdict.reason == "no handshake within 10 s"


def test_no_handshake_after_ten_seconds_fails() -> None:
    verdict = judge(peer(None), ADDED, ADDED + 10)
    assert verdict.failed
    assert verdict.reason == "no handshake within 10 s"


def test_recent_handshake_is_healthy() -> None:
    assert judge(peer(ADDED + 3), ADDED, ADDED + 5) == HEALTHY
    assert judge(peer(ADDED + 100), ADDED, ADDED + 100 + 135) == HEALTHY


def test_stale_handshake_fails_with_its_age() -> None:
    verdict = judge(peer(ADDED + 100), ADDED, ADDED + 100 + 136)
    assert verdict.failed
    assert verdict.reason == "handshake stale for 136 s"


def test_stale_handshake_of_just_updated_peer_is_pending() -> None:
    # An in-place update keeps the old handshake; the peer gets its grace period.
    assert judge(peer(ADDED - 500), ADDED, ADDED + 2) == PENDING


def test_peer_missing_from_device_fails() -> None:
    verdict = judge(None, ADDED, ADDED + 1)
    assert verdict.failed
    assert verdict.reason is not None
    assert "no longer on the device" in verdict.reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_suppression_doubles_per_failure_up_to_ten_minutes() -> None:
    clock = Clock()
    s = Suppressions(clock=clock)
    periods = [s.record_failure(BOB) for _ in range(7)]
    assert periods == [30, 60, 120, 240, 480, 600, 600]
    assert s.failures(BOB) == 7


def test_suppressed_peer_is_released_when_its_period_ends() -> None:
    clock = Clock()
    s = Suppressions(clock=clock)
    s.record_failure(BOB)
    assert s.is_suppressed(BOB)
    assert s.suppressed() == {BOB}
    clock.now += 29.9
    assert s.is_suppressed(BOB)
    assert s.remaining(BOB) == pytest.approx(0.1)
    clock.now += 0.1
    assert not s.is_suppressed(BOB)
    assert s.suppressed() == frozenset()


def test_healthy_peer_starts_back_off_from_base_again() -> None:
    clock = Clock()
    s = Suppressions(clock=clock)
    s.record_failure(BOB)
    s.record_failure(BOB)
    s.record_healthy(BOB)
    assert s.failures(BOB) == 0
    assert s.record_failure(BOB) == 30


def test_retain_forgets_long_expired_keys_only() -> None:
    clock = Clock()
    s = Suppressions(clock=clock)
    s.record_failure(BOB)
    s.retain([])
    assert s.failures(BOB) == 1  # still suppressed: kept even though not offered
    clock.now += 30 + 601
    s.retain([BOB])
    assert s.failures(BOB) == 1  # still offered: kept
    s.retain([])
    assert s.failures(BOB) == 0


def test_backoff_grows_exponentially_within_full_jitter() -> None:
    b = Backoff(base=1.0, cap=60.0, rng=random.Random(7))
    ceilings = []
    for _ in range(10):
        ceiling = b.ceiling()
        delay = b.next_delay()
        assert 0.0 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


def test_backoff_is_reproducible_with_a_seed() -> None:
    first = Backoff(rng=random.Random(42))
    second = Backoff(rng=random.Random(42))
    assert [first.next_delay() for _ in range(5)] == [second.next_delay() for _ in range(5)]


def test_backoff_reset_starts_from_base() -> None:
    b = Backoff(base=0.5, cap=10.0, rng=random.Random(1))
    for _ in range(6):
        b.next_delay()
    b.reset()
    assert b.attempt == 0
    assert b.next_delay() <= 0.5


def test_backoff_survives_many_failures() -> None:
    b = Backoff(rng=random.Random(3))
    for _ in range(5000):
        assert b.next_delay() <= 60.0


def test_backoff_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="base"):
        Backoff(base=10, cap=1)
