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

The lab drives the system with iproute2, nftables, tc and wireguard-tools: it
is a stand-in for the machines of a real network, and a human can re-type any
command it ran (``ip netns exec wap-alice bash``). Product code never uses ``wg``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface, ip_address, ip_network
from pathlib import Path
from types import TracebackType
from typing import Any

from wg_autopeer.errors import LabError
from wg_autopeer.lab.topology import (
    CLIENT_LAN_IF,
    ROUTER_LAN_IF,
    SWITCH_HOST,
    WAN_BRIDGE,
    WAN_IF,
    ClientSpec,
    ExtraTunnel,
    HubSpec,
    LanSpec,
    Topology,
    Uplink,
)
from wg_autopeer.wireguard.base import DeviceState, Endpoint, IPNetwork, PeerState

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/wg-autopeer-lab")
UAPI_DIR = Path("/var/run/wireguard")
STATE_VERSION = 1
REQUIRED_TOOLS = ("ip", "wireguard-go", "wg", "nft", "tc", "ping", "sysctl")

_TERM_TIMEOUT = 5.0
_KILL_TIMEOUT = 2.0
_WG_START_TIMEOUT = 10.0
_HANDSHAKE_TIMEOUT = 15.0


# --------------------------------------------------------------------------- helpers


def lab_unavailable_reason() -> str | None:
    """Why no lab can be built here (not root, a tool or /dev/net/tun missing), or None."""
    if os.geteuid() != 0:
        return "needs root and network namespaces (not running as root)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs root and network namespaces (missing: {', '.join(missing)})"
    if not Path("/dev/net/tun").exists():
        return "needs root and network namespaces (no /dev/net/tun for wireguard-go)"
    return None


