"""Where registrations survive a restart: a small interface, its SQLite backend, and the
group commit in front of it. The PostgreSQL backend, shared by several servers, is in
``pgstore``; ``open_store`` picks one from the ``db`` setting.

The registry stays the source of truth while running. ``GroupCommit`` writes what
changed in batches, one transaction each: a change of content is written before the
request that made it is answered, while an unchanged report, which only pushes its
expiry back, is written with a later batch (see ``GroupCommit`` for what a crash can
lose). Reloaded registrations are still subject to their TTL and to the hub's current
view of each client.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from wg_autopeer.errors import WgAutopeerError
from wg_autopeer.server.matching import GroupKey, PublicIdentity, Registration, ReportedLan
from wg_autopeer.wireguard.base import IPAddress

log = logging.getLogger(__name__)

# SQLite's schema, in ``PRAGMA user_version``; each entry of SQLITE_MIGRATIONS takes the
# schema from its index to the next version.
SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE IF NOT EXISTS registrations ("
        " pubkey TEXT PRIMARY KEY, body TEXT NOT NULL, expires_at REAL NOT NULL)",
    ),
)
SCHEMA_VERSION = len(SQLITE_MIGRATIONS)
# Expiry refreshes of unchanged reports are written at most this often.
REFRESH_WRITE_S = 10.0
# After a failed write, retry after this long, doubling up to RETRY_MAX_S: a retry is
# one connection attempt, and the longest wait is how late an outage's writes land.
RETRY_MIN_S = 1.0
RETRY_MAX_S = 10.0
POSTGRES_SCHEMES = ("postgresql", "postgres")
# "scheme:" (two letters at least, so a drive letter is no scheme).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class StoreError(WgAutopeerError):
    """The registration store at ``location`` could not be opened or written.

    ``retryable``: the same operation may work later (the database is unreachable),
    as opposed to a store that will never work as it is (a newer schema).
    """

    def __init__(self, location: str, reason: str, *, retryable: bool = False) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason
        self.retryable = retryable


class SchemaTooNew(StoreError):
    """The store was written by a newer wg-autopeer (its schema ``found`` > ``supported``)."""

    def __init__(self, location: str, found: int, supported: int) -> None:
        super().__init__(
            location,
            f"schema version {found} is newer than this wg-autopeer knows ({supported});"
            " upgrade wg-autopeer or point it at another database",
        )
        self.found = found
        self.supported = supported


def db_scheme(db: str) -> str | None:
    """The URL scheme of a ``db`` setting, lower-case; None for a file path or ``:memory:``."""
    match = _SCHEME.match(db)
    return match.group(1).lower() if match else None


def is_postgres_url(db: str) -> bool:
    return db_scheme(db) in POSTGRES_SCHEMES


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def group_text(key: GroupKey) -> str:
    """A LAN group as text (a notification's payload, a stored group)."""
    return f"{key.public_ip}|{key.gateway}|{key.network}"


def parse_group_text(text: str) -> GroupKey:
    """Inverse of ``group_text``; raises ``ValueError`` on anything else."""
    public_text, gateway_text, network_text = text.split("|")
    public: PublicIdentity
    if "/" in public_text:
        network = ip_network(public_text)
        if not isinstance(network, IPv6Network):
            raise ValueError(f"{public_text}: an IPv4 public identity is an address")
        public = network
    else:
        address = ip_address(public_text)
        if not isinstance(address, IPv4Address):
            raise ValueError(f"{public_text}: an IPv6 public identity is a /64")
        public = address
    return GroupKey(public, ip_address(gateway_text), ip_network(network_text))


@dataclass(frozen=True)
class Removal:
    """A registration to forget; a shared store forgets it only while the stored one is
    no newer (another hub or instance may have registered the client since)."""

    registration: Registration


class RegistrationStore(abc.ABC):
    """Durable copy of the registry, keyed by public key."""

    # True when writes wait on the network: the group commit then runs them in a thread.
    blocking = False

    @abc.abstractmethod
    def load_all(self) -> list[Registration]:
        """Every stored registration, expired ones included (the registry filters)."""

    @abc.abstractmethod
    def put(self, registration: Registration) -> None:
        """Insert or replace the registration of ``registration.pubkey``."""

    @abc.abstractmethod
    def delete(self, pubkey: str) -> None:
        """Forget ``pubkey``; forgetting an unknown key is not an error."""

    def write_batch(self, puts: Iterable[Registration], deletes: Iterable[str]) -> None:
        """Insert or replace ``puts`` and forget ``deletes``; a backend makes it one
        transaction where it can."""
        for registration in puts:
            self.put(registration)
        for pubkey in deletes:
            self.delete(pubkey)

    def write_changes(
        self,
        puts: Collection[Registration],
        removals: Collection[Removal],
        changed: Collection[str],
    ) -> None:
        """What the group commit calls: ``puts`` (``changed`` names those whose content
        changed, the others only push their expiry back) and ``removals``."""
        self.write_batch(puts, [r.registration.pubkey for r in removals])

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources."""


class SharedStore(RegistrationStore):
    """A store that several server instances write: each instance learns the others'
    registrations from it, and is told which LAN groups they changed."""

    blocking = True
    # Where it is, for messages (a URL without its password).
    location = ""

    @abc.abstractmethod
    def load_groups(self, groups: Collection[str]) -> list[Registration]:
        """The live and expired registrations in any of ``groups`` (``group_text``)."""

    @abc.abstractmethod
    def load_keys(self, pubkeys: Collection[str]) -> list[Registration]:
        """The stored registrations of ``pubkeys`` (absent ones are left out)."""

    @abc.abstractmethod
    def purge_expired(self, before: float) -> int:
        """Forget registrations that expired before ``before`` (those of a dead instance);
        returns how many."""

    @abc.abstractmethod
    async def follow(
        self, on_groups: Callable[[set[str]], None], on_connected: Callable[[], None]
    ) -> None:
        """Until cancelled: call ``on_groups`` with the groups other instances changed,
        and ``on_connected`` each time the feed (re)connects (what was missed meanwhile
        must be re-read). Raises ``StoreError`` when the feed is lost."""


def open_store(db: str, *, hub: str) -> RegistrationStore:
    """The store a ``db`` setting names: a PostgreSQL URL, or a SQLite file (``:memory:``).

    Raises ``StoreError`` for another URL scheme, and when the store cannot be opened.
    """
    scheme = db_scheme(db)
    if scheme in POSTGRES_SCHEMES:
        from wg_autopeer.server.pgstore import PostgresStore

        return PostgresStore(db, hub=hub)
    if scheme is not None:
        raise StoreError(
            redact_url(db),
            f"unsupported scheme {scheme!r}: use postgresql://USER@HOST:PORT/DBNAME,"
            " a SQLite file path, or :memory:",
        )
    return SqliteStore(db)


def encode(registration: Registration) -> str:
    """Canonical JSON of a registration (the stored form)."""
    return json.dumps(
        {
            "pubkey": registration.pubkey,
            "tunnel_ips": [str(ip) for ip in registration.tunnel_ips],
            "public_ip": str(registration.public_ip),
            "lans": [
                {
                    "address": str(lan.address),
                    "prefix": lan.prefix,
                    "gateway": str(lan.gateway),
                    "listen_port": lan.listen_port,
                    "gateway_mac": lan.gateway_mac,
                }
                for lan in registration.lans
            ],
            "expires_at": registration.expires_at,
            "hub": registration.hub,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def decode(text: str, shared: dict[str, IPAddress] | None = None) -> Registration:
    """Inverse of ``encode``; raises ``ValueError``/``KeyError``/``TypeError`` on a bad row.

    ``shared``: addresses already decoded, by their text, reused (and added to): the
    clients of one LAN share their public address and gateway, so a load of many rows
    keeps one object of each instead of one per row. The key is interned (the hub view
    holds the same).
    """
    data = json.loads(text)
    public: PublicIdentity
    if "/" in data["public_ip"]:
        network = ip_network(data["public_ip"])
        if not isinstance(network, IPv6Network):
            raise ValueError("an IPv4 public identity is an address, not a network")
        public = network
    else:
        address = _address(data["public_ip"], shared)
        if not isinstance(address, IPv4Address):
            raise ValueError("an IPv6 public identity is a /64, not an address")
        public = address
    return Registration(
        pubkey=sys.intern(str(data["pubkey"])),
        tunnel_ips=tuple(ip_address(ip) for ip in data["tunnel_ips"]),
        public_ip=public,
        lans=tuple(
            ReportedLan(
                address=ip_address(lan["address"]),
                prefix=int(lan["prefix"]),
                gateway=_address(lan["gateway"], shared),
                listen_port=None if lan["listen_port"] is None else int(lan["listen_port"]),
                # Rows written before the fingerprint existed have none.
                gateway_mac=lan.get("gateway_mac"),
            )
            for lan in data["lans"]
        ),
        expires_at=float(data["expires_at"]),
        # Rows written before several hubs could share a store name none.
        hub=str(data.get("hub", "")),
    )


def _address(text: str, shared: dict[str, IPAddress] | None) -> IPAddress:
    # A row's JSON may hold anything: only text is shared (ip_address refuses the rest).
    if shared is None or not isinstance(text, str):
        return ip_address(text)
    address = shared.get(text)
    if address is None:
        address = shared[text] = ip_address(text)
    return address


class SqliteStore(RegistrationStore):
    """Registrations in one SQLite table; ``":memory:"`` keeps them in this process only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                db_path = Path(self.path)
                db_path.parent.mkdir(parents=True, exist_ok=True)
                # Registrations name clients and their LANs: readable by the server only.
                db_path.touch(mode=0o600, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                # Soft state: losing the last few writes on power loss only costs a re-report.
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(self.path, str(exc)) from exc

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            self._db.close()
            raise SchemaTooNew(self.path, version, SCHEMA_VERSION)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for step in SQLITE_MIGRATIONS[version:]:
                for statement in step:
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def load_all(self) -> list[Registration]:
        loaded = []
        unreadable = []
        shared: dict[str, IPAddress] = {}
        try:
            # Row by row, not fetchall(): every row's text at once is tens of megabytes at
            # 100 000 clients, and the process keeps that memory once the load is over.
            for pubkey, body in self._db.execute("SELECT pubkey, body FROM registrations"):
                try:
                    loaded.append(decode(body, shared))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning(
                        "store %s: dropping unreadable row for %s: %s", self.path, pubkey, exc
                    )
                    unreadable.append(pubkey)
        except sqlite3.Error as exc:
            raise StoreError(self.path, str(exc)) from exc
        for pubkey in unreadable:
            self.delete(pubkey)
        return loaded

    def put(self, registration: Registration) -> None:
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO registrations (pubkey, body, expires_at) VALUES (?, ?, ?)",
                (registration.pubkey, encode(registration), registration.expires_at),
            )
        except sqlite3.Error as exc:
            raise StoreError(self.path, str(exc)) from exc

    def delete(self, pubkey: str) -> None:
        try:
            self._db.execute("DELETE FROM registrations WHERE pubkey = ?", (pubkey,))
        except sqlite3.Error as exc:
            raise StoreError(self.path, str(exc)) from exc

    def write_batch(self, puts: Iterable[Registration], deletes: Iterable[str]) -> None:
        rows = [(r.pubkey, encode(r), r.expires_at) for r in puts]
        gone = [(pubkey,) for pubkey in deletes]
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO registrations (pubkey, body, expires_at)"
                    " VALUES (?, ?, ?)",
                    rows,
                )
                self._db.executemany("DELETE FROM registrations WHERE pubkey = ?", gone)
        except sqlite3.Error as exc:
            raise StoreError(self.path, str(exc)) from exc

    def close(self) -> None:
        self._db.close()


