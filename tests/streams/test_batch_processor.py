"""BatchProcessor.process, the pure CPU part of ingestion: framed messages → table columns and
dead letters. Driven with generated traffic encoded by the real codec; no broker, no ClickHouse.
"""

from __future__ import annotations

import copy
import datetime as dt
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from schemas import SUBJECT_RECORDS, Codec
from sinks.tables import TABLES
from streams.base import Subsystem
from streams.landed import LandedIndex
from streams.messages import (
    DEAD_LETTER_TABLE,
    DEADLETTER_RECORD,
    MESSAGE_BUDGET,
    Message,
    Outcome,
    clip,
    dead_letter_id,
    fit_for_topic,
)
from streams.privacy import Pseudonymizer, Sealer
from streams.processors import BatchProcessor
from streams.records import PRIMARY_TABLE as PRIMARY
from streams.topology import MODULES
from streams.validation import Limits
from yibao.settings import Settings
from yibao.sim.corrupt import FRAME_CORRUPTIONS, SETTLEMENT_CORRUPTIONS
from yibao.sim.generator import (
    EVENT_TIME_FIELD,
    FILING,
    ORDER,
    REVERSAL,
    SETTLEMENT,
    TIP,
    SimConfig,
    SimEvent,
    TrafficGenerator,
)

from ..harness import default_settings

CN = ZoneInfo("Asia/Shanghai")
DAY_MS = 86_400_000
KEY = bytes.fromhex("5a" * 32)
KID = "t1"
CONFIG = SimConfig(settlements=400, days=30, inspection_rate=0.05, tip_rate=0.05)
LIMITS = Limits(now_ms=CONFIG.end_ms + DAY_MS, max_future_skew_ms=300_000,
                min_event_ms=int(dt.datetime(2018, 1, 1, tzinfo=CN).timestamp() * 1000))
FAR_FUTURE = CONFIG.end_ms + 400 * DAY_MS

SENSITIVE = ("psn_no", "psn_cert_no", "psn_name", "tel", "rptr_name", "rptr_cert_no", "rptr_tel")
STREAMS = ("settlement", "procurement", "supervision")


def short(record: str) -> str:
    return record.rsplit(".", 1)[-1]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with default_settings(tmp_path_factory.mktemp("cwd")) as s:
        yield s


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


@pytest.fixture(scope="module")
def subsystems(settings: Settings) -> dict[str, Subsystem]:
    return {name: MODULES[name].build(settings.validation(), lambda: LIMITS) for name in STREAMS}


@pytest.fixture(scope="module")
def events() -> list[SimEvent]:
    return list(TrafficGenerator(CONFIG).events())


@pytest.fixture(scope="module")
def pseudo() -> Pseudonymizer:
    return Pseudonymizer(KEY, KID)


@pytest.fixture(scope="module")
def sealer() -> Sealer:
    return Sealer(KEY, KID)


def make_processor(subsystems: dict[str, Subsystem], codec: Codec, name: str) -> BatchProcessor:
    return BatchProcessor(subsystems[name], codec, Pseudonymizer(KEY, KID), Sealer(KEY, KID),
                          f"yibao.{name}", lambda: LIMITS)


def of_stream(events: list[SimEvent], name: str) -> list[SimEvent]:
    return [e for e in events if e.record in SUBJECT_RECORDS[name]]


def encode_all(codec: Codec, evs: list[SimEvent], partition: int = 0, start: int = 0) -> list[Message]:
    return [Message(partition, start + i, e.key.encode(), codec.encode(e.record, e.datum)) for i, e in enumerate(evs)]


def as_read(value: Any) -> Any:
    """A value as ClickHouse hands a String back (text the row builders send as UTF-8 bytes)."""
    if type(value) is bytes:
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    return value


def rows_of(out: Outcome, table: str) -> list[dict[str, Any]]:
    """The rows ``out`` sends to ``table``, text as it reads back (:func:`as_read`)."""
    cols = out.tables.get(table)
    if not cols:
        return []
    names = list(cols)
    return [{n: as_read(v) for n, v in zip(names, vals, strict=True)}
            for vals in zip(*(cols[n] for n in names), strict=True)]


def future(codec: Codec, ev: SimEvent) -> bytes:
    d = copy.deepcopy(ev.datum)
    d[EVENT_TIME_FIELD[ev.record]] = FAR_FUTURE
    return codec.encode(ev.record, d)


# --- counts --------------------------------------------------------------------------------------


def test_primary_tables_are_the_declared_ones(subsystems: dict[str, Subsystem]) -> None:
    declared = {s.short_name: s.primary_table for sub in subsystems.values() for s in sub.records}
    assert declared == PRIMARY


