"""Record headers on what the worker sends (streams.messages, streams.checkpoint): each message says
what it is and which input event it derives from, and the headers count toward the message budget."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import Codec
from streams.checkpoint import Checkpoint, Outgoing
from streams.messages import (
    ALERT_RECORD,
    DEADLETTER_RECORD,
    MESSAGE_BUDGET,
    EmitTooLarge,
    Outcome,
    fit_for_topic,
    framed_headers,
    headers_size,
)
from streams.monitors import kafka_publisher
from yibao.dlq import content_headers
from yibao.localinfra import KafkaEndpoint
from yibao.settings import Settings

from ..harness import default_settings
from .rules.builders import CBC, Rig, line, ms, reversal, settlement, stay

CODEC = Codec()
SOURCE = "t.settlement"


class Producer:
    """Fake producer: keeps what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[None]:
        self.sent.append((topic, key, value, list(headers or [])))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def _nothing(*args: Any) -> None:
    return None


def checkpoint(producer: Producer | None = None) -> Checkpoint:
    return Checkpoint(SOURCE, CODEC, producer or Producer(), _nothing, _nothing, [],  # type: ignore[arg-type]
                      "t.deadletter", lambda s: f"t.{s}")


def dead_letter(reason: str = "INVALID_CODE", partition: int = 2, offset: int = 41, payload: bytes = b"x",
                source_topic: str = SOURCE, detail: str = "d") -> dict[str, Any]:
    return {"event_id": "e", "reason_code": reason, "reason_detail": detail, "field": None,
            "source_topic": source_topic, "source_partition": partition, "source_offset": offset,
            "source_key": None, "schema_id": None, "event_type": None, "payload": payload, "payload_digest": "p",
            "failed_at": 0}


def alert() -> dict[str, Any]:
    return {"event_id": "a1", "alert_id": "a", "status": "FIRED", "rule_id": "YB-X", "rule_version": 1,
            "result_type": "SUSPICIOUS", "severity": "HIGH", "subsystem": "settlement",
            "fixmedins_code": "H11010500001", "psn_token": None, "admdvs": "110105", "setl_ids": ["S1"],
            "mdtrt_ids": ["M1"], "window_start": 0, "window_end": 1, "amount_at_risk": 5, "evidence": {"k": "v"},
            "detected_at": 1}


def by_name(msg: Outgoing) -> dict[str, str]:
    names = [k for k, _ in msg[3]]
    assert len(names) == len(set(names)), f"a header repeated: {names}"
    return {k: v.decode() for k, v in msg[3]}


def test_a_dead_letter_says_what_it_is_where_it_was_turned_away_and_why() -> None:
    out = Outcome(dead=[dead_letter("INVALID_CODE", 2, 41)], dead_keys=[b"t.settlement/2"])
    [msg] = checkpoint().messages(out)
    assert by_name(msg) == {
        "content-type": "application/vnd.yibao.deadletter.v1+avro",
        "yibao-schema-id": str(CODEC.header(msg[2])),
        "yibao-source-topic": SOURCE, "yibao-source-partition": "2", "yibao-source-offset": "41",
        "yibao-reason": "INVALID_CODE",
    }
    assert CODEC.decode(msg[2]).record == DEADLETTER_RECORD


def test_an_alert_and_a_re_keyed_stay_name_the_event_that_raised_them() -> None:
    out = Outcome(alerts=[alert()], alert_sources=[(1, 7)],
                  emits=[("internal.stays-by-drg", b"ES23", b"{}")], emit_sources=[(3, 9)])
    sent = checkpoint().messages(out)
    assert [m[0] for m in sent] == ["t.alerts", "t.internal.stays-by-drg"]
    a, s = (by_name(m) for m in sent)
    assert a == {"content-type": "application/vnd.yibao.alerts.v1+avro",
                 "yibao-schema-id": str(CODEC.header(sent[0][2])),
                 "yibao-source-topic": SOURCE, "yibao-source-partition": "1", "yibao-source-offset": "7"}
    assert CODEC.decode(sent[0][2]).record == ALERT_RECORD
    assert s == {"content-type": "application/vnd.yibao.stay.v1+json",
                 "yibao-source-topic": SOURCE, "yibao-source-partition": "3", "yibao-source-offset": "9"}


def test_produce_sends_the_headers() -> None:
    producer = Producer()
    out = Outcome(dead=[dead_letter()], dead_keys=[b"k"], emits=[("internal.stays-by-drg", b"ES23", b"{}")],
                  emit_sources=[(0, 5)])
    cp = checkpoint(producer)
    asyncio.run(cp.produce(out))
    assert [(t, k, v, h) for t, k, v, h in producer.sent] == [tuple(m) for m in cp.messages(out)]
    assert all(h for *_, h in producer.sent)


