"""Reading the hub's device off the event loop, and parsing only the peers that changed.

At 100 000 clients one read of the device is tens of megabytes of UAPI text, and
parsing all of it takes over a second of Python: done on the event loop it would stall
every request. So a ``DeviceReader`` runs in one worker thread with its own connection
to the device (its own UAPI socket, or its own netlink socket in its own event loop),
compares each peer's raw record with the previous read, and hands the loop only a
``HubDelta``: the peers that are new or changed, parsed, and the keys that are gone.
Most reads change little (a handshake every two minutes per client), so the loop's
share is O(changes), never O(clients).

Byte and packet counters change all the time and mean nothing to the server: they are
left out of the records (and out of the parsed peers, whose counters read 0), so a
busy peer is not a changed peer.

The worker thread still shares the GIL with the loop. It reads in chunks and gives the
GIL back between them (``time.sleep(0)``), so the loop waits at most one chunk's work.
"""

from __future__ import annotations

import abc
import asyncio
import re
import socket
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wg_autopeer.errors import (
    DeviceRefused,
    NoSuchInterface,
    WireGuardError,
    WireGuardPermissionDenied,
)
from wg_autopeer.wireguard.base import PeerState, WireGuardControl

# Bytes per recv(); also the most text the reader handles between two GIL releases.
CHUNK = 128 * 1024
# Changed peers parsed per GIL release.
PARSE_BATCH = 100
# A device that does not answer within this time is treated as broken, not waited for.
READ_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HubDelta:
    """What one read found: peers new or changed since the previous read, keys gone.

    ``full``: the read handed every peer of the device (a first read, or one after
    the reader lost track), in ``changed`` or to ``read_each``'s sink; the view replaces
    everything it had.
    """

    changed: dict[str, PeerState]
    removed: frozenset[str] = frozenset()
    full: bool = False
    peers: int = 0

    def slices(self, size: int) -> Iterator[HubDelta]:
        """This delta in parts of at most ``size`` changed peers (not for a full one)."""
        items = list(self.changed.items())
        yield HubDelta(dict(items[:size]), self.removed, peers=self.peers)
        for start in range(size, len(items), size):
            yield HubDelta(dict(items[start : start + size]), peers=self.peers)


PeerSink = Callable[[list[PeerState]], None]


class DeviceReader(abc.ABC):
    """Reads one device from one worker thread; blocking calls, one at a time."""

    @abc.abstractmethod
    def read(self, *, full: bool = False) -> HubDelta:
        """Read the device; ``full`` forgets the previous read. Raises ``WireGuardError``."""

    def read_each(self, sink: PeerSink, *, full: bool = False) -> HubDelta:
        """As ``read``, but the changed peers go to ``sink`` a batch at a time, and the delta
        returned holds none of them. A reader that parses as it receives (UAPI) never holds
        every parsed peer of a full read at once: at 100 000 peers, freed or not, that
        memory stays with the process (its arenas are shared with what is kept)."""
        delta = self.read(full=full)
        peers = list(delta.changed.values())
        for start in range(0, len(peers), PARSE_BATCH):
            sink(peers[start : start + PARSE_BATCH])
        return HubDelta({}, delta.removed, full=delta.full, peers=delta.peers)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the reader's connection (called from the worker thread)."""


class StreamingReader(DeviceReader):
    """A reader that hands peers on as it parses them: ``read_each`` is its own, and
    ``read`` collects its batches (the other way round from ``DeviceReader``)."""

    @abc.abstractmethod
    def read_each(self, sink: PeerSink, *, full: bool = False) -> HubDelta:
        """See ``DeviceReader.read_each``."""

    def read(self, *, full: bool = False) -> HubDelta:
        changed: dict[str, PeerState] = {}

        def take(peers: list[PeerState]) -> None:
            changed.update((peer.public_key, peer) for peer in peers)

        delta = self.read_each(take, full=full)
        return HubDelta(changed, delta.removed, full=delta.full, peers=delta.peers)


