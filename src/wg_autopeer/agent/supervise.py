"""Nothing dies silently: every background task of the agent runs under supervision.

A task that raises is logged with its traceback, shown as ``degraded`` (with
the reason) in ``status`` and the tray, and restarted after a capped
exponential back-off. One that keeps failing (``give_up_after`` failures in a
row, none of its runs lasting ``healthy_after`` seconds) stops the agent with
a non-zero exit, so that systemd (``Restart=on-failure``) starts it afresh: a
process restart clears what a task restart cannot. A run that lasts
``healthy_after`` seconds clears the task's degraded mark and its count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from wg_autopeer.agent.backoff import Backoff

log = logging.getLogger(__name__)

GIVE_UP_AFTER = 5
HEALTHY_AFTER = 60.0


class Supervisor:
    """Runs named coroutines, restarting them when they fail; see the module docstring."""

    def __init__(
        self,
        on_give_up: Callable[[str], None],
        *,
        monotonic: Callable[[], float],
        base: float = 1.0,
        cap: float = 30.0,
        give_up_after: int = GIVE_UP_AFTER,
        healthy_after: float = HEALTHY_AFTER,
    ) -> None:
        self._on_give_up = on_give_up
        self._monotonic = monotonic
        self._base, self._cap = base, cap
        self._give_up_after = give_up_after
        self._healthy_after = healthy_after
        # Task name -> why it is degraded (its last failure), while it is.
        self.degraded: dict[str, str] = {}
        # Set whenever a task fails: lets a watcher (a test, the tray's next look) react
        # without polling.
        self.failed = asyncio.Event()

    async def run(self, name: str, task: Callable[[], Awaitable[None]]) -> None:
        """Run ``task()`` until it returns; restart it whenever it raises."""
        backoff = Backoff(base=self._base, cap=self._cap)
        failures = 0
        while True:
            started = self._monotonic()
            try:
                await task()
                self.degraded.pop(name, None)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._monotonic() - started >= self._healthy_after:
                    failures = 0
                    backoff.reset()
                failures += 1
                reason = f"{type(exc).__name__}: {exc}"
                self.degraded[name] = reason
                self.failed.set()
                if failures >= self._give_up_after:
                    log.critical(
                        "%s failed %d times in a row (%s); stopping the agent so that it is "
                        "started afresh",
                        name,
                        failures,
                        reason,
                        exc_info=exc,
                    )
                    self._on_give_up(name)
                    return
                delay = backoff.next_delay()
                log.error(
                    "%s failed (%s); restarting it in %.1f s", name, reason, delay, exc_info=exc
                )
            await asyncio.sleep(delay)
