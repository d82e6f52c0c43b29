"""Journeys of issue 14 (record headers, consumer lag): what a Kafka tool nobody here wrote sees on
yibao's topics, and how far behind a worker says it is.

Headers are read with confluent-kafka (librdkafka) from the topics of a real run (``landed``); the
Avro bodies are decoded with fastavro from the contract files, only to check that the headers say
what the bodies say. The lag journey starts a worker on a backlog and reads its /metrics while it
catches up, next to what kafka-python's end offsets make of the same group.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import fastavro
import pytest

from yibao.localinfra import KafkaEndpoint

from .conftest import ROOT, User, ok, produced, running_worker

confluent_kafka = pytest.importorskip("confluent_kafka")

SOURCE_STREAMS = ("settlement", "procurement", "supervision")
STAY_STREAMS = ("internal.stays-by-hospital", "internal.stays-by-drg")
CONTENT_TYPE = "application/vnd.yibao.{}.v1+avro"
SETTLEMENT_RECORDS = ("Settlement", "SettlementReversal", "CrossProvinceFiling")


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic``, read with confluent-kafka from the beginning up to each partition's
    end (librdkafka's partition EOF comes from the fetch high watermark, right on Tansu too)."""
    c = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": f"h-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        assert parts, f"{topic} has no partitions"
        c.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in parts])
        records, done = [], set()
        deadline = time.monotonic() + 60
        while len(done) < len(parts):
            assert time.monotonic() < deadline, f"{topic}: partitions {sorted(set(parts) - done)} never ended"
            m = c.poll(1.0)
            if m is None:
                continue
            if m.error():
                assert m.error().code() == confluent_kafka.KafkaError._PARTITION_EOF, m.error()
                done.add(m.partition())
                continue
            records.append(m)
        return records
    finally:
        c.close()


def headers(m: Any) -> dict[str, str]:
    pairs = m.headers() or []
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), f"a header repeated: {names}"
    return {k: v.decode() for k, v in pairs}


def avro_body(m: Any, record: str) -> dict[str, Any]:
    """The value decoded with fastavro and the contract file (after the 5-byte Confluent frame)."""
    schema = fastavro.parse_schema(json.loads((ROOT / "schemas" / "avsc" / "pipeline" / f"{record}.avsc").read_text()))
    value = m.value()
    assert value[0] == 0
    body: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(value[5:]), schema, None)  # type: ignore[call-arg]
    return body


def frame_id(m: Any) -> str:
    return str(int.from_bytes(m.value()[1:5], "big"))


