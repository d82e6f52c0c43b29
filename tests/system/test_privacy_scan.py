"""No clear personal identifier leaves the worker: a scan of everything it wrote.

Realistic traffic (settlements, cross-province filings, tips with reporters; some of each broken on
purpose so dead letters exist) goes through a real worker. Then EVERY table of the database (every
column, every row, read through the backend, both engines) and EVERY topic the pipeline writes
(dead letters, alerts, the rule engine's internal and changelog topics: all but the three input
topics) are searched for every person number, ID-card number, name and phone number, and every tip
reporter's name, ID number and phone, that the generator put into the events. None may appear.

Then the key is rotated: with the retired key listed in ``YIBAO_PSEUDO_OLD_KEYS_FILE`` a dead letter
sealed before the rotation still opens; without it, it does not.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import Codec
from sinks.base import Backend
from streams.privacy import PrivacyError, Sealer, load_old_keys
from streams.topics import STREAMS
from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint
from yibao.producer import OutEvent
from yibao.settings import Settings
from yibao.sim.corrupt import corrupt
from yibao.sim.generator import SimConfig, TrafficGenerator

from ..harness import PSEUDO_KEY, ROOT, WorkerProcess, produce_events, run_cli, settings_for, wait_committed, worker_env

CLEAR_FIELDS = ("psn_no", "psn_cert_no", "psn_name", "tel", "rptr_name", "rptr_cert_no", "rptr_tel")


def identifiers(events: Iterable[Any]) -> set[str]:
    """Every clear identifier value the generator put into ``events``."""
    out: set[str] = set()
    for ev in events:
        for f in CLEAR_FIELDS:
            v = ev.datum.get(f)
            if isinstance(v, str) and v.strip():
                out.add(v)
    return out


def _texts(value: Any) -> Iterable[bytes]:
    if value is None:
        return
    if isinstance(value, bytes):
        yield value
    elif isinstance(value, str):
        yield value.encode("utf-8")
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _texts(k)
            yield from _texts(v)
    else:
        yield str(value).encode("utf-8")


def find(needles: set[str], blobs: Iterable[bytes]) -> set[str]:
    """Needles occurring anywhere inside any blob (substring match on the UTF-8 bytes)."""
    encoded = [(n, n.encode("utf-8")) for n in needles]
    hits: set[str] = set()
    for blob in blobs:
        if len(blob) < 2:
            continue
        for n, e in encoded:
            if e in blob:
                hits.add(n)
    return hits


def scan_backend(backend: Backend, needles: set[str]) -> dict[str, Any]:
    """Every table of the database, all columns, all rows: which needles occur, and row counts."""
    db = backend.database
    tables = [str(r[0]) for r in backend.query(f"SELECT name FROM system.tables WHERE database = '{db}'").rows]
    report: dict[str, Any] = {"hits": {}, "rows": {}}
    for t in tables:
        res = backend.query(f"SELECT * FROM {db}.{t}")
        report["rows"][t] = len(res.rows)
        # one blob per row keeps the scan linear in the data
        hits = find(needles, (b"\x1f".join(_texts(list(row))) for row in res.rows))
        if hits:
            report["hits"][t] = sorted(hits)[:5]
    return report


_EMBEDDED_SCAN = """
import json, sys
sys.path.insert(0, sys.argv[3])
from sinks.embedded import EmbeddedBackend
from tests.system.test_privacy_scan import scan_backend
needles = set(json.load(open(sys.argv[4], encoding="utf-8")))
b = EmbeddedBackend(sys.argv[1], database=sys.argv[2])
try:
    print(json.dumps(scan_backend(b, needles)))
finally:
    b.close()
