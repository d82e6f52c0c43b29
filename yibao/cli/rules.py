"""`yibao rules` and `yibao alerts`: operating the rule base and watching what it finds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Column, Table

from ..settings import Settings
from .common import (
    BackendOpt,
    Bootstrap,
    ChHost,
    ChPort,
    Database,
    DataDir,
    configure_logging,
    console,
    err,
    fail,
    guard,
    require_broker,
    settings_from,
)

if TYPE_CHECKING:
    from sinks.base import Backend
    from streams.rules import Rule

rules_app = typer.Typer(help="The monitoring rule base: list what is active, push changes.", no_args_is_help=True)

SEVERITY_ORDER = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
SEVERITY_STYLE = {"LOW": "dim", "MEDIUM": "yellow", "HIGH": "red", "CRITICAL": "bold red"}
NO_BROKER_HINT = "`yibao rules list --seed` shows the seed rule base without a broker"


# --- rules -----------------------------------------------------------------------------------------
async def read_rules_topic(s: Settings, quiet_s: float = 1.5, timeout_s: float = 20.0) -> list[tuple[bytes, bytes]]:
    """Every (key, value) record of the rules topic, read until it has been quiet for ``quiet_s``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.topics import RULES_TOPIC, ensure_topics

    await ensure_topics(s.kafka())
    topic = s.topic(RULES_TOPIC)
    consumer = AIOKafkaConsumer(**s.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[bytes, bytes]] = []
    try:
        await consumer.topics()  # refreshes cluster metadata
        parts = consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last = time.monotonic()
        deadline = last + timeout_s
        while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=300)
            for records in got.values():
                for r in records:
                    if r.key is not None and r.value is not None:
                        out.append((r.key, r.value))
                        last = time.monotonic()
    finally:
        await consumer.stop()
    return out


async def push_rules(s: Settings, rules: Sequence[Rule]) -> int:
    """Publish rules to the compacted rules topic, one acknowledged record each (key = rule id)."""
    from aiokafka import AIOKafkaProducer

    from streams.topics import RULES_TOPIC, ensure_topics

    await ensure_topics(s.kafka())
    producer = AIOKafkaProducer(**s.kafka_client_kwargs(), acks="all", linger_ms=0)
    await producer.start()
    try:
        for r in rules:
            # one record per request: keeps each rule in its own batch (see infra.md on end offsets)
            await producer.send_and_wait(s.topic(RULES_TOPIC), json.dumps(r.to_dict(), ensure_ascii=False).encode(),
                                         key=r.id.encode())
    finally:
        await producer.stop()
    return len(rules)


def seed_rules(s: Settings) -> list[Rule]:
    """The seed rule base the workers start from (YIBAO_RULES_FILE, else the shipped rules.toml)."""
    from streams.topology import build_rulebook

    return list(build_rulebook(s.rules_file).current.rules)


def active_rules(s: Settings) -> tuple[list[Rule], dict[str, str]]:
    """Seed rules with the rules topic applied, and where each one came from."""
    from streams.topology import build_rulebook

    if s.log_level == "INFO":  # the book's "rule updated" lines are news in a worker, noise here
        configure_logging("WARNING", s.log_format.value)
    book = build_rulebook(s.rules_file)
    source = {r.id: "seed" for r in book.current.rules}
    for key, value in asyncio.run(read_rules_topic(s)):
        if book.apply(value, key) is not None:
            source[key.decode()] = "pushed"
    return list(book.current.rules), source


@dataclass(frozen=True)
class PushStep:
    """What pushing one rule of a file does: publish ``rule`` (its version raised if need be), or not."""

    rule: Rule
    active: Rule | None
    changed: tuple[str, ...]

    @property
    def publish(self) -> bool:
        return self.active is None or bool(self.changed)

    def describe(self) -> str:
        if self.active is None:
            return f"{self.rule.id}: new, v{self.rule.version}"
        if not self.changed:
            return f"{self.rule.id}: unchanged (v{self.active.version})"
        return f"{self.rule.id}: v{self.active.version} → v{self.rule.version} ({', '.join(self.changed)} changed)"


