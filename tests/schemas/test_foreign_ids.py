"""Events framed with schema ids outside the manifest: producers that registered their own schema in
the shop's registry. The codec fetches the writer schema once (through its resolver), accepts it only
when the pipeline's contract for the subject can read it, and decodes into that contract."""

from __future__ import annotations

import copy
import io
import random
from typing import Any

import fastavro
import pytest

from schemas import Codec
from schemas.codec import HEADER, DecodeError, ResolveError, unreadable_by
from schemas.registry import Schema
from schemas.registry_client import RemoteSchema, schema_resolver
from tests.avro_examples import example

NS = "cn.nhsa.yibao.settlement"
SETTLEMENT = f"{NS}.Settlement"
FOREIGN_ID = 9001
BASE = Codec()
CONTRACT: list[dict[str, Any]] = copy.deepcopy(BASE.registry.latest("settlement").schema)  # type: ignore[arg-type]


def settlement_record() -> dict[str, Any]:
    return copy.deepcopy(next(r for r in CONTRACT if r["name"] == "Settlement" or r["name"] == SETTLEMENT))


def with_extra_field(rec: dict[str, Any]) -> dict[str, Any]:
    rec["fields"].append({"name": "vendor_batch", "type": ["null", "string"], "default": None})
    return rec


def extended_union() -> list[dict[str, Any]]:
    """The topic's union as a producer re-registered it, its Settlement with one more field."""
    return [with_extra_field(copy.deepcopy(r)) if r["name"] in ("Settlement", SETTLEMENT) else copy.deepcopy(r)
            for r in CONTRACT]


def raw_settlement(seed: int = 7) -> dict[str, Any]:
    return example(BASE.record_schema(SETTLEMENT), random.Random(seed))


def frame(writer: Schema, schema_id: int, raw: dict[str, Any], extra: dict[str, Any] | None = None,
          *, union: bool) -> bytes:
    """What the producer's serializer writes: the Confluent header, then the datum in ``writer``."""
    logical = {**BASE.to_logical(SETTLEMENT, raw), **(extra or {})}
    buf = io.BytesIO()
    buf.write(HEADER.pack(0, schema_id))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), (SETTLEMENT, logical) if union else logical)
    return buf.getvalue()


class Resolver:
    """A registry stand-in that counts lookups; ``answers`` maps id -> schema or ResolveError."""

    def __init__(self, answers: dict[int, Schema | ResolveError]) -> None:
        self.answers = answers
        self.calls: list[int] = []

    def __call__(self, schema_id: int) -> Schema:
        self.calls.append(schema_id)
        got = self.answers.get(schema_id, ResolveError("UNKNOWN_SCHEMA_ID", f"{schema_id} not held"))
        if isinstance(got, ResolveError):
            raise got
        return got


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("union", [True, False], ids=["topic-union", "record-only"])
def test_compatible_foreign_schema_is_decoded_into_the_contract(union: bool) -> None:
    writer: Schema = extended_union() if union else with_extra_field(settlement_record())
    resolver = Resolver({FOREIGN_ID: writer})
    codec = Codec(resolver=resolver)
    raw = raw_settlement()
    value = frame(writer, FOREIGN_ID, raw, {"vendor_batch": "B-2026-17"}, union=union)

    got = codec.decode(value, subject="settlement")
    mine = codec.decode(codec.encode(SETTLEMENT, raw), subject="settlement")
    assert (got.schema_id, got.subject, got.record) == (FOREIGN_ID, "settlement", SETTLEMENT)
    assert got.datum == mine.datum  # the contract's fields and raw values, the producer's extra field gone
    assert "vendor_batch" not in got.datum
    assert codec.decode(value, subject="settlement", logical=True).datum == \
        codec.decode(codec.encode(SETTLEMENT, raw), subject="settlement", logical=True).datum
    codec.decode(value, subject="settlement")
    assert resolver.calls == [FOREIGN_ID]  # fetched once, then cached


