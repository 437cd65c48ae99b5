"""A hostile coordination server, to prove the agent applies nothing harmful.

It stands where the real server would (the hub's tunnel address, port 80) and
answers every request in one chosen way, each of them something a broken or
compromised server could do: hand out routes it may not (``0.0.0.0/0``, the
hub's address), the agent's own key, an endpoint off the LAN, invalid keys,
10 000 peers, a 10 MB body, HTML, a 500, a redirect, bytes that are not HTTP,
a body dripped a byte at a time, or nothing at all on a socket it keeps open.

It speaks just enough HTTP/1.1 over raw asyncio streams to do all of that, which
a real web framework would not let it do. Hostile offers are built from the
caller's own report (its key, its LAN), so they are as plausible as they can be,
and their keys are derived from a label (``hostile_key``) so a test can name the
exact peer it expects to see refused.

Every request is logged on stdout when it arrives (``hostile: #N METHOD PATH``)
and when the server is done with it (``hostile: #N -> OUTCOME``), so a test can
count what the agent sent and what became of it::

    python -m wg_autopeer.lab.hostile --listen 10.99.0.1:80 --mode all-ipv4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import enum
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address, ip_interface, ip_network
from typing import Any

from wg_autopeer.wireguard.base import IPAddress, IPNetwork, is_valid_key

MAX_REQUEST_HEAD = 64 * 1024
MAX_REQUEST_BODY = 1024 * 1024
HUGE_BODY_BYTES = 10 * 1024 * 1024
MANY_PEERS = 10_000
DRIP_INTERVAL = 0.5
# An address of the documentation range 198.51.100.0/24: never anyone's LAN.
OFF_LAN_ENDPOINT = "198.51.100.7"
REDIRECT_TARGET = "http://198.51.100.66/peering-request"
WIREGUARD_PORT = 51820


class Mode(enum.StrEnum):
    """How the server answers. Per-peer modes send offers the safety filter must
    refuse one by one; the others must make the agent refuse the whole answer."""

    ALL_IPV4 = "all-ipv4"  # a peer claiming 0.0.0.0/0
    ALL_IPV6 = "all-ipv6"  # a peer claiming ::/0
    HUB_ADDRESS = "hub-address"  # a peer claiming the hub's tunnel address
    OWN_KEY = "own-key"  # the caller's own public key offered back to it
    OFF_LAN = "off-lan"  # an endpoint outside the caller's LAN
    INVALID_KEYS = "invalid-keys"  # keys that are not base64 of 32 bytes
    MIXED = "mixed"  # the good neighbour beside every per-peer lie above
    MANY_PEERS = "many-peers"  # 10 000 peers
    HUGE_BODY = "huge-body"  # 10 MB with a Content-Length
    HUGE_CHUNKED = "huge-chunked"  # 10 MB chunked, no length announced
    GZIP_BOMB = "gzip-bomb"  # 10 MB of JSON squeezed into a few kB of gzip
    HTML = "html"  # a 200 that is a web page
    ERROR_500 = "error-500"
    REDIRECT = "redirect"  # 307 to another host (POST would be replayed there)
    GARBAGE = "garbage"  # a 200 "application/json" of random bytes
    NOT_HTTP = "not-http"  # random bytes instead of an HTTP response
    DRIP = "drip"  # a valid answer, one byte every half second
    HANG = "hang"  # accept, read the request, never answer
    SPIN = "spin"  # answer at once with a new ETag every time, ignoring Prefer: wait

    @property
    def per_peer(self) -> bool:
        return self in PER_PEER_MODES


PER_PEER_MODES = frozenset(
    {
        Mode.ALL_IPV4,
        Mode.ALL_IPV6,
        Mode.HUB_ADDRESS,
        Mode.OWN_KEY,
        Mode.OFF_LAN,
        Mode.INVALID_KEYS,
        Mode.MIXED,
    }
)


def hostile_key(label: str) -> str:
    """A valid WireGuard public key derived from ``label``: stable across answers and
    runs, so a test can tell which hostile offer a log line is about."""
    return base64.b64encode(hashlib.sha256(label.encode()).digest()).decode()


# Keys that look like keys but are not base64 of 32 bytes (one of them tries to
# forge a line in the agent's log).
INVALID_KEYS: tuple[str, ...] = (
    "not-a-key",
    base64.b64encode(b"\x01" * 31).decode(),
    base64.b64encode(b"\x02" * 33).decode(),
    "",
    "!" * 44,
    "AAAA\nWARNING wg_autopeer.agent.daemon: forged line=",
)


@dataclass(frozen=True)
class Neighbour:
    """A real neighbour the server may honestly offer (``KEY@ADDR:PORT=TUNNEL/32``)."""

    pubkey: str
    endpoint: IPAddress
    port: int
    allowed_ip: IPNetwork

    @classmethod
    def parse(cls, text: str) -> Neighbour:
        key, _, rest = text.partition("@")
        where, _, allowed = rest.partition("=")
        host, _, port = where.rpartition(":")
        if not (is_valid_key(key) and host and port.isdigit() and allowed):
            raise ValueError(f"expected KEY@ADDR:PORT=TUNNEL/32, got {text!r}")
        return cls(key, ip_address(host.strip("[]")), int(port), ip_network(allowed))

    def offer(self) -> dict[str, Any]:
        return {
            "pubkey": self.pubkey,
            "endpoint": str(self.endpoint),
            "port": self.port,
            "ip": [str(self.allowed_ip)],
        }


@dataclass(frozen=True)
class Caller:
    """What the request told about the agent: its key and its LAN."""

    pubkey: str
    address: IPAddress
    lan: IPNetwork

    @classmethod
    def from_body(cls, body: bytes) -> Caller:
        """The first entry of a peering report; a made-up caller when the body is not one."""
        try:
            data = json.loads(body)
            entry = data[0] if isinstance(data, list) else data
            address = ip_interface(f"{entry['ip']}/{entry['netmask']}")
            return cls(str(entry["pubkey"]), address.ip, address.network)
        except (ValueError, TypeError, KeyError, IndexError):
            return cls(
                hostile_key("caller"), IPv4Address("192.168.50.10"), ip_network("192.168.50.0/24")
            )

    def lan_host(self, index: int) -> str:
        """A LAN address that is not the caller's own: counted down from the top of the LAN."""
        hosts = self.lan.num_addresses - 2
        candidate = self.lan.broadcast_address - 1 - (index % max(hosts - 1, 1))
        if candidate == self.address:
            candidate -= 1
        return str(candidate)


