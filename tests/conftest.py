"""Shared fixtures: skipping lab tests where no lab can run, and labs torn down in any case.

Tests that need root, namespaces and wireguard-go mark themselves ``@pytest.mark.lab``
(or use ``requires_root`` / ``root_required()``); they are skipped with the reason here.
Tests that need kernel WireGuard mark themselves ``@pytest.mark.kernel`` as well; without the
module they are skipped too (scripts/test.sh runs them in a VM that has it).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labkit import LabFactory, unique_prefix
from wg_autopeer.lab import (
    Lab,
    Topology,
    default_topology,
    kernel_wireguard_unavailable_reason,
    lab_unavailable_reason,
    list_namespaces,
)
from wg_autopeer.lab.postgres import PostgresServer, postgres_unavailable_reason
from wg_autopeer.lab.state import read_state

LAB_UNAVAILABLE = lab_unavailable_reason()
requires_root = pytest.mark.skipif(
    LAB_UNAVAILABLE is not None, reason=LAB_UNAVAILABLE or "needs root and network namespaces"
)


def root_required() -> None:
    """Skip the calling test unless a namespace lab can run here."""
    if LAB_UNAVAILABLE is not None:
        pytest.skip(LAB_UNAVAILABLE)


KERNEL_UNAVAILABLE = kernel_wireguard_unavailable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_lab = pytest.mark.skip(reason=LAB_UNAVAILABLE or "")
    skip_kernel = pytest.mark.skip(
        reason=f"kernel test: {KERNEL_UNAVAILABLE}; run them in a VM with Debian's kernel:"
        " bash scripts/vm.sh .venv/bin/pytest -m kernel"
    )
    for item in items:
        # Not `"lab" in item.keywords`: that also matches every test under tests/lab/.
        if LAB_UNAVAILABLE is not None and item.get_closest_marker("lab") is not None:
            item.add_marker(skip_lab)
        elif KERNEL_UNAVAILABLE is not None and item.get_closest_marker("kernel") is not None:
            item.add_marker(skip_kernel)


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[LabFactory]:
    """Build labs that are torn down after the test, even when it fails.

    ``lab_factory(build=None, *, base="t")``: ``build(prefix) -> Topology`` (default:
    the default topology); returns the Lab already up.
    """
    labs: list[Lab] = []

    def make(build: Callable[[str], Topology] | None = None, *, base: str = "t") -> Lab:
        prefix = unique_prefix(base)
        topology = (build or default_topology)(prefix)
        lab = Lab(topology, state_dir=tmp_path / "lab")
        labs.append(lab)
        lab.up()
        return lab

    root_required()
    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for lab in reversed(labs):
            try:
                lab.down()
            except BaseException as exc:  # tear the other labs down before raising
                errors.append(exc)
            if read_state(lab.prefix, lab.state_dir) is not None or list_namespaces(lab.prefix):
                Lab.cleanup_leftovers(lab.prefix, lab.state_dir)
        if errors:
            raise errors[0]


@pytest.fixture
def lab(lab_factory: LabFactory) -> Lab:
    """The default topology (hub, r1/lan1 with alice+bob, r2/lan2 with carol), up, own prefix."""
    return lab_factory()


# -- a real PostgreSQL, one server per session, one database per test -----------------------

POSTGRES_UNAVAILABLE = postgres_unavailable_reason()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on loopback for the whole session, stopped by its PID after."""
    if POSTGRES_UNAVAILABLE is not None:
        pytest.skip(POSTGRES_UNAVAILABLE)
    server = PostgresServer.create()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database of its own for this test."""
    return postgres_server.create_database(f"t_{secrets.token_hex(6)}")
