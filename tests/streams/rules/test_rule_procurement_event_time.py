"""Procurement rules judge in event time: what stands once every event is in does not depend on the
order the events arrived in (within the allowed lateness). The scenarios a tester reported, one
per rule, each against processing the same events in event-time order."""

from __future__ import annotations

from typing import Any

from .builders import ms
from .test_rule_procurement import (
    ProcRig,
    contract,
    delivery,
    mov,
    order,
    payment,
    rules,
    standing,
)

Event = tuple[str, dict[str, Any]]
TIME_FIELD = {"InventoryMovement": "mov_time", "ProcurementContract": "sign_time", "ProcurementOrder": "ord_time",
              "DeliveryAcceptance": "acpt_time", "SupplierPayment": "pay_time"}


def in_event_time(*events: Event, **params: Any) -> dict[str, dict[str, Any]]:
    """The alerts standing after the events are sent one by one in event-time order."""
    rig = ProcRig(**params)
    seen: list[dict[str, Any]] = []
    for e in sorted(events, key=lambda e: e[1][TIME_FIELD[e[0]]]):
        seen += rig.send(e)
    return standing(seen)


# --- YB-PSI-OVERSELL -------------------------------------------------------------------------------

def test_oversell_books_a_purchase_reported_after_a_sale_at_its_own_time() -> None:
    """Counted 20 at 08:00, bought 50 at 09:00, sold 30 at 10:00: the stock never went below 20,
    whatever order the movements are reported in."""
    count, buy, sale = mov("STOCKTAKE", 20, ms(0, 8)), mov("PURCHASE_IN", 50, ms(0, 9)), mov("SALE_OUT", 30, ms(0, 10))
    rig = ProcRig()
    seen = rig.send(count, sale)
    assert rules(seen) == ["YB-PSI-OVERSELL"]  # on what is known: 20 - 30
    seen += rig.send(buy)
    assert [a["status"] for a in seen] == ["FIRED", "RETRACTED"] and seen[1]["alert_id"] == seen[0]["alert_id"]
    assert standing(seen) == {} == in_event_time(count, buy, sale)


def test_oversell_alert_moves_to_the_first_breaking_sale_in_event_time() -> None:
    count, first, second = mov("STOCKTAKE", 10, ms(0, 8)), mov("SALE_OUT", 8, ms(0, 10)), mov("SALE_OUT", 5, ms(0, 12))
    early = mov("SALE_OUT", 4, ms(0, 9))  # reported last
    rig = ProcRig()
    seen = rig.send(count, first, second)
    assert [a["evidence"]["ref"] for a in seen] == [second[1]["mov_id"]]  # 10 - 8 - 5
    seen += rig.send(early)  # 10 - 4 = 6, then 6 - 8 = -2: the 10:00 sale breaks first
    now = standing(seen)
    assert [a["evidence"]["ref"] for a in now.values()] == [first[1]["mov_id"]]
    assert set(now) == set(in_event_time(count, first, second, early))


def test_oversell_stock_take_reported_late_splits_the_episode() -> None:
    """A count at 11:00 reported after the sales re-baselines the books from 11:00 on: the sale at
    12:00 no longer breaks them; a sale at 11:30 reported later breaks the new episode."""
    events = [mov("STOCKTAKE", 10, ms(0, 8)), mov("SALE_OUT", 5, ms(0, 10)), mov("SALE_OUT", 7, ms(0, 12))]
    recount = mov("STOCKTAKE", 30, ms(0, 11))
    rig = ProcRig()
    seen = rig.send(*events)
    assert [a["evidence"]["ref"] for a in seen] == [events[2][1]["mov_id"]]  # 10 - 5 - 7
    seen += rig.send(recount)
    assert standing(seen) == {} == in_event_time(*events, recount)
    late_sale = mov("SALE_OUT", 31, ms(0, 11, 30))
    seen += rig.send(late_sale)
    assert [a["evidence"]["ref"] for a in standing(seen).values()] == [late_sale[1]["mov_id"]]
    assert set(standing(seen)) == set(in_event_time(*events, recount, late_sale))


def test_oversell_movements_older_than_the_lateness_are_folded_and_a_late_one_books_at_the_cutoff() -> None:
    rig = ProcRig(lateness=2, YB_PSI_OVERSELL={"tolerance_pm": 0})
    rig.send(mov("STOCKTAKE", 10, ms(0)), mov("SALE_OUT", 4, ms(1)), mov("SALE_OUT", 1, ms(5)))
    key = next(k for k in rig.store.part(0) if "#inv#" in k)
    books = rig.store.get(0, key)
    assert len(books["m"]) == 1 and books["b"][:2] == [60_000, 100_000]  # folded: count 10, sold 4
    assert rig.send(mov("STOCKTAKE", 99, ms(2))) == []  # a late count: ignored (what followed is folded)
    late = mov("SALE_OUT", 6, ms(2))
    [a] = rig.send(late)  # late: booked before the held 5-day sale (6 - 6 = 0), which now breaks
    assert a["evidence"]["oversold_cnt"] == "1" and a["evidence"]["ref"] != late[1]["mov_id"]


# --- YB-PSI-TRACE-DUP --------------------------------------------------------------------------------

def test_trace_same_sale_resent_at_a_new_offset_is_no_duplicate() -> None:
    rig = ProcRig()
    sale = mov("SALE_OUT", 1, ms(0), ["A1"])
    assert rig.send(sale) == []
    assert rig.send(sale) == []  # same mov_id, next offset: an upstream re-send, the same sale
    assert rules(rig.send(mov("SALE_OUT", 1, ms(1), ["A1"]))) == ["YB-PSI-TRACE-DUP"]


