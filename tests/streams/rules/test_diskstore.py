"""The disk-backed store (streams.rules.diskstore): the same state as the in-memory store, on disk.

Offline: any sequence of puts, deletes, batches written and failed batches forgotten leaves the
disk store holding what the memory store holds, and its drained records, replayed, give that state.
On the real broker: a restart reads only what the changelog gained since the last write; a disk
behind its changelog (a crash between the changelog's ack and the disk write) catches up; a disk
ahead of its changelog (the log recreated under it) is wiped and rebuilt, keeping nothing stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.rules.diskstore import DiskStore
from streams.rules.state import CHUNK_BYTES, Replay, Store, restore, write_changelog

KEYS = st.sampled_from(["a", "b", "c", "psn-1", "psn-2"])
VALUES = st.one_of(
    st.fixed_dictionaries({"o": st.integers(0, 10**6), "tl": st.lists(st.integers(0, 99), max_size=3)}),
    st.builds(lambda n: {"o": n, "big": "x" * (CHUNK_BYTES + 10 + n)}, st.integers(0, 5)),  # chunked
)
OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 1), KEYS, VALUES),
    st.tuples(st.just("delete"), st.integers(0, 1), KEYS, st.none()),
    st.tuples(st.just("write"), st.just(0), st.just(""), st.none()),
    st.tuples(st.just("fail"), st.integers(0, 1), st.just(""), st.none()),
), max_size=40)


def _contents(s: Store, partitions: range = range(2)) -> dict[int, dict[str, Any]]:
    return {p: dict(s.items(p)) for p in partitions}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_disk_store_holds_what_the_memory_store_holds_and_its_records_replay_to_it(
        ops: list[tuple[str, int, str, Any]], tmp_path: Path) -> None:
    """"write" is a batch the changelog acknowledged; "fail" forgets a partition's unwritten
    changes (a failed batch rolled back), after which both stores hold the last written state."""
    mem, disk = Store("person", "t"), DiskStore("person", "t", path=tmp_path / uuid.uuid4().hex)
    log: list[tuple[int, bytes, bytes | None]] = []
    written: dict[int, dict[str, Any]] = {0: {}, 1: {}}
    try:
        for op, p, k, v in ops:
            if op == "put":
                mem.put(p, k, v)
                disk.put(p, k, v)
            elif op == "delete":
                mem.delete(p, k)
                disk.delete(p, k)
            elif op == "write":
                mem.drain()
                log.extend(disk.drain())
                disk.persisted({0: len(log), 1: len(log)})
                written = _contents(mem)
            else:
                mem.forget([p])
                mem.data[p] = dict(written[p])  # what a restore from the changelog gives back
                disk.forget([p])
            assert _contents(disk) == _contents(mem)
            for key in ("a", "psn-2"):
                assert disk.get(0, key) == mem.get(0, key)
        for p in (0, 1):
            replay = Replay()
            for part, key, value in log:
                if part == p:
                    replay.apply(key, value)
            assert replay.data == written[p]
    finally:
        disk.destroy()


def test_a_scan_in_slices_meets_every_key_once_in_order_as_this_batch_left_it(tmp_path: Path) -> None:
    s = DiskStore("person", "t", path=tmp_path / "s")
    try:
        for i in range(50):
            s.put(0, f"k{i:03d}", {"o": i})
        s.put(1, "other-partition", {"o": 0})
        s.put(0, "huge", {"o": 1, "big": "x" * (CHUNK_BYTES + 1)})
        s.drain()
        s.persisted({0: 1, 1: 1})
        s.put(0, "k007", {"o": 700})  # this batch's value, not the disk's
        s.delete(0, "k008")
        s.put(0, "new-not-on-disk", {"o": 9})  # touched by this batch: no sweep needs it
        seen: list[tuple[str, Any]] = []
        after: str | None = ""
        while after is not None:
            got, after = s.scan(0, after, 7)
            assert len(got) <= 7
            seen += got
        keys = [k for k, _ in seen]
        assert keys == sorted(keys) and len(keys) == len(set(keys))
        assert set(keys) == {f"k{i:03d}" for i in range(50) if i != 8} | {"huge"}
        assert dict(seen)["k007"] == {"o": 700} and len(dict(seen)["huge"]["big"]) == CHUNK_BYTES + 1
    finally:
        s.close()


def test_disk_store_refuses_a_directory_another_process_holds(tmp_path: Path) -> None:
    first = DiskStore("person", "t", path=tmp_path / "s")
    try:
        with pytest.raises(RuntimeError, match="give each process its own YIBAO_STATE_DIR"):
            DiskStore("person", "t", path=tmp_path / "s")
    finally:
        first.close()


# --- on the real broker ---------------------------------------------------------------------------------
async def _topic(bootstrap: str, name: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 2, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def _changelog(bootstrap: str) -> AsyncIterator[tuple[str, Any, dict[str, Any]]]:
    """A new compacted changelog topic of two partitions: (its name, a started producer, client kwargs)."""
    from aiokafka import AIOKafkaProducer

    topic = f"diskstore-{uuid.uuid4().hex[:8]}"
    kwargs = {"bootstrap_servers": bootstrap}
    await _topic(bootstrap, topic)
    producer = AIOKafkaProducer(**kwargs)
    await producer.start()
    try:
        yield topic, producer, kwargs
    finally:
        await producer.stop()


async def _recreate(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` and create it again (empty, offsets from 0)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    await asyncio.sleep(1)
    await _topic(bootstrap, topic)


@pytest.mark.integration
def test_a_restart_reads_only_what_the_changelog_gained_and_ends_with_the_same_state(
        broker: Any, tmp_path: Path) -> None:
    """Worker A writes 300 persons and stops; worker B takes the partitions over and changes 20 of
    them (one deleted); A, restarted on its disk, reads only B's records and holds exactly what a
    memory store rebuilt from the whole changelog holds."""
    from aiokafka import AIOKafkaProducer

    topic = f"diskstore-{uuid.uuid4().hex[:8]}"
    kwargs = {"bootstrap_servers": broker.bootstrap}

    async def go() -> None:
        await _topic(broker.bootstrap, topic)
        producer = AIOKafkaProducer(**kwargs)
        await producer.start()
        a = DiskStore("person", topic, path=tmp_path / "a")
        b = DiskStore("person", topic, path=tmp_path / "b")
        try:
            assert await restore(a, [0, 1], producer, kwargs, timeout_s=60) == {0: 0, 1: 0}
            for i in range(300):
                a.put(i % 2, f"psn{i}", {"o": i, "tl": [i] * 5})
            a.put(0, "huge", {"o": 1, "big": "y" * (2 * CHUNK_BYTES)})
            await write_changelog(producer, [a])
            a.close()
            full = await restore(b, [0, 1], producer, kwargs, timeout_s=60)
            assert sum(full.values()) > 300  # everything from the beginning (chunks included)
            for i in range(20):
                b.put(i % 2, f"psn{i}", {"o": 1000 + i, "tl": []})
            b.delete(1, "psn299")
            b.put(0, "huge", {"o": 2, "big": "z" * (CHUNK_BYTES + 1)})
            await write_changelog(producer, [b])
            a = DiskStore("person", topic, path=tmp_path / "a")
            tail = await restore(a, [0, 1], producer, kwargs, timeout_s=60)
            assert sum(tail.values()) < 40, f"read {tail} records: more than what B wrote since A's last write"
            rebuilt = Store("person", topic)
            await restore(rebuilt, [0, 1], producer, kwargs, timeout_s=60)
            assert _contents(a) == _contents(rebuilt) == _contents(b)
            assert a.get(1, "psn299") is None and a.get(1, "psn3") == {"o": 1003, "tl": []}
            assert a.get(0, "huge")["big"] == "z" * (CHUNK_BYTES + 1)
        finally:
            await producer.stop()
            a.close()
            b.close()

    asyncio.run(go())


@pytest.mark.integration
def test_a_disk_behind_its_changelog_catches_up_and_one_ahead_of_it_is_rebuilt(broker: Any, tmp_path: Path) -> None:
    """Behind: the changelog acknowledged a batch and the process died before the disk write (the
    records are on the changelog, not on disk). Ahead: the disk remembers offsets of a log that
    was deleted and created again; its old keys must not survive into the new log's state."""
    async def go() -> None:
        async with _changelog(broker.bootstrap) as (topic, producer, kwargs):
            s = DiskStore("person", topic, path=tmp_path / "s")
            await restore(s, [0], producer, kwargs, timeout_s=60)
            s.put(0, "kept", {"o": 1})
            await write_changelog(producer, [s])
            s.put(0, "acked-not-on-disk", {"o": 2})
            s.persisted = lambda offsets: None  # type: ignore[method-assign]  # dies before the disk write
            await write_changelog(producer, [s])
            s.close()
            with contextlib.closing(DiskStore("person", topic, path=tmp_path / "s")) as s:
                await restore(s, [0], producer, kwargs, timeout_s=60)
                assert _contents(s, range(1)) == {0: {"kept": {"o": 1}, "acked-not-on-disk": {"o": 2}}}
                for i in range(30):  # the disk's offset now lies past anything a new log will hold soon
                    s.put(0, f"old{i}", {"o": i})
                    await write_changelog(producer, [s])

                await _recreate(broker.bootstrap, topic)
                other = Store("person", topic)
                other.put(0, "new", {"o": 7})
                await write_changelog(producer, [other])
                await restore(s, [0], producer, kwargs, timeout_s=60)
                assert _contents(s, range(1)) == {0: {"new": {"o": 7}}}

    asyncio.run(go())