def test_a_writer_missing_a_contract_field_is_incompatible_and_names_it() -> None:
    rec = settlement_record()
    rec["fields"] = [f for f in rec["fields"] if f["name"] != "hifp_pay"]
    resolver = Resolver({FOREIGN_ID: rec})
    codec = Codec(resolver=resolver, clock=Clock())
    value = _frame_plain(rec, raw_settlement())
    for _ in range(2):
        with pytest.raises(DecodeError) as ei:
            codec.decode(value, subject="settlement")
        assert ei.value.reason_code == "INCOMPATIBLE_SCHEMA"
        assert ei.value.schema_id == FOREIGN_ID
        assert "hifp_pay" in ei.value.detail
    assert resolver.calls == [FOREIGN_ID]  # an id's schema never changes: the refusal is kept


def _frame_plain(writer: dict[str, Any], raw: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    buf.write(HEADER.pack(0, FOREIGN_ID))
    names = {f["name"] for f in writer["fields"]}
    logical = {k: v for k, v in BASE.to_logical(SETTLEMENT, raw).items() if k in names}
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), logical)
    return buf.getvalue()


def test_a_decimal_of_another_scale_is_incompatible_although_avro_would_resolve_it() -> None:
    rec = settlement_record()
    for f in rec["fields"]:
        if f["name"] == "medfee_sumamt":
            f["type"] = {**f["type"], "scale": 3}
    # Avro's own rules let it through: the amounts would land ten times too large
    assert unreadable_by(CONTRACT, rec) == [
        f"{SETTLEMENT}.medfee_sumamt: written as decimal(16,3), the contract reads decimal(16,2)"]
    codec = Codec(resolver=Resolver({FOREIGN_ID: rec}))
    with pytest.raises(DecodeError) as ei:
        codec.decode(HEADER.pack(0, FOREIGN_ID) + b"\x00", subject="settlement")
    assert ei.value.reason_code == "INCOMPATIBLE_SCHEMA" and "medfee_sumamt" in ei.value.detail


def test_a_foreign_schema_is_checked_against_the_subject_of_the_topic() -> None:
    writer = extended_union()
    codec = Codec(resolver=Resolver({FOREIGN_ID: writer}))
    value = frame(writer, FOREIGN_ID, raw_settlement(), union=True)
    with pytest.raises(DecodeError) as ei:
        codec.decode(value, subject="procurement")
    assert ei.value.reason_code == "INCOMPATIBLE_SCHEMA"
    assert "procurement" in ei.value.detail
    assert codec.decode(value, subject="settlement").record == SETTLEMENT
    assert codec.decode(value).subject == "settlement"  # no subject given: the one whose contract reads it


def test_registry_down_is_a_reason_and_a_later_batch_is_decoded() -> None:
    writer = extended_union()
    resolver = Resolver({FOREIGN_ID: ResolveError("REGISTRY_UNAVAILABLE", "registry at http://sr:8081: timed out")})
    clock = Clock()
    codec = Codec(resolver=resolver, retry_after_s=10, clock=clock)
    value = frame(writer, FOREIGN_ID, raw_settlement(), union=True)

    with pytest.raises(DecodeError) as ei:
        codec.decode(value, subject="settlement")
    assert (ei.value.reason_code, ei.value.schema_id) == ("REGISTRY_UNAVAILABLE", FOREIGN_ID)
    assert "timed out" in ei.value.detail
    clock.now += 5  # the rest of the batch does not wait for the registry again
    with pytest.raises(DecodeError):
        codec.decode(value, subject="settlement")
    assert resolver.calls == [FOREIGN_ID]

    resolver.answers[FOREIGN_ID] = writer  # the registry is back
    clock.now += 6
    assert codec.decode(value, subject="settlement").record == SETTLEMENT
    assert resolver.calls == [FOREIGN_ID, FOREIGN_ID]


