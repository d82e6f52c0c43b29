"""Poison pills against a running worker: no single message stops ingestion, and no person leaks.

Two ways a message can poison a batch, both sent to one long-running ``yibao worker``:

* Absurd but schema-valid values (issue 10's pills: 600 kB codes and ids, 250 kB of control
  characters, an 850 kB frame with a 250 kB key, and the same shapes in every string field of
  every record). Validation rejects them for their length or their characters; every dead letter
  and its topic copy stays under the broker's limit.
* A defect that one input triggers at each step of a batch (decode, validate, rule engine, emit,
  insert), injected into the worker with the input's personal data in scope and in the exception
  text. The batch is split until the message is found; it becomes a dead letter with the step's
  reason; everything else lands exactly once; the worker never restarts; and neither its log nor
  any dead letter holds a clear identifier of any input.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import SUBJECT_RECORDS, Codec
from sinks import connect
from sinks.base import Backend
from sinks.migrate import migrate
from streams.messages import DEAD_LETTER_TABLE, MESSAGE_BUDGET
from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint
from yibao.settings import Settings
from yibao.sim.generator import SETTLEMENT, SimConfig, SimEvent, TrafficGenerator

from ..harness import (
    PRIMARY_TABLE,
    Sent,
    WorkerProcess,
    expected_from,
    produce_events,
    settings_for,
    snapshot,
    wait_for,
    worker_env,
)
from .test_guarantees import assert_exactly_once
from .test_hostile import _consume

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CODEC = Codec()
POOL: list[SimEvent] = list(TrafficGenerator(SimConfig(seed=5, settlements=500, days=20, tip_rate=0.05,
                                                       inspection_rate=0.05)).events())
PERSONAL = ("psn_no", "psn_cert_no", "psn_name", "tel", "rptr_name", "rptr_cert_no", "rptr_tel")


class Ev:
    """An event to produce: a datum (encoded on send) or raw bytes, with its key."""

    def __init__(self, record: str, key: str | bytes, datum: dict[str, Any] | None = None,
                 value: bytes | None = None) -> None:
        self.record, self.key, self.datum, self.value = record, key, datum, value


def fresh(ev: SimEvent, **changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(ev.datum)
    d["event_id"] = str(uuid.uuid4())
    d.update(changes)
    return d


def string_fields(schema: dict[str, Any], lines: str | None = None) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for f in schema["fields"]:
        for t in f["type"] if isinstance(f["type"], list) else [f["type"]]:
            if t == "string" or (isinstance(t, dict) and t.get("type") == "string"):
                out.append((lines, f["name"]))
            elif isinstance(t, dict) and t.get("type") == "array" and isinstance(t["items"], dict):
                out += string_fields(t["items"], f["name"])
    return out


@pytest.fixture()
def worker_setup(broker: KafkaEndpoint, clickhouse_server: ClickHouseEndpoint,
                 tmp_path: Path) -> Iterator[tuple[Settings, Backend]]:
    s = settings_for(broker.bootstrap, "server", tmp_path / "data", ch=clickhouse_server, batch_max_seconds=0.3)
    backend = connect(s.clickhouse())
    migrate(backend)
    yield s, backend
    backend.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
    backend.close()


def wait_accounted(backend: Backend, s: Settings, sent: list[Sent], worker: WorkerProcess, timeout: float = 180
                   ) -> dict[tuple[str, int, int], str]:
    """Block until every produced event is landed (valid) or dead-lettered (the rest); returns the
    dead letters' reasons by source position."""
    db = backend.database
    want_ids: dict[str, list[str]] = {}
    for x in sent:
        if x.datum is not None:
            want_ids.setdefault(PRIMARY_TABLE[x.record.rsplit(".", 1)[-1]], []).append(x.datum["event_id"])

    def measure() -> tuple[int, dict[tuple[str, int, int], str]]:
        dead = {(str(r[0]), int(r[1]), int(r[2])): str(r[3]) for r in backend.query(
            f"SELECT source_topic, source_partition, source_offset, reason_code FROM {db}.{DEAD_LETTER_TABLE}").rows}
        landed = sum(int(backend.query(
            f"SELECT uniqExact(event_id) FROM {db}.{table} WHERE event_id IN ({', '.join(map(repr, ids))})"
        ).scalar()) for table, ids in want_ids.items())
        return landed + len(dead), dead

    pid = worker.pid
    dead = wait_for(measure, len(sent), worker, timeout, "events landed or dead-lettered", interval=0.5)
    assert worker.pid == pid, "the worker restarted"
    return dead


