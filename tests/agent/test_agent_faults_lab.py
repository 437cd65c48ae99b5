"""The agent under faults, with the real server and wireguard-go (issue 7 part 4).

Each test builds its own default lab (alice and bob on lan1, carol on lan2), puts
a hand-configured peer on alice, runs the real server and agents, breaks
something, and checks that alice ends with exactly the right peers: bob direct,
the hand-configured peer and the hub peer as they were, nothing left over.
Figures (kill counts, back-off attempts, recovery times, RSS) are printed.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from ipaddress import ip_network
from pathlib import Path

import pytest

from wg_autopeer.agent.instance import LOCK_NAME
from wg_autopeer.agent.localapi import AgentNotRunning
from wg_autopeer.agent.worker import REPORT_RETRY_CAP
from wg_autopeer.lab import Lab
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import (
    agent_call,
    agent_dirs,
    direct_peers,
    has_direct_peer,
    start_agent,
    start_server,
)
from wg_autopeer.wireguard.base import PeerState

pytestmark = pytest.mark.lab

HAND_PEER_KEY = "aGFuZC1jb25maWd1cmVkLXBlZXItMzItYnl0ZXMhISE="  # 32 bytes, base64
HAND_PEER_IP = "10.99.0.200/32"
PAIR_TIMEOUT = 20.0


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Baseline:
    """alice's hub and hand-configured peers before any agent ran."""

    hub: PeerState
    hand: PeerState


def _add_hand_peer(lab: Lab) -> None:
    """A peer configured by hand on alice, which the agent must never touch."""
    lab.run(
        "alice",
        "wg", "set", lab.wg_interface("alice"),
        "peer", HAND_PEER_KEY, "allowed-ips", HAND_PEER_IP, "endpoint", "192.0.2.77:51820",
    )  # fmt: skip


def _prepared(lab_factory: Callable[..., Lab], *, hub_carries_bob: bool = False) -> Lab:
    lab = lab_factory(base="ho")
    _add_hand_peer(lab)
    if hub_carries_bob:
        # The hub peer carries bob's /32 explicitly: a direct bob takes it, and it must
        # come back to the hub whenever bob goes, whatever the agent went through.
        hub_ips = f"{lab.tunnel_interface('hub').network},{lab.tunnel_ip('bob')}/32"
        lab.run(
            "alice",
            "wg", "set", lab.wg_interface("alice"),
            "peer", lab.public_key("hub"), "allowed-ips", hub_ips,
        )  # fmt: skip
    return lab


def _baseline(lab: Lab) -> Baseline:
    device = lab.device("alice")
    hub, hand = device.peer(lab.public_key("hub")), device.peer(HAND_PEER_KEY)
    assert hub is not None
    assert hand is not None
    return Baseline(hub, hand)


def _same(a: PeerState | None, b: PeerState, *, allowed: set[str] | None = None) -> bool:
    want = allowed if allowed is not None else {str(ip) for ip in b.allowed_ips}
    return (
        a is not None
        and a.endpoint == b.endpoint
        and {str(ip) for ip in a.allowed_ips} == want
        and a.persistent_keepalive == b.persistent_keepalive
    )


def _paired(lab: Lab) -> bool:
    return has_direct_peer(lab, "alice", "bob") and has_direct_peer(lab, "bob", "alice")


def _ledger_keys(lab: Lab, host: str = "alice") -> set[str]:
    """Keys in ``host``'s ledger file (read, never repaired: the agent owns it)."""
    path = agent_dirs(lab, host)[0] / "ledger.json"
    if not path.exists():
        return set()
    data = json.loads(path.read_text())
    return {peer["public_key"] for iface in data["interfaces"].values() for peer in iface["peers"]}


def _assert_exactly_bob(lab: Lab, base: Baseline, *, hub_carries_bob: bool = False) -> None:
    """alice holds hub + hand peer + bob (direct, LAN endpoint) and nothing else; the
    ledger names bob alone."""
    device = lab.device("alice")
    bob = lab.public_key("bob")
    keys = {p.public_key for p in device.peers}
    assert keys == {lab.public_key("hub"), HAND_PEER_KEY, bob}, f"alice holds {keys}"
    assert has_direct_peer(lab, "alice", "bob", handshake=False)
    peer = device.peer(bob)
    assert peer is not None
    assert peer.allowed_ips == (ip_network(f"{lab.tunnel_ip('bob')}/32"),)
    hub_now = {str(lab.tunnel_interface("hub").network)} if hub_carries_bob else None
    assert _same(device.peer(lab.public_key("hub")), base.hub, allowed=hub_now), device.peer(
        lab.public_key("hub")
    )
    assert _same(device.peer(HAND_PEER_KEY), base.hand)
    assert _ledger_keys(lab) == {bob}


