"""Build a ``Topology`` out of network namespaces with real WireGuard, and tear it down.

Each hub or client runs wireguard-go (the default) or a kernel device, as its spec's
``wireguard`` says; a kernel device lives and dies with its namespace.

Everything the lab creates lives in namespaces named ``<prefix>-*``; bridges live in
the switch namespace ``<prefix>-sw``, so nothing is created in the host's root
namespace. Every resource is recorded in a state file *before* it exists
(``<state_dir>/<prefix>.json``, written atomically, mode 0600), so ``down`` and
``cleanup_leftovers`` can undo a lab whose Python process died half-way.

Processes are only ever ended by recorded PID, and only when their start time
(from ``/proc/<pid>/stat``) still matches, so a reused PID is never killed.

``Lab`` is the façade; the work is split by concern:

* ``netns``: running one command, namespaces by prefix, process records and ending them;
* ``state``: the state file, and teardown from it (``down``, crash cleanup, status);
* ``wgtools``: keys, ``wg show dump`` parsing, the UAPI socket folder;
* ``build``: ``LabBuilder``, the base of ``Lab``: what a lab owns, running things in its
  namespaces, and the steps that build bridges, routers, NAT and WireGuard devices;
* here: the lifecycle, names and views, and changes to a running lab.

The lab drives the system with iproute2, nftables, tc and wireguard-tools: it
is a stand-in for the machines of a real network, and a human can re-type any
command it ran (``ip netns exec wap-alice bash``). Product code never uses ``wg``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import subprocess
import time
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface
from pathlib import Path
from types import TracebackType

from wg_autopeer.errors import LabError
from wg_autopeer.lab.build import HANDSHAKE_TIMEOUT, WG_START_TIMEOUT, LabBuilder
from wg_autopeer.lab.netns import (
    KILL_TIMEOUT,
    TERM_TIMEOUT,
    ProcessRecord,
    end_processes,
    kernel_wireguard_unavailable_reason,
    lab_unavailable_reason,
    run_command,
    wait_for,
)
from wg_autopeer.lab.state import (
    CleanupReport,
    LabState,
    LabStatus,
    lab_status,
    read_state,
    teardown,
)
from wg_autopeer.lab.topology import (
    CLIENT_LAN_IF,
    WAN_BRIDGE,
    WAN_IF,
    ClientSpec,
    ExtraTunnel,
    HubSpec,
    LanSpec,
    Topology,
    Uplink,
)
from wg_autopeer.lab.wgtools import UAPI_DIR, parse_wg_dump
from wg_autopeer.wireguard.base import PeerState

log = logging.getLogger(__name__)


class Lab(LabBuilder):
    """A running (or runnable) lab built from a ``Topology``.

    Use it as a context manager, or call ``up()`` and ``down()`` yourself; ``down``
    is idempotent and also runs when ``up`` fails half-way inside ``with``.
    """

    def __init__(self, topology: Topology, state_dir: Path | None = None) -> None:
        super().__init__(topology, state_dir)
        self.up_seconds: float | None = None
        self.down_seconds: float | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def is_up(self) -> bool:
        return self._started

    @property
    def processes(self) -> tuple[ProcessRecord, ...]:
        """Every process the lab started and has not seen end (wireguard-go and ``spawn``)."""
        return tuple(self._state.processes)

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self, *, wait_handshakes: bool = True) -> None:
        """Build every namespace, link and WireGuard device; wait until the hub saw each client.

        Raises ``LabError`` when the host cannot run a lab, when lab ``prefix``
        already has leftovers, or when a step fails (the lab is then half up:
        call ``down()``, which the context manager does for you).
        """
        if self._started:
            raise LabError(f"lab {self.prefix} is already up")
        reason = lab_unavailable_reason()
        if not reason and self.topology.uses_kernel_wireguard:
            reason = kernel_wireguard_unavailable_reason()
        if reason:
            raise LabError(reason)
        leftovers = Lab.status(self.prefix, self.state_dir)
        if leftovers.exists:
            raise LabError(
                f"lab {self.prefix} has leftovers ({', '.join(leftovers.namespaces) or 'state'});"
                f" run `wg-autopeer lab down --prefix {self.prefix}` first"
            )
        started = time.monotonic()
        self.lab_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._started = True
        self._save()

        topo = self.topology
        self._add_namespace(topo.switch_ns)
        self._add_bridge(WAN_BRIDGE)
        for hub in topo.hubs:
            self._build_hub(hub)
        for lan in topo.lans:
            self._build_lan(lan)
        for client in topo.clients:
            self._build_client(client)
        if wait_handshakes:
            self._wait_handshakes(topo.clients)
        self.up_seconds = time.monotonic() - started
        log.info("lab %s up in %.2f s", self.prefix, self.up_seconds)

    def down(self) -> CleanupReport:
        """End every recorded process, delete the namespaces and UAPI sockets. Idempotent."""
        if not self._started:
            return CleanupReport(self.prefix)
        started = time.monotonic()
        report = teardown(self.prefix, self._state, state_dir=self.state_dir, popens=self._popens)
        for proc in self._popens.values():
            # Already ended above; this only collects the exit status.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_TIMEOUT)
        self._popens.clear()
        self._started = False
        self.down_seconds = time.monotonic() - started
        log.info("lab %s down in %.2f s", self.prefix, self.down_seconds)
        return report

    @staticmethod
    def cleanup_leftovers(prefix: str, state_dir: Path | None = None) -> CleanupReport:
        """Undo lab ``prefix`` after a crash: recorded PIDs, ``<prefix>-*`` namespaces, sockets."""
        state = read_state(prefix, state_dir) or LabState(prefix=prefix)
        return teardown(prefix, state, state_dir=state_dir)

    @staticmethod
    def status(prefix: str, state_dir: Path | None = None) -> LabStatus:
        """What of lab ``prefix`` exists now, from its state file and the system."""
        return lab_status(prefix, state_dir)

    # ---------------------------------------------------------------- names and views

    def tunnel_ip(self, host: str) -> IPv4Address:
        return self.tunnel_interface(host).ip

    def tunnel_interface(self, host: str) -> IPv4Interface:
        hub = self.topology.hub_spec(host)
        if hub is not None:
            return hub.tunnel
        return self.topology.client(host).tunnel

    def lan_ip(self, host: str) -> IPv4Address:
        """A client's LAN address; a router's LAN gateway address; a hub's WAN address."""
        return self.lan_interface(host).ip

    def lan_interface(self, host: str) -> IPv4Interface:
        topo = self.topology
        hub = topo.hub_spec(host)
        if hub is not None:
            return hub.wan
        lan = topo.router_lan(host)
        if lan is not None:
            return lan.gateway
        return topo.client(host).address

    def wan_ip(self, host: str) -> IPv4Address:
        """Public address of a hub or a router; for a client, its router's."""
        topo = self.topology
        hub = topo.hub_spec(host)
        if hub is not None:
            return hub.wan.ip
        lan = topo.router_lan(host)
        if lan is None:
            lan = topo.lan(topo.client(host).lan)
        return lan.wan.ip

    def link_name(self, host: str) -> str:
        """The interface that connects ``host`` to its bridge: eth0 (clients) or wan0."""
        return CLIENT_LAN_IF if host in {c.name for c in self.topology.clients} else WAN_IF

    def ping(self, src: str, dst: IPv4Address | str, count: int = 1, timeout: float = 2.0) -> bool:
        """True when ``src`` got an echo reply from ``dst`` (``timeout`` per reply)."""
        result = self.run(
            src,
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-W",
            f"{timeout:g}",
            str(dst),
            check=False,
            timeout=count * (timeout + 1.0) + 5.0,
        )
        return result.returncode == 0

    wait_for = staticmethod(wait_for)

    def hub_peer(self, host: str) -> PeerState:
        """The view of client ``host``'s hub of it: endpoint, latest handshake, rx/tx bytes."""
        key = self.public_key(host)
        hub = self.topology.hub_of(host).name
        peer = self.device(hub).peer(key)
        if peer is None:
            raise LabError(f"lab {self.prefix}: {hub} has no peer for {host}")
        return peer

    # ---------------------------------------------------------------- changing the lab

    def add_lan(self, spec: LanSpec) -> None:
        """Add a LAN bridge and its NAT router to a running lab."""
        self._require_up()
        topology = self.topology.with_lan(spec)
        topology.validate()
        self.topology = topology
        self._build_lan(spec)

    def add_client(self, spec: ClientSpec, *, wait_handshake: bool = True) -> None:
        """Add a client (with the hub as its peer) to a running lab."""
        self._require_up()
        topology = self.topology.with_client(spec)
        topology.validate()
        self.topology = topology
        self._build_client(spec)
        if wait_handshake:
            self._wait_handshakes((spec,))

    def move_client(self, host: str, lan: str, address: IPv4Interface) -> None:
        """Unplug ``host`` from its LAN and plug it into ``lan`` with ``address``.

        The link goes down and up (as on a real roam), the old address is
        replaced and the default route points to the new LAN's gateway. The
        WireGuard devices are left alone: see ``refresh_hub_endpoint``.
        """
        self._require_up()
        client = self.topology.client(host)
        target = self.topology.lan(lan)
        topology = self.topology.with_client_replaced(
            dataclasses.replace(client, lan=lan, address=address)
        )
        topology.validate()
        ns = self.ns(host)
        self._ip(ns, f"link set {CLIENT_LAN_IF} down")
        self._ip(
            self.topology.switch_ns,
            f"link set {host}-l nomaster",
            f"link set {host}-l master {target.name}",
        )
        self.topology = topology
        self._gateways[host] = target.gateway.ip
        self._ip(
            ns,
            f"addr flush dev {CLIENT_LAN_IF}",
            f"addr add {address} dev {CLIENT_LAN_IF}",
            f"link set {CLIENT_LAN_IF} up",
            f"route replace default via {target.gateway.ip} dev {CLIENT_LAN_IF}",
        )

    def refresh_hub_endpoint(self, host: str) -> None:
        """Set the hub peer's endpoint on client ``host`` again (what an agent does on roam).

        wireguard-go caches the source address of each endpoint and does not drop
        it when that address disappears; re-setting the endpoint clears the cache.
        """
        self._require_up()
        hub = self.topology.hub_of(host)
        self.run(
            host,
            "wg", "set", self.wg_interface(host),
            "peer", self.public_key(hub.name),
            "endpoint", f"{hub.wan.ip}:{hub.listen_port}",
        )  # fmt: skip

    def set_isolation(self, lan: str, on: bool) -> None:
        """Switch client isolation of ``lan`` on or off while the lab runs (as an access
        point's setting would): its clients then reach the router, not each other."""
        self._require_up()
        for client in self.topology.clients:
            if client.lan == lan:
                self._isolate_port(client.name, on)

    def set_address(self, host: str, address: IPv4Interface) -> None:
        """Replace a client's LAN address; its default route survives when still reachable.

        WireGuard devices are left alone: see ``refresh_hub_endpoint``.
        """
        self._require_up()
        client = self.topology.client(host)
        topology = self.topology.with_client_replaced(dataclasses.replace(client, address=address))
        topology.validate()
        self.topology = topology
        self._ip(
            self.ns(host),
            f"addr flush dev {CLIENT_LAN_IF}",
            f"addr add {address} dev {CLIENT_LAN_IF}",
        )
        self._restore_default_route(host)

    def set_default_route(self, host: str, gateway: IPv4Address | None) -> None:
        """Point ``host``'s default route at ``gateway``, or remove it (None)."""
        self._require_up()
        self._gateways[host] = gateway
        if gateway is None:
            self.run(host, "ip", "route", "del", "default", check=False)
        else:
            self.run(host, "ip", "route", "replace", "default", "via", str(gateway))

    def link_set(self, host: str, up: bool) -> None:
        """Take ``host``'s link to its bridge down or up.

        Linux drops the routes of a link that goes down; bringing it up restores
        the default route, as DHCP would on reconnect.
        """
        self._require_up()
        self.run(host, "ip", "link", "set", self.link_name(host), "up" if up else "down")
        if up:
            self._restore_default_route(host)

    def restart_wireguard(self, host: str, *, delete_link: bool = False) -> None:
        """Take ``host``'s WireGuard device away and bring it back, as ``wg-quick down``
        then ``up`` would: same key, listen port and tunnel address, and only the peers
        the lab configured (a client's hub peer; the hub's client peers). Peers added
        since, by an agent or by hand, are gone with the old device.

        ``delete_link`` deletes the interface under the running wireguard-go (which then
        exits by itself) instead of stopping wireguard-go with SIGTERM; a kernel device
        is always deleted and added again.
        """
        self._require_up()
        self._require_wg_host(host)
        iface = self.topology.wg_interface(host)
        if self.topology.wireguard_kind(host) == "kernel":
            # The kernel's device ends with its link: nothing runs for it.
            self._ip(self.ns(host), f"link del dev {iface}", f"link add {iface} type wireguard")
        else:
            self._restart_wireguard_go(host, iface, delete_link=delete_link)
        self._configure_restarted(host, iface)

    def _restart_wireguard_go(self, host: str, iface: str, *, delete_link: bool) -> None:
        sock = UAPI_DIR / f"{iface}.sock"
        log_name = f"wireguard-go-{host}"
        old = [r for r in self._state.processes if r.name == f"{host}:{log_name}"]
        if delete_link:
            self.run(host, "ip", "link", "del", "dev", iface)
        for record in old:
            ending = self._popens.get(record.pid)
            if ending is None:
                end_processes([record])
                continue
            if delete_link:
                # It should exit by itself once its device is gone; stop() ends it if not.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    ending.wait(timeout=TERM_TIMEOUT)
            self.stop(ending)

        def gone() -> bool:
            absent = self.run(host, "ip", "link", "show", "dev", iface, check=False).returncode
            return not sock.exists() and absent != 0

        if not wait_for(gone, WG_START_TIMEOUT):
            raise LabError(f"{iface}: device or UAPI socket still there after wireguard-go ended")
        proc = self.spawn(
            host,
            ["wireguard-go", "-f", iface],
            log_name=log_name,
            env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise LabError(f"{iface}: wireguard-go exited with {proc.returncode}")
            return sock.exists()

        if not wait_for(ready, WG_START_TIMEOUT):
            raise LabError(f"{iface}: no UAPI socket within {WG_START_TIMEOUT:g} s")

    def _configure_restarted(self, host: str, iface: str) -> None:
        """The configuration the lab gave ``host``'s device in ``up``, on the new device."""
        hub = self.topology.hub_spec(host)
        spec = hub or self.topology.client(host)
        self.run(
            host,
            "wg", "set", iface,
            "private-key", str(self.private_key_file(host)),
            "listen-port", str(spec.listen_port),
        )  # fmt: skip
        self._ip(self.ns(host), f"addr add {spec.tunnel} dev {iface}", f"link set {iface} up")
        if hub is not None:
            for client in self.topology.hub_clients(host):
                self.run(
                    host,
                    "wg", "set", iface,
                    "peer", self.public_key(client.name),
                    "allowed-ips", f"{client.tunnel.ip}/32",
                )  # fmt: skip
            return
        client = self.topology.client(host)
        self.run(host, "wg", "set", iface, *self._hub_peer_args(client))

    def add_uplink(self, host: str, lan: str, address: IPv4Interface, *, metric: int) -> str:
        """Give client ``host`` one more LAN link, into ``lan``'s bridge, with ``address`` and a
        default route via that LAN's gateway at ``metric``; returns the link's name there.

        The link is ``eth1``, ``eth2``… (the first free one) in the client's namespace,
        ``<host>-1``, ``<host>-2``… on the bridge. Nothing more needs recording for
        teardown: a veth dies with its namespace. ``link_set`` still drives only the
        first link; take this one down with ``run(host, "ip", "link", "set", ...)``.
        """
        self._require_up()
        spec = Uplink(host, lan, address, metric)
        problems = spec.problems(self.topology)
        if problems:
            raise LabError(f"lab {self.prefix}: " + "; ".join(problems))
        ns = self.ns(host)

        def taken(ifname: str) -> bool:
            return (
                run_command(["ip", "-n", ns, "link", "show", "dev", ifname], check=False).returncode
                == 0
            )

        number = next((n for n in range(1, 10) if not taken(f"eth{n}")), None)
        if number is None:
            raise LabError(f"lab {self.prefix}: {host} has no free uplink name left")
        ifname, gateway = f"eth{number}", self.topology.lan(lan).gateway.ip
        self._plug(host, f"{host}-{number}", ifname, lan)
        self._ip(
            ns,
            f"addr add {address} dev {ifname}",
            f"link set {ifname} up",
            f"route add default via {gateway} dev {ifname} metric {metric}",
        )
        return ifname

    def add_tunnel(
        self,
        name: str,
        network: IPv4Interface,
        clients: Mapping[str, IPv4Interface],
        listen_port: int,
        *,
        wait_handshake: bool = True,
    ) -> ExtraTunnel:
        """A second (third…) WireGuard network: one more device on the hub with ``network``
        as its address, and on each of ``clients`` with its address there.

        Every end gets a new key and its own recorded wireguard-go listening on
        ``listen_port``; each client has the hub as its only peer (endpoint the hub's
        WAN address and that port, the whole tunnel network routed to it, the client's
        keepalive). Waits, like ``up``, until the hub saw a handshake from each client
        that keeps alive. Device names are ``ExtraTunnel.interface``'s.
        """
        self._require_up()
        spec = ExtraTunnel(name, network, dict(clients), listen_port)
        problems = spec.problems(self.topology)
        hosts = spec.hosts(self.topology)
        problems += [
            f"{iface}: UAPI socket already exists"
            for iface in (spec.interface(self.topology, h) for h in hosts)
            if (UAPI_DIR / f"{iface}.sock").exists()
        ]
        if problems:
            raise LabError(f"lab {self.prefix}: " + "; ".join(problems))
        for host in hosts:
            self._start_wireguard(
                host,
                spec.address(self.topology, host),
                listen_port,
                iface=spec.interface(self.topology, host),
                key_name=spec.key_name(host),
            )
        spec = dataclasses.replace(
            spec, public_keys={h: self._state.public_keys[spec.key_name(h)] for h in hosts}
        )
        hub = self.topology.hub
        hub_iface = spec.interface(self.topology, hub.name)
        for host, address in spec.clients.items():
            # The hub must know the client before the client's first keepalive arrives.
            self.run(
                hub.name,
                "wg", "set", hub_iface,
                "peer", spec.public_key(host), "allowed-ips", f"{address.ip}/32",
            )  # fmt: skip
            peer_args = [
                "peer", spec.public_key(hub.name),
                "allowed-ips", str(network.network),
                "endpoint", f"{hub.wan.ip}:{listen_port}",
            ]  # fmt: skip
            keepalive = self.topology.client(host).keepalive
            if keepalive is not None:
                peer_args += ["persistent-keepalive", str(keepalive)]
            self.run(host, "wg", "set", spec.interface(self.topology, host), *peer_args)
        if wait_handshake:
            waiting = [
                spec.public_key(h) for h in spec.clients if self.topology.client(h).keepalive
            ]

            def all_seen() -> bool:
                dump = self.run(hub.name, "wg", "show", hub_iface, "dump").stdout
                device = parse_wg_dump(hub_iface, dump)
                return all(
                    (peer := device.peer(key)) is not None and peer.latest_handshake is not None
                    for key in waiting
                )

            if not wait_for(all_seen, HANDSHAKE_TIMEOUT):
                raise LabError(
                    f"lab {self.prefix}: {hub_iface} saw no handshake from some of"
                    f" {list(spec.clients)} within {HANDSHAKE_TIMEOUT:g} s"
                )
        return spec

    def add_second_hub(
        self,
        name: str,
        listen_port: int,
        clients: Iterable[str],
        *,
        wan: IPv4Interface | None = None,
    ) -> HubSpec:
        """A further hub ``name`` in a namespace of its own: on the WAN bridge with ``wan``
        (default: the first free address after the first hub's), its own WireGuard device
        (own key, ``listen_port``) with the first hub's tunnel address, the same address
        plan. Each of ``clients`` moves from its hub to the new one: its peer there removed,
        its only peer now the new hub, which the client reaches over the WAN like any hub.

        Waits until the new hub saw a handshake from each moved client (the server
        identifies callers by it). Returns the new hub's spec.
        """
        self._require_up()
        first = self.topology.hub
        wan = wan or self._free_wan_address()
        offset = int(wan.ip) - int(wan.network.network_address)
        wan6 = IPv6Interface(
            f"{first.wan6.network.network_address + offset}/{first.wan6.network.prefixlen}"
        )
        spec = dataclasses.replace(first, name=name, wan=wan, wan6=wan6, listen_port=listen_port)
        moved = list(clients)
        topology = self.topology.with_hub(spec)
        for host in moved:
            topology = topology.with_client_replaced(
                dataclasses.replace(topology.client(host), hub=name)
            )
        topology.validate()
        old_hubs = {host: self.topology.hub_of(host) for host in moved}
        self.topology = topology
        self._build_hub(spec)
        routes = [
            f"route add {lan.gateway6.network} via {lan.wan6.ip} dev {WAN_IF}"
            for lan in self.topology.lans
            if lan.wan6 is not None and lan.gateway6 is not None
        ]
        if routes:
            # As the first hub does (``_build_lan``): each IPv6 LAN's /64 via its router.
            self._ip(self.ns(name), *routes)
        iface = self.wg_interface(name)
        for host in moved:
            old = old_hubs[host]
            self.run(old.name, "wg", "set", self.wg_interface(old.name),
                     "peer", self.public_key(host), "remove")  # fmt: skip
            self.run(name, "wg", "set", iface,
                     "peer", self.public_key(host),
                     "allowed-ips", f"{self.tunnel_ip(host)}/32")  # fmt: skip
            client_if = self.wg_interface(host)
            self.run(host, "wg", "set", client_if, "peer", self.public_key(old.name), "remove")
            self.run(host, "wg", "set", client_if,
                     *self._hub_peer_args(self.topology.client(host)))  # fmt: skip
            # A first handshake now, not at the next keepalive.
            self.ping(host, spec.tunnel.ip, timeout=1.0)
        self._wait_handshakes(self.topology.client(host) for host in moved)
        return spec

    def _free_wan_address(self) -> IPv4Interface:
        """The first WAN address after the first hub's that no hub or router holds."""
        topo = self.topology
        taken = {hub.wan.ip for hub in topo.hubs} | {lan.wan.ip for lan in topo.lans}
        for address in topo.wan.hosts():
            if address > topo.hub.wan.ip and address not in taken:
                return IPv4Interface(f"{address}/{topo.wan.prefixlen}")
        raise LabError(f"lab {self.prefix}: no free address left on the WAN {topo.wan}")

    def _restore_default_route(self, host: str) -> None:
        gateway = self._gateways.get(host)
        if gateway is None or host not in {c.name for c in self.topology.clients}:
            return
        if gateway in self.topology.client(host).address.network:
            self.run(host, "ip", "route", "replace", "default", "via", str(gateway))
