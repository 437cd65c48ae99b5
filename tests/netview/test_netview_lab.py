"""LinuxNetView against real netlink events in namespaces this test builds.

Topology: a switch namespace ``nvt-sw`` with bridges br1 (192.168.50.0/24) and br2
(192.168.60.0/24); a client namespace ``nvt-c`` whose ``eth0`` is a veth plugged into br1.
The view watches ``nvt-c`` from the test process (``LinuxNetView(netns=...)``).
Latencies are printed (run with ``-s``) and must stay under one second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import ip_address, ip_interface
from pathlib import Path

import pytest

from wg_autopeer.errors import NetViewError
from wg_autopeer.netview import LanUplink, NetChange
from wg_autopeer.netview.linux import DEFAULT_SOCKET_DIR, LinuxNetView

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip)"),
]

SW = "nvt-sw"
CL = "nvt-c"
WG_IF = "nvtwg0"
DEADLINE = 1.0
# Longer than the debounce ceiling (0.5 s) plus a read: an event would have arrived by then.
QUIET_WINDOW = 0.9


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


async def aip(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, f"ip {' '.join(args)}: {err.decode()}"


def delete_namespaces() -> None:
    for ns in (CL, SW):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def lan() -> Iterator[None]:
    delete_namespaces()  # leftovers of an interrupted run of this very file
    try:
        ip("netns", "add", SW)
        ip("netns", "add", CL)
        for ns in (SW, CL):
            ip("-n", ns, "link", "set", "lo", "up")
        for br in ("br1", "br2"):
            ip("-n", SW, "link", "add", br, "type", "bridge")
            ip("-n", SW, "link", "set", br, "up")
        ip("-n", SW, "link", "add", "nvtc0p", "type", "veth", "peer", "name", "eth0", "netns", CL)
        ip("-n", SW, "link", "set", "nvtc0p", "master", "br1", "up")
        ip("-n", CL, "link", "set", "eth0", "up")
        ip("-n", CL, "addr", "add", "192.168.50.10/24", "dev", "eth0")
        ip("-n", CL, "route", "add", "default", "via", "192.168.50.1", "dev", "eth0")
        yield
    finally:
        delete_namespaces()


class Watcher:
    """Collects a view's changes with their arrival time."""

    def __init__(self, view: LinuxNetView) -> None:
        self.view = view
        self.queue: asyncio.Queue[tuple[float, NetChange]] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for change in self.view.changes():
            self.queue.put_nowait((time.monotonic(), change))

    async def _next(self, deadline: float) -> tuple[float, NetChange] | None:
        getter = asyncio.ensure_future(self.queue.get())
        try:
            done, _ = await asyncio.wait(
                {getter, self.task},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            getter.cancel()
        if self.task in done:
            self.task.result()
            pytest.fail("the change stream ended")
        return getter.result() if getter in done else None

    async def expect(
        self, what: str, started: float, match: Callable[[NetChange], bool]
    ) -> NetChange:
        """The first change matching ``match`` within DEADLINE of ``started``; prints latency."""
        seen: list[tuple[str, ...]] = []
        while (item := await self._next(started + DEADLINE)) is not None:
            arrived, change = item
            seen.append(change.reasons)
            if match(change):
                print(f"\nLATENCY {what}: {(arrived - started) * 1000:.0f} ms {change.reasons}")
                return change
        pytest.fail(f"no change for {what} within {DEADLINE}s; saw {seen}")

    async def expect_nothing(self, what: str) -> None:
        item = await self._next(time.monotonic() + QUIET_WINDOW)
        assert item is None, f"{what} produced a change: {item[1].reasons if item else ''}"


@pytest.fixture
async def watcher(lan: None) -> AsyncIterator[Watcher]:
    view = LinuxNetView(netns=CL)
    w = Watcher(view)
    try:
        await asyncio.wait_for(view.listening.wait(), 5)
        yield w
    finally:
        w.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await w.task
        await view.close()


def has(reason: str) -> Callable[[NetChange], bool]:
    return lambda change: reason in change.reasons


async def test_snapshot_reads_the_client_lan(lan: None) -> None:
    view = LinuxNetView(netns=CL)
    try:
        snap = await view.snapshot()
    finally:
        await view.close()
    assert snap.lan_uplinks() == (
        LanUplink("eth0", ip_interface("192.168.50.10/24"), ip_address("192.168.50.1")),
    )
    lo = next(link for link in snap.links if link.name == "lo")
    assert lo.is_loopback
    eth0 = next(link for link in snap.links if link.name == "eth0")
    assert (eth0.kind, eth0.up, eth0.is_wireguard) == ("veth", True, False)


async def test_multipath_default_routes_give_one_route_per_nexthop(lan: None) -> None:
    for family, gw1, gw2 in (("-4", "192.168.50.1", "192.168.50.2"), ("-6", "fd50::1", "fd50::2")):
        if family == "-6":
            ip("-n", CL, "-6", "addr", "add", "fd50::10/64", "dev", "eth0", "nodad")
        ip(
            "-n", CL, family, "route", "replace", "default",
            "nexthop", "via", gw1, "dev", "eth0", "nexthop", "via", gw2, "dev", "eth0",
        )  # fmt: skip
    view = LinuxNetView(netns=CL)
    try:
        snap = await view.snapshot()
    finally:
        await view.close()
    gateways = {(str(r.gateway), r.ifname) for r in snap.default_routes}
    assert gateways == {
        ("192.168.50.1", "eth0"),
        ("192.168.50.2", "eth0"),
        ("fd50::1", "eth0"),
        ("fd50::2", "eth0"),
    }
    assert {r.metric for r in snap.default_routes if r.gateway and r.gateway.version == 6} == {1024}
    assert len(snap.lan_uplinks()) == 4


async def test_address_added_is_reported_within_a_second(watcher: Watcher) -> None:
    started = time.monotonic()
    await aip("-n", CL, "addr", "add", "192.168.50.11/24", "dev", "eth0")
    change = await watcher.expect(
        "address added", started, has("address added on eth0: 192.168.50.11/24")
    )
    assert change.after is not None
    assert len(change.after.lan_uplinks()) == 2


async def test_gateway_change_is_reported_within_a_second(watcher: Watcher) -> None:
    started = time.monotonic()
    await aip("-n", CL, "route", "replace", "default", "via", "192.168.50.254", "dev", "eth0")
    change = await watcher.expect(
        "gateway change", started, has("default route via 192.168.50.254 on eth0 added")
    )
    assert "default route via 192.168.50.1 on eth0 removed" in change.reasons


async def test_link_down_is_reported_within_a_second(watcher: Watcher) -> None:
    started = time.monotonic()
    await aip("-n", CL, "link", "set", "eth0", "down")
    change = await watcher.expect("link down", started, has("link eth0 down"))
    assert change.after.lan_uplinks() == ()


async def test_roaming_to_another_lan_is_reported_within_a_second(watcher: Watcher) -> None:
    # What a laptop does when it moves to another access point: carrier drops, DHCP
    # hands out an address in the new network, and a new default route.
    await aip("-n", CL, "link", "set", "eth0", "down")
    await aip("-n", SW, "link", "set", "nvtc0p", "master", "br2")
    await aip("-n", CL, "link", "set", "eth0", "up")
    await aip("-n", CL, "addr", "flush", "dev", "eth0", "scope", "global")
    await aip("-n", CL, "addr", "add", "192.168.60.10/24", "dev", "eth0")
    started = time.monotonic()
    await aip("-n", CL, "route", "replace", "default", "via", "192.168.60.1", "dev", "eth0")
    new_lan = (LanUplink("eth0", ip_interface("192.168.60.10/24"), ip_address("192.168.60.1")),)
    change = await watcher.expect(
        "roaming (from the last step)", started, lambda c: c.after.lan_uplinks() == new_lan
    )
    assert "LAN uplink gained: eth0 192.168.60.10/24 via 192.168.60.1" in change.reasons


async def test_loopback_addresses_produce_no_change(watcher: Watcher) -> None:
    await aip("-n", CL, "addr", "add", "127.0.0.2/8", "dev", "lo")
    await aip("-n", CL, "addr", "add", "192.0.2.9/32", "dev", "lo")
    await watcher.expect_nothing("addresses on loopback")
    # The stream is alive: the silence above was a decision, not a dead watcher.
    started = time.monotonic()
    await aip("-n", CL, "link", "set", "eth0", "down")
    await watcher.expect("link down after silence", started, has("link eth0 down"))


async def test_close_ends_the_change_stream(lan: None) -> None:
    view = LinuxNetView(netns=CL)
    changes = view.changes()
    pending = asyncio.ensure_future(anext(changes))
    await asyncio.wait_for(view.listening.wait(), 5)
    await view.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, DEADLINE)


