"""Test keys shared by the agent's unit tests (imported: this directory is on sys.path)."""

from __future__ import annotations

import base64


def key(n: int) -> str:
    """A valid, distinct WireGuard public key for test peer ``n``."""
    return base64.b64encode(bytes([n]) * 32).decode()
