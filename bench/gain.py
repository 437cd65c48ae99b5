"""What the user gains: RTT and TCP throughput alice→bob through the hub versus direct.

The lab's hub uplink is rate-limited (tc tbf, 20 Mbit/s each way), like a VPS or a
home uplink; alice and bob share a LAN bridge. First without agents (every packet
goes alice → hub → bob), then with the real server and agents once alice and bob
peered directly. The hub's byte counters for alice show which way the bytes went.
"""

from __future__ import annotations

import json
import re
import signal
import time

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
    wait_quietly,
)
from wg_autopeer.lab import Lab, default_topology
from wg_autopeer.lab.services import start_server

PART = "User gain"
_RTT = re.compile(r"time=([\d.]+) ms")


def ping_rtts(lab: Lab, count: int) -> list[float]:
    """RTTs in ms of ``count`` pings alice→bob's tunnel address, 20 ms apart."""
    result = lab.run(
        "alice",
        "ping", "-n", "-c", str(count), "-i", "0.02", "-W", "1", str(lab.tunnel_ip("bob")),
        check=False,
        timeout=count * 0.1 + 10,
    )  # fmt: skip
    return [float(m) for m in _RTT.findall(result.stdout)]


def iperf(lab: Lab, seconds: int, name: str) -> float:
    """TCP throughput alice→bob's tunnel address in Mbit/s (iperf3, receiver side)."""
    server = lab.spawn(
        "bob",
        ["iperf3", "-s", "-1", "--forceflush", "-B", str(lab.tunnel_ip("bob"))],
        log_name=f"{name}-srv",
    )
    try:
        ready = lab.wait_for(
            lambda: "Server listening" in lab.log_path(f"{name}-srv").read_text(), 10
        )
        require(ready, "iperf3 server did not start")
        result = lab.run(
            "alice",
            "iperf3", "-c", str(lab.tunnel_ip("bob")), "-t", str(seconds), "-J",
            check=False,
            timeout=seconds + 20,
        )  # fmt: skip
        report = json.loads(result.stdout)
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        lab.stop(server, signal.SIGTERM)


def hub_bytes(lab: Lab) -> int:
    peer = lab.hub_peer("alice")
    return peer.rx_bytes + peer.tx_bytes


def measure(lab: Lab, label: str, pings: int, seconds: int) -> dict[str, object]:
    before = hub_bytes(lab)
    rtts = ping_rtts(lab, pings)
    mbit = iperf(lab, seconds, f"gain-{label}")
    crossed = hub_bytes(lab) - before
    log(f"gain {label}: RTT median {Distribution.of(rtts).median:.3f} ms, {mbit:.1f} Mbit/s")
    return {"rtt_ms": Distribution.of(rtts), "mbit_s": mbit, "hub_bytes_of_alice": crossed}


def run(options: Options) -> PartResult:
    pings = options.trials(200, 50)
    seconds = options.trials(5, 2)
    result = PartResult(PART)
    with bench_lab(default_topology, options) as lab:
        rate = lab.topology.hub.rate_mbit
        hub = measure(lab, "hub", pings, seconds)
        start_server(lab)
        agents = [
            start_agent_in_mode(lab, h, "push", log_name=f"gain-{h}") for h in ("alice", "bob")
        ]
        wait_quietly(lambda: paired(lab, "alice", "bob"), 30, "alice and bob never peered")
        # Let the direct session settle (first keepalives) before measuring it.
        time.sleep(0.5)
        direct = measure(lab, "direct", pings, seconds)
        for agent in agents:
            lab.stop(agent, signal.SIGTERM, timeout=10)
    hub_rtt, direct_rtt = hub["rtt_ms"], direct["rtt_ms"]
    assert isinstance(hub_rtt, Distribution)
    assert isinstance(direct_rtt, Distribution)
    hub_mbit, direct_mbit = float(hub["mbit_s"]), float(direct["mbit_s"])  # type: ignore[arg-type]
    result.rows = [
        Row(
            PART,
            "RTT alice→bob, via hub vs direct",
            f"{hub_rtt.brief('ms', digits=3)} vs {direct_rtt.brief('ms', digits=3)}; "
            f"median {hub_rtt.median / direct_rtt.median:.1f}x lower direct",
        ),
        Row(
            PART,
            f"TCP throughput alice→bob (hub uplink {rate:g} Mbit/s)",
            f"{hub_mbit:.1f} Mbit/s via hub vs {direct_mbit:.1f} Mbit/s direct "
            f"({direct_mbit / hub_mbit:.1f}x)",
        ),
        Row(
            PART,
            "bytes of alice's traffic crossing the hub while measuring",
            f"{hub['hub_bytes_of_alice']:,} via hub vs {direct['hub_bytes_of_alice']:,} direct",
        ),
    ]
    result.data = {"hub": hub, "direct": direct, "hub_rate_mbit": rate, "iperf_seconds": seconds}
    return result
