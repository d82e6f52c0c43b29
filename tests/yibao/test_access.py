"""Access control on the real ClickHouse 18.16 server, from a roles file through `yibao access`.

A regional reader gets no row of another region (and cannot reach the raw tables at all); a BI
reader reads the BI tables, their pseudonymous tokens and the ``bi_*`` views, but can neither insert
nor read the sealed dead-letter payloads or keys; the ingest writer inserts through the staging
tables and its rows reach every reader's view of the data. For modern servers the generated SQL
(roles, column grants, row policies) is checked by ClickHouse's own parser (chDB).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from clickhouse_driver.errors import Error as ClickHouseError

from sinks.migrate import migrate
from sinks.server import ServerBackend
from yibao.access import AccessError, Catalog, accounts, load_roles, render
from yibao.access import apply as apply_access
from yibao.localinfra import ClickHouseServer, MissingBinaryError

from ..conftest import require_infra
from ..harness import ROOT, run_cli

INGEST_PW, BI_PW, ZJ_PW, BJ_PW = "ingest-Pw-1x9", "bi-Pw-7q2", "zj-Pw-3k8", "bj-Pw-5m4"
DB = "acc"


def _sha(pw: str) -> str:
    return hashlib.sha256(pw.encode()).hexdigest()


def roles_file(tmp: Path) -> Path:
    pw = tmp / "ingest-password"
    pw.write_text(INGEST_PW + "\n", encoding="utf-8")
    path = tmp / "roles.toml"
    path.write_text(f"""
database = "{DB}"
[roles.ingest]
kind = "writer"
[roles.bi]
kind = "reader"
tables = ["*"]
views = ["bi_*"]
[roles.bi_regional]
kind = "reader"
tables = ["*"]
views = ["bi_*"]
regional = true

