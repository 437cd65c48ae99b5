"""Building a lab's parts: namespaces, bridges, veth links, NAT routers, WireGuard devices.

``LabBuilder`` is the base of ``Lab`` (lab.py): it owns what a lab made and recorded
(the state file's content, the processes it spawned, keys, default gateways), runs
commands and long-running processes in the lab's namespaces, and holds the steps that
build each part of a ``Topology``. ``Lab`` adds the lifecycle, the views and the
changes to a running lab on top.

Bridges live in the switch namespace ``<prefix>-sw``, so nothing is created in the
host's root namespace.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from wg_autopeer.errors import LabError
from wg_autopeer.lab.netns import (
    KILL_TIMEOUT,
    ProcessRecord,
    ip_batch,
    process_start_time,
    run_command,
    wait_for,
)
from wg_autopeer.lab.state import DEFAULT_STATE_DIR, LabState, state_path, write_atomic
from wg_autopeer.lab.topology import (
    CLIENT_LAN_IF,
    ROUTER_LAN_IF,
    SWITCH_HOST,
    WAN_BRIDGE,
    WAN_IF,
    ClientSpec,
    HubSpec,
    LanSpec,
    Topology,
)
from wg_autopeer.lab.wgtools import UAPI_DIR, generate_keypair, parse_wg_dump
from wg_autopeer.wireguard.base import DeviceState

WG_START_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 15.0


class LabBuilder:
    """What a lab owns, running things in its namespaces, and the steps that build it."""

    def __init__(self, topology: Topology, state_dir: Path | None = None) -> None:
        topology.validate()
        self.topology = topology
        self.state_dir = state_dir or DEFAULT_STATE_DIR
        self.lab_dir = self.state_dir / topology.prefix
        self._state = LabState(prefix=topology.prefix, lab_dir=str(self.lab_dir))
        self._popens: dict[int, subprocess.Popen[bytes]] = {}
        self._private_key_files: dict[str, Path] = {}
        self._gateways: dict[str, IPv4Address | None] = {}
        # Set by Lab.up, cleared by Lab.down: nothing spawns or changes while it is False.
        self._started = False

    @property
    def prefix(self) -> str:
        return self.topology.prefix

    def ns(self, host: str) -> str:
        """Network namespace of ``host``."""
        return self.topology.ns(host)

    def wg_interface(self, host: str) -> str:
        """WireGuard interface of the hub or a client."""
        self._require_wg_host(host)
        return self.topology.wg_interface(host)

    def public_key(self, host: str) -> str:
        """WireGuard public key of the hub or a client (known once ``up`` built it)."""
        self._require_wg_host(host)
        try:
            return self._state.public_keys[host]
        except KeyError:
            raise LabError(f"lab {self.prefix}: {host} has no key yet (lab not up?)") from None

    def private_key_file(self, host: str) -> Path:
        """File (mode 0600) holding the private key of the hub or a client."""
        try:
            return self._private_key_files[host]
        except KeyError:
            raise LabError(f"lab {self.prefix}: {host} has no key yet (lab not up?)") from None

    def log_path(self, name: str) -> Path:
        """Log file of a process spawned with ``log_name=name``."""
        return self.lab_dir / f"{name}.log"

    # ---------------------------------------------------------------- running things

    def run(
        self,
        host: str,
        *argv: str,
        check: bool = True,
        timeout: float = 10.0,
        stdin_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``host``'s namespace and wait for it (``LabError`` on failure)."""
        return run_command(
            ["ip", "netns", "exec", self.ns(host), *argv],
            stdin_text=stdin_text,
            check=check,
            timeout=timeout,
        )

    def spawn(
        self,
        host: str,
        argv: Sequence[str],
        *,
        log_name: str,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in ``host``'s namespace; ``down`` ends it.

        ``env`` is added to the current environment. stdout and stderr go to
        ``log_path(log_name)``. The PID and its start time are recorded first
        in the state file, so even a crashed test's processes get cleaned up.
        """
        if not self._started:
            raise LabError(f"lab {self.prefix} is not up")
        log_file = self.log_path(log_name)
        full_argv = ["ip", "netns", "exec", self.ns(host), *argv]
        with log_file.open("ab") as out:
            try:
                # `ip netns exec` execs the command, so this PID is the command's own.
                proc = subprocess.Popen(
                    full_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                )
            except OSError as exc:
                raise LabError(f"{host}: cannot start {shlex.join(argv)}: {exc}") from exc
        start_time = process_start_time(proc.pid)
        if start_time is None:
            # Died before we could look: nothing to record, nothing to end later.
            proc.wait()
            return proc
        self._popens[proc.pid] = proc
        self._state.processes.append(
            ProcessRecord(proc.pid, start_time, f"{host}:{log_name}", tuple(full_argv))
        )
        self._save()
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5.0
    ) -> int | None:
        """Signal a spawned process, wait up to ``timeout``, then SIGKILL; its exit status.

        None only when it survived SIGKILL as well.
        """
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_TIMEOUT)
        if proc.returncode is not None:
            self._popens.pop(proc.pid, None)
            self._state.processes = [r for r in self._state.processes if r.pid != proc.pid]
            if self._started:
                self._save()
        return proc.returncode

    def device(self, host: str) -> DeviceState:
        """``host``'s WireGuard device as ``wg show dump`` reports it (no private key)."""
        iface = self.wg_interface(host)
        return parse_wg_dump(iface, self.run(host, "wg", "show", iface, "dump").stdout)

    # ---------------------------------------------------------------- building blocks

    def _require_up(self) -> None:
        if not self._started:
            raise LabError(f"lab {self.prefix} is not up")

    def _require_wg_host(self, host: str) -> None:
        if host not in self.topology.wg_hosts():
            raise LabError(f"lab {self.prefix}: {host!r} runs no WireGuard")

    def _save(self) -> None:
        write_atomic(state_path(self.prefix, self.state_dir), self._state.to_json())

    def _ip(self, ns: str, *commands: str) -> None:
        ip_batch(ns, *commands)

    def _sysctl(self, host: str, *settings: str) -> None:
        self.run(host, "sysctl", "-q", "-w", *settings)

    def _add_namespace(self, name: str) -> None:
        # Recorded before it exists: a crash between the two leaves a name to delete.
        self._state.namespaces.append(name)
        self._save()
        run_command(["ip", "netns", "add", name])
        self._ip(name, "link set lo up")

    def _add_host(self, host: str) -> None:
        self._add_namespace(self.ns(host))

    def _add_bridge(self, name: str) -> None:
        self._ip(self.topology.switch_ns, f"link add {name} type bridge", f"link set {name} up")

    def _plug(self, host: str, switch_end: str, ifname: str, bridge: str) -> None:
        """A veth born in the switch namespace, its other end moved into ``host`` as ``ifname``."""
        self._ip(
            self.topology.switch_ns,
            f"link add {switch_end} type veth peer name {ifname} netns {self.ns(host)}",
            f"link set {switch_end} master {bridge} up",
        )

    def _tbf(self, ns: str, dev: str, rate_mbit: float) -> None:
        rate_bit = int(rate_mbit * 1_000_000)
        # At least 10 ms worth of tokens, and never less than a few full-size frames.
        burst = max(rate_bit // 8 // 100, 16 * 1514)
        run_command(
            [
                "tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", f"{rate_bit}bit", "burst", str(burst), "latency", "50ms",
            ]
        )  # fmt: skip

    def _build_hub(self, hub: HubSpec) -> None:
        ns = self.ns(hub.name)
        self._add_host(hub.name)
        self._plug(hub.name, f"{hub.name}-w", WAN_IF, WAN_BRIDGE)
        self._ip(
            ns,
            f"addr add {hub.wan} dev {WAN_IF}",
            f"addr add {hub.wan6} dev {WAN_IF} nodad",
            f"link set {WAN_IF} up",
        )
        if hub.rate_mbit is not None:
            # Egress of each veth end: hub -> WAN here, WAN -> hub on the switch side.
            self._tbf(ns, WAN_IF, hub.rate_mbit)
            self._tbf(self.topology.switch_ns, f"{hub.name}-w", hub.rate_mbit)
        # Clients reach each other through the hub; no redirects for wg -> wg forwarding.
        self._sysctl(
            hub.name,
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        )
        self._start_wireguard(hub.name, hub.tunnel, hub.listen_port)

    def _build_lan(self, lan: LanSpec) -> None:
        ns = self.ns(lan.router)
        self._add_host(lan.router)
        self._add_bridge(lan.name)
        self._plug(lan.router, f"{lan.router}-w", WAN_IF, lan.upstream or WAN_BRIDGE)
        self._plug(lan.router, f"{lan.router}-l", ROUTER_LAN_IF, lan.name)
        self._ip(
            ns,
            f"addr add {lan.wan} dev {WAN_IF}",
            f"link set {WAN_IF} up",
            f"addr add {lan.gateway} dev {ROUTER_LAN_IF}",
            f"link set {ROUTER_LAN_IF} up",
        )
        if lan.wan6 is not None and lan.gateway6 is not None:
            self._ip(
                ns,
                f"addr add {lan.wan6} dev {WAN_IF} nodad",
                f"addr add {lan.gateway6} dev {ROUTER_LAN_IF} nodad",
            )
            self._sysctl(lan.router, "net.ipv6.conf.all.forwarding=1")
            # Each hub routes the LAN's /64 to its router, as an ISP would.
            for hub in self.topology.hubs:
                self._ip(
                    self.ns(hub.name),
                    f"route add {lan.gateway6.network} via {lan.wan6.ip} dev {WAN_IF}",
                )
        if lan.upstream is not None:
            # Behind another router: everything beyond its LAN goes through it.
            gateway = self.topology.lan(lan.upstream).gateway.ip
            self._ip(ns, f"route add default via {gateway} dev {WAN_IF}")
        self._sysctl(lan.router, "net.ipv4.ip_forward=1")
        if lan.masquerade:
            ports = " random,fully-random" if lan.random_ports else ""
            ruleset = (
                "table ip nat {\n"
                "  chain postrouting {\n"
                "    type nat hook postrouting priority srcnat;\n"
                f'    oifname "{WAN_IF}" masquerade{ports}\n'
                "  }\n"
                "}\n"
            )
            self.run(lan.router, "nft", "-f", "-", stdin_text=ruleset)

    def _build_client(self, client: ClientSpec) -> None:
        ns = self.ns(client.name)
        lan = self.topology.lan(client.lan)
        hub = self.topology.hub_of(client.name)
        self._add_host(client.name)
        self._plug(client.name, f"{client.name}-l", CLIENT_LAN_IF, lan.name)
        self._ip(
            ns,
            f"addr add {client.address} dev {CLIENT_LAN_IF}",
            f"link set {CLIENT_LAN_IF} up",
            f"route add default via {lan.gateway.ip} dev {CLIENT_LAN_IF}",
        )
        self._gateways[client.name] = lan.gateway.ip
        if client.address6 is not None and lan.gateway6 is not None:
            self._ip(
                ns,
                f"addr add {client.address6} dev {CLIENT_LAN_IF} nodad",
                f"route add default via {lan.gateway6.ip} dev {CLIENT_LAN_IF}",
            )
        if lan.isolated:
            self._isolate_port(client.name, True)
        self._start_wireguard(client.name, client.tunnel, client.listen_port)
        # The hub must know the client before the client's first keepalive arrives.
        self.run(
            hub.name,
            "wg", "set", self.topology.wg_interface(hub.name),
            "peer", self.public_key(client.name),
            "allowed-ips", f"{client.tunnel.ip}/32",
        )  # fmt: skip
        self.run(
            client.name,
            "wg", "set", self.topology.wg_interface(client.name),
            *self._hub_peer_args(client),
        )  # fmt: skip
        if client.tunnel.network.prefixlen == client.tunnel.max_prefixlen:
            # A /32 tunnel address brings no route of its own: wg-quick adds one per
            # allowed IP of each peer, so the hub's tunnel network goes via the device.
            self._ip(ns, f"route add {hub.tunnel.network} dev {self.wg_interface(client.name)}")

    def _hub_peer_args(self, client: ClientSpec) -> list[str]:
        """``wg set`` arguments that give ``client`` its hub as its peer."""
        hub = self.topology.hub_of(client.name)
        args = [
            "peer", self.public_key(hub.name),
            "allowed-ips", str(hub.tunnel.network),
            "endpoint",
            f"[{hub.wan6.ip}]:{hub.listen_port}" if client.hub_over_ipv6
            else f"{hub.wan.ip}:{hub.listen_port}",
        ]  # fmt: skip
        if client.keepalive is not None:
            args += ["persistent-keepalive", str(client.keepalive)]
        return args

    def _isolate_port(self, host: str, on: bool) -> None:
        self.run(
            SWITCH_HOST, "bridge", "link", "set", "dev", f"{host}-l",
            "isolated", "on" if on else "off",
        )  # fmt: skip

    def _generate_key(self, host: str) -> None:
        private, public = generate_keypair()
        key_file = self.lab_dir / f"{host}.key"
        write_atomic(key_file, private + "\n")
        self._private_key_files[host] = key_file
        self._state.public_keys[host] = public

    def _start_wireguard(
        self,
        host: str,
        tunnel: IPv4Interface,
        listen_port: int,
        *,
        iface: str | None = None,
        key_name: str | None = None,
    ) -> None:
        # A further device on the host (add_tunnel) brings its own name and key name.
        iface = iface or self.topology.wg_interface(host)
        key_name = key_name or host
        if self.topology.wireguard_kind(host) == "kernel":
            self._generate_key(key_name)
            self._state.interfaces.append(iface)
            self._save()
            self._ip(self.ns(host), f"link add {iface} type wireguard")
        else:
            self._start_wireguard_go(host, iface, key_name)
        self.run(
            host,
            "wg", "set", iface,
            "private-key", str(self._private_key_files[key_name]),
            "listen-port", str(listen_port),
        )  # fmt: skip
        self._ip(self.ns(host), f"addr add {tunnel} dev {iface}", f"link set {iface} up")

    def _start_wireguard_go(self, host: str, iface: str, key_name: str) -> None:
        sock = UAPI_DIR / f"{iface}.sock"
        if sock.exists():
            raise LabError(f"{iface}: UAPI socket {sock} already exists (another lab?)")
        self._generate_key(key_name)
        self._state.interfaces.append(iface)
        self._state.sockets.append(str(sock))
        self._save()
        proc = self.spawn(
            host,
            ["wireguard-go", "-f", iface],
            log_name=f"wireguard-go-{key_name}",
            env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise LabError(
                    f"{iface}: wireguard-go exited with {proc.returncode}; "
                    f"see {self.log_path(f'wireguard-go-{key_name}')}"
                )
            return sock.exists()

        if not wait_for(ready, WG_START_TIMEOUT):
            raise LabError(f"{iface}: no UAPI socket within {WG_START_TIMEOUT:g} s")

    def _wait_handshakes(self, clients: Iterable[ClientSpec]) -> None:
        """Wait until each client that keeps alive has a handshake on its hub's device."""
        waiting: dict[str, list[str]] = {}
        for client in clients:
            if client.keepalive is not None:
                waiting.setdefault(self.topology.hub_of(client.name).name, []).append(client.name)

        def all_seen() -> bool:
            for hub_name, names in waiting.items():
                hub = self.device(hub_name)
                if not all(
                    (peer := hub.peer(self.public_key(name))) is not None
                    and peer.latest_handshake is not None
                    for name in names
                ):
                    return False
            return True

        if not wait_for(all_seen, HANDSHAKE_TIMEOUT, interval=0.05):
            names = [name for names in waiting.values() for name in names]
            hubs = " or ".join(waiting) or "the hub"
            raise LabError(
                f"lab {self.prefix}: {hubs} saw no handshake from some of {names}"
                f" within {HANDSHAKE_TIMEOUT:g} s"
            )
