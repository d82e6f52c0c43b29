"""The columnar validation mask (streams.validation_columnar) against the record validator.

The one hard rule is soundness: a row the mask accepts is a row whose datum (``frame.to_dicts()[i]``)
the record path's compiled checks accept. It is tested on realistic events broken on purpose, aimed
at every check (blanks, Unicode whitespace and digits, control characters, over-long strings,
boundaries, nulls, values whose 64-bit arithmetic would wrap), and check by check at each boundary.
Completeness (valid events take the fast path) is tested on generated traffic.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import Codec
from schemas.calendar import CHINA_OFFSET_MS, DAY_MS
from schemas.columnar import raw_frame, raw_polars_schema
from streams import procurement, settlement, supervision
from streams.base import RecordSpec, Subsystem, record_checks
from streams.config import ValidationConfig
from streams.validation import (
    CODE_PATTERNS,
    AmountMatches,
    AtMost,
    BirthDate,
    CheckBase,
    Code,
    DateOrder,
    Each,
    EachString,
    EventId,
    EventTime,
    Fits,
    Limits,
    LinesSumTo,
    NonNegative,
    NotBlank,
    OneOf,
    Positive,
    Predicate,
    Region,
    RequiredWhen,
    SumsTo,
    Text,
    Validator,
    compile_checks,
)
from streams.validation_columnar import MaskFn, compile_mask
from yibao.settings import load_settings
from yibao.sim.generator import SimConfig, SimEvent, TrafficGenerator

NS = "cn.nhsa.yibao.settlement"
SETTLEMENT, REVERSAL, FILING = f"{NS}.Settlement", f"{NS}.SettlementReversal", f"{NS}.CrossProvinceFiling"
SETTLEMENT_RECORDS = (SETTLEMENT, REVERSAL, FILING)
I64 = (-(2**63), 2**63 - 1)
I32 = (-(2**31), 2**31 - 1)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validation(tmp_path_factory: pytest.TempPathFactory) -> ValidationConfig:
    """The default settings: no YIBAO_* variable or .env file of the developer's shell counts."""
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("YIBAO_"):
                mp.delenv(k)
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        return load_settings().validation()


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


@pytest.fixture(scope="module")
def bench_settlements(codec: Codec) -> list[dict[str, Any]]:
    """The benchmark's reference load: ~10 fee lines per settlement, anomalies planted."""
    from yibao.bench import _settlements

    frames, _ = _settlements(2000, 7, 10.0)
    return [codec.decode(f.value).datum for f in frames if f.value is not None]


@pytest.fixture(scope="module")
def stream() -> list[SimEvent]:
    return list(TrafficGenerator(SimConfig(settlements=3000, seed=11)).events())


@pytest.fixture(scope="module")
def limits(bench_settlements: list[dict[str, Any]], stream: list[SimEvent],
           validation: ValidationConfig) -> Limits:
    """A fixed clock just after the last event, so that the mask and the validator agree on it."""
    last = max(max(d["setl_time"] for d in bench_settlements), max(e.time_ms for e in stream))
    return Limits.from_settings(validation.max_future_skew_s, validation.min_event_year, now_ms=last + DAY_MS)


@pytest.fixture(scope="module")
def subsystems(validation: ValidationConfig, limits: Limits) -> dict[str, Subsystem]:
    return {m.__name__.rsplit(".", 1)[-1]: m.build(validation, lambda: limits)
            for m in (settlement, procurement, supervision)}


@pytest.fixture(scope="module")
def specs(subsystems: dict[str, Subsystem]) -> dict[str, RecordSpec]:
    return {s.record: s for sub in subsystems.values() for s in sub.records}


