"""`yibao report`: one self-contained HTML dashboard over the BI views.

Why a file and not a web app: the machines that run the pipeline (and the people reading the
figures) often have no internet and no Grafana, so the report is a single HTML file that opens
from disk anywhere: no script, font, stylesheet or image is fetched (a Content-Security-Policy
``default-src 'none'`` makes the browser refuse any that slipped in, so the browser test would
see it as a console error). Charts are inline SVG drawn here in Python; tooltips are SVG
``<title>`` elements, so the page needs no JavaScript at all.

Layers, so each can be tested on its own:

- :func:`resolve_views` checks that the BI views (migrations 0003, 0006, 0008) exist with
  the columns this module reads (:data:`VIEWS`, the contract) and names where to read them;
- :func:`load` runs a few small aggregate queries (valid on ClickHouse 18.16 and chDB) and turns
  the rows into plain dataclasses (:class:`ReportData`);
- :func:`render` turns a :class:`ReportData` into the HTML text; it never touches a backend, so
  unit tests feed it fake rows.

Every chart has a title, axes with units, a legend where colours carry meaning, and an explicit
"no data" state (``data-state="empty"``) instead of an empty frame. Each data mark (bar, line,
point) carries ``class="mark"``: the browser test counts them in the DOM.

Every value is shown as it is: an axis that would crowd most values into a corner (funds of 10
months next to one of 2,000) turns logarithmic, a value the axis cannot place is drawn at its edge
with its true figure written, points that coincide are counted, and a chart whose view judges as
of the data's last day (simulated or replayed data end in the past) says so, and sets its figure
against the alerts of the rule that judges the same thing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from schemas.calendar import CHINA
from sinks.base import QueryResult, literal

from .svg import (
    LATE_COLOR,
    OK_COLOR,
    OTHER_COLOR,
    PALETTE,
    PENDING_COLOR,
    WARN_COLOR,
    WIDTH,
    Chart,
    Scale,
    bin_points,
    clip,
    color_map,
    esc,
    fmt_axis,
    fmt_cny,
    fmt_cny_tick,
    fmt_num,
    legend_html,
    nice_ticks,
    svg_doc,
    text,
    text_width,
    value_scale,
    wrap,
    x_axis,
    y_axis,
)

#: The BI views and the columns the report reads from each (the contract with sinks/ddl/0003 and 0008).
VIEWS: dict[str, tuple[str, ...]] = {
    "bi_fund_health": ("insu_admdvs", "insutype", "month", "income", "spending", "current_balance",
                       "cumulative_balance", "months_capacity", "policy_ratio"),
    "bi_alerts_by_rule": ("day", "rule_id", "admdvs", "alerts"),
    "bi_cross_province_flows": ("day", "insu_admdvs", "mdtrt_admdvs", "settlements", "medfee_sumamt",
                                "fund_pay_sumamt", "filings"),
    "bi_procurement_completion": ("fixmedins_code", "med_list_codg", "cntr_id", "agreed_volume", "purchased",
                                  "completion_pct", "elapsed_pct", "lag_points", "as_of"),
    "bi_supplier_payments": ("fixmedins_code", "month", "deliveries", "delivered_amt", "paid_deliveries", "on_time",
                             "on_time_rate", "weighted_avg_pay_days", "overdue_unpaid", "as_of"),
    "bi_supervision_outcomes": ("admdvs", "month", "kind", "type", "cnt", "amount"),
}

#: Months of payout capacity below which a pooling region is warned about (domain.md: 3 months).
CAPACITY_WARNING_MONTHS = 3.0
#: Completion lagging the elapsed share of the contract cycle by more than this many points is a warning.
LAG_WARNING_POINTS = 10.0
#: The rules whose alerts a chart sets its own figures against.
VOLUME_LAG_RULE = "YB-PROC-VOLUME-LAG"
PAY_OVERDUE_RULE = "YB-PROC-PAY-OVERDUE"
CAPACITY_RULE = "YB-FUND-CAPACITY"
#: Days the data may end before today before a chart says that it judges as of the data's end.
STALE_DAYS = 2
#: Completion above this share of the agreed volume is drawn at the top of the procurement chart.
COMPLETION_AXIS_MAX = 200.0

INSUTYPE_NAMES = {"310": "employee", "390": "resident"}

class ReportError(Exception):
    """The report cannot be made from this database; ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class _Queryable(Protocol):
    """What :func:`load` needs of a backend (a :class:`sinks.base.Backend`, or a fake in tests)."""

    @property
    def database(self) -> str: ...

    def query(self, sql: str) -> QueryResult: ...


# --- data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FundCapacity:
    """Latest month of one pooling region's fund for one insurance type."""

    region: str
    insutype: str
    month: date
    months_capacity: float | None
    cumulative_balance: float
    spending: float


@dataclass(frozen=True)
class AlertCount:
    day: date
    rule_id: str
    alerts: int


@dataclass(frozen=True)
class Flow:
    """Cross-province traffic from the insured region to the region of treatment."""

    insu_admdvs: str
    mdtrt_admdvs: str
    settlements: int
    medfee: float
    fund_pay: float
    filings: int


@dataclass(frozen=True)
class Completion:
    """One volume-based procurement contract: how much of the agreed volume is bought."""

    fixmedins_code: str
    med_list_codg: str
    cntr_id: str
    completion_pct: float
    elapsed_pct: float
    lag_points: float


@dataclass(frozen=True)
class Payments:
    """A hospital's accepted deliveries and how it paid its suppliers for them (30-day rule)."""

    fixmedins_code: str
    deliveries: int
    paid: int
    on_time: int
    overdue_unpaid: int

    @property
    def paid_late(self) -> int:
        return max(0, self.paid - self.on_time)

    @property
    def known(self) -> int:
        """Deliveries whose outcome is known: paid, or unpaid past the 30 days (the view's
        ``on_time_rate`` is ``on_time`` of these)."""
        return self.paid + self.overdue_unpaid

    @property
    def pending(self) -> int:
        """Unpaid deliveries that are not overdue yet."""
        return max(0, self.deliveries - self.paid - self.overdue_unpaid)


