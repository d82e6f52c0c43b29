"""The raw representation of a batch of events as columns (a polars DataFrame).

The record path (schemas.codec) turns each message into a dict of raw values; the columnar path
turns many messages of one record into one frame whose rows hold exactly those values: strings,
enum symbols and uuids as ``String``; ``int`` and dates (epoch days) as ``Int32``; ``long`` and
timestamps (epoch milliseconds) as ``Int64``; decimals as their unscaled ``Int64``; ``[null, T]`` as
a nullable ``T``; arrays as ``List``; nested records as ``Struct``. One place says that mapping
(:func:`raw_polars_schema`), so the decoder, the columnar checks and the columnar row builders agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

_PRIMITIVE: dict[str, pl.DataType] = {
    "string": pl.String(),
    "int": pl.Int32(),
    "long": pl.Int64(),
    "boolean": pl.Boolean(),
    "float": pl.Float32(),
    "double": pl.Float64(),
}


class UnsupportedSchema(ValueError):
    """A schema the columnar path does not represent (maps, fixed, bytes, unions of two types)."""


def _named(schema: Any, out: dict[str, Any], ns: str | None = None) -> None:
    if isinstance(schema, list):
        for s in schema:
            _named(s, out, ns)
        return
    if not isinstance(schema, dict):
        return
    t = schema.get("type")
    if t in ("record", "enum", "fixed"):
        space = schema.get("namespace", ns)
        name = schema["name"]
        out[name] = schema
        if space and "." not in name:
            out[f"{space}.{name}"] = schema
        for f in schema.get("fields", ()):
            _named(f["type"], out, space)
    elif isinstance(t, dict | list):
        _named(t, out, ns)
    elif t == "array":
        _named(schema["items"], out, ns)


def _dtype(schema: Any, named: dict[str, Any]) -> tuple[pl.DataType, bool]:
    """(dtype, nullable) of an Avro type in the raw representation."""
    if isinstance(schema, list):
        branches = [s for s in schema if s != "null"]
        if len(branches) != 1:
            raise UnsupportedSchema(f"union {schema!r}: only [null, T] is represented")
        dtype, _ = _dtype(branches[0], named)
        return dtype, "null" in schema
    if isinstance(schema, str):
        if schema in _PRIMITIVE:
            return _PRIMITIVE[schema], False
        if schema in named:
            return _dtype(named[schema], named)
        raise UnsupportedSchema(f"type {schema!r}")
    t = schema["type"]
    if isinstance(t, dict | list):
        return _dtype(t, named)
    lt = schema.get("logicalType")
    if lt == "decimal":
        if t != "bytes":
            raise UnsupportedSchema(f"decimal on {t!r}")
        return pl.Int64(), False
    if t == "enum":
        return pl.String(), False
    if t == "record":
        return pl.Struct({f["name"]: _dtype(f["type"], named)[0] for f in schema["fields"]}), False
    if t == "array":
        return pl.List(_dtype(schema["items"], named)[0]), False
    if t in _PRIMITIVE:
        return _PRIMITIVE[t], False
    raise UnsupportedSchema(f"type {t!r}")


def raw_polars_schema(record_schema: dict[str, Any]) -> pl.Schema:
    """The frame schema of ``record_schema``'s events (raises UnsupportedSchema)."""
    named: dict[str, Any] = {}
    _named(record_schema, named)
    return pl.Schema({f["name"]: _dtype(f["type"], named)[0] for f in record_schema["fields"]})


def raw_frame(record_schema: dict[str, Any], datums: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """The frame of raw datums (as Codec.decode returns them): tests and tools build frames this way."""
    return pl.DataFrame(list(datums), schema=raw_polars_schema(record_schema), orient="row")