class Record:
    """One record's checks, compiled both ways, and its frame schema."""

    def __init__(self, spec: RecordSpec, codec: Codec) -> None:
        self.name = spec.record
        self.schema = codec.record_schema(spec.record)
        self.polars = raw_polars_schema(self.schema)
        self.checks = record_checks(spec, self.schema)
        self.validator: Validator = compile_checks(self.checks, spec.short_name)
        mask = compile_mask(self.checks)
        assert mask is not None, f"{spec.record}: no columnar mask"
        self.mask: MaskFn = mask
        text = self.checks[0]
        assert isinstance(text, Text)
        self.most = {f: most for f, most, _ in text.fields}
        self.line_most = {f: most for f, most, _ in text.lines[0][1].fields} if text.lines else {}

    def __repr__(self) -> str:
        return f"Record({self.name})"

    def frame(self, datums: Sequence[dict[str, Any]]) -> pl.DataFrame:
        return raw_frame(self.schema, datums)

    def assert_sound(self, datums: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """mask[i] ⇒ validator(row i) is None, for every row; (rows accepted by each)."""
        frame = self.frame(datums)
        mask = self.mask(frame)
        assert mask.dtype == pl.Boolean and mask.len() == frame.height and mask.null_count() == 0
        rows = frame.to_dicts()
        verdicts = [self.validator(r) for r in rows]
        for row, ok, v in zip(rows, mask.to_list(), verdicts, strict=True):
            assert not ok or v is None, f"{self.name}: the mask accepts an event the validator rejects: {v}\n{row!r}"
        return int(mask.sum()), sum(v is None for v in verdicts)


@pytest.fixture(scope="module")
def records(specs: dict[str, RecordSpec], codec: Codec) -> dict[str, Record]:
    return {name: Record(spec, codec) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def pools(records: dict[str, Record], bench_settlements: list[dict[str, Any]],
          stream: list[SimEvent]) -> dict[str, list[dict[str, Any]]]:
    """Valid events of each record to break: the benchmark's settlements, the generator's others."""
    out: dict[str, list[dict[str, Any]]] = {SETTLEMENT: bench_settlements[:300]}
    for ev in stream:
        if ev.record != SETTLEMENT and records[ev.record].validator(ev.datum) is None:
            out.setdefault(ev.record, []).append(ev.datum)
    return out


# --- mutations ---------------------------------------------------------------------------------

NASTY_STRINGS = ["", " ", "   ", "\u3000", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0",
                 "\u1680", "\u2007", "\u2028", "\u202f", "\u205f", "\u180e", "\u200b", "\ufeff", "\x00", "\x7f",
                 "\x9f", "\xad", "é", "中", "x"]
CONTROL_CHARS = ["\x00", "\x01", "\x08", "\t", "\n", "\r", "\x1b", "\x1f", "\x7f", "\x80", "\x85", "\x9f"]
FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
DEVANAGARI = str.maketrans("0123456789", "०१२३४५६७८९")


def string_variants(rng: random.Random, v: str | None, most: int) -> list[str | None]:
    s = v if v else "H45012400011"
    i = rng.randrange(len(s) + 1)
    alphabet = "0123456789ABCDEFHPXZxhpd.-_ \t\n\x00\x1f\x85\u3000中é"
    return [
        None, "", rng.choice(NASTY_STRINGS), rng.choice(NASTY_STRINGS) * rng.randint(1, 3),
        s.translate(FULL_WIDTH), s.translate(ARABIC), s.translate(DEVANAGARI),
        s + "\n", "\n" + s, s + " ", " " + s, s + "\u3000", s.lower(), s.upper(), s.swapcase(), s[:-1], s[1:],
        s + "0", s + "A", s[:i] + rng.choice(CONTROL_CHARS) + s[i:], s[:i] + rng.choice(alphabet) + s[i + 1:],
        "x" * most, "x" * (most + 1), "中" * most, "中" * (most + 1), "\t" * most,
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))),
    ]


def int_variants(rng: random.Random, v: int | None, bounds: tuple[int, int], lim: Limits) -> list[int | None]:
    x = v if v is not None else 0
    lo, hi = bounds
    out = [None, 0, -1, 1, x - 1, x + 1, x - 2, x + 2, -x, x * 100, lo, hi, lo + 1, hi - 1, 2**62, -(2**62),
           10**16 - 1, 10**16, -(10**16), 2**32, 65535, 65536, x + DAY_MS, x - DAY_MS, x + 1000,
           lim.now_ms + lim.max_future_skew_ms, lim.now_ms + lim.max_future_skew_ms + 1,
           lim.min_event_ms, lim.min_event_ms - 1, rng.randint(lo, hi)]
    return [y for y in out if y is None or lo <= y <= hi]


def dtype_bounds(dt: pl.DataType) -> tuple[int, int]:
    return I32 if dt == pl.Int32 else I64


