"""The ClickHouse monitors (fund capacity, negative balance, settled over sold, credit grade) and the credit view.

Every test runs on both engines: the session's ClickHouse server (Debian's 18.16 here) and chDB,
with hand-made rows at each threshold's boundary, so the SQL and the Python around it are checked
where an off-by-one would show.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from sinks import Backend, ClickHouseConfig, connect
from sinks.migrate import DDL_DIR, migrate
from sinks.tables import TABLES, unwrap_nullable
from streams.monitors import evaluate, month_bounds, run_monitors, write_alerts
from streams.rules import RULES_FILE, check_rule, load_rules_file
from streams.rules.model import Rule
from yibao.sim.evaluate import alerts_from_backend

CHINA = ZoneInfo("Asia/Shanghai")
RULES = [r for r in load_rules_file(RULES_FILE, check_rule)]
MON = [r for r in RULES if r.id in ("YB-FUND-CAPACITY", "YB-FUND-NEGATIVE", "YB-PSI-SETTLED-OVER-SOLD")]
TABLES_USED = ("settlements", "fund_income", "fee_details", "inventory_movements", "penalties", "alerts")
NOW = int(datetime(2026, 4, 2, 9, tzinfo=CHINA).timestamp() * 1000)


@pytest.fixture(scope="module", params=["embedded", "server"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One migrated database per engine for the module; each test empties the tables it uses."""
    database = f"yb_mon_{uuid.uuid4().hex[:10]}"
    if request.param == "server":
        ch = request.getfixturevalue("clickhouse_server")
        be = connect(ClickHouseConfig(backend="server", host=ch.host, port=ch.tcp_port, user=ch.user,
                                      password=ch.password, database=database))
    else:
        pytest.importorskip("chdb")
        # chDB allows one data path per process: share the suite's, with a database of our own
        be = connect(ClickHouseConfig(chdb_path=tmp_path_factory.getbasetemp() / "chdb-shared", database=database))
    # only the migrations these monitors rest on (others, e.g. BI aggregates, evolve independently)
    ddl = tmp_path_factory.mktemp("ddl")
    for f in sorted(DDL_DIR.glob("*.sql")):
        if f.name[:4] in ("0001", "0002", "0004", "0005", "0007"):
            shutil.copy(f, ddl / f.name)
    try:
        migrate(be, ddl_dir=ddl)
        yield be
        be.execute(f"DROP DATABASE IF EXISTS {database}" + (" SYNC" if request.param == "embedded" else ""))
    finally:
        be.close()


@pytest.fixture
def be(db: Backend) -> Backend:
    for t in TABLES_USED:
        db.execute(f"TRUNCATE TABLE IF EXISTS {db.database}.{t}")
    return db


def ts(y: int, m: int, d: int, h: int = 10) -> int:
    """Epoch seconds of a China-time instant (the raw DateTime value)."""
    return int(datetime(y, m, d, h, tzinfo=CHINA).timestamp())


def insert(be: Backend, table: str, rows: list[dict[str, Any]]) -> None:
    """Raw rows (decimals unscaled, times in epoch seconds); unnamed columns take zero values."""
    spec = TABLES[table]
    cols: dict[str, list[Any]] = {}
    for name, raw in spec.raw_columns:
        _, nullable = unwrap_nullable(dict(spec.columns)[name])
        zero: Any = None if nullable else [] if raw.startswith("Array") else "" if "String" in raw else 0
        cols[name] = [r.get(name, str(uuid.uuid4()) if name == "event_id" else zero) for r in rows]
    be.insert(table, cols)


def spend(pool_region: str, ins: str, t: int, fen: int, reversal: bool = False) -> dict[str, Any]:
    return {"setl_id": uuid.uuid4().hex, "insu_admdvs": pool_region, "insutype": ins, "setl_time": t,
            "fund_pay_sumamt": -fen if reversal else fen, "hifp_pay": -fen if reversal else fen,
            "refd_setl_flag": int(reversal), "fixmedins_code": f"H{pool_region}00001"}


def income(pool: str, ins: str, t: int, fen: int) -> dict[str, Any]:
    return {"income_id": uuid.uuid4().hex, "insu_admdvs": pool, "insutype": ins, "income_type": "EMPLOYER",
            "income_amt": fen, "book_time": t}


