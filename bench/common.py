"""What every benchmark shares: distributions, result rows, the machine, labs, devices, pings.

Nothing here asserts timing: a benchmark measures and reports, and ``run.py``
compares the figures with the issue's targets in the summary table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wg_autopeer.lab import Lab, Topology, list_namespaces, wait_for
from wg_autopeer.lab.services import agent_dirs, start_agent
from wg_autopeer.lab.state import read_state
from wg_autopeer.lab.wgtools import UAPI_DIR
from wg_autopeer.wireguard.base import DeviceState
from wg_autopeer.wireguard.uapi import parse_device

LAB_BASE = "bn"
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """A sample summarised; ``censored`` counts trials that hit their deadline
    (they are in ``samples`` at the deadline value, so the figures are lower bounds)."""

    n: int
    median: float
    p90: float
    p99: float
    minimum: float
    maximum: float
    mean: float
    samples: tuple[float, ...] = ()
    censored: int = 0

    @classmethod
    def of(cls, values: Sequence[float], *, censored: int = 0) -> Distribution:
        if not values:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan, (), censored)
        return cls(
            n=len(values),
            median=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            minimum=min(values),
            maximum=max(values),
            mean=sum(values) / len(values),
            samples=tuple(round(v, 6) for v in values),
            censored=censored,
        )

    def brief(self, unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
        """``median 0.61 / p90 0.80 / max 0.93 s (n=10)``."""
        if not self.n:
            return "no sample"

        def fmt(v: float) -> str:
            return f"{v * scale:.{digits}f}"

        more = f", {self.censored} hit the deadline" if self.censored else ""
        return (
            f"median {fmt(self.median)} / p90 {fmt(self.p90)} / max {fmt(self.maximum)} {unit}"
            f" (n={self.n}{more})"
        )


@dataclass(frozen=True)
class Row:
    """One line of the summary table."""

    part: str
    metric: str
    result: str
    target: str = ""
    # True/False when the issue sets a target for this row, None otherwise.
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: ""}[self.met]


@dataclass
class PartResult:
    """What one benchmark hands back: table rows, raw data for JSON, plots it wrote."""

    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def jsonable(value: Any) -> Any:
    """Dataclasses, paths and NaN made fit for ``json.dumps``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(value), indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Options:
    """How a benchmark run is shaped (``--quick`` shrinks trial counts and windows)."""

    out: Path
    quick: bool = False

    def trials(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def lab_state(self) -> Path:
        return self.out / "lab"


# --------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Machine:
    nproc: int
    cpu_model: str
    kernel: str
    python: str
    loadavg_1m: float
    commit: str

    @classmethod
    def here(cls) -> Machine:
        model = "unknown"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        commit = "unknown"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            commit = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        return cls(
            nproc=os.cpu_count() or 0,
            cpu_model=model,
            kernel=platform.release(),
            python=platform.python_version(),
            loadavg_1m=os.getloadavg()[0],
            commit=commit or "unknown",
        )


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcSample:
    """CPU time, memory and context switches of one process (all its threads) at one moment."""

    at: float
    cpu_seconds: float
    rss_kib: int
    voluntary_switches: int
    involuntary_switches: int

    @property
    def switches(self) -> int:
        return self.voluntary_switches + self.involuntary_switches


def sample_process(pid: int) -> ProcSample:
    """Read ``/proc/<pid>``: utime+stime, VmRSS, and context switches summed over threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return ProcSample(time.monotonic(), cpu, rss, voluntary, involuntary)


# --------------------------------------------------------------------------- labs


def unique_prefix(base: str = LAB_BASE) -> str:
    """``base`` + 3 hex digits that no namespace or UAPI socket uses now."""
    for _ in range(100):
        prefix = base + secrets.token_hex(2)[:3]
        if not list_namespaces(prefix) and not any(UAPI_DIR.glob(f"{prefix}-*.sock")):
            return prefix
    raise RuntimeError(f"no free lab prefix starting with {base!r}")


@contextlib.contextmanager
def bench_lab(build: Callable[[str], Topology], options: Options) -> Iterator[Lab]:
    """A lab with its own ``bn...`` prefix, torn down (leftovers too) whatever happens.

    Its logs stay in ``<out>/lab/<prefix>/`` for a look after the run.
    """
    prefix = unique_prefix()
    lab = Lab(build(prefix), state_dir=options.lab_state())
    try:
        lab.up()
        yield lab
    finally:
        try:
            lab.down()
        finally:
            if read_state(prefix, lab.state_dir) is not None or list_namespaces(prefix):
                Lab.cleanup_leftovers(prefix, lab.state_dir)


# --------------------------------------------------------------------------- devices


def read_device(interface: str, timeout: float = 2.0) -> DeviceState:
    """Read a userspace device straight from its UAPI socket, parsed by the product's parser.

    Much cheaper than ``wg show`` in a namespace (no process), so polls can be dense.
    The socket directory is shared by every namespace, so this works from here.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(UAPI_DIR / f"{interface}.sock"))
        sock.sendall(b"get=1\n\n")
        data = b""
        while not data.endswith(b"\n\n") and b"errno=" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.decode("ascii", "replace").splitlines()
    return parse_device(interface, [line for line in lines if not line.startswith("errno=")])


