"""Event identity: a re-sent event (same ``event_id``, at a new offset) is recognised, not landed again.

Producers retry. A settlement system that did not see the broker's acknowledgement sends the same
event again, and it reaches the topic at a later offset, possibly in another batch or after a
worker restart. Offsets alone cannot tell it from a new event; its ``event_id`` can (the Avro
contract says so). Every subsystem's ingestor therefore asks :class:`Identities` about each decoded
event before anything else happens to it:

``check`` gives one verdict per event, from what the partition has seen under its ``event_id``:

* nothing: ``NEW``, processed, and remembered (with whether it landed or was dead-lettered);
* the same offset: ``REDELIVERED`` by a crash, processed (the landed index and the detectors'
  ``o`` make that exact);
* another offset, the same content (digest of the message value: schema id and Avro body):
  ``DUPLICATE``, counted, and neither landed, dead-lettered nor shown to the detectors; except
  that a dead-lettered event sent again by ``yibao dlq replay`` (Kafka header ``yibao-replay``)
  after a fix is ``NEW``: it is judged again;
* another offset, different content: ``CONFLICT``, the first stands and this one is dead-lettered
  (``DUPLICATE_EVENT_ID_CONFLICT``).

**Where the memory lives.** Per source partition, per arrival day, sorted runs of rows (id
digest, value digest, offset, dead-lettered): 25 bytes per event, searched with numpy for a whole
batch at once; the batch being processed is first gathered in a small dict (so a re-send inside
one batch is caught too). The changelog (``changelog.identity.<subsystem>``, compacted, partition p
for source partition p) gets one record per batch: key ``<arrival day>:<first offset>``, the
batch's rows packed in base64. A batch therefore writes a few hundred kB at most, never the day's
whole set. On assignment the runs are rebuilt from those records.

**The horizon.** An identity is kept for ``horizon_days`` China days of *arrival* (the worker's
clock when it processed the event), not of event time: a retry follows its original within
seconds or hours of arrival whatever the event's own time, and a producer's clock (or a hostile
timestamp) cannot make the memory forget early. When a day leaves the horizon its arrays and its
changelog records go (tombstones). An event re-sent after that lands again: the horizon is the
promise. Identity is per partition: a producer that re-sends with another key (so to another
partition) is not recognised; the platform's producers key by ``psn_no`` / ``fixmedins_code``.

A message without a readable ``event_id`` (it cannot be decoded, or its id is not a short string)
is identified by its key and bytes: the same broken message sent twice is one input and one dead
letter. A message no longer than the 5-byte frame header, or without a value, has nothing to be
known by (different broken events cut to the same few bytes look alike): each is dead-lettered.

**Digests.** 64-bit BLAKE2b of the ``event_id`` and of the message value (so a re-send under
another schema version is a ``CONFLICT``: rare, and dead-lettered, never lost). Two different ids sharing a digest
would make the second a ``CONFLICT`` (dead-lettered, replayable, never silently dropped) unless
their bodies also share a digest: with three million identities in a partition's horizon the
chance of the first is below 10⁻⁶ per year and of the second negligible.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from schemas.calendar import china_day

from .rules.state import Store

__all__ = ["CONFLICT_REASON", "Identities", "Probe", "Verdict", "digest"]

CONFLICT_REASON = "DUPLICATE_EVENT_ID_CONFLICT"
#: a message no longer than the Confluent header (magic byte, schema id) carries nothing to tell one
#: from another: many broken events of one key cut to the same few bytes look alike, and each is a
#: dead letter of its own
MIN_FRAME = 5
#: longest ``event_id`` that is remembered; validation rejects longer ones (streams/data/fields.toml)
MAX_ID_CHARS = 64
#: id digest, value digest, offset, 1 when the event was dead-lettered (not landed)
#: prefix of the identity of a message without a readable ``event_id`` (not decodable, or its id
#: unusable): its bytes, so the same broken message sent twice is one input
_BY_BYTES = b"\x00yibao-bytes\x00"
_ROW = np.dtype([("id", "<u8"), ("body", "<u8"), ("off", "<i8"), ("dead", "u1")])


class Verdict(Enum):
    NEW = "new"
    REDELIVERED = "redelivered"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


def digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(slots=True)
class Probe:
    """One event's digests, and what the partition's day runs held for its id when probed."""

    partition: int
    offset: int
    ident: int
    body: int
    hit: tuple[int, int, bool] | None = None
    replay: bool = False


@dataclass
class _Partition:
    """One partition's memory: per arrival day, sorted runs of rows (each at most half the size of
    the one before it, so a day of n events has about log₂(n / batch) runs and adding a batch costs
    O(batch · log n) amortized), plus this batch's additions."""

    days: dict[int, list[np.ndarray]] = field(default_factory=dict)
    #: changelog keys per arrival day (to tombstone them when the day leaves the horizon)
    keys: dict[int, list[str]] = field(default_factory=dict)
    pending: dict[int, tuple[int, int, bool]] = field(default_factory=dict)  # id → (body, offset, dead)
    first_offset: int | None = None

    def lookup(self, idents: np.ndarray) -> list[tuple[int, int, bool] | None]:
        """(value digest, offset, dead-lettered) of each identity in the day runs, or None; a landed
        copy wins over dead-lettered ones (a replay that landed after a fix)."""
        out: list[tuple[int, int, bool] | None] = [None] * len(idents)
        for runs in self.days.values():
            for rows in runs:
                ids = rows["id"]
                at = np.searchsorted(ids, idents)
                np.minimum(at, len(rows) - 1, out=at)
                for j in np.flatnonzero(ids[at] == idents):
                    k = int(at[j])
                    while rows[k]["dead"] and k + 1 < len(rows) and ids[k + 1] == ids[k]:
                        k += 1  # the same id dead-lettered, then replayed and landed
                    r = rows[k]
                    if out[j] is None or out[j][2]:  # type: ignore[index]
                        out[j] = (int(r["body"]), int(r["off"]), bool(r["dead"]))
        return out

    def find(self, ident: int) -> tuple[int, int, bool] | None:
        hit = self.pending.get(ident)
        return hit if hit is not None else self.lookup(np.array([ident], dtype=np.uint64))[0]

    def add_day(self, day: int, rows: np.ndarray) -> None:
        if not len(rows):
            return
        runs = self.days.setdefault(day, [])
        runs.append(rows[np.argsort(rows["id"], kind="stable")])
        while len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
            merged = np.concatenate((runs[-2], runs[-1]))
            runs[-2:] = [merged[np.argsort(merged["id"], kind="stable")]]


