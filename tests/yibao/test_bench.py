"""`yibao bench`'s figures: what it prints is measured on the pipeline the worker runs, and a
figure it could not measure says so instead of printing a number."""

from __future__ import annotations

import http.server
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from yibao.bench import (
    BATCH_MAX_EVENTS,
    MIN_EVENTS,
    _owned_partitions,
    _pass,
    _settlements,
    event_time_costs,
    print_figures,
    run_bench,
)
from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint, free_port
from yibao.settings import Settings

from ..harness import default_settings, settings_for


@pytest.fixture()
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with default_settings(tmp_path_factory.mktemp("cwd")) as s:
        yield s


def test_event_time_costs_measures_identity_and_rules_in_order_and_as_delivered(settings: Settings) -> None:
    frames, lines = _settlements(400, 3, 10.0)
    assert len(frames) == 400 and 9.0 < lines / 400 < 11.0
    seen: list[tuple[str, int, int | None]] = []
    costs = event_time_costs(settings, frames, progress=lambda *a: seen.append(a))
    assert set(costs) == {f"{stage}_{order}_us" for stage in ("identity", "rules")
                          for order in ("in_order", "delivered")}
    assert all(v > 0 for v in costs.values()), costs
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][2], seen


def test_generating_reports_progress_to_the_requested_count() -> None:
    seen: list[tuple[str, int, int | None]] = []
    frames, _ = _settlements(2500, 5, 10.0, progress=lambda *a: seen.append(a))
    assert [d for _, d, _ in seen] == [1000, 2000, 2500] and {t for _, _, t in seen} == {len(frames)}


def test_a_run_too_small_to_time_is_refused_before_any_server_starts() -> None:
    with pytest.raises(ValueError, match="at least"):
        run_bench(MIN_EVENTS - 1, 1)


def _figures(**over: Any) -> dict[str, Any]:
    f: dict[str, Any] = {
        "settlements": 5000, "fee_lines_per_settlement": 10.0, "rows_per_settlement": 11.0, "worker_processes": 2,
        "settlements_per_s": 4000.0, "rows_per_s": 44000.0, "settlements_per_s_all_rules": 2000.0,
        "rows_per_s_all_rules": 22000.0, "rules_to_ingest_ratio": 0.5, "landing_s": 1.25,
        "landing_s_all_rules": 2.5, "startup_s": 9.0, "wall_including_startup_s": 10.25,
        "batch_max_events": BATCH_MAX_EVENTS, "batch_max_seconds": 0.25, "generate_encode_s": 3.0,
        "produce_per_s": 30000.0, "stage_us_per_settlement": {"decode_us": 100.0, "rows_per_settlement": 11.0},
        "identity_and_event_time_us_per_settlement": {"identity_in_order_us": 5.0, "rules_in_order_us": 80.0,
                                                      "identity_delivered_us": 6.0, "rules_delivered_us": 90.0},
        "not_measured": {}, "clickhouse_version": "18.16.1", "cpus": 2,
    }
    f.update(over)
    pass_ = {"first_fetch_s": [6.1, None], "worker_rss_mb": [180.0, 175.5], "alerts": 120, "columnar_share": 0.98,
             "wall_including_startup_s": f["wall_including_startup_s"], "startup_s": f["startup_s"]}
    f["by_processes"] = {"2": {
        "ingest": {**pass_, "settlements_per_s": f["settlements_per_s"], "rows_per_s": f["rows_per_s"],
                   "landing_s": f["landing_s"]},
        "rules": {**pass_, "settlements_per_s": f["settlements_per_s_all_rules"],
                  "rows_per_s": f["rows_per_s_all_rules"], "landing_s": f["landing_s_all_rules"]},
        "rules_to_ingest_ratio": f["rules_to_ingest_ratio"]}}
    f.setdefault("alert_latency", None)
    return f


def _printed(f: dict[str, Any]) -> str:
    c = Console(record=True, width=200)
    print_figures(c, f)
    return c.export_text()


def test_a_figure_not_measured_is_said_so_not_printed_as_zero() -> None:
    why = "all 5,000 settlements landed within 0.020 s of the first worker owning partitions: too short to time"
    text = _printed(_figures(settlements_per_s=None, rows_per_s=None, rules_to_ingest_ratio=None,
                             not_measured={"ingest": why}))
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in text.splitlines()
            if line.count("│") == 3}
    assert rows["settlements/s, ingest only"] == "not measured"
    assert rows["all rules ÷ ingest only"] == "not measured"
    assert rows["settlements/s, all rules on"] == "2,000"
    assert why in text.replace("\n", " ")


