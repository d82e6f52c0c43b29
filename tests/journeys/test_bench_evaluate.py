"""Journeys of `yibao bench` and `yibao evaluate`: figures that are true, and progress while they run.

`yibao bench --events 10000` used to print 0.0 settlements/s and a ratio of 11890400000000.00,
and both commands were silent for up to a minute. Here the figures must agree with each other
(rates with their windows, rows with settlements), the per-rule scores with the truth file, and
stderr must show the phases while stdout carries only the JSON.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from .conftest import User, assert_clear_error, ok

#: The smallest honest bench: every worker gets a backlog of its own (see yibao/bench.py).
BENCH_EVENTS = 5000


def _truth(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _lines(path: Path) -> int:
    return sum(1 for x in path.read_text(encoding="utf-8").splitlines() if x.strip())


def _assert_scores_match_truth(out: dict[str, Any], truth: list[dict[str, Any]]) -> None:
    """Per rule: planted = the truth's live anomalies of that rule, tp + fn = planted, and the
    ratios are the counts' ratios (None where there is nothing to divide by)."""
    live = [t for t in truth if not t.get("reversed")]
    assert out["planted"] == len(live) and out["reversed"] == len(truth) - len(live)
    for rid in {t["rule_id"] for t in truth}:
        assert rid in out["rules"], rid
    for rid, r in out["rules"].items():
        planted = sum(1 for t in live if t["rule_id"] == rid)
        assert r["planted"] == planted and r["tp"] + r["fn"] == planted, (rid, r)
        assert r["recall"] == (round(r["tp"] / planted, 4) if planted else None), (rid, r)
        if r["alerts"]:
            assert 0.0 <= r["precision"] <= 1.0 and r["fp"] <= r["alerts"], (rid, r)
        else:
            assert r["precision"] is None and r["fp"] == 0, (rid, r)
    assert sum(r["tp"] for r in out["rules"].values()) > 0, "no planted anomaly was found at all"


# --- bench -----------------------------------------------------------------------------------------

def test_bench_json_figures_are_positive_consistent_and_progress_is_shown(user: User) -> None:
    before = set(Path(tempfile.gettempdir()).glob("yibao-bench-*"))
    res = ok(user.run(f"yibao bench --events {BENCH_EVENTS} --processes 2 --latency-seconds 5 --json", timeout=600))
    f = res.json()  # stdout is the JSON and nothing else
    assert f["settlements"] == BENCH_EVENTS and f["not_measured"] == {}, f
    ingest, rules = f["settlements_per_s"], f["settlements_per_s_all_rules"]
    assert ingest > 0 and rules > 0, f
    # each rate is the run's settlements over its timed window
    assert ingest == pytest.approx(BENCH_EVENTS / f["landing_s"], rel=0.01), f
    assert rules == pytest.approx(BENCH_EVENTS / f["landing_s_all_rules"], rel=0.01), f
    assert f["rows_per_settlement"] == pytest.approx(1 + f["fee_lines_per_settlement"], abs=0.01)
    assert f["rows_per_s"] == pytest.approx(ingest * f["rows_per_settlement"], rel=0.01), f
    assert f["rows_per_s_all_rules"] == pytest.approx(rules * f["rows_per_settlement"], rel=0.01), f
    assert f["rules_to_ingest_ratio"] == pytest.approx(rules / ingest, rel=0.01), f
    assert 0.1 <= f["rules_to_ingest_ratio"] <= 10, f
    assert 0 < f["landing_s"] < f["wall_including_startup_s"], f
    assert f["produce_per_s"] > 0 and f["cpus"] >= 1 and f["worker_processes"] == 2, f
    stage = {k: v for k, v in f["stage_us_per_settlement"].items() if k.endswith("_us")}
    assert stage and all(v > 0 for v in stage.values()), stage
    assert all(v > 0 for v in f["identity_and_event_time_us_per_settlement"].values()), f
    for phase in ("generating settlements", "in-process stage costs", "ingest only: producing",
                  "ingest only: workers joining the group", "ingest only: landing", "all rules on: landing"):
        assert phase in res.err, f"no {phase!r} progress on stderr\n{res}"
    assert f"{BENCH_EVENTS}/{BENCH_EVENTS}" in res.err, res
    # start-up and memory, per worker: the first record fetched by any worker comes before the pass's
    # wall time; a worker given partitions only later (a rebalance after the other landed the events but
    # before it committed them) fetches its first record after it, and one given none fetches none
    for p in ("ingest", "rules"):
        one = f["by_processes"]["2"][p]
        assert len(one["first_fetch_s"]) == 2 and len(one["worker_rss_mb"]) == 2, one
        fetched = [x for x in one["first_fetch_s"] if x is not None]
        assert fetched and all(x > 0 for x in fetched), one
        assert min(fetched) < one["wall_including_startup_s"], one
        assert all(x is not None and x > 20 for x in one["worker_rss_mb"]), one
        assert 0 <= one["columnar_share"] <= 1, one
    # the traffic fires alerts, and only with the rules on
    assert f["by_processes"]["2"]["rules"]["alerts"] > 0 and f["by_processes"]["2"]["ingest"]["alerts"] == 0, f
    # alert latency at half the all-rules rate, with the default batch settings
    lat = f["alert_latency"]
    assert lat["rate_target"] == round(rules / 2) and lat["settlements_sent"] > 0, lat
    assert (lat["batch_max_events"], lat["batch_max_seconds"]) == (5000, 1.0), lat
    assert 0 < lat["alerts_measured"] <= lat["alerts_fired_total"], lat
    q = lat["latency_ms"]
    assert 0 < q["p50"] <= q["p90"] <= q["p99"] <= q["max"], q
    assert "alert latency (ms)" in res.err and "on the alerts topic" in res.err, res
    assert "events through the columnar path" in res.err, res
    assert set(Path(tempfile.gettempdir()).glob("yibao-bench-*")) == before, "a temp folder was left"


