"""Validation checks (streams.validation) one by one, compiled together, and on whole subsystems.

Expected results come from the rules: the national code formats of docs/domain.md's coding table,
raw units of schemas.codec (money in fen, cnt at scale 4, pric at scale 6, times in epoch ms,
dates in epoch days) and the check docstrings, never from running the code.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import SUBJECT_RECORDS, Codec
from streams.base import Subsystem, record_checks
from streams.fields import FieldRules, Required, load_field_rules
from streams.messages import Message
from streams.privacy import Pseudonymizer, Sealer
from streams.processors import BatchProcessor
from streams.topology import build_subsystems
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
    EventTime,
    Limits,
    LinesSumTo,
    NonNegative,
    NotBlank,
    OneOf,
    Positive,
    Predicate,
    Region,
    SumsTo,
    Violation,
    compile_checks,
    run_checks,
)
from yibao.settings import load_settings
from yibao.sim.corrupt import SETTLEMENT_CORRUPTIONS
from yibao.sim.generator import SETTLEMENT, SimConfig, SimEvent, TrafficGenerator

CN = ZoneInfo("Asia/Shanghai")
DAY_MS = 86_400_000
EPOCH = dt.date(1970, 1, 1)


def days(d: dt.date) -> int:
    return (d - EPOCH).days


def china_ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> int:
    return int(dt.datetime(y, mo, d, h, mi, tzinfo=CN).timestamp() * 1000)


def reason(v: Violation | None) -> str | None:
    return None if v is None else v.reason_code


# --- NotBlank ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["ST3101150000000001", "0", "x"])
def test_not_blank_accepts_a_value(value: str) -> None:
    assert NotBlank("setl_id")({"setl_id": value}) is None


@pytest.mark.parametrize("datum", [{"setl_id": ""}, {"setl_id": None}, {}])
def test_not_blank_rejects_empty_null_and_missing(datum: dict[str, Any]) -> None:
    v = NotBlank("setl_id")(datum)
    assert v is not None
    assert (v.reason_code, v.field) == ("MISSING_FIELD", "setl_id")


def test_not_blank_rejects_whitespace_only() -> None:
    assert reason(NotBlank("setl_id")({"setl_id": "   "})) == "MISSING_FIELD"


# --- Code ----------------------------------------------------------------------------------------

#: Valid examples: the domain.md coding table's examples, plus codes built to the stated formats.
VALID_CODES: dict[str, list[str]] = {
    "hospital": ["H45012400011", "H11010500001"],
    "pharmacy": ["P45012400011"],
    "institution": ["H45012400011", "P45012400011"],
    "practitioner": ["D510105000123", "N510105000123", "Y510105000123"],
    "western_drug": ["XA01ABD075A002010100483"],
    "patent_medicine": ["ZA04CAE0023010100166"],
    "consumable": ["C09010101000000066260000001", "C0901010100000006626"],
    "service_item": ["001109000010100"],
    "list_item": ["XA01ABD075A002010100483", "ZA04CAE0023010100166", "C09010101000000066260000001",
                  "C0901010100000006626", "001109000010100"],
    "product": ["XA01ABD075A002010100483", "ZA04CAE0023010100166", "C09010101000000066260000001"],
    "icd10": ["J18.900", "J18.900x001"],
    "icd9cm3": ["36.0700", "36.0700x001"],
    "admdvs": ["330199", "110105"],
    # GB 32100 unified social credit code: 2 registration chars, 6-digit region, 10 chars
    # (no I, O, S, V, Z)
    "credit_code": ["91350100M000100Y43", "913101154566765190"],
    # drug traceability code: 20 digits
    "trace_code": ["81234560123456789012"],
}

INVALID_CODES: dict[str, list[str]] = {
    "hospital": ["P45012400011", "H4501240001", "H450124000111", "h45012400011", "H45012400011 ",
                 "H45012400011\n", " H45012400011", "H4501240001A"],
    "pharmacy": ["H45012400011", "P4501240001", "P450124000111"],
    "institution": ["D510105000123", "X45012400011", "H4501240001"],
    "practitioner": ["D51010500012", "D5101050001234", "H510105000123", "d510105000123", "A510105000123"],
    "western_drug": ["ZA04CAE0023010100166", "XA01ABD075A00201010048", "XA01ABD075A0020101004833",
                     "xa01abd075a002010100483", "XA01ABD075A00201010048X"],
    "patent_medicine": ["XA01ABD075A002010100483", "ZA04CAE002301010016", "ZA04CAE00230101001666",
                        "Z104CAE0023010100166"],
    "consumable": ["C090101010000000662", "C09010101000000066260", "C090101010000000662600",
                   "09010101000000066260000001", "C0901010100000006626000000"],
    "service_item": ["00110900001010", "0011090000101000", "00110900001010A"],
    "list_item": ["H45012400011", "J18.900", "ABC123", "00110900001010"],
    "product": ["001109000010100", "H45012400011"],
    "icd10": ["J18.9", "j18.900", "J18900", "J18.900x1", "J18.900X001", "1J8.900"],
    "icd9cm3": ["36.07", "360700", "36.0700x01", "36.07000", "J6.0700"],
    "admdvs": ["33019", "3301990", "33019A"],
    "credit_code": ["91350100M000100O43", "91350100M000100I43", "9135010M000100Y43",
                    "91350100M000100Y4", "9135010AM000100Y43"],
    "trace_code": ["8123456012345678901", "812345601234567890123", "8123456012345678901A"],
}


def test_code_examples_cover_every_code_kind() -> None:
    assert set(VALID_CODES) == set(CODE_PATTERNS)
    assert set(INVALID_CODES) == set(CODE_PATTERNS)


@pytest.mark.parametrize(("kind", "value"), [(k, v) for k, vs in VALID_CODES.items() for v in vs])
def test_code_accepts_valid(kind: str, value: str) -> None:
    assert Code("c", kind)({"c": value}) is None


@pytest.mark.parametrize(("kind", "value"), [(k, v) for k, vs in INVALID_CODES.items() for v in vs])
def test_code_rejects_invalid(kind: str, value: str) -> None:
    v = Code("c", kind)({"c": value})
    assert v is not None
    assert (v.reason_code, v.field) == ("INVALID_CODE", "c")
    assert kind in v.detail


@pytest.mark.parametrize("datum", [{"c": None}, {"c": ""}, {}])
def test_code_required_rejects_missing(datum: dict[str, Any]) -> None:
    assert reason(Code("c", "hospital")(datum)) == "MISSING_CODE"


@pytest.mark.parametrize("datum", [{"c": None}, {"c": ""}, {}])
def test_code_optional_accepts_missing(datum: dict[str, Any]) -> None:
    assert Code("c", "hospital", optional=True)(datum) is None


def test_code_optional_still_checks_a_present_value() -> None:
    check = Code("c", "icd10", optional=True)
    assert check({"c": "J18.900"}) is None
    assert reason(check({"c": "J18"})) == "INVALID_CODE"


def test_code_of_wrong_type_is_malformed() -> None:
    assert reason(Code("c", "service_item")({"c": 1109000010100})) == "MALFORMED_EVENT"


def test_code_rejects_full_width_digits() -> None:
    full = "H" + "45012400011".translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    assert reason(Code("c", "hospital")({"c": full})) == "INVALID_CODE"


def test_code_memo_valid_then_invalid() -> None:
    check = Code("c", "hospital")
    assert check({"c": "H45012400011"}) is None
    assert check({"c": "H45012400011"}) is None
    assert reason(check({"c": "H4501240001"})) == "INVALID_CODE"
    assert reason(check({"c": "P45012400011"})) == "INVALID_CODE"
    assert reason(check({"c": ""})) == "MISSING_CODE"


def test_code_memo_invalid_then_valid() -> None:
    check = Code("c", "hospital")
    assert reason(check({"c": "P45012400011"})) == "INVALID_CODE"
    assert reason(check({"c": "P45012400011"})) == "INVALID_CODE"
    assert check({"c": "H45012400011"}) is None
    assert reason(check({"c": "P45012400011"})) == "INVALID_CODE"


def test_code_memo_is_per_check_not_per_field() -> None:
    """A value accepted by one check must not be accepted by another check of the same field."""
    hospital, pharmacy = Code("c", "hospital"), Code("c", "pharmacy")
    assert hospital({"c": "H45012400011"}) is None
    assert reason(pharmacy({"c": "H45012400011"})) == "INVALID_CODE"
    both = compile_checks((Code("c", "institution"), Code("c", "pharmacy")))
    assert both({"c": "P45012400011"}) is None
    assert reason(both({"c": "H45012400011"})) == "INVALID_CODE"


_code_values = st.sampled_from([v for vs in (*VALID_CODES.values(), *INVALID_CODES.values()) for v in vs])


@settings(max_examples=150, deadline=None, database=None)
@given(kind=st.sampled_from(sorted(CODE_PATTERNS)), values=st.lists(_code_values, min_size=1, max_size=25))
def test_code_memo_never_changes_a_verdict(kind: str, values: list[str]) -> None:
    """Whatever the order of calls, each verdict is the format's verdict for that value alone."""
    check = Code("c", kind)
    compiled = compile_checks((check,))
    for value in values:
        expected = None if CODE_PATTERNS[kind].fullmatch(value) else "INVALID_CODE"
        assert reason(check({"c": value})) == expected
        assert reason(compiled({"c": value})) == expected


