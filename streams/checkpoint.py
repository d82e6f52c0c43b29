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
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas import Codec

from .base import Columns
from .messages import ALERT_RECORD, DEADLETTER_RECORD, MESSAGE_BUDGET, EmitTooLarge, Message, Outcome, alert_key
from .rules.state import Store, write_changelog

#: ``insert(table, columns)``: make one table's rows durable (retrying while ClickHouse is unreachable).
Insert = Callable[[str, Columns], Awaitable[None]]
#: ``commit(offsets)``: commit the consumer's offsets.
Commit = Callable[[dict[TopicPartition, OffsetAndMetadata]], Awaitable[None]]


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

    async def commit(self, batch: Sequence[Message], out: Outcome) -> None:
        """Make ``out`` (what processing ``batch`` gave) durable, then move past ``batch``."""
        await self.produce(out)
        for table, cols in out.tables.items():
            await self.insert(table, cols)
        if self.stores:
            await write_changelog(self.producer, self.stores)
        await self.commit_offsets(next_offsets(self.topic, batch))

    def messages(self, out: Outcome) -> list[tuple[str, bytes | None, bytes]]:
        """(topic, key, value) of everything ``out`` sends, each checked against the budget:
        :class:`EmitTooLarge` before anything is sent."""
        encode = self.codec.encode
        alerts_topic = self.topic_of("alerts")
        sent: list[tuple[str, bytes | None, bytes]] = [(self.deadletter_topic, k, encode(DEADLETTER_RECORD, d))
                                                       for d, k in zip(out.dead, out.dead_keys, strict=True)]
        sent += [(alerts_topic, alert_key(a), encode(ALERT_RECORD, a)) for a in out.alerts]
        sent += [(self.topic_of(stream), key, value) for stream, key, value in out.emits]
        for topic, key, value in sent:
            if len(key or b"") + len(value) > MESSAGE_BUDGET:
                raise EmitTooLarge(f"a message for {topic} takes {len(key or b'') + len(value):,} bytes "
                                   f"(at most {MESSAGE_BUDGET:,})")
        return sent

    async def produce(self, out: Outcome) -> None:
        """Step 1: dead letters, alerts and re-keyed records, acknowledged (acks=all)."""
        send = self.producer.send
        futures = [await send(topic, value, key=key) for topic, key, value in self.messages(out)]
        if futures:
            await asyncio.gather(*futures)


def next_offsets(topic: str, batch: Sequence[Message]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after ``batch``: one past its last message, per partition."""
    last: dict[int, int] = {}
    for m in batch:
        if m.offset >= last.get(m.partition, -1):
            last[m.partition] = m.offset
    return {TopicPartition(topic, p): OffsetAndMetadata(o + 1, "") for p, o in last.items()}
