"""The HTTP face of the coordination server (FastAPI), over a ``Coordinator`` core.

``POST /peering-request`` registers the caller's LANs and answers its LAN
neighbours, optionally as a blocking query (``If-None-Match`` + ``Prefer: wait=N``);
``DELETE /peering-request`` drops the caller. The caller is known only by its
tunnel source address; every entry's key must be the key owning that address.
The body is read and checked here (size cap, content type, UTF-8, JSON, fields)
so that anything a client can send gets a 4xx with ``{"error": ...}``, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wg_autopeer.protocol import (
    LAN_ENTRY_SCHEMA,
    MAX_BODY_BYTES,
    MAX_ENTRIES,
    MAX_WAIT_SECONDS,
    PATH,
    ErrorBody,
    LanEntry,
    PeeringAnswer,
    WireFormatError,
)
from wg_autopeer.server.config import ServerConfig
from wg_autopeer.server.coordinator import Coordinator
from wg_autopeer.server.hubread import DeviceReader
from wg_autopeer.server.identity import HubPeer, normalise_source
from wg_autopeer.server.matching import Registration, ReportedLan
from wg_autopeer.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from wg_autopeer.server.metrics import ServerMetrics
from wg_autopeer.server.store import RegistrationStore, open_store
from wg_autopeer.wireguard.base import IPAddress, WireGuardControl

log = logging.getLogger(__name__)
access_log = logging.getLogger("wg_autopeer.server.access")


@dataclass(eq=False)
class Refusal(Exception):
    """A request refused with ``status``; ``outcome`` labels it in logs and metrics."""

    status: int
    outcome: str
    reason: str


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_capped_body(request: Request) -> bytes:
    """The body, refusing (413) past ``MAX_BODY_BYTES`` without reading further."""
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        # str.isdigit() also accepts digits int() refuses, such as "²" (latin-1 0xB2).
        if not (declared.isascii() and declared.isdigit()):
            raise Refusal(400, "bad_request", "Content-Length is not a number")
        if int(declared) > MAX_BODY_BYTES:
            raise Refusal(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_BODY_BYTES:
                raise Refusal(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refusal(400, "disconnected", "client went away while sending") from None
    return b"".join(chunks)


# How long a thread holds the GIL before another may take it (see ``lifespan``).
GIL_SWITCH_S = 0.001


def parse_entries(body: bytes) -> list[LanEntry]:
    """The entries of a request body, or a 400 naming the first problem."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "bad_request", "body is not valid UTF-8") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Refusal(400, "bad_request", f"body is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise Refusal(400, "bad_request", "body must be a JSON list of entries (or one entry)")
    if not data:
        raise Refusal(400, "bad_request", "the list of entries is empty")
    if len(data) > MAX_ENTRIES:
        raise Refusal(400, "bad_request", f"more than {MAX_ENTRIES} entries")
    entries = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise Refusal(400, "bad_request", f"entry {i} is not a JSON object")
        try:
            entries.append(LanEntry.from_json(item))
        except WireFormatError as exc:
            raise Refusal(400, "bad_request", f"entry {i}: {exc}") from None
    if len({e.pubkey for e in entries}) != 1:
        raise Refusal(400, "bad_request", "entries carry different pubkeys")
    return entries


def parse_if_none_match(value: str | None) -> set[str]:
    """The entity tags listed in ``If-None-Match`` (weak ones compared as strong)."""
    if not value:
        return set()
    tags = set()
    for part in value.split(","):
        tag = part.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag:
            tags.add(tag)
    return tags


def parse_prefer_wait(value: str | None) -> float | None:
    """Seconds asked for by ``Prefer: wait=N``, capped; None when absent or malformed."""
    if not value:
        return None
    for part in value.replace(";", ",").split(","):
        name, _, raw = part.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(raw.strip().strip('"'))
        except ValueError:
            return None
        if seconds != seconds or seconds < 0:  # NaN or negative
            return None
        return min(seconds, float(MAX_WAIT_SECONDS))
    return None


