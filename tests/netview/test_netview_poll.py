"""PollingNetView over a scripted snapshot source: no root, no real clock."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address

import pytest

from wg_autopeer.errors import NetViewError
from wg_autopeer.netview import DefaultRoute, Link, NetSnapshot, PollingNetView, open_netview

ETH = Link(2, "eth0", up=True)
UP = NetSnapshot(links=(ETH,), default_routes=(DefaultRoute(2, "eth0", ip_address("192.0.2.1")),))
DOWN = replace(UP, links=(replace(ETH, up=False),))


class Script:
    """Returns the scripted snapshots in turn, then repeats the last one."""

    def __init__(self, *snaps: NetSnapshot) -> None:
        self._snaps: Iterator[NetSnapshot] = iter(snaps)
        self._last = snaps[0]
        self.reads = 0

    async def __call__(self) -> NetSnapshot:
        self.reads += 1
        self._last = next(self._snaps, self._last)
        return self._last


async def no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


async def test_polling_yields_only_relevant_differences() -> None:
    script = Script(UP, UP, DOWN, DOWN, UP)
    view = PollingNetView(script, interval=1.0, sleep=no_sleep)
    changes = view.changes()
    first = await anext(changes)
    assert first.reasons == ("link eth0 down",)
    assert first.before == UP
    assert first.after == DOWN
    second = await anext(changes)
    assert second.reasons == ("link eth0 up",)
    # Unchanged reads in between produced nothing.
    assert script.reads == 5
    await view.close()
    with pytest.raises(StopAsyncIteration):
        await anext(changes)


async def test_polling_translates_os_errors() -> None:
    async def broken() -> NetSnapshot:
        raise PermissionError("no access")

    view = PollingNetView(broken, interval=1.0, sleep=no_sleep)
    with pytest.raises(NetViewError, match="no access"):
        await view.snapshot()


def test_polling_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        PollingNetView(Script(UP), interval=0)


def test_open_netview_refuses_unsupported_platforms_clearly() -> None:
    with pytest.raises(NetViewError, match="only Linux"):
        open_netview(platform="darwin")


def test_open_netview_picks_linux_backend_on_linux() -> None:
    from wg_autopeer.netview.linux import LinuxNetView

    assert isinstance(open_netview(platform="linux"), LinuxNetView)
