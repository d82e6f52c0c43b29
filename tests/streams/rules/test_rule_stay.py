"""Inpatient-stay rules: YB-STAY-SPLIT (readmission), YB-STAY-BEDHANG (idle days), YB-STAY-LOWADM."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.calendar import china_day
from streams.rules.alerts import alert_id

from .builders import (
    BED,
    BIOCHEM_PANEL,
    CBC,
    INPATIENT_CONSULT,
    IV_DRIP,
    NURSING_2,
    URINE,
    Rig,
    date,
    expect,
    hospital,
    line,
    ms,
    reversal,
    settlement,
    stay,
    token,
)

SPLIT = "YB-STAY-SPLIT"
BEDHANG = "YB-STAY-BEDHANG"
LOWADM = "YB-STAY-LOWADM"


def advance(rig: Rig, day: int) -> None:
    rig.send(settlement(f"WM{day}", ms(day), [line(CBC)], psn="PSN999"))


# --- YB-STAY-SPLIT: readmitted to the same hospital within 15 days, same diagnosis ----------------

def admission(setl_id: str, adm: int, dscg: int, dx: str = "J18.900", **kw: Any) -> dict[str, Any]:
    """A busy stay (treated on admission day, no idle days) longer than three days."""
    return stay(setl_id, ms(dscg, 11), adm, dscg, [line(CBC, t=ms(adm, 12)), line(IV_DRIP, t=ms(adm, 13))],
                dx=dx, **kw)


def test_split_positive_readmitted_ten_days_after_discharge() -> None:
    rig = Rig()
    first, second = admission("S1", 0, 5), admission("S2", 15, 25)
    assert rig.alerts(first) == []
    alerts = rig.alerts(second)
    assert [a["rule_id"] for a in alerts] == [SPLIT]
    a = alerts[0]
    expect(a, SPLIT, ["S1", "S2"], window=(ms(0, 0, 0), ms(25, 11)))
    assert a["alert_id"] == alert_id(SPLIT, token(), "S2")
    assert a["amount_at_risk"] == second["medfee_sumamt"]
    assert a["mdtrt_ids"] == ["M-S1", "M-S2"]
    assert a["evidence"] == {"days_after_discharge": "10", "max_gap_days": "15", "diagnosis_category": "J18"}


@pytest.mark.parametrize("second", [
    pytest.param({"h": hospital(2)}, id="other hospital"),
    pytest.param({"dx": "K35.800"}, id="other diagnosis"),
])
def test_split_negative_other_hospital_or_diagnosis(second: dict[str, Any]) -> None:
    rig = Rig()
    assert rig.each([admission("S1", 0, 5), admission("S2", 10, 20, **second)], SPLIT) == []


def test_split_negative_planned_chemotherapy_cycles() -> None:
    rig = Rig()
    cycles = [admission(f"C{i}", 14 * i, 14 * i + 2, dx="Z51.100") for i in range(3)]
    assert rig.each(cycles, SPLIT) == []


@pytest.mark.parametrize(("gap", "fires"), [(0, True), (15, True), (16, False)])
def test_split_boundary_day_15_fires_day_16_does_not(gap: int, fires: bool) -> None:
    rig = Rig()
    rig.send(admission("S1", 0, 5))
    alerts = rig.alerts(admission("S2", 5 + gap, 5 + gap + 5), rule=SPLIT)
    assert len(alerts) == int(fires)
    if fires:
        assert alerts[0]["evidence"]["days_after_discharge"] == str(gap)


def test_split_late_first_stay_arriving_after_the_second() -> None:
    [in_order] = Rig().each([admission("S1", 0, 5), admission("S2", 15, 25)], SPLIT)
    rig = Rig()
    assert rig.alerts(admission("S2", 15, 25)) == []
    [a] = rig.alerts(admission("S1", 0, 5))
    assert {k: a[k] for k in ("alert_id", "setl_ids", "window_start", "window_end", "amount_at_risk")} == {
        k: in_order[k] for k in ("alert_id", "setl_ids", "window_start", "window_end", "amount_at_risk")}


def test_split_late_beyond_the_lateness_is_skipped() -> None:
    rig = Rig(lateness_days=35)
    rig.send(admission("S2", 15, 25))
    advance(rig, 60)
    out = rig.send(admission("S1", 0, 5))  # settled day 5 < day 60 − 35
    assert (out.late, out.alerts) == (1, [])


def test_split_reversal_retracts_partial_does_not() -> None:
    rig = Rig()
    first = admission("S1", 0, 5)
    [fired] = rig.each([first, admission("S2", 15, 25)], SPLIT)
    assert rig.alerts(reversal(first, full=False)) == []
    [retracted] = rig.alerts(reversal(first, t=ms(30)))
    expect(retracted, SPLIT, ["S1", "S2"], status="RETRACTED", window=(ms(0, 0, 0), ms(25, 11)))
    assert retracted["alert_id"] == fired["alert_id"]


def test_split_reversal_keeps_an_alert_that_still_holds() -> None:
    rig = Rig()
    s0 = admission("S0", 0, 4)
    alerts = rig.each([s0, admission("S1", 8, 12), admission("S2", 16, 20)], SPLIT)
    assert [a["setl_ids"] for a in alerts] == [["S0", "S1"], ["S0", "S2"]]
    # without S0, S1 is a first admission; S2 is still a readmission 4 days after S1
    [retracted] = rig.alerts(reversal(s0, t=ms(21)))
    assert retracted["alert_id"] == alert_id(SPLIT, token(), "S1")


def test_split_the_same_readmission_again_alerts_once() -> None:
    rig = Rig()
    second = admission("S2", 15, 25)
    assert len(rig.each([admission("S1", 0, 5), second], SPLIT)) == 1
    assert rig.alerts(second) == []


# --- YB-STAY-BEDHANG: consecutive days with only bed / nursing / consultation fees ----------------

def idle(day: int) -> list[dict[str, Any]]:
    return [line(BED, t=ms(day, 8)), line(NURSING_2, t=ms(day, 9)), line(INPATIENT_CONSULT, t=ms(day, 10))]


def treated(day: int) -> list[dict[str, Any]]:
    return [line(BED, t=ms(day, 8)), line(IV_DRIP, t=ms(day, 14)), line(CBC, t=ms(day, 15))]


IDLE_DAY_FEE = 4800 + 1920 + 2000


def test_bedhang_positive_two_idle_days() -> None:
    s = stay("S1", ms(6, 11), 0, 6, [*treated(0), *idle(1), *idle(2), *treated(3), *treated(4), *treated(5)])
    alerts = Rig().alerts(s)
    assert [a["rule_id"] for a in alerts] == [BEDHANG]
    a = alerts[0]
    expect(a, BEDHANG, ["S1"], window=(ms(0, 0, 0), ms(6, 11)))
    assert a["alert_id"] == alert_id(BEDHANG, token(), "S1")
    assert a["amount_at_risk"] == 2 * IDLE_DAY_FEE
    assert a["evidence"] == {"idle_days": "2", "last_idle_day": str(china_day(ms(2))),
                             "categories": "bed,consult,nursing"}


def test_bedhang_negative_idle_days_not_consecutive() -> None:
    s = stay("S1", ms(6, 11), 0, 6, [*treated(0), *idle(1), *treated(2), *idle(3), *treated(4), *idle(5)])
    assert Rig().alerts(s) == []


@pytest.mark.parametrize(("idle_days", "fires"), [(1, False), (2, True), (3, True)])
def test_bedhang_boundary_min_days(idle_days: int, fires: bool) -> None:
    lines = [*treated(0)] + [ln for d in range(1, 1 + idle_days) for ln in idle(d)] + treated(1 + idle_days)
    s = stay("S1", ms(8, 11), 0, 8, lines)
    alerts = Rig().alerts(s, rule=BEDHANG)
    assert len(alerts) == int(fires)
    if fires:
        assert alerts[0]["evidence"]["idle_days"] == str(idle_days)


def test_bedhang_boundary_a_test_breaks_an_idle_run() -> None:
    s = stay("S1", ms(6, 11), 0, 6, [*treated(0), *idle(1), *idle(2), line(URINE, t=ms(2, 16)), *treated(3)])
    assert Rig().alerts(s, rule=BEDHANG) == []


def test_bedhang_amount_at_risk_is_the_idle_run_only() -> None:
    s = stay("S1", ms(6, 11), 0, 6, [*idle(0), *treated(1), *idle(2), *idle(3), *treated(4)])
    [a] = Rig().alerts(s, rule=BEDHANG)
    assert a["amount_at_risk"] == 2 * IDLE_DAY_FEE


def test_bedhang_maternity_stay_is_an_inpatient_stay() -> None:
    s = settlement("S1", ms(6, 11), [*treated(0), *idle(1), *idle(2), *treated(3)], med_type="52",
                   gend="FEMALE", age=30, adm=date(0), dscg=date(6), dx="O80.000")
    assert len(Rig().alerts(s, rule=BEDHANG)) == 1


def test_bedhang_outpatient_settlements_are_not_stays() -> None:
    s = settlement("S1", ms(3), [*idle(1), *idle(2)], med_type="11")
    assert Rig().alerts(s, rule=BEDHANG) == []


def test_bedhang_late_settlement_still_fires() -> None:
    rig = Rig(lateness_days=35)
    advance(rig, 100)
    out = rig.send(stay("S1", ms(6, 11), 0, 6, [*treated(0), *idle(1), *idle(2), *treated(3)]))
    assert out.late == 1
    assert [a["rule_id"] for a, _, _ in out.alerts] == [BEDHANG]


def test_bedhang_reversal_retracts_partial_does_not() -> None:
    rig = Rig()
    s = stay("S1", ms(6, 11), 0, 6, [*treated(0), *idle(1), *idle(2), *treated(3)])
    [fired] = rig.alerts(s)
    assert rig.alerts(reversal(s, full=False)) == []
    [retracted] = rig.alerts(reversal(s))
    expect(retracted, BEDHANG, ["S1"], status="RETRACTED")
    assert retracted["alert_id"] == fired["alert_id"]


# --- YB-STAY-LOWADM: LOS ≤ 3 days, no operation, tests ≥ 60 % of the fees -------------------------

def short_stay(setl_id: str = "S1", los: int = 3, test_fee: str = "60.00", other_fee: str = "40.00",
               **kw: Any) -> dict[str, Any]:
    """Admitted day 0, discharged day ``los``; one blood panel (a test) and one bed day on day 1."""
    day = min(1, los)
    return stay(setl_id, ms(los, 18), 0, los, [line(BIOCHEM_PANEL, pric=test_fee, t=ms(day, 9)),
                                                line(BED, pric=other_fee, t=ms(day, 8))], **kw)


def test_lowadm_positive_three_days_mostly_tests() -> None:
    alerts = Rig().alerts(short_stay())
    assert [a["rule_id"] for a in alerts] == [LOWADM]
    a = alerts[0]
    expect(a, LOWADM, ["S1"], window=(ms(0, 0, 0), ms(3, 18)))
    assert a["alert_id"] == alert_id(LOWADM, token(), "S1")
    assert a["amount_at_risk"] == 10_000  # the whole stay
    assert a["evidence"] == {"los_days": "3", "test_share": "60.0%", "operations": "0"}


def test_lowadm_negative_with_an_operation() -> None:
    assert Rig().alerts(short_stay(ops=["47.0100"]), rule=LOWADM) == []


@pytest.mark.parametrize(("los", "fires"), [(0, True), (3, True), (4, False)])
def test_lowadm_boundary_los_3_vs_4(los: int, fires: bool) -> None:
    alerts = Rig().alerts(short_stay(los=los), rule=LOWADM)
    assert len(alerts) == int(fires)
    if fires:
        assert alerts[0]["evidence"]["los_days"] == str(los)


@pytest.mark.parametrize(("test_fee", "other_fee", "fires"), [
    ("60.00", "40.00", True), ("59.90", "40.10", False), ("59.99", "40.01", False), ("60.01", "39.99", True),
])
def test_lowadm_boundary_test_share_60_percent(test_fee: str, other_fee: str, fires: bool) -> None:
    assert len(Rig().alerts(short_stay(test_fee=test_fee, other_fee=other_fee), rule=LOWADM)) == int(fires)


def test_lowadm_late_settlement_still_fires() -> None:
    rig = Rig(lateness_days=35)
    advance(rig, 100)
    out = rig.send(short_stay())
    assert out.late == 1
    assert [a["rule_id"] for a, _, _ in out.alerts] == [LOWADM]


def test_lowadm_reversal_retracts_partial_does_not() -> None:
    rig = Rig()
    s = short_stay()
    [fired] = rig.alerts(s)
    assert rig.alerts(reversal(s, full=False)) == []
    [retracted] = rig.alerts(reversal(s))
    expect(retracted, LOWADM, ["S1"], status="RETRACTED")
    assert retracted["alert_id"] == fired["alert_id"]


def test_bedhang_idle_days_must_be_consecutive() -> None:
    """Two idle days with busy or unbilled days between them are not a run."""
    from .builders import BED, CBC, NURSING_2, Rig, line, ms, stay

    rig = Rig()
    lines = [line(BED, t=ms(d, 8)) for d in (1, 2, 5, 9)] + [line(NURSING_2, t=ms(d, 9)) for d in (2, 5)]
    lines += [line(CBC, t=ms(1, 10)), line(CBC, t=ms(9, 10))]
    assert rig.alerts(stay("S-GAP", ms(9, 16), 1, 9, lines), rule="YB-STAY-BEDHANG") == []
