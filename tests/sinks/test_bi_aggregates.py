"""BI aggregates and views of ``sinks/ddl/0003_bi_aggregates.sql`` on both engines.

Rows go in the way the worker writes them (``Backend.insert`` into the staging twins, raw values),
so every aggregate is fed by its materialized view exactly as in production. Then:

- each ``agg_*`` table, read the way BI must read a SummingMergeTree (``sum() ... GROUP BY``,
  since rows of one key merge lazily), equals the same GROUP BY over the raw table, before and
  after reversals arrive, and after the parts are merged;
- rows that landed before the migration are backfilled once, and a staging rebuild leaves the
  aggregates fed;
- each ``bi_*`` view equals what a small hand-made dataset calls for, computed here in Python.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as dt
import json
import random
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from sinks import TABLES, Backend, ClickHouseConfig, SinkError, connect, migrate
from sinks.migrate import DDL_DIR, rebuild_aggregates
from yibao.localinfra import ClickHouseEndpoint

from .conftest import BACKEND_KINDS, fresh_database

pytestmark = pytest.mark.integration

CN = dt.timezone(dt.timedelta(hours=8))
EPOCH = dt.date(1970, 1, 1)
DAY_S = 86_400
BI_VIEWS = {
    "bi_fund_health": [
        "insu_admdvs", "insutype", "month", "income", "spending", "current_balance", "cumulative_balance",
        "months_capacity", "policy_ratio",
    ],
    "bi_alerts_by_rule": ["day", "rule_id", "admdvs", "alerts"],
    "bi_cross_province_flows": [
        "day", "insu_admdvs", "mdtrt_admdvs", "settlements", "medfee_sumamt", "fund_pay_sumamt", "filings",
    ],
    "bi_cross_province_flows_monthly": [
        "month", "insu_admdvs", "mdtrt_admdvs", "settlements", "medfee_sumamt", "fund_pay_sumamt", "filings",
    ],
    "bi_procurement_completion": [
        "fixmedins_code", "med_list_codg", "cntr_id", "agreed_volume", "purchased", "completion_pct",
        "elapsed_pct", "lag_points", "as_of",
    ],
    "bi_procurement_savings": [
        "fixmedins_code", "med_list_codg", "cntr_id", "win_pric", "base_pric", "price_cut_pct", "purchased",
        "purchased_amt", "savings",
    ],
    "bi_supplier_payments": [
        "fixmedins_code", "month", "deliveries", "delivered_amt", "paid_deliveries", "on_time", "on_time_rate",
        "weighted_avg_pay_days", "overdue_unpaid", "as_of",
    ],
    "bi_supervision_outcomes": ["admdvs", "month", "kind", "type", "cnt", "amount"],
}

Row = dict[str, Any]


# --- raw rows -------------------------------------------------------------------------------------


def ts(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> int:
    """Epoch seconds of a China wall-clock time (what the worker puts in a DateTime column)."""
    return int(dt.datetime(y, m, d, hh, mm, tzinfo=CN).timestamp())


def days(d: dt.date) -> int:
    """Raw value of a Date column."""
    return (d - EPOCH).days


def cn_date(epoch_s: int) -> dt.date:
    return dt.datetime.fromtimestamp(epoch_s, CN).date()


def cn_month(epoch_s: int) -> dt.date:
    return cn_date(epoch_s).replace(day=1)


def money(fen: int) -> Decimal:
    return Decimal(fen).scaleb(-2)


def _default(raw_type: str) -> Any:
    if raw_type.startswith("Nullable"):
        return None
    if raw_type.startswith("Array"):
        return []
    if "String" in raw_type:
        return ""
    return 0


def insert(backend: Backend, table: str, rows: Sequence[Row], start_offset: int = 0) -> None:
    """One INSERT of ``rows`` (raw values; unnamed columns take their type's default) into ``table``."""
    spec = TABLES[table]
    raw = dict(spec.raw_columns)
    unknown = {k for r in rows for k in r} - set(raw)
    assert not unknown, f"{table} has no staging column {unknown}"
    columns = {name: [r.get(name, _default(t)) for r in rows] for name, t in raw.items()}
    columns["src_offset"] = [r.get("src_offset", start_offset + i) for i, r in enumerate(rows)]
    columns["event_id"] = [r.get("event_id", f"{table}-{start_offset + i}") for i, r in enumerate(rows)]
    assert backend.insert(table, columns) == len(rows)


def insert_all(backend: Backend, data: dict[str, list[Row]], start_offset: int = 0) -> None:
    for table, rows in data.items():
        if rows:
            insert(backend, table, rows, start_offset)


def reversal_of(s: Row, at: int, share: float = 1.0) -> Row:
    """A reversal row as the worker stores it: negated money, refd_setl_flag = 1, same regions."""
    amounts = ("medfee_sumamt", "fund_pay_sumamt", "hifp_pay", "inscp_amt", "acct_pay", "psn_cash_pay")
    out = {k: s[k] for k in ("insu_admdvs", "mdtrt_admdvs", "insutype", "fixmedins_code", "med_type")}
    out.update({k: -int(s[k] * share) for k in amounts})
    out.update(setl_id=f"R{s['setl_id']}", init_setl_id=s["setl_id"], setl_time=at, refd_setl_flag=1,
               full_reversal=int(share == 1.0))
    return out


# --- a realistic random mix, for aggregate == raw -------------------------------------------------

REGIONS = ("330102", "330106", "330199", "110105", "440305", "510107")


def random_traffic(rng: random.Random, n: int, tag: str) -> dict[str, list[Row]]:
    """Settlements (a fifth of them cross-province), income, filings, procurement, supervision."""
    t0, t1 = ts(2025, 1, 1), ts(2025, 7, 1)

    def when() -> int:
        # a tenth land in the last half hour of a UTC day: the China date is already the next one
        if rng.random() < 0.1:
            d = rng.randrange(t0, t1) // DAY_S * DAY_S
            return d + DAY_S - rng.randrange(1, 1800)
        return rng.randrange(t0, t1)

    def other_province(region: str) -> str:
        return rng.choice([r for r in REGIONS if r[:2] != region[:2]])

    settlements = []
    for i in range(n):
        insu = rng.choice(REGIONS)
        mdtrt = other_province(insu) if rng.random() < 0.2 else rng.choice([r for r in REGIONS if r[:2] == insu[:2]])
        medfee = rng.randrange(1, 5_000_000)
        cash = rng.randrange(0, medfee // 3 + 1)
        acct = rng.randrange(0, (medfee - cash) // 3 + 1)
        fund = medfee - cash - acct
        hifp = fund * rng.randrange(60, 100) // 100
        settlements.append({
            "setl_id": f"S{tag}{i}", "psn_token": f"p{rng.randrange(500)}", "insutype": rng.choice(("310", "390")),
            "med_type": rng.choice(("11", "14", "21", "41")), "fixmedins_code": f"H{insu}{rng.randrange(20):05d}",
            "insu_admdvs": insu, "mdtrt_admdvs": mdtrt, "setl_time": when(), "medfee_sumamt": medfee,
            "inscp_amt": medfee - cash // 2, "hifp_pay": hifp, "hifmi_pay": fund - hifp, "fund_pay_sumamt": fund,
            "acct_pay": acct, "psn_cash_pay": cash, "line_count": 3,
        })
    income = [{
        "income_id": f"I{tag}{i}", "insu_admdvs": rng.choice(REGIONS), "insutype": rng.choice(("310", "390")),
        "income_type": rng.choice(("EMPLOYER", "PERSONAL", "SUBSIDY")),
        "income_amt": rng.randrange(-10_000, 90_000_000), "book_time": when(),
    } for i in range(n // 10)]
    filings = [{
        "trt_dcla_detl_sn": f"F{tag}{i}", "insu_admdvs": (r := rng.choice(REGIONS)),
        "mdtrt_area_admdvs": other_province(r)[:4] + "99", "dcla_type": "TEMPORARY",
        "begndate": days(dt.date(2025, 3, 1)), "dcla_time": when(),
    } for i in range(n // 20)]
    hospitals = [f"H{r}{k:05d}" for r in REGIONS[:3] for k in range(4)]
    drugs = [f"XA01ABD075A00201010{k:04d}" for k in range(5)]
    orders: list[Row] = []
    for i in range(n // 5):
        h, d = rng.choice(hospitals), rng.choice(drugs)
        orders.append({
            "ord_id": f"O{tag}{i}", "fixmedins_code": h, "med_list_codg": d, "admdvs": h[1:7],
            "cntr_id": rng.choice((f"CT{h}{d[-2:]}", "")), "purc_cnt": rng.randrange(1, 10**8),
            "purc_pric": rng.randrange(1, 10**8), "purc_amt": rng.randrange(1, 10**9), "ord_time": when(),
        })
    deliveries: list[Row] = [{
        "dlv_id": f"D{tag}{i}", "ord_id": o["ord_id"], "fixmedins_code": o["fixmedins_code"],
        "med_list_codg": o["med_list_codg"], "admdvs": o["admdvs"], "dlv_cnt": o["purc_cnt"],
        "dlv_amt": o["purc_amt"], "acpt_time": o["ord_time"] + rng.randrange(DAY_S, 5 * DAY_S),
    } for i, o in enumerate(orders)]
    payments = [{
        "pay_id": f"P{tag}{i}", "dlv_id": d["dlv_id"], "fixmedins_code": d["fixmedins_code"], "admdvs": d["admdvs"],
        "pay_amt": d["dlv_amt"], "pay_time": d["acpt_time"] + rng.randrange(DAY_S, 90 * DAY_S),
    } for i, d in enumerate(deliveries) if rng.random() < 0.8]
    supervision_regions = REGIONS[:4]
    inspections = [{
        "insp_id": f"N{tag}{i}", "insp_type": rng.choice(("ROUTINE", "SPECIAL", "FLIGHT", "CROSS")),
        "fixmedins_code": rng.choice(hospitals), "admdvs": rng.choice(supervision_regions),
        "begndate": days(dt.date(2025, 2, 1)), "viol_flag": 1, "viol_amt": rng.randrange(0, 10**9),
        "insp_time": when(),
    } for i in range(n // 10)]
    tips = [{
        "tip_id": f"T{tag}{i}", "admdvs": rng.choice(supervision_regions), "fixmedins_code": rng.choice(hospitals),
        "tip_cat": rng.choice(("FRAUD", "OVERCHARGE", "OTHER")), "rptr_token": f"k1.{i}",
        "inv_amt": rng.choice((None, rng.randrange(10**7))), "recv_time": when(),
    } for i in range(n // 10)]
    penalties = [{
        "pnsh_id": f"Q{tag}{i}", "fixmedins_code": rng.choice(hospitals), "admdvs": rng.choice(supervision_regions),
        "pnsh_type": rng.choice(("WARNING", "FINE", "SUSPEND_AGREEMENT")), "fine_amt": rng.randrange(0, 10**9),
        "pnsh_time": when(),
    } for i in range(n // 10)]
    recoveries = [{
        "rcvr_id": f"V{tag}{i}", "fixmedins_code": rng.choice(hospitals), "admdvs": rng.choice(supervision_regions),
        "rcvr_amt": rng.randrange(1, 10**9), "rcvr_time": when(),
    } for i in range(n // 10)]
    return {
        "settlements": settlements, "fund_income": income, "cross_province_filings": filings,
        "proc_orders": orders, "proc_deliveries": deliveries, "supplier_payments": payments,
        "inspections": inspections, "tips": tips, "penalties": penalties, "fund_recoveries": recoveries,
    }


@dataclass(frozen=True)
class Check:
    """An aggregate read the way BI must read it, and the same figures straight from the raw table."""

    name: str
    keys: int  # leading key columns; the rest are sums
    aggregate: str
    raw: str


def checks(db: str) -> list[Check]:
    def sums(*cols: str) -> str:
        return ", ".join(f"sum({c}) AS {c}" for c in cols)

    spend = ("medfee_sumamt", "fund_pay_sumamt", "hifp_pay", "inscp_amt", "acct_pay", "psn_cash_pay")
    cross = "substring(insu_admdvs, 1, 2) != substring(mdtrt_admdvs, 1, 2)"
    net = "sum(if(refd_setl_flag = 1, -1, 1))"
    supervision = (
        "SELECT admdvs, toStartOfMonth(insp_time) AS month, 'inspection' AS kind, toString(insp_type) AS type, "
        f"count() AS cnt, sum(viol_amt) AS amount FROM {db}.inspections GROUP BY admdvs, month, type "
        "UNION ALL SELECT admdvs, toStartOfMonth(recv_time) AS month, 'tip' AS kind, toString(tip_cat) AS type, "
        f"count() AS cnt, toDecimal128(0, 2) AS amount FROM {db}.tips GROUP BY admdvs, month, type "
        "UNION ALL SELECT admdvs, toStartOfMonth(pnsh_time) AS month, 'penalty' AS kind, toString(pnsh_type) AS type, "
        f"count() AS cnt, sum(fine_amt) AS amount FROM {db}.penalties GROUP BY admdvs, month, type "
        "UNION ALL SELECT admdvs, toStartOfMonth(rcvr_time) AS month, 'recovery' AS kind, '' AS type, "
        f"count() AS cnt, sum(rcvr_amt) AS amount FROM {db}.fund_recoveries GROUP BY admdvs, month"
    )
    return [
        Check(
            "agg_fund_spending_monthly", 3,
            f"SELECT insu_admdvs, insutype, month, sum(settlements), {sums(*spend)} "
            f"FROM {db}.agg_fund_spending_monthly GROUP BY insu_admdvs, insutype, month",
            f"SELECT insu_admdvs, insutype, toStartOfMonth(setl_time) AS month, {net}, {sums(*spend)} "
            f"FROM {db}.settlements GROUP BY insu_admdvs, insutype, month",
        ),
        Check(
            "agg_fund_income_monthly", 3,
            f"SELECT insu_admdvs, insutype, month, sum(incomes), sum(income_amt) "
            f"FROM {db}.agg_fund_income_monthly GROUP BY insu_admdvs, insutype, month",
            f"SELECT insu_admdvs, insutype, toStartOfMonth(book_time) AS month, count(), sum(income_amt) "
            f"FROM {db}.fund_income GROUP BY insu_admdvs, insutype, month",
        ),
        Check(
            "agg_settlement_days", 1,
            f"SELECT day, sum(settlements) FROM {db}.agg_settlement_days GROUP BY day",
            f"SELECT toDate(setl_time) AS day, count() FROM {db}.settlements GROUP BY day",
        ),
        Check(
            "agg_cross_province_daily", 3,
            f"SELECT insu_admdvs, mdtrt_admdvs, day, sum(settlements), {sums('medfee_sumamt', 'fund_pay_sumamt')} "
            f"FROM {db}.agg_cross_province_daily GROUP BY insu_admdvs, mdtrt_admdvs, day",
            f"SELECT insu_admdvs, mdtrt_admdvs, toDate(setl_time) AS day, {net}, "
            f"{sums('medfee_sumamt', 'fund_pay_sumamt')} FROM {db}.settlements WHERE {cross} "
            "GROUP BY insu_admdvs, mdtrt_admdvs, day",
        ),
        Check(
            "agg_cross_province_filings_daily", 3,
            f"SELECT insu_admdvs, mdtrt_area_admdvs, day, sum(filings) "
            f"FROM {db}.agg_cross_province_filings_daily GROUP BY insu_admdvs, mdtrt_area_admdvs, day",
            f"SELECT insu_admdvs, mdtrt_area_admdvs, toDate(dcla_time) AS day, count() "
            f"FROM {db}.cross_province_filings GROUP BY insu_admdvs, mdtrt_area_admdvs, day",
        ),
        Check(
            "agg_proc_purchases", 3,
            f"SELECT fixmedins_code, med_list_codg, cntr_id, sum(orders), {sums('purc_cnt', 'purc_amt')} "
            f"FROM {db}.agg_proc_purchases GROUP BY fixmedins_code, med_list_codg, cntr_id",
            f"SELECT fixmedins_code, med_list_codg, cntr_id, count(), {sums('purc_cnt', 'purc_amt')} "
            f"FROM {db}.proc_orders GROUP BY fixmedins_code, med_list_codg, cntr_id",
        ),
        Check(
            "agg_proc_deliveries_monthly", 2,
            f"SELECT fixmedins_code, month, sum(deliveries), sum(dlv_amt) "
            f"FROM {db}.agg_proc_deliveries_monthly GROUP BY fixmedins_code, month",
            f"SELECT fixmedins_code, toStartOfMonth(acpt_time) AS month, count(), sum(dlv_amt) "
            f"FROM {db}.proc_deliveries GROUP BY fixmedins_code, month",
        ),
        Check(
            "agg_supplier_payments_monthly", 2,
            f"SELECT fixmedins_code, month, sum(payments), sum(pay_amt) "
            f"FROM {db}.agg_supplier_payments_monthly GROUP BY fixmedins_code, month",
            f"SELECT fixmedins_code, toStartOfMonth(pay_time) AS month, count(), sum(pay_amt) "
            f"FROM {db}.supplier_payments GROUP BY fixmedins_code, month",
        ),
        Check(
            "agg_supervision_monthly", 4,
            f"SELECT admdvs, month, kind, type, sum(cnt), sum(amount) "
            f"FROM {db}.agg_supervision_monthly GROUP BY admdvs, month, kind, type",
            f"SELECT admdvs, month, kind, type, cnt, amount FROM ({supervision})",
        ),
    ]


def _rows(backend: Backend, sql: str, keys: int) -> list[tuple[Any, ...]]:
    """Rows as comparable tuples, without all-zero groups: SummingMergeTree drops a key whose sums
    all net to zero (a settlement and its full reversal) at its next merge."""
    out = []
    for row in backend.query(sql).rows:
        values = row[keys:]
        if any(v != 0 for v in values):
            out.append(tuple(str(v) if i < keys else v for i, v in enumerate(row)))
    return sorted(out)


def assert_aggregates_match_raw(backend: Backend) -> dict[str, int]:
    found = {}
    for check in checks(backend.database):
        aggregate = _rows(backend, check.aggregate, check.keys)
        raw = _rows(backend, check.raw, check.keys)
        assert aggregate == raw, check.name
        assert raw, f"{check.name}: the test data left it empty"
        found[check.name] = len(raw)
    return found


@pytest.fixture
def migrated(backend: Backend) -> Backend:
    migrate(backend)
    return backend


def test_migration_creates_the_aggregates_and_the_bi_views(migrated: Backend) -> None:
    db = migrated.database
    engines = {str(r[0]): str(r[1]) for r in migrated.query(
        f"SELECT name, engine FROM system.tables WHERE database = '{db}'").rows}
    for check in checks(db):
        assert engines[check.name] == "SummingMergeTree", check.name
    views = [n for n, e in engines.items() if n.startswith("agg_") and e == "MaterializedView"]
    assert len(views) == 12, views
    for view in BI_VIEWS:
        assert engines[view] == "View", view
    assert not any(n.endswith("_all") for n in engines)  # Distributed tables only in cluster mode


def test_aggregates_equal_the_raw_tables_before_and_after_reversals(migrated: Backend) -> None:
    rng = random.Random(20251)
    first = random_traffic(rng, 1000, "a")
    second = random_traffic(rng, 1000, "b")
    insert_all(migrated, first, 0)
    insert_all(migrated, second, 10_000)  # second parts: keys repeat across unmerged parts
    found = assert_aggregates_match_raw(migrated)
    assert found["agg_cross_province_daily"] > 50

    # reversals arrive later, some full, some partial, some in a later month than their original
    settled = first["settlements"] + second["settlements"]
    reversals = [reversal_of(s, s["setl_time"] + rng.randrange(60, 40 * DAY_S), rng.choice((1.0, 1.0, 0.5)))
                 for s in rng.sample(settled, 300)]
    cross = [s for s in settled if s["insu_admdvs"][:2] != s["mdtrt_admdvs"][:2]]
    reversals += [reversal_of(s, s["setl_time"] + 5) for s in cross[:20]]  # same day: nets out there
    db = migrated.database
    totals = f"SELECT sum(settlements), sum(fund_pay_sumamt) FROM {db}.agg_fund_spending_monthly"
    before = migrated.query(totals).rows[0]
    insert(migrated, "settlements", reversals, 50_000)
    assert_aggregates_match_raw(migrated)
    after = migrated.query(totals).rows[0]
    assert after[0] == before[0] - len(reversals)
    assert after[1] == before[1] - sum(money(-r["fund_pay_sumamt"]) for r in reversals)

    # merged or not, the answer is the same
    for check in checks(db):
        migrated.execute(f"OPTIMIZE TABLE {db}.{check.name} FINAL")
    assert_aggregates_match_raw(migrated)

    # the supplier-payments view counts the same deliveries as the monthly aggregate
    view = migrated.query(f"SELECT fixmedins_code, month, deliveries, delivered_amt FROM {db}.bi_supplier_payments "
                          "ORDER BY fixmedins_code, month").rows
    agg = migrated.query(f"SELECT fixmedins_code, month, sum(deliveries), sum(dlv_amt) "
                         f"FROM {db}.agg_proc_deliveries_monthly GROUP BY fixmedins_code, month "
                         "ORDER BY fixmedins_code, month").rows
    assert [tuple(r) for r in view] == [tuple(r) for r in agg]


def test_rows_landed_before_the_migration_are_backfilled_once(backend: Backend, tmp_path: Path) -> None:
    older = tmp_path / "ddl"
    older.mkdir()
    for path in sorted(DDL_DIR.glob("*.sql")):
        if path.name < "0003":
            shutil.copy(path, older / path.name)
    migrate(backend, ddl_dir=older)
    rng = random.Random(7)
    insert_all(backend, random_traffic(rng, 400, "old"), 0)

    actions = migrate(backend)
    assert any(a.startswith("applied 0003_bi_aggregates.sql") for a in actions), actions
    assert_aggregates_match_raw(backend)

    insert_all(backend, random_traffic(rng, 400, "new"), 10_000)
    assert_aggregates_match_raw(backend)
    assert migrate(backend)[0].startswith("nothing to do")


def test_aggregates_stay_fed_when_migrate_rebuilds_a_staging_table(migrated: Backend) -> None:
    db = migrated.database
    migrated.execute(f"DROP TABLE {db}.tips_in_mv")
    assert migrate(migrated) == ["rebuilt staging tips_in -> tips (11 raw columns)"]  # drops and re-creates tips_in
    insert(migrated, "tips", [{"admdvs": "330102", "tip_cat": "FRAUD", "recv_time": ts(2025, 5, 2)}] * 3)
    got = migrated.query(f"SELECT kind, type, sum(cnt) FROM {db}.agg_supervision_monthly GROUP BY kind, type").rows
    assert [tuple(r) for r in got] == [("tip", "FRAUD", 3)]


# --- bi_* views against a hand-made dataset, computed in Python -----------------------------------
# One dataset for all six views, inserted once per engine (a migration costs ~1-2 s): the views read
# different tables, except bi_fund_health, whose expectation is computed from every settlement here.


def _settlement(setl_id: str, insu: str, insutype: str, at: int, fund: int, hifp: int, inscp: int,
                mdtrt: str | None = None, medfee: int | None = None) -> Row:
    medfee = medfee if medfee is not None else fund + 1000
    return {
        "setl_id": setl_id, "insu_admdvs": insu, "mdtrt_admdvs": mdtrt or insu, "insutype": insutype,
        "setl_time": at, "medfee_sumamt": medfee, "fund_pay_sumamt": fund, "hifp_pay": hifp,
        "inscp_amt": inscp, "acct_pay": 600, "psn_cash_pay": medfee - fund - 600, "med_type": "11",
        "fixmedins_code": f"H{insu}00001",
    }


def _alert(alert_id: str, status: str, rule: str, admdvs: str, window: int, detected: int) -> Row:
    return {"alert_id": alert_id, "status": status, "rule_id": rule, "admdvs": admdvs, "window_start": window,
            "window_end": window + DAY_S, "detected_at": detected, "rule_version": 1, "severity": "HIGH",
            "subsystem": "settlement", "fixmedins_code": f"H{admdvs}00001"}


@dataclass
class HandMade:
    """The rows, in the batches they were inserted in, and the moment they were made."""

    backend: Backend
    now: int
    today: dt.date
    batches: list[tuple[str, list[Row]]]

    def rows(self, table: str) -> list[Row]:
        return [r for t, rows in self.batches if t == table for r in rows]

    def view(self, name: str, order_by: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.backend.query(
            f"SELECT * FROM {self.backend.database}.{name} ORDER BY {order_by}").rows]


def hand_made_batches(now: int, today: dt.date) -> list[tuple[str, list[Row]]]:
    # fund: region 330100, employee (310) insurance, over a year boundary; a reversal booked a month late
    s1 = _settlement("S1", "330100", "310", ts(2025, 11, 3, 9), 30_000, 24_000, 32_000)
    s2 = _settlement("S2", "330100", "310", ts(2025, 11, 30, 23, 50), 10_000, 7_000, 10_000)  # still November
    s3 = _settlement("S3", "330100", "310", ts(2025, 12, 1, 0, 10), 20_000, 15_000, 20_000)   # UTC: Nov 30
    s4 = _settlement("S4", "330100", "310", ts(2026, 1, 15), 40_000, 30_000, 40_000)
    s5 = _settlement("S5", "330100", "390", ts(2025, 12, 5), 5_000, 3_500, 5_000)
    income = [
        {"insu_admdvs": "330199", "insutype": "310", "income_amt": 100_000, "book_time": ts(2025, 11, 1, 8)},
        {"insu_admdvs": "330199", "insutype": "310", "income_amt": 50_000, "book_time": ts(2025, 12, 31, 23)},
        {"insu_admdvs": "330199", "insutype": "310", "income_amt": 80_000, "book_time": ts(2026, 2, 2)},
        {"insu_admdvs": "330199", "insutype": "390", "income_amt": 2_000, "book_time": ts(2025, 12, 9)},
        {"insu_admdvs": "110199", "insutype": "390", "income_amt": 5_000, "book_time": ts(2025, 3, 9)},
    ]
    # cross-province: 330202 (Zhejiang) people treated in 110105 (Beijing); one local settlement
    day = ts(2025, 4, 10, 10)
    x1 = _settlement("X1", "330202", "310", day, 70_000, 60_000, 90_000, mdtrt="110105", medfee=100_000)
    x2 = _settlement("X2", "330202", "390", day + 60, 15_000, 10_000, 20_000, mdtrt="110105", medfee=20_000)
    x3 = _settlement("X3", "330202", "310", day, 9_000, 8_000, 9_000, mdtrt="330106")  # same province
    filing = {"insu_admdvs": "330202", "dcla_type": "TEMPORARY", "begndate": days(dt.date(2025, 4, 9))}
    filings = [
        {**filing, "mdtrt_area_admdvs": "110105", "dcla_time": day - 7200},
        {**filing, "mdtrt_area_admdvs": "110199", "dcla_time": ts(2025, 4, 9, 23, 59)},
        {**filing, "mdtrt_area_admdvs": "110199", "dcla_time": ts(2025, 4, 9, 0, 1)},   # UTC: April 8
    ]
    # alerts: versions of one alert_id arrive in later batches
    d1, d2 = ts(2025, 3, 1), ts(2025, 3, 2)
    late_night = ts(2025, 3, 2, 0, 30)  # 2025-03-01 16:30 UTC: a China day later
    alerts1 = [
        _alert("A1", "FIRED", "R1", "330100", d1 + 3600, d1 + 7200),
        _alert("A2", "FIRED", "R1", "330100", d1 + 3600, d1 + 7300),
        _alert("A3", "FIRED", "R2", "330100", d2, d2 + 60),
        _alert("A4", "FIRED", "R1", "110100", late_night, late_night + 60),
        _alert("A5", "FIRED", "R2", "330100", d2, d2 + 100),
        _alert("A6", "FIRED", "R3", "330100", d2, d2 + 200),
    ]
    alerts2 = [
        _alert("A1", "RETRACTED", "R1", "330100", d1 + 3600, d1 + 5 * DAY_S),  # a reversal retracts A1
        _alert("A3", "FIRED", "R2", "330100", d2, d2 + 60),                   # the same version again
        _alert("A5", "RETRACTED", "R2", "330100", d2, d2 + 500),
        _alert("A6", "RETRACTED", "R3", "330100", d2, d2 + 200),  # same second as its FIRED: stream order
    ]
    alerts3 = [_alert("A5", "FIRED", "R2", "330100", d2, d2 + 900)]  # the window qualifies again

    # procurement contracts around today (China date)
    def contract(cntr: str, h: str, drug: str, volume: int, begin: int, end: int, signed: int) -> Row:
        return {"cntr_id": cntr, "fixmedins_code": h, "med_list_codg": drug, "admdvs": "330000",
                "agreed_volume": volume * 10_000, "cycle_begn_date": days(today + dt.timedelta(begin)),
                "cycle_end_date": days(today + dt.timedelta(end)), "sign_time": signed}

    def order(cntr: str, h: str, drug: str, cnt: str) -> Row:  # placed now: the data end today
        return {"cntr_id": cntr, "fixmedins_code": h, "med_list_codg": drug, "admdvs": "330102",
                "purc_cnt": int(Decimal(cnt) * 10_000), "purc_amt": 100, "ord_time": now}

    contracts = [
        contract("CT1", "H1", "X1", 1000, -100, 265, ts(2025, 1, 1)),
        contract("CT1", "H1", "X1", 1200, -100, 265, ts(2025, 1, 5)),  # amended: the latest version counts
        contract("CT2", "H1", "X2", 500, -400, -35, ts(2025, 1, 1)),   # cycle over, nothing bought
        contract("CT3", "H2", "X1", 0, 10, 375, ts(2025, 1, 1)),       # not started, no volume
        contract("CT4", "H2", "X2", 10, 0, 0, ts(2025, 1, 1)),         # a one-day cycle: today
    ]
    orders1 = [order("CT1", "H1", "X1", "300"), order("CT1", "H1", "X1", "150.5")]
    orders2 = [
        order("", "H1", "X1", "999"),      # outside any contract
        order("CT1", "H2", "X1", "77"),    # another hospital's order under that contract id
        order("CT4", "H2", "X2", "12.5"),  # more than agreed
    ]

    # deliveries accepted in March 2025 (China time) and their payments
    def delivery(dlv: str, h: str, at: int, fen: int) -> Row:
        return {"dlv_id": dlv, "fixmedins_code": h, "admdvs": "330102", "acpt_time": at, "dlv_amt": fen}

    def payment(dlv: str, h: str, at: int, fen: int) -> Row:
        return {"dlv_id": dlv, "fixmedins_code": h, "admdvs": "330102", "pay_time": at, "pay_amt": fen}

    a1, a2, a3, a5 = ts(2025, 3, 3, 10), ts(2025, 3, 10, 10), ts(2025, 3, 20, 10), ts(2025, 3, 31, 20)
    deliveries = [
        delivery("D1", "H1", a1, 100_000), delivery("D2", "H1", a2, 50_000), delivery("D3", "H1", a3, 30_000),
        delivery("D4", "H1", ts(2025, 3, 25, 10), 5_000), delivery("D5", "H1", a5, 1_000),
        delivery("D6", "H1", ts(2025, 3, 1, 1), 2_000),  # still February in UTC
        delivery("D7", "H1", now - 5 * DAY_S, 7_000), delivery("D8", "H2", ts(2025, 2, 28, 23, 59), 9_900),
    ]
    payments1 = [
        payment("D1", "H1", a1 + 10 * DAY_S, 100_000),  # on time
        payment("D2", "H1", a2 + 45 * DAY_S, 50_000),   # late
        payment("D3", "H1", a3 + 5 * DAY_S, 10_000),    # a third on time ...
    ]
    payments2 = [
        payment("D3", "H1", a3 + 40 * DAY_S, 20_000),   # ... the rest late: not paid on time
        payment("D5", "H1", a5 + 30 * DAY_S, 1_000),    # exactly 30 days: on time
        payment("D9", "H1", a1, 123_456),               # no such delivery: left out
        payment("D8", "H2", ts(2025, 3, 1, 9), 9_900),
    ]

    # supervision in May 2025
    may = ts(2025, 5, 10)
    inspections = [
        {"admdvs": "330100", "insp_type": "FLIGHT", "viol_amt": 100_050, "insp_time": may},
        {"admdvs": "330100", "insp_type": "ROUTINE", "viol_amt": 0, "insp_time": may},
        {"admdvs": "330100", "insp_type": "FLIGHT", "viol_amt": 9_950, "insp_time": may + DAY_S},
    ]
    recoveries = [
        {"admdvs": "330100", "rcvr_amt": 1_234_567, "rcvr_time": ts(2025, 6, 1, 0, 30)},  # June in China
        {"admdvs": "330100", "rcvr_amt": 1, "rcvr_time": ts(2025, 5, 31, 23, 30)},
    ]
    return [
        ("settlements", [s1, s2, s3, s4, s5, x1, x2, x3]),
        ("fund_income", income[:2]),
        ("fund_income", income[2:]),
        ("settlements", [reversal_of(s2, ts(2025, 12, 20)), reversal_of(x1, day + 3600),
                         reversal_of(x2, ts(2025, 4, 12, 9))]),
        ("cross_province_filings", filings),
        ("alerts", alerts1), ("alerts", alerts2), ("alerts", alerts3),
        ("proc_contracts", contracts), ("proc_orders", orders1), ("proc_orders", orders2),
        ("proc_deliveries", deliveries), ("supplier_payments", payments1), ("supplier_payments", payments2),
        ("inspections", inspections),
        ("tips", [{"admdvs": "330100", "tip_cat": "FRAUD", "inv_amt": 5_000_000, "recv_time": may}]),
        ("penalties", [{"admdvs": "330100", "pnsh_type": "FINE", "fine_amt": 500_000, "pnsh_time": may}]),
        ("fund_recoveries", recoveries),
    ]


@pytest.fixture(scope="module", params=BACKEND_KINDS)
def hand_made(request: pytest.FixtureRequest, chdb_path: Path) -> Iterator[HandMade]:
    """A migrated database per engine holding the hand-made rows, shared by the view tests."""
    database = fresh_database()
    if request.param == "server":
        server: ClickHouseEndpoint = request.getfixturevalue("clickhouse_server")
        backend = connect(ClickHouseConfig(backend="server", host=server.host, port=server.tcp_port, user=server.user,
                                           password=server.password, database=database))
    else:
        backend = connect(ClickHouseConfig(chdb_path=chdb_path, database=database))
    try:
        migrate(backend)
        now = int(dt.datetime.now(CN).timestamp())
        batches = hand_made_batches(now, cn_date(now))
        for i, (table, rows) in enumerate(batches):
            insert(backend, table, rows, 100 * i)
        yield HandMade(backend, now, cn_date(now), batches)
    finally:
        sync = " SYNC" if request.param == "embedded" else ""
        with contextlib.suppress(SinkError):
            backend.execute(f"DROP DATABASE IF EXISTS {database}{sync}")
        backend.close()


def test_bi_views_have_the_contracted_columns(hand_made: HandMade) -> None:
    db = hand_made.backend.database
    for view, columns in BI_VIEWS.items():
        described = [(str(r[0]), str(r[1])) for r in hand_made.backend.query(f"DESCRIBE TABLE {db}.{view}").rows]
        assert [name for name, _ in described] == columns, view
        for name, ch_type in described:
            if name in ("income", "spending", "current_balance", "cumulative_balance", "medfee_sumamt",
                        "fund_pay_sumamt", "delivered_amt", "amount"):
                assert ch_type == "Decimal(38, 2)", (view, name, ch_type)  # money stays exact
            if name in ("month", "day"):
                assert ch_type == "Date", (view, name, ch_type)


def months_elapsed(month: dt.date, first_day: dt.date, last_day: dt.date) -> float:
    """The part of ``month``'s year up to its end that lies between the first and the last day with
    settlements, in months (a partial month by its share of days): bi_fund_health's divisor."""
    def days_in(d: dt.date) -> int:
        return calendar.monthrange(d.year, d.month)[1]

    end = month.replace(day=days_in(month))
    first, last = max(month.replace(month=1), first_day), min(end, last_day)
    if last < first:
        return 0.0
    return last.month - first.month + last.day / days_in(last) - (first.day - 1) / days_in(first)


def expected_fund_health(settlements: Iterable[Row], incomes: Iterable[Row]) -> list[tuple[Any, ...]]:
    """bi_fund_health by its definition, in fen, from the raw rows."""
    settlements = list(settlements)
    days_on_record = [cn_date(s["setl_time"]) for s in settlements]
    first_day, last_day = min(days_on_record), max(days_on_record)
    months: dict[tuple[str, str], dict[dt.date, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, 0]))
    for s in settlements:  # a county's settlements count in its pooling region (XXXX99)
        m = months[(s["insu_admdvs"][:4] + "99", s["insutype"])][cn_month(s["setl_time"])]
        m[1] += s["fund_pay_sumamt"]
        m[2] += s["hifp_pay"]
        m[3] += s["inscp_amt"]
    for i in incomes:
        months[(i["insu_admdvs"], i["insutype"])][cn_month(i["book_time"])][0] += i["income_amt"]
    out = []
    for (region, insutype), series in sorted(months.items()):
        cumulative = 0
        ytd: dict[int, int] = defaultdict(int)
        for month, (income, spending, hifp, inscp) in sorted(series.items()):
            cumulative += income - spending
            ytd[month.year] += spending
            elapsed = months_elapsed(month, first_day, last_day)
            capacity = cumulative / (ytd[month.year] / elapsed) if ytd[month.year] > 0 and elapsed > 0 else None
            ratio = hifp / inscp if inscp else None
            out.append((region, insutype, month, money(income), money(spending), money(income - spending),
                        money(cumulative), capacity, ratio))
    return out


def test_bi_fund_health(hand_made: HandMade) -> None:
    got = hand_made.view("bi_fund_health", "insu_admdvs, insutype, month")
    want = expected_fund_health(hand_made.rows("settlements"), hand_made.rows("fund_income"))
    assert len(got) == len(want) == 8
    for g, w in zip(got, want, strict=True):
        assert g[:7] == w[:7], (g, w)
        assert g[7] == (pytest.approx(w[7]) if w[7] is not None else None), (g, w)
        assert g[8] == (pytest.approx(w[8]) if w[8] is not None else None), (g, w)
    # the definition spelled out for the 330199 employee fund. Settlements on record run from
    # 2025-04-10 (X1) to 2026-01-15 (S4): months elapsed count from April 10 in 2025, and end on
    # January 15 in 2026, whatever the month of the row
    fund = {r[2]: r for r in got if r[:2] == ("330199", "310")}
    nov, dec, jan, feb = (fund[dt.date(y, m, 1)] for y, m in ((2025, 11), (2025, 12), (2026, 1), (2026, 2)))
    assert (nov[3], nov[4], nov[5], nov[6]) == (Decimal("1000"), Decimal("400"), Decimal("600"), Decimal("600"))
    since_april_10 = 21 / 30 + 7  # the rest of April, then May .. November
    assert nov[7] == pytest.approx(600 / (400 / since_april_10)) and nov[8] == pytest.approx(310 / 420)
    assert (dec[4], dec[6]) == (Decimal("100"), Decimal("1000"))  # S2's reversal counts in December
    assert dec[7] == pytest.approx(1000 / (500 / (since_april_10 + 1))) and dec[8] == pytest.approx(0.8)
    assert (jan[5], jan[6]) == (Decimal("-400"), Decimal("600"))
    assert jan[7] == pytest.approx(600 / (400 / (15 / 31)))  # year-to-date restarts in January
    assert feb[4] == 0 and feb[6] == Decimal("1400") and feb[7] == pytest.approx(1400 / (400 / (15 / 31)))
    assert feb[8] is None  # no in-scope costs: no ratio
    assert [r[7:] for r in got if r[0] == "110199"] == [(None, None)]  # income only: no capacity
    # 330202's people (pool 330299) spent in April 2025, from the first day on record: X1 and X3, X1
    # reversed the same day; a deficit with no income on record is a negative capacity
    assert [r[2:8] for r in got if r[:2] == ("330299", "310")] == [
        (dt.date(2025, 4, 1), 0, Decimal("90.00"), Decimal("-90.00"), Decimal("-90.00"), pytest.approx(-21 / 30))]


def test_fund_capacity_of_a_week_of_data_divides_by_a_week(migrated: Backend) -> None:
    """A pipeline that has run for the first 7 days of October: the week's spending is 7/31 of a
    month, not a tenth of the year (toMonth(month) = 10 made a fund with ~10 months of reserve show
    ~430, the demo's 380-2,314 months)."""
    week = [_settlement(f"W{d}", "330106", "310", ts(2026, 10, d, 10), 100_000, 80_000, 100_000) for d in range(1, 8)]
    reserve = 10 * 700_000 * 31 // 7  # ten months of this spending rate, in fen
    insert(migrated, "settlements", week)
    insert(migrated, "fund_income", [{"insu_admdvs": "330199", "insutype": "310", "income_amt": reserve,
                                      "book_time": ts(2026, 10, 1, 0)}])
    [(capacity,)] = migrated.query(f"SELECT months_capacity FROM {migrated.database}.bi_fund_health").rows
    assert capacity == pytest.approx((reserve - 700_000) / (700_000 / (7 / 31)))
    assert 9.5 < capacity < 10


def test_bi_alerts_by_rule_counts_open_alerts_once(hand_made: HandMade) -> None:
    assert hand_made.view("bi_alerts_by_rule", "day, rule_id, admdvs") == [
        (dt.date(2025, 3, 1), "R1", "330100", 1),   # A2 (A1 retracted)
        (dt.date(2025, 3, 2), "R1", "110100", 1),   # A4, China day of its window
        (dt.date(2025, 3, 2), "R2", "330100", 2),   # A3 once, A5 fired again
    ]                                               # A6: retracted in the same second


def test_bi_cross_province_flows(hand_made: HandMade) -> None:
    """Settlements (county codes) and filings (pooling-region codes) meet at the pooling region:
    330202 → 110105 settlements and the filings for 110105 and 110199 are one pair, 330299 → 110199."""
    assert hand_made.view("bi_cross_province_flows", "day, insu_admdvs, mdtrt_admdvs") == [
        (dt.date(2025, 4, 9), "330299", "110199", 0, 0, 0, 2),
        (dt.date(2025, 4, 10), "330299", "110199", 1, Decimal("200.00"), Decimal("150.00"), 1),
        (dt.date(2025, 4, 12), "330299", "110199", -1, Decimal("-200.00"), Decimal("-150.00"), 0),
    ]


def test_bi_cross_province_flows_monthly_sums_the_days(hand_made: HandMade) -> None:
    monthly = hand_made.view("bi_cross_province_flows_monthly", "month, insu_admdvs, mdtrt_admdvs")
    assert monthly == [(dt.date(2025, 4, 1), "330299", "110199", 0, Decimal("0.00"), Decimal("0.00"), 3)]
    summed: dict[tuple[Any, ...], list[Any]] = {}
    for day, *key_vals in hand_made.view("bi_cross_province_flows", "day, insu_admdvs, mdtrt_admdvs"):
        acc = summed.setdefault((day.replace(day=1), *key_vals[:2]), [0, 0, 0, 0])
        for i, v in enumerate(key_vals[2:]):
            acc[i] += v
    assert [(*k, *v) for k, v in sorted(summed.items())] == monthly


def test_pooling_regions_of_province_pools_stay_as_they_are(migrated: Backend) -> None:
    """A filing for a province-level pool (XX9900) cannot be split into cities: it stays a pair of its own."""
    insert(migrated, "cross_province_filings", [
        {"insu_admdvs": "330106", "mdtrt_area_admdvs": "469900", "dcla_type": "TEMPORARY",
         "begndate": days(dt.date(2025, 4, 9)), "dcla_time": ts(2025, 4, 9, 10)},
        {"insu_admdvs": "330199", "mdtrt_area_admdvs": "460100", "dcla_type": "TEMPORARY",
         "begndate": days(dt.date(2025, 4, 9)), "dcla_time": ts(2025, 4, 9, 11)},
    ])
    got = migrated.query(f"SELECT insu_admdvs, mdtrt_admdvs, filings FROM {migrated.database}.bi_cross_province_flows "
                         "ORDER BY mdtrt_admdvs").rows
    assert [tuple(r) for r in got] == [("330199", "460199", 1), ("330199", "469900", 1)]


def test_bi_procurement_completion(hand_made: HandMade) -> None:
    got = {r[2]: r for r in hand_made.view("bi_procurement_completion", "cntr_id")}
    assert sorted(got) == ["CT1", "CT2", "CT3", "CT4"]
    ct1, ct2, ct3, ct4 = got["CT1"], got["CT2"], got["CT3"], got["CT4"]
    assert ct1[:5] == ("H1", "X1", "CT1", Decimal("1200"), Decimal("450.5"))
    elapsed = 100 * 100 / 365
    assert ct1[5] == pytest.approx(450.5 / 1200 * 100) and ct1[6] == pytest.approx(elapsed)
    assert ct1[7] == pytest.approx(elapsed - 450.5 / 1200 * 100)
    assert ct2[3:8] == (Decimal("500"), 0, 0.0, 100.0, 100.0)
    assert ct3[3:8] == (0, 0, None, 0.0, None)
    assert ct4[4:8] == (Decimal("12.5"), pytest.approx(125.0), 100.0, pytest.approx(-25.0))
    assert {r[8] for r in got.values()} == {hand_made.today}  # the orders were placed today


def test_bi_supplier_payments(hand_made: HandMade) -> None:
    got = hand_made.view("bi_supplier_payments", "fixmedins_code, month")
    march = dt.date(2025, 3, 1)
    current = cn_month(hand_made.now - 5 * DAY_S)
    assert [(r[0], r[1]) for r in got] == [("H1", march), ("H1", current), ("H2", dt.date(2025, 2, 1))]
    h1 = got[0]
    weighted = (1000 * 10 + 500 * 45 + 100 * 5 + 200 * 40 + 10 * 30) / (1000 + 500 + 100 + 200 + 10)
    assert h1[:6] == ("H1", march, 6, Decimal("1880.00"), 4, 2)  # D1..D6; D1 and D5 on time
    assert h1[6] == pytest.approx(2 / (4 + 2))
    assert h1[7] == pytest.approx(weighted)
    assert h1[8] == 2  # D4 and D6: more than 30 days, nothing paid
    assert got[1][2:9] == (1, Decimal("70.00"), 0, 0, None, None, 0)  # D7: unpaid, not yet due
    assert got[2][2:9] == (1, Decimal("99.00"), 1, 1, 1.0, pytest.approx((9 * 3600 + 60) / DAY_S), 0)
    # judged at the latest acceptance on record, D7's, five days ago
    assert {int(r[9].timestamp()) for r in got} == {hand_made.now - 5 * DAY_S}


def test_procurement_views_judge_data_that_end_in_the_past_where_they_end(migrated: Backend) -> None:
    """Data that end before today (a replay, the demo's simulated weeks) are judged as of their last
    order or acceptance, as the rules judge them in event time: a contract one month into its year
    is 8.5% elapsed, not 100%, and a delivery accepted a week before the data end is not overdue."""
    db = migrated.database
    insert(migrated, "proc_contracts", [{
        "cntr_id": "CT1", "fixmedins_code": "H1", "med_list_codg": "X1", "admdvs": "330000",
        "agreed_volume": 3650 * 10_000, "cycle_begn_date": days(dt.date(2025, 1, 1)),
        "cycle_end_date": days(dt.date(2026, 1, 1)), "sign_time": ts(2025, 1, 1, 9)}])
    insert(migrated, "proc_orders", [{
        "cntr_id": "CT1", "fixmedins_code": "H1", "med_list_codg": "X1", "admdvs": "330102",
        "purc_cnt": 200 * 10_000, "purc_amt": 100, "ord_time": ts(2025, 2, 1, 10)}])
    [row] = migrated.query(f"SELECT completion_pct, elapsed_pct, lag_points, as_of "
                           f"FROM {db}.bi_procurement_completion").rows
    assert row[3] == dt.date(2025, 2, 1)
    assert row[1] == pytest.approx(31 * 100 / 365) and row[2] == pytest.approx(31 * 100 / 365 - 200 / 36.5)

    accepted, last = ts(2025, 3, 1, 10), ts(2025, 3, 8, 10)
    insert(migrated, "proc_deliveries", [
        {"dlv_id": "D1", "fixmedins_code": "H1", "admdvs": "330102", "acpt_time": accepted, "dlv_amt": 1000},
        {"dlv_id": "D2", "fixmedins_code": "H1", "admdvs": "330102", "acpt_time": last, "dlv_amt": 1000}])
    [row] = migrated.query(f"SELECT deliveries, overdue_unpaid, on_time_rate, as_of "
                           f"FROM {db}.bi_supplier_payments").rows
    assert (row[0], row[1], row[2], int(row[3].timestamp())) == (2, 0, None, last)


def test_bi_supervision_outcomes(hand_made: HandMade) -> None:
    may, june = dt.date(2025, 5, 1), dt.date(2025, 6, 1)
    assert hand_made.view("bi_supervision_outcomes", "admdvs, month, kind, type") == [
        ("330100", may, "inspection", "FLIGHT", 2, Decimal("1100.00")),
        ("330100", may, "inspection", "ROUTINE", 1, Decimal("0")),
        ("330100", may, "penalty", "FINE", 1, Decimal("5000.00")),
        ("330100", may, "recovery", "", 1, Decimal("0.01")),
        ("330100", may, "tip", "FRAUD", 1, Decimal("0")),  # a tip's amount is a claim: not summed
        ("330100", june, "recovery", "", 1, Decimal("12345.67")),
    ]


# --- the migration machinery this file needs (no engine) ------------------------------------------


def test_cluster_only_statements_and_distributed_placeholders() -> None:
    from sinks.migrate import render, split_statements

    statements = split_statements(
        "CREATE TABLE IF NOT EXISTS {db}.a{on_cluster} (x UInt8) ENGINE = Memory;\n"
        "-- cluster_only\n"
        "CREATE TABLE IF NOT EXISTS {db}.a_all{on_cluster} AS {db}.a ENGINE = Distributed({cluster}, {db}, a);\n"
        "CREATE VIEW IF NOT EXISTS {db}.v{on_cluster} AS SELECT x FROM {db}.a{all};\n"
    )
    assert [s.cluster_only for s in statements] == [False, True, False]
    view = statements[2].sql
    assert render(view, "yb", "", "String") == "CREATE VIEW IF NOT EXISTS yb.v AS SELECT x FROM yb.a"
    assert render(view, "yb", " ON CLUSTER c", "String", "c") == (
        "CREATE VIEW IF NOT EXISTS yb.v ON CLUSTER c AS SELECT x FROM yb.a_all"
    )
    assert "Distributed(c, yb, a)" in render(statements[1].sql, "yb", " ON CLUSTER c", "String", "c")


def test_the_shipped_migration_gates_only_the_distributed_tables() -> None:
    from sinks.migrate import load_migrations

    bi = next(m for m in load_migrations() if m.file == "0003_bi_aggregates.sql")
    statements = bi.statements()
    gated = [s.sql for s in statements if s.cluster_only]
    assert len(gated) == 8 and all("ENGINE = Distributed({cluster}" in s for s in gated)
    for s in statements:
        if s.sql.startswith("CREATE VIEW"):
            assert "{all}" in s.sql  # a bi_* view reads every shard in cluster mode


def test_bi_procurement_savings_against_the_baseline_price(migrated: Backend) -> None:
    """Price cut and savings by their definitions (domain.md), from a contract's latest version."""
    def contract(cntr: str, win: str, base: str, signed: int) -> Row:
        return {"cntr_id": cntr, "fixmedins_code": "H1", "med_list_codg": "XA01", "admdvs": "330102",
                "agreed_volume": 1000 * 10_000, "win_pric": int(Decimal(win) * 10**6),
                "base_pric": int(Decimal(base) * 10**6), "sign_time": signed}

    def order(cntr: str, cnt: str, price: str) -> Row:
        amt = int((Decimal(cnt) * Decimal(price) * 100).to_integral_value(ROUND_HALF_UP))
        return {"cntr_id": cntr, "fixmedins_code": "H1", "med_list_codg": "XA01", "admdvs": "330102",
                "purc_cnt": int(Decimal(cnt) * 10_000), "purc_pric": int(Decimal(price) * 10**6),
                "purc_amt": amt, "ord_time": ts(2025, 6, 1)}

    insert(migrated, "proc_contracts", [
        contract("CT1", "4.000000", "10.000000", ts(2025, 1, 1)),
        contract("CT1", "3.500000", "10.000000", ts(2025, 1, 2)),   # amended: the latest version counts
        contract("CT2", "1.000000", "0", ts(2025, 1, 1)),           # no baseline: no price cut
    ])
    insert(migrated, "proc_orders", [order("CT1", "100", "3.5"), order("CT1", "20.5", "3.5"),
                                     order("", "999", "3.5")])  # outside any contract
    got = {r[2]: r for r in migrated.query(
        f"SELECT * FROM {migrated.database}.bi_procurement_savings ORDER BY cntr_id").rows}
    ct1, ct2 = got["CT1"], got["CT2"]
    assert (ct1[3], ct1[4]) == (Decimal("3.5"), Decimal("10"))
    assert ct1[5] == pytest.approx(65.0)
    assert (ct1[6], ct1[7]) == (Decimal("120.5"), Decimal("421.75"))
    assert ct1[8] == Decimal("783.25")  # 120.5 x (10 - 3.5)
    assert ct2[5] is None and ct2[6] == 0 and ct2[8] == 0


def test_rebuild_aggregates_makes_them_the_raw_tables_sums_again(migrated: Backend) -> None:
    insert_all(migrated, random_traffic(random.Random(3), 300, "r"), 0)
    db = migrated.database
    names = [c.name for c in checks(db)]
    for name in names:  # what a block pushed to the aggregates but not to T leaves after a redelivery
        migrated.execute(f"INSERT INTO {db}.{name} SELECT * FROM {db}.{name}")
    with pytest.raises(AssertionError):
        assert_aggregates_match_raw(migrated)
    assert sorted(rebuild_aggregates(migrated)) == sorted(names)
    assert_aggregates_match_raw(migrated)


KILLED_MID_WRITE = """
import os, random, signal, sys
sys.path.insert(0, {tests!r})
from sinks import ClickHouseConfig, connect
from sinks.migrate import migrate
from tests.sinks.test_bi_aggregates import checks, insert_all, random_traffic
be = connect(ClickHouseConfig(chdb_path={path!r}, database="killed"))
migrate(be)
insert_all(be, random_traffic(random.Random(5), 200, "k"), 0)
for c in checks("killed"):
    be.execute(f"INSERT INTO killed.{{c.name}} SELECT * FROM killed.{{c.name}}")
os.kill(os.getpid(), signal.SIGKILL)
"""

REOPENED = """
import json, sys
sys.path.insert(0, {tests!r})
from sinks import ClickHouseConfig, connect
from tests.sinks.test_bi_aggregates import assert_aggregates_match_raw
be = connect(ClickHouseConfig(chdb_path={path!r}, database="killed"))
unclean = be.unclean
assert_aggregates_match_raw(be)
be.close()
again = connect(ClickHouseConfig(chdb_path={path!r}, database="killed"))
print(json.dumps({{"unclean": unclean, "after_a_clean_close": again.unclean}}))
again.close()
"""


def test_a_chdb_path_left_open_by_a_killed_process_gets_its_aggregates_rebuilt(tmp_path: Path) -> None:
    """chDB dies with the worker: SIGKILLed between the materialized views of one insert, the
    aggregates can hold a block that T does not (then counted twice once it is redelivered). The
    next process to open the path finds it left open and makes the aggregates again from T."""
    pytest.importorskip("chdb")
    import subprocess
    import sys

    tests = str(Path(__file__).resolve().parents[2])  # the repository: tests.sinks is importable
    path = str(tmp_path / "chdb")
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE.format(tests=tests, path=path)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    reopened = subprocess.run([sys.executable, "-c", REOPENED.format(tests=tests, path=path)],
                              capture_output=True, text=True, timeout=300)
    assert reopened.returncode == 0, reopened.stderr[-2000:]
    assert json.loads(reopened.stdout.strip().splitlines()[-1]) == {"unclean": True, "after_a_clean_close": False}
