"""Is a direct path proven, alive, or dead? Pure judgements, plus back-off for failures.

Make before break: a direct peer is first put on the device with its LAN
endpoint and a short keepalive but *without* the neighbour's tunnel routes, so
traffic keeps going through the hub while the two try to handshake. Only a
proven path gets the routes; a path that stops working loses them at once.

- ``PENDING``: on the device, no routes, no handshake yet, within its grace.
- ``PASSIVE``: the server gave no endpoint (the neighbour reported no listen
  port: the seed's agent, wireguard-web). Nothing to try from here; the
  neighbour's own handshake proves the path. No grace runs out.
- ``ACTIVE``: proven (a fresh handshake and bytes received) and carrying routes.
  A handshake is not yet proof that data flows both ways (see ``CONFIRM_WITHIN``):
  the neighbour's traffic must arrive within a second of moving onto the path, or
  the routes go back to the hub. It stays so while bytes keep arriving: both
  agents send a heartbeat through every active path each second
  (``HEARTBEAT_INTERVAL``), so silence for longer than ``dead_after`` (the direct
  keepalive) means the path is gone. A passive path, whose neighbour may send no
  heartbeat, is judged by handshake age only.
- ``FAILED``: no handshake within the grace, nothing received for
  ``dead_after`` seconds, a stale handshake, or the peer vanished.

Handshake times are wall-clock epoch seconds (that is what WireGuard reports),
so ``now`` there is ``time.time()``; silence is measured by ``RxWatch`` on a
monotonic clock.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wg_autopeer.clock import next_on_grid
from wg_autopeer.wireguard.base import PeerState

HANDSHAKE_TIMEOUT = 10.0
STALE_AFTER = 180.0
SUPPRESS_BASE = 30.0
SUPPRESS_CAP = 600.0
# A pair that carried traffic within RECENTLY_HEALTHY seconds is retried after
# SUPPRESS_RECENT, without escalation: a Wi-Fi hiccup or a flapping link should
# not keep a path that worked a minute ago on the hub for ten minutes.
RECENTLY_HEALTHY = 600.0
SUPPRESS_RECENT = 10.0
# Each agent sends one small datagram per second through every active direct path.
HEARTBEAT_INTERVAL = 1.0
# How often paths are looked at: often while one is being proven, so that both
# sides of a pair move their routes within a fraction of a second of each other;
# twice a second while one carries traffic, so that a path that falls silent is
# seen within half a second of its last received byte (its failure itself is then
# judged at its exact deadline, see ``NextLook``): at most keepalive + 0.5 s of
# traffic is lost. While the active paths carry nothing but the agents' own
# heartbeats, once a second, in the wake-up that sends them: a path dying then
# costs nothing until traffic starts, and traffic starting on it is lost for at most
# keepalive + 1 s (its last byte is known to within a second), the bound the path
# switching benchmark holds either way.
PENDING_TICK = 0.2
ACTIVE_TICK = 0.5
IDLE_TICK = 1.0
# The agents' own chatter on an idle path, counted both ways: one heartbeat each way
# each second (96 bytes as a WireGuard data packet) and each side's port-unreachable
# answer to the other's (112): about 420 bytes a second, up to 560 when a window's
# edges catch one more of each. Anything above this is someone's traffic (a ping every
# 100 ms is 2,560 bytes a second both ways).
IDLE_BYTES_PER_SECOND = 1024.0
# Rates are taken over windows of three heartbeats, so one more or less at an edge
# does not make an idle path look busy.
TRAFFIC_WINDOW = 2.95
# A first handshake initiation is dropped when it reaches the neighbour before the
# neighbour has put us on its device: two agents told at the same moment add each other
# in the same millisecond, and both initiations cross. WireGuard tries again only after
# REKEY_TIMEOUT (5 s), all that time on the hub. A pending peer still without a handshake
# this long after it was added is re-created once, which makes the device initiate at
# once; the side with the greater key waits RECREATE_STAGGER longer, so that the two
# re-creations of a pair never cross in turn.
RECREATE_AFTER = 1.0
RECREATE_STAGGER = 0.5
# Two initiations that do cross can also leave a pair with a handshake on both sides
# and no session that carries data: wireguard-go consumes the other's initiation and
# the answer to its own in parallel workers, and one overwrites the state the other
# needs ("Failed to derive keypair: ... handshakeZeroed"); seen in about 1 of 30 joins
# in the lab. So the side with the greater key puts a new peer on its device this much
# later than the other: the lesser key's initiation then reaches a device that does not
# know it yet (dropped, no state touched), and the greater key's own initiation, a
# moment later, is the only one in flight.
ADD_STAGGER = 0.05
# The second line of defence, whatever the cause: a path moved onto must show the
# neighbour's traffic within this long, or its routes go back to the hub. Each agent
# sends a heartbeat the moment it moves its routes, and the other's answers or own
# heartbeat arrive within the two sides' skew (one PENDING_TICK) plus a round trip.
# Handshake messages count as received bytes too (a retry, the neighbour's handshake
# restart), so only growth they cannot make up counts: see ``carries_data``.
CONFIRM_WITHIN = 1.0
# Sizes of the WireGuard messages that count as received bytes without being data
# (a data message is 32 bytes plus its payload padded to 16).
HANDSHAKE_INITIATION_BYTES = 148
HANDSHAKE_RESPONSE_BYTES = 92
# A deadline look comes this much after the deadline: the verdict wants "longer than".
DEADLINE_SLACK = 0.02


@dataclass(frozen=True)
class NextLook:
    """When the path watch must look again (and send its heartbeats), and no sooner.

    ``tick``: look every so many seconds, on the grid of that period shared by every
    worker (``clock.next_on_grid``), so all interfaces wake together. ``within``: look
    at the latest that many seconds from now (a silent path reaching its deadline, a
    suppression running out), off the grid. Neither: only when something changes.
    """

    tick: float | None = None
    within: float | None = None

    def due(self, now: float) -> float | None:
        """The loop time of the next look, or None for none."""
        candidates: list[float] = []
        if self.tick is not None:
            candidates.append(next_on_grid(now, self.tick))
        if self.within is not None:
            candidates.append(now + max(0.0, self.within))
        return min(candidates, default=None)


def adds_later(own_key: str, peer_key: str) -> bool:
    """Whether this side puts a new peer on its device ``ADD_STAGGER`` after the other
    side does (it has the greater key of the pair)."""
    return own_key > peer_key


def carries_data(received: int) -> bool:
    """Whether ``received`` more bytes on a peer must include a data message: true
    unless handshake initiations and responses alone can make up that sum. (A sum they
    can make up may hold data too; the next look decides then.)"""
    initiation, response = HANDSHAKE_INITIATION_BYTES, HANDSHAKE_RESPONSE_BYTES
    return received > 0 and all(
        (received - initiations * initiation) % response
        for initiations in range(received // initiation + 1)
    )


def recreate_due(own_key: str, peer_key: str, pending_for: float) -> bool:
    """Whether a pending peer (no handshake yet) that was added ``pending_for`` seconds
    ago should now be re-created to restart its handshake (see ``RECREATE_AFTER``)."""
    stagger = RECREATE_STAGGER if own_key > peer_key else 0.0
    return pending_for >= RECREATE_AFTER + stagger


class PathState(enum.Enum):
    PENDING = "pending"
    PASSIVE = "passive"
    ACTIVE = "active"
    FAILED = "failed"


@dataclass(frozen=True)
class Health:
    """The verdict on one direct path; ``reason`` is set when it ``FAILED``."""

    state: PathState
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.state is PathState.FAILED

    @property
    def routable(self) -> bool:
        """The path is proven: the neighbour's routes belong on it."""
        return self.state is PathState.ACTIVE


