"""Fixtures for the sink tests: every test runs once per real engine.

``embedded`` is chDB on one data directory for the whole session (chDB allows one data directory
per process at a time, so tests cannot each have their own); ``server`` is the session's
ClickHouse server from ``tests/conftest.py`` (Debian's 18.16 here). Either way each test gets a
database of its own, dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sinks import Backend, ClickHouseConfig, SinkError, connect
from yibao.localinfra import ClickHouseEndpoint

BACKEND_KINDS = ("embedded", "server")

BackendFactory = Callable[[str], Backend]


def fresh_database() -> str:
    return f"yb_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb") / "data"


@pytest.fixture(params=BACKEND_KINDS)
def backend_factory(request: pytest.FixtureRequest, chdb_path: Path) -> Iterator[BackendFactory]:
    """Opens backends of one kind (the parameter) on any database; closes and drops them all."""
    kind: str = request.param
    opened: list[Backend] = []

    def make(database: str) -> Backend:
        if kind == "server":
            server: ClickHouseEndpoint = request.getfixturevalue("clickhouse_server")
            backend = connect(ClickHouseConfig(backend="server", host=server.host, port=server.tcp_port,
                                               user=server.user, password=server.password, database=database))
        else:
            backend = connect(ClickHouseConfig(chdb_path=chdb_path, database=database))
        opened.append(backend)
        return backend

    yield make
    databases = {backend.database for backend in opened}
    for backend in opened:
        backend.close()
    if databases:
        cleaner = make(next(iter(databases)))
        for database in databases:
            with contextlib.suppress(SinkError):
                # chDB defers a plain DROP by minutes, and every reopen then reloads the dropped tables.
                sync = " SYNC" if kind == "embedded" else ""
                cleaner.execute(f"DROP DATABASE IF EXISTS {database}{sync}")
        cleaner.close()


@pytest.fixture
def backend(backend_factory: BackendFactory) -> Backend:
    """A backend on a fresh, not yet migrated database."""
    return backend_factory(fresh_database())