class Identities:
    """The identities seen per source partition within the horizon (see the module docstring).

    Per batch: :meth:`probe` its events, then in order :meth:`verdict` and, for each new event
    that lands, :meth:`remember`; :meth:`seal` once the batch is processed (it moves the batch's
    identities into the day runs and writes them to ``store``).
    :meth:`restored` rebuilds a partition from ``store`` after it was read back from the changelog;
    :meth:`forget` drops partitions (revoked, or rolled back before a batch is retried).
    """

    def __init__(self, store: Store, horizon_days: int, clock: Callable[[], float] = time.time) -> None:
        if horizon_days < 1:
            raise ValueError("horizon_days must be at least 1")
        self.store = store
        self.horizon_days = horizon_days
        self.clock = clock
        self._parts: dict[int, _Partition] = {}

    def probe(self, events: Sequence[tuple[int, int, object, bytes | None, bool, bytes | None]]
              ) -> list[Probe | None]:
        """Digests of a batch's events ``(partition, offset, event_id, message value, replay, key)``
        and what the day runs hold for them, searched once per partition for the whole batch. An
        event without a usable id is known by its key and value (None for a tombstone: no value)."""
        probes: list[Probe | None] = [None] * len(events)
        by_part: dict[int, list[tuple[int, Probe]]] = {}
        for i, (p, off, event_id, body, replay, key) in enumerate(events):
            if body is None:
                continue
            if isinstance(event_id, str) and 0 < len(event_id) <= MAX_ID_CHARS:
                ident = digest(event_id.encode())
            elif len(body) > MIN_FRAME:  # no readable id: the message (key and value) is its identity
                ident = digest(_BY_BYTES + (key or b"") + b"\x00" + body)
            else:
                continue
            by_part.setdefault(p, []).append((i, Probe(p, off, ident, digest(body), replay=replay)))
        for p, items in by_part.items():
            part = self._parts.setdefault(p, _Partition())
            seen = part.lookup(np.fromiter((x[1].ident for x in items), dtype=np.uint64, count=len(items)))
            for (i, pr), hit in zip(items, seen, strict=True):
                pr.hit = hit
                probes[i] = pr
        return probes

    def verdict(self, pr: Probe | None) -> Verdict:
        """What the event is, given what was remembered before it (this batch included)."""
        if pr is None:
            return Verdict.NEW
        part = self._parts[pr.partition]
        hit = part.pending.get(pr.ident, pr.hit)
        if hit is None:
            return Verdict.NEW
        if hit[1] == pr.offset:
            return Verdict.REDELIVERED
        if hit[2] and pr.replay:
            return Verdict.NEW  # ``yibao dlq replay`` after a fix: judge it again
        return Verdict.DUPLICATE if hit[0] == pr.body else Verdict.CONFLICT

    def remember(self, pr: Probe | None, dead: bool = False) -> None:
        """Remember a ``NEW`` event with this batch, and whether it was dead-lettered: a producer's
        re-send of a dead-lettered event is a duplicate like any other (one input, one dead
        letter), while ``yibao dlq replay`` of it (``Probe.replay``) is judged again."""
        if pr is None:
            return
        part = self._parts[pr.partition]
        if dead and (have := part.pending.get(pr.ident)) is not None and not have[2]:
            return
        part.pending[pr.ident] = (pr.body, pr.offset, dead)
        if part.first_offset is None:
            part.first_offset = pr.offset

    def check(self, events: Sequence[tuple[int, int, object, bytes]]) -> list[Verdict]:
        """Verdicts for a batch's events ``(partition, offset, event_id, value)``, remembering every
        ``NEW`` one as landed (for callers whose events all land)."""
        out = []
        for pr in self.probe([(*e, False, None) for e in events]):
            v = self.verdict(pr)
            if v is Verdict.NEW:
                self.remember(pr)
            out.append(v)
        return out

    def first_seen(self, partition: int, event_id: str) -> int | None:
        """Offset at which the partition first saw ``event_id`` (for a conflict's detail)."""
        part = self._parts.get(partition)
        hit = part.find(digest(event_id.encode())) if part is not None else None
        return hit[1] if hit is not None else None

    def seal(self) -> None:
        """End of a batch: its identities join today's array and go to the changelog as one record."""
        day = china_day(int(self.clock() * 1000))
        for p, part in self._parts.items():
            if part.pending:
                rows = np.fromiter(((i, b, o, d) for i, (b, o, d) in part.pending.items()), dtype=_ROW,
                                   count=len(part.pending))
                key = f"{day}:{part.first_offset}"
                self.store.put(p, key, base64.b64encode(rows.tobytes()).decode("ascii"))
                part.keys.setdefault(day, []).append(key)
                part.add_day(day, rows)
                part.pending = {}
                part.first_offset = None
            for old in [d for d in part.days if d <= day - self.horizon_days]:
                del part.days[old]
                for key in part.keys.pop(old, []):
                    self.store.delete(p, key)

    def restored(self, partition: int) -> None:
        part = self._parts[partition] = _Partition()
        by_day: dict[int, list[np.ndarray]] = {}
        for key, packed in self.store.part(partition).items():
            day = int(key.split(":", 1)[0])
            by_day.setdefault(day, []).append(np.frombuffer(base64.b64decode(packed), dtype=_ROW))
            part.keys.setdefault(day, []).append(key)
        for day, chunks in by_day.items():
            part.add_day(day, np.concatenate(chunks))

    def forget(self, partitions: Sequence[int]) -> None:
        for p in partitions:
            self._parts.pop(p, None)
        self.store.forget(partitions)

    def remembered(self) -> int:
        """Identities held in memory, all partitions (for the gauge and the benchmark)."""
        return sum(sum(len(r) for runs in part.days.values() for r in runs) + len(part.pending)
                   for part in self._parts.values())
