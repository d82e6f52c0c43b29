"""Planted fund-operation, settled-over-sold and credit anomalies: ground truth for the ClickHouse monitors.

The monitors (:mod:`streams.monitors`) judge closed months from ClickHouse, and their alert ids
are deterministic (``uuid5(rule | subject | month|YYYYMM)``), so each planter records the exact
alert ids it expects in the anomaly's ``refs``; ``yibao evaluate`` matches an alert by its
``alert_id``. Like the other planters they draw only from ``ctx.rng`` (or an RNG derived from the
seed), change copies, and leave the generator's own books alone: only the hooked records differ.

Closed months: the months of the span before the month of its end (the monitors' ``as_of`` is the
month of the latest settlement, which is in the span's last day).

* **YB-FUND-CAPACITY**: a pool × insutype whose carried-over balance is booked at 0.4% of its
  amount (about a day of spending instead of 9-12 months: 结存被挪用/未入账). Its contributions stay
  at ~1.25 × spending, so no month goes negative, but the cumulative balance is a quarter of the
  spending so far and months of payout capacity falls below 3 from the first closed month on. How
  soon exactly depends on realised spending (a 2-day first month inflates its own capacity), so
  the truth lists the alert ids of every closed month of that pool × insutype: any of them
  matches, none of them is a false positive.
* **YB-FUND-NEGATIVE**: a pool × insutype × closed month (not the first one, which holds the
  opening balance) whose contributions booked in that month are cut to 40% (征缴不足): income ≈ 0.5 ×
  spending. The capacity stays far above 3 (one month's shortfall against 9-12 months carried
  over). Fund planters use disjoint pool × insutype subjects, so each rule is planted alone.
* **YB-PSI-SETTLED-OVER-SOLD**: every SALE_OUT of a drug at an institution in a closed month is
  dropped (the sales were billed to the fund but never recorded in the purchase-sale-inventory
  books). Counted once at least two units were dropped, so the excess clears the rule's
  ``min_excess_units``; dropping sales only raises the book stock, so no stream rule fires.

* **YB-SUP-CREDIT-LOW**: an inspection that found nothing is turned into one that found a
  violation (50,000 yuan median), and 3-10 days later the institution's agreement is terminated
  (a TERMINATE_AGREEMENT penalty, 500 points, fined twice the amount): its credit score falls
  below 600 (grade D). At most once per institution; the truth names the alert id
  ``uuid5(rule | institution | credit)``.
  The other rules' planted anomalies are rule hits, up to the score's 300-point cap at a busy
  hospital, so a base penalty of more than 100 points (a suspension, 200; a fine, 50 plus a point
  per 10,000 yuan) would decide the grade on its own: at seeds 7 and 11 a fine of 568,106 yuan
  (H11010500006, 594) and a suspension (H31011500004, 596) made grade D with no case planted. So
  a base penalty that takes its institution's penalty and fine points above 1000 − 300 −
  ``max_score`` − 1 (100) is made a termination and recorded as a case of this rule, whatever the
  rate (if positive). Every other institution keeps at most 100 points of penalties and fines and
  300 of rule hits: a score of 600 or more, however many hits the planting raised and whichever of
  them the rules find.

Rates: for the fund rules the share of pool × insutype subjects (capacity) or of subject × month
cells (negative) planted, at least one when the rate is positive; for settled-over-sold the
probability per institution × drug × closed month, drawn at its first sale; for the credit rule
the probability per clean inspection (of an institution not planted yet), plus the base penalties
made terminations.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Sequence
from typing import Any

from schemas.calendar import DAY_MS, china_day, month_of
from streams.rules.alerts import alert_id

from .generator import (
    FINE_FEN_PER_POINT,
    INCOME,
    INSPECTION,
    INVENTORY,
    MAX_FINE_POINTS,
    PENALTY,
    PENALTY_POINTS,
    EventHook,
    HookContext,
    SimEvent,
)
from .planting import Anomaly, EventPlanter, Planter

CNT = 10_000
INSUTYPES = ("310", "390")
OPENING_KEEP = 0.004  # share of the carried-over balance a capacity-planted subject books
NEGATIVE_KEEP = 0.4  # share of a month's contributions a negative-planted cell books
MIN_DROPPED_UNITS = 2 * CNT  # settled-over-sold: dropped quantity (scale 4) before it counts
PLANTED_PNSH_SERIAL = 900_000  # pnsh_id serials of planted penalties (base ones count up from 1)
FULL_CREDIT = 1000  # an institution's score without penalties or rule hits
MAX_HIT_POINTS = 300  # rule hits count at most this much (bi_institution_credit, docs/design.md)


def closed_months(start_ms: int, end_ms: int) -> list[int]:
    """YYYYMM months of the span before the month of its last instant, in order."""
    last = month_of(end_ms - 1)
    out: list[int] = []
    m = month_of(start_ms)
    while m < last:
        out.append(m)
        m = m + 1 if m % 100 < 12 else m + 89
    return out


def is_opening(d: dict[str, Any]) -> bool:
    """The generator's carried-over balance booking (income id ``FI<pool>OB<insutype>``)."""
    return str(d["income_id"])[8:10] == "OB"


