"""One agent per state directory; the XDG fallbacks of an agent run without root."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from wg_autopeer.agent import localapi, localserver
from wg_autopeer.agent.instance import (
    DEFAULT_RUNTIME_DIR,
    DEFAULT_STATE_DIR,
    InstanceLock,
    agent_dirs,
    control_socket_dirs,
)
from wg_autopeer.errors import AlreadyRunning


def test_second_lock_on_a_state_dir_names_the_first_holder(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path)
    try:
        with pytest.raises(AlreadyRunning) as refused:
            InstanceLock(tmp_path)
        assert refused.value.pid == os.getpid()
        assert f"PID {os.getpid()}" in str(refused.value)
    finally:
        first.release()
    # Released (as on exit, or a crash: the kernel drops flocks): the next one starts.
    InstanceLock(tmp_path).release()


def test_default_dirs_fall_back_to_xdg_when_unusable(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "HOME": str(tmp_path / "home")}

    def usable(path: Path) -> bool:
        return str(path).startswith(str(tmp_path))

    dirs = agent_dirs(DEFAULT_STATE_DIR, DEFAULT_RUNTIME_DIR, env, usable)
    assert dirs.state_dir == tmp_path / "home" / ".local" / "state" / "wg-autopeer"
    assert dirs.runtime_dir == tmp_path / "run" / "wg-autopeer"
    assert len(dirs.notes) == 2
    assert "/run/wg-autopeer" in dirs.notes[1]


def test_explicit_dirs_are_never_swapped(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "s")}
    dirs = agent_dirs(Path("/nope/state"), Path("/nope/run"), env, lambda path: False)
    assert (dirs.state_dir, dirs.runtime_dir, dirs.notes) == (
        Path("/nope/state"),
        Path("/nope/run"),
        (),
    )


def test_usable_default_dirs_stay(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    dirs = agent_dirs(DEFAULT_STATE_DIR, DEFAULT_RUNTIME_DIR, env, lambda path: True)
    assert (dirs.state_dir, dirs.runtime_dir) == (DEFAULT_STATE_DIR, DEFAULT_RUNTIME_DIR)


def test_clients_look_in_the_xdg_runtime_dir_too(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert control_socket_dirs(DEFAULT_RUNTIME_DIR, env) == [
        DEFAULT_RUNTIME_DIR,
        tmp_path / "wg-autopeer",
    ]
    assert control_socket_dirs(tmp_path / "mine", env) == [tmp_path / "mine"]


async def test_a_live_control_socket_is_never_taken_over(tmp_path: Path) -> None:
    async def handler(command: str) -> dict[str, object]:
        return {"ok": True, "command": command}

    path = localapi.socket_path(tmp_path)
    first = localserver.LocalApiServer(path, handler)
    await first.start()
    try:
        second = localserver.LocalApiServer(path, handler)
        with pytest.raises(AlreadyRunning):
            await second.start()
        answer = await asyncio.to_thread(localapi.call, tmp_path, "status")
        assert answer["command"] == "status"  # the first one still serves
    finally:
        await first.close()


async def test_a_stale_control_socket_is_replaced(tmp_path: Path) -> None:
    async def handler(command: str) -> dict[str, object]:
        return {"ok": True}

    path = localapi.socket_path(tmp_path)
    # What a killed agent leaves: the socket file, with nobody listening.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.exists()
    server = localserver.LocalApiServer(path, handler)
    await server.start()
    try:
        answer = await asyncio.to_thread(localapi.call, tmp_path, "status")
        assert answer["ok"] is True
    finally:
        await server.close()
