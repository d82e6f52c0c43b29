"""Loading the rule base and keeping it current while workers run.

Seed rules ship in ``data/rules.toml``; operators publish changes with ``yibao rules push FILE``
to the compacted rules topic (key = rule id, value = the rule as JSON). Every worker reads that
topic from the beginning and keeps reading; each record replaces the rule of its id, so a new
version, a parameter or an enable flag takes effect at the next batch, without a restart.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .model import Rule, RuleError

log = structlog.get_logger(__name__)
DATA = Path(__file__).resolve().parent / "data"
RULES_FILE = DATA / "rules.toml"


@dataclass(frozen=True)
class RuleSet:
    """An immutable snapshot: swapped whole, so a batch never sees half an update."""

    rules: tuple[Rule, ...]

    def enabled(self, kind: str | None = None) -> list[Rule]:
        return [r for r in self.rules if r.enabled and (kind is None or r.kind == kind)]

    def by_id(self, rule_id: str) -> Rule | None:
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None

    def replace(self, rule: Rule) -> RuleSet:
        others = [r for r in self.rules if r.id != rule.id]
        return RuleSet(tuple(sorted([*others, rule], key=lambda r: r.id)))


def load_rules_file(path: Path, check: Callable[[Rule], None] | None = None) -> list[Rule]:
    """Rules from a TOML file (``[[rule]]`` tables); errors read ``<file>:<line>: <rule>: <field>``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = m.group(1) if m else "1"
        msg = re.sub(r" \(at line .*\)$", "", str(exc))
        raise RuleError(f"{path}:{where}: {msg}") from None
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if re.match(r"\s*\[\[rule\]\]", line)]
    items = doc.get("rule")
    if not isinstance(items, list) or not items:
        raise RuleError(f"{path}: no [[rule]] tables")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        line = starts[i] if i < len(starts) else 0
        try:
            rule = Rule.from_dict(item)
            if rule.id in seen:
                raise RuleError(f"{rule.id}: defined twice")
            seen.add(rule.id)
            if check is not None:
                check(rule)
        except RuleError as exc:
            raise RuleError(f"{path}:{_field_line(text, line, exc.field)}: {exc}", exc.field) from None
        rules.append(rule)
    return rules


_TOP_FIELDS = frozenset({"id", "name_zh", "name_en", "version", "kind", "result_type", "severity", "scope",
                         "stage", "scenarios", "params", "enabled", "description"})


def _field_line(text: str, start: int, field: str | None) -> int:
    """Best line for an error: the named field's line in the rule's table (a parameter's own line,
    or the ``params`` line when it is inline); the rule's first line when the field is absent."""
    if not field or not start:
        return start
    line = _line_of(text, start, field)
    if line == start and field not in _TOP_FIELDS:
        return _line_of(text, start, "params")
    return line


def _line_of(text: str, start: int, name: str) -> int:
    lines = text.splitlines()
    for j in range(start, len(lines)):
        if j > start and re.match(r"\s*\[\[rule\]\]", lines[j]):
            break
        if re.match(rf"\s*{re.escape(name)}\s*=", lines[j]):
            return j + 1
    return start


class RuleBook:
    """The current RuleSet, seeded from the file and updated from the rules topic."""

    def __init__(self, rules: Iterable[Rule], check: Callable[[Rule], None] | None = None) -> None:
        self._set = RuleSet(tuple(sorted(rules, key=lambda r: r.id)))
        self._check = check
        self.applied: int = 0

    @property
    def current(self) -> RuleSet:
        return self._set

    def apply(self, payload: bytes | None, key: bytes | None) -> Rule | None:
        """Apply one rules-topic record; a bad record is logged and ignored (never crash workers)."""
        if payload is None or key is None:
            return None
        try:
            rule = Rule.from_dict(json.loads(payload))
            if rule.id != key.decode():
                raise RuleError(f"record key {key.decode()!r} does not match rule id {rule.id!r}")
            if self._check is not None:
                self._check(rule)
        except (RuleError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            log.error("ignoring an invalid rule update", error=str(exc)[:300])
            return None
        old = self._set.by_id(rule.id)
        if old is not None and old.to_dict() == rule.to_dict():
            return None
        self._set = self._set.replace(rule)
        self.applied += 1
        log.info("rule updated", rule_id=rule.id, version=rule.version, enabled=rule.enabled)
        return rule


async def follow_rules_topic(book: RuleBook, topic: str, consumer_kwargs: dict[str, Any],
                             stopping: asyncio.Event) -> None:
    """Read the rules topic from the beginning (every worker sees every record), forever."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**consumer_kwargs, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        parts: set[int] = set()
        while not parts and not stopping.is_set():
            await consumer.topics()  # refreshes cluster metadata
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                await asyncio.sleep(1)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not stopping.is_set():
            got = await consumer.getmany(timeout_ms=1000)
            for records in got.values():
                for r in records:
                    book.apply(r.value, r.key)
    finally:
        await consumer.stop()
