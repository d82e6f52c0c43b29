"""Event identity (streams/identity.py): a re-sent event is recognised by its event_id, at any offset,
in any batch, across a restore from the changelog, within the horizon; a different event under the
same id is a conflict; a crash redelivery (same offset) is not a re-send."""

from __future__ import annotations

import copy
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import Codec
from streams.identity import CONFLICT_REASON, Identities, Verdict
from streams.messages import DEAD_LETTER_TABLE, Message
from streams.privacy import Pseudonymizer, Sealer
from streams.processors import BatchProcessor
from streams.rules.state import Replay, Store
from streams.topology import MODULES

from .test_batch_processor import CONFIG, KEY, KID, LIMITS, of_stream, rows_of

DAY_S = 86_400


class Clock:
    def __init__(self, t: float = 1_790_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def identities(horizon: int = 7, clock: Clock | None = None) -> Identities:
    return Identities(Store("identity.t", "changelog.identity.t"), horizon, clock or Clock())


def one(ids: Identities, partition: int, offset: int, event_id: str, body: bytes = b"x") -> Verdict:
    return ids.check([(partition, offset, event_id, body)])[0]


def restore(ids: Identities, partitions: list[int], log: list[tuple[int, bytes, bytes | None]] | None = None
            ) -> Identities:
    """A new worker's Identities rebuilt from the changelog (``log``: every record written so far,
    to which what ``ids`` has not written yet is appended)."""
    fresh = Identities(Store(ids.store.name, ids.store.topic), ids.horizon_days, ids.clock)
    log = log if log is not None else []
    log.extend(ids.store.drain())
    for p in partitions:
        replay = Replay()
        for part, key, value in log:
            if part == p:
                replay.apply(key, value)
        fresh.store.data[p] = replay.data
        fresh.restored(p)
    return fresh


def test_verdicts_new_redelivered_duplicate_conflict() -> None:
    ids = identities()
    assert ids.check([(0, 10, "e1", b"a"), (0, 11, "e2", b"b"), (0, 12, "e1", b"a"), (0, 13, "e2", b"B")]) == [
        Verdict.NEW, Verdict.NEW, Verdict.DUPLICATE, Verdict.CONFLICT]
    ids.seal()
    assert one(ids, 0, 10, "e1", b"a") is Verdict.REDELIVERED  # same position: a crash redelivered it
    assert one(ids, 0, 99, "e1", b"a") is Verdict.DUPLICATE
    assert one(ids, 0, 98, "e2", b"zz") is Verdict.CONFLICT
    assert ids.first_seen(0, "e2") == 11
    assert one(ids, 1, 99, "e1", b"a") is Verdict.NEW  # identity is per partition


def test_events_without_a_usable_id_are_identified_by_their_bytes() -> None:
    ids = identities()
    for i, bad in enumerate((None, "", "x" * 65, 17)):
        body = b"broken frame %d" % i
        assert ids.check([(0, 10 * i, bad, body), (0, 10 * i + 1, bad, body), (0, 10 * i + 2, bad, body + b"!")]) \
            == [Verdict.NEW, Verdict.DUPLICATE, Verdict.NEW]
    assert ids.probe([(0, 99, None, None, False, b"k")]) == [None]  # a tombstone: nothing to know it by
    assert ids.probe([(0, 98, None, b"\x00\x00\x00", False, b"k")]) == [None]  # shorter than a frame header


def test_identities_survive_a_restore_from_the_changelog() -> None:
    ids = identities()
    ids.check([(p, o, f"e{p}-{o}", b"%d" % o) for p in (0, 1) for o in range(50)])
    ids.seal()
    again = restore(ids, [0, 1])
    assert again.remembered() == 100
    assert one(again, 0, 500, "e0-7", b"7") is Verdict.DUPLICATE
    assert one(again, 1, 7, "e1-7", b"7") is Verdict.REDELIVERED
    assert one(again, 1, 501, "e1-8", b"other") is Verdict.CONFLICT


def test_the_horizon_forgets_whole_arrival_days_and_tombstones_their_records() -> None:
    clock = Clock()
    ids = identities(horizon=2, clock=clock)
    ids.check([(0, 1, "old", b"a")])
    ids.seal()
    ids.store.drain()
    clock.t += DAY_S
    assert one(ids, 0, 2, "old", b"a") is Verdict.DUPLICATE  # one day later: within the horizon
    ids.seal()
    clock.t += DAY_S
    ids.seal()  # the first day leaves the horizon
    written = ids.store.drain()
    assert [v for _, _, v in written] == [None]  # its changelog record is tombstoned
    assert one(ids, 0, 3, "old", b"a") is Verdict.NEW


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 400), st.floats(0.0, 0.5))
def test_any_batching_and_any_restore_point_recognise_the_same_resends(seed: int, n: int, resend: float) -> None:
    """Property: re-sends are recognised whatever the batch boundaries and wherever the worker was
    replaced (state rebuilt from the changelog); every original is NEW exactly once."""
    rng = random.Random(seed)
    stream: list[tuple[str, bytes]] = []
    originals = 0
    for i in range(n):
        stream.append((f"id-{i}", b"body-%d" % i))
        originals += 1
        if rng.random() < resend:
            j = rng.randrange(len(stream))
            stream.append(stream[j])
    ids = identities()
    log: list[tuple[int, bytes, bytes | None]] = []
    got: Counter[Verdict] = Counter()
    offset = 0
    while offset < len(stream):
        size = rng.randint(1, 50)
        batch = [(0, offset + k, eid, body) for k, (eid, body) in enumerate(stream[offset:offset + size])]
        got.update(ids.check(batch))
        ids.seal()
        offset += len(batch)
        if rng.random() < 0.2:
            ids = restore(ids, [0], log)
    assert got[Verdict.NEW] == originals, f"seed {seed}"
    assert got[Verdict.DUPLICATE] == len(stream) - originals, f"seed {seed}"
    assert got[Verdict.CONFLICT] == 0


