"""The lab helpers leave nothing behind: no process, no socket, no namespace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from wgt_lab import Lab, lab_skip_reason

pytestmark = pytest.mark.lab


def test_cleanup_removes_processes_sockets_and_namespaces(tmp_path: Path) -> None:
    reason = lab_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    lab = Lab(logdir=tmp_path)
    try:
        device = lab.wireguard_go(lab.netns("a"), "a")
        assert device.process.poll() is None
        assert device.socket.is_socket()
    finally:
        lab.cleanup()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert device.process.poll() is not None
    assert not device.socket.exists()
    assert f"wgt-{lab.tag}-" not in namespaces
