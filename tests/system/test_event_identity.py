"""Exactly once per event, in event time: arrival order and re-sends change nothing.

The acceptance property of the pipeline, on the real broker and both ClickHouse engines. One
traffic (generated with every rule planted, plus a few broken events that must be dead-lettered)
is run twice, each time into fresh topics, consumer group and database:

* **run A**: the events in generated (event-time) order, each once, one worker process;
* **run B**: the same events as a producer fleet delivers them (:func:`yibao.sim.delivery.deliver`):
  shuffled so that no event arrives more than ``S`` of event time after one with a later event
  time, ``S`` = the settlement rules' allowed lateness minus one day, and ~3 % of them re-sent (the
  very same bytes at a later offset). They are produced in batches of random size (one producer
  per batch, flushed before the next) while the workers consume. On the server engine two worker
  processes of one consumer group consume concurrently. chDB allows one process per data path, so
  on the embedded engine run B's two workers run one after the other: the first is SIGKILLed at a
  random moment mid-stream and the second takes over.

Each run ends with every produced offset committed, the workers stopped, and one run of the
ClickHouse monitors (``yibao monitors run``; the workers' own monitor loop is off, because what a
periodic run finds depends on when it happens to run, not on the events). Then:

* every raw table and ``dead_letters`` holds the same rows in A and B, matched by identity
  (``event_id``; fee lines ``(setl_id, feedetl_sn)``; dead letters their payload digest) over all
  columns but the source position and ingestion time (and, for dead letters, what depends on the
  position or is sealed with a fresh nonce: ``event_id``, ``source_partition/offset``,
  ``source_key``, ``payload``, ``failed_at``; ``source_topic`` without the run's topic prefix);
* every ``bi_*`` view gives the same figures (both read right after run B: the views that look at
  today's date see the same day);
* the standing alerts are the same: the alerts whose latest version (as ``bi_alerts_by_rule``
  decides it: ``argMax`` by ``(detected_at, src_offset)``) is FIRED. An alert that one run fired
  on what it knew and retracted when a late event disproved it, and the other never raised, is not
  a difference: that is how a rule that fires early meets late events (rules.toml says which do). What that version says
  (institution, amount at risk, evidence...) is compared too but only reported, not asserted
  (``bi_institution_credit`` does depend on it: it attributes rule hits by the alert's institution);
* no alert version ``(alert_id, status, event_id)`` was written twice, in either run. The
  ``alerts`` table is a ReplacingMergeTree by ``alert_id``, so a merge would hide a second copy:
  before the workers start, the test attaches a plain MergeTree (``test_alerts_audit``) by a
  materialized view to the staging table ``alerts_in`` that every alert INSERT passes, and counts
  there. The alerts topic may carry repeats (at-least-once); they are counted and reported only;
* accounting in B: produced = landed (rows of the primary tables) + dead-lettered + re-sends
  recognised. The test knows how many copies it re-sent, so the difference is exact whatever
  happened to the processes. The workers' ``yibao_duplicates_recognised_total`` is checked too,
  where it can be: it lives in process memory, so on the embedded engine the killed worker's
  count is lost (the surviving worker must not count more re-sends than were sent); on the server
  both workers are scraped after everything is committed, and their sum must equal the re-sends
  (at least equal if a rebalance made a worker redeliver a batch the other had processed: its
  re-sends are then seen twice). Run A's worker must count none.

Every assertion message names the shuffle seed and the engine. The seed is drawn from
``os.urandom`` unless ``YIBAO_SHUFFLE_SEED`` is set; it drives the delivery order, the re-sends,
the batch sizes, the pauses between them and the kill moment (the traffic itself is fixed), so
``for i in $(seq 10); do YIBAO_SHUFFLE_SEED=$i pytest -k event_identity; done`` runs it ten times.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from schemas import Codec
from schemas.calendar import CHINA, DAY_MS
from sinks.tables import ALERTS_TABLE, DEAD_LETTER_TABLE, TABLES
from streams.records import PRIMARY_TABLE
from streams.topics import ensure_topics
from yibao.localinfra import ClickHouseEndpoint, MissingBinaryError, TansuBroker, free_port
from yibao.producer import OutEvent
from yibao.settings import Settings
from yibao.sim.corrupt import corrupt
from yibao.sim.delivery import deliver
from yibao.sim.generator import SimConfig, SimEvent
from yibao.sim.planters import Planting

from ..conftest import require_infra
from ..harness import ROOT, Ledger, Sent, WorkerProcess, produce_events, progress, run_cli, settings_for, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_ENV = "YIBAO_SHUFFLE_SEED"
RESEND_RATE = 0.03
DUPLICATES_METRIC = "yibao_duplicates_recognised_total"

# --- the traffic ------------------------------------------------------------------------------------
#: Four calendar months on three hospitals in two regions: about the smallest shape in which every
#: rule has a planted case, the hospital and DRG ones included (DRG upcoding needs two baseline
#: months with ≥ 30 stays at a hospital before the planted month, evaluate_in_process's docstring;
#: a high-cost stay needs 40 earlier stays of its DRG group), while a run stays near a minute.
CONFIG = SimConfig(settlements=4_000, days=94, hospitals=3, regions=2, seed=42,
                   start=datetime(2026, 6, 29, tzinfo=CHINA), late_payment_rate=0.0)
#: Per eligible settlement; the rates below are per rule as in tests/yibao/test_evaluate.py, a few
#: raised so that each rule gets cases at this size.
RATE = 0.01
RATES = {
    "YB-LINE-LEVEL": 0.01, "YB-LINE-SETTING": 0.01, "YB-LINE-PRICE": 0.008, "YB-VISIT-DUP": 0.1,
    "YB-PSN-RETEST": 0.2, "YB-PSN-OVERRX": 0.06, "YB-PSN-SHOP-1D": 0.01, "YB-STAY-SPLIT": 0.1,
    "YB-STAY-BEDHANG": 0.1, "YB-STAY-LOWADM": 0.01, "YB-HOSP-UPCODE": 1.0, "YB-HOSP-HIGHCOST": 0.3,
    "YB-PSN-GHOST": 0.01, "YB-PSI-OVERSELL": 0.001, "YB-PSI-TRACE-DUP": 0.001, "YB-PROC-VOLUME-LAG": 0.4,
    "YB-PROC-PAY-OVERDUE": 0.02, "YB-FUND-CAPACITY": 0.25, "YB-FUND-NEGATIVE": 0.25,
    "YB-PSI-SETTLED-OVER-SOLD": 0.01, "YB-SUP-CREDIT-LOW": 0.5,
}
#: Share of the events (never a planted one) sent broken, so that dead letters are compared too.
BAD_RATE = 0.004


@dataclass(frozen=True)
class Traffic:
    events: list[SimEvent]  # generated (event-time) order, each once
    outgoing: dict[int, OutEvent]  # id(event) -> what is sent for it (its datum, or broken bytes)
    bad: int
    planted: dict[str, int]  # rule id -> planted anomalies not voided by a reversal
    rules: list[str]


@functools.cache
def traffic() -> Traffic:
    planting = Planting("all", rate=RATE, rates=RATES)
    events = list(planting.generator(CONFIG).events())
    rng = random.Random(CONFIG.seed)
    codec = Codec()
    outgoing: dict[int, OutEvent] = {}
    broken: set[bytes] = set()
    for ev in events:
        out = OutEvent(ev.record, ev.key, ev.datum)
        if rng.random() < BAD_RATE and str(ev.datum.get("event_id")) not in planting.planted_ids:
            bad = corrupt(codec, ev, rng).event
            # distinct bytes only: two events broken into the same bytes (an empty frame, say) would
            # be one and the same dead letter by content, a re-send of each other
            if bad.value not in broken:
                broken.add(bad.value or b"")
                out = bad
        outgoing[id(ev)] = out
    planted = Counter(str(t["rule_id"]) for t in planting.truth() if not t["reversed"])
    rules = list(planting.rules)
    return Traffic(events, outgoing, len(broken), {r: planted[r] for r in rules}, rules)


def shuffle_seed() -> int:
    given = os.environ.get(SEED_ENV, "").strip()
    return int(given) if given else int.from_bytes(os.urandom(4), "big")


# --- infrastructure ---------------------------------------------------------------------------------
@dataclass
class Env:
    engine: str
    bootstrap: str
    ch: ClickHouseEndpoint | None
    tmp: Path
    databases: list[Settings] = field(default_factory=list)


@pytest.fixture(params=["embedded", "server"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    """A broker of this test alone (run B SIGKILLs a group member on the embedded engine, and
    two runs' groups come and go), and the session's ClickHouse server for the server engine."""
    try:
        broker = TansuBroker(workdir=tmp_path / "tansu")
    except MissingBinaryError as exc:
        require_infra(str(exc))
    ch = request.getfixturevalue("clickhouse_server") if request.param == "server" else None
    with broker:
        e = Env(request.param, broker.bootstrap, ch, tmp_path)
        yield e
        if ch is not None:
            from sinks import connect

            for s in e.databases:
                b = connect(s.clickhouse())
                try:
                    b.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
                finally:
                    b.close()


_STORE = """
import json, sys
sys.path.insert(0, sys.argv[3])
from sinks.embedded import EmbeddedBackend
spec = json.loads(sys.argv[2])
b = EmbeddedBackend(sys.argv[1], database=spec["database"])
try:
    for sql in spec["execute"]:
        b.execute(sql)
    out = {k: [[str(v) for v in r] for r in b.query(sql).rows] for k, sql in spec["queries"].items()}
finally:
    b.close()
print(json.dumps(out))
"""


def store(s: Settings, queries: dict[str, str], execute: Sequence[str] = ()) -> dict[str, list[list[str]]]:
    """Run ``execute`` statements, then ``queries`` (rows as strings) against the store of ``s``: in
    process on a server, in a child process on chDB (whose data path no worker may hold then)."""
    if s.ch_backend.value == "embedded":
        spec = {"database": s.ch_database, "execute": list(execute), "queries": queries}
        res = subprocess.run([sys.executable, "-c", _STORE, str(s.chdb_path), json.dumps(spec), str(ROOT)],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        out: dict[str, list[list[str]]] = json.loads(res.stdout.strip().splitlines()[-1])
        return out
    from sinks import connect

    b = connect(s.clickhouse())
    try:
        for sql in execute:
            b.execute(sql)
        return {k: [[str(v) for v in r] for r in b.query(sql).rows] for k, sql in queries.items()}
    finally:
        b.close()


AUDIT = "test_alerts_audit"


def prepare(e: Env, name: str) -> Settings:
    """Fresh topics, consumer group and database, migrated, topics created, alert audit attached."""
    s = settings_for(e.bootstrap, e.engine, e.tmp / name, ch=e.ch)
    e.databases.append(s)
    res = run_cli(["migrate"], worker_env(s), e.tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    asyncio.run(ensure_topics(s.kafka()))
    db = s.ch_database
    store(s, {}, [
        # detected_at raw, as the staging table has it: epoch seconds
        f"CREATE TABLE {db}.{AUDIT} (alert_id String, status String, event_id String, rule_id String, "
        "detected_at UInt32) ENGINE = MergeTree() PARTITION BY tuple() ORDER BY alert_id",
        f"CREATE MATERIALIZED VIEW {db}.{AUDIT}_mv TO {db}.{AUDIT} AS "
        f"SELECT alert_id, status, event_id, rule_id, detected_at FROM {db}.{ALERTS_TABLE}_in",
    ])
    return s


def run_env(s: Settings) -> dict[str, str]:
    # the lateness the test shuffles within must be the one the workers apply; no periodic monitors
    return worker_env(s, YIBAO_MONITOR_INTERVAL_S="0", YIBAO_ALLOWED_LATENESS_DAYS=str(s.allowed_lateness_days))


class Worker(WorkerProcess):
    """A worker process with a metrics port of its own."""

    def __init__(self, s: Settings, name: str, cwd: Path) -> None:
        super().__init__(run_env(s), cwd / f"{name}.log", cwd)
        self.name = name
        self.port = free_port()

    def launch(self) -> Worker:
        self.start(extra_env={"YIBAO_WEB_PORT": str(self.port)})
        return self

    def duplicates(self) -> dict[tuple[str, str], float]:
        """``yibao_duplicates_recognised_total`` by (topic, event_type), read from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            body = r.read().decode()
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(body):
            for sm in family.samples:
                if sm.name == DUPLICATES_METRIC:
                    key = (sm.labels.get("topic", ""), sm.labels.get("event_type", ""))
                    out[key] = out.get(key, 0.0) + sm.value
        return out

    def saw_redelivery(self) -> bool:
        return "redelivered offsets already landed" in self.log_tail(10**9)


def wait_all_committed(s: Settings, ledger: Ledger, workers: Sequence[Worker], timeout: float,
                       producing: threading.Thread | None = None, at_least: int | None = None) -> int:
    """Block until every produced offset (or ``at_least`` of them) is committed while the producer
    runs or after it finished; fail with the logs if a worker died or time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        ends = ledger.ends()
        done, produced = progress(s, ends) if ends else (0, 0)
        finished = producing is None or not producing.is_alive()
        if (at_least is not None and done >= at_least) or (at_least is None and finished and done >= produced):
            return done
        for w in workers:
            if not w.alive():
                raise AssertionError(f"worker {w.name} exited at {done}/{produced} committed:\n{w.log_tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {w.name} ---\n{w.log_tail(2000)}" for w in workers)
            raise AssertionError(f"only {done}/{produced} events committed after {timeout:.0f}s:\n{tails}")
        time.sleep(0.2)


def run_monitors(s: Settings, cwd: Path) -> None:
    res = run_cli(["monitors", "run", "--no-publish", "--json"], run_env(s), cwd)
    assert res.returncode == 0, res.stdout + res.stderr


@dataclass
class Run:
    name: str
    s: Settings
    sent: list[Sent]
    workers: list[Worker]
    #: duplicates metric per surviving worker, read after everything was committed
    duplicates: dict[str, dict[tuple[str, str], float]]
    seconds: float
    note: str = ""


def run_a(e: Env, t: Traffic) -> Run:
    """The events in generated order, each once; one worker."""
    t0 = time.monotonic()
    s = prepare(e, "a")
    sent = asyncio.run(produce_events(s, [t.outgoing[id(ev)] for ev in t.events], Codec()))
    ledger = Ledger()
    ledger.add(sent)
    w = Worker(s, "a-worker", e.tmp).launch()
    try:
        w.wait_ready()
        wait_all_committed(s, ledger, [w], timeout=600)
        dups = {w.name: w.duplicates()}
        assert w.terminate() == 0, w.log_tail()
    finally:
        w.stop_quietly()
    run_monitors(s, e.tmp)
    return Run("A", s, sent, [w], dups, time.monotonic() - t0)


def batches(items: list[OutEvent], rng: random.Random) -> list[list[OutEvent]]:
    """Consecutive runs of random length: mostly large, some of a few events."""
    out: list[list[OutEvent]] = []
    i = 0
    while i < len(items):
        n = rng.randint(1, 40) if rng.random() < 0.3 else rng.randint(1, max(1, len(items) // 6))
        out.append(items[i:i + n])
        i += n
    return out


def run_b(e: Env, t: Traffic, seed: int) -> tuple[Run, list[SimEvent]]:
    """The events as delivered (shuffled within the lateness, ~3 % re-sent) in random batches, two
    workers of one group: together on a server, one after the other (SIGKILL mid-stream) on chDB."""
    t0 = time.monotonic()
    s = prepare(e, "b")
    shuffle_s = (s.allowed_lateness_days - 1) * DAY_MS / 1000
    delivered = deliver(t.events, shuffle_within_s=shuffle_s, resend_rate=RESEND_RATE, seed=seed)
    # a broken frame no longer than its 5-byte header cannot be told from another one of its key cut
    # the same way (streams/identity.py): a re-send of it is a second dead letter, by design
    def header_only(ev: SimEvent) -> bool:
        value = t.outgoing[id(ev)].value
        return value is not None and len(value) <= 5

    seen: set[int] = set()
    delivered = [ev for ev in delivered if not (id(ev) in seen and header_only(ev)) and not seen.add(id(ev))]
    rng = random.Random(seed)
    parts = batches([t.outgoing[id(ev)] for ev in delivered], rng)
    pauses = [rng.uniform(0, 0.3) for _ in parts]
    kill_after = rng.randint(len(parts) // 4, max(len(parts) // 4, 3 * len(parts) // 4 - 1))
    kill_delay = rng.uniform(0, 1.0)
    ledger = Ledger()
    errors: list[BaseException] = []
    midway = threading.Event()

    def produce() -> None:
        try:
            for i, (part, pause) in enumerate(zip(parts, pauses, strict=True)):
                asyncio.run(produce_events(s, part, Codec(), ledger=ledger))  # flushed when it returns
                if i == kill_after:
                    midway.set()
                time.sleep(pause)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            midway.set()

    producer = threading.Thread(target=produce, daemon=True, name="produce-b")
    workers: list[Worker] = []
    note = f"{len(parts)} produce batches"
    try:
        if e.engine == "server":
            workers = [Worker(s, "b-worker-1", e.tmp).launch(), Worker(s, "b-worker-2", e.tmp).launch()]
            for w in workers:
                w.wait_ready()
            producer.start()
            wait_all_committed(s, ledger, workers, timeout=600, producing=producer)
        else:
            first = Worker(s, "b-worker-1", e.tmp).launch()
            workers = [first]
            first.wait_ready()
            producer.start()
            # mid-stream: after a random batch (the rest is still to come), once it committed something
            assert midway.wait(300), "the producer stalled"
            wait_all_committed(s, ledger, workers, timeout=300, producing=producer, at_least=1)
            time.sleep(kill_delay)
            first.kill()
            done, produced = progress(s, ledger.ends())
            note += (f"; b-worker-1 SIGKILLed after batch {kill_after + 1}, at {done} committed of {produced} "
                     f"produced so far, of {len(delivered)}")
            second = Worker(s, "b-worker-2", e.tmp).launch()
            workers.append(second)
            second.wait_ready()
            wait_all_committed(s, ledger, [second], timeout=600, producing=producer)
        producer.join(120)
        assert not producer.is_alive(), "the producer did not finish"
        if errors:
            raise errors[0]
        wait_all_committed(s, ledger, [w for w in workers if w.alive()], timeout=600)
        dups = {w.name: w.duplicates() for w in workers if w.alive()}
        for w in workers:
            if w.alive():
                assert w.terminate() == 0, w.log_tail()
    finally:
        for w in workers:
            w.stop_quietly()
        producer.join(30)
    run_monitors(s, e.tmp)
    sent = ledger.snapshot()
    assert len(sent) == len(delivered), (len(sent), len(delivered))
    return Run("B", s, sent, workers, dups, time.monotonic() - t0, note), delivered


# --- reading back -----------------------------------------------------------------------------------
#: Columns that legitimately differ between two runs of the same events.
POSITION = ("src_partition", "src_offset", "ingested_at")
DEAD_LETTER_POSITION = (*POSITION, "event_id", "source_partition", "source_offset", "source_key", "payload",
                        "failed_at")
#: What identifies a row of an event in its table (sinks/landed.py: by event; fee lines by line).
IDENTITY = {"fee_details": ("setl_id", "feedetl_sn"), DEAD_LETTER_TABLE: ("payload_digest",)}
ALERT_LATEST = "(detected_at, src_offset)"  # what bi_alerts_by_rule takes as the latest version
#: ... and what bi_institution_credit and yibao.sim.evaluate take (a tie in the second: RETRACTED)
ALERT_LATEST_CREDIT = "toUInt64(detected_at) * 2 + (status = 'RETRACTED')"
#: What an alert says besides its id and status (reported where A and B differ, not asserted).
CONTENT = ("fixmedins_code", "admdvs", "psn_token", "setl_ids", "window_start", "window_end", "amount_at_risk",
           "severity", "evidence_values")


def compared_columns(table: str) -> tuple[str, ...]:
    skip = DEAD_LETTER_POSITION if table == DEAD_LETTER_TABLE else POSITION
    return tuple(c for c in TABLES[table].column_names if c not in skip)


def identity(table: str) -> tuple[str, ...]:
    return IDENTITY.get(table, ("event_id",))


def data_tables() -> list[str]:
    """The tables events land in (precheck_log holds pre-settlement checks, not events)."""
    return sorted(t for t in TABLES if t not in (ALERTS_TABLE, "precheck_log"))


@dataclass
class Contents:
    tables: dict[str, list[list[str]]]
    views: dict[str, tuple[list[str], list[list[str]]]]
    standing: dict[str, tuple[str, str]]  # alert_id -> (status, rule_id) of its latest version
    history: dict[str, list[str]]  # alert_id -> its versions as written, "STATUS@detected_at", in that order
    latest_disagree: int  # alerts whose latest version the two definitions above tell apart
    content: dict[str, tuple[str, ...]]  # alert_id -> CONTENT of its latest version
    versions_twice: list[list[str]]  # (alert_id, status, event_id, copies) written more than once
    stored_twice: list[list[str]]  # the same, still visible in the (unmerged) alerts table


def read(s: Settings) -> Contents:
    db = s.ch_database
    listed = store(s, {"views": f"SELECT name FROM system.tables WHERE database = '{db}' AND engine = 'View' "
                                "AND startsWith(name, 'bi_') ORDER BY name"})
    views = [r[0] for r in listed["views"]]
    queries = {f"describe:{v}": f"DESCRIBE TABLE {db}.{v}" for v in views}  # 18.16: no system.columns.position
    queries.update({f"table:{t}": f"SELECT {', '.join(compared_columns(t))} FROM {db}.{t}" for t in data_tables()})
    queries.update({f"view:{v}": f"SELECT * FROM {db}.{v}" for v in views})
    queries["standing"] = (f"SELECT alert_id, argMax(status, {ALERT_LATEST}), argMax(rule_id, {ALERT_LATEST}) "
                           f"FROM {db}.{ALERTS_TABLE} GROUP BY alert_id")
    queries["content"] = (f"SELECT alert_id, {', '.join(f'argMax({c}, {ALERT_LATEST})' for c in CONTENT)} "
                          f"FROM {db}.{ALERTS_TABLE} GROUP BY alert_id")
    queries["history"] = (f"SELECT alert_id, status, detected_at FROM {db}.{AUDIT} "
                          "ORDER BY alert_id, detected_at, status = 'RETRACTED'")  # a retraction is later
    queries["disagree"] = (f"SELECT count() FROM (SELECT alert_id, argMax(status, {ALERT_LATEST}) AS x, "
                           f"argMax(status, {ALERT_LATEST_CREDIT}) AS y FROM {db}.{ALERTS_TABLE} GROUP BY alert_id) "
                           "WHERE x != y")
    for key, table in (("audit", AUDIT), ("stored", ALERTS_TABLE)):
        queries[key] = (f"SELECT alert_id, status, event_id, count() AS n FROM {db}.{table} "
                        "GROUP BY alert_id, status, event_id HAVING n > 1 ORDER BY n DESC, alert_id LIMIT 50")
    got = store(s, queries)
    dead = got[f"table:{DEAD_LETTER_TABLE}"]
    col = compared_columns(DEAD_LETTER_TABLE).index("source_topic")
    for r in dead:  # the topic without this run's prefix
        r[col] = r[col].removeprefix(s.topic_prefix)
    history: dict[str, list[str]] = {}
    for aid, status, at in got["history"]:
        when = datetime.fromtimestamp(int(at), CHINA).strftime("%Y-%m-%d %H:%M:%S")
        history.setdefault(aid, []).append(f"{status}@{when}")
    return Contents(
        tables={t: got[f"table:{t}"] for t in data_tables()},
        views={v: ([r[0] for r in got[f"describe:{v}"]], sorted(got[f"view:{v}"])) for v in views},
        standing={r[0]: (r[1], r[2]) for r in got["standing"]},
        history=history,
        latest_disagree=int(got["disagree"][0][0]),
        content={r[0]: tuple(r[1:]) for r in got["content"]},
        versions_twice=got["audit"],
        stored_twice=got["stored"],
    )


async def alerts_on_topic(s: Settings) -> Counter[str]:
    """How often each alert event (event_id) is on the alerts topic: read until 3 s of quiet."""
    codec = Codec()
    consumer = AIOKafkaConsumer(s.topic("alerts"), **s.kafka_client_kwargs(), group_id=f"chk-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=False, session_timeout_ms=6000)
    await consumer.start()
    out: Counter[str] = Counter()
    try:
        quiet = time.monotonic()
        while time.monotonic() - quiet < 3:
            got = await consumer.getmany(timeout_ms=500)
            for records in got.values():
                for r in records:
                    out[str(codec.decode(r.value).datum["event_id"])] += 1
                    quiet = time.monotonic()
    finally:
        await consumer.stop()
    return out


# --- comparing --------------------------------------------------------------------------------------
def _short(v: str, n: int = 40) -> str:
    return v if len(v) <= n else v[: n - 1] + "…"


def table_differences(table: str, a_rows: list[list[str]], b_rows: list[list[str]]) -> str | None:
    """What differs between two runs' rows of one table, matched by identity; None when nothing."""
    cols = compared_columns(table)
    idx = [cols.index(c) for c in identity(table)]
    a: dict[tuple[str, ...], Counter[tuple[str, ...]]] = {}
    b: dict[tuple[str, ...], Counter[tuple[str, ...]]] = {}
    for rows, into in ((a_rows, a), (b_rows, b)):
        for r in rows:
            into.setdefault(tuple(r[i] for i in idx), Counter())[tuple(r)] += 1
    if a == b:
        return None
    missing = [k for k in a if k not in b]
    extra = [k for k in b if k not in a]
    twice = [k for k in b if k in a and sum(b[k].values()) > sum(a[k].values())]
    fewer = [k for k in b if k in a and 0 < sum(b[k].values()) < sum(a[k].values())]
    changed = [k for k in b if k in a and sum(b[k].values()) == sum(a[k].values()) and a[k] != b[k]]
    parts = [f"{table}: A {len(a_rows)} rows, B {len(b_rows)}"]
    if missing:
        parts.append(f"{len(missing)} identities missing from B (e.g. {missing[:3]})")
    if extra:
        parts.append(f"{len(extra)} only in B (e.g. {extra[:3]})")
    if twice:
        n = sum(sum(b[k].values()) - sum(a[k].values()) for k in twice)
        parts.append(f"{len(twice)} stored more often in B ({n} extra rows, e.g. {twice[:3]})")
    if fewer:
        parts.append(f"{len(fewer)} stored less often in B (e.g. {fewer[:3]})")
    if changed:
        by_col: Counter[str] = Counter()
        example = ""
        for k in changed:
            ra, rb = sorted(a[k])[0], sorted(b[k])[0]
            diff = [i for i in range(len(cols)) if ra[i] != rb[i]]
            by_col.update(cols[i] for i in diff)
            if not example and diff:
                i = diff[0]
                example = f"{k}: {cols[i]} A={_short(ra[i])!r} B={_short(rb[i])!r}"
        parts.append(f"{len(changed)} differ in content (columns {dict(by_col.most_common(8))}; e.g. {example})")
    return "; ".join(parts)


def view_differences(view: str, cols: list[str], a_rows: list[list[str]], b_rows: list[list[str]]) -> str | None:
    if a_rows == b_rows:
        return None
    ca, cb = Counter(map(tuple, a_rows)), Counter(map(tuple, b_rows))
    only_a, only_b = sorted((ca - cb).elements()), sorted((cb - ca).elements())

    def show(rows: list[tuple[str, ...]]) -> str:
        return "; ".join(", ".join(f"{c}={_short(v, 24)}" for c, v in zip(cols, r, strict=False)) for r in rows[:2])

    out = f"{view}: A {len(a_rows)} rows, B {len(b_rows)}; {len(only_a)} only in A"
    out += f" [{show(only_a)}]" if only_a else ""
    out += f", {len(only_b)} only in B"
    return out + (f" [{show(only_b)}]" if only_b else "")


def standing_differences(a: Contents, b: Contents) -> str | None:
    """Alerts standing (latest version FIRED) in one run only, by rule, with an example's versions."""
    if {k for k, v in a.standing.items() if v[0] == "FIRED"} == {k for k, v in b.standing.items() if v[0] == "FIRED"}:
        return None
    rule = {k: v[1] for k, v in {**a.standing, **b.standing}.items()}
    kinds: dict[str, list[str]] = {}
    for aid in sorted(set(a.standing) | set(b.standing)):
        sa, sb = a.standing.get(aid, ("-",))[0], b.standing.get(aid, ("-",))[0]
        if sa == sb or "FIRED" not in (sa, sb):
            continue
        if "FIRED" in (sa, sb):
            kind = f"open in {'A' if sa == 'FIRED' else 'B'} only (A {sa}, B {sb})"
        else:
            kind = f"retracted in {'A' if sa == 'RETRACTED' else 'B'}, never raised in the other"
        kinds.setdefault(kind, []).append(aid)
    parts = [f"standing alerts differ: A {len(a.standing)} alert ids, B {len(b.standing)}"]
    for kind, ids in sorted(kinds.items()):
        ex = ids[0]
        parts.append(f"{len(ids)} {kind}: {dict(Counter(rule[i] for i in ids).most_common())}, e.g. {ex} "
                     f"({rule[ex]}) A {a.history.get(ex, [])} B {b.history.get(ex, [])}")
    return "; ".join(parts)


def content_differences(a: Contents, b: Contents) -> dict[str, dict[str, int]]:
    """Per rule and column: alerts of the same latest status in A and B whose latest version says
    something else (which institution, how much, the evidence)."""
    out: dict[str, Counter[str]] = {}
    for aid, (status, rule) in a.standing.items():
        if b.standing.get(aid, ("",))[0] != status or aid not in a.content or aid not in b.content:
            continue
        for col, va, vb in zip(CONTENT, a.content[aid], b.content[aid], strict=True):
            if va != vb:
                out.setdefault(rule, Counter())[col] += 1
    return {r: dict(c) for r, c in sorted(out.items())}


def fired_per_rule(c: Contents) -> dict[str, int]:
    return dict(sorted(Counter(r for st, r in c.standing.values() if st == "FIRED").items()))


def landed(c: Contents) -> int:
    """Events in their primary tables (one row per event there) plus dead letters."""
    return sum(len(c.tables[t]) for t in set(PRIMARY_TABLE.values())) + len(c.tables[DEAD_LETTER_TABLE])


# --- the test ---------------------------------------------------------------------------------------
def test_event_identity_arrival_order_and_resends_change_nothing(env: Env) -> None:
    seed = shuffle_seed()
    t = traffic()
    ctx = f"[engine={env.engine} shuffle seed={seed}: rerun with {SEED_ENV}={seed}]"
    print(f"\n{ctx} {len(t.events)} events ({t.bad} broken); planted {t.planted}")

    try:  # a run that fails on its way (a worker dies, nothing committed) names the seed too
        a = run_a(env, t)
        b, delivered = run_b(env, t, seed)
        ca, cb = read(a.s), read(b.s)  # both now, so that views reading today's date see the same day
        topic_a, topic_b = asyncio.run(alerts_on_topic(a.s)), asyncio.run(alerts_on_topic(b.s))
    except AssertionError as exc:
        raise AssertionError(f"{ctx} {exc}") from exc
    resends = len(delivered) - len(t.events)

    problems: list[str] = []
    # A is the reference: it must itself hold every event once
    if landed(ca) != len(t.events):
        problems.append(f"run A holds {landed(ca)} events (primary rows + dead letters) of {len(t.events)}")
    for table in data_tables():
        d = table_differences(table, ca.tables[table], cb.tables[table])
        if d:
            problems.append(d)
    for view in sorted(set(ca.views) | set(cb.views)):
        cols, rows_a = ca.views.get(view, ([], []))
        rows_b = cb.views.get(view, (cols, []))[1]
        d = view_differences(view, cols, rows_a, rows_b)
        if d:
            problems.append(d)
    d = standing_differences(ca, cb)
    if d:
        problems.append(d)
    for run, c in (("A", ca), ("B", cb)):
        if c.versions_twice:
            n = sum(int(r[3]) - 1 for r in c.versions_twice)
            problems.append(f"run {run}: {len(c.versions_twice)}{'+' if len(c.versions_twice) == 50 else ''} alert "
                            f"versions written more than once ({n} extra copies; (alert_id, status, event_id, copies) "
                            f"e.g. {c.versions_twice[:3]})")
        if c.stored_twice:
            problems.append(f"run {run}: alert versions still stored twice in the alerts table, "
                            f"e.g. {c.stored_twice[:3]}")
    # accounting in B: produced = landed + dead-lettered + re-sends recognised
    if len(b.sent) != landed(cb) + resends:
        problems.append(f"accounting in B: produced {len(b.sent)} != landed + dead-lettered {landed(cb)} "
                        f"+ re-sent {resends} (difference {len(b.sent) - landed(cb) - resends})")
    dups_a = sum(v for m in a.duplicates.values() for v in m.values())
    if dups_a:
        problems.append(f"run A's worker recognised {dups_a:g} duplicates where none was sent: {a.duplicates}")
    dups_b = sum(v for m in b.duplicates.values() for v in m.values())
    if env.engine == "server":
        redelivered = any(w.saw_redelivery() for w in b.workers)
        if dups_b < resends or (dups_b > resends and not redelivered):
            problems.append(f"{DUPLICATES_METRIC} in B: {dups_b:g} over both workers, re-sent {resends} "
                            f"(by worker and (topic, event_type): {b.duplicates})")
    elif dups_b > resends:
        problems.append(f"{DUPLICATES_METRIC} in B: the surviving worker counted {dups_b:g}, more than the "
                        f"{resends} re-sent: {b.duplicates}")

    repeats = {run: sum(n - 1 for n in c.values() if n > 1) for run, c in (("A", topic_a), ("B", topic_b))}
    summary = (f"{ctx} A {a.seconds:.0f}s, B {b.seconds:.0f}s ({b.note}); {len(t.events)} events, B produced "
               f"{len(b.sent)} ({resends} re-sent), shuffled within {b.s.allowed_lateness_days - 1} days; "
               f"duplicates metric A {dups_a:g}, B {dups_b:g} {b.duplicates}; alert events repeated on the topic "
               f"{repeats}; alerts whose latest version bi_alerts_by_rule and bi_institution_credit tell apart: "
               f"A {ca.latest_disagree}, B {cb.latest_disagree}; alerts of the same status whose latest version "
               f"says something else in B (by rule: columns): {content_differences(ca, cb)}; "
               f"FIRED standing alerts per rule A {fired_per_rule(ca)}, B {fired_per_rule(cb)}")
    print(summary)
    assert not problems, f"{ctx} runs A and B differ:\n- " + "\n- ".join(problems) + f"\n{summary}"
