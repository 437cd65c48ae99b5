"""The agent's polling mode (``push = false``, ``first_report_delay``): the benchmarks'
baseline of the original design. Unit tests with an in-memory device and a stub client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Interface, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from agent_keys import key

from wg_autopeer.agent.client import ReportResult
from wg_autopeer.agent.config import AgentConfig, load_agent_config
from wg_autopeer.agent.daemon import Agent, InterfaceWorker
from wg_autopeer.errors import ConfigError
from wg_autopeer.netview.base import NetView
from wg_autopeer.netview.model import Address, DefaultRoute, Link, NetChange, NetSnapshot
from wg_autopeer.protocol import LanEntry, PeeringAnswer
from wg_autopeer.wireguard.base import Endpoint, PeerState
from wg_autopeer.wireguard.fake import FakeWireGuard

WG = "wg0"
HUB = key(2)


def snapshot(lan: str = "192.168.50.10/24", gateway: str = "192.168.50.1") -> NetSnapshot:
    return NetSnapshot(
        links=(Link(1, "eth0", True), Link(2, WG, True, "wireguard", is_wireguard=True)),
        addresses=(
            Address(1, "eth0", IPv4Interface(lan)),
            Address(2, WG, IPv4Interface("10.99.0.2/24")),
        ),
        default_routes=(DefaultRoute(1, "eth0", ip_address(gateway)),),
    )


class ScriptedNetView(NetView):
    """Yields the changes put into its queue; ``handled`` is set once the consumer asked
    for the next one, i.e. when it has finished with the last."""

    def __init__(self, first: NetSnapshot) -> None:
        self.first = first
        self.queue: asyncio.Queue[NetChange] = asyncio.Queue()
        self.handled = asyncio.Event()

    async def snapshot(self) -> NetSnapshot:
        return self.first

    async def changes(self) -> AsyncIterator[NetChange]:
        while True:
            yield await self.queue.get()
            self.handled.set()

    async def close(self) -> None:
        pass


@dataclass
class StubClient:
    """Answers every report with no neighbours and an ETag, like this project's server."""

    local_address: str | None = "10.99.0.2"
    calls: list[tuple[str | None, int | None]] = field(default_factory=list)
    reported: asyncio.Event = field(default_factory=asyncio.Event)

    async def report(
        self,
        url: str,
        entries: Sequence[LanEntry],
        *,
        etag: str | None = None,
        wait: int | None = None,
    ) -> ReportResult:
        self.calls.append((etag, wait))
        self.reported.set()
        if etag is not None:
            return ReportResult(None, etag, True, True)
        return ReportResult(PeeringAnswer(peers=[]), '"v1"', False, True)

    async def serves_peering(self, url: str) -> str | None:
        return None

    async def leave(self, url: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


def make_agent(tmp_path: Path, **config: Any) -> tuple[Agent, InterfaceWorker, StubClient]:
    control = FakeWireGuard()
    control.add_device(
        WG,
        key(1),
        peers=(
            PeerState(
                HUB,
                (ip_network("10.99.0.0/24"),),
                Endpoint(ip_address("203.0.113.1"), 51820),
                latest_handshake=1.0,
            ),
        ),
    )
    settings = replace(AgentConfig(), state_dir=tmp_path, runtime_dir=tmp_path, tray=False)
    agent = Agent(replace(settings, **config), control, ScriptedNetView(snapshot()))
    agent.snapshot = snapshot()
    worker = InterfaceWorker(agent, WG)
    stub = StubClient()
    worker._client_for = lambda tunnel: stub  # type: ignore[assignment,method-assign,return-value]
    agent.workers[WG] = worker
    return agent, worker, stub


async def watching(agent: Agent) -> asyncio.Task[None]:
    """Run the agent's network watcher with the worker registered as already running, so
    the watcher drives this worker instead of starting a real one."""
    parked = asyncio.get_running_loop().create_future()
    agent._tasks[WG] = asyncio.ensure_future(parked)
    return asyncio.create_task(agent._watch_network())


async def stop(task: asyncio.Task[None], agent: Agent) -> None:
    task.cancel()
    agent._tasks[WG].cancel()
    await asyncio.gather(task, agent._tasks[WG], return_exceptions=True)


async def test_push_mode_follows_up_with_a_blocking_query(tmp_path: Path) -> None:
    _, worker, stub = make_agent(tmp_path)
    await worker._cycle()
    await worker._cycle()
    assert stub.calls == [(None, None), ('"v1"', 25)]


async def test_poll_mode_never_blocks_and_waits_the_interval(tmp_path: Path) -> None:
    _, worker, stub = make_agent(tmp_path, push=False)
    delays = [await worker._cycle() for _ in range(3)]
    # Three plain POSTs, even though the server offered an ETag each time.
    assert stub.calls == [(None, None)] * 3
    assert delays == [30.0] * 3


async def test_poll_mode_does_not_report_on_a_network_change(tmp_path: Path) -> None:
    agent, worker, _ = make_agent(tmp_path, push=False)
    netview = agent.netview
    assert isinstance(netview, ScriptedNetView)
    watcher = await watching(agent)
    try:
        moved = snapshot("192.168.60.10/24", "192.168.60.1")
        await netview.queue.put(NetChange(agent.snapshot, moved, ("moved",)))
        await asyncio.wait_for(netview.handled.wait(), timeout=5)
    finally:
        await stop(watcher, agent)
    # The watcher took the new snapshot (so the next scheduled report is current)...
    assert agent.snapshot == moved
    # ...but did not wake the worker to report now.
    assert not worker.wake.is_set()


async def test_push_mode_reports_at_once_on_a_network_change(tmp_path: Path) -> None:
    agent, worker, _ = make_agent(tmp_path)
    netview = agent.netview
    assert isinstance(netview, ScriptedNetView)
    watcher = await watching(agent)
    try:
        moved = snapshot("192.168.60.10/24", "192.168.60.1")
        await netview.queue.put(NetChange(agent.snapshot, moved, ("moved",)))
        await asyncio.wait_for(worker.wake.wait(), timeout=5)
    finally:
        await stop(watcher, agent)


async def test_first_report_waits_for_the_configured_delay(tmp_path: Path) -> None:
    _, worker, stub = make_agent(tmp_path, first_report_delay=600.0)
    runner = asyncio.create_task(worker.run())
    try:
        for _ in range(20):
            await asyncio.sleep(0)
        assert stub.calls == []
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_without_a_delay_the_first_report_goes_at_once(tmp_path: Path) -> None:
    _, worker, stub = make_agent(tmp_path)
    runner = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(stub.reported.wait(), timeout=5)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def test_poll_mode_keys_are_read_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("push = false\nfirst_report_delay = 5\n")
    config = load_agent_config(path)
    assert config.push is False
    assert config.first_report_delay == 5.0
    assert AgentConfig().push is True
    assert AgentConfig().first_report_delay == 0.0


@pytest.mark.parametrize(("text", "bad"), [("push = 1", "push"), ("first_report_delay = -1", "")])
def test_bad_poll_mode_values_are_refused(tmp_path: Path, text: str, bad: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=bad or "first_report_delay"):
        load_agent_config(path)
