"""The tray as a StatusNotifierItem with a ``com.canonical.dbusmenu`` menu, on the
session bus (dbus-fast: pure-Python asyncio D-Bus, no PyGObject).

This is the tray protocol of today's desktops: KDE Plasma (X11 and Wayland),
GNOME with the AppIndicator extension, Xfce >= 4.16 (the Status Tray plugin),
Budgie, Cinnamon, sway/waybar. The item exports two objects on its own
connection and registers with ``org.kde.StatusNotifierWatcher``:

- ``/StatusNotifierItem`` (``org.kde.StatusNotifierItem``): the icon by name
  (with our resources dir as ``IconThemePath``) and as ARGB32 pixmaps, a status,
  a tooltip in words; ``Activate`` (a click) re-syncs, the host shows the menu
  on a right click (``ItemIsMenu`` false, so each host keeps its own habit);
- ``/MenuBar`` (``com.canonical.dbusmenu``): Re-sync, Enabled (a checkmark),
  Quit; the host draws it and sends ``Event(id, "clicked")``.

Everything D-Bus runs on one asyncio loop on the tray's own thread. D-Bus
handlers only put an action on a queue; one consumer runs the actions in order,
each a blocking call to the agent's control socket on a worker thread
(``AgentLink``), so the bus never waits for the agent. The watcher is followed
through ``NameOwnerChanged``: when a panel restarts, the item registers again.

Imported only when this tray is chosen (see ``tray.choose_tray``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusInt32,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt32,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.errors import DBusError
from dbus_fast.service import (
    ServiceInterface,
    dbus_method,
    dbus_property,
    dbus_signal,
)

from wg_autopeer.agent import localapi
from wg_autopeer.tray import MENU, POLL_SECONDS, AgentLink, Call, MenuEntry, TrayView, icon_image

log = logging.getLogger(__name__)

WATCHER = "org.kde.StatusNotifierWatcher"
WATCHER_PATH = "/StatusNotifierWatcher"
ITEM_INTERFACE = "org.kde.StatusNotifierItem"
ITEM_PATH = "/StatusNotifierItem"
MENU_INTERFACE = "com.canonical.dbusmenu"
MENU_PATH = "/MenuBar"
ITEM_ID = "wg-autopeer"
# Sizes a host may pick from when it draws the pixmap rather than the named icon.
PIXMAP_SIZES = (16, 22, 24, 32, 48, 64)
PROBE_TIMEOUT = 5.0

# The SNI spec's statuses; "Passive" would let hosts hide the icon, so an idle
# agent stays "Active" and only an error asks for attention.
SniStatus = Literal["Active", "Passive", "NeedsAttention"]
SNI_STATUS: dict[str, SniStatus] = {
    "active": "Active",
    "idle": "Active",
    "error": "NeedsAttention",
}

# What the tray's loop is asked to do, from D-Bus handlers and other threads.
Action = Literal["resync", "toggle_enabled", "quit", "register", "stop"]
Act = Callable[[Action], None]
MENU_ACTIONS: dict[str, Action] = {
    "resync": "resync",
    "toggle_enabled": "toggle_enabled",
    "quit": "quit",
}

Pixmap = tuple[int, int, bytes]
DBusPixmaps = Annotated[list[list[Any]], DBusSignature("a(iiay)")]
DBusToolTip = Annotated[list[Any], DBusSignature("(sa(iiay)ss)")]
DBusLayout = Annotated[list[Any], DBusSignature("u(ia{sv}av)")]
DBusGroupProperties = Annotated[list[list[Any]], DBusSignature("a(ia{sv})")]
DBusEvents = Annotated[list[list[Any]], DBusSignature("a(isvu)")]
DBusIds = Annotated[list[int], DBusSignature("ai")]
DBusIdsPair = Annotated[list[list[int]], DBusSignature("aiai")]
DBusStrings = Annotated[list[str], DBusSignature("as")]
DBusUpdated = Annotated[list[list[Any]], DBusSignature("a(ia{sv})a(ias)")]
DBusLayoutUpdated = Annotated[list[int], DBusSignature("ui")]
DBusVariantValue = Annotated[Variant, DBusSignature("v")]
# No reply values: dbus-fast reads a plain "-> None" as a missing signature.
DBusNothing = Annotated[None, DBusSignature("")]


# -- what the item and its menu say (pure) ---------------------------------------------------


def session_bus_address(env: Mapping[str, str]) -> str | None:
    """The session bus of ``env``: ``DBUS_SESSION_BUS_ADDRESS``, else systemd's
    per-user bus in ``XDG_RUNTIME_DIR`` (what libdbus and GDBus fall back to)."""
    address = env.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime, "bus").is_socket():
        return f"unix:path={Path(runtime, 'bus')}"
    return None


def argb32(image: Any, size: int) -> Pixmap:
    """``image`` scaled to ``size`` as the SNI spec's pixmap: width, height, ARGB32
    in network byte order (bytes A, R, G, B per pixel)."""
    from PIL import Image

    rgba = image.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    r, g, b, a = rgba.split()
    return size, size, Image.merge("RGBA", (a, r, g, b)).tobytes()


@cache
def pixmaps(state: str) -> tuple[Pixmap, ...]:
    """The icon for ``state`` in every size of PIXMAP_SIZES."""
    image = icon_image(state)
    return tuple(argb32(image, size) for size in PIXMAP_SIZES)


def icon_name(state: str) -> str:
    """The icon's name, as shipped in resources/ (``IconThemePath``)."""
    return f"wg-autopeer-{state}"


