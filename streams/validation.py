"""Validation of decoded (raw) events: small declarative checks, compiled per record.

A check is a frozen dataclass naming what it checks (``Code("fixmedins_code", "institution")``,
``SumsTo("medfee_sumamt", (...))``). A record's checks are compiled into one Python function
(``compile_checks``) that runs them in order and returns the first violation, so a settlement with
ten fee lines costs one function call instead of ~100: the validation stage got ~3× cheaper that
way on these machines, the same idea fastjsonschema uses. Each check is also callable on its own
(it compiles itself), which is what the tests exercise, so there is one implementation per rule.

Code formats follow the 2019 national coding standards (see docs/design.md); every limit comes
from Settings. Values are raw (see schemas.codec): money in fen, times in epoch milliseconds,
dates in epoch days. Codes repeat heavily (a hospital, an item), so code checks memoize the values
they have accepted; a set lookup costs a fraction of a regex match.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.calendar import CHINA, CHINA_OFFSET_MS, DAY_MS

from .privacy import safe_error

_MEMO_LIMIT = 1_000_000

#: GB/T 2260 province-level prefixes that take part in the national platform.
PROVINCES = frozenset(
    ["11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37", "41",
     "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65"]
)

_A = re.ASCII  # \d must not accept full-width or other Unicode digits

CODE_PATTERNS: dict[str, re.Pattern[str]] = {
    "hospital": re.compile(r"H\d{11}", _A),
    "pharmacy": re.compile(r"P\d{11}", _A),
    "institution": re.compile(r"[HP]\d{11}", _A),
    "practitioner": re.compile(r"[DNY]\d{12}", _A),
    "western_drug": re.compile(r"X[A-Z]\d\d[A-Z]{2}[A-Z]\d{3}[A-Z]\d{3}\d{9}", _A),
    "patent_medicine": re.compile(r"Z[A-Z]\d\d[A-Z]{2}[A-Z]\d{4}\d{9}", _A),
    "consumable": re.compile(r"C\d{19}(\d{7})?", _A),
    "service_item": re.compile(r"\d{15}", _A),
    "list_item": re.compile(
        r"X[A-Z]\d\d[A-Z]{2}[A-Z]\d{3}[A-Z]\d{3}\d{9}"
        r"|Z[A-Z]\d\d[A-Z]{2}[A-Z]\d{4}\d{9}"
        r"|C\d{19}(\d{7})?"
        r"|\d{15}",
        _A,
    ),
    "product": re.compile(
        r"X[A-Z]\d\d[A-Z]{2}[A-Z]\d{3}[A-Z]\d{3}\d{9}"
        r"|Z[A-Z]\d\d[A-Z]{2}[A-Z]\d{4}\d{9}"
        r"|C\d{19}(\d{7})?",
        _A,
    ),
    "icd10": re.compile(r"[A-Z]\d\d\.\d{3}(x\d{3})?", _A),
    "icd9cm3": re.compile(r"\d\d\.\d{4}(x\d{3})?", _A),
    "admdvs": re.compile(r"\d{6}", _A),
    "credit_code": re.compile(r"[0-9A-HJ-NPQRTUWXY]{2}\d{6}[0-9A-HJ-NPQRTUWXY]{10}", _A),
    "trace_code": re.compile(r"\d{20}", _A),
}


@dataclass(frozen=True)
class Violation:
    """Why an event is rejected: a machine-readable code, the field, a readable detail."""

    reason_code: str
    field: str
    detail: str


Validator = Callable[[dict[str, Any]], Violation | None]


@dataclass(frozen=True)
class Limits:
    """Clock-dependent limits (recomputed by the caller's clock, not per event)."""

    now_ms: int
    max_future_skew_ms: int
    min_event_ms: int

    @classmethod
    def from_settings(cls, max_future_skew_s: int, min_event_year: int, now_ms: int | None = None) -> Limits:
        import datetime as dt

        start = dt.datetime(min_event_year, 1, 1, tzinfo=CHINA)
        return cls(
            now_ms=now_ms if now_ms is not None else int(time.time() * 1000),
            max_future_skew_ms=max_future_skew_s * 1000,
            min_event_ms=int(start.timestamp() * 1000),
        )


# --- compilation ---------------------------------------------------------------------------------


class Emitter:
    """Source lines and constants of one compiled validator."""

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {"_V": Violation, "_safe_error": safe_error}
        self.prologue: list[str] = []
        self._n = 0
        self._ids: dict[int, str] = {}

    def const(self, value: Any, hint: str = "c") -> str:
        """A name bound to ``value`` in the generated function's globals (shared per object)."""
        key = id(value)
        if key in self._ids:
            return self._ids[key]
        self._n += 1
        name = f"_{hint}{self._n}"
        self.ns[name] = value
        self._ids[key] = name
        return name

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"_{hint}{self._n}"


def _fail(code: str, path: str, fld: str, detail: str) -> str:
    """``return _V(...)`` with the field path (``path`` is a Python str expression) and detail."""
    return f"return _V({code!r}, {path} + {fld!r}, {detail})"


class CheckBase:
    """Every check emits Python lines that ``return`` a Violation when the datum breaks it."""

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        raise NotImplementedError

    def __call__(self, d: dict[str, Any], /) -> Violation | None:
        fn = self.__dict__.get("_compiled")
        if fn is None:
            fn = compile_checks((self,), type(self).__name__)
            object.__setattr__(self, "_compiled", fn)
        return fn(d)


Check = CheckBase


def compile_checks(checks: Sequence[CheckBase], name: str = "validate") -> Validator:
    """One function running ``checks`` in order; a check that crashes is a MALFORMED_EVENT (one bad
    event must never fail its whole batch)."""
    e = Emitter()
    body: list[str] = []
    for c in checks:
        body.extend(c.emit(e, "d", '""'))
    ident = re.sub(r"\W", "_", name)
    src = [f"def {ident}(d):", "    try:"]
    src += ["        " + line for line in (*e.prologue, *body)] or ["        pass"]
    src += [
        "    except Exception as exc:",
        "        return _V('MALFORMED_EVENT', '', _safe_error(exc))",
        "    return None",
    ]
    code = compile("\n".join(src), f"<checks {name}>", "exec")
    exec(code, e.ns)
    fn: Validator = e.ns[ident]
    fn.__doc__ = "\n".join(src)
    return fn


def run_checks(checks: Sequence[CheckBase], datum: dict[str, Any]) -> Violation | None:
    """First violation of ``datum`` (compiles on each call: for tests and one-offs)."""
    return compile_checks(checks)(datum)


def _memo_code_lines(e: Emitter, var: str, path: str, fld: str, ok: str, bad_lines: list[str],
                     good_test: str, optional: bool, missing_code: str = "MISSING_CODE") -> list[str]:
    return [
        f"v = {var}.get({fld!r})",
        f"if v not in {ok}:",
        "    if v is None or v == '':",
        f"        {'pass' if optional else _fail(missing_code, path, fld, repr(f'{fld} is empty'))}",
        *[f"    {line}" for line in bad_lines],
        f"    elif {good_test} and len({ok}) < {_MEMO_LIMIT}:",
        f"        {ok}.add(v)",
    ]


# --- checks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventId(CheckBase):
    """``event_id`` is a UUID: it is the identity every table uses to recognize a redelivery."""

    field: str = "event_id"

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        pat = e.const(_UUID.fullmatch, "uuid")
        f = self.field
        return [
            f"v = {var}.get({f!r})",
            f"if v.__class__ is not str or {pat}(v) is None:",
            "    " + _fail("INVALID_EVENT_ID", path, f, f'f"{f}={{v!r}} is not a UUID"'),
        ]


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)