# --- Region --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["110105", "450124", "330199", "339900", "650102"])
def test_region_accepts_known_province_and_pool_codes(value: str) -> None:
    assert Region("r")({"r": value}) is None


@pytest.mark.parametrize("value", ["33019", "3301990", "33O199", "", None, 330199, "３３０１９９", " 33019"])
def test_region_rejects_non_six_digit(value: Any) -> None:
    v = Region("r")({"r": value})
    assert v is not None
    assert (v.reason_code, v.field) == ("INVALID_REGION", "r")


@pytest.mark.parametrize("value", ["990105", "000000", "100000", "209900", "999999"])
def test_region_rejects_unknown_province(value: str) -> None:
    v = Region("r")({"r": value})
    assert v is not None
    assert (v.reason_code, v.field) == ("UNKNOWN_REGION", "r")


def test_region_missing_is_invalid() -> None:
    assert reason(Region("r")({})) == "INVALID_REGION"


def test_region_memo_never_changes_a_verdict() -> None:
    check = Region("r")
    assert check({"r": "330199"}) is None
    assert reason(check({"r": "990199"})) == "UNKNOWN_REGION"
    assert reason(check({"r": "33019"})) == "INVALID_REGION"
    assert check({"r": "330199"}) is None
    assert reason(check({"r": "990199"})) == "UNKNOWN_REGION"


# --- OneOf, NonNegative, Positive --------------------------------------------------------------


