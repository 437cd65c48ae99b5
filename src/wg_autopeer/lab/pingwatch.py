"""A continuous ping between two lab hosts: what a user feels when a path switches.

``ContinuousPing`` runs ``ping -O`` (which names every probe that got no answer
before the next one left) inside the source namespace; ``stop`` ends it by its
PID and counts the lost probes and the longest run of them. The end state of a
switch says little; the probes lost on the way say what broke.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from ipaddress import IPv4Address

from wg_autopeer.lab.lab import Lab

_SEQ = re.compile(r"icmp_seq=(\d+)")


@dataclass(frozen=True)
class PingResult:
    """Probes sent and answered; ``lost_seqs`` in order (the last, in flight, left out)."""

    sent: int
    lost_seqs: tuple[int, ...]
    interval: float

    @property
    def lost(self) -> int:
        return len(self.lost_seqs)

    @property
    def longest_gap(self) -> int:
        """The most consecutive probes lost."""
        best = run = 0
        previous = None
        for seq in self.lost_seqs:
            run = run + 1 if previous is not None and seq == previous + 1 else 1
            best = max(best, run)
            previous = seq
        return best

    @property
    def longest_outage(self) -> float:
        """Seconds of the longest run of lost probes."""
        return self.longest_gap * self.interval


def parse_ping(output: str, interval: float) -> PingResult:
    """Count probes from ``ping -O`` output: replies and "no answer yet" lines."""
    answered: set[int] = set()
    highest = 0
    for line in output.splitlines():
        match = _SEQ.search(line)
        if match is None:
            continue
        seq = int(match.group(1))
        highest = max(highest, seq)
        if "bytes from" in line:
            answered.add(seq)
    # The last probe may still be on its way when ping was stopped.
    lost = tuple(s for s in range(1, highest) if s not in answered)
    return PingResult(
        sent=max(0, highest - 1) + (highest in answered), lost_seqs=lost, interval=interval
    )


class ContinuousPing:
    """Ping ``dst`` from ``src`` every ``interval`` seconds until ``stop``."""

    def __init__(
        self, lab: Lab, src: str, dst: IPv4Address | str, *, interval: float = 0.1, name: str = ""
    ) -> None:
        self.lab = lab
        self.interval = interval
        self.log_name = f"ping-{src}-{name or dst}"
        self._proc = lab.spawn(
            src,
            ["ping", "-n", "-O", "-i", f"{interval:g}", "-W", "1", str(dst)],
            log_name=self.log_name,
        )

    def stop(self) -> PingResult:
        self.lab.stop(self._proc, signal.SIGINT)
        return parse_ping(self.lab.log_path(self.log_name).read_text(), self.interval)
