"""Keyed detector state per source partition, backed by a compacted changelog topic.

Each store (``person``, ``hospital``, ``drg``) keeps a dict per source partition. The changelog
topic ``<prefix>changelog.<store>`` has the source topic's partition count: changelog partition p
holds the state of source partition p, so whoever is assigned p restores exactly what it needs.

Exactly-once: every stored value carries ``o``, the highest source offset applied to that key.
After a crash the uncommitted tail is redelivered; an event at or below a key's ``o`` has already
changed that key (its changelog record was written before the offset commit) and is not applied
again. Writes go out once per batch and key, not per event.

Restoring does not trust end offsets (the test broker's ListOffsets(latest) is wrong, see
infra.md): the restorer writes a unique sentinel record to the partition, then reads from the
beginning until it meets that sentinel. Everything before it is the state to restore. A log
whose earliest offset lies beyond the sentinel just written (Tansu restarted on an S3 server that
ignores conditional writes hands out offsets from 0 again and reports an earliest offset past
them: the log it had is gone) can never show the sentinel: :class:`ChangelogLost` says so at once
instead of after the timeout.

A value larger than :data:`CHUNK_BYTES` (a large hospital's month of stays, a pharmacy's day of
sold traceability codes) goes out as chunks under keys of their own, followed by a small manifest
under the key itself; the chunks of the value it replaces are then tombstoned. A changelog record
is therefore never larger than a broker accepts, and a crash between chunks and manifest leaves
the previous value whole (chunk keys carry a digest of the value they belong to).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

log = structlog.get_logger(__name__)

#: Key of a restore mark (streams.rules.state.restore), followed by ``/`` and the mark's own id: a key
#: of its own, so compaction never removes it and a store on disk can find again the mark it was
#: restored to (:meth:`Store.anchor`). Marks written before that carried this key alone.
SENTINEL_KEY = b"__yibao_restore_sentinel__"
_dumps = orjson.dumps  # ~5× the standard library here; values are plain dicts/lists/ints/strs
#: Largest changelog value written whole: brokers refuse messages over ~1 MB by default.
CHUNK_BYTES = 500_000
#: Changelog records appended between two turns of the event loop.
YIELD_EVERY = 256
#: Manifest field of a chunked value (no state value has it: they are the engines' own dicts).
CHUNKED = "__chunks__"
_CHUNK_SEP = "\x00"  # never inside a store key (tokens, codes, "institution|day")


def value_tag(value: bytes) -> str:
    """The digest that names a chunked value's chunks (a crash between chunks and manifest leaves
    the chunks of the previous value intact)."""
    return hashlib.blake2b(value, digest_size=6).hexdigest()


def chunk_key(key: str, tag: str, i: int) -> bytes:
    return f"{key}{_CHUNK_SEP}{tag}{_CHUNK_SEP}{i}".encode()


Record = tuple[int, bytes, bytes | None]


def key_records(partition: int, key: str, value: Any, before: tuple[str, int] | None
                ) -> tuple[list[Record], tuple[str, int] | None]:
    """The changelog records that make ``key`` hold ``value`` (None: a tombstone), its previous value
    having the chunks ``before``: the value whole, or its chunks then their manifest, then tombstones
    for the previous chunks unless they are the same ones. Also returns the chunks it has now."""
    out: list[Record] = []
    if value is None:
        out.append((partition, key.encode(), None))
        now = None
    else:
        b = _dumps(value)
        if len(b) <= CHUNK_BYTES:
            out.append((partition, key.encode(), b))
            now = None
        else:
            tag = value_tag(b)
            n = -(-len(b) // CHUNK_BYTES)
            out.extend((partition, chunk_key(key, tag, i), b[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]) for i in range(n))
            out.append((partition, key.encode(), _dumps({CHUNKED: [tag, n]})))
            now = (tag, n)
            if before == now:
                return out, now
    if before is not None:
        out.extend((partition, chunk_key(key, before[0], i), None) for i in range(before[1]))
    return out, now


class ChangelogLost(RuntimeError):
    """The broker no longer has a changelog partition's records: its state cannot be restored."""


