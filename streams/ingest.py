"""Batch ingestion of one subsystem topic into ClickHouse, with exactly-once effect.

Why batches and not a Faust per-event agent: measured on these 2-core machines, Faust's per-event
stream machinery alone tops out near 5,000 events/s with an empty agent body (``take_events``),
while aiokafka's ``getmany`` delivers ~110,000 messages/s. Decoding (~100 µs per settlement) and
ClickHouse encoding already fill the budget, so the hot path consumes batches directly and the
Faust app hosts it (see streams/app.py and docs/design.md).

Delivery: offsets are committed only after a batch is durable (dead letters produced, rows
inserted). After a crash or rebalance, the uncommitted tail is redelivered; before inserting it,
each table is asked which of those source offsets it already holds (rows carry ``src_partition``
and ``src_offset``), and those rows are not inserted again. The state table is in docs/design.md.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import OffsetAndMetadata

from schemas import Codec, DecodeError
from sinks.base import Backend, SinkError, SinkUnavailable, literal

from . import metrics
from .base import ColumnPlan, Columns, Datum, Subsystem, TableMapping, compile_plan, merge_columns, record_checks
from .privacy import Pseudonymizer, Sealer, safe_error, scrub
from .rules.engine import EngineEvent, SettlementEngine
from .rules.grouped import GroupedEngine
from .rules.procurement import ProcurementEngine
from .rules.state import Store, restore, write_changelog
from .validation import Limits, compile_checks

log = structlog.get_logger(__name__)
T = TypeVar("T")

DEADLETTER_RECORD = "cn.nhsa.yibao.pipeline.DeadLetter"
ALERT_RECORD = "cn.nhsa.yibao.pipeline.AnomalyAlert"
DEAD_LETTER_TABLE = "dead_letters"
ALERTS_TABLE = "alerts"
_DL_NAMESPACE = uuid.UUID("6d1f0c36-2d0e-4f0f-9a53-8c1f5b0e7a11")


@dataclass(frozen=True)
class Message:
    """The parts of a Kafka record the pipeline uses."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def dead_letter_id(topic: str, partition: int, offset: int) -> str:
    """Deterministic: the same source position always yields the same dead-letter id."""
    return str(uuid.uuid5(_DL_NAMESPACE, f"{topic}/{partition}/{offset}"))


@dataclass
class Outcome:
    """What one batch produced: rows per table, dead letters, counts for metrics and tests."""

    tables: dict[str, Columns] = field(default_factory=dict)
    dead: list[Datum] = field(default_factory=list)
    dead_keys: list[bytes] = field(default_factory=list)
    landed: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    skipped_rows: Counter[str] = field(default_factory=Counter)
    events: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    alerts: list[Datum] = field(default_factory=list)
    emits: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # stream, key, value
    state_capped: int = 0  # events after which a key's state was cut to its bound

    def rows(self, table: str) -> int:
        cols = self.tables.get(table)
        return len(next(iter(cols.values()))) if cols else 0


#: ``already(table, partition, offset, ident)``: that table holds rows of that event at that position.
AlreadyLanded = Callable[[str, int, int, str], bool]

#: The column identifying an event's rows in each table (default ``event_id``). Offsets alone are not
#: enough: a recreated topic reuses them, and a different event at a reused offset must still land.
IDENTITY = {"fee_details": "setl_id", DEAD_LETTER_TABLE: "payload_digest"}