@cache
def icon_theme_path() -> str:
    """Where hosts find our named icons: the resources dir when it is a plain
    directory (an installed package), else "" and hosts use the pixmaps."""
    path = resources.files("wg_autopeer") / "resources"
    return str(path) if isinstance(path, Path) and path.is_dir() else ""


def tooltip(view: TrayView) -> tuple[str, list[Pixmap], str, str]:
    """The SNI tooltip: icon name, pixmaps, title, and the agent's state in words."""
    return icon_name(view.state), [], "wg-autopeer", view.title


def item_properties(entry: MenuEntry, view: TrayView) -> dict[str, Variant]:
    """One menu entry's dbusmenu properties (defaults left out, as the spec allows)."""
    props = {"label": Variant("s", entry.text)}
    if entry.checkable:
        props["toggle-type"] = Variant("s", "checkmark")
        props["toggle-state"] = Variant("i", 1 if view.enabled else 0)
    return props


def menu_ids() -> dict[int, MenuEntry]:
    """dbusmenu ids of the entries: 1, 2, 3 in MENU's order; 0 is the root."""
    return {index: entry for index, entry in enumerate(MENU, start=1)}


def menu_layout(
    view: TrayView, parent: int = 0, depth: int = -1, names: list[str] | None = None
) -> tuple[int, dict[str, Variant], list[Variant]]:
    """dbusmenu's GetLayout answer below ``parent``, ``depth`` levels deep (-1: all),
    with only the property ``names`` asked for (none asked: all)."""

    def only(props: dict[str, Variant]) -> dict[str, Variant]:
        return {k: v for k, v in props.items() if not names or k in names}

    entries = menu_ids()
    if parent in entries:
        return parent, only(item_properties(entries[parent], view)), []
    if parent != 0:
        raise DBusError("org.freedesktop.DBus.Error.InvalidArgs", f"no menu item {parent}")
    children = (
        [
            Variant("(ia{sv}av)", [index, only(item_properties(entry, view)), []])
            for index, entry in entries.items()
        ]
        if depth != 0
        else []
    )
    return 0, only({"children-display": Variant("s", "submenu")}), children


# -- the D-Bus objects ---------------------------------------------------------------------


@dataclass
class Shown:
    """What the item shows now; the tray's loop replaces ``view``, handlers read it."""

    view: TrayView
    revision: int = 1


