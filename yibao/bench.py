"""`yibao bench`: end-to-end settlements/s through the real broker, worker(s) and ClickHouse server.

Method: a fresh Tansu broker and ClickHouse 18.16 server as local processes; N settlements
(≈10 fee lines each on average, from the generator) are produced to the settlement topic first,
then worker processes are started. The clock runs from the moment the first worker owns
partitions (its /metrics page says so: Python start-up and the group join are left out) to the
moment the last fee line is in ClickHouse: the time the workers take to drain a backlog of N.
That window holds the first fetch and the last batch's linger (``batch_max_seconds``, kept short
here), which weigh more in a small run: a small run understates, it cannot overstate. Timing
from the first row seen landed instead timed nothing when one batch held most of the run.
In the same run, one batch is pushed through the in-process stages on their own to show where
the time goes. Figures vary with the machine: compare ratios within one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from schemas import Codec

from .bench_latency import HISTORY, latency_pass
from .benchkit import (
    PLANT_RATE,
    SETTLEMENT,
    BenchError,
    Progress,
    _silent,
    metric_sample,
    metrics_pages,
    metrics_text,
    stop_workers,
    worker_env,
    workers_rss_mb,
)
from .producer import OutEvent, produce
from .settings import Settings, load_settings

__all__ = ["SETTLEMENT", "BenchError", "Progress", "print_figures", "run_bench", "stop_workers"]

#: Fewest settlements a run takes: fewer land before anything can be timed.
MIN_EVENTS = 1000
#: A landing window shorter than this measured nothing worth a figure.
MIN_WINDOW_S = 0.1
#: Landing windows shorter than this understate throughput noticeably (first fetch, last linger).
SHORT_WINDOW_S = 5.0
BATCH_MAX_EVENTS = 10_000
#: Linger of a partial batch: short, so the run's last batch does not wait a full second.
BATCH_MAX_SECONDS = 0.25
#: How often the landing is looked at (a count() on the server) while the window opens and as it closes:
#: its resolution.
POLL_S = 0.03
#: At most this often in between, while the rate so far says the end is further than four looks away.
#: Two count()s every 30 ms cost ClickHouse 7 % of a core and the bench 5 % (measured; every 100 ms
#: 2.5 % and 1.6 %): CPU taken from the workers being measured.
POLL_FAR_S = 0.25

def _settlements(n: int, seed: int, mean_lines: float,
                 progress: Progress = _silent) -> tuple[list[OutEvent], int]:
    """``n`` generated settlements (with planted anomalies) whose mean fee-line count is ``mean_lines``.

    The generator's natural mix averages ~6.5 lines (mostly short outpatient visits); the
    reference load is ≈10 lines per settlement, so settlements are taken in stream order and
    skipped only when keeping them would pull the running mean away from the reference.
    """
    from .sim.generator import SimConfig
    from .sim.planters import Planting

    out: list[OutEvent] = []
    codec = Codec()
    lines = 0
    seed_i = seed
    while len(out) < n:
        # planted anomalies, so that the rules' cost includes raising alerts at a plausible rate
        gen = Planting("all", rate=PLANT_RATE).generator(SimConfig(seed=seed_i, settlements=max(1000, n)))
        for ev in gen.events():
            if ev.record != SETTLEMENT:
                continue
            k = len(ev.datum["fee_details"])
            mean = lines / len(out) if out else mean_lines
            if (mean < mean_lines and k < mean_lines) or (mean > mean_lines and k > mean_lines):
                continue
            out.append(OutEvent(ev.record, ev.key, None, codec.encode(ev.record, ev.datum)))
            lines += k
            if len(out) % 1000 == 0 or len(out) == n:
                progress("generating settlements", len(out), n)
            if len(out) == n:
                break
        seed_i += 1
    return out, lines


def stage_costs(settings: Settings, frames: list[OutEvent], backend: Any) -> dict[str, float]:
    """µs per settlement for each in-process stage, on one batch (rules included)."""
    import dataclasses

    from schemas.columnar_decode import ArrowDecoder
    from streams.privacy import Pseudonymizer, Sealer
    from streams.topology import build_pipeline

    key = b"k" * 32
    rules_on = dataclasses.replace(settings.rules(), enabled=True)
    with ArrowDecoder() if settings.columnar else contextlib.nullcontext() as decoder:
        if decoder is not None:
            decoder.wait_ready()  # else the timed batch would take the record path while it starts
        pipeline = build_pipeline(validation=settings.validation(), rules=rules_on, topic=settings.topic,
                                  codec=Codec(), pseudonymizer=Pseudonymizer(key, "k1"), sealer=Sealer(key, "k1"),
                                  streams=("settlement",), decoder=decoder)
        return _stage_costs(pipeline, frames, backend)


def _stage_costs(pipeline: Any, frames: list[OutEvent], backend: Any) -> dict[str, float]:
    from streams.app import tune_gc
    from streams.messages import Message
    from streams.processors import BatchProcessor
    from streams.rules.engine import SettlementEngine

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


def event_time_costs(settings: Settings, frames: list[OutEvent], seed: int = 1,
                     progress: Progress = _silent) -> dict[str, float]:
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
    runs = 0
    progress("identity and event-time costs", runs, 3 * len(orders))
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
            runs += 1
            progress("identity and event-time costs", runs, 3 * len(orders))
        for stage, v in best.items():
            out[f"{stage}_{label}_us"] = v
    return out


def _owned_partitions(port: int, topic: str) -> int | None:
    """Partitions of ``topic`` the worker serving /metrics on ``port`` owns: 0 when it does not
    listen yet (it is still starting, so it consumes nothing), None when it did not answer in time."""
    try:
        text = metrics_text(port, timeout=0.5)
    except urllib.error.URLError as exc:
        return 0 if isinstance(exc.reason, ConnectionRefusedError) else None
    except OSError as exc:
        return 0 if isinstance(exc, ConnectionRefusedError) else None
    v = metric_sample(text, "yibao_assigned_partitions", topic)
    return int(v) if v is not None else 0


def _pass(label: str, rules: bool, base: Settings, frames: list[OutEvent], total_lines: int, processes: int,
          work: Path, progress: Progress = _silent, tag: str = "") -> dict[str, Any]:
    """Produce ``frames`` to fresh topics, start the workers, time the drain of that backlog.

    The window opens at the last look at which no worker owned a partition (so it cannot open
    late) and closes at the first look that finds every settlement and fee line landed."""
    from sinks import connect
    from sinks.migrate import migrate
    from streams.topics import ensure_topics

    from .localinfra import free_port

    phase = ("ingest only" if not rules else "all rules on") + tag
    s = base.model_copy(update={"topic_prefix": f"bench-{label}.", "ch_database": f"bench_{label}",
                                "rules_enabled": rules, "consumer_group": f"bench-{label}"})
    backend = connect(s.clickhouse())
    migrate(backend)
    asyncio.run(ensure_topics(s.kafka()))
    n = len(frames)
    produced = 0

    def sent(k: int) -> None:
        nonlocal produced
        produced += k
        progress(f"{phase}: producing", produced, n)

    progress(f"{phase}: producing", 0, n)
    t0 = time.perf_counter()
    asyncio.run(produce(s, frames, Codec(), progress=sent))
    produce_s = time.perf_counter() - t0
    topic = s.topic("settlement")
    ports = [free_port() for _ in range(processes)]
    env = worker_env(s, rules)
    procs: list[subprocess.Popen[bytes]] = []
    log_path = work / f"workers-{label}.log"
    log = log_path.open("ab")
    db = s.ch_database

    def count(table: str) -> int:
        return int(backend.query(f"SELECT count() FROM {db}.{table}").rows[0][0])

    t_spawn = time.perf_counter()
    try:
        for port in ports:
            procs.append(subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"],
                                          env=dict(env, YIBAO_WEB_PORT=str(port)), stdout=log,
                                          stderr=subprocess.STDOUT))
        t_owned: float | None = None  # when the first worker may have started consuming
        t_unowned = t_spawn  # the last look at which no worker owned a partition
        t_done: float | None = None
        deadline = time.perf_counter() + max(120.0, n / 200)
        progress(f"{phase}: workers joining the group", 0, None)
        while time.perf_counter() < deadline:
            if any(p.poll() is not None for p in procs):
                codes = ", ".join(str(p.returncode) for p in procs if p.returncode is not None)
                raise BenchError(f"a worker process exited during the {phase} pass (status {codes})", log_path)
            if t_owned is None:
                looked = time.perf_counter()
                owned = [_owned_partitions(port, topic) for port in ports]
                if any(o for o in owned):
                    t_owned = t_unowned
                elif all(o == 0 for o in owned):
                    t_unowned = looked
            c = count("settlements")
            now = time.perf_counter()
            if c and t_owned is None:
                t_owned = t_unowned
            if t_owned is not None:
                progress(f"{phase}: landing", min(c, n), n)
            if c >= n and count("fee_details") >= total_lines:
                t_done = now
                break
            time.sleep(_next_look(t_owned, now, c, n))
        if t_owned is None or t_done is None:
            raise BenchError(f"the workers did not land all {n:,} settlements within {deadline - t_spawn:.0f} s "
                             f"in the {phase} pass", log_path)
        window = t_done - t_owned
        lines = count("fee_details")
        alerts = _settled_alerts(count) if rules else count("alerts")
        pages = metrics_pages(ports)
        first_fetch = [None if (v := metric_sample(t, "yibao_first_fetch_seconds", topic)) is None else round(v, 2)
                       for t in pages]
        columnar = sum(metric_sample(t, "yibao_columnar_events_total", topic) or 0.0 for t in pages)
        rss = workers_rss_mb(procs)
        rate = n / window if window >= MIN_WINDOW_S else None
        return {
            "settlements_per_s": None if rate is None else round(rate, 1),
            "rows_per_s": None if rate is None else round(rate * (1 + lines / n), 1),
            "fee_lines_per_settlement": round(lines / n, 2),
            "landing_s": round(window, 3),
            "startup_s": round(t_owned - t_spawn, 2),
            "wall_including_startup_s": round(t_done - t_spawn, 2),
            "produce_per_s": round(n / produce_s, 1) if produce_s > 0 else None,
            "first_fetch_s": first_fetch,
            # re-reads after a rebalance count again: a share, not an exact split
            "columnar_share": round(min(1.0, columnar / n), 3),
            "alerts": alerts,
            "worker_rss_mb": rss,
            "not_measured": None if rate is not None else
            f"all {n:,} settlements landed within {window:.3f} s of the first worker owning partitions: "
            "too short to time; run more --events",
        }
    finally:
        stop_workers(procs)
        log.close()
        backend.close()


def _next_look(t_owned: float | None, now: float, landed: int, n: int) -> float:
    """Seconds until the next look at the landing: :data:`POLL_S` while the window opens and once the end
    may be four looks away at the rate so far, up to :data:`POLL_FAR_S` before that."""
    if t_owned is None or landed <= 0 or now <= t_owned:
        return POLL_S
    remaining_s = (n - landed) / (landed / (now - t_owned))
    return max(POLL_S, min(POLL_FAR_S, remaining_s / 4))


def _settled_alerts(count: Callable[[str], int], quiet_s: float = 2.0, limit_s: float = 20.0) -> int:
    """The alerts table's rows once no more have come for ``quiet_s`` (at most ``limit_s``): the hospital-month
    rules judge the stays re-keyed from the last settlements a batch or two after those have landed, so a
    count taken when the last row landed fell short by a few, and by a different few for one and two
    worker processes (the standing alerts of both were found the same)."""
    end = time.perf_counter() + limit_s
    last, since = count("alerts"), time.perf_counter()
    while time.perf_counter() < end and time.perf_counter() - since < quiet_s:
        time.sleep(0.25)
        now = count("alerts")
        if now != last:
            last, since = now, time.perf_counter()
    return last


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either side was not measured."""
    return round(a / b, 3) if a is not None and b else None


