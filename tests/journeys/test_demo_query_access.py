"""The demo, migrations, ad-hoc queries and ClickHouse users, as their users run them.

A newcomer runs `yibao demo` twice (the second time `--serve`, trying the pre-settlement check with
the curl line it prints) and evaluates the rules against the truth it wrote; someone
whose data dir holds their own database is refused; an operator migrates twice; an analyst
queries in each output format; an administrator installs the BI users and hands one of them the
clickhouse-client line that `yibao access` printed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yibao.localinfra import ClickHouseServer, MissingBinaryError

from ..conftest import require_infra
from .conftest import Result, User, assert_clear_error, ok

TRUTH = "demo-truth.jsonl"


# --- demo -----------------------------------------------------------------------------------------
def test_demo_writes_its_truth_and_a_second_demo_replaces_its_own_database(user: User) -> None:
    first = ok(user.run("yibao demo --events 2000", timeout=600))
    assert "every event accounted for: yes" in first.out, first
    truth = user.data_dir / TRUTH
    said = re.search(r"ground truth: ([\d,]+) planted anomalies in (\S+)", first.out)
    assert said, first
    assert Path(said.group(2)) == truth and truth.is_file(), first
    lines = [ln for ln in truth.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert len(lines) == int(said.group(1).replace(",", "")) > 0
    assert f"yibao evaluate --truth {truth}" in first.out, first

    evaluated = ok(user.run(f"yibao evaluate --truth {truth} --json", timeout=300)).json()
    assert evaluated["planted"] + evaluated["reversed"] == len(lines)
    assert sum(r["tp"] for r in evaluated["rules"].values()) > 0, evaluated

    # the second demo keeps serving (--serve): its pre-settlement check answers the curl line it prints,
    # run as the README says, by curl itself (issue 15); its registry is up until Ctrl-C, then gone
    log = user.home / "demo-serve.log"
    proc = user.start("yibao demo --events 600 --json --serve", log)
    try:
        summary = _summary_line(log, proc, timeout=600)
        said = log.read_text(encoding="utf-8")
        assert "replacing the previous demo's database yibao" in said, said[-3000:]
        assert summary["accounted"] is True and summary["truth_file"] == str(truth)
        url = summary["schema_registry_url"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), summary
        assert f"Schema Registry API at {url}" in said
        with urllib.request.urlopen(f"{url}/subjects", timeout=5) as r:  # up while it serves
            assert r.status == 200
        pc = summary["precheck"]
        assert pc is not None and pc["serving"] is True, summary
        assert f"ask the pre-settlement check what a settlement would raise: {pc['curl']}" in said
        curl = subprocess.run(["bash", "-c", pc["curl"]], capture_output=True, text=True, timeout=60,
                              cwd=user.cwd, env=user.env)
        assert curl.returncode == 0, curl
        answer = json.loads(curl.stdout)
        retest = [h for h in answer["hits"] if h["rule_id"] == "YB-PSN-RETEST"]
        assert retest and retest[0]["lines"] and "minimum interval 15 days" in retest[0]["message_en"], answer
        assert "最短间隔" in retest[0]["message_zh"] and answer["rules_checked"], answer
        # without the key: refused, in one JSON line
        bare = subprocess.run(["curl", "-s", "-H", "Content-Type: application/json", "--data",
                               f"@{pc['example']}", pc["url"]], capture_output=True, text=True, timeout=60)
        assert json.loads(bare.stdout)["code"] == "UNAUTHENTICATED", bare
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    assert code == 0, log.read_text(encoding="utf-8")[-3000:]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/subjects", timeout=5)
    # the evaluation the demo printed is what `yibao evaluate` finds in its database with its truth
    again = ok(user.run(f"yibao evaluate --truth {truth} --no-monitors --json", timeout=300)).json()
    assert again["rules"] == summary["evaluation"]["rules"]
    # replaced, not added to: the database holds the second run only
    n = ok(user.run('yibao query "SELECT count() AS n FROM settlements" --format json')).json_lines()
    assert n == [{"n": summary["rows"]["settlements"]}]


def _summary_line(log: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The `--json` summary a demo printed to ``log``, once it has (the demo goes on serving)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith('{"events_produced"'):
                return dict(json.loads(line))
        if proc.poll() is not None:
            raise AssertionError(f"the demo exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no summary within {timeout:.0f}s:\n{log.read_text(errors='replace')[-3000:]}")


def test_demo_refuses_a_database_it_did_not_make(user: User) -> None:
    ok(user.run("yibao migrate"))
    ok(user.run("yibao query \"INSERT INTO settlements (event_id, setl_id, setl_time) VALUES ('e1', 'S1', now())\""))

    res = user.run("yibao demo --events 300", timeout=300)
    assert_clear_error(res, "not made by `yibao demo`", str(user.data_dir), "1 row")
    assert "--data-dir" in res.err and "--replace" in res.err, res
    kept = ok(user.run('yibao query "SELECT setl_id FROM settlements" --format csv'))
    assert list(csv.reader(io.StringIO(kept.out))) == [["setl_id"], ["S1"]]

    replaced = ok(user.run("yibao demo --events 300 --replace --invalid-rate 0.05 --json", timeout=600))
    assert "replacing database yibao, which no demo made (--replace)" in replaced.err, replaced
    summary = replaced.json_lines()[-1]
    settlements = summary["rows"]["settlements"]
    # every event accounted for: landed in its primary table, dead-lettered (with its reason), or a re-send
    assert summary["accounted"] is True and summary["events_produced"] > 300, summary
    landed = sum(n for t, n in summary["rows"].items() if t not in ("fee_details", "dead_letters"))
    assert summary["duplicates_recognised"] == 0  # the demo's producer sends each event once
    assert landed + summary["dead_letters"] == summary["events_produced"], summary
    assert summary["dead_letters"] > 0 and sum(summary["dead_letters_by_reason"].values()) == summary["dead_letters"]
    assert summary["rows"]["fee_details"] > settlements
    rows = ok(user.run('yibao query "SELECT countIf(setl_id = \'S1\') AS mine, count() AS n FROM settlements" '
                       "--format json")).json_lines()
    assert rows == [{"mine": 0, "n": settlements}]


# --- migrate --------------------------------------------------------------------------------------
def test_migrate_lists_its_steps_then_says_up_to_date(engine_user: User) -> None:
    first = ok(engine_user.run("yibao migrate", timeout=300))
    steps = [ln.strip() for ln in first.out.splitlines() if ln.startswith("  ")]
    assert steps[0].startswith("created database"), first
    assert "applied 0001_raw_tables.sql" in first.out and "built staging settlements_in" in first.out, first
    assert re.search(rf"migrated the {engine_user.engine} database \S+ at .*: {len(steps)} step\(s\)", first.out), first

    second = ok(engine_user.run("yibao migrate", timeout=300))
    assert "up to date" in second.out, second
    assert "step(s)" not in second.out and "applied" not in second.out.replace("migrations applied", ""), second


# --- query ----------------------------------------------------------------------------------------
BY_INSUTYPE = ("SELECT insutype, count() AS settlements, sum(hifp_pay) AS hifp_pay FROM settlements "
               "GROUP BY insutype ORDER BY insutype")
#: Values that break naive csv/tsv writers: a comma, a quote, a newline, a tab, a backslash, a NULL.
AWKWARD = "SELECT 'a,\"b\\nc' AS text, 'x\\ty\\\\z' AS tabbed, NULL AS nothing, 7 AS n"


def _rows(res: Result, fmt: str) -> list[list[str]]:
    if fmt == "csv":
        return list(csv.reader(io.StringIO(res.out, newline="")))
    return [line.split("\t") for line in res.out.splitlines()]


def test_query_prints_csv_tsv_json_and_table_alike(landed: User) -> None:
    sql = shlex.quote(BY_INSUTYPE)
    js = ok(landed.run(f"yibao query {sql} --format json")).json_lines()
    assert {r["insutype"] for r in js} == {"310", "390"}, js
    total = ok(landed.run('yibao query "SELECT count() AS n FROM settlements" --format json')).json_lines()
    assert sum(r["settlements"] for r in js) == total[0]["n"]
    expected = [["insutype", "settlements", "hifp_pay"], *[[r["insutype"], str(r["settlements"]), str(r["hifp_pay"])]
                                                            for r in js]]
    for fmt in ("csv", "tsv"):
        res = ok(landed.run(f"yibao query {sql} --format {fmt}"))
        assert _rows(res, fmt) == expected, res
    table = ok(landed.run(f"yibao query {sql}"))
    for r in js:
        assert re.search(rf"{r['insutype']}\s.*{r['settlements']}\s.*{re.escape(str(r['hifp_pay']))}", table.out), table
    assert f"{len(js)} row(s)" in table.out


def test_query_quotes_and_escapes_awkward_values(landed: User) -> None:
    sql = shlex.quote(AWKWARD)
    got = ok(landed.run(f"yibao query {sql} --format csv"))
    assert _rows(got, "csv") == [["text", "tabbed", "nothing", "n"], ['a,"b\nc', "x\ty\\z", "", "7"]], got
    got = ok(landed.run(f"yibao query {sql} --format tsv"))
    assert got.out.splitlines() == ["text\ttabbed\tnothing\tn", 'a,"b\\nc\tx\\ty\\\\z\t\\N\t7'], got
    assert ok(landed.run(f"yibao query {sql} --format json")).json_lines() == [
        {"text": 'a,"b\nc', "tabbed": "x\ty\\z", "nothing": None, "n": 7}]


def test_query_mistakes_are_one_clear_line(landed: User) -> None:
    assert_clear_error(landed.run('yibao query "SELEC 1"'), "query failed", "syntax error")
    res = landed.run('yibao query "SELECT count() FROM no_such_table"')
    assert_clear_error(res, "query failed", "no_such_table")
    assert "SHOW TABLES" in res.err, res
    assert_clear_error(landed.run('yibao query "SELECT 1" --format xml'), "--format xml", "csv", "tsv", "json")


# --- access ---------------------------------------------------------------------------------------
PASSWORDS = {"yibao_ingest": "ingest-Pw-4r2", "bi": "bi-Pw-9k1", "bi_zhejiang": "zj-Pw-6t3"}
SETTLEMENT_ROWS, ZHEJIANG_EVERY = 30, 3


@pytest.fixture(scope="module")
def access_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    """A ClickHouse server of the journey's own: `yibao access apply --users-d` writes into its users.d/
    (the session server's users are shared by every test)."""
    if shutil.which("clickhouse-client") is None:
        require_infra("clickhouse-client is not installed")
    try:
        ch = ClickHouseServer(workdir=tmp_path_factory.mktemp("ch-access-journey"))
    except MissingBinaryError as exc:
        require_infra(str(exc))
    ch.start()
    yield ch
    ch.stop()


def _sha(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def _until_ok(u: User, cmd: str, timeout: float = 30) -> Result:
    """Run ``cmd`` until it succeeds: the server reloads users.d/ within seconds, not at once."""
    deadline = time.monotonic() + timeout
    while True:
        res = u.run(cmd, stdin="")
        if res.code == 0 or time.monotonic() > deadline:
            return res
        time.sleep(0.5)


def _client_line(out: str, user: str) -> str:
    """The clickhouse-client command `yibao access` printed for ``user``."""
    found = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("clickhouse-client ")
             and f" -u {user} " in ln]
    assert len(found) == 1, out
    return found[0]


def test_access_says_where_each_user_reads_and_that_is_how_they_connect(user: User,
                                                                         access_server: ClickHouseServer) -> None:
    ch = access_server
    admin = user.with_env(YIBAO_CH_BACKEND="server", YIBAO_CH_HOST=ch.host, YIBAO_CH_PORT=str(ch.tcp_port))
    ok(admin.run("yibao migrate", timeout=300))
    ok(admin.run(f"clickhouse-client --host {ch.host} --port {ch.tcp_port} -q "
                 "\"INSERT INTO yibao.settlements (event_id, setl_id, insu_admdvs, mdtrt_admdvs, setl_time, "
                 "medfee_sumamt, src_partition, src_offset) SELECT toString(number), concat('S', toString(number)), "
                 f"if(number % {ZHEJIANG_EVERY} = 0, '330106', '110105'), '330106', now(), 100, 0, number "
                 f"FROM system.numbers LIMIT {SETTLEMENT_ROWS}\"", stdin=""))

    example = ok(admin.run("yibao access example")).out
    roles = (example.replace('password_file = "/run/secrets/clickhouse-ingest"',
                             f'password_sha256_hex = "{_sha(PASSWORDS["yibao_ingest"])}"')
             .replace("<sha256 of the password>", _sha(PASSWORDS["bi"]))
             .replace('password_file = "/run/secrets/clickhouse-bi-zhejiang"',
                      f'password_sha256_hex = "{_sha(PASSWORDS["bi_zhejiang"])}"'))
    (admin.cwd / "roles.toml").write_text(roles, encoding="utf-8")

    rendered = ok(admin.run("yibao access render --roles roles.toml"))
    assert "CREATE DATABASE IF NOT EXISTS yibao_bi" in rendered.out and "<allow_databases>" in rendered.out
    assert "clickhouse-client" not in rendered.out, "stdout is what to install; the advice goes to stderr"
    assert "bi (reader) reads yibao_bi" in rendered.err and "-u bi -d yibao_bi" in rendered.err, rendered

    users_d = ch.workdir / "users.d"
    applied = ok(admin.run(f"yibao access apply --roles roles.toml --users-d {users_d}", timeout=300))
    assert (users_d / "yibao-access.xml").is_file()
    for line in ("yibao_ingest (writer) writes and reads yibao; also reads yibao_bi, yibao_r33",
                 "bi (reader) reads yibao_bi", "bi_zhejiang (regional reader, region 33) reads yibao_r33"):
        assert line in applied.out, applied

    counted: dict[str, Any] = {}
    for name in ("bi", "bi_zhejiang", "yibao_ingest"):
        cmd = _client_line(applied.out, name).replace("PASSWORD", PASSWORDS[name])
        res = _until_ok(admin, f'{cmd} -q "SELECT count() FROM settlements"')
        assert res.code == 0, res
        counted[name] = int(res.out.strip())
    assert counted == {"bi": SETTLEMENT_ROWS, "yibao_ingest": SETTLEMENT_ROWS,
                       "bi_zhejiang": len(range(0, SETTLEMENT_ROWS, ZHEJIANG_EVERY))}
    # what the user typed: a reader is not let into the pipeline's own database
    denied = admin.run(f"clickhouse-client --host {ch.host} --port {ch.tcp_port} -u bi --password {PASSWORDS['bi']} "
                       "-q \"SELECT count() FROM yibao.settlements\"", stdin="")
    assert denied.code != 0 and "Access denied to database yibao" in denied.out + denied.err, denied