def plan_push(active: Sequence[Rule], pushed: Sequence[Rule]) -> list[PushStep]:
    """Versions follow content: alerts name the version that judged them, so a version must never
    stand for two contents. A rule whose content differs from the active one gets the active
    version + 1 unless the file already says more; an identical rule is not published again."""
    by_id = {r.id: r for r in active}
    steps = []
    for rule in pushed:
        old = by_id.get(rule.id)
        if old is None:
            steps.append(PushStep(rule, None, ()))
            continue
        before, after = old.to_dict(), rule.to_dict()
        changed = tuple(k for k in after if k != "version" and before.get(k) != after[k])
        if changed and rule.version <= old.version:
            rule = dataclasses.replace(rule, version=old.version + 1)
        steps.append(PushStep(rule, old, changed))
    return steps


@rules_app.command("list")
def rules_list(
    bootstrap: Bootstrap = None,
    seed: Annotated[bool, typer.Option(
        "--seed", help="Only the seed rule base (YIBAO_RULES_FILE or the shipped one): no broker needed")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per rule")] = False,
) -> None:
    """Show the rules workers apply now: the seed file plus every change pushed to the rules topic."""

    def run() -> None:
        s = settings_from(bootstrap=bootstrap)
        if seed:
            rules = seed_rules(s)
            source = {r.id: "seed" for r in rules}
        else:
            require_broker(s, NO_BROKER_HINT)
            rules, source = active_rules(s)
        if as_json:
            for r in rules:
                print(json.dumps({**r.to_dict(), "source": source[r.id]}, ensure_ascii=False))
            return
        t = Table(Column("rule", no_wrap=True, min_width=max((len(r.id) for r in rules), default=4)),
                  "v", "on", "kind", "result", "severity", "name", "params", "from")
        for r in rules:
            t.add_row(r.id, str(r.version), "✓" if r.enabled else "✗", r.kind, r.result_type.value,
                      r.severity.value, r.name_zh, escape(json.dumps(r.params, ensure_ascii=False)), source[r.id])
        console.print(t)

    guard(run)


@rules_app.command("push")
def rules_push(
    file: Annotated[Path, typer.Argument(help="A rules TOML file ([[rule]] tables, like the seed rules.toml)")],
    bootstrap: Bootstrap = None,
) -> None:
    """Validate FILE and publish the rules that differ from the active ones; running workers apply them at
    their next batch. A changed rule whose version is not above the active one is published as the
    active version + 1 (alerts name the version that judged them); an unchanged rule is not published."""
    from streams.rules import check_rule, load_rules_file

    def run() -> None:
        s = settings_from(bootstrap=bootstrap)
        rules = load_rules_file(file, check_rule)
        require_broker(s)
        current, _ = active_rules(s)
        steps = plan_push(current, rules)
        n = asyncio.run(push_rules(s, [st.rule for st in steps if st.publish]))
        for st in steps:
            console.print(st.describe(), highlight=False)
        console.print(f"pushed {n} rule(s) to {s.topic('rules')}", highlight=False)

    guard(run)


# --- alerts ----------------------------------------------------------------------------------------
def format_alert(a: dict[str, Any], codec: Any) -> str:
    """One alert as one line of console markup (values escaped)."""
    j = codec.to_json("AnomalyAlert", a)
    style = SEVERITY_STYLE.get(a["severity"], "")
    status = "" if a["status"] == "FIRED" else " [bold]RETRACTED[/bold]"
    subject = " ".join(x for x in (a.get("fixmedins_code"), a.get("psn_token")) if x)
    evidence = ", ".join(f"{k}={v}" for k, v in sorted(a["evidence"].items()))
    setl = ",".join(a["setl_ids"][:3]) + ("…" if len(a["setl_ids"]) > 3 else "")
    return (f"{j['detected_at'][:16]} [{style}]{a['severity']:<8}[/{style}] {escape(a['rule_id'])} "
            f"v{a['rule_version']} {a['result_type'].lower()}{status} {escape(subject)} "
            f"window {j['window_start'][:16]}→{j['window_end'][:16]} at risk ¥{j['amount_at_risk']} "
            f"setl {escape(setl)} | {escape(evidence)}")


def alerts_command(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Subscribe to the alerts topic")] = False,
    rule: Annotated[list[str] | None, typer.Option("--rule", "-r", help="Only these rule ids (repeatable)")] = None,
    severity: Annotated[str | None, typer.Option("--severity", "-s", help="Minimum severity: LOW..CRITICAL")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per alert and line (the AnomalyAlert fields); with --follow, each as it "
                       "arrives")] = False,
    retracted: Annotated[bool, typer.Option(
        "--retracted", help="Without --follow: also alerts whose latest version is RETRACTED")] = False,
    from_beginning: Annotated[bool, typer.Option(help="With --follow: replay the topic from its start")] = False,
    limit: Annotated[int, typer.Option(help="Without --follow: how many recent alerts to show")] = 50,
    bootstrap: Bootstrap = None,
    backend: BackendOpt = None,
    data_dir: DataDir = None,
    ch_host: ChHost = None,
    ch_port: ChPort = None,
    database: Database = None,
) -> None:
    """Recent alerts from ClickHouse (the latest version of each, retracted ones hidden), or --follow the
    alerts topic (every version as it arrives); filter by rule and minimum severity."""

    def run() -> None:
        if severity is not None and severity.upper() not in SEVERITY_ORDER:
            fail(f"--severity {severity!r}: use one of {', '.join(SEVERITY_ORDER)}")
        if limit < 1:
            fail(f"--limit {limit}: must be at least 1")
        min_sev = SEVERITY_ORDER.index(severity.upper()) if severity else 0
        rules = set(rule or [])

        def wanted(a: dict[str, Any]) -> bool:
            return (not rules or a["rule_id"] in rules) and SEVERITY_ORDER.index(a["severity"]) >= min_sev

        s = settings_from(bootstrap=bootstrap, data_dir=data_dir, backend=backend, ch_host=ch_host,
                          ch_port=ch_port, database=database)
        from schemas import Codec

        codec = Codec()

        def show(a: dict[str, Any]) -> None:
            if as_json:
                print(json.dumps(codec.to_json("AnomalyAlert", a), ensure_ascii=False), flush=True)
            else:
                console.print(format_alert(a, codec), highlight=False)

        if follow:
            require_broker(s, "`yibao alerts` without --follow reads the alerts table in ClickHouse")
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_follow(s, codec, wanted, show, from_beginning))
            return
        from sinks import connect

        be = connect(s.clickhouse())
        try:
            if not _has_alerts_table(be, s.ch_database):
                fail(f"no alerts table in database {s.ch_database} on the {s.ch_backend.value} backend",
                     "run `yibao migrate` and the workers first, or pass --database/--data-dir/--backend")
            found = latest_alerts(be, limit=limit, rules=rules, min_sev=min_sev, retracted=retracted)
        finally:
            be.close()
        for a in found:
            show(a)
        if not as_json:
            latest = f"the {limit} most recent alerts (--limit N for more)" if len(found) == limit \
                else f"{len(found)} alert(s)"
            hidden = "" if retracted else "; retracted ones hidden (--retracted)"
            err.print(f"[dim]{latest}{hidden}[/dim]", highlight=False)

    guard(run)


