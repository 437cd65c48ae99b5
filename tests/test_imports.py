"""What importing a module or running a command loads: backends and the lab only when used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pyroute2", "cryptography", "uvicorn", "fastapi", "wg_autopeer.lab")


def loaded_after(code: str) -> set[str]:
    """The HEAVY modules in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint('LOADED', *(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    # The last line: a command's --help prints before it.
    last = done.stdout.splitlines()[-1].split()
    assert last[0] == "LOADED"
    return set(last[1:])


def test_protocol_loads_no_wireguard_backend() -> None:
    assert loaded_after("import wg_autopeer.protocol") == set()


def test_wireguard_package_loads_the_netlink_backend_only_when_asked() -> None:
    assert loaded_after("import wg_autopeer.wireguard") == set()
    assert "pyroute2" in loaded_after("from wg_autopeer.wireguard import NetlinkControl")


def test_status_help_loads_neither_the_server_nor_the_lab() -> None:
    code = (
        "from wg_autopeer.cli import main\n"
        "try:\n    main(['status', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert loaded_after(code) == set()


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
