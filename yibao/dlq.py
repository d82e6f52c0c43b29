"""`yibao dlq`: dead letters by reason, one dead letter in detail, and replay after a fix.

Dead letters are read from the ``dead_letters`` table, not the topic: the table holds every one
(deduplicated, and with the whole sealed payload even when it was too large for the topic), and it
can be filtered by reason and time. The original event is sealed (AES-256-GCM, streams/privacy.py)
because it holds clear personal identifiers; opening it needs the pseudonymization key (and, after
a rotation, the retired keys in ``YIBAO_PSEUDO_OLD_KEYS_FILE``).

``show`` prints the decoded event with personal fields masked unless ``--reveal`` is given, and a
reveal is logged: personal data is shown deliberately or not at all. ``replay`` re-produces the
original bytes, unsealed, to their source topic with their original key, so they go through decoding
and validation again like any new event; an event whose id already landed is skipped (a replay run
twice, or a dead letter of a producer's retry, must not count twice) unless ``--force``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import typer

from schemas.calendar import CHINA
from sinks.base import Backend, literal
from streams.messages import CONTENT_TYPE_HEADER, REPLAY_HEADER, STAY_CONTENT_TYPE, Headers, framed_headers
from streams.privacy import PrivacyError, Sealer
from streams.topics import PIPELINE_TOPICS, STREAMS

from .settings import Settings

log = structlog.get_logger(__name__)

#: Fields of the input records that identify a person; masked in ``show`` without ``--reveal``.
PERSONAL_FIELDS = frozenset(
    {"psn_no", "psn_cert_no", "psn_name", "tel", "brdy", "rptr_name", "rptr_cert_no", "rptr_tel"}
)
MASK = "***"


# --- reading the table --------------------------------------------------------------------------
@dataclass(frozen=True)
class DeadLetter:
    """One row of ``dead_letters`` (sealed fields still sealed)."""

    event_id: str
    reason_code: str
    reason_detail: str
    field: str
    source_topic: str
    source_partition: int
    source_offset: int
    source_key: bytes
    schema_id: int | None
    event_type: str
    payload: bytes
    payload_digest: str
    failed_at: dt.datetime


_COLUMNS = ("event_id", "reason_code", "reason_detail", "field", "source_topic", "source_partition",
            "source_offset", "source_key", "schema_id", "event_type", "payload", "payload_digest", "failed_at")


def _as_bytes(v: Any) -> bytes:
    # The driver returns str for a String that is valid UTF-8 and bytes otherwise; either way the
    # original bytes come back exactly.
    if v is None:
        return b""
    return v if isinstance(v, bytes) else str(v).encode("utf-8")


def _row(r: Sequence[Any]) -> DeadLetter:
    d = dict(zip(_COLUMNS, r, strict=True))
    return DeadLetter(
        event_id=str(d["event_id"]), reason_code=str(d["reason_code"]), reason_detail=str(d["reason_detail"]),
        field=str(d["field"] or ""), source_topic=str(d["source_topic"]),
        source_partition=int(d["source_partition"]), source_offset=int(d["source_offset"]),
        source_key=_as_bytes(d["source_key"]), schema_id=None if d["schema_id"] is None else int(d["schema_id"]),
        event_type=str(d["event_type"] or ""), payload=_as_bytes(d["payload"]),
        payload_digest=str(d["payload_digest"]), failed_at=d["failed_at"],
    )


def reason_counts(backend: Backend, reason: str | None = None) -> list[dict[str, Any]]:
    """Dead letters per reason and source topic, most frequent first."""
    where = f"WHERE reason_code = {literal(reason)} " if reason else ""
    res = backend.query(
        f"SELECT reason_code, source_topic, uniqExact(event_id) AS n, min(failed_at), max(failed_at) "
        f"FROM {backend.read_table('dead_letters')} {where}GROUP BY reason_code, source_topic "
        "ORDER BY n DESC, reason_code"
    )
    return [{"reason_code": str(r[0]), "source_topic": str(r[1]), "count": int(r[2]),
             "first_failed_at": str(r[3]), "last_failed_at": str(r[4])} for r in res.rows]


def recent(backend: Backend, *, limit: int, reason: str | None = None) -> list[dict[str, Any]]:
    """The newest dead letters, once each, without their sealed bytes: what `dlq show ID` and
    `dlq replay --ids` need to be pointed at one. Newest by failure time, then source position."""
    where = f"WHERE reason_code = {literal(reason)} " if reason else ""
    # aliases of their own: one equal to a column name would be substituted into the other aggregates
    res = backend.query(
        "SELECT event_id, any(reason_code) AS d_reason, any(field) AS d_field, any(reason_detail) AS d_detail, "
        "any(source_topic) AS d_topic, any(source_partition) AS d_partition, any(source_offset) AS d_offset, "
        "any(event_type) AS d_event_type, min(failed_at) AS d_failed_at "
        f"FROM {backend.read_table('dead_letters')} {where}GROUP BY event_id "
        f"ORDER BY d_failed_at DESC, d_topic, d_partition, d_offset DESC LIMIT {int(limit)}"
    )
    return [{"event_id": str(r[0]), "reason_code": str(r[1]), "field": str(r[2] or "") or None,
             "reason_detail": str(r[3]),
             "source": {"topic": str(r[4]), "partition": int(r[5]), "offset": int(r[6])},
             "event_type": str(r[7] or "") or None, "failed_at": r[8].isoformat()} for r in res.rows]


def select(backend: Backend, *, ids: Iterable[str] = (), reason: str | None = None,
           since: dt.datetime | None = None) -> list[DeadLetter]:
    """Dead letters matching every given filter, once each, in source order."""
    where = ["1"]
    id_list = [i for i in ids if i]
    if id_list:
        where.append(f"event_id IN ({', '.join(literal(i) for i in id_list)})")
    if reason:
        where.append(f"reason_code = {literal(reason)}")
    if since is not None:
        where.append(f"failed_at >= toDateTime({int(since.timestamp())})")
    res = backend.query(
        f"SELECT {', '.join(_COLUMNS)} FROM {backend.read_table('dead_letters')} WHERE {' AND '.join(where)} "
        "ORDER BY source_topic, source_partition, source_offset"
    )
    seen: set[str] = set()
    out = []
    for r in res.rows:
        row = _row(r)
        if row.event_id not in seen:
            seen.add(row.event_id)
            out.append(row)
    return out


# --- opening and showing ------------------------------------------------------------------------
def make_sealer(s: Settings) -> Sealer:
    """The sealer with the current key and every retired key the settings name."""
    from streams.privacy import load_key, load_old_keys

    key = load_key(s.pseudo_key.get_secret_value() if s.pseudo_key else None, s.pseudo_key_file, s.data_dir,
                   create=False)
    return Sealer(key, s.pseudo_key_id, load_old_keys(s.pseudo_old_keys_file))


def mask(value: Any) -> Any:
    """``value`` with every personal field (at any depth) replaced by a mask; None stays None."""
    if isinstance(value, dict):
        return {k: (MASK if k in PERSONAL_FIELDS and v is not None else mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def describe(dl: DeadLetter, sealer: Sealer, codec: Any, *, reveal: bool) -> dict[str, Any]:
    """Everything about one dead letter, the original event decoded; personal data masked unless
    ``reveal``. An undecodable payload is summarized (length) and shown in hex only on reveal."""
    out: dict[str, Any] = {
        "event_id": dl.event_id, "reason_code": dl.reason_code, "field": dl.field or None,
        "reason_detail": dl.reason_detail,
        "source": {"topic": dl.source_topic, "partition": dl.source_partition, "offset": dl.source_offset},
        "event_type": dl.event_type or None, "schema_id": dl.schema_id, "failed_at": str(dl.failed_at),
        "payload_digest": dl.payload_digest,
    }
    try:
        raw = sealer.open(dl.payload)
        key = sealer.open(dl.source_key) if dl.source_key else None
    except PrivacyError as exc:
        out["payload_error"] = f"cannot open the sealed payload: {exc}"
        return out
    out["payload_bytes"] = len(raw)
    if key is not None:
        out["key"] = key.decode("utf-8", "replace") if reveal else MASK
    from schemas import DecodeError

    try:
        dec = codec.decode(raw)
        event = codec.to_json(dec.record, dec.datum)
        out["record"] = dec.record
        out["event"] = event if reveal else mask(event)
    except (DecodeError, ValueError, KeyError) as exc:
        out["payload_undecodable"] = str(exc)[:300]
        if reveal:
            out["payload_hex"] = raw.hex()
    out["revealed"] = reveal
    return out


# --- replay -------------------------------------------------------------------------------------
@dataclass
class ReplayReport:
    produced: list[str] = field(default_factory=list)
    already_landed: list[str] = field(default_factory=list)
    unopenable: list[str] = field(default_factory=list)


def primary_tables(s: Settings) -> dict[str, str]:
    """Record full name -> the table holding one row per event of it (its first table)."""
    from streams.topology import build_subsystems

    return {spec.record: spec.primary_table
            for sub in build_subsystems(s.validation()).values() for spec in sub.records}


def landed_event_ids(backend: Backend, table: str, ids: Sequence[str]) -> set[str]:
    if not ids:
        return set()
    res = backend.query(f"SELECT DISTINCT event_id FROM {backend.read_table(table)} "
                        f"WHERE event_id IN ({', '.join(literal(i) for i in ids)})")
    return {str(r[0]) for r in res.rows}


def plan_replay(backend: Backend, dls: Sequence[DeadLetter], sealer: Sealer, codec: Any,
                tables: dict[str, str], *, force: bool) -> tuple[list[tuple[DeadLetter, bytes, bytes | None]],
                                                                ReplayReport]:
    """Open each dead letter; keep those whose event has not landed since (unless ``force``)."""
    from schemas import DecodeError

    report = ReplayReport()
    todo: list[tuple[DeadLetter, bytes, bytes | None]] = []
    by_table: dict[str, list[tuple[str, int]]] = {}
    for dl in dls:
        try:
            raw = sealer.open(dl.payload)
            key = sealer.open(dl.source_key) if dl.source_key else None
        except PrivacyError:
            report.unopenable.append(dl.event_id)
            continue
        todo.append((dl, raw, key))
        if force:
            continue
        try:
            dec = codec.decode(raw)
        except DecodeError:
            continue  # no event id to look up: only a fixed decoder can land it, at most once per replay
        table = tables.get(dec.record)
        eid = dec.datum.get("event_id")
        if table and isinstance(eid, str):
            by_table.setdefault(table, []).append((eid, len(todo) - 1))
    drop: set[int] = set()
    for table, pairs in by_table.items():
        landed = landed_event_ids(backend, table, [e for e, _ in pairs])
        drop |= {i for e, i in pairs if e in landed}
    keep = []
    for i, item in enumerate(todo):
        (report.already_landed if i in drop else report.produced).append(item[0].event_id)
        if i not in drop:
            keep.append(item)
    return keep, report


def content_headers(s: Settings, topic: str, raw: bytes) -> Headers:
    """``content-type`` and ``yibao-schema-id`` of an original sent back to ``topic`` (streams.messages),
    as its first producer would have sent them; the schema id is the one in its own frame."""
    for subject in STREAMS:
        if s.topic(subject) == topic:
            return framed_headers(subject, raw)
    if any(s.topic(stream) == topic for stream in PIPELINE_TOPICS if stream.startswith("internal.stays-")):
        return [(CONTENT_TYPE_HEADER, STAY_CONTENT_TYPE)]
    return []


async def produce_raw(s: Settings, items: Sequence[tuple[DeadLetter, bytes, bytes | None]]) -> None:
    """Send the original bytes to their source topics and wait for every acknowledgement."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**s.kafka_client_kwargs(), acks="all", linger_ms=10,
                                max_request_size=16 * 1024 * 1024, request_timeout_ms=60_000)
    await producer.start()
    try:
        futures = [await producer.send(dl.source_topic, raw, key=key,
                                       headers=[(REPLAY_HEADER, dl.event_id.encode()),
                                                *content_headers(s, dl.source_topic, raw)])
                   for dl, raw, key in items]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def parse_since(text: str) -> dt.datetime:
    """ISO 8601 date or datetime; without an offset it is China time (the platform's clock)."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 date/time, e.g. 2026-11-20T08:00") from None
    return value if value.tzinfo else value.replace(tzinfo=CHINA)
