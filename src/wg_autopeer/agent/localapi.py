"""The agent's local control channel: a unix socket speaking one JSON line each way.

``wg-autopeer status``/``sync`` and the tray are thin clients of it. The socket
lives in the runtime dir and is created mode 0600, so only the agent's owner
(root, or the user running it) can drive the agent.

Requests: ``{"command": "status" | "sync" | "enable" | "disable" | "quit"}``.
Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
STATUS_VERSION = 1
MAX_REQUEST = 4096

Handler = Callable[[str], Awaitable[dict[str, Any]]]


def socket_path(runtime_dir: Path) -> Path:
    return runtime_dir / SOCKET_NAME


class LocalApiServer:
    """Serves the control socket; ``handler`` turns a command into an answer."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
            try:
                request = json.loads(line[:MAX_REQUEST])
                command = str(request["command"])
            except (ValueError, KeyError, TypeError):
                answer: dict[str, Any] = {"ok": False, "error": 'expected {"command": ...}'}
            else:
                answer = await self.handler(command)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            log.debug("control socket client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class AgentNotRunning(Exception):
    """No agent answers on the control socket."""


def call(runtime_dir: Path, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the running agent (blocking; for the CLI and the tray thread)."""
    path = socket_path(runtime_dir)
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
            f"not allowed to talk to the agent at {path}: run as its owner"
        ) from exc
    except OSError as exc:
        raise AgentNotRunning(f"agent at {path} did not answer: {exc}") from exc
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise AgentNotRunning(f"agent at {path} sent garbage") from exc
    return answer


def as_jsonable(value: Any) -> Any:
    """Dataclasses (status records) into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: as_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list | tuple):
        return [as_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_jsonable(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
