"""The `yibao` command: one entry point, a subcommand per job.

Errors the user can fix (bad settings, unreachable servers, malformed files) end with a one-line
message saying what was wrong and what to do, and exit status 2; bugs keep their traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..settings import Settings, load_settings
from .access import access_app
from .common import (
    BackendOpt,
    Bootstrap,
    ChHost,
    ChPort,
    Database,
    DataDir,
    UserError,
    configure_logging,
    console,
    err,
    fail,
    guard,
    require_broker,
    settings_from,
)
from .dlq import dlq_app
from .monitors import monitors_app
from .registry import registry_app
from .rules import alerts_command, rules_app

__all__ = ["UserError", "app", "configure_logging", "console", "err", "fail", "guard", "main", "settings_from"]

app = typer.Typer(
    name="yibao",
    help="Event pipeline of the national medical-insurance platform: Kafka → stream workers → ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
schemas_app = typer.Typer(
    help="Avro contracts: check drift and compatibility, register versions.", no_args_is_help=True
)
config_app = typer.Typer(help="Show the effective settings (secrets redacted).", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
app.add_typer(config_app, name="config")
app.add_typer(rules_app, name="rules")
app.add_typer(dlq_app, name="dlq")
app.add_typer(access_app, name="access")
app.add_typer(monitors_app, name="monitors")
app.add_typer(registry_app, name="registry")
app.command("alerts")(alerts_command)

# --- shared options ---------------------------------------------------------------------------



# --- worker -------------------------------------------------------------------------------------
@app.command()
def worker(
    bootstrap: Bootstrap = None,
    backend: BackendOpt = None,
    data_dir: DataDir = None,
    ch_host: ChHost = None,
    ch_port: ChPort = None,
    database: Database = None,
    processes: Annotated[int | None, typer.Option(help="Worker processes to run [YIBAO_PROCESSES]")] = None,
    web_port: Annotated[int | None, typer.Option(help="Metrics/health port; +i for process i; 0 disables")] = None,
    migrate_first: Annotated[bool, typer.Option("--migrate/--no-migrate", help="Apply DDL first")] = True,
    preflight: Annotated[bool, typer.Option(
        "--preflight/--no-preflight", hidden=True,
        help="Check the settings, broker and ClickHouse before starting (the children of --processes N skip it: "
             "their parent checked)")] = True,
) -> None:
    """Run the stream workers against the configured broker and ClickHouse until stopped.

    Settings, files, keys, ports, the broker and ClickHouse are checked first: every problem is
    reported on a line of its own, before anything joins a consumer group.
    """

    def run() -> None:
        s = settings_from(bootstrap=bootstrap, backend=backend, data_dir=data_dir, ch_host=ch_host,
                          ch_port=ch_port, database=database, processes=processes, web_port=web_port)
        from rich.markup import escape

        from ..worker import WorkerRefused, run_worker

        try:
            code = run_worker(s, migrate_first=migrate_first, preflight_first=preflight)
        except WorkerRefused as exc:
            for p in exc.problems:  # the command's answer to whoever started it: human in either log format
                err.print(f"[red]error:[/red] {escape(p.message)}", highlight=False)
                if p.hint:
                    err.print(f"[dim]hint: {escape(p.hint)}[/dim]", highlight=False)
            raise typer.Exit(2) from None
        raise typer.Exit(code)

    guard(run)


# --- migrate ------------------------------------------------------------------------------------
@app.command()
def migrate(
    backend: BackendOpt = None,
    data_dir: DataDir = None,
    ch_host: ChHost = None,
    ch_port: ChPort = None,
    database: Database = None,
) -> None:
    """Apply the versioned ClickHouse DDL (idempotent): lists each step as it is done, or says the
    database is up to date."""

    def run() -> None:
        from rich.markup import escape

        s = settings_from(backend=backend, data_dir=data_dir, ch_host=ch_host, ch_port=ch_port, database=database)
        from sinks import connect
        from sinks.migrate import NOTHING_TO_DO
        from sinks.migrate import migrate as do_migrate

        where = s.chdb_path if s.ch_backend.value == "embedded" else f"{s.ch_host}:{s.ch_port}"
        name = f"the {s.ch_backend.value} database {s.ch_database} at {where}"
        console.print(f"migrating {escape(name)}", highlight=False)  # connecting can take seconds
        steps: list[str] = []

        def step(line: str) -> None:
            steps.append(line)
            console.print(f"  {escape(line)}", highlight=False)

        be = connect(s.clickhouse())
        try:
            done = do_migrate(be, cluster=s.ch_cluster, progress=step)
        finally:
            be.close()
        if steps:
            console.print(f"[green]migrated[/green] {escape(name)}: {len(steps)} step(s), listed above",
                          highlight=False)
        else:
            console.print(f"[green]up to date[/green]: {escape(done[0].removeprefix(NOTHING_TO_DO))}",
                          highlight=False)

    guard(run)


# --- simulate -----------------------------------------------------------------------------------
@app.command()
def simulate(
    events: Annotated[int, typer.Option("--events", "-n", help="Settlements (other traffic scales with it)")] = 10_000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same traffic")] = 42,
    days: Annotated[int, typer.Option(help="Days of traffic to generate")] = 7,
    start: Annotated[str | None, typer.Option(
        "--start", metavar="YYYY-MM-DD",
        help="First China day of the traffic (default 2026-10-01, so a seed always gives the same traffic); "
             "the span must end before now: workers refuse events from the future")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write JSON lines here instead of to Kafka")] = None,
    bootstrap: Bootstrap = None,
    plant: Annotated[str | None, typer.Option(
        "--plant", help="Plant anomalies for these rules: all, or rule ids separated by commas")] = None,
    plant_rate: Annotated[float, typer.Option(
        "--plant-rate", help="Probability that an eligible settlement gets a planted anomaly")] = 0.002,
    truth: Annotated[Path | None, typer.Option(
        "--truth", help="Write the planted anomalies (ground truth, JSON lines) here")] = None,
    shuffle_within: Annotated[float, typer.Option(
        "--shuffle-within", metavar="SECONDS",
        help="Deliver out of event-time order, as many producers do: each event up to SECONDS late, so none "
             "arrives after an event whose event time is more than SECONDS later (0: in event-time order)")] = 0.0,
    resend_rate: Annotated[float, typer.Option(
        "--resend-rate", metavar="R",
        help="Probability that an event is sent again later, byte for byte, as a retrying producer does "
             "(the workers recognise it by identity)")] = 0.0,
) -> None:
    """Generate realistic synthetic traffic for all three subsystems (to Kafka or a JSONL file)."""

    def run() -> None:
        from schemas import Codec

        from ..sim.generator import SimConfig, TrafficGenerator, write_jsonl
        from ..sim.planters import Planting
        from ..sim.planting import PlantError

        _check_delivery(shuffle_within, resend_rate)
        first_day = _check_span(start, days)
        planting = None
        if plant is not None:
            if truth is None:
                fail("--plant needs --truth FILE", "the ground truth is what `yibao evaluate` compares alerts with")
            try:
                planting = Planting(plant, rate=plant_rate)
            except PlantError as exc:
                fail(str(exc))
        elif truth is not None:
            fail("--truth needs --plant", "e.g. --plant all --plant-rate 0.002")
        s = None
        if out is None:  # a wrong broker is said at once, not after generating the traffic
            s = settings_from(bootstrap=bootstrap)
            require_broker(s, "start the broker, point YIBAO_KAFKA_BOOTSTRAP (or --bootstrap) at one, "
                              "or write the events to a file with --out FILE.jsonl")
        codec = Codec()
        config = SimConfig(seed=seed, settlements=events, days=days, **({"start": first_day} if first_day else {}))
        gen = planting.generator(config) if planting is not None else TrafficGenerator(config)
        resends: int | None = None  # re-sends added by --resend-rate, when delivery is simulated
        events_out: Iterable[Any] = gen.events()
        if shuffle_within > 0 or resend_rate > 0:
            from ..sim.delivery import deliver

            with _progress("generating") as bar:
                generated = list(_tick(events_out, bar))
            events_out = deliver(generated, shuffle_within_s=shuffle_within, resend_rate=resend_rate, seed=seed)
            resends = len(events_out) - len(generated)
        if out is not None:
            if resends is None:
                with _progress("generating") as bar:
                    n = write_jsonl(_tick(events_out, bar), out, codec)
            else:
                n = write_jsonl(events_out, out, codec)
            console.print(f"wrote {n} events to {out}")
        else:
            assert s is not None
            stats = _produce_with_progress(s, events_out, codec, "producing")
            _print_counts("produced", stats.by_record)
        if resends is not None:
            in_days = f" ({shuffle_within / 86_400:.1f} days)" if shuffle_within >= 86_400 else ""
            shuffled = f", shuffled within {shuffle_within:,.0f} s{in_days} of event time" if shuffle_within else ""
            console.print(f"delivery: {resends} re-sends added{shuffled}")
        if planting is not None and truth is not None:
            n = planting.write_truth(truth)
            gone = sum(1 for a in planting.truth() if a["reversed"])
            console.print(f"planted {n} anomalies ({gone} later reversed by the base traffic); ground truth in {truth}")

    guard(run)


# --- evaluate -----------------------------------------------------------------------------------
@app.command()
def evaluate(
    truth: Annotated[Path, typer.Option("--truth", help="Ground truth from `yibao simulate --plant ... --truth`")],
    alerts_file: Annotated[Path | None, typer.Option(
        "--alerts", help="Alerts as JSON lines instead of the ClickHouse alerts table")] = None,
    events_file: Annotated[Path | None, typer.Option(
        "--events", help="Run the rules in process on these events (JSON lines, e.g. from `simulate --out`), in "
                         "file order; also counts the re-sent events recognised (duplicates_recognised)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table")] = False,
    monitors: Annotated[bool, typer.Option(
        "--monitors/--no-monitors",
        help="Also run the ClickHouse monitor rules (fund, settled-over-sold, credit): with --events on a "
             "throw-away chDB database, else on the backend's tables as they are now (nothing is written)")] = True,
    backend: BackendOpt = None,
    data_dir: DataDir = None,
    ch_host: ChHost = None,
    ch_port: ChPort = None,
    database: Database = None,
) -> None:
    """Precision and recall of the rules per rule: alerts against planted anomalies."""

    def run() -> None:
        from ..sim.evaluate import alerts_from_backend, compare, read_alerts, report_table, rule_ids, upcoding_rules
        from ..sim.planters import read_truth

        s = settings_from(backend=backend, data_dir=data_dir, ch_host=ch_host, ch_port=ch_port, database=database)
        for f in (truth, alerts_file, events_file):
            if f is not None and not f.exists():
                fail(f"{f}: no such file")
            if f is not None and f.is_dir():
                fail(f"{f} is a directory", "name a JSON-lines file")
        if alerts_file is not None and events_file is not None:
            fail("--alerts and --events exclude each other")
        try:
            planted = read_truth(truth)
            alerts = read_alerts(alerts_file) if alerts_file is not None else None
        except ValueError as exc:
            fail(str(exc))
        duplicates: int | None = None
        with _Phases() as phases:
            if events_file is not None:
                from schemas import Codec

                from ..replay import LineError, read_jsonl
                from ..sim.evaluate import run_events

                total = _count_lines(events_file)
                errors: list[LineError] = []
                phases("running the rules in process", 0, total)
                ran = run_events(read_jsonl(events_file, Codec(), errors), s, collect_tables=monitors,
                                 progress=lambda k: phases("running the rules in process", k, total))
                if errors:
                    fail(f"{events_file}:{errors[0].line}: {errors[0].message}", f"{len(errors)} invalid line(s)")
                alerts = ran.alerts
                duplicates = sum(ran.duplicates.values())
                if monitors:
                    from ..sim.evaluate import monitor_alerts, monitor_database

                    phases("monitor rules on a throw-away chDB database", 0, None)
                    with monitor_database(s) as mon_db:
                        alerts = [*alerts, *monitor_alerts(ran, mon_db, s)]
            if alerts is None:
                from sinks import connect

                phases(f"reading alerts from the {s.ch_backend.value} database {s.ch_database}", 0, None)
                be = connect(s.clickhouse())
                try:
                    exists = be.query(
                        f"SELECT count() FROM system.databases WHERE name = '{s.ch_database}'").rows[0][0]
                    if not exists:
                        fail(f"database {s.ch_database} does not exist on the {s.ch_backend.value} backend",
                             "run the workers (or `yibao demo`) first, or pass --alerts FILE")
                    be.use_database()
                    alerts = alerts_from_backend(be)
                    if monitors:  # what a monitor run would change now (retractions included)
                        from streams.monitors import evaluate as evaluate_monitors
                        from streams.topology import build_rulebook

                        phases("monitor rules on the database as it is (nothing written)", 0, None)
                        alerts = [*alerts, *evaluate_monitors(be, build_rulebook(s.rules_file).current).emitted]
                finally:
                    be.close()
        result = compare(alerts, planted, rule_ids(s), by_month=upcoding_rules(s))
        if duplicates is not None:  # re-sent events the processors recognised (and did not land twice)
            result["duplicates_recognised"] = duplicates
        if as_json:
            print(json.dumps(result, ensure_ascii=False))
            return
        console.print(report_table(result))

    guard(run)


# --- replay -------------------------------------------------------------------------------------
@app.command()
def replay(
    file: Annotated[Path, typer.Argument(help="JSON lines: one object per event, with event_type")],
    bootstrap: Bootstrap = None,
    max_errors: Annotated[int, typer.Option(help="Lines reported in detail")] = 20,
) -> None:
    """Produce events from a JSON-lines file. Invalid lines are reported on stderr as FILE:LINE: what is
    wrong, and skipped; the valid ones are still produced.

    Exit status: 0 when every line was produced, 1 when any line was invalid (the others were
    produced), 2 when nothing could be done (no such file, no broker, bad settings).
    """

    def run() -> None:
        from rich.markup import escape

        from schemas import Codec

        from ..replay import LineError, read_jsonl

        if not file.exists():
            fail(f"{file}: no such file")
        if file.is_dir():
            fail(f"{file} is a directory", "name a JSON-lines file, e.g. from `yibao simulate --out FILE`")
        s = settings_from(bootstrap=bootstrap)
        require_broker(s, "`yibao simulate --out FILE` and `yibao evaluate --events FILE` work without one")
        codec = Codec()
        errors: list[LineError] = []
        stats = _produce_with_progress(s, read_jsonl(file, codec, errors), codec, "replaying")
        _print_counts("produced", stats.by_record)
        for e in errors[:max_errors]:
            err.print(f"[yellow]{escape(str(file))}:{e.line}:[/yellow] {escape(e.message)}", highlight=False)
        if len(errors) > max_errors:
            err.print(f"… and {len(errors) - max_errors} more invalid lines")
        console.print(f"{stats.sent:,} events produced, {len(errors):,} invalid lines skipped", highlight=False)
        if errors:
            raise typer.Exit(1)

    guard(run)


# --- query --------------------------------------------------------------------------------------
#: What `yibao query --format` can print.
QUERY_FORMATS = ("table", "csv", "tsv", "json")


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL to run against the configured ClickHouse backend")],
    fmt: Annotated[str, typer.Option(
        "--format", "-f", metavar="FORMAT",
        help="table (for people); csv (RFC 4180, header row, NULL empty); tsv (header row, tab/newline/backslash "
             "escaped, NULL as \\N); json (JSON lines: one object per row, decimals and times as strings)")
    ] = "table",
    backend: BackendOpt = None,
    data_dir: DataDir = None,
    ch_host: ChHost = None,
    ch_port: ChPort = None,
    database: Database = None,
) -> None:
    """Run one SQL statement and print the result."""

    def run() -> None:
        from rich.markup import escape

        from sinks.base import SinkError, SinkUnavailable

        if fmt not in QUERY_FORMATS:
            fail(f"--format {fmt}: unknown format; use {', '.join(QUERY_FORMATS)}")
        s = settings_from(backend=backend, data_dir=data_dir, ch_host=ch_host, ch_port=ch_port, database=database)
        from sinks import connect

        be = connect(s.clickhouse())
        try:
            exists = be.query(f"SELECT count() FROM system.databases WHERE name = '{s.ch_database}'").rows[0][0]
            if not exists:
                fail(f"database {s.ch_database} does not exist on the {s.ch_backend.value} backend",
                     "run `yibao migrate` (or `yibao demo`) first, or pass --database/--data-dir")
            be.use_database()
            try:
                res = be.query(sql)
            except SinkUnavailable:
                raise
            except SinkError as exc:
                hint = (f'`yibao query "SHOW TABLES"` lists the tables of {s.ch_database}'
                        if exc.code == 60 else None)  # UNKNOWN_TABLE
                fail(f"the query failed: {exc}", hint)
        finally:
            be.close()
        try:
            if fmt == "table":
                t = Table(*(escape(c) for c in res.columns), show_lines=False)
                for row in res.rows:
                    t.add_row(*(escape("" if v is None else str(v)) for v in row))
                console.print(t)
                console.print(f"[dim]{len(res.rows)} row(s)[/dim]")
            else:
                _write_rows(sys.stdout, fmt, res.columns, res.rows)
                sys.stdout.flush()
        except BrokenPipeError:  # `yibao query … | head`: the reader has all it wanted
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    guard(run)


def _write_rows(out: Any, fmt: str, columns: list[str], rows: Iterable[Any]) -> None:
    """Rows as csv, tsv or JSON lines (see `yibao query --help`), for spreadsheets, scripts and jq."""
    import csv

    if fmt == "json":
        for row in rows:
            out.write(json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False, default=str) + "\n")
        return
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180: CRLF, quotes only where needed
        writer.writerow(columns)
        writer.writerows(["" if v is None else _cell(v) for v in row] for row in rows)
        return
    out.write("\t".join(_tsv_escape(c) for c in columns) + "\n")
    for row in rows:
        out.write("\t".join("\\N" if v is None else _tsv_escape(_cell(v)) for v in row) + "\n")


def _cell(value: Any) -> str:
    """One value as text: arrays, tuples and maps as JSON, the rest as Python prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _tsv_escape(text: str) -> str:
    """ClickHouse's TabSeparated escaping, so that a value never breaks a line or a column."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# --- report -------------------------------------------------------------------------------------
@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write")] = Path("report.html"),
    days: Annotated[int, typer.Option("--days", help="Days of alerts to chart (up to the latest day)")] = 90,
    backend: BackendOpt = None,
    data_dir: DataDir = None,
    ch_host: ChHost = None,
    ch_port: ChPort = None,
    database: Database = None,
) -> None:
    """Write a self-contained HTML dashboard of the BI views (opens offline: no scripts, fonts or CDNs)."""

    def run() -> None:
        if days < 1:
            fail(f"--days {days}: must be at least 1")
        if out.exists() and out.is_dir():
            fail(f"--out {out} is a directory", "name the HTML file to write, e.g. --out report.html")
        if not out.parent.is_dir():
            fail(f"--out {out}: directory {out.parent} does not exist")
        s = settings_from(backend=backend, data_dir=data_dir, ch_host=ch_host, ch_port=ch_port, database=database)
        from sinks import connect

        from ..report import ReportError, load, render

        names = _rule_names(s)
        be = connect(s.clickhouse())
        try:
            exists = be.query(f"SELECT count() FROM system.databases WHERE name = '{s.ch_database}'").rows[0][0]
            if not exists:
                fail(f"database {s.ch_database} does not exist on the {s.ch_backend.value} backend",
                     "run `yibao migrate` (or `yibao demo`) first, or pass --database/--data-dir")
            try:
                data = load(be, backend_name=s.ch_backend.value, alert_days=days, rule_names=names,
                            progress=lambda m: console.print(f"  {m}"))
            except ReportError as exc:
                fail(str(exc), exc.hint)
        finally:
            be.close()
        text = render(data)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(out)  # a reader never sees half a report
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            fail(f"cannot write {out}: {exc.strerror or exc}")
        console.print(f"[green]wrote[/green] {out} ({len(text.encode('utf-8')) / 1024:.0f} KiB) from the "
                      f"{s.ch_backend.value} database {s.ch_database}")

    guard(run)


def _rule_names(s: Settings) -> dict[str, str]:
    """Rule id → English name from the configured rule base, for the alerts chart's legend.

    Best effort: a rule base that does not load costs the report its rule names, not its charts.
    """
    from streams.rules import RULES_FILE, RuleError, check_rule, load_rules_file

    try:
        return {r.id: r.name_en for r in load_rules_file(s.rules_file or RULES_FILE, check_rule)}
    except (RuleError, OSError, ValueError):
        return {}


# --- demo ---------------------------------------------------------------------------------------
@app.command()
def demo(
    events: Annotated[int, typer.Option("--events", "-n", help="Settlements to generate")] = 20_000,
    input_file: Annotated[Path | None, typer.Option("--input", help="Replay this JSONL file instead")] = None,
    data_dir: DataDir = None,
    seed: Annotated[int, typer.Option(help="Traffic seed")] = 42,
    invalid_rate: Annotated[float, typer.Option(help="Share of events broken on purpose (dead-lettering)")] = 0.01,
    plant_rate: Annotated[float, typer.Option(
        help="Rate of planted anomalies for the monitoring rules (0: none); their ground truth is written to "
             "DATA_DIR/demo-truth.jsonl, for `yibao evaluate --truth`")] = 0.004,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Drop the database in the data dir even if no demo made it (its data is lost); "
                          "a previous demo's database is always replaced")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary object as the last line")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every event to be accounted for")] = 600.0,
    serve: Annotated[bool, typer.Option(
        "--serve", help="Keep the broker, worker, schema registry and pre-settlement check API running after the "
                        "summary, until Ctrl-C (it prints a curl line to try the check with)")] = False,
) -> None:
    """Start a local broker, run the workers on embedded chDB, generate traffic, show what landed.

    The demo starts from an empty database in the data dir: it replaces the one a previous demo
    left there (and says so), and refuses to drop one it did not make unless --replace is given.
    """

    def run() -> None:
        if not 0 <= invalid_rate < 1:
            fail("--invalid-rate must be in [0, 1)")
        if not 0 <= plant_rate <= 1:
            fail("--plant-rate must be in [0, 1]")
        if input_file is not None and not input_file.is_file():
            fail(f"--input {input_file}: no such file")
        s = settings_from(data_dir=data_dir, backend="embedded")
        configure_logging("WARNING", s.log_format.value)  # the summary is the demo's output; warnings still show
        from ..demo import DemoRefused, run_demo

        def show(summary: dict[str, object]) -> None:
            if as_json:
                print(json.dumps(summary, ensure_ascii=False, default=str), flush=True)

        try:
            summary = run_demo(s, events=events, input_file=input_file, seed=seed, invalid_rate=invalid_rate,
                               timeout_s=timeout, console=console if not as_json else err,
                               plant_rate=plant_rate, replace=replace, serve=serve, on_summary=show)
        except DemoRefused as exc:
            fail(str(exc), exc.hint)
        if not summary["accounted"]:
            raise typer.Exit(1)

    guard(run)


# --- bench --------------------------------------------------------------------------------------
@app.command()
def bench(
    events: Annotated[int, typer.Option("--events", "-n", help="Settlements to push through")] = 50_000,
    processes: Annotated[str, typer.Option(
        help="Worker processes: a count, or counts separated by commas to compare (each gets both passes)")] = "1,2",
    latency_seconds: Annotated[float, typer.Option(
        help="Length of the alert-latency window (at half the all-rules rate); 0 skips it")] = 20.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON")] = False,
    population: Annotated[str, typer.Option(
        help="Instead: the rule state of populations of these sizes (e.g. 100000,1000000): memory, changelog "
             "bytes and restore time per person")] = "",
    state_store: Annotated[str, typer.Option(
        help="--population: the rule state in memory, on disk (RocksDB), or both (memory,disk)")] = "memory,disk",
    precheck: Annotated[bool, typer.Option(
        "--precheck", help="Measure the pre-settlement check's latency while the workers ingest, instead")] = False,
    check_rate: Annotated[float, typer.Option(help="--precheck: checks a second (open loop)")] = 200.0,
    ingest_rate: Annotated[float, typer.Option(help="--precheck: settlements a second produced meanwhile")] = 1000.0,
    seconds: Annotated[float, typer.Option(help="--precheck: length of the measured window")] = 30.0,
) -> None:
    """Measure end-to-end settlements/s (broker → worker → ClickHouse server) and per-stage cost; with
    --precheck, the pre-settlement check's latency percentiles under a steady load."""

    def run() -> None:
        from ..bench import MIN_EVENTS, BenchError, print_figures, run_bench
        from ..localinfra import InfraError

        if population:
            from ..bench_population import print_population_figures, run_population_bench

            sizes = _process_counts(population, 100_000_000, "--population")
            if min(sizes) < 1000:
                fail(f"--population {population}: at least 1,000 persons")
            stores = tuple(x.strip() for x in state_store.split(",") if x.strip())
            if not stores or not set(stores) <= {"memory", "disk"}:
                fail(f"--state-store {state_store}: memory, disk, or both separated by a comma")
            with _Phases() as phases:
                figures = run_population_bench(sizes, progress=phases, stores=stores)
            print_population_figures(console if not as_json else err, figures)
            if as_json:
                print(json.dumps(figures, ensure_ascii=False))
            return
        if precheck:
            from ..bench_precheck import print_precheck_figures, run_precheck_bench

            if not (0 < check_rate <= 5000 and 0 <= ingest_rate <= 100_000 and 5 <= seconds <= 3600):
                fail("--check-rate must be in (0, 5000], --ingest-rate in [0, 100000], --seconds in [5, 3600]")
            counts = _process_counts(processes, 16)
            if len(counts) != 1:
                fail(f"--processes {processes}: one count with --precheck")
            try:
                with _Phases() as phases:
                    figures = run_precheck_bench(check_rate=check_rate, ingest_rate=ingest_rate, seconds=seconds,
                                                 processes=counts[0], progress=phases)
            except BenchError as exc:
                fail(str(exc), f"the workers' log: {exc.log}")
            except InfraError as exc:
                first, _, rest = str(exc).partition("\n")
                fail(first, f"its log ends: {rest.strip().splitlines()[-1]}" if rest.strip() else None)
            print_precheck_figures(console if not as_json else err, figures)
            if as_json:
                print(json.dumps(figures, ensure_ascii=False))
            return

        if events < MIN_EVENTS:
            fail(f"--events {events}: at least {MIN_EVENTS:,} settlements",
                 "a smaller run lands before it can be timed; 50,000 gives steady figures")
        counts = _process_counts(processes, 64)
        if not (latency_seconds == 0 or 5 <= latency_seconds <= 3600):
            fail(f"--latency-seconds {latency_seconds:g}: 0 (skip) or 5 to 3600")
        try:
            with _Phases() as phases:
                figures = run_bench(events=events, processes=counts, latency_seconds=latency_seconds, progress=phases)
        except BenchError as exc:
            fail(str(exc), f"the workers' log: {exc.log}")
        except InfraError as exc:  # a server binary missing or not starting: its message says which
            first, _, rest = str(exc).partition("\n")
            fail(first, f"its log ends: {rest.strip().splitlines()[-1]}" if rest.strip() else None)
        print_figures(console if not as_json else err, figures)
        if as_json:
            print(json.dumps(figures, ensure_ascii=False))

    guard(run)


