"""Path switching as a user feels it: probes lost by a continuous ping, per case.

alice pings bob's tunnel address every 100 ms through each trial. Cases:

* **join, push** — this server; both agents start; lost probes until and after
  both route directly; time from agent start to both routed.
* **join, wireguard-web, port-keeping NAT** — the polling wireguard-web-like
  server (lab/wgweb.py; it offers the NAT-seen port, wrong for one of the two),
  agents polling every 5 s.
* **never works: client isolation** (this server) and **never works:
  wireguard-web behind a port-randomising NAT** — lost probes over 20 s, from
  agent start: a path that never works must cost nothing.
* **dies silently** — direct, then the LAN starts isolating clients: the longest
  run of lost probes (target: <= keepalive + 1 s).
* **seed's agent as neighbour** — bob runs a seed-like agent (routes at once, no
  listen port): lost probes and time to direct.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from bench.common import Distribution, Options, PartResult, Row, bench_lab, log
from wg_autopeer.lab import Lab, Topology, default_topology
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.pingwatch import ContinuousPing, PingResult
from wg_autopeer.lab.services import (
    direct_both_ways,
    direct_either_way,
    start_agent,
    start_seed_agent,
    start_server,
    start_wgweb,
)
from wg_autopeer.lab.topology import default_with_lan

PART = "Path switching"
PROBE = 0.1
KEEPALIVE = 3.0
NEVER_WINDOW = 20.0
JOIN_TIMEOUT = 40.0


@dataclasses.dataclass
class Trial:
    lost: int
    longest_outage: float
    to_direct: float | None


def _ping(lab: Lab) -> ContinuousPing:
    ping = ContinuousPing(lab, "alice", lab.tunnel_ip("bob"), interval=PROBE)
    wait_for(lambda: lab.ping("alice", lab.tunnel_ip("bob"), timeout=1), timeout=5)
    return ping


def _join(options: Options, build: Callable[[str], Topology], kind: str) -> Trial:
    with bench_lab(build, options) as lab:
        ping = _ping(lab)
        if kind == "wgweb":
            start_wgweb(lab)
            agents = ("--interval", "5")
        else:
            start_server(lab)
            agents = ()
        started = time.monotonic()
        start_agent(lab, "alice", *agents)
        if kind == "seed":
            start_seed_agent(lab, "bob", interval=5)
        else:
            start_agent(lab, "bob", *agents)
        direct = wait_for(
            lambda: direct_both_ways(lab, "alice", "bob"), timeout=JOIN_TIMEOUT, interval=0.05
        )
        to_direct = time.monotonic() - started if direct else None
        time.sleep(2.0)
        result = ping.stop()
    return Trial(result.lost, result.longest_outage, to_direct)


def _never(options: Options, build: Callable[[str], Topology], kind: str) -> Trial:
    with bench_lab(build, options) as lab:
        ping = _ping(lab)
        if kind == "wgweb":
            start_wgweb(lab)
            agents: tuple[str, ...] = ("--interval", "5")
        else:
            start_server(lab)
            agents = ()
        start_agent(lab, "alice", *agents)
        start_agent(lab, "bob", *agents)
        ever = wait_for(
            lambda: direct_either_way(lab, "alice", "bob"), timeout=NEVER_WINDOW, interval=0.1
        )
        result = ping.stop()
    return Trial(result.lost, result.longest_outage, 0.0 if ever else None)


def _dies(options: Options) -> Trial:
    with bench_lab(default_topology, options) as lab:
        start_server(lab)
        start_agent(lab, "alice")
        start_agent(lab, "bob")
        wait_for(lambda: direct_both_ways(lab, "alice", "bob"), timeout=JOIN_TIMEOUT)
        ping = _ping(lab)
        time.sleep(1.0)
        started = time.monotonic()
        lab.set_isolation("lan1", True)
        back = wait_for(
            lambda: not direct_either_way(lab, "alice", "bob"), timeout=15, interval=0.05
        )
        to_hub = time.monotonic() - started if back else None
        time.sleep(1.0)
        result: PingResult = ping.stop()
    return Trial(result.lost, result.longest_outage, to_hub)


def run(options: Options) -> PartResult:
    trials = options.trials(3, 1)
    part = PartResult(PART)
    cases: list[tuple[str, Callable[[], Trial], str]] = [
        ("join, push (this server)", lambda: _join(options, default_topology, "push"), "join"),
        (
            "join, wireguard-web, port-keeping NAT",
            lambda: _join(options, default_topology, "wgweb"),
            "join",
        ),
        (
            "join, seed's agent as neighbour",
            lambda: _join(options, default_topology, "seed"),
            "join",
        ),
        (
            "never works: client isolation",
            lambda: _never(options, default_with_lan("lan1", isolated=True), "push"),
            "never",
        ),
        (
            "never works: wireguard-web, port-randomising NAT",
            lambda: _never(options, default_with_lan("lan1", random_ports=True), "wgweb"),
            "never",
        ),
        ("dies silently (isolation switched on)", lambda: _dies(options), "dies"),
    ]
    for name, trial, kind in cases:
        results = []
        for n in range(trials):
            log(f"{PART}: {name}, trial {n + 1}/{trials}")
            results.append(trial())
        part.data[name] = [dataclasses.asdict(r) for r in results]
        lost = Distribution.of([float(r.lost) for r in results])
        outage = Distribution.of([r.longest_outage for r in results])
        timed = [r.to_direct for r in results if r.to_direct is not None]
        if kind == "join":
            part.rows.append(
                Row(PART, f"{name}: lost probes", lost.brief("probes", digits=0), "a few (<= 5)",
                    lost.maximum <= 5)
            )  # fmt: skip
            part.rows.append(
                Row(PART, f"{name}: agent start to both direct", Distribution.of(timed).brief()
                    + (f", {trials - len(timed)} never" if len(timed) < trials else ""))
            )  # fmt: skip
        elif kind == "never":
            part.rows.append(
                Row(
                    PART,
                    f"{name}: lost probes in {NEVER_WINDOW:g} s",
                    lost.brief("probes", digits=0),
                    "none",
                    lost.maximum == 0,
                )
            )
            part.rows.append(
                Row(PART, f"{name}: trials that ever moved traffic", f"{len(timed)} of {trials}")
            )
        else:
            part.rows.append(
                Row(
                    PART,
                    f"{name}: longest outage",
                    outage.brief(),
                    f"<= keepalive + 1 s = {KEEPALIVE + 1:g} s",
                    outage.maximum <= KEEPALIVE + 1,
                )
            )
            part.rows.append(
                Row(PART, f"{name}: routes back on the hub after", Distribution.of(timed).brief())
            )
    return part