class _Shared:
    """Fund subjects of one generator run, shuffled once, so the fund planters take disjoint ones."""

    def __init__(self, ctx: HookContext) -> None:
        gen = ctx.generator
        rng = random.Random(f"{gen.config.seed}/anomalies/fund")
        self.subjects = [(pool, ins) for pool in gen.pools for ins in INSUTYPES]
        rng.shuffle(self.subjects)
        self.months = closed_months(gen.config.start_ms, gen.config.end_ms)


_SHARED: weakref.WeakKeyDictionary[HookContext, _Shared] = weakref.WeakKeyDictionary()


def _shared(ctx: HookContext) -> _Shared:
    """The run's fund subjects (one per generator run: a run has its own hook context)."""
    sh = _SHARED.get(ctx)
    if sh is None:
        sh = _SHARED[ctx] = _Shared(ctx)
    return sh


def _capacity_count(pl: Any, sh: _Shared) -> int:
    """Subjects the capacity planter takes (the first ones of the shuffle), 0 if it is not planting."""
    if not any(isinstance(p, CapacityPlanter) for p in pl.planters) or not sh.months:
        return 0
    rate = float(pl.rate_of(CapacityPlanter.rule_id))
    return max(1, round(rate * len(sh.subjects))) if rate > 0 else 0


class _HookPlanter(EventPlanter):
    def new_run(self, ctx: HookContext) -> None:
        # the opening balances come before the first settlement, which would otherwise start
        # the planting's run (and forget anomalies recorded before it)
        self.pl._sync(ctx)
        super().new_run(ctx)

    def _anomaly(self, ctx: HookContext, events: Sequence[SimEvent], inst: str, refs: list[str],
                 note: str, month: int | None = None) -> Anomaly:
        a = Anomaly(len(self.pl.anomalies) + 1, self.rule_id, [], [str(e.datum["event_id"]) for e in events],
                    inst, note, refs=refs)
        self.pl.anomalies.append(a)
        for e in events:
            ctx.plant(a.rule_id, e, f"#{a.id} {note}")
        return a


class CapacityPlanter(_HookPlanter):
    rule_id = "YB-FUND-CAPACITY"
    record = INCOME

    def reset(self, ctx: HookContext) -> None:
        sh = _shared(ctx)
        self.months = sh.months
        self.targets = set(sh.subjects[:_capacity_count(self.pl, sh)])

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        d = event.datum
        subject = (str(d["insu_admdvs"]), str(d["insutype"]))
        if subject not in self.targets or not is_opening(d):
            return [event]
        new = dict(d)
        new["income_amt"] = max(1, int(int(d["income_amt"]) * OPENING_KEEP))
        ev = SimEvent(event.record, event.key, new)
        refs = [alert_id(self.rule_id, f"{subject[0]}|{subject[1]}", f"month|{m}") for m in self.months]
        self._anomaly(ctx, [ev], "", refs, f"{subject[0]}/{subject[1]} carried-over balance "
                      f"{int(d['income_amt']) / 100:.2f} booked as {new['income_amt'] / 100:.2f}")
        return [ev]


class NegativePlanter(_HookPlanter):
    rule_id = "YB-FUND-NEGATIVE"
    record = INCOME

    def reset(self, ctx: HookContext) -> None:
        sh = _shared(ctx)
        months = sh.months[1:]  # the first month holds the opening balance
        rate = self._rate()
        free = sh.subjects[_capacity_count(self.pl, sh):]  # the capacity planter's are not free
        cells = [(s, m) for s in free for m in months]
        n = max(1, round(rate * len(cells))) if rate > 0 and cells else 0
        rng = random.Random(f"{ctx.generator.config.seed}/anomalies/fund-negative")
        self.cells: dict[tuple[str, str, int], Anomaly | None] = dict.fromkeys(
            ((s[0], s[1], m) for s, m in rng.sample(cells, n)), None)

    def kept(self, pool: str, insutype: str, month: int) -> float:
        """The share of its contributions this pool × insutype × month books."""
        return NEGATIVE_KEEP if (pool, insutype, month) in self.cells else 1.0

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        d = event.datum
        key = (str(d["insu_admdvs"]), str(d["insutype"]), month_of(int(d["book_time"])))
        if key not in self.cells or is_opening(d):
            return [event]
        new = dict(d)
        new["income_amt"] = max(1, int(int(d["income_amt"]) * NEGATIVE_KEEP))
        ev = SimEvent(event.record, event.key, new)
        a = self.cells[key]
        if a is None:
            ref = alert_id(self.rule_id, f"{key[0]}|{key[1]}", f"month|{key[2]}")
            self.cells[key] = self._anomaly(ctx, [ev], "", [ref], f"{key[0]}/{key[1]} contributions of "
                                            f"{key[2]} booked at {NEGATIVE_KEEP:.0%}", month=None)
        else:
            a.event_ids.append(str(new["event_id"]))
            ctx.plant(a.rule_id, ev, f"#{a.id} {a.note}")
        return [ev]


