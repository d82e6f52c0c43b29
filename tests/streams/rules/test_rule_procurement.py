"""Procurement-stream rules: each fires past its threshold and not at it, applies a redelivered
event once, and carries on the same after a restore from its changelog records."""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from streams.rules.events import EngineEvent
from streams.rules.procurement import ProcurementEngine
from streams.rules.state import Store

from .builders import date, hospital, ms, rule_update, seed_book

H = hospital(1)
DRUG = "XC10AAA042A001010200211"
CNT = 10_000
_ids = itertools.count(1)


def mov(kind: str, cnt: float, t: int, traces: list[str] | None = None, drug: str = DRUG, *, inst: str = H,
        mov_id: str | None = None, pric: int = 2_000_000) -> tuple[str, dict[str, Any]]:
    return "InventoryMovement", {"mov_id": mov_id or f"MV{next(_ids):012d}", "fixmedins_code": inst,
                                 "med_list_codg": drug, "admdvs": inst[1:7], "mov_type": kind, "cnt": int(cnt * CNT),
                                 "pric": pric, "drug_trac_codg": traces or [], "setl_id": None, "mov_time": t}


def contract(volume: int, begin_day: int, end_day: int, cntr: str = "CT1", win_pric: int = 10_000_000, *,
             inst: str = H, drug: str = DRUG, sign: int | None = None) -> tuple[str, dict[str, Any]]:
    return "ProcurementContract", {"cntr_id": cntr, "fixmedins_code": inst, "med_list_codg": drug, "splr_code": "S",
                                   "admdvs": inst[1:3] + "0000", "agreed_volume": volume * CNT, "win_pric": win_pric,
                                   "base_pric": 2 * win_pric, "cycle_begn_date": date(begin_day),
                                   "cycle_end_date": date(end_day),
                                   "sign_time": ms(begin_day) if sign is None else sign}


def order(cnt: int, t: int, cntr: str | None = "CT1", *, inst: str = H, drug: str = DRUG
          ) -> tuple[str, dict[str, Any]]:
    return "ProcurementOrder", {"ord_id": f"PO{next(_ids)}", "fixmedins_code": inst, "splr_code": "S",
                                "med_list_codg": drug, "cntr_id": cntr, "admdvs": inst[1:7], "purc_cnt": cnt * CNT,
                                "purc_pric": 10_000_000, "purc_amt": cnt * 1000, "ord_time": t}


def delivery(dlv: str, t: int, amt: int = 100_000, *, inst: str = H) -> tuple[str, dict[str, Any]]:
    return "DeliveryAcceptance", {"dlv_id": dlv, "ord_id": "PO", "fixmedins_code": inst, "splr_code": "S",
                                  "med_list_codg": DRUG, "admdvs": inst[1:7], "dlv_cnt": CNT, "dlv_amt": amt,
                                  "acpt_time": t}


def payment(dlv: str, t: int, *, inst: str = H) -> tuple[str, dict[str, Any]]:
    return "SupplierPayment", {"pay_id": f"PY{next(_ids)}", "dlv_id": dlv, "fixmedins_code": inst, "splr_code": "S",
                               "admdvs": inst[1:7], "pay_amt": 100_000, "pay_time": t}


class ProcRig:
    """A procurement engine on partition 0 with its own offsets (``lateness``: the engine's
    ``allowed_lateness_days``, its default when None)."""

    def __init__(self, store: Store | None = None, lateness: int | None = None, **params: Any) -> None:
        self.book = seed_book()
        for rid, p in params.items():
            rule_update(self.book, rid.replace("_", "-"), **p)
        self.store = store or Store("procurement", "t")
        self.lateness = lateness
        self.engine = (ProcurementEngine(self.book, self.store) if lateness is None
                       else ProcurementEngine(self.book, self.store, allowed_lateness_days=lateness))
        self.offset = 0

    def send(self, *events: tuple[str, dict[str, Any]], offset: int | None = None) -> list[dict[str, Any]]:
        evs = []
        for record, datum in events:
            o = self.offset if offset is None else offset
            evs.append(EngineEvent(record, datum, 0, o))
            if offset is None:
                self.offset += 1
            else:
                offset += 1
        return [a for a, _, _ in self.engine.process(evs).alerts]

    def restarted(self) -> ProcRig:
        """A new engine restored from this one's state after a JSON round trip (what the changelog
        holds once compacted), its derived indexes rebuilt by ``restored``."""
        fresh = Store("procurement", "t")
        for k, v in self.store.part(0).items():
            fresh.part(0)[k] = orjson.loads(orjson.dumps(v))
        rig = ProcRig(fresh, self.lateness)
        rig.book = self.book
        rig.engine.book = self.book
        rig.engine.restored(0)
        rig.offset = self.offset
        return rig


