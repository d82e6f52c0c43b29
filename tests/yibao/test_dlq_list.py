"""`yibao dlq list` (yibao.dlq.recent, reason_counts): the dead letters themselves, newest first, with the
id `dlq show` takes, on both ClickHouse engines."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas.calendar import CHINA
from streams.privacy import Sealer
from yibao import cli
from yibao.dlq import reason_counts, recent

from ..harness import migrated_database

runner = CliRunner()
KEY_HEX = "ab" * 32
T0 = int(datetime(2026, 11, 20, 8, tzinfo=CHINA).timestamp())


@dataclass(frozen=True)
class Db:
    """A migrated database with a few dead letters, and the YIBAO_* variables that point a command at it."""

    be: Any
    env: dict[str, str]
    ids: list[str]  # newest first


def _dead_letters(be: Any) -> list[str]:
    """Five dead letters failed at T0+0…T0+3 s (two in the last second, at offsets 7 and 9), one of them
    written twice (a redelivered batch); returns their ids newest first."""
    sealer = Sealer(bytes.fromhex(KEY_HEX), "k1")
    rows = [  # id, reason, field, topic, partition, offset, failed_at
        ("dl-a", "INVALID_CODE", "fixmedins_code", "yibao.settlement", 0, 3, T0),
        ("dl-b", "MONEY_IDENTITY", "medfee_sumamt", "yibao.settlement", 1, 5, T0 + 1),
        ("dl-c", "BAD_MAGIC", "", "yibao.procurement", 0, 2, T0 + 2),
        ("dl-d", "INVALID_CODE", "fixmedins_code", "yibao.settlement", 2, 7, T0 + 3),
        ("dl-e", "INVALID_CODE", "hilist_code", "yibao.settlement", 2, 9, T0 + 3),
        ("dl-b", "MONEY_IDENTITY", "medfee_sumamt", "yibao.settlement", 1, 5, T0 + 1),
    ]
    be.insert("dead_letters", {
        "event_id": [r[0] for r in rows], "reason_code": [r[1] for r in rows],
        "reason_detail": [f"{r[2]} of {r[0]} is wrong" for r in rows], "field": [r[2] for r in rows],
        "source_topic": [r[3] for r in rows], "source_partition": [r[4] for r in rows],
        "source_offset": [r[5] for r in rows], "source_key": [sealer.seal(b"key") for _ in rows],
        "event_type": ["" if r[1] == "BAD_MAGIC" else "Settlement" for r in rows],
        "payload": [sealer.seal(b"\x01not avro") for _ in rows], "payload_digest": ["d" * 64 for _ in rows],
        "failed_at": [r[6] for r in rows], "src_partition": [r[4] for r in rows], "src_offset": [r[5] for r in rows],
    })
    return ["dl-e", "dl-d", "dl-c", "dl-b", "dl-a"]


@pytest.fixture(params=["embedded", pytest.param("server", marks=pytest.mark.integration)])
def dlq_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Db]:
    for k in list(os.environ):
        if k.startswith("YIBAO_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    with migrated_database(request.param, request, tmp_path_factory, "yb_dlq") as (be, env):
        env["YIBAO_PSEUDO_KEY"] = KEY_HEX
        yield Db(be, env, _dead_letters(be))


def test_recent_lists_each_dead_letter_once_newest_first(dlq_db: Db) -> None:
    got = recent(dlq_db.be, limit=10)
    assert [d["event_id"] for d in got] == dlq_db.ids
    e = got[0]
    assert e == {"event_id": "dl-e", "reason_code": "INVALID_CODE", "field": "hilist_code",
                 "reason_detail": "hilist_code of dl-e is wrong",
                 "source": {"topic": "yibao.settlement", "partition": 2, "offset": 9}, "event_type": "Settlement",
                 "failed_at": datetime.fromtimestamp(T0 + 3, CHINA).isoformat()}
    bad_magic = next(d for d in got if d["event_id"] == "dl-c")
    assert (bad_magic["field"], bad_magic["event_type"]) == (None, None)
    assert [d["event_id"] for d in recent(dlq_db.be, limit=2)] == dlq_db.ids[:2]
    assert [d["event_id"] for d in recent(dlq_db.be, limit=10, reason="INVALID_CODE")] == ["dl-e", "dl-d", "dl-a"]
    assert recent(dlq_db.be, limit=10, reason="NO'SUCH") == []


def test_reason_counts_count_each_dead_letter_once(dlq_db: Db) -> None:
    counts = {(r["reason_code"], r["source_topic"]): r["count"] for r in reason_counts(dlq_db.be)}
    assert counts == {("INVALID_CODE", "yibao.settlement"): 3, ("MONEY_IDENTITY", "yibao.settlement"): 1,
                      ("BAD_MAGIC", "yibao.procurement"): 1}
    assert [r["count"] for r in reason_counts(dlq_db.be, "MONEY_IDENTITY")] == [1]


def test_dlq_list_json_gives_the_ids_dlq_show_takes(dlq_db: Db) -> None:
    res = runner.invoke(cli.app, ["dlq", "list", "--json", "--limit", "3"], env=dlq_db.env)
    assert res.exit_code == 0, res.output
    listed = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert [d["event_id"] for d in listed] == dlq_db.ids[:3]
    for d in listed:
        shown = runner.invoke(cli.app, ["dlq", "show", d["event_id"]], env=dlq_db.env)
        assert shown.exit_code == 0, shown.output
        detail = json.loads(shown.stdout)
        assert (detail["event_id"], detail["source"], detail["reason_code"]) == (
            d["event_id"], d["source"], d["reason_code"])


def test_dlq_list_table_shows_the_newest_and_the_counts(dlq_db: Db) -> None:
    res = runner.invoke(cli.app, ["dlq", "list", "--limit", "2"], env=dlq_db.env)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "dl-e" in out and "dl-d" in out and "dl-a" not in out
    assert "yibao.settlement:2@9" in out
    assert "the 2 newest of 5" in out
    summary = out[out.index("by reason"):]
    assert [ln.split("│")[1].strip() for ln in summary.splitlines() if ln.startswith("│")] == [
        "INVALID_CODE", "BAD_MAGIC", "MONEY_IDENTITY"]
    assert "5 dead letter(s)" in out


def test_dlq_list_bad_limit_is_one_clear_line(dlq_db: Db) -> None:
    res = runner.invoke(cli.app, ["dlq", "list", "--limit", "0"], env=dlq_db.env)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --limit 0")
