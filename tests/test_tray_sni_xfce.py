"""The StatusNotifierItem tray for real: ``wg-autopeer tray`` in Xfce's panel under Xvfb.

A virtual X display (Xvfb), a private session bus, xfconfd and xfce4-panel with
its Status Tray plugin (Debian's xfce4-panel 4.18: the StatusNotifierWatcher and
the host that draws the icon and the dbusmenu menu), the real ``wg-autopeer
tray`` command as a child process and a fake agent on a real control socket
(desktopkit). The test clicks like a user (XTest) on the icon and on the menu
the panel draws, asks the item's menu over D-Bus like a host does, and checks
the icon's pixels on screen; screenshots go to artifacts/ (not committed).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from desktopkit import (
    GREEN,
    GREY,
    RED,
    Desktop,
    FakeAgent,
    Processes,
    Screen,
    click_entry,
    menu_rows,
    our_item,
    share_of,
    status,
    xfce_desktop,
    xfce_missing,
)
from wg_autopeer.lab.netns import wait_for

MISSING = xfce_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

PANEL_SIZE = 32
Box = tuple[int, int, int, int]


@pytest.fixture
def desktop(tmp_path: Path) -> Iterator[Desktop]:
    procs = Processes()
    with xfce_desktop(procs, tmp_path) as desk:
        yield desk


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "run")
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def screen(desktop: Desktop) -> Iterator[Screen]:
    s = Screen(desktop.display)
    try:
        yield s
    finally:
        s.close()


# -- the screen -----------------------------------------------------------------------------


def panel_strip(screen: Screen) -> Box:
    width = screen.grab().width
    return 0, 0, width, PANEL_SIZE - 2  # without the panel's bottom border


def icon_box(screen: Screen, colour: tuple[int, int, int]) -> Box | None:
    """Where the panel draws an icon of ``colour``, if it does (at least 10x10 pixels)."""
    box = screen.colour_box(colour, panel_strip(screen))
    if box is None or box[2] - box[0] < 10 or box[3] - box[1] < 10:
        return None
    return box


def icon_is(screen: Screen, box: Box, colour: tuple[int, int, int]) -> bool:
    return share_of(screen.grab().crop(box), colour) > 0.3


def host_menu(screen: Screen) -> Any:
    """The menu window the panel pops up (GTK: a mapped override-redirect window)."""

    def is_menu(window: Any) -> bool:
        attributes = window.get_attributes()
        return bool(
            attributes.override_redirect
            and attributes.map_state == 2  # IsViewable
            and window.get_geometry().height > 40
        )

    return screen.find(is_menu)


def open_host_menu(screen: Screen, box: Box) -> Box:
    """Right-click the icon until the panel shows its menu; the menu's box."""
    for _ in range(3):
        screen.click((box[0] + box[2]) // 2, (box[1] + box[3]) // 2, button=3)
        if wait_for(lambda: host_menu(screen) is not None, timeout=3):
            x, y, w, h = screen.box(host_menu(screen))
            return x, y, w, h
    raise AssertionError("the panel never showed the menu")


def click_menu_row(screen: Screen, menu: Box, row: int, rows: int = 3) -> None:
    """Click row ``row`` of the host's menu: rows share its height (GTK pads the
    top and bottom alike, so a row's middle stays well inside the row)."""
    x, y, w, h = menu
    screen.click(x + w // 2, y + h * (2 * row + 1) // (2 * rows))
    assert wait_for(lambda: host_menu(screen) is None, timeout=5), "the menu stayed open"


def tray_argv(runtime_dir: Path) -> list[str]:
    return [sys.executable, "-m", "wg_autopeer", "-v", "tray", "--runtime-dir", str(runtime_dir)]


def start_tray(desktop: Desktop, agent: FakeAgent) -> tuple[subprocess.Popen[bytes], Path]:
    log = desktop.tmp / "tray.log"
    # The tray refuses root by design; CI is root: the documented test-only override.
    env = {**desktop.env, "WG_AUTOPEER_TRAY_ALLOW_ROOT": "1", "PYTHONFAULTHANDLER": "1"}
    return desktop.processes.spawn(tray_argv(agent.path.parent), log, env=env), log


def ended(tray: subprocess.Popen[bytes], log: Path, timeout: float = 10) -> int:
    """The tray's exit status; if it hangs, its threads' stacks as the failure."""
    try:
        return tray.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tray.send_signal(signal.SIGABRT)
        tray.wait(timeout=5)
        raise AssertionError(f"the tray hung:\n{log.read_text()}") from None


def shown_in_panel(
    desktop: Desktop, screen: Screen, log: Path, colour: tuple[int, int, int]
) -> tuple[str, Box]:
    """Wait until the panel's watcher lists our item and the panel draws its icon."""
    assert wait_for(lambda: our_item(desktop.bus.address), timeout=20), log.read_text()
    assert wait_for(lambda: icon_box(screen, colour), timeout=15), log.read_text()
    item, box = our_item(desktop.bus.address), icon_box(screen, colour)
    assert item is not None
    assert box is not None
    return item, box


# -- the tests --------------------------------------------------------------------------------


def test_sni_icon_in_xfce_panel_shows_state_and_its_menu_drives_the_agent(
    desktop: Desktop, screen: Screen, agent: FakeAgent
) -> None:
    desktop.start_panel(PANEL_SIZE)
    tray, log = start_tray(desktop, agent)
    item, box = shown_in_panel(desktop, screen, log, GREEN)
    assert "tray icon shown (StatusNotifierItem" in log.read_text()
    screen.save("tray-sni-active")

    # The menu as the host reads it.
    assert menu_rows(desktop.bus.address, item) == [
        ("Re-sync", None),
        ("Enabled", 1),
        ("Quit", None),
    ]

    # A left click: the panel calls Activate, which re-syncs.
    screen.click((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
    assert wait_for(lambda: "sync" in agent.commands, timeout=10), log.read_text()

    # A right click: the panel draws the menu from dbusmenu; "Enabled" (the middle
    # row) pauses the agent, the icon turns grey and the check goes.
    menu = open_host_menu(screen, box)
    screen.save("tray-sni-menu")
    click_menu_row(screen, menu, 1)
    assert wait_for(lambda: "disable" in agent.commands, timeout=10), agent.commands
    assert wait_for(lambda: icon_is(screen, box, GREY), timeout=10), log.read_text()
    assert menu_rows(desktop.bus.address, item)[1] == ("Enabled", 0)

    # The same entry through dbusmenu's Event, as any host sends it: enabled again.
    click_entry(desktop.bus.address, item, 2)
    assert wait_for(lambda: "enable" in agent.commands, timeout=10), agent.commands
    assert wait_for(lambda: icon_is(screen, box, GREEN), timeout=10)
    assert menu_rows(desktop.bus.address, item)[1] == ("Enabled", 1)
    syncs = agent.commands.count("sync")
    click_entry(desktop.bus.address, item, 1)
    assert wait_for(lambda: agent.commands.count("sync") > syncs, timeout=10)

    # The server goes away: the agent says so, the icon turns red.
    agent.status = status("server unreachable: timed out", peers=2)
    assert wait_for(lambda: icon_is(screen, box, RED), timeout=10), log.read_text()
    screen.save("tray-sni-error")

    # "Quit" through the host's menu closes this tray only; the icon leaves the panel.
    click_menu_row(screen, open_host_menu(screen, box), 2)
    assert ended(tray, log) == 0
    assert "quit" not in agent.commands
    assert wait_for(lambda: our_item(desktop.bus.address) is None, timeout=10)
    assert wait_for(lambda: icon_box(screen, RED) is None, timeout=10)


def test_sni_icon_comes_back_when_the_panel_restarts(
    desktop: Desktop, screen: Screen, agent: FakeAgent
) -> None:
    desktop.start_panel(PANEL_SIZE)
    tray, log = start_tray(desktop, agent)
    shown_in_panel(desktop, screen, log, GREEN)

    # The panel goes (ended by its PID, its plugin wrapper with it): no watcher.
    desktop.stop_panel()
    assert wait_for(lambda: "StatusNotifierWatcher went away" in log.read_text(), timeout=10), (
        log.read_text()
    )
    assert tray.poll() is None

    # A new panel: the tray sees the watcher appear and registers again.
    agent.status = status("server unreachable: timed out", peers=2)
    desktop.start_panel(PANEL_SIZE)
    item, _box = shown_in_panel(desktop, screen, log, RED)
    assert "registered again" in log.read_text()
    assert menu_rows(desktop.bus.address, item)[0] == ("Re-sync", None)
    screen.save("tray-sni-after-restart")

    tray.send_signal(signal.SIGTERM)
    assert ended(tray, log) == 0
