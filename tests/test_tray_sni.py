"""The StatusNotifierItem tray without a display: its D-Bus answers on a private bus.

A private dbus-daemon (desktopkit), a fake StatusNotifierWatcher that records
registrations, and a D-Bus client in the test that reads the item's properties,
asks the menu for its layout, clicks entries (dbusmenu ``Event``) and listens
for the item's signals. The agent is a fake control channel that records each
command (the seam the tray uses: ``localapi.call``). The run under a real tray
host (Xfce's panel) is in test_tray_sni_xfce.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusStr
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from desktopkit import Bus, private_bus
from wg_autopeer.agent.localapi import AgentNotRunning
from wg_autopeer.tray import (
    ALLOW_ROOT_ENV,
    NOT_RUNNING,
    STATES,
    TrayView,
    icon_image,
    start_tray_if_possible,
)
from wg_autopeer.tray_sni import (
    ITEM_INTERFACE,
    ITEM_PATH,
    MENU_INTERFACE,
    MENU_PATH,
    PIXMAP_SIZES,
    WATCHER,
    DBusNothing,
    SniTray,
    argb32,
    icon_theme_path,
    menu_layout,
    session_bus_address,
    watcher_absent,
)

pytestmark = pytest.mark.skipif(
    shutil.which("dbus-daemon") is None,
    reason="needs dbus-daemon (Debian package dbus-daemon: scripts/setup.sh)",
)

TIMEOUT = 10.0


# -- pure answers ---------------------------------------------------------------------------


def test_pixmaps_are_argb32_in_network_byte_order() -> None:
    from PIL import Image

    image = Image.new("RGBA", (2, 2), (10, 20, 30, 40))
    width, height, data = argb32(image, 2)
    assert (width, height) == (2, 2)
    assert data == bytes([40, 10, 20, 30]) * 4
    size, _, scaled = argb32(icon_image("active"), 22)
    assert size == 22
    assert len(scaled) == 22 * 22 * 4


def test_menu_layout_is_resync_enabled_quit_with_a_checkmark() -> None:
    view = TrayView("active", "wg0: 1 direct peer", enabled=True)
    root, props, children = menu_layout(view)
    assert root == 0
    assert props == {"children-display": Variant("s", "submenu")}
    items = [child.value for child in children]
    assert [(i, p["label"].value) for i, p, _ in items] == [
        (1, "Re-sync"),
        (2, "Enabled"),
        (3, "Quit"),
    ]
    enabled = items[1][1]
    assert enabled["toggle-type"] == Variant("s", "checkmark")
    assert enabled["toggle-state"] == Variant("i", 1)
    assert "toggle-type" not in items[0][1]
    paused = menu_layout(TrayView("idle", "paused", enabled=False))[2][1].value[1]
    assert paused["toggle-state"] == Variant("i", 0)


def test_menu_layout_of_one_item_with_only_the_properties_asked_for() -> None:
    view = TrayView("active", "x")
    assert menu_layout(view, 3, -1, ["label"]) == (3, {"label": Variant("s", "Quit")}, [])
    assert menu_layout(view, 0, 0)[2] == []  # depth 0: the root alone
    with pytest.raises(Exception, match="no menu item 9"):
        menu_layout(view, 9)


def test_named_icons_are_where_icon_theme_path_says() -> None:
    folder = Path(icon_theme_path())
    assert all((folder / f"wg-autopeer-{state}.png").is_file() for state in STATES)


# -- on a private bus -------------------------------------------------------------------------


class FakeAgent:
    """Stands in for ``localapi.call``: records commands, answers like the agent."""

    def __init__(self) -> None:
        self.enabled = True
        self.outcome = "ok: 1 neighbour(s), 0 refused"
        self.running = True
        self.commands: list[str] = []

    def __call__(self, runtime_dir: Path, command: str) -> dict[str, Any]:
        if not self.running:
            raise AgentNotRunning("no agent is running")
        self.commands.append(command)
        if command in ("enable", "disable"):
            self.enabled = command == "enable"
        if command == "status":
            return {
                "ok": True,
                "enabled": self.enabled,
                "interfaces": [
                    {
                        "interface": "wg0",
                        "last_outcome": self.outcome,
                        "direct_peers": [{"public_key": "k"}],
                    }
                ],
            }
        return {"ok": True}

    def actions(self) -> list[str]:
        return [c for c in self.commands if c != "status"]


class FakeWatcher(ServiceInterface):
    """org.kde.StatusNotifierWatcher as far as an item uses it."""

    def __init__(self) -> None:
        super().__init__(WATCHER)
        self.items: list[str] = []

    @dbus_method()
    def RegisterStatusNotifierItem(self, service: DBusStr) -> DBusNothing:
        self.items.append(service)

    @dbus_property(access=PropertyAccess.READ)
    def IsStatusNotifierHostRegistered(self) -> DBusBool:
        return True


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    with private_bus(tmp_path / "dbus.log") as private:
        yield private


async def until(predicate: Callable[[], object]) -> None:
    """Poll ``predicate`` on the test's loop (so its D-Bus client keeps reading).

    Polling with a deadline, not an Event: the predicates read what other threads
    and processes change (the tray's thread, the fake agent, the bus)."""
    async with asyncio.timeout(TIMEOUT):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def until_owned(conn: MessageBus, name: str) -> None:
    """Wait until ``name`` has an owner on the bus (the tray is on it)."""
    ask = Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member="NameHasOwner",
        signature="s",
        body=[name],
    )
    async with asyncio.timeout(TIMEOUT):
        while (await conn.call(ask)).body != [True]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def start_watcher(address: str) -> tuple[MessageBus, FakeWatcher]:
    conn = await MessageBus(bus_address=address).connect()
    watcher = FakeWatcher()
    conn.export("/StatusNotifierWatcher", watcher)
    await conn.request_name(WATCHER)
    return conn, watcher


