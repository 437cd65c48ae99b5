"""The tray for real: ``wg-autopeer tray`` under Xvfb, embedded by Debian's trayer.

A virtual X display (Xvfb), a real XEmbed tray host (trayer), the real
``wg-autopeer tray`` command as a child process, and a fake agent answering on
a real control socket (``LocalApiServer``). The test clicks like a user
(XTest), reads the X window tree like ``xwininfo -tree`` and checks the icon's
pixels; screenshots go to artifacts/ (not committed).

The tray refuses root by design; CI runs as root, so the child gets
``WG_AUTOPEER_TRAY_ALLOW_ROOT=1``, the documented test-only override.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from desktopkit import GREEN, GREY, RED, FakeAgent, Processes, Screen, start_xvfb, status
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.tray import MENU_ROW_HEIGHT as ROW_HEIGHT
from wg_autopeer.tray import x11_tray_host

pytestmark = pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("trayer")),
    reason="needs Xvfb and trayer (Debian packages xvfb, trayer: scripts/setup.sh)",
)


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.end_all()


@pytest.fixture
def display(processes: Processes, tmp_path: Path) -> str:
    return start_xvfb(processes, tmp_path / "xvfb.log")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "run")
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def icon_window(screen: Screen) -> Any:
    return screen.find(lambda w: (w.get_wm_class() or ("", ""))[1] == "wg-autopeer")


def popup_window(screen: Screen) -> Any:
    return screen.find(
        lambda w: (
            w.get_wm_name() == "wg-autopeer menu" and w.get_attributes().map_state == 2
        )  # IsViewable
    )


@pytest.fixture
def screen(display: str) -> Iterator[Screen]:
    s = Screen(display)
    try:
        yield s
    finally:
        s.close()


def start_trayer(processes: Processes, display: str, tmp_path: Path) -> None:
    processes.spawn(
        [
            "trayer",
            "--edge",
            "top",
            "--align",
            "left",
            "--widthtype",
            "request",
            "--height",
            "32",
            "--transparent",
            "false",
            "--tint",
            "0x303030",
            "--SetDockType",
            "true",
        ],
        tmp_path / "trayer.log",
        env={**os.environ, "DISPLAY": display},
    )
    assert wait_for(lambda: x11_tray_host({"DISPLAY": display}) is None, timeout=10), (
        "trayer never took the system tray selection"
    )


def tray_argv(runtime_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "wg_autopeer",
        "-v",
        "tray",
        "--runtime-dir",
        str(runtime_dir),
        *extra,
    ]


def tray_env(display: str) -> dict[str, str]:
    # No session bus: the tray would prefer a StatusNotifierWatcher there (the
    # runner's own desktop, say) to the XEmbed icon these tests are about.
    hidden = ("WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    # The tray refuses root by design; CI is root. PYSTRAY_BACKEND: the X11 backend
    # even where PyGObject would make pystray pick AppIndicator (no SNI host here).
    return {
        **env,
        "DISPLAY": display,
        "WG_AUTOPEER_TRAY_ALLOW_ROOT": "1",
        "PYSTRAY_BACKEND": "xorg",
        # A hung tray dumps its threads on SIGABRT (see ended()).
        "PYTHONFAULTHANDLER": "1",
    }


def ended(tray: subprocess.Popen[bytes], log: Path, timeout: float = 10) -> int:
    """The tray's exit status; if it hangs, its threads' stacks as the failure."""
    try:
        return tray.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tray.send_signal(signal.SIGABRT)
        tray.wait(timeout=5)
        raise AssertionError(f"the tray hung:\n{log.read_text()}") from None


def open_menu(screen: Screen, icon: Any) -> Any:
    """Click the icon until its menu shows (a click can land while the tray host
    re-embeds the icon); the menu's window."""
    for _ in range(3):
        screen.click_window(icon)
        if wait_for(lambda: popup_window(screen), timeout=3):
            return popup_window(screen)
    raise AssertionError("the menu never opened")


# -- the tests ------------------------------------------------------------------------------


