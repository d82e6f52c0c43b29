"""The Backend contract on both engines: result shapes, errors, outages, locking."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from sinks import TABLES, Backend, ClickHouseConfig, ServerBackend, SinkError, SinkUnavailable, migrate
from sinks.embedded import EmbeddedBackend
from yibao.localinfra import ClickHouseEndpoint, ClickHouseServer, MissingBinaryError, free_port

from .conftest import BackendFactory, fresh_database
from .helpers import CHINA_OFFSET, default_batch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_version_is_a_tuple_of_ints(backend: Backend, request: pytest.FixtureRequest) -> None:
    version = backend.version()
    assert len(version) >= 3 and all(isinstance(p, int) for p in version)
    if backend.name == "server":
        server: ClickHouseEndpoint = request.getfixturevalue("clickhouse_server")
        assert ".".join(map(str, version)) == server.version


def test_query_results_have_the_same_shape_and_types(backend: Backend) -> None:
    result = backend.query(
        "SELECT toDecimal64(-12345, 2) AS d, toDateTime(1700000000, 'Asia/Shanghai') AS t, "
        "toDate(19000) AS day, [1, 2] AS a, CAST(NULL AS Nullable(UInt8)) AS n, 'x' AS s, "
        "unhex('FF00') AS b"
    )

    assert result.columns == ["d", "t", "day", "a", "n", "s", "b"]
    assert result.types == [
        "Decimal(18, 2)",
        "DateTime('Asia/Shanghai')",
        "Date",
        "Array(UInt8)",
        "Nullable(UInt8)",
        "String",
        "String",
    ]
    d, t, day, a, n, s, b = result.rows[0]
    assert d == Decimal("-12345.00")
    assert t == dt.datetime(2023, 11, 15, 6, 13, 20, tzinfo=dt.timezone(CHINA_OFFSET))
    assert t.utcoffset() == CHINA_OFFSET
    assert (day, a, n, s, b) == (dt.date(2022, 1, 8), [1, 2], None, "x", b"\xff\x00")
    assert result.scalar() == d
    assert result.dicts()[0]["s"] == "x"


def test_an_empty_result_still_has_columns(backend: Backend) -> None:
    result = backend.query("SELECT number AS n, toString(number) AS s FROM system.numbers LIMIT 0")
    assert (result.columns, result.types, result.rows) == (["n", "s"], ["UInt64", "String"], [])


def test_many_rows_come_back_in_order(backend: Backend) -> None:
    rows = backend.query("SELECT number FROM system.numbers LIMIT 200000").rows
    assert [r[0] for r in rows] == list(range(200000))


def test_a_bad_statement_is_a_sink_error_with_the_server_message(backend: Backend) -> None:
    with pytest.raises(SinkError) as caught:
        backend.query("SELECT * FROM no_such_db_xyz.t")
    assert not isinstance(caught.value, SinkUnavailable)
    assert caught.value.code == 81
    assert "no_such_db_xyz" in caught.value.message
    assert "Stack trace" not in caught.value.message


def test_inserting_before_migrate_is_a_sink_error(backend: Backend) -> None:
    with pytest.raises(SinkError) as caught:
        backend.insert("settlements", {"setl_id": ["x"]})
    assert caught.value.code in (60, 81)  # unknown table / unknown database


def test_a_value_of_the_wrong_kind_is_refused_and_the_backend_recovers(backend: Backend) -> None:
    migrate(backend)
    batch = default_batch(TABLES["penalties"], 3)
    bad = dict(batch, fine_amt=[Decimal("1.50"), Decimal("2"), Decimal("3")])

    with pytest.raises(SinkError, match="raw ints"):
        backend.insert("penalties", bad)

    assert backend.insert("penalties", batch) == 3
    assert backend.query(f"SELECT count() FROM {backend.database}.penalties").scalar() == 3


def test_inline_insert_data_is_refused(backend: Backend) -> None:
    with pytest.raises(ValueError, match="inline data"):
        backend.execute("INSERT INTO t (a) VALUES (1)")
    with pytest.raises(ValueError, match="inline data"):
        backend.execute("insert into t format JSONEachRow")


def test_ragged_or_oddly_named_batches_are_refused(backend: Backend) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        backend.insert("settlements", {"a": [1, 2], "b": [1]})
    with pytest.raises(ValueError, match="not a plain identifier"):
        backend.insert("settlements; DROP TABLE x", {"a": [1]})
    assert backend.insert("settlements", {"a": []}) == 0


def test_concurrent_inserts_are_serialized(backend: Backend) -> None:
    migrate(backend)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for batch_no in range(5):
                start = (worker * 5 + batch_no) * 1000
                backend.insert("fund_income", default_batch(TABLES["fund_income"], 1000, start_offset=start))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    count = backend.query(f"SELECT count(), uniqExact(src_offset) FROM {backend.database}.fund_income").rows
    assert count == [(20000, 20000)]


def test_a_closed_backend_refuses_calls(backend: Backend) -> None:
    backend.close()
    backend.close()
    with pytest.raises(SinkError, match="closed"):
        backend.query("SELECT 1")


def test_data_survives_reopening(backend_factory: BackendFactory) -> None:
    database = fresh_database()
    first = backend_factory(database)
    migrate(first)
    first.insert("fund_income", default_batch(TABLES["fund_income"], 10))
    first.close()

    second = backend_factory(database)

    assert second.query(f"SELECT count() FROM {database}.fund_income").scalar() == 10


# --- server only --------------------------------------------------------------------------------


def test_sink_unavailable_when_the_server_is_down() -> None:
    backend = ServerBackend(host="127.0.0.1", port=free_port(), database="yibao", connect_timeout=1)
    try:
        with pytest.raises(SinkUnavailable, match="unreachable"):
            backend.query("SELECT 1")
        with pytest.raises(SinkUnavailable):
            backend.insert("settlements", {"setl_id": ["x"]})
        with pytest.raises(SinkUnavailable):
            backend.execute("SELECT 1")
        with pytest.raises(SinkUnavailable):
            migrate(backend)
    finally:
        backend.close()


@pytest.mark.slow
def test_a_server_crash_is_sink_unavailable_and_the_backend_reconnects(tmp_path: Path) -> None:
    try:
        server = ClickHouseServer(workdir=tmp_path / "ch")
    except MissingBinaryError as exc:
        pytest.skip(f"no local clickhouse-server: {exc}")
    with server:
        backend = ServerBackend(host=server.host, port=server.tcp_port, database="crash", connect_timeout=2)
        with backend:
            migrate(backend)
            batch = default_batch(TABLES["fund_income"], 100)
            backend.insert("fund_income", batch)
            server.kill()

            with pytest.raises(SinkUnavailable):
                backend.insert("fund_income", batch)

            server.start()
            assert backend.insert("fund_income", batch) == 100
            assert backend.query("SELECT count() FROM crash.fund_income").scalar() == 200


def test_unknown_settings_are_refused_not_dropped(clickhouse_server: ClickHouseEndpoint) -> None:
    # clickhouse-driver drops settings the server does not know (async_insert on 18.16) silently.
    def open_with(settings: dict[str, object]) -> ServerBackend:
        return ServerBackend(
            host=clickhouse_server.host,
            port=clickhouse_server.tcp_port,
            user=clickhouse_server.user,
            password=clickhouse_server.password,
            settings=settings,
        )

    with open_with({"max_threads": 1, "yibao_no_such_setting": 1}) as bad:
        with pytest.raises(SinkError, match="yibao_no_such_setting") as caught:
            bad.query("SELECT 1")
        assert not isinstance(caught.value, SinkUnavailable)
    with open_with({"max_threads": 1}) as good:
        assert good.query("SELECT value FROM system.settings WHERE name = 'max_threads'").scalar() == "1"


def test_clickhouse_config_rejects_unknown_kinds_and_an_embedded_engine_without_a_path() -> None:
    with pytest.raises(ValueError, match="unknown ClickHouse backend"):
        ClickHouseConfig(backend="sqlite")
    with pytest.raises(ValueError, match="chdb_path"):
        ClickHouseConfig(backend="embedded")
    assert "secret" not in repr(ClickHouseConfig(backend="server", password="secret"))


# --- embedded only ------------------------------------------------------------------------------


def test_a_second_process_on_the_same_data_dir_gets_a_clear_error(chdb_path: Path) -> None:
    holder = EmbeddedBackend(chdb_path, fresh_database())
    try:
        holder.query("SELECT 1")
        script = (
            "import sys\n"
            "from sinks.embedded import EmbeddedBackend\n"
            "from sinks import SinkError\n"
            "try:\n"
            f"    EmbeddedBackend({str(chdb_path)!r}, 'yibao')\n"
            "except SinkError as exc:\n"
            "    print(exc.code, exc.message)\n"
            "    sys.exit(3)\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
        )
    finally:
        holder.close()

    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout.startswith("36 ")
    assert "another yibao process" in done.stdout and str(chdb_path) in done.stdout


def test_a_second_data_dir_in_one_process_gets_a_clear_error(chdb_path: Path, tmp_path: Path) -> None:
    holder = EmbeddedBackend(chdb_path, fresh_database())
    try:
        with pytest.raises(SinkError, match="already has another chDB data dir open"):
            EmbeddedBackend(tmp_path / "other", "yibao")
    finally:
        holder.close()


def test_arrow_conversion_is_as_strict_as_the_driver() -> None:
    import pyarrow as pa

    from sinks.embedded import to_arrow

    assert to_arrow([1, None, 3], pa.int64()).to_pylist() == [1, None, 3]
    assert to_arrow([True, False], pa.uint8()).to_pylist() == [1, 0]
    assert to_arrow([2**64 - 1, 0], pa.uint64()).to_pylist() == [2**64 - 1, 0]
    assert to_arrow(["é", b"\xff"], pa.binary()).to_pylist() == ["é".encode(), b"\xff"]
    assert to_arrow([None, None], pa.binary()).to_pylist() == [None, None]
    for bad, target in (
        ([Decimal("1.50")], pa.int64()),
        ([Decimal("2")], pa.int64()),
        ([1.5], pa.int64()),
        ([1, 2.0], pa.int64()),
        (["3"], pa.int64()),
        ([70000], pa.uint16()),
        ([-1], pa.uint32()),
        ([2**64 - 1, 1.5], pa.uint64()),
        ([1], pa.binary()),
    ):
        with pytest.raises((TypeError, pa.ArrowException)):
            to_arrow(bad, target)


def test_use_database_resolves_unqualified_names(backend: Backend) -> None:
    with pytest.raises(SinkError):
        backend.query("SELECT count() FROM settlements")  # not migrated, nor the default database
    migrate(backend)
    with pytest.raises(SinkError):
        backend.query("SELECT count() FROM settlements")  # exists, but not in the default database
    backend.use_database()
    assert backend.query("SELECT count() FROM settlements").scalar() == 0
    assert backend.query("SELECT currentDatabase()").scalar() == backend.database
