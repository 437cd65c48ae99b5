"""A small desktop for the tray tests, imported by name (``from desktopkit import ...``).

Real pieces only: a virtual X display (Xvfb), a private D-Bus session bus
(dbus-daemon with a config of our own: no service activation, so every process
on it was started here), Xfce's settings daemon and panel, and a fake agent
answering on a real control socket. Every process is a child of the test,
ended by its PID in teardown (with the children it spawned, e.g. the panel's
plugin wrappers), never by name. Nothing touches the host's session bus or
the user's home: the desktop gets a HOME and XDG dirs under the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from PIL import Image, ImageChops, ImageGrab

from wg_autopeer.agent.localapi import socket_path
from wg_autopeer.agent.localserver import LocalApiServer
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.tray_sni import ITEM_PATH, MENU_INTERFACE, MENU_PATH, WATCHER, WATCHER_PATH

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
GREEN, GREY, RED = (46, 160, 67), (140, 140, 140), (200, 40, 40)


# -- processes ---------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a
    process from a later one that reuses its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def descendants(pid: int) -> list[tuple[int, str]]:
    """The processes below ``pid`` (children first), each with its start time."""
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    started = _start_time(int(child))
                    if started is not None:
                        found.append((int(child), started))
                        todo.append(int(child))
    return found


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

    def end(self, proc: subprocess.Popen[bytes]) -> None:
        """End ``proc`` and then whatever it started that outlived it, by PID."""
        below = descendants(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for pid, started in below:
            if _start_time(pid) == started:  # the same process, not a reused PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for pid, started in below:
            if not wait_for(lambda p=pid, s=started: _start_time(p) != s, timeout=5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def end_all(self) -> None:
        for proc in reversed(self.started):
            self.end(proc)


@contextlib.contextmanager
def processes_ended() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.end_all()


def start_xvfb(processes: Processes, log: Path, size: str = "400x120x24") -> str:
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
                size,
                "-nolisten",
                "tcp",
                # No server reset when the last client leaves: a client connecting
                # during a reset is refused ("cannot open display").
                "-noreset",
            ],
            log,
            pass_fds=(write_end,),
        )
        os.close(write_end)
        write_end = -1
        number = _read_line(read_end, "Xvfb")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert number.isdigit(), f"Xvfb said {number!r}"
    return f":{number}"


def _read_line(fd: int, who: str, timeout: float = 15) -> str:
    # Daemons write a line in pieces, and some die if the pipe closes in between:
    # read up to the newline.
    said = b""
    deadline = time.monotonic() + timeout
    while not said.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 256) if ready else b""
        if not chunk:
            break
        said += chunk
    assert said.endswith(b"\n"), f"{who} said {said!r}"
    return said.decode().strip()


# A session bus of our own: no <servicedir>, so nothing is activated behind the
# test's back (every name is owned by a process the test started).
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">{users}
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@dataclass
class Bus:
    """A private session bus: its address, and the directory of its socket."""

    address: str
    directory: Path


@contextlib.contextmanager
def private_bus(log: Path) -> Iterator[Bus]:
    """A private dbus-daemon, ended by PID (with its socket's temp dir) afterwards."""
    procs = Processes()
    bus: Bus | None = None
    try:
        bus = start_bus(procs, log)
        yield bus
    finally:
        procs.end_all()
        if bus is not None:
            shutil.rmtree(bus.directory, ignore_errors=True)


def start_bus(processes: Processes, log: Path, *, other_users: bool = False) -> Bus:
    """A private dbus-daemon; its address. The socket lives in a short temp dir (a
    unix socket path has ~108 bytes); the caller removes it after the daemon ends.
    ``other_users``: let processes of other users on too (a compositor that
    refuses to run as root, run by a root test as nobody)."""
    directory = Path(tempfile.mkdtemp(prefix="wgap-bus-"))
    config = directory / "bus.conf"
    users = '\n    <allow user="*"/>' if other_users else ""
    config.write_text(BUS_CONFIG.format(socket=directory / "bus", users=users))
    read_end, write_end = os.pipe()
    try:
        processes.spawn(
            [
                "dbus-daemon",
                f"--config-file={config}",
                "--nofork",
                "--nopidfile",
                f"--print-address={write_end}",
            ],
            log,
            pass_fds=(write_end,),
        )
        os.close(write_end)
        write_end = -1
        address = _read_line(read_end, "dbus-daemon")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if other_users:
        directory.chmod(0o755)
        (directory / "bus").chmod(0o666)
    return Bus(address, directory)


def name_owner(address: str, name: str) -> str | None:
    """Who owns ``name`` on the bus at ``address`` (a blocking look, for polls)."""

    async def ask() -> str | None:
        bus = await MessageBus(bus_address=address).connect()
        try:
            reply = await bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="GetNameOwner",
                    signature="s",
                    body=[name],
                )
            )
        finally:
            bus.disconnect()
        return None if reply.message_type == MessageType.ERROR else str(reply.body[0])

    return asyncio.run(ask())


