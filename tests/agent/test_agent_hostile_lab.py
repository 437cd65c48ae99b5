"""The real agent against a hostile coordination server (issue 4, issue 7 part 3).

One lab serves the whole module (building it is the slow part). Each case puts
``wg_autopeer.lab.hostile`` in one mode on the hub's tunnel address, where the
agent looks for its server by default, starts alice's agent, lets it fetch at
least three answers (one by itself, then one per ``sync``), and checks while it
runs and after ``quit``:

- alice's device holds the hub, the hand-configured peer and nothing else (in the
  mixed case, also bob: the one honest offer);
- the hub peer and the hand-configured peer are exactly as before;
- alice reaches bob (through the hub, the hub's counters show it);
- the control socket answers ``status`` within a deadline and ``quit`` ends the
  agent with status 0, leaving an empty ledger;
- each refused offer is logged exactly once, however often it is offered, and a
  refused answer or failed request once per answer.

Every case leaves alice as it found her, even when it fails, so the next case
starts clean; the lab is torn down at the end of the module in any case.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path

import pytest

from wg_autopeer.agent.localapi import AgentNotRunning
from wg_autopeer.lab import Lab, default_topology
from wg_autopeer.lab.hostile import INVALID_KEYS, MANY_PEERS, Mode, hostile_key
from wg_autopeer.lab.netns import list_namespaces, wait_for
from wg_autopeer.lab.services import SERVER_PORT, agent_call, agent_dirs, start_agent
from wg_autopeer.lab.state import read_state
from wg_autopeer.lab.wgtools import UAPI_DIR
from wg_autopeer.wireguard.base import PeerState, is_valid_key

pytestmark = pytest.mark.lab

HAND_PEER_KEY = "aGFuZC1jb25maWd1cmVkLXBlZXItMzItYnl0ZXMhISE="  # 32 bytes, base64
HAND_PEER_IP = "10.99.0.200/32"
STATUS_DEADLINE = 2.0
QUIT_DEADLINE = 10.0
ANSWERS_WANTED = 3


@dataclass
class HostileLab:
    """The module's lab and what alice looked like before any case ran."""

    lab: Lab
    hub_key: str
    hub_before: PeerState
    hand_before: PeerState
    figures: dict[str, dict[str, float]] = field(default_factory=dict)


def _unique_prefix(base: str) -> str:
    """As conftest's ``unique_prefix`` (the ``lab_factory`` fixture is per test, and this
    module's lab is per module; conftest itself is not importable by name)."""
    for _ in range(100):
        prefix = base + secrets.token_hex(2)[:3]
        if not list_namespaces(prefix) and not any(UAPI_DIR.glob(f"{prefix}-*.sock")):
            return prefix
    raise RuntimeError(f"no free lab prefix starting with {base!r}")


@pytest.fixture(scope="module")
def hostile_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileLab]:
    """The default lab under prefix ``ho…``, a hand-configured peer on alice; torn down
    after the module even when a case failed."""
    lab = Lab(default_topology(_unique_prefix("ho")), state_dir=tmp_path_factory.mktemp("lab"))
    try:
        lab.up()
        lab.run(
            "alice",
            "wg", "set", lab.wg_interface("alice"),
            "peer", HAND_PEER_KEY, "allowed-ips", HAND_PEER_IP, "endpoint", "192.0.2.77:51820",
        )  # fmt: skip
        hub_key = lab.public_key("hub")
        device = lab.device("alice")
        hub_before, hand_before = device.peer(hub_key), device.peer(HAND_PEER_KEY)
        assert hub_before is not None
        assert hand_before is not None
        hl = HostileLab(lab, hub_key, hub_before, hand_before)
        yield hl
        _print_figures(hl)
    finally:
        try:
            lab.down()
        finally:
            if read_state(lab.prefix, lab.state_dir) is not None or list_namespaces(lab.prefix):
                Lab.cleanup_leftovers(lab.prefix, lab.state_dir)


def _print_figures(hl: HostileLab) -> None:
    print("\nhostile server cases (answers, status max s, quit s):")
    for mode, fig in hl.figures.items():
        print(
            f"  {mode:<13} answers={fig['answers']:.0f} status_max={fig['status_max']:.3f}"
            f" quit={fig['quit']:.2f} case={fig['case']:.1f}"
        )


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Refused:
    """An offer the agent must refuse: the key as the log shows it, and why."""

    shown: str
    reason: str