def _process_counts(text: str, most: int, option: str = "--processes") -> list[int]:
    """A count or counts separated by commas ("2", "1,2"); one clear line for anything else."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        counts = []
    if not counts or not all(1 <= n <= most for n in counts):
        fail(f"{option} {text}: a count from 1 to {most:,}, or several separated by commas (1,2)")
    return counts


# --- schemas ------------------------------------------------------------------------------------
@schemas_app.command("check")
def schemas_check() -> None:
    """Fail when a contract changed without being registered, or a version breaks compatibility."""

    def run() -> None:
        from schemas import Registry
        from schemas.registry import backward_incompatibilities

        reg = Registry.load()
        problems = []
        for subject in reg.subjects():
            versions = reg.versions(subject)
            for prev, cur in itertools.pairwise(versions):
                for p in backward_incompatibilities(cur.schema, prev.schema):
                    problems.append(f"{subject} v{cur.version} cannot read v{prev.version}: {p}")
        drift = reg.drift()
        for subject in drift:
            problems.append(f"{subject}: .avsc files changed; run `yibao schemas register`")
        if problems:
            for p in problems:
                err.print(f"[red]✗[/red] {p}")
            raise typer.Exit(1)
        console.print(f"[green]✓[/green] {len(reg.subjects())} subjects registered, no drift")

    guard(run)


@schemas_app.command("register")
def schemas_register(
    registry_url: Annotated[str | None, typer.Option(
        "--registry-url",
        help="Publish the manifest's versions to this Schema Registry under <topic>-value, keeping their ids "
             "and versions (IMPORT mode) [YIBAO_SCHEMA_REGISTRY_URL; credentials, TLS: YIBAO_SCHEMA_REGISTRY_*]",
    )] = None,
) -> None:
    """Register changed contracts as new versions (refused when not BACKWARD compatible); with a
    registry URL, publish the registered versions to that Schema Registry instead."""

    def run() -> None:
        from schemas import Registry

        reg = Registry.load()
        s = settings_from(schema_registry_url=registry_url)
        cfg = s.schema_registry()
        if cfg is not None:
            from schemas.registry_client import RegistryConflict, SchemaRegistryClient, publish_manifest

            client = SchemaRegistryClient(cfg)
            console.print(f"publishing the schema manifest to the schema registry at {client.base}", highlight=False)
            try:
                done = publish_manifest(client, reg, s.topic_prefix)
            except RegistryConflict as exc:
                fail(str(exc), exc.hint)
            for p in done:
                state = "registered" if p.registered else "already registered"
                console.print(f"{p.subject} v{p.version}: {state} as schema id {p.id}", highlight=False)
            new = sum(p.registered for p in done)
            console.print(f"{len(done)} versions: {new} registered, {len(done) - new} already there", highlight=False)
            return
        for subject in reg.subjects():
            sv = reg.register(subject)
            if sv:
                console.print(f"registered {subject} v{sv.version} as schema id {sv.id}")
            else:
                console.print(f"{subject}: unchanged")

    guard(run)


@schemas_app.command("show")
def schemas_show(
    subject: Annotated[str | None, typer.Argument(help="Subject, e.g. settlement or yibao.settlement-value")] = None,
    schema_id: Annotated[int | None, typer.Option("--id", help="Look up by schema id")] = None,
) -> None:
    """Print registered subjects, or one schema by subject or id."""

    def run() -> None:
        from schemas import Registry

        reg = Registry.load()
        if schema_id is not None:
            sv = reg.by_id(schema_id)
        elif subject is not None:
            sv = reg.by_subject(subject) if subject.endswith("-value") else reg.latest(subject)
        else:
            t = Table("subject", "versions", "latest id", "records")
            for sub in reg.subjects():
                vs = reg.versions(sub)
                t.add_row(sub, str(len(vs)), str(vs[-1].id), ", ".join(r.rsplit(".", 1)[-1] for r in vs[-1].records))
            console.print(t)
            return
        print(json.dumps(sv.schema, ensure_ascii=False, indent=2))

    guard(run)


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings; secrets are shown as asterisks."""

    def run() -> None:
        s = load_settings()
        t = Table("setting", "environment variable", "value")
        for k, v in s.redacted().items():
            t.add_row(k, f"YIBAO_{k.upper()}", str(v))
        console.print(t)

    guard(run)


