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
from faust.app.base import BootStrategy
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas import Codec
from schemas.columnar_decode import ArrowDecoder
from sinks import connect
from sinks.base import Backend

from . import metrics
from .config import KafkaConfig, WorkerConfig
from .ingest import PRECHECK_SLICE, Ingestor
from .messages import framed_headers
from .precheck import Owners, Prechecker, PrecheckLog, PrecheckServer, forward_key, strategies
from .privacy import Pseudonymizer, Sealer, load_key
from .processors import COLUMNAR_MIN_EVENTS, BatchProcessor, GroupedProcessor
from .rules import RuleBook
from .rules.rulebook import follow_rules_topic
from .topics import RULES_TOPIC, STREAMS, ensure_topics
from .topology import build_pipeline

log = structlog.get_logger(__name__)


#: The batch age of the re-keyed stay streams, at most: their alerts (the hospital-month rules) have
#: already waited for the settlement batch that emitted the stay, so a second full batch age put them
#: at the top of the alert latency (p50 1.7 s, p99 2.5 s against 0.9 s and 1.5 s for the others, at
#: half the all-rules rate). Stays are a tenth of the settlements and their batches small.
REKEYED_BATCH_MAX_SECONDS = 0.25
#: Bytes of one record batch of the worker's producer (aiokafka's default: 16 KB). A batch's changelog
#: is thousands of records per partition; in 16 KB batches each became a produce request of its own,
#: one in flight per partition: measured against Tansu, 22 µs of the worker and 12 µs of the broker
#: per record, against 6–8 and 3 µs with 512 KB. Half of the 1 MB a Kafka broker takes in one batch
#: by default (``message.max.bytes``); a single larger message still goes alone (MESSAGE_BUDGET).
PRODUCER_BATCH_BYTES = 512 * 1024


def _takes_columnar(ing: Ingestor) -> bool:
    """Whether ``ing`` hands its processor batches the columnar path takes: a processor with records it
    covers, fed whole batches or slices of at least ``COLUMNAR_MIN_EVENTS`` (the pre-settlement check's
    slices of 32 never are)."""
    proc = ing.processor
    return (isinstance(proc, BatchProcessor) and bool(proc.columnar_records)
            and (not ing.process_slice or ing.process_slice >= COLUMNAR_MIN_EVENTS))


