"""``wg-autopeer status`` / ``sync`` and the tray's actions against a live agent.

The default lab (alice and bob on lan1, carol on lan2), the real server and
agents; the commands run as a user runs them, against alice's runtime dir. The
agent is started with a NOTIFY_SOCKET, as systemd would, to see READY=1 come
after its first sync.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wg_autopeer.agent.localapi import AgentNotRunning
from wg_autopeer.lab import Lab
from wg_autopeer.lab.netns import wait_for
from wg_autopeer.lab.services import (
    agent_call,
    agent_dirs,
    direct_peers,
    has_direct_peer,
    start_agent,
    start_server,
)
from wg_autopeer.tray import Tray

DOC = Path(__file__).resolve().parents[2] / "docs" / "status-json.md"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wg_autopeer", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def documented_fields(section: str) -> set[str]:
    """The field names of one table in docs/status-json.md."""
    text = DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", body, flags=re.MULTILINE))


def paired(lab: Lab) -> bool:
    return has_direct_peer(lab, "alice", "bob") and has_direct_peer(lab, "bob", "alice")


def alice_status(lab: Lab) -> dict[str, Any]:
    return agent_call(lab, "alice", "status")


def bob_seen_active(lab: Lab) -> bool:
    peers = alice_status(lab)["interfaces"][0]["direct_peers"]
    return any(
        p["public_key"] == lab.public_key("bob")
        and p["health"] == "active"
        and p["handshake_age"] is not None
        for p in peers
    )


@pytest.mark.lab
def test_status_shows_the_live_agent_and_sync_is_logged(
    lab_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab: Lab = lab_factory(base="dk")
    start_server(lab)
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(notify_path))
        systemd.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
        start_agent(lab, "alice")
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert systemd.recv(4096) == b"READY=1\nSTATUS=first sync done"
        # Ready means reported: the first report's outcome is already there.
        first = alice_status(lab)["interfaces"][0]
        assert first["last_contact"] is not None
        assert first["last_outcome"].startswith("ok: ")
    for host in ("bob", "carol"):
        start_agent(lab, host)
    assert wait_for(lambda: paired(lab), timeout=15)
    assert lab.ping("alice", lab.tunnel_ip("bob"), count=3, timeout=1)
    assert wait_for(lambda: bob_seen_active(lab), timeout=10)

    _, run_dir = agent_dirs(lab, "alice")
    human = cli("status", "--runtime-dir", str(run_dir))
    assert human.returncode == 0, human.stderr
    out = human.stdout
    lan = lab.topology.lan(lab.topology.client("alice").lan)
    bob_peer = direct_peers(lab, "alice")[lab.public_key("bob")]
    assert "agent: enabled" in out
    assert f"interface {lab.wg_interface('alice')}" in out
    assert f"server:        http://{lab.tunnel_ip(lab.topology.hub.name)}/" in out
    assert re.search(r"last contact:  \d+s ago: (ok: 1 neighbour\(s\)|no change)", out), out
    assert (
        f"LAN:           eth0 {lab.lan_interface('alice')} (network {lan.network}), "
        f"gateway {lan.gateway.ip}" in out
    ), out
    assert "direct peers:  1" in out
    row = next(line for line in out.splitlines() if lab.public_key("bob")[:10] in line)
    assert f"{lab.tunnel_ip('bob')}/32" in row
    assert str(bob_peer.endpoint) in row
    assert re.search(r"\d+s ago", row)
    assert re.search(r"\d+(\.\d)? (B|KiB)\s+\d+(\.\d)? (B|KiB)", row), row
    assert row.rstrip().endswith("active")

    as_json = cli("status", "--json", "--runtime-dir", str(run_dir))
    assert as_json.returncode == 0
    data = json.loads(as_json.stdout)
    assert set(data) == documented_fields("Top level")
    assert data["version"] == 1
    assert data["enabled"] is True
    (iface,) = data["interfaces"]
    assert set(iface) == documented_fields("`interfaces[]`")
    assert iface["interface"] == lab.wg_interface("alice")
    assert iface["lan"] == [f"eth0 {lab.lan_interface('alice')} via {lan.gateway.ip}"]
    (peer,) = iface["direct_peers"]
    assert set(peer) == documented_fields("`interfaces[].direct_peers[]`")
    assert peer["public_key"] == lab.public_key("bob")
    assert peer["endpoint"] == str(bob_peer.endpoint)
    assert peer["allowed_ips"] == [f"{lab.tunnel_ip('bob')}/32"]
    assert peer["rx_bytes"] > 0
    assert peer["tx_bytes"] > 0

    log = lab.log_path("agent-alice")
    synced = cli("sync", "--runtime-dir", str(run_dir))
    assert synced.returncode == 0
    assert synced.stdout.strip() == "re-sync requested"
    assert wait_for(
        lambda: "re-sync: requested over the control socket" in log.read_text(), timeout=5
    )


@pytest.mark.lab
def test_tray_enabled_item_pauses_and_resumes_direct_peering(lab_factory: Any) -> None:
    lab: Lab = lab_factory(base="dk")
    start_server(lab)
    for host in ("alice", "bob"):
        start_agent(lab, host)
    assert wait_for(lambda: paired(lab), timeout=15)
    _, run_dir = agent_dirs(lab, "alice")
    tray = Tray(run_dir)  # the tray's own code, without a display, on the real socket
    # The status's peer list follows the device within a health tick.
    title = f"{lab.wg_interface('alice')}: 1 direct peer"
    assert wait_for(lambda: tray.refresh().title == title, timeout=5), tray.view
    assert tray.view.state == "active"

    tray.toggle_enabled()  # "Enabled" off
    # alice drops bob at once, and leaves the server so bob drops alice too.
    assert wait_for(lambda: lab.public_key("bob") not in direct_peers(lab, "alice"), timeout=5)
    assert wait_for(lambda: lab.public_key("alice") not in direct_peers(lab, "bob"), timeout=5)
    assert tray.enabled is False
    paused = alice_status(lab)
    assert paused["enabled"] is False
    assert paused["interfaces"][0]["last_outcome"] == "paused"
    assert paused["interfaces"][0]["direct_peers"] == []
    # Traffic still flows, through the hub.
    before = lab.hub_peer("alice").rx_bytes
    assert lab.ping("alice", lab.tunnel_ip("bob"), count=2, timeout=1)
    assert lab.hub_peer("alice").rx_bytes > before
    # Paused means silent: bob, still reporting, is never offered alice.
    assert wait_for(lambda: tray.refresh().title == "wg-autopeer: paused (direct peering off)", 5)
    bob_sync = agent_call(lab, "bob", "sync")
    assert bob_sync["ok"]
    assert not wait_for(lambda: lab.public_key("alice") in direct_peers(lab, "bob"), timeout=3)

    tray.toggle_enabled()  # "Enabled" on
    assert wait_for(lambda: paired(lab), timeout=15)
    assert tray.enabled is True
    assert "direct peering enabled" in lab.log_path("agent-alice").read_text()


@pytest.mark.parametrize("command", ["status", "sync"])
def test_without_an_agent_status_and_sync_say_so_and_exit_3(tmp_path: Path, command: str) -> None:
    result = cli(command, "--runtime-dir", str(tmp_path))
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"wg-autopeer {command}: no agent is running (no socket at {tmp_path}/agent.sock)"
    )


@pytest.mark.lab
def test_second_agent_on_the_same_state_dir_exits_naming_the_first(lab_factory: Any) -> None:
    lab = lab_factory()
    start_server(lab)
    first = start_agent(lab, "alice")
    assert wait_for(lambda: alice_status_or_none(lab) is not None, timeout=15)
    # Say `sudo wg-autopeer agent -v` while the service runs, same dirs.
    second = start_agent(lab, "alice", log_name="agent-alice-second")
    assert second.wait(timeout=30) == 1
    message = lab.log_path("agent-alice-second").read_text()
    assert f"PID {first.pid}" in message, message
    assert first.poll() is None
    # The first one's control socket was left alone and still answers.
    assert alice_status(lab)["ok"] is True


def alice_status_or_none(lab: Lab) -> dict[str, Any] | None:
    try:
        return alice_status(lab)
    except AgentNotRunning:
        return None