def run_bench(events: int, processes: Sequence[int] = (1, 2), seed: int = 7, mean_lines: float = 10.0,
              latency_seconds: float = 20.0, progress: Progress = _silent) -> dict[str, Any]:
    """Ingest-only and all-rules passes over the same settlements for each worker-process count, then
    the alert latency at half the all-rules rate of the most processes, in one run (compare ratios).

    ``progress`` gets each phase as it advances; nothing is printed (:func:`print_figures` does,
    once the progress display is gone)."""
    from sinks import connect

    from .localinfra import ClickHouseServer, TansuBroker

    if events < MIN_EVENTS:
        raise ValueError(f"{events:,} settlements: at least {MIN_EVENTS:,} (fewer land before they can be timed)")
    counts = sorted(set(processes))
    work = Path(tempfile.mkdtemp(prefix="yibao-bench-"))
    broker = TansuBroker(workdir=work / "broker")
    ch = ClickHouseServer(workdir=work / "clickhouse")
    progress("starting Tansu and ClickHouse", 0, None)
    broker.start()
    ch.start()
    ok = False
    try:
        # a short session: the group join (about half of it on Tansu) is start-up, not measured
        s = load_settings(
            kafka_bootstrap=broker.bootstrap, kafka_security_protocol="PLAINTEXT", ch_backend="server",
            ch_host=ch.host, ch_port=ch.tcp_port, ch_user="default", ch_password="", ch_password_file=None,
            ch_secure=False, ch_database="bench", data_dir=work / "data", web_port=0, batch_max_events=BATCH_MAX_EVENTS,
            batch_max_seconds=BATCH_MAX_SECONDS, topic_partitions=max(4, max(counts) * 2), session_timeout_ms=6000,
        )
        t0 = time.perf_counter()
        frames, total_lines = _settlements(events, seed, mean_lines, progress)
        gen_s = time.perf_counter() - t0
        from sinks.migrate import migrate

        progress("in-process stage costs", 0, 1)
        backend = connect(s.clickhouse())
        migrate(backend)
        costs = stage_costs(s, frames[: min(5000, len(frames))], backend)
        backend.close()
        progress("in-process stage costs", 1, 1)
        event_time = event_time_costs(s, frames[: min(5000, len(frames))], progress=progress)
        by: dict[str, dict[str, Any]] = {}
        for n in counts:
            tag = f" ({n} process{'es' if n > 1 else ''})" if len(counts) > 1 else ""
            ingest = _pass(f"ingest{n}", False, s, frames, total_lines, n, work, progress, tag)
            rules = _pass(f"rules{n}", True, s, frames, total_lines, n, work, progress, tag)
            by[str(n)] = {"ingest": ingest, "rules": rules,
                          "rules_to_ingest_ratio": _ratio(rules["settlements_per_s"], ingest["settlements_per_s"])}
        top = by[str(counts[-1])]
        ingest, rules = top["ingest"], top["rules"]
        latency = None
        if latency_seconds > 0 and rules["settlements_per_s"]:
            latency = latency_pass(s, round(rules["settlements_per_s"] / 2), latency_seconds, counts[-1], work,
                                   history_n=min(HISTORY, max(1000, events // 10)), progress=progress)
        not_measured = {f"{k} ({n} process(es))": v[k]["not_measured"]
                        for n, v in by.items() for k in ("ingest", "rules") if v[k]["not_measured"]}
        figures: dict[str, Any] = {
            "settlements": len(frames),
            "fee_lines_per_settlement": ingest["fee_lines_per_settlement"],
            "rows_per_settlement": round(1 + ingest["fee_lines_per_settlement"], 2),
            "worker_processes": counts[-1],
            "settlements_per_s": ingest["settlements_per_s"],
            "rows_per_s": ingest["rows_per_s"],
            "settlements_per_s_all_rules": rules["settlements_per_s"],
            "rows_per_s_all_rules": rules["rows_per_s"],
            "rules_to_ingest_ratio": top["rules_to_ingest_ratio"],
            "landing_s": ingest["landing_s"],
            "landing_s_all_rules": rules["landing_s"],
            "startup_s": ingest["startup_s"],
            "wall_including_startup_s": ingest["wall_including_startup_s"],
            "by_processes": by,
            "alert_latency": latency,
            "batch_max_events": s.batch_max_events,
            "batch_max_seconds": s.batch_max_seconds,
            "generate_encode_s": round(gen_s, 2),
            "produce_per_s": ingest["produce_per_s"],
            "stage_us_per_settlement": {k: round(v, 1) for k, v in costs.items()},
            "identity_and_event_time_us_per_settlement": {k: round(v, 1) for k, v in event_time.items()},
            "not_measured": not_measured,
            "clickhouse_version": ch.version,
            "cpus": os.cpu_count(),
        }
        ok = True
    finally:
        ch.stop()
        broker.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)  # kept after a failure: the workers' logs are there
    return figures


def _rate(v: float | None) -> str:
    return "[yellow]not measured[/yellow]" if v is None else f"[bold]{v:,.0f}[/bold]"


def _fmt(v: float | None, unit: str = "", digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}{unit}"


def print_figures(console: Console, f: dict[str, Any]) -> None:
    """The figures of :func:`run_bench` as tables; what was not measured says so."""
    by: dict[str, dict[str, Any]] = f["by_processes"]
    console.print(f"[bold]yibao bench[/bold]: {f['settlements']:,} settlements of {f['fee_lines_per_settlement']:.1f} "
                  f"fee lines, with {', '.join(by)} worker process(es) on {f['cpus']} CPU(s); a ClickHouse "
                  f"{f['clickhouse_version']} server and a Tansu broker started for this run, on this machine")
    t = Table("figure", *(f"{n} process{'es' if int(n) > 1 else ''}" for n in by),
              title="end to end (broker → worker → ClickHouse server), backlog drained")
    t.add_row("settlements/s, ingest only", *(_rate(v["ingest"]["settlements_per_s"]) for v in by.values()))
    t.add_row("settlements/s, all rules on", *(_rate(v["rules"]["settlements_per_s"]) for v in by.values()))
    t.add_row("all rules ÷ ingest only", *("[yellow]not measured[/yellow]" if v["rules_to_ingest_ratio"] is None
                                          else f"{v['rules_to_ingest_ratio']:.2f}" for v in by.values()))
    t.add_row("rows/s (settlements + fee lines), ingest only",
              *(_fmt(v["ingest"]["rows_per_s"]) for v in by.values()))
    t.add_row("timed window, ingest / rules (s)",
              *(f"{v['ingest']['landing_s']:.2f} / {v['rules']['landing_s']:.2f}" for v in by.values()))
    t.add_row("start-up: launch → partitions owned (s)", *(f"{v['ingest']['startup_s']:.1f}" for v in by.values()))
    t.add_row("start-up: launch → first record fetched, per worker (s)",
              *(" ".join(_fmt(x, digits=1) for x in v["ingest"]["first_fetch_s"]) for v in by.values()))
    t.add_row("events through the columnar path, ingest / rules",
              *(f"{v['ingest']['columnar_share']:.0%} / {v['rules']['columnar_share']:.0%}" for v in by.values()))
    t.add_row("alerts raised by the all-rules pass", *(f"{v['rules']['alerts']:,}" for v in by.values()))
    t.add_row("worker RSS after the all-rules pass, per worker (MB)",
              *(" ".join(_fmt(x) for x in v["rules"]["worker_rss_mb"]) for v in by.values()))
    console.print(t)
    console.print(f"[dim]Timed from the first worker owning partitions to the last row landed (start-up is not "
                  f"in the rate); batches of up to {f['batch_max_events']:,} events or {f['batch_max_seconds']} s; "
                  f"producer {_fmt(f['produce_per_s'])} msg/s.[/dim]")
    if min(v[k]["landing_s"] for v in by.values() for k in ("ingest", "rules")) < SHORT_WINDOW_S:
        console.print(f"[dim]A timed window under {SHORT_WINDOW_S:.0f} s understates throughput (first fetch, last "
                      "batch's linger); use more --events.[/dim]")
    for what, why in f["not_measured"].items():
        console.print(f"[yellow]{what}: not measured[/yellow]: {why}")
    lat = f.get("alert_latency")
    if lat:
        a = Table("alert latency (ms)", "p50", "p90", "p99", "max",
                  title=f"settlement produced → its alert on the alerts topic, at {lat['rate_target']:,.0f} "
                        f"settlements/s (half the all-rules rate), default batch settings "
                        f"({lat['batch_max_events']:,} events / {lat['batch_max_seconds']} s)")
        for label, key in (("on the alerts topic", "latency_ms"), ("received by a consumer", "received_latency_ms")):
            a.add_row(label, *(_fmt(lat[key][q]) for q in ("p50", "p90", "p99", "max")))
        console.print(a)
        console.print(f"[dim]{lat['alerts_measured']:,} alerts measured of {lat['alerts_fired_total']:,} fired; "
                      f"{lat['settlements_sent']:,} settlements sent at {_fmt(lat['sent_per_s'])}/s (the producer "
                      f"fell behind its schedule by {lat['producer_behind_max_s']:.2f} s at most); worker RSS "
                      f"{' '.join(_fmt(x) for x in lat['worker_rss_mb'])} MB.[/dim]")
    c = Table("stage", "µs per settlement", title="in-process cost of each stage (one batch, one core)")
    for k, v in f["stage_us_per_settlement"].items():
        if k.endswith("_us"):
            c.add_row(k.removesuffix("_us"), f"{v:,.1f}")
    console.print(c)
    e = Table("stage", "in event-time order", "as delivered (shuffled within the lateness, 3 % re-sent)",
              title="identity and event-time handling, µs per settlement (one batch, one core)")
    et = f["identity_and_event_time_us_per_settlement"]
    for stage in ("identity", "rules"):
        e.add_row(stage, f"{et[f'{stage}_in_order_us']:,.1f}", f"{et[f'{stage}_delivered_us']:,.1f}")
    console.print(e)
