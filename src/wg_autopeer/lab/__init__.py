"""Network-namespace labs with real userspace WireGuard, for tests, the demo and benchmarks."""

from __future__ import annotations

from wg_autopeer.lab.lab import (
    CleanupReport,
    Lab,
    LabStatus,
    ProcessRecord,
    lab_unavailable_reason,
    list_namespaces,
    wait_for,
)
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
    "lab_unavailable_reason",
    "list_namespaces",
    "wait_for",
]