@pytest.mark.parametrize("name", STREAMS)
def test_counts_reconcile(name: str, subsystems: dict[str, Subsystem], codec: Codec, events: list[SimEvent]) -> None:
    evs = of_stream(events, name)
    proc = make_processor(subsystems, codec, name)
    msgs: list[Message] = []
    valid: list[SimEvent] = []
    position: dict[str, tuple[int, int]] = {}
    invalid = 0
    for i, ev in enumerate(evs):
        value = codec.encode(ev.record, ev.datum)
        if i % 9 == 4:
            value, invalid = future(codec, ev), invalid + 1
        elif i % 13 == 6:
            value, invalid = value[:3], invalid + 1
        else:
            valid.append(ev)
            position[ev.datum["event_id"]] = (i % 3, 1000 + i)
        msgs.append(Message(i % 3, 1000 + i, ev.key.encode(), value))
    out = proc.process(msgs)

    assert out.events == len(msgs)
    assert sum(out.landed.values()) + sum(out.reasons.values()) == len(msgs)
    assert sum(out.reasons.values()) == invalid == len(out.dead) == out.rows(DEAD_LETTER_TABLE)
    per_record = Counter(ev.event_type for ev in valid)
    assert +out.landed == per_record
    per_table = Counter(PRIMARY[ev.event_type] for ev in valid)
    for table, n in per_table.items():
        assert out.rows(table) == n, table
        ids = [r["event_id"] for r in rows_of(out, table)]
        assert sorted(ids) == sorted(ev.datum["event_id"] for ev in valid if PRIMARY[ev.event_type] == table)
    expected_tables = set(per_table) | {DEAD_LETTER_TABLE}
    lines = sum(len(ev.datum["fee_details"]) for ev in valid if ev.record == SETTLEMENT)
    if lines:
        expected_tables.add("fee_details")
    assert set(out.tables) == expected_tables
    assert out.rows("fee_details") == lines
    # every row carries its source position
    for table in per_table:
        for row in rows_of(out, table):
            assert (row["src_partition"], row["src_offset"]) == position[row["event_id"]]
    lines_at = Counter((p, o) for p, o in zip(out.tables.get("fee_details", {}).get("src_partition", []),
                                              out.tables.get("fee_details", {}).get("src_offset", []), strict=True))
    for ev in valid:
        if ev.record == SETTLEMENT:
            assert lines_at[position[ev.datum["event_id"]]] == len(ev.datum["fee_details"])


@pytest.mark.parametrize("name", STREAMS)
def test_every_table_gets_every_column(name: str, subsystems: dict[str, Subsystem], codec: Codec,
                                       events: list[SimEvent]) -> None:
    out = make_processor(subsystems, codec, name).process(encode_all(codec, of_stream(events, name)))
    assert not out.reasons
    for table, cols in out.tables.items():
        spec = TABLES[table]
        assert set(cols) == set(spec.insert_columns), table
        assert len({len(v) for v in cols.values()}) == 1, table


# --- row contents --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settlement_out(subsystems: dict[str, Subsystem], codec: Codec, events: list[SimEvent]) -> Outcome:
    return make_processor(subsystems, codec, "settlement").process(encode_all(codec, of_stream(events, "settlement")))


def test_settlement_rows(settlement_out: Outcome, events: list[SimEvent], pseudo: Pseudonymizer) -> None:
    rows = {r["event_id"]: r for r in rows_of(settlement_out, "settlements")}
    settlements = [e.datum for e in events if e.record == SETTLEMENT]
    assert settlements
    for d in settlements:
        row = rows[d["event_id"]]
        assert row["setl_id"] == d["setl_id"]
        assert row["psn_token"] == pseudo.token(d["psn_no"], "psn")
        assert row["setl_time"] == d["setl_time"] // 1000
        assert row["medfee_sumamt"] == d["medfee_sumamt"] >= 0
        assert row["line_count"] == len(d["fee_details"])
        assert row["refd_setl_flag"] == 0
        assert row["init_setl_id"] == ""
        assert row["dscg_maindiag_code"] == (d["dscg_maindiag_code"] or "")
        assert row["adm_date"] == d["adm_date"]
        assert row["oprn_codes"] == d["oprn_codes"]


