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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


# The file format, validated by pydantic so a hand-edited or torn file is caught whole.


class _EndpointRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str
    port: int = Field(ge=1, le=65535)


class _PeerRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    public_key: str
    endpoint: _EndpointRecord | None
    allowed_ips: list[str]
    taken_from_hub: list[str] = Field(default_factory=list)
    added_at: float = 0.0


class _InterfaceRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peers: list[_PeerRecord]


class _LedgerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    interfaces: dict[str, _InterfaceRecord]


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


def _from_file(data: _LedgerFile) -> Ledger:
    """Convert a validated file; raises ValueError on a bad address or network."""
    interfaces: dict[str, InterfaceLedger] = {}
    for name, record in data.interfaces.items():
        peers = [
            LedgerPeer(
                public_key=p.public_key,
                endpoint=None
                if p.endpoint is None
                else Endpoint(ip_address(p.endpoint.address), p.endpoint.port),
                allowed_ips=tuple(ip_network(n) for n in p.allowed_ips),
                taken_from_hub=tuple(ip_network(n) for n in p.taken_from_hub),
                added_at=p.added_at,
            )
            for p in record.peers
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
            version = json.loads(raw).get("version")
        except (ValueError, AttributeError):
            return self._set_aside("not JSON or torn")
        if version not in READABLE_VERSIONS:
            return self._set_aside(f"unknown version {version!r} (this agent reads {VERSION})")
        try:
            return _from_file(_LedgerFile.model_validate_json(raw))
        except (ValidationError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            return self._set_aside(f"not a ledger: {first}")

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