def kernel_wireguard_unavailable_reason() -> str | None:
    """Why this kernel cannot host WireGuard devices (no module, built in or loadable), or None.

    Looked up in /sys and the module index rather than by loading it, so asking changes
    nothing; scripts/vm.sh boots a kernel that has the module when this one lacks it.
    """
    if Path("/sys/module/wireguard").exists():
        return None
    release = os.uname().release
    for index in ("modules.dep", "modules.builtin"):
        path = Path("/lib/modules", release, index)
        with contextlib.suppress(OSError):
            if "/wireguard.ko" in path.read_text():
                return None
    return f"needs kernel WireGuard (kernel {release} has no wireguard module)"


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds passed; True when it was."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _run(
    argv: Sequence[str],
    *,
    stdin_text: str | None = None,
    check: bool = True,
    timeout: float = 10.0,
) -> subprocess.CompletedProcess[str]:
    command = shlex.join(argv)
    try:
        result = subprocess.run(
            list(argv),
            input=stdin_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{command}: no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise LabError(f"{command}: {exc}") from exc
    if check and result.returncode != 0:
        raise LabError(f"{command} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def list_namespaces(prefix: str) -> list[str]:
    """Every network namespace of the lab ``prefix`` (``<prefix>-*``) that exists now."""
    result = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return sorted(name for name in names if name.startswith(f"{prefix}-"))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name in parentheses may itself contain spaces and ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (field 22 of /proc/<pid>/stat)."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _reap(pid: int) -> None:
    # A child of ours (a lab whose object was dropped in this process) stays a zombie
    # until someone waits for it; a stranger's PID raises ChildProcessError.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def process_alive(pid: int, start_time: int) -> bool:
    """True when ``pid`` is still the process that started at ``start_time`` and not a zombie."""
    _reap(pid)
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == start_time and stat[0] not in ("Z", "X")


@dataclass(frozen=True)
class ProcessRecord:
    """A process the lab started: enough to end it later without hitting a reused PID."""

    pid: int
    start_time: int
    name: str
    argv: tuple[str, ...] = ()


def end_processes(
    records: Iterable[ProcessRecord],
    *,
    popens: Mapping[int, subprocess.Popen[bytes]] | None = None,
    timeout: float = _TERM_TIMEOUT,
) -> list[ProcessRecord]:
    """SIGTERM every recorded process still alive, wait up to ``timeout``, then SIGKILL.

    Returns the records that were alive and got a signal.
    """
    popens = popens or {}
    alive = [r for r in records if process_alive(r.pid, r.start_time)]
    for record in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)

    def all_gone(victims: list[ProcessRecord]) -> bool:
        for record in victims:
            proc = popens.get(record.pid)
            if proc is not None:
                proc.poll()
        return not any(process_alive(r.pid, r.start_time) for r in victims)

    if not wait_for(lambda: all_gone(alive), timeout):
        stubborn = [r for r in alive if process_alive(r.pid, r.start_time)]
        for record in stubborn:
            log.warning("lab: %s (pid %d) ignored SIGTERM, killing it", record.name, record.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
        if not wait_for(lambda: all_gone(stubborn), _KILL_TIMEOUT):
            names = ", ".join(f"{r.name} ({r.pid})" for r in stubborn)
            raise LabError(f"processes survived SIGKILL: {names}")
    return alive


# --------------------------------------------------------------------------- state


@dataclass
class LabState:
    """What the state file records; every list only grows until teardown."""

    prefix: str
    namespaces: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    public_keys: dict[str, str] = field(default_factory=dict)
    lab_dir: str = ""
    version: int = STATE_VERSION

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, prefix: str, text: str) -> LabState:
        """Read a state file; a torn or foreign file yields what could be read, never raises."""
        try:
            data: Any = json.loads(text)
        except ValueError:
            log.warning("lab %s: state file is unreadable, cleaning by prefix only", prefix)
            return cls(prefix=prefix)
        if not isinstance(data, dict):
            return cls(prefix=prefix)

        def strings(key: str) -> list[str]:
            value = data.get(key)
            return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

        processes: list[ProcessRecord] = []
        for item in data.get("processes") or []:
            try:
                processes.append(
                    ProcessRecord(
                        pid=int(item["pid"]),
                        start_time=int(item["start_time"]),
                        name=str(item.get("name", "")),
                        argv=tuple(str(a) for a in item.get("argv", ())),
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue
        keys = data.get("public_keys")
        return cls(
            prefix=prefix,
            namespaces=strings("namespaces"),
            interfaces=strings("interfaces"),
            sockets=strings("sockets"),
            processes=processes,
            public_keys={str(k): str(v) for k, v in keys.items()} if isinstance(keys, dict) else {},
            lab_dir=str(data.get("lab_dir", "")),
            version=int(data.get("version", 0)) if str(data.get("version", "")).isdigit() else 0,
        )


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def state_path(prefix: str, state_dir: Path | None = None) -> Path:
    return (state_dir or DEFAULT_STATE_DIR) / f"{prefix}.json"


def read_state(prefix: str, state_dir: Path | None = None) -> LabState | None:
    """The recorded state of lab ``prefix``, or None when there is no state file."""
    path = state_path(prefix, state_dir)
    try:
        return LabState.from_json(prefix, path.read_text())
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class CleanupReport:
    """What a teardown removed."""

    prefix: str
    processes: tuple[ProcessRecord, ...] = ()
    namespaces: tuple[str, ...] = ()
    sockets: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.processes or self.namespaces or self.sockets)


@dataclass(frozen=True)
class LabStatus:
    """What of lab ``prefix`` exists right now."""

    prefix: str
    state_file: Path | None
    namespaces: tuple[str, ...]
    live_processes: tuple[ProcessRecord, ...]
    sockets: tuple[str, ...]
    public_keys: Mapping[str, str]

    @property
    def exists(self) -> bool:
        return bool(self.state_file or self.namespaces or self.live_processes or self.sockets)


def _prefix_sockets(prefix: str) -> list[Path]:
    # Interface names are "<prefix>-<host>" and a prefix has no hyphen, so this
    # never matches another lab's sockets.
    return sorted(UAPI_DIR.glob(f"{prefix}-*.sock"))


def _teardown(
    prefix: str,
    state: LabState,
    *,
    state_dir: Path | None,
    popens: Mapping[int, subprocess.Popen[bytes]] | None = None,
) -> CleanupReport:
    errors: list[str] = []
    ended: list[ProcessRecord] = []
    # Spawned programs (agents, servers) first, while the WireGuard devices they clean
    # up on SIGTERM still exist; the wireguard-go daemons after them.
    devices = [r for r in state.processes if "wireguard-go" in r.argv]
    programs = [r for r in state.processes if r not in devices]
    for group in (programs, devices):
        try:
            ended += end_processes(group, popens=popens)
        except LabError as exc:
            errors.append(str(exc))

    namespaces = sorted(set(state.namespaces) | set(list_namespaces(prefix)))
    # Hosts first, the switch last: a veth dies with either end, so order is cosmetic,
    # but it keeps the switch (and its bridges) until nothing is plugged into it.
    namespaces.sort(key=lambda name: name == f"{prefix}-sw")
    removed_ns: list[str] = []
    recorded = {r.pid for r in state.processes}
    for name in namespaces:
        if not Path("/run/netns", name).exists():
            continue
        strangers = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        strangers = [pid for pid in strangers if int(pid) not in recorded]
        if strangers:
            # Not ours to kill: they keep the namespace (and its links) alive after
            # the name is gone, so say so.
            log.warning("lab %s: unrecorded processes %s still run in %s", prefix, strangers, name)
        result = _run(["ip", "netns", "del", name], check=False)
        if result.returncode == 0:
            removed_ns.append(name)
        else:
            errors.append(f"ip netns del {name}: {result.stderr.strip()}")

    sockets = {Path(s) for s in state.sockets}
    sockets |= {UAPI_DIR / f"{iface}.sock" for iface in state.interfaces}
    sockets |= set(_prefix_sockets(prefix))
    removed_sockets: list[str] = []
    for sock in sorted(sockets):
        try:
            sock.unlink()
            removed_sockets.append(str(sock))
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"{sock}: {exc}")

    lab_dir = Path(state.lab_dir) if state.lab_dir else (state_dir or DEFAULT_STATE_DIR) / prefix
    for key_file in lab_dir.glob("*.key") if lab_dir.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            key_file.unlink()
    if errors:
        raise LabError(f"lab {prefix}: teardown incomplete: " + "; ".join(errors))
    with contextlib.suppress(FileNotFoundError):
        state_path(prefix, state_dir).unlink()
    return CleanupReport(prefix, tuple(ended), tuple(removed_ns), tuple(removed_sockets))


def _parse_endpoint(text: str) -> Endpoint | None:
    if text in ("(none)", ""):
        return None
    host, _, port = text.rpartition(":")
    return Endpoint(ip_address(host.strip("[]")), int(port))


def parse_wg_dump(interface: str, text: str) -> DeviceState:
    """Parse ``wg show <interface> dump`` (private key left out)."""
    lines = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not lines or len(lines[0]) < 4:
        raise LabError(f"{interface}: unexpected `wg show dump` output: {text!r}")
    _private, public, port, fwmark = lines[0][:4]
    peers: list[PeerState] = []
    for cols in lines[1:]:
        if len(cols) < 8:
            raise LabError(f"{interface}: unexpected peer line in `wg show dump`: {cols!r}")
        pub, _psk, endpoint, allowed, handshake, rx, tx, keepalive = cols[:8]
        allowed_ips: tuple[IPNetwork, ...] = ()
        if allowed not in ("(none)", ""):
            allowed_ips = tuple(ip_network(a, strict=False) for a in allowed.split(","))
        peers.append(
            PeerState(
                public_key=pub,
                allowed_ips=allowed_ips,
                endpoint=_parse_endpoint(endpoint),
                latest_handshake=float(handshake) if handshake != "0" else None,
                rx_bytes=int(rx),
                tx_bytes=int(tx),
                persistent_keepalive=None if keepalive == "off" else int(keepalive),
            )
        )
    return DeviceState(
        name=interface,
        public_key=public if public != "(none)" else None,
        listen_port=int(port) if port not in ("0", "off") else None,
        peers=tuple(peers),
        fwmark=None if fwmark == "off" else int(fwmark, 0),
    )


# --------------------------------------------------------------------------- the lab


class Lab:
    """A running (or runnable) lab built from a ``Topology``.

    Use it as a context manager, or call ``up()`` and ``down()`` yourself; ``down``
    is idempotent and also runs when ``up`` fails half-way inside ``with``.
    """

    def __init__(self, topology: Topology, state_dir: Path | None = None) -> None:
        topology.validate()
        self.topology = topology
        self.state_dir = state_dir or DEFAULT_STATE_DIR
        self.lab_dir = self.state_dir / topology.prefix
        self._state = LabState(prefix=topology.prefix, lab_dir=str(self.lab_dir))
        self._popens: dict[int, subprocess.Popen[bytes]] = {}
        self._private_key_files: dict[str, Path] = {}
        self._gateways: dict[str, IPv4Address | None] = {}
        self._started = False
        self.up_seconds: float | None = None
        self.down_seconds: float | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def prefix(self) -> str:
        return self.topology.prefix

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
        report = _teardown(self.prefix, self._state, state_dir=self.state_dir, popens=self._popens)
        for proc in self._popens.values():
            # Already ended above; this only collects the exit status.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_KILL_TIMEOUT)
        self._popens.clear()
        self._started = False
        self.down_seconds = time.monotonic() - started
        log.info("lab %s down in %.2f s", self.prefix, self.down_seconds)
        return report

    @staticmethod
    def cleanup_leftovers(prefix: str, state_dir: Path | None = None) -> CleanupReport:
        """Undo lab ``prefix`` after a crash: recorded PIDs, ``<prefix>-*`` namespaces, sockets."""
        state = read_state(prefix, state_dir) or LabState(prefix=prefix)
        return _teardown(prefix, state, state_dir=state_dir)

    @staticmethod
    def status(prefix: str, state_dir: Path | None = None) -> LabStatus:
        """What of lab ``prefix`` exists now, from its state file and the system."""
        path = state_path(prefix, state_dir)
        state = read_state(prefix, state_dir) or LabState(prefix=prefix)
        sockets = {str(s) for s in _prefix_sockets(prefix)}
        sockets |= {s for s in state.sockets if Path(s).exists()}
        return LabStatus(
            prefix=prefix,
            state_file=path if path.exists() else None,
            namespaces=tuple(list_namespaces(prefix)),
            live_processes=tuple(r for r in state.processes if process_alive(r.pid, r.start_time)),
            sockets=tuple(sorted(sockets)),
            public_keys=dict(state.public_keys),
        )

    # ---------------------------------------------------------------- names and data

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
        return _run(
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
                    proc.wait(timeout=_KILL_TIMEOUT)
        if proc.returncode is not None:
            self._popens.pop(proc.pid, None)
            self._state.processes = [r for r in self._state.processes if r.pid != proc.pid]
            if self._started:
                self._save()
        return proc.returncode

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

    # ---------------------------------------------------------------- WireGuard views

    def device(self, host: str) -> DeviceState:
        """``host``'s WireGuard device as ``wg show dump`` reports it (no private key)."""
        iface = self.wg_interface(host)
        return parse_wg_dump(iface, self.run(host, "wg", "show", iface, "dump").stdout)

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
                    ending.wait(timeout=_TERM_TIMEOUT)
            self.stop(ending)

        def gone() -> bool:
            absent = self.run(host, "ip", "link", "show", "dev", iface, check=False).returncode
            return not sock.exists() and absent != 0

        if not wait_for(gone, _WG_START_TIMEOUT):
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

        if not wait_for(ready, _WG_START_TIMEOUT):
            raise LabError(f"{iface}: no UAPI socket within {_WG_START_TIMEOUT:g} s")

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
                _run(["ip", "-n", ns, "link", "show", "dev", ifname], check=False).returncode == 0
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

            if not wait_for(all_seen, _HANDSHAKE_TIMEOUT):
                raise LabError(
                    f"lab {self.prefix}: {hub_iface} saw no handshake from some of"
                    f" {list(spec.clients)} within {_HANDSHAKE_TIMEOUT:g} s"
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

    # ---------------------------------------------------------------- building blocks

    def _require_up(self) -> None:
        if not self._started:
            raise LabError(f"lab {self.prefix} is not up")

    def _require_wg_host(self, host: str) -> None:
        if host not in self.topology.wg_hosts():
            raise LabError(f"lab {self.prefix}: {host!r} runs no WireGuard")

    def _save(self) -> None:
        _write_atomic(state_path(self.prefix, self.state_dir), self._state.to_json())

    def _ip(self, ns: str, *commands: str) -> None:
        # One `ip -batch` per step keeps bring-up fast; it stops at the first error.
        _run(["ip", "-n", ns, "-batch", "-"], stdin_text="\n".join(commands) + "\n")

    def _sysctl(self, host: str, *settings: str) -> None:
        self.run(host, "sysctl", "-q", "-w", *settings)

    def _add_namespace(self, name: str) -> None:
        # Recorded before it exists: a crash between the two leaves a name to delete.
        self._state.namespaces.append(name)
        self._save()
        _run(["ip", "netns", "add", name])
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
        _run(
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

    def _isolate_port(self, host: str, on: bool) -> None:
        self.run(
            SWITCH_HOST, "bridge", "link", "set", "dev", f"{host}-l",
            "isolated", "on" if on else "off",
        )  # fmt: skip

    def _generate_key(self, host: str) -> None:
        private = _run(["wg", "genkey"]).stdout.strip()
        public = _run(["wg", "pubkey"], stdin_text=private + "\n").stdout.strip()
        key_file = self.lab_dir / f"{host}.key"
        _write_atomic(key_file, private + "\n")
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

        if not wait_for(ready, _WG_START_TIMEOUT):
            raise LabError(f"{iface}: no UAPI socket within {_WG_START_TIMEOUT:g} s")

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

        if not wait_for(all_seen, _HANDSHAKE_TIMEOUT, interval=0.05):
            names = [name for names in waiting.values() for name in names]
            hubs = " or ".join(waiting) or "the hub"
            raise LabError(
                f"lab {self.prefix}: {hubs} saw no handshake from some of {names}"
                f" within {_HANDSHAKE_TIMEOUT:g} s"
            )

    def _restore_default_route(self, host: str) -> None:
        gateway = self._gateways.get(host)
        if gateway is None or host not in {c.name for c in self.topology.clients}:
            return
        if gateway in self.topology.client(host).address.network:
            self.run(host, "ip", "route", "replace", "default", "via", str(gateway))
