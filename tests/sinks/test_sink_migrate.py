"""Migrations on both engines: the tables they create, idempotence, refusals, staging rebuilds."""

from __future__ import annotations

import re
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from sinks import TABLES, Backend, MigrationError, SinkError, migrate
from sinks.migrate import DDL_DIR, NOTHING_TO_DO, load_migrations, render, split_statements, staging_ddl, to_target
from sinks.tables import raw_type

from .conftest import BackendFactory, fresh_database

pytestmark = pytest.mark.integration


def describe(backend: Backend, table: str) -> list[tuple[str, str, str, str]]:
    rows = backend.query(f"DESCRIBE TABLE {backend.database}.{table}").rows
    return [(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


def engines(backend: Backend) -> dict[str, str]:
    rows = backend.query(f"SELECT name, engine FROM system.tables WHERE database = '{backend.database}'").rows
    return {str(name): str(engine) for name, engine in rows}


def copy_ddl(tmp_path: Path) -> Path:
    target = tmp_path / "ddl"
    shutil.copytree(DDL_DIR, target)
    return target


def test_migrate_creates_every_table_and_is_idempotent(backend: Backend) -> None:
    progress: list[str] = []
    actions = migrate(backend, progress=progress.append)

    assert progress == actions
    assert actions[0] == f"created database {backend.database}"
    assert any(a.startswith("applied 0001_raw_tables.sql (15 statements") for a in actions)
    assert sum(a.startswith("built staging") for a in actions) == len(TABLES)
    version = backend.version()
    found = engines(backend)
    for name, spec in TABLES.items():
        columns = describe(backend, name)
        assert [(c[0], c[1]) for c in columns] == list(spec.columns_for(version)), name
        defaults = {c[0]: (c[2], c[3]) for c in columns if c[2]}
        assert defaults == {"ingested_at": ("DEFAULT", "now()")}, name
        staging = [(c[0], c[1]) for c in describe(backend, f"{name}_in")]
        assert staging == [(n, raw_type(t)) for n, t in spec.columns_for(version) if n != "ingested_at"]
        assert found[name] == spec.engine.split("(")[0]
        assert found[f"{name}_in"] == "Null"
        assert found[f"{name}_in_mv"] == "MaterializedView"
    # what later migrations add (0003: agg_* tables and views, bi_* views) is tested with them
    assert {n for n in found if not n.startswith(("agg_", "bi_"))} == {
        *TABLES,
        *(f"{t}_in" for t in TABLES),
        *(f"{t}_in_mv" for t in TABLES),
        "schema_migrations",
        "schema_staging",
    }

    told: list[str] = []
    again = migrate(backend, progress=told.append)

    assert len(again) == 1 and again[0].startswith(NOTHING_TO_DO), again
    assert told == []  # no action to report: how `yibao migrate` knows to say "up to date"
    assert backend.query(f"SELECT count() FROM {backend.database}.schema_migrations").scalar() == len(
        load_migrations()
    )
    assert backend.query(f"SELECT count() FROM {backend.database}.schema_staging").scalar() == len(TABLES)


def test_tables_are_partitioned_by_china_month_and_sorted_for_bi(backend: Backend) -> None:
    migrate(backend)
    for name, spec in TABLES.items():
        ddl = " ".join(str(backend.query(f"SHOW CREATE TABLE {backend.database}.{name}").scalar()).split())
        assert f"PARTITION BY {spec.partition_by}" in ddl, name
        order = re.search(r"ORDER BY \(?([^()]*?)\)? SETTINGS", ddl)
        assert order is not None and order.group(1) == ", ".join(spec.order_by), ddl


def test_modern_only_statements_are_gated_on_version(backend: Backend) -> None:
    actions = migrate(backend)

    projections = [a for a in actions if a.startswith("applied 0002_")]
    if backend.version() >= (22, 8):
        assert projections == ["applied 0002_src_position_projections.sql (14 statements)"]
        found = backend.query(
            f"SELECT table FROM system.projections WHERE database = '{backend.database}' AND name = 'src_pos'"
        ).rows
        # not precheck_log either: no processor looks it up for what landed (sinks/tables.py)
        assert {r[0] for r in found} == set(TABLES) - {"alerts", "precheck_log"}
    else:
        assert projections == [
            "applied 0002_src_position_projections.sql (0 statements, 14 skipped: "
            f"they need ClickHouse >= 22.8, this is {'.'.join(map(str, backend.version()))})"
        ]


def test_low_cardinality_only_where_supported(backend: Backend) -> None:
    migrate(backend)
    admdvs_type = {c[0]: c[1] for c in describe(backend, "settlements")}["insu_admdvs"]
    expected = "LowCardinality(String)" if backend.version() >= (19,) else "String"
    assert admdvs_type == expected


def test_a_changed_applied_migration_is_refused(backend: Backend, tmp_path: Path) -> None:
    ddl = copy_ddl(tmp_path)
    migrate(backend, ddl_dir=ddl)
    first = ddl / "0001_raw_tables.sql"
    first.write_text(first.read_text(encoding="utf-8") + "\n-- an innocent-looking edit\n", encoding="utf-8")

    with pytest.raises(MigrationError, match=r"0001_raw_tables\.sql changed after it was applied"):
        migrate(backend, ddl_dir=ddl)


def test_a_missing_applied_migration_is_refused(backend: Backend, tmp_path: Path) -> None:
    ddl = copy_ddl(tmp_path)
    migrate(backend, ddl_dir=ddl)
    (ddl / "0002_src_position_projections.sql").unlink()

    with pytest.raises(MigrationError, match=r"0002_src_position_projections\.sql was applied .* but is missing"):
        migrate(backend, ddl_dir=ddl)


def test_a_failing_statement_names_its_file(backend: Backend, tmp_path: Path) -> None:
    ddl = copy_ddl(tmp_path)
    (ddl / "0099_broken.sql").write_text("CREATE TABLE {db}.broken (x NoSuchType) ENGINE = Memory;\n")

    with pytest.raises(MigrationError, match=r"0099_broken\.sql: statement 1 of 1 failed"):
        migrate(backend, ddl_dir=ddl)
    latest = load_migrations()[-1].version
    assert backend.query(f"SELECT max(version) FROM {backend.database}.schema_migrations").scalar() == latest


def test_staging_is_rebuilt_when_a_migration_adds_a_column(backend: Backend, tmp_path: Path) -> None:
    ddl = copy_ddl(tmp_path)
    migrate(backend, ddl_dir=ddl)
    (ddl / "0099_reference_price.sql").write_text(
        "-- a later migration only describes the real table\n"
        "ALTER TABLE {db}.fee_details{on_cluster} ADD COLUMN ref_pric Decimal(16, 6) AFTER pric;\n",
        encoding="utf-8",
    )

    actions = migrate(backend, ddl_dir=ddl)

    assert actions == [
        "applied 0099_reference_price.sql (1 statements)",
        "rebuilt staging fee_details_in -> fee_details (20 raw columns)",
    ]
    staging = dict((c[0], c[1]) for c in describe(backend, "fee_details_in"))
    assert staging["ref_pric"] == "Int64"
    row = {name: [0] for name in ("cnt", "pric", "det_item_fee_sumamt", "src_offset", "setl_time")}
    row["ref_pric"] = [12_500_000]
    assert backend.insert("fee_details", row) == 1
    assert backend.query(f"SELECT ref_pric FROM {backend.database}.fee_details").scalar() == Decimal("12.5")
    assert migrate(backend, ddl_dir=ddl)[0].startswith("nothing to do")


def test_a_dropped_staging_view_is_recreated(backend: Backend) -> None:
    migrate(backend)
    backend.execute(f"DROP TABLE {backend.database}.tips_in_mv")

    assert migrate(backend) == ["rebuilt staging tips_in -> tips (11 raw columns)"]
    assert "tips_in_mv" in engines(backend)


def test_on_cluster_reaches_the_engine(backend: Backend) -> None:
    # The embedded engine refuses outright; a server without that cluster fails on the first DDL.
    with pytest.raises(SinkError, match=r"ON CLUSTER makes no sense|cluster 'no_such_cluster' not found"):
        migrate(backend, cluster="no_such_cluster")


def test_migrations_persist_across_reopen(backend_factory: BackendFactory) -> None:
    database = fresh_database()
    first = backend_factory(database)
    migrate(first)
    first.close()

    second = backend_factory(database)

    assert migrate(second)[0].startswith("nothing to do")


# --- no engine needed ---------------------------------------------------------------------------


def test_split_statements_reads_gates_and_skips_comments() -> None:
    text = (
        "-- header comment;\n"
        "CREATE TABLE a (x String DEFAULT 'a;b') ENGINE = Memory;\n"
        "\n"
        "-- min_version: 22.8\n"
        "ALTER TABLE a\n    ADD COLUMN y UInt8;\n"
        "-- trailing comment\n"
    )
    statements = split_statements(text)
    assert [s.sql for s in statements] == [
        "CREATE TABLE a (x String DEFAULT 'a;b') ENGINE = Memory",
        "ALTER TABLE a\n    ADD COLUMN y UInt8",
    ]
    assert [s.min_version for s in statements] == [None, (22, 8)]


def test_render_fills_only_known_placeholders() -> None:
    sql = "CREATE TABLE {db}.t{on_cluster} (a {lc}, b Map(String, String) COMMENT '{other}')"
    assert render(sql, "yb", " ON CLUSTER c", "String") == (
        "CREATE TABLE yb.t ON CLUSTER c (a String, b Map(String, String) COMMENT '{other}')"
    )


def test_shipped_migrations_load_in_order() -> None:
    names = [m.file for m in load_migrations()]
    assert names[:2] == ["0001_raw_tables.sql", "0002_src_position_projections.sql"]
    for migration in load_migrations():
        for statement in migration.statements():
            # each statement can simply be repeated after an interrupted run
            sql = statement.sql
            repeatable = "IF NOT EXISTS" in sql or (sql.startswith("DROP ") and " IF EXISTS " in sql)
            assert repeatable, (migration.file, sql[:60])


def test_bad_migration_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_Bad-Name.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="NNNN_lowercase_name"):
        load_migrations(tmp_path)


def test_decimal_conversion_multiplies_by_the_last_place() -> None:
    assert to_target("x", "Decimal(16, 6)") == (
        "CAST(toDecimal64(x, 0) * toDecimal64('0.000001', 6) AS Decimal(16, 6)) AS x"
    )
    assert to_target("d", "Nullable(Date)") == "CAST(d AS Nullable(Date)) AS d"
    assert to_target("s", "LowCardinality(String)") == "s"


def test_materialized_columns_are_refused() -> None:
    from sinks.migrate import ColumnInfo

    with pytest.raises(MigrationError, match="MATERIALIZED"):
        staging_ddl("db", "t", [ColumnInfo("a", "UInt8"), ColumnInfo("m", "UInt8", "MATERIALIZED", "1")])
