"""Soak (issue 7, part 5): clients join, leave and roam between two LANs for a while, with
the real server and agents on real wireguard-go, and a checker after every step.

Each step does one thing at random (seeded, the seed is printed): move a client's link
to the other LAN, stop an agent (SIGTERM: the client leaves), or start a stopped one (it
joins). Then the checker polls, with a deadline, until the lab is sound again:

* every pair of clients reaches the other through the tunnel (direct or via the hub);
* every direct peer on every client is one it should have (a client on the same LAN,
  both agents running, by the lab's ground truth), at that client's LAN address; a
  stopped agent's client has none.

A step after which the lab is not sound within the deadline is a failed check. Then the
checker also waits a little for every pair that should peer directly to do so: that is
measured, not required (an agent backs off from a peer that failed, and the back-off of
the two sides is not coordinated). At the end every agent is stopped and no client may
keep a direct peer. The figures are printed at the end of the run.

Duration: ``WG_AUTOPEER_SOAK_SECONDS`` (default 120; the issue's 10-minute soak is
``WG_AUTOPEER_SOAK_SECONDS=600 pytest tests/test_soak_lab.py``); seed:
``WG_AUTOPEER_SOAK_SEED``.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, ip_network
from typing import Any

import pytest

from wg_autopeer.agent.localapi import AgentNotRunning
from wg_autopeer.lab import Lab
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import agent_call, direct_peers, start_agent, start_server

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("WG_AUTOPEER_SOAK_SECONDS", "120"))
CONVERGE_DEADLINE_S = 30.0
COMPLETE_WAIT_S = 12.0
SLOW_STEP_S = 5.0
NO_AGENT = " (agent stopped)"
CLIENTS = ("alice", "bob", "carol")
LANS = ("lan1", "lan2")
# Each client's host number on whichever LAN it moves to; distinct from the addresses the
# default lab starts with (.10, .11 on lan1 and .10 on lan2), so no move ever collides.
HOST_NUMBER = {"alice": 20, "bob": 21, "carol": 22}


@dataclass
class Observation:
    """What the checker saw; converged when every list is empty."""

    leaked: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        """Nobody holds a peer it should not, and everyone reaches everyone."""
        return not (self.leaked or self.unreachable)


@dataclass
class SoakReport:
    """The figures, printed in pytest's terminal summary."""

    seed: int = 0
    steps: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    failures: list[str] = field(default_factory=list)
    leaked_at_end: list[str] = field(default_factory=list)
    converge_s: list[float] = field(default_factory=list)
    # Per kind of step (move, stop, start): seconds to converge.
    converge_by_kind: dict[str, list[float]] = field(default_factory=dict)
    # Steps that took over SLOW_STEP_S to converge, and what was pending 2 s into them.
    slow: list[str] = field(default_factory=list)
    pings: int = 0
    elapsed: float = 0.0
    # Steps after which every pair that should peer directly did, within COMPLETE_WAIT_S.
    complete: int = 0
    incomplete: list[str] = field(default_factory=list)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        steps = sum(self.steps.values())
        write = terminalreporter.write_line
        terminalreporter.write_sep("-", f"soak: {steps} steps in {self.elapsed:.0f} s")
        write(f"  seed {self.seed}; steps: {dict(sorted(self.steps.items()))}")
        write(
            f"  checks {self.checks}, failed {len(self.failures)}, pings {self.pings}, "
            f"direct peers left after the last stop {len(self.leaked_at_end)}"
        )
        if self.converge_s:
            ordered = sorted(self.converge_s)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            write(
                f"  convergence after a step: median {statistics.median(ordered):.2f} s, "
                f"p95 {p95:.2f} s, max {ordered[-1]:.2f} s"
            )
        write(
            f"  every due direct pair up within {COMPLETE_WAIT_S:g} s of soundness: "
            f"{self.complete} of {self.complete + len(self.incomplete)} steps"
        )
        for kind, times in sorted(self.converge_by_kind.items()):
            write(f"    {kind}: median {statistics.median(times):.2f} s, max {max(times):.2f} s")
        write(f"  steps slower than {SLOW_STEP_S:g} s to be sound: {len(self.slow)}")
        for line in self.slow[:10]:
            write(f"    {line}")
        for line in self.incomplete[:10]:
            write(f"  incomplete: {line}")
        for failure in self.failures[:10]:
            write(f"  FAILED {failure}")


