"""The hub's device read in a process of its own, so that it never holds the server's GIL.

A read of a 100 000-peer device costs a fifth of a second of Python even when little
changed (receiving and comparing every peer's record). In a worker thread that work
shares the GIL with the event loop, which then waits its turn: requests stall for
milliseconds at every background round. In a child process it runs on another core and
the loop sees only what changed, in pieces small enough to unpickle between requests.

The child is forked when the reader is made, before the server starts any thread (the
command does it first thing), so it inherits the modules already imported and none of
the threads; it ends when its pipe closes, that is when the server goes.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from wg_autopeer.errors import (
    DeviceRefused,
    NoSuchInterface,
    WireGuardError,
    WireGuardPermissionDenied,
)
from wg_autopeer.server.hubread import DeviceReader, HubDelta, PeerSink, StreamingReader
from wg_autopeer.wireguard.base import PeerState

log = logging.getLogger(__name__)

# Changed peers per message. Unpickling one holds the GIL, and rebuilds every address
# and network of its peers (ipaddress objects pickle as their text): 50 take about a
# millisecond, which is as long as a request may wait behind it.
PEERS_PER_MESSAGE = 50

_ERRORS: dict[str, type[WireGuardError]] = {
    cls.__name__: cls
    for cls in (WireGuardError, NoSuchInterface, DeviceRefused, WireGuardPermissionDenied)
}


@dataclass(frozen=True)
class _ReadDone:
    removed: frozenset[str]
    full: bool
    peers: int


@dataclass(frozen=True)
class _ReadFailed:
    kind: str
    interface: str
    reason: str

    def error(self) -> WireGuardError:
        return _ERRORS.get(self.kind, WireGuardError)(self.interface, self.reason)


def _serve_reads(reader: DeviceReader, conn: Connection, server_end: Connection) -> None:
    """The child: one read per request, its changed peers in several messages, then the rest."""
    # The fork copied the server's end of the pipe too: while this copy is open, the
    # server dying (SIGKILL) is no end of file here, and the child would outlive it.
    server_end.close()
    # Ctrl-C in a terminal reaches the whole process group; the server decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def send(peers: list[PeerState]) -> None:
        for start in range(0, len(peers), PEERS_PER_MESSAGE):
            conn.send(peers[start : start + PEERS_PER_MESSAGE])

    try:
        while True:
            try:
                full = conn.recv()
            except EOFError:
                return  # the server is gone
            try:
                # Sent as they are parsed: a full read's peers are never all held at once.
                delta = reader.read_each(send, full=bool(full))
            except WireGuardError as exc:
                conn.send(_ReadFailed(type(exc).__name__, exc.interface, exc.reason))
                continue
            conn.send(_ReadDone(delta.removed, delta.full, delta.peers))
    finally:
        reader.close()


class ProcessReader(StreamingReader):
    """Runs the reader ``make_reader`` builds in a forked child; reads are blocking calls
    from one thread, as for any ``DeviceReader``.

    Forks at construction: make it while the process has one thread. Should the child
    die, reads go on in this process with a fresh reader (and a warning), the way they
    would without a child.
    """

    def __init__(self, interface: str, make_reader: Callable[[], DeviceReader]) -> None:
        self.interface = interface
        self._make_reader = make_reader
        self._local: DeviceReader | None = None
        self._closed = False
        context = multiprocessing.get_context("fork")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve_reads,
            args=(make_reader(), child_end, self._conn),
            name=f"hub-reader-{interface}",
            daemon=True,
        )
        self._process.start()
        child_end.close()

    @property
    def pid(self) -> int | None:
        """The child's PID while it runs (for the benchmark's CPU accounting)."""
        return self._process.pid if self._local is None else None

    def read_each(self, sink: PeerSink, *, full: bool = False) -> HubDelta:
        if self._local is not None:
            return self._local.read_each(sink, full=full)
        handed = False
        try:
            self._conn.send(full)
            while True:
                message = self._conn.recv()
                if isinstance(message, _ReadFailed):
                    raise message.error()
                if isinstance(message, _ReadDone):
                    return HubDelta({}, message.removed, full=message.full, peers=message.peers)
                handed = True
                sink(message)
        except (EOFError, OSError) as exc:
            log.warning(
                "the reader process of %s ended (%s); reading it in the server from now on",
                self.interface,
                exc or type(exc).__name__,
            )
            self._stop_child()
            self._local = self._make_reader()
            if handed:
                # The sink has part of a read that will never end: this read fails, and
                # the next one (the new reader's first) is a full one.
                raise WireGuardError(self.interface, "the reader process ended mid-read") from exc
            # The server's view may be ahead of or behind the new reader: start afresh.
            return self._local.read_each(sink, full=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_child()
        if self._local is not None:
            self._local.close()

    def _stop_child(self) -> None:
        self._conn.close()
        # Its pipe is closed: it returns from recv() and exits; kill it if it does not.
        self._process.join(timeout=2.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