class Client:
    """The test's D-Bus connection: calls to the tray, and the signals it sends."""

    def __init__(self, conn: MessageBus, name: str) -> None:
        self.conn = conn
        self.name = name
        self.signals: list[Message] = []

    async def call(self, path: str, interface: str, member: str, sig: str = "", *body: Any) -> Any:
        reply = await self.conn.call(
            Message(
                destination=self.name,
                path=path,
                interface=interface,
                member=member,
                signature=sig,
                body=list(body),
            )
        )
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return reply.body

    async def props(self, path: str, interface: str) -> dict[str, Any]:
        (answer,) = await self.call(
            path, "org.freedesktop.DBus.Properties", "GetAll", "s", interface
        )
        return {k: v.value for k, v in answer.items()}

    def signalled(self, member: str) -> list[list[Any]]:
        return [m.body for m in self.signals if m.member == member]


@pytest.fixture
async def watcher(bus: Bus) -> AsyncIterator[FakeWatcher]:
    conn, fake = await start_watcher(bus.address)
    try:
        yield fake
    finally:
        conn.disconnect()


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
async def tray(bus: Bus, agent: FakeAgent) -> AsyncIterator[SniTray]:
    item = SniTray(Path("/run/test"), agent, bus_address=bus.address, poll_seconds=0.2)
    item.start()
    try:
        yield item
    finally:
        item.stop()
        assert await asyncio.to_thread(item.wait, TIMEOUT)


