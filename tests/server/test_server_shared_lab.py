"""Several servers over one PostgreSQL registry, real wireguard-go and agents.

Two server processes on one hub, and two hubs (each a namespace of its own on the WAN,
with its own WireGuard device, key and port, one tunnel address plan) with a server
each: alice's agent talks to one server, bob's to the other. Each server knows its
caller only through its own hub's WireGuard, and learns the other's client through the
database; the two must still peer directly. PostgreSQL is the session's, reached from
each hub's namespace through its unix socket (a file: every namespace sees it).
"""

from __future__ import annotations

import json

import psycopg
import pytest

from labkit import LabFactory
from wg_autopeer.lab import Lab
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.postgres import PostgresServer
from wg_autopeer.lab.services import SERVER_PORT, direct_both_ways, start_agent, start_server
from wg_autopeer.protocol import PATH

pytestmark = pytest.mark.lab

SECOND_PORT = 8080


def health(lab: Lab, port: int, hub: str = "hub") -> dict[str, object]:
    url = f"http://{lab.tunnel_ip(hub)}:{port}/healthz"
    result = lab.run(hub, "curl", "-s", "-m", "2", url, check=False)
    body: dict[str, object] = json.loads(result.stdout or "{}")
    return body


def test_clients_of_two_server_processes_on_one_hub_peer_directly(
    lab_factory: LabFactory, postgres_server: PostgresServer
) -> None:
    lab = lab_factory(base="pgl")
    name = f"lab_{lab.prefix}"
    postgres_server.create_database(name)
    db = postgres_server.socket_url(name)
    start_server(lab, "--db", db, log_name="server-1")
    start_server(lab, "--db", db, port=SECOND_PORT, log_name="server-2")
    hub = lab.tunnel_ip("hub")
    start_agent(lab, "alice", "--server", f"http://{hub}:{SERVER_PORT}{PATH}")
    start_agent(lab, "bob", "--server", f"http://{hub}:{SECOND_PORT}{PATH}")

    assert wait_for(lambda: direct_both_ways(lab, "alice", "bob"), timeout=20), (
        "alice and bob, each registered with another server process, did not peer directly"
    )
    # Each process knows both: its own caller, and the other's through the database.
    for port in (SERVER_PORT, SECOND_PORT):
        assert wait_for(lambda port=port: health(lab, port).get("registered_clients") == 2, 5)
        assert health(lab, port)["degraded"] is None
    assert lab.ping("alice", lab.tunnel_ip("bob"), timeout=1.0)


def test_clients_of_two_hubs_on_one_lan_peer_directly(
    lab_factory: LabFactory, postgres_server: PostgresServer
) -> None:
    lab = lab_factory(base="pgh")
    name = f"lab_{lab.prefix}"
    postgres_server.create_database(name)
    db = postgres_server.socket_url(name)
    # bob now connects to hub B: a namespace of its own on the WAN, his peer gone from hub A.
    hub_b = lab.add_second_hub("hubb", 51821, ["bob"])
    assert lab.ns(hub_b.name) != lab.ns("hub")
    assert hub_b.wan.ip != lab.wan_ip("hub")
    assert hub_b.wan.network == lab.topology.wan
    assert lab.public_key(hub_b.name) != lab.public_key("hub")
    assert lab.device("hub").peer(lab.public_key("bob")) is None
    assert lab.device(hub_b.name).peer(lab.public_key("alice")) is None
    # bob reaches hub B over the WAN, through his router's NAT.
    bobs_hub = lab.hub_peer("bob")
    assert bobs_hub.endpoint is not None
    assert str(bobs_hub.endpoint.address) == str(lab.wan_ip("r1"))
    start_server(lab, "--db", db, "--hub", "hub-a", log_name="server-a")
    start_server(lab, "--db", db, "--hub", "hub-b", hub=hub_b.name, log_name="server-b")
    # One tunnel address plan: each client's hub answers on the same address.
    hub = lab.tunnel_ip("hub")
    assert lab.tunnel_ip(hub_b.name) == hub
    start_agent(lab, "alice", "--server", f"http://{hub}:{SERVER_PORT}{PATH}")
    start_agent(lab, "bob", "--server", f"http://{hub}:{SERVER_PORT}{PATH}")

    assert wait_for(lambda: direct_both_ways(lab, "alice", "bob"), timeout=20), (
        "alice (hub A) and bob (hub B), on one LAN, did not peer directly"
    )
    for host in ("hub", hub_b.name):
        assert wait_for(
            lambda host=host: health(lab, SERVER_PORT, host).get("registered_clients") == 2, 5
        )
    # Each registration names the hub whose WireGuard vouched for the caller.
    with psycopg.connect(db) as conn:
        rows = dict(conn.execute("SELECT pubkey, hub FROM registrations").fetchall())
    assert rows == {lab.public_key("alice"): "hub-a", lab.public_key("bob"): "hub-b"}
    assert lab.ping("alice", lab.tunnel_ip("bob"), timeout=1.0)
