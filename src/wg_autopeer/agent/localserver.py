"""The agent's side of the local control channel (see ``localapi`` for the wire format).

The socket lives in the runtime dir and is created mode 0600, so only the agent's
owner (root, or the user running it) can drive the agent. With a ``group`` (agent
config ``control_group``) it is mode 0660 owned by that group instead, so a
desktop user in the group can run the tray and ``status`` against a root agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from wg_autopeer.agent.localapi import MAX_REQUEST, answers
from wg_autopeer.errors import AlreadyRunning, ConfigError

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[dict[str, Any]]]


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
        if answers(self.path):
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
