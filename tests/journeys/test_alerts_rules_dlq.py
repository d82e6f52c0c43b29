"""Watching what the rules find: `yibao alerts` (table, JSON, follow), `yibao rules list|push`, `yibao dlq
list|show`, and `yibao replay` of a file with bad lines, as the people who use them type them."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, User, assert_clear_error, ok, produced, running_worker

SEED_RULES = ROOT / "streams" / "rules" / "data" / "rules.toml"
SEED_IDS = sorted(r["id"] for r in tomllib.loads(SEED_RULES.read_text(encoding="utf-8"))["rule"])
SEVERITIES = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]


def _rule_block(rule_id: str) -> str:
    """One ``[[rule]]`` table of the seed rules file, as an operator would copy it to change it."""
    text = SEED_RULES.read_text(encoding="utf-8")
    start = text.index(f'id = "{rule_id}"')
    end = text.find("[[rule]]", start)
    return text[text.rindex("[[rule]]", 0, start): end if end >= 0 else len(text)]


# --- alerts from ClickHouse, both engines -----------------------------------------------------------
def test_alerts_show_the_landed_alerts_filtered_by_rule_and_severity(landed: User) -> None:
    truth_rules = Counter(json.loads(x)["rule_id"] for x in landed.truth.read_text().splitlines() if x.strip()) \
        if landed.truth else Counter()
    every = ok(landed.run("yibao alerts --json --limit 100000")).json_lines()
    assert every, "the landed run has no standing alert"
    assert all(a["status"] == "FIRED" for a in every)
    assert len({a["alert_id"] for a in every}) == len(every), "an alert is listed twice"
    assert [a["detected_at"] for a in every] == sorted((a["detected_at"] for a in every), reverse=True)
    found = Counter(a["rule_id"] for a in every)
    planted_and_found = [r for r, _ in truth_rules.most_common() if r in found]
    assert planted_and_found, f"no planted rule among the alerts: {found}"

    rule = planted_and_found[0]
    only = ok(landed.run(f"yibao alerts --rule {rule} --json --limit 100000")).json_lines()
    assert [a["alert_id"] for a in only] == [a["alert_id"] for a in every if a["rule_id"] == rule]

    high = ok(landed.run("yibao alerts --severity high --json --limit 100000")).json_lines()
    assert [a["alert_id"] for a in high] == [a["alert_id"] for a in every
                                             if SEVERITIES.index(a["severity"]) >= SEVERITIES.index("HIGH")]
    both = ok(landed.run(f"yibao alerts --rule {rule} --severity MEDIUM --json --limit 100000")).json_lines()
    assert [a["alert_id"] for a in both] == [a["alert_id"] for a in only
                                             if SEVERITIES.index(a["severity"]) >= SEVERITIES.index("MEDIUM")]

    table = ok(landed.run("yibao alerts --limit 5"))
    lines = [ln for ln in table.out.splitlines() if ln.strip()]
    assert len(lines) == min(5, len(every))
    for line, a in zip(lines, every, strict=False):
        assert a["rule_id"] in line and f"v{a['rule_version']}" in line, line
    assert "alert" in table.err

    assert_clear_error(landed.run("yibao alerts --severity urgent"), "--severity", "urgent")


def test_alerts_of_a_new_user_without_a_database_is_one_clear_line(engine_user: User) -> None:
    assert_clear_error(engine_user.run("yibao alerts"), "alerts table")


# --- following the alerts topic ----------------------------------------------------------------------
@pytest.fixture
def publish_alert(online_user: User) -> Callable[[dict[str, Any]], None]:
    """Publish alerts to the user's alerts topic the way the monitors do (``yibao monitors run``)."""
    from streams.monitors import kafka_publisher
    from yibao.settings import load_settings

    s = load_settings(kafka_bootstrap=online_user.env["YIBAO_KAFKA_BOOTSTRAP"],
                      topic_prefix=online_user.env["YIBAO_TOPIC_PREFIX"])
    publish = kafka_publisher(s)
    return lambda datum: publish([datum])