class Soak:
    """The lab, its agents, and the ground truth of who should peer with whom."""

    def __init__(self, lab: Lab, report: SoakReport) -> None:
        self.lab = lab
        self.report = report
        self.agents: dict[str, subprocess.Popen[bytes] | None] = dict.fromkeys(CLIENTS)
        self.starts: Counter[str] = Counter()

    def lan_of(self, host: str) -> str:
        return self.lab.topology.client(host).lan

    def running(self, host: str) -> bool:
        return self.agents[host] is not None

    # -- steps -------------------------------------------------------------------------------

    def start(self, host: str) -> None:
        self.starts[host] += 1
        log_name = f"agent-{host}-{self.starts[host]}"
        proc = start_agent(self.lab, host, log_name=log_name)
        self.agents[host] = proc

        def answering() -> bool:
            assert proc.poll() is None, f"{host}'s agent died: see {self.lab.log_path(log_name)}"
            try:
                agent_call(self.lab, host, "status")
            except AgentNotRunning:
                return False
            return True

        # Started means answering on its control socket (its signal handlers are set by then).
        assert wait_for(answering, timeout=15.0, interval=0.05), f"{host}'s agent never answered"

    def stop(self, host: str) -> None:
        proc = self.agents[host]
        assert proc is not None
        status = self.lab.stop(proc, signal.SIGTERM, timeout=10)
        self.agents[host] = None
        assert status == 0, f"{host}'s agent exited with {status} on SIGTERM"

    def move(self, host: str) -> str:
        lan = next(name for name in LANS if name != self.lan_of(host))
        gateway = self.lab.topology.lan(lan).gateway
        address = IPv4Interface(f"{gateway.network[HOST_NUMBER[host]]}/{gateway.network.prefixlen}")
        self.lab.move_client(host, lan, address)
        return lan

    def random_step(self, rng: random.Random) -> str:
        stopped = [h for h in CLIENTS if not self.running(h)]
        running = [h for h in CLIENTS if self.running(h)]
        choices = [("move", h) for h in CLIENTS]
        choices += [("stop", h) for h in running]
        # A stopped agent comes back more often than a running one stops: mostly running.
        choices += [("start", h) for h in stopped for _ in range(2)]
        action, host = rng.choice(choices)
        if action == "move":
            state = "" if self.running(host) else NO_AGENT
            return f"move {host} to {self.move(host)}{state}"
        if action == "stop":
            self.stop(host)
        else:
            self.start(host)
        return f"{action} {host}"

    # -- checking ----------------------------------------------------------------------------

    def should_peer(self, host: str, other: str) -> bool:
        return (
            host != other
            and self.lan_of(host) == self.lan_of(other)
            and self.running(host)
            and self.running(other)
        )

    def observe(self) -> Observation:
        seen = Observation()
        lab = self.lab
        key_host = {lab.public_key(h): h for h in CLIENTS}
        for host in CLIENTS:
            peers = direct_peers(lab, host)
            for key, peer in peers.items():
                other = key_host.get(key)
                if other is None or not self.should_peer(host, other):
                    seen.leaked.append(f"{host} holds {other or key[:8]}")
                elif peer.endpoint is None or str(peer.endpoint.address) != str(lab.lan_ip(other)):
                    seen.leaked.append(f"{host} holds {other} at {peer.endpoint}")
                elif peer.allowed_ips != (ip_network(f"{lab.tunnel_ip(other)}/32"),):
                    seen.leaked.append(f"{host} routes {peer.allowed_ips} to {other}")
            for other in CLIENTS:
                if self.should_peer(host, other) and lab.public_key(other) not in peers:
                    seen.missing.append(f"{host} lacks {other}")
        for host in CLIENTS:
            for other in CLIENTS:
                if host == other:
                    continue
                self.report.pings += 1
                if not lab.ping(host, lab.tunnel_ip(other), timeout=0.5):
                    seen.unreachable.append(f"{host} -> {other}")
        return seen

    def check(self, step: str) -> None:
        """Poll until sound; a deadline passed is a failed check (recorded). Then give
        the due direct pairs a moment, and count whether they came up."""
        started = time.monotonic()
        last = Observation()
        pending_at_2s = ""

        def converged() -> bool:
            nonlocal last, pending_at_2s
            last = self.observe()
            if not pending_at_2s and time.monotonic() - started > 2.0:
                pending_at_2s = str(last)
            return last.sound

        ok = wait_for(converged, timeout=CONVERGE_DEADLINE_S, interval=0.2)
        self.report.checks += 1
        if ok:
            took = time.monotonic() - started
            self.report.converge_s.append(took)
            kind = step.split(" ", 1)[0]
            if step.endswith(NO_AGENT):
                # Without an agent nobody re-applies the hub endpoint after the roam, and
                # wireguard-go keeps its stale source address: a different, slower case.
                kind += NO_AGENT
            self.report.converge_by_kind.setdefault(kind, []).append(took)
            if took > SLOW_STEP_S:
                self.report.slow.append(f"'{step}' {took:.1f} s; at 2 s {pending_at_2s}")
        where = {h: self.lan_of(h) + ("" if self.running(h) else " (stopped)") for h in CLIENTS}
        if not ok:
            self.report.failures.append(f"after '{step}' ({where}): {last}")
            return
        if wait_for(lambda: not self.observe().missing, timeout=COMPLETE_WAIT_S, interval=0.5):
            self.report.complete += 1
        else:
            self.report.incomplete.append(f"after '{step}': {self.observe().missing}")


