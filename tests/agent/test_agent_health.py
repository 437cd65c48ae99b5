from __future__ import annotations

import random

import pytest
from agent_keys import key

from wg_autopeer.agent.backoff import Backoff
from wg_autopeer.agent.health import (
    ACTIVE,
    CONFIRM_WITHIN,
    PASSIVE,
    PENDING,
    Health,
    PathState,
    RxWatch,
    Suppressions,
    TrafficWatch,
    adds_later,
    carries_data,
    judge,
    recreate_due,
)
from wg_autopeer.wireguard.base import PeerState

ADDED = 1_700_000_000.0
BOB = key(4)


def peer(handshake: float | None, rx: int = 92) -> PeerState:
    return PeerState(BOB, latest_handshake=handshake, rx_bytes=rx)


def unrouted(state: PeerState | None, now: float, *, passive: bool = False) -> Health:
    return judge(state, routed=False, passive=passive, added_at=ADDED, now=now, rx_idle=0.0)


def routed(state: PeerState | None, now: float, rx_idle: float, *, passive: bool = False) -> Health:
    return judge(
        state, routed=True, passive=passive, added_at=ADDED, now=now, rx_idle=rx_idle, dead_after=3
    )


def test_new_peer_without_handshake_is_pending_and_gets_no_routes() -> None:
    verdict = unrouted(peer(None, rx=0), ADDED + 9.9)
    assert verdict == PENDING
    assert not PENDING.routable


def test_handshake_with_bytes_received_proves_the_path() -> None:
    verdict = unrouted(peer(ADDED + 0.3), ADDED + 0.4)
    assert verdict == ACTIVE
    assert ACTIVE.routable


def test_handshake_without_anything_received_is_not_proof() -> None:
    assert unrouted(peer(ADDED + 0.3, rx=0), ADDED + 0.4) == PENDING


def test_kernel_zero_handshake_means_never() -> None:
    verdict = unrouted(peer(0.0, rx=0), ADDED + 11)
    assert verdict.state is PathState.FAILED
    assert verdict.reason == "no handshake within 10 s"


def test_no_handshake_within_the_grace_fails() -> None:
    verdict = judge(
        peer(None, rx=0),
        routed=False,
        passive=False,
        added_at=ADDED,
        now=ADDED + 40,
        rx_idle=0.0,
        handshake_timeout=40,
    )
    assert verdict.failed
    assert verdict.reason == "no handshake within 40 s"


def test_passive_peer_waits_for_the_neighbours_handshake_without_deadline() -> None:
    assert unrouted(peer(None, rx=0), ADDED + 3600, passive=True) == PASSIVE
    assert unrouted(peer(ADDED + 3599), ADDED + 3600, passive=True) == ACTIVE


def test_active_path_stays_while_bytes_arrive() -> None:
    assert routed(peer(ADDED + 100), ADDED + 150, rx_idle=2.9) == ACTIVE


def test_active_path_silent_past_the_keepalive_fails() -> None:
    verdict = routed(peer(ADDED + 100), ADDED + 150, rx_idle=3.2)
    assert verdict.failed
    assert verdict.reason == "nothing received for 3.2 s"


def test_passive_active_path_is_judged_by_handshake_age_only() -> None:
    # The seed's agent sends no heartbeat: silence alone must not drop its routes.
    assert routed(peer(ADDED + 100), ADDED + 150, rx_idle=40, passive=True) == ACTIVE
    verdict = routed(peer(ADDED + 100), ADDED + 281, rx_idle=0, passive=True)
    assert verdict.reason == "handshake stale for 181 s"


def test_peer_missing_from_device_fails() -> None:
    verdict = unrouted(None, ADDED + 1)
    assert verdict.failed
    assert verdict.reason is not None
    assert "no longer on the device" in verdict.reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rx_watch_measures_silence_since_the_counter_last_moved() -> None:
    clock = Clock()
    watch = RxWatch(clock)
    assert watch.observe(BOB, 100) == 0.0
    clock.now += 2.5
    assert watch.observe(BOB, 100) == 2.5
    clock.now += 0.5
    assert watch.observe(BOB, 148) == 0.0
    clock.now += 1.0
    assert watch.observe(BOB, 148) == 1.0
    watch.restart(BOB, 148)  # the silence starts again now, from the same count
    clock.now += 0.5
    assert watch.observe(BOB, 148) == 0.5
    assert watch.observe(BOB, 180) == 0.0
    watch.retain(())
    clock.now += 9
    assert watch.observe(BOB, 148) == 0.0


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


