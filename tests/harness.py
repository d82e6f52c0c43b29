"""Shared machinery of the delivery, outage, hostile-input, privacy, transport and shutdown tests.

The worker under test runs as a real ``yibao worker`` subprocess, so a test can SIGKILL or SIGTERM
it like an operator or the kernel would, and so embedded chDB is owned by the worker alone (chDB
allows one process per data path; the test reads an embedded store only after the worker has
stopped, in a short-lived child process of its own).

Progress is mostly measured on the broker: the test records the offset of every event it produces
and compares it with the worker's committed group offsets. That works on both backends while the
worker runs, and it does not depend on Tansu's wrong end offsets (infra.md). Where the broker's
offsets themselves are in question (a broker restart), :class:`Landing` compares by content
instead: event ids in their tables and the original bytes of dead letters.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import Codec
from sinks.base import Backend
from sinks.tables import MONEY, TABLES
from streams.records import PRIMARY_TABLE
from streams.settlement import REVERSAL_MONEY
from streams.topics import STREAMS
from yibao.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
REVERSAL = "cn.nhsa.yibao.settlement.SettlementReversal"

PSEUDO_KEY = "ab" * 32


@contextmanager
def default_settings(cwd: Path) -> Iterator[Settings]:
    """The settings a user gets with no YIBAO_* variable set, from ``cwd`` (no .env of the repo)."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("YIBAO_"):
                mp.delenv(k)
        mp.chdir(cwd)
        yield load_settings()


def settings_for(bootstrap: str, backend: str, data_dir: Path, *, ch: Any = None, **extra: Any) -> Settings:
    """Settings of one isolated test: its own topics, groups and database."""
    tag = uuid.uuid4().hex[:8]
    kw: dict[str, Any] = {
        "kafka_bootstrap": bootstrap, "topic_prefix": f"t{tag}.", "consumer_group": f"g{tag}",
        "ch_database": f"it_{tag}", "data_dir": data_dir, "session_timeout_ms": 6000, "web_port": 0,
        "batch_max_seconds": 0.3, "pseudo_key": PSEUDO_KEY, "ch_backend": backend,
    }
    if ch is not None:
        kw.update(ch_host=ch.host, ch_port=ch.tcp_port, ch_user=ch.user, ch_password=ch.password)
    kw.update(extra)
    return load_settings(**kw)


def worker_env(s: Settings, **extra: str) -> dict[str, str]:
    """Environment of a worker subprocess running with settings ``s``.

    Built from scratch for every YIBAO_ variable, so nothing from the developer's shell leaks in.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("YIBAO_")}
    env.update({
        "YIBAO_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "YIBAO_TOPIC_PREFIX": s.topic_prefix,
        "YIBAO_CONSUMER_GROUP": s.consumer_group, "YIBAO_CH_BACKEND": s.ch_backend.value,
        "YIBAO_CH_HOST": s.ch_host, "YIBAO_CH_PORT": str(s.ch_port), "YIBAO_CH_DATABASE": s.ch_database,
        "YIBAO_CH_USER": s.ch_user, "YIBAO_DATA_DIR": str(s.data_dir), "YIBAO_WEB_PORT": str(s.web_port),
        "YIBAO_SESSION_TIMEOUT_MS": str(s.session_timeout_ms),
        "YIBAO_BATCH_MAX_EVENTS": str(s.batch_max_events), "YIBAO_BATCH_MAX_SECONDS": str(s.batch_max_seconds),
        "YIBAO_SINK_RETRY_MAX_SECONDS": str(s.sink_retry_max_seconds),
        "YIBAO_SHUTDOWN_DEADLINE_S": str(s.shutdown_deadline_s),
        "YIBAO_MAX_FUTURE_SKEW_S": str(s.max_future_skew_s),
        "YIBAO_TOPIC_PARTITIONS": str(s.topic_partitions),
        "PYTHONPATH": str(ROOT),
    })
    if s.ch_password.get_secret_value():
        env["YIBAO_CH_PASSWORD"] = s.ch_password.get_secret_value()
    if s.pseudo_key is not None:
        env["YIBAO_PSEUDO_KEY"] = s.pseudo_key.get_secret_value()
    env.update(extra)
    return env


#: Runs the worker after wrapping ``Ingestor._commit`` so that the process SIGKILLs itself right
#: before its Nth offset commit of a batch that wrote rows: rows written, offsets not committed. A
#: kill from outside lands in that window only by chance; this makes the redelivery-dedup path
#: certain to run. Batches that wrote nothing (a re-keyed stay that raised no alert) are not
#: counted: a crash there leaves nothing for the restarted worker to find.
CRASH_BEFORE_COMMIT = """
import os, signal, sys
import streams.ingest as ingest
_orig_commit = ingest.Ingestor._commit
_orig_insert = ingest.Ingestor._insert
_wrote = set()
_calls = 0
async def _insert(self, table, cols):
    await _orig_insert(self, table, cols)
    if any(len(v) for v in cols.values()):
        _wrote.add(id(self))