def fired(be: Backend) -> dict[tuple[str, str], str]:
    """(rule, month) → status of each alert's latest version, with its admdvs."""
    out = {}
    for a in alerts_from_backend(be):
        out[(a["rule_id"], str(a["month"]))] = a["status"]
    return out


def rows_of(be: Backend, rule: str) -> list[dict[str, Any]]:
    return be.query(f"SELECT alert_id, event_id, status, admdvs, subsystem, amount_at_risk FROM "
                    f"{be.database}.alerts WHERE rule_id = '{rule}' ORDER BY detected_at, status").dicts()


# --- fund ------------------------------------------------------------------------------------------

def fund_dataset(be: Backend) -> None:
    """January and February 2026 closed (a March settlement), per pool × insutype:

    - 110199/310: 1000.00 spent and 200.00 reversed (net 800.00), income 3,200.00: capacity exactly
      3.000 months (2.2 if the reversal were not netted), balance positive: nothing fires.
    - 440399/310: 800.00 spent, income 3,199.99: capacity 2.99999: CAPACITY fires (January).
    - 310199/390: January income 5,000.00, spending 1,000.00; February income 999.99, spending
      1,000.00: February's balance is -0.01: NEGATIVE fires; capacity 3.99999: no.
    - 510199/390: February income == spending (balance 0): nothing.
    """
    insert(be, "settlements", [
        spend("110105", "310", ts(2026, 1, 5), 100_000), spend("110105", "310", ts(2026, 1, 20), 20_000, True),
        spend("440305", "310", ts(2026, 1, 6), 80_000),
        spend("310115", "390", ts(2026, 1, 7), 100_000), spend("310115", "390", ts(2026, 2, 7), 100_000),
        spend("510107", "390", ts(2026, 1, 7), 10_000), spend("510107", "390", ts(2026, 2, 7), 10_000),
        spend("110105", "310", ts(2026, 3, 2), 5_000),  # closes February
    ])
    insert(be, "fund_income", [
        income("110199", "310", ts(2026, 1, 21), 320_000),
        income("440399", "310", ts(2026, 1, 21), 319_999),
        income("310199", "390", ts(2026, 1, 21), 500_000), income("310199", "390", ts(2026, 2, 21), 99_999),
        income("510199", "390", ts(2026, 1, 21), 60_000), income("510199", "390", ts(2026, 2, 21), 10_000),
    ])


def test_fund_monitors_fire_exactly_at_their_boundaries(be: Backend) -> None:
    fund_dataset(be)
    run = run_monitors(be, MON, now_ms=NOW)
    assert run.as_of == 202603
    got = sorted((d["rule_id"], d["admdvs"], d["evidence"]["insutype"], d["evidence"]["month"], d["status"])
                 for d in run.emitted)
    assert got == [("YB-FUND-CAPACITY", "440399", "310", "202601", "FIRED"),
                   ("YB-FUND-NEGATIVE", "310199", "390", "202602", "FIRED")]
    cap = next(d for d in run.emitted if d["rule_id"] == "YB-FUND-CAPACITY")
    assert cap["evidence"]["capacity_months"] == "2.999" and cap["subsystem"] == "fund"
    assert cap["amount_at_risk"] == 1  # one fen short of three months
    neg = next(d for d in run.emitted if d["rule_id"] == "YB-FUND-NEGATIVE")
    assert neg["amount_at_risk"] == 1 and neg["window_start"] == month_bounds(202602)[0]
    stored = rows_of(be, "YB-FUND-CAPACITY")
    assert len(stored) == 1 and stored[0]["admdvs"] == "440399" and stored[0]["subsystem"] == "fund"


