"""``yibao monitors run``: evaluate the ClickHouse monitors once, on demand.

The worker runs the same monitors every ``YIBAO_MONITOR_INTERVAL_S``; this command is for an
operator who wants the figures now (after a backfill, a late income booking, or in a demo), and for
``yibao evaluate`` runs against the alerts table. Reruns are harmless: only changes are emitted.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .common import console, err, fail, guard, require_broker, settings_from

monitors_app = typer.Typer(help="Fund-operation and cross-table monitors evaluated from ClickHouse.",
                           no_args_is_help=True)


@monitors_app.command("run")
def monitors_run(
    publish: Annotated[bool, typer.Option(
        "--publish/--no-publish", help="Also produce the alerts to the alerts topic (needs Kafka)")] = True,
    as_of: Annotated[int | None, typer.Option(
        "--as-of", help="YYYYMM: judge the months before it (default: the month of the latest settlement)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    backend: Annotated[str | None, typer.Option("--backend", help="embedded|server [YIBAO_CH_BACKEND]")] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="chDB data dir [YIBAO_DATA_DIR]")] = None,
    database: Annotated[str | None, typer.Option("--database", help="ClickHouse database [YIBAO_CH_DATABASE]")] = None,
    bootstrap: Annotated[str | None, typer.Option("--bootstrap", help="Kafka [YIBAO_KAFKA_BOOTSTRAP]")] = None,
) -> None:
    """Run every enabled monitor rule once; alerts go to the alerts table (and topic)."""

    def run() -> None:
        from sinks import connect
        from streams.monitors import kafka_publisher, run_monitors
        from streams.topology import build_rulebook

        s = settings_from(backend=backend, data_dir=data_dir, database=database, bootstrap=bootstrap)
        if as_of is not None and not (190001 <= as_of <= 999912 and 1 <= as_of % 100 <= 12):
            fail(f"--as-of {as_of}: expected YYYYMM")
        if publish:
            require_broker(s, "start the broker or point YIBAO_KAFKA_BOOTSTRAP at one; --no-publish writes the "
                              "alerts to the table only")
        be = connect(s.clickhouse())
        try:
            if not be.query(f"SELECT count() FROM system.tables WHERE database = '{s.ch_database}' "
                            "AND name = 'alerts'").scalar():
                fail(f"no alerts table in database {s.ch_database}", "run `yibao migrate` first")
            with err.status("running the monitors over the closed months…"):
                result = run_monitors(be, build_rulebook(s.rules_file).current,
                                      kafka_publisher(s) if publish else None, as_of=as_of)
        finally:
            be.close()
        if as_json:
            print(json.dumps({"as_of": result.as_of, "findings": result.findings, "emitted": result.counts(),
                              "seconds": round(result.seconds, 3)}, ensure_ascii=False))
            return
        t = Table("rule", "findings", "fired", "retracted", title=f"monitors (months before {result.as_of})")
        counts = result.counts()
        for rid, n in result.findings.items():
            t.add_row(rid, str(n), str(counts.get(f"{rid}:FIRED", 0)), str(counts.get(f"{rid}:RETRACTED", 0)))
        console.print(t)

    guard(run)
