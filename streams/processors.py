"""Processors: the pure CPU part of a stage, messages in, an :class:`~streams.messages.Outcome` out.

:class:`BatchProcessor` decodes, validates and pseudonymizes a subsystem's Avro events into rows and
dead letters and hands the valid ones to its rule engine; :class:`GroupedProcessor` feeds the
re-keyed stays (JSON) to the hospital or DRG engine. Neither does I/O; the ingestor
(streams.ingest) calls them and makes what they return durable (streams.checkpoint).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import polars as pl
import structlog

from schemas import Codec, Decoded, DecodeError
from schemas.columnar_decode import ArrowDecoder

from .base import ColumnPlan, Datum, Subsystem, compile_plan, merge_columns, record_checks
from .identity import CONFLICT_REASON, Identities, Verdict
from .messages import (
    ALERTS_TABLE,
    DEAD_LETTER_TABLE,
    AlreadyLanded,
    DeadLetters,
    Failure,
    Message,
    Outcome,
    add_alerts,
    alert_plan,
)
from .privacy import Pseudonymizer, Sealer
from .rows_columnar import ColumnarPlan, compile_columnar_plan, frame_dicts
from .rules.events import Engine, EngineEvent
from .rules.state import Store
from .validation import Limits, Validator, Violation, compile_checks
from .validation_columnar import MaskFn, compile_mask

log = structlog.get_logger(__name__)

#: The record name of a re-keyed stay (streams.rules.engine.stay_record), as grouped engines see it.
STAY = "Stay"
#: What a re-sent message counts as in ``Outcome.duplicates`` when it cannot even be decoded.
UNREADABLE = "unreadable"
#: Fewest messages of one record a call decodes as a frame: a round trip to the decoder's helper
#: process costs about a millisecond whatever the batch (the slices of 32 events a worker serving
#: pre-settlement checks processes are cheaper one by one).
COLUMNAR_MIN_EVENTS = 200
#: Most messages decoded as one frame: what the helper process holds at once (about 240 MB resident
#: at 5,000 settlements) stays the same whatever ``YIBAO_BATCH_MAX_EVENTS`` is.
COLUMNAR_MAX_EVENTS = 5000


@dataclass(frozen=True)
class Columnar:
    """What the columnar path needs for one record: its schema, its checks as a mask, its row plans."""

    schema: dict[str, Any]
    mask: MaskFn
    plans: tuple[ColumnarPlan, ...]


@dataclass(frozen=True)
class _FastGroup:
    record: str
    schema_id: int
    frame: pl.DataFrame
    event_ids: list[Any]


@dataclass(frozen=True)
class _FastRow:
    """A message the columnar path decoded and proved valid: its row in its group's frame."""

    group: _FastGroup
    row: int


def _event_id(dec: Decoded | DecodeError | _FastRow) -> object:
    if isinstance(dec, Decoded):
        return dec.datum.get("event_id")
    if isinstance(dec, _FastRow):
        return dec.group.event_ids[dec.row]
    return None


class Processor(Protocol):
    """What an ingestor drives (modelled on quix-streams' sink base: each method says when it is called).

    :meth:`process` is called with the batch's messages in partition order (a large batch in slices, in
    order, ``seal`` false on all but the last: what a batch remembers is sealed once, at its end), and
    ``already`` when a redelivery may hold events that landed before; it must not do I/O.
    :meth:`quarantine` is called for the one message of a batch that fails it (the ingestor
    found it by splitting the batch). :meth:`restored` is called for each newly assigned
    partition once its rule state has been read back into :attr:`stores`; :meth:`forget` when
    partitions are revoked, or a failed batch's partitions are rolled back.
    """

    topic: str
    codec: Codec
    stores: list[Store]
    #: tables this processor writes, looked up after a (re)assignment for what already landed
    tables: list[str]
    #: the event identities it recognises re-sends by (None: the stream has no re-sends to recognise)
    identities: Identities | None

    def process(self, msgs: Sequence[Message], already: AlreadyLanded | None = None, seal: bool = True
                ) -> Outcome: ...

    def quarantine(self, m: Message, reason: str, detail: str, already: AlreadyLanded | None = None) -> Outcome: ...

    def restored(self, partition: int) -> None: ...

    def forget(self, partitions: Sequence[int]) -> None: ...

    def alert_rule_ids(self) -> list[str]: ...