def test_reruns_never_duplicate_and_a_cleared_condition_retracts(be: Backend) -> None:
    fund_dataset(be)
    first = run_monitors(be, MON, now_ms=NOW)
    assert len(first.emitted) == 2
    for i in range(2):
        again = run_monitors(be, MON, now_ms=NOW + 60_000 * (i + 1))
        assert again.emitted == []
    assert len(rows_of(be, "YB-FUND-CAPACITY")) == 1
    # a late booking of one fen lifts 440399 to exactly three months: the alert is retracted, once
    insert(be, "fund_income", [income("440399", "310", ts(2026, 1, 30), 1)])
    cleared = run_monitors(be, MON, now_ms=NOW + 3_600_000)
    assert [(d["rule_id"], d["status"]) for d in cleared.emitted] == [("YB-FUND-CAPACITY", "RETRACTED")]
    assert cleared.emitted[0]["alert_id"] == first.emitted[0]["alert_id"] or \
        cleared.emitted[0]["alert_id"] in {d["alert_id"] for d in first.emitted}
    assert run_monitors(be, MON, now_ms=NOW + 3_700_000).emitted == []
    assert fired(be)[("YB-FUND-CAPACITY", "202601")] == "RETRACTED"
    # a late settlement sinks it again: the same alert id fires as a new generation (new event id)
    insert(be, "settlements", [spend("440305", "310", ts(2026, 1, 31), 1)])
    refired = run_monitors(be, MON, now_ms=NOW + 7_200_000)
    assert [(d["rule_id"], d["status"]) for d in refired.emitted] == [("YB-FUND-CAPACITY", "FIRED")]
    rows = rows_of(be, "YB-FUND-CAPACITY")
    assert len({r["alert_id"] for r in rows}) == 1 and len({r["event_id"] for r in rows}) == 3
    assert fired(be)[("YB-FUND-CAPACITY", "202601")] == "FIRED"
    assert run_monitors(be, MON, now_ms=NOW + 7_300_000).emitted == []


def test_months_in_progress_are_not_judged(be: Backend) -> None:
    fund_dataset(be)
    run = evaluate(be, MON, now_ms=NOW, as_of=202602)  # February still open: only January judged
    assert sorted(d["rule_id"] for d in run.emitted) == ["YB-FUND-CAPACITY"]
    assert evaluate(be, [], now_ms=NOW).emitted == []


def test_thresholds_are_parameters(be: Backend) -> None:
    fund_dataset(be)
    strict = [Rule.from_dict({**r.to_dict(), "params": {**r.params, "min_months_pm": 4500}})
              if r.id == "YB-FUND-CAPACITY" else r for r in MON]
    run = evaluate(be, strict, now_ms=NOW)
    months = sorted((d["admdvs"], d["evidence"]["month"]) for d in run.emitted if d["rule_id"] == "YB-FUND-CAPACITY")
    # 110199 at 3.0, 440399 at 2.99999, 310199 at 4.0 then 3.99999, 510199 at 5.0 then 6.0 (Jan+Feb average)
    assert months == [("110199", "202601"), ("310199", "202601"), ("310199", "202602"), ("440399", "202601")]


# --- settled over sold -----------------------------------------------------------------------------

H = "H33010600001"


def line(drug: str, t: int, cnt4: int, fee: int = 1_000) -> dict[str, Any]:
    return {"setl_id": uuid.uuid4().hex, "fixmedins_code": H, "insu_admdvs": "330106", "med_type": "11",
            "setl_time": t, "fee_ocur_time": t, "med_list_codg": drug, "hilist_code": drug, "cnt": cnt4,
            "det_item_fee_sumamt": fee}


def move(drug: str, t: int, cnt4: int, kind: str = "SALE_OUT") -> dict[str, Any]:
    return {"mov_id": uuid.uuid4().hex, "fixmedins_code": H, "med_list_codg": drug, "admdvs": "330106",
            "mov_type": kind, "cnt": cnt4, "mov_time": t}


