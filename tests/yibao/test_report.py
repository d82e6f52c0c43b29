"""`yibao report` (yibao/report/) and the Grafana BI dashboard over the same views.

Unit tests feed the query layer and the renderer fake rows (no engine): the contract of the BI
views, escaping, the self-contained page, every chart's "no data" state, the clear error when a
view is missing. The integration test is what a person would do: real traffic through a real
broker and real ``yibao worker`` processes into both engines (Debian's ClickHouse 18.16 server and
embedded chDB, side by side to save time), ``yibao report`` from each, and the page opened in
Debian's headless Chromium, driven over the DevTools protocol: no console error (the page's
Content-Security-Policy turns any attempt to fetch something into one), every chart drawn (data
marks counted in the DOM), and a screenshot that is not blank (pixel variance, decoded here).

The DevTools client is a few lines over aiohttp's websocket (already installed with faust), so no
browser-automation package is needed and nothing ever downloads a browser.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sinks.base import QueryResult
from yibao import cli
from yibao.report import (
    VIEWS,
    AlertCount,
    Completion,
    FundCapacity,
    Payments,
    ReportData,
    ReportError,
    as_date,
    charts,
    completion_chart,
    fund_chart,
    latest_capacity,
    load,
    nice_ticks,
    render,
    resolve_views,
)
from yibao.report.svg import WIDTH, bin_points, log_ticks, text_width, value_scale, wrap

from ..conftest import require_infra

ROOT = Path(__file__).resolve().parents[2]
BI_DASHBOARDS = ROOT / "deploy" / "compose" / "grafana" / "dashboards" / "bi"
DATASOURCES = ROOT / "deploy" / "compose" / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
MIGRATION = ROOT / "sinks" / "ddl" / "0003_bi_aggregates.sql"
CHART_KEYS = ("fund", "alerts", "flows", "procurement", "payments", "recoveries")
CN = ZoneInfo("Asia/Shanghai")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
runner = CliRunner()


# --- a fake engine for the query layer ----------------------------------------------------------

def _types(n: int) -> list[str]:
    return ["String"] * n


class FakeBackend:
    """Answers the report's queries from canned rows per view (whatever the SQL around them)."""

    def __init__(self, rows: Mapping[str, list[tuple[Any, ...]]] | None = None,
                 views: Mapping[str, tuple[str, ...]] | None = None, database: str = "yibao") -> None:
        self.rows = dict(rows or {})
        self.views = dict(VIEWS if views is None else views)
        self._db = database
        self.sql: list[str] = []

    @property
    def database(self) -> str:
        return self._db

    @property
    def cluster(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def query(self, sql: str) -> QueryResult:
        self.sql.append(sql)
        if "system.databases" in sql:
            return QueryResult(["n"], ["UInt64"], [(1,)])
        if "system.columns" in sql:
            cols_rows: list[tuple[Any, ...]] = [(v, c) for v, cols in self.views.items() for c in cols]
            return QueryResult(["table", "name"], _types(2), cols_rows)
        view = re.search(r"\.(bi_\w+)", sql)
        assert view, sql
        rows = self.rows.get(view.group(1), [])
        if sql.startswith("SELECT max(as_of)"):
            return QueryResult(["as_of"], [], [(self.rows.get(f"{view.group(1)}_as_of", [(None,)])[0][0],)])
        if view.group(1) == "bi_alerts_by_rule" and sql.endswith("GROUP BY rule_id"):
            totals: dict[str, int] = {}
            for _day, rule, n in rows:
                totals[rule] = totals.get(rule, 0) + n
            return QueryResult(["rule_id", "n"], [], list(totals.items()))
        if sql.startswith("SELECT count() FROM (SELECT insu_admdvs"):
            return QueryResult(["n"], ["UInt64"], [(len(rows),)])
        if sql.startswith(("SELECT count()", "SELECT uniqExact")):
            return QueryResult(["n"], ["UInt64"], [(len(rows),)])
        if view.group(1) == "bi_supervision_outcomes" and "kind = 'recovery'" in sql:
            rows = [(r[0], r[1], r[2]) for r in self.rows.get("bi_supervision_outcomes_recovery", [])]
        elif view.group(1) == "bi_supervision_outcomes":
            rows = self.rows.get("bi_supervision_outcomes_kinds", [])
        return QueryResult([f"c{i}" for i in range(len(rows[0]) if rows else 0)], [], list(rows))


def _sample_rows() -> dict[str, list[tuple[Any, ...]]]:
    d = dt.date(2026, 9, 1)
    return {
        "bi_fund_health": [
            ("330106", "310", dt.date(2026, 8, 1), 2.0, Decimal("100.00"), Decimal("50.00")),
            ("330106", "310", dt.date(2026, 9, 1), 9.5, Decimal("900.00"), Decimal("80.00")),
            ("110105", "390", dt.date(2026, 9, 1), 1.25, Decimal("10.00"), Decimal("8.00")),
            ("440305", "390", dt.date(2026, 9, 1), None, Decimal("0"), Decimal("0")),
        ],
        "bi_alerts_by_rule": [(d, "YB-LINE-SEX", 3), (d + dt.timedelta(days=1), "YB-LINE-SEX", 1),
                              (d, "YB-STAY-SPLIT", 2)],
        "bi_cross_province_flows": [("330106", "110105", 12, Decimal("3400.50"), Decimal("2100.00"), 3)],
        "bi_procurement_completion": [("H33010600001", "XA01ABD075A002010100483", "C1", 20.0, 60.0, 40.0),
                                      ("H33010600001", "ZA04CAE0023010100166", "C2", 80.0, 60.0, -20.0)],
        "bi_procurement_completion_as_of": [(dt.date(2026, 9, 20),)],
        "bi_supplier_payments": [("H33010600001", 10, 7, 5, 2)],
        "bi_supplier_payments_as_of": [(dt.datetime(2026, 9, 20, 16, 30, tzinfo=CN),)],
        "bi_supervision_outcomes_recovery": [("330106", dt.date(2026, 8, 1), Decimal("5000.00"))],
        "bi_supervision_outcomes_kinds": [("inspection", 4, Decimal("0")), ("recovery", 1, Decimal("5000.00"))],
    }


# --- query layer --------------------------------------------------------------------------------

def test_load_reads_the_contract_views_into_chart_data() -> None:
    be = FakeBackend(_sample_rows())
    said: list[str] = []
    data = load(be, backend_name="server", alert_days=30, progress=said.append)
    assert [m for m in said if m.startswith("reading ")] == [f"reading {v}" for v in VIEWS]
    fund = {(f.region, f.insutype): f for f in data.fund}
    assert fund[("330106", "310")].months_capacity == 9.5 and fund[("330106", "310")].month == dt.date(2026, 9, 1)
    assert fund[("440305", "390")].months_capacity is None
    assert sum(a.alerts for a in data.alerts) == 6
    assert data.flows[0].fund_pay == 2100.0 and data.flow_pairs == 1
    assert data.contracts == 2 and data.completion[0].lag_points == 40.0
    assert data.payments[0].overdue_unpaid == 2 and data.payments[0].paid_late == 2 and data.payments[0].pending == 1
    assert data.recoveries[0].amount == 5000.0
    # every query names its view qualified by the database, and the alert window is applied
    assert all("yibao.bi_" in q for q in be.sql if "system." not in q)
    assert any("- 29" in q for q in be.sql if "bi_alerts_by_rule" in q)


def test_latest_capacity_takes_the_latest_month_even_when_it_is_null() -> None:
    rows = [("1", "310", dt.date(2026, 1, 1), 5.0, 1, 1), ("1", "310", dt.date(2026, 2, 1), None, 1, 1),
            ("2", "310", dt.date(2026, 2, 1), float("inf"), 1, 1)]
    got = {f.region: f for f in latest_capacity(rows)}
    assert got["1"].month == dt.date(2026, 2, 1) and got["1"].months_capacity is None
    assert got["2"].months_capacity is None  # a division by zero is no capacity, not infinite capacity


@pytest.mark.parametrize("value", [dt.date(2026, 3, 1), dt.datetime(2026, 3, 1, 8, tzinfo=CN), 202603, "2026-03-01",
                                   "2026-03", 20513])
def test_months_come_as_dates_whatever_the_view_returns(value: Any) -> None:
    assert as_date(value) == dt.date(2026, 3, 1)


def test_a_missing_view_fails_naming_it_and_telling_to_migrate() -> None:
    views = {k: v for k, v in VIEWS.items() if k != "bi_alerts_by_rule"}
    with pytest.raises(ReportError) as info:
        resolve_views(FakeBackend(views=views))
    assert "bi_alerts_by_rule" in str(info.value) and info.value.hint and "yibao migrate" in info.value.hint
    old = dict(VIEWS, bi_fund_health=("insu_admdvs", "insutype", "month"))
    with pytest.raises(ReportError, match=r"out of date.*bi_fund_health.*months_capacity") as info:
        resolve_views(FakeBackend(views=old))
    assert info.value.hint and "yibao migrate" in info.value.hint


def test_numbers_are_compact_and_right() -> None:
    from yibao.report import fmt_cny, fmt_num

    assert [fmt_num(v) for v in (0, 999, 9_999, 20_000, 123_456, 2_500_000, 7.1e9, -45_000, 2.5, 6267.04)] == \
        ["0", "999", "9,999", "20.0k", "123.5k", "2.5M", "7.1B", "-45.0k", "2.5", "6,267"]
    assert fmt_cny(1_234_567.89) == "¥1.2M"


def test_nice_ticks_cover_the_range_in_round_steps() -> None:
    assert nice_ticks(9.3) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    for hi in (0.07, 3, 17, 1234.5, 9.9e8):
        ticks = nice_ticks(hi)
        assert ticks[0] == 0 and ticks[-1] >= hi and len(ticks) <= 7


# --- rendering ----------------------------------------------------------------------------------

def _data(**kw: Any) -> ReportData:
    return ReportData(database="yibao", backend="server", generated_at=dt.datetime(2026, 11, 1, 9, 0, tzinfo=CN), **kw)


def test_every_chart_has_a_clear_no_data_state() -> None:
    page = render(_data())
    for key in CHART_KEYS:
        assert re.search(rf'id="chart-{key}"[^>]*data-state="empty"', page), key
    assert page.count(">No data<") == len(CHART_KEYS)
    assert 'class="mark' not in page


def test_charts_have_titles_axes_legends_and_marks() -> None:
    data = load(FakeBackend(_sample_rows()), backend_name="server")
    figures = {c.key: c for c in charts(data)}
    assert list(figures) == list(CHART_KEYS)
    for c in figures.values():
        assert c.svg is not None and 'class="mark' in c.svg, c.key
        assert c.title and 'class="axis-title"' in c.svg, c.key
        assert 'class="legend"' in c.legend, c.key
    fund = figures["fund"].svg or ""
    assert "3-month warning line" in fund and 'class="threshold"' in fund
    assert "1.2 ⚠" in fund  # below the line: flagged, not only coloured


def test_a_fund_in_deficit_is_drawn_left_of_zero_and_flagged() -> None:
    from yibao.report import fund_chart

    chart = fund_chart([FundCapacity("110105", "310", dt.date(2026, 9, 1), -0.4, -10.0, 5.0),
                        FundCapacity("110199", "310", dt.date(2026, 9, 1), 7.5, 90.0, 5.0)])
    svg = chart.svg or ""
    assert "-0.4 ⚠ deficit" in svg and "7.5<" in svg
    found = re.findall(r'class="mark bar" x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', svg)
    bars = [(float(x), float(w)) for x, w in found]
    ticks = re.findall(r'class="tick">(-?[\d.]+)<', svg)
    assert ticks[0].startswith("-") and "0" in ticks
    (neg_x, neg_w), (pos_x, _) = bars
    assert neg_x + neg_w == pytest.approx(pos_x, abs=0.2)  # both bars start at the zero line


# --- scales and labels that show every value as it is ----------------------------------------------

def _fund(values: Sequence[float | None]) -> list[FundCapacity]:
    return [FundCapacity(f"{330100 + i}", "310", dt.date(2026, 9, 1), v, 1.0, 1.0) for i, v in enumerate(values)]


def _positions(svg: str) -> dict[str, float]:
    """x of each fund's mark (a bar's end or a dot's centre) by region, from the chart's tooltips."""
    out = {}
    for m in re.finditer(r'<(rect|circle) class="mark (?:bar|dot)" (?:x="([\d.]+)" y="[\d.]+" width="([\d.]+)"|'
                         r'cx="([\d.]+)")[^>]*><title>(\d+)', svg):
        out[m.group(5)] = float(m.group(2)) + float(m.group(3)) if m.group(1) == "rect" else float(m.group(4))
    return out


def _tick_x(svg: str) -> dict[str, float]:
    return {m.group(2): float(m.group(1))
            for m in re.finditer(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="middle" class="tick">([^<]+)<', svg)}


def test_a_scale_over_half_a_month_to_two_thousand_is_logarithmic_and_places_every_value() -> None:
    values = [0.5, 3.0, 15.0, 2000.0]
    scale = value_scale(values, include=[3.0])
    assert scale.kind == "log" and scale.lo <= 0.5 and scale.hi >= 2000
    assert [scale.clipped(v) for v in values] == [0, 0, 0, 0]
    fracs = [scale.frac(v) for v in values]
    assert fracs == sorted(fracs) and fracs[0] >= 0 and fracs[-1] <= 1
    # equal ratios are equal distances: 0.5 → 15 is 30×, as is 15 → 450
    assert scale.frac(15) - scale.frac(0.5) == pytest.approx(scale.frac(450) - scale.frac(15))
    assert {1, 10, 100, 1000} <= set(scale.ticks) and list(scale.ticks) == sorted(scale.ticks)


def test_values_of_one_size_get_a_linear_scale_from_zero() -> None:
    scale = value_scale([6.0, 9.0, 15.0], include=[3.0, 6.0])
    assert scale.kind == "linear" and scale.lo == 0 and scale.hi >= 15 and scale.origin == 0
    assert scale.frac(15) <= 1 and scale.frac(3) == pytest.approx(3 / scale.hi)
    deficit = value_scale([-2.0, 3.0, 15.0])
    assert deficit.kind == "linear" and deficit.lo <= -2 and deficit.clipped(-2) == 0


def test_a_deficit_on_a_log_scale_is_clipped_and_labelled_with_its_true_value() -> None:
    scale = value_scale([-5.0, 0.5, 15.0, 2000.0])
    assert scale.kind == "log" and scale.clipped(-5.0) == -1 and scale.frac(-5.0) == 0
    svg = fund_chart(_fund([-5.0, 0.5, 15.0, 2000.0])).svg or ""
    assert "‹ -5.0 ⚠ deficit" in svg and "0.5 ⚠" in svg and "15.0<" in svg and "2,000.0<" in svg


@pytest.mark.parametrize(("values", "log"), [([0.5, 3.0, 15.0, 2000.0], True), ([6.5, 9.0, 11.0, 15.0], False),
                                           ([0.3, 8.0, 12.0, 45.6], True), ([380.0, 2322.0], True)])
def test_fund_capacity_shows_every_value_where_its_axis_says(values: list[float], log: bool) -> None:
    """No mark beyond the axis and none pinned at a cap: each fund's mark sits where the tick labels
    put its value (interpolated between the ticks around it), and its true value is written next to it."""
    svg = fund_chart(_fund(values)).svg or ""
    marks = _positions(svg)
    ticks = sorted((float(t.replace(",", "")), x) for t, x in _tick_x(svg).items())
    assert ("logarithmic scale" in svg) == log
    for i, v in enumerate(values):
        assert f"{v:,.1f}" in svg
        (t0, x0), (t1, x1) = next((a, b) for a, b in itertools.pairwise(ticks) if a[0] <= v <= b[0])
        share = (math.log(v / t0) / math.log(t1 / t0)) if log else (v - t0) / (t1 - t0)
        assert marks[f"{330100 + i}"] == pytest.approx(x0 + share * (x1 - x0), abs=1.0), (v, ticks)
    # the warning line is drawn where 3 months is on this axis
    line = float(re.search(r'<line x1="([\d.]+)"[^>]*class="threshold"', svg).group(1))  # type: ignore[union-attr]
    (t0, x0), (t1, x1) = next((a, b) for a, b in itertools.pairwise(ticks) if a[0] <= 3 <= b[0])
    share = (math.log(3 / t0) / math.log(t1 / t0)) if log else (3 - t0) / (t1 - t0)
    assert line == pytest.approx(x0 + share * (x1 - x0), abs=1.0)


def test_log_ticks_are_round_and_thin_out_over_many_decades() -> None:
    assert log_ticks(2, 50) == [2, 5, 10, 20, 50]
    assert log_ticks(0.5, 2000) == [0.5, 1, 10, 100, 1000, 2000]
    with pytest.raises(ValueError):
        log_ticks(0, 10)


def test_coinciding_contracts_are_one_dot_with_their_count() -> None:
    """779 contracts at the same point are one dot labelled 779, the largest on the chart."""
    same = [Completion(f"H{i}", "X", f"C{i}", 0.0, 18.0, 18.0) for i in range(779)]
    others = [Completion(f"H{i}", "X", f"D{i}", 30.0 * i, 18.0, 18.0 - 30.0 * i) for i in range(1, 4)]
    assert bin_points([(18.0, 0.0)] * 779 + [(50.0, 50.0)]) == [(18.0, 0.0, 779), (50.0, 50.0, 1)]
    svg = completion_chart(same + others, 1405).svg or ""
    dots = re.findall(r'<circle class="mark dot" cx="[\d.]+" cy="[\d.]+" r="([\d.]+)"[^>]*><title>([\d,]+) contract',
                      svg)
    assert len(dots) == 4 and max(dots, key=lambda d: float(d[0]))[1] == "779"
    assert re.search(r'class="value warn">779<', svg)


def test_the_procurement_chart_says_how_its_count_relates_to_the_rule() -> None:
    items = [Completion("H1", "X", "C1", 5.0, 40.0, 35.0)]
    chart = completion_chart(items, 1, as_of=dt.date(2026, 10, 7), today=dt.date(2026, 12, 6), alerts=0)
    svg = chart.svg or ""
    assert "1 of 1 shown lags" in chart.subtitle and "as of 2026-10-07" in chart.subtitle
    assert "Judged as of 2026-10-07" in svg and "YB-PROC-VOLUME-LAG raised 0 alerts" in svg
    assert "not today" not in (completion_chart(items, 1, as_of=dt.date(2026, 12, 6), today=dt.date(2026, 12, 6),
                                                alerts=1).svg or "")


@pytest.mark.parametrize(("paid", "on_time", "overdue", "label"), [
    (1, 1, 27, "4% on time (1 of 28) · 27 overdue"),
    (5, 5, 0, "100% on time (5 of 5)"),
    (0, 0, 3, "0% on time (0 of 3) · 3 overdue"),
    (0, 0, 0, "none due yet"),
])
def test_supplier_labels_count_overdue_deliveries_against_the_on_time_rate(paid: int, on_time: int, overdue: int,
                                                                          label: str) -> None:
    from yibao.report import payments_chart

    p = Payments("H33010600001", 30, paid, on_time, overdue)
    svg = payments_chart([p], 1).svg or ""
    assert f">{label}<" in svg


def test_the_longest_supplier_label_fits_in_the_chart() -> None:
    from yibao.report import payments_chart

    items = [Payments(f"H3301060000{i}", 10 + 20 * i, 10 + 20 * i - 27 * (i == 4), 1, 27 * (i == 4)) for i in range(5)]
    svg = payments_chart(items, 5).svg or ""
    for m in re.finditer(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="start" class="value[^"]*">([^<]+)<', svg):
        assert float(m.group(1)) + text_width(m.group(2)) <= WIDTH, m.group(2)


def test_wrapped_notes_stay_within_their_width() -> None:
    note = "YB-PROC-VOLUME-LAG raised 0 alerts: it judges each contract at every China midnight in event time " * 3
    lines = wrap(note, 400)
    assert len(lines) > 3 and all(text_width(ln) <= 400 for ln in lines) and " ".join(lines) == note.strip()


def test_every_text_from_the_database_is_escaped() -> None:
    evil = '<script>alert("x")</script>&'
    data = ReportData(
        database=evil, backend=evil, generated_at=dt.datetime(2026, 11, 1, tzinfo=CN),
        fund=[FundCapacity(evil, evil, dt.date(2026, 9, 1), 1.0, 1.0, 1.0)],
        alerts=[AlertCount(dt.date(2026, 9, 1), evil, 2)], rule_names={evil: evil},
        completion=[Completion(evil, evil, evil, 10.0, 50.0, 40.0)], contracts=1,
        payments=[Payments(evil, 3, 1, 1, 1)], hospitals=1)
    page = render(data)
    assert "<script" not in page and 'alert("x")' not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page


def test_the_page_is_self_contained() -> None:
    page = render(load(FakeBackend(_sample_rows()), backend_name="embedded"))
    lowered = page.lower()
    for needle in ("http://", "https://", "//cdn", "<script", "<link", "@import", "url(", "<img", "@font-face"):
        assert needle not in lowered, needle
    assert "default-src 'none'" in page  # the browser refuses anything that slips in


# --- the command --------------------------------------------------------------------------------

@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for k in list(os.environ):
        if k.startswith("YIBAO_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.console, "width", 400)
    monkeypatch.setattr(cli.err, "width", 400)
    return tmp_path


def test_report_command_writes_the_page_and_shows_progress(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sinks

    monkeypatch.setattr(sinks, "connect", lambda config: FakeBackend(_sample_rows()))
    res = runner.invoke(cli.app, ["report", "--out", "r.html", "--backend", "server"])
    assert res.exit_code == 0, res.output
    assert "reading bi_fund_health" in res.stdout and "wrote r.html" in res.stdout
    page = (cli_env / "r.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count('data-state="ok"') == len(CHART_KEYS)
    assert not list(cli_env.glob(".*.tmp"))


def test_report_command_fails_clearly_without_the_views(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sinks

    views = {k: v for k, v in VIEWS.items() if k not in ("bi_fund_health", "bi_supplier_payments")}
    monkeypatch.setattr(sinks, "connect", lambda config: FakeBackend(views=views))
    res = runner.invoke(cli.app, ["report", "--out", "r.html"])
    assert res.exit_code == 2
    assert "no BI view bi_fund_health, bi_supplier_payments" in res.stderr
    assert "run `yibao migrate`" in res.stderr and "Traceback" not in res.output
    assert not (cli_env / "r.html").exists()
    res = runner.invoke(cli.app, ["report", "--out", str(cli_env / "missing" / "r.html")])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = runner.invoke(cli.app, ["report", "--days", "0"])
    assert res.exit_code == 2 and "--days" in res.stderr


# --- Grafana dashboard --------------------------------------------------------------------------

def bi_dashboards() -> list[Path]:
    return sorted(BI_DASHBOARDS.glob("*.json"))


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, SQL) for every query target of every panel, rows' nested panels included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((str(p.get("title")), str(t.get("rawSql", ""))))

    walk(list(dashboard["panels"]))
    return out


def migration_views() -> set[str]:
    if not MIGRATION.exists():
        return set()
    return set(re.findall(r"CREATE\s+(?:MATERIALIZED\s+)?VIEW\s+IF\s+NOT\s+EXISTS\s+\{db\}\.(bi_\w+)",
                          MIGRATION.read_text(encoding="utf-8"), re.I))


def test_bi_dashboard_queries_name_only_existing_bi_views_on_the_clickhouse_source() -> None:
    files = bi_dashboards()
    assert files, f"no BI dashboard in {BI_DASHBOARDS}"
    sources = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    ch_uid = next(d["uid"] for d in sources if d["type"] == "grafana-clickhouse-datasource")
    known = set(VIEWS) | migration_views()
    covered: set[str] = set()
    for f in files:
        dash = json.loads(f.read_text(encoding="utf-8"))
        assert dash["uid"] and dash["title"] and dash["panels"], f
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{f.name}: duplicate panel ids"
        for p in dash["panels"]:
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "grafana-clickhouse-datasource", "uid": ch_uid}, p["title"]
            assert p.get("targets") and {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == ch_uid and t["editorType"] == "sql", p["title"]
        for title, sql in panel_queries(dash):
            named = set(re.findall(r"\bbi_\w+", sql))
            assert named, f"{f.name}: panel {title!r} reads no bi_* view: {sql}"
            assert named <= known, f"{f.name}: panel {title!r} reads unknown view(s) {named - known}"
            covered |= named
    # the panels the BI folder promises
    assert {"bi_fund_health", "bi_alerts_by_rule", "bi_cross_province_flows", "bi_procurement_completion",
            "bi_supplier_payments", "bi_supervision_outcomes"} <= covered


def test_migration_defines_every_view_the_report_reads() -> None:
    if not MIGRATION.exists():
        pytest.skip(f"{MIGRATION.name} is not in this tree yet")
    assert set(VIEWS) <= migration_views()


def grafana_sql(sql: str) -> str:
    """A panel's SQL with the ClickHouse plugin's macros expanded for a wide-open time range."""
    sql = re.sub(r"\$__dateFilter\((\w+)\)", r"(\1 >= toDate('2000-01-01') AND \1 <= toDate('2100-01-01'))", sql)
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 r"(\1 >= toDateTime('2000-01-01 00:00:00') AND \1 <= toDateTime('2100-01-01 00:00:00'))", sql)
    # the region and month variables at their default, "All": the plugin makes the condition true
    sql = re.sub(r"\$__conditionalAll\((.+?),\s*\$\{?\w+\}?\)", "1 = 1", sql)
    assert "$" not in sql, f"unexpanded macro or variable in {sql}"
    return sql


def all_panel_sql() -> list[tuple[str, str]]:
    out = []
    for f in bi_dashboards():
        out += [(title, grafana_sql(sql)) for title, sql in panel_queries(json.loads(f.read_text(encoding="utf-8")))]
    return out


# --- PNG decoding (for the screenshot's pixel variance) -----------------------------------------

def png_pixels(data: bytes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium's screenshots are) to an array.

    Rows filtered with None, Sub or Up (all of them when the screenshot is taken with
    ``optimizeForSpeed``) are undone with numpy; Average and Paeth rows fall back to a plain loop.
    """
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunk_type, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if chunk_type == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif chunk_type == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = int(raw[y, 0]), raw[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:
            cur = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(stride)
        elif kind == 2:
            cur = line + prev
        else:
            cur = np.zeros(stride, dtype=np.uint8)
            lp, pp = line.tolist(), prev.tolist()
            cv = [0] * stride
            for i in range(stride):
                a = cv[i - bpp] if i >= bpp else 0
                b = pp[i]
                c = pp[i - bpp] if i >= bpp else 0
                if kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cv[i] = (lp[i] + pred) & 0xFF
            cur = np.array(cv, dtype=np.uint8)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)


def _png(pixels: np.ndarray[Any, np.dtype[np.uint8]], filters: list[int]) -> bytes:
    """Encode RGB pixels with the given filter per row (the reference for the decoder's test)."""
    h, w, bpp = pixels.shape
    rows = pixels.reshape(h, w * bpp).astype(np.int64)
    out = bytearray()
    prev = np.zeros(w * bpp, dtype=np.int64)
    for y, kind in enumerate(filters):
        cur = rows[y]
        a = np.concatenate([np.zeros(bpp, dtype=np.int64), cur[:-bpp]])
        c = np.concatenate([np.zeros(bpp, dtype=np.int64), prev[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = a
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (a + prev) // 2
        else:
            p = a + prev - c
            pa, pb, pc = abs(p - a), abs(p - prev), abs(p - c)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, prev, c))
        out.append(kind)
        out += ((cur - pred) % 256).astype(np.uint8).tobytes()
        prev = cur

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if bpp == 3 else 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b"")


def test_png_decoder_undoes_every_filter_type() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(10, 7, 3), dtype=np.uint8)
    decoded = png_pixels(_png(pixels, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]))
    assert np.array_equal(decoded, pixels)


# --- headless Chromium over the DevTools protocol -----------------------------------------------

@dataclass
class PageResult:
    """What the browser saw: marks per chart, console problems, the screenshot."""

    charts: list[dict[str, Any]]
    errors: list[str]
    warnings: list[str]
    screenshot: bytes
    title: str
    external: list[str] = field(default_factory=list)


def chromium_binary() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        require_infra("Debian's chromium (apt-get install chromium; .ci/system-deps.sh installs it)")
    return found


#: Run in the page: per chart, its state and the data marks drawn inside its SVG with a real size.
_CHARTS_JS = """JSON.stringify([...document.querySelectorAll('figure.chart')].map(f => {
  const marks = [...f.querySelectorAll('svg .mark')];
  const sized = marks.filter(m => { const b = m.getBBox(); return b.width > 0 || b.height > 0; });
  const r = f.getBoundingClientRect();
  return {key: f.dataset.chart, state: f.dataset.state, marks: marks.length, sized: sized.length,
          title: (f.querySelector('h2') || {}).textContent || '', width: r.width, height: r.height,
          svgs: f.querySelectorAll('svg').length};
}))"""
#: Resources the page asked for besides itself (there must be none).
_RESOURCES_JS = "JSON.stringify(performance.getEntriesByType('resource').map(e => e.name))"


async def _open_in_chromium(binary: str, url: str, timeout: float = 30) -> PageResult:
    import aiohttp

    profile = tempfile.mkdtemp(prefix="yibao-chromium-")
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited with {proc.returncode}: {proc.stderr.read()[-2000:]!r}"
                                     if proc.stderr else "chromium exited")
            if time.monotonic() > deadline:
                raise AssertionError("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws:
            return await asyncio.wait_for(_drive(ws, url), timeout)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


async def _drive(ws: Any, url: str) -> PageResult:
    """Open ``url`` in a fresh tab, wait for load, inspect the DOM, take a full-page screenshot."""
    pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
    events: list[dict[str, Any]] = []
    loaded = asyncio.Event()
    counter = 0

    async def read() -> None:
        async for msg in ws:
            d = json.loads(msg.data)
            if "id" in d and d["id"] in pending:
                pending.pop(d["id"]).set_result(d)
            else:
                events.append(d)
                if d.get("method") == "Page.loadEventFired":
                    loaded.set()

    async def call(method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        nonlocal counter
        counter += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending[counter] = fut
        msg: dict[str, Any] = {"id": counter, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await ws.send_str(json.dumps(msg))
        d = await fut
        if "error" in d:
            raise AssertionError(f"{method}: {d['error']}")
        return d["result"]

    reader = asyncio.create_task(read())
    try:
        target = await call("Target.createTarget", {"url": "about:blank"})
        sid = (await call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}))["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await call(f"{domain}.enable", session=sid)
        await call("Emulation.setDeviceMetricsOverride",
                   {"width": 1100, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        await call("Page.navigate", {"url": url}, session=sid)
        await loaded.wait()

        async def evaluate(expression: str) -> Any:
            res = await call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=sid)
            return json.loads(res["result"]["value"])

        figures = await evaluate(_CHARTS_JS)
        external = [u for u in await evaluate(_RESOURCES_JS) if not u.startswith(("data:", "about:"))]
        title = (await call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                            session=sid))["result"]["value"]
        size = (await call("Page.getLayoutMetrics", session=sid))["cssContentSize"]
        shot = await call("Page.captureScreenshot", {
            "format": "png", "optimizeForSpeed": True, "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session=sid)
        await asyncio.sleep(0.1)  # late console messages
        errors: list[str] = []
        warnings: list[str] = []
        for e in events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                (errors if params.get("type") in ("error", "assert") else warnings).append(text)
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                (errors if entry.get("level") == "error" else warnings).append(
                    f"{entry.get('source')}: {entry.get('text')}")
        await call("Browser.close")
        return PageResult(figures, errors, warnings, base64.b64decode(shot["data"]), str(title), external)
    finally:
        reader.cancel()


def open_in_chromium(path: Path) -> PageResult:
    return asyncio.run(_open_in_chromium(chromium_binary(), path.resolve().as_uri()))


def assert_page_drawn(result: PageResult, shot_path: Path) -> dict[str, int]:
    """The browser's view of a report with data: everything drawn, nothing complained about."""
    shot_path.write_bytes(result.screenshot)
    assert not result.errors, f"console errors: {result.errors}"
    assert not result.external, f"the page fetched resources: {result.external}"
    assert result.title.startswith("yibao BI report")
    by_key = {c["key"]: c for c in result.charts}
    assert list(by_key) == list(CHART_KEYS), result.charts
    for key, c in by_key.items():
        assert c["state"] == "ok", f"chart {key} shows no data: {c}"
        assert c["marks"] > 0 and c["sized"] > 0, f"chart {key} drew nothing: {c}"
        assert c["width"] > 600 and c["height"] > 150 and c["title"], c
    pixels = png_pixels(result.screenshot)
    h, w, _ = pixels.shape
    assert w >= 1000 and h > 2000, (w, h)
    gray = pixels[:, :, :3].astype(np.float64).mean(axis=2)
    assert gray.std() > 10, f"screenshot looks blank (std {gray.std():.1f}), see {shot_path}"
    colours = {tuple(int(v) for v in px) for px in pixels[::7, ::7, :3].reshape(-1, 3)}
    assert len(colours) > 50, f"only {len(colours)} colours in {shot_path}"
    # the charts' own colours reached the screen (bar fills are solid, so exact values occur)
    for hex_colour in ("#4e79a7", "#2ca02c"):
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        assert np.all(pixels[:, :, :3] == rgb, axis=2).any(), f"{hex_colour} never painted, see {shot_path}"
    return {k: int(c["marks"]) for k, c in by_key.items()}


def test_an_empty_report_loads_cleanly_in_chromium(tmp_path: Path) -> None:
    """The "no data" page is a valid page too: no console error, every chart in its empty state."""
    out = tmp_path / "empty.html"
    out.write_text(render(_data()), encoding="utf-8")
    result = open_in_chromium(out)
    assert not result.errors and not result.external, result.errors
    assert [c["state"] for c in result.charts] == ["empty"] * len(CHART_KEYS)
    assert all(c["marks"] == 0 and c["svgs"] == 1 for c in result.charts)


# --- integration: real traffic, real workers, both engines --------------------------------------

@dataclass
class Store:
    """One engine filled by the real pipeline, and how to run the CLI against it."""

    kind: str
    env: dict[str, str]
    database: str
    chdb_path: Path | None


_EMBEDDED_SQL = """
import json, sys
sys.path.insert(0, sys.argv[3])
from sinks.embedded import EmbeddedBackend
b = EmbeddedBackend(sys.argv[1], database=sys.argv[2])
out = {}
try:
    b.use_database()
    for title, sql in json.load(sys.stdin):
        try:
            out[title] = [len(b.query(sql).rows), None]
        except Exception as exc:
            out[title] = [0, str(exc)[:400]]
finally:
    b.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def stores(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Store]]:
    """Both engines, each fed the same ~3 months of planted traffic by its own ``yibao worker``.

    The two workers run at the same time (the slow part is their start-up and the rules).
    """
    from yibao.sim.generator import SimConfig
    from yibao.sim.planters import Planting

    from ..harness import WorkerProcess, produce_events, settings_for, wait_committed, worker_env

    broker = request.getfixturevalue("broker")
    ch = request.getfixturevalue("clickhouse_server")
    t0 = time.monotonic()
    days = 75
    start = (dt.datetime.now(CN) - dt.timedelta(days=days + 2)).replace(hour=0, minute=0, second=0, microsecond=0)
    config = SimConfig(settlements=1500, days=days, start=start, seed=7, inspection_rate=0.03, tip_rate=0.01,
                       regions=6)
    events = list(Planting("all", rate=0.01).generator(config).events())
    phases = {"generate": time.monotonic() - t0}
    out: dict[str, Store] = {}
    setups = []
    for kind in ("server", "embedded"):
        base = tmp_path_factory.mktemp(f"report-{kind}")
        s = settings_for(broker.bootstrap, kind, base / "data", ch=ch if kind == "server" else None)
        setups.append((kind, base, s, worker_env(s)))
        out[kind] = Store(kind, setups[-1][3], s.ch_database, s.chdb_path if kind == "embedded" else None)
    migrations = [subprocess.Popen([sys.executable, "-m", "yibao.cli", "migrate"], env=env, cwd=base,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for _, base, _, env in setups]
    for proc in migrations:
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
    phases["migrate"] = time.monotonic() - t0 - sum(phases.values())

    async def produce_all() -> list[Any]:
        return list(await asyncio.gather(*(produce_events(s, events, _codec()) for _, _, s, _ in setups)))

    workers: list[tuple[WorkerProcess, Any, dict[tuple[str, int], int]]] = []
    try:
        for (_, base, s, env), sent in zip(setups, asyncio.run(produce_all()), strict=True):
            ends: dict[tuple[str, int], int] = {}
            for x in sent:
                ends[(x.topic, x.partition)] = max(ends.get((x.topic, x.partition), 0), x.offset + 1)
            worker = WorkerProcess(env, base / "worker.log", base)
            worker.start()
            workers.append((worker, s, ends))
        phases["produce"] = time.monotonic() - t0 - sum(phases.values())
        for worker, s, ends in workers:
            wait_committed(s, ends, worker, timeout=240)
        for worker, _, _ in workers:
            assert worker.terminate() == 0, worker.log_tail()
        phases["workers"] = time.monotonic() - t0 - sum(phases.values())
        print(f"\npipeline filled both engines with {len(events)} events in {time.monotonic() - t0:.1f}s "
              f"({', '.join(f'{k} {v:.1f}s' for k, v in phases.items())})")
        yield out
    finally:
        for worker, _, _ in workers:
            worker.stop_quietly()


def _codec() -> Any:
    from schemas import Codec

    return Codec()


@pytest.fixture(scope="module")
def chromium() -> str:
    """Requested before ``stores``: without a browser (a failure in CI) the pipeline is not run."""
    return chromium_binary()


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["server", "embedded"])
def test_report_from_real_data_renders_every_chart_in_chromium(kind: str, chromium: str, stores: dict[str, Store],
                                                             tmp_path: Path) -> None:
    from ..harness import run_cli

    store = stores[kind]
    out = tmp_path / f"report-{kind}.html"
    t0 = time.monotonic()
    res = run_cli(["report", "--out", str(out)], store.env, tmp_path)
    t_report = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert "reading bi_fund_health" in res.stdout and f"wrote {out}" in res.stdout.replace("\n", "")
    t0 = time.monotonic()
    result = open_in_chromium(out)
    marks = assert_page_drawn(result, tmp_path / f"report-{kind}.png")
    print(f"\n{kind}: report {t_report:.1f}s ({out.stat().st_size // 1024} KiB), chromium "
          f"{time.monotonic() - t0:.1f}s, marks {marks}, screenshot {tmp_path / f'report-{kind}.png'}")


@pytest.mark.integration
def test_report_on_a_database_without_the_views_says_to_migrate(stores: dict[str, Store], tmp_path: Path) -> None:
    """No database, a database without the views, then the same database migrated but empty."""
    from sinks import connect
    from sinks.migrate import migrate
    from yibao.settings import load_settings

    from ..harness import run_cli

    env = dict(stores["server"].env, YIBAO_CH_DATABASE=f"{stores['server'].database}_bare")
    res = run_cli(["report", "--out", str(tmp_path / "r.html")], env, tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr and "yibao migrate" in res.stderr, res.stderr
    s = load_settings(ch_backend="server", ch_host=env["YIBAO_CH_HOST"], ch_port=int(env["YIBAO_CH_PORT"]),
                      ch_user=env["YIBAO_CH_USER"], ch_password=env.get("YIBAO_CH_PASSWORD", ""),
                      ch_database=env["YIBAO_CH_DATABASE"])
    be = connect(s.clickhouse())
    try:
        be.execute(f"CREATE DATABASE IF NOT EXISTS {s.ch_database}")
        res = run_cli(["report", "--out", str(tmp_path / "r.html")], env, tmp_path)
        assert res.returncode == 2, res.stdout
        assert "has no BI view bi_fund_health" in res.stderr and "run `yibao migrate`" in res.stderr
        assert "Traceback" not in res.stderr and not (tmp_path / "r.html").exists()
        # once migrated, an empty database gives a report whose every chart says "no data"
        migrate(be)
        res = run_cli(["report", "--out", str(tmp_path / "r.html")], env, tmp_path)
        assert res.returncode == 0, res.stderr
        page = (tmp_path / "r.html").read_text(encoding="utf-8")
        assert page.count('data-state="empty"') == len(CHART_KEYS) and 'class="mark' not in page
    finally:
        be.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
        be.close()


@pytest.mark.integration
def test_every_grafana_panel_query_runs_on_both_engines(stores: dict[str, Store]) -> None:
    """The dashboard's SQL, macros expanded, is valid on ClickHouse 18.16 and on chDB, and finds rows."""
    from sinks import connect
    from yibao.settings import load_settings

    queries = all_panel_sql()
    assert queries
    server = stores["server"].env
    s = load_settings(ch_backend="server", ch_host=server["YIBAO_CH_HOST"], ch_port=int(server["YIBAO_CH_PORT"]),
                      ch_user=server["YIBAO_CH_USER"], ch_password=server.get("YIBAO_CH_PASSWORD", ""),
                      ch_database=stores["server"].database)
    be = connect(s.clickhouse())
    got: dict[str, dict[str, list[Any]]] = {"server": {}}
    try:
        be.use_database()
        for title, sql in queries:
            try:
                got["server"][title] = [len(be.query(sql).rows), None]
            except Exception as exc:
                got["server"][title] = [0, str(exc)[:400]]
    finally:
        be.close()
    emb = stores["embedded"]
    res = subprocess.run([sys.executable, "-c", _EMBEDDED_SQL, str(emb.chdb_path), emb.database, str(ROOT)],
                         input=json.dumps(queries), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    got["embedded"] = json.loads(res.stdout.strip().splitlines()[-1])
    for kind, results in got.items():
        failed = {t: e for t, (_, e) in results.items() if e}
        assert not failed, f"{kind}: panel queries failed: {failed}"
        empty = [t for t, (n, _) in results.items() if n == 0]
        assert not empty, f"{kind}: panels with no rows on real data: {empty}"