@dataclass(frozen=True)
class Recovery:
    admdvs: str
    month: date
    amount: float


@dataclass(frozen=True)
class Outcome:
    """Supervision totals of one kind (inspection, tip, penalty, recovery)."""

    kind: str
    count: int
    amount: float


@dataclass
class ReportData:
    """Everything :func:`render` draws; built by :func:`load` or by a test."""

    database: str
    backend: str
    generated_at: datetime
    fund: list[FundCapacity] = field(default_factory=list)
    alerts: list[AlertCount] = field(default_factory=list)
    alert_days: int = 90
    flows: list[Flow] = field(default_factory=list)
    flow_pairs: int = 0
    completion: list[Completion] = field(default_factory=list)
    contracts: int = 0
    #: the China day bi_procurement_completion judges at (its latest order or contract, or today)
    completion_as_of: date | None = None
    payments: list[Payments] = field(default_factory=list)
    hospitals: int = 0
    #: the moment bi_supplier_payments judges overdue at (its latest acceptance or payment, or now)
    payments_as_of: datetime | None = None
    #: standing alerts per rule over every day on record (bi_alerts_by_rule)
    rule_totals: dict[str, int] = field(default_factory=dict)
    recoveries: list[Recovery] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    rule_names: dict[str, str] = field(default_factory=dict)


# --- query layer --------------------------------------------------------------------------------

def resolve_views(backend: _Queryable) -> dict[str, str]:
    """Qualified name to read each BI view from; :class:`ReportError` naming what is missing.

    Checked up front, columns included, so that a database migrated by an older release fails
    with "run `yibao migrate`" rather than with ClickHouse's "Unknown identifier" half-way through.
    The views have the same name in cluster mode: each node's view reads the Distributed ``*_all``
    tables, so it already sees every shard (0003_bi_aggregates.sql).
    """
    db = backend.database
    wanted = ", ".join(literal(n) for n in VIEWS)
    res = backend.query(
        f"SELECT table, name FROM system.columns WHERE database = {literal(db)} AND table IN ({wanted})"
    )
    columns: dict[str, set[str]] = defaultdict(set)
    for table, column in res.rows:
        columns[str(table)].add(str(column))
    sources: dict[str, str] = {}
    missing: list[str] = []
    incomplete: list[str] = []
    for view, needed in VIEWS.items():
        if view not in columns:
            missing.append(view)
            continue
        lacking = [c for c in needed if c not in columns[view]]
        if lacking:
            incomplete.append(f"{view} (no {', '.join(lacking)})")
            continue
        sources[view] = f"{db}.{view}"
    hint = "run `yibao migrate` (it creates and updates the BI views, sinks/ddl/), then try again"
    if missing:
        raise ReportError(f"database {db} has no BI view {', '.join(missing)}", hint)
    if incomplete:
        raise ReportError(f"BI views of database {db} are out of date: {'; '.join(incomplete)}", hint)
    return sources


def load(backend: _Queryable, *, backend_name: str = "", alert_days: int = 90, top: int = 15,
         rule_names: Mapping[str, str] | None = None, progress: Callable[[str], None] | None = None,
         now: datetime | None = None) -> ReportData:
    """Query the BI views and return what the report draws.

    Queries aggregate in ClickHouse and cap their row counts (``top`` flows and hospitals, 2,000
    contracts, ``alert_days`` days of alerts), so the page stays small however big the tables are.
    """
    if alert_days < 1:
        raise ValueError("alert_days must be >= 1")
    say = progress or (lambda _m: None)
    src = resolve_views(backend)
    data = ReportData(database=backend.database, backend=backend_name, alert_days=alert_days,
                      generated_at=now or datetime.now().astimezone(), rule_names=dict(rule_names or {}))

    def q(view: str, sql: str) -> QueryResult:
        say(f"reading {view}")
        return backend.query(sql.format(src=src[view]))

    res = q("bi_fund_health", "SELECT insu_admdvs, insutype, month, months_capacity, cumulative_balance, spending "
                              "FROM {src} ORDER BY insu_admdvs, insutype, month")
    data.fund = latest_capacity(res.rows)

    res = q("bi_alerts_by_rule",
            f"SELECT day, rule_id, sum(alerts) AS n FROM {{src}} "
            f"WHERE day >= (SELECT max(day) FROM {{src}}) - {int(alert_days) - 1} "
            "GROUP BY day, rule_id ORDER BY day, rule_id")
    data.alerts = [AlertCount(as_date(r[0]), str(r[1]), as_int(r[2])) for r in res.rows]
    res = backend.query(f"SELECT rule_id, sum(alerts) AS n FROM {src['bi_alerts_by_rule']} GROUP BY rule_id")
    data.rule_totals = {str(r[0]): as_int(r[1]) for r in res.rows}

    res = q("bi_cross_province_flows",
            "SELECT insu_admdvs, mdtrt_admdvs, sum(settlements) AS n_setl, sum(medfee_sumamt) AS medfee, "
            "sum(fund_pay_sumamt) AS fund_pay, sum(filings) AS n_filings FROM {src} "
            "GROUP BY insu_admdvs, mdtrt_admdvs "
            f"ORDER BY n_setl DESC, n_filings DESC, insu_admdvs, mdtrt_admdvs LIMIT {int(top)}")
    data.flows = [Flow(str(r[0]), str(r[1]), as_int(r[2]), as_float(r[3]), as_float(r[4]), as_int(r[5]))
                  for r in res.rows]
    data.flow_pairs = as_int(backend.query(
        f"SELECT count() FROM (SELECT insu_admdvs, mdtrt_admdvs FROM {src['bi_cross_province_flows']} "
        "GROUP BY insu_admdvs, mdtrt_admdvs)").scalar())

    res = q("bi_procurement_completion",
            "SELECT fixmedins_code, med_list_codg, cntr_id, completion_pct, elapsed_pct, lag_points "
            "FROM {src} ORDER BY lag_points DESC, cntr_id LIMIT 2000")
    data.completion = [Completion(str(r[0]), str(r[1]), str(r[2]), as_float(r[3]), as_float(r[4]), as_float(r[5]))
                       for r in res.rows if r[3] is not None and r[4] is not None]
    data.contracts = as_int(backend.query(f"SELECT count() FROM {src['bi_procurement_completion']}").scalar())
    if data.contracts:
        data.completion_as_of = as_date(backend.query(
            f"SELECT max(as_of) FROM {src['bi_procurement_completion']}").scalar())

    res = q("bi_supplier_payments",
            "SELECT fixmedins_code, sum(deliveries) AS n_dlv, sum(paid_deliveries) AS n_paid, "
            "sum(on_time) AS n_on_time, sum(overdue_unpaid) AS n_overdue FROM {src} GROUP BY fixmedins_code "
            f"ORDER BY n_overdue DESC, n_paid - n_on_time DESC, fixmedins_code LIMIT {int(top)}")
    data.payments = [Payments(str(r[0]), as_int(r[1]), as_int(r[2]), as_int(r[3]), as_int(r[4])) for r in res.rows]
    data.hospitals = as_int(backend.query(
        f"SELECT uniqExact(fixmedins_code) FROM {src['bi_supplier_payments']}").scalar())
    if data.hospitals:
        data.payments_as_of = as_datetime(backend.query(
            f"SELECT max(as_of) FROM {src['bi_supplier_payments']}").scalar())

    res = q("bi_supervision_outcomes",
            "SELECT admdvs, month, sum(amount) AS amt FROM {src} WHERE kind = 'recovery' "
            "GROUP BY admdvs, month ORDER BY month, admdvs")
    data.recoveries = [Recovery(str(r[0]), as_date(r[1]), as_float(r[2])) for r in res.rows]
    res = backend.query(f"SELECT kind, sum(cnt) AS n, sum(amount) AS amt FROM {src['bi_supervision_outcomes']} "
                        "GROUP BY kind ORDER BY kind")
    data.outcomes = [Outcome(str(r[0]), as_int(r[1]), as_float(r[2])) for r in res.rows]
    return data