@pytest.mark.integration
def test_a_log_created_again_and_grown_past_the_disk_is_told_apart_by_its_restore_mark(
        broker: Any, tmp_path: Path) -> None:
    """The disk remembers offset N of a log that was deleted and created again, and the new log has
    grown past N by the time the worker restarts: offsets alone would have it resume at N, keeping
    its old keys and skipping the new log's first N records. The restore mark it was restored to is
    not at its offset in the new log, so the partition is rebuilt from the new log alone. A disk with
    no mark (written before marks were kept) is rebuilt too; one whose mark is there resumes."""
    new = {0: {f"new{i}": {"o": i} for i in range(40)}}

    async def go() -> None:
        async with _changelog(broker.bootstrap) as (topic, producer, kwargs):
            with contextlib.closing(DiskStore("person", topic, path=tmp_path / "s")) as s:
                await restore(s, [0], producer, kwargs, timeout_s=60)
                for i in range(10):
                    s.put(0, f"old{i}", {"o": i})
                    await write_changelog(producer, [s])
            await _recreate(broker.bootstrap, topic)
            other = Store("person", topic)
            for i in range(40):  # well past the offsets the disk remembers
                other.put(0, f"new{i}", {"o": i})
                await write_changelog(producer, [other])

            with contextlib.closing(DiskStore("person", topic, path=tmp_path / "s")) as s:
                await restore(s, [0], producer, kwargs, timeout_s=60)
                assert _contents(s, range(1)) == new
                s.db.delete(b"a00000")  # as a disk written before restore marks were kept
            with contextlib.closing(DiskStore("person", topic, path=tmp_path / "s")) as s:
                assert sum((await restore(s, [0], producer, kwargs, timeout_s=60)).values()) >= 40  # read whole
            with contextlib.closing(DiskStore("person", topic, path=tmp_path / "s")) as s:
                assert sum((await restore(s, [0], producer, kwargs, timeout_s=60)).values()) == 0  # its mark: resumed
                assert _contents(s, range(1)) == new

    asyncio.run(go())


