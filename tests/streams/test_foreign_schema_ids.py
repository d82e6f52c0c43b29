"""The ingest path with the shop's registry: an event whose producer registered its own (compatible)
schema lands exactly as the same event framed with the manifest's id; an incompatible one and one
decoded while the registry is down become dead letters with their reasons, and the next batch after
the registry is back lands."""

from __future__ import annotations

import copy
import io
from collections import Counter
from collections.abc import Iterator
from typing import Any

import fastavro
import pytest

from schemas import Codec
from schemas.codec import HEADER, ResolveError
from schemas.registry import Schema
from streams.base import Subsystem
from streams.messages import DEAD_LETTER_TABLE, Message, Outcome
from streams.privacy import Pseudonymizer, Sealer
from streams.processors import BatchProcessor
from streams.topology import MODULES
from streams.validation import Limits
from yibao.settings import Settings
from yibao.sim.generator import SimConfig, SimEvent, TrafficGenerator

from ..harness import default_settings

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
KEY = bytes.fromhex("5a" * 32)
CONFIG = SimConfig(settlements=40, days=5)
LIMITS = Limits(now_ms=CONFIG.end_ms + 86_400_000, max_future_skew_ms=300_000, min_event_ms=0)
COMPATIBLE, INCOMPATIBLE, LATER = 7001, 7002, 7003


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with default_settings(tmp_path_factory.mktemp("cwd")) as s:
        yield s


@pytest.fixture(scope="module")
def settlement(settings: Settings) -> Subsystem:
    return MODULES["settlement"].build(settings.validation(), lambda: LIMITS)


@pytest.fixture(scope="module")
def events() -> list[SimEvent]:
    return [e for e in TrafficGenerator(CONFIG).events() if e.record == SETTLEMENT][:3]


def union_with(change: Any) -> list[dict[str, Any]]:
    union: list[dict[str, Any]] = copy.deepcopy(Codec().registry.latest("settlement").schema)  # type: ignore[arg-type]
    for rec in union:
        if rec["name"] in ("Settlement", SETTLEMENT):
            change(rec)
    return union


def add_field(rec: dict[str, Any]) -> None:
    rec["fields"].append({"name": "his_vendor", "type": ["null", "string"], "default": None})


def amount_as_text(rec: dict[str, Any]) -> None:
    for f in rec["fields"]:
        if f["name"] == "medfee_sumamt":
            f["type"] = "string"


def framed(codec: Codec, writer: Schema, schema_id: int, ev: SimEvent, **extra: Any) -> bytes:
    logical = {**codec.to_logical(SETTLEMENT, ev.datum), **extra}
    buf = io.BytesIO()
    buf.write(HEADER.pack(0, schema_id))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), (SETTLEMENT, logical))
    return buf.getvalue()


def processor(settlement: Subsystem, codec: Codec) -> BatchProcessor:
    return BatchProcessor(settlement, codec, Pseudonymizer(KEY, "t1"), Sealer(KEY, "t1"), "yibao.settlement",
                          lambda: LIMITS)


def tables_without_dead_letters(out: Outcome) -> dict[str, Any]:
    return {t: cols for t, cols in out.tables.items() if t != DEAD_LETTER_TABLE}


def test_a_producers_own_compatible_schema_lands_like_the_contract(settlement: Subsystem,
                                                                   events: list[SimEvent]) -> None:
    ev = events[0]
    writer = union_with(add_field)

    def resolve(sid: int) -> Schema:
        if sid != COMPATIBLE:
            raise ResolveError("UNKNOWN_SCHEMA_ID", "not held")
        return writer

    codec = Codec(resolver=resolve)
    theirs = processor(settlement, codec).process(
        [Message(0, 5, ev.key.encode(), framed(codec, writer, COMPATIBLE, ev, his_vendor="HIS-9"))])
    ours = processor(settlement, Codec()).process([Message(0, 5, ev.key.encode(), codec.encode(SETTLEMENT, ev.datum))])
    assert theirs.landed == ours.landed == Counter({"Settlement": 1})
    assert not theirs.dead
    assert tables_without_dead_letters(theirs) == tables_without_dead_letters(ours)


def test_incompatible_and_unreachable_become_dead_letters_and_a_later_batch_lands(settlement: Subsystem,
                                                                                events: list[SimEvent]) -> None:
    good, bad = union_with(add_field), union_with(amount_as_text)
    registry: dict[int, Schema | ResolveError] = {
        COMPATIBLE: good, INCOMPATIBLE: bad,
        LATER: ResolveError("REGISTRY_UNAVAILABLE", "schema registry at http://sr:8081 cannot be reached: "
                                                    "Connection refused")}

    def resolve(sid: int) -> Schema:
        got = registry.get(sid, ResolveError("UNKNOWN_SCHEMA_ID", "not held"))
        if isinstance(got, ResolveError):
            raise got
        return got

    now = [0.0]
    codec = Codec(resolver=resolve, retry_after_s=10, clock=lambda: now[0])
    p = processor(settlement, codec)
    first = [
        Message(0, 0, b"k0", framed(codec, good, COMPATIBLE, events[0])),
        Message(0, 1, b"k1", framed(codec, bad, INCOMPATIBLE, events[1], medfee_sumamt="12.30")),
        Message(0, 2, b"k2", framed(codec, good, LATER, events[2])),
    ]
    out = p.process(first)
    assert out.landed == Counter({"Settlement": 1})
    assert out.reasons == Counter({"INCOMPATIBLE_SCHEMA": 1, "REGISTRY_UNAVAILABLE": 1})
    by_reason = {d["reason_code"]: d for d in out.dead}
    assert by_reason["INCOMPATIBLE_SCHEMA"]["schema_id"] == INCOMPATIBLE
    assert "medfee_sumamt" in by_reason["INCOMPATIBLE_SCHEMA"]["reason_detail"]
    assert by_reason["REGISTRY_UNAVAILABLE"]["schema_id"] == LATER
    assert "Connection refused" in by_reason["REGISTRY_UNAVAILABLE"]["reason_detail"]

    registry[LATER] = good  # the registry answers again; a new batch after the retry window lands
    now[0] = 11.0
    again = p.process([Message(0, 3, b"k2", framed(codec, good, LATER, events[2]))])
    assert again.landed == Counter({"Settlement": 1}) and not again.dead
