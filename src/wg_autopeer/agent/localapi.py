"""The agent's local control channel: a unix socket speaking one JSON line each way.

``wg-autopeer status``/``sync`` and the tray are thin clients of it: this module is
the wire format and the (blocking) client, and imports neither asyncio nor any
other part of the agent, so ``status`` starts fast. The agent's side is
``localserver.LocalApiServer``.

Requests: ``{"command": "status" | "sync" | "enable" | "disable" | "quit"}``.
Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

APP = "wg-autopeer"
DEFAULT_RUNTIME_DIR = Path("/run/wg-autopeer")
SOCKET_NAME = "agent.sock"
STATUS_VERSION = 1
MAX_REQUEST = 4096


def socket_path(runtime_dir: Path) -> Path:
    return runtime_dir / SOCKET_NAME


class AgentNotRunning(Exception):
    """No agent answers on the control socket."""


def xdg_runtime(env: Mapping[str, str]) -> Path | None:
    """``$XDG_RUNTIME_DIR/wg-autopeer``: where an agent run by a desktop user lives."""
    base = env.get("XDG_RUNTIME_DIR")
    return Path(base) / APP if base else None


def control_socket_dirs(runtime_dir: Path, env: Mapping[str, str] | None = None) -> list[Path]:
    """Where ``status``, ``sync`` and the tray look for the agent's socket, in order."""
    env = os.environ if env is None else env
    dirs = [runtime_dir]
    fallback = xdg_runtime(env)
    if runtime_dir == DEFAULT_RUNTIME_DIR and fallback is not None:
        dirs.append(fallback)
    return dirs


def answers(path: Path) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def find_socket(runtime_dir: Path) -> Path:
    """The agent's socket: in ``runtime_dir``, or where an agent run by a desktop user
    puts it (``$XDG_RUNTIME_DIR/wg-autopeer``) when the default dir has none."""
    candidates = [socket_path(d) for d in control_socket_dirs(runtime_dir)]
    for path in candidates:
        try:
            path.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            # There, but not ours to see (a root agent's 0700 dir): connecting says why.
            return path
        return path
    return candidates[0]


def call(runtime_dir: Path, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the running agent (blocking; for the CLI and the tray thread)."""
    path = find_socket(runtime_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise AgentNotRunning(f"no agent is running (no socket at {path})") from exc
    except PermissionError as exc:
        raise AgentNotRunning(
            f"not allowed to talk to the agent at {path}: run as its owner, "
            "or set control_group in the agent's config and join that group"
        ) from exc
    except OSError as exc:
        raise AgentNotRunning(f"agent at {path} did not answer: {exc}") from exc
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise AgentNotRunning(f"agent at {path} sent garbage") from exc
    return answer
