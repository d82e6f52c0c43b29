"""Reading events from JSON lines for `yibao replay` and `yibao demo --input`.

Each line is an object whose ``event_type`` names the Avro record (short or full name) and whose
other keys are its fields (ISO-8601 dates and times; decimals as strings or numbers). Bad lines are
reported with their line numbers and skipped; good lines still go through.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from schemas import Codec, ConversionError
from streams.records import key_of

from .jsonl import json_lines
from .producer import OutEvent


@dataclass(frozen=True)
class LineError:
    line: int
    message: str


def read_jsonl(path: Path, codec: Codec, errors: list[LineError]) -> Iterator[OutEvent]:
    """Yield events from ``path``; append a LineError for every line that cannot be used."""
    for n, obj in json_lines(path):
        if isinstance(obj, str):
            errors.append(LineError(n, obj))
            continue
        et = obj.get("event_type")
        if not isinstance(et, str):
            errors.append(LineError(n, "missing event_type"))
            continue
        try:
            record = codec.resolve_record(et)
        except KeyError:
            errors.append(LineError(n, f"unknown event_type {et!r}"))
            continue
        if codec.subject_of(record) not in ("settlement", "procurement", "supervision"):
            errors.append(LineError(n, f"{et} is not an input event"))
            continue
        try:
            datum = codec.from_json(record, obj)
            value = codec.encode(record, datum)
        except ConversionError as exc:
            errors.append(LineError(n, str(exc).replace(record + ".", "", 1)))
            continue
        except Exception as exc:
            errors.append(LineError(n, f"cannot encode: {exc}"[:300]))
            continue
        yield OutEvent(record, key_of(record, datum), datum, value)