def test_reversal_row_negates_amounts(settlement_out: Outcome, events: list[SimEvent], codec: Codec,
                                      pseudo: Pseudonymizer) -> None:
    schema = codec.record_schema(REVERSAL)
    amounts = [f["name"] for f in schema["fields"]
               if isinstance(f["type"], dict) and f["type"].get("logicalType") == "decimal"]
    assert "medfee_sumamt" in amounts
    not_carried = [c for c, t in TABLES["settlements"].columns
                   if t.startswith("Decimal") and c not in amounts]
    rows = {r["event_id"]: r for r in rows_of(settlement_out, "settlements")}
    reversals = [e.datum for e in events if e.record == REVERSAL]
    assert reversals
    for d in reversals:
        row = rows[d["event_id"]]
        assert row["refd_setl_flag"] == 1
        assert row["init_setl_id"] == d["init_setl_id"] != ""
        assert row["setl_id"] == d["setl_id"]
        assert row["psn_token"] == pseudo.token(d["psn_no"], "psn")
        assert row["full_reversal"] == int(d["full_reversal"])
        for a in amounts:
            assert row[a] == -d[a], a
        assert any(row[a] < 0 for a in amounts)
        for c in not_carried:
            assert row[c] == 0, c


def test_reversal_token_matches_its_settlement(settlement_out: Outcome, events: list[SimEvent]) -> None:
    """A reversal and the settlement it reverses join on psn_token."""
    rows = rows_of(settlement_out, "settlements")
    by_setl = {r["setl_id"]: r for r in rows if r["refd_setl_flag"] == 0}
    joined = 0
    for r in rows:
        if r["refd_setl_flag"] == 1 and r["init_setl_id"] in by_setl:
            assert r["psn_token"] == by_setl[r["init_setl_id"]]["psn_token"]
            joined += 1
    assert joined > 0


def test_fee_line_rows_carry_their_parent(settlement_out: Outcome, events: list[SimEvent],
                                          pseudo: Pseudonymizer) -> None:
    lines = {(r["setl_id"], r["feedetl_sn"]): r for r in rows_of(settlement_out, "fee_details")}
    n = 0
    for ev in events:
        if ev.record != SETTLEMENT:
            continue
        d = ev.datum
        for line in d["fee_details"]:
            row = lines[(d["setl_id"], line["feedetl_sn"])]
            assert row["psn_token"] == pseudo.token(d["psn_no"], "psn")
            assert row["setl_time"] == d["setl_time"] // 1000
            assert row["mdtrt_id"] == d["mdtrt_id"]
            assert row["fixmedins_code"] == d["fixmedins_code"]
            assert row["insu_admdvs"] == d["insu_admdvs"]
            assert row["med_type"] == d["med_type"]
            assert row["hilist_code"] == line["hilist_code"]
            assert (row["cnt"], row["pric"], row["det_item_fee_sumamt"]) == (
                line["cnt"], line["pric"], line["det_item_fee_sumamt"])
            assert row["fee_ocur_time"] == line["fee_ocur_time"] // 1000
            assert row["bilg_dr_code"] == (line["bilg_dr_code"] or "")
            n += 1
    assert n == len(lines) > 0


def test_filing_rows_are_tokenized(settlement_out: Outcome, events: list[SimEvent], pseudo: Pseudonymizer) -> None:
    rows = {r["event_id"]: r for r in rows_of(settlement_out, "cross_province_filings")}
    filings = [e.datum for e in events if e.record == FILING]
    assert filings
    for d in filings:
        assert rows[d["event_id"]]["psn_token"] == pseudo.token(d["psn_no"], "psn")


def test_tip_reporter_token(subsystems: dict[str, Subsystem], codec: Codec, events: list[SimEvent],
                            pseudo: Pseudonymizer) -> None:
    tips = [e for e in events if e.record == TIP]
    assert tips
    base = tips[0]
    variants: list[SimEvent] = []
    for cert, tel in (("110105199001011234", "13800138000"), (None, "13800138000"), (None, None)):
        d = copy.deepcopy(base.datum)
        d.update(event_id=str(uuid.UUID(int=len(variants) + 1)), rptr_name="王秀英",
                 rptr_cert_no=cert, rptr_tel=tel)
        variants.append(SimEvent(TIP, base.key, d))
    out = make_processor(subsystems, codec, "supervision").process(encode_all(codec, variants))
    rows = {r["event_id"]: r for r in rows_of(out, "tips")}
    expected = [pseudo.token("110105199001011234", "rptr"), pseudo.token("13800138000", "rptr"),
                pseudo.token("王秀英", "rptr")]
    assert [rows[v.datum["event_id"]]["rptr_token"] for v in variants] == expected
    # a reporter's token is not the same person's token as an insured person
    assert expected[0] != pseudo.token("110105199001011234", "psn")


# --- privacy -------------------------------------------------------------------------------------


