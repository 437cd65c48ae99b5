"""Test helpers: a hub made of FakeWireGuard, a server app over it, clients at tunnel addresses."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from typing import Any

import httpx
from fastapi import FastAPI

from wg_autopeer.protocol import PATH
from wg_autopeer.server.app import Coordinator, create_app
from wg_autopeer.server.config import ServerConfig
from wg_autopeer.server.store import RegistrationStore
from wg_autopeer.wireguard.base import Endpoint, PeerState
from wg_autopeer.wireguard.fake import FakeWireGuard

HUB_IF = "wg0"


def make_key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


@dataclass
class Client:
    name: str
    key: str
    tunnel_ip: str
    public: str


ALICE = Client("alice", make_key(11), "10.99.0.2", "203.0.113.5")
BOB = Client("bob", make_key(12), "10.99.0.3", "203.0.113.5")
CAROL = Client("carol", make_key(13), "10.99.0.4", "198.51.100.7")
CLIENTS = (ALICE, BOB, CAROL)

# The LAN alice and bob share behind 203.0.113.5; carol's home LAN looks the same elsewhere.
LAN_ADDRESS = {"alice": "192.168.50.10", "bob": "192.168.50.11", "carol": "192.168.50.12"}


def entry(client: Client, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "pubkey": client.key,
        "ip": LAN_ADDRESS[client.name],
        "netmask": 24,
        "gateway": "192.168.50.1",
        "listen_port": 51820,
    }
    body.update(overrides)
    return body


def curl_body(*entries: dict[str, Any]) -> bytes:
    """The body as ``curl -d '[...]'`` sends it: JSON text, no trailing newline."""
    return json.dumps(list(entries)).encode()


JSON = {"Content-Type": "application/json"}


@dataclass
class Clock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Hub:
    wg: FakeWireGuard
    clock: Clock
    config: ServerConfig
    store: RegistrationStore
    apps: list[FastAPI] = field(default_factory=list)

    def app(self, **config_changes: Any) -> FastAPI:
        config = self.config.replace(**config_changes)
        app = create_app(config, self.wg, clock=self.clock, store=self.store)
        self.apps.append(app)
        return app

    def core(self, app: FastAPI) -> Coordinator:
        core: Coordinator = app.state.coordinator
        return core

    def handshake_all(self) -> None:
        for c in CLIENTS:
            self.wg.update_peer(HUB_IF, c.key, latest_handshake=self.clock.now)

    def client(self, app: FastAPI, source: str | Client) -> httpx.AsyncClient:
        host = source.tunnel_ip if isinstance(source, Client) else source
        transport = httpx.ASGITransport(app=app, client=(host, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://10.99.0.1")

    async def post(
        self, app: FastAPI, who: Client, *entries: dict[str, Any], **headers: str
    ) -> httpx.Response:
        async with self.client(app, who) as http:
            return await http.post(
                PATH, content=curl_body(*(entries or (entry(who),))), headers={**JSON, **headers}
            )


def fake_hub(clock: Clock) -> FakeWireGuard:
    wg = FakeWireGuard()
    peers = tuple(
        PeerState(
            public_key=c.key,
            allowed_ips=(ip_network(f"{c.tunnel_ip}/32"),),
            endpoint=Endpoint(ip_address(c.public), 40000 + i),
            latest_handshake=clock.now,
        )
        for i, c in enumerate(CLIENTS)
    )
    wg.add_device(HUB_IF, make_key(1), 51820, peers)
    return wg