@pytest.mark.parametrize("landed", ["embedded"], indirect=True)  # headers do not depend on the engine
def test_a_third_party_consumer_routes_dead_letters_and_alerts_by_their_headers(landed: User) -> None:
    bootstrap, prefix = landed.env["YIBAO_KAFKA_BOOTSTRAP"], landed.env["YIBAO_TOPIC_PREFIX"]

    dead = read_topic(bootstrap, f"{prefix}deadletter")
    assert len(dead) >= landed.extra["broken"]
    for m in dead:
        h, body = headers(m), avro_body(m, "DeadLetter")
        assert h == {"content-type": CONTENT_TYPE.format("deadletter"), "yibao-schema-id": frame_id(m),
                     "yibao-source-topic": body["source_topic"],
                     "yibao-source-partition": str(body["source_partition"]),
                     "yibao-source-offset": str(body["source_offset"]),
                     "yibao-reason": body["reason_code"]}
    # routing without decoding: the headers alone count what the dead_letters table counts
    by_header = Counter((h["yibao-source-topic"], h["yibao-reason"]) for h in map(headers, dead))
    rows = ok(landed.run("yibao query --format json "
                         "'SELECT source_topic, reason_code, count() AS n FROM dead_letters "
                         "GROUP BY source_topic, reason_code'")).json_lines()
    assert by_header == Counter({(r["source_topic"], r["reason_code"]): int(r["n"]) for r in rows})
    # the settlements broken on purpose are picked out by two headers
    assert by_header[(f"{prefix}settlement", "INVALID_CODE")] >= landed.extra["broken"]

    alerts = read_topic(bootstrap, f"{prefix}alerts")
    assert alerts
    positions = {r["event_id"]: (str(r["src_partition"]), str(r["src_offset"])) for r in ok(landed.run(
        "yibao query --format json 'SELECT event_id, src_partition, src_offset FROM alerts'")).json_lines()}
    inputs = {f"{prefix}{s}" for s in (*SOURCE_STREAMS, *STAY_STREAMS)}
    derived = Counter[str]()
    matched = 0
    for m in alerts:
        h, body = headers(m), avro_body(m, "AnomalyAlert")
        assert (h["content-type"], h["yibao-schema-id"]) == (CONTENT_TYPE.format("alerts"), frame_id(m))
        if "yibao-source-topic" not in h:  # raised by a monitor over ClickHouse, from no one event
            assert set(h) == {"content-type", "yibao-schema-id"}
            continue
        assert h["yibao-source-topic"] in inputs
        derived[h["yibao-source-topic"]] += 1
        event_id = str(body["event_id"])  # fastavro reads the uuid logical type as a UUID
        if event_id in positions:  # the table keeps the latest version of each alert
            assert (h["yibao-source-partition"], h["yibao-source-offset"]) == positions[event_id]
            matched += 1
    assert derived[f"{prefix}settlement"] and matched, (derived, matched)

    # re-keyed stays name the settlement (or reversal) they come from
    stays = read_topic(bootstrap, f"{prefix}internal.stays-by-drg")
    assert stays
    for m in stays:
        h = headers(m)
        assert h["content-type"] == "application/vnd.yibao.stay.v1+json"
        assert h["yibao-source-topic"] == f"{prefix}settlement"
        assert json.loads(m.value())["s"]

    # what `yibao replay` produced says what it is too
    events = read_topic(bootstrap, f"{prefix}settlement")
    assert len(events) >= landed.extra["broken"]
    assert {(h["content-type"], h["yibao-schema-id"]) for h in map(headers, events)} == {
        (CONTENT_TYPE.format("settlement"), frame_id(events[0]))}


# --- lag -----------------------------------------------------------------------------------------------
_LAG = re.compile(r'^yibao_consumer_lag\{([^}]*)\} ([0-9.e+-]+)$')


