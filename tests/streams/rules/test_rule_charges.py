"""Charge rules: YB-VISIT-DUP (a secondary item billed with its primary) and YB-DAY-FREQ (Σcnt per day)."""

from __future__ import annotations

from typing import Any

from schemas.calendar import china_day
from streams.rules.alerts import alert_id

from .builders import (
    ALT,
    BED,
    BIOCHEM_PANEL,
    CBC,
    ECG_MONITOR,
    IV_DRIP,
    NURSING_1,
    NURSING_2,
    OUTPATIENT_CONSULT,
    Rig,
    expect,
    hospital,
    line,
    ms,
    reversal,
    settlement,
    stay,
    token,
)

DUP = "YB-VISIT-DUP"
FREQ = "YB-DAY-FREQ"


def care(*days: int) -> list[dict[str, Any]]:
    """An infusion on each of ``days``: the stay is not bed-hanging."""
    return [line(IV_DRIP, t=ms(d, 15)) for d in days]


def day_window(day: int) -> tuple[int, int]:
    return ms(day, 0, 0), ms(day + 1, 0, 0) - 1


# --- YB-VISIT-DUP ---------------------------------------------------------------------------------

def test_dup_positive_panel_and_its_component_in_one_visit() -> None:
    s = stay("S1", ms(3), -7, 3, [line(BIOCHEM_PANEL, t=ms(1, 8)), line(ALT, t=ms(1, 9)), line(BED, t=ms(1))])
    alerts = Rig().alerts(s)
    assert [a["rule_id"] for a in alerts] == [DUP]
    a = alerts[0]
    expect(a, DUP, ["S1"], window=(ms(1, 8), ms(1, 9)))
    assert a["alert_id"] == alert_id(DUP, token(), f"S1|{ALT}|{china_day(ms(1))}")
    assert a["amount_at_risk"] == 400  # the ALT line: 4.00 yuan
    assert a["evidence"] == {"primary": BIOCHEM_PANEL, "secondary": ALT, "scope": "visit"}
    assert a["mdtrt_ids"] == ["M-S1"]


def test_dup_positive_across_two_settlements_of_one_visit() -> None:
    rig = Rig()
    first = stay("S1", ms(2), 0, 2, [line(BIOCHEM_PANEL, t=ms(1))], mdtrt_id="M1")
    second = stay("S2", ms(2, 11), 0, 2, [line(ALT, t=ms(1, 12))], mdtrt_id="M1")
    assert rig.alerts(first, rule=DUP) == []
    [a] = rig.alerts(second, rule=DUP)
    expect(a, DUP, ["S1", "S2"], window=(ms(1), ms(1, 12)))
    assert a["mdtrt_ids"] == ["M1"]


def test_dup_negative_other_visit_or_other_hospital() -> None:
    rig = Rig()
    assert rig.alerts(stay("S1", ms(2), -7, 2, [line(BIOCHEM_PANEL, t=ms(1))], mdtrt_id="M1")) == []
    # visit-scoped pair: the same hospital but another visit is not a duplicate
    assert rig.alerts(stay("S2", ms(2, 12), 0, 2, [line(ALT, t=ms(1))], mdtrt_id="M2"), rule=DUP) == []
    # another hospital, same visit id
    assert rig.alerts(stay("S3", ms(2, 13), 0, 2, [line(ALT, t=ms(1))], mdtrt_id="M1", h=hospital(2)),
                      rule=DUP) == []
    assert rig.alerts(stay("S4", ms(2, 14), 0, 2, [line(ALT, t=ms(1)), line(CBC, t=ms(1))]), rule=DUP) == []


def test_dup_boundary_day_scoped_pair_on_one_china_day_vs_across_midnight() -> None:
    rig = Rig()
    same_day = stay("S1", ms(3), 0, 3, [line(NURSING_1, t=ms(1, 0, 0)), line(NURSING_2, t=ms(1, 23, 59))])
    [a] = rig.alerts(same_day, rule=DUP)
    expect(a, DUP, ["S1"], window=(ms(1, 0, 0), ms(1, 23, 59)))
    assert a["evidence"]["scope"] == "day"
    # 23:59 and 00:00 China time: one minute apart, but two natural days
    across = stay("S2", ms(3), 0, 3, [line(NURSING_1, t=ms(1, 23, 59)), line(NURSING_2, t=ms(2, 0, 0))],
                  psn="PSN002")
    assert rig.alerts(across, rule=DUP) == []


def test_dup_third_component_of_the_same_panel_alerts_separately_the_same_one_again_does_not() -> None:
    rig = Rig()
    s = stay("S1", ms(3), 0, 3, [line(BIOCHEM_PANEL, t=ms(1)), line(ALT, t=ms(1)), line(ALT, t=ms(1, 11))])
    [a] = rig.alerts(s, rule=DUP)
    assert a["setl_ids"] == ["S1"]
    assert rig.alerts(s, rule=DUP) == []  # the same settlement delivered again