class Mutator:
    """Breaks a valid datum of one record in one of many ways aimed at its checks."""

    def __init__(self, record: Record, lim: Limits, pool: Sequence[dict[str, Any]]) -> None:
        self.r = record
        self.lim = lim
        self.pool = pool
        self.fields = list(record.polars.items())
        lines = record.polars.get("fee_details")
        self.line_fields: list[tuple[str, pl.DataType]] = []
        if isinstance(lines, pl.List) and isinstance(lines.inner, pl.Struct):
            self.line_fields = [(f.name, f.dtype) for f in lines.inner.fields]  # type: ignore[misc]

    def value(self, rng: random.Random, v: Any, dt: pl.DataType, most: int) -> Any:
        if dt == pl.String:
            return rng.choice(string_variants(rng, v, most))
        if dt in (pl.Int32, pl.Int64):
            return rng.choice(int_variants(rng, v, dtype_bounds(dt), self.lim))
        if dt == pl.Boolean:
            return rng.choice([None, True, False])
        if isinstance(dt, pl.List) and dt.inner == pl.String:
            good = rng.choice(["36.0700", "36.0700x001", "81234560123456789012"])
            return rng.choice([None, [], [good], [good, None], [None], [rng.choice(string_variants(rng, good, 50))],
                               [good, rng.choice(string_variants(rng, good, 50))]])
        if isinstance(dt, pl.List):
            return rng.choice([None, [], [None], v[:1] if v else v])
        return v

    def __repr__(self) -> str:
        return f"Mutator({self.r.name})"

    def mutate(self, rng: random.Random, d: dict[str, Any]) -> dict[str, Any]:
        d = copy.deepcopy(d)
        for _ in range(1 + (rng.random() < 0.35) + (rng.random() < 0.1)):
            rng.choice(self.ops())(rng, d)
        self.fit(d, self.fields)
        for line in d.get("fee_details") or ():
            if line is not None:
                self.fit(line, self.line_fields)
        return d

    @staticmethod
    def fit(d: dict[str, Any], fields: Sequence[tuple[str, pl.DataType]]) -> None:
        """Clamp integers to their column (a frame cannot hold more; the checks see the bound)."""
        for name, dt in fields:
            v = d.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and dt in (pl.Int32, pl.Int64):
                lo, hi = dtype_bounds(dt)
                d[name] = min(max(v, lo), hi)

    def ops(self) -> list[Callable[[random.Random, dict[str, Any]], None]]:
        ops: list[Callable[[random.Random, dict[str, Any]], None]] = [
            self.any_field, self.any_field, self.any_field, self.time_edges, self.swap_from_pool]
        names = {n for n, _ in self.fields}
        if "medfee_sumamt" in names:
            ops += [self.sums_off, self.sums_wrap, self.inscp_above, self.negative_amount]
        if "brdy" in names:
            ops += [self.birth_edges]
        if "med_type" in names:
            ops += [self.inpatient_without_stay]
        if self.line_fields:
            ops += [self.any_line_field, self.any_line_field, self.line_amounts, self.line_wrap, self.lines_shape]
        if "begndate" in names or "adm_date" in names or "init_setl_time" in names:
            ops += [self.date_order]
        return ops

    def any_field(self, rng: random.Random, d: dict[str, Any]) -> None:
        name, dt = rng.choice(self.fields)
        d[name] = self.value(rng, d.get(name), dt, self.r.most.get(name, 50))

    def any_line_field(self, rng: random.Random, d: dict[str, Any]) -> None:
        lines = d.get("fee_details")
        if not lines:
            return
        i = rng.randrange(len(lines))
        if lines[i] is None:
            return
        name, dt = rng.choice(self.line_fields)
        lines[i][name] = self.value(rng, lines[i].get(name), dt, self.r.line_most.get(name, 50))

    def swap_from_pool(self, rng: random.Random, d: dict[str, Any]) -> None:
        """A field of another valid event: mostly still valid, sometimes not (totals, dates)."""
        other = rng.choice(self.pool)
        name, _ = rng.choice(self.fields)
        d[name] = copy.deepcopy(other.get(name))

    def time_edges(self, rng: random.Random, d: dict[str, Any]) -> None:
        times = [n for n, dt in self.fields if dt == pl.Int64 and n.endswith("time")]
        if not times:
            return
        hi, lo = self.lim.now_ms + self.lim.max_future_skew_ms, self.lim.min_event_ms
        d[rng.choice(times)] = rng.choice([hi, hi + 1, lo, lo - 1, I64[0], I64[1], 0, -1, 2**32 * 1000])

    def sums_off(self, rng: random.Random, d: dict[str, Any]) -> None:
        name = rng.choice(["medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay", "hifp_pay", "hifmi_pay",
                           "hifob_pay", "maf_pay"])
        if d.get(name) is not None:
            d[name] += rng.choice([-2, -1, 1, 2, 10**12])

    def sums_wrap(self, rng: random.Random, d: dict[str, Any]) -> None:
        """Parts whose 64-bit sum wraps around to the total (the true sum is 2**64 off)."""
        total = rng.choice(["medfee_sumamt", "fund_pay_sumamt"])
        parts = (["fund_pay_sumamt", "acct_pay", "psn_cash_pay"] if total == "medfee_sumamt"
                 else ["hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay"])
        t = d.get(total) or 0
        d[parts[0]], d[parts[1]] = I64[1], I64[1]
        d[parts[2]] = t + 2 if t + 2 <= I64[1] else t
        for p in parts[3:]:
            d[p] = 0

    def inscp_above(self, rng: random.Random, d: dict[str, Any]) -> None:
        if d.get("medfee_sumamt") is not None:
            d["inscp_amt"] = d["medfee_sumamt"] + rng.choice([0, 1, 2])

    def negative_amount(self, rng: random.Random, d: dict[str, Any]) -> None:
        name, _ = rng.choice([f for f in self.fields if f[1] == pl.Int64 and not f[0].endswith("time")])
        d[name] = rng.choice([-1, -(2**63), -(10**16)])

    def birth_edges(self, rng: random.Random, d: dict[str, Any]) -> None:
        t = d.get("setl_time")
        if t is None:
            return
        day = (t + CHINA_OFFSET_MS) // DAY_MS
        oldest = day - math.ceil(130 * 365.2425)
        d["brdy"] = rng.choice([day, day + 1, day - 1, oldest, oldest + 1, oldest - 1, None, I32[0], I32[1]])

    def inpatient_without_stay(self, rng: random.Random, d: dict[str, Any]) -> None:
        d["med_type"] = rng.choice(["21", "22", "52", "11"])
        for name in rng.sample(["adm_date", "dscg_date", "dscg_maindiag_code", "drg_code"], rng.randint(0, 2)):
            if name in d:
                d[name] = rng.choice([None, "", " ", "\u3000", "\x1c"]) if name.endswith("code") else None

    def date_order(self, rng: random.Random, d: dict[str, Any]) -> None:
        if "begndate" in d:
            if d.get("begndate") is not None:
                d["enddate"] = d["begndate"] + rng.choice([-1, 0, 1, -(2**20)])
        elif "init_setl_time" in d:
            if d.get("setl_time") is not None:
                d["init_setl_time"] = d["setl_time"] + rng.choice([-1, 0, 1, 1000])
        elif d.get("setl_time") is not None:
            day = (d["setl_time"] + CHINA_OFFSET_MS) // DAY_MS
            d["dscg_date"] = day + rng.choice([0, 1, 2, -1])
            d["adm_date"] = d["dscg_date"] + rng.choice([-3, 0, 1])

    def line_amounts(self, rng: random.Random, d: dict[str, Any]) -> None:
        lines = [x for x in d.get("fee_details") or () if x is not None]
        if not lines:
            return
        x = rng.choice(lines)
        what = rng.choice(["amount", "cnt", "pric", "drop", "dup"])
        if what == "amount" and x.get("det_item_fee_sumamt") is not None:
            x["det_item_fee_sumamt"] += rng.choice([-2, -1, 1, 2])
        elif what == "cnt":
            x["cnt"] = rng.choice([0, -1, 1, None, 10**9])
        elif what == "pric":
            x["pric"] = rng.choice([-1, 0, None, 10**12])
        elif what == "drop":
            d["fee_details"].remove(x)
        else:
            d["fee_details"].append(copy.deepcopy(x))

    def line_wrap(self, rng: random.Random, d: dict[str, Any]) -> None:
        """Amounts whose 64-bit products or sums wrap around to an accepted value."""
        lines = [x for x in d.get("fee_details") or () if x is not None]
        if not lines:
            return
        if rng.random() < 0.5:
            x = rng.choice(lines)
            x["cnt"], x["pric"], x["det_item_fee_sumamt"] = 2**32, 2**32, 0
        else:
            for x in lines[:4]:
                x["det_item_fee_sumamt"] = 2**62
            d["medfee_sumamt"] = sum(x["det_item_fee_sumamt"] or 0 for x in lines) % 2**64

    def lines_shape(self, rng: random.Random, d: dict[str, Any]) -> None:
        lines = d.get("fee_details") or []
        d["fee_details"] = rng.choice([[], None, [None], [*lines, None], lines[:1]])