def identity_column(table: str) -> str:
    return IDENTITY.get(table, "event_id")


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
        engine: SettlementEngine | ProcurementEngine | None = None,
    ) -> None:
        self.subsystem = subsystem
        self.engine = engine
        self.stores: list[Store] = list(engine.stores) if engine is not None else []
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

    def restored(self, partition: int) -> None:
        if self.engine is not None:
            self.engine.restored(partition)

    def forget(self, partitions: Sequence[int]) -> None:
        if self.engine is not None:
            self.engine.forget(partitions)

    def alert_rule_ids(self) -> list[str]:
        return _rule_ids(self.engine) if self.engine is not None else []

    def process(self, msgs: Sequence[Message], already: AlreadyLanded | None = None) -> Outcome:
        out = Outcome(events=len(msgs))
        t0 = time.perf_counter()
        decode = self.codec.decode
        subject = self.subsystem.name
        valid: dict[str, tuple[list[Datum], list[int], list[int]]] = {}
        ordered: list[EngineEvent] | None = [] if self.engine is not None else None
        failed: list[Failure] = []
        t_decode = 0.0
        t_validate = 0.0
        for m in msgs:
            ta = time.perf_counter()
            if m.value is None:
                failed.append((m, "EMPTY_VALUE", "record has no value (tombstone)", None, None, None))
                continue
            try:
                dec = decode(m.value, subject=subject)
            except DecodeError as exc:
                failed.append((m, exc.reason_code, exc.detail, None, exc.schema_id, None))
                continue
            tb = time.perf_counter()
            t_decode += tb - ta
            spec = self._specs.get(dec.record)
            short = dec.record.rsplit(".", 1)[-1]
            if spec is None:
                failed.append((m, "UNEXPECTED_RECORD", f"{dec.record} is not handled by {subject}", None,
                               dec.schema_id, short))
                continue
            v = self._validators[dec.record](dec.datum)
            t_validate += time.perf_counter() - tb
            if v is not None:
                failed.append((m, v.reason_code, v.detail, v.field or None, dec.schema_id, short))
                continue
            bucket = valid.get(dec.record)
            if bucket is None:
                bucket = valid[dec.record] = ([], [], [])
            bucket[0].append(dec.datum)
            bucket[1].append(m.partition)
            bucket[2].append(m.offset)
            if ordered is not None:
                ordered.append(EngineEvent(spec.short_name, dec.datum, m.partition, m.offset))
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
            self._dead.add(failed, already, out)
        t3 = time.perf_counter()
        if ordered and self.engine is not None:
            res = self.engine.process(ordered)
            add_alerts(out, res.alerts, already, self._alert_plan, self.pseudonymizer)
            out.emits.extend(res.emits)
            out.state_capped += res.capped
        out.stage_seconds = {
            "decode": t_decode,
            "validate": t_validate,
            "rows": t2 - t1,
            "rules": time.perf_counter() - t3,
            "other": max(0.0, (t1 - t0) - t_decode - t_validate) + (t3 - t2),
        }
        return out

    def quarantine(self, m: Message, reason: str, detail: str, already: AlreadyLanded | None = None) -> Outcome:
        """The dead letter of a message that failed its batch (see ``Ingestor._flush_isolating``)."""
        out = Outcome(events=1)
        self._dead.add([(m, reason, detail, None, None, None)], already, out)
        return out


#: A message that cannot land: (message, reason code, detail, field, schema id, event type).
Failure = tuple[Message, str, str, str | None, int | None, str | None]


class DeadLetters:
    """Dead letters of one source topic: rows for the dead_letters table (the original sealed
    whole) and their topic copies (bounded, :func:`fit_for_topic`)."""

    def __init__(self, topic: str, codec: Codec, sealer: Sealer, pseudonymizer: Pseudonymizer) -> None:
        self.topic = topic
        self.sealer = sealer
        self.pseudonymizer = pseudonymizer
        self._plan = compile_plan(TableMapping(DEAD_LETTER_TABLE), codec.record_schema(DEADLETTER_RECORD))

    def add(self, failed: Sequence[Failure], already: AlreadyLanded | None, out: Outcome) -> None:
        now_ms = int(time.time() * 1000)
        data: list[Datum] = []
        parts: list[int] = []
        offs: list[int] = []
        for m, code, detail, fld, schema_id, event_type in failed:
            out.reasons[code] += 1
            digest = self.sealer.digest(m.value or b"")
            if already is not None and already(DEAD_LETTER_TABLE, m.partition, m.offset, digest):
                out.skipped_rows[DEAD_LETTER_TABLE] += 1
                continue
            datum: Datum = {
                "event_id": dead_letter_id(self.topic, m.partition, m.offset),
                "reason_code": code,
                "reason_detail": clip(detail),
                "field": fld,
                "source_topic": self.topic,
                "source_partition": m.partition,
                "source_offset": m.offset,
                "source_key": self.sealer.seal(m.key) if m.key is not None else None,
                "schema_id": schema_id,
                "event_type": event_type,
                "payload": self.sealer.seal(m.value or b""),
                "payload_digest": digest,
                "failed_at": now_ms,
            }
            data.append(datum)
            parts.append(m.partition)
            offs.append(m.offset)
            out.dead_keys.append(f"{self.topic}/{m.partition}".encode())
        if data:
            merge_columns(out.tables, DEAD_LETTER_TABLE, self._plan.build(data, parts, offs, self.pseudonymizer))
        out.dead.extend(fit_for_topic(d) for d in data)


