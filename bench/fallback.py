"""Fallback: bob leaves alice's LAN; how long until alice→bob traffic works again.

alice pings bob's tunnel address 50 times a second throughout (``ping -D -O``); a
trial's figure is the time from the event until the reply to the first probe sent
after it arrives. Three cases, each starting from alice and bob peered directly:

* **announced** — bob's link moves to another LAN while his agent runs: it sees the
  change, reports, and the server tells alice at once.
* **silent, agent restarted** — bob's agent is killed (SIGKILL), his link moves, and
  the agent comes back 5 s later, as the shipped systemd unit does
  (``Restart=on-failure``, ``RestartSec=5``).
* **silent, agent stays dead** — as above, but nothing restarts it. Here the figure
  is how long alice keeps bob as a direct peer (black-holing her traffic to him):
  nobody tells her, so only the hub noticing bob's new endpoint (at his next
  keepalive to the hub) or his registration's TTL end it. Pings cannot come back in
  this case, whatever alice does: bob's WireGuard still routes alice's address to
  the direct peer his dead agent left, so he drops her packets arriving via the hub.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv4Interface

from bench.common import (
    Distribution,
    Options,
    PartResult,
    PingRecorder,
    Row,
    bench_lab,
    holds_peer,
    log,
    paired,
    require,
    start_agent_in_mode,
    timed_wait,
    wait_quietly,
)
from wg_autopeer.lab import Lab, default_topology
from wg_autopeer.lab.services import start_server

PART = "Fallback"
PING_INTERVAL = 0.02
TRIAL_TIMEOUT = 30.0
DEAD_TIMEOUT = 100.0
SYSTEMD_RESTART_SEC = 5.0
TARGET_ANNOUNCED = 2.0
TARGET_SILENT = 12.0

HOME = ("lan1", IPv4Interface("192.168.50.11/24"))
AWAY = ("lan2", IPv4Interface("192.168.60.11/24"))


class Trials:
    """alice and bob with push agents on lan1, and alice's continuous ping to bob."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.alice = start_agent_in_mode(lab, "alice", "push", log_name="fb-alice")
        self.bob: subprocess.Popen[bytes] = start_agent_in_mode(
            lab, "bob", "push", log_name="fb-bob-0"
        )
        self.bob_starts = 1
        self.ping = PingRecorder(
            lab, "alice", str(lab.tunnel_ip("bob")), interval=PING_INTERVAL, name="fb-ping"
        )

    def restart_bob(self) -> None:
        self.bob = start_agent_in_mode(
            self.lab, "bob", "push", log_name=f"fb-bob-{self.bob_starts}"
        )
        self.bob_starts += 1

    def come_home(self) -> None:
        """bob back on lan1 with a running agent, directly peered with alice."""
        lab = self.lab
        if self.bob.poll() is not None:
            self.restart_bob()
        if lab.topology.client("bob").lan != HOME[0]:
            lab.move_client("bob", HOME[0], HOME[1])
        wait_quietly(lambda: paired(lab, "alice", "bob"), 60, "alice and bob never peered")
        # Pings must flow before the event, or the trial would measure something else.
        ready = time.time()
        wait_quietly(
            lambda: self.ping.first_reply_sent_after(ready) is not None,
            10,
            "alice cannot ping bob before the trial",
        )

    def ping_back(self, since_epoch: float, since: float, timeout: float) -> float | None:
        """Seconds from the event until the first reply to a probe sent after it."""

        def replied() -> bool:
            return self.ping.first_reply_sent_after(since_epoch) is not None

        if timed_wait(replied, since, timeout) is None:
            return None
        echo = self.ping.first_reply_sent_after(since_epoch)
        assert echo is not None
        assert echo.rtt_ms is not None
        return echo.sent + echo.rtt_ms / 1000.0 - since_epoch

    def announced(self) -> float | None:
        self.come_home()
        self.lab.move_client("bob", AWAY[0], AWAY[1])
        # From the moment the move is complete: a probe sent during it may still have
        # gone the old way.
        epoch, since = time.time(), time.monotonic()
        return self.ping_back(epoch, since, TRIAL_TIMEOUT)

    def silent_restarted(self) -> float | None:
        self.come_home()
        self.lab.stop(self.bob, signal.SIGKILL)
        self.lab.move_client("bob", AWAY[0], AWAY[1])
        # From the moment the move is complete: a probe sent during it may still have
        # gone the old way.
        epoch, since = time.time(), time.monotonic()
        time.sleep(max(0.0, since + SYSTEMD_RESTART_SEC - time.monotonic()))
        self.restart_bob()
        return self.ping_back(epoch, since, TRIAL_TIMEOUT)

    def silent_dead(self) -> tuple[float | None, bool]:
        """(seconds until alice dropped bob, whether any ping came back meanwhile)."""
        self.come_home()
        self.lab.stop(self.bob, signal.SIGKILL)
        self.lab.move_client("bob", AWAY[0], AWAY[1])
        # From the moment the move is complete: a probe sent during it may still have
        # gone the old way.
        epoch, since = time.time(), time.monotonic()
        dropped = timed_wait(lambda: not holds_peer(self.lab, "alice", "bob"), since, DEAD_TIMEOUT)
        # A few more seconds with alice on the hub path: does any reply come back?
        time.sleep(3.0)
        answered = self.ping.first_reply_sent_after(epoch) is not None
        return dropped, answered

    def close(self) -> None:
        self.ping.stop()
        for proc in (self.bob, self.alice):
            self.lab.stop(proc, signal.SIGTERM, timeout=10)


