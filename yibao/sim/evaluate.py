"""Precision and recall of the rule base against planted anomalies (ground truth).

Matching, per rule: an alert of rule R matches a planted R anomaly when their ``setl_ids``
intersect; for DRG upcoding (a hospital-month alert with no settlement ids) when hospital and
month are the same. Only each alert's latest status counts (``argMax(status, detected_at)`` per
``alert_id``): a RETRACTED alert is no alert. Planted anomalies whose settlement the base traffic
fully reversed (``"reversed": true`` in the truth) are neither expected nor held against the
rules: they and the alerts matching them are left out.

Figures per rule: ``tp`` planted anomalies found, ``fn`` planted anomalies missed, ``fp`` alerts
matching no planted anomaly of their rule; ``recall = tp / (tp + fn)``, ``precision`` = alerts
that match / alerts (one planted anomaly may rightly raise more than one alert, e.g. a too-early
test is too early for both neighbours). Either is ``None`` when its denominator is zero.

Alerts come from the ClickHouse ``alerts`` table, a JSON-lines file, or an in-process run
(:func:`evaluate_in_process`: generated planted traffic through the same ``BatchProcessor`` and
``GroupedProcessor`` the workers use, no Kafka, no ClickHouse).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from schemas import Codec
from schemas.calendar import CHINA, DAY_MS, month_of
from streams.rules import RULES_FILE, check_rule, load_rules_file

from ..jsonl import read_objects
from ..settings import Settings, load_settings
from .generator import AUTO, EVENT_TIME_FIELD, SETTLEMENT, SimConfig, SimEvent
from .planters import Planting

UPCODING_KIND = "drg_upcoding"
SETTLEMENT_NS = "cn.nhsa.yibao.settlement."
PROCUREMENT_NS = "cn.nhsa.yibao.procurement."
SUPERVISION_NS = "cn.nhsa.yibao.supervision."
#: Rules evaluated by the ClickHouse monitors (streams/monitors.py), not in the stream: their
#: planters know the alert ids they expect (deterministic), and an in-process run lands the traffic
#: in ClickHouse (chDB) to raise them. Matched by ``alert_id``.
MONITOR_RULE_IDS = frozenset({"YB-FUND-CAPACITY", "YB-FUND-NEGATIVE", "YB-PSI-SETTLED-OVER-SOLD",
                              "YB-SUP-CREDIT-LOW"})
#: What the monitors read: only these raw tables are landed for them.
MONITOR_TABLES = ("settlements", "fee_details", "fund_income", "inventory_movements", "penalties")
#: Migrations an evaluation database needs (raw tables and their projections, and the credit-score
#: view; not the BI aggregates, whose materialized views only slow the inserts down).
MONITOR_MIGRATIONS = ("0001", "0002", "0004", "0005", "0007")
#: Events between two progress reports of :func:`run_events`.
PROGRESS_EVERY = 500


# --- alerts -------------------------------------------------------------------------------------

def _status_rank(a: Mapping[str, Any]) -> tuple[int, int]:
    t = a.get("detected_at")
    if isinstance(t, datetime):
        ms = int(t.timestamp() * 1000)
    elif isinstance(t, str):
        ms = int(_parse_time(t).timestamp() * 1000)
    else:
        ms = int(t or 0)
    return ms, int(a.get("status") == "RETRACTED")


def latest_alerts(alerts: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The latest version of each alert (by ``detected_at``; a tie goes to RETRACTED)."""
    best: dict[str, tuple[tuple[int, int], Mapping[str, Any]]] = {}
    for a in alerts:
        aid = str(a["alert_id"])
        rank = _status_rank(a)
        cur = best.get(aid)
        if cur is None or rank >= cur[0]:
            best[aid] = (rank, a)
    return [dict(a) for _, a in best.values()]


def _parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=CHINA)


def alert_month(a: Mapping[str, Any]) -> int | None:
    """YYYYMM (China time) an alert is about: ``month``, evidence ``month``, or its window start."""
    if a.get("month") is not None:
        return int(a["month"])
    ev = a.get("evidence")
    if isinstance(ev, Mapping) and ev.get("month"):
        return int(ev["month"])
    ws = a.get("window_start")
    if ws is None:
        return None
    if isinstance(ws, datetime):
        ws = ws if ws.tzinfo is not None else ws.replace(tzinfo=CHINA)
        return ws.astimezone(CHINA).year * 100 + ws.astimezone(CHINA).month
    if isinstance(ws, str):
        t = _parse_time(ws).astimezone(CHINA)
        return t.year * 100 + t.month
    return month_of(int(ws))


