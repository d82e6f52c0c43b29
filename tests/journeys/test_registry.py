"""The Schema Registry API, proven by clients no one here wrote.

A developer starts `yibao registry serve` and points the Kafka ecosystem at it: confluent-kafka's
own Consumer, ``SchemaRegistryClient`` and ``AvroDeserializer`` decode every yibao topic that
carries Avro (the three source topics, dead letters, alerts); chDB reads the raw topic bytes with
``FORMAT AvroConfluent``; a compatibility check of a breaking change is refused. `yibao demo`
serves the same API while it runs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from yibao.localinfra import free_port

from .conftest import User, assert_clear_error, ok

#: The topics yibao writes Avro to (the re-keyed stays, changelogs and rules are JSON).
SOURCE_TOPICS = ("settlement", "procurement", "supervision")
URL = re.compile(r"http://127\.0\.0\.1:\d+")


@contextmanager
def serving(u: User, log: Path, flags: str = "") -> Iterator[str]:
    """`yibao registry serve` in the background as a developer starts it; its URL until the block ends,
    then SIGTERM, after which it must have exited 0."""
    proc = u.start(f"yibao registry serve --port {free_port()} {flags}", log)
    try:
        deadline = time.monotonic() + 60
        while not (found := URL.search(log.read_text(errors="replace"))):
            assert proc.poll() is None, f"the registry exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the registry printed no URL:\n{log.read_text()}"
            time.sleep(0.1)
        yield found.group(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def get(url: str) -> tuple[int, Any]:
    """(status, JSON body) of a GET, error answers included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def consume(bootstrap: str, topic: str, timeout_s: float = 120) -> list[Message]:
    """Every record of ``topic``, read with confluent-kafka's Consumer from the start of each
    partition to its end (assigned, not subscribed: no group join)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"registry-proof-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        partitions = c.list_topics(topic, timeout=30).topics[topic].partitions
        assert partitions, f"{topic}: no partitions"
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        done: set[int] = set()
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(done) < len(partitions):
            assert time.monotonic() < deadline, f"{topic}: {len(out)} records, partitions {done} at their end"
            m = c.poll(1.0)
            if m is None:
                continue
            err = m.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                done.add(m.partition())
                continue
            out.append(m)
        return out
    finally:
        c.close()


def same(decoded: Any, expected: Any, path: str = "") -> None:
    """``decoded`` (Python values from a third-party Avro reader) says what ``expected`` (yibao's JSON:
    decimals and times as strings) says."""
    if isinstance(decoded, dict):
        assert isinstance(expected, dict) and set(decoded) == set(expected), f"{path}: {decoded} != {expected}"
        for k, v in decoded.items():
            same(v, expected[k], f"{path}.{k}")
    elif isinstance(decoded, list):
        assert isinstance(expected, list) and len(decoded) == len(expected), f"{path}: {decoded} != {expected}"
        for i, (a, b) in enumerate(zip(decoded, expected, strict=True)):
            same(a, b, f"{path}[{i}]")
    elif isinstance(decoded, Decimal):
        assert decoded == Decimal(expected), f"{path}: {decoded} != {expected}"
    elif isinstance(decoded, dt.datetime):
        assert decoded == dt.datetime.fromisoformat(expected), f"{path}: {decoded} != {expected}"
    elif isinstance(decoded, dt.date):
        assert decoded == dt.date.fromisoformat(expected), f"{path}: {decoded} != {expected}"
    elif isinstance(decoded, uuid.UUID):
        assert str(decoded) == expected, f"{path}: {decoded} != {expected}"
    else:
        assert decoded == expected, f"{path}: {decoded!r} != {expected!r}"


def by_alert(versions: list[dict[str, Any]], detected_at: Callable[[dict[str, Any]], dt.datetime]
             ) -> dict[str, list[tuple[dt.datetime, dict[str, Any]]]]:
    """Every version of each alert on the alerts topic, with its detection time."""
    out: dict[str, list[tuple[dt.datetime, dict[str, Any]]]] = {}
    for d in versions:
        out.setdefault(d["alert_id"], []).append((detected_at(d), d))
    return out


def not_on_topic(shown: dict[str, Any], versions: list[tuple[dt.datetime, dict[str, Any]]],
                 fields: tuple[str, ...] | None = None) -> str | None:
    """None when a version of the alert `yibao alerts --json` shows (its latest, from the alerts table,
    which keeps times to the second) is on the topic with the same values; else why not."""
    at = dt.datetime.fromisoformat(shown["detected_at"])
    why = [f"no version detected at {at}"]
    for when, d in versions:
        if when.replace(microsecond=0) != at:
            continue
        keys = fields or tuple(d)
        to_second = {k: v.replace(microsecond=0) if isinstance(v, dt.datetime) else v for k, v in d.items()}
        try:
            same({k: to_second[k] for k in keys}, {k: shown[k] for k in keys}, shown["alert_id"])
        except AssertionError as exc:
            why.append(str(exc).splitlines()[0])
            continue
        return None
    return "; ".join(why)


def decoder(url: str) -> tuple[SchemaRegistryClient, AvroDeserializer]:
    client = SchemaRegistryClient({"url": url})
    return client, AvroDeserializer(client, return_record_name=True)


def decode(deserialize: AvroDeserializer, messages: list[Message]) -> list[Any]:
    """Each value as the deserializer gives it: ``(record name, datum)`` for a union subject, else the datum."""
    return [deserialize(m.value(), SerializationContext(m.topic(), MessageField.VALUE)) for m in messages]


def framed_ids(messages: list[Message]) -> set[int]:
    """The schema ids in the records' Confluent frames."""
    return {int.from_bytes(m.value()[1:5], "big") for m in messages}


