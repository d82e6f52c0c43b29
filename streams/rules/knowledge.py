"""Knowledge tables of the rule base, kept as data (CSV) and loaded with precise errors.

The national rule base is "uniform and dynamically updated": item restrictions, duplicate-charge
pairs, frequency limits, repeat intervals, price caps and drug classes change with each published
parameter batch. They live in ``data/knowledge/*.csv`` (one row per item, the platform's codes),
not in code. A malformed file fails loading with ``<file>:<line>: <field>: <what is wrong>``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

from ..validation import CODE_PATTERNS

DATA = Path(__file__).resolve().parent / "data"
T = TypeVar("T")


class KnowledgeError(ValueError):
    """A knowledge file that cannot be used; the message names file, line and field."""


@dataclass(frozen=True)
class Restriction:
    name: str
    sex: str | None  # "MALE" / "FEMALE" when restricted
    min_age: int | None
    max_age: int | None
    min_hosp_lv: int | None
    inpatient_only: bool


@dataclass(frozen=True)
class DuplicatePair:
    primary: str
    secondary: str
    scope: str  # visit | day | 6h
    note: str


@dataclass(frozen=True)
class Drug:
    name: str
    generic: str
    drug_class: str
    days_per_unit: Fraction
    as_needed: bool  # 按需使用 (rescue inhalers, analgesics): no fixed days of supply to add up
    long_term: bool  # 长期处方 (chronic-disease drugs): the 30-day supply limit applies


@dataclass
class Knowledge:
    categories: dict[str, str] = field(default_factory=dict)
    restrictions: dict[str, Restriction] = field(default_factory=dict)
    duplicate_pairs: list[DuplicatePair] = field(default_factory=list)
    frequency_limits: dict[str, int] = field(default_factory=dict)
    repeat_intervals: dict[str, int] = field(default_factory=dict)
    price_caps: dict[str, dict[int, int]] = field(default_factory=dict)  # code → level → cap (scale 6)
    drugs: dict[str, Drug] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def pairs_by_secondary(self) -> dict[str, list[DuplicatePair]]:
        cached: dict[str, list[DuplicatePair]] | None = self.__dict__.get("_by_secondary")
        if cached is None:
            cached = {}
            for p in self.duplicate_pairs:
                cached.setdefault(p.secondary, []).append(p)
            self.__dict__["_by_secondary"] = cached
        return cached

    def pairs_by_primary(self) -> dict[str, list[DuplicatePair]]:
        cached: dict[str, list[DuplicatePair]] | None = self.__dict__.get("_by_primary")
        if cached is None:
            cached = {}
            for p in self.duplicate_pairs:
                cached.setdefault(p.primary, []).append(p)
            self.__dict__["_by_primary"] = cached
        return cached

    def line_info(self) -> dict[str, LineInfo]:
        """Everything known about each listed code, for one dict lookup per fee line."""
        cached: dict[str, LineInfo] | None = self.__dict__.get("_line_info")
        if cached is None:
            dup = {c for p in self.duplicate_pairs for c in (p.primary, p.secondary)}
            codes = set(self.categories) | set(self.restrictions) | set(self.price_caps) | set(
                self.frequency_limits) | dup | set(self.repeat_intervals) | set(self.drugs)
            cached = {}
            for code in codes:
                d = self.drugs.get(code)
                cached[code] = LineInfo(
                    category=self.categories.get(code, "other"),
                    restriction=self.restrictions.get(code),
                    caps=self.price_caps.get(code),
                    freq_limit=self.frequency_limits.get(code),
                    dup=code in dup,
                    interval_days=self.repeat_intervals.get(code),
                    drug=d,
                    days_num=0 if d is None or d.as_needed else d.days_per_unit.numerator * 1000,
                    days_den=1 if d is None else d.days_per_unit.denominator * 10**4,
                )
            self.__dict__["_line_info"] = cached
        return cached


@dataclass(frozen=True, slots=True)
class LineInfo:
    category: str
    restriction: Restriction | None
    caps: dict[int, int] | None
    freq_limit: int | None
    dup: bool
    interval_days: int | None
    drug: Drug | None
    days_num: int  # days of supply ×1000 per unit = cnt (scale 4) × days_num // days_den
    days_den: int


OTHER = LineInfo("other", None, None, None, False, None, None, 0, 1)


class _Rows:
    """CSV rows with their line numbers and typed field access that reports file:line: field."""

    def __init__(self, path: Path, required: tuple[str, ...]) -> None:
        self.path = path
        self.required = required

    def __iter__(self) -> Iterator[tuple[int, Callable[..., Any]]]:
        try:
            fh = self.path.open(encoding="utf-8", newline="")
        except OSError as exc:
            raise KnowledgeError(f"{self.path}: cannot read: {exc.strerror}") from None
        with fh:
            reader = csv.DictReader(fh)
            missing = [c for c in self.required if c not in (reader.fieldnames or [])]
            if missing:
                raise KnowledgeError(f"{self.path}:1: header lacks column(s) {', '.join(missing)}")
            for row in reader:
                line = reader.line_num

                def get(name: str, conv: Callable[[str], T] = str, optional: bool = False,  # type: ignore[assignment]
                        row: dict[str, str] = row, line: int = line) -> T | None:
                    raw = (row.get(name) or "").strip()
                    if not raw:
                        if optional:
                            return None
                        raise KnowledgeError(f"{self.path}:{line}: {name}: empty")
                    try:
                        return conv(raw)
                    except (ValueError, InvalidOperation, ZeroDivisionError) as exc:
                        raise KnowledgeError(f"{self.path}:{line}: {name}: {raw!r}: {exc}") from None

                yield line, get


CATEGORIES = frozenset({"bed", "nursing", "consult", "test", "treatment", "monitor", "surgery", "drug",
                        "consumable", "other"})


def _category(value: str) -> str:
    if value not in CATEGORIES:
        raise ValueError(f"unknown category; use one of {', '.join(sorted(CATEGORIES))}")
    return value


def _code(value: str) -> str:
    if CODE_PATTERNS["list_item"].fullmatch(value) is None:
        raise ValueError("not a national list code (drug X…/Z…, consumable C…, 15-digit service item)")
    return value


def _yes(value: str) -> bool:
    if value.upper() in ("Y", "YES", "1", "TRUE"):
        return True
    if value.upper() in ("N", "NO", "0", "FALSE"):
        return False
    raise ValueError("expected Y or N")


def _sex(value: str) -> str:
    table = {"M": "MALE", "F": "FEMALE", "MALE": "MALE", "FEMALE": "FEMALE"}
    try:
        return table[value.upper()]
    except KeyError:
        raise ValueError("expected M or F") from None


def _price6(value: str) -> int:
    d = Decimal(value)
    if d <= 0:
        raise ValueError("must be positive")
    return int(d.scaleb(6).to_integral_value())


def _scope(value: str) -> str:
    if value not in ("visit", "day", "6h"):
        raise ValueError("expected visit, day or 6h")
    return value


def _positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise ValueError("must be a positive integer")
    return n


def _fraction(value: str) -> Fraction:
    f = Fraction(value)
    if f <= 0:
        raise ValueError("must be positive")
    return f


def _unique(table: dict[str, Any], code: str | None, path: Path, line: int) -> None:
    if code in table:
        raise KnowledgeError(f"{path}:{line}: hilist_code: {code} is listed twice")


def load_knowledge(directory: Path | None = None) -> Knowledge:
    """Load every knowledge table from ``directory`` (the shipped seed data by default)."""
    d = directory or DATA / "knowledge"
    k = Knowledge()
    for line, get in _Rows(d / "item_categories.csv", ("hilist_code", "name", "category")):
        code = get("hilist_code", _code)
        _unique(k.categories, code, d / "item_categories.csv", line)
        k.categories[code] = get("category", _category)
        k.names[code] = get("name")
    for line, get in _Rows(d / "item_restrictions.csv", ("hilist_code", "name", "sex", "min_age", "max_age",
                                                          "min_hosp_lv", "inpatient_only")):
        code = get("hilist_code", _code)
        _unique(k.restrictions, code, d / "item_restrictions.csv", line)
        k.restrictions[code] = Restriction(
            name=get("name"), sex=get("sex", _sex, optional=True),
            min_age=get("min_age", int, optional=True), max_age=get("max_age", int, optional=True),
            min_hosp_lv=get("min_hosp_lv", int, optional=True),
            inpatient_only=bool(get("inpatient_only", _yes, optional=True)),
        )
    for _, get in _Rows(d / "duplicate_pairs.csv", ("primary_code", "secondary_code", "scope")):
        k.duplicate_pairs.append(DuplicatePair(
            primary=get("primary_code", _code), secondary=get("secondary_code", _code),
            scope=get("scope", _scope), note=get("note", optional=True) or "",
        ))
    for line, get in _Rows(d / "frequency_limits.csv", ("hilist_code", "max_per_day")):
        code = get("hilist_code", _code)
        _unique(k.frequency_limits, code, d / "frequency_limits.csv", line)
        k.frequency_limits[code] = get("max_per_day", _positive_int)
    for line, get in _Rows(d / "repeat_intervals.csv", ("hilist_code", "min_interval_days")):
        code = get("hilist_code", _code)
        _unique(k.repeat_intervals, code, d / "repeat_intervals.csv", line)
        k.repeat_intervals[code] = get("min_interval_days", _positive_int)
    for line, get in _Rows(d / "price_caps.csv", ("hilist_code", "cap_level1", "cap_level2", "cap_level3")):
        caps = {lv: get(f"cap_level{lv}", _price6) for lv in (1, 2, 3)}
        caps[9] = caps[3]  # pharmacies and unrated institutions: the level-3 cap
        code = get("hilist_code", _code)
        _unique(k.price_caps, code, d / "price_caps.csv", line)
        k.price_caps[code] = caps
    for line, get in _Rows(d / "drug_classes.csv", ("hilist_code", "name", "generic_name", "drug_class",
                                                     "days_per_unit")):
        code = get("hilist_code", _code)
        _unique(k.drugs, code, d / "drug_classes.csv", line)
        k.drugs[code] = Drug(name=get("name"), generic=get("generic_name"), drug_class=get("drug_class"),
                             days_per_unit=get("days_per_unit", _fraction),
                             as_needed=bool(get("as_needed", _yes, optional=True)),
                             long_term=bool(get("long_term", _yes, optional=True)))
    return k
