"""A keyed store on local disk (RocksDB through ``rocksdict``): memory bounded by a batch, not by the
population, and a restart that reads only the changelog written since the last one.

The in-memory :class:`~streams.rules.state.Store` holds every person as Python objects (about
3.5 kB each, `yibao bench --population`) and rebuilds them from the whole changelog on every start.
This store keeps the changelog's records themselves, key → the same JSON bytes, in a RocksDB
database per store under the worker's state directory:

* ``get`` decodes a value from the database; what the current batch put or deleted stays in memory
  (the overlay) until the changelog has acknowledged it.
* ``drain`` hands those changes to the changelog as the in-memory store does; ``persisted`` then
  writes them to the database in one atomic write batch, together with the changelog offset it
  now reflects. The database therefore never holds a change the changelog lacks: a crash between
  the two leaves the database behind, and the next restore reads the rest from the changelog.
* ``restore`` (state.restore) asks :meth:`resume_at` where to read from: the recorded offset when
  the changelog still starts at or before it, the new restore mark lies after it, and the log still
  holds, at its offset, the restore mark this disk was last restored to (:meth:`anchor`: a log
  deleted and created again can have grown past the recorded offset; the mark tells them apart);
  from the beginning otherwise (a fresh disk, a log recreated or truncated under it), wiping the
  partition first.

Records are kept as the changelog has them, chunk keys and manifests included, so a value too large
for one record is put together on ``get`` exactly as a restore does.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson
import structlog
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from .state import _CHUNK_SEP, CHUNKED, SENTINEL_KEY, ChangelogLost, Replay, Store, chunk_key, key_records

log = structlog.get_logger(__name__)

_DELETED = object()
#: records written to the database per write batch while restoring
RESTORE_BATCH = 20_000


def _no_wal() -> WriteOptions:
    """A restore's writes skip RocksDB's write-ahead log (a third of the restore's time): a crash
    before :meth:`DiskStore.install` flushes them and records the offset repeats the restore."""
    opts = WriteOptions()
    opts.disable_wal = True  # type: ignore[method-assign,assignment]  # a property; the stub says a method
    return opts


_NO_WAL = _no_wal()


def _prefix(partition: int) -> bytes:
    return b"d%05d/" % partition


def _meta(partition: int) -> bytes:
    return b"m%05d" % partition


def _anchor(partition: int) -> bytes:
    return b"a%05d" % partition


def _end(partition: int) -> bytes:
    return b"d%05d0" % partition  # "0" follows "/": the first key past the partition's prefix


@dataclass
class DiskStore(Store):
    """A :class:`Store` whose values live in RocksDB at ``path`` (one database per store)."""

    path: Path = Path()
    #: RocksDB's block cache, MB (the hot part of the population in memory)
    cache_mb: int = 64
    overlay: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: drained to the changelog, not yet acknowledged: still served from memory
    unacked: dict[int, dict[str, Any]] = field(default_factory=dict)
    _db: Rdict | None = field(default=None, repr=False)
    _drained: list[tuple[int, bytes, bytes | None]] = field(default_factory=list, repr=False)
    #: a sweep decodes every person on disk: once a week of watermark, not once a day (a backlog of
    #: months would otherwise read the population back once per day of it)
    sweep_every_days: ClassVar[int] = 7
    #: persons a batch's sweep reads at most (a pass over millions spreads over many batches instead
    #: of holding the event loop, and with it the group's heartbeats, for seconds)
    sweep_slice: ClassVar[int | None] = 20_000

    def __post_init__(self) -> None:
        if self.path == Path():
            raise ValueError("a disk-backed store needs a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.optimize_for_point_lookup(self.cache_mb)
        try:
            self._db = Rdict(str(self.path), opts)
        except Exception as exc:  # rocksdict raises a bare Exception for a held lock
            raise RuntimeError(f"state directory {self.path} cannot be opened ({exc}); another worker process "
                               "may be using it: give each process its own YIBAO_STATE_DIR") from exc

    @property
    def db(self) -> Rdict:
        if self._db is None:
            raise RuntimeError(f"store {self.name} is closed")
        return self._db

    def _get(self, key: bytes) -> bytes | None:
        raw = self.db.get(key)
        return raw if isinstance(raw, bytes) else None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- reads and writes ------------------------------------------------------------------------
    def part(self, partition: int) -> dict[str, Any]:
        raise TypeError("a disk-backed store is not a dict: use items()")

    def _stored(self, partition: int, key: str) -> Any:
        raw = self._get(_prefix(partition) + key.encode())
        return None if raw is None else self._decode(partition, key, raw)

    def _decode(self, partition: int, key: str, raw: bytes) -> Any:
        v = orjson.loads(raw)
        if isinstance(v, dict) and CHUNKED in v:
            tag, n = v[CHUNKED]
            parts = [self._get(_prefix(partition) + chunk_key(key, tag, i)) for i in range(n)]
            if any(c is None for c in parts):
                raise ChangelogLost(f"{self.name} key {key!r}: a chunk of its value is missing on disk")
            v = orjson.loads(b"".join(c for c in parts if c is not None))
        return v

    def get(self, partition: int, key: str) -> Any:
        for layer in (self.overlay, self.unacked):
            v = layer.get(partition, {}).get(key)
            if v is not None:
                return None if v is _DELETED else v
        return self._stored(partition, key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.overlay.setdefault(partition, {})[key] = value

    def delete(self, partition: int, key: str) -> None:
        if self.get(partition, key) is not None:
            self.overlay.setdefault(partition, {})[key] = _DELETED

    def items(self, partition: int) -> Iterator[tuple[str, Any]]:
        seen: set[str] = set()
        for layer in (self.overlay, self.unacked):
            for k, v in list(layer.get(partition, {}).items()):
                if k not in seen:
                    seen.add(k)
                    if v is not _DELETED:
                        yield k, v
        prefix, sep = _prefix(partition), _CHUNK_SEP.encode()
        for raw_key, raw in self.db.items(from_key=prefix):
            assert isinstance(raw_key, bytes) and isinstance(raw, bytes)
            if not raw_key.startswith(prefix):
                break
            if sep in raw_key:
                continue
            k = raw_key[len(prefix):].decode()
            if k not in seen:
                yield k, self._decode(partition, k, raw)

    def scan(self, partition: int, after: str, limit: int) -> tuple[list[tuple[str, Any]], str | None]:
        """Up to ``limit`` (key, value) on disk after key ``after`` in key order (what this batch put
        or deleted in their place), and the key to continue after (None: the partition's end)."""
        prefix, sep = _prefix(partition), _CHUNK_SEP.encode()
        changed = self.overlay.get(partition, {})
        out: list[tuple[str, Any]] = []
        it = self.db.iter()
        it.seek(prefix + after.encode() + b"\x00" if after else prefix)
        while it.valid():
            raw_key = it.key()
            assert isinstance(raw_key, bytes)
            if not raw_key.startswith(prefix):
                return out, None
            if sep not in raw_key:
                k = raw_key[len(prefix):].decode()
                if len(out) >= limit:
                    return out, after
                v = changed.get(k)
                if v is None:
                    raw = it.value()
                    assert isinstance(raw, bytes)
                    out.append((k, self._decode(partition, k, raw)))
                elif v is not _DELETED:
                    out.append((k, v))
                after = k
            it.next()
        return out, None

    def keys(self) -> int:
        n = self.db.property_int_value("rocksdb.estimate-num-keys") or 0
        return int(n) + sum(len(d) for d in self.overlay.values())

    # --- the changelog ---------------------------------------------------------------------------
    def drain(self) -> list[tuple[int, bytes, bytes | None]]:
        """The overlay as changelog records (a chunked value's chunks before its manifest, the
        chunks of the value it replaces tombstoned after), moved aside until :meth:`persisted`."""
        out: list[tuple[int, bytes, bytes | None]] = []
        for p, changed in self.overlay.items():
            for k, v in changed.items():
                out.extend(key_records(p, k, None if v is _DELETED else v, self._chunking(p, k))[0])
            self.unacked.setdefault(p, {}).update(changed)
        self.overlay = {}
        self._drained = out
        return out

    def _chunking(self, partition: int, key: str) -> tuple[str, int] | None:
        raw = self._get(_prefix(partition) + key.encode())
        if raw is None or not raw.startswith(b'{"' + CHUNKED.encode()):
            return None
        tag, n = orjson.loads(raw)[CHUNKED]
        return str(tag), int(n)

    def persisted(self, offsets: dict[int, int]) -> None:
        wb = WriteBatch(raw_mode=True)
        for p, key, value in self._drained:
            if value is None:
                wb.delete(_prefix(p) + key)
            else:
                wb.put(_prefix(p) + key, value)
        for p, offset in offsets.items():
            wb.put(_meta(p), b"%d" % offset)
        self.db.write(wb)
        self._drained = []
        self.unacked = {}

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop what is not on the changelog yet; what is on disk stays (a later restore of these
        partitions reads only the changelog written since)."""
        gone = set(partitions)
        for p in gone:
            self.overlay.pop(p, None)
            self.unacked.pop(p, None)
        self._drained = [r for r in self._drained if r[0] not in gone]

    # --- restore ---------------------------------------------------------------------------------
    def anchor(self, partition: int) -> tuple[int, bytes] | None:
        raw = self._get(_anchor(partition))
        if raw is None:
            return None
        offset, _, key = raw.partition(b" ")
        return int(offset), key

    def resume_at(self, partition: int, mark: int, earliest: int, anchored: bool = False) -> int | None:
        raw = self._get(_meta(partition))
        at = int(raw) if raw is not None else None
        if at is not None and anchored and earliest <= at <= mark:
            log.info("state resumed from disk", store=self.name, partition=partition, changelog_from=at,
                     changelog_to=mark)
            return at
        if at is not None:
            log.warning("state on disk does not fit its changelog: rebuilt from the whole log", store=self.name,
                        partition=partition, disk_offset=at, log_earliest=earliest, log_mark=mark,
                        restore_mark_found=anchored)
        self.wipe(partition)
        return None

    def wipe(self, partition: int) -> None:
        self.db.delete_range(_prefix(partition), _end(partition))
        self.db.delete(_meta(partition))
        self.db.delete(_anchor(partition))

    def replay(self, partition: int) -> Replay:
        return _DiskReplay(self, partition)

    def install(self, partition: int, replay: Replay, mark: int, mark_key: bytes = SENTINEL_KEY) -> int:
        assert isinstance(replay, _DiskReplay)
        replay.flush()
        if replay.applied:
            self.db.flush(wait=True)  # the replayed records skipped the WAL: on disk before the offset is
        wb = WriteBatch(raw_mode=True)
        wb.put(_meta(partition), b"%d" % mark)
        wb.put(_anchor(partition), b"%d %s" % (mark, mark_key))
        self.db.write(wb)
        self.overlay.pop(partition, None)
        self.unacked.pop(partition, None)
        return replay.applied

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


class _DiskReplay(Replay):
    """Changelog records written straight to the database, not decoded (a restart reads millions)."""

    def __init__(self, store: DiskStore, partition: int) -> None:
        super().__init__()
        self.store = store
        self.prefix = _prefix(partition)
        self.batch = WriteBatch(raw_mode=True)
        self.pending = 0
        self.applied = 0

    def apply(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.batch.delete(self.prefix + key)
        else:
            self.batch.put(self.prefix + key, value)
        self.applied += 1
        self.pending += 1
        if self.pending >= RESTORE_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.db.write(self.batch, write_opt=_NO_WAL)
            self.batch = WriteBatch(raw_mode=True)
            self.pending = 0
