"""One peering request to the coordination server, and nothing more.

``PeeringClient.report`` sends the LAN report once and returns the answer or
raises; retries, back-off and scheduling belong to the daemon. The request
leaves from the tunnel address (the server identifies the caller by it),
follows no redirect, ignores proxy settings from the environment, and is
bounded in time as a whole (httpx's timeouts are per operation, so a server
dripping one byte at a time could otherwise hold it forever) and in size (the
body is read as a stream and abandoned past 1 MiB).

Errors: transport failures and timeouts become ``ServerError(retryable=True)``,
error statuses ``ServerRefused``, and a 200 that is not the wire format
``UnsafeAnswer``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_network

import httpx

from wg_autopeer.agent.safety import MAX_ANSWER_BYTES, parse_answer
from wg_autopeer.errors import ServerError, ServerRefused, UnsafeAnswer
from wg_autopeer.protocol import PATH, ErrorBody, LanEntry, PeeringAnswer
from wg_autopeer.wireguard.base import IPNetwork

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0
LEAVE_TIMEOUT = 1.0
PROBE_TIMEOUT = 2.0
# Enough for any {"error": ...} body; the rest of an error page is not worth reading.
MAX_ERROR_BYTES = 16 * 1024
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class ReportResult:
    """The outcome of one report.

    ``answer`` is None when the server said 304 (nothing changed since ``etag``).
    ``blocking_supported`` is True when the server sent an ETag, i.e. it can hold
    a request with ``If-None-Match`` + ``Prefer: wait=N`` until something changes.
    """

    answer: PeeringAnswer | None
    etag: str | None
    not_modified: bool
    blocking_supported: bool


def default_server_url(tunnel_network: IPNetwork | str) -> str:
    """``http://<first host address of the tunnel network>/peering-request``,
    the hub's usual tunnel address (IPv6 in brackets)."""
    network = ip_network(tunnel_network, strict=False)
    first = next(iter(network.hosts()), network.network_address)
    host = f"[{first}]" if first.version == 6 else str(first)
    return f"http://{host}{PATH}"


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _read_capped(response: httpx.Response, cap: int) -> bytes | None:
    """The body, or None as soon as it exceeds ``cap`` bytes (the rest is not read)."""
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        return None
    body = bytearray()
    async for chunk in response.aiter_raw():
        body.extend(chunk)
        if len(body) > cap:
            return None
    return bytes(body)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # One per process: each context holds the parsed CA bundle (about 3 MiB), and the
    # agent keeps a client per interface.
    return httpx.create_ssl_context()


def _transport(
    local_address: str | None, verify: ssl.SSLContext | bool
) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(local_address=local_address, retries=0, verify=verify)


class _TlsOnDemand(httpx.AsyncBaseTransport):
    """The https transport, built at its first request.

    A hub reached through the tunnel is usually plain http (WireGuard already
    authenticates and encrypts it), and a verifying TLS context parses the whole CA
    bundle: about 2 MiB and 30 ms on the event loop at start, for nothing."""

    def __init__(self, local_address: str | None) -> None:
        self._local_address = local_address
        self._transport: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            self._transport = _transport(self._local_address, _tls_context())
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()