def test_trace_earlier_sale_reported_late_makes_the_later_one_the_duplicate() -> None:
    first, second = mov("SALE_OUT", 1, ms(1), ["A1"]), mov("SALE_OUT", 1, ms(2), ["A1", "B1"])
    rig = ProcRig()
    assert rig.send(second) == []
    [a] = rig.send(first)
    assert a["evidence"]["ref"] == second[1]["mov_id"] and a["evidence"]["codes"] == "A1"
    assert set(standing([a])) == set(in_event_time(first, second))


def test_trace_return_reported_late_between_two_sales_retracts() -> None:
    first, second = mov("SALE_OUT", 1, ms(1), ["A1"]), mov("SALE_OUT", 1, ms(3), ["A1"])
    back = mov("SALE_RETURN", 1, ms(2), ["A1"])
    rig = ProcRig()
    seen = rig.send(first, second)
    assert rules(seen) == ["YB-PSI-TRACE-DUP"]
    seen += rig.send(back)
    assert seen[-1]["status"] == "RETRACTED" and standing(seen) == {} == in_event_time(first, second, back)
    again = mov("SALE_OUT", 1, ms(2, 12), ["A1"])  # sold between the return and the second sale
    seen += rig.send(again)
    assert set(standing(seen)) == set(in_event_time(first, second, back, again))
    assert [a["evidence"]["ref"] for a in standing(seen).values()] == [second[1]["mov_id"]]


# --- YB-PROC-PAY-OVERDUE -------------------------------------------------------------------------------

def test_payment_in_time_reported_late_retracts_the_timer_alert() -> None:
    rig = ProcRig()
    seen = rig.send(delivery("D1", ms(0)), delivery("D2", ms(0)))
    seen += rig.send(mov("STOCKTAKE", 1, ms(40)))  # the deadlines (day 30) pass unpaid
    assert sorted(a["evidence"]["ref"] for a in seen) == ["D1", "D2"]
    seen += rig.send(payment("D1", ms(20)), payment("D2", ms(31)))  # reported 20 and 9 days late
    assert [a["evidence"]["ref"] for a in standing(seen).values()] == ["D2"]
    assert set(standing(seen)) == set(in_event_time(delivery("D1", ms(0)), delivery("D2", ms(0)),
                                                    mov("STOCKTAKE", 1, ms(40)), payment("D1", ms(20)),
                                                    payment("D2", ms(31))))


def test_payment_arriving_before_its_delivery_is_matched() -> None:
    rig = ProcRig()
    seen = rig.send(payment("D1", ms(5)), delivery("D1", ms(0)), mov("STOCKTAKE", 1, ms(40)))
    assert seen == []


def test_delivery_is_remembered_until_the_deadline_plus_the_lateness() -> None:
    rig = ProcRig(lateness=10)  # deadline day 30: remembered while the watermark is at most day 40
    seen = rig.send(delivery("D1", ms(0)), mov("STOCKTAKE", 1, ms(39)))
    assert rules(seen) == ["YB-PROC-PAY-OVERDUE"]
    seen += rig.send(payment("D1", ms(29)))  # 10 days late, within the lateness: retracts
    assert seen[-1]["status"] == "RETRACTED"
    rig = ProcRig(lateness=10)
    seen = rig.send(delivery("D1", ms(0)), mov("STOCKTAKE", 1, ms(41)))
    assert rig.store.get(0, seen[0]["fixmedins_code"])["d"] == {}  # forgotten
    assert rig.send(payment("D1", ms(29))) == []  # 12 days late: too late to change anything
    assert len(standing(seen)) == 1


# --- YB-PROC-VOLUME-LAG --------------------------------------------------------------------------------

def test_volume_order_reported_late_cures_the_judged_months() -> None:
    params = {"YB_PROC_VOLUME_LAG": {"lag_points": 10, "min_shortfall_yuan": 0}}
    rig = ProcRig(**params)
    events = [contract(1000, 0, 99), order(200, ms(1)), mov("STOCKTAKE", 1, ms(59))]
    seen = rig.send(*events)
    assert [a["evidence"]["month"] for a in seen] == ["202404", "202405"]  # from day 31, 20% bought
    late = order(400, ms(25))  # bought in March, reported in May (34 days late)
    seen += rig.send(late)
    assert [a["status"] for a in seen[2:]] == ["RETRACTED", "RETRACTED"] and standing(seen) == {}
    assert in_event_time(*events, late, **params) == {}
    rig = ProcRig(**params)
    seen = rig.send(*events)
    later = order(400, ms(40))  # bought after April began to lag (day 31): only May is cured
    seen += rig.send(later)
    assert [a["evidence"]["month"] for a in standing(seen).values()] == ["202404"]
    assert set(standing(seen)) == set(in_event_time(*events, later, **params))


def test_volume_order_reported_before_its_contract_counts() -> None:
    params = {"YB_PROC_VOLUME_LAG": {"lag_points": 10, "min_shortfall_yuan": 0}}
    rig = ProcRig(**params)
    early = order(600, ms(1))  # ordered under the contract signed at day 0 10:00, reported before it
    seen = rig.send(early, contract(1000, 0, 99, sign=ms(0, 9)), order(1, ms(59)))
    assert seen == [] == list(in_event_time(early, contract(1000, 0, 99, sign=ms(0, 9)), order(1, ms(59)),
                                            **params))  # 1 May: 58% elapsed, 60% bought
