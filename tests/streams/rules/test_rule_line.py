"""Line rules (one fee line against the item knowledge): YB-LINE-SEX, -AGE, -LEVEL, -SETTING, -PRICE.

Stateless: evaluated on every settlement, late or not, keyed by the settlement (one alert each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from streams.rules.alerts import alert_id

from .builders import (
    AMLODIPINE,
    CBC,
    CERVICAL,
    DELIVERY,
    ENTECAVIR,
    HOSP,
    LEVOFLOXACIN,
    OMEPRAZOLE_INJ,
    OUTPATIENT_CONSULT,
    PSA,
    Rig,
    date,
    expect,
    hospital,
    line,
    ms,
    pharmacy,
    reversal,
    rule_update,
    settlement,
    token,
)

T = ms(0, 10)

#: one settlement per rule that breaks that rule only (and its fee at risk, in fen)
POSITIVE: dict[str, Callable[[], dict[str, Any]]] = {
    "YB-LINE-SEX": lambda: settlement("S1", T, [line(PSA), line(CBC)], gend="FEMALE", age=50),
    "YB-LINE-AGE": lambda: settlement("S1", T, [line(LEVOFLOXACIN), line(CBC)], age=17),
    "YB-LINE-LEVEL": lambda: settlement("S1", T, [line(ENTECAVIR), line(CBC)], h=hospital(7), hosp_lv="1"),
    "YB-LINE-SETTING": lambda: settlement("S1", T, [line(OMEPRAZOLE_INJ), line(CBC)], med_type="11"),
    "YB-LINE-PRICE": lambda: settlement("S1", T, [line(OUTPATIENT_CONSULT, pric="10.60"), line(CBC)]),
}
AT_RISK = {"YB-LINE-SEX": 6400, "YB-LINE-AGE": 590, "YB-LINE-LEVEL": 22, "YB-LINE-SETTING": 430,
           "YB-LINE-PRICE": 60}
RULES = sorted(POSITIVE)


def rule_ids(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["rule_id"] for a in alerts]


@pytest.mark.parametrize("rule", RULES)
def test_positive_fires_once_with_the_rules_metadata(rule: str) -> None:
    s = POSITIVE[rule]()
    alerts = Rig().alerts(s)
    assert rule_ids(alerts) == [rule]
    a = alerts[0]
    expect(a, rule, ["S1"], window=(T, T))
    assert a["alert_id"] == alert_id(rule, token(), "S1")
    assert (a["psn_token"], a["fixmedins_code"], a["admdvs"]) == (token(), s["fixmedins_code"], "110105")
    assert a["amount_at_risk"] == AT_RISK[rule]
    assert a["mdtrt_ids"] == [s["mdtrt_id"]]
    assert a["detected_at"] == T
    assert a["evidence"]["items"] == s["fee_details"][0]["hilist_code"]


@pytest.mark.parametrize("rule", RULES)
def test_line_rules_fire_on_a_settlement_older_than_the_lateness(rule: str) -> None:
    rig = Rig(lateness_days=35)
    rig.send(settlement("OTHER", ms(100), [line(CBC)], psn="PSN999"))  # moves the partition's watermark
    out = rig.send(POSITIVE[rule]())
    assert out.late == 1
    assert rule_ids([a for a, _, _ in out.alerts]) == [rule]


def test_line_alert_of_a_very_late_settlement_is_retracted_by_its_reversal() -> None:
    rig = Rig(lateness_days=35)
    rig.send(settlement("OTHER", ms(100), [line(CBC)], psn="PSN999"))
    s = POSITIVE["YB-LINE-SEX"]()
    [fired] = rig.alerts(s)
    [retracted] = rig.alerts(reversal(s, t=ms(101)))
    assert (retracted["alert_id"], retracted["status"]) == (fired["alert_id"], "RETRACTED")


@pytest.mark.parametrize("rule", RULES)
def test_full_reversal_retracts_with_the_same_alert_id(rule: str) -> None:
    rig = Rig()
    s = POSITIVE[rule]()
    [fired] = rig.alerts(s)
    [retracted] = rig.alerts(reversal(s, t=ms(3)))
    expect(retracted, rule, ["S1"], status="RETRACTED", window=(T, T))
    assert retracted["alert_id"] == fired["alert_id"]
    assert retracted["event_id"] != fired["event_id"]
    assert retracted["amount_at_risk"] == 0
    assert "S1" in retracted["evidence"]["retracted_because"]
    assert retracted["detected_at"] == ms(3)
    assert rig.alerts(reversal(s, t=ms(4))) == []  # a second reversal retracts nothing more


@pytest.mark.parametrize("rule", RULES)
def test_partial_reversal_does_not_retract(rule: str) -> None:
    rig = Rig()
    s = POSITIVE[rule]()
    assert len(rig.alerts(s)) == 1
    assert rig.alerts(reversal(s, full=False)) == []


@pytest.mark.parametrize("rule", RULES)
def test_the_same_settlement_again_alerts_once(rule: str) -> None:
    rig = Rig()
    s = POSITIVE[rule]()
    assert len(rig.alerts(s)) == 1
    assert rig.alerts(s) == []  # a duplicate delivery at a new offset
    assert rig.alerts(s, s) == []


# --- YB-LINE-SEX ----------------------------------------------------------------------------------

def test_sex_negative_item_for_the_patients_own_sex() -> None:
    rig = Rig()
    assert rig.alerts(settlement("S1", T, [line(PSA)], gend="MALE", age=50)) == []
    assert rig.alerts(settlement("S2", T, [line(CERVICAL)], gend="FEMALE", age=50)) == []


def test_sex_boundary_unknown_sex_is_not_a_violation_the_other_sex_is() -> None:
    rig = Rig()
    assert rig.alerts(settlement("S1", T, [line(PSA)], gend="UNKNOWN", age=50), rule="YB-LINE-SEX") == []
    [a] = rig.alerts(settlement("S2", T, [line(CERVICAL)], gend="MALE", age=50), rule="YB-LINE-SEX")
    assert a["evidence"]["gend"] == "MALE"
    assert "female" in a["evidence"]["detail"]


def test_sex_one_alert_per_settlement_for_several_restricted_lines() -> None:
    s = settlement("S1", T, [line(PSA), line(PSA, t=T - 2 * 3_600_000), line(CBC)], gend="FEMALE", age=50)
    [a] = Rig().alerts(s, rule="YB-LINE-SEX")
    assert a["amount_at_risk"] == 2 * 6400
    assert a["evidence"]["items"] == PSA


# --- YB-LINE-AGE ----------------------------------------------------------------------------------

def test_age_negative_adult() -> None:
    assert Rig().alerts(settlement("S1", T, [line(LEVOFLOXACIN)], age=30)) == []


def test_age_boundary_eighteenth_birthday_today_vs_tomorrow() -> None:
    rig = Rig()
    born = settlement("S0", T, [], age=18)["brdy"]  # exactly 18 years before T's China date
    assert rig.alerts(settlement("S1", T, [line(LEVOFLOXACIN)], brdy=born), rule="YB-LINE-AGE") == []
    [a] = rig.alerts(settlement("S2", T, [line(LEVOFLOXACIN)], brdy=born + 1), rule="YB-LINE-AGE")
    assert a["evidence"]["age"] == "17"


def test_age_boundary_uses_the_china_date_of_settling() -> None:
    rig = Rig()
    born = settlement("S0", T, [], age=18)["brdy"]
    # 00:30 China time on the 18th birthday is still the previous day in UTC: already 18
    assert rig.alerts(settlement("S1", ms(0, 0, 30), [line(LEVOFLOXACIN)], brdy=born), rule="YB-LINE-AGE") == []
    # 23:30 China time the day before the birthday: still 17
    [a] = rig.alerts(settlement("S2", ms(-1, 23, 30), [line(LEVOFLOXACIN)], brdy=born), rule="YB-LINE-AGE")
    assert a["setl_ids"] == ["S2"]


def test_age_boundary_maximum_age_45_vs_46() -> None:
    rig = Rig()
    kw: dict[str, Any] = {"med_type": "21", "gend": "FEMALE", "adm": date(-2), "dscg": date(0), "dx": "O80.000"}
    assert rig.alerts(settlement("S1", T, [line(DELIVERY)], age=45, **kw), rule="YB-LINE-AGE") == []
    [a] = rig.alerts(settlement("S2", T, [line(DELIVERY)], age=46, **kw), rule="YB-LINE-AGE")
    assert a["evidence"]["age"] == "46"
    assert "18-45" in a["evidence"]["detail"]


# --- YB-LINE-LEVEL --------------------------------------------------------------------------------

def test_level_negative_pharmacy_and_unrated_institutions_are_not_checked() -> None:
    rig = Rig()
    assert rig.alerts(settlement("S1", T, [line(ENTECAVIR)], h=pharmacy(1), hosp_lv="9", med_type="41")) == []
    assert rig.alerts(settlement("S2", T, [line(ENTECAVIR)], h=hospital(9), hosp_lv="9")) == []


def test_level_boundary_level_2_is_enough_level_1_is_not() -> None:
    rig = Rig()
    assert rig.alerts(settlement("S1", T, [line(ENTECAVIR)], h=hospital(2), hosp_lv="2")) == []
    [a] = rig.alerts(settlement("S2", T, [line(ENTECAVIR)], h=hospital(3), hosp_lv="1"))
    expect(a, "YB-LINE-LEVEL", ["S2"])
    assert (a["fixmedins_code"], a["evidence"]["hosp_lv"]) == (hospital(3), "1")
    assert "level-2" in a["evidence"]["detail"]


def test_level_rule_is_not_applied_to_pharmacy_purchases() -> None:
    # scenarios = outpatient, inpatient: a level-1 institution selling under med_type 41 is out of scope
    assert Rig().alerts(settlement("S1", T, [line(ENTECAVIR)], h=hospital(3), hosp_lv="1", med_type="41")) == []


# --- YB-LINE-SETTING ------------------------------------------------------------------------------

def test_setting_negative_inpatient_item_during_a_stay() -> None:
    s = settlement("S1", T, [line(OMEPRAZOLE_INJ)], med_type="21", adm=date(-3), dscg=date(0), dx="K25.000")
    assert Rig().alerts(s, rule="YB-LINE-SETTING") == []


@pytest.mark.parametrize(("med_type", "fires"), [("21", False), ("22", False), ("14", True), ("41", True)])
def test_setting_boundary_inpatient_med_types_vs_chronic_outpatient_and_pharmacy(med_type: str, fires: bool) -> None:
    s = settlement("S1", T, [line(OMEPRAZOLE_INJ)], med_type=med_type)
    alerts = Rig().alerts(s, rule="YB-LINE-SETTING")
    assert len(alerts) == int(fires)
    if fires:
        assert alerts[0]["evidence"]["med_type"] == med_type


# --- YB-LINE-PRICE --------------------------------------------------------------------------------

def test_price_negative_at_the_cap() -> None:
    assert Rig().alerts(settlement("S1", T, [line(OUTPATIENT_CONSULT, pric="10.00")])) == []


def test_price_boundary_cap_times_1_05_does_not_fire_one_millionth_above_does() -> None:
    rig = Rig()
    assert rig.alerts(settlement("S1", T, [line(OUTPATIENT_CONSULT, pric="10.500000")])) == []
    [a] = rig.alerts(settlement("S2", T, [line(OUTPATIENT_CONSULT, pric="10.500001")]))
    expect(a, "YB-LINE-PRICE", ["S2"])
    assert a["amount_at_risk"] == 50  # (10.500001 − 10.00) yuan × 1, in whole fen
    assert a["evidence"]["detail"] == f"{OUTPATIENT_CONSULT} 10.50 > cap 10.00"


def test_price_cap_depends_on_the_hospital_level() -> None:
    rig = Rig()
    assert rig.alerts(settlement("S1", T, [line(OUTPATIENT_CONSULT, pric="9.00")], hosp_lv="2")) == []
    [a] = rig.alerts(settlement("S2", T, [line(OUTPATIENT_CONSULT, pric="9.00")], h=hospital(5), hosp_lv="1"))
    assert a["amount_at_risk"] == 100  # 9.00 − 8.00 yuan
    assert a["evidence"]["detail"] == f"{OUTPATIENT_CONSULT} 9.00 > cap 8.00"


def test_price_amount_at_risk_is_the_excess_times_the_quantity() -> None:
    s = settlement("S1", T, [line(AMLODIPINE, cnt=28, pric="0.20"), line(CBC)], h=pharmacy(2), hosp_lv="9",
                   med_type="41")
    [a] = Rig().alerts(s, rule="YB-LINE-PRICE")
    assert a["amount_at_risk"] == 140  # (0.20 − 0.15) × 28 yuan
    assert a["fixmedins_code"] == pharmacy(2)


def test_price_tolerance_is_a_rule_parameter() -> None:
    rig = Rig()
    assert rig.alerts(settlement("S1", T, [line(OUTPATIENT_CONSULT, pric="10.20")])) == []
    assert rule_update(rig.book, "YB-LINE-PRICE", tolerance_pm=10) is not None
    [a] = rig.alerts(settlement("S2", T, [line(OUTPATIENT_CONSULT, pric="10.20")]))
    assert (a["rule_version"], a["amount_at_risk"]) == (2, 20)
    assert a["fixmedins_code"] == HOSP
