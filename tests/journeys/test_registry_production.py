"""Production with the shop's Schema Registry: an operator publishes yibao's schemas there keeping their
ids (`yibao schemas register`, YIBAO_SCHEMA_REGISTRY_URL set), runs the worker against it, and
producers that register schemas of their own (confluent-kafka's AvroSerializer, auto-registering)
write to the settlement topic: the compatible one lands, the incompatible one is a dead letter.

The registry is yibao's own (`yibao registry serve --writable --empty`, an empty registry kept in
memory): it proves the commands against Confluent's API as that server implements it, not against
Confluent's registry itself (none can be installed here; see the report of issue 14).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.schema_registry import (
    SchemaRegistryClient,
    record_subject_name_strategy,
    topic_record_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from yibao.localinfra import free_port

from .conftest import User, assert_clear_error, ok, running_worker

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"


def _start_registry(u: User, log: Path) -> Any:
    port = free_port()
    proc = u.start(f"yibao registry serve --writable --empty --port {port}", log)
    deadline = time.monotonic() + 30
    while "schema registry (" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def _logical(schema: Any, value: Any) -> Any:
    """An event's JSON (as `yibao simulate --out` writes it) as the Python values an Avro serializer takes."""
    if value is None:
        return None
    if isinstance(schema, list):
        return _logical(next(b for b in schema if b != "null"), value)
    if isinstance(schema, str):
        return value
    t = schema["type"]
    if isinstance(t, (dict, list)):
        return _logical(t, value)
    lt = schema.get("logicalType")
    if lt == "decimal":
        return Decimal(str(value))
    if lt == "timestamp-millis":
        return dt.datetime.fromisoformat(value)
    if lt == "date":
        return dt.date.fromisoformat(value)
    if t == "record":
        return {f["name"]: _logical(f["type"], value.get(f["name"])) for f in schema["fields"]}
    if t == "array":
        return [_logical(schema["items"], v) for v in value]
    return value


def test_worker_decodes_a_producers_own_schema_and_dead_letters_an_incompatible_one(online_user: User,
                                                                                   tmp_path: Path) -> None:
    reg, url = _start_registry(online_user, tmp_path / "registry.log")
    u = online_user.with_env(YIBAO_SCHEMA_REGISTRY_URL=url, YIBAO_BATCH_MAX_SECONDS="0.3",
                             YIBAO_MONITOR_INTERVAL_S="0")
    prefix = u.env["YIBAO_TOPIC_PREFIX"]
    topic = f"{prefix}settlement"
    try:
        published = ok(u.run("yibao schemas register"))
        assert f"{topic}-value v1: registered as schema id 1" in published.out, published
        again = ok(u.run("yibao schemas register"))
        assert f"{topic}-value v1: already registered as schema id 1" in again.out, again
        assert "0 registered" in again.out, again

        union = ok(u.run("yibao schemas show settlement")).json()
        contract = next(r for r in union if r["name"] == "Settlement")
        compatible = copy.deepcopy(contract)  # a hospital system's schema: one more, optional, field
        compatible["fields"].append({"name": "his_vendor", "type": ["null", "string"], "default": None})
        incompatible = copy.deepcopy(contract)  # another's: the total as text
        for f in incompatible["fields"]:
            if f["name"] == "medfee_sumamt":
                f["type"] = "string"

        events = u.cwd / "events.jsonl"
        ok(u.run(f"yibao simulate --events 20 --out {events}"))
        good, bad = [json.loads(line) for line in events.read_text().splitlines()
                     if json.loads(line)["event_type"] == "Settlement"][:2]
        good_value = {**_logical(compatible, {**good, "his_vendor": None}), "his_vendor": "HIS-v3"}
        bad_value = {**_logical(contract, bad), "medfee_sumamt": str(bad["medfee_sumamt"])}

        sr = SchemaRegistryClient({"url": url})
        ctx = SerializationContext(topic, MessageField.VALUE)
        serialize_good = AvroSerializer(sr, json.dumps(compatible),
                                        conf={"subject.name.strategy": record_subject_name_strategy})
        serialize_bad = AvroSerializer(sr, json.dumps(incompatible),
                                       conf={"subject.name.strategy": topic_record_subject_name_strategy})
        with running_worker(u, tmp_path / "worker.log") as w:
            producer = Producer({"bootstrap.servers": u.env["YIBAO_KAFKA_BOOTSTRAP"]})
            for ev, value, serialize in ((good, good_value, serialize_good), (bad, bad_value, serialize_bad)):
                producer.produce(topic, key=ev["psn_no"].encode(), value=serialize(value, ctx))
            assert producer.flush(30) == 0
            w.wait_accounted(2, timeout=120)

        ids = {s: sr.get_latest_version(s).schema_id
               for s in (SETTLEMENT, f"{topic}-{SETTLEMENT}")}
        assert ids[SETTLEMENT] not in range(1, 6) and ids[f"{topic}-{SETTLEMENT}"] not in range(1, 6), ids

        rows = ok(u.run(f"yibao query \"SELECT setl_id, medfee_sumamt, hifp_pay FROM settlements "
                        f"WHERE setl_id IN ('{good['setl_id']}', '{bad['setl_id']}')\" --format json")).json_lines()
        assert [(r["setl_id"], Decimal(r["medfee_sumamt"]), Decimal(r["hifp_pay"])) for r in rows] == [
            (good["setl_id"], Decimal(good["medfee_sumamt"]), Decimal(good["hifp_pay"]))]

        dead = ok(u.run("yibao dlq list --json --reason INCOMPATIBLE_SCHEMA")).json_lines()
        assert len(dead) == 1, dead
        assert "medfee_sumamt" in dead[0]["reason_detail"]
        assert str(ids[f"{topic}-{SETTLEMENT}"]) in dead[0]["reason_detail"]
    finally:
        reg.terminate()
        reg.wait(10)


def test_publishing_to_an_unreachable_registry_is_one_clear_error(online_user: User) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_clear_error(online_user.run(f"yibao schemas register --registry-url {url}"), url, "cannot be reached")
    assert_clear_error(online_user.run("yibao schemas register --registry-url registry.internal:8081"),
                       "YIBAO_SCHEMA_REGISTRY_URL", "http(s)://")
