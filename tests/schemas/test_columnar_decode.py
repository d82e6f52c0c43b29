"""The columnar decoder (schemas.columnar_decode) returns exactly what fastavro decodes, or None.

Datums are drawn by hypothesis from each record's schema (extremes included); on failure hypothesis
prints the falsifying example and, with ``print_blob=True``, the ``@reproduce_failure`` blob that
replays it. Hostile bodies (flipped, truncated, inserted and trailing bytes) may come back as None
for any reason, but a frame must equal what ``Codec.decode`` makes of every body.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import schemas
from schemas import SUBJECT_RECORDS, Codec, DecodeError
from schemas.codec import _strip_logical, compile_unscaler
from schemas.columnar import raw_polars_schema
from schemas.columnar_decode import ArrowDecoder
from tests.avro_examples import example

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
RECORDS = [r for s in ("settlement", "procurement", "supervision") for r in SUBJECT_RECORDS[s]]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
ROOT = Path(schemas.__file__).resolve().parent.parent
SETTINGS = settings(print_blob=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec(max_bytes=1 << 26)  # long strings in several fields exceed the 1 MB a topic takes


@pytest.fixture(scope="module")
def decoder() -> Iterator[ArrowDecoder]:
    with ArrowDecoder(timeout_s=5.0) as d:
        yield d


@pytest.fixture(scope="module")
def quick() -> Iterator[ArrowDecoder]:
    """A decoder with a short deadline, for bodies that may make arrow-avro spin."""
    with ArrowDecoder(timeout_s=0.5, cooldown_s=0.0) as d:
        yield d


# --- a schema-driven strategy of raw datums ------------------------------------------------------
def _bounded(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([lo, hi, 0, -1, 1]), st.integers(lo, hi))


def _rarely(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``rare`` about one time in 40: a gate draw, whose shrinking leads back to ``common``."""
    return st.integers(0, 39).flatmap(lambda n: rare if n == 23 else common)


SHORT_STRINGS: st.SearchStrategy[str] = st.one_of(
    st.text(max_size=24),  # any code point but surrogates: control characters included
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=12),  # CJK
    st.text(st.characters(max_codepoint=0x1F), max_size=6),  # NUL and other C0 controls
    st.sampled_from(["", "H44030500001", "结算", "\x00", "\U0001f600"]),
)
#: Now and then 100-130 kB (up to 520 kB of UTF-8): messages stay under the codec's 1 MB limit.
STRINGS = _rarely(SHORT_STRINGS, st.builds(lambda c, n: c * n, st.sampled_from(["x", "结", "\x01", "\U0001f600"]),
                                           st.integers(100_000, 130_000)))


def datums(schema: Any, named: dict[str, Any] | None = None, *, big: bool = True) -> st.SearchStrategy[Any]:
    """Raw datums (as Codec.decode returns them) of ``schema``; ``big``: long strings and arrays too."""
    named = {} if named is None else named
    if isinstance(schema, list):
        options = [datums(s, named, big=big) for s in schema if s != "null"]
        return st.one_of(st.none(), *options) if "null" in schema else st.one_of(*options)
    if isinstance(schema, str):
        if schema in named:
            return datums(named[schema], named, big=big)
        schema = {"type": schema}
    t = schema["type"]
    if isinstance(t, dict | list):
        return datums(t, named, big=big)
    strings = STRINGS if big else SHORT_STRINGS
    if t in ("record", "enum"):
        named[schema["name"]] = schema
        if "namespace" in schema:
            named[f"{schema['namespace']}.{schema['name']}"] = schema
    lt = schema.get("logicalType")
    if lt == "decimal":
        limit = 10 ** int(schema["precision"]) - 1
        return _bounded(-limit, limit)
    if lt == "timestamp-millis":
        return _bounded(*INT64)
    if lt == "date":
        return _bounded(*INT32)
    if lt == "uuid":
        return st.one_of(st.uuids().map(str), strings)
    if t == "record":
        return st.fixed_dictionaries({f["name"]: datums(f["type"], named, big=big) for f in schema["fields"]})
    if t == "enum":
        return st.sampled_from(schema["symbols"])
    if t == "array":
        items = datums(schema["items"], named, big=big)
        if not big:
            return st.lists(items, max_size=4)
        long = st.builds(lambda x, n: [x] * n, datums(schema["items"], named, big=False), st.integers(100, 400))
        return _rarely(st.lists(items, max_size=4), long)
    simple: dict[str, st.SearchStrategy[Any]] = {
        "string": strings, "int": _bounded(*INT32), "long": _bounded(*INT64), "boolean": st.booleans(),
    }
    if t in simple:
        return simple[t]
    raise NotImplementedError(f"no strategy for {schema!r}")