def _flatten(value: Any, strs: list[str], raw: list[bytes]) -> None:
    if isinstance(value, (list, tuple)):
        for v in value:
            _flatten(v, strs, raw)
    elif isinstance(value, str):
        strs.append(value)
    elif isinstance(value, (bytes, bytearray)):
        raw.append(bytes(value))


@pytest.mark.parametrize("name", ["settlement", "supervision"])
def test_no_clear_identifier_leaves_the_processor(name: str, subsystems: dict[str, Subsystem], codec: Codec,
                                                  events: list[SimEvent]) -> None:
    evs = of_stream(events, name)
    rng = random.Random(7)
    msgs = []
    for i, ev in enumerate(evs):
        value = codec.encode(ev.record, ev.datum)
        if i % 5 == 1:  # a dead letter of every kind: content-invalid, and broken frames
            if ev.record == SETTLEMENT and i % 2:
                value = SETTLEMENT_CORRUPTIONS[i % len(SETTLEMENT_CORRUPTIONS)](codec, ev, rng)[0]
            elif i % 3:
                value = future(codec, ev)
            else:
                value = FRAME_CORRUPTIONS[i % len(FRAME_CORRUPTIONS)](codec, ev, rng)[0]
        msgs.append(Message(0, i, ev.key.encode(), value))
    out = make_processor(subsystems, codec, name).process(msgs)
    assert out.dead and any(out.landed.values())

    secrets = {ev.datum[f] for ev in evs for f in SENSITIVE if ev.datum.get(f)}
    assert secrets
    strs: list[str] = []
    raw: list[bytes] = []
    for cols in out.tables.values():
        for values in cols.values():
            _flatten(values, strs, raw)
    for d in out.dead:  # what goes to the dead-letter topic
        _flatten(list(d.values()), strs, raw)
    text = "\x00".join(strs)
    blob = b"\x00".join(raw)
    leaked = [s for s in secrets if s in text or s.encode() in blob]
    assert not leaked, leaked[:5]
    # positive control: the sealed payloads do hold the identifiers
    sealer = Sealer(KEY, KID)
    opened = b"\x00".join(sealer.open(d["payload"]) for d in out.dead)
    assert any(s.encode() in opened for s in secrets)


# --- dead letters --------------------------------------------------------------------------------


def test_dead_letter_datum(subsystems: dict[str, Subsystem], codec: Codec, events: list[SimEvent],
                           sealer: Sealer) -> None:
    ev = next(e for e in events if e.record == SETTLEMENT)
    bad = copy.deepcopy(ev.datum)
    bad["psn_cash_pay"] += 500
    value = codec.encode(SETTLEMENT, bad)
    key = ev.key.encode()
    msgs = [Message(3, 17, key, value), Message(3, 18, None, b"\x00\x01")]
    topic = "yibao.settlement"
    out = make_processor(subsystems, codec, "settlement").process(msgs)
    assert [d["source_offset"] for d in out.dead] == [17, 18]
    d, frame = out.dead

    assert d["event_id"] == dead_letter_id(topic, 3, 17)
    assert uuid.UUID(d["event_id"])
    assert d["reason_code"] == "AMOUNTS_DO_NOT_ADD_UP"
    assert d["field"] == "medfee_sumamt"
    assert d["reason_detail"]
    assert (d["source_topic"], d["source_partition"], d["source_offset"]) == (topic, 3, 17)
    assert d["event_type"] == "Settlement"
    assert d["schema_id"] == int.from_bytes(value[1:5], "big")
    assert sealer.open(d["payload"]) == value
    assert sealer.open(d["source_key"]) == key
    assert d["payload_digest"] == sealer.digest(value)

    assert frame["reason_code"] == "TRUNCATED_FRAME"
    assert frame["event_id"] == dead_letter_id(topic, 3, 18) != d["event_id"]
    assert (frame["source_key"], frame["schema_id"], frame["event_type"]) == (None, None, None)
    assert sealer.open(frame["payload"]) == b"\x00\x01"
    assert out.dead_keys == [f"{topic}/3".encode()] * 2

    # the same position gives the same id in another run; another position or topic another id
    again = make_processor(subsystems, codec, "settlement").process(msgs)
    assert [x["event_id"] for x in again.dead] == [d["event_id"], frame["event_id"]]
    assert dead_letter_id(topic, 3, 17) != dead_letter_id(topic, 4, 17)
    assert dead_letter_id(topic, 3, 17) != dead_letter_id("yibao.procurement", 3, 17)

    # the table rows say the same, and each datum is a valid DeadLetter for the topic
    rows = rows_of(out, DEAD_LETTER_TABLE)
    assert [(r["event_id"], r["reason_code"], r["src_partition"], r["src_offset"]) for r in rows] == [
        (d["event_id"], "AMOUNTS_DO_NOT_ADD_UP", 3, 17), (frame["event_id"], "TRUNCATED_FRAME", 3, 18)]
    assert rows[0]["field"] == "medfee_sumamt"
    assert rows[1]["field"] == ""
    for x in out.dead:
        back = codec.decode(codec.encode(DEADLETTER_RECORD, x))
        assert back.record == DEADLETTER_RECORD
        assert back.datum["event_id"] == x["event_id"]