@dataclass(frozen=True)
class NotBlank(CheckBase):
    field: str

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f = self.field
        return [
            f"v = {var}.get({f!r})",
            "if not v or (v.__class__ is str and not v.strip()):",
            "    " + _fail("MISSING_FIELD", path, f, repr(f"{f} is empty")),
        ]


@dataclass(frozen=True)
class Code(CheckBase):
    """``field`` matches the named national code format (optional: None/'' allowed)."""

    field: str
    kind: str
    optional: bool = False
    _ok: set[str] = dataclasses.field(default_factory=set, compare=False, repr=False)

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f = self.field
        ok = e.const(self._ok, "ok")
        pat = e.const(CODE_PATTERNS[self.kind].fullmatch, "pat")
        detail = f'f"{f}={{v!r}} is not a valid {self.kind} code"'
        return _memo_code_lines(
            e, var, path, f, ok,
            [f"elif {pat}(v) is None:", "    " + _fail("INVALID_CODE", path, f, detail)],
            "True", self.optional,
        )


@dataclass(frozen=True)
class Region(CheckBase):
    """``field`` is a 6-digit admdvs code of a known province (pooling codes XXXX99/XX9900 allowed)."""

    field: str
    _ok: set[str] = dataclasses.field(default_factory=set, compare=False, repr=False)

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f = self.field
        ok = e.const(self._ok, "ok")
        prov = e.const(PROVINCES, "prov")
        return [
            f"v = {var}.get({f!r})",
            f"if v not in {ok}:",
            "    if not isinstance(v, str) or len(v) != 6 or not v.isascii() or not v.isdigit():",
            "        " + _fail("INVALID_REGION", path, f, f'f"{f}={{v!r}} is not a 6-digit admdvs code"'),
            f"    if v[:2] not in {prov}:",
            "        " + _fail("UNKNOWN_REGION", path, f, f'f"{f}={{v!r}}: no province {{v[:2]}}"'),
            f"    {ok}.add(v)",
        ]


