"""Monitoring rules on the real broker and ClickHouse: a window interrupted by a crash alerts once.

A person visits three institutions in one day (YB-PSN-SHOP-1D). The worker sees the first two
visits, is SIGKILLed, restarts (restoring the person's window from the changelog topic), then
sees the third: exactly one alert, in the alerts table and on the alerts topic.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from schemas import Codec
from sinks import connect
from sinks.base import Backend
from sinks.migrate import migrate
from tests.harness import committed_offsets
from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint
from yibao.producer import OutEvent, produce
from yibao.settings import Settings, load_settings
from yibao.sim.generator import SimConfig, TrafficGenerator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
HOUR_MS = 3_600_000


@pytest.fixture()
def env(broker: KafkaEndpoint, clickhouse_server: ClickHouseEndpoint, tmp_path: Path
        ) -> Iterator[tuple[Settings, Backend]]:
    tag = uuid.uuid4().hex[:8]
    s = load_settings(
        kafka_bootstrap=broker.bootstrap, topic_prefix=f"r{tag}.", consumer_group=f"g{tag}",
        ch_backend="server", ch_host=clickhouse_server.host, ch_port=clickhouse_server.tcp_port,
        ch_user=clickhouse_server.user, ch_password=clickhouse_server.password, ch_database=f"rules_{tag}",
        data_dir=tmp_path / "data", session_timeout_ms=6000, web_port=0, pseudo_key="cd" * 32,
    )
    backend = connect(s.clickhouse())
    migrate(backend)
    yield s, backend
    backend.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
    backend.close()


def _three_visits(gen: TrafficGenerator, events: list[Any]) -> list[dict[str, Any]]:
    """Three same-day outpatient visits of one person at three institutions of one level."""
    by_code = {i.code: i for i in gen.institutions}
    for ev in events:
        d = ev.datum
        if ev.record != SETTLEMENT or d["med_type"] != "11":
            continue
        if any(ln["hilist_code"][0] in "XZC" for ln in d["fee_details"]):
            continue  # services only: no drug or consumable that other rules could count
        home = by_code[d["fixmedins_code"]]
        others = [i for i in gen.institutions if i.kind == "H" and i.level == home.level
                  and i.code != home.code and i.admdvs[:2] == home.admdvs[:2]]
        if len(others) < 2:
            continue
        visits = [d]
        for k, inst in enumerate(others[:2], start=1):
            v = copy.deepcopy(d)
            v["event_id"] = str(uuid.uuid4())
            v["setl_id"] = f"{d['setl_id']}-X{k}"
            v["mdtrt_id"] = f"{d['mdtrt_id']}-X{k}"
            v["fixmedins_code"] = inst.code
            v["mdtrt_admdvs"] = inst.admdvs
            v["setl_time"] = d["setl_time"] + k * HOUR_MS // 2
            for ln in v["fee_details"]:
                ln["fee_ocur_time"] += k * HOUR_MS // 2
                ln["bilg_dr_code"] = None
            visits.append(v)
        return visits
    raise AssertionError("no suitable outpatient visit in the generated traffic")


def _alert_rows(backend: Backend, db: str, rule: str) -> list[tuple[Any, ...]]:
    return backend.query(
        f"SELECT alert_id, status, setl_ids, event_id FROM {db}.alerts WHERE rule_id = '{rule}' ORDER BY event_id"
    ).rows


async def _alerts_on_topic(s: Settings, codec: Codec, rule: str) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(s.topic("alerts"), **s.kafka_client_kwargs(), group_id=f"chk-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", session_timeout_ms=6000)
    await consumer.start()
    out = []
    try:
        quiet = time.monotonic()
        while time.monotonic() - quiet < 4:
            got = await consumer.getmany(timeout_ms=500)
            for records in got.values():
                for r in records:
                    a = codec.decode(r.value).datum
                    if a["rule_id"] == rule:
                        out.append(a)
                    quiet = time.monotonic()
    finally:
        await consumer.stop()
    return out


@pytest.mark.parametrize("state_store", ["memory", "disk"])
def test_window_interrupted_by_a_crash_alerts_exactly_once(env: tuple[Settings, Backend], tmp_path: Path,
                                                           state_store: str) -> None:
    """With the persons on disk (YIBAO_STATE_STORE=disk) the restarted worker reads back only what
    the changelog gained since its disk's last write, and the window still alerts exactly once."""
    s, backend = env
    codec = Codec()
    gen = TrafficGenerator(SimConfig(seed=3, settlements=1500, regions=6, hospitals=48))
    events = list(gen.events())
    v1, v2, v3 = _three_visits(gen, events)
    filler = [OutEvent(e.record, e.key, e.datum) for e in events]
    key = v1["psn_no"]
    asyncio.run(produce(s, [*filler[:700], OutEvent(SETTLEMENT, key, v1), OutEvent(SETTLEMENT, key, v2),
                            *filler[700:]], codec))
    env_vars = dict(os.environ, YIBAO_KAFKA_BOOTSTRAP=s.kafka_bootstrap, YIBAO_TOPIC_PREFIX=s.topic_prefix,
                    YIBAO_CONSUMER_GROUP=s.consumer_group, YIBAO_CH_BACKEND="server", YIBAO_CH_HOST=s.ch_host,
                    YIBAO_CH_PORT=str(s.ch_port), YIBAO_CH_DATABASE=s.ch_database, YIBAO_CH_USER=s.ch_user,
                    YIBAO_CH_PASSWORD=s.ch_password.get_secret_value(), YIBAO_DATA_DIR=str(s.data_dir),
                    YIBAO_WEB_PORT="0", YIBAO_SESSION_TIMEOUT_MS="6000", YIBAO_PSEUDO_KEY="cd" * 32,
                    YIBAO_BATCH_MAX_EVENTS="300", YIBAO_BATCH_MAX_SECONDS="0.3", YIBAO_STATE_STORE=state_store,
                    YIBAO_STATE_DIR=str(tmp_path / "state"))
    log_path = tmp_path / "worker.log"
    log = log_path.open("ab")
    db = s.ch_database

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"], env=env_vars,
                                stdout=log, stderr=subprocess.STDOUT)

    def landed(setl_id: str) -> bool:
        return bool(backend.query(f"SELECT count() FROM {db}.settlements WHERE setl_id = '{setl_id}'").rows[0][0])

    proc = start()
    try:
        deadline = time.monotonic() + 240
        parts = [(s.topic("settlement"), p) for p in range(s.topic_partitions)]
        # both visits landed, and a batch committed (so the changelog holds persons to restore)
        while not (landed(v1["setl_id"]) and landed(v2["setl_id"])
                   and max(asyncio.run(committed_offsets(s, parts)).values()) > 0):
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # mid-window: two visits seen, the third not yet sent
        proc.wait(10)
        killed_at = log_path.stat().st_size  # what the restarted worker logs comes after this
        assert _alert_rows(backend, db, "YB-PSN-SHOP-1D") == []
        asyncio.run(produce(s, [OutEvent(SETTLEMENT, key, v3)], codec))
        proc = start()
        deadline = time.monotonic() + 240
        while not _alert_rows(backend, db, "YB-PSN-SHOP-1D"):
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3)  # a duplicate would show up now
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows = _alert_rows(backend, db, "YB-PSN-SHOP-1D")
    assert len(rows) == 1, rows
    after_kill = log_path.read_bytes()[killed_at:].decode(errors="replace")
    restored = [sum(json.loads(m.group(1).replace("'", '"')).values()) for m in
                re.finditer(r"state restored\s+keys=(\{[^}]*\}) store=person", after_kill)]
    assert restored, after_kill[-3000:]
    if state_store == "disk":
        # the restart reads at most what the killed batch wrote (300 events: at most 300 persons and a
        # watermark per partition) when the kill fell between the changelog's ack and the disk write
        assert "does not fit its changelog" not in after_kill
        resumed = set(re.findall(r"state resumed from disk\s+changelog_from=\d+ changelog_to=\d+ partition=(\d) "
                                 r"store=person", after_kill))
        assert resumed == {"0", "1", "2", "3"}, after_kill[-3000:]
        assert restored[0] <= 300 + 4, f"the restart read {restored[0]} person records back, not only the tail"
    else:
        assert restored[0] > 0, restored  # every person seen, rebuilt from the whole changelog
    alert_id, status, setl_ids, _ = rows[0]
    assert status == "FIRED"
    assert {v1["setl_id"], v2["setl_id"], v3["setl_id"]} <= set(setl_ids)  # plus any other visit that day
    on_topic = asyncio.run(_alerts_on_topic(s, codec, "YB-PSN-SHOP-1D"))
    assert [a["alert_id"] for a in on_topic] == [alert_id]
    # nothing else fired on this traffic, and no clear person number reached the alerts table
    others = backend.query(f"SELECT rule_id, count() FROM {db}.alerts GROUP BY rule_id").rows
    assert others == [("YB-PSN-SHOP-1D", 1)]
    assert backend.query(f"SELECT count() FROM {db}.alerts WHERE psn_token = '{key}'").rows[0][0] == 0