# --- helpers ------------------------------------------------------------------------------------
def _check_span(start: str | None, days: int) -> Any:
    """The first day of simulated traffic (None: the generator's fixed default), refused in one line
    when the span is empty or reaches past now: a worker dead-letters future events (FUTURE_TIME)."""
    import datetime as dt

    from schemas.calendar import CHINA

    from ..sim.generator import DEFAULT_START

    if days < 1:
        fail(f"--days {days}: must be at least 1")
    first = DEFAULT_START
    if start is not None:
        try:
            first = dt.datetime.combine(dt.date.fromisoformat(start), dt.time(), CHINA)
        except ValueError:
            fail(f"--start {start!r}: expected a date YYYY-MM-DD")
    end = first + dt.timedelta(days=days)
    now = dt.datetime.now(CHINA)
    if end > now:
        latest = (now - dt.timedelta(days=days)).date()
        fail(f"--days {days} from {first.date()} ends {end.date()}, after today ({now.date()}): the workers "
             "would dead-letter the later events as FUTURE_TIME", f"start earlier, e.g. --start {latest}")
    return first if start is not None else None


def _check_delivery(shuffle_within: float, resend_rate: float) -> None:
    """The delivery options (yibao.sim.delivery.deliver), refused in one line when out of range."""
    import math

    if not (math.isfinite(shuffle_within) and shuffle_within >= 0):
        fail(f"--shuffle-within {shuffle_within:g}: must be a number of seconds ≥ 0")
    if not 0 <= resend_rate <= 1:
        fail(f"--resend-rate {resend_rate:g}: must be in [0, 1]")