@dataclass(frozen=True)
class OneOf(CheckBase):
    field: str
    allowed: frozenset[str]

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f = self.field
        allowed = e.const(self.allowed, "set")
        listing = ", ".join(sorted(self.allowed))
        return [
            f"if {var}.get({f!r}) not in {allowed}:",
            "    " + _fail("UNKNOWN_CODE_VALUE", path, f, f'f"{f}={{{var}.get({f!r})!r}} not in {listing}"'),
        ]


@dataclass(frozen=True)
class NonNegative(CheckBase):
    fields: tuple[str, ...]

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        out = []
        for f in self.fields:
            out += [
                f"v = {var}[{f!r}]",
                "if v is not None and v < 0:",
                "    " + _fail("NEGATIVE_AMOUNT", path, f, f'f"{f} is negative ({{v}} in units of the last place)"'),
            ]
        return out


@dataclass(frozen=True)
class Positive(CheckBase):
    fields: tuple[str, ...]

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        out = []
        for f in self.fields:
            out += [f"v = {var}[{f!r}]", "if v is not None and v <= 0:",
                    "    " + _fail("NON_POSITIVE_QUANTITY", path, f, repr(f"{f} must be > 0"))]
        return out


@dataclass(frozen=True)
class Fits(CheckBase):
    """An integer field within ``lo..hi`` (both inclusive): the range of the ClickHouse column it
    lands in (see :func:`streams.base.range_checks`). A value beyond it would fail its whole batch's
    INSERT, and the batch would fail again after every restart."""

    field: str
    lo: int
    hi: int
    column: str

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f = self.field
        detail = f'f"{f} = {{v}} does not fit {self.column} ({self.lo}..{self.hi} in raw units)"'
        return [f"v = {var}.get({f!r})",
                f"if type(v) is int and not {self.lo} <= v <= {self.hi}:",
                "    " + _fail("OUT_OF_RANGE", path, f, detail)]


@dataclass(frozen=True)
class SumsTo(CheckBase):
    """``total`` equals the sum of ``parts`` within ``tolerance`` (unscaled units; 1 = 0.01 CNY)."""

    total: str
    parts: tuple[str, ...]
    tolerance: int = 1

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        s = " + ".join(f"{var}[{p!r}]" for p in self.parts)
        t, tol = self.total, self.tolerance
        names = " + ".join(self.parts)
        detail = f'f"{names} = {{_s / 100:.2f}} but {t} = {{{var}[{t!r}] / 100:.2f}}"'
        return [
            f"_s = {s}",
            f"if not -{tol} <= {var}[{t!r}] - _s <= {tol}:",
            "    " + _fail("AMOUNTS_DO_NOT_ADD_UP", path, t, detail),
        ]


@dataclass(frozen=True)
class AtMost(CheckBase):
    """``field`` ≤ ``bound_field`` (e.g. in-scope amount within the total)."""

    field: str
    bound_field: str

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f, b = self.field, self.bound_field
        return [f"if {var}[{f!r}] > {var}[{b!r}]:",
                "    " + _fail("AMOUNT_EXCEEDS_TOTAL", path, f, repr(f"{f} exceeds {b}"))]


@dataclass(frozen=True)
class AmountMatches(CheckBase):
    """``amount`` (fen) ≈ ``qty`` (scale 4) × ``price`` (scale 6), within a fen (per-line rounding)."""

    amount: str
    qty: str
    price: str

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        a, q, p = self.amount, self.qty, self.price
        return [
            f"if abs(({var}[{q!r}] * {var}[{p!r}] + 50_000_000) // 100_000_000 - {var}[{a!r}]) > 1:",
            "    " + _fail("AMOUNTS_DO_NOT_ADD_UP", path, a, repr(f"{a} differs from {q} × {p} by more than 0.01")),
        ]