def framed(codec: Codec, record: str, datum: dict[str, Any]) -> tuple[bytes, bytes]:
    """(Confluent header + union branch index, Avro body) of ``datum``."""
    record = codec.resolve_record(record)
    msg = codec.encode(record, datum)
    subject = codec.subject_of(record)
    sv = codec.registry.latest(subject)
    prefix = msg[:5]
    if sv.is_union:
        index = list(sv.records).index(record)
        prefix += bytes([index << 1])  # a zig-zag varint: one byte below 64 branches
    assert msg.startswith(prefix)
    return prefix, msg[len(prefix):]


def fastavro_raw(schema: dict[str, Any], body: bytes) -> dict[str, Any]:
    """What Codec.decode makes of ``body`` for a schema outside the registry (the same recipe)."""
    buf = io.BytesIO(body)
    datum: Any = fastavro.schemaless_reader(buf, fastavro.parse_schema(_strip_logical(schema, False)), None)
    if buf.tell() != len(body):
        raise DecodeError("TRAILING_BYTES", "")
    unscale = compile_unscaler(schema)
    if unscale is not None:
        unscale(datum)
    assert isinstance(datum, dict)
    return datum


def gone(pid: int) -> bool:
    """No such process (or only its zombie, when PID 1 of a container does not reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


# --- 1. equivalence -------------------------------------------------------------------------------
@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.rsplit(".", 1)[-1])
def test_frames_equal_what_fastavro_decodes(record: str, codec: Codec, decoder: ArrowDecoder) -> None:
    schema = codec.record_schema(record)

    @settings(SETTINGS, max_examples=20)
    @given(st.lists(datums(schema), min_size=1, max_size=5))
    def check(batch: list[dict[str, Any]]) -> None:
        msgs = [framed(codec, record, d) for d in batch]
        expected = [codec.decode(prefix + body).datum for prefix, body in msgs]
        assert expected == batch  # the strategy draws raw datums as the codec returns them
        frame = decoder.decode(schema, [memoryview(body) for _, body in msgs])
        assert frame is not None, decoder.last_error
        assert frame.schema == raw_polars_schema(schema)
        assert frame.to_dicts() == expected

    check()


def test_a_batch_of_real_settlements(codec: Codec, decoder: ArrowDecoder) -> None:
    from yibao.bench import _settlements

    msgs = [f.value for f in _settlements(300, 7, 10.0)[0] if f.value is not None]
    schema = codec.record_schema("Settlement")
    frame = decoder.decode(schema, [m[6:] for m in msgs])  # 5 header bytes, the union index
    assert frame is not None, decoder.last_error
    assert frame.to_dicts() == [codec.decode(m).datum for m in msgs]


def test_no_bodies_is_an_empty_frame_and_an_unsupported_schema_is_none(decoder: ArrowDecoder) -> None:
    rec = {"type": "record", "name": "M", "fields": [{"name": "m", "type": {"type": "map", "values": "long"}}]}
    ok = {"type": "record", "name": "L", "fields": [{"name": "x", "type": "long"}]}
    failures = decoder.failures
    empty = decoder.decode(ok, [])
    assert empty is not None and empty.height == 0 and empty.schema == raw_polars_schema(ok)
    assert decoder.decode(rec, [b"\x00"]) is None
    assert decoder.failures == failures + 1


# --- 2. soundness under hostile bytes -------------------------------------------------------------
MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "trail"]),
              st.integers(0, 10**6), st.binary(min_size=1, max_size=3)),
    min_size=1, max_size=3,
)


def mutate(body: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    b = bytearray(body)
    for kind, at, extra in ops:
        pos = at % (len(b) + 1)
        if kind == "flip" and b:
            b[pos % len(b)] ^= extra[0] or 0xFF
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = extra
        elif kind == "trail":
            b += extra
    return bytes(b)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.rsplit(".", 1)[-1])
def test_a_frame_of_hostile_bodies_is_what_fastavro_makes_of_them(record: str, codec: Codec,
                                                                  quick: ArrowDecoder) -> None:
    schema = codec.record_schema(record)

    @settings(SETTINGS, max_examples=12)
    @given(st.lists(datums(schema), min_size=1, max_size=3), st.data())
    def check(batch: list[dict[str, Any]], data: st.DataObject) -> None:
        msgs = [framed(codec, record, d) for d in batch]
        victim = data.draw(st.integers(0, len(msgs) - 1), label="victim")
        ops = data.draw(MUTATIONS, label="mutations")
        prefix, body = msgs[victim]
        msgs[victim] = (prefix, mutate(body, ops))
        frame = quick.decode(schema, [body for _, body in msgs])
        note(f"frame: {frame is not None}; last error: {quick.last_error}")
        if frame is None:
            return
        assert frame.to_dicts() == [codec.decode(prefix + body).datum for prefix, body in msgs]

    check()


def test_union_enum_and_varint_leniencies(decoder: ArrowDecoder) -> None:
    """Where fastavro and arrow-avro read the same bytes differently, the decoder refuses the body."""
    rec = {"type": "record", "name": "T", "fields": [
        {"name": "s", "type": ["null", "string"]},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "a", "type": {"type": "array", "items": "long"}},
        {"name": "d", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 16, "scale": 2}]},
    ]}
    tail = b"\x00\x01\x02\x00\x00"  # e=A, b=True, i=1, a=[], d=null

    def agree(body: bytes) -> None:
        frame = decoder.decode(rec, [body])
        assert frame is not None, decoder.last_error
        assert frame.to_dicts() == [fastavro_raw(rec, body)]

    def refused(body: bytes) -> None:
        assert decoder.decode(rec, [body]) is None

    agree(b"\x00" + tail)
    agree(b"\x02\x02x" + tail)
    # fastavro indexes the branches Python-style; arrow-avro's reader of [null, T] takes any tag but 0
    # for T; the helper's general-union reading refuses all of these
    assert fastavro_raw(rec, b"\x01\x02x" + tail)["s"] == "x"  # index -1
    refused(b"\x01\x02x" + tail)
    assert fastavro_raw(rec, b"\x03" + tail)["s"] is None  # index -2
    refused(b"\x03" + tail)
    refused(b"\x04\x02x" + tail)  # index 2: fastavro raises IndexError
    refused(b"\x06\x02x" + tail)
    assert fastavro_raw(rec, b"\x00\x01\x01\x02\x00\x00")["e"] == "C"  # enum index -1, Python-style
    refused(b"\x00\x01\x01\x02\x00\x00")  # ... which arrow refuses
    refused(b"\x00\x06\x01\x02\x00\x00")  # out of range for both
    agree(b"\x00\x00\x02\x02\x00\x00")  # boolean byte 2: true for both
    agree(b"\x00\x00\x01\xff\xff\xff\xff\x0f\x00\x00")  # int -2**31 in five bytes
    refused(b"\x00\x00\x01\x80\x80\x80\x80\x10\x00\x00")  # 2**31: fastavro reads it, no Int32 holds it
    agree(b"\x00\x00\x01\x82\x80\x00\x00\x00")  # a non-minimal varint: both read 1
    refused(b"\x00\x00\x01" + b"\x80" * 10 + b"\x00\x00\x00")  # 11 varint bytes: fastavro reads 0
    agree(b"\x00\x00\x01\x02\x03\x04\x02\x04\x00\x00")  # an array block of -2 items with its byte size
    agree(b"\x00\x00\x01\x02\x02\x02\x02\x04\x00\x00")  # two blocks of one item
    agree(b"\x00\x00\x01\x02\x00\x02\x00")  # an empty decimal: 0 for both
    agree(b"\x00\x00\x01\x02\x00\x02\x12" + b"\xff" * 8 + b"\x85")  # sign-extended to 9 bytes: -123
    refused(b"\x00\x00\x01\x02\x00\x02\x12\x00\x80" + b"\x00" * 7)  # 2**63: beyond Int64


# --- 3. a body with trailing bytes: arrow-avro spins, the helper is killed -------------------------
def test_trailing_bytes_time_out_and_a_fresh_helper_takes_over(codec: Codec) -> None:
    schema = codec.record_schema("Settlement")
    _, body = framed(codec, SETTLEMENT, example(schema, random.Random(3)))
    with ArrowDecoder(timeout_s=1.0, cooldown_s=0.0) as d:
        assert d.decode(schema, [body]) is not None, d.last_error
        old = d.pid
        assert old is not None
        started = time.monotonic()
        assert d.decode(schema, [body, body + b"\x00", body]) is None
        assert time.monotonic() - started < 1.0 + 2.0  # the deadline, plus a kill and a reap
        assert (d.timeouts, d.failures) == (1, 0)
        assert not Path(f"/proc/{old}").exists()  # killed and reaped: not even a zombie
        frame = d.decode(schema, [body, body])
        assert frame is not None, d.last_error
        assert frame.height == 2 and d.pid not in (None, old)


def test_poll_ready_starts_a_helper_without_waiting_for_it(codec: Codec) -> None:
    """A worker's batch takes the record path rather than wait the second a new helper takes to start."""
    schema = codec.record_schema("Settlement")
    _, body = framed(codec, SETTLEMENT, example(schema, random.Random(3)))
    with ArrowDecoder(timeout_s=1.0, cooldown_s=0.0) as d:
        assert d.pid is None  # nothing runs until asked
        started = time.monotonic()
        assert d.poll_ready() is False
        assert time.monotonic() - started < 0.2 and d.pid is not None
        first = d.pid
        assert d.wait_ready() is True and d.poll_ready() is True and d.pid == first
        assert d.decode(schema, [body]) is not None, d.last_error
        assert d.decode(schema, [body + b"\x00"]) is None and d.timeouts == 1  # killed; a new one starts
        assert d.pid not in (None, first) and d.wait_ready() is True
        assert d.decode(schema, [body]) is not None, d.last_error
        assert d.failures == 0