#: Bytes of key + value that any message the worker sends may take. Producers and brokers refuse
#: messages over ~1 MB by default (max_request_size, message.max.bytes); one message over it would
#: fail its batch on every restart and stop the partition for good. The margin covers record and
#: batch headers.
MESSAGE_BUDGET = 900_000
#: Characters of a dead letter's readable detail (validators quote values; a value may be huge).
DETAIL_MAX_CHARS = 2_000
#: What a dead letter takes besides its payload, key and detail (ids, topic, codes, times).
_DEAD_LETTER_OVERHEAD = 2_000


def clip(text: str, most: int = DETAIL_MAX_CHARS) -> str:
    """``text`` cut to ``most`` characters, with a marker saying how much was cut."""
    if len(text) <= most:
        return text
    return f"{text[:most]}… [{len(text) - most:,} more characters]"


def fit_for_topic(datum: Datum) -> Datum:
    """The topic copy of a dead letter, within :data:`MESSAGE_BUDGET` as a whole: the sealed
    payload is dropped first, then the sealed key. The table keeps every byte, which is what
    ``yibao dlq`` reads; the topic copy says what it left out."""
    size = (len(datum.get("payload") or b"") + len(datum.get("source_key") or b"")
            + 4 * len(datum["reason_detail"]) + _DEAD_LETTER_OVERHEAD)
    dropped: list[str] = []
    for f in ("payload", "source_key"):
        if size <= MESSAGE_BUDGET:
            break
        if datum.get(f):
            size -= len(datum[f])
            dropped.append(f)
    if not dropped:
        return datum
    return {**datum, **{f: (b"" if f == "payload" else None) for f in dropped},
            "reason_detail": f"{datum['reason_detail']} [sealed {' and '.join(dropped)} too large for the topic: "
                             f"kept in the dead_letters table only]"}


class EmitTooLarge(Exception):
    """A message the worker built is over :data:`MESSAGE_BUDGET` even after bounding: it is the
    event that produced it that cannot be processed (the batch is split until it is found)."""


#: How often a worker backing off from an unavailable ClickHouse probes it: it resumes within
#: about this long of the server coming back, whatever the back-off has grown to.
PROBE_INTERVAL_S = 0.25

#: Parts a failing batch is split into, recursively, to find the message that fails it: with
#: 5,000 events, four rounds of at most eight flushes each, instead of thirteen rounds of two
#: (each round restores the rule state of the batch's partitions from the changelog once).
SPLIT_WAYS = 8


def message_failure(exc: BaseException) -> str | None:
    """The dead-letter reason when ``exc`` may be caused by one message of the batch, else None
    (a broker or network problem: not the data's fault, so nothing is quarantined for it).

    Deterministic failures are: any exception out of the pure processing (decode, validate,
    rows, rules: a defect an input triggers), a message too large to send, and ClickHouse
    refusing the values of the rows (``SinkError.about_data``). ClickHouse refusing anything
    else (a table or column missing, no rights) concerns every event alike: nothing is
    quarantined for it, the worker stops as before; ``SinkUnavailable`` is retried earlier.
    """
    if isinstance(exc, EmitTooLarge | MessageSizeTooLargeError):
        return "EMIT_TOO_LARGE"
    if isinstance(exc, SinkError):
        return "REJECTED_BY_SINK" if exc.about_data and not isinstance(exc, SinkUnavailable) else None
    if isinstance(exc, ProcessingFailed):
        return "UNPROCESSABLE"
    return None


class ProcessingFailed(Exception):
    """An exception out of a processor's ``process``: raised around it so the ingestor can tell
    a defect that an input triggers from a broker or network failure."""


def describe(exc: BaseException) -> str:
    """One line for logs and dead letters that cannot quote the data (:func:`safe_error`): what
    failed and where; ClickHouse's own message is left out, as it quotes the values it refused."""
    if isinstance(exc, EmitTooLarge):
        return str(exc)
    if isinstance(exc, SinkError):
        return f"ClickHouse refused the rows (error code {exc.code}; its message quotes the data, so it is not kept)"
    if isinstance(exc, ProcessingFailed) and exc.__cause__ is not None:
        return safe_error(exc.__cause__)
    return safe_error(exc)


def alert_key(alert: Datum) -> bytes:
    """Key of an alert on the alerts topic: the institution, else the person's token, else its id."""
    return str(alert["fixmedins_code"] or alert["psn_token"] or alert["alert_id"]).encode()