@pytest.fixture
def wg_socket() -> Iterator[Path]:
    """The UAPI socket path of this file's WireGuard link, removed afterwards."""
    sock = DEFAULT_SOCKET_DIR / f"{WG_IF}.sock"
    try:
        yield sock
    finally:
        sock.unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go")
async def test_wireguard_link_appears_and_its_addresses_are_ignored(
    watcher: Watcher, wg_socket: Path
) -> None:
    proc: asyncio.subprocess.Process | None = None
    try:
        started = time.monotonic()
        # `ip netns exec` execs wireguard-go, so this PID is the daemon's.
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", CL, "wireguard-go", "-f", WG_IF,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        change = await watcher.expect(
            "WireGuard link appeared", started, has(f"WireGuard link {WG_IF} appeared")
        )
        assert WG_IF in {link.name for link in change.after.wireguard_links()}
        await aip("-n", CL, "addr", "add", "10.99.0.2/24", "dev", WG_IF)
        await aip("-n", CL, "link", "set", WG_IF, "up")
        await watcher.expect_nothing("address and up on a WireGuard link")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await watcher.expect(
            "WireGuard link disappeared", started, has(f"WireGuard link {WG_IF} disappeared")
        )
    finally:
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


async def test_missing_namespace_is_a_netview_error_and_is_not_created() -> None:
    view = LinuxNetView(netns="nvt-missing")
    try:
        with pytest.raises(NetViewError, match="nvt-missing"):
            await view.snapshot()
    finally:
        await view.close()
    # flags=0 in the view: watching a namespace must never create it.
    assert not await asyncio.to_thread(Path("/run/netns/nvt-missing").exists)


