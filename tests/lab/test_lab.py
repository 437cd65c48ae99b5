"""The namespace lab itself: real namespaces, real wireguard-go, and nothing left behind."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from labkit import LabFactory, unique_prefix
from wg_autopeer.cli import main
from wg_autopeer.errors import LabError
from wg_autopeer.lab import Lab, ProcessRecord, default_topology, list_namespaces
from wg_autopeer.lab.netns import process_alive
from wg_autopeer.lab.state import read_state, state_path
from wg_autopeer.lab.wgtools import UAPI_DIR

pytestmark = pytest.mark.lab

# This suite's own labs use prefixes "wl…", apart from the shared `lab` fixture ("t…").
BASE = "wl"


@pytest.fixture
def lab(lab_factory: LabFactory) -> Lab:
    """The default topology, up, under this suite's own prefix."""
    return lab_factory(base=BASE)


def _wireguard_go_pids(interfaces: Iterable[str]) -> list[int]:
    wanted = set(interfaces)
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if args and args[0].endswith("wireguard-go") and wanted & set(args[1:]):
            pids.append(int(entry.name))
    return pids


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return [line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()]


def assert_lab_gone(
    prefix: str, processes: Iterable[ProcessRecord], interfaces: Iterable[str]
) -> None:
    interfaces = list(interfaces)
    assert list_namespaces(prefix) == []
    alive = [r for r in processes if process_alive(r.pid, r.start_time)]
    assert alive == []
    assert _wireguard_go_pids(interfaces) == []
    assert [i for i in interfaces if (UAPI_DIR / f"{i}.sock").exists()] == []
    assert [name for name in _root_links() if name.startswith(f"{prefix}-")] == []


def _interfaces(lab: Lab) -> list[str]:
    return [lab.wg_interface(h) for h in lab.topology.wg_hosts()]


def test_alice_reaches_bob_through_the_hub_and_teardown_leaves_nothing(tmp_path: Path) -> None:
    prefix = unique_prefix(BASE)
    lab = Lab(default_topology(prefix), state_dir=tmp_path)
    with lab:
        processes, interfaces = lab.processes, _interfaces(lab)
        assert len(processes) == 4
        hosts = ("sw", "hub", "r1", "r2", "alice", "bob", "carol")
        assert set(list_namespaces(prefix)) == {f"{prefix}-{h}" for h in hosts}
        before = lab.hub_peer("alice")
        # alice sits behind r1's NAT: the hub sees r1's public address.
        assert before.endpoint is not None
        assert str(before.endpoint.address) == "203.0.113.10"

        assert lab.wait_for(lambda: lab.ping("alice", lab.tunnel_ip("bob")), timeout=10)

        after = lab.hub_peer("alice")
        assert after.rx_bytes > before.rx_bytes
        assert lab.hub_peer("bob").tx_bytes > 0
        assert lab.ping("carol", lab.tunnel_ip("alice"))
    assert lab.up_seconds is not None
    assert lab.down_seconds is not None
    assert_lab_gone(prefix, processes, interfaces)
    assert not state_path(prefix, tmp_path).exists()


def test_body_raising_inside_with_still_tears_everything_down(tmp_path: Path) -> None:
    prefix = unique_prefix(BASE)
    lab = Lab(default_topology(prefix), state_dir=tmp_path)
    processes: list[ProcessRecord] = []

    def failing_body() -> None:
        with lab:
            lab.spawn("alice", ["sleep", "60"], log_name="sleeper")
            processes.extend(lab.processes)
            raise RuntimeError("test body failed")

    with pytest.raises(RuntimeError, match="test body failed"):
        failing_body()
    assert len(processes) == 5
    assert_lab_gone(prefix, processes, [f"{prefix}-{h}" for h in ("hub", "alice", "bob", "carol")])


def test_up_failing_half_way_is_torn_down_by_the_context_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = unique_prefix(BASE)
    lab = Lab(default_topology(prefix), state_dir=tmp_path)
    built: list[str] = []
    original = Lab._build_client

    def build_then_fail(self: Lab, client: object) -> None:
        if built:
            raise LabError("injected failure after the first client")
        original(self, client)  # type: ignore[arg-type]
        built.append("x")

    monkeypatch.setattr(Lab, "_build_client", build_then_fail)
    with pytest.raises(LabError, match="injected failure"), lab:
        pytest.fail("the body must not run when up() failed")
    assert built == ["x"]
    assert_lab_gone(prefix, [], [f"{prefix}-{h}" for h in ("hub", "alice", "bob")])
    assert _wireguard_go_pids([f"{prefix}-hub", f"{prefix}-alice"]) == []