def alert_keys(a: Mapping[str, Any]) -> list[str]:
    """What an alert is matched to the truth by: its settlements, and the business id a
    procurement alert names (evidence ``ref``: mov_id, dlv_id or cntr_id)."""
    keys = [str(s) for s in a.get("setl_ids") or ()]
    if a.get("alert_id") and a.get("rule_id") in MONITOR_RULE_IDS:
        keys.append(str(a["alert_id"]))  # monitor alert ids are deterministic: the truth names them
    ev = a.get("evidence")
    if isinstance(ev, Mapping) and ev.get("ref"):
        keys.append(str(ev["ref"]))
    elif a.get("ref"):
        keys.append(str(a["ref"]))
    return keys


def alerts_from_backend(backend: Any) -> list[dict[str, Any]]:
    """Latest status of every alert in the ``alerts`` table (ClickHouse 18.16 and chDB alike)."""
    table = backend.read_table("alerts")
    res = backend.query(
        "SELECT alert_id, "
        # latest by detected_at; within one second, RETRACTED wins (it is always the later one)
        "argMax(status, toUInt64(detected_at) * 2 + (status = 'RETRACTED')) AS status, "
        "any(rule_id) AS rule_id, any(fixmedins_code) AS fixmedins_code, any(setl_ids) AS setl_ids, "
        "toYYYYMM(any(window_start)) AS month, "
        # the procurement alerts' business id (evidence ``ref``); '' for the others
        "any(if(has(evidence_keys, 'ref'), evidence_values[indexOf(evidence_keys, 'ref')], '')) AS ref "
        f"FROM {table} GROUP BY alert_id"
    )
    out = []
    for alert_id, status, rule_id, h, setl_ids, month, ref in res.rows:
        out.append({"alert_id": str(alert_id), "status": str(status), "rule_id": str(rule_id),
                    "fixmedins_code": str(h), "setl_ids": [str(s) for s in setl_ids], "month": int(month),
                    "ref": str(ref or "")})
    return out


def read_alerts(path: Path) -> list[dict[str, Any]]:
    """Alerts from JSON lines (raw AnomalyAlert datums, or rows of the ``alerts`` table)."""
    out = read_objects(path, frozenset({"alert_id", "rule_id", "status"}), "an alert object")
    for row in out:
        if isinstance(row.get("setl_ids"), str):
            row["setl_ids"] = json.loads(row["setl_ids"].replace("'", '"'))
    return out


def write_alerts(alerts: Iterable[Mapping[str, Any]], path: Path) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for a in alerts:
            fh.write(json.dumps(a, ensure_ascii=False, separators=(",", ":"), default=str) + "\n")
            n += 1
    return n


# --- comparison ---------------------------------------------------------------------------------

def rule_ids(settings: Settings | None = None) -> list[str]:
    """Rule ids of the configured rule base, in file order."""
    path = (settings.rules_file if settings is not None else None) or RULES_FILE
    return [r.id for r in load_rules_file(path, check_rule)]


def upcoding_rules(settings: Settings | None = None) -> set[str]:
    path = (settings.rules_file if settings is not None else None) or RULES_FILE
    return {r.id for r in load_rules_file(path, check_rule) if r.kind == UPCODING_KIND}


