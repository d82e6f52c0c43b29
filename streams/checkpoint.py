"""The exactly-once commit of one batch, as one unit with one order (docs/design.md, the state tables):

1. dead letters, alerts and re-keyed records are produced and acknowledged;
2. the rows are inserted, table by table;
3. the rule state the batch changed is written to the changelog;
4. the batch's offsets are committed.

A crash between any two steps redelivers the batch, and what already happened is recognised: topic
copies carry deterministic ids, rows are looked up by position and identity (sinks.landed), state
carries the last offset applied per key (streams.rules.state). Nothing may be reordered: offsets
committed before the rows are durable would lose them, a changelog written before the rows would
make their redelivery skip the rules but not the insert.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas import Codec

from .base import Columns
from .messages import (
    ALERT_RECORD,
    CONTENT_TYPE_HEADER,
    DEADLETTER_RECORD,
    MESSAGE_BUDGET,
    STAY_CONTENT_TYPE,
    EmitTooLarge,
    Headers,
    Message,
    Outcome,
    alert_key,
    dead_letter_headers,
    framed_headers,
    headers_size,
    source_headers,
)
from .rules.state import Store, write_changelog

#: ``insert(table, columns)``: make one table's rows durable (retrying while ClickHouse is unreachable).
Insert = Callable[[str, Columns], Awaitable[None]]
#: ``commit(offsets)``: commit the consumer's offsets.
Commit = Callable[[dict[TopicPartition, OffsetAndMetadata]], Awaitable[None]]
#: (topic, key, value, record headers) of one message the checkpoint sends
Outgoing = tuple[str, bytes | None, bytes, Headers]


class Checkpoint:
    """Commits batches of one source topic; :meth:`commit` is the whole protocol."""

    def __init__(self, topic: str, codec: Codec, producer: AIOKafkaProducer, insert: Insert, commit: Commit,
                 stores: Sequence[Store], deadletter_topic: str, topic_of: Callable[[str], str]) -> None:
        self.topic = topic
        self.codec = codec
        self.producer = producer
        self.insert = insert
        self.commit_offsets = commit
        self.stores = list(stores)
        self.deadletter_topic = deadletter_topic
        self.topic_of = topic_of

    @functools.cached_property
    def _dl_subject(self) -> str:
        return self.codec.subject_of(DEADLETTER_RECORD)

    @functools.cached_property
    def _alert_subject(self) -> str:
        return self.codec.subject_of(ALERT_RECORD)

    async def commit(self, batch: Sequence[Message], out: Outcome) -> None:
        """Make ``out`` (what processing ``batch`` gave) durable, then move past ``batch``."""
        await self.produce(out)
        for table, cols in out.tables.items():
            await self.insert(table, cols)
        if self.stores:
            await write_changelog(self.producer, self.stores)
        await self.commit_offsets(next_offsets(self.topic, batch))

    def messages(self, out: Outcome) -> list[Outgoing]:
        """(topic, key, value, headers) of everything ``out`` sends, each checked against the budget
        (headers included): :class:`EmitTooLarge` before anything is sent.

        Every message says what it is (``content-type``, ``yibao-schema-id``) and which input event
        of :attr:`topic` it derives from (``yibao-source-*``; a dead letter's own position fields,
        and its ``yibao-reason``), so routing tools need not decode it (streams.messages).
        """
        encode = self.codec.encode
        alerts_topic = self.topic_of("alerts")
        sent: list[Outgoing] = []
        for d, k in zip(out.dead, out.dead_keys, strict=True):
            value = encode(DEADLETTER_RECORD, d)
            sent.append((self.deadletter_topic, k, value, dead_letter_headers(d, self._dl_subject, value)))
        for a, (p, o) in zip(out.alerts, out.alert_sources, strict=True):
            value = encode(ALERT_RECORD, a)
            sent.append((alerts_topic, alert_key(a), value,
                         [*framed_headers(self._alert_subject, value), *source_headers(self.topic, p, o)]))
        for (stream, key, value), (p, o) in zip(out.emits, out.emit_sources, strict=True):
            sent.append((self.topic_of(stream), key, value,
                         [(CONTENT_TYPE_HEADER, STAY_CONTENT_TYPE), *source_headers(self.topic, p, o)]))
        for topic, msg_key, msg_value, msg_headers in sent:
            size = len(msg_key or b"") + len(msg_value) + headers_size(msg_headers)
            if size > MESSAGE_BUDGET:
                raise EmitTooLarge(f"a message for {topic} takes {size:,} bytes (at most {MESSAGE_BUDGET:,})")
        return sent

    async def produce(self, out: Outcome) -> None:
        """Step 1: dead letters, alerts and re-keyed records, acknowledged (acks=all)."""
        send = self.producer.send
        futures = [await send(topic, value, key=key, headers=headers)
                   for topic, key, value, headers in self.messages(out)]
        if futures:
            await asyncio.gather(*futures)


def next_offsets(topic: str, batch: Sequence[Message]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after ``batch``: one past its last message, per partition."""
    last: dict[int, int] = {}
    for m in batch:
        if m.offset >= last.get(m.partition, -1):
            last[m.partition] = m.offset
    return {TopicPartition(topic, p): OffsetAndMetadata(o + 1, "") for p, o in last.items()}