@dataclass(frozen=True)
class EventTime(CheckBase):
    """Event time is neither in the future (beyond the skew) nor before the platform's start."""

    field: str
    limits: Callable[[], Limits]

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        fn = e.const(self.limits, "limits")
        lim = f"{fn}_now"
        if f"{lim} = {fn}()" not in e.prologue:
            e.prologue.append(f"{lim} = {fn}()")
        f = self.field
        return [
            f"v = {var}.get({f!r})",
            "if v is not None:",
            f"    if v > {lim}.now_ms + {lim}.max_future_skew_ms:",
            "        " + _fail("FUTURE_TIME", path, f, repr(f"{f} is in the future")),
            f"    if v < {lim}.min_event_ms:",
            "        " + _fail("TIME_TOO_OLD", path, f, repr(f"{f} is before the platform's start")),
        ]


@dataclass(frozen=True)
class DateOrder(CheckBase):
    """``earlier`` ≤ ``later`` (+ slack); each a date (days) or a timestamp (ms).

    A date against a timestamp compares China calendar days (the platform's dates are local).
    """

    earlier: str
    later: str
    earlier_is_date: bool = True
    later_is_date: bool = True
    slack_ms: int = 0

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        if self.earlier_is_date == self.later_is_date:
            a, b, slack = "_a", "_b", self.slack_ms // DAY_MS if self.earlier_is_date else self.slack_ms
        else:
            day = f"(({{}} + {CHINA_OFFSET_MS}) // {DAY_MS})"
            a = "_a" if self.earlier_is_date else day.format("_a")
            b = "_b" if self.later_is_date else day.format("_b")
            slack = self.slack_ms // DAY_MS
        return [
            f"_a = {var}.get({self.earlier!r})",
            f"_b = {var}.get({self.later!r})",
            f"if _a is not None and _b is not None and {a} > {b} + {slack}:",
            "    " + _fail("BAD_DATE_ORDER", path, self.earlier, repr(f"{self.earlier} is after {self.later}")),
        ]


@dataclass(frozen=True)
class BirthDate(CheckBase):
    """Birth date (days) not after the event's China-time date, and an age below ``max_age`` years."""

    field: str
    event_field: str
    max_age: int = 130

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f, t = self.field, self.event_field
        return [
            f"_a = {var}.get({f!r})",
            f"_b = {var}.get({t!r})",
            "if _a is not None and _b is not None:",
            f"    _b = (_b + {CHINA_OFFSET_MS}) // {DAY_MS}",
            "    if _a > _b:",
            "        " + _fail("BAD_DATE_ORDER", path, f, repr(f"{f} is after {t}")),
            f"    if (_b - _a) >= {self.max_age * 365.2425!r}:",
            "        " + _fail("IMPLAUSIBLE_DATE", path, f, repr(f"{f} implies an age of {self.max_age} or more")),
        ]


@dataclass(frozen=True)
class Each(CheckBase):
    """Apply ``checks`` to every element of a list field; ``min_items`` guards empty lists."""

    field: str
    checks: tuple[CheckBase, ...]
    min_items: int = 0

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f = self.field
        items, i, item = e.fresh("items"), e.fresh("i"), e.fresh("item")
        inner_path = f'{path} + f"{f}[{{{i}}}]."'
        body: list[str] = []
        for c in self.checks:
            body.extend(c.emit(e, item, inner_path))
        return [
            f"{items} = {var}.get({f!r}) or ()",
            f"if len({items}) < {self.min_items}:",
            "    " + _fail("MISSING_DETAILS", path, f, f'f"{f} has {{len({items})}} items"'),
            f"for {i}, {item} in enumerate({items}):",
            *(["    " + line for line in body] or ["    pass"]),
        ]


@dataclass(frozen=True)
class EachString(CheckBase):
    """Every string of a list field matches a code format."""

    field: str
    kind: str

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        f = self.field
        pat = e.const(CODE_PATTERNS[self.kind].fullmatch, "pat")
        i = e.fresh("i")
        detail = f'f"{{v!r}} is not a valid {self.kind} code"'
        return [
            f"for {i}, v in enumerate({var}.get({f!r}) or ()):",
            f"    if {pat}(v) is None:",
            f'        return _V("INVALID_CODE", {path} + f"{f}[{{{i}}}]", {detail})',
        ]


