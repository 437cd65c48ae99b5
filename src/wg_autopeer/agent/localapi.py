"""The agent's local control channel: a unix socket speaking one JSON line each way.

``wg-autopeer status``/``sync`` and the tray are thin clients of it. The socket
lives in the runtime dir and is created mode 0600, so only the agent's owner
(root, or the user running it) can drive the agent. With a ``group`` (agent
config ``control_group``) it is mode 0660 owned by that group instead, so a
desktop user in the group can run the tray and ``status`` against a root agent.

Requests: ``{"command": "status" | "sync" | "enable" | "disable" | "quit"}``.
Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from wg_autopeer.agent.instance import control_socket_dirs
from wg_autopeer.errors import AlreadyRunning, ConfigError

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
STATUS_VERSION = 1
MAX_REQUEST = 4096

Handler = Callable[[str], Awaitable[dict[str, Any]]]


def socket_path(runtime_dir: Path) -> Path:
    return runtime_dir / SOCKET_NAME


def group_id(group: str) -> int:
    """The gid of ``group`` (a name or a number); ConfigError naming ``control_group``."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            "control_group", f"expected the name of an existing group, got {group!r}"
        ) from None


class LocalApiServer:
    """Serves the control socket; ``handler`` turns a command into an answer.

    ``group``: also let this group's members connect (socket mode 0660).
    """

    def __init__(self, path: Path, handler: Handler, *, group: str | None = None) -> None:
        self.path = path
        self.handler = handler
        self.gid = group_id(group) if group is not None else None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Serve the socket. Raises ``AlreadyRunning`` when a live agent answers on it:
        only a stale socket (left by a crash) is replaced."""
        self._make_dir()
        if _answers(self.path):
            raise AlreadyRunning(str(self.path), None)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        if self.gid is None:
            return
        try:
            # chown before chmod: the socket is never group-writable for the wrong group.
            os.chown(self.path, -1, self.gid)
        except PermissionError:
            # Without CAP_CHOWN a process may only pick one of its own groups. The
            # agent still works; only the group's members are left out.
            log.error(
                "cannot give the control socket %s to group %d: the agent is not in it "
                "(systemd: SupplementaryGroups=); only its owner can use the socket",
                self.path,
                self.gid,
            )
            return
        os.chmod(self.path, 0o660)

    def _make_dir(self) -> None:
        """The runtime dir: private, or traversable by the control group."""
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.gid is not None:
                with contextlib.suppress(PermissionError):  # start() says why
                    os.chown(directory, -1, self.gid)
                    os.chmod(directory, 0o710)
            return
        if self.gid is None:
            return
        mode = directory.stat()
        traversable = mode.st_mode & 0o001 or (mode.st_mode & 0o010 and mode.st_gid == self.gid)
        if not traversable:
            # Someone else made it (systemd's RuntimeDirectoryMode=): say why the group fails.
            log.warning(
                "control_group members cannot reach %s: %s is mode %o; "
                "give it group execute permission (RuntimeDirectoryMode=0755 under systemd)",
                self.path,
                directory,
                mode.st_mode & 0o777,
            )

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


def _answers(path: Path) -> bool:
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
