"""The HTTP server over a FakeWireGuard hub: wire format, identity, errors, push, soft state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from server_fakes import ALICE, BOB, CAROL, HUB_IF, JSON, Hub, curl_body, entry

from wg_autopeer.protocol import MAX_BODY_BYTES, PATH
from wg_autopeer.server.pgstore import PostgresStore
from wg_autopeer.server.store import RegistrationStore, SqliteStore
from wg_autopeer.wireguard.base import Endpoint

pytestmark = pytest.mark.asyncio

StoreOpener = Callable[[], RegistrationStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, db_path: Path) -> StoreOpener:
    """Opens a store on the same data each time it is called: a SQLite file, or one
    PostgreSQL database of this test's own (the session's server)."""
    if request.param == "sqlite":
        return lambda: SqliteStore(db_path)
    url: str = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url, hub="")


@pytest.fixture
def hub(hub_factory: Callable[[RegistrationStore], Hub], open_store: StoreOpener) -> Hub:
    """The app tests run over each store."""
    return hub_factory(open_store())


def peer_keys(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [p["pubkey"] for p in response.json()["peers"]]


async def wait_until(predicate: Callable[[], bool], within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


# -- wire format -----------------------------------------------------------------------------


async def test_neighbours_on_the_same_lan_get_each_other_in_the_wire_format(
    hub: Hub, app: FastAPI
) -> None:
    assert peer_keys(await hub.post(app, ALICE)) == []
    response = await hub.post(app, BOB)
    assert response.headers["content-type"] == "application/json"
    assert response.headers["etag"].startswith('"')
    assert response.json() == {
        "peers": [
            {"pubkey": ALICE.key, "endpoint": "192.168.50.10", "port": 51820, "ip": ["10.99.0.2"]}
        ]
    }
    assert peer_keys(await hub.post(app, ALICE)) == [BOB.key]


async def test_same_private_lan_behind_another_public_ip_gets_nobody(
    hub: Hub, app: FastAPI
) -> None:
    await hub.post(app, ALICE)
    await hub.post(app, BOB)
    assert peer_keys(await hub.post(app, CAROL)) == []
    assert CAROL.key not in peer_keys(await hub.post(app, ALICE))


async def test_single_object_body_and_unknown_fields_are_accepted(hub: Hub, app: FastAPI) -> None:
    await hub.post(app, ALICE)
    async with hub.client(app, BOB) as http:
        body = json.dumps({**entry(BOB), "mac": "aa:bb", "comment": "x"}).encode()
        response = await http.post(PATH, content=body, headers=JSON)
    assert peer_keys(response) == [ALICE.key]


async def test_neighbour_without_listen_port_is_offered_without_endpoint_or_port(
    hub: Hub, app: FastAPI
) -> None:
    bare = entry(ALICE)
    del bare["listen_port"]
    await hub.post(app, ALICE, bare)
    response = await hub.post(app, BOB)
    assert response.json() == {"peers": [{"pubkey": ALICE.key, "ip": ["10.99.0.2"]}]}


async def test_openapi_schema_documents_the_endpoint(app: FastAPI) -> None:
    schema = app.openapi()
    post = schema["paths"][PATH]["post"]
    assert {"200", "400", "403", "409", "413", "415"} <= set(post["responses"])
    assert "application/json" in post["requestBody"]["content"]
    assert "delete" in schema["paths"][PATH]


# -- identity --------------------------------------------------------------------------------


async def test_source_outside_the_tunnel_is_refused(hub: Hub, app: FastAPI) -> None:
    async with hub.client(app, "192.0.2.50") as http:
        response = await http.post(PATH, content=curl_body(entry(ALICE)), headers=JSON)
    assert response.status_code == 403
    assert "not a tunnel address" in response.json()["error"]


async def test_pubkey_not_owning_the_source_address_is_refused(hub: Hub, app: FastAPI) -> None:
    await hub.post(app, ALICE)
    spoofed = await hub.post(app, CAROL, entry(CAROL, pubkey=ALICE.key))
    assert spoofed.status_code == 403
    assert "pubkey" in spoofed.json()["error"]
    # Carol's attempt to pose as alice registered nothing for either of them.
    assert peer_keys(await hub.post(app, BOB)) == [ALICE.key]


async def test_forged_forwarding_headers_are_ignored(hub: Hub, app: FastAPI) -> None:
    forged = {"X-Forwarded-For": ALICE.tunnel_ip, "Forwarded": f"for={ALICE.tunnel_ip}"}
    async with hub.client(app, "192.0.2.50") as http:
        response = await http.post(
            PATH, content=curl_body(entry(ALICE)), headers={**JSON, **forged}
        )
    assert response.status_code == 403
    # From carol's own address, pretending to be alice's address changes nothing either.
    response = await hub.post(app, CAROL, entry(CAROL, pubkey=ALICE.key), **forged)
    assert response.status_code == 403


async def test_trusted_proxy_may_name_the_caller(hub: Hub) -> None:
    app = hub.app(trusted_proxies=(ip_network("127.0.0.1/32"),))
    async with hub.client(app, "127.0.0.1") as http:
        response = await http.post(
            PATH,
            content=curl_body(entry(ALICE)),
            headers={**JSON, "X-Forwarded-For": f"192.0.2.1, {ALICE.tunnel_ip}"},
        )
    assert response.status_code == 200, response.text


async def test_stale_handshake_is_refused_with_409(hub: Hub, app: FastAPI) -> None:
    hub.wg.update_peer(HUB_IF, ALICE.key, latest_handshake=hub.clock.now - 181)
    response = await hub.post(app, ALICE)
    assert response.status_code == 409
    assert "handshake" in response.json()["error"]
    hub.wg.update_peer(HUB_IF, ALICE.key, latest_handshake=None)
    assert (await hub.post(app, ALICE)).status_code == 409


async def test_new_hub_peer_is_known_at_its_first_request(hub: Hub, app: FastAPI) -> None:
    await hub.core(app).tick()
    hub.wg.update_peer(HUB_IF, ALICE.key, allowed_ips=())
    await hub.core(app).tick()
    assert (await hub.post(app, ALICE)).status_code == 403
    hub.wg.update_peer(HUB_IF, ALICE.key, allowed_ips=(ip_network("10.99.0.2/32"),))
    # No timer tick in between: the unknown source itself triggers the re-read.
    assert (await hub.post(app, ALICE)).status_code == 200


async def test_unknown_sources_cannot_hammer_the_device(hub: Hub) -> None:
    app = hub.app(unknown_source_refresh_gap=60.0)
    reads = 0
    original = hub.wg.get_device

    async def counting(interface: str, *, with_private_key: bool = False) -> Any:
        nonlocal reads
        reads += 1
        return await original(interface, with_private_key=with_private_key)

    hub.wg.get_device = counting  # type: ignore[method-assign]
    async with hub.client(app, "10.99.0.200") as http:
        for _ in range(20):
            response = await http.post(PATH, content=curl_body(entry(ALICE)), headers=JSON)
            assert response.status_code == 403
    assert reads == 1


# -- malformed requests ----------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes]] = [
    ("not json", b"{nope"),
    ("invalid utf-8", b'[{"pubkey": "\xff\xfe"}]'),
    ("empty list", b"[]"),
    ("json null", b"null"),
    ("a string", b'"hello"'),
    ("list of lists", b"[[]]"),
    ("missing field", json.dumps([{"pubkey": ALICE.key, "ip": "192.168.50.10"}]).encode()),
    ("bad key", curl_body(entry(ALICE, pubkey="not-a-key"))),
    ("bad address", curl_body(entry(ALICE, ip="192.168.50.300"))),
    ("netmask too long", curl_body(entry(ALICE, netmask=33))),
    ("netmask not a number", curl_body(entry(ALICE, netmask=float("inf")))),
    # Python would take these as 0.0.0.1, 192.168.50.10, /1 and port 1.
    ("address true", curl_body(entry(ALICE, ip=True))),
    ("address as a number", curl_body(entry(ALICE, ip=3232248330))),
    ("netmask true", curl_body(entry(ALICE, netmask=True))),
    ("listen port true", curl_body(entry(ALICE, listen_port=True))),
    ("family mismatch", curl_body(entry(ALICE, gateway="fe80::1"))),
    ("port out of range", curl_body(entry(ALICE, listen_port=70000))),
    ("65 entries", curl_body(*[entry(ALICE, ip=f"192.168.50.{i}") for i in range(2, 67)])),
    ("mixed pubkeys", curl_body(entry(ALICE), entry(ALICE, pubkey=BOB.key))),
    ("deep nesting", b"[" * 30000 + b"]" * 30000),
    ("huge integer", b'[{"netmask": ' + b"9" * 5000 + b"}]"),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[c for c, _ in BAD_BODIES])
async def test_malformed_body_gets_400_with_a_reason(
    hub: Hub, app: FastAPI, case: str, body: bytes
) -> None:
    async with hub.client(app, ALICE) as http:
        response = await http.post(PATH, content=body, headers=JSON)
    assert response.status_code == 400, (case, response.text)
    assert response.json()["error"]


async def test_bad_entry_leaves_the_current_registration_alone(hub: Hub, app: FastAPI) -> None:
    await hub.post(app, ALICE)
    moved = entry(ALICE, ip="10.1.1.5", gateway="10.1.1.1")
    response = await hub.post(app, ALICE, moved, entry(ALICE, netmask=99))
    assert response.status_code == 400
    offers = (await hub.post(app, BOB)).json()["peers"]
    assert offers == [
        {"pubkey": ALICE.key, "endpoint": "192.168.50.10", "port": 51820, "ip": ["10.99.0.2"]}
    ]


async def test_body_over_64k_is_refused_with_413(hub: Hub, app: FastAPI) -> None:
    big = b"[" + b" " * MAX_BODY_BYTES + b"]"
    async with hub.client(app, ALICE) as http:
        response = await http.post(PATH, content=big, headers=JSON)
    assert response.status_code == 413


async def test_chunked_body_over_64k_is_refused_without_reading_it_all(
    hub: Hub, app: FastAPI
) -> None:
    sent = 0

    async def endless() -> Any:
        nonlocal sent
        while sent < 10 * MAX_BODY_BYTES:
            sent += 4096
            yield b" " * 4096

    async with hub.client(app, ALICE) as http:
        response = await http.post(PATH, content=endless(), headers=JSON)
    assert response.status_code == 413
    assert sent < 2 * MAX_BODY_BYTES


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_non_json_content_type_is_refused_with_415(
    hub: Hub, app: FastAPI, content_type: str
) -> None:
    async with hub.client(app, ALICE) as http:
        response = await http.post(
            PATH, content=curl_body(entry(ALICE)), headers={"Content-Type": content_type}
        )
    assert response.status_code == 415
    assert response.json()["error"]


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH"])
async def test_other_methods_get_405_with_an_error_body(
    hub: Hub, app: FastAPI, method: str
) -> None:
    async with hub.client(app, ALICE) as http:
        response = await http.request(method, PATH)
    assert response.status_code == 405
    assert response.json()["error"]


async def test_odd_header_values_never_cause_a_500(hub: Hub, app: FastAPI) -> None:
    odd = {
        "If-None-Match": 'W/"", ,*x,\x7f',
        "Prefer": "wait=NaN; wait=-1, wait",
        "Content-Length": str(len(curl_body(entry(ALICE)))),
    }
    response = await hub.post(app, ALICE, **odd)
    assert response.status_code == 200
    async with hub.client(app, ALICE) as http:
        response = await http.post(
            PATH,
            content=curl_body(entry(ALICE)),
            headers={**JSON, "Prefer": "wait=1e999", "If-None-Match": "nothing"},
        )
    assert response.status_code == 200


# -- blocking queries ------------------------------------------------------------------------


async def test_plain_request_with_matching_etag_and_no_wait_gets_304(
    hub: Hub, app: FastAPI
) -> None:
    first = await hub.post(app, ALICE)
    again = await hub.post(app, ALICE, **{"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert again.headers["etag"] == first.headers["etag"]


async def test_blocking_query_ends_with_304_when_nothing_changes(hub: Hub, app: FastAPI) -> None:
    first = await hub.post(app, ALICE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    again = await hub.post(
        app, ALICE, **{"If-None-Match": first.headers["etag"], "Prefer": "wait=0.3"}
    )
    assert again.status_code == 304
    assert loop.time() - started >= 0.3


async def test_neighbour_registration_wakes_a_blocking_query_within_a_second(
    hub: Hub, app: FastAPI
) -> None:
    first = await hub.post(app, ALICE)
    core = hub.core(app)
    waiting = asyncio.create_task(
        hub.post(app, ALICE, **{"If-None-Match": first.headers["etag"], "Prefer": "wait=30"})
    )
    await wait_until(lambda: core.waiting == 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hub.post(app, BOB)
    response = await asyncio.wait_for(waiting, timeout=1.0)
    assert loop.time() - started < 1.0
    assert peer_keys(response) == [BOB.key]
    assert response.headers["etag"] != first.headers["etag"]


async def test_unrelated_registration_does_not_wake_a_blocking_query(
    hub: Hub, app: FastAPI
) -> None:
    first = await hub.post(app, ALICE)
    waiting = asyncio.create_task(
        hub.post(app, ALICE, **{"If-None-Match": first.headers["etag"], "Prefer": "wait=0.5"})
    )
    await wait_until(lambda: hub.core(app).waiting == 1)
    await hub.post(app, CAROL)
    response = await waiting
    assert response.status_code == 304


async def test_delete_drops_the_caller_and_wakes_its_neighbour_within_a_second(
    hub: Hub, app: FastAPI
) -> None:
    await hub.post(app, ALICE)
    first = await hub.post(app, BOB)
    assert peer_keys(first) == [ALICE.key]
    waiting = asyncio.create_task(
        hub.post(app, BOB, **{"If-None-Match": first.headers["etag"], "Prefer": "wait=30"})
    )
    await wait_until(lambda: hub.core(app).waiting == 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with hub.client(app, ALICE) as http:
        gone = await http.delete(PATH)
    assert gone.status_code == 204
    response = await asyncio.wait_for(waiting, timeout=1.0)
    assert loop.time() - started < 1.0
    assert peer_keys(response) == []


async def test_delete_from_outside_the_tunnel_is_refused(hub: Hub, app: FastAPI) -> None:
    async with hub.client(app, "192.0.2.50") as http:
        assert (await http.delete(PATH)).status_code == 403


# -- soft state ------------------------------------------------------------------------------


async def test_roaming_client_disappears_from_neighbours_answers(hub: Hub, app: FastAPI) -> None:
    await hub.post(app, ALICE)
    first = await hub.post(app, BOB)
    assert peer_keys(first) == [ALICE.key]
    waiting = asyncio.create_task(
        hub.post(app, BOB, **{"If-None-Match": first.headers["etag"], "Prefer": "wait=30"})
    )
    await wait_until(lambda: hub.core(app).waiting == 1)
    hub.wg.update_peer(HUB_IF, ALICE.key, endpoint=Endpoint(ip_address("198.51.100.99"), 9))
    await hub.core(app).tick()
    response = await asyncio.wait_for(waiting, timeout=1.0)
    assert peer_keys(response) == []


async def test_port_change_behind_the_same_public_ip_is_not_roaming(hub: Hub, app: FastAPI) -> None:
    await hub.post(app, ALICE)
    hub.wg.update_peer(HUB_IF, ALICE.key, endpoint=Endpoint(ip_address(ALICE.public), 1))
    await hub.core(app).tick()
    assert peer_keys(await hub.post(app, BOB)) == [ALICE.key]


async def test_stale_handshake_on_the_hub_drops_the_registration(hub: Hub, app: FastAPI) -> None:
    await hub.post(app, ALICE)
    hub.clock.now += 181
    hub.wg.update_peer(HUB_IF, BOB.key, latest_handshake=hub.clock.now)
    await hub.core(app).tick()
    assert hub.core(app).registry.get(ALICE.key) is None
    assert peer_keys(await hub.post(app, BOB)) == []


async def test_registration_expires_after_its_ttl(hub: Hub, app: FastAPI) -> None:
    await hub.post(app, ALICE)
    hub.clock.now += 89
    hub.handshake_all()
    assert peer_keys(await hub.post(app, BOB)) == [ALICE.key]
    hub.clock.now += 2
    hub.handshake_all()
    # Expired entries are never offered, even before the sweep removes them.
    assert peer_keys(await hub.post(app, BOB)) == []
    hub.core(app).sweep()
    assert hub.core(app).registry.get(ALICE.key) is None


async def test_restarted_server_answers_from_the_stored_registrations(
    hub_factory: Callable[[RegistrationStore], Hub], open_store: StoreOpener
) -> None:
    before = hub_factory(open_store())
    first = before.app()
    await before.post(first, ALICE)
    before.store.close()

    after = hub_factory(open_store())
    after.clock.now = before.clock.now + 10
    after.handshake_all()
    second = after.app()
    assert after.core(second).registry.client_count == 1
    assert peer_keys(await after.post(second, BOB)) == [ALICE.key]


async def test_restarted_server_drops_stored_clients_that_roamed_meanwhile(
    hub_factory: Callable[[RegistrationStore], Hub], open_store: StoreOpener
) -> None:
    before = hub_factory(open_store())
    await before.post(before.app(), ALICE)
    before.store.close()

    after = hub_factory(open_store())
    after.wg.update_peer(HUB_IF, ALICE.key, endpoint=Endpoint(ip_address("192.0.2.77"), 5))
    second = after.app()
    assert peer_keys(await after.post(second, BOB)) == []


# -- operations ------------------------------------------------------------------------------


async def test_metrics_count_requests_by_outcome(hub: Hub, app: FastAPI) -> None:
    await hub.post(app, ALICE)
    await hub.post(app, BOB)
    async with hub.client(app, "192.0.2.50") as http:
        await http.post(PATH, content=curl_body(entry(ALICE)), headers=JSON)
        text = (await http.get("/metrics")).text
    assert 'wg_autopeer_requests_total{outcome="ok"} 2.0' in text
    assert 'wg_autopeer_requests_total{outcome="forbidden"} 1.0' in text
    assert "wg_autopeer_registered_clients 2.0" in text
    assert "wg_autopeer_lan_groups 1.0" in text
    assert "wg_autopeer_waiting_queries 0.0" in text
    assert "wg_autopeer_request_duration_seconds_bucket" in text


async def test_metrics_and_health_can_be_limited_to_given_sources(hub: Hub) -> None:
    app = hub.app(metrics_sources=(ip_network("127.0.0.0/8"),))
    await hub.core(app).tick()
    async with hub.client(app, "127.0.0.1") as http:
        assert (await http.get("/metrics")).status_code == 200
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
    async with hub.client(app, ALICE) as http:
        assert (await http.get("/metrics")).status_code == 403
        assert (await http.get("/healthz")).status_code == 403


async def test_one_log_line_per_request_with_short_key_and_outcome(
    hub: Hub, app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="wg_autopeer.server.access")
    await hub.post(app, ALICE)
    lines = [r.getMessage() for r in caplog.records if r.name == "wg_autopeer.server.access"]
    assert len(lines) == 1
    assert f"key={ALICE.key[:8]} " in lines[0]
    assert "outcome=ok status=200" in lines[0]


async def test_bug_in_the_hub_backend_becomes_a_json_500(
    hub: Hub, app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(interface: str, *, with_private_key: bool = False) -> Any:
        raise RuntimeError("boom")

    hub.wg.get_device = broken  # type: ignore[method-assign]
    response = await hub.post(app, ALICE)
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}


# -- what reaches the store ------------------------------------------------------------------


class CountingStore(SqliteStore):
    """The SQLite store, counting the batches written to it."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.batches: list[tuple[list[str], list[str]]] = []

    def write_batch(self, puts: Any, deletes: Any) -> None:
        puts, deletes = list(puts), list(deletes)
        self.batches.append(([r.pubkey for r in puts], list(deletes)))
        super().write_batch(puts, deletes)


