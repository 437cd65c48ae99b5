from __future__ import annotations

import json
from ipaddress import ip_address, ip_network
from types import MappingProxyType

import pytest
from agent_keys import key

from wg_autopeer.agent.safety import (
    MAX_ANSWER_BYTES,
    DirectPeer,
    SafetyContext,
    filter_offers,
    parse_answer,
)
from wg_autopeer.errors import UnsafeAnswer
from wg_autopeer.protocol import PeerOffer
from wg_autopeer.wireguard.base import Endpoint

OWN, HUB, HAND, BOB, CAROL = key(1), key(2), key(3), key(4), key(5)

CTX = SafetyContext(
    own_key=OWN,
    hub_key=HUB,
    tunnel_networks=(ip_network("10.99.0.0/24"), ip_network("fd99::/64")),
    own_tunnel_ips=(ip_address("10.99.0.2"),),
    hub_tunnel_ips=(ip_address("10.99.0.1"), ip_address("fd99::1")),
    lan_networks=(ip_network("192.168.50.0/24"),),
    foreign_peers=MappingProxyType(
        {HUB: (ip_network("10.99.0.0/24"),), HAND: (ip_network("10.99.0.77/32"),)}
    ),
    own_lan_ips=(ip_address("192.168.50.10"),),
)


def offer(
    pubkey: str = BOB,
    endpoint: str | None = "192.168.50.11",
    port: int | None = 51820,
    ip: list[str] | None = None,
) -> PeerOffer:
    return PeerOffer(pubkey=pubkey, endpoint=endpoint, port=port, ip=ip or ["10.99.0.3/32"])


def refusal_of(o: PeerOffer, ctx: SafetyContext = CTX) -> str:
    result = filter_offers([o], ctx)
    assert result.accepted == ()
    assert len(result.refused) == 1
    return result.refused[0].reason


def test_good_offer_becomes_direct_peer() -> None:
    result = filter_offers([offer(ip=["10.99.0.3", "fd99::3/128"])], CTX)
    assert result.refused == ()
    assert result.accepted == (
        DirectPeer(
            BOB,
            Endpoint(ip_address("192.168.50.11"), 51820),
            (ip_network("10.99.0.3/32"), ip_network("fd99::3/128")),
        ),
    )


def test_hub_covering_prefix_does_not_count_as_explicit_claim() -> None:
    # The hub carries 10.99.0.0/24, which covers bob's /32: that must not block bob.
    assert len(filter_offers([offer()], CTX).accepted) == 1


def test_hub_explicit_host_route_may_be_taken() -> None:
    ctx = SafetyContext(**{**CTX.__dict__, "foreign_peers": {HUB: (ip_network("10.99.0.3/32"),)}})
    assert len(filter_offers([offer()], ctx).accepted) == 1


@pytest.mark.parametrize(
    ("allowed", "why"),
    [
        ("0.0.0.0/0", "not a host route"),
        ("::/0", "not a host route"),
        ("10.99.0.0/24", "not a host route"),
        ("10.99.0.1/32", "hub's tunnel address"),
        ("fd99::1/128", "hub's tunnel address"),
        ("10.99.0.2/32", "own tunnel address"),
        ("10.99.0.77/32", "hand-configured"),
        ("10.98.0.3/32", "outside the tunnel network"),
        ("192.168.50.11/32", "outside the tunnel network"),
        ("10.99.0.255/32", "broadcast"),
        ("not-an-ip", "not a network"),
        ("10.99.0.3/24", "not a network"),
    ],
)
def test_bad_allowed_ip_is_refused(allowed: str, why: str) -> None:
    assert why in refusal_of(offer(ip=[allowed]))


def test_one_bad_allowed_ip_refuses_the_whole_offer() -> None:
    assert "not a host route" in refusal_of(offer(ip=["10.99.0.3/32", "0.0.0.0/0"]))


def test_offer_without_allowed_ips_is_refused() -> None:
    o = PeerOffer(pubkey=BOB, endpoint="192.168.50.11", port=51820, ip=[])
    assert refusal_of(o) == "no allowed IPs"


def test_offer_with_too_many_allowed_ips_is_refused() -> None:
    assert "at most" in refusal_of(offer(ip=[f"10.99.0.{i}/32" for i in range(10, 40)]))


@pytest.mark.parametrize(
    ("pubkey", "why"),
    [
        (OWN, "own key"),
        (HUB, "hub's key"),
        (HAND, "did not add"),
        ("short", "not a WireGuard public key"),
        (key(6)[:-2] + "!!", "not a WireGuard public key"),
        ("A" * 42 + "==", "not a WireGuard public key"),  # 31 bytes
        ("", "not a WireGuard public key"),
    ],
)
def test_bad_key_is_refused(pubkey: str, why: str) -> None:
    assert why in refusal_of(offer(pubkey=pubkey))