def test_one_of() -> None:
    check = OneOf("insutype", frozenset({"310", "390"}))
    assert check({"insutype": "310"}) is None
    assert check({"insutype": "390"}) is None
    for bad in ({"insutype": "320"}, {"insutype": ""}, {"insutype": None}, {}, {"insutype": 310}):
        v = check(bad)
        assert v is not None
        assert (v.reason_code, v.field) == ("UNKNOWN_CODE_VALUE", "insutype")


@pytest.mark.parametrize("a", [0, 1, 10**15, None])
def test_non_negative_accepts(a: int | None) -> None:
    assert NonNegative(("a", "b"))({"a": a, "b": 0}) is None


def test_non_negative_rejects_minus_one_fen_and_names_the_field() -> None:
    check = NonNegative(("a", "b"))
    v = check({"a": 0, "b": -1})
    assert v is not None
    assert (v.reason_code, v.field) == ("NEGATIVE_AMOUNT", "b")
    v = check({"a": -5, "b": -1})
    assert v is not None
    assert v.field == "a"


def test_non_negative_missing_field_is_malformed() -> None:
    assert reason(NonNegative(("a", "b"))({"a": 1})) == "MALFORMED_EVENT"


@pytest.mark.parametrize(("value", "expected"), [(1, None), (10_000, None), (None, None),
                                                 (0, "NON_POSITIVE_QUANTITY"), (-1, "NON_POSITIVE_QUANTITY")])
def test_positive(value: int | None, expected: str | None) -> None:
    v = Positive(("cnt",))({"cnt": value})
    assert reason(v) == expected
    if v is not None:
        assert v.field == "cnt"


def test_positive_wrong_type_is_malformed() -> None:
    assert reason(Positive(("cnt",))({"cnt": "5"})) == "MALFORMED_EVENT"


# --- SumsTo, AtMost, AmountMatches, LinesSumTo ------------------------------------------------


@pytest.mark.parametrize(("diff", "ok"), [(0, True), (1, True), (-1, True), (2, False), (-2, False),
                                          (1000, False)])
def test_sums_to_one_fen_tolerance(diff: int, ok: bool) -> None:
    check = SumsTo("total", ("a", "b", "c"))
    v = check({"total": 6000 + diff, "a": 1000, "b": 2000, "c": 3000})
    if ok:
        assert v is None
    else:
        assert v is not None
        assert (v.reason_code, v.field) == ("AMOUNTS_DO_NOT_ADD_UP", "total")


def test_sums_to_custom_tolerance() -> None:
    exact = SumsTo("total", ("a",), tolerance=0)
    assert exact({"total": 5, "a": 5}) is None
    assert reason(exact({"total": 6, "a": 5})) == "AMOUNTS_DO_NOT_ADD_UP"
    loose = SumsTo("total", ("a",), tolerance=10)
    assert loose({"total": 15, "a": 5}) is None
    assert reason(loose({"total": 16, "a": 5})) == "AMOUNTS_DO_NOT_ADD_UP"


@settings(max_examples=200, deadline=None, database=None)
@given(parts=st.lists(st.integers(0, 10**12), min_size=1, max_size=5), diff=st.integers(-5, 5))
def test_sums_to_property(parts: list[int], diff: int) -> None:
    names = tuple(f"p{i}" for i in range(len(parts)))
    datum: dict[str, Any] = dict(zip(names, parts, strict=True))
    datum["total"] = sum(parts) + diff
    assert (SumsTo("total", names)(datum) is None) == (abs(diff) <= 1)


def test_at_most() -> None:
    check = AtMost("inscp_amt", "medfee_sumamt")
    assert check({"inscp_amt": 100, "medfee_sumamt": 100}) is None
    assert check({"inscp_amt": 0, "medfee_sumamt": 100}) is None
    v = check({"inscp_amt": 101, "medfee_sumamt": 100})
    assert v is not None
    assert (v.reason_code, v.field) == ("AMOUNT_EXCEEDS_TOTAL", "inscp_amt")


def _line(amount: int, cnt: int, pric: int) -> dict[str, int]:
    return {"det_item_fee_sumamt": amount, "cnt": cnt, "pric": pric}


AMOUNT = AmountMatches("det_item_fee_sumamt", "cnt", "pric")


@pytest.mark.parametrize(("amount", "ok"), [(3085, True), (3084, True), (3086, True), (3083, False),
                                            (3087, False), (0, False)])
def test_amount_matches_within_a_fen(amount: int, ok: bool) -> None:
    # 2.5 (scale 4: 25_000) × 12.34 CNY (scale 6: 12_340_000) = 30.85 CNY = 3085 fen
    v = AMOUNT(_line(amount, 25_000, 12_340_000))
    assert (v is None) == ok
    if v is not None:
        assert (v.reason_code, v.field) == ("AMOUNTS_DO_NOT_ADD_UP", "det_item_fee_sumamt")


def test_amount_matches_rounds_half_up_per_line() -> None:
    # 1 × 0.025 CNY = 2.5 fen exactly: the line amount rounds half up to 3 fen, so 2..4 pass.
    half = (10_000, 25_000)
    assert [AMOUNT(_line(a, *half)) is None for a in range(6)] == [False, False, True, True, True, False]
    # 1 × 0.024999 CNY = 2.4999 fen rounds to 2, so 1..3 pass and 4 no longer does.
    below = (10_000, 24_999)
    assert [AMOUNT(_line(a, *below)) is None for a in range(6)] == [False, True, True, True, False, False]


