"""wg-autopeer's own processes in a lab: the server on the hub, agents on clients.

Shared by the lab tests, the demo and the benchmarks, so all three start the
real commands the same way (``python -m wg_autopeer ...`` inside the namespace).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from wg_autopeer.lab.lab import Lab
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.readiness import ReadinessSocket
from wg_autopeer.wireguard.base import PeerState

SERVER_PORT = 80


def start_server(
    lab: Lab,
    *extra: str,
    log_name: str = "server",
    hub: str | None = None,
    interface: str | None = None,
    address: IPv4Address | None = None,
    port: int = SERVER_PORT,
    timeout: float = 15.0,
    on_ready: Callable[[str], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``wg-autopeer server`` on a hub and wait until it answers /healthz.

    By default it runs on the lab's first hub and serves its first WireGuard device on
    its tunnel address; ``hub`` picks another hub (one from ``add_second_hub``), in whose
    namespace it then runs, ``interface`` and ``address`` another device (e.g. one from
    ``add_tunnel``),
    ``port`` another port (a second server process on one hub). ``extra`` arguments
    come last (a later ``--db`` wins over the default ``:memory:``).
    ``timeout`` bounds the wait (a slow machine, or an emulated one, needs longer).
    It waits for the server's ``READY=1`` (handed to ``on_ready``, as systemd would get
    it), then for /healthz to say 200: ready means listening, healthy means the hub's
    device has been read as well.
    """
    started = time.monotonic()
    hub = hub or lab.topology.hub.name
    address = address or lab.tunnel_ip(hub)
    with ReadinessSocket(lab.lab_dir / f"{log_name}.notify") as readiness:
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
                f"{address}:{port}",
                *extra,
            ],
            log_name=log_name,
            env=readiness.env(),
        )
        ready = readiness.wait(proc, timeout)
    if ready is None:
        raise RuntimeError(
            f"server did not become ready (exit status {proc.poll()}): see {lab.log_path(log_name)}"
        )
    if on_ready is not None:
        on_ready(ready)
    answer = ""

    def healthy() -> bool:
        nonlocal answer
        answer = lab.run(
            hub, "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
            f"http://{address}:{port}/healthz", check=False,
        ).stdout.strip()  # fmt: skip
        return answer == "200"

    if not wait_for(
        healthy, timeout=max(1.0, timeout - (time.monotonic() - started)), interval=0.1
    ):
        raise RuntimeError(
            f"server said ready but /healthz gave {answer or 'no answer'}: "
            f"see {lab.log_path(log_name)}"
        )
    return proc


def _wait_answering(lab: Lab, proc: subprocess.Popen[bytes], url: str, log_name: str) -> None:
    def answering() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{log_name} exited with {proc.returncode}: see {lab.log_path(log_name)}"
            )
        result = lab.run(
            lab.topology.hub.name, "curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}",
            url, check=False,
        )  # fmt: skip
        return result.stdout.strip() not in ("", "000")

    if not wait_for(answering, timeout=15.0, interval=0.1):
        raise RuntimeError(f"{log_name} did not answer: see {lab.log_path(log_name)}")


def start_wgweb(lab: Lab, *, log_name: str = "wgweb") -> subprocess.Popen[bytes]:
    """Start the wireguard-web-like server (lab/wgweb.py) where agents look by default."""
    hub = lab.topology.hub.name
    address = lab.tunnel_ip(hub)
    proc = lab.spawn(
        hub,
        [
            sys.executable, "-m", "wg_autopeer.lab.wgweb",
            "--interface", lab.wg_interface(hub), "--listen", f"{address}:{SERVER_PORT}",
        ],
        log_name=log_name,
    )  # fmt: skip
    _wait_answering(lab, proc, f"http://{address}:{SERVER_PORT}/peering-request", log_name)
    return proc


