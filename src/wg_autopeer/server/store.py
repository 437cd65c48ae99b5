"""Where registrations survive a restart: a small interface, its SQLite backend, and the
group commit in front of it.

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
import sqlite3
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Network, ip_address, ip_network
from pathlib import Path

from wg_autopeer.errors import WgAutopeerError
from wg_autopeer.server.matching import PublicIdentity, Registration, ReportedLan

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Expiry refreshes of unchanged reports are written at most this often.
REFRESH_WRITE_S = 10.0


class StoreError(WgAutopeerError):
    """The registration store could not be opened or written."""


class RegistrationStore(abc.ABC):
    """Durable copy of the registry, keyed by public key."""

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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources."""


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
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def decode(text: str) -> Registration:
    """Inverse of ``encode``; raises ``ValueError``/``KeyError``/``TypeError`` on a bad row."""
    data = json.loads(text)
    public: PublicIdentity
    if "/" in data["public_ip"]:
        network = ip_network(data["public_ip"])
        if not isinstance(network, IPv6Network):
            raise ValueError("an IPv4 public identity is an address, not a network")
        public = network
    else:
        address = ip_address(data["public_ip"])
        if not isinstance(address, IPv4Address):
            raise ValueError("an IPv6 public identity is a /64, not an address")
        public = address
    return Registration(
        pubkey=str(data["pubkey"]),
        tunnel_ips=tuple(ip_address(ip) for ip in data["tunnel_ips"]),
        public_ip=public,
        lans=tuple(
            ReportedLan(
                address=ip_address(lan["address"]),
                prefix=int(lan["prefix"]),
                gateway=ip_address(lan["gateway"]),
                listen_port=None if lan["listen_port"] is None else int(lan["listen_port"]),
                # Rows written before the fingerprint existed have none.
                gateway_mac=lan.get("gateway_mac"),
            )
            for lan in data["lans"]
        ),
        expires_at=float(data["expires_at"]),
    )


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
            raise StoreError(f"{self.path}: {exc}") from exc

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        if version not in (0, SCHEMA_VERSION):
            # Soft state from another schema is not worth converting: clients re-report it.
            log.warning("store %s has schema %s, starting empty", self.path, version)
            self._db.execute("DROP TABLE IF EXISTS registrations")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS registrations ("
            " pubkey TEXT PRIMARY KEY, body TEXT NOT NULL, expires_at REAL NOT NULL)"
        )
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def load_all(self) -> list[Registration]:
        try:
            rows = self._db.execute("SELECT pubkey, body FROM registrations").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        loaded = []
        for pubkey, body in rows:
            try:
                loaded.append(decode(body))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("store %s: dropping unreadable row for %s: %s", self.path, pubkey, exc)
                self.delete(pubkey)
        return loaded

    def put(self, registration: Registration) -> None:
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO registrations (pubkey, body, expires_at) VALUES (?, ?, ?)",
                (registration.pubkey, encode(registration), registration.expires_at),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def delete(self, pubkey: str) -> None:
        try:
            self._db.execute("DELETE FROM registrations WHERE pubkey = ?", (pubkey,))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

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
            raise StoreError(f"{self.path}: {exc}") from exc

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

    SQLite runs in WAL mode with ``synchronous=NORMAL``: "written" survives a crash of
    the process, while a power loss may still take the latest transactions.
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
        # Content changes by key (None: delete), written before their request is answered.
        self._content: dict[str, Registration | None] = {}
        # Expiry refreshes by key, written lazily.
        self._refreshes: dict[str, Registration] = {}
        self._written_at = monotonic()
        self._commit: asyncio.Future[None] | None = None
        # Transactions written, for tests and metrics.
        self.batches = 0

    def put(self, registration: Registration) -> None:
        self._refreshes.pop(registration.pubkey, None)
        self._content[registration.pubkey] = registration

    def refresh(self, registration: Registration) -> None:
        if registration.pubkey in self._content:
            self._content[registration.pubkey] = registration
        else:
            self._refreshes[registration.pubkey] = registration

    def delete(self, pubkey: str) -> None:
        self._refreshes.pop(pubkey, None)
        self._content[pubkey] = None

    async def durable(self) -> None:
        """Return once every content change queued so far is written."""
        if not self._content:
            return
        loop = asyncio.get_running_loop()
        if self._commit is not None and self._commit.get_loop() is not loop:
            # Left pending by an event loop that stopped (tests run several): write it now.
            self._write_shared()
        if self._commit is None:
            self._commit = loop.create_future()
            # The next turn of the loop: changes queued by other requests meanwhile join.
            loop.call_soon(self._write_shared)
        # Shielded: a request giving up must not fail the batch for the others.
        await asyncio.shield(self._commit)

    def _write_shared(self) -> None:
        commit, self._commit = self._commit, None
        self.flush()
        if commit is not None and not commit.done():
            commit.set_result(None)

    def flush_due(self) -> None:
        """Write what is queued if the last batch is ``refresh_every`` old (the timer)."""
        if (self._content or self._refreshes) and (
            self._monotonic() - self._written_at >= self.refresh_every
        ):
            self.flush()

    def flush(self) -> None:
        """Write everything queued now, in one transaction."""
        self._written_at = self._monotonic()
        if not self._content and not self._refreshes:
            return
        content, self._content = self._content, {}
        refreshes, self._refreshes = self._refreshes, {}
        puts = [*refreshes.values(), *(r for r in content.values() if r is not None)]
        deletes = [pubkey for pubkey, r in content.items() if r is None]
        self.batches += 1
        try:
            self.store.write_batch(puts, deletes)
        except StoreError as exc:
            # The registry keeps serving; only a restart would lose these clients until
            # they report again.
            log.error("store write of %d changes failed: %s", len(puts) + len(deletes), exc)
