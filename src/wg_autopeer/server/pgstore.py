"""The registration store in PostgreSQL, shared by several server instances.

psycopg 3, not asyncpg: it ships its own type annotations (mypy strict checks our calls
into it, asyncpg has none), and it has both a blocking and an asyncio API. The group
commit writes through the blocking one from a worker thread (one connection, one
transaction per batch, as it does with SQLite: no pool is needed for one writer), and
the change feed LISTENs through the asyncio one on the event loop.

Each write of a change NOTIFYs, on one channel, every LAN group it touched (old and new
groups) with the writing instance's id; the other instances re-read just those groups
and wake only the waiters in them. Refreshes of unchanged reports notify nothing: an
instance re-reads a learnt registration when its local copy runs out (``load_keys``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Collection, Iterable
from typing import Any

import psycopg

from wg_autopeer.server.matching import Registration
from wg_autopeer.server.store import (
    Removal,
    SchemaTooNew,
    SharedStore,
    StoreError,
    decode,
    encode,
    group_text,
    redact_url,
)
from wg_autopeer.wireguard.base import IPAddress

log = logging.getLogger(__name__)

CHANNEL = "wg_autopeer_groups"
CONNECT_TIMEOUT_S = 5
# TCP keepalives: a database host that vanished (no RST) is noticed in ~20 s, not hours.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
# Serialises the migrations of instances starting at once (any constant will do).
MIGRATION_LOCK = 0x7767_6170  # "wgap"

# Each entry takes the schema from its index to the next version.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE registrations ("
        " pubkey text PRIMARY KEY,"
        " hub text NOT NULL,"
        " body text NOT NULL,"
        " groups text[] NOT NULL,"
        " expires_at double precision NOT NULL)",
        "CREATE INDEX registrations_groups ON registrations USING gin (groups)",
        "CREATE INDEX registrations_expiry ON registrations (expires_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# The latest report wins: a refresh written late by the instance a client left must not
# overwrite the registration its new hub wrote since.
_UPSERT = (
    "INSERT INTO registrations (pubkey, hub, body, groups, expires_at)"
    " VALUES (%s, %s, %s, %s, %s)"
    " ON CONFLICT (pubkey) DO UPDATE SET hub = excluded.hub, body = excluded.body,"
    " groups = excluded.groups, expires_at = excluded.expires_at"
    " WHERE registrations.expires_at <= excluded.expires_at"
)
# A removal forgets only a row no newer than the registration it drops.
_DELETE = "DELETE FROM registrations WHERE pubkey = %s AND expires_at <= %s"


def _groups(registration: Registration) -> list[str]:
    return sorted(group_text(key) for key in registration.group_keys())


class PostgresStore(SharedStore):
    """Registrations in one PostgreSQL table, with LAN-group change notifications."""

    def __init__(self, url: str, *, hub: str) -> None:
        self.url = url
        self.location = redact_url(url)
        self.hub = hub
        # Tells this instance's notifications from the others'.
        self.instance = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        with self._lock:
            self._migrate(self._connect())

    # -- connections -----------------------------------------------------------------------

    def _error(self, exc: psycopg.Error) -> StoreError:
        retryable = isinstance(exc, psycopg.OperationalError)
        if retryable and self._conn is not None:
            self._conn.close()
            self._conn = None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreError(self.location, f"PostgreSQL: {reason}", retryable=retryable)

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **KEEPALIVES
            )
        except psycopg.Error as exc:
            raise StoreError(
                self.location, f"cannot reach PostgreSQL: {exc}".strip(), retryable=True
            ) from exc
        return self._conn

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS wg_autopeer_schema (version integer NOT NULL)"
                )
                row = conn.execute("SELECT version FROM wg_autopeer_schema").fetchone()
                version = 0 if row is None else int(row[0])
                if version > SCHEMA_VERSION:
                    raise SchemaTooNew(self.location, version, SCHEMA_VERSION)
                for step in MIGRATIONS[version:]:
                    for statement in step:
                        conn.execute(statement)
                if row is None:
                    conn.execute("INSERT INTO wg_autopeer_schema VALUES (%s)", (SCHEMA_VERSION,))
                elif version != SCHEMA_VERSION:
                    conn.execute("UPDATE wg_autopeer_schema SET version = %s", (SCHEMA_VERSION,))
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _rows(self, query: str, params: tuple[Any, ...]) -> list[Registration]:
        with self._lock:
            try:
                rows = self._connect().execute(query, params).fetchall()
            except psycopg.Error as exc:
                raise self._error(exc) from exc
        loaded = []
        shared: dict[str, IPAddress] = {}
        for pubkey, body in rows:
            try:
                loaded.append(decode(body, shared))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "store %s: skipping unreadable row for %s: %s", self.location, pubkey, exc
                )
        return loaded

    # -- RegistrationStore -----------------------------------------------------------------

    def load_all(self) -> list[Registration]:
        return self._rows("SELECT pubkey, body FROM registrations", ())

    def load_groups(self, groups: Collection[str]) -> list[Registration]:
        return self._rows(
            "SELECT pubkey, body FROM registrations WHERE groups && %s::text[]", (list(groups),)
        )

    def load_keys(self, pubkeys: Collection[str]) -> list[Registration]:
        return self._rows(
            "SELECT pubkey, body FROM registrations WHERE pubkey = ANY(%s)", (list(pubkeys),)
        )

    def put(self, registration: Registration) -> None:
        self.write_changes([registration], [], [registration.pubkey])

    def delete(self, pubkey: str) -> None:
        with self._lock:
            try:
                self._connect().execute("DELETE FROM registrations WHERE pubkey = %s", (pubkey,))
            except psycopg.Error as exc:
                raise self._error(exc) from exc

    def write_batch(self, puts: Iterable[Registration], deletes: Iterable[str]) -> None:
        puts = list(puts)
        self.write_changes(puts, [], [r.pubkey for r in puts])
        for pubkey in deletes:
            self.delete(pubkey)

    def write_changes(
        self,
        puts: Collection[Registration],
        removals: Collection[Removal],
        changed: Collection[str],
    ) -> None:
        rows = [(r.pubkey, r.hub, encode(r), _groups(r), r.expires_at) for r in puts]
        gone = [(r.registration.pubkey, r.registration.expires_at) for r in removals]
        changed_set = set(changed)
        touched = {g for r in puts if r.pubkey in changed_set for g in _groups(r)}
        touched |= {g for r in removals for g in _groups(r.registration)}
        with self._lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    if touched:
                        # The groups the changed keys leave: their members must hear too.
                        keys = [*changed_set, *(key for key, _ in gone)]
                        old = conn.execute(
                            "SELECT DISTINCT unnest(groups) FROM registrations"
                            " WHERE pubkey = ANY(%s)",
                            (keys,),
                        ).fetchall()
                        touched |= {group for (group,) in old}
                    with conn.cursor() as cur:
                        if rows:
                            cur.executemany(_UPSERT, rows)
                        if gone:
                            cur.executemany(_DELETE, gone)
                    if touched:
                        conn.execute(
                            "SELECT pg_notify(%s, %s || ' ' || g) FROM unnest(%s::text[]) AS g",
                            (CHANNEL, self.instance, sorted(touched)),
                        )
            except psycopg.Error as exc:
                raise self._error(exc) from exc

    def purge_expired(self, before: float) -> int:
        with self._lock:
            try:
                cursor = self._connect().execute(
                    "DELETE FROM registrations WHERE expires_at < %s", (before,)
                )
            except psycopg.Error as exc:
                raise self._error(exc) from exc
        return max(cursor.rowcount, 0)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- the change feed -------------------------------------------------------------------

    async def follow(
        self, on_groups: Callable[[set[str]], None], on_connected: Callable[[], None]
    ) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **KEEPALIVES
            )
        except psycopg.Error as exc:
            raise StoreError(
                self.location, f"change feed cannot reach PostgreSQL: {exc}", retryable=True
            ) from exc
        try:
            async with conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                on_connected()
                async for note in conn.notifies():
                    instance, _, group = note.payload.partition(" ")
                    if instance != self.instance:
                        on_groups({group})
        except psycopg.Error as exc:
            raise StoreError(
                self.location, f"change feed lost: {exc}".strip(), retryable=True
            ) from exc
        raise StoreError(self.location, "change feed ended", retryable=True)