def test_settled_over_sold_boundary(be: Backend) -> None:
    jan = ts(2026, 1, 10)
    insert(be, "fee_details", [
        line("XA", jan, 10_0000),  # settled 10, sold 10: fine
        line("XB", jan, 103_0000),  # settled 103, sold 100: exactly 1 unit + 2% over: not beyond
        line("XC", jan, 103_0001, 10_300),  # 103.0001: beyond the tolerance
        line("XD", jan, 5_0000, 5_000),  # in inventory (bought) but never sold: fires
        line("XE", jan, 5_0000),  # not kept in inventory (a service): not judged
    ])
    insert(be, "inventory_movements", [
        move("XA", jan, 10_0000), move("XB", jan, 100_0000), move("XC", jan, 100_0000),
        move("XD", jan, 50_0000, "PURCHASE_IN"), move("XC", jan, 100_0000, "SALE_RETURN"),
    ])
    insert(be, "settlements", [spend("330106", "310", ts(2026, 2, 1), 100)])  # closes January
    insert(be, "fund_income", [income("330199", "310", ts(2026, 2, 1), 10_000)])
    run = run_monitors(be, MON, now_ms=NOW)
    got = sorted((d["fixmedins_code"], d["evidence"]["med_list_codg"], d["evidence"]["excess_cnt"])
                 for d in run.emitted if d["rule_id"] == "YB-PSI-SETTLED-OVER-SOLD")
    assert got == [(H, "XC", "3.0001"), (H, "XD", "5")]
    xd = next(d for d in run.emitted if d["evidence"].get("med_list_codg") == "XD")
    assert xd["amount_at_risk"] == 5_000 and xd["subsystem"] == "procurement" and xd["admdvs"] == "330106"
    assert run_monitors(be, MON, now_ms=NOW + 1000).emitted == []


# --- credit score ------------------------------------------------------------------------------

PENALTY_PTS = {"WARNING": 20, "FINE": 50, "SUSPEND_AGREEMENT": 200, "TERMINATE_AGREEMENT": 500}
HIT_PTS = {"LOW": 1, "MEDIUM": 2, "HIGH": 5, "CRITICAL": 10}


