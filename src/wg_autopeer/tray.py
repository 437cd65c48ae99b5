"""The tray icon: a thin client of the agent's local control socket, on its own thread.

Two ways to run it:

- inside the agent (``wg-autopeer agent`` run by a desktop user, e.g. through a
  ``setcap`` launcher): the agent starts it unless ``--no-tray``; "Quit" stops
  the agent;
- as its own process for a desktop user while the agent runs as root under
  systemd: ``wg-autopeer tray`` (started by the XDG autostart entry). It needs
  the agent's ``control_group`` so the user may open the socket; "Quit" closes
  only the tray.

Both pick the same tray (``choose_tray``): a StatusNotifierItem on the session
bus (``tray_sni``, the protocol of KDE, GNOME with AppIndicator, Xfce >= 4.16,
waybar...) when a StatusNotifierWatcher is there; else the XEmbed icon for older
X11 panels (``Tray`` below: pystray's X11 backend, with ``tray_x11`` adding the
menu and clicks it lacks); else none, and one log line says why. Each backend
is imported only once it is chosen: pystray's X11 backend connects to the
display when imported. ``AgentLink`` is what both share: the commands to the
agent and the agent's state in words (``describe``).

The tray never runs as root: it belongs to a user's session (set
``WG_AUTOPEER_TRAY_ALLOW_ROOT=1`` to override that, for tests only).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

from wg_autopeer.agent import localapi

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
STOP_GRACE_SECONDS = 5.0
DEFAULT_RUNTIME_DIR = Path("/run/wg-autopeer")
ALLOW_ROOT_ENV = "WG_AUTOPEER_TRAY_ALLOW_ROOT"
STATES = ("active", "idle", "error")
MENU_ROW_HEIGHT = 26  # pixels per entry of the X11 popup menu (tray_x11)

Call = Callable[[Path, str], dict[str, Any]]
HostProbe = Callable[[Mapping[str, str]], str | None]


@dataclass(frozen=True)
class TrayView:
    """What the tray shows: a state for the icon, a title in words, the Enabled check."""

    state: str  # one of STATES
    title: str
    enabled: bool = True


NOT_RUNNING = TrayView("error", "wg-autopeer: agent not running", enabled=False)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe(status: Mapping[str, Any] | None) -> TrayView:
    """Turn the agent's status answer into the tray's title and icon state (pure).

    An error on any interface shows as the error icon even when another has
    direct peers: the user has something to look at.
    """
    if status is None or not status.get("ok", True):
        return NOT_RUNNING
    if not status.get("enabled", True):
        return TrayView("idle", "wg-autopeer: paused (direct peering off)", enabled=False)
    parts: list[str] = []
    states: set[str] = set()
    for iface in status.get("interfaces", []):
        name = iface.get("interface", "?")
        peers = iface.get("direct_peers") or []
        outcome = str(iface.get("last_outcome", ""))
        if outcome.startswith("server unreachable"):
            parts.append(f"{name}: server unreachable")
            states.add("error")
        elif outcome.startswith("answer refused"):
            parts.append(f"{name}: server answer refused")
            states.add("error")
        elif outcome.startswith(("the interface has no", "no hub peer", "cannot tell")):
            parts.append(f"{name}: {outcome}")
            states.add("error")
        elif peers:
            # Only a proven path carries traffic; the others are still on the hub.
            direct = sum(1 for p in peers if p.get("routed", True))
            waiting = len(peers) - direct
            text = f"{name}: {_plural(direct, 'direct peer')}"
            if waiting:
                text += f", {waiting} being proven"
            parts.append(text)
            states.add("active" if direct else "idle")
        elif outcome == "no default gateway":
            parts.append(f"{name}: no LAN (no default gateway)")
        else:
            parts.append(f"{name}: no LAN neighbours")
    for task, reason in (status.get("degraded") or {}).items():
        parts.append(f"degraded: {task}: {reason}")
        states.add("error")
    state = next((s for s in ("error", "active") if s in states), "idle")
    return TrayView(state, "; ".join(parts) or "wg-autopeer: no WireGuard interface")


# -- where a tray can run ------------------------------------------------------------


def x11_tray_host(env: Mapping[str, str]) -> str | None:
    """Why no XEmbed tray host serves ``env["DISPLAY"]``, or None when one does.

    A system tray owns the ``_NET_SYSTEM_TRAY_S<screen>`` selection
    (freedesktop System Tray spec). python-xlib comes with pystray and, unlike
    pystray, does not connect when imported.
    """
    name = env.get("DISPLAY", "")
    try:
        import Xlib.display
        import Xlib.error
        import Xlib.X
    except ImportError:
        return None  # cannot tell; pystray will say
    try:
        display = Xlib.display.Display(name)
    except (Xlib.error.DisplayError, OSError, ValueError, OverflowError) as exc:
        # OverflowError: python-xlib's TCP fallback for a display number above 59535.
        return f"cannot open display {name!r}: {exc}"
    try:
        atom = display.intern_atom(f"_NET_SYSTEM_TRAY_S{display.get_default_screen()}")
        owner = display.get_selection_owner(atom)
    except Xlib.error.XError as exc:
        return f"cannot ask display {name!r} for a system tray: {exc}"
    finally:
        display.close()
    if getattr(owner, "id", owner) == Xlib.X.NONE:
        return f"no system tray on display {name!r} (no _NET_SYSTEM_TRAY selection owner)"
    return None


def x11_embedded(env: Mapping[str, str], window_id: int) -> bool | None:
    """Whether X11 window ``window_id`` sits inside another window (a tray host's
    socket) rather than on the root; None when that cannot be told, or no tray
    host is there to embed it."""
    if x11_tray_host(env) is not None:
        return None
    try:
        import Xlib.display
        import Xlib.error
    except ImportError:
        return None
    try:
        display = Xlib.display.Display(env.get("DISPLAY", ""))
    except (Xlib.error.DisplayError, OSError, ValueError, OverflowError):
        return None
    try:
        tree = display.create_resource_object("window", window_id).query_tree()
        return bool(tree.parent.id != display.screen().root.id)
    except Xlib.error.XError:
        return None
    finally:
        display.close()


def sni_host(env: Mapping[str, str]) -> str | None:
    """Why no StatusNotifierItem host serves the session bus of ``env``, or None
    when one does (``tray_sni`` asks the bus; imported only now, like pystray)."""
    try:
        from wg_autopeer import tray_sni
    except ImportError as exc:  # dbus-fast is a Linux-only dependency
        return f"no D-Bus library for a StatusNotifierItem ({exc})"
    return tray_sni.watcher_absent(env)


Backend = Literal["sni", "xembed"]


@dataclass(frozen=True)
class TrayChoice:
    """Which tray runs here (``backend``), or none and ``reason`` says why;
    ``host_missing``: only a tray host was missing, so one may still appear
    (autostart races the panel)."""

    backend: Backend | None
    reason: str
    host_missing: bool = False


def choose_tray(
    env: Mapping[str, str] | None = None,
    euid: int | None = None,
    *,
    no_tray: bool = False,
    sni_probe: HostProbe = sni_host,
    x11_probe: HostProbe = x11_tray_host,
) -> TrayChoice:
    """The tray for this session: a StatusNotifierItem when a StatusNotifierWatcher
    is on the session bus (KDE, GNOME with AppIndicator, Xfce >= 4.16, waybar, ...),
    else the XEmbed icon when an X11 tray host is there (older X11 panels), else
    none, with both hosts' reasons. The cheap checks come first, the probes last.
    """
    env = os.environ if env is None else env
    if no_tray:
        return TrayChoice(None, "--no-tray")
    if (os.geteuid() if euid is None else euid) == 0 and env.get(ALLOW_ROOT_ENV) != "1":
        return TrayChoice(None, "running as root (the tray belongs to a desktop user's session)")
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        return TrayChoice(None, "no graphical session (neither DISPLAY nor WAYLAND_DISPLAY is set)")
    no_sni = sni_probe(env)
    if no_sni is None:
        return TrayChoice("sni", "a StatusNotifierWatcher is on the session bus")
    if not env.get("DISPLAY"):
        return TrayChoice(None, no_sni, host_missing=True)
    no_xembed = x11_probe(env)
    if no_xembed is None:
        return TrayChoice("xembed", f"{no_sni}; an X11 system tray is there")
    return TrayChoice(None, f"{no_xembed}; {no_sni}", host_missing=True)


# -- the icon ------------------------------------------------------------------------


@cache
def icon_image(state: str) -> Any:
    """The icon for ``state`` (a PIL image), from the PNGs shipped in resources/."""
    from PIL import Image

    if state not in STATES:
        state = "error"
    path = resources.files("wg_autopeer") / "resources" / f"wg-autopeer-{state}.png"
    with path.open("rb") as fh:
        image = Image.open(fh)
        image.load()
    return image


@dataclass(frozen=True)
class MenuEntry:
    """One menu item, independent of pystray: ``action`` names a Tray method."""

    text: str
    action: str
    checkable: bool = False
    default: bool = False  # what a click on the icon does (the only action on plain X11)


MENU = (
    MenuEntry("Re-sync", "resync", default=True),
    MenuEntry("Enabled", "toggle_enabled", checkable=True),
    MenuEntry("Quit", "quit"),
)


class AgentLink:
    """The tray's side of the agent's control socket, whatever draws the icon.

    One command at a time, then a fresh look at the agent's state; ``view`` is
    what the agent said last. Blocking (``call`` is ``localapi.call``; tests pass
    a fake): it runs on a tray's thread, never on an event loop. Each action
    returns whether the view changed, so the icon is redrawn only then.
    """

    def __init__(
        self, runtime_dir: Path, call: Call = localapi.call, *, quit_stops_agent: bool = False
    ) -> None:
        self.runtime_dir = runtime_dir
        self.quit_stops_agent = quit_stops_agent
        self.view = TrayView("idle", "wg-autopeer: starting")
        self._call = call

    def send(self, command: str) -> dict[str, Any] | None:
        try:
            return self._call(self.runtime_dir, command)
        except localapi.AgentNotRunning as exc:
            log.warning("tray: %s", exc)
            return None

    def refresh(self) -> bool:
        """Ask the agent for its state; whether what the tray shows changed."""
        try:
            status: dict[str, Any] | None = self._call(self.runtime_dir, "status")
        except localapi.AgentNotRunning as exc:
            log.debug("tray: %s", exc)
            status = None
        view = describe(status)
        changed, self.view = view != self.view, view
        return changed

    def resync(self) -> bool:
        self.send("sync")
        return self.refresh()

    def toggle_enabled(self) -> bool:
        # Ask for the opposite of what the agent last said, then show what it says now.
        self.send("disable" if self.view.enabled else "enable")
        return self.refresh()

    def quit(self) -> None:
        """What "Quit" tells the agent: to stop, only when the tray lives inside it."""
        if self.quit_stops_agent:
            self.send("quit")


class Tray:
    """The XEmbed tray: pystray's X11 icon (with ``tray_x11``'s menu) on its own thread.

    ``call`` sends one command to the agent (``localapi.call``; tests pass a
    fake). ``quit_stops_agent``: whether "Quit" also stops the agent (true when
    the tray lives inside the agent's process).
    """

    def __init__(
        self,
        runtime_dir: Path,
        call: Call = localapi.call,
        *,
        quit_stops_agent: bool = False,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.link = AgentLink(runtime_dir, call, quit_stops_agent=quit_stops_agent)
        self.poll_seconds = poll_seconds
        self.finished = threading.Event()
        self.shown = False
        self._stop = threading.Event()
        self._stop_lock = threading.Lock()
        self._icon: Any = None
        self._thread: threading.Thread | None = None

    @property
    def view(self) -> TrayView:
        return self.link.view

    @property
    def enabled(self) -> bool:
        return self.link.view.enabled

    # Menu actions: each is one command to the agent, then a fresh look at its state.
    def resync(self, *_: Any) -> None:
        self._show(self.link.resync())

    def toggle_enabled(self, *_: Any) -> None:
        self._show(self.link.toggle_enabled())

    def quit(self, *_: Any) -> None:
        self.link.quit()
        self.stop()

    def refresh(self) -> TrayView:
        """Ask the agent for its state and show it (icon, title, Enabled check)."""
        self._show(self.link.refresh())
        return self.view

    def _show(self, changed: bool) -> None:
        icon = self._icon
        if icon is not None and changed:
            view = self.view
            icon.icon = icon_image(view.state)
            icon.title = view.title
            icon.update_menu()

    def build_menu(self, pystray: Any) -> Any:
        """The pystray menu for MENU, bound to this tray's actions."""
        items = []
        for entry in MENU:
            checked = (lambda _item: self.enabled) if entry.checkable else None
            items.append(
                pystray.MenuItem(
                    entry.text, getattr(self, entry.action), checked=checked, default=entry.default
                )
            )
        return pystray.Menu(*items)

    # -- the pystray thread ---------------------------------------------------------

    def start(self) -> None:
        """Run pystray on its own thread; returns at once."""
        self._thread = threading.Thread(target=self._run, name="tray", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the tray has gone; True when it has."""
        return self.finished.wait(timeout)

    def _run(self) -> None:
        try:
            try:
                import pystray  # connects to the display: only now that a tray will run
            except Exception as exc:  # pystray raises whatever its backends raise
                log.warning("no tray icon: pystray cannot run here: %s", exc)
                return
            backend = pystray.Icon.__module__.rsplit("_", 1)[-1]
            icon_class = pystray.Icon
            if backend == "xorg":
                # pystray's own X11 icon has no menu and ignores clicks.
                from wg_autopeer.tray_x11 import MenuIcon

                icon_class = MenuIcon
            self.refresh()
            icon = icon_class(
                "wg-autopeer",
                icon_image(self.view.state),
                self.view.title,
                self.build_menu(pystray),
            )
            with self._stop_lock:
                if self._stop.is_set():
                    return
                self._icon = icon
            self.shown = True
            log.info(
                "tray icon shown (%s backend, menu: %s%s)",
                backend,
                ", ".join(e.text for e in MENU),
                "" if icon.HAS_MENU else "; no menu on this backend: a click re-syncs",
            )
            icon.run(setup=self._poll)
        except Exception:
            log.exception("tray icon failed")
        finally:
            self.finished.set()

    def _poll(self, icon: Any) -> None:
        icon.visible = True
        # A dropped first dock request is common right after the tray host starts
        # (a desktop session's autostart): look early the first time.
        delay = min(0.5, self.poll_seconds)
        while not self._stop.wait(delay):
            self.refresh()
            self._redock_if_dropped(icon)
            delay = self.poll_seconds

    def _redock_if_dropped(self, icon: Any) -> None:
        """Ask the X11 tray host again when it has not embedded our icon.

        A tray host can drop a dock request (seen with trayer right after it
        starts) or restart; pystray's X11 backend would then stay an invisible
        1x1 window for good. Hiding and showing sends a fresh request.
        """
        if not any(c.__module__ == "pystray._xorg" for c in type(icon).__mro__):
            return
        window = getattr(icon, "_window", None)  # pystray 0.19's X11 backend
        if window is None or x11_embedded(os.environ, window.id) is not False:
            return
        log.info("tray icon: the tray host has not embedded it; asking again")
        icon.visible = False
        icon.visible = True

    def stop(self) -> None:
        """Ask the icon to go and the tray thread to end; returns at once.

        Safe from any thread (a signal handler, the agent's loop, a menu action)
        and more than once. pystray's stop waits for its loop to answer, which
        never comes when the display has gone away, so it runs on a helper thread;
        ``wait`` tells when the tray has ended.
        """
        with self._stop_lock:
            if self._stop.is_set():
                return
            self._stop.set()
            icon = self._icon
        if icon is not None:
            threading.Thread(target=icon.stop, name="tray-stop", daemon=True).start()
        elif self._thread is None:
            self.finished.set()


class TrayRunner(Protocol):
    """What the agent and ``wg-autopeer tray`` need of a tray, whichever backend."""

    shown: bool

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


def make_tray(backend: Backend, runtime_dir: Path, *, quit_stops_agent: bool) -> TrayRunner:
    """The tray for ``backend``; the D-Bus one is imported only when it is chosen."""
    if backend == "sni":
        from wg_autopeer.tray_sni import SniTray

        return SniTray(runtime_dir, quit_stops_agent=quit_stops_agent)
    return Tray(runtime_dir, quit_stops_agent=quit_stops_agent)


def start_tray_if_possible(runtime_dir: Path, *, no_tray: bool = False) -> TrayRunner | None:
    """Start the tray inside the agent, or log in one line why not and return None."""
    choice = choose_tray(no_tray=no_tray)
    if choice.backend is None:
        log.info("no tray icon: %s", choice.reason)
        return None
    log.debug("tray: %s (%s)", choice.backend, choice.reason)
    tray = make_tray(choice.backend, runtime_dir, quit_stops_agent=True)
    tray.start()
    return tray


# -- ``wg-autopeer tray``: the tray as its own process for a desktop user ----------------


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "tray",
        help="show a tray icon for the running agent (desktop user)",
        description=(
            "Show the agent's state in the system tray and drive it from the menu. "
            "The user needs access to the agent's control socket (agent config "
            "control_group). Never runs as root."
        ),
    )
    parser.add_argument(
        "--runtime-dir",
        type=Path,
        default=DEFAULT_RUNTIME_DIR,
        metavar="DIR",
        help=f"the agent's runtime dir, with its control socket (default {DEFAULT_RUNTIME_DIR})",
    )
    parser.add_argument(
        "--wait-host",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for the desktop's tray to appear (autostart races the panel)",
    )
    parser.set_defaults(run=run)


def _wait_for_host(wait: float) -> TrayChoice:
    """choose_tray, asking the hosts again until ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        choice = choose_tray()
        if not choice.host_missing or time.monotonic() >= deadline:
            return choice
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    """``wg-autopeer tray``: exit 1 (one log line) when no tray can run here."""
    choice = _wait_for_host(args.wait_host)
    if choice.backend is None:
        log.warning("no tray icon: %s", choice.reason)
        return 1
    log.debug("tray: %s (%s)", choice.backend, choice.reason)
    tray = make_tray(choice.backend, args.runtime_dir, quit_stops_agent=False)

    asked_to_stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        asked_to_stop.set()
        tray.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    tray.start()
    # Wake up now and then so the signal handler runs promptly on the main thread.
    while not tray.wait(1.0):
        if asked_to_stop.is_set() and not tray.wait(STOP_GRACE_SECONDS):
            log.warning("tray did not stop within %.0f s; leaving anyway", STOP_GRACE_SECONDS)
            break
    return 0 if tray.shown or asked_to_stop.is_set() else 1