[users.yibao_ingest]
role = "ingest"
password_file = "{pw}"
networks = ["127.0.0.1"]
[users.bi]
role = "bi"
password_sha256_hex = "{_sha(BI_PW)}"
[users.bi_zhejiang]
role = "bi_regional"
region = "33"
password_sha256_hex = "{_sha(ZJ_PW)}"
[users.bi_beijing]
role = "bi_regional"
region = "1101"
password_sha256_hex = "{_sha(BJ_PW)}"
""", encoding="utf-8")
    return path


SETTLEMENT_REGIONS = ["330106", "330106", "330203", "110105", "110228", "440305"]


def insert_rows(backend: ServerBackend, start: int) -> None:
    n = len(SETTLEMENT_REGIONS)
    t = int(time.time()) - 86400
    backend.insert("settlements", {
        "event_id": [f"e{start + i}" for i in range(n)], "setl_id": [f"S{start + i}" for i in range(n)],
        "psn_token": [f"k1.tok{i}" for i in range(n)], "insu_admdvs": SETTLEMENT_REGIONS,
        "mdtrt_admdvs": SETTLEMENT_REGIONS, "setl_time": [t] * n, "medfee_sumamt": [10_000 + i for i in range(n)],
        "src_partition": [0] * n, "src_offset": [start + i for i in range(n)],
    })
    backend.insert("tips", {
        "event_id": [f"tip{start}", f"tip{start + 1}"], "tip_id": ["T1", "T2"], "admdvs": ["330106", "110105"],
        "rptr_token": ["k1.r1", "k1.r2"], "recv_time": [t, t], "src_partition": [0, 0],
        "src_offset": [start, start + 1],
    })
    backend.insert("dead_letters", {
        "event_id": [f"dl{start}"], "reason_code": ["BAD_MAGIC"], "source_topic": ["yibao.settlement"],
        "payload": [b"YBS1\x02k1SECRET-SEALED-PAYLOAD"], "source_key": [b"YBS1\x02k1SEALED-KEY"],
        "payload_digest": ["d" * 64], "failed_at": [t], "src_partition": [0], "src_offset": [start],
    })


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    try:
        ch = ClickHouseServer(workdir=tmp_path_factory.mktemp("ch-access"))
    except MissingBinaryError as exc:
        require_infra(str(exc))
    ch.start()
    yield ch
    ch.stop()


def _client(ch: ClickHouseServer, user: str, password: str) -> Client:
    return Client(ch.host, port=ch.tcp_port, user=user, password=password, connect_timeout=3)


def _denied(client: Client, sql: str, data: Any = None) -> str:
    with pytest.raises(ClickHouseError) as info:
        client.execute(sql, data) if data is not None else client.execute(sql)
    return str(info.value)


@pytest.mark.integration
def test_roles_on_clickhouse_18_16(server: ClickHouseServer, tmp_path: Path) -> None:
    admin = ServerBackend(host=server.host, port=server.tcp_port, database=DB)
    migrate(admin)
    insert_rows(admin, 0)
    admin.execute(f"CREATE VIEW {DB}.bi_settlement_totals AS SELECT insu_admdvs, count() AS n, "
                  f"sum(medfee_sumamt) AS amount FROM {DB}.settlements GROUP BY insu_admdvs")
    roles = load_roles(roles_file(tmp_path), DB)
    rendered = render(roles, Catalog.read(admin, DB), admin.version())
    assert not rendered.modern
    apply_access(admin, rendered, DB)
    again = apply_access(admin, rendered, DB)  # idempotent: no second backfill
    assert not any(line.startswith("backfilled") for line in again)
    assert not any(line.startswith(("copied view", "refreshed view")) for line in again)
    # a migration re-created a view: the marts' copies follow at the next apply, once
    admin.execute(f"DROP TABLE {DB}.bi_settlement_totals")
    admin.execute(f"CREATE VIEW {DB}.bi_settlement_totals AS SELECT insu_admdvs, count() AS n, "
                  f"sum(medfee_sumamt) AS amount, max(setl_time) AS latest FROM {DB}.settlements GROUP BY insu_admdvs")
    refreshed = [line for line in apply_access(admin, rendered, DB) if line.startswith("refreshed view")]
    assert refreshed and all("bi_settlement_totals" in line for line in refreshed), refreshed
    assert not any(line.startswith("refreshed view") for line in apply_access(admin, rendered, DB))
    document = rendered.users_document()
    for pw in (INGEST_PW, BI_PW, ZJ_PW, BJ_PW):
        assert pw not in document
    server.extra_users_xml, server.extra_profiles_xml = rendered.users_xml, rendered.profiles_xml
    server.restart()

    ingest = ServerBackend(host=server.host, port=server.tcp_port, database=DB, user="yibao_ingest",
                           password=INGEST_PW)
    insert_rows(ingest, 100)  # after the marts exist: rows must reach them through the views
    assert ingest.query(f"SELECT count() FROM {DB}.settlements WHERE src_partition = 0 AND src_offset >= 0"
                        ).scalar() == 2 * len(SETTLEMENT_REGIONS)
    ingest.close()

    zj = _client(server, "bi_zhejiang", ZJ_PW)
    zj_db = rendered.marts["bi_zhejiang"]
    regions = dict(zj.execute(f"SELECT insu_admdvs, count() FROM {zj_db}.settlements GROUP BY insu_admdvs"))
    assert regions == {"330106": 4, "330203": 2}
    assert zj.execute(f"SELECT count() FROM {zj_db}.settlements WHERE insu_admdvs NOT LIKE '33%'") == [(0,)]
    assert zj.execute(f"SELECT admdvs FROM {zj_db}.tips") == [("330106",), ("330106",)]
    assert "Access denied" in _denied(zj, f"SELECT count() FROM {DB}.settlements")
    assert "Access denied" in _denied(zj, f"SELECT count() FROM {rendered.marts['bi']}.settlements")
    zj_tables = {r[0] for r in zj.execute(f"SELECT name FROM system.tables WHERE database = '{zj_db}'")}
    assert "dead_letters" not in zj_tables and "settlements" in zj_tables  # no region column: not visible
    bj = _client(server, "bi_beijing", BJ_PW)
    bj_regions = dict(bj.execute(f"SELECT insu_admdvs, count() FROM {rendered.marts['bi_beijing']}.settlements "
                                 "GROUP BY insu_admdvs"))
    assert bj_regions == {"110105": 2}  # 1101 is a city: 110228 is another city of the province

    # what `yibao access` tells the administrator: each user reaches its data in the database it names
    told = {a.user: a for a in accounts(roles, rendered)}
    assert not rendered.default_database  # 18.16 has no per-user default database
    assert told["bi"].databases == (rendered.marts["bi"],) and told["bi_zhejiang"].databases == (zj_db,)
    assert told["yibao_ingest"].databases[0] == DB and set(told["yibao_ingest"].databases[1:]) == set(
        rendered.marts.values())
    for name, pw in (("bi", BI_PW), ("bi_zhejiang", ZJ_PW), ("bi_beijing", BJ_PW), ("yibao_ingest", INGEST_PW)):
        there = Client(server.host, port=server.tcp_port, user=name, password=pw, connect_timeout=3,
                       database=told[name].databases[0])
        assert there.execute("SELECT count() > 0 FROM settlements") == [(1,)], name
        there.disconnect()

    bi = _client(server, "bi", BI_PW)
    bi_db = rendered.marts["bi"]
    assert bi.execute(f"SELECT count(), uniqExact(psn_token) FROM {bi_db}.settlements") == [(12, 6)]
    assert dict(bi.execute(f"SELECT insu_admdvs, n FROM {bi_db}.bi_settlement_totals"))["330106"] == 4
    assert bi.execute(f"SELECT count(latest) > 0 FROM {bi_db}.bi_settlement_totals") == [(1,)]
    assert bi.execute(f"SELECT reason_code FROM {bi_db}.dead_letters") == [("BAD_MAGIC",), ("BAD_MAGIC",)]
    for column in ("payload", "source_key", "payload_digest"):
        error = _denied(bi, f"SELECT {column} FROM {bi_db}.dead_letters")
        assert re.search("Unknown identifier|Missing columns", error), error[:200]
    everything = json.dumps(bi.execute(f"SELECT * FROM {bi_db}.dead_letters"), default=str)
    assert "SEALED" not in everything
    assert "Access denied" in _denied(bi, f"SELECT payload FROM {DB}.dead_letters")
    assert "readonly" in _denied(bi, f"INSERT INTO {bi_db}.settlements (event_id) VALUES", [("x",)])
    assert "readonly" in _denied(bi, f"INSERT INTO {DB}.settlements_in (event_id) VALUES", [("x",)])
    assert "forbidden" in _denied(bi, f"SELECT * FROM remote('127.0.0.1:{server.tcp_port}', {DB}.dead_letters)")
    assert "readonly" in _denied(bi, f"DROP TABLE {bi_db}.settlements")
    assert "password" in _denied(_client(server, "bi", "wrong"), "SELECT 1").lower()
    for c in (zj, bj, bi):
        c.disconnect()
    admin.execute(f"DROP DATABASE IF EXISTS {DB}")
    for mart in set(rendered.marts.values()):
        admin.execute(f"DROP DATABASE IF EXISTS {mart}")
    admin.close()


def test_roles_file_errors_name_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "r.toml"
    bad.write_text('[roles.r]\nkind = "reader"\nregional = true\n[users.u]\nrole = "r"\npassword = "x"\n')
    with pytest.raises(AccessError, match=r"users\.u: no clear password"):
        load_roles(bad, "yibao")
    bad.write_text(f'[roles.r]\nkind = "reader"\nregional = true\n[users.u]\nrole = "r"\n'
                   f'password_sha256_hex = "{_sha("x")}"\nregion = "3"\n')
    with pytest.raises(AccessError, match=r"users\.u: role r is regional"):
        load_roles(bad, "yibao")
    bad.write_text('[roles.r]\nkind = "admin"\n')
    with pytest.raises(AccessError, match=r"roles\.r\.kind"):
        load_roles(bad, "yibao")


_PARSE = r"""
import json, sys
import chdb
bad = []
for stmt in json.load(sys.stdin):
    quoted = "'" + stmt.replace("\\", "\\\\").replace("'", "\\'") + "'"
    try:
        chdb.query("SELECT formatQuery(" + quoted + ")", "CSV")
    except Exception as exc:
        bad.append([stmt, str(exc)[:300]])