def test_cleanup_leftovers_cleans_a_lab_whose_object_was_lost(tmp_path: Path) -> None:
    prefix = unique_prefix(BASE)
    lab = Lab(default_topology(prefix), state_dir=tmp_path)
    try:
        lab.up()
        processes, interfaces = lab.processes, _interfaces(lab)
        # A SIGKILLed wireguard-go cannot remove its socket: cleanup must.
        hub = next(r for r in processes if r.name.startswith("hub:"))
        os.kill(hub.pid, signal.SIGKILL)
        hub_sock = UAPI_DIR / f"{prefix}-hub.sock"
        assert lab.wait_for(lambda: not process_alive(hub.pid, hub.start_time), timeout=5)
        assert hub_sock.exists()
        # The crash: the object is gone without down().
        del lab
        gc.collect()
        recorded = read_state(prefix, tmp_path)
        assert recorded is not None
        assert {r.pid for r in recorded.processes} == {r.pid for r in processes}

        report = Lab.cleanup_leftovers(prefix, tmp_path)

        assert len(report.namespaces) == 7
        assert len(report.processes) == 3  # the hub's was already dead
        assert str(hub_sock) in report.sockets
        assert_lab_gone(prefix, processes, interfaces)
        assert not state_path(prefix, tmp_path).exists()
        assert Lab.cleanup_leftovers(prefix, tmp_path).empty
    finally:
        Lab.cleanup_leftovers(prefix, tmp_path)


def test_cleanup_does_not_kill_a_recorded_pid_that_was_reused(tmp_path: Path) -> None:
    prefix = unique_prefix(BASE)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        state = {
            "version": 1,
            "namespaces": [],
            "processes": [{"pid": bystander.pid, "start_time": 1, "name": "stale"}],
        }
        state_path(prefix, tmp_path).write_text(json.dumps(state))
        report = Lab.cleanup_leftovers(prefix, tmp_path)
        assert report.processes == ()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_two_labs_with_different_prefixes_run_side_by_side(lab_factory: LabFactory) -> None:
    first = lab_factory(base=BASE)
    second = lab_factory(base=BASE)
    assert first.prefix != second.prefix
    assert first.wait_for(lambda: first.ping("alice", first.tunnel_ip("carol")), timeout=10)
    assert second.wait_for(lambda: second.ping("bob", second.tunnel_ip("carol")), timeout=10)
    first_processes = first.processes
    first.down()
    assert_lab_gone(first.prefix, first_processes, _interfaces(first))
    assert second.ping("alice", second.tunnel_ip("bob"))


def test_spawned_process_is_recorded_logged_and_stopped(lab: Lab) -> None:
    proc = lab.spawn("bob", ["sh", "-c", "echo started; exec sleep 60"], log_name="sleeper")
    recorded = read_state(lab.prefix, lab.state_dir)
    assert recorded is not None
    assert proc.pid in {r.pid for r in recorded.processes}
    assert lab.wait_for(lambda: "started" in lab.log_path("sleeper").read_text(), timeout=5)

    assert lab.stop(proc) == -signal.SIGTERM
    assert proc.pid not in {r.pid for r in lab.processes}


def test_lan_peers_reach_each_other_directly_but_not_across_nat(lab: Lab) -> None:
    assert lab.ping("alice", lab.lan_ip("bob"))
    # carol is behind another NAT: no inbound path to alice's private address.
    assert not lab.ping("carol", lab.lan_ip("alice"), timeout=0.5)
    assert lab.ping("carol", lab.wan_ip("hub"))


def test_hub_wan_link_is_rate_limited_both_ways(lab: Lab) -> None:
    qdisc = lab.run("hub", "tc", "qdisc", "show", "dev", "wan0").stdout
    assert "tbf" in qdisc
    assert "20Mbit" in qdisc
    switch_side = lab.run("sw", "tc", "qdisc", "show", "dev", "hub-w").stdout
    assert "tbf" in switch_side


def test_move_client_rehomes_it_on_the_other_lan(lab: Lab) -> None:
    lab.move_client("carol", "lan1", IPv4Interface("192.168.50.12/24"))
    assert lab.lan_ip("carol") == IPv4Interface("192.168.50.12/24").ip
    route = lab.run("carol", "ip", "route", "show", "default").stdout
    assert "via 192.168.50.1" in route
    assert lab.ping("carol", lab.lan_ip("alice"))
    # wireguard-go keeps its cached source address across an address change (sends
    # then fail with ENETUNREACH); re-setting the endpoint clears it, as an agent must.
    lab.refresh_hub_endpoint("carol")
    assert lab.wait_for(lambda: lab.ping("carol", lab.tunnel_ip("hub")), timeout=10)
    assert lab.wait_for(
        lambda: str(getattr(lab.hub_peer("carol").endpoint, "address", "")) == "203.0.113.10",
        timeout=10,
    )


def test_link_down_cuts_the_client_off_and_link_up_restores_its_route(lab: Lab) -> None:
    lab.link_set("alice", False)
    assert not lab.ping("alice", lab.lan_ip("bob"), timeout=0.5)
    lab.link_set("alice", True)
    assert lab.wait_for(lambda: lab.ping("alice", lab.wan_ip("hub")), timeout=5)


def test_default_route_can_be_removed_and_restored(lab: Lab) -> None:
    lab.set_default_route("alice", None)
    assert lab.run("alice", "ip", "route", "show", "default").stdout.strip() == ""
    assert not lab.ping("alice", lab.wan_ip("hub"), timeout=0.5)
    lab.set_default_route("alice", lab.lan_ip("r1"))
    assert lab.ping("alice", lab.wan_ip("hub"))