def _source_of(request: Request, config: ServerConfig) -> IPAddress | None:
    """The caller's address: the TCP peer, unless that peer is a configured trusted proxy."""
    if request.client is None:
        return None
    try:
        direct = normalise_source(ip_address(request.client.host))
    except ValueError:
        return None
    if not any(direct in net for net in config.trusted_proxies):
        # X-Forwarded-For and Forwarded from anyone else are ignored: identity is the tunnel.
        return direct
    return _forwarded_client(request, config) or direct


def _forwarded_client(request: Request, config: ServerConfig) -> IPAddress | None:
    hops: list[str] = []
    xff = request.headers.get("x-forwarded-for")
    if xff:
        hops = [h.strip() for h in xff.split(",")]
    else:
        for element in request.headers.get("forwarded", "").split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    hops.append(value.strip().strip('"').removeprefix("[").split("]")[0])
    # The rightmost hop not itself a trusted proxy is the one a proxy of ours saw.
    for hop in reversed(hops):
        try:
            address = normalise_source(ip_address(hop))
        except ValueError:
            raise Refusal(400, "bad_request", "unreadable forwarding header") from None
        if not any(address in net for net in config.trusted_proxies):
            return address
    return None


def _short(key: str | None) -> str:
    return key[:8] if key else "-"


Handler = Callable[[Request], Awaitable[Response]]


class RequestLogMiddleware:
    """One log line and one metric sample per request; turns a bug into a logged JSON 500.

    ``direct`` maps (method, path) to a handler called here, past FastAPI's routing,
    dependency and exception layers: for the hot path (peering requests), whose handler
    reads and checks everything itself, those layers cost more than the handler. The
    same handler stays registered with FastAPI (OpenAPI, and paths under a root path).
    """

    def __init__(
        self, app: ASGIApp, metrics: ServerMetrics, direct: dict[tuple[str, str], Handler]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        handler = None
        if not scope.get("root_path"):
            handler = self.direct.get((scope["method"], scope["path"]))
        try:
            if handler is None:
                await self.app(scope, receive, send_wrapper)
            else:
                response = await handler(Request(scope, receive))
                await response(scope, receive, send_wrapper)
        except Exception:
            log.exception("bug while answering %s %s", scope.get("method"), scope.get("path"))
            state["outcome"] = "error"
            if status == 0:
                status = 500
                await error_response(500, "internal server error")(scope, receive, send)
        elapsed = time.monotonic() - started
        outcome = state.get("outcome") or ("ok" if status < 400 else f"http_{status}")
        self.metrics.observe(outcome, elapsed)
        client = scope.get("client")
        access_log.info(
            "request method=%s path=%s source=%s key=%s outcome=%s status=%d ms=%.1f",
            scope.get("method"),
            scope.get("path"),
            client[0] if client else "-",
            _short(state.get("key")),
            outcome,
            status,
            elapsed * 1000,
        )


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad JSON, invalid field, empty or too long list"},
    403: {"model": ErrorBody, "description": "source not in the tunnel, or not the key's owner"},
    409: {
        "model": ErrorBody,
        "description": "the caller's latest handshake is too old, or it left meanwhile",
    },
    413: {"model": ErrorBody, "description": f"body over {MAX_BODY_BYTES} bytes"},
    415: {"model": ErrorBody, "description": "Content-Type is not application/json"},
}

_REQUEST_SCHEMA = {
    "anyOf": [
        {
            "type": "array",
            "items": LAN_ENTRY_SCHEMA,
            "minItems": 1,
            "maxItems": MAX_ENTRIES,
        },
        LAN_ENTRY_SCHEMA,
    ]
}


