from __future__ import annotations

from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
from agent_keys import key

from wg_autopeer.agent.ledger import InterfaceLedger, LedgerPeer, LedgerStore
from wg_autopeer.agent.reconcile import (
    Plan,
    RemovePeer,
    SetAllowedIps,
    SetPeer,
    apply,
    keep_working_endpoints,
    plan,
    recreate_plan,
    removal_plan,
)
from wg_autopeer.agent.safety import DirectPeer
from wg_autopeer.errors import DeviceRefused, LedgerError
from wg_autopeer.wireguard.base import DeviceState, Endpoint, IPNetwork, PeerConfig, PeerState
from wg_autopeer.wireguard.fake import FakeWireGuard

IFACE = "wgtest0"
OWN, HUB, HAND, BOB, CAROL = key(1), key(2), key(3), key(4), key(5)
NOW = 1_700_000_000.0


def net(text: str) -> IPNetwork:
    return ip_network(text)


def direct(pubkey: str, lan: str, tunnel: str, port: int = 51820) -> DirectPeer:
    return DirectPeer(pubkey, Endpoint(ip_address(lan), port), (net(tunnel),))


BOB_PEER = direct(BOB, "192.168.50.11", "10.99.0.3/32")
CAROL_PEER = direct(CAROL, "192.168.50.12", "10.99.0.4/32")
HUB_ENDPOINT = Endpoint(ip_address("203.0.113.1"), 51820)


def make_fake(hub_ips: tuple[str, ...] = ("10.99.0.0/24",)) -> FakeWireGuard:
    fake = FakeWireGuard()
    fake.add_device(
        IFACE,
        OWN,
        peers=(
            PeerState(HUB, tuple(net(i) for i in hub_ips), HUB_ENDPOINT, persistent_keepalive=25),
            PeerState(HAND, (net("10.99.0.77/32"),), Endpoint(ip_address("192.168.50.77"), 51820)),
        ),
    )
    return fake


@pytest.fixture
def store(tmp_path: Path) -> LedgerStore:
    return LedgerStore(tmp_path / "state" / "ledger.json")


async def converge(
    fake: FakeWireGuard,
    store: LedgerStore,
    desired: list[DirectPeer],
    now: float = NOW,
    *,
    routed: frozenset[str] = frozenset(),
) -> Plan:
    """Plan against the current device and ledger, then apply; returns the plan."""
    p = plan(
        desired,
        await fake.get_device(IFACE),
        store.load().interface(IFACE),
        HUB,
        now=now,
        routed=routed,
    )
    await apply(p, fake, IFACE, store)
    return p


async def add_and_prove(fake: FakeWireGuard, store: LedgerStore, desired: list[DirectPeer]) -> Plan:
    """Add the peers (no routes), then plan again with every one of them proven."""
    await converge(fake, store, desired)
    return await converge(fake, store, desired, routed=frozenset(p.public_key for p in desired))


async def test_new_peer_is_added_without_routes_and_recorded(store: LedgerStore) -> None:
    fake = make_fake()
    p = await converge(fake, store, [BOB_PEER], routed=frozenset({BOB}))
    # Even when asked to route it: a peer added in this very plan is not proven yet.
    assert p.operations == (SetPeer(PeerConfig(BOB, (), BOB_PEER.endpoint, 3)),)
    device = await fake.get_device(IFACE)
    bob = device.peer(BOB)
    assert bob is not None
    assert bob.endpoint == BOB_PEER.endpoint
    assert bob.allowed_ips == ()
    assert bob.persistent_keepalive == 3
    entry = store.load().interface(IFACE).get(BOB)
    assert entry is not None
    assert entry.added_at == NOW
    assert entry.allowed_ips == ()
    hub = device.peer(HUB)
    assert hub is not None
    assert hub.allowed_ips == (net("10.99.0.0/24"),)


