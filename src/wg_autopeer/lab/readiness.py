"""Waiting for a spawned daemon to say it is ready, the way systemd does (``Type=notify``).

The agent and the server send ``READY=1`` to ``$NOTIFY_SOCKET`` (``wg_autopeer.sdnotify``)
once they serve: the server when it listens, the agent after its first sync. The lab binds
that socket itself, so a test blocks on one datagram instead of polling with curl or ``wg``,
which under emulation (the kernel tests' VM) would take the CPU the daemon needs to start.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

from wg_autopeer.sdnotify import ENV


class ReadinessSocket:
    """A bound ``NOTIFY_SOCKET`` for one spawned process; a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))

    def env(self) -> dict[str, str]:
        """The environment that makes a daemon notify this socket."""
        return {ENV: str(self.path)}

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
        """Block until ``proc`` sends ``READY=1``: that message; None when ``timeout``
        passed first or ``proc`` exited. Wakes once a second only to notice an exit."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and proc.poll() is None:
            self._sock.settimeout(min(left, 1.0))
            try:
                message = self._sock.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if "READY=1" in message.splitlines():
                return message
        return None

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def __enter__(self) -> ReadinessSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
