"""yibao_sink_up follows what the ingest path last learnt of ClickHouse (streams/ingest.py): 1 after a
call it answered, even with a refusal; 0 while backing off after an outage."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from sinks.base import SinkError, SinkUnavailable
from streams import metrics
from streams.ingest import Ingestor


class _Backend:
    """Answers the back-off's probe at once, so a retry follows without waiting out the delay."""

    def reachable(self) -> bool:
        return True


def _ingestor() -> Ingestor:
    processor = SimpleNamespace(topic="t.settlement", codec=None, tables=(), stores=())
    return Ingestor(processor, _Backend(), None, lambda: None, "t.deadletter",  # type: ignore[arg-type]
                    batch_max_events=10, batch_max_seconds=1, retry_max_seconds=1)


def _gauge() -> float | None:
    return metrics.REGISTRY.get_sample_value("yibao_sink_up")


def _run(ing: Ingestor, call: Callable[[], Any]) -> Any:
    try:
        return asyncio.run(ing._with_retry(call))
    finally:
        ing.executor.shutdown(wait=True)


def test_an_answered_call_sets_it_to_1() -> None:
    metrics.SINK_UP.set(0)
    assert _run(_ingestor(), lambda: 7) == 7
    assert _gauge() == 1.0


def test_it_is_0_while_backing_off_and_1_once_clickhouse_answers_again() -> None:
    metrics.SINK_UP.set(1)
    seen: list[float | None] = []

    def call() -> str:
        seen.append(_gauge())
        if len(seen) < 3:
            raise SinkUnavailable("ClickHouse at 127.0.0.1:9 is unreachable: NetworkError: refused")
        return "written"

    assert _run(_ingestor(), call) == "written"
    assert seen == [1.0, 0.0, 0.0]
    assert _gauge() == 1.0


def test_a_refusal_is_an_answer() -> None:
    metrics.SINK_UP.set(0)

    def call() -> None:
        raise SinkError("ClickHouse at 127.0.0.1:9000: DB::Exception: Cannot parse input", 27)

    with pytest.raises(SinkError):
        _run(_ingestor(), call)
    assert _gauge() == 1.0


def test_a_failure_without_an_answer_leaves_it_alone() -> None:
    metrics.SINK_UP.set(0)

    def call() -> None:
        raise SinkError("ServerBackend is closed")

    with pytest.raises(SinkError):
        _run(_ingestor(), call)
    assert _gauge() == 0.0