def alert_plan(codec: Codec) -> ColumnPlan:
    """Alert rows: the evidence map becomes two parallel arrays (keys sorted)."""

    def keys(ds: Sequence[Datum], ctx: object) -> list[object]:
        return [sorted(d["evidence"]) for d in ds]

    def values(ds: Sequence[Datum], ctx: object) -> list[object]:
        return [[d["evidence"][k] for k in sorted(d["evidence"])] for d in ds]

    return compile_plan(TableMapping(ALERTS_TABLE, overrides={"evidence_keys": keys, "evidence_values": values}),
                        codec.record_schema(ALERT_RECORD))


def add_alerts(out: Outcome, alerts: Sequence[tuple[Datum, int, int]], already: AlreadyLanded | None,
               plan: ColumnPlan, pseudonymizer: Pseudonymizer) -> None:
    """Alerts not already landed go to the alerts topic and the alerts table (by triggering position)."""
    data: list[Datum] = []
    parts: list[int] = []
    offs: list[int] = []
    for datum, p, o in alerts:
        if already is not None and already(ALERTS_TABLE, p, o, datum["event_id"]):
            out.skipped_rows[ALERTS_TABLE] += 1
            continue
        data.append(datum)
        parts.append(p)
        offs.append(o)
    if data:
        out.alerts.extend(data)
        merge_columns(out.tables, ALERTS_TABLE, plan.build(data, parts, offs, pseudonymizer))


class GroupedProcessor:
    """The hospital-month / DRG-group rules on a re-keyed stay stream (JSON, internal)."""

    def __init__(self, engine: GroupedEngine, topic: str, codec: Codec, pseudonymizer: Pseudonymizer,
                 sealer: Sealer) -> None:
        self.engine = engine
        self.topic = topic
        self.codec = codec
        self.pseudonymizer = pseudonymizer
        self.stores = [engine.store]
        self.tables = [ALERTS_TABLE, DEAD_LETTER_TABLE]
        self._alert_plan = alert_plan(codec)
        self._dead = DeadLetters(topic, codec, sealer, pseudonymizer)

    def restored(self, partition: int) -> None:
        self.engine.restored(partition)

    def forget(self, partitions: Sequence[int]) -> None:
        self.engine.forget(partitions)

    def alert_rule_ids(self) -> list[str]:
        return _rule_ids(self.engine)

    def process(self, msgs: Sequence[Message], already: AlreadyLanded | None = None) -> Outcome:
        out = Outcome(events=len(msgs))
        t0 = time.perf_counter()
        res = self.engine.process([(m.key, m.value, m.partition, m.offset) for m in msgs])
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


class LandedIndex:
    """Events at or beyond the committed position that tables already hold, per partition.

    Filled when a partition is (re)assigned, from the tables themselves: for each table, source
    offset → identity of the event stored there. Emptied as the consumer moves past the highest
    such offset. Usually empty: it only matters after a crash between a write and its commit.
    """

    def __init__(self) -> None:
        self._seen: dict[int, dict[str, dict[int, set[str]]]] = {}
        self._horizon: dict[int, int] = {}

    def load(self, partition: int, per_table: dict[str, dict[int, set[str]]]) -> None:
        nonempty = {t: s for t, s in per_table.items() if s}
        if nonempty:
            self._seen[partition] = nonempty
            self._horizon[partition] = max(max(s) for s in nonempty.values())
        else:
            self.forget(partition)

    def forget(self, partition: int) -> None:
        self._seen.pop(partition, None)
        self._horizon.pop(partition, None)

    def active(self) -> bool:
        return bool(self._seen)

    def __call__(self, table: str, partition: int, offset: int, ident: str) -> bool:
        seen = self._seen.get(partition)
        if not seen:
            return False
        idents = seen.get(table, {}).get(offset)
        return idents is not None and ident in idents

    def tables_at(self, partition: int, offset: int) -> list[str]:
        """Tables holding rows of whatever event was at this position."""
        return [t for t, by_offset in self._seen.get(partition, {}).items() if offset in by_offset]

    def advance(self, partition: int, last_offset: int) -> None:
        h = self._horizon.get(partition)
        if h is not None and last_offset >= h:
            self.forget(partition)


def _rule_ids(engine: SettlementEngine | ProcurementEngine | GroupedEngine) -> list[str]:
    """Ids of every rule, enabled or not, of the kinds ``engine`` raises alerts for."""
    return sorted(r.id for r in engine.book.current.rules if r.kind in engine.alert_kinds)