def test_dup_late_secondary_settled_earlier_arriving_second_still_counts() -> None:
    rig = Rig()
    primary = stay("S2", ms(2, 11), -7, 2, [line(BIOCHEM_PANEL, t=ms(1))], mdtrt_id="M1")
    secondary = stay("S1", ms(2, 9), -7, 2, [line(ALT, t=ms(1, 12))], mdtrt_id="M1")
    assert rig.alerts(primary) == []
    [a] = rig.alerts(secondary)
    expect(a, DUP, ["S1", "S2"], window=(ms(1), ms(1, 12)))


def test_dup_late_primary_arriving_after_its_secondary_still_counts() -> None:
    rig = Rig()
    secondary = stay("S1", ms(2), 0, 2, [line(ALT, t=ms(1, 12))], mdtrt_id="M1")
    primary = stay("S2", ms(2, 11), 0, 2, [line(BIOCHEM_PANEL, t=ms(1))], mdtrt_id="M1")
    assert rig.alerts(secondary, rule=DUP) == []
    [a] = rig.alerts(primary, rule=DUP)
    assert a["setl_ids"] == ["S1", "S2"]


def test_dup_late_beyond_the_lateness_skips_the_pair_check_but_line_rules_fire() -> None:
    rig = Rig(lateness_days=35)
    rig.send(settlement("OTHER", ms(100), [line(CBC)], psn="PSN999"))
    s = stay("S1", ms(3), -7, 3, [line(BIOCHEM_PANEL, t=ms(1)), line(ALT, t=ms(1)),
                                  line(IV_DRIP, pric="9.00", t=ms(1))])
    out = rig.send(s)
    assert out.late == 1
    assert [a["rule_id"] for a, _, _ in out.alerts] == ["YB-LINE-PRICE"]


def test_dup_full_reversal_of_the_primary_retracts_partial_does_not() -> None:
    rig = Rig()
    first = stay("S1", ms(2), 0, 2, [line(BIOCHEM_PANEL, t=ms(1))], mdtrt_id="M1")
    second = stay("S2", ms(2, 11), 0, 2, [line(ALT, t=ms(1, 12))], mdtrt_id="M1")
    [fired] = rig.each([first, second], DUP)
    assert rig.alerts(reversal(first, full=False), rule=DUP) == []
    [retracted] = rig.alerts(reversal(first), rule=DUP)
    expect(retracted, DUP, ["S1", "S2"], status="RETRACTED")
    assert retracted["alert_id"] == fired["alert_id"]


def test_dup_still_holding_after_one_primary_is_reversed_is_not_retracted() -> None:
    rig = Rig()
    p1 = stay("S0", ms(2, 9), 0, 2, [line(BIOCHEM_PANEL, t=ms(1, 8))], mdtrt_id="M1")
    p2 = stay("S1", ms(2, 10), 0, 2, [line(BIOCHEM_PANEL, t=ms(1, 9))], mdtrt_id="M1")
    sec = stay("S2", ms(2, 11), 0, 2, [line(ALT, t=ms(1, 12))], mdtrt_id="M1")
    [fired] = rig.each([p1, p2, sec], DUP)
    assert fired["setl_ids"] == ["S0", "S2"]
    assert rig.alerts(reversal(p1), rule=DUP) == []  # S1 still carries the panel


def test_dup_alert_kept_after_a_reversal_is_retracted_when_its_remaining_basis_is_reversed() -> None:
    rig = Rig()
    p1 = stay("S0", ms(2, 9), 0, 2, [line(BIOCHEM_PANEL, t=ms(1, 8))], mdtrt_id="M1")
    p2 = stay("S1", ms(2, 10), 0, 2, [line(BIOCHEM_PANEL, t=ms(1, 9))], mdtrt_id="M1")
    sec = stay("S2", ms(2, 11), 0, 2, [line(ALT, t=ms(1, 12))], mdtrt_id="M1")
    [fired] = rig.each([p1, p2, sec], DUP)
    assert rig.alerts(reversal(p1), rule=DUP) == []
    [retracted] = rig.alerts(reversal(p2), rule=DUP)
    assert (retracted["alert_id"], retracted["status"]) == (fired["alert_id"], "RETRACTED")


# --- YB-DAY-FREQ ----------------------------------------------------------------------------------

