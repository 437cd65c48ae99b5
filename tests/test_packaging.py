"""The files in packaging/: systemd units, the XDG autostart entry, the icons.

systemd itself does not run here, so the units are checked with
``systemd-analyze verify`` and their privilege model is tried for real in a
lab: the agent as root limited to the units' capability bounding set.
"""

from __future__ import annotations

import configparser
import grp
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wg_autopeer.cli import build_parser
from wg_autopeer.lab import Lab
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import agent_dirs, has_direct_peer, start_agent, start_server

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
RESOURCES = ROOT / "src" / "wg_autopeer" / "resources"
UNITS = ("wg-autopeer-agent.service", "wg-autopeer-server.service")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(PACKAGING / name)
    return parser


@pytest.mark.parametrize("name", UNITS)
def test_unit_has_what_the_issue_asks_for(name: str) -> None:
    service = unit(name)["Service"]
    assert service["Type"] == "notify"
    assert "CAP_NET_ADMIN" in service["AmbientCapabilities"].split()
    assert service["CapabilityBoundingSet"].split() == service["AmbientCapabilities"].split()
    assert service["StateDirectory"] == "wg-autopeer"
    assert service["RuntimeDirectory"].startswith("wg-autopeer")
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    # What ExecStart runs is a command line our CLI accepts.
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/wg-autopeer")
    build_parser().parse_args(argv[1:])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this checkout's command.
    command = Path(sys.executable).parent / "wg-autopeer"
    assert command.exists()
    for name in UNITS:
        text = (PACKAGING / name).read_text()
        (tmp_path / name).write_text(
            text.replace("ExecStart=/usr/local/bin/wg-autopeer", f"ExecStart={command}")
        )
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_autostart_entry_starts_the_tray_with_the_shipped_icon() -> None:
    entry = unit("wg-autopeer-tray.desktop")["Desktop Entry"]
    assert entry["Type"] == "Application"
    assert entry["Terminal"] == "false"
    argv = shlex.split(entry["Exec"])
    assert argv[0] == entry["TryExec"] == "wg-autopeer"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "tray"
    assert args.runtime_dir == Path("/run/wg-autopeer")
    assert (RESOURCES / f"{entry['Icon']}.svg").exists()
    assert (RESOURCES / f"{entry['Icon']}.png").exists()


def test_icons_are_shipped_for_every_tray_state() -> None:
    for state in ("active", "idle", "error"):
        assert (RESOURCES / f"wg-autopeer-{state}.png").stat().st_size > 0
        assert (RESOURCES / f"wg-autopeer-{state}.svg").read_text().startswith("<?xml")


@pytest.mark.lab
def test_agent_works_with_only_the_units_capabilities(lab_factory: Any, tmp_path: Path) -> None:
    """CapabilityBoundingSet=CAP_NET_ADMIN for root, SupplementaryGroups= for the
    control group: enough to peer, report, and hand the socket to the group.
    The server tells systemd (Type=notify) once it serves."""
    lab: Lab = lab_factory(base="dk")
    # start_server listens on the server's NOTIFY_SOCKET as systemd would.
    notified: list[str] = []
    start_server(lab, on_ready=notified.append)
    hub_wg = lab.wg_interface(lab.topology.hub.name)
    assert notified == [f"READY=1\nSTATUS=serving {hub_wg}"]
    group = grp.getgrgid(65534).gr_name
    config = tmp_path / "agent.toml"
    config.write_text(f'control_group = "{group}"\n')
    state_dir, run_dir = agent_dirs(lab, "alice")
    limited = [
        "setpriv",
        "--bounding-set=-all,+net_admin",
        "--inh-caps=-all,+net_admin",
        "--ambient-caps=-all,+net_admin",
        "--groups=65534",
        sys.executable,
        "-m",
        "wg_autopeer",
        "-v",
        "agent",
        "--no-tray",
        "--config",
        str(config),
        "--state-dir",
        str(state_dir),
        "--runtime-dir",
        str(run_dir),
    ]
    alice = lab.spawn("alice", limited, log_name="agent-alice")
    start_agent(lab, "bob")
    assert wait_for(
        lambda: has_direct_peer(lab, "alice", "bob") and has_direct_peer(lab, "bob", "alice"),
        timeout=15,
    ), lab.log_path("agent-alice").read_text()
    status = Path(f"/proc/{alice.pid}/status").read_text()
    cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(cap_eff.split()[1], 16) == 1 << 12  # CAP_NET_ADMIN only
    sock = os.stat(run_dir / "agent.sock")
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, 65534)
    assert lab.stop(alice) == 0
