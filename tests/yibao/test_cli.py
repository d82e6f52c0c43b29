"""The `yibao` command line (yibao.cli.app) through typer's CliRunner: no broker, no server; the
one query test uses embedded chDB in a temporary data dir."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas import SUBJECT_RECORDS, Codec, Registry
from sinks.tables import TABLES
from yibao import cli
from yibao.replay import LineError, read_jsonl

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No YIBAO_* variable or .env file of the developer's shell reaches the command; wide
    consoles so no value is cut short (a cut secret would hide a leak)."""
    for k in list(os.environ):
        if k.startswith("YIBAO_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.console, "width", 400)
    monkeypatch.setattr(cli.err, "width", 400)


@pytest.fixture(scope="module")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One chDB data dir for the whole module (chDB allows one data dir per process), migrated."""
    data_dir = tmp_path_factory.mktemp("yibao-data")
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("YIBAO_"):
                mp.delenv(k)
        res = runner.invoke(cli.app, ["migrate", "--data-dir", str(data_dir)])
    assert res.exit_code == 0, res.output
    yield data_dir


def test_help_lists_every_command() -> None:
    res = runner.invoke(cli.app, ["--help"])
    assert res.exit_code == 0
    for name in ("worker", "migrate", "simulate", "replay", "query", "demo", "bench", "schemas", "config"):
        assert name in res.output, name


def test_schemas_check_passes() -> None:
    res = runner.invoke(cli.app, ["schemas", "check"])
    assert res.exit_code == 0, res.output


def test_schemas_show_settlement_prints_the_union() -> None:
    res = runner.invoke(cli.app, ["schemas", "show", "settlement"])
    assert res.exit_code == 0, res.output
    schema = json.loads(res.stdout)
    assert isinstance(schema, list)
    names = [f"{r['namespace']}.{r['name']}" for r in schema]
    assert names == SUBJECT_RECORDS["settlement"]


def test_schemas_show_by_id() -> None:
    res = runner.invoke(cli.app, ["schemas", "show", "--id", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == Registry.load().by_id(1).schema


def test_schemas_show_unknown_id_exits_2() -> None:
    res = runner.invoke(cli.app, ["schemas", "show", "--id", "999999"])
    assert res.exit_code == 2
    assert "999999" in res.output


def test_config_show_never_prints_secrets(tmp_path: Path) -> None:
    secrets = {
        "YIBAO_CH_PASSWORD": "ch-pass-Q7w9zX2mK4",
        "YIBAO_KAFKA_SASL_PASSWORD": "sasl-pass-R3t8yU1nB6",
        "YIBAO_PSEUDO_KEY": "6f1d9c2a7b3e4f5061728394a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e",
    }
    visible = "reporting-user-H5j2kL9p"  # positive control: a long plain value is shown whole
    res = runner.invoke(cli.app, ["config", "show"], env={**secrets, "YIBAO_CH_USER": visible})
    assert res.exit_code == 0, res.output
    assert visible in res.output
    for name, value in secrets.items():
        assert value not in res.output, name
        assert value[:8] not in res.output, name
        line = next(ln for ln in res.output.splitlines() if f"{name} " in ln)
        assert "*****" in line, line


def test_config_show_never_prints_secret_files(tmp_path: Path) -> None:
    secret_file = tmp_path / "ch_password"
    secret_file.write_text("file-secret-V8c3nM1q\n", encoding="utf-8")
    res = runner.invoke(cli.app, ["config", "show"], env={"YIBAO_CH_PASSWORD_FILE": str(secret_file)})
    assert res.exit_code == 0, res.output
    assert "file-secret-V8c3nM1q" not in res.output
    assert str(secret_file) in res.output


@pytest.mark.parametrize(("var", "value"), [
    ("YIBAO_KAFKA_BOOTSTRAP", "nohostport"),
    ("YIBAO_TOPIC_PARTITIONS", "0"),
    ("YIBAO_CH_BACKEND", "sqlite"),
])
def test_invalid_setting_exits_2_naming_the_variable(var: str, value: str) -> None:
    res = runner.invoke(cli.app, ["config", "show"], env={var: value})
    assert res.exit_code == 2
    assert var in res.stderr
    assert "Traceback" not in res.output


def test_simulate_to_file_is_replayable(tmp_path: Path) -> None:
    out = tmp_path / "traffic.jsonl"
    res = runner.invoke(cli.app, ["simulate", "--events", "200", "--out", str(out)])
    assert res.exit_code == 0, res.output
    errors: list[LineError] = []
    events = list(read_jsonl(out, Codec(), errors))
    assert errors == []
    n_lines = len(out.read_text(encoding="utf-8").splitlines())
    assert len(events) == n_lines
    assert f"wrote {n_lines} events" in res.output
    counts = Counter(e.record for e in events)
    assert counts["cn.nhsa.yibao.settlement.Settlement"] == 200
    assert set(counts) <= {r for s in ("settlement", "procurement", "supervision") for r in SUBJECT_RECORDS[s]}


def test_replay_of_a_missing_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    res = runner.invoke(cli.app, ["replay", str(missing)])
    assert res.exit_code == 2
    assert "no such file" in res.output
    assert "nope.jsonl" in res.output
    assert "Traceback" not in res.output


def test_query_embedded_table_and_json(chdb_dir: Path) -> None:
    sql = "SELECT name FROM system.tables WHERE database = 'yibao' ORDER BY name"
    res = runner.invoke(cli.app, ["query", sql, "--data-dir", str(chdb_dir)])
    assert res.exit_code == 0, res.output
    for table in TABLES:
        assert table in res.output
    assert "row(s)" in res.output

    res = runner.invoke(cli.app, ["query", sql, "--data-dir", str(chdb_dir), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    names = [r["name"] for r in rows]
    assert set(TABLES) <= set(names)
    assert names == sorted(names)
    assert all(set(r) == {"name"} for r in rows)

    res = runner.invoke(cli.app, ["query", "SELECT count() AS n FROM yibao.settlements", "--data-dir",
                                  str(chdb_dir), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"n": 0}

    res = runner.invoke(cli.app, ["query", "SELECT 1", "--data-dir", str(chdb_dir), "--format", "xml"])
    assert res.exit_code == 2 and "--format xml: unknown format" in res.output