def compare(alerts: Iterable[Mapping[str, Any]], truth: Iterable[Mapping[str, Any]],
            rules: Sequence[str] = (), by_month: Iterable[str] = ("YB-HOSP-UPCODE",)) -> dict[str, Any]:
    """Per-rule precision and recall of ``alerts`` (all versions; the latest counts) against ``truth``.

    ``rules``: rule ids reported even without alerts or truth (e.g. the whole rule base);
    ``by_month``: rules matched by hospital and month instead of settlement ids.
    """
    monthly = set(by_month)
    live = latest_alerts(alerts)
    fired = [a for a in live if a.get("status") == "FIRED"]
    truth = list(truth)
    ids = list(dict.fromkeys([*rules, *sorted({str(t["rule_id"]) for t in truth}),
                              *sorted({str(a["rule_id"]) for a in fired})]))
    out: dict[str, Any] = {}
    for rid in ids:
        planted = [t for t in truth if t["rule_id"] == rid]
        mine = [a for a in fired if a["rule_id"] == rid]
        if rid in monthly:
            index: dict[Any, list[int]] = {}
            for i, t in enumerate(planted):
                index.setdefault((t.get("fixmedins_code"), t.get("month")), []).append(i)

            def matches(a: Mapping[str, Any], index: dict[Any, list[int]] = index) -> list[int]:
                return index.get((a.get("fixmedins_code"), alert_month(a)), [])
        else:
            index = {}
            for i, t in enumerate(planted):
                for s in [*(t.get("setl_ids") or ()), *(t.get("refs") or ())]:
                    index.setdefault(s, []).append(i)

            def matches(a: Mapping[str, Any], index: dict[Any, list[int]] = index) -> list[int]:
                return sorted({i for s in alert_keys(a) for i in index.get(s, ())})
        found: set[int] = set()
        fp = matched = ignored = 0
        for a in mine:
            hit = matches(a)
            live_hit = [i for i in hit if not planted[i].get("reversed")]
            if live_hit:
                matched += 1
                found.update(live_hit)
            elif hit:
                ignored += 1  # rests only on anomalies the base traffic reversed
            else:
                fp += 1
        expected = [i for i, t in enumerate(planted) if not t.get("reversed")]
        tp = len(found)
        fn = len(expected) - tp
        counted = matched + fp
        out[rid] = {
            "precision": round(matched / counted, 4) if counted else None,
            "recall": round(tp / len(expected), 4) if expected else None,
            "tp": tp, "fp": fp, "fn": fn, "alerts": counted, "planted": len(expected),
            "ignored": ignored,
        }
    return {
        "rules": out,
        "alerts": len(fired),
        "retracted": sum(1 for a in live if a.get("status") == "RETRACTED"),
        "planted": sum(1 for t in truth if not t.get("reversed")),
        "reversed": sum(1 for t in truth if t.get("reversed")),
    }


def report_table(result: Mapping[str, Any]) -> Any:
    """A rich table of :func:`compare`'s result."""
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.1%}"

    dups = result.get("duplicates_recognised")
    t = Table("rule", "planted", "alerts", "tp", "fp", "fn", "precision", "recall",
              title=f"{result['planted']} planted anomalies, {result['alerts']} alerts",
              caption=None if dups is None else f"{dups:,} re-sent events recognised as duplicates")
    for rid, r in result["rules"].items():
        ok = (r["precision"] is None or r["precision"] >= 0.95) and (r["recall"] is None or r["recall"] >= 0.95)
        style = "" if ok else "yellow"
        t.add_row(rid, str(r["planted"]), str(r["alerts"]), str(r["tp"]), str(r["fp"]), str(r["fn"]),
                  pct(r["precision"]), pct(r["recall"]), style=style)
    return t


# --- in-process run -----------------------------------------------------------------------------

@dataclass
class InProcessRun:
    """What :func:`run_in_process` saw: every alert version, the truth, planted events, counts.

    ``events`` counts every event consumed, re-sends included; of those, ``duplicates`` (per event
    type) are the re-sends the processors recognised by identity (neither landed nor
    dead-lettered), summed over the three subsystem topics' processors."""

    alerts: list[dict[str, Any]]
    truth: list[dict[str, Any]]
    planted_events: list[SimEvent] = field(default_factory=list)
    settlements: int = 0
    events: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    #: rows for the monitors' tables (``collect_tables=True``), per table, column → values
    tables: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    duplicates: Counter[str] = field(default_factory=Counter)


class _TrafficClock:
    """Validation limits as of the traffic being processed: its events are never "future"."""

    def __init__(self, settings: Settings) -> None:
        from streams.validation import Limits

        self._make = Limits.from_settings
        self._validation = settings.validation()
        self.now_ms = int(time.time() * 1000)
        self.limits = self._make(self._validation.max_future_skew_s, self._validation.min_event_year,
                                 now_ms=self.now_ms)

    def advance(self, t_ms: int) -> None:
        if t_ms + DAY_MS > self.now_ms:
            self.now_ms = t_ms + DAY_MS
            self.limits = self._make(self._validation.max_future_skew_s, self._validation.min_event_year,
                                     now_ms=self.now_ms)

    def __call__(self) -> Any:
        return self.limits


