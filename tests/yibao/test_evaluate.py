"""Ground truth for the rule base: planted anomalies, and precision and recall against them.

The main runs (clean and planted) share one traffic shape: 22,500 settlements over 94 days from
29 June, 12 hospitals in 6 regions. Why this shape: DRG upcoding is a hospital-month rule that
needs at least 30 stays a month in two baseline months, so traffic must span four calendar months
and be concentrated on few hospitals; starting on 29 June leaves June too short to be a baseline,
so only September (the planted month) can be judged. Rates are per rule so that every rule gets
enough planted cases (tp ≥ 5) without flooding any detector. Each run takes ~15-25 s here.

Note on DRG upcoding: a 30-50-stay month's CC/MCC share varies by about 0.08 by chance alone, so
the detector's spread is at least the binomial standard error of the month; on clean traffic of
this shape it raises nothing, and with planting every alert rests on shares of 0.8 and more.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner

from schemas import Codec
from streams.base import record_checks
from streams.rules import RULES_FILE, load_rules_file
from streams.validation import compile_checks
from yibao.settings import load_settings
from yibao.sim.evaluate import (
    InProcessRun,
    compare,
    latest_alerts,
    read_alerts,
    run_events,
    run_in_process,
    write_alerts,
)
from yibao.sim.generator import REVERSAL, SETTLEMENT, SimConfig, TrafficGenerator
from yibao.sim.planters import PLANTERS, REVERSAL_MONEY, PlantError, Planting, copy_settlement, rebalance

CHINA = ZoneInfo("Asia/Shanghai")
RULE_IDS = [r.id for r in load_rules_file(RULES_FILE)]
SHAPE: dict[str, Any] = {"settlements": 22_500, "days": 94, "hospitals": 12, "regions": 6, "seed": 42,
                         "start": datetime(2026, 6, 29, tzinfo=CHINA),
                         # late payments are YB-PROC-PAY-OVERDUE violations: clean means none
                         "late_payment_rate": 0.0}
RATE = 0.01
RATES = {
    "YB-LINE-LEVEL": 0.005, "YB-LINE-SETTING": 0.005, "YB-LINE-PRICE": 0.004, "YB-VISIT-DUP": 0.05,
    "YB-PSN-RETEST": 0.1, "YB-PSN-OVERRX": 0.03, "YB-PSN-SHOP-1D": 0.005, "YB-STAY-SPLIT": 0.05,
    "YB-STAY-BEDHANG": 0.05, "YB-STAY-LOWADM": 0.005, "YB-HOSP-UPCODE": 1.0, "YB-HOSP-HIGHCOST": 0.03,
    "YB-PSN-GHOST": 0.005,
    # procurement rules: per SALE_OUT movement, contract and payment
    "YB-PSI-OVERSELL": 0.0005, "YB-PSI-TRACE-DUP": 0.0005, "YB-PROC-VOLUME-LAG": 0.4, "YB-PROC-PAY-OVERDUE": 0.01,
    # ClickHouse monitors: share of pool × insutype subjects (capacity: 6 of 12), of the free
    # subject × month cells (negative: 6 of 12), per institution × drug × closed month (settled)
    "YB-FUND-CAPACITY": 0.5, "YB-FUND-NEGATIVE": 0.5, "YB-PSI-SETTLED-OVER-SOLD": 0.006,
    # supervision: per clean inspection (an institution at most once)
    "YB-SUP-CREDIT-LOW": 0.3,
}


def shared_chdb(factory: pytest.TempPathFactory) -> Path:
    """The suite's chDB data dir (one per process), as ``Settings.chdb_path`` of the data dir
    ``<basetemp>/chdb-shared``: the commands run in process here must open that same one."""
    return factory.getbasetemp() / "chdb-shared" / "chdb"


@pytest.fixture(scope="module")
def monitor_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A chDB database per run for the monitors (the suite's shared chDB data dir: one per process)."""
    pytest.importorskip("chdb")
    from sinks import ClickHouseConfig, connect
    from yibao.sim.evaluate import prepare_monitor_database

    made: list[Any] = []

    def make() -> Any:
        be = connect(ClickHouseConfig(chdb_path=shared_chdb(tmp_path_factory),
                                      database=f"yb_evalrun_{uuid.uuid4().hex[:10]}"))
        prepare_monitor_database(be)
        made.append(be)
        return be

    yield make
    for be in made:
        try:
            be.execute(f"DROP DATABASE IF EXISTS {be.database} SYNC")
        finally:
            be.close()