"""


async def scan_topics(s: Settings, needles: set[str], codec: Codec) -> dict[str, Any]:
    """Every topic of this pipeline except its inputs, every record's key and value."""
    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(s.topic_prefix)]
    finally:
        await admin.close()
    inputs = {s.topic(x) for x in STREAMS}
    topics = sorted(set(names) - inputs)
    report: dict[str, Any] = {"hits": {}, "records": dict.fromkeys(topics, 0), "dead_letter_payloads_sealed": True}
    # no consumer group: partitions assigned by hand and read from the start, so no join to wait for
    consumer = AIOKafkaConsumer(**s.kafka_client_kwargs(), group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    blobs: dict[str, list[bytes]] = {t: [] for t in topics}
    try:
        parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        quiet_until = time.monotonic() + 3
        while time.monotonic() < quiet_until:
            for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                for r in records:
                    blobs[tp.topic].append((r.key or b"") + b"\x1f" + (r.value or b""))
                    if tp.topic == s.topic("deadletter"):
                        d = codec.decode(r.value).datum
                        if d["payload"] and not d["payload"].startswith(Sealer.MAGIC):
                            report["dead_letter_payloads_sealed"] = False
                quiet_until = time.monotonic() + 1.5
    finally:
        await consumer.stop()
    for topic, items in blobs.items():
        report["records"][topic] = len(items)
        hits = find(needles, items)
        if hits:
            report["hits"][topic] = sorted(hits)[:5]
    return report


def test_find_sees_identifiers_in_text_bytes_and_arrays() -> None:
    """The scanner itself: it must find a needle wherever a leak could hide."""
    needles = {"310115195106147592", "袁志强", "13504810906"}
    rows = [["x", ["a", "id 310115195106147592 here"]], [b"\x00\xff13504810906"], [{"k": "袁志强"}], ["clean"]]
    assert find(needles, (b"\x1f".join(_texts(r)) for r in rows)) == needles
    assert find(needles, [b"nothing personal"]) == set()


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["server", "embedded"])
def test_no_clear_identifier_in_any_table_or_output_topic(
    kind: str, broker: KafkaEndpoint, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ch: ClickHouseEndpoint | None = request.getfixturevalue("clickhouse_server") if kind == "server" else None
    s = settings_for(broker.bootstrap, kind, tmp_path / "data", ch=ch, pseudo_key_id="k1")
    codec = Codec()
    rng = random.Random(17)
    generated = list(TrafficGenerator(SimConfig(seed=17, settlements=150, tip_rate=0.2, filing_rate=0.2)).events())
    events: list[Any] = []
    for ev in generated:
        broken = rng.random() < 0.06 or (ev.event_type in ("Tip", "CrossProvinceFiling") and rng.random() < 0.3)
        events.append(corrupt(codec, ev, rng).event if broken else OutEvent(ev.record, ev.key, ev.datum))
    needles = identifiers(generated)
    assert len(needles) > 200 and any(ev.event_type == "Tip" for ev in generated)
    env = worker_env(s)
    res = run_cli(["migrate"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    sent = asyncio.run(produce_events(s, events, codec))
    ends: dict[tuple[str, int], int] = {}
    for x in sent:
        ends[(x.topic, x.partition)] = max(ends.get((x.topic, x.partition), 0), x.offset + 1)
    worker = WorkerProcess(env, tmp_path / "worker.log", tmp_path)
    try:
        worker.start()
        wait_committed(s, ends, worker, timeout=180)
        assert worker.terminate() == 0, worker.log_tail()
    finally:
        worker.stop_quietly()

    if kind == "embedded":
        needles_file = tmp_path / "needles.json"
        needles_file.write_text(json.dumps(sorted(needles)), encoding="utf-8")
        out = subprocess.run([sys.executable, "-c", _EMBEDDED_SCAN, str(s.chdb_path), s.ch_database, str(ROOT),
                              str(needles_file)], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        tables = json.loads(out.stdout.strip().splitlines()[-1])
    else:
        from sinks import connect

        backend = connect(s.clickhouse())
        try:
            tables = scan_backend(backend, needles)
        finally:
            backend.close()
    assert not tables["hits"], f"clear identifiers stored in ClickHouse: {tables['hits']}"
    # the scan saw real data, including the tables that hold tokens in place of identities
    for t in ("settlements", "fee_details", "cross_province_filings", "tips", "dead_letters"):
        assert tables["rows"].get(t, 0) > 0, (t, tables["rows"])
    topics = asyncio.run(scan_topics(s, needles, codec))
    assert not topics["hits"], f"clear identifiers on output topics: {topics['hits']}"
    assert topics["records"].get(s.topic("deadletter"), 0) == tables["rows"]["dead_letters"]
    assert topics["dead_letter_payloads_sealed"]
    print(f"{kind}: scanned {sum(tables['rows'].values())} rows in {len(tables['rows'])} tables and "
          f"{sum(topics['records'].values())} records on {len(topics['records'])} topics for {len(needles)} "
          "identifiers: none found")

    if kind == "server":
        _rotation_keeps_old_dead_letters_openable(s, env, tmp_path)


def _rotation_keeps_old_dead_letters_openable(s: Settings, env: dict[str, str], tmp_path: Path) -> None:
    """After rotating k1 -> k2, a k1-sealed dead letter opens only with k1 in the old-keys file."""
    from sinks import connect

    backend = connect(s.clickhouse())
    try:
        dl_id = str(backend.query(f"SELECT event_id FROM {s.ch_database}.dead_letters "
                                  "WHERE event_type = 'Settlement' LIMIT 1").scalar())
    finally:
        backend.close()
    rotated = dict(env, YIBAO_PSEUDO_KEY="cd" * 32, YIBAO_PSEUDO_KEY_ID="k2")
    without = run_cli(["dlq", "show", dl_id], rotated, tmp_path)
    assert json.loads(without.stdout)["payload_error"].endswith("unknown key id 'k1'")
    old = tmp_path / "old-keys"
    old.write_text(f"# retired 2026-11\nk1={PSEUDO_KEY}\n", encoding="utf-8")
    with_old = run_cli(["dlq", "show", dl_id], dict(rotated, YIBAO_PSEUDO_OLD_KEYS_FILE=str(old)), tmp_path)
    assert with_old.returncode == 0, with_old.stderr
    shown = json.loads(with_old.stdout)
    assert "payload_error" not in shown and (shown.get("event") or shown.get("payload_undecodable"))
    assert PSEUDO_KEY not in with_old.stdout + with_old.stderr


def test_old_keys_file_is_parsed_and_errors_never_echo_a_key(tmp_path: Path) -> None:
    good = tmp_path / "ok"
    good.write_text("\n# comment\nk1 = " + "11" * 32 + "\nk0=" + "22" * 16 + "\n", encoding="utf-8")
    keys = load_old_keys(good)
    assert keys == {"k1": bytes.fromhex("11" * 32), "k0": bytes.fromhex("22" * 16)}
    sealed = Sealer(keys["k1"], "k1").seal(b"original")
    assert Sealer(b"\x33" * 32, "k2", keys).open(sealed) == b"original"
    with pytest.raises(PrivacyError, match="unknown key id 'k1'"):
        Sealer(b"\x33" * 32, "k2").open(sealed)
    bad = tmp_path / "bad"
    secret = "44" * 32
    bad.write_text(f"k1 {secret}\n", encoding="utf-8")
    with pytest.raises(PrivacyError) as info:
        load_old_keys(bad)
    assert ":1:" in str(info.value) and secret not in str(info.value)
    short = tmp_path / "short"
    short.write_text("k1=abcd\n", encoding="utf-8")
    with pytest.raises(PrivacyError, match="shorter"):
        load_old_keys(short)
    assert load_old_keys(None) == {}
