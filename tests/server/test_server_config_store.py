"""Configuration loading, the SQLite store, and the hub view's index."""

from __future__ import annotations

import argparse
import sqlite3
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path

import pytest
from server_fakes import make_key

from wg_autopeer.errors import ConfigError
from wg_autopeer.server.command import resolve_config
from wg_autopeer.server.config import ListenAddress, load_config, parse_listen
from wg_autopeer.server.identity import HubSnapshot, HubView
from wg_autopeer.server.matching import Policy, Registration, ReportedLan, public_identity
from wg_autopeer.server.store import SqliteStore
from wg_autopeer.wireguard.base import DeviceState, Endpoint, PeerState
from wg_autopeer.wireguard.fake import FakeWireGuard

# -- config ----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_config_file_sets_every_option(tmp_path: Path) -> None:
    key = make_key(5)
    config = load_config(
        write(
            tmp_path,
            f"""
interface = "wg0"
listen = ["10.99.0.1:8080", "[fd00::1]"]
db = ":memory:"
handshake_max_age = 120
ttl = 45
refresh_interval = 1.5
trusted_proxies = ["127.0.0.1"]
metrics_sources = ["10.0.0.0/8"]
[policy]
allow = ["{key}"]
exclude = []
""",
        )
    )
    assert config.interface == "wg0"
    assert config.listen == (
        ListenAddress(IPv4Address("10.99.0.1"), 8080),
        ListenAddress(IPv6Address("fd00::1"), 80),
    )
    assert (config.handshake_max_age, config.ttl, config.refresh_interval) == (120, 45, 1.5)
    assert config.policy == Policy(allow=frozenset({key}))
    assert config.trusted_proxies == (ip_network("127.0.0.1/32"),)
    assert config.metrics_sources == (ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 'blue'", "colour"),
        ("ttl = -1", "ttl"),
        ("ttl = 'soon'", "ttl"),
        ("listen = ['wg0:80']", "listen"),
        ("listen = ['10.0.0.1:99999']", "listen"),
        ("trusted_proxies = ['nope']", "trusted_proxies"),
        ("[policy]\nallow = ['short']", "policy.allow"),
        ("[policy]\ndeny = []", "policy.deny"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.toml")


def test_command_line_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'interface = "wg0"\nlisten = ["10.99.0.1:80"]\ndb = "/x.db"\n')
    args = argparse.Namespace(
        config=path, interface="wg9", listen=["10.99.0.1:8080"], db=":memory:"
    )
    config = resolve_config(args)
    assert config.interface == "wg9"
    assert config.listen == (parse_listen("10.99.0.1:8080"),)
    assert config.db == ":memory:"


def test_interface_is_required(tmp_path: Path) -> None:
    args = argparse.Namespace(config=write(tmp_path, ""), interface=None, listen=None, db=None)
    with pytest.raises(ConfigError) as caught:
        resolve_config(args)
    assert caught.value.key == "interface"


# -- store -----------------------------------------------------------------------------------


def registration(n: int) -> Registration:
    return Registration(
        pubkey=make_key(n),
        tunnel_ips=(ip_address(f"10.99.0.{n}"), ip_address(f"fd99::{n}")),
        public_ip=public_identity(ip_address("2001:db8:1:2::5")),
        lans=(
            ReportedLan(ip_address("192.168.50.10"), 24, ip_address("192.168.50.1"), 51820),
            ReportedLan(ip_address("2001:db8:1:2::10"), 64, ip_address("fe80::1"), None),
        ),
        expires_at=1234.5,
    )


def test_store_round_trips_registrations_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "server.db"
    store = SqliteStore(path)
    store.put(registration(2))
    store.put(registration(3))
    store.delete(make_key(3))
    store.close()
    assert path.stat().st_mode & 0o777 == 0o600
    reopened = SqliteStore(path)
    assert reopened.load_all() == [registration(2)]
    reopened.close()


def test_store_drops_unreadable_rows_instead_of_failing(tmp_path: Path) -> None:
    path = tmp_path / "server.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO registrations VALUES ('k', '{\"torn', 0)")
    store = SqliteStore(path)
    assert store.load_all() == []
    assert store.load_all() == []
    store.close()


# -- hub view --------------------------------------------------------------------------------


def test_hub_snapshot_finds_peers_by_host_and_by_wider_allowed_ips() -> None:
    site, client = make_key(7), make_key(8)
    device = DeviceState(
        "wg0",
        make_key(1),
        51820,
        (
            PeerState(site, (ip_network("10.50.0.0/16"),), Endpoint(ip_address("192.0.2.1"), 1)),
            PeerState(client, (ip_network("10.99.0.2/32"), ip_network("fd99::2/128")), None),
        ),
    )
    snapshot = HubSnapshot.build(device)
    assert snapshot.lookup(ip_address("10.99.0.2")).public_key == client  # type: ignore[union-attr]
    assert snapshot.lookup(ip_address("fd99::2")).public_key == client  # type: ignore[union-attr]
    assert snapshot.lookup(ip_address("10.50.3.4")).public_key == site  # type: ignore[union-attr]
    assert snapshot.lookup(ip_address("10.99.0.3")) is None
    assert snapshot.peers[client].tunnel_ips == (ip_address("10.99.0.2"), ip_address("fd99::2"))
    assert snapshot.peers[site].tunnel_ips == ()


async def test_hub_view_sees_ipv4_mapped_sources_as_ipv4() -> None:
    wg = FakeWireGuard()
    wg.add_device(
        "wg0", make_key(1), 51820, (PeerState(make_key(2), (ip_network("10.9.0.2/32"),)),)
    )
    view = HubView(wg, "wg0")
    peer = await view.identify(ip_address("::ffff:10.9.0.2"))
    assert peer is not None
    assert peer.public_key == make_key(2)
