"""Where registrations survive a restart: a small interface and its SQLite backend.

The registry stays the source of truth while running; the store is written
through on every change so a restarted server answers its first request
correctly. Reloaded registrations are still subject to their TTL and to the
hub's current view of each client.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import sqlite3
from ipaddress import IPv4Address, IPv6Network, ip_address, ip_network
from pathlib import Path

from wg_autopeer.errors import WgAutopeerError
from wg_autopeer.server.matching import PublicIdentity, Registration, ReportedLan

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


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

    def close(self) -> None:
        self._db.close()