@pytest.fixture(scope="module")
def clean_run(monitor_db: Any) -> InProcessRun:
    return run_in_process(SimConfig(**SHAPE), None, backend=monitor_db())


@pytest.fixture(scope="module")
def planted(monitor_db: Any) -> tuple[InProcessRun, Planting]:
    planting = Planting("all", rate=RATE, rates=RATES)
    return run_in_process(SimConfig(**SHAPE), planting, backend=monitor_db()), planting


def fired(run: InProcessRun) -> list[dict[str, Any]]:
    return [a for a in latest_alerts(run.alerts) if a["status"] == "FIRED"]


# --- (a) clean traffic --------------------------------------------------------------------------

def test_clean_traffic_raises_no_alert_of_any_rule(clean_run: InProcessRun) -> None:
    assert clean_run.settlements > 20_000
    assert sum(clean_run.dead_letters.values()) == 0
    counts = Counter(a["rule_id"] for a in fired(clean_run))
    assert counts == Counter()


def test_clean_traffic_raises_no_upcoding_alert(clean_run: InProcessRun) -> None:
    """Ordinary month-to-month variation of a hospital's CC/MCC share (binomial noise) is not upcoding."""
    assert [a["fixmedins_code"] for a in fired(clean_run) if a["rule_id"] == "YB-HOSP-UPCODE"] == []


# --- (b) every rule planted ---------------------------------------------------------------------

def test_every_rule_is_planted(planted: tuple[InProcessRun, Planting]) -> None:
    assert set(PLANTERS) == set(RULE_IDS)
    run, _ = planted
    counts = Counter(t["rule_id"] for t in run.truth if not t["reversed"])
    assert {rid for rid in RULE_IDS if counts[rid] < 5} == set(), counts


def test_precision_and_recall_per_rule(planted: tuple[InProcessRun, Planting]) -> None:
    run, _ = planted
    result = compare(run.alerts, run.truth, RULE_IDS, by_month=["YB-HOSP-UPCODE"])
    weak = {}
    for rid in RULE_IDS:
        r = result["rules"][rid]
        if r["tp"] < 5 or r["precision"] is None or r["precision"] < 0.95 or r["recall"] < 0.95:
            weak[rid] = r
    assert weak == {}, json.dumps(weak, indent=1)
    assert set(result["rules"]) == set(RULE_IDS)  # no alert of a rule outside the rule base


def test_upcoding_truth_names_hospital_and_month(planted: tuple[InProcessRun, Planting]) -> None:
    run, _ = planted
    up = [t for t in run.truth if t["rule_id"] == "YB-HOSP-UPCODE"]
    assert up and all(t["month"] == 202609 and t["fixmedins_code"].startswith("H") for t in up)
    assert all(len(t["setl_ids"]) >= 20 for t in up)  # most stays of the month, not a few
    assert all(t["month"] is None for t in run.truth if t["rule_id"] != "YB-HOSP-UPCODE")
    # found because of what was planted: the shares alerted on are far above noise (see the xfail above)
    shares = [float(a["evidence"]["cc_mcc_share"]) for a in fired(run) if a["rule_id"] == "YB-HOSP-UPCODE"]
    assert len(shares) == len(up) and min(shares) >= 0.7, shares


# --- (d) planted settlements are valid ----------------------------------------------------------

