"""The control socket's permissions: the owner only, or a configured group too.

A root agent under systemd and a desktop user's tray meet here: with
``control_group`` the socket is 0660 for that group, without it 0600.
"""

from __future__ import annotations

import asyncio
import grp
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wg_autopeer.agent.localapi import call, socket_path
from wg_autopeer.agent.localserver import LocalApiServer
from wg_autopeer.errors import ConfigError

NOBODY = 65534


async def answer(command: str) -> dict[str, Any]:
    return {"ok": True, "echo": command}


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="wgap-dk-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()


def nobody_group() -> str:
    try:
        return grp.getgrgid(NOBODY).gr_name
    except KeyError:
        pytest.skip("no group with gid 65534 here")


async def test_socket_is_private_to_the_owner_by_default(tmp_path: Path) -> None:
    server = LocalApiServer(socket_path(tmp_path / "run"), answer)
    await server.start()
    try:
        mode = os.stat(server.path).st_mode
        assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
        assert await asyncio.to_thread(call, tmp_path / "run", "status") == {
            "ok": True,
            "echo": "status",
        }
    finally:
        await server.close()
    assert not server.path.exists()


async def test_control_group_makes_socket_and_new_dir_usable_by_the_group(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name  # one the test process may always pick
    server = LocalApiServer(socket_path(tmp_path / "run"), answer, group=group)
    await server.start()
    try:
        sock = os.stat(server.path)
        assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, os.getgid())
        run = os.stat(tmp_path / "run")
        assert (stat.S_IMODE(run.st_mode), run.st_gid) == (0o710, os.getgid())
    finally:
        await server.close()


def test_unknown_control_group_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        LocalApiServer(socket_path(tmp_path), answer, group="no-such-group-wgap")
    assert caught.value.key == "control_group"


async def _status_as_nobody(runtime_dir: Path) -> tuple[int, str]:
    program = (
        "import sys; from pathlib import Path; from wg_autopeer.agent import localapi\n"
        "try:\n"
        "    print(localapi.call(Path(sys.argv[1]), 'status'))\n"
        "except localapi.AgentNotRunning as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        sys.executable,
        "-c",
        program,
        str(runtime_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("with_group", [False, True])
async def test_another_user_gets_in_only_through_the_control_group(
    open_dir: Path, with_group: bool
) -> None:
    group = nobody_group() if with_group else None
    runtime_dir = open_dir / "run"
    server = LocalApiServer(socket_path(runtime_dir), answer, group=group)
    await server.start()
    try:
        code, out = await _status_as_nobody(runtime_dir)
    finally:
        await server.close()
    if with_group:
        assert (code, out.strip()) == (0, "{'ok': True, 'echo': 'status'}")
    else:
        assert code == 3
        assert "not allowed to talk to the agent" in out
        assert "control_group" in out