class StatusNotifierItem(ServiceInterface):
    """``org.kde.StatusNotifierItem``: the icon, its tooltip, and clicks on it."""

    def __init__(self, shown: Shown, act: Act) -> None:
        super().__init__(ITEM_INTERFACE)
        self._shown = shown
        self._act = act

    @dbus_property(access=PropertyAccess.READ)
    def Category(self) -> DBusStr:
        return "SystemServices"

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return ITEM_ID

    @dbus_property(access=PropertyAccess.READ)
    def Title(self) -> DBusStr:
        return "wg-autopeer"

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> DBusStr:
        return SNI_STATUS[self._shown.view.state]

    @dbus_property(access=PropertyAccess.READ)
    def WindowId(self) -> DBusInt32:
        return 0

    @dbus_property(access=PropertyAccess.READ)
    def IconThemePath(self) -> DBusStr:
        return icon_theme_path()

    @dbus_property(access=PropertyAccess.READ)
    def IconName(self) -> DBusStr:
        return icon_name(self._shown.view.state)

    @dbus_property(access=PropertyAccess.READ)
    def IconPixmap(self) -> DBusPixmaps:
        return [list(p) for p in pixmaps(self._shown.view.state)]

    @dbus_property(access=PropertyAccess.READ)
    def OverlayIconName(self) -> DBusStr:
        return ""

    @dbus_property(access=PropertyAccess.READ)
    def OverlayIconPixmap(self) -> DBusPixmaps:
        return []

    @dbus_property(access=PropertyAccess.READ)
    def AttentionIconName(self) -> DBusStr:
        return icon_name("error")

    @dbus_property(access=PropertyAccess.READ)
    def AttentionIconPixmap(self) -> DBusPixmaps:
        return [list(p) for p in pixmaps("error")]

    @dbus_property(access=PropertyAccess.READ)
    def AttentionMovieName(self) -> DBusStr:
        return ""

    @dbus_property(access=PropertyAccess.READ)
    def ToolTip(self) -> DBusToolTip:
        name, images, title, text = tooltip(self._shown.view)
        return [name, [list(p) for p in images], title, text]

    @dbus_property(access=PropertyAccess.READ)
    def ItemIsMenu(self) -> DBusBool:
        return False

    @dbus_property(access=PropertyAccess.READ)
    def Menu(self) -> DBusObjectPath:
        return MENU_PATH

    @dbus_method()
    def Activate(self, x: DBusInt32, y: DBusInt32) -> DBusNothing:
        self._act("resync")

    @dbus_method()
    def SecondaryActivate(self, x: DBusInt32, y: DBusInt32) -> DBusNothing:
        pass  # a middle click: nothing worth doing by accident

    @dbus_method()
    def ContextMenu(self, x: DBusInt32, y: DBusInt32) -> DBusNothing:
        pass  # hosts draw the menu from /MenuBar themselves; we have no window to pop up

    @dbus_method()
    def Scroll(self, delta: DBusInt32, orientation: DBusStr) -> DBusNothing:
        pass

    @dbus_signal()
    def NewIcon(self) -> DBusNothing:
        return None

    @dbus_signal()
    def NewAttentionIcon(self) -> DBusNothing:
        return None

    @dbus_signal()
    def NewToolTip(self) -> DBusNothing:
        return None

    @dbus_signal()
    def NewStatus(self) -> DBusStr:
        return SNI_STATUS[self._shown.view.state]


class DBusMenu(ServiceInterface):
    """``com.canonical.dbusmenu``: a flat menu of MENU's entries."""

    def __init__(self, shown: Shown, act: Act) -> None:
        super().__init__(MENU_INTERFACE)
        self._shown = shown
        self._act = act

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusUInt32:
        return 3

    @dbus_property(access=PropertyAccess.READ)
    def TextDirection(self) -> DBusStr:
        return "ltr"

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> DBusStr:
        return "normal"

    @dbus_property(access=PropertyAccess.READ)
    def IconThemePath(self) -> DBusStrings:
        return []

    @dbus_method()
    def GetLayout(
        self, parentId: DBusInt32, recursionDepth: DBusInt32, propertyNames: DBusStrings
    ) -> DBusLayout:
        layout = menu_layout(self._shown.view, parentId, recursionDepth, propertyNames)
        return [self._shown.revision, list(layout)]

    @dbus_method()
    def GetGroupProperties(self, ids: DBusIds, propertyNames: DBusStrings) -> DBusGroupProperties:
        entries = menu_ids()
        wanted = ids or list(entries)
        return [
            [i, menu_layout(self._shown.view, i, 0, propertyNames)[1]]
            for i in wanted
            if i in entries
        ]

    @dbus_method()
    def GetProperty(self, id: DBusInt32, name: DBusStr) -> DBusVariantValue:
        props = menu_layout(self._shown.view, id, 0)[1]
        if name not in props:
            raise DBusError("org.freedesktop.DBus.Error.InvalidArgs", f"no property {name!r}")
        return props[name]

    @dbus_method()
    def Event(
        self, id: DBusInt32, eventId: DBusStr, data: DBusVariantValue, timestamp: DBusUInt32
    ) -> DBusNothing:
        self._event(id, eventId)

    @dbus_method()
    def EventGroup(self, events: DBusEvents) -> DBusIds:
        entries = menu_ids()
        for id_, event_id, _data, _timestamp in events:
            self._event(id_, event_id)
        return [event[0] for event in events if event[0] not in entries]

    @dbus_method()
    def AboutToShow(self, id: DBusInt32) -> DBusBool:
        return False

    @dbus_method()
    def AboutToShowGroup(self, ids: DBusIds) -> DBusIdsPair:
        return [[], [i for i in ids if i != 0 and i not in menu_ids()]]

    @dbus_signal()
    def ItemsPropertiesUpdated(self) -> DBusUpdated:
        enabled = next(i for i, e in menu_ids().items() if e.checkable)
        props = item_properties(menu_ids()[enabled], self._shown.view)
        return [[[enabled, props]], []]

    @dbus_signal()
    def LayoutUpdated(self) -> DBusLayoutUpdated:
        return [self._shown.revision, 0]

    @dbus_signal()
    def ItemActivationRequested(self) -> Annotated[list[int], DBusSignature("iu")]:
        return [0, 0]

    def _event(self, id_: int, event_id: str) -> None:
        entry = menu_ids().get(id_)
        if entry is not None and event_id == "clicked":
            self._act(MENU_ACTIONS[entry.action])


