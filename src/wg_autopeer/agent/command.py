"""The ``wg-autopeer agent`` subcommand (``status`` and ``sync`` are in ``status_command``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from wg_autopeer import sdnotify
from wg_autopeer.agent import localserver
from wg_autopeer.agent.config import DEFAULT_CONFIG, load_agent_config, overrides_from_args
from wg_autopeer.agent.instance import InstanceLock, agent_dirs
from wg_autopeer.agent.localapi import socket_path
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
    api = localserver.LocalApiServer(
        socket_path(config.runtime_dir), agent.handle_command, group=config.control_group
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
