"""The StatusNotifierItem tray on Wayland: ``wg-autopeer tray`` in waybar on headless sway.

sway (wlroots' headless backend: no GPU, no screen) with waybar's tray module
(Debian 12's waybar 0.9: its own StatusNotifierWatcher and host) on a private
session bus, the real ``wg-autopeer tray`` command with only WAYLAND_DISPLAY set
(no X11 at all, so only the StatusNotifierItem can serve it), and a fake agent on
a real control socket. Screenshots with grim. sway refuses to run as root: a
root test runs sway, waybar and grim as nobody (desktopkit).

Headless sway has no pointer for clients, so clicks go the way a host sends
them: dbusmenu ``Event`` and ``Activate`` over D-Bus; the clicks of a real host
are in test_tray_sni_xfce.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from desktopkit import (
    GREEN,
    GREY,
    RED,
    FakeAgent,
    Processes,
    Wayland,
    click_entry,
    dbus_call,
    menu_rows,
    near_mask,
    our_item,
    share_of,
    status,
    sway_desktop,
    sway_missing,
)
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.tray_sni import ITEM_INTERFACE, ITEM_PATH

MISSING = sway_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

BAR_HEIGHT = 30
Box = tuple[int, int, int, int]


@pytest.fixture
def wayland(tmp_path: Path) -> Iterator[Wayland]:
    with sway_desktop(Processes(), tmp_path) as session:
        yield session


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "run")
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def icon_box(wayland: Wayland, colour: tuple[int, int, int]) -> Box | None:
    """Where waybar draws an icon of ``colour`` in the bar (at least 10x10), if it does."""
    shot = wayland.grab()
    box = near_mask(shot.crop((0, 0, shot.width, BAR_HEIGHT)), colour).getbbox()
    if box is None or box[2] - box[0] < 10 or box[3] - box[1] < 10:
        return None
    return box


def icon_is(wayland: Wayland, box: Box, colour: tuple[int, int, int]) -> bool:
    return share_of(wayland.grab().crop(box), colour) > 0.3


def start_tray(wayland: Wayland, agent: FakeAgent) -> tuple[subprocess.Popen[bytes], Path]:
    log = wayland.logs / "tray.log"
    # Our own user (root in CI: the documented test-only override), not nobody: the
    # tray needs only the bus and the agent's socket, not the compositor.
    env = {
        "PATH": wayland.env["PATH"],
        "WAYLAND_DISPLAY": wayland.env["WAYLAND_DISPLAY"],
        "DBUS_SESSION_BUS_ADDRESS": wayland.bus.address,
        "WG_AUTOPEER_TRAY_ALLOW_ROOT": "1",
        "PYTHONFAULTHANDLER": "1",
    }
    argv = [sys.executable, "-m", "wg_autopeer", "-v", "tray"]
    argv += ["--runtime-dir", str(agent.path.parent)]
    return wayland.processes.spawn(argv, log, env=env), log


def test_sni_icon_in_waybar_on_sway_follows_the_agent_and_bar_restarts(
    wayland: Wayland, agent: FakeAgent
) -> None:
    address = wayland.bus.address
    wayland.start_bar()
    tray, log = start_tray(wayland, agent)
    assert wait_for(lambda: our_item(address), timeout=20), log.read_text()
    assert wait_for(lambda: icon_box(wayland, GREEN), timeout=15), log.read_text()
    item, box = our_item(address), icon_box(wayland, GREEN)
    assert item is not None
    assert box is not None
    wayland.save("tray-sni-waybar-active")
    assert menu_rows(address, item) == [("Re-sync", None), ("Enabled", 1), ("Quit", None)]

    # What waybar sends on a left click (Activate) and on the menu's entries.
    dbus_call(address, item, ITEM_PATH, ITEM_INTERFACE, "Activate", "ii", 0, 0)
    assert wait_for(lambda: "sync" in agent.commands, timeout=10)
    click_entry(address, item, 2)
    assert wait_for(lambda: "disable" in agent.commands, timeout=10)
    assert wait_for(lambda: icon_is(wayland, box, GREY), timeout=10), log.read_text()

    # The bar goes and comes back; meanwhile the agent's server became unreachable.
    wayland.stop_bar()
    agent.status = status("server unreachable: timed out", peers=2)
    wayland.start_bar()
    assert wait_for(lambda: our_item(address), timeout=20), log.read_text()
    assert wait_for(lambda: icon_box(wayland, RED), timeout=15), log.read_text()
    assert "registered again" in log.read_text()
    wayland.save("tray-sni-waybar-after-restart")

    tray.send_signal(signal.SIGTERM)
    assert tray.wait(timeout=10) == 0
    assert "quit" not in agent.commands