def run_events(events: Iterable[Any], settings: Settings | None = None, planted_ids: Container[str] = (),
               batch: int = 5000, collect_tables: bool = False,
               progress: Callable[[int], None] | None = None) -> InProcessRun:
    """Run the rules in process on ``events`` (anything with ``record``, ``key`` and a raw
    ``datum``: generated ``SimEvent`` or replayed ``OutEvent``), in order: the settlement
    ``BatchProcessor`` (decode, validate, person rules) and the two ``GroupedProcessor`` instances
    fed with the stay records it re-keys, the procurement ``BatchProcessor`` with its procurement
    engine, and the supervision ``BatchProcessor`` (no rules), as the workers do (one partition
    each, offsets rising as Kafka's do: a re-sent event is at a new position, and what the
    processors recognise as re-sent is counted in ``duplicates``). ``planted_ids``: event ids
    whose settlements are kept in ``planted_events`` (looked up as each event arrives).
    ``collect_tables``: keep the rows of :data:`MONITOR_TABLES` in ``tables``, for
    :func:`monitor_alerts`. ``progress``: called with the events consumed so far, every
    :data:`PROGRESS_EVERY` events and at the end."""
    import dataclasses

    from streams.messages import Message
    from streams.privacy import Pseudonymizer, Sealer
    from streams.processors import BatchProcessor
    from streams.topology import build_pipeline

    s = settings or load_settings()
    codec = Codec()
    key = b"yibao-evaluate-in-process-key-32"
    clock = _TrafficClock(s)
    pipeline = build_pipeline(validation=s.validation(), rules=dataclasses.replace(s.rules(), enabled=True),
                              topic=lambda name: name, codec=codec, pseudonymizer=Pseudonymizer(key, "eval"),
                              sealer=Sealer(key, "eval"), limits=clock)
    proc, proc_proc, sup_proc = (pipeline.stages[n].processor for n in ("settlement", "procurement", "supervision"))
    assert isinstance(proc, BatchProcessor) and isinstance(proc_proc, BatchProcessor)
    proc_pending: list[Message] = []
    sup_pending: list[Message] = []
    offsets: dict[str, int] = {}
    run = InProcessRun(alerts=[], truth=[])
    t0 = time.perf_counter()
    t_rules = 0.0
    pending: list[Message] = []
    latest = 0

    def keep(tables: Mapping[str, Mapping[str, list[Any]]]) -> None:
        if not collect_tables:
            return
        for name in MONITOR_TABLES:
            cols = tables.get(name)
            if cols is None:
                continue
            dest = run.tables.setdefault(name, {c: [] for c in cols})
            for c, values in cols.items():
                dest[c].extend(values)

    def flush() -> None:
        nonlocal t_rules
        t = time.perf_counter()
        clock.advance(latest)
        out = proc.process(pending)
        keep(out.tables)
        run.dead_letters.update(out.reasons)
        run.duplicates.update(out.duplicates)
        run.alerts.extend(out.alerts)
        per: dict[str, list[Message]] = {}
        for stream, k, v in out.emits:  # routed as the topics route them between workers
            stage = pipeline.consumer_of(stream)
            assert stage is not None, stream
            per.setdefault(stage.name, []).append(Message(0, offsets.get(stage.name, 0), k, v))
            offsets[stage.name] = offsets.get(stage.name, 0) + 1
        for name, msgs in per.items():
            run.alerts.extend(pipeline.stages[name].processor.process(msgs).alerts)
        pending.clear()
        t_rules += time.perf_counter() - t

    def flush_procurement() -> None:
        nonlocal t_rules
        t = time.perf_counter()
        clock.advance(latest)
        out = proc_proc.process(proc_pending)
        keep(out.tables)
        run.dead_letters.update(out.reasons)
        run.duplicates.update(out.duplicates)
        run.alerts.extend(out.alerts)
        proc_pending.clear()
        t_rules += time.perf_counter() - t

    def flush_supervision() -> None:
        clock.advance(latest)
        out = sup_proc.process(sup_pending)
        keep(out.tables)
        run.dead_letters.update(out.reasons)
        run.duplicates.update(out.duplicates)
        sup_pending.clear()

    offset = 0
    proc_offset = 0
    sup_offset = 0
    for ev in events:
        run.events += 1
        if progress is not None and run.events % PROGRESS_EVERY == 0:
            progress(run.events)
        if ev.record.startswith(SUPERVISION_NS):
            latest = max(latest, int(ev.datum[EVENT_TIME_FIELD[ev.record]]))
            sup_pending.append(Message(0, sup_offset, ev.key.encode(), codec.encode(ev.record, ev.datum)))
            sup_offset += 1
            if len(sup_pending) >= batch:
                flush_supervision()
            continue
        if ev.record.startswith(PROCUREMENT_NS):
            latest = max(latest, int(ev.datum[EVENT_TIME_FIELD[ev.record]]))
            proc_pending.append(Message(0, proc_offset, ev.key.encode(), codec.encode(ev.record, ev.datum)))
            proc_offset += 1
            if len(proc_pending) >= batch:
                flush_procurement()
            continue
        if not ev.record.startswith(SETTLEMENT_NS):
            continue
        latest = max(latest, int(ev.datum[EVENT_TIME_FIELD[ev.record]]))
        if ev.record == SETTLEMENT:
            run.settlements += 1
            if str(ev.datum["event_id"]) in planted_ids:
                run.planted_events.append(ev)
        pending.append(Message(0, offset, ev.key.encode(), codec.encode(ev.record, ev.datum)))
        offset += 1
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    if proc_pending:
        flush_procurement()
    if sup_pending:
        flush_supervision()
    if progress is not None:
        progress(run.events)
    total = time.perf_counter() - t0
    run.seconds = {"total": round(total, 2), "pipeline": round(t_rules, 2), "generate": round(total - t_rules, 2)}
    return run


