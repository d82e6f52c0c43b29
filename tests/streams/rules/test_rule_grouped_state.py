"""The grouped engines' state: month buckets closed and dropped in event time, late events, crashes."""

from __future__ import annotations

import json
from typing import Any

import orjson

from streams.rules.alerts import alert_id
from streams.rules.grouped import MONTH_SEP

from .builders import GroupedRig, month_ms, rule_update, stay_value

HIGHCOST = "YB-HOSP-HIGHCOST"
UPCODE = "YB-HOSP-UPCODE"
MEDIAN = 500_000


def peers(m: int, n: int = 30, drg: str = "ES23") -> list[bytes]:
    return [stay_value(f"G{m}-{i}", month_ms(m, 1 + i % 28), drg=drg, amt=MEDIAN + 1_000 * (i % 3 - 1),
                       tok=f"tok{i}") for i in range(n)]


def big(setl_id: str, m: int, day: int = 15, amt: int = 4 * MEDIAN) -> bytes:
    return stay_value(setl_id, month_ms(m, day), drg="ES23", amt=amt, tok="tokX")


def rev_of(value: bytes, rt: int) -> bytes:
    r = json.loads(value)
    return stay_value(r["s"], r["t"], h=r["h"], drg=r["drg"], amt=r["amt"], tok=r["tok"], rev=True, rt=rt)


def snapshot(rig: GroupedRig) -> dict[int, dict[str, Any]]:
    """The store as the changelog would restore it (JSON values)."""
    return {p: {k: orjson.loads(orjson.dumps(v)) for k, v in part.items()} for p, part in rig.store.data.items()}


def buckets(rig: GroupedRig, key: str) -> dict[int, dict[str, Any]]:
    return {int(k.split(MONTH_SEP)[1]): v for k, v in rig.store.data[0].items() if k.startswith(key + MONTH_SEP)}


# --- bounded memory: months close (compacted) and go (deleted) as event time moves on --------------

def test_drg_months_are_compacted_then_deleted_as_event_time_moves_on() -> None:
    rig = GroupedRig("drg")
    months = [202401, 202402, 202403, 202404, 202405, 202406, 202407, 202408, 202409, 202410]
    for m in months:
        rig.send(*peers(m))
    held = buckets(rig, "ES23")
    # October's stays put the watermark at 28 October: months ending before 19 August are closed
    # (end + 2 × 35 days), August and later still open; June's costs are in August's sample
    assert sorted(held) == [202406, 202407, 202408, 202409, 202410]
    assert [m for m, b in held.items() if "s" in b] == [202408, 202409, 202410]
    assert held[202406]["c"] == sorted(json.loads(v)["amt"] for v in peers(202406))  # a later sample needs it
    assert rig.store.data[0]["ES23"]["ms"] == sorted(held)


def test_hospital_months_are_compacted_to_counts_then_deleted() -> None:
    rig = GroupedRig("hospital")
    months = [202401, 202402, 202403, 202404, 202405, 202406, 202407, 202408]
    for m in months:
        rig.send(*(stay_value(f"{m}-{i}", month_ms(m, 1 + i % 28), drg="ES21" if i < 6 else "ES25")
                   for i in range(30)))
    held = buckets(rig, "H11010500001")
    # a closed month stays while a month within baseline_months after it is open
    assert sorted(held) == [202403, 202404, 202405, 202406, 202407, 202408]
    assert held[202403] == {"o": held[202403]["o"], "c": [30, 6, 6 * 800_000], "f": {}}
    assert [m for m, b in held.items() if "s" in b] == [202406, 202407, 202408]


def test_a_stay_later_than_its_months_close_is_ignored() -> None:
    rig = GroupedRig("drg")
    for m in (202401, 202402, 202403, 202404, 202405):
        rig.send(*peers(m))
    out = rig.send(big("LATE", 202402))  # February was open until the end of 9 May (its end + 70 days)
    assert (out.alerts, out.late) == ([], 1)
    out = rig.send(big("IN-TIME", 202403, day=31))  # March is open until the end of 9 June
    assert (len(out.alerts), out.late) == (1, 0)


# --- reversals ----------------------------------------------------------------------------------------

def test_highcost_reversal_after_the_month_closed_still_retracts_the_stays_alert() -> None:
    rig = GroupedRig("drg")
    rig.send(*peers(202403))
    x, y = big("X", 202403), big("Y", 202403, amt=5 * MEDIAN)
    assert len(rig.alerts(x, y)) == 2
    for m in (202404, 202405, 202406):
        rig.send(*peers(m))
    assert "s" not in buckets(rig, "ES23")[202403]  # March is closed
    [retracted] = rig.alerts(rev_of(x, month_ms(202406, 20)))
    assert (retracted["alert_id"], retracted["status"]) == (alert_id(HIGHCOST, "tokX", "X"), "RETRACTED")
    # more than 180 days after March: the alert stands
    assert rig.alerts(rev_of(y, month_ms(202410, 1))) == []


