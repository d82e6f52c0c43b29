"""The settlement engine in event time: the alerts standing after all events are in depend only on
the events, not on their arrival order within the allowed lateness or on the batches.

Each tester's case fails on the arrival-order engine: a reversal that overtakes its settlement, a
visit settled in two parts, and episodes (one alert per episode) chosen by whichever window
happened to arrive first.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.calendar import DAY_MS
from streams.rules.alerts import alert_id

from .builders import BED, PSA, Rig, line, ms, reversal, settlement, stay, token
from .test_rule_person import OVERRX, SHOP7, buy, rx

FREQ = "YB-DAY-FREQ"


def standing(rig: Rig, sent: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(rule, alert id) of every alert whose latest version is FIRED."""
    latest: dict[str, dict[str, Any]] = {}
    for a in sent:
        latest[a["alert_id"]] = a
    return {(a["rule_id"], aid) for aid, a in latest.items() if a["status"] == "FIRED"}


def within_lateness(order: list[dict[str, Any]], days: int = 35) -> bool:
    """No event arrives after one whose event time is more than the allowed lateness later."""
    newest = 0
    for e in order:
        if e["setl_time"] < newest - days * DAY_MS:
            return False
        newest = max(newest, e["setl_time"])
    return True


def run(events: list[dict[str, Any]], batches: list[int] | None = None) -> set[tuple[str, str]]:
    rig = Rig()
    out: list[dict[str, Any]] = []
    i = 0
    for size in batches or [1] * len(events):
        out += rig.alerts(*events[i:i + size])
        i += size
    if i < len(events):
        out += rig.alerts(*events[i:])
    return standing(rig, out)


# --- a reversal that overtakes its settlement ----------------------------------------------------

def test_a_reversal_arriving_before_its_settlement_leaves_no_alert_standing() -> None:
    s = settlement("S1", ms(3), [line(PSA)], gend="FEMALE")
    assert run([s, reversal(s, t=ms(4))]) == set()
    assert run([reversal(s, t=ms(4)), s]) == set()


def test_a_reversed_settlement_resent_under_a_new_event_id_stays_reversed() -> None:
    s = settlement("S1", ms(3), [line(PSA)], gend="FEMALE")
    again = {**s, "event_id": "another-id"}
    assert run([s, reversal(s, t=ms(4)), again]) == set()


# --- a visit settled in parts --------------------------------------------------------------------

def test_freq_sums_the_settlements_of_one_visit_whichever_part_comes_first() -> None:
    """Two bed days billed on one day of one stay, each in its own part of the settlement."""
    p1 = stay("P1", ms(5), 0, 5, [line(BED, t=ms(2, 8))], mdtrt_id="M1")
    p2 = stay("P2", ms(9), 0, 9, [line(BED, t=ms(2, 20))], mdtrt_id="M1")
    want = {(FREQ, alert_id(FREQ, token(), f"M1|{BED}|{(ms(2) + 8 * 3_600_000) // DAY_MS}"))}
    assert run([p1, p2]) == run([p2, p1]) == want


def test_freq_keeps_other_visits_apart() -> None:
    p1 = stay("P1", ms(5), 0, 5, [line(BED, t=ms(2, 8))], mdtrt_id="M1")
    p2 = stay("P2", ms(9), 0, 9, [line(BED, t=ms(2, 20))], mdtrt_id="M2")
    assert run([p1, p2]) == set()


def test_freq_reversing_one_part_retracts_the_visit_alert() -> None:
    p1 = stay("P1", ms(5), 0, 5, [line(BED, t=ms(2, 8))], mdtrt_id="M1")
    p2 = stay("P2", ms(9), 0, 9, [line(BED, t=ms(2, 20))], mdtrt_id="M1")
    assert run([p1, p2, reversal(p1, t=ms(10))]) == set()


# --- episodes -------------------------------------------------------------------------------------

def test_overrx_episodes_do_not_depend_on_which_window_arrived_first() -> None:
    """A (day 0) + B (day 10) hold; C (day 15) would start another window inside that episode;
    D (day 41) with C holds after it. In any arrival order: the episodes A–B and C–D."""
    events = [rx("A", ms(0), 20), rx("B", ms(10), 20), rx("C", ms(15), 20), rx("D", ms(41), 20)]
    want = run(events)
    assert want == {(OVERRX, alert_id(OVERRX, token(), f"amlodipine|{s}")) for s in ("B", "D")}
    orders = [list(o) for o in itertools.permutations(events) if within_lateness(list(o))]
    assert len(orders) == 12
    for order in orders:
        assert run(order) == want, [e["setl_id"] for e in order]


def test_shop7d_episodes_do_not_depend_on_arrival_order() -> None:
    buys = [buy(f"B{i}", ms(i), i) for i in range(1, 7)]
    want = {x for x in run(buys) if x[0] == SHOP7}
    assert len(want) == 1
    rng = random.Random(5)
    for _ in range(30):
        order = buys[:]
        rng.shuffle(order)
        assert {x for x in run(order) if x[0] == SHOP7} == want, [e["setl_id"] for e in order]


def test_a_late_dispense_that_opens_an_earlier_episode_retracts_the_later_one() -> None:
    """B + C hold (episode from C); then A arrives, earlier: A + B hold, an episode that covers C."""
    rig = Rig()
    sent = rig.each([rx("B", ms(10), 20), rx("C", ms(20), 20), rx("A", ms(0), 20)])
    fired = [a for a in sent if a["status"] == "FIRED"]
    retracted = [a for a in sent if a["status"] == "RETRACTED"]
    assert [a["setl_ids"] for a in fired] == [["B", "C"], ["A", "B"]]
    assert [a["alert_id"] for a in retracted] == [fired[0]["alert_id"]]


# --- the property -----------------------------------------------------------------------------------

def person_events(rng: random.Random) -> list[dict[str, Any]]:
    """A person's month: dispenses, pharmacy buys, split stays, some reversed."""
    out: list[dict[str, Any]] = []
    for i in range(rng.randint(2, 8)):
        out.append(rx(f"R{i}", ms(rng.randint(0, 40), rng.randint(8, 18)), rng.choice([10, 20, 30])))
    for i in range(rng.randint(0, 7)):
        out.append(buy(f"B{i}", ms(rng.randint(0, 12), rng.randint(8, 18)), rng.randint(1, 7)))
    for i in range(rng.randint(0, 3)):
        day = rng.randint(1, 30)
        out.append(stay(f"P{i}", ms(day + 3, 9 + i), day - 1, day + 3,
                        [line(BED, t=ms(day, 8 + i))], mdtrt_id="M-SPLIT"))
    for s in rng.sample(out, k=rng.randint(0, min(2, len(out)))):
        out.append(reversal(s, t=s["setl_time"] + rng.randint(1, 5) * DAY_MS))
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_standing_alerts_are_a_function_of_the_events(seed: int) -> None:
    rng = random.Random(seed)
    events = person_events(rng)
    in_time = sorted(events, key=lambda e: e["setl_time"])
    delay = {id(e): rng.randint(0, 30 * 24) * 3_600_000 for e in events}  # within the 35-day lateness
    shuffled = sorted(events, key=lambda e: e["setl_time"] + delay[id(e)])
    sizes = [rng.randint(1, 5) for _ in shuffled]
    assert run(in_time) == run(shuffled, sizes), f"seed {seed}"