def _progress(label: str, total: int | None = None) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return _Bar(Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         console=err, transient=False), total)


class _Bar:
    def __init__(self, progress: Any, total: int | None) -> None:
        self.progress = progress
        self.total = total
        self.task: Any = None

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        self.task = self.progress.add_task("", total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


class _Phases:
    """Progress of a command that goes through phases (bench, evaluate), on stderr: one bar per
    phase, called as ``phases(phase, done, total)``; a phase that starts ends the one before.

    Not a terminal (a pipe, a log): the bars are written once, as they ended, and not at all when
    the command fails, so its error line is the first thing on stderr."""

    def __init__(self) -> None:
        import io

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.live = err.is_terminal
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=False,
                                 console=err if self.live else Console(file=io.StringIO()))
        self.tasks: dict[str, Any] = {}
        self.current: Any = None

    def __enter__(self) -> _Phases:
        self.progress.__enter__()
        return self

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        task = self.tasks.get(phase)
        if task is None:
            self._end_current()
            task = self.tasks[phase] = self.current = self.progress.add_task(phase, total=total)
        self.progress.update(task, completed=done, total=total)

    def _end_current(self) -> None:
        if self.current is not None:
            t = next(t for t in self.progress.tasks if t.id == self.current)
            if t.total is None:  # nothing was counted: the bar shows the phase as done
                self.progress.update(self.current, total=1, completed=1)
            self.progress.stop_task(self.current)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self._end_current()
        elif self.live:  # the error line is then the first thing on stderr, not the bars
            self.progress.live.transient = True
        self.progress.__exit__(exc_type, exc, tb)
        if exc_type is None and not self.live and self.tasks:
            err.print(self.progress.get_renderable())