def test_start_up_memory_and_alert_latency_are_printed_per_worker() -> None:
    lat = {"rate_target": 1000.0, "settlements_sent": 5000, "sent_per_s": 999.0, "producer_behind_max_s": 0.01,
           "alerts_measured": 80, "alerts_fired_total": 95, "batch_max_events": 5000, "batch_max_seconds": 1.0,
           "latency_ms": {"p50": 700.0, "p90": 1100.0, "p99": 1400.0, "max": 1650.0},
           "received_latency_ms": {"p50": 710.0, "p90": 1110.0, "p99": 1420.0, "max": 1700.0},
           "window_s": 5.0, "worker_rss_mb": [200.0, 190.0]}
    text = _printed(_figures(alert_latency=lat))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in text.splitlines()
            if line.count("│") >= 3}
    assert rows["start-up: launch → first record fetched, per worker (s)"] == ["6.1 —"]
    assert rows["worker RSS after the all-rules pass, per worker (MB)"] == ["180 176"]
    assert rows["events through the columnar path, ingest / rules"] == ["98% / 98%"]
    assert rows["on the alerts topic"] == ["700", "1,100", "1,400", "1,650"]
    assert "80 alerts measured of 95 fired" in text.replace("\n", " ")
    assert "alert latency" not in _printed(_figures())  # skipped (--latency-seconds 0): no table


def test_a_short_run_is_said_to_understate() -> None:
    assert "understates throughput" in _printed(_figures(landing_s=1.25)).replace("\n", " ")
    assert "understates" not in _printed(_figures(landing_s=12.0, landing_s_all_rules=20.0))


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def test_owned_partitions_reads_the_worker_metrics_page() -> None:
    _Metrics.body = (b'# TYPE yibao_assigned_partitions gauge\n'
                     b'yibao_assigned_partitions{topic="b.procurement"} 4.0\n'
                     b'yibao_assigned_partitions{topic="b.settlement"} 3.0\n')
    server = http.server.HTTPServer(("127.0.0.1", 0), _Metrics)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        port = server.server_address[1]
        assert _owned_partitions(port, "b.settlement") == 3
        assert _owned_partitions(port, "b.supervision") == 0  # no sample yet: owns nothing
    finally:
        server.shutdown()
        server.server_close()
    assert _owned_partitions(free_port(), "b.settlement") == 0  # not listening yet: still starting


@pytest.mark.integration
def test_a_run_that_lands_in_one_batch_is_timed(broker: KafkaEndpoint, clickhouse_server: ClickHouseEndpoint,
                                                tmp_path: Path) -> None:
    """What printed 0.0 settlements/s: every settlement in one batch, so the first row seen landed
    was also the last. The window now opens when the worker owns partitions."""
    n = 2000
    frames, lines = _settlements(n, 11, 10.0)
    base = settings_for(broker.bootstrap, "server", tmp_path / "data", ch=clickhouse_server,
                        batch_max_events=BATCH_MAX_EVENTS, batch_max_seconds=0.25)
    assert n <= BATCH_MAX_EVENTS
    res = _pass(f"t{uuid.uuid4().hex[:8]}", False, base, frames, lines, 1, tmp_path)
    assert res["not_measured"] is None, res
    assert res["settlements_per_s"] > 0
    assert res["settlements_per_s"] == pytest.approx(n / res["landing_s"], rel=0.01)
    assert res["rows_per_s"] == pytest.approx(res["settlements_per_s"] * (1 + lines / n), rel=0.01)
    assert res["landing_s"] < res["wall_including_startup_s"]
    assert res["startup_s"] + res["landing_s"] == pytest.approx(res["wall_including_startup_s"], abs=0.02)


def test_a_process_age_is_what_a_clock_outside_it_measures() -> None:
    """The start-up figure (``yibao_first_fetch_seconds``) counts from the process's start: to within
    the kernel's tick and the interpreter's exit, not the whole second /proc/stat's boot time rounds to."""
    import subprocess
    import sys
    import time

    code = "import time; time.sleep(1.2); from streams.metrics import process_age_s; print(process_age_s())"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    outside = time.monotonic() - t0
    age = float(out)
    assert 1.2 <= age <= outside + 0.02, (age, outside)


def test_the_landing_is_looked_at_rarely_mid_pass_and_closely_at_its_ends() -> None:
    from yibao.bench import POLL_FAR_S, POLL_S, _next_look

    assert _next_look(None, 5.0, 0, 200_000) == POLL_S  # the window is opening
    assert _next_look(1.0, 2.0, 10_000, 200_000) == POLL_FAR_S  # 19 s to go at 10,000/s
    assert _next_look(1.0, 20.0, 199_000, 200_000) == POLL_S  # 0.1 s to go: at most one look late
    assert POLL_S < _next_look(1.0, 11.0, 195_000, 200_000) < POLL_FAR_S  # 0.26 s to go
