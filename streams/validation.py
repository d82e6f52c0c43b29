"""Validation of decoded (raw) events: small declarative checks composed per record.

A check is a frozen object with a ``__call__(datum) -> Violation | None``; a record's validator is
the tuple of its checks, run in order, first violation wins. Code formats follow the 2019 national
coding standards (see docs/design.md); every limit comes from Settings so nothing is hard-coded.
Values are raw (see schemas.codec): money in fen, times in epoch milliseconds, dates in epoch days.

Hot-path note: codes repeat heavily (a hospital, an item), so each code check memoizes the values
it has already accepted; a set lookup costs a fraction of a regex match.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

DAY_MS = 86_400_000

#: GB/T 2260 province-level prefixes that take part in the national platform.
PROVINCES = frozenset(
    ["11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37", "41",
     "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65"]
)

CODE_PATTERNS: dict[str, re.Pattern[str]] = {
    "hospital": re.compile(r"H\d{11}"),
    "pharmacy": re.compile(r"P\d{11}"),
    "institution": re.compile(r"[HP]\d{11}"),
    "practitioner": re.compile(r"[DNY]\d{12}"),
    "western_drug": re.compile(r"X[A-Z]\d\d[A-Z]{2}[A-Z]\d{3}[A-Z]\d{3}\d{9}"),
    "patent_medicine": re.compile(r"Z[A-Z]\d\d[A-Z]{2}[A-Z]\d{4}\d{9}"),
    "consumable": re.compile(r"C\d{19}(\d{7})?"),
    "service_item": re.compile(r"\d{15}"),
    "list_item": re.compile(
        r"X[A-Z]\d\d[A-Z]{2}[A-Z]\d{3}[A-Z]\d{3}\d{9}"
        r"|Z[A-Z]\d\d[A-Z]{2}[A-Z]\d{4}\d{9}"
        r"|C\d{19}(\d{7})?"
        r"|\d{15}"
    ),
    "product": re.compile(
        r"X[A-Z]\d\d[A-Z]{2}[A-Z]\d{3}[A-Z]\d{3}\d{9}"
        r"|Z[A-Z]\d\d[A-Z]{2}[A-Z]\d{4}\d{9}"
        r"|C\d{19}(\d{7})?"
    ),
    "icd10": re.compile(r"[A-Z]\d\d\.\d{3}(x\d{3})?"),
    "icd9cm3": re.compile(r"\d\d\.\d{4}(x\d{3})?"),
    "admdvs": re.compile(r"\d{6}"),
    "credit_code": re.compile(r"[0-9A-HJ-NPQRTUWXY]{2}\d{6}[0-9A-HJ-NPQRTUWXY]{10}"),
    "trace_code": re.compile(r"\d{20}"),
}


@dataclass(frozen=True)
class Violation:
    """Why an event is rejected: a machine-readable code, the field, a readable detail."""

    reason_code: str
    field: str
    detail: str


class Check(Protocol):
    def __call__(self, d: dict[str, Any], /) -> Violation | None: ...


@dataclass(frozen=True)
class Limits:
    """Clock-dependent limits, taken from Settings once per batch."""

    now_ms: int
    max_future_skew_ms: int
    min_event_ms: int

    @classmethod
    def from_settings(cls, max_future_skew_s: int, min_event_year: int, now_ms: int | None = None) -> Limits:
        import datetime as dt

        start = dt.datetime(min_event_year, 1, 1, tzinfo=dt.UTC)
        return cls(
            now_ms=now_ms if now_ms is not None else int(time.time() * 1000),
            max_future_skew_ms=max_future_skew_s * 1000,
            min_event_ms=int(start.timestamp() * 1000),
        )


# --- checks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """``field`` matches the named national code format (optional: None/'' allowed)."""

    field: str
    kind: str
    optional: bool = False
    _ok: set[str] = dataclasses.field(default_factory=set, compare=False, repr=False)

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        v = d.get(self.field)
        if v in self._ok:
            return None
        if v is None or v == "":
            if self.optional:
                return None
            return Violation("MISSING_CODE", self.field, f"{self.field} is empty")
        if CODE_PATTERNS[self.kind].fullmatch(v) is None:
            return Violation("INVALID_CODE", self.field, f"{self.field}={v!r} is not a valid {self.kind} code")
        if len(self._ok) < 1_000_000:
            self._ok.add(v)
        return None


@dataclass(frozen=True)
class Region:
    """``field`` is a 6-digit admdvs code of a known province (pooling codes XXXX99/XX9900 allowed)."""

    field: str
    _ok: set[str] = dataclasses.field(default_factory=set, compare=False, repr=False)

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        v = d.get(self.field)
        if v in self._ok:
            return None
        if not isinstance(v, str) or not v.isdigit() or len(v) != 6 or not v.isascii():
            return Violation("INVALID_REGION", self.field, f"{self.field}={v!r} is not a 6-digit admdvs code")
        if v[:2] not in PROVINCES:
            return Violation("UNKNOWN_REGION", self.field, f"{self.field}={v!r}: no province {v[:2]}")
        self._ok.add(v)
        return None


@dataclass(frozen=True)
class InstitutionRegion:
    """The region embedded in an institution code is in the same province as ``region_field``."""

    code_field: str
    region_field: str

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        code, region = d.get(self.code_field), d.get(self.region_field)
        if not code or not region or code[1:3] == region[:2]:
            return None
        return Violation(
            "REGION_MISMATCH",
            self.code_field,
            f"{self.code_field}={code} is in province {code[1:3]}, but {self.region_field}={region}",
        )


@dataclass(frozen=True)
class OneOf:
    field: str
    allowed: frozenset[str]

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        v = d.get(self.field)
        if v in self.allowed:
            return None
        return Violation(
            "UNKNOWN_CODE_VALUE", self.field, f"{self.field}={v!r} not in {', '.join(sorted(self.allowed))}"
        )


@dataclass(frozen=True)
class NonNegative:
    fields: tuple[str, ...]

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        for f in self.fields:
            v = d.get(f)
            if v is not None and v < 0:
                return Violation("NEGATIVE_AMOUNT", f, f"{f} is negative ({v / 100:.2f})")
        return None


@dataclass(frozen=True)
class Positive:
    fields: tuple[str, ...]

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        for f in self.fields:
            v = d.get(f)
            if v is not None and v <= 0:
                return Violation("NON_POSITIVE_QUANTITY", f, f"{f} must be > 0")
        return None


@dataclass(frozen=True)
class SumsTo:
    """``total`` equals the sum of ``parts`` within ``tolerance`` (unscaled units; 1 = 0.01 CNY)."""

    total: str
    parts: tuple[str, ...]
    tolerance: int = 1

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        s = 0
        for p in self.parts:
            s += d[p]
        diff = d[self.total] - s
        if -self.tolerance <= diff <= self.tolerance:
            return None
        return Violation(
            "AMOUNTS_DO_NOT_ADD_UP",
            self.total,
            f"{' + '.join(self.parts)} = {s / 100:.2f} but {self.total} = {d[self.total] / 100:.2f}",
        )


@dataclass(frozen=True)
class AtMost:
    """``field`` ≤ ``bound_field`` (e.g. in-scope amount within the total)."""

    field: str
    bound_field: str

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        if d[self.field] <= d[self.bound_field]:
            return None
        return Violation("AMOUNT_EXCEEDS_TOTAL", self.field, f"{self.field} exceeds {self.bound_field}")


@dataclass(frozen=True)
class EventTime:
    """Event time is neither in the future (beyond the skew) nor before the platform's start."""

    field: str
    limits: Callable[[], Limits]

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        v = d.get(self.field)
        if v is None:
            return None
        lim = self.limits()
        if v > lim.now_ms + lim.max_future_skew_ms:
            return Violation("FUTURE_TIME", self.field, f"{self.field} is in the future")
        if v < lim.min_event_ms:
            return Violation("TIME_TOO_OLD", self.field, f"{self.field} is before the platform's start")
        return None


