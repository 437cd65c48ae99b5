"""pystray's X11 backend, completed: a clickable icon with a popup menu, and
calls from other threads that cannot deadlock.

pystray 0.19's X11 backend, the one that works without PyGObject, embeds the
icon in the tray but has no menu (``HAS_MENU`` is False) and never selects
button events on its window, so clicks never even arrive (pystray issue #151).
``MenuIcon`` listens for clicks and pops the icon's menu up as a small
override-redirect window drawn with Pillow: a click on an entry runs it, a click
anywhere else closes the menu.

pystray runs every change (icon, title, show, hide, stop) on its X11 loop
thread by sending itself a ClientMessage, but it sends from the calling thread
over the loop's own connection and has all callers wait on one shared queue.
python-xlib then occasionally deadlocks (seen here: the loop waiting for a
reply forever while another thread flushed), and a caller can take another's
answer. ``MenuIcon`` sends those wake-ups over a second connection and gives
each call its own answer, with a time limit.

It relies on ``pystray._xorg``'s internals (``_window``, ``_display``,
``_thread``, ``_message_handlers``, ``_rewrite_implementation``, ``_mainloop``),
hence the pin ``pystray<0.20``.

Import this only when a tray will run: importing pystray's X11 backend connects
to the display.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import Xlib.display
import Xlib.protocol.event
import Xlib.X
from PIL import Image, ImageDraw, ImageFont
from pystray import _xorg

from wg_autopeer.tray import MENU_ROW_HEIGHT

log = logging.getLogger(__name__)

ROW_HEIGHT = MENU_ROW_HEIGHT
CHECK_COLUMN = 26
RIGHT_PAD = 16
FONT_SIZE = 14
BACKGROUND = (250, 250, 250)
FOREGROUND = (20, 20, 20)
HIGHLIGHT = (52, 101, 164)
DISABLED = (150, 150, 150)
POPUP_NAME = "wg-autopeer menu"
# How long a call from another thread waits for the X11 loop to run it.
CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Row:
    """One menu row as drawn: the pystray item and what it showed when opened."""

    item: Any
    text: str
    checked: bool | None
    enabled: bool


def _font() -> Any:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def render_menu(rows: list[Row], hover: int) -> Image.Image:
    """The popup's picture: one row per item, a tick for checked ones (pure)."""
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = CHECK_COLUMN + RIGHT_PAD + max(int(measure.textlength(r.text, font=font)) for r in rows)
    image = Image.new("RGB", (max(width, 120), ROW_HEIGHT * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for index, row in enumerate(rows):
        top = index * ROW_HEIGHT
        colour = FOREGROUND if row.enabled else DISABLED
        if index == hover and row.enabled:
            draw.rectangle((0, top, image.width, top + ROW_HEIGHT - 1), fill=HIGHLIGHT)
            colour = (255, 255, 255)
        if row.checked:
            mid = top + ROW_HEIGHT // 2
            draw.line(((8, mid), (12, mid + 4), (19, mid - 5)), fill=colour, width=2)
        draw.text(
            (CHECK_COLUMN, top + ROW_HEIGHT // 2), row.text, fill=colour, font=font, anchor="lm"
        )
    return image


class MenuIcon(_xorg.Icon):  # type: ignore[misc]
    """pystray's X11 icon with button events and a popup menu.

    Everything here runs on pystray's X11 loop thread (event handlers), except
    the chosen action, which runs on a thread of its own so a slow agent cannot
    freeze the loop.
    """

    HAS_MENU = True
    HAS_DEFAULT_ACTION = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._popup: Any = None
        self._popup_gc: Any = None
        self._rows: list[Row] = []
        self._hover = -1
        self._popup_width = 0
        expose = self._message_handlers[Xlib.X.Expose]
        self._message_handlers[Xlib.X.ButtonPress] = self._on_press
        self._message_handlers[Xlib.X.MotionNotify] = self._on_motion
        self._message_handlers[Xlib.X.Expose] = lambda event: (
            self._draw_popup() if self._is_popup(event.window) else expose(event)
        )

    def _create_window(self) -> Any:
        window = super()._create_window()
        window.change_attributes(
            event_mask=Xlib.X.ExposureMask | Xlib.X.StructureNotifyMask | Xlib.X.ButtonPressMask
        )
        return window

    def _stop(self) -> None:
        self._close_popup()
        super()._stop()

    # -- calls from other threads ---------------------------------------------------

    def _rewrite_implementation(self, *methods: Callable[[], None]) -> None:
        """Route ``methods`` through the loop thread (replaces pystray's version).

        Runs inside pystray's ``__init__``, before ours: it sets up its own state.
        """
        self._calls: dict[int, tuple[Callable[[], None], queue.Queue[BaseException | None]]] = {}
        self._calls_lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self._loop_done = threading.Event()
        self._call_atom = self._display.intern_atom("_WG_AUTOPEER_CALL")
        # Only callers use this connection, one at a time (under _calls_lock).
        self._wake = Xlib.display.Display(self._display.get_display_name())
        for method in methods:
            setattr(self, method.__name__, self._dispatcher(method))
        self._message_handlers[Xlib.X.ClientMessage] = self._on_call

    def _dispatcher(self, method: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            if threading.current_thread() is getattr(self, "_thread", None):
                method()
                return
            if self._loop_done.is_set():
                return  # the icon is gone: nothing left to change
            answer: queue.Queue[BaseException | None] = queue.Queue(maxsize=1)
            with self._calls_lock:
                if self._loop_done.is_set():
                    return
                call_id = next(self._call_ids)
                self._calls[call_id] = (method, answer)
                # SendEvent with no event mask goes to the window's creator: the loop.
                window = self._wake.create_resource_object("window", self._window.id)
                self._wake.send_event(
                    window,
                    Xlib.protocol.event.ClientMessage(
                        type=Xlib.X.ClientMessage,
                        window=window,
                        client_type=self._call_atom,
                        data=(32, (call_id, 0, 0, 0, 0)),
                    ),
                    event_mask=Xlib.X.NoEventMask,
                )
                self._wake.flush()
            try:
                error = answer.get(timeout=CALL_TIMEOUT)
            except queue.Empty:
                with self._calls_lock:
                    self._calls.pop(call_id, None)
                log.warning("tray: the X11 loop did not run %s in time", method.__name__)
                return
            if error is not None:
                raise error

        call.__name__ = method.__name__
        return call

    def _on_call(self, event: Any) -> None:
        if event.client_type != self._call_atom:
            return  # e.g. XEMBED messages from the tray host
        with self._calls_lock:
            entry = self._calls.pop(event.data[1][0], None)
        if entry is None:
            return
        method, answer = entry
        try:
            method()
        except Exception as exc:  # handed to the caller, raised there
            answer.put(exc)
        else:
            answer.put(None)

    def _mainloop(self) -> None:
        try:
            super()._mainloop()
        finally:
            self._loop_done.set()
            with self._calls_lock:
                pending, self._calls = list(self._calls.values()), {}
                self._wake.close()
            for _method, answer in pending:
                answer.put(None)

    # -- events (loop thread) -------------------------------------------------------

    def _is_popup(self, window: Any) -> bool:
        return self._popup is not None and window.id == self._popup.id

    def _row_at(self, x: int, y: int) -> int:
        if self._popup is None or not 0 <= x < self._popup_width or y < 0:
            return -1
        index = y // ROW_HEIGHT
        return index if index < len(self._rows) else -1

    def _on_press(self, event: Any) -> None:
        if self._popup is not None:
            # The pointer is grabbed: every press lands here, in popup coordinates.
            index = self._row_at(event.event_x, event.event_y)
            rows = self._rows
            self._close_popup()
            if index >= 0 and rows[index].enabled:
                self._activate(rows[index])
            return
        if event.window.id == self._window.id and event.detail in (1, 3):
            self._open_popup(event.root_x, event.root_y)

    def _on_motion(self, event: Any) -> None:
        if self._popup is None:
            return
        index = self._row_at(event.event_x, event.event_y)
        if index != self._hover:
            self._hover = index
            self._draw_popup()

    # -- the popup --------------------------------------------------------------------

    def _open_popup(self, x: int, y: int) -> None:
        menu = self.menu
        items = [i for i in (menu.items if menu else ()) if i.visible and i is not menu.SEPARATOR]
        if not items:
            return
        self._rows = [Row(i, i.text, i.checked, bool(i.enabled)) for i in items]
        self._hover = -1
        image = render_menu(self._rows, self._hover)
        self._popup_width = image.width
        screen = self._display.screen()
        # Open toward the screen's inside: a bottom panel's menu goes up.
        x = max(0, min(x, screen.width_in_pixels - image.width - 2))
        if y + image.height + 2 > screen.height_in_pixels:
            y = max(0, y - image.height - 2)
        self._popup = screen.root.create_window(
            x,
            y,
            image.width,
            image.height,
            1,
            screen.root_depth,
            window_class=Xlib.X.InputOutput,
            override_redirect=True,
            background_pixel=screen.white_pixel,
            border_pixel=screen.black_pixel,
            event_mask=Xlib.X.ExposureMask | Xlib.X.ButtonPressMask | Xlib.X.PointerMotionMask,
        )
        self._popup.set_wm_name(POPUP_NAME)
        self._popup_gc = self._popup.create_gc()
        self._popup.map()
        self._popup.grab_pointer(
            False,
            Xlib.X.ButtonPressMask | Xlib.X.PointerMotionMask,
            Xlib.X.GrabModeAsync,
            Xlib.X.GrabModeAsync,
            Xlib.X.NONE,
            Xlib.X.NONE,
            Xlib.X.CurrentTime,
        )
        self._display.flush()
        log.debug(
            "menu opened: %s",
            ", ".join(r.text + (" (checked)" if r.checked else "") for r in self._rows),
        )

    def _draw_popup(self) -> None:
        if self._popup is None:
            return
        image = render_menu(self._rows, self._hover)
        self._popup.put_pil_image(self._popup_gc, 0, 0, image)
        self._display.flush()

    def _close_popup(self) -> None:
        if self._popup is None:
            return
        self._display.ungrab_pointer(Xlib.X.CurrentTime)
        self._popup.destroy()
        self._display.flush()
        self._popup = None

    def _activate(self, row: Row) -> None:
        log.debug("menu: %s", row.text)
        threading.Thread(target=row.item, args=(self,), name="tray-action", daemon=True).start()
