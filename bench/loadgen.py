"""Load for the server-scale benchmark, from its own process: ``python -m bench.loadgen``.

A small asyncio HTTP/1.1 client (no library: an HTTP client library costs more CPU
per request than the server under test, on the same two cores). Every request opens
a connection from the chosen client's own loopback "tunnel" address, sends one
request with ``Connection: close`` and reads the answer to the end; its latency is
from the connect to the last byte.

``load``: fixed concurrency, each worker picks a random client per request, for a
fixed time after a warm-up; prints requests/s and the latency sample as JSON.

``block``: whole homes until ``--waiters`` clients hold blocking queries, re-armed on
every answer like agents do; the server's CPU and RSS while they wait; then, home
after home, one member changes its listen port and the time until each of its
neighbours' held queries answers is recorded, plus any other query that answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import percentile, raise_fd_limit, sample_process
from bench.synthetic import Client, homes, population

HOST = "127.0.0.1"
PATH = "/peering-request"


@dataclass
class Answer:
    status: int
    etag: str | None
    body: bytes
    seconds: float


def request_bytes(body: bytes, headers: dict[str, str]) -> bytes:
    head = [
        f"POST {PATH} HTTP/1.1",
        f"Host: {HOST}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def parse_answer(raw: bytes, seconds: float) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2) if lines and lines[0] else []
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    etag = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "etag":
            etag = value.strip()
    return Answer(status, etag, body, seconds)


async def send(port: int, client: Client, body: bytes, headers: dict[str, str]) -> Answer:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(client.tunnel_ip, 0))
    try:
        writer.write(request_bytes(body, headers))
        raw = await reader.read(-1)
    finally:
        writer.close()
    return parse_answer(raw, time.perf_counter() - started)


# --------------------------------------------------------------------------- load


async def load(args: argparse.Namespace) -> dict[str, Any]:
    clients = population(args.n, args.dist, args.seed)
    bodies = [c.body() for c in clients]
    rng = random.Random(args.seed)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    begun = time.perf_counter()
    measure_from = begun + args.warmup
    until = measure_from + args.duration

    async def worker() -> None:
        while time.perf_counter() < until:
            i = rng.randrange(len(clients))
            try:
                answer = await send(args.port, clients[i], bodies[i], {})
            except OSError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if time.perf_counter() >= measure_from:
                latencies.append(answer.seconds)
                statuses[answer.status] = statuses.get(answer.status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - measure_from
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=0.0) * 1000,
        "statuses": statuses,
        "errors": errors,
        "concurrency": args.concurrency,
        "latencies_ms": [round(v * 1000, 3) for v in latencies],
    }


# --------------------------------------------------------------------------- block


@dataclass
class Waiter:
    client: Client
    etag: str | None = None
    answers: list[tuple[float, int]] = field(default_factory=list)


async def metric(port: int, name: str) -> float:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read(-1)
    finally:
        writer.close()
    for line in raw.decode("latin-1").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return -1.0


async def block(args: argparse.Namespace) -> dict[str, Any]:
    clients = population(args.n, args.dist, args.seed)
    by_home = homes(clients)
    chosen: list[Client] = []
    for members in by_home.values():
        if len(chosen) >= args.waiters:
            break
        chosen += members
    waiters = {c.index: Waiter(c) for c in chosen}
    before = sample_process(args.server_pid)

    # Each waiter's current ETag, from a plain report.
    gate = asyncio.Semaphore(100)

    async def first(w: Waiter) -> None:
        async with gate:
            w.etag = (await send(args.port, w.client, w.client.body(), {})).etag

    await asyncio.gather(*(first(w) for w in waiters.values()))

    async def hold(w: Waiter) -> None:
        while True:
            headers = {"If-None-Match": w.etag or '"none"', "Prefer": "wait=60"}
            try:
                answer = await send(args.port, w.client, w.client.body(), headers)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            w.answers.append((time.perf_counter(), answer.status))
            if answer.etag:
                w.etag = answer.etag

    tasks: list[asyncio.Task[None]] = []
    for start in range(0, len(chosen), 200):
        tasks += [asyncio.create_task(hold(waiters[c.index])) for c in chosen[start : start + 200]]
        # Batches, so the server's accept queue never overflows.
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 60
    while await metric(args.port, "wg_autopeer_waiting_queries") < len(waiters):
        if time.monotonic() > deadline:
            raise RuntimeError("the waiters never all waited")
        await asyncio.sleep(0.2)
    idle_start = sample_process(args.server_pid)
    await asyncio.sleep(args.idle)
    idle_end = sample_process(args.server_pid)

    # Changes: one member per home changes its listen port; its neighbours must hear.
    wakes: list[float] = []
    change_ms: list[float] = []
    after_change: list[float] = []
    spurious = 0
    missed = 0
    for k, members in enumerate(list(by_home.values())[: args.changes]):
        changer, neighbours = members[0], members[1:]
        marks = {i: len(w.answers) for i, w in waiters.items()}
        sent = time.perf_counter()
        change = await send(args.port, changer, changer.body(51821 + k), {})
        change_ms.append(change.seconds * 1000)
        expect = {n.index for n in neighbours}
        limit = time.monotonic() + 3.0
        while time.monotonic() < limit:
            if all(len(waiters[i].answers) > marks[i] for i in expect):
                break
            await asyncio.sleep(0.001)
        for i in expect:
            new = waiters[i].answers[marks[i] :]
            if new:
                wakes.append(new[0][0] - sent)
                after_change.append(new[0][0] - sent - change.seconds)
            else:
                missed += 1
        # Give any wrong wake-up a moment to show before counting.
        await asyncio.sleep(0.2)
        spurious += sum(
            1
            for i, w in waiters.items()
            if i not in expect and i != changer.index and len(w.answers) > marks[i]
        )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    idle = idle_end.at - idle_start.at
    return {
        "waiters": len(waiters),
        "rss_before_kib": before.rss_kib,
        "rss_waiting_kib": idle_end.rss_kib,
        "idle_seconds": idle,
        "idle_cpu_seconds": idle_end.cpu_seconds - idle_start.cpu_seconds,
        "idle_server_switches": idle_end.switches - idle_start.switches,
        "changes": args.changes,
        "wake_ms": [round(w * 1000, 3) for w in wakes],
        "change_request_ms": [round(c, 3) for c in change_ms],
        "change_p50_ms": percentile(change_ms, 50),
        "after_change_p50_ms": percentile(after_change, 50) * 1000,
        "after_change_max_ms": max(after_change, default=0.0) * 1000,
        "wake_p50_ms": percentile(wakes, 50) * 1000,
        "wake_max_ms": max(wakes, default=0.0) * 1000,
        "missed": missed,
        "spurious": spurious,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("load", "block"):
        p = sub.add_parser(mode)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--n", type=int, required=True)
        p.add_argument("--dist", required=True)
        p.add_argument("--seed", type=int, default=6)
        if mode == "load":
            p.add_argument("--duration", type=float, default=10.0)
            p.add_argument("--warmup", type=float, default=1.0)
            p.add_argument("--concurrency", type=int, default=8)
        else:
            p.add_argument("--waiters", type=int, default=5000)
            p.add_argument("--changes", type=int, default=20)
            p.add_argument("--idle", type=float, default=10.0)
            p.add_argument("--server-pid", type=int, required=True)
    args = parser.parse_args(argv)
    raise_fd_limit()
    result = asyncio.run(load(args) if args.mode == "load" else block(args))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