@dataclass(frozen=True)
class Setting:
    """What the server knows beyond the request: whom to lie about."""

    mode: Mode
    hub_ip: IPAddress
    tunnel: IPNetwork
    hub_key: str | None = None
    neighbour: Neighbour | None = None
    # Keys and routes of peers the attacker wants to take over (a hand-configured peer).
    extra_keys: tuple[str, ...] = ()
    extra_ips: tuple[IPNetwork, ...] = ()

    def tunnel_host(self, index: int) -> str:
        """A host route inside the tunnel network, counted down from its top (free in the lab)."""
        address = self.tunnel.broadcast_address - 1 - index
        return f"{address}/{address.max_prefixlen}"


def _offer(
    key: str, endpoint: str, ip: Sequence[str], port: int = WIREGUARD_PORT
) -> dict[str, Any]:
    return {"pubkey": key, "endpoint": endpoint, "port": port, "ip": list(ip)}


def hostile_offers(setting: Setting, caller: Caller) -> list[dict[str, Any]]:
    """The offers of a per-peer mode: each one a lie the safety filter must refuse,
    all else about it plausible (a LAN endpoint, a host route of the tunnel)."""
    mode = setting.mode
    lan = caller.lan_host
    offers: list[dict[str, Any]] = []
    if mode in (Mode.ALL_IPV4, Mode.MIXED):
        offers.append(_offer(hostile_key("all-ipv4"), lan(0), ["0.0.0.0/0"]))
    if mode in (Mode.ALL_IPV6, Mode.MIXED):
        offers.append(_offer(hostile_key("all-ipv6"), lan(1), ["::/0"]))
    if mode in (Mode.HUB_ADDRESS, Mode.MIXED):
        hub_route = f"{setting.hub_ip}/{setting.hub_ip.max_prefixlen}"
        offers.append(_offer(hostile_key("hub-address"), lan(2), [hub_route]))
    if mode in (Mode.OWN_KEY, Mode.MIXED):
        offers.append(_offer(caller.pubkey, lan(3), [setting.tunnel_host(3)]))
    if mode in (Mode.OFF_LAN, Mode.MIXED):
        offers.append(_offer(hostile_key("off-lan"), OFF_LAN_ENDPOINT, [setting.tunnel_host(4)]))
    if mode in (Mode.INVALID_KEYS, Mode.MIXED):
        for i, key in enumerate(INVALID_KEYS):
            offers.append(_offer(key, lan(10 + i), [setting.tunnel_host(10 + i)]))
    if mode is Mode.MIXED:
        if setting.hub_key:
            offers.append(_offer(setting.hub_key, lan(5), [setting.tunnel_host(5)]))
        for i, key in enumerate(setting.extra_keys):
            offers.append(_offer(key, lan(20 + i), [setting.tunnel_host(20 + i)]))
        for i, net in enumerate(setting.extra_ips):
            offers.append(_offer(hostile_key(f"steal-{net}"), lan(30 + i), [str(net)]))
        if setting.neighbour is not None:
            offers.append(setting.neighbour.offer())
    return offers