# -- D-Bus, as a tray host sees it -------------------------------------------------------------


def dbus_call(
    address: str,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    *body: Any,
) -> list[Any]:
    """One method call on the desktop's bus from a connection of the test's own."""

    async def call() -> list[Any]:
        bus = await MessageBus(bus_address=address).connect()
        try:
            reply = await bus.call(
                Message(
                    destination=destination,
                    path=path,
                    interface=interface,
                    member=member,
                    signature=signature,
                    body=list(body),
                )
            )
        finally:
            bus.disconnect()
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return list(reply.body)

    return asyncio.run(call())


def registered(address: str) -> list[str]:
    """The items the host's StatusNotifierWatcher knows ("bus name/path")."""
    if name_owner(address, WATCHER) is None:
        return []
    (value,) = dbus_call(
        address,
        WATCHER,
        WATCHER_PATH,
        "org.freedesktop.DBus.Properties",
        "Get",
        "ss",
        WATCHER,
        "RegisteredStatusNotifierItems",
    )
    return list(value.value)


def our_item(address: str) -> str | None:
    """Our item's bus name, once the host's watcher has it."""
    names = [i.split("/")[0] for i in registered(address) if i.endswith(ITEM_PATH)]
    return names[0] if len(names) == 1 else None


def menu_rows(address: str, item: str) -> list[tuple[str, int | None]]:
    """GetLayout, as the host asks it: each entry's label and toggle state."""
    _revision, layout = dbus_call(
        address, item, MENU_PATH, MENU_INTERFACE, "GetLayout", "iias", 0, -1, []
    )
    rows = []
    for child in layout[2]:
        props = child.value[1]
        state = props.get("toggle-state")
        rows.append((props["label"].value, None if state is None else state.value))
    return rows


def click_entry(address: str, item: str, entry: int) -> None:
    """What a host sends when an entry of the menu is clicked."""
    dbus_call(
        address,
        item,
        MENU_PATH,
        MENU_INTERFACE,
        "Event",
        "isvu",
        entry,
        "clicked",
        Variant("s", ""),
        0,
    )


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

    def embedded(self, window: Any) -> bool:
        """XEmbed: inside the tray host's socket window, not on the root."""
        parent = window.query_tree().parent
        return bool(parent.id != self.root.id)

    def box(self, window: Any) -> tuple[int, int, int, int]:
        geometry = window.get_geometry()
        origin = self.root.translate_coords(window, 0, 0)
        return origin.x, origin.y, geometry.width, geometry.height

    def click(self, x: int, y: int, button: int = 1) -> None:
        import Xlib.X
        from Xlib.ext import xtest

        xtest.fake_input(self.display, Xlib.X.MotionNotify, x=x, y=y)
        self.display.sync()
        xtest.fake_input(self.display, Xlib.X.ButtonPress, button)
        xtest.fake_input(self.display, Xlib.X.ButtonRelease, button)
        self.display.sync()

    def click_window(self, window: Any, dy: int | None = None) -> None:
        x, y, w, h = self.box(window)
        self.click(x + w // 2, y + (h // 2 if dy is None else dy))

    def grab(self) -> Image.Image:
        return ImageGrab.grab(xdisplay=self.name)

    def colour_share(self, window: Any, colour: tuple[int, int, int]) -> float:
        """Which share of ``window``'s pixels are close to ``colour``."""
        x, y, w, h = self.box(window)
        return share_of(self.grab().crop((x, y, x + w, y + h)), colour)

    def colour_box(
        self, colour: tuple[int, int, int], area: tuple[int, int, int, int] | None = None
    ) -> tuple[int, int, int, int] | None:
        """The bounding box (left, top, right, bottom) of the pixels near ``colour``
        in ``area`` of the screen, or None when there are none."""
        shot = self.grab().convert("RGB")
        if area is not None:
            shot = shot.crop(area)
        box = near_mask(shot, colour).getbbox()
        if box is None or area is None:
            return box
        return box[0] + area[0], box[1] + area[1], box[2] + area[0], box[3] + area[1]

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


def near_mask(image: Image.Image, colour: tuple[int, int, int], within: int = 40) -> Image.Image:
    """A mode "L" mask: 255 where ``image``'s pixel is within ``within`` of ``colour``
    in each channel."""
    bands = image.convert("RGB").split()
    masks = [
        band.point(lambda v, c=c: 255 if abs(v - c) < within else 0)
        for band, c in zip(bands, colour, strict=True)
    ]
    # The darker of 0/255 masks is their AND.
    return ImageChops.darker(ImageChops.darker(masks[0], masks[1]), masks[2])


def share_of(image: Image.Image, colour: tuple[int, int, int]) -> float:
    """Which share of ``image``'s pixels are near ``colour``."""
    mask = near_mask(image, colour)
    return mask.histogram()[255] / max(1, mask.width * mask.height)


# -- Xfce's panel: the real StatusNotifierItem host --------------------------------------------


# One panel along the top with one plugin: the Status Tray ("systray"), which is
# both the StatusNotifierWatcher and the host (and an XEmbed tray). A fixed
# config, so the panel asks no first-run question.
PANEL_XML = """<?xml version="1.0" encoding="UTF-8"?>
<channel name="xfce4-panel" version="1.0">
  <property name="configver" type="int" value="2"/>
  <property name="panels" type="array">
    <value type="int" value="1"/>
    <property name="panel-1" type="empty">
      <property name="position" type="string" value="p=6;x=0;y=0"/>
      <property name="length" type="uint" value="100"/>
      <property name="position-locked" type="bool" value="true"/>
      <property name="size" type="uint" value="{size}"/>
      <property name="icon-size" type="uint" value="0"/>
      <property name="plugin-ids" type="array">
        <value type="int" value="1"/>
      </property>
    </property>
  </property>
  <property name="plugins" type="empty">
    <property name="plugin-1" type="string" value="systray">
      <property name="square-icons" type="bool" value="true"/>
    </property>
  </property>
</channel>
"""

XFCONFD_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/xfce4/xfconf/xfconfd",
    "/usr/lib/aarch64-linux-gnu/xfce4/xfconf/xfconfd",
    "/usr/lib/xfce4/xfconf/xfconfd",
)