def test_highcost_reversal_after_the_close_of_an_open_month_keeps_the_stay_in_the_sample() -> None:
    # reversed after its month's close (end + 35 days) but while the month is still open: the
    # stay's own alert goes, the month's figures (the others' sample) stay as they were
    rig = GroupedRig("drg")
    rig.send(*peers(202403))
    x = big("X", 202403)
    [fired] = rig.alerts(x)
    [retracted] = rig.alerts(rev_of(x, month_ms(202405, 8)))
    assert (retracted["alert_id"], retracted["status"]) == (fired["alert_id"], "RETRACTED")
    [z] = rig.alerts(big("Z", 202403, day=20))
    assert z["evidence"]["group_cases"] == "31"  # the 30 peers and X
    assert rig.alerts(x) == []  # X re-sent: counted already, never alerted again


def test_upcode_retracts_and_fires_again_when_a_baseline_month_moves() -> None:
    rig = GroupedRig("hospital")
    april = alert_id(UPCODE, "H11010500001", "202404")

    def month(m: int, low: int, high: int) -> list[bytes]:
        return [stay_value(f"{m}-{i}", month_ms(m, 1 + i % 28), drg="ES21" if i < high else "ES25")
                for i in range(low + high)]

    def of_april(values: list[bytes]) -> list[dict[str, Any]]:
        return [a for a in rig.alerts(*values) if a["alert_id"] == april]

    rig.send(*month(202401, 24, 6), *month(202402, 24, 6))
    [fired] = of_april(month(202404, 15, 15))
    raise_march = month(202403, 0, 60)  # March at 100 %: April's 50 % is then within its baseline
    [retracted] = of_april(raise_march)
    assert retracted["status"] == "RETRACTED"
    # 40 of March's stays reversed: 20 cases left, no longer a baseline month
    [again] = of_april([rev_of(v, month_ms(202404, 2)) for v in raise_march[:40]])
    assert again["status"] == "FIRED" and again["event_id"] != fired["event_id"]


# --- parameters -------------------------------------------------------------------------------------

def test_highcost_sample_months_sets_the_sample() -> None:
    rig = GroupedRig("drg")
    rig.send(*peers(202401), *peers(202402))
    [a] = rig.alerts(big("X1", 202403))  # its sample: January to March, 60 others
    assert a["evidence"]["group_cases"] == "60"
    rig = GroupedRig("drg")
    rule_update(rig.book, HIGHCOST, sample_months=1)
    rig.send(*peers(202401), *peers(202402))
    assert rig.alerts(big("X1", 202403)) == []  # its sample: March alone, no others
    rig.send(*peers(202403, 29))
    # with X2, X1 has 30 others too: both are judged (and fire) now
    assert sorted(a["setl_ids"] for a in rig.alerts(big("X2", 202403))) == [["X1"], ["X2"]]


# --- crashes: the changelog flush of a batch reached the broker only in part -------------------------

def test_bucket_lost_in_a_crash_is_rebuilt_from_the_redelivery() -> None:
    rig = GroupedRig("drg")
    rig.send(*peers(202403))
    before = snapshot(rig)
    x = big("X", 202403)
    [fired] = rig.alerts(x, offset=100)
    after = snapshot(rig)
    # the group record was written, March's bucket was not
    crashed = GroupedRig("drg")
    crashed.store.data = {0: {**after[0], f"ES23{MONTH_SEP}202403": before[0][f"ES23{MONTH_SEP}202403"]}}
    [again] = crashed.alerts(x, offset=100)
    assert again == fired  # the same event: the alerts table keeps it once
    assert snapshot(crashed) == after


def test_group_record_lost_in_a_crash_changes_nothing_on_redelivery() -> None:
    rig = GroupedRig("drg")
    rig.send(*peers(202403))
    before = snapshot(rig)
    x = big("X", 202403)
    assert len(rig.alerts(x, offset=100)) == 1
    after = snapshot(rig)
    crashed = GroupedRig("drg")
    crashed.store.data = {0: {**after[0], "ES23": before[0]["ES23"]}}
    assert crashed.alerts(x, offset=100) == []
    assert snapshot(crashed) == after


def test_restored_partition_rebuilds_what_is_derived() -> None:
    rig = GroupedRig("drg")
    rig.send(*peers(202403))
    rig.send(big("X", 202403))
    rig.store.data = snapshot(rig)
    rig.engine.restored(0)
    rev = rev_of(big("X", 202403), month_ms(202403, 20))
    [retracted] = rig.alerts(rev)
    assert retracted["status"] == "RETRACTED"
    assert len(rig.alerts(big("X2", 202403, amt=5 * MEDIAN))) == 1
