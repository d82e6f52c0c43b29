"""The already-landed lookup of a shared table only sees its own stream's rows."""

from __future__ import annotations

from schemas.alert_ids import alert_event_id, alert_id
from sinks.base import Backend
from sinks.landed import alert_versions_held, existing_rows, without_existing
from sinks.migrate import migrate
from streams.landed import LandedIndex
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


def test_an_alert_version_merged_away_still_counts_as_landed(backend: Backend) -> None:
    """The alerts table keeps one version per alert once merged. A FIRED version and its RETRACTED in
    the same second: after the merge only the RETRACTED is there to be found, and a redelivery that
    reaches the FIRED again must not insert it (the merge would then keep it, inserted last, and the
    retracted alert would stand again: found by tests/system/test_event_identity.py after a SIGKILL)."""
    migrate(backend)
    aid = alert_id("YB-PSI-OVERSELL", "H11010500001", "XC09CAE102A001010700761|MV000000001844")
    second = 1_784_701_771
    base = {"alert_id": aid, "rule_id": "YB-PSI-OVERSELL", "subsystem": "procurement", "rule_version": 1,
            "severity": "HIGH", "window_start": second, "window_end": second, "detected_at": second,
            "src_partition": 1}
    fired, retracted = alert_event_id(aid, "FIRED"), alert_event_id(aid, "RETRACTED")
    insert(backend, "alerts", [
        {**base, "event_id": fired, "status": "FIRED", "src_offset": 744},
        {**base, "event_id": retracted, "status": "RETRACTED", "src_offset": 748},
    ])
    backend.execute(f"OPTIMIZE TABLE {backend.database}.alerts FINAL")
    held = existing_rows(backend, "alerts", 1, 0, rule_ids=["YB-PSI-OVERSELL"])
    assert held == {748: {retracted}}  # the FIRED version is gone from the table
    versions = alert_versions_held(backend, 1, 0, ["YB-PSI-OVERSELL"])
    assert versions == [(aid, "RETRACTED", retracted)]
    index = LandedIndex()
    index.load(1, {"alerts": held}, versions)
    assert index("alerts", 1, 744, fired) and index("alerts", 1, 748, retracted)
    assert not index("alerts", 1, 760, alert_event_id(aid, "FIRED", 1))  # a new generation is new
    assert alert_versions_held(backend, 1, 749, ["YB-PSI-OVERSELL"]) == []
    assert alert_versions_held(backend, 1, 0, []) == []
    assert alert_versions_held(backend, 1, 0) == versions  # every rule
    # an insert of unknown outcome re-sent: neither version goes again (the FIRED was merged away),
    # the next generation does
    cols = {"src_partition": [1, 1, 1], "src_offset": [744, 748, 760], "alert_id": [aid] * 3,
            "event_id": [fired, retracted, alert_event_id(aid, "FIRED", 1)]}
    assert without_existing(backend, "alerts", cols, "t.procurement")["src_offset"] == [760]