def test_amount_matches_large_values() -> None:
    # 1234.5678 × 98765.4321 CNY: the exact product has more places than a fen; round half up
    cnt, pric = 12_345_678, 98_765_432_100
    exact = cnt * pric  # scale 10
    fen = (exact + 50_000_000) // 100_000_000
    assert AMOUNT(_line(fen, cnt, pric)) is None
    assert reason(AMOUNT(_line(fen + 2, cnt, pric))) == "AMOUNTS_DO_NOT_ADD_UP"


def _lines(*amounts: int) -> list[dict[str, int]]:
    return [{"det_item_fee_sumamt": a} for a in amounts]


@pytest.mark.parametrize(("n", "diff", "ok"), [(3, 0, True), (3, 3, True), (3, -3, True), (3, 4, False),
                                               (3, -4, False), (1, 1, True), (1, 2, False),
                                               (10, 10, True), (10, 11, False)])
def test_lines_sum_to_tolerates_a_fen_per_line(n: int, diff: int, ok: bool) -> None:
    check = LinesSumTo("fee_details", "det_item_fee_sumamt", "medfee_sumamt")
    lines = _lines(*[100 * (i + 1) for i in range(n)])
    v = check({"fee_details": lines, "medfee_sumamt": sum(x["det_item_fee_sumamt"] for x in lines) + diff})
    assert (v is None) == ok
    if v is not None:
        assert (v.reason_code, v.field) == ("AMOUNTS_DO_NOT_ADD_UP", "medfee_sumamt")


def test_lines_sum_to_without_lines_tolerates_one_fen() -> None:
    check = LinesSumTo("fee_details", "det_item_fee_sumamt", "medfee_sumamt")
    assert check({"fee_details": [], "medfee_sumamt": 1}) is None
    assert check({"fee_details": None, "medfee_sumamt": 0}) is None
    assert reason(check({"fee_details": [], "medfee_sumamt": 2})) == "AMOUNTS_DO_NOT_ADD_UP"


# --- EventTime ------------------------------------------------------------------------------------

NOW = china_ms(2026, 11, 1, 12)
SKEW = 300_000
MIN = china_ms(2018, 1, 1)
LIMITS = Limits(now_ms=NOW, max_future_skew_ms=SKEW, min_event_ms=MIN)


@pytest.mark.parametrize(("t", "expected"), [
    (NOW, None),
    (NOW + SKEW, None),
    (NOW + SKEW + 1, "FUTURE_TIME"),
    (NOW + DAY_MS, "FUTURE_TIME"),
    (MIN, None),
    (MIN - 1, "TIME_TOO_OLD"),
    (0, "TIME_TOO_OLD"),
    (None, None),
])
def test_event_time(t: int | None, expected: str | None) -> None:
    v = EventTime("setl_time", lambda: LIMITS)({"setl_time": t})
    assert reason(v) == expected
    if v is not None:
        assert v.field == "setl_time"


def test_event_time_follows_the_clock_at_call_time() -> None:
    clock = {"now": NOW}
    check = EventTime("t", lambda: Limits(clock["now"], SKEW, MIN))
    event = {"t": NOW + SKEW + 60_000}
    assert reason(check(event)) == "FUTURE_TIME"
    clock["now"] += 60_000
    assert check(event) is None


def test_limits_from_settings() -> None:
    lim = Limits.from_settings(300, 2018, now_ms=NOW)
    assert (lim.now_ms, lim.max_future_skew_ms) == (NOW, 300_000)
    check = EventTime("t", lambda: lim)
    assert reason(check({"t": china_ms(2017, 12, 30)})) == "TIME_TOO_OLD"
    assert check({"t": china_ms(2018, 1, 2)}) is None


def test_limits_min_event_year_is_china_time() -> None:
    lim = Limits.from_settings(300, 2018, now_ms=NOW)
    assert EventTime("t", lambda: lim)({"t": china_ms(2018, 1, 1, 0, 30)}) is None


# --- DateOrder, BirthDate --------------------------------------------------------------------------


def test_date_order_dates() -> None:
    check = DateOrder("adm_date", "dscg_date")
    assert check({"adm_date": 20_000, "dscg_date": 20_000}) is None
    assert check({"adm_date": 20_000, "dscg_date": 20_005}) is None
    assert check({"adm_date": None, "dscg_date": 20_000}) is None
    assert check({"adm_date": 20_000, "dscg_date": None}) is None
    assert check({}) is None
    v = check({"adm_date": 20_001, "dscg_date": 20_000})
    assert v is not None
    assert (v.reason_code, v.field) == ("BAD_DATE_ORDER", "adm_date")


def test_date_order_timestamps() -> None:
    check = DateOrder("init_setl_time", "setl_time", earlier_is_date=False, later_is_date=False)
    assert check({"init_setl_time": 1000, "setl_time": 1000}) is None
    assert reason(check({"init_setl_time": 1001, "setl_time": 1000})) == "BAD_DATE_ORDER"