def test_pills_in_every_string_field_are_dead_lettered_and_the_worker_never_stops(
        worker_setup: tuple[Settings, Backend], tmp_path: Path) -> None:
    s, backend = worker_setup
    settlements = [e for e in POOL if e.record == SETTLEMENT]
    stay = next(e for e in settlements if e.datum["med_type"] == "21" and e.datum["drg_code"])
    first = settlements[0]
    pills: list[Ev] = [  # the shapes issue 10 saw stop ingestion
        Ev(first.record, first.key, fresh(first, fixmedins_code="H" + "1" * 600_000)),
        Ev(first.record, first.key, {**fresh(first), "event_id": "e" * 600_000}),
        Ev(first.record, first.key, fresh(first, fixmedins_code="\x01" * 250_000)),
        Ev(stay.record, stay.key, fresh(stay, setl_id="\x01" * 200_000)),
        Ev(first.record, "k" * 250_000, fresh(first, psn_name="张" * 280_000)),  # ~850 kB frame, 250 kB key
    ]
    inputs = [r for stream in ("settlement", "procurement", "supervision") for r in SUBJECT_RECORDS[stream]]
    for i, (record, ev) in enumerate((r, next(e for e in POOL if e.record == r)) for r in inputs):
        for j, (lines, fld) in enumerate(string_fields(CODEC.record_schema(record))):
            shape = "1" * 600_000 if (i + j) % 2 else "\x01" * 250_000
            d = fresh(ev)
            if lines is None:
                d[fld] = shape
            elif d[lines]:
                d[lines][0][fld] = shape
            else:
                continue
            pills.append(Ev(record, ev.key, d))
    valid = [Ev(e.record, e.key, fresh(e)) for e in settlements[:400]]
    mixed: list[Ev] = []
    for i, v in enumerate(valid):
        mixed.append(v)
        if i % 3 == 0 and pills:
            mixed.append(pills.pop())
    mixed += pills
    n_pills = sum(1 for e in mixed if e not in valid)

    worker = WorkerProcess(worker_env(s), tmp_path / "worker.log", tmp_path)
    worker.start()
    try:
        worker.wait_ready()
        pid = worker.pid
        sent = asyncio.run(produce_events(s, valid_and_pills := mixed, CODEC))
        bad = {(x.topic, x.partition, x.offset) for x, e in zip(sent, valid_and_pills, strict=True)
               if e not in valid}
        dead = wait_accounted(backend, s, [Sent(x.topic, x.partition, x.offset, x.record,
                                                None if (x.topic, x.partition, x.offset) in bad else x.datum,
                                                x.value, x.key) for x in sent], worker)
        assert worker.alive() and worker.pid == pid and worker.starts == 1
    finally:
        assert worker.terminate() == 0, worker.log_tail()
    assert set(dead) == bad and len(bad) == n_pills
    assert set(dead.values()) <= {"FIELD_TOO_LONG", "CONTROL_CHARACTER"}, set(dead.values())
    log = worker.log_path.read_text(errors="replace")
    assert "ingestor crashed" not in log and "Traceback" not in log, log[-3000:]
    topic = asyncio.run(_consume(s, s.topic("deadletter"), len(bad), timeout=60))
    assert {(d["source_topic"], d["source_partition"], d["source_offset"]) for d in topic} == bad
    assert all(len(CODEC.encode("cn.nhsa.yibao.pipeline.DeadLetter", d)) <= MESSAGE_BUDGET for d in topic)
    assert max(len(d["reason_detail"]) for d in topic) < 200


