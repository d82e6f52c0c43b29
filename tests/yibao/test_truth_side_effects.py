"""What `yibao evaluate` counted as false positives of the monitor and procurement rules on planted
traffic (``simulate --events 20000 --days 90 --seed 7/11 --plant all --plant-rate 0.01``): real
violations that neither the base traffic should hold (clean traffic breaks no rule) nor planting
should make as a side effect (a planted anomaly violates its own rule and no other).

* YB-SUP-CREDIT-LOW: a base termination is grade D on its own; a base suspension or large fine
  plus the rule hits planting raises (up to 300 points) was grade D too, with no case planted.
* YB-FUND-NEGATIVE: planted spending (an extra inpatient stay) had no contributions behind it and
  took a small pool's month into deficit.
* YB-PROC-VOLUME-LAG: agreed volumes sized from a demand estimate a stock-out had raised in the
  hours before signing, and a few-unit contract of a 7,000-yuan consumable "behind" by half a unit.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from schemas.calendar import month_of
from streams.rules import RULES_FILE, load_rules_file
from tests.streams.rules.builders import ms
from tests.streams.rules.test_rule_procurement import ProcRig, contract, mov
from yibao.sim.generator import (
    CONTRACT,
    FINE_FEN_PER_POINT,
    INCOME,
    INVENTORY,
    MAX_FINE_POINTS,
    PENALTY,
    PENALTY_POINTS,
    PENALTY_ROOM,
    REVERSAL,
    SETTLEMENT,
    SimConfig,
    SimEvent,
    TrafficGenerator,
)
from yibao.sim.planters import Planting
from yibao.sim.reference import CATALOGUE, CATALOGUE_INDEX

CREDIT = "YB-SUP-CREDIT-LOW"
#: many inspections, so that penalties pile up at some institutions (at seeds 2, 4 and 7 the
#: generator used to terminate an agreement or suspend twice: grade D on penalties alone)
SUPERVISED = {"settlements": 3_000, "days": 30, "inspection_rate": 0.03}


def penalty_points(events: list[SimEvent]) -> dict[str, int]:
    """Penalty and fine points of each penalised institution, as bi_institution_credit counts them."""
    points: Counter[str] = Counter()
    fines: Counter[str] = Counter()
    for e in events:
        if e.record == PENALTY:
            points[e.datum["fixmedins_code"]] += PENALTY_POINTS[e.datum["pnsh_type"]]
            fines[e.datum["fixmedins_code"]] += e.datum["fine_amt"]
    return {h: points[h] + min(MAX_FINE_POINTS, fines[h] // FINE_FEN_PER_POINT) for h in points}


def test_base_penalties_never_take_an_institution_to_grade_d() -> None:
    for seed in (4, 5, 7):  # seeds whose base traffic has fines and suspensions
        events = list(TrafficGenerator(SimConfig(seed=seed, **SUPERVISED)).events())
        kinds = Counter(e.datum["pnsh_type"] for e in events if e.record == PENALTY)
        assert kinds["FINE"] and kinds["SUSPEND_AGREEMENT"] and not kinds["TERMINATE_AGREEMENT"], (seed, kinds)
        pts = penalty_points(events)
        assert max(pts.values()) <= PENALTY_ROOM == 1000 - 600, (seed, sorted(pts.values()))


def test_planted_rule_hits_never_decide_a_credit_grade() -> None:
    """Rule hits count at most 300 points: an institution keeping penalty and fine points ≤ 100
    stays above grade D whatever planting raised; one going beyond is a planted case (terminated)."""
    for seed in (2, 7):
        planting = Planting(CREDIT, rate=0.02)
        events = list(planting.generator(SimConfig(seed=seed, **SUPERVISED)).events())
        planted = {t["fixmedins_code"]: t for t in planting.truth()}
        pts = penalty_points(events)
        assert {h: p for h, p in pts.items() if h not in planted and p > 100} == {}, seed
        escalated = [t for t in planted.values() if "made a termination" in t["note"]]
        assert escalated, seed  # base suspensions and large fines at these seeds
        terminated = {e.datum["fixmedins_code"] for e in events
                      if e.record == PENALTY and e.datum["pnsh_type"] == "TERMINATE_AGREEMENT"}
        assert set(planted) <= terminated and all(pts[h] >= 500 for h in planted)


def test_contract_volume_is_the_reported_demand_not_a_stock_out_estimate() -> None:
    """The agreed volume is the expected demand × the procurement ratio: at most the opening stock
    (≥ 7 days of it) over 7 days × 365 × ratio. A stock-out in the hours before signing used to
    raise it up to 64× (piperacillin at H37010200002, seed 11: 6,700 for ~90 a year)."""
    events = list(TrafficGenerator(SimConfig(settlements=3_000, days=30, seed=7)).events())
    opening: dict[tuple[str, str], int] = {}
    over = []
    for e in events:
        d = e.datum
        if e.record == INVENTORY and d["mov_type"] == "STOCKTAKE":
            opening.setdefault((d["fixmedins_code"], d["med_list_codg"]), d["cnt"])
        elif e.record == CONTRACT:
            it = CATALOGUE[CATALOGUE_INDEX[d["med_list_codg"]]]
            level = opening[(d["fixmedins_code"], d["med_list_codg"])]
            if d["agreed_volume"] > max(it.pack * 10_000, level * 365 * it.vbp_ratio_pm // 7000):
                over.append((d["cntr_id"], d["agreed_volume"], level))
    assert over == []


def test_volume_lag_needs_a_whole_unit_behind() -> None:
    """5 hip prostheses (7,000 yuan each) over a 730-day cycle, none bought yet: 10.1% of the cycle
    has passed at day 74, half a unit "behind" (3,535 yuan); a whole unit at day 146."""
    hip = "C03120201000000773400000002"
    rig = ProcRig()
    rig.send(contract(5, 0, 729, win_pric=7_000_000_000, drug=hip))
    assert rig.send(mov("STOCKTAKE", 1, ms(74, 0))) == []
    assert rig.send(mov("STOCKTAKE", 1, ms(145, 0))) == []
    [a] = rig.send(mov("STOCKTAKE", 1, ms(146, 0)))
    assert a["rule_id"] == "YB-PROC-VOLUME-LAG" and a["evidence"]["behind_cnt"] == "1"


def _fund_cells(events: list[SimEvent]) -> tuple[dict[Any, int], dict[Any, int]]:
    """Income and spending (net of reversals) per pool × insutype × month."""
    income: dict[Any, int] = defaultdict(int)
    spending: dict[Any, int] = defaultdict(int)
    for e in events:
        d = e.datum
        if e.record == INCOME:
            income[(d["insu_admdvs"], d["insutype"], month_of(d["book_time"]))] += d["income_amt"]
        elif e.record in (SETTLEMENT, REVERSAL):
            key = (d["insu_admdvs"][:4] + "99", d["insutype"], month_of(d["setl_time"]))
            spending[key] += d["fund_pay_sumamt"] * (1 if e.record == SETTLEMENT else -1)
    return income, spending


def test_planted_fund_spending_comes_with_its_contributions() -> None:
    """The generator books contributions for the spending it knows of (× income_spending_ratio);
    what planted settlements add to it is booked with them, in the same pool, insutype and month."""
    config = SimConfig(settlements=3_000, days=20, seed=7)  # no closed month: no fund rule planted
    rules = [r.id for r in load_rules_file(RULES_FILE)]
    planting = Planting(rules, rate=0.05)
    planted_events = list(planting.generator(config).events())
    income, spending = _fund_cells(planted_events)
    clean_income, clean_spending = _fund_cells(list(TrafficGenerator(config).events()))
    more = {k: spending[k] - clean_spending.get(k, 0) for k in spending if spending[k] > clean_spending.get(k, 0)}
    assert more
    short = {k: (income[k] - clean_income.get(k, 0), extra) for k, extra in more.items()
             if income[k] - clean_income.get(k, 0) < math.floor(extra * config.income_spending_ratio)}
    assert short == {}
    assert planting.funded_ids
    funded = [e.datum for e in planted_events if str(e.datum["event_id"]) in planting.funded_ids]
    assert len(funded) == len(planting.funded_ids) and all(d["income_id"][8:10] == "PL" for d in funded)
    assert not planting.funded_ids & {i for t in planting.truth() for i in t["event_ids"]}