def _yield_gil() -> None:
    # sleep(0) releases the GIL, so a waiting event loop runs before the next chunk.
    time.sleep(0)


def diff(
    previous: Mapping[str, Hashable], records: Mapping[str, Hashable]
) -> tuple[list[str], frozenset[str]]:
    """Keys whose record is new or different, and keys no longer present."""
    changed = [key for key, record in records.items() if previous.get(key) != record]
    # Every unchanged key was there before: if they add up, nothing is gone (no set built).
    if len(records) - len(changed) == len(previous):
        return changed, frozenset()
    return changed, frozenset(previous.keys() - records.keys())


# --------------------------------------------------------------------------- UAPI

# Counters: left out of the records (see the module docstring). Lines are kept with
# the newline before them, so a line is ``\nkey=value``.
_VOLATILE = re.compile(rb"\n(?:rx_bytes|tx_bytes)=[0-9]*(?=\n|\Z)")
_PEER = b"\npublic_key="
_ERRNO = b"\nerrno="


@dataclass
class _UapiStream:
    """Splits a ``get=1`` answer into per-peer records as it arrives, diffing as it goes.

    ``records`` (the previous read's record hashes, by hex key) is updated in place: an
    unchanged record is dropped as soon as it is compared, so no second copy of the
    device is kept and none has to be freed at once (freeing 100 000 records would hold
    the GIL). ``changed`` holds the records that are new or changed, in full.
    """

    records: dict[bytes, int]
    # If given, called with ``changed`` each time it holds ``PARSE_BATCH`` records (which
    # then start again from none), and at the end with the rest (``flush``).
    on_changed: Callable[[list[bytes]], None] | None = None
    seen: list[bytes] = field(default_factory=list)
    changed: list[bytes] = field(default_factory=list)
    # Seconds spent in ``on_changed``: our own work, not the device's slowness.
    handling_s: float = 0.0
    # The record being received: from just after its ``public_key=`` to here.
    pending: bytes = b""
    header_done: bool = False
    errno: int | None = None
    _buffer: bytes = b"\n"  # the answer's first line counts as preceded by a newline

    def feed(self, chunk: bytes) -> None:
        if self.errno is not None:
            return  # the blank line closing the answer
        buffer = self._buffer + chunk
        end = buffer.find(_ERRNO)
        if end >= 0:
            line_end = buffer.find(b"\n", end + 1)
            if line_end < 0:
                self._buffer = buffer  # the errno line is not complete yet
                return
            self.errno = int(buffer[end + len(_ERRNO) : line_end])
            self._add_lines(buffer[:end])
            self._add(self.pending)
            self.pending = b""
            return
        cut = buffer.rfind(b"\n")
        # Keep the last, possibly partial line (with its leading newline) for later.
        self._add_lines(buffer[:cut])
        self._buffer = buffer[cut:]

    def gone(self) -> list[bytes]:
        """Keys of the previous read that this one did not have (call at the end)."""
        if len(self.seen) == len(self.records):
            return []  # every record seen: nothing can be gone (no set built)
        return list(self.records.keys() - set(self.seen))

    def _add_lines(self, text: bytes) -> None:
        parts = _VOLATILE.sub(b"", self.pending + text).split(_PEER)
        self.pending = parts.pop()
        for part in parts:
            self._add(part)

    def _add(self, record: bytes) -> None:
        if not self.header_done:
            # Everything before the first public_key: the device's own lines.
            self.header_done = True
            return
        key = record[:64]
        self.seen.append(key)
        # What is kept of a record between reads: its hash, not its few hundred bytes. A
        # change goes unnoticed only if both records hash alike (SipHash, keyed per
        # process: 2**-64), and then only until the peer's next handshake changes it.
        # A cryptographic digest costs the reader half as much time again.
        digest = hash(record)
        if self.records.get(key) != digest:
            self.records[key] = digest
            self.changed.append(record)
            if self.on_changed is not None and len(self.changed) >= PARSE_BATCH:
                self.flush()

    def flush(self) -> None:
        """Hand the changed records not handed yet to ``on_changed``."""
        if self.on_changed is not None and self.changed:
            changed, self.changed = self.changed, []
            started = time.monotonic()
            self.on_changed(changed)
            self.handling_s += time.monotonic() - started