def test_date_order_date_against_timestamp_uses_china_days() -> None:
    """A date (a China calendar day) against a timestamp: compared as China-time days, plus slack."""
    check = DateOrder("dscg_date", "setl_time", later_is_date=False, slack_ms=DAY_MS)
    d = days(dt.date(2026, 10, 5))
    assert check({"dscg_date": d, "setl_time": china_ms(2026, 10, 5, 10)}) is None
    assert check({"dscg_date": d, "setl_time": china_ms(2026, 10, 4, 0, 30)}) is None  # one day of slack
    assert reason(check({"dscg_date": d, "setl_time": china_ms(2026, 10, 3, 23, 59)})) == "BAD_DATE_ORDER"
    no_slack = DateOrder("dscg_date", "setl_time", later_is_date=False)
    assert no_slack({"dscg_date": d, "setl_time": china_ms(2026, 10, 5, 0, 1)}) is None  # 16:01 UTC the day before
    assert reason(no_slack({"dscg_date": d, "setl_time": china_ms(2026, 10, 4, 23, 59)})) == "BAD_DATE_ORDER"


BIRTH = BirthDate("brdy", "setl_time")
SETL = china_ms(2026, 10, 5, 10)


def test_birth_date_plausible() -> None:
    assert BIRTH({"brdy": days(dt.date(1990, 10, 5)), "setl_time": SETL}) is None
    assert BIRTH({"brdy": days(dt.date(2026, 10, 4)), "setl_time": SETL}) is None
    assert BIRTH({"brdy": days(dt.date(2026, 10, 5)), "setl_time": SETL}) is None  # born today
    assert BIRTH({"brdy": days(dt.date(1897, 1, 1)), "setl_time": SETL}) is None  # 129
    assert BIRTH({"brdy": None, "setl_time": SETL}) is None


def test_birth_date_after_event() -> None:
    v = BIRTH({"brdy": days(dt.date(2026, 10, 6)), "setl_time": SETL})
    assert v is not None
    assert (v.reason_code, v.field) == ("BAD_DATE_ORDER", "brdy")


def test_birth_date_implausible_age() -> None:
    v = BIRTH({"brdy": days(dt.date(1895, 1, 1)), "setl_time": SETL})  # 131
    assert v is not None
    assert (v.reason_code, v.field) == ("IMPLAUSIBLE_DATE", "brdy")
    younger = BirthDate("brdy", "setl_time", max_age=18)
    assert younger({"brdy": days(dt.date(2010, 1, 1)), "setl_time": SETL}) is None
    assert reason(younger({"brdy": days(dt.date(2007, 1, 1)), "setl_time": SETL})) == "IMPLAUSIBLE_DATE"


def test_birth_date_is_a_china_date() -> None:
    assert BIRTH({"brdy": days(dt.date(2026, 10, 5)), "setl_time": china_ms(2026, 10, 5, 7)}) is None


def test_birth_date_age_of_max_age_plus_a_month_fails() -> None:
    brdy = days(dt.date(1896, 9, 1))  # 130 years, 1 month at SETL
    assert reason(BIRTH({"brdy": brdy, "setl_time": SETL})) == "IMPLAUSIBLE_DATE"


# --- Each, EachString ----------------------------------------------------------------------------

LINE_CHECKS = (NotBlank("feedetl_sn"), Code("hilist_code", "list_item"))


def _items(n: int) -> list[dict[str, str]]:
    return [{"feedetl_sn": f"{i + 1:04d}", "hilist_code": "001109000010100"} for i in range(n)]


def test_each_accepts_valid_items() -> None:
    assert Each("fee_details", LINE_CHECKS, min_items=1)({"fee_details": _items(5)}) is None


def test_each_names_the_item_path() -> None:
    items = _items(5)
    items[3]["hilist_code"] = "ABC123"
    v = Each("fee_details", LINE_CHECKS)({"fee_details": items})
    assert v is not None
    assert (v.reason_code, v.field) == ("INVALID_CODE", "fee_details[3].hilist_code")


def test_each_reports_the_first_bad_item() -> None:
    items = _items(5)
    items[4]["feedetl_sn"] = ""
    items[1]["hilist_code"] = "ABC123"
    items[3]["hilist_code"] = "ABC123"
    v = Each("fee_details", LINE_CHECKS)({"fee_details": items})
    assert v is not None
    assert v.field == "fee_details[1].hilist_code"


def test_each_min_items() -> None:
    check = Each("fee_details", LINE_CHECKS, min_items=2)
    assert check({"fee_details": _items(2)}) is None
    short: list[dict[str, Any]] = [{"fee_details": _items(1)}, {"fee_details": []}, {"fee_details": None}, {}]
    for datum in short:
        v = check(datum)
        assert v is not None
        assert (v.reason_code, v.field) == ("MISSING_DETAILS", "fee_details")
    assert Each("fee_details", LINE_CHECKS)({"fee_details": []}) is None


def test_each_nested_paths() -> None:
    inner = Each("b", (Positive(("c",)),))
    check = Each("a", (inner,))
    datum = {"a": [{"b": [{"c": 1}]}, {"b": [{"c": 1}, {"c": 1}, {"c": 0}]}]}
    v = check(datum)
    assert v is not None
    assert (v.reason_code, v.field) == ("NON_POSITIVE_QUANTITY", "a[1].b[2].c")


def test_each_item_of_wrong_type_is_malformed() -> None:
    assert reason(Each("fee_details", LINE_CHECKS)({"fee_details": ["0001"]})) == "MALFORMED_EVENT"


def test_each_string() -> None:
    check = EachString("oprn_codes", "icd9cm3")
    assert check({"oprn_codes": ["36.0700", "36.0700x001"]}) is None
    assert check({"oprn_codes": []}) is None
    assert check({"oprn_codes": None}) is None
    assert check({}) is None
    v = check({"oprn_codes": ["36.0700", "36.07", "bad"]})
    assert v is not None
    assert (v.reason_code, v.field) == ("INVALID_CODE", "oprn_codes[1]")
    assert reason(check({"oprn_codes": [3607]})) == "MALFORMED_EVENT"