@pytest.fixture(scope="module")
def mutators(records: dict[str, Record], limits: Limits,
             pools: dict[str, list[dict[str, Any]]]) -> dict[str, Mutator]:
    return {r: Mutator(records[r], limits, pools[r]) for r in SETTLEMENT_RECORDS}


# --- 1. soundness --------------------------------------------------------------------------------


@pytest.mark.parametrize("record", SETTLEMENT_RECORDS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False), size=st.integers(1, 12))
def test_mask_accepts_only_what_the_validator_accepts(record: str, rng: random.Random, size: int,
                                                      records: dict[str, Record],
                                                      mutators: dict[str, Mutator]) -> None:
    m = mutators[record]
    batch = [rng.choice(m.pool) for _ in range(size)]
    batch = [m.mutate(rng, d) if rng.random() < 0.8 else d for d in batch]
    records[record].assert_sound(batch)


@pytest.mark.parametrize("record", SETTLEMENT_RECORDS)
def test_mask_is_sound_on_thousands_of_broken_events(record: str, records: dict[str, Record],
                                                     mutators: dict[str, Mutator],
                                                     pools: dict[str, list[dict[str, Any]]]) -> None:
    """One large batch per record (what the columnar path sees), broken in every way at once."""
    rng = random.Random(20261207)
    batch = [mutators[record].mutate(rng, rng.choice(pools[record])) for _ in range(3000)]
    accepted, valid = records[record].assert_sound(batch)
    assert 0 < valid < len(batch)  # the mutations break events, and not all of them
    assert accepted > 0


# --- 2. completeness -------------------------------------------------------------------------------


def test_every_benchmark_settlement_takes_the_fast_path(records: dict[str, Record],
                                                        bench_settlements: list[dict[str, Any]]) -> None:
    r = records[SETTLEMENT]
    frame = r.frame(bench_settlements)
    assert all(r.validator(d) is None for d in frame.to_dicts())
    mask = r.mask(frame)
    assert mask.all(), f"{(~mask).sum()} valid settlements rejected, e.g. {frame.filter(~mask).to_dicts()[:1]}"


@pytest.mark.parametrize("subsystem", ["settlement", "procurement", "supervision"])
def test_every_valid_generated_event_takes_the_fast_path(subsystem: str, subsystems: dict[str, Subsystem],
                                                         records: dict[str, Record], stream: list[SimEvent]) -> None:
    for spec in subsystems[subsystem].records:
        r = records[spec.record]
        data = [e.datum for e in stream if e.record == spec.record]
        if not data:
            continue
        frame = r.frame(data)
        valid = pl.Series([r.validator(d) is None for d in frame.to_dicts()])
        mask = r.mask(frame)
        assert (mask == valid).all(), spec.record  # no generated event is rejected for a reason the mask misses


def test_reversals_and_filings_of_the_stream_take_the_fast_path(pools: dict[str, list[dict[str, Any]]],
                                                                records: dict[str, Record]) -> None:
    for name in (REVERSAL, FILING):
        assert len(pools[name]) >= 20, name
        assert records[name].mask(records[name].frame(pools[name])).all(), name


def test_every_record_of_every_subsystem_has_a_mask(records: dict[str, Record]) -> None:
    assert len(records) >= 13  # Record() asserts compile_mask is not None


# --- 3. check by check -----------------------------------------------------------------------------


def verdicts(checks: Sequence[CheckBase], schema: Mapping[str, pl.DataType], rows: Sequence[Any]
             ) -> list[tuple[bool, bool]]:
    """(mask, validator accepts) of each row; asserts soundness on the way."""
    mask_fn = compile_mask(checks)
    assert mask_fn is not None
    frame = pl.DataFrame(list(rows), schema=schema, orient="row")
    mask = mask_fn(frame).to_list()
    validate = compile_checks(checks)
    out = [(m, validate(d) is None) for m, d in zip(mask, frame.to_dicts(), strict=True)]
    for (m, ok), d in zip(out, rows, strict=True):
        assert ok or not m, f"unsound for {d!r}"
    return out


