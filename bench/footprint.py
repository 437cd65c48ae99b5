"""Agent footprint: memory, CPU and wake-ups of an idle agent with 2 WireGuard interfaces
and 10 direct peers; WireGuard writes when nothing changes; how fast it starts and how
fast ``wg-autopeer status`` answers. Every target of issue 13's agent part, in one run.

The lab: one LAN holding alice and ten neighbours n0…n9, and a second WireGuard
network ``t2`` (a second device on the hub, with its own server) joining alice and
n5…n9. n0…n4 run their agent on the first network only, n5…n9 on the second only,
so alice — whose agent manages both of her interfaces — ends up with five real,
handshaking direct peers on each.

* Agent start to first report: alice's agent is started a few times; from the moment
  it is spawned (wall clock) to the last of its two interfaces' first answered report
  (``status`` → ``last_contact``). The last start stays.
* Once all ten paths are proven (routes on the direct peers), alice's agent is left
  alone: RSS, CPU seconds and voluntary context switches of every thread of her agent
  process (each one a wake-up of some thread; involuntary ones are preemptions by
  other load, shown apart) over a window in which nothing at all asks anything of it.
* Then a window with a re-sync requested every 10 s: the agent's own count of
  WireGuard writes (``status`` → ``writes``), as its path watch judges every path.
* ``wg-autopeer status`` against her running agent: wall time of the whole command,
  interpreter start included, from this process.
* Then alice's agent in polling mode, where every re-sync is a full request, answer,
  safety filter and reconcile: writes over ten such re-syncs of an unchanged LAN.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from bench.common import (
    Distribution,
    Options,
    PartResult,
    ProcSample,
    Row,
    agent_reported,
    agent_status,
    bench_lab,
    log,
    read_device,
    require,
    sample_process,
    start_agent_in_mode,
    wait_quietly,
)
from wg_autopeer.lab import ClientSpec, HubSpec, Lab, LanSpec, Topology
from wg_autopeer.lab.services import (
    SERVER_PORT,
    agent_call,
    agent_dirs,
    start_agent,
    start_server,
)

PART = "Agent footprint"
NEIGHBOURS = 10
# Issue 13's targets for the agent.
RSS_TARGET_MIB = 40.0
WAKEUPS_TARGET = 20.0
STATUS_TARGET = 0.15
FIRST_REPORT_TARGET = 0.4
SECOND = "t2"
SECOND_HUB = IPv4Interface("10.98.0.1/24")
SECOND_PORT = 51821


def footprint_topology(prefix: str) -> Topology:
    lan = LanSpec(
        name="lan1",
        router="r1",
        wan=IPv4Interface("203.0.113.10/24"),
        gateway=IPv4Interface("192.168.50.1/24"),
    )
    clients = [
        ClientSpec(
            "alice", "lan1", IPv4Interface("192.168.50.10/24"), IPv4Interface("10.99.0.2/24")
        )
    ]
    clients += [
        ClientSpec(
            f"n{i}",
            "lan1",
            IPv4Interface(f"192.168.50.{20 + i}/24"),
            IPv4Interface(f"10.99.0.{10 + i}/24"),
        )
        for i in range(NEIGHBOURS)
    ]
    topology = Topology(prefix=prefix, hub=HubSpec(), lans=(lan,), clients=tuple(clients))
    topology.validate()
    return topology


def start_second_server(lab: Lab, interface: str) -> None:
    hub = lab.topology.hub.name
    lab.spawn(
        hub,
        [
            sys.executable, "-m", "wg_autopeer", "server",
            "--interface", interface, "--db", ":memory:",
            "--listen", f"{SECOND_HUB.ip}:{SERVER_PORT}",
        ],
        log_name="server-t2",
    )  # fmt: skip

    def healthy() -> bool:
        result = lab.run(
            hub,
            "curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}",
            f"http://{SECOND_HUB.ip}:{SERVER_PORT}/healthz",
            check=False,
        )  # fmt: skip
        return result.stdout.strip() == "200"

    wait_quietly(healthy, 15, "the second server never became healthy")


def direct_up(interfaces: list[str], hub_keys: set[str]) -> int:
    """Direct peers with a handshake over alice's interfaces."""
    count = 0
    for iface in interfaces:
        for peer in read_device(iface).peers:
            if peer.public_key not in hub_keys and peer.latest_handshake:
                count += 1
    return count


def writes(lab: Lab) -> int:
    return int(agent_status(lab, "alice")["writes"])


def last_contacts(lab: Lab) -> list[float]:
    return [float(i.get("last_contact") or 0) for i in agent_status(lab, "alice")["interfaces"]]