def test_each_string_inside_each() -> None:
    check = Each("visits", (EachString("oprn_codes", "icd9cm3"),))
    v = check({"visits": [{"oprn_codes": []}, {"oprn_codes": ["36.0700", "x"]}]})
    assert v is not None
    assert v.field == "visits[1].oprn_codes[1]"


# --- Predicate -----------------------------------------------------------------------------------


def test_predicate() -> None:
    check = Predicate("CUSTOM", "x", "x must be even", lambda d: d["x"] % 2 == 0)
    assert check({"x": 4}) is None
    assert check({"x": 3}) == Violation("CUSTOM", "x", "x must be even")
    assert reason(check({})) == "MALFORMED_EVENT"


def test_predicate_inside_each_sees_the_item() -> None:
    check = Each("xs", (Predicate("ODD", "v", "v must be odd", lambda d: d["v"] % 2 == 1),))
    v = check({"xs": [{"v": 1}, {"v": 2}]})
    assert v == Violation("ODD", "xs[1].v", "v must be odd")


# --- compile_checks --------------------------------------------------------------------------------


def test_compile_checks_returns_the_first_violation_in_declaration_order() -> None:
    a, b, c = NotBlank("a"), Code("b", "hospital"), Positive(("c",))
    datum = {"a": "", "b": "nope", "c": 0}
    assert reason(compile_checks((a, b, c))(datum)) == "MISSING_FIELD"
    assert reason(compile_checks((b, c, a))(datum)) == "INVALID_CODE"
    assert reason(compile_checks((c, a, b))(datum)) == "NON_POSITIVE_QUANTITY"
    assert reason(run_checks((c, b, a), datum)) == "NON_POSITIVE_QUANTITY"
    assert compile_checks((a, b, c))({"a": "x", "b": "H45012400011", "c": 1}) is None


def test_compile_checks_of_nothing_accepts_anything() -> None:
    assert compile_checks(())({}) is None


@pytest.mark.parametrize(("checks", "datum"), [
    ((NonNegative(("amt",)),), {}),  # missing key
    ((Positive(("cnt",)),), {"cnt": "3"}),  # wrong type
    ((SumsTo("t", ("a", "b")),), {"t": 1, "a": 1, "b": None}),
    ((AtMost("a", "b"),), {"a": 1}),
    ((Region("r"),), {"r": ["110105"]}),  # unhashable
    ((LinesSumTo("ls", "amt", "t"),), {"ls": [{"x": 1}], "t": 1}),
    ((Each("ls", (NotBlank("x"),)),), {"ls": 5}),
    ((NotBlank("a"),), None),  # not a dict at all
])
def test_compile_checks_turns_a_crash_into_malformed_event(checks: tuple[CheckBase, ...], datum: Any) -> None:
    v = compile_checks(checks)(datum)
    assert v is not None
    assert v.reason_code == "MALFORMED_EVENT"
    assert v.field == ""
    assert v.detail


def test_compile_checks_turns_any_check_crash_into_malformed_event() -> None:
    check = Predicate("RATIO", "a", "ratio too high", lambda d: d["a"] / d["b"] < 2)
    assert reason(compile_checks((check,))({"a": 1, "b": 0})) == "MALFORMED_EVENT"


def test_compile_checks_violation_before_a_crash_wins_and_vice_versa() -> None:
    datum = {"a": ""}  # "amt" missing: NonNegative crashes
    assert reason(compile_checks((NotBlank("a"), NonNegative(("amt",))))(datum)) == "MISSING_FIELD"
    assert reason(compile_checks((NonNegative(("amt",)), NotBlank("a")))(datum)) == "MALFORMED_EVENT"


def test_compiled_check_is_reusable() -> None:
    fn = compile_checks((Code("c", "hospital"), Positive(("n",))))
    results = [reason(fn({"c": c, "n": n})) for c, n in
               [("H45012400011", 1), ("X", 1), ("H45012400011", 0), ("H45012400011", 2)]]
    assert results == [None, "INVALID_CODE", "NON_POSITIVE_QUANTITY", None]


# --- whole subsystems -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No YIBAO_* variable or .env file of the developer's shell may change the settings."""
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("YIBAO_"):
                mp.delenv(k)
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="module")
def subsystems(clean_env: None) -> dict[str, Subsystem]:
    return build_subsystems(load_settings().validation())


@pytest.fixture(scope="module")
def stream() -> list[SimEvent]:
    return list(TrafficGenerator(SimConfig(settlements=2000)).events())


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


@pytest.mark.parametrize("name", ["settlement", "procurement", "supervision"])
def test_generated_stream_passes_every_validator(name: str, subsystems: dict[str, Subsystem],
                                                 stream: list[SimEvent], codec: Codec) -> None:
    sub = subsystems[name]
    validators: dict[str, Callable[[dict[str, Any]], Violation | None]] = {
        s.record: compile_checks(record_checks(s, codec.record_schema(s.record)), s.short_name) for s in sub.records
    }
    seen: dict[str, int] = defaultdict(int)
    failures = []
    for ev in stream:
        if ev.record not in SUBJECT_RECORDS[name]:
            continue
        seen[ev.record] += 1
        v = validators[ev.record](ev.datum)
        if v is not None:
            failures.append((ev.event_type, ev.datum.get("event_id"), v))
    assert not failures, failures[:5]
    assert sum(seen.values()) > 0
    if name == "settlement":
        assert set(seen) == set(SUBJECT_RECORDS["settlement"])