def exact(checks: Sequence[CheckBase], schema: Mapping[str, pl.DataType], rows: Sequence[Any],
          expected: Sequence[bool]) -> None:
    """The mask gives exactly ``expected``, and the validator agrees."""
    got = verdicts(checks, schema, rows)
    assert [m for m, _ in got] == list(expected)
    assert [ok for _, ok in got] == list(expected)


STR, INT, DAYS = pl.String(), pl.Int64(), pl.Int32()


def test_text_length_counts_characters_and_control_characters_are_rejected() -> None:
    check = Text(fields=(("a", 5, False), ("n", 5, True)))
    rows = [("abcde", None), ("abcdef", None), ("中文中文中", None), ("中文中文中文", None), ("ab\x00", None),
            ("a\x1f", None), ("a\x7f", None), ("a\x85", None), ("a\x9f", None), ("a\xa0", None), ("a\t", None),
            (None, "a\tb\n"), (None, "a\r\n"), (None, "a\x0b"), (None, "a\x85"), (None, "123456"), ("", "")]
    exact([check], {"a": STR, "n": STR}, [{"a": a, "n": n} for a, n in rows],
          [True, False, True, False, False, False, False, False, False, True, False,
           True, True, False, False, False, True])


def test_text_arrays_and_lines() -> None:
    check = Text(arrays=(("xs", 3),), lines=(("ls", Text(fields=(("s", 3, False),))),))
    schema = {"xs": pl.List(STR), "ls": pl.List(pl.Struct({"s": STR}))}
    rows = [{"xs": ["abc"], "ls": [{"s": "abc"}]}, {"xs": ["abcd"], "ls": []}, {"xs": [None], "ls": None},
            {"xs": None, "ls": [None]}, {"xs": [], "ls": [{"s": "a\n"}]}, {"xs": ["a\t"], "ls": [{"s": None}]},
            {"xs": None, "ls": [{"s": "abcd"}]}]
    exact([check], schema, rows, [True, False, False, False, False, False, False])


def test_text_left_to_a_code_check_still_rejects_what_text_rejects() -> None:
    """A field a code check constrains is not tested twice; the pair must still reject everything."""
    code, text = Code("c", "hospital", optional=True), Text(fields=(("c", 50, False),))
    rows = [{"c": "H45012400011"}, {"c": "H4501240001\x00"}, {"c": "H45012400011\n"}, {"c": None}, {"c": ""}]
    exact([text, code], {"c": STR}, rows, [True, False, False, True, True])
    short = Text(fields=(("c", 5, False),))  # the code is longer than the text limit: both must hold
    exact([short, code], {"c": STR}, rows, [False, False, False, True, True])


@pytest.mark.parametrize(("value", "ok"), [
    ("0f8fad5b-d9cb-469f-a165-70867728950e", True), ("0F8FAD5B-D9CB-469F-A165-70867728950E", True),
    ("0f8fad5b-d9cb-469f-a165-70867728950e\n", False), ("0f8fad5bd9cb469fa16570867728950e", False),
    ("０f8fad5b-d9cb-469f-a165-70867728950e", False), ("0g8fad5b-d9cb-469f-a165-70867728950e", False),
    (None, False), ("", False),
])
def test_event_id(value: str | None, ok: bool) -> None:
    exact([EventId()], {"event_id": STR}, [{"event_id": value}], [ok])


@pytest.mark.parametrize(("value", "ok"), [
    ("x", True), ("0", True), (" x ", True), ("\u200b", True), ("\xad", True), ("", False), (None, False),
    (" ", False), ("\t\n", False), ("\u3000", False), ("\x1c\x1d\x1e\x1f", False), ("\x85\xa0", False),
    ("\u2028\u2029\u202f\u205f", False), ("\u1680\u2000\u200a", False),
])
def test_not_blank_follows_python_whitespace(value: str | None, ok: bool) -> None:
    exact([NotBlank("a")], {"a": STR}, [{"a": value}], [ok])


def test_not_blank_on_integers_lists_and_absent_columns() -> None:
    exact([NotBlank("n")], {"n": INT}, [{"n": 0}, {"n": 5}, {"n": None}], [False, True, False])
    exact([NotBlank("xs")], {"xs": pl.List(STR)}, [{"xs": []}, {"xs": ["a"]}, {"xs": None}], [False, True, False])
    exact([NotBlank("absent")], {"a": STR}, [{"a": "x"}], [False])


@pytest.mark.parametrize(("kind", "value", "ok"), [
    ("hospital", "H45012400011", True), ("hospital", "H4501240001", False), ("hospital", "H450124000111", False),
    ("hospital", "H45012400011\n", False), ("hospital", "H４5012400011", False), ("hospital", "H٤5012400011", False),
    ("institution", "P45012400011", True), ("institution", "X45012400011", False),
    ("list_item", "XA01ABD075A002010100483", True), ("list_item", "C09010101000000066260000001", True),
    ("list_item", "C0901010100000006626", True), ("list_item", "001109000010100", True),
    ("list_item", "C090101010000000662600", False), ("list_item", "xa01abd075a002010100483", False),
    ("icd10", "J18.900x001", True), ("icd10", "J18.900X001", False), ("icd10", "J18a900", False),
    ("icd9cm3", "36.0700", True), ("icd9cm3", "36.07000", False),
    ("credit_code", "91350100M000100Y43", True), ("credit_code", "91350100M000100O43", False),
    ("hospital", None, False), ("hospital", "", False),
])
def test_code(kind: str, value: str | None, ok: bool) -> None:
    exact([Code("c", kind)], {"c": STR}, [{"c": value}], [ok])


