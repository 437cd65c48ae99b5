"""The server command on the hub of a namespace lab with real wireguard-go, spoken to by curl."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any

import pytest

from wg_autopeer.lab import Lab
from wg_autopeer.protocol import PATH

pytestmark = pytest.mark.lab


@pytest.fixture
def svt_lab(lab_factory: Callable[..., Lab]) -> Lab:
    """The default topology (alice+bob on lan1, carol on lan2) under this suite's prefix."""
    return lab_factory(base="svt")


@dataclass
class Reply:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    def peer_keys(self) -> list[str]:
        assert self.status == 200, self.body
        return [p["pubkey"] for p in self.json()["peers"]]


def curl(
    lab: Lab,
    host: str,
    body: str | None,
    *,
    method: str = "POST",
    content_type: str = "application/json",
    source: str | None = None,
) -> Reply:
    """What ``curl -H 'Content-Type: application/json' -d '[...]' http://HUB/peering-request``
    gets, sent from ``host``'s tunnel address."""
    url = f"http://{lab.tunnel_ip('hub')}{PATH}"
    argv = ["curl", "-sS", "--max-time", "5", "-X", method, "-w", "\n%{http_code}"]
    argv += ["--interface", source or str(lab.tunnel_ip(host))]
    if body is not None:
        argv += ["-H", f"Content-Type: {content_type}", "--data-binary", "@-"]
    result = lab.run(host, *argv, url, stdin_text=body, check=False, timeout=10)
    text, _, code = result.stdout.rpartition("\n")
    return Reply(int(code or 0), text)


def report(lab: Lab, host: str, *, pubkey: str | None = None, port: int = 51820) -> str:
    lan = lab.lan_interface(host)
    gateway = lab.topology.lan(lab.topology.client(host).lan).gateway.ip
    entry = {
        "pubkey": pubkey or lab.public_key(host),
        "ip": str(lan.ip),
        "netmask": lan.network.prefixlen,
        "gateway": str(gateway),
        "listen_port": port,
    }
    return json.dumps([entry])


def start_server(lab: Lab, *listen: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "wg_autopeer", "server"]
    argv += ["--interface", lab.wg_interface("hub"), "--db", ":memory:"]
    for address in listen:
        argv += ["--listen", address]
    proc = lab.spawn("hub", argv, log_name="server")

    def answering() -> bool:
        assert proc.poll() is None, lab.log_path("server").read_text()
        return curl(lab, "carol", None, method="DELETE").status == 204

    assert lab.wait_for(answering, timeout=15), lab.log_path("server").read_text()
    return proc


def test_server_answers_lan_neighbours_and_refuses_impostors(svt_lab: Lab) -> None:
    lab = svt_lab
    proc = start_server(lab, f"{lab.tunnel_ip('hub')}:80")
    alice, bob, carol = (lab.public_key(h) for h in ("alice", "bob", "carol"))

    assert curl(lab, "alice", report(lab, "alice")).peer_keys() == []
    answer = curl(lab, "bob", report(lab, "bob"))
    assert answer.json() == {
        "peers": [
            {
                "pubkey": alice,
                "endpoint": str(lab.lan_ip("alice")),
                "port": 51820,
                "ip": [str(lab.tunnel_ip("alice"))],
            }
        ]
    }
    assert curl(lab, "alice", report(lab, "alice")).peer_keys() == [bob]
    # Carol's LAN is another one behind another public address.
    assert curl(lab, "carol", report(lab, "carol")).peer_keys() == []

    spoofed = curl(lab, "carol", report(lab, "carol", pubkey=alice))
    assert spoofed.status == 403, spoofed.body
    # The hub's own tunnel address is not a client: not in the tunnel as far as identity goes.
    outsider = curl(lab, "hub", report(lab, "alice"), source=str(lab.tunnel_ip("hub")))
    assert outsider.status == 403, outsider.body
    assert curl(lab, "alice", "{nope").status == 400
    assert curl(lab, "alice", "[]").status == 400
    assert curl(lab, "alice", report(lab, "alice"), content_type="text/plain").status == 415
    assert curl(lab, "alice", None, method="GET").status == 405
    assert carol not in curl(lab, "bob", report(lab, "bob")).peer_keys()

    assert lab.stop(proc, signal.SIGTERM) == 0


def test_roamed_client_leaves_its_old_neighbours_answers_within_seconds(svt_lab: Lab) -> None:
    lab = svt_lab
    start_server(lab)  # default listen: every address of the hub's interface, port 80
    bob = lab.public_key("bob")
    curl(lab, "bob", report(lab, "bob"))
    assert curl(lab, "alice", report(lab, "alice")).peer_keys() == [bob]

    lab.move_client("bob", "lan2", IPv4Interface("192.168.60.11/24"))
    # wireguard-go keeps its cached source address across the move; re-setting the endpoint
    # clears it (as the agent does). Then any packet shows the hub bob's new public endpoint.
    lab.refresh_hub_endpoint("bob")
    assert lab.wait_for(lambda: lab.ping("bob", lab.tunnel_ip("hub")), timeout=10)
    moved = time.monotonic()
    assert lab.wait_for(
        lambda: curl(lab, "alice", report(lab, "alice")).peer_keys() == [], timeout=6
    ), "bob is still offered to alice after roaming"
    assert time.monotonic() - moved < 6
    # Bob's report from lan2 lands him with carol now.
    carol = lab.public_key("carol")
    curl(lab, "carol", report(lab, "carol"))
    assert curl(lab, "bob", report(lab, "bob")).peer_keys() == [carol]
