"""The columnar row builders (streams.rows_columnar) against the record path (streams.base): for the
same valid events, as a raw frame and as dicts, the same columns, value for value and type for type.

Events are realistic ones (the bench's settlements, the simulator's other records) with fields
replaced by generated values, or generated whole from the Avro schema: nulls, empty and CJK
strings, the integer types' extremes, birth dates on Feb 29 and at month ends, settlement times
around China midnight, negative epoch values, no lines and many lines.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing.parametric import dataframes

from schemas import SUBJECT_RECORDS, Codec
from schemas.calendar import CHINA_OFFSET_MS, DAY_MS, EPOCH_ORDINAL
from schemas.columnar import raw_frame
from streams import procurement, settlement, supervision
from streams.base import (
    ColumnPlan,
    Columns,
    Datum,
    RecordSpec,
    TableMapping,
    Twinned,
    compile_plan,
    constant,
    from_field,
    from_parent,
    negated,
    parent_token,
    token_of,
)
from streams.config import ValidationConfig
from streams.privacy import Pseudonymizer
from streams.rows_columnar import ColumnarPlan, compile_columnar_plan, frame_dicts
from streams.validation import Limits
from yibao.bench import _settlements
from yibao.sim.generator import SimConfig, TrafficGenerator

NS = "cn.nhsa.yibao.settlement"
SETTLEMENT = f"{NS}.Settlement"
SUBJECTS = ("settlement", "procurement", "supervision")
KEY = bytes.fromhex("5a" * 32)
VALIDATION = ValidationConfig(frozenset({"310", "390"}), frozenset({"11", "14", "21", "41"}), 300, 2018)
SUBSYSTEMS = {m.__name__.rsplit(".", 1)[-1]: m.build(VALIDATION, lambda: Limits.from_settings(300, 2018))
              for m in (settlement, procurement, supervision)}
SPECS: dict[str, RecordSpec] = {s.record: s for sub in SUBSYSTEMS.values() for s in sub.records}
CODEC = Codec()

#: Mappings no module declares, so that every helper's twin meets nulls, absent fields, extremes and
#: both kinds of table (event and line).
EXTRA_MAPPINGS: dict[str, tuple[TableMapping, ...]] = {
    SETTLEMENT: (
        TableMapping("settlements", overrides={
            "psn_token": token_of("psn_name", "name"),
            "drg_code": token_of("no_such_field"),
            "rea": from_field("psn_name"),
            "init_setl_id": from_field("no_such_field"),
            "line_count": from_field("setl_time", ms_to_s=True),
            "medfee_sumamt": negated("hifp_pay"),
            "hosp_lv": constant("9"),
        }),
        TableMapping("fee_details", lines="fee_details", overrides={
            "psn_token": parent_token("psn_name"),
            "hilist_name": token_of("bilg_dr_code", "dr"),
            "bilg_dr_code": from_field("bilg_dr_code"),
            "insu_admdvs": from_field("no_such_field"),
            "setl_time": from_field("fee_ocur_time", ms_to_s=True),
            "medc_days": from_parent("brdy"),
            "fixmedins_code": from_parent("dscg_date"),
            "cnt": negated("cnt"),
            "med_type": constant(None),
        }),
    ),
}

# --- values ---------------------------------------------------------------------------------------

MIN_DAY = dt.date.min.toordinal() - EPOCH_ORDINAL
MAX_DAY = dt.date.max.toordinal() - EPOCH_ORDINAL
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def _day(d: dt.date) -> int:
    return d.toordinal() - EPOCH_ORDINAL


#: Birthdays and settlement dates where a completed year turns: Feb 29, month ends, year ends.
SPECIAL_DAYS = sorted({_day(dt.date(y, m, d)) for y in (1, 4, 1900, 1904, 1960, 1969, 1970, 2000, 2023, 2024, 9999)
                       for m, d in ((2, 28), (2, 29), (3, 1), (1, 31), (4, 30), (12, 31), (1, 1))
                       if not (m == 2 and d == 29 and (y % 4 or (y % 100 == 0 and y % 400)))})
DAYS = st.one_of(st.sampled_from(SPECIAL_DAYS), st.integers(MIN_DAY, MAX_DAY), st.integers(-30_000, 30_000))
#: The epoch ms whose China date ``datetime.date`` can hold (where the age is defined).
MIN_MS, MAX_MS = MIN_DAY * DAY_MS - CHINA_OFFSET_MS, (MAX_DAY + 1) * DAY_MS - CHINA_OFFSET_MS - 1
#: China midnight of a day, give or take a millisecond or a few hours (UTC midnight is 08:00 there).
NEAR_MIDNIGHT = st.builds(lambda day, delta: min(MAX_MS, max(MIN_MS, day * DAY_MS - CHINA_OFFSET_MS + delta)),
                          st.one_of(st.sampled_from(SPECIAL_DAYS), st.integers(-30_000, 30_000)),
                          st.sampled_from([0, -1, 1, -CHINA_OFFSET_MS, CHINA_OFFSET_MS - 1, DAY_MS - 1, 999, -999]))
DATED_MS = st.one_of(NEAR_MIDNIGHT, st.sampled_from([MIN_MS, MAX_MS]), st.integers(MIN_MS, MAX_MS))
CJK = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=12)
TEXT = st.one_of(st.just(""), st.text(max_size=12), CJK, st.sampled_from(["普通门诊诊查费", "H44030500001", "310"]))


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([lo, hi, 0, -1, 1]), st.integers(lo, hi))


def _named(schema: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(schema, list):
        for s in schema:
            _named(s, out)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed"):
            out[schema["name"]] = schema
            if "namespace" in schema:
                out[f"{schema['namespace']}.{schema['name']}"] = schema
        for f in schema.get("fields", ()):
            _named(f["type"], out)
        for k in ("type", "items"):
            if isinstance(schema.get(k), dict | list):
                _named(schema[k], out)
    return out


def _values(schema: Any, named: dict[str, Any], dated: bool = False) -> st.SearchStrategy[Any]:
    """Raw values (as Codec.decode gives them) of an Avro type; ``dated``: ms with a China date."""
    if isinstance(schema, list):
        branches = [_values(s, named, dated) for s in schema if s != "null"]
        return st.one_of(st.none(), *branches) if "null" in schema else st.one_of(*branches)
    if isinstance(schema, str):
        if schema in named:
            return _values(named[schema], named, dated)
        schema = {"type": schema}
    t = schema["type"]
    if isinstance(t, dict | list):
        return _values(t, named, dated)
    lt = schema.get("logicalType")
    if lt == "date":
        return DAYS
    if lt == "timestamp-millis":
        return DATED_MS if dated else st.one_of(DATED_MS, _ints(*INT64))
    if lt == "decimal":
        return _ints(*INT64)
    if t == "string":
        return TEXT
    if t == "enum":
        return st.sampled_from(schema["symbols"])
    if t == "int":
        return _ints(*INT32)
    if t == "long":
        return _ints(*INT64)
    if t == "boolean":
        return st.booleans()
    if t == "array":
        items = _values(schema["items"], named)
        return st.lists(items, max_size=25 if isinstance(schema["items"], dict) else 4)
    if t == "record":
        return st.fixed_dictionaries({f["name"]: _values(f["type"], named) for f in schema["fields"]})
    raise AssertionError(f"no strategy for {schema!r}")


def _field_values(record: str) -> dict[str, st.SearchStrategy[Any]]:
    schema = CODEC.record_schema(record)
    named = _named(schema, {})
    # a settlement's age is defined for China dates that datetime.date can hold
    return {f["name"]: _values(f["type"], named, dated=record == SETTLEMENT and f["name"] == "setl_time")
            for f in schema["fields"]}


FIELD_VALUES = {r: _field_values(r) for r in SPECS}


@cache
def _realistic() -> dict[str, list[Datum]]:
    """Decoded events of every record: the bench's settlements (≈10 lines each) and the simulator's."""
    out: dict[str, list[Datum]] = {r: [] for r in SPECS}
    frames, _ = _settlements(40, 7, 10.0)
    for f in frames:
        assert f.value is not None
        dec = CODEC.decode(f.value)
        out[dec.record].append(dec.datum)
    config = SimConfig(settlements=300, days=30, reversal_rate=0.1, filing_rate=0.1, inspection_rate=0.05,
                       tip_rate=0.05)
    for ev in TrafficGenerator(config).events():
        if len(out[ev.record]) < 40:
            out[ev.record].append(CODEC.decode(CODEC.encode(ev.record, ev.datum)).datum)
    return out


@st.composite
def events(draw: st.DrawFn, record: str) -> Datum:
    """A realistic event with a few fields replaced, or one generated whole."""
    fields = FIELD_VALUES[record]
    real = _realistic()[record]
    if draw(st.booleans()) and real:
        datum = dict(draw(st.sampled_from(real)))
        for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=4)):
            datum[name] = draw(fields[name])
        return datum
    return {name: draw(values) for name, values in fields.items()}


@st.composite
def batches(draw: st.DrawFn, record: str) -> tuple[list[Datum], list[int], list[int]]:
    data = draw(st.lists(events(record), max_size=6))
    n = len(data)
    parts = draw(st.lists(st.integers(0, 2**16 - 1), min_size=n, max_size=n))
    offs = draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n))
    return data, parts, offs


# --- comparing -----------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def assert_same_columns(expected: Columns, got: Columns, where: str) -> None:
    """``got`` is ``expected``: same columns in the same order, same values of the same types."""
    assert list(got) == list(expected), f"{where}: columns differ"
    for col, want in expected.items():
        have = got[col]
        assert len(have) == len(want), f"{where}.{col}: {len(have)} values, record path {len(want)}"
        for i, (a, b) in enumerate(zip(want, have, strict=True)):
            assert _same(a, b), (f"{where}.{col}[{i}]: record path {a!r} ({type(a).__name__}), "
                                 f"columnar {b!r} ({type(b).__name__})")


def _mappings(record: str) -> tuple[TableMapping, ...]:
    return SPECS[record].tables + EXTRA_MAPPINGS.get(record, ())


@cache
def _plans(record: str) -> list[tuple[str, ColumnPlan, ColumnarPlan | None]]:
    schema = CODEC.record_schema(record)
    return [(f"{m.table}{'' if m in SPECS[record].tables else ' (extra)'}", compile_plan(m, schema),
             compile_columnar_plan(m, schema)) for m in _mappings(record)]


def _check(record: str, data: list[Datum], parts: list[int], offs: list[int], pseudo: Pseudonymizer) -> None:
    frame = raw_frame(CODEC.record_schema(record), data)
    for where, plan, cplan in _plans(record):
        if cplan is None:
            continue
        assert_same_columns(plan.build(data, parts, offs, pseudo), cplan.build(frame, parts, offs, pseudo), where)


# --- tests ---------------------------------------------------------------------------------------

ALL_RECORDS = [r for s in SUBJECTS for r in SUBJECT_RECORDS[s]]
#: the hypothesis settings of the tests over generated batches of every record
OVER_BATCHES = settings(max_examples=40, deadline=None, print_blob=True, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
PSEUDO = Pseudonymizer(KEY, "t1")


def test_every_settlement_record_and_only_an_override_without_twin_leaves_the_columnar_path() -> None:
    for record in ALL_RECORDS:
        for m in _mappings(record):
            plan = compile_columnar_plan(m, CODEC.record_schema(record))
            untwinned = [c for c, fn in m.overrides.items() if not isinstance(fn, Twinned)]
            assert (plan is None) == bool(untwinned), (record, m.table, untwinned)
            if record in SUBJECT_RECORDS["settlement"]:
                assert plan is not None, (record, m.table)


def test_a_plain_function_override_has_no_columnar_plan() -> None:
    def reversed_ids(ds: Sequence[Datum], ctx: Any) -> list[Any]:
        return [d["setl_id"][::-1] for d in ds]

    m = TableMapping("settlements", overrides={"setl_id": reversed_ids})
    assert compile_columnar_plan(m, CODEC.record_schema(SETTLEMENT)) is None
    assert dict(compile_plan(m, CODEC.record_schema(SETTLEMENT)).fns)["setl_id"] is reversed_ids


def test_the_record_path_runs_the_very_function_a_twin_wraps() -> None:
    spec = SPECS[SETTLEMENT]
    fns = dict(compile_plan(spec.tables[0], CODEC.record_schema(SETTLEMENT)).fns)
    age = spec.tables[0].overrides["age"]
    assert isinstance(age, Twinned)
    assert fns["age"] is age.fn


@pytest.mark.parametrize("record", ALL_RECORDS, ids=lambda r: r.rsplit(".", 1)[-1])
@OVER_BATCHES
@given(data=st.data())
def test_columnar_columns_are_the_record_paths(record: str, data: st.DataObject) -> None:
    evs, parts, offs = data.draw(batches(record), label="batch")
    _check(record, evs, parts, offs, PSEUDO)


@settings(max_examples=150, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(birth=DAYS, at=DATED_MS)
def test_age_matches_around_birthdays_and_china_midnight(birth: int, at: int) -> None:
    base = _realistic()[SETTLEMENT][0]
    times = [at, max(MIN_MS, at - 1), min(MAX_MS, at + 1)]
    _check(SETTLEMENT, [{**base, "brdy": birth, "setl_time": t} for t in times], [0, 1, 2], [7, 8, 9], PSEUDO)


@pytest.mark.parametrize("record", ALL_RECORDS, ids=lambda r: r.rsplit(".", 1)[-1])
def test_zero_events(record: str) -> None:
    _check(record, [], [], [], PSEUDO)
    for _, _, cplan in _plans(record):
        if cplan is not None:
            cols = cplan.build(raw_frame(CODEC.record_schema(record), []), [], [], PSEUDO)
            assert cols and all(v == [] for v in cols.values())


def test_a_line_table_of_events_without_lines() -> None:
    data = [{**d, "fee_details": []} for d in _realistic()[SETTLEMENT][:5]]
    _check(SETTLEMENT, data, [1] * 5, list(range(5)), PSEUDO)
    plan = compile_columnar_plan(SPECS[SETTLEMENT].tables[1], CODEC.record_schema(SETTLEMENT))
    assert plan is not None and plan.lines == "fee_details"
    cols = plan.build(raw_frame(CODEC.record_schema(SETTLEMENT), data), [1] * 5, list(range(5)), PSEUDO)
    assert all(v == [] for v in cols.values())


def test_lines_of_events_with_and_without_lines_keep_their_parents() -> None:
    real = _realistic()[SETTLEMENT]
    data = [{**real[0], "fee_details": []}, real[1], {**real[2], "fee_details": []}, real[3]]
    _check(SETTLEMENT, data, [3, 1, 4, 1], [5, 9, 2, 6], PSEUDO)


class CountingPseudonymizer(Pseudonymizer):
    """Counts token calls by (value, domain)."""

    def __init__(self) -> None:
        super().__init__(KEY, "t1")
        self.calls: Counter[tuple[str | None, str]] = Counter()

    def token(self, value: str | None, domain: str = "psn") -> str:
        self.calls[value, domain] += 1
        return super().token(value, domain)


def _build_counting(mapping: TableMapping, data: list[Datum]) -> Counter[tuple[str | None, str]]:
    plan = compile_columnar_plan(mapping, CODEC.record_schema(SETTLEMENT))
    assert plan is not None
    pseudo = CountingPseudonymizer()
    n = len(data)
    expected = compile_plan(mapping, CODEC.record_schema(SETTLEMENT)).build(data, [0] * n, list(range(n)), PSEUDO)
    got = plan.build(raw_frame(CODEC.record_schema(SETTLEMENT), data), [0] * n, list(range(n)), pseudo)
    assert_same_columns(expected, got, mapping.table)
    return pseudo.calls


def test_tokens_are_computed_once_per_distinct_value() -> None:
    real = _realistic()[SETTLEMENT][:10]
    # each person settles three times; some have no name
    data = [{**d, "psn_name": None if i % 3 else d["psn_name"]} for d in real for i in range(3)]
    persons = {d["psn_no"] for d in data}
    assert len(data) > len(persons)
    for m in SPECS[SETTLEMENT].tables:
        assert _build_counting(m, data) == Counter({(p, "psn"): 1 for p in persons}), m.table
    names = {d["psn_name"] for d in data}
    assert None in names
    for m in EXTRA_MAPPINGS[SETTLEMENT]:
        calls = _build_counting(m, data)
        assert set(calls.values()) == {1}, (m.table, calls)
        if m.lines is None:
            assert {v for v, dom in calls if dom == "name"} == names
            assert calls[None, "psn"] == 1  # the absent field: one call, for None


def test_copied_text_goes_to_the_sink_as_the_events_utf8_bytes() -> None:
    """Both builders hand the sink a settlement's text (codes, Chinese names, the parent's keys on
    each line, the person's token) as UTF-8 bytes of exactly the event's strings."""
    real = _realistic()[SETTLEMENT][:20]
    data = [{**d, "fee_details": [{**ln, "hilist_name": f"阿莫西林胶囊\t{i}"} for i, ln in enumerate(d["fee_details"])]}
            for d in real]
    n = len(data)
    lines = [ln for d in data for ln in d["fee_details"]]
    parents = [d for d in data for _ in d["fee_details"]]
    tokens = [PSEUDO.token(d["psn_no"], "psn").encode() for d in parents]
    for m in SPECS[SETTLEMENT].tables[:2]:
        plan = compile_columnar_plan(m, CODEC.record_schema(SETTLEMENT))
        assert plan is not None
        for cols in (compile_plan(m, CODEC.record_schema(SETTLEMENT)).build(data, [0] * n, list(range(n)), PSEUDO),
                     plan.build(raw_frame(CODEC.record_schema(SETTLEMENT), data), [0] * n, list(range(n)), PSEUDO)):
            if m.lines is None:
                assert cols["setl_id"] == [d["setl_id"].encode() for d in data]
                assert cols["insu_admdvs"] == [d["insu_admdvs"].encode() for d in data]
                continue
            assert cols["hilist_name"] == [ln["hilist_name"].encode() for ln in lines]
            assert cols["hilist_code"] == [ln["hilist_code"].encode() for ln in lines]
            assert cols["setl_id"] == [d["setl_id"].encode() for d in parents]
            assert cols["med_type"] == [d["med_type"].encode() for d in parents]
            assert cols["psn_token"] == tokens


def test_a_frame_not_in_the_raw_representation_is_refused() -> None:
    plan = compile_columnar_plan(SPECS[SETTLEMENT].tables[0], CODEC.record_schema(SETTLEMENT))
    assert plan is not None
    frame = raw_frame(CODEC.record_schema(SETTLEMENT), _realistic()[SETTLEMENT][:2])
    with pytest.raises(ValueError, match="brdy Date"):
        plan.build(frame.with_columns(frame["brdy"].cast(pl.Date)), [0, 0], [1, 2], PSEUDO)
    with pytest.raises(ValueError, match="2 events but 1 partitions"):
        plan.build(frame, [0], [1], PSEUDO)
    assert plan.build(frame.select(reversed(frame.columns)), [0, 0], [1, 2], PSEUDO) == \
        plan.build(frame, [0, 0], [1, 2], PSEUDO)


# --- the engine's dicts --------------------------------------------------------------------------


def _projected(datum: Datum, fields: frozenset[str], schema: pl.Schema) -> Datum:
    """``datum`` of ``fields`` alone, a list of records' fields named as ``list.field``."""
    out: Datum = {}
    for name, value in datum.items():
        dtype = schema[name]
        nested = isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)
        parts = {f[len(name) + 1:] for f in fields if f.startswith(name + ".")} if nested else set()
        if name in fields:
            out[name] = value
        elif parts:
            out[name] = None if value is None else [
                None if r is None else {k: v for k, v in r.items() if k in parts} for r in value]
    return out


