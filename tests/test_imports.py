"""What importing a module or running a command loads: backends and the lab only when used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# pyroute2 itself is registered, unexecuted, by wg_autopeer (lazypackage): any use of it
# loads pyroute2.netlink.
HEAVY = ("pyroute2.netlink", "nacl", "uvicorn", "fastapi", "wg_autopeer.lab")
# What a command that only talks to the running agent's socket has no use for.
AGENT_MACHINERY = (
    "asyncio",
    "pydantic",
    "httpx",
    "wg_autopeer.wireguard",
    "wg_autopeer.netview",
    "wg_autopeer.agent.daemon",
)


def loaded_after(code: str, modules: tuple[str, ...] = HEAVY) -> set[str]:
    """Which of ``modules`` are in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint('LOADED', *(m for m in {modules!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    # The last line: a command's --help prints before it.
    last = done.stdout.splitlines()[-1].split()
    assert last[0] == "LOADED"
    return set(last[1:])


def test_protocol_loads_no_wireguard_backend_and_no_validation_library() -> None:
    assert loaded_after("import wg_autopeer.protocol", (*HEAVY, "pydantic")) == set()


def test_wireguard_package_loads_the_netlink_backend_only_when_asked() -> None:
    assert loaded_after("import wg_autopeer.wireguard") == set()
    assert "pyroute2.netlink" in loaded_after("from wg_autopeer.wireguard import NetlinkControl")


def test_status_help_loads_neither_the_server_nor_the_lab() -> None:
    code = (
        "from wg_autopeer.cli import main\n"
        "try:\n    main(['status', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert loaded_after(code) == set()


def test_status_loads_only_the_socket_client(tmp_path: Path) -> None:
    # No agent runs there: the command says so (exit 3) having loaded none of the agent.
    code = (
        "from wg_autopeer.cli import main\n"
        f"assert main(['status', '--runtime-dir', {str(tmp_path)!r}]) == 3\n"
        f"assert main(['sync', '--runtime-dir', {str(tmp_path)!r}]) == 3"
    )
    assert loaded_after(code, HEAVY + AGENT_MACHINERY) == set()


def test_the_agent_command_loads_neither_the_lab_nor_the_server() -> None:
    # Everything the running agent imports (its own modules and both backends).
    code = (
        "import wg_autopeer.agent.command, wg_autopeer.agent.daemon\n"
        "import wg_autopeer.netview.linux, wg_autopeer.wireguard.netlink, wg_autopeer.tray\n"
        "from wg_autopeer.cli import main\n"
        "try:\n    main(['agent', '--help'])\nexcept SystemExit:\n    pass"
    )
    loaded = loaded_after(
        code, (*HEAVY, "wg_autopeer.server", "pyroute2.ndb", "rich", "pydantic", "cryptography")
    )
    assert loaded.isdisjoint({"wg_autopeer.lab", "wg_autopeer.server", "uvicorn", "fastapi"})
    assert "pyroute2.netlink" in loaded  # the probe did load the backends
    # Nor pyroute2's whole library, nor httpx's command-line tool (installed here for dev).
    assert "pyroute2.ndb" not in loaded
    assert "rich" not in loaded
    # The wire models and the ledger are checked by hand: no validation library, and the
    # UAPI backend's X25519 comes from PyNaCl (about 12 and 7 MiB of the agent's memory).
    assert "pydantic" not in loaded
    assert "cryptography" not in loaded


def test_server_help_loads_no_lab() -> None:
    code = (
        "from wg_autopeer.cli import main\n"
        "try:\n    main(['server', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert "wg_autopeer.lab" not in loaded_after(code)


def test_the_server_imports_nothing_of_the_agent() -> None:
    # The halves share protocol, wireguard, sdnotify and friends, never each other.
    probe = (
        "import sys, wg_autopeer.server.command, wg_autopeer.server.app\n"
        "print(sorted(m for m in sys.modules if m.startswith('wg_autopeer.agent')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