async def _follow(s: Settings, codec: Any, wanted: Callable[[dict[str, Any]], bool],
                  show: Callable[[dict[str, Any]], None], from_beginning: bool) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.topics import ensure_topics

    await ensure_topics(s.kafka())
    topic = s.topic("alerts")
    consumer = AIOKafkaConsumer(**s.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    seen: dict[str, None] = {}
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
        consumer.assign(tps)
        started_ms = int(time.time() * 1000)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        # Tansu's "end" is the start of the last batch (infra.md): until the first empty poll, skip
        # what was produced before we started, or a follower would begin with a burst of old alerts.
        catching_up = not from_beginning
        err.print(f"following {topic} (Ctrl-C to stop)", highlight=False)
        while True:
            got = await consumer.getmany(timeout_ms=1000)
            catching_up = catching_up and bool(got)
            for records in got.values():
                for r in records:
                    if catching_up and r.timestamp < started_ms:
                        continue
                    a = codec.decode(r.value).datum
                    if a["event_id"] in seen:  # the topic is at-least-once; ids are deterministic
                        continue
                    seen[a["event_id"]] = None
                    if len(seen) > 100_000:
                        seen.pop(next(iter(seen)))
                    if wanted(a):
                        show(a)
    finally:
        await consumer.stop()


def _has_alerts_table(be: Backend, database: str) -> bool:
    from sinks.base import literal

    return bool(be.query(f"SELECT count() FROM system.tables WHERE database = {literal(database)} "
                         "AND name = 'alerts'").scalar())


#: Columns of an alert row read back as the AnomalyAlert datum (evidence: two parallel arrays).
_ALERT_COLUMNS = ("event_id", "status", "rule_id", "rule_version", "result_type", "severity", "subsystem",
                  "fixmedins_code", "psn_token", "admdvs", "setl_ids", "mdtrt_ids", "window_start", "window_end",
                  "amount_at_risk", "evidence_keys", "evidence_values", "detected_at", "src_offset")


def latest_alerts_sql(table: str, *, limit: int, rules: set[str], min_sev: int, retracted: bool) -> str:
    """The latest version of each alert, newest first; runs on ClickHouse 18.16 and chDB alike.

    Latest by (detected_at, src_offset), as in bi_alerts_by_rule: detected_at has whole seconds,
    and a retraction in the same second as its alert comes later in the stream. The aggregates get
    aliases of their own (``a_…``): an alias equal to a column name would be substituted into the
    other aggregates and the filters (ClickHouse error 184). The rule filter applies to the rows
    (every version of an alert has its rule); severity and status to the latest version.
    """
    from sinks.base import literal

    inner = f"WHERE rule_id IN ({', '.join(literal(r) for r in sorted(rules))})" if rules else ""
    outer = []
    if not retracted:
        outer.append("a_status != 'RETRACTED'")
    if min_sev:
        outer.append(f"a_severity IN ({', '.join(literal(x) for x in SEVERITY_ORDER[min_sev:])})")
    sel = ", ".join(f"argMax({c}, (detected_at, src_offset)) AS a_{c}" for c in _ALERT_COLUMNS)
    return (f"SELECT alert_id, {sel} FROM {table} {inner} GROUP BY alert_id "
            f"{'HAVING ' + ' AND '.join(outer) if outer else ''} "
            f"ORDER BY a_detected_at DESC, a_src_offset DESC, alert_id LIMIT {int(limit)}")


def latest_alerts(be: Backend, *, limit: int, rules: set[str], min_sev: int = 0,
                  retracted: bool = False) -> list[dict[str, Any]]:
    """Latest version of each alert as AnomalyAlert datums (money in fen, times in epoch ms), newest first."""
    res = be.query(latest_alerts_sql(be.read_table("alerts"), limit=limit, rules=rules, min_sev=min_sev,
                                     retracted=retracted))
    out = []
    for row in res.rows:
        d = dict(zip(res.columns, row, strict=True))
        a = {c: d[f"a_{c}"] for c in _ALERT_COLUMNS}
        datum: dict[str, Any] = {
            "event_id": str(a["event_id"]), "alert_id": str(d["alert_id"]), "status": str(a["status"]),
            "rule_id": str(a["rule_id"]), "rule_version": int(a["rule_version"]),
            "result_type": str(a["result_type"]), "severity": str(a["severity"]), "subsystem": str(a["subsystem"]),
            # empty in the table where the event has none
            **{c: (str(a[c]) or None) for c in ("fixmedins_code", "psn_token", "admdvs")},
            "setl_ids": [str(x) for x in a["setl_ids"]], "mdtrt_ids": [str(x) for x in a["mdtrt_ids"]],
            **{c: int(a[c].timestamp() * 1000) for c in ("window_start", "window_end", "detected_at")},
            "amount_at_risk": round(a["amount_at_risk"] * 100),
            "evidence": dict(zip(a["evidence_keys"], a["evidence_values"], strict=True)),
        }
        out.append(datum)
    return out