def test_bench_precheck_reports_latency_percentiles_under_ingest(user: User) -> None:
    """`yibao bench --precheck` (issue 15), kept short: the figures are consistent, not fast."""
    before = set(Path(tempfile.gettempdir()).glob("yibao-bench-precheck-*"))
    res = ok(user.run("yibao bench --precheck --seconds 5 --check-rate 40 --ingest-rate 200 --processes 1 --json",
                      timeout=600))
    f = res.json()
    assert f["checks_sent"] == 200 and f["checks_answered"] == 200 == f["checks_by_outcome"]["200"], f
    lat = f["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"], lat
    assert f["settlements_produced_per_s"] > 100 and f["settlements_landed_per_s"] > 100, f
    assert f["checks_with_hits"] >= 0 and f["worker_processes"] == 1 and f["history_settlements"] > 0, f
    for phase in ("starting Tansu and ClickHouse", "landing the persons' history", "measuring"):
        assert phase in res.err, f"no {phase!r} progress on stderr\n{res}"
    # with --json the table goes to stderr, the JSON alone to stdout
    assert "p99.9" in res.err and "checks answered / sent" in res.err and "200 / 200" in res.err, res
    assert set(Path(tempfile.gettempdir()).glob("yibao-bench-precheck-*")) == before, "a temp folder was left"


def test_bench_population_reports_memory_changelog_and_restore_per_person(user: User) -> None:
    """`yibao bench --population` (issue 16), small, both stores: in memory the whole population is
    restored by a fresh process; on disk a restart on its own disk reads nothing back, and a new
    disk reads every record the changelog got."""
    before = set(Path(tempfile.gettempdir()).glob("yibao-bench-population-*"))
    res = ok(user.run("yibao bench --population 2000 --json", timeout=600))
    memory, disk = sorted(res.json()["populations"], key=lambda r: r["store"] != "memory")
    assert memory["store"] == "memory" and disk["store"] == "disk", res.out
    for run in (memory, disk):
        assert run["persons"] == 2000 and run["settlements"] == 2 * run["persons"], run
        assert 100 < run["changelog_bytes_per_person"] < 10_000, run
        assert run["memory_bytes_per_person"] > 0, run
    # every person and the partition's watermark
    assert memory["keys"] == memory["changelog_records"] == 2001, memory
    assert memory["restore_rss_mb"] > memory["restore_rss_before_mb"], memory
    assert disk["keys"] == disk["changelog_records"] >= 2001 and disk["resume_records"] == 0, disk
    assert disk["disk_mb"] > 0, disk
    for needle in ("memory per person (bytes)", "restoring the whole changelog in a fresh process (s)",
                   "restarting on its own disk (s)", "2,000 persons, disk"):
        assert needle in res.err, res
    assert set(Path(tempfile.gettempdir()).glob("yibao-bench-population-*")) == before, "a temp folder was left"