def create_app(
    config: ServerConfig,
    control: WireGuardControl,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    store: RegistrationStore | None = None,
    reader: DeviceReader | None = None,
) -> FastAPI:
    """The server app for hub interface ``config.interface``.

    ``store`` defaults to ``open_store(config.db)`` (SQLite or PostgreSQL), owned and
    closed by the app.
    ``reader`` defaults to the reader matching ``control`` (``hubread.reader_for``). The
    background refresh runs in the app's lifespan; ``app.state.coordinator`` exposes
    the core (tests drive ``tick()`` themselves).
    """
    owned_store = store is None
    the_store = open_store(config.db, hub=config.hub) if store is None else store
    core = Coordinator(
        config, control, store=the_store, clock=clock, monotonic=monotonic, reader=reader
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The hub read applies its delta in a worker thread; the loop waits behind it for
        # the GIL up to the switch interval each time (5 ms by default, all of a request's
        # budget at the tail). 1 ms bounds that wait at a small cost in switches.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_S)
        tasks = [
            asyncio.create_task(core.run(), name="hub-refresh"),
            asyncio.create_task(core.metrics.probe_loop_lag(), name="loop-lag-probe"),
        ]
        if core.shared is not None:
            tasks.append(asyncio.create_task(core.follow_store(), name="store-feed"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            core.registry.wake_all()
            await core.hub.close()
            core.registry.flush()
            if owned_store:
                the_store.close()
            sys.setswitchinterval(switch_interval)

    app = FastAPI(
        title="wg-autopeer coordination server",
        summary="Tells hub clients which other clients share their LAN.",
        version="1",
        lifespan=lifespan,
    )
    app.state.coordinator = core
    direct: dict[tuple[str, str], Handler] = {}
    app.add_middleware(RequestLogMiddleware, metrics=core.metrics, direct=direct)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        request.state.outcome = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        request.state.outcome = "bad_request"
        return error_response(400, "invalid request")

    async def identify(request: Request) -> HubPeer:
        source = _source_of(request, config)
        if source is None:
            raise Refusal(403, "forbidden", "no usable source address")
        peer = await core.hub.identify(source)
        if peer is None:
            raise Refusal(403, "forbidden", f"{source} is not a tunnel address of any client")
        request.state.key = peer.public_key
        return peer

    def refused(request: Request, refusal: Refusal) -> Response:
        request.state.outcome = refusal.outcome
        return error_response(refusal.status, refusal.reason)

    @app.post(
        PATH,
        summary="Report my LAN, learn my LAN neighbours",
        response_model=PeeringAnswer,
        response_model_exclude_none=True,
        responses={
            **_ERROR_RESPONSES,
            304: {"description": "blocking query: the answer still has the given ETag"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _REQUEST_SCHEMA}},
            },
            "parameters": [
                {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                {
                    "name": "Prefer",
                    "in": "header",
                    "schema": {"type": "string", "example": "wait=25"},
                },
            ],
        },
    )
    async def peering_request(request: Request) -> Response:
        arrived = monotonic()
        try:
            peer = await identify(request)
            if not _is_json(request.headers.get("content-type")):
                raise Refusal(415, "unsupported_media", "Content-Type must be application/json")
            body = await read_capped_body(request)
            lans = reported_lans(peer.public_key, body)
            peer = await fresh_peer(request, peer, arrived)
            registration = build_registration(peer, lans)
            # A new or moved LAN usually means the client just roamed: its first
            # packets from the new address reached the hub before this request did,
            # so a view read now has its new endpoint, while the cache may predate it.
            moved = not registration.same_content(core.registry.get(peer.public_key))
            if moved and await core.hub.refresh_since(arrived):
                peer = await fresh_peer(request, await identify(request), arrived)
                registration = build_registration(peer, lans)
            if core.left_since(peer.public_key, arrived):
                # The client's last report racing its own leave (an agent shutting down):
                # registering it now would offer its neighbours a peer that is gone.
                raise Refusal(
                    409, "left_in_flight", "the client left while this report was in flight"
                )
        except Refusal as refusal:
            return refused(request, refusal)
        await core.register(registration)
        core.report_bodies[peer.public_key] = body
        await core.hold_for_neighbours(registration)
        return await answer(request, peer.public_key)

    direct["POST", PATH] = peering_request

    async def fresh_peer(request: Request, peer: HubPeer, arrived: float) -> HubPeer:
        if core.handshake_is_fresh(peer) and peer.public_ip is not None:
            return peer
        # The cache may predate the latest handshake: a request that came through the
        # tunnel at all rode on a live session, so read the hub once more (a read that
        # started after this request arrived, shared with concurrent callers) before
        # refusing.
        if await core.hub.refresh_since(arrived):
            again = await identify(request)
            if again.public_key == peer.public_key:
                peer = again
        if not core.handshake_is_fresh(peer):
            raise Refusal(
                409,
                "stale_handshake",
                f"latest handshake with the hub is older than {config.handshake_max_age:g} s",
            )
        if peer.public_ip is None:
            raise Refusal(409, "stale_handshake", "the hub has no endpoint for this client yet")
        return peer

    def reported_lans(pubkey: str, body: bytes) -> tuple[ReportedLan, ...]:
        current = core.registry.get(pubkey)
        if current is not None and core.report_bodies.get(pubkey) == body:
            return current.lans
        core.report_bodies.pop(pubkey, None)
        entries = parse_entries(body)
        if entries[0].pubkey != pubkey:
            raise Refusal(403, "forbidden", "pubkey is not the key that owns this tunnel address")
        return tuple(sorted({ReportedLan.from_entry(e) for e in entries}, key=ReportedLan.sort_key))

    def build_registration(peer: HubPeer, lans: tuple[ReportedLan, ...]) -> Registration:
        assert peer.public_ip is not None
        return Registration(
            pubkey=peer.public_key,
            tunnel_ips=peer.tunnel_ips,
            public_ip=peer.public_ip,
            lans=lans,
            expires_at=core.clock() + config.ttl,
            hub=config.hub,
        )

    async def answer(request: Request, pubkey: str) -> Response:
        held = parse_if_none_match(request.headers.get("if-none-match"))
        wait = parse_prefer_wait(request.headers.get("prefer")) if held else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait or 0.0)
        waiting = False
        try:
            while True:
                # Take the event first: a change after this point sets it. Only a query
                # that may wait needs one (an event per client costs memory).
                event = core.registry.change_event(pubkey) if wait else None
                body, etag = core.registry.answer(pubkey, core.clock())
                if etag not in held:
                    request.state.outcome = "ok"
                    await core.answered(pubkey)
                    return Response(
                        body,
                        media_type="application/json",
                        headers={"ETag": etag, "Cache-Control": "no-store"},
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    request.state.outcome = "not_modified"
                    return Response(status_code=304, headers={"ETag": etag})
                if not waiting:
                    waiting = True
                    core.waiting += 1
                    core.metrics.waiting.inc()
                # One awaited event and one timer per waiter; no task, nothing polls.
                assert event is not None  # remaining > 0: wait was asked for
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await event.wait()
        finally:
            if waiting:
                core.waiting -= 1
                core.metrics.waiting.dec()

    @app.delete(
        PATH,
        summary="Leave: drop my registration now",
        status_code=204,
        responses={403: _ERROR_RESPONSES[403]},
    )
    async def leave(request: Request) -> Response:
        try:
            peer = await identify(request)
        except Refusal as refusal:
            return refused(request, refusal)
        await core.leave(peer.public_key)
        request.state.outcome = "left"
        return Response(status_code=204)

    def allowed_observer(request: Request) -> bool:
        if config.metrics_sources is None:
            return True
        try:
            source = _source_of(request, config)
        except Refusal:
            return False
        return source is not None and any(source in net for net in config.metrics_sources)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        if not allowed_observer(request):
            request.state.outcome = "forbidden"
            return error_response(403, "metrics are not served to this address")
        return Response(core.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/healthz", summary="Liveness and freshness of the hub view")
    async def healthz(request: Request) -> Response:
        if not allowed_observer(request):
            request.state.outcome = "forbidden"
            return error_response(403, "health is not served to this address")
        refreshed = core.hub.refreshed_at
        age = None if refreshed is None else monotonic() - refreshed
        healthy = age is not None and age <= max(10.0, 5 * config.refresh_interval)
        degraded = core.degraded
        # Degraded still answers 200: the hub path and this hub's own matching work, and
        # no other instance can serve this hub's clients (identity is the hub's tunnel).
        body = {
            "status": ("ok" if degraded is None else "degraded") if healthy else "hub view stale",
            "degraded": degraded,
            "hub_view_age_s": None if age is None else round(age, 3),
            "registered_clients": core.registry.client_count,
            "lan_groups": core.registry.group_count,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    return app
