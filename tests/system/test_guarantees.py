"""Delivery guarantees under failure: nothing lost, nothing counted twice.

* A worker SIGKILLed at random moments (and once, deliberately, between its writes and its offset
  commit) and restarted each time still lands every event exactly once, on both ClickHouse
  backends: row counts, duplicate rows and money sums are checked against what was produced.
* A ClickHouse server stopped for more than 30 s mid-stream: the worker backs off with consumption
  paused and bounded memory, never restarts, resumes by itself and loses or duplicates nothing.
* A broker with durable storage (Tansu on s3:// in a local S3 server that honours conditional
  writes) restarted mid-stream, the first request after the restart being a Produce: the worker
  reconnects by itself; records and committed offsets survive; every event lands once, by content.
* An insert whose connection drops after the server committed it is not written twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from schemas import Codec
from sinks import connect
from sinks.base import SinkUnavailable
from sinks.landed import without_existing
from sinks.migrate import migrate
from streams.ingest import Ingestor
from yibao.localinfra import (
    ClickHouseEndpoint,
    ClickHouseServer,
    KafkaEndpoint,
    MissingBinaryError,
    TansuBroker,
)
from yibao.producer import OutEvent
from yibao.settings import Settings
from yibao.sim.corrupt import corrupt
from yibao.sim.generator import SimConfig, TrafficGenerator

from ..conftest import require_infra
from ..harness import (
    BackgroundProducer,
    Expected,
    Sent,
    WorkerProcess,
    expected_from,
    expected_landing,
    produce_events,
    progress,
    read_landing,
    run_cli,
    settings_for,
    snapshot,
    wait_committed,
    wait_landed,
    worker_env,
)
from ..servers import S3Server

REDELIVERY_LOG = "redelivered offsets already landed"


def traffic(settlements: int, seed: int, bad_rate: float) -> list[Any]:
    """Realistic mixed traffic with a share of broken events (which must be dead-lettered)."""
    codec = Codec()
    rng = random.Random(seed)
    out: list[Any] = []
    for ev in TrafficGenerator(SimConfig(seed=seed, settlements=settlements)).events():
        out.append(corrupt(codec, ev, rng).event if rng.random() < bad_rate else OutEvent(ev.record, ev.key, ev.datum))
    return out


def assert_exactly_once(got_counts: Mapping[str, int], dups: Mapping[str, int],
                        sums: Mapping[tuple[str, str], Any], want: Expected, context: str) -> None:
    """Every table holds exactly the rows and money the produced events call for."""
    assert not dups, f"rows stored twice: {dups}\n{context}"
    for table, n in want.rows.items():
        assert got_counts.get(table, 0) == n, (table, got_counts.get(table), n, context)
    for key, value in want.sums.items():
        assert sums[key] == value, (key, sums[key], value)


# --- the insert whose answer was lost ---------------------------------------------------------------
class LostAnswerBackend:
    """Writes the first insert of each table, then reports the connection as lost (as a server
    stopped mid-insert does): the caller cannot know the rows are there."""

    database = "db"

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[Any, ...]]] = {}
        self.failed: set[str] = set()

    def insert(self, table: str, cols: Mapping[str, Sequence[Any]]) -> int:
        rows = list(zip(*cols.values(), strict=True))
        self.rows.setdefault(table, []).extend(rows)
        if table not in self.failed:
            self.failed.add(table)
            raise SinkUnavailable("connection reset by peer after the part was committed")
        return len(rows)

    def read_table(self, table: str) -> str:
        return f"{self.database}.{table}"

    def reachable(self) -> bool:
        return True

    def query(self, sql: str) -> Any:
        m = re.search(r"FROM \S+\.(\w+) WHERE src_partition = (\d+) AND src_offset >= (\d+)", sql)
        assert m, sql
        table, part, start = m.group(1), int(m.group(2)), int(m.group(3))
        # rows are (src_partition, src_offset, identity, ...), the order the tests build them in
        found = {(r[1], r[2]) for r in self.rows.get(table, []) if r[0] == part and r[1] >= start}
        return SimpleNamespace(rows=sorted(found))


def test_insert_of_unknown_outcome_is_not_written_twice() -> None:
    """The server committed the insert but the answer never came: the retry sends only what is missing."""
    backend = LostAnswerBackend()
    ing = Ingestor.__new__(Ingestor)
    ing.backend = backend  # type: ignore[assignment]
    ing.topic = "yibao.settlement"
    ing.consumer = None
    ing.retry_max_seconds = 0.01
    from concurrent.futures import ThreadPoolExecutor
    ing.executor = ThreadPoolExecutor(1)
    cols = {"src_partition": [0, 0, 1], "src_offset": [5, 6, 9], "event_id": ["a", "b", "c"], "x": [1, 2, 3]}

    async def go() -> None:
        await ing._with_retry(ing._insert_once("settlements", dict(cols)))

    asyncio.run(go())
    assert sorted(backend.rows["settlements"]) == [(0, 5, "a", 1), (0, 6, "b", 2), (1, 9, "c", 3)]
    ing.executor.shutdown()


def test_without_existing_keeps_rows_whose_identity_differs() -> None:
    """A row at a landed offset but with another identity (topic recreated) is still sent."""
    backend = LostAnswerBackend()
    backend.rows["settlements"] = [(0, 5, "a", 1)]
    cols = {"src_partition": [0, 0], "src_offset": [5, 6], "event_id": ["other", "b"], "x": [1, 2]}
    left = without_existing(backend, "settlements", cols, "t")  # type: ignore[arg-type]
    assert left["event_id"] == ["other", "b"]
    cols2 = {"src_partition": [0, 0], "src_offset": [5, 6], "event_id": ["a", "b"], "x": [1, 2]}
    assert without_existing(backend, "settlements", cols2, "t")["event_id"] == ["b"]  # type: ignore[arg-type]


# --- SIGKILL storm ------------------------------------------------------------------------------------
@pytest.fixture(params=["embedded", "server"])
def kill_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """A broker of this test alone: every worker shares the Faust app id ("yibao-worker", hence one
    Faust consumer group per broker), and a group that saw a run of SIGKILLed members was seen to
    stall later workers on the shared test broker."""
    try:
        broker = TansuBroker(workdir=tmp_path / "tansu")
    except MissingBinaryError as exc:
        require_infra(str(exc))
    ch = request.getfixturevalue("clickhouse_server") if request.param == "server" else None
    with broker:
        s = settings_for(broker.bootstrap, request.param, tmp_path / "data", ch=ch, batch_max_events=100,
                         batch_max_seconds=0.2, session_timeout_ms=3000)
        res = run_cli(["migrate"], worker_env(s), tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        yield s
        if request.param == "server":
            b = connect(s.clickhouse())
            b.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
            b.close()


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_at_random_moments_lands_everything_exactly_once(kill_env: Settings, tmp_path: Path) -> None:
    """Five SIGKILLs at random moments plus one between write and commit, traffic flowing throughout."""
    s = kill_env
    rng = random.Random()
    seed = rng.randrange(1_000_000)
    # more traffic than the kills need (1000 events took 18 s, less than six restarts on a loaded
    # machine): the producer is stopped after the last kill, and what it sent is what is checked
    events = traffic(4000, seed=seed, bad_rate=0.03)
    producer = BackgroundProducer(s, events, rate=55).start()
    worker = WorkerProcess(worker_env(s), tmp_path / "worker.log", tmp_path)
    kills: list[str] = []
    try:
        crash_round = rng.randrange(1, 5)
        for round_ in range(6):
            ends = producer.ledger.ends()
            before, _ = progress(s, ends) if ends else (0, 0)
            if round_ == crash_round:
                worker.start(crash_at_commit=rng.randint(2, 5))
                status = worker.wait(90)
                assert status == -9, f"the crash-injected worker exited with {status}:\n{worker.log_tail()}"
                kills.append("before-commit")
                continue
            worker.start()
            deadline = time.monotonic() + 60
            while progress(s, producer.ledger.ends())[0] <= before:
                assert worker.alive(), worker.log_tail()
                assert time.monotonic() < deadline, f"no progress after restart {round_}:\n{worker.log_tail()}"
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 0.6))  # mostly while it catches up on the backlog
            worker.kill()
            done, produced = progress(s, producer.ledger.ends())
            kills.append(f"random@{done}/{produced}" + ("" if producer.running() else " (traffic over)"))
        producer.stop()
        ledger = producer.join(timeout=120)
        worker.start()
        worker.wait_ready()
        wait_committed(s, ledger.ends(), worker, timeout=180)
        assert worker.terminate() == 0, worker.log_tail()
    finally:
        worker.stop_quietly()
        producer.stop()
        producer.join(timeout=120)
    sent = ledger.snapshot()
    assert 0 < len(sent) <= len(events)
    during = [k for k in kills if k.startswith("random") and "traffic over" not in k]
    assert len(during) >= 5 and "before-commit" in kills, f"five random kills while traffic flows: {kills}"
    want = expected_from(sent)
    snap = snapshot(s, want.sums)
    log = worker.log_path.read_text(errors="replace")
    context = f"seed={seed} kills={kills}\n{log[-3000:]}"
    assert_exactly_once(snap.counts(), snap.duplicates(), snap.sums, want, context)
    # the deliberate crash left rows without a commit: the restarted worker must have seen them
    assert REDELIVERY_LOG in log, context
    assert "Traceback" not in worker.current_log(), "the last run must be clean"
    print(f"{s.ch_backend.value}: {len(sent)} events, kills {kills}, rows {snap.counts()}")


# --- ClickHouse outage --------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.integration
@pytest.mark.slow
def test_clickhouse_outage_backs_off_and_resumes_exactly_once(
    broker: KafkaEndpoint, own_clickhouse: ClickHouseServer, tmp_path: Path, record_property: Any
) -> None:
    """ClickHouse down for 32 s mid-stream: same worker process throughout, consumption paused,
    memory flat, no commit while down, writing resumed within 2 s of the server coming back with
    the default 30 s back-off cap (the back-off has reached it by then), and everything landed
    exactly once."""
    ch = own_clickhouse
    endpoint = ClickHouseEndpoint(ch.host, ch.tcp_port, ch.http_port, "")
    s = settings_for(broker.bootstrap, "server", tmp_path / "data", ch=endpoint, batch_max_events=500)
    assert s.sink_retry_max_seconds == 30
    backend = connect(s.clickhouse())
    migrate(backend)
    backend.close()
    events = traffic(1500, seed=7, bad_rate=0.02)
    first, rest = events[: len(events) // 3], events[len(events) // 3 :]
    sent: list[Sent] = asyncio.run(produce_events(s, first, Codec()))
    worker = WorkerProcess(worker_env(s), tmp_path / "worker.log", tmp_path)
    try:
        worker.start()
        pid = worker.pid
        wait_committed(s, _ends(sent), worker, timeout=120)
        rss_before = _rss_kb(pid)
        ch.stop()
        t_down = time.monotonic()
        producer = BackgroundProducer(s, rest, rate=400).start()  # traffic keeps arriving
        committed_at_stop, _ = progress(s, producer.ledger.ends() | _ends(sent))
        rss_samples = []
        at_cap = re.compile(rf"retry_in_s={s.sink_retry_max_seconds:g}(\.0)?\b")
        # down at least 32 s, and until the back-off has grown to its cap: the server then comes back
        # early in a 30 s wait, which only a probe while backing off can cut short
        while time.monotonic() - t_down < 32 or not at_cap.search(worker.current_log()):
            assert worker.alive() and worker.pid == pid, f"the worker must ride the outage out:\n{worker.log_tail()}"
            assert time.monotonic() - t_down < 90, f"the back-off never reached its cap:\n{worker.log_tail()}"
            rss_samples.append(_rss_kb(pid))
            time.sleep(1)
        ledger = producer.join()
        all_sent = sent + ledger.snapshot()
        ends = _ends(all_sent)
        committed_while_down, total = progress(s, ends)
        assert committed_while_down <= committed_at_stop + s.batch_max_events * 3, \
            "offsets were committed while ClickHouse was down"
        assert committed_while_down < total
        ch.start()  # returns once the server answers /ping
        t_up = time.monotonic()
        while progress(s, ends)[0] <= committed_while_down:
            assert time.monotonic() - t_up < 60, f"nothing written after ClickHouse came back:\n{worker.log_tail()}"
            time.sleep(0.05)
        resumed_s = time.monotonic() - t_up
        wait_committed(s, ends, worker, timeout=120)
        recovery_s = time.monotonic() - t_up
        assert worker.pid == pid and worker.alive()
        assert worker.terminate() == 0, worker.log_tail()
    finally:
        worker.stop_quietly()
    log = worker.log_path.read_text(errors="replace")
    assert "ClickHouse unavailable; backing off" in log
    delays = [float(x) for x in re.findall(r"retry_in_s=([\d.]+)", log)]
    assert delays and max(delays) <= s.sink_retry_max_seconds, delays
    # bounded memory: the paused consumer does not buffer the traffic that arrived during the outage
    assert max(rss_samples) - rss_before < 64 * 1024, (rss_before, rss_samples)
    want = expected_from(all_sent)
    snap = snapshot(s, want.sums)
    assert_exactly_once(snap.counts(), snap.duplicates(), snap.sums, want, log[-3000:])
    assert resumed_s < 2, f"writing resumed {resumed_s:.1f} s after ClickHouse came back"
    record_property("outage_resumed_s", round(resumed_s, 2))
    record_property("outage_recovery_s", round(recovery_s, 1))
    record_property("rss_kb_before_during", (rss_before, max(rss_samples)))
    print(f"outage: writing resumed {resumed_s:.2f}s and everything committed {recovery_s:.1f}s after ClickHouse "
          f"came back; RSS {rss_before} kB before, "
          f"max {max(rss_samples)} kB during; {len(delays)} back-off warnings, max delay {max(delays)}s")


def _ends(sent: Sequence[Sent]) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for x in sent:
        out[(x.topic, x.partition)] = max(out.get((x.topic, x.partition), 0), x.offset + 1)
    return out


# --- broker restart with durable storage -------------------------------------------------------------
@pytest.fixture()
def durable_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """Tansu on ``s3://`` storage in a local S3 server that honours conditional writes (S3Server checks)."""
    try:
        s3 = S3Server(workdir=tmp_path / "s3")
    except MissingBinaryError as exc:
        require_infra(str(exc))
    s3.start()
    try:
        tansu = TansuBroker(workdir=tmp_path / "tansu", storage=s3.storage_url, env=s3.aws_env())
        tansu.start()
        try:
            yield tansu
        finally:
            tansu.stop()
    finally:
        s3.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_broker_restart_with_durable_storage_loses_and_duplicates_nothing(
    durable_broker: TansuBroker, clickhouse_server: ClickHouseEndpoint, tmp_path: Path, record_property: Any
) -> None:
    """The broker is stopped mid-stream and comes back with its data: the worker reconnects by itself
    (same process), resumes from its committed offsets, and every event lands exactly once.

    The worker lives through the outage, then is frozen (SIGSTOP) from just before the broker comes
    back until the second half of the traffic is produced. So on every run a Produce, not the
    worker's Fetch, is the first request each input partition gets from the restarted broker: the
    order in which Tansu on an S3 server without conditional writes (s3rver) restarted offsets at 0
    over the records before, which a race with the worker used to hit only sometimes. What is
    compared is content, not offsets: each valid event's ``event_id`` in its table once, each bad
    frame's bytes among the dead letters once, and nothing else.
    """
    tansu = durable_broker
    s = settings_for(tansu.bootstrap, "server", tmp_path / "data", ch=clickhouse_server, batch_max_events=300)
    backend = connect(s.clickhouse())
    migrate(backend)
    events = traffic(1200, seed=8, bad_rate=0.02)
    half = len(events) // 2
    sent = asyncio.run(produce_events(s, events[:half], Codec()))
    worker = WorkerProcess(worker_env(s), tmp_path / "worker.log", tmp_path)
    try:
        worker.start()
        pid = worker.pid
        wait_landed(s, backend, expected_landing(sent), worker, timeout=120, at_least=len(sent) // 3)
        # A clean stop, not a SIGKILL: a Tansu killed while writing a group's committed offset to S3
        # leaves an empty offsets object behind, and after the restart every OffsetFetch of that
        # group panics in the broker ("not yet implemented"), so the group can never resume (seen
        # here; a broker defect, see docs/design.md). Its records survive a SIGKILL.
        tansu.stop()
        t_down = time.monotonic()
        time.sleep(2)
        assert worker.alive() and worker.pid == pid, worker.log_tail()
        os.kill(pid, signal.SIGSTOP)
        try:
            tansu.start()
            down_s = time.monotonic() - t_down
            sent += asyncio.run(produce_events(s, events[half:], Codec()))
        finally:
            os.kill(pid, signal.SIGCONT)
        t_up = time.monotonic()
        want = expected_landing(sent)
        assert sum(want.ids.values()) + sum(want.dead.values()) == len(events)
        wait_landed(s, backend, want, worker, timeout=180)
        recovery_s = time.monotonic() - t_up
        assert worker.pid == pid
        assert worker.terminate() == 0, worker.log_tail()
    finally:
        worker.stop_quietly()
    log = worker.log_path.read_text(errors="replace")
    got = read_landing(s, backend)
    assert got == want, f"{want.differences(got)}\n{log[-3000:]}"
    counts = expected_from(sent)
    snap = snapshot(s, counts.sums)
    assert_exactly_once(snap.counts(), snap.duplicates(), snap.sums, counts, log[-3000:])
    # the rule state of the re-assigned partitions was restored from changelogs the broker kept
    assert "state not restored" not in log, log[-3000:]
    backend.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
    backend.close()
    record_property("broker_down_s", round(down_s, 1))
    record_property("broker_recovery_s", round(recovery_s, 1))
    print(f"broker restart: down {down_s:.1f}s, everything landed {recovery_s:.1f}s after the second half was produced")


@pytest.mark.integration
def test_restore_after_a_broker_restart_returns_the_state_written_before(durable_broker: TansuBroker) -> None:
    """A changelog read back after the durable broker restarted gives exactly the state written before.

    On s3rver, which ignores conditional writes, Tansu lost these logs over a restart and the
    restore ended in ChangelogLost; on an S3 server that honours them the log is kept, so a loss is
    now a failure.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from streams.rules.state import Store, restore, write_changelog

    tansu = durable_broker
    topic = "changelog.person"
    kwargs = {"bootstrap_servers": tansu.bootstrap}

    async def go() -> None:
        admin = AIOKafkaAdminClient(**kwargs)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 2, 1, topic_configs={"cleanup.policy": "compact"})])
        await admin.close()
        producer = AIOKafkaProducer(**kwargs)
        await producer.start()
        try:
            written = Store("person", topic)
            for i in range(40):
                written.put(i % 2, f"psn{i}", {"o": i, "n": i * 3})
            await write_changelog(producer, [written])
            before = Store("person", topic)
            await restore(before, [0, 1], producer, kwargs, timeout_s=60)
            assert before.data == written.data
            tansu.stop()
            tansu.start()
            after = Store("person", topic)
            await restore(after, [0, 1], producer, kwargs, timeout_s=90)
            assert after.data == written.data
        finally:
            await producer.stop()

    asyncio.run(go())


def test_counter_helper_sees_every_table() -> None:
    """The expectations helper accounts for every produced event: landed rows + dead letters = in."""
    rows = [Sent("t", 0, i, "cn.nhsa.yibao.supervision.FundIncome", {"income_amt": 100 * i}, None, None)
            for i in range(3)]
    rows.append(Sent("t", 0, 3, "cn.nhsa.yibao.supervision.FundIncome", None, b"\x01junk", None))
    want = expected_from(rows)
    assert want.rows == Counter({"fund_income": 3, "dead_letters": 1})
    assert sum(v for k, v in want.rows.items() if k != "fee_details") == len(rows)