@pytest.fixture
async def client(bus: Bus, tray: SniTray) -> AsyncIterator[Client]:
    conn = await MessageBus(bus_address=bus.address).connect()
    me = Client(conn, tray.bus_name)
    await until_owned(conn, tray.bus_name)
    await conn.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[f"type='signal',sender='{tray.bus_name}'"],
        )
    )

    def on_message(msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL and msg.path in (ITEM_PATH, MENU_PATH):
            me.signals.append(msg)

    conn.add_message_handler(on_message)
    try:
        yield me
    finally:
        conn.disconnect()


async def test_item_registers_with_the_watcher_and_describes_the_agent(
    watcher: FakeWatcher, tray: SniTray, client: Client
) -> None:
    await until(lambda: tray.shown)
    assert watcher.items == [tray.bus_name]
    props = await client.props(ITEM_PATH, ITEM_INTERFACE)
    assert props["Id"] == "wg-autopeer"
    assert props["Status"] == "Active"
    assert props["IconName"] == "wg-autopeer-active"
    assert props["IconThemePath"] == icon_theme_path()
    assert props["ItemIsMenu"] is False
    assert props["Menu"] == MENU_PATH
    assert list(props["ToolTip"][2:]) == ["wg-autopeer", "wg0: 1 direct peer"]
    pixmaps = props["IconPixmap"]
    assert [(w, h) for w, h, _ in pixmaps] == [(s, s) for s in PIXMAP_SIZES]
    assert pixmaps[-1][2] == argb32(icon_image("active"), PIXMAP_SIZES[-1])[2]
    menu = await client.props(MENU_PATH, MENU_INTERFACE)
    assert menu["Version"] == 3


async def test_menu_layout_over_dbus_and_a_click_on_enabled_pauses_the_agent(
    watcher: FakeWatcher, tray: SniTray, client: Client, agent: FakeAgent
) -> None:
    revision, layout = await client.call(MENU_PATH, MENU_INTERFACE, "GetLayout", "iias", 0, -1, [])
    labels = [child.value[1]["label"].value for child in layout[2]]
    assert labels == ["Re-sync", "Enabled", "Quit"]
    assert layout[2][1].value[1]["toggle-state"].value == 1

    await client.call(MENU_PATH, MENU_INTERFACE, "Event", "isvu", 2, "clicked", Variant("s", ""), 0)
    await until(lambda: client.signalled("LayoutUpdated"))
    assert agent.actions() == ["disable"]
    assert client.signalled("ItemsPropertiesUpdated") == [
        [
            [
                (
                    2,
                    {
                        "label": Variant("s", "Enabled"),
                        "toggle-type": Variant("s", "checkmark"),
                        "toggle-state": Variant("i", 0),
                    },
                )
            ],
            [],
        ]
    ]
    assert client.signalled("LayoutUpdated") == [[revision + 1, 0]]
    assert client.signalled("NewIcon") == [[]]
    assert client.signalled("NewToolTip") == [[]]
    props = await client.props(ITEM_PATH, ITEM_INTERFACE)
    assert props["IconName"] == "wg-autopeer-idle"
    assert props["ToolTip"][3] == "wg-autopeer: paused (direct peering off)"
    new_revision, layout = await client.call(
        MENU_PATH, MENU_INTERFACE, "GetLayout", "iias", 0, -1, ["toggle-state"]
    )
    assert new_revision == revision + 1
    assert [c.value[1] for c in layout[2]] == [{}, {"toggle-state": Variant("i", 0)}, {}]


async def test_activate_and_resync_entry_ask_the_agent_to_sync(
    watcher: FakeWatcher, tray: SniTray, client: Client, agent: FakeAgent
) -> None:
    await client.call(ITEM_PATH, ITEM_INTERFACE, "Activate", "ii", 10, 10)
    await until(lambda: agent.actions() == ["sync"])
    await client.call(
        MENU_PATH, MENU_INTERFACE, "EventGroup", "a(isvu)", [[1, "clicked", Variant("s", ""), 0]]
    )
    await until(lambda: agent.actions() == ["sync", "sync"])
    # Hover and other events do nothing.
    await client.call(MENU_PATH, MENU_INTERFACE, "Event", "isvu", 3, "hovered", Variant("s", ""), 0)
    await client.call(ITEM_PATH, ITEM_INTERFACE, "SecondaryActivate", "ii", 0, 0)
    agent.commands.clear()
    await until(lambda: agent.commands.count("status") >= 2)  # two polls later
    assert agent.actions() == []


async def test_an_unreachable_server_asks_for_attention(
    watcher: FakeWatcher, tray: SniTray, client: Client, agent: FakeAgent
) -> None:
    agent.outcome = "server unreachable: timed out"
    await until(lambda: client.signalled("NewStatus"))
    assert client.signalled("NewStatus") == [["NeedsAttention"]]
    props = await client.props(ITEM_PATH, ITEM_INTERFACE)
    assert props["Status"] == "NeedsAttention"
    assert props["IconName"] == "wg-autopeer-error"
    assert props["ToolTip"][3] == "wg0: server unreachable"
    assert client.signalled("LayoutUpdated") == []  # the menu did not change


async def test_item_registers_again_when_the_watcher_comes_back(
    bus: Bus, tray: SniTray, client: Client
) -> None:
    first_conn, first = await start_watcher(bus.address)
    try:
        # The tray started before any watcher: it registers when one appears.
        await until(lambda: first.items == [tray.bus_name])
    finally:
        first_conn.disconnect()
    await until(lambda: not tray.registered.is_set())
    second_conn, second = await start_watcher(bus.address)
    try:
        await until(lambda: second.items == [tray.bus_name])
    finally:
        second_conn.disconnect()


async def test_quit_ends_this_tray_and_leaves_the_agent_running(
    watcher: FakeWatcher, tray: SniTray, client: Client, agent: FakeAgent
) -> None:
    await client.call(MENU_PATH, MENU_INTERFACE, "Event", "isvu", 3, "clicked", Variant("s", ""), 0)
    assert await asyncio.to_thread(tray.wait, TIMEOUT)
    assert agent.actions() == []


async def test_quit_of_the_tray_inside_the_agent_stops_the_agent(
    bus: Bus, watcher: FakeWatcher, agent: FakeAgent
) -> None:
    inside = SniTray(Path("/run/test"), agent, bus_address=bus.address, quit_stops_agent=True)
    inside.start()
    try:
        await until(lambda: inside.shown)
        conn = await MessageBus(bus_address=bus.address).connect()
        try:
            await Client(conn, inside.bus_name).call(
                MENU_PATH, MENU_INTERFACE, "Event", "isvu", 3, "clicked", Variant("s", ""), 0
            )
        finally:
            conn.disconnect()
        assert await asyncio.to_thread(inside.wait, TIMEOUT)
        assert agent.actions() == ["quit"]
    finally:
        inside.stop()


async def test_watcher_probe_says_whether_a_host_is_there(bus: Bus) -> None:
    env = {"DBUS_SESSION_BUS_ADDRESS": bus.address}
    assert await asyncio.to_thread(watcher_absent, env) == (
        "no StatusNotifierWatcher on the session bus"
    )
    conn, _ = await start_watcher(bus.address)
    try:
        assert await asyncio.to_thread(watcher_absent, env) is None
    finally:
        conn.disconnect()
    assert watcher_absent({}) == "no session bus (DBUS_SESSION_BUS_ADDRESS is not set)"
    gone = await asyncio.to_thread(
        watcher_absent, {"DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/bus"}
    )
    assert gone is not None
    assert gone.startswith("cannot use the session bus at unix:path=/nonexistent/bus")


async def test_stop_before_the_bus_answers_still_ends_the_tray(bus: Bus, agent: FakeAgent) -> None:
    early = SniTray(Path("/run/test"), agent, bus_address=bus.address)
    early.start()
    early.stop()
    early.stop()
    assert await asyncio.to_thread(early.wait, TIMEOUT)
    assert not early.shown


async def test_agent_starts_the_sni_tray_when_a_watcher_is_on_the_bus(
    bus: Bus, watcher: FakeWatcher, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.address)
    monkeypatch.setenv("DISPLAY", ":4093")  # no X server there: the X11 probe must not matter
    monkeypatch.setenv(ALLOW_ROOT_ENV, "1")
    tray = await asyncio.to_thread(start_tray_if_possible, tmp_path)
    assert isinstance(tray, SniTray)
    try:
        assert tray.link.quit_stops_agent
        await until(lambda: watcher.items == [tray.bus_name])
        assert tray.view == NOT_RUNNING  # no agent on tmp_path's socket
    finally:
        tray.stop()
        assert await asyncio.to_thread(tray.wait, TIMEOUT)


def test_tray_command_without_any_host_says_why_in_one_line(bus: Bus, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "WAYLAND_DISPLAY": "wayland-test",  # a Wayland session: only SNI can serve it
        "DBUS_SESSION_BUS_ADDRESS": bus.address,
        ALLOW_ROOT_ENV: "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wg_autopeer",
            "tray",
            "--runtime-dir",
            str(tmp_path),
            "--wait-host",
            "0.5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith("no tray icon: no StatusNotifierWatcher on the session bus")


async def test_tray_ends_when_the_session_bus_goes(
    tmp_path: Path, agent: FakeAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wg_autopeer.tray_sni")
    with private_bus(tmp_path / "dbus.log") as short_lived:
        conn, watcher = await start_watcher(short_lived.address)
        tray = SniTray(Path("/run/test"), agent, bus_address=short_lived.address)
        tray.start()
        try:
            await until(lambda: watcher.items == [tray.bus_name])
        finally:
            conn.disconnect()
    # private_bus ended the daemon: the tray notices and ends by itself.
    assert await asyncio.to_thread(tray.wait, TIMEOUT)
    assert "the session bus went away" in caplog.text


def test_session_bus_falls_back_to_the_per_user_bus_like_libdbus(tmp_path: Path) -> None:
    import socket

    assert session_bus_address({"DBUS_SESSION_BUS_ADDRESS": "unix:path=/x"}) == "unix:path=/x"
    assert session_bus_address({"XDG_RUNTIME_DIR": str(tmp_path)}) is None
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "bus"))
        found = session_bus_address({"XDG_RUNTIME_DIR": str(tmp_path)})
    assert found == f"unix:path={tmp_path / 'bus'}"