PENDING = Health(PathState.PENDING)
PASSIVE = Health(PathState.PASSIVE)
ACTIVE = Health(PathState.ACTIVE)


def judge(
    peer: PeerState | None,
    *,
    routed: bool,
    passive: bool,
    added_at: float,
    now: float,
    rx_idle: float,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    dead_after: float = 3.0,
    stale_after: float = STALE_AFTER,
    unconfirmed_for: float | None = None,
) -> Health:
    """Judge one direct path as of ``now`` (epoch seconds).

    ``routed``: the neighbour's routes are on the peer now. ``passive``: the peer
    has no endpoint of ours to try. ``added_at``: when the agent put it on the
    device. ``rx_idle``: seconds since its received bytes last grew.
    ``unconfirmed_for``: seconds since its routes moved, while no data has been
    received since (None once some has: see ``CONFIRM_WITHIN``).
    ``peer`` is None when the peer is no longer on the device: a failure, since
    the agent put it there and something else took it away.
    """
    if peer is None:
        return Health(PathState.FAILED, "peer is no longer on the device")
    # Backends report "never" as None, but the kernel's raw value for it is 0.
    handshake = peer.latest_handshake or None
    fresh = handshake is not None and now - handshake <= stale_after
    if not routed:
        # A peer being proven was added fresh, so any handshake it has is with the
        # neighbour at this endpoint, and a completed one almost always means both ways
        # work; the traffic that must follow within CONFIRM_WITHIN settles it.
        if fresh and peer.rx_bytes > 0:
            return ACTIVE
        if passive:
            return PASSIVE
        if now - added_at < handshake_timeout:
            return PENDING
        return Health(PathState.FAILED, f"no handshake within {handshake_timeout:g} s")
    if handshake is None:
        return Health(PathState.FAILED, "no handshake")
    if not fresh:
        return Health(PathState.FAILED, f"handshake stale for {int(now - handshake)} s")
    if not passive and unconfirmed_for is not None and unconfirmed_for > CONFIRM_WITHIN:
        return Health(PathState.FAILED, f"nothing received in its first {CONFIRM_WITHIN:g} s")
    if not passive and rx_idle > dead_after:
        return Health(PathState.FAILED, f"nothing received for {rx_idle:.1f} s")
    return ACTIVE