@pytest.mark.parametrize("corruption", SETTLEMENT_CORRUPTIONS, ids=lambda f: f.__name__)
def test_settlement_corruptions_are_dead_lettered_for_their_reason(
    corruption: Any, subsystems: dict[str, Subsystem], stream: list[SimEvent], codec: Codec
) -> None:
    key = bytes(range(32))
    proc = BatchProcessor(subsystems["settlement"], codec, Pseudonymizer(key, "t1"), Sealer(key, "t1"),
                          "yibao.settlement", lambda: LIMITS)
    settlements = [ev for ev in stream if ev.record == SETTLEMENT][:40]
    rng = random.Random(f"corrupt/{corruption.__name__}")
    msgs = []
    expected: dict[int, set[str]] = {}
    for i, ev in enumerate(settlements):
        msgs.append(Message(0, 2 * i, ev.key.encode(), codec.encode(ev.record, ev.datum)))
        value, why = corruption(codec, ev, rng)
        msgs.append(Message(0, 2 * i + 1, ev.key.encode(), value))
        expected[2 * i + 1] = set(why.split("|"))
    out = proc.process(msgs)
    assert out.landed["Settlement"] == len(settlements)
    assert out.rows("settlements") == len(settlements)
    assert sorted(d["source_offset"] for d in out.dead) == sorted(expected)
    for d in out.dead:
        assert d["reason_code"] in expected[d["source_offset"]], d
    assert sum(out.reasons.values()) == len(settlements)
    # the corrupted copies never reach a table
    landed_offsets = set(out.tables["settlements"]["src_offset"])
    assert landed_offsets == {2 * i for i in range(len(settlements))}


def test_settlement_corruption_fields(subsystems: dict[str, Subsystem], stream: list[SimEvent],
                                      codec: Codec) -> None:
    """The dead letter names the field that broke the rule, with the fee line's index."""
    from yibao.sim.corrupt import bad_institution, bad_item_code, unknown_region

    key = bytes(range(32))
    proc = BatchProcessor(subsystems["settlement"], codec, Pseudonymizer(key, "t1"), Sealer(key, "t1"),
                          "yibao.settlement", lambda: LIMITS)
    ev = next(e for e in stream if e.record == SETTLEMENT)
    rng = random.Random(1)
    fields = {}
    for i, fn in enumerate((bad_institution, bad_item_code, unknown_region)):
        value, _ = fn(codec, ev, rng)
        out = proc.process([Message(0, i, None, value)])
        fields[fn.__name__] = out.dead[0]["field"]
    assert fields == {"bad_institution": "fixmedins_code", "bad_item_code": "fee_details[0].hilist_code",
                      "unknown_region": "insu_admdvs"}


def test_code_pattern_table_matches_domain_formats() -> None:
    """CODE_PATTERNS agree with the anchored regexes of the domain.md coding table."""
    domain = {
        "hospital": r"^H\d{11}$",
        "pharmacy": r"^P\d{11}$",
        "practitioner": r"^[DNY]\d{12}$",
        "western_drug": r"^X[A-Z]\d\d[A-Z]{2}[A-Z]\d{3}[A-Z]\d{3}\d{9}$",
        "patent_medicine": r"^Z[A-Z]\d\d[A-Z]{2}[A-Z]\d{4}\d{9}$",
        "consumable": r"^C\d{19}(\d{7})?$",
        "service_item": r"^\d{15}$",
        "icd10": r"^[A-Z]\d\d\.\d{3}(x\d{3})?$",
        "icd9cm3": r"^\d\d\.\d{4}(x\d{3})?$",
    }
    samples = [v for vs in (*VALID_CODES.values(), *INVALID_CODES.values()) for v in vs]
    for kind, rx in domain.items():
        ref = re.compile(rx, re.ASCII)
        for s in samples:
            if "\n" in s:  # `$` also matches before a final newline; the domain means the whole string
                continue
            assert bool(Code("c", kind)({"c": s}) is None) == bool(ref.search(s)), (kind, s)


# --- text limits and required fields (data: streams/data/fields.toml) ---------------------------------

RULES = FieldRules(max_chars=10, free_text={"note": 30},
                   required=(Required("Visit", "kind", frozenset({"21"}), ("adm_date", "drg_code"), "a stay"),))
SCHEMA = {"type": "record", "name": "Visit", "fields": [
    {"name": "id", "type": "string"},
    {"name": "note", "type": ["null", "string"]},
    {"name": "n", "type": "long"},
    {"name": "codes", "type": {"type": "array", "items": "string"}},
    {"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "L", "fields": [
        {"name": "sn", "type": "string"}, {"name": "cnt", "type": "long"}]}}},
]}
TEXT = compile_checks((RULES.text_check(SCHEMA),))


def visit(**kw: Any) -> dict[str, Any]:
    return {"id": "V1", "note": None, "n": 1, "codes": ["a"], "lines": [{"sn": "1", "cnt": 1}], **kw}


