"""`yibao bench --precheck`: latency of the pre-settlement check while the workers ingest.

Method: a fresh Tansu broker and ClickHouse server as local processes; worker processes with all
rules on and the check served; a history of settlements is landed first, so the persons checked
have state to be judged against. Then, for ``seconds``: a producer thread sends settlements at
``ingest_rate`` (pre-encoded, so the measuring loop does no encoding) while checks of other
settlements of the same persons go out at ``check_rate``, open loop: request i is due at
``t0 + i / check_rate`` whatever happened to the ones before, and its latency runs from when it
was due to when its answer arrived. A slow answer therefore delays no later request's clock
(no coordinated omission), and a load generator that falls behind shows up as latency, not as
a gentler load. Checks go to the workers in turn, so with several processes about half are
forwarded to the holder of the person's partition, as a load balancer in front of them would do.
Everything runs on this machine: the broker, ClickHouse, the workers and the load generator
share its cores.
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
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from schemas import Codec

from .benchkit import (
    SETTLEMENT,
    BenchError,
    Progress,
    TimedProducer,
    _silent,
    land_history,
    percentile,
    stop_workers,
    worker_env,
)
from .producer import OutEvent
from .settings import load_settings

API_KEY = "bench-" + "5" * 40
#: Settlements landed before the measured window, so the checked persons have a history.
HISTORY = 5_000


def _served(ports: list[int]) -> dict[float, float]:
    """The workers' ``yibao_precheck_seconds`` histogram, summed: upper bound (s) → cumulative count."""
    import re
    import urllib.request

    out: dict[float, float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for le, n in re.findall(r'^yibao_precheck_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
            key = float("inf") if le == "+Inf" else float(le)
            out[key] = out.get(key, 0.0) + float(n)
    return out


def _bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, str]:
    """Upper bounds of the p50/p99 from the workers' own histogram over the window: the time a check
    spends inside the worker (forwarding included), apart from the network and the load generator."""
    counts = sorted((le, after.get(le, 0.0) - before.get(le, 0.0)) for le in after)
    total = counts[-1][1] if counts else 0.0
    out = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        le = next((b for b, n in counts if total and n >= q * total), None)
        out[name] = "—" if le is None else ("> 2500" if le == float("inf") else f"≤ {le * 1000:g}")
    return out


def _traffic(n_history: int, n_steady: int, n_checks: int, seed: int
             ) -> tuple[list[OutEvent], list[tuple[str, OutEvent]], list[bytes], list[str]]:
    """History to land first, steady traffic to produce during the window (pre-encoded), check bodies
    (settlements of the same persons, each with an id of its own) and every institution code."""
    from .sim.generator import SimConfig
    from .sim.planters import Planting

    codec = Codec()
    # planted anomalies (2 % of eligible settlements), so that some checks answer with hits
    gen = Planting("all", rate=0.02).generator(SimConfig(seed=seed, settlements=n_history + n_steady + n_checks,
                                                         days=30))
    settlements = [e for e in gen.events() if e.record == SETTLEMENT]
    history = [OutEvent(SETTLEMENT, e.key, value=codec.encode(SETTLEMENT, e.datum))
               for e in settlements[:n_history]]
    steady = [(str(e.datum["setl_id"]), OutEvent(SETTLEMENT, e.key, value=codec.encode(SETTLEMENT, e.datum)))
              for e in settlements[n_history:n_history + n_steady]]
    checks = []
    for e in settlements[n_history + n_steady:] or settlements:
        body = codec.to_json(SETTLEMENT, e.datum)
        body.pop("event_id")
        body["setl_id"] = "CHK-" + body["setl_id"]
        checks.append(json.dumps(body).encode())
    codes = sorted({i.code for i in gen.institutions})
    return history, steady, checks[:n_checks] or checks, codes


async def _checks(urls: list[str], bodies: list[bytes], rate: float, seconds: float
                  ) -> tuple[list[float], Counter[str], int]:
    """Open-loop checks: latencies (s) of the 200s, outcomes, and how many had hits."""
    import aiohttp

    n = int(rate * seconds)
    lat: list[float] = []
    outcomes: Counter[str] = Counter()
    with_hits = 0
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=10)) as http:
        t0 = time.monotonic() + 0.2

        async def one(i: int) -> None:
            nonlocal with_hits
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                async with http.post(urls[i % len(urls)] + "/v1/precheck", data=bodies[i % len(bodies)]) as r:
                    body = await r.read()
                    done = time.monotonic()
                    outcomes[str(r.status)] += 1
                    if r.status == 200:
                        lat.append(done - due)
                        with_hits += bool(json.loads(body)["hits"])
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1

        async def watch() -> None:  # how late this loop itself wakes: load-generator lag, not the worker's
            while True:
                t = time.monotonic()
                await asyncio.sleep(0.01)
                LOOP_LAG.append(time.monotonic() - t - 0.01)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(one(i) for i in range(n)))
        watcher.cancel()
    return lat, outcomes, with_hits


