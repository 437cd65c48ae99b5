"""The tray icon: a thin client of the agent's local control socket, on its own thread.

pystray's X11 backend connects to the display when it is imported, so it is
imported only once we know a tray will run.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wg_autopeer.agent import localapi

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0


@dataclass(frozen=True)
class TrayView:
    """What the tray shows: a state word for the icon and a title in words."""

    state: str  # "active" | "idle" | "error"
    title: str


def describe(status: dict[str, Any]) -> TrayView:
    """Turn the agent's status answer into the tray's title and icon state (pure)."""
    if not status.get("enabled", True):
        return TrayView("idle", "wg-autopeer: paused")
    parts: list[str] = []
    state = "idle"
    for iface in status.get("interfaces", []):
        peers = iface.get("direct_peers") or []
        outcome = str(iface.get("last_outcome", ""))
        if outcome.startswith(("server unreachable", "answer refused")):
            parts.append(f"{iface['interface']}: server unreachable")
            state = "error" if state != "active" else state
        elif peers:
            parts.append(f"{iface['interface']}: {len(peers)} direct peer(s)")
            state = "active"
        else:
            parts.append(f"{iface['interface']}: no LAN neighbours")
    return TrayView(state, "; ".join(parts) or "wg-autopeer: no WireGuard interface")


def tray_skip_reason(env: dict[str, str] | None = None, euid: int | None = None) -> str | None:
    """Why no tray can run here, or None when one can."""
    env = dict(os.environ) if env is None else env
    if (os.geteuid() if euid is None else euid) == 0:
        return "running as root (the tray belongs to a desktop user's session)"
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        return "no graphical session (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


def draw_icon(state: str, size: int = 64) -> Any:
    """A round badge: green when direct peers are up, grey when idle, red on error."""
    from PIL import Image, ImageDraw

    colours = {"active": (46, 160, 67), "idle": (140, 140, 140), "error": (200, 40, 40)}
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, size - 4, size - 4), fill=colours.get(state, colours["idle"]))
    # Two dots joined by a line: two peers talking directly.
    r = size // 10
    left, right, mid = (size // 3, size // 2), (2 * size // 3, size // 2), size // 2
    draw.line((left, right), fill="white", width=max(2, size // 16))
    for cx, cy in (left, right):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill="white")
    del mid
    return image


class Tray:
    """Runs pystray on its own thread; menu actions go to the agent over the socket."""

    def __init__(self, runtime_dir: Path, call: Any = localapi.call) -> None:
        self.runtime_dir = runtime_dir
        self._call = call
        self._stop = threading.Event()
        self._icon: Any = None
        self.enabled = True

    # Menu actions: each is one command to the agent. Kept as methods so tests drive them.
    def resync(self, *_: Any) -> None:
        self._send("sync")

    def toggle_enabled(self, *_: Any) -> None:
        self.enabled = not self.enabled
        self._send("enable" if self.enabled else "disable")

    def quit(self, *_: Any) -> None:
        self._send("quit")
        self.stop()

    def _send(self, command: str) -> dict[str, Any] | None:
        try:
            answer: dict[str, Any] = self._call(self.runtime_dir, command)
            return answer
        except localapi.AgentNotRunning as exc:
            log.warning("tray: %s", exc)
            return None

    def refresh(self) -> TrayView:
        status = self._send("status")
        view = describe(status) if status else TrayView("error", "wg-autopeer: agent not running")
        if status is not None:
            self.enabled = bool(status.get("enabled", True))
        if self._icon is not None:
            self._icon.icon = draw_icon(view.state)
            self._icon.title = view.title
        return view

    def start(self) -> None:
        threading.Thread(target=self._run, name="tray", daemon=True).start()

    def _run(self) -> None:
        import pystray  # connects to the display: only now that a tray will run

        menu = pystray.Menu(
            pystray.MenuItem("Re-sync", self.resync),
            pystray.MenuItem("Enabled", self.toggle_enabled, checked=lambda _: self.enabled),
            pystray.MenuItem("Quit", self.quit),
        )
        self._icon = pystray.Icon("wg-autopeer", draw_icon("idle"), "wg-autopeer", menu)

        def poll(icon: Any) -> None:
            icon.visible = True
            while not self._stop.wait(POLL_SECONDS):
                self.refresh()

        self._icon.run(setup=poll)

    def stop(self) -> None:
        self._stop.set()
        if self._icon is not None:
            self._icon.stop()


def start_tray_if_possible(runtime_dir: Path) -> Tray | None:
    """Start the tray, or log in one line why not and return None."""
    reason = tray_skip_reason()
    if reason is not None:
        log.info("no tray icon: %s", reason)
        return None
    tray = Tray(runtime_dir)
    tray.start()
    return tray