class RxWatch:
    """How long each peer's received-bytes counter has stood still (monotonic seconds).

    ``clock`` is injectable so tests run on a fake clock without sleeping.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, tuple[int, float]] = {}

    def observe(self, public_key: str, rx_bytes: int) -> float:
        """Record the counter; returns seconds since it last grew (0 when it just did)."""
        now = self._clock()
        last = self._seen.get(public_key)
        # Any change counts: a counter that went down belongs to a re-created peer.
        if last is None or rx_bytes != last[0]:
            self._seen[public_key] = (rx_bytes, now)
            return 0.0
        return now - last[1]

    def silent_for(self, public_key: str) -> float | None:
        """Seconds since the counter last grew, as of now (None: never observed)."""
        last = self._seen.get(public_key)
        return None if last is None else self._clock() - last[1]

    def restart(self, public_key: str, rx_bytes: int) -> None:
        """Start the silence clock afresh at ``rx_bytes`` (a path just proven gets a
        full window, and only bytes received after this count as traffic on it)."""
        self._seen[public_key] = (rx_bytes, self._clock())

    def retain(self, public_keys: Iterable[str]) -> None:
        keep = set(public_keys)
        for key in [k for k in self._seen if k not in keep]:
            del self._seen[key]


class TrafficWatch:
    """Whether each direct path carries traffic beyond the agents' own heartbeats.

    Judged from the byte counters (received + sent) over windows of at least
    ``TRAFFIC_WINDOW``; a path not seen before counts as busy until a window shows
    otherwise. ``clock`` is injectable (monotonic seconds).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, tuple[int, float, bool]] = {}

    def observe(self, public_key: str, rx_bytes: int, tx_bytes: int) -> bool:
        """Record the counters; True while the path carries someone's traffic."""
        now = self._clock()
        total = rx_bytes + tx_bytes
        last = self._seen.get(public_key)
        if last is None:
            self._seen[public_key] = (total, now, True)
            return True
        then_total, then, busy = last
        # A counter that went down belongs to a re-created peer: busy until shown idle.
        grown = total - then_total if total >= then_total else math.inf
        if now - then < TRAFFIC_WINDOW:
            # Traffic starting shows before the window is over: enough bytes for all of it.
            if grown > IDLE_BYTES_PER_SECOND * TRAFFIC_WINDOW:
                self._seen[public_key] = (then_total, then, True)
                return True
            return busy
        busy = grown / (now - then) > IDLE_BYTES_PER_SECOND
        self._seen[public_key] = (total, now, busy)
        return busy

    def retain(self, public_keys: Iterable[str]) -> None:
        keep = set(public_keys)
        for key in [k for k in self._seen if k not in keep]:
            del self._seen[key]


@dataclass
class _Record:
    failures: int = 0
    until: float = 0.0
    healthy_at: float | None = None


class Suppressions:
    """Peers that failed and must not be re-added for a while.

    The period doubles per consecutive failure, from ``base`` up to ``cap``:
    a pair that never works (client isolation, a port-changing NAT) is retried ever
    more rarely, and quietly. A pair that was healthy within ``RECENTLY_HEALTHY``
    seconds is retried after ``SUPPRESS_RECENT`` instead. ``record_healthy`` forgets
    the failures. ``clock`` is monotonic seconds by default; tests inject their own.
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
        now = self._clock()
        if record.healthy_at is not None and now - record.healthy_at < RECENTLY_HEALTHY:
            period = min(self.base, SUPPRESS_RECENT)
        else:
            period = min(self.cap, self.base * 2.0 ** min(record.failures, 32))
            record.failures += 1
        record.until = now + period
        return period

    def record_healthy(self, public_key: str) -> None:
        """The peer works (now): its next failure is retried soon, and the one after
        that, should it never work again, starts the back-off from ``base``."""
        record = self._records.setdefault(public_key, _Record())
        record.failures = 0
        record.until = 0.0
        record.healthy_at = self._clock()

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
        now = self._clock()
        gone = [
            key
            for key, rec in self._records.items()
            if key not in keep
            and rec.until < now - self.cap
            and (rec.healthy_at is None or rec.healthy_at < now - RECENTLY_HEALTHY)
        ]
        for key in gone:
            del self._records[key]
