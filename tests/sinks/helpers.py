"""Raw values at the edges of every column type, and the Python values ClickHouse must return.

Derived from ``TABLES`` rather than written per table, so a column added to a spec is covered
by the round-trip test without touching it.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from sinks.tables import TableSpec, decimal_scale, unwrap_nullable

EPOCH = dt.date(1970, 1, 1)
CHINA_OFFSET = dt.timedelta(hours=8)
BINARY_COLUMNS = frozenset({"payload", "source_key"})
MAX_UNSCALED = 10**16 - 1  # Decimal(16, s) holds 16 digits: 99999999999999.99 at scale 2

_EDGES: dict[str, list[Any]] = {
    "Date": [0, 19753, 65535],
    "Nullable(Date)": [None, 0, 19753],
    "String": ["", "医保 héllo", "x" * 300],
    "LowCardinality(String)": ["", "110000", "医保"],
    "Array(String)": [[], ["a", ""], ["医保", "医保", "医保"]],
    "Array(Int32)": [[], [-(2**31), 0], [2**31 - 1, 2**31 - 1, 1]],
    "UInt8": [0, 1, 255],
    "UInt16": [0, 1, 65535],
    "UInt64": [0, 1, 2**64 - 1],
    "Int32": [-(2**31), 0, 2**31 - 1],
    "Int64": [-(2**63), 0, 2**63 - 1],
    "Nullable(Int32)": [None, -1, 2**31 - 1],
    "Nullable(UInt32)": [None, 0, 2**32 - 1],
}


def edge_values(name: str, ch_type: str) -> list[Any]:
    """Three raw values for a column: extremes, zero/empty and NULL where allowed."""
    inner, nullable = unwrap_nullable(ch_type)
    if name in BINARY_COLUMNS:
        return [b"\xff\x00\xfe", b"", "valid ütf-8".encode()]
    if decimal_scale(inner) is not None:
        return [None, -1, MAX_UNSCALED] if nullable else [-MAX_UNSCALED, 0, MAX_UNSCALED]
    if inner.startswith("DateTime"):
        return [0, 1706718600, 2**32 - 1]
    return list(_EDGES[ch_type])


def logical(raw: Any, ch_type: str, name: str = "") -> Any:
    """What a query must return for ``raw`` stored in a column of ``ch_type``."""
    if raw is None:
        return None
    inner, _ = unwrap_nullable(ch_type)
    scale = decimal_scale(inner)
    if scale is not None:
        return Decimal(raw).scaleb(-scale)
    if inner == "Date":
        return EPOCH + dt.timedelta(days=raw)
    if inner.startswith("DateTime"):
        return dt.datetime.fromtimestamp(raw, tz=dt.UTC)
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    return raw


def edge_batch(spec: TableSpec, version: tuple[int, ...]) -> dict[str, list[Any]]:
    """Three rows for ``spec``'s staging table; ``src_offset`` ascends, so it orders them."""
    types = dict(spec.columns_for(version))
    return {name: edge_values(name, types[name]) for name in spec.insert_columns}


def default_batch(spec: TableSpec, n: int, start_offset: int = 0) -> dict[str, list[Any]]:
    """``n`` plausible rows (cheap to build) for throughput and exactness tests."""
    columns: dict[str, list[Any]] = {}
    for name, ch_type in spec.raw_columns:
        if name == "src_offset":
            columns[name] = list(range(start_offset, start_offset + n))
        elif ch_type.startswith("Nullable"):
            columns[name] = [None] * n
        elif ch_type == "UInt32":  # event times
            columns[name] = [1_700_000_000 + i for i in range(n)]
        elif ch_type in ("Int64", "Int32", "UInt8", "UInt16", "UInt64"):
            columns[name] = [i % 100 for i in range(n)]
        elif ch_type.startswith("Array"):
            columns[name] = [[] for _ in range(n)]
        else:
            columns[name] = [f"{name}-{i % 1000}" for i in range(n)]
    return columns