class IngestService(mode.Service):
    """Starts an ingestor per subsystem; on stop, lets each flush and commit within the deadline."""

    def __init__(self, config: WorkerConfig, streams: tuple[str, ...] = STREAMS,
                 backend: Backend | None = None, **kw: Any) -> None:
        self.config = config
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
        self.owners = Owners()
        self.precheck: PrecheckServer | None = None
        self._decoder: ArrowDecoder | None = None
        super().__init__(**kw)

    async def on_start(self) -> None:
        c = self.config
        kafka = c.kafka
        codec = worker_codec(c)
        # what can fail on local settings (the key here, the rule base in build_pipeline) before any topic is made
        key = load_key(c.privacy.key, c.privacy.key_file, c.data_dir, create=True)
        pseudo = Pseudonymizer(key, c.privacy.key_id)
        sealer = Sealer(key, c.privacy.key_id)
        self._decoder = ArrowDecoder() if c.columnar else None
        pipeline = build_pipeline(validation=c.validation, rules=c.rules, topic=kafka.topic, codec=codec,
                                  pseudonymizer=pseudo, sealer=sealer, streams=self.streams, decoder=self._decoder)
        await ensure_topics(kafka)
        self._dl_producer = AIOKafkaProducer(**kafka.client_kwargs(), linger_ms=20, acks="all",
                                             max_batch_size=PRODUCER_BATCH_BYTES)
        await self._dl_producer.start()
        shared: Backend | None = self._given_backend

        def backend_for() -> Backend:
            nonlocal shared
            if shared is not None or c.clickhouse.backend == "embedded":
                shared = shared or connect(c.clickhouse)
                backend = shared
            else:
                backend = connect(c.clickhouse)
            if backend not in self._ingest_backends and backend is not self._given_backend:
                self._ingest_backends.append(backend)
            return backend

        def consumer_factory_for(group: str, assignors: tuple[Any, ...] | None = None
                                 ) -> Callable[[], AIOKafkaConsumer]:
            more = {"partition_assignment_strategy": assignors} if assignors else {}

            def factory() -> AIOKafkaConsumer:
                return AIOKafkaConsumer(
                    **kafka.client_kwargs(),
                    **more,
                    group_id=group,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    session_timeout_ms=kafka.session_timeout_ms,
                    heartbeat_interval_ms=max(1000, kafka.session_timeout_ms // 4),
                    max_poll_interval_ms=max(300_000, int(c.sink_retry_max_seconds * 4000)),
                    max_partition_fetch_bytes=4 * 1024 * 1024,
                    fetch_max_bytes=32 * 1024 * 1024,
                    # Tansu holds a fetch towards its max wait even with data there (measured: 500 ms
                    # gave 127 ms p50 delivery, 100 ms gave 14 ms); alerts wait for the fetch
                    fetch_max_wait_ms=100,
                )
            return factory

        # the settlement group's assignment also tells every member who holds which partition, so a
        # pre-settlement check reaching the wrong worker is forwarded to the holder (streams/precheck)
        routed = strategies(c.precheck.advertised_url, self.owners) if c.precheck is not None else None

        def ingestor(name: str, processor: BatchProcessor | GroupedProcessor) -> Ingestor:
            rekeyed = isinstance(processor, GroupedProcessor)
            return Ingestor(
                processor, backend_for(), self._dl_producer,
                consumer_factory_for(f"{kafka.consumer_group}.{name}", routed if name == "settlement" else None),
                kafka.topic("deadletter"),
                batch_max_events=c.batch_max_events,
                batch_max_seconds=min(c.batch_max_seconds, REKEYED_BATCH_MAX_SECONDS) if rekeyed
                else c.batch_max_seconds,
                retry_max_seconds=c.sink_retry_max_seconds,
                executor=ThreadPoolExecutor(1, thread_name_prefix=f"sink-{name}"),
                topic_of=kafka.topic,
                restore_kwargs=kafka.client_kwargs(),
                process_slice=PRECHECK_SLICE if c.precheck is not None and name == "settlement" else 0,
            )

        self.rulebook = pipeline.rulebook
        for stage in pipeline.stages.values():
            self.ingestors[stage.name] = ingestor(stage.name, stage.processor)
        if self.rulebook is not None and pipeline.routes:
            self._ingest_tasks.append(asyncio.create_task(
                follow_rules_topic(self.rulebook, kafka.topic(RULES_TOPIC), kafka.client_kwargs(), self._stop_ingest)))
        await self._probe_sink()
        if c.precheck is not None:
            await self._start_precheck(pipeline.stages["settlement"].processor, key, pseudo, backend_for())
        tune_gc()
        if self._decoder is not None and any(_takes_columnar(ing) for ing in self.ingestors.values()):
            # the helper imports its libraries (about a second of CPU) while the groups join, which
            # leaves the CPU idle for seconds; started by the first big batch instead, it made that
            # batch take the record path: a fifth of a 50,000-event backlog, at three times the cost
            self._decoder.poll_ready()
        for ing in self.ingestors.values():
            self._ingest_tasks.append(asyncio.create_task(self._run(ing)))
        if self.rulebook is not None and c.rules.monitor_interval_s > 0:
            self._ingest_tasks.append(asyncio.create_task(self._monitor_loop(backend_for())))
        log.info("worker started", streams=list(self.streams), backend=c.clickhouse.backend)

    async def _probe_sink(self) -> None:
        """Set ``yibao_sink_up`` from a probe of ClickHouse now, so that it says from the start whether
        this worker can reach ClickHouse; each write (or failed write) updates it from then on
        (streams/ingest.py). Without it an idle or spare worker showed 0 until its first write."""
        backend = next(iter(self._ingest_backends), None) or self._given_backend
        if backend is None:
            return
        up = await asyncio.get_running_loop().run_in_executor(None, backend.reachable)
        metrics.SINK_UP.set(1 if up else 0)
        if not up:
            log.warning("ClickHouse does not answer at start-up; writes will back off until it does",
                        address=getattr(backend, "address", backend.name))

    async def _start_precheck(self, processor: BatchProcessor | GroupedProcessor, key: bytes, pseudo: Pseudonymizer,
                              backend: Backend) -> None:
        """Serve the pre-settlement check from the settlement ingestor's processor and state."""
        from .rules.engine import SettlementEngine

        c = self.config
        assert c.precheck is not None
        engine = getattr(processor, "engine", None)
        if not isinstance(processor, BatchProcessor) or not isinstance(engine, SettlementEngine):
            raise RuntimeError("the pre-settlement check needs the settlement stream with its rules")
        ing = self.ingestors["settlement"]
        plog = PrecheckLog(backend, pseudo.token)
        self.precheck = PrecheckServer(c.precheck, Prechecker(processor.codec, processor, engine), IngestorHolder(ing),
                                       self.owners, ing.topic, forward_key(key), plog)
        await self.precheck.start()
        self._ingest_tasks.append(asyncio.create_task(plog.run(self._stop_ingest)))
        self._ingest_tasks.append(asyncio.create_task(short_gc_pauses(self._stop_ingest)))

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
        topic = self.config.kafka.topic("alerts")
        try:
            while not self._stop_ingest.is_set():
                try:
                    await asyncio.wait_for(self._stop_ingest.wait(), self.config.rules.monitor_interval_s)
                    return
                except TimeoutError:
                    pass
                if not runs_monitors(self.ingestors):
                    continue
                try:
                    rules = self.rulebook.current
                    run = await loop.run_in_executor(executor, monitors.evaluate, backend, rules)
                    futures = []
                    for d in run.emitted:
                        value = codec.encode(monitors.ALERT_RECORD, d)
                        futures.append(await self._dl_producer.send(
                            topic, value, key=monitors.alert_key(d),
                            headers=framed_headers(codec.subject_of(monitors.ALERT_RECORD), value)))
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
        if self.precheck is not None:
            await self.precheck.stop()
        if self._ingest_tasks:
            _, pending = await asyncio.wait(self._ingest_tasks, timeout=self.config.shutdown_deadline_s)
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
        if self._decoder is not None:
            self._decoder.close()

    def ready(self) -> bool:
        return bool(self.ingestors) and all(i.ready.is_set() for i in self.ingestors.values())


class IngestorHolder:
    """The settlement ingestor as the pre-settlement check sees it (streams.precheck.server.Holder)."""

    def __init__(self, ing: Ingestor) -> None:
        self.ing = ing

    def owns(self, partition: int) -> bool:
        return partition in self.ing.assigned

    def restoring(self, partition: int) -> bool:
        return partition in self.ing.restoring

    def partitions(self) -> int:
        consumer = self.ing.consumer
        parts = consumer.partitions_for_topic(self.ing.topic) if consumer is not None else None
        return len(parts) if parts else 0


def worker_codec(config: WorkerConfig) -> Codec:
    """The ingestors' codec: with the shop's Schema Registry when one is configured, so that events its
    producers framed with ids they registered themselves are decoded into the known contracts
    (schemas.codec.Codec). Its lookups block the event loop, once per new id (timeout: the
    registry's), as confluent-kafka's deserializer blocks its caller."""
    if config.schema_registry is None:
        return Codec()
    from schemas.registry_client import SchemaRegistryClient, schema_resolver

    return Codec(resolver=schema_resolver(SchemaRegistryClient(config.schema_registry)))


#: How often :func:`short_gc_pauses` lets the cyclic GC look at everything (one long pause).
FULL_GC_S = 900.0


async def short_gc_pauses(stopping: asyncio.Event, every_s: float = 1.0) -> None:
    """Keep the cyclic GC's pauses short while the worker answers pre-settlement checks.

    The rule state (hundreds of thousands of small dicts) is long-lived, so each full collection
    scanned all of it: 320 ms measured under `yibao bench --precheck`, a check waiting behind it.
    Every second, what is alive is moved out of the GC's generations (``gc.freeze``: O(1)); the state
    is acyclic and freed by reference counting when replaced, so the GC has nothing to find there.
    Every :data:`FULL_GC_S` everything is collected once, so that cycles made by long-lived objects
    (connections, tasks) are not kept for good: one long pause per quarter hour, logged.
    """
    last_full = time.monotonic()
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), every_s)
            return
        except TimeoutError:
            pass
        if time.monotonic() - last_full > FULL_GC_S:
            gc.unfreeze()
            t0 = time.perf_counter()
            found = gc.collect()
            last_full = time.monotonic()
            log.info("full garbage collection", ms=round((time.perf_counter() - t0) * 1000, 1), found=found)
        gc.freeze()


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


