"""ClickHouse cluster mode on two real 18.16 servers as two shards (ZooKeeper for ON CLUSTER).

What cluster mode promises: ``migrate`` builds the same local tables on every shard plus the
Distributed tables over them, the pipeline's totals through the Distributed tables equal what
was produced, each shard holds its own part (a region on one shard, fee lines beside their
settlement), and the exactly-once lookup sees every shard, so re-reading a topic from the start
inserts nothing twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from schemas import Codec
from sinks import ServerBackend, connect
from sinks.base import DISTRIBUTED_SUFFIX, STAGING_SUFFIX, Backend
from sinks.migrate import MV_SUFFIX, migrate
from sinks.tables import TABLES
from streams import metrics
from streams.app import create_app
from streams.topics import STREAMS
from yibao.localinfra import ClickHouseServer, KafkaEndpoint, MissingBinaryError, free_port
from yibao.producer import produce
from yibao.settings import Settings, load_settings

from ..conftest import require_infra
from ..servers import ZooKeeperServer
from .test_ops import ALL_TABLES, PRIMARY_TABLES, SETTLEMENT, expected_rows, mixed_traffic

pytestmark = pytest.mark.integration

CLUSTER = "yibao_shards"


@pytest.fixture(scope="module")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    try:
        zk = ZooKeeperServer(workdir=tmp_path_factory.mktemp("zookeeper"))
    except MissingBinaryError as exc:
        require_infra(f"ON CLUSTER DDL needs ZooKeeper: {exc}")
    with zk:
        yield zk


@pytest.fixture(scope="module")
def shards(zookeeper: ZooKeeperServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ClickHouseServer]]:
    """Two local ClickHouse servers that both know the cluster ``yibao_shards`` = [first, second]."""
    ports = [free_port()]
    while len(ports) < 2:
        port = free_port()
        if port not in ports:
            ports.append(port)
    replicas = "".join(
        f"<shard><replica><host>127.0.0.1</host><port>{p}</port></replica></shard>" for p in ports
    )
    config = (
        f"<remote_servers><{CLUSTER}>{replicas}</{CLUSTER}></remote_servers>"
        f"{zookeeper.config_xml()}"
        f"<distributed_ddl><path>/clickhouse/task_queue/ddl_{uuid.uuid4().hex[:8]}</path></distributed_ddl>"
    )
    try:
        servers = [
            ClickHouseServer(workdir=tmp_path_factory.mktemp(f"shard{i}"), tcp_port=p, extra_config_xml=config)
            for i, p in enumerate(ports, 1)
        ]
    except MissingBinaryError as exc:
        require_infra(f"no local clickhouse-server for the shards: {exc}")
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _backend(node: ClickHouseServer, database: str) -> ServerBackend:
    return ServerBackend(host=node.host, port=node.tcp_port, database=database, cluster=CLUSTER)


def _local_count(node: ClickHouseServer, db: str, table: str) -> int:
    return int(node.query(f"SELECT count() FROM {db}.{table}").strip())


@pytest.fixture(scope="module")
def cluster_db(shards: list[ClickHouseServer]) -> Iterator[str]:
    """A database migrated once on the cluster through the first node (ON CLUSTER DDL waits for
    every node: ~15 s on this machine, so the tests share it); dropped on every node afterwards."""
    db = f"cl_{uuid.uuid4().hex[:8]}"
    first = _backend(shards[0], db)
    try:
        migrate(first)
        yield db
    finally:
        first.execute(f"DROP DATABASE IF EXISTS {db} ON CLUSTER {CLUSTER}")
        first.close()


def test_migrate_on_cluster_builds_every_shard_and_the_distributed_tables(
    shards: list[ClickHouseServer], cluster_db: str
) -> None:
    db = cluster_db
    for node in shards:
        engines = dict(
            line.split("\t")
            for line in node.query(f"SELECT name, engine FROM system.tables WHERE database = '{db}'").splitlines()
        )
        for table in TABLES:
            assert engines[table].endswith("MergeTree"), (node.tcp_port, table)
            assert engines[f"{table}{STAGING_SUFFIX}"] == "Null"
            assert engines[f"{table}{STAGING_SUFFIX}{MV_SUFFIX}"] == "MaterializedView"
            assert engines[f"{table}{DISTRIBUTED_SUFFIX}"] == "Distributed"
            assert engines[f"{table}{STAGING_SUFFIX}{DISTRIBUTED_SUFFIX}"] == "Distributed"
        # inserts are routed by the table's shard key
        create = node.query(f"SHOW CREATE TABLE {db}.settlements{STAGING_SUFFIX}{DISTRIBUTED_SUFFIX}")
        assert TABLES["settlements"].shard_key in create
    # the bookkeeping was written on the first node only, yet a run through the second one sees
    # it (read from every node) and has nothing to do
    second = _backend(shards[1], db)
    try:
        assert second.read_table("settlements") == f"{db}.settlements{DISTRIBUTED_SUFFIX}"
        assert migrate(second)[0].startswith("nothing to do")
    finally:
        second.close()


def _settings(bootstrap: str, node: ClickHouseServer, db: str, data_dir: Path, group: str, prefix: str) -> Settings:
    return load_settings(
        kafka_bootstrap=bootstrap, topic_prefix=prefix, consumer_group=group, ch_backend="server",
        ch_host=node.host, ch_port=node.tcp_port, ch_database=db, ch_cluster=CLUSTER, data_dir=data_dir,
        session_timeout_ms=6000, web_port=0, batch_max_seconds=0.5, pseudo_key="cd" * 32,
    )


def _counts(backend: Backend) -> dict[str, int]:
    return {t: int(backend.query(f"SELECT count() FROM {backend.read_table(t)}").scalar()) for t in ALL_TABLES}


async def _ingest(s: Settings, until: int, timeout: float = 120) -> None:
    """Run one in-process worker until its ingestors have consumed ``until`` events in all."""
    app, service = create_app(s.worker())
    inputs = {s.topic(name) for name in STREAMS}
    try:
        await app.start()
        deadline = time.monotonic() + timeout
        while sum(i.stats["events"] for i in service.ingestors.values() if i.topic in inputs) < until:
            if time.monotonic() > deadline:
                pytest.fail(f"consumed only {[dict(i.stats) for i in service.ingestors.values()]} in {timeout}s")
            await asyncio.sleep(0.25)
    finally:
        await app.stop()


def test_pipeline_on_two_shards_lands_everything_once_spread_over_both(
    shards: list[ClickHouseServer], cluster_db: str, broker: KafkaEndpoint, tmp_path: Path
) -> None:
    db = cluster_db
    prefix = f"c{uuid.uuid4().hex[:6]}."
    s = _settings(broker.bootstrap, shards[0], db, tmp_path, f"g{uuid.uuid4().hex[:6]}", prefix)
    backend = connect(s.clickhouse())
    assert backend.cluster == CLUSTER
    try:
        events, reasons, valid = mixed_traffic(400, 0.05, seed=23)
        asyncio.run(produce(s, events, Codec()))
        asyncio.run(_ingest(s, len(events)))

        counts = _counts(backend)
        want = expected_rows(valid)
        for table in PRIMARY_TABLES:
            assert counts[table] == want[table], table
        assert counts["fee_details"] == want["fee_details"]
        assert counts["dead_letters"] == sum(reasons.values())
        settled = sum(e.datum["medfee_sumamt"] * (1 if e.record == SETTLEMENT else -1)
                      for e in valid if e.record.endswith(("Settlement", "SettlementReversal")))
        total = backend.query(f"SELECT sum(medfee_sumamt) FROM {backend.read_table('settlements')}").scalar()
        assert total == Decimal(settled) / 100

        # each shard holds its own, non-empty part; a region lives on one shard only, and every
        # fee line sits on the shard of its settlement (same insu_admdvs, same shard key)
        for table in ("settlements", "fee_details"):
            local = [_local_count(node, db, table) for node in shards]
            assert all(n > 0 for n in local), (table, local)
            assert sum(local) == counts[table]
        regions = [set(node.query(f"SELECT DISTINCT insu_admdvs FROM {db}.settlements").split()) for node in shards]
        assert regions[0] and regions[1] and not regions[0] & regions[1]
        for node in shards:
            orphans = node.query(
                f"SELECT count() FROM {db}.fee_details WHERE setl_id NOT IN (SELECT setl_id FROM {db}.settlements)"
            )
            assert int(orphans) == 0

        # a second consumer group re-reads both topics from the start: every row is found on
        # its shard through the Distributed table, so nothing lands twice
        skipped_before = {t: _skipped(t) for t in PRIMARY_TABLES}
        again = s.model_copy(update={"consumer_group": f"g{uuid.uuid4().hex[:6]}"})
        asyncio.run(_ingest(again, len(events)))
        assert _counts(backend) == counts
        for table in PRIMARY_TABLES:
            assert _skipped(table) - skipped_before[table] == counts[table], table
    finally:
        backend.close()


def _skipped(table: str) -> float:
    return metrics.REGISTRY.get_sample_value("yibao_redelivered_rows_skipped_total", {"table": table}) or 0.0


def test_regions_spread_over_shards_by_a_stable_key() -> None:
    """The shard key is a hash of the row's own columns, never rand(): a re-sent row goes to the
    shard of its first copy, and an alert's versions meet on one shard to be collapsed."""
    for spec in TABLES.values():
        assert spec.shard_by and all(c in spec.column_names for c in spec.shard_by), spec.name
        assert "rand" not in spec.shard_key
    assert TABLES["settlements"].shard_by == TABLES["fee_details"].shard_by == ("insu_admdvs",)
    assert TABLES["alerts"].shard_by == ("alert_id",)
    assert Counter(s.shard_by for s in TABLES.values())[("admdvs",)] >= 9


