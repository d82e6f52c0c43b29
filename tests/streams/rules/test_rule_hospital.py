"""Hospital-month and DRG-group rules on the re-keyed stay streams: YB-HOSP-UPCODE, YB-HOSP-HIGHCOST."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streams.rules.alerts import alert_id
from streams.rules.events import EngineOutput

from .builders import (
    CBC,
    HOSP,
    IV_DRIP,
    REGION,
    GroupedRig,
    Rig,
    expect,
    hospital,
    line,
    month_ms,
    ms,
    reversal,
    stay,
    stay_value,
    token,
)

UPCODE = "YB-HOSP-UPCODE"
HIGHCOST = "YB-HOSP-HIGHCOST"
AMT = 800_000  # 8 000 yuan a stay


# --- YB-HOSP-UPCODE: a hospital's CC/MCC share this month against its own previous months ----------

def cases(month: int, low: int, high: int, h: str = HOSP, first: int = 0) -> list[bytes]:
    """``low`` stays without CC/MCC (DRG ending 5) then ``high`` with MCC (ending 1) in ``month``."""
    out = [stay_value(f"{h}-{month}-{first + i}", month_ms(month, 1 + i % 28), h=h, drg="ES25", amt=AMT)
           for i in range(low)]
    out += [stay_value(f"{h}-{month}-{first + low + i}", month_ms(month, 1 + i % 28), h=h, drg="ES21", amt=AMT)
            for i in range(high)]
    return out


def baseline(rig: GroupedRig, high: int = 6, h: str = HOSP) -> None:
    """January to March 2024: 30 stays a month, ``high`` of them with CC/MCC."""
    for m in (202401, 202402, 202403):
        assert rig.alerts(*cases(m, 30 - high, high, h)) == []


def month_window(m: int) -> tuple[int, int]:
    nxt = m + 1 if m % 100 < 12 else m + 89
    return month_ms(m, 1, 0), month_ms(nxt, 1, 0) - 1


def test_upcode_positive_share_far_above_the_hospitals_baseline() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)  # 20 %; a 30-stay month varies by sqrt(0.2 × 0.8 / 30) = 7.3 points by chance alone
    april = cases(202404, 15, 15)  # 50 %: z = 0.3 / 0.0730 = 4.11
    assert rig.alerts(*april[:-1]) == []  # 29 stays: below min_cases
    [a] = rig.alerts(april[-1])
    expect(a, UPCODE, [], window=month_window(202404))
    assert a["alert_id"] == alert_id(UPCODE, HOSP, "202404")
    assert (a["fixmedins_code"], a["psn_token"], a["admdvs"]) == (HOSP, None, None)
    assert a["evidence"] == {"month": "202404", "cases": "30", "cc_mcc_share": "0.500", "baseline_share": "0.200",
                             "z": "4.11"}
    assert abs(a["amount_at_risk"] - 9 * AMT) <= 1  # 15 CC/MCC stays × (0.5 − 0.2) / 0.5
    assert a["detected_at"] == month_ms(202404, 15)


def test_upcode_negative_within_the_baseline_or_too_few_cases() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    assert rig.alerts(*cases(202404, 18, 12)) == []  # 40 %: z = 2.74, ordinary variation of 30 stays
    rig = GroupedRig("hospital")
    baseline(rig)
    assert rig.alerts(*cases(202404, 10, 19)) == []  # 29 cases, 66 %: below min_cases
    rig = GroupedRig("hospital")
    assert rig.alerts(*cases(202403, 24, 6), *cases(202404, 15, 15)) == []  # a single baseline month


def test_upcode_boundary_min_cases_29_vs_30() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    assert rig.alerts(*cases(202404, 11, 18)) == []
    assert len(rig.alerts(*cases(202404, 1, 0, first=29))) == 1


def test_upcode_boundary_two_baseline_months_are_enough_one_is_not() -> None:
    rig = GroupedRig("hospital")
    rig.send(*cases(202402, 24, 6), *cases(202403, 29, 0))  # March has 29 cases: not a baseline month
    assert rig.alerts(*cases(202404, 15, 15)) == []
    rig = GroupedRig("hospital")
    rig.send(*cases(202402, 24, 6), *cases(202403, 24, 6))
    assert len(rig.alerts(*cases(202404, 15, 15))) == 1


def z_case(base_high: int, month_n: int, month_high: int) -> int:
    """Alerts for a month of ``month_n`` stays over three 30-stay months with ``base_high`` CC/MCC."""
    rig = GroupedRig("hospital")
    baseline(rig, high=base_high)
    return len(rig.alerts(*cases(202404, month_n - month_high, month_high)))


def test_upcode_boundary_just_above_and_below_z_3() -> None:
    # 50 stays over a 20 % baseline: sd = sqrt(0.16 / 50) = 0.0566
    assert z_case(6, 50, 19) == 1  # 38 %: z = 3.18
    assert z_case(6, 50, 18) == 0  # 36 %: z = 2.83


def test_upcode_boundary_z_exactly_3_is_decided_the_same_way_for_every_baseline() -> None:
    # a 50 % baseline: sd = 0.5 / sqrt(n), so 27/36, 44/64 and 65/100 sit exactly at z = 3 (not above)
    assert z_case(15, 36, 27) == z_case(15, 64, 44) == z_case(15, 100, 65) == 0
    assert z_case(15, 36, 28) == z_case(15, 64, 45) == z_case(15, 100, 66) == 1


def test_upcode_late_stay_of_an_earlier_month_still_counts() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    april = cases(202404, 15, 15)
    rig.send(*april[:-1])
    assert rig.alerts(*cases(202405, 5, 0)) == []  # May begins
    [a] = rig.alerts(april[-1])  # the last April stay arrives late
    assert a["alert_id"] == alert_id(UPCODE, HOSP, "202404")


def test_upcode_one_alert_per_hospital_month() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    april = cases(202404, 15, 15)
    assert len(rig.alerts(*april)) == 1
    assert rig.alerts(*cases(202404, 0, 5, first=30)) == []  # more CC/MCC cases the same month
    assert rig.alerts(april[-1]) == []  # the same stay re-published upstream
    other = hospital(2)
    baseline(rig, h=other)
    [b] = rig.alerts(*cases(202404, 15, 15, h=other))
    assert b["alert_id"] == alert_id(UPCODE, other, "202404")


def test_upcode_reversal_retracts_when_the_share_falls_back() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    april = cases(202404, 20, 15)  # 15 / 35 = 43 %: z = 3.38
    [fired] = rig.alerts(*april)
    high = [json.loads(v) for v in april[-2:]]
    assert rig.alerts(stay_value(high[0]["s"], high[0]["t"], drg="ES21", amt=AMT, rev=True,
                                 rt=month_ms(202405, 2))) == []  # 14 / 34: z = 3.09
    [retracted] = rig.alerts(stay_value(high[1]["s"], high[1]["t"], drg="ES21", amt=AMT, rev=True,
                                        rt=month_ms(202405, 3)))  # 13 / 33: z = 2.78
    expect(retracted, UPCODE, [], status="RETRACTED", window=month_window(202404))
    assert retracted["alert_id"] == fired["alert_id"]
    assert retracted["detected_at"] == month_ms(202405, 3)
    assert retracted["amount_at_risk"] == 0


def test_upcode_later_stays_that_dilute_the_month_retract_it() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    [fired] = rig.alerts(*cases(202404, 15, 15))
    [retracted] = rig.alerts(*cases(202404, 10, 0, first=30))  # 15 / 40: z = 2.77
    expect(retracted, UPCODE, [], status="RETRACTED", window=month_window(202404))
    assert retracted["alert_id"] == fired["alert_id"]
    [again] = rig.alerts(*cases(202404, 0, 10, first=40))  # 25 / 50: it holds again, a new generation
    expect(again, UPCODE, [], window=month_window(202404))
    assert again["alert_id"] == fired["alert_id"] and again["event_id"] != fired["event_id"]


def test_upcode_reversal_after_the_months_close_leaves_it() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    april = cases(202404, 15, 15)
    assert len(rig.alerts(*april)) == 1
    last = json.loads(april[-1])
    # April closes at the end of 4 June (its end + 35 days): a reversal made later no longer moves its share
    assert rig.alerts(stay_value(last["s"], last["t"], drg="ES21", amt=AMT, rev=True,
                                 rt=month_ms(202406, 6))) == []


def test_upcode_reversal_keeps_an_alert_that_still_holds() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    april = cases(202404, 16, 16)  # fires at the 30th stay: 14 / 30
    assert len(rig.alerts(*april)) == 1
    low = json.loads(april[0])
    assert rig.alerts(stay_value(low["s"], low["t"], drg="ES25", amt=AMT, rev=True)) == []  # 16 / 31 still
    assert rig.alerts(stay_value("unknown", low["t"], drg="ES21", amt=AMT, rev=True)) == []


def test_upcode_amount_at_risk_leaves_out_reversed_stays() -> None:
    rig = GroupedRig("hospital")
    baseline(rig)
    rig.send(stay_value("BIG", month_ms(202404, 2), drg="ES21", amt=100 * AMT))
    rig.send(stay_value("BIG", month_ms(202404, 2), drg="ES21", amt=100 * AMT, rev=True))
    [a] = rig.alerts(*cases(202404, 15, 15))
    assert abs(a["amount_at_risk"] - 9 * AMT) <= 1


# --- YB-HOSP-HIGHCOST: a stay above 3 × its DRG group's median ------------------------------------

MEDIAN = 500_000  # 5 000 yuan


def group(n: int = 30, drg: str = "ES23") -> list[bytes]:
    """``n`` stays of one DRG group costing 4 990, 5 000 and 5 010 yuan in turn (median 5 000)."""
    return [stay_value(f"G{i}", ms(i % 20), h=hospital(1 + i % 3), drg=drg, amt=MEDIAN + 1_000 * (i % 3 - 1),
                       tok=f"tok{i}") for i in range(n)]


def outlier(amt: int, setl_id: str = "X1", rev: bool = False, rt: int | None = None) -> bytes:
    return stay_value(setl_id, ms(25), h=HOSP, drg="ES23", amt=amt, tok="tokX", rev=rev, rt=rt)


def test_highcost_positive_three_times_the_group_median() -> None:
    rig = GroupedRig("drg")
    assert rig.alerts(*group()) == []
    [a] = rig.alerts(outlier(1_600_000))
    expect(a, HIGHCOST, ["X1"], window=(ms(25), ms(25)))
    assert a["alert_id"] == alert_id(HIGHCOST, "tokX", "X1")
    assert (a["psn_token"], a["fixmedins_code"], a["admdvs"]) == ("tokX", HOSP, REGION)
    assert a["mdtrt_ids"] == ["M-X1"]
    assert a["amount_at_risk"] == 1_600_000 - MEDIAN
    assert a["evidence"] == {"drg_code": "ES23", "cost": "16000.00", "group_median": "5000.00",
                             "group_cases": "30"}


def test_highcost_negative_other_group_or_ordinary_cost() -> None:
    rig = GroupedRig("drg")
    rig.send(*group())
    assert rig.alerts(outlier(1_000_000)) == []
    assert rig.alerts(stay_value("Y", ms(25), drg="FM19", amt=5_000_000)) == []  # a group with one case


@pytest.mark.parametrize(("amt", "fires"), [(3 * MEDIAN, False), (3 * MEDIAN + 1, True)])
def test_highcost_boundary_exactly_three_times_the_median(amt: int, fires: bool) -> None:
    rig = GroupedRig("drg")
    rig.send(*group())
    assert len(rig.alerts(outlier(amt))) == int(fires)


def test_highcost_boundary_min_cases_29_vs_30() -> None:
    rig = GroupedRig("drg")
    rig.send(*group(29))
    assert rig.alerts(outlier(5_000_000)) == []
    rig = GroupedRig("drg")
    rig.send(*group(30))
    assert len(rig.alerts(outlier(5_000_000))) == 1


def test_highcost_late_the_sample_does_not_depend_on_arrival_order() -> None:
    g = group()
    a = GroupedRig("drg")
    a.send(*g)
    b = GroupedRig("drg")
    b.send(*reversed(g))
    assert a.alerts(outlier(1_600_000)) == b.alerts(outlier(1_600_000))


def test_highcost_one_alert_per_stay() -> None:
    rig = GroupedRig("drg")
    rig.send(*group())
    assert len(rig.alerts(outlier(1_600_000))) == 1
    assert rig.alerts(outlier(1_600_000)) == []  # the same stay re-published upstream
    assert len(rig.alerts(outlier(1_700_000, "X2"))) == 1  # another stay


def test_highcost_reversal_retracts_the_stays_alert_only() -> None:
    rig = GroupedRig("drg")
    g = group(31)  # one reversed still leaves 30 in the sample
    rig.send(*g)
    [fired] = rig.alerts(outlier(1_600_000))
    base = json.loads(g[0])
    assert rig.alerts(stay_value(base["s"], base["t"], drg="ES23", amt=base["amt"], rev=True)) == []
    [retracted] = rig.alerts(outlier(1_600_000, rev=True, rt=ms(40)))
    expect(retracted, HIGHCOST, ["X1"], status="RETRACTED")
    assert (retracted["alert_id"], retracted["detected_at"]) == (fired["alert_id"], ms(40))


# --- the settlement engine feeds both streams -------------------------------------------------------

def test_inpatient_stays_reach_the_drg_stream_and_full_reversals_retract_there() -> None:
    rig, drg = Rig(), GroupedRig("drg")

    def route(out: EngineOutput) -> list[dict[str, Any]]:
        return drg.alerts(*(v for stream, _, v in out.emits if stream == "internal.stays-by-drg"))

    for i in range(30):
        s = stay(f"G{i}", ms(10, 11), 5, 10, [line(CBC, t=ms(6)), line(IV_DRIP, pric="5.00", t=ms(6))],
                 psn=f"P{i}")
        assert route(rig.send(s)) == []
    big = stay("X1", ms(10, 11), 5, 10, [line(CBC, t=ms(6)), line(IV_DRIP, pric="5.00", cnt=50, t=ms(6))])
    [fired] = route(rig.send(big))
    assert (fired["rule_id"], fired["psn_token"], fired["setl_ids"]) == (HIGHCOST, token(), ["X1"])
    assert rig.send(reversal(big, full=False)).emits == []  # a partial refund: the stay still counts
    [retracted] = route(rig.send(reversal(big, t=ms(12))))
    assert (retracted["alert_id"], retracted["status"], retracted["detected_at"]) == (
        fired["alert_id"], "RETRACTED", ms(12))


def test_stay_records_of_the_engine_match_the_builder() -> None:
    s = stay("S1", ms(10, 11), 5, 10, [line(CBC, t=ms(6))], drg="ES23")
    out = Rig().send(s)
    streams = sorted((stream, key) for stream, key, _ in out.emits)
    assert streams == [("internal.stays-by-drg", b"ES23"), ("internal.stays-by-hospital", HOSP.encode())]
    emitted = json.loads(out.emits[0][2])
    built = json.loads(stay_value("S1", ms(10, 11), amt=s["medfee_sumamt"], tok=token()))
    assert emitted == built
    assert Rig().send(stay("S2", ms(10, 11), 5, 10, [line(CBC, t=ms(6))], drg=None)).emits == []