@dataclass(frozen=True)
class LinesSumTo(CheckBase):
    """Σ line amounts equals the total within one fen per line (the platform rounds per line)."""

    lines: str
    line_amount: str
    total: str

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        ln, la, t = self.lines, self.line_amount, self.total
        lines = e.fresh("lines")
        detail = f'f"fee lines sum to {{_s / 100:.2f}} but {t} = {{{var}[{t!r}] / 100:.2f}}"'
        return [
            f"{lines} = {var}.get({ln!r}) or ()",
            f"_s = sum(x[{la!r}] for x in {lines})",
            f"if abs(_s - {var}[{t!r}]) > max(1, len({lines})):",
            "    " + _fail("AMOUNTS_DO_NOT_ADD_UP", path, t, detail),
        ]


#: C0 and C1 control characters; tab, line feed and carriage return are allowed in free text only.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_FREE_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Text(CheckBase):
    """Every string field within its length and free of control characters (``FIELD_TOO_LONG``,
    ``CONTROL_CHARACTER``); the detail names the field, the length or the character's position,
    never the value.

    ``fields``: (name, most characters, free text?) of the event's own string fields; ``arrays``:
    string-array fields; ``lines``: a nested record list and its own Text check. Built from the
    Avro schema by :func:`streams.fields.FieldRules.text_check`, so no string field is missed.
    """

    fields: tuple[tuple[str, int, bool], ...] = ()
    arrays: tuple[tuple[str, int], ...] = ()
    lines: tuple[tuple[str, Text], ...] = ()

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        ids = e.const(_CONTROL.search, "ctl")
        free = e.const(_CONTROL_IN_FREE_TEXT.search, "ctlfree")
        out: list[str] = []
        for f, most, is_free in self.fields:
            out += [f"v = {var}.get({f!r})", "if v.__class__ is str:",
                    *("    " + line for line in _text_lines(path, repr(f), most, free if is_free else ids))]
        for f, most in self.arrays:
            i = e.fresh("i")
            out += [f"for {i}, v in enumerate({var}.get({f!r}) or ()):",
                    *("    " + line for line in _text_lines(path, f'f"{f}[{{{i}}}]"', most, ids))]
        for f, inner in self.lines:
            i, item = e.fresh("i"), e.fresh("item")
            body = inner.emit(e, item, f'{path} + f"{f}[{{{i}}}]."')
            out += [f"for {i}, {item} in enumerate({var}.get({f!r}) or ()):", *("    " + line for line in body)]
        return out


def _text_lines(path: str, fld: str, most: int, search: str) -> list[str]:
    """Lines checking the str ``v`` named by the Python expression ``fld``."""
    return [
        f"if len(v) > {most}:",
        f'    return _V("FIELD_TOO_LONG", {path} + {fld}, {fld} + f" has {{len(v):,}} characters '
        f'(at most {most})")',
        "if not v.isprintable():",  # fast for the usual case; the regex then finds the character
        f"    _m = {search}(v)",
        "    if _m is not None:",
        f'        return _V("CONTROL_CHARACTER", {path} + {fld}, {fld} + f" holds the control character '
        f'U+{{ord(_m.group()):04X}} at position {{_m.start()}}")',
    ]


@dataclass(frozen=True)
class RequiredWhen(CheckBase):
    """``fields`` are present (not null, not blank) when ``when`` has one of ``values``
    (``MISSING_FIELD``): e.g. an inpatient settlement's admission and discharge dates."""

    when: str
    values: frozenset[str]
    fields: tuple[str, ...]
    what: str

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        vals = e.const(self.values, "when")
        out = [f"if {var}.get({self.when!r}) in {vals}:"]
        for f in self.fields:
            detail = repr(f"{self.what} ({self.when} ") + f" + {var}[{self.when!r}] + " + repr(f") has no {f}")
            out += [f"    v = {var}.get({f!r})",
                    "    if v is None or (v.__class__ is str and not v.strip()):",
                    "        " + _fail("MISSING_FIELD", path, f, detail)]
        return out


@dataclass(frozen=True)
class Predicate(CheckBase):
    """An arbitrary rule with its own reason code, for the rare check that fits nothing above."""

    reason_code: str
    field: str
    detail: str
    ok: Callable[[dict[str, Any]], bool]

    def emit(self, e: Emitter, var: str, path: str) -> list[str]:
        fn = e.const(self.ok, "pred")
        return [f"if not {fn}({var}):", "    " + _fail(self.reason_code, path, self.field, repr(self.detail))]
