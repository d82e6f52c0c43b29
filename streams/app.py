"""The Faust worker: hosts one batch ingestor per subsystem topic, plus health and metrics pages.

Faust provides the worker's lifecycle (signals, ordered start/stop of services, the event loop)
and its web server. The high-volume ingest path runs as a Faust service around aiokafka batch
consumers (see streams/ingest.py for the measured reason).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import mode
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas import Codec
from sinks import open_backend
from sinks.base import Backend
from yibao.settings import STREAMS, ClickHouseBackend, Settings

from . import metrics, procurement, settlement, supervision
from .base import Subsystem
from .ingest import BatchProcessor, GroupedProcessor, Ingestor
from .privacy import Pseudonymizer, Sealer, load_key
from .rules import RULES_FILE, RuleBook, check_rule, load_knowledge, load_rules_file
from .rules.engine import SettlementEngine
from .rules.grouped import GroupedEngine
from .rules.procurement import ProcurementEngine
from .rules.rulebook import follow_rules_topic
from .rules.state import Store
from .topics import RULES_TOPIC, ensure_topics
from .validation import Limits

log = structlog.get_logger(__name__)

MODULES = {"settlement": settlement, "procurement": procurement, "supervision": supervision}


class LimitsClock:
    """Validation limits that follow the wall clock, recomputed at most once a second."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._at = 0.0
        self._limits = self._compute()

    def _compute(self) -> Limits:
        return Limits.from_settings(self._settings.max_future_skew_s, self._settings.min_event_year)

    def __call__(self) -> Limits:
        now = time.monotonic()
        if now - self._at > 1.0:
            self._limits = self._compute()
            self._at = now
        return self._limits


def build_subsystems(settings: Settings) -> dict[str, Subsystem]:
    clock = LimitsClock(settings)
    return {name: MODULES[name].build(settings, clock) for name in STREAMS}


def make_backend(settings: Settings) -> Backend:
    if settings.ch_backend is ClickHouseBackend.EMBEDDED:
        return open_backend("embedded", path=settings.chdb_path, database=settings.ch_database)
    return open_backend(
        "server",
        host=settings.ch_host,
        port=settings.ch_port,
        database=settings.ch_database,
        user=settings.ch_user,
        password=settings.ch_password.get_secret_value(),
        secure=settings.ch_secure,
        verify=settings.ch_verify,
        ca_certs=str(settings.ch_ca_certs) if settings.ch_ca_certs else None,
        cluster=settings.ch_cluster,
    )


