"""Planted anomalies: the ground truth the intelligent-monitoring rules are measured against.

One *planter* per rule of the seed rule base (``streams/rules/data/rules.toml``). Each is an
:class:`~yibao.sim.generator.EventHook` step that, at a configurable rate per eligible settlement, turns
that settlement into a violation of exactly its rule, or schedules the extra settlements that make
one (a second HbA1c a few days later, two more same-day visits elsewhere, a readmission within
the split-stay gap...). Items, prices, frequency limits, intervals and drug classes come from the
rule base's knowledge tables (:func:`streams.rules.load_knowledge`), so a changed table changes
what is planted.

Guarantees, each one what precision and recall per rule rest on:

* **Specific.** A planted anomaly violates its own rule and no other. Every candidate is checked
  with the rule base's own detectors (the stateless kinds on each planted settlement, the
  person-history kinds on a timeline of the planted settlements) and dropped unless exactly its
  rule holds. What that check cannot see, the rest of the person's history, is kept out of the
  way by design: one anomaly per person per 60 days, extra visits in the base visit's province,
  drug classes without a long-term generic for doctor shopping, diagnoses the base traffic never
  uses for low-threshold admissions, no consultation fees in extra visits.
* **Valid.** Planted settlements keep every identity the settlement validators check (money sums,
  fund parts, line sums, codes, dates): :func:`rebalance` re-derives the totals after lines change.
* **Deterministic, and the base traffic untouched.** Only ``ctx.rng`` is drawn from; modified
  settlements are copies (the generator keeps references to what it emitted, and the length of a
  line list even steers its reversals); extra settlements have their own id range
  (``ST<admdvs>9xxxxxxxxx``); planted new stays take the base traffic's severity mix, so they do
  not move a hospital's CC/MCC share. Every other event is emitted exactly as without planting.
* **Reversals.** A planted settlement that the base traffic later fully reverses is no violation
  any more (the engine retracts its alert): its anomaly is kept in the truth, marked ``reversed``,
  and evaluation ignores it. The full reversal of a modified settlement carries the amounts that
  were actually settled.
* **In the span.** An anomaly whose extra settlements would fall after the end is not planted.
* **Dispensed.** A planted settlement that bills more of a drug the institution keeps in stock
  than its original did comes with the movements of that quantity at the settlement's time, so
  the planted visit does not also look like a settlement beyond sales (YB-PSI-SETTLED-OVER-SOLD):
  a PURCHASE_IN (bought in for the patient) and the SALE_OUT with its own trace codes, both with
  their own mov_id and trace ranges. The generator's stock books are not touched (the base
  traffic stays as it is); the pair nets to zero in the inventory rule's running balance, which
  so keeps matching the generator's books (a sale alone would drive it below the stock-take
  tolerance wherever the generator sells its last unit). The pair supports the anomaly but is not
  part of it: its ``event_ids`` leave the pair out (it is in :attr:`Planting.dispensed_ids`), so a
  run that loses one of the two (the demo breaks 1% of all events on purpose) does not drop from
  the truth a violation the settlement rules still see in full.
* **Funded.** A planted settlement that costs the pooled fund more than its original did (an extra
  settlement: all it costs) comes with a contribution booking (FundIncome, the insutype's main
  income type, its own ``income_id`` ``FI<pool>PL<serial>``) of that extra × the generator's
  ``income_spending_ratio``, at the settlement's time: the generator books contributions for the
  spending it knows of only, and the planted spending alone took small pools' months into deficit
  (YB-FUND-NEGATIVE: a 510-yuan planted stay against 771 yuan of the month's own spending). In a
  pool × insutype × month planted for YB-FUND-NEGATIVE the booking is cut like the month's own
  contributions. Like the dispensing pair it supports the anomaly without being part of it: its
  event ids are in :attr:`Planting.funded_ids`, not in any ``event_ids``.

DRG upcoding is planted per hospital: in the last month the span covers (at least 4/5 of it, with
at least two covered months before it, as the detector needs two baseline months), every stay of a
chosen hospital coded without complications (severity digit 5) is coded 1 or 3 with probability
0.9. Chosen are hospitals with at least 1.25 × ``min_cases`` stays in two baseline months.

Ground truth (:meth:`Planting.truth`): one dict per anomaly, ``{"rule_id", "setl_ids",
"fixmedins_code", "month", "event_ids", "note", "reversed"}``; ``month`` (YYYYMM, China time) is
set for DRG upcoding, whose alert is per hospital and month. ``event_ids``: the events the
anomaly's detection rests on (a settlement rule's settlements, a procurement rule's movements);
lose one and no detector could find it.

Rate: the probability that an eligible settlement gets an anomaly. For DRG upcoding the unit is a
hospital-month: a hospital qualifying for the last month of the span is planted with probability
``1 - (1 - rate) ** n`` where ``n`` is its average monthly stays (each stay one trial).
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import math
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from schemas.calendar import CHINA_OFFSET_MS, DAY_MS, HOUR_MS, china_day, day_start_ms, month_of, prev_month
from streams.rules import RULES_FILE, Knowledge, Rule, check_rule, load_knowledge, load_rules_file
from streams.settlement import age_at

from ..jsonl import read_objects
from .generator import (
    INCOME,
    INVENTORY,
    MAX_TRACES,
    REVERSAL,
    SETTLEMENT,
    EventHook,
    HookContext,
    Institution,
    SimEvent,
    TrafficGenerator,
    trace_code,
)
from .planters_fund import FUND_PLANTERS, NegativePlanter
from .planters_procurement import PROCUREMENT_PLANTERS
from .planting import (
    CLR_TYPE,
    CNT,
    DISPENSE_MOV_SERIAL,
    DISPENSE_TRACE_SERIAL,
    EXTRA_SERIAL,
    FEN,
    INPATIENT,
    LOW_THRESHOLD_DX,
    MIN_MS,
    OUTPATIENT,
    PLANTERS,
    RESERVE_MS,
    REVERSAL_MONEY,
    Anomaly,
    Catalogue,
    Plan,
    Planter,
    PlantError,
    Verifier,
    copy_settlement,
    level_of,
    line_fee,
    rebalance,
    settle_new,
)
from .reference import CATALOGUE, CATALOGUE_INDEX


def _hospital_outpatient(d: Mapping[str, Any]) -> bool:
    return d["med_type"] in OUTPATIENT and d["fixmedins_code"].startswith("H")


class _Restricted(Planter):
    """A line whose restriction (sex, age, level, setting) the settlement breaks."""

    restriction = ""
    settings: frozenset[str] = OUTPATIENT

    def __init__(self, pl: Planting, rule: Rule) -> None:
        super().__init__(pl, rule)
        k = self.cat.k
        self.candidates = sorted(c for c, r in k.restrictions.items() if c not in self.cat.cross_risk and (
            (self.restriction == "sex" and r.sex) or (self.restriction == "age" and (r.min_age or r.max_age))
            or (self.restriction == "level" and r.min_hosp_lv) or (self.restriction == "setting" and r.inpatient_only)))

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in self.settings and (d["fixmedins_code"].startswith("H") or d["med_type"] == "41")

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        age = age_at(d["brdy"], d["setl_time"])
        lv = level_of(d)
        inp = d["med_type"] in INPATIENT
        pharmacy = d["med_type"] == "41"
        present = {ln["hilist_code"] for ln in d["fee_details"]}
        fits = [c for c in self.candidates if c not in present
                and self.cat.violations(c, d["gend"], age, lv, inp) == {self.restriction}
                and (not pharmacy or self.cat.category(c) == "drug")]
        if not fits:
            return None
        code = fits[int(ctx.rng.random() * len(fits))]
        new = copy_settlement(d)
        cnt = CNT
        drug = self.cat.k.drugs.get(code)
        if drug is not None and drug.days_per_unit < 1:
            cnt = math.ceil(7 / drug.days_per_unit) * CNT
        self._add_line(new, code, cnt, self.cat.cap(code, lv), self._last_time(d), self._doctor(d))
        rebalance(new)
        return Plan(new, note=f"{code} {self.cat.name(code)} ({self.restriction}: {d['gend']}, age {age}, "
                              f"level {lv}, med_type {d['med_type']})")


class SexPlanter(_Restricted):
    rule_id = "YB-LINE-SEX"
    restriction = "sex"
    settings = frozenset({"11", "14", "21"})


class AgePlanter(_Restricted):
    rule_id = "YB-LINE-AGE"
    restriction = "age"
    settings = frozenset({"11", "14", "41"})


class LevelPlanter(_Restricted):
    rule_id = "YB-LINE-LEVEL"
    restriction = "level"


class SettingPlanter(_Restricted):
    rule_id = "YB-LINE-SETTING"
    restriction = "setting"


class PricePlanter(Planter):
    """One capped line billed 20% above its cap."""

    rule_id = "YB-LINE-PRICE"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in CLR_TYPE

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        caps = self.cat.k.price_caps
        idx = [i for i, ln in enumerate(d["fee_details"]) if ln["hilist_code"] in caps]
        if not idx:
            return None
        i = idx[int(ctx.rng.random() * len(idx))]
        new = copy_settlement(d)
        ln = new["fee_details"][i]
        cap = self.cat.cap(ln["hilist_code"], level_of(d))
        ln["pric"] = cap * 1200 // 1000
        ln["det_item_fee_sumamt"] = line_fee(int(ln["cnt"]), int(ln["pric"]))
        rebalance(new)
        return Plan(new, note=f"{ln['hilist_code']} {ln['hilist_name']} at {ln['pric'] / 1e6:.2f} "
                              f"(cap {cap / 1e6:.2f})")


class DuplicatePlanter(Planter):
    """A stay billing a secondary item with its primary: biochemistry panel plus one of its tests,
    two nursing levels or two bed fees on one day."""

    rule_id = "YB-VISIT-DUP"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in INPATIENT

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        age = age_at(d["brdy"], d["setl_time"])
        lv = level_of(d)
        first: dict[str, dict[str, Any]] = {}
        for ln in d["fee_details"]:
            first.setdefault(ln["hilist_code"], ln)
        options = []
        for p in self.cat.k.duplicate_pairs:
            for have, add in ((p.primary, p.secondary), (p.secondary, p.primary)):
                if have in first and add not in first and add not in self.cat.k.repeat_intervals \
                        and not self.cat.violations(add, d["gend"], age, lv, True):
                    options.append((have, add, p.scope))
        if not options:
            return None
        have, add, scope = options[int(ctx.rng.random() * len(options))]
        new = copy_settlement(d)
        ln = first[have]
        self._add_line(new, add, CNT, self.cat.cap(add, lv), int(ln["fee_ocur_time"]), ln.get("bilg_dr_code"))
        rebalance(new)
        return Plan(new, note=f"{add} {self.cat.name(add)} billed with {have} {self.cat.name(have)} ({scope})")


class FrequencyPlanter(Planter):
    """An item limited per day (bed, nursing, consultation) billed twice on one day."""

    rule_id = "YB-DAY-FREQ"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in INPATIENT or _hospital_outpatient(d)

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        limits = self.cat.k.frequency_limits
        idx = [i for i, ln in enumerate(d["fee_details"]) if ln["hilist_code"] in limits]
        if not idx:
            return None
        i = idx[int(ctx.rng.random() * len(idx))]
        ln = d["fee_details"][i]
        code = ln["hilist_code"]
        new = copy_settlement(d)
        self._add_line(new, code, limits[code] * CNT, int(ln["pric"]), int(ln["fee_ocur_time"]),
                       ln.get("bilg_dr_code"))
        rebalance(new)
        return Plan(new, note=f"{code} {ln['hilist_name']} billed twice on day {china_day(int(ln['fee_ocur_time']))}")


class _Extra(Planter):
    """Planters that schedule extra settlements for the person of an eligible one."""

    def _visit(self, base: Mapping[str, Any], inst: Institution, t: int, codes: Sequence[tuple[str, int]],
               ctx: HookContext, mt: str | None = None) -> dict[str, Any]:
        """An outpatient visit (hospital) or purchase (pharmacy) of ``codes`` (code, cnt) at ``t``."""
        mt = mt or ("41" if inst.kind == "P" else "11")
        dr = inst.doctors[int(ctx.rng.random() * len(inst.doctors))] if inst.doctors else None
        lines = [self.cat.line(code, cnt, self.cat.cap(code, inst.level), t - 10 * MIN_MS, dr, i + 1)
                 for i, (code, cnt) in enumerate(codes)]
        d = self.pl.new_settlement(base, inst, mt, t, lines, ctx)
        return settle_new(d, 0 if mt == "41" else 500)

    def _at(self, day: int, ctx: HookContext, lo_h: float = 8.5, hi_h: float = 16.5) -> int:
        return day_start_ms(day) + int((lo_h + ctx.rng.random() * (hi_h - lo_h)) * HOUR_MS)


class RetestPlanter(_Extra):
    """The same interval-limited test (HbA1c, fructosamine) again a few days later, same hospital."""

    rule_id = "YB-PSN-RETEST"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return _hospital_outpatient(d)

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        iv = self.cat.k.repeat_intervals
        tests = [ln for ln in d["fee_details"] if ln["hilist_code"] in iv]
        if not tests:
            return None
        ln = tests[int(ctx.rng.random() * len(tests))]
        code = ln["hilist_code"]
        interval = iv[code]
        lo, hi = max(1, interval // 5), max(1, interval * 2 // 3)
        gap = lo + int(ctx.rng.random() * (hi - lo + 1))
        inst = self.pl.institution(d["fixmedins_code"])
        t = self._at(china_day(int(ln["fee_ocur_time"])) + gap, ctx)
        if inst is None or t - int(ln["fee_ocur_time"]) >= interval * DAY_MS:
            return None
        extra = self._visit(d, inst, t, [(code, CNT)], ctx, mt=d["med_type"])
        return Plan(d, [extra], note=f"{code} {ln['hilist_name']} again after {gap} days (min {interval})",
                    modified=False)


class ExcessSupplyPlanter(_Extra):
    """Another month's supply of the same long-term drug a few days after a refill."""

    rule_id = "YB-PSN-OVERRX"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in CLR_TYPE

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        drugs = self.cat.k.drugs
        window = int(self.rule.param("window_days"))
        limit = window * int(self.rule.param("factor_pm"))
        age = age_at(d["brdy"], d["setl_time"])
        lv = level_of(d)
        mt = "41" if d["med_type"] == "41" else "14"
        lines = [ln for ln in d["fee_details"] if ln["hilist_code"] in drugs and drugs[ln["hilist_code"]].long_term
                 and not drugs[ln["hilist_code"]].as_needed
                 and not self.cat.violations(ln["hilist_code"], d["gend"], age, lv, False)]
        if not lines:
            return None
        ln = lines[int(ctx.rng.random() * len(lines))]
        code = ln["hilist_code"]
        units = math.ceil(window / drugs[code].days_per_unit)
        s0 = self.cat.days_x1000(code, int(ln["cnt"]))
        if s0 + self.cat.days_x1000(code, units * CNT) <= limit:
            return None
        inst = self.pl.institution(d["fixmedins_code"])
        if inst is None:
            return None
        gap = 3 + int(ctx.rng.random() * 10)
        extra = self._visit(d, inst, self._at(china_day(int(d["setl_time"])) + gap, ctx), [(code, units * CNT)], ctx,
                            mt=mt)
        return Plan(d, [extra], modified=False,
                    note=f"{drugs[code].generic}: {s0 / 1000:g} days, then {units} more units {gap} days later")


