"""Linux network view over rtnetlink (pyroute2's asyncio API).

Netlink events are only wake-ups: after a burst of them settles, the full state
is re-read and compared with the previous snapshot (see ``diff_snapshots``). A
UAPI socket appearing in or leaving the socket dir (wireguard-go starting or
stopping) is a wake-up too, through inotify; nothing is re-read on a timer unless
the socket dir cannot be watched.
Runs in the network namespace of the process, or in a named one (``netns=``),
which is how the lab tests watch a client namespace from the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from ipaddress import ip_address, ip_interface
from pathlib import Path
from typing import Any, TypeVar

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags
from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)

from wg_autopeer.errors import NetViewError
from wg_autopeer.netview.base import NetView, make_change
from wg_autopeer.netview.model import (
    ARPHRD_ETHER,
    Address,
    DefaultRoute,
    Link,
    Neighbour,
    NetChange,
    NetSnapshot,
)
from wg_autopeer.wireguard.base import IPAddress

log = logging.getLogger(__name__)

DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")

_GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE
_GROUPS |= RTMGRP_IPV6_ROUTE

_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_ARPHRD_LOOPBACK = 772
_RT_TABLE_MAIN = 254
# Address flags (linux/if_addr.h): IPv6 privacy addresses that rotate, ones on their
# way out, and ones still under duplicate address detection.
_IFA_F_TEMPORARY = 0x01
_IFA_F_DEPRECATED = 0x20
_IFA_F_TENTATIVE = 0x40
# Neighbour states without a usable link-layer address (linux/neighbour.h).
_NUD_INCOMPLETE = 0x01
_NUD_FAILED = 0x20
_RTN_UNICAST = 1
# Drivers without carrier reporting (tun, loopback) say "UNKNOWN" while working.
_OPER_UP = frozenset({"UP", "UNKNOWN"})
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host"}

_TUN_RECHECK = 0.5
# A socket made, removed or renamed in the socket dir; the dir itself going away.
_SOCKET_DIR_EVENTS = (
    inotify_flags.CREATE
    | inotify_flags.DELETE
    | inotify_flags.MOVED_TO
    | inotify_flags.MOVED_FROM
    | inotify_flags.DELETE_SELF
)

_T = TypeVar("_T")


class LinuxNetView(NetView):
    """Links, addresses and default routes read and watched through rtnetlink.

    ``netns`` names a namespace under /run/netns to watch instead of the process's own.
    ``socket_dir`` is where wireguard-go puts UAPI sockets: a ``tun`` link with a socket
    there is a WireGuard link. ``quiet``/``max_delay`` bound the debounce of event bursts;
    ``resync`` re-reads even without events (UAPI sockets appear without netlink events,
    and a netlink buffer overflow loses them).
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        socket_dir: Path | str = DEFAULT_SOCKET_DIR,
        quiet: float = 0.15,
        max_delay: float = 0.5,
        resync: float | None = 10.0,
    ) -> None:
        self.netns = netns
        self.socket_dir = Path(socket_dir)
        self.quiet = quiet
        self.max_delay = max_delay
        self.resync = resync
        self.listening = asyncio.Event()
        """Set once ``changes()`` is subscribed and has read its baseline (tests wait on it)."""
        self._ipr: AsyncIPRoute | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._streams: set[_EventStream] = set()

    def _where(self) -> str:
        return f"netns {self.netns}" if self.netns else "this namespace"

    def _open(self, groups: int = 0) -> AsyncIPRoute:
        kwargs: dict[str, Any] = {"groups": groups}
        if self.netns is not None:
            # flags=0: never create the namespace as a side effect of watching it.
            kwargs.update(netns=self.netns, flags=0)
        try:
            return AsyncIPRoute(**kwargs)
        except (OSError, NetlinkError) as exc:
            raise NetViewError(f"cannot open rtnetlink in {self._where()}: {exc}") from exc

    async def _call(self, what: str, fn: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await fn()
        except (OSError, NetlinkError) as exc:
            raise NetViewError(f"{what} in {self._where()} failed: {exc}") from exc

    async def snapshot(self) -> NetSnapshot:
        if self._closed:
            raise NetViewError("network view is closed")
        async with self._lock:
            if self._ipr is None:
                self._ipr = self._open()
            ipr = self._ipr
            try:
                links = await self._call("reading links", lambda: _collect(ipr.get_links()))
                addrs = await self._call("reading addresses", lambda: _collect(ipr.get_addr()))
                routes = await self._call(
                    "reading routes", lambda: _collect(ipr.get_routes(table=_RT_TABLE_MAIN))
                )
                neighbours = await self._call(
                    "reading neighbours", lambda: _collect(ipr.get_neighbours())
                )
            except NetViewError:
                # A broken socket stays broken; the next read starts afresh.
                self._ipr = None
                ipr.close()
                raise
        return self._build(links, addrs, routes, neighbours)

    def _build(
        self, links: list[Any], addrs: list[Any], routes: list[Any], neighbours: Sequence[Any] = ()
    ) -> NetSnapshot:
        parsed = tuple(sorted(self._parse_link(m) for m in links))
        names = {link.index: link.name for link in parsed}
        parsed_addrs = (_parse_addr(m, names) for m in addrs)
        addresses = tuple(
            sorted(
                (a for a in parsed_addrs if a is not None),
                key=lambda a: (a.ifindex, a.interface.version, a.interface),
            )
        )
        defaults: set[DefaultRoute] = set()
        for msg in routes:
            defaults.update(_parse_default_routes(msg, names))
        ordered = sorted(defaults, key=lambda r: (r.ifindex, str(r.gateway), r.metric))
        gateways = {(r.ifindex, r.gateway) for r in ordered if r.gateway is not None}
        found = (_parse_neighbour(m) for m in neighbours)
        macs = tuple(sorted(n for n in found if n and (n.ifindex, n.address) in gateways))
        return NetSnapshot(
            links=parsed, addresses=addresses, default_routes=tuple(ordered), neighbours=macs
        )

    def _parse_link(self, msg: Any) -> Link:
        name = str(msg.get("IFLA_IFNAME"))
        flags = int(msg.get("flags") or 0)
        kind = msg.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
        oper = msg.get("IFLA_OPERSTATE") or "UNKNOWN"
        is_wireguard = kind == "wireguard" or (
            kind in (None, "tun") and (self.socket_dir / f"{name}.sock").exists()
        )
        return Link(
            index=int(msg.get("index")),
            name=name,
            up=bool(flags & _IFF_UP) and oper in _OPER_UP,
            kind=str(kind) if kind is not None else None,
            is_wireguard=is_wireguard,
            is_loopback=bool(flags & _IFF_LOOPBACK) or msg.get("ifi_type") == _ARPHRD_LOOPBACK,
            link_type=int(msg.get("ifi_type") or ARPHRD_ETHER),
        )

    async def changes(self) -> AsyncIterator[NetChange]:
        if self._closed:
            raise NetViewError("network view is closed")
        stream = _EventStream(self._open, self._where())
        self._streams.add(stream)
        try:
            # Subscribe before the baseline read, so nothing falls between the two.
            await stream.start()
            stream.watching_sockets(self.socket_dir)
            previous = await self.snapshot()
            self.listening.set()
            recheck = False
            while True:
                watching = stream.watching_sockets(self.socket_dir)
                timeout = None if watching else self.resync
                if recheck and not watching:
                    # wireguard-go makes its tun link a moment before its UAPI socket, and
                    # the socket appearing sends no netlink event: look again soon.
                    timeout = min(timeout or _TUN_RECHECK, _TUN_RECHECK)
                if not await stream.wait(timeout):
                    return
                if not await stream.settle(self.quiet, self.max_delay):
                    return
                current = await self.snapshot()
                change = make_change(previous, current)
                recheck = _new_plain_tun(previous, current)
                previous = current
                if change is not None:
                    log.debug("network change: %s", "; ".join(change.reasons))
                    yield change
        finally:
            self.listening.clear()
            self._streams.discard(stream)
            await stream.stop()

    async def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            await stream.stop()
        self._streams.clear()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


def _new_plain_tun(before: NetSnapshot, after: NetSnapshot) -> bool:
    known = {link.name for link in before.links}
    return any(
        link.kind == "tun" and not link.is_wireguard and link.name not in known
        for link in after.links
    )


class _EventStream:
    """A subscribed rtnetlink socket whose messages only set a wake-up flag."""

    def __init__(self, opener: Callable[[int], AsyncIPRoute], where: str) -> None:
        self._opener = opener
        self._where = where
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: NetViewError | None = None
        self._stopped = False
        self._inotify: INotify | None = None

    def watching_sockets(self, directory: Path) -> bool:
        """Wake up when a UAPI socket appears in or leaves ``directory`` (inotify).

        True while it is watched. The dir is made by the first wireguard-go to start,
        so a missing one is tried again at each call (the caller re-reads on a timer
        meanwhile); so is one whose watch ended (the dir was removed).
        """
        if self._inotify is not None:
            return True
        if self._stopped:
            return False
        try:
            watch = INotify(nonblocking=True)
        except OSError as exc:
            log.debug("no inotify (%s): UAPI sockets are looked for on a timer", exc)
            return False
        try:
            watch.add_watch(str(directory), _SOCKET_DIR_EVENTS)
        except OSError:
            # Not there yet (no wireguard-go has started) or no watch left.
            watch.close()
            return False
        asyncio.get_running_loop().add_reader(watch.fileno(), self._on_socket_dir)
        self._inotify = watch
        return True

    def _on_socket_dir(self) -> None:
        watch = self._inotify
        if watch is None:
            return
        try:
            events = watch.read(timeout=0)
        except OSError:
            events = []
        if any(e.mask & inotify_flags.IGNORED for e in events):
            # The dir itself went: watch it again once it is back.
            self._unwatch_sockets()
            self._wake.set()
        elif any(e.name.endswith(".sock") for e in events):
            self._wake.set()

    def _unwatch_sockets(self) -> None:
        watch, self._inotify = self._inotify, None
        if watch is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(watch.fileno())
            watch.close()

    async def start(self) -> None:
        ipr = self._opener(_GROUPS)
        try:
            await ipr.bind(groups=_GROUPS)
        except (OSError, NetlinkError) as exc:
            ipr.close()
            raise NetViewError(f"cannot subscribe to rtnetlink in {self._where}: {exc}") from exc
        self._task = asyncio.create_task(self._pump(ipr), name="netview-events")

    async def _pump(self, ipr: AsyncIPRoute) -> None:
        try:
            while True:
                try:
                    async for _msg in ipr.get():
                        self._wake.set()
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # Events were lost: resubscribe and re-read, the snapshot tells the rest.
                    log.warning("rtnetlink overflow in %s; resubscribing", self._where)
                    ipr.close()
                    ipr = self._opener(_GROUPS)
                    await ipr.bind(groups=_GROUPS)
                    self._wake.set()
        except (OSError, NetlinkError) as exc:
            self._error = NetViewError(f"rtnetlink events in {self._where} failed: {exc}")
            self._error.__cause__ = exc
            self._wake.set()
        except NetViewError as exc:
            self._error = exc
            self._wake.set()
        finally:
            ipr.close()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def wait(self, resync: float | None) -> bool:
        """Until an event arrives, or ``resync`` seconds pass; False once stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), resync)
        self._check()
        return not self._stopped

    async def settle(self, quiet: float, max_delay: float) -> bool:
        """Let a burst finish: return after ``quiet`` without events, or ``max_delay`` total.

        False once stopped.
        """
        deadline = time.monotonic() + max_delay
        while not self._stopped:
            self._wake.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), min(quiet, left))
            except TimeoutError:
                break
            self._check()
        # Anything arriving from here on is newer than the snapshot about to be read.
        self._wake.clear()
        return not self._stopped

    async def stop(self) -> None:
        self._stopped = True
        self._unwatch_sockets()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _collect(dump: Awaitable[AsyncIterator[Any]]) -> list[Any]:
    return [msg async for msg in await dump]


def _parse_addr(msg: Any, names: dict[int, str]) -> Address | None:
    if msg.get("family") not in (socket.AF_INET, socket.AF_INET6):
        return None
    # For point-to-point IPv4, IFA_ADDRESS is the peer; IFA_LOCAL is ours.
    raw = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
    if raw is None:
        return None
    index = int(msg.get("index"))
    scope = int(msg.get("scope") or 0)
    # IFA_FLAGS holds all 32 bits; the header's flags field only the low 8.
    flags = int(msg.get("IFA_FLAGS") or msg.get("flags") or 0)
    if msg.get("family") == socket.AF_INET:
        # For IPv4 that bit means "secondary" (same value): a normal, lasting address.
        flags &= ~_IFA_F_TEMPORARY
    return Address(
        ifindex=index,
        ifname=names.get(index) or str(msg.get("IFA_LABEL") or f"if{index}"),
        interface=ip_interface(f"{raw}/{int(msg.get('prefixlen'))}"),
        scope=_SCOPES.get(scope, str(scope)),
        fleeting=bool(flags & (_IFA_F_TEMPORARY | _IFA_F_DEPRECATED | _IFA_F_TENTATIVE)),
    )


def _parse_neighbour(msg: Any) -> Neighbour | None:
    """A neighbour entry with a usable link-layer address, or None (incomplete, failed)."""
    dst, lladdr = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
    if not dst or not lladdr or int(msg.get("state") or 0) & (_NUD_FAILED | _NUD_INCOMPLETE):
        return None
    try:
        address = ip_address(dst)
    except ValueError:
        return None
    return Neighbour(int(msg.get("ifindex")), address, str(lladdr).lower())


def _parse_default_routes(msg: Any, names: dict[int, str]) -> list[DefaultRoute]:
    if msg.get("family") not in (socket.AF_INET, socket.AF_INET6):
        return []
    if msg.get("dst_len") != 0 or msg.get("type") != _RTN_UNICAST:
        return []
    table = msg.get("RTA_TABLE") or msg.get("table")
    if table != _RT_TABLE_MAIN:
        return []
    metric = int(msg.get("RTA_PRIORITY") or 0)
    hops: list[tuple[Any, Any]] = []
    multipath = msg.get("RTA_MULTIPATH")
    if multipath:
        hops = [(nh.get("oif"), nh.get("RTA_GATEWAY")) for nh in multipath]
    else:
        hops = [(msg.get("RTA_OIF"), msg.get("RTA_GATEWAY"))]
    out: list[DefaultRoute] = []
    for oif, gateway in hops:
        if oif is None:
            continue
        index = int(oif)
        gw: IPAddress | None = ip_address(gateway) if gateway else None
        out.append(DefaultRoute(index, names.get(index, f"if{index}"), gw, metric))
    return out
