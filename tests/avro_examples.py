"""Schema-driven example data for codec tests: a valid raw datum for any record, no generator needed."""

from __future__ import annotations

import random
from typing import Any


def example(schema: Any, rng: random.Random, *, nulls: bool = False) -> Any:
    """A raw datum matching ``schema``; ``nulls`` picks null for optional fields."""
    if isinstance(schema, list):
        branches = [s for s in schema if s != "null"]
        if "null" in schema and (nulls or not branches):
            return None
        return example(branches[0], rng, nulls=nulls)
    if isinstance(schema, str):
        schema = {"type": schema}
    t = schema["type"]
    if isinstance(t, (dict, list)):
        return example(t, rng, nulls=nulls)
    lt = schema.get("logicalType")
    if lt == "decimal":
        return rng.randint(-(10 ** (schema["precision"] - 1)), 10 ** (schema["precision"] - 1))
    if lt == "timestamp-millis":
        return rng.randint(1_600_000_000_000, 1_800_000_000_000)
    if lt == "date":
        return rng.randint(-20_000, 25_000)
    if lt == "uuid":
        return f"3f1c2a9e-{rng.getrandbits(16):04x}-4000-8000-{rng.getrandbits(48):012x}"
    if t == "record":
        return {f["name"]: example(f["type"], rng, nulls=nulls) for f in schema["fields"]}
    if t == "enum":
        return rng.choice(schema["symbols"])
    if t == "array":
        return [example(schema["items"], rng, nulls=nulls) for _ in range(rng.randint(0, 3))]
    if t == "map":
        return {f"k{i}": example(schema["values"], rng, nulls=nulls) for i in range(rng.randint(0, 3))}
    if t == "string":
        return rng.choice(["", "a", "H11010500001", "结算", "x" * 40])
    if t == "boolean":
        return rng.random() < 0.5
    if t == "int":
        return rng.randint(-(2**31), 2**31 - 1)
    if t == "long":
        return rng.randint(-(2**63), 2**63 - 1)
    if t == "bytes":
        return rng.randbytes(rng.randint(0, 20))
    if t in ("float", "double"):
        return rng.random()
    raise ValueError(f"no example for {schema!r}")