def identity_field(table: str) -> str:
    """The field of the *event* that fills the table's identity column."""
    return "setl_id" if table == "fee_details" else "event_id"


class BatchProcessor:
    """Pure CPU part: messages → rows and dead letters. No I/O, so it is unit-testable."""

    def __init__(
        self,
        subsystem: Subsystem,
        codec: Codec,
        pseudonymizer: Pseudonymizer,
        sealer: Sealer,
        topic: str,
        limits: Callable[[], Limits],
        engine: Engine | None = None,
        identities: Identities | None = None,
        decoder: ArrowDecoder | None = None,
    ) -> None:
        self.subsystem = subsystem
        #: decodes batches as frames (schemas.columnar_decode); None: every message on the record path
        self.decoder = decoder
        self.engine = engine
        self.identities = identities
        self.stores: list[Store] = [*(engine.stores if engine is not None else ()),
                                    *([identities.store] if identities is not None else ())]
        self.tables = [*subsystem.tables(), DEAD_LETTER_TABLE, *([ALERTS_TABLE] if engine else [])]
        self.codec = codec
        self.pseudonymizer = pseudonymizer
        self.sealer = sealer
        self.topic = topic
        self.limits = limits
        self._specs = {s.record: s for s in subsystem.records}
        self._validators: dict[str, Validator] = {}
        self._plans: dict[str, list[ColumnPlan]] = {}
        self._columnar: dict[str, Columnar] = {}
        self._dead = DeadLetters(topic, codec, sealer, pseudonymizer)
        self._alert_plan = alert_plan(codec)
        for s in subsystem.records:
            schema = codec.record_schema(s.record)
            checks = record_checks(s, schema)
            self._validators[s.record] = compile_checks(checks, s.short_name)
            self._plans[s.record] = [compile_plan(m, schema) for m in s.tables]
            if decoder is None:
                continue
            mask = compile_mask(checks)
            plans = [compile_columnar_plan(m, schema) for m in s.tables]
            if mask is not None and all(p is not None for p in plans):
                self._columnar[s.record] = Columnar(schema, mask, tuple(p for p in plans if p is not None))

    @property
    def columnar_records(self) -> tuple[str, ...]:
        """The records this processor can take through the columnar path (none without a decoder)."""
        return tuple(self._columnar)

    def validate(self, record: str, datum: Datum) -> Violation | None:
        """The first violation of ``datum`` (a raw ``record``), by the same compiled checks as the
        stream's: the pre-settlement check answers bad input with what the stream would dead-letter."""
        return self._validators[record](datum)

    def restored(self, partition: int) -> None:
        if self.identities is not None:
            self.identities.restored(partition)
        if self.engine is not None:
            self.engine.restored(partition)

    def forget(self, partitions: Sequence[int]) -> None:
        if self.identities is not None:
            self.identities.forget(partitions)
        if self.engine is not None:
            self.engine.forget(partitions)

    def alert_rule_ids(self) -> list[str]:
        return _rule_ids(self.engine) if self.engine is not None else []

    def _conflict_detail(self, m: Message, event_id: str) -> str:
        assert self.identities is not None
        first = self.identities.first_seen(m.partition, event_id)
        return (f"event_id first seen at offset {first} of partition {m.partition} with different content; "
                "the first stands")

    def _columnar_pass(self, msgs: Sequence[Message]) -> tuple[dict[int, _FastRow], float]:
        """Decode, as frames, the messages of records the columnar path covers and keep the rows its
        masks prove valid: message index → its row. Every other message (another schema version, a
        row the mask cannot vouch for, a batch the decoder refused) is left to the record path, which
        says exactly what is wrong with it; so both paths land and dead-letter the same events."""
        decoder = self.decoder
        if decoder is None or len(msgs) < COLUMNAR_MIN_EVENTS:
            return {}, 0.0
        groups: dict[str, tuple[int, list[int], list[memoryview]]] = {}
        for i, m in enumerate(msgs):
            if m.value is None or (hit := self.codec.latest_body(m.value, self.subsystem.name)) is None:
                continue
            record, schema_id, start = hit
            if record not in self._columnar:
                continue
            g = groups.get(record)
            if g is None:
                g = groups[record] = (schema_id, [], [])
            g[1].append(i)
            g[2].append(memoryview(m.value)[start:])
        fast: dict[int, _FastRow] = {}
        t_mask = 0.0
        chunks = [(record, schema_id, idx[at:at + COLUMNAR_MAX_EVENTS], bodies[at:at + COLUMNAR_MAX_EVENTS])
                  for record, (schema_id, idx, bodies) in groups.items() if len(idx) >= COLUMNAR_MIN_EVENTS
                  for at in range(0, len(idx), COLUMNAR_MAX_EVENTS)]
        if not chunks or not decoder.poll_ready():  # a helper still starting: this batch won't wait for it
            return {}, 0.0
        for record, schema_id, idx, bodies in chunks:
            col = self._columnar[record]
            timeouts = decoder.timeouts
            frame = decoder.decode(col.schema, bodies)
            if frame is None:
                if decoder.timeouts > timeouts:
                    log.warning("columnar decoder timed out: these events take the record path, and the "
                                "next batches too while it rests", record=record.rsplit(".", 1)[-1],
                                events=len(idx), timeouts=decoder.timeouts)
                continue
            t = time.perf_counter()
            ok = col.mask(frame).to_list()
            t_mask += time.perf_counter() - t
            group = _FastGroup(record, schema_id, frame, frame.get_column("event_id").to_list())
            for row, (i, good) in enumerate(zip(idx, ok, strict=True)):
                if good:
                    fast[i] = _FastRow(group, row)
        return fast, t_mask

    def process(self, msgs: Sequence[Message], already: AlreadyLanded | None = None, seal: bool = True
                ) -> Outcome:
        out = Outcome(events=len(msgs))
        t0 = time.perf_counter()
        fast, t_mask = self._columnar_pass(msgs)
        t_columnar = time.perf_counter() - t0 - t_mask
        decode = self.codec.decode
        subject = self.subsystem.name
        valid: dict[str, tuple[list[Datum], list[int], list[int]]] = {}
        ordered: list[EngineEvent | _FastRow] | None = [] if self.engine is not None else None
        failed: list[Failure] = []
        t_decode = 0.0
        t_validate = 0.0
        decoded: list[tuple[Message, Decoded | DecodeError | _FastRow]] = []
        for i, m in enumerate(msgs):
            ta = time.perf_counter()
            if m.value is None:
                failed.append((m, "EMPTY_VALUE", "record has no value (tombstone)", None, None, None))
                continue
            row = fast.get(i)
            if row is not None:
                decoded.append((m, row))
                continue
            try:
                decoded.append((m, decode(m.value, subject=subject)))
            except DecodeError as exc:
                decoded.append((m, exc))
            t_decode += time.perf_counter() - ta
        ti = time.perf_counter()
        ids = self.identities
        probes = (ids.probe([(m.partition, m.offset, _event_id(dec), m.value, m.replay, m.key) for m, dec in decoded])
                  if ids is not None else None)
        t_identity = time.perf_counter() - ti
        kept: dict[int, tuple[_FastGroup, list[int], list[int], list[int]]] = {}  # by frame: id(group)
        for j, (m, dec) in enumerate(decoded):
            tb = time.perf_counter()
            verdict = ids.verdict(probes[j]) if ids is not None and probes is not None else Verdict.NEW
            if isinstance(dec, DecodeError):
                if verdict is Verdict.DUPLICATE:  # the same unreadable bytes again: one input
                    out.duplicates[UNREADABLE] += 1
                    continue
                if verdict is Verdict.NEW and ids is not None and probes is not None:
                    ids.remember(probes[j], dead=True)
                failed.append((m, dec.reason_code, dec.detail, None, dec.schema_id, None))
                continue
            if isinstance(dec, _FastRow):
                g = dec.group
                short = g.record.rsplit(".", 1)[-1]
                if verdict is Verdict.DUPLICATE:
                    out.duplicates[short] += 1
                    continue
                if verdict is Verdict.CONFLICT:
                    failed.append((m, CONFLICT_REASON, self._conflict_detail(m, g.event_ids[dec.row]), "event_id",
                                   g.schema_id, short))
                    continue
                if verdict is Verdict.NEW and ids is not None and probes is not None:
                    ids.remember(probes[j], dead=False)
                bucket_f = kept.get(id(g))
                if bucket_f is None:
                    bucket_f = kept[id(g)] = (g, [], [], [])
                bucket_f[1].append(dec.row)
                bucket_f[2].append(m.partition)
                bucket_f[3].append(m.offset)
                if ordered is not None:
                    ordered.append(dec)
                continue
            spec = self._specs.get(dec.record)
            short = dec.record.rsplit(".", 1)[-1]
            if verdict is Verdict.DUPLICATE:
                out.duplicates[short] += 1
                continue
            if verdict is Verdict.CONFLICT:
                failed.append((m, CONFLICT_REASON, self._conflict_detail(m, dec.datum["event_id"]), "event_id",
                               dec.schema_id, short))
                continue
            v = (self._validators[dec.record](dec.datum) if spec is not None else
                 Violation("UNEXPECTED_RECORD", "", f"{dec.record} is not handled by {subject}"))
            t_validate += time.perf_counter() - tb
            if verdict is Verdict.NEW and ids is not None and probes is not None:
                ids.remember(probes[j], dead=v is not None)
            if v is not None:
                failed.append((m, v.reason_code, v.detail, v.field or None, dec.schema_id, short))
                continue
            assert spec is not None
            bucket = valid.get(dec.record)
            if bucket is None:
                bucket = valid[dec.record] = ([], [], [])
            bucket[0].append(dec.datum)
            bucket[1].append(m.partition)
            bucket[2].append(m.offset)
            if ordered is not None:
                ordered.append(EngineEvent(spec.short_name, dec.datum, m.partition, m.offset))
        if ids is not None and seal:
            ts = time.perf_counter()
            ids.seal()
            t_identity += time.perf_counter() - ts
        t1 = time.perf_counter()
        for record, (data, parts, offs) in valid.items():
            for plan in self._plans[record]:
                d, p, o = _without_landed(plan.table, data, parts, offs, already, out.skipped_rows,
                                          identity_field(plan.table))
                if d:
                    merge_columns(out.tables, plan.table, plan.build(d, p, o, self.pseudonymizer))
            out.landed[record.rsplit(".", 1)[-1]] += len(data)
        frames: dict[int, pl.DataFrame] = {}
        for key, (g, rows, parts, offs) in kept.items():
            record = g.record
            frame = frames[key] = g.frame[rows]
            for cplan in self._columnar[record].plans:
                f, p, o = _frame_without_landed(cplan.table, frame, parts, offs, already, out.skipped_rows,
                                                identity_field(cplan.table))
                if p:
                    merge_columns(out.tables, cplan.table, cplan.build(f, p, o, self.pseudonymizer))
            out.landed[record.rsplit(".", 1)[-1]] += len(rows)
        t2 = time.perf_counter()
        if failed:
            failed.sort(key=lambda f: (f[0].partition, f[0].offset))  # in stream order, like everything else
            self._dead.add(failed, already, out)
        t3 = time.perf_counter()
        if ordered and self.engine is not None:
            res = self.engine.process(_engine_events(ordered, kept, frames, self._specs, self.engine.reads))
            add_alerts(out, res.alerts, already, self._alert_plan, self.pseudonymizer)
            out.emits.extend(res.emits)
            out.emit_sources.extend(res.emit_sources)
            out.state_capped += res.capped
            out.state_evicted += res.evicted
        out.columnar = len(fast)
        out.stage_seconds = {
            "decode": t_decode + t_columnar,
            "validate": t_validate + t_mask,
            "rows": t2 - t1,
            "identity": t_identity,
            "rules": time.perf_counter() - t3,
            "other": max(0.0, (t1 - t0) - t_decode - t_columnar - t_mask - t_validate - t_identity) + (t3 - t2),
        }
        return out

    def quarantine(self, m: Message, reason: str, detail: str, already: AlreadyLanded | None = None) -> Outcome:
        """The dead letter of a message that failed its batch (see ``Ingestor._flush_isolating``)."""
        out = Outcome(events=1)
        self._dead.add([(m, reason, detail, None, None, None)], already, out)
        return out


