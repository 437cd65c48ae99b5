"""The ``wg-autopeer server`` subcommand: config, sockets on the tunnel addresses, uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from ipaddress import IPv6Address, ip_address
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from wg_autopeer import sdnotify
from wg_autopeer.errors import ConfigError, WgAutopeerError
from wg_autopeer.server.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_PORT,
    ListenAddress,
    ServerConfig,
    load_config,
    parse_db,
    parse_listen,
)

if TYPE_CHECKING:
    from wg_autopeer.server.hubread import DeviceReader

log = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "server",
        help="run the coordination server on the hub",
        description="Answer hub clients which other clients share their LAN.",
    )
    parser.add_argument("--interface", metavar="WG", help="the hub's WireGuard interface")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help=f"address to serve on (repeatable; default: every address of WG, port {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--db",
        metavar="PATH|URL",
        help="SQLite file, :memory:, or postgresql://USER@HOST:PORT/DBNAME (shared registry)",
    )
    parser.add_argument(
        "--hub", metavar="NAME", help="this hub's name in a shared registry (default: its key)"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help=f"TOML configuration (default: {DEFAULT_CONFIG_PATH} when it exists)",
    )
    parser.set_defaults(run=run)


def resolve_config(args: argparse.Namespace) -> ServerConfig:
    """The file's configuration with the command-line flags on top."""
    config = load_config(args.config)
    changes: dict[str, Any] = {}
    if args.interface:
        changes["interface"] = args.interface
    if args.listen:
        changes["listen"] = tuple(parse_listen(text, key="--listen") for text in args.listen)
    if args.db:
        changes["db"] = parse_db("--db", args.db)
    if getattr(args, "hub", None):
        changes["hub"] = args.hub
    config = config.replace(**changes)
    if not config.interface:
        raise ConfigError("interface", 'required: --interface WG or interface = "WG"')
    return config


def interface_addresses(interface: str) -> list[ListenAddress]:
    """Every address of ``interface`` (link-local IPv6 left out), port 80."""
    from pyroute2.iproute.linux import IPRoute

    try:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=interface)
            if not indexes:
                raise ConfigError("interface", f"no interface named {interface!r}")
            found = []
            for msg in ipr.get_addr(index=indexes[0]):
                text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                address = ip_address(text)
                if isinstance(address, IPv6Address) and address.is_link_local:
                    continue
                found.append(ListenAddress(address, DEFAULT_PORT))
    except OSError as exc:
        raise ConfigError("interface", f"cannot read addresses of {interface}: {exc}") from exc
    if not found:
        raise ConfigError("listen", f"{interface} has no address to listen on; give --listen")
    return found


def open_socket(listen: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if listen.host.version == 6 else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets
    # it can tell are TCP (the protocol sets it too; see server.http).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(listen.host), listen.port))
    except OSError as exc:
        sock.close()
        raise ConfigError("listen", f"cannot bind {listen}: {exc}") from exc
    return sock


class StopSignal:
    """SIGTERM/SIGINT for the whole life of the process, before and during uvicorn.

    uvicorn installs its own handlers only once it runs and re-raises the signal after
    shutting down (the process would then die of it); here a signal that comes early
    still stops the server, and a clean stop exits with status 0.
    """

    def __init__(self) -> None:
        self.requested = False
        self.server: Any = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.server is not None:
            self.server.handle_exit(sig, frame)

    def attach(self, server: Any) -> None:
        self.server = server
        if self.requested:
            server.should_exit = True


async def serve(
    config: ServerConfig, sockets: list[socket.socket], stop: StopSignal, reader: DeviceReader
) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # StopSignal owns the handlers (see there).
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # systemd's Type=notify: serving now
                sdnotify.ready(f"serving {config.interface}")

    from wg_autopeer.server.app import create_app
    from wg_autopeer.server.http import uvicorn_config
    from wg_autopeer.wireguard import open_control

    control = open_control()
    try:
        if not config.hub:
            # Default name in a shared registry: the hub's key, the same on every restart.
            device = await control.get_device(config.interface)
            config = config.replace(hub=f"wg:{device.public_key or config.interface}")
        app = create_app(config, control, reader=reader)
        server = Server(uvicorn_config(app))
        stop.attach(server)
        await server.serve(sockets=sockets)
    finally:
        await control.close()


def hub_reader(interface: str) -> DeviceReader:
    """The hub's device reader, in a child process (forked now: see ``readerprocess``)."""
    from wg_autopeer.server.hubread import auto_reader
    from wg_autopeer.server.readerprocess import ProcessReader
    from wg_autopeer.wireguard.uapi import DEFAULT_SOCKET_DIR

    return ProcessReader(interface, lambda: auto_reader(interface, DEFAULT_SOCKET_DIR))


def run(args: argparse.Namespace) -> int:
    try:
        config = resolve_config(args)
        listen = list(config.listen) or interface_addresses(config.interface)
    except WgAutopeerError as exc:
        log.error("%s", exc)
        return 2
    # First, while this process has one thread and no listening socket to hand down.
    reader = hub_reader(config.interface)
    try:
        sockets = [open_socket(address) for address in listen]
    except WgAutopeerError as exc:
        log.error("%s", exc)
        reader.close()
        return 2
    stop = StopSignal()
    stop.install()
    log.info(
        "serving %s for %s on %s",
        "/peering-request",
        config.interface,
        ", ".join(str(a) for a in listen),
    )
    try:
        asyncio.run(serve(config, sockets, stop, reader))
    except WgAutopeerError as exc:
        log.error("%s", exc)
        return 1
    finally:
        for sock in sockets:
            sock.close()
        reader.close()  # again if the server closed it: a no-op then
    return 0
