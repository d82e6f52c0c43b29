"""Hostile input against a running worker, and the dead-letter tools that deal with what it rejects.

Hypothesis builds batches of broken events (truncated frames and bodies, wrong magic bytes, unknown
and foreign schema ids, random bytes, null values, oversized events, and schema-valid events with
negative amounts, malformed codes, future times, amounts that do not add up, unknown regions),
mixed with valid ones, and sends them to one long-running ``yibao worker``. The worker must never
crash or restart; every broken event must be in the dead-letter table and topic with a
machine-readable reason it deserves; every valid one must land; and in = landed + dead-lettered.

``yibao dlq`` is then tested end to end: list, show (masked and revealed), and the replay loop
after a fix (an event rejected for a validation limit lands once the limit is raised and it is
replayed; replaying it again changes nothing).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas import Codec
from sinks import connect
from sinks.base import Backend
from sinks.migrate import migrate
from streams.messages import DEAD_LETTER_TABLE
from streams.settlement import MONEY
from streams.validation import PROVINCES
from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint
from yibao.settings import Settings
from yibao.sim import corrupt as corruptions
from yibao.sim.generator import SimConfig, SimEvent, TrafficGenerator

from ..harness import PRIMARY_TABLE, SETTLEMENT, Sent, WorkerProcess, produce_events, run_cli, settings_for, worker_env

pytestmark = pytest.mark.integration

CODEC = Codec()
POOL: list[SimEvent] = list(TrafficGenerator(SimConfig(seed=3, settlements=120, tip_rate=0.05)).events())
SETTLEMENTS = [e for e in POOL if e.record == SETTLEMENT]
REGISTERED = {sv.id for sv in CODEC.registry.all_versions()}
FOREIGN_FRAME = next(CODEC.encode(e.record, e.datum) for e in POOL if CODEC.subject_of(e.record) == "procurement")
DECODE_REASONS = {"TRUNCATED_FRAME", "BAD_MAGIC", "UNKNOWN_SCHEMA_ID", "WRONG_SUBJECT", "TRUNCATED_BODY",
                  "BAD_AVRO", "TRAILING_BYTES", "OVERSIZED", "UNEXPECTED_RECORD", "MALFORMED_EVENT"}
REASON_CODE = re.compile(r"[A-Z][A-Z0-9_]{2,40}")


@dataclass(frozen=True)
class Hostile:
    """One event to send: raw bytes (or a datum), the reasons it may be rejected for (None: valid)."""

    record: str
    key: str
    datum: dict[str, Any] | None
    value: bytes | None
    reasons: frozenset[str] | None
    kind: str
    stream: str | None = None


def _mutate(ev: SimEvent, **changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(ev.datum)
    d.update(changes)
    return d


def _distinct(ev: SimEvent, tag: Any) -> SimEvent:
    """The event with an identity of its own (event id, and key for what cannot be decoded): every
    item is a distinct event, so none is recognised as a re-send of another (re-sends are
    tests/system/test_event_identity.py's subject; this test is about what hostile events do)."""
    return SimEvent(ev.record, f"{ev.key}~{tag.hex[:12]}", _mutate(ev, event_id=str(tag)))


@st.composite
def hostile(draw: st.DrawFn) -> Hostile:
    ev = _distinct(draw(st.sampled_from(POOL)), uuid.uuid4())  # not drawn: hypothesis repeats values
    kind = draw(st.sampled_from([
        "valid", "valid", "truncated_frame", "truncated_body", "bad_magic", "unknown_schema", "foreign_schema",
        "garbage", "null_value", "oversized", "negative_amount", "bad_code", "future_time", "sum_off",
        "unknown_region", "corrupt_py",
    ]))
    frame = CODEC.encode(ev.record, ev.datum)

    def bad(value: bytes | None, *reasons: str, stream: str | None = None) -> Hostile:
        return Hostile(ev.record, ev.key, None, value, frozenset(reasons), kind, stream)

    if kind == "valid":  # every valid send is a distinct event (see _distinct) that must land once
        return Hostile(ev.record, ev.key, ev.datum, None, None, kind)
    if kind == "truncated_frame":
        return bad(frame[: draw(st.integers(0, 4))], "TRUNCATED_FRAME")
    if kind == "truncated_body":
        return bad(frame[: draw(st.integers(5, len(frame) - 1))], "TRUNCATED_BODY", "BAD_AVRO")
    if kind == "bad_magic":
        return bad(bytes([draw(st.integers(1, 255))]) + frame[1:], "BAD_MAGIC")
    if kind == "unknown_schema":
        sid = draw(st.integers(0, 2**32 - 1).filter(lambda i: i not in REGISTERED))
        return bad(b"\x00" + sid.to_bytes(4, "big") + frame[5:], "UNKNOWN_SCHEMA_ID")
    if kind == "foreign_schema":  # a procurement event on the settlement topic
        return bad(FOREIGN_FRAME, "WRONG_SUBJECT", stream="settlement")
    if kind == "garbage":
        return bad(draw(st.binary(max_size=400)), *DECODE_REASONS)
    if kind == "null_value":
        return bad(None, "EMPTY_VALUE")
    if kind == "oversized":
        size = draw(st.integers(1_000_001, 1_300_000))
        return bad(frame + b"\x00" * (size - len(frame)), "OVERSIZED")
    # schema-valid but wrong: the frame decodes, validation must say why it is wrong
    ev = _distinct(draw(st.sampled_from(SETTLEMENTS)), uuid.uuid4())
    if kind == "negative_amount":
        datum = _mutate(ev, **{draw(st.sampled_from(MONEY)): -draw(st.integers(1, 10**12))})
        reasons: tuple[str, ...] = ("NEGATIVE_AMOUNT",)
    elif kind == "bad_code":
        code = draw(st.text("HPX0123456789 ", max_size=14).filter(lambda c: re.fullmatch(r"[HP]\d{11}", c) is None))
        datum, reasons = _mutate(ev, fixmedins_code=code), ("INVALID_CODE", "MISSING_CODE")  # blank: missing
    elif kind == "future_time":
        ahead_s = draw(st.integers(3600, 10 * 365 * 86400))
        datum = _mutate(ev, setl_time=int(time.time() * 1000) + ahead_s * 1000)
        reasons = ("FUTURE_TIME",)
    elif kind == "sum_off":
        datum = _mutate(ev, psn_cash_pay=ev.datum["psn_cash_pay"] + draw(st.integers(2, 10**8)))
        reasons = ("AMOUNTS_DO_NOT_ADD_UP",)
    elif kind == "unknown_region":
        prefix = draw(st.sampled_from(sorted({f"{i:02d}" for i in range(100)} - PROVINCES)))
        datum = _mutate(ev, insu_admdvs=prefix + ev.datum["insu_admdvs"][2:])
        reasons = ("UNKNOWN_REGION",)
    else:  # the project's own corruption catalogue, driven by a drawn seed
        fn = draw(st.sampled_from(corruptions.SETTLEMENT_CORRUPTIONS + corruptions.FRAME_CORRUPTIONS))
        value, reason = fn(CODEC, ev, random.Random(draw(st.integers(0, 2**32))))
        return Hostile(ev.record, ev.key, None, value, frozenset(reason.split("|")), f"corrupt.{fn.__name__}")
    return Hostile(ev.record, ev.key, None, CODEC.encode(ev.record, datum), frozenset(reasons), kind)


@pytest.fixture(scope="module")
def running_worker(broker: KafkaEndpoint, clickhouse_server: ClickHouseEndpoint,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Backend, WorkerProcess]]:
    tmp = tmp_path_factory.mktemp("hostile")
    s = settings_for(broker.bootstrap, "server", tmp / "data", ch=clickhouse_server, batch_max_seconds=0.2)
    backend = connect(s.clickhouse())
    migrate(backend)
    worker = WorkerProcess(worker_env(s), tmp / "worker.log", tmp)
    worker.start()
    worker.wait_ready()
    yield s, backend, worker
    worker.stop_quietly()
    backend.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
    backend.close()


