"""Server configuration: a TOML file (``/etc/wg-autopeer/server.toml``) under CLI flags.

Example::

    interface = "wg0"
    listen = ["10.99.0.1:80"]          # default: every address of the interface, port 80
    db = "/var/lib/wg-autopeer/server.db"   # ":memory:" keeps nothing across restarts;
                                       # "postgresql://USER@HOST:PORT/DBNAME": one registry
                                       # shared by several servers and hubs (docs/scale-out.md)
    hub = "hub-a"                      # names this hub in a shared registry
                                       # (default: "wg:" + the hub interface's public key)
    handshake_max_age = 180            # seconds; older -> 409, and registrations dropped
    ttl = 90                           # seconds a registration lives without a new report
    refresh_interval = 2               # seconds between reads of the hub's device
    unknown_source_refresh_gap = 1     # at most one extra read per this many seconds
    trusted_proxies = []               # direct peers whose X-Forwarded-For is believed
    metrics_sources = ["127.0.0.1/32"] # who may read /metrics and /healthz (absent: anyone)

    [policy]
    allow = ["<key>", ...]             # absent: every client may peer directly
    exclude = ["<key>", ...]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address, ip_network
from pathlib import Path
from typing import Any

from wg_autopeer.configfile import read_toml
from wg_autopeer.errors import ConfigError
from wg_autopeer.server.matching import Policy
from wg_autopeer.server.store import POSTGRES_SCHEMES, db_scheme, redact_url
from wg_autopeer.wireguard.base import IPAddress, IPNetwork, is_valid_key

DEFAULT_CONFIG_PATH = Path("/etc/wg-autopeer/server.toml")
DEFAULT_DB_PATH = "/var/lib/wg-autopeer/server.db"
DEFAULT_PORT = 80
KNOWN_KEYS = (
    "interface",
    "listen",
    "db",
    "hub",
    "handshake_max_age",
    "ttl",
    "refresh_interval",
    "unknown_source_refresh_gap",
    "trusted_proxies",
    "metrics_sources",
    "policy",
)


@dataclass(frozen=True)
class ListenAddress:
    host: IPAddress
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        if isinstance(self.host, IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(text: str, *, key: str = "listen") -> ListenAddress:
    """``HOST:PORT``, ``[V6]:PORT``, or a bare address (port 80)."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(key, f"{text!r} is not HOST:PORT or [IPV6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ip_address(host)
    except ValueError:
        raise ConfigError(key, f"{text!r}: {host!r} is not an IP address") from None
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(key, f"{text!r}: port must be 1-65535")
        port = int(port_text)
    return ListenAddress(address, port)


@dataclass(frozen=True)
class ServerConfig:
    """Every server option; ``listen`` empty means every address of ``interface``, port 80."""

    interface: str = ""
    listen: tuple[ListenAddress, ...] = ()
    db: str = DEFAULT_DB_PATH
    # Names this hub in a registry shared by several hubs; "" until the server fills in
    # its default from the hub's public key.
    hub: str = ""
    handshake_max_age: float = 180.0
    ttl: float = 90.0
    refresh_interval: float = 2.0
    unknown_source_refresh_gap: float = 1.0
    policy: Policy = field(default_factory=Policy)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # None: /metrics and /healthz answer anyone.
    metrics_sources: tuple[IPNetwork, ...] | None = None

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)


def _positive(key: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(key, f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def parse_db(key: str, value: object) -> str:
    """A SQLite path, ``:memory:`` or a PostgreSQL URL; any other URL scheme is refused
    (it would otherwise be taken for a relative file path)."""
    text = _string(key, value)
    scheme = db_scheme(text)
    if scheme is not None and scheme not in POSTGRES_SCHEMES:
        raise ConfigError(
            key,
            f"unsupported scheme {scheme!r} in {redact_url(text)!r}: use"
            " postgresql://USER@HOST:PORT/DBNAME, a SQLite file path, or :memory:",
        )
    return text


def _string_list(key: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return list(value)


def _networks(key: str, value: object) -> tuple[IPNetwork, ...]:
    nets = []
    for text in _string_list(key, value):
        try:
            nets.append(ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(key, f"{text!r} is not an address or network") from None
    return tuple(nets)


def _keys(key: str, value: object) -> frozenset[str]:
    keys = _string_list(key, value)
    for k in keys:
        if not is_valid_key(k):
            raise ConfigError(key, f"{k!r} is not a WireGuard public key (base64 of 32 bytes)")
    return frozenset(keys)


def _policy(value: object) -> Policy:
    if not isinstance(value, dict):
        raise ConfigError("policy", "expected a table with 'allow' and/or 'exclude'")
    unknown = set(value) - {"allow", "exclude"}
    if unknown:
        raise ConfigError(f"policy.{sorted(unknown)[0]}", "unknown key (allow, exclude)")
    allow = _keys("policy.allow", value["allow"]) if "allow" in value else None
    exclude = _keys("policy.exclude", value.get("exclude", []))
    return Policy(allow=allow, exclude=exclude)


def config_from_mapping(
    data: Mapping[str, object], base: ServerConfig | None = None
) -> ServerConfig:
    """Apply the keys of ``data`` (a parsed TOML document) on top of ``base``."""
    config = base or ServerConfig()
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("interface", "hub"):
            changes[key] = _string(key, value)
        elif key == "db":
            changes[key] = parse_db(key, value)
        elif key == "listen":
            changes[key] = tuple(parse_listen(v, key=key) for v in _string_list(key, value))
        elif key in ("handshake_max_age", "ttl", "refresh_interval", "unknown_source_refresh_gap"):
            changes[key] = _positive(key, value)
        elif key in ("trusted_proxies", "metrics_sources"):
            changes[key] = _networks(key, value)
        elif key == "policy":
            changes[key] = _policy(value)
        else:
            raise ConfigError(key, f"unknown key (known keys: {', '.join(KNOWN_KEYS)})")
    return config.replace(**changes)


def load_config(path: Path | None = None) -> ServerConfig:
    """Read ``path``, or the default file when it exists (defaults otherwise)."""
    explicit = path is not None
    data = read_toml(path or DEFAULT_CONFIG_PATH, required=explicit)
    return config_from_mapping(data)