LOOP_LAG: list[float] = []


def run_precheck_bench(*, check_rate: float = 200.0, ingest_rate: float = 1000.0, seconds: float = 30.0,
                       processes: int = 1, seed: int = 11, progress: Progress = _silent) -> dict[str, Any]:
    from sinks import connect
    from sinks.migrate import migrate
    from streams.topics import ensure_topics

    from .localinfra import ClickHouseServer, TansuBroker, free_port, free_port_run

    work = Path(tempfile.mkdtemp(prefix="yibao-bench-precheck-"))
    broker = TansuBroker(workdir=work / "broker")
    ch = ClickHouseServer(workdir=work / "clickhouse")
    progress("starting Tansu and ClickHouse", 0, None)
    broker.start()
    ch.start()
    procs: list[subprocess.Popen[bytes]] = []
    log_path = work / "workers.log"
    log = log_path.open("ab")
    ok = False
    try:
        s = load_settings(
            kafka_bootstrap=broker.bootstrap, kafka_security_protocol="PLAINTEXT", ch_backend="server",
            ch_host=ch.host, ch_port=ch.tcp_port, ch_user="default", ch_password="", ch_password_file=None,
            ch_secure=False, ch_database="bench_precheck", data_dir=work / "data", web_port=0,
            topic_partitions=max(4, processes * 2), session_timeout_ms=6000, topic_prefix="bench-precheck.",
            consumer_group="bench-precheck",
        )
        progress("generating traffic", 0, None)
        history, steady, bodies, codes = _traffic(HISTORY, int(ingest_rate * seconds), max(1000, int(check_rate * 10)),
                                                  seed)
        backend = connect(s.clickhouse())
        migrate(backend)
        asyncio.run(ensure_topics(s.kafka()))
        (work / "all.key").write_text(API_KEY)
        (work / "callers.toml").write_text(
            f'[[caller]]\nid = "bench"\nfixmedins_codes = {json.dumps(codes)}\napi_key_file = "{work / "all.key"}"\n'
            f"rate_per_s = {check_rate * 10}\nburst = {int(check_rate * 10)}\n")
        port = free_port_run(processes)
        env = dict(worker_env(s, rules=True), YIBAO_PRECHECK_HOST="127.0.0.1",
                   YIBAO_PRECHECK_CALLERS_FILE=str(work / "callers.toml"))
        urls = []
        web = [free_port() for _ in range(processes)]
        for i in range(processes):
            urls.append(f"http://127.0.0.1:{port + i}")
            procs.append(subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"],
                                          env=dict(env, YIBAO_PRECHECK_PORT=str(port + i), YIBAO_WEB_PORT=str(web[i])),
                                          stdout=log, stderr=subprocess.STDOUT))
        land_history(s, backend, history, procs, log_path, "landing the persons' history", 180, progress)
        db = s.ch_database

        def landed() -> int:
            return int(backend.query(f"SELECT count() FROM {db}.settlements").rows[0][0])

        deadline = time.monotonic() + 60
        while True:  # every worker holds its partitions and knows the others' (a rebalance may follow the join)
            _, warm, _ = asyncio.run(_checks(urls, bodies, min(check_rate, 50.0), 1.0))
            if set(warm) == {"200"}:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the check did not answer while warming up: {dict(warm)}", log_path)
        progress(f"measuring ({seconds:.0f} s)", 0, None)
        served_before = _served(web)
        before = landed()
        producer = TimedProducer(s, steady, ingest_rate, seconds)
        t0 = time.monotonic()
        producer.start()
        LOOP_LAG.clear()
        lat, outcomes, with_hits = asyncio.run(_checks(urls, bodies, check_rate, seconds))
        producer.join(timeout=seconds + 60)
        window = time.monotonic() - t0
        if producer.error is not None:
            raise BenchError(f"the producer failed: {producer.error}", log_path)
        served_after = _served(web)
        t_end = time.monotonic()
        while landed() < before + len(producer.sent_at) and time.monotonic() - t_end < 120:
            time.sleep(0.1)
        after = landed()
        drain = time.monotonic() - t_end
        ms = [x * 1000 for x in lat]
        answered = outcomes.get("200", 0)
        figures: dict[str, Any] = {
            "check_rate_target": check_rate,
            "checks_sent": sum(outcomes.values()),
            "checks_answered": answered,
            "checks_by_outcome": dict(outcomes),
            "checks_with_hits": with_hits,
            "latency_ms": {q: None if (v := percentile(ms, p)) is None else round(v, 2)
                           for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999),
                                        ("max", 1.0))},
            "worker_side_ms": _bucket_quantiles(served_before, served_after),
            "load_generator_lag_ms": {"p99": round((percentile(LOOP_LAG, 0.99) or 0) * 1000, 2),
                                      "max": round(max(LOOP_LAG, default=0) * 1000, 2)},
            "ingest_rate_target": ingest_rate,
            "settlements_produced_per_s": round(len(producer.sent_at) / window, 1),
            "settlements_landed_per_s": round((after - before) / (window + drain), 1),
            "landed_after_window_s": round(drain, 2),
            "window_s": round(window, 2),
            "history_settlements": len(history),
            "worker_processes": processes,
            "cpus": os.cpu_count(),
            "clickhouse_version": ch.version,
        }
        backend.close()
        ok = True
        return figures
    finally:
        stop_workers(procs)
        log.close()
        ch.stop()
        broker.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)  # kept after a failure: the workers' log is there


