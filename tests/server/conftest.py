"""Fixtures: a FakeWireGuard hub and a server app over it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from server_fakes import HUB_IF, Clock, Hub, fake_hub

from wg_autopeer.server.config import ServerConfig
from wg_autopeer.server.store import RegistrationStore, SqliteStore


@pytest.fixture
def hub_factory() -> Iterator[Callable[[RegistrationStore], Hub]]:
    stores: list[RegistrationStore] = []

    def build(store: RegistrationStore) -> Hub:
        clock = Clock()
        stores.append(store)
        config = ServerConfig(interface=HUB_IF, db=":memory:", unknown_source_refresh_gap=0.0)
        return Hub(fake_hub(clock), clock, config, store)

    yield build
    for store in stores:
        store.close()


@pytest.fixture
def hub(hub_factory: Callable[[RegistrationStore], Hub]) -> Hub:
    return hub_factory(SqliteStore(":memory:"))


@pytest.fixture
def app(hub: Hub) -> FastAPI:
    return hub.app()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "server.db"
