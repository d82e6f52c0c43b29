"""The in-memory side of the redelivery lookup (streams/landed.py)."""

from __future__ import annotations

from sinks.tables import ALERTS_TABLE
from streams.landed import LandedIndex


def test_rows_are_matched_by_position_and_identity() -> None:
    idx = LandedIndex()
    idx.load(3, {"settlements": {10: {"e1"}}, "fee_details": {}})
    assert idx("settlements", 3, 10, "e1")
    assert not idx("settlements", 3, 11, "e1")  # another position: another event, even with its id
    assert not idx("settlements", 3, 10, "e2")  # a recreated topic reuses offsets
    assert not idx("settlements", 4, 10, "e1")


def test_an_alert_version_counts_wherever_in_the_redelivered_range_it_was_written() -> None:
    """State restored from a changelog written in part can reach the same decision at another event
    of the redelivered batch; the alert version (deterministic event id) is still the same one."""
    idx = LandedIndex()
    idx.load(0, {ALERTS_TABLE: {10: {"fired-g0"}}, "settlements": {10: {"e1"}}})
    assert idx(ALERTS_TABLE, 0, 17, "fired-g0")
    assert not idx(ALERTS_TABLE, 0, 17, "retracted-g0")
    assert not idx(ALERTS_TABLE, 1, 10, "fired-g0")
    idx.advance(0, 10)
    assert not idx(ALERTS_TABLE, 0, 17, "fired-g0")  # past the range: forgotten