class IngestService(mode.Service):
    """Starts an ingestor per subsystem; on stop, lets each flush and commit within the deadline."""

    def __init__(self, settings: Settings, streams: tuple[str, ...] = STREAMS,
                 backend: Backend | None = None, **kw: Any) -> None:
        self.settings = settings
        self._given_backend = backend
        self.ingest_crashed = False
        self.streams = streams
        self.ingestors: dict[str, Ingestor] = {}
        self._stop_ingest = asyncio.Event()
        self._ingest_tasks: list[asyncio.Task[None]] = []
        self._ingest_backends: list[Backend] = []
        self._dl_producer: AIOKafkaProducer | None = None
        self.started_at = time.time()
        self.rulebook: RuleBook | None = None
        super().__init__(**kw)

    async def on_start(self) -> None:
        s = self.settings
        await ensure_topics(s)
        codec = Codec()
        key = load_key(
            s.pseudo_key.get_secret_value() if s.pseudo_key else None, s.pseudo_key_file, s.data_dir,
            create=True,
        )
        pseudo = Pseudonymizer(key, s.pseudo_key_id)
        sealer = Sealer(key, s.pseudo_key_id)
        subsystems = build_subsystems(s)
        self._dl_producer = AIOKafkaProducer(**s.kafka_client_kwargs(), linger_ms=20, acks="all")
        await self._dl_producer.start()
        shared: Backend | None = self._given_backend

        def backend_for() -> Backend:
            nonlocal shared
            if shared is not None or s.ch_backend is ClickHouseBackend.EMBEDDED:
                shared = shared or make_backend(s)
                backend = shared
            else:
                backend = make_backend(s)
            if backend not in self._ingest_backends and backend is not self._given_backend:
                self._ingest_backends.append(backend)
            return backend

        def consumer_factory_for(group: str) -> Callable[[], AIOKafkaConsumer]:
            def factory() -> AIOKafkaConsumer:
                return AIOKafkaConsumer(
                    **s.kafka_client_kwargs(),
                    group_id=group,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    session_timeout_ms=s.session_timeout_ms,
                    heartbeat_interval_ms=max(1000, s.session_timeout_ms // 4),
                    max_poll_interval_ms=max(300_000, int(s.sink_retry_max_seconds * 4000)),
                    max_partition_fetch_bytes=4 * 1024 * 1024,
                    fetch_max_bytes=32 * 1024 * 1024,
                )
            return factory

        def ingestor(name: str, processor: BatchProcessor | GroupedProcessor, group: str) -> Ingestor:
            return Ingestor(
                processor, backend_for(), self._dl_producer, consumer_factory_for(group), s.topic("deadletter"),
                batch_max_events=s.batch_max_events,
                batch_max_seconds=s.batch_max_seconds,
                retry_max_seconds=s.sink_retry_max_seconds,
                executor=ThreadPoolExecutor(1, thread_name_prefix=f"sink-{name}"),
                topic_of=s.topic,
                restore_kwargs=s.kafka_client_kwargs(),
            )

        self.rulebook = build_rulebook(s) if s.rules_enabled else None
        engines: dict[str, SettlementEngine | ProcurementEngine] = {}
        if self.rulebook is not None:
            knowledge = load_knowledge()
            engines["settlement"] = SettlementEngine(
                self.rulebook, knowledge, pseudo, Store("person", s.topic("changelog.person")),
                s.allowed_lateness_days)
            engines["procurement"] = ProcurementEngine(
                self.rulebook, Store("procurement", s.topic("changelog.procurement")))
        for name in self.streams:
            processor = BatchProcessor(subsystems[name], codec, pseudo, sealer, s.topic(name), build_limits(s),
                                       engine=engines.get(name))
            self.ingestors[name] = ingestor(name, processor, f"{s.consumer_group}.{name}")
        if self.rulebook is not None and "settlement" in self.streams:
            for by in ("hospital", "drg"):
                grouped = GroupedEngine(self.rulebook, Store(by, s.topic(f"changelog.{by}")), by)
                proc = GroupedProcessor(grouped, s.topic(f"internal.stays-by-{by}"), codec, pseudo, sealer)
                self.ingestors[f"rules-{by}"] = ingestor(f"rules-{by}", proc, f"{s.consumer_group}.rules-{by}")
            self._ingest_tasks.append(asyncio.create_task(
                follow_rules_topic(self.rulebook, s.topic(RULES_TOPIC), s.kafka_client_kwargs(), self._stop_ingest)))
        tune_gc()
        for ing in self.ingestors.values():
            self._ingest_tasks.append(asyncio.create_task(self._run(ing)))
        if self.rulebook is not None and s.monitor_interval_s > 0:
            self._ingest_tasks.append(asyncio.create_task(self._monitor_loop(backend_for())))
        log.info("worker started", streams=list(self.streams), backend=s.ch_backend.value)

    async def _run(self, ing: Ingestor) -> None:
        try:
            await ing.run(self._stop_ingest)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ingestor crashed; stopping the worker so it restarts clean", topic=ing.topic)
            self.ingest_crashed = True
            self._stop_ingest.set()
            os.kill(os.getpid(), signal.SIGTERM)

    async def _monitor_loop(self, backend: Backend) -> None:
        """Run the ClickHouse monitors (streams/monitors.py) every ``monitor_interval_s``, on the
        one worker that holds partition 0 of the supervision topic (:func:`runs_monitors`).

        During a rebalance two workers may briefly both run them: harmless, the alert ids are
        deterministic and each run emits only changes against the alerts table, so concurrent runs
        at worst write the same event twice, which the ReplacingMergeTree collapses. A failed run
        is logged and retried next interval.
        """
        from . import monitors

        assert self.rulebook is not None and self._dl_producer is not None
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="monitors")
        codec = Codec()
        topic = self.settings.topic("alerts")
        try:
            while not self._stop_ingest.is_set():
                try:
                    await asyncio.wait_for(self._stop_ingest.wait(), self.settings.monitor_interval_s)
                    return
                except TimeoutError:
                    pass
                if not runs_monitors(self.ingestors):
                    continue
                try:
                    rules = self.rulebook.current
                    run = await loop.run_in_executor(executor, monitors.evaluate, backend, rules)
                    futures = [await self._dl_producer.send(topic, codec.encode(monitors.ALERT_RECORD, d),
                                                            key=monitors.alert_key(d)) for d in run.emitted]
                    await asyncio.gather(*futures)
                    await loop.run_in_executor(executor, monitors.write_alerts, backend, run.emitted)
                    for d in run.emitted:
                        if d["status"] == "FIRED":
                            metrics.ALERTS.labels(d["rule_id"], d["severity"]).inc()
                    log.info("monitors ran", as_of=run.as_of, emitted=run.counts())
                except Exception:  # a monitor failure must not stop ingestion
                    log.exception("monitor run failed; retrying at the next interval")
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    async def on_stop(self) -> None:
        self._stop_ingest.set()
        if self._ingest_tasks:
            _, pending = await asyncio.wait(self._ingest_tasks, timeout=self.settings.shutdown_deadline_s)
            for t in pending:
                t.cancel()
            if pending:
                log.error("shutdown deadline passed; uncommitted events will be redelivered",
                          pending=len(pending))
        for ing in self.ingestors.values():
            ing.executor.shutdown(wait=False, cancel_futures=True)
        if self._dl_producer is not None:
            await self._dl_producer.stop()
        for b in self._ingest_backends:
            b.close()

    def ready(self) -> bool:
        return bool(self.ingestors) and all(i.ready.is_set() for i in self.ingestors.values())


