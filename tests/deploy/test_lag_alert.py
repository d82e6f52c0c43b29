"""YibaoConsumerLagging (deploy/compose/prometheus/alerts.yml), run by promtool's rule unit tests: it
fires for a backlog more than 10 minutes of work deep at the topic's pace, or for a stuck worker,
and stays quiet for a deep backlog that is being worked off fast enough."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from ..conftest import require_infra

RULES = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "prometheus" / "alerts.yml"
TOPIC = "yibao.settlement"


def _series(lag: int, per_second: int) -> list[dict[str, str]]:
    """Two partitions sharing ``lag``, and events_in growing ``per_second`` (scraped every minute)."""
    half = lag // 2
    return [
        {"series": f'yibao_consumer_lag{{topic="{TOPIC}",partition="0",instance="w1"}}', "values": f"{half}x30"},
        {"series": f'yibao_consumer_lag{{topic="{TOPIC}",partition="1",instance="w1"}}',
         "values": f"{lag - half}x30"},
        {"series": f'yibao_events_in_total{{topic="{TOPIC}",instance="w1"}}', "values": f"0+{per_second * 60}x30"},
    ]


def _fires(lag: int, per_second: int) -> list[dict[str, object]]:
    return [{"exp_labels": {"severity": "ticket", "topic": TOPIC},
             "exp_annotations": {
                 "summary": f"{TOPIC} is more than 10 minutes of work behind ({lag} events not landed)",
                 "runbook": "docs/operations.md#consumer-lag"}}]


def test_the_lag_alert_fires_for_a_deep_or_stuck_backlog_only(tmp_path: Path) -> None:
    promtool = shutil.which("promtool") or require_infra("promtool (Debian package prometheus)")
    cases = [
        (2_000, 0, True),  # a stuck worker 2,000 events behind
        (100, 0, False),  # a few events behind an idle worker
        (20_000, 10, True),  # 2,000 s of work at 10 events/s
        (20_000, 100, False),  # 200 s of work at 100 events/s
    ]
    tests = []
    for lag, rate, fires in cases:
        tests.append({
            "interval": "1m",
            "input_series": _series(lag, rate),
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "YibaoConsumerLagging", "exp_alerts": []},  # not for 15m yet
                {"eval_time": "28m", "alertname": "YibaoConsumerLagging",
                 "exp_alerts": _fires(lag, rate) if fires else []},
            ],
        })
    spec = tmp_path / "lag-test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    done = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
