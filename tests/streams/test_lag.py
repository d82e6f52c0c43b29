"""yibao_consumer_lag on the real broker: the events of a partition not yet landed, from the worker's
own fetch responses, where the standard end-offset lag is wrong on Tansu (ListOffsets(latest)
answers the last batch's base offset + 1)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from kafka import KafkaConsumer
from kafka.structs import TopicPartition as KafkaTopicPartition

from schemas import Codec
from streams import metrics
from streams.ingest import Ingestor
from streams.messages import Message, Outcome
from yibao.localinfra import KafkaEndpoint

pytestmark = pytest.mark.integration

#: three producer batches: a log of 25 records whose last batch starts at offset 20
BATCHES = (10, 10, 5)
END = sum(BATCHES)


class Processor:
    """Lands every event (no rows, nothing sent): only the offsets move."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.codec = Codec()
        self.stores: list[Any] = []
        self.tables: list[str] = []
        self.identities = None

    def process(self, msgs: Sequence[Message], already: Any = None) -> Outcome:
        return Outcome(events=len(msgs))


def lag(topic: str, partition: int = 0) -> float | None:
    return metrics.REGISTRY.get_sample_value("yibao_consumer_lag", {"topic": topic, "partition": str(partition)})


async def _produce(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        n = 0
        for size in BATCHES:
            batch = producer.create_batch()
            for _ in range(size):
                assert batch.append(key=None, value=f"v{n}".encode(), timestamp=None) is not None
                n += 1
            await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, group: str) -> tuple[list[float | None], int]:
    """Drive an ingestor's steps by hand (fetch 3, observe, land, observe ...); returns the lag seen
    after each step and the consumer's final position."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    producer = SimpleNamespace(send=None)
    ing = Ingestor(Processor(topic), SimpleNamespace(), producer, lambda: consumer, "dl",  # type: ignore[arg-type]
                   batch_max_events=3, batch_max_seconds=1, retry_max_seconds=1)
    ing.consumer = consumer
    await consumer.start()
    seen: list[float | None] = []
    try:
        consumer.assign([tp])
        await ing._observe_lag(consumer)
        seen.append(lag(topic))  # nothing fetched yet: no sample
        while await consumer.position(tp) < END:
            got = await consumer.getmany(tp, timeout_ms=2000, max_records=3)
            ing._gather(got, 0.0)
            await ing._observe_lag(consumer)
            seen.append(lag(topic))  # fetched, not landed
            await ing.flush()
            await ing._observe_lag(consumer)
            seen.append(lag(topic))  # landed and committed
        return seen, await consumer.position(tp)
    finally:
        await consumer.stop()
        ing.executor.shutdown(wait=False)


def test_lag_counts_down_to_zero_from_the_fetch_high_watermark_where_end_offsets_goes_negative(
        broker: KafkaEndpoint) -> None:
    topic, group = f"lag-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    asyncio.run(_produce(broker.bootstrap, topic))
    seen, position = asyncio.run(_consume(broker.bootstrap, topic, group))
    assert position == END
    assert seen[0] is None
    # each fetch of 3 holds the lag until they land; each landing takes 3 off; never below 0
    expected: list[float] = []
    for start in range(0, END, 3):
        expected += [END - start, max(0, END - start - 3)]
    assert seen[1:] == expected

    tp = KafkaTopicPartition(topic, 0)
    standard = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        committed = standard.committed(tp)
        end_offsets = standard.end_offsets([tp])[tp]
    finally:
        standard.close()
    assert committed == END
    if broker.flavor == "tansu":
        # the reason for the metric: ListOffsets(latest) is the last batch's base offset + 1, so the
        # lag every end-offset tool computes is negative once the worker has caught up
        assert end_offsets == END - BATCHES[-1] + 1
        assert end_offsets - committed < 0
    else:
        assert end_offsets - committed == 0
