"""streams.checkpoint: the exactly-once commit of a batch runs its four steps in their one order,
and a failure at any step leaves every later step undone (so a redelivery repeats from there)."""

from __future__ import annotations

import asyncio
import types
from collections import Counter
from typing import Any

import pytest
from aiokafka.structs import OffsetAndMetadata

from schemas import Codec
from streams.checkpoint import Checkpoint, next_offsets
from streams.messages import DEADLETTER_RECORD, MESSAGE_BUDGET, EmitTooLarge, Message, Outcome
from streams.rules.state import Store

CODEC = Codec()


class Journal:
    """Fake producer, sink and consumer commit, writing every step to one list."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.steps: list[tuple[str, Any]] = []
        self.fail_at = fail_at

    def _step(self, name: str, what: Any) -> None:
        if self.fail_at == name:
            raise RuntimeError(f"{name} failed")
        self.steps.append((name, what))

    # producer
    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[None]:
        self._step("send", topic)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def create_batch(self) -> Any:
        class Batch:
            def __init__(self) -> None:
                self.records: list[bytes] = []

            def append(self, key: bytes, value: bytes | None, timestamp: Any) -> object:
                self.records.append(key)
                return object()

            def record_count(self) -> int:
                return len(self.records)

        return Batch()

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        self._step("changelog", (topic, partition, list(batch.records)))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(types.SimpleNamespace(offset=0))  # aiokafka's RecordMetadata: the batch's first offset
        return fut

    # sink and consumer
    async def insert(self, table: str, cols: dict[str, list[Any]]) -> None:
        self._step("insert", table)

    async def commit(self, offsets: dict[Any, OffsetAndMetadata]) -> None:
        self._step("commit", {tp.partition: meta.offset for tp, meta in offsets.items()})


def outcome() -> Outcome:
    dead = {"event_id": "e", "reason_code": "BAD_AVRO", "reason_detail": "d", "field": None, "source_topic": "t",
            "source_partition": 0, "source_offset": 3, "source_key": None, "schema_id": None, "event_type": None,
            "payload": b"x", "payload_digest": "p", "failed_at": 0}
    out = Outcome(events=3, dead=[dead], dead_keys=[b"t/0"],
                  emits=[("internal.stays-by-hospital", b"H1", b"{}")], emit_sources=[(0, 3)],
                  tables={"settlements": {"event_id": ["a"]}, "fee_details": {"setl_id": ["s"]},
                          "dead_letters": {"event_id": ["e"]}})
    out.landed = Counter({"Settlement": 2})
    return out


def checkpoint(j: Journal, store: Store) -> Checkpoint:
    return Checkpoint("t.settlement", CODEC, j, j.insert, j.commit, [store], "t.deadletter",  # type: ignore[arg-type]
                      lambda s: f"t.{s}")


BATCH = [Message(0, 3, None, b""), Message(1, 7, None, b""), Message(0, 4, None, b"")]


def test_the_four_steps_run_in_their_order() -> None:
    j = Journal()
    store = Store("person", "t.changelog.person")
    store.put(0, "tok", {"o": 4})
    asyncio.run(checkpoint(j, store).commit(BATCH, outcome()))
    assert [name for name, _ in j.steps] == ["send", "send", "insert", "insert", "insert", "changelog", "commit"]
    assert [what for name, what in j.steps if name == "send"] == ["t.deadletter", "t.internal.stays-by-hospital"]
    assert [what for name, what in j.steps if name == "insert"] == ["settlements", "fee_details", "dead_letters"]
    assert j.steps[-2] == ("changelog", ("t.changelog.person", 0, [b"tok"]))
    assert j.steps[-1] == ("commit", {0: 5, 1: 8})  # one past the last message of each partition


@pytest.mark.parametrize("fail_at", ["send", "insert", "changelog", "commit"])
def test_a_failed_step_leaves_every_later_step_undone(fail_at: str) -> None:
    j = Journal(fail_at)
    store = Store("person", "t.changelog.person")
    store.put(0, "tok", {"o": 4})
    with pytest.raises(RuntimeError, match=fail_at):
        asyncio.run(checkpoint(j, store).commit(BATCH, outcome()))
    order = ["send", "insert", "changelog", "commit"]
    assert {name for name, _ in j.steps} == set(order[: order.index(fail_at)])


def test_a_message_over_the_budget_stops_the_commit_before_anything_is_sent() -> None:
    j = Journal()
    out = outcome()
    out.emits.append(("internal.stays-by-drg", b"ES23", b" " * MESSAGE_BUDGET))
    out.emit_sources.append((0, 4))
    with pytest.raises(EmitTooLarge, match=r"internal\.stays-by-drg"):
        asyncio.run(checkpoint(j, Store("person", "t")).commit(BATCH, out))
    assert j.steps == []


def test_next_offsets_is_one_past_the_last_message_of_each_partition_whatever_the_order() -> None:
    offsets = next_offsets("t", [Message(2, 9, None, b""), Message(2, 4, None, b""), Message(0, 0, None, b"")])
    assert {tp.partition: (tp.topic, meta.offset) for tp, meta in offsets.items()} == {2: ("t", 10), 0: ("t", 1)}
    assert next_offsets("t", []) == {}


def test_dead_letters_sent_are_the_topic_copies() -> None:
    j = Journal()
    sent = checkpoint(j, Store("person", "t")).messages(outcome())
    topic, key, value, _ = sent[0]
    assert (topic, key) == ("t.deadletter", b"t/0")
    assert CODEC.decode(value).datum["reason_code"] == "BAD_AVRO" and CODEC.decode(value).record == DEADLETTER_RECORD
