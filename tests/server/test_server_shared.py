"""Several server instances over one PostgreSQL registry (each with its own FakeWireGuard
hub), and what both stores do with bad settings, old and new schemas.

The database is real (the session's PostgreSQL, a database per test); the outage test
starts a PostgreSQL of its own to stop and restart it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from ipaddress import ip_address, ip_network
from pathlib import Path

import httpx
import psycopg
import pytest
from server_fakes import ALICE, BOB, CAROL, HUB_IF, JSON, Client, Clock, Hub, curl_body, entry

from wg_autopeer.errors import ConfigError
from wg_autopeer.lab.postgres import PostgresServer, free_port
from wg_autopeer.protocol import PATH
from wg_autopeer.server.command import resolve_config
from wg_autopeer.server.config import ServerConfig
from wg_autopeer.server.coordinator import Coordinator
from wg_autopeer.server.pgstore import PostgresStore
from wg_autopeer.server.store import (
    SchemaTooNew,
    SqliteStore,
    StoreError,
    open_store,
    redact_url,
)
from wg_autopeer.wireguard.base import Endpoint, PeerState
from wg_autopeer.wireguard.fake import FakeWireGuard

HUB_KEYS = {"hub-a": "A" * 43 + "=", "hub-b": "B" * 43 + "="}


def hub_seeing(name: str, url: str, clock: Clock, *clients: Client) -> Hub:
    """A hub named ``name`` whose WireGuard device has ``clients`` as peers, over ``url``.

    Both hubs share one tunnel address plan (the clients' tunnel addresses are unique).
    """
    wg = FakeWireGuard()
    wg.add_device(HUB_IF, HUB_KEYS[name], 51820, tuple(peer_state(c, clock) for c in clients))
    config = ServerConfig(
        interface=HUB_IF, db=url, hub=name, unknown_source_refresh_gap=0.0, ttl=90.0
    )
    return Hub(wg, clock, config, PostgresStore(url, hub=name))


def peer_state(client: Client, clock: Clock) -> PeerState:
    return PeerState(
        public_key=client.key,
        allowed_ips=(ip_network(f"{client.tunnel_ip}/32"),),
        endpoint=Endpoint(ip_address(client.public), 40000),
        latest_handshake=clock.now,
    )


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def serving(*hubs: Hub) -> AsyncIterator[list[Coordinator]]:
    """Each hub's app with its background work (hub reads, the store's change feed)."""
    cores = []
    tasks = []
    for hub in hubs:
        core = hub.core(hub.app())
        cores.append(core)
        tasks.append(asyncio.create_task(core.follow_store()))
    try:
        for core in cores:
            await wait_until(lambda core=core: core.feed_up)  # type: ignore[misc]
        yield cores
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for hub in hubs:
            hub.store.close()


def offers(response: httpx.Response) -> dict[str, list[str]]:
    assert response.status_code == 200, response.text
    return {p["pubkey"]: p["ip"] for p in response.json()["peers"]}


# -- two hubs, one registry ------------------------------------------------------------------


async def test_clients_of_two_hubs_behind_one_public_ip_are_offered_each_other(
    pg_url: str,
) -> None:
    clock = Clock()
    hub_a = hub_seeing("hub-a", pg_url, clock, ALICE)
    hub_b = hub_seeing("hub-b", pg_url, clock, BOB)
    async with serving(hub_a, hub_b) as (core_a, core_b):
        app_a, app_b = hub_a.apps[0], hub_b.apps[0]
        assert offers(await hub_a.post(app_a, ALICE)) == {}
        await wait_until(lambda: core_b.registry.get(ALICE.key) is not None)
        # Offered with the tunnel address the registration records: one address plan.
        assert offers(await hub_b.post(app_b, BOB)) == {ALICE.key: [ALICE.tunnel_ip]}
        await wait_until(lambda: core_a.registry.get(BOB.key) is not None)
        assert offers(await hub_a.post(app_a, ALICE)) == {BOB.key: [BOB.tunnel_ip]}
        # Each registration records the hub that saw it; each hub judges only its own.
        assert core_a.registry.get(BOB.key).hub == "hub-b"  # type: ignore[union-attr]
        await core_a.tick()
        assert core_a.registry.get(BOB.key) is not None, "hub A dropped hub B's client"


async def test_a_change_on_one_instance_wakes_only_the_waiters_of_that_lan_on_another(
    pg_url: str,
) -> None:
    clock = Clock()
    hub_a = hub_seeing("hub-a", pg_url, clock, ALICE, CAROL)
    hub_b = hub_seeing("hub-b", pg_url, clock, BOB)
    async with serving(hub_a, hub_b) as (core_a, _):
        app_a, app_b = hub_a.apps[0], hub_b.apps[0]
        first = await hub_a.post(app_a, ALICE)
        await hub_a.post(app_a, CAROL)
        carol_event = core_a.registry.change_event(CAROL.key)
        waiting = asyncio.create_task(
            hub_a.post(
                app_a, ALICE, **{"If-None-Match": first.headers["etag"], "Prefer": "wait=30"}
            )
        )
        await wait_until(lambda: core_a.waiting == 1)
        assert (await hub_b.post(app_b, BOB)).status_code == 200
        woken = await asyncio.wait_for(waiting, 10)
        assert offers(woken) == {BOB.key: [BOB.tunnel_ip]}
        # carol's LAN (another public IP) did not change: her waiter was left alone.
        assert not carol_event.is_set()


async def test_a_client_that_moves_to_another_hub_is_one_registration(pg_url: str) -> None:
    clock = Clock()
    hub_a = hub_seeing("hub-a", pg_url, clock, ALICE)
    # alice is a client of both hubs (a hub pair), and reports through A first.
    hub_b = hub_seeing("hub-b", pg_url, clock, ALICE)
    async with serving(hub_a, hub_b) as (core_a, core_b):
        await hub_a.post(hub_a.apps[0], ALICE)
        clock.now += 5
        # alice's agent now reaches hub B; hub A no longer has her as a peer.
        await hub_a.wg.remove_peer(HUB_IF, ALICE.key)
        hub_b.wg.update_peer(HUB_IF, ALICE.key, latest_handshake=clock.now)
        assert (await hub_b.post(hub_b.apps[0], ALICE)).status_code == 200
        await wait_until(
            lambda: (r := core_a.registry.get(ALICE.key)) is not None and r.hub == "hub-b"
        )
        await core_a.tick()
        rows = hub_b.store.load_all()
        assert [(r.pubkey, r.hub) for r in rows] == [(ALICE.key, "hub-b")]
        assert core_b.registry.get(ALICE.key) is not None


async def test_a_dead_instances_registrations_expire_by_their_ttl(pg_url: str) -> None:
    clock = Clock()
    hub_a = hub_seeing("hub-a", pg_url, clock, ALICE)
    hub_b = hub_seeing("hub-b", pg_url, clock, BOB)
    async with serving(hub_b) as (core_b,):
        core_a = hub_a.core(hub_a.app())
        await hub_a.post(hub_a.apps[0], ALICE)
        hub_a.store.close()  # instance A is gone for good
        await wait_until(lambda: core_b.registry.get(ALICE.key) is not None)
        clock.now += 91
        hub_b.wg.update_peer(HUB_IF, BOB.key, latest_handshake=clock.now)
        await core_b.tick()
        assert core_b.registry.get(ALICE.key) is None
        assert offers(await hub_b.post(hub_b.apps[0], BOB)) == {}
        assert hub_b.store.purge_expired(clock.now) == 1  # type: ignore[attr-defined]
        del core_a


async def test_a_learnt_registration_outlives_its_local_copy_while_its_owner_refreshes(
    pg_url: str,
) -> None:
    clock = Clock()
    hub_a = hub_seeing("hub-a", pg_url, clock, ALICE)
    hub_b = hub_seeing("hub-b", pg_url, clock, BOB)
    async with serving(hub_a, hub_b) as (core_a, core_b):
        await hub_a.post(hub_a.apps[0], ALICE)
        await wait_until(lambda: core_b.registry.get(ALICE.key) is not None)
        clock.now += 60
        hub_a.wg.update_peer(HUB_IF, ALICE.key, latest_handshake=clock.now)
        hub_b.wg.update_peer(HUB_IF, BOB.key, latest_handshake=clock.now)
        await hub_a.post(hub_a.apps[0], ALICE)  # unchanged: a refresh, written lazily
        core_a.registry.flush()
        clock.now += 40  # past the expiry B knew of, within the refreshed one
        await core_b.tick()
        assert core_b.registry.get(ALICE.key) is not None
        assert offers(await hub_b.post(hub_b.apps[0], BOB)) == {ALICE.key: [ALICE.tunnel_ip]}


async def test_two_instances_on_one_hub_share_their_clients(pg_url: str) -> None:
    clock = Clock()
    one = hub_seeing("hub-a", pg_url, clock, ALICE, BOB)
    two = hub_seeing("hub-a", pg_url, clock, ALICE, BOB)
    async with serving(one, two) as (_, core_two):
        await one.post(one.apps[0], ALICE)
        await wait_until(lambda: core_two.registry.get(ALICE.key) is not None)
        assert offers(await two.post(two.apps[0], BOB)) == {ALICE.key: [ALICE.tunnel_ip]}


# -- the database going away -----------------------------------------------------------------


@pytest.fixture
def own_postgres(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, to stop and start (the session's stays up)."""
    server = PostgresServer.create()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


