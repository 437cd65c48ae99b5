"""What the network looks like and when it changes in a way that matters to LAN peering.

``open_netview()`` picks the backend for this platform; agents depend only on ``NetView``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from wg_autopeer.errors import NetViewError
from wg_autopeer.netview.base import NetView, diff_snapshots, make_change
from wg_autopeer.netview.model import (
    Address,
    DefaultRoute,
    IPInterface,
    LanUplink,
    Link,
    NetChange,
    NetSnapshot,
)
from wg_autopeer.netview.poll import PollingNetView

__all__ = [
    "Address",
    "DefaultRoute",
    "IPInterface",
    "LanUplink",
    "Link",
    "NetChange",
    "NetSnapshot",
    "NetView",
    "NetViewError",
    "PollingNetView",
    "diff_snapshots",
    "make_change",
    "open_netview",
]


def open_netview(
    *,
    netns: str | None = None,
    socket_dir: Path | str | None = None,
    platform: str | None = None,
) -> NetView:
    """The network view for this platform: rtnetlink events on Linux.

    Other platforms have no snapshot reader yet, so they get a ``NetViewError`` rather
    than a view that silently never changes. ``platform`` overrides ``sys.platform``.
    """
    platform = platform or sys.platform
    if platform.startswith("linux"):
        # Imported here so that importing the package never needs pyroute2's Linux parts.
        from wg_autopeer.netview.linux import DEFAULT_SOCKET_DIR, LinuxNetView

        return LinuxNetView(netns=netns, socket_dir=socket_dir or DEFAULT_SOCKET_DIR)
    raise NetViewError(
        f"no network view for platform {platform!r}: only Linux (rtnetlink) is supported"
    )
