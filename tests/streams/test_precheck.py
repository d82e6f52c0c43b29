"""The pre-settlement check (streams/precheck) at unit level: no broker, no ClickHouse.

* ``Prechecker.prepare``: what a hospital sends becomes the stream's raw datum, or a 400 naming the
  field and the stream's own reason.
* ``Prechecker.judge`` / ``SettlementEngine.preview`` on a real engine (built by ``build_pipeline`` over
  the seed rule base): the hits, their lines and messages, what an answer never says about other
  institutions, that a check changes no state, and that it answers what the stream then raises.
* routing: the assignor that hands every member the partition → URL map.
* the HTTP server: who may call, the refusals, state unavailable, forwarding to the holder, the
  rate limit, the documented answer, the log rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import jsonschema
import orjson
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from schemas import Codec
from sinks.tables import TABLES
from streams.config import PrecheckCaller, PrecheckConfig, RulesConfig, ValidationConfig
from streams.precheck import Answer, Invalid, Owners, Prechecker, PrecheckLog, PrecheckServer, Prepared, forward_key
from streams.precheck.openapi import document
from streams.precheck.routing import decode_table, owners_assignor, strategies
from streams.precheck.server import FORWARD_CALLER, FORWARD_SIGNATURE, FORWARD_TIME, RateLimiter
from streams.privacy import Pseudonymizer, Sealer
from streams.processors import BatchProcessor
from streams.rules.engine import SettlementEngine
from streams.rules.events import EngineEvent
from streams.topology import build_pipeline
from yibao.localinfra import free_port
from yibao.sim.generator import SimConfig
from yibao.sim.planters import Planting

from .rules.builders import CBC, HBA1C, OUTPATIENT_CONSULT, PSA, hospital, line, ms, settlement

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
KEY = bytes(range(32))
TOPIC = "yibao.settlement"
PARTITIONS = 4
HOSP = hospital(1)
API_KEY = "his-key-" + "a" * 24
OTHER_KEY = "his-key-" + "b" * 24
CJK = re.compile(r"[\u4e00-\u9fff]")


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --- a real engine, as the worker builds it -----------------------------------------------------------


@dataclass
class Rig:
    """The settlement stage of ``build_pipeline`` (seed rules) and a Prechecker over it."""

    codec: Codec
    processor: BatchProcessor
    engine: SettlementEngine
    prechecker: Prechecker
    pseudo: Pseudonymizer
    offsets: dict[int, int] = field(default_factory=dict)

    def prepared(self, datum: dict[str, Any]) -> Prepared:
        """``datum`` sent as a hospital sends it (JSON, decimals as strings), prepared."""
        p = self.prechecker.prepare(self.body(datum))
        assert isinstance(p, Prepared), p
        return p

    def body(self, datum: dict[str, Any]) -> dict[str, Any]:
        return self.codec.to_json(SETTLEMENT, datum)

    def settle(self, *datums: dict[str, Any]) -> list[dict[str, Any]]:
        """Each datum through the engine as the stream applies it (its own batch, rising offsets); the
        alerts raised."""
        alerts = []
        for d in datums:
            p = Prepared(d, "-").partition(PARTITIONS)
            o = self.offsets.get(p, 0)
            self.offsets[p] = o + 1
            alerts += [a for a, _, _ in self.engine.process([EngineEvent("Settlement", d, p, o)]).alerts]
        return alerts

    def check(self, datum: dict[str, Any]) -> Answer:
        p = self.prepared(datum)
        return self.prechecker.judge(p, p.partition(PARTITIONS))

    def state(self) -> bytes:
        """Everything of the engine a check must leave as it was, serialized."""
        st = self.engine.person
        return orjson.dumps({
            "data": {str(p): d for p, d in st.data.items()},
            "dirty": {str(p): sorted(ks) for p, ks in st.dirty.items()},
            "chunks": {str(p): d for p, d in st.chunks.items()},
            "watermark": {str(p): w for p, w in self.engine.watermark.items()},
            "stores": [s.name for s in self.engine.stores],
        }, option=orjson.OPT_SORT_KEYS)


def make_rig() -> Rig:
    codec = Codec()
    pseudo = Pseudonymizer(KEY, "t1")
    pipeline = build_pipeline(
        validation=ValidationConfig(frozenset({"310", "390"}), frozenset({"11", "14", "21", "41"}), 300, 2018),
        rules=RulesConfig(enabled=True, rules_file=None, allowed_lateness_days=35, monitor_interval_s=0),
        topic=lambda name: f"yibao.{name}", codec=codec, pseudonymizer=pseudo, sealer=Sealer(KEY, "t1"),
        streams=("settlement",))
    processor = pipeline.stages["settlement"].processor
    assert isinstance(processor, BatchProcessor) and isinstance(processor.engine, SettlementEngine)
    return Rig(codec, processor, processor.engine, Prechecker(codec, processor, processor.engine), pseudo)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


def hit_ids(a: Answer) -> list[str]:
    return sorted(h.rule_id for h in a.hits)


def visit(setl_id: str, day: int, codes: Iterable[str], *, hour: int = 10, psn: str = "31000007922213101851",
          h: str = HOSP, **kw: Any) -> dict[str, Any]:
    """An outpatient settlement of a consultation plus ``codes`` (each at its lowest capped price)."""
    return settlement(setl_id, ms(day, hour), [line(OUTPATIENT_CONSULT), *(line(c) for c in codes)], psn=psn, h=h,
                      **kw)


# --- 1. prepare ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [[], "a settlement", None, 3, [{"psn_no": "x"}]])
def test_a_body_that_is_not_one_json_object_is_refused(rig: Rig, body: Any) -> None:
    r = rig.prechecker.prepare(body)
    assert isinstance(r, Invalid) and r.reason_code == "MALFORMED_EVENT" and r.field == ""


def test_a_missing_field_is_named_by_its_path_without_the_record_name(rig: Rig) -> None:
    good = rig.body(visit("S1", 0, [CBC]))
    r = rig.prechecker.prepare({k: v for k, v in good.items() if k != "psn_no"})
    assert isinstance(r, Invalid) and (r.reason_code, r.field) == ("MISSING_FIELD", "psn_no"), r
    lines = [dict(ln) for ln in good["fee_details"]]
    del lines[1]["cnt"]
    r = rig.prechecker.prepare(dict(good, fee_details=lines))
    assert isinstance(r, Invalid) and (r.reason_code, r.field) == ("MISSING_FIELD", "fee_details[1].cnt"), r
    assert "cn.nhsa" not in r.detail and r.detail, r


def test_a_decimal_that_is_not_a_number_is_malformed_at_its_field(rig: Rig) -> None:
    good = rig.body(visit("S1", 0, [CBC]))
    r = rig.prechecker.prepare(dict(good, medfee_sumamt="12,50"))
    assert isinstance(r, Invalid) and (r.reason_code, r.field) == ("MALFORMED_EVENT", "medfee_sumamt"), r
    assert "12,50" in r.detail
    lines = [dict(good["fee_details"][0], pric="1.2.3"), *good["fee_details"][1:]]
    r = rig.prechecker.prepare(dict(good, fee_details=lines))
    assert isinstance(r, Invalid) and (r.reason_code, r.field) == ("MALFORMED_EVENT", "fee_details[0].pric"), r


def test_a_settlement_the_stream_would_dead_letter_gets_the_streams_reason_and_field(rig: Rig) -> None:
    good = rig.body(visit("S1", 0, [CBC]))
    r = rig.prechecker.prepare(dict(good, medfee_sumamt="99999.00"))
    assert isinstance(r, Invalid) and (r.reason_code, r.field) == ("AMOUNTS_DO_NOT_ADD_UP", "medfee_sumamt"), r
    assert "99999.00" in r.detail
    r = rig.prechecker.prepare(dict(good, mdtrt_id="M" * 300))
    assert isinstance(r, Invalid) and (r.reason_code, r.field) == ("FIELD_TOO_LONG", "mdtrt_id"), r
    # the same datum as the stream would see it is valid (the refusals above are about those fields)
    assert isinstance(rig.prechecker.prepare(good), Prepared)


def test_event_id_and_setl_id_may_be_left_out_and_event_type_is_ignored(rig: Rig) -> None:
    good = rig.body(visit("S1", 0, [CBC]))
    bare = {k: v for k, v in good.items() if k not in ("event_id", "setl_id")}
    r = rig.prechecker.prepare(dict(bare, event_type="Settlement"), check_id="0b1c9a52-0000-4000-8000-000000000001")
    assert isinstance(r, Prepared), r
    assert r.check_id == "0b1c9a52-0000-4000-8000-000000000001"
    assert r.datum["event_id"] == r.check_id and r.datum["setl_id"] == f"PRECHECK-{r.check_id}"
    assert "event_type" not in r.datum
    given = rig.prechecker.prepare(good)
    assert isinstance(given, Prepared)
    assert (given.datum["event_id"], given.datum["setl_id"]) == (good["event_id"], "S1")
    uuid.UUID(given.check_id)  # a fresh check id when none is given


def test_the_partition_is_the_producers_for_the_persons_key(rig: Rig) -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(PARTITIONS))
    for psn in ("31000007922213101851", "44000009111492855928", "P1", "PSN-关"):
        p = rig.prepared(visit("S1", 0, [CBC], psn=psn))
        assert p.key == psn.encode()
        assert p.partition(PARTITIONS) == DefaultPartitioner()(p.key, parts, parts)


# --- 2. judge and preview on a real engine ---------------------------------------------------------------


def test_a_repeat_test_within_its_interval_names_its_line_and_says_when_it_was_last_billed(rig: Rig) -> None:
    rig.settle(visit("S-EARLIER", 0, [HBA1C]))
    check = visit("S-NOW", 9, [CBC, HBA1C])
    a = rig.check(check)
    assert hit_ids(a) == ["YB-PSN-RETEST"], a.hits
    [h] = a.hits
    hba1c_sn = check["fee_details"][2]["feedetl_sn"]
    assert (h.lines, h.items) == ((hba1c_sn,), (HBA1C,))
    assert h.message_en.endswith("last billed 9.0 days ago; minimum interval 15 days"), h.message_en
    assert HBA1C in h.message_en
    assert CJK.search(h.message_zh) and "15" in h.message_zh and "9.0" in h.message_zh, h.message_zh
    assert (h.result_type, h.evidence["min_interval_days"], h.evidence["days_between"]) == ("SUSPICIOUS", "15", "9.0")
    assert a.to_json()["hits"][0]["lines"] == [hba1c_sn]
    # the same test past its interval (another person, 16 days apart) is no hit
    other = "31000007922213109999"
    rig.settle(visit("S-OTHER-1", 0, [HBA1C], psn=other))
    assert rig.check(visit("S-OTHER-2", 16, [CBC, HBA1C], psn=other)).hits == ()


def test_a_line_rule_names_the_restricted_items_line(rig: Rig) -> None:
    d = visit("S-PSA", 3, [CBC, PSA], gend="FEMALE", age=50)
    a = rig.check(d)
    assert hit_ids(a) == ["YB-LINE-SEX"], a.hits
    [h] = a.hits
    psa = d["fee_details"][2]
    assert (h.lines, h.items) == ((psa["feedetl_sn"],), (PSA,))
    assert (h.result_type, h.severity, h.scope) == ("DEFINITE", "HIGH", "line")
    assert h.amount_at_risk == f"{psa['det_item_fee_sumamt'] / 100:.2f}"
    assert h.message_zh.startswith("限性别项目") and h.message_en.startswith(h.name_en), h
    assert "male patients only" in h.message_en, h.message_en
    # the same item for a man of the same age is no hit
    assert rig.check(visit("S-PSA-M", 3, [CBC, PSA], gend="MALE", age=50, psn="P-MAN")).hits == ()


def test_doctor_shopping_is_told_as_a_count_without_naming_the_other_institutions(rig: Rig) -> None:
    elsewhere = [hospital(2), hospital(3)]
    rig.settle(*(visit(f"S-ELSEWHERE-{i}", 5, [CBC], hour=8 + i, h=h, mdtrt_id=f"M-ELSEWHERE-{i}")
                 for i, h in enumerate(elsewhere)))
    a = rig.check(visit("S-HERE", 5, [CBC], hour=15))
    assert hit_ids(a) == ["YB-PSN-SHOP-1D"], a.hits
    [h] = a.hits
    assert h.evidence["institutions"] == "3" and "fixmedins_codes" not in h.evidence
    assert (h.lines, h.items) == ((), ())
    text = json.dumps(a.to_json(), ensure_ascii=False)
    assert HOSP in text  # positive control: the caller's own institution is there
    for secret in [*elsewhere, "S-ELSEWHERE-0", "S-ELSEWHERE-1", "M-ELSEWHERE-0", "M-ELSEWHERE-1"]:
        assert secret not in text, f"{secret} of another institution in the answer"
    # the engine's own alert does name them: the answer drops them, they are not just absent
    [raised] = [x for x in rig.settle(visit("S-HERE", 5, [CBC], hour=15)) if x["rule_id"] == "YB-PSN-SHOP-1D"]
    assert set(raised["evidence"]["fixmedins_codes"].split(",")) == {HOSP, *elsewhere}


def test_a_check_changes_no_state_and_answers_the_same_twice(rig: Rig) -> None:
    rig.settle(visit("S1", 0, [HBA1C]), visit("S2", 4, [CBC], h=hospital(2)),
               visit("S3", 4, [CBC], h=hospital(3), hour=12), visit("S4", 1, [CBC], psn="P-OTHER"))
    before = rig.state()
    checks = [visit("S5", 4, [HBA1C, PSA], hour=16, gend="FEMALE"), visit("S6", 2, [CBC], psn="P-OTHER"),
              visit("S7", 30, [CBC], psn="P-NEW")]
    first = [rig.check(d) for d in checks]
    assert rig.state() == before
    second = [rig.check(d) for d in checks]
    assert rig.state() == before
    assert hit_ids(first[0]) == ["YB-LINE-SEX", "YB-PSN-RETEST", "YB-PSN-SHOP-1D"]

    def comparable(a: Answer) -> dict[str, Any]:
        return {k: v for k, v in a.to_json().items() if k not in ("check_id", "checked_at")}

    assert [comparable(a) for a in first] == [comparable(a) for a in second]
    # and the stream still raises what the check announced (the check did not use the alerts up)
    raised = rig.settle(checks[0])
    assert sorted(x["rule_id"] for x in raised if x["status"] == "FIRED") == hit_ids(first[0])


def test_a_check_of_each_generated_settlement_answers_what_the_stream_then_raises_for_it(rig: Rig) -> None:
    gen = Planting("all", rate=0.2).generator(SimConfig(settlements=400, seed=11, days=7, hospitals=8, regions=2))
    raised: Counter[str] = Counter()
    checked = 0
    for e in gen.events():
        short = e.record.rsplit(".", 1)[1]
        if short not in ("Settlement", "SettlementReversal"):
            continue
        p = Prepared(e.datum, "-").partition(PARTITIONS)
        answer = rig.prechecker.judge(Prepared(e.datum, str(uuid.uuid4())), p) if short == "Settlement" else None
        o = rig.offsets.get(p, 0)
        rig.offsets[p] = o + 1
        out = rig.engine.process([EngineEvent(short, e.datum, p, o)])
        if answer is None:
            continue
        fired = sorted(a["rule_id"] for a, _, _ in out.alerts if a["status"] == "FIRED")
        assert hit_ids(answer) == fired, f"{e.datum['setl_id']}: checked {hit_ids(answer)}, raised {fired}"
        raised.update(fired)
        checked += 1
    assert checked >= 300 and sum(raised.values()) >= 50 and len(raised) >= 6, raised


# --- 3. routing -----------------------------------------------------------------------------------------


class FakeCluster:
    """The one method of ClusterMetadata the round-robin assignment reads."""

    def __init__(self, partitions: Mapping[str, int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.partitions.get(topic)
        return set(range(n)) if n is not None else None


def test_every_member_gets_the_same_map_of_every_partition_to_its_holders_url() -> None:
    urls = {"m-a": "https://w1.example:8443", "m-b": "https://w2.example:8443", "m-c": "http://127.0.0.1:9555"}
    owners = {m: Owners() for m in urls}
    assignors = {m: owners_assignor(u, owners[m]) for m, u in urls.items()}
    # what each member announces goes over the wire and back
    metadata = {m: ConsumerProtocolMemberMetadata.decode(a.metadata([TOPIC]).encode()) for m, a in assignors.items()}
    assert {m: md.user_data for m, md in metadata.items()} == {m: u.encode() for m, u in urls.items()}
    result = assignors["m-b"].assign(cast(ClusterMetadata, FakeCluster({TOPIC: 8})), metadata)
    assert result.keys() == urls.keys()
    for m, assignment in result.items():
        assignors[m].on_assignment(ConsumerProtocolMemberAssignment.decode(assignment.encode()))
    expected = {TOPIC: {p: urls[m] for m, a in result.items() for t, ps in a.assignment for p in ps}}
    assert sorted(expected[TOPIC]) == list(range(8))  # every partition, each to one member
    assert {len([p for p, u in expected[TOPIC].items() if u == url]) for url in urls.values()} == {2, 3}
    for m in urls:
        assert owners[m].by_topic == expected and owners[m].generation == 1
        assert owners[m].partitions(TOPIC) == 8 and owners[m].partitions("other") == 0
        assert owners[m].url(TOPIC, 8) is None and owners[m].url("other", 0) is None
    # the partitions are those of aiokafka's own round robin: only the user data is added
    plain = RoundRobinPartitionAssignor.assign(cast(ClusterMetadata, FakeCluster({TOPIC: 8})), metadata)
    assert {m: a.assignment for m, a in plain.items()} == {m: a.assignment for m, a in result.items()}


def test_a_member_announcing_no_url_leaves_its_partitions_without_one() -> None:
    owners = Owners()
    a = owners_assignor("http://w1:1", owners)
    metadata = {"m-a": a.metadata([TOPIC]), "m-old": RoundRobinPartitionAssignor.metadata([TOPIC])}
    result = a.assign(cast(ClusterMetadata, FakeCluster({TOPIC: 4})), metadata)
    a.on_assignment(result["m-a"])
    old = {p for _, ps in result["m-old"].assignment for p in ps}
    assert old and all(owners.url(TOPIC, p) is None for p in old)
    assert all(owners.url(TOPIC, p) == "http://w1:1" for p in set(range(4)) - old)


@pytest.mark.parametrize("blob", [None, b"", b"garbage", b"\xff\xfe", b"[1, 2]", b"null", b'"x"', b'{"t": 5}',
                                  b'{"t": {"zero": "http://w"}}', b'{"t": [1]}'])
def test_user_data_that_is_no_map_decodes_to_an_empty_one(blob: bytes | None) -> None:
    assert decode_table(blob) == {}


def test_a_roundrobin_assignment_empties_the_map() -> None:
    owners = Owners()
    a = owners_assignor("http://w1:1", owners)
    owners.update({TOPIC: {0: "http://w2:1"}})
    a.on_assignment(ConsumerProtocolMemberAssignment(0, [(TOPIC, [0, 1])], b""))
    assert owners.by_topic == {} and owners.url(TOPIC, 0) is None and owners.generation == 2
    assert decode_table(b'{"t": {"3": "http://w"}}') == {"t": {3: "http://w"}}


def test_the_owners_assignor_goes_first_and_roundrobin_is_always_offered() -> None:
    owners = Owners()
    assert strategies(None, owners) == (RoundRobinPartitionAssignor,)
    first, second = strategies("http://w1:1", owners)
    assert isinstance(first, type) and issubclass(first, RoundRobinPartitionAssignor)
    assert cast(type[RoundRobinPartitionAssignor], first).name == "yibao-owners"
    assert second is RoundRobinPartitionAssignor


# --- 4. the HTTP server ---------------------------------------------------------------------------------


@dataclass
class FakeHolder:
    """Which partitions this worker holds and which of them are still being restored."""

    owned: set[int]
    restoring_: set[int] = field(default_factory=set)
    n: int = PARTITIONS

    def owns(self, partition: int) -> bool:
        return partition in self.owned

    def restoring(self, partition: int) -> bool:
        return partition in self.restoring_

    def partitions(self) -> int:
        return self.n


ALL = set(range(PARTITIONS))
CALLER = PrecheckCaller("his-1", frozenset({HOSP}), frozenset({sha(API_KEY)}), rate_per_s=1000, burst=1000)
OTHER = PrecheckCaller("his-2", frozenset({hospital(2)}), frozenset({sha(OTHER_KEY)}), cert_cn="his-2.example")


def make_server(rig: Rig, holder: FakeHolder, owners: Owners | None = None,
                callers: tuple[PrecheckCaller, ...] = (CALLER, OTHER), **config: Any) -> PrecheckServer:
    cfg = PrecheckConfig(**{"host": "127.0.0.1", "port": 0, "callers": callers, **config})
    return PrecheckServer(cfg, rig.prechecker, holder, owners or Owners(), TOPIC, forward_key(KEY),
                          PrecheckLog(None, rig.pseudo.token))


@asynccontextmanager
async def served_app(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a port of its own (the test server picks it); its base URL."""
    ts = TestServer(app, host="127.0.0.1")
    await ts.start_server()
    try:
        yield str(ts.make_url("")).rstrip("/")
    finally:
        await ts.close()


