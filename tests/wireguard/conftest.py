"""Fixtures for WireGuard lab tests (helpers in ``wgt_lab``); each skips when not root or when
wireguard-go is missing, and tears down everything it made in ``finally``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from wgt_lab import Lab, Star, WgGoDevice, lab_skip_reason


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """An empty lab; skips when the host cannot run one."""
    reason = lab_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    lab = Lab(logdir=tmp_path)
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest.fixture
def wg_device(lab: Lab) -> WgGoDevice:
    """A wireguard-go device, up, with a fresh key, alone in a fresh namespace."""
    return lab.wireguard_go(lab.netns("a"), "a", address="10.77.0.1/24")


@pytest.fixture
def star(lab: Lab) -> Star:
    """Four namespaces on a bridge: hub ``h`` with live-capable peers ``s1``..``s3``."""
    switch = lab.switch()
    devices = []
    for i, role in enumerate(("h", "s1", "s2", "s3")):
        netns = lab.netns(role)
        lab.plug(switch, netns, f"192.168.77.{10 + i}/24")
        devices.append(lab.wireguard_go(netns, role, address=f"10.77.0.{i + 1}/24"))
    hub, spokes = devices[0], devices[1:]
    for i, spoke in enumerate(spokes, start=1):
        hub.wg(
            "set", hub.ifname, "peer", spoke.public_key,
            "endpoint", f"192.168.77.{10 + i}:51820", "allowed-ips", f"10.77.0.{i + 1}/32",
        )  # fmt: skip
        spoke.wg(
            "set", spoke.ifname, "peer", hub.public_key,
            "endpoint", "192.168.77.10:51820", "allowed-ips", "10.77.0.1/32",
        )  # fmt: skip
    return Star(hub, spokes)
