"""The tray without a display: what it shows, when it runs, what its menu sends.

The menu actions drive a fake control channel that records each command, the
same seam the real tray uses (``localapi.call``). The real run under Xvfb is in
test_tray_xvfb.py.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from wg_autopeer.agent.localapi import AgentNotRunning
from wg_autopeer.tray import (
    ALLOW_ROOT_ENV,
    MENU,
    NOT_RUNNING,
    STATES,
    Tray,
    TrayChoice,
    TrayView,
    choose_tray,
    describe,
    icon_image,
    start_tray_if_possible,
    x11_tray_host,
)


def iface(
    name: str = "wg0", outcome: str = "ok: 1 neighbour(s), 0 refused", peers: int = 0
) -> dict[str, Any]:
    return {
        "interface": name,
        "last_outcome": outcome,
        "direct_peers": [{"public_key": f"key{i}"} for i in range(peers)],
    }


def status(*interfaces: dict[str, Any], enabled: bool = True) -> dict[str, Any]:
    return {"ok": True, "version": 1, "enabled": enabled, "interfaces": list(interfaces)}


# -- what it shows -----------------------------------------------------------------------


def test_direct_peers_show_as_active_with_a_count_in_words() -> None:
    assert describe(status(iface(peers=2))) == TrayView("active", "wg0: 2 direct peers")
    assert describe(status(iface(peers=1))).title == "wg0: 1 direct peer"


def test_paths_being_proven_are_not_counted_as_direct() -> None:
    interface = iface(peers=2)
    interface["direct_peers"][0]["routed"] = True
    interface["direct_peers"][1]["routed"] = False
    assert describe(status(interface)) == TrayView("active", "wg0: 1 direct peer, 1 being proven")
    interface["direct_peers"][0]["routed"] = False
    assert describe(status(interface)) == TrayView("idle", "wg0: 0 direct peers, 2 being proven")


def test_a_degraded_agent_shows_as_an_error_with_the_reason() -> None:
    answer = status(iface(peers=1))
    answer["degraded"] = {"path watch wg0": "LedgerError: disk full"}
    view = describe(answer)
    assert view.state == "error"
    assert view.title == "wg0: 1 direct peer; degraded: path watch wg0: LedgerError: disk full"


def test_no_neighbours_and_no_gateway_are_idle_not_errors() -> None:
    assert describe(status(iface(peers=0))) == TrayView("idle", "wg0: no LAN neighbours")
    view = describe(status(iface(outcome="no default gateway")))
    assert view == TrayView("idle", "wg0: no LAN (no default gateway)")


def test_unreachable_server_is_an_error_even_beside_an_active_interface() -> None:
    view = describe(
        status(iface("wg0", peers=1), iface("wg1", outcome="server unreachable: timed out"))
    )
    assert view.state == "error"
    assert view.title == "wg0: 1 direct peer; wg1: server unreachable"


def test_refused_answer_and_missing_hub_are_errors() -> None:
    assert describe(status(iface(outcome="answer refused: too large"))).state == "error"
    hubless = describe(status(iface(outcome="no hub peer found (no peer routes ...)")))
    assert hubless.state == "error"
    assert hubless.title.startswith("wg0: no hub peer found")


def test_paused_agent_is_idle_and_unchecks_enabled() -> None:
    view = describe(status(iface(peers=3), enabled=False))
    assert view == TrayView("idle", "wg-autopeer: paused (direct peering off)", enabled=False)


def test_no_agent_or_no_interface_says_so() -> None:
    assert describe(None) == NOT_RUNNING
    assert describe({"ok": False, "error": "x"}) == NOT_RUNNING
    assert describe(status()).title == "wg-autopeer: no WireGuard interface"


def test_each_state_has_its_own_shipped_icon() -> None:
    images = {state: icon_image(state) for state in STATES}
    assert all(image.size == (64, 64) and image.mode == "RGBA" for image in images.values())
    assert len({image.tobytes() for image in images.values()}) == 3
    assert icon_image("no such state").tobytes() == images["error"].tobytes()


# -- when it runs ------------------------------------------------------------------------


def no_probe(env: Any) -> str | None:
    raise AssertionError("the tray host probe must not run here")


def no_sni(env: Any) -> str | None:
    return "no StatusNotifierWatcher on the session bus"


def no_x11(env: Any) -> str | None:
    return f"no system tray on display {env['DISPLAY']!r}"


def found(env: Any) -> str | None:
    return None


def test_root_gets_no_tray_unless_the_test_override_is_set() -> None:
    env = {"DISPLAY": ":5"}
    choice = choose_tray(env, euid=0, sni_probe=no_probe, x11_probe=no_probe)
    assert choice.backend is None
    assert "root" in choice.reason
    assert not choice.host_missing
    allowed = choose_tray({**env, ALLOW_ROOT_ENV: "1"}, euid=0, sni_probe=found, x11_probe=no_probe)
    assert allowed.backend == "sni"


def test_no_display_means_no_tray() -> None:
    choice = choose_tray({}, euid=1000, sni_probe=no_probe, x11_probe=no_probe)
    assert choice == TrayChoice(
        None, "no graphical session (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    )


def test_no_tray_flag_wins_over_everything() -> None:
    choice = choose_tray(
        {"DISPLAY": ":5"}, euid=1000, no_tray=True, sni_probe=no_probe, x11_probe=no_probe
    )
    assert choice == TrayChoice(None, "--no-tray")


def test_status_notifier_host_wins_over_an_x11_tray() -> None:
    choice = choose_tray({"DISPLAY": ":5"}, euid=1000, sni_probe=found, x11_probe=no_probe)
    assert choice.backend == "sni"


def test_x11_tray_is_the_fallback_without_a_status_notifier_host() -> None:
    choice = choose_tray({"DISPLAY": ":5"}, euid=1000, sni_probe=no_sni, x11_probe=found)
    assert choice.backend == "xembed"
    assert "no StatusNotifierWatcher" in choice.reason


def test_no_host_at_all_gives_both_reasons_and_may_change_later() -> None:
    choice = choose_tray({"DISPLAY": ":5"}, euid=1000, sni_probe=no_sni, x11_probe=no_x11)
    assert choice == TrayChoice(
        None,
        "no system tray on display ':5'; no StatusNotifierWatcher on the session bus",
        host_missing=True,
    )


def test_wayland_without_x11_asks_only_for_a_status_notifier_host() -> None:
    choice = choose_tray(
        {"WAYLAND_DISPLAY": "wayland-0"}, euid=1000, sni_probe=no_sni, x11_probe=no_probe
    )
    assert choice == TrayChoice(
        None, "no StatusNotifierWatcher on the session bus", host_missing=True
    )


def test_unreachable_x_display_is_reported_not_raised() -> None:
    # "unix:N": no X server there, and no fallback to TCP either.
    reason = x11_tray_host({"DISPLAY": "unix:4093"})
    assert reason is not None
    assert reason.startswith("cannot open display 'unix:4093'")


def test_agent_as_root_logs_one_line_and_starts_no_tray(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(ALLOW_ROOT_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="wg_autopeer.tray"):
        assert start_tray_if_possible(Path("/nonexistent")) is None
    assert [r.getMessage() for r in caplog.records] == [
        "no tray icon: running as root (the tray belongs to a desktop user's session)"
    ]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DISPLAY": ":5"}, "running as root"),
        ({ALLOW_ROOT_ENV: "1"}, "no graphical session"),
    ],
)
def test_tray_command_that_cannot_show_an_icon_exits_1_with_one_line(
    env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0 and "root" in expected:
        pytest.skip("needs root to see the root refusal")
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISPLAY", "WAYLAND_DISPLAY", ALLOW_ROOT_ENV)
    }
    result = subprocess.run(
        [sys.executable, "-m", "wg_autopeer", "tray", "--runtime-dir", str(tmp_path)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


# -- what its menu sends -------------------------------------------------------------------


class FakeAgent:
    """Stands in for ``localapi.call``: records commands, answers like the agent."""

    def __init__(self, enabled: bool = True, running: bool = True) -> None:
        self.enabled = enabled
        self.running = running
        self.commands: list[str] = []

    def __call__(self, runtime_dir: Path, command: str) -> dict[str, Any]:
        assert runtime_dir == Path("/run/test")
        if not self.running:
            raise AgentNotRunning("no agent is running (no socket at /run/test/agent.sock)")
        self.commands.append(command)
        if command in ("enable", "disable"):
            self.enabled = command == "enable"
        if command == "status":
            return status(iface(peers=1), enabled=self.enabled)
        return {"ok": True}


def make_tray(agent: FakeAgent, **kw: Any) -> Tray:
    tray = Tray(Path("/run/test"), agent, **kw)
    tray.refresh()
    agent.commands.clear()
    return tray


def test_resync_asks_the_agent_to_sync_then_shows_its_state() -> None:
    agent = FakeAgent()
    tray = make_tray(agent)
    tray.resync()
    assert agent.commands == ["sync", "status"]


def test_enabled_item_disables_then_enables_following_the_agents_answer() -> None:
    agent = FakeAgent()
    tray = make_tray(agent)
    tray.toggle_enabled()
    assert agent.commands == ["disable", "status"]
    assert tray.enabled is False
    assert tray.view.state == "idle"
    tray.toggle_enabled()
    assert agent.commands[2:] == ["enable", "status"]
    assert tray.enabled is True
    assert tray.view.state == "active"


def test_enabled_check_follows_a_change_made_elsewhere() -> None:
    agent = FakeAgent()
    tray = make_tray(agent)
    agent.enabled = False  # e.g. `wg-autopeer` from a terminal
    tray.refresh()
    assert tray.enabled is False
    tray.toggle_enabled()
    assert agent.commands[-2:] == ["enable", "status"]


def test_quit_of_a_separate_tray_leaves_the_agent_running() -> None:
    agent = FakeAgent()
    tray = make_tray(agent)
    tray.quit()
    assert agent.commands == []
    assert tray.wait(1)


def test_quit_of_the_tray_inside_the_agent_stops_the_agent() -> None:
    agent = FakeAgent()
    tray = make_tray(agent, quit_stops_agent=True)
    tray.quit()
    assert agent.commands == ["quit"]


def test_menu_actions_without_an_agent_show_the_error_instead_of_raising() -> None:
    agent = FakeAgent(running=False)
    tray = Tray(Path("/run/test"), agent)
    tray.resync()
    tray.toggle_enabled()
    assert tray.view == NOT_RUNNING


def test_stop_returns_at_once_even_when_pystray_hangs() -> None:
    tray = make_tray(FakeAgent())
    hang = threading.Event()

    class StuckIcon:
        def stop(self) -> None:
            hang.wait()  # a display that went away never answers

    tray._icon = StuckIcon()
    tray._thread = threading.current_thread()
    tray.stop()
    tray.stop()
    hang.set()


@pytest.fixture
def pystray_dummy(monkeypatch: pytest.MonkeyPatch) -> Any:
    """pystray with its display-free backend (the X11 one connects when imported)."""
    if "pystray" not in sys.modules:
        monkeypatch.setenv("PYSTRAY_BACKEND", "dummy")
    return importlib.import_module("pystray")


def test_pystray_menu_has_resync_enabled_quit_and_drives_the_agent(pystray_dummy: Any) -> None:
    agent = FakeAgent()
    tray = make_tray(agent)
    menu = tray.build_menu(pystray_dummy)
    items = {item.text: item for item in menu.items}
    assert list(items) == [entry.text for entry in MENU] == ["Re-sync", "Enabled", "Quit"]
    assert items["Re-sync"].default
    assert not items["Enabled"].default
    assert items["Enabled"].checked is True
    assert items["Re-sync"].checked is None

    icon = object()
    items["Re-sync"](icon)
    items["Enabled"](icon)
    assert agent.commands == ["sync", "status", "disable", "status"]
    assert items["Enabled"].checked is False
    items["Quit"](icon)
    assert tray.wait(1)