print(json.dumps(bad))
"""


def test_modern_sql_is_accepted_by_the_clickhouse_parser(tmp_path: Path) -> None:
    """Roles, column grants and row policies for servers with SQL access control, parsed by chDB."""
    from sinks.tables import TABLES
    from yibao.access import Catalog, Column

    tables = {name: "MergeTree" for name in TABLES} | {f"{n}_in": "Null" for n in TABLES} | {"bi_totals": "View"}
    columns = {name: [Column(c, t, "", "") for c, t in spec.columns] for name, spec in TABLES.items()}
    roles = load_roles(roles_file(tmp_path), DB)
    rendered = render(roles, Catalog(tables, columns), (24, 8))
    assert rendered.modern and not rendered.users_xml
    sql = rendered.sql
    assert any(s.startswith("GRANT SELECT(") and " ON acc.dead_letters " in s and "payload," not in s for s in sql)
    assert any("ROW POLICY" in s and "bi_zhejiang" in s and "LIKE '33%'" in s for s in sql)
    assert not any("dead_letters" in s and "yibao_bi_regional" in s for s in sql)
    res = subprocess.run([sys.executable, "-c", _PARSE.replace("\\\\\\\\", "\\\\")], input=json.dumps(sql),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_modern_servers_set_the_default_database_where_they_can(tmp_path: Path) -> None:
    """``CREATE USER … DEFAULT DATABASE`` exists from 21.8 (LTS) on: there every user lands in the
    pipeline's database, which its grants and row policies cover; older servers are told nothing."""
    from sinks.tables import TABLES
    from yibao.access import Column

    tables = {name: "MergeTree" for name in TABLES} | {f"{n}_in": "Null" for n in TABLES}
    columns = {name: [Column(c, t, "", "") for c, t in spec.columns] for name, spec in TABLES.items()}
    roles = load_roles(roles_file(tmp_path), DB)
    for version, expected in (((20, 8), False), ((21, 8), True), ((24, 8), True)):
        rendered = render(roles, Catalog(tables, columns), version)
        creates = [s for s in rendered.sql if s.startswith("CREATE USER")]
        assert len(creates) == len(roles.users)
        assert all(s.endswith(f" DEFAULT DATABASE {DB}") == expected for s in creates), (version, creates)
        assert rendered.default_database is expected
        told = accounts(roles, rendered)
        assert [a.user for a in told] == [u.name for u in roles.users]
        assert all(a.databases == (DB,) for a in told)  # one database, rights and policies inside it