def run_in_process(config: SimConfig, planting: Planting | None = None, settings: Settings | None = None,
                   batch: int = 5000, backend: Any | None = None, *, shuffle_within_s: float = 0.0,
                   resend_rate: float = 0.0) -> InProcessRun:
    """Generate ``config``'s traffic (with ``planting``'s hooks) and :func:`run_events` it; the
    run's ``truth`` is the planting's ground truth. With ``backend`` (an empty database prepared
    by :func:`prepare_monitor_database`), the traffic is landed there and the monitors' alerts
    (:func:`monitor_alerts`) join the stream rules' ones. ``shuffle_within_s`` and
    ``resend_rate``: the traffic arrives as :func:`yibao.sim.delivery.deliver` delivers it (seeded
    with ``config.seed``); the truth does not depend on delivery."""
    gen = planting.generator(config) if planting is not None else _plain(config)
    events: Iterable[SimEvent] = gen.events()
    if shuffle_within_s or resend_rate:
        from .delivery import deliver

        events = deliver(events, shuffle_within_s=shuffle_within_s, resend_rate=resend_rate, seed=config.seed)
    run = run_events(events, settings, planting.planted_ids if planting is not None else (), batch,
                     collect_tables=backend is not None)
    run.truth = planting.truth() if planting is not None else []
    if backend is not None:
        run.alerts.extend(monitor_alerts(run, backend, settings))
    return run


def prepare_monitor_database(backend: Any) -> None:
    """Create ``backend.database`` with the raw tables the monitors read (:data:`MONITOR_MIGRATIONS`
    only: the BI materialized views would slow every insert down and are not needed)."""
    import shutil
    import tempfile

    from sinks.migrate import DDL_DIR, migrate

    with tempfile.TemporaryDirectory(prefix="yibao-eval-ddl-") as tmp:
        for f in sorted(DDL_DIR.glob("*.sql")):
            if f.name[:4] in MONITOR_MIGRATIONS:
                shutil.copy(f, Path(tmp) / f.name)
        migrate(backend, ddl_dir=Path(tmp))
    backend.use_database()


