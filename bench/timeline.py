"""A timeline: ping RTT alice→bob while bob joins alice's LAN and later leaves it,
each probe marked with the path it took, push mode and the polling baseline side by side.

Both modes run at the same time in two labs of their own (the work is a ping every
100 ms and device reads, light enough not to disturb each other). bob starts on
another LAN with his agent running; 5 s in, his link moves onto alice's LAN; once the
direct path is up (or 70 s passed) plus 10 s, it moves back; the run ends 10 s after
traffic flows again (or 70 s after the move). A probe's path is what alice's device
held when it was sent: bob as a direct peer, or not (the hub).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

from bench.common import (
    Echo,
    Options,
    PartResult,
    PingRecorder,
    Row,
    bench_lab,
    holds_peer,
    log,
    paired,
    read_device,
    require,
    start_agent_in_mode,
    wait_quietly,
    waiting_queries,
)
from wg_autopeer.lab import Lab, default_topology
from wg_autopeer.lab.services import start_server

PART = "Timeline"
PING_INTERVAL = 0.1
JOIN_AT = 5.0
MIN_STAY = 20.0
SETTLE = 10.0
PHASE_CAP = 70.0
HOME = ("lan1", IPv4Interface("192.168.50.11/24"))
AWAY = ("lan2", IPv4Interface("192.168.60.11/24"))
MODES = {"push": "push (this project)", "baseline": "baseline (POST every 30 s)"}


@dataclass
class Run:
    """One mode's timeline; times are seconds since the run began."""

    mode: str
    joined: float = 0.0
    direct: float | None = None
    left: float = 0.0
    back: float | None = None
    ended: float = 0.0
    # (time, alice holds bob as a direct peer)
    path: list[tuple[float, bool]] = field(default_factory=list)
    # (send time, RTT in ms or None when lost, went direct)
    probes: list[tuple[float, float | None, bool]] = field(default_factory=list)
    error: str | None = None


class PathSampler(threading.Thread):
    """Reads alice's device every 50 ms: does she hold bob as a direct peer?"""

    def __init__(self, lab: Lab, begun: float) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.begun = begun
        self.samples: list[tuple[float, bool]] = []
        self.halt = threading.Event()
        self._iface = lab.wg_interface("alice")
        self._bob = lab.public_key("bob")

    def run(self) -> None:
        while not self.halt.is_set():
            peer = read_device(self._iface).peer(self._bob)
            self.samples.append((time.time() - self.begun, peer is not None))
            self.halt.wait(0.05)

    def direct_at(self, moment: float) -> bool:
        state = False
        for at, direct in self.samples:
            if at > moment:
                break
            state = direct
        return state


def one_mode(options: Options, mode: str, out: dict[str, Run]) -> None:
    run = Run(mode)
    out[mode] = run
    try:
        with bench_lab(default_topology, options) as lab:
            record(lab, run)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        log(f"timeline {mode} failed: {run.error}")


