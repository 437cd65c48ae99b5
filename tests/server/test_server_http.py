"""The server over real HTTP on loopback: uvicorn with the product's configuration."""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import ip_address

import pytest
import uvicorn
from fastapi import FastAPI
from server_fakes import Hub

from wg_autopeer.server.app import GIL_SWITCH_S
from wg_autopeer.server.command import open_socket
from wg_autopeer.server.config import ListenAddress
from wg_autopeer.server.http import uvicorn_config

pytestmark = pytest.mark.asyncio


def command_socket() -> socket.socket:
    """A listening socket as ``wg-autopeer server`` opens it."""
    return open_socket(ListenAddress(ip_address("127.0.0.1"), 0))


def plain_socket() -> socket.socket:
    """A listening socket made without naming TCP (proto 0), as systemd or a caller may."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serving(app: FastAPI, sock: socket.socket) -> AsyncIterator[int]:
    """Serve ``app`` on ``sock`` with the product's uvicorn configuration; yields the port."""
    server = uvicorn.Server(uvicorn_config(app))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    try:
        while not server.started:
            assert not task.done(), "the server did not start"
            assert loop.time() < deadline, "the server did not start in time"
            await asyncio.sleep(0.01)
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()


def keep_alive_round_trips(port: int, count: int) -> list[float]:
    """Seconds per ``GET /healthz``, ``count`` of them in turn over one connection.

    The client turns Nagle off on its side, as curl does, so any wait is the server's.
    """
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answers = conn.makefile("rb")
        for _ in range(count):
            started = time.perf_counter()
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
            status = answers.readline()
            assert status.startswith(b"HTTP/1.1 "), status
            length = None
            while (line := answers.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                assert name.strip().lower() != b"connection" or b"close" not in value.lower()
            assert length is not None
            assert len(answers.read(length)) == length
            times.append(time.perf_counter() - started)
    return times


@pytest.mark.parametrize("make_socket", [command_socket, plain_socket])
async def test_answers_on_a_kept_alive_connection_are_not_held_back_by_delayed_acks(
    hub: Hub, app: FastAPI, make_socket: Callable[[], socket.socket]
) -> None:
    # With Nagle on, the body of every answer after the first waits for the client's
    # delayed ACK of the head: 40 ms or more each. Without it, well under a millisecond;
    # 20 ms leaves room for a loaded machine and none for a delayed ACK.
    async with serving(app, make_socket()) as port:
        times = await asyncio.to_thread(keep_alive_round_trips, port, 25)
    assert statistics.median(times[1:]) < 0.020, [round(t * 1000, 1) for t in times]


def sample(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_metrics_show_the_event_loop_lag_as_a_histogram(hub: Hub, app: FastAPI) -> None:
    async with serving(app, command_socket()) as port:

        def scrape() -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
                return b"".join(iter(lambda: conn.recv(65536), b"")).decode()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while sample(text := await asyncio.to_thread(scrape), LAG + "_count") < 1:
            assert loop.time() < deadline, "the probe never reported"
            await asyncio.sleep(0.05)
    assert LAG + '_bucket{le="0.005"}' in text


async def test_loop_lag_probe_sees_a_stalled_loop() -> None:
    from wg_autopeer.server.metrics import ServerMetrics

    metrics = ServerMetrics(clients=lambda: 0, groups=lambda: 0)
    probe = asyncio.create_task(metrics.probe_loop_lag(interval=0.005))
    try:
        await asyncio.sleep(0)  # the probe starts its first timer
        # The stall under test: the loop runs nothing meanwhile.
        time.sleep(0.08)  # noqa: ASYNC251
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        text = metrics.render().decode()
        while sample(text, LAG + '_bucket{le="0.05"}') == sample(text, LAG + "_count"):
            assert loop.time() < deadline, "the stall was not recorded"
            await asyncio.sleep(0.01)
            text = metrics.render().decode()
    finally:
        probe.cancel()


LAG = "wg_autopeer_event_loop_lag_seconds"


async def test_a_running_server_lets_the_loop_take_the_gil_within_a_millisecond(
    hub: Hub, app: FastAPI
) -> None:
    # The hub read's worker thread would otherwise hold the loop up to 5 ms at a time.
    before = sys.getswitchinterval()
    assert before > GIL_SWITCH_S
    async with serving(app, command_socket()):
        assert sys.getswitchinterval() == GIL_SWITCH_S
    assert sys.getswitchinterval() == before