# --- in the processor -------------------------------------------------------------------------------


def processor(codec: Codec, name: str) -> BatchProcessor:
    from streams.config import ValidationConfig

    v = ValidationConfig(frozenset({"310", "390"}), frozenset({"11"}), 300, 2018)
    sub = MODULES[name].build(v, lambda: LIMITS)
    return BatchProcessor(sub, codec, Pseudonymizer(KEY, KID), Sealer(KEY, KID), f"yibao.{name}",
                          lambda: LIMITS, identities=identities())


def test_processor_lands_a_resent_event_once_and_dead_letters_a_conflict() -> None:
    from yibao.sim.generator import TrafficGenerator

    codec = Codec()
    evs = of_stream(list(TrafficGenerator(CONFIG).events()), "procurement")[:40]
    proc = processor(codec, "procurement")
    msgs = [Message(0, i, e.key.encode(), codec.encode(e.record, e.datum)) for i, e in enumerate(evs)]
    first = proc.process(msgs)
    assert sum(first.landed.values()) == 40
    changed = copy.deepcopy(evs[3].datum)
    changed["fixmedins_code"] = "H11010500001" if changed["fixmedins_code"] != "H11010500001" else "H11010500002"
    again = [Message(0, 40, evs[5].key.encode(), msgs[5].value),
             Message(0, 41, evs[3].key.encode(), codec.encode(evs[3].record, changed)),
             Message(0, 42, evs[5].key.encode(), msgs[5].value)]
    out = proc.process(again)
    assert sum(out.landed.values()) == 0
    assert sum(out.duplicates.values()) == 2
    assert out.reasons == Counter({CONFLICT_REASON: 1})
    (dead,) = rows_of(out, DEAD_LETTER_TABLE)
    assert dead["src_offset"] == 41 and "offset 3 of partition 0" in dead["reason_detail"]
    assert out.events == sum(out.landed.values()) + sum(out.reasons.values()) + sum(out.duplicates.values())


def test_a_resent_broken_event_is_a_duplicate_but_its_replay_is_judged_again() -> None:
    """A producer's re-send of a dead-lettered event is one input dead-lettered once; `yibao dlq
    replay` re-produces the dead letter's original bytes after a fix (header yibao-replay): they
    must be validated again, not recognised as a re-send of the event that was turned away."""
    from yibao.sim.generator import TrafficGenerator

    codec = Codec()
    ev = of_stream(list(TrafficGenerator(CONFIG).events()), "procurement")[0]
    bad = copy.deepcopy(ev.datum)
    bad["fixmedins_code"] = "not a code"
    value = codec.encode(ev.record, bad)
    proc = processor(codec, "procurement")
    first = proc.process([Message(0, 0, b"k", value), Message(0, 1, b"k", value)])
    assert sum(first.reasons.values()) == 1 and sum(first.duplicates.values()) == 1
    again = proc.process([Message(0, 7, b"k", value)])
    assert not again.reasons and sum(again.duplicates.values()) == 1
    replayed = proc.process([Message(0, 8, b"k", value, replay=True)])
    assert sum(replayed.reasons.values()) == 1 and not replayed.duplicates
    fixed = codec.encode(ev.record, {**ev.datum, "event_id": bad["event_id"]})
    landed = proc.process([Message(0, 9, b"k", fixed, replay=True)])  # what a fixed producer resends
    assert not landed.reasons or sum(landed.reasons.values()) == 1


def test_the_same_unreadable_message_twice_is_one_dead_letter() -> None:
    codec = Codec()
    proc = processor(codec, "procurement")
    garbled = b"\x00\x00\x00\x00\x07not avro at all"
    out = proc.process([Message(0, 0, b"k", garbled), Message(0, 1, b"k", garbled), Message(0, 2, b"k", garbled[:-1]),
                        Message(0, 3, b"other key", garbled), Message(0, 4, b"k", b"\x00\x00"),
                        Message(0, 5, b"k", b"\x00\x00")])
    # two frames cut to the same two bytes: nothing tells a re-send from another broken event
    assert sum(out.reasons.values()) == 5 and out.duplicates == Counter({"unreadable": 1})
    replayed = proc.process([Message(0, 3, b"k", garbled, replay=True)])
    assert sum(replayed.reasons.values()) == 1 and not replayed.duplicates


def test_a_replay_that_lands_is_then_recognised_when_sent_again() -> None:
    ids = identities()
    pr = ids.probe([(0, 1, "e", b"v", False, None)])[0]
    assert ids.verdict(pr) is Verdict.NEW
    ids.remember(pr, dead=True)
    ids.seal()
    pr = ids.probe([(0, 2, "e", b"v", True, None)])[0]
    assert ids.verdict(pr) is Verdict.NEW  # the replay, after a fix
    ids.remember(pr, dead=False)
    ids.seal()
    assert ids.check([(0, 3, "e", b"v")]) == [Verdict.DUPLICATE]
    assert ids.verdict(ids.probe([(0, 4, "e", b"v", True, None)])[0]) is Verdict.DUPLICATE  # landed: not again
