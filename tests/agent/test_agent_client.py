"""The peering client against real HTTP servers on 127.0.0.1, friendly and hostile."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

import pytest
from agent_keys import key

from wg_autopeer.agent import client as client_module
from wg_autopeer.agent.client import PeeringClient, _tls_context, default_server_url
from wg_autopeer.agent.safety import MAX_ANSWER_BYTES
from wg_autopeer.errors import ServerError, ServerRefused, UnsafeAnswer
from wg_autopeer.protocol import LanEntry

BOB = key(4)
ENTRIES = [
    LanEntry(
        pubkey=key(1),
        ip=ip_address("192.168.50.10"),
        netmask=24,
        gateway=ip_address("192.168.50.1"),
        listen_port=51820,
    ),
    LanEntry(pubkey=key(1), ip=ip_address("fd50::10"), netmask=64, gateway=ip_address("fd50::1")),
]
ANSWER = {
    "peers": [{"pubkey": BOB, "endpoint": "192.168.50.11", "port": 51820, "ip": ["10.99.0.3/32"]}]
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: str


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """An HTTP/1.1 server on an ephemeral loopback port, scripted per test."""

    handler: Handler
    requests: list[Request] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/peering-request"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, value in (line.split(":", 1) for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Request(method, path, headers, body, writer.get_extra_info("peername")[0])
            self.requests.append(request)
            await self.handler(request, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)


Serve = Callable[[Handler], Awaitable[RawServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        raw = RawServer(handler)
        raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
        servers.append(raw)
        return raw

    yield start
    for raw in servers:
        assert raw.server is not None
        raw.server.close()
        for task in list(raw.tasks):
            task.cancel()
        await asyncio.gather(*raw.tasks, return_exceptions=True)
        await raw.server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[PeeringClient]:
    c = PeeringClient()
    yield c
    await c.aclose()


def response(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None, reason: str = "X"
) -> bytes:
    head = {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in head.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answering(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(response(status, body, headers))

    return handler


JSON = {"Content-Type": "application/json"}


async def test_answer_with_etag_supports_blocking(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(200, json.dumps(ANSWER).encode(), {**JSON, "ETag": '"v7"'}))
    result = await client.report(raw.url, ENTRIES)
    assert result.answer is not None
    assert result.answer.peers[0].pubkey == BOB
    assert result.etag == '"v7"'
    assert result.blocking_supported
    assert not result.not_modified


async def test_request_body_is_exactly_the_wire_format(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(200, b'{"peers": []}', JSON))
    await client.report(raw.url, ENTRIES)
    request = raw.requests[0]
    assert request.method == "POST"
    assert request.path == "/peering-request"
    assert request.headers["content-type"] == "application/json"
    assert "if-none-match" not in request.headers
    assert "prefer" not in request.headers
    assert json.loads(request.body) == [
        {
            "pubkey": key(1),
            "ip": "192.168.50.10",
            "netmask": 24,
            "gateway": "192.168.50.1",
            "listen_port": 51820,
        },
        {"pubkey": key(1), "ip": "fd50::10", "netmask": 64, "gateway": "fd50::1"},
    ]


async def test_answer_without_etag_means_no_blocking(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(200, json.dumps(ANSWER).encode(), JSON))
    result = await client.report(raw.url, ENTRIES)
    assert result.answer is not None
    assert result.etag is None
    assert not result.blocking_supported


async def test_not_modified_keeps_the_etag(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(304))
    result = await client.report(raw.url, ENTRIES, etag='"v7"')
    assert result.answer is None
    assert result.not_modified
    assert result.etag == '"v7"'
    assert raw.requests[0].headers["if-none-match"] == '"v7"'


async def test_blocking_request_may_outlast_the_normal_timeout(
    serve: Serve, client: PeeringClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "REQUEST_TIMEOUT", 0.5)

    async def hold_then_304(request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1.0)  # the server's hold: longer than REQUEST_TIMEOUT, within wait
        writer.write(response(304, headers={"ETag": '"v8"'}))

    raw = await serve(hold_then_304)
    result = await client.report(raw.url, ENTRIES, etag='"v7"', wait=2)
    assert result.not_modified
    assert result.etag == '"v8"'
    assert raw.requests[0].headers["prefer"] == "wait=2"


async def test_client_error_carries_status_and_server_reason(
    serve: Serve, client: PeeringClient
) -> None:
    body = json.dumps({"error": "unknown tunnel address " + "x" * 1000}).encode()
    raw = await serve(answering(403, body, JSON))
    with pytest.raises(ServerRefused) as info:
        await client.report(raw.url, ENTRIES)
    assert info.value.status == 403
    assert "unknown tunnel address" in info.value.reason
    assert len(info.value.reason) < 250
    assert not info.value.retryable


async def test_server_error_is_retryable(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(500, b"<html>oops</html>", {"Content-Type": "text/html"}))
    with pytest.raises(ServerRefused) as info:
        await client.report(raw.url, ENTRIES)
    assert info.value.status == 500
    assert info.value.retryable


async def test_html_200_is_unsafe(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(200, b"<html>captive portal</html>", {"Content-Type": "text/html"}))
    with pytest.raises(UnsafeAnswer, match="not JSON"):
        await client.report(raw.url, ENTRIES)


async def test_garbage_json_is_unsafe(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(200, b'{"peers": [{"pubkey": 5}', JSON))
    with pytest.raises(UnsafeAnswer, match="wire format"):
        await client.report(raw.url, ENTRIES)


async def test_ten_megabyte_answer_is_refused_by_content_length(
    serve: Serve, client: PeeringClient
) -> None:
    raw = await serve(answering(200, b" " * 10_000_000, JSON))
    with pytest.raises(UnsafeAnswer, match="exceeds"):
        await client.report(raw.url, ENTRIES)


async def test_endless_chunked_answer_stops_at_the_read_cap(
    serve: Serve, client: PeeringClient
) -> None:
    sent = 0

    async def endless(request: Request, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        while True:  # never ends: only a read cap gets the client out before its timeout
            writer.write(chunk)
            await writer.drain()
            sent += 0x10000

    raw = await serve(endless)
    started = time.monotonic()
    with pytest.raises(UnsafeAnswer, match="exceeds"):
        await client.report(raw.url, ENTRIES)
    assert time.monotonic() - started < 4
    assert sent >= MAX_ANSWER_BYTES // 2


async def test_silent_server_times_out_within_five_seconds(
    serve: Serve, client: PeeringClient
) -> None:
    async def silent(request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    raw = await serve(silent)
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        await client.report(raw.url, ENTRIES)
    elapsed = time.monotonic() - started
    assert 4.5 <= elapsed < 6.5
    assert info.value.retryable


async def test_dripping_server_is_cut_off_by_the_whole_request_deadline(
    serve: Serve, client: PeeringClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "REQUEST_TIMEOUT", 1.0)

    async def drip(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n"
        )
        while True:  # each byte arrives well within any per-read timeout
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.1)

    raw = await serve(drip)
    started = time.monotonic()
    with pytest.raises(ServerError, match="no complete answer"):
        await client.report(raw.url, ENTRIES)
    assert time.monotonic() - started < 2.0


async def test_redirect_is_not_followed(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(302, headers={"Location": "http://203.0.113.9/steal"}))
    with pytest.raises(ServerRefused) as info:
        await client.report(raw.url, ENTRIES)
    assert info.value.status == 302
    assert "not followed" in info.value.reason
    assert len(raw.requests) == 1


async def test_compressed_answer_is_refused(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(200, b"\x1f\x8b", {**JSON, "Content-Encoding": "gzip"}))
    with pytest.raises(UnsafeAnswer, match="encoded"):
        await client.report(raw.url, ENTRIES)
    assert raw.requests[0].headers["accept-encoding"] == "identity"


async def test_connection_refused_is_retryable(client: PeeringClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: the connection is refused
        with pytest.raises(ServerError) as info:
            await client.report(f"http://127.0.0.1:{port}/peering-request", ENTRIES)
    assert info.value.retryable
    assert not isinstance(info.value, ServerRefused)


async def test_request_leaves_from_the_local_address(serve: Serve) -> None:
    raw = await serve(answering(200, b'{"peers": []}', JSON))
    async with PeeringClient(local_address="127.0.0.2") as bound:
        await bound.report(raw.url, ENTRIES)
    assert raw.requests[0].peer == "127.0.0.2"


async def test_leave_sends_delete(serve: Serve, client: PeeringClient) -> None:
    raw = await serve(answering(204))
    await client.leave(raw.url)
    assert [(r.method, r.path) for r in raw.requests] == [("DELETE", "/peering-request")]


async def test_leave_never_raises_and_gives_up_after_a_second(
    serve: Serve, client: PeeringClient
) -> None:
    async def silent(request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    raw = await serve(silent)
    started = time.monotonic()
    await client.leave(raw.url)
    assert time.monotonic() - started < 1.5
    await client.leave("http://127.0.0.1:1/peering-request")


@pytest.mark.parametrize(
    ("network", "url"),
    [
        ("10.99.0.0/24", "http://10.99.0.1/peering-request"),
        (ip_network("fd99::/64"), "http://[fd99::1]/peering-request"),
        ("10.99.0.7/32", "http://10.99.0.7/peering-request"),
    ],
)
def test_default_server_url_is_first_host_of_tunnel(network: object, url: str) -> None:
    assert default_server_url(network) == url  # type: ignore[arg-type]


async def test_plain_http_never_parses_the_ca_bundle(serve: Serve) -> None:
    # The verifying context (2 MiB, 30 ms) is built for https only, at its first request.
    _tls_context.cache_clear()
    server = await serve(answering(200, b'{"peers": []}', JSON))
    async with PeeringClient() as client:
        await client.report(server.url, ENTRIES)
        assert _tls_context.cache_info().currsize == 0
        with pytest.raises(ServerError):
            await client.report(server.url.replace("http://", "https://"), ENTRIES)
        assert _tls_context.cache_info().currsize == 1