def _shown(key: str) -> str:
    """The key as the agent's refusal line starts it (``%.10s`` of a valid key or its repr)."""
    return (key if is_valid_key(key) else repr(key))[:10]


def _expected_refusals(hl: HostileLab, mode: Mode) -> list[Refused]:
    """What the per-peer modes offer (see ``hostile_offers``), and the reason to refuse each."""
    own_key = hl.lab.public_key("alice")
    cases = {
        Mode.ALL_IPV4: [Refused(_shown(hostile_key("all-ipv4")), "is not a host route")],
        Mode.ALL_IPV6: [Refused(_shown(hostile_key("all-ipv6")), "is not a host route")],
        Mode.HUB_ADDRESS: [Refused(_shown(hostile_key("hub-address")), "hub's tunnel address")],
        Mode.OWN_KEY: [Refused(_shown(own_key), "this agent's own key")],
        Mode.OFF_LAN: [Refused(_shown(hostile_key("off-lan")), "outside the LANs")],
        Mode.INVALID_KEYS: [Refused(_shown(k), "not a WireGuard public key") for k in INVALID_KEYS],
    }
    if mode is not Mode.MIXED:
        return cases[mode]
    mixed = [r for m, refusals in cases.items() for r in refusals]
    mixed += [
        Refused(_shown(hl.hub_key), "the hub's key"),
        Refused(_shown(HAND_PEER_KEY), "did not add (hand-configured)"),
        Refused(_shown(hostile_key(f"steal-{HAND_PEER_IP}")), "belongs to hand-configured peer"),
    ]
    return mixed


# The agent's log line for each answer it refused whole or each request that failed.
WHOLE_REFUSALS: dict[Mode, str] = {
    Mode.MANY_PEERS: f"answer offers {MANY_PEERS} peers (at most 256)",
    Mode.HUGE_BODY: "exceeds 1048576 bytes",
    Mode.HUGE_CHUNKED: "exceeds 1048576 bytes",
    Mode.GZIP_BOMB: "answer is gzip-encoded",
    Mode.HTML: "answer is text/html; charset=utf-8, not JSON",
    Mode.GARBAGE: "answer is not the wire format",
    Mode.ERROR_500: "HTTP 500: boom",
    Mode.REDIRECT: "HTTP 307: redirect to http://198.51.100.66/peering-request not followed",
    Mode.NOT_HTTP: "RemoteProtocolError",
}
# Failures the agent retries on its own (with back-off) between the test's syncs: the
# last of those may be cut short by quit, unlogged.
RETRIED = frozenset({Mode.ERROR_500, Mode.NOT_HTTP})
# Modes whose request only ends by the agent's own deadline (5 s for the whole request).
SLOW_MODES: dict[Mode, str] = {
    Mode.DRIP: "no complete answer within 5 s",
    Mode.HANG: "no complete answer within 5 s",
}
# Server-chosen text in a log line is bounded (a line is ~150 characters plus that).
MAX_LOG_LINE = 600
# A tight loop would send hundreds of requests in a case; back-off and pacing a handful.
MAX_REQUESTS_PER_CASE = 12


# --------------------------------------------------------------------------- helpers


def _log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _posts(lab: Lab, log_name: str) -> int:
    """Requests the hostile server received (it logs each on arrival)."""
    pattern = re.compile(r"^hostile: #\d+ POST ")
    return sum(bool(pattern.match(line)) for line in _log_lines(lab.log_path(log_name)))


def _said(lab: Lab, log_name: str, text: str) -> int:
    """Lines of the agent's log that contain ``text``."""
    return sum(text in line for line in _log_lines(lab.log_path(log_name)))


def _last_contact(lab: Lab) -> float | None:
    """When alice's agent last finished with an answer (its status says)."""
    interfaces = agent_call(lab, "alice", "status").get("interfaces") or []
    contact = interfaces[0].get("last_contact") if interfaces else None
    return float(contact) if contact is not None else None


def _status_time(lab: Lab) -> float:
    """Seconds the agent took to answer ``status`` (fails past the deadline)."""
    started = time.monotonic()
    answer = agent_call(lab, "alice", "status")
    took = time.monotonic() - started
    assert answer.get("ok") is True, answer
    assert took < STATUS_DEADLINE, f"status took {took:.2f} s"
    return took