class GroupedProcessor:
    """The hospital-month / DRG-group rules on a re-keyed stay stream (JSON, internal)."""

    def __init__(self, engine: Engine, topic: str, codec: Codec, pseudonymizer: Pseudonymizer,
                 sealer: Sealer) -> None:
        self.engine = engine
        self.topic = topic
        self.codec = codec
        self.pseudonymizer = pseudonymizer
        #: re-keyed stays are this pipeline's own output; their engines apply each setl_id once
        self.identities: Identities | None = None
        self.stores = list(engine.stores)
        self.tables = [ALERTS_TABLE, DEAD_LETTER_TABLE]
        self._alert_plan = alert_plan(codec)
        self._dead = DeadLetters(topic, codec, sealer, pseudonymizer)

    def restored(self, partition: int) -> None:
        self.engine.restored(partition)

    def forget(self, partitions: Sequence[int]) -> None:
        self.engine.forget(partitions)

    def alert_rule_ids(self) -> list[str]:
        return _rule_ids(self.engine)

    def process(self, msgs: Sequence[Message], already: AlreadyLanded | None = None, seal: bool = True
                ) -> Outcome:
        out = Outcome(events=len(msgs))
        t0 = time.perf_counter()
        res = self.engine.process([EngineEvent(STAY, orjson.loads(m.value), m.partition, m.offset, key=m.key.decode())
                                   for m in msgs if m.key is not None and m.value is not None])
        add_alerts(out, res.alerts, already, self._alert_plan, self.pseudonymizer)
        out.stage_seconds = {"rules": time.perf_counter() - t0}
        return out

    def quarantine(self, m: Message, reason: str, detail: str, already: AlreadyLanded | None = None) -> Outcome:
        out = Outcome(events=1)
        self._dead.add([(m, reason, detail, None, None, None)], already, out)
        return out


