"""How uvicorn serves the app: one configuration for the command, the tests and the bench.

uvicorn gives a client unlimited time to send its request: an idle connection,
half a request head or half a body is held until the client goes away. Only
tunnel clients can reach the server, but one misbehaving agent could still pile
up connections, so ``DeadlineH11Protocol`` closes a connection whose request has
not fully arrived within ``REQUEST_RECEIPT_DEADLINE_S``. A blocking query has
been received in full and is waiting on *us*; the deadline never cuts it.

Every accepted connection gets ``TCP_NODELAY``. uvicorn writes a response's head and
its body in two writes; with Nagle's algorithm on, the body waits until the client
acknowledges the head, and a client that delays its ACK (Linux: at least 40 ms, once
a connection leaves quick-ACK mode) makes every answer after the first on a kept-alive
connection 40 ms late. asyncio sets the option only on sockets it can tell are TCP
(``proto == IPPROTO_TCP``); a socket made as ``socket(AF_INET, SOCK_STREAM)`` (proto 0),
handed over by the command, systemd or a benchmark, is not, so it is set here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_RECEIPT_DEADLINE_S = 10.0
# Blocking queries hold connections up to 60 s; on shutdown give them this long, then cut.
GRACEFUL_SHUTDOWN_S = 2


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request."""

    request_deadline = REQUEST_RECEIPT_DEADLINE_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request on this keep-alive connection gets a deadline of its own.
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.request_deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        # Still sending its head (IDLE) or its body (SEND_BODY): too slow, cut it.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on a TCP connection (see the module docstring)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket, or a test transport: no Nagle to turn off
    # OSError: the peer already went away; the protocol sees that on its own.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def uvicorn_config(app: Any, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of the coordination server."""
    settings: dict[str, Any] = {
        # Identity is the TCP peer address: never let proxy headers rewrite it.
        "proxy_headers": False,
        "forwarded_allow_ips": None,
        "server_header": False,
        "date_header": True,
        "access_log": False,
        "log_config": None,
        "lifespan": "on",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "http": DeadlineH11Protocol,
    }
    settings.update(overrides)
    return uvicorn.Config(app, **settings)
