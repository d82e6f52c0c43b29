"""JSON lines, read one way: `yibao replay` / `demo --input` events, ground truth, alerts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, object) for every non-blank line of ``path``, or (line number, why) for a
    line that is not a JSON object; the caller decides whether a bad line skips or stops."""
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, f"not JSON: {exc.msg} at column {exc.colno}"
                continue
            yield n, obj if isinstance(obj, dict) else "not a JSON object"


def read_objects(path: Path, required: frozenset[str], what: str) -> list[dict[str, Any]]:
    """Every object of ``path``; the first line that is not one, or lacks a ``required`` key, is a
    ValueError naming the file and the line."""
    out = []
    for n, row in json_lines(path):
        if isinstance(row, str):
            raise ValueError(f"{path}:{n}: {row}")
        if not required <= row.keys():
            raise ValueError(f"{path}:{n}: not {what} (needs {', '.join(sorted(required))})")
        out.append(row)
    return out
