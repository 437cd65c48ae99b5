"""The debounce of netlink wake-ups, driven by hand: no root, no netlink."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

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


async def test_a_uapi_socket_appearing_or_going_is_a_wake_up(tmp_path: Path) -> None:
    # Real inotify on a temp dir: wireguard-go's socket sends no netlink event, and the
    # view re-reads on no timer while it can watch the dir.
    s = stream()
    try:
        assert s.watching_sockets(tmp_path)
        (tmp_path / "notes.txt").write_text("not a socket")
        assert await s.wait(0.3)  # returned on the timeout
        assert not s._wake.is_set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(tmp_path / "wg7.sock"))
            await asyncio.wait_for(s._wake.wait(), 2.0)
            s._wake.clear()
        (tmp_path / "wg7.sock").unlink()
        await asyncio.wait_for(s._wake.wait(), 2.0)
    finally:
        await s.stop()
    assert not s.watching_sockets(tmp_path)  # a stopped stream watches nothing


async def test_a_missing_socket_dir_is_watched_once_it_exists(tmp_path: Path) -> None:
    s = stream()
    try:
        missing = tmp_path / "wireguard"
        assert not s.watching_sockets(missing)  # the caller re-reads on a timer meanwhile
        missing.mkdir()
        assert s.watching_sockets(missing)
        missing.rmdir()
        # The dir going is a wake-up too, and drops the watch until it is back.
        await asyncio.wait_for(s._wake.wait(), 2.0)
        assert not s.watching_sockets(missing)
    finally:
        await s.stop()