# --- the command -----------------------------------------------------------------------------------
def test_serve_answers_with_the_users_topics_and_stops_cleanly_on_sigterm(online_user: User, tmp_path: Path) -> None:
    prefix = online_user.env["YIBAO_TOPIC_PREFIX"]
    log = tmp_path / "registry.log"
    with serving(online_user, log) as url:
        status, subjects = get(f"{url}/subjects")
        assert status == 200
        assert subjects == sorted(f"{prefix}{t}-value" for t in (*SOURCE_TOPICS, "deadletter", "alerts"))
        assert get(f"{url}/mode") == (200, {"mode": "READONLY"})
    assert "read-only, 5 subjects" in log.read_text(), log.read_text()


def test_serve_on_a_busy_port_is_one_clear_error(user: User) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_clear_error(user.run(f"yibao registry serve --port {port}"), f"127.0.0.1:{port}", "in use")
    assert_clear_error(user.run("yibao registry serve --empty"), "--empty", "--writable")


def test_unknown_ids_and_subjects_get_confluents_errors(user: User, tmp_path: Path) -> None:
    with serving(user, tmp_path / "registry.log") as url:
        assert get(f"{url}/schemas/ids/99999") == (404, {"error_code": 40403, "message": "Schema not found"})
        status, body = get(f"{url}/subjects/nope-value/versions/latest")
        assert (status, body["error_code"]) == (404, 40401)
        status, body = get(f"{url}/subjects/yibao.alerts-value/versions/7")
        assert (status, body["error_code"]) == (404, 40402)
        client = SchemaRegistryClient({"url": url})
        with pytest.raises(SchemaRegistryError) as unknown_id:
            client.get_schema(99999)
        assert (unknown_id.value.http_status_code, unknown_id.value.error_code) == (404, 40403)
        with pytest.raises(SchemaRegistryError) as unknown_subject:
            client.get_latest_version("nope-value")
        assert (unknown_subject.value.http_status_code, unknown_subject.value.error_code) == (404, 40401)


def test_a_breaking_change_is_refused_by_the_compatibility_check(user: User, tmp_path: Path) -> None:
    with serving(user, tmp_path / "registry.log") as url:
        client = SchemaRegistryClient({"url": url})
        for subject in ("yibao.settlement-value", "yibao.alerts-value"):
            latest = client.get_latest_version(subject)
            text = latest.schema.schema_str
            assert client.lookup_schema(subject, Schema(text, "AVRO")).schema_id == latest.schema_id
            schema = json.loads(text)
            record = schema[0] if isinstance(schema, list) else schema
            record["fields"].append({"name": "new_required", "type": "string"})
            assert client.test_compatibility(subject, Schema(json.dumps(schema), "AVRO")) is False
            record["fields"][-1] = {"name": "new_optional", "type": ["null", "string"], "default": None}
            assert client.test_compatibility(subject, Schema(json.dumps(schema), "AVRO")) is True


