"""`yibao demo`: the whole pipeline on one machine with nothing installed but the package.

A local Tansu broker (memory storage), the worker's ingest service on embedded chDB in this
process, realistic traffic (or a JSONL file), then a wait until every produced event is accounted
for: landed in its primary table or dead-lettered. The data stays under ``--data-dir``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from schemas import Codec

from .producer import OutEvent, produce
from .settings import Settings

#: Record → the table holding exactly one row per landed event of that record.
PRIMARY_TABLE = {
    "Settlement": "settlements", "SettlementReversal": "settlements",
    "CrossProvinceFiling": "cross_province_filings",
    "ProcurementContract": "proc_contracts", "ProcurementOrder": "proc_orders",
    "DeliveryAcceptance": "proc_deliveries", "InventoryMovement": "inventory_movements",
    "SupplierPayment": "supplier_payments",
    "Inspection": "inspections", "Tip": "tips", "Penalty": "penalties", "FundRecovery": "fund_recoveries",
    "FundIncome": "fund_income",
}


def table_counts(backend: Any, tables: list[str]) -> dict[str, int]:
    db = backend.database
    return {t: int(backend.query(f"SELECT count() FROM {db}.{t}").rows[0][0]) for t in tables}


def _events(settings: Settings, codec: Codec, events: int, input_file: Path | None, seed: int,
            invalid_rate: float, expected_reasons: Counter[str], errors: list[Any]) -> Iterator[Any]:
    from .corrupt import corrupt

    if input_file is not None:
        from .replay import read_jsonl

        yield from read_jsonl(input_file, codec, errors)
        return
    from .simulate import SimConfig, TrafficGenerator

    rng = random.Random(seed + 1)
    for ev in TrafficGenerator(SimConfig(seed=seed, settlements=events)).events():
        if invalid_rate and rng.random() < invalid_rate:
            bad = corrupt(codec, ev, rng)
            expected_reasons[bad.expected_reason] += 1
            yield bad.event
        else:
            yield OutEvent(ev.record, ev.key, ev.datum)


def run_demo(settings: Settings, *, events: int, input_file: Path | None, seed: int, invalid_rate: float,
             timeout_s: float, console: Console, fresh: bool = True) -> dict[str, Any]:
    return asyncio.run(_demo(settings, events, input_file, seed, invalid_rate, timeout_s, console, fresh))


async def _demo(settings: Settings, events: int, input_file: Path | None, seed: int, invalid_rate: float,
                timeout_s: float, console: Console, fresh: bool) -> dict[str, Any]:
    from sinks.migrate import migrate
    from streams.app import create_app, make_backend

    from .localinfra import TansuBroker

    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]yibao demo[/bold]: data in {data_dir}")
    broker = TansuBroker(workdir=data_dir / "broker")
    broker.start()
    console.print(f"  broker  Tansu at {broker.bootstrap} (memory storage)")
    s = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap, "web_port": 0})
    backend = make_backend(s)
    app = None
    try:
        if fresh:
            backend.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
        migrate(backend)
        console.print(f"  sink    chDB {'.'.join(map(str, backend.version()))} at {s.chdb_path}")
        tables = sorted(set(PRIMARY_TABLE.values()) | {"fee_details", "dead_letters"})
        before = table_counts(backend, tables)

        app, _service = create_app(s, backend=backend)
        await app.start()
        codec = Codec()
        expected_reasons: Counter[str] = Counter()
        line_errors: list[Any] = []
        t0 = time.monotonic()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("producing", total=None)
            stats = await produce(
                s, _events(s, codec, events, input_file, seed, invalid_rate, expected_reasons, line_errors),
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
                accounted_n = sum(delta[t] for t in expected) + delta["dead_letters"]
                progress.update(wait, completed=min(accounted_n, stats.sent))
                if accounted_n >= stats.sent or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        elapsed = time.monotonic() - t0
        landed = sum(delta[t] for t in expected)
        dl = delta["dead_letters"]
        accounted = landed + dl == stats.sent and all(delta[t] <= expected[t] for t in expected)
        reasons = {r: int(n) for r, n in backend.query(
            f"SELECT reason_code, count() FROM {s.ch_database}.dead_letters GROUP BY reason_code ORDER BY 2 DESC"
        ).rows}
        summary: dict[str, Any] = {
            "events_produced": stats.sent,
            "produced_by_event": dict(stats.by_record),
            "rows": {t: delta[t] for t in tables},
            "dead_letters": dl,
            "dead_letters_by_reason": reasons,
            "invalid_lines": len(line_errors),
            "accounted": accounted,
            "elapsed_s": round(elapsed, 2),
            "produce_s": round(t_produced - t0, 2),
            "events_per_s": round(stats.sent / elapsed, 1) if elapsed else None,
            "data_dir": str(data_dir),
            "highlights": _highlights(backend, s.ch_database),
        }
        _print_summary(console, summary, expected_reasons)
        return summary
    finally:
        if app is not None:
            await app.stop()
        backend.close()
        broker.stop()


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
    t = Table("table", "rows landed", title="ClickHouse (chDB)")
    for name, n in s["rows"].items():
        t.add_row(name, f"{n:,}")
    console.print(t)
    if s["dead_letters"]:
        d = Table("reason", "dead letters", title="Dead-lettered (sealed payload + reason, replayable)")
        for r, n in s["dead_letters_by_reason"].items():
            d.add_row(r, f"{n:,}")
        console.print(d)
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
    query = f"yibao query --data-dir {s['data_dir']} \"SELECT count() FROM settlements\""
    console.print(f"\nquery it: [bold]{query}[/bold]")
