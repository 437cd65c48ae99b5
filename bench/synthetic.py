"""A synthetic hub population for the server-scale benchmark, the same in every process.

Clients live in homes of 3-5 behind one public IP each (198.18.0.0/15, the range set
aside for benchmarks). Their tunnel addresses are loopback host addresses
(127.0.0.0/8 is local on Linux), so a load generator can bind each connection to a
client's own source address and the server identifies it exactly as it would a
tunnel peer. Two LAN distributions:

* ``distinct`` — every home has its own private /24 (10.x.y.0/24 via 10.x.y.1);
* ``same`` — the realistic worst case: 90 % of homes use the router default
  192.168.1.0/24 via 192.168.1.1, 5 % 192.168.0.0/24, 5 % 10.0.0.0/24, so only the
  public IP tells most LANs apart.

``uapi_lines`` renders the population as the hub's UAPI ``get=1`` answer, to be fed
through the product's own parser (``wireguard.uapi.parse_device``).
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from ipaddress import IPv4Address

DISTRIBUTIONS = ("distinct", "same")
PUBLIC_BASE = IPv4Address("198.18.0.0")
LISTEN_PORT = 51820


@dataclass(frozen=True)
class Client:
    index: int
    home: int
    pubkey: str
    tunnel_ip: str
    public_ip: str
    public_port: int
    lan_ip: str
    prefix: int
    gateway: str

    def entry(self, listen_port: int = LISTEN_PORT) -> dict[str, object]:
        """This client's LAN report, as the agent sends it."""
        return {
            "pubkey": self.pubkey,
            "ip": self.lan_ip,
            "netmask": self.prefix,
            "gateway": self.gateway,
            "listen_port": listen_port,
        }

    def body(self, listen_port: int = LISTEN_PORT) -> bytes:
        return json.dumps([self.entry(listen_port)]).encode()


def tunnel_ip(index: int) -> str:
    """A distinct 127.a.b.c for client ``index`` (no .0 or .255 octets)."""
    a, rest = divmod(index, 250 * 250)
    b, c = divmod(rest, 250)
    if a >= 250:
        raise ValueError(f"client index {index} is too large")
    return f"127.{a + 1}.{b + 1}.{c + 1}"


def _home_lan(home: int, distribution: str, rng: random.Random) -> tuple[str, str]:
    """(network prefix "a.b.c", gateway) of a home."""
    if distribution == "distinct":
        base = f"10.{(home >> 8) & 255}.{home & 255}"
        return base, f"{base}.1"
    draw = rng.random()
    if draw < 0.90:
        return "192.168.1", "192.168.1.1"
    if draw < 0.95:
        return "192.168.0", "192.168.0.1"
    return "10.0.0", "10.0.0.138"


def population(n: int, distribution: str, seed: int = 6) -> list[Client]:
    """``n`` clients in homes of 3-5; deterministic for (n, distribution, seed)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}")
    rng = random.Random(f"{seed}:{n}:{distribution}")
    clients: list[Client] = []
    home = 0
    while len(clients) < n:
        size = rng.randint(3, 5)
        public = str(PUBLIC_BASE + home)
        net, gateway = _home_lan(home, distribution, rng)
        for member in range(size):
            if len(clients) == n:
                break
            index = len(clients)
            clients.append(
                Client(
                    index=index,
                    home=home,
                    pubkey=base64.b64encode(rng.randbytes(32)).decode(),
                    tunnel_ip=tunnel_ip(index),
                    public_ip=public,
                    public_port=rng.randrange(20000, 60000),
                    lan_ip=f"{net}.{100 + member}",
                    prefix=24,
                    gateway=gateway,
                )
            )
        home += 1
    return clients


def uapi_lines(clients: list[Client], handshake: int, seed: int = 6) -> list[str]:
    """The hub's ``get=1`` answer for ``clients`` (without the final ``errno=0``)."""
    rng = random.Random(f"hub:{seed}")
    lines = [f"private_key={rng.randbytes(32).hex()}", "listen_port=51820"]
    for client in clients:
        lines += [
            f"public_key={base64.b64decode(client.pubkey).hex()}",
            f"endpoint={client.public_ip}:{client.public_port}",
            f"last_handshake_time_sec={handshake}",
            "last_handshake_time_nsec=0",
            f"tx_bytes={rng.randrange(1 << 20)}",
            f"rx_bytes={rng.randrange(1 << 20)}",
            "persistent_keepalive_interval=0",
            f"allowed_ip={client.tunnel_ip}/32",
            "protocol_version=1",
        ]
    return lines


def homes(clients: list[Client]) -> dict[int, list[Client]]:
    out: dict[int, list[Client]] = {}
    for client in clients:
        out.setdefault(client.home, []).append(client)
    return out