def test_every_planted_settlement_passes_validation(planted: tuple[InProcessRun, Planting]) -> None:
    run, planting = planted
    assert sum(run.dead_letters.values()) == 0  # the in-process run validated every event
    spec = next(r for r in _settlement_subsystem().records if r.record == SETTLEMENT)
    validate = compile_checks(record_checks(spec, Codec().record_schema(spec.record)), spec.short_name)
    codec = Codec()
    assert {str(e.datum["event_id"]) for e in run.planted_events} == planting.planted_ids
    for ev in run.planted_events:
        assert validate(ev.datum) is None, (ev.datum["setl_id"], validate(ev.datum))
        assert codec.decode(codec.encode(SETTLEMENT, ev.datum)).datum == ev.datum
        d = ev.datum
        assert d["fund_pay_sumamt"] + d["acct_pay"] + d["psn_cash_pay"] == d["medfee_sumamt"]
        assert sum(d[k] for k in ("hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay")) == d["fund_pay_sumamt"]
        assert sum(ln["det_item_fee_sumamt"] for ln in d["fee_details"]) == d["medfee_sumamt"]
        assert 0 <= d["inscp_amt"] <= d["medfee_sumamt"]


def _settlement_subsystem() -> Any:
    from streams import settlement
    from streams.validation import Limits

    s = load_settings()
    limits = Limits.from_settings(s.max_future_skew_s, s.min_event_year)
    return settlement.build(s.validation(), lambda: limits)


