"""Reading the hub off the event loop: shared reads, the worker thread, only what changed."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from server_fakes import ALICE, HUB_IF, Hub, make_key

from wg_autopeer.server.hubread import DeviceReader, UapiReader, _UapiStream
from wg_autopeer.server.identity import HubView
from wg_autopeer.server.readerprocess import ProcessReader
from wg_autopeer.wireguard.base import DeviceState, Endpoint, PeerState
from wg_autopeer.wireguard.fake import FakeWireGuard
from wg_autopeer.wireguard.uapi import parse_device


class CountingWireGuard(FakeWireGuard):
    """A fake device that records the thread of every read and can hold reads back."""

    def __init__(self) -> None:
        super().__init__()
        self.read_threads: list[int] = []
        self.read_started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    async def get_device(self, interface: str, *, with_private_key: bool = False) -> DeviceState:
        self.read_threads.append(threading.get_ident())
        self.read_started.set()
        # Blocks whichever thread reads: proves below that it is never the loop's.
        assert self.release.wait(timeout=10)
        return await super().get_device(interface, with_private_key=with_private_key)


def counting_hub() -> CountingWireGuard:
    wg = CountingWireGuard()
    wg.add_device(
        HUB_IF,
        make_key(1),
        51820,
        (PeerState(make_key(2), (ip_network("10.9.0.2/32"),), latest_handshake=time.time()),),
    )
    return wg


async def poll(predicate: Any, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.002)


async def test_many_concurrent_askers_share_one_device_read() -> None:
    wg = counting_hub()
    view = HubView(wg, HUB_IF)
    try:
        moment = time.monotonic()
        results = await asyncio.gather(*(view.refresh_since(moment) for _ in range(50)))
        assert all(results)
        assert len(wg.read_threads) == 1
        assert view.peek(ip_address("10.9.0.2")) is not None
    finally:
        await view.close()


async def test_askers_arriving_during_a_read_share_the_next_one() -> None:
    wg = counting_hub()
    wg.release.clear()
    view = HubView(wg, HUB_IF, min_read_gap=0.05)
    try:
        first = asyncio.create_task(view.refresh_since(time.monotonic()))
        await poll(wg.read_started.is_set)
        # These came after the running read started: it may predate what they need.
        later = [asyncio.create_task(view.refresh_since(time.monotonic())) for _ in range(20)]
        await asyncio.sleep(0)
        wg.release.set()
        assert await first
        assert all(await asyncio.gather(*later))
        assert len(wg.read_threads) == 2
    finally:
        wg.release.set()
        await view.close()


async def test_reads_start_at_most_once_per_gap_whoever_asks() -> None:
    wg = counting_hub()
    gap = 0.2
    view = HubView(wg, HUB_IF, min_read_gap=gap)
    starts: list[float] = []
    try:
        for _ in range(3):
            # Each asks for a read newer than the one before: each gets one, spaced out.
            assert await view.refresh_since(time.monotonic())
            assert view.attempted_at is not None
            starts.append(view.attempted_at)
        assert len(wg.read_threads) == 3
        assert all(b - a >= gap for a, b in itertools.pairwise(starts))
    finally:
        await view.close()


async def test_the_device_is_never_read_on_the_event_loop(hub: Hub) -> None:
    wg = counting_hub()
    wg.devices[HUB_IF] = hub.wg.devices[HUB_IF]
    hub.wg = wg
    app: FastAPI = hub.app()
    loop_thread = threading.get_ident()
    # An unknown source, a background round, and a report whose handshake looks stale:
    # each makes the server read the device.
    async with hub.client(app, "10.99.0.200") as http:
        assert (await http.post("/peering-request", content=b"[]")).status_code == 403
    await hub.core(app).tick()
    hub.wg.update_peer(HUB_IF, ALICE.key, latest_handshake=hub.clock.now - 1000)
    await hub.core(app).tick()
    hub.wg.update_peer(HUB_IF, ALICE.key, latest_handshake=hub.clock.now)
    assert (await hub.post(app, ALICE)).status_code == 200
    assert len(wg.read_threads) >= 3
    assert loop_thread not in wg.read_threads
    await hub.core(app).hub.close()


# -- the UAPI reader -------------------------------------------------------------------------


def peer_lines(n: int, *, port: int = 51820, counters: int = 0, handshake: int = 1000) -> list[str]:
    key = base64.b64decode(make_key(n)).hex()
    return [
        f"public_key={key}",
        f"endpoint=192.0.2.{n}:{port}",
        f"last_handshake_time_sec={handshake}",
        "last_handshake_time_nsec=0",
        f"tx_bytes={counters}",
        f"rx_bytes={counters * 2}",
        "persistent_keepalive_interval=25",
        f"allowed_ip=10.9.0.{n}/32",
        "protocol_version=1",
    ]


def answer(*peers: list[str]) -> bytes:
    lines = ["private_key=" + "11" * 32, "listen_port=51820"]
    for peer in peers:
        lines += peer
    return ("\n".join(lines) + "\nerrno=0\n\n").encode()


def test_a_get_answer_split_anywhere_gives_the_same_records() -> None:
    text = answer(peer_lines(2), peer_lines(3), peer_lines(4))
    whole = _UapiStream({})
    whole.feed(text)
    assert whole.errno == 0
    assert len(whole.records) == 3
    for cut in range(1, len(text)):
        for step in (cut, 7):
            stream = _UapiStream({})
            pieces = [text[:cut]] + [text[i : i + step] for i in range(cut, len(text), step)]
            for piece in pieces:
                stream.feed(piece)
            assert stream.records == whole.records, (cut, step)
            assert stream.errno == 0


class UapiDevice:
    """A userspace device's UAPI socket answering ``get=1`` with ``self.answer``."""

    def __init__(self, socket_dir: Path) -> None:
        self.answer = answer()
        self.path = socket_dir / f"{HUB_IF}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = b""
                while not request.endswith(b"\n\n"):
                    data = conn.recv(4096)
                    if not data:
                        break
                    request += data
                if request == b"get=1\n\n":
                    conn.sendall(self.answer)
                    # Like wireguard-go: the connection stays open for another request.
                    conn.recv(1)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def uapi_device(tmp_path: Path) -> Iterator[UapiDevice]:
    device = UapiDevice(tmp_path)
    try:
        yield device
    finally:
        device.close()