class ShopDayPlanter(_Extra):
    """Two more visits the same day at two other institutions of the province."""

    rule_id = "YB-PSN-SHOP-1D"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in ("11", "14", "41") and (int(d["setl_time"]) + CHINA_OFFSET_MS) % DAY_MS < 18 * HOUR_MS

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        if self.pl.seen_today(d) > 1:
            return None
        need = int(self.rule.param("min_institutions")) - 1
        insts = self.pl.pick_institutions(d["mdtrt_admdvs"], {d["fixmedins_code"]}, need, ctx)
        if insts is None:
            return None
        t = int(d["setl_time"])
        extras = []
        for inst in insts:
            t += 20 * MIN_MS + int(ctx.rng.random() * 70 * MIN_MS)
            extras.append(self._visit(d, inst, t, [self.pl.simple_item(inst)], ctx))
        if china_day(t) != china_day(int(d["setl_time"])):
            return None
        return Plan(d, extras, modified=False,
                    note=f"{need + 1} institutions on day {china_day(t)}: " + ", ".join(
                        [d["fixmedins_code"], *(i.code for i in insts)]))


class ShopClassPlanter(_Extra):
    """The same drug class from four more institutions within the window (no long-term generic in
    the class, and at most the rule's days of supply per generic, so not excess prescribing)."""

    rule_id = "YB-PSN-SHOP-7D"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in ("11", "14", "41")

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        drugs = self.cat.k.drugs
        classes = sorted({drugs[ln["hilist_code"]].drug_class for ln in d["fee_details"]
                          if ln["hilist_code"] in drugs} & self.cat.shop_classes)
        if not classes:
            return None
        cls = classes[int(ctx.rng.random() * len(classes))]
        window = int(self.rule.param("window_days"))
        need = int(self.rule.param("min_institutions")) - 1
        insts = self.pl.pick_institutions(d["mdtrt_admdvs"], {d["fixmedins_code"]}, need, ctx)
        if insts is None:
            return None
        overrx = self.pl.rules.get("YB-PSN-OVERRX")
        budget_days = 30 * 1000 if overrx is None else \
            int(overrx.param("window_days")) * int(overrx.param("factor_pm"))
        used = {c: 0 for c in self.cat.classes[cls]}
        for ln in d["fee_details"]:
            if ln["hilist_code"] in used:
                used[ln["hilist_code"]] += self.cat.days_x1000(ln["hilist_code"], int(ln["cnt"]))
        days = sorted(ctx.rng.sample(range(1, window), need))
        age = age_at(d["brdy"], d["setl_time"])
        extras = []
        base_day = china_day(int(d["setl_time"]))
        for inst, k in zip(insts, days, strict=True):
            ok = [c for c in used if not self.cat.violations(c, d["gend"], age, inst.level, False)
                  and used[c] + self.cat.days_x1000(c, CNT) <= budget_days]
            if not ok:
                return None
            code = min(ok, key=lambda c: (used[c], c))
            used[code] += self.cat.days_x1000(code, CNT)
            extras.append(self._visit(d, inst, self._at(base_day + k, ctx), [(code, CNT)], ctx))
        return Plan(d, extras, modified=False,
                    note=f"class {cls} from {need + 1} institutions within {window} days")