def test_after_a_timeout_the_decoder_rests_longer_each_time(codec: Codec) -> None:
    schema = codec.record_schema("Settlement")
    _, body = framed(codec, SETTLEMENT, example(schema, random.Random(3)))
    now = [0.0]
    with ArrowDecoder(timeout_s=0.5, cooldown_s=30.0, max_cooldown_s=60.0, clock=lambda: now[0]) as d:
        assert d.decode(schema, [body + b"\x00"]) is None and d.timeouts == 1
        now[0] = 29.0
        assert d.decode(schema, [body]) is None and d.skipped == 1  # resting: not even tried
        now[0] = 30.0
        assert d.decode(schema, [body + b"\x00"]) is None and d.timeouts == 2
        now[0] = 89.0  # the second rest is twice as long
        assert d.decode(schema, [body]) is None and d.skipped == 2
        now[0] = 90.0
        assert d.decode(schema, [body]) is not None, d.last_error
        assert d.decode(schema, [body + b"\x00"]) is None and d.timeouts == 3
        now[0] = 120.0  # a frame in between: the rest starts over at 30 s
        assert d.decode(schema, [body]) is not None, d.last_error


# --- 4. malformed bodies --------------------------------------------------------------------------
def test_truncated_invalid_utf8_and_oversized_decimals_are_refused(codec: Codec, decoder: ArrowDecoder) -> None:
    record = SETTLEMENT
    schema = codec.record_schema(record)
    good = example(schema, random.Random(4))
    good["psn_cert_no"] = "MARKER-7"
    prefix, body = framed(codec, record, good)
    assert decoder.decode(schema, [body]) is not None, decoder.last_error
    failures, timeouts = decoder.failures, decoder.timeouts

    def refused(bad: bytes) -> None:
        with pytest.raises(DecodeError):
            codec.decode(prefix + bad)
        assert decoder.decode(schema, [body, bad]) is None

    refused(body[:-1])
    refused(body[: len(body) // 2])
    for invalid in (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe7\xbb"):  # stray, overlong, surrogate, cut
        refused(body.replace(b"MARKER-7", invalid + b"-" * (8 - len(invalid))))
    for unscaled in (2**63, -(2**63) - 1, 10**30):
        big = codec.encode(record, {**good, "medfee_sumamt": unscaled})[len(prefix):]
        assert codec.decode(prefix + big).datum["medfee_sumamt"] == unscaled  # fastavro reads it...
        assert decoder.decode(schema, [body, big]) is None  # ... no Int64 holds it
    for unscaled in (2**63 - 1, -(2**63)):
        edge = codec.encode(record, {**good, "medfee_sumamt": unscaled})[len(prefix):]
        frame = decoder.decode(schema, [edge])
        assert frame is not None and frame["medfee_sumamt"].to_list() == [unscaled]
    assert decoder.failures == failures + 2 + 4 + 3 and decoder.timeouts == timeouts


# --- 5. no helper outlives its parent -------------------------------------------------------------
def test_close_ends_the_helper_and_is_idempotent(codec: Codec) -> None:
    schema = codec.record_schema("Settlement")
    _, body = framed(codec, SETTLEMENT, example(schema, random.Random(5)))
    d = ArrowDecoder()
    assert d.decode(schema, [body]) is not None, d.last_error
    helper = d._proc
    assert helper is not None
    d.close()
    d.close()
    assert d.pid is None and not Path(f"/proc/{helper.pid}").exists()
    assert helper.returncode == 0  # it left on EOF, not on the SIGKILL that follows a second later


PARENT = """
import random, sys, time
from schemas import Codec
from schemas.columnar_decode import ArrowDecoder
from tests.avro_examples import example
from tests.avro_examples import example
from tests.schemas.test_columnar_decode import SETTLEMENT, framed
codec = Codec()
schema = codec.record_schema(SETTLEMENT)
_, body = framed(codec, SETTLEMENT, example(schema, random.Random(6)))
d = ArrowDecoder(timeout_s=600.0)
assert d.decode(schema, [body]) is not None
print(d.pid, flush=True)
if sys.argv[1] == "spinning":
    d.decode(schema, [body + b"\\x00"])  # arrow-avro spins in the helper until the parent dies
time.sleep(600)
"""


@pytest.mark.parametrize("state", ["idle", "spinning"])
def test_a_killed_parent_leaves_no_helper_behind(state: str) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, state], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        helper = int(parent.stdout.readline())
        if state == "spinning":
            time.sleep(0.5)
            assert not gone(helper)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_gone(helper), f"helper {helper} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_uuid_strings_are_taken_as_written(codec: Codec, decoder: ArrowDecoder) -> None:
    """fastavro does not parse a uuid; arrow-avro would (to 16 bytes), so the decoder reads it as a string."""
    record = SETTLEMENT
    schema = codec.record_schema(record)
    datum = example(schema, random.Random(7))
    ids = [str(uuid.uuid4()).upper(), "not-a-uuid", ""]
    bodies = [framed(codec, record, {**datum, "event_id": i})[1] for i in ids]
    frame = decoder.decode(schema, bodies)
    assert frame is not None, decoder.last_error
    assert frame["event_id"].to_list() == ids
