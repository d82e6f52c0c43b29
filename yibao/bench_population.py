"""`yibao bench --population N`: what the rule state of N insured persons costs, and how long it
takes to restore.

Method: a population of N persons, each with a few settlements inside the rules' windows (their
times spread over the longest look back, so none of it may be evicted), is applied to the
settlement engine in this process, the way a worker builds it (the engine's own ``process``, all
rules on; settlements are generated ones with a new person, ids and times, not re-validated).
Measured: the process's resident memory before and after (what the state costs in memory), the
bytes of the state as the changelog holds it, the time to write that changelog to a Tansu broker
started for the run, and the time and memory a fresh process takes to restore it, as a worker does
when it is assigned the partition. One partition holds the whole population, as one worker's share.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas import Codec
from schemas.calendar import DAY_MS

from .benchkit import SETTLEMENT, Progress, _silent

#: Settlements per person: a first visit and a return within the windows.
PER_PERSON = 2
#: Outpatient and pharmacy settlements only: the templates need no stay dates shifted.
TEMPLATE_MED_TYPES = ("11", "14", "41")


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (MB), from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def _templates(n: int = 2000) -> list[dict[str, Any]]:
    """Generated outpatient settlements as the codec decodes them (raw values), oldest first."""
    from .sim.generator import SimConfig, TrafficGenerator

    codec = Codec()
    out = []
    for ev in TrafficGenerator(SimConfig(seed=3, settlements=n * 2, days=30)).events():
        if ev.record == SETTLEMENT and ev.datum["med_type"] in TEMPLATE_MED_TYPES:
            out.append(codec.decode(codec.encode(ev.record, ev.datum)).datum)
    return out


def _population_events(n: int, templates: list[dict[str, Any]], horizon_days: int, now_ms: int):  # type: ignore[no-untyped-def]
    """EngineEvents for ``n`` persons, ``PER_PERSON`` settlements each, in event-time order, all
    within ``horizon_days`` before ``now_ms`` (so none is late and none of it may be evicted)."""
    from streams.rules.events import EngineEvent

    span = horizon_days * DAY_MS
    offset = 0
    for round_ in range(PER_PERSON):
        for i in range(n):
            t = templates[(i * PER_PERSON + round_) % len(templates)]
            at = now_ms - span + (round_ * span + i * span // n) // PER_PERSON  # in event-time order: none late
            delta = at - int(t["setl_time"])
            d = dict(t)
            d["psn_no"] = f"P{i:011d}"
            d["setl_id"] = f"S{i:011d}-{round_}"
            d["mdtrt_id"] = f"M{i:011d}-{round_}"
            d["setl_time"] = at
            d["fee_details"] = [{**ln, "fee_ocur_time": int(ln["fee_ocur_time"]) + delta} for ln in t["fee_details"]]
            yield EngineEvent("Settlement", d, 0, offset)
            offset += 1


def build_population(n: int, progress: Progress = _silent, state_dir: Path | None = None,
                     changelog: tuple[str, str] | None = None) -> dict[str, Any]:
    """Apply ``n`` persons to a settlement engine here; returns the engine's store and figures.

    With ``state_dir`` the persons go to the disk store, and each chunk's changes are written to the
    ``changelog`` (bootstrap, topic) as a worker's batches are (the disk store takes a batch only
    once its changelog acknowledged it); the time that took is ``changelog_write_s``."""
    import dataclasses

    from streams.privacy import Pseudonymizer, Sealer
    from streams.processors import BatchProcessor
    from streams.rules.detectors import KINDS
    from streams.rules.engine import WATERMARK_KEY, SettlementEngine
    from streams.topology import build_pipeline

    from .settings import load_settings

    s = load_settings(pseudo_key="00" * 32)
    key = b"p" * 32
    rules = dataclasses.replace(s.rules(), enabled=True, state_dir=state_dir)
    pipeline = build_pipeline(validation=s.validation(), rules=rules,
                              topic=s.topic, codec=Codec(), pseudonymizer=Pseudonymizer(key, "k1"),
                              sealer=Sealer(key, "k1"), streams=("settlement",))
    proc = pipeline.stages["settlement"].processor
    assert isinstance(proc, BatchProcessor) and isinstance(proc.engine, SettlementEngine)
    engine = proc.engine
    horizon = max((KINDS[r.kind].horizon_days(r) for r in engine.book.current.enabled()
                   if KINDS[r.kind].historic is not None), default=1)
    templates = _templates()
    now_ms = int(time.time() * 1000) - DAY_MS
    before = rss_mb()
    t0 = time.perf_counter()
    chunk: list[Any] = []
    done = 0
    total = n * PER_PERSON
    writer = _ChangelogWriter(*changelog) if state_dir is not None and changelog else None
    if changelog:
        engine.person.topic = changelog[1]
    if writer:
        writer.restore(engine.person)
    try:
        for ev in _population_events(n, templates, horizon - 1, now_ms):
            chunk.append(ev)
            if len(chunk) == 20_000:
                engine.process(chunk)
                if writer:
                    writer.write(engine.person)
                done += len(chunk)
                chunk = []
                progress(f"population {n:,}: applying settlements", done, total)
        if chunk:
            engine.process(chunk)
            if writer:
                writer.write(engine.person)
    finally:
        if writer:
            writer.close()
    apply_s = time.perf_counter() - t0
    after = rss_mb()
    persons = sum(1 for k, _ in engine.person.items(0) if k != WATERMARK_KEY)
    out = {"engine": engine, "persons": persons, "settlements": total, "apply_s": round(apply_s, 1),
           "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
           "memory_bytes_per_person": round((after - before) * 1024 * 1024 / max(1, persons)),
           "horizon_days": horizon}
    if writer:
        out["changelog_write_s"] = round(writer.seconds, 1)
        out["changelog_records"] = writer.records
    return out


class _ChangelogWriter:
    """A producer on its own event loop, writing a store's changes as a worker's checkpoint does."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from aiokafka import AIOKafkaProducer

        async def start() -> AIOKafkaProducer:
            await _create_topic(bootstrap, topic)
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1024 * 1024,
                                        linger_ms=20)
            await producer.start()
            return producer

        self.bootstrap = bootstrap
        self.loop = asyncio.new_event_loop()
        self.producer = self.loop.run_until_complete(start())
        self.seconds = 0.0
        self.records = 0

    def restore(self, store: Any) -> None:
        """Restore ``store`` (partition 0) from its changelog first, as a worker does when it is given a
        partition: the disk then records the restore mark a later restart checks before resuming."""
        from streams.rules.state import restore

        self.loop.run_until_complete(restore(store, [0], self.producer, {"bootstrap_servers": self.bootstrap}))

    def write(self, store: Any) -> None:
        from streams.rules.state import write_changelog

        t0 = time.perf_counter()
        self.records += self.loop.run_until_complete(write_changelog(self.producer, [store]))
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        self.loop.run_until_complete(self.producer.stop())
        self.loop.close()