def test_set_address_keeps_the_default_route_on_the_same_lan(lab: Lab) -> None:
    lab.set_address("bob", IPv4Interface("192.168.50.42/24"))
    addresses = lab.run("bob", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "192.168.50.42/24" in addresses
    assert "192.168.50.11" not in addresses
    assert lab.ping("bob", lab.wan_ip("hub"))


def test_add_lan_and_client_join_a_running_lab(lab: Lab) -> None:
    from wg_autopeer.lab import ClientSpec, LanSpec

    lab.add_lan(
        LanSpec("lan3", "r3", IPv4Interface("203.0.113.30/24"), IPv4Interface("192.168.70.1/24"))
    )
    lab.add_client(
        ClientSpec("dave", "lan3", IPv4Interface("192.168.70.10/24"), IPv4Interface("10.99.0.5/24"))
    )
    assert lab.hub_peer("dave").latest_handshake is not None
    assert lab.wait_for(lambda: lab.ping("dave", lab.tunnel_ip("alice")), timeout=10)
    assert lab.device("dave").peers[0].public_key == lab.public_key("hub")


def test_second_hub_is_a_namespace_of_its_own_and_teardown_removes_it(tmp_path: Path) -> None:
    prefix = unique_prefix(BASE)
    lab = Lab(default_topology(prefix), state_dir=tmp_path)
    with lab:
        hub_b = lab.add_second_hub("hubb", 51821, ["bob"])
        processes, interfaces = lab.processes, _interfaces(lab)
        assert f"{prefix}-hubb" in list_namespaces(prefix)
        assert lab.wg_interface("hubb") in interfaces
        wan = lab.run("hubb", "ip", "-o", "-4", "addr", "show", "dev", "wan0").stdout
        assert f"{hub_b.wan}" in wan
        assert hub_b.wan != lab.topology.hub.wan
        # On the WAN and nowhere else: no default route, so nothing leaves the lab.
        assert "default" not in lab.run("hubb", "ip", "route", "show").stdout
        # bob reaches hub B from behind r1's NAT; hub A knows him no more.
        assert lab.device("hub").peer(lab.public_key("bob")) is None
        before = lab.hub_peer("bob")
        assert before.endpoint is not None
        assert str(before.endpoint.address) == str(lab.wan_ip("r1"))
        assert lab.ping("bob", lab.tunnel_ip("hub"))
        assert lab.hub_peer("bob").rx_bytes > before.rx_bytes
        assert lab.ping("alice", lab.tunnel_ip("hub"))

        # A taken WAN address is refused and changes nothing.
        namespaces = list_namespaces(prefix)
        with pytest.raises(LabError, match=r"hubc: WAN address 203\.0\.113\.10 is already r1's"):
            lab.add_second_hub("hubc", 51822, ["carol"], wan=IPv4Interface("203.0.113.10/24"))
        assert list_namespaces(prefix) == namespaces
        assert lab.topology.hub_of("carol").name == "hub"
        assert lab.ping("carol", lab.tunnel_ip("hub"))
    assert_lab_gone(prefix, processes, interfaces)


def test_private_keys_are_files_only_root_can_read(lab: Lab) -> None:
    key_file = lab.private_key_file("alice")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert lab.device("alice").public_key == lab.public_key("alice")


def test_up_refuses_a_prefix_with_leftovers(lab: Lab) -> None:
    twin = Lab(default_topology(lab.prefix), state_dir=lab.state_dir)
    with pytest.raises(LabError, match="leftovers"):
        twin.up()
    # The refusal must not have touched the running lab.
    assert lab.ping("alice", lab.tunnel_ip("hub"))


def test_cli_lab_up_status_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix(BASE)
    common = ["--prefix", prefix, "--state-dir", str(tmp_path)]
    try:
        assert main(["lab", "up", *common, "--rate", "0"]) == 0
        out = capsys.readouterr().out
        assert f"ip netns exec {prefix}-alice bash" in out
        assert main(["lab", "status", *common]) == 0
        assert f"{prefix}-hub" in capsys.readouterr().out
        state = read_state(prefix, tmp_path)
        assert state is not None
        processes = state.processes
        interfaces = state.interfaces
    finally:
        assert main(["lab", "down", *common]) == 0
    assert "is down" in capsys.readouterr().out
    assert main(["lab", "status", *common]) == 1
    assert_lab_gone(prefix, processes, interfaces)


def test_bring_up_and_down_times_are_reasonable(tmp_path: Path) -> None:
    prefix = unique_prefix(BASE)
    lab = Lab(default_topology(prefix), state_dir=tmp_path)
    started = time.monotonic()
    with lab:
        pass
    total = time.monotonic() - started
    assert lab.up_seconds is not None
    assert lab.down_seconds is not None
    print(f"lab up {lab.up_seconds:.2f} s, down {lab.down_seconds:.2f} s, total {total:.2f} s")
    assert lab.up_seconds < 10
    assert lab.down_seconds < 5
