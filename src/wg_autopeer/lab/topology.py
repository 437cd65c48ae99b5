"""A declarative, pure description of a lab: who lives where, with which addresses.

Nothing here touches the system. ``Topology.validate`` refuses a description
that could not be built (names too long for Linux interfaces, duplicate or
misplaced addresses) before any namespace exists, so a bad description never
leaves half a lab behind.

Naming, derived from the prefix so several labs can run side by side:

* namespace of host ``alice``: ``<prefix>-alice``; the switch namespace holding
  every bridge: ``<prefix>-sw``;
* WireGuard interface of ``alice``: ``<prefix>-alice`` too, because the UAPI
  socket folder ``/var/run/wireguard`` is shared by all namespaces, so the name
  must be unique host-wide, and Linux caps interface names at 15 characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface
from typing import Any, Literal, get_args

from wg_autopeer.errors import LabError

IFNAMSIZ = 15
SWITCH_HOST = "sw"
WAN_BRIDGE = "wan"
# Interface names inside a host namespace; only they need not be unique host-wide.
CLIENT_LAN_IF = "eth0"
WAN_IF = "wan0"
ROUTER_LAN_IF = "lan0"

# No hyphen in a prefix: cleanup deletes every namespace starting with "<prefix>-",
# and a prefix "wap" must never match the namespaces of a lab "wap-x".
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_HOST_RE = re.compile(r"^[a-z][a-z0-9]*$")
_BRIDGE_RE = re.compile(r"^[a-z][a-z0-9]*$")

# Which WireGuard a host runs: wireguard-go with its UAPI socket, or a kernel device (needs
# the wireguard module). The agent drives either; a lab mixes them per host.
WireGuardKind = Literal["userspace", "kernel"]
WIREGUARD_KINDS: tuple[str, ...] = get_args(WireGuardKind)

# Addresses are immutable, so sharing them as dataclass defaults is safe.
DEFAULT_WAN = IPv4Network("203.0.113.0/24")
DEFAULT_HUB_WAN = IPv4Interface("203.0.113.1/24")
DEFAULT_HUB_TUNNEL = IPv4Interface("10.99.0.1/24")
# The WAN's IPv6 side; LANs with IPv6 get a routed /64 of their own (no NAT).
DEFAULT_HUB_WAN6 = IPv6Interface("2001:db8::1/64")


@dataclass(frozen=True)
class HubSpec:
    """The hub: on the WAN with a public address, WireGuard server of every client."""

    name: str = "hub"
    wan: IPv4Interface = DEFAULT_HUB_WAN
    tunnel: IPv4Interface = DEFAULT_HUB_TUNNEL
    wan6: IPv6Interface = DEFAULT_HUB_WAN6
    listen_port: int = 51820
    # Rate limit of the hub's WAN link, each direction; None for no limit. It makes a
    # detour through the hub measurably slower than a direct LAN path.
    rate_mbit: float | None = 20.0
    wireguard: WireGuardKind = "userspace"


@dataclass(frozen=True)
class LanSpec:
    """A LAN bridge behind a NAT router that owns its gateway address."""

    name: str
    router: str
    wan: IPv4Interface
    gateway: IPv4Interface
    masquerade: bool = True
    # A NAT that picks a random source port for every mapping (nftables
    # ``masquerade random,fully-random``), as many carrier and corporate NATs do.
    random_ports: bool = False
    # Wi-Fi client isolation (hotels, guest networks): clients on this LAN reach
    # the router but not each other (bridge ports ``isolated on``).
    isolated: bool = False
    # The LAN this router's WAN side sits on, instead of the WAN: a home router
    # behind a carrier-grade NAT (whose own LAN is the ISP's 100.64.0.0/10 space).
    upstream: str | None = None
    # IPv6: the router's address on the WAN's IPv6 side, and its LAN address, whose
    # /64 it routes (no NAT: the hub sees each client's own address in that /64).
    wan6: IPv6Interface | None = None
    gateway6: IPv6Interface | None = None

    @property
    def network(self) -> IPv4Network:
        return self.gateway.network


@dataclass(frozen=True)
class ClientSpec:
    """A hub client on a LAN, with the hub as its only WireGuard peer."""

    name: str
    lan: str
    address: IPv4Interface
    tunnel: IPv4Interface
    listen_port: int = 51820
    # An IPv6 address in the LAN's /64 (the LAN needs ``gateway6``), and whether the
    # client reaches the hub over IPv6.
    address6: IPv6Interface | None = None
    hub_over_ipv6: bool = False
    keepalive: int | None = 25
    wireguard: WireGuardKind = "userspace"
    # The hub this client is connected to: None for the lab's first hub, else the name
    # of one of ``Topology.extra_hubs``.
    hub: str | None = None


@dataclass(frozen=True)
class Topology:
    """A whole lab. Immutable: ``with_client``/``with_lan`` return a new one."""

    prefix: str
    wan: IPv4Network = DEFAULT_WAN
    hub: HubSpec = field(default_factory=HubSpec)
    lans: tuple[LanSpec, ...] = ()
    clients: tuple[ClientSpec, ...] = ()
    # Further hubs, each a namespace of its own on the WAN, with its own WireGuard device
    # but the first hub's tunnel address plan (several hubs over one registry).
    extra_hubs: tuple[HubSpec, ...] = ()

    # Names -----------------------------------------------------------------

    def ns(self, host: str) -> str:
        """Namespace name of ``host`` (also valid for the switch, ``"sw"``)."""
        return f"{self.prefix}-{host}"

    def wg_interface(self, host: str) -> str:
        """WireGuard interface name of the hub or a client; unique host-wide."""
        return f"{self.prefix}-{host}"

    @property
    def switch_ns(self) -> str:
        return self.ns(SWITCH_HOST)

    @property
    def hubs(self) -> tuple[HubSpec, ...]:
        """The first hub, then the extra ones."""
        return (self.hub, *self.extra_hubs)

    def hosts(self) -> tuple[str, ...]:
        """Every host that gets a namespace, switch excluded: hubs, routers, clients."""
        return (
            *(hub.name for hub in self.hubs),
            *(lan.router for lan in self.lans),
            *(c.name for c in self.clients),
        )

    def wg_hosts(self) -> tuple[str, ...]:
        """Hosts that run WireGuard: the hubs and every client."""
        return (*(hub.name for hub in self.hubs), *(c.name for c in self.clients))

    def hub_spec(self, name: str) -> HubSpec | None:
        """The hub named ``name`` (first or extra), or None when ``name`` is no hub."""
        return next((hub for hub in self.hubs if hub.name == name), None)

    def hub_of(self, client: str) -> HubSpec:
        """The hub client ``client`` is connected to."""
        name = self.client(client).hub
        hub = self.hub if name is None else self.hub_spec(name)
        if hub is None:
            raise LabError(f"client {client!r} is on unknown hub {name!r} in lab {self.prefix!r}")
        return hub

    def hub_clients(self, hub: str) -> tuple[ClientSpec, ...]:
        """The clients connected to hub ``hub``."""
        return tuple(c for c in self.clients if (c.hub or self.hub.name) == hub)

    def wireguard_kind(self, host: str) -> WireGuardKind:
        """Whether the hub or client ``host`` runs wireguard-go or a kernel device."""
        hub = self.hub_spec(host)
        return hub.wireguard if hub is not None else self.client(host).wireguard

    @property
    def uses_kernel_wireguard(self) -> bool:
        return any(self.wireguard_kind(host) == "kernel" for host in self.wg_hosts())

    def namespaces(self) -> tuple[str, ...]:
        return (self.switch_ns, *(self.ns(h) for h in self.hosts()))

    def lan(self, name: str) -> LanSpec:
        for lan in self.lans:
            if lan.name == name:
                return lan
        raise LabError(f"no LAN named {name!r} in lab {self.prefix!r}")

    def client(self, name: str) -> ClientSpec:
        for client in self.clients:
            if client.name == name:
                return client
        raise LabError(f"no client named {name!r} in lab {self.prefix!r}")

    def router_lan(self, router: str) -> LanSpec | None:
        for lan in self.lans:
            if lan.router == router:
                return lan
        return None

    # Changes ---------------------------------------------------------------

    def with_client(self, spec: ClientSpec) -> Topology:
        return replace(self, clients=(*self.clients, spec))

    def with_lan(self, spec: LanSpec) -> Topology:
        return replace(self, lans=(*self.lans, spec))

    def with_hub(self, spec: HubSpec) -> Topology:
        return replace(self, extra_hubs=(*self.extra_hubs, spec))

    def with_client_replaced(self, spec: ClientSpec) -> Topology:
        return replace(
            self, clients=tuple(spec if c.name == spec.name else c for c in self.clients)
        )

    # Validation ------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``LabError`` naming every problem that would stop the lab being built."""
        problems = self.problems()
        if problems:
            raise LabError(f"invalid topology {self.prefix!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem found, in a stable order; empty when the topology can be built."""
        problems: list[str] = []
        if not _PREFIX_RE.match(self.prefix):
            problems.append(
                f"prefix {self.prefix!r} must be 1-8 lower-case letters/digits, first a letter"
            )
        problems += self._name_problems()
        problems += self._address_problems()
        problems += self._port_problems()
        return problems

    def _name_problems(self) -> list[str]:
        problems: list[str] = []
        hosts = self.hosts()
        seen: set[str] = {SWITCH_HOST}
        for host in hosts:
            if not _HOST_RE.match(host):
                problems.append(f"host name {host!r} must be lower-case letters/digits")
            if host in seen:
                problems.append(f"host name {host!r} is used twice (or is reserved)")
            seen.add(host)
            # The switch-side veth end is named "<host>-<x>", 2 characters longer.
            if len(host) + 2 > IFNAMSIZ:
                problems.append(f"host name {host!r} is too long for its switch-side link")
        for host in self.wg_hosts():
            name = self.wg_interface(host)
            if len(name) > IFNAMSIZ:
                problems.append(
                    f"WireGuard interface {name!r} is longer than {IFNAMSIZ} characters"
                )
        bridges = [WAN_BRIDGE, *(lan.name for lan in self.lans)]
        for bridge in bridges:
            if not _BRIDGE_RE.match(bridge) or len(bridge) > IFNAMSIZ:
                problems.append(f"LAN name {bridge!r} must be 1-15 lower-case letters/digits")
        for bridge in sorted({b for b in bridges if bridges.count(b) > 1}):
            problems.append(f"LAN name {bridge!r} is used twice (or is reserved)")
        lan_names = {lan.name for lan in self.lans}
        hub_names = {hub.name for hub in self.hubs}
        for client in self.clients:
            if client.lan not in lan_names:
                problems.append(f"client {client.name!r} is on unknown LAN {client.lan!r}")
            if client.hub is not None and client.hub not in hub_names:
                problems.append(f"client {client.name!r} is on unknown hub {client.hub!r}")
        return problems

    def _address_problems(self) -> list[str]:
        problems: list[str] = []
        wan_owners: dict[IPv4Address, str] = {}
        lans = {lan.name: lan for lan in self.lans}
        for lan in self.lans:
            if lan.upstream is None:
                continue
            upstream = lans.get(lan.upstream)
            if upstream is None or upstream.upstream is not None:
                problems.append(
                    f"LAN {lan.name}: upstream {lan.upstream!r} is not a LAN on the WAN"
                )
            elif lan.wan.network != upstream.network or lan.wan.ip == upstream.gateway.ip:
                problems.append(
                    f"{lan.router}: WAN address {lan.wan} is no host of {upstream.name}"
                )
        # Extra hubs last: a clash names the one that joined later.
        for owner, iface in [
            (self.hub.name, self.hub.wan),
            *((lan.router, lan.wan) for lan in self.lans if lan.upstream is None),
            *((hub.name, hub.wan) for hub in self.extra_hubs),
        ]:
            if iface.network != self.wan:
                problems.append(f"{owner}: WAN address {iface} is not in {self.wan}")
            if iface.ip in (self.wan.network_address, self.wan.broadcast_address):
                problems.append(f"{owner}: WAN address {iface} is not a host address")
            if iface.ip in wan_owners:
                problems.append(
                    f"{owner}: WAN address {iface.ip} is already {wan_owners[iface.ip]}'s"
                )
            wan_owners.setdefault(iface.ip, owner)

        wan6_owners: dict[IPv6Interface, str] = {}
        for hub in self.hubs:
            if hub.wan6 in wan6_owners:
                problems.append(
                    f"{hub.name}: WAN address {hub.wan6} is already {wan6_owners[hub.wan6]}'s"
                )
            wan6_owners.setdefault(hub.wan6, hub.name)

        tunnel_net = self.hub.tunnel.network
        # Every hub is the gateway of the one tunnel address plan, each in its own namespace.
        for hub in self.extra_hubs:
            if hub.tunnel != self.hub.tunnel:
                problems.append(
                    f"{hub.name}: tunnel address {hub.tunnel} is not"
                    f" the first hub's {self.hub.tunnel}"
                )
        tunnel_owners: dict[IPv4Address, str] = {self.hub.tunnel.ip: self.hub.name}
        for client in self.clients:
            if client.tunnel.ip not in tunnel_net:
                problems.append(
                    f"{client.name}: tunnel address {client.tunnel} is not in {tunnel_net}"
                )
            if client.tunnel.ip in tunnel_owners:
                problems.append(
                    f"{client.name}: tunnel address {client.tunnel.ip} is already "
                    f"{tunnel_owners[client.tunnel.ip]}'s"
                )
            tunnel_owners.setdefault(client.tunnel.ip, client.name)

        for lan in self.lans:
            if lan.network.overlaps(self.wan) or lan.network.overlaps(tunnel_net):
                problems.append(f"LAN {lan.name}: {lan.network} overlaps the WAN or the tunnel")
            owners: dict[IPv4Address, str] = {lan.gateway.ip: lan.router}
            for client in (c for c in self.clients if c.lan == lan.name):
                if client.address.network != lan.network:
                    problems.append(
                        f"{client.name}: LAN address {client.address} is not in {lan.network}"
                    )
                if client.address.ip in owners:
                    problems.append(
                        f"{client.name}: LAN address {client.address.ip} is already "
                        f"{owners[client.address.ip]}'s"
                    )
                owners.setdefault(client.address.ip, client.name)
        return problems

    def _port_problems(self) -> list[str]:
        problems: list[str] = []
        ports = [
            *((hub.name, hub.listen_port) for hub in self.hubs),
            *((c.name, c.listen_port) for c in self.clients),
        ]
        for owner, kind in [
            *((hub.name, hub.wireguard) for hub in self.hubs),
            *((c.name, c.wireguard) for c in self.clients),
        ]:
            if kind not in WIREGUARD_KINDS:
                problems.append(f"{owner}: WireGuard {kind!r} is not one of {WIREGUARD_KINDS}")
        for owner, port in ports:
            if not 1 <= port <= 65535:
                problems.append(f"{owner}: listen port {port} is out of range")
        for client in self.clients:
            if client.keepalive is not None and not 1 <= client.keepalive <= 65535:
                problems.append(f"{client.name}: keepalive {client.keepalive} is out of range")
        for hub in self.hubs:
            if hub.rate_mbit is not None and hub.rate_mbit <= 0:
                problems.append(f"{hub.name} rate {hub.rate_mbit} Mbit/s must be positive")
        return problems


_TUNNEL_NAME_RE = re.compile(r"^[a-z0-9]{1,4}$")


@dataclass(frozen=True)
class Uplink:
    """A further LAN link of a client beside its first (Wi-Fi beside Ethernet, say).

    ``Lab.add_uplink`` builds it: ``ifname`` in the client's namespace, plugged into
    LAN ``lan``'s bridge through ``switch_end``, with its own default route.
    """

    host: str
    lan: str
    address: IPv4Interface
    metric: int
    ifname: str = ""
    switch_end: str = ""

    def problems(self, topology: Topology) -> list[str]:
        """Why this uplink cannot join ``topology``; empty when it can."""
        problems: list[str] = []
        if self.host not in {c.name for c in topology.clients}:
            problems.append(f"uplink: {self.host!r} is not a client")
        if self.lan not in {lan.name for lan in topology.lans}:
            return [*problems, f"uplink: no LAN named {self.lan!r}"]
        lan = topology.lan(self.lan)
        taken = {lan.gateway.ip, *(c.address.ip for c in topology.clients if c.lan == lan.name)}
        if self.address.network != lan.network:
            problems.append(f"uplink {self.host}: {self.address} is not in {lan.network}")
        elif self.address.ip in (lan.network.network_address, lan.network.broadcast_address):
            problems.append(f"uplink {self.host}: {self.address} is not a host address")
        if self.address.ip in taken:
            problems.append(f"uplink {self.host}: {self.address.ip} is already taken on {lan.name}")
        if not 0 <= self.metric <= 0xFFFFFFFF:
            problems.append(f"uplink {self.host}: metric {self.metric} is out of range")
        return problems


@dataclass(frozen=True)
class ExtraTunnel:
    """A further WireGuard network beside the lab's first: the hub and some clients each get
    one more device, with its own key, ``listen_port`` (the same on every end) and addresses.

    Devices are named ``<prefix>-<host>-<name>``: the hyphen keeps them apart from the
    first devices ``<prefix>-<host>`` of any host (host names have none), and the prefix
    keeps them apart from other labs. ``public_keys`` is filled once the lab built it.
    """

    name: str
    hub: IPv4Interface
    clients: Mapping[str, IPv4Interface]
    listen_port: int
    public_keys: Mapping[str, str] = field(default_factory=dict)

    def hosts(self, topology: Topology) -> tuple[str, ...]:
        """The hub first, then the clients, each getting a device of this tunnel."""
        return (topology.hub.name, *self.clients)

    def interface(self, topology: Topology, host: str) -> str:
        """This tunnel's device on ``host``; unique host-wide."""
        return f"{topology.wg_interface(host)}-{self.name}"

    def key_name(self, host: str) -> str:
        """Under which name the lab keeps ``host``'s key for this tunnel."""
        return f"{host}-{self.name}"

    def address(self, topology: Topology, host: str) -> IPv4Interface:
        return self.hub if host == topology.hub.name else self.clients[host]

    def public_key(self, host: str) -> str:
        try:
            return self.public_keys[host]
        except KeyError:
            raise LabError(f"tunnel {self.name}: {host} has no key (not built yet?)") from None

    def problems(self, topology: Topology) -> list[str]:
        """Why this tunnel cannot join ``topology``; empty when it can."""
        problems: list[str] = []
        if not _TUNNEL_NAME_RE.match(self.name):
            problems.append(f"tunnel name {self.name!r} must be 1-4 lower-case letters/digits")
        clients = {c.name: c for c in topology.clients}
        for host in self.clients:
            if host not in clients:
                problems.append(f"tunnel {self.name}: {host!r} is not a client")
        for host in self.hosts(topology):
            name = self.interface(topology, host)
            if len(name) > IFNAMSIZ:
                problems.append(
                    f"WireGuard interface {name!r} is longer than {IFNAMSIZ} characters"
                )
        network = self.hub.network
        if self.hub.ip in (network.network_address, network.broadcast_address):
            problems.append(f"tunnel {self.name}: hub address {self.hub} is not a host address")
        taken = [topology.wan, topology.hub.tunnel.network, *(lan.network for lan in topology.lans)]
        for other in taken:
            if network.overlaps(other):
                problems.append(f"tunnel {self.name}: {network} overlaps {other}")
        owners: dict[IPv4Address, str] = {self.hub.ip: topology.hub.name}
        for host, address in self.clients.items():
            if address.network != network:
                problems.append(f"tunnel {self.name}: {host}'s {address} is not in {network}")
            elif address.ip in (network.network_address, network.broadcast_address):
                problems.append(f"tunnel {self.name}: {host}'s {address} is not a host address")
            if address.ip in owners:
                problems.append(
                    f"tunnel {self.name}: {host}'s {address.ip} is already {owners[address.ip]}'s"
                )
            owners.setdefault(address.ip, host)
        if not 1 <= self.listen_port <= 65535:
            problems.append(f"tunnel {self.name}: listen port {self.listen_port} is out of range")
        # Each end shares its namespace with that host's first device.
        clashes = [topology.hub.name] if self.listen_port == topology.hub.listen_port else []
        clashes += [
            h for h in self.clients if h in clients and clients[h].listen_port == self.listen_port
        ]
        for host in clashes:
            problems.append(
                f"tunnel {self.name}: listen port {self.listen_port} is already {host}'s"
            )
        return problems


def default_topology(prefix: str = "wap", rate_mbit: float | None = 20.0) -> Topology:
    """Hub on the WAN; alice and bob behind NAT router r1 (lan1), carol behind r2 (lan2)."""
    topology = Topology(
        prefix=prefix,
        wan=IPv4Network("203.0.113.0/24"),
        hub=HubSpec(rate_mbit=rate_mbit),
        lans=(
            LanSpec(
                name="lan1",
                router="r1",
                wan=IPv4Interface("203.0.113.10/24"),
                gateway=IPv4Interface("192.168.50.1/24"),
            ),
            LanSpec(
                name="lan2",
                router="r2",
                wan=IPv4Interface("203.0.113.20/24"),
                gateway=IPv4Interface("192.168.60.1/24"),
            ),
        ),
        clients=(
            ClientSpec(
                "alice", "lan1", IPv4Interface("192.168.50.10/24"), IPv4Interface("10.99.0.2/24")
            ),
            ClientSpec(
                "bob", "lan1", IPv4Interface("192.168.50.11/24"), IPv4Interface("10.99.0.3/24")
            ),
            ClientSpec(
                "carol", "lan2", IPv4Interface("192.168.60.10/24"), IPv4Interface("10.99.0.4/24")
            ),
        ),
    )
    topology.validate()
    return topology


def default_with_lan(lan: str, **changes: Any) -> Callable[[str], Topology]:
    """A builder of the default topology with ``changes`` made to LAN ``lan``
    (e.g. ``isolated=True``, ``random_ports=True``)."""

    def build(prefix: str) -> Topology:
        base = default_topology(prefix)
        lans = tuple(replace(spec, **changes) if spec.name == lan else spec for spec in base.lans)
        return replace(base, lans=lans)

    return build