class UapiReader(StreamingReader):
    """Reads a userspace device (wireguard-go, boringtun) through its own UAPI connection.

    ``link_exists`` guards against a socket left by a device of another network
    namespace (the socket folder is shared); the server passes the real check.
    """

    def __init__(
        self,
        interface: str,
        socket_dir: Path | str,
        *,
        link_exists: Callable[[str], bool],
        timeout: float = READ_TIMEOUT_S,
    ) -> None:
        self.interface = interface
        self.path = Path(socket_dir) / f"{interface}.sock"
        self.link_exists = link_exists
        self.timeout = timeout
        # The previous read's record hashes, by hex key (see ``_UapiStream._add``).
        self._previous: dict[bytes, int] = {}

    def read_each(self, sink: PeerSink, *, full: bool = False) -> HubDelta:
        from wg_autopeer.wireguard.uapi import parse_device

        def parse(batch: list[bytes]) -> None:
            text = b"".join(b"public_key=" + record + b"\n" for record in batch)
            lines = text.decode("ascii", errors="replace").split("\n")
            sink(list(parse_device(self.interface, lines).peers))
            _yield_gil()

        if full:
            self._previous = {}
        first = not self._previous
        # Updated in place as the answer arrives: forget it unless the read completes.
        records, self._previous = self._previous, {}
        stream = self._receive(_UapiStream(records, parse))
        stream.flush()
        gone = stream.gone()
        for key in gone:
            del records[key]
        self._previous = records
        removed = frozenset(_key_from_hex(self.interface, key) for key in gone)
        return HubDelta({}, removed, full=first, peers=len(records))

    def _receive(self, stream: _UapiStream) -> _UapiStream:
        if not self.link_exists(self.interface):
            raise NoSuchInterface(self.interface, "no such link in this network namespace")
        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(b"get=1\n\n")
                while stream.errno is None:
                    chunk = sock.recv(CHUNK)
                    if not chunk:
                        raise DeviceRefused(self.interface, "device closed the socket mid-answer")
                    stream.feed(chunk)
                    if time.monotonic() - stream.handling_s > deadline:
                        raise TimeoutError
                    _yield_gil()
        except TimeoutError as exc:
            raise WireGuardError(
                self.interface, f"no full answer on {self.path} within {self.timeout}s"
            ) from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoSuchInterface(
                self.interface, f"no userspace device behind {self.path}"
            ) from exc
        except PermissionError as exc:
            raise WireGuardPermissionDenied(self.interface, f"cannot open {self.path}") from exc
        except OSError as exc:
            raise DeviceRefused(self.interface, f"socket error: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise DeviceRefused(self.interface, "unreadable errno in answer") from exc
        if stream.errno:
            from wg_autopeer.wireguard.uapi import reason_for_errno

            raise DeviceRefused(self.interface, reason_for_errno(stream.errno))
        return stream


def _key_from_hex(interface: str, key: bytes) -> str:
    from wg_autopeer.wireguard.uapi import key_from_hex

    try:
        return key_from_hex(key.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DeviceRefused(interface, "unreadable public_key in answer") from exc


# --------------------------------------------------------------------------- any backend

PeerRecord = tuple[object, ...]


class ControlReader(DeviceReader):
    """Reads through a ``WireGuardControl`` that ``open_control`` makes in the worker thread,
    on an event loop of that thread: the kernel's netlink backend, or a test's fake."""

    def __init__(
        self,
        interface: str,
        open_control: Callable[[], WireGuardControl],
        *,
        owned: bool = True,
    ) -> None:
        self.interface = interface
        self._open_control = open_control
        # False: the control belongs to someone else, who closes it.
        self._owned = owned
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control: WireGuardControl | None = None
        self._previous: dict[str, PeerRecord] = {}

    def read(self, *, full: bool = False) -> HubDelta:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        if self._control is None:
            self._control = self._open_control()
        device = self._loop.run_until_complete(self._control.get_device(self.interface))
        if full:
            self._previous = {}
        first = not self._previous
        peers = {p.public_key: p for p in device.peers}
        records: dict[str, PeerRecord] = {
            key: (p.allowed_ips, p.endpoint, p.latest_handshake, p.persistent_keepalive)
            for key, p in peers.items()
        }
        changed, gone = diff(self._previous, records)
        self._previous = records
        return HubDelta(
            {
                key: PeerState(
                    key,
                    peers[key].allowed_ips,
                    peers[key].endpoint,
                    peers[key].latest_handshake,
                    persistent_keepalive=peers[key].persistent_keepalive,
                )
                for key in changed
            },
            gone,
            full=first,
            peers=len(records),
        )

    def close(self) -> None:
        if self._loop is None:
            return
        if self._control is not None and self._owned:
            self._loop.run_until_complete(self._control.close())
        self._loop.close()


class AutoReader(DeviceReader):
    """The UAPI reader while a userspace device of that name is here, netlink otherwise,
    decided at every read as ``AutoControl`` does; a switch starts from a full read."""

    def __init__(
        self,
        interface: str,
        uapi: UapiReader,
        netlink: DeviceReader,
        *,
        has_uapi_device: Callable[[str], bool],
        link_exists: Callable[[str], bool],
    ) -> None:
        self.interface = interface
        self.uapi = uapi
        self.netlink = netlink
        self._has_uapi_device = has_uapi_device
        self._link_exists = link_exists
        self._last: DeviceReader | None = None

    def _choose(self) -> DeviceReader:
        if self._has_uapi_device(self.interface):
            return self.uapi
        if self._link_exists(self.interface):
            return self.netlink
        raise NoSuchInterface(self.interface, "no such interface in this network namespace")

    def read(self, *, full: bool = False) -> HubDelta:
        chosen = self._choose()
        switched = chosen is not self._last
        self._last = chosen
        return chosen.read(full=full or switched)

    def read_each(self, sink: PeerSink, *, full: bool = False) -> HubDelta:
        chosen = self._choose()
        switched = chosen is not self._last
        self._last = chosen
        return chosen.read_each(sink, full=full or switched)

    def close(self) -> None:
        self.uapi.close()
        self.netlink.close()


def auto_reader(interface: str, socket_dir: Path) -> AutoReader:
    """What the server reads a device it finds by name with: a userspace device's socket in
    ``socket_dir`` if there is one, the kernel's netlink otherwise (as ``AutoControl``)."""
    from wg_autopeer.wireguard.netlink import NetlinkControl
    from wg_autopeer.wireguard.uapi import has_uapi_socket, link_exists

    return AutoReader(
        interface,
        UapiReader(interface, socket_dir, link_exists=link_exists),
        ControlReader(interface, NetlinkControl),
        has_uapi_device=lambda name: has_uapi_socket(name, socket_dir),
        link_exists=link_exists,
    )


def reader_for(control: WireGuardControl, interface: str) -> DeviceReader:
    """The reader matching ``control``: its own connection to the same kind of device.

    Any other control (a test's fake) is read through itself, still in the worker thread.
    """
    from wg_autopeer.wireguard import AutoControl
    from wg_autopeer.wireguard.netlink import NetlinkControl
    from wg_autopeer.wireguard.uapi import UapiControl, link_exists

    if isinstance(control, AutoControl):
        return auto_reader(interface, control.uapi.socket_dir)
    if isinstance(control, UapiControl):
        return UapiReader(interface, control.socket_dir, link_exists=link_exists)
    if isinstance(control, NetlinkControl):
        return ControlReader(interface, NetlinkControl)
    return ControlReader(interface, lambda: control, owned=False)
