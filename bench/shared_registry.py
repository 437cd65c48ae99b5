"""Shared registry: several server processes on one PostgreSQL database.

A PostgreSQL of its own (``wg_autopeer.lab.postgres``: Debian's binaries, loopback, a
temporary directory), filled with a registry of clients in homes of 3-5 (the
server-scale part's synthetic population, distinct LANs). Each server is its own
process (``python -m bench.shared_registry serve``): the product's app and uvicorn
configuration over the PostgreSQL store, its hub the synthetic UAPI device of the
server-scale part, which every server process reads (several processes on one hub).

* requests/s with 1, 2 and 4 server processes, one ``bench.loadgen`` process per server
  (4 connections each), against 1 process over SQLite: steady-state reports (each
  client reports its unchanged LAN: the store only sees the lazy expiry batches);
* cross-instance wake-up: a client holds a blocking query on server A; a neighbour in its
  home reports a changed LAN to server B; the time from sending that report to the
  waiting answer (median, p99), and the same with both on one server for comparison;
* a database outage: requests/s and statuses on a server before, during and after
  PostgreSQL is stopped for a few seconds, and how long after it is back a change made
  during the outage reaches the other server.

The machine's 2 cores are shared by the servers, the load generators, PostgreSQL and
the synthetic device: more processes than cores is what this measures, not hides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import REPO, Options, PartResult, Row, log, percentile, require
from bench.loadgen import send
from bench.server_scale import DAY, registration
from bench.synthetic import LISTEN_PORT, Client, homes, population
from wg_autopeer.lab.postgres import PostgresServer, free_port

PART = "Shared registry"
IFACE = "bench0"
HUB = "bench-hub"
DIST = "distinct"
TARGET_WAKE_MS = 100.0


# --------------------------------------------------------------------------- one server


async def serve(args: argparse.Namespace) -> None:
    """One server process: prints ``ready`` once serving and its first hub read is done."""
    import uvicorn

    from wg_autopeer.server.app import create_app
    from wg_autopeer.server.config import ServerConfig
    from wg_autopeer.server.coordinator import Coordinator
    from wg_autopeer.server.http import uvicorn_config
    from wg_autopeer.server.hubread import UapiReader
    from wg_autopeer.wireguard.fake import FakeWireGuard

    logging.basicConfig(filename=args.log, level=logging.INFO)
    config = ServerConfig(interface=IFACE, db=args.db, hub=HUB, handshake_max_age=DAY, ttl=DAY)
    reader = UapiReader(IFACE, Path(args.socket_dir), link_exists=lambda name: True)
    app = create_app(config, FakeWireGuard(), reader=reader)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    server = uvicorn.Server(uvicorn_config(app, backlog=8192, timeout_graceful_shutdown=1))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    core: Coordinator = app.state.coordinator
    while not server.started or core.hub.refreshed_at is None:
        require(not serving.done(), "server did not start")
        await asyncio.sleep(0.02)
    print("ready", flush=True)
    await serving


@dataclasses.dataclass
class ServerProcess:
    port: int
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        # Ours, by PID.
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(db: str, socket_dir: Path, out: Path, name: str) -> ServerProcess:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "bench.shared_registry", "serve",
            "--db", db, "--socket-dir", str(socket_dir), "--port", str(port),
            "--log", str(out / f"shared-{name}.log"),
        ],
        cwd=str(REPO), stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != b"ready":
        process.kill()
        process.wait()
        raise RuntimeError(f"server {name} did not start (see shared-{name}.log)")
    return ServerProcess(port, process)


@contextlib.contextmanager
def servers(db: str, socket_dir: Path, out: Path, count: int, tag: str) -> Iterator[list[int]]:
    started: list[ServerProcess] = []
    try:
        for i in range(count):
            started.append(start_server(db, socket_dir, out, f"{tag}{i}"))
        yield [s.port for s in started]
    finally:
        for s in started:
            s.stop()


@contextlib.contextmanager
def uapi_device(socket_dir: Path, size: int) -> Iterator[None]:
    socket_dir.mkdir(parents=True, exist_ok=True)
    device = subprocess.Popen(
        [
            sys.executable, "-m", "bench.uapi_device",
            "--socket", str(socket_dir / f"{IFACE}.sock"), "--n", str(size), "--dist", DIST,
        ],
        cwd=str(REPO), stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert device.stdout is not None
        require(device.stdout.readline().strip() == b"ready", "synthetic device did not start")
        yield
    finally:
        device.kill()
        device.wait()


def fill(db: str, clients: list[Client]) -> None:
    """The registry as the servers find it at start: every client registered via HUB."""
    from wg_autopeer.server.store import open_store

    store = open_store(db, hub=HUB)
    try:
        regs = [dataclasses.replace(registration(c, DAY), hub=HUB) for c in clients]
        store.write_changes(regs, [], [])
    finally:
        store.close()


# --------------------------------------------------------------------------- measures


def loadgens(ports: list[int], size: int, duration: float) -> dict[str, Any]:
    """One load generator per server, at once; their requests/s summed."""
    procs = []
    for i, port in enumerate(ports):
        argv = [sys.executable, "-m", "bench.loadgen", "load", "--port", str(port)]
        argv += ["--n", str(size), "--dist", DIST, "--duration", f"{duration:g}"]
        argv += ["--concurrency", "4", "--seed", str(6 + i)]
        procs.append(
            subprocess.Popen(argv, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=duration + 120)
        require(proc.returncode == 0, f"loadgen failed: {err.decode(errors='replace')[-2000:]}")
        results.append(json.loads(out))
    latencies = [v for r in results for v in r["latencies_ms"]]
    statuses: dict[str, int] = {}
    for r in results:
        for status, count in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    return {
        "servers": len(ports),
        "rps": sum(r["rps"] for r in results),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "statuses": statuses,
        "errors": sum(sum(r["errors"].values()) for r in results),
    }


async def etag_of(port: int, client: Client, body: bytes) -> str:
    answer = await send(port, client, body, {})
    require(answer.status == 200 and answer.etag is not None, f"report failed: {answer.status}")
    return answer.etag or ""


async def waiting(port: int) -> float:
    from bench.loadgen import metric

    return await metric(port, "wg_autopeer_waiting_queries")


async def wake_latencies(
    waiter_port: int,
    changer_port: int,
    pairs: list[tuple[Client, Client]],
    trials: int,
    port_base: int,
) -> tuple[list[float], list[float]]:
    """Seconds from sending a neighbour's changed report to ``changer_port`` until the
    blocking query held on ``waiter_port`` answers, and from that report's answer (the
    change is committed) to the waiting answer. Each change reports a listen port from
    ``port_base`` on, which no earlier run used."""
    from_sent = []
    from_ack = []
    for trial in range(trials):
        waiter, changer = pairs[trial % len(pairs)]
        etag = await etag_of(waiter_port, waiter, waiter.body())
        held = asyncio.create_task(
            send(waiter_port, waiter, waiter.body(), {"If-None-Match": etag, "Prefer": "wait=20"})
        )
        deadline = time.monotonic() + 5
        while await waiting(waiter_port) < 1:
            require(time.monotonic() < deadline, "the blocking query is not held")
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        change = await send(changer_port, changer, changer.body(port_base + trial), {})
        acknowledged = time.perf_counter()
        require(change.status == 200, f"change refused: {change.status}")
        answer = await held
        woke = time.perf_counter()
        require(answer.status == 200, f"blocking query ended with {answer.status}")
        from_sent.append(woke - started)
        # Negative when the waiter's answer came before the changer's own.
        from_ack.append(woke - acknowledged)
    return from_sent, from_ack


async def outage(
    pg: PostgresServer, ports: list[int], pairs: list[tuple[Client, Client]], size: int,
    window: float,
) -> dict[str, Any]:  # fmt: skip
    """Load on server A before, during and after PostgreSQL is stopped for ``window`` s;
    a change made on A during the outage, and when B's waiter hears of it."""
    a, b = ports
    result: dict[str, Any] = {"window_s": window}
    result["before"] = await asyncio.to_thread(loadgens, [a], size, window)
    pg.stop()
    stopped = time.monotonic()
    waiter, changer = pairs[0]
    etag = await etag_of(b, waiter, waiter.body())
    held = asyncio.create_task(
        send(b, waiter, waiter.body(), {"If-None-Match": etag, "Prefer": "wait=60"})
    )
    result["during"] = await asyncio.to_thread(loadgens, [a], size, window)
    # After the load: the load generator reports every client as it was, the changer too,
    # and would take the change back before the database returns.
    changed = await send(a, changer, changer.body(LISTEN_PORT + 999), {})
    result["change_during_outage_status"] = changed.status
    health = await http_get(a, "/healthz")
    result["health_during"] = health
    result["down_s"] = time.monotonic() - stopped
    pg.start()
    back = time.perf_counter()
    healthy = asyncio.create_task(healthy_again(a, back))
    answer = await held
    result["change_reached_b_after_restart_s"] = time.perf_counter() - back
    result["change_reached_b_status"] = answer.status
    result["a_healthy_after_restart_s"] = await healthy
    result["after"] = await asyncio.to_thread(loadgens, [a], size, window)
    return result


