"""wg-autopeer's own processes in a lab: the server on the hub, agents on clients.

Shared by the lab tests, the demo and the benchmarks, so all three start the
real commands the same way (``python -m wg_autopeer ...`` inside the namespace).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from wg_autopeer.lab.lab import Lab, wait_for
from wg_autopeer.wireguard.base import PeerState

SERVER_PORT = 80


def start_server(
    lab: Lab,
    *extra: str,
    log_name: str = "server",
    interface: str | None = None,
    address: IPv4Address | None = None,
    timeout: float = 15.0,
) -> subprocess.Popen[bytes]:
    """Start ``wg-autopeer server`` on the hub and wait until it answers /healthz.

    By default it serves the hub's first WireGuard device on its tunnel address;
    ``interface`` and ``address`` pick another device (e.g. one from ``add_tunnel``).
    ``timeout`` bounds the wait (a slow machine, or an emulated one, needs longer).
    """
    hub = lab.topology.hub.name
    address = address or lab.tunnel_ip(hub)
    proc = lab.spawn(
        hub,
        [
            sys.executable,
            "-m",
            "wg_autopeer",
            "server",
            "--interface",
            interface or lab.wg_interface(hub),
            "--db",
            ":memory:",
            "--listen",
            f"{address}:{SERVER_PORT}",
            *extra,
        ],
        log_name=log_name,
    )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}: see {lab.log_path(log_name)}"
            )
        result = lab.run(
            hub, "curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}",
            f"http://{address}:{SERVER_PORT}/healthz", check=False,
        )  # fmt: skip
        return result.stdout.strip() == "200"

    if not wait_for(healthy, timeout=timeout, interval=0.1):
        raise RuntimeError(f"server did not become healthy: see {lab.log_path(log_name)}")
    return proc


def agent_dirs(lab: Lab, host: str) -> tuple[Path, Path]:
    """State and runtime dirs of ``host``'s agent (inside the lab dir, per host)."""
    base = lab.lab_dir / f"agent-{host}"
    return base / "state", base / "run"


def start_agent(
    lab: Lab, host: str, *extra: str, log_name: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``wg-autopeer agent`` on client ``host`` (no tray, lab-local dirs)."""
    state_dir, runtime_dir = agent_dirs(lab, host)
    return lab.spawn(
        host,
        [
            sys.executable,
            "-m",
            "wg_autopeer",
            "-v",
            "agent",
            "--no-tray",
            "--state-dir",
            str(state_dir),
            "--runtime-dir",
            str(runtime_dir),
            "--config",
            "/dev/null",
            *extra,
        ],
        log_name=log_name or f"agent-{host}",
    )


def agent_call(lab: Lab, host: str, command: str) -> dict[str, Any]:
    """One command to ``host``'s agent over its control socket (from this process:
    the socket is a file, reachable from any namespace)."""
    from wg_autopeer.agent import localapi

    _, runtime_dir = agent_dirs(lab, host)
    return localapi.call(runtime_dir, command)


def direct_peers(lab: Lab, host: str) -> dict[str, PeerState]:
    """The peers on ``host``'s device other than the hub, by public key."""
    hub_key = lab.public_key(lab.topology.hub.name)
    return {p.public_key: p for p in lab.device(host).peers if p.public_key != hub_key}


def has_direct_peer(lab: Lab, host: str, other: str, *, handshake: bool = True) -> bool:
    """True when ``host`` holds ``other`` as a direct peer at its LAN address
    (and, with ``handshake``, has completed a handshake with it)."""
    peer = direct_peers(lab, host).get(lab.public_key(other))
    if peer is None or peer.endpoint is None:
        return False
    if str(peer.endpoint.address) != str(lab.lan_ip(other)):
        return False
    return not handshake or bool(peer.latest_handshake)


def curl_peering(
    lab: Lab, host: str, body: Any, *, headers: Sequence[str] = (), method: str = "POST"
) -> tuple[int, str]:
    """Send a raw peering request from ``host``'s tunnel address, as curl would."""
    hub = lab.topology.hub.name
    argv = [
        "curl",
        "-s",
        "-m",
        "5",
        "-X",
        method,
        "--interface",
        str(lab.tunnel_ip(host)),
        "-H",
        "Content-Type: application/json",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ]
    for header in headers:
        argv += ["-H", header]
    if body is not None:
        argv += ["--data-binary", body if isinstance(body, str) else json.dumps(body)]
    argv.append(f"http://{lab.tunnel_ip(hub)}:{SERVER_PORT}/peering-request")
    result = lab.run(host, *argv, check=False)
    text, _, status = result.stdout.rpartition("\n")
    return int(status or 0), text
