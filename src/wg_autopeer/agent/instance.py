"""One agent at a time, and where an agent without root keeps its files.

Two agents on one state directory would each take the other's peers for
hand-configured ones and fight over the ledger; a second one would also unlink
the first one's live control socket. ``InstanceLock`` takes an exclusive
``flock`` on ``<state_dir>/agent.lock`` (released by the kernel when the
process dies, so a crashed agent never blocks the next) and records the PID
there for the message the second one prints.

``agent_dirs`` picks the state and runtime directories: the configured ones
when they can be used, else, for a desktop user running the agent through a
capability-carrying launcher, ``$XDG_STATE_HOME/wg-autopeer`` and
``$XDG_RUNTIME_DIR/wg-autopeer``. ``status``, ``sync`` and the tray look for the
socket in the same places (``localapi.control_socket_dirs``, re-exported here).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from wg_autopeer.agent.localapi import (
    APP,
    DEFAULT_RUNTIME_DIR,
    control_socket_dirs,
    xdg_runtime,
)
from wg_autopeer.errors import AlreadyRunning

__all__ = [
    "APP",
    "DEFAULT_RUNTIME_DIR",
    "DEFAULT_STATE_DIR",
    "LOCK_NAME",
    "AgentDirs",
    "InstanceLock",
    "agent_dirs",
    "control_socket_dirs",
]

LOCK_NAME = "agent.lock"
DEFAULT_STATE_DIR = Path("/var/lib/wg-autopeer")


class InstanceLock:
    """An exclusive lock on a state directory, held until ``release`` (or process exit)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(str(state_dir), holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    return None


@dataclass(frozen=True)
class AgentDirs:
    state_dir: Path
    runtime_dir: Path
    # Lines for the log: which fallback was taken, and why.
    notes: tuple[str, ...] = ()


def _usable(directory: Path) -> bool:
    """True when ``directory`` exists writable, or can be created."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def _xdg_state(env: Mapping[str, str]) -> Path | None:
    base = env.get("XDG_STATE_HOME") or (
        str(Path(env["HOME"]) / ".local" / "state") if env.get("HOME") else None
    )
    return Path(base) / APP if base else None


def agent_dirs(
    state_dir: Path,
    runtime_dir: Path,
    env: Mapping[str, str] | None = None,
    usable: Callable[[Path], bool] = _usable,
) -> AgentDirs:
    """The directories to use: the configured ones where usable; for the defaults
    only, the XDG ones of the user as a fallback. A directory the user named
    explicitly is never swapped for another: the caller reports it unusable."""
    env = os.environ if env is None else env
    notes: list[str] = []
    chosen: list[Path] = []
    for given, default, fallback, what in (
        (state_dir, DEFAULT_STATE_DIR, _xdg_state(env), "state"),
        (runtime_dir, DEFAULT_RUNTIME_DIR, xdg_runtime(env), "runtime"),
    ):
        if given == default and not usable(given) and fallback is not None and usable(fallback):
            notes.append(f"cannot use {given} (not root?): {what} files go to {fallback}")
            chosen.append(fallback)
        else:
            chosen.append(given)
    return AgentDirs(chosen[0], chosen[1], tuple(notes))
