"""The group rules' standing alerts depend on the stays, not on the order they arrive in.

internal.stays-by-hospital / -by-drg merge every settlement partition, in whatever order batches
happen to be produced: a group engine must end, after all events are in, with the same standing
alerts (FIRED, not RETRACTED) whatever the arrival order, batching or duplicates (within the
allowed lateness).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from streams.rules.alerts import alert_id

from .builders import HOSP, GroupedRig, month_ms, ms, stay_value

UPCODE = "YB-HOSP-UPCODE"
HIGHCOST = "YB-HOSP-HIGHCOST"
AMT = 800_000


def standing(rig: GroupedRig, *batches: Sequence[bytes]) -> set[str]:
    """Alert ids FIRED and not RETRACTED after feeding ``batches`` (the last version of each wins)."""
    last: dict[str, str] = {}
    for batch in batches:
        for a in rig.send(*batch).alerts:
            last[a[0]["alert_id"]] = a[0]["status"]
    return {aid for aid, status in last.items() if status == "FIRED"}


def run(by: str, *batches: Sequence[bytes]) -> set[str]:
    return standing(GroupedRig(by), *batches)


def cases(month: int, low: int, high: int, h: str = HOSP, first: int = 0) -> list[bytes]:
    out = [stay_value(f"{h}-{month}-{first + i}", month_ms(month, 1 + i % 28), h=h, drg="ES25", amt=AMT)
           for i in range(low)]
    out += [stay_value(f"{h}-{month}-{first + low + i}", month_ms(month, 1 + i % 28), h=h, drg="ES21", amt=AMT)
            for i in range(high)]
    return out


def flat(*parts: Iterable[bytes]) -> list[bytes]:
    return [v for p in parts for v in p]


# --- YB-HOSP-HIGHCOST -----------------------------------------------------------------------------

def peers(n: int = 30, drg: str = "ES23", day: int = 0) -> list[bytes]:
    """``n`` ordinary stays of one group in one month (4 990, 5 000 and 5 010 yuan in turn)."""
    return [stay_value(f"G{drg}{day}-{i}", ms(day + i % 20), drg=drg, amt=500_000 + 1_000 * (i % 3 - 1),
                       tok=f"tok{i}") for i in range(n)]


def test_highcost_outlier_before_its_peers_is_judged_like_after_them() -> None:
    group = peers()
    big = stay_value("X1", ms(10), drg="ES23", amt=1_600_000, tok="tokX")
    after = run("drg", group, [big])
    before = run("drg", [big], group)
    assert after == before == {alert_id(HIGHCOST, "tokX", "X1")}


def test_highcost_stay_the_group_later_disproves_is_retracted() -> None:
    # against 30 stays of 5 000 yuan, 16 000 is high; 30 more stays of 8 000 the same month lift
    # the median to 8 000 (16 000 is 2 ×): the alert must not stand, as it would not in the other order
    group = peers()
    dearer = [stay_value(f"D{i}", ms(i % 20), drg="ES23", amt=800_000, tok=f"tokD{i}") for i in range(31)]
    big = stay_value("X1", ms(10), drg="ES23", amt=1_600_000, tok="tokX")
    assert run("drg", group, [big], dearer) == run("drg", dearer, group, [big]) == set()


def test_highcost_duplicate_and_early_reversal() -> None:
    group = peers()
    big = stay_value("X1", ms(10), drg="ES23", amt=1_600_000, tok="tokX")
    rev = stay_value("X1", ms(10), drg="ES23", amt=1_600_000, tok="tokX", rev=True, rt=ms(12))
    assert run("drg", group, [big], [rev]) == set()
    assert run("drg", group, [rev], [big]) == set()  # the reversal overtook its stay
    assert run("drg", group, [big], [rev], [big]) == set()  # the stay re-sent after its reversal
    dup = group[:5]
    assert run("drg", group, dup, [big], dup) == {alert_id(HIGHCOST, "tokX", "X1")}


# --- YB-HOSP-UPCODE -------------------------------------------------------------------------------

def test_upcode_late_stays_of_a_baseline_month_still_decide() -> None:
    # March's stays come after April's: April still has its two baseline months in the end
    jan, feb, mar, apr = (cases(202401, 24, 6), cases(202402, 24, 6), cases(202403, 24, 6), cases(202404, 15, 15))
    want = {alert_id(UPCODE, HOSP, "202404")}
    assert run("hospital", jan, feb, mar, apr) == want
    assert run("hospital", feb, apr, mar) == want
    assert run("hospital", apr, feb, mar) == want


def test_upcode_baseline_month_whose_late_stays_raise_it_retracts() -> None:
    # 50 late CC/MCC stays lift March to 70 %: April's 50 % is then within its baseline, whichever came first
    feb, apr = cases(202402, 24, 6), cases(202404, 15, 15)
    mar_first, mar_rest = cases(202403, 24, 6), cases(202403, 0, 50, first=30)
    assert run("hospital", feb, mar_first, mar_rest, apr) == set()
    assert run("hospital", feb, mar_first, apr, mar_rest) == set()


def test_upcode_month_that_later_dilutes_is_retracted() -> None:
    base = flat(cases(202401, 24, 6), cases(202402, 24, 6), cases(202403, 24, 6))
    apr, diluted = cases(202404, 15, 15), cases(202404, 30, 0, first=30)  # 15 / 60 = 25 % in the end
    assert run("hospital", base, apr, diluted) == run("hospital", base, diluted, apr) == set()


def test_upcode_duplicates_and_early_reversals_count_once() -> None:
    base = flat(cases(202401, 24, 6), cases(202402, 24, 6), cases(202403, 24, 6))
    apr = cases(202404, 16, 14)  # 14 / 30 = 47 %: z = 3.65
    first = json.loads(apr[-1])
    rev = stay_value(first["s"], first["t"], drg="ES21", amt=AMT, rev=True, rt=month_ms(202404, 20))
    # the reversal first (13 / 29 below min_cases), its stay re-sent after: April never holds
    assert run("hospital", base, [rev], apr, [apr[-1]]) == set()
    assert run("hospital", base, apr, [rev], [apr[-1]]) == set()
    # a baseline month's stays twice: counted once
    assert run("hospital", base, base[:30], apr) == {alert_id(UPCODE, HOSP, "202404")}