def test_rule_pushed_to_a_running_worker_applies_without_restart(env: tuple[Settings, Backend],
                                                                   tmp_path: Path) -> None:
    """`yibao rules push`: the running worker applies the new parameter; alerts name version 2."""
    s, backend = env
    codec = Codec()
    gen = TrafficGenerator(SimConfig(seed=4, settlements=300, regions=6, hospitals=48))
    events = list(gen.events())
    v1, v2, _ = _three_visits(gen, events)
    env_vars = dict(os.environ, YIBAO_KAFKA_BOOTSTRAP=s.kafka_bootstrap, YIBAO_TOPIC_PREFIX=s.topic_prefix,
                    YIBAO_CONSUMER_GROUP=s.consumer_group, YIBAO_CH_BACKEND="server", YIBAO_CH_HOST=s.ch_host,
                    YIBAO_CH_PORT=str(s.ch_port), YIBAO_CH_DATABASE=s.ch_database, YIBAO_CH_USER=s.ch_user,
                    YIBAO_CH_PASSWORD=s.ch_password.get_secret_value(), YIBAO_DATA_DIR=str(s.data_dir),
                    YIBAO_WEB_PORT="0", YIBAO_SESSION_TIMEOUT_MS="6000", YIBAO_PSEUDO_KEY="cd" * 32,
                    YIBAO_BATCH_MAX_SECONDS="0.3")
    rules = (Path(__file__).resolve().parents[2] / "streams/rules/data/rules.toml").read_text(encoding="utf-8")
    start = rules.index('id = "YB-PSN-SHOP-1D"')
    block = rules[rules.rindex("[[rule]]", 0, start): rules.index("[[rule]]", start)]
    changed = block.replace("version = 1", "version = 2").replace("min_institutions = 3", "min_institutions = 2")
    rules_file = tmp_path / "shop.toml"
    rules_file.write_text(changed, encoding="utf-8")
    log_path = tmp_path / "worker.log"
    db = s.ch_database
    proc = subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"], env=env_vars,
                            stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
    try:
        asyncio.run(produce(s, [OutEvent(e.record, e.key, e.datum) for e in events], codec))
        deadline = time.monotonic() + 240
        while not backend.query(f"SELECT count() FROM {db}.settlements").rows[0][0]:
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        push = subprocess.run([sys.executable, "-m", "yibao.cli", "rules", "push", str(rules_file)], env=env_vars,
                              capture_output=True, text=True, timeout=120, check=False)
        assert push.returncode == 0, push.stderr
        listed = subprocess.run([sys.executable, "-m", "yibao.cli", "rules", "list", "--json"], env=env_vars,
                                capture_output=True, text=True, timeout=120, check=False)
        row = next(json.loads(x) for x in listed.stdout.splitlines() if '"YB-PSN-SHOP-1D"' in x)
        assert (row["version"], row["params"]["min_institutions"], row["source"]) == (2, 2, "pushed")
        time.sleep(3)  # the worker reads the rules topic continuously
        asyncio.run(produce(s, [OutEvent(SETTLEMENT, v1["psn_no"], v1), OutEvent(SETTLEMENT, v1["psn_no"], v2)],
                            codec))
        deadline = time.monotonic() + 240
        while not _alert_rows(backend, db, "YB-PSN-SHOP-1D"):
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    versions = backend.query(f"SELECT rule_version FROM {db}.alerts WHERE rule_id = 'YB-PSN-SHOP-1D'").rows
    assert versions and all(v == (2,) for v in versions)
    assert "rule updated" in log_path.read_text()