def monitor_alerts(run: InProcessRun, backend: Any, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Land ``run.tables`` in ``backend`` (an empty prepared database) and run the monitors once,
    as of the month of the latest settlement; returns the alert datums they would emit. Why a
    database: the monitors are SQL over the raw tables, and evaluating them anywhere else would
    test a copy, not them. Adds ``seconds["monitors"]`` (landing and evaluation)."""
    from streams.monitors import evaluate, write_alerts
    from streams.topology import build_rulebook

    t0 = time.perf_counter()
    for name, columns in run.tables.items():
        if any(columns.values()):
            backend.insert(name, columns)
    write_alerts(backend, run.alerts)  # the stream rules' hits count in the credit score
    mon = evaluate(backend, build_rulebook((settings or load_settings()).rules_file).current)
    run.seconds["monitors"] = round(time.perf_counter() - t0, 2)
    return list(mon.emitted)


@contextmanager
def monitor_database(settings: Settings) -> Iterator[Any]:
    """A throw-away embedded (chDB) database under the settings' data dir, for one evaluation."""
    import uuid

    from sinks import ClickHouseConfig, connect

    be = connect(ClickHouseConfig(chdb_path=settings.chdb_path, database=f"yb_eval_{uuid.uuid4().hex[:10]}"))
    try:
        prepare_monitor_database(be)
        yield be
    finally:
        try:
            be.execute(f"DROP DATABASE IF EXISTS {be.database} SYNC")
        finally:
            be.close()


def _plain(config: SimConfig) -> Any:
    from .generator import TrafficGenerator

    return TrafficGenerator(config)


def evaluate_in_process(n_settlements: int, days: int, seed: int = 42, rate: float = 0.002,
                        rules: Iterable[str] | str = "all", *, rates: Mapping[str, float] | None = None,
                        start: datetime | None = None, regions: int = AUTO, hospitals: int = AUTO,
                        pharmacies: int = AUTO, settings: Settings | None = None,
                        backend: Any | None = None, monitors: bool = True, shuffle_within_s: float = 0.0,
                        resend_rate: float = 0.0) -> dict[str, Any]:
    """Generate planted traffic, run the rules in process, compare: :func:`compare`'s result plus
    ``settlements``, ``events`` (consumed, re-sends included), ``dead_letters``,
    ``duplicates_recognised`` (re-sends recognised by identity) and ``seconds``.

    ``shuffle_within_s`` and ``resend_rate``: the generated traffic is delivered out of
    event-time order and partly re-sent (:func:`yibao.sim.delivery.deliver`); the truth still
    comes from the planting.

    The monitor rules (:data:`MONITOR_RULE_IDS`) need ClickHouse: the traffic is landed in
    ``backend`` (a database prepared by :func:`prepare_monitor_database`) or, by default, in a
    throw-away chDB database under the data dir; ``monitors=False`` skips them.

    ``rules``: "all", "none" or rule ids to plant; ``rate`` per eligible settlement, ``rates``
    per rule id. The traffic's size fields (``regions``, ``hospitals``, ``pharmacies``) default as
    in :class:`SimConfig`; fewer hospitals give each more stays (DRG upcoding needs at least 37 a
    month for four months at a hospital: ``days`` ≥ 4 months).
    """
    s = settings or load_settings()
    # the base traffic's late supplier payments are real YB-PROC-PAY-OVERDUE violations: here the
    # only violations are the planted ones
    kw: dict[str, Any] = {"settlements": n_settlements, "days": days, "seed": seed, "regions": regions,
                          "hospitals": hospitals, "pharmacies": pharmacies, "late_payment_rate": 0.0}
    if start is not None:
        kw["start"] = start
    config = SimConfig(**kw)
    base = load_rules_file(s.rules_file or RULES_FILE, check_rule)
    planting = Planting(rules, rate=rate, rates=rates, rule_base=base)
    if monitors and backend is None:
        with monitor_database(s) as be:
            run = run_in_process(config, planting, s, backend=be, shuffle_within_s=shuffle_within_s,
                                 resend_rate=resend_rate)
    else:
        run = run_in_process(config, planting, s, backend=backend if monitors else None,
                             shuffle_within_s=shuffle_within_s, resend_rate=resend_rate)
    result = compare(run.alerts, run.truth, [r.id for r in base],
                     by_month=[r.id for r in base if r.kind == UPCODING_KIND])
    result.update({"settlements": run.settlements, "events": run.events,
                   "dead_letters": sum(run.dead_letters.values()),
                   "duplicates_recognised": sum(run.duplicates.values()), "seconds": run.seconds})
    return result


__all__ = ["MONITOR_RULE_IDS", "InProcessRun", "alert_month", "alerts_from_backend", "compare",
           "evaluate_in_process", "latest_alerts", "monitor_alerts", "monitor_database", "prepare_monitor_database",
           "read_alerts", "report_table", "rule_ids", "run_events", "run_in_process", "upcoding_rules",
           "write_alerts"]