def test_rebalance_restores_every_money_identity() -> None:
    spec = next(r for r in _settlement_subsystem().records if r.record == SETTLEMENT)
    validate = compile_checks(record_checks(spec, Codec().record_schema(spec.record)), spec.short_name)
    gen = TrafficGenerator(SimConfig(settlements=400, days=2))
    base = [e.datum for e in gen.events() if e.record == SETTLEMENT and e.datum["fund_pay_sumamt"] > 0
            and e.datum["acct_pay"] > 0 and len(e.datum["fee_details"]) > 2]
    assert base
    d0 = base[0]
    # a line added, a price raised, most lines dropped: totals follow, parts stay consistent
    for change in ("add", "price", "drop"):
        d = copy_settlement(d0)
        lines = d["fee_details"]
        if change == "add":
            lines.append({**lines[0], "feedetl_sn": "0999", "cnt": 30_000,
                          "det_item_fee_sumamt": (30_000 * lines[0]["pric"] + 50_000_000) // 100_000_000})
        elif change == "price":
            lines[0]["pric"] *= 3
            lines[0]["det_item_fee_sumamt"] = (lines[0]["cnt"] * lines[0]["pric"] + 50_000_000) // 100_000_000
        else:
            del lines[1:]
        out = rebalance(d)
        assert out is d
        assert validate(d) is None, (change, validate(d))
        assert d["medfee_sumamt"] == sum(ln["det_item_fee_sumamt"] for ln in lines)
        assert d["fund_pay_sumamt"] + d["acct_pay"] + d["psn_cash_pay"] == d["medfee_sumamt"]
        assert d["hifp_pay"] + d["hifmi_pay"] + d["hifob_pay"] + d["maf_pay"] == d["fund_pay_sumamt"]
        assert d["inscp_amt"] <= d["medfee_sumamt"] and d["preselfpay_amt"] <= d["inscp_amt"]
        assert min(d[k] for k in ("inscp_amt", "hifp_pay", "acct_pay", "psn_cash_pay")) >= 0
    # the original, which the generator still holds, is untouched
    assert d0 == base[0] and len(d0["fee_details"]) > 2


# --- (c) determinism, and the base traffic untouched --------------------------------------------

def test_planting_is_deterministic_and_leaves_the_base_traffic_alone() -> None:
    config = SimConfig(settlements=3_000, days=20, seed=7)
    runs = []
    for _ in range(2):
        p = Planting("all", rate=0.05)
        events = list(p.generator(config).events())
        runs.append((events, p.truth(), set(p.dispensed_ids) | p.funded_ids))
    assert runs[0][1] == runs[1][1] and len(runs[0][1]) > 100
    assert [e.datum for e in runs[0][0]] == [e.datum for e in runs[1][0]]

    clean = list(TrafficGenerator(config).events())
    events, truth, dispensed = runs[0]
    clean_ids = [str(e.datum["event_id"]) for e in clean]
    # what planting added: the anomalies' events, the movements its visits dispense with and the
    # contributions their fund spending is booked with
    assert dispensed and not dispensed & {i for t in truth for i in t["event_ids"]}
    extra = ({i for t in truth for i in t["event_ids"]} | dispensed) - set(clean_ids)
    # overdue payments are delayed (emitted later) or never made
    moved = {i for t in truth if t["rule_id"] == "YB-PROC-PAY-OVERDUE" for i in t["event_ids"]}
    assert extra  # (a 20-day span is too short for an overdue payment: moved is empty here)
    kept = [e for e in events if str(e.datum["event_id"]) not in extra | moved]
    clean = [e for e in clean if str(e.datum["event_id"]) not in moved]
    assert [str(e.datum["event_id"]) for e in kept] == [str(e.datum["event_id"]) for e in clean]  # same order
    involved = {i for t in truth for i in t["event_ids"]}
    planted_setl = {s for t in truth for s in t["setl_ids"]}
    changed = [(a, b) for a, b in zip(kept, clean, strict=True) if a.datum != b.datum]
    assert changed
    for a, b in changed:  # only planted settlements differ, and full reversals of modified ones
        if a.record == SETTLEMENT or a.record != REVERSAL:
            assert str(a.datum["event_id"]) in involved
        else:
            assert a.datum["init_setl_id"] in planted_setl and a.datum["full_reversal"]
            assert {k for k in a.datum if a.datum[k] != b.datum[k]} <= set(REVERSAL_MONEY)
    # a second generator run on the same planting starts over and plants the same again
    p = Planting("all", rate=0.05)
    gen = p.generator(config)
    list(gen.events())
    first = p.truth()
    list(gen.events())
    assert p.truth() == first


def test_planted_settlements_dispense_what_they_bill_and_keep_the_stock_books() -> None:
    """Drugs a planted visit bills beyond its original are sold out of the institution's books
    (bought in first), so they are not also a settlement beyond sales, and the running balance
    the oversell rule keeps never drops below its stock-take tolerance outside a planted phantom."""
    config = SimConfig(settlements=4_000, days=30, seed=3)
    planting = Planting([r for r in RULE_IDS if r != "YB-PSI-SETTLED-OVER-SOLD"], rate=0.03)
    events = list(planting.generator(config).events())
    planted_setl = {s for t in planting.truth() for s in t["setl_ids"]}
    phantoms = {i for t in planting.truth() if t["rule_id"] == "YB-PSI-OVERSELL" for i in t["event_ids"]}
    tol_pm = int(next(r for r in load_rules_file(RULES_FILE) if r.id == "YB-PSI-OVERSELL").param("tolerance_pm"))
    stocked: set[tuple[str, str]] = set()
    settled: Counter[tuple[str, str, int]] = Counter()
    sold: Counter[tuple[str, str, int]] = Counter()
    books: dict[tuple[str, str], list[int]] = {}  # balance, counted + net purchased
    episode: set[tuple[str, str]] = set()  # a planted phantom sale, until the next stock-take
    dispensed = 0
    for e in events:
        d = e.datum
        if e.record == SETTLEMENT:
            for ln in d["fee_details"]:
                settled[(d["fixmedins_code"], ln["med_list_codg"], d["setl_time"] // 86_400_000 // 31)] += ln["cnt"]
            continue
        if "mov_type" not in d:
            continue
        key = (d["fixmedins_code"], d["med_list_codg"])
        stocked.add(key)
        kind, cnt = d["mov_type"], d["cnt"]
        if kind == "STOCKTAKE":
            books[key] = [cnt, cnt]
            episode.discard(key)
        elif kind in ("PURCHASE_IN", "PURCHASE_RETURN"):
            books[key][0] += cnt if kind == "PURCHASE_IN" else -cnt
            books[key][1] += cnt if kind == "PURCHASE_IN" else -cnt
        elif kind in ("SALE_OUT", "SALE_RETURN"):
            books[key][0] += -cnt if kind == "SALE_OUT" else cnt
        if kind == "SALE_OUT":
            sold[(*key, d["mov_time"] // 86_400_000 // 31)] += cnt
            dispensed += d["setl_id"] in planted_setl and d["mov_id"] >= "MV8"
            if str(d["event_id"]) in phantoms:
                episode.add(key)
            elif key not in episode:
                assert books[key][0] * 1000 >= -tol_pm * books[key][1], (key, books[key], d["mov_id"])
    assert dispensed >= 20
    over = {k: (n, sold[k]) for k, n in settled.items() if k[:2] in stocked and n > sold[k]}
    assert over == {}


def test_planting_arguments_are_checked() -> None:
    with pytest.raises(PlantError, match="unknown rule id"):
        Planting("YB-NOPE")
    with pytest.raises(PlantError, match="rate"):
        Planting("all", rate=1.5)
    assert Planting("none").planters == []
    assert [p.rule_id for p in Planting("YB-LINE-SEX,YB-PSN-GHOST").planters] == ["YB-LINE-SEX", "YB-PSN-GHOST"]


# --- matching ------------------------------------------------------------------------------------

def _alert(aid: str, rule: str, setl: list[str], status: str = "FIRED", at: int = 1000, **kw: Any) -> dict[str, Any]:
    return {"alert_id": aid, "rule_id": rule, "setl_ids": setl, "status": status, "detected_at": at,
            "fixmedins_code": kw.pop("h", "H11010500001"), **kw}


def test_compare_counts_latest_status_and_ignores_reversed_anomalies() -> None:
    truth: list[dict[str, Any]] = [
        {"rule_id": "R", "setl_ids": ["A", "B"]},
        {"rule_id": "R", "setl_ids": ["C"]},
        {"rule_id": "R", "setl_ids": ["D"], "reversed": True},
        {"rule_id": "U", "setl_ids": ["x"], "fixmedins_code": "H1", "month": 202609},
    ]
    alerts = [
        _alert("1", "R", ["B", "Z"]),  # matches the first
        _alert("2", "R", ["A"]),  # another alert for the first: still a match
        _alert("3", "R", ["C"]), _alert("3", "R", ["C"], status="RETRACTED", at=2000),  # retracted: none
        _alert("4", "R", ["D"]),  # rests on a reversed anomaly: ignored
        _alert("5", "R", ["Q"]),  # matches nothing: false positive
        _alert("6", "S", ["A"]),  # another rule's alert does not match R's anomaly
        _alert("7", "U", [], h="H1", window_start=int(datetime(2026, 9, 1, tzinfo=CHINA).timestamp() * 1000)),
        _alert("8", "U", [], h="H1", evidence={"month": "202608"}),  # other month
    ]
    res = compare(alerts, truth, ["R", "S", "U", "V"], by_month=["U"])
    assert res["rules"]["R"] == {"precision": 0.6667, "recall": 0.5, "tp": 1, "fp": 1, "fn": 1, "alerts": 3,
                                 "planted": 2, "ignored": 1}
    assert res["rules"]["S"]["fp"] == 1 and res["rules"]["S"]["recall"] is None
    assert res["rules"]["U"] == {"precision": 0.5, "recall": 1.0, "tp": 1, "fp": 1, "fn": 0, "alerts": 2,
                                 "planted": 1, "ignored": 0}
    assert res["rules"]["V"]["precision"] is None and res["rules"]["V"]["alerts"] == 0
    assert (res["alerts"], res["retracted"], res["planted"], res["reversed"]) == (7, 1, 3, 1)
    # a retraction in the same second as the alert still wins (ClickHouse keeps seconds)
    same = [_alert("9", "R", ["C"], at=5), _alert("9", "R", ["C"], status="RETRACTED", at=5)]
    assert latest_alerts(same)[0]["status"] == "RETRACTED"


@pytest.fixture(params=["embedded", pytest.param("server", marks=pytest.mark.integration)])
def alerts_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A migrated, empty database on chDB or on the session's ClickHouse server (18.16 here)."""
    from sinks import ClickHouseConfig, connect
    from sinks.migrate import migrate

    database = f"yb_eval_{uuid.uuid4().hex[:10]}"
    if request.param == "server":
        ch = request.getfixturevalue("clickhouse_server")
        be = connect(ClickHouseConfig(backend="server", host=ch.host, port=ch.tcp_port, user=ch.user,
                                      password=ch.password, database=database))
    else:
        pytest.importorskip("chdb")
        # chDB allows one data path per process: share the suite's, with a database of our own
        be = connect(ClickHouseConfig(chdb_path=shared_chdb(tmp_path_factory), database=database))
    try:
        migrate(be)
        be.use_database()
        yield be
        be.execute(f"DROP DATABASE IF EXISTS {database}" + (" SYNC" if request.param == "embedded" else ""))
    finally:
        be.close()


def test_alerts_from_the_clickhouse_table(alerts_backend: Any) -> None:
    from streams.messages import alert_plan
    from streams.privacy import Pseudonymizer
    from yibao.sim.evaluate import alerts_from_backend

    t0 = int(datetime(2026, 9, 3, 10, tzinfo=CHINA).timestamp() * 1000)
    base = {"event_id": "00000000-0000-4000-8000-000000000001", "alert_id": "a1", "status": "FIRED",
            "rule_id": "YB-LINE-SEX", "rule_version": 1, "result_type": "DEFINITE", "severity": "HIGH",
            "subsystem": "settlement", "fixmedins_code": "H11010500001", "psn_token": "t", "admdvs": "110105",
            "setl_ids": ["S1"], "mdtrt_ids": ["M1"], "window_start": t0, "window_end": t0, "amount_at_risk": 100,
            "evidence": {"x": "y"}, "detected_at": t0}
    rows = [
        base,
        {**base, "event_id": "00000000-0000-4000-8000-000000000002", "status": "RETRACTED", "detected_at": t0 + 1},
        {**base, "event_id": "00000000-0000-4000-8000-000000000003", "alert_id": "a2", "setl_ids": ["S2"]},
        {**base, "event_id": "00000000-0000-4000-8000-000000000004", "alert_id": "a3", "rule_id": "YB-HOSP-UPCODE",
         "setl_ids": [], "window_start": int(datetime(2026, 9, 1, tzinfo=CHINA).timestamp() * 1000)},
    ]
    alerts_backend.insert("alerts", alert_plan(Codec()).build(rows, [0] * 4, [0, 1, 2, 3],
                                                              Pseudonymizer(b"k" * 32, "k1")))
    got = sorted(alerts_from_backend(alerts_backend), key=lambda a: a["alert_id"])
    assert [(a["alert_id"], a["status"], a["setl_ids"], a["month"]) for a in got] == [
        ("a1", "RETRACTED", ["S1"], 202609), ("a2", "FIRED", ["S2"], 202609), ("a3", "FIRED", [], 202609)]
    truth: list[dict[str, Any]] = [
        {"rule_id": "YB-LINE-SEX", "setl_ids": ["S1"]}, {"rule_id": "YB-LINE-SEX", "setl_ids": ["S2"]},
        {"rule_id": "YB-HOSP-UPCODE", "setl_ids": ["x"], "fixmedins_code": "H11010500001", "month": 202609}]
    res = compare(got, truth, by_month=["YB-HOSP-UPCODE"])["rules"]
    assert (res["YB-LINE-SEX"]["tp"], res["YB-LINE-SEX"]["fn"], res["YB-HOSP-UPCODE"]["tp"]) == (1, 1, 1)


# --- the commands --------------------------------------------------------------------------------

def test_simulate_plant_then_evaluate_commands(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from yibao.cli import app
    from yibao.replay import LineError, read_jsonl

    events, truth, alerts = tmp_path / "ev.jsonl", tmp_path / "truth.jsonl", tmp_path / "alerts.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["simulate", "-n", "2000", "--days", "5", "--plant", "all", "--plant-rate", "0.03",
                              "--out", str(events), "--truth", str(truth)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in truth.read_text().splitlines()]
    assert len(rows) > 30 and {"rule_id", "setl_ids", "fixmedins_code", "month", "event_ids"} <= rows[0].keys()
    errors: list[LineError] = []
    run = run_events(read_jsonl(events, Codec(), errors))
    assert errors == [] and sum(run.dead_letters.values()) == 0
    written = {json.loads(x)["event_id"] for x in events.read_text().splitlines()}
    assert {i for r in rows for i in r["event_ids"]} <= written
    write_alerts(run.alerts, alerts)
    assert len(read_alerts(alerts)) == len(run.alerts)

    res = runner.invoke(app, ["evaluate", "--truth", str(truth), "--alerts", str(alerts), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out == compare(run.alerts, rows, RULE_IDS, by_month=["YB-HOSP-UPCODE"])
    assert set(out["rules"]) == set(RULE_IDS) and out["planted"] > 30
    for rid, r in out["rules"].items():
        assert r["fp"] == 0 and r["fn"] == 0, (rid, r)
    res = runner.invoke(app, ["evaluate", "--truth", str(truth), "--events", str(events)],
                        env={"YIBAO_DATA_DIR": str(shared_chdb(tmp_path_factory).parent)})
    assert res.exit_code == 0, res.output
    assert "YB-PSN-GHOST" in res.output and "precision" in res.output

    bad = runner.invoke(app, ["simulate", "-n", "100", "--plant", "YB-NOPE", "--truth", str(truth)])
    assert bad.exit_code == 2 and "unknown rule id" in bad.output
    bad = runner.invoke(app, ["simulate", "-n", "100", "--plant", "all", "--out", str(events)])
    assert bad.exit_code == 2 and "--truth" in bad.output


def test_evaluate_command_runs_the_monitors_on_replayed_events(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`yibao evaluate --events` lands the replayed traffic in a throw-away chDB database and runs
    the monitor rules too; `--no-monitors` leaves them out (their planted anomalies are missed)."""
    pytest.importorskip("chdb")
    from yibao.cli import app

    events, truth = tmp_path / "ev.jsonl", tmp_path / "truth.jsonl"
    runner = CliRunner()
    monitored = "YB-FUND-CAPACITY,YB-PSI-SETTLED-OVER-SOLD,YB-SUP-CREDIT-LOW"
    res = runner.invoke(app, ["simulate", "-n", "3000", "--days", "60", "--plant", monitored, "--plant-rate", "0.4",
                              "--out", str(events), "--truth", str(truth)])
    assert res.exit_code == 0, res.output
    planted = Counter(json.loads(x)["rule_id"] for x in truth.read_text().splitlines())
    assert set(planted) == set(monitored.split(",")), planted
    env = {"YIBAO_DATA_DIR": str(shared_chdb(tmp_path_factory).parent)}
    res = runner.invoke(app, ["evaluate", "--truth", str(truth), "--events", str(events), "--json"], env=env)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])["rules"]
    for rid in monitored.split(","):
        assert (out[rid]["tp"], out[rid]["fp"], out[rid]["fn"]) == (planted[rid], 0, 0), (rid, out[rid])
    res = runner.invoke(app, ["evaluate", "--truth", str(truth), "--events", str(events), "--json",
                              "--no-monitors"], env=env)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])["rules"]
    assert all(out[rid]["tp"] == 0 and out[rid]["fn"] == planted[rid] for rid in monitored.split(","))


def test_run_events_reports_progress_up_to_every_event_consumed() -> None:
    """`yibao evaluate --events` shows how far it is: the count rises to every event consumed."""
    from yibao.sim.evaluate import PROGRESS_EVERY

    seen: list[int] = []
    events = list(TrafficGenerator(SimConfig(settlements=600, days=2, seed=9)).events())
    run = run_events(events, progress=seen.append)
    assert run.events == len(events) > PROGRESS_EVERY
    assert seen == sorted(seen) and seen[-1] == len(events)
    assert seen[:-1] == [PROGRESS_EVERY * i for i in range(1, len(events) // PROGRESS_EVERY + 1)]
