"""Columnar validation: which rows of a raw frame the record validator is sure to accept.

The columnar path (schemas.columnar) holds a batch of one record's events as a polars frame. Its
validation is a *mask*, not a second validator: a row gets True only when the record path's
compiled checks (streams.validation.compile_checks) would return None for that row's datum
(``frame.to_dicts()[i]``); every other row goes back to the record path, which finds the exact
violation and dead-letters it. So the one hard rule is soundness (a True for a bad event would land
it in a fund's books); completeness only decides how many events take the fast path.

Each check class maps to a small function (the registry below) that turns the check into a polars
expression meaning "this check passes without raising". The record validator returns None exactly
when every check passes and none raises, so the mask is the conjunction of those expressions.
Dispatch is on the exact class: a subclass may emit different code, so it is not assumed to mean
the same. A check the mask cannot express soundly makes :func:`compile_mask` return None and the
whole record stays on the record path.

Where Python and polars differ, the mask follows Python:

* regexes are translated from Python's own parse of the pattern, never copied: ``\\d`` becomes
  ``[0-9]``, every literal a ``\\x{..}`` escape, and a fullmatch is anchored with ``\\A…\\z``;
* "blank" is Python's ``str.strip()`` whitespace, listed from ``str.isspace`` (polars' notion of
  whitespace differs, e.g. for U+001C–U+001F);
* lengths count characters (``len_chars``), as Python's ``len`` does;
* sums, differences and products run in Int128, where those of 64-bit values are exact as Python
  ints are (in Int64 polars wraps silently: 2**32 · 2**32 is 0, ``abs`` of the minimum negative);
* a null is whatever None does in the generated code: passes a ``.get`` check, raises (so
  rejects) in arithmetic, and an absent column is a key the datum does not have.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from schemas.calendar import CHINA_OFFSET_MS, DAY_MS

from .validation import (
    _CONTROL,
    _CONTROL_IN_FREE_TEXT,
    _UUID,
    CODE_PATTERNS,
    PROVINCES,
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
    Region,
    RequiredWhen,
    SumsTo,
    Text,
)

MaskFn = Callable[[pl.DataFrame], pl.Series]
Clock = Callable[[], Limits]
#: The clocks' readings of one mask evaluation, by ``id`` of the clock.
Env = Mapping[int, Limits]



class _Unsupported(Exception):
    """A check (or a part of it) the mask cannot express soundly."""


# --- dtypes and small expressions --------------------------------------------------------------


def _int_ranges() -> dict[type[pl.DataType], tuple[int, int]]:
    out: dict[type[pl.DataType], tuple[int, int]] = {}
    for bits in (8, 16, 32, 64, 128):
        signed = getattr(pl, f"Int{bits}", None)
        unsigned = getattr(pl, f"UInt{bits}", None)
        if signed is not None:
            out[signed] = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if unsigned is not None:
            out[unsigned] = (0, 2**bits - 1)
    return out


_INT_RANGES = _int_ranges()


def _int_range(dt: pl.DataType) -> tuple[int, int] | None:
    return _INT_RANGES.get(dt.base_type())


def _inst(dt: Any) -> pl.DataType:
    """A dtype instance (polars may hand out a parameterless dtype's class)."""
    out: pl.DataType = dt if isinstance(dt, pl.DataType) else dt()
    return out


def _is_str(dt: pl.DataType) -> bool:
    return dt == pl.String


def _never_str(dt: pl.DataType) -> bool:
    """``to_dicts`` never gives a ``str`` for this dtype (Categorical and Object may)."""
    return dt.is_numeric() or dt.is_temporal() or dt.is_nested() or dt in (pl.Boolean, pl.Null, pl.Binary)


def _never_int(dt: pl.DataType) -> bool:
    """``to_dicts`` never gives an ``int`` (``bool`` is not one for ``type(v) is int``)."""
    return (dt.is_float() or dt.is_decimal() or dt.is_temporal() or dt.is_nested()
            or dt in (pl.String, pl.Boolean, pl.Null, pl.Binary))


def _lit(value: bool) -> pl.Expr:
    return pl.lit(value, dtype=pl.Boolean)


def _conj(terms: Sequence[pl.Expr]) -> pl.Expr:
    """All of ``terms``, as a balanced tree of ``&``: polars plans a long chain or a wide
    ``all_horizontal`` in time quadratic in its length (≈6 ms per call for a hundred terms)."""
    if not terms:
        return _lit(True)
    if len(terms) == 1:
        return terms[0]
    mid = len(terms) // 2
    return _conj(terms[:mid]) & _conj(terms[mid:])


def _within(e: pl.Expr, dt: pl.DataType, lo: int, hi: int) -> pl.Expr:
    """``lo <= e <= hi`` for an integer ``e`` of ``dt`` (bounds clamped to the dtype, so no
    literal is out of range; nulls are the caller's business)."""
    rng = _int_range(dt)
    if rng is None:
        raise _Unsupported(f"not an integer dtype: {dt}")
    dlo, dhi = rng
    if lo > hi or lo > dhi or hi < dlo:
        return _lit(False)
    if lo > dlo and hi < dhi:
        return e.is_between(lo, hi)
    if lo > dlo:
        return e >= lo
    return e <= hi if hi < dhi else _lit(True)


def _wide(scope: _Scope, name: str) -> pl.Expr | None:
    """An integer field as Int128, where sums and products of 64-bit values are exact (as Python
    ints are) instead of wrapping; None when the field is absent or not a ≤ 64-bit integer."""
    dt = scope.dtype(name)
    rng = None if dt is None else _int_range(dt)
    if rng is None or rng[0] < -(2**63) or rng[1] > 2**64 - 1:
        return None
    return scope.col(name).cast(pl.Int128)


def _all_items(v: pl.Expr, item_ok: pl.Expr) -> pl.Expr:
    """Every element of the list ``v`` satisfies ``item_ok`` (an expression of ``pl.element()``);
    true for an empty list, null for a null list."""
    return v.list.eval(item_ok.fill_null(False)).list.all()


# --- regexes -----------------------------------------------------------------------------------


def _hex(c: int) -> str:
    return f"\\x{{{c:x}}}"


@dataclass(frozen=True)
class _Lang:
    """What the strings a regex accepts are made of: at most ``max_len`` characters, each within
    ``chars`` (code point intervals; None: any character)."""

    max_len: float
    chars: tuple[tuple[int, int], ...] | None

    def clean(self, most: int, control: re.Pattern[str]) -> bool:
        """Every such string, and '', passes Text's length and control-character test."""
        ctl = _class_chars(control)
        if self.max_len > most or self.chars is None or ctl is None:
            return False
        return not any(lo <= ord(ch) <= hi for ch in ctl for lo, hi in self.chars)


_ANY_CHAR = _Lang(1, None)


def _concat(langs: Sequence[_Lang]) -> _Lang:
    chars: tuple[tuple[int, int], ...] | None = ()
    for lang in langs:
        chars = None if chars is None or lang.chars is None else chars + lang.chars
    return _Lang(sum(lang.max_len for lang in langs), chars)


def _union(langs: Sequence[_Lang]) -> _Lang:
    return _Lang(max((lang.max_len for lang in langs), default=0), _concat(langs).chars)


class _Translator:
    """A Python ``re`` pattern as a Rust-regex pattern matching the same strings, or a subset of
    them where ``exact`` is False (an ASCII ``[0-9]`` for a Unicode ``\\d``), and what those
    strings are made of. Built from Python's own parse tree, so the pattern means here what it
    means to ``re``; any construct not listed is refused."""

    def __init__(self, pattern: re.Pattern[str], exact: bool) -> None:
        try:
            self.sre: Any = importlib.import_module("re._parser")
        except ImportError as exc:  # a Python without it: nothing is translated
            raise _Unsupported("re._parser is not available") from exc
        self.exact = exact
        parsed = self.sre.parse(pattern.pattern, pattern.flags)
        flags = int(parsed.state.flags)
        if flags & ~(re.UNICODE | re.ASCII):
            raise _Unsupported(f"regex flags {flags:#x}")
        self.ascii = bool(flags & re.ASCII)
        self.body, self.lang = self.seq(parsed)

    def seq(self, items: Any) -> tuple[str, _Lang]:
        s = self.sre
        out: list[str] = []
        langs: list[_Lang] = []
        for op, av in items:
            if op is s.LITERAL:
                out.append(_hex(av))
                langs.append(_Lang(1, ((av, av),)))
            elif op is s.NOT_LITERAL:
                out.append(f"[^{_hex(av)}]")
                langs.append(_ANY_CHAR)
            elif op is s.ANY:
                out.append(f"[^{_hex(10)}]")  # no DOTALL (refused above): anything but a line feed
                langs.append(_ANY_CHAR)
            elif op is s.IN:
                rx, lang = self.charset(av)
                out.append(rx)
                langs.append(lang)
            elif op is s.MAX_REPEAT or op is s.MIN_REPEAT:  # greedy or lazy: same strings under fullmatch
                lo, hi, sub = av
                rx, lang = self.seq(sub)
                unbounded = hi is s.MAXREPEAT
                out.append(f"(?:{rx}){{{lo},{'' if unbounded else hi}}}")
                longest = math.inf if unbounded and lang.max_len else lang.max_len * (0 if unbounded else hi)
                langs.append(_Lang(longest, lang.chars))
            elif op is s.SUBPATTERN:
                _group, add_flags, del_flags, sub = av
                if add_flags or del_flags:
                    raise _Unsupported("inline regex flags")
                rx, lang = self.seq(sub)
                out.append(f"(?:{rx})")
                langs.append(lang)
            elif op is s.BRANCH:
                alternatives = [self.seq(a) for a in av[1]]
                out.append("(?:" + "|".join(rx for rx, _ in alternatives) + ")")
                langs.append(_union([lang for _, lang in alternatives]))
            else:
                raise _Unsupported(f"regex construct {op}")
        return "".join(out), _concat(langs)

    def charset(self, items: Any) -> tuple[str, _Lang]:
        s = self.sre
        negate = bool(items) and items[0][0] is s.NEGATE
        parts: list[str] = []
        chars: list[tuple[int, int]] = []
        for op, av in items[1:] if negate else items:
            if op is s.LITERAL:
                parts.append(_hex(av))
                chars.append((av, av))
            elif op is s.RANGE:
                parts.append(f"{_hex(av[0])}-{_hex(av[1])}")
                chars.append((av[0], av[1]))
            elif op is s.CATEGORY and av is s.CATEGORY_DIGIT and (self.ascii or not (negate or self.exact)):
                parts.append("0-9")  # with re.ASCII exactly \d; else a subset, allowed outside a negation
                chars.append((0x30, 0x39))
            else:
                raise _Unsupported(f"regex class item {op} {av}")
        if not parts:
            raise _Unsupported("empty regex class")
        rx = f"[{'^' if negate else ''}{''.join(parts)}]"
        return rx, _ANY_CHAR if negate else _Lang(1, tuple(chars))


def _checked(rx: str) -> str:
    """``rx`` if polars compiles it (an error now, not on the first batch)."""
    try:
        pl.Series([""], dtype=pl.String).str.contains(rx)
    except pl.exceptions.PolarsError as exc:
        raise _Unsupported(f"polars rejects {rx!r}") from exc
    return rx


@functools.cache
def _fullmatch(pattern: re.Pattern[str]) -> tuple[str, _Lang]:
    """Rust regex matching (a subset of) what ``pattern.fullmatch`` accepts, and what its strings
    are made of."""
    t = _Translator(pattern, exact=False)
    return _checked(rf"\A(?:{t.body})\z"), t.lang


def _fullmatch_rx(pattern: re.Pattern[str]) -> str:
    return _fullmatch(pattern)[0]


@functools.cache
def _search_rx(pattern: re.Pattern[str]) -> str:
    """Rust regex found in exactly the strings ``pattern.search`` finds something in."""
    return _checked(_Translator(pattern, exact=True).body)


@functools.cache
def _class_chars(pattern: re.Pattern[str]) -> tuple[str, ...] | None:
    """The characters of a pattern that is one plain character class (``[\\x00-\\x1f]``), else
    None. ``str.contains_any`` on them (Aho-Corasick) finds what ``pattern.search`` finds, at a
    third of the cost of the regex."""
    try:
        sre: Any = importlib.import_module("re._parser")
    except ImportError:
        return None
    parsed = sre.parse(pattern.pattern, pattern.flags)
    if int(parsed.state.flags) & ~(re.UNICODE | re.ASCII) or len(parsed) != 1 or parsed[0][0] is not sre.IN:
        return None
    chars: list[str] = []
    for op, av in parsed[0][1]:
        if op is sre.LITERAL:
            chars.append(chr(av))
        elif op is sre.RANGE and av[1] - av[0] < 4096:
            chars.extend(map(chr, range(av[0], av[1] + 1)))
        else:
            return None
    return tuple(chars) if 0 < len(chars) <= 4096 else None


def _finds(v: pl.Expr, pattern: re.Pattern[str]) -> pl.Expr:
    """``pattern.search(v)`` finds something (null for null)."""
    chars = _class_chars(pattern)
    return v.str.contains_any(list(chars)) if chars is not None else v.str.contains(_search_rx(pattern))


@functools.cache
def _nonblank_rx() -> str:
    """A character ``str.strip()`` does not remove: the string is not blank to Python."""
    spaces = [c for c in range(0x110000) if chr(c).isspace()]
    ranges: list[list[int]] = []
    for c in spaces:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    body = "".join(_hex(a) if a == b else f"{_hex(a)}-{_hex(b)}" for a, b in ranges)
    return _checked(f"[^{body}]")


def _has_text(v: pl.Expr) -> pl.Expr:
    """A non-null string that is not blank to ``str.strip()``."""
    return v.is_not_null() & v.str.contains(_nonblank_rx())


# --- scopes, preparation, registry -------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    """Where a check's fields are: the frame's columns, or the struct fields of a list's elements
    (inside ``list.eval``)."""

    dtypes: Mapping[str, pl.DataType]
    element: bool = False

    def col(self, name: str) -> pl.Expr:
        return pl.element().struct.field(name) if self.element else pl.col(name)

    def dtype(self, name: str) -> pl.DataType | None:
        return self.dtypes.get(name)


def _item_scope(dt: pl.DataType) -> _Scope | None:
    """The scope of a list's elements if they are structs (dicts to the record path)."""
    if isinstance(dt, pl.List) and isinstance(dt.inner, pl.Struct):
        return _Scope({f.name: _inst(f.dtype) for f in dt.inner.fields}, element=True)
    return None


#: A prepared check: its expression for a scope and the clocks' readings.
Build = Callable[[_Scope, Env], pl.Expr]


@dataclass
class _Facts:
    """What the checks of one scope guarantee of its strings when their mask terms hold, so that
    Text need not test it again (the conjunction, hence the mask, stays the same): a field is
    null, '' or made as one of ``fields[name]`` says (Code, Region, EventId, OneOf); every element
    of a string list as ``arrays[name]`` says (EachString); ``lines[name]``: what the checks of an
    ``Each`` over that list guarantee of every item."""

    fields: dict[str, list[_Lang]] = field(default_factory=dict)
    arrays: dict[str, list[_Lang]] = field(default_factory=dict)
    lines: dict[str, list[_Facts]] = field(default_factory=dict)

    @classmethod
    def of(cls, checks: Sequence[CheckBase]) -> _Facts:
        out = cls()
        for c in checks:
            with contextlib.suppress(_Unsupported):  # the check's own preparation refuses it
                out._add(c)
        return out

    def _add(self, c: CheckBase) -> None:
        exact = type(c)  # a subclass may accept more: only the classes themselves vouch for a value
        if isinstance(c, Code) and exact is Code and c.kind in CODE_PATTERNS:
            self.fields.setdefault(c.field, []).append(_fullmatch(CODE_PATTERNS[c.kind])[1])
        elif isinstance(c, Region) and exact is Region:
            self.fields.setdefault(c.field, []).append(_Lang(6, ((0x30, 0x39),)))
        elif isinstance(c, EventId) and exact is EventId:
            self.fields.setdefault(c.field, []).append(_fullmatch(_UUID)[1])
        elif isinstance(c, OneOf) and exact is OneOf:
            strs, _ = _str_values(c.allowed)
            chars = tuple((ord(ch), ord(ch)) for v in strs for ch in v)
            self.fields.setdefault(c.field, []).append(_Lang(max(map(len, strs), default=0), chars))
        elif isinstance(c, EachString) and exact is EachString and c.kind in CODE_PATTERNS:
            self.arrays.setdefault(c.field, []).append(_fullmatch(CODE_PATTERNS[c.kind])[1])
        elif isinstance(c, Each) and exact is Each:
            self.lines.setdefault(c.field, []).append(_Facts.of(c.checks))

    def items(self, name: str) -> _Facts:
        """What is guaranteed of every item of the list ``name`` (the union of its Each checks)."""
        out = _Facts()
        for f in self.lines.get(name, ()):
            for k, langs in f.fields.items():
                out.fields.setdefault(k, []).extend(langs)
            for k, langs in f.arrays.items():
                out.arrays.setdefault(k, []).extend(langs)
            for k, facts in f.lines.items():
                out.lines.setdefault(k, []).extend(facts)
        return out

    @staticmethod
    def clean(langs: Sequence[_Lang], most: int, control: re.Pattern[str]) -> bool:
        return any(lang.clean(most, control) for lang in langs)


@dataclass
class _Prep:
    """What preparing a record's checks collects (the clocks to read once per evaluation) and
    what it knows of the scope being prepared."""

    clocks: list[Clock] = field(default_factory=list)
    facts: _Facts = field(default_factory=_Facts)

    def clock(self, fn: Clock) -> None:
        if all(c is not fn for c in self.clocks):
            self.clocks.append(fn)

    def prepare_all(self, checks: Sequence[CheckBase], facts: _Facts | None = None) -> list[Build]:
        """Prepare the checks of one scope (they are all required together)."""
        outer = self.facts
        self.facts = _Facts.of(checks) if facts is None else facts
        try:
            return [self.prepare(c) for c in checks]
        finally:
            self.facts = outer

    def prepare(self, check: CheckBase) -> Build:
        prep = _REGISTRY.get(type(check))
        if prep is None:
            raise _Unsupported(f"no columnar form for {type(check).__name__}")
        build = prep(check, self)

        def safe(scope: _Scope, env: Env) -> pl.Expr:
            try:
                return build(scope, env).fill_null(False)
            except _Unsupported:  # a dtype it cannot reason about: no row is proven valid
                return _lit(False)

        return safe


_REGISTRY: dict[type[CheckBase], Callable[[Any, _Prep], Build]] = {}


def _prepares(cls: type[CheckBase]) -> Callable[[Callable[[Any, _Prep], Build]], Callable[[Any, _Prep], Build]]:
    def register(fn: Callable[[Any, _Prep], Build]) -> Callable[[Any, _Prep], Build]:
        _REGISTRY[cls] = fn
        return fn

    return register


def _as_int(value: Any) -> int:
    if type(value) is not int:
        raise _Unsupported(f"{value!r} is not an int")
    return value


def _str_values(values: frozenset[str]) -> tuple[list[str], bool]:
    """(the strings, whether None is one of the values); other values are refused."""
    strs = [v for v in values if isinstance(v, str)]
    none_ok = any(v is None for v in values)
    if len(strs) + none_ok != len(values):
        raise _Unsupported("non-string allowed values")
    return sorted(strs), none_ok


def _is_in(v: pl.Expr, strs: list[str]) -> pl.Expr:
    return v.is_in(strs) if strs else v.is_null() & False


# --- checks ------------------------------------------------------------------------------------


def _clean_text(v: pl.Expr, most: int, control: re.Pattern[str]) -> pl.Expr:
    """``len(v) <= most`` and no control character (true for null)."""
    return (_within(v.str.len_chars(), pl.UInt32(), 0, most) & ~_finds(v, control)).fill_null(True)


@_prepares(Text)
def _text(c: Text, prep: _Prep) -> Build:
    ids, free = _CONTROL, _CONTROL_IN_FREE_TEXT
    for pattern in (ids, free):
        if _class_chars(pattern) is None:
            _search_rx(pattern)
    known = prep.facts
    fields = [(f, _as_int(most), free if is_free else ids) for f, most, is_free in c.fields]
    fields = [(f, most, rx) for f, most, rx in fields if not known.clean(known.fields.get(f, []), most, rx)]
    arrays = [(f, _as_int(most)) for f, most in c.arrays]
    arrays = [(f, most) for f, most in arrays if not known.clean(known.arrays.get(f, []), most, ids)]
    lines = [(f, prep.prepare_all([inner], known.items(f))[0]) for f, inner in c.lines]

    def build(scope: _Scope, env: Env) -> pl.Expr:
        terms: list[pl.Expr] = []
        for f, most, rx in fields:
            dt = scope.dtype(f)
            if dt is None or _never_str(dt):
                continue
            v = scope.col(f)
            terms.append(_clean_text(v, most, rx) if _is_str(dt) else v.is_null())
        for f, most in arrays:
            dt = scope.dtype(f)
            if dt is None:
                continue
            v = scope.col(f)
            if isinstance(dt, pl.List):
                el = pl.element()
                ok = el.is_not_null() & (_clean_text(el, most, ids) if _is_str(_inst(dt.inner)) else _lit(False))
                terms.append(v.is_null() | _all_items(v, ok))
            else:
                terms.append(v.is_null())
        for f, inner in lines:
            dt = scope.dtype(f)
            if dt is None:
                continue
            terms.append(_each_items(scope.col(f), dt, [inner], env))
        return _conj(terms)

    return build


def _each_items(v: pl.Expr, dt: pl.DataType, inner: Sequence[Build], env: Env) -> pl.Expr:
    """``for item in v or (): <inner checks on item>`` passes (a null item raises)."""
    if not isinstance(dt, pl.List):
        return v.is_null()
    if not inner:
        return _lit(True)
    scope = _item_scope(dt)
    el = pl.element()
    ok = el.is_not_null() & (_conj([b(scope, env) for b in inner]) if scope is not None else _lit(False))
    return v.is_null() | _all_items(v, ok)


def _str_matches(field: str, rx: str | None) -> Build:
    """A string ``field`` that is present and matches ``rx`` (a whole-value pattern); no ``rx``: never."""
    def build(scope: _Scope, env: Env) -> pl.Expr:
        dt = scope.dtype(field)
        if dt is None or not _is_str(dt) or rx is None:
            return _lit(False)
        v = scope.col(field)
        return v.is_not_null() & v.str.contains(rx)

    return build


@_prepares(EventId)
def _event_id(c: EventId, prep: _Prep) -> Build:
    return _str_matches(c.field, _fullmatch_rx(_UUID))


@_prepares(NotBlank)
def _not_blank(c: NotBlank, prep: _Prep) -> Build:
    _nonblank_rx()

    def build(scope: _Scope, env: Env) -> pl.Expr:
        dt = scope.dtype(c.field)
        if dt is None:
            return _lit(False)
        v = scope.col(c.field)
        if _is_str(dt):
            return _has_text(v)
        if _int_range(dt) is not None:
            return v.is_not_null() & (v != 0)
        if dt == pl.Boolean:
            return v.fill_null(False)
        if isinstance(dt, pl.List):
            return v.is_not_null() & (v.list.len() > 0)
        return _lit(False)

    return build


@_prepares(Code)
def _code(c: Code, prep: _Prep) -> Build:
    if c.kind not in CODE_PATTERNS:
        raise _Unsupported(f"unknown code kind {c.kind!r}")
    rx = _fullmatch_rx(CODE_PATTERNS[c.kind])
    optional = bool(c.optional)

    def build(scope: _Scope, env: Env) -> pl.Expr:
        dt = scope.dtype(c.field)
        if dt is None:
            return _lit(optional)
        v = scope.col(c.field)
        if not _is_str(dt):
            return v.is_null() & optional
        match = v.str.contains(rx)
        if optional:
            return v.is_null() | (v == "") | match
        return v.is_not_null() & (v != "") & match

    return build


@_prepares(Region)
def _region(c: Region, prep: _Prep) -> Build:
    prefixes = sorted(p for p in PROVINCES if isinstance(p, str) and len(p) == 2 and p.isascii() and p.isdigit())
    return _str_matches(c.field, _checked(r"\A(?:" + "|".join(prefixes) + r")[0-9]{4}\z") if prefixes else None)


@_prepares(OneOf)
def _one_of(c: OneOf, prep: _Prep) -> Build:
    strs, none_ok = _str_values(c.allowed)

    def build(scope: _Scope, env: Env) -> pl.Expr:
        dt = scope.dtype(c.field)
        if dt is None:
            return _lit(none_ok)
        v = scope.col(c.field)
        if not _is_str(dt):
            return v.is_null() & none_ok
        return pl.when(v.is_null()).then(_lit(none_ok)).otherwise(_is_in(v, strs))

    return build


def _sign_check(fields: tuple[str, ...], lo: int) -> Build:
    """``v is not None and v < lo`` fails, for each field read as ``d[f]`` (absent: raises)."""

    def build(scope: _Scope, env: Env) -> pl.Expr:
        terms = []
        for f in fields:
            dt = scope.dtype(f)
            if dt is None or _int_range(dt) is None:
                return _lit(False)
            v = scope.col(f)
            terms.append(v.is_null() | _within(v, dt, lo, 2**128))
        return _conj(terms)

    return build


@_prepares(NonNegative)
def _non_negative(c: NonNegative, prep: _Prep) -> Build:
    return _sign_check(tuple(c.fields), 0)


@_prepares(Positive)
def _positive(c: Positive, prep: _Prep) -> Build:
    return _sign_check(tuple(c.fields), 1)


@_prepares(Fits)
def _fits(c: Fits, prep: _Prep) -> Build:
    lo, hi = _as_int(c.lo), _as_int(c.hi)

    def build(scope: _Scope, env: Env) -> pl.Expr:
        dt = scope.dtype(c.field)
        if dt is None or _never_int(dt):
            return _lit(True)
        if _int_range(dt) is None:
            return _lit(False)
        v = scope.col(c.field)
        return v.is_null() | _within(v, dt, lo, hi)

    return build


@_prepares(SumsTo)
def _sums_to(c: SumsTo, prep: _Prep) -> Build:
    tol = _as_int(c.tolerance)
    if not c.parts:
        raise _Unsupported("SumsTo without parts")

    def build(scope: _Scope, env: Env) -> pl.Expr:
        total = _wide(scope, c.total)
        parts = [p for p in (_wide(scope, n) for n in c.parts) if p is not None]
        if tol < 0 or total is None or len(parts) != len(c.parts):
            return _lit(False)
        s = parts[0]
        for p in parts[1:]:
            s = s + p  # a null stays null (the record path raises on None)
        return (total - s).abs() <= min(tol, 2**120)

    return build


@_prepares(AtMost)
def _at_most(c: AtMost, prep: _Prep) -> Build:
    def build(scope: _Scope, env: Env) -> pl.Expr:
        a, b = _wide(scope, c.field), _wide(scope, c.bound_field)
        if a is None or b is None:
            return _lit(False)
        return a <= b

    return build


@_prepares(AmountMatches)
def _amount_matches(c: AmountMatches, prep: _Prep) -> Build:
    def build(scope: _Scope, env: Env) -> pl.Expr:
        a, q, p = _wide(scope, c.amount), _wide(scope, c.qty), _wide(scope, c.price)
        if a is None or q is None or p is None:
            return _lit(False)
        return ((q * p + 50_000_000) // 100_000_000 - a).abs() <= 1

    return build


@_prepares(EventTime)
def _event_time(c: EventTime, prep: _Prep) -> Build:
    prep.clock(c.limits)

    def build(scope: _Scope, env: Env) -> pl.Expr:
        dt = scope.dtype(c.field)
        if dt is None:
            return _lit(True)
        v = scope.col(c.field)
        lim = env[id(c.limits)]
        values = (lim.now_ms, lim.max_future_skew_ms, lim.min_event_ms)
        if _int_range(dt) is None or any(type(x) is not int for x in values):
            return v.is_null()
        return v.is_null() | _within(v, dt, lim.min_event_ms, lim.now_ms + lim.max_future_skew_ms)

    return build


def _china_day(ms: pl.Expr) -> pl.Expr:
    return (ms + CHINA_OFFSET_MS) // DAY_MS


@_prepares(DateOrder)
def _date_order(c: DateOrder, prep: _Prep) -> Build:
    slack_ms = _as_int(c.slack_ms)
    same = c.earlier_is_date == c.later_is_date
    slack = slack_ms if same and not c.earlier_is_date else slack_ms // DAY_MS
    slack = max(min(slack, 2**120), -(2**120))  # |A - B| < 2**66 below: clamping keeps every answer

    def build(scope: _Scope, env: Env) -> pl.Expr:
        if scope.dtype(c.earlier) is None or scope.dtype(c.later) is None:
            return _lit(True)
        either_null = scope.col(c.earlier).is_null() | scope.col(c.later).is_null()
        a, b = _wide(scope, c.earlier), _wide(scope, c.later)
        if a is None or b is None:
            return either_null
        ea = a if same or c.earlier_is_date else _china_day(a)
        eb = b if same or c.later_is_date else _china_day(b)
        return either_null | (ea - eb <= slack)

    return build


@_prepares(BirthDate)
def _birth_date(c: BirthDate, prep: _Prep) -> Build:
    if type(c.max_age) not in (int, float):
        raise _Unsupported("max_age")
    most: float = c.max_age * 365.2425  # the float the record path compares with
    if not math.isfinite(most):
        raise _Unsupported("max_age")
    limit: int = max(min(math.ceil(most), 2**120), -(2**120))  # for an int x: x >= most ⇔ x >= ceil(most)

    def build(scope: _Scope, env: Env) -> pl.Expr:
        if scope.dtype(c.field) is None or scope.dtype(c.event_field) is None:
            return _lit(True)
        either_null = scope.col(c.field).is_null() | scope.col(c.event_field).is_null()
        birth, event = _wide(scope, c.field), _wide(scope, c.event_field)
        if birth is None or event is None:
            return either_null
        if limit <= 0:
            return either_null
        age: pl.Expr = _china_day(event) - birth
        return either_null | age.is_between(0, limit - 1)

    return build


@_prepares(Each)
def _each(c: Each, prep: _Prep) -> Build:
    inner = prep.prepare_all(c.checks)
    min_items = _as_int(c.min_items)

    def build(scope: _Scope, env: Env) -> pl.Expr:
        dt = scope.dtype(c.field)
        if dt is None:
            return _lit(min_items <= 0)
        v = scope.col(c.field)
        items = _each_items(v, dt, inner, env)
        if min_items <= 0:
            return items
        if not isinstance(dt, pl.List):
            return _lit(False)
        return items & (v.list.len().fill_null(0) >= min_items)

    return build


@_prepares(EachString)
def _each_string(c: EachString, prep: _Prep) -> Build:
    if c.kind not in CODE_PATTERNS:
        raise _Unsupported(f"unknown code kind {c.kind!r}")
    rx = _fullmatch_rx(CODE_PATTERNS[c.kind])

    def build(scope: _Scope, env: Env) -> pl.Expr:
        dt = scope.dtype(c.field)
        if dt is None:
            return _lit(True)
        v = scope.col(c.field)
        if not isinstance(dt, pl.List):
            return v.is_null()
        el = pl.element()
        ok = el.is_not_null() & (el.str.contains(rx) if _is_str(_inst(dt.inner)) else _lit(False))
        return v.is_null() | _all_items(v, ok)

    return build


@_prepares(LinesSumTo)
def _lines_sum_to(c: LinesSumTo, prep: _Prep) -> Build:
    def build(scope: _Scope, env: Env) -> pl.Expr:
        total = _wide(scope, c.total)
        if total is None:
            return _lit(False)
        dt = scope.dtype(c.lines)
        if dt is None:
            return total.abs() <= 1
        v = scope.col(c.lines)
        item_scope = _item_scope(dt)
        amount = _wide(item_scope, c.line_amount) if item_scope is not None else None
        if item_scope is None or amount is None:
            return v.is_null() & (total.abs() <= 1)
        items = v.is_null() | _all_items(v, pl.element().is_not_null() & item_scope.col(c.line_amount).is_not_null())
        s = v.list.eval(amount).list.sum().fill_null(0)
        n = v.list.len().fill_null(0).cast(pl.Int64)
        return items & ((s - total).abs() <= pl.max_horizontal(n, 1))

    return build


@_prepares(RequiredWhen)
def _required_when(c: RequiredWhen, prep: _Prep) -> Build:
    strs, none_ok = _str_values(c.values)
    _nonblank_rx()

    def build(scope: _Scope, env: Env) -> pl.Expr:
        wdt = scope.dtype(c.when)
        if wdt is None:
            applies = _lit(none_ok)
        else:
            w = scope.col(c.when)
            if _is_str(wdt):
                applies = pl.when(w.is_null()).then(_lit(none_ok)).otherwise(_is_in(w, strs))
            elif _never_str(wdt):
                applies = w.is_null() & none_ok
            else:
                applies = _lit(True)  # may hold strings: assume the rule applies
        present = []
        for f in c.fields:
            dt = scope.dtype(f)
            if dt is None:
                present.append(_lit(False))
            elif _is_str(dt):
                present.append(_has_text(scope.col(f)))
            elif _never_str(dt):
                present.append(scope.col(f).is_not_null())
            else:
                present.append(_lit(False))
        return ~applies | _conj(present)

    return build


# --- the mask ----------------------------------------------------------------------------------


class _Mask:
    """The compiled mask of one record's checks; expressions are built per frame schema and
    clock reading (a clock's reading changes about once a second, so they are reused)."""

    def __init__(self, builds: tuple[Build, ...], clocks: tuple[Clock, ...]) -> None:
        self._builds = builds
        self._clocks = clocks
        self._cache: dict[tuple[Any, ...], pl.Expr] = {}

    def __call__(self, frame: pl.DataFrame) -> pl.Series:
        try:
            readings = tuple(clock() for clock in self._clocks)  # once per evaluation, as per batch
        except Exception:  # the record validator raises before any check: every event is malformed
            return pl.Series("valid", [False] * frame.height, dtype=pl.Boolean)
        key = (tuple(frame.schema.items()),
               tuple((r.now_ms, r.max_future_skew_ms, r.min_event_ms) for r in readings))
        expr = self._cache.get(key)
        if expr is None:
            env = {id(clock): r for clock, r in zip(self._clocks, readings, strict=True)}
            scope = _Scope(dict(frame.schema))
            expr = _conj([b(scope, env) for b in self._builds]).fill_null(False).alias("valid")
            if len(self._cache) >= 8:
                self._cache.clear()
            self._cache[key] = expr
        out = frame.select(expr).to_series()
        if out.len() != frame.height:  # every term a literal: broadcast it
            out = pl.Series("valid", [bool(out[0]) if out.len() else False] * frame.height, dtype=pl.Boolean)
        return out


def compile_mask(checks: Sequence[CheckBase]) -> MaskFn | None:
    """A function giving, for each row of a raw frame (schemas.columnar), True only if
    ``compile_checks(checks)`` returns None for that row's datum; None when some check has no
    sound columnar form (the record then stays on the record path)."""
    prep = _Prep()
    try:
        builds = tuple(prep.prepare_all(checks))
    except _Unsupported:
        return None
    return _Mask(builds, tuple(prep.clocks))
