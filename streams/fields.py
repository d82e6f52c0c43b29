"""Field rules that are data (``streams/data/fields.toml``): how long each string field may be,
which fields are free text, and which fields an event requires given the value of another.

The checks are derived here from each record's Avro schema, so every string field of every record
(nested fee lines and string arrays included) is covered without a module listing them.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .validation import RequiredWhen, Text

FIELDS_FILE = Path(__file__).parent / "data" / "fields.toml"


@dataclass(frozen=True)
class Required:
    """``fields`` are required in ``record`` events whose ``when`` field is one of ``values``."""

    record: str
    when: str
    values: frozenset[str]
    fields: tuple[str, ...]
    why: str

    def __post_init__(self) -> None:
        if not self.fields or not self.values:
            raise ValueError(f"{self.record}: a required-fields rule needs fields and values")


@dataclass(frozen=True)
class FieldRules:
    max_chars: int
    free_text: Mapping[str, int] = field(default_factory=dict)
    required: tuple[Required, ...] = ()

    def __post_init__(self) -> None:
        if self.max_chars < 1 or any(n < 1 for n in self.free_text.values()):
            raise ValueError("text limits must be at least 1 character")

    @classmethod
    def from_toml(cls, doc: Mapping[str, Any]) -> FieldRules:
        text = doc.get("text", {})
        return cls(
            max_chars=int(text.get("max_chars", 50)),
            free_text={str(k): int(v) for k, v in text.get("free", {}).items()},
            required=tuple(
                Required(str(r["record"]), str(r["when"]), frozenset(map(str, r["values"])),
                         tuple(map(str, r["fields"])), str(r.get("why", f"a {r['record']}")))
                for r in doc.get("required", ())
            ),
        )

    def text_check(self, record_schema: Mapping[str, Any]) -> Text:
        """One :class:`Text` check over every string field of a record (its Avro schema)."""
        fields: list[tuple[str, int, bool]] = []
        arrays: list[tuple[str, int]] = []
        lines: list[tuple[str, Text]] = []
        for f in record_schema["fields"]:
            name = f["name"]
            for t in f["type"] if isinstance(f["type"], list) else [f["type"]]:
                if _is_string(t):
                    free = name in self.free_text
                    fields.append((name, self.free_text.get(name, self.max_chars), free))
                elif isinstance(t, dict) and t.get("type") == "array":
                    items = t["items"]
                    if _is_string(items):
                        arrays.append((name, self.max_chars))
                    elif isinstance(items, dict) and items.get("type") == "record":
                        lines.append((name, self.text_check(items)))
        return Text(tuple(fields), tuple(arrays), tuple(lines))

    def required_checks(self, record_short_name: str) -> tuple[RequiredWhen, ...]:
        return tuple(RequiredWhen(r.when, r.values, r.fields, r.why)
                     for r in self.required if r.record == record_short_name)


def _is_string(t: Any) -> bool:
    return t == "string" or (isinstance(t, dict) and t.get("type") == "string")


@functools.cache
def load_field_rules(path: Path = FIELDS_FILE) -> FieldRules:
    with path.open("rb") as fh:
        return FieldRules.from_toml(tomllib.load(fh))