#: A worker with a defect that one input triggers at each step of a batch. Each raises with the
#: input's personal data in its message (a record in scope, in the traceback's frames too).
DEFECTIVE_WORKER = r"""
import sys
import schemas.codec as codec_mod
import sinks.server as server
import streams.processors as processors
import streams.rules.engine as engine
from sinks.base import SinkError
from streams.validation import Predicate

def leak(d, where):
    raise ValueError(f"{where} failed for {d['psn_no']} {d.get('psn_cert_no')} {d.get('psn_name')} {d}")

_decode = codec_mod.Codec.decode
def decode(self, data, *a, **kw):
    if b"DEFECT-DECODE" in data:
        record = _decode(self, data, *a, **kw).datum
        leak(record, "decode")
    return _decode(self, data, *a, **kw)
codec_mod.Codec.decode = decode

_checks = processors.record_checks
def record_checks(spec, schema, rules=None):
    def ok(d):
        if "DEFECT-VALIDATE" in str(d.get("setl_id")):
            leak(d, "validate")
        return True
    return (*_checks(spec, schema, rules), Predicate("X", "setl_id", "x", ok))
processors.record_checks = record_checks

_settle = engine.SettlementEngine._settlement
def settle(self, ev, *a):
    if "DEFECT-ENGINE" in ev.datum["setl_id"]:
        leak(ev.datum, "rule engine")
    return _settle(self, ev, *a)
engine.SettlementEngine._settlement = settle

_stay = engine.stay_record
def stay_record(f, *a, **kw):
    rec = _stay(f, *a, **kw)
    return rec + b" " * 1_000_000 if "DEFECT-EMIT" in f.setl_id else rec
engine.stay_record = stay_record

_insert = server.ServerBackend.insert
def insert(self, table, columns):
    if table == "settlements" and any("DEFECT-INSERT" in str(x) for x in columns.get("setl_id", ())):
        raise SinkError(f"Code: 27. Cannot parse input: {columns}", 27)
    return _insert(self, table, columns)
server.ServerBackend.insert = insert

from yibao.cli import main
sys.argv = ["yibao", "worker", "--no-migrate"]
main()
"""

DEFECTS = {"DECODE": "UNPROCESSABLE", "VALIDATE": "MALFORMED_EVENT", "ENGINE": "UNPROCESSABLE",
           "EMIT": "EMIT_TOO_LARGE", "INSERT": "REJECTED_BY_SINK"}


def test_a_defect_one_input_triggers_at_any_step_quarantines_that_input_and_leaks_no_person(
        worker_setup: tuple[Settings, Backend], tmp_path: Path) -> None:
    s, backend = worker_setup
    settlements = [e for e in POOL if e.record == SETTLEMENT]
    stays = [e for e in settlements if e.datum["med_type"] == "21" and e.datum["drg_code"]]
    events: list[Ev] = []
    marked: dict[str, str] = {}
    for i, ev in enumerate(settlements[:450]):
        d = fresh(ev)
        events.append(Ev(ev.record, ev.key, d))
        if i % 45 == 10:  # two of each defect, spread over the stream
            step = list(DEFECTS)[(i // 45) % len(DEFECTS)]
            src = stays[i % len(stays)] if step == "EMIT" else ev
            m = fresh(src, setl_id=f"DEFECT-{step}-{i}")
            events.append(Ev(src.record, src.key, m))
            marked[m["event_id"]] = step
    assert sorted(marked.values()) == sorted(list(DEFECTS) * 2)

    worker = WorkerProcess(worker_env(s), tmp_path / "worker.log", tmp_path)
    worker.start(script=DEFECTIVE_WORKER)
    try:
        worker.wait_ready()
        pid = worker.pid
        sent = asyncio.run(produce_events(s, events, CODEC))
        bad = {(x.topic, x.partition, x.offset) for x in sent if x.datum and x.datum["event_id"] in marked}
        dead = wait_accounted(backend, s, [Sent(x.topic, x.partition, x.offset, x.record,
                                                None if (x.topic, x.partition, x.offset) in bad else x.datum,
                                                x.value, x.key) for x in sent], worker)
        assert worker.alive() and worker.pid == pid
    finally:
        assert worker.terminate() == 0, worker.log_tail()
    by_pos = {(x.topic, x.partition, x.offset): x for x in sent}
    assert set(dead) == bad
    assert {by_pos[p].datum["event_id"]: r for p, r in dead.items()} == {e: DEFECTS[st] for e, st in marked.items()}
    want = expected_from(sent, bad_positions=bad)
    snap = snapshot(s, want.sums)
    log = worker.log_path.read_text(errors="replace")
    assert_exactly_once({t: n for t, n in snap.counts().items() if t not in ("alerts",)}, snap.duplicates(),
                        snap.sums, want, log[-3000:])
    assert "message quarantined as a dead letter" in log
    # no clear identifier of any input, in the log or in any dead letter's readable parts
    details = " ".join(str(v) for r in backend.query(
        f"SELECT reason_detail, field FROM {s.ch_database}.{DEAD_LETTER_TABLE}").rows for v in r)
    for x in sent:
        for f in PERSONAL:
            v = (x.datum or {}).get(f)
            if v:
                assert str(v) not in log, (f, "log")
                assert str(v) not in details, (f, "dead letter detail")