async def test_proven_peer_gets_its_routes_in_place(store: LedgerStore) -> None:
    fake = make_fake()
    await converge(fake, store, [BOB_PEER])
    fake.writes.clear()
    p = await converge(fake, store, [BOB_PEER], NOW + 1, routed=frozenset({BOB}))
    assert p.operations == (SetAllowedIps(BOB, BOB_PEER.allowed_ips),)
    bob = (await fake.get_device(IFACE)).peer(BOB)
    assert bob is not None
    assert bob.allowed_ips == BOB_PEER.allowed_ips
    entry = store.load().interface(IFACE).get(BOB)
    assert entry is not None
    assert entry.allowed_ips == BOB_PEER.allowed_ips
    assert entry.added_at == NOW  # routed in place: the same peer, the same session
    assert entry.taken_from_hub == ()  # the hub carries a /24, not bob's /32
    # The hub keeps its covering prefix: it is the fallback.
    hub = (await fake.get_device(IFACE)).peer(HUB)
    assert hub is not None
    assert hub.allowed_ips == (net("10.99.0.0/24"),)


async def test_unproven_again_peer_loses_its_routes_and_keeps_its_session(
    store: LedgerStore,
) -> None:
    fake = make_fake()
    await add_and_prove(fake, store, [BOB_PEER])
    p = await converge(fake, store, [BOB_PEER], NOW + 2)
    assert p.operations == (SetAllowedIps(BOB, ()),)


async def test_passive_peer_is_added_without_endpoint_and_keeps_a_roamed_one(
    store: LedgerStore,
) -> None:
    fake = make_fake()
    passive = DirectPeer(BOB, None, (net("10.99.0.3/32"),))
    p = await converge(fake, store, [passive])
    assert p.operations == (SetPeer(PeerConfig(BOB, (), None, 3)),)
    # The neighbour's handshake roams the endpoint in; nothing we plan may undo that.
    roamed = Endpoint(ip_address("192.168.50.11"), 51820)
    fake.update_peer(IFACE, BOB, endpoint=roamed)
    p = await converge(fake, store, [passive], NOW + 1, routed=frozenset({BOB}))
    assert p.operations == (SetAllowedIps(BOB, passive.allowed_ips),)
    bob = (await fake.get_device(IFACE)).peer(BOB)
    assert bob is not None
    assert bob.endpoint == roamed


async def test_identical_state_plans_zero_operations_and_writes_nothing(
    store: LedgerStore,
) -> None:
    fake = make_fake()
    await converge(fake, store, [BOB_PEER, CAROL_PEER])
    fake.writes.clear()
    mtime = store.path.stat().st_mtime_ns
    p = await converge(fake, store, [CAROL_PEER, BOB_PEER], now=NOW + 60)
    assert p.empty
    assert fake.writes == []
    assert store.path.stat().st_mtime_ns == mtime
    entry = store.load().interface(IFACE).get(BOB)
    assert entry is not None
    assert entry.added_at == NOW  # unchanged peers keep their add time


async def test_changed_endpoint_re_adds_the_peer_unrouted(store: LedgerStore) -> None:
    fake = make_fake()
    await add_and_prove(fake, store, [BOB_PEER])
    moved = direct(BOB, "192.168.50.99", "10.99.0.3/32", port=40000)
    p = await converge(fake, store, [moved], now=NOW + 5, routed=frozenset({BOB}))
    # A new endpoint is a new path: removed (routes back to the hub at once), added
    # afresh so WireGuard handshakes there, and routed only once that is proven.
    assert p.operations == (RemovePeer(BOB), SetPeer(PeerConfig(BOB, (), moved.endpoint, 3)))
    bob = (await fake.get_device(IFACE)).peer(BOB)
    assert bob is not None
    assert bob.endpoint == moved.endpoint
    entry = store.load().interface(IFACE).get(BOB)
    assert entry is not None
    assert entry.added_at == NOW + 5


async def test_changed_keepalive_updates_the_peer(store: LedgerStore) -> None:
    fake = make_fake()
    await converge(fake, store, [BOB_PEER])
    fake.update_peer(IFACE, BOB, persistent_keepalive=None)
    p = await converge(fake, store, [BOB_PEER])
    assert [type(op) for op in p.operations] == [SetPeer]


async def test_peer_no_longer_desired_is_removed(store: LedgerStore) -> None:
    fake = make_fake()
    await converge(fake, store, [BOB_PEER, CAROL_PEER])
    p = await converge(fake, store, [CAROL_PEER])
    assert p.operations == (RemovePeer(BOB),)
    device = await fake.get_device(IFACE)
    assert device.peer(BOB) is None
    assert device.peer(CAROL) is not None
    assert BOB not in store.load().interface(IFACE)


