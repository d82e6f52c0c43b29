"""Contracts, registry, compatibility gate and codec."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from schemas import SUBJECT_RECORDS, Codec, DecodeError, IncompatibleSchemaError, Registry
from schemas.codec import ConversionError
from schemas.registry import ROOT, RegistryError, backward_incompatibilities
from tests.avro_examples import example


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


# --- the compatibility gate -------------------------------------------------------------------
def test_contracts_match_their_latest_registered_version() -> None:
    """Editing an .avsc without `yibao schemas register` fails here."""
    assert Registry.load().drift() == []


def test_every_registered_version_reads_the_previous_one() -> None:
    """BACKWARD compatibility of each version with its predecessor, checked by Apache avro."""
    reg = Registry.load()
    for subject in reg.subjects():
        versions = reg.versions(subject)
        for prev, cur in itertools.pairwise(versions):
            assert backward_incompatibilities(reader=cur.schema, writer=prev.schema) == [], (subject, cur.version)


@pytest.fixture()
def scratch_registry(tmp_path: Path) -> Path:
    root = tmp_path / "schemas"
    shutil.copytree(ROOT / "avsc", root / "avsc")
    shutil.copytree(ROOT / "history", root / "history")
    shutil.copy(ROOT / "registry.json", root / "registry.json")
    return root


def _edit(root: Path, rel: str, fn: object) -> None:
    p = root / "avsc" / rel
    s = json.loads(p.read_text())
    fn(s)  # type: ignore[operator]
    p.write_text(json.dumps(s))


def test_adding_a_required_field_is_refused(scratch_registry: Path) -> None:
    _edit(scratch_registry, "settlement/Settlement.avsc",
          lambda s: s["fields"].append({"name": "new_required", "type": "string"}))
    reg = Registry.load(scratch_registry)
    assert reg.drift() == ["settlement"]
    with pytest.raises(IncompatibleSchemaError, match="new_required"):
        reg.register("settlement")


def test_changing_a_field_type_is_refused(scratch_registry: Path) -> None:
    def change(s: dict) -> None:  # type: ignore[type-arg]
        for f in s["fields"]:
            if f["name"] == "source_offset":
                f["type"] = "string"
    _edit(scratch_registry, "pipeline/DeadLetter.avsc", change)
    with pytest.raises(IncompatibleSchemaError):
        Registry.load(scratch_registry).register("deadletter")


def test_compatible_change_gets_a_new_stable_id(scratch_registry: Path) -> None:
    before = Registry.load(scratch_registry)
    max_id = max(sv.id for sv in before.all_versions())
    _edit(scratch_registry, "settlement/Settlement.avsc",
          lambda s: s["fields"].append({"name": "note", "type": ["null", "string"], "default": None}))
    sv = Registry.load(scratch_registry).register("settlement")
    assert sv is not None and sv.id == max_id + 1 and sv.version == 2
    again = Registry.load(scratch_registry)
    assert again.drift() == []
    assert again.by_id(sv.id).version == 2
    assert again.by_subject("yibao.settlement-value").id == sv.id
    assert again.by_subject("yibao.settlement-value", version=1).id == before.latest("settlement").id
    # data written with v1 still decodes with the new registry (old id stays registered)
    old = Codec(before)
    rec = "cn.nhsa.yibao.settlement.CrossProvinceFiling"
    datum = example(old.record_schema(rec), random.Random(1))
    framed = old.encode(rec, datum)
    assert Codec(again).decode(framed).datum == datum


def test_edited_snapshot_is_rejected(scratch_registry: Path) -> None:
    snap = scratch_registry / "history" / "alerts" / "v1.avsc"
    snap.write_text(snap.read_text().replace("Deterministic id", "Random id"))
    with pytest.raises(RegistryError, match="immutable"):
        Registry.load(scratch_registry)


# --- registry lookups -------------------------------------------------------------------------
def test_subjects_and_lookups() -> None:
    reg = Registry.load()
    assert set(reg.subjects()) == set(SUBJECT_RECORDS)
    ids = [sv.id for sv in reg.all_versions()]
    assert len(ids) == len(set(ids))
    for subject, records in SUBJECT_RECORDS.items():
        sv = reg.by_subject(f"yibao.{subject}-value")
        assert sv is reg.by_id(sv.id)
        assert list(sv.records) == records
    with pytest.raises(RegistryError):
        reg.by_subject("yibao.settlement-key")
    with pytest.raises(RegistryError):
        reg.by_id(99_999)


# --- codec ------------------------------------------------------------------------------------
ALL_RECORDS = [r for recs in SUBJECT_RECORDS.values() for r in recs]


@pytest.mark.parametrize("record", ALL_RECORDS)
@pytest.mark.parametrize("nulls", [False, True])
def test_round_trip_every_record(codec: Codec, record: str, nulls: bool) -> None:
    rng = random.Random(hash((record, nulls)) & 0xFFFF)
    for _ in range(20):
        datum = example(codec.record_schema(record), rng, nulls=nulls)
        framed = codec.encode(record, datum)
        assert framed[0] == 0
        dec = codec.decode(framed)
        assert dec.record == record
        assert dec.datum == datum
        assert int.from_bytes(framed[1:5], "big") == Registry.load().latest(codec.subject_of(record)).id
        # raw ↔ logical ↔ bytes agree
        logical = codec.to_logical(record, datum)
        assert codec.encode(record, logical, logical=True) == framed
        assert codec.to_raw(record, logical) == datum
        # JSON round trip
        assert codec.from_json(record, json.loads(json.dumps(codec.to_json(record, datum)))) == datum


def test_logical_values(codec: Codec) -> None:
    rec = "cn.nhsa.yibao.procurement.SupplierPayment"
    raw = {"event_id": "3f1c2a9e-0000-4000-8000-000000000001", "pay_id": "P", "dlv_id": "D",
           "fixmedins_code": "H11010500001", "splr_code": "91110000MA0000000X", "admdvs": "110105",
           "pay_amt": -123456, "pay_time": 1_764_000_000_000}
    logical = codec.decode(codec.encode(rec, raw), logical=True).datum
    assert logical["pay_amt"] == Decimal("-1234.56")
    assert logical["pay_time"] == dt.datetime(2025, 11, 24, 16, 0, tzinfo=dt.UTC)
    js = codec.to_json(rec, raw)
    assert js["pay_amt"] == "-1234.56" and js["pay_time"] == "2025-11-25T00:00:00.000+08:00"


@pytest.mark.parametrize(
    ("value", "message"),
    [("12.345", "more than 2 decimal places"), ("1e20", "exceeds decimal"), ("abc", "not a decimal"),
     (True, "expected a decimal")],
)
def test_json_decimal_errors_name_the_field(codec: Codec, value: object, message: str) -> None:
    obj = codec.to_json("SupplierPayment", {
        "event_id": "3f1c2a9e-0000-4000-8000-000000000001", "pay_id": "P", "dlv_id": "D",
        "fixmedins_code": "H11010500001", "splr_code": "91110000MA0000000X", "admdvs": "110105",
        "pay_amt": 1, "pay_time": 0})
    obj["pay_amt"] = value
    with pytest.raises(ConversionError, match=message) as ei:
        codec.from_json("SupplierPayment", obj)
    assert ei.value.path.endswith(".pay_amt")


def test_json_missing_and_unknown_fields(codec: Codec) -> None:
    with pytest.raises(ConversionError, match="missing required field"):
        codec.from_json("SupplierPayment", {"pay_id": "x"})
    with pytest.raises(ConversionError, match="unknown field"):
        codec.from_json("Tip", {"nonsense": 1})


@pytest.fixture(scope="module")
def framed(codec: Codec) -> bytes:
    rec = "cn.nhsa.yibao.settlement.Settlement"
    return codec.encode(rec, example(codec.record_schema(rec), random.Random(7)))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"", "TRUNCATED_FRAME"),
        (lambda b: b[:3], "TRUNCATED_FRAME"),
        (lambda b: b"\x01" + b[1:], "BAD_MAGIC"),
        (lambda b: b[:1] + (4242).to_bytes(4, "big") + b[5:], "UNKNOWN_SCHEMA_ID"),
        (lambda b: b + b"\x00\x01", "TRAILING_BYTES"),
        (lambda b: b[:-5], "TRUNCATED_BODY|BAD_AVRO"),
        (lambda b: b[:5], "TRUNCATED_BODY|BAD_AVRO"),
    ],
)
def test_decode_errors_have_reasons(codec: Codec, framed: bytes, mutate: object, reason: str) -> None:
    with pytest.raises(DecodeError) as ei:
        codec.decode(mutate(framed))  # type: ignore[operator]
    assert ei.value.reason_code in reason.split("|")


def test_oversized_and_wrong_subject(framed: bytes) -> None:
    with pytest.raises(DecodeError) as ei:
        Codec(max_bytes=100).decode(framed)
    assert ei.value.reason_code == "OVERSIZED"
    with pytest.raises(DecodeError) as ei:
        Codec().decode(framed, subject="procurement")
    assert ei.value.reason_code == "WRONG_SUBJECT"


def test_an_unknown_schema_id_beyond_int32_still_makes_an_encodable_dead_letter(codec: Codec,
                                                                                framed: bytes) -> None:
    """The header's 4 bytes can name ids no Avro int holds; the dead letter must still encode."""
    with pytest.raises(DecodeError) as ei:
        codec.decode(framed[:1] + (0xFFFFFFFE).to_bytes(4, "big") + framed[5:])
    assert ei.value.reason_code == "UNKNOWN_SCHEMA_ID" and "4294967294" in ei.value.detail
    assert ei.value.schema_id is None
    with pytest.raises(DecodeError) as small:
        codec.decode(framed[:1] + (4242).to_bytes(4, "big") + framed[5:])
    assert small.value.schema_id == 4242