async def test_instances_serve_from_memory_while_the_database_is_down_and_catch_up(
    own_postgres: PostgresServer,
) -> None:
    url = own_postgres.create_database("outage")
    clock = Clock()
    hub_a = hub_seeing("hub-a", url, clock, ALICE, CAROL)
    hub_b = hub_seeing("hub-b", url, clock, BOB)
    async with serving(hub_a, hub_b) as (core_a, core_b):
        app_a, app_b = hub_a.apps[0], hub_b.apps[0]
        await hub_a.post(app_a, CAROL)
        first_b = await hub_b.post(app_b, BOB)
        own_postgres.stop()
        await wait_until(lambda: core_a.degraded is not None and core_b.degraded is not None)
        # bob waits on B, through the outage, for a neighbour.
        held = asyncio.create_task(
            hub_b.post(
                app_b, BOB, **{"If-None-Match": first_b.headers["etag"], "Prefer": "wait=30"}
            )
        )
        # Answered from memory, 200 every time, under concurrent load: no 5xx.
        answers = await asyncio.gather(
            *(hub_a.post(app_a, who) for who in [ALICE, CAROL] * 25),
        )
        assert [a.status_code for a in answers] == [200] * 50
        assert not held.done()
        async with hub_a.client(app_a, "127.0.0.1") as http:
            health = await http.get("/healthz")
            metrics = (await http.get("/metrics")).text
        core_a.sweep()
        assert health.json()["status"] == "degraded", health.json()
        assert "wg_autopeer_degraded 1.0" in metrics

        own_postgres.start()

        def caught_up() -> bool:
            core_a.sweep()  # the retry timer
            core_b.sweep()
            return core_a.degraded is None and core_b.degraded is None

        await wait_until(caught_up, within=30)
        # alice, acknowledged while the database was down, was written and is known to B,
        # whose waiting neighbour heard of her.
        assert offers(await asyncio.wait_for(held, 20)) == {ALICE.key: [ALICE.tunnel_ip]}
        await wait_until(lambda: core_a.registry.get(BOB.key) is not None)
        assert offers(await hub_b.post(app_b, BOB)) == {ALICE.key: [ALICE.tunnel_ip]}
        assert {r.pubkey for r in hub_a.store.load_all()} == {ALICE.key, BOB.key, CAROL.key}


