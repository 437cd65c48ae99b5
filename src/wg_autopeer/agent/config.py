"""Agent configuration: one TOML file, every key also a command-line flag (flags win)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from wg_autopeer.agent.localserver import group_id
from wg_autopeer.configfile import read_toml
from wg_autopeer.errors import ConfigError
from wg_autopeer.wireguard.base import IPNetwork

DEFAULT_CONFIG = Path("/etc/wg-autopeer/agent.toml")


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent can be told. Field names are the TOML keys."""

    # WireGuard interfaces to manage; empty means every interface of this namespace with a key.
    # Named ones are trusted with our LAN details at once; any other is first probed
    # (a GET that says nothing about the LAN) and skipped unless it is a peering server.
    interfaces: tuple[str, ...] = ()
    # Interfaces never to manage nor probe, e.g. a commercial VPN's.
    exclude_interfaces: tuple[str, ...] = ()
    # Coordination server; None means http://<first host of the tunnel network>/peering-request.
    server: str | None = None
    state_dir: Path = Path("/var/lib/wg-autopeer")
    runtime_dir: Path = Path("/run/wg-autopeer")
    interval: float = 30.0
    tray: bool = True
    # How long the server may hold a blocking query.
    wait: int = 25
    # Keepalive of direct peers, and how long a direct path may stay silent before
    # its routes go back to the hub (agents send a heartbeat through it each second).
    persistent_keepalive: int = 3
    handshake_timeout: float = 10.0
    handshake_stale_after: float = 180.0
    uapi_dir: Path = Path("/var/run/wireguard")
    # Members of this group may use the control socket (tray, status); None: the owner only.
    control_group: str | None = None
    # False: the original polling design (no blocking query, no report on a network
    # change, only every ``interval``); the benchmarks' baseline. Safety reactions stay.
    push: bool = True
    # Seconds to wait before the first report (the original design waited 5 s).
    first_report_delay: float = 0.0
    # The tunnel network, when neither the hub peer's allowed IPs nor the interface
    # address tell it (see agent/tunnel.py); None: find it out.
    tunnel_network: IPNetwork | None = None


_KEY_FORMS: dict[str, str] = {
    "interfaces": 'a list of interface names, e.g. ["wg0"]',
    "exclude_interfaces": 'a list of interface names, e.g. ["mullvad0"]',
    "server": 'a URL, e.g. "http://10.99.0.1/peering-request"',
    "state_dir": "a directory path",
    "runtime_dir": "a directory path",
    "interval": "a number of seconds between 5 and 86400",
    "tray": "true or false",
    "wait": "whole seconds between 1 and 60",
    "persistent_keepalive": "whole seconds between 1 and 65535",
    "handshake_timeout": "a number of seconds between 1 and 600",
    "handshake_stale_after": "a number of seconds between 30 and 3600",
    "uapi_dir": "a directory path",
    "control_group": 'the name of an existing group, e.g. "netdev"',
    "push": "true or false",
    "first_report_delay": "a number of seconds between 0 and 600",
    "tunnel_network": 'a network, e.g. "10.99.0.0/24"',
}


def _coerce(key: str, value: Any) -> Any:
    form = _KEY_FORMS[key]
    bad = ConfigError(key, f"expected {form}, got {value!r}")
    if key in ("interfaces", "exclude_interfaces"):
        if not isinstance(value, list) or not all(
            isinstance(v, str) and 0 < len(v) <= 15 for v in value
        ):
            raise bad
        return tuple(value)
    if key == "server":
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise bad
        return value
    if key in ("state_dir", "runtime_dir", "uapi_dir"):
        if not isinstance(value, str) or not value:
            raise bad
        return Path(value)
    if key == "control_group":
        if not isinstance(value, str) or not value:
            raise bad
        try:
            group_id(value)
        except ConfigError:
            raise ConfigError(key, f"expected {form}, got {value!r} (no such group)") from None
        return value
    if key == "tunnel_network":
        if not isinstance(value, str):
            raise bad
        try:
            network = ip_network(value, strict=False)
        except ValueError:
            raise bad from None
        if network.prefixlen in (0, network.max_prefixlen):
            raise bad
        return network
    if key in ("tray", "push"):
        if not isinstance(value, bool):
            raise bad
        return value
    limits = {
        "interval": (5, 86400),
        "wait": (1, 60),
        "persistent_keepalive": (1, 65535),
        "handshake_timeout": (1, 600),
        "handshake_stale_after": (30, 3600),
        "first_report_delay": (0, 600),
    }
    low, high = limits[key]
    whole = key in ("wait", "persistent_keepalive")
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and value % 1):
        raise bad
    if not low <= value <= high:
        raise bad
    return int(value) if whole else float(value)


def load_agent_config(
    path: Path | None, overrides: dict[str, Any] | None = None, *, required: bool = False
) -> AgentConfig:
    """Read ``path`` (TOML, a missing default file is fine) and apply ``overrides`` on top.

    Raises ConfigError naming the first unknown key or bad value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path, required=required)
        for key, value in raw.items():
            if key not in _KEY_FORMS:
                known = ", ".join(sorted(_KEY_FORMS))
                raise ConfigError(key, f"unknown key in {path} (known keys: {known})")
            values[key] = _coerce(key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    return dataclasses.replace(AgentConfig(), **values)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line flags the user actually gave, as config keys."""
    return {
        "interfaces": list(args.interface) if args.interface else None,
        "server": args.server,
        "state_dir": args.state_dir,
        "runtime_dir": args.runtime_dir,
        "interval": args.interval,
        "tray": False if args.no_tray else None,
    }
