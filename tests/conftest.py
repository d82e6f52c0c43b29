"""Shared fixtures: the real infrastructure every integration test talks to.

One broker and one ClickHouse server per test session, started once because each test then
isolates itself with its own topics, groups and tables. Where a Docker engine exists,
testcontainers provides stock Apache Kafka and ClickHouse; elsewhere (the usual case on these
machines) the same fixtures run Tansu and Debian's ClickHouse as local processes. Tests only see
``KafkaEndpoint`` / ``ClickHouseEndpoint``, so they never depend on which of the two they got.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

import pytest

from yibao.localinfra import (
    ClickHouseEndpoint,
    ClickHouseServer,
    KafkaEndpoint,
    MissingBinaryError,
    TansuBroker,
    docker_available,
    http_query,
)

KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:24.8"


def require_infra(reason: str) -> NoReturn:
    """Skip a test whose infrastructure is missing, except in CI, where that must fail.

    A developer without ClickHouse installed can still run the unit tests; a CI job that
    silently skipped every integration test would look green while testing nothing.
    """
    if os.environ.get("CI"):
        pytest.fail(
            f"required test infrastructure is missing in CI: {reason} (run .ci/system-deps.sh)",
            pytrace=False,
        )
    pytest.skip(f"test infrastructure missing: {reason}")


@functools.cache
def _use_docker() -> bool:
    return docker_available()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaEndpoint]:
    if _use_docker():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka:
            yield KafkaEndpoint(bootstrap=kafka.get_bootstrap_server(), flavor="kafka")
        return
    try:
        tansu = TansuBroker(workdir=tmp_path_factory.mktemp("tansu"))
    except MissingBinaryError as exc:
        require_infra(f"no Docker engine and no local Tansu broker: {exc}")
    with tansu:
        yield tansu.endpoint


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseEndpoint]:
    if _use_docker():
        from testcontainers.community.clickhouse import ClickHouseContainer

        with ClickHouseContainer(CLICKHOUSE_IMAGE) as container:
            host = container.get_container_host_ip()
            tcp_port = int(container.get_exposed_port(container.port))
            http_port = int(container.get_exposed_port(8123))
            user, password = container.username, container.password
            version = http_query(host, http_port, "SELECT version()", user=user, password=password)
            yield ClickHouseEndpoint(
                host=host,
                tcp_port=tcp_port,
                http_port=http_port,
                version=version.strip(),
                user=user,
                password=password,
            )
        return
    try:
        server = ClickHouseServer(workdir=tmp_path_factory.mktemp("clickhouse"))
    except MissingBinaryError as exc:
        require_infra(f"no Docker engine and no local clickhouse-server: {exc}")
    with server:
        yield server.endpoint


@pytest.fixture
def own_clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    """A ClickHouse server of one test alone: it gets stopped, which others must not see."""
    try:
        server = ClickHouseServer(workdir=tmp_path_factory.mktemp("own-ch"))
    except MissingBinaryError as exc:
        require_infra(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail the test that leaves a non-daemon thread running.

    Such a thread (a Faust consumer whose app was never stopped, say) keeps the interpreter
    alive after the last test, and a CI run would then hang until its deadline instead of failing.
    """
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and not t.daemon]
    for t in leaked:
        t.join(timeout=5)
    alive = [t.name for t in leaked if t.is_alive()]
    if alive:
        pytest.fail(f"the test left non-daemon threads running: {alive}", pytrace=False)


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Last resort against a hang at interpreter exit: report leftover threads and exit."""
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:
        sys.stderr.write(f"\nnon-daemon threads still running after the session: {stuck}; exiting anyway\n")
        sys.stderr.flush()
        os._exit(_exit_status or 1)