def run(options: Options) -> PartResult:
    window = 15.0 if options.quick else 60.0
    result = PartResult(PART)
    with bench_lab(footprint_topology, options) as lab:
        second = {f"n{i}": IPv4Interface(f"10.98.0.{3 + i}/24") for i in range(5, NEIGHBOURS)}
        tunnel = lab.add_tunnel(
            SECOND, SECOND_HUB, {"alice": IPv4Interface("10.98.0.2/24"), **second}, SECOND_PORT
        )
        topology = lab.topology
        start_server(lab)
        start_second_server(lab, tunnel.interface(topology, topology.hub.name))
        for i in range(NEIGHBOURS):
            host = f"n{i}"
            iface = lab.wg_interface(host) if i < 5 else tunnel.interface(topology, host)
            start_agent(lab, host, "--interface", iface, log_name=f"fp-{host}")
        interfaces = [lab.wg_interface("alice"), tunnel.interface(topology, "alice")]
        hub_keys = {lab.public_key(topology.hub.name), tunnel.public_key(topology.hub.name)}
        first_reports, alice = measure_first_reports(lab, options.trials(5, 2))
        wait_quietly(
            lambda: direct_up(interfaces, hub_keys) == NEIGHBOURS and all_routed(lab),
            60,
            "alice never had 10 proven direct paths",
        )
        # Let start-up work (first keepalives, imports done lazily) pass before measuring.
        time.sleep(3.0)
        log(f"footprint: alice has {NEIGHBOURS} direct peers; idle windows of {window:g} s")
        idle = measure_idle(alice.pid, window)
        resync = measure_resyncs(lab, alice.pid, window)
        status_times = measure_status(lab, options.trials(20, 5))
        require(direct_up(interfaces, hub_keys) == NEIGHBOURS, "a direct peer went away")
        lab.stop(alice, signal.SIGTERM, timeout=10)

        poller = start_agent_in_mode(lab, "alice", "poll", log_name="fp-alice-poll")
        wait_quietly(
            lambda: direct_up(interfaces, hub_keys) == NEIGHBOURS,
            60,
            "alice (polling) never had 10 handshaking direct peers",
        )
        full = measure_full_resyncs(lab, options.trials(10, 3))
        lab.stop(poller, signal.SIGTERM, timeout=10)

    per_minute = 60.0 / idle["seconds"]
    rss_mib = idle["rss_kib"] / 1024
    wakeups = idle["voluntary"] * per_minute
    status = Distribution.of(status_times)
    first = Distribution.of(first_reports)
    result.rows = [
        Row(
            PART,
            "RSS, idle, 2 interfaces, 10 direct peers",
            f"{rss_mib:.1f} MiB",
            f"<= {RSS_TARGET_MIB:g} MiB",
            rss_mib <= RSS_TARGET_MIB,
        ),
        Row(
            PART,
            f"CPU over {idle['seconds']:.0f} s idle",
            f"{idle['cpu_seconds']:.2f} s ({100 * idle['cpu_seconds'] / idle['seconds']:.2f} %)",
        ),
        Row(
            PART,
            "wake-ups per minute, idle (voluntary context switches, all threads)",
            f"{wakeups:.0f} (+{idle['involuntary'] * per_minute:.0f} preemptions by other load)",
            f"<= {WAKEUPS_TARGET:g}",
            wakeups <= WAKEUPS_TARGET,
        ),
        Row(
            PART,
            "WireGuard writes while idle (paths judged all along, a re-sync every 10 s)",
            f"{resync['writes']} in {resync['seconds']:.0f} s ({resync['resyncs']} re-syncs)",
            "0",
            resync["writes"] == 0,
        ),
        Row(
            PART,
            "WireGuard writes per full re-sync, nothing changed (polling mode)",
            f"{full['writes'] / full['resyncs']:.2f} ({full['writes']} in {full['resyncs']})",
            "0",
            full["writes"] == 0,
        ),
        Row(
            PART,
            "`wg-autopeer status` wall time, whole command",
            status.brief(),
            f"median <= {STATUS_TARGET:g} s",
            status.median <= STATUS_TARGET,
        ),
        Row(
            PART,
            "agent start to first report (both interfaces answered)",
            first.brief(),
            f"median <= {FIRST_REPORT_TARGET:g} s",
            first.median <= FIRST_REPORT_TARGET,
        ),
    ]
    result.data = {
        "idle": idle,
        "resync_window": resync,
        "full_resyncs": full,
        "status_seconds": status,
        "first_report_seconds": first,
        "neighbours": NEIGHBOURS,
    }
    return result