def test_optional_code_accepts_null_and_empty_but_checks_a_value() -> None:
    exact([Code("c", "practitioner", optional=True)], {"c": STR},
          [{"c": None}, {"c": ""}, {"c": "D510105000123"}, {"c": " "}, {"c": "D51010500012"}],
          [True, True, True, False, False])
    exact([Code("absent", "hospital", optional=True), Code("c", "hospital", optional=True)], {"c": STR},
          [{"c": None}], [True])
    exact([Code("absent", "hospital")], {"c": STR}, [{"c": None}], [False])


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(CODE_PATTERNS)), data=st.data())
def test_code_translation_matches_python_fullmatch(kind: str, data: st.DataObject) -> None:
    """Python's patterns are re.ASCII, so the translation is exact: the same verdict on every string."""
    pattern = CODE_PATTERNS[kind]
    good = data.draw(st.from_regex(pattern, fullmatch=True))
    noise = data.draw(st.text(alphabet=st.sampled_from("0123456789０１٣AZaxX.CHP \n\x00\u3000中"), max_size=30))
    i = data.draw(st.integers(0, len(good)))
    values = [good, noise, good[:i] + noise + good[i:], good[:i] + good[i + 1:], good.translate(FULL_WIDTH),
              good + "\n"]
    check = Code("c", kind)
    got = verdicts([check], {"c": STR}, [{"c": v} for v in values])
    assert [m for m, _ in got] == [bool(v) and pattern.fullmatch(v) is not None for v in values]


NASTY_ALPHABET = st.sampled_from([
    *(c for c in NASTY_STRINGS if len(c) == 1), *CONTROL_CHARS,
    "0", "1", "5", "９", "٣", "a", "A", "-", ".", "\U0001d7ce", "\u0660", "\u00b2",
])


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.text(alphabet=NASTY_ALPHABET, max_size=8)), min_size=1, max_size=20))
def test_string_checks_match_python_on_nasty_strings(values: list[str | None]) -> None:
    """Whitespace, control characters, digits and lengths as Python sees them, exactly."""
    schema = {"a": STR}
    rows = [{"a": v} for v in values]
    for check in (NotBlank("a"), Text(fields=(("a", 4, False),)), Text(fields=(("a", 4, True),)), Region("a"),
                  RequiredWhen("a", frozenset({"1"}), ("a",), "x"), OneOf("a", frozenset({"1", " 1"}))):
        got = verdicts([check], schema, rows)
        assert [m for m, _ in got] == [ok for _, ok in got], check


@pytest.mark.parametrize(("value", "ok"), [
    ("110105", True), ("650199", True), ("330199", True), ("990105", False), ("000000", False), ("11010", False),
    ("1101050", False), ("１10105", False), ("١١0105", False), ("110105\n", False), (None, False), ("", False),
])
def test_region(value: str | None, ok: bool) -> None:
    exact([Region("r")], {"r": STR}, [{"r": value}], [ok])


def test_one_of() -> None:
    check = OneOf("t", frozenset({"310", "390"}))
    exact([check], {"t": STR}, [{"t": "310"}, {"t": "311"}, {"t": " 310"}, {"t": None}, {"t": ""}],
          [True, False, False, False, False])


@pytest.mark.parametrize(("value", "non_negative", "positive"), [
    (-1, False, False), (0, True, False), (1, True, True), (None, True, True), (I64[0], False, False),
    (I64[1], True, True),
])
def test_non_negative_and_positive(value: int | None, non_negative: bool, positive: bool) -> None:
    exact([NonNegative(("a",))], {"a": INT}, [{"a": value}], [non_negative])
    exact([Positive(("a",))], {"a": INT}, [{"a": value}], [positive])


def test_non_negative_of_an_absent_field_rejects() -> None:
    exact([NonNegative(("absent",))], {"a": INT}, [{"a": 1}], [False])


@pytest.mark.parametrize(("value", "ok"), [(-11, False), (-10, True), (10, True), (11, False), (None, True)])
def test_fits(value: int | None, ok: bool) -> None:
    exact([Fits("a", -10, 10, "t.a")], {"a": INT}, [{"a": value}], [ok])


def test_fits_of_wide_ranges_absent_fields_and_small_columns() -> None:
    exact([Fits("a", -(2**70), 2**70, "t.a"), Fits("absent", 0, 1, "t.x")], {"a": INT}, [{"a": I64[0]}], [True])
    exact([Fits("d", 0, 65535, "t.d")], {"d": DAYS}, [{"d": 65535}, {"d": 65536}, {"d": -1}], [True, False, False])


@pytest.mark.parametrize(("diff", "ok"), [(-2, False), (-1, True), (0, True), (1, True), (2, False)])
def test_sums_to_tolerance(diff: int, ok: bool) -> None:
    exact([SumsTo("t", ("a", "b"))], {"t": INT, "a": INT, "b": INT}, [{"t": 30 + diff, "a": 10, "b": 20}], [ok])


def test_sums_to_does_not_wrap_around() -> None:
    """In Int64, (2**63-1) + (2**63-1) + 0 wraps to -2: an unsound 'equal'."""
    schema = {"t": INT, "a": INT, "b": INT, "c": INT}
    rows = [{"t": -2, "a": I64[1], "b": I64[1], "c": 0}, {"t": I64[1], "a": I64[1], "b": 0, "c": 0},
            {"t": I64[0], "a": I64[0], "b": 0, "c": 1}, {"t": 0, "a": I64[0], "b": I64[0], "c": 0},
            {"t": 1, "a": None, "b": 1, "c": 0}]
    exact([SumsTo("t", ("a", "b", "c"))], schema, rows, [False, True, True, False, False])


