"""What a batch is made of and what it makes: messages in, an :class:`Outcome` out (rows per table,
dead letters, alerts, re-keyed records), and the bounds on everything the worker sends.

Everything here is pure: the processors (streams.processors) build outcomes, the checkpoint
(streams.checkpoint) makes them durable.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from schemas import Codec
from sinks.tables import ALERTS_TABLE, DEAD_LETTER_TABLE

from .base import ColumnPlan, Columns, Datum, TableMapping, compile_plan, merge_columns
from .privacy import Pseudonymizer, Sealer

__all__ = ["ALERTS_TABLE", "ALERT_RECORD", "CONTENT_TYPE_HEADER", "DEADLETTER_RECORD", "DEADLETTER_SUBJECT",
           "DEAD_LETTER_TABLE", "MESSAGE_BUDGET", "REASON_HEADER", "REPLAY_HEADER", "SCHEMA_ID_HEADER",
           "SOURCE_OFFSET_HEADER", "SOURCE_PARTITION_HEADER", "SOURCE_TOPIC_HEADER", "STAY_CONTENT_TYPE",
           "AlreadyLanded", "DeadLetters", "EmitTooLarge", "Failure", "Headers", "Message", "Outcome", "add_alerts",
           "alert_key", "alert_plan", "avro_content_type", "clip", "dead_letter_headers", "dead_letter_id",
           "fit_for_topic", "framed_headers", "headers_size", "source_headers"]

DEADLETTER_RECORD = "cn.nhsa.yibao.pipeline.DeadLetter"
#: the manifest subject of dead letters (schemas/registry.json)
DEADLETTER_SUBJECT = "deadletter"
#: Kafka record header ``yibao dlq replay`` puts on what it re-sends (value: the dead letter's id), so
#: the event is judged again rather than recognised as a re-send of the one that was turned away.
REPLAY_HEADER = "yibao-replay"
ALERT_RECORD = "cn.nhsa.yibao.pipeline.AnomalyAlert"

# --- record headers --------------------------------------------------------------------------------
# Every record yibao writes to Kafka carries these, so routing and governance tools (Kafka Connect
# predicates, kcat -J, kafka-ui filters) select records without decoding Avro. Values are UTF-8
# text, numbers in decimal ASCII.
#: ``application/vnd.yibao.<subject>.v1+avro`` (subject as in schemas/registry.json: settlement,
#: procurement, supervision, alerts, deadletter); ``v1`` is this framing (Confluent's: magic byte 0,
#: 4-byte schema id, Avro binary body), not the schema's version, which ``yibao-schema-id`` names.
CONTENT_TYPE_HEADER = "content-type"
#: the Confluent schema id of the value's frame, as the registry API serves it
SCHEMA_ID_HEADER = "yibao-schema-id"
#: where the input event that produced this record was read (dead letters, alerts, re-keyed stays)
SOURCE_TOPIC_HEADER = "yibao-source-topic"
SOURCE_PARTITION_HEADER = "yibao-source-partition"
SOURCE_OFFSET_HEADER = "yibao-source-offset"
#: a dead letter's reason code (``UNKNOWN_SCHEMA_ID``, ``INVALID_CODE``, ``EMIT_TOO_LARGE`` ...)
REASON_HEADER = "yibao-reason"
#: the re-keyed stays (internal.stays-by-*) are compact JSON, without a schema id
STAY_CONTENT_TYPE = b"application/vnd.yibao.stay.v1+json"

Headers = list[tuple[str, bytes]]
_DL_NAMESPACE = uuid.UUID("6d1f0c36-2d0e-4f0f-9a53-8c1f5b0e7a11")


def avro_content_type(subject: str) -> bytes:
    """The ``content-type`` header value of a Confluent-framed Avro record of ``subject``."""
    return f"application/vnd.yibao.{subject}.v1+avro".encode()


def framed_headers(subject: str, value: bytes | None) -> Headers:
    """``content-type`` of ``subject``, and the schema id read from ``value``'s own frame: the id of
    the bytes sent (a replayed event keeps the id it was written with), none when they are not
    framed (a dead letter's original may be any bytes)."""
    headers: Headers = [(CONTENT_TYPE_HEADER, avro_content_type(subject))]
    if value is not None and len(value) >= 5 and value[0] == 0:
        headers.append((SCHEMA_ID_HEADER, str(int.from_bytes(value[1:5], "big")).encode()))
    return headers


def source_headers(topic: str, partition: int, offset: int) -> Headers:
    """Where the input event a record derives from was read."""
    return [(SOURCE_TOPIC_HEADER, topic.encode()), (SOURCE_PARTITION_HEADER, str(partition).encode()),
            (SOURCE_OFFSET_HEADER, str(offset).encode())]


def dead_letter_headers(datum: Datum, subject: str, value: bytes | None) -> Headers:
    """A dead letter's headers: its frame, the source position it was turned away at, its reason."""
    return [*framed_headers(subject, value),
            *source_headers(datum["source_topic"], datum["source_partition"], datum["source_offset"]),
            (REASON_HEADER, str(datum["reason_code"]).encode())]


def headers_size(headers: Headers) -> int:
    """Bytes the headers add to a record (keys and values; the varint lengths are in the margin)."""
    return sum(len(k.encode()) + len(v) for k, v in headers)


@dataclass(frozen=True)
class Message:
    """The parts of a Kafka record the pipeline uses."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: sent by ``yibao dlq replay`` (header :data:`REPLAY_HEADER`): a dead letter's bytes again, after a fix
    replay: bool = False


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
    #: (partition, offset) of the input event that raised each alert (same order as ``alerts``)
    alert_sources: list[tuple[int, int]] = field(default_factory=list)
    emits: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # stream, key, value
    #: (partition, offset) of the input event each emit derives from (same order as ``emits``)
    emit_sources: list[tuple[int, int]] = field(default_factory=list)
    state_capped: int = 0  # events after which a key's state was cut to its bound
    state_evicted: int = 0  # keys of rule state dropped as no longer needed by any rule
    #: re-sent events recognised by their identity (same ``event_id``, same content, new offset):
    #: neither landed nor dead-lettered; consumed = landed + dead-lettered + duplicates
    duplicates: Counter[str] = field(default_factory=Counter)
    #: events decoded and checked as columns (streams/processors.py ``_columnar_pass``); the rest of
    #: the readable ones took the record path
    columnar: int = 0

    def rows(self, table: str) -> int:
        cols = self.tables.get(table)
        return len(next(iter(cols.values()))) if cols else 0

    def absorb(self, later: Outcome) -> None:
        """Append what the next slice of the same batch produced (streams.ingest processes a batch in
        slices): the same as processing both slices at once."""
        for table, cols in later.tables.items():
            cur = self.tables.get(table)
            if cur is None:
                self.tables[table] = cols
            else:
                for k, v in cols.items():
                    cur[k].extend(v)
        self.dead.extend(later.dead)
        self.dead_keys.extend(later.dead_keys)
        self.landed.update(later.landed)
        self.reasons.update(later.reasons)
        self.skipped_rows.update(later.skipped_rows)
        self.events += later.events
        for stage, secs in later.stage_seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + secs
        self.alerts.extend(later.alerts)
        self.alert_sources.extend(later.alert_sources)
        self.emits.extend(later.emits)
        self.emit_sources.extend(later.emit_sources)
        self.state_capped += later.state_capped
        self.state_evicted += later.state_evicted
        self.duplicates.update(later.duplicates)
        self.columnar += later.columnar


#: ``already(table, partition, offset, ident)``: that table holds rows of that event at that position.
AlreadyLanded = Callable[[str, int, int, str], bool]


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


#: Bytes of key + value + record headers that any message the worker sends may take. Producers and
#: brokers refuse messages over ~1 MB by default (max_request_size, message.max.bytes); one message
#: over it would fail its batch on every restart and stop the partition for good. The margin covers
#: the record's and its batch's framing.
MESSAGE_BUDGET = 900_000
#: Characters of a dead letter's readable detail (validators quote values; a value may be huge).
DETAIL_MAX_CHARS = 2_000
#: What a dead letter takes besides its payload, key and detail (ids, topic, codes, times).
_DEAD_LETTER_OVERHEAD = 2_000
#: a frame with the longest schema id (for bounding header sizes before encoding)
_LARGEST_FRAME = b"\x00\xff\xff\xff\xff"


def clip(text: str, most: int = DETAIL_MAX_CHARS) -> str:
    """``text`` cut to ``most`` characters, with a marker saying how much was cut."""
    if len(text) <= most:
        return text
    return f"{text[:most]}… [{len(text) - most:,} more characters]"


def fit_for_topic(datum: Datum) -> Datum:
    """The topic copy of a dead letter, within :data:`MESSAGE_BUDGET` as a whole: the sealed
    payload is dropped first, then the sealed key. The table keeps every byte, which is what
    ``yibao dlq`` reads; the topic copy says what it left out. Its record headers count too."""
    size = (len(datum.get("payload") or b"") + len(datum.get("source_key") or b"")
            + 4 * len(datum["reason_detail"]) + _DEAD_LETTER_OVERHEAD
            + headers_size(dead_letter_headers(datum, DEADLETTER_SUBJECT, _LARGEST_FRAME)))
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
        out.alert_sources.extend(zip(parts, offs, strict=True))
        merge_columns(out.tables, ALERTS_TABLE, plan.build(data, parts, offs, pseudonymizer))