# --- the settlement engine on it ------------------------------------------------------------------------
@pytest.mark.parametrize("sweep_slice", [20_000, 37], ids=["sweep at once", "sweep in slices of 37"])
def test_the_rules_raise_the_same_alerts_on_disk_across_restarts_as_in_memory(
        tmp_path: Path, sweep_slice: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated traffic with planted anomalies over ten months, as producers deliver it, through
    the settlement stage twice: with the persons in memory, and on disk with the worker restarted
    from its disk (a new store on the same directory, its watermark read back) every 7 batches.
    Every alert version must be the same, in the same order, and eviction must still free state
    (weekly on disk)."""
    import dataclasses
    from datetime import datetime

    from schemas import Codec
    from schemas.calendar import CHINA, DAY_MS
    from streams.messages import Message
    from streams.privacy import Pseudonymizer, Sealer
    from streams.processors import BatchProcessor
    from streams.rules.engine import SWEEP_MIN_PERSONS, WATERMARK_KEY, SettlementEngine
    from streams.topology import build_pipeline
    from yibao.settings import load_settings
    from yibao.sim.delivery import deliver
    from yibao.sim.generator import SimConfig
    from yibao.sim.planters import Planting

    monkeypatch.setattr(DiskStore, "sweep_slice", sweep_slice)
    reads: list[int] = []
    scan = DiskStore.scan

    def counted(self: DiskStore, partition: int, after: str, limit: int) -> tuple[list[tuple[str, Any]], str | None]:
        got = scan(self, partition, after, limit)
        reads.append(len(got[0]))
        return got

    monkeypatch.setattr(DiskStore, "scan", counted)
    key = b"e" * 32
    gen = Planting("all", rate=0.03).generator(SimConfig(seed=8, settlements=2500, days=300, persons=1500,
                                                         start=datetime(2025, 1, 1, tzinfo=CHINA)))
    codec = Codec()
    events = deliver(sorted((e for e in gen.events() if e.record.endswith(("Settlement", "SettlementReversal"))),
                            key=lambda e: e.time_ms), shuffle_within_s=20 * DAY_MS / 1000, resend_rate=0.02, seed=4)
    msgs = [Message(0, i, e.key.encode(), codec.encode(e.record, e.datum)) for i, e in enumerate(events)]
    s = load_settings(pseudo_key="00" * 32)

    def stage(state_dir: Path | None) -> tuple[BatchProcessor, SettlementEngine]:
        rules = dataclasses.replace(s.rules(), enabled=True, state_dir=state_dir)
        pipeline = build_pipeline(validation=s.validation(), rules=rules, topic=s.topic, codec=codec,
                                  pseudonymizer=Pseudonymizer(key, "k1"), sealer=Sealer(key, "k1"),
                                  streams=("settlement",))
        proc = pipeline.stages["settlement"].processor
        assert isinstance(proc, BatchProcessor) and isinstance(proc.engine, SettlementEngine)
        return proc, proc.engine

    def run(state_dir: Path | None) -> tuple[list[dict[str, Any]], int, int]:
        proc, engine = stage(state_dir)
        alerts: list[dict[str, Any]] = []
        evicted = 0
        for n, i in enumerate(range(0, len(msgs), 100), 1):
            out = proc.process(msgs[i:i + 100])
            alerts += out.alerts
            evicted += out.state_evicted
            engine.person.drain()
            engine.person.persisted({0: i + 100})
            if state_dir is not None and n % 7 == 0:
                assert isinstance(engine.person, DiskStore)
                engine.person.close()
                proc, engine = stage(state_dir)
                engine.restored(0)
        held = sum(1 for k, _ in engine.person.items(0) if k != WATERMARK_KEY)
        if isinstance(engine.person, DiskStore):
            engine.person.close()
        return alerts, evicted, held

    in_memory, _, held_mem = run(None)
    on_disk, evicted_disk, held_disk = run(tmp_path / "state")
    assert len(in_memory) > 40, "the traffic raises alerts"
    assert on_disk == in_memory
    # on disk the sweep runs once a week of watermark, not once a day: a few more persons wait for it
    assert evicted_disk > 0, "the sweep evicts on disk too"
    if sweep_slice > len(msgs):  # (in slices of 37 a pass over the population takes most of the run)
        assert held_mem <= held_disk < held_mem * 1.2, (held_mem, held_disk)
    # a batch of 100 events reads at most SWEEP_MIN_PERSONS of the persons on disk, however many there are
    assert reads and max(reads) <= min(sweep_slice, SWEEP_MIN_PERSONS), (max(reads), sweep_slice)
    assert sweep_slice < SWEEP_MIN_PERSONS or max(reads) == SWEEP_MIN_PERSONS  # the population is larger


def test_a_restart_keeps_the_watermark_even_when_every_person_was_evicted(tmp_path: Path) -> None:
    """The watermark decides which events are late; rebuilt from the persons still held it would
    fall back to zero once all of them were evicted, and a late event would be judged as on time."""
    from streams.rules.engine import WATERMARK_KEY, EngineEvent, SettlementEngine

    from .builders import HBA1C, KNOWLEDGE, PSEUDO, line, ms, seed_book, settlement

    store = DiskStore("person", "t", path=tmp_path / "p")
    engine = SettlementEngine(seed_book(), KNOWLEDGE, PSEUDO, store)
    engine.process([EngineEvent("Settlement", settlement("S1", ms(3), [line(HBA1C)]), 0, 0)])
    wm = engine.watermark[0]
    store.drain()
    store.persisted({0: 1})
    for k, _ in list(store.items(0)):
        if k != WATERMARK_KEY:
            store.delete(0, k)
    store.drain()
    store.persisted({0: 2})
    store.close()
    again = DiskStore("person", "t", path=tmp_path / "p")
    restarted = SettlementEngine(seed_book(), KNOWLEDGE, PSEUDO, again)
    restarted.restored(0)
    assert wm > 0 and restarted.watermark[0] == wm
    again.close()