def latest_capacity(rows: Iterable[Sequence[Any]]) -> list[FundCapacity]:
    """Last month per (region, insutype) from ``(region, insutype, month, capacity, balance, spending)``.

    Done here, not with ``argMax`` in SQL: on a Nullable column ClickHouse's argMax skips NULLs
    and would show an older month's capacity as if it were current.
    """
    latest: dict[tuple[str, str], FundCapacity] = {}
    for r in rows:
        cap = None if r[3] is None else float(r[3])
        if cap is not None and not math.isfinite(cap):
            cap = None
        item = FundCapacity(str(r[0]), str(r[1]), as_date(r[2]), cap, as_float(r[4]), as_float(r[5]))
        key = (item.region, item.insutype)
        if key not in latest or item.month >= latest[key].month:
            latest[key] = item
    return list(latest.values())


def as_float(v: Any) -> float:
    """Decimal, int or float from ClickHouse as a float for drawing (NULL and NaN as 0)."""
    if v is None:
        return 0.0
    f = float(v)
    return f if math.isfinite(f) else 0.0


def as_int(v: Any) -> int:
    return 0 if v is None else int(v)


def as_datetime(v: Any) -> datetime | None:
    """A DateTime from the view as an aware datetime (China time when the driver gives it naive)."""
    if isinstance(v, datetime):
        return v if v.tzinfo is not None else v.replace(tzinfo=CHINA)
    if isinstance(v, int | float) and v > 0:
        return datetime.fromtimestamp(v, CHINA)
    return None