# -- asking the bus ------------------------------------------------------------------------


async def _ask_bus_daemon(bus: MessageBus, member: str, argument: str) -> Message:
    """One call with a string argument to the bus daemon itself (org.freedesktop.DBus)."""
    reply: Message = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member=member,
            signature="s",
            body=[argument],
        )
    )
    return reply


async def _watcher_owner(bus: MessageBus) -> str | None:
    reply = await _ask_bus_daemon(bus, "GetNameOwner", WATCHER)
    if reply.message_type == MessageType.ERROR:
        return None
    owner: str = reply.body[0]
    return owner


async def _probe(address: str) -> str | None:
    bus = await MessageBus(bus_address=address).connect()
    try:
        return await _watcher_owner(bus)
    finally:
        bus.disconnect()


def watcher_absent(env: Mapping[str, str]) -> str | None:
    """Why no StatusNotifierWatcher is on the session bus of ``env``, or None when
    one is. Blocking; runs on a helper thread so it works from inside an event
    loop too (the agent starts its tray from its loop)."""
    address = session_bus_address(env)
    if address is None:
        return "no session bus (DBUS_SESSION_BUS_ADDRESS is not set)"
    answer: list[str | BaseException | None] = []

    def ask() -> None:
        try:
            answer.append(asyncio.run(asyncio.wait_for(_probe(address), PROBE_TIMEOUT)))
        except BaseException as exc:  # reported below, on the caller's thread
            answer.append(exc)

    helper = threading.Thread(target=ask, name="tray-sni-probe", daemon=True)
    helper.start()
    helper.join(PROBE_TIMEOUT + 1)
    if not answer:
        return f"the session bus at {address} did not answer"
    result = answer[0]
    if isinstance(result, BaseException):
        return f"cannot use the session bus at {address}: {result or type(result).__name__}"
    if result is None:
        return "no StatusNotifierWatcher on the session bus"
    return None


# -- the tray --------------------------------------------------------------------------------


