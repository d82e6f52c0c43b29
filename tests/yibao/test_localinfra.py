"""The infrastructure layer against real servers: if these fail, every other integration test lies."""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import clickhouse_driver
import pytest
from clickhouse_driver.errors import Error as ClickHouseError
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from tests.conftest import require_infra
from tests.servers import S3Server
from yibao.localinfra import (
    ClickHouseEndpoint,
    ClickHouseServer,
    InfraError,
    KafkaEndpoint,
    MissingBinaryError,
    TansuBroker,
    docker_available,
    free_port_run,
    tansu_binary,
)

integration = pytest.mark.integration


def test_ports_for_servers_lie_outside_the_range_outgoing_connections_take() -> None:
    """A client's connection can take an ephemeral port between the check and the server's bind; a
    port outside that range is free until someone asks for it."""
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for n in (1, 2, 4):
        base = free_port_run(n)
        assert all(not low <= p <= high for p in range(base, base + n)), (base, n, low, high)
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
        try:
            for i, sock in enumerate(socks):
                sock.bind(("127.0.0.1", base + i))
        finally:
            for sock in socks:
                sock.close()


def _local_clickhouse(
    workdir: Path, extra_users_xml: str | None = None, extra_profiles_xml: str | None = None
) -> ClickHouseServer:
    try:
        return ClickHouseServer(
            workdir=workdir, extra_users_xml=extra_users_xml, extra_profiles_xml=extra_profiles_xml
        )
    except MissingBinaryError as exc:
        require_infra(str(exc))


def _local_tansu(workdir: Path, port: int | None = None) -> TansuBroker:
    try:
        return TansuBroker(workdir=workdir, port=port)
    except MissingBinaryError as exc:
        require_infra(str(exc))


def _local_s3(workdir: Path) -> S3Server:
    try:
        return S3Server(workdir=workdir)
    except MissingBinaryError as exc:
        require_infra(str(exc))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _count(server: ClickHouseServer, table: str) -> int:
    client = clickhouse_driver.Client(server.host, port=server.tcp_port)
    try:
        (count,) = client.execute(f"SELECT count() FROM {table}")[0]
    finally:
        client.disconnect()
    return int(count)


@integration
def test_broker_topic_produce_consume_round_trip(broker: KafkaEndpoint) -> None:
    topic = f"localinfra-{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        assert topic in admin.list_topics()
    finally:
        admin.close()

    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(60)}
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        for key, value in sent.items():
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)

    # Count what arrives rather than compare with end offsets, which Tansu reports wrongly.
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    received: dict[bytes, bytes] = {}
    try:
        deadline = time.monotonic() + 45
        while len(received) < len(sent) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    received[record.key] = record.value
        consumer.commit()
    finally:
        consumer.close()
    assert received == sent


@integration
def test_clickhouse_fixture_answers_select_one(clickhouse_server: ClickHouseEndpoint) -> None:
    client = clickhouse_driver.Client(
        clickhouse_server.host,
        port=clickhouse_server.tcp_port,
        user=clickhouse_server.user,
        password=clickhouse_server.password,
    )
    try:
        assert client.execute("SELECT 1") == [(1,)]
        (server_version,) = client.execute("SELECT version()")[0]
    finally:
        client.disconnect()
    assert server_version == clickhouse_server.version
    assert clickhouse_server.version[:1].isdigit()


@integration
def test_clickhouse_restart_and_kill_keep_mergetree_rows(tmp_path: Path) -> None:
    with _local_clickhouse(tmp_path / "ch") as server:
        client = clickhouse_driver.Client(server.host, port=server.tcp_port)
        client.execute(
            "CREATE TABLE events (id UInt64, day Date, amount Float64) "
            "ENGINE = MergeTree PARTITION BY toYYYYMM(day) ORDER BY id"
        )
        rows = [(i, datetime.date(2026, 1 + i % 12, 1), i * 1.5) for i in range(1000)]
        client.execute("INSERT INTO events (id, day, amount) VALUES", rows)
        client.disconnect()
        ports, first_pid = (server.tcp_port, server.http_port), server.pid

        server.restart()
        assert (server.tcp_port, server.http_port) == ports
        assert server.pid is not None and server.pid != first_pid
        assert _count(server, "events") == 1000

        server.kill()
        assert server.pid is None
        assert not _accepts_connections(server.tcp_port)
        server.start()
        assert _count(server, "events") == 1000
        assert server.query("SELECT sum(id) FROM events").strip() == str(sum(range(1000)))
    assert server.pid is None
    assert not _accepts_connections(server.tcp_port)


