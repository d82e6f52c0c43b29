"""Person-history rules over the person timeline: YB-PSN-RETEST, -OVERRX, -SHOP-1D, -SHOP-7D, -GHOST."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.calendar import china_day
from streams.rules.alerts import alert_id

from .builders import (
    AMLODIPINE,
    AMOXICILLIN,
    CBC,
    DAY_MS,
    FRUCTOSAMINE,
    HBA1C,
    HOSP,
    METFORMIN,
    NIFEDIPINE,
    OUTPATIENT_CONSULT,
    SALBUTAMOL,
    Rig,
    expect,
    hospital,
    line,
    ms,
    pharmacy,
    reversal,
    settlement,
    stay,
    token,
)

RETEST = "YB-PSN-RETEST"
OVERRX = "YB-PSN-OVERRX"
SHOP1 = "YB-PSN-SHOP-1D"
SHOP7 = "YB-PSN-SHOP-7D"
GHOST = "YB-PSN-GHOST"


def advance(rig: Rig, day: int) -> None:
    """Move the partition's watermark to ``day`` with another person's settlement."""
    rig.send(settlement(f"WM{day}", ms(day), [line(CBC)], psn="PSN999"))


def day_window(day: int) -> tuple[int, int]:
    return ms(day, 0, 0), ms(day + 1, 0, 0) - 1


# --- YB-PSN-RETEST: the same test again before its minimum interval ---------------------------------

def lab(setl_id: str, t: int, code: str = HBA1C, **kw: Any) -> dict[str, Any]:
    """An outpatient settlement with one lab test, done an hour before settling."""
    return settlement(setl_id, t, [line(code, t=t - 3_600_000)], **kw)


def test_retest_positive_hba1c_ten_days_after_the_last_one() -> None:
    rig = Rig()
    assert rig.alerts(lab("S1", ms(0))) == []
    alerts = rig.alerts(lab("S2", ms(10), h=hospital(2)))
    assert [a["rule_id"] for a in alerts] == [RETEST]
    a = alerts[0]
    expect(a, RETEST, ["S1", "S2"], window=(ms(0, 9), ms(10, 9)))
    assert a["alert_id"] == alert_id(RETEST, token(), f"S2|{HBA1C}")
    assert a["fixmedins_code"] == hospital(2)  # where the test too soon was done
    assert a["amount_at_risk"] == 4800  # the repeated test
    assert a["evidence"] == {"item": HBA1C, "days_between": "10.0", "min_interval_days": "15"}
    assert a["detected_at"] == ms(10, 9)


def test_retest_negative_after_the_interval_or_another_test() -> None:
    rig = Rig()
    assert rig.each([lab("S1", ms(0)), lab("S2", ms(20)), lab("S3", ms(21), FRUCTOSAMINE)]) == []
    assert rig.alerts(lab("S4", ms(21, 12), psn="PSN002")) == []  # another person


@pytest.mark.parametrize(("code", "days", "minutes_earlier", "fires"), [
    (HBA1C, 15, 0, False), (HBA1C, 15, 1, True), (HBA1C, 14, 0, True), (HBA1C, 16, 0, False),
    (FRUCTOSAMINE, 7, 0, False), (FRUCTOSAMINE, 7, 1, True), (FRUCTOSAMINE, 6, 0, True),
])
def test_retest_boundary_exactly_the_interval_is_allowed(code: str, days: int, minutes_earlier: int,
                                                         fires: bool) -> None:
    rig = Rig()
    rig.send(lab("S1", ms(0), code))
    t = ms(days) - minutes_earlier * 60_000
    assert len(rig.alerts(lab("S2", t, code), rule=RETEST)) == int(fires)


def test_retest_late_earlier_test_arriving_second_gives_the_same_alert() -> None:
    in_order = Rig().each([lab("S1", ms(0)), lab("S2", ms(10))], RETEST)
    rig = Rig()
    assert rig.alerts(lab("S2", ms(10))) == []
    [a] = rig.alerts(lab("S1", ms(0)))
    assert (a["alert_id"], a["setl_ids"], a["amount_at_risk"]) == (
        in_order[0]["alert_id"], ["S1", "S2"], in_order[0]["amount_at_risk"])
    assert (a["window_start"], a["window_end"]) == (ms(0, 9), ms(10, 9))


def test_retest_late_beyond_the_lateness_is_not_paired_but_line_rules_fire() -> None:
    rig = Rig(lateness_days=35)
    rig.send(lab("S1", ms(10)))
    advance(rig, 60)
    late = settlement("S2", ms(20), [line(HBA1C, t=ms(20, 9)), line(OUTPATIENT_CONSULT, pric="11.00")])
    out = rig.send(late)
    assert out.late == 1
    assert [a["rule_id"] for a, _, _ in out.alerts] == ["YB-LINE-PRICE"]


def test_retest_boundary_lateness_exactly_at_the_watermark_still_counts() -> None:
    rig = Rig(lateness_days=35)
    rig.send(lab("S1", ms(10)))
    advance(rig, 45)  # watermark − 35 days = ms(10)
    out = rig.send(lab("S2", ms(10)))
    assert out.late == 0
    assert [a["rule_id"] for a, _, _ in out.alerts] == [RETEST]
    rig = Rig(lateness_days=35)
    rig.send(lab("S1", ms(10)))
    advance(rig, 45)
    out = rig.send(lab("S2", ms(10) - 1))
    assert (out.late, out.alerts) == (1, [])


def test_retest_third_test_in_the_window_alerts_once_for_itself() -> None:
    rig = Rig()
    alerts = rig.each([lab("S1", ms(0)), lab("S2", ms(5)), lab("S3", ms(10))], RETEST)
    assert [a["alert_id"] for a in alerts] == [alert_id(RETEST, token(), f"S2|{HBA1C}"),
                                              alert_id(RETEST, token(), f"S3|{HBA1C}")]
    assert rig.alerts(lab("S3", ms(10))) == []  # the same trigger again


def test_retest_full_reversal_retracts_partial_does_not() -> None:
    rig = Rig()
    first = lab("S1", ms(0))
    [fired] = rig.each([first, lab("S2", ms(10))], RETEST)
    assert rig.alerts(reversal(first, full=False)) == []
    [retracted] = rig.alerts(reversal(first, t=ms(11)))
    expect(retracted, RETEST, ["S1", "S2"], status="RETRACTED", window=(ms(0, 9), ms(10, 9)))
    assert retracted["alert_id"] == fired["alert_id"]
    assert retracted["amount_at_risk"] == 0


def test_retest_reversal_keeps_an_alert_that_still_holds() -> None:
    rig = Rig()
    a = lab("S1", ms(0))
    rig.each([a, lab("S2", ms(5)), lab("S3", ms(10))], RETEST)
    # without S1, S2 is no longer too soon after anything; S3 still is (5 days after S2)
    [retracted] = rig.alerts(reversal(a, t=ms(11)))
    assert retracted["alert_id"] == alert_id(RETEST, token(), f"S2|{HBA1C}")
    assert retracted["status"] == "RETRACTED"


# --- YB-PSN-OVERRX: Σ days of supply of one drug in 30 days above 30 × 1.2 ------------------------

def rx(setl_id: str, t: int, cnt: str | int, code: str = AMLODIPINE, **kw: Any) -> dict[str, Any]:
    return settlement(setl_id, t, [line(code, cnt=cnt)], med_type="14", **kw)


def test_overrx_positive_two_dispenses_of_20_days_within_30_days() -> None:
    rig = Rig()
    assert rig.alerts(rx("A", ms(0), 20)) == []
    alerts = rig.alerts(rx("B", ms(10), 20, h=hospital(2)))
    assert [a["rule_id"] for a in alerts] == [OVERRX]
    a = alerts[0]
    expect(a, OVERRX, ["A", "B"], window=(ms(10) - 30 * DAY_MS, ms(10)))
    assert a["alert_id"] == alert_id(OVERRX, token(), "amlodipine|B")
    assert a["fixmedins_code"] == hospital(2)
    assert a["amount_at_risk"] == 60  # 6.00 yuan dispensed × (40 − 36) / 40
    assert a["evidence"] == {"generic": "amlodipine", "days_supplied": "40.0", "limit_days": "36.0",
                             "window_days": "30"}


def test_overrx_negative_short_term_as_needed_or_other_generics() -> None:
    rig = Rig()
    assert rig.each([rx("A", ms(0), 10, AMOXICILLIN), rx("B", ms(1), 10, AMOXICILLIN)]) == []  # 80 days
    assert rig.each([rx("C", ms(2), 5, SALBUTAMOL), rx("D", ms(3), 5, SALBUTAMOL)]) == []
    assert rig.each([rx("E", ms(4), 20, AMLODIPINE), rx("F", ms(5), 20, NIFEDIPINE)]) == []


@pytest.mark.parametrize(("first", "second", "fires"), [
    ("30", "6", False), ("30", "6.001", True), ("36", None, False), ("36.001", None, True),
])
def test_overrx_boundary_36_days_exactly_does_not_fire(first: str, second: str | None, fires: bool) -> None:
    rig = Rig()
    alerts = rig.alerts(rx("A", ms(0), first), rule=OVERRX)
    if second is not None:
        alerts += rig.alerts(rx("B", ms(1), second), rule=OVERRX)
    assert len(alerts) == int(fires)
    if fires:
        assert alerts[0]["evidence"]["days_supplied"] == "36.0"  # 36.001 shown to one decimal


def test_overrx_boundary_days_per_unit_of_the_knowledge_table() -> None:
    rig = Rig()  # metformin: half a day per tablet
    assert rig.alerts(rx("A", ms(0), 72, METFORMIN)) == []
    [a] = rig.alerts(rx("B", ms(0), 73, METFORMIN, psn="PSN002"))
    assert a["evidence"]["days_supplied"] == "36.5"


def test_overrx_boundary_the_window_is_30_days_ending_at_a_dispense() -> None:
    rig = Rig()
    rig.send(rx("A", ms(0), 20))
    assert rig.alerts(rx("B", ms(30), 20), rule=OVERRX) == []  # exactly 30 days later: A is out
    rig = Rig()
    rig.send(rx("A", ms(0), 20))
    assert len(rig.alerts(rx("B", ms(30) - 60_000, 20), rule=OVERRX)) == 1


def test_overrx_late_earlier_dispense_arriving_second_gives_the_same_alert() -> None:
    [in_order] = Rig().each([rx("A", ms(0), 20), rx("B", ms(10), 20)], OVERRX)
    rig = Rig()
    assert rig.alerts(rx("B", ms(10), 20)) == []
    [a] = rig.alerts(rx("A", ms(0), 20))
    assert {k: a[k] for k in ("alert_id", "setl_ids", "window_start", "window_end", "amount_at_risk")} == {
        k: in_order[k] for k in ("alert_id", "setl_ids", "window_start", "window_end", "amount_at_risk")}


def test_overrx_late_beyond_the_lateness_is_not_summed() -> None:
    rig = Rig(lateness_days=35)
    rig.send(rx("A", ms(10), 20))
    advance(rig, 50)
    out = rig.send(rx("B", ms(12), 20))
    assert (out.late, out.alerts) == (1, [])


def test_overrx_third_dispense_in_the_episode_does_not_alert_again_a_new_episode_does() -> None:
    rig = Rig()
    [first] = rig.each([rx("A", ms(0), 20), rx("B", ms(10), 20)], OVERRX)
    assert rig.alerts(rx("C", ms(15), 20), rule=OVERRX) == []  # still the episode until B + 30 days
    [second] = rig.alerts(rx("D", ms(41), 20), rule=OVERRX)  # C + D = 40 days in (day 11, day 41]
    assert second["alert_id"] != first["alert_id"]
    assert second["setl_ids"] == ["C", "D"]


def test_overrx_drugs_given_during_a_stay_are_not_supply() -> None:
    """A week in hospital on the same statin, then the usual 30-day refill: 7 + 30 days in 30 days,
    but the ward administered the first seven (generated clean traffic had this case)."""
    from .builders import stay

    rig = Rig()
    ward = stay("S1", ms(8), 1, 8, [line(AMLODIPINE, cnt=1, t=ms(d, 9)) for d in range(1, 8)])
    assert rig.each([ward, rx("A", ms(10), 30), rx("B", ms(12), 7)], OVERRX) != []  # 37 days out of hospital
    rig = Rig()
    assert rig.each([ward, rx("A", ms(10), 30)], OVERRX) == []


def test_overrx_full_reversal_retracts_partial_does_not() -> None:
    rig = Rig()
    a = rx("A", ms(0), 20)
    [fired] = rig.each([a, rx("B", ms(10), 20)], OVERRX)
    assert rig.alerts(reversal(a, full=False)) == []
    [retracted] = rig.alerts(reversal(a, t=ms(11)))
    expect(retracted, OVERRX, ["A", "B"], status="RETRACTED")
    assert retracted["alert_id"] == fired["alert_id"]


def test_overrx_reversal_keeps_an_alert_that_still_holds() -> None:
    rig = Rig()
    b = rx("B", ms(5), 10)
    [fired] = rig.each([rx("A", ms(0), 20), b, rx("C", ms(10), 20)], OVERRX)
    assert fired["setl_ids"] == ["A", "B", "C"]
    assert rig.alerts(reversal(b, t=ms(11))) == []  # A + C = 40 days still


def test_overrx_the_same_dispense_delivered_twice_counts_once() -> None:
    rig = Rig()
    a = rx("A", ms(0), 20)
    assert rig.each([a, a], OVERRX) == []


def test_overrx_after_a_retraction_a_new_excess_alerts() -> None:
    rig = Rig()
    a = rx("A", ms(0), 20)
    rig.each([a, rx("B", ms(10), 20)], OVERRX)
    rig.alerts(reversal(a, t=ms(12)))
    [new] = rig.alerts(rx("C", ms(15), 20), rule=OVERRX)  # B + C = 40 days
    assert new["setl_ids"] == ["B", "C"]


def test_overrx_reversal_leaves_an_alert_while_the_remaining_dispenses_still_exceed() -> None:
    rig = Rig()
    a = rx("A", ms(0), 20)
    emitted = rig.each([a, rx("B", ms(10), 20), rx("C", ms(20), 20)], OVERRX)
    emitted += rig.alerts(reversal(a, t=ms(21)), rule=OVERRX)
    final = {x["alert_id"]: x["status"] for x in emitted}
    assert "FIRED" in final.values(), "B + C = 40 days within 30 days: an alert must stand"


# --- YB-PSN-SHOP-1D: three or more institutions in one natural day -------------------------------

def visit(setl_id: str, t: int, h: str, **kw: Any) -> dict[str, Any]:
    return settlement(setl_id, t, [line(OUTPATIENT_CONSULT)], h=h, **kw)


def three_visits(day: int = 0) -> list[dict[str, Any]]:
    return [visit(f"V{i}", ms(day, 8 + i), hospital(i)) for i in (1, 2, 3)]


def test_shop1d_positive_three_hospitals_in_one_day() -> None:
    rig = Rig()
    v = three_visits()
    assert rig.each(v[:2]) == []
    alerts = rig.alerts(v[2])
    assert [a["rule_id"] for a in alerts] == [SHOP1]
    a = alerts[0]
    expect(a, SHOP1, ["V1", "V2", "V3"], window=day_window(0))
    assert a["alert_id"] == alert_id(SHOP1, token(), f"day|{china_day(ms(0))}")
    assert a["amount_at_risk"] == 3 * 800
    assert a["evidence"] == {"institutions": "3", "min_institutions": "3", "day": str(china_day(ms(0))),
                             "fixmedins_codes": ",".join(hospital(i) for i in range(1, 4))}
    assert a["fixmedins_code"] is None


def test_shop1d_negative_two_institutions_or_inpatient_stays() -> None:
    rig = Rig()
    assert rig.each([visit("V1", ms(0, 8), hospital(1)), visit("V2", ms(0, 9), hospital(2)),
                     visit("V3", ms(0, 10), hospital(2))]) == []
    s = stay("S1", ms(0, 11), -10, 0, [line(CBC, t=ms(-5))], h=hospital(3))
    assert rig.alerts(s, rule=SHOP1) == []


def test_shop1d_boundary_pharmacies_count_and_days_end_at_china_midnight() -> None:
    rig = Rig()
    rig.each([visit("V1", ms(0, 22), hospital(1)), visit("V2", ms(0, 23, 59), pharmacy(1), med_type="41",
                                                          hosp_lv="9")])
    assert rig.alerts(visit("V3", ms(1, 0, 0), hospital(3)), rule=SHOP1) == []
    [a] = rig.alerts(visit("V4", ms(0, 23, 30), hospital(4)), rule=SHOP1)
    assert a["setl_ids"] == ["V1", "V2", "V4"]


def test_shop1d_late_earliest_visit_arriving_last_fires() -> None:
    rig = Rig()
    v = three_visits()
    [a] = rig.each([v[2], v[1], v[0]], SHOP1)
    assert a["setl_ids"] == ["V1", "V2", "V3"]
    assert a["detected_at"] == v[2]["setl_time"]


def test_shop1d_late_beyond_the_lateness_is_skipped() -> None:
    rig = Rig(lateness_days=35)
    v = three_visits()
    rig.each(v[:2])
    advance(rig, 40)
    out = rig.send(v[2])
    assert (out.late, out.alerts) == (1, [])


def test_shop1d_fourth_institution_same_day_does_not_alert_again() -> None:
    rig = Rig()
    assert len(rig.each(three_visits(), SHOP1)) == 1
    assert rig.alerts(visit("V4", ms(0, 15), hospital(4))) == []
    assert rig.alerts(three_visits()[2]) == []  # the trigger again


def test_shop1d_reversal_retracts_unless_still_three() -> None:
    rig = Rig()
    v = three_visits()
    [fired] = rig.each([*v, visit("V4", ms(0, 15), hospital(4))], SHOP1)
    assert rig.alerts(reversal(v[0], full=False)) == []
    assert rig.alerts(reversal(v[0], t=ms(0, 20))) == []  # V2, V3, V4: still three
    [retracted] = rig.alerts(reversal(v[1], t=ms(0, 21)))
    assert (retracted["alert_id"], retracted["status"]) == (fired["alert_id"], "RETRACTED")


def test_shop1d_window_qualifying_again_after_a_retraction_alerts_again() -> None:
    rig = Rig()
    v = three_visits()
    rig.each(v)
    rig.send(reversal(v[0], t=ms(0, 12)))
    [again] = rig.alerts(visit("V4", ms(0, 15), hospital(4)), rule=SHOP1)
    assert (again["status"], again["setl_ids"]) == ("FIRED", ["V2", "V3", "V4"])


# --- YB-PSN-SHOP-7D: one drug class from five or more institutions within 7 days ------------------

def buy(setl_id: str, t: int, n: int, code: str = AMLODIPINE) -> dict[str, Any]:
    return settlement(setl_id, t, [line(code, cnt=7)], h=pharmacy(n), hosp_lv="9", med_type="41")


def five_buys(last_day: int = 4) -> list[dict[str, Any]]:
    return [buy(f"B{i}", ms(i), i) for i in range(1, 5)] + [buy("B5", ms(last_day, 11), 5, NIFEDIPINE)]


def test_shop7d_positive_five_pharmacies_one_class_in_a_week() -> None:
    rig = Rig()
    b = five_buys()
    assert rig.each(b[:4]) == []
    alerts = rig.alerts(b[4])
    assert [a["rule_id"] for a in alerts] == [SHOP7]
    a = alerts[0]
    end = ms(4, 11)
    expect(a, SHOP7, ["B1", "B2", "B3", "B4", "B5"], window=(end - 7 * DAY_MS, end))
    assert a["alert_id"] == alert_id(SHOP7, token(), "C08CA|B5")
    assert a["fixmedins_code"] is None  # the person's behaviour, not one pharmacy's: see PERSON_LEVEL
    assert a["amount_at_risk"] == 4 * 105 + 420  # 7 × 0.15 yuan four times, 7 × 0.60 once
    assert a["evidence"] == {"drug_class": "C08CA", "institutions": "5", "min_institutions": "5",
                             "window_days": "7", "fixmedins_codes": ",".join(pharmacy(i) for i in range(1, 6))}


def test_shop7d_negative_four_institutions_or_other_classes() -> None:
    rig = Rig()
    assert rig.each([buy(f"B{i}", ms(i), i) for i in range(1, 5)] + [buy("B5", ms(5), 4)]) == []
    assert rig.alerts(buy("B6", ms(5, 12), 6, METFORMIN), rule=SHOP7) == []


def test_shop7d_boundary_first_dispense_exactly_seven_days_earlier_is_out() -> None:
    rig = Rig()
    assert rig.each([buy("B1", ms(0, 11), 1), *five_buys()[1:4], buy("B5", ms(7, 11), 5)], SHOP7) == []
    rig = Rig()
    assert len(rig.each([buy("B1", ms(0, 11), 1), *five_buys()[1:4], buy("B5", ms(7, 10, 59), 5)], SHOP7)) == 1


def test_shop7d_late_dispense_arriving_last_still_counts() -> None:
    rig = Rig()
    b = five_buys()
    [a] = rig.each([b[4], b[3], b[2], b[1], b[0]], SHOP7)
    assert a["alert_id"] == alert_id(SHOP7, token(), "C08CA|B5")
    assert a["setl_ids"] == ["B1", "B2", "B3", "B4", "B5"]


def test_shop7d_late_beyond_the_lateness_is_skipped() -> None:
    rig = Rig(lateness_days=35)
    b = five_buys()
    rig.each(b[1:])
    advance(rig, 45)
    out = rig.send(b[0])
    assert (out.late, out.alerts) == (1, [])


def test_shop7d_sixth_institution_in_the_episode_does_not_alert_again() -> None:
    rig = Rig()
    assert len(rig.each(five_buys(), SHOP7)) == 1
    assert rig.alerts(buy("B6", ms(5), 6), rule=SHOP7) == []


def test_shop7d_reversal_retracts_unless_still_five() -> None:
    rig = Rig()
    b = five_buys()
    [fired] = rig.each(b, SHOP7)
    assert rig.alerts(reversal(b[0], full=False)) == []
    [retracted] = rig.alerts(reversal(b[0], t=ms(5)))
    assert (retracted["alert_id"], retracted["status"]) == (fired["alert_id"], "RETRACTED")
    rig = Rig()  # pharmacy 1 twice: without B1, B1b keeps five institutions in the window
    [fired] = rig.each([*b[:4], buy("B1b", ms(1, 12), 1), b[4]], SHOP7)
    assert fired["setl_ids"] == ["B1", "B1b", "B2", "B3", "B4", "B5"]
    assert rig.alerts(reversal(b[0], t=ms(5))) == []


# --- YB-PSN-GHOST: one person settling in two provinces on one day -------------------------------

GD = "440104"


def test_ghost_positive_beijing_and_guangzhou_on_one_day() -> None:
    rig = Rig()
    bj = visit("S1", ms(0, 9), HOSP)
    gz = visit("S2", ms(0, 15), hospital(1, GD), mdtrt=GD)
    assert rig.alerts(bj) == []
    alerts = rig.alerts(gz)
    assert [a["rule_id"] for a in alerts] == [GHOST]
    a = alerts[0]
    expect(a, GHOST, ["S1", "S2"], window=day_window(0))
    assert a["alert_id"] == alert_id(GHOST, token(), f"day|{china_day(ms(0))}")
    assert a["amount_at_risk"] == 1600
    assert a["evidence"] == {"provinces": "11,44", "day": str(china_day(ms(0))),
                             "fixmedins_codes": f"{HOSP},{hospital(1, GD)}"}
    assert a["fixmedins_code"] is None
    assert a["admdvs"] == "110105"  # the insured region


def test_ghost_negative_two_cities_of_one_province() -> None:
    rig = Rig()
    assert rig.each([visit("S1", ms(0, 9), HOSP), visit("S2", ms(0, 15), hospital(1, "110108"),
                                                          mdtrt="110108")]) == []


def test_ghost_boundary_across_china_midnight_vs_same_day() -> None:
    rig = Rig()
    rig.send(visit("S1", ms(0, 23, 30), HOSP))
    assert rig.alerts(visit("S2", ms(1, 0, 30), hospital(1, GD), mdtrt=GD), rule=GHOST) == []
    [a] = rig.alerts(visit("S3", ms(0, 0, 0), hospital(2, GD), mdtrt=GD), rule=GHOST)
    assert a["setl_ids"] == ["S1", "S3"]


def test_ghost_late_and_third_province() -> None:
    rig = Rig()
    rig.send(visit("S2", ms(0, 15), hospital(1, GD), mdtrt=GD))
    [a] = rig.alerts(visit("S1", ms(0, 9), HOSP), rule=GHOST)  # the earlier one arriving second
    assert a["setl_ids"] == ["S1", "S2"]
    assert rig.alerts(visit("S3", ms(0, 18), hospital(1, "310101"), mdtrt="310101"), rule=GHOST) == []
    rig = Rig(lateness_days=35)
    rig.send(visit("S1", ms(0, 9), HOSP))
    advance(rig, 40)
    out = rig.send(visit("S2", ms(0, 15), hospital(1, GD), mdtrt=GD))
    assert (out.late, out.alerts) == (1, [])


def test_ghost_reversal_retracts_unless_two_provinces_remain() -> None:
    rig = Rig()
    bj = visit("S1", ms(0, 9), HOSP)
    gz = visit("S2", ms(0, 15), hospital(1, GD), mdtrt=GD)
    [fired] = rig.each([bj, gz], GHOST)
    assert rig.alerts(reversal(gz, full=False)) == []
    [retracted] = rig.alerts(reversal(gz, t=ms(1)))
    expect(retracted, GHOST, ["S1", "S2"], status="RETRACTED", window=day_window(0))
    assert retracted["alert_id"] == fired["alert_id"]
    rig = Rig()
    [fired] = rig.each([bj, gz, visit("S3", ms(0, 16), hospital(1, "310101"), mdtrt="310101")], GHOST)
    assert rig.alerts(reversal(gz, t=ms(1)), rule=GHOST) == []  # Beijing and Shanghai remain


def test_a_persons_timeline_is_bounded_whatever_a_producer_sends() -> None:
    """Thousands of settlements of one person in one day (a hostile or broken producer): the
    timeline keeps the newest MAX_TIMELINE, and the engine says it cut."""
    from streams.rules.engine import MAX_TIMELINE

    rig = Rig()
    out = rig.send(*(visit(f"F{i}", ms(0, 8) + i * 1_000, hospital(1)) for i in range(MAX_TIMELINE + 50)))
    tl = rig.store.get(0, token())["tl"]
    assert len(tl) == MAX_TIMELINE and tl[0]["s"] == "F50" and tl[-1]["s"] == f"F{MAX_TIMELINE + 49}"
    assert out.capped == 50
