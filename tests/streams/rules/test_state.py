"""Keyed detector state: the changelog drain, and state that survives a JSON round trip (a restore)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streams.rules.engine import WATERMARK_KEY
from streams.rules.state import CHUNK_BYTES, ChangelogLost, Replay, Store

from .builders import (
    AMLODIPINE,
    CBC,
    HBA1C,
    OUTPATIENT_CONSULT,
    GroupedRig,
    Rig,
    hospital,
    line,
    month_ms,
    ms,
    reversal,
    settlement,
    stay_value,
    token,
)

# --- Store.drain ---------------------------------------------------------------------------------------


def test_drain_emits_every_dirty_key_once_as_compact_json() -> None:
    s = Store("person", "t")
    s.put(0, "a", {"o": 1, "name": "张三"})
    s.put(0, "b", {"o": 2})
    s.put(1, "a", {"o": 3})
    s.put(0, "a", {"o": 4, "name": "张三"})  # written twice, drained once
    assert sorted(s.drain()) == [(0, b"a", '{"o":4,"name":"张三"}'.encode()), (0, b"b", b'{"o":2}'),
                                 (1, b"a", b'{"o":3}')]
    assert s.drain() == []
    assert s.keys() == 3


def test_drain_emits_only_keys_changed_since_the_last_drain() -> None:
    s = Store("person", "t")
    for k in "abc":
        s.put(0, k, {"o": 0})
    s.drain()
    s.put(0, "b", {"o": 1})
    assert s.drain() == [(0, b"b", b'{"o":1}')]


def test_drain_emits_a_tombstone_for_a_deleted_key() -> None:
    s = Store("person", "t")
    s.put(0, "a", {"o": 1})
    s.put(0, "b", {"o": 1})
    s.drain()
    s.delete(0, "a")
    s.delete(0, "never-there")  # nothing to delete: nothing to write
    s.delete(5, "a")
    assert s.drain() == [(0, b"a", None)]
    assert s.get(0, "a") is None and s.get(0, "b") == {"o": 1}


def test_a_key_put_then_deleted_before_a_drain_is_a_tombstone() -> None:
    s = Store("person", "t")
    s.put(0, "a", {"o": 1})
    s.delete(0, "a")
    assert s.drain() == [(0, b"a", None)]


def test_forget_drops_the_partitions_data_and_pending_writes() -> None:
    s = Store("person", "t")
    s.put(0, "a", {"o": 1})
    s.put(1, "b", {"o": 1})
    s.forget([0])
    assert s.get(0, "a") is None
    assert s.drain() == [(1, b"b", b'{"o":1}')]


# --- the engine's state through a changelog ---------------------------------------------------------

def restore(records: list[tuple[int, bytes, bytes | None]], name: str = "person") -> Store:
    """What state.restore rebuilds from the changelog records (in order; None deletes)."""
    replays: dict[int, Replay] = {}
    for p, k, v in records:
        replays.setdefault(p, Replay()).apply(k, v)
    s = Store(name, "t")
    for p, r in replays.items():
        s.data[p], s.chunks[p] = r.data, r.chunks
    return s


# --- values too large for one changelog record ---------------------------------------------------------

def big(n: int, tag: str = "x") -> dict[str, Any]:
    return {"o": n, "seen": {f"{tag}{i:08d}": [202404, i % 2, i * 7] for i in range(n)}}


def test_a_large_value_goes_out_in_chunks_no_record_over_the_limit_and_restores_whole() -> None:
    s = Store("hospital", "t")
    value = big(60_000)
    s.put(3, "H11000000001", value)
    s.put(3, "H11000000002", {"o": 1})
    records = s.drain()
    assert all(len(k) + len(v or b"") <= CHUNK_BYTES + 100 for _, k, v in records)
    chunks = [k for _, k, _ in records if b"\x00" in k]
    assert len(chunks) == -(-len(json.dumps(value, separators=(",", ":"))) // CHUNK_BYTES) >= 3
    keys = [k for _, k, _ in records]
    assert keys.index(b"H11000000001") > max(keys.index(c) for c in chunks)  # manifest after its chunks
    assert restore(records).data == s.data


def test_a_chunked_value_replaced_tombstones_its_old_chunks_and_a_crash_before_the_manifest_keeps_the_old() -> None:
    s = Store("hospital", "t")
    s.put(0, "H", big(60_000, "a"))
    first = s.drain()
    s.put(0, "H", big(61_000, "b"))
    second = s.drain()
    old_chunks = {k for _, k, v in first if b"\x00" in k}
    assert {k for _, k, v in second if v is None} == old_chunks  # tombstoned, after the new manifest
    assert restore(first + second).data == {0: {"H": big(61_000, "b")}}
    new_chunks = [r for r in second if b"\x00" in r[1] and r[2] is not None]
    assert restore(first + new_chunks).data == {0: {"H": big(60_000, "a")}}  # crashed before the manifest
    s.put(0, "H", {"o": 9})  # small again: its chunks are tombstoned
    third = s.drain()
    assert (third[0][1], third[0][2]) == (b"H", b'{"o":9}')
    assert {k for _, k, v in third[1:] if v is None} == {k for _, k, v in new_chunks}
    restored = restore(first + second + third)
    assert restored.data == {0: {"H": {"o": 9}}} and restored.chunks == {0: {}}
    s.delete(0, "H")
    assert s.drain() == [(0, b"H", None)]


def test_a_restored_store_tombstones_the_chunks_it_restored_when_the_value_changes() -> None:
    s = Store("hospital", "t")
    s.put(0, "H", big(60_000))
    first = s.drain()
    again = restore(first)
    again.put(0, "H", {"o": 1})
    assert {k for _, k, v in again.drain() if v is None} == {k for _, k, _ in first if b"\x00" in k}


def test_a_manifest_whose_chunk_is_missing_names_the_lost_changelog() -> None:
    s = Store("hospital", "t")
    s.put(0, "H", big(60_000))
    records = s.drain()
    with pytest.raises(ChangelogLost, match="chunk"):
        restore(records[1:])


def history() -> list[dict[str, Any]]:
    return [
        settlement("V1", ms(0, 8), [line(OUTPATIENT_CONSULT)], h=hospital(1)),
        settlement("V2", ms(0, 9), [line(OUTPATIENT_CONSULT), line(HBA1C)], h=hospital(2)),
        settlement("V3", ms(0, 10), [line(OUTPATIENT_CONSULT)], h=hospital(3)),  # SHOP-1D fires
        settlement("A", ms(1), [line(AMLODIPINE, 20)]),
    ]


def future() -> list[dict[str, Any]]:
    return [
        settlement("V4", ms(0, 11), [line(OUTPATIENT_CONSULT)], h=hospital(4)),  # the same day: no new alert
        settlement("B", ms(5), [line(AMLODIPINE, 20), line(HBA1C)]),  # OVERRX and RETEST fire
        reversal(history()[2], t=ms(6)),  # V3: SHOP-1D still holds (V1, V2, V4)
        reversal(history()[3], t=ms(7)),  # A: OVERRX retracted
    ]


def test_person_state_is_plain_json() -> None:
    rig = Rig()
    rig.each(history())
    st = rig.store.get(0, token())
    assert json.loads(json.dumps(st)) == st
    assert st["o"] == 3
    assert [e["s"] for e in st["tl"]] == ["V1", "V2", "V3", "A"]


def test_changelog_holds_tokens_never_the_clear_person_number() -> None:
    rig = Rig()
    rig.each(history())
    records = rig.store.drain()
    assert sorted(k for _, k, _ in records) == [WATERMARK_KEY.encode(), token().encode()]
    assert all(b"PSN001" not in (v or b"") and b"cert-" not in (v or b"") for _, _, v in records)


def test_a_restored_engine_continues_exactly_like_the_uninterrupted_one() -> None:
    straight = Rig()
    straight.each(history())
    expected = [straight.alerts(d) for d in future()]
    assert [[(a["rule_id"], a["status"]) for a in batch] for batch in expected] == [
        [], [("YB-PSN-OVERRX", "FIRED"), ("YB-PSN-RETEST", "FIRED")], [], [("YB-PSN-OVERRX", "RETRACTED")]]

    first = Rig()
    first.each(history())
    changelog = first.store.drain()
    second = Rig()
    second.store.data = restore(changelog).data
    second.engine.restored(0)
    second.next_offset = dict(first.next_offset)
    assert second.engine.watermark == first.engine.watermark
    assert [second.alerts(d) for d in future()] == expected
    assert second.store.get(0, token()) == straight.store.get(0, token())


def test_a_restored_engine_skips_what_was_already_applied() -> None:
    first = Rig()
    first.each(history())
    second = Rig()
    second.store.data = restore(first.store.drain()).data
    second.engine.restored(0)
    for offset, d in enumerate(history()):  # the uncommitted tail redelivered after a crash
        out = second.send(d, offset=offset)
        assert (out.alerts, out.skipped) == ([], 1)
    assert second.store.drain() == []


def test_late_decisions_survive_a_restore() -> None:
    first = Rig(lateness_days=35)
    first.each([settlement("S1", ms(10), [line(HBA1C)]), settlement("W", ms(60), [line(CBC)], psn="PSN999")])
    second = Rig(lateness_days=35)
    second.store.data = restore(first.store.drain()).data
    second.engine.restored(0)
    second.next_offset = dict(first.next_offset)
    assert second.send(settlement("S2", ms(20), [line(HBA1C)])).late == 1


def test_timeline_and_fired_alerts_are_pruned_as_time_passes() -> None:
    rig = Rig()
    rig.each(history())
    rig.store.drain()
    rig.send(settlement("LATER", ms(400), [line(CBC)]))
    st = rig.store.get(0, token())
    assert [e["s"] for e in st["tl"]] == ["LATER"]
    assert st["f"] == {} and st["ep"] == {}
    [(partition, key, v)] = [r for r in rig.store.drain() if r[1] != WATERMARK_KEY.encode()]
    assert (partition, key) == (0, token().encode())
    assert v is not None and json.loads(v) == st


def test_grouped_state_survives_a_restore() -> None:
    def month(m: int, high: int) -> list[bytes]:
        return [stay_value(f"{m}-{i}", month_ms(m, 1 + i % 28), drg="ES21" if i < high else "ES25")
                for i in range(30)]

    first = GroupedRig("hospital")
    for m in (202401, 202402, 202403):
        first.send(*month(m, 6))
    second = GroupedRig("hospital")
    second.store.data = restore(first.store.drain(), "hospital").data
    second.offset = first.offset
    april = month(202404, 15)
    [a] = second.alerts(*april)
    assert [a] == first.alerts(*april)
    assert second.store.data == first.store.data
    assert second.alerts(*april) == []  # the same stays again: already seen
