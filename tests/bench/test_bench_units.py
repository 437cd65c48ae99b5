"""The benchmarks' pure parts: statistics, ping parsing, the synthetic hub, the HTTP
client's parsing and the docs splice. No root, no network, no timing."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address

import pytest
from bench.common import Distribution, Row, parse_ping, percentile
from bench.loadgen import parse_answer, request_bytes
from bench.run import TABLE_END, TABLE_START, markdown_table, splice
from bench.synthetic import homes, population, tunnel_ip, uapi_lines

from wg_autopeer.server.identity import HubSnapshot
from wg_autopeer.wireguard.uapi import parse_device


def test_percentiles_interpolate_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 90) == pytest.approx(4.6)
    summary = Distribution.of(values, censored=1)
    assert (summary.n, summary.median, summary.maximum, summary.censored) == (5, 3.0, 5.0, 1)
    assert "1 hit the deadline" in summary.brief()


def test_an_empty_sample_says_so() -> None:
    assert Distribution.of([]).brief() == "no sample"


PING = """PING 10.99.0.3 (10.99.0.3) 56(84) bytes of data.
[1000.100000] 64 bytes from 10.99.0.3: icmp_seq=1 ttl=63 time=1.00 ms
[1000.120000] no answer yet for icmp_seq=2
[1000.140000] no answer yet for icmp_seq=3
[1000.160500] 64 bytes from 10.99.0.3: icmp_seq=4 ttl=63 time=0.50 ms
"""


def test_ping_output_gives_send_times_and_losses() -> None:
    echoes = parse_ping(PING, interval=0.02)
    assert [e.seq for e in echoes] == [1, 2, 3, 4]
    assert [e.rtt_ms for e in echoes] == [1.0, None, None, 0.5]
    assert echoes[0].sent == pytest.approx(1000.099)
    # Lost probes are placed on the sending schedule, anchored on the nearest reply.
    assert echoes[1].sent == pytest.approx(1000.119)
    assert echoes[2].sent == pytest.approx(1000.140)


def test_tunnel_addresses_are_distinct_loopback_hosts() -> None:
    addresses = {tunnel_ip(i) for i in range(70_000)}
    assert len(addresses) == 70_000
    for text in addresses:
        address = ip_address(text)
        assert address.is_loopback
        assert not text.endswith((".0", ".255"))


def test_population_is_deterministic_in_homes_of_three_to_five() -> None:
    first = population(2000, "distinct")
    assert first == population(2000, "distinct")
    assert len(first) == 2000
    sizes = [len(m) for m in homes(first).values()]
    assert all(3 <= s <= 5 for s in sizes[:-1])
    for members in homes(first).values():
        assert len({m.public_ip for m in members}) == 1
        assert len({m.gateway for m in members}) == 1
    # Distinct LANs: no two homes share a gateway.
    gateways = {members[0].gateway for members in homes(first).values()}
    assert len(gateways) == len(homes(first))


def test_worst_case_population_mostly_shares_router_defaults() -> None:
    clients = population(4000, "same")
    share = sum(c.gateway == "192.168.1.1" for c in clients) / len(clients)
    assert share > 0.8
    assert len({c.public_ip for c in clients}) == len(homes(clients))


def test_synthetic_hub_state_goes_through_the_products_parser_and_index() -> None:
    clients = population(500, "same")
    device = parse_device("bench0", uapi_lines(clients, handshake=1_700_000_000))
    assert len(device.peers) == 500
    snapshot = HubSnapshot.build(device)
    for client in clients[:50]:
        peer = snapshot.lookup(IPv4Address(client.tunnel_ip))
        assert peer is not None
        assert peer.public_key == client.pubkey
        assert peer.public_ip == IPv4Address(client.public_ip)


def test_raw_http_answer_is_parsed() -> None:
    raw = b'HTTP/1.1 200 OK\r\netag: "abc"\r\ncontent-length: 12\r\n\r\n{"peers":[]}'
    answer = parse_answer(raw, 0.001)
    assert (answer.status, answer.etag, answer.body) == (200, '"abc"', b'{"peers":[]}')
    assert parse_answer(b"", 0.0).status == 0
    request = request_bytes(b"[]", {"Prefer": "wait=60"})
    assert b"Content-Length: 2\r\n" in request
    assert request.endswith(b"Prefer: wait=60\r\n\r\n[]")


def test_the_docs_summary_block_is_replaced_in_place() -> None:
    text = f"intro\n{TABLE_START}\nold\n{TABLE_END}\noutro\n"
    block = f"{TABLE_START}\nnew\n{TABLE_END}"
    assert splice(text, block) == f"intro\n{block}\noutro\n"
    with pytest.raises(ValueError, match="block"):
        splice("no markers here", block)


def test_markdown_table_marks_targets_and_escapes_pipes() -> None:
    table = markdown_table([Row("P", "a|b", "1 s", "<= 2 s", True), Row("P", "c", "x", "", None)])
    assert "a\\|b" in table
    assert "<= 2 s — **met**" in table
