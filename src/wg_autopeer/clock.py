"""The two clocks the agent reads, bundled so tests can inject fake ones.

WireGuard reports handshakes in wall-clock epoch seconds, so judging their age
needs ``wall``; everything the agent times itself (silence on a path, back-off,
suppressions) uses ``monotonic``, which no clock adjustment moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Clock:
    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


SYSTEM_CLOCK = Clock()
