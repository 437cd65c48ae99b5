"""The server over real HTTP on loopback: uvicorn with the product's configuration."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import ip_address

import pytest
import uvicorn
from fastapi import FastAPI
from server_fakes import Hub

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