@pytest.mark.parametrize("event_id", ["", "not-a-uuid"])
def test_event_without_a_uuid_is_dead_lettered(event_id: str, subsystems: dict[str, Subsystem], codec: Codec,
                                               events: list[SimEvent]) -> None:
    ev = next(e for e in events if e.record == SETTLEMENT)
    d = copy.deepcopy(ev.datum)
    d["event_id"] = event_id
    out = make_processor(subsystems, codec, "settlement").process([Message(0, 0, None, codec.encode(SETTLEMENT, d))])
    assert out.rows("settlements") == 0
    assert len(out.dead) == 1


def _procurement_value(codec: Codec, events: list[SimEvent]) -> bytes:
    ev = next(e for e in events if e.record in SUBJECT_RECORDS["procurement"])
    return codec.encode(ev.record, ev.datum)


@pytest.mark.parametrize(("kind", "expected"), [
    ("tombstone", "EMPTY_VALUE"),
    ("empty", "TRUNCATED_FRAME"),
    ("short_header", "TRUNCATED_FRAME"),
    ("header_only", "TRUNCATED_BODY"),
    ("bad_magic", "BAD_MAGIC"),
    ("unknown_schema", "UNKNOWN_SCHEMA_ID"),
    ("trailing", "TRAILING_BYTES"),
    ("other_subject", "WRONG_SUBJECT"),
])
def test_undecodable_inputs(kind: str, expected: str, subsystems: dict[str, Subsystem], codec: Codec,
                            events: list[SimEvent], sealer: Sealer) -> None:
    ev = next(e for e in events if e.record == SETTLEMENT)
    good = codec.encode(ev.record, ev.datum)
    value: bytes | None = {
        "tombstone": None,
        "empty": b"",
        "short_header": good[:4],
        "header_only": good[:5],
        "bad_magic": b"\x07" + good[1:],
        "unknown_schema": good[:1] + (999_999).to_bytes(4, "big") + good[5:],
        "trailing": good + b"\x00",
        "other_subject": _procurement_value(codec, events),
    }[kind]
    out = make_processor(subsystems, codec, "settlement").process(
        [Message(0, 0, b"k", good), Message(0, 1, b"k", value)])
    assert out.landed == Counter({"Settlement": 1})
    assert out.reasons == Counter({expected: 1})
    (d,) = out.dead
    assert d["reason_code"] == expected
    assert d["source_offset"] == 1
    assert d["event_type"] is None
    assert sealer.open(d["payload"]) == (value or b"")
    if kind == "unknown_schema":
        assert d["schema_id"] == 999_999


def test_oversized_input(subsystems: dict[str, Subsystem], events: list[SimEvent]) -> None:
    small = Codec(max_bytes=64)
    ev = next(e for e in events if e.record == SETTLEMENT)
    value = Codec().encode(ev.record, ev.datum)
    assert len(value) > 64
    out = make_processor(subsystems, small, "settlement").process([Message(0, 0, None, value)])
    assert out.reasons == Counter({"OVERSIZED": 1})


def test_frame_corruptions_get_their_reasons(subsystems: dict[str, Subsystem], codec: Codec,
                                             events: list[SimEvent]) -> None:
    rng = random.Random(3)
    msgs, expected = [], {}
    for i, ev in enumerate(of_stream(events, "settlement")[:120]):
        fn = FRAME_CORRUPTIONS[i % len(FRAME_CORRUPTIONS)]
        value, why = fn(codec, ev, rng)
        msgs.append(Message(0, i, ev.key.encode(), value))
        expected[i] = set(why.split("|"))
    out = make_processor(subsystems, codec, "settlement").process(msgs)
    assert len(out.dead) == len(msgs)
    for d in out.dead:
        assert d["reason_code"] in expected[d["source_offset"]]


# --- LandedIndex ---------------------------------------------------------------------------------


def _one_settlement(events: list[SimEvent]) -> SimEvent:
    return next(e for e in events if e.record == SETTLEMENT and len(e.datum["fee_details"]) >= 2)