def as_date(v: Any) -> date:
    """A month or day as a date, whether the view gives a Date, a DateTime, YYYYMM or text."""
    if isinstance(v, datetime):
        return v.date()
    if isinstance(v, date):
        return v
    if isinstance(v, int | Decimal):
        n = int(v)
        if n > 99_999:  # YYYYMM or YYYYMMDD
            return date(n // 100, n % 100, 1) if n < 1_000_000 else date(n // 10_000, n // 100 % 100, n % 100)
        return date(1970, 1, 1) + timedelta(days=n)
    text = str(v)
    return date.fromisoformat(text[:10] if len(text) >= 10 else f"{text[:7]}-01")


# --- the charts ---------------------------------------------------------------------------------

def fund_chart(items: Sequence[FundCapacity], threshold: float = CAPACITY_WARNING_MONTHS, limit: int = 30,
               alerts: int | None = None) -> Chart:
    """(a) Months of payout capacity per pooling region and insurance type against the warning line.

    Every value is shown as it is: the axis turns logarithmic when the largest are many times the
    typical ones (a small pool with a week of data can show 50 months next to 10), and a value the
    axis cannot place (a deficit on a log axis) is drawn at its edge with the true value written."""
    title = "Fund months of payout capacity by pooling region"
    ranked = sorted(items, key=lambda f: (f.months_capacity is None, f.months_capacity or 0.0, f.region, f.insutype))
    shown = ranked[:limit]
    as_of = max((f.month for f in items), default=None)
    below = sum(1 for f in items if f.months_capacity is not None and f.months_capacity < threshold)
    sub = (f"Latest month per pooling region and insurance type{f' (up to {as_of:%Y-%m})' if as_of else ''}: "
           f"cumulative balance ÷ average monthly spending over the part of the year the data cover, against "
           f"the {threshold:g}-month warning line.")
    if items:
        sub += (f" {below} of {len(items)} below it; lowest first"
                f"{f', {len(shown)} of {len(items)} shown' if len(shown) < len(items) else ''}.")
        if alerts is not None:
            sub += f" {CAPACITY_RULE} (closed months only) has {alerts:,} standing alert{'' if alerts == 1 else 's'}."
    if not shown:
        return Chart("fund", title, sub, None,
                     empty_reason="bi_fund_health has no rows: no fund income or spending yet")
    types = sorted({f.insutype for f in shown})
    colors = color_map(types)
    values = [f.months_capacity for f in shown if f.months_capacity is not None]
    scale = value_scale(values, include=[threshold, 2 * threshold])
    labels = [_capacity_label(f.months_capacity, threshold, scale) for f in shown]
    left, top, bar_h, gap = 190, 26, 18, 6
    right = max(80.0, max(text_width(t) for t in labels) + 16)
    plot_w = WIDTH - left - right
    height = top + len(shown) * (bar_h + gap) + 52

    def x(v: float) -> float:
        return left + plot_w * scale.frac(v)

    bottom = top + len(shown) * (bar_h + gap)
    axis = "months of payout capacity" + (" (logarithmic scale)" if scale.kind == "log" else "")
    body = x_axis(scale.ticks, x, top - 4, bottom, axis, fmt=fmt_axis)
    for i, (f, value) in enumerate(zip(shown, labels, strict=True)):
        y = top + i * (bar_h + gap)
        label = f"{f.region} · {insutype_label(f.insutype)}"
        body.append(text(left - 8, y + bar_h - 4, clip(label, 25), anchor="end", cls="label"))
        if f.months_capacity is None:
            body.append(text(x(scale.origin) + 6, y + bar_h - 4, "n/a: no spending this year", cls="note"))
            continue
        v = f.months_capacity
        warn = v < threshold
        stroke = f' stroke="{WARN_COLOR}" stroke-width="2"' if warn else ""
        tip = (f"{label}, {f.month:%Y-%m}: {v:.2f} months of payout capacity; cumulative balance "
               f"{fmt_cny(f.cumulative_balance)}, spending this month {fmt_cny(f.spending)}")
        x0, x1 = sorted((x(scale.origin), x(v)))
        if scale.kind == "log":  # a bar's length means nothing on a log axis: a dot on a guide line
            cy = y + bar_h / 2
            body.append(f'<line x1="{x(scale.lo):.1f}" y1="{cy:.1f}" x2="{x1:.1f}" y2="{cy:.1f}" class="guide"/>')
            body.append(f'<circle class="mark dot" cx="{x1:.1f}" cy="{cy:.1f}" r="6" fill="{colors[f.insutype]}"'
                        f'{stroke}><title>{esc(tip)}</title></circle>')
            x1 += 6
        else:
            body.append(f'<rect class="mark bar" x="{x0:.1f}" y="{y}" width="{max(2.0, x1 - x0):.1f}" '
                        f'height="{bar_h}" fill="{colors[f.insutype]}"{stroke}><title>{esc(tip)}</title></rect>')
        cls = "value warn" if warn else "value"
        if scale.kind == "linear" and v < 0:
            if x1 - x0 > text_width(value) + 10:  # inside a long deficit bar, by the zero line
                body.append(text(x1 - 5, y + bar_h - 4, value, anchor="end", cls="value-in"))
            else:
                body.append(text(x0 - 5, y + bar_h - 4, value, anchor="end", cls=cls))
        else:
            body.append(text(max(x1, x0 + 2) + 5, y + bar_h - 4, value, cls=cls))
    tx = x(threshold)
    body.append(f'<line x1="{tx:.1f}" y1="{top - 18}" x2="{tx:.1f}" y2="{bottom:.1f}" class="threshold"/>')
    body.append(text(tx + 4, top - 10, f"{threshold:g}-month warning line", cls="threshold-label"))
    shape = "dot" if scale.kind == "log" else "box"
    legend = legend_html([*((insutype_label(t), colors[t], shape) for t in types),
                          (f"below {threshold:g} months (warning)", WARN_COLOR, "outline"),
                          (f"{threshold:g}-month warning line", WARN_COLOR, "dash")])
    return Chart("fund", title, sub, svg_doc(int(height), body, title), legend)


def _capacity_label(v: float | None, threshold: float, scale: Scale) -> str:
    """The value written next to a fund's bar: always the true figure, flagged below the warning
    line, and marked "‹" when the axis cannot place it (a deficit on a logarithmic axis)."""
    if v is None:
        return "n/a: no spending this year"
    edge = "‹ " if scale.clipped(v) < 0 else ""
    flag = " ⚠ deficit" if v < 0 else " ⚠" if v < threshold else ""
    return f"{edge}{v:,.1f}{flag}"


def insutype_label(code: str) -> str:
    name = INSUTYPE_NAMES.get(code)
    return f"{name} ({code})" if name else f"insutype {code}"


def alerts_chart(rows: Sequence[AlertCount], days: int, rule_names: Mapping[str, str] | None = None,
                 max_series: int = 8) -> Chart:
    """(b) Alerts per day and rule: the busiest rules as lines, the rest folded into "other rules"."""
    title = "Monitoring alerts by rule over time"
    names = rule_names or {}
    total = sum(r.alerts for r in rows)
    sub = (f"Standing alerts per day and rule over the last {days} days of data; {fmt_num(total)} alerts in the "
           "period. An alert counts on the first day of the window it judges, so a rule that looks back (30 "
           "days of prescriptions, 7 days of visits) counts some before the data begin.")
    if not rows or total == 0:
        return Chart("alerts", title, sub, None, empty_reason="no alerts in bi_alerts_by_rule for this period")
    by_rule: dict[str, int] = defaultdict(int)
    for r in rows:
        by_rule[r.rule_id] += r.alerts
    ranked = sorted(by_rule, key=lambda k: (-by_rule[k], k))
    keep = ranked if len(ranked) <= max_series else ranked[:max_series - 1]
    other = "other rules"
    first, last = min(r.day for r in rows), max(r.day for r in rows)
    n_days = (last - first).days + 1
    series: dict[str, list[int]] = {k: [0] * n_days for k in keep}
    if len(keep) < len(ranked):
        series[other] = [0] * n_days
    for r in rows:
        k = r.rule_id if r.rule_id in keep else other
        series[k][(r.day - first).days] += r.alerts
    colors = color_map(keep)
    colors[other] = OTHER_COLOR
    left, right, top, plot_h = 70, 24, 16, 300
    plot_w = WIDTH - left - right
    ticks = nice_ticks(max(max(v) for v in series.values()))

    def x(i: float) -> float:
        return left + (plot_w * i / (n_days - 1) if n_days > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / ticks[-1]

    body = y_axis(ticks, y, left, left + plot_w, "alerts per day")
    step = max(1, math.ceil(n_days / 8))
    for i in range(0, n_days, step):
        d = first + timedelta(days=i)
        body.append(f'<line x1="{x(i):.1f}" y1="{top + plot_h}" x2="{x(i):.1f}" y2="{top + plot_h + 5}" class="axis"/>')
        body.append(text(x(i), top + plot_h + 20, f"{d:%m-%d}", anchor="middle", cls="tick"))
    body.append(text(left + plot_w / 2, top + plot_h + 42,
                     f"day the alert's window begins ({first:%Y-%m-%d} to {last:%Y-%m-%d})",
                     anchor="middle", cls="axis-title"))
    for k, values in series.items():
        label = k if k == other else f"{k}: {names[k]}" if k in names else k
        tip = f"{label}: {sum(values):,} alerts"
        if n_days == 1:
            body.append(f'<circle class="mark dot" cx="{x(0):.1f}" cy="{y(values[0]):.1f}" r="5" '
                        f'fill="{colors[k]}"><title>{esc(tip)}</title></circle>')
            continue
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        body.append(f'<polyline class="mark line" points="{pts}" fill="none" stroke="{colors[k]}" '
                    f'stroke-width="2"><title>{esc(tip)}</title></polyline>')
    legend = legend_html((f"{k} ({sum(v):,})", colors[k], "line") for k, v in series.items())
    return Chart("alerts", title, sub, svg_doc(top + plot_h + 56, body, title), legend)


def flows_chart(flows: Sequence[Flow], pairs: int) -> Chart:
    """(c) The largest cross-province flows, insured region → region of treatment."""
    title = "Cross-province flows: insured region → treatment region"
    total = sum(f.settlements for f in flows)
    sub = ("Cross-province settlements and filings per pair of pooling regions (XXXX99: insured → treated), "
           "the level at which both are recorded.")
    if flows:
        sub += (f" The largest {len(flows)} of {pairs} pairs ({fmt_num(total)} settlements among them); "
                "hover a bar for the amounts.")
    if not flows:
        return Chart("flows", title, sub, None, empty_reason="no cross-province settlements or filings yet")
    left, right, top, bar_h, gap = 200, 160, 12, 11, 8
    plot_w = WIDTH - left - right
    ticks = nice_ticks(max(max(f.settlements, f.filings) for f in flows))
    bottom = top + len(flows) * (2 * bar_h + gap)

    def x(v: float) -> float:
        return left + plot_w * v / ticks[-1]

    body = x_axis(ticks, x, top - 4, bottom, "settlements / filings (count)")
    for i, f in enumerate(flows):
        y = top + i * (2 * bar_h + gap)
        label = f"{f.insu_admdvs} → {f.mdtrt_admdvs}"
        body.append(text(left - 8, y + bar_h + 4, clip(label, 30), anchor="end", cls="label"))
        tip = (f"insured in {f.insu_admdvs}, treated in {f.mdtrt_admdvs}: {f.settlements:,} settlements, "
               f"medical fees {fmt_cny(f.medfee)}, fund paid {fmt_cny(f.fund_pay)}; {f.filings:,} filings")
        for j, (v, color) in enumerate(((f.settlements, PALETTE[0]), (f.filings, PALETTE[1]))):
            if v > 0:
                body.append(f'<rect class="mark bar" x="{left}" y="{y + j * bar_h}" '
                            f'width="{max(1.0, x(v) - left):.1f}" height="{bar_h - 1}" fill="{color}">'
                            f'<title>{esc(tip)}</title></rect>')
        body.append(text(x(max(f.settlements, f.filings)) + 5, y + bar_h + 4,
                          f"fund {fmt_cny(f.fund_pay)}", cls="value"))
    legend = legend_html([("settlements", PALETTE[0], "box"), ("cross-province filings", PALETTE[1], "box")])
    return Chart("flows", title, sub, svg_doc(int(bottom + 48), body, title), legend)


def completion_chart(items: Sequence[Completion], contracts: int, lag: float = LAG_WARNING_POINTS,
                     as_of: date | None = None, today: date | None = None, alerts: int | None = None) -> Chart:
    """(d) Volume-based procurement: completion of the agreed volume against elapsed contract time.

    Contracts of one cycle judged on one day sit on the same point (hundreds of them at 0% bought
    early in a cycle), so points are counted per 2 × 2-point cell and drawn as one dot whose area
    grows with the count, the count written beside it. The view judges as of the data's last day;
    the note under the chart says how that relates to what the volume-lag rule raised."""
    title = "Procurement completion vs elapsed share of the contract cycle"
    lagging = sum(1 for c in items if c.lag_points > lag)
    when = f" as of {as_of:%Y-%m-%d}" if as_of else ""
    sub = (f"Share of the agreed volume bought against the share of the contract cycle elapsed{when}, per "
           f"volume-based procurement contract; a warning when completion lags by more than {lag:g} points.")
    if items:
        sub += (f" {lagging:,} of {len(items):,} shown lag{'s' if lagging == 1 else ''} "
                f"({contracts:,} contracts in all).")
    if not items:
        return Chart("procurement", title, sub, None,
                     empty_reason="no procurement contracts in bi_procurement_completion")
    left, right, top, plot_h = 70, 24, 16, 320
    plot_w = WIDTH - left - right
    x_ticks = nice_ticks(100.0)
    y_top = min(max(100.0, *(c.completion_pct for c in items)), COMPLETION_AXIS_MAX)
    y_ticks = nice_ticks(y_top)

    def x(v: float) -> float:
        return left + plot_w * max(0.0, min(v, x_ticks[-1])) / x_ticks[-1]

    def y(v: float) -> float:
        return top + plot_h - plot_h * max(0.0, min(v, y_ticks[-1])) / y_ticks[-1]

    body = y_axis(y_ticks, y, left, left + plot_w, "completion of agreed volume (%)", fmt=lambda v: f"{v:g}%")
    body += x_axis(x_ticks, x, top, top + plot_h, f"elapsed share of the contract cycle{when} (%)",
                   fmt=lambda v: f"{v:g}%")
    body.append(f'<line x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(100):.1f}" y2="{y(100):.1f}" class="ref-line"/>')
    body.append(f'<line x1="{x(lag):.1f}" y1="{y(0):.1f}" x2="{x(100):.1f}" y2="{y(100 - lag):.1f}" '
                'class="threshold"/>')
    groups = {True: [c for c in items if c.lag_points > lag], False: [c for c in items if c.lag_points <= lag]}
    binned = {k: bin_points(((c.elapsed_pct, min(c.completion_pct, y_ticks[-1])) for c in v), cell=5.0)
              for k, v in groups.items()}
    most = max(n for b in binned.values() for _, _, n in b)
    placed: list[tuple[float, float, float, float]] = []  # count labels drawn so far (x0, y0, x1, y1)
    for warn in (False, True):
        for ex, ey, n in binned[warn]:
            r = max(3.5, 24 * math.sqrt(n / most))
            state = f"lagging by more than {lag:g} points" if warn else "on schedule or ahead"
            tip = (f"{n:,} contract{'s' if n > 1 else ''} {state}: about {ey:.0f}% bought, "
                   f"{ex:.0f}% of the cycle elapsed")
            body.append(f'<circle class="mark dot" cx="{x(ex):.1f}" cy="{y(ey):.1f}" r="{r:.1f}" '
                        f'fill="{WARN_COLOR if warn else OK_COLOR}" fill-opacity="0.6" stroke="#fff" '
                        f'stroke-width="1"><title>{esc(tip)}</title></circle>')
            box = (x(ex) + r + 2, y(ey) - 7, x(ex) + r + 4 + text_width(f"{n:,}"), y(ey) + 6)
            if n > 1 and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                placed.append(box)
                body.append(text(box[0] + 1, y(ey) + 4, f"{n:,}", cls="value warn" if warn else "value"))
    above = sum(1 for c in items if c.completion_pct > y_ticks[-1])
    if above:
        body.append(text(left + plot_w - 4, top + 12, f"{above:,} above {y_ticks[-1]:g}% drawn at the top",
                         anchor="end", cls="note"))
    notes = [ln for note in _lag_notes(as_of, today, alerts) for ln in wrap(note, plot_w)]
    for i, line in enumerate(notes):
        body.append(text(left, top + plot_h + 58 + 16 * i, line, cls="note"))
    legend = legend_html([("on schedule or ahead", OK_COLOR, "dot"), (f"lagging > {lag:g} points", WARN_COLOR, "dot"),
                          ("completion = elapsed", "#555", "line"), (f"{lag:g}-point lag line", WARN_COLOR, "dash"),
                          ("dot area: contracts at that point (number beside it)", "#8c959f", "dot")])
    height = top + plot_h + 52 + 16 * len(notes) + (8 if notes else 0)
    return Chart("procurement", title, sub, svg_doc(height, body, title), legend)


def _lag_notes(as_of: date | None, today: date | None, alerts: int | None) -> list[str]:
    """What sets the chart's count apart from the alerts of the volume-lag rule, in words."""
    notes = []
    if as_of is not None and today is not None and (today - as_of).days >= STALE_DAYS:
        notes.append(f"Judged as of {as_of:%Y-%m-%d}, the latest order or contract on record, not today "
                     f"({today:%Y-%m-%d}): purchases after the data end are unknown.")
    if alerts is not None:
        notes.append(f"{VOLUME_LAG_RULE} raised {alerts:,} alert{'' if alerts == 1 else 's'}: it judges each "
                     "contract at every China midnight in event time, and only when the volume behind is a "
                     "whole unit and worth its minimum.")
    return notes


def payments_chart(items: Sequence[Payments], hospitals: int, as_of: datetime | None = None,
                   today: date | None = None, alerts: int | None = None) -> Chart:
    """(d) Supplier payments per hospital: on time, late, overdue and unpaid, not yet due.

    The label beside each bar uses the view's definition of the on-time rate (paid in full within
    30 days, among the deliveries whose outcome is known: paid, or overdue), so that a hospital with
    27 overdue deliveries never reads "100% on time"."""
    title = "Supplier payments and overdue deliveries by hospital"
    overdue = sum(p.overdue_unpaid for p in items)
    when = f" as of {as_of:%Y-%m-%d %H:%M}" if as_of else ""
    sub = (f"Accepted deliveries by payment status{when}: hospitals must pay their suppliers within 30 days of "
           "acceptance. On time: paid in full within them, out of the deliveries paid or overdue.")
    if items:
        sub += (f" {len(items)} of {hospitals} hospitals shown, most overdue first; "
                f"{fmt_num(overdue)} overdue unpaid deliveries among them.")
    if not items or not any(p.deliveries for p in items):
        return Chart("payments", title, sub, None, empty_reason="no accepted deliveries in bi_supplier_payments")
    parts: list[tuple[str, str, Callable[[Payments], int]]] = [
        ("paid on time", OK_COLOR, lambda p: p.on_time), ("paid late", LATE_COLOR, lambda p: p.paid_late),
        ("overdue, unpaid", WARN_COLOR, lambda p: p.overdue_unpaid),
        ("unpaid, not yet due", PENDING_COLOR, lambda p: p.pending)]
    labels = [_payment_label(p) for p in items]
    left, top, bar_h, gap = 150, 12, 16, 7
    right = max(60.0, max(text_width(t) for t in labels) + 14)
    plot_w = WIDTH - left - right
    ticks = nice_ticks(max(max(p.deliveries, p.paid + p.overdue_unpaid) for p in items))
    bottom = top + len(items) * (bar_h + gap)

    def x(v: float) -> float:
        return left + plot_w * v / ticks[-1]

    body = x_axis(ticks, x, top - 4, bottom, "accepted deliveries (count)")
    for i, (p, label) in enumerate(zip(items, labels, strict=True)):
        y = top + i * (bar_h + gap)
        body.append(text(left - 8, y + bar_h - 3, clip(p.fixmedins_code, 20), anchor="end", cls="label"))
        acc = 0
        for name, color, get in parts:
            v = get(p)
            if v <= 0:
                continue
            tip = f"{p.fixmedins_code}: {v:,} of {p.deliveries:,} deliveries {name}"
            body.append(f'<rect class="mark bar" x="{x(acc):.1f}" y="{y}" width="{max(1.0, x(acc + v) - x(acc)):.1f}" '
                        f'height="{bar_h}" fill="{color}"><title>{esc(tip)}</title></rect>')
            acc += v
        body.append(text(x(acc) + 5, y + bar_h - 3, label, cls="value warn" if p.overdue_unpaid else "value"))
    notes = []
    if as_of is not None and today is not None and (today - as_of.astimezone(CHINA).date()).days >= STALE_DAYS:
        notes.append(f"Judged as of {as_of:%Y-%m-%d %H:%M}, the latest acceptance or payment on record, not "
                     f"today ({today:%Y-%m-%d}): payments after the data end are unknown.")
    if alerts is not None:
        notes.append(f"{PAY_OVERDUE_RULE} has {alerts:,} standing alert{'' if alerts == 1 else 's'} (one per overdue "
                     "delivery, judged in event time).")
    lines = [ln for note in notes for ln in wrap(note, WIDTH - left - 10)]
    for j, line in enumerate(lines):
        body.append(text(left, bottom + 58 + 16 * j, line, cls="note"))
    legend = legend_html((name, color, "box") for name, color, _ in parts)
    height = int(bottom + 48 + 16 * len(lines) + (10 if lines else 0))
    return Chart("payments", title, sub, svg_doc(height, body, title), legend)


def _payment_label(p: Payments) -> str:
    """'4% on time (1 of 28) · 27 overdue': the on-time share among deliveries whose outcome is known."""
    if not p.known:
        return "none due yet"
    label = f"{100 * p.on_time / p.known:.0f}% on time ({p.on_time:,} of {p.known:,})"
    return f"{label} · {p.overdue_unpaid:,} overdue" if p.overdue_unpaid else label


def recoveries_chart(items: Sequence[Recovery], max_regions: int = 6, inspections: int = 0,
                     penalties: int = 0) -> Chart:
    """(e) Recovered funds per month, stacked by region (the largest regions, the rest as "other")."""
    title = "Recovered funds by region and month"
    total = sum(r.amount for r in items)
    sub = "Funds recovered from institutions after inspections and penalties, per month and region."
    if items:
        sub += f" {fmt_cny(total)} in total."
    if not items or total <= 0:
        reason = "no recovered funds in bi_supervision_outcomes"
        if inspections:
            reason += (f": recoveries follow an inspection by weeks, and the data hold {inspections:,} "
                       f"inspection{'' if inspections == 1 else 's'} and {penalties:,} "
                       f"penalt{'y' if penalties == 1 else 'ies'} so far")
        return Chart("recoveries", title, sub, None, empty_reason=reason)
    by_region: dict[str, float] = defaultdict(float)
    for r in items:
        by_region[r.admdvs] += r.amount
    ranked = sorted(by_region, key=lambda k: (-by_region[k], k))
    keep = ranked if len(ranked) <= max_regions else ranked[:max_regions - 1]
    other = "other regions"
    months = sorted({date(r.month.year, r.month.month, 1) for r in items})
    stacks: dict[date, dict[str, float]] = {m: defaultdict(float) for m in months}
    for r in items:
        stacks[date(r.month.year, r.month.month, 1)][r.admdvs if r.admdvs in keep else other] += r.amount
    order = [*keep, *([other] if len(keep) < len(ranked) else [])]
    colors = color_map(keep)
    colors[other] = OTHER_COLOR
    left, right, top, plot_h = 80, 24, 16, 280
    plot_w = WIDTH - left - right
    ticks = nice_ticks(max(sum(max(0.0, v) for v in s.values()) for s in stacks.values()))
    slot = plot_w / len(months)
    bar_w = min(60.0, slot * 0.7)

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / ticks[-1]

    body = y_axis(ticks, y, left, left + plot_w, "recovered (CNY)", fmt=fmt_cny_tick)
    label_every = max(1, math.ceil(len(months) / 12))
    for i, m in enumerate(months):
        cx = left + slot * (i + 0.5)
        acc = 0.0
        for k in order:
            v = stacks[m].get(k, 0.0)
            if v <= 0:
                continue
            tip = f"{k}, {m:%Y-%m}: {fmt_cny(v)} recovered"
            body.append(f'<rect class="mark bar" x="{cx - bar_w / 2:.1f}" y="{y(acc + v):.1f}" '
                        f'width="{bar_w:.1f}" height="{max(1.0, y(acc) - y(acc + v)):.1f}" fill="{colors[k]}">'
                        f'<title>{esc(tip)}</title></rect>')
            acc += v
        if i % label_every == 0:
            body.append(text(cx, top + plot_h + 18, f"{m:%Y-%m}", anchor="middle", cls="tick"))
    body.append(text(left + plot_w / 2, top + plot_h + 40, "month", anchor="middle", cls="axis-title"))
    sums = {k: by_region[k] for k in keep}
    sums[other] = total - sum(sums.values())
    legend = legend_html((f"{k} ({fmt_cny(sums[k])})", colors[k], "box") for k in order)
    return Chart("recoveries", title, sub, svg_doc(top + plot_h + 54, body, title), legend)


def charts(data: ReportData, threshold: float = CAPACITY_WARNING_MONTHS) -> list[Chart]:
    """The report's figures, in reading order."""
    today = data.generated_at.astimezone(CHINA).date()
    totals = data.rule_totals
    counts = {o.kind: o.count for o in data.outcomes}
    return [
        fund_chart(data.fund, threshold, alerts=totals.get(CAPACITY_RULE, 0) if totals else None),
        alerts_chart(data.alerts, data.alert_days, data.rule_names),
        flows_chart(data.flows, data.flow_pairs),
        completion_chart(data.completion, data.contracts, as_of=data.completion_as_of, today=today,
                         alerts=totals.get(VOLUME_LAG_RULE, 0) if totals else None),
        payments_chart(data.payments, data.hospitals, as_of=data.payments_as_of, today=today,
                       alerts=totals.get(PAY_OVERDUE_RULE, 0) if totals else None),
        recoveries_chart(data.recoveries, inspections=counts.get("inspection", 0), penalties=counts.get("penalty", 0)),
    ]


def _kpis(data: ReportData, threshold: float) -> str:
    """The headline numbers above the charts."""
    below = sum(1 for f in data.fund if f.months_capacity is not None and f.months_capacity < threshold)
    outcome = {o.kind: o for o in data.outcomes}
    items = [
        (f"funds below {threshold:g} months", f"{below} of {len(data.fund)}", below > 0),
        (f"alerts, last {data.alert_days} days", fmt_num(sum(a.alerts for a in data.alerts)), False),
        ("contracts lagging > 10 points" + (f" (as of {data.completion_as_of:%m-%d})" if data.completion_as_of else ""),
         f"{sum(1 for c in data.completion if c.lag_points > LAG_WARNING_POINTS):,} of {data.contracts:,}", False),
    ]
    for kind, label in (("inspection", "inspections"), ("tip", "tips from the public"), ("penalty", "penalties")):
        o = outcome.get(kind)
        items.append((label, fmt_num(o.count) if o else "–", False))
    o = outcome.get("recovery")
    items.append(("funds recovered", fmt_cny(o.amount) if o else "–", False))
    cells = "".join(f'<div class="kpi{" warn" if warn else ""}"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                    for k, v, warn in items)
    return f'<section class="kpis">{cells}</section>'


CSS = """
:root{color-scheme:light;font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",
sans-serif;color:#1f2328;background:#f4f6f8}
body{margin:0 auto;max-width:1040px;padding:24px}
header h1{font-size:24px;margin:0 0 4px}
.meta{color:#57606a;margin:0 0 16px;font-size:13px}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(118px,1fr));gap:10px;margin-bottom:18px}
.kpi{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 12px}
.kpi b{display:block;font-size:20px}.kpi span{color:#57606a;font-size:12px}
.kpi.warn{border-color:#d62728}.kpi.warn b{color:#d62728}
.chart{background:#fff;border:1px solid #d0d7de;border-radius:8px;margin:0 0 18px;padding:14px 16px}
.chart h2{font-size:17px;margin:0 0 2px}.sub{color:#57606a;font-size:13px;margin:0 0 10px}
svg{display:block;font-size:12px}
svg text{fill:#1f2328}
.grid{stroke:#e5e8eb;stroke-width:1}.axis{stroke:#8c959f}
.tick{fill:#57606a;font-size:11px}.axis-title{fill:#57606a;font-size:12px}
.label{font-size:12px}.value{fill:#424a53;font-size:11px}.value.warn,.warn{fill:#d62728}
.value-in{fill:#fff;font-size:11px;font-weight:600}
.note{fill:#8c959f;font-style:italic;font-size:11px}
.threshold{stroke:#d62728;stroke-width:2;stroke-dasharray:6 4}.threshold-label{fill:#d62728;font-size:11px}
.ref-line{stroke:#555;stroke-width:1.5}.guide{stroke:#d0d7de;stroke-width:1}
.empty-frame{fill:#fafbfc;stroke:#d0d7de;stroke-dasharray:4 4}
.empty-title{font-size:16px;font-weight:600;fill:#57606a}.empty-reason{fill:#8c959f}
.legend{list-style:none;display:flex;flex-wrap:wrap;gap:6px 16px;margin:8px 0 0;padding:0;font-size:12px}
.legend li{display:flex;align-items:center;gap:6px}
.sw{display:inline-block;width:14px;height:10px}
.sw-box{background:var(--c)}.sw-outline{border:2px solid var(--c);width:10px;height:6px}
.sw-line{height:0;border-top:3px solid var(--c)}.sw-dash{height:0;border-top:3px dashed var(--c)}
.sw-dot{width:10px;height:10px;border-radius:50%;background:var(--c)}
footer{color:#8c959f;font-size:12px;margin-top:8px}
"""

#: Nothing may be fetched: the page must render the same on a machine without a network.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def render(data: ReportData, threshold: float = CAPACITY_WARNING_MONTHS) -> str:
    """The whole report as one HTML document (UTF-8), with no external references."""
    figures = charts(data, threshold)
    source = f"{data.backend} database {data.database}" if data.backend else f"database {data.database}"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>yibao BI report: {esc(data.database)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>yibao medical-insurance BI report</h1>"
        f'<p class="meta">From the BI views of {esc(source)}, generated '
        f"{esc(data.generated_at.strftime('%Y-%m-%d %H:%M %Z').strip())}.</p></header>"
        f"{_kpis(data, threshold)}<main>{''.join(f.html() for f in figures)}</main>"
        "<footer>Self-contained report written by <code>yibao report</code>: no scripts, fonts or network "
        "resources. Hover a mark for its figures.</footer></body></html>\n"
    )
