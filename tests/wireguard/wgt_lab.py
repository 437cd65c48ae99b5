"""Lab helpers: wireguard-go devices in network namespaces this test run creates.

Every name starts with ``wgt`` plus a random tag, so parallel runs never collide,
and everything is torn down in ``finally``: the wireguard-go processes we started
(by PID), their UAPI sockets, and the namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SOCKET_DIR = Path("/var/run/wireguard")
CLONE_NEWNET = 0x40000000
DEADLINE = 10.0


def lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab test: needs root to create network namespaces"
    for tool in ("wireguard-go", "wg", "ip"):
        if shutil.which(tool) is None:
            return f"lab test: {tool} is not installed"
    if not Path("/dev/net/tun").exists():
        return "lab test: /dev/net/tun is missing"
    return None


def run(*args: str, stdin: str | None = None) -> str:
    """Run a command, fail the test with its stderr when it fails."""
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def wait_until(what: str, predicate: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Poll ``predicate`` until it holds, failing with ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the block with the calling thread in ``netns`` (setns is per thread).

    The asyncio loop of a test runs in this thread, so controls created and used
    in the block see that namespace's links, as the agent would in production.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/var/run/netns/{netns}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")


def genkey() -> tuple[str, str]:
    private = run("wg", "genkey").strip()
    return private, run("wg", "pubkey", stdin=private + "\n").strip()


@dataclass
class WgGoDevice:
    """A running wireguard-go device."""

    netns: str
    ifname: str
    process: subprocess.Popen[bytes]
    private_key: str
    public_key: str
    listen_port: int

    @property
    def socket(self) -> Path:
        return SOCKET_DIR / f"{self.ifname}.sock"

    def wg(self, *args: str, stdin: str | None = None) -> str:
        """Run ``wg`` against this device inside its namespace (the independent view)."""
        return run("ip", "netns", "exec", self.netns, "wg", *args, stdin=stdin)

    def dump(self) -> dict[str, list[str]]:
        """``wg show dump`` peers by public key: [psk, endpoint, ips, handshake, rx, tx, ka]."""
        lines = self.wg("show", self.ifname, "dump").splitlines()[1:]
        return {cols[0]: cols[1:] for cols in (line.split("\t") for line in lines)}


@dataclass
class KernelDevice:
    """A kernel WireGuard device (``ip link add ... type wireguard``); it goes with its netns."""

    netns: str
    ifname: str
    private_key: str
    public_key: str
    listen_port: int

    def wg(self, *args: str, stdin: str | None = None) -> str:
        """Run ``wg`` against this device inside its namespace (the independent view)."""
        return run("ip", "netns", "exec", self.netns, "wg", *args, stdin=stdin)

    def dump(self) -> dict[str, list[str]]:
        """``wg show dump`` peers by public key: [psk, endpoint, ips, handshake, rx, tx, ka]."""
        lines = self.wg("show", self.ifname, "dump").splitlines()[1:]
        return {cols[0]: cols[1:] for cols in (line.split("\t") for line in lines)}


@dataclass
class Lab:
    """Namespaces and wireguard-go processes of one test, all removed by ``cleanup``."""

    logdir: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    devices: list[WgGoDevice] = field(default_factory=list)

    def netns(self, role: str) -> str:
        name = f"wgt-{self.tag}-{role}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def ifname(self, role: str) -> str:
        name = f"wgt{self.tag}{role}"
        assert len(name) < 16, name
        return name

    def wireguard_go(
        self, netns: str, role: str, *, listen_port: int = 51820, address: str | None = None
    ) -> WgGoDevice:
        """Start wireguard-go in ``netns`` with a fresh key, up, optionally addressed."""
        ifname = self.ifname(role)
        log = (self.logdir / f"{ifname}.log").open("wb")
        # ip netns exec execs in place, so this PID is the daemon's own.
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, "wireguard-go", "-f", ifname],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        private, public = genkey()
        device = WgGoDevice(netns, ifname, process, private, public, listen_port)
        self.devices.append(device)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"wireguard-go {ifname} exited; see {self.logdir}")
            return device.socket.is_socket()

        wait_until(f"the UAPI socket of {ifname}", ready)
        device.wg(
            "set", ifname, "private-key", "/dev/stdin", "listen-port", str(listen_port),
            stdin=private + "\n",
        )  # fmt: skip
        if address is not None:
            run("ip", "-n", netns, "addr", "add", address, "dev", ifname)
        run("ip", "-n", netns, "link", "set", ifname, "up")
        return device

    def kernel_wireguard(
        self, netns: str, role: str, *, listen_port: int = 51820, address: str | None = None
    ) -> KernelDevice:
        """A kernel WireGuard device in ``netns`` with a fresh key, up, optionally addressed."""
        ifname = self.ifname(role)
        run("ip", "-n", netns, "link", "add", ifname, "type", "wireguard")
        private, public = genkey()
        device = KernelDevice(netns, ifname, private, public, listen_port)
        device.wg(
            "set", ifname, "private-key", "/dev/stdin", "listen-port", str(listen_port),
            stdin=private + "\n",
        )  # fmt: skip
        if address is not None:
            run("ip", "-n", netns, "addr", "add", address, "dev", ifname)
        run("ip", "-n", netns, "link", "set", ifname, "up")
        return device

    def switch(self) -> str:
        """A namespace holding a bridge: the LAN every ``plug``ged namespace shares."""
        sw = self.netns("sw")
        run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", sw, "link", "set", "br0", "up")
        return sw

    def plug(self, switch: str, netns: str, address: str) -> None:
        """A veth from ``netns`` (as eth0, with ``address``) to the switch's bridge."""
        port = f"v{netns.rsplit('-', 1)[-1]}"
        run(
            "ip", "-n", switch, "link", "add", port, "type", "veth",
            "peer", "name", "eth0", "netns", netns,
        )  # fmt: skip
        run("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", netns, "addr", "add", address, "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")

    def cleanup(self) -> None:
        errors: list[str] = []
        for device in self.devices:
            if device.process.poll() is None:
                device.process.terminate()
                try:
                    device.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    device.process.kill()
                    device.process.wait(timeout=5)
            # wireguard-go removes its socket on a clean exit; a killed one may not.
            device.socket.unlink(missing_ok=True)
        for netns in reversed(self.namespaces):
            done = subprocess.run(["ip", "netns", "del", netns], capture_output=True, text=True)
            if done.returncode != 0:
                errors.append(f"{netns}: {done.stderr.strip()}")
        if errors:
            raise AssertionError("lab cleanup failed: " + "; ".join(errors))


@dataclass
class Star:
    """A hub and spokes on one bridged LAN, each running wireguard-go, hub peered with all."""

    hub: WgGoDevice
    spokes: list[WgGoDevice]

    def tunnel_ip(self, index: int) -> str:
        """Tunnel address of the hub (0) or spoke ``index`` (1...)."""
        return f"10.77.0.{index + 1}"

    def ping_all(self) -> None:
        """Ping every spoke from the hub until each answers, so every session is live."""
        for i in range(1, len(self.spokes) + 1):
            target = self.tunnel_ip(i)

            def answered(target: str = target) -> bool:
                done = subprocess.run(
                    ["ip", "netns", "exec", self.hub.netns, "ping", "-c1", "-W1", target],
                    capture_output=True,
                )
                return done.returncode == 0

            wait_until(f"a ping from the hub to {target}", answered)