def _agent_answers(lab: Lab) -> bool:
    try:
        return agent_call(lab, "alice", "status").get("ok") is True
    except AgentNotRunning:
        return False


def _restore_alice(hl: HostileLab) -> None:
    """Put alice back as the module found her, whatever a failed case left."""
    lab = hl.lab
    iface = lab.wg_interface("alice")
    for peer in lab.device("alice").peers:
        if peer.public_key not in (hl.hub_key, HAND_PEER_KEY):
            lab.run("alice", "wg", "set", iface, "peer", peer.public_key, "remove")
    hub_ips = ",".join(str(ip) for ip in hl.hub_before.allowed_ips)
    lab.run("alice", "wg", "set", iface, "peer", hl.hub_key, "allowed-ips", hub_ips)
    agent_dirs(lab, "alice")[0].joinpath("ledger.json").unlink(missing_ok=True)


def _same_peer(a: PeerState | None, b: PeerState) -> bool:
    return (
        a is not None
        and a.endpoint == b.endpoint
        and set(a.allowed_ips) == set(b.allowed_ips)
        and a.persistent_keepalive == b.persistent_keepalive
    )


def _check_alice(hl: HostileLab, allowed_extra: frozenset[str] = frozenset()) -> None:
    """Nothing harmful on alice: only hub + hand peer (+ ``allowed_extra``), both unchanged."""
    device = hl.lab.device("alice")
    keys = {p.public_key for p in device.peers}
    unexpected = keys - {hl.hub_key, HAND_PEER_KEY} - allowed_extra
    assert not unexpected, f"alice holds peers she should have refused: {sorted(unexpected)}"
    assert _same_peer(device.peer(hl.hub_key), hl.hub_before), device.peer(hl.hub_key)
    assert _same_peer(device.peer(HAND_PEER_KEY), hl.hand_before), device.peer(HAND_PEER_KEY)


