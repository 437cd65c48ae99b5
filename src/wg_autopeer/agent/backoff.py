"""Capped exponential back-off with full jitter, for the daemon's retry loops.

Full jitter (a delay drawn uniformly from ``[0, min(cap, base * 2**n)]``) spreads
the retries of many agents that lost the hub at the same moment, so they do not
come back in lock-step when it returns.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for consecutive failures; ``reset()`` after a success.

    Pure apart from its random source: pass a seeded ``random.Random`` for
    reproducible delays.
    """

    def __init__(self, base: float = 1.0, cap: float = 60.0, rng: random.Random | None = None):
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays were handed out since the last reset."""
        return self._attempt

    def ceiling(self) -> float:
        """The largest delay the next call may return."""
        # Clamp the exponent: 2**attempt overflows a float long before anyone waits that long.
        return min(self.cap, self.base * 2.0 ** min(self._attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from ``base`` (call after a success)."""
        self._attempt = 0
