"""Monitors: rules evaluated periodically from ClickHouse instead of in the event stream.

Why not in-stream: fund-operation metrics need two topics with different keys (settlements keyed
by ``psn_no``, fund income on the supervision topic keyed by pooling region) and are monthly by
nature; the settled-over-sold check joins fee lines (settlement topic) with inventory movements
(procurement topic); the credit grade combines penalties (supervision topic) with the alerts of
every stream. Re-keying both streams to meet in one worker would cost more than asking
ClickHouse, which already holds every landed row, once every few minutes.

A :class:`Monitor` is a small declarative unit: the rule *kind* it evaluates (a rule of the rule
base names it, with its parameters), the SQL queries over raw tables (18.16 SQL: no CTE, no window
functions, so cumulative sums are done in Python over the monthly rows), and a function turning the
result rows into :class:`~streams.rules.detectors.Finding` objects. Monitors look at **closed
months** only: months before the month of the latest settlement landed (``as_of``), because a
month in progress would raise alerts that merely reflect bookings not made yet.

Alerts: the same AnomalyAlert datums, topic and ``alerts`` table as the stream rules, with the
same deterministic ids (``uuid5(rule | subject | month)``; subject ``pool|insutype`` or
``institution|drug``). The ``alerts`` table itself is the monitors' state: a run reads the latest
status of every alert of its rules and emits only changes, so repeated runs never duplicate:

====================================  ==========================  =============================
alert's latest status in the table    condition holds now         emitted
====================================  ==========================  =============================
none                                  yes                         FIRED (generation 0)
FIRED                                 yes                         nothing
FIRED                                 no (cleared)                RETRACTED (same generation)
RETRACTED                             yes                         FIRED (generation + 1)
RETRACTED / none                      no                          nothing
====================================  ==========================  =============================

A month only clears when late data changes it (a late income booking, late reversals): closed
months are not re-opened otherwise. Rows carry ``src_partition`` = :data:`MONITOR_PARTITION`
(no Kafka partition has that number, so the ingestors' already-landed lookups never see them)
and ``src_offset`` 0. Produced to the topic first, then inserted (as in ingestion): a crash in
between re-emits the same event ids on the next run, which the table collapses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import structlog

from schemas.calendar import month_bounds, prev_month
from sinks.base import Backend, literal

from .messages import framed_headers
from .rules.alerts import ALERT_RECORD, alert_datum, alert_event_id, alert_id, retraction
from .rules.detectors import Finding
from .rules.model import Rule
from .rules.rulebook import RuleSet

log = structlog.get_logger(__name__)

MONITOR_PARTITION = 65535  # src_partition of monitor alerts: UInt16 max, never a Kafka partition
CNT_SCALE = 10_000  # fee_details.cnt / inventory_movements.cnt are Decimal(16, 4)

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class MonitorFinding:
    """A finding plus where it belongs: the subject and region of its alert."""

    finding: Finding
    subject: str
    admdvs: str


@dataclass(frozen=True)
class Monitor:
    """One rule kind evaluated from ClickHouse.

    ``queries(rule, backend)`` → named SQL statements; ``findings(rule, rows, as_of, now_ms)``
    turns their rows (dicts per query name) into findings for the closed months before
    ``as_of`` (YYYYMM).
    """

    kind: str
    subsystem: str
    queries: Callable[[Rule, Backend], dict[str, str]]
    findings: Callable[[Rule, Mapping[str, Rows], int, int], list[MonitorFinding]]
    doc: str = ""


# --- units ----------------------------------------------------------------------------------------

def fen(value: Any) -> int:
    """A Decimal(…, 2) amount (or None) as integer fen."""
    return int((Decimal(value or 0) * 100).to_integral_value())


def units4(value: Any) -> int:
    """A Decimal(…, 4) quantity as an integer at scale 4."""
    return int((Decimal(value or 0) * CNT_SCALE).to_integral_value())


def _pool_expr(rule: Rule) -> str:
    n = int(rule.param("pool_prefix_len"))
    suffix = str(rule.param("pool_suffix"))
    if not 1 <= n <= 6 or not suffix.isdigit() or n + len(suffix) != 6:
        raise ValueError(f"{rule.id}: pool_prefix_len + len(pool_suffix) must be 6 digits")
    return f"concat(substring(insu_admdvs, 1, {n}), {literal(suffix)})"


# --- fund: monthly income and spending per pooling region × insutype -------------------------------

def fund_queries(rule: Rule, backend: Backend) -> dict[str, str]:
    """Monthly income (fund_income) and spending (settlements: reversal rows are negative, so the
    sum is net of reversals) per pooling region and insutype."""
    return {
        "income": f"SELECT insu_admdvs AS pool, insutype, toYYYYMM(book_time) AS month, "
                  f"sum(income_amt) AS amount FROM {backend.read_table('fund_income')} "
                  f"GROUP BY pool, insutype, month",
        "spending": f"SELECT {_pool_expr(rule)} AS pool, insutype, toYYYYMM(setl_time) AS month, "
                    f"sum(fund_pay_sumamt) AS amount FROM {backend.read_table('settlements')} "
                    f"GROUP BY pool, insutype, month",
    }


@dataclass
class FundMonth:
    """One pooling region × insutype × month, with the running figures up to that month."""

    pool: str
    insutype: str
    month: int
    income: int = 0
    spending: int = 0
    cumulative: int = 0  # Σ (income - spending) over every month so far
    ytd_spending: int = 0  # spending of this calendar year so far
    months_elapsed: int = 0  # months of this calendar year with data so far

    @property
    def balance(self) -> int:
        return self.income - self.spending

    def capacity_pm(self) -> int | None:
        """Months of payout capacity × 1000, None when nothing was spent this year."""
        if self.ytd_spending <= 0:
            return None
        return self.cumulative * self.months_elapsed * 1000 // self.ytd_spending


def fund_months(rows: Mapping[str, Rows]) -> list[FundMonth]:
    """Every pool × insutype × month with data, in month order, with running sums."""
    cells: dict[tuple[str, str, int], FundMonth] = {}
    for name in ("income", "spending"):
        for r in rows.get(name, ()):
            key = (str(r["pool"]), str(r["insutype"]), int(r["month"]))
            fm = cells.setdefault(key, FundMonth(*key))
            setattr(fm, name, getattr(fm, name) + fen(r["amount"]))
    out: list[FundMonth] = []
    running: dict[tuple[str, str], tuple[int, int, int, int]] = {}  # cum, year, ytd, n
    for key in sorted(cells):
        fm = cells[key]
        cum, year, ytd, n = running.get(key[:2], (0, 0, 0, 0))
        if fm.month // 100 != year:
            year, ytd, n = fm.month // 100, 0, 0
        cum += fm.balance
        ytd += fm.spending
        n += 1
        running[key[:2]] = (cum, year, ytd, n)
        fm.cumulative, fm.ytd_spending, fm.months_elapsed = cum, ytd, n
        out.append(fm)
    return out


def _fund_finding(rule: Rule, fm: FundMonth, amount: int, evidence: dict[str, str], now_ms: int) -> MonitorFinding:
    start, end = month_bounds(fm.month)
    ev = {"month": str(fm.month), "pool": fm.pool, "insutype": fm.insutype, "income": str(fm.income),
          "spending": str(fm.spending), **evidence}
    return MonitorFinding(Finding(rule, f"month|{fm.month}", "", start, end, (), (), amount, ev, now_ms),
                          f"{fm.pool}|{fm.insutype}", fm.pool)


def capacity_findings(rule: Rule, rows: Mapping[str, Rows], as_of: int, now_ms: int) -> list[MonitorFinding]:
    """Closed months whose capacity (cumulative balance ÷ average monthly spending this year) is
    below ``min_months_pm`` / 1000; amount at risk: what the balance lacks to reach it."""
    limit = int(rule.param("min_months_pm"))
    out = []
    for fm in fund_months(rows):
        cap = fm.capacity_pm()
        if fm.month >= as_of or cap is None or cap >= limit:
            continue
        need = fm.ytd_spending * limit // (fm.months_elapsed * 1000)
        out.append(_fund_finding(rule, fm, max(0, need - fm.cumulative), {
            "capacity_months": f"{cap / 1000:.3f}", "min_months": f"{limit / 1000:g}",
            "cumulative_balance": str(fm.cumulative), "ytd_spending": str(fm.ytd_spending),
            "months_elapsed": str(fm.months_elapsed)}, now_ms))
    return out


def negative_findings(rule: Rule, rows: Mapping[str, Rows], as_of: int, now_ms: int) -> list[MonitorFinding]:
    """Closed months whose current balance is below −``tolerance_pm``‰ of their spending."""
    tol = int(rule.param("tolerance_pm"))
    out = []
    for fm in fund_months(rows):
        if fm.month >= as_of or fm.balance * 1000 >= -tol * fm.spending or fm.balance >= 0:
            continue
        out.append(_fund_finding(rule, fm, -fm.balance, {
            "current_balance": str(fm.balance), "tolerance_pm": str(tol)}, now_ms))
    return out


# --- purchase-sale-inventory: settled vs sold ------------------------------------------------------

def settled_over_sold_queries(rule: Rule, backend: Backend) -> dict[str, str]:
    """Per institution × drug × month, quantity on fee lines vs quantity sold (SALE_OUT), for the
    drugs the institution keeps in inventory (any movement at all), where settled exceeds sold by
    more than the tolerance. Gross on both sides: a refund reverses a sale (SALE_RETURN) and its
    settlement together, and a partial reversal carries no quantities, so netting only one side
    would be wrong; comparing gross to gross keeps each pair consistent."""
    tol = int(rule.param("tolerance_pm"))
    min_units = int(rule.param("min_excess_units"))
    fee, mov = backend.read_table("fee_details"), backend.read_table("inventory_movements")
    # cluster mode: both sides are Distributed tables; GLOBAL runs the subquery once and ships its
    # result to the shards (a plain IN / JOIN over a Distributed table there is refused)
    g = "GLOBAL " if backend.cluster else ""
    return {"rows": (
        "SELECT fixmedins_code, med_list_codg, month, settled, fee, sold, admdvs FROM ("
        " SELECT fixmedins_code, med_list_codg, toYYYYMM(setl_time) AS month, sum(cnt) AS settled,"
        " sum(det_item_fee_sumamt) AS fee"
        f" FROM {fee} WHERE (fixmedins_code, med_list_codg) {g}IN"
        f" (SELECT DISTINCT fixmedins_code, med_list_codg FROM {mov})"
        " GROUP BY fixmedins_code, med_list_codg, month"
        f") AS settled_ {g}ANY LEFT JOIN ("
        " SELECT fixmedins_code, med_list_codg, toYYYYMM(mov_time) AS month, sum(cnt) AS sold,"
        " any(admdvs) AS admdvs"
        f" FROM {mov} WHERE mov_type = 'SALE_OUT' GROUP BY fixmedins_code, med_list_codg, month"
        ") AS sold_ USING (fixmedins_code, med_list_codg, month)"
        f" WHERE settled * 1000 > sold * {1000 + tol} + {min_units * 1000}"
    )}


def settled_over_sold_findings(rule: Rule, rows: Mapping[str, Rows], as_of: int,
                               now_ms: int) -> list[MonitorFinding]:
    out = []
    for r in rows.get("rows", ()):
        month = int(r["month"])
        if month >= as_of:
            continue
        settled, sold, fee_fen = units4(r["settled"]), units4(r["sold"]), fen(r["fee"])
        excess = settled - sold
        amount = excess * fee_fen // settled if settled else 0
        h, drug = str(r["fixmedins_code"]), str(r["med_list_codg"])
        start, end = month_bounds(month)
        admdvs = str(r["admdvs"] or "") or h[1:7]
        out.append(MonitorFinding(Finding(rule, f"month|{month}", h, start, end, (), (), amount, {
            "month": str(month), "med_list_codg": drug, "settled_cnt": str(Decimal(settled) / CNT_SCALE),
            "sold_cnt": str(Decimal(sold) / CNT_SCALE), "excess_cnt": str(Decimal(excess) / CNT_SCALE),
            "tolerance_pm": str(rule.param("tolerance_pm")),
        }, now_ms), f"{h}|{drug}", admdvs))
    return out


# --- supervision: institution credit grade ---------------------------------------------------------

def credit_queries(rule: Rule, backend: Backend) -> dict[str, str]:
    """Institutions whose credit score (the ``bi_institution_credit`` view, migration 0005: every
    shard's penalties and claim-side rule hits) is at most ``max_score``."""
    max_score = int(rule.param("max_score"))
    return {"rows": (
        "SELECT fixmedins_code, admdvs, penalties, fines, rule_hits, score, grade"
        f" FROM {backend.database}.bi_institution_credit WHERE score <= {max_score}"
    )}


def credit_findings(rule: Rule, rows: Mapping[str, Rows], as_of: int, now_ms: int) -> list[MonitorFinding]:
    """One standing alert per institution while its score stays low (key ``credit``: not per
    month, so a score that recovers, e.g. when rule hits are retracted, retracts it). The window is
    the last closed month, when the grade was judged; the amount at risk is the fines imposed."""
    start, end = month_bounds(prev_month(as_of))
    out = []
    for r in rows.get("rows", ()):
        h = str(r["fixmedins_code"])
        admdvs = str(r["admdvs"] or "") or h[1:7]
        out.append(MonitorFinding(Finding(rule, "credit", h, start, end, (), (), fen(r["fines"]), {
            "score": str(r["score"]), "grade": str(r["grade"]), "penalties": str(r["penalties"]),
            "rule_hits": str(r["rule_hits"]), "fines": str(r["fines"]), "max_score": str(rule.param("max_score")),
        }, now_ms), h, admdvs))
    return out


MONITORS: dict[str, Monitor] = {
    m.kind: m for m in (
        Monitor("fund_capacity", "fund", fund_queries, capacity_findings,
                "months of payout capacity below the threshold"),
        Monitor("fund_negative", "fund", fund_queries, negative_findings,
                "a month's current balance negative"),
        Monitor("settled_over_sold", "procurement", settled_over_sold_queries, settled_over_sold_findings,
                "more settled to the fund than sold"),
        Monitor("credit_low", "supervision", credit_queries, credit_findings,
                "an institution's credit score at or below the threshold"),
    )
}


# --- running ------------------------------------------------------------------------------------

@dataclass
class MonitorRun:
    """What one run did: alerts emitted (FIRED / RETRACTED datums) and findings per rule."""

    as_of: int | None
    emitted: list[dict[str, Any]] = field(default_factory=list)
    findings: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.emitted:
            k = f"{d['rule_id']}:{d['status']}"
            out[k] = out.get(k, 0) + 1
        return out


def data_as_of(backend: Backend) -> int | None:
    """YYYYMM of the latest landed settlement: months before it are closed. None without data."""
    res = backend.query(f"SELECT count(), toYYYYMM(max(setl_time)) FROM {backend.read_table('settlements')}")
    n, month = res.rows[0]
    return int(month) if n else None


def monitor_rules(rules: RuleSet | Iterable[Rule]) -> list[Rule]:
    """The enabled rules a monitor evaluates."""
    items = rules.rules if isinstance(rules, RuleSet) else tuple(rules)
    return [r for r in items if r.enabled and r.kind in MONITORS]


def standing_alerts(backend: Backend, rule_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Latest version of every alert of these rules, as datums, plus ``_fired`` (how many
    generations fired so far). Within one second RETRACTED wins, as in ``yibao evaluate``."""
    if not rule_ids:
        return {}
    version = "toUInt64(detected_at) * 2 + (status = 'RETRACTED')"
    cols = ("event_id", "status", "rule_id", "rule_version", "result_type", "severity", "subsystem",
            "fixmedins_code", "psn_token", "admdvs", "setl_ids", "mdtrt_ids", "window_start", "window_end",
            "amount_at_risk", "evidence_keys", "evidence_values", "detected_at")
    picks = ", ".join(f"argMax({c}, {version}) AS {c}_" for c in cols)
    ids = ", ".join(literal(r) for r in rule_ids)
    res = backend.query(
        f"SELECT alert_id, {picks}, uniqExactIf(event_id, status = 'FIRED') AS fired_ "
        f"FROM {backend.read_table('alerts')} WHERE rule_id IN ({ids}) GROUP BY alert_id"
    )
    out: dict[str, dict[str, Any]] = {}
    for row in res.dicts():
        d = {c: row[f"{c}_"] for c in cols}
        d["alert_id"] = str(row["alert_id"])
        d["evidence"] = dict(zip(d.pop("evidence_keys"), d.pop("evidence_values"), strict=True))
        for t in ("window_start", "window_end", "detected_at"):
            d[t] = int(d[t].timestamp() * 1000)
        d["amount_at_risk"] = fen(d["amount_at_risk"])
        d["setl_ids"], d["mdtrt_ids"] = list(d["setl_ids"]), list(d["mdtrt_ids"])
        for k in ("fixmedins_code", "psn_token", "admdvs"):
            d[k] = d[k] or None
        d["_fired"] = int(row["fired_"])
        out[d["alert_id"]] = d
    return out


def evaluate(backend: Backend, rules: RuleSet | Iterable[Rule], now_ms: int | None = None,
             as_of: int | None = None) -> MonitorRun:
    """Run every enabled monitor rule; return the alert datums to emit (nothing is written).

    ``as_of`` (YYYYMM): months before it are evaluated; default the month of the latest settlement.
    """
    t0 = time.perf_counter()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    rules_ = monitor_rules(rules)
    as_of = data_as_of(backend) if as_of is None else as_of
    run = MonitorRun(as_of)
    if not rules_ or as_of is None:
        run.seconds = time.perf_counter() - t0
        return run
    standing = standing_alerts(backend, [r.id for r in rules_])
    for rule in rules_:
        mon = MONITORS[rule.kind]
        rows = {name: backend.query(sql).dicts() for name, sql in mon.queries(rule, backend).items()}
        found = mon.findings(rule, rows, as_of, now)
        run.findings[rule.id] = len(found)
        holding: set[str] = set()
        for mf in found:
            aid = alert_id(rule.id, mf.subject, mf.finding.key)
            holding.add(aid)
            prev = standing.get(aid)
            if prev is not None and prev["status"] == "FIRED":
                continue
            generation = int(prev["_fired"]) if prev is not None else 0
            datum = alert_datum(mf.finding, mon.subsystem, mf.subject, None, mf.admdvs, generation)
            datum["detected_at"] = max(now, prev["detected_at"] + 1) if prev is not None else now
            run.emitted.append(datum)
        for aid, prev in standing.items():
            if prev["rule_id"] != rule.id or prev["status"] != "FIRED" or aid in holding:
                continue
            month = int(prev["evidence"].get("month", "0") or 0)
            if month >= as_of:
                continue  # not evaluated this run (as_of moved back): leave it standing
            fired = {k: v for k, v in prev.items() if k != "_fired"}
            fired["event_id"] = alert_event_id(aid, "FIRED", max(0, int(prev["_fired"]) - 1))
            run.emitted.append(retraction(fired, now, "condition cleared on re-evaluation",
                                          max(0, int(prev["_fired"]) - 1)))
    run.seconds = time.perf_counter() - t0
    return run


def alert_columns(datums: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows of the ``alerts`` table for these datums, as the ingestors build them."""
    from schemas import Codec

    from .messages import alert_plan
    from .privacy import Pseudonymizer

    plan = alert_plan(Codec())
    n = len(datums)
    # alert datums carry tokens already; the pseudonymizer is never asked for one here
    pseudo = Pseudonymizer(b"monitors-never-pseudonymize-key!", "mon")
    cols: dict[str, list[Any]] = plan.build(list(datums), [MONITOR_PARTITION] * n, [0] * n, pseudo)
    return cols


def write_alerts(backend: Backend, datums: Sequence[dict[str, Any]]) -> int:
    """Insert the datums into the alerts table (one INSERT)."""
    if not datums:
        return 0
    return backend.insert("alerts", alert_columns(datums))


Publisher = Callable[[Sequence[dict[str, Any]]], None]


def run_monitors(backend: Backend, rules: RuleSet | Iterable[Rule], publish: Publisher | None = None,
                 now_ms: int | None = None, as_of: int | None = None) -> MonitorRun:
    """Evaluate, publish the changes to the alerts topic (``publish``, if given: acknowledged
    before the rows are written, as in ingestion), then insert them into the alerts table."""
    run = evaluate(backend, rules, now_ms, as_of)
    if run.emitted:
        if publish is not None:
            publish(run.emitted)
        write_alerts(backend, run.emitted)
    log.info("monitors ran", as_of=run.as_of, findings=run.findings, emitted=run.counts(),
             seconds=round(run.seconds, 3))
    return run


def alert_key(datum: Mapping[str, Any]) -> bytes:
    """Kafka key of an alert on the alerts topic, as the ingestors choose it."""
    return str(datum["fixmedins_code"] or datum["psn_token"] or datum["alert_id"]).encode()


def kafka_publisher(settings: Any) -> Publisher:
    """A blocking publisher to the alerts topic (for the CLI; acks=all)."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    from schemas import Codec

    codec = Codec()
    topic = settings.topic("alerts")
    subject = codec.subject_of(ALERT_RECORD)

    def publish(datums: Sequence[dict[str, Any]]) -> None:
        async def go() -> None:
            producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), acks="all")
            await producer.start()
            try:
                futures = []
                for d in datums:
                    value = codec.encode(ALERT_RECORD, d)
                    futures.append(await producer.send(topic, value, key=alert_key(d),
                                                       headers=framed_headers(subject, value)))
                await asyncio.gather(*futures)
            finally:
                await producer.stop()

        asyncio.run(go())

    return publish


__all__ = ["ALERT_RECORD", "MONITORS", "MONITOR_PARTITION", "FundMonth", "Monitor", "MonitorFinding", "MonitorRun",
           "alert_columns", "alert_key", "data_as_of", "evaluate", "fund_months", "kafka_publisher", "monitor_rules",
           "run_monitors", "standing_alerts", "write_alerts"]