def xfconfd_path() -> str | None:
    found = [p for p in XFCONFD_CANDIDATES if Path(p).is_file()]
    if not found:
        found = [str(p) for p in Path("/usr/lib").glob("*/xfce4/xfconf/xfconfd")]
    return found[0] if found else None


def xfce_missing() -> str | None:
    """What is missing for the Xfce tests, or None."""
    for tool in ("Xvfb", "dbus-daemon", "xfce4-panel"):
        if shutil.which(tool) is None:
            return (
                f"needs {tool} (Debian packages xvfb, dbus-daemon, xfce4-panel: scripts/setup.sh)"
            )
    if xfconfd_path() is None:
        return "needs xfconfd (Debian package xfconf: scripts/setup.sh)"
    return None


@dataclass
class Desktop:
    """Xvfb + a private session bus + xfconfd (+ the panel, started by the test)."""

    processes: Processes
    tmp: Path
    display: str
    bus: Bus
    env: dict[str, str]
    panel: subprocess.Popen[bytes] | None = None

    def start_panel(self, size: int = 32) -> subprocess.Popen[bytes]:
        """Start xfce4-panel and wait until its Status Tray is the StatusNotifierWatcher."""
        channel = Path(self.env["XDG_CONFIG_HOME"], "xfce4/xfconf/xfce-perchannel-xml")
        channel.mkdir(parents=True, exist_ok=True)
        (channel / "xfce4-panel.xml").write_text(PANEL_XML.format(size=size))
        # Without a window manager the panel would wait for one first.
        self.panel = self.processes.spawn(
            ["xfce4-panel", "--disable-wm-check"], self.tmp / "panel.log", env=self.env
        )
        assert wait_for(self.watcher, timeout=30), (self.tmp / "panel.log").read_text()
        return self.panel

    def stop_panel(self) -> None:
        """End the panel and its plugin wrappers by PID; the watcher goes with them."""
        assert self.panel is not None
        self.processes.end(self.panel)
        self.panel = None
        assert wait_for(lambda: self.watcher() is None, timeout=10)

    def watcher(self) -> str | None:
        return name_owner(self.bus.address, "org.kde.StatusNotifierWatcher")


@contextlib.contextmanager
def xfce_desktop(processes: Processes, tmp: Path, size: str = "480x240x24") -> Iterator[Desktop]:
    """A desktop for one test: everything ended by PID and removed afterwards."""
    bus: Bus | None = None
    try:
        display = start_xvfb(processes, tmp / "xvfb.log", size)
        bus = start_bus(processes, tmp / "dbus.log")
        home = tmp / "home"
        runtime = tmp / "xdg-runtime"
        for d in (home, runtime):
            d.mkdir(mode=0o700)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_DATA_HOME": str(home / ".local/share"),
            "XDG_RUNTIME_DIR": str(runtime),
            "DISPLAY": display,
            "DBUS_SESSION_BUS_ADDRESS": bus.address,
            # No accessibility bus or dconf: they would be more daemons on the bus.
            "NO_AT_BRIDGE": "1",
            "GSETTINGS_BACKEND": "memory",
        }
        xfconfd = xfconfd_path()
        assert xfconfd is not None
        processes.spawn([xfconfd], tmp / "xfconfd.log", env=env)
        address = bus.address
        assert wait_for(lambda: name_owner(address, "org.xfce.Xfconf"), timeout=15), (
            tmp / "xfconfd.log"
        ).read_text()
        yield Desktop(processes, tmp, display, bus, env)
    finally:
        processes.end_all()
        if bus is not None:
            shutil.rmtree(bus.directory, ignore_errors=True)