class SettledOverSoldPlanter(_HookPlanter):
    rule_id = "YB-PSI-SETTLED-OVER-SOLD"
    record = INVENTORY

    def reset(self, ctx: HookContext) -> None:
        self.months = set(_shared(ctx).months)
        #: (institution, drug, month) → [dropped quantity, dropped event ids, anomaly once counted];
        #: None: drawn and not chosen
        self.cells: dict[tuple[str, str, int], list[Any] | None] = {}

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        d = event.datum
        if d["mov_type"] != "SALE_OUT" or not d.get("setl_id"):
            return [event]
        month = month_of(int(d["mov_time"]))
        if month not in self.months:
            return [event]
        key = (str(d["fixmedins_code"]), str(d["med_list_codg"]), month)
        if key not in self.cells:
            self.cells[key] = [0, [], None] if ctx.rng.random() < self._rate() else None
        cell = self.cells[key]
        if cell is None:
            return [event]
        cell[0] += int(d["cnt"])
        cell[1].append(str(d["event_id"]))
        if cell[2] is None and cell[0] >= MIN_DROPPED_UNITS:
            ref = alert_id(self.rule_id, f"{key[0]}|{key[1]}", f"month|{month}")
            a = Anomaly(len(self.pl.anomalies) + 1, self.rule_id, [], cell[1], key[0],
                        f"SALE_OUT of {key[1]} in {month} not recorded", refs=[ref])
            self.pl.anomalies.append(a)
            cell[2] = a
        elif cell[2] is not None:
            cell[2].event_ids = cell[1]
        return []  # the sale is not recorded


class CreditLowPlanter(_HookPlanter):
    rule_id = "YB-SUP-CREDIT-LOW"
    record = INSPECTION

    def record_hooks(self) -> dict[str, EventHook]:
        return {INSPECTION: self.hook, PENALTY: self.hook}

    def reset(self, ctx: HookContext) -> None:
        self.done: set[str] = set()
        self._serial = PLANTED_PNSH_SERIAL
        self._penalised: dict[str, tuple[int, int]] = {}  # base penalties: points, fines (fen)

    def room(self) -> int:
        """Penalty and fine points an institution may have without rule hits (at most
        :data:`MAX_HIT_POINTS`) ever taking its score to ``max_score``."""
        return FULL_CREDIT - MAX_HIT_POINTS - int(self.rule.param("max_score")) - 1

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        if event.record == PENALTY:
            return self._on_penalty(event, ctx)
        d = event.datum
        h = str(d["fixmedins_code"])
        if d["viol_flag"] or h in self.done or ctx.rng.random() >= self._rate():
            return [event]
        t = int(d["insp_time"])
        when = t + (3 + int(ctx.rng.random() * 8)) * DAY_MS
        if when >= ctx.generator.config.end_ms:
            return [event]
        amt = int(ctx.rng.lognormvariate(0.0, 0.8) * 50_000) * 100
        insp = SimEvent(event.record, event.key, {**d, "viol_flag": True, "viol_amt": amt,
                                                  "enddate": china_day(t)})
        self._serial += 1
        pen = SimEvent(PENALTY, event.key, {
            "event_id": ctx.new_event_id(), "pnsh_id": f"PN{d['admdvs']}{self._serial:06d}", "fixmedins_code": h,
            "admdvs": d["admdvs"], "pnsh_type": "TERMINATE_AGREEMENT", "fine_amt": 2 * amt,
            "insp_id": d["insp_id"], "pnsh_time": when,
        })
        self.done.add(h)
        self._anomaly(ctx, [insp, pen], h, [alert_id(self.rule_id, h, "credit")],
                      f"inspection {d['insp_id']} found {amt / 100:.2f} yuan; agreement terminated")
        ctx.schedule(when, pen)
        return [insp]

    def _on_penalty(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        """A base penalty (planted ones are scheduled, past the hooks) that takes its institution's
        penalty and fine points above :meth:`room` is made a termination: a planted case."""
        d = event.datum
        h = str(d["fixmedins_code"])
        points, fines = self._penalised.get(h, (0, 0))
        points, fines = points + PENALTY_POINTS.get(str(d["pnsh_type"]), 0), fines + int(d["fine_amt"])
        self._penalised[h] = (points, fines)
        total = points + min(MAX_FINE_POINTS, fines // FINE_FEN_PER_POINT)
        if h in self.done or total <= self.room() or self._rate() <= 0:
            return [event]
        pen = SimEvent(event.record, event.key, {**d, "pnsh_type": "TERMINATE_AGREEMENT"})
        self.done.add(h)
        self._anomaly(ctx, [pen], h, [alert_id(self.rule_id, h, "credit")],
                      f"{d['pnsh_type']} {d['pnsh_id']} (penalty and fine points {total} with the earlier ones) "
                      f"made a termination")
        return [pen]


FUND_PLANTERS: dict[str, type[Planter]] = {
    p.rule_id: p for p in (CapacityPlanter, NegativePlanter, SettledOverSoldPlanter, CreditLowPlanter)}

__all__ = ["FUND_PLANTERS", "CapacityPlanter", "CreditLowPlanter", "NegativePlanter", "SettledOverSoldPlanter",
           "closed_months"]
