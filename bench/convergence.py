"""Convergence: from bob's arrival until alice and bob both hold each other as direct
peers with a completed direct handshake.

Three series, each with the real server and the real agents in a namespace lab:

* **push, LAN appears** — both agents run; bob's link moves from another LAN onto
  alice's (``move_client``), as a laptop joining the home network.
* **push, agent starts** — alice's agent holds its blocking query; bob's agent starts.
* **baseline, agent starts** — the original design (``push = false``,
  ``first_report_delay = 5``, ``interval = 30``: first report 5 s after start, then a
  plain POST every 30 s; no direct-path health check). Its trials last tens of
  seconds, so they run side by side: one lab with one hub and N independent LANs,
  each holding one alice/bob pair, bob started at staggered moments so that the
  phase of alice's 30 s timer is spread evenly over the trials.
* **poll, agent starts** — the same schedule with this agent's health check on, as
  it behaves against a server without blocking queries (in the same lab, more pairs).
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from ipaddress import IPv4Interface, IPv4Network

from bench.common import (
    Distribution,
    Options,
    PartResult,
    Row,
    bench_lab,
    log,
    paired,
    require,
    start_agent_in_mode,
    timed_wait,
    unpaired,
    wait_quietly,
    waiting_queries,
)
from wg_autopeer.lab import ClientSpec, HubSpec, Lab, LanSpec, Topology, default_topology
from wg_autopeer.lab.services import start_server

PART = "Convergence"
TRIAL_TIMEOUT = 30.0
BASELINE_TIMEOUT = 75.0
BASELINE_PERIOD = 30.0
TARGET_MEDIAN = 1.0

HOME = ("lan1", IPv4Interface("192.168.50.11/24"))
AWAY = ("lan2", IPv4Interface("192.168.60.11/24"))


def _stop_agents(lab: Lab, *procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        lab.stop(proc, signal.SIGTERM, timeout=10)


# Samples (a trial that hit its deadline counts at the deadline) and how many did.
Series = tuple[list[float], int]


def push_agent_start(lab: Lab, trials: int) -> Series:
    """bob's agent starts while alice's agent holds its blocking query."""
    samples: list[float] = []
    censored = 0
    for i in range(trials):
        alice = start_agent_in_mode(lab, "alice", "push", log_name=f"conv-start-alice-{i}")
        wait_quietly(lambda: waiting_queries(lab) == 1, 20, "alice's blocking query never waited")
        since = time.monotonic()
        bob = start_agent_in_mode(lab, "bob", "push", log_name=f"conv-start-bob-{i}")
        took = timed_wait(lambda: paired(lab, "alice", "bob"), since, TRIAL_TIMEOUT)
        if took is None:
            censored += 1
            took = TRIAL_TIMEOUT
        samples.append(took)
        log(f"convergence push/agent-start trial {i + 1}/{trials}: {took:.2f} s")
        _stop_agents(lab, bob, alice)
        wait_quietly(lambda: unpaired(lab, "alice", "bob"), 15, "agents left direct peers")
    return samples, censored


def push_lan_appears(lab: Lab, trials: int) -> Series:
    """Both agents run; bob's link moves onto alice's LAN."""
    lab.move_client("bob", AWAY[0], AWAY[1])
    lab.refresh_hub_endpoint("bob")
    alice = start_agent_in_mode(lab, "alice", "push", log_name="conv-lan-alice")
    bob = start_agent_in_mode(lab, "bob", "push", log_name="conv-lan-bob")
    samples: list[float] = []
    censored = 0
    try:
        for i in range(trials):
            wait_quietly(lambda: waiting_queries(lab) == 2, 20, "the agents never both waited")
            since = time.monotonic()
            lab.move_client("bob", HOME[0], HOME[1])
            took = timed_wait(lambda: paired(lab, "alice", "bob"), since, TRIAL_TIMEOUT)
            if took is None:
                censored += 1
                took = TRIAL_TIMEOUT
            samples.append(took)
            log(f"convergence push/LAN-appears trial {i + 1}/{trials}: {took:.2f} s")
            lab.move_client("bob", AWAY[0], AWAY[1])
            wait_quietly(lambda: unpaired(lab, "alice", "bob"), 15, "bob's departure not seen")
    finally:
        _stop_agents(lab, bob, alice)
        lab.move_client("bob", HOME[0], HOME[1])
        lab.refresh_hub_endpoint("bob")
    return samples, censored


def pairs_topology(prefix: str, pairs: int) -> Topology:
    """One hub; LAN ``lan<i>`` behind router ``r<i>`` holds ``a<i>`` and ``b<i>``."""
    lans = []
    clients = []
    for i in range(pairs):
        net = IPv4Network(f"192.168.{100 + i}.0/24")
        lans.append(
            LanSpec(
                name=f"lan{i}",
                router=f"r{i}",
                wan=IPv4Interface(f"203.0.113.{10 + i}/24"),
                gateway=IPv4Interface(f"{net.network_address + 1}/24"),
            )
        )
        for role, host, tunnel in (("a", 10, 2 + 2 * i), ("b", 11, 3 + 2 * i)):
            clients.append(
                ClientSpec(
                    f"{role}{i}",
                    f"lan{i}",
                    IPv4Interface(f"{net.network_address + host}/24"),
                    IPv4Interface(f"10.99.0.{tunnel}/24"),
                )
            )
    topology = Topology(prefix=prefix, hub=HubSpec(), lans=tuple(lans), clients=tuple(clients))
    topology.validate()
    return topology


def polling_pairs(options: Options, modes: list[str], seed: int = 6) -> dict[str, Series]:
    """One pair per entry of ``modes``, side by side: every a<i> starts at once, each b<i>
    at its own phase of a<i>'s 30 s timer (stratified over one period per mode)."""
    rng = random.Random(seed)
    phases: list[float] = [0.0] * len(modes)
    for mode in sorted(set(modes)):
        members = [i for i, m in enumerate(modes) if m == mode]
        slot = BASELINE_PERIOD / len(members)
        spread = [(k + rng.random()) * slot for k in range(len(members))]
        rng.shuffle(spread)
        for i, phase in zip(members, spread, strict=True):
            phases[i] = phase
    pairs = len(modes)
    with bench_lab(lambda prefix: pairs_topology(prefix, pairs), options) as lab:
        start_server(lab)
        for i, mode in enumerate(modes):
            start_agent_in_mode(lab, f"a{i}", mode, log_name=f"conv-{mode}-a{i}")
        # Past alice's first report (5 s after start), so each phase is one of her timer.
        first = time.monotonic() + 6.0
        starts: dict[int, float] = {}
        results: dict[int, float] = {}
        pending = set(range(pairs))
        while pending:
            now = time.monotonic()
            for i in sorted(pending - set(starts)):
                if now >= first + phases[i]:
                    starts[i] = time.monotonic()
                    start_agent_in_mode(lab, f"b{i}", modes[i], log_name=f"conv-{modes[i]}-b{i}")
            for i in sorted(set(starts) & pending):
                if paired(lab, f"a{i}", f"b{i}"):
                    results[i] = time.monotonic() - starts[i]
                    pending.discard(i)
                    log(f"convergence {modes[i]} pair {i}: {results[i]:.2f} s")
                elif time.monotonic() - starts[i] > BASELINE_TIMEOUT:
                    pending.discard(i)
                    log(f"convergence {modes[i]} pair {i}: no direct path in {BASELINE_TIMEOUT} s")
            time.sleep(0.02)
    series: dict[str, Series] = {}
    for mode in set(modes):
        members = [i for i, m in enumerate(modes) if m == mode]
        done = [results[i] for i in members if i in results]
        missed = len(members) - len(done)
        series[mode] = (done + [BASELINE_TIMEOUT] * missed, missed)
    return series


