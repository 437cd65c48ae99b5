"""ReadinessSocket: a test blocks on the daemon's READY=1 instead of polling it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from wg_autopeer.lab.readiness import ReadinessSocket


def _python(code: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env})


def test_a_process_that_notifies_is_ready(tmp_path: Path) -> None:
    with ReadinessSocket(tmp_path / "d.notify") as readiness:
        proc = _python(
            "from wg_autopeer import sdnotify\n"
            "sdnotify.notify('STATUS=starting')\n"
            "sdnotify.ready('up')\n"
            "import time; time.sleep(30)",
            readiness.env(),
        )
        try:
            assert readiness.wait(proc, timeout=60) == "READY=1\nSTATUS=up"
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "d.notify").exists()


def test_a_process_that_exits_first_is_not_waited_for_to_the_deadline(tmp_path: Path) -> None:
    with ReadinessSocket(tmp_path / "d.notify") as readiness:
        proc = _python(
            "from wg_autopeer import sdnotify; sdnotify.notify('STATUS=no')", readiness.env()
        )
        started = time.monotonic()
        assert readiness.wait(proc, timeout=120) is None
        # It notices the exit within its one-second look, not at the two-minute deadline.
        assert time.monotonic() - started < 60
        assert proc.returncode == 0