def many_peers_body(caller: Caller) -> bytes:
    """10 000 distinct, individually plausible peers, compact enough (under 1 MiB) that
    only the peer count, not the size, can get the answer refused."""
    peers = [
        {"pubkey": hostile_key(f"many-{i}"), "endpoint": caller.lan_host(i), "port": 51820}
        for i in range(MANY_PEERS)
    ]
    return json.dumps({"peers": peers}, separators=(",", ":")).encode()


def huge_json(size: int) -> bytes:
    """A syntactically valid answer of ``size`` bytes: one peer list padded with a long
    string, so a client that reads it all would even parse it."""
    head, tail = b'{"peers":[],"pad":"', b'"}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One HTTP/1.1 request head and its Content-Length body; None when the client
    went away or sent something that is not HTTP."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length", "0")
    body = b""
    if length.isdigit() and 0 < int(length) <= MAX_REQUEST_BODY:
        try:
            body = await reader.readexactly(int(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
    return Request(parts[0], parts[1], headers, body)


def _head(status: int, reason: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def simple_answer(status: int, reason: str, content_type: str, body: bytes, **extra: str) -> bytes:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Connection": "close",
        **{k.replace("_", "-"): v for k, v in extra.items()},
    }
    return _head(status, reason, headers) + body


class HostileServer:
    """Answers every request according to ``setting.mode``; counts what it did."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.requests = 0
        self._generation = 0
        self._connections: set[asyncio.Task[None]] = set()

    def _log(self, number: int, request: Request, outcome: str) -> None:
        print(f"hostile: #{number} -> {outcome}", flush=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            request = await read_request(reader)
            if request is None:
                return
            self.requests += 1
            number = self.requests
            # Logged on arrival, so a test counts every request, even one never answered.
            print(f"hostile: #{number} {request.method} {request.path}", flush=True)
            try:
                outcome = await self._answer(request, reader, writer)
            except (ConnectionError, OSError) as exc:
                outcome = f"client hung up ({type(exc).__name__})"
            self._log(number, request, outcome)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _answer(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str:
        mode = self.setting.mode
        if request.method == "GET":
            # A compromised hub answers the agent's probe like the real server, and
            # misbehaves only once it is sent a report.
            writer.write(simple_answer(405, "Method Not Allowed", "application/json",
                                       b'{"error":"POST"}', Allow="POST"))  # fmt: skip
            await writer.drain()
            return "answered the probe like a peering server"
        caller = Caller.from_body(request.body)
        if mode is Mode.HANG:
            # Keep the socket open and silent until the client gives up.
            await reader.read()
            return "hung until the client left"
        if mode is Mode.NOT_HTTP:
            writer.write(os.urandom(4096))
            await writer.drain()
            return "sent 4096 random bytes"
        if mode is Mode.ERROR_500:
            writer.write(
                simple_answer(500, "Internal Server Error", "application/json", b'{"error":"boom"}')
            )
        elif mode is Mode.REDIRECT:
            writer.write(
                simple_answer(
                    307, "Temporary Redirect", "text/plain", b"", Location=REDIRECT_TARGET
                )
            )
        elif mode is Mode.HTML:
            page = b"<!doctype html><html><body><h1>It works!</h1></body></html>"
            writer.write(simple_answer(200, "OK", "text/html; charset=utf-8", page))
        elif mode is Mode.GARBAGE:
            writer.write(simple_answer(200, "OK", "application/json", os.urandom(2048)))
        elif mode is Mode.GZIP_BOMB:
            bomb = gzip.compress(huge_json(HUGE_BODY_BYTES), compresslevel=9)
            writer.write(
                simple_answer(200, "OK", "application/json", bomb, Content_Encoding="gzip")
            )
        elif mode is Mode.MANY_PEERS:
            writer.write(simple_answer(200, "OK", "application/json", many_peers_body(caller)))
        elif mode is Mode.HUGE_BODY:
            return await self._stream(writer, chunked=False)
        elif mode is Mode.HUGE_CHUNKED:
            return await self._stream(writer, chunked=True)
        elif mode is Mode.DRIP:
            return await self._drip(writer)
        elif mode is Mode.SPIN:
            self._generation += 1
            writer.write(
                simple_answer(
                    200,
                    "OK",
                    "application/json",
                    b'{"peers":[]}',
                    ETag=f'"spin-{self._generation}"',
                )
            )
        else:
            body = json.dumps({"peers": hostile_offers(self.setting, caller)}).encode()
            writer.write(simple_answer(200, "OK", "application/json", body))
        await writer.drain()
        return "answered"

    async def _stream(self, writer: asyncio.StreamWriter, *, chunked: bool) -> str:
        body = huge_json(HUGE_BODY_BYTES)
        headers = {"Content-Type": "application/json", "Connection": "close"}
        headers["Transfer-Encoding" if chunked else "Content-Length"] = (
            "chunked" if chunked else str(len(body))
        )
        writer.write(_head(200, "OK", headers))
        sent = 0
        step = 64 * 1024
        try:
            for start in range(0, len(body), step):
                chunk = body[start : start + step]
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await writer.drain()
                sent += len(chunk)
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            return f"client hung up after {sent} of {len(body)} body bytes"
        return f"sent all {len(body)} body bytes"

    async def _drip(self, writer: asyncio.StreamWriter) -> str:
        body = b'{"peers":[]}'
        writer.write(
            _head(200, "OK", {"Content-Type": "application/json", "Content-Length": str(len(body))})
        )
        sent = 0
        try:
            for byte in body:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(DRIP_INTERVAL)
        except (ConnectionError, OSError):
            return f"client hung up after {sent} dripped bytes"
        return "dripped the whole answer"


async def serve(setting: Setting, host: str, port: int) -> None:
    """Serve until cancelled (SIGTERM ends the process)."""
    server = HostileServer(setting)
    listener = await asyncio.start_server(server.handle, host, port, limit=MAX_REQUEST_HEAD)
    print(f"hostile: listening on {host}:{port} mode={setting.mode}", flush=True)
    async with listener:
        await listener.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wg_autopeer.lab.hostile", description=__doc__)
    parser.add_argument("--listen", required=True, metavar="ADDR:PORT")
    parser.add_argument("--mode", required=True, choices=[m.value for m in Mode])
    parser.add_argument("--tunnel-network", metavar="CIDR", help="default: ADDR/24")
    parser.add_argument("--hub-key", metavar="KEY")
    parser.add_argument("--neighbour", metavar="KEY@ADDR:PORT=TUNNEL/32")
    parser.add_argument("--extra-key", action="append", default=[], metavar="KEY")
    parser.add_argument("--extra-ip", action="append", default=[], metavar="CIDR")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    hub_ip = ip_address(host.strip("[]"))
    default_prefix = 24 if isinstance(hub_ip, IPv4Address) else 64
    tunnel = ip_network(args.tunnel_network or f"{hub_ip}/{default_prefix}", strict=False)
    setting = Setting(
        mode=Mode(args.mode),
        hub_ip=hub_ip,
        tunnel=tunnel,
        hub_key=args.hub_key,
        neighbour=Neighbour.parse(args.neighbour) if args.neighbour else None,
        extra_keys=tuple(args.extra_key),
        extra_ips=tuple(ip_network(n) for n in args.extra_ip),
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(setting, host.strip("[]"), int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