def test_at_most() -> None:
    exact([AtMost("a", "b")], {"a": INT, "b": INT},
          [{"a": 5, "b": 5}, {"a": 6, "b": 5}, {"a": None, "b": 5}, {"a": I64[0], "b": I64[1]}],
          [True, False, False, True])


@pytest.mark.parametrize(("amount", "ok"), [(1249, False), (1250, True), (1251, True), (1252, True), (1253, False)])
def test_amount_matches_rounds_per_line(amount: int, ok: bool) -> None:
    # 2.5 units × 5.005 CNY = 12.5125 CNY → 1251 fen after rounding
    exact([AmountMatches("amt", "cnt", "pric")], {"amt": INT, "cnt": INT, "pric": INT},
          [{"amt": amount, "cnt": 25_000, "pric": 5_005_000}], [ok])


def test_amount_matches_does_not_wrap_around() -> None:
    """2**32 × 2**32 wraps to 0 in Int64."""
    schema = {"amt": INT, "cnt": INT, "pric": INT}
    big = (2**64 + 50_000_000) // 100_000_000
    rows = [{"amt": 0, "cnt": 2**32, "pric": 2**32}, {"amt": big, "cnt": 2**32, "pric": 2**32},
            {"amt": 0, "cnt": I64[0], "pric": I64[0]}, {"amt": 0, "cnt": None, "pric": 1}]
    exact([AmountMatches("amt", "cnt", "pric")], schema, rows, [False, True, False, False])


def test_event_time_reads_the_clock_once_per_evaluation() -> None:
    calls = 0
    lim = Limits(now_ms=1_000_000, max_future_skew_ms=1000, min_event_ms=500)

    def clock() -> Limits:
        nonlocal calls
        calls += 1
        return lim

    checks = [EventTime("t", clock), EventTime("u", clock), Each("ls", (EventTime("t", clock),))]
    schema = {"t": INT, "u": INT, "ls": pl.List(pl.Struct({"t": INT}))}
    rows = [{"t": t, "u": None, "ls": [{"t": t}]} for t in (499, 500, 1_001_000, 1_001_001, None)]
    mask_fn = compile_mask(checks)
    assert mask_fn is not None
    calls = 0
    mask = mask_fn(pl.DataFrame(rows, schema=schema, orient="row"))
    assert calls == 1
    assert mask.to_list() == [False, True, True, False, True]


def test_a_failing_clock_rejects_every_row() -> None:
    def clock() -> Limits:
        raise RuntimeError("no clock")

    mask_fn = compile_mask([EventTime("t", clock)])
    assert mask_fn is not None
    assert mask_fn(pl.DataFrame({"t": [None, 1]}, schema={"t": INT})).to_list() == [False, False]


def test_date_order() -> None:
    dates = DateOrder("a", "b")
    exact([dates], {"a": DAYS, "b": DAYS}, [{"a": 5, "b": 5}, {"a": 6, "b": 5}, {"a": None, "b": 1}],
          [True, False, True])
    slack = DateOrder("a", "b", slack_ms=DAY_MS)
    exact([slack], {"a": DAYS, "b": DAYS}, [{"a": 6, "b": 5}, {"a": 7, "b": 5}], [True, False])
    stamps = DateOrder("a", "b", earlier_is_date=False, later_is_date=False)
    exact([stamps], {"a": INT, "b": INT}, [{"a": I64[1], "b": I64[0]}, {"a": I64[0], "b": I64[1]}], [False, True])


def test_date_against_timestamp_uses_china_days_without_wrapping() -> None:
    check = DateOrder("d", "t", later_is_date=False, slack_ms=DAY_MS)
    day = 20_000
    start = day * DAY_MS - CHINA_OFFSET_MS  # 00:00 China time of ``day``
    rows = [{"d": day + 1, "t": start}, {"d": day + 2, "t": start}, {"d": day + 2, "t": start - 1},
            {"d": day + 1, "t": start - 1}, {"d": 0, "t": I64[1]}, {"d": I32[1], "t": I64[1]},
            {"d": 0, "t": I64[0]}]
    got = [ok for _, ok in verdicts([check], {"d": DAYS, "t": INT}, rows)]
    assert got == [True, False, False, False, True, True, False]
    exact([check], {"d": DAYS, "t": INT}, rows, got)


def test_birth_date_boundaries() -> None:
    check = BirthDate("b", "t")
    t = 20_000 * DAY_MS - CHINA_OFFSET_MS + 1  # early on China day 20000
    oldest = 20_000 - math.ceil(130 * 365.2425)
    rows = [{"b": 20_000, "t": t}, {"b": 20_001, "t": t}, {"b": oldest, "t": t}, {"b": oldest + 1, "t": t},
            {"b": None, "t": t}, {"b": 1, "t": None}, {"b": I32[0], "t": I64[1]}, {"b": 0, "t": I64[0]}]
    exact([check], {"b": DAYS, "t": INT}, rows, [True, False, False, True, True, True, False, False])


def test_each_min_items_null_items_and_inner_checks() -> None:
    check = Each("ls", (NotBlank("s"),), min_items=1)
    schema = {"ls": pl.List(pl.Struct({"s": STR}))}
    rows = [{"ls": [{"s": "a"}]}, {"ls": []}, {"ls": None}, {"ls": [None]}, {"ls": [{"s": "a"}, {"s": " "}]},
            {"ls": [{"s": "a"}, {"s": "b"}]}]
    exact([check], schema, rows, [True, False, False, False, False, True])
    exact([Each("ls", (NotBlank("s"),))], schema, rows[1:3], [True, True])


