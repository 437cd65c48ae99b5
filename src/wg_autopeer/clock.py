"""The clocks the agent reads, bundled so tests can inject fake ones.

WireGuard reports handshakes in wall-clock epoch seconds, so judging their age
needs ``wall``; everything the agent times itself (silence on a path, back-off,
suppressions) uses ``monotonic``, which no clock adjustment moves. ``boottime``
runs on through a suspend where ``monotonic`` stops: their gap growing is how a
resume shows (``jump_between``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Clock:
    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    boottime: Callable[[], float] = _boottime

    def read(self) -> ClockReading:
        return ClockReading(self.wall(), self.monotonic(), self.boottime())


@dataclass(frozen=True)
class ClockReading:
    wall: float
    monotonic: float
    boottime: float


# Scheduling noise between the three reads stays far below this.
JUMP_TOLERANCE = 2.0


def jump_between(before: ClockReading, after: ClockReading) -> str | None:
    """Why the time between the two readings is not what ``monotonic`` says (a resume
    from suspend, or the wall clock set), or None when nothing happened. Pure."""
    suspended = (after.boottime - after.monotonic) - (before.boottime - before.monotonic)
    if suspended > JUMP_TOLERANCE:
        return f"resumed after {suspended:.0f} s of suspend"
    shift = (after.wall - after.monotonic) - (before.wall - before.monotonic)
    if abs(shift) > JUMP_TOLERANCE:
        return f"the wall clock jumped by {shift:+.0f} s"
    return None


SYSTEM_CLOCK = Clock()


# How far before a grid instant a timer may read the clock and still count as on it.
GRID_SLACK = 0.01


def next_on_grid(now: float, period: float) -> float:
    """The first multiple of ``period`` after ``now`` (loop seconds).

    Every timer of the agent that repeats with a period sleeps until such an instant,
    so timers with the same period (the path watch of each interface, its heartbeats,
    the clock check) come due at the very same instants and cost the process one
    wake-up between them, not one each.
    """
    if period <= 0:
        raise ValueError(f"a period must be positive, got {period}")
    return (math.floor(now / period) + 1) * period


async def sleep_until(when: float) -> None:
    """Sleep until the loop time ``when`` exactly (``asyncio.sleep`` adds its delay to a
    fresh reading of the clock, which would put each task a hair off the shared grid,
    and a hair is a separate wake-up)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    handle = loop.call_at(when, done.set_result, None)
    try:
        await done
    finally:
        handle.cancel()
