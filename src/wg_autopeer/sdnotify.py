"""systemd's readiness protocol (``Type=notify``), by hand: one datagram to $NOTIFY_SOCKET.

The protocol is a few ``KEY=value`` lines sent to the unix datagram socket that
systemd names in ``NOTIFY_SOCKET`` (a leading ``@`` means the abstract
namespace). Outside systemd the variable is unset and every call is a no-op,
so the agent and the server call these unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1\\nSTATUS=..."``) to systemd.

    Returns False when there is no notify socket or it could not be reached;
    a service manager that went away must not stop the daemon.
    """
    address = (os.environ if env is None else env).get(ENV, "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s", address.lstrip("\0"), exc)
        return False
    return True


def watchdog_period(env: Mapping[str, str] | None = None) -> float | None:
    """systemd's WatchdogSec in seconds (``WATCHDOG_USEC``) when it is meant for this
    process (``WATCHDOG_PID`` unset or ours); None without a watchdog."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000


def ready(status: str) -> bool:
    """Tell systemd start-up is finished; ``status`` shows in ``systemctl status``."""
    return notify(f"READY=1\nSTATUS={status}")


def stopping() -> bool:
    """Tell systemd a clean shutdown has begun."""
    return notify("STOPPING=1")


async def ready_when(event: asyncio.Event, status: str) -> None:
    """Send READY=1 once ``event`` is set (the agent's first sync)."""
    await event.wait()
    log.debug("ready: %s", status)
    ready(status)