def post(url: str, body: Any) -> tuple[int, Any]:
    """(status, JSON body) of a POST of ``body`` as Confluent's clients send it."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_writable_mode_behaves_as_confluents_for_its_client(user: User, tmp_path: Path) -> None:
    """What a test of a registry client (`yibao schemas register --registry-url`) needs: a new, empty
    registry that takes registrations, IMPORT with explicit ids, and refuses what Confluent refuses."""
    with serving(user, tmp_path / "registry.log", "--writable --empty") as url:
        client = SchemaRegistryClient({"url": url})
        assert client.get_subjects() == [] and client.get_global_mode() == "READWRITE"
        v1 = {"type": "record", "name": "Probe", "namespace": "t", "fields": [{"name": "a", "type": "string"}]}
        first = client.register_schema("probe-value", Schema(json.dumps(v1), "AVRO"))
        v2 = {**v1, "fields": [*v1["fields"], {"name": "b", "type": ["null", "int"], "default": None}]}
        assert client.register_schema("probe-value", Schema(json.dumps(v2), "AVRO")) == first + 1
        breaking = {**v1, "fields": [*v1["fields"], {"name": "c", "type": "int"}]}
        with pytest.raises(SchemaRegistryError) as refused:
            client.register_schema("probe-value", Schema(json.dumps(breaking), "AVRO"))
        assert refused.value.error_code == 409
        assert client.get_versions("probe-value") == [1, 2]

        with pytest.raises(SchemaRegistryError) as not_empty:
            client.update_global_mode("IMPORT")
        assert not_empty.value.error_code == 42205
        assert client.update_mode("imported-value", "IMPORT") == "IMPORT"
        assert json.loads(client.get_schema(first).schema_str) == v1  # an empty registry: not the manifest's ids
        status, body = post(f"{url}/subjects/imported-value/versions",
                            {"schema": json.dumps({"type": "string"}), "id": 4000, "version": 7})
        assert (status, body) == (200, {"id": 4000})
        got = client.get_version("imported-value", 7)
        assert (got.schema_id, got.version) == (4000, 7)
        status, body = post(f"{url}/subjects/imported-value/versions",
                            {"schema": json.dumps({"type": "int"}), "id": first})
        assert (status, body["error_code"]) == (422, 42205)  # that id holds another schema
        assert client.delete_mode("imported-value") == "IMPORT"
        status, body = post(f"{url}/subjects/imported-value/versions",
                            {"schema": json.dumps({"type": "long"}), "id": 4001})
        assert (status, body["error_code"]) == (422, 42205)  # not in import mode any more


# --- every Avro topic, decoded by confluent-kafka --------------------------------------------------------
@pytest.mark.parametrize("landed", ["embedded"], indirect=True)
def test_confluent_kafka_decodes_every_avro_topic_through_the_api(landed: User, tmp_path: Path) -> None:
    prefix, bootstrap = landed.env["YIBAO_TOPIC_PREFIX"], landed.env["YIBAO_KAFKA_BOOTSTRAP"]
    events = {}
    for line in Path(landed.extra["events"]).read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            events[obj["event_id"]] = obj
    with serving(landed, tmp_path / "registry.log") as url:
        client, deserialize = decoder(url)
        seen = 0
        for topic in SOURCE_TOPICS:
            messages = consume(bootstrap, prefix + topic)
            for record, datum in decode(deserialize, messages):
                event_id = str(datum["event_id"])
                expected = dict(events[event_id])
                assert record.rsplit(".", 1)[-1] == expected.pop("event_type")
                same(datum, expected, event_id)
                seen += 1
            assert framed_ids(messages) == {client.get_latest_version(f"{prefix}{topic}-value").schema_id}
        assert seen == len(events) == landed.extra["produced"]

        letters = {d["event_id"]: d for d in ok(landed.run("yibao dlq list --json --limit 100000")).json_lines()}
        messages = consume(bootstrap, prefix + "deadletter")
        assert framed_ids(messages) == {client.get_latest_version(f"{prefix}deadletter-value").schema_id}
        decoded = {str(datum["event_id"]): datum for datum in decode(deserialize, messages)}
        assert set(decoded) == set(letters) and len(letters) >= landed.extra["broken"]
        for event_id, d in letters.items():
            got = decoded[event_id]
            same({k: got[k] for k in ("reason_code", "field", "reason_detail", "event_type")},
                 {k: d[k] for k in ("reason_code", "field", "reason_detail", "event_type")})
            # the dead_letters table keeps the failure time to the second
            assert got["failed_at"].replace(microsecond=0) == dt.datetime.fromisoformat(d["failed_at"]), (got, d)
            assert (got["source_topic"], got["source_partition"], got["source_offset"]) \
                == (d["source"]["topic"], d["source"]["partition"], d["source"]["offset"])

        shown = ok(landed.run("yibao alerts --json --retracted --limit 100000")).json_lines()
        messages = consume(bootstrap, prefix + "alerts")
        assert framed_ids(messages) == {client.get_latest_version(f"{prefix}alerts-value").schema_id}
        versions = by_alert(decode(deserialize, messages), lambda d: d["detected_at"])
        assert shown and {a["alert_id"] for a in shown} == set(versions)
        for a in shown:
            assert not_on_topic(a, versions[a["alert_id"]]) is None, not_on_topic(a, versions[a["alert_id"]])


# --- chDB's AvroConfluent format -------------------------------------------------------------------------
CHDB_QUERY = """
import sys, chdb
path, url, columns = sys.argv[1:4]
print(chdb.query(
    f"SELECT {columns} FROM file('{path}', 'AvroConfluent') SETTINGS format_avro_schema_registry_url='{url}', "
    "session_timezone='UTC', date_time_output_format='iso', output_format_json_quote_decimals=1, "
    "output_format_json_quote_64bit_integers=0", "JSONEachRow").bytes().decode())