def test_after_an_outage_no_id_is_asked_for_until_the_retry_time() -> None:
    """Each lookup blocks the worker up to the registry's timeout: one per outage window, not one per id."""
    down = ResolveError("REGISTRY_UNAVAILABLE", "schema registry at http://sr:8081 cannot be reached: timed out",
                        outage=True)
    resolver = Resolver({1001: down, 1002: down})
    clock = Clock()
    codec = Codec(resolver=resolver, retry_after_s=10, clock=clock)
    body = frame(extended_union(), 1, raw_settlement(), union=True)[5:]
    for sid in (1001, 1002):
        with pytest.raises(DecodeError) as ei:
            codec.decode(HEADER.pack(0, sid) + body, subject="settlement")
        assert ei.value.reason_code == "REGISTRY_UNAVAILABLE" and "timed out" in ei.value.detail
    assert resolver.calls == [1001]
    resolver.answers[1002] = extended_union()
    clock.now += 10
    assert codec.decode(HEADER.pack(0, 1002) + body, subject="settlement").schema_id == 1002
    assert resolver.calls == [1001, 1002]


def test_an_id_the_registry_does_not_hold_stays_unknown() -> None:
    codec = Codec(resolver=Resolver({}))
    value = frame(extended_union(), 4242, raw_settlement(), union=True)
    with pytest.raises(DecodeError) as ei:
        codec.decode(value, subject="settlement")
    assert (ei.value.reason_code, ei.value.schema_id) == ("UNKNOWN_SCHEMA_ID", 4242)


def test_lookups_are_capped_per_window() -> None:
    resolver = Resolver({})
    clock = Clock()
    codec = Codec(resolver=resolver, retry_after_s=10, max_lookups=2, clock=clock)
    body = frame(extended_union(), 1, raw_settlement(), union=True)[5:]
    for sid in (100, 101, 102):
        with pytest.raises(DecodeError) as ei:
            codec.decode(HEADER.pack(0, sid) + body, subject="settlement")
        assert ei.value.reason_code == "UNKNOWN_SCHEMA_ID"
    assert resolver.calls == [100, 101]
    assert "not looked up" in ei.value.detail
    clock.now += 11
    with pytest.raises(DecodeError):
        codec.decode(HEADER.pack(0, 103) + body, subject="settlement")
    assert resolver.calls == [100, 101, 103]


def test_manifest_ids_never_ask_the_registry() -> None:
    resolver = Resolver({})
    codec = Codec(resolver=resolver)
    raw = raw_settlement()
    assert codec.decode(codec.encode(SETTLEMENT, raw), subject="settlement").datum == \
        BASE.decode(BASE.encode(SETTLEMENT, raw)).datum
    assert resolver.calls == []


class _Client:
    """A client answering one schema id with a given RemoteSchema (the HTTP side is tested elsewhere)."""

    base = "http://sr.test:8081"

    def __init__(self, remote: RemoteSchema) -> None:
        self.remote = remote
        self.calls = 0

    def schema_by_id(self, schema_id: int) -> RemoteSchema:
        self.calls += 1
        return self.remote


@pytest.mark.parametrize(("remote", "needle"), [
    (RemoteSchema(FOREIGN_ID, "PROTOBUF", 'syntax = "proto3";', 'syntax = "proto3";'), "PROTOBUF"),
    (RemoteSchema(FOREIGN_ID, "AVRO", {"type": "string"}, '"string"',
                  ({"name": "x", "subject": "s", "version": 1},)), "references"),
])
def test_schemas_the_pipeline_cannot_use_are_refused_for_good(remote: RemoteSchema, needle: str) -> None:
    client = _Client(remote)
    clock = Clock()
    codec = Codec(resolver=schema_resolver(client), clock=clock)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(DecodeError) as ei:
            codec.decode(HEADER.pack(0, FOREIGN_ID) + b"\x02", subject="settlement")
        assert ei.value.reason_code == "INCOMPATIBLE_SCHEMA" and needle in ei.value.detail
        clock.now += 3600
    assert client.calls == 1