class SplitStayPlanter(_Extra):
    """A readmission to the same hospital for the same condition within the gap."""

    rule_id = "YB-STAY-SPLIT"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in INPATIENT and d.get("dscg_date") is not None and bool(d.get("drg_code"))

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        dx = d.get("dscg_maindiag_code") or ""
        if any(dx.startswith(str(x)) for x in self.rule.param("exclude_diagnoses")) \
                or self.pl.upcoding_target(d) or dx[:3] in {x[:3] for x, _ in LOW_THRESHOLD_DX}:
            return None
        inst = self.pl.institution(d["fixmedins_code"])
        if inst is None:
            return None
        gap = 1 + int(ctx.rng.random() * min(14, int(self.rule.param("max_gap_days"))))
        los = 4 + int(ctx.rng.random() * 3)
        adm_day = int(d["dscg_date"]) + gap
        stay = self.pl.stay(d, inst, adm_day, los, dx, str(d["drg_code"])[:-1] + self.pl.severity(ctx), [], ctx)
        return Plan(d, [stay], modified=False, note=f"readmitted {gap} days after discharge, {dx}, {los} days")


class BedHangingPlanter(Planter):
    """Days with only bed and nursing fees before the stay's first treatment (admitted on paper)."""

    rule_id = "YB-STAY-BEDHANG"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in INPATIENT and d.get("adm_date") is not None

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        if self.pl.upcoding_target(d):
            return None
        idle = set(self.rule.param("idle_categories"))
        by_cat: dict[str, dict[str, Any]] = {}
        for ln in d["fee_details"]:
            by_cat.setdefault(self.cat.category(ln["hilist_code"]), ln)
        keep = [by_cat[c] for c in ("bed", "nursing") if c in by_cat and c in idle]
        if not keep:
            return None
        n = int(self.rule.param("min_days")) + int(ctx.rng.random() * 2)
        if not self.pl.cost_ok(d, extra=sum(int(x["det_item_fee_sumamt"]) for x in keep) * n):
            return None
        new = copy_settlement(d)
        adm = int(d["adm_date"])
        for j in range(n):
            ds = day_start_ms(adm - n + j)
            base = ds + (8 * HOUR_MS + int(ctx.rng.random() * 10 * HOUR_MS) if j == 0 else 7 * HOUR_MS)
            for i, ln in enumerate(keep):
                self._add_line(new, ln["hilist_code"], int(ln["cnt"]), int(ln["pric"]), base + i * 30 * MIN_MS,
                               ln.get("bilg_dr_code"))
        new["adm_date"] = adm - n
        rebalance(new)
        cats = ", ".join(sorted(self.cat.category(x["hilist_code"]) for x in keep))
        return Plan(new, note=f"{n} days with only {cats} fees before the first treatment")


