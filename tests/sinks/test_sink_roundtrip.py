"""Raw values in, exact logical values out, on both engines, for every column of every table."""

from __future__ import annotations

import datetime as dt
import random
import time
from decimal import Decimal

import pytest

from sinks import TABLES, Backend, migrate

from .helpers import CHINA_OFFSET, MAX_UNSCALED, default_batch, edge_batch, logical

pytestmark = pytest.mark.integration


@pytest.fixture
def migrated(backend: Backend) -> Backend:
    migrate(backend)
    return backend


@pytest.mark.parametrize("table", list(TABLES))
def test_every_column_round_trips_at_its_edges(migrated: Backend, table: str) -> None:
    spec = TABLES[table]
    version = migrated.version()
    batch = edge_batch(spec, version)
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)

    assert migrated.insert(table, batch) == 3

    names = ", ".join(spec.column_names)
    result = migrated.query(f"SELECT {names} FROM {migrated.database}.{table} ORDER BY src_offset")
    assert result.columns == list(spec.column_names)
    assert result.types == [t for _, t in spec.columns_for(version)]
    types = dict(spec.columns_for(version))
    for i, row in enumerate(result.rows):
        got = dict(zip(result.columns, row, strict=True))
        for name in spec.insert_columns:
            expected = logical(batch[name][i], types[name], name)
            assert got[name] == expected, (table, name, batch[name][i], got[name])
            if isinstance(got[name], dt.datetime):
                assert got[name].utcoffset() == CHINA_OFFSET, (table, name)
        assert started <= got["ingested_at"] <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    assert len(result.rows) == 3


def test_decimals_are_exact_at_scales_2_4_6(migrated: Backend) -> None:
    rng = random.Random(7)
    n = 5000
    amounts = [rng.randint(-MAX_UNSCALED, MAX_UNSCALED) for _ in range(n)]
    quantities = [rng.randint(-MAX_UNSCALED, MAX_UNSCALED) for _ in range(n)]
    prices = [rng.randint(0, MAX_UNSCALED) for _ in range(n)]
    batch = default_batch(TABLES["fee_details"], n)
    batch.update(det_item_fee_sumamt=amounts, cnt=quantities, pric=prices)
    migrated.insert("fee_details", batch)

    # sum() of Decimal(16, s) is Decimal(38, s) in both engines: exact, no float anywhere.
    row = migrated.query(
        f"SELECT sum(det_item_fee_sumamt), sum(cnt), sum(pric), min(cnt), max(pric) "
        f"FROM {migrated.database}.fee_details"
    ).rows[0]
    assert row[0] == Decimal(sum(amounts)).scaleb(-2)
    assert row[1] == Decimal(sum(quantities)).scaleb(-4)
    assert row[2] == Decimal(sum(prices)).scaleb(-6)
    assert row[3] == Decimal(min(quantities)).scaleb(-4)
    assert row[4] == Decimal(max(prices)).scaleb(-6)
    spot = migrated.query(
        f"SELECT toString(cnt), toString(pric) FROM {migrated.database}.fee_details WHERE src_offset = 0"
    ).rows[0]
    assert Decimal(spot[0]) == Decimal(quantities[0]).scaleb(-4)
    assert Decimal(spot[1]) == Decimal(prices[0]).scaleb(-6)


def test_reversals_make_sums_net(migrated: Backend) -> None:
    spec = TABLES["settlements"]
    batch = default_batch(spec, 2)
    batch.update(
        setl_id=["S1", "R1"],
        hifp_pay=[123456, -23456],  # 1234.56 paid, 234.56 reversed
        refd_setl_flag=[0, 1],
        init_setl_id=["", "S1"],
        full_reversal=[0, 0],
        rea=["", "refund"],
        line_count=[12, 0],
    )
    migrated.insert("settlements", batch)

    net = migrated.query(f"SELECT sum(hifp_pay) FROM {migrated.database}.settlements").scalar()
    assert net == Decimal("1000.00")
    reversal = migrated.query(
        f"SELECT init_setl_id, rea, age, gend FROM {migrated.database}.settlements WHERE refd_setl_flag = 1"
    ).rows
    assert reversal == [("S1", "refund", 1, "gend-1")]


def test_months_are_china_months(migrated: Backend) -> None:
    batch = default_batch(TABLES["settlements"], 1)
    batch["setl_time"] = [1706718600]  # 2024-01-31 16:30 UTC = 2024-02-01 00:30 in Beijing
    migrated.insert("settlements", batch)

    row = migrated.query(f"SELECT toYYYYMM(setl_time), toDate(setl_time) FROM {migrated.database}.settlements")
    assert row.rows == [(202402, dt.date(2024, 2, 1))]
    parts = migrated.query(
        f"SELECT DISTINCT partition FROM system.parts WHERE database = '{migrated.database}' "
        "AND table = 'settlements' AND active"
    )
    assert parts.rows == [("202402",)]


def test_offsets_of_a_partition_can_be_looked_up(migrated: Backend) -> None:
    batch = default_batch(TABLES["proc_orders"], 1000, start_offset=500)
    batch["src_partition"] = [i % 4 for i in range(1000)]
    migrated.insert("proc_orders", batch)

    found = migrated.query(
        f"SELECT DISTINCT src_offset FROM {migrated.database}.proc_orders "
        "WHERE src_partition = 2 AND src_offset >= 1400 ORDER BY src_offset"
    )
    assert [r[0] for r in found.rows] == [o for o in range(1400, 1500) if (o - 500) % 4 == 2]


@pytest.mark.parametrize("table", ["supplier_payments", "fee_details"])
def test_insert_throughput(migrated: Backend, table: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Printed, not asserted: the numbers depend on the machine (targets: >= 300k rows/s embedded)."""
    spec = TABLES[table]
    batch_rows, batches = 50_000, 10
    batch = default_batch(spec, batch_rows)
    amounts = [random.randint(-(10**9), 10**9) for _ in range(batch_rows)]
    for name, raw in spec.raw_columns:
        if raw == "Int64" and name not in ("src_offset",):
            batch[name] = amounts
    started = time.perf_counter()
    for _ in range(batches):
        migrated.insert(table, batch)
    elapsed = time.perf_counter() - started

    total = migrated.query(f"SELECT count() FROM {migrated.database}.{table}").scalar()
    assert total == batch_rows * batches
    with capsys.disabled():
        print(
            f"\n[{migrated.name}] {table}: {len(spec.insert_columns)} columns, "
            f"{batches} x {batch_rows:,} rows: {total / elapsed:,.0f} rows/s"
        )
