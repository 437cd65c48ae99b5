"""The worker's path watch on an in-memory device and a fake clock: prove, route, fall back.

No root, no network, no sleeping: the device is ``FakeWireGuard``, handshakes and
received bytes are set on it by hand, and time moves only when the test says so.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Interface, ip_address, ip_network
from pathlib import Path

import pytest
from agent_keys import key

from wg_autopeer.agent.config import AgentConfig
from wg_autopeer.agent.daemon import Agent
from wg_autopeer.agent.health import (
    ACTIVE_TICK,
    ADD_STAGGER,
    CONFIRM_WITHIN,
    DEADLINE_SLACK,
    HEARTBEAT_INTERVAL,
    IDLE_TICK,
    PENDING_TICK,
    RECREATE_AFTER,
    RECREATE_STAGGER,
    NextLook,
)
from wg_autopeer.agent.safety import DirectPeer
from wg_autopeer.agent.worker import InterfaceWorker
from wg_autopeer.clock import Clock, next_on_grid
from wg_autopeer.netview.base import NetView
from wg_autopeer.netview.model import Address, DefaultRoute, Link, NetChange, NetSnapshot
from wg_autopeer.wireguard.base import Endpoint, PeerState
from wg_autopeer.wireguard.fake import FakeWireGuard

WG = "wg0"
OWN, HUB, BOB = key(1), key(2), key(4)
BOB_ROUTE = ip_network("10.99.0.3/32")
BOB_LAN = Endpoint(ip_address("192.168.50.11"), 51820)
BOB_OFFER = DirectPeer(BOB, BOB_LAN, (BOB_ROUTE,))
HUB_ROUTES = (ip_network("10.99.0.0/24"),)
SNAPSHOT = NetSnapshot(
    links=(Link(1, "eth0", True), Link(2, WG, True, "wireguard", is_wireguard=True)),
    addresses=(
        Address(1, "eth0", IPv4Interface("192.168.50.10/24")),
        Address(2, WG, IPv4Interface("10.99.0.2/24")),
    ),
    default_routes=(DefaultRoute(1, "eth0", ip_address("192.168.50.1")),),
)


@dataclass
class FakeTime:
    wall: float = 1_700_000_000.0
    mono: float = 5_000.0
    boot: float = 5_100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds
        self.boot += seconds

    def suspend(self, seconds: float) -> None:
        """Time passes, but not for CLOCK_MONOTONIC (Linux stops it in suspend)."""
        self.wall += seconds
        self.boot += seconds

    def clock(self) -> Clock:
        return Clock(
            wall=lambda: self.wall, monotonic=lambda: self.mono, boottime=lambda: self.boot
        )


class StillNetView(NetView):
    async def snapshot(self) -> NetSnapshot:
        return SNAPSHOT

    async def changes(self) -> AsyncIterator[NetChange]:  # pragma: no cover - never iterated
        return
        yield

    async def close(self) -> None:
        pass


@pytest.fixture
def time_() -> FakeTime:
    return FakeTime()


@pytest.fixture
def device() -> FakeWireGuard:
    fake = FakeWireGuard()
    fake.add_device(
        WG, OWN, peers=(PeerState(HUB, HUB_ROUTES, Endpoint(ip_address("203.0.113.1"), 51820)),)
    )
    return fake


@pytest.fixture
def worker(tmp_path: Path, device: FakeWireGuard, time_: FakeTime) -> InterfaceWorker:
    config = replace(AgentConfig(), state_dir=tmp_path, runtime_dir=tmp_path, tray=False)
    agent = Agent(config, device, StillNetView(), clock=time_.clock())
    agent.snapshot = SNAPSHOT
    worker = InterfaceWorker(agent, WG)
    agent.workers[WG] = worker
    return worker


async def bob(device: FakeWireGuard) -> PeerState | None:
    return (await device.get_device(WG)).peer(BOB)


async def offered(worker: InterfaceWorker, *peers: DirectPeer) -> None:
    worker.accepted = peers
    await worker.reconcile(HUB)


async def assert_back_on_the_hub(worker: InterfaceWorker, device: FakeWireGuard) -> None:
    """bob's routes are the hub's again, and bob is not tried again for a while."""
    hub = (await device.get_device(WG)).peer(HUB)
    assert hub is not None
    assert hub.allowed_ips == HUB_ROUTES
    assert worker.suppressions.is_suppressed(BOB)


async def test_new_neighbour_waits_unrouted_until_its_handshake(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    await offered(worker, BOB_OFFER)
    peer = await bob(device)
    assert peer is not None
    assert (peer.endpoint, peer.allowed_ips, peer.persistent_keepalive) == (BOB_LAN, (), 3)
    assert await worker.check_paths() == NextLook(PENDING_TICK)
    assert worker.status.direct_peers[0].health == "pending"
    assert not worker.status.direct_peers[0].routed

    time_.advance(0.4)
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=92)
    await worker.check_paths()
    peer = await bob(device)
    assert peer is not None
    assert peer.allowed_ips == (BOB_ROUTE,)
    assert peer.endpoint == BOB_LAN
    await worker.check_paths()
    assert (worker.status.direct_peers[0].health, worker.status.direct_peers[0].routed) == (
        "active",
        True,
    )


async def test_pending_peer_is_recreated_once_per_addition(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    def recreations(additions: int) -> int:
        # A re-creation is a removal and a set; every addition is one set more.
        return sum(1 for w in device.writes if w == ("set_peer", WG, BOB)) - additions

    # Whichever key is the greater: past both the first re-creation and the staggered one.
    due = RECREATE_AFTER + RECREATE_STAGGER + 0.1
    for addition in (1, 2):
        await offered(worker, BOB_OFFER)
        await worker.check_paths()
        assert recreations(addition) == addition - 1  # a new peer is given its second
        time_.advance(due)
        await worker.check_paths()
        assert recreations(addition) == addition
        assert await bob(device) is not None  # re-created: still there, still pending
        time_.advance(due)
        await worker.check_paths()
        assert recreations(addition) == addition  # once per addition, not every second
        # The neighbour leaves (its offer withdrawn) and the watch goes quiet with it;
        # when it comes back it is a new peer whose first handshakes may cross again.
        await offered(worker)
        assert await bob(device) is None
        assert await worker.check_paths() == NextLook()
        time_.advance(1.0)


async def test_the_greater_key_puts_a_new_peer_on_its_device_a_moment_after_the_other(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    lesser = key(0)
    assert lesser < OWN < BOB
    await offered(worker, DirectPeer(lesser, BOB_LAN, (BOB_ROUTE,)), BOB_OFFER)
    on_device = await device.get_device(WG)
    # Our key is the lesser of the pair with bob: he goes on at once.
    assert on_device.peer(BOB) is not None
    assert on_device.peer(lesser) is None
    look = await worker.check_paths()
    assert look.within == pytest.approx(ADD_STAGGER)
    time_.advance(ADD_STAGGER)
    await worker.check_paths()
    assert (await device.get_device(WG)).peer(lesser) is not None


async def test_silent_active_path_goes_back_to_the_hub_after_the_keepalive(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    await offered(worker, BOB_OFFER)
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=92)
    await worker.check_paths()
    assert worker.proven == {BOB}
    for rx in (200, 300):  # heartbeats arriving
        time_.advance(1.0)
        device.update_peer(WG, BOB, rx_bytes=rx)
        await worker.check_paths()
    time_.advance(2.9)
    await worker.check_paths()
    assert await bob(device) is not None  # within the keepalive: still direct
    time_.advance(0.3)
    await worker.check_paths()
    assert await bob(device) is None  # silent for 3.2 s: removed, routes back on the hub
    await assert_back_on_the_hub(worker, device)


async def routed_after_a_handshake(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    """bob is offered, handshakes (an initiation and a response received: 240 bytes)
    and gets his routes."""
    await offered(worker, BOB_OFFER)
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=240)
    await worker.check_paths()
    peer = await bob(device)
    assert peer is not None
    assert peer.allowed_ips == (BOB_ROUTE,)


async def test_path_moved_onto_that_carries_nothing_goes_back_to_the_hub_within_a_second(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    # Both sides saw a handshake (wireguard-go can complete one with no session that
    # carries data): the routes move, but the neighbour's traffic never follows.
    await routed_after_a_handshake(worker, device, time_)
    # Looked at often, and at the confirmation deadline, not a keepalive later.
    look = await worker.check_paths()
    assert look.tick == PENDING_TICK
    assert look.within == pytest.approx(CONFIRM_WITHIN + DEADLINE_SLACK)
    # A handshake initiation arriving (the neighbour restarting its handshake) is no data.
    time_.advance(0.5)
    device.update_peer(WG, BOB, rx_bytes=240 + 148)
    look = await worker.check_paths()
    assert look.within == pytest.approx(CONFIRM_WITHIN - 0.5 + DEADLINE_SLACK)
    time_.advance(CONFIRM_WITHIN - 0.5 + DEADLINE_SLACK)
    await worker.check_paths()
    assert await bob(device) is None
    await assert_back_on_the_hub(worker, device)


async def test_path_whose_neighbour_answers_is_then_judged_by_the_keepalive(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    await routed_after_a_handshake(worker, device, time_)
    time_.advance(0.2)
    device.update_peer(WG, BOB, rx_bytes=336)  # the neighbour's first heartbeat
    await worker.check_paths()
    assert worker.unconfirmed == {}
    time_.advance(worker.agent.config.persistent_keepalive - 0.1)
    await worker.check_paths()
    peer = await bob(device)
    assert peer is not None
    assert peer.allowed_ips == (BOB_ROUTE,)  # silent for less than the keepalive


async def test_path_that_never_handshakes_fails_quietly_without_ever_routing(
    worker: InterfaceWorker,
    device: FakeWireGuard,
    time_: FakeTime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="wg_autopeer")
    writes: list[tuple[str, ...]] = []
    config = worker.agent.config
    # Before any answer said the server holds queries, the grace includes a polling interval.
    grace = config.handshake_timeout + config.interval
    for _ in range(3):
        await offered(worker, BOB_OFFER)
        peer = await bob(device)
        assert peer is not None
        assert peer.allowed_ips == ()
        time_.advance(grace + 0.1)
        await worker.check_paths()
        assert await bob(device) is None
        writes += [w for w in device.writes if w[0] == "set_allowed_ips"]
        time_.advance(worker.suppressions.remaining(BOB) + 0.1)
    assert writes == []  # no route ever moved
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "failed" in r.message]
    assert len(warnings) == 1  # logged once; the retries go to debug


async def test_passive_neighbour_has_no_deadline_and_is_routed_on_its_handshake(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    passive = DirectPeer(BOB, None, (BOB_ROUTE,))
    await offered(worker, passive)
    peer = await bob(device)
    assert peer is not None
    assert (peer.endpoint, peer.allowed_ips) == (None, ())
    time_.advance(3600)
    await worker.check_paths()
    assert worker.status.direct_peers[0].health == "passive"
    # The neighbour's handshake arrives and WireGuard roams the endpoint in.
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=148, endpoint=BOB_LAN)
    await worker.check_paths()
    peer = await bob(device)
    assert peer is not None
    assert (peer.endpoint, peer.allowed_ips) == (BOB_LAN, (BOB_ROUTE,))
    # Its silence alone does not drop it (the seed's agent sends no heartbeat)...
    time_.advance(60)
    await worker.check_paths()
    peer = await bob(device)
    assert peer is not None
    assert peer.allowed_ips == (BOB_ROUTE,)
    # ...a stale handshake takes the routes back, and the key stays for its next one.
    time_.advance(121)
    await worker.check_paths()
    peer = await bob(device)
    assert peer is not None
    assert peer.allowed_ips == ()


async def test_working_endpoint_is_not_overwritten_by_another_offered_port(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    nat_port = DirectPeer(BOB, Endpoint(BOB_LAN.address, 40000), (BOB_ROUTE,))
    await offered(worker, nat_port)
    # bob's own handshake came from his real port: WireGuard roamed the endpoint.
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=92, endpoint=BOB_LAN)
    await worker.check_paths()
    device.writes.clear()
    await offered(worker, DirectPeer(BOB, Endpoint(BOB_LAN.address, 40001), (BOB_ROUTE,)))
    await offered(worker, nat_port)
    assert device.writes == []
    peer = await bob(device)
    assert peer is not None
    assert (peer.endpoint, peer.allowed_ips) == (BOB_LAN, (BOB_ROUTE,))


async def test_status_shows_a_new_peer_at_once_and_drops_a_removed_one(
    worker: InterfaceWorker,
) -> None:
    passive = DirectPeer(key(5), None, (ip_network("10.99.0.5/32"),))
    await offered(worker, BOB_OFFER, passive)
    # No path check has run yet: status already tells what is on the device.
    shown = {(p.public_key, p.health, p.routed) for p in worker.status.direct_peers}
    assert shown == {(BOB, "pending", False), (key(5), "passive", False)}
    await offered(worker, passive)
    assert [p.public_key for p in worker.status.direct_peers] == [key(5)]


async def test_resume_from_suspend_restarts_paths_instead_of_failing_them(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    await offered(worker, BOB_OFFER)
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=92)
    await worker.check_paths()
    assert worker.proven == {BOB}
    agent = worker.agent
    assert agent.notice_clock_jump() is None
    # An hour of suspend: wall and boot time move on, the monotonic clock does not.
    time_.suspend(3600)
    why = agent.notice_clock_jump()
    assert why == "resumed after 3600 s of suspend"
    assert worker.wake.is_set()  # re-sync at once
    await worker.check_paths()
    peer = await bob(device)
    assert peer is not None  # not failed and suppressed as stale...
    assert peer.allowed_ips == ()  # ...but back on the hub until proven again
    assert not worker.suppressions.is_suppressed(BOB)
    time_.advance(1.0)
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=400)
    await worker.check_paths()
    peer = await bob(device)
    assert peer is not None
    assert peer.allowed_ips == (BOB_ROUTE,)


async def test_wall_clock_jump_is_noticed(worker: InterfaceWorker, time_: FakeTime) -> None:
    time_.wall -= 7200  # NTP, or a user setting the clock back
    assert worker.agent.notice_clock_jump() == "the wall clock jumped by -7200 s"


async def looks_in_a_minute(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime, bytes_per_second: int
) -> tuple[int, float]:
    """Drive the path watch's schedule on the fake clock for a minute, the neighbour's
    bytes arriving at ``bytes_per_second``; returns the looks and the tick they kept."""
    await offered(worker, BOB_OFFER)
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=92)
    look = await worker.check_paths()
    rx, looks, ticks = 92, 0, set[float]()
    settled = time_.mono + 5.0  # a new path counts as busy until a window shows otherwise
    while True:
        due = look.due(time_.mono)
        assert due is not None
        if due > settled + 60.0:
            break
        assert look.tick is not None
        # On the grid every worker shares: the interfaces' looks fall together.
        assert due == next_on_grid(time_.mono, look.tick)
        rx += round(bytes_per_second * (due - time_.mono))
        time_.advance(due - time_.mono)
        device.update_peer(WG, BOB, rx_bytes=rx, tx_bytes=rx)
        look = await worker.check_paths()
        if time_.mono > settled:
            looks += 1
            assert look.tick is not None
            ticks.add(look.tick)
    assert worker.proven == {BOB}
    assert len(ticks) == 1
    return looks, ticks.pop()


async def test_idle_active_path_is_looked_at_once_a_second_with_its_heartbeats(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    # Nothing but the heartbeats (96 bytes each way each second): one look a second,
    # the same wake-up that sends them (HEARTBEAT_INTERVAL), and none in between.
    looks, tick = await looks_in_a_minute(worker, device, time_, 96)
    assert (looks, tick) == (60, IDLE_TICK)
    assert tick == HEARTBEAT_INTERVAL


async def test_busy_active_path_is_looked_at_twice_a_second(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    # A ping every 100 ms: a path dying is seen within half a second.
    looks, tick = await looks_in_a_minute(worker, device, time_, 1280)
    assert (looks, tick) == (120, ACTIVE_TICK)


async def test_silent_path_is_looked_at_on_its_deadline_not_a_tick_later(
    worker: InterfaceWorker, device: FakeWireGuard, time_: FakeTime
) -> None:
    await offered(worker, BOB_OFFER)
    device.update_peer(WG, BOB, latest_handshake=time_.wall, rx_bytes=92)
    await worker.check_paths()
    time_.advance(0.1)
    device.update_peer(WG, BOB, rx_bytes=200)
    await worker.check_paths()  # the last byte that will ever arrive
    time_.advance(2.9)  # a tick, on the grid: silent for 2.9 s, not yet dead
    look = await worker.check_paths()
    assert await bob(device) is not None
    keepalive = worker.agent.config.persistent_keepalive
    assert look.within == pytest.approx(keepalive - 2.9 + DEADLINE_SLACK)
    due = look.due(time_.mono)
    assert due is not None
    assert due < next_on_grid(time_.mono, ACTIVE_TICK)
    time_.advance(due - time_.mono)
    await worker.check_paths()
    assert await bob(device) is None  # judged dead at the deadline itself


async def test_worker_without_direct_peers_never_looks() -> None:
    assert NextLook().due(123.0) is None


def test_timers_of_the_same_period_share_their_instants() -> None:
    # Two interfaces whose watches started at different moments still wake together.
    assert next_on_grid(1000.13, 0.5) == next_on_grid(1000.41, 0.5) == 1000.5
    assert next_on_grid(1000.5, 0.5) == 1001.0  # strictly after now
    # The heartbeat (1 s) and clock check (5 s) instants are instants of the 0.5 s grid.
    assert next_on_grid(1003.7, 5.0) == 1005.0