class PeeringClient:
    """A client of one agent: keeps a connection pool bound to ``local_address``
    (the agent's tunnel address; None lets the kernel choose). Call ``aclose``."""

    def __init__(self, local_address: str | None = None) -> None:
        self.local_address = local_address
        self._client = httpx.AsyncClient(
            transport=_TlsOnDemand(local_address),
            # Plain http only: this transport never makes a TLS connection (no proxy, no
            # redirect to follow), so it needs no certificates to verify.
            mounts={"http://": _transport(local_address, verify=False)},
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            follow_redirects=False,
            # A proxy from the environment would hide the tunnel source address.
            trust_env=False,
        )

    async def report(
        self,
        url: str,
        entries: Sequence[LanEntry],
        *,
        etag: str | None = None,
        wait: int | None = None,
    ) -> ReportResult:
        """Send the LAN report once. With ``etag`` the server may answer 304; with
        ``wait`` too it may hold the request up to ``wait`` seconds for a change."""
        body = json.dumps([e.to_json() for e in entries])
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            # Compressed bodies could expand far past the read cap in one chunk.
            "Accept-Encoding": "identity",
        }
        if etag is not None:
            headers["If-None-Match"] = etag
        hold = max(0, wait) if wait is not None else 0
        if hold:
            headers["Prefer"] = f"wait={hold}"
        timeout = httpx.Timeout(
            REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT, read=hold + REQUEST_TIMEOUT
        )
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT + hold):
                request = self._client.build_request(
                    "POST", url, content=body.encode(), headers=headers, timeout=timeout
                )
                response = await self._client.send(request, stream=True)
                try:
                    return await self._result(url, response, etag)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise ServerError(
                url, f"no complete answer within {REQUEST_TIMEOUT + hold:g} s"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ServerError(url, f"timed out ({type(exc).__name__})") from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ServerError(url, f"bad server URL: {exc}", retryable=False) from exc
        except httpx.HTTPError as exc:
            # h11 quotes what the server sent (up to 16 kB of it, e.g. a bogus status
            # line): bound it before it reaches the log and the status.
            raise ServerError(
                url, f"{type(exc).__name__}: {_shorten(str(exc)) or 'transport error'}"
            ) from exc
        except OSError as exc:
            raise ServerError(url, f"{type(exc).__name__}: {exc}") from exc

    async def _result(self, url: str, response: httpx.Response, etag: str | None) -> ReportResult:
        status = response.status_code
        new_etag = response.headers.get("etag")
        if status == 304:
            return ReportResult(None, new_etag or etag, True, True)
        if status >= 400:
            raise ServerRefused(url, status, await self._error_reason(response))
        if 300 <= status < 400:
            target = _shorten(response.headers.get("location", "nowhere"))
            raise ServerRefused(url, status, f"redirect to {target} not followed")
        if status != 200:
            raise UnsafeAnswer(f"{url}: unexpected status {status}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise UnsafeAnswer(f"{url}: answer is {_shorten(encoding)}-encoded, asked for identity")
        content_type = response.headers.get("content-type", "")
        if not _is_json(content_type):
            raise UnsafeAnswer(f"{url}: answer is {_shorten(content_type) or 'untyped'}, not JSON")
        raw = await _read_capped(response, MAX_ANSWER_BYTES)
        if raw is None:
            raise UnsafeAnswer(f"{url}: answer exceeds {MAX_ANSWER_BYTES} bytes")
        try:
            answer = parse_answer(raw)
        except UnsafeAnswer as exc:
            raise UnsafeAnswer(f"{url}: {exc}") from exc
        return ReportResult(answer, new_etag, False, new_etag is not None)

    async def _error_reason(self, response: httpx.Response) -> str:
        raw = await _read_capped(response, MAX_ERROR_BYTES)
        if raw is None:
            return response.reason_phrase or "error"
        try:
            return _shorten(ErrorBody.from_json(json.loads(raw)).error)
        except (ValueError, RecursionError):
            text = raw.decode("utf-8", "replace").strip()
            if text and _is_json(response.headers.get("content-type", "")):
                return _shorten(text)
            return response.reason_phrase or "error"

    async def serves_peering(self, url: str) -> str | None:
        """Ask, without saying anything about our LAN, whether ``url`` is a peering
        server: a ``GET`` of it, which this server and wireguard-web both answer with
        405 and ``Allow: POST``. None when it is one; otherwise why not, in words.

        No answer at all proves nothing (the hub may be restarting): that raises
        ``ServerError(retryable=True)``, as a report would."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                request = self._client.build_request("GET", url, timeout=PROBE_TIMEOUT)
                response = await self._client.send(request, stream=True)
                await response.aclose()
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            reason = _shorten(str(exc)) or type(exc).__name__
            raise ServerError(url, f"no answer to the probe: {reason}") from exc
        allowed = {m.strip().upper() for m in response.headers.get("allow", "").split(",")}
        if response.status_code == 405 and "POST" in allowed:
            return None
        return f"{url} does not serve peering requests (GET answered HTTP {response.status_code})"

    async def leave(self, url: str) -> None:
        """Tell the server this agent is going (DELETE). Best effort: at most about
        one second, and never raises."""
        try:
            async with asyncio.timeout(LEAVE_TIMEOUT):
                request = self._client.build_request("DELETE", url, timeout=LEAVE_TIMEOUT)
                # Streamed and closed unread: the status is all that matters here.
                response = await self._client.send(request, stream=True)
                await response.aclose()
            log.debug("left %s: HTTP %d", url, response.status_code)
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            log.debug("could not tell %s we leave: %s", url, _shorten(str(exc)))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> PeeringClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
