"""Planted procurement anomalies: ground truth for the procurement-stream rules.

Each planter hooks the procurement record it changes (see :meth:`Planter.record_hooks`); none of
them plants on settlements. Like the settlement planters they draw only from ``ctx.rng``, change
copies (the generator keeps references to what it emitted: a sale's trace list is reused by its
reversal's SALE_RETURN), and leave the generator's own books (stock levels, orders) untouched, so
every other event is emitted exactly as without planting. The truth names the business id the
alert carries in its ``ref`` evidence (``refs``), because procurement alerts have no settlement.

* **YB-PSI-OVERSELL**: right after a real SALE_OUT, a phantom SALE_OUT (no settlement, no trace
  codes) of more than the stock left, by three times the rule's tolerance plus ten units. One per
  institution and drug until its next STOCKTAKE (which re-baselines the books and closes the
  detector's episode), so every planted phantom is its own episode.
* **YB-PSI-TRACE-DUP**: a SALE_OUT whose first trace code is replaced by a code the institution
  sold at least an hour earlier and never took back (a recycled code, 回流药). The quantity is
  unchanged, so the inventory balance, and the oversell rule, are not affected.
* **YB-PROC-VOLUME-LAG**: a contract whose agreed volume is twenty times the reported demand (报量虚高:
  the hospital then buys at its usual pace). Planted only when the span reaches 20% of the cycle
  and the value behind by its end is at least three times the rule's ``min_shortfall_yuan``.
* **YB-PROC-PAY-OVERDUE**: a payment delayed to 35-60 days after acceptance, or (one in three)
  never made within the span: the detector's event-time timer must find it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from schemas.calendar import DAY_MS, HOUR_MS, day_start_ms

from .generator import (
    CONTRACT,
    DELIVERY,
    INVENTORY,
    PAYMENT,
    EventHook,
    HookContext,
    SimEvent,
)
from .planting import Anomaly, EventPlanter, Planter
from .reference import CATALOGUE_INDEX

CNT = 10_000
PLANTED_MOV_SERIAL = 900_000_000_000  # mov_id serials of planted movements (base ones count up from 1)


class _ProcPlanter(EventPlanter):
    def _plant(self, ctx: HookContext, events: Sequence[SimEvent], inst: str, ref: str, note: str) -> None:
        a = Anomaly(len(self.pl.anomalies) + 1, self.rule_id, [], [str(e.datum["event_id"]) for e in events],
                    inst, note, refs=[ref])
        self.pl.anomalies.append(a)
        for e in events:
            ctx.plant(a.rule_id, e, f"#{a.id} {note}")


class OversellPlanter(_ProcPlanter):
    rule_id = "YB-PSI-OVERSELL"
    record = INVENTORY

    def reset(self, ctx: HookContext) -> None:
        self._inflow: dict[tuple[str, str], int] = {}
        self._open: set[tuple[str, str]] = set()
        self._serial = PLANTED_MOV_SERIAL

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        d = event.datum
        key = (d["fixmedins_code"], d["med_list_codg"])
        kind = d["mov_type"]
        if kind == "STOCKTAKE":
            self._inflow[key] = int(d["cnt"])
            self._open.discard(key)
        elif kind in ("PURCHASE_IN", "PURCHASE_RETURN") and key in self._inflow:
            self._inflow[key] += int(d["cnt"]) if kind == "PURCHASE_IN" else -int(d["cnt"])
        if kind != "SALE_OUT" or key in self._open or key not in self._inflow or ctx.rng.random() >= self._rate():
            return [event]
        inst = self.pl.institution(d["fixmedins_code"])
        it_idx = CATALOGUE_INDEX.get(d["med_list_codg"])
        if inst is None or it_idx is None:
            return [event]
        stock = ctx.generator._stock[inst.index].get(it_idx)
        if stock is None:
            return [event]
        tol = max(0, self._inflow[key]) * int(self.rule.param("tolerance_pm")) // 1000
        cnt = (stock.level + 3 * tol + 10 * CNT) // CNT * CNT
        self._serial += 1
        phantom = SimEvent(event.record, event.key, {
            **d, "event_id": ctx.new_event_id(), "mov_id": f"MV{self._serial:012d}", "cnt": cnt,
            "drug_trac_codg": [], "setl_id": None,
        })
        self._open.add(key)
        self._plant(ctx, [phantom], d["fixmedins_code"], phantom.datum["mov_id"],
                    f"phantom sale of {cnt / CNT:g} {d['med_list_codg']} with {stock.level / CNT:g} in stock")
        return [event, phantom]


class TraceDupPlanter(_ProcPlanter):
    rule_id = "YB-PSI-TRACE-DUP"
    record = INVENTORY

    def reset(self, ctx: HookContext) -> None:
        self._sold: dict[str, deque[tuple[int, str]]] = {}
        self._returned: set[str] = set()

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        d = event.datum
        codes = d.get("drug_trac_codg") or []
        if d["mov_type"] == "SALE_RETURN":
            self._returned.update(codes)
            return [event]
        if d["mov_type"] != "SALE_OUT" or not codes:
            return [event]
        inst = d["fixmedins_code"]
        t = int(d["mov_time"])
        sold = self._sold.setdefault(inst, deque(maxlen=500))
        out = event
        if ctx.rng.random() < self._rate():
            old = [c for ts, c in sold if ts <= t - HOUR_MS and c not in self._returned]
            if old:
                code = old[int(ctx.rng.random() * len(old))]
                out = SimEvent(event.record, event.key, {**d, "drug_trac_codg": [code, *codes[1:]]})
                self._plant(ctx, [out], inst, d["mov_id"], f"trace code {code} sold again")
                self._returned.add(code)  # never recycle the same code twice
        for c in out.datum["drug_trac_codg"]:
            sold.append((t, c))
        return [out]


class VolumeLagPlanter(_ProcPlanter):
    rule_id = "YB-PROC-VOLUME-LAG"
    record = CONTRACT
    FACTOR = 20

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        d = event.datum
        if ctx.rng.random() >= self._rate():
            return [event]
        begin = day_start_ms(int(d["cycle_begn_date"]))
        end = day_start_ms(int(d["cycle_end_date"]) + 1)
        span_end = ctx.generator.config.end_ms
        if (span_end - begin) * 5 < end - begin:
            return [event]  # the span never reaches 20% of the cycle
        volume = int(d["agreed_volume"]) * self.FACTOR
        # behind by the end of the span, buying at about 1/FACTOR of the pace the volume asks for
        behind = volume * (span_end - begin) // (end - begin) * 86 // 100
        if behind * int(d["win_pric"]) // 10**8 < 3 * int(self.rule.param("min_shortfall_yuan")) * 100:
            return [event]
        out = SimEvent(event.record, event.key, {**d, "agreed_volume": volume})
        self._plant(ctx, [out], d["fixmedins_code"], d["cntr_id"],
                    f"agreed volume {volume / CNT:g} ({self.FACTOR} × reported demand)")
        return [out]


class PayOverduePlanter(_ProcPlanter):
    rule_id = "YB-PROC-PAY-OVERDUE"
    record = PAYMENT

    def record_hooks(self) -> dict[str, EventHook]:
        return {DELIVERY: self.hook, PAYMENT: self.hook}

    def reset(self, ctx: HookContext) -> None:
        self._acpt: dict[str, int] = {}

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        d = event.datum
        if event.record == DELIVERY:
            self._acpt[d["dlv_id"]] = int(d["acpt_time"])
            return [event]
        acpt = self._acpt.pop(d["dlv_id"], None)
        if acpt is None or ctx.rng.random() >= self._rate():
            return [event]
        limit = int(self.rule.param("days")) * DAY_MS
        span_end = ctx.generator.config.end_ms
        late = acpt + limit + 5 * DAY_MS + int(ctx.rng.random() * 25 * DAY_MS)
        never = ctx.rng.random() < 1 / 3
        if acpt + limit + 2 * DAY_MS >= span_end:
            return [event]  # the deadline passes too late in the span for anything to show it
        if never or late >= span_end:
            self._plant(ctx, [event], d["fixmedins_code"], d["dlv_id"], "never paid within the span")
            return []
        moved = SimEvent(event.record, event.key, {**d, "pay_time": late})
        self._plant(ctx, [moved], d["fixmedins_code"], d["dlv_id"],
                    f"paid {(late - acpt) / DAY_MS:.1f} days after acceptance")
        ctx.schedule(late, moved)
        return []


PROCUREMENT_PLANTERS: dict[str, type[Planter]] = {
    p.rule_id: p for p in (OversellPlanter, TraceDupPlanter, VolumeLagPlanter, PayOverduePlanter)
}

__all__ = ["PROCUREMENT_PLANTERS", "OversellPlanter", "PayOverduePlanter", "TraceDupPlanter", "VolumeLagPlanter"]
