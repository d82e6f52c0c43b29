"""`yibao rules` and `yibao alerts`: operating the rule base and watching what it finds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..settings import Settings
from .common import fail, guard, settings_from

rules_app = typer.Typer(help="The monitoring rule base: list what is active, push changes.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

SEVERITY_ORDER = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
SEVERITY_STYLE = {"LOW": "dim", "MEDIUM": "yellow", "HIGH": "red", "CRITICAL": "bold red"}


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


async def push_rules(s: Settings, rules: list[Any]) -> int:
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


def active_rules(s: Settings) -> tuple[list[Any], dict[str, str]]:
    """Seed rules with the rules topic applied, and where each one came from."""
    from streams.topology import build_rulebook

    book = build_rulebook(s.rules_file)
    source = {r.id: "seed" for r in book.current.rules}
    for key, value in asyncio.run(read_rules_topic(s)):
        if book.apply(value, key) is not None:
            source[key.decode()] = "pushed"
    return list(book.current.rules), source


@rules_app.command("list")
def rules_list(
    bootstrap: Annotated[str | None, typer.Option("--bootstrap", help="Kafka bootstrap servers")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per rule")] = False,
) -> None:
    """Show the rules workers apply now: the seed file plus every change pushed to the rules topic."""

    def run() -> None:
        s = settings_from(bootstrap=bootstrap)
        rules, source = active_rules(s)
        if as_json:
            for r in rules:
                print(json.dumps({**r.to_dict(), "source": source[r.id]}, ensure_ascii=False))
            return
        t = Table("rule", "v", "on", "kind", "result", "severity", "name", "params", "from")
        for r in rules:
            t.add_row(r.id, str(r.version), "✓" if r.enabled else "✗", r.kind, r.result_type.value,
                      r.severity.value, r.name_zh, json.dumps(r.params, ensure_ascii=False), source[r.id])
        console.print(t)

    guard(run)


@rules_app.command("push")
def rules_push(
    file: Annotated[Path, typer.Argument(help="A rules TOML file ([[rule]] tables, like the seed rules.toml)")],
    bootstrap: Annotated[str | None, typer.Option("--bootstrap", help="Kafka bootstrap servers")] = None,
) -> None:
    """Validate FILE and publish its rules; running workers apply them at their next batch."""
    from streams.rules import check_rule, load_rules_file


    def run() -> None:
        s = settings_from(bootstrap=bootstrap)
        rules = load_rules_file(file, check_rule)
        current, _ = active_rules(s)
        by_id = {r.id: r for r in current}
        for r in rules:
            old = by_id.get(r.id)
            if old is not None and r.version < old.version:

                fail(f"{r.id}: version {r.version} is older than the active version {old.version}",
                     "bump `version` when you change a rule: alerts name the version that produced them")
        n = asyncio.run(push_rules(s, rules))
        console.print(f"pushed {n} rule(s) to {s.topic('rules')}")

    guard(run)


# --- alerts ----------------------------------------------------------------------------------------
def format_alert(a: dict[str, Any], codec: Any) -> str:
    j = codec.to_json("AnomalyAlert", a)
    style = SEVERITY_STYLE.get(a["severity"], "")
    status = "" if a["status"] == "FIRED" else " [bold]RETRACTED[/bold]"
    subject = " ".join(x for x in (a.get("fixmedins_code"), a.get("psn_token")) if x)
    evidence = ", ".join(f"{k}={v}" for k, v in sorted(a["evidence"].items()))
    return (f"{j['detected_at'][:16]} [{style}]{a['severity']:<8}[/{style}] {a['rule_id']} v{a['rule_version']} "
            f"{a['result_type'].lower()}{status} {subject} window {j['window_start'][:16]}→{j['window_end'][:16]} "
            f"at risk ¥{j['amount_at_risk']} setl {','.join(a['setl_ids'][:3])}"
            f"{'…' if len(a['setl_ids']) > 3 else ''} | {evidence}")


def alerts_command(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Subscribe to the alerts topic")] = False,
    rule: Annotated[list[str] | None, typer.Option("--rule", "-r", help="Only these rule ids (repeatable)")] = None,
    severity: Annotated[str | None, typer.Option("--severity", "-s", help="Minimum severity: LOW..CRITICAL")] = None,
    from_beginning: Annotated[bool, typer.Option(help="With --follow: replay the topic from its start")] = False,
    limit: Annotated[int, typer.Option(help="Without --follow: how many recent alerts to show")] = 50,
    bootstrap: Annotated[str | None, typer.Option("--bootstrap", help="Kafka bootstrap servers")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="chDB data (embedded backend)")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="embedded|server")] = None,
) -> None:
    """Recent alerts from ClickHouse, or --follow the alerts topic; filter by rule and severity."""

    def run() -> None:
        if severity is not None and severity.upper() not in SEVERITY_ORDER:
            fail(f"--severity {severity!r}: use one of {', '.join(SEVERITY_ORDER)}")
        min_sev = SEVERITY_ORDER.index(severity.upper()) if severity else 0
        rules = set(rule or [])

        def wanted(a: dict[str, Any]) -> bool:
            return (not rules or a["rule_id"] in rules) and SEVERITY_ORDER.index(a["severity"]) >= min_sev

        s = settings_from(bootstrap=bootstrap, data_dir=data_dir, backend=backend)
        from schemas import Codec

        codec = Codec()
        if follow:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_follow(s, codec, wanted, from_beginning))
            return
        for a in recent_alerts(s, codec, limit, rules, min_sev):
            console.print(format_alert(a, codec), highlight=False)

    guard(run)


async def _follow(s: Settings, codec: Any, wanted: Any, from_beginning: bool) -> None:
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
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        err.print(f"following {topic} (Ctrl-C to stop)")
        while True:
            got = await consumer.getmany(timeout_ms=1000)
            for records in got.values():
                for r in records:
                    a = codec.decode(r.value).datum
                    if a["event_id"] in seen:  # the topic is at-least-once; ids are deterministic
                        continue
                    seen[a["event_id"]] = None
                    if len(seen) > 100_000:
                        seen.pop(next(iter(seen)))
                    if wanted(a):
                        console.print(format_alert(a, codec), highlight=False)
    finally:
        await consumer.stop()


def recent_alerts(s: Settings, codec: Any, limit: int, rules: set[str], min_sev: int) -> list[dict[str, Any]]:
    """Latest version of each alert (FIRED or RETRACTED), newest first, from ClickHouse."""
    from sinks import connect

    be = connect(s.clickhouse())
    db = s.ch_database
    where = []
    if rules:
        where.append("rule_id IN (" + ", ".join("'" + r.replace("'", "") + "'" for r in rules) + ")")
    if min_sev:
        where.append("severity IN (" + ", ".join(f"'{x}'" for x in SEVERITY_ORDER[min_sev:]) + ")")
    cond = ("WHERE " + " AND ".join(where)) if where else ""
    cols = ["event_id", "alert_id", "status", "rule_id", "rule_version", "result_type", "severity", "subsystem",
            "fixmedins_code", "psn_token", "admdvs", "setl_ids", "mdtrt_ids", "window_start", "window_end",
            "amount_at_risk", "evidence_keys", "evidence_values", "detected_at"]
    sel = ", ".join(f"argMax({c}, detected_at) AS {c}" if c != "alert_id" else c for c in cols)
    try:
        res = be.query(f"SELECT {sel} FROM {db}.alerts {cond} GROUP BY alert_id "
                       f"ORDER BY detected_at DESC LIMIT {int(limit)}")
    finally:
        be.close()
    out = []
    for row in res.rows:
        d = dict(zip(res.columns, row, strict=True))
        raw: dict[str, Any] = {
            **{c: d[c] for c in cols if c not in ("evidence_keys", "evidence_values")},
            "evidence": dict(zip(d["evidence_keys"], d["evidence_values"], strict=True)),
        }
        for c in ("window_start", "window_end", "detected_at"):
            raw[c] = int(d[c].timestamp() * 1000)
        raw["amount_at_risk"] = int(d["amount_at_risk"] * 100)
        out.append(raw)
    return out