def served(server: PrecheckServer) -> AbstractAsyncContextManager[str]:
    """The server's app alone (no client session of its own: it cannot forward)."""
    return served_app(server.app())


@asynccontextmanager
async def started(server: PrecheckServer) -> AsyncIterator[str]:
    """The server as the worker runs it (``start``: its own client session for forwarding)."""
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        await server.stop()


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str]


async def post(url: str, body: Any, key: str | None = API_KEY,
               content_type: str = "application/json", headers: Mapping[str, str] | None = None) -> Reply:
    h = {"Content-Type": content_type, **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(url + "/v1/precheck", data=data, headers=h) as r:
        raw = await r.read()
        return Reply(r.status, json.loads(raw) if raw else {}, dict(r.headers))


def signed(body: bytes, caller: str, *, at: float | None = None, key: bytes = KEY) -> dict[str, str]:
    """The headers a worker forwarding ``body`` for ``caller`` sends (HMAC over caller, time and body)."""
    when = f"{time.time() if at is None else at:.3f}"
    sig = hmac.new(forward_key(key), caller.encode() + b"\n" + when.encode() + b"\n" + body, hashlib.sha256)
    return {FORWARD_CALLER: caller, FORWARD_TIME: when, FORWARD_SIGNATURE: sig.hexdigest()}


def schema(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}", "components": document()["components"]}


def refused(r: Reply, status: int, code: str) -> bool:
    return r.status == status and r.body.get("code") == code and set(r.body) == {"code", "message", "field",
                                                                               "reason_code"}


def test_only_known_callers_checking_their_own_institution_get_an_answer(rig: Rig) -> None:
    body = rig.body(visit("S1", 0, [CBC, PSA], gend="FEMALE"))

    async def scenario() -> None:
        async with served(make_server(rig, FakeHolder(ALL))) as url:
            ok = await post(url, body)
            assert ok.status == 200, ok.body
            assert [h["rule_id"] for h in ok.body["hits"]] == ["YB-LINE-SEX"]
            jsonschema.validate(ok.body, schema("Answer"))
            for key in (None, "not-a-key-of-anyone", API_KEY + "x", " "):
                r = await post(url, body, key=key)
                assert refused(r, 401, "UNAUTHENTICATED"), (key, r)
                assert "Bearer" in r.headers.get("WWW-Authenticate", "")
            r = await post(url, body, key=None, headers={"Authorization": f"Basic {API_KEY}"})
            assert refused(r, 401, "UNAUTHENTICATED")
            r = await post(url, body, key=OTHER_KEY)
            assert refused(r, 403, "FORBIDDEN_INSTITUTION") and r.body["field"] == "fixmedins_code", r
            assert (await post(url, dict(body, fixmedins_code=hospital(2)), key=OTHER_KEY)).status != 403

    asyncio.run(scenario())


def test_what_is_not_one_json_settlement_is_refused_with_its_reason(rig: Rig) -> None:
    body = rig.body(visit("S1", 0, [CBC]))

    async def scenario() -> None:
        async with served(make_server(rig, FakeHolder(ALL), max_body_bytes=4096)) as url:
            r = await post(url, json.dumps(body).encode(), content_type="text/plain")
            assert refused(r, 415, "UNSUPPORTED_MEDIA_TYPE"), r
            r = await post(url, b"{not json")
            assert refused(r, 400, "MALFORMED_JSON"), r
            r = await post(url, {k: v for k, v in body.items() if k != "psn_no"})
            assert refused(r, 400, "INVALID_SETTLEMENT"), r
            assert (r.body["reason_code"], r.body["field"]) == ("MISSING_FIELD", "psn_no")
            r = await post(url, dict(body, medfee_sumamt="99999.00"))
            assert refused(r, 400, "INVALID_SETTLEMENT"), r
            assert (r.body["reason_code"], r.body["field"]) == ("AMOUNTS_DO_NOT_ADD_UP", "medfee_sumamt")
            r = await post(url, [body])
            assert refused(r, 400, "INVALID_SETTLEMENT") and r.body["reason_code"] == "MALFORMED_EVENT", r
            big = json.dumps(dict(body, psn_name="x" * 5000)).encode()
            assert len(big) > 4096
            r = await post(url, big)
            assert refused(r, 413, "TOO_LARGE"), r
            r = await post(url, big, key=None)  # the size is refused before anything else is read
            assert r.status == 413
            assert (await post(url, body)).status == 200  # positive control

    asyncio.run(scenario())


def test_while_the_persons_partition_is_restoring_the_answer_is_state_unavailable(rig: Rig) -> None:
    d = visit("S1", 0, [CBC])
    p = rig.prepared(d).partition(PARTITIONS)
    holder = FakeHolder(ALL, restoring_={p})

    async def scenario() -> None:
        async with served(make_server(rig, holder)) as url:
            r = await post(url, rig.body(d))
            assert refused(r, 503, "STATE_UNAVAILABLE") and r.headers.get("Retry-After") == "1", r
            assert str(p) in r.body["message"]
            holder.restoring_.clear()
            assert (await post(url, rig.body(d))).status == 200

    asyncio.run(scenario())


def test_a_partition_held_elsewhere_without_a_known_url_or_no_partition_at_all_is_unavailable(rig: Rig) -> None:
    d = rig.body(visit("S1", 0, [CBC]))

    async def scenario() -> None:
        async with served(make_server(rig, FakeHolder(set()))) as url:
            r = await post(url, d)
            assert refused(r, 503, "STATE_UNAVAILABLE") and r.headers.get("Retry-After") == "1", r
        async with served(make_server(rig, FakeHolder(set(), n=0))) as url:
            r = await post(url, d)
            assert refused(r, 503, "STATE_UNAVAILABLE"), r

    asyncio.run(scenario())


def test_a_check_reaching_another_worker_is_forwarded_to_the_holder_and_its_answer_relayed(rig: Rig) -> None:
    d = visit("S1", 0, [CBC, PSA], gend="FEMALE")
    owners = Owners()
    front = make_server(rig, FakeHolder(set()), owners, port=free_port())
    holder = make_server(rig, FakeHolder(ALL))

    async def scenario() -> None:
        async with served(holder) as holder_url, started(front) as front_url:
            owners.update({TOPIC: dict.fromkeys(range(PARTITIONS), holder_url)})
            r = await post(front_url, rig.body(d))
            assert r.status == 200, r.body
            assert r.body["setl_id"] == "S1" and [h["rule_id"] for h in r.body["hits"]] == ["YB-LINE-SEX"]
            jsonschema.validate(r.body, schema("Answer"))
            # answered (and logged) by the holder, for the caller the front authenticated
            assert [row[2] for row in holder.log.rows] == [CALLER.id] and not front.log.rows
            # the holder's refusals come back as they are
            r = await post(front_url, dict(rig.body(d), medfee_sumamt="99999.00"))
            assert refused(r, 400, "INVALID_SETTLEMENT") and r.body["field"] == "medfee_sumamt", r

    asyncio.run(scenario())


def test_a_forwarded_check_needs_a_fresh_signature_over_its_caller_and_body(rig: Rig) -> None:
    body = json.dumps(rig.body(visit("S1", 0, [CBC]))).encode()
    other = json.dumps(rig.body(visit("S2", 0, [CBC]))).encode()

    async def scenario() -> None:
        async with served(make_server(rig, FakeHolder(ALL))) as url:
            ok = await post(url, body, key=None, headers=signed(body, CALLER.id))
            assert ok.status == 200, ok.body  # positive control: the signing here is the workers'
            for headers in (signed(body, CALLER.id, key=bytes(32)),  # another deployment's key
                            signed(other, CALLER.id),  # signed for another body
                            signed(body, CALLER.id, at=time.time() - 120),  # stale
                            signed(body, CALLER.id, at=time.time() + 120),  # from the future
                            {**signed(body, CALLER.id), FORWARD_TIME: "soon"},
                            {**signed(body, CALLER.id), FORWARD_CALLER: OTHER.id},  # caller swapped
                            signed(body, "nobody")):  # a valid signature for an unknown caller
                r = await post(url, body, key=None, headers=headers)
                assert refused(r, 401, "UNAUTHENTICATED"), (headers, r)
            # the holder still holds the forwarded caller to its own institution
            theirs = json.dumps(rig.body(visit("S3", 0, [CBC], h=hospital(2)))).encode()
            r = await post(url, theirs, key=None, headers=signed(theirs, CALLER.id))
            assert refused(r, 403, "FORBIDDEN_INSTITUTION"), r
            # a valid API key does not stand in for a bad forwarding signature
            r = await post(url, body, headers=signed(body, CALLER.id, key=bytes(32)))
            assert refused(r, 401, "UNAUTHENTICATED"), r

    asyncio.run(scenario())


def test_a_forwarded_check_for_a_partition_not_held_here_is_unavailable_and_never_forwarded_again(
        rig: Rig) -> None:
    body = json.dumps(rig.body(visit("S1", 0, [CBC]))).encode()
    reached: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append(request.headers.get(FORWARD_CALLER, ""))
        return web.json_response({"code": "ELSEWHERE", "message": "", "field": None, "reason_code": None},
                                 status=418)

    app = web.Application()
    app.router.add_post("/v1/precheck", elsewhere)
    owners = Owners()
    server = make_server(rig, FakeHolder(set()), owners, port=free_port())

    async def scenario() -> None:
        async with served_app(app) as other_url, started(server) as url:
            owners.update({TOPIC: dict.fromkeys(range(PARTITIONS), other_url)})
            r = await post(url, body, key=None, headers=signed(body, CALLER.id))
            assert refused(r, 503, "STATE_UNAVAILABLE") and r.headers.get("Retry-After") == "1", r
            assert reached == []
            # positive control: the same check from a hospital is forwarded there (and its answer relayed)
            r = await post(url, body)
            assert r.status == 418 and r.body["code"] == "ELSEWHERE" and reached == [CALLER.id], r

    asyncio.run(scenario())


def test_a_holder_that_does_not_answer_makes_the_check_unavailable(rig: Rig) -> None:
    owners = Owners()
    owners.update({TOPIC: dict.fromkeys(range(PARTITIONS), f"http://127.0.0.1:{free_port()}")})  # nobody there
    server = make_server(rig, FakeHolder(set()), owners, port=free_port())

    async def scenario() -> None:
        async with started(server) as url:
            r = await post(url, rig.body(visit("S1", 0, [CBC])))
            assert refused(r, 503, "STATE_UNAVAILABLE"), r

    asyncio.run(scenario())


def test_a_caller_is_known_by_its_client_certificates_cn_over_tls(rig: Rig, tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    for name, cn in (("his-2", "his-2.example"), ("stranger", "stranger.example")):
        ca.issue_cert(f"{name}.example", common_name=cn).private_key_and_cert_chain_pem.write_to_path(
            str(tmp_path / f"{name}.pem"))
    port = free_port()
    server = make_server(rig, FakeHolder(ALL), port=port, tls_cert_file=tmp_path / "server.pem",
                         tls_key_file=tmp_path / "server.pem", client_ca_file=tmp_path / "ca.pem")
    mine = json.dumps(rig.body(visit("S1", 0, [CBC], h=hospital(2)))).encode()

    async def call(cert: str | None, key: str | None = None) -> int:
        import ssl

        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        if cert is not None:
            ctx.load_cert_chain(str(tmp_path / cert))
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http, \
                http.post(f"https://127.0.0.1:{port}/v1/precheck", data=mine, headers=headers) as r:
            return r.status

    async def scenario() -> None:
        await server.start()
        try:
            assert await call("his-2.pem") == 200
            assert await call("stranger.pem") == 401  # a certificate the CA signed, of no caller
            assert await call(None) == 401
            assert await call(None, OTHER_KEY) == 200  # API keys work on the TLS port too
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_the_rate_limit_is_a_token_bucket_per_caller() -> None:
    slow = PrecheckCaller("slow", frozenset({HOSP}), frozenset({sha(API_KEY)}), rate_per_s=2.0, burst=3)
    other = PrecheckCaller("other", frozenset({HOSP}), frozenset({sha(OTHER_KEY)}), rate_per_s=2.0, burst=3)
    rl = RateLimiter()
    assert [rl.take(slow, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert rl.take(slow, 100.0) == pytest.approx(0.5)  # one token at 2/s
    assert rl.take(other, 100.0) == 0.0  # each caller has its own bucket
    assert rl.take(slow, 100.25) == pytest.approx(0.25)  # half a token came back
    assert rl.take(slow, 100.5) == 0.0  # a whole one now
    assert rl.take(slow, 100.5) == pytest.approx(0.5)
    assert [rl.take(slow, 1000.0) for _ in range(4)][-1] == pytest.approx(0.5)  # a long pause refills only the burst
    never = PrecheckCaller("never", frozenset({HOSP}), rate_per_s=0.0, burst=1, cert_cn="x")
    assert rl.take(never, 0.0) == 0.0 and rl.take(never, 5.0) == 60.0


def test_over_its_rate_a_caller_is_told_when_to_come_back_and_others_are_not_slowed(rig: Rig) -> None:
    slow = PrecheckCaller("slow", frozenset({HOSP}), frozenset({sha(API_KEY)}), rate_per_s=0.2, burst=2)
    body = rig.body(visit("S1", 0, [CBC]))

    async def scenario() -> None:
        async with served(make_server(rig, FakeHolder(ALL), callers=(slow, OTHER))) as url:
            assert [(await post(url, body)).status for _ in range(2)] == [200, 200]
            r = await post(url, body)
            assert refused(r, 429, "RATE_LIMITED") and r.headers["Retry-After"] == "5", r
            assert (await post(url, dict(body, fixmedins_code=hospital(2)), key=OTHER_KEY)).status == 200

    asyncio.run(scenario())


def test_the_openapi_document_is_served_and_every_answer_holds_to_it(rig: Rig) -> None:
    rig.settle(visit("S0", 0, [HBA1C]), visit("S-B", 3, [CBC], h=hospital(2)), visit("S-C", 3, [CBC], h=hospital(3)))
    answers = [rig.check(d).to_json() for d in (visit("S1", 3, [HBA1C, PSA], gend="FEMALE", hour=18),
                                                visit("S2", 3, [CBC], psn="P-2"))]
    assert len(answers[0]["hits"]) == 3 and answers[1]["hits"] == []
    for a in answers:
        jsonschema.validate(a, schema("Answer"))

    async def scenario() -> None:
        async with served(make_server(rig, FakeHolder(ALL))) as url, aiohttp.ClientSession() as http, \
                http.get(url + "/v1/openapi.json") as r:
            assert r.status == 200 and await r.json() == json.loads(json.dumps(document()))

    asyncio.run(scenario())


class FakeBackend:
    """Takes the log's inserts; fails the first ``failures`` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.inserts: list[tuple[str, dict[str, list[Any]]]] = []

    def insert(self, table: str, columns: Mapping[str, list[Any]]) -> int:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("ClickHouse is away")
        self.inserts.append((table, {c: list(v) for c, v in columns.items()}))
        return len(next(iter(columns.values())))


def test_the_check_log_holds_the_table_columns_and_no_clear_identifier(rig: Rig) -> None:
    spec = TABLES["precheck_log"]
    assert tuple(n for n, _ in spec.columns if n not in spec.defaulted) == PrecheckLog.COLUMNS
    rig.settle(visit("S0", 0, [HBA1C]), visit("S-B", 3, [CBC], h=hospital(2)), visit("S-C", 3, [CBC], h=hospital(3)))
    d = visit("S1", 3, [HBA1C, PSA], gend="FEMALE", hour=18)
    answer = rig.check(d)
    clean = rig.check(visit("S2", 3, [CBC], psn="P-2"))
    backend = FakeBackend(failures=1)
    log = PrecheckLog(cast(Any, backend), rig.pseudo.token)
    log.add("his-1", answer)
    log.add("his-1", clean)
    row = dict(zip(PrecheckLog.COLUMNS, log.rows[0], strict=True))
    assert row["psn_token"] == rig.pseudo.token(d["psn_no"]) and row["check_id"] == answer.check_id
    assert (row["caller"], row["fixmedins_code"], row["setl_id"], row["src_partition"]) == (
        "his-1", HOSP, "S1", answer.partition)
    assert row["items"] == [OUTPATIENT_CONSULT, HBA1C, PSA]
    assert row["hit_rule_ids"] == ["YB-LINE-SEX", "YB-PSN-RETEST", "YB-PSN-SHOP-1D"]
    assert row["hit_items"] == [PSA, HBA1C, ""] and row["hit_rule_versions"] == [1, 1, 1]
    assert row["medfee_sumamt"] == d["medfee_sumamt"] and row["checked_at"] == answer.checked_at_ms // 1000
    text = repr(list(log.rows))
    for clear in (d["psn_no"], d["psn_cert_no"], "P-2", "cert-P-2"):
        assert clear not in text

    async def flush_twice() -> None:
        await log.flush()  # ClickHouse away: kept
        assert len(log.rows) == 2 and not backend.inserts
        await log.flush()

    try:
        asyncio.run(flush_twice())
    finally:
        log.close()
    [(table, cols)] = backend.inserts
    assert table == "precheck_log" and tuple(cols) == PrecheckLog.COLUMNS
    assert cols["check_id"] == [answer.check_id, clean.check_id] and cols["hit_rule_ids"][1] == []
    assert not log.rows