"""


def chdb_read(path: Path, url: str, columns: str) -> subprocess.CompletedProcess[str]:
    """chDB (its own process: one chDB per process) reading concatenated framed messages from ``path``."""
    return subprocess.run([sys.executable, "-c", CHDB_QUERY, str(path), url, columns], capture_output=True,
                          text=True, timeout=120)


def framed(messages: list[Message], path: Path) -> Path:
    """The records' values as they are on the topic, one after another (each 0x00 | id | Avro body)."""
    path.write_bytes(b"".join(m.value() for m in messages))
    return path


@pytest.mark.parametrize("landed", ["embedded"], indirect=True)
def test_chdb_reads_the_raw_topic_bytes_with_avro_confluent(landed: User, tmp_path: Path) -> None:
    prefix, bootstrap = landed.env["YIBAO_TOPIC_PREFIX"], landed.env["YIBAO_KAFKA_BOOTSTRAP"]
    with serving(landed, tmp_path / "registry.log") as url:
        alerts = framed(consume(bootstrap, prefix + "alerts"), tmp_path / "alerts.bin")
        read = chdb_read(alerts, url, "alert_id, status, rule_id, rule_version, severity, fixmedins_code, "
                                      "amount_at_risk, setl_ids, evidence, detected_at")
        assert read.returncode == 0, read.stderr
        rows = [json.loads(line) for line in read.stdout.splitlines() if line.strip()]
        for r in rows:
            r["amount_at_risk"] = Decimal(r["amount_at_risk"])
        versions = by_alert(rows, lambda r: dt.datetime.fromisoformat(r["detected_at"]))
        shown = ok(landed.run("yibao alerts --json --retracted --limit 100000")).json_lines()
        assert shown and {a["alert_id"] for a in shown} == set(versions)
        columns = ("status", "rule_id", "rule_version", "severity", "fixmedins_code", "amount_at_risk", "setl_ids",
                   "evidence")
        for a in shown:
            assert not_on_topic(a, versions[a["alert_id"]], columns) is None, \
                not_on_topic(a, versions[a["alert_id"]], columns)

        letters = framed(consume(bootstrap, prefix + "deadletter"), tmp_path / "deadletter.bin")
        read = chdb_read(letters, url, "toString(event_id) AS event_id, reason_code, source_topic, source_partition, "
                                       "source_offset")
        assert read.returncode == 0, read.stderr
        rows = [json.loads(line) for line in read.stdout.splitlines() if line.strip()]
        listed = ok(landed.run("yibao dlq list --json --limit 100000")).json_lines()
        assert sorted((r["event_id"], r["reason_code"], r["source_topic"], r["source_partition"], r["source_offset"])
                      for r in rows) \
            == sorted((d["event_id"], d["reason_code"], d["source"]["topic"], d["source"]["partition"],
                       d["source"]["offset"]) for d in listed)

        # A source topic's subject is a union of its event types (one id per topic, TopicNameStrategy);
        # ClickHouse's Avro input wants a record at the root, so it refuses these, as documented.
        settlements = framed(consume(bootstrap, prefix + "settlement"), tmp_path / "settlement.bin")
        read = chdb_read(settlements, url, "setl_id")
        assert read.returncode != 0 and "Root schema must be a record" in read.stderr, read