def _alert(n: int, rule_id: str, severity: str) -> dict[str, Any]:
    t = int(time.time() * 1000)
    return {"event_id": f"00000000-0000-4000-8000-{n:012d}", "alert_id": f"journey-{n}", "status": "FIRED",
            "rule_id": rule_id, "rule_version": 1, "result_type": "SUSPICIOUS", "severity": severity,
            "subsystem": "settlement", "fixmedins_code": None, "psn_token": None, "admdvs": "330199",
            "setl_ids": [], "mdtrt_ids": [], "window_start": t, "window_end": t, "amount_at_risk": 12_345,
            "evidence": {"months": "2.4"}, "detected_at": t}


class Following:
    """`yibao alerts --follow …` running in the background; its stdout read line by line as it comes."""

    def __init__(self, u: User, cmdline: str, err_log: Path) -> None:
        self.err_log = err_log
        with err_log.open("wb") as err:
            self.proc = subprocess.Popen(u.argv(cmdline), cwd=u.cwd, env=dict(u.env), stdout=subprocess.PIPE,
                                         stderr=err, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_following(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "following" not in self.err_log.read_text(errors="replace"):
            assert self.proc.poll() is None, f"it exited: {self.err_log.read_text()}"
            assert time.monotonic() < deadline, f"not following after {timeout:.0f}s: {self.err_log.read_text()}"
            time.sleep(0.1)

    def next_line(self, timeout: float = 30) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout:.0f}s; stderr: {self.err_log.read_text()}") from None

    def interrupt(self) -> int:
        """Ctrl-C, as the person following stops it."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)


@pytest.fixture
def following(online_user: User, tmp_path: Path) -> Iterator[Callable[[str], Following]]:
    started: list[Following] = []

    def start(cmdline: str) -> Following:
        f = Following(online_user, cmdline, tmp_path / f"follow{len(started)}.err")
        started.append(f)
        return f

    yield start
    for f in started:
        if f.proc.poll() is None:
            f.proc.kill()
            f.proc.wait(10)


def test_alerts_follow_json_prints_each_alert_as_it_arrives(
        online_user: User, publish_alert: Callable[[dict[str, Any]], None],
        following: Callable[[str], Following]) -> None:
    f = following("yibao alerts --follow --json --rule YB-FUND-CAPACITY --severity HIGH")
    f.wait_following()
    publish_alert(_alert(1, "YB-FUND-NEGATIVE", "HIGH"))  # another rule: not shown
    publish_alert(_alert(2, "YB-FUND-CAPACITY", "MEDIUM"))  # below the minimum severity: not shown
    wanted = _alert(3, "YB-FUND-CAPACITY", "HIGH")
    publish_alert(wanted)
    got = json.loads(f.next_line())  # while the command still runs: the line was flushed
    assert f.proc.poll() is None
    assert (got["alert_id"], got["rule_id"], got["severity"], got["status"]) == (
        "journey-3", "YB-FUND-CAPACITY", "HIGH", "FIRED")
    assert got["amount_at_risk"] == "123.45" and got["evidence"] == {"months": "2.4"}
    publish_alert(wanted)  # the topic is at-least-once: a copy is not shown twice
    publish_alert(_alert(4, "YB-FUND-CAPACITY", "CRITICAL"))
    assert json.loads(f.next_line())["alert_id"] == "journey-4"
    assert f.interrupt() == 0
    assert "Traceback" not in f.err_log.read_text()


def test_alerts_follow_table_shows_the_alert_line(online_user: User, publish_alert: Callable[[dict[str, Any]], None],
                                                   following: Callable[[str], Following]) -> None:
    f = following("yibao alerts --follow")
    f.wait_following()
    publish_alert(_alert(5, "YB-FUND-CAPACITY", "HIGH"))
    line = f.next_line()
    assert "YB-FUND-CAPACITY v1" in line and "HIGH" in line and "¥123.45" in line, line
    assert f.interrupt() == 0


def test_alerts_follow_without_a_broker_is_one_clear_line(user: User) -> None:
    res = user.run("yibao alerts --follow", timeout=30)
    assert_clear_error(res, "Kafka", "127.0.0.1:9092")
    assert res.seconds < 10, res


# --- the rule base -------------------------------------------------------------------------------------
def test_rules_list_seed_piped_shows_every_id_whole(user: User) -> None:
    res = ok(user.run("yibao rules list --seed"))
    for rule_id in SEED_IDS:
        assert f" {rule_id} " in res.out, f"{rule_id} cut or missing when piped\n{res}"
    assert "…" not in res.out, res
    rows = ok(user.run("yibao rules list --seed --json")).json_lines()
    assert [r["id"] for r in rows] == SEED_IDS
    assert {r["source"] for r in rows} == {"seed"}


def test_rules_list_without_a_broker_is_one_clear_line_pointing_at_seed(user: User) -> None:
    res = user.run("yibao rules list", timeout=30)
    assert_clear_error(res, "Kafka", "127.0.0.1:9092")
    assert "--seed" in res.err, res
    assert res.seconds < 10, res


def test_rules_push_without_a_broker_is_one_clear_line(user: User) -> None:
    changed = user.cwd / "shop.toml"
    changed.write_text(_rule_block("YB-PSN-SHOP-1D").replace("min_institutions = 3", "min_institutions = 4"))
    res = user.run(f"yibao rules push {changed}", timeout=30)
    assert_clear_error(res, "Kafka", "127.0.0.1:9092")
    assert res.seconds < 10, res


def test_rules_push_of_a_changed_parameter_publishes_the_next_version(online_user: User) -> None:
    u = online_user
    same, changed = u.cwd / "same.toml", u.cwd / "changed.toml"
    block = _rule_block("YB-PSN-SHOP-1D")
    assert "version = 1" in block and "min_institutions = 3" in block
    same.write_text(block)
    changed.write_text(block.replace("min_institutions = 3", "min_institutions = 4"))  # version still 1

    res = ok(u.run(f"yibao rules push {same}"))
    assert "YB-PSN-SHOP-1D: unchanged (v1)" in res.out and "pushed 0 rule(s)" in res.out, res
    res = ok(u.run(f"yibao rules push {changed}"))
    assert "YB-PSN-SHOP-1D: v1 → v2 (params changed)" in res.out and "pushed 1 rule(s)" in res.out, res

    rows = {r["id"]: r for r in ok(u.run("yibao rules list --json")).json_lines()}
    assert (rows["YB-PSN-SHOP-1D"]["version"], rows["YB-PSN-SHOP-1D"]["params"], rows["YB-PSN-SHOP-1D"]["source"]) \
        == (2, {"min_institutions": 4}, "pushed")
    assert sorted(rows) == SEED_IDS
    assert all(r["version"] == 1 and r["source"] == "seed" for k, r in rows.items() if k != "YB-PSN-SHOP-1D")
    table = ok(u.run("yibao rules list"))
    row = next(ln for ln in table.out.splitlines() if " YB-PSN-SHOP-1D " in ln)
    assert "│ 2 " in row and "pushed" in row and '{"min_institutions": 4}' in row, row

    res = ok(u.run(f"yibao rules push {changed}"))  # the same again: nothing new to publish
    assert "YB-PSN-SHOP-1D: unchanged (v2)" in res.out and "pushed 0 rule(s)" in res.out, res
    res = ok(u.run(f"yibao rules push {same}"))  # back to 3 institutions: a new version, not v1 again
    assert "YB-PSN-SHOP-1D: v2 → v3 (params changed)" in res.out, res


def test_alerts_carry_the_version_that_judged_them(operator: User) -> None:
    """A rule changed with `rules push` (version left at 1 in the file) judges as v2, and its alerts
    say v2 in `yibao alerts`."""
    u = operator
    events, truth = u.cwd / "events.jsonl", u.cwd / "truth.jsonl"
    ok(u.run(f"yibao simulate --events 300 --days 3 --plant YB-LINE-SEX --plant-rate 0.05 --truth {truth} "
             f"--out {events}", timeout=300))
    changed = u.cwd / "sex.toml"
    block = _rule_block("YB-LINE-SEX")
    changed.write_text(block.replace("severity = ", 'description = "pushed in a journey"\nseverity = ', 1))
    res = ok(u.run(f"yibao rules push {changed}"))
    assert "YB-LINE-SEX: v1 → v2 (description changed)" in res.out, res
    ok(u.run("yibao migrate", timeout=300))
    with running_worker(u, u.cwd / "worker.log") as w:
        deadline = time.monotonic() + 60
        while "rule updated" not in w.log.read_text(errors="replace"):  # read from the rules topic at start
            w.check()
            assert time.monotonic() < deadline, w.tail()
            time.sleep(0.2)
        w.wait_accounted(produced(ok(u.run(f"yibao replay {events}", timeout=300))))
    alerts = ok(u.run("yibao alerts --rule YB-LINE-SEX --json --limit 1000")).json_lines()
    assert alerts, "the planted sex-restricted items raised no alert"
    assert {a["rule_version"] for a in alerts} == {2}


# --- dead letters, both engines ------------------------------------------------------------------------
def test_dlq_list_gives_ids_that_dlq_show_takes(landed: User) -> None:
    listed = ok(landed.run("yibao dlq list --json --limit 1000")).json_lines()
    broken = [d for d in listed if d["field"] == "fixmedins_code" and "NOT-A-HOSPITAL" in d["reason_detail"]]
    assert len(broken) == landed.extra["broken"], listed
    assert [d["failed_at"] for d in listed] == sorted((d["failed_at"] for d in listed), reverse=True)
    for d in broken:
        shown = ok(landed.run(f"yibao dlq show {d['event_id']}")).json()
        assert (shown["event_id"], shown["reason_code"], shown["source"]) == (
            d["event_id"], d["reason_code"], d["source"])
        assert shown["event"]["fixmedins_code"] == "NOT-A-HOSPITAL"
        assert shown["event"]["psn_no"] == "***"  # personal fields masked without --reveal

    table = ok(landed.run("yibao dlq list"))
    for d in listed[:20]:
        assert d["event_id"] in table.out, f"{d['event_id']} cut or missing\n{table}"
        src = d["source"]
        assert f"{src['topic']}:{src['partition']}@{src['offset']}" in table.out
    assert "by reason" in table.out and f"{len(listed)} dead letter(s)" in table.out, table

    first = ok(landed.run("yibao dlq list --json --limit 2")).json_lines()
    assert first == listed[:2]
    reason = broken[0]["reason_code"]
    same_reason = ok(landed.run(f"yibao dlq list --json --reason {reason} --limit 1000")).json_lines()
    assert same_reason == [d for d in listed if d["reason_code"] == reason]
    assert ok(landed.run("yibao dlq list --json --reason NO_SUCH_REASON")).out == ""

    assert_clear_error(landed.run("yibao dlq show 00000000-0000-0000-0000-000000000000"), "no dead letter")
    assert_clear_error(landed.run("yibao dlq list --limit 0"), "--limit")


# --- replay of a file with bad lines -------------------------------------------------------------------
def test_replay_produces_the_good_lines_and_exits_1_naming_the_bad_ones(online_user: User) -> None:
    u = online_user
    full = u.cwd / "traffic.jsonl"
    ok(u.run(f"yibao simulate --events 5 --days 1 --out {full}"))
    good = full.read_text().splitlines()[:4]
    mixed = u.cwd / "mixed.jsonl"
    mixed.write_text("\n".join([good[0], '{"event_type": "Settlement", "setl_id": 5}', good[1], good[2],
                                "this is not json", good[3]]) + "\n")
    res = u.run(f"yibao replay {mixed}")
    assert res.code == 1, res
    assert "Traceback" not in res.out + res.err, res
    assert produced(res) == 4, res
    assert "2 invalid lines skipped" in res.out, res
    assert f"{mixed}:2: " in res.err and f"{mixed}:5: " in res.err, res
    assert f"{mixed}:1:" not in res.err and f"{mixed}:3:" not in res.err, res

    clean = u.cwd / "clean.jsonl"
    clean.write_text("\n".join(good) + "\n")
    res = ok(u.run(f"yibao replay {clean}"))
    assert produced(res) == 4 and "0 invalid lines skipped" in res.out, res
    help_text = ok(u.run("yibao replay --help")).out
    assert "Exit status" in help_text and "1 when any line was invalid" in " ".join(help_text.split()), help_text


def test_replay_without_a_broker_is_one_clear_line(user: User) -> None:
    events = user.cwd / "e.jsonl"
    ok(user.run(f"yibao simulate --events 5 --days 1 --out {events}"))
    res = user.run(f"yibao replay {events}", timeout=30)
    assert_clear_error(res, "Kafka", "127.0.0.1:9092")
    assert res.seconds < 10, res