def _accounted(backend: Backend, s: Settings, sent: list[Sent], items: list[Hostile]
               ) -> tuple[dict[tuple[str, int, int], str], set[str]]:
    db = backend.database
    topics = ", ".join(f"'{t}'" for t in {x.topic for x in sent})
    low = min(x.offset for x in sent)
    dead = {(str(r[0]), int(r[1]), int(r[2])): str(r[3]) for r in backend.query(
        f"SELECT source_topic, source_partition, source_offset, reason_code FROM {db}.{DEAD_LETTER_TABLE} "
        f"WHERE source_topic IN ({topics}) AND source_offset >= {low}").rows}
    landed: set[str] = set()
    by_table: dict[str, list[str]] = {}
    for it in items:
        if it.reasons is None and it.datum is not None:
            by_table.setdefault(PRIMARY_TABLE[it.record.rsplit(".", 1)[-1]], []).append(it.datum["event_id"])
    for table, ids in by_table.items():
        landed |= {str(r[0]) for r in backend.query(
            f"SELECT event_id FROM {db}.{table} WHERE event_id IN ({', '.join(repr(i) for i in ids)})").rows}
    return dead, landed


def test_hostile_input_never_crashes_the_worker_and_is_all_accounted_for(
    running_worker: tuple[Settings, Backend, WorkerProcess],
) -> None:
    s, backend, worker = running_worker
    pid = worker.pid
    totals = {"in": 0, "landed": 0, "dead": 0}
    kinds: dict[str, int] = {}

    # no shrinking: it would send a failing example's events again, and the worker rightly takes
    # them for re-sends (same event ids and bytes) the second time
    @settings(max_examples=12, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(hostile(), min_size=1, max_size=10))
    def batch(items: list[Hostile]) -> None:
        sent = asyncio.run(produce_events(s, items, CODEC))
        deadline = time.monotonic() + 60
        while True:
            dead, landed = _accounted(backend, s, sent, items)
            missing = [(it.kind, x) for it, x in zip(items, sent, strict=True)
                       if (it.reasons is None and it.datum is not None and it.datum["event_id"] not in landed)
                       or (it.reasons is not None and (x.topic, x.partition, x.offset) not in dead)]
            if not missing:
                break
            assert worker.alive() and worker.pid == pid, f"the worker died:\n{worker.log_tail()}"
            assert time.monotonic() < deadline, f"not accounted for after 60 s: {missing}\n{worker.log_tail()}"
            time.sleep(0.2)
        for it, x in zip(items, sent, strict=True):
            kinds[it.kind] = kinds.get(it.kind, 0) + 1
            pos = (x.topic, x.partition, x.offset)
            if it.reasons is None:
                assert pos not in dead, (it.kind, dead[pos])
                continue
            reason = dead[pos]
            assert REASON_CODE.fullmatch(reason), reason
            assert reason in it.reasons, (it.kind, reason, sorted(it.reasons))
        totals["in"] += len(items)
        totals["landed"] += sum(it.reasons is None for it in items)
        totals["dead"] += sum(it.reasons is not None for it in items)

    batch()
    assert worker.alive() and worker.pid == pid
    log = worker.log_path.read_text(errors="replace")
    assert "ingestor crashed" not in log and "Traceback" not in log, log[-3000:]
    # in = landed + dead-lettered, over everything this worker saw
    db = backend.database
    landed = sum(int(backend.query(f"SELECT count() FROM {db}.{t}").scalar()) for t in set(PRIMARY_TABLE.values()))
    dead = int(backend.query(f"SELECT count() FROM {db}.{DEAD_LETTER_TABLE}").scalar())
    assert (landed, dead) == (totals["landed"], totals["dead"]), (totals, kinds)
    assert landed + dead == totals["in"]
    # the dead-letter topic carries the same dead letters, with the same reasons
    table_reasons = {str(r[0]): str(r[1]) for r in backend.query(
        f"SELECT event_id, reason_code FROM {db}.{DEAD_LETTER_TABLE}").rows}
    topic = asyncio.run(_consume(s, s.topic("deadletter"), len(table_reasons)))
    topic_reasons = {d["event_id"]: d["reason_code"] for d in topic}
    assert topic_reasons == table_reasons
    oversized = [d for d in topic if d["reason_code"] == "OVERSIZED"]
    assert all(d["payload"] == b"" for d in oversized), "an oversized payload must not be sent to the topic"
    print(f"hostile: {totals}, kinds {dict(sorted(kinds.items()))}")