async def _create_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()


def _state_bytes(store: Any) -> int:
    """Key and value bytes of the state as the changelog holds it."""
    return sum(len(k.encode()) + len(json.dumps(v, separators=(",", ":")).encode()) for k, v in store.items(0))


async def _write(bootstrap: str, topic: str, store: Any) -> tuple[int, int, float]:
    """The store's changelog to ``topic``: (records, bytes, seconds)."""
    from aiokafka import AIOKafkaProducer

    from streams.rules.state import write_changelog

    await _create_topic(bootstrap, topic)
    store.topic = topic
    size = _state_bytes(store)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1024 * 1024, linger_ms=20)
    await producer.start()
    try:
        t0 = time.perf_counter()
        n = await write_changelog(producer, [store])
        return n, size, time.perf_counter() - t0
    finally:
        await producer.stop()


async def _restore(bootstrap: str, topic: str, state_dir: str | None = None) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    from streams.rules.diskstore import DiskStore
    from streams.rules.state import Store, restore

    store = DiskStore("person", topic, path=Path(state_dir)) if state_dir else Store("person", topic)
    before = rss_mb()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        t0 = time.perf_counter()
        keys = await restore(store, [0], producer, {"bootstrap_servers": bootstrap}, timeout_s=3600)
        seconds = time.perf_counter() - t0
    finally:
        await producer.stop()
        if isinstance(store, DiskStore):
            store.close()
    return {"keys": keys.get(0, 0), "restore_s": round(seconds, 1), "restore_rss_mb": round(rss_mb(), 1),
            "restore_rss_before_mb": round(before, 1)}


