"""A batch's age, which ``batch_max_seconds`` bounds, runs from when its oldest event entered Kafka
while the worker keeps up, and from when it was picked up while the worker catches up on a backlog
(alert latency against batch size; `yibao bench` measures both)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from streams.ingest import Ingestor

from .test_lag import Processor

TP = TopicPartition("t", 0)


def _ingestor(max_events: int = 5000, max_seconds: float = 1.0) -> Ingestor:
    return Ingestor(Processor("t"), SimpleNamespace(), SimpleNamespace(), lambda: None, "dl",  # type: ignore[arg-type]
                    batch_max_events=max_events, batch_max_seconds=max_seconds, retry_max_seconds=1)


def _records(first: int, n: int, age_s: float) -> list[Any]:
    ts = int((time.time() - age_s) * 1000)
    return [SimpleNamespace(partition=0, offset=first + i, key=None, value=b"v", headers=(), timestamp=ts)
            for i in range(n)]


def test_keeping_up_the_age_counts_from_the_produce() -> None:
    ing = _ingestor()
    now = time.monotonic()
    ing._gather({TP: _records(0, 10, age_s=0.6)}, now, lambda tp: 10)  # nothing more behind them
    assert now - ing._pending_since == pytest.approx(0.6, abs=0.05)
    # an older event of another partition later makes the batch older, never younger
    ing._gather({TopicPartition("t", 1): _records(0, 5, age_s=0.9)}, now, lambda tp: 5)
    assert now - ing._pending_since == pytest.approx(0.9, abs=0.05)
    ing._gather({TP: _records(10, 5, age_s=0.1)}, now, lambda tp: 15)
    assert now - ing._pending_since == pytest.approx(0.9, abs=0.05)


def test_the_age_is_at_most_the_linger_and_never_negative() -> None:
    ing = _ingestor(max_seconds=1.0)
    now = time.monotonic()
    ing._gather({TP: _records(0, 10, age_s=3600)}, now, lambda tp: 10)
    assert now - ing._pending_since == 1.0
    ing = _ingestor()
    ing._gather({TP: _records(0, 10, age_s=-5)}, now, lambda tp: 10)  # a producer clock ahead
    assert ing._pending_since == now


def test_behind_by_a_batch_the_age_counts_from_the_pick_up() -> None:
    ing = _ingestor(max_events=5000)
    now = time.monotonic()
    ing._gather({TP: _records(0, 1000, age_s=30)}, now, lambda tp: 1000 + 5000)
    assert ing._pending_since == now
    ing = _ingestor(max_events=5000)
    ing._gather({TP: _records(0, 1000, age_s=30)}, now, lambda tp: None)  # no fetch response yet
    assert ing._pending_since == now