def test_tray_icon_is_embedded_shows_state_and_its_menu_drives_the_agent(
    processes: Processes, display: str, screen: Screen, agent: FakeAgent, tmp_path: Path
) -> None:
    start_trayer(processes, display, tmp_path)
    log = tmp_path / "tray.log"
    tray = processes.spawn(tray_argv(agent.path.parent), log, env=tray_env(display))

    def icon_shown(title: str) -> Any:
        window = icon_window(screen)
        if window is None or not screen.embedded(window) or window.get_wm_name() != title:
            return None
        return window

    assert wait_for(lambda: icon_shown("wg0: 2 direct peers"), timeout=15), log.read_text()
    # The same window throughout, embedded or re-embedded.
    icon = icon_window(screen)
    text = log.read_text()
    assert "tray icon shown (xorg backend, menu: Re-sync, Enabled, Quit)" in text
    # Green "active" badge: the icon's pixels, as the tray host shows them.
    assert wait_for(lambda: screen.colour_share(icon, GREEN) > 0.3, timeout=5)
    screen.save("tray-xvfb-active", icon)

    # A click opens the menu: three rows, Enabled ticked.
    popup = open_menu(screen, icon)
    assert screen.box(popup)[3] == 3 * ROW_HEIGHT
    assert wait_for(
        lambda: "menu opened: Re-sync, Enabled (checked), Quit" in log.read_text(), timeout=5
    )
    screen.save("tray-xvfb-menu", icon)

    # "Enabled" (second row) switches direct peering off; the icon turns idle grey.
    screen.click_window(popup, dy=ROW_HEIGHT + ROW_HEIGHT // 2)
    assert wait_for(lambda: "disable" in agent.commands, timeout=5), agent.commands
    assert wait_for(lambda: icon_shown("wg-autopeer: paused (direct peering off)"), timeout=5)
    assert wait_for(lambda: screen.colour_share(icon, GREY) > 0.3, timeout=5)

    # Re-open: Enabled is unticked now; "Re-sync" (first row) asks for a sync.
    popup = open_menu(screen, icon)
    assert wait_for(lambda: "menu opened: Re-sync, Enabled, Quit" in log.read_text(), timeout=5)
    screen.click_window(popup, dy=ROW_HEIGHT // 2)
    assert wait_for(lambda: "sync" in agent.commands, timeout=5), agent.commands

    # A click outside closes the menu and runs nothing.
    open_menu(screen, icon)
    before = list(agent.commands)
    screen.click(390, 110)
    assert wait_for(lambda: popup_window(screen) is None, timeout=5)
    assert [c for c in agent.commands[len(before) :] if c != "status"] == []

    # The server goes away: title in words, red icon.
    agent.status = status("server unreachable: timed out", peers=2)
    assert wait_for(lambda: icon_shown("wg0: server unreachable"), timeout=10)
    assert wait_for(lambda: screen.colour_share(icon, RED) > 0.3, timeout=5)
    screen.save("tray-xvfb-error", icon)

    # "Quit" (third row) closes this tray only: the agent is not told to quit.
    popup = open_menu(screen, icon)
    screen.click_window(popup, dy=2 * ROW_HEIGHT + ROW_HEIGHT // 2)
    assert ended(tray, log) == 0
    assert "quit" not in agent.commands
    assert icon_window(screen) is None


def test_tray_asks_again_when_the_tray_host_drops_its_icon(
    processes: Processes, display: str, screen: Screen, agent: FakeAgent, tmp_path: Path
) -> None:
    start_trayer(processes, display, tmp_path)
    log = tmp_path / "tray.log"
    tray = processes.spawn(tray_argv(agent.path.parent), log, env=tray_env(display))
    assert wait_for(lambda: icon_window(screen) is not None, timeout=15)
    # Embedded, and settled: trayer may still be moving it right after the dock, or
    # drop the first request (the tray then asks again, with a new window), so the
    # window is looked up afresh on every poll.
    since: list[float] = []
    found: list[Any] = []

    def settled() -> bool:
        window = icon_window(screen)
        if window is None or not screen.embedded(window):
            since.clear()
            return False
        found[:] = [window]
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] > 1.0

    assert wait_for(settled, timeout=15), log.read_text()
    icon = found[0]

    # What a crashed or restarted tray host leaves: our window back on the root.
    icon.reparent(screen.root, 0, 0)
    screen.display.sync()
    assert not screen.embedded(icon)
    assert wait_for(lambda: screen.embedded(icon), timeout=10), log.read_text()
    assert "asking again" in log.read_text()

    tray.send_signal(signal.SIGTERM)
    assert ended(tray, log) == 0


def test_tray_without_a_tray_host_says_why_in_one_line_and_exits_1(
    processes: Processes, display: str, agent: FakeAgent, tmp_path: Path
) -> None:
    log = tmp_path / "tray.log"
    started = time.monotonic()
    tray = processes.spawn(
        tray_argv(agent.path.parent, "--wait-host", "1"), log, env=tray_env(display)
    )
    assert ended(tray, log, timeout=15) == 1
    assert time.monotonic() - started < 10
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert "no tray icon: no system tray on display" in lines[0]
    assert "no session bus (DBUS_SESSION_BUS_ADDRESS is not set)" in lines[0]