def _restore_in_fresh_process(bootstrap: str, topic: str, state_dir: Path | None = None) -> dict[str, Any]:
    args = [sys.executable, "-m", "yibao.bench_population", bootstrap, topic, *([str(state_dir)] if state_dir else [])]
    res = subprocess.run(args, capture_output=True, text=True, timeout=7200, env=dict(os.environ))
    if res.returncode != 0:
        raise RuntimeError(f"the restore process failed: {res.stderr.strip()[-500:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _disk_population(n: int, bootstrap: str, work: Path, progress: Progress) -> dict[str, Any]:
    """The population on the disk store: built with its changelog written batch by batch, then a
    restart on the same disk (reads only what the changelog gained) and a new machine (empty disk:
    the whole changelog, written to disk undecoded)."""
    topic = f"bench-population-disk-{n}.changelog.person"
    state = work / f"state-{n}"
    progress(f"population {n:,} on disk: applying settlements", 0, n * PER_PERSON)
    built = build_population(n, progress, state_dir=state, changelog=(bootstrap, topic))
    engine = built.pop("engine")
    size = _state_bytes(engine.person)
    engine.person.close()
    del engine
    progress(f"population {n:,} on disk: restarting on the same disk", 0, None)
    warm = _restore_in_fresh_process(bootstrap, topic, state / "person")
    progress(f"population {n:,} on disk: restoring on an empty disk", 0, None)
    cold = _restore_in_fresh_process(bootstrap, topic, work / f"state-{n}-empty")
    shutil.rmtree(work / f"state-{n}-empty", ignore_errors=True)
    disk_mb = sum(f.stat().st_size for f in (state / "person").rglob("*") if f.is_file()) / 1024 / 1024
    shutil.rmtree(state, ignore_errors=True)
    return {**built, "store": "disk", "changelog_bytes_per_person": round(size / n), **cold,
            "disk_mb": round(disk_mb, 1), "resume_s": warm["restore_s"], "resume_records": warm["keys"],
            "resume_rss_mb": warm["restore_rss_mb"]}


def _memory_population(n: int, bootstrap: str, work: Path, progress: Progress) -> dict[str, Any]:
    """The population in memory: built, its changelog written at once, restored in a fresh process."""
    progress(f"population {n:,}: applying settlements", 0, n * PER_PERSON)
    built = build_population(n, progress)
    engine = built.pop("engine")
    topic = f"bench-population-{n}.changelog.person"
    progress(f"population {n:,}: writing the changelog", 0, None)
    records, size, write_s = asyncio.run(_write(bootstrap, topic, engine.person))
    del engine
    progress(f"population {n:,}: restoring in a fresh process", 0, None)
    restored = _restore_in_fresh_process(bootstrap, topic)
    return {**built, "store": "memory", "changelog_records": records, "changelog_bytes_per_person": round(size / n),
            "changelog_write_s": round(write_s, 1), **restored}


def _measure_in_fresh_process(store: str, n: int, bootstrap: str, work: Path) -> dict[str, Any]:
    """One population in a process of its own: memory freed by the previous one is not returned to
    the system, and would hide what the next one costs."""
    args = [sys.executable, "-m", "yibao.bench_population", "measure", store, str(n), bootstrap, str(work)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=7200, env=dict(os.environ))
    if res.returncode != 0:
        raise RuntimeError(f"the {store} population of {n:,} failed: {res.stderr.strip()[-800:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def run_population_bench(sizes: list[int], progress: Progress = _silent,
                         stores: tuple[str, ...] = ("memory", "disk")) -> dict[str, Any]:
    """For each size and store: build the population, write its changelog, restore it in a fresh process."""
    from .localinfra import TansuBroker

    work = Path(tempfile.mkdtemp(prefix="yibao-bench-population-"))
    broker = TansuBroker(workdir=work / "broker")
    progress("starting Tansu", 0, None)
    broker.start()
    ok = False
    try:
        runs = []
        for n in sizes:
            for store in stores:
                progress(f"population {n:,}, {store}: building and restoring", 0, None)
                runs.append(_measure_in_fresh_process(store, n, broker.bootstrap, work))
        ok = True
        return {"populations": runs, "settlements_per_person": PER_PERSON, "cpus": os.cpu_count()}
    finally:
        broker.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """``python -m yibao.bench_population BOOTSTRAP TOPIC [STATE_DIR]``: restore one changelog (into
    the disk store at STATE_DIR), print figures."""
    if sys.argv[1] == "measure":
        store, n, bootstrap, work = sys.argv[2], int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
        measure = _disk_population if store == "disk" else _memory_population

        print(json.dumps(measure(n, bootstrap, work, _silent)))
        return
    bootstrap, topic = sys.argv[1], sys.argv[2]
    print(json.dumps(asyncio.run(_restore(bootstrap, topic, sys.argv[3] if len(sys.argv) > 3 else None))))


if __name__ == "__main__":
    main()


def print_population_figures(console: Any, f: dict[str, Any]) -> None:
    """The figures of :func:`run_population_bench` as a table, a column per population and store."""
    from rich.table import Table

    runs = f["populations"]
    t = Table("figure", *(f"{r['persons']:,} persons, {r['store']}" for r in runs),
              title=f"rule state of a population ({f['settlements_per_person']} settlements each, inside the "
                    f"{runs[0]['horizon_days'] if runs else '?'}-day look back), one partition")
    rows = (
        ("applying their settlements (s)", "apply_s", "{:,.1f}"),
        ("worker memory for the state (MB)", None, None),
        ("memory per person (bytes)", "memory_bytes_per_person", "{:,}"),
        ("changelog per person (bytes)", "changelog_bytes_per_person", "{:,}"),
        ("writing the changelog (s)", "changelog_write_s", "{:,.1f}"),
        ("state on disk (MB)", "disk_mb", "{:,.0f}"),
        ("restoring the whole changelog in a fresh process (s)", "restore_s", "{:,.1f}"),
        ("that process's memory after the restore (MB)", "restore_rss_mb", "{:,.0f}"),
        ("restarting on its own disk (s)", "resume_s", "{:,.1f}"),
        ("records read back by that restart", "resume_records", "{:,}"),
        ("that process's memory (MB)", "resume_rss_mb", "{:,.0f}"),
    )
    for label, key, fmt in rows:
        if key is None:
            t.add_row(label, *(f"{r['rss_after_mb'] - r['rss_before_mb']:,.0f}" for r in runs))
        else:
            assert fmt is not None
            t.add_row(label, *(fmt.format(r[key]) if key in r else "—" for r in runs))
    console.print(t)
