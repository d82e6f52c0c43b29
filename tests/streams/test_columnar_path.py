"""The columnar path lands, dead-letters, counts and alerts exactly what the record path does.

The same batch of settlement-stream messages (valid events of every record, hostile and broken ones,
re-sends, conflicts, tombstones, events already landed) goes through a processor with the columnar
decoder and through one without; everything they return must be the same, row for row. Batches are
drawn by hypothesis; a failure prints the example (and `print_blob` the seed to replay it).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import SUBJECT_RECORDS, Codec, DecodeError
from schemas.columnar_decode import ArrowDecoder
from streams.messages import Message, Outcome
from streams.privacy import Pseudonymizer, Sealer
from streams.processors import COLUMNAR_MIN_EVENTS, BatchProcessor
from streams.topology import build_pipeline
from yibao.settings import Settings
from yibao.sim.corrupt import FRAME_CORRUPTIONS, SETTLEMENT_CORRUPTIONS
from yibao.sim.generator import SimConfig, SimEvent, TrafficGenerator
from yibao.sim.planters import Planting

from ..harness import default_settings
from .test_batch_processor import LIMITS

KEY = bytes.fromhex("5a" * 32)
SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
#: dead-letter columns that differ between two runs by design: a fresh nonce seals each original,
#: and the wall clock stamps it
RANDOM_DEAD = {"source_key", "payload", "failed_at"}


@pytest.fixture(scope="module")
def settings_() -> Iterator[Settings]:
    import tempfile
    from pathlib import Path

    with default_settings(Path(tempfile.mkdtemp())) as s:
        yield s


@pytest.fixture(scope="module")
def events() -> list[SimEvent]:
    evs = TrafficGenerator(SimConfig(settlements=900, days=20, seed=11)).events()
    return [e for e in evs if e.record in SUBJECT_RECORDS["settlement"]]


@pytest.fixture(scope="module")
def planted() -> list[SimEvent]:
    """Traffic with every kind of planted anomaly, so that the rules raise alerts."""
    evs = Planting("all", rate=0.05).generator(SimConfig(settlements=900, days=20, seed=5)).events()
    return [e for e in evs if e.record in SUBJECT_RECORDS["settlement"]]


@pytest.fixture(scope="module")
def decoder() -> Iterator[ArrowDecoder]:
    with ArrowDecoder(timeout_s=1.0, cooldown_s=0.0) as d:  # no rest: each example starts afresh
        yield d


class Counting:
    """The decoder, counting the rows it returned as frames (so a test knows the fast path ran)."""

    def __init__(self, inner: ArrowDecoder) -> None:
        self.inner = inner
        self.rows = 0

    @property
    def timeouts(self) -> int:
        return self.inner.timeouts

    def poll_ready(self) -> bool:
        """Waits for a helper replacing a killed one: each example is to try the columnar path."""
        return self.inner.wait_ready()

    def decode(self, schema: dict[str, Any], bodies: Any) -> Any:
        frame = self.inner.decode(schema, bodies)
        if frame is not None:
            self.rows += frame.height
        return frame


def processor(s: Settings, decoder: Any, rules: bool) -> BatchProcessor:
    pipeline = build_pipeline(validation=s.validation(), rules=dataclasses.replace(s.rules(), enabled=rules),
                              topic=s.topic, codec=Codec(), pseudonymizer=Pseudonymizer(KEY, "k1"),
                              sealer=Sealer(KEY, "k1"), limits=lambda: LIMITS, streams=("settlement",),
                              decoder=decoder)
    proc = pipeline.stages["settlement"].processor
    assert isinstance(proc, BatchProcessor)
    return proc


def rows(out: Outcome, table: str, drop: frozenset[str] = frozenset()) -> list[tuple[Any, ...]]:
    cols = out.tables.get(table, {})
    names = [n for n in cols if n not in drop]
    return sorted(zip(*(cols[n] for n in names), strict=True), key=repr)


def same(a: Outcome, b: Outcome) -> None:
    assert set(a.tables) == set(b.tables)
    for table in a.tables:
        drop = frozenset(RANDOM_DEAD) if table == "dead_letters" else frozenset()
        assert list(a.tables[table]) == list(b.tables[table]), table
        assert rows(a, table, drop) == rows(b, table, drop), table
    assert a.landed == b.landed
    assert a.reasons == b.reasons
    assert a.duplicates == b.duplicates
    assert a.skipped_rows == b.skipped_rows
    assert a.emits == b.emits
    assert a.emit_sources == b.emit_sources
    assert a.alert_sources == b.alert_sources
    assert [{k: v for k, v in x.items() if k != "detected_at"} for x in a.alerts] == \
        [{k: v for k, v in x.items() if k != "detected_at"} for x in b.alerts]


ACTIONS = ("corrupt", "frame", "resend", "conflict", "trailing", "tombstone", "huge")
#: what makes the decoder refuse the whole frame (the record path then takes every message)
REFUSED = {"frame", "trailing"}


def _decodes(codec: Codec, value: bytes) -> bool:
    try:
        codec.decode(value)
    except DecodeError:
        return False
    return True


def batch(codec: Codec, evs: list[SimEvent], actions: list[str], seed: int) -> list[Message]:
    rng = random.Random(seed)
    msgs: list[Message] = []
    offsets = [0, 0, 0]
    sent: list[tuple[int, bytes, bytes]] = []

    def add(partition: int, key: bytes, value: bytes | None) -> None:
        msgs.append(Message(partition, offsets[partition], key, value))
        offsets[partition] += 1

    for ev, action in zip(evs, actions, strict=False):
        p = sum(ev.key.encode()) % 3
        key = ev.key.encode()
        value = codec.encode(ev.record, ev.datum)
        if action == "corrupt" and ev.record == SETTLEMENT:
            value, _ = rng.choice(SETTLEMENT_CORRUPTIONS)(codec, ev, rng)
        elif action == "frame":
            value, _ = rng.choice(FRAME_CORRUPTIONS)(codec, ev, rng)
        elif action == "trailing":
            value += b"\x00\x02"
        elif action == "huge" and ev.record == SETTLEMENT:
            d = copy.deepcopy(ev.datum)
            d["hosp_lv"] = "\u0007" + "级" * 200_000  # 600 kB of a valid-looking field
            value = codec.encode(ev.record, d)
        elif action == "resend" and sent:
            p, key, value = rng.choice(sent)
        elif action == "conflict" and (clean := [x for x in sent if _decodes(codec, x[2])]):
            p, key, old = rng.choice(clean)  # a different content for an event sent before
            decoded = codec.decode(old)
            d = copy.deepcopy(decoded.datum)
            if "medfee_sumamt" in d:
                d["inscp_amt"] = max(0, d["inscp_amt"] - 1)
            value = codec.encode(decoded.record, d)
        add(p, key, None if action == "tombstone" else value)
        sent.append((p, key, value))
    return msgs


@settings(max_examples=10, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_columnar_and_record_paths_land_the_same(data: st.DataObject, settings_: Settings, events: list[SimEvent],
                                                 decoder: ArrowDecoder) -> None:
    codec = Codec()
    n = data.draw(st.integers(COLUMNAR_MIN_EVENTS, 600), label="events")
    start = data.draw(st.integers(0, len(events) - n), label="start")
    actions = ["keep"] * n
    kinds = ACTIONS if data.draw(st.booleans(), label="refusals") else tuple(a for a in ACTIONS if a not in REFUSED)
    for at, action in data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(kinds)),
                                         min_size=3, max_size=40), label="actions"):
        actions[at] = action
    msgs = batch(codec, events[start:start + n], actions, data.draw(st.integers(0, 2**32), label="seed"))
    landed_before = data.draw(st.sets(st.sampled_from([(m.partition, m.offset) for m in msgs]), max_size=20),
                              label="already")

    def already(table: str, partition: int, offset: int, ident: Any) -> bool:
        return (partition, offset) in landed_before and table in ("settlements", "fee_details")

    counting = Counting(decoder)
    fast = processor(settings_, counting, rules=False)
    slow = processor(settings_, None, rules=False)
    a = fast.process(msgs, already if landed_before else None)
    b = slow.process(msgs, already if landed_before else None)
    same(a, b)
    settlements = sum(e.record == SETTLEMENT for e in events[start:start + n])
    if not REFUSED & set(actions) and settlements - sum(a != "keep" for a in actions) >= COLUMNAR_MIN_EVENTS:
        assert counting.rows > 0, "the columnar path never ran"


def test_columnar_and_record_paths_raise_the_same_alerts(settings_: Settings, planted: list[SimEvent],
                                                         decoder: ArrowDecoder) -> None:
    codec = Codec()
    actions = [("keep", "keep", "keep", "resend", "keep", "corrupt")[i % 6] for i in range(len(planted))]
    msgs = batch(codec, planted, actions, seed=3)
    counting = Counting(decoder)
    fast = processor(settings_, counting, rules=True)
    slow = processor(settings_, None, rules=True)
    a, b = fast.process(msgs), slow.process(msgs)
    same(a, b)
    assert counting.rows > 0 and 0 < a.columnar <= counting.rows and b.columnar == 0
    assert a.alerts, "the traffic raised no alert: nothing was compared"
    assert sum(a.landed.values()) > Counter(actions)["keep"] // 2


def test_small_batches_stay_on_the_record_path(settings_: Settings, events: list[SimEvent],
                                               decoder: ArrowDecoder) -> None:
    codec = Codec()
    msgs = [Message(0, i, e.key.encode(), codec.encode(e.record, e.datum))
            for i, e in enumerate(events[:COLUMNAR_MIN_EVENTS - 1])]
    counting = Counting(decoder)
    out = processor(settings_, counting, rules=False).process(msgs)
    assert counting.rows == 0 and out.columnar == 0
    assert sum(out.landed.values()) == len(msgs)


def test_a_large_batch_is_decoded_in_frames_of_at_most_the_cap(settings_: Settings, events: list[SimEvent],
                                                               decoder: ArrowDecoder,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import streams.processors as processors

    monkeypatch.setattr(processors, "COLUMNAR_MAX_EVENTS", 97)
    codec = Codec()
    actions = ["keep" if i % 10 else "corrupt" for i in range(len(events))]
    msgs = batch(codec, events, actions, seed=4)
    frames: list[int] = []

    class Spy(Counting):
        def decode(self, schema: dict[str, Any], bodies: Any) -> Any:
            frames.append(len(bodies))
            return super().decode(schema, bodies)

    spy = Spy(decoder)
    same(processor(settings_, spy, rules=False).process(msgs), processor(settings_, None, rules=False).process(msgs))
    assert spy.rows > 0 and len(frames) > 1 and max(frames) <= 97


def test_a_helper_is_started_only_for_ingestors_fed_batches_the_path_can_take(settings_: Settings,
                                                                             decoder: ArrowDecoder) -> None:
    from types import SimpleNamespace

    from streams.app import _takes_columnar
    from streams.ingest import PRECHECK_SLICE

    fast, plain = processor(settings_, decoder, rules=False), processor(settings_, None, rules=False)

    def fed(proc: BatchProcessor, slice_: int) -> Any:
        return SimpleNamespace(processor=proc, process_slice=slice_)

    assert fast.columnar_records and not plain.columnar_records
    assert _takes_columnar(fed(fast, 0)) and _takes_columnar(fed(fast, COLUMNAR_MIN_EVENTS))
    assert not _takes_columnar(fed(fast, PRECHECK_SLICE))  # the check's slices never reach the path
    assert not _takes_columnar(fed(plain, 0))
