"""What operators rely on, against real worker processes, a real broker and ClickHouse.

- A worker answers /healthz, turns /readyz to 200 only once it has partitions, and its /metrics
  counters move by exactly what it consumed, landed, dead-lettered and wrote.
- Two workers of one deployment split the partitions and produce the same ClickHouse totals as
  one worker does alone.
- A worker that leaves mid-run (SIGTERM, or SIGKILL with uncommitted work) is taken over by the
  other with nothing lost and nothing landed twice.

The workers are started as ``yibao worker --no-migrate`` subprocesses, as operators run them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas import Codec
from sinks import connect
from sinks.base import Backend
from sinks.migrate import migrate
from streams.topics import STREAMS, ensure_topics
from yibao.demo import PRIMARY_TABLE
from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint, free_port
from yibao.producer import OutEvent, produce
from yibao.settings import Settings, load_settings
from yibao.sim.corrupt import corrupt
from yibao.sim.generator import SimConfig, TrafficGenerator

pytestmark = pytest.mark.integration

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
PRIMARY_TABLES = sorted(set(PRIMARY_TABLE.values()))
ALL_TABLES = sorted({*PRIMARY_TABLES, "fee_details", "dead_letters"})
PARTITIONS = 4


# --- traffic ------------------------------------------------------------------------------------
def mixed_traffic(n: int, bad_rate: float, seed: int) -> tuple[list[OutEvent], Counter[str], list[Any]]:
    """Simulated traffic for all three subsystems, a share of it broken on purpose.

    Returns the events to produce, the dead-letter reasons expected (``A|B`` when either is
    right) and the valid events.
    """
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


def expected_rows(valid: Sequence[Any]) -> Counter[str]:
    """Rows each table must hold once ``valid`` has landed."""
    rows: Counter[str] = Counter(PRIMARY_TABLE[e.record.rsplit(".", 1)[-1]] for e in valid)
    rows["fee_details"] = sum(len(e.datum["fee_details"]) for e in valid if e.record == SETTLEMENT)
    return rows


def table_counts(backend: Backend) -> dict[str, int]:
    return {t: int(backend.query(f"SELECT count() FROM {backend.read_table(t)}").scalar()) for t in ALL_TABLES}


def totals(backend: Backend) -> dict[str, Any]:
    """What a BI user would compare: counts, money, and a fingerprint of which event sits where."""
    out: dict[str, Any] = {}
    for t in ALL_TABLES:
        ident = "setl_id" if t == "fee_details" else "event_id"
        if t == "dead_letters":
            ident = "payload_digest"
        out[t] = backend.query(
            f"SELECT count(), sum(cityHash64({ident}, src_partition, src_offset)) FROM {backend.read_table(t)}"
        ).rows[0]
    out["money"] = backend.query(
        f"SELECT sum(medfee_sumamt), sum(hifp_pay), sum(psn_cash_pay) FROM {backend.read_table('settlements')}"
    ).rows[0]
    out["fees"] = backend.query(f"SELECT sum(det_item_fee_sumamt) FROM {backend.read_table('fee_details')}").scalar()
    return out


def wait_for(what: str, check: Callable[[], bool], timeout: float, on_timeout: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s {on_timeout()}")
        time.sleep(0.2)


# --- worker processes ---------------------------------------------------------------------------
class Worker:
    """One ``yibao worker`` process with its own metrics/health port and log file."""

    def __init__(self, s: Settings, log_dir: Path, name: str, **extra_env: str) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        env = dict(
            os.environ,
            YIBAO_KAFKA_BOOTSTRAP=s.kafka_bootstrap, YIBAO_TOPIC_PREFIX=s.topic_prefix,
            YIBAO_CONSUMER_GROUP=s.consumer_group, YIBAO_CH_BACKEND="server", YIBAO_CH_HOST=s.ch_host,
            YIBAO_CH_PORT=str(s.ch_port), YIBAO_CH_DATABASE=s.ch_database, YIBAO_CH_USER=s.ch_user,
            YIBAO_CH_PASSWORD=s.ch_password.get_secret_value(), YIBAO_DATA_DIR=str(log_dir / name),
            YIBAO_WEB_PORT=str(self.port), YIBAO_SESSION_TIMEOUT_MS=str(s.session_timeout_ms),
            YIBAO_PSEUDO_KEY=s.pseudo_key.get_secret_value() if s.pseudo_key else "",
            YIBAO_BATCH_MAX_EVENTS=str(s.batch_max_events), YIBAO_BATCH_MAX_SECONDS=str(s.batch_max_seconds),
            YIBAO_LOG_LEVEL="WARNING",
        )
        env.update(extra_env)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"], env=env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, str]:
        """HTTP status and body of one of the worker's pages; (0, '') while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (sample name, sorted labels)."""
        status, body = self.get("/metrics")
        assert status == 200, (status, body[:200])
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric_families(self) -> set[str]:
        return {f.name for f in text_string_to_metric_families(self.get("/metrics")[1])}

    def assigned(self, s: Settings) -> dict[str, float]:
        """Partitions of each subsystem topic held, from the worker's own gauge (the rule engine's
        internal topics are left out: they have their own layout)."""
        held = {dict(k[1])["topic"]: v for k, v in self.metrics().items() if k[0] == "yibao_assigned_partitions"}
        return {s.topic(name): held.get(s.topic(name), 0.0) for name in STREAMS}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        return f"\n--- {self.name} ---\n" + self.log_path.read_text(errors="replace")[-3000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


def sample(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


# --- fixtures -----------------------------------------------------------------------------------
def ops_settings(broker: KafkaEndpoint, ch: ClickHouseEndpoint, data_dir: Path, **kw: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "kafka_bootstrap": broker.bootstrap, "topic_prefix": f"o{tag}.", "consumer_group": f"g{tag}",
        "ch_backend": "server", "ch_host": ch.host, "ch_port": ch.tcp_port, "ch_user": ch.user,
        "ch_password": ch.password, "ch_database": f"ops_{tag}", "data_dir": data_dir,
        "session_timeout_ms": 6000, "web_port": 0, "batch_max_seconds": 0.3, "batch_max_events": 300,
        "pseudo_key": "ef" * 32, "topic_partitions": PARTITIONS,
    }
    base.update(kw)
    return load_settings(**base)


@pytest.fixture()
def ops(broker: KafkaEndpoint, clickhouse_server: ClickHouseEndpoint, tmp_path: Path
        ) -> Iterator[tuple[Settings, Backend, list[Worker]]]:
    """Settings with fresh topics, group and database (migrated, topics created), and a list
    the test puts its workers in: every one of them is stopped afterwards, whatever happened."""
    s = ops_settings(broker, clickhouse_server, tmp_path)
    backend = connect(s.clickhouse())
    migrate(backend)
    asyncio.run(ensure_topics(s.kafka()))
    workers: list[Worker] = []
    try:
        yield s, backend, workers
    finally:
        for w in workers:
            w.stop(signal.SIGTERM, timeout=10)  # SIGKILL after that
        for db in {s.ch_database, *(f"{s.ch_database}_{i}" for i in range(3))}:
            backend.execute(f"DROP DATABASE IF EXISTS {db}")
        backend.close()


def _with_database(s: Settings, db: str) -> tuple[Settings, Backend]:
    other = s.model_copy(update={"ch_database": db})
    backend = connect(other.clickhouse())
    migrate(backend)
    return other, backend


def _split_evenly(s: Settings, workers: Sequence[Worker]) -> bool:
    """Every worker holds partitions of every topic, and together they hold all of them."""
    try:
        held = [w.assigned(s) for w in workers]
    except AssertionError:  # a worker's web server is not up yet
        return False
    return all(
        sum(h[t] for h in held) == PARTITIONS and all(h[t] > 0 for h in held)
        for t in (s.topic(name) for name in STREAMS)
    )


def _accounted(backend: Backend) -> int:
    """Events that reached ClickHouse: primary-table rows plus dead letters."""
    c = table_counts(backend)
    return sum(c[t] for t in PRIMARY_TABLES) + c["dead_letters"]


# --- tests --------------------------------------------------------------------------------------
def test_worker_health_readiness_and_metrics_count_what_it_did(
    ops: tuple[Settings, Backend, list[Worker]], tmp_path: Path
) -> None:
    s, backend, workers = ops
    w = Worker(s, tmp_path, "w1")
    workers.append(w)
    wait_for("/healthz answers", lambda: w.get("/healthz")[0] != 0 or not w.alive(), 60, w.log_tail)
    status, body = w.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok", w.log_tail()

    # /readyz: 503 while any stream waits for its partitions, 200 (for good) once all have them
    seen: list[tuple[int, dict[str, Any]]] = []

    def ready() -> bool:
        code, text = w.get("/readyz")
        if code:
            seen.append((code, json.loads(text)))
        return code == 200

    wait_for("/readyz turns 200", ready, 60, w.log_tail)
    codes = [c for c, _ in seen]
    assert set(codes) <= {200, 503} and codes == sorted(codes, reverse=True)  # 503s, then 200
    for code, page in seen:
        assigned = [st["assigned"] for st in page["streams"].values()]
        assert page["ready"] is (code == 200) and (bool(assigned) and all(assigned)) is (code == 200), page
    assert w.get("/readyz")[0] == 200
    assert w.assigned(s) == {s.topic(name): PARTITIONS for name in STREAMS}

    events, reasons, valid = mixed_traffic(300, 0.06, seed=31)
    stats = asyncio.run(produce(s, events, Codec()))
    want = expected_rows(valid)
    wait_for("everything accounted for", lambda: _accounted(backend) >= len(events), 90, w.log_tail)
    wait_for("counters caught up", lambda: sample(w.metrics(), "yibao_events_in_total") >= len(events), 10)
    m = w.metrics()
    counts = table_counts(backend)

    for topic, n in stats.by_topic.items():
        assert sample(m, "yibao_events_in_total", topic=topic) == n, topic
        assert sample(m, "yibao_batch_events_sum", topic=topic) == n, topic
        assert sample(m, "yibao_sink_batch_seconds_count", topic=topic) >= 1, topic
    landed = Counter(e.record.rsplit(".", 1)[-1] for e in valid)
    for record, n in landed.items():
        assert sample(m, "yibao_events_landed_total", record=record) == n, record
    dead_by = {(t, r): int(n) for t, r, n in backend.query(
        f"SELECT source_topic, reason_code, count() FROM {s.ch_database}.dead_letters "
        "GROUP BY source_topic, reason_code"
    ).rows}
    assert sum(dead_by.values()) == sum(reasons.values()) > 0
    for (topic, reason), n in dead_by.items():
        assert sample(m, "yibao_dead_letters_total", topic=topic, reason=reason) == n, (topic, reason)
    assert sample(m, "yibao_dead_letters_total") == sum(reasons.values())
    for table in ALL_TABLES:
        assert counts[table] == (want[table] if table != "dead_letters" else sum(reasons.values())), table
        assert sample(m, "yibao_rows_written_total", table=table) == counts[table], table
    assert sample(m, "yibao_sink_up") == 1
    assert sample(m, "yibao_redelivered_rows_skipped_total") == 0
    # declared for the rule engine, so dashboards and alert rules can name them already
    assert {"yibao_alerts", "yibao_window_state_keys"} <= w.metric_families()
    assert w.stop() == 0, w.log_tail()


def test_two_workers_split_the_partitions_and_land_what_one_worker_lands(
    ops: tuple[Settings, Backend, list[Worker]], tmp_path: Path
) -> None:
    s, _, workers = ops
    two, two_backend = _with_database(s, f"{s.ch_database}_1")
    pair = [Worker(two, tmp_path, "a"), Worker(two, tmp_path, "b")]
    workers.extend(pair)
    wait_for("both workers hold partitions of every topic", lambda: _split_evenly(two, pair), 90,
             lambda: "".join(w.log_tail() for w in pair))

    events, reasons, valid = mixed_traffic(600, 0.03, seed=37)
    asyncio.run(produce(s, events, Codec()))
    want = expected_rows(valid)
    wait_for("two workers land everything", lambda: _accounted(two_backend) >= len(events), 90)
    time.sleep(1.0)  # a duplicate would show up now
    per_worker = [sum(sample(w.metrics(), "yibao_events_in_total", topic=two.topic(n)) for n in STREAMS) for w in pair]
    assert all(n > 0 for n in per_worker) and sum(per_worker) == len(events), per_worker
    for w in pair:
        assert w.stop() == 0, w.log_tail()

    # the same topics, read by one worker of another deployment into another database
    one, one_backend = _with_database(s.model_copy(update={"consumer_group": f"{s.consumer_group}-solo"}),
                                      f"{s.ch_database}_2")
    solo = Worker(one, tmp_path, "solo")
    workers.append(solo)
    wait_for("one worker lands everything", lambda: _accounted(one_backend) >= len(events), 90, solo.log_tail)
    time.sleep(1.0)
    assert solo.assigned(one) == {s.topic(name): PARTITIONS for name in STREAMS}
    assert solo.stop() == 0, solo.log_tail()

    together, alone = totals(two_backend), totals(one_backend)
    assert together == alone
    assert together["settlements"][0] == want["settlements"]
    assert together["fee_details"][0] == want["fee_details"]
    assert together["dead_letters"][0] == sum(reasons.values())
    two_backend.close()
    one_backend.close()


def test_monitors_run_on_the_one_worker_holding_supervision_partition_0(
    ops: tuple[Settings, Backend, list[Worker]], tmp_path: Path
) -> None:
    """With two workers, the ClickHouse monitors run in one of them (the holder of supervision
    partition 0) every YIBAO_MONITOR_INTERVAL_S, and their alerts land in the alerts table."""
    from yibao.sim.planters import Planting

    s, backend, workers = ops
    pair = [Worker(s, tmp_path, name, YIBAO_MONITOR_INTERVAL_S="1", YIBAO_LOG_LEVEL="INFO") for name in "ab"]
    workers.extend(pair)
    wait_for("both workers hold partitions of every topic", lambda: _split_evenly(s, pair), 90,
             lambda: "".join(w.log_tail() for w in pair))
    marks = [w.log_path.stat().st_size for w in pair]
    planting = Planting(["YB-FUND-CAPACITY"], rates={"YB-FUND-CAPACITY": 0.5})
    events = [OutEvent(e.record, e.key, e.datum) for e in planting.generator(SimConfig(seed=11, settlements=1500,
                                                                                    days=40)).events()]
    refs = {r for t in planting.truth() for r in t["refs"]}
    assert refs
    asyncio.run(produce(s, events, Codec()))
    wait_for("everything landed", lambda: _accounted(backend) >= len(events), 90)

    def fired() -> set[str]:
        rows = backend.query(f"SELECT alert_id, argMax(status, detected_at) FROM {backend.read_table('alerts')} "
                             "WHERE rule_id = 'YB-FUND-CAPACITY' GROUP BY alert_id").rows
        return {str(a) for a, status in rows if status == "FIRED"}

    wait_for("the monitors' alerts landed", lambda: bool(fired()), 60, lambda: "".join(w.log_tail() for w in pair))
    time.sleep(2.5)  # a few more intervals
    assert fired() <= refs
    runs = [w.log_path.read_bytes()[m:].count(b"monitors ran") for w, m in zip(pair, marks, strict=True)]
    assert sorted(runs)[0] == 0 and sorted(runs)[1] >= 2, runs


def _produce_in_background(s: Settings, chunks: list[list[OutEvent]], pause: float) -> threading.Thread:
    def run() -> None:
        for chunk in chunks:
            asyncio.run(produce(s, chunk, Codec()))
            time.sleep(pause)

    t = threading.Thread(target=run, name="producer", daemon=True)
    t.start()
    return t


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_worker_leaving_mid_run_is_taken_over_without_loss_or_duplicates(
    ops: tuple[Settings, Backend, list[Worker]], tmp_path: Path, sig: int
) -> None:
    s, backend, workers = ops
    pair = [Worker(s, tmp_path, "leaver"), Worker(s, tmp_path, "survivor")]
    workers.extend(pair)
    leaver, survivor = pair
    wait_for("both workers hold partitions", lambda: _split_evenly(s, pair), 90,
             lambda: "".join(w.log_tail() for w in pair))

    events, _, valid = mixed_traffic(1500, 0.0, seed=41)
    want = expected_rows(valid)
    step = len(events) // 6
    chunks = [events[i:i + step] for i in range(0, len(events), step)]
    asyncio.run(produce(s, chunks[0], Codec()))
    wait_for("the leaver is working",
             lambda: sample(leaver.metrics(), "yibao_events_in_total", topic=s.topic("settlement")) > 0, 60,
             leaver.log_tail)
    producer = _produce_in_background(s, chunks[1:], pause=0.3)
    time.sleep(0.5)  # traffic is flowing: the leaver is mid-run
    leaver.proc.send_signal(sig)
    leaver.proc.wait(40)
    if sig == signal.SIGTERM:
        assert leaver.proc.returncode == 0, leaver.log_tail()
    producer.join(120)
    assert not producer.is_alive()

    def all_landed() -> bool:
        c = table_counts(backend)
        return all(c[t] >= want[t] for t in (*PRIMARY_TABLES, "fee_details"))

    wait_for("the survivor lands everything", all_landed, 120, survivor.log_tail)
    time.sleep(1.5)  # a duplicate would show up now
    counts = table_counts(backend)
    for table in (*PRIMARY_TABLES, "fee_details"):
        assert counts[table] == want[table], (table, counts, survivor.log_tail())
    assert counts["dead_letters"] == 0
    db = s.ch_database
    for table in PRIMARY_TABLES:
        assert backend.query(f"SELECT count() - uniqExact(event_id) FROM {db}.{table}").scalar() == 0, table
    want_fees = sum(line["det_item_fee_sumamt"] for e in valid if e.record == SETTLEMENT
                    for line in e.datum["fee_details"])
    assert backend.query(f"SELECT sum(det_item_fee_sumamt) FROM {db}.fee_details").scalar() * 100 == want_fees
    assert survivor.assigned(s) == {s.topic(name): PARTITIONS for name in STREAMS}
    assert survivor.alive(), survivor.log_tail()
