"""`yibao rules` and `yibao alerts` (yibao.cli.rules): rule versions that follow content, the latest
version of each alert read back from ClickHouse on both engines, and the commands' answers when no
broker is there."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas import Codec
from schemas.calendar import CHINA
from streams.rules import RULES_FILE, Rule, check_rule, load_rules_file
from yibao import cli
from yibao.cli.rules import latest_alerts, plan_push
from yibao.localinfra import free_port

from ..harness import migrated_database

runner = CliRunner()
SEED = load_rules_file(RULES_FILE, check_rule)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No YIBAO_* variable or .env of the developer's shell; the default broker is a port nobody
    listens on."""
    for k in list(os.environ):
        if k.startswith("YIBAO_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YIBAO_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")


def _seed(rule_id: str) -> Rule:
    return next(r for r in SEED if r.id == rule_id)


# --- versions follow content -----------------------------------------------------------------------
def test_a_changed_parameter_at_the_same_version_is_published_as_the_next_version() -> None:
    active = _seed("YB-PSN-SHOP-1D")
    changed = dataclasses.replace(active, params={**active.params, "min_institutions": 4})
    [step] = plan_push([active], [changed])
    assert step.publish
    assert step.rule.version == active.version + 1
    assert step.rule.params["min_institutions"] == 4
    assert step.changed == ("params",)
    assert step.describe() == f"YB-PSN-SHOP-1D: v{active.version} → v{active.version + 1} (params changed)"


def test_a_changed_rule_with_a_lower_version_still_goes_above_the_active_one() -> None:
    active = dataclasses.replace(_seed("YB-LINE-SEX"), version=5)
    older = dataclasses.replace(active, version=2, severity=active.severity.__class__("CRITICAL"), enabled=False)
    [step] = plan_push([active], [older])
    assert (step.publish, step.rule.version) == (True, 6)
    assert set(step.changed) == {"severity", "enabled"}


def test_a_version_the_file_raises_itself_is_kept() -> None:
    active = _seed("YB-LINE-SEX")
    ahead = dataclasses.replace(active, version=active.version + 3, description="tightened")
    [step] = plan_push([active], [ahead])
    assert (step.publish, step.rule.version, step.changed) == (True, active.version + 3, ("description",))


def test_an_identical_rule_is_not_published_again_whatever_its_version_says() -> None:
    active = dataclasses.replace(_seed("YB-DAY-FREQ"), version=2)
    for version in (1, 2, 3):
        [step] = plan_push([active], [dataclasses.replace(active, version=version)])
        assert not step.publish
        assert step.describe() == "YB-DAY-FREQ: unchanged (v2)"


def test_a_new_rule_is_published_as_written() -> None:
    new = dataclasses.replace(_seed("YB-DAY-FREQ"), id="YB-LOCAL-1", version=3)
    [step] = plan_push(SEED, [new])
    assert (step.publish, step.rule.version, step.active) == (True, 3, None)
    assert step.describe() == "YB-LOCAL-1: new, v3"


# --- the latest version of each alert, both engines ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Db:
    """A migrated, empty database, and the YIBAO_* variables that point a command at it."""

    be: Any
    env: dict[str, str]


@pytest.fixture(params=["embedded", pytest.param("server", marks=pytest.mark.integration)])
def alerts_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    """On chDB or on the session's ClickHouse server (18.16 here)."""
    with migrated_database(request.param, request, tmp_path_factory, "yb_alerts") as (be, env):
        yield Db(be, env)


T0 = int(datetime(2026, 9, 3, 10, tzinfo=CHINA).timestamp() * 1000)


def _alert(n: int, alert_id: str, *, status: str = "FIRED", rule: str = "YB-LINE-SEX", severity: str = "HIGH",
           version: int = 1, at: int = T0, amount: int = 1234) -> dict[str, Any]:
    return {"event_id": str(uuid.UUID(int=n)), "alert_id": alert_id, "status": status, "rule_id": rule,
            "rule_version": version, "result_type": "DEFINITE", "severity": severity, "subsystem": "settlement",
            "fixmedins_code": "H11010500001", "psn_token": None, "admdvs": "110105", "setl_ids": [f"S{alert_id}"],
            "mdtrt_ids": [], "window_start": T0, "window_end": T0 + 60_000, "amount_at_risk": amount,
            "evidence": {"n": str(n)}, "detected_at": at}


def _insert(be: Any, alerts: list[dict[str, Any]]) -> None:
    """Rows as the worker writes them, at stream positions 0, 1, 2… in list order."""
    from streams.messages import alert_plan
    from streams.privacy import Pseudonymizer

    n = len(alerts)
    be.insert("alerts", alert_plan(Codec()).build(alerts, [0] * n, list(range(n)), Pseudonymizer(b"k" * 32, "k1")))