class LowThresholdPlanter(_Extra):
    """A short admission, no surgery, mostly tests, a few days after an outpatient visit."""

    rule_id = "YB-STAY-LOWADM"
    #: blood count, urinalysis, ECG, chest DR, CRP, coagulation, biochemistry panel, ultrasound: about
    #: the same cost at every hospital level (CT or MRI at level 3 only would make these stays
    #: outliers of their own DRG group)
    TESTS = ("002501000010000", "002502000010000", "003103000010000", "002101000010000", "002503070010000",
             "002504000010000", "002503990010000", "002201000010000")

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return _hospital_outpatient(d)

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        inst = self.pl.institution(d["fixmedins_code"])
        if inst is None:
            return None
        age = age_at(d["brdy"], d["setl_time"])
        tests = [c for c in self.TESTS if c in self.cat.k.price_caps and c not in self.cat.cross_risk
                 and not self.cat.violations(c, d["gend"], age, inst.level, True)]
        if len(tests) < 4:
            return None
        max_los = int(self.rule.param("max_los_days"))
        los = 1 + int(ctx.rng.random() * max_los)
        dx, adrg = LOW_THRESHOLD_DX[int(ctx.rng.random() * len(LOW_THRESHOLD_DX))]
        adm_day = china_day(int(d["setl_time"])) + 1 + int(ctx.rng.random() * 3)
        if self.pl.upcoding_target_at(inst.code, day_start_ms(adm_day + los)):
            return None
        stay = self.pl.stay(d, inst, adm_day, los, dx, adrg + self.pl.severity(ctx), tests, ctx)
        return Plan(d, [stay], modified=False, note=f"{los}-day stay for {dx}, tests only")


class UpcodingPlanter(Planter):
    """Placeholder: DRG upcoding is planted per hospital-month by :class:`Planting` itself."""

    rule_id = "YB-HOSP-UPCODE"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return False

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        return None


