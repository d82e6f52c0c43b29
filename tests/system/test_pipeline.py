"""End to end on the real engines: broker → ingest workers → ClickHouse (server and chDB).

Every valid event lands exactly once, every invalid one is dead-lettered (topic and table) with
the reason it was broken for, money reconciles to the fen, and a worker killed mid-run and
restarted still lands everything exactly once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from schemas import Codec
from sinks import connect
from sinks.base import Backend
from sinks.migrate import migrate
from streams.app import create_app
from streams.records import PRIMARY_TABLE
from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint
from yibao.producer import OutEvent, produce
from yibao.settings import Settings, load_settings
from yibao.sim.corrupt import corrupt
from yibao.sim.generator import SimConfig, TrafficGenerator

pytestmark = pytest.mark.integration

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
REVERSAL = "cn.nhsa.yibao.settlement.SettlementReversal"


def _settings(broker: KafkaEndpoint, kind: str, ch: ClickHouseEndpoint | None, data_dir: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    kw: dict[str, Any] = {
        "kafka_bootstrap": broker.bootstrap, "topic_prefix": f"t{tag}.", "consumer_group": f"g{tag}",
        "ch_database": f"it_{tag}", "data_dir": data_dir, "session_timeout_ms": 6000, "web_port": 0,
        "batch_max_seconds": 0.5, "pseudo_key": "ab" * 32, "ch_backend": kind,
    }
    if kind == "server":
        assert ch is not None
        kw.update(ch_host=ch.host, ch_port=ch.tcp_port, ch_user=ch.user, ch_password=ch.password)
    return load_settings(**kw)


@pytest.fixture(params=["embedded", "server"])
def env(request: pytest.FixtureRequest, broker: KafkaEndpoint, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[Settings, Backend]]:
    ch = request.getfixturevalue("clickhouse_server") if request.param == "server" else None
    # chDB allows one data path per process: the embedded tests share one path, each its own database
    data_dir = tmp_path_factory.getbasetemp() / "chdb-shared" if request.param == "embedded" else \
        tmp_path_factory.mktemp("data")
    s = _settings(broker, request.param, ch, data_dir)
    backend = connect(s.clickhouse())
    migrate(backend)
    yield s, backend
    backend.execute(f"DROP DATABASE IF EXISTS {s.ch_database}" + (" SYNC" if request.param == "embedded" else ""))
    backend.close()


def _mixed_traffic(n: int, bad_rate: float, seed: int) -> tuple[list[OutEvent], Counter[str], list[Any]]:
    codec = Codec()
    rng = random.Random(seed)
    out: list[OutEvent] = []
    reasons: Counter[str] = Counter()
    valid: list[Any] = []
    for ev in TrafficGenerator(SimConfig(seed=seed, settlements=n)).events():
        if rng.random() < bad_rate:
            bad = corrupt(codec, ev, rng)
            reasons[bad.expected_reason] += 1
            out.append(bad.event)
        else:
            out.append(OutEvent(ev.record, ev.key, ev.datum))
            valid.append(ev)
    return out, reasons, valid


def _counts(backend: Backend, tables: list[str]) -> dict[str, int]:
    return {t: int(backend.query(f"SELECT count() FROM {backend.database}.{t}").rows[0][0]) for t in tables}


async def _run_until(s: Settings, backend: Backend, expected_total: int, tables: list[str],
                     timeout: float = 120) -> dict[str, int]:
    app, _ = create_app(s.worker(), backend=backend if s.ch_backend.value == "embedded" else None)
    try:
        await app.start()
        deadline = time.monotonic() + timeout
        while True:
            c = _counts(backend, tables)
            if sum(c[t] for t in set(PRIMARY_TABLE.values())) + c["dead_letters"] >= expected_total:
                await asyncio.sleep(1.0)  # anything beyond the expected total would show up now
                return _counts(backend, tables)
            if time.monotonic() > deadline:
                pytest.fail(f"not everything landed in {timeout}s: {c}")
            await asyncio.sleep(0.25)
    finally:
        await app.stop()


async def _consume_all(s: Settings, topic: str, expected: int, timeout: float = 30) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, **s.kafka_client_kwargs(), group_id=f"check-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", session_timeout_ms=6000)
    await consumer.start()
    out: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=500)
            for records in got.values():
                out.extend(r.value for r in records)
        got = await consumer.getmany(timeout_ms=1000)  # and nothing more
        for records in got.values():
            out.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return out


def test_valid_land_once_invalid_dead_lettered(env: tuple[Settings, Backend]) -> None:
    s, backend = env
    events, expected_reasons, valid = _mixed_traffic(400, 0.08, seed=11)
    tables = sorted(set(PRIMARY_TABLE.values()) | {"fee_details", "dead_letters"})
    codec = Codec()
    stats = asyncio.run(produce(s, events, codec))
    assert stats.sent == len(events)
    counts = asyncio.run(_run_until(s, backend, len(events), tables))

    expected_rows: Counter[str] = Counter()
    for ev in valid:
        expected_rows[PRIMARY_TABLE[ev.record.rsplit(".", 1)[-1]]] += 1
    for table in set(PRIMARY_TABLE.values()):
        assert counts[table] == expected_rows[table], table
    assert counts["fee_details"] == sum(len(e.datum["fee_details"]) for e in valid if e.record == SETTLEMENT)
    assert counts["dead_letters"] == sum(expected_reasons.values())

    db = backend.database
    # every event at most once, by identity
    dup = backend.query(f"SELECT count() - uniqExact(event_id) FROM {db}.settlements").rows[0][0]
    assert dup == 0
    # each dead letter has the reason its corruption calls for
    got = Counter({r: int(n) for r, n in backend.query(
        f"SELECT reason_code, count() FROM {db}.dead_letters GROUP BY reason_code").rows})
    for alternatives, n in expected_reasons.items():
        options = alternatives.split("|")
        take = min(n, sum(got[o] for o in options))
        assert take == n, (alternatives, got)
        for o in options:
            used = min(got[o], n)
            got[o] -= used
            n -= used
    assert sum(got.values()) == 0
    # money reconciles to the fen: settlements minus reversals
    want = sum(e.datum["medfee_sumamt"] for e in valid if e.record == SETTLEMENT) - \
        sum(e.datum["medfee_sumamt"] for e in valid if e.record == REVERSAL)
    assert backend.query(f"SELECT sum(medfee_sumamt) FROM {db}.settlements").rows[0][0] == Decimal(want) / 100
    want_hifp = sum(e.datum["hifp_pay"] for e in valid if e.record == SETTLEMENT) - \
        sum(e.datum["hifp_pay"] for e in valid if e.record == REVERSAL)
    assert backend.query(f"SELECT sum(hifp_pay) FROM {db}.settlements").rows[0][0] == Decimal(want_hifp) / 100
    # the dead-letter topic carries the same dead letters, decodable by any Avro consumer
    dl_values = asyncio.run(_consume_all(s, s.topic("deadletter"), counts["dead_letters"]))
    assert len(dl_values) == counts["dead_letters"]
    decoded = [codec.decode(v, logical=False) for v in dl_values]
    assert {d.record for d in decoded} == {"cn.nhsa.yibao.pipeline.DeadLetter"}
    assert Counter(d.datum["reason_code"] for d in decoded) == Counter({r: int(n) for r, n in backend.query(
        f"SELECT reason_code, count() FROM {db}.dead_letters GROUP BY reason_code").rows})
    # no clear identifiers in any table
    psn = {e.datum["psn_no"] for e in valid if e.record == SETTLEMENT}
    hits = backend.query(f"SELECT count() FROM {db}.settlements WHERE psn_token IN "
                         f"({', '.join(repr(p) for p in list(psn)[:200])})").rows[0][0]
    assert hits == 0


@pytest.fixture()
def server_env(broker: KafkaEndpoint, clickhouse_server: ClickHouseEndpoint, tmp_path: Path
               ) -> Iterator[tuple[Settings, Backend]]:
    s = _settings(broker, "server", clickhouse_server, tmp_path / "data")
    backend = connect(s.clickhouse())
    migrate(backend)
    yield s, backend
    backend.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
    backend.close()


@pytest.mark.slow
def test_worker_killed_mid_run_lands_everything_once(server_env: tuple[Settings, Backend], tmp_path: Path) -> None:
    """SIGKILL the worker process while it is writing, restart it: exactly-once effect."""
    s, backend = server_env
    events, _, valid = _mixed_traffic(3000, 0.0, seed=5)
    asyncio.run(produce(s, events, Codec()))
    total = len(events)
    env_vars = dict(os.environ, YIBAO_KAFKA_BOOTSTRAP=s.kafka_bootstrap, YIBAO_TOPIC_PREFIX=s.topic_prefix,
                    YIBAO_CONSUMER_GROUP=s.consumer_group, YIBAO_CH_BACKEND="server",
                    YIBAO_CH_HOST=s.ch_host, YIBAO_CH_PORT=str(s.ch_port), YIBAO_CH_DATABASE=s.ch_database,
                    YIBAO_CH_USER=s.ch_user, YIBAO_CH_PASSWORD=s.ch_password.get_secret_value(),
                    YIBAO_DATA_DIR=str(s.data_dir), YIBAO_WEB_PORT="0", YIBAO_SESSION_TIMEOUT_MS="6000",
                    YIBAO_PSEUDO_KEY="ab" * 32, YIBAO_BATCH_MAX_EVENTS="500", YIBAO_BATCH_MAX_SECONDS="0.2")
    log_path = tmp_path / "worker.log"
    log = log_path.open("ab")
    tables = sorted(set(PRIMARY_TABLE.values()) | {"fee_details", "dead_letters"})

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"],
                                env=env_vars, stdout=log, stderr=subprocess.STDOUT)

    def landed() -> int:
        c = _counts(backend, tables)
        return sum(c[t] for t in set(PRIMARY_TABLE.values()))

    proc = start()
    try:
        deadline = time.monotonic() + 90
        while landed() < total // 4 and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"worker exited early:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        before_kill = landed()
        assert 0 < before_kill < total, "the kill must happen mid-run"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start()
        deadline = time.monotonic() + 120
        while landed() < total and time.monotonic() < deadline:
            time.sleep(0.25)
        time.sleep(2)  # a duplicate would show up now
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    counts = _counts(backend, tables)
    expected_rows: Counter[str] = Counter(PRIMARY_TABLE[e.record.rsplit(".", 1)[-1]] for e in valid)
    for table in set(PRIMARY_TABLE.values()):
        assert counts[table] == expected_rows[table], (table, log_path.read_text()[-2000:])
    assert counts["fee_details"] == sum(len(e.datum["fee_details"]) for e in valid if e.record == SETTLEMENT)
    assert counts["dead_letters"] == 0
    db = s.ch_database
    assert backend.query(f"SELECT count() - uniqExact(event_id) FROM {db}.settlements").rows[0][0] == 0
    want = sum(e.datum["medfee_sumamt"] for e in valid if e.record == SETTLEMENT) - \
        sum(e.datum["medfee_sumamt"] for e in valid if e.record == REVERSAL)
    assert backend.query(f"SELECT sum(medfee_sumamt) FROM {db}.settlements").rows[0][0] == Decimal(want) / 100