async def _commit(self, offsets):
    global _calls
    if id(self) in _wrote:
        _wrote.discard(id(self))
        _calls += 1
        if _calls >= int(os.environ["YIBAO_TEST_CRASH_AT_COMMIT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return await _orig_commit(self, offsets)
ingest.Ingestor._commit = _commit
ingest.Ingestor._insert = _insert
from yibao.cli import main
sys.argv = ["yibao", "worker", "--no-migrate"]
main()
"""


class WorkerProcess:
    """One ``yibao worker`` subprocess at a time, all runs logged to one file."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, crash_at_commit: int | None = None, extra_env: dict[str, str] | None = None,
              script: str | None = None) -> None:
        """Start ``yibao worker``; or, for a test that changes the worker's code, ``script`` (Python
        source that patches what it needs, then runs the CLI's main)."""
        assert self.proc is None or self.proc.poll() is not None, "a worker is already running"
        env = dict(self.env, **(extra_env or {}))
        if crash_at_commit is not None:
            env["YIBAO_TEST_CRASH_AT_COMMIT"] = str(crash_at_commit)
            cmd = [sys.executable, "-c", CRASH_BEFORE_COMMIT]
        elif script is not None:
            cmd = [sys.executable, "-c", script]
        else:
            cmd = [sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"]
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd)
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def columnar_helpers(self) -> int:
        """How many columnar decoder helpers (``python -m schemas.columnar_decode <parent>``) this
        worker process runs now."""
        mine = ["-m", "schemas.columnar_decode", str(self.pid)]
        n = 0
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            n += argv[1:4] == mine
        return n

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no cleanup."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit status (SIGKILLs after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return int(self.proc.wait(timeout))

    def current_log(self) -> str:
        """Output of the latest run only."""
        try:
            return self.log_path.read_text(errors="replace").rsplit("===== start", 1)[-1]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 90) -> None:
        """Block until the latest run has started its ingestors (its signal handlers are in place)."""
        deadline = time.monotonic() + timeout
        while "worker started" not in self.current_log():
            if not self.alive():
                raise AssertionError(f"the worker exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker did not start within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 4000) -> str:
        """The log's last ``chars``, after its earlier error lines: at DEBUG a child's crash scrolls out of
        any tail before its supervisor has stopped the others."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        earlier = [line[:600] for line in text[:-chars].splitlines()
                   if re.search(r"\[(error|critical)|Traceback|Error:", line)][:20]
        head = "earlier errors:\n" + "\n".join(earlier) + "\n... last lines:\n" if earlier else ""
        return head + text[-chars:]

    def stop_quietly(self) -> None:
        """Teardown: never leave a worker behind, whatever the test did."""
        if self.alive():
            try:
                self.terminate(timeout=30)
            except Exception:
                self.kill()


def run_cli(args: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = 120,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """``yibao ARGS`` as a subprocess (the real entry point, the real environment handling)."""
    return subprocess.run([sys.executable, "-m", "yibao.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, input=input_text)


@contextmanager
def migrated_database(engine: str, request: Any, tmp_path_factory: Any, prefix: str
                      ) -> Iterator[tuple[Backend, dict[str, str]]]:
    """A migrated, empty database of its own on ``engine`` ("embedded" or "server": the session's
    ClickHouse server), the backend open on it and the YIBAO_* variables that point a command at it;
    dropped afterwards. chDB allows one data path per process: the suite's shared one is used."""
    import pytest

    from sinks import ClickHouseConfig, connect
    from sinks.migrate import migrate

    database = f"{prefix}_{uuid.uuid4().hex[:10]}"
    env = {"YIBAO_CH_DATABASE": database}
    if engine == "server":
        ch = request.getfixturevalue("clickhouse_server")
        be = connect(ClickHouseConfig(backend="server", host=ch.host, port=ch.tcp_port, user=ch.user,
                                      password=ch.password, database=database))
        env.update(YIBAO_CH_BACKEND="server", YIBAO_CH_HOST=ch.host, YIBAO_CH_PORT=str(ch.tcp_port),
                   YIBAO_CH_USER=ch.user, YIBAO_CH_PASSWORD=ch.password or "")
    else:
        pytest.importorskip("chdb")
        data_dir = tmp_path_factory.getbasetemp() / "chdb-shared"
        be = connect(ClickHouseConfig(chdb_path=data_dir / "chdb", database=database))
        env.update(YIBAO_CH_BACKEND="embedded", YIBAO_DATA_DIR=str(data_dir))
    try:
        migrate(be)
        be.use_database()
        yield be, env
        be.execute(f"DROP DATABASE IF EXISTS {database}" + (" SYNC" if engine == "embedded" else ""))
    finally:
        be.close()


# --- producing with positions -------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    """Where one produced event went."""

    topic: str
    partition: int
    offset: int
    record: str
    datum: dict[str, Any] | None
    value: bytes | None
    key: bytes | None


@dataclass
class Ledger:
    """Everything produced so far, thread-safe (a background producer appends to it)."""

    sent: list[Sent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, items: Iterable[Sent]) -> None:
        with self.lock:
            self.sent.extend(items)

    def snapshot(self) -> list[Sent]:
        with self.lock:
            return list(self.sent)

    def ends(self) -> dict[tuple[str, int], int]:
        """Next offset after the last produced event, per (topic, partition)."""
        out: dict[tuple[str, int], int] = {}
        for x in self.snapshot():
            key = (x.topic, x.partition)
            out[key] = max(out.get(key, 0), x.offset + 1)
        return out


async def produce_events(s: Settings, events: Iterable[Any], codec: Codec, *, rate: float | None = None,
                         ledger: Ledger | None = None, chunk: int = 200) -> list[Sent]:
    """Produce events (objects with record, key and datum or pre-framed value) and record where each
    landed. ``rate`` (events/s) spreads them over time, for tests that need traffic during the run."""
    producer = AIOKafkaProducer(**s.kafka_client_kwargs(), acks="all", linger_ms=5,
                                max_request_size=8 * 1024 * 1024, request_timeout_ms=60_000)
    await producer.start()
    out: list[Sent] = []
    t0 = time.monotonic()
    try:
        pending: list[tuple[asyncio.Future[Any], str, str, Any, bytes | None, bytes | None]] = []
        for n, ev in enumerate(events, 1):
            value = getattr(ev, "value", None)
            datum = getattr(ev, "datum", None)
            # neither value nor datum: a tombstone (a null value), which the worker must dead-letter
            raw = value if value is not None or datum is None else codec.encode(ev.record, datum)
            key = ev.key.encode("utf-8") if isinstance(ev.key, str) else ev.key
            stream = getattr(ev, "stream", None) or codec.subject_of(ev.record)
            topic = s.topic(stream)
            fut = await producer.send(topic, raw, key=key)
            pending.append((fut, topic, ev.record, datum, value, key))
            if len(pending) >= chunk:
                out.extend(await _settle(pending))
                if ledger is not None:
                    ledger.add(out[-len(pending):])
                pending = []
                if rate:
                    ahead = n / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        if pending:
            done = await _settle(pending)
            out.extend(done)
            if ledger is not None:
                ledger.add(done)
    finally:
        await producer.stop()
    return out


async def _settle(pending: list[tuple[asyncio.Future[Any], str, str, Any, bytes | None, bytes | None]]
                  ) -> list[Sent]:
    mds = await asyncio.gather(*(p[0] for p in pending))
    return [Sent(topic, md.partition, md.offset, record, datum, value, key)
            for md, (_, topic, record, datum, value, key) in zip(mds, pending, strict=True)]


class BackgroundProducer:
    """Produces events at a steady rate in a thread of its own while the test kills workers."""

    def __init__(self, s: Settings, events: list[Any], rate: float) -> None:
        self.ledger = Ledger()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(s, events, rate), daemon=True)

    def _run(self, s: Settings, events: list[Any], rate: float) -> None:
        try:
            asyncio.run(produce_events(s, self._until_stopped(events), Codec(), rate=rate, ledger=self.ledger))
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _until_stopped(self, events: list[Any]) -> Iterator[Any]:
        for ev in events:
            if self._stop.is_set():
                return
            yield ev

    def stop(self) -> None:
        """Send no more events (those sent stay in the ledger): traffic that lasts as long as a test
        needs it, however long its steps take on a loaded machine, instead of a guess in seconds."""
        self._stop.set()

    def start(self) -> BackgroundProducer:
        self._thread.start()
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 120) -> Ledger:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the background producer did not finish")
        if self.error is not None:
            raise self.error
        return self.ledger


