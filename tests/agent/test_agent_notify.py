"""systemd readiness: the notify datagram, and the agent's "first sync done" moment.

The end-to-end check (a real agent in a lab sends READY=1 once it has reported)
is in test_status_lab.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from agent_keys import key

from wg_autopeer import sdnotify
from wg_autopeer.agent.config import AgentConfig
from wg_autopeer.agent.daemon import Agent
from wg_autopeer.netview.base import NetView
from wg_autopeer.netview.model import NetChange, NetSnapshot
from wg_autopeer.wireguard.fake import FakeWireGuard


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """What systemd binds: a unix datagram socket, and the NOTIFY_SOCKET naming it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    assert sdnotify.notify("READY=1", env={}) is False


def test_ready_sends_ready_and_status_to_the_notify_socket(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready("first sync done") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=first sync done"
    assert sdnotify.stopping() is True
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_notify_socket_is_reached_by_its_at_name() -> None:
    name = f"wg-autopeer-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(64) == b"READY=1"


def test_gone_service_manager_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        sent = sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert sent is False
    assert "could not notify the service manager" in caplog.text


async def test_ready_when_waits_for_the_event(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    sock.setblocking(False)
    event = asyncio.Event()
    task = asyncio.create_task(sdnotify.ready_when(event, "ok"))
    await asyncio.sleep(0)
    with pytest.raises(BlockingIOError):
        sock.recv(64)
    event.set()
    await asyncio.wait_for(task, 5)
    assert sock.recv(64) == b"READY=1\nSTATUS=ok"


class StillNetView(NetView):
    """A network that never changes."""

    def __init__(self, snapshot: NetSnapshot) -> None:
        self._snapshot = snapshot

    async def snapshot(self) -> NetSnapshot:
        return self._snapshot

    async def changes(self) -> AsyncIterator[NetChange]:
        await asyncio.Event().wait()
        yield NetChange(self._snapshot, self._snapshot, ())  # never reached

    async def close(self) -> None:
        pass


async def _first_sync(control: FakeWireGuard, tmp_path: Path) -> Agent:
    agent = Agent(
        AgentConfig(state_dir=tmp_path, interval=60), control, StillNetView(NetSnapshot())
    )
    runner = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.first_sync_done.wait(), 5)
    finally:
        agent.stop()
        await asyncio.wait_for(runner, 10)
    return agent


async def test_first_sync_is_done_at_once_when_there_is_no_interface(tmp_path: Path) -> None:
    agent = await _first_sync(FakeWireGuard(), tmp_path)
    assert agent.workers == {}


async def test_first_sync_is_done_after_each_interface_had_its_first_cycle(
    tmp_path: Path,
) -> None:
    control = FakeWireGuard()
    control.add_device("wg0", key(1))
    control.add_device("wg1", key(2))
    agent = await _first_sync(control, tmp_path)
    # No LAN here (no default route): each worker's first cycle decided so, and that counts.
    assert set(agent.workers) == {"wg0", "wg1"}
    assert all(w.first_cycle_done.is_set() for w in agent.workers.values())


def test_watchdog_period_is_systemds_when_meant_for_us() -> None:
    from wg_autopeer.sdnotify import watchdog_period

    assert watchdog_period({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_period({}) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None