def record(lab: Lab, run: Run) -> None:
    lab.move_client("bob", AWAY[0], AWAY[1])
    lab.refresh_hub_endpoint("bob")
    start_server(lab)
    agents = [
        start_agent_in_mode(lab, host, run.mode, log_name=f"tl-{host}") for host in ("alice", "bob")
    ]
    if run.mode == "push":
        wait_quietly(lambda: waiting_queries(lab) == 2, 20, "the agents never both waited")
    else:
        # Past the first reports (5 s after start); from then on every 30 s.
        time.sleep(6.0)
    ping = PingRecorder(
        lab, "alice", str(lab.tunnel_ip("bob")), interval=PING_INTERVAL, name="tl-ping"
    )
    begun_epoch = time.time()
    sampler = PathSampler(lab, begun_epoch)
    sampler.start()

    def now() -> float:
        return time.time() - begun_epoch

    def replied_since(moment: float) -> bool:
        return ping.first_reply_sent_after(begun_epoch + moment) is not None

    try:
        time.sleep(max(0.0, JOIN_AT - now()))
        lab.move_client("bob", HOME[0], HOME[1])
        run.joined = now()
        while now() < run.joined + PHASE_CAP:
            if run.direct is None and paired(lab, "alice", "bob"):
                run.direct = now()
                log(f"timeline {run.mode}: direct {run.direct - run.joined:.2f} s after joining")
            if now() >= max(run.joined + MIN_STAY, (run.direct or PHASE_CAP * 9) + SETTLE):
                break
            time.sleep(0.05)
        lab.move_client("bob", AWAY[0], AWAY[1])
        run.left = now()
        while now() < run.left + PHASE_CAP:
            if run.back is None and not holds_peer(lab, "alice", "bob") and replied_since(run.left):
                run.back = now()
                log(f"timeline {run.mode}: traffic back {run.back - run.left:.2f} s after leaving")
            if run.back is not None and now() >= run.back + SETTLE:
                break
            time.sleep(0.05)
        run.ended = now()
    finally:
        sampler.halt.set()
        sampler.join(timeout=5)
        echoes: list[Echo] = ping.stop()
        for agent in agents:
            lab.stop(agent, signal.SIGTERM, timeout=10)
    run.path = sampler.samples
    run.probes = [
        (e.sent - begun_epoch, e.rtt_ms, sampler.direct_at(e.sent - begun_epoch))
        for e in echoes
        if 0 <= e.sent - begun_epoch <= run.ended
    ]


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 3.6), sharey=True)
    axes_list = list(axes) if len(runs) > 1 else [axes]
    answered = [rtt for run in runs for _, rtt, _ in run.probes if rtt is not None]
    top = max(answered, default=1.0) * 1.6
    for ax, run in zip(axes_list, runs, strict=True):
        styles = ((False, "tab:blue", "via hub"), (True, "tab:green", "direct"))
        for went_direct, colour, label in styles:
            xs = [t for t, rtt, d in run.probes if rtt is not None and d is went_direct]
            ys = [rtt for _, rtt, d in run.probes if rtt is not None and d is went_direct]
            ax.scatter(xs, ys, s=6, color=colour, label=label)
        lost = [t for t, rtt, _ in run.probes if rtt is None]
        ax.scatter(lost, [top] * len(lost), s=10, marker="x", color="tab:red", label="lost")
        ax.axvline(run.joined, color="grey", linestyle="--", linewidth=1)
        ax.axvline(run.left, color="grey", linestyle=":", linewidth=1)
        marks = ax.get_xaxis_transform()
        ax.text(run.joined, 1.01, "bob joins", fontsize=8, color="dimgrey", transform=marks)
        ax.text(run.left, 1.01, "bob leaves", fontsize=8, color="dimgrey", transform=marks)
        ax.set_title(MODES[run.mode], fontsize=10, pad=14)
        ax.set_xlabel("seconds")
        ax.set_yscale("log")
        ax.set_xlim(0, max(run.ended, 1.0))
        ax.grid(True, which="both", alpha=0.25)
    axes_list[0].set_ylabel("RTT alice→bob (ms)")
    axes_list[0].legend(loc="lower right", fontsize=8, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _phase(value: float | None, since: float, cap: float) -> str:
    return f"> {cap:g} s" if value is None else f"{value - since:.2f} s"


def run(options: Options) -> PartResult:
    out: dict[str, Run] = {}
    threads = [
        threading.Thread(target=one_mode, args=(options, mode, out), name=f"timeline-{mode}")
        for mode in MODES
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runs = [out[mode] for mode in MODES]
    failed = [r for r in runs if r.error]
    require(not failed, "; ".join(f"{r.mode}: {r.error}" for r in failed))
    result = PartResult(PART)
    png = options.out / "timeline.png"
    plot(runs, png)
    result.plots.append(png)
    for r in runs:
        lost = sum(1 for t, rtt, _ in r.probes if rtt is None and r.left <= t)
        result.rows.append(
            Row(
                PART,
                MODES[r.mode],
                f"direct {_phase(r.direct, r.joined, PHASE_CAP)} after joining; traffic back "
                f"{_phase(r.back, r.left, PHASE_CAP)} after leaving ({lost} probes lost)",
            )
        )
    result.data = {"runs": runs, "ping_interval_s": PING_INTERVAL}
    return result
