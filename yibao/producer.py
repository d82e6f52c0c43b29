"""Producing framed events to the subsystem topics (simulate, replay, demo, bench)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas import Codec
from streams.messages import Headers, framed_headers

from .settings import Settings


@dataclass(frozen=True)
class OutEvent:
    """An event ready to send: record name, key, and either a raw datum or pre-framed bytes."""

    record: str
    key: str
    datum: dict[str, Any] | None = None
    value: bytes | None = None


@dataclass
class ProduceStats:
    sent: int = 0
    by_record: Counter[str] = field(default_factory=Counter)
    by_topic: Counter[str] = field(default_factory=Counter)


async def produce(
    settings: Settings,
    events: Iterable[Any],
    codec: Codec,
    progress: Callable[[int], None] | None = None,
    window: int = 20_000,
) -> ProduceStats:
    """Send ``events`` (objects with record/key and datum or value) and wait for every ack; each
    carries ``content-type`` and ``yibao-schema-id`` headers (streams.messages).

    At most ``window`` sends are in flight, so memory stays bounded however long the input is.
    """
    stats = ProduceStats()
    producer = AIOKafkaProducer(
        **settings.kafka_client_kwargs(), linger_ms=20, max_batch_size=512 * 1024, acks="all",
        request_timeout_ms=60_000,
    )
    try:
        await producer.start()
    except BaseException:
        await producer.stop()  # else it is reported as an unclosed producer when collected, after the error
        raise
    routes: dict[str, tuple[str, str]] = {}  # record -> subject, topic
    headers: dict[tuple[str, bytes], Headers] = {}  # subject, frame -> record headers
    try:
        inflight: list[asyncio.Future[Any]] = []
        for ev in events:
            record = ev.record
            route = routes.get(record)
            if route is None:
                subject = codec.subject_of(record)
                route = routes[record] = (subject, settings.topic(subject))
            subject, topic = route
            value = ev.value if getattr(ev, "value", None) is not None else codec.encode(record, ev.datum)
            hs = headers.get((subject, value[:5]))
            if hs is None:
                hs = headers[(subject, value[:5])] = framed_headers(subject, value)
            inflight.append(await producer.send(topic, value, key=ev.key.encode("utf-8"), headers=hs))
            stats.sent += 1
            stats.by_record[record.rsplit(".", 1)[-1]] += 1
            stats.by_topic[topic] += 1
            if len(inflight) >= window:
                await asyncio.gather(*inflight)
                if progress:
                    progress(len(inflight))
                inflight = []
        if inflight:
            await asyncio.gather(*inflight)
            if progress:
                progress(len(inflight))
    finally:
        await producer.stop()
    return stats
