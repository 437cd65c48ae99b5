"""The ``wg-autopeer agent``, ``status`` and ``sync`` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from wg_autopeer.agent import localapi
from wg_autopeer.agent.config import DEFAULT_CONFIG, load_agent_config, overrides_from_args
from wg_autopeer.errors import ConfigError, NetViewError

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
    try:
        return asyncio.run(_serve(config))
    except NetViewError as exc:
        print(f"wg-autopeer agent: {exc}", file=sys.stderr)
        return 1


async def _serve(config: Any) -> int:
    from wg_autopeer.agent.daemon import Agent
    from wg_autopeer.netview import open_netview
    from wg_autopeer.wireguard import open_control

    control = open_control(config.uapi_dir)
    netview = open_netview(socket_dir=config.uapi_dir)
    agent = Agent(config, control, netview)
    api = localapi.LocalApiServer(localapi.socket_path(config.runtime_dir), agent.handle_command)
    await api.start()
    tray = None
    if config.tray:
        from wg_autopeer.tray import start_tray_if_possible

        tray = start_tray_if_possible(config.runtime_dir)
    try:
        await agent.run()
    finally:
        if tray is not None:
            tray.stop()
        await api.close()
        await netview.close()
        await control.close()
    return 0


def run_status(args: argparse.Namespace) -> int:
    try:
        answer = localapi.call(args.runtime_dir, "status")
    except localapi.AgentNotRunning as exc:
        print(f"wg-autopeer status: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    print(format_status(answer))
    return 0


def run_sync(args: argparse.Namespace) -> int:
    try:
        answer = localapi.call(args.runtime_dir, "sync")
    except localapi.AgentNotRunning as exc:
        print(f"wg-autopeer sync: {exc}", file=sys.stderr)
        return 3
    print("re-sync requested" if answer.get("ok") else f"refused: {answer.get('error')}")
    return 0 if answer.get("ok") else 1


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.0f}s ago"


def format_status(answer: dict[str, Any]) -> str:
    """The human form of ``status``: one block per interface, a table of direct peers."""
    lines = [f"agent: {'enabled' if answer.get('enabled') else 'paused'}"]
    now = time.time()
    for iface in answer.get("interfaces", []):
        contact = iface.get("last_contact")
        lines += [
            "",
            f"interface {iface['interface']}",
            f"  server:       {iface.get('server') or '-'}"
            + (" (blocking queries)" if iface.get("blocking") else ""),
            f"  last contact: {_age(now - contact if contact else None)}: {iface['last_outcome']}",
            f"  LAN:          {', '.join(iface.get('lan') or []) or 'none (no default gateway)'}",
        ]
        peers = iface.get("direct_peers") or []
        if not peers:
            lines.append("  direct peers: none")
            continue
        lines.append(
            f"  {'PEER':<12} {'ENDPOINT':<22} {'HANDSHAKE':<11} {'RX':>10} {'TX':>10} HEALTH"
        )
        for p in peers:
            lines.append(
                f"  {p['public_key'][:10] + '…':<12} {p['endpoint']:<22} "
                f"{_age(p.get('handshake_age')):<11} {p['rx_bytes']:>10} {p['tx_bytes']:>10} "
                f"{p['health']}"
            )
    return "\n".join(lines)