def _series(
    name: str, trials: int, one: Callable[[], float | None], timeout: float
) -> Distribution:
    samples: list[float] = []
    censored = 0
    for i in range(trials):
        took = one()
        if took is None:
            censored += 1
            took = timeout
        samples.append(took)
        log(f"fallback {name} trial {i + 1}/{trials}: {took:.2f} s")
    return Distribution.of(samples, censored=censored)


def run(options: Options) -> PartResult:
    result = PartResult(PART)
    with bench_lab(default_topology, options) as lab:
        start_server(lab)
        trials = Trials(lab)
        try:
            announced = _series("announced", options.trials(10, 3), trials.announced, TRIAL_TIMEOUT)
            restarted = _series(
                "silent+restart",
                options.trials(3, 2),
                trials.silent_restarted,
                TRIAL_TIMEOUT,
            )
            drops: list[float] = []
            answers: list[bool] = []
            censored = 0
            for i in range(options.trials(2, 1)):
                dropped, answered = trials.silent_dead()
                if dropped is None:
                    censored += 1
                    dropped = DEAD_TIMEOUT
                drops.append(dropped)
                answers.append(answered)
                log(f"fallback silent+dead trial {i + 1}: alice dropped bob after {dropped:.2f} s")
            dead = Distribution.of(drops, censored=censored)
        finally:
            trials.close()
    require(announced.n > 0, "no fallback trial ran")
    result.rows = [
        Row(
            PART,
            "announced: bob's link moves, his agent sees it",
            announced.brief(),
            f"<= {TARGET_ANNOUNCED:g} s",
            announced.maximum <= TARGET_ANNOUNCED and not announced.censored,
        ),
        Row(
            PART,
            "silent: SIGKILL + link moved, agent restarted after 5 s (systemd)",
            restarted.brief(),
            f"<= {TARGET_SILENT:g} s",
            restarted.maximum <= TARGET_SILENT and not restarted.censored,
        ),
        Row(
            PART,
            "silent, agent stays dead: until alice drops bob",
            dead.brief(),
            f"<= {TARGET_SILENT:g} s",
            dead.maximum <= TARGET_SILENT and not dead.censored,
        ),
        Row(
            PART,
            "silent, agent stays dead: ping works again",
            "never (bob's WireGuard keeps the dead agent's direct peer)"
            if not any(answers)
            else f"in {sum(answers)} of {len(answers)} trials",
        ),
    ]
    result.data = {
        "announced": announced,
        "silent_agent_restarted": restarted,
        "silent_agent_dead_alice_drops_bob": dead,
        "silent_agent_dead_ping_answered": answers,
        "ping_interval_s": PING_INTERVAL,
        "definition": "seconds from the event until the reply to the first probe sent after "
        "it (alice -> bob's tunnel address); for the dead agent, until alice's device no "
        "longer holds bob",
    }
    return result