@pytest.mark.parametrize(
    ("endpoint", "port", "why"),
    [
        ("203.0.113.7", 51820, "outside the LANs"),
        ("192.168.50.10", 51820, "own LAN address"),
        ("192.168.50.0", 51820, "network or broadcast"),
        ("192.168.50.255", 51820, "network or broadcast"),
        ("127.0.0.1", 51820, "not a unicast LAN address"),
        ("hub.example", 51820, "not an IP address"),
        ("192.168.50.11", 0, "out of range"),
        ("192.168.50.11", 70000, "out of range"),
    ],
)
def test_bad_endpoint_is_refused(endpoint: str | None, port: int | None, why: str) -> None:
    assert why in refusal_of(offer(endpoint=endpoint, port=port))


def test_duplicate_key_refuses_every_copy() -> None:
    good = offer(pubkey=CAROL, endpoint="192.168.50.13", ip=["10.99.0.5/32"])
    result = filter_offers([offer(ip=["10.99.0.3/32"]), offer(ip=["10.99.0.4/32"]), good], CTX)
    assert [p.public_key for p in result.accepted] == [CAROL]
    assert [r.reason for r in result.refused] == ["offered more than once"] * 2


def test_allowed_ip_claimed_twice_refuses_both_offers() -> None:
    a = offer(pubkey=BOB, ip=["10.99.0.3/32"])
    b = offer(pubkey=CAROL, endpoint="192.168.50.13", ip=["10.99.0.4", "10.99.0.3"])
    result = filter_offers([a, b], CTX)
    assert result.accepted == ()
    assert {r.pubkey for r in result.refused} == {BOB, CAROL}
    assert all("offered for another peer" in r.reason for r in result.refused)


def test_refusal_of_hostile_key_is_truncated_for_the_log() -> None:
    result = filter_offers([offer(pubkey="x" * 5000 + "\n")], CTX)
    assert len(result.refused[0].pubkey) <= 60
    assert "\n" not in result.refused[0].pubkey


def _answer(peers: list[dict[str, object]]) -> bytes:
    return json.dumps({"peers": peers}).encode()


def test_parse_answer_reads_wire_format() -> None:
    raw = _answer(
        [{"pubkey": BOB, "endpoint": "192.168.50.11", "port": 51820, "ip": ["10.99.0.3/32"]}]
    )
    answer = parse_answer(raw)
    assert answer.peers[0].pubkey == BOB
    assert answer.peers[0].ip == ["10.99.0.3/32"]


def test_parse_answer_accepts_wireguard_web_non_target() -> None:
    answer = parse_answer(_answer([{"pubkey": BOB, "ip": ["10.99.0.3/32"]}]))
    result = filter_offers(answer.peers, CTX)
    assert result.refused == ()
    assert result.accepted[0].passive


@pytest.mark.parametrize(
    ("endpoint", "port"), [(None, 51820), ("192.168.50.11", None), ("", 51820)]
)
def test_offer_without_usable_endpoint_becomes_a_passive_peer(
    endpoint: str | None, port: int | None
) -> None:
    result = filter_offers([offer(endpoint=endpoint, port=port)], CTX)
    assert result.refused == ()
    assert result.accepted == (DirectPeer(BOB, None, (ip_network("10.99.0.3/32"),)),)


def test_passive_offer_is_still_judged_on_its_allowed_ips() -> None:
    assert "hub's tunnel address" in refusal_of(
        offer(endpoint=None, port=None, ip=["10.99.0.1/32"])
    )


def test_ten_thousand_peers_are_refused_whole() -> None:
    peers: list[dict[str, object]] = [{"pubkey": key(7)} for _ in range(10_000)]
    with pytest.raises(UnsafeAnswer, match="10000 peers"):
        parse_answer(_answer(peers))


def test_answer_over_one_mebibyte_is_refused_whole() -> None:
    with pytest.raises(UnsafeAnswer, match="exceeds"):
        parse_answer(b" " * (MAX_ANSWER_BYTES + 1))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"<html>hello</html>",
        b'{"peers": [',
        b"[]",
        b'{"peers": {}}',
        b'{"peers": [1]}',
        b"\xff\xfe",
    ],
)
def test_garbage_answer_is_unsafe(raw: bytes) -> None:
    with pytest.raises(UnsafeAnswer, match="not the wire format"):
        parse_answer(raw)


@pytest.mark.parametrize(
    ("peer", "field"),
    [
        ({"pubkey": 7}, "peers.0.pubkey"),
        ({"endpoint": "192.168.1.2"}, "peers.0.pubkey"),
        ({"pubkey": "k", "port": True}, "peers.0.port"),
        ({"pubkey": "k", "port": 51820.5}, "peers.0.port"),
        ({"pubkey": "k", "ip": "10.99.0.3/32"}, "peers.0.ip"),
        ({"pubkey": "k", "ip": ["10.99.0.3/32", None]}, "peers.0.ip.1"),
    ],
)
def test_answer_of_the_wrong_types_is_refused_naming_the_field(
    peer: dict[str, object], field: str
) -> None:
    with pytest.raises(UnsafeAnswer, match=f"not the wire format: {field}:"):
        parse_answer(_answer([peer]))
