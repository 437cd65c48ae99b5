"""The ``wg-autopeer`` command: one subcommand per role; each lives in its own package."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wg-autopeer",
        description="Direct WireGuard peering between hub clients that share a LAN.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from wg_autopeer import tray as tray_command
    from wg_autopeer.agent import command as agent_command
    from wg_autopeer.lab import command as lab_command
    from wg_autopeer.server import command as server_command

    agent_command.add_parser(sub)
    server_command.add_parser(sub)
    lab_command.add_parser(sub)
    tray_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Our own debug lines only: pyroute2 and httpcore would drown them.
    logging.getLogger("wg_autopeer").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: int = args.run(args)
    return result