def run(options: Options) -> PartResult:
    trials = options.trials(10, 3)
    result = PartResult(PART)
    with bench_lab(default_topology, options) as lab:
        start_server(lab)
        lan_samples, lan_censored = push_lan_appears(lab, trials)
        start_samples, start_censored = push_agent_start(lab, trials)
    polls = options.trials(5, 2)
    polling = polling_pairs(options, ["baseline"] * trials + ["poll"] * polls)
    base_samples, base_censored = polling["baseline"]
    poll_samples, poll_censored = polling["poll"]

    lan = Distribution.of(lan_samples, censored=lan_censored)
    start = Distribution.of(start_samples, censored=start_censored)
    base = Distribution.of(base_samples, censored=base_censored)
    poll = Distribution.of(poll_samples, censored=poll_censored)
    require(lan.n > 0 and start.n > 0 and base.n > 0, "convergence produced no sample")
    target = f"median <= {TARGET_MEDIAN:g} s"
    result.rows = [
        Row(PART, "push: bob's LAN address appears", lan.brief(), target, lan.median <= 1.0),
        Row(PART, "push: bob's agent starts", start.brief(), target, start.median <= 1.0),
        Row(PART, "baseline (5 s, then every 30 s): agent starts", base.brief()),
        Row(
            PART,
            "this agent polling a plain-POST server (health check on): agent starts",
            f"{poll.n - poll.censored} of {poll.n} pairs direct within {BASELINE_TIMEOUT:g} s; "
            + poll.brief(),
        ),
        Row(
            PART,
            "baseline median / push median (agent starts)",
            f"{base.median / start.median:.0f}x",
        ),
    ]
    result.data = {
        "push_lan_appears": lan,
        "push_agent_starts": start,
        "baseline_agent_starts": base,
        "poll_mode_agent_starts": poll,
        "definition": "seconds from the event until both hold each other as direct peers "
        "at their LAN address with a completed handshake (device polled every 10 ms)",
    }
    return result