def create_app(config: WorkerConfig, streams: tuple[str, ...] = STREAMS,
               backend: Backend | None = None) -> tuple[faust.App, IngestService]:
    """A Faust app hosting the ingest service, with /metrics, /healthz and /readyz pages."""
    kafka = config.kafka
    (config.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{kafka.consumer_group}-worker",  # one Faust group per deployment, not one per broker
        broker=";".join(f"kafka://{b.strip()}" for b in str(kafka.client["bootstrap_servers"]).split(",")),
        broker_credentials=_faust_credentials(kafka),
        broker_session_timeout=kafka.session_timeout_ms / 1000,
        web_port=config.web_port or 6066,
        web_bind="0.0.0.0",
        web_enabled=config.web_port != 0,
        autodiscover=False,
        store="memory://",
        topic_partitions=kafka.partitions,
        datadir=str(config.data_dir / "faust"),
        producer_acks=-1,
    )
    service = IngestService(config, streams, backend)
    app.service(service)  # type: ignore[arg-type]
    # Faust hosts the lifecycle and the web pages only: the ingestors, the rule follower and the
    # check bring their own clients. Its own consumer joined a group of its own for nothing, which
    # cost seconds of every start and a member in every rebalance (docs/design.md).
    app.boot_strategy = BootStrategy(app, enable_kafka=False)

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


def _faust_credentials(kafka: KafkaConfig) -> Any:
    kw = kafka.client
    proto = str(kw.get("security_protocol", "PLAINTEXT"))
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