@dataclass
class Store:
    """One named keyed store: per source partition, key → JSON-able value (with ``o``)."""

    name: str
    topic: str
    data: dict[int, dict[str, Any]] = field(default_factory=dict)
    dirty: dict[int, set[str]] = field(default_factory=dict)
    #: per partition, key → (digest, count) of the chunks its value has on the changelog
    chunks: dict[int, dict[str, tuple[str, int]]] = field(default_factory=dict)
    #: days of watermark between two eviction sweeps of the keys no rule needs any more
    sweep_every_days: ClassVar[int] = 1
    #: keys one batch's sweep reads at most (None: the whole partition at once, with :meth:`items`;
    #: a store that sets it has ``scan``)
    sweep_slice: ClassVar[int | None] = None

    def part(self, partition: int) -> dict[str, Any]:
        return self.data.setdefault(partition, {})

    def get(self, partition: int, key: str) -> Any:
        return self.data.get(partition, {}).get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.part(partition)[key] = value
        self.dirty.setdefault(partition, set()).add(key)

    def delete(self, partition: int, key: str) -> None:
        if self.data.get(partition, {}).pop(key, None) is not None:
            self.dirty.setdefault(partition, set()).add(key)

    def items(self, partition: int) -> Iterator[tuple[str, Any]]:
        """Every (key, value) held for ``partition``; the caller may put or delete while iterating."""
        return iter(list(self.data.get(partition, {}).items()))

    def scan(self, partition: int, after: str, limit: int) -> tuple[list[tuple[str, Any]], str | None]:
        """Up to ``limit`` (key, value) after key ``after`` in key order, and the key to continue after
        (None: the end); only a store with a :attr:`sweep_slice` is swept this way."""
        raise NotImplementedError(f"store {self.name} is swept whole (items), not in slices")

    def keys(self) -> int:
        return sum(len(d) for d in self.data.values())

    # --- restore (``restore`` drives these; a disk-backed store keeps what it had) ----------------
    def anchor(self, partition: int) -> tuple[int, bytes] | None:
        """(offset, key) of the restore mark this store's copy of ``partition`` was last restored to,
        if it keeps one across processes: ``restore`` checks the log still holds that record there
        before it lets :meth:`resume_at` resume (memory keeps nothing)."""
        return None

    def resume_at(self, partition: int, mark: int, earliest: int, anchored: bool = False) -> int | None:
        """The changelog offset to read ``partition`` from, its restore mark being at ``mark``, its
        earliest record at ``earliest``, and ``anchored`` whether the log still holds this store's
        :meth:`anchor` (None: from the beginning; memory keeps nothing across processes)."""
        return None

    def replay(self, partition: int) -> Replay:
        """A fresh replay of ``partition``'s changelog records, read in order."""
        return Replay()

    def install(self, partition: int, replay: Replay, mark: int, mark_key: bytes = SENTINEL_KEY) -> int:
        """Make the replayed records the partition's state (as of the restore mark at offset ``mark``,
        keyed ``mark_key``); returns the keys it holds."""
        self.data[partition] = replay.data
        self.chunks[partition] = replay.chunks
        self.dirty.pop(partition, None)
        return len(replay.data)

    def persisted(self, offsets: dict[int, int]) -> None:
        """The changelog acknowledged everything :meth:`drain` returned (``offsets``: per partition,
        the offset after the last record written). Memory has nothing more to do."""

    def drain(self) -> list[tuple[int, bytes, bytes | None]]:
        """Changelog records for everything changed since the last drain (None = tombstone), in the
        order they must be written: a chunked value's chunks before its manifest."""
        out: list[tuple[int, bytes, bytes | None]] = []
        for p, keys in self.dirty.items():
            part = self.data.get(p, {})
            chunked = self.chunks.setdefault(p, {})
            for k in keys:
                records, now = key_records(p, k, part.get(k), chunked.pop(k, None))
                out.extend(records)
                if now is not None:
                    chunked[k] = now
        self.dirty = {}
        return out

    def forget(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.data.pop(p, None)
            self.dirty.pop(p, None)
            self.chunks.pop(p, None)


class Replay:
    """Rebuilds one partition's state from its changelog records, read in order: the one place
    that knows the record format (tombstones, chunked values and their manifests)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.chunks: dict[str, tuple[str, int]] = {}
        self._held: dict[bytes, bytes] = {}

    def apply(self, key: bytes, value: bytes | None) -> None:
        if _CHUNK_SEP.encode() in key:
            if value is None:
                self._held.pop(key, None)
            else:
                self._held[key] = value
            return
        k = key.decode()
        if value is None:
            self.data.pop(k, None)
            self.chunks.pop(k, None)
            return
        v = orjson.loads(value)
        if CHUNKED in v:
            tag, n = v[CHUNKED]
            try:
                whole = b"".join(self._held[chunk_key(k, tag, i)] for i in range(n))
            except KeyError as exc:
                raise ChangelogLost(f"key {k!r}: a chunk of its value is missing from the changelog") from exc
            v = orjson.loads(whole)
            self.chunks[k] = (tag, n)
        else:
            self.chunks.pop(k, None)
        self.data[k] = v


async def write_changelog(producer: AIOKafkaProducer, stores: Iterable[Store]) -> int:
    """Produce every dirty key of every store and wait for the acks; returns records written.

    Records are packed into one producer batch per (topic, partition) with ``create_batch``: a
    batch holds thousands of keys, and per-record ``send`` calls cost more than the detectors.
    """
    futures: list[tuple[Store, int, int, Any]] = []
    n = 0
    stores = list(stores)
    for store in stores:
        by_part: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for partition, key, value in store.drain():
            by_part.setdefault(partition, []).append((key, value))
        for partition, records in by_part.items():
            batch = producer.create_batch()
            for i, (key, value) in enumerate(records, 1):
                if not i % YIELD_EVERY:
                    await asyncio.sleep(0)  # thousands of keys: let the event loop (checks, heartbeats) run
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append((store, partition, batch.record_count(),
                                    await producer.send_batch(batch, store.topic, partition=partition)))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                n += 1
            if batch.record_count():
                futures.append((store, partition, batch.record_count(),
                                await producer.send_batch(batch, store.topic, partition=partition)))
    metas = await asyncio.gather(*(f for *_, f in futures)) if futures else []
    after: dict[int, dict[int, int]] = {id(s): {} for s in stores}
    for (store, partition, count, _), meta in zip(futures, metas, strict=True):  # meta.offset: the batch's first
        after[id(store)][partition] = max(after[id(store)].get(partition, 0), meta.offset + count)
    for store in stores:
        store.persisted(after[id(store)])
    return n


def mark_key(mark: bytes) -> bytes:
    """The changelog key of the restore mark ``mark`` (see :data:`SENTINEL_KEY`)."""
    return SENTINEL_KEY + b"/" + mark


async def _anchored(consumer: AIOKafkaConsumer, store: Store, tps: list[TopicPartition], begin: dict[int, int],
                    at: dict[int, int], timeout_s: float) -> dict[int, bool]:
    """Per partition, whether the log still holds, at its offset, the restore mark the store's copy
    was restored to (:meth:`Store.anchor`): a log deleted and created again, or one a broker restarted
    from scratch, can have grown past the offsets a disk remembers, and only the mark tells it from
    the log the disk was built from (a key of its own: compaction keeps it). One record per partition."""
    out = {tp.partition: False for tp in tps}
    want: dict[TopicPartition, tuple[int, bytes]] = {}
    for tp in tps:
        anchor = store.anchor(tp.partition)
        if anchor is not None and begin[tp.partition] <= anchor[0] < at[tp.partition]:
            want[tp] = anchor
            consumer.seek(tp, anchor[0])
    if not want:
        return out
    others = [tp for tp in tps if tp not in want]
    if others:
        consumer.pause(*others)
    deadline = time.monotonic() + timeout_s
    try:
        while want and time.monotonic() < deadline:
            got = await consumer.getmany(*want, timeout_ms=500, max_records=len(want))
            for tp, records in got.items():
                if tp in want and records:
                    offset, key = want.pop(tp)
                    out[tp.partition] = records[0].offset == offset and records[0].key == key
                    consumer.pause(tp)
    finally:
        consumer.resume(*tps)
    return out


async def restore(store: Store, partitions: Iterable[int], producer: AIOKafkaProducer,
                  consumer_kwargs: dict[str, Any], timeout_s: float = 120.0) -> dict[int, int]:
    """Rebuild ``store`` for ``partitions`` from its changelog; returns keys restored per partition.

    ``timeout_s`` bounds a restore that stops making progress (no record read for that long), not
    its length: a partition of millions of persons takes minutes to read back (`yibao bench
    --population`), and giving up on it would start its rules from empty state."""
    parts = sorted(set(partitions))
    if not parts:
        return {}
    marks: dict[int, bytes] = {}
    at: dict[int, int] = {}
    for p in parts:
        mark = uuid.uuid4().hex.encode()
        meta = await producer.send_and_wait(store.topic, mark, key=mark_key(mark), partition=p)
        marks[p] = mark
        at[p] = meta.offset
    consumer = AIOKafkaConsumer(**consumer_kwargs, enable_auto_commit=False, group_id=None)
    await consumer.start()
    restored: dict[int, int] = {}
    try:
        tps = [TopicPartition(store.topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        begin = {tp.partition: await consumer.position(tp) for tp in tps}
        lost = {p: pos for p, pos in begin.items() if pos > at[p]}
        if lost:
            raise ChangelogLost(
                f"{store.topic}: the broker's earliest offset is past the restore mark just written "
                + ", ".join(f"(partition {p}: earliest {pos}, mark at {at[p]})" for p, pos in sorted(lost.items()))
                + "; the broker lost this log (Tansu on an S3 server that ignores conditional writes does after "
                  "a restart)")
        pending = set(parts)
        anchored = await _anchored(consumer, store, tps, begin, at, timeout_s)
        for tp in tps:
            start = store.resume_at(tp.partition, at[tp.partition], begin[tp.partition], anchored[tp.partition])
            consumer.seek(tp, begin[tp.partition] if start is None else start)
        fresh = {p: store.replay(p) for p in parts}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"restoring {store.name} partitions {sorted(pending)}: nothing read for "
                                   f"{timeout_s:.0f} s and the restore mark not seen")
            got = await consumer.getmany(timeout_ms=500, max_records=10_000)
            if any(got.values()):
                deadline = time.monotonic() + timeout_s
            for tp, records in got.items():
                if tp.partition not in pending:
                    continue
                part = fresh[tp.partition]
                for r in records:
                    if r.key is not None and r.key.startswith(SENTINEL_KEY):
                        if r.value == marks[tp.partition]:
                            pending.discard(tp.partition)
                            consumer.pause(tp)
                            break
                        continue
                    if r.offset >= at[tp.partition]:
                        raise ChangelogLost(f"{store.topic} partition {tp.partition}: read up to offset {r.offset} "
                                            f"without meeting the restore mark written at {at[tp.partition]}")
                    if r.key is not None:
                        part.apply(r.key, r.value)
        for p in parts:
            restored[p] = store.install(p, fresh[p], at[p], mark_key(marks[p]))
    finally:
        await consumer.stop()
    log.info("state restored", store=store.name, keys=restored)
    return restored
