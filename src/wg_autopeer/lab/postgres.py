"""A throw-away PostgreSQL server for tests and benchmarks: Debian's binaries, a data
directory in a temporary directory, loopback only, stopped by its PID.

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user
the Debian package creates (``setpriv``, which execs, so the PID we keep is the
server's own), in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from wg_autopeer.errors import LabError

SUPERUSER = "postgres"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding ``postgres`` and ``initdb``."""
    found = [
        Path(d)
        for d in glob.glob("/usr/lib/postgresql/*/bin")
        if (Path(d) / "postgres").is_file() and (Path(d) / "initdb").is_file()
    ]
    found.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    return found[-1] if found else None


def postgres_unavailable_reason() -> str | None:
    """Why no PostgreSQL can be started here, or None."""
    if postgres_bindir() is None:
        return "PostgreSQL is not installed (Debian's postgresql package: scripts/setup.sh)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return f"running as root and there is no {SUPERUSER!r} user to run PostgreSQL as"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """One PostgreSQL server on 127.0.0.1:``port`` with its data in ``root``."""

    root: Path
    port: int
    bindir: Path
    pid: int | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, *, port: int | None = None) -> PostgresServer:
        """initdb in a new temporary directory (not started yet)."""
        reason = postgres_unavailable_reason()
        bindir = postgres_bindir()
        if reason is not None or bindir is None:
            raise LabError(reason or "no PostgreSQL")
        root = Path(tempfile.mkdtemp(prefix="wgap-pg-"))
        server = cls(root=root, port=port or free_port(), bindir=bindir)
        try:
            if os.geteuid() == 0:
                user = pwd.getpwnam(SUPERUSER)
                os.chown(root, user.pw_uid, user.pw_gid)
            server._run(
                str(bindir / "initdb"),
                "-D",
                str(server.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return server

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def socket_url(self, dbname: str) -> str:
        """The URL through the server's unix socket: reachable from every network
        namespace (a lab's hub has a loopback of its own)."""
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.root}&port={self.port}"

    def _as_owner(self, *argv: str) -> list[str]:
        if os.geteuid() != 0:
            return list(argv)
        return ["setpriv", f"--reuid={SUPERUSER}", f"--regid={SUPERUSER}", "--init-groups", *argv]

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            self._as_owner(*argv), capture_output=True, check=False, cwd=self.root
        )
        if done.returncode != 0:
            raise LabError(f"{argv[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        if self._process is not None:
            return
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
        with log:
            self._process = subprocess.Popen(
                self._as_owner(
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    # Test data: durability is not what these servers are for.
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        self.pid = self._process.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._accepts():
            if self._process.poll() is not None:
                self._process = self.pid = None
                raise LabError(f"postgres exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"postgres did not accept connections: {self.log_tail()}")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        done = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
            ],
            check=False,
        )
        return done.returncode == 0

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "postgres.log").read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients disconnected, transactions rolled back) of the
        server we started, by its PID."""
        process, self._process, self.pid = self._process, None, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (a plain identifier); returns its URL."""
        if not name.isidentifier():
            raise LabError(f"{name!r} is not a plain database name")
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