async def test_host_route_taken_from_hub_is_given_back_on_removal(store: LedgerStore) -> None:
    fake = make_fake(hub_ips=("10.99.0.1/32", "10.99.0.3/32", "10.99.0.4/32"))
    await add_and_prove(fake, store, [BOB_PEER])
    hub = (await fake.get_device(IFACE)).peer(HUB)
    assert hub is not None
    assert net("10.99.0.3/32") not in hub.allowed_ips  # WireGuard moved it to bob
    entry = store.load().interface(IFACE).get(BOB)
    assert entry is not None
    assert entry.taken_from_hub == (net("10.99.0.3/32"),)

    p = await converge(fake, store, [])
    assert p.operations == (
        RemovePeer(BOB),
        SetAllowedIps(HUB, (net("10.99.0.1/32"), net("10.99.0.4/32"), net("10.99.0.3/32"))),
    )
    hub = (await fake.get_device(IFACE)).peer(HUB)
    assert hub is not None
    assert set(hub.allowed_ips) == {net("10.99.0.1/32"), net("10.99.0.3/32"), net("10.99.0.4/32")}
    assert len(store.load().interface(IFACE)) == 0


async def test_route_taken_from_hub_follows_a_new_holder(store: LedgerStore) -> None:
    # Bob leaves and carol (new key, same tunnel address) takes the route: the hub
    # must not get it back now, and carol's entry must remember it for later.
    fake = make_fake(hub_ips=("10.99.0.1/32", "10.99.0.3/32"))
    await add_and_prove(fake, store, [BOB_PEER])
    carol_same_ip = direct(CAROL, "192.168.50.12", "10.99.0.3/32")
    await add_and_prove(fake, store, [carol_same_ip])
    device = await fake.get_device(IFACE)
    carol = device.peer(CAROL)
    assert carol is not None
    assert carol.allowed_ips == (net("10.99.0.3/32"),)
    entry = store.load().interface(IFACE).get(CAROL)
    assert entry is not None
    assert entry.taken_from_hub == (net("10.99.0.3/32"),)
    await converge(fake, store, [])
    hub = (await fake.get_device(IFACE)).peer(HUB)
    assert hub is not None
    assert set(hub.allowed_ips) == {net("10.99.0.1/32"), net("10.99.0.3/32")}


async def test_foreign_peers_are_never_touched(store: LedgerStore) -> None:
    fake = make_fake()
    hand_before = (await fake.get_device(IFACE)).peer(HAND)
    # Desired peers that collide with the hub, a hand-configured key or its /32.
    hostile = [
        direct(HAND, "192.168.50.11", "10.99.0.3/32"),
        direct(HUB, "192.168.50.11", "10.99.0.5/32"),
        direct(BOB, "192.168.50.11", "10.99.0.77/32"),
    ]
    p = await converge(fake, store, hostile)
    assert p.operations == ()
    assert len(p.skipped) == 3
    assert fake.writes == []
    await converge(fake, store, [])  # a removal pass must not touch them either
    assert fake.writes == []
    device = await fake.get_device(IFACE)
    assert device.peer(HAND) == hand_before
    assert [p.public_key for p in device.peers] == [HUB, HAND]


async def test_plan_is_idempotent_after_apply(store: LedgerStore) -> None:
    fake = make_fake(hub_ips=("10.99.0.1/32", "10.99.0.3/32", "10.99.0.4/32"))
    await converge(fake, store, [BOB_PEER])
    for desired in (
        [CAROL_PEER],
        [BOB_PEER, CAROL_PEER],
        [direct(BOB, "192.168.50.2", "10.99.0.3/32")],
        [],
    ):
        await converge(fake, store, desired)
        again = plan(desired, await fake.get_device(IFACE), store.load().interface(IFACE), HUB)
        assert again.empty, desired


async def test_removal_plan_drops_entries_of_peers_already_gone(store: LedgerStore) -> None:
    fake = make_fake()
    await converge(fake, store, [BOB_PEER, CAROL_PEER])
    await fake.remove_peer(IFACE, BOB)  # someone else removed bob
    fake.writes.clear()
    p = removal_plan(await fake.get_device(IFACE), store.load().interface(IFACE), HUB)
    assert p.operations == (RemovePeer(CAROL),)
    await apply(p, fake, IFACE, store)
    assert fake.writes == [("remove_peer", IFACE, CAROL)]
    assert IFACE not in store.load().interfaces