class SniTray:
    """The StatusNotifierItem tray on its own thread and asyncio loop.

    Same surface as the XEmbed ``tray.Tray`` (start, stop, wait, shown,
    finished). ``bus_address``: which bus (default: the session bus of the
    environment).
    """

    def __init__(
        self,
        runtime_dir: Path,
        call: Call = localapi.call,
        *,
        quit_stops_agent: bool = False,
        poll_seconds: float = POLL_SECONDS,
        bus_address: str | None = None,
    ) -> None:
        self.link = AgentLink(runtime_dir, call, quit_stops_agent=quit_stops_agent)
        self.poll_seconds = poll_seconds
        self.bus_address = bus_address
        self.finished = threading.Event()
        self.shown = False
        self.registered = threading.Event()
        self.bus_name = f"org.kde.StatusNotifierItem-{os.getpid()}-{id(self) & 0xFFFF}"
        self._shown = Shown(self.link.view)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Action] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def view(self) -> TrayView:
        return self._shown.view

    def start(self) -> None:
        """Run the item on its own thread; returns at once."""
        self._thread = threading.Thread(target=self._run, name="tray-sni", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the tray has gone; True when it has."""
        return self.finished.wait(timeout)

    def stop(self) -> None:
        """Ask the tray to go; returns at once. Safe from any thread, more than once."""
        self._put("stop")

    def _put(self, action: Action) -> None:
        """Queue ``action`` for the tray's loop, from any thread."""
        with self._lock:
            if action == "stop":
                self._stopping = True
            loop, queue = self._loop, self._queue
        if loop is None or queue is None:
            if action == "stop" and self._thread is None:
                self.finished.set()
            return  # the loop reads _stopping when it starts
        if loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(queue.put_nowait, action)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("tray icon failed")
        finally:
            self.finished.set()

    async def _main(self) -> None:
        address = self.bus_address or session_bus_address(os.environ)
        try:
            bus = await MessageBus(bus_address=address, bus_type=BusType.SESSION).connect()
        except (OSError, DBusError, ValueError) as exc:
            log.warning("no tray icon: cannot connect to the session bus: %s", exc)
            return
        queue: asyncio.Queue[Action] = asyncio.Queue()
        with self._lock:
            self._loop, self._queue = asyncio.get_running_loop(), queue
            if self._stopping:
                queue.put_nowait("stop")
        item = StatusNotifierItem(self._shown, self._put)
        menu = DBusMenu(self._shown, self._put)
        gone = asyncio.create_task(self._end_with(bus), name="tray-sni-bus")
        try:
            await self._refresh(item, menu)
            bus.export(ITEM_PATH, item)
            bus.export(MENU_PATH, menu)
            await bus.request_name(self.bus_name)
            await self._follow_watcher(bus)
            queue.put_nowait("register")
            await self._serve(bus, queue, item, menu)
        finally:
            gone.cancel()
            with self._lock:
                self._loop = self._queue = None
            bus.disconnect()

    async def _end_with(self, bus: MessageBus) -> None:
        """End the tray when the session bus goes (the session is over): no host
        could show the icon again on that bus."""
        with contextlib.suppress(Exception):  # how it ended does not matter here
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast 5
        if not self._stopping:
            log.info("tray: the session bus went away; the tray ends")
        self._put("stop")

    async def _serve(
        self,
        bus: MessageBus,
        queue: asyncio.Queue[Action],
        item: StatusNotifierItem,
        menu: DBusMenu,
    ) -> None:
        """The one consumer of actions; a poll of the agent when none comes."""
        link = self.link
        while True:
            try:
                action = await asyncio.wait_for(queue.get(), self.poll_seconds)
            except TimeoutError:
                await self._refresh(item, menu)
                continue
            if action == "stop":
                return
            if action == "register":
                await self._register(bus)
            elif action == "quit":
                log.info("tray: Quit")
                await asyncio.to_thread(link.quit)
                return
            else:
                log.info("tray: %s", action)
                method = link.resync if action == "resync" else link.toggle_enabled
                await asyncio.to_thread(method)
                self._publish(item, menu)

    async def _refresh(self, item: StatusNotifierItem, menu: DBusMenu) -> None:
        await asyncio.to_thread(self.link.refresh)
        self._publish(item, menu)

    def _publish(self, item: StatusNotifierItem, menu: DBusMenu) -> None:
        """Show the agent's new state: the SNI signals for icon, tooltip and status,
        and dbusmenu's for the Enabled check."""
        old, new = self._shown.view, self.link.view
        if old == new:
            return
        self._shown.view = new
        log.info("tray: %s (%s)", new.title, new.state)
        if old.state != new.state:
            item.NewIcon()
            item.NewStatus()
        item.NewToolTip()
        if old.enabled != new.enabled:
            # Properties are enough by the spec; a new revision with LayoutUpdated
            # makes hosts that cache the whole layout (libdbusmenu) read it again.
            self._shown.revision += 1
            menu.ItemsPropertiesUpdated()
            menu.LayoutUpdated()

    async def _follow_watcher(self, bus: MessageBus) -> None:
        """Register again whenever a StatusNotifierWatcher appears (a panel starts
        or restarts): NameOwnerChanged for its name, filtered by the bus."""
        rule = (
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            f"member='NameOwnerChanged',arg0='{WATCHER}'"
        )
        reply = await _ask_bus_daemon(bus, "AddMatch", rule)
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name or "AddMatch", str(reply.body))

        def on_message(msg: Message) -> None:
            if msg.member != "NameOwnerChanged" or msg.body[0] != WATCHER:
                return
            if msg.body[2]:
                log.info("tray: a StatusNotifierWatcher appeared; registering")
                self._put("register")
            else:
                self.registered.clear()
                log.info("tray: the StatusNotifierWatcher went away; waiting for it to return")

        bus.add_message_handler(on_message)

    async def _register(self, bus: MessageBus) -> None:
        owner = await _watcher_owner(bus)
        if owner is None:
            log.info("tray: no StatusNotifierWatcher on the session bus; waiting for one")
            return
        reply = await bus.call(
            Message(
                destination=WATCHER,
                path=WATCHER_PATH,
                interface=WATCHER,
                member="RegisterStatusNotifierItem",
                signature="s",
                body=[self.bus_name],
            )
        )
        if reply.message_type == MessageType.ERROR:
            log.warning("tray: the StatusNotifierWatcher refused the icon: %s", reply.body)
            return
        first = not self.shown
        self.shown = True
        self.registered.set()
        if first:
            log.info(
                "tray icon shown (StatusNotifierItem %s, menu: %s)",
                self.bus_name,
                ", ".join(e.text for e in MENU),
            )
        else:
            log.info("tray icon registered again with the StatusNotifierWatcher")