def test_nested_each() -> None:
    check = Each("ls", (Each("xs", (Positive(("n",)),), min_items=1),))
    schema = {"ls": pl.List(pl.Struct({"xs": pl.List(pl.Struct({"n": INT}))}))}
    rows = [{"ls": [{"xs": [{"n": 1}]}, {"xs": [{"n": 2}, {"n": 3}]}]}, {"ls": [{"xs": [{"n": 1}, {"n": 0}]}]},
            {"ls": [{"xs": []}]}, {"ls": []}]
    exact([check], schema, rows, [True, False, False, True])


def test_each_string() -> None:
    check = EachString("ops", "icd9cm3")
    rows = [{"ops": ["36.0700"]}, {"ops": []}, {"ops": None}, {"ops": [None]}, {"ops": ["36.0700", "36.07"]},
            {"ops": ["３6.0700"]}]
    exact([check], {"ops": pl.List(STR)}, rows, [True, True, True, False, False, False])


@pytest.mark.parametrize(("n", "diff", "ok"), [(0, 1, True), (0, 2, False), (3, 3, True), (3, 4, False),
                                               (3, -3, True), (3, -4, False)])
def test_lines_sum_to_tolerates_a_fen_per_line(n: int, diff: int, ok: bool) -> None:
    schema = {"t": INT, "ls": pl.List(pl.Struct({"amt": INT}))}
    rows = [{"t": 100 * n + diff, "ls": [{"amt": 100} for _ in range(n)]}]
    exact([LinesSumTo("ls", "amt", "t")], schema, rows, [ok])


def test_lines_sum_to_nulls_and_wrapping() -> None:
    schema = {"t": INT, "ls": pl.List(pl.Struct({"amt": INT}))}
    rows = [{"t": 0, "ls": [{"amt": 2**62}] * 4}, {"t": 1, "ls": [{"amt": None}]}, {"t": 0, "ls": [None]},
            {"t": 1, "ls": None}, {"t": None, "ls": []}, {"t": I64[1], "ls": [{"amt": I64[1]}, {"amt": 0}]}]
    exact([LinesSumTo("ls", "amt", "t")], schema, rows, [False, False, False, True, False, True])


def test_required_when() -> None:
    check = RequiredWhen("mt", frozenset({"21"}), ("a", "c"), "an inpatient stay")
    schema = {"mt": STR, "a": DAYS, "c": STR}
    rows = [{"mt": "21", "a": 1, "c": "J18.900"}, {"mt": "21", "a": None, "c": "x"}, {"mt": "21", "a": 0, "c": " "},
            {"mt": "21", "a": 0, "c": "\x1c"}, {"mt": "21", "a": 0, "c": None}, {"mt": "11", "a": None, "c": None},
            {"mt": None, "a": None, "c": None}]
    exact([check], schema, rows, [True, False, False, False, False, True, True])


def test_checks_without_a_columnar_form_keep_the_record_on_the_record_path() -> None:
    class StricterCode(Code):
        pass

    assert compile_mask([Predicate("R", "a", "d", lambda d: True)]) is None
    assert compile_mask([Each("ls", (Predicate("R", "a", "d", lambda d: True),))]) is None
    assert compile_mask([StricterCode("c", "hospital")]) is None
    assert compile_mask([Code("c", "no_such_kind")]) is None
    assert compile_mask([]) is not None


def test_a_dtype_the_mask_cannot_reason_about_rejects_rather_than_guesses() -> None:
    mask_fn = compile_mask([Code("c", "hospital", optional=True)])
    assert mask_fn is not None
    frame = pl.DataFrame({"c": ["H45012400011", None]}, schema={"c": pl.Categorical()})
    assert mask_fn(frame).to_list() == [False, True]


def test_empty_frames_and_frames_without_checks() -> None:
    mask_fn = compile_mask([NotBlank("a")])
    assert mask_fn is not None
    assert mask_fn(pl.DataFrame({"a": []}, schema={"a": STR})).len() == 0
    everything = compile_mask([])
    assert everything is not None
    assert everything(pl.DataFrame({"a": ["x", None]})).to_list() == [True, True]


def test_the_translated_patterns_hold_no_unicode_classes() -> None:
    """\\d, \\w, \\s and their kind mean Unicode classes to polars: none may survive translation."""
    from streams.validation_columnar import _fullmatch_rx

    for pattern in CODE_PATTERNS.values():
        assert not re.search(r"\\[dDwWsSbBpP]", _fullmatch_rx(pattern))


def _iter_checks(checks: Sequence[CheckBase]) -> Iterator[CheckBase]:
    for c in checks:
        yield c
        if isinstance(c, Each):
            yield from _iter_checks(c.checks)


def test_every_check_kind_of_the_settlement_records_is_covered_here(records: dict[str, Record]) -> None:
    kinds = {type(c).__name__ for name in SETTLEMENT_RECORDS for c in _iter_checks(records[name].checks)}
    tested = {"Text", "EventId", "Fits", "NotBlank", "Code", "Region", "OneOf", "NonNegative", "Positive", "SumsTo",
              "AtMost", "AmountMatches", "EventTime", "DateOrder", "BirthDate", "Each", "EachString", "LinesSumTo",
              "RequiredWhen"}
    assert kinds <= tested, kinds - tested