def all_routed(lab: Lab) -> bool:
    """Every direct peer of alice's proven, its routes on it (nothing left to write)."""
    try:
        interfaces = agent_status(lab, "alice")["interfaces"]
    except Exception:
        return False
    peers = [p for i in interfaces for p in i.get("direct_peers") or []]
    return len(peers) == NEIGHBOURS and all(p.get("routed") for p in peers)


def answered_since(lab: Lab, started: float) -> float | None:
    """When alice's agent had an answer from the server on every interface, all of them
    at or after ``started`` (wall clock), from one status read; None until then."""
    try:
        interfaces = agent_status(lab, "alice")["interfaces"]
    except Exception:
        return None
    contacts = [
        float(i.get("last_contact") or 0)
        for i in interfaces
        if str(i.get("last_outcome", "")).startswith(("ok", "no change"))
    ]
    if len(contacts) != len(interfaces) or len(contacts) < 2 or min(contacts) < started:
        return None
    return max(contacts)


def measure_first_reports(lab: Lab, trials: int) -> tuple[list[float], Any]:
    """Start alice's agent ``trials`` times: spawn to the last interface's first answer.
    The last one is left running."""
    # Her neighbours' own start-up (ten agents at once) is not hers to wait for.
    for i in range(NEIGHBOURS):
        wait_quietly(lambda i=i: agent_reported(lab, f"n{i}"), 60, f"n{i} never reported")  # type: ignore[misc]
    samples: list[float] = []
    for trial in range(trials):
        started = time.time()
        agent = start_agent_in_mode(lab, "alice", "push", log_name="fp-alice")
        wait_quietly(
            lambda started=started: answered_since(lab, started) is not None,  # type: ignore[misc]
            30,
            "alice's agent never had an answer",
        )
        answered = answered_since(lab, started)
        assert answered is not None
        samples.append(answered - started)
        if trial < trials - 1:
            lab.stop(agent, signal.SIGTERM, timeout=10)
            # Her neighbours drop her (she left); let that settle before the next start.
            time.sleep(2.0)
    return samples, agent


def measure_status(lab: Lab, count: int) -> list[float]:
    """Wall time of ``wg-autopeer status`` (the installed command) against alice's agent."""
    _, runtime_dir = agent_dirs(lab, "alice")
    command = [str(Path(sys.executable).with_name("wg-autopeer")), "status"]
    samples = []
    for _ in range(count):
        started = time.monotonic()
        subprocess.run(
            [*command, "--runtime-dir", str(runtime_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
        samples.append(time.monotonic() - started)
    return samples


def measure_idle(pid: int, window: float) -> dict[str, Any]:
    """Nothing asks anything of the agent for ``window`` seconds."""
    start: ProcSample = sample_process(pid)
    time.sleep(window)
    end = sample_process(pid)
    return {
        "seconds": end.at - start.at,
        "rss_kib": end.rss_kib,
        "cpu_seconds": end.cpu_seconds - start.cpu_seconds,
        "switches": end.switches - start.switches,
        "voluntary": end.voluntary_switches - start.voluntary_switches,
        "involuntary": end.involuntary_switches - start.involuntary_switches,
    }


def measure_resyncs(lab: Lab, pid: int, window: float) -> dict[str, Any]:
    """WireGuard writes over ``window`` seconds with a re-sync requested every 10 s."""
    before_writes = writes(lab)
    start = sample_process(pid)
    resyncs = 0
    deadline = start.at + window
    next_sync = start.at + 10.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_sync:
            agent_call(lab, "alice", "sync")
            resyncs += 1
            next_sync += 10.0
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    end = sample_process(pid)
    return {
        "seconds": end.at - start.at,
        "writes": writes(lab) - before_writes,
        "resyncs": resyncs,
        "voluntary": end.voluntary_switches - start.voluntary_switches,
    }


def measure_full_resyncs(lab: Lab, count: int) -> dict[str, int]:
    """``count`` re-syncs of the polling agent, each waited for (its last contact moves)."""
    # The first scheduled report (5 s after start) settles what there is to add, and
    # the paths it adds are proven (their routes moved) before counting starts.
    wait_quietly(lambda: all(c > 0 for c in last_contacts(lab)), 30, "no first report")
    wait_quietly(lambda: all_routed(lab), 60, "alice's paths were never all proven")
    before = writes(lab)
    for _ in range(count):
        seen = last_contacts(lab)
        agent_call(lab, "alice", "sync")
        wait_quietly(
            lambda seen=seen: all(  # type: ignore[misc]
                now > then for now, then in zip(last_contacts(lab), seen, strict=True)
            ),
            15,
            "a re-sync never completed",
        )
    return {"writes": writes(lab) - before, "resyncs": count}