async def _consume(s: Settings, topic: str, expected: int, timeout: float = 30) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(topic, **s.kafka_client_kwargs(), group_id=f"check-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", session_timeout_ms=6000,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(CODEC.decode(r.value).datum for r in records)
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            out.extend(CODEC.decode(r.value).datum for r in records)
    finally:
        await consumer.stop()
    return out


# --- yibao dlq -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_dlq_list_show_and_replay_after_the_limit_is_fixed(
    broker: KafkaEndpoint, clickhouse_server: ClickHouseEndpoint, tmp_path: Path
) -> None:
    """A settlement two hours ahead is rejected under a 5-minute skew limit; after the limit is
    raised (worker restarted with it), `yibao dlq replay --reason FUTURE_TIME` lands it, once."""
    s = settings_for(broker.bootstrap, "server", tmp_path / "data", ch=clickhouse_server, max_future_skew_s=300)
    backend = connect(s.clickhouse())
    migrate(backend)
    ev = SETTLEMENTS[0]
    ahead = _mutate(ev, setl_time=int(time.time() * 1000) + 2 * 3600 * 1000)
    env = worker_env(s)
    worker = WorkerProcess(env, tmp_path / "worker.log", tmp_path)
    try:
        asyncio.run(produce_events(s, [Hostile(ev.record, ev.key, ahead, None, None, "ahead")], CODEC))
        worker.start()
        dl_id = _wait_scalar(backend, f"SELECT event_id FROM {s.ch_database}.dead_letters", worker)
        assert worker.terminate() == 0

        listed = run_cli(["dlq", "list", "--json"], env, tmp_path)
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
        assert [(r["event_id"], r["reason_code"]) for r in rows] == [(dl_id, "FUTURE_TIME")], rows

        masked = run_cli(["dlq", "show", dl_id], env, tmp_path)
        assert masked.returncode == 0, masked.stderr
        shown = json.loads(masked.stdout)
        assert shown["reason_code"] == "FUTURE_TIME" and shown["field"] == "setl_time"
        assert shown["source"]["topic"] == s.topic("settlement")
        assert shown["event"]["setl_id"] == ev.datum["setl_id"]  # decoded from the sealed payload
        for personal in ("psn_no", "psn_cert_no", "psn_name"):
            assert shown["event"][personal] == "***"
            assert str(ev.datum[personal]) not in masked.stdout + masked.stderr
        assert shown["key"] == "***" and ev.key not in masked.stdout

        revealed = run_cli(["dlq", "show", dl_id, "--reveal"], env, tmp_path)
        assert revealed.returncode == 0, revealed.stderr
        assert json.loads(revealed.stdout)["event"]["psn_no"] == ev.datum["psn_no"]
        assert "revealing personal data" in revealed.stderr  # a reveal leaves a trace

        fixed = dict(env, YIBAO_MAX_FUTURE_SKEW_S=str(86_400))
        worker.env = fixed
        worker.start()
        worker.wait_ready()
        replay = run_cli(["dlq", "replay", "--reason", "FUTURE_TIME", "--since",
                          (dt.datetime.now() - dt.timedelta(hours=1)).isoformat(timespec="seconds")], fixed, tmp_path)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert json.loads(replay.stdout.splitlines()[-1])["replayed"] == [dl_id]
        eid = ev.datum["event_id"]
        _wait_scalar(backend, f"SELECT event_id FROM {s.ch_database}.settlements WHERE event_id = '{eid}'", worker)

        again = run_cli(["dlq", "replay", "--ids", dl_id], fixed, tmp_path)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout.splitlines()[-1]) == {"replayed": [], "already_landed": [dl_id],
                                                             "unopenable": []}
        assert worker.terminate() == 0
    finally:
        worker.stop_quietly()
    db = s.ch_database
    assert backend.query(f"SELECT count() FROM {db}.settlements WHERE event_id = '{eid}'").scalar() == 1
    assert backend.query(f"SELECT count() FROM {db}.fee_details WHERE setl_id = '{ev.datum['setl_id']}'"
                         ).scalar() == len(ev.datum["fee_details"])
    assert backend.query(f"SELECT count() FROM {db}.dead_letters").scalar() == 1  # history is kept
    backend.execute(f"DROP DATABASE IF EXISTS {db}")
    backend.close()


def _wait_scalar(backend: Backend, sql: str, worker: WorkerProcess, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = backend.query(sql).scalar()
        if v is not None:
            return v
        assert worker.alive(), worker.log_tail()
        assert time.monotonic() < deadline, f"nothing for {sql} after {timeout}s:\n{worker.log_tail()}"
        time.sleep(0.2)