def _count_lines(path: Path) -> int:
    """Non-empty lines of ``path``: the total a progress bar over its events counts to."""
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _tick(it: Any, bar: _Bar, every: int = 1000) -> Any:
    n = 0
    for x in it:
        yield x
        n += 1
        if n % every == 0:
            bar.advance(every)
    bar.advance(n % every)


def _produce_with_progress(s: Settings, events: Any, codec: Any, label: str) -> Any:
    from ..producer import produce

    with _progress(label) as bar:
        return asyncio.run(produce(s, events, codec, progress=bar.advance))


def _print_counts(title: str, counts: Any) -> None:
    t = Table("event", title)
    for k, v in sorted(counts.items()):
        t.add_row(k, f"{v:,}")
    console.print(t)


def main() -> None:
    """The console script: click's usage errors (a misspelt option, a value of the wrong type) end
    as one ``error:`` line and a hint like every other fixable mistake, not in a framed panel."""
    try:
        from typer._click import exceptions as cx  # typer vendors click since 0.2x
    except ImportError:  # pragma: no cover
        from click import exceptions as cx  # type: ignore[no-redef]

    from .common import say_error

    started = time.monotonic()
    try:
        code = app(standalone_mode=False)
    except cx.NoArgsIsHelpError:  # `yibao` or `yibao rules` alone: typer has printed its help
        code = 0
    except cx.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "yibao"
        say_error(exc.format_message(), f"see `{where} --help`")
        code = exc.exit_code
    except cx.ClickException as exc:
        say_error(exc.format_message())
        code = exc.exit_code
    except typer.Abort:
        err.print("interrupted")
        code = 130
    finally:
        if "--verbose-timing" in sys.argv:
            err.print(f"{time.monotonic() - started:.1f}s")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
