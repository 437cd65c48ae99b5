"""The ledger: which peers this agent added, so it only ever removes its own.

A WireGuard device does not say who configured a peer. The agent writes down
every direct peer before it adds it, and the host routes the hub peer lost to
it (WireGuard moves an allowed IP to the last peer that claims it), so that on
removal it can give them back.

On disk: versioned JSON, written atomically (temp file in the same directory,
fsync, ``os.replace``), mode 0600 in a 0700 directory. A missing file is an
empty ledger. A torn, garbage or unknown-version file is renamed aside
(``<name>.corrupt-<timestamp>``) and read as empty: the agent then removes
nothing it cannot prove it added — the safe default.

The store does blocking file I/O on purpose: the file is tiny, and keeping
load-modify-save free of ``await`` means two interfaces reconciled by one event
loop cannot interleave their updates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import Any

from wg_autopeer.errors import LedgerError
from wg_autopeer.wireguard.base import Endpoint, IPNetwork

log = logging.getLogger(__name__)

VERSION = 2
# Version 1 had the same fields, with an endpoint always set: it reads as is.
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class LedgerPeer:
    """One direct peer the agent added on an interface."""

    public_key: str
    # The endpoint the agent configured; None for a passive peer.
    endpoint: Endpoint | None
    # The tunnel routes on the peer now: none while its path is not proven yet.
    allowed_ips: tuple[IPNetwork, ...]
    # Host routes the hub peer carried explicitly when this peer took them; given back on removal.
    taken_from_hub: tuple[IPNetwork, ...] = ()
    # Epoch seconds of the latest add or change of this peer (health measures from it).
    added_at: float = 0.0


@dataclass(frozen=True)
class InterfaceLedger:
    """The peers the agent added on one interface, by public key."""

    peers: Mapping[str, LedgerPeer] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, peers: Iterable[LedgerPeer]) -> InterfaceLedger:
        return cls(MappingProxyType({p.public_key: p for p in peers}))

    def __contains__(self, public_key: object) -> bool:
        return public_key in self.peers

    def __iter__(self) -> Iterator[LedgerPeer]:
        return iter(self.peers.values())

    def __len__(self) -> int:
        return len(self.peers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InterfaceLedger) and dict(self.peers) == dict(other.peers)

    def __hash__(self) -> int:
        return hash(frozenset(self.peers.items()))

    def get(self, public_key: str) -> LedgerPeer | None:
        return self.peers.get(public_key)

    def union(self, other: InterfaceLedger) -> InterfaceLedger:
        """Every peer of either ledger; for a key in both, ``other``'s entry with the
        host routes taken from the hub of both, so none is forgotten."""
        merged = dict(self.peers)
        for peer in other:
            old = merged.get(peer.public_key)
            if old is not None:
                taken = tuple(dict.fromkeys((*old.taken_from_hub, *peer.taken_from_hub)))
                peer = LedgerPeer(
                    peer.public_key, peer.endpoint, peer.allowed_ips, taken, peer.added_at
                )
            merged[peer.public_key] = peer
        return InterfaceLedger(MappingProxyType(merged))


@dataclass(frozen=True)
class Ledger:
    """The ledgers of every interface the agent manages."""

    interfaces: Mapping[str, InterfaceLedger] = field(default_factory=lambda: MappingProxyType({}))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ledger) and dict(self.interfaces) == dict(other.interfaces)

    def __hash__(self) -> int:
        return hash(frozenset(self.interfaces.items()))

    def interface(self, name: str) -> InterfaceLedger:
        """The ledger of ``name``; empty when the agent never added a peer there."""
        return self.interfaces.get(name) or InterfaceLedger()

    def with_interface(self, name: str, ledger: InterfaceLedger) -> Ledger:
        """A copy with ``name``'s ledger replaced; an empty one is dropped."""
        interfaces = dict(self.interfaces)
        if len(ledger):
            interfaces[name] = ledger
        else:
            interfaces.pop(name, None)
        return Ledger(MappingProxyType(interfaces))


# The file format is checked whole, field by field, so a hand-edited or torn file is
# caught before any of it is trusted: unknown fields, wrong types and bad addresses are
# all refused (by hand: the agent carries no validation library for one small file).
_PEER_FIELDS = {"public_key", "endpoint", "allowed_ips", "taken_from_hub", "added_at"}


def _fields(value: Any, where: str, known: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: not an object")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    missing = sorted(required - set(value))
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}")
    return value


