"""Synthetic traffic: determinism, wire validity, code formats, money identities and the causal
chains a supervisor's analyses rely on (filing before cross-province care, reversal after its
settlement, delivery after order, stock never below zero, penalty after a violating inspection).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from schemas import SUBJECT_RECORDS, Codec
from yibao.sim.generator import (
    AUTO,
    CATALOGUE,
    CONTRACT,
    DELIVERY,
    DIAGNOSES,
    EVENT_TIME_FIELD,
    FILING,
    INCOME,
    INSPECTION,
    INVENTORY,
    ORDER,
    PAYMENT,
    PENALTY,
    RECOVERY,
    REGIONS,
    REVERSAL,
    SETTLEMENT,
    TIP,
    HookContext,
    SimConfig,
    SimEvent,
    TrafficGenerator,
    id_check_char,
    uscc_check_char,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[2]
DAY_MS = 86_400_000
TZ_MS = 8 * 3_600_000

HOSP = re.compile(r"^H\d{11}$")
PHARM = re.compile(r"^P\d{11}$")
INSTITUTION = re.compile(r"^[HP]\d{11}$")
STAFF = re.compile(r"^[DNY]\d{12}$")
WEST = re.compile(r"^X[A-Z]\d\d[A-Z]{2}[A-Z]\d{3}[A-Z]\d{3}\d{9}$")
TCM = re.compile(r"^Z[A-Z]\d\d[A-Z]{2}[A-Z]\d{4}\d{9}$")
CONS = re.compile(r"^C\d{19}(\d{7})?$")
SERV = re.compile(r"^\d{15}$")
ICD10 = re.compile(r"^[A-Z]\d\d\.\d{3}(x\d{3})?$")
OPRN = re.compile(r"^\d\d\.\d{4}(x\d{3})?$")
ADMDVS = re.compile(r"^\d{6}$")
POOL = re.compile(r"^\d{4}99$")
CERT = re.compile(r"^\d{17}[\dX]$")
TEL = re.compile(r"^1[3-9]\d{9}$")
PSN_NO = re.compile(r"^\d{20}$")
TRACE = re.compile(r"^\d{20}$")
USCC = re.compile(r"^[0-9A-HJ-NPQRTUWXY]{2}\d{6}[0-9A-HJ-NPQRTUWXY]{10}$")
DRG = re.compile(r"^[A-Z]{2}[A-Z0-9][1-9]$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
CHINESE_NAME = re.compile(r"^[\u4e00-\u9fff]{2,4}$")


def list_code(code: str) -> bool:
    return bool(WEST.match(code) or TCM.match(code) or CONS.match(code) or SERV.match(code))


def half_up_fen(cnt: int, pric: int) -> int:
    return (cnt * pric + 50_000_000) // 100_000_000


def digest(events: Iterable[SimEvent], codec: Codec) -> str:
    h = hashlib.sha256()
    for ev in events:
        h.update(ev.record.encode())
        h.update(ev.key.encode())
        h.update(codec.encode(ev.record, ev.datum))
    return h.hexdigest()


def local_day(ms: int) -> int:
    return (ms + TZ_MS) // DAY_MS


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


# 45 days so that delayed consequences (payments, penalties, recoveries, late reversals) land in the
# span; supervision rates raised so each record kind has a real sample.
LONG = SimConfig(settlements=6_000, days=45, seed=7, inspection_rate=0.02, tip_rate=0.01, reversal_rate=0.03,
                 late_payment_rate=0.15)
WEEK = SimConfig(settlements=10_000)


@pytest.fixture(scope="module")
def long_gen() -> TrafficGenerator:
    return TrafficGenerator(LONG)


@pytest.fixture(scope="module")
def stream(long_gen: TrafficGenerator) -> list[SimEvent]:
    return list(long_gen.events())


@pytest.fixture(scope="module")
def week() -> list[SimEvent]:
    return list(TrafficGenerator(WEEK).events())


def of(events: Sequence[SimEvent], record: str) -> list[dict[str, Any]]:
    return [e.datum for e in events if e.record == record]


# --- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"settlements": 0}, "settlements must be >= 1"),
        ({"settlements": 10, "start": datetime(2026, 10, 1)}, "timezone-aware"),
        ({"settlements": 10, "days": 0}, "days must be in"),
        ({"settlements": 10, "regions": 99}, "regions must be in"),
        ({"settlements": 10, "regions": 8, "hospitals": 3}, r"hospitals \(3\) must be >= regions \(8\)"),
        ({"settlements": 10, "pharmacies": -5}, "pharmacies must be >= 0"),
        ({"settlements": 10, "persons": 3}, "persons must be >= 10"),
        ({"settlements": 10, "reversal_rate": 0.9}, "reversal_rate must be a number in"),
        ({"settlements": 10, "tip_rate": float("nan")}, "tip_rate must be a number in"),
        ({"settlements": 10, "filing_rate": 0.0}, "needs filing_rate > 0"),
        ({"settlements": 10, "regions": 1, "hospitals": 5}, "needs regions >= 2"),
        ({"settlements": 10, "order_cover_days": 0}, "order_cover_days"),
        ({"settlements": 10, "seed": "42"}, "seed must be an int"),
        ({"settlements": True}, "settlements must be an int"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimConfig(**kwargs)


def test_config_defaults_scale_and_freeze() -> None:
    cfg = SimConfig(settlements=10_000)
    assert (cfg.regions, cfg.hospitals, cfg.pharmacies, cfg.persons) == (10, 40, 20, 10_000)
    assert cfg.start == datetime(2026, 10, 1, tzinfo=ZoneInfo("Asia/Shanghai"))
    assert cfg.end_ms - cfg.start_ms == 7 * DAY_MS
    big = SimConfig(settlements=1_000_000)
    assert big.regions == len(REGIONS) and big.hospitals == 4000
    small = SimConfig(settlements=50, regions=2, cross_province_rate=0.0, filing_rate=0.0)
    assert small.hospitals >= 2 and small.persons == 200
    assert SimConfig(settlements=10, pharmacies=0).pharmacies == 0
    assert AUTO == -1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


# --- determinism ---------------------------------------------------------------------------------

SMALL = SimConfig(settlements=1_500, days=3, seed=11)


def test_same_seed_same_bytes_different_seed_differs(codec: Codec) -> None:
    gen = TrafficGenerator(SMALL)
    first = digest(gen.events(), codec)
    assert digest(gen.events(), codec) == first, "events() must replay from the seed"
    assert digest(TrafficGenerator(SMALL).events(), codec) == first
    other = digest(TrafficGenerator(dataclasses.replace(SMALL, seed=12)).events(), codec)
    assert other != first


def test_same_bytes_in_another_process_with_other_hash_seed(codec: Codec) -> None:
    """Set/dict iteration over str must not leak into the output (PYTHONHASHSEED differs)."""
    script = (
        "import hashlib, sys\n"
        "from schemas import Codec\n"
        "from yibao.sim.generator import SimConfig, TrafficGenerator\n"
        "c = Codec(); h = hashlib.sha256()\n"
        "for ev in TrafficGenerator(SimConfig(settlements=1500, days=3, seed=11)).events():\n"
        "    h.update(ev.record.encode()); h.update(ev.key.encode()); h.update(c.encode(ev.record, ev.datum))\n"
        "print(h.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "1234", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == digest(TrafficGenerator(SMALL).events(), codec)


# --- wire validity -------------------------------------------------------------------------------

def test_every_event_encodes_and_decodes_unchanged(stream: list[SimEvent], codec: Codec) -> None:
    subject_of = {rec: subj for subj, recs in SUBJECT_RECORDS.items() for rec in recs}
    counts: collections.Counter[str] = collections.Counter()
    for ev in stream:
        data = codec.encode(ev.record, ev.datum)
        dec = codec.decode(data)
        assert dec.record == ev.record
        assert dec.subject == subject_of[ev.record]
        assert dec.datum == ev.datum, ev.record
        counts[ev.record] += 1
    assert set(counts) == set(EVENT_TIME_FIELD), set(EVENT_TIME_FIELD) - set(counts)
    minimum = {SETTLEMENT: 6000, INVENTORY: 5000, REVERSAL: 100, FILING: 100, CONTRACT: 100, ORDER: 100,
               DELIVERY: 100, PAYMENT: 50, INSPECTION: 60, TIP: 30, PENALTY: 20, RECOVERY: 20, INCOME: 100}
    for rec, n in minimum.items():
        assert counts[rec] >= n, (rec, counts[rec])


def test_event_ids_are_uuid4_and_unique(stream: list[SimEvent]) -> None:
    ids = [ev.datum["event_id"] for ev in stream]
    assert all(UUID4.match(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_business_ids_unique(stream: list[SimEvent]) -> None:
    for rec, field in ((SETTLEMENT, "setl_id"), (SETTLEMENT, "mdtrt_id"), (REVERSAL, "setl_id"),
                       (FILING, "trt_dcla_detl_sn"), (CONTRACT, "cntr_id"), (ORDER, "ord_id"),
                       (DELIVERY, "dlv_id"), (PAYMENT, "pay_id"), (INVENTORY, "mov_id"),
                       (INSPECTION, "insp_id"), (TIP, "tip_id"), (PENALTY, "pnsh_id"), (RECOVERY, "rcvr_id"),
                       (INCOME, "income_id")):
        values = [d[field] for d in of(stream, rec)]
        assert len(set(values)) == len(values), (rec, field)
    setl = {d["setl_id"] for d in of(stream, SETTLEMENT)}
    assert not setl & {d["setl_id"] for d in of(stream, REVERSAL)}


def test_kafka_keys(stream: list[SimEvent]) -> None:
    for ev in stream:
        d = ev.datum
        if ev.record in (SETTLEMENT, REVERSAL, FILING):
            assert ev.key == d["psn_no"]
        elif ev.record == INCOME:
            assert ev.key == d["insu_admdvs"]
        elif ev.record == TIP:
            assert ev.key == (d["fixmedins_code"] or d["admdvs"])
        else:
            assert ev.key == d["fixmedins_code"], ev.record


# --- code formats --------------------------------------------------------------------------------

def test_catalogue_codes_prices_and_rounding() -> None:
    codes = [it.code for it in CATALOGUE]
    assert len(set(codes)) == len(codes)
    for it in CATALOGUE:
        pattern = {"WEST": WEST, "TCM": TCM, "CONS": CONS, "SERV": SERV}[it.kind]
        assert pattern.match(it.code), it.key
        assert it.pric > 0 and it.name
        if it.base_pric:
            cut = 1 - it.pric / it.base_pric
            assert 0.30 <= cut <= 0.90, (it.key, cut)
        if it.kind == "SERV":
            assert it.pric % 100_000 == 0, "services in whole 10 fen so level discounts stay exact"
        for units in it.cnts:
            prod = units * 10_000 * it.pric
            assert prod % 100_000_000 != 50_000_000, f"half-fen tie for {it.key} x{units}"
    for d in DIAGNOSES:
        assert ICD10.match(d.icd) and all(OPRN.match(o) for o in d.ops)


def test_code_formats(stream: list[SimEvent], long_gen: TrafficGenerator) -> None:
    for s in long_gen.suppliers:
        assert USCC.match(s.code) and s.code[:2] == "91"
        assert uscc_check_char(s.code[:17]) == s.code[17]
    for ev in stream:
        d = ev.datum
        for field in ("admdvs", "insu_admdvs", "mdtrt_admdvs"):
            if field in d and not (ev.record == INCOME and field == "insu_admdvs"):
                assert ADMDVS.match(d[field]), (ev.record, field, d[field])
        if "fixmedins_code" in d and d["fixmedins_code"] is not None:
            assert INSTITUTION.match(d["fixmedins_code"]), (ev.record, d["fixmedins_code"])
        if "med_list_codg" in d:
            assert list_code(d["med_list_codg"]) and not SERV.match(d["med_list_codg"])
        if "splr_code" in d:
            assert USCC.match(d["splr_code"]) and uscc_check_char(d["splr_code"][:17]) == d["splr_code"][17]
        if "psn_no" in d:
            assert PSN_NO.match(d["psn_no"])
        if ev.record == SETTLEMENT:
            assert (HOSP.match(d["fixmedins_code"]) and d["hosp_lv"] in "123") or \
                (PHARM.match(d["fixmedins_code"]) and d["hosp_lv"] == "9")
            assert d["fixmedins_code"][1:7] == d["mdtrt_admdvs"]
            for ln in d["fee_details"]:
                assert list_code(ln["hilist_code"]) and ln["med_list_codg"] == ln["hilist_code"]
                assert ln["bilg_dr_code"] is None or STAFF.match(ln["bilg_dr_code"])
                if ln["bilg_dr_code"]:
                    assert ln["bilg_dr_code"][1:7] == d["mdtrt_admdvs"]
            if d["dscg_maindiag_code"] is not None:
                assert ICD10.match(d["dscg_maindiag_code"]) and DRG.match(d["drg_code"])
            assert all(OPRN.match(o) for o in d["oprn_codes"])
        elif ev.record == INCOME:
            assert POOL.match(d["insu_admdvs"])
        elif ev.record == FILING:  # both regions are pooling regions, so filings and settlements join
            assert POOL.match(d["mdtrt_area_admdvs"]) and POOL.match(d["insu_admdvs"]) and CERT.match(d["psn_cert_no"])
        elif ev.record == INVENTORY:
            assert all(TRACE.match(c) for c in d["drug_trac_codg"])
        elif ev.record == CONTRACT:
            assert d["admdvs"].endswith("0000")


# --- settlements ---------------------------------------------------------------------------------

MONEY = ("medfee_sumamt", "inscp_amt", "fulamt_ownpay_amt", "overlmt_selfpay", "preselfpay_amt", "hifp_pay",
         "hifmi_pay", "hifob_pay", "maf_pay", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")


def test_settlement_money_identities(stream: list[SimEvent], week: list[SimEvent]) -> None:
    for d in of(stream, SETTLEMENT) + of(week, SETTLEMENT):
        assert all(isinstance(d[k], int) and d[k] >= 0 for k in MONEY), d["setl_id"]
        assert d["medfee_sumamt"] == sum(ln["det_item_fee_sumamt"] for ln in d["fee_details"])
        assert d["inscp_amt"] == d["medfee_sumamt"] - d["fulamt_ownpay_amt"] - d["overlmt_selfpay"]
        assert d["preselfpay_amt"] <= d["inscp_amt"]
        assert d["fund_pay_sumamt"] == d["hifp_pay"] + d["hifmi_pay"] + d["hifob_pay"] + d["maf_pay"]
        assert d["fund_pay_sumamt"] <= d["inscp_amt"]
        assert d["fund_pay_sumamt"] + d["acct_pay"] + d["psn_cash_pay"] == d["medfee_sumamt"]
        if d["insutype"] == "390":
            assert d["acct_pay"] == 0, "resident insurance has no personal account"


def test_policy_scope_payment_ratios(week: list[SimEvent]) -> None:
    """Inpatient (hifp + critical illness) / in-scope: about 80% employee, 70% resident."""
    inp = [d for d in of(week, SETTLEMENT) if d["med_type"] == "21"]
    for insutype, lo, hi in (("310", 0.72, 0.88), ("390", 0.60, 0.78)):
        xs = [d for d in inp if d["insutype"] == insutype]
        ratio = sum(d["hifp_pay"] + d["hifmi_pay"] for d in xs) / sum(d["inscp_amt"] for d in xs)
        assert lo <= ratio <= hi, (insutype, ratio)


def test_fee_lines(stream: list[SimEvent]) -> None:
    drug_prefix = ("X", "Z")
    for d in of(stream, SETTLEMENT):
        lines = d["fee_details"]
        assert lines
        assert len({ln["feedetl_sn"] for ln in lines}) == len(lines)
        for ln in lines:
            prod = ln["cnt"] * ln["pric"]
            assert prod % 100_000_000 != 50_000_000, "no half-fen ties: half-up and half-even agree"
            assert ln["det_item_fee_sumamt"] == half_up_fen(ln["cnt"], ln["pric"])
            assert ln["cnt"] > 0 and ln["pric"] > 0
            assert ln["fee_ocur_time"] <= d["setl_time"]
            if ln["hilist_code"].startswith(drug_prefix):
                assert ln["medc_days"] is not None and ln["medc_days"] >= 1
                if d["med_type"] != "21":
                    assert ln["medc_days"] <= 30
            else:
                assert ln["medc_days"] is None
        mt = d["med_type"]
        assert d["clr_type"] == {"11": "11", "14": "11", "21": "21", "41": "41"}[mt]
        if mt == "41":
            assert d["hosp_lv"] == "9" and all(ln["bilg_dr_code"] is None for ln in lines)
        if mt == "21":
            assert d["adm_date"] < d["dscg_date"] == local_day(d["setl_time"])
            assert ICD10.match(d["dscg_maindiag_code"]) and d["drg_code"]
            assert lines[0]["fee_ocur_time"] >= (d["adm_date"] * DAY_MS - TZ_MS)
            per_day: collections.Counter[tuple[int, str]] = collections.Counter()
            for ln in lines:
                if ln["hilist_name"].startswith(("床位费", "Ⅰ级护理", "Ⅱ级护理")):
                    per_day[(local_day(ln["fee_ocur_time"]), ln["hilist_name"][:2])] += ln["cnt"]
            assert all(v == 10_000 for v in per_day.values()), "bed/nursing once a day"
        else:
            assert (d["adm_date"], d["dscg_date"], d["drg_code"], d["dscg_maindiag_code"]) == (None,) * 4
            assert d["oprn_codes"] == []
            assert max(ln["fee_ocur_time"] for ln in lines) >= d["setl_time"] - 3 * 3_600_000


def test_restricted_items_respected(stream: list[SimEvent]) -> None:
    by_code = {it.code: it for it in CATALOGUE}
    for d in of(stream, SETTLEMENT):
        age = (local_day(d["setl_time"]) - d["brdy"]) // 366
        for ln in d["fee_details"]:
            it = by_code[ln["hilist_code"]]
            assert not it.sex or it.sex == d["gend"], (it.key, d["gend"])
            assert it.min_age <= age + 1 and age <= it.max_age + 1, (it.key, age)
            if d["hosp_lv"] != "9":
                assert it.min_level <= int(d["hosp_lv"]), (it.key, d["hosp_lv"])
            assert ln["pric"] <= it.pric, "never above the capped price"


def test_no_person_settles_twice_a_day_and_refills_are_spaced(week: list[SimEvent]) -> None:
    seen: dict[tuple[str, int], int] = collections.Counter()
    chronic = {it.code for it in CATALOGUE if it.chronic}
    last_refill: dict[str, int] = {}
    for d in of(week, SETTLEMENT):
        seen[(d["psn_no"], local_day(d["setl_time"]))] += 1
        if any(ln["hilist_code"] in chronic for ln in d["fee_details"] if ln["medc_days"] and ln["medc_days"] > 3):
            prev = last_refill.get(d["psn_no"])
            assert prev is None or d["setl_time"] - prev >= 30 * DAY_MS
            last_refill[d["psn_no"]] = d["setl_time"]
    assert sum(1 for v in seen.values() if v > 1) <= len(seen) * 0.001


def test_identity_numbers(stream: list[SimEvent]) -> None:
    persons: dict[str, tuple[Any, ...]] = {}
    for d in of(stream, SETTLEMENT):
        cert = d["psn_cert_no"]
        assert CERT.match(cert) and id_check_char(cert[:17]) == cert[17]
        assert (int(cert[16]) % 2 == 1) == (d["gend"] == "MALE")
        born = date(int(cert[6:10]), int(cert[10:12]), int(cert[12:14]))
        assert (born - date(1970, 1, 1)).days == d["brdy"]
        assert d["psn_name"] is not None and CHINESE_NAME.match(d["psn_name"])
        who = (cert, d["psn_name"], d["gend"], d["brdy"], d["insutype"], d["insu_admdvs"])
        assert persons.setdefault(d["psn_no"], who) == who, "a person's attributes never change"
        assert d["psn_no"][:2] == d["insu_admdvs"][:2]
    certs = [w[0] for w in persons.values()]
    assert len(set(certs)) == len(certs), "one ID number per person"
    ages = [(local_day(d["setl_time"]) - d["brdy"]) // 365 for d in of(stream, SETTLEMENT)]
    assert sum(a >= 60 for a in ages) / len(ages) > 0.3, "the elderly settle more"
    for d in of(stream, TIP):
        assert CHINESE_NAME.match(d["rptr_name"])
        if d["rptr_cert_no"] is not None:
            assert id_check_char(d["rptr_cert_no"][:17]) == d["rptr_cert_no"][17]
        if d["rptr_tel"] is not None:
            assert TEL.match(d["rptr_tel"])
    for d in of(stream, FILING):
        assert id_check_char(d["psn_cert_no"][:17]) == d["psn_cert_no"][17]
        assert d["tel"] is None or TEL.match(d["tel"])


def test_cross_province_settlements_have_a_prior_filing(stream: list[SimEvent]) -> None:
    filed: dict[str, dict[str, Any]] = {}
    cross = 0
    for ev in stream:
        d = ev.datum
        if ev.record == FILING:
            assert d["insu_admdvs"][:2] != d["mdtrt_area_admdvs"][:2]
            filed[d["psn_no"]] = d
        elif ev.record == SETTLEMENT and d["insu_admdvs"][:2] != d["mdtrt_admdvs"][:2]:
            cross += 1
            f = filed.get(d["psn_no"])
            assert f is not None, "cross-province settlement without an earlier filing"
            assert f["dcla_time"] < d["setl_time"]
            assert f["mdtrt_area_admdvs"][:4] == d["mdtrt_admdvs"][:4], "care in the filed city"
            assert f["insu_admdvs"] == d["insu_admdvs"][:4] + "99", "filed with the insured's pooling agency"
            assert f["begndate"] <= local_day(d["setl_time"])
            assert f["enddate"] is None or f["enddate"] >= local_day(d["setl_time"])
            if f["fixmedins_code"] is not None:
                assert f["dcla_type"] == "REFERRAL"
    assert cross > 0


def test_reversals_reference_earlier_settlements(stream: list[SimEvent]) -> None:
    settled: dict[str, dict[str, Any]] = {}
    late = partial = 0
    for ev in stream:
        d = ev.datum
        if ev.record == SETTLEMENT:
            settled[d["setl_id"]] = d
        elif ev.record == REVERSAL:
            o = settled.get(d["init_setl_id"])
            assert o is not None, "reversal of an unseen settlement"
            for k in ("mdtrt_id", "psn_no", "insutype", "med_type", "fixmedins_code", "insu_admdvs",
                      "mdtrt_admdvs"):
                assert d[k] == o[k], k
            assert d["init_setl_time"] == o["setl_time"] < d["setl_time"]
            assert d["refd_setl_flag"] is True
            amounts = ("medfee_sumamt", "inscp_amt", "hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay",
                       "fund_pay_sumamt", "acct_pay", "psn_cash_pay")
            if d["full_reversal"]:
                assert all(d[k] == o[k] for k in amounts)
            else:
                partial += 1
                assert 0 < d["medfee_sumamt"] < o["medfee_sumamt"]
                assert all(0 <= d[k] <= o[k] for k in amounts)
            assert d["fund_pay_sumamt"] == d["hifp_pay"] + d["hifmi_pay"] + d["hifob_pay"] + d["maf_pay"]
            assert d["fund_pay_sumamt"] + d["acct_pay"] + d["psn_cash_pay"] == d["medfee_sumamt"]
            if d["setl_time"] - o["setl_time"] > 14 * DAY_MS:
                late += 1
    assert partial > 0 and late > 0
    assert not set(d["init_setl_id"] for d in of(stream, REVERSAL)) - set(settled)


# --- time ----------------------------------------------------------------------------------------

def test_event_times_in_span_and_ordered(stream: list[SimEvent]) -> None:
    start, end = LONG.start_ms, LONG.end_ms
    prev = start
    for ev in stream:
        t = ev.time_ms
        assert start <= t < end, ev.record
        assert t >= prev, f"{ev.record} at {t} after {prev}"
        prev = t


def test_daily_and_weekly_rhythm(week: list[SimEvent]) -> None:
    hours = collections.Counter((d["setl_time"] + TZ_MS) // 3_600_000 % 24 for d in of(week, SETTLEMENT))
    assert hours[10] > 10 * hours[3]
    assert hours[9] + hours[10] + hours[15] > hours[12] + hours[13] + hours[21]
    days = collections.Counter(local_day(d["setl_time"]) for d in of(week, SETTLEMENT))
    weekday = [n for day, n in days.items() if (day + 3) % 7 < 5]
    weekend = [n for day, n in days.items() if (day + 3) % 7 >= 5]
    assert min(weekday) > max(weekend)
    first = datetime.fromtimestamp(of(week, SETTLEMENT)[0]["setl_time"] / 1000, tz=UTC)
    assert first >= WEEK.start


def test_mix(week: list[SimEvent]) -> None:
    setl = of(week, SETTLEMENT)
    n = len(setl)
    assert n == WEEK.settlements
    share = collections.Counter(d["med_type"] for d in setl)
    assert 0.05 <= share["21"] / n <= 0.09
    assert share["11"] > share["41"] > share["14"] > 0
    cross = sum(d["insu_admdvs"][:2] != d["mdtrt_admdvs"][:2] for d in setl) / n
    assert 0.035 <= cross <= 0.065
    assert 0.012 <= len(of(week, REVERSAL)) / n <= 0.03
    persons = {d["psn_no"]: d["insutype"] for d in setl}
    employee = sum(v == "310" for v in persons.values()) / len(persons)
    assert 0.3 <= employee <= 0.5
    inp_lines = [len(d["fee_details"]) for d in setl if d["med_type"] == "21"]
    out_lines = [len(d["fee_details"]) for d in setl if d["med_type"] != "21"]
    assert sum(inp_lines) / len(inp_lines) > 15 > sum(out_lines) / len(out_lines)


# --- procurement ---------------------------------------------------------------------------------

def test_stock_never_negative_and_sales_match_settlements(stream: list[SimEvent]) -> None:
    stock: dict[tuple[str, str], int] = {}
    sold: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    traces: dict[str, str] = {}
    for ev in stream:
        if ev.record != INVENTORY:
            continue
        d = ev.datum
        key = (d["fixmedins_code"], d["med_list_codg"])
        kind = d["mov_type"]
        if kind == "STOCKTAKE":
            if key in stock:
                assert d["cnt"] == stock[key], "a count in normal traffic matches the books"
            stock[key] = d["cnt"]
            continue
        assert key in stock, "movement before the opening count"
        assert d["cnt"] > 0
        sign = 1 if kind in ("PURCHASE_IN", "SALE_RETURN") else -1
        stock[key] += sign * d["cnt"]
        assert stock[key] >= 0, key
        if kind == "SALE_OUT":
            assert d["setl_id"] and d["drug_trac_codg"]
            assert len(d["drug_trac_codg"]) == min(100, max(1, d["cnt"] // 10_000)), "one code per unit"
            for code in d["drug_trac_codg"]:
                assert code not in traces, "a traceability code is sold once"
                traces[code] = d["setl_id"]
            sold[d["setl_id"]][d["med_list_codg"]] += d["cnt"]
        elif kind == "SALE_RETURN":
            assert all(traces[code] == d["setl_id"] for code in d["drug_trac_codg"])
    stocked = {it.code for it in CATALOGUE if it.stocked}
    for d in of(stream, SETTLEMENT):
        settled: collections.Counter[str] = collections.Counter()
        for ln in d["fee_details"]:
            if ln["hilist_code"] in stocked:
                settled[ln["hilist_code"]] += ln["cnt"]
        assert settled == sold.get(d["setl_id"], collections.Counter()), d["setl_id"]


def test_procurement_chain(stream: list[SimEvent]) -> None:
    start_day = local_day(LONG.start_ms)
    contracts: dict[str, dict[str, Any]] = {}
    orders: dict[str, dict[str, Any]] = {}
    deliveries: dict[str, dict[str, Any]] = {}
    delivered: collections.Counter[str] = collections.Counter()
    pending_in: list[dict[str, Any]] = []
    for ev in stream:
        d = ev.datum
        if ev.record == CONTRACT:
            assert d["win_pric"] < d["base_pric"]
            assert 0.3 <= 1 - d["win_pric"] / d["base_pric"] <= 0.9
            assert d["cycle_begn_date"] <= start_day < d["cycle_end_date"]
            assert d["agreed_volume"] > 0
            contracts[d["cntr_id"]] = d
        elif ev.record == ORDER:
            if d["cntr_id"] is not None:
                c = contracts[d["cntr_id"]]
                assert (c["fixmedins_code"], c["med_list_codg"], c["splr_code"]) == \
                    (d["fixmedins_code"], d["med_list_codg"], d["splr_code"])
                assert d["purc_pric"] == c["win_pric"]
            assert d["purc_amt"] == half_up_fen(d["purc_cnt"], d["purc_pric"])
            orders[d["ord_id"]] = d
        elif ev.record == DELIVERY:
            o = orders[d["ord_id"]]
            assert d["acpt_time"] - o["ord_time"] >= DAY_MS
            assert (d["fixmedins_code"], d["splr_code"], d["med_list_codg"]) == \
                (o["fixmedins_code"], o["splr_code"], o["med_list_codg"])
            delivered[d["ord_id"]] += d["dlv_cnt"]
            assert delivered[d["ord_id"]] <= o["purc_cnt"]
            assert d["dlv_amt"] == half_up_fen(d["dlv_cnt"], o["purc_pric"])
            deliveries[d["dlv_id"]] = d
            pending_in.append(d)
        elif ev.record == INVENTORY and d["mov_type"] == "PURCHASE_IN":
            dl = pending_in.pop(0)
            assert (dl["fixmedins_code"], dl["med_list_codg"], dl["dlv_cnt"], dl["acpt_time"]) == \
                (d["fixmedins_code"], d["med_list_codg"], d["cnt"], d["mov_time"])
        elif ev.record == PAYMENT:
            dl = deliveries[d["dlv_id"]]
            assert d["pay_time"] > dl["acpt_time"] and d["pay_amt"] == dl["dlv_amt"]
            assert d["splr_code"] == dl["splr_code"]
    assert not pending_in
    pays = of(stream, PAYMENT)
    on_time = sum(1 for p in pays if p["pay_time"] - deliveries[p["dlv_id"]]["acpt_time"] <= 31 * DAY_MS)
    assert 0.6 <= on_time / len(pays) < 1.0, "mostly within 30 days, some late"
    assert sum(1 for o in orders.values() if o["cntr_id"]) > 0


# --- supervision and fund ------------------------------------------------------------------------

def test_supervision_chain(stream: list[SimEvent]) -> None:
    inspections: dict[str, dict[str, Any]] = {}
    penalties: dict[str, dict[str, Any]] = {}
    recovered: collections.Counter[str] = collections.Counter()
    for ev in stream:
        d = ev.datum
        if ev.record == INSPECTION:
            assert d["begndate"] <= local_day(d["insp_time"])
            assert d["enddate"] is None or d["begndate"] <= d["enddate"] <= local_day(d["insp_time"])
            assert (d["viol_amt"] > 0) == d["viol_flag"]
            inspections[d["insp_id"]] = d
        elif ev.record == PENALTY:
            i = inspections[d["insp_id"]]
            assert i["viol_flag"] and i["fixmedins_code"] == d["fixmedins_code"]
            assert d["pnsh_time"] > i["insp_time"]
            assert (d["fine_amt"] > 0) or d["pnsh_type"] != "FINE"
            penalties[d["pnsh_id"]] = d
        elif ev.record == RECOVERY:
            i = inspections[d["insp_id"]]
            assert i["fixmedins_code"] == d["fixmedins_code"] and d["rcvr_time"] > i["insp_time"]
            if d["pnsh_id"] is not None:
                assert d["rcvr_time"] > penalties[d["pnsh_id"]]["pnsh_time"]
            recovered[d["insp_id"]] += d["rcvr_amt"]
            assert recovered[d["insp_id"]] <= i["viol_amt"]
        elif ev.record == TIP:
            assert d["reward_amt"] is None and d["tip_cat"]
    kinds = collections.Counter(d["insp_type"] for d in inspections.values())
    assert kinds.most_common(1)[0][0] == "ROUTINE"


def test_fund_income_plausible(week: list[SimEvent], long_gen: TrafficGenerator) -> None:
    spent = sum(d["fund_pay_sumamt"] for d in of(week, SETTLEMENT)) - \
        sum(d["fund_pay_sumamt"] for d in of(week, REVERSAL))
    every = of(week, INCOME)
    # the opening balance (carried over, booked at the start) is no contribution of the span
    opening = [d for d in every if d["income_id"][8:10] == "OB"]
    income = [d for d in every if d not in opening]
    ratio = sum(d["income_amt"] for d in income) / spent
    assert 1.05 <= ratio <= 1.45, ratio
    pools_types = {(d["insu_admdvs"], d["insutype"]) for d in opening}
    assert len(opening) == len(pools_types) and {d["income_type"] for d in opening} == {"OTHER"}
    assert {d["book_time"] for d in opening} == {WEEK.start_ms}
    for d in opening:  # 9-12 months of the pool × insutype's spending (±50%: small pools are noisy)
        pool_spent = sum(x["fund_pay_sumamt"] for x in of(week, SETTLEMENT)
                         if x["insu_admdvs"][:4] + "99" == d["insu_admdvs"] and x["insutype"] == d["insutype"])
        months = d["income_amt"] / (pool_spent / WEEK.days * 30.4) if pool_spent else float("inf")
        assert months >= 6, (d, months)
    assert all((local_day(d["book_time"]) + 3) % 7 < 5 for d in income), "booked on working days"
    pools = {r.pool for r in TrafficGenerator(WEEK).regions}
    assert {d["insu_admdvs"] for d in income} == pools
    assert {d["insutype"] for d in income} == {"310", "390"}
    assert {"EMPLOYER", "INDIVIDUAL", "FISCAL_SUBSIDY"} <= {d["income_type"] for d in income}


# --- JSON lines and hooks ------------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path: Path, codec: Codec) -> None:
    events = list(TrafficGenerator(SimConfig(settlements=800, days=20, seed=3, inspection_rate=0.05,
                                             tip_rate=0.05)).events())
    path = tmp_path / "traffic.jsonl"
    assert write_jsonl(events, path, codec) == len(events)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(events)
    kinds = set()
    for line, ev in zip(lines, events, strict=True):
        obj = json.loads(line)
        assert obj["event_type"] == ev.event_type
        kinds.add(obj["event_type"])
        assert codec.from_json(codec.resolve_record(obj["event_type"]), obj) == ev.datum
    assert {"Settlement", "InventoryMovement", "FundIncome", "Inspection"} <= kinds
    first = json.loads(lines[0])
    assert first["mov_time"].startswith("2026-10-01T00:00:00.000+08:00")


def test_hooks_plant_without_shifting_base_traffic(codec: Codec) -> None:
    cfg = SimConfig(settlements=1_000, days=2, seed=5)
    base = list(TrafficGenerator(cfg).events())

    def passthrough(event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        return [event]

    same = list(TrafficGenerator(cfg, hooks={"Settlement": [passthrough]}).events())
    assert digest(same, codec) == digest(base, codec)

    def duplicate(event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        if ctx.rng.random() >= 0.05:
            return [event]
        copy = SimEvent(event.record, event.key, {**event.datum, "event_id": ctx.new_event_id(),
                                                  "setl_id": event.datum["setl_id"] + "D"})
        ctx.plant("DUPLICATE_SETTLEMENT", copy, note=event.datum["setl_id"])
        return [event, copy]

    gen = TrafficGenerator(cfg, hooks={SETTLEMENT: [duplicate]})
    planted_run = list(gen.events())
    planted = gen.hook_context.planted
    assert planted and all(p.anomaly == "DUPLICATE_SETTLEMENT" for p in planted)
    ids = {p.event_id for p in planted}
    assert [e for e in planted_run if e.datum["event_id"] not in ids] == base
    with pytest.raises(ValueError, match="unknown record"):
        TrafficGenerator(cfg, hooks={"Nope": [passthrough]})


def test_generation_rate(codec: Codec) -> None:
    """Not a gate (shared CI machines vary); prints the rate for the record."""
    cfg = SimConfig(settlements=10_000)
    gen = TrafficGenerator(cfg)
    t0 = time.perf_counter()
    events = list(gen.events())
    t1 = time.perf_counter()
    for ev in events:
        codec.encode(ev.record, ev.datum)
    t2 = time.perf_counter()
    mix = collections.Counter(ev.event_type for ev in events)
    print(f"\ngenerate: {cfg.settlements / (t1 - t0):,.0f} settlements/s, {len(events) / (t1 - t0):,.0f} events/s")
    print(f"generate+encode: {cfg.settlements / (t2 - t0):,.0f} settlements/s, "
          f"{len(events) / (t2 - t0):,.0f} events/s ({len(events)} events)")
    print("mix:", dict(sorted(mix.items())))
    assert mix["Settlement"] == cfg.settlements


def test_start_is_not_now() -> None:
    cfg = SimConfig(settlements=10)
    assert cfg.start.year == 2026 and cfg.start.utcoffset() == timedelta(hours=8)
    shifted = SimConfig(settlements=10, start=datetime(2027, 3, 1, 9, 30, tzinfo=UTC))
    evs = list(TrafficGenerator(shifted).events())
    assert min(e.time_ms for e in evs) >= shifted.start_ms
    assert max(e.time_ms for e in evs) < shifted.end_ms
