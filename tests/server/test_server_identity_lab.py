"""Identity and privacy with the real server on a real wireguard-go hub (issue 7, part 2).

The server knows a caller only by the tunnel address its request comes from. Here every
way around that is tried from inside a namespace lab: another client's key from my
tunnel address, forged forwarding headers, requests that reach the server's listen address
without going through the tunnel (from the WAN, from a LAN through NAT, from the hub
itself, and with a spoofed tunnel source), a stale handshake, and a second home whose
private LAN and gateway are the same as alice's but behind another public address.
Every answer collected is checked against the lab's ground truth: nobody is offered a
client outside its own LAN, and no offer carries a public address.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, ip_address
from pathlib import Path
from typing import Any

import pytest

from wg_autopeer.lab import Lab, Topology, default_topology
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import SERVER_PORT, start_server
from wg_autopeer.lab.topology import ClientSpec, LanSpec
from wg_autopeer.protocol import PATH

pytestmark = pytest.mark.lab

# A second home with the same router defaults as alice's and bob's (lan1), elsewhere.
LAN3 = LanSpec(
    name="lan3",
    router="r3",
    wan=IPv4Interface("203.0.113.30/24"),
    gateway=IPv4Interface("192.168.50.1/24"),
)
DAVE = ClientSpec("dave", "lan3", IPv4Interface("192.168.50.10/24"), IPv4Interface("10.99.0.5/24"))
ERIN = ClientSpec("erin", "lan3", IPv4Interface("192.168.50.11/24"), IPv4Interface("10.99.0.6/24"))


def two_homes(prefix: str) -> Topology:
    """The default lab plus lan3: dave and erin at alice's and bob's very addresses."""
    return default_topology(prefix).with_lan(LAN3).with_client(DAVE).with_client(ERIN)


@dataclass
class Answer:
    asker: str
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def peers(self) -> list[str]:
        assert self.status == 200, (self.asker, self.status, self.text)
        return [p["pubkey"] for p in self.json()["peers"]]


@dataclass
class Caller:
    """curl from inside the lab; keeps every answer for the final privacy check."""

    lab: Lab
    answers: list[Answer] = field(default_factory=list)

    def url(self) -> str:
        return f"http://{self.lab.tunnel_ip('hub')}:{SERVER_PORT}{PATH}"

    def send(
        self,
        host: str,
        body: str | None,
        *,
        source: str | None = None,
        headers: Sequence[str] = (),
        method: str = "POST",
    ) -> Answer:
        """A request from ``host``'s namespace; ``source`` is curl's --interface (an
        address or a device; default: the host's tunnel address)."""
        if source is None:
            source = str(self.lab.tunnel_ip(host))
        argv = ["curl", "-sS", "--max-time", "5", "--connect-timeout", "3", "-X", method]
        argv += ["--interface", source, "-o", "-", "-w", "\n%{http_code}"]
        for header in headers:
            argv += ["-H", header]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        result = self.lab.run(host, *argv, self.url(), stdin_text=body, check=False, timeout=15)
        text, _, code = result.stdout.rpartition("\n")
        answer = Answer(f"{host} via {source}", int(code or 0), text)
        self.answers.append(answer)
        return answer

    def report(self, host: str, *, as_: str | None = None, **kw: Any) -> Answer:
        """``host`` reports its own LAN (with ``as_``'s key when given)."""
        return self.send(host, report_body(self.lab, host, pubkey_of=as_), **kw)

    def hosts_by_key(self) -> dict[str, str]:
        return {self.lab.public_key(c.name): c.name for c in self.lab.topology.clients}

    def assert_nothing_leaked(self) -> None:
        """Every 200 answer offers only true LAN neighbours, at their LAN addresses."""
        by_key = self.hosts_by_key()
        wan = self.lab.topology.wan
        checked = 0
        for answer in self.answers:
            if answer.status != 200:
                continue
            asker = answer.asker.split(" ", 1)[0]
            for offer in answer.json()["peers"]:
                offered = by_key[offer["pubkey"]]
                assert offered != asker, answer
                same_lan = (
                    self.lab.topology.client(asker).lan == self.lab.topology.client(offered).lan
                )
                assert same_lan, f"{asker} was offered {offered} from another LAN: {answer}"
                endpoint = offer.get("endpoint")
                assert endpoint is None or ip_address(endpoint) not in wan, answer
                assert endpoint in (None, str(self.lab.lan_ip(offered))), answer
                assert offer["ip"] == [str(self.lab.tunnel_ip(offered))], answer
                checked += 1
        print(f"privacy check: {len(self.answers)} answers, {checked} offers, none leaked")


def report_body(lab: Lab, host: str, *, pubkey_of: str | None = None) -> str:
    lan = lab.lan_interface(host)
    gateway = lab.topology.lan(lab.topology.client(host).lan).gateway.ip
    entry = {
        "pubkey": lab.public_key(pubkey_of or host),
        "ip": str(lan.ip),
        "netmask": lan.network.prefixlen,
        "gateway": str(gateway),
        "listen_port": 51820,
    }
    return json.dumps([entry])


@pytest.fixture
def caller_factory(lab_factory: Callable[..., Lab]) -> Iterator[Callable[..., Caller]]:
    callers: list[Caller] = []

    def make(build: Callable[[str], Topology] | None = None, *server_args: str) -> Caller:
        lab = lab_factory(build, base="sr")
        start_server(lab, *server_args)
        caller = Caller(lab)
        callers.append(caller)
        return caller

    yield make
    for caller in callers:
        caller.assert_nothing_leaked()


def key(caller: Caller, host: str) -> str:
    return caller.lab.public_key(host)


def register_everyone(caller: Caller) -> None:
    for client in caller.lab.topology.clients:
        assert caller.report(client.name).status == 200


# -- a client cannot speak for another -------------------------------------------------------


def test_another_clients_key_from_my_tunnel_address_is_refused(
    caller_factory: Callable[..., Caller],
) -> None:
    caller = caller_factory()
    register_everyone(caller)
    bob = key(caller, "bob")

    spoofed = caller.report("alice", as_="bob")
    assert spoofed.status == 403, spoofed
    assert "pubkey" in spoofed.json()["error"]
    carol_as_alice = caller.report("carol", as_="alice")
    assert carol_as_alice.status == 403, carol_as_alice
    # Neither attempt moved anyone: alice and bob still see each other, carol nobody.
    assert caller.report("alice").peers() == [bob]
    assert caller.report("bob").peers() == [key(caller, "alice")]
    assert caller.report("carol").peers() == []


def test_forged_forwarding_headers_do_not_change_who_is_calling(
    caller_factory: Callable[..., Caller],
) -> None:
    caller = caller_factory()
    register_everyone(caller)
    alice, bob = key(caller, "alice"), key(caller, "bob")
    bob_ip = str(caller.lab.tunnel_ip("bob"))
    forgeries = [
        [f"X-Forwarded-For: {bob_ip}"],
        [f"X-Forwarded-For: 127.0.0.1, {bob_ip}"],
        [f"Forwarded: for={bob_ip}"],
        [f'Forwarded: for="{bob_ip}:40000";proto=http'],
        [f"X-Real-IP: {bob_ip}"],
        [f"X-Forwarded-For: {bob_ip}", f"Forwarded: for={bob_ip}", f"X-Real-IP: {bob_ip}"],
    ]
    for headers in forgeries:
        # Alice posing as bob, with bob's key and bob's address in the headers.
        answer = caller.report("alice", as_="bob", headers=headers)
        assert answer.status == 403, (headers, answer)
        # uvicorn, left to its defaults, believes these headers from 127.0.0.1: a process
        # on the hub itself must not become bob either.
        local = caller.send(
            "hub", report_body(caller.lab, "bob"), source="127.0.0.1", headers=headers
        )
        assert local.status == 403, (headers, local)
        assert "127.0.0.1 is not a tunnel address" in local.json()["error"]
    # With her own key the headers are simply ignored: she is alice, and only alice moves.
    moved = json.dumps(
        [
            {
                "pubkey": alice,
                "ip": "192.168.77.10",
                "netmask": 24,
                "gateway": "192.168.77.1",
                "listen_port": 51820,
            }
        ]
    )
    forged = [f"X-Forwarded-For: {bob_ip}", f"Forwarded: for={bob_ip}"]
    assert caller.send("alice", moved, headers=forged).peers() == []
    assert caller.report("bob").peers() == []
    # A DELETE with bob's address in the headers drops alice, not bob.
    assert caller.report("alice").peers() == [bob]
    assert caller.send("alice", None, method="DELETE", headers=forged).status == 204
    assert caller.report("bob").peers() == []
    assert caller.report("alice").peers() == [bob]


# -- the tunnel is the only way in -----------------------------------------------------------


def test_requests_that_do_not_come_through_the_tunnel_are_refused(
    caller_factory: Callable[..., Caller],
) -> None:
    caller = caller_factory()
    lab = caller.lab
    register_everyone(caller)
    bob = key(caller, "bob")
    tunnel_net = str(lab.topology.hub.tunnel.network)
    hub_wan = str(lab.topology.hub.wan.ip)
    # r1 (the NAT router of alice's LAN) learns to reach the tunnel subnet over the WAN:
    # packets to the server's tunnel address now arrive at the hub's WAN side in clear.
    lab.run("r1", "ip", "route", "add", tunnel_net, "via", hub_wan)

    from_wan = caller.send("r1", report_body(lab, "alice"), source=str(lab.wan_ip("r1")))
    assert from_wan.status == 403, from_wan
    assert "not a tunnel address" in from_wan.json()["error"]
    # Alice herself, her own key, but over her LAN (through r1's NAT), not the tunnel.
    over_lan = caller.report("alice", source="eth0")
    assert over_lan.status == 403, over_lan
    # The hub's own addresses are not clients either.
    for source in (hub_wan, str(lab.tunnel_ip("hub"))):
        local = caller.send("hub", report_body(lab, "alice"), source=source)
        assert local.status == 403, (source, local)

    # r1 claims bob's tunnel address as its source. The hub's answer to 10.99.0.3 goes into
    # the tunnel to the real bob, so the spoofer never completes a TCP handshake.
    bob_ip = str(lab.tunnel_ip("bob"))
    lab.run("r1", "ip", "addr", "add", f"{bob_ip}/32", "dev", "lo")
    # ... and keeps it: no masquerade for that source.
    lab.run(
        "r1", "nft", "insert", "rule", "ip", "nat", "postrouting", "ip", "saddr", bob_ip, "accept"
    )
    to_bob = lab.hub_peer("bob").tx_bytes
    spoofed = caller.send("r1", report_body(lab, "bob"), source=bob_ip)
    assert spoofed.status == 0, spoofed
    # The SYN did reach the hub: its SYN-ACKs went into the tunnel, to the real bob.
    assert lab.hub_peer("bob").tx_bytes > to_bob

    # Nothing of the above touched a registration.
    assert caller.report("alice").peers() == [bob]
    assert caller.report("bob").peers() == [key(caller, "alice")]


# -- a stale handshake -----------------------------------------------------------------------

HANDSHAKE_MAX_AGE = 6


def fresh_handshake(lab: Lab, host: str) -> None:
    """Make ``host`` handshake with the hub now: a peer set anew starts a new session.

    (WireGuard renews a session only every 2 minutes under traffic; keepalives alone
    never do.)
    """
    hub = lab.topology.hub
    iface = lab.wg_interface(host)
    before = lab.hub_peer(host).latest_handshake or 0.0
    # Handshake times have a resolution of one second: a new session in the same second
    # as the lab's first would look like no new session at all, and none follows for 2
    # minutes. Start it in a later second.
    assert wait_for(lambda: time.time() >= before + 1.0, timeout=2.0, interval=0.05)
    lab.run(host, "wg", "set", iface, "peer", lab.public_key(hub.name), "remove")
    lab.run(
        host,
        "wg", "set", iface, "peer", lab.public_key(hub.name),
        "allowed-ips", str(hub.tunnel.network),
        "endpoint", f"{hub.wan.ip}:{hub.listen_port}",
        "persistent-keepalive", "25",
    )  # fmt: skip

    def renewed() -> bool:
        lab.ping(host, lab.tunnel_ip(hub.name), timeout=0.5)
        return (lab.hub_peer(host).latest_handshake or 0.0) > before

    assert wait_for(renewed, timeout=10.0, interval=0.2), f"{host} did not handshake again"


def test_stale_handshake_is_refused_and_drops_the_registration(
    caller_factory: Callable[..., Caller], tmp_path: Path
) -> None:
    config = tmp_path / "server.toml"
    config.write_text(f"handshake_max_age = {HANDSHAKE_MAX_AGE}\nrefresh_interval = 0.5\n")
    caller = caller_factory(None, "--config", str(config))
    lab = caller.lab
    for host in ("alice", "bob"):
        fresh_handshake(lab, host)
    alice, bob = key(caller, "alice"), key(caller, "bob")
    assert caller.report("alice").peers() == []
    assert caller.report("bob").peers() == [alice]

    # No traffic renews a session within the test: both handshakes age past the limit.
    def stale(host: str) -> bool:
        answer = caller.report(host)
        assert answer.status in (200, 409), answer
        return answer.status == 409

    assert wait_for(lambda: stale("alice"), timeout=HANDSHAKE_MAX_AGE + 6.0, interval=0.5)
    refused = caller.answers[-1]
    assert "handshake" in refused.json()["error"]
    assert wait_for(lambda: stale("bob"), timeout=4.0, interval=0.5)

    # A new handshake lets alice in again, but bob's stale registration is gone: she gets
    # nobody until bob too has handshaken and reported.
    fresh_handshake(lab, "alice")
    assert wait_for(lambda: not stale("alice"), timeout=3.0, interval=0.2)
    assert caller.answers[-1].peers() == []
    fresh_handshake(lab, "bob")
    assert wait_for(lambda: not stale("bob"), timeout=3.0, interval=0.2)
    assert caller.answers[-1].peers() == [alice]
    assert caller.report("alice").peers() == [bob]


# -- two homes with the same router defaults -------------------------------------------------


def test_same_private_lan_and_gateway_behind_another_public_ip_gets_nobody(
    caller_factory: Callable[..., Caller],
) -> None:
    caller = caller_factory(two_homes)
    lab = caller.lab
    # Every reported entry of dave and erin is identical to alice's and bob's.
    assert lab.lan_interface("dave") == lab.lan_interface("alice")
    assert lab.lan_interface("erin") == lab.lan_interface("bob")
    register_everyone(caller)
    alice, bob, dave, erin = (key(caller, h) for h in ("alice", "bob", "dave", "erin"))

    assert caller.report("alice").peers() == [bob]
    assert caller.report("bob").peers() == [alice]
    assert caller.report("dave").peers() == [erin]
    assert caller.report("erin").peers() == [dave]
    assert caller.report("carol").peers() == []
    # Dave even claims alice's key: refused, and nothing moves.
    assert caller.report("dave", as_="alice").status == 403
    assert caller.report("alice").peers() == [bob]
    assert caller.report("dave").peers() == [erin]