def test_landed_rows_are_skipped_per_table(subsystems: dict[str, Subsystem], codec: Codec,
                                           events: list[SimEvent]) -> None:
    ev = _one_settlement(events)
    msg = Message(2, 40, ev.key.encode(), codec.encode(ev.record, ev.datum))
    proc = make_processor(subsystems, codec, "settlement")

    idx = LandedIndex()
    idx.load(2, {"settlements": {40: {ev.datum["event_id"]}}, "fee_details": {}})
    out = proc.process([msg], idx)
    assert out.rows("settlements") == 0
    assert out.rows("fee_details") == len(ev.datum["fee_details"])
    assert out.skipped_rows == Counter({"settlements": 1})
    assert out.landed["Settlement"] == 1  # accounted for, not lost

    idx = LandedIndex()
    idx.load(2, {"fee_details": {40: {ev.datum["setl_id"]}}})
    out = proc.process([msg], idx)
    assert out.rows("settlements") == 1
    assert out.rows("fee_details") == 0
    assert out.skipped_rows == Counter({"fee_details": 1})

    idx = LandedIndex()
    idx.load(2, {"settlements": {40: {ev.datum["event_id"]}}, "fee_details": {40: {ev.datum["setl_id"]}}})
    out = proc.process([msg], idx)
    assert out.tables == {}
    assert not out.dead


def test_a_different_event_at_a_landed_offset_is_not_skipped(subsystems: dict[str, Subsystem], codec: Codec,
                                                             events: list[SimEvent]) -> None:
    ev = _one_settlement(events)
    msg = Message(2, 40, ev.key.encode(), codec.encode(ev.record, ev.datum))
    proc = make_processor(subsystems, codec, "settlement")
    for per_table, partition in (
        ({"settlements": {40: {"00000000-0000-4000-8000-000000000000"}}, "fee_details": {40: {"ST-other"}}}, 2),
        ({"settlements": {41: {ev.datum["event_id"]}}, "fee_details": {39: {ev.datum["setl_id"]}}}, 2),
        ({"settlements": {40: {ev.datum["event_id"]}}, "fee_details": {40: {ev.datum["setl_id"]}}}, 1),
    ):
        idx = LandedIndex()
        idx.load(partition, per_table)
        out = proc.process([msg], idx)
        assert out.rows("settlements") == 1
        assert out.rows("fee_details") == len(ev.datum["fee_details"])
        assert not out.skipped_rows


def test_landed_dead_letters_are_skipped(subsystems: dict[str, Subsystem], codec: Codec, sealer: Sealer) -> None:
    proc = make_processor(subsystems, codec, "settlement")
    msgs = [Message(0, 5, None, b"\x01bad-frame"), Message(0, 6, None, b"\x01bad-frame")]
    idx = LandedIndex()
    idx.load(0, {DEAD_LETTER_TABLE: {5: {sealer.digest(b"\x01bad-frame")}}})
    out = proc.process(msgs, idx)
    assert [d["source_offset"] for d in out.dead] == [6]
    assert out.rows(DEAD_LETTER_TABLE) == 1
    assert out.skipped_rows == Counter({DEAD_LETTER_TABLE: 1})
    assert out.reasons == Counter({"BAD_MAGIC": 2})  # both accounted for
    # another payload at the landed offset is a different dead letter
    idx2 = LandedIndex()
    idx2.load(0, {DEAD_LETTER_TABLE: {5: {sealer.digest(b"\x01other")}}})
    assert len(proc.process(msgs, idx2).dead) == 2


def test_landed_index_advance_and_forget() -> None:
    idx = LandedIndex()
    assert not idx.active()
    assert not idx("settlements", 0, 1, "a")
    idx.load(0, {"settlements": {3: {"a"}, 7: {"b"}}, "fee_details": {5: {"s"}}})
    idx.load(1, {"settlements": {2: {"c"}}})
    assert idx.active()
    assert idx("settlements", 0, 3, "a") and idx("settlements", 0, 7, "b") and idx("fee_details", 0, 5, "s")
    assert not idx("settlements", 0, 3, "b")
    assert not idx("fee_details", 0, 3, "a")  # per table
    idx.advance(0, 6)  # below the horizon (7): still needed
    assert idx("settlements", 0, 7, "b")
    idx.advance(0, 7)
    assert not idx("settlements", 0, 7, "b")
    assert not idx("fee_details", 0, 5, "s")
    assert idx("settlements", 1, 2, "c")  # other partitions keep theirs
    assert idx.active()
    idx.advance(1, 100)
    assert not idx.active()
    # loading nothing for a partition forgets what it had
    idx.load(0, {"settlements": {3: {"a"}}})
    idx.load(0, {"settlements": {}, "fee_details": {}})
    assert not idx.active()


