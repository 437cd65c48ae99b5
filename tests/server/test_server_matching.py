"""The matching rules, as pure functions of registrations."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Network, ip_address

import pytest

from wg_autopeer.protocol import LanEntry, WireFormatError
from wg_autopeer.server.matching import (
    GroupKey,
    Policy,
    PublicIdentity,
    Registration,
    ReportedLan,
    neighbours,
    public_identity,
)
from wg_autopeer.server.registry import Registry, answer_bytes, etag_of


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


A, B, C = key(1), key(2), key(3)
NOW = 1000.0


def reg(
    pubkey: str,
    public: str,
    *lans: tuple[str, int, str, int | None],
    tunnel: str = "10.99.0.9",
    expires_at: float = NOW + 90,
) -> Registration:
    return Registration(
        pubkey=pubkey,
        tunnel_ips=(ip_address(tunnel),),
        public_ip=public_identity(ip_address(public)),
        lans=tuple(
            ReportedLan(ip_address(addr), prefix, ip_address(gw), port)
            for addr, prefix, gw, port in lans
        ),
        expires_at=expires_at,
    )


def match(
    requester: Registration, *others: Registration, policy: Policy | None = None
) -> list[str]:
    regs = {r.pubkey: r for r in (requester, *others)}
    index: dict[GroupKey, set[str]] = {}
    for r in regs.values():
        for g in r.group_keys():
            index.setdefault(g, set()).add(r.pubkey)
    offers = neighbours(requester, index, regs, policy or Policy(), NOW)
    return [o.pubkey for o in offers]


HOME = ("192.168.50.10", 24, "192.168.50.1", 51820)


def test_same_public_ip_gateway_and_network_match() -> None:
    a = reg(A, "203.0.113.5", HOME)
    b = reg(B, "203.0.113.5", ("192.168.50.11", 24, "192.168.50.1", 51821), tunnel="10.99.0.3")
    regs = {A: a, B: b}
    index = {g: {A, B} for g in a.group_keys()}
    offers = neighbours(a, index, regs, Policy(), NOW)
    assert [o.to_json() for o in offers] == [
        {"pubkey": B, "endpoint": "192.168.50.11", "port": 51821, "ip": ["10.99.0.3"]}
    ]


def test_same_private_lan_behind_another_public_ip_does_not_match() -> None:
    assert match(reg(A, "203.0.113.5", HOME), reg(B, "198.51.100.7", HOME)) == []


def test_same_public_ip_other_network_does_not_match() -> None:
    other = ("192.168.60.11", 24, "192.168.50.1", 51820)
    assert match(reg(A, "203.0.113.5", HOME), reg(B, "203.0.113.5", other)) == []


def test_same_network_with_other_prefix_length_does_not_match() -> None:
    wider = ("192.168.50.11", 16, "192.168.50.1", 51820)
    assert match(reg(A, "203.0.113.5", HOME), reg(B, "203.0.113.5", wider)) == []


def test_same_public_ip_and_network_other_gateway_does_not_match() -> None:
    other_gw = ("192.168.50.11", 24, "192.168.50.254", 51820)
    assert match(reg(A, "203.0.113.5", HOME), reg(B, "203.0.113.5", other_gw)) == []


def test_requester_never_gets_itself() -> None:
    a = reg(A, "203.0.113.5", HOME)
    assert match(a) == []


def test_key_outside_the_allow_list_is_not_offered() -> None:
    a, b, c = (reg(k, "203.0.113.5", HOME) for k in (A, B, C))
    assert match(a, b, c, policy=Policy(allow=frozenset({A, C}))) == [C]


def test_excluded_key_is_not_offered_and_gets_nothing() -> None:
    a, b = reg(A, "203.0.113.5", HOME), reg(B, "203.0.113.5", HOME)
    policy = Policy(exclude=frozenset({B}))
    assert match(a, b, policy=policy) == []
    assert match(b, a, policy=policy) == []


def test_ipv6_entries_match_by_network() -> None:
    lan_a = ("2001:db8:1:2::10", 64, "2001:db8:1:2::1", 51820)
    lan_b = ("2001:db8:1:2::99", 64, "2001:db8:1:2::1", 51820)
    lan_c = ("2001:db8:1:3::99", 64, "2001:db8:1:3::1", 51820)
    a = reg(A, "203.0.113.5", lan_a)
    assert match(a, reg(B, "203.0.113.5", lan_b), reg(C, "203.0.113.5", lan_c)) == [B]


def test_ipv6_public_addresses_compare_by_their_64() -> None:
    a = reg(A, "2001:db8:aaaa:1::1", HOME)
    same_64 = reg(B, "2001:db8:aaaa:1:ffff::2", HOME)
    other_64 = reg(C, "2001:db8:aaaa:2::1", HOME)
    assert match(a, same_64, other_64) == [B]


def test_public_identity_is_the_ipv4_address_or_the_ipv6_64() -> None:
    v4: PublicIdentity = public_identity(ip_address("::ffff:203.0.113.5"))
    assert v4 == IPv4Address("203.0.113.5")
    assert public_identity(ip_address("2001:db8::1")) == IPv6Network("2001:db8::/64")


def test_neighbour_without_listen_port_gets_no_endpoint() -> None:
    a = reg(A, "203.0.113.5", HOME)
    b = reg(B, "203.0.113.5", ("192.168.50.11", 24, "192.168.50.1", None))
    regs = {A: a, B: b}
    index = {g: {A, B} for g in a.group_keys()}
    (offer,) = neighbours(a, index, regs, Policy(), NOW)
    assert offer.endpoint is None
    assert offer.port is None
    assert offer.ip == ["10.99.0.9"]


def test_expired_neighbour_is_not_offered() -> None:
    a = reg(A, "203.0.113.5", HOME)
    b = reg(B, "203.0.113.5", HOME, expires_at=NOW)
    assert match(a, b) == []


def test_answer_is_sorted_by_key_and_lists_each_neighbour_once() -> None:
    dual = (HOME, ("2001:db8:1:2::10", 64, "2001:db8:1:2::1", 51820))
    a = reg(A, "203.0.113.5", *dual)
    c = reg(C, "203.0.113.5", *dual)
    b = reg(B, "203.0.113.5", *dual)
    assert match(a, c, b) == [B, C]


def test_only_the_requesters_groups_are_visited() -> None:
    class RecordingIndex(Mapping[GroupKey, set[str]]):
        def __init__(self, data: dict[GroupKey, set[str]]) -> None:
            self.data = data
            self.visited: list[GroupKey] = []

        def __getitem__(self, k: GroupKey) -> set[str]:
            self.visited.append(k)
            return self.data[k]

        def __iter__(self) -> Iterator[GroupKey]:
            raise AssertionError("matching must not walk the whole index")

        def __len__(self) -> int:
            return len(self.data)

    a, b = reg(A, "203.0.113.5", HOME), reg(B, "203.0.113.5", HOME)
    elsewhere = reg(C, "198.51.100.1", HOME)
    data = {g: {A, B} for g in a.group_keys()}
    data.update({g: {C} for g in elsewhere.group_keys()})
    index = RecordingIndex(data)
    offers = neighbours(a, index, {A: a, B: b, C: elsewhere}, Policy(), NOW)
    assert [o.pubkey for o in offers] == [B]
    assert set(index.visited) == a.group_keys()


# -- registry wake-ups -----------------------------------------------------------------------


def test_moving_between_lans_wakes_the_old_and_the_new_group_only() -> None:
    registry = Registry(Policy())
    other_lan = ("10.1.1.10", 24, "10.1.1.1", 51820)
    third_lan = ("172.16.0.10", 24, "172.16.0.1", 51820)
    registry.put(reg(A, "203.0.113.5", HOME))
    registry.put(reg(B, "203.0.113.5", other_lan))
    registry.put(reg(C, "203.0.113.5", third_lan))
    events = {k: registry.change_event(k) for k in (A, B, C)}
    mover = key(4)
    registry.put(reg(mover, "203.0.113.5", HOME))
    assert [k for k, e in events.items() if e.is_set()] == [A]

    events = {k: registry.change_event(k) for k in (A, B, C)}
    registry.put(reg(mover, "203.0.113.5", other_lan))
    assert sorted(k for k, e in events.items() if e.is_set()) == sorted([A, B])


def test_refreshing_an_unchanged_registration_wakes_nobody() -> None:
    registry = Registry(Policy())
    registry.put(reg(A, "203.0.113.5", HOME))
    registry.put(reg(B, "203.0.113.5", HOME))
    event = registry.change_event(A)
    assert registry.put(reg(B, "203.0.113.5", HOME, expires_at=NOW + 500)) is False
    assert not event.is_set()


def test_matching_is_symmetric_with_and_without_listen_ports() -> None:
    # A mixed fleet: a and c report their listen port, b (the seed's agent) does not.
    # Whoever is offered to one side of a pair has that side offered back, so neither
    # is left routing to a neighbour that does not know it.
    a = reg(A, "203.0.113.10", ("192.168.50.10", 24, "192.168.50.1", 51820), tunnel="10.99.0.2")
    b = reg(B, "203.0.113.10", ("192.168.50.11", 24, "192.168.50.1", None), tunnel="10.99.0.3")
    c = reg(C, "203.0.113.10", ("192.168.50.12", 24, "192.168.50.9", 51820), tunnel="10.99.0.4")
    everyone = (a, b, c)
    for one in everyone:
        for other in everyone:
            if one is other:
                continue
            rest = [r for r in everyone if r is not one]
            there = other.pubkey in match(one, *rest)
            back = one.pubkey in match(other, *[r for r in everyone if r is not other])
            assert there == back, (one.pubkey, other.pubkey)
    regs = {r.pubkey: r for r in everyone}
    index: dict[GroupKey, set[str]] = {}
    for r in everyone:
        for g in r.group_keys():
            index.setdefault(g, set()).add(r.pubkey)
    to_a = {o.pubkey: o for o in neighbours(a, index, regs, Policy(), NOW)}
    to_b = {o.pubkey: o for o in neighbours(b, index, regs, Policy(), NOW)}
    # a gets b without an endpoint (a passive peer); b gets a with one.
    assert (to_a[B].endpoint, to_a[B].port) == (None, None)
    assert (to_b[A].endpoint, to_b[A].port) == ("192.168.50.10", 51820)
    assert C not in to_a  # another gateway: no match either way


def _with_mac(r: Registration, mac: str | None) -> Registration:
    return replace(r, lans=tuple(replace(lan, gateway_mac=mac) for lan in r.lans))


def test_gateway_fingerprints_keep_strangers_behind_one_cgnat_apart() -> None:
    # Two homes behind one carrier-grade NAT, both with the router defaults
    # 192.168.1.0/24 via 192.168.1.1: same public IP, gateway and network.
    home = ("192.168.1.10", 24, "192.168.1.1", 51820)
    other_home = ("192.168.1.11", 24, "192.168.1.1", 51820)
    a = _with_mac(reg(A, "198.51.100.7", home), "52:54:00:00:00:01")
    b = _with_mac(reg(B, "198.51.100.7", other_home), "52:54:00:00:00:02")
    assert match(a, b) == []
    assert match(b, a) == []
    # The same router: neighbours.
    same = _with_mac(b, "52:54:00:00:00:01")
    assert match(a, same) == [B]
    assert match(same, a) == [A]
    # One side without a fingerprint (wireguard-web's agent, an older one): as before.
    unknown = _with_mac(b, None)
    assert match(a, unknown) == [B]
    assert match(unknown, a) == [A]


def test_gateway_mac_is_validated_and_normalised() -> None:
    fields = {"pubkey": A, "ip": "192.168.1.10", "netmask": 24, "gateway": "192.168.1.1"}
    entry = LanEntry.from_json({**fields, "gateway_mac": " 52:54:00:AB:cd:01"})
    assert entry.gateway_mac == "52:54:00:ab:cd:01"
    with pytest.raises(WireFormatError, match="gateway_mac"):
        LanEntry.from_json({**fields, "gateway_mac": "nope"})
    # Built directly, only the normalised form is taken.
    with pytest.raises(WireFormatError, match="gateway_mac"):
        LanEntry(
            A, ip_address("192.168.1.10"), 24, ip_address("192.168.1.1"), None, "52:54:00:AB:CD:01"
        )


def test_answer_body_is_the_models_wire_encoding() -> None:
    # The registry encodes answers without building the answer objects; the bytes (and
    # so the ETags clients hold) must be those of the objects' wire encoding.
    registry = Registry(Policy())
    a = reg(A, "203.0.113.7", ("192.168.1.10", 24, "192.168.1.1", 51820))
    b = reg(B, "203.0.113.7", ("192.168.1.11", 24, "192.168.1.1", None), tunnel="10.99.0.2")
    c = reg(
        C,
        "203.0.113.7",
        ("192.168.1.12", 24, "192.168.1.1", 51821),
        ("2001:db8:1::12", 64, "2001:db8:1::1", 51821),
        tunnel="10.99.0.3",
    )
    for r in (a, b, c):
        registry.put(r, NOW)
    for k in (A, B, C, key(9)):
        body, etag = registry.answer(k, NOW)
        model = registry.answer_for(k, NOW)
        assert body == answer_bytes(model)
        assert etag == etag_of(model, registered=k != key(9))
    assert b'"endpoint"' in registry.answer(A, NOW)[0]
    assert len(registry.answer(A, NOW)[0]) > len(b'{"peers":[]}')
