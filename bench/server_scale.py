"""Server scale: the peering request against registries of 1 000 to 100 000 clients, and
5 000 blocking queries held at once.

The server is the product's app (``create_app``) served by uvicorn in this process on
127.0.0.1, with the product's uvicorn configuration (``uvicorn_config``: no proxy
headers, its h11 protocol) and INFO logging with one access line per request, to a
file, and its default SQLite store on disk. Its hub is a synthetic userspace device
(``bench.uapi_device``, another process) answering ``get=1`` on a UAPI socket with the
whole population, new counters on every read and a handshake per client every two
minutes: the server reads it with its real UAPI reader and parser, in its worker
thread, on its usual 2 s timer. The registry is loaded from the store, then
``bench.loadgen`` — another process — sends requests at fixed concurrency, each from a
random client's own loopback address.

While the load runs, a probe in the server's event loop (a 1 ms timer) records how late
the loop runs: the stalls every request would wait behind. At 1 000 clients, the
requests per second the app answers in process (ASGI calls, no sockets) on one core.

Handshakes and TTL are set to a day so that the synthetic state stays valid for the
whole run; nothing else differs from the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any, TypeVar

from bench.common import (
    REPO,
    Options,
    PartResult,
    Row,
    log,
    percentile,
    raise_fd_limit,
    require,
    sample_process,
)
from bench.synthetic import DISTRIBUTIONS, LISTEN_PORT, Client, population
from wg_autopeer.protocol import PATH
from wg_autopeer.server.app import Coordinator, create_app
from wg_autopeer.server.config import ServerConfig
from wg_autopeer.server.http import uvicorn_config
from wg_autopeer.server.hubread import UapiReader
from wg_autopeer.server.matching import Registration, ReportedLan
from wg_autopeer.server.readerprocess import ProcessReader
from wg_autopeer.server.store import SqliteStore
from wg_autopeer.wireguard.fake import FakeWireGuard

PART = "Server scale"
IFACE = "bench0"
DAY = 24 * 3600.0
SIZES = (1_000, 10_000, 100_000)
BLOCKING_REGISTRY = 10_000
WAITERS = 5_000
TARGET_P99_MS = 10.0
TARGET_RATIO = 1.5
TARGET_STALL_MS = 5.0
TARGET_INPROC_RPS = 4000
TARGET_RSS_PER_CLIENT_KIB = 2.0
INPROC_SECONDS = 3.0
# Clients the in-process probes (matching, ASGI calls) pick from, kept after the rest go.
PROBE_CLIENTS = 2_000
IDLE_WINDOW_S = 5.0
T = TypeVar("T")


@dataclass
class Case:
    """One registry size and distribution under load."""

    size: int
    distribution: str
    # Seconds for the server to load the registry from its store at start.
    prefill_s: float = 0.0
    tick_ms: float = 0.0
    rss_kib: int = 0
    # Mean microseconds of the matching step alone (``Registry.answer_for``), in-process.
    match_us: float = 0.0
    # Server CPU time per answered request, over the whole load (warm-up included); the
    # server's hub reader process counted in.
    cpu_ms_per_request: float = 0.0
    # The hub reader process (``readerprocess``): its PID, and its share of ``rss_kib``.
    reader_pid: int = 0
    reader_rss_kib: int = 0
    # Full (generation 2) garbage collections during the load, and their total time.
    full_gcs: int = 0
    full_gc_ms: float = 0.0
    # The event loop with no requests, over a few background rounds: background work only.
    idle_stall_max_ms: float = 0.0
    idle_hub_reads: int = 0
    # The event loop during the load (background work and requests alike): its worst
    # lateness, and how often it was over 5 ms.
    stall_max_ms: float = 0.0
    stall_p99_ms: float = 0.0
    stalls_over_5ms: int = 0
    # Reads of the hub during the load, and the wall time of the first (full) one.
    hub_reads: int = 0
    first_read_ms: float = 0.0
    # Requests/s answered in process (ASGI calls, one at a time), at the smallest size.
    inproc_rps: float = 0.0
    load: dict[str, Any] = field(default_factory=dict)


def registration(client: Client, ttl: float) -> Registration:
    """What the request handler registers for ``client`` (``build_registration``)."""
    return Registration(
        pubkey=client.pubkey,
        tunnel_ips=(ip_address(client.tunnel_ip),),
        public_ip=IPv4Address(client.public_ip),
        lans=(
            ReportedLan(
                ip_address(client.lan_ip), client.prefix, ip_address(client.gateway), LISTEN_PORT
            ),
        ),
        expires_at=time.time() + ttl,
    )


class BulkStore(SqliteStore):
    """The product's store, plus one bulk insert for filling it before a run."""

    def put_all(self, registrations: Iterable[Registration]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            for registration in registrations:
                self.put(registration)

    def __enter__(self) -> BulkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def server_logging(path: Path) -> Iterator[None]:
    """INFO logging to ``path``, as ``wg-autopeer server`` logs to stderr."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def hub_reader(db: Path) -> ProcessReader:
    """The real UAPI reader and parser in its own process, as the server command runs it;
    the link check is the one thing left out (the synthetic device has no interface).

    Make it first thing, as the command does: a child forked after the benchmark built
    its population would share those pages, and its RSS would count them a second time.
    """
    socket_dir = db.parent / "uapi"
    return ProcessReader(
        IFACE, lambda: UapiReader(IFACE, socket_dir, link_exists=lambda name: True)
    )


async def with_server(
    reader: ProcessReader,
    clients: list[Client],
    db: Path,
    body: Callable[[int, Coordinator, Case], Awaitable[T]],
    case: Case,
) -> T:
    """Serve a registry of ``clients`` on 127.0.0.1 while ``body(port, core, case)`` runs.

    Takes the list over: it is emptied once the store holds them (see ``serve_with``)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Ctrl-C must reach the benchmark runner, not stop only this server.
            yield

    for leftover in db.parent.glob(db.name + "*"):
        leftover.unlink()
    socket_dir = db.parent / "uapi"
    socket_dir.mkdir(exist_ok=True)
    device = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.uapi_device",
        "--socket", str(socket_dir / f"{IFACE}.sock"),
        "--n", str(len(clients)), "--dist", case.distribution,
        cwd=str(REPO), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert device.stdout is not None
    try:
        ready = await asyncio.wait_for(device.stdout.readline(), 120)
        require(ready.strip() == b"ready", "the synthetic UAPI device did not start")
        return await serve_with(reader, clients, db, body, case)
    finally:
        device.kill()
        await device.wait()


async def serve_with(
    reader: ProcessReader,
    clients: list[Client],
    db: Path,
    body: Callable[[int, Coordinator, Case], Awaitable[T]],
    case: Case,
) -> T:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Ctrl-C must reach the benchmark runner, not stop only this server.
            yield

    config = ServerConfig(interface=IFACE, db=str(db), handshake_max_age=DAY, ttl=DAY)
    # The registry comes from the store, as after a restart: written in one transaction
    # here (one request per client would take minutes), loaded by the server itself.
    with BulkStore(db) as store:
        store.put_all(registration(c, config.ttl) for c in clients)
    # The benchmark's own list of clients (about 0.5 KiB each) is no part of the server:
    # keep a sample for the in-process probes and let the rest go before the server
    # loads, or its RSS per client would count the list too.
    sample = random.Random(5).sample(clients, min(len(clients), PROBE_CLIENTS))
    clients.clear()
    gc.collect()
    case.reader_pid = reader.pid or 0
    started = time.perf_counter()
    app = create_app(config, FakeWireGuard(), reader=reader)
    case.prefill_s = time.perf_counter() - started
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = Server(uvicorn_config(app, backlog=8192, timeout_graceful_shutdown=1))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            require(not serving.done(), "the in-process server did not start")
            await asyncio.sleep(0.02)
        core: Coordinator = app.state.coordinator
        require(core.registry.client_count == case.size, "registry not filled")
        # The first (full) read, which the lifespan's background round started.
        started = time.perf_counter()
        while core.hub.refreshed_at is None:
            require(time.perf_counter() - started < 300, "the first hub read never finished")
            await asyncio.sleep(0.05)
        case.first_read_ms = (time.perf_counter() - started) * 1000
        require(len(core.hub.snapshot.peers) == case.size, "hub not read in full")
        gc.collect()
        # One background round (a read of the hub, in the worker thread, then the due
        # deadlines): the server runs it every refresh_interval.
        started = time.perf_counter()
        await core.tick()
        case.tick_ms = (time.perf_counter() - started) * 1000
        case.reader_rss_kib = sample_process(case.reader_pid).rss_kib
        case.rss_kib = sample_process_self() + case.reader_rss_kib
        case.match_us = time_matching(core, sample)
        if case.size == min(SIZES):
            case.inproc_rps = await inprocess_rps(app, sample, INPROC_SECONDS)
        # No requests for a few background rounds: what background work alone costs the loop.
        reads = core.hub.reads
        probe = LoopProbe()
        await asyncio.sleep(IDLE_WINDOW_S)
        case.idle_stall_max_ms = max(await probe.stop(), default=0.0) * 1000
        case.idle_hub_reads = core.hub.reads - reads
        return await body(port, core, case)
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def inprocess_rps(app: Any, clients: list[Client], seconds: float) -> float:
    """Peering requests per second through the app's ASGI interface, one at a time."""
    rng = random.Random(7)
    answered = 0
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        client = clients[rng.randrange(len(clients))]
        status = await asgi_post(app, client)
        require(status == 200, f"in-process request answered {status}")
        answered += 1
    return answered / seconds


async def asgi_post(app: Any, client: Client) -> int:
    body = client.body()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"hub"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": (client.tunnel_ip, 40000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the app never asks again
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


class LoopProbe:
    """A 1 ms timer on the loop; records how late it runs, until ``stop``."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.lags.append(max(0.0, loop.time() - due))

    async def stop(self) -> list[float]:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.lags


class GcClock:
    """Counts full garbage collections and the time they take, until ``stop``."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._started

    def stop(self) -> tuple[float, int]:
        gc.callbacks.remove(self._callback)
        return self.seconds * 1000, self.count


def time_matching(core: Coordinator, clients: list[Client], calls: int = 2000) -> float:
    """Mean µs of one ``answer_for`` (the neighbour lookup) for random registered clients."""
    rng = random.Random(6)
    keys = [clients[rng.randrange(len(clients))].pubkey for _ in range(calls)]
    now = time.time()
    started = time.perf_counter()
    for key in keys:
        core.registry.answer_for(key, now)
    return (time.perf_counter() - started) / calls * 1e6


def sample_process_self() -> int:
    return sample_process(os.getpid()).rss_kib


def process_cpu(case: Case) -> float:
    """CPU seconds of the server so far: this process, every thread, and its reader's."""
    return time.process_time() + sample_process(case.reader_pid).cpu_seconds


async def loadgen(*args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        *args,
        cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    require(proc.returncode == 0, f"loadgen failed: {err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


async def load_case(
    size: int, distribution: str, options: Options, duration: float, concurrency: int
) -> Case:
    db = options.out / "server-scale.db"
    reader = hub_reader(db)
    case = Case(size, distribution)
    clients = population(size, distribution)

    async def body(port: int, core: Coordinator, case: Case) -> Case:
        before = process_cpu(case)
        reads = core.hub.reads
        probe = LoopProbe()
        gc_clock = GcClock()
        case.load = await loadgen(
            "load",
            "--port", str(port), "--n", str(size), "--dist", distribution,
            "--duration", f"{duration:g}", "--concurrency", str(concurrency),
        )  # fmt: skip
        requests = case.load["requests"] / case.load["seconds"] * (duration + 1.0)
        case.cpu_ms_per_request = (process_cpu(case) - before) * 1000 / max(requests, 1.0)
        case.full_gc_ms, case.full_gcs = gc_clock.stop()
        lags = await probe.stop()
        case.hub_reads = core.hub.reads - reads
        case.stall_max_ms = max(lags, default=0.0) * 1000
        case.stall_p99_ms = percentile(lags, 99) * 1000
        case.stalls_over_5ms = sum(1 for lag in lags if lag > TARGET_STALL_MS / 1000)
        return case

    return await with_server(reader, clients, db, body, case)


async def blocking_case(options: Options, changes: int, idle: float) -> dict[str, Any]:
    db = options.out / "server-scale.db"
    reader = hub_reader(db)
    clients = population(BLOCKING_REGISTRY, "distinct")
    case = Case(BLOCKING_REGISTRY, "distinct")

    async def body(port: int, core: Coordinator, case: Case) -> dict[str, Any]:
        result = await loadgen(
            "block",
            "--port", str(port), "--n", str(BLOCKING_REGISTRY), "--dist", "distinct",
            "--waiters", str(WAITERS), "--changes", str(changes), "--idle", f"{idle:g}",
            "--server-pid", str(os.getpid()),
        )  # fmt: skip
        result["registry"] = BLOCKING_REGISTRY
        return result

    return await with_server(reader, clients, db, body, case)


def plot(cases: list[Case], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, distribution in zip(axes, DISTRIBUTIONS, strict=True):
        for case in (c for c in cases if c.distribution == distribution):
            values = sorted(case.load["latencies_ms"])
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.plot(values, ys, label=f"{case.size:,} clients")
        ax.set_xscale("log")
        ax.set_xlabel("latency of one peering request (ms)")
        ax.set_title(
            "distinct LANs" if distribution == "distinct" else "same router defaults", fontsize=10
        )
        ax.grid(True, which="both", alpha=0.25)
        ax.axvline(TARGET_P99_MS, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def case_in_subprocess(options: Options, *args: str) -> dict[str, Any]:
    """Run one case in a fresh process (``python -m bench.server_scale``), so that no
    case inherits the memory or the garbage of the one before; its JSON answer."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.server_scale", "--out", str(options.out), *args],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    require(proc.returncode == 0, f"server case {args} failed: {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def run(options: Options) -> PartResult:
    duration = 4.0 if options.quick else 10.0
    # Low enough that queueing behind other requests does not dominate the latency.
    concurrency = 4
    cases: list[Case] = []
    for distribution in DISTRIBUTIONS:
        for size in SIZES:
            argv = ["load", "--size", str(size), "--dist", distribution]
            argv += ["--duration", f"{duration:g}", "--concurrency", str(concurrency)]
            case = Case(**case_in_subprocess(options, *argv))
            cases.append(case)
            load = case.load
            log(
                f"server {size:>7,} {distribution:<8}: {load['rps']:.0f} req/s, "
                f"p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms "
                f"(background round {case.tick_ms:.0f} ms)"
            )
    blocking = case_in_subprocess(
        options,
        "block", "--changes", str(options.trials(20, 5)), "--idle", f"{idle_for(options):g}",
    )  # fmt: skip
    log(
        f"server blocking: {blocking['waiters']} waiting, wake p50 {blocking['wake_p50_ms']:.1f} ms"
    )
    result = PartResult(PART)
    png = options.out / "server-latency.png"
    plot(cases, png)
    result.plots.append(png)
    result.rows = rows(cases, blocking, concurrency)
    result.data = {
        "cases": cases,
        "blocking": blocking,
        "concurrency": concurrency,
        "duration_s": duration,
    }
    return result


def idle_for(options: Options) -> float:
    return 5.0 if options.quick else 10.0


def rows(cases: list[Case], blocking: dict[str, Any], concurrency: int) -> list[Row]:
    out: list[Row] = []
    for case in cases:
        load = case.load
        bad = sum(n for status, n in load["statuses"].items() if str(status) != "200")
        out.append(
            Row(
                PART,
                f"{case.size:,} clients, {case.distribution} LANs (concurrency {concurrency})",
                f"{load['rps']:.0f} req/s, p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms"
                f"; server CPU {case.cpu_ms_per_request:.2f} ms/request; "
                f"matching {case.match_us:.0f} µs" + (f"; {bad} non-200" if bad else ""),
                f"p99 < {TARGET_P99_MS:g} ms" if case.size == max(SIZES) else "",
                load["p99_ms"] < TARGET_P99_MS if case.size == max(SIZES) else None,
            )
        )
    for distribution in DISTRIBUTIONS:
        small = next(c for c in cases if c.distribution == distribution and c.size == min(SIZES))
        large = next(c for c in cases if c.distribution == distribution and c.size == max(SIZES))
        ratio = large.load["p50_ms"] / small.load["p50_ms"]
        out.append(
            Row(
                PART,
                f"p50 at {max(SIZES):,} / p50 at {min(SIZES):,} ({distribution} LANs)",
                f"{ratio:.2f}x",
                f"<= {TARGET_RATIO:g}x",
                ratio <= TARGET_RATIO,
            )
        )
    big = [c for c in cases if c.size == max(SIZES)]
    out.append(
        Row(
            PART,
            f"background round at {max(SIZES):,} clients (every 2 s; the hub read runs in "
            "a process of its own through the real UAPI parser)",
            ", ".join(
                f"{c.tick_ms:.0f} ms ({c.distribution}; first, full read {c.first_read_ms:.0f} ms)"
                for c in big
            ),
        )
    )
    for case in big:
        out.append(
            Row(
                PART,
                f"event-loop stalls from background work at {case.size:,} clients "
                f"({case.distribution} LANs; no requests, {case.idle_hub_reads} hub reads)",
                f"max {case.idle_stall_max_ms:.1f} ms",
                f"max <= {TARGET_STALL_MS:g} ms",
                case.idle_stall_max_ms <= TARGET_STALL_MS,
            )
        )
        out.append(
            Row(
                PART,
                f"event-loop lateness under load at {case.size:,} clients ({case.distribution} "
                f"LANs; requests included; {case.hub_reads} hub reads meanwhile)",
                f"max {case.stall_max_ms:.1f} ms, p99 {case.stall_p99_ms:.2f} ms, "
                f"{case.stalls_over_5ms} over {TARGET_STALL_MS:g} ms",
            )
        )
    for case in (c for c in cases if c.size == min(SIZES)):
        out.append(
            Row(
                PART,
                f"in process at {case.size:,} clients ({case.distribution} LANs; ASGI calls "
                "one at a time, one core)",
                f"{case.inproc_rps:.0f} requests/s",
                f">= {TARGET_INPROC_RPS} requests/s",
                case.inproc_rps >= TARGET_INPROC_RPS,
            )
        )
    for distribution in DISTRIBUTIONS:
        small = next(c for c in cases if c.distribution == distribution and c.size == min(SIZES))
        large = next(c for c in cases if c.distribution == distribution and c.size == max(SIZES))
        per_client = (large.rss_kib - small.rss_kib) / (large.size - small.size)
        out.append(
            Row(
                PART,
                f"server RSS per registered client ({distribution} LANs; "
                f"{small.size:,} -> {large.size:,} clients)",
                f"{per_client:.2f} KiB",
                f"<= {TARGET_RSS_PER_CLIENT_KIB:g} KiB",
                per_client <= TARGET_RSS_PER_CLIENT_KIB,
            )
        )
    idle = blocking["idle_seconds"]
    per_waiter = (blocking["rss_waiting_kib"] - blocking["rss_before_kib"]) / blocking["waiters"]
    out += [
        Row(
            PART,
            f"{blocking['waiters']:,} blocking queries held, one neighbour change at a time",
            f"affected waiters answered in median {blocking['wake_p50_ms']:.0f} ms, "
            f"max {blocking['wake_max_ms']:.0f} ms after the change was sent "
            f"({len(blocking['wake_ms'])} wake-ups, {blocking['missed']} missed, "
            f"{blocking['spurious']} other waiters woken)",
        ),
        Row(
            PART,
            "  of which: the change request itself / the fan-out after it",
            f"median {blocking['change_p50_ms']:.0f} ms / "
            f"median {blocking['after_change_p50_ms']:.1f} ms, "
            f"max {blocking['after_change_max_ms']:.1f} ms",
        ),
        Row(
            PART,
            f"server while {blocking['waiters']:,} queries wait ({BLOCKING_REGISTRY:,} registered)",
            f"RSS {blocking['rss_waiting_kib'] / 1024:.0f} MiB "
            f"(+{per_waiter:.1f} KiB per waiter), "
            f"CPU {100 * blocking['idle_cpu_seconds'] / idle:.1f} % over {idle:.0f} s",
        ),
    ]
    return out


async def one_case(args: argparse.Namespace) -> dict[str, Any]:
    options = Options(out=args.out)
    name = f"server-{args.mode}" + (f"-{args.size}-{args.dist}" if args.mode == "load" else "")
    with server_logging(options.out / f"{name}.log"):
        try:
            if args.mode == "load":
                case = await load_case(
                    args.size, args.dist, options, args.duration, args.concurrency
                )
                return dataclasses.asdict(case)
            return await blocking_case(options, changes=args.changes, idle=args.idle)
        finally:
            for leftover in options.out.glob("server-scale.db*"):
                leftover.unlink()


def main(argv: list[str] | None = None) -> int:
    """One case, as ``run`` starts it: prints its figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.server_scale")
    parser.add_argument("--out", type=Path, required=True)
    sub = parser.add_subparsers(dest="mode", required=True)
    load = sub.add_parser("load")
    load.add_argument("--size", type=int, required=True)
    load.add_argument("--dist", choices=DISTRIBUTIONS, required=True)
    load.add_argument("--duration", type=float, default=10.0)
    load.add_argument("--concurrency", type=int, default=4)
    block = sub.add_parser("block")
    block.add_argument("--changes", type=int, default=20)
    block.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args(argv)
    raise_fd_limit()
    json.dump(asyncio.run(one_case(args)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
