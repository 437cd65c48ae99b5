"""A wireguard-web-like coordination server, for lab tests against the seed's world.

Behaves as the issues describe wireguard-web's ``POST /peering-request``: it
knows a caller by the tunnel address its request came from, takes the
caller's public IP *and port* from the hub's WireGuard endpoint, ignores any
``listen_port``, and answers with every registered client behind the same
public IP, gateway and network, offering the neighbour's LAN address with the
port its NAT showed the hub (wrong behind a NAT that changes ports). No
blocking queries (no ETag), no ``DELETE`` (405): agents must poll.

Run inside the hub's namespace: ``python -m wg_autopeer.lab.wgweb --interface
IF --listen ADDR:PORT``. Lab-only; the product never imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address, ip_interface

from wg_autopeer.lab.hostile import MAX_REQUEST_HEAD, read_request, simple_answer
from wg_autopeer.lab.wgtools import parse_wg_dump
from wg_autopeer.protocol import PATH
from wg_autopeer.wireguard.base import DeviceState, PeerState

EXPIRY = 120.0


@dataclass(frozen=True)
class Client:
    pubkey: str
    tunnel_ips: tuple[str, ...]
    public_ip: str
    nat_port: int
    # (address, prefix, gateway) per reported entry
    lans: tuple[tuple[str, int, str], ...]
    seen: float

    def networks(self) -> set[tuple[str, str]]:
        return {(str(ip_interface(f"{a}/{p}").network), g) for a, p, g in self.lans}


class WgWebServer:
    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.clients: dict[str, Client] = {}

    def _hub(self) -> DeviceState:
        dump = subprocess.run(
            ["wg", "show", self.interface, "dump"], capture_output=True, text=True, check=True
        ).stdout
        return parse_wg_dump(self.interface, dump)

    def _caller(self, source: str) -> PeerState | None:
        address = ip_address(source)
        for peer in self._hub().peers:
            if any(
                address in net and net.prefixlen == net.max_prefixlen for net in peer.allowed_ips
            ):
                return peer
        return None

    def answer(self, method: str, path: str, source: str, body: bytes) -> bytes:
        if path.split("?")[0] != PATH:
            return simple_answer(404, "Not Found", "application/json", b'{"error": "not found"}')
        if method != "POST":
            return simple_answer(
                405,
                "Method Not Allowed",
                "application/json",
                b'{"error": "POST only"}',
                Allow="POST",
            )
        caller = self._caller(source)
        if caller is None or caller.endpoint is None:
            return simple_answer(
                403, "Forbidden", "application/json", b'{"error": "not a tunnel address"}'
            )
        try:
            data = json.loads(body)
            entries = data if isinstance(data, list) else [data]
            lans = tuple((str(e["ip"]), int(e["netmask"]), str(e["gateway"])) for e in entries)
            keys = {str(e["pubkey"]) for e in entries}
        except (ValueError, KeyError, TypeError):
            return simple_answer(
                400, "Bad Request", "application/json", b'{"error": "bad request"}'
            )
        if keys != {caller.public_key}:
            return simple_answer(403, "Forbidden", "application/json", b'{"error": "not your key"}')
        now = time.monotonic()
        me = Client(
            caller.public_key,
            tuple(str(n.network_address) for n in caller.allowed_ips),
            str(caller.endpoint.address),
            caller.endpoint.port,
            lans,
            now,
        )
        self.clients[me.pubkey] = me
        peers = []
        for other in self.clients.values():
            if other.pubkey == me.pubkey or now - other.seen > EXPIRY:
                continue
            if other.public_ip != me.public_ip or not (other.networks() & me.networks()):
                continue
            shared = me.networks()
            lan_ip = next(
                a for a, p, g in other.lans if (str(ip_interface(f"{a}/{p}").network), g) in shared
            )
            peers.append(
                {"pubkey": other.pubkey, "endpoint": lan_ip, "port": other.nat_port,
                 "ip": list(other.tunnel_ips)}
            )  # fmt: skip
        return simple_answer(200, "OK", "application/json", json.dumps({"peers": peers}).encode())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            if request is None:
                return
            source = writer.get_extra_info("peername")[0]
            writer.write(self.answer(request.method, request.path, source, request.body))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def serve(interface: str, host: str, port: int) -> None:
    server = WgWebServer(interface)
    listener = await asyncio.start_server(server.handle, host, port, limit=MAX_REQUEST_HEAD)
    print(f"wgweb: listening on {host}:{port} for {interface}", flush=True)
    async with listener:
        await listener.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wg_autopeer.lab.wgweb", description=__doc__)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--listen", required=True, metavar="ADDR:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.interface, host.strip("[]"), int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
