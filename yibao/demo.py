"""`yibao demo`: the whole pipeline on one machine with nothing installed but the package.

A local Tansu broker (memory storage), the worker's ingest service on embedded chDB in this
process, realistic traffic (or a JSONL file), then a wait until every produced event is accounted
for: landed in its primary table, dead-lettered, or recognised as a re-send of an event already
consumed (produced = landed + dead-lettered + duplicates recognised). Landed and dead-lettered
are counted in ClickHouse; re-sends land nowhere, so they are counted by the worker metric
``yibao_duplicates_recognised_total`` (:data:`DUPLICATES_METRIC`), which the in-process workers
increment once a batch is durable, as they do ``yibao_events_landed_total``. The data stays under
``--data-dir``, with the planted anomalies' ground truth (:data:`TRUTH_FILE`) for `yibao evaluate`.
While it runs, the schemas are served over Confluent's Schema Registry API (yibao.schema_registry)
on a free local port, so Kafka tools can decode its topics; the URL is printed and in the summary
(``schema_registry_url``), and the registry stops with the demo.

The demo starts from an empty database, so it replaces the one it finds, but only one that a demo
made (its comment starts with :data:`DEMO_MARK`): a user who pointed it at data they care about is
refused (:class:`DemoRefused`) unless they say ``replace``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import shlex
import time
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas import Codec
from sinks.base import literal
from streams.records import PRIMARY_TABLE
from streams.topics import STREAMS

from .producer import OutEvent, produce
from .settings import Settings

#: The worker metric counting re-sent events recognised by identity (labels ``topic``, ``event_type``).
DUPLICATES_METRIC = "yibao_duplicates_recognised_total"
#: How a database made by the demo is marked (the start of its ClickHouse comment): the only kind
#: of database the demo replaces without being told.
DEMO_MARK = "made by yibao demo"
#: The planted anomalies of the last demo (JSON lines, as `yibao simulate --truth` writes them), in
#: its data dir: `yibao evaluate --truth` compares the alerts in the demo's database with them.
TRUTH_FILE = "demo-truth.jsonl"
#: The pre-settlement check of the demo: its callers file and API key (made once, kept) live here, and
#: a settlement to try it with is written next to them after each run.
PRECHECK_DIR = "precheck"
PRECHECK_EXAMPLE = "example-settlement.json"
PRECHECK_CALLER = "demo-his"
#: The demo serves the check here when it is free (so the README's curl line works as printed).
DEMO_PRECHECK_PORT = 8090


class DemoRefused(Exception):
    """The demo would have to drop a database it did not make; the message says which, the hint what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def claim_database(backend: Any, data_dir: Path, replace: bool) -> str | None:
    """Give the demo an empty, marked database; say what it replaced (None: there was none).

    Why: the demo drops what it finds so that its counts are its own, and the default data dir is
    where a user's own data lives too. A database without the demo's mark is dropped only when
    ``replace`` says so; otherwise :class:`DemoRefused`, before anything else has started.
    """
    db = backend.database
    found = backend.query(f"SELECT comment FROM system.databases WHERE name = {literal(db)}").rows
    replaced = None
    if found:
        comment = str(found[0][0])
        if comment.startswith(DEMO_MARK):
            replaced = f"replacing the previous demo's database {db} ({comment})"
        elif replace:
            replaced = f"replacing database {db}, which no demo made (--replace)"
        else:
            tables, rows = backend.query(
                f"SELECT count(), sumIf(ifNull(total_rows, 0), NOT startsWith(name, 'schema_')) "
                f"FROM system.tables WHERE database = {literal(db)}"
            ).rows[0]
            n = int(rows)
            raise DemoRefused(
                f"database {db} in {data_dir} was not made by `yibao demo` ({int(tables)} tables, "
                f"{n:,} row{'' if n == 1 else 's'} of data): the demo would drop it",
                "give the demo a directory of its own with --data-dir DIR, or pass --replace to drop that database",
            )
        backend.execute(f"DROP DATABASE {db} SYNC")
    made = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    backend.execute(f"CREATE DATABASE {db} COMMENT {literal(f'{DEMO_MARK} at {made}')}")
    return replaced