@integration
def test_clickhouse_extra_users_and_profiles_are_enforced(tmp_path: Path) -> None:
    reader = """
        <reader>
            <password>s3cret</password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>read_only</profile>
            <quota>default</quota>
        </reader>"""
    with _local_clickhouse(
        tmp_path / "ch",
        extra_users_xml=reader,
        extra_profiles_xml="<read_only><readonly>1</readonly></read_only>",
    ) as server:
        admin = clickhouse_driver.Client(server.host, port=server.tcp_port)
        admin.execute("CREATE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x")
        admin.execute("INSERT INTO t VALUES", [(1,), (2,)])
        (low_cardinality,) = admin.execute(
            "SELECT value FROM system.settings WHERE name = 'allow_experimental_low_cardinality_type'"
        )[0]
        assert low_cardinality == "1"
        admin.disconnect()

        client = clickhouse_driver.Client(server.host, port=server.tcp_port, user="reader", password="s3cret")
        try:
            assert client.execute("SELECT count() FROM t") == [(2,)]
            with pytest.raises(ClickHouseError, match="readonly"):
                client.execute("INSERT INTO t VALUES", [(3,)])
        finally:
            client.disconnect()

        intruder = clickhouse_driver.Client(server.host, port=server.tcp_port, user="reader", password="no")
        with pytest.raises(ClickHouseError):
            intruder.execute("SELECT 1")
        intruder.disconnect()


@integration
def test_clickhouse_refuses_a_port_already_taken(tmp_path: Path) -> None:
    with _local_clickhouse(tmp_path / "first") as first:
        second = _local_clickhouse(tmp_path / "second")
        second.tcp_port = first.tcp_port
        with pytest.raises(InfraError, match="already in use"):
            second.start()
        assert second.pid is None


@integration
def test_clickhouse_startup_error_carries_the_server_log(tmp_path: Path) -> None:
    server = _local_clickhouse(tmp_path / "ch", extra_users_xml="<unclosed>")
    with pytest.raises(InfraError, match=r"exited with code[\s\S]*users\.xml"):
        server.start()
    assert server.pid is None


@integration
def test_tansu_stop_ends_the_process_and_frees_the_port(tmp_path: Path) -> None:
    tansu = _local_tansu(tmp_path / "tansu")
    tansu.start()
    pid = tansu.pid
    assert pid is not None and _process_exists(pid)
    assert tansu.bootstrap == f"127.0.0.1:{tansu.port}"
    started = time.monotonic()
    tansu.stop()
    assert time.monotonic() - started < 5
    assert tansu.pid is None
    assert not _process_exists(pid)
    assert not _accepts_connections(tansu.port)
    assert (tmp_path / "tansu" / "tansu.log").read_text().strip()


@integration
def test_tansu_kill_and_restart_on_the_same_port(tmp_path: Path) -> None:
    with _local_tansu(tmp_path / "tansu") as tansu:
        first_pid = tansu.pid
        assert first_pid is not None
        tansu.kill()
        assert tansu.pid is None and not _process_exists(first_pid)
        tansu.restart()
        assert tansu.pid not in (None, first_pid)
        admin = KafkaAdminClient(bootstrap_servers=tansu.bootstrap)
        try:
            admin.create_topics([NewTopic("after-restart", num_partitions=1, replication_factor=1)])
            assert "after-restart" in admin.list_topics()
        finally:
            admin.close()
    assert tansu.pid is None


@integration
def test_tansu_refuses_a_port_already_taken(tmp_path: Path) -> None:
    with _local_tansu(tmp_path / "first") as first:
        second = _local_tansu(tmp_path / "second", port=first.port)
        with pytest.raises(InfraError, match="already in use"):
            second.start()
        assert second.pid is None
        assert first.pid is not None


def _put_status(client: Any, key: str, body: bytes, **condition: str) -> int:
    from botocore.exceptions import ClientError

    try:
        client.put_object(Bucket="tansu", Key=key, Body=body, **condition)
    except ClientError as exc:
        return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    return 200


def _body(client: Any, key: str) -> bytes:
    return bytes(client.get_object(Bucket="tansu", Key=key)["Body"].read())


def _race(clients: list[Any], key: str, **condition: str) -> tuple[Counter[int], set[bytes]]:
    """One conditional PUT of ``key`` per client, released at once; (statuses, bodies of the winners)."""
    writers = len(clients)
    barrier = threading.Barrier(writers)
    statuses: list[int] = [0] * writers
    bodies = [f"writer {i} {uuid.uuid4().hex}".encode().ljust(64 * 1024, b".") for i in range(writers)]

    def put(i: int) -> None:
        barrier.wait()
        statuses[i] = _put_status(clients[i], key, bodies[i], **condition)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return Counter(statuses), {bodies[i] for i, status in enumerate(statuses) if status == 200}