@pytest.mark.parametrize("line, needles", [
    ("yibao bench --precheck --seconds 1", ("--seconds",)),
    ("yibao bench --events 10", ("--events 10", "at least")),
    ("yibao bench --events 5000 --processes 0", ("--processes 0",)),
    ("yibao bench --events 5000 --processes 1,two", ("--processes 1,two",)),
    ("yibao bench --events 5000 --latency-seconds 2", ("--latency-seconds 2",)),
    ("yibao bench --population 10", ("--population 10", "at least")),
    ("yibao bench --population lots", ("--population lots",)),
    ("yibao bench --population 2000 --state-store ssd", ("--state-store ssd",)),
])
def test_bench_refuses_what_it_cannot_measure(user: User, line: str, needles: tuple[str, ...]) -> None:
    assert_clear_error(user.run(line), *needles)


# --- evaluate ----------------------------------------------------------------------------------------

def test_evaluate_planted_events_file_prints_per_rule_scores_and_progress(user: User) -> None:
    ok(user.run("yibao simulate --events 2000 --plant all --truth T.jsonl --out E.jsonl", timeout=300))
    res = ok(user.run("yibao evaluate --truth T.jsonl --events E.jsonl --json", timeout=300))
    out = res.json()
    _assert_scores_match_truth(out, _truth(user.cwd / "T.jsonl"))
    assert out["duplicates_recognised"] == 0, "nothing was re-sent"
    n = _lines(user.cwd / "E.jsonl")
    assert "running the rules in process" in res.err and f"{n}/{n}" in res.err, res
    assert "monitor rules" in res.err, res


def test_evaluate_recognises_every_resend_simulate_added(user: User) -> None:
    sim = ok(user.run("yibao simulate --events 2000 --plant all --truth T.jsonl --out E.jsonl --resend-rate 0.02",
                      timeout=300))
    m = re.search(r"delivery: ([\d,]+) re-sends added", sim.out)
    assert m, sim
    resent = int(m.group(1).replace(",", ""))
    assert resent > 0, sim
    out = ok(user.run("yibao evaluate --truth T.jsonl --events E.jsonl --json --no-monitors", timeout=300)).json()
    assert out["duplicates_recognised"] == resent, out


def test_evaluate_table_goes_to_stdout_and_progress_to_stderr(user: User) -> None:
    ok(user.run("yibao simulate --events 1000 --plant all --truth T.jsonl --out E.jsonl", timeout=300))
    res = ok(user.run("yibao evaluate --truth T.jsonl --events E.jsonl --no-monitors", timeout=300))
    assert "precision" in res.out and "recall" in res.out and "re-sent events recognised" in res.out, res
    assert "running the rules in process" in res.err and "running the rules" not in res.out, res


def test_evaluate_alerts_of_a_landed_run(landed: User) -> None:
    """Without --events, evaluate reads the alerts table of the configured database (both engines)."""
    assert landed.truth is not None
    res = ok(landed.run(f"yibao evaluate --truth {landed.truth} --json", timeout=300))
    out = res.json()
    _assert_scores_match_truth(out, _truth(landed.truth))
    assert "duplicates_recognised" not in out, "no events were run in process"
    assert f"reading alerts from the {landed.engine} database" in res.err, res


def test_evaluate_missing_truth_file(user: User) -> None:
    assert_clear_error(user.run("yibao evaluate --truth missing.jsonl"), "missing.jsonl", "no such file")


def test_evaluate_bad_inputs_say_what_is_wrong(user: User) -> None:
    ok(user.run("yibao simulate --events 1000 --plant all --truth T.jsonl --out E.jsonl", timeout=300))
    lines = (user.cwd / "E.jsonl").read_text(encoding="utf-8").splitlines()
    (user.cwd / "broken.jsonl").write_text("\n".join([lines[0], '{"event_type": "Nope"}', *lines[1:50]]) + "\n")
    (user.cwd / "alerts.jsonl").write_text("")
    (user.cwd / "adir").mkdir()
    assert_clear_error(user.run("yibao evaluate --truth T.jsonl --events broken.jsonl"),
                       "broken.jsonl:2", "event_type")
    assert_clear_error(user.run("yibao evaluate --truth E.jsonl --events E.jsonl"), "E.jsonl", "rule_id")
    assert_clear_error(user.run("yibao evaluate --truth T.jsonl --alerts alerts.jsonl --events E.jsonl"),
                       "exclude")
    assert_clear_error(user.run("yibao evaluate --truth adir"), "adir", "directory")
    assert_clear_error(user.run("yibao evaluate --truth T.jsonl --events nowhere.jsonl"), "nowhere.jsonl")


def test_evaluate_without_a_database_says_so(engine_user: User) -> None:
    """A new user's empty data dir (embedded) or a database never created (server)."""
    ok(engine_user.run("yibao simulate --events 1000 --plant all --truth T.jsonl --out E.jsonl", timeout=300))
    res = engine_user.run("yibao evaluate --truth T.jsonl")
    assert_clear_error(res, "does not exist")