# --- age -----------------------------------------------------------------------------------------

SETL_AT = int(dt.datetime(2026, 10, 5, 0, 30, tzinfo=CN).timestamp() * 1000)  # 2026-10-04 16:30 UTC


def _days(d: dt.date) -> int:
    return (d - dt.date(1970, 1, 1)).days


@pytest.mark.parametrize(("brdy", "setl_ms", "age"), [
    (dt.date(1990, 10, 5), SETL_AT, 36),  # birthday today (China date), though still Oct 4 in UTC
    (dt.date(1990, 10, 6), SETL_AT, 35),  # birthday tomorrow
    (dt.date(1990, 10, 4), SETL_AT, 36),  # birthday yesterday
    (dt.date(1990, 10, 5), SETL_AT - 31 * 60_000, 35),  # 23:59 China time on Oct 4
    (dt.date(1990, 10, 5), int(dt.datetime(2026, 10, 5, 23, 59, tzinfo=CN).timestamp() * 1000), 36),
    (dt.date(2026, 10, 1), SETL_AT, 0),
    (dt.date(2000, 2, 29), int(dt.datetime(2026, 3, 1, 12, tzinfo=CN).timestamp() * 1000), 26),
])
def test_age_is_completed_years_at_the_china_date(brdy: dt.date, setl_ms: int, age: int,
                                                   subsystems: dict[str, Subsystem], codec: Codec,
                                                   events: list[SimEvent]) -> None:
    ev = next(e for e in events if e.record == SETTLEMENT and e.datum["med_type"] == "11")
    d = copy.deepcopy(ev.datum)
    d["brdy"] = _days(brdy)
    d["setl_time"] = setl_ms
    for line in d["fee_details"]:
        line["fee_ocur_time"] = setl_ms - 60_000
    out = make_processor(subsystems, codec, "settlement").process(
        [Message(0, 0, None, codec.encode(SETTLEMENT, d))])
    assert not out.dead, out.dead
    (row,) = rows_of(out, "settlements")
    assert row["age"] == age


def test_age_of_generated_settlements(settlement_out: Outcome, events: list[SimEvent]) -> None:
    rows = {r["event_id"]: r for r in rows_of(settlement_out, "settlements")}
    for ev in events:
        if ev.record != SETTLEMENT:
            continue
        b = dt.date(1970, 1, 1) + dt.timedelta(days=ev.datum["brdy"])
        s = dt.datetime.fromtimestamp(ev.datum["setl_time"] / 1000, CN).date()
        assert rows[ev.datum["event_id"]]["age"] == s.year - b.year - ((s.month, s.day) < (b.month, b.day))