def existing_rows(backend: Backend, table: str, partition: int, from_offset: int,
                  topic: str | None = None, rule_ids: Sequence[str] | None = None) -> dict[int, set[str]]:
    """Source offset → event identities that ``table`` already holds, for offsets ≥ ``from_offset``.

    Tables that several source topics share name theirs: dead letters by ``topic``, alerts by the
    ``rule_ids`` that only this stream's engine raises (another stream's alert at the same
    partition and offset is not a redelivery of this one).
    """
    where = f"src_partition = {int(partition)} AND src_offset >= {int(from_offset)}"
    if topic is not None:
        where += " AND source_topic = '" + topic.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if rule_ids is not None:
        where += " AND rule_id IN (" + (", ".join(literal(r) for r in rule_ids) or "''") + ")"
    ident = identity_column(table)
    res = backend.query(
        # read_table: in ClickHouse cluster mode, the Distributed table over every shard
        f"SELECT DISTINCT src_offset, {ident} FROM {backend.read_table(table)} WHERE {where}"
    )
    out: dict[int, set[str]] = {}
    for off, idv in res.rows:
        out.setdefault(int(off), set()).add(str(idv))
    return out


def without_existing(backend: Backend, table: str, cols: Columns, topic: str) -> Columns:
    """``cols`` minus the rows ``table`` already holds, by (src_partition, src_offset, identity).

    Used before re-sending an insert whose outcome is unknown (see ``Ingestor._insert_once``).
    Dead letters of several source topics share one table, so their lookup names the topic.
    """
    parts, offs = cols["src_partition"], cols["src_offset"]
    idents = cols[identity_column(table)]
    first: dict[int, int] = {}
    for p, o in zip(parts, offs, strict=True):
        if o < first.get(p, o + 1):
            first[p] = o
    held = {
        (p, o, ident)
        for p, start in first.items()
        for o, ids in existing_rows(backend, table, p, start,
                                    topic if table == DEAD_LETTER_TABLE else None).items()
        for ident in ids
    }
    if not held:
        return cols
    keep = [i for i, key in enumerate(zip(parts, offs, idents, strict=True))
            if (key[0], key[1], str(key[2])) not in held]
    log.warning("an insert of unknown outcome had landed; re-sending only the missing rows",
                table=table, landed=len(parts) - len(keep), missing=len(keep))
    return {name: [values[i] for i in keep] for name, values in cols.items()}