def print_precheck_figures(console: Console, f: dict[str, Any]) -> None:
    lat = f["latency_ms"]
    console.print(f"[bold]yibao bench --precheck[/bold]: {f['check_rate_target']:g} checks/s for "
                  f"{f['window_s']:.0f} s while ingesting {f['ingest_rate_target']:g} settlements/s; "
                  f"{f['worker_processes']} worker process(es) on {f['cpus']} CPU(s), with the broker, ClickHouse "
                  f"{f['clickhouse_version']} and this load generator on the same machine")
    t = Table("figure", "value", title="pre-settlement check latency (open loop: from when a check was due)")
    for q in ("p50", "p90", "p99", "p99_9", "max"):
        v = lat[q]
        t.add_row(q.replace("_", "."), "—" if v is None else f"[bold]{v:,.1f} ms[/bold]")
    w = f["worker_side_ms"]
    t.add_row("inside the worker (its histogram): p50 / p99", f"{w['p50']} ms / {w['p99']} ms")
    t.add_row("checks answered / sent", f"{f['checks_answered']:,} / {f['checks_sent']:,}")
    t.add_row("answers with hits", f"{f['checks_with_hits']:,}")
    others = {k: v for k, v in f["checks_by_outcome"].items() if k != "200"}
    t.add_row("other outcomes", ", ".join(f"{k}: {v}" for k, v in others.items()) or "none")
    t.add_row("settlements produced / landed per s", f"{f['settlements_produced_per_s']:,.0f} / "
                                                      f"{f['settlements_landed_per_s']:,.0f}")
    t.add_row("last settlement landed, after the window", f"{f['landed_after_window_s']:.1f} s")
    console.print(t)
