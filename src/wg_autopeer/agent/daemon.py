"""The agent's I/O shell: watch the network, report to the hub, apply what is safe.

One ``InterfaceWorker`` (worker.py) per WireGuard interface runs the report
loop and watches its direct paths; the ``Agent`` here owns the workers, the
network watcher, the local control commands and shutdown.
Decisions are made by the pure core (``safety.filter_offers``,
``reconcile.plan``, ``health.judge``); this module only gathers their inputs
and carries out their outputs.

Every failure path leaves the hub peer alone: a server that cannot be reached
keeps the direct peers that still handshake, an answer that cannot be trusted
changes nothing, and losing the default gateway drops every direct peer without
asking anyone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

from wg_autopeer import sdnotify
from wg_autopeer.agent.config import AgentConfig
from wg_autopeer.agent.ledger import CachedLedgerStore
from wg_autopeer.agent.localapi import STATUS_VERSION
from wg_autopeer.agent.localserver import as_jsonable
from wg_autopeer.agent.supervise import Supervisor
from wg_autopeer.agent.worker import InterfaceStatus, InterfaceWorker
from wg_autopeer.clock import SYSTEM_CLOCK, Clock, jump_between, next_on_grid, sleep_until
from wg_autopeer.errors import (
    NoSuchInterface,
    WireGuardError,
)
from wg_autopeer.netview.base import NetView
from wg_autopeer.netview.model import NetSnapshot
from wg_autopeer.wireguard.base import WireGuardControl

log = logging.getLogger(__name__)

# How often the clocks are compared for a resume or a jump.
CLOCK_CHECK = 5.0


class Agent:
    """Owns the workers, the network watcher and shutdown."""

    def __init__(
        self,
        config: AgentConfig,
        control: WireGuardControl,
        netview: NetView,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self.control = control
        self.netview = netview
        self.ledger_store = CachedLedgerStore(Path(config.state_dir) / "ledger.json")
        self.snapshot = NetSnapshot()
        self.workers: dict[str, InterfaceWorker] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.apply_lock = asyncio.Lock()
        self.enabled = True
        self.stopping = asyncio.Event()
        # Set once every worker has finished its first report (systemd's READY=1).
        self.first_sync_done = asyncio.Event()
        self.writes = 0
        self.started_at = time.time()
        # Non-zero when the agent stops because a background task kept failing.
        self.exit_code = 0
        self.supervisor = Supervisor(self._give_up, monotonic=clock.monotonic)
        self._clock_reading = clock.read()

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until a stop is asked for, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.resync("SIGHUP"))
        self.snapshot = await self.netview.snapshot()
        await self.recover()
        await self.sync_workers()
        background = [
            asyncio.create_task(
                self.supervisor.run("network watch", self._watch_network), name="netview"
            ),
            asyncio.create_task(self._mark_first_sync(), name="ready"),
            asyncio.create_task(self._keep_watchdog_fed(), name="watchdog"),
            asyncio.create_task(self.supervisor.run("clock watch", self._watch_clock)),
        ]
        try:
            await self.stopping.wait()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _mark_first_sync(self) -> None:
        """Set ``first_sync_done`` once the workers started at start-up have each reported."""
        await asyncio.gather(*(w.first_cycle_done.wait() for w in list(self.workers.values())))
        self.first_sync_done.set()

    def stop(self) -> None:
        log.info("stopping")
        self.stopping.set()

    def _give_up(self, task: str) -> None:
        self.exit_code = 1
        self.stop()

    async def _watch_clock(self) -> None:
        # On the grid the path watches use: with a path active it costs no wake-up.
        loop = asyncio.get_running_loop()
        while True:
            await sleep_until(next_on_grid(loop.time(), CLOCK_CHECK))
            self.notice_clock_jump()

    def notice_clock_jump(self) -> str | None:
        """After a resume or a clock jump, handshake ages and the time since a peer was
        added mean nothing: re-sync at once and give every direct path a fresh start
        (its routes back on the hub until it proves itself again) instead of failing
        them all as stale. Returns why, when it happened."""
        reading = self.clock.read()
        why = jump_between(self._clock_reading, reading)
        self._clock_reading = reading
        if why is not None:
            log.warning("%s: direct paths start afresh, re-syncing", why)
            for worker in self.workers.values():
                worker.restart_paths()
            self.resync(why)
        return why

    async def _keep_watchdog_fed(self) -> None:
        """Tell systemd the loop is alive (WATCHDOG=1) at half its WatchdogSec; a loop
        stuck for longer gets the agent restarted. No-op outside systemd."""
        period = sdnotify.watchdog_period()
        if period is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(period / 2)

    def resync(self, why: str) -> None:
        """Report again now, every interface, asking for a fresh answer (no held query)."""
        log.info("re-sync: %s", why)
        for worker in self.workers.values():
            worker.forget_etag()
            worker.wake.set()

    async def set_enabled(self, enabled: bool) -> None:
        if enabled == self.enabled:
            return
        self.enabled = enabled
        log.info("direct peering %s", "enabled" if enabled else "paused")
        if not enabled:
            await self._leave_all()
        self.resync("enabled" if enabled else "paused")

    async def recover(self) -> None:
        """Remove what a previous run left behind (crash, kill -9) before starting."""
        stale = self.ledger_store.remove_stale_temp_files()
        if stale:
            log.info("removed %d half-written ledger file(s) of a previous run", stale)
        ledger = self.ledger_store.load()
        for interface in list(ledger.interfaces):
            worker = InterfaceWorker(self, interface)
            try:
                await worker.withdraw("left over from a previous run")
            except NoSuchInterface:
                # The device is gone, and its peers with it.
                self.ledger_store.update_interface(interface, type(ledger.interface(interface))())
            except WireGuardError as exc:
                log.error("%s: could not remove leftovers: %s", interface, exc)

    async def sync_workers(self) -> None:
        """One worker per managed WireGuard interface that exists and has a key."""
        try:
            present = await self.control.list_interfaces()
        except WireGuardError as exc:
            log.error("cannot list WireGuard interfaces: %s", exc)
            present = []
        wanted = [
            i
            for i in present
            if (not self.config.interfaces or i in self.config.interfaces)
            and i not in self.config.exclude_interfaces
        ]
        for name in wanted:
            if name in self._tasks and not self._tasks[name].done():
                continue
            worker = InterfaceWorker(self, name)
            self.workers[name] = worker
            self._tasks[name] = asyncio.create_task(self._run_worker(worker), name=f"worker-{name}")
            log.info("managing WireGuard interface %s", name)
        for name in list(self._tasks):
            if name not in wanted:
                self._tasks.pop(name).cancel()
                self.workers.pop(name, None)

    async def _run_worker(self, worker: InterfaceWorker) -> None:
        await self.supervisor.run(f"worker {worker.interface}", worker.run)

    async def _watch_network(self) -> None:
        async for change in self.netview.changes():
            before = self.snapshot.lan_uplinks()
            self.snapshot = change.after
            log.info("network change: %s", "; ".join(change.reasons))
            await self.sync_workers()
            uplinks = change.after.lan_uplinks()
            for worker in list(self.workers.values()):
                try:
                    if not uplinks:
                        # No gateway: drop direct peers at once, without contacting anyone.
                        await worker.withdraw("no default gateway")
                    elif uplinks != before:
                        await worker.rebind_hub()
                except WireGuardError as exc:
                    log.error("%s: %s", worker.interface, exc)
            if self.config.push:
                self.resync("network change")

    async def _leave_all(self) -> None:
        """Tell the servers we go, so neighbours drop us within a second."""
        await asyncio.gather(*(worker.leave() for worker in self.workers.values()))

    async def shutdown(self) -> None:
        """Leave, remove every direct peer we added, give routes back to the hub."""
        # Cut in-flight reports first: one finishing after our leave would register
        # us again, and neighbours would add a peer that is about to vanish.
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._leave_all()
        for worker in self.workers.values():
            try:
                await worker.withdraw("shutting down")
            except WireGuardError as exc:
                log.error("%s: could not remove direct peers: %s", worker.interface, exc)
        log.info("stopped")

    def statuses(self) -> list[InterfaceStatus]:
        return [w.status for w in self.workers.values()]

    async def handle_command(self, command: str) -> dict[str, Any]:
        """The local control channel's commands (status, sync, enable, disable, quit)."""
        if command == "status":
            return {
                "ok": True,
                "version": STATUS_VERSION,
                "enabled": self.enabled,
                # Background tasks that failed and are being restarted, with why.
                "degraded": dict(self.supervisor.degraded),
                "started_at": self.started_at,
                # WireGuard changes made since start: stays put while nothing changes.
                "writes": self.writes,
                "interfaces": as_jsonable(self.statuses()),
            }
        if command == "sync":
            self.resync("requested over the control socket")
        elif command in ("enable", "disable"):
            await self.set_enabled(command == "enable")
        elif command == "quit":
            self.stop()
        else:
            return {"ok": False, "error": f"unknown command {command!r}"}
        return {"ok": True}
