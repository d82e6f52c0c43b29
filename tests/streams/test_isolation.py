"""Ingestor._flush_isolating: a message that makes its batch fail is found and quarantined, and the
rest of the batch lands in order; a failure that is not about a message stops the worker as before.

The three steps around it are replaced by recording stubs: ``_flush_batch`` fails for any batch
holding a poison message (as a real flush does when one event's processing, emit or insert
fails), ``_roll_back`` and ``_quarantine`` record their calls. The integration tests
(tests/system/test_poison.py) show the same with a real worker, broker and ClickHouse.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.base import SinkError, SinkUnavailable
from streams.ingest import SPLIT_WAYS, Ingestor, ProcessingFailed, describe, message_failure
from streams.messages import EmitTooLarge, Message


class Rig:
    def __init__(self, poison: set[int], error: type[Exception] | Exception = ProcessingFailed) -> None:
        self.poison = poison
        self.error = error
        self.landed: list[int] = []
        self.quarantined: list[tuple[int, str]] = []
        self.flushes = 0
        self.rollbacks = 0
        ing = Ingestor.__new__(Ingestor)
        ing.topic = "t.settlement"
        ing._flush_batch = self.flush  # type: ignore[method-assign]
        ing._roll_back = self.roll_back  # type: ignore[method-assign]
        ing._quarantine = self.quarantine  # type: ignore[method-assign]
        self.ing = ing

    async def flush(self, batch: list[Message]) -> None:
        self.flushes += 1
        if any(m.offset in self.poison for m in batch):
            raise self.error if isinstance(self.error, Exception) else self.error("boom")
        self.landed.extend(m.offset for m in batch)

    async def roll_back(self, batch: list[Message]) -> None:
        self.rollbacks += 1

    async def quarantine(self, m: Message, reason: str, exc: BaseException) -> None:
        self.quarantined.append((m.offset, reason))

    def run(self, n: int) -> bool:
        batch = [Message(i % 4, i, None, b"") for i in range(n)]
        return asyncio.run(self.ing._flush_isolating(batch))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), data=st.data())
def test_every_poison_message_is_quarantined_and_every_other_lands_once_in_order(n: int, data: Any) -> None:
    poison = set(data.draw(st.lists(st.integers(0, n - 1), max_size=5)))
    rig = Rig(poison)
    assert rig.run(n) is (not poison)
    assert [o for o, _ in rig.quarantined] == sorted(poison)
    assert {r for _, r in rig.quarantined} <= {"UNPROCESSABLE"}
    assert rig.landed == [i for i in range(n) if i not in poison]
    # a few rounds of at most SPLIT_WAYS flushes per poison message, not one flush per event
    depth = 1
    while SPLIT_WAYS ** depth < n:
        depth += 1
    assert rig.flushes <= 1 + len(poison) * SPLIT_WAYS * depth


def test_a_batch_without_poison_is_flushed_once() -> None:
    rig = Rig(set())
    assert rig.run(5000) is True
    assert (rig.flushes, rig.rollbacks, rig.quarantined) == (1, 0, [])


@pytest.mark.parametrize(("error", "reason"), [
    (EmitTooLarge("a message of 1,200,000 bytes"), "EMIT_TOO_LARGE"),
    (MessageSizeTooLargeError(), "EMIT_TOO_LARGE"),
    (SinkError("Cannot parse input", 27), "REJECTED_BY_SINK"),
    (SinkError("a value does not fit its column", about_data=True), "REJECTED_BY_SINK"),
    (ProcessingFailed("processing raised"), "UNPROCESSABLE"),
])
def test_the_dead_letter_reason_says_which_step_refused_the_message(error: Exception, reason: str) -> None:
    rig = Rig({7}, error)
    rig.run(20)
    assert rig.quarantined == [(7, reason)]
    assert rig.landed == [i for i in range(20) if i != 7]


@pytest.mark.parametrize("error", [KafkaTimeoutError(), SinkUnavailable("connection refused"), RuntimeError("x")])
def test_a_failure_that_is_not_about_a_message_is_raised_and_nothing_is_quarantined(error: Exception) -> None:
    rig = Rig({3}, error)
    with pytest.raises(type(error)):
        rig.run(10)
    assert rig.quarantined == [] and rig.rollbacks == 0


@pytest.mark.parametrize(("code", "about_data"), [(60, False), (16, False), (497, False), (27, True), (407, True)])
def test_only_clickhouse_refusing_the_values_is_about_a_message(code: int, about_data: bool) -> None:
    """A missing table or column, or no rights, concerns every event alike: the worker stops as
    before, nothing is quarantined; a value that cannot go into its column is isolated."""
    rig = Rig(set(range(200)) if not about_data else {5}, SinkError("refused", code))
    if about_data:
        rig.run(200)
        assert rig.quarantined == [(5, "REJECTED_BY_SINK")]
    else:
        with pytest.raises(SinkError):
            rig.run(200)
        assert rig.quarantined == [] and rig.rollbacks == 0
    assert message_failure(SinkError("client could not encode", about_data=True)) == "REJECTED_BY_SINK"
    assert message_failure(SinkUnavailable("too many parts", 252, overloaded=True)) is None


def test_a_defect_in_every_message_isolates_each_of_them() -> None:
    rig = Rig(set(range(200)), ProcessingFailed("processing raised"))
    rig.run(200)
    assert [o for o, _ in rig.quarantined] == list(range(200)) and rig.landed == []


def test_describe_says_what_failed_and_where_never_the_data() -> None:
    def parse(name: str) -> int:
        return int(name)

    try:
        try:
            parse("张三 110101199003071234")
        except ValueError as inner:
            raise ProcessingFailed("t: processing a batch of 3 raised") from inner
    except ProcessingFailed as exc:
        text = describe(exc)
    assert text == f"ValueError raised in parse (test_isolation.py:{parse.__code__.co_firstlineno + 1})"
    refused = describe(SinkError("Cannot parse input: '张三'", 27))
    assert "张三" not in refused and "27" in refused
    assert describe(EmitTooLarge("a message for t takes 1,000,000 bytes")) == "a message for t takes 1,000,000 bytes"
    assert describe(KeyError("amt")) == "KeyError: 'amt'"  # the interpreter's message names code, not data
    assert message_failure(ProcessingFailed("p")) == "UNPROCESSABLE"