async def test_unchanged_report_writes_nothing_to_the_store(
    hub_factory: Callable[[RegistrationStore], Hub], db_path: Path
) -> None:
    store = CountingStore(db_path)
    hub = hub_factory(store)
    app = hub.app()
    assert (await hub.post(app, ALICE)).status_code == 200
    assert store.batches == [([ALICE.key], [])]
    for _ in range(5):
        hub.clock.now += 10
        hub.handshake_all()
        assert (await hub.post(app, ALICE)).status_code == 200
    assert len(store.batches) == 1
    # The refreshed expiry is kept in memory, and answered from there.
    assert hub.core(app).registry.get(ALICE.key).expires_at == hub.clock.now + 90  # type: ignore[union-attr]
    # A change of content is written again.
    assert (await hub.post(app, ALICE, entry(ALICE, listen_port=51999))).status_code == 200
    assert len(store.batches) == 2


async def test_an_answered_registration_survives_a_crash(
    hub_factory: Callable[[RegistrationStore], Hub], open_store: StoreOpener
) -> None:
    hub = hub_factory(open_store())
    app = hub.app()
    assert (await hub.post(app, ALICE)).status_code == 200
    assert (await hub.post(app, BOB)).status_code == 200
    # No shutdown, no flush: another connection reads what is stored right now.
    crashed = open_store()
    try:
        assert {r.pubkey for r in crashed.load_all()} == {ALICE.key, BOB.key}
    finally:
        crashed.close()


async def test_concurrent_changes_share_one_transaction(
    hub_factory: Callable[[RegistrationStore], Hub], db_path: Path
) -> None:
    store = CountingStore(db_path)
    hub = hub_factory(store)
    app = hub.app()
    answers = await asyncio.gather(*(hub.post(app, c) for c in (ALICE, BOB, CAROL)))
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert sum(len(puts) for puts, _ in store.batches) == 3
    assert len(store.batches) < 3


async def test_a_client_back_after_its_expiry_is_offered_again_at_once(
    hub: Hub, app: FastAPI
) -> None:
    await hub.post(app, ALICE)
    assert peer_keys(await hub.post(app, BOB)) == [ALICE.key]
    hub.clock.now += 91
    hub.handshake_all()
    # alice expired (not yet swept): bob's answer leaves her out, and is remembered.
    assert peer_keys(await hub.post(app, BOB)) == []
    assert peer_keys(await hub.post(app, BOB)) == []
    # Her unchanged report brings her back: bob's next answer has her again.
    assert peer_keys(await hub.post(app, ALICE)) == [BOB.key]
    assert peer_keys(await hub.post(app, BOB)) == [ALICE.key]
