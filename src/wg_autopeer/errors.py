"""The exception tree of wg-autopeer.

Library exceptions (pyroute2, httpx, OSError) are translated into these at the
boundary that meets them, with ``raise ... from exc``, so callers handle one tree::

    WgAutopeerError
    ├── WireGuardError            (.interface, .reason)
    │   ├── NoSuchInterface
    │   ├── WireGuardPermissionDenied
    │   └── DeviceRefused         the device rejected a change (bad key, bad value)
    ├── NetViewError
    ├── ServerError               the coordination server could not be used (.retryable)
    │   └── ServerRefused         it answered with an error status (.status)
    ├── UnsafeAnswer              an answer the safety filter refused whole
    ├── LedgerError
    ├── AlreadyRunning            another agent holds the state dir (.path, .pid)
    ├── ConfigError               (.key) a bad or unknown configuration key
    └── LabError
"""

from __future__ import annotations


class WgAutopeerError(Exception):
    """Base of every error wg-autopeer raises on purpose."""


class WireGuardError(WgAutopeerError):
    """A WireGuard control operation failed on ``interface``."""

    def __init__(self, interface: str, reason: str) -> None:
        super().__init__(f"{interface}: {reason}")
        self.interface = interface
        self.reason = reason


class NoSuchInterface(WireGuardError):
    """The interface does not exist here or is not a WireGuard device."""


class WireGuardPermissionDenied(WireGuardError):
    """The caller lacks CAP_NET_ADMIN or access to the UAPI socket."""


class DeviceRefused(WireGuardError):
    """The device answered the change with an error."""


class NetViewError(WgAutopeerError):
    """Reading links, addresses or routes failed."""


class ServerError(WgAutopeerError):
    """The coordination server could not be reached or understood."""

    def __init__(self, url: str, reason: str, *, retryable: bool = True) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
        self.retryable = retryable


class ServerRefused(ServerError):
    """The server answered with an error status."""

    def __init__(self, url: str, status: int, reason: str) -> None:
        # 409 (stale handshake) and 5xx heal by themselves; other 4xx need a human.
        super().__init__(url, f"HTTP {status}: {reason}", retryable=status == 409 or status >= 500)
        self.status = status


class UnsafeAnswer(WgAutopeerError):
    """An answer from the server was refused whole (too large, not the wire format)."""


class LedgerError(WgAutopeerError):
    """The ledger of peers the agent added could not be written."""


class AlreadyRunning(WgAutopeerError):
    """Another agent already runs with this state directory (or control socket)."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"PID {pid}" if pid else "another process"
        super().__init__(
            f"another wg-autopeer agent ({who}) already runs with {path}; stop it first"
            " (systemctl stop wg-autopeer-agent) or give this one its own --state-dir"
        )
        self.path = path
        self.pid = pid


class ConfigError(WgAutopeerError):
    """A configuration key is unknown or its value has the wrong form."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class LabError(WgAutopeerError):
    """Building or tearing down a lab topology failed."""
