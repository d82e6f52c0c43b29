"""The already-landed lookup of a shared table only sees its own stream's rows."""

from __future__ import annotations

from sinks.base import Backend
from sinks.landed import existing_rows
from sinks.migrate import migrate
from tests.sinks.test_bi_aggregates import insert


def test_alerts_of_another_stream_at_the_same_position_are_not_a_redelivery(backend: Backend) -> None:
    migrate(backend)
    window = 1_760_000_000
    base = {"status": "FIRED", "rule_version": 1, "severity": "HIGH", "window_start": window,
            "window_end": window + 60, "detected_at": window, "src_partition": 1}
    insert(backend, "alerts", [
        {**base, "alert_id": "a1", "rule_id": "YB-PROC-PAY-OVERDUE", "subsystem": "procurement", "src_offset": 7},
        {**base, "alert_id": "a2", "rule_id": "YB-HOSP-UPCODE", "subsystem": "settlement", "src_offset": 9},
    ])
    everything = existing_rows(backend, "alerts", 1, 0)
    assert sorted(everything) == [7, 9]
    hospital = existing_rows(backend, "alerts", 1, 0, rule_ids=["YB-HOSP-UPCODE"])
    assert sorted(hospital) == [9]
    assert existing_rows(backend, "alerts", 1, 0, rule_ids=[]) == {}