def test_freq_positive_two_bed_fees_on_one_day() -> None:
    s = stay("S1", ms(3), -7, 3, [line(BED, t=ms(1, 8)), line(BED, t=ms(1, 20)), line(BED, t=ms(2)), *care(1, 2)])
    alerts = Rig().alerts(s)
    assert [a["rule_id"] for a in alerts] == [FREQ]
    a = alerts[0]
    day = china_day(ms(1))
    expect(a, FREQ, ["S1"], window=day_window(1))
    assert a["alert_id"] == alert_id(FREQ, token(), f"M-S1|{BED}|{day}")
    assert a["amount_at_risk"] == 4800  # one of the two 48-yuan bed days
    assert a["evidence"] == {"item": BED, "day": str(day), "quantity": "2", "limit_per_day": "1"}


def test_freq_negative_one_bed_fee_a_day() -> None:
    s = stay("S1", ms(3), -7, 3, [*(line(BED, t=ms(d)) for d in range(3)), *care(0, 1, 2)])
    assert Rig().alerts(s) == []


def test_freq_boundary_24_hours_of_monitoring_vs_24_0001() -> None:
    rig = Rig()
    assert rig.alerts(stay("S1", ms(3), 0, 3, [line(ECG_MONITOR, cnt="24", t=ms(1))]), rule=FREQ) == []
    [a] = rig.alerts(stay("S2", ms(3), 0, 3, [line(ECG_MONITOR, cnt="24.0001", t=ms(1))]), rule=FREQ)
    assert a["evidence"]["quantity"] == "24.0001"
    assert a["evidence"]["limit_per_day"] == "24"
    assert a["amount_at_risk"] == 1  # 9600 fen − ⌊9600 × 24 / 24.0001⌋


def test_freq_boundary_days_are_china_calendar_days() -> None:
    rig = Rig()
    across = stay("S1", ms(3), 0, 3, [line(BED, t=ms(1, 23, 30)), line(BED, t=ms(2, 0, 30))])
    assert rig.alerts(across, rule=FREQ) == []
    same = stay("S2", ms(3), 0, 3, [line(BED, t=ms(1, 0, 0)), line(BED, t=ms(1, 23, 59))])
    [a] = rig.alerts(same, rule=FREQ)
    assert a["window_start"] <= ms(1, 0, 0) and ms(1, 23, 59) <= a["window_end"]


def test_freq_one_alert_per_item_and_day() -> None:
    s = stay("S1", ms(4), 0, 4, [line(BED, t=ms(1)), line(BED, t=ms(1, 11)), line(BED, t=ms(1, 12)),
                                 line(BED, t=ms(2)), line(BED, t=ms(2, 11)), line(OUTPATIENT_CONSULT, t=ms(3))])
    alerts = Rig().alerts(s, rule=FREQ)
    assert [a["evidence"]["day"] for a in alerts] == [str(china_day(ms(1))), str(china_day(ms(2)))]
    assert [a["evidence"]["quantity"] for a in alerts] == ["3", "2"]
    assert len({a["alert_id"] for a in alerts}) == 2


def test_freq_late_settlement_still_fires() -> None:
    rig = Rig(lateness_days=35)
    rig.send(settlement("OTHER", ms(100), [line(CBC)], psn="PSN999"))
    out = rig.send(stay("S1", ms(3), 0, 3, [line(BED, t=ms(1)), line(BED, t=ms(1, 11))]))
    assert out.late == 1
    assert [a["rule_id"] for a, _, _ in out.alerts] == [FREQ]


def test_freq_full_reversal_retracts_partial_does_not() -> None:
    rig = Rig()
    s = stay("S1", ms(3), 0, 3, [line(BED, t=ms(1)), line(BED, t=ms(1, 11))])
    [fired] = rig.alerts(s, rule=FREQ)
    assert rig.alerts(reversal(s, full=False)) == []
    [retracted] = rig.alerts(reversal(s))
    expect(retracted, FREQ, ["S1"], status="RETRACTED", window=day_window(1))
    assert retracted["alert_id"] == fired["alert_id"]


def test_dup_outpatient_consult_during_a_long_stay_counts_by_line_time() -> None:
    """The stay settles days after the outpatient visit; the line times decide the natural day."""
    from .builders import INPATIENT_CONSULT, OUTPATIENT_CONSULT, Rig, line, ms, settlement, stay

    rig = Rig()
    visit = settlement("S-VISIT", ms(2, 10), [line(OUTPATIENT_CONSULT, t=ms(2, 9))], mdtrt_id="M-VISIT")
    stay_lines = [line(INPATIENT_CONSULT, t=ms(d, 8)) for d in range(1, 8)]
    long_stay = stay("S-STAY", ms(7, 16), 1, 7, stay_lines)
    assert rig.alerts(visit, rule="YB-VISIT-DUP") == []
    [a] = rig.alerts(long_stay, rule="YB-VISIT-DUP")  # settled 5 days later
    assert sorted(a["setl_ids"]) == ["S-STAY", "S-VISIT"]
    assert a["evidence"]["scope"] == "day"
