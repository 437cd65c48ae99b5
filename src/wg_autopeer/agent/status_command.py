"""The ``wg-autopeer status`` and ``sync`` subcommands: thin clients of the agent's socket.

They import only the socket client (``localapi``), not the agent, asyncio or any
WireGuard backend: ``status`` is run by hand and by scripts, and should answer at
once (tests/test_imports.py holds that).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from ipaddress import ip_interface
from pathlib import Path
from typing import TYPE_CHECKING

from wg_autopeer.agent import localapi

if TYPE_CHECKING:
    from typing import Any


def add_parser(sub: Any) -> None:
    for name, helptext in (("status", "show the running agent's state"), ("sync", "re-sync now")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--runtime-dir", type=Path, default=Path("/run/wg-autopeer"))
        if name == "status":
            p.add_argument("--json", action="store_true", help="stable JSON output")
        # They print their answer and log nothing: no logging set-up to load.
        p.set_defaults(run=run_status if name == "status" else run_sync, logs=False)


def _ask_agent(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    """One command to the running agent; None (after saying why) when none answers."""
    try:
        return localapi.call(args.runtime_dir, command)
    except localapi.AgentNotRunning as exc:
        print(f"wg-autopeer {command}: {exc}", file=sys.stderr)
        return None


def run_status(args: argparse.Namespace) -> int:
    answer = _ask_agent(args, "status")
    if answer is None:
        return 3
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    print(format_status(answer))
    return 0


def run_sync(args: argparse.Namespace) -> int:
    answer = _ask_agent(args, "sync")
    if answer is None:
        return 3
    print("re-sync requested" if answer.get("ok") else f"refused: {answer.get('error')}")
    return 0 if answer.get("ok") else 1


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _lan(text: str) -> str:
    """``eth0 192.168.50.10/24 via 192.168.50.1`` with its network spelled out."""
    ifname, _, rest = text.partition(" ")
    address, _, gateway = rest.partition(" via ")
    try:
        network = ip_interface(address).network
    except ValueError:
        return text
    return f"{ifname} {address} (network {network}), gateway {gateway}"


def format_status(answer: dict[str, Any], now: float | None = None) -> str:
    """The human form of ``status``: one block per interface, a table of direct peers."""
    now = time.time() if now is None else now
    enabled = bool(answer.get("enabled"))
    head = f"agent: {'enabled' if enabled else 'paused (direct peering off)'}"
    if answer.get("started_at"):
        head += f", started {_age(now - answer['started_at'])}"
    lines = [head]
    if not answer.get("interfaces"):
        lines.append("no WireGuard interface managed (none with a private key here?)")
    for iface in answer.get("interfaces", []):
        contact = iface.get("last_contact")
        lans = [_lan(text) for text in iface.get("lan") or []]
        if not lans:
            lans = ["-" if not enabled else "none (no default gateway)"]
        lines += [
            "",
            f"interface {iface['interface']}",
            f"  server:        {iface.get('server') or '-'}"
            + (" (blocking queries)" if iface.get("blocking") else ""),
            f"  last contact:  {_age(now - contact if contact else None)}: {iface['last_outcome']}",
            *(f"  LAN:           {lan}" for lan in lans),
        ]
        if iface.get("tunnel_network"):
            lines.append(
                f"  tunnel:        {', '.join(iface['tunnel_network'])}"
                f" (from the {iface.get('tunnel_network_source') or '?'})"
            )
        peers = iface.get("direct_peers") or []
        if not peers:
            lines.append("  direct peers:  none")
            continue
        lines.append(f"  direct peers:  {len(peers)}")
        # TUNNEL IP is "via hub" while a path is being proven: its routes are not on it yet.
        rows = [("PEER", "TUNNEL IP", "ENDPOINT", "HANDSHAKE", "RX", "TX", "HEALTH")]
        for p in peers:
            rows.append(
                (
                    p["public_key"][:10] + "…",
                    ", ".join(p.get("allowed_ips") or []) or "- (via hub)",
                    p["endpoint"],
                    _age(p.get("handshake_age")),
                    _bytes(p["rx_bytes"]),
                    _bytes(p["tx_bytes"]),
                    p["health"],
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = [
                cell.rjust(width) if i in (4, 5) else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append(("    " + "  ".join(cells)).rstrip())
    return "\n".join(lines)