def test_recently_healthy_pair_is_retried_soon_and_never_escalates() -> None:
    clock = Clock()
    s = Suppressions(clock=clock)
    s.record_failure(BOB)
    s.record_failure(BOB)
    s.record_healthy(BOB)
    assert s.failures(BOB) == 0
    # A flapping link: it worked a moment ago, so every failure is retried in 10 s.
    for _ in range(5):
        assert s.record_failure(BOB) == 10
        clock.now += 10
    assert s.failures(BOB) == 0


def test_a_pair_healthy_long_ago_starts_back_off_from_base_again() -> None:
    clock = Clock()
    s = Suppressions(clock=clock)
    s.record_healthy(BOB)
    clock.now += 601
    assert s.record_failure(BOB) == 30
    clock.now += 30
    assert s.record_failure(BOB) == 60


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


def test_heartbeats_alone_leave_a_path_idle_and_traffic_shows_within_a_second() -> None:
    now = [100.0]
    watch = TrafficWatch(lambda: now[0])
    assert watch.observe("k", 0, 0)  # not seen before: busy until shown otherwise
    rx = tx = 0
    for second in range(1, 10):
        now[0] += 1.0
        # Heartbeat and port unreachable each way, and one more at every third edge.
        extra = 208 if second % 3 == 0 else 0
        rx, tx = rx + 208 + extra, tx + 208
        busy = watch.observe("k", rx, tx)
    assert not busy
    now[0] += 0.5
    # A 100 ms ping starts: within the window, as soon as its bytes outgrow the budget.
    rx, tx = rx + 2000, tx + 2000
    assert watch.observe("k", rx, tx)
    # A re-created peer (counters start again) is busy until a window shows otherwise.
    now[0] += 3.0
    assert watch.observe("k", 10, 10)


def test_a_pending_peer_is_recreated_after_a_second_the_greater_key_half_a_second_later() -> None:
    small, large = "A" * 43 + "=", "B" * 43 + "="
    assert not recreate_due(small, large, 0.9)
    assert recreate_due(small, large, 1.0)
    # The other side of the same pair: never in the same look as the first.
    assert not recreate_due(large, small, 1.4)
    assert recreate_due(large, small, 1.5)


def test_only_the_greater_key_of_a_pair_adds_a_new_peer_later() -> None:
    low, high = sorted((key(1), key(9)))
    assert adds_later(high, low)
    assert not adds_later(low, high)


@pytest.mark.parametrize(
    ("received", "data"),
    [
        (0, False),
        (148, False),  # a handshake initiation
        (92, False),  # a handshake response
        (240, False),  # one of each: could be data too, the next look decides
        (296, False),  # two initiations
        (32, True),  # a keepalive
        (96, True),  # a heartbeat
        (112, True),  # the answer to one (ICMP port unreachable)
        (244, True),  # an initiation and a heartbeat
    ],
)
def test_only_growth_that_handshakes_cannot_make_up_counts_as_data(
    received: int, data: bool
) -> None:
    assert carries_data(received) is data


def test_a_path_moved_onto_fails_when_no_data_follows_within_the_confirmation_window() -> None:
    now = ADDED + 2

    def verdict(unconfirmed_for: float | None) -> Health:
        # Handshake bytes arrived a moment ago (no silence): only the window decides.
        return judge(
            peer(now - 1, rx=240),
            routed=True,
            passive=False,
            added_at=ADDED,
            now=now,
            rx_idle=0.0,
            unconfirmed_for=unconfirmed_for,
        )

    assert verdict(CONFIRM_WITHIN - 0.1) == ACTIVE
    assert verdict(None) == ACTIVE  # data came
    failed = verdict(CONFIRM_WITHIN + 0.1)
    assert failed.failed
    assert failed.reason == "nothing received in its first 1 s"
