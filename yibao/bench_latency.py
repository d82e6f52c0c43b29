"""Alert latency: from a settlement's produce to its alert on the alerts topic, at a steady load.

Method (one pass of ``yibao bench``, after the throughput passes, on the same broker and ClickHouse
server): fresh topics and database; worker processes with every rule on and the **default batch
settings** (``YIBAO_BATCH_MAX_EVENTS`` / ``YIBAO_BATCH_MAX_SECONDS`` as shipped, not the bench's
short linger); a history of settlements landed first, so the persons have state. Then, for
``seconds``, a producer thread sends settlements with planted anomalies at ``rate`` a second, open
loop (pre-encoded; settlement i is due at ``t0 + i / rate`` whatever happened before), noting when
each ``setl_id`` was handed to the Kafka client. A consumer of the alerts topic, started before,
notes every FIRED alert.

An alert's latency runs from the send of the last of its settlements (``setl_ids``) to the alert's
timestamp on the alerts topic (set by the worker's producer when it sent it): the settlement that
completed the pattern is the one whose arrival raised it. Alerts naming no settlement sent in the
window (a monitor's, a timer's, one of the history) are not counted. Everything shares this
machine's cores: the broker, ClickHouse, the workers and this load generator.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from schemas import Codec

from .benchkit import (
    PLANT_RATE,
    SETTLEMENT,
    BenchError,
    Progress,
    TimedProducer,
    _silent,
    land_history,
    percentile,
    stop_workers,
    worker_env,
    workers_rss_mb,
)
from .producer import OutEvent
from .settings import Settings

#: Settlements landed before the window, so the persons have history (repeat tests, shopping, ...).
HISTORY = 5_000


def traffic(n_history: int, n_steady: int, seed: int) -> tuple[list[OutEvent], list[tuple[str, OutEvent]]]:
    """History to land first, then the steady traffic as (setl_id, pre-encoded event)."""
    from .sim.generator import SimConfig
    from .sim.planters import Planting

    codec = Codec()
    gen = Planting("all", rate=PLANT_RATE).generator(SimConfig(seed=seed, settlements=n_history + n_steady, days=30))
    settlements = [e for e in gen.events() if e.record == SETTLEMENT]
    history = [OutEvent(SETTLEMENT, e.key, value=codec.encode(SETTLEMENT, e.datum)) for e in settlements[:n_history]]
    steady = [(str(e.datum["setl_id"]), OutEvent(SETTLEMENT, e.key, value=codec.encode(SETTLEMENT, e.datum)))
              for e in settlements[n_history:n_history + n_steady]]
    return history, steady


class AlertWatcher(threading.Thread):
    """Reads the alerts topic from the start until stopped: (rule_id, setl_ids, topic timestamp s,
    received s) of every FIRED alert."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True, name="bench-latency-alerts")
        self.settings = settings
        self.fired: list[tuple[str, list[str], float, float]] = []
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by the caller
            self.error = exc
        finally:
            self.ready.set()

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        codec = Codec()
        topic = self.settings.topic("alerts")
        consumer = AIOKafkaConsumer(**self.settings.kafka_client_kwargs(), enable_auto_commit=False,
                                    fetch_max_wait_ms=20, auto_offset_reset="earliest")
        await consumer.start()
        try:
            await consumer.topics()  # fetches the cluster's metadata
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                raise RuntimeError(f"the alerts topic {topic} has no partitions")
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self.ready.set()
            while not self.stop.is_set():
                got = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for records in got.values():
                    for r in records:
                        d = codec.decode(r.value).datum
                        if d.get("status") == "FIRED":
                            self.fired.append((str(d["rule_id"]), [str(x) for x in d.get("setl_ids") or ()],
                                               r.timestamp / 1000, now))
        finally:
            await consumer.stop()


