"""Batch ingestion of one subsystem topic into ClickHouse, with exactly-once effect.

Why batches and not a Faust per-event agent: measured on these 2-core machines, Faust's per-event
stream machinery alone tops out near 5,000 events/s with an empty agent body (``take_events``),
while aiokafka's ``getmany`` delivers ~110,000 messages/s. Decoding (~100 µs per settlement) and
ClickHouse encoding already fill the budget, so the hot path consumes batches directly and the
Faust app hosts it (see streams/app.py and docs/design.md).

Delivery: offsets are committed only after a batch is durable (dead letters produced, rows
inserted). After a crash or rebalance, the uncommitted tail is redelivered; before inserting it,
each table is asked which of those source offsets it already holds (rows carry ``src_partition``
and ``src_offset``), and those rows are not inserted again. The state table is in docs/design.md.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from sinks.base import Backend, SinkError, SinkUnavailable
from sinks.landed import alert_versions_held, existing_rows, without_existing

from . import metrics
from .base import Columns
from .checkpoint import Checkpoint
from .landed import LandedIndex
from .messages import ALERTS_TABLE, DEAD_LETTER_TABLE, REPLAY_HEADER, EmitTooLarge, Message, Outcome
from .privacy import safe_error, scrub
from .processors import Processor
from .rules.state import Store, restore

log = structlog.get_logger(__name__)
T = TypeVar("T")


#: How often a worker backing off from an unavailable ClickHouse probes it: it resumes within
#: about this long of the server coming back, whatever the back-off has grown to.
PROBE_INTERVAL_S = 0.25

#: Parts a failing batch is split into, recursively, to find the message that fails it: with
#: 5,000 events, four rounds of at most eight flushes each, instead of thirteen rounds of two
#: (each round restores the rule state of the batch's partitions from the changelog once).
SPLIT_WAYS = 8
#: Events processed at a time, when the worker serves pre-settlement checks, before the event loop
#: gets its turns: a batch of a thousand settlements is about 270 ms of CPU with every rule on, and a
#: check waiting behind it would take that long; 32 are about 9 ms. The batch still lands and commits
#: whole. Measured with `yibao bench --precheck` (200 checks/s while ingesting 1,000 settlements/s):
#: p99 220-290 ms unsliced, 55-90 ms by 128 or 64, about 20 ms by 32; 16 was no better.
PRECHECK_SLICE = 32
#: Turns the event loop gets between two slices: an HTTP request takes a few (read it, run its
#: handler, write the answer), so one turn per slice made it wait several slices (p99 ~200 ms).
LOOP_TURNS = 4


def message_failure(exc: BaseException) -> str | None:
    """The dead-letter reason when ``exc`` may be caused by one message of the batch, else None
    (a broker or network problem: not the data's fault, so nothing is quarantined for it).

    Deterministic failures are: any exception out of the pure processing (decode, validate,
    rows, rules: a defect an input triggers), a message too large to send, and ClickHouse
    refusing the values of the rows (``SinkError.about_data``). ClickHouse refusing anything
    else (a table or column missing, no rights) concerns every event alike: nothing is
    quarantined for it, the worker stops as before; ``SinkUnavailable`` is retried earlier.
    """
    if isinstance(exc, EmitTooLarge | MessageSizeTooLargeError):
        return "EMIT_TOO_LARGE"
    if isinstance(exc, SinkError):
        return "REJECTED_BY_SINK" if exc.about_data and not isinstance(exc, SinkUnavailable) else None
    if isinstance(exc, ProcessingFailed):
        return "UNPROCESSABLE"
    return None


class ProcessingFailed(Exception):
    """An exception out of a processor's ``process``: raised around it so the ingestor can tell
    a defect that an input triggers from a broker or network failure."""


def describe(exc: BaseException) -> str:
    """One line for logs and dead letters that cannot quote the data (:func:`safe_error`): what
    failed and where; ClickHouse's own message is left out, as it quotes the values it refused."""
    if isinstance(exc, EmitTooLarge):
        return str(exc)
    if isinstance(exc, SinkError):
        return f"ClickHouse refused the rows (error code {exc.code}; its message quotes the data, so it is not kept)"
    if isinstance(exc, ProcessingFailed) and exc.__cause__ is not None:
        return safe_error(exc.__cause__)
    return safe_error(exc)


class Ingestor(ConsumerRebalanceListener):  # type: ignore[misc]
    """Consumes one subsystem topic in batches and makes each batch durable before committing."""

    def __init__(
        self,
        processor: Processor,
        backend: Backend,
        producer: AIOKafkaProducer,
        consumer_factory: Callable[[], AIOKafkaConsumer],
        deadletter_topic: str,
        *,
        batch_max_events: int,
        batch_max_seconds: float,
        retry_max_seconds: float,
        executor: ThreadPoolExecutor | None = None,
        topic_of: Callable[[str], str] = lambda stream: stream,
        restore_kwargs: dict[str, Any] | None = None,
        process_slice: int = 0,
    ) -> None:
        self.processor = processor
        #: process a batch this many events at a time, letting the event loop run in between (0: whole)
        self.process_slice = process_slice
        self.topic_of = topic_of
        self.restore_kwargs = restore_kwargs or {}
        self.topic = processor.topic
        self.backend = backend
        self.producer = producer
        self._consumer_factory = consumer_factory
        self.consumer: AIOKafkaConsumer | None = None
        self.dl_topic = deadletter_topic
        self.batch_max_events = batch_max_events
        self.batch_max_seconds = batch_max_seconds
        self.retry_max_seconds = retry_max_seconds
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"sink-{self.topic}")
        self.landed_index = LandedIndex()
        self._pending: list[Message] = []
        #: per partition, the offset of the first pending message: the oldest event not yet durable
        self._first_pending: dict[int, int] = {}
        self._pending_since = 0.0
        self._needs_check: set[int] = set()
        self._tables = list(processor.tables)
        self.ready = asyncio.Event()
        #: clear while an assignment restores state: aiokafka's fetcher may already hand out records
        #: of the new partitions, and applying them before the restore would be overwritten by it
        self._restored = asyncio.Event()
        self._restored.set()
        self.stats: Counter[str] = Counter()
        self.last_flush_at = 0.0
        #: partitions of ``topic`` this consumer holds now (the group gives each to one member)
        self.assigned: set[int] = set()
        #: partitions whose state is being read back (after an assignment or a failed batch): what a
        #: pre-settlement check would see of them now is not their state
        self.restoring: set[int] = set()
        #: held by a flush and by a revocation: a partition's state is never dropped while a batch that
        #: touches it is being processed (sliced, it yields to the event loop) or made durable
        self._flush_lock = asyncio.Lock()
        self._fetched_any = False
        self.checkpoint = Checkpoint(self.topic, processor.codec, producer, self._insert, self._commit,
                                     processor.stores, deadletter_topic, topic_of)

    # --- rebalance listener ---------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        gone = [tp.partition for tp in revoked if tp.topic == self.topic]
        async with self._flush_lock:  # a batch in flight finishes first (the rebalance waits for it)
            self.assigned.difference_update(gone)
            for p in gone:
                metrics.CONSUMER_LAG.remove(self.topic, str(p))
            if self._pending:
                await self._flush_pending()
            self.processor.forget(gone)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        parts = [tp.partition for tp in assigned if tp.topic == self.topic]
        self.restoring.update(parts)
        self.assigned = set(parts)
        self._needs_check = set(parts)
        for p in parts:
            self.landed_index.forget(p)
        self._restored.clear()
        try:
            await self._restore_state(parts)
        finally:
            self._restored.set()
        metrics.ASSIGNED_PARTITIONS.labels(self.topic).set(len(parts))
        self.ready.set()

    async def _restore_state(self, parts: list[int]) -> None:
        """Rule state of ``parts`` as the changelog has it (what completed batches wrote)."""
        self.restoring.update(parts)
        try:
            await self._restore_stores(parts)
        finally:
            self.restoring.difference_update(parts)

    async def _restore_stores(self, parts: list[int]) -> None:
        """Every store of the processor, side by side (each reads its own changelog topic: a worker's
        start-up waited for them one after the other)."""
        async def one(store: Store) -> None:
            try:
                await restore(store, parts, self.producer, self.restore_kwargs)
            except Exception as exc:
                # landing the events matters more than rule state: ingestion goes on, loudly
                metrics.STATE_RESTORE_FAILURES.labels(store.name).inc()
                store.forget(parts)
                log.error("state not restored: rules on these partitions start from empty state "
                          "(windows opened before now are forgotten)", store=store.name, partitions=parts,
                          error=f"{type(exc).__name__}: {scrub(str(exc))[:300]}")

        await asyncio.gather(*(one(store) for store in self.processor.stores))
        for p in parts:
            self.processor.restored(p)

    # --- main loop ------------------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event) -> None:
        consumer = self._consumer_factory()
        self.consumer = consumer
        consumer.subscribe([self.topic], listener=self)
        await consumer.start()
        log.info("ingest started", topic=self.topic)
        try:
            while not stopping.is_set():
                wait_ms = max(1, int(self.batch_max_seconds * 1000 / 4))
                if self._pending:  # wake when the batch comes of age, not up to a quarter linger later
                    due = self._pending_since + self.batch_max_seconds - time.monotonic()
                    wait_ms = max(1, min(wait_ms, math.ceil(due * 1000)))
                room = self.batch_max_events - len(self._pending)
                got = await consumer.getmany(timeout_ms=wait_ms, max_records=max(1, room))
                now = time.monotonic()
                self._gather(got, now, consumer.highwater)
                if self._pending and (
                    len(self._pending) >= self.batch_max_events
                    or now - self._pending_since >= self.batch_max_seconds
                ):
                    await self.flush()
                await self._observe_lag(consumer)
            if self._pending:
                await self.flush()
        finally:
            await consumer.stop()
            log.info("ingest stopped", topic=self.topic, **dict(self.stats))

    def _gather(self, got: Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]], now: float,
                highwater: Callable[[TopicPartition], int | None] | None = None) -> None:
        """Add what a fetch handed out to the pending batch.

        While the worker keeps up, the batch's age (what ``batch_max_seconds`` bounds) runs from when
        its oldest event entered Kafka (the record timestamp, clamped to ``[now - batch_max_seconds,
        now]``), not from when this loop picked it up: events that arrived while the previous batch
        was being made durable have already waited that long, and counting from the pick-up added
        the previous flush to their alerts' latency (measured: p99 2.5 s at 1 s of linger, 1.25 s
        now). Behind by a whole batch or more on a partition (``highwater``), a batch fills up
        as before: old events would otherwise flush at once in small batches, and a worker catching
        up needs its largest (measured: about 15 % less throughput with every rule on).
        """
        wall = time.time()
        for tp, records in got.items():
            if not records:
                continue
            if not self._fetched_any:
                self._fetched_any = True
                age = metrics.process_age_s()
                if age is not None:
                    metrics.FIRST_FETCH.labels(self.topic).set(round(age, 3))
            waited = 0.0
            end = highwater(tp) if highwater is not None else None
            if end is not None and end - records[-1].offset - 1 < self.batch_max_events:
                waited = min(self.batch_max_seconds, max(0.0, wall - records[0].timestamp / 1000))
            if not self._pending:
                self._pending_since = now - waited
            else:
                self._pending_since = min(self._pending_since, now - waited)
            self._first_pending.setdefault(records[0].partition, records[0].offset)
            self._pending.extend(
                Message(r.partition, r.offset, r.key, r.value,
                        bool(r.headers) and any(h[0] == REPLAY_HEADER for h in r.headers))
                for r in records
            )

    async def _observe_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Set ``yibao_consumer_lag`` of every partition held: events not yet landed.

        The end of the log is the high watermark of the partition's latest *fetch* response, never
        ListOffsets(latest): Tansu 0.6.0 answers ListOffsets with the base offset of the last batch
        + 1, short of the log end by the rest of that batch (measured: 742 for a log of 755), so
        lag from end offsets (kafka-consumer-groups, Burrow, ``end_offsets``) goes negative there;
        its fetch high watermark was exact in every measurement (docs/operations.md). Lag counts
        from the oldest event fetched but not yet committed, so a batch being gathered or retried
        is behind, as it is. Clamped at 0 in case a broker's high watermark ever trails what it
        served. Fetching is paused during a ClickHouse outage, so the gauge holds its last value
        then (``yibao_sink_up`` says why).
        """
        ends = {tp: hw for tp in consumer.assignment() if (hw := consumer.highwater(tp)) is not None}
        for tp, end in ends.items():
            start = self._first_pending.get(tp.partition)
            if start is None:
                try:
                    start = await consumer.position(tp)
                except IllegalStateError:  # revoked meanwhile
                    continue
            metrics.CONSUMER_LAG.labels(self.topic, str(tp.partition)).set(max(0, end - start))

    async def flush(self) -> None:
        """Make the pending batch durable (dead letters, rows), then commit its offsets."""
        async with self._flush_lock:
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        await self._restored.wait()
        batch, self._pending = self._pending, []
        self._first_pending = {}
        if batch:
            await self._flush_isolating(batch)

    async def _flush_isolating(self, batch: list[Message]) -> bool:
        """Flush ``batch``; when a message in it makes the batch fail, find that message and
        quarantine it, so the partition moves on. Returns whether the batch landed as it was.

        A failure that depends on the message (:func:`message_failure`) is retried in up to
        :data:`SPLIT_WAYS` parts, recursively, after undoing in memory what the failed attempt
        applied (:meth:`_roll_back`); a single message that still fails becomes a dead letter
        with the reason (:meth:`_quarantine`). Parts are flushed in order, so each partition's
        events are still applied, and their offsets committed, in offset order.
        """
        try:
            await self._flush_batch(batch)
            return True
        except Exception as exc:
            reason = message_failure(exc)
            if reason is None:
                raise
            metrics.BATCHES_SPLIT.labels(self.topic, reason).inc()
            log.error("a batch failed; isolating the message that fails it", topic=self.topic, events=len(batch),
                      reason=reason, error=describe(exc),
                      first=f"{batch[0].partition}/{batch[0].offset}", last=f"{batch[-1].partition}/{batch[-1].offset}")
            await self._roll_back(batch)
            if len(batch) == 1:
                await self._quarantine(batch[0], reason, exc)
                return False
            size = -(-len(batch) // SPLIT_WAYS)
            for i in range(0, len(batch), size):
                await self._flush_isolating(batch[i:i + size])
            return False

    async def _flush_batch(self, batch: list[Message]) -> None:
        """Process ``batch`` (knowing what of it already landed) and commit it (streams.checkpoint)."""
        await self._load_landed(batch)
        already = self.landed_index if self.landed_index.active() else None
        try:
            out = await self._process(batch, already)
        except Exception as exc:
            raise ProcessingFailed(f"{self.topic}: processing a batch of {len(batch)} raised") from exc
        t0 = time.perf_counter()
        await self.checkpoint.commit(batch, out)
        metrics.SINK_SECONDS.labels(self.topic).observe(time.perf_counter() - t0)
        self._account(batch, out)

    async def _process(self, batch: list[Message], already: Any) -> Outcome:
        """The batch's outcome, computed :attr:`process_slice` events at a time with the event loop let
        run in between (the processors are pure and keep their state across calls, so slices in order
        give what the whole batch at once gives). A pre-settlement check in between sees the state of
        the events processed so far, as it would between two batches."""
        size = self.process_slice
        if not size or len(batch) <= size:
            return self.processor.process(batch, already)
        out = self.processor.process(batch[:size], already, seal=False)
        for i in range(size, len(batch), size):
            for _ in range(LOOP_TURNS):
                await asyncio.sleep(0)
            part = batch[i:i + size]
            last = i + size >= len(batch)
            out.absorb(self.processor.process(part, already) if last else
                       self.processor.process(part, already, seal=False))
        return out

    async def _roll_back(self, batch: list[Message]) -> None:
        """Undo in memory what a failed attempt at ``batch`` applied: the rule state of its
        partitions is restored from the changelog (only completed batches write it), and the
        tables are asked again which of its events landed (a failure may follow an insert)."""
        parts = sorted({m.partition for m in batch})
        self.processor.forget(parts)
        await self._restore_state(parts)
        self._needs_check.update(parts)
        for p in parts:
            self.landed_index.forget(p)

    async def _quarantine(self, m: Message, reason: str, exc: BaseException) -> None:
        """The one message that fails its batch becomes a dead letter (its original bytes sealed,
        so ``yibao dlq replay`` can send it again after a fix), and its offset is committed."""
        await self._load_landed([m])
        partly = [t for t in self.landed_index.tables_at(m.partition, m.offset) if t != DEAD_LETTER_TABLE]
        landed = (f"its rows in {', '.join(partly)} had landed before the failure and stay" if partly
                  else "nothing of it landed")
        out = self.processor.quarantine(m, reason, f"{describe(exc)} (isolated from its batch; {landed})",
                                self.landed_index if self.landed_index.active() else None)
        if partly:
            log.error("a quarantined message had partly landed: rows of one event in several tables are not "
                      "written atomically", topic=self.topic, position=f"{m.partition}/{m.offset}", tables=partly)
        await self.checkpoint.commit([m], out)
        self._account([m], out)
        log.error("message quarantined as a dead letter", topic=self.topic, reason=reason,
                  position=f"{m.partition}/{m.offset}")

    async def _load_landed(self, batch: list[Message]) -> None:
        if not self._needs_check:
            return
        first: dict[int, int] = {}
        for m in batch:
            if m.partition in self._needs_check and m.offset < first.get(m.partition, m.offset + 1):
                first[m.partition] = m.offset
        for partition, from_offset in first.items():
            per_table: dict[str, dict[int, set[str]]] = {}
            for table in self._tables:
                topic = self.topic if table == DEAD_LETTER_TABLE else None
                rule_ids = self.processor.alert_rule_ids() if table == ALERTS_TABLE else None
                per_table[table] = await self._with_retry(
                    functools.partial(existing_rows, self.backend, table, partition, from_offset, topic, rule_ids)
                )
            versions = await self._with_retry(functools.partial(
                alert_versions_held, self.backend, partition, from_offset, self.processor.alert_rule_ids()
            )) if ALERTS_TABLE in self._tables else []
            self.landed_index.load(partition, per_table, versions)
            self._needs_check.discard(partition)
            if any(per_table.values()):
                log.warning("redelivered offsets already landed; they will not be inserted twice",
                            topic=self.topic, partition=partition,
                            rows={t: len(s) for t, s in per_table.items() if s})

    async def _insert(self, table: str, cols: Columns) -> None:
        """Make one table's rows durable, riding out ClickHouse outages (the checkpoint's step 2)."""
        await self._with_retry(self._insert_once(table, cols))
        metrics.ROWS_WRITTEN.labels(table).inc(len(next(iter(cols.values()))))

    def _insert_once(self, table: str, cols: Columns) -> Callable[[], None]:
        """The blocking insert of one table's rows, safe to repeat after ``SinkUnavailable``.

        An insert that failed as "unavailable" may still have been written: the server can commit
        the part and lose the connection before answering (a server stopped mid-insert does exactly
        that). Re-sending the same rows blindly would land them twice, so every attempt after the
        first asks the table which of these rows it already holds and sends only the others.
        """
        attempted = False

        def call() -> None:
            nonlocal attempted
            todo = without_existing(self.backend, table, cols, self.topic) if attempted else cols
            attempted = True
            if any(todo.values()):  # all columns are equally long: any non-empty means rows left
                self.backend.insert(table, todo)

        return call

    async def _with_retry(self, call: Callable[[], T]) -> T:
        """Run a blocking sink call in the sink thread; while ClickHouse is unreachable, back off,
        pause fetching and keep polling so the group keeps this member.

        ``yibao_sink_up`` follows every call: 1 when ClickHouse answered (an answer that refuses the
        rows is an answer), 0 while backing off."""
        loop = asyncio.get_running_loop()
        delay = 0.5
        paused = False
        try:
            while True:
                try:
                    result = await loop.run_in_executor(self.executor, call)
                    metrics.SINK_UP.set(1)
                    return result
                except SinkUnavailable as exc:
                    metrics.SINK_UP.set(0)
                    metrics.SINK_RETRIES.labels(self.topic, "unavailable").inc()
                    log.warning("ClickHouse unavailable; backing off", topic=self.topic,
                                retry_in_s=round(delay, 1), error=str(exc)[:200])
                    if self.consumer is not None and not paused:
                        self.consumer.pause(*self.consumer.assignment())
                        paused = True
                    await self._back_off(delay, probe=not exc.overloaded)
                    delay = min(delay * 2, self.retry_max_seconds)
                except SinkError as exc:
                    if exc.code is not None:  # the server answered with its error code
                        metrics.SINK_UP.set(1)
                    metrics.SINK_RETRIES.labels(self.topic, "rejected").inc()
                    raise
        finally:
            if paused and self.consumer is not None:
                self.consumer.resume(*self.consumer.assignment())

    async def _back_off(self, seconds: float, *, probe: bool) -> None:
        """Wait up to ``seconds`` while still polling (paused), so the consumer is not evicted for
        slowness; with ``probe``, end the wait as soon as ClickHouse answers again (an overloaded
        server answers, and is left alone for the whole back-off)."""
        loop = asyncio.get_running_loop()
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            step = min(left, PROBE_INTERVAL_S)
            if self.consumer is not None:
                await self.consumer.getmany(timeout_ms=int(step * 1000) or 1, max_records=1)
            else:
                await asyncio.sleep(step)
            if probe and await loop.run_in_executor(self.executor, self.backend.reachable):
                return

    async def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit the consumer's offsets (the checkpoint's step 4); a failed commit is left to the
        redelivery dedup."""
        assert self.consumer is not None
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # a rebalance took the partition: redelivery is deduplicated
            log.warning("offset commit failed; the next owner will skip what already landed",
                        topic=self.topic, error=str(exc)[:200])
        for tp, meta in offsets.items():
            self.landed_index.advance(tp.partition, meta.offset - 1)

    def _account(self, batch: list[Message], out: Outcome) -> None:
        metrics.EVENTS_IN.labels(self.topic).inc(len(batch))
        metrics.BATCH_EVENTS.labels(self.topic).observe(len(batch))
        for rec, n in out.landed.items():
            metrics.EVENTS_LANDED.labels(self.topic, rec).inc(n)
        for reason, n in out.reasons.items():
            metrics.DEAD_LETTERS.labels(self.topic, reason).inc(n)
        for table, n in out.skipped_rows.items():
            metrics.DUPLICATES_SKIPPED.labels(table).inc(n)
        for rec, n in out.duplicates.items():
            metrics.DUPLICATES_RECOGNISED.labels(self.topic, rec).inc(n)
        if out.columnar:
            metrics.COLUMNAR_EVENTS.labels(self.topic).inc(out.columnar)
        for stage, s in out.stage_seconds.items():
            metrics.STAGE_SECONDS.labels(self.topic, stage).inc(s)
        for a in out.alerts:
            if a["status"] == "FIRED":
                metrics.ALERTS.labels(a["rule_id"], a["severity"]).inc()
        if self.processor.identities is not None:
            metrics.IDENTITIES.labels(self.topic).set(self.processor.identities.remembered())
        for store in self.processor.stores:
            metrics.WINDOW_STATE_KEYS.labels(store.name).set(store.keys())
        if out.state_evicted:
            metrics.STATE_EVICTED.labels(self.topic).inc(out.state_evicted)
        if out.state_capped:
            metrics.STATE_CAPPED.labels(self.topic).inc(out.state_capped)
            log.warning("a key's rule state reached its bound; its oldest entries were dropped",
                        topic=self.topic, events=out.state_capped)
        self.stats["events"] += len(batch)
        self.stats["dead_letters"] += sum(out.reasons.values())
        self.stats["duplicates"] += sum(out.duplicates.values())
        self.stats["batches"] += 1
        self.last_flush_at = time.time()