async def healthy_again(port: int, since: float) -> float:
    """Seconds from ``since`` (perf_counter) until ``port``'s /healthz is no longer degraded."""
    deadline = time.monotonic() + 60
    while (await http_get(port, "/healthz")).get("degraded") is not None:
        require(time.monotonic() < deadline, "server A stayed degraded")
        await asyncio.sleep(0.05)
    return time.perf_counter() - since


async def http_get(port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read(-1)
    finally:
        writer.close()
    body: dict[str, Any] = json.loads(raw.partition(b"\r\n\r\n")[2] or b"{}")
    return body


# --------------------------------------------------------------------------- the part


def run(options: Options) -> PartResult:
    size = 2_000 if options.quick else 10_000
    duration = 4.0 if options.quick else 8.0
    trials = options.trials(60, 15)
    clients = population(size, DIST)
    pairs = [(home[0], home[1]) for home in homes(clients).values() if len(home) >= 2]
    socket_dir = options.out / "shared-uapi"
    pg = PostgresServer.create()
    data: dict[str, Any] = {"size": size, "duration_s": duration, "trials": trials}
    data["loadavg_at_start"] = os.getloadavg()
    try:
        pg.start()
        db = pg.create_database("bench")
        fill(db, clients)
        sqlite = options.out / "shared-baseline.db"
        for leftover in sqlite.parent.glob(sqlite.name + "*"):
            leftover.unlink()
        fill(str(sqlite), clients)
        with uapi_device(socket_dir, size):
            with servers(str(sqlite), socket_dir, options.out, 1, "sqlite") as ports:
                data["sqlite"] = loadgens(ports, size, duration)
            log(f"shared: 1 process, SQLite: {data['sqlite']['rps']:.0f} req/s")
            data["scale"] = []
            for count in (1, 2, 4):
                with servers(db, socket_dir, options.out, count, f"pg{count}-") as ports:
                    figures = loadgens(ports, size, duration)
                data["scale"].append(figures)
                log(f"shared: {count} processes, PostgreSQL: {figures['rps']:.0f} req/s")
            with servers(db, socket_dir, options.out, 2, "wake") as (a, b):
                cross = asyncio.run(wake_latencies(a, b, pairs, trials, 52000))
                local = asyncio.run(wake_latencies(a, a, pairs, trials, 53000))
                data["wake_cross_s"], data["wake_cross_after_ack_s"] = cross
                data["wake_local_s"], data["wake_local_after_ack_s"] = local
                log(
                    "shared: wake-up across instances p50 "
                    f"{1000 * percentile(data['wake_cross_s'], 50):.1f} ms"
                )
                data["outage"] = asyncio.run(
                    outage(pg, [a, b], pairs, size, window=options.trials(5, 3))
                )
    finally:
        pg.destroy()
    data["loadavg_at_end"] = os.getloadavg()
    result = PartResult(PART)
    result.rows = rows(data)
    result.data = data
    return result


def rows(data: dict[str, Any]) -> list[Row]:
    base = data["sqlite"]["rps"]
    out = [
        Row(
            PART,
            f"requests/s, {data['size']:,} clients, steady reports",
            f"1 process on SQLite: {base:.0f}; on PostgreSQL: "
            + ", ".join(
                f"{s['servers']} process{'es' if s['servers'] > 1 else ''} {s['rps']:.0f}"
                f" (p99 {s['p99_ms']:.1f} ms)"
                for s in data["scale"]
            )
            + " (2 cores shared with PostgreSQL and the load generators)",
        )
    ]

    def ms(key: str) -> list[float]:
        return [1000 * v for v in data[key]]

    cross, local = ms("wake_cross_s"), ms("wake_local_s")
    after_ack = ms("wake_cross_after_ack_s")
    p99 = percentile(after_ack, 99)
    out.append(
        Row(
            PART,
            "wake-up across instances: change committed on B (its answer) → waiter on A answered",
            f"p50 {percentile(after_ack, 50):.1f} ms, p99 {p99:.1f} ms, {len(after_ack)} changes",
            f"< {TARGET_WAKE_MS:.0f} ms",
            p99 < TARGET_WAKE_MS,
        )
    )
    out.append(
        Row(
            PART,
            "change sent → neighbour's waiting answer (includes the changer's hub re-read)",
            f"across instances p50 {percentile(cross, 50):.1f} ms, p99 "
            f"{percentile(cross, 99):.1f} ms; on one instance p50 {percentile(local, 50):.1f}"
            f" ms, p99 {percentile(local, 99):.1f} ms",
        )
    )
    o = data["outage"]
    fives = [
        count
        for phase in ("before", "during", "after")
        for status, count in o[phase]["statuses"].items()
        if str(status).startswith("5")
    ]
    out.append(
        Row(
            PART,
            f"PostgreSQL stopped {o['down_s']:.0f} s under load (server A)",
            f"req/s before {o['before']['rps']:.0f}, during {o['during']['rps']:.0f}, "
            f"after {o['after']['rps']:.0f}; 5xx: {sum(fives)}; "
            f"change made during it {reached(o)}; "
            f"A healthy {o['a_healthy_after_restart_s']:.1f} s after restart",
        )
    )
    return out


def reached(outage: dict[str, Any]) -> str:
    """How the change made during the outage reached B's waiting neighbour."""
    after = outage["change_reached_b_after_restart_s"]
    if outage["change_reached_b_status"] != 200:
        status = outage["change_reached_b_status"]
        return f"never reached B (its waiter ended with HTTP {status} {after:.1f} s after restart)"
    return f"reached B's waiter {after:.1f} s after restart"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shared_registry")
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("serve", help="one server process (the part starts them)")
    one.add_argument("--db", required=True)
    one.add_argument("--socket-dir", required=True)
    one.add_argument("--port", type=int, required=True)
    one.add_argument("--log", required=True)
    part = sub.add_parser("run", help="the whole part, printing its rows")
    part.add_argument("--out", type=Path, required=True)
    part.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(Options(out=args.out, quick=args.quick))
    for row in result.rows:
        print(f"{row.metric}: {row.result}")
    json.dump(result.data, (args.out / "shared-registry.json").open("w"), default=str)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
