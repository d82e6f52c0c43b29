"""`yibao dlq`: the newest dead letters and counts by reason, one in detail, replay after a fix
(the work: yibao.dlq)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import structlog
import typer
from rich.markup import escape

from sinks.base import Backend, literal

from ..dlq import (
    describe,
    make_sealer,
    parse_since,
    plan_replay,
    primary_tables,
    produce_raw,
    reason_counts,
    recent,
    select,
)
from ..settings import Settings
from .common import BackendOpt, Database, DataDir, console, fail, guard, require_broker, settings_from

log = structlog.get_logger(__name__)

dlq_app = typer.Typer(help="Dead letters: the newest and counts by reason, one in detail, replay after a fix.",
                      no_args_is_help=True)


def _open(s: Settings) -> Backend:
    from sinks import connect

    backend = connect(s.clickhouse())
    exists = backend.query(f"SELECT count() FROM system.tables WHERE database = {literal(s.ch_database)} "
                           "AND name = 'dead_letters'").scalar()
    if not exists:
        backend.close()
        fail(f"no dead_letters table in {s.ch_database} on the {s.ch_backend.value} backend",
             "run `yibao migrate` first, or pass --database/--data-dir")
    return backend


@dlq_app.command("list")
def list_cmd(
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many dead letters to list, newest first")] = 20,
    reason: Annotated[str | None, typer.Option("--reason", help="Only dead letters with this reason_code")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per dead letter and line (event_id, reason_code, field, reason_detail, "
                       "source, event_type, failed_at); no summary")] = False,
    backend: BackendOpt = None, data_dir: DataDir = None, database: Database = None,
) -> None:
    """The newest dead letters (the event_id `dlq show` and `dlq replay --ids` take, reason, source
    position, failure time), then the counts by reason and source topic."""
    def run() -> None:
        if limit < 1:
            fail(f"--limit {limit}: must be at least 1")
        s = settings_from(backend=backend, data_dir=data_dir, database=database)
        b = _open(s)
        try:
            rows = recent(b, limit=limit, reason=reason)
            counts = [] if as_json else reason_counts(b, reason)
        finally:
            b.close()
        if as_json:
            for r in rows:
                print(json.dumps(r, ensure_ascii=False))
            return
        from rich.table import Column, Table

        total = sum(r["count"] for r in counts)
        which = f" with reason {reason}" if reason else ""
        if not total:
            console.print(f"no dead letters{which} in {s.ch_database}", highlight=False)
            return
        shown = f"the {len(rows)} newest of {total}" if len(rows) < total else f"all {total}"
        id_col = Column("event_id", no_wrap=True, min_width=max((len(r["event_id"]) for r in rows), default=8))
        t = Table(id_col, "failed at", "reason", "field", "source", "event", highlight=False,
                  title=f"dead letters{which}: {shown}, newest first", title_justify="left")
        for r in rows:
            src = r["source"]
            t.add_row(r["event_id"], r["failed_at"][:19].replace("T", " "), r["reason_code"], escape(r["field"] or ""),
                      escape(f"{src['topic']}:{src['partition']}@{src['offset']}"), r["event_type"] or "")
        console.print(t)
        c = Table("reason", "source topic", "count", "first failed", "last failed", highlight=False,
                  title="by reason", title_justify="left")
        for r in counts:
            c.add_row(r["reason_code"], escape(r["source_topic"]), str(r["count"]), r["first_failed_at"][:19],
                      r["last_failed_at"][:19])
        console.print(c)
        more = " (--limit N for more)" if len(rows) < total else ""
        console.print(f"[dim]{total} dead letter(s){which}{more}; `yibao dlq show EVENT_ID` for one[/dim]",
                      highlight=False)

    guard(run)


@dlq_app.command("show")
def show_cmd(
    event_id: Annotated[str, typer.Argument(help="Dead letter event_id (see `yibao dlq list`/the table)")],
    reveal: Annotated[bool, typer.Option("--reveal", help="Show personal fields in clear (logged)")] = False,
    backend: BackendOpt = None, data_dir: DataDir = None, database: Database = None,
) -> None:
    """One dead letter: reason, field, detail, source position and the original event as JSON."""
    from schemas import Codec

    def run() -> None:
        s = settings_from(backend=backend, data_dir=data_dir, database=database)
        sealer = make_sealer(s)
        b = _open(s)
        try:
            found = select(b, ids=[event_id])
        finally:
            b.close()
        if not found:
            fail(f"no dead letter with event_id {event_id}", "list them with `yibao dlq list`")
        if reveal:
            log.warning("revealing personal data of a dead letter", event_id=event_id)
        print(json.dumps(describe(found[0], sealer, Codec(), reveal=reveal), ensure_ascii=False, indent=2,
                         default=str))

    guard(run)


@dlq_app.command("replay")
def replay_cmd(
    reason: Annotated[str | None, typer.Option("--reason", help="Only dead letters with this reason_code")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only those failed at/after this time (ISO 8601)")
                     ] = None,
    ids: Annotated[list[str] | None, typer.Option("--ids", help="Only these event_ids (repeat or comma-separate)")
                   ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be replayed, produce nothing")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replay even events whose id has landed since")] = False,
    backend: BackendOpt = None, data_dir: DataDir = None, database: Database = None,
) -> None:
    """Re-produce the original events (unsealed) to their source topics, after the cause is fixed."""
    from schemas import Codec

    def run() -> None:
        if not (reason or since or ids):
            fail("say which dead letters to replay", "use --reason, --since and/or --ids")
        s = settings_from(backend=backend, data_dir=data_dir, database=database)
        if not dry_run:
            require_broker(s, "`--dry-run` says what would be replayed without a broker")
        sealer = make_sealer(s)
        codec = Codec()
        id_list = [i.strip() for x in (ids or []) for i in x.split(",") if i.strip()]
        b = _open(s)
        try:
            dls = select(b, ids=id_list, reason=reason, since=parse_since(since) if since else None)
            todo, report = plan_replay(b, dls, sealer, codec, primary_tables(s), force=force)
        finally:
            b.close()
        if not dry_run and todo:
            asyncio.run(produce_raw(s, todo))
        verb = "would replay" if dry_run else "replayed"
        console.print(f"{verb} {len(report.produced)} dead letter(s); skipped {len(report.already_landed)} "
                      f"whose event has landed since; {len(report.unopenable)} could not be opened "
                      "(key missing: see YIBAO_PSEUDO_OLD_KEYS_FILE)")
        print(json.dumps({"replayed" if not dry_run else "would_replay": report.produced,
                          "already_landed": report.already_landed, "unopenable": report.unopenable}))
        if report.unopenable:
            raise typer.Exit(1)

    guard(run)
