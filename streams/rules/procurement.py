"""Procurement-stream rules (药品和医用耗材招采): purchase-sale-inventory, traceability, volume, payment.

The procurement topic is keyed by ``fixmedins_code``, so everything one institution does (its
contracts, orders, deliveries, inventory movements and supplier payments) is on one partition, in
order. The ``procurement`` store keeps, per institution (key = fixmedins_code):

* ``inv``: per drug (med_list_codg), the book balance since the last stock-take (进销存):
  ``[balance, inflow, episode]`` (quantities at scale 4). A drug is judged only after its first
  STOCKTAKE: without a counted opening stock there is no balance to compare sales with.
* ``c``: per volume-procurement contract, ``[drug, agreed_volume, cycle start ms, cycle end ms,
  purchased, last alerted month, winning unit price]``.
* ``d``: accepted deliveries not yet paid, ``dlv_id → [acpt_time, dlv_amt, splr_code]``.
* ``td``: the days that have a traceability-code bucket (see below); ``o``/``t``/``r``: the last
  source offset applied, the latest event time and the region.

Sold traceability codes live in separate keys, one per institution and China day of sale
(``<fixmedins_code>#tr#<day>``: ``code → source offset of the sale``), so a batch rewrites only
the day it sold on, not the institution's whole memory. The memory is bounded by the rule's
``retention_days``: day buckets older than the partition's event time minus the retention are
deleted (tombstones), so a unit resold more than ``retention_days`` after its first sale is not
recognised. An in-memory index (institution, code) → (day, offset) is derived from the buckets
when a partition is restored.

Exactly once: the institution's ``o`` guards redelivery (state.py). The trace buckets are written
in the same changelog flush but are idempotent on their own: a code remembered with the same
source offset is the same sale seen again, never a duplicate. The payment timer is on event time:
the partition's watermark (latest event time seen, derived from the stored ``t`` on restore)
passing ``acpt_time + days`` with the delivery still unpaid fires once and removes the delivery
from ``d``, so neither a redelivery nor the late payment fires it again (and the alert id,
``uuid5(rule | institution | dlv_id)``, is the same whichever fires).
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Sequence
from typing import Any

from schemas.calendar import CHINA, DAY_MS, china_day, day_start_ms, month_bounds, month_of

from .alerts import alert_datum
from .detectors import Finding
from .events import EngineEvent, EngineOutput
from .model import Rule
from .rulebook import RuleBook
from .state import Store

SUBSYSTEM = "procurement"
TRACE_SEP = "#tr#"
CNT = 10_000  # quantity scale 4
PRICE_TO_FEN = 10**8  # cnt (scale 4) × pric (scale 6) → fen (scale 2)

CONTRACT = "ProcurementContract"
ORDER = "ProcurementOrder"
DELIVERY = "DeliveryAcceptance"
MOVEMENT = "InventoryMovement"
PAYMENT = "SupplierPayment"

KIND_OVERSELL = "psi_oversell"
KIND_TRACE = "trace_duplicate"
KIND_VOLUME = "volume_lag"
KIND_PAYMENT = "payment_overdue"
PROCUREMENT_KINDS = (KIND_OVERSELL, KIND_TRACE, KIND_VOLUME, KIND_PAYMENT)


class ProcurementEngine:
    """Per-institution procurement rules over one partition's events (see the module docstring)."""

    def __init__(self, book: RuleBook, store: Store) -> None:
        self.book = book
        self.store = store
        self.stores = [store]
        self.alert_kinds = frozenset(PROCUREMENT_KINDS)
        self.watermark: dict[int, int] = {}
        #: (due ms, institution, dlv_id) per partition; entries are checked against the state
        #: when they come due (a paid delivery's entry is simply stale)
        self._timers: dict[int, list[tuple[int, str, str]]] = {}
        #: (institution, trace code) → (day, source offset of the sale), per partition
        self._trace: dict[int, dict[tuple[str, str], tuple[int, int]]] = {}

    # --- state lifecycle ---------------------------------------------------------------------
    def restored(self, partition: int) -> None:
        """Rebuild what is derived from the store: watermark, payment timers, trace index."""
        wm = 0
        timers: list[tuple[int, str, str]] = []
        index: dict[tuple[str, str], tuple[int, int]] = {}
        for key, st in self.store.part(partition).items():
            if TRACE_SEP in key:
                inst, _, day = key.partition(TRACE_SEP)
                for code, off in st.items():
                    index[(inst, code)] = (int(day), int(off))
                continue
            wm = max(wm, int(st.get("t", 0)))
            for dlv_id, (acpt, _amt, _splr) in st.get("d", {}).items():
                timers.append((int(acpt), key, dlv_id))
        heapq.heapify(timers)
        self.watermark[partition] = wm
        self._timers[partition] = timers
        self._trace[partition] = index

    def forget(self, partitions: Sequence[int]) -> None:
        self.store.forget(partitions)
        for p in partitions:
            self.watermark.pop(p, None)
            self._timers.pop(p, None)
            self._trace.pop(p, None)

    # --- the batch -----------------------------------------------------------------------------
    def process(self, events: Sequence[EngineEvent]) -> EngineOutput:
        """Apply ``events`` in order (emits nothing: procurement state is keyed like its stream)."""
        out = EngineOutput()
        rules = self.book.current
        by_kind = {k: rules.enabled(k) for k in PROCUREMENT_KINDS}
        for ev in events:
            d = ev.datum
            inst = d.get("fixmedins_code")
            if not inst:
                continue
            st = self._state(ev.partition, inst)
            if ev.offset <= st["o"]:
                out.skipped += 1
                continue
            t = self._event_time(ev.record, d)
            st["o"] = ev.offset
            st["r"] = d.get("admdvs") or st.get("r", "")
            if t is not None:
                st["t"] = max(int(st.get("t", 0)), t)
            if ev.record == MOVEMENT:
                self._movement(ev, st, by_kind, out)
            elif ev.record == CONTRACT:
                self._contract(d, st)
            elif ev.record == ORDER:
                self._order(d, st)
                self._volume(ev, st, by_kind[KIND_VOLUME], t or 0, out)
            elif ev.record == DELIVERY:
                self._delivery(ev, st, by_kind[KIND_PAYMENT])
                self._volume(ev, st, by_kind[KIND_VOLUME], t or 0, out)
            elif ev.record == PAYMENT:
                self._payment(ev, st, by_kind[KIND_PAYMENT], out)
            self.store.put(ev.partition, inst, st)
            if t is not None and t > self.watermark.get(ev.partition, 0):
                self.watermark[ev.partition] = t
            self._fire_timers(ev, by_kind[KIND_PAYMENT], out)
        return out

    @staticmethod
    def _event_time(record: str, d: dict[str, Any]) -> int | None:
        f = {CONTRACT: "sign_time", ORDER: "ord_time", DELIVERY: "acpt_time", MOVEMENT: "mov_time",
             PAYMENT: "pay_time"}.get(record)
        return int(d[f]) if f is not None and d.get(f) is not None else None

    def _state(self, partition: int, inst: str) -> dict[str, Any]:
        st: dict[str, Any] | None = self.store.get(partition, inst)
        if st is None:
            st = {"o": -1, "t": 0, "r": "", "inv": {}, "c": {}, "d": {}, "td": []}
        return st

    def _alert(self, rule: Rule, key: str, inst: str, st: dict[str, Any], start: int, end: int,
               setl_ids: Sequence[str], amount: int, evidence: dict[str, str], at: int, ev: Any,
               out: EngineOutput) -> None:
        fd = Finding(rule, key, inst, start, end, tuple(setl_ids), (), amount, evidence, at)
        out.alerts.append((alert_datum(fd, SUBSYSTEM, inst, None, st.get("r") or None), ev.partition, ev.offset))

    # --- 进销存: inventory balance and traceability codes --------------------------------------
    def _movement(self, ev: Any, st: dict[str, Any], by_kind: dict[str, list[Rule]], out: EngineOutput) -> None:
        d = ev.datum
        drug = d["med_list_codg"]
        kind = d["mov_type"]
        cnt = int(d["cnt"])
        inv: dict[str, list[Any]] = st["inv"]
        row = inv.get(drug)
        if kind == "STOCKTAKE":
            inv[drug] = [cnt, cnt, ""]  # a count re-baselines the books and closes any episode
        elif row is not None:
            if kind == "PURCHASE_IN":
                row[0] += cnt
                row[1] += cnt
            elif kind == "PURCHASE_RETURN":
                row[0] -= cnt
                row[1] -= cnt
            elif kind == "SALE_OUT":
                row[0] -= cnt
            elif kind == "SALE_RETURN":
                row[0] += cnt
            if kind == "SALE_OUT":
                for rule in by_kind[KIND_OVERSELL]:
                    self._oversell(rule, ev, st, row, out)
        if by_kind[KIND_TRACE] and (kind in ("SALE_OUT", "SALE_RETURN")) and d.get("drug_trac_codg"):
            self._traces(by_kind[KIND_TRACE][0], by_kind[KIND_TRACE], ev, st, out)

    def _oversell(self, rule: Rule, ev: Any, st: dict[str, Any], row: list[Any], out: EngineOutput) -> None:
        """Cumulative sales beyond opening stock + net purchases by more than ``tolerance_pm`` of the
        inflow: one alert per episode (until the next stock-take re-baselines the drug)."""
        balance, inflow, episode = row
        tolerance = max(0, inflow) * int(rule.param("tolerance_pm")) // 1000
        if episode or balance >= -tolerance:
            return
        d = ev.datum
        row[2] = d["mov_id"]
        excess = -balance
        t = int(d["mov_time"])
        self._alert(rule, f"{d['med_list_codg']}|{d['mov_id']}", d["fixmedins_code"], st, t, t,
                    [d["setl_id"]] if d.get("setl_id") else [], excess * int(d["pric"]) // PRICE_TO_FEN, {
                        "ref": d["mov_id"], "med_list_codg": d["med_list_codg"],
                        "oversold_cnt": f"{excess / CNT:g}", "tolerance_cnt": f"{tolerance / CNT:g}",
                        "opening_plus_purchases_cnt": f"{inflow / CNT:g}",
                    }, t, ev, out)

    def _traces(self, rule: Rule, rules: list[Rule], ev: Any, st: dict[str, Any], out: EngineOutput) -> None:
        """Remember sold codes (per day bucket); a code sold again while remembered is a duplicate."""
        d = ev.datum
        inst = d["fixmedins_code"]
        p = ev.partition
        index = self._trace.setdefault(p, {})
        t = int(d["mov_time"])
        day = china_day(t)
        retention = max(int(r.param("retention_days")) for r in rules)
        self._prune_traces(p, inst, st, china_day(max(self.watermark.get(p, 0), t)) - retention, index)
        if d["mov_type"] == "SALE_RETURN":
            for code in d["drug_trac_codg"]:
                hit = index.pop((inst, code), None)
                if hit is not None:
                    bucket = self.store.get(p, f"{inst}{TRACE_SEP}{hit[0]}")
                    if bucket is not None and bucket.pop(code, None) is not None:
                        self.store.put(p, f"{inst}{TRACE_SEP}{hit[0]}", bucket)
            return
        if day < china_day(self.watermark.get(p, t)) - retention:
            return  # older than the memory: nothing to compare with, nothing to keep
        key = f"{inst}{TRACE_SEP}{day}"
        bucket = self.store.get(p, key) or {}
        dups: list[tuple[str, int]] = []
        here: set[str] = set()
        for code in d["drug_trac_codg"]:
            prev = index.get((inst, code))
            if code in here or (prev is not None and prev[1] != ev.offset):
                dups.append((code, prev[0] if prev is not None else day))
            here.add(code)
            if prev is None:
                index[(inst, code)] = (day, ev.offset)
                bucket[code] = ev.offset
        self.store.put(p, key, bucket)
        if day not in st["td"]:
            st["td"].append(day)
            st["td"].sort()
        if dups:
            first_day = min(x[1] for x in dups)
            per_unit = int(d["pric"])
            self._alert(rule, d["mov_id"], inst, st, day_start_ms(first_day), t,
                        [d["setl_id"]] if d.get("setl_id") else [], len(dups) * CNT * per_unit // PRICE_TO_FEN, {
                            "ref": d["mov_id"], "med_list_codg": d["med_list_codg"],
                            "codes": ",".join(sorted({c for c, _ in dups})[:10]), "duplicates": str(len(dups)),
                            "first_sold_day": dt.date.fromordinal(719_163 + first_day).isoformat(),
                        }, t, ev, out)

    def _prune_traces(self, p: int, inst: str, st: dict[str, Any], cutoff: int,
                      index: dict[tuple[str, str], tuple[int, int]]) -> None:
        days: list[int] = st["td"]
        while days and days[0] < cutoff:
            day = days.pop(0)
            key = f"{inst}{TRACE_SEP}{day}"
            for code in self.store.get(p, key) or {}:
                if index.get((inst, code), (None,))[0] == day:
                    del index[(inst, code)]
            self.store.delete(p, key)

    # --- agreed volume (带量采购) ------------------------------------------------------------------
    @staticmethod
    def _contract(d: dict[str, Any], st: dict[str, Any]) -> None:
        old = st["c"].get(d["cntr_id"])
        st["c"][d["cntr_id"]] = [d["med_list_codg"], int(d["agreed_volume"]), day_start_ms(int(d["cycle_begn_date"])),
                                 day_start_ms(int(d["cycle_end_date"]) + 1), old[4] if old else 0, old[5] if old else 0,
                                 int(d["win_pric"])]

    @staticmethod
    def _order(d: dict[str, Any], st: dict[str, Any]) -> None:
        """Purchases count towards the contract they name; an order naming none counts towards the
        institution's contract for that product whose cycle contains the order."""
        t = int(d["ord_time"])
        c = st["c"].get(d["cntr_id"]) if d.get("cntr_id") else None
        if c is None and not d.get("cntr_id"):
            c = next((x for x in st["c"].values() if x[0] == d["med_list_codg"] and x[2] <= t < x[3]), None)
        if c is not None:
            c[4] += int(d["purc_cnt"])

    def _volume(self, ev: Any, st: dict[str, Any], rules: list[Rule], t: int, out: EngineOutput) -> None:
        """Completion (purchased ÷ agreed) against the elapsed share of the cycle, at this event's
        time, for every contract of the institution in its cycle; one alert per contract and month.

        Why ``min_shortfall_yuan``: volumes are bought in whole packs, so a contract of a few packs a
        year lags by many points between two orders (one pack of stock can last a quarter); what
        matters to the fund and the supplier is the value not bought, at the winning price."""
        if not rules:
            return
        month = month_of(t)
        for cntr_id, c in sorted(st["c"].items()):
            drug, volume, begin, end, bought, last, pric = c
            if not begin <= t < end or volume <= 0 or last >= month:
                continue
            elapsed_pm = (t - begin) * 1000 // (end - begin)
            done_pm = bought * 1000 // volume
            for rule in rules:
                lag = int(rule.param("lag_points"))
                owed = volume * elapsed_pm // 1000 - bought
                value = owed * pric // PRICE_TO_FEN
                if elapsed_pm - done_pm <= lag * 10 or value < int(rule.param("min_shortfall_yuan")) * 100:
                    continue
                c[5] = month
                start, stop = month_bounds(month)
                self._alert(rule, f"{cntr_id}|{month}", ev.datum["fixmedins_code"], st, start, stop, [],
                            value, {
                                "ref": cntr_id, "month": str(month), "med_list_codg": drug,
                                "completion": f"{done_pm / 10:.1f}%", "elapsed": f"{elapsed_pm / 10:.1f}%",
                                "lag_points": f"{(elapsed_pm - done_pm) / 10:.1f}", "max_lag_points": str(lag),
                                "behind_cnt": f"{owed / CNT:g}", "behind_value": f"{value / 100:.2f}",
                            }, t, ev, out)
                break

    # --- 回款: payment within N days of accepted delivery ----------------------------------------
    def _delivery(self, ev: Any, st: dict[str, Any], rules: list[Rule]) -> None:
        d = ev.datum
        acpt = int(d["acpt_time"])
        st["d"][d["dlv_id"]] = [acpt, int(d["dlv_amt"]), d["splr_code"]]
        heapq.heappush(self._timers.setdefault(ev.partition, []), (acpt, d["fixmedins_code"], d["dlv_id"]))

    def _payment(self, ev: Any, st: dict[str, Any], rules: list[Rule], out: EngineOutput) -> None:
        d = ev.datum
        pending = st["d"].pop(d["dlv_id"], None)
        if pending is None:
            return  # unknown delivery (before this state began), or already alerted by the timer
        acpt, amt, splr = pending
        pay = int(d["pay_time"])
        for rule in rules:
            limit = int(rule.param("days")) * DAY_MS
            if pay - acpt > limit:
                self._overdue(rule, ev, st, d["fixmedins_code"], d["dlv_id"], acpt, amt, splr, pay, True, out)
                break

    def _fire_timers(self, ev: Any, rules: list[Rule], out: EngineOutput) -> None:
        """Deliveries still unpaid when the partition's event time passes acceptance + ``days``."""
        timers = self._timers.get(ev.partition)
        if not timers or not rules:
            return
        wm = self.watermark.get(ev.partition, 0)
        limit = min(int(r.param("days")) for r in rules) * DAY_MS
        while timers and timers[0][0] + limit < wm:
            acpt, inst, dlv_id = heapq.heappop(timers)
            st = self.store.get(ev.partition, inst)
            if st is None or dlv_id not in st["d"]:
                continue  # paid meanwhile (a stale entry)
            _, amt, splr = st["d"].pop(dlv_id)
            for rule in rules:
                if acpt + int(rule.param("days")) * DAY_MS < wm:
                    self._overdue(rule, ev, st, inst, dlv_id, acpt, amt, splr, wm, False, out)
                    break
            self.store.put(ev.partition, inst, st)

    def _overdue(self, rule: Rule, ev: Any, st: dict[str, Any], inst: str, dlv_id: str, acpt: int, amt: int,
                 splr: str, at: int, paid: bool, out: EngineOutput) -> None:
        days = int(rule.param("days"))
        self._alert(rule, dlv_id, inst, st, acpt, at, [], amt, {
            "ref": dlv_id, "splr_code": splr, "accepted": dt.datetime.fromtimestamp(acpt / 1000, CHINA).isoformat(),
            "paid": "yes" if paid else "no (event time passed the deadline)",
            "days_since_acceptance": f"{(at - acpt) / DAY_MS:.1f}", "max_days": str(days),
        }, at, ev, out)


__all__ = ["PROCUREMENT_KINDS", "ProcurementEngine"]
