"""Can this process change WireGuard devices? And if not, exactly how to fix it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

CAP_NET_ADMIN = 12


def effective_capabilities(status_path: Path = Path("/proc/self/status")) -> int:
    """The CapEff mask of this process (0 when it cannot be read)."""
    try:
        for line in status_path.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def privilege_problem(uapi_dir: Path) -> str | None:
    """None when the agent may proceed; otherwise the message that tells how to fix it."""
    if os.geteuid() == 0:
        return None
    has_cap = bool(effective_capabilities() >> CAP_NET_ADMIN & 1)
    uapi_ok = not uapi_dir.exists() or os.access(uapi_dir, os.R_OK | os.X_OK)
    if has_cap and uapi_ok:
        return None
    interpreter = os.path.realpath(sys.executable)
    launcher = shutil.which("wg-autopeer") or "/usr/local/bin/wg-autopeer"
    lines = ["wg-autopeer agent needs to change WireGuard peers, which takes CAP_NET_ADMIN."]
    if not has_cap:
        lines += [
            "Fix it one of these ways:",
            "  - run it as a systemd service: the shipped unit has",
            "      AmbientCapabilities=CAP_NET_ADMIN",
            "  - run it as root: sudo wg-autopeer agent",
            "  - give a dedicated launcher the capability (not the shared interpreter):",
            f"      sudo cp {interpreter} /usr/local/lib/wg-autopeer/python3",
            "      sudo setcap cap_net_admin+eip /usr/local/lib/wg-autopeer/python3",
            f"    and start the agent with it (its console script is {launcher}).",
        ]
    if not uapi_ok:
        lines.append(
            f"Userspace WireGuard's control sockets in {uapi_dir} are not accessible to this user;"
            " run as root or via the systemd unit."
        )
    return "\n".join(lines)
