"""Helpers the lab tests import by name (``from labkit import ...``).

They live here rather than in conftest.py: several test folders have a conftest of
their own, and ``from conftest import`` would pick whichever was imported first.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from wg_autopeer.lab import Lab, list_namespaces
from wg_autopeer.lab.wgtools import UAPI_DIR


def unique_prefix(base: str = "t") -> str:
    """A lab prefix ``base`` + 3 hex digits that no namespace, socket or state file uses now."""
    for _ in range(100):
        prefix = base + secrets.token_hex(2)[:3]
        if not list_namespaces(prefix) and not any(UAPI_DIR.glob(f"{prefix}-*.sock")):
            return prefix
    raise RuntimeError(f"no free lab prefix starting with {base!r}")


LabFactory = Callable[..., Lab]
