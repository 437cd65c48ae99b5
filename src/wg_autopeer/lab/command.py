"""The ``wg-autopeer lab`` subcommand: bring the default namespace lab up, down, or show it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wg_autopeer.errors import LabError
from wg_autopeer.lab.lab import Lab
from wg_autopeer.lab.state import DEFAULT_STATE_DIR
from wg_autopeer.lab.topology import default_topology


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "lab",
        help="namespace lab: hub, two NAT-ed LANs, three clients with userspace WireGuard",
        description="Build, tear down or inspect the default network-namespace lab (needs root).",
    )
    actions = parser.add_subparsers(dest="lab_action", required=True, metavar="ACTION")
    for name, help_text in (
        ("up", "build the default topology and leave it running"),
        ("down", "tear the lab down (also after a crash: from its state file and prefix)"),
        ("status", "show what of the lab exists"),
        ("demo", "build the lab, run server and agents, show direct vs hub, tear down"),
    ):
        action = actions.add_parser(name, help=help_text)
        default_prefix = "demo" if name == "demo" else "wap"
        action.add_argument(
            "--prefix",
            default=default_prefix,
            help=f"name prefix of namespaces/interfaces (default: {default_prefix})",
        )
        action.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help=f"where state, keys and logs live (default: {DEFAULT_STATE_DIR})",
        )
        if name == "up":
            action.add_argument(
                "--rate",
                type=float,
                default=20.0,
                metavar="MBIT",
                help="rate limit of the hub's WAN link in Mbit/s, 0 for none (default: 20)",
            )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.lab_action == "up":
            return _up(args)
        if args.lab_action == "down":
            return _down(args)
        if args.lab_action == "demo":
            from wg_autopeer.lab.demo import run_demo

            return run_demo(args.prefix, args.state_dir)
        return _status(args)
    except LabError as exc:
        print(f"wg-autopeer lab {args.lab_action}: {exc}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    topology = default_topology(args.prefix, rate_mbit=args.rate or None)
    lab = Lab(topology, state_dir=args.state_dir)
    try:
        lab.up()
    except BaseException:
        lab.down()
        raise
    print(f"lab {lab.prefix} is up ({lab.up_seconds or 0:.2f} s); state in {lab.lab_dir}")
    hub = topology.hub
    rate = f"{hub.rate_mbit:g} Mbit/s" if hub.rate_mbit else "unlimited"
    print(f"  {hub.name:6} WAN {hub.wan}  tunnel {hub.tunnel}  wg {lab.wg_interface(hub.name)}"
          f" :{hub.listen_port}  ({rate})")  # fmt: skip
    for lan in topology.lans:
        print(f"  {lan.router:6} WAN {lan.wan}  LAN {lan.name} {lan.gateway}  (NAT)")
    for client in topology.clients:
        print(
            f"  {client.name:6} LAN {client.lan} {client.address}  tunnel {client.tunnel}"
            f"  wg {lab.wg_interface(client.name)}"
        )
    print(f"enter a host:  ip netns exec {lab.ns('alice')} bash")
    print(f"tear down:     wg-autopeer lab down --prefix {lab.prefix}")
    return 0


def _down(args: argparse.Namespace) -> int:
    report = Lab.cleanup_leftovers(args.prefix, args.state_dir)
    if report.empty:
        print(f"lab {args.prefix}: nothing to remove")
        return 0
    print(
        f"lab {args.prefix} is down: ended {len(report.processes)} processes, "
        f"deleted {len(report.namespaces)} namespaces, removed {len(report.sockets)} sockets"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    status = Lab.status(args.prefix, args.state_dir)
    if not status.exists:
        print(f"lab {args.prefix}: not present")
        return 1
    print(f"lab {args.prefix}: state file {status.state_file or '(none)'}")
    print(f"  namespaces: {' '.join(status.namespaces) or '(none)'}")
    for record in status.live_processes:
        print(f"  process {record.pid}: {record.name}")
    print(f"  UAPI sockets: {' '.join(status.sockets) or '(none)'}")
    for host, key in sorted(status.public_keys.items()):
        print(f"  {host:6} public key {key}")
    return 0