def direct_peer_up(lab: Lab, host: str, other: str) -> bool:
    """``host`` holds ``other`` as a direct peer at its LAN address, with a handshake,
    and sends ``other``'s traffic over it (its tunnel address is routed there: since
    make-before-break that happens only once the path is proven)."""
    peer = read_device(lab.wg_interface(host)).peer(lab.public_key(other))
    return (
        peer is not None
        and peer.endpoint is not None
        and str(peer.endpoint.address) == str(lab.lan_ip(other))
        and bool(peer.latest_handshake)
        and any(lab.tunnel_ip(other) in net for net in peer.allowed_ips)
    )


def holds_peer(lab: Lab, host: str, other: str) -> bool:
    """``host``'s device has ``other`` as a (direct) peer at all."""
    return read_device(lab.wg_interface(host)).peer(lab.public_key(other)) is not None


def paired(lab: Lab, a: str, b: str) -> bool:
    return direct_peer_up(lab, a, b) and direct_peer_up(lab, b, a)


def unpaired(lab: Lab, a: str, b: str) -> bool:
    return not holds_peer(lab, a, b) and not holds_peer(lab, b, a)


def timed_wait(predicate: Callable[[], bool], since: float, timeout: float) -> float | None:
    """Poll ``predicate`` densely; seconds from ``since`` (monotonic) until it held, or None."""
    deadline = since + timeout
    while True:
        if predicate():
            return time.monotonic() - since
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def require(condition: bool, what: str) -> None:
    """Stop a benchmark whose set-up failed (a broken lab is not a measurement)."""
    if not condition:
        raise RuntimeError(what)


# --------------------------------------------------------------------------- agents


# The original design: first report 5 s after start, then a plain POST every 30 s, and
# no direct-path health check (this agent's 10 s first-handshake deadline would remove
# a direct peer before the neighbour's next poll adds the other side: see "poll").
BASELINE_CONFIG = "push = false\nfirst_report_delay = 5\ninterval = 30\nhandshake_timeout = 600\n"
# This agent as shipped, polling a server without blocking queries (wireguard-web's).
POLL_CONFIG = "push = false\nfirst_report_delay = 5\ninterval = 30\n"
MODE_CONFIGS = {"baseline": BASELINE_CONFIG, "poll": POLL_CONFIG}


def start_agent_in_mode(
    lab: Lab, host: str, mode: str, *, log_name: str | None = None
) -> subprocess.Popen[bytes]:
    """Start the real agent on ``host`` in ``push`` mode (the product's defaults),
    ``baseline`` (the original polling design) or ``poll`` (this agent polling)."""
    if mode == "push":
        return start_agent(lab, host, log_name=log_name)
    if mode not in MODE_CONFIGS:
        raise ValueError(f"unknown mode {mode!r}")
    config = lab.lab_dir / f"agent-{mode}.toml"
    if not config.exists():
        config.write_text(MODE_CONFIGS[mode])
    # A later --config wins over the helper's --config /dev/null.
    return start_agent(lab, host, "--config", str(config), log_name=log_name)


def agent_status(lab: Lab, host: str) -> dict[str, Any]:
    from wg_autopeer.agent import localapi

    _, runtime_dir = agent_dirs(lab, host)
    return localapi.call(runtime_dir, "status")