def credit(penalties: list[tuple[str, str, int]], hits: list[tuple[str, str]]) -> dict[str, tuple[int, int, str]]:
    """The documented formula (docs/design.md), in Python: institution → (score, rule hits, grade)."""
    out = {}
    for h in sorted({p[0] for p in penalties} | {x[0] for x in hits}):
        pen = sum(PENALTY_PTS[t] for c, t, _ in penalties if c == h)
        fines = sum(f for c, _, f in penalties if c == h)  # fen
        hit = min(300, sum(HIT_PTS[s] for c, s in hits if c == h))
        score = max(0, 1000 - pen - min(100, fines // 1_000_000) - hit)
        grade = "A" if score >= 900 else "B" if score >= 750 else "C" if score >= 600 else "D"
        out[h] = (score, sum(1 for c, _ in hits if c == h), grade)
    return out


def alert(h: str, severity: str, status: str = "FIRED", aid: str | None = None, at: int = NOW) -> dict[str, Any]:
    aid = aid or uuid.uuid4().hex
    return {"event_id": str(uuid.uuid4()), "alert_id": aid, "status": status, "rule_id": "YB-LINE-SEX",
            "rule_version": 1, "result_type": "DEFINITE", "severity": severity, "subsystem": "settlement",
            "fixmedins_code": h, "psn_token": None, "admdvs": h[1:7], "setl_ids": [], "mdtrt_ids": [],
            "window_start": at, "window_end": at, "amount_at_risk": 0, "evidence": {}, "detected_at": at}


def test_credit_view_matches_the_formula(be: Backend) -> None:
    t = ts(2026, 3, 1)
    penalties = [("H11010500001", "WARNING", 0), ("H11010500001", "FINE", 25_000_000),
                 ("H44030500002", "TERMINATE_AGREEMENT", 0), ("H44030500002", "SUSPEND_AGREEMENT", 0),
                 ("H44030500002", "FINE", 50_000_000_00), ("H51010700003", "FINE", 999_999)]
    insert(be, "penalties", [{"pnsh_id": uuid.uuid4().hex, "fixmedins_code": h, "admdvs": h[1:7], "pnsh_type": k,
                              "fine_amt": f, "pnsh_time": t} for h, k, f in penalties])
    retracted = alert("H11010500001", "MEDIUM", aid="gone")
    datums = [alert("H11010500001", "HIGH"), retracted,
              {**alert("H11010500001", "MEDIUM", "RETRACTED", aid="gone", at=NOW + 1),
               "event_id": str(uuid.uuid4())},
              *[alert("H31011500009", "CRITICAL") for _ in range(35)], alert("H31011500010", "LOW"),
              alert("", "HIGH")]
    write_alerts(be, datums)
    hits = [("H11010500001", "HIGH"), *[("H31011500009", "CRITICAL")] * 35, ("H31011500010", "LOW")]
    want = credit(penalties, hits)
    res = be.query(f"SELECT fixmedins_code, score, rule_hits, grade, penalties, fines, admdvs "
                   f"FROM {be.database}.bi_institution_credit ORDER BY fixmedins_code").rows
    got = {str(r[0]): (int(r[1]), int(r[2]), str(r[3])) for r in res}
    assert got == want
    assert want["H44030500002"] == (150, 0, "D") and want["H31011500009"] == (700, 35, "C")
    assert want["H11010500001"] == (1000 - 70 - 25 - 5, 1, "A")
    h1 = next(r for r in res if r[0] == "H11010500001")
    assert int(h1[4]) == 2 and Decimal(h1[5]) == Decimal("250000") and h1[6] == "110105"


def test_credit_region_is_the_institutions_not_whatever_row_is_read_first(be: Backend) -> None:
    """Alerts about people carry the person's insured region; the institution's region is in its
    code (and, for a code of another shape, the smallest of its rows'), whatever the row order."""
    h = "H11010500001"
    write_alerts(be, [{**alert(h, "HIGH"), "admdvs": region} for region in ("440305", "310115", "110105")])
    write_alerts(be, [{**alert("X-1", "LOW"), "admdvs": region} for region in ("510107", "330106")])
    res = dict(be.query(f"SELECT fixmedins_code, admdvs FROM {be.database}.bi_institution_credit").rows)
    assert res == {h: "110105", "X-1": "330106"}


CREDIT = next(r for r in RULES if r.id == "YB-SUP-CREDIT-LOW")


def credit_fired(run: Any) -> dict[str, str]:
    return {d["fixmedins_code"]: d["status"] for d in run.emitted if d["rule_id"] == CREDIT.id}


def test_credit_low_fires_at_its_threshold_ignores_its_own_alerts_and_retracts(be: Backend) -> None:
    t = ts(2026, 3, 1)
    terminated, at_600, at_599 = "H11010500001", "H44030500002", "H51010700003"
    penalties = [(terminated, "TERMINATE_AGREEMENT", 0), (at_600, "SUSPEND_AGREEMENT", 0),
                 (at_600, "SUSPEND_AGREEMENT", 0), (at_599, "SUSPEND_AGREEMENT", 0), (at_599, "SUSPEND_AGREEMENT", 0)]
    insert(be, "penalties", [{"pnsh_id": uuid.uuid4().hex, "fixmedins_code": h, "admdvs": h[1:7], "pnsh_type": k,
                              "fine_amt": f, "pnsh_time": t} for h, k, f in penalties])
    hit = alert(at_599, "LOW", aid="the-one-hit")
    write_alerts(be, [hit])
    run = run_monitors(be, [CREDIT], now_ms=NOW, as_of=202603)
    assert credit_fired(run) == {terminated: "FIRED", at_599: "FIRED"}
    low = next(d for d in run.emitted if d["fixmedins_code"] == at_599)
    assert low["evidence"]["score"] == "599" and low["evidence"]["grade"] == "D"
    assert low["subsystem"] == "supervision" and low["admdvs"] == "510107" and low["severity"] == "HIGH"
    assert (low["window_start"], low["window_end"]) == month_bounds(202602)  # the last closed month
    # its own alerts are not rule hits: the scores stay where they were, a rerun emits nothing
    scores = dict(be.query(f"SELECT fixmedins_code, score FROM {be.database}.bi_institution_credit").rows)
    assert {str(k): int(v) for k, v in scores.items()} == {terminated: 500, at_600: 600, at_599: 599}
    assert run_monitors(be, [CREDIT], now_ms=NOW + 1000, as_of=202603).emitted == []
    # the one rule hit is retracted: 600 is grade C again, the alert is retracted
    write_alerts(be, [{**hit, "event_id": str(uuid.uuid4()), "status": "RETRACTED", "detected_at": NOW + 2000}])
    run = run_monitors(be, [CREDIT], now_ms=NOW + 3000, as_of=202603)
    assert credit_fired(run) == {at_599: "RETRACTED"}
    # the threshold is a parameter
    lenient = Rule.from_dict({**CREDIT.to_dict(), "params": {"max_score": 600}})
    assert credit_fired(evaluate(be, [lenient], now_ms=NOW + 4000, as_of=202603)) == {at_600: "FIRED", at_599: "FIRED"}