def _assert_agent_gone_clean(lab: Lab, base: Baseline) -> None:
    """After a SIGTERM: alice is back to hub + hand peer exactly as before, empty ledger."""
    device = lab.device("alice")
    keys = {p.public_key for p in device.peers}
    assert keys == {lab.public_key("hub"), HAND_PEER_KEY}, f"leftovers on alice: {keys}"
    assert _same(device.peer(lab.public_key("hub")), base.hub), device.peer(lab.public_key("hub"))
    assert _same(device.peer(HAND_PEER_KEY), base.hand)
    assert _ledger_keys(lab) == set()


def _agent_ready(lab: Lab, host: str = "alice") -> bool:
    try:
        return agent_call(lab, host, "status").get("ok") is True
    except AgentNotRunning:
        return False


def _log_lines(lab: Lab, name: str) -> list[str]:
    try:
        return lab.log_path(name).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _no_crash(lab: Lab, name: str) -> None:
    text = "\n".join(_log_lines(lab, name))
    assert "Traceback" not in text, f"the agent crashed: see {lab.log_path(name)}"


def _stamp(line: str) -> float | None:
    """Epoch seconds of a log line (``2025-01-01 12:00:00,123 LEVEL ...``)."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _ping_through_hub(lab: Lab, src: str, dst: str) -> bool:
    before = lab.hub_peer(src).rx_bytes
    return lab.ping(src, lab.tunnel_ip(dst), count=1, timeout=1) and (
        lab.hub_peer(src).rx_bytes > before
    )


def _assert_ping_direct(lab: Lab, src: str, dst: str) -> None:
    """``src`` reaches ``dst`` and the pings do not cross the hub (its counter for
    ``src`` grows by less than the pings' volume)."""
    count, size = 3, 1000
    before = lab.hub_peer(src).rx_bytes
    result = lab.run(
        src,
        "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", "-s", str(size),
        str(lab.tunnel_ip(dst)),
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{src} cannot reach {dst}: {result.stdout}"
    grew = lab.hub_peer(src).rx_bytes - before
    # Half the pings' volume: room for the agent's own small packets to the server.
    assert grew < count * size / 2, f"{src}->{dst} crossed the hub ({grew} bytes)"


def _log_quiet(lab: Lab, name: str, seconds: float) -> bool:
    """The agent has logged nothing for ``seconds``: its reactions to a burst are over."""
    return time.time() - lab.log_path(name).stat().st_mtime >= seconds


# --------------------------------------------------------------------------- (a) kill -9


@pytest.mark.slow
def test_sigkill_during_applies_50_times_leaves_exactly_the_right_peers(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = _prepared(lab_factory, hub_carries_bob=True)
    base = _baseline(lab)
    bob_key = lab.public_key("bob")
    start_server(lab)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    bob: subprocess.Popen[bytes] | None = start_agent(lab, "bob", log_name="agent-bob-0")
    kills = 50
    ops = re.compile(r": (SetPeer|RemovePeer|SetAllowedIps)\(")
    # Where the kills landed: after how many applied operations, and how often the
    # ledger and the device disagreed about bob (the kill cut an apply in half).
    applied_ops = after_apply = torn = 0
    bob_toggles = 0
    started = time.monotonic()
    for i in range(kills):
        name = f"agent-alice-{i}"
        if bob is None and rng.random() < 0.5:
            # bob back more often than not, so most of alice's runs have him to apply.
            bob = start_agent(lab, "bob", log_name=f"agent-bob-back-{i}")
            bob_toggles += 1
        alice = start_agent(lab, "alice", log_name=name)
        # The control socket opens just before recovery and the first report; the
        # random instant after it falls on recovery, reports, applies or idle time.
        assert wait_for(lambda a=alice: _agent_ready(lab) or a.poll() is not None, timeout=15)
        assert alice.poll() is None, f"alice's agent exited: {lab.log_path(name)}"
        deadline = time.monotonic() + rng.uniform(0.0, 1.0)
        if rng.random() < 0.5:
            # Kill as soon as the agent logs an operation: it logs each one just before
            # the apply (ledger first, then the device), so this lands in or right after it.
            wait_for(
                lambda n=name: any(ops.search(x) for x in _log_lines(lab, n)),
                timeout=deadline - time.monotonic(),
                interval=0.002,
            )
        else:
            if rng.random() < 0.5:
                # bob comes or goes meanwhile, so the kill may hit an add or a removal.
                time.sleep(max(0.0, rng.uniform(0.0, deadline - time.monotonic())))
                if bob is None:
                    bob = start_agent(lab, "bob", log_name=f"agent-bob-{i}")
                else:
                    lab.stop(bob, signal.SIGTERM)
                    bob = None
                bob_toggles += 1
            # Waiting for a random instant is the point here: it is where the kill lands.
            time.sleep(max(0.0, deadline - time.monotonic()))
        lab.stop(alice, signal.SIGKILL)
        done = sum(bool(ops.search(line)) for line in _log_lines(lab, name))
        applied_ops += done
        after_apply += done > 0
        torn += (bob_key in direct_peers(lab, "alice")) != (bob_key in _ledger_keys(lab))
    chaos = time.monotonic() - started

    # The final restart: bob is there (fresh), alice comes back and converges.
    if bob is not None:
        lab.stop(bob, signal.SIGTERM)
    start_agent(lab, "bob", log_name="agent-bob-final")
    alice = start_agent(lab, "alice", log_name="agent-alice-final")
    restarted = time.monotonic()
    assert wait_for(lambda: _paired(lab), timeout=40), (
        f"no pairing after the kills (seed {seed}): {lab.log_path('agent-alice-final')}"
    )
    converged = time.monotonic() - restarted
    cleaned = sum(
        "half-written ledger" in line
        for i in [*range(kills), "final"]
        for line in _log_lines(lab, f"agent-alice-{i}")
    )
    _assert_exactly_bob(lab, base, hub_carries_bob=True)
    _assert_ping_direct(lab, "alice", "bob")
    for name in [f"agent-alice-{i}" for i in range(kills)] + ["agent-alice-final"]:
        _no_crash(lab, name)
    state_dir = agent_dirs(lab, "alice")[0]
    # The ledger and the one-agent lock belong there; half-written ledgers do not.
    stray = sorted(p.name for p in state_dir.iterdir() if p.name not in ("ledger.json", LOCK_NAME))

    # A clean stop gives bob's /32 back to the hub: the hub peer is as before the test.
    assert lab.stop(alice, signal.SIGTERM, timeout=10) == 0
    _assert_agent_gone_clean(lab, base)
    print(
        f"\nkill -9: {kills} kills in {chaos:.1f} s (seed {seed}), bob toggled {bob_toggles}x;"
        f" {after_apply} kills came after the agent applied something ({applied_ops} operations"
        f" in all), {torn} found ledger and device disagreeing; converged"
        f" {converged:.2f} s after the final start; {cleaned} start(s) removed half-written"
        f" ledgers; stray files in the state dir: {stray or 'none'}"
    )
    # Half-written ledgers of killed runs are cleared by the next start.
    assert not stray, stray


# --------------------------------------------------------------------------- (b) server down


def _failed_requests(lab: Lab, name: str, since: float, until: float) -> list[float]:
    """Timestamps of the agent's failed report attempts logged between two instants."""
    stamps = []
    for line in _log_lines(lab, name):
        if " WARNING " in line and "peering-request: " in line:
            stamp = _stamp(line)
            if stamp is not None and since <= stamp <= until:
                stamps.append(stamp)
    return stamps


def _contacted_since(lab: Lab, host: str, since: float) -> bool:
    """The agent's latest report got an answer after ``since`` (epoch seconds)."""
    status = agent_call(lab, host, "status")
    iface = (status.get("interfaces") or [{}])[0]
    contact = iface.get("last_contact")
    return contact is not None and contact > since and iface["last_outcome"].startswith("ok")


def test_server_down_keeps_direct_peers_and_agent_reregisters_with_backoff(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = _prepared(lab_factory)
    base = _baseline(lab)
    db = lab.lab_dir / "server.db"
    server = start_server(lab, "--db", str(db))
    start_agent(lab, "alice")
    bob = start_agent(lab, "bob")
    assert wait_for(lambda: _paired(lab), timeout=PAIR_TIMEOUT)

    lab.stop(server, signal.SIGKILL)
    killed = time.time()
    # Beyond the health timeout (10 s): the direct pair must hold the whole time.
    window = 15.0
    end = time.monotonic() + window
    broken: list[float] = []
    while time.monotonic() < end:
        if not _paired(lab):
            broken.append(time.time() - killed)
        # Sampling twice a second over the window: a lapse of the pair is what we look for.
        time.sleep(0.5)
    assert not broken, f"direct peering broke while the server was down, at {broken}"
    _assert_ping_direct(lab, "alice", "bob")
    assert _ping_through_hub(lab, "alice", "carol"), "the hub path broke with the server"
    assert _agent_ready(lab)
    attempts = _failed_requests(lab, "agent-alice", killed, time.time())
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(attempts)]
    # Capped exponential back-off from 1 s with full jitter: the ceilings 1, 2, 4, 8 s
    # sum to 15 s, so at least 4 attempts fit the window; a fixed 1 s retry would make
    # 15, a tight loop hundreds.
    assert 3 <= len(attempts) <= 12, f"{len(attempts)} attempts in {window:g} s: {gaps}"
    _assert_exactly_bob(lab, base)

    restarted = time.time()
    start_server(lab, "--db", str(db), log_name="server-2")
    # The server was down long enough for the retries to be up to the cap apart: one
    # that failed just before the server listened again waits up to that long.
    back_within = REPORT_RETRY_CAP + 15.0
    assert wait_for(lambda: _contacted_since(lab, "alice", restarted), timeout=back_within), (
        f"alice never re-registered: {lab.log_path('agent-alice')}"
    )
    back_alice = time.time() - restarted
    assert wait_for(
        lambda: _contacted_since(lab, "bob", restarted),
        timeout=max(1.0, restarted + back_within - time.time()),
    ), f"bob never re-registered: {lab.log_path('agent-bob')}"
    back_bob = time.time() - restarted
    # Both hold a blocking query on the new server again: bob leaving reaches alice fast.
    assert lab.stop(bob, signal.SIGTERM, timeout=10) == 0
    left = time.monotonic()
    assert wait_for(lambda: lab.public_key("bob") not in direct_peers(lab, "alice"), timeout=5), (
        "alice kept bob after he left the restarted server"
    )
    dropped = time.monotonic() - left
    _no_crash(lab, "agent-alice")
    print(
        f"\nserver down {window:g} s: pair held; {len(attempts)} attempts, gaps {gaps} s;"
        f" re-registered after {back_alice:.1f} s (alice), {back_bob:.1f} s (bob);"
        f" bob's leave reached alice in {dropped:.2f} s"
    )


# --------------------------------------------------------------------------- (c) device gone


def test_wireguard_interface_deleted_and_recreated_under_a_running_agent(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = _prepared(lab_factory)
    base = _baseline(lab)
    start_server(lab)
    alice = start_agent(lab, "alice")
    start_agent(lab, "bob")
    assert wait_for(lambda: _paired(lab), timeout=PAIR_TIMEOUT)

    lab.restart_wireguard("alice", delete_link=True)
    recreated = time.monotonic()
    # What wg-quick would restore from its config file: the hand-configured peer.
    _add_hand_peer(lab)
    assert alice.poll() is None, "the agent died with its interface"
    assert _agent_ready(lab)
    # The agent finds bob gone from the device, counts it as a failed direct peer and
    # holds him back for the suppression period (30 s) before adding him again.
    assert wait_for(lambda: _paired(lab), timeout=60), (
        f"alice never re-peered on the new device: {lab.log_path('agent-alice')}"
    )
    repeered = time.monotonic() - recreated
    _assert_exactly_bob(lab, base)
    _assert_ping_direct(lab, "alice", "bob")
    _no_crash(lab, "agent-alice")
    assert lab.stop(alice, signal.SIGTERM, timeout=10) == 0
    _assert_agent_gone_clean(lab, base)
    print(f"\ninterface recreated: alice and bob direct again after {repeered:.2f} s")


# --------------------------------------------------------------------------- (d) hub restart


def test_hub_wireguard_restart_heals_hub_path_agents_and_direct_peers(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = _prepared(lab_factory)
    base = _baseline(lab)
    start_server(lab)
    alice = start_agent(lab, "alice")
    bob = start_agent(lab, "bob")
    assert wait_for(lambda: _paired(lab), timeout=PAIR_TIMEOUT)

    restarted_at = time.time()
    lab.restart_wireguard("hub")
    restarted = time.monotonic()
    unpaired: list[float] = []

    def watch(done: Callable[[], bool]) -> Callable[[], bool]:
        """``done``, noting along the way when alice and bob were not direct peers."""

        def check() -> bool:
            if not _paired(lab):
                unpaired.append(time.monotonic() - restarted)
            return done()

        return check

    # The new hub knows no endpoint: a client comes back when it sends data (WireGuard
    # re-handshakes 15 s after data got no answer; keepalives alone do not count).
    assert wait_for(watch(lambda: lab.ping("alice", lab.tunnel_ip("hub"))), timeout=60), (
        "alice's hub path never came back after the hub's WireGuard restart"
    )
    hub_back = time.monotonic() - restarted
    assert wait_for(watch(lambda: _ping_through_hub(lab, "carol", "alice")), timeout=60), (
        "carol never reached alice through the restarted hub"
    )
    for host in ("alice", "bob"):
        assert wait_for(watch(lambda h=host: _contacted_since(lab, h, restarted_at)), timeout=65), (
            f"{host} never reached the server again: {lab.log_path(f'agent-{host}')}"
        )
    agents_back = time.monotonic() - restarted
    assert wait_for(watch(lambda: _paired(lab)), timeout=60), (
        f"alice and bob never peered directly again: {lab.log_path('agent-alice')}"
    )
    paired_again = time.monotonic() - restarted
    _assert_exactly_bob(lab, base)
    _assert_ping_direct(lab, "alice", "bob")
    # The push path works again: bob leaving reaches alice.
    assert lab.stop(bob, signal.SIGTERM, timeout=10) == 0
    assert wait_for(lambda: lab.public_key("bob") not in direct_peers(lab, "alice"), timeout=5)
    _no_crash(lab, "agent-alice")
    _no_crash(lab, "agent-bob")
    assert lab.stop(alice, signal.SIGTERM, timeout=10) == 0
    _assert_agent_gone_clean(lab, base)
    gap = f"{min(unpaired):.1f}-{max(unpaired):.1f} s" if unpaired else "never"
    print(
        f"\nhub WireGuard restart: alice's hub path back after {hub_back:.1f} s, both agents"
        f" answered by the server after {agents_back:.1f} s, direct pair complete after"
        f" {paired_again:.1f} s (not paired: {gap})"
    )


# --------------------------------------------------------------------------- (e) link flaps


@pytest.mark.slow
def test_lan_link_flapping_200_times_leaks_nothing_and_rss_stays_flat(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = _prepared(lab_factory)
    base = _baseline(lab)
    start_server(lab)
    alice = start_agent(lab, "alice")
    start_agent(lab, "bob")
    assert wait_for(lambda: _paired(lab), timeout=PAIR_TIMEOUT)
    # Let the interpreter settle (imports, first answers) before the reference reading.
    assert wait_for(lambda: _agent_ready(lab), timeout=5)
    rss_before, fds_before = _rss_kib(alice.pid), _fd_count(alice.pid)

    flaps, period = 200, 0.15
    rng = random.Random()
    started = time.monotonic()
    for i in range(flaps):
        lab.link_set("alice", False)
        # Down for a random moment, so some flaps catch the agent mid-report or mid-apply.
        time.sleep(rng.uniform(0.0, 0.1))
        lab.link_set("alice", True)
        # Paced: 200 flaps in about 30 s, well within the minute the issue asks for.
        time.sleep(max(0.0, started + (i + 1) * period - time.monotonic()))
    took = time.monotonic() - started
    assert took <= 60.0, f"200 flaps took {took:.1f} s"
    assert alice.poll() is None, "the agent died while the link flapped"

    settled = time.monotonic()
    # Debounced events still arrive for a moment after the last flap (a last "no
    # gateway" may remove bob once more): judge the state once the agent went quiet.
    assert wait_for(lambda: _log_quiet(lab, "agent-alice", 2.0) and _paired(lab), timeout=45), (
        f"no direct peering after the flapping: {lab.log_path('agent-alice')}"
    )
    converged = time.monotonic() - settled
    _assert_exactly_bob(lab, base)
    _assert_ping_direct(lab, "alice", "bob")
    assert _agent_ready(lab)
    rss_after, fds_after = _rss_kib(alice.pid), _fd_count(alice.pid)
    _no_crash(lab, "agent-alice")
    changes = sum("network change" in line for line in _log_lines(lab, "agent-alice"))
    # Bursts are debounced (snapshots at most every 0.5 s), but a minute of flapping
    # must have been seen at all, or this test proved nothing.
    assert changes > 0, f"the agent never saw the link flap: {lab.log_path('agent-alice')}"
    print(
        f"\nlink flaps: {flaps} in {took:.1f} s; {changes} network-change lines;"
        f" settled (2 s quiet, paired) {converged:.2f} s after;"
        f" VmRSS {rss_before} -> {rss_after} kB ({rss_after - rss_before:+d});"
        f" fds {fds_before} -> {fds_after}"
    )
    assert rss_after - rss_before < 8 * 1024, f"RSS grew {rss_before} -> {rss_after} kB"
    assert fds_after <= fds_before + 4, f"file descriptors {fds_before} -> {fds_after}"
    assert lab.stop(alice, signal.SIGTERM, timeout=10) == 0
    _assert_agent_gone_clean(lab, base)