@integration
def test_s3_server_refuses_conditional_writes_that_do_not_hold(tmp_path: Path) -> None:
    """The S3 semantics Tansu's ``s3://`` storage relies on, checked with plain S3 requests.

    A restarted Tansu creates each partition's watermark with ``If-None-Match: *`` and advances it
    with ``If-Match: <etag>``; a server that does not answer 412 when those fail lets it hand out
    offsets twice (s3rver did). Concurrent writers of one key: exactly one wins, every round. That
    outcome is what serving one request at a time guarantees (see ``_MOTO_S3_SERVER``); a server
    taking requests in parallel can still pass it by luck (moto's threaded one lost the race only
    with bodies of several MB, too slow for this test).
    """
    with _local_s3(tmp_path / "s3") as s3:
        client = s3.client()
        key = "clusters/c/topics/t/partitions/0000000000/watermark.json"
        assert _put_status(client, key, b"v1", IfNoneMatch="*") == 200
        first = client.head_object(Bucket="tansu", Key=key)["ETag"]
        assert _put_status(client, key, b"v2", IfNoneMatch="*") == 412
        assert _put_status(client, key, b"v2", IfMatch='"' + "0" * 32 + '"') == 412
        assert _body(client, key) == b"v1"
        assert _put_status(client, key, b"v2", IfMatch=first) == 200
        assert _put_status(client, key, b"v3", IfMatch=first) == 412
        assert _body(client, key) == b"v2"
        assert _put_status(client, "absent.json", b"x", IfMatch=first) in (404, 412)
        with pytest.raises(Exception, match="NoSuchKey"):
            _body(client, "absent.json")

        writers = [s3.client() for _ in range(8)]
        for n in range(3):
            key = f"race/{n}"
            statuses, winners = _race(writers, key, IfNoneMatch="*")
            assert statuses == Counter({200: 1, 412: 7}), statuses
            assert {_body(client, key)} == winners
            etag = client.head_object(Bucket="tansu", Key=key)["ETag"]
            statuses, winners = _race(writers, key, IfMatch=etag)
            assert statuses == Counter({200: 1, 412: 7}), statuses
            assert {_body(client, key)} == winners


def _produce(bootstrap: str, topic: str, values: list[bytes], partition: int | None = None) -> list[tuple[int, int]]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [producer.send(topic, value=v, partition=i % 2 if partition is None else partition)
                   for i, v in enumerate(values)]
        return [(m.partition, m.offset) for m in (f.get(timeout=60) for f in futures)]
    finally:
        producer.close(timeout=5)


@integration
def test_tansu_on_the_s3_server_keeps_offsets_when_a_produce_is_first_after_a_restart(tmp_path: Path) -> None:
    """The offset-reuse defect, reproduced the way it happened: nothing but a Produce reaches the
    partitions of a restarted Tansu. Offsets go on from where they were and every record stays;
    so do records of four producers writing one partition at once."""
    with _local_s3(tmp_path / "s3") as s3:
        tansu = TansuBroker(workdir=tmp_path / "tansu", storage=s3.storage_url, env=s3.aws_env())
        with tansu:
            admin = KafkaAdminClient(bootstrap_servers=tansu.bootstrap)
            try:
                admin.create_topics([NewTopic("t", num_partitions=2, replication_factor=1)])
            finally:
                admin.close()
            before = [f"before-{i}".encode() for i in range(20)]
            assert sorted(_produce(tansu.bootstrap, "t", before)) == [(p, o) for p in (0, 1) for o in range(10)]
            tansu.restart()  # its readiness probe asks for metadata only: no Fetch reaches the partitions
            after = [f"after-{i}".encode() for i in range(20)]
            assert sorted(_produce(tansu.bootstrap, "t", after)) == [(p, o) for p in (0, 1) for o in range(10, 20)]

            together: list[list[tuple[int, int]]] = [[] for _ in range(4)]
            batches = [[f"w{w}-{i}".encode() for i in range(100)] for w in range(4)]

            def write(w: int) -> None:
                together[w] = _produce(tansu.bootstrap, "t", batches[w], partition=0)

            threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            offsets = [o for placed in together for _, o in placed]
            assert sorted(offsets) == list(range(20, 420))

            consumer = KafkaConsumer(bootstrap_servers=tansu.bootstrap, enable_auto_commit=False,
                                     consumer_timeout_ms=5000)
            try:
                consumer.assign([TopicPartition("t", 0), TopicPartition("t", 1)])
                consumer.seek_to_beginning()
                read = Counter(m.value for m in consumer)
            finally:
                consumer.close()
            assert read == Counter(before + after + [v for b in batches for v in b])


def test_tansu_binary_is_executable() -> None:
    try:
        binary = tansu_binary()
    except MissingBinaryError as exc:
        require_infra(str(exc))
    assert binary.name == "tansu"
    assert os.access(binary, os.X_OK)


def test_docker_available_answers_quickly() -> None:
    started = time.monotonic()
    assert docker_available(timeout=1) in (True, False)
    assert time.monotonic() - started < 5


def test_require_infra_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        require_infra("no widget")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require_infra("no widget")


def test_require_infra_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no widget"):
        require_infra("no widget")