class HighCostPlanter(Planter):
    """A stay inflated to about four times its DRG group's median cost with expensive drugs: the
    median of the group's stays in the rule's sample_months up to the stay's month, as judged."""

    rule_id = "YB-HOSP-HIGHCOST"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return d["med_type"] in INPATIENT and bool(d.get("drg_code")) and d.get("adm_date") is not None

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        if self.pl.upcoding_target(d):
            return None
        median = self.pl.drg_median(str(d["drg_code"]), int(self.rule.param("min_cases")) + 10, int(d["setl_time"]),
                                    int(self.rule.params.get("sample_months", 3)))
        if median is None:
            return None
        multiple = int(self.rule.param("median_multiple_pm"))
        target = median * (multiple + 1000) // 1000
        add = target - int(d["medfee_sumamt"])
        if add <= 0:
            return None
        age = age_at(d["brdy"], d["setl_time"])
        lv = level_of(d)
        k = self.cat.k
        items = sorted((self.cat.cap(c, lv), c) for c, cat in k.categories.items()
                       if cat == "drug" and c in k.price_caps and c not in k.drugs and c not in self.cat.dup_codes
                       and c not in k.frequency_limits and not self.cat.violations(c, d["gend"], age, lv, True))
        if not items:
            return None
        pric, code = items[-1 - int(ctx.rng.random() * min(2, len(items)))]
        units = -(-add * FEN // (pric * CNT)) + 1
        adm = int(d["adm_date"])
        dscg = int(d["dscg_date"]) if d.get("dscg_date") is not None else china_day(int(d["setl_time"]))
        days = max(1, dscg - adm)
        new = copy_settlement(d)
        dr = self._doctor(d)
        for j in range(days):
            u = units // days + (1 if j < units % days else 0)
            if u:
                self._add_line(new, code, u * CNT, pric, day_start_ms(adm + j) + 10 * HOUR_MS, dr)
        rebalance(new)
        return Plan(new, expect=frozenset(), note=f"{units} × {code} {self.cat.name(code)}: "
                    f"{new['medfee_sumamt'] / 100:.2f} vs DRG {d['drg_code']} median {median / 100:.2f}")


class GhostPlanter(_Extra):
    """The same card settling the same day in another province."""

    rule_id = "YB-PSN-GHOST"

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return (int(d["setl_time"]) + CHINA_OFFSET_MS) % DAY_MS < 19 * HOUR_MS

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        if self.pl.seen_today(d) > 1:
            return None
        inst = self.pl.pick_elsewhere(d["mdtrt_admdvs"][:2], ctx)
        if inst is None:
            return None
        t = int(d["setl_time"]) + 30 * MIN_MS + int(ctx.rng.random() * 150 * MIN_MS)
        if china_day(t) != china_day(int(d["setl_time"])):
            return None
        extra = self._visit(d, inst, t, [self.pl.simple_item(inst)], ctx)
        return Plan(d, [extra], modified=False,
                    note=f"{d['mdtrt_admdvs'][:2]} and {inst.admdvs[:2]} on day {china_day(t)}")


for _cls in (SexPlanter, AgePlanter, LevelPlanter, SettingPlanter, PricePlanter, DuplicatePlanter,
             FrequencyPlanter, RetestPlanter, ExcessSupplyPlanter, ShopDayPlanter, ShopClassPlanter,
             SplitStayPlanter, BedHangingPlanter, LowThresholdPlanter, UpcodingPlanter, HighCostPlanter,
             GhostPlanter):
    PLANTERS[_cls.rule_id] = _cls

PLANTERS.update(PROCUREMENT_PLANTERS)
PLANTERS.update(FUND_PLANTERS)  # ClickHouse monitor rules


class Planting:
    """The anomaly hooks of one generator run and their ground truth.

    ``TrafficGenerator(config, hooks=planting.hooks())``; after iterating the events,
    :meth:`truth` is the ground truth. A new ``events()`` pass starts over (same result).
    """

    def __init__(self, rules: Iterable[str] | str = "all", rate: float = 0.002,
                 rates: Mapping[str, float] | None = None, knowledge: Knowledge | None = None,
                 rule_base: Sequence[Rule] | None = None) -> None:
        base = list(rule_base) if rule_base is not None else load_rules_file(RULES_FILE, check_rule)
        self.rules: dict[str, Rule] = {r.id: r for r in base}
        wanted = parse_rules(rules, self.rules)
        for name, r in {"rate": rate, **(rates or {})}.items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1 or math.isnan(r):
                raise PlantError(f"{name}: a rate must be a number in [0, 1], got {r!r}")
        unknown = set(rates or {}) - set(self.rules)
        if unknown:
            raise PlantError(f"rates for unknown rule(s) {', '.join(sorted(unknown))}")
        self.rate = float(rate)
        self.rates = {k: float(v) for k, v in (rates or {}).items()}
        self.k = knowledge or load_knowledge()
        self.cat = Catalogue(self.k)
        self.verifier = Verifier(list(self.rules.values()), self.k, self.cat)
        self.wanted = [rid for rid in self.rules if rid in wanted]
        self.planters: list[Planter] = [PLANTERS[rid](self, self.rules[rid]) for rid in self.wanted
                                        if rid in PLANTERS and PLANTERS[rid] is not UpcodingPlanter]
        self.upcode = self.rules.get("YB-HOSP-UPCODE") if "YB-HOSP-UPCODE" in self.wanted else None
        self._ctx: HookContext | None = None
        #: event ids of every planted or involved settlement, filled as they are emitted (one set
        #: for the planting's life, emptied when a generator run starts over)
        self.planted_ids: set[str] = set()
        #: event ids of the PURCHASE_IN and SALE_OUT that planted settlements dispense with (see
        #: "Dispensed" above): planting added them, but no anomaly's detection rests on them
        self.dispensed_ids: set[str] = set()
        #: event ids of the contributions booked with planted settlements (see "Funded" above)
        self.funded_ids: set[str] = set()
        self._reset_state()

    # --- hooks ------------------------------------------------------------------------------
    def hooks(self) -> dict[str, list[EventHook]]:
        out: dict[str, list[EventHook]] = {SETTLEMENT: [self.on_settlement], REVERSAL: [self.on_reversal]}
        for pl in self.planters:
            for record, hook in pl.record_hooks().items():
                out.setdefault(record, []).append(hook)
        return out

    def generator(self, config: Any) -> TrafficGenerator:
        """A traffic generator with these hooks."""
        return TrafficGenerator(config, hooks=self.hooks())

    def _reset_state(self) -> None:
        self.anomalies: list[Anomaly] = []
        self.planted_ids.clear()
        self.dispensed_ids.clear()
        self.funded_ids.clear()
        self._by_setl: dict[str, list[Anomaly]] = {}
        self._modified: dict[str, dict[str, int]] = {}  # setl_id → amounts of a modified settlement
        self._reserved: dict[str, int] = {}
        self._serial = EXTRA_SERIAL
        self._today: dict[str, tuple[int, int]] = {}
        self._hosp_month: dict[tuple[str, int], int] = {}
        self._drg_costs: dict[str, list[int]] = {}
        self._drg_month_costs: dict[tuple[str, int], list[int]] = {}  # (DRG group, month) → costs
        self._upcode_month: int | None = None
        self._upcode_selected = False
        self._upcode_targets: dict[str, Anomaly] = {}
        self._insts: dict[str, Institution] = {}
        self._by_province: dict[str, list[Institution]] = {}
        self._end = 0
        self._mov_serial = DISPENSE_MOV_SERIAL
        self._trace_serial = DISPENSE_TRACE_SERIAL
        self._pools: dict[str, str] = {}  # insured region → its pooling region
        self._income_serial = 0
        self._fund_rng = random.Random(0)  # event ids of the funded contributions (not ``ctx.rng``)

    def _sync(self, ctx: HookContext) -> None:
        if ctx is self._ctx:
            return
        self._ctx = ctx
        self._reset_state()
        gen = ctx.generator
        self._end = gen.config.end_ms
        self._insts = {x.code: x for x in gen.institutions}
        self._pools = {r.code: r.pool for r in gen.regions}
        self._fund_rng = random.Random(f"{gen.config.seed}/anomalies/funded")
        for x in gen.institutions:
            self._by_province.setdefault(x.admdvs[:2], []).append(x)
        if self.upcode is not None:
            self._upcode_month = self._target_month(gen.config.start_ms, gen.config.end_ms,
                                                    int(self.upcode.param("baseline_months")))

    def rate_of(self, rule_id: str) -> float:
        return self.rates.get(rule_id, self.rate)

    def on_settlement(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        self._sync(ctx)
        d = event.datum
        out = event
        if self.upcode is not None and d["med_type"] in INPATIENT and d.get("drg_code"):
            out = self._upcoding(event, ctx)
        if out is event and self.planters:
            t = int(d["setl_time"])
            if self._reserved.get(d["psn_no"], -1) <= t:
                for pl in self.planters:
                    if not pl.eligible(d) or ctx.rng.random() >= self.rate_of(pl.rule_id):
                        continue
                    done = self._try(pl, event, ctx)
                    if done is not None:
                        out = done
                        break
        self._observe(out.datum)
        return [out]

    def on_reversal(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        """A full reversal of a planted settlement voids its anomaly and, when the settlement was
        modified, reverses the amounts actually settled (the generator knows only the original)."""
        self._sync(ctx)
        d = event.datum
        if not d.get("full_reversal"):
            return [event]
        for a in self._by_setl.get(d["init_setl_id"], ()):
            if a.rule_id != "YB-HOSP-UPCODE":
                a.reversed = True
        amounts = self._modified.get(d["init_setl_id"])
        if amounts is None:
            return [event]
        return [SimEvent(event.record, event.key, {**d, **amounts})]

    def _try(self, pl: Planter, event: SimEvent, ctx: HookContext) -> SimEvent | None:
        d = event.datum
        plan = pl.plan(d, ctx)
        if plan is None:
            return None
        if any(int(x["setl_time"]) >= self._end for x in plan.later):
            return None
        expect = plan.expect if plan.expect is not None else frozenset({pl.rule_id})
        if self.verifier.fired([plan.now, *plan.later]) != expect:
            return None
        dispense = self._dispensing([(plan.now, d)] if plan.modified else [], plan.later, ctx)
        now = SimEvent(event.record, event.key, plan.now) if plan.modified else event
        if plan.modified:
            self._modified[d["setl_id"]] = {k: plan.now[k] for k in REVERSAL_MONEY}
        extras = [SimEvent(SETTLEMENT, x["psn_no"], x) for x in plan.later]
        involved = [now, *extras]
        sales = [mv for x in dispense for mv in self._dispense(ctx, *x)]
        funds = self._funding([(plan.now, d)] if plan.modified else [], plan.later, ctx)
        a = Anomaly(len(self.anomalies) + 1, pl.rule_id, [e.datum["setl_id"] for e in involved],
                    [str(e.datum["event_id"]) for e in involved], d["fixmedins_code"], plan.note)
        self.dispensed_ids.update(str(mv.datum["event_id"]) for mv in sales)
        self.funded_ids.update(str(x.datum["event_id"]) for x in funds)
        self._record(a, involved, ctx)
        for x in (*extras, *sales, *funds):
            ctx.schedule(int(x.datum[{SETTLEMENT: "setl_time", INCOME: "book_time"}.get(x.record, "mov_time")]), x)
        self._reserved[d["psn_no"]] = max(int(x["setl_time"]) for x in (d, *plan.later)) + RESERVE_MS
        return now

    def _dispensing(self, modified: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
                    new: Sequence[Mapping[str, Any]], ctx: HookContext
                    ) -> list[tuple[Institution, int, int, Mapping[str, Any]]]:
        """What planted settlements dispense: (institution, catalogue index, quantity, settlement)
        for each drug its institution stocks that a settlement bills beyond what its original
        billed (``modified``: (planted, original) pairs; ``new``: extra settlements)."""
        stock = ctx.generator._stock
        out: list[tuple[Institution, int, int, Mapping[str, Any]]] = []
        for x, base in [*modified, *((x, None) for x in new)]:
            inst = self._insts.get(str(x["fixmedins_code"]))
            if inst is None:
                continue
            qty: dict[str, int] = {}
            for ln in x["fee_details"]:
                qty[ln["med_list_codg"]] = qty.get(ln["med_list_codg"], 0) + int(ln["cnt"])
            for ln in base["fee_details"] if base is not None else ():
                qty[ln["med_list_codg"]] = qty.get(ln["med_list_codg"], 0) - int(ln["cnt"])
            for code, n in qty.items():
                it_idx = CATALOGUE_INDEX.get(code)
                if n > 0 and it_idx is not None and stock[inst.index].get(it_idx) is not None:
                    out.append((inst, it_idx, n, x))
        return out

    def _dispense(self, ctx: HookContext, inst: Institution, it_idx: int, cnt: int,
                  x: Mapping[str, Any]) -> list[SimEvent]:
        """The PURCHASE_IN and SALE_OUT of a planted settlement's drug, shaped as the generator's."""
        gen = ctx.generator
        it = CATALOGUE[it_idx]
        prefix = gen._trace_prefix[it_idx]
        traces = []
        for _ in range(min(MAX_TRACES, max(1, cnt // CNT))):
            self._trace_serial += 1
            serial = self._trace_serial
            traces.append(trace_code(prefix, serial))
        out = []
        for kind, pric, codes in (("PURCHASE_IN", gen._purchase_pric(inst, it), []),
                                  ("SALE_OUT", gen._sale_pric(inst, it), traces)):
            self._mov_serial += 1
            out.append(SimEvent(INVENTORY, inst.code, {
                "event_id": ctx.new_event_id(), "mov_id": f"MV{self._mov_serial:012d}",
                "fixmedins_code": inst.code, "med_list_codg": it.code, "admdvs": inst.admdvs, "mov_type": kind,
                "cnt": cnt, "pric": pric, "drug_trac_codg": codes,
                "setl_id": x["setl_id"] if kind == "SALE_OUT" else None, "mov_time": int(x["setl_time"]),
            }))
        return out

    def _funding(self, modified: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
                 new: Sequence[Mapping[str, Any]], ctx: HookContext) -> list[SimEvent]:
        """The contributions booked with planted settlements (see "Funded" above): for each one that
        costs the fund more than its original (``modified``: (planted, original) pairs; ``new``:
        extra settlements), that extra × ``income_spending_ratio``, in its pool and month."""
        ratio = float(ctx.generator.config.income_spending_ratio)
        out = []
        for x, base in [*modified, *((x, None) for x in new)]:
            extra = int(x["fund_pay_sumamt"]) - (int(base["fund_pay_sumamt"]) if base is not None else 0)
            if extra <= 0:
                continue
            region, ins, t = str(x["insu_admdvs"]), str(x["insutype"]), int(x["setl_time"])
            pool = self._pools.get(region, region[:4] + "99")
            amt = math.ceil(extra * ratio * self._contribution_kept(pool, ins, month_of(t), ctx))
            self._income_serial += 1
            out.append(SimEvent(INCOME, pool, {
                "event_id": str(uuid.UUID(int=self._fund_rng.getrandbits(128), version=4)),
                "income_id": f"FI{pool}PL{self._income_serial:08d}", "insu_admdvs": pool, "insutype": ins,
                "income_type": MAIN_CONTRIBUTION.get(ins, "OTHER"), "income_amt": amt, "book_time": t,
            }))
        return out

    def _contribution_kept(self, pool: str, insutype: str, month: int, ctx: HookContext) -> float:
        """The share of its contributions a pool × insutype × month books (YB-FUND-NEGATIVE's cut)."""
        for p in self.planters:
            if isinstance(p, NegativePlanter):
                if p._ctx is not ctx:
                    p.new_run(ctx)
                return p.kept(pool, insutype, month)
        return 1.0

    def _record(self, a: Anomaly, events: Sequence[SimEvent], ctx: HookContext) -> None:
        self.anomalies.append(a)
        for e in events:
            self.planted_ids.add(str(e.datum["event_id"]))
            self._by_setl.setdefault(e.datum["setl_id"], []).append(a)
            ctx.plant(a.rule_id, e, f"#{a.id} {a.note}")

    # --- observation of the emitted traffic ---------------------------------------------------
    def _observe(self, d: Mapping[str, Any]) -> None:
        t = int(d["setl_time"])
        day = china_day(t)
        prev = self._today.get(d["psn_no"])
        self._today[d["psn_no"]] = (day, prev[1] + 1 if prev is not None and prev[0] == day else 1)
        if d["med_type"] in INPATIENT and d.get("drg_code"):
            key = (d["fixmedins_code"], month_of(t))
            self._hosp_month[key] = self._hosp_month.get(key, 0) + 1
            bisect.insort(self._drg_costs.setdefault(str(d["drg_code"]), []), int(d["medfee_sumamt"]))
            self._drg_month_costs.setdefault((str(d["drg_code"]), month_of(t)), []).append(int(d["medfee_sumamt"]))

    def seen_today(self, d: Mapping[str, Any]) -> int:
        """Settlements of this person already emitted on this settlement's day (itself excluded)."""
        prev = self._today.get(d["psn_no"])
        return prev[1] + 1 if prev is not None and prev[0] == china_day(int(d["setl_time"])) else 1

    def drg_median(self, drg: str, min_cases: int, t: int | None = None, months: int = 1) -> int | None:
        """Median cost of the DRG group's stays emitted so far; with ``t``, of those settled in the
        ``months`` months up to ``t``'s (YB-HOSP-HIGHCOST's sample, streams/rules/grouped.py)."""
        costs = self._drg_costs.get(drg)
        if t is not None:
            costs, m = [], month_of(t)
            for _ in range(months):
                costs.extend(self._drg_month_costs.get((drg, m), ()))
                m = prev_month(m)
            costs.sort()
        if not costs or len(costs) < min_cases:
            return None
        return costs[len(costs) // 2]

    def cost_ok(self, d: Mapping[str, Any], extra: int) -> bool:
        """Adding ``extra`` fen keeps a stay well below the high-cost threshold of its DRG group."""
        rule = self.rules.get("YB-HOSP-HIGHCOST")
        if rule is None or not d.get("drg_code"):
            return True
        median = self.drg_median(str(d["drg_code"]), 1)
        if median is None:
            return False
        return (int(d["medfee_sumamt"]) + extra) * 1000 < median * int(rule.param("median_multiple_pm")) * 2 // 3

    # --- institutions ---------------------------------------------------------------------------
    def institution(self, code: str) -> Institution | None:
        return self._insts.get(code)

    def pick_institutions(self, admdvs: str, exclude: set[str], n: int, ctx: HookContext
                          ) -> list[Institution] | None:
        """``n`` distinct institutions of the province, preferring the city, none in ``exclude``."""
        pool = [x for x in self._by_province.get(admdvs[:2], []) if x.code not in exclude]
        if len(pool) < n:
            return None
        city = [x for x in pool if x.admdvs[:4] == admdvs[:4]]
        chosen: list[Institution] = []
        for group in (city, [x for x in pool if x.admdvs[:4] != admdvs[:4]]):
            group = list(group)
            while group and len(chosen) < n:
                chosen.append(group.pop(int(ctx.rng.random() * len(group))))
        return chosen

    def pick_elsewhere(self, province: str, ctx: HookContext) -> Institution | None:
        provinces = sorted(p for p in self._by_province if p != province)
        if not provinces:
            return None
        insts = self._by_province[provinces[int(ctx.rng.random() * len(provinces))]]
        return insts[int(ctx.rng.random() * len(insts))]

    @staticmethod
    def severity(ctx: HookContext) -> str:
        """CHS-DRG severity digit of a planted new stay, in the base traffic's mix (10% with MCC, 25%
        with CC), so planted stays leave hospitals' CC/MCC shares, which upcoding watches, as they are."""
        u = ctx.rng.random()
        return "1" if u < 0.10 else "3" if u < 0.35 else "5"

    def simple_item(self, inst: Institution) -> tuple[str, int]:
        """What an extra visit bills: a blood count at a hospital, face masks at a pharmacy."""
        return ("002501000010000", CNT) if inst.kind == "H" else ("C1402050060000066789", 10 * CNT)

    # --- new settlements ------------------------------------------------------------------------
    def new_settlement(self, base: Mapping[str, Any], inst: Institution, mt: str, t: int,
                       lines: list[dict[str, Any]], ctx: HookContext) -> dict[str, Any]:
        self._serial += 1
        n = self._serial
        return {
            "event_id": ctx.new_event_id(),
            "setl_id": f"ST{inst.admdvs}{n:010d}",
            "mdtrt_id": f"MD{inst.admdvs}{n:010d}",
            "psn_no": base["psn_no"], "psn_cert_no": base["psn_cert_no"], "psn_name": base.get("psn_name"),
            "gend": base["gend"], "brdy": base["brdy"], "insutype": base["insutype"],
            "med_type": mt, "fixmedins_code": inst.code, "hosp_lv": inst.hosp_lv,
            "insu_admdvs": base["insu_admdvs"], "mdtrt_admdvs": inst.admdvs, "setl_time": t,
            "clr_type": CLR_TYPE.get(mt, mt), "dscg_maindiag_code": None, "adm_date": None, "dscg_date": None,
            "drg_code": None, "oprn_codes": [], "fee_details": lines,
        }

    def stay(self, base: Mapping[str, Any], inst: Institution, adm_day: int, los: int, dx: str, drg: str,
             tests: Sequence[str], ctx: HookContext) -> dict[str, Any]:
        """An inpatient stay of ``los`` days: bed and nursing every day, and either a daily
        infusion (no ``tests``) or, for a low-threshold admission, ``tests`` on admission and one
        more each day. No consultation fee (it pairs with outpatient consultations)."""
        cat = self.cat
        lv = inst.level
        dr = inst.doctors[int(ctx.rng.random() * len(inst.doctors))] if inst.doctors else None
        adm = day_start_ms(adm_day) + 8 * HOUR_MS + int(ctx.rng.random() * 8 * HOUR_MS)
        lines: list[dict[str, Any]] = []

        def add(code: str, cnt: int, t: int) -> None:
            lines.append(cat.line(code, cnt, cat.cap(code, lv), t, dr, len(lines) + 1))

        bed, nursing = "001103000010001", "001201000020000"
        for j in range(los):
            ds = day_start_ms(adm_day + j)
            t = adm if j == 0 else ds + 7 * HOUR_MS
            add(bed, CNT, t)
            add(nursing, CNT, t + 30 * MIN_MS)
            if tests:
                for i, code in enumerate(tests if j == 0 else tests[j % 2: j % 2 + 1]):
                    add(code, CNT, t + (i + 2) * 15 * MIN_MS)
            else:
                add("XB05BBL051B056012702861", CNT, t + 2 * HOUR_MS)  # 0.9% saline
                add("001211000030000", CNT, t + 2 * HOUR_MS)  # intravenous infusion
        dscg_day = adm_day + los
        t = day_start_ms(dscg_day) + 9 * HOUR_MS + int(ctx.rng.random() * 6 * HOUR_MS)
        d = self.new_settlement(base, inst, "21", t, lines, ctx)
        d.update({"dscg_maindiag_code": dx, "adm_date": adm_day, "dscg_date": dscg_day, "drg_code": drg})
        return settle_new(d, 800)

    # --- DRG upcoding: a hospital's last month ------------------------------------------------
    @staticmethod
    def _target_month(start_ms: int, end_ms: int, baseline: int) -> int | None:
        """The last month the span covers (at least 4/5 of it) if at least two of the ``baseline``
        months before it are covered too (the detector needs two baseline months); else None."""
        covered: dict[int, int] = {}
        for day in range(china_day(start_ms), china_day(end_ms - 1) + 1):
            m = month_of(day_start_ms(day))
            covered[m] = covered.get(m, 0) + 1
        good = sorted(m for m, n in covered.items() if n * 5 >= 4 * _days_in_month(m))
        if not good:
            return None
        target = good[-1]
        if sum(1 for m in _months_before(target, baseline) if m in good) < 2:
            return None
        return target

    def upcoding_target_at(self, h: str, t: int) -> bool:
        if self.upcode is None or self._upcode_month is None or month_of(t) != self._upcode_month:
            return False
        # before the month's first stay, any hospital may still become a target
        return not self._upcode_selected or h in self._upcode_targets

    def upcoding_target(self, d: Mapping[str, Any]) -> bool:
        return self.upcoding_target_at(d["fixmedins_code"], int(d["setl_time"]))

    def _upcoding(self, event: SimEvent, ctx: HookContext) -> SimEvent:
        assert self.upcode is not None
        d = event.datum
        m = month_of(int(d["setl_time"]))
        if self._upcode_month is None or m != self._upcode_month:
            return event
        if not self._upcode_selected:
            self._select_upcoding(m, ctx)
        a = self._upcode_targets.get(d["fixmedins_code"])
        drg = str(d["drg_code"])
        if a is None or not drg.endswith("5") or ctx.rng.random() >= 0.9:
            return event
        new = dict(d)
        new["drg_code"] = drg[:-1] + ("1" if ctx.rng.random() < 0.3 else "3")
        ev = SimEvent(event.record, event.key, new)
        a.setl_ids.append(new["setl_id"])
        a.event_ids.append(str(new["event_id"]))
        self.planted_ids.add(str(new["event_id"]))
        self._by_setl.setdefault(new["setl_id"], []).append(a)
        ctx.plant(a.rule_id, ev, f"#{a.id} {drg} coded {new['drg_code']}")
        return ev

    def _select_upcoding(self, m: int, ctx: HookContext) -> None:
        assert self.upcode is not None
        self._upcode_selected = True
        min_cases = int(self.upcode.param("min_cases"))
        months = _months_before(m, int(self.upcode.param("baseline_months")))
        rate = self.rate_of(self.upcode.id)
        for h in sorted({h for h, _ in self._hosp_month}):
            # like the detector, at least two baseline months with enough cases (here with a margin,
            # so that the planted month, expected as large, reaches the minimum too)
            counts = [n for n in (self._hosp_month.get((h, mm), 0) for mm in months) if n >= min_cases * 5 // 4]
            if len(counts) < 2:
                continue
            mean = sum(counts) / len(counts)
            if ctx.rng.random() < 1 - (1 - rate) ** mean:
                a = Anomaly(len(self.anomalies) + 1, self.upcode.id, [], [], h,
                            f"CC/MCC severity coded for most stays of {m} (baseline {min(counts)}+ stays a month)",
                            month=m)
                self.anomalies.append(a)
                self._upcode_targets[h] = a

    # --- results --------------------------------------------------------------------------------
    def truth(self) -> list[dict[str, Any]]:
        return [a.to_dict() for a in self.anomalies if a.setl_ids or a.refs]

    def write_truth(self, path: Path) -> int:
        rows = self.truth()
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        return len(rows)


#: The contribution a planted settlement's fund spending is matched with, per insutype (the
#: generator's main income type of each, ``_INCOME_MIX``)
MAIN_CONTRIBUTION = {"310": "EMPLOYER", "390": "FISCAL_SUBSIDY"}


def _months_before(m: int, n: int) -> list[int]:
    """The ``n`` months (YYYYMM) before ``m``, latest first."""
    out = []
    for _ in range(n):
        m = m - 1 if m % 100 > 1 else m - 89
        out.append(m)
    return out


def _days_in_month(m: int) -> int:
    y, mo = divmod(m, 100)
    nxt = dt.date(y + (mo == 12), mo % 12 + 1, 1)
    return (nxt - dt.date(y, mo, 1)).days


def parse_rules(spec: Iterable[str] | str, known: Mapping[str, Any] | Iterable[str]) -> set[str]:
    """``"all"``, ``"none"``, or rule ids (a comma-separated string or an iterable) → a set of ids."""
    names = list(known)
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    ids = set(spec)
    if ids == {"all"}:
        return set(names)
    if ids <= {"none"}:
        return set()
    unknown = ids - set(names)
    if unknown:
        raise PlantError(f"unknown rule id(s) {', '.join(sorted(unknown))}; known: {', '.join(names)}")
    return ids


def read_truth(path: Path) -> list[dict[str, Any]]:
    """Ground truth written by :meth:`Planting.write_truth` (JSON lines)."""
    return read_objects(path, frozenset({"rule_id"}), "a planted anomaly")


__all__ = ["PLANTERS", "REVERSAL_MONEY", "Anomaly", "Catalogue", "PlantError", "Planting", "Verifier",
           "copy_settlement", "parse_rules", "read_truth", "rebalance", "settle_new"]

