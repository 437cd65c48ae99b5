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

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageGrab

from wg_autopeer.agent.localapi import LocalApiServer, socket_path
from wg_autopeer.lab.lab import wait_for
from wg_autopeer.tray import MENU_ROW_HEIGHT as ROW_HEIGHT
from wg_autopeer.tray import x11_tray_host

pytestmark = pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("trayer")),
    reason="needs Xvfb and trayer (Debian packages xvfb, trayer: scripts/setup.sh)",
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
GREEN, GREY, RED = (46, 160, 67), (140, 140, 140), (200, 40, 40)


# -- processes ---------------------------------------------------------------------------


@dataclass
class Processes:
    """Children of this test, ended by PID (never by name) in teardown."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                **kw,
            )
        self.started.append(proc)
        return proc

    def end_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.end_all()


@pytest.fixture
def display(processes: Processes, tmp_path: Path) -> str:
    """A fresh Xvfb; its display name (Xvfb picks a free number itself)."""
    read_end, write_end = os.pipe()
    try:
        processes.spawn(
            [
                "Xvfb",
                "-displayfd",
                str(write_end),
                "-screen",
                "0",
                "400x120x24",
                "-nolisten",
                "tcp",
                # No server reset when the last client leaves: a client connecting
                # during a reset is refused ("cannot open display").
                "-noreset",
            ],
            tmp_path / "xvfb.log",
            pass_fds=(write_end,),
        )
        os.close(write_end)
        # Xvfb writes the number and the newline separately, and dies if the pipe
        # is closed in between: read up to the newline.
        said = b""
        deadline = time.monotonic() + 15
        while not said.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(read_end, 64) if ready else b""
            if not chunk:
                break
            said += chunk
        number = said.decode().strip()
    finally:
        os.close(read_end)
    assert number.isdigit(), f"Xvfb said {number!r}"
    return f":{number}"


# -- a fake agent on a real control socket ------------------------------------------------


def status(
    outcome: str = "ok: 2 neighbour(s), 0 refused", peers: int = 2, enabled: bool = True
) -> dict[str, Any]:
    return {
        "ok": True,
        "version": 1,
        "enabled": enabled,
        "started_at": 0.0,
        "interfaces": [
            {
                "interface": "wg0",
                "last_outcome": outcome,
                "direct_peers": [{"public_key": f"k{i}"} for i in range(peers)],
            }
        ],
    }


class FakeAgent:
    """Answers the control socket from its own thread; records every command."""

    def __init__(self, runtime_dir: Path) -> None:
        self.path = socket_path(runtime_dir)
        self.commands: list[str] = []
        self.status = status()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: LocalApiServer | None = None

    async def _handle(self, command: str) -> dict[str, Any]:
        self.commands.append(command)
        if command == "status":
            return self.status
        if command in ("enable", "disable"):
            self.status = {**self.status, "enabled": command == "enable"}
        return {"ok": True}

    def start(self) -> None:
        self._thread.start()
        self._server = LocalApiServer(self.path, self._handle)
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(5)

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "run")
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


# -- looking at the screen -----------------------------------------------------------------


class Screen:
    """python-xlib on the test's display: the window tree, clicks (XTest), pixels."""

    def __init__(self, name: str) -> None:
        import Xlib.display

        self.name = name
        self.display = Xlib.display.Display(name)
        self.root = self.display.screen().root

    def close(self) -> None:
        self.display.close()

    def _walk(self, window: Any) -> Iterator[Any]:
        import Xlib.error

        try:
            children = window.query_tree().children
        except Xlib.error.XError:
            return
        for child in children:
            yield child
            yield from self._walk(child)

    def find(self, predicate: Callable[[Any], bool]) -> Any:
        import Xlib.error

        for window in self._walk(self.root):
            with contextlib.suppress(Xlib.error.XError):
                if predicate(window):
                    return window
        return None

    def icon_window(self) -> Any:
        return self.find(lambda w: (w.get_wm_class() or ("", ""))[1] == "wg-autopeer")

    def popup_window(self) -> Any:
        return self.find(
            lambda w: (
                w.get_wm_name() == "wg-autopeer menu" and w.get_attributes().map_state == 2
            )  # IsViewable
        )

    def embedded(self, window: Any) -> bool:
        """XEmbed: inside the tray host's socket window, not on the root."""
        parent = window.query_tree().parent
        return bool(parent.id != self.root.id)

    def box(self, window: Any) -> tuple[int, int, int, int]:
        geometry = window.get_geometry()
        origin = self.root.translate_coords(window, 0, 0)
        return origin.x, origin.y, geometry.width, geometry.height

    def click(self, x: int, y: int) -> None:
        import Xlib.X
        from Xlib.ext import xtest

        xtest.fake_input(self.display, Xlib.X.MotionNotify, x=x, y=y)
        self.display.sync()
        xtest.fake_input(self.display, Xlib.X.ButtonPress, 1)
        xtest.fake_input(self.display, Xlib.X.ButtonRelease, 1)
        self.display.sync()

    def click_window(self, window: Any, dy: int | None = None) -> None:
        x, y, w, h = self.box(window)
        self.click(x + w // 2, y + (h // 2 if dy is None else dy))

    def grab(self) -> Image.Image:
        return ImageGrab.grab(xdisplay=self.name)

    def colour_share(self, window: Any, colour: tuple[int, int, int]) -> float:
        """Which share of ``window``'s pixels are close to ``colour``."""
        x, y, w, h = self.box(window)
        data = self.grab().convert("RGB").crop((x, y, x + w, y + h)).tobytes()
        pixels = [data[i : i + 3] for i in range(0, len(data), 3)]
        near = sum(
            1 for p in pixels if all(abs(a - b) < 40 for a, b in zip(p, colour, strict=True))
        )
        return near / max(1, len(pixels))

    def save(self, name: str, window: Any = None) -> Path:
        """A screenshot in artifacts/; with ``window``, also a 4x crop around it."""
        ARTIFACTS.mkdir(exist_ok=True)
        shot = self.grab()
        path = ARTIFACTS / f"{name}.png"
        shot.save(path)
        if window is not None:
            x, y, w, h = self.box(window)
            left, top = max(0, x - 40), max(0, y - 10)
            crop = shot.crop(
                (left, top, min(shot.width, x + w + 200), min(shot.height, y + h + 100))
            )
            crop.resize((crop.width * 3, crop.height * 3), Image.NEAREST).save(
                ARTIFACTS / f"{name}-zoom.png"
            )
        return path


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
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY",)}
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
        if wait_for(screen.popup_window, timeout=3):
            return screen.popup_window()
    raise AssertionError("the menu never opened")


# -- the tests ------------------------------------------------------------------------------


def test_tray_icon_is_embedded_shows_state_and_its_menu_drives_the_agent(
    processes: Processes, display: str, screen: Screen, agent: FakeAgent, tmp_path: Path
) -> None:
    start_trayer(processes, display, tmp_path)
    log = tmp_path / "tray.log"
    tray = processes.spawn(tray_argv(agent.path.parent), log, env=tray_env(display))

    def icon_shown(title: str) -> Any:
        window = screen.icon_window()
        if window is None or not screen.embedded(window) or window.get_wm_name() != title:
            return None
        return window

    assert wait_for(lambda: icon_shown("wg0: 2 direct peers"), timeout=15), log.read_text()
    # The same window throughout, embedded or re-embedded.
    icon = screen.icon_window()
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
    assert wait_for(lambda: screen.popup_window() is None, timeout=5)
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
    assert screen.icon_window() is None


def test_tray_asks_again_when_the_tray_host_drops_its_icon(
    processes: Processes, display: str, screen: Screen, agent: FakeAgent, tmp_path: Path
) -> None:
    start_trayer(processes, display, tmp_path)
    log = tmp_path / "tray.log"
    tray = processes.spawn(tray_argv(agent.path.parent), log, env=tray_env(display))
    assert wait_for(lambda: screen.icon_window() is not None, timeout=15)
    # Embedded, and settled: trayer may still be moving it right after the dock, or
    # drop the first request (the tray then asks again, with a new window), so the
    # window is looked up afresh on every poll.
    since: list[float] = []
    found: list[Any] = []

    def settled() -> bool:
        window = screen.icon_window()
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