def _ping_bob(hl: HostileLab, *, via_hub: bool) -> None:
    """alice reaches bob, through the hub or (``via_hub=False``) directly: the hub's
    counter for alice grows by the pings' volume, or by less than half of it."""
    lab = hl.lab
    count, size = 2, 1000
    before = lab.hub_peer("alice").rx_bytes
    result = lab.run(
        "alice",
        "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", "-s", str(size),
        str(lab.tunnel_ip("bob")),
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"alice cannot reach bob: {result.stdout}"
    grew = lab.hub_peer("alice").rx_bytes - before
    if via_hub:
        assert grew >= count * size, f"alice reached bob, but not through the hub ({grew} bytes)"
    else:
        assert grew < count * size / 2, f"alice->bob crossed the hub ({grew} bytes)"


def _start_hostile(hl: HostileLab, mode: Mode, log_name: str) -> subprocess.Popen[bytes]:
    lab = hl.lab
    bob = f"{lab.public_key('bob')}@{lab.lan_ip('bob')}:51820={lab.tunnel_ip('bob')}/32"
    proc = lab.spawn(
        "hub",
        [
            sys.executable, "-m", "wg_autopeer.lab.hostile",
            "--listen", f"{lab.tunnel_ip('hub')}:{SERVER_PORT}",
            "--mode", mode.value,
            "--hub-key", hl.hub_key,
            "--neighbour", bob,
            "--extra-key", HAND_PEER_KEY,
            "--extra-ip", HAND_PEER_IP,
        ],
        log_name=log_name,
    )  # fmt: skip

    def listening() -> bool:
        assert proc.poll() is None, f"hostile server exited: see {lab.log_path(log_name)}"
        return any("listening" in line for line in _log_lines(lab.log_path(log_name)))

    assert wait_for(listening, timeout=10), f"hostile server not up: {lab.log_path(log_name)}"
    return proc


def _bob_knows_alice(lab: Lab, present: bool) -> None:
    """Configure alice on bob by hand (bob runs no agent here), so that the honest
    offer of the mixed case can handshake; or remove her again."""
    iface = lab.wg_interface("bob")
    if present:
        lab.run(
            "bob",
            "wg", "set", iface, "peer", lab.public_key("alice"),
            "allowed-ips", f"{lab.tunnel_ip('alice')}/32",
            "endpoint", f"{lab.lan_ip('alice')}:51820",
        )  # fmt: skip
    else:
        lab.run("bob", "wg", "set", iface, "peer", lab.public_key("alice"), "remove", check=False)


# --------------------------------------------------------------------------- the cases

PER_PEER = [m for m in Mode if m.per_peer and m is not Mode.MIXED]


def _collect_answers(lab: Lab, mode: Mode, agent_log: str, hostile_log: str) -> list[float]:
    """Make the agent go through ``ANSWERS_WANTED`` answers: the first by itself, the
    rest on ``sync``, each finished with before the next sync (a sync during a request
    would cancel it, and the test would count an answer the agent never saw).
    Returns how long ``status`` took after each."""
    status_times: list[float] = []
    for wanted in range(1, ANSWERS_WANTED + 1):
        if mode.per_peer:
            # Such answers are applied (no line to wait for): the status's contact time moves.
            before = _last_contact(lab) if wanted > 1 else None
            if wanted > 1:
                assert agent_call(lab, "alice", "sync")["ok"]
            done = wait_for(lambda b=before: _last_contact(lab) not in (None, b), timeout=15)
        elif mode in SLOW_MODES:
            if wanted == 1:
                # The first request must run into the agent's own whole-request deadline.
                done = wait_for(lambda: _said(lab, agent_log, SLOW_MODES[mode]) >= 1, timeout=15)
            else:
                # Then a sync must still get through: it abandons the stuck request.
                assert agent_call(lab, "alice", "sync")["ok"]
                done = wait_for(lambda n=wanted: _posts(lab, hostile_log) >= n, timeout=15)
        else:
            line = WHOLE_REFUSALS[mode]
            if wanted > 1 and _said(lab, agent_log, line) < wanted:
                assert agent_call(lab, "alice", "sync")["ok"]
            done = wait_for(lambda n=wanted, t=line: _said(lab, agent_log, t) >= n, timeout=15)
        assert done, f"answer {wanted} never handled: {lab.log_path(agent_log)}"
        status_times.append(_status_time(lab))
    return status_times


def _bob_applied(lab: Lab) -> bool:
    """alice holds bob (the honest offer) at his LAN endpoint and has handshaken with him."""
    peer = lab.device("alice").peer(lab.public_key("bob"))
    return (
        peer is not None
        and peer.endpoint is not None
        and str(peer.endpoint.address) == str(lab.lan_ip("bob"))
        and peer.allowed_ips == (ip_network(f"{lab.tunnel_ip('bob')}/32"),)
        and bool(peer.latest_handshake)
    )


def _quit(lab: Lab, agent: subprocess.Popen[bytes], agent_log: str) -> float:
    """``quit`` over the control socket; the agent must exit 0 in time. Seconds it took."""
    started = time.monotonic()
    assert agent_call(lab, "alice", "quit")["ok"]
    try:
        code = agent.wait(timeout=QUIT_DEADLINE)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"agent still running {QUIT_DEADLINE:g} s after quit") from exc
    assert code == 0, f"agent exited {code}: {lab.log_path(agent_log)}"
    return time.monotonic() - started


def _run_case(hl: HostileLab, mode: Mode) -> None:
    lab = hl.lab
    started = time.monotonic()
    hostile_log, agent_log = f"hostile-{mode.value}", f"agent-alice-{mode.value}"
    mixed = mode is Mode.MIXED
    agent = hostile = None
    try:
        if mixed:
            _bob_knows_alice(lab, True)
        hostile = _start_hostile(hl, mode, hostile_log)
        agent = start_agent(lab, "alice", log_name=agent_log)
        assert wait_for(lambda: _agent_answers(lab), timeout=15), (
            f"agent not up: {lab.log_path(agent_log)}"
        )
        status_times = _collect_answers(lab, mode, agent_log, hostile_log)
        if mixed:
            assert wait_for(lambda: _bob_applied(lab), timeout=10), (
                f"the honest neighbour was not applied: {lab.log_path(agent_log)}"
            )
        _check_alice(hl, frozenset({lab.public_key("bob")}) if mixed else frozenset())
        _ping_bob(hl, via_hub=not mixed)
        status_times.append(_status_time(lab))

        quit_took = _quit(lab, agent, agent_log)
        lab.stop(agent)
        agent = None
        if mixed:
            _bob_knows_alice(lab, False)
        # After quit: nothing of the agent's left, and the hub path intact.
        _check_alice(hl)
        ledger = agent_dirs(lab, "alice")[0] / "ledger.json"
        if ledger.exists():
            assert not any(json.loads(ledger.read_text()).get("interfaces", {}).values()), (
                ledger.read_text()
            )
        _ping_bob(hl, via_hub=True)
        _check_log(hl, mode, agent_log, hostile_log)
        hl.figures[mode.value] = {
            "answers": float(_posts(lab, hostile_log)),
            "status_max": max(status_times),
            "quit": quit_took,
            "case": time.monotonic() - started,
        }
    finally:
        if agent is not None:
            lab.stop(agent, signal.SIGTERM)
        if hostile is not None:
            lab.stop(hostile)
        if mixed:
            _bob_knows_alice(lab, False)
        _restore_alice(hl)


