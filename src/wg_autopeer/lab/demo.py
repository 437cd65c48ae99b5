"""The demo a new user runs first: the whole story in the lab, in under a minute.

It builds the default lab, measures alice -> bob through the hub, starts the
server on the hub and agents on the three clients, shows who peered directly
and why the others did not, measures alice -> bob again on the direct path,
and tears everything down.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from wg_autopeer.lab.lab import Lab
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import direct_peers, has_direct_peer, start_agent, start_server
from wg_autopeer.lab.topology import default_topology

IPERF_SECONDS = 3
PING_COUNT = 10


@dataclass(frozen=True)
class PathFigures:
    """What one path from alice to bob gave."""

    rtt_ms: float | None
    mbit_s: float | None
    hub_bytes: int


class Progress:
    """Numbered progress lines, each with the time since the demo began."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self.step = 0

    def __call__(self, text: str) -> None:
        self.step += 1
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:5.1f}s] {self.step:2}. {text}", file=self.out, flush=True)

    def detail(self, text: str) -> None:
        print(f"{'':13}{text}", file=self.out, flush=True)


def _hub_bytes(lab: Lab) -> int:
    """Bytes the hub exchanged with alice and bob so far."""
    return sum(lab.hub_peer(h).rx_bytes + lab.hub_peer(h).tx_bytes for h in ("alice", "bob"))


def _ping_rtt(lab: Lab) -> float | None:
    result = lab.run(
        "alice", "ping", "-n", "-q", "-c", str(PING_COUNT), "-i", "0.1",
        str(lab.tunnel_ip("bob")), check=False, timeout=30,
    )  # fmt: skip
    match = re.search(r"= [\d.]+/([\d.]+)/", result.stdout)
    return float(match.group(1)) if match else None


def _iperf(lab: Lab, label: str) -> float | None:
    """TCP throughput alice -> bob over the tunnel, in Mbit/s."""
    bob_ip = str(lab.tunnel_ip("bob"))
    server = lab.spawn(
        "bob", ["iperf3", "-s", "-1", "--forceflush", "-B", bob_ip], log_name=f"iperf-{label}"
    )
    try:
        ready = wait_for(
            lambda: "listening" in lab.log_path(f"iperf-{label}").read_text(), timeout=5
        )
        if not ready:
            return None
        result = lab.run(
            "alice", "iperf3", "-c", bob_ip, "-t", str(IPERF_SECONDS), "-J",
            check=False, timeout=IPERF_SECONDS + 15,
        )  # fmt: skip
        try:
            report = json.loads(result.stdout)
            bits = report["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError, TypeError):
            return None
        return float(bits) / 1e6
    finally:
        lab.stop(server)


def _measure(lab: Lab, label: str) -> PathFigures:
    before = _hub_bytes(lab)
    rtt = _ping_rtt(lab)
    mbit = _iperf(lab, label)
    return PathFigures(rtt, mbit, _hub_bytes(lab) - before)


def _why_not(lab: Lab, a: str, b: str) -> str:
    """The reason two clients are not LAN neighbours, from the lab's ground truth."""
    endpoint_a, endpoint_b = lab.hub_peer(a).endpoint, lab.hub_peer(b).endpoint
    if endpoint_a is None or endpoint_b is None:
        return "the hub has no endpoint for one of them"
    if endpoint_a.address != endpoint_b.address:
        return f"other public IP ({endpoint_a.address} vs {endpoint_b.address})"
    if lab.lan_interface(a).network != lab.lan_interface(b).network:
        return "same public IP, other LAN"
    return "same LAN: should have peered"


def _fmt(value: float | None, unit: str, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def run_demo(prefix: str = "demo", state_dir: Path | None = None, out: TextIO = sys.stdout) -> int:
    """Run the demo; returns the exit status (0 when alice and bob peered directly)."""
    say = Progress(out)
    say("building the lab: hub, two NAT routers, alice+bob on lan1, carol on lan2")
    with Lab(default_topology(prefix), state_dir=state_dir) as lab:
        say.detail(f"up in {lab.up_seconds or 0:.2f} s; hub uplink limited to 20 Mbit/s")
        say("measuring alice -> bob through the hub (ping, then iperf3)")
        via_hub = _measure(lab, "hub")
        say.detail(f"RTT {_fmt(via_hub.rtt_ms, 'ms')}, {_fmt(via_hub.mbit_s, 'Mbit/s', 1)}")

        say("starting wg-autopeer server on the hub and agents on alice, bob and carol")
        start_server(lab)
        agents_started = time.monotonic()
        for host in ("alice", "bob", "carol"):
            start_agent(lab, host)

        def paired() -> bool:
            return has_direct_peer(lab, "alice", "bob") and has_direct_peer(lab, "bob", "alice")

        if not wait_for(paired, timeout=20):
            say("alice and bob did not peer directly; agent log:")
            say.detail(str(lab.log_path("agent-alice")))
            return 1
        converged = time.monotonic() - agents_started
        say.detail(f"alice and bob hold each other as direct peers after {converged:.2f} s")

        say("who peered directly, and why not")
        for a, b in (("alice", "bob"), ("alice", "carol"), ("bob", "carol")):
            if has_direct_peer(lab, a, b) and has_direct_peer(lab, b, a):
                peer = direct_peers(lab, a)[lab.public_key(b)]
                why = "same public IP, LAN and gateway"
                say.detail(f"{a:5} <-> {b:5}  direct   via {peer.endpoint} ({why})")
            else:
                say.detail(f"{a:5} <-> {b:5}  via hub  {_why_not(lab, a, b)}")

        say("measuring alice -> bob on the direct path (ping, then iperf3)")
        direct = _measure(lab, "direct")
        say.detail(f"RTT {_fmt(direct.rtt_ms, 'ms')}, {_fmt(direct.mbit_s, 'Mbit/s', 1)}")

        say("summary")
        rows = [
            ("", "through the hub", "direct"),
            ("RTT (ping, mean)", _fmt(via_hub.rtt_ms, "ms"), _fmt(direct.rtt_ms, "ms")),
            (
                "throughput (iperf3)",
                _fmt(via_hub.mbit_s, "Mbit/s", 1),
                _fmt(direct.mbit_s, "Mbit/s", 1),
            ),
            ("bytes through the hub", f"{via_hub.hub_bytes:,}", f"{direct.hub_bytes:,}"),
        ]
        for label, hub, dir_ in rows:
            say.detail(f"{label:<22} {hub:>16} {dir_:>16}")
        if via_hub.mbit_s and direct.mbit_s:
            say.detail(f"direct is {direct.mbit_s / via_hub.mbit_s:.0f}x faster and spares the hub")
        say("tearing the lab down")
    say.detail("done: no namespace, process or socket left")
    return 0
