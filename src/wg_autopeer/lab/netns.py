"""Running things in a lab's network namespaces, and ending the processes it started.

The primitives under ``Lab``: one command (``run_command``, ``ip_batch``), the lab's
namespaces by prefix, whether this host can run a lab at all, and processes told apart
by PID *and* start time (from ``/proc/<pid>/stat``), so a reused PID is never killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from wg_autopeer.errors import LabError

log = logging.getLogger(__name__)

REQUIRED_TOOLS = ("ip", "wireguard-go", "wg", "nft", "tc", "ping", "sysctl")

TERM_TIMEOUT = 5.0
KILL_TIMEOUT = 2.0


def lab_unavailable_reason() -> str | None:
    """Why no lab can be built here (not root, a tool or /dev/net/tun missing), or None."""
    if os.geteuid() != 0:
        return "needs root and network namespaces (not running as root)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs root and network namespaces (missing: {', '.join(missing)})"
    if not Path("/dev/net/tun").exists():
        return "needs root and network namespaces (no /dev/net/tun for wireguard-go)"
    return None


def kernel_wireguard_unavailable_reason() -> str | None:
    """Why this kernel cannot host WireGuard devices (no module, built in or loadable), or None.

    Looked up in /sys and the module index rather than by loading it, so asking changes
    nothing; scripts/vm.sh boots a kernel that has the module when this one lacks it.
    """
    if Path("/sys/module/wireguard").exists():
        return None
    release = os.uname().release
    for index in ("modules.dep", "modules.builtin"):
        path = Path("/lib/modules", release, index)
        with contextlib.suppress(OSError):
            if "/wireguard.ko" in path.read_text():
                return None
    return f"needs kernel WireGuard (kernel {release} has no wireguard module)"


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds passed; True when it was."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def run_command(
    argv: Sequence[str],
    *,
    stdin_text: str | None = None,
    check: bool = True,
    timeout: float = 10.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and wait for it; ``LabError`` when it fails (with ``check``) or hangs."""
    command = shlex.join(argv)
    try:
        result = subprocess.run(
            list(argv),
            input=stdin_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{command}: no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise LabError(f"{command}: {exc}") from exc
    if check and result.returncode != 0:
        raise LabError(f"{command} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def ip_batch(ns: str, *commands: str) -> None:
    """Run ``ip`` ``commands`` inside namespace ``ns``; ``LabError`` at the first that fails."""
    # One `ip -batch` per step keeps bring-up fast; it stops at the first error.
    run_command(["ip", "-n", ns, "-batch", "-"], stdin_text="\n".join(commands) + "\n")


def list_namespaces(prefix: str) -> list[str]:
    """Every network namespace of the lab ``prefix`` (``<prefix>-*``) that exists now."""
    result = run_command(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return sorted(name for name in names if name.startswith(f"{prefix}-"))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name in parentheses may itself contain spaces and ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (field 22 of /proc/<pid>/stat)."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _reap(pid: int) -> None:
    # A child of ours (a lab whose object was dropped in this process) stays a zombie
    # until someone waits for it; a stranger's PID raises ChildProcessError.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def process_alive(pid: int, start_time: int) -> bool:
    """True when ``pid`` is still the process that started at ``start_time`` and not a zombie."""
    _reap(pid)
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == start_time and stat[0] not in ("Z", "X")


@dataclass(frozen=True)
class ProcessRecord:
    """A process the lab started: enough to end it later without hitting a reused PID."""

    pid: int
    start_time: int
    name: str
    argv: tuple[str, ...] = ()


def end_processes(
    records: Iterable[ProcessRecord],
    *,
    popens: Mapping[int, subprocess.Popen[bytes]] | None = None,
    timeout: float = TERM_TIMEOUT,
) -> list[ProcessRecord]:
    """SIGTERM every recorded process still alive, wait up to ``timeout``, then SIGKILL.

    Returns the records that were alive and got a signal.
    """
    popens = popens or {}
    alive = [r for r in records if process_alive(r.pid, r.start_time)]
    for record in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)

    def all_gone(victims: list[ProcessRecord]) -> bool:
        for record in victims:
            proc = popens.get(record.pid)
            if proc is not None:
                proc.poll()
        return not any(process_alive(r.pid, r.start_time) for r in victims)

    if not wait_for(lambda: all_gone(alive), timeout):
        stubborn = [r for r in alive if process_alive(r.pid, r.start_time)]
        for record in stubborn:
            log.warning("lab: %s (pid %d) ignored SIGTERM, killing it", record.name, record.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
        if not wait_for(lambda: all_gone(stubborn), KILL_TIMEOUT):
            names = ", ".join(f"{r.name} ({r.pid})" for r in stubborn)
            raise LabError(f"processes survived SIGKILL: {names}")
    return alive