def _check_log(hl: HostileLab, mode: Mode, agent_log: str, hostile_log: str) -> None:
    lab = hl.lab
    lines = _log_lines(lab.log_path(agent_log))
    where = lab.log_path(agent_log)
    assert not any("Traceback" in line for line in lines), f"the agent crashed somewhere: {where}"
    # A key with a newline in it must not forge a log line of its own.
    assert not any("forged line" in line and "refused peer" not in line for line in lines)
    longest = max(len(line) for line in lines)
    assert longest <= MAX_LOG_LINE, f"a {longest}-character log line: {where}"
    posts = _posts(lab, hostile_log)
    assert posts <= MAX_REQUESTS_PER_CASE, f"{posts} requests: the agent spins"
    if mode.per_peer:
        refusals = [line for line in lines if "refused peer " in line]
        expected = _expected_refusals(hl, mode)
        for refused in expected:
            matching = [
                line
                for line in refusals
                if f"refused peer {refused.shown}…: " in line and refused.reason in line
            ]
            assert len(matching) == 1, (
                f"{refused} logged {len(matching)} times over {posts} answers: {refusals}"
            )
        assert len(refusals) == len(expected), refusals
    elif mode in WHOLE_REFUSALS:
        said = _said(lab, agent_log, WHOLE_REFUSALS[mode])
        # One line per answer: never silent, never repeated.
        low = posts - 1 if mode in RETRIED else posts
        assert low <= said <= posts, f"{said} log lines for {posts} answers"
    else:
        said = _said(lab, agent_log, SLOW_MODES[mode])
        assert 1 <= said <= posts, f"{said} log lines for {posts} requests"


@pytest.mark.parametrize("mode", [*PER_PEER, Mode.MIXED], ids=lambda m: m.value)
def test_hostile_offers_are_refused_one_by_one(hostile_lab: HostileLab, mode: Mode) -> None:
    _run_case(hostile_lab, mode)


@pytest.mark.parametrize("mode", list(WHOLE_REFUSALS), ids=lambda m: m.value)
def test_hostile_answer_is_refused_whole_and_changes_nothing(
    hostile_lab: HostileLab, mode: Mode
) -> None:
    _run_case(hostile_lab, mode)


@pytest.mark.parametrize("mode", list(SLOW_MODES), ids=lambda m: m.value)
def test_server_that_never_finishes_leaves_the_agent_responsive(
    hostile_lab: HostileLab, mode: Mode
) -> None:
    _run_case(hostile_lab, mode)


def test_server_answering_at_once_every_time_does_not_make_the_agent_spin(
    hostile_lab: HostileLab,
) -> None:
    lab = hostile_lab.lab
    log_name = "hostile-spin"
    agent = hostile = None
    try:
        hostile = _start_hostile(hostile_lab, Mode.SPIN, log_name)
        agent = start_agent(lab, "alice", log_name="agent-alice-spin")
        assert wait_for(lambda: _posts(lab, log_name) >= 1, timeout=15)
        start_count = _posts(lab, log_name)
        window = 6.0
        # An observation window, not a synchronisation: count what the agent sends in it.
        time.sleep(window)
        count = _posts(lab, log_name) - start_count
        # Paced at one request a second after a few quick answers: never a tight loop.
        assert count <= window + 5, f"{count} requests in {window:g} s"
        hostile_lab.figures["spin"] = {
            "answers": float(count),
            "status_max": _status_time(lab),
            "quit": 0.0,
            "case": window,
        }
        _check_alice(hostile_lab)
        hostile_lab.figures["spin"]["quit"] = _quit(lab, agent, "agent-alice-spin")
        lab.stop(agent)
        agent = None
    finally:
        if agent is not None:
            lab.stop(agent)
        if hostile is not None:
            lab.stop(hostile)
        _restore_alice(hostile_lab)