class GroupCommit:
    """Batches the registry's writes to a store: one transaction for many changes.

    What a crash of the server can lose, and what it cannot:

    * a new registration, a change of LANs or addresses, and a leave are written
      before the request that made them is answered (``durable``): an answered
      registration is never lost. Requests changing content at the same moment share
      one transaction.
    * an unchanged report only pushes its expiry back, in memory; those refreshes are
      written at most every ``refresh_every`` seconds. A crash loses at most that last
      batch: after a restart such a client may expire up to that much earlier than it
      would have, until its next report (agents report well within the TTL).
    * drops decided by the server (TTL, roaming, stale handshake) are written with the
      next batch; one lost in a crash comes back at reload, where the TTL and the first
      read of the hub judge it again.

    While the store fails (a database that is unreachable), the server keeps answering
    from memory: requests are answered without waiting for the store, each failed batch
    is queued again under what changed since, and the writes are retried with back-off
    (``failing`` says so). Nothing acknowledged is lost unless the process dies before
    the store comes back.

    SQLite runs in WAL mode with ``synchronous=NORMAL``: "written" survives a crash of
    the process, while a power loss may still take the latest transactions. A store that
    waits on the network (``blocking``) is written from a thread, one batch at a time.
    """

    def __init__(
        self,
        store: RegistrationStore,
        *,
        refresh_every: float = REFRESH_WRITE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.refresh_every = refresh_every
        self._monotonic = monotonic
        # Content changes by key (a Removal: forget it), written before their request
        # is answered.
        self._content: dict[str, Registration | Removal] = {}
        # Expiry refreshes by key, written lazily.
        self._refreshes: dict[str, Registration] = {}
        self._written_at = monotonic()
        self._commit: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        # Transactions attempted, for tests and metrics.
        self.batches = 0
        # The latest failure while the store keeps failing; None when it works.
        self.failing: StoreError | None = None
        self.failures = 0
        self._retry_at = 0.0
        self._retry_delay = 0.0

    @property
    def queued(self) -> int:
        """Changes waiting to be written."""
        return len(self._content) + len(self._refreshes)

    def put(self, registration: Registration) -> None:
        self._refreshes.pop(registration.pubkey, None)
        self._content[registration.pubkey] = registration

    def refresh(self, registration: Registration) -> None:
        if registration.pubkey in self._content:
            self._content[registration.pubkey] = registration
        else:
            self._refreshes[registration.pubkey] = registration

    def delete(self, registration: Registration) -> None:
        self._refreshes.pop(registration.pubkey, None)
        self._content[registration.pubkey] = Removal(registration)

    async def durable(self) -> None:
        """Return once every content change queued so far is written, or at once while
        the store fails (the retries write it)."""
        if not self._content or self.failing is not None:
            return
        loop = asyncio.get_running_loop()
        if self._commit is not None and self._commit.get_loop() is not loop:
            # Left pending by an event loop that stopped (tests run several): write it now.
            self._commit, self._writer = None, None
            self.flush()
        if self._commit is None:
            self._commit = loop.create_future()
            # The next turn of the loop: changes queued by other requests meanwhile join.
            loop.call_soon(self._start_write)
        # Shielded: a request giving up must not fail the batch for the others.
        await asyncio.shield(self._commit)

    def _start_write(self) -> None:
        if not self.store.blocking:
            commit, self._commit = self._commit, None
            self.flush()
            if commit is not None and not commit.done():
                commit.set_result(None)
        elif self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_in_thread(), name="store-write")

    async def _write_in_thread(self) -> None:
        # One transaction at a time, in order; the commits waiting meanwhile share the next.
        while True:
            commit, self._commit = self._commit, None
            batch = self._take()
            if batch is not None:
                try:
                    await asyncio.to_thread(self._write, batch)
                except StoreError as exc:
                    self._failed(batch, exc)
                else:
                    self._succeeded()
            if commit is not None and not commit.done():
                commit.set_result(None)
            if self._commit is None:
                return

    def flush_due(self) -> None:
        """Write what is queued if the last batch is ``refresh_every`` old, or retry a
        failed one whose back-off is over (the timer)."""
        if not (self._content or self._refreshes):
            return
        now = self._monotonic()
        due = (
            now >= self._retry_at
            if self.failing is not None
            else now - self._written_at >= self.refresh_every
        )
        if not due:
            return
        if self.store.blocking:
            if self._writer is None or self._writer.done():
                self._writer = asyncio.create_task(self._write_in_thread(), name="store-write")
        else:
            self.flush()

    def retry_now(self) -> None:
        """The store is known to work again (its change feed reconnected): retry the
        failed writes now rather than at the end of their back-off."""
        if self.failing is not None:
            self._retry_at = 0.0
            self.flush_due()

    def flush(self) -> None:
        """Write everything queued now, in one transaction, on this thread (shutdown)."""
        batch = self._take()
        if batch is None:
            return
        try:
            self._write(batch)
        except StoreError as exc:
            self._failed(batch, exc)
        else:
            self._succeeded()

    def _take(
        self,
    ) -> tuple[dict[str, Registration | Removal], dict[str, Registration]] | None:
        self._written_at = self._monotonic()
        if not self._content and not self._refreshes:
            return None
        content, self._content = self._content, {}
        refreshes, self._refreshes = self._refreshes, {}
        return content, refreshes

    def _write(
        self, batch: tuple[dict[str, Registration | Removal], dict[str, Registration]]
    ) -> None:
        content, refreshes = batch
        puts = [*refreshes.values(), *(r for r in content.values() if isinstance(r, Registration))]
        removals = [r for r in content.values() if isinstance(r, Removal)]
        changed = [k for k, r in content.items() if isinstance(r, Registration)]
        self.batches += 1
        self.store.write_changes(puts, removals, changed)

    def _failed(
        self,
        batch: tuple[dict[str, Registration | Removal], dict[str, Registration]],
        exc: StoreError,
    ) -> None:
        content, refreshes = batch
        # Queue it again under whatever changed since: the newer change wins.
        for key, change in content.items():
            if key not in self._content:
                self._refreshes.pop(key, None)
                self._content[key] = change
        for key, registration in refreshes.items():
            if key not in self._content and key not in self._refreshes:
                self._refreshes[key] = registration
        self.failures += 1
        self._retry_delay = min(RETRY_MAX_S, max(RETRY_MIN_S, 2 * self._retry_delay))
        self._retry_at = self._monotonic() + self._retry_delay
        if self.failing is None:
            # The registry keeps serving from memory.
            log.error("store write failed, answering from memory and retrying: %s", exc)
        self.failing = exc

    def _succeeded(self) -> None:
        if self.failing is not None:
            log.warning("store writable again after %d failed writes", self.failures)
        self.failing = None
        self._retry_delay = 0.0
