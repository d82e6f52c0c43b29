"""The shape every subsystem module has, so a reader who knows one knows all.

A subsystem (``settlement``, ``procurement``, ``supervision``) is one topic carrying a union of
records. For each record it declares:

* ``checks``: the validation rules (streams.validation), run on the raw datum;
* ``tables``: where it lands. The first table is its *primary* table (one row per event: that is
  how ``landed + dead-lettered = produced`` is counted); a table entry may take the event's nested
  lines instead of the event itself (``lines=``);
* ``overrides``: columns that are not a plain copy of a field (tokens, age, negated amounts).

Everything else (copying fields to columns, ms → s for DateTime, None → '' for String) is derived
once from the ClickHouse table spec, so modules stay declarative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from sinks.tables import TABLES, decimal_precision, unwrap_nullable

from .fields import FieldRules, load_field_rules
from .privacy import Pseudonymizer
from .records import RECORDS
from .validation import CheckBase as Check
from .validation import Each, EventId, Fits

if TYPE_CHECKING:
    from .rows_columnar import FrameContext

Datum = dict[str, Any]
Columns = dict[str, list[Any]]
#: Computes one column for a list of data (events, or lines with their parents).
ColumnFn = Callable[[Sequence[Datum], "RowContext"], list[Any]]
#: The same column computed from a frame of events (streams.rows_columnar).
ColumnarFn = Callable[["FrameContext"], list[Any]]

SERVER_SIDE_COLUMNS = frozenset({"ingested_at"})
SOURCE_COLUMNS = ("src_partition", "src_offset")


@dataclass(frozen=True)
class RowContext:
    """What row builders may use besides the data: positions, tokens, and for line tables the
    parent events with how many lines each has (parent values are computed once per event)."""

    partitions: list[int]
    offsets: list[int]
    pseudonymizer: Pseudonymizer
    parents: Sequence[Datum] | None = None
    counts: list[int] | None = None

    def per_line(self, values: list[Any]) -> list[Any]:
        """Repeat one value per parent event for each of its lines."""
        assert self.counts is not None
        return list(chain.from_iterable(map(repeat, values, self.counts)))


@dataclass(frozen=True)
class TableMapping:
    """How events of one record fill one table."""

    table: str
    lines: str | None = None
    overrides: dict[str, ColumnFn] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.table not in TABLES:
            raise ValueError(f"unknown table {self.table!r}; known: {', '.join(sorted(TABLES))}")
        cols = {c for c, _ in TABLES[self.table].columns}
        unknown = set(self.overrides) - cols
        if unknown:
            raise ValueError(f"{self.table}: overrides for unknown column(s) {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class RecordSpec:
    """One record type of a subsystem: its checks and the tables it lands in (its key, event time
    and primary table are facts of the record, declared in streams.records)."""

    record: str
    checks: tuple[Check, ...]
    tables: tuple[TableMapping, ...]

    def __post_init__(self) -> None:
        if self.record not in RECORDS:
            raise ValueError(f"{self.record}: not an input record of streams.records")
        if not self.tables:
            raise ValueError(f"{self.record}: needs at least one table")
        if self.tables[0].lines is not None:
            raise ValueError(f"{self.record}: the primary table must take the event itself, not its lines")
        if self.tables[0].table != RECORDS[self.record].primary_table:
            raise ValueError(f"{self.record}: its first table must be its primary table, "
                             f"{RECORDS[self.record].primary_table}")

    @property
    def key_field(self) -> str:
        return RECORDS[self.record].key_field

    @property
    def event_time(self) -> str:
        return RECORDS[self.record].event_time

    @property
    def primary_table(self) -> str:
        return self.tables[0].table

    @property
    def short_name(self) -> str:
        return self.record.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Subsystem:
    """A topic, what its key is and why, and the records it carries."""

    name: str
    key_doc: str
    records: tuple[RecordSpec, ...]

    def __post_init__(self) -> None:
        names = [r.record for r in self.records]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a record is declared twice")

    def spec(self, record: str) -> RecordSpec | None:
        for r in self.records:
            if r.record == record:
                return r
        return None

    def tables(self) -> list[str]:
        out: list[str] = []
        for r in self.records:
            for t in r.tables:
                if t.table not in out:
                    out.append(t.table)
        return out


# --- column helpers used by the modules ----------------------------------------------------------


@dataclass(frozen=True)
class Twinned:
    """A column function with its columnar twin, which must return the same list for the same events.

    An override without a twin keeps its record on the record path (streams.rows_columnar).
    :func:`compile_plan` keeps ``fn`` itself, so the record path runs exactly what it ran before.
    """

    fn: ColumnFn
    columnar: ColumnarFn

    def __call__(self, ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        return self.fn(ds, ctx)


def twinned(columnar: ColumnarFn) -> Callable[[ColumnFn], Twinned]:
    """Decorator giving a module's own column function its columnar twin."""

    def wrap(fn: ColumnFn) -> Twinned:
        return Twinned(fn, columnar)

    return wrap