def test_values_no_column_can_hold_are_dead_lettered_and_the_batch_lands(
    subsystems: dict[str, Subsystem], codec: Codec, events: list[SimEvent]
) -> None:
    """A quantity beyond its Decimal(16, 4) column, or beyond Int64 altogether (Avro longs decode
    to any size in Python), goes to the dead letters as OUT_OF_RANGE: were it inserted, the whole
    batch would fail, and fail again after every restart. The largest value that fits lands."""
    order = next(e for e in events if e.record == ORDER)
    too_big = {**order.datum, "event_id": str(uuid.uuid4()), "purc_cnt": 2**70}
    edge = {**order.datum, "event_id": str(uuid.uuid4()), "purc_cnt": 10**16 - 1, "purc_pric": 1_000_000,
            "purc_amt": ((10**16 - 1) * 1_000_000 + 50_000_000) // 100_000_000}
    msgs = [Message(0, i, order.key.encode(), codec.encode(ORDER, d))
            for i, d in enumerate([order.datum, too_big, edge])]
    out = make_processor(subsystems, codec, "procurement").process(msgs)
    assert [(d["source_offset"], d["reason_code"], d["field"]) for d in out.dead] == [(1, "OUT_OF_RANGE", "purc_cnt")]
    assert "does not fit proc_orders.purc_cnt Decimal(16, 4)" in out.dead[0]["reason_detail"]
    assert sorted(r["purc_cnt"] for r in rows_of(out, "proc_orders")) == sorted([order.datum["purc_cnt"], 10**16 - 1])

    setl = next(e for e in events if e.record == SETTLEMENT and len(e.datum["fee_details"]) > 1)
    bad = copy.deepcopy(setl.datum)
    bad["fee_details"][1]["cnt"] = 10**16
    out = make_processor(subsystems, codec, "settlement").process(
        [Message(0, 0, setl.key.encode(), codec.encode(SETTLEMENT, bad))])
    assert [(d["reason_code"], d["field"]) for d in out.dead] == [("OUT_OF_RANGE", "fee_details[1].cnt")]
    assert out.rows("settlements") == 0 and out.rows("fee_details") == 0


# --- poison pills: absurd but schema-valid values, and the size of everything sent ---------------------

def _string_fields(schema: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(lines field or None, field) for every string field of a record, fee lines included."""
    out: list[tuple[str | None, str]] = []
    for f in schema["fields"]:
        types = f["type"] if isinstance(f["type"], list) else [f["type"]]
        for t in types:
            if t == "string" or (isinstance(t, dict) and t.get("type") == "string"):
                out.append((None, f["name"]))
            elif isinstance(t, dict) and t.get("type") == "array" and isinstance(t["items"], dict) \
                    and t["items"].get("type") == "record":
                out += [(f["name"], g) for parent, g in _string_fields(t["items"]) if parent is None]
    return out


PILLS = {"long": "H" + "1" * 600_000, "long_controls": "\x01" * 250_000, "controls": "\x01" * 5, "nul": "ok\x00ok"}


@pytest.mark.parametrize("stream", STREAMS)
def test_a_pill_in_any_string_field_is_dead_lettered_and_every_message_fits_the_topic(
        stream: str, subsystems: dict[str, Subsystem], codec: Codec, events: list[SimEvent]) -> None:
    """600 kB, 250 kB of control characters and a NUL, in every string field of every record of
    the stream: each is dead-lettered for its length or its character, and nothing the worker
    would send (dead letters, with a 250 kB key too) exceeds MESSAGE_BUDGET."""
    proc = make_processor(subsystems, codec, stream)
    msgs, want = [], {}
    for record in SUBJECT_RECORDS[stream]:
        ev = next(e for e in events if e.record == record)
        for lines, fld in _string_fields(codec.record_schema(record)):
            for shape, pill in PILLS.items():
                d = copy.deepcopy(ev.datum)
                if lines is None:
                    d[fld] = pill
                elif d[lines]:
                    d[lines][-1][fld] = pill
                else:
                    continue
                i = len(msgs)
                key = b"k" * 250_000 if i % 3 == 0 else ev.key.encode()
                msgs.append(Message(i % 4, i, key, codec.encode(record, d)))
                want[i] = "FIELD_TOO_LONG" if shape.startswith("long") else "CONTROL_CHARACTER"
    out = proc.process(msgs)
    assert sum(out.landed.values()) == 0
    assert {d["source_offset"]: d["reason_code"] for d in out.dead} == want
    for d, k in zip(out.dead, out.dead_keys, strict=True):
        assert len(d["reason_detail"]) < 200 and "1111111111" not in d["reason_detail"]
        assert len(k) + len(codec.encode(DEADLETTER_RECORD, d)) <= MESSAGE_BUDGET
    assert out.rows(DEAD_LETTER_TABLE) == len(msgs)  # the table keeps every byte, sealed


def test_dead_letter_topic_copy_is_bounded_as_a_whole(sealer: Sealer, codec: Codec) -> None:
    base = {"event_id": "e", "reason_code": "FIELD_TOO_LONG", "reason_detail": "psn_name has 600,000 characters",
            "field": "psn_name", "source_topic": "t", "source_partition": 0, "source_offset": 1,
            "schema_id": 1, "event_type": "Settlement", "payload_digest": "d", "failed_at": 0}
    fits = {**base, "payload": b"p" * 600_000, "source_key": b"k" * 200_000}
    assert fit_for_topic(fits) is fits  # 800 kB in all: sent whole
    both = {**base, "payload": b"p" * 850_000, "source_key": b"k" * 250_000}  # each fits, together not
    sent = fit_for_topic(both)
    assert (sent["payload"], sent["source_key"]) == (b"", both["source_key"])
    assert sent["reason_detail"].endswith("[sealed payload too large for the topic: kept in the dead_letters "
                                          "table only]")
    huge_key = fit_for_topic({**base, "payload": b"p" * 950_000, "source_key": b"k" * 950_000})
    assert (huge_key["payload"], huge_key["source_key"]) == (b"", None)
    for d in (sent, huge_key):
        assert len(codec.encode(DEADLETTER_RECORD, d)) <= MESSAGE_BUDGET


def test_clip_marks_what_it_cut() -> None:
    assert clip("abc", 5) == "abc"
    assert clip("x" * 10_007, 10) == "x" * 10 + "… [9,997 more characters]"