@pytest.mark.parametrize("record", ALL_RECORDS, ids=lambda r: r.rsplit(".", 1)[-1])
@OVER_BATCHES
@given(data=st.data())
def test_the_engines_dicts_are_the_frames_rows(record: str, data: st.DataObject) -> None:
    """frame_dicts gives what DataFrame.to_dicts gives, whole or of any choice of fields."""
    evs, _, _ = data.draw(batches(record), label="batch")
    frame = raw_frame(CODEC.record_schema(record), evs)
    rows = frame.to_dicts()
    assert _same(frame_dicts(frame), rows)
    nested = [f"{n}.{s.name}" for n, d in frame.schema.items()
              if isinstance(d, pl.List) and isinstance(d.inner, pl.Struct) for s in d.inner.fields]
    fields = frozenset(data.draw(st.sets(st.sampled_from([*frame.columns, *nested, "no_such_field"])),
                                 label="fields"))
    assert _same(frame_dicts(frame, fields), [_projected(r, fields, frame.schema) for r in rows])


@settings(max_examples=150, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(frame=dataframes(min_cols=1, max_cols=4, max_size=8, allowed_dtypes=[
    pl.Int64, pl.String, pl.List(pl.String),
    pl.List(pl.Struct({"a": pl.Int64, "b": pl.String})),
    pl.List(pl.Struct({"c": pl.List(pl.Int32), "d": pl.Boolean})),
]))
def test_the_engines_dicts_keep_null_and_empty_lists_and_null_records(frame: pl.DataFrame) -> None:
    """Frames no schema of ours makes: null lists, empty lists, null records inside a list."""
    rows = frame.to_dicts()
    assert _same(frame_dicts(frame), rows)
    some = frozenset(n for i, n in enumerate(frame.columns) if i % 2 == 0) | {
        f"{n}.a" for n in frame.columns} | {f"{n}.d" for n in frame.columns}
    assert _same(frame_dicts(frame, some), [_projected(r, some, frame.schema) for r in rows])

