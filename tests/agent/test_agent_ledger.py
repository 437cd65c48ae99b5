from __future__ import annotations

import json
import os
import stat
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
from agent_keys import key

from wg_autopeer.agent.ledger import (
    CachedLedgerStore,
    InterfaceLedger,
    Ledger,
    LedgerPeer,
    LedgerStore,
)
from wg_autopeer.errors import LedgerError
from wg_autopeer.wireguard.base import Endpoint

BOB = LedgerPeer(
    key(4),
    Endpoint(ip_address("192.168.50.11"), 51820),
    (ip_network("10.99.0.3/32"), ip_network("fd99::3/128")),
    taken_from_hub=(ip_network("10.99.0.3/32"),),
    added_at=1_700_000_000.5,
)
CAROL = LedgerPeer(key(5), Endpoint(ip_address("fe80::5"), 40000), (ip_network("10.99.0.4/32"),))
LEDGER = (
    Ledger()
    .with_interface("wg0", InterfaceLedger.of([BOB, CAROL]))
    .with_interface("wg1", InterfaceLedger.of([CAROL]))
)


@pytest.fixture
def store(tmp_path: Path) -> LedgerStore:
    return LedgerStore(tmp_path / "state" / "ledger.json")


def corrupt_files(store: LedgerStore) -> list[Path]:
    return sorted(store.path.parent.glob("ledger.json.corrupt-*"))


def test_round_trip_keeps_every_field(store: LedgerStore) -> None:
    store.save(LEDGER)
    assert store.load() == LEDGER
    data = json.loads(store.path.read_text())
    assert data["version"] == 2


def test_passive_peer_without_endpoint_round_trips(store: LedgerStore) -> None:
    passive = Ledger().with_interface(
        "wg0", InterfaceLedger.of([LedgerPeer(key(7), None, (), (), 12.5)])
    )
    store.save(passive)
    assert store.load() == passive


def test_version_one_file_reads_as_is(store: LedgerStore) -> None:
    store.save(LEDGER)
    data = json.loads(store.path.read_text())
    data["version"] = 1
    store.path.write_text(json.dumps(data))
    assert store.load() == LEDGER
    assert corrupt_files(store) == []


def test_missing_file_is_an_empty_ledger(store: LedgerStore) -> None:
    assert store.load() == Ledger()
    assert not store.path.parent.exists()


def test_file_is_0600_in_a_0700_directory(store: LedgerStore) -> None:
    store.save(LEDGER)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700


def test_crash_before_rename_keeps_the_old_ledger(
    store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save(LEDGER)
    before = store.path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(LedgerError, match="simulated crash"):
        store.save(Ledger())
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert store.load() == LEDGER
    assert [p.name for p in store.path.parent.iterdir()] == ["ledger.json"]  # temp cleaned up


def test_stray_temp_file_from_a_crash_is_ignored(store: LedgerStore) -> None:
    store.save(LEDGER)
    (store.path.parent / ".ledger.json.abc.tmp").write_text('{"version": 1, "interf')
    assert store.load() == LEDGER


@pytest.mark.parametrize(
    "content",
    [
        b'{"version": 1, "interfaces": {"wg0": {"peers": [{"public_',  # torn
        b"\x00\x00\x00\x00",
        b"[1, 2]",
        b'{"version": 1, "interfaces": {"wg0": {"peers": [{"public_key": "k"}]}}}',
        b'{"version": 1, "interfaces": {"wg0": {"peers": [{"public_key": "k", '
        b'"endpoint": {"address": "nope", "port": 1}, "allowed_ips": []}]}}}',
        # Checked whole: an unknown field, a port that is true, a network that is a number.
        b'{"version": 1, "interfaces": {"wg0": {"peers": [{"public_key": "k", '
        b'"endpoint": null, "allowed_ips": [], "owner": "me"}]}}}',
        b'{"version": 1, "interfaces": {"wg0": {"peers": [{"public_key": "k", '
        b'"endpoint": {"address": "192.168.1.2", "port": true}, "allowed_ips": []}]}}}',
        b'{"version": 1, "interfaces": {"wg0": {"peers": [{"public_key": "k", '
        b'"endpoint": null, "allowed_ips": [167772160]}]}}}',
        b'{"version": 1, "interfaces": []}',
    ],
)
def test_torn_or_garbage_file_is_set_aside_and_read_empty(
    store: LedgerStore, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store.path.parent.mkdir(mode=0o700)
    store.path.write_bytes(content)
    assert store.load() == Ledger()
    assert not store.path.exists()
    aside = corrupt_files(store)
    assert len(aside) == 1
    assert aside[0].read_bytes() == content
    assert "moved to" in caplog.text


@pytest.mark.parametrize("version", [0, 3, None, "1"])
def test_unknown_version_is_set_aside_and_read_empty(store: LedgerStore, version: object) -> None:
    store.path.parent.mkdir(mode=0o700)
    store.path.write_text(json.dumps({"version": version, "interfaces": {}}))
    assert store.load() == Ledger()
    assert len(corrupt_files(store)) == 1


def test_save_after_set_aside_starts_fresh(store: LedgerStore) -> None:
    store.path.parent.mkdir(mode=0o700)
    store.path.write_bytes(b"garbage")
    store.update_interface("wg0", InterfaceLedger.of([BOB]))
    assert store.load().interface("wg0").get(BOB.public_key) == BOB


def test_update_interface_keeps_other_interfaces(store: LedgerStore) -> None:
    store.save(LEDGER)
    store.update_interface("wg0", InterfaceLedger())
    loaded = store.load()
    assert "wg0" not in loaded.interfaces
    assert loaded.interface("wg1") == InterfaceLedger.of([CAROL])


def test_union_keeps_hub_routes_of_both_sides() -> None:
    later = LedgerPeer(BOB.public_key, BOB.endpoint, (ip_network("10.99.0.9/32"),), (), 5.0)
    merged = InterfaceLedger.of([BOB]).union(InterfaceLedger.of([later, CAROL]))
    bob = merged.get(BOB.public_key)
    assert bob is not None
    assert bob.allowed_ips == later.allowed_ips
    assert bob.taken_from_hub == BOB.taken_from_hub
    assert CAROL.public_key in merged


def test_unreadable_path_raises_ledger_error(store: LedgerStore) -> None:
    store.path.mkdir(parents=True)  # unreadable as a file, even for root
    with pytest.raises(LedgerError):
        store.load()


def test_cached_store_reads_the_file_once_and_serves_its_own_writes(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.json"
    LedgerStore(path).save(LEDGER)
    cached = CachedLedgerStore(path)
    assert cached.load() == LEDGER
    path.write_text("garbage written behind the agent's back")
    assert cached.load() == LEDGER  # served from memory, the file is not read again
    cached.save(Ledger())
    assert cached.load() == Ledger()
    assert LedgerStore(path).load() == Ledger()  # and the write reached the disk