def test_latest_alerts_keeps_the_latest_version_of_each(alerts_db: Db) -> None:
    """Latest by detected_at, then stream position (a retraction in the alert's own second comes later
    in the stream); retracted alerts only when asked; filters apply to the latest version."""
    second = T0 + 1000
    _insert(alerts_db.be, [
        _alert(1, "a", severity="HIGH"),
        _alert(2, "a", status="RETRACTED", at=T0 + 1, amount=0),  # same second as its alert, later offset
        _alert(3, "b", severity="LOW", at=second),
        _alert(4, "c", rule="YB-PSN-GHOST", severity="LOW", at=T0),
        _alert(5, "c", rule="YB-PSN-GHOST", severity="CRITICAL", version=2, at=second + 1000),  # re-judged by v2
    ])
    got = latest_alerts(alerts_db.be, limit=10, rules=set())
    assert [(a["alert_id"], a["status"], a["severity"], a["rule_version"]) for a in got] == [
        ("c", "FIRED", "CRITICAL", 2), ("b", "FIRED", "LOW", 1)]
    assert got[1] == {**_alert(3, "b", severity="LOW", at=second), "psn_token": None}  # the datum, whole

    with_retracted = latest_alerts(alerts_db.be, limit=10, rules=set(), retracted=True)
    assert [(a["alert_id"], a["status"]) for a in with_retracted] == [("c", "FIRED"), ("b", "FIRED"),
                                                                      ("a", "RETRACTED")]
    assert with_retracted[2]["amount_at_risk"] == 0

    assert [a["alert_id"] for a in latest_alerts(alerts_db.be, limit=10, rules={"YB-PSN-GHOST"})] == ["c"]
    assert [a["alert_id"] for a in latest_alerts(alerts_db.be, limit=10, rules={"YB-LINE-SEX"})] == ["b"]
    # minimum severity on the latest version: c was LOW at v1, CRITICAL at v2
    assert [a["alert_id"] for a in latest_alerts(alerts_db.be, limit=10, rules=set(), min_sev=2)] == ["c"]
    assert latest_alerts(alerts_db.be, limit=10, rules={"YB-LINE-SEX"}, min_sev=1) == []
    assert [a["alert_id"] for a in latest_alerts(alerts_db.be, limit=1, rules=set())] == ["c"]
    assert latest_alerts(alerts_db.be, limit=10, rules={"O'Brien"}) == []  # quoted, not injected


@pytest.mark.usefixtures("no_env")
def test_alerts_json_is_the_avro_json_of_each_alert(alerts_db: Db) -> None:
    """`yibao alerts --json`: one AnomalyAlert object per line, as `alerts --follow --json` prints them."""
    ghost = _alert(7, "x", rule="YB-PSN-GHOST")
    _insert(alerts_db.be, [ghost, _alert(8, "y", at=T0 + 5000)])
    res = runner.invoke(cli.app, ["alerts", "--json", "--rule", "YB-PSN-GHOST"], env=alerts_db.env)
    assert res.exit_code == 0, res.output
    assert [json.loads(x) for x in res.stdout.splitlines() if x.strip()] == [Codec().to_json("AnomalyAlert", ghost)]
    res = runner.invoke(cli.app, ["alerts"], env=alerts_db.env)
    assert res.exit_code == 0, res.output
    assert [ln.split()[2] for ln in res.stdout.splitlines()] == ["YB-LINE-SEX", "YB-PSN-GHOST"]
    assert "2 alert(s)" in res.stderr


@pytest.mark.usefixtures("no_env")
def test_alerts_of_a_database_without_the_table_is_one_clear_line(alerts_db: Db) -> None:
    res = runner.invoke(cli.app, ["alerts"], env={**alerts_db.env, "YIBAO_CH_DATABASE": "yb_none"})
    assert res.exit_code == 2
    assert res.stderr.startswith("error: no alerts table in database yb_none")


# --- without a broker ----------------------------------------------------------------------------
@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize("args", [["rules", "list"], ["alerts", "--follow"]])
def test_commands_that_need_the_broker_say_so_in_one_line_fast(args: list[str]) -> None:
    started = time.monotonic()
    res = runner.invoke(cli.app, args)
    assert time.monotonic() - started < 5
    assert res.exit_code == 2
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: no Kafka broker answers at 127.0.0.1:")
    assert len(lines) == 2 and lines[1].startswith("hint: ")


@pytest.mark.usefixtures("no_env")
def test_rules_list_without_a_broker_points_at_seed() -> None:
    res = runner.invoke(cli.app, ["rules", "list"])
    assert "--seed" in res.stderr


@pytest.mark.usefixtures("no_env")
def test_rules_push_checks_the_file_before_the_broker(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nid = "YB-X"\n', encoding="utf-8")
    res = runner.invoke(cli.app, ["rules", "push", str(bad)])
    assert res.exit_code == 2
    assert "bad.toml" in res.stderr and "Kafka" not in res.stderr
    good = tmp_path / "good.toml"
    good.write_text(RULES_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    res = runner.invoke(cli.app, ["rules", "push", str(good)])
    assert res.exit_code == 2
    assert "no Kafka broker answers" in res.stderr


@pytest.mark.usefixtures("no_env")
def test_rules_list_seed_needs_no_broker_and_shows_every_seed_rule() -> None:
    res = runner.invoke(cli.app, ["rules", "list", "--seed", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert [r["id"] for r in rows] == sorted(r.id for r in SEED)
    assert all(r["source"] == "seed" for r in rows)
    assert {r["id"]: r["params"] for r in rows} == {r.id: r.params for r in SEED}


@pytest.mark.usefixtures("no_env")
def test_rules_list_seed_reads_the_configured_rules_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = RULES_FILE.read_text(encoding="utf-8")
    start = text.index('id = "YB-PSN-SHOP-1D"')
    block = text[text.rindex("[[rule]]", 0, start): text.index("[[rule]]", start)]
    own = tmp_path / "own.toml"
    own.write_text(block.replace("min_institutions = 3", "min_institutions = 5"), encoding="utf-8")
    monkeypatch.setenv("YIBAO_RULES_FILE", str(own))
    res = runner.invoke(cli.app, ["rules", "list", "--seed", "--json"])
    assert res.exit_code == 0, res.output
    assert [(r["id"], r["params"]) for r in map(json.loads, res.stdout.splitlines())] == [
        ("YB-PSN-SHOP-1D", {"min_institutions": 5})]