# --- broker-side progress -----------------------------------------------------------------------
async def committed_offsets(s: Settings, topics_partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Committed offsets of the worker's groups (one per subsystem), -1 where nothing is committed.

    Read with an assigned (not subscribed) consumer per group: it asks the coordinator without
    joining, so it never disturbs the worker's group.
    """
    by_topic: dict[str, list[int]] = {}
    for t, p in topics_partitions:
        by_topic.setdefault(t, []).append(p)
    out: dict[tuple[str, int], int] = {}
    for stream in STREAMS:
        topic = s.topic(stream)
        if topic not in by_topic:
            continue
        consumer = AIOKafkaConsumer(**s.kafka_client_kwargs(), group_id=f"{s.consumer_group}.{stream}",
                                    enable_auto_commit=False, request_timeout_ms=10_000)
        await consumer.start()
        try:
            for p in by_topic[topic]:
                c = await consumer.committed(TopicPartition(topic, p))
                out[(topic, p)] = -1 if c is None else int(c)
        finally:
            await consumer.stop()
    return out


def progress(s: Settings, ends: dict[tuple[str, int], int]) -> tuple[int, int]:
    """(events whose offsets are committed, events produced): how far the worker got."""
    c = asyncio.run(committed_offsets(s, ends))
    done = sum(min(max(c.get(k, -1), 0), end) for k, end in ends.items())
    return done, sum(ends.values())


def wait_committed(s: Settings, ends: dict[tuple[str, int], int], worker: WorkerProcess | None,
                   timeout: float, at_least: int | None = None) -> int:
    """Block until the committed offsets reach ``ends`` (or ``at_least`` events); fail loudly if the
    worker died or time ran out. Returns the committed count."""
    def measure() -> tuple[int, int]:
        done, _ = progress(s, ends)
        return done, done

    target = sum(ends.values()) if at_least is None else at_least
    return wait_for(measure, target, worker, timeout, "events committed", interval=0.2)


T = TypeVar("T")


def wait_for(measure: Callable[[], tuple[int, T]], target: int, worker: WorkerProcess | None, timeout: float,
             what: str, *, interval: float, explain: Callable[[T], str] | None = None) -> T:
    """Poll ``measure`` (how many are done, and what it read) until it reaches ``target``; fail loudly,
    with the worker's log, if the worker died or ``timeout`` passed. Returns what it read last."""
    deadline = time.monotonic() + timeout
    while True:
        done, seen = measure()
        if done >= target:
            return seen
        if worker is not None and not worker.alive():
            raise AssertionError(f"the worker exited (status {worker.proc.returncode if worker.proc else None}) "
                                 f"at {done}/{target} {what}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            tail = worker.log_tail() if worker is not None else ""
            extra = f" ({explain(seen)})" if explain is not None else ""
            raise AssertionError(f"only {done}/{target} {what} after {timeout:.0f}s{extra}:\n{tail}")
        time.sleep(interval)


# --- what ClickHouse holds ----------------------------------------------------------------------
def table_stats(backend: Backend, tables: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """``{table: (rows, duplicate rows)}`` for every pipeline table (alerts included), via the backend.

    Written for any table with an ``ingested_at`` column, so tables added later (the rule engine's
    alerts, BI tables) are covered by callers that pass ``tables=None``.
    """
    names = list(tables) if tables is not None else all_tables(backend)
    out: dict[str, tuple[int, int]] = {}
    for t in names:
        cols = [str(r[0]) for r in backend.query(
            f"SELECT name FROM system.columns WHERE database = '{backend.database}' AND table = '{t}' "
            "AND name != 'ingested_at'").rows]
        row = backend.query(
            f"SELECT count(), count() - uniqExact(tuple({', '.join(cols)})) FROM {backend.database}.{t}").rows[0]
        out[t] = (int(row[0]), int(row[1]))
    return out


def all_tables(backend: Backend) -> list[str]:
    """Every stored (MergeTree-family) table of the pipeline's database that holds landed rows.

    Not the ``agg_*`` tables of 0003_bi_aggregates.sql: a SummingMergeTree holds partial sums until
    its parts merge, and two batches can leave identical partial rows there, which are no duplicates.
    """
    return sorted(str(r[0]) for r in backend.query(
        f"SELECT name FROM system.tables WHERE database = '{backend.database}' "
        "AND engine LIKE '%MergeTree' AND name != 'schema_migrations' AND name NOT LIKE '%staging%' "
        "AND NOT startsWith(name, 'agg_')").rows)


def money_sums(backend: Backend, expected: dict[tuple[str, str], Decimal]) -> dict[tuple[str, str], Decimal]:
    out = {}
    for table, column in expected:
        v = backend.query(f"SELECT sum({column}) FROM {backend.database}.{table}").scalar()
        out[(table, column)] = Decimal(v or 0)
    return out


_READER = """
import json, sys
from decimal import Decimal
sys.path.insert(0, sys.argv[3])
from sinks.embedded import EmbeddedBackend
from tests.harness import all_tables, money_sums, table_stats
spec = json.loads(sys.argv[2])
b = EmbeddedBackend(sys.argv[1], database=spec["database"])
try:
    stats = table_stats(b)
    sums = money_sums(b, {tuple(k.split(".")): Decimal(0) for k in spec["sums"]})
    extra = {q: [list(map(str, r)) for r in b.query(sql).rows] for q, sql in spec.get("queries", {}).items()}
finally:
    b.close()
print(json.dumps({"stats": stats, "sums": {f"{t}.{c}": str(v) for (t, c), v in sums.items()}, "queries": extra}))
"""


@dataclass
class Snapshot:
    """What a test reads back: rows and duplicates per table, money sums, ad-hoc query rows."""

    stats: dict[str, tuple[int, int]]
    sums: dict[tuple[str, str], Decimal]
    queries: dict[str, list[list[str]]]

    def counts(self) -> dict[str, int]:
        return {t: n for t, (n, _) in self.stats.items()}

    def duplicates(self) -> dict[str, int]:
        return {t: d for t, (_, d) in self.stats.items() if d}


def snapshot(s: Settings, sums: Iterable[tuple[str, str]], queries: dict[str, str] | None = None) -> Snapshot:
    """Read the store of settings ``s``: in-process for a server, in a child process for chDB (the
    worker that owned the data path must have stopped; a SIGKILLed owner leaves it reusable)."""
    sums = list(sums)
    if s.ch_backend.value == "embedded":
        spec = {"database": s.ch_database, "sums": [f"{t}.{c}" for t, c in sums], "queries": queries or {}}
        res = subprocess.run([sys.executable, "-c", _READER, str(s.chdb_path), json.dumps(spec), str(ROOT)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        data = json.loads(res.stdout.strip().splitlines()[-1])
        return Snapshot({t: (int(v[0]), int(v[1])) for t, v in data["stats"].items()},
                        {tuple(k.split(".", 1)): Decimal(v) for k, v in data["sums"].items()},  # type: ignore[misc]
                        data["queries"])
    from sinks import connect

    b = connect(s.clickhouse())
    try:
        return Snapshot(table_stats(b), money_sums(b, {k: Decimal(0) for k in sums}),
                        {q: [list(map(str, r)) for r in b.query(sql).rows] for q, sql in (queries or {}).items()})
    finally:
        b.close()


# --- what the produced events should give -------------------------------------------------------
@dataclass
class Expected:
    rows: Counter[str]
    sums: dict[tuple[str, str], Decimal]
    dead: int


def expected_from(sent: Iterable[Sent], bad_positions: set[tuple[str, int, int]] | None = None) -> Expected:
    """Rows per table and money sums that the produced events must give, computed from the events
    themselves (not with the worker's code): every valid event once, every bad one dead-lettered."""
    rows: Counter[str] = Counter()
    sums: dict[tuple[str, str], int] = {}
    dead = 0
    bad = bad_positions or set()
    for x in sent:
        if (x.topic, x.partition, x.offset) in bad or x.datum is None:
            dead += 1
            continue
        short = x.record.rsplit(".", 1)[-1]
        table = PRIMARY_TABLE[short]
        rows[table] += 1
        spec = TABLES[table]
        for column, ch_type in spec.columns:
            if MONEY in ch_type and column in x.datum and x.datum[column] is not None:
                sign = -1 if x.record == REVERSAL and column in REVERSAL_MONEY else 1
                sums[(table, column)] = sums.get((table, column), 0) + sign * int(x.datum[column])
        if x.record == SETTLEMENT:
            lines = x.datum["fee_details"]
            rows["fee_details"] += len(lines)
            key = ("fee_details", "det_item_fee_sumamt")
            sums[key] = sums.get(key, 0) + sum(int(li["det_item_fee_sumamt"]) for li in lines)
    rows["dead_letters"] = dead
    return Expected(rows, {k: Decimal(v) / 100 for k, v in sums.items()}, dead)


# --- what landed, by content --------------------------------------------------------------------
@dataclass
class Landing:
    """Produced events as ClickHouse should hold them, or does, told apart by content alone.

    ``ids`` counts ``(table, event_id)`` of the valid events in their primary tables; ``dead``
    counts the original bytes of the dead letters (opened from their sealed ``payload``). Offsets
    play no part: a broker that hands out an offset twice cannot make two events look like one.
    """

    ids: Counter[tuple[str, str]]
    dead: Counter[bytes]

    def missing_from(self, got: Landing) -> int:
        """How many of these events ``got`` does not hold (yet)."""
        return sum((self.ids - got.ids).values()) + sum((self.dead - got.dead).values())

    def total(self) -> int:
        return sum(self.ids.values()) + sum(self.dead.values())

    def differences(self, got: Landing, limit: int = 10) -> str:
        """What ``got`` lacks and what it holds beyond these events, a few examples of each, for a failure."""
        parts = []
        for label, diff in (("missing", self.ids - got.ids), ("unexpected or repeated", got.ids - self.ids)):
            if diff:
                parts.append(f"{sum(diff.values())} {label} events, e.g. {sorted(diff.items())[:limit]}")
        for label, dead in (("missing", self.dead - got.dead), ("unexpected or repeated", got.dead - self.dead)):
            if dead:
                parts.append(f"{sum(dead.values())} {label} dead letters, e.g. "
                             f"{[(v[:24], n) for v, n in sorted(dead.items())[:limit]]}")
        return "; ".join(parts) or "none"


def expected_landing(sent: Iterable[Sent]) -> Landing:
    """The landing the produced events call for: every valid event's id in its record's primary table,
    every event produced as a bad frame (or without a value) among the dead letters."""
    ids: Counter[tuple[str, str]] = Counter()
    dead: Counter[bytes] = Counter()
    for x in sent:
        if x.datum is None:
            dead[x.value or b""] += 1
        else:
            ids[(PRIMARY_TABLE[x.record.rsplit(".", 1)[-1]], str(x.datum["event_id"]))] += 1
    return Landing(ids, dead)


def _as_bytes(v: Any) -> bytes:
    # clickhouse-driver returns str for a String holding valid UTF-8 and bytes otherwise
    return v if isinstance(v, bytes) else str(v or "").encode("utf-8")


def read_landing(s: Settings, backend: Backend) -> Landing:
    """What the primary tables and ``dead_letters`` of ``s`` hold, by content (a server backend can be
    read while the worker writes)."""
    from yibao.dlq import make_sealer

    ids: Counter[tuple[str, str]] = Counter()
    for table in sorted(set(PRIMARY_TABLE.values())):
        ids.update((table, str(r[0])) for r in backend.query(f"SELECT event_id FROM {backend.read_table(table)}").rows)
    sealer = make_sealer(s)
    dead = Counter(sealer.open(_as_bytes(r[0]))
                   for r in backend.query(f"SELECT payload FROM {backend.read_table('dead_letters')}").rows)
    return Landing(ids, dead)


def wait_landed(s: Settings, backend: Backend, want: Landing, worker: WorkerProcess | None, timeout: float,
                at_least: int | None = None) -> Landing:
    """Block until ClickHouse holds every event of ``want`` (or ``at_least`` of them); fail loudly if the
    worker died or time ran out. Content-based, so it cannot be fooled by committed offsets that an
    offset reused by the broker already "covers". Returns what was read last."""
    def measure() -> tuple[int, Landing]:
        got = read_landing(s, backend)
        return want.total() - want.missing_from(got), got

    target = want.total() if at_least is None else at_least
    return wait_for(measure, target, worker, timeout, "events landed", interval=0.5, explain=want.differences)
