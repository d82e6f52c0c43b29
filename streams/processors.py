"""Processors: the pure CPU part of a stage, messages in, an :class:`~streams.messages.Outcome` out.

:class:`BatchProcessor` decodes, validates and pseudonymizes a subsystem's Avro events into rows and
dead letters and hands the valid ones to its rule engine; :class:`GroupedProcessor` feeds the
re-keyed stays (JSON) to the hospital or DRG engine. Neither does I/O; the ingestor
(streams.ingest) calls them and makes what they return durable (streams.checkpoint).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import orjson

from schemas import Codec, Decoded, DecodeError

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
from .rules.events import Engine, EngineEvent
from .rules.state import Store
from .validation import Limits, Violation, compile_checks

#: The record name of a re-keyed stay (streams.rules.engine.stay_record), as grouped engines see it.
STAY = "Stay"
#: What a re-sent message counts as in ``Outcome.duplicates`` when it cannot even be decoded.
UNREADABLE = "unreadable"


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
    ) -> None:
        self.subsystem = subsystem
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
        self._validators = {
            s.record: compile_checks(record_checks(s, codec.record_schema(s.record)), s.short_name)
            for s in subsystem.records
        }
        self._plans: dict[str, list[ColumnPlan]] = {
            s.record: [compile_plan(m, codec.record_schema(s.record)) for m in s.tables]
            for s in subsystem.records
        }
        self._dead = DeadLetters(topic, codec, sealer, pseudonymizer)
        self._alert_plan = alert_plan(codec)

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

    def process(self, msgs: Sequence[Message], already: AlreadyLanded | None = None, seal: bool = True
                ) -> Outcome:
        out = Outcome(events=len(msgs))
        t0 = time.perf_counter()
        decode = self.codec.decode
        subject = self.subsystem.name
        valid: dict[str, tuple[list[Datum], list[int], list[int]]] = {}
        ordered: list[EngineEvent] | None = [] if self.engine is not None else None
        failed: list[Failure] = []
        t_decode = 0.0
        t_validate = 0.0
        decoded: list[tuple[Message, Decoded | DecodeError]] = []
        for m in msgs:
            ta = time.perf_counter()
            if m.value is None:
                failed.append((m, "EMPTY_VALUE", "record has no value (tombstone)", None, None, None))
                continue
            try:
                decoded.append((m, decode(m.value, subject=subject)))
            except DecodeError as exc:
                decoded.append((m, exc))
            t_decode += time.perf_counter() - ta
        ti = time.perf_counter()
        ids = self.identities
        probes = (ids.probe([(m.partition, m.offset, dec.datum.get("event_id") if isinstance(dec, Decoded) else None,
                              m.value, m.replay, m.key) for m, dec in decoded])
                  if ids is not None else None)
        t_identity = time.perf_counter() - ti
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
        t2 = time.perf_counter()
        if failed:
            failed.sort(key=lambda f: (f[0].partition, f[0].offset))  # in stream order, like everything else
            self._dead.add(failed, already, out)
        t3 = time.perf_counter()
        if ordered and self.engine is not None:
            res = self.engine.process(ordered)
            add_alerts(out, res.alerts, already, self._alert_plan, self.pseudonymizer)
            out.emits.extend(res.emits)
            out.emit_sources.extend(res.emit_sources)
            out.state_capped += res.capped
            out.state_evicted += res.evicted
        out.stage_seconds = {
            "decode": t_decode,
            "validate": t_validate,
            "rows": t2 - t1,
            "identity": t_identity,
            "rules": time.perf_counter() - t3,
            "other": max(0.0, (t1 - t0) - t_decode - t_validate - t_identity) + (t3 - t2),
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
    keep = [i for i in range(len(data)) if not already(table, parts[i], offs[i], data[i][ident_field])]
    if len(keep) == len(data):
        return data, parts, offs
    skipped[table] += len(data) - len(keep)
    return [data[i] for i in keep], [parts[i] for i in keep], [offs[i] for i in keep]


def _rule_ids(engine: Engine) -> list[str]:
    """Ids of every rule, enabled or not, of the kinds ``engine`` raises alerts for."""
    return sorted(r.id for r in engine.book.current.rules if r.kind in engine.alert_kinds)
