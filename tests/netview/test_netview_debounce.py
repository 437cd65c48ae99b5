"""The debounce of netlink wake-ups, driven by hand: no root, no netlink."""

from __future__ import annotations

import asyncio
import contextlib
import time

from wg_autopeer.netview.linux import _EventStream


def stream() -> _EventStream:
    def never(_groups: int) -> object:
        raise AssertionError("not opened in this test")

    return _EventStream(never, "test")  # type: ignore[arg-type]


async def test_settle_returns_after_a_quiet_gap() -> None:
    s = stream()
    started = time.monotonic()
    assert await s.settle(quiet=0.05, max_delay=1.0)
    assert time.monotonic() - started < 0.5


async def test_settle_gives_up_waiting_for_quiet_at_max_delay() -> None:
    s = stream()

    async def chatter() -> None:
        while True:
            s._wake.set()
            await asyncio.sleep(0.01)

    noise = asyncio.create_task(chatter())
    try:
        started = time.monotonic()
        assert await s.settle(quiet=0.1, max_delay=0.3)
        elapsed = time.monotonic() - started
    finally:
        noise.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await noise
    assert 0.3 <= elapsed < 0.6


async def test_stopped_stream_wakes_its_waiter_and_says_so() -> None:
    s = stream()
    waiter = asyncio.create_task(s.wait(None))
    await asyncio.sleep(0)
    await s.stop()
    assert await asyncio.wait_for(waiter, 1.0) is False