def _texts(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: not a list of strings")
    return value


def _endpoint_from_file(value: Any, where: str) -> Endpoint | None:
    if value is None:
        return None
    record = _fields(value, where, {"address", "port"}, {"address", "port"})
    port = record["port"]
    if not isinstance(record["address"], str):
        raise ValueError(f"{where}.address: not a string")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{where}.port: not a port number")
    return Endpoint(ip_address(record["address"]), port)


def _peer_from_file(value: Any, where: str) -> LedgerPeer:
    record = _fields(value, where, _PEER_FIELDS, {"public_key", "endpoint", "allowed_ips"})
    added_at = record.get("added_at", 0.0)
    if not isinstance(record["public_key"], str):
        raise ValueError(f"{where}.public_key: not a string")
    if isinstance(added_at, bool) or not isinstance(added_at, int | float):
        raise ValueError(f"{where}.added_at: not a number")
    return LedgerPeer(
        public_key=record["public_key"],
        endpoint=_endpoint_from_file(record["endpoint"], f"{where}.endpoint"),
        allowed_ips=tuple(
            ip_network(n) for n in _texts(record["allowed_ips"], f"{where}.allowed_ips")
        ),
        taken_from_hub=tuple(
            ip_network(n)
            for n in _texts(record.get("taken_from_hub", []), f"{where}.taken_from_hub")
        ),
        added_at=float(added_at),
    )


def _to_json(ledger: Ledger) -> dict[str, Any]:
    return {
        "version": VERSION,
        "interfaces": {
            name: {
                "peers": [
                    {
                        "public_key": p.public_key,
                        "endpoint": None
                        if p.endpoint is None
                        else {"address": str(p.endpoint.address), "port": p.endpoint.port},
                        "allowed_ips": [str(n) for n in p.allowed_ips],
                        "taken_from_hub": [str(n) for n in p.taken_from_hub],
                        "added_at": p.added_at,
                    }
                    for p in sorted(iface, key=lambda p: p.public_key)
                ]
            }
            for name, iface in sorted(ledger.interfaces.items())
        },
    }


def _from_file(data: Any) -> Ledger:
    """Check and convert the file's JSON; raises ValueError naming what is wrong."""
    top = _fields(data, "ledger", {"version", "interfaces"}, {"version", "interfaces"})
    if not isinstance(top["interfaces"], dict):
        raise ValueError("interfaces: not an object")
    interfaces: dict[str, InterfaceLedger] = {}
    for name, value in top["interfaces"].items():
        record = _fields(value, f"interfaces.{name}", {"peers"}, {"peers"})
        if not isinstance(record["peers"], list):
            raise ValueError(f"interfaces.{name}.peers: not a list")
        peers = [
            _peer_from_file(p, f"interfaces.{name}.peers.{i}")
            for i, p in enumerate(record["peers"])
        ]
        if peers:
            interfaces[name] = InterfaceLedger.of(peers)
    return Ledger(MappingProxyType(interfaces))


class LedgerStore:
    """Loads and saves the ledger at ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> Ledger:
        """The saved ledger; empty when there is none or it cannot be trusted.

        Raises ``LedgerError`` only when the file exists but cannot be read at all.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Ledger()
        except OSError as exc:
            raise LedgerError(f"cannot read ledger {self.path}: {exc}") from exc
        try:
            data = json.loads(raw)
            version = data.get("version")
        except (ValueError, AttributeError, RecursionError):
            return self._set_aside("not JSON or torn")
        if version not in READABLE_VERSIONS:
            return self._set_aside(f"unknown version {version!r} (this agent reads {VERSION})")
        try:
            return _from_file(data)
        except ValueError as exc:
            return self._set_aside(f"not a ledger: {exc}")

    def _set_aside(self, why: str) -> Ledger:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            log.warning("ledger %s is %s; could not rename it aside: %s", self.path, why, exc)
        else:
            log.warning("ledger %s is %s; moved to %s, starting empty", self.path, why, aside)
        return Ledger()

    def save(self, ledger: Ledger) -> None:
        """Write ``ledger`` atomically; raises ``LedgerError`` when it could not."""
        data = json.dumps(_to_json(ledger), indent=2, sort_keys=True).encode() + b"\n"
        directory = self.path.parent
        tmp: str | None = None
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkstemp creates the file 0600; same directory so os.replace is an atomic rename.
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            tmp = None
            _fsync_dir(directory)
        except OSError as exc:
            raise LedgerError(f"cannot write ledger {self.path}: {exc}") from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def remove_stale_temp_files(self) -> int:
        """Delete half-written ledgers a killed agent left (``.<name>.*.tmp``); how many.

        Only at start-up: one agent owns the state dir, and no save of it runs yet.
        """
        removed = 0
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed += 1
        return removed

    def update_interface(self, name: str, ledger: InterfaceLedger) -> Ledger:
        """Replace the ledger of one interface on disk; returns the whole new ledger."""
        updated = self.load().with_interface(name, ledger)
        self.save(updated)
        return updated


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is; some filesystems refuse this.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CachedLedgerStore(LedgerStore):
    """A ``LedgerStore`` that reads the file once and then serves its own writes.

    The agent is the only writer of its ledger, so after the first read the copy in
    memory is the truth; the health checker and every cycle read it without touching
    the disk. Writes still go to disk first (atomically) and only then to the cache.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._cached: Ledger | None = None

    def load(self) -> Ledger:
        if self._cached is None:
            self._cached = super().load()
        return self._cached

    def save(self, ledger: Ledger) -> None:
        super().save(ledger)
        self._cached = ledger
