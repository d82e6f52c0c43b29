"""`yibao bench`: end-to-end settlements/s through the real broker, worker(s) and ClickHouse server.

Method: a fresh Tansu broker and ClickHouse 18.16 server as local processes; N settlements
(≈10 fee lines each on average, from the generator) are produced to the settlement topic first,
then worker processes are started and the time from the first landed row to the last is
measured, so the figure is steady-state throughput, not start-up. In the same run, one batch is
pushed through the in-process stages on their own to show where the time goes.
Figures vary with the machine: compare ratios within one run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from schemas import Codec

from .producer import OutEvent, produce
from .settings import Settings, load_settings

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"


def _settlements(n: int, seed: int, mean_lines: float) -> tuple[list[OutEvent], int]:
    """``n`` generated settlements whose mean fee-line count is ``mean_lines``.

    The generator's natural mix averages ~6.5 lines (mostly short outpatient visits); the
    reference load is ≈10 lines per settlement, so settlements are taken in stream order and
    skipped only when keeping them would pull the running mean away from the reference.
    """
    from .sim.generator import SimConfig, TrafficGenerator

    out: list[OutEvent] = []
    codec = Codec()
    lines = 0
    seed_i = seed
    while len(out) < n:
        for ev in TrafficGenerator(SimConfig(seed=seed_i, settlements=max(1000, n))).events():
            if ev.record != SETTLEMENT:
                continue
            k = len(ev.datum["fee_details"])
            mean = lines / len(out) if out else mean_lines
            if (mean < mean_lines and k < mean_lines) or (mean > mean_lines and k > mean_lines):
                continue
            out.append(OutEvent(ev.record, ev.key, None, codec.encode(ev.record, ev.datum)))
            lines += k
            if len(out) == n:
                break
        seed_i += 1
    return out, lines


def stage_costs(settings: Settings, frames: list[OutEvent], backend: Any) -> dict[str, float]:
    """µs per settlement for each in-process stage, on one batch (rules included)."""
    import dataclasses

    from streams.app import tune_gc
    from streams.messages import Message
    from streams.privacy import Pseudonymizer, Sealer
    from streams.processors import BatchProcessor
    from streams.rules.engine import SettlementEngine
    from streams.topology import build_pipeline

    key = b"k" * 32
    rules_on = dataclasses.replace(settings.rules(), enabled=True)
    pipeline = build_pipeline(validation=settings.validation(), rules=rules_on, topic=settings.topic, codec=Codec(),
                              pseudonymizer=Pseudonymizer(key, "k1"), sealer=Sealer(key, "k1"), streams=("settlement",))
    proc = pipeline.stages["settlement"].processor
    engine = proc.engine if isinstance(proc, BatchProcessor) else None
    assert isinstance(engine, SettlementEngine), "the stage costs are measured with the rules on"
    msgs = [Message(0, i, f.key.encode(), f.value) for i, f in enumerate(frames)]
    tune_gc()
    proc.process(msgs)  # warm-up: memoized code checks and tokens, as in a running worker
    engine.forget([0])
    out = proc.process(msgs)
    n = len(msgs)
    costs = {f"{k}_us": v / n * 1e6 for k, v in out.stage_seconds.items()}
    t0 = time.perf_counter()
    engine.person.drain()
    costs["state_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for table, cols in out.tables.items():
        backend.insert(table, cols)
    costs["sink_us"] = (time.perf_counter() - t0) / n * 1e6
    costs["rows_per_settlement"] = sum(out.rows(t) for t in out.tables) / n
    return costs


def event_time_costs(settings: Settings, frames: list[OutEvent], seed: int = 1) -> dict[str, float]:
    """µs per settlement of the identity and rules stages on one batch in event-time order, and on
    the same batch as producers deliver it: shuffled within the allowed lateness, 3 % re-sent.

    Why both: recognising re-sends and meeting late events (episodes chosen again, alerts retracted)
    cost something only when traffic is out of order, and that is the cost to know."""
    import dataclasses

    from schemas.calendar import DAY_MS
    from streams.messages import Message
    from streams.privacy import Pseudonymizer, Sealer
    from streams.topology import build_pipeline

    from .sim.delivery import deliver
    from .sim.generator import SimEvent

    codec = Codec()
    events = [SimEvent(f.record, f.key, codec.decode(f.value).datum) for f in frames if f.value is not None]
    events.sort(key=lambda e: e.time_ms)
    within_s = max(0, settings.allowed_lateness_days * DAY_MS - DAY_MS) / 1000
    orders = {"in_order": events, "delivered": deliver(events, shuffle_within_s=within_s, resend_rate=0.03, seed=seed)}
    key = b"k" * 32
    rules_on = dataclasses.replace(settings.rules(), enabled=True)
    out: dict[str, float] = {}
    for label, evs in orders.items():
        msgs = [Message(0, i, e.key.encode(), codec.encode(e.record, e.datum)) for i, e in enumerate(evs)]
        best: dict[str, float] = {}
        for _ in range(3):  # a fresh pipeline each time (no state carried over); the fastest of three
            pipeline = build_pipeline(validation=settings.validation(), rules=rules_on, topic=settings.topic,
                                      codec=codec, pseudonymizer=Pseudonymizer(key, "k1"),
                                      sealer=Sealer(key, "k1"), streams=("settlement",))
            res = pipeline.stages["settlement"].processor.process(msgs)
            for stage in ("identity", "rules"):
                v = res.stage_seconds.get(stage, 0.0) / len(events) * 1e6
                best[stage] = min(best.get(stage, v), v)
        for stage, v in best.items():
            out[f"{stage}_{label}_us"] = v
    return out


def _pass(label: str, rules: bool, base: Settings, frames: list[OutEvent], total_lines: int, processes: int,
          work: Path) -> dict[str, Any]:
    """Produce ``frames`` to fresh topics, start the workers, time the landing (steady state)."""
    from sinks import connect
    from sinks.migrate import migrate
    from streams.topics import ensure_topics

    s = base.model_copy(update={"topic_prefix": f"bench-{label}.", "ch_database": f"bench_{label}",
                                "rules_enabled": rules})
    backend = connect(s.clickhouse())
    migrate(backend)
    asyncio.run(ensure_topics(s.kafka()))
    t0 = time.perf_counter()
    asyncio.run(produce(s, frames, Codec()))
    produce_s = time.perf_counter() - t0
    n = len(frames)
    env = dict(os.environ, YIBAO_KAFKA_BOOTSTRAP=s.kafka_bootstrap, YIBAO_CH_BACKEND="server",
               YIBAO_CH_HOST=s.ch_host, YIBAO_CH_PORT=str(s.ch_port), YIBAO_CH_DATABASE=s.ch_database,
               YIBAO_TOPIC_PREFIX=s.topic_prefix, YIBAO_TOPIC_PARTITIONS=str(s.topic_partitions),
               YIBAO_RULES_ENABLED=str(rules).lower(), YIBAO_DATA_DIR=str(s.data_dir), YIBAO_WEB_PORT="0",
               YIBAO_BATCH_MAX_EVENTS=str(s.batch_max_events), YIBAO_PSEUDO_KEY="00" * 32,
               YIBAO_LOG_LEVEL="WARNING")
    procs: list[subprocess.Popen[bytes]] = []
    log_path = work / f"workers-{label}.log"
    log = log_path.open("ab")
    t_start = time.perf_counter()
    try:
        for _ in range(processes):
            procs.append(subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
        t_first = t_done = None
        first_count = 0
        deadline = time.perf_counter() + max(120.0, n / 200)
        db = s.ch_database
        while time.perf_counter() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker process exited:\n{log_path.read_text(errors='replace')[-3000:]}")
            c = int(backend.query(f"SELECT count() FROM {db}.settlements").rows[0][0])
            now = time.perf_counter()
            if c and t_first is None:
                t_first, first_count = now, c
            if c >= n and int(backend.query(f"SELECT count() FROM {db}.fee_details").rows[0][0]) >= total_lines:
                t_done = now
                break
            time.sleep(0.1)
        if t_first is None or t_done is None:
            raise RuntimeError("the workers did not land every settlement before the deadline:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        steady = (n - first_count) / max(1e-9, t_done - t_first)
        lines = int(backend.query(f"SELECT count() FROM {db}.fee_details").rows[0][0])
        return {
            "settlements_per_s": round(steady, 1),
            "rows_per_s": round(steady * (1 + lines / n), 1),
            "fee_lines_per_settlement": round(lines / n, 2),
            "wall_including_startup_s": round(t_done - t_start, 2),
            "produce_per_s": round(n / produce_s, 1),
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        backend.close()


def run_bench(events: int, processes: int, console: Console, seed: int = 7,
              mean_lines: float = 10.0) -> dict[str, Any]:
    """Ingest-only and all-rules passes over the same settlements, in one run (compare the ratio)."""
    from sinks import connect

    from .localinfra import ClickHouseServer, TansuBroker

    work = Path(tempfile.mkdtemp(prefix="yibao-bench-"))
    broker = TansuBroker(workdir=work / "broker")
    ch = ClickHouseServer(workdir=work / "clickhouse")
    broker.start()
    ch.start()
    try:
        s = load_settings(
            kafka_bootstrap=broker.bootstrap, ch_backend="server", ch_host=ch.host, ch_port=ch.tcp_port,
            ch_database="bench", data_dir=work / "data", web_port=0, batch_max_events=10_000,
            batch_max_seconds=1.0, topic_partitions=max(4, processes * 2),
        )
        console.print(f"[bold]yibao bench[/bold]: {events:,} settlements, {processes} worker process(es), "
                      f"ClickHouse {ch.version}, Tansu at {broker.bootstrap}")
        t0 = time.perf_counter()
        frames, total_lines = _settlements(events, seed, mean_lines)
        gen_s = time.perf_counter() - t0
        from sinks.migrate import migrate

        backend = connect(s.clickhouse())
        migrate(backend)
        costs = stage_costs(s, frames[: min(5000, len(frames))], backend)
        backend.close()
        event_time = event_time_costs(s, frames[: min(5000, len(frames))])
        ingest = _pass("ingest", False, s, frames, total_lines, processes, work)
        rules = _pass("rules", True, s, frames, total_lines, processes, work)
        figures: dict[str, Any] = {
            "settlements": len(frames),
            "fee_lines_per_settlement": ingest["fee_lines_per_settlement"],
            "worker_processes": processes,
            "settlements_per_s": ingest["settlements_per_s"],
            "rows_per_s": ingest["rows_per_s"],
            "settlements_per_s_all_rules": rules["settlements_per_s"],
            "rules_to_ingest_ratio": round(rules["settlements_per_s"] / max(1e-9, ingest["settlements_per_s"]), 3),
            "wall_including_startup_s": ingest["wall_including_startup_s"],
            "generate_encode_s": round(gen_s, 2),
            "produce_per_s": ingest["produce_per_s"],
            "stage_us_per_settlement": {k: round(v, 1) for k, v in costs.items()},
            "identity_and_event_time_us_per_settlement": {k: round(v, 1) for k, v in event_time.items()},
            "clickhouse_version": ch.version,
            "cpus": os.cpu_count(),
        }
        _print(console, figures)
        return figures
    finally:
        ch.stop()
        broker.stop()


def _print(console: Console, f: dict[str, Any]) -> None:
    t = Table("figure", "value", title="end to end (broker → worker → ClickHouse server)")
    t.add_row("settlements/s, ingest only (steady state)", f"[bold]{f['settlements_per_s']:,}[/bold]")
    t.add_row("settlements/s, all rules on", f"[bold]{f['settlements_per_s_all_rules']:,}[/bold]")
    t.add_row("all rules ÷ ingest only", f"{f['rules_to_ingest_ratio']:.2f}")
    t.add_row("rows/s (settlements + fee lines)", f"{f['rows_per_s']:,}")
    t.add_row("fee lines per settlement", f"{f['fee_lines_per_settlement']:.1f}")
    t.add_row("worker processes / CPUs", f"{f['worker_processes']} / {f['cpus']}")
    t.add_row("wall time incl. start-up", f"{f['wall_including_startup_s']} s")
    t.add_row("producer rate (msg/s)", f"{f['produce_per_s']:,}")
    console.print(t)
    c = Table("stage", "µs per settlement", title="in-process cost of each stage (one batch, one core)")
    for k, v in f["stage_us_per_settlement"].items():
        c.add_row(k.removesuffix("_us"), f"{v:,.1f}")
    console.print(c)
    e = Table("stage", "in event-time order", "as delivered (shuffled within the lateness, 3 % re-sent)",
              title="identity and event-time handling, µs per settlement (one batch, one core)")
    et = f["identity_and_event_time_us_per_settlement"]
    for stage in ("identity", "rules"):
        e.add_row(stage, f"{et[f'{stage}_in_order_us']:,.1f}", f"{et[f'{stage}_delivered_us']:,.1f}")
    console.print(e)