def lag_samples(port: int) -> dict[tuple[str, int], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, int], float] = {}
    for line in text.splitlines():
        if m := _LAG.match(line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[(labels["topic"], int(labels["partition"]))] = float(m.group(2))
    return out


def test_a_worker_on_a_backlog_reports_its_lag_down_to_zero_never_below(online_user: User, broker: KafkaEndpoint,
                                                                        tmp_path: Path) -> None:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    u = online_user.with_env(YIBAO_MONITOR_INTERVAL_S="0")
    prefix, bootstrap = u.env["YIBAO_TOPIC_PREFIX"], u.env["YIBAO_KAFKA_BOOTSTRAP"]
    settlement = f"{prefix}settlement"
    events = u.cwd / "events.jsonl"
    ok(u.run(f"yibao simulate --events 300 --out {events}", timeout=300))
    with running_worker(u, tmp_path / "first.log"):
        pass  # an operator's first start: it makes the topics
    n = produced(ok(u.run(f"yibao replay {events}", timeout=300)))  # the worker is stopped: a backlog
    on_settlement = sum(json.loads(line)["event_type"] in SETTLEMENT_RECORDS
                        for line in events.read_text().splitlines() if line.strip())
    assert 0 < on_settlement < n

    series: list[dict[tuple[str, int], float]] = []
    with running_worker(u, tmp_path / "worker.log", YIBAO_BATCH_MAX_EVENTS="20", YIBAO_BATCH_MAX_SECONDS="0.2") as w:
        deadline = time.monotonic() + 300
        while True:
            series.append(lag_samples(w.port))
            done, _ = w.accounted()
            last = series[-1]
            if done >= n and last and all(v == 0 for v in last.values()):
                break
            w.check()
            assert time.monotonic() < deadline, f"{done:.0f} of {n} accounted, lag {last}:\n{w.tail()}"
            time.sleep(0.2)

    values = [v for s in series for v in s.values()]
    assert min(values) >= 0, "negative lag"
    behind = [sum(v for (t, _), v in s.items() if t == settlement) for s in series]
    assert max(behind) > 0, "the worker never said it was behind on its backlog"
    assert max(behind) <= on_settlement, "more lag than events on the topic"
    parts = {p for s in series for (t, p) in s if t == settlement}
    assert len(parts) >= 2 and all(series[-1][(settlement, p)] == 0 for p in parts)
    # nothing new came: each source partition's lag only counted down from its first reading
    for topic in (f"{prefix}{s}" for s in SOURCE_STREAMS):
        for p in {p for s in series for (t, p) in s if t == topic}:
            readings = [s[(topic, p)] for s in series if (topic, p) in s]
            assert all(a >= b for a, b in itertools.pairwise(readings)), (topic, p, readings)

    # what a standard end-offset tool makes of the same group on the same broker
    group = f"{u.env['YIBAO_CONSUMER_GROUP']}.settlement"
    standard = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(settlement, p) for p in sorted(parts)]
        ends = standard.end_offsets(tps)
        tool_lag = {tp.partition: ends[tp] - standard.committed(tp) for tp in tps}
    finally:
        standard.close()
    if broker.flavor == "tansu":
        # Tansu answers ListOffsets(latest) with the last batch's base offset + 1: the tool reads a
        # caught-up group as negative lag, which is why yibao_consumer_lag exists
        assert min(tool_lag.values()) < 0, tool_lag
    else:
        assert set(tool_lag.values()) == {0}, tool_lag


def test_dlq_replay_resends_originals_saying_what_they_are(online_user: User, tmp_path: Path) -> None:
    """Dead letters replayed by `yibao dlq replay` go back to their source topic with the replay header
    and the same content type and schema id a first producer gives them."""
    u = online_user.with_env(YIBAO_MONITOR_INTERVAL_S="0", YIBAO_BATCH_MAX_SECONDS="0.3")
    prefix, bootstrap = u.env["YIBAO_TOPIC_PREFIX"], u.env["YIBAO_KAFKA_BOOTSTRAP"]
    events = u.cwd / "events.jsonl"
    ok(u.run(f"yibao simulate --events 100 --days 3 --out {events}", timeout=300))
    with running_worker(u, tmp_path / "worker.log", YIBAO_KNOWN_INSUTYPES='["310"]') as w:
        w.wait_accounted(produced(ok(u.run(f"yibao replay {events}", timeout=300))))
    res = ok(u.run("yibao dlq replay --reason UNKNOWN_CODE_VALUE", timeout=120))
    m = re.search(r"replayed (\d+)\b", res.out)
    assert m and int(m.group(1)) > 0, res

    dead = {r["event_id"]: r["source_topic"] for r in ok(u.run(
        "yibao query --format json \"SELECT event_id, source_topic FROM dead_letters "
        "WHERE reason_code = 'UNKNOWN_CODE_VALUE'\"")).json_lines()}
    resent = 0
    for topic in sorted(set(dead.values())):
        subject = topic.removeprefix(prefix)
        assert subject in SOURCE_STREAMS
        records = read_topic(bootstrap, topic)
        first = [headers(r) for r in records if "yibao-replay" not in headers(r)]
        again = [(headers(r), r) for r in records if "yibao-replay" in headers(r)]
        assert {h["yibao-replay"] for h, _ in again} == {i for i, t in dead.items() if t == topic}
        for h, r in again:
            assert h == {"yibao-replay": h["yibao-replay"], "content-type": CONTENT_TYPE.format(subject),
                         "yibao-schema-id": frame_id(r)}
        assert {(h["content-type"], h["yibao-schema-id"]) for h in first} == {
            (CONTENT_TYPE.format(subject), frame_id(again[0][1]))}
        resent += len(again)
    assert resent == int(m.group(1))