def test_accounts_name_the_mart_and_the_client_line_that_reaches_it(tmp_path: Path) -> None:
    from sinks.tables import TABLES
    from yibao.access import Column

    tables = {name: "MergeTree" for name in TABLES} | {f"{n}_in": "Null" for n in TABLES}
    columns = {name: [Column(c, t, "", "") for c, t in spec.columns] for name, spec in TABLES.items()}
    roles = load_roles(roles_file(tmp_path), DB)
    rendered = render(roles, Catalog(tables, columns), (18, 16, 1))
    told = {a.user: a for a in accounts(roles, rendered)}
    assert told["bi"].describe() == f"bi (reader) reads {DB}_bi"
    assert told["bi_zhejiang"].describe() == f"bi_zhejiang (regional reader, region 33) reads {DB}_r33"
    assert told["yibao_ingest"].describe().startswith(f"yibao_ingest (writer) writes and reads {DB}; also reads ")
    assert told["bi"].client_command("ch.internal", 9440, secure=True) == (
        f"clickhouse-client --host ch.internal --port 9440 --secure -u bi -d {DB}_bi --password PASSWORD")
    # the users.d file says it too, next to each user
    assert f"<!-- bi reads {DB}_bi; 18.16 sets no default database: connect with -d {DB}_bi -->" in rendered.users_xml


def test_access_cli_prints_example_and_refuses_a_missing_database(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("YIBAO_")}
    example = run_cli(["access", "example"], env, tmp_path)
    assert example.returncode == 0 and "[roles.bi_regional]" in example.stdout
    (tmp_path / "r.toml").write_text(example.stdout.replace('password_file = "/run/secrets/clickhouse-ingest"',
                                                            f'password_sha256_hex = "{_sha("a")}"')
                                     .replace('password_file = "/run/secrets/clickhouse-bi-zhejiang"',
                                              f'password_sha256_hex = "{_sha("b")}"')
                                     .replace("<sha256 of the password>", _sha("c")))
    res = run_cli(["access", "render", "--roles", "r.toml"],
                  dict(env, YIBAO_CH_BACKEND="embedded", YIBAO_DATA_DIR=str(tmp_path / "d"),
                       YIBAO_CH_DATABASE="nothing_here"), tmp_path)
    assert res.returncode == 2 and "yibao migrate" in res.stderr