@dataclass(frozen=True)
class DateOrder:
    """``earlier`` ≤ ``later``; either may be a date (days) or a timestamp (ms), marked by kind."""

    earlier: str
    later: str
    earlier_is_date: bool = True
    later_is_date: bool = True
    slack_ms: int = 0

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        a, b = d.get(self.earlier), d.get(self.later)
        if a is None or b is None:
            return None
        a_ms = a * DAY_MS if self.earlier_is_date else a
        b_ms = b * DAY_MS if self.later_is_date else b
        if a_ms <= b_ms + self.slack_ms:
            return None
        return Violation("BAD_DATE_ORDER", self.earlier, f"{self.earlier} is after {self.later}")


@dataclass(frozen=True)
class BirthDate:
    """Birth date before the event and an age below ``max_age`` years."""

    field: str
    event_field: str
    max_age: int = 130

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        b, t = d.get(self.field), d.get(self.event_field)
        if b is None or t is None:
            return None
        if b * DAY_MS > t:
            return Violation("BAD_DATE_ORDER", self.field, f"{self.field} is after {self.event_field}")
        if (t // DAY_MS - b) > self.max_age * 366:
            return Violation("IMPLAUSIBLE_DATE", self.field, f"{self.field} implies an age over {self.max_age}")
        return None


@dataclass(frozen=True)
class Each:
    """Apply ``checks`` to every element of a list field; ``min_items`` guards empty lists."""

    field: str
    checks: tuple[Check, ...]
    min_items: int = 0

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        items = d.get(self.field) or ()
        if len(items) < self.min_items:
            return Violation("MISSING_DETAILS", self.field, f"{self.field} has {len(items)} items")
        for i, item in enumerate(items):
            for check in self.checks:
                v = check(item)
                if v is not None:
                    return Violation(v.reason_code, f"{self.field}[{i}].{v.field}", v.detail)
        return None


@dataclass(frozen=True)
class EachString:
    """Every string of a list field matches a code format."""

    field: str
    kind: str

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        pat = CODE_PATTERNS[self.kind]
        for i, v in enumerate(d.get(self.field) or ()):
            if pat.fullmatch(v) is None:
                return Violation("INVALID_CODE", f"{self.field}[{i}]", f"{v!r} is not a valid {self.kind} code")
        return None


@dataclass(frozen=True)
class LinesSumTo:
    """Σ line amounts equals the total within one fen per line (the platform rounds per line)."""

    lines: str
    line_amount: str
    total: str

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        lines = d.get(self.lines) or ()
        s = sum(line[self.line_amount] for line in lines)
        if abs(s - d[self.total]) <= max(1, len(lines)):
            return None
        return Violation(
            "AMOUNTS_DO_NOT_ADD_UP",
            self.total,
            f"fee lines sum to {s / 100:.2f} but {self.total} = {d[self.total] / 100:.2f}",
        )


@dataclass(frozen=True)
class Predicate:
    """An arbitrary rule with its own reason code, for the rare check that fits nothing above."""

    reason_code: str
    field: str
    detail: str
    ok: Callable[[dict[str, Any]], bool]

    def __call__(self, d: dict[str, Any]) -> Violation | None:
        return None if self.ok(d) else Violation(self.reason_code, self.field, self.detail)


def run_checks(checks: Sequence[Check], datum: dict[str, Any]) -> Violation | None:
    """First violation of ``datum`` against ``checks``, or None; a crashing check is a violation too."""
    try:
        for check in checks:
            v = check(datum)
            if v is not None:
                return v
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return Violation("MALFORMED_EVENT", "", f"{type(exc).__name__}: {exc}"[:300])
    return None