def rules(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["rule_id"] for a in alerts]


def standing(alerts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The alerts that stand after ``alerts`` (every version, in the order published): the latest
    version of each alert id by ``detected_at`` (a tie goes to RETRACTED, as the alerts table
    does), kept when FIRED."""
    latest: dict[str, dict[str, Any]] = {}
    for a in alerts:
        cur = latest.get(a["alert_id"])
        rank = (a["detected_at"], a["status"] == "RETRACTED")
        if cur is None or rank >= (cur["detected_at"], cur["status"] == "RETRACTED"):
            latest[a["alert_id"]] = a
    return {k: a for k, a in latest.items() if a["status"] == "FIRED"}


# --- YB-PSI-OVERSELL --------------------------------------------------------------------------------

def test_oversell_fires_once_beyond_the_tolerance_and_not_at_it() -> None:
    rig = ProcRig()  # tolerance 20‰ of count + purchases: (100 + 50) × 2% = 3 units
    assert rig.send(mov("STOCKTAKE", 100, ms(0)), mov("PURCHASE_IN", 50, ms(0, 11)),
                    mov("SALE_OUT", 150, ms(0, 12)), mov("SALE_OUT", 3, ms(0, 13))) == []  # exactly -3
    [a] = rig.send(mov("SALE_OUT", 0.5, ms(0, 14)))
    assert a["rule_id"] == "YB-PSI-OVERSELL" and a["subsystem"] == "procurement" and a["fixmedins_code"] == H
    assert a["evidence"]["oversold_cnt"] == "3.5" and a["amount_at_risk"] == 7 * 100  # 3.5 × 2.00 yuan
    assert a["admdvs"] == H[1:7] == "110105"  # the institution's region, never the procuring province
    assert rig.send(mov("SALE_OUT", 5, ms(0, 15))) == []  # the same episode
    rig.send(mov("STOCKTAKE", 0, ms(1)))  # a recount closes it
    assert rules(rig.send(mov("SALE_OUT", 1, ms(1, 10)))) == ["YB-PSI-OVERSELL"]


def test_oversell_counts_returns_both_ways_and_needs_a_counted_opening_stock() -> None:
    rig = ProcRig(YB_PSI_OVERSELL={"tolerance_pm": 0})
    assert rig.send(mov("SALE_OUT", 500, ms(0))) == []  # no stock-take yet: nothing to compare with
    assert rig.send(mov("STOCKTAKE", 10, ms(0, 11)), mov("PURCHASE_IN", 10, ms(0, 12)),
                    mov("PURCHASE_RETURN", 5, ms(0, 13)), mov("SALE_OUT", 10, ms(0, 14)),
                    mov("SALE_RETURN", 2, ms(0, 15)), mov("SALE_OUT", 7, ms(0, 16))) == []  # 10+10-5-10+2-7 = 0
    assert rules(rig.send(mov("SALE_OUT", 1, ms(0, 17)))) == ["YB-PSI-OVERSELL"]


def test_oversell_redelivery_and_restore_apply_each_movement_once() -> None:
    rig = ProcRig(YB_PSI_OVERSELL={"tolerance_pm": 0})
    first = [mov("STOCKTAKE", 10, ms(0)), mov("SALE_OUT", 6, ms(0, 11))]
    rig.send(*first)
    assert rig.send(*first, offset=0) == []  # redelivered: skipped, the balance is still 4
    rig = rig.restarted()
    assert rig.send(*first, offset=0) == []
    assert rig.send(mov("SALE_OUT", 4, ms(0, 12))) == []  # 0 left: not beyond
    assert rules(rig.send(mov("SALE_OUT", 1, ms(0, 13)))) == ["YB-PSI-OVERSELL"]


# --- YB-PSI-TRACE-DUP --------------------------------------------------------------------------------

def test_trace_code_sold_twice_fires_and_a_returned_code_may_be_sold_again() -> None:
    rig = ProcRig()
    assert rig.send(mov("SALE_OUT", 2, ms(0), ["A1", "A2"]), mov("SALE_OUT", 1, ms(0, 11), ["B1"])) == []
    second = mov("SALE_OUT", 1, ms(1), ["A2"])
    [a] = rig.send(second)
    assert a["rule_id"] == "YB-PSI-TRACE-DUP" and a["evidence"]["ref"] == second[1]["mov_id"]
    assert a["evidence"]["codes"] == "A2" and a["amount_at_risk"] == 200
    rig.send(mov("SALE_RETURN", 1, ms(1, 12), ["B1"]))
    assert rig.send(mov("SALE_OUT", 1, ms(1, 13), ["B1"])) == []  # returned, resold: legitimate
    assert rules(rig.send(mov("SALE_OUT", 2, ms(1, 14), ["C1", "C1"]))) == ["YB-PSI-TRACE-DUP"]


def test_trace_memory_is_bounded_by_the_retention_window() -> None:
    """A code counts as sold again within ``retention_days`` China days of its previous sale; the
    memory reaches back the retention plus the allowed lateness from the watermark."""
    for lateness in (0, 35):
        rig = ProcRig(lateness=lateness, YB_PSI_TRACE_DUP={"retention_days": 30})
        rig.send(mov("SALE_OUT", 1, ms(0), ["A1"]), mov("SALE_OUT", 1, ms(1), ["A2"]))
        rig.send(mov("STOCKTAKE", 5, ms(31, 12)))  # event time moves on
        assert rig.send(mov("SALE_OUT", 1, ms(31, 13), ["A1"])) == []  # sold 31 days ago: not within
        assert rules(rig.send(mov("SALE_OUT", 1, ms(31, 14), ["A2"]))) == ["YB-PSI-TRACE-DUP"]  # 30 days
        day0 = rig.store.get(0, f"{H}#tr#{(ms(0) + 8 * 3_600_000) // 86_400_000}")
        assert (day0 is None) == (lateness == 0)  # 31 days back: kept only while within the lateness


def test_trace_redelivery_is_no_duplicate_and_the_memory_survives_a_restore() -> None:
    rig = ProcRig()
    sale = mov("SALE_OUT", 1, ms(0), ["A1"])
    rig.send(sale)
    assert rig.send(sale, offset=0) == []
    rig = rig.restarted()
    assert rig.send(sale, offset=0) == []  # the same sale again, after a restore
    assert rules(rig.send(mov("SALE_OUT", 1, ms(2), ["A1"]))) == ["YB-PSI-TRACE-DUP"]


def test_trace_bucket_written_without_its_institution_is_still_idempotent() -> None:
    """A crash can leave the day bucket in the changelog but not the institution's offset: the
    redelivered sale finds its own code, remembered with its own offset, and is no duplicate."""
    rig = ProcRig()
    rig.send(mov("SALE_OUT", 1, ms(0), ["A1"]))
    partial = Store("procurement", "t")
    for p, k, v in rig.store.drain():
        if v is not None and b"#tr#" in k:
            partial.part(p)[k.decode()] = orjson.loads(v)
    rig2 = ProcRig(partial)
    rig2.engine.restored(0)
    _, datum = mov("SALE_OUT", 1, ms(0), ["A1"])
    assert rig2.send(("InventoryMovement", datum), offset=0) == []


# --- YB-PROC-VOLUME-LAG -------------------------------------------------------------------------------

def test_volume_lag_is_judged_at_each_midnight_once_per_contract_and_month() -> None:
    """A 100-day cycle from day 0 (2024-03-04): at the China midnight starting day d, d% of it has
    elapsed. Judged when the watermark reaches the midnight; one alert per contract and month."""
    rig = ProcRig(YB_PROC_VOLUME_LAG={"lag_points": 10, "min_shortfall_yuan": 0})
    rig.send(contract(1000, 0, 99), order(200, ms(1)))
    assert rig.send(mov("STOCKTAKE", 1, ms(30, 23, 59))) == []  # day 30: 30.0% elapsed, 20.0% bought
    [a] = rig.send(mov("STOCKTAKE", 1, ms(31, 0)))  # day 31: 11 points behind
    assert a["rule_id"] == "YB-PROC-VOLUME-LAG" and a["evidence"]["ref"] == "CT1"
    assert a["evidence"]["month"] == "202404" and a["evidence"]["lag_points"] == "11.0"
    assert a["evidence"]["completion"] == "20.0%" and a["amount_at_risk"] == (310 - 200) * 1000
    assert rig.send(mov("STOCKTAKE", 1, ms(40))) == []  # April has its alert
    assert rig.send(order(400, ms(45))) == []  # bought after April lagged: its alert stands
    assert rig.send(mov("STOCKTAKE", 1, ms(70))) == []  # May: 70.0% elapsed, 60.0% bought
    [b] = rig.send(mov("STOCKTAKE", 1, ms(71)))
    assert b["evidence"]["month"] == "202405" and b["alert_id"] != a["alert_id"]
    assert len(standing([a, b])) == 2


def test_volume_lag_counts_orders_naming_no_contract_and_respects_the_minimum_value() -> None:
    rig = ProcRig(YB_PROC_VOLUME_LAG={"lag_points": 10, "min_shortfall_yuan": 4000})
    rig.send(contract(1000, 0, 99), order(200, ms(1), cntr=None))
    assert rig.send(mov("STOCKTAKE", 1, ms(57))) == []  # day 57: 37 points, but 370 units × 10 yuan < 4000
    rig = ProcRig(YB_PROC_VOLUME_LAG={"lag_points": 10, "min_shortfall_yuan": 4000})
    rig.send(contract(1000, 0, 99), order(150, ms(1), cntr=None))
    [a] = rig.send(mov("STOCKTAKE", 1, ms(57)))  # from day 55: 400 units behind, 4000 yuan
    assert a["rule_id"] == "YB-PROC-VOLUME-LAG" and a["evidence"]["behind_value"] == "4000.00"


def test_volume_lag_redelivery_and_restore() -> None:
    rig = ProcRig(YB_PROC_VOLUME_LAG={"lag_points": 10, "min_shortfall_yuan": 0})
    evs = [contract(1000, 0, 99), order(100, ms(5))]
    rig.send(*evs)
    rig.send(*evs, offset=0)  # skipped: still 100 bought, not 200
    rig = rig.restarted()
    rig.send(*evs, offset=0)
    [a] = rig.send(mov("STOCKTAKE", 1, ms(21)))  # day 21: 21.0% elapsed vs 10.0%
    assert a["evidence"]["completion"] == "10.0%" and a["evidence"]["month"] == "202403"
    rig = rig.restarted()  # the checkpoints judged and March's alert are remembered
    assert rig.send(mov("STOCKTAKE", 1, ms(22))) == []


# --- YB-PROC-PAY-OVERDUE -------------------------------------------------------------------------------

def test_payment_after_the_limit_fires_and_at_the_limit_does_not() -> None:
    rig = ProcRig()
    rig.send(delivery("D1", ms(0)), delivery("D2", ms(0)))
    assert rig.send(payment("D1", ms(30))) == []  # exactly 30 days
    [a] = rig.send(payment("D2", ms(30) + 1))
    assert a["rule_id"] == "YB-PROC-PAY-OVERDUE" and a["evidence"]["ref"] == "D2" and a["evidence"]["paid"] == "yes"
    assert a["amount_at_risk"] == 100_000


def test_unpaid_delivery_fires_once_when_event_time_passes_the_deadline() -> None:
    rig = ProcRig()
    rig.send(delivery("D1", ms(0)))
    assert rig.send(mov("STOCKTAKE", 1, ms(30))) == []  # at the deadline, not past it
    [a] = rig.send(mov("STOCKTAKE", 1, ms(30) + 1))
    assert a["evidence"]["ref"] == "D1" and a["evidence"]["paid"].startswith("no")
    assert rig.send(mov("STOCKTAKE", 1, ms(40)), payment("D1", ms(41))) == []  # fired once, not again when paid


def test_payment_timer_survives_a_restore_and_a_redelivery() -> None:
    rig = ProcRig()
    rig.send(delivery("D1", ms(0)), delivery("D2", ms(1)), payment("D2", ms(2)))
    rig = rig.restarted()
    first = rig.send(mov("STOCKTAKE", 1, ms(35)))
    assert [a["evidence"]["ref"] for a in first] == ["D1"]  # D2 was paid: no timer for it
    rig = rig.restarted()
    assert rig.send(mov("STOCKTAKE", 1, ms(35)), offset=rig.offset - 1) == []  # redelivered: skipped
    assert rig.send(mov("STOCKTAKE", 1, ms(60))) == []


def test_alert_ids_are_deterministic() -> None:
    def run() -> list[str]:
        rig = ProcRig()
        rig.send(delivery("D9", ms(0)))
        return [a["alert_id"] for a in rig.send(payment("D9", ms(40)))]

    assert run() == run() and len(run()) == 1