# -- sway (headless) and waybar: a Wayland StatusNotifierItem host --------------------------------


WAYBAR_CONFIG = """{
  "layer": "top", "position": "top", "height": 30,
  "modules-left": [], "modules-center": [], "modules-right": ["tray"],
  "tray": {"icon-size": 22, "spacing": 4}
}
"""


def sway_missing() -> str | None:
    """What is missing for the sway/waybar tests, or None."""
    for tool in ("dbus-daemon", "sway", "waybar", "grim", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian packages sway, waybar, grim: scripts/setup.sh)"
    return None


@dataclass
class Wayland:
    """Headless sway + a private session bus (+ waybar, started by the test).

    sway refuses to run as root; a root test runs the compositor, the bar and the
    screenshots as nobody (``run_as``), our tray stays the test's own user.
    """

    processes: Processes
    logs: Path
    work: Path
    bus: Bus
    env: dict[str, str]
    run_as: list[str]
    bar: subprocess.Popen[bytes] | None = None

    def start_bar(self) -> subprocess.Popen[bytes]:
        """Start waybar (its tray module is the StatusNotifierWatcher and host)."""
        config = self.work / "waybar.json"
        config.write_text(WAYBAR_CONFIG)
        config.chmod(0o644)
        log = self.logs / "waybar.log"
        argv = [*self.run_as, "waybar", "-c", str(config)]
        self.bar = self.processes.spawn(argv, log, env=self.env)
        assert wait_for(self.watcher, timeout=30), log.read_text()
        return self.bar

    def stop_bar(self) -> None:
        assert self.bar is not None
        self.processes.end(self.bar)
        self.bar = None
        assert wait_for(lambda: self.watcher() is None, timeout=10)

    def watcher(self) -> str | None:
        return name_owner(self.bus.address, "org.kde.StatusNotifierWatcher")

    def grab(self) -> Image.Image:
        """A screenshot of the whole output (grim, wlroots' screencopy)."""
        shot = subprocess.run(
            [*self.run_as, "grim", "-t", "png", "-"],
            env=self.env,
            capture_output=True,
            timeout=15,
            check=True,
        )
        image = Image.open(io.BytesIO(shot.stdout))
        image.load()
        return image.convert("RGB")

    def save(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.grab().save(path)
        return path


@contextlib.contextmanager
def sway_desktop(processes: Processes, tmp: Path) -> Iterator[Wayland]:
    """Headless sway on a private bus for one test; everything ended by PID.

    Logs go to ``tmp``; what nobody must read or write (configs, HOME,
    XDG_RUNTIME_DIR) goes to a temp dir of its own (pytest's is root's alone),
    removed afterwards."""
    run_as = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if os.geteuid() != 0:
        run_as = []
    bus: Bus | None = None
    work = Path(tempfile.mkdtemp(prefix="wgap-sway-"))
    try:
        work.chmod(0o755)
        bus = start_bus(processes, tmp / "dbus.log", other_users=bool(run_as))
        home = work / "home"
        runtime = work / "xdg-runtime"
        for d in (home, runtime):
            d.mkdir(mode=0o700)
            if run_as:
                os.chown(d, 65534, 65534)
        config = work / "sway.conf"
        config.write_text("output HEADLESS-1 resolution 480x120 bg #333333 solid_color\n")
        config.chmod(0o644)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_RUNTIME_DIR": str(runtime),
            "DBUS_SESSION_BUS_ADDRESS": bus.address,
            # wlroots without a GPU, screen or input devices: one virtual output.
            "WLR_BACKENDS": "headless",
            "WLR_HEADLESS_OUTPUTS": "1",
            "WLR_LIBINPUT_NO_DEVICES": "1",
            "WLR_RENDERER": "pixman",
            "NO_AT_BRIDGE": "1",
            "GSETTINGS_BACKEND": "memory",
        }
        processes.spawn([*run_as, "sway", "-c", str(config)], tmp / "sway.log", env=env)

        def socket() -> Path | None:
            found = [p for p in runtime.glob("wayland-*") if p.is_socket()]
            return found[0] if found else None

        assert wait_for(socket, timeout=20), (tmp / "sway.log").read_text()
        wayland = socket()
        assert wayland is not None
        env["WAYLAND_DISPLAY"] = wayland.name
        yield Wayland(processes, tmp, work, bus, env, run_as)
    finally:
        processes.end_all()
        if bus is not None:
            shutil.rmtree(bus.directory, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
