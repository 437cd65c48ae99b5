"""The ``wg-autopeer`` command: one subcommand per role; each lives in its own package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

# Each command name, the module whose ``add_parser`` defines it, and its one-line help.
# Only the module of the command being run is imported (the lab, the tray, the agent and
# the server each pull in heavy libraries the others do not need).
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("wg_autopeer.agent.command", "run the agent beside a WireGuard client"),
    "status": ("wg_autopeer.agent.status_command", "show the running agent's state"),
    "sync": ("wg_autopeer.agent.status_command", "re-sync now"),
    "server": ("wg_autopeer.server.command", "run the coordination server on the hub"),
    "lab": (
        "wg_autopeer.lab.command",
        "namespace lab: hub, two NAT-ed LANs, three clients with userspace WireGuard",
    ),
    "tray": ("wg_autopeer.tray", "show a tray icon for the running agent (desktop user)"),
}


def command_in(argv: Sequence[str]) -> str | None:
    """The command named in ``argv``: its first word that is not an option."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser, importing only the modules of ``commands`` (every one when None)."""
    parser = argparse.ArgumentParser(
        prog="wg-autopeer",
        description="Direct WireGuard peering between hub clients that share a LAN.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = COMMANDS if commands is None else commands
    wanted = {COMMANDS[name][0] for name in names}
    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        if module in wanted:
            importlib.import_module(module).add_parser(sub)
    for name, (_, helptext) in COMMANDS.items():
        if name not in sub.choices:
            # Listed in --help; never chosen (the chosen command's module is loaded).
            sub.add_parser(name, help=helptext)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = command_in(words)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(words)
    if getattr(args, "logs", True):
        configure_logging(verbose=args.verbose)
    result: int = args.run(args)
    return result


def configure_logging(*, verbose: bool) -> None:
    """INFO and up to stderr; DEBUG of our own modules with ``-v``."""
    import logging

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Our own debug lines only: pyroute2 and httpcore would drown them.
    logging.getLogger("wg_autopeer").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