@pytest.mark.parametrize(("datum", "code", "fld"), [
    (visit(id="x" * 11), "FIELD_TOO_LONG", "id"),
    (visit(note="y" * 31), "FIELD_TOO_LONG", "note"),
    (visit(codes=["a", "z" * 11]), "FIELD_TOO_LONG", "codes[1]"),
    (visit(lines=[{"sn": "1", "cnt": 1}, {"sn": "2" * 11, "cnt": 1}]), "FIELD_TOO_LONG", "lines[1].sn"),
    (visit(id="V\x01"), "CONTROL_CHARACTER", "id"),
    (visit(id="V\t"), "CONTROL_CHARACTER", "id"),  # a tab is no part of an identifier
    (visit(id="V\x85"), "CONTROL_CHARACTER", "id"),  # C1 controls too
    (visit(note="a\x00b"), "CONTROL_CHARACTER", "note"),
    (visit(codes=["\x1b[2J"]), "CONTROL_CHARACTER", "codes[0]"),
    (visit(lines=[{"sn": "\x7f", "cnt": 1}]), "CONTROL_CHARACTER", "lines[0].sn"),
])
def test_text_check_rejects_long_and_control_character_strings_naming_the_field(
        datum: dict[str, Any], code: str, fld: str) -> None:
    v = TEXT(datum)
    assert v is not None and (v.reason_code, v.field) == (code, fld)


def test_text_check_accepts_limits_exactly_free_text_breaks_and_printable_unicode() -> None:
    assert TEXT(visit(id="x" * 10, note="y" * 30)) is None
    assert TEXT(visit(note="line one\r\n\tline two")) is None  # free text may break lines
    assert TEXT(visit(id="张三·李", note="\u3000全角空格")) is None  # not control characters
    assert TEXT(visit(codes=[], lines=[])) is None


def test_text_violation_detail_names_the_length_or_position_never_the_value() -> None:
    long = TEXT(visit(id="H" + "1" * 600_000))
    assert long is not None and long.detail == "id has 600,001 characters (at most 10)"
    ctl = TEXT(visit(note="secret-name\x07"))
    assert ctl is not None and ctl.detail == "note holds the control character U+0007 at position 11"
    assert "secret" not in ctl.detail


def test_text_check_covers_every_string_field_of_every_contract(codec: Codec) -> None:
    """Each record's text check names every string field of its Avro schema (nested included)."""
    rules = load_field_rules()
    for record in (r for rs in SUBJECT_RECORDS.values() for r in rs):
        schema = codec.record_schema(record)
        check = rules.text_check(schema)
        named = {f for f, _, _ in check.fields} | {f for f, _ in check.arrays}
        for f in schema["fields"]:
            types = f["type"] if isinstance(f["type"], list) else [f["type"]]
            if any(t == "string" or (isinstance(t, dict) and t.get("type") == "string") for t in types):
                assert f["name"] in named, (record, f["name"])
        for name, inner in check.lines:
            assert inner.fields, (record, name)


def test_required_when_dead_letters_a_stay_without_its_fields() -> None:
    check = compile_checks(RULES.required_checks("Visit"))
    full = visit(kind="21", adm_date=19_000, drg_code="ES23")
    assert check(full) is None
    assert check(visit(kind="11")) is None  # not a stay: nothing required
    for fld, blank in (("adm_date", None), ("drg_code", ""), ("drg_code", "  ")):
        v = check({**full, fld: blank})
        assert v is not None and (v.reason_code, v.field) == ("MISSING_FIELD", fld)
        assert v.detail == f"a stay (kind 21) has no {fld}"
    assert RULES.required_checks("Other") == ()


def test_inpatient_settlement_without_stay_fields_is_missing_field(subsystems: dict[str, Subsystem],
                                                                    stream: list[SimEvent], codec: Codec) -> None:
    spec = next(r for r in subsystems["settlement"].records if r.short_name == "Settlement")
    validate = compile_checks(record_checks(spec, codec.record_schema(spec.record)))
    stay = next(e.datum for e in stream if e.record == SETTLEMENT and e.datum["med_type"] == "21")
    assert validate(stay) is None
    for fld in ("adm_date", "dscg_date", "dscg_maindiag_code", "drg_code"):
        v = validate({**stay, fld: None})
        assert v is not None and (v.reason_code, v.field) == ("MISSING_FIELD", fld), v
    outpatient = next(e.datum for e in stream if e.record == SETTLEMENT and e.datum["med_type"] == "11")
    assert validate({**outpatient, "drg_code": None, "adm_date": None}) is None


def test_field_rules_file_loads_and_rejects_nonsense() -> None:
    rules = load_field_rules()
    assert rules.max_chars >= 30 and rules.free_text["hilist_name"] >= 100
    assert [r.record for r in rules.required] == ["Settlement"]
    with pytest.raises(ValueError):
        FieldRules(max_chars=0)
    with pytest.raises(ValueError):
        FieldRules.from_toml({"required": [{"record": "X", "when": "k", "values": [], "fields": ["a"]}]})


def test_malformed_event_detail_carries_nothing_of_the_data_from_the_exception() -> None:
    def boom(d: dict[str, Any]) -> bool:
        raise ValueError(f"cannot read {d['psn_cert_no']} of {d['psn_name']}")

    v = compile_checks((Predicate("X", "f", "d", boom),))({"psn_cert_no": "11010119900307123X", "psn_name": "张三"})
    assert v is not None and v.reason_code == "MALFORMED_EVENT"
    assert "11010119900307123X" not in v.detail and "张三" not in v.detail
    assert v.detail.startswith("ValueError raised in boom (test_validation.py:")
    missing = compile_checks((NonNegative(("amt",)),))({})  # the interpreter's message: a field name
    assert missing is not None and missing.detail == "KeyError: 'amt'"