async def test_crash_mid_apply_leaves_every_touched_peer_in_the_ledger(
    store: LedgerStore,
) -> None:
    class FailingOnCarol(FakeWireGuard):
        async def set_peer(self, interface: str, peer: PeerConfig) -> None:
            if peer.public_key == CAROL:
                raise DeviceRefused(interface, "boom")
            await super().set_peer(interface, peer)

    fake = make_fake()
    failing = FailingOnCarol()
    failing.devices = fake.devices
    await converge(failing, store, [BOB_PEER])
    p = plan([CAROL_PEER], await failing.get_device(IFACE), store.load().interface(IFACE), HUB)
    with pytest.raises(DeviceRefused):
        await apply(p, failing, IFACE, store)
    # Bob was removed, carol maybe half-added: both stay known so recovery can clean up.
    assert {e.public_key for e in store.load().interface(IFACE)} == {BOB, CAROL}
    recovery = removal_plan(await failing.get_device(IFACE), store.load().interface(IFACE), HUB)
    await apply(recovery, failing, IFACE, store)
    assert len(store.load().interface(IFACE)) == 0


async def test_ledger_write_failure_leaves_the_device_alone(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = LedgerStore(blocker / "ledger.json")
    fake = make_fake()
    p = plan([BOB_PEER], await fake.get_device(IFACE), InterfaceLedger(), HUB)
    with pytest.raises(LedgerError):
        await apply(p, fake, IFACE, store)
    assert fake.writes == []


def test_working_peer_keeps_its_endpoint_when_another_port_is_offered(
    store: LedgerStore,
) -> None:
    configured = direct(BOB, "192.168.50.11", "10.99.0.3/32", port=40000)
    ledger = InterfaceLedger.of(
        [LedgerPeer(BOB, configured.endpoint, configured.allowed_ips, (), NOW)]
    )
    roamed = Endpoint(ip_address("192.168.50.11"), 51820)
    device = DeviceState(
        IFACE, OWN, 51820, (PeerState(BOB, (), roamed, latest_handshake=NOW + 50),)
    )
    offered_again = direct(BOB, "192.168.50.11", "10.99.0.3/32", port=40001)
    lans = (net("192.168.50.0/24"),)
    kept = keep_working_endpoints([offered_again], device, ledger, lans, NOW + 60, fresh_within=180)
    assert kept == (configured,)  # so plan() writes nothing at all
    # Without a fresh handshake, or with WireGuard's endpoint off the LAN, the offer wins.
    stale = keep_working_endpoints(
        [offered_again], device, ledger, lans, NOW + 50 + 181, fresh_within=180
    )
    assert stale == (offered_again,)
    off_lan = keep_working_endpoints(
        [offered_again], device, ledger, (net("192.168.60.0/24"),), NOW + 60, fresh_within=180
    )
    assert off_lan == (offered_again,)


def test_recreate_takes_pending_peers_off_and_back_as_they_were_and_nothing_else() -> None:
    endpoint = Endpoint(ip_address("192.168.50.11"), 51820)
    pending = LedgerPeer(key(4), endpoint, (), added_at=100.0)
    routed = LedgerPeer(key(5), endpoint, (net("10.99.0.5/32"),), added_at=100.0)
    passive = LedgerPeer(key(6), None, (), added_at=100.0)
    also_pending = LedgerPeer(key(7), endpoint, (), added_at=101.0)
    ledger = InterfaceLedger.of([pending, routed, passive, also_pending])
    # A routed peer, a passive one and a peer that is not ours are left out.
    again = recreate_plan(ledger, [key(5), key(4), key(6), key(9), key(7)], 3)
    assert again.operations == (
        RemovePeer(key(4)),
        SetPeer(PeerConfig(key(4), (), endpoint, 3)),
        RemovePeer(key(7)),
        SetPeer(PeerConfig(key(7), (), endpoint, 3)),
    )
    # The ledger, and so the grace counted from the first add, is unchanged.
    assert again.ledger == ledger == again.previous
    assert recreate_plan(ledger, [key(5), key(6), key(9)], 3).empty
