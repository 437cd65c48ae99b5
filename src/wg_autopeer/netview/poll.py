"""A network view that re-reads the state on a timer: the fallback where no event source exists."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from wg_autopeer.errors import NetViewError
from wg_autopeer.netview.base import NetView, make_change
from wg_autopeer.netview.model import NetChange, NetSnapshot

SnapshotReader = Callable[[], Awaitable[NetSnapshot]]
Sleeper = Callable[[float], Awaitable[None]]


class PollingNetView(NetView):
    """Re-reads the state every ``interval`` seconds through ``read_snapshot``.

    ``read_snapshot`` should raise ``NetViewError``; an ``OSError`` is translated.
    ``sleep`` is injectable so tests need not wait on a real clock.
    """

    def __init__(
        self,
        read_snapshot: SnapshotReader,
        interval: float = 5.0,
        *,
        sleep: Sleeper = asyncio.sleep,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"polling interval must be positive, got {interval}")
        self._read = read_snapshot
        self.interval = interval
        self._sleep = sleep
        self._closed = False

    async def snapshot(self) -> NetSnapshot:
        if self._closed:
            raise NetViewError("network view is closed")
        try:
            return await self._read()
        except OSError as exc:
            raise NetViewError(f"reading the network state failed: {exc}") from exc

    async def changes(self) -> AsyncIterator[NetChange]:
        previous = await self.snapshot()
        while not self._closed:
            await self._sleep(self.interval)
            if self._closed:
                return
            current = await self.snapshot()
            change = make_change(previous, current)
            previous = current
            if change is not None:
                yield change

    async def close(self) -> None:
        self._closed = True