async def test_vpn_tun_and_container_bridge_default_routes_are_no_lan(lan: None) -> None:
    # Another VPN (a tun device, OpenVPN-style) with a better default route, and a
    # docker-style bridge with addresses and a route of its own: neither is a LAN.
    ip("-n", CL, "tuntap", "add", "dev", "tun7", "mode", "tun")
    ip("-n", CL, "addr", "add", "10.200.0.2/24", "dev", "tun7")
    ip("-n", CL, "link", "set", "tun7", "up")
    ip("-n", CL, "link", "add", "docker0", "type", "bridge")
    ip("-n", CL, "addr", "add", "172.17.0.1/16", "dev", "docker0")
    ip("-n", CL, "link", "set", "docker0", "up")
    ip("-n", CL, "route", "add", "default", "via", "10.200.0.1", "dev", "tun7", "metric", "5")
    ip("-n", CL, "route", "add", "default", "via", "172.17.0.254", "dev", "docker0", "metric", "7")
    view = LinuxNetView(netns=CL)
    try:
        snap = await view.snapshot()
    finally:
        await view.close()
    links = {link.name: link for link in snap.links}
    # Judged by what netlink says of them (link type, kind, name), not by their carrier.
    assert (links["tun7"].kind, links["tun7"].link_type) == ("tun", 0xFFFE)
    assert not links["tun7"].lan_capable
    assert not links["docker0"].lan_capable
    assert links["eth0"].lan_capable
    assert {r.ifname for r in snap.default_routes} >= {"eth0", "tun7", "docker0"}
    assert [u.ifname for u in snap.lan_uplinks()] == ["eth0"]