def runs_monitors(ingestors: Mapping[str, Any]) -> bool:
    """Whether this worker runs the ClickHouse monitors: the one holding partition 0 of the
    supervision topic, so that N workers do not run the same queries N times. A worker without a
    supervision consumer (a deployment splitting the streams over workers) cannot tell and runs them."""
    sup = ingestors.get("supervision")
    return sup is None or 0 in sup.assigned


def tune_gc() -> None:
    """Keep the cyclic GC from rescanning every decoded event of a batch.

    A batch holds tens of thousands of dicts that never form cycles; with the default
    thresholds, collections triggered by those allocations repeatedly scan them all (measured:
    decode cost up to ~2× in a 5,000-event batch). Start-up objects are frozen out of
    collection, and the young generation is collected less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def build_rulebook(settings: Settings) -> RuleBook:
    """The seed rule base (file), to which the rules topic then applies updates."""
    return RuleBook(load_rules_file(settings.rules_file or RULES_FILE, check_rule), check_rule)


def build_limits(settings: Settings) -> LimitsClock:
    return LimitsClock(settings)


def create_app(settings: Settings, streams: tuple[str, ...] = STREAMS,
               backend: Backend | None = None) -> tuple[faust.App, IngestService]:
    """A Faust app hosting the ingest service, with /metrics, /healthz and /readyz pages."""
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.consumer_group}-worker",  # one Faust group per deployment, not one per broker
        broker=";".join(f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",")),
        broker_credentials=_faust_credentials(settings),
        broker_session_timeout=settings.session_timeout_ms / 1000,
        web_port=settings.web_port or 6066,
        web_bind="0.0.0.0",
        web_enabled=settings.web_port != 0,
        autodiscover=False,
        store="memory://",
        topic_partitions=settings.topic_partitions,
        datadir=str(settings.data_dir / "faust"),
        producer_acks=-1,
    )
    service = IngestService(settings, streams, backend)
    app.service(service)  # type: ignore[arg-type]

    @app.page("/metrics")
    async def _metrics(web: Any, request: Any) -> Any:
        # aiohttp wants the charset apart from the media type
        media_type = CONTENT_TYPE_LATEST.split(";")[0]
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=media_type)

    @app.page("/healthz")
    async def _healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "uptime_s": round(time.time() - service.started_at, 1)})

    @app.page("/readyz")
    async def _readyz(web: Any, request: Any) -> Any:
        ok = service.ready()
        body = {
            "ready": ok,
            "streams": {
                n: {"assigned": i.ready.is_set(), "events": i.stats["events"],
                    "last_flush_at": i.last_flush_at}
                for n, i in service.ingestors.items()
            },
        }
        return web.json(body, status=200 if ok else 503)

    return app, service


def _faust_credentials(settings: Settings) -> Any:
    kw = settings.kafka_client_kwargs()
    proto = settings.kafka_security_protocol.value
    if proto.startswith("SASL"):
        return faust.SASLCredentials(
            username=kw["sasl_plain_username"],
            password=kw["sasl_plain_password"],
            mechanism=kw["sasl_mechanism"],
            ssl_context=kw.get("ssl_context"),
        )
    if proto == "SSL":
        return kw["ssl_context"]
    return None