def _not_landed(table: str, idents: Sequence[Any], parts: list[int], offs: list[int],
                already: AlreadyLanded, skipped: Counter[str]) -> list[int] | None:
    """Indices of the events ``already`` says are not in ``table`` yet; None when that is all of them."""
    keep = [i for i in range(len(parts)) if not already(table, parts[i], offs[i], idents[i])]
    if len(keep) == len(parts):
        return None
    skipped[table] += len(parts) - len(keep)
    return keep


def _without_landed(
    table: str,
    data: list[Datum],
    parts: list[int],
    offs: list[int],
    already: AlreadyLanded | None,
    skipped: Counter[str],
    ident_field: str,
) -> tuple[list[Datum], list[int], list[int]]:
    if already is None:
        return data, parts, offs
    keep = _not_landed(table, [d[ident_field] for d in data], parts, offs, already, skipped)
    if keep is None:
        return data, parts, offs
    return [data[i] for i in keep], [parts[i] for i in keep], [offs[i] for i in keep]


def _frame_without_landed(
    table: str,
    frame: pl.DataFrame,
    parts: list[int],
    offs: list[int],
    already: AlreadyLanded | None,
    skipped: Counter[str],
    ident_field: str,
) -> tuple[pl.DataFrame, list[int], list[int]]:
    """:func:`_without_landed` for a frame of valid events."""
    if already is None:
        return frame, parts, offs
    keep = _not_landed(table, frame.get_column(ident_field).to_list(), parts, offs, already, skipped)
    if keep is None:
        return frame, parts, offs
    return frame[keep], [parts[i] for i in keep], [offs[i] for i in keep]


