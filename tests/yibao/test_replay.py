"""yibao.replay.read_jsonl: good lines become framed events with the right Kafka key; every bad
line is reported with its 1-based line number and a message naming what is wrong."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas import SUBJECT_RECORDS, Codec
from yibao.replay import LineError, read_jsonl
from yibao.sim.generator import (
    INCOME,
    ORDER,
    SETTLEMENT,
    TIP,
    SimConfig,
    SimEvent,
    TrafficGenerator,
    write_jsonl,
)

NS = "cn.nhsa.yibao"


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


@pytest.fixture(scope="module")
def sample() -> list[SimEvent]:
    """Two events of every input record, including a tip that names no institution."""
    picked: dict[str, list[SimEvent]] = {}
    for ev in TrafficGenerator(SimConfig(settlements=300, days=30, inspection_rate=0.05, tip_rate=0.05)).events():
        got = picked.setdefault(ev.record, [])
        if len(got) < 2:
            got.append(ev)
    inputs = [r for s in ("settlement", "procurement", "supervision") for r in SUBJECT_RECORDS[s]]
    assert set(picked) == set(inputs)
    out = [ev for r in inputs for ev in picked[r]]
    tip = copy.deepcopy(picked[TIP][0].datum)
    tip["fixmedins_code"] = None
    tip["event_id"] = "0b5e2a4c-1d3f-4e6a-9b7c-8d9e0f1a2b3c"
    out.append(SimEvent(TIP, tip["admdvs"], tip))
    return out


def expected_key(record: str, datum: dict[str, Any]) -> str:
    """The topic keys of streams/topics.py: person for settlement records, institution for
    procurement and supervision, the insured region for fund income, the region for a tip
    naming no institution."""
    name = record.rsplit(".", 1)[-1]
    if record in SUBJECT_RECORDS["settlement"]:
        return str(datum["psn_no"])
    if name == "FundIncome":
        return str(datum["insu_admdvs"])
    return str(datum["fixmedins_code"] or datum["admdvs"])


@dataclass
class Bad:
    text: str
    needle: str  # what the error message must name


def _json_of(codec: Codec, ev: SimEvent, **changes: Any) -> dict[str, Any]:
    obj = {"event_type": ev.event_type, **codec.to_json(ev.record, ev.datum)}
    obj.update(changes)
    return obj


def _bad_lines(codec: Codec, sample: list[SimEvent]) -> list[Bad]:
    setl = next(e for e in sample if e.record == SETTLEMENT)
    order = next(e for e in sample if e.record == ORDER)
    income = next(e for e in sample if e.record == INCOME)

    def line(obj: dict[str, Any]) -> str:
        return json.dumps(obj, ensure_ascii=False)

    s = _json_of(codec, setl)
    no_psn = {k: v for k, v in s.items() if k != "psn_no"}
    bad_line_item = copy.deepcopy(s)
    bad_line_item["fee_details"][1]["cnt"] = "1.00001"
    return [
        Bad("{not json", "not JSON"),
        Bad('{"event_type": "Settlement", ', "not JSON"),
        Bad("[1, 2, 3]", "not a JSON object"),
        Bad('"Settlement"', "not a JSON object"),
        Bad("42", "not a JSON object"),
        Bad(line({k: v for k, v in s.items() if k != "event_type"}), "event_type"),
        Bad(line({**s, "event_type": 7}), "event_type"),
        Bad(line({**s, "event_type": "Refund"}), "Refund"),
        Bad(line({"event_type": "AnomalyAlert", "alert_id": "a1"}), "AnomalyAlert"),
        Bad(line({"event_type": f"{NS}.pipeline.DeadLetter"}), "DeadLetter"),
        Bad(line({**s, "psn_no": 31000007922213101851}), "psn_no"),
        Bad(line({**s, "oprn_codes": "36.0700"}), "oprn_codes"),
        Bad(line({**s, "medfee_sumamt": "12.345"}), "medfee_sumamt"),
        Bad(line({**s, "medfee_sumamt": "twelve"}), "medfee_sumamt"),
        Bad(line(bad_line_item), "fee_details[1].cnt"),
        Bad(line({**s, "brdy": "1990-13-45"}), "brdy"),
        Bad(line({**s, "brdy": 19901231}), "brdy"),
        Bad(line({**s, "setl_time": "yesterday"}), "setl_time"),
        Bad(line({**s, "gend": "M"}), "gend"),
        Bad(line(no_psn), "psn_no"),
        Bad(line({**s, "psn_age": 30}), "psn_age"),
        Bad(line(_json_of(codec, order, purc_cnt=True)), "purc_cnt"),
        Bad(line(_json_of(codec, income, income_amt="1.001")), "income_amt"),
    ]


def test_mixed_file(tmp_path: Path, codec: Codec, sample: list[SimEvent]) -> None:
    good_file = tmp_path / "good.jsonl"
    assert write_jsonl(sample, good_file, codec) == len(sample)
    good_lines = good_file.read_text(encoding="utf-8").splitlines()
    bad = _bad_lines(codec, sample)

    # interleave: good, bad, blank, good, bad, ... so line numbers shift in every way
    text: list[str] = []
    good_at: list[int] = []
    bad_at: list[tuple[int, Bad]] = []
    gi = bi = 0
    while gi < len(good_lines) or bi < len(bad):
        if gi < len(good_lines):
            text.append(good_lines[gi])
            good_at.append(len(text))
            gi += 1
        if bi < len(bad):
            text.append(bad[bi].text)
            bad_at.append((len(text), bad[bi]))
            bi += 1
        if (gi + bi) % 4 == 0:
            text.append("" if gi % 2 else "   \t")
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")

    errors: list[LineError] = []
    out = list(read_jsonl(path, codec, errors))

    assert [e.line for e in errors] == [n for n, _ in bad_at]
    for e, (n, b) in zip(errors, bad_at, strict=True):
        assert b.needle in e.message, (n, b.text[:60], e.message)
    assert len(out) == len(sample) == len(good_at)
    for got, ev in zip(out, sample, strict=True):
        assert got.record == ev.record
        assert got.datum == ev.datum  # JSON round trip gives back the identical raw datum
        assert got.key == expected_key(ev.record, ev.datum)
        assert got.value is not None
        dec = codec.decode(got.value)
        assert (dec.record, dec.datum) == (ev.record, ev.datum)


def test_keys_per_record(tmp_path: Path, codec: Codec, sample: list[SimEvent]) -> None:
    path = tmp_path / "good.jsonl"
    write_jsonl(sample, path, codec)
    errors: list[LineError] = []
    keys = {}
    for out in read_jsonl(path, codec, errors):
        assert out.datum is not None
        keys[(out.record, out.datum["event_id"])] = out.key
    assert not errors
    for ev in sample:
        datum = ev.datum
        key = keys[(ev.record, datum["event_id"])]
        if ev.record in SUBJECT_RECORDS["settlement"]:
            assert key == datum["psn_no"]
        elif ev.record == INCOME:
            assert key == datum["insu_admdvs"]
        elif ev.record == TIP and datum["fixmedins_code"] is None:
            assert key == datum["admdvs"]
        else:
            assert key == datum["fixmedins_code"]
        assert key


def test_full_record_names_and_crlf_are_accepted(tmp_path: Path, codec: Codec, sample: list[SimEvent]) -> None:
    ev = next(e for e in sample if e.record == SETTLEMENT)
    obj = _json_of(codec, ev, event_type=SETTLEMENT)
    path = tmp_path / "one.jsonl"
    path.write_bytes((json.dumps(obj, ensure_ascii=False) + "\r\n").encode("utf-8"))
    errors: list[LineError] = []
    (got,) = list(read_jsonl(path, codec, errors))
    assert not errors
    assert got.datum == ev.datum


def test_good_lines_still_go_through_after_bad_ones(tmp_path: Path, codec: Codec, sample: list[SimEvent]) -> None:
    ev = sample[0]
    good = json.dumps(_json_of(codec, ev), ensure_ascii=False)
    path = tmp_path / "tail.jsonl"
    path.write_text("oops\n" * 3 + good + "\n", encoding="utf-8")
    errors: list[LineError] = []
    out = list(read_jsonl(path, codec, errors))
    assert [e.line for e in errors] == [1, 2, 3]
    assert [o.datum for o in out] == [ev.datum]


def test_json_error_column_points_into_the_line(tmp_path: Path, codec: Codec) -> None:
    text = '{"event_type": "Settlement", '  # 29 characters: the error is at column 30
    path = tmp_path / "cut.jsonl"
    path.write_text(text + "\n", encoding="utf-8")
    errors: list[LineError] = []
    assert list(read_jsonl(path, codec, errors)) == []
    assert [e.line for e in errors] == [1]
    assert "column 30" in errors[0].message