# -- settings, start-up errors, schemas ------------------------------------------------------


@pytest.mark.parametrize(
    "db", ["mysql://u@h/db", "sqlite:///var/lib/x.db", "file:x.db", "POSTGRESQLX://h/db"]
)
def test_an_unsupported_url_scheme_is_refused_and_creates_nothing(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config=None, interface="wg0", listen=None, db=db, hub=None)
    with pytest.raises(ConfigError) as caught:
        resolve_config(args)
    assert caught.value.key == "--db"
    assert "unsupported scheme" in str(caught.value)
    with pytest.raises(StoreError):
        open_store(db, hub="")
    assert os.listdir(tmp_path) == []


def test_a_postgresql_url_selects_the_postgresql_store(pg_url: str) -> None:
    args = argparse.Namespace(config=None, interface="wg0", listen=None, db=pg_url, hub="h1")
    config = resolve_config(args)
    assert (config.db, config.hub) == (pg_url, "h1")
    store = open_store(config.db, hub=config.hub)
    try:
        assert isinstance(store, PostgresStore)
    finally:
        store.close()


def test_an_unreachable_database_is_a_start_up_error_without_the_password() -> None:
    url = "postgresql://wg:s3cret@127.0.0.1:1/registry"
    with pytest.raises(StoreError) as caught:
        PostgresStore(url, hub="")
    message = str(caught.value)
    assert "s3cret" not in message
    assert "postgresql://wg:***@127.0.0.1:1/registry" in message
    assert caught.value.retryable
    assert redact_url("postgresql://wg@h/db") == "postgresql://wg@h/db"


def test_a_newer_postgresql_schema_is_refused(pg_url: str) -> None:
    PostgresStore(pg_url, hub="").close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE wg_autopeer_schema SET version = 99")
    with pytest.raises(SchemaTooNew) as caught:
        PostgresStore(pg_url, hub="")
    assert caught.value.found == 99
    assert "newer" in str(caught.value)


def test_a_newer_sqlite_schema_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "server.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE registrations (anything TEXT)")
        db.execute("PRAGMA user_version=7")
    with pytest.raises(SchemaTooNew):
        SqliteStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (7,)


def test_instances_starting_at_once_migrate_the_schema_once(pg_url: str) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        stores = list(pool.map(lambda i: PostgresStore(pg_url, hub=f"h{i}"), range(3)))
    try:
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT version FROM wg_autopeer_schema").fetchall()
        assert rows == [(1,)]
    finally:
        for store in stores:
            store.close()


async def test_the_server_refuses_a_report_body_the_same_way_over_postgresql(
    pg_url: str,
) -> None:
    clock = Clock()
    hub = hub_seeing("hub-a", pg_url, clock, ALICE)
    async with serving(hub):
        async with hub.client(hub.apps[0], ALICE) as http:
            bad = await http.post(PATH, content=curl_body(entry(BOB)), headers=JSON)
        assert bad.status_code == 403
        assert hub.store.load_all() == []


def test_the_server_command_stops_with_a_clear_error_when_the_database_is_unreachable() -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "wg_autopeer", "server", "--interface", "lo",
            "--listen", f"127.0.0.1:{free_port()}", "--hub", "h",
            "--db", "postgresql://wg:s3cret@127.0.0.1:1/registry",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "postgresql://wg:***@127.0.0.1:1/registry: cannot reach PostgreSQL" in done.stderr
    assert "s3cret" not in done.stderr