@pytest.fixture
def soak_report(pytestconfig: pytest.Config) -> SoakReport:
    report = SoakReport()
    pytestconfig.pluginmanager.register(report, f"wg-autopeer-soak-{id(report)}")
    return report


def test_joins_leaves_and_roams_never_break_reachability_nor_leak_a_peer(
    lab_factory: Callable[..., Lab], soak_report: SoakReport
) -> None:
    seed = int(
        os.environ.get("WG_AUTOPEER_SOAK_SEED", str(random.SystemRandom().randrange(1 << 32)))
    )
    rng = random.Random(seed)
    soak_report.seed = seed
    lab = lab_factory(base="sk")
    start_server(lab)
    soak = Soak(lab, soak_report)
    for host in CLIENTS:
        soak.start(host)
    soak.check("start")

    began = time.monotonic()
    try:
        while time.monotonic() - began < SOAK_SECONDS:
            step = soak.random_step(rng)
            soak_report.steps[step.split(" ", 1)[0]] += 1
            soak.check(step)
            # Several failures in a row mean the lab is wedged: stop early, report them all.
            assert len(soak_report.failures) < 5, soak_report.failures
        for host in CLIENTS:
            if soak.running(host):
                soak.stop(host)
        soak_report.leaked_at_end = [
            f"{host} holds {len(direct_peers(lab, host))}"
            for host in CLIENTS
            if direct_peers(lab, host)
        ]
    finally:
        soak_report.elapsed = time.monotonic() - began

    assert not soak_report.failures, f"seed {seed}: " + "; ".join(soak_report.failures)
    assert not soak_report.leaked_at_end, soak_report.leaked_at_end
    # The hub path survived everything: every client still reaches every other.
    for host in CLIENTS:
        for other in CLIENTS:
            if host != other:
                assert lab.ping(host, lab.tunnel_ip(other), count=2, timeout=1.0)
