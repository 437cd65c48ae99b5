"""Network-namespace labs with real WireGuard (wireguard-go or the kernel's), for tests, the demo
and benchmarks."""

from __future__ import annotations

from wg_autopeer.lab.lab import Lab
from wg_autopeer.lab.netns import (
    ProcessRecord,
    kernel_wireguard_unavailable_reason,
    lab_unavailable_reason,
    list_namespaces,
    wait_for,
)
from wg_autopeer.lab.state import CleanupReport, LabStatus
from wg_autopeer.lab.topology import ClientSpec, HubSpec, LanSpec, Topology, default_topology

__all__ = [
    "CleanupReport",
    "ClientSpec",
    "HubSpec",
    "Lab",
    "LabStatus",
    "LanSpec",
    "ProcessRecord",
    "Topology",
    "default_topology",
    "kernel_wireguard_unavailable_reason",
    "lab_unavailable_reason",
    "list_namespaces",
    "wait_for",
]
