"""Nothing dies silently: failures are logged, shown, restarted; persistent ones end the agent."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from test_agent_paths import BOB_OFFER, SNAPSHOT, WG, FakeTime, StillNetView

from wg_autopeer.agent.config import AgentConfig
from wg_autopeer.agent.daemon import Agent
from wg_autopeer.agent.supervise import Supervisor
from wg_autopeer.agent.worker import InterfaceWorker
from wg_autopeer.errors import LedgerError
from wg_autopeer.wireguard.fake import FakeWireGuard


async def test_failing_task_is_logged_shown_degraded_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    given_up: list[str] = []
    supervisor = Supervisor(given_up.append, monotonic=lambda: 0.0, base=0.001, cap=0.001)
    runs = 0
    seen_degraded: list[str] = []

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        seen_degraded.append(supervisor.degraded.get("flaky", ""))
        if runs < 3:
            raise LedgerError("cannot write ledger /x: disk full")

    with caplog.at_level(logging.ERROR):
        await supervisor.run("flaky", flaky)
    assert runs == 3
    reason = "LedgerError: cannot write ledger /x: disk full"
    assert seen_degraded == ["", reason, reason]  # shown while it is being restarted
    assert supervisor.degraded == {}  # it ended well
    assert given_up == []
    assert sum("flaky failed" in r.message for r in caplog.records) == 2
    assert all(r.exc_info for r in caplog.records if "flaky failed" in r.message)


async def test_task_that_keeps_failing_gives_up_once() -> None:
    given_up: list[str] = []
    supervisor = Supervisor(
        given_up.append, monotonic=lambda: 0.0, base=0.001, cap=0.001, give_up_after=4
    )
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("bug")

    await supervisor.run("broken", broken)
    assert (runs, given_up) == (4, ["broken"])
    assert supervisor.degraded == {"broken": "RuntimeError: bug"}


async def test_a_long_healthy_run_resets_the_count() -> None:
    given_up: list[str] = []
    now = [0.0]
    supervisor = Supervisor(
        given_up.append, monotonic=lambda: now[0], base=0.001, cap=0.001, give_up_after=2
    )
    runs = 0

    async def fails_after_a_long_run() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            now[0] += 61.0  # each run lasted over a minute before it failed
            raise RuntimeError("hiccup")

    await supervisor.run("hiccups", fails_after_a_long_run)
    assert (runs, given_up) == (4, [])


async def test_a_ledger_that_cannot_be_read_degrades_the_path_watch_visibly(
    tmp_path: Path,
) -> None:
    # The state dir is a file: every ledger read fails (as on a broken disk).
    state = tmp_path / "state"
    state.write_text("not a directory")
    device = FakeWireGuard()
    device.add_device(WG, "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=")
    config = replace(AgentConfig(), state_dir=state, runtime_dir=tmp_path, tray=False)
    agent = Agent(config, device, StillNetView(), clock=FakeTime().clock())
    agent.snapshot = SNAPSHOT
    worker = InterfaceWorker(agent, WG)
    agent.workers[WG] = worker
    worker.accepted = (BOB_OFFER,)
    watch = asyncio.create_task(agent.supervisor.run(f"path watch {WG}", worker.watch_paths))
    try:
        await asyncio.wait_for(agent.supervisor.failed.wait(), timeout=5)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    status = await agent.handle_command("status")
    assert "LedgerError" in status["degraded"][f"path watch {WG}"]