def test_monitors_and_credit_view_on_two_shards_find_what_one_server_finds(
    shards: list[ClickHouseServer], clickhouse_server: Any
) -> None:
    """The monitors (fund, settled-over-sold, credit) read every shard: the same landed rows on
    the cluster and on one server give the same alerts, and the credit view the same scores."""
    from streams.monitors import evaluate, write_alerts
    from streams.topology import build_rulebook
    from yibao.sim.evaluate import MONITOR_RULE_IDS, prepare_monitor_database, run_events
    from yibao.sim.generator import SimConfig
    from yibao.sim.planters import Planting

    planting = Planting(sorted(MONITOR_RULE_IDS), rates={
        "YB-FUND-CAPACITY": 0.3, "YB-FUND-NEGATIVE": 0.3, "YB-PSI-SETTLED-OVER-SOLD": 0.02, "YB-SUP-CREDIT-LOW": 0.5})
    config = SimConfig(settlements=3_000, days=70, seed=5, regions=4, hospitals=6, pharmacies=4)
    run = run_events(planting.generator(config).events(), collect_tables=True)
    db = f"clm_{uuid.uuid4().hex[:8]}"
    cluster = _backend(shards[0], db)
    single = ServerBackend(host=clickhouse_server.host, port=clickhouse_server.tcp_port, user=clickhouse_server.user,
                           password=clickhouse_server.password, database=db)
    rules = build_rulebook(load_settings().rules_file).current
    now = 1_900_000_000_000
    try:
        found = []
        for be in (cluster, single):
            prepare_monitor_database(be)
            for name, columns in run.tables.items():
                be.insert(name, columns)
            write_alerts(be, run.alerts)
            emitted = evaluate(be, rules, now_ms=now).emitted
            credit = be.query(f"SELECT fixmedins_code, score, rule_hits FROM {db}.bi_institution_credit "
                              "ORDER BY fixmedins_code").rows
            found.append((sorted((d["alert_id"], d["status"], d["amount_at_risk"]) for d in emitted),
                          [tuple(map(str, r)) for r in credit]))
        on_cluster, on_one = found
        assert on_cluster == on_one
        rules_fired = {d["rule_id"] for d in evaluate(single, rules, now_ms=now).emitted}
        assert rules_fired == MONITOR_RULE_IDS
        for table in ("settlements", "inventory_movements", "penalties"):
            local = [_local_count(node, db, table) for node in shards]
            assert all(n > 0 for n in local), (table, local)  # the rows really are spread
    finally:
        cluster.execute(f"DROP DATABASE IF EXISTS {db} ON CLUSTER {CLUSTER}")
        single.execute(f"DROP DATABASE IF EXISTS {db}")
        cluster.close()
        single.close()
