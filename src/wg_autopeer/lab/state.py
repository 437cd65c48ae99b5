"""A lab's state file, and undoing a lab from it: after ``down`` or after a crash.

Every resource is recorded *before* it exists (``<state_dir>/<prefix>.json``, written
atomically, mode 0600), so ``teardown`` can undo a lab whose Python process died
half-way: recorded PIDs (start time checked), every ``<prefix>-*`` namespace, the
UAPI sockets and private key files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wg_autopeer.errors import LabError
from wg_autopeer.lab.netns import (
    ProcessRecord,
    end_processes,
    list_namespaces,
    process_alive,
    run_command,
)
from wg_autopeer.lab.wgtools import UAPI_DIR

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/wg-autopeer-lab")
STATE_VERSION = 1


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


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (mode 0600): the whole old file or the whole new one."""
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
    """Where lab ``prefix``'s state file lives."""
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


def prefix_sockets(prefix: str) -> list[Path]:
    """The UAPI sockets of lab ``prefix``'s wireguard-go devices that exist now."""
    # Interface names are "<prefix>-<host>" and a prefix has no hyphen, so this
    # never matches another lab's sockets.
    return sorted(UAPI_DIR.glob(f"{prefix}-*.sock"))


def teardown(
    prefix: str,
    state: LabState,
    *,
    state_dir: Path | None,
    popens: Mapping[int, subprocess.Popen[bytes]] | None = None,
) -> CleanupReport:
    """End ``state``'s processes, delete lab ``prefix``'s namespaces, sockets and key files,
    then its state file; ``LabError`` naming what could not be undone (the file then stays)."""
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
        strangers = run_command(["ip", "netns", "pids", name], check=False).stdout.split()
        strangers = [pid for pid in strangers if int(pid) not in recorded]
        if strangers:
            # Not ours to kill: they keep the namespace (and its links) alive after
            # the name is gone, so say so.
            log.warning("lab %s: unrecorded processes %s still run in %s", prefix, strangers, name)
        result = run_command(["ip", "netns", "del", name], check=False)
        if result.returncode == 0:
            removed_ns.append(name)
        else:
            errors.append(f"ip netns del {name}: {result.stderr.strip()}")

    sockets = {Path(s) for s in state.sockets}
    sockets |= {UAPI_DIR / f"{iface}.sock" for iface in state.interfaces}
    sockets |= set(prefix_sockets(prefix))
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


def lab_status(prefix: str, state_dir: Path | None = None) -> LabStatus:
    """What of lab ``prefix`` exists now, from its state file and the system."""
    path = state_path(prefix, state_dir)
    state = read_state(prefix, state_dir) or LabState(prefix=prefix)
    sockets = {str(s) for s in prefix_sockets(prefix)}
    sockets |= {s for s in state.sockets if Path(s).exists()}
    return LabStatus(
        prefix=prefix,
        state_file=path if path.exists() else None,
        namespaces=tuple(list_namespaces(prefix)),
        live_processes=tuple(r for r in state.processes if process_alive(r.pid, r.start_time)),
        sockets=tuple(sorted(sockets)),
        public_keys=dict(state.public_keys),
    )
