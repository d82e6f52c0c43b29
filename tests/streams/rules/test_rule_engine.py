"""Properties every rule shares: alerts once, exactly-once redelivery, live rule updates, stable alert ids.

Each scenario below is the smallest event sequence whose last event makes one rule fire once.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from schemas import Codec
from streams.base import record_checks
from streams.rules import KINDS
from streams.rules.alerts import GENERATIONS_SEARCHED, alert_event_id, alert_id, versions_until
from streams.rules.events import EngineEvent
from streams.settlement import build
from streams.validation import Limits, compile_checks
from yibao.settings import load_settings

from .builders import (
    ALT,
    AMLODIPINE,
    BED,
    BIOCHEM_PANEL,
    CBC,
    ENTECAVIR,
    HBA1C,
    HOSP,
    INPATIENT_CONSULT,
    IV_DRIP,
    LEVOFLOXACIN,
    NIFEDIPINE,
    NURSING_2,
    OMEPRAZOLE_INJ,
    OUTPATIENT_CONSULT,
    PSA,
    GroupedRig,
    Rig,
    hospital,
    line,
    month_ms,
    ms,
    pharmacy,
    reversal,
    rule_update,
    settlement,
    stay,
    stay_value,
)

Scenario = Callable[[], list[dict[str, Any]]]


def _idle(day: int) -> list[dict[str, Any]]:
    return [line(BED, t=ms(day, 8)), line(NURSING_2, t=ms(day, 9)), line(INPATIENT_CONSULT, t=ms(day, 10))]


def _busy_stay(setl_id: str, adm: int, dscg: int) -> dict[str, Any]:
    return stay(setl_id, ms(dscg, 11), adm, dscg, [line(CBC, t=ms(adm, 12)), line(IV_DRIP, t=ms(adm, 13))])


SCENARIOS: dict[str, Scenario] = {
    "YB-LINE-SEX": lambda: [settlement("S1", ms(0), [line(PSA)], gend="FEMALE")],
    "YB-LINE-AGE": lambda: [settlement("S1", ms(0), [line(LEVOFLOXACIN)], age=12)],
    "YB-LINE-LEVEL": lambda: [settlement("S1", ms(0), [line(ENTECAVIR)], hosp_lv="1")],
    "YB-LINE-SETTING": lambda: [settlement("S1", ms(0), [line(OMEPRAZOLE_INJ)])],
    "YB-LINE-PRICE": lambda: [settlement("S1", ms(0), [line(OUTPATIENT_CONSULT, pric="12.00")])],
    "YB-VISIT-DUP": lambda: [stay("S1", ms(3), -7, 3, [line(BIOCHEM_PANEL, t=ms(1)), line(ALT, t=ms(1))])],
    "YB-DAY-FREQ": lambda: [stay("S1", ms(3), -7, 3, [line(BED, t=ms(1)), line(BED, t=ms(1, 12)),
                                                      line(IV_DRIP, t=ms(1))])],
    "YB-PSN-RETEST": lambda: [settlement("S1", ms(0), [line(HBA1C)]), settlement("S2", ms(10), [line(HBA1C)])],
    "YB-PSN-OVERRX": lambda: [settlement("A", ms(0), [line(AMLODIPINE, 20)]),
                              settlement("B", ms(10), [line(AMLODIPINE, 20)])],
    "YB-PSN-SHOP-1D": lambda: [settlement(f"V{i}", ms(0, 8 + i), [line(OUTPATIENT_CONSULT)], h=hospital(i))
                               for i in (1, 2, 3)],
    "YB-PSN-SHOP-7D": lambda: [settlement(f"B{i}", ms(i), [line(NIFEDIPINE if i == 5 else AMLODIPINE, 7)],
                                          h=pharmacy(i), hosp_lv="9", med_type="41") for i in range(1, 6)],
    "YB-STAY-SPLIT": lambda: [_busy_stay("S1", 0, 5), _busy_stay("S2", 15, 25)],
    "YB-STAY-BEDHANG": lambda: [stay("S1", ms(6), 0, 6, [line(CBC, t=ms(0)), *_idle(1), *_idle(2),
                                                          line(IV_DRIP, t=ms(3))])],
    "YB-STAY-LOWADM": lambda: [stay("S1", ms(3), 0, 3, [line(BIOCHEM_PANEL, pric="70.00", t=ms(1)),
                                                         line(BED, pric="30.00", t=ms(1))])],
    "YB-PSN-GHOST": lambda: [settlement("S1", ms(0, 9), [line(OUTPATIENT_CONSULT)]),
                             settlement("S2", ms(0, 15), [line(OUTPATIENT_CONSULT)], h=hospital(1, "440104"),
                                        mdtrt="440104")],
}
RULES = sorted(SCENARIOS)


def test_every_person_level_seed_rule_has_a_scenario() -> None:
    seed = {r.id for r in Rig().book.current.rules}
    # the others run on the grouped streams (hospital, DRG) or on other subsystems' streams
    person_level = {r.id for r in Rig().book.current.rules
                    if KINDS[r.kind].stateless is not None or KINDS[r.kind].historic is not None}
    assert person_level == set(SCENARIOS) and seed >= person_level | {"YB-HOSP-UPCODE", "YB-HOSP-HIGHCOST"}


@pytest.mark.parametrize("rule", RULES)
def test_scenario_fires_exactly_this_rule_once_on_its_last_event(rule: str) -> None:
    rig = Rig()
    *before, last = SCENARIOS[rule]()
    assert rig.each(before) == []
    alerts = rig.alerts(last)
    assert [(a["rule_id"], a["rule_version"], a["status"]) for a in alerts] == [(rule, 1, "FIRED")]


@pytest.mark.parametrize("rule", RULES)
def test_the_same_trigger_again_does_not_alert_again(rule: str) -> None:
    rig = Rig()
    events = SCENARIOS[rule]()
    assert len(rig.each(events, rule)) == 1
    assert rig.alerts(events[-1], rule=rule) == []  # redelivered at a new offset
    assert rig.alerts(*events, rule=rule) == []  # the whole scenario again, one batch


@pytest.mark.parametrize("rule", RULES)
def test_redelivery_at_or_below_the_stored_offset_changes_nothing(rule: str) -> None:
    rig = Rig()
    events = SCENARIOS[rule]()
    batches = [(d, i) for i, d in enumerate(events)]
    for d, o in batches:
        rig.send(d, offset=o)
    rig.store.drain()
    before = json.dumps(rig.store.data, sort_keys=True)
    watermark = dict(rig.engine.watermark)
    out = rig.engine.process([EngineEvent("Settlement", d, 0, o) for d, o in batches])
    assert (out.alerts, out.emits, out.skipped) == ([], [], len(batches))
    out = rig.engine.process([EngineEvent("Settlement", events[-1], 0, 0)])  # an older offset
    assert (out.alerts, out.skipped) == ([], 1)
    assert rig.store.drain() == []
    assert json.dumps(rig.store.data, sort_keys=True) == before
    assert rig.engine.watermark == watermark


@pytest.mark.parametrize("rule", RULES)
def test_redelivered_reversal_does_not_retract_twice(rule: str) -> None:
    rig = Rig()
    events = SCENARIOS[rule]()
    rig.each(events)
    rev = reversal(events[-1])
    offset = rig.next_offset[0]
    assert [a["status"] for a in rig.alerts(rev, rule=rule, offset=offset)] == ["RETRACTED"]
    out = rig.send(rev, offset=offset)
    assert (out.alerts, out.skipped) == ([], 1)


@pytest.mark.parametrize("rule", RULES)
def test_disabled_rule_stops_at_the_next_batch_and_restarts_when_enabled(rule: str) -> None:
    rig = Rig()
    assert rule_update(rig.book, rule, enabled=False) is not None
    events = SCENARIOS[rule]()
    assert rig.each(events, rule) == []
    assert rule_update(rig.book, rule, enabled=True) is not None
    # a new settlement completing the same pattern (the very same settlement again would be an
    # upstream duplicate, which the engine counts once)
    again = copy.deepcopy(events[-1])
    again["setl_id"] += "-again"
    again["event_id"] = str(uuid.uuid4())
    alerts = rig.alerts(again, rule=rule)
    assert alerts and all(a["rule_version"] == 3 for a in alerts)


@pytest.mark.parametrize("rule", RULES)
def test_new_version_is_carried_by_alerts_and_does_not_change_the_alert_id(rule: str) -> None:
    [v1] = Rig().each(SCENARIOS[rule](), rule)
    rig = Rig()
    rule_update(rig.book, rule, version=7)
    [v7] = rig.each(SCENARIOS[rule](), rule)
    assert (v1["rule_version"], v7["rule_version"]) == (1, 7)
    assert v1["alert_id"] == v7["alert_id"]
    assert v1["event_id"] == v7["event_id"]
    # a rule updated after it fired: the same finding is the same alert, not a new one
    rig = Rig()
    events = SCENARIOS[rule]()
    rig.each(events)
    rule_update(rig.book, rule)
    assert rig.alerts(events[-1], rule=rule) == []


@pytest.mark.parametrize(("rule", "params", "events", "evidence"), [
    ("YB-PSN-SHOP-1D", {"min_institutions": 2},
     lambda: [settlement(f"V{i}", ms(0, 8 + i), [line(OUTPATIENT_CONSULT)], h=hospital(i)) for i in (1, 2)],
     {"institutions": "2", "min_institutions": "2"}),
    ("YB-PSN-OVERRX", {"factor_pm": 1000},
     lambda: [settlement("A", ms(0), [line(AMLODIPINE, 30)]), settlement("B", ms(1), [line(AMLODIPINE, 1)])],
     {"limit_days": "30.0", "days_supplied": "31.0"}),
    ("YB-STAY-SPLIT", {"max_gap_days": 31},
     lambda: [_busy_stay("S1", 0, 5), _busy_stay("S2", 36, 40)], {"days_after_discharge": "31"}),
    ("YB-STAY-LOWADM", {"max_los_days": 4},
     lambda: [stay("S1", ms(4), 0, 4, [line(BIOCHEM_PANEL, pric="70.00", t=ms(1)), line(BED, pric="30.00", t=ms(1))])],
     {"los_days": "4"}),
    ("YB-PSN-GHOST", {"min_provinces": 1}, lambda: [settlement("S1", ms(0), [line(CBC)])], {"provinces": "11"}),
])
def test_changed_parameter_takes_effect_at_the_next_batch(rule: str, params: dict[str, Any], events: Scenario,
                                                         evidence: dict[str, str]) -> None:
    assert Rig().each(events(), rule) == []
    rig = Rig()
    assert rule_update(rig.book, rule, **params) is not None
    [a] = rig.each(events(), rule)
    assert a["rule_version"] == 2
    assert evidence.items() <= a["evidence"].items()


def test_an_identical_rule_record_is_not_an_update() -> None:
    rig = Rig()
    rule = rig.book.current.by_id("YB-PSN-SHOP-1D")
    assert rule is not None
    assert rig.book.apply(json.dumps(rule.to_dict()).encode(), rule.id.encode()) is None
    assert rig.book.applied == 0


# --- the grouped engines share the guarantees ----------------------------------------------------------

def _highcost_group() -> list[bytes]:
    return [stay_value(f"G{i}", ms(i), drg="ES23", amt=500_000, tok=f"t{i}") for i in range(30)]


def test_grouped_redelivery_at_or_below_the_offset_changes_nothing() -> None:
    rig = GroupedRig("drg")
    rig.send(*_highcost_group())
    [a] = rig.alerts(stay_value("X", ms(40), drg="ES23", amt=2_000_000, tok="tX"), offset=100)
    assert a["rule_id"] == "YB-HOSP-HIGHCOST"
    rig.store.drain()
    before = json.dumps(rig.store.data, sort_keys=True)
    out = rig.send(stay_value("X", ms(40), drg="ES23", amt=2_000_000, tok="tX"), offset=100)
    assert (out.alerts, out.skipped) == ([], 1)
    out = rig.send(stay_value("Y", ms(41), drg="ES23", amt=3_000_000, tok="tY"), offset=99)
    assert (out.alerts, out.skipped) == ([], 1)
    assert rig.store.drain() == []
    assert json.dumps(rig.store.data, sort_keys=True) == before


def test_grouped_rules_follow_rule_updates() -> None:
    rig = GroupedRig("drg")
    rig.send(*_highcost_group())
    rule_update(rig.book, "YB-HOSP-HIGHCOST", enabled=False)
    assert rig.alerts(stay_value("X1", ms(40), drg="ES23", amt=2_000_000, tok="tX")) == []
    rule_update(rig.book, "YB-HOSP-HIGHCOST", enabled=True, median_multiple_pm=5000)
    assert rig.alerts(stay_value("X2", ms(40), drg="ES23", amt=2_000_000, tok="tX")) == []  # 4 × the median
    [a] = rig.alerts(stay_value("X3", ms(40), drg="ES23", amt=2_600_000, tok="tX"))
    assert a["rule_version"] == 3
    hosp = GroupedRig("hospital")
    rule_update(hosp.book, "YB-HOSP-UPCODE", version=5)
    for m, high in ((202401, 6), (202402, 6), (202403, 6), (202404, 15)):
        out = hosp.alerts(*(stay_value(f"{m}-{i}", month_ms(m, 1 + i % 28), drg="ES21" if i < high else "ES25")
                            for i in range(30)))
    assert [(a["rule_version"], a["fixmedins_code"]) for a in out] == [(5, HOSP)]


# --- the builders give what ingest would hand the engine ---------------------------------------------

def test_builders_produce_valid_settlements_and_reversals_that_survive_the_codec() -> None:
    sub = build(load_settings(), lambda: Limits.from_settings(300, 2000))
    codec = Codec()
    check = {spec.short_name: compile_checks(record_checks(spec, codec.record_schema(spec.record)))
             for spec in sub.records}
    events = [d for scenario in SCENARIOS.values() for d in scenario()]
    events += [reversal(events[0]), reversal(events[0], full=False)]
    for d in events:
        record = "SettlementReversal" if "init_setl_id" in d else "Settlement"
        assert check[record](d) is None, d["setl_id"]
        dec = codec.decode(codec.encode(f"cn.nhsa.yibao.settlement.{record}", d), subject="settlement")
        assert dec.datum == d


def test_versions_until_lists_this_version_and_every_earlier_one() -> None:
    aid = alert_id("YB-PSN-RETEST", "token", "key")
    f0, r0, f1, r1 = (alert_event_id(aid, s, g) for g, s in ((0, "FIRED"), (0, "RETRACTED"), (1, "FIRED"),
                                                               (1, "RETRACTED")))
    assert versions_until(aid, "FIRED", f0) == [f0]
    assert versions_until(aid, "RETRACTED", r0) == [f0, r0]
    assert versions_until(aid, "FIRED", f1) == [f0, r0, f1]
    assert versions_until(aid, "RETRACTED", r1) == [f0, r0, f1, r1]
    # an id that is no version of this alert stands for itself only
    assert versions_until(aid, "FIRED", r1) == [r1]
    assert versions_until(aid, "FIRED", alert_event_id(aid, "FIRED", GENERATIONS_SEARCHED)) == [
        alert_event_id(aid, "FIRED", GENERATIONS_SEARCHED)]