def demo_truth(planting: Any, broken: set[str]) -> list[dict[str, Any]]:
    """The planted anomalies a detector could have found: those none of whose events the demo broke
    on purpose (a broken event is dead-lettered, never seen by the rules)."""
    return [t for t in planting.truth() if not broken.intersection(t.get("event_ids", ()))]


def write_truth(path: Path, truth: list[dict[str, Any]]) -> None:
    """``truth`` as JSON lines, the format `yibao simulate --truth` writes and `yibao evaluate` reads."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in truth:
            fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
    tmp.replace(path)


def duplicates_recognised(topics: Collection[str]) -> int:
    """Re-sent events the workers of this process recognised on ``topics`` (the subsystem topics
    the demo produced to; the workers' internal topics are left out), from :data:`DUPLICATES_METRIC`
    in the worker metrics registry; 0 while the workers have none."""
    from streams.metrics import REGISTRY

    n = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == DUPLICATES_METRIC and sample.labels.get("topic") in topics:
                n += sample.value
    return int(n)


def table_counts(backend: Any, tables: list[str]) -> dict[str, int]:
    db = backend.database
    return {t: int(backend.query(f"SELECT count() FROM {db}.{t}").rows[0][0]) for t in tables}


class ExampleTracker:
    """Remembers a settlement worth checking again: the latest outpatient settlement with a test that
    has a minimum repeat interval. The same test a day later is what the check should flag
    (YB-PSN-RETEST: "last billed 1.0 days ago; minimum interval N days")."""

    def __init__(self) -> None:
        from streams.rules.knowledge import load_knowledge

        self.interval_codes = frozenset(load_knowledge().repeat_intervals)
        self.best: dict[str, Any] | None = None

    def see(self, record: str, datum: dict[str, Any]) -> None:
        if not record.endswith(".Settlement") or datum.get("med_type") != "11":
            return
        if not str(datum.get("fixmedins_code", "")).startswith("H"):
            return
        if not any(ln.get("hilist_code") in self.interval_codes for ln in datum.get("fee_details", ())):
            return
        if self.best is None or datum["setl_time"] > self.best["setl_time"]:
            self.best = datum

    def example(self, now_ms: int) -> dict[str, Any] | None:
        """The remembered settlement as the same visit's test again, a day later (never in the future)."""
        if self.best is None:
            return None
        d: dict[str, Any] = json.loads(json.dumps(self.best))
        shift = min(86_400_000, now_ms - 60_000 - max(ln["fee_ocur_time"] for ln in d["fee_details"]))
        shift = max(shift, 0)
        d["setl_id"] = f"CHECK-{d['setl_id']}"
        d["mdtrt_id"] = f"CHECK-{d['mdtrt_id']}"
        d["setl_time"] += shift
        for ln in d["fee_details"]:
            ln["fee_ocur_time"] += shift
        return d


def prepare_precheck(data_dir: Path, codes: Collection[str]) -> tuple[Path, Path]:
    """The demo's callers file (one caller, ``demo-his``, allowed every institution of the demo's
    traffic) and its API key, made once under ``DATA_DIR/precheck`` and kept (mode 0600)."""
    import secrets

    d = data_dir / PRECHECK_DIR
    d.mkdir(parents=True, exist_ok=True)
    key = d / f"{PRECHECK_CALLER}.key"
    if not key.exists():
        key.write_text(secrets.token_hex(24) + "\n", encoding="utf-8")
        key.chmod(0o600)
    callers = d / "callers.toml"
    callers.write_text(
        "# the demo's pre-settlement check caller (docs/operations.md, \"Pre-settlement check\")\n"
        f'[[caller]]\nid = "{PRECHECK_CALLER}"\nfixmedins_codes = {json.dumps(sorted(codes))}\n'
        f'api_key_file = "{key}"\nrate_per_s = 200\nburst = 400\n', encoding="utf-8")
    return callers, key


def precheck_port(wanted: int) -> int:
    """``wanted`` (YIBAO_PRECHECK_PORT) if set, else :data:`DEMO_PRECHECK_PORT` if free, else any free port."""
    import socket

    from .localinfra import free_port

    if wanted:
        return wanted
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", DEMO_PRECHECK_PORT))
            return DEMO_PRECHECK_PORT
        except OSError:
            return free_port()


def curl_line(url: str, key: Path, example: Path) -> str:
    return (f"curl -s -H \"Authorization: Bearer $(cat {shlex.quote(str(key))})\" "
            f"-H 'Content-Type: application/json' --data @{shlex.quote(str(example))} {url}/v1/precheck")


def _events(settings: Settings, codec: Codec, events: int, input_file: Path | None, seed: int,
            invalid_rate: float, expected_reasons: Counter[str], errors: list[Any],
            planting: Any | None, broken: set[str], tracker: ExampleTracker | None = None) -> Iterator[Any]:
    from .sim.corrupt import corrupt

    if input_file is not None:
        from .replay import read_jsonl

        yield from read_jsonl(input_file, codec, errors)
        return
    from .sim.generator import SimConfig, TrafficGenerator

    rng = random.Random(seed + 1)
    config = SimConfig(seed=seed, settlements=events)
    gen = planting.generator(config) if planting is not None else TrafficGenerator(config)
    for ev in gen.events():
        if invalid_rate and rng.random() < invalid_rate:
            bad = corrupt(codec, ev, rng)
            expected_reasons[bad.expected_reason] += 1
            broken.add(str(ev.datum["event_id"]))
            yield bad.event
        else:
            if tracker is not None:
                tracker.see(ev.record, ev.datum)
            yield OutEvent(ev.record, ev.key, ev.datum)


def run_demo(settings: Settings, *, events: int, input_file: Path | None, seed: int, invalid_rate: float,
             timeout_s: float, console: Console, replace: bool = False, plant_rate: float = 0.0,
             serve: bool = False, on_summary: Any = None) -> dict[str, Any]:
    """Run the demo; ``replace``: drop the database in the data dir even if no demo made it; ``serve``:
    keep everything running after the summary (given to ``on_summary``) until SIGINT or SIGTERM."""
    return asyncio.run(_demo(settings, events, input_file, seed, invalid_rate, timeout_s, console, replace,
                             plant_rate, serve, on_summary))


async def _serve_until_stopped(console: Console) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console.print("serving until Ctrl-C", highlight=False)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _demo(settings: Settings, events: int, input_file: Path | None, seed: int, invalid_rate: float,
                timeout_s: float, console: Console, replace: bool, plant_rate: float, serve: bool = False,
                on_summary: Any = None) -> dict[str, Any]:
    from sinks import connect
    from sinks.migrate import migrate
    from streams.app import create_app

    from .localinfra import TansuBroker
    from .schema_registry import RegistryServer, SchemaStore

    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    s = settings.model_copy(update={"web_port": 0})
    backend = connect(s.clickhouse())
    broker = None
    app = None
    registry: RegistryServer | None = None
    try:
        replaced = claim_database(backend, data_dir, replace)
        console.print(f"[bold]yibao demo[/bold]: data in {escape(str(data_dir))}", highlight=False)
        if replaced:
            console.print(f"  {escape(replaced)}", highlight=False)
        truth_path = data_dir / TRUTH_FILE
        truth_path.unlink(missing_ok=True)  # the truth of the database just dropped
        broker = TansuBroker(workdir=data_dir / "broker")
        broker.start()
        console.print(f"  broker  Tansu at {broker.bootstrap} (memory storage)")
        s = s.model_copy(update={"kafka_bootstrap": broker.bootstrap})
        registry = RegistryServer(SchemaStore.from_manifest(topic_prefix=s.topic_prefix), port=0)
        registry_url = await registry.start()
        console.print(f"  schemas Schema Registry API at {registry_url} (read-only, while the demo runs)",
                      highlight=False)
        migrate(backend)
        console.print(f"  sink    chDB {'.'.join(map(str, backend.version()))} at {s.chdb_path}")
        tables = sorted(set(PRIMARY_TABLE.values()) | {"fee_details", "dead_letters"})
        before = table_counts(backend, tables)
        source_topics = [s.topic(name) for name in STREAMS]
        dups_before = duplicates_recognised(source_topics)

        tracker: ExampleTracker | None = None
        precheck_url = key_path = None
        if input_file is None and s.rules_enabled:
            from .sim.generator import SimConfig, TrafficGenerator

            codes = [i.code for i in TrafficGenerator(SimConfig(seed=seed, settlements=events)).institutions]
            callers, key_path = prepare_precheck(data_dir, codes)
            port = precheck_port(s.precheck_port)
            s = s.model_copy(update={"precheck_port": port, "precheck_host": "127.0.0.1",
                                     "precheck_callers_file": callers})
            precheck_url = f"http://127.0.0.1:{port}"
            tracker = ExampleTracker()
            console.print(f"  check   pre-settlement check API at {precheck_url}/v1/precheck", highlight=False)
        app, _service = create_app(s.worker(), backend=backend)
        await app.start()
        codec = Codec()
        expected_reasons: Counter[str] = Counter()
        line_errors: list[Any] = []
        planting = None
        broken: set[str] = set()
        if plant_rate and input_file is None and s.rules_enabled:
            from .sim.planters import Planting

            planting = Planting("all", rate=plant_rate)
        t0 = time.monotonic()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("producing", total=None)
            stats = await produce(
                s, _events(s, codec, events, input_file, seed, invalid_rate, expected_reasons, line_errors,
                           planting, broken, tracker),
                codec, progress=lambda n: progress.advance(task, n),
            )
            progress.update(task, total=stats.sent, completed=stats.sent)
            t_produced = time.monotonic()
            expected: Counter[str] = Counter()
            for rec, n in stats.by_record.items():
                expected[PRIMARY_TABLE[rec]] += n
            wait = progress.add_task("landing", total=stats.sent)
            deadline = time.monotonic() + timeout_s
            while True:
                counts = table_counts(backend, tables)
                delta = {t: counts[t] - before[t] for t in tables}
                dups = duplicates_recognised(source_topics) - dups_before
                accounted_n = sum(delta[t] for t in expected) + delta["dead_letters"] + dups
                progress.update(wait, completed=min(accounted_n, stats.sent))
                if accounted_n >= stats.sent or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        elapsed = time.monotonic() - t0
        if s.rules_enabled:
            await _settle_alerts(backend, s.ch_database)
        landed = sum(delta[t] for t in expected)
        dl = delta["dead_letters"]
        accounted = landed + dl + dups == stats.sent and all(delta[t] <= expected[t] for t in expected)
        alerts_by_rule = alert_counts(backend, s.ch_database)
        reasons = {r: int(n) for r, n in backend.query(
            f"SELECT reason_code, count() FROM {s.ch_database}.dead_letters GROUP BY reason_code ORDER BY 2 DESC"
        ).rows}
        summary: dict[str, Any] = {
            "events_produced": stats.sent,
            "produced_by_event": dict(stats.by_record),
            "rows": {t: delta[t] for t in tables},
            "dead_letters": dl,
            "dead_letters_by_reason": reasons,
            "duplicates_recognised": dups,
            "alerts_by_rule": alerts_by_rule,
            "evaluation": _evaluation(backend, planting, broken) if planting is not None else None,
            "truth_file": None,
            "truth_anomalies": None,
            "invalid_lines": len(line_errors),
            "accounted": accounted,
            "elapsed_s": round(elapsed, 2),
            "produce_s": round(t_produced - t0, 2),
            "events_per_s": round(stats.sent / elapsed, 1) if elapsed else None,
            "data_dir": str(data_dir),
            "schema_registry_url": registry_url,
            "highlights": _highlights(backend, s.ch_database),
        }
        if planting is not None:
            truth = demo_truth(planting, broken)
            write_truth(truth_path, truth)
            summary["truth_file"] = str(truth_path)
            summary["truth_anomalies"] = len(truth)
        summary["precheck"] = None
        example = tracker.example(int(time.time() * 1000)) if tracker is not None else None
        if precheck_url is not None and key_path is not None and example is not None:
            ex_path = data_dir / PRECHECK_DIR / PRECHECK_EXAMPLE
            body = codec.to_json("cn.nhsa.yibao.settlement.Settlement", example)
            body.pop("event_id")  # a settlement being prepared has no event yet
            ex_path.write_text(json.dumps(body, ensure_ascii=False, indent=1), encoding="utf-8")
            summary["precheck"] = {"url": f"{precheck_url}/v1/precheck", "api_key_file": str(key_path),
                                   "example": str(ex_path), "curl": curl_line(precheck_url, key_path, ex_path),
                                   "serving": serve}
        _print_summary(console, summary, expected_reasons)
        if on_summary is not None:
            on_summary(summary)
        if serve:
            await _serve_until_stopped(console)
        return summary
    finally:
        if app is not None:
            await app.stop()
        if registry is not None:
            await registry.stop()
        backend.close()
        if broker is not None:
            broker.stop()


async def _settle_alerts(backend: Any, db: str, quiet_s: float = 3.0, limit_s: float = 60.0) -> None:
    """Wait until the alert count stops moving: hospital/DRG rules run on a re-keyed stream."""
    last, since, start = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - start < limit_s:
        n = int(backend.query(f"SELECT count() FROM {db}.alerts").rows[0][0])
        if n != last:
            last, since = n, time.monotonic()
        await asyncio.sleep(0.5)


def _evaluation(backend: Any, planting: Any, broken: set[str]) -> dict[str, Any]:
    """Precision and recall per rule against what the demo planted.

    An anomaly one of whose events the demo also broke on purpose (so it was dead-lettered, not
    seen by the rules) is left out: no detector could have found it.
    """
    from .sim.evaluate import alerts_from_backend, compare, rule_ids, upcoding_rules

    truth = demo_truth(planting, broken)
    result: dict[str, Any] = compare(alerts_from_backend(backend), truth, rule_ids(), by_month=upcoding_rules())
    result["left_out_broken"] = len(planting.truth()) - len(truth)
    return result


def alert_counts(backend: Any, db: str) -> dict[str, int]:
    """Standing alerts per rule (latest status of each alert id is FIRED)."""
    rows = backend.query(
        f"SELECT rule_id, count() FROM (SELECT alert_id, argMax(rule_id, detected_at) AS rule_id, "
        f"argMax(status, detected_at) AS status FROM {db}.alerts GROUP BY alert_id) "
        f"WHERE status = 'FIRED' GROUP BY rule_id ORDER BY rule_id"
    ).rows
    return {str(r): int(n) for r, n in rows}


def _highlights(backend: Any, db: str) -> dict[str, Any]:
    """What a fund supervisor would look at first, from the data just landed."""
    q = backend.query
    fund = q(
        f"SELECT insutype, count(), sum(medfee_sumamt), sum(hifp_pay), sum(fund_pay_sumamt) "
        f"FROM {db}.settlements GROUP BY insutype ORDER BY insutype"
    ).rows
    xprov = q(
        f"SELECT countIf(substring(insu_admdvs, 1, 2) != substring(mdtrt_admdvs, 1, 2)), count(), "
        f"sumIf(fund_pay_sumamt, substring(insu_admdvs, 1, 2) != substring(mdtrt_admdvs, 1, 2)) "
        f"FROM {db}.settlements WHERE refd_setl_flag = 0"
    ).rows[0]
    rev = q(f"SELECT count(), sum(fund_pay_sumamt) FROM {db}.settlements WHERE refd_setl_flag = 1").rows[0]
    top = q(
        f"SELECT fixmedins_code, count(), sum(hifp_pay) FROM {db}.settlements "
        f"GROUP BY fixmedins_code ORDER BY sum(hifp_pay) DESC LIMIT 5"
    ).rows
    return {
        "fund_by_insutype": [
            {"insutype": r[0], "settlements": int(r[1]), "medfee_sumamt": str(r[2]), "hifp_pay": str(r[3]),
             "fund_pay_sumamt": str(r[4])} for r in fund
        ],
        "cross_province": {"settlements": int(xprov[0]), "share": round(int(xprov[0]) / max(1, int(xprov[1])), 4),
                           "fund_pay_sumamt": str(xprov[2])},
        "reversals": {"count": int(rev[0]), "fund_pay_sumamt_net": str(rev[1])},
        "top_hospitals_by_hifp_pay": [
            {"fixmedins_code": r[0], "settlements": int(r[1]), "hifp_pay": str(r[2])} for r in top
        ],
    }


def _print_summary(console: Console, s: dict[str, Any], expected_reasons: Counter[str]) -> None:
    ok = "[green]yes[/green]" if s["accounted"] else "[red]NO[/red]"
    console.print(
        f"\n[bold]{s['events_produced']:,}[/bold] events in {s['elapsed_s']}s "
        f"([bold]{s['events_per_s']:,}[/bold] events/s end to end); every event accounted for: {ok}"
    )
    if s["duplicates_recognised"]:
        console.print(f"re-sent events recognised (neither landed nor dead-lettered): {s['duplicates_recognised']:,}")
    t = Table("table", "rows landed", title="ClickHouse (chDB)")
    for name, n in s["rows"].items():
        t.add_row(name, f"{n:,}")
    console.print(t)
    if s["dead_letters"]:
        d = Table("reason", "dead letters", title="Dead-lettered (sealed payload + reason, replayable)")
        for r, n in s["dead_letters_by_reason"].items():
            d.add_row(r, f"{n:,}")
        console.print(d)
    if s.get("evaluation"):
        from .sim.evaluate import report_table

        console.print(report_table(s["evaluation"]))
    elif s["alerts_by_rule"]:
        a = Table("rule", "alerts", title="Intelligent monitoring: standing alerts by rule")
        for r, n in s["alerts_by_rule"].items():
            a.add_row(r, f"{n:,}")
        console.print(a)
    else:
        console.print("intelligent monitoring: no rule fired on this traffic")
    h = s["highlights"]
    f = Table("insutype", "settlements", "medical fees", "pooled fund (hifp_pay)", "all funds",
              title="Fund payments, net of reversals")
    for r in h["fund_by_insutype"]:
        f.add_row(r["insutype"], f"{r['settlements']:,}", r["medfee_sumamt"], r["hifp_pay"], r["fund_pay_sumamt"])
    console.print(f)
    x = h["cross_province"]
    console.print(
        f"cross-province settlements: {x['settlements']:,} ({x['share']:.1%}), fund paid {x['fund_pay_sumamt']}"
    )
    console.print(f"reversals: {h['reversals']['count']:,}, fund reversed {h['reversals']['fund_pay_sumamt_net']}")
    top = Table("hospital", "settlements", "pooled fund", title="Top institutions by pooled-fund payment")
    for r in h["top_hospitals_by_hifp_pay"]:
        top.add_row(r["fixmedins_code"], f"{r['settlements']:,}", r["hifp_pay"])
    console.print(top)
    where = shlex.quote(s["data_dir"])
    query = f"yibao query --data-dir {where} \"SELECT count() FROM settlements\""
    console.print(f"\nquery it: [bold]{escape(query)}[/bold]", highlight=False)
    if s.get("truth_file"):
        left = (s["evaluation"] or {}).get("left_out_broken")
        left_out = f" ({left} more left out: the demo broke one of their events)" if left else ""
        command = f"yibao evaluate --truth {shlex.quote(s['truth_file'])} --data-dir {where}"
        console.print(f"ground truth: {s['truth_anomalies']:,} planted anomalies in {escape(s['truth_file'])}"
                      f"{left_out}", highlight=False)
        console.print(f"evaluate the rules against it: [bold]{escape(command)}[/bold]", highlight=False)
    pc = s.get("precheck")
    if pc:
        if pc["serving"]:
            console.print(f"ask the pre-settlement check what a settlement would raise: [bold]{escape(pc['curl'])}"
                          "[/bold]", highlight=False)
        else:
            console.print("the pre-settlement check stopped with the demo: run `yibao demo --serve` to keep it up "
                          f"and try {escape(pc['example'])}", highlight=False)