def latency_pass(base: Settings, rate: float, seconds: float, processes: int, work: Path, seed: int = 13,
                 history_n: int = HISTORY, progress: Progress = _silent) -> dict[str, Any]:
    """Produce at ``rate`` settlements/s for ``seconds`` with every rule on and the default batch
    settings; the latency of the alerts they raise (module docstring)."""
    from sinks import connect
    from sinks.migrate import migrate
    from streams.topics import ensure_topics

    from .localinfra import free_port

    defaults = Settings.model_fields
    s = base.model_copy(update={
        "topic_prefix": "bench-latency.", "ch_database": "bench_latency", "rules_enabled": True,
        "consumer_group": "bench-latency", "batch_max_events": defaults["batch_max_events"].default,
        "batch_max_seconds": defaults["batch_max_seconds"].default,
    })
    progress("alert latency: generating traffic", 0, None)
    history, steady = traffic(history_n, int(rate * seconds) + 1, seed)
    backend = connect(s.clickhouse())
    migrate(backend)
    asyncio.run(ensure_topics(s.kafka()))
    log_path = work / "workers-latency.log"
    procs: list[subprocess.Popen[bytes]] = []
    watcher = AlertWatcher(s)
    try:
        with log_path.open("ab") as log:
            env = worker_env(s, rules=True)
            for _ in range(processes):
                procs.append(subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"],
                                              env=dict(env, YIBAO_WEB_PORT=str(free_port())), stdout=log,
                                              stderr=subprocess.STDOUT))
        db = s.ch_database

        def landed() -> int:
            return int(backend.query(f"SELECT count() FROM {db}.settlements").rows[0][0])

        land_history(s, backend, history, procs, log_path, "alert latency: landing the persons' history", 300,
                     progress)
        watcher.start()
        watcher.ready.wait(30)
        if watcher.error is not None:
            raise BenchError(f"reading the alerts topic failed: {watcher.error}", log_path)
        progress(f"alert latency: {rate:,.0f} settlements/s for {seconds:.0f} s", 0, None)
        producer = TimedProducer(s, steady, rate, seconds)
        t0 = time.monotonic()
        producer.start()
        producer.join(seconds + 120)
        window = time.monotonic() - t0
        if producer.error is not None:
            raise BenchError(f"the producer failed: {producer.error}", log_path)
        target = len(history) + len(producer.sent_at)
        deadline = time.monotonic() + 120
        while landed() < target and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # alerts go out before the rows land; a last look for stragglers
        rss = workers_rss_mb(procs)
        watcher.stop.set()
        watcher.join(10)
        sent = producer.sent_at
        on_topic: list[float] = []
        received: list[float] = []
        by_rule: dict[str, list[float]] = {}
        for rule_id, setl_ids, ts, got in watcher.fired:
            times = [sent[x] for x in setl_ids if x in sent]
            if times:
                on_topic.append(ts - max(times))
                received.append(got - max(times))
                by_rule.setdefault(rule_id, []).append(ts - max(times))

        def pct(xs: list[float]) -> dict[str, float | None]:
            ms = [x * 1000 for x in xs]
            return {q: None if (v := percentile(ms, p)) is None else round(v, 1)
                    for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}

        return {
            "rate_target": rate,
            "settlements_sent": len(sent),
            "sent_per_s": round(len(sent) / window, 1) if window > 0 else None,
            "producer_behind_max_s": round(producer.behind_s, 3),
            "alerts_measured": len(on_topic),
            "alerts_fired_total": len(watcher.fired),
            "latency_ms": pct(on_topic),
            "received_latency_ms": pct(received),
            "latency_ms_by_rule": {r: {"alerts": len(v), **pct(v)} for r, v in sorted(by_rule.items())},
            "batch_max_events": s.batch_max_events,
            "batch_max_seconds": s.batch_max_seconds,
            "window_s": round(window, 2),
            "worker_rss_mb": rss,
        }
    finally:
        watcher.stop.set()
        stop_workers(procs)
        backend.close()