def agent_reported(lab: Lab, host: str) -> bool:
    """The agent on ``host`` had an answer from the server on every interface."""
    try:
        status = agent_status(lab, host)
    except Exception:
        return False
    interfaces = status.get("interfaces") or []
    return bool(interfaces) and all(
        str(i.get("last_outcome", "")).startswith(("ok", "no change")) for i in interfaces
    )


def agent_blocking(lab: Lab, host: str) -> bool:
    """The agent on ``host`` holds a blocking query open on every interface."""
    try:
        status = agent_status(lab, host)
    except Exception:
        return False
    interfaces = status.get("interfaces") or []
    return bool(interfaces) and all(i.get("blocking") for i in interfaces)


def wait_quietly(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    require(wait_for(predicate, timeout, interval=0.05), f"{what} (waited {timeout:g} s)")


# --------------------------------------------------------------------------- pings

_REPLY = re.compile(r"^\[(?P<ts>\d+\.\d+)\] .*icmp_seq=(?P<seq>\d+) .*time=(?P<rtt>[\d.]+) ms")
_NO_ANSWER = re.compile(r"^\[(?P<ts>\d+\.\d+)\] no answer yet for icmp_seq=(?P<seq>\d+)")


@dataclass(frozen=True)
class Echo:
    """One ping probe: when it was sent (epoch s), its RTT in ms, or None when lost."""

    seq: int
    sent: float
    rtt_ms: float | None


def parse_ping(text: str, interval: float) -> list[Echo]:
    """Probes of ``ping -D -O -i interval`` output, replies and losses, by sequence number.

    A reply's send time is its receive stamp minus its RTT; a lost probe's is the
    stamp of its "no answer yet" line minus the reply timeout, estimated from its
    neighbours' send times when available.
    """
    replies: dict[int, Echo] = {}
    lost: dict[int, float] = {}
    for line in text.splitlines():
        if m := _REPLY.match(line):
            seq, rtt = int(m["seq"]), float(m["rtt"])
            replies.setdefault(seq, Echo(seq, float(m["ts"]) - rtt / 1000.0, rtt))
        elif m := _NO_ANSWER.match(line):
            lost.setdefault(int(m["seq"]), float(m["ts"]))
    if not replies and not lost:
        return []
    # Sequence -> send time, anchored on the replies (ping sends at a steady interval).
    anchors = sorted((e.seq, e.sent) for e in replies.values())
    echoes = list(replies.values())
    for seq, stamp in lost.items():
        if seq in replies:
            continue
        if anchors:
            ref_seq, ref_sent = min(anchors, key=lambda a: abs(a[0] - seq))
            sent = ref_sent + (seq - ref_seq) * interval
        else:
            sent = stamp
        echoes.append(Echo(seq, sent, None))
    return sorted(echoes, key=lambda e: e.seq)


class PingRecorder:
    """A continuous ``ping`` from one lab host to an address, recorded to its log file."""

    def __init__(self, lab: Lab, host: str, target: str, *, interval: float, name: str) -> None:
        self.lab = lab
        self.interval = interval
        self.name = name
        self.path = lab.log_path(name)
        argv = ["ping", "-n", "-D", "-O", "-i", f"{interval:g}", "-W", "1", target]
        # Unbuffered: the log is read while ping runs.
        self.proc = lab.spawn(host, ["stdbuf", "-oL", *argv], log_name=name)

    def echoes(self) -> list[Echo]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return parse_ping(text, self.interval)

    def first_reply_sent_after(self, moment: float) -> Echo | None:
        """The first answered probe sent at or after ``moment`` (epoch seconds)."""
        for echo in self.echoes():
            if echo.rtt_ms is not None and echo.sent >= moment:
                return echo
        return None

    def stop(self) -> list[Echo]:
        import signal

        self.lab.stop(self.proc, signal.SIGINT)
        return self.echoes()


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f} s"


def log(message: str) -> None:
    """Progress on stderr, so the table on stdout stays clean."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def waiting_queries(lab: Lab) -> int:
    """Blocking queries the lab's server holds right now (its /metrics gauge)."""
    from wg_autopeer.lab.services import SERVER_PORT

    hub = lab.topology.hub.name
    result = lab.run(
        hub,
        "curl", "-s", "-m", "2", f"http://{lab.tunnel_ip(hub)}:{SERVER_PORT}/metrics",
        check=False,
    )  # fmt: skip
    for line in result.stdout.splitlines():
        if line.startswith("wg_autopeer_waiting_queries "):
            return int(float(line.split()[1]))
    return -1