class Ingestor(ConsumerRebalanceListener):  # type: ignore[misc]
    """Consumes one subsystem topic in batches and makes each batch durable before committing."""

    def __init__(
        self,
        processor: BatchProcessor | GroupedProcessor,
        backend: Backend,
        producer: AIOKafkaProducer,
        consumer_factory: Callable[[], AIOKafkaConsumer],
        deadletter_topic: str,
        *,
        batch_max_events: int,
        batch_max_seconds: float,
        retry_max_seconds: float,
        executor: ThreadPoolExecutor | None = None,
        topic_of: Callable[[str], str] = lambda stream: stream,
        restore_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.p = processor
        self.topic_of = topic_of
        self.restore_kwargs = restore_kwargs or {}
        self.topic = processor.topic
        self.backend = backend
        self.producer = producer
        self._consumer_factory = consumer_factory
        self.consumer: AIOKafkaConsumer | None = None
        self.dl_topic = deadletter_topic
        self.batch_max_events = batch_max_events
        self.batch_max_seconds = batch_max_seconds
        self.retry_max_seconds = retry_max_seconds
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"sink-{self.topic}")
        self.landed_index = LandedIndex()
        self._pending: list[Message] = []
        self._pending_since = 0.0
        self._needs_check: set[int] = set()
        self._tables = list(processor.tables)
        self.ready = asyncio.Event()
        #: clear while an assignment restores state: aiokafka's fetcher may already hand out records
        #: of the new partitions, and applying them before the restore would be overwritten by it
        self._restored = asyncio.Event()
        self._restored.set()
        self.stats: Counter[str] = Counter()
        self.last_flush_at = 0.0
        #: partitions of ``topic`` this consumer holds now (the group gives each to one member)
        self.assigned: set[int] = set()

    # --- rebalance listener ---------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        gone = [tp.partition for tp in revoked if tp.topic == self.topic]
        self.assigned.difference_update(gone)
        if self._pending:
            await self.flush()
        self.p.forget(gone)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        parts = [tp.partition for tp in assigned if tp.topic == self.topic]
        self.assigned = set(parts)
        self._needs_check = set(parts)
        for p in parts:
            self.landed_index.forget(p)
        self._restored.clear()
        try:
            await self._restore_state(parts)
        finally:
            self._restored.set()
        metrics.ASSIGNED_PARTITIONS.labels(self.topic).set(len(parts))
        self.ready.set()

    async def _restore_state(self, parts: list[int]) -> None:
        """Rule state of ``parts`` as the changelog has it (what completed batches wrote)."""
        for store in self.p.stores:
            try:
                await restore(store, parts, self.producer, self.restore_kwargs)
            except Exception as exc:
                # landing the events matters more than rule state: ingestion goes on, loudly
                metrics.STATE_RESTORE_FAILURES.labels(store.name).inc()
                store.forget(parts)
                log.error("state not restored: rules on these partitions start from empty state "
                          "(windows opened before now are forgotten)", store=store.name, partitions=parts,
                          error=f"{type(exc).__name__}: {scrub(str(exc))[:300]}")
        for p in parts:
            self.p.restored(p)

    # --- main loop ------------------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event) -> None:
        consumer = self._consumer_factory()
        self.consumer = consumer
        consumer.subscribe([self.topic], listener=self)
        await consumer.start()
        log.info("ingest started", topic=self.topic)
        try:
            while not stopping.is_set():
                wait_ms = max(1, int(self.batch_max_seconds * 1000 / 4))
                room = self.batch_max_events - len(self._pending)
                got = await consumer.getmany(timeout_ms=wait_ms, max_records=max(1, room))
                now = time.monotonic()
                for records in got.values():
                    if not self._pending:
                        self._pending_since = now
                    self._pending.extend(
                        Message(r.partition, r.offset, r.key, r.value) for r in records
                    )
                if self._pending and (
                    len(self._pending) >= self.batch_max_events
                    or now - self._pending_since >= self.batch_max_seconds
                ):
                    await self.flush()
            if self._pending:
                await self.flush()
        finally:
            await consumer.stop()
            log.info("ingest stopped", topic=self.topic, **dict(self.stats))

    async def flush(self) -> None:
        """Make the pending batch durable (dead letters, rows), then commit its offsets."""
        await self._restored.wait()
        batch, self._pending = self._pending, []
        if batch:
            await self._flush_isolating(batch)

    async def _flush_isolating(self, batch: list[Message]) -> bool:
        """Flush ``batch``; when a message in it makes the batch fail, find that message and
        quarantine it, so the partition moves on. Returns whether the batch landed as it was.

        A failure that depends on the message (:func:`message_failure`) is retried in up to
        :data:`SPLIT_WAYS` parts, recursively, after undoing in memory what the failed attempt
        applied (:meth:`_roll_back`); a single message that still fails becomes a dead letter
        with the reason (:meth:`_quarantine`). Parts are flushed in order, so each partition's
        events are still applied, and their offsets committed, in offset order.
        """
        try:
            await self._flush_batch(batch)
            return True
        except Exception as exc:
            reason = message_failure(exc)
            if reason is None:
                raise
            metrics.BATCHES_SPLIT.labels(self.topic, reason).inc()
            log.error("a batch failed; isolating the message that fails it", topic=self.topic, events=len(batch),
                      reason=reason, error=describe(exc),
                      first=f"{batch[0].partition}/{batch[0].offset}", last=f"{batch[-1].partition}/{batch[-1].offset}")
            await self._roll_back(batch)
            if len(batch) == 1:
                await self._quarantine(batch[0], reason, exc)
                return False
            size = -(-len(batch) // SPLIT_WAYS)
            for i in range(0, len(batch), size):
                await self._flush_isolating(batch[i:i + size])
            return False

    async def _flush_batch(self, batch: list[Message]) -> None:
        """The commit order of one batch: dead letters, alerts and re-keyed records (acknowledged),
        rows, changelog, offsets. A crash anywhere before the last step redelivers the batch, and
        what already happened is recognised (docs/design.md, the state tables)."""
        await self._load_landed(batch)
        already = self.landed_index if self.landed_index.active() else None
        try:
            out = self.p.process(batch, already)
        except Exception as exc:
            raise ProcessingFailed(f"{self.topic}: processing a batch of {len(batch)} raised") from exc
        t0 = time.perf_counter()
        await self._produce(out)
        await self._write(out)
        metrics.SINK_SECONDS.labels(self.topic).observe(time.perf_counter() - t0)
        if self.p.stores:
            await write_changelog(self.producer, self.p.stores)
        await self._commit(batch)
        self._account(batch, out)

    async def _roll_back(self, batch: list[Message]) -> None:
        """Undo in memory what a failed attempt at ``batch`` applied: the rule state of its
        partitions is restored from the changelog (only completed batches write it), and the
        tables are asked again which of its events landed (a failure may follow an insert)."""
        parts = sorted({m.partition for m in batch})
        self.p.forget(parts)
        await self._restore_state(parts)
        self._needs_check.update(parts)
        for p in parts:
            self.landed_index.forget(p)

    async def _quarantine(self, m: Message, reason: str, exc: BaseException) -> None:
        """The one message that fails its batch becomes a dead letter (its original bytes sealed,
        so ``yibao dlq replay`` can send it again after a fix), and its offset is committed."""
        await self._load_landed([m])
        partly = [t for t in self.landed_index.tables_at(m.partition, m.offset) if t != DEAD_LETTER_TABLE]
        landed = (f"its rows in {', '.join(partly)} had landed before the failure and stay" if partly
                  else "nothing of it landed")
        out = self.p.quarantine(m, reason, f"{describe(exc)} (isolated from its batch; {landed})",
                                self.landed_index if self.landed_index.active() else None)
        if partly:
            log.error("a quarantined message had partly landed: rows of one event in several tables are not "
                      "written atomically", topic=self.topic, position=f"{m.partition}/{m.offset}", tables=partly)
        await self._produce(out)
        await self._write(out)
        await self._commit([m])
        self._account([m], out)
        log.error("message quarantined as a dead letter", topic=self.topic, reason=reason,
                  position=f"{m.partition}/{m.offset}")

    async def _load_landed(self, batch: list[Message]) -> None:
        if not self._needs_check:
            return
        first: dict[int, int] = {}
        for m in batch:
            if m.partition in self._needs_check and m.offset < first.get(m.partition, m.offset + 1):
                first[m.partition] = m.offset
        for partition, from_offset in first.items():
            per_table: dict[str, dict[int, set[str]]] = {}
            for table in self._tables:
                topic = self.topic if table == DEAD_LETTER_TABLE else None
                rule_ids = self.p.alert_rule_ids() if table == ALERTS_TABLE else None
                per_table[table] = await self._with_retry(
                    functools.partial(existing_rows, self.backend, table, partition, from_offset, topic, rule_ids)
                )
            self.landed_index.load(partition, per_table)
            self._needs_check.discard(partition)
            if any(per_table.values()):
                log.warning("redelivered offsets already landed; they will not be inserted twice",
                            topic=self.topic, partition=partition,
                            rows={t: len(s) for t, s in per_table.items() if s})

    async def _produce(self, out: Outcome) -> None:
        """Dead letters, alerts and re-keyed records, acknowledged before any row is written.
        Each is checked against :data:`MESSAGE_BUDGET` before anything is sent."""
        encode = self.p.codec.encode
        alerts_topic = self.topic_of("alerts")
        messages = [(self.dl_topic, k, encode(DEADLETTER_RECORD, d)) for d, k in zip(out.dead, out.dead_keys,
                                                                                        strict=True)]
        messages += [(alerts_topic, alert_key(a), encode(ALERT_RECORD, a)) for a in out.alerts]
        messages += [(self.topic_of(stream), key, value) for stream, key, value in out.emits]
        for topic, key, value in messages:
            if len(key or b"") + len(value) > MESSAGE_BUDGET:
                raise EmitTooLarge(f"a message for {topic} takes {len(key or b'') + len(value):,} bytes "
                                   f"(at most {MESSAGE_BUDGET:,})")
        send = self.producer.send
        futures = [await send(topic, value, key=key) for topic, key, value in messages]
        if futures:
            await asyncio.gather(*futures)

    async def _write(self, out: Outcome) -> None:
        for table, cols in out.tables.items():
            n = len(next(iter(cols.values())))
            await self._with_retry(self._insert_once(table, cols))
            metrics.ROWS_WRITTEN.labels(table).inc(n)
        metrics.SINK_UP.set(1)

    def _insert_once(self, table: str, cols: Columns) -> Callable[[], None]:
        """The blocking insert of one table's rows, safe to repeat after ``SinkUnavailable``.

        An insert that failed as "unavailable" may still have been written: the server can commit
        the part and lose the connection before answering (a server stopped mid-insert does exactly
        that). Re-sending the same rows blindly would land them twice, so every attempt after the
        first asks the table which of these rows it already holds and sends only the others.
        """
        attempted = False

        def call() -> None:
            nonlocal attempted
            todo = without_existing(self.backend, table, cols, self.topic) if attempted else cols
            attempted = True
            if any(todo.values()):  # all columns are equally long: any non-empty means rows left
                self.backend.insert(table, todo)

        return call

    async def _with_retry(self, call: Callable[[], T]) -> T:
        """Run a blocking sink call in the sink thread; while ClickHouse is unreachable, back off,
        pause fetching and keep polling so the group keeps this member."""
        loop = asyncio.get_running_loop()
        delay = 0.5
        paused = False
        try:
            while True:
                try:
                    return await loop.run_in_executor(self.executor, call)
                except SinkUnavailable as exc:
                    metrics.SINK_UP.set(0)
                    metrics.SINK_RETRIES.labels(self.topic, "unavailable").inc()
                    log.warning("ClickHouse unavailable; backing off", topic=self.topic,
                                retry_in_s=round(delay, 1), error=str(exc)[:200])
                    if self.consumer is not None and not paused:
                        self.consumer.pause(*self.consumer.assignment())
                        paused = True
                    await self._back_off(delay, probe=not exc.overloaded)
                    delay = min(delay * 2, self.retry_max_seconds)
                except SinkError:
                    metrics.SINK_RETRIES.labels(self.topic, "rejected").inc()
                    raise
        finally:
            if paused and self.consumer is not None:
                self.consumer.resume(*self.consumer.assignment())

    async def _back_off(self, seconds: float, *, probe: bool) -> None:
        """Wait up to ``seconds`` while still polling (paused), so the consumer is not evicted for
        slowness; with ``probe``, end the wait as soon as ClickHouse answers again (an overloaded
        server answers, and is left alone for the whole back-off)."""
        loop = asyncio.get_running_loop()
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            step = min(left, PROBE_INTERVAL_S)
            if self.consumer is not None:
                await self.consumer.getmany(timeout_ms=int(step * 1000) or 1, max_records=1)
            else:
                await asyncio.sleep(step)
            if probe and await loop.run_in_executor(self.executor, self.backend.reachable):
                return

    async def _commit(self, batch: list[Message]) -> None:
        assert self.consumer is not None
        last: dict[int, int] = {}
        for m in batch:
            if m.offset >= last.get(m.partition, -1):
                last[m.partition] = m.offset
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(o + 1, "") for p, o in last.items()}
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # a rebalance took the partition: redelivery is deduplicated
            log.warning("offset commit failed; the next owner will skip what already landed",
                        topic=self.topic, error=str(exc)[:200])
        for p, o in last.items():
            self.landed_index.advance(p, o)

    def _account(self, batch: list[Message], out: Outcome) -> None:
        metrics.EVENTS_IN.labels(self.topic).inc(len(batch))
        metrics.BATCH_EVENTS.labels(self.topic).observe(len(batch))
        for rec, n in out.landed.items():
            metrics.EVENTS_LANDED.labels(self.topic, rec).inc(n)
        for reason, n in out.reasons.items():
            metrics.DEAD_LETTERS.labels(self.topic, reason).inc(n)
        for table, n in out.skipped_rows.items():
            metrics.DUPLICATES_SKIPPED.labels(table).inc(n)
        for stage, s in out.stage_seconds.items():
            metrics.STAGE_SECONDS.labels(self.topic, stage).inc(s)
        for a in out.alerts:
            if a["status"] == "FIRED":
                metrics.ALERTS.labels(a["rule_id"], a["severity"]).inc()
        for store in self.p.stores:
            metrics.WINDOW_STATE_KEYS.labels(store.name).set(store.keys())
        if out.state_capped:
            metrics.STATE_CAPPED.labels(self.topic).inc(out.state_capped)
            log.warning("a key's rule state reached its bound; its oldest entries were dropped",
                        topic=self.topic, events=out.state_capped)
        self.stats["events"] += len(batch)
        self.stats["dead_letters"] += sum(out.reasons.values())
        self.stats["batches"] += 1
        self.last_flush_at = time.time()