def uapi_reader(device: UapiDevice, *, here: bool = False) -> UapiReader:
    return UapiReader(HUB_IF, device.path.parent, link_exists=lambda name: here)


@pytest.fixture(params=["thread", "process"])
def make_reader(request: pytest.FixtureRequest) -> Iterator[Callable[..., DeviceReader]]:
    """A UAPI reader as the server's worker thread uses it, or as the server command runs
    it: in a child process (``ProcessReader``), which must give the same answers."""
    made: list[DeviceReader] = []

    def make(device: UapiDevice, *, link_here: bool = True) -> DeviceReader:
        def inner() -> DeviceReader:
            return uapi_reader(device, here=link_here)

        reader = inner() if request.param == "thread" else ProcessReader(HUB_IF, inner)
        made.append(reader)
        return reader

    yield make
    for reader in made:
        reader.close()


def test_uapi_reader_parses_only_peers_that_changed(
    uapi_device: UapiDevice, make_reader: Callable[..., DeviceReader]
) -> None:
    reader = make_reader(uapi_device)
    uapi_device.answer = answer(*(peer_lines(n) for n in range(2, 40)))
    first = reader.read()
    assert first.full
    expected = parse_device(HUB_IF, uapi_device.answer.decode().split("\n")[:-3]).peers
    assert {p.public_key: (p.endpoint, p.allowed_ips, p.latest_handshake) for p in expected} == {
        k: (p.endpoint, p.allowed_ips, p.latest_handshake) for k, p in first.changed.items()
    }

    # Traffic alone (counters) is no change.
    uapi_device.answer = answer(*(peer_lines(n, counters=99) for n in range(2, 40)))
    quiet = reader.read()
    assert (quiet.changed, quiet.removed, quiet.full) == ({}, frozenset(), False)

    # One endpoint moves, one handshake is new, one peer leaves.
    peers = [peer_lines(n) for n in range(2, 39)]
    peers[3] = peer_lines(5, port=4000)
    peers[6] = peer_lines(8, handshake=2000)
    uapi_device.answer = answer(*peers)
    delta = reader.read()
    assert set(delta.changed) == {make_key(5), make_key(8)}
    assert delta.changed[make_key(5)].endpoint == Endpoint(ip_address("192.0.2.5"), 4000)
    assert delta.changed[make_key(8)].latest_handshake == 2000
    assert delta.removed == {make_key(39)}
    assert delta.peers == 37


def test_uapi_reader_reads_in_full_when_asked(
    uapi_device: UapiDevice, make_reader: Callable[..., DeviceReader]
) -> None:
    reader = make_reader(uapi_device)
    uapi_device.answer = answer(peer_lines(2), peer_lines(3))
    reader.read()
    again = reader.read(full=True)
    assert again.full
    assert set(again.changed) == {make_key(2), make_key(3)}


def test_uapi_reader_refuses_a_socket_whose_link_is_not_here(
    uapi_device: UapiDevice, make_reader: Callable[..., DeviceReader]
) -> None:
    from wg_autopeer.errors import NoSuchInterface

    reader = make_reader(uapi_device, link_here=False)
    with pytest.raises(NoSuchInterface) as raised:
        reader.read()
    assert raised.value.interface == HUB_IF