def test_headers_count_toward_the_message_budget() -> None:
    def emit(size: int) -> Outcome:
        return Outcome(emits=[("internal.stays-by-drg", b"K", b" " * size)], emit_sources=[(0, 123)])

    [fits] = checkpoint().messages(emit(MESSAGE_BUDGET - 1 - 200))
    headers = headers_size(fits[3])
    assert 0 < headers < 200
    checkpoint().messages(emit(MESSAGE_BUDGET - 1 - headers))  # exactly the budget
    with pytest.raises(EmitTooLarge, match=f"{MESSAGE_BUDGET + 1:,} bytes"):
        checkpoint().messages(emit(MESSAGE_BUDGET - headers))  # key + value alone are within it


@pytest.mark.parametrize("topic_len", [5, 249])  # 249: the longest topic name Kafka allows
def test_a_dead_letter_fitted_for_the_topic_is_within_the_budget_with_its_headers(topic_len: int) -> None:
    """fit_for_topic bounds the whole message, headers included: around the point where the payload
    must go, every fitted dead letter is sent, none is refused as too large."""
    topic = "t" * topic_len
    detail = "\U0001f600" * 2_000  # 4 bytes each in UTF-8: the estimate of the detail is exact
    base = MESSAGE_BUDGET - 4 * len(detail) - 2_000
    dropped = 0
    for payload_len in range(base - 700, base + 50, 25):
        fitted = fit_for_topic(dead_letter(payload=b"p" * payload_len, source_topic=topic, detail=detail))
        dropped += fitted["payload"] == b""
        [msg] = checkpoint().messages(Outcome(dead=[fitted], dead_keys=[b"k"]))
        assert len(msg[1] or b"") + len(msg[2]) + headers_size(msg[3]) <= MESSAGE_BUDGET
    assert dropped  # the range crosses the point where the sealed payload is dropped


def test_the_schema_id_header_is_the_one_in_the_frame_and_absent_when_there_is_none() -> None:
    framed = b"\x00\x00\x00\x01\x02rest"
    assert dict(framed_headers("settlement", framed)) == {
        "content-type": b"application/vnd.yibao.settlement.v1+avro", "yibao-schema-id": b"258"}
    for unframed in (b"", b"\x00\x00", b"\x01\x00\x00\x00\x01", None):
        assert dict(framed_headers("settlement", unframed)) == {
            "content-type": b"application/vnd.yibao.settlement.v1+avro"}


def test_re_keyed_stays_carry_the_position_of_the_settlement_or_reversal_they_come_from() -> None:
    rig = Rig()
    outpatient = settlement("O1", ms(10), [line(CBC)])
    inpatient = stay("S1", ms(10, 11), 5, 10, [line(CBC, t=ms(6))])
    out = rig.send(outpatient, inpatient, reversal(inpatient, t=ms(12)), partition=3)
    assert len(out.emits) == len(out.emit_sources) == 4
    assert out.emit_sources == [(3, 1), (3, 1), (3, 2), (3, 2)]


def test_dlq_replay_sends_each_original_with_the_content_type_of_its_topic(tmp_path: Any) -> None:
    with default_settings(tmp_path) as s:
        assert isinstance(s, Settings)
        value = b"\x00\x00\x00\x00\x01body"
        assert dict(content_headers(s, s.topic("settlement"), value)) == {
            "content-type": b"application/vnd.yibao.settlement.v1+avro", "yibao-schema-id": b"1"}
        assert dict(content_headers(s, s.topic("internal.stays-by-drg"), b"{}")) == {
            "content-type": b"application/vnd.yibao.stay.v1+json"}
        assert content_headers(s, "someone.elses.topic", value) == []


@pytest.mark.integration
def test_alerts_the_monitors_publish_say_what_they_are(broker: KafkaEndpoint) -> None:
    """`yibao monitors run` publishes through kafka_publisher: an alert from no one input event has
    its content type and schema id, and no source headers."""
    prefix = f"h{uuid.uuid4().hex[:8]}."
    topic = f"{prefix}alerts"
    settings = SimpleNamespace(topic=lambda stream: f"{prefix}{stream}",
                               kafka_client_kwargs=lambda: {"bootstrap_servers": broker.bootstrap})

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()

    async def read() -> list[Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            got = await consumer.getmany(timeout_ms=5000)
            return [r for records in got.values() for r in records]
        finally:
            await consumer.stop()

    asyncio.run(create())
    kafka_publisher(settings)([alert()])
    [record] = asyncio.run(read())
    assert dict(record.headers) == {"content-type": b"application/vnd.yibao.alerts.v1+avro",
                                    "yibao-schema-id": str(CODEC.header(record.value)).encode()}
    assert CODEC.decode(record.value).datum["alert_id"] == "a"