def _engine_events(ordered: list[EngineEvent | _FastRow],
                   kept: dict[int, tuple[_FastGroup, list[int], list[int], list[int]]],
                   frames: dict[int, pl.DataFrame], specs: dict[str, Any],
                   reads: Mapping[str, frozenset[str]]) -> list[EngineEvent]:
    """The engine's events in stream order, the columnar rows turned into dicts of the fields it reads."""
    if not kept:
        return [e for e in ordered if isinstance(e, EngineEvent)]
    rows: dict[int, Iterator[tuple[dict[str, Any], int, int]]] = {
        key: iter(zip(frame_dicts(frames[key], reads.get(specs[group.record].short_name)), parts, offs, strict=True))
        for key, (group, _, parts, offs) in kept.items()
    }
    out: list[EngineEvent] = []
    for e in ordered:
        if isinstance(e, EngineEvent):
            out.append(e)
            continue
        datum, partition, offset = next(rows[id(e.group)])
        out.append(EngineEvent(specs[e.group.record].short_name, datum, partition, offset))
    return out


def _rule_ids(engine: Engine) -> list[str]:
    """Ids of every rule, enabled or not, of the kinds ``engine`` raises alerts for."""
    return sorted(r.id for r in engine.book.current.rules if r.kind in engine.alert_kinds)
