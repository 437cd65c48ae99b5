"""The ``wg-autopeer agent``, ``status`` and ``sync`` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

from wg_autopeer import sdnotify
from wg_autopeer.agent import localapi
from wg_autopeer.agent.config import DEFAULT_CONFIG, load_agent_config, overrides_from_args
from wg_autopeer.agent.instance import InstanceLock, agent_dirs
from wg_autopeer.errors import AlreadyRunning, ConfigError, NetViewError

log = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "agent", help="run the agent beside a WireGuard client"
    )
    parser.add_argument("--interface", action="append", metavar="WG", help="manage only these")
    parser.add_argument("--server", metavar="URL", help="coordination server URL")
    parser.add_argument("--state-dir", metavar="DIR", help="where the ledger is kept")
    parser.add_argument("--runtime-dir", metavar="DIR", help="where the control socket is")
    parser.add_argument("--interval", type=float, metavar="SECONDS", help="re-check period")
    parser.add_argument("--no-tray", action="store_true", help="never show a tray icon")
    parser.add_argument("--config", type=Path, metavar="FILE", help=f"default {DEFAULT_CONFIG}")
    parser.set_defaults(run=run)

    for name, helptext in (("status", "show the running agent's state"), ("sync", "re-sync now")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--runtime-dir", type=Path, default=Path("/run/wg-autopeer"))
        if name == "status":
            p.add_argument("--json", action="store_true", help="stable JSON output")
        p.set_defaults(run=run_status if name == "status" else run_sync)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_agent_config(
            args.config or DEFAULT_CONFIG,
            overrides_from_args(args),
            required=args.config is not None,
        )
    except ConfigError as exc:
        print(f"wg-autopeer agent: {exc}", file=sys.stderr)
        return 2
    from wg_autopeer.agent.privileges import privilege_problem

    problem = privilege_problem(config.uapi_dir)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    dirs = agent_dirs(config.state_dir, config.runtime_dir)
    for note in dirs.notes:
        log.warning("%s", note)
    config = dataclasses.replace(config, state_dir=dirs.state_dir, runtime_dir=dirs.runtime_dir)
    try:
        lock = InstanceLock(config.state_dir)
    except AlreadyRunning as exc:
        print(f"wg-autopeer agent: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"wg-autopeer agent: cannot use state dir {config.state_dir}: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(config))
    except (NetViewError, AlreadyRunning) as exc:
        print(f"wg-autopeer agent: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.release()


async def _serve(config: Any) -> int:
    from wg_autopeer.agent.daemon import Agent
    from wg_autopeer.netview import open_netview
    from wg_autopeer.wireguard import open_control

    control = open_control(config.uapi_dir)
    netview = open_netview(socket_dir=config.uapi_dir)
    agent = Agent(config, control, netview)
    api = localapi.LocalApiServer(
        localapi.socket_path(config.runtime_dir), agent.handle_command, group=config.control_group
    )
    await api.start()
    ready = asyncio.create_task(
        sdnotify.ready_when(agent.first_sync_done, "first sync done"), name="notify-ready"
    )
    tray = None
    if config.tray:
        from wg_autopeer.tray import start_tray_if_possible

        tray = start_tray_if_possible(config.runtime_dir)
    try:
        await agent.run()
        if agent.exit_code:
            log.critical(
                "the agent stopped: a background task kept failing (%s)",
                "; ".join(f"{k}: {v}" for k, v in agent.supervisor.degraded.items()),
            )
    finally:
        ready.cancel()
        sdnotify.stopping()
        if tray is not None:
            tray.stop()
        await api.close()
        await netview.close()
        await control.close()
    return agent.exit_code


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