def test_uapi_reader_reports_a_device_error(
    uapi_device: UapiDevice, make_reader: Callable[..., DeviceReader]
) -> None:
    from wg_autopeer.errors import DeviceRefused

    uapi_device.answer = b"errno=-22\n\n"
    reader = make_reader(uapi_device)
    with pytest.raises(DeviceRefused):
        reader.read()
    # The error leaves the reader usable.
    uapi_device.answer = answer(peer_lines(2))
    assert set(reader.read().changed) == {make_key(2)}


def test_a_dead_reader_process_leaves_reads_to_the_server(uapi_device: UapiDevice) -> None:
    uapi_device.answer = answer(*(peer_lines(n) for n in range(2, 250)))
    reader = ProcessReader(HUB_IF, lambda: uapi_reader(uapi_device, here=True))
    try:
        assert reader.pid is not None
        assert reader.pid != os.getpid()
        first = reader.read()
        assert first.full
        assert len(first.changed) == 248
        assert first.peers == 248
        os.kill(reader.pid, signal.SIGKILL)
        # The next read is the server's own, and in full: its view may be out of step.
        again = reader.read()
        assert again.full
        assert set(again.changed) == set(first.changed)
        assert reader.pid is None
        assert reader.read().changed == {}
    finally:
        reader.close()


# A server that forks its reader child, reports the child's PID, then waits to be killed.
_SERVER_WITH_A_READER = """
import sys, time
from wg_autopeer.server.hubread import DeviceReader, HubDelta
from wg_autopeer.server.readerprocess import ProcessReader

class Empty(DeviceReader):
    def read(self, *, full=False):
        return HubDelta({}, frozenset(), full=full, peers=0)

reader = ProcessReader("hub0", Empty)
print(reader.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_the_reader_process_ends_when_the_server_is_killed() -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER_WITH_A_READER], stdout=subprocess.PIPE, text=True
    )
    child = 0
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        assert _running(child)
        server.kill()  # SIGKILL: no clean-up of its own runs
        server.wait(10)
        deadline = time.monotonic() + 10
        while _running(child):
            assert time.monotonic() < deadline, "the reader child outlived its server"
            time.sleep(0.05)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        if child and _running(child):
            os.kill(child, signal.SIGKILL)


def test_index_follows_an_allowed_ip_moving_between_peers_in_one_read() -> None:
    from wg_autopeer.server.hubread import HubDelta
    from wg_autopeer.server.identity import HubSnapshot

    a, b = make_key(2), make_key(3)
    snapshot = HubSnapshot()
    snapshot.apply(
        HubDelta(
            {
                a: PeerState(a, (ip_network("10.9.0.2/32"), ip_network("10.50.0.0/16"))),
                b: PeerState(b, (ip_network("10.9.0.3/32"),)),
            },
            full=True,
        )
    )
    # b takes over a's site network; a leaves; b's own address stays.
    snapshot.apply(
        HubDelta(
            {b: PeerState(b, (ip_network("10.9.0.3/32"), ip_network("10.50.0.0/16")))},
            frozenset({a}),
        )
    )
    assert snapshot.lookup(ip_address("10.50.1.1")).public_key == b  # type: ignore[union-attr]
    assert snapshot.lookup(ip_address("10.9.0.2")) is None
    assert set(snapshot.peers) == {b}
    # A full read replaces everything.
    snapshot.apply(HubDelta({a: PeerState(a, (ip_network("10.9.0.2/32"),))}, full=True))
    assert set(snapshot.peers) == {a}
    assert snapshot.lookup(ip_address("10.50.1.1")) is None


async def test_a_read_changing_many_peers_reaches_the_index_in_full() -> None:
    wg = FakeWireGuard()
    peers = tuple(
        PeerState(make_key(n), (ip_network(f"10.9.{n // 250}.{n % 250 + 1}/32"),))
        for n in range(2, 202)
    ) + tuple(
        PeerState(
            base64.b64encode(n.to_bytes(32, "big")).decode(),
            (ip_network(f"10.8.{n // 250}.{n % 250 + 1}/32"),),
        )
        for n in range(1000, 1500)
    )
    wg.add_device(HUB_IF, make_key(1), 51820, peers)
    view = HubView(wg, HUB_IF, min_read_gap=0.0)
    try:
        assert await view.refresh_since(time.monotonic())
        moved = Endpoint(ip_address("198.51.100.1"), 9)
        wg.devices[HUB_IF] = DeviceState(
            HUB_IF,
            make_key(1),
            51820,
            tuple(PeerState(p.public_key, p.allowed_ips, moved) for p in peers),
        )
        assert await view.refresh_since(time.monotonic())
        assert len(view.snapshot.peers) == len(peers)
        assert all(p.endpoint == moved for p in view.snapshot.peers.values())
    finally:
        await view.close()