def start_seed_agent(lab: Lab, host: str, *, interval: float = 5.0) -> subprocess.Popen[bytes]:
    """Start an agent that behaves like the seed's original one (lab/seedagent.py)."""
    hub = lab.topology.hub.name
    return lab.spawn(
        host,
        [
            sys.executable, "-m", "wg_autopeer.lab.seedagent",
            "--interface", lab.wg_interface(host),
            "--server", f"http://{lab.tunnel_ip(hub)}:{SERVER_PORT}/peering-request",
            "--interval", f"{interval:g}",
        ],
        log_name=f"seedagent-{host}",
    )  # fmt: skip


def routes_via_direct_peer(lab: Lab, host: str, other: str) -> bool:
    """True when ``host`` sends traffic for ``other`` over a direct peer (its tunnel
    address is an allowed IP of ``other``'s key there), not through the hub."""
    peer = direct_peers(lab, host).get(lab.public_key(other))
    return peer is not None and any(lab.tunnel_ip(other) in net for net in peer.allowed_ips)


def direct_both_ways(lab: Lab, a: str, b: str) -> bool:
    """True when ``a`` and ``b`` each send the other's traffic over a direct peer."""
    return routes_via_direct_peer(lab, a, b) and routes_via_direct_peer(lab, b, a)


def direct_either_way(lab: Lab, a: str, b: str) -> bool:
    """True when either of ``a`` and ``b`` sends the other's traffic over a direct peer."""
    return routes_via_direct_peer(lab, a, b) or routes_via_direct_peer(lab, b, a)


def agent_dirs(lab: Lab, host: str) -> tuple[Path, Path]:
    """State and runtime dirs of ``host``'s agent (inside the lab dir, per host)."""
    base = lab.lab_dir / f"agent-{host}"
    return base / "state", base / "run"


def start_agent(
    lab: Lab,
    host: str,
    *extra: str,
    log_name: str | None = None,
    ready_within: float | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``wg-autopeer agent`` on client ``host`` (no tray, lab-local dirs).

    With ``ready_within``, wait that long for the agent to say it is ready (its first
    sync done, as systemd would hear it) and raise if it does not.
    """
    log_name = log_name or f"agent-{host}"
    if ready_within is None:
        return _spawn_agent(lab, host, extra, log_name, env={})
    with ReadinessSocket(lab.lab_dir / f"{log_name}.notify") as readiness:
        proc = _spawn_agent(lab, host, extra, log_name, env=readiness.env())
        if readiness.wait(proc, ready_within) is None:
            raise RuntimeError(
                f"{log_name} did not become ready (exit status {proc.poll()}): "
                f"see {lab.log_path(log_name)}"
            )
    return proc


def _spawn_agent(
    lab: Lab, host: str, extra: Sequence[str], log_name: str, env: dict[str, str]
) -> subprocess.Popen[bytes]:
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
        log_name=log_name,
        env=env,
    )


def agent_call(lab: Lab, host: str, command: str) -> dict[str, Any]:
    """One command to ``host``'s agent over its control socket (from this process:
    the socket is a file, reachable from any namespace)."""
    from wg_autopeer.agent import localapi

    _, runtime_dir = agent_dirs(lab, host)
    return localapi.call(runtime_dir, command)


def direct_peers(lab: Lab, host: str) -> dict[str, PeerState]:
    """The peers on ``host``'s device other than its hub, by public key."""
    hub_key = lab.public_key(lab.topology.hub_of(host).name)
    return {p.public_key: p for p in lab.device(host).peers if p.public_key != hub_key}


def has_direct_peer(lab: Lab, host: str, other: str, *, handshake: bool = True) -> bool:
    """True when ``host`` holds ``other`` as a direct peer at its LAN address (and,
    with ``handshake``, the path is proven: a handshake completed and ``other``'s
    tunnel address routes over it, so traffic between them goes direct)."""
    peer = direct_peers(lab, host).get(lab.public_key(other))
    if peer is None or peer.endpoint is None:
        return False
    if str(peer.endpoint.address) != str(lab.lan_ip(other)):
        return False
    if not handshake:
        return True
    return bool(peer.latest_handshake) and routes_via_direct_peer(lab, host, other)


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