def token_of(fld: str, domain: str = "psn") -> Twinned:
    """Pseudonymous token column for an identifier field."""

    def fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        tok = ctx.pseudonymizer.token
        return [tok(d.get(fld), domain).encode() for d in ds]

    def columnar(ctx: FrameContext) -> list[Any]:
        return ctx.tokens(ctx.get(fld), domain)

    return Twinned(fn, columnar)


def negated(fld: str) -> Twinned:
    def fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        return [-d[fld] for d in ds]

    def columnar(ctx: FrameContext) -> list[Any]:
        return ctx.negated(ctx.column(fld))

    return Twinned(fn, columnar)


def constant(value: Any) -> Twinned:
    def fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        return [value] * len(ds)

    def columnar(ctx: FrameContext) -> list[Any]:
        return [value] * ctx.height

    return Twinned(fn, columnar)


def from_field(fld: str, ms_to_s: bool = False) -> Twinned:
    """Copy another field (renamed column); optionally epoch ms → s."""

    def fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        if ms_to_s:
            return [d[fld] // 1000 for d in ds]
        return [d.get(fld) for d in ds]

    def columnar(ctx: FrameContext) -> list[Any]:
        if ms_to_s:
            return (ctx.column(fld) // 1000).to_list()
        values = ctx.get(fld)
        return [None] * ctx.height if values is None else values.to_list()

    return Twinned(fn, columnar)


def from_parent(fld: str, ms_to_s: bool = False) -> Twinned:
    """For line tables: a field of the line's parent event."""

    def fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        assert ctx.parents is not None
        if ms_to_s:
            return ctx.per_line([p[fld] // 1000 for p in ctx.parents])
        return ctx.per_line(utf8(list(map(itemgetter(fld), ctx.parents))))

    def columnar(ctx: FrameContext) -> list[Any]:
        values = ctx.parent(fld)
        return ctx.per_line((values // 1000).to_list() if ms_to_s else ctx.listed(values))

    return Twinned(fn, columnar)


def parent_token(fld: str, domain: str = "psn") -> Twinned:
    def fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        assert ctx.parents is not None
        tok = ctx.pseudonymizer.token
        return ctx.per_line([tok(p[fld], domain).encode() for p in ctx.parents])

    def columnar(ctx: FrameContext) -> list[Any]:
        return ctx.per_line(ctx.tokens(ctx.parent(fld), domain))

    return Twinned(fn, columnar)


# --- compiled row building -----------------------------------------------------------------------


def default_for(ch_type: str) -> Any:
    """What a column no field or override fills holds."""
    t = ch_type
    if t.startswith("Nullable("):
        return None
    if t.startswith("Array("):
        return []
    if "String" in t:
        return b""
    return 0


#: How a field is copied into its column: epoch ms → s, text → UTF-8 (None → b''), bool → int, or
#: as it is.
CopyKind = Literal["ms_to_s", "text", "or_empty", "flag", "as_is"]


def copy_kind(ch_type: str, nullable_src: bool) -> CopyKind:
    """One decision for both row builders (record and columnar), so they cannot disagree."""
    if ch_type.startswith("DateTime"):
        return "ms_to_s"
    if "String" in ch_type and not ch_type.startswith(("Nullable", "Array")):
        return "or_empty" if nullable_src else "text"
    if ch_type == "UInt8":
        return "flag"
    return "as_is"


def utf8(values: list[Any]) -> list[Any]:
    """Each ``str`` as its UTF-8 bytes, anything else as it is.

    Copied text goes to the sink as bytes (:mod:`sinks.base`): clickhouse-driver writes a bytes
    value in a third of the time it takes to encode a ``str``, and the columnar path gets bytes
    from its frame without building a ``str`` first (``Binary``)."""
    return [v.encode() if type(v) is str else v for v in values]


def source_fields(mapping: TableMapping, record_schema: dict[str, Any]) -> dict[str, Any]:
    """Avro type by field name of what one row is made from: the event, or one of its lines."""
    fields = {f["name"]: f["type"] for f in record_schema["fields"]}
    if mapping.lines is not None:
        items = fields[mapping.lines]["items"]
        fields = {f["name"]: f["type"] for f in items["fields"]}
    return fields


def is_nullable(avro_type: Any) -> bool:
    """Whether an Avro field type admits null (``["null", T]``): such a value may need a default."""
    return isinstance(avro_type, list) and "null" in avro_type


def _copier(col: str, ch_type: str, nullable_src: bool) -> ColumnFn:
    kind = copy_kind(ch_type, nullable_src)
    if kind == "ms_to_s":
        def dt_fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
            return [d[col] // 1000 for d in ds]
        return dt_fn
    if kind == "or_empty":
        def str_fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
            return utf8([d[col] or b"" for d in ds])
        return str_fn
    if kind == "text":
        def text_fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
            return utf8([d[col] for d in ds])
        return text_fn
    if kind == "flag":
        def bool_fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
            return [int(d[col]) for d in ds]
        return bool_fn

    get = itemgetter(col)

    def copy_fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        return list(map(get, ds))

    return copy_fn


def _missing(ch_type: str) -> ColumnFn:
    default = default_for(ch_type)

    def fn(ds: Sequence[Datum], ctx: RowContext) -> list[Any]:
        return [default] * len(ds) if not isinstance(default, list) else [[] for _ in ds]

    return fn


@dataclass(frozen=True)
class ColumnPlan:
    """For one (record, table): a function per column, in table order."""

    table: str
    lines: str | None
    fns: tuple[tuple[str, ColumnFn], ...]

    def build(self, data: Sequence[Datum], partitions: list[int], offsets: list[int],
              pseudonymizer: Pseudonymizer) -> Columns:
        if self.lines is None:
            ctx = RowContext(partitions, offsets, pseudonymizer)
            rows: Sequence[Datum] = data
        else:
            nested = list(map(itemgetter(self.lines), data))
            counts = list(map(len, nested))
            rows = list(chain.from_iterable(nested))
            base = RowContext(partitions, offsets, pseudonymizer, data, counts)
            ctx = RowContext(base.per_line(partitions), base.per_line(offsets), pseudonymizer, data, counts)
        out: Columns = {}
        for col, fn in self.fns:
            out[col] = fn(rows, ctx)
        return out


_INT_RANGES = {f"{u}Int{b}": ((0, 2**b - 1) if u else (-(2 ** (b - 1)), 2 ** (b - 1) - 1))
               for u in ("", "U") for b in (8, 16, 32, 64)}


def column_range(ch_type: str) -> tuple[int, int] | None:
    """Range of the raw value (as the staging table gets it) that fits a column of ``ch_type``:
    unscaled digits of a Decimal, epoch ms of a DateTime (stored as seconds), days of a Date, the
    integer types' own ranges; None for the others (strings, arrays, UInt8 flags)."""
    inner, _ = unwrap_nullable(ch_type)
    if inner.startswith("Decimal"):
        digits = decimal_precision(inner) or 18
        return -(10**digits - 1), 10**digits - 1
    if inner.startswith("DateTime") and not inner.startswith("DateTime64"):
        return 0, (2**32 - 1) * 1000 + 999
    if inner == "Date":
        return 0, 2**16 - 1
    if inner == "UInt8":
        return None
    return _INT_RANGES.get(inner)


def range_checks(spec: RecordSpec) -> tuple[Check, ...]:
    """A :class:`~streams.validation.Fits` check for every integer field copied into a column
    (event fields for the primary table, line fields under ``Each`` for a lines table), so that a
    value no column can hold is dead-lettered with OUT_OF_RANGE instead of failing the INSERT.
    A field absent from the record (a column filled otherwise) passes: the check reads ``get``."""
    out: list[Check] = []
    for m in spec.tables:
        checks = []
        for col, ch_type in TABLES[m.table].columns:
            bounds = column_range(ch_type)
            if bounds is None or col in SERVER_SIDE_COLUMNS or col.startswith("src_"):
                continue
            if col in m.overrides and not unwrap_nullable(ch_type)[0].startswith("Decimal"):
                continue  # derived some other way; a Decimal override (a reversal's sign) keeps the magnitude
            checks.append(Fits(col, bounds[0], bounds[1], f"{m.table}.{col} {ch_type}"))
        if not checks:
            continue
        out.extend(checks if m.lines is None else [Each(m.lines, tuple(checks))])
    return tuple(out)


def record_checks(spec: RecordSpec, record_schema: dict[str, Any], rules: FieldRules | None = None
                  ) -> tuple[Check, ...]:
    """Every check an event of ``spec`` must pass to land, in the order they run.

    Text limits come first, so a 600 kB or control-character value is rejected for that, before
    any later check formats it into a detail; then the event id, the column ranges, the fields
    the event's own values require (data: streams/data/fields.toml), and the module's checks.
    """
    rules = rules or load_field_rules()
    return (rules.text_check(record_schema), EventId(), *range_checks(spec),
            *rules.required_checks(spec.short_name), *spec.checks)


def compile_plan(mapping: TableMapping, record_schema: dict[str, Any]) -> ColumnPlan:
    """Derive the per-column functions of ``mapping`` from the table spec and the Avro schema."""
    fields = source_fields(mapping, record_schema)
    fns: list[tuple[str, ColumnFn]] = []
    for col, ch_type in TABLES[mapping.table].columns:
        if col in SERVER_SIDE_COLUMNS:
            continue
        if col in mapping.overrides:
            fn = mapping.overrides[col]
            fns.append((col, fn.fn if isinstance(fn, Twinned) else fn))
        elif col == "src_partition":
            fns.append((col, lambda ds, ctx: ctx.partitions))
        elif col == "src_offset":
            fns.append((col, lambda ds, ctx: ctx.offsets))
        elif col in fields:
            fns.append((col, _copier(col, ch_type, is_nullable(fields[col]))))
        else:
            fns.append((col, _missing(ch_type)))
    return ColumnPlan(mapping.table, mapping.lines, tuple(fns))


def merge_columns(into: dict[str, Columns], table: str, cols: Columns) -> None:
    """Append ``cols`` to the pending columns of ``table`` (same column set by construction)."""
    cur = into.get(table)
    if cur is None:
        into[table] = cols
        return
    for k, v in cols.items():
        cur[k].extend(v)
