"""What every planter is made of: the planted-anomaly record, the plan a planter returns, the
Planter and EventPlanter bases, and the settlement arithmetic planters share (line fees, rebalancing
the money identities, copying). The planters of each rule are in ``planters`` (settlement rules),
``planters_procurement`` and ``planters_fund``; the guarantees they keep are described there.
"""


from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.calendar import DAY_MS
from streams.rules import Knowledge, Rule
from streams.rules.detectors import KINDS, entry_of, gather
from streams.settlement import age_at

if TYPE_CHECKING:  # the planting that drives every planter; it imports them
    from .planters import Planting

from .generator import (
    EventHook,
    HookContext,
    SimEvent,
)
from .reference import CATALOGUE

MIN_MS = 60_000
CNT = 10_000  # quantity scale 4
HALF_FEN = 50_000_000  # cnt × pric is at scale 10: half a fen
FEN = 100_000_000
EXTRA_SERIAL = 9_000_000_000  # setl_id serials of extra settlements (base ones count up from 1)
DISPENSE_MOV_SERIAL = 800_000_000_000  # mov_id serials of planted dispensing movements
DISPENSE_TRACE_SERIAL = 990_000_000  # unit serials of their traceability codes (the generator's stay far below)
RESERVE_MS = 60 * DAY_MS  # one anomaly per person per 60 days
INPATIENT = frozenset({"21", "22", "52"})
OUTPATIENT = frozenset({"11", "14"})
CLR_TYPE = {"11": "11", "14": "11", "21": "21", "41": "41"}
FUND_PARTS = ("hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay")
REVERSAL_MONEY = ("medfee_sumamt", "inscp_amt", *FUND_PARTS, "fund_pay_sumamt", "acct_pay", "psn_cash_pay")
#: Main diagnoses of planted low-threshold admissions (never used by the base traffic, so no
#: planted short stay can look like a split stay of a base one), with their ADRG.
LOW_THRESHOLD_DX = (("R07.400", "FV1"), ("R10.400", "GZ1"), ("R42.000", "BZ1"))
_SELF_PAID = frozenset(it.code for it in CATALOGUE if it.cls == 2)

#: Rule ids in the seed rule base order, each with its planter (filled below).
PLANTERS: dict[str, type[Planter]] = {}


class PlantError(ValueError):
    """A planting request that cannot be honoured (unknown rule id, bad rate)."""


# --- money and lines ----------------------------------------------------------------------------

def line_fee(cnt: int, pric: int) -> int:
    """Line amount in fen: cnt (scale 4) × pric (scale 6), rounded half up, as the generator does."""
    return (cnt * pric + HALF_FEN) // FEN


def rebalance(datum: dict[str, Any]) -> dict[str, Any]:
    """Re-derive a settlement's totals from its fee lines, in place; returns ``datum``.

    ``medfee_sumamt`` becomes the sum of the lines. Self-paid and over-limit parts are capped by
    it, ``inscp_amt`` is what remains (so ``inscp_amt <= medfee_sumamt``), the amount paid first
    by the person is capped by ``inscp_amt``. Fund parts are kept unless they exceed the total,
    then cut (assistance first, pooled fund last); the personal account is capped by what the
    fund left; the person pays the rest in cash. So ``fund_pay_sumamt`` is the sum of its parts
    and ``fund_pay_sumamt + acct_pay + psn_cash_pay == medfee_sumamt``.
    """
    medfee = sum(int(ln["det_item_fee_sumamt"]) for ln in datum["fee_details"])
    datum["medfee_sumamt"] = medfee
    ful = min(int(datum.get("fulamt_ownpay_amt") or 0), medfee)
    over = min(int(datum.get("overlmt_selfpay") or 0), medfee - ful)
    inscp = medfee - ful - over
    datum["fulamt_ownpay_amt"] = ful
    datum["overlmt_selfpay"] = over
    datum["inscp_amt"] = inscp
    datum["preselfpay_amt"] = min(int(datum.get("preselfpay_amt") or 0), inscp)
    parts = {k: max(0, int(datum.get(k) or 0)) for k in FUND_PARTS}
    excess = sum(parts.values()) - medfee
    for k in reversed(FUND_PARTS):
        if excess <= 0:
            break
        cut = min(excess, parts[k])
        parts[k] -= cut
        excess -= cut
    datum.update(parts)
    fund = sum(parts.values())
    datum["fund_pay_sumamt"] = fund
    acct = min(max(0, int(datum.get("acct_pay") or 0)), medfee - fund)
    datum["acct_pay"] = acct
    datum["psn_cash_pay"] = medfee - fund - acct
    return datum


def settle_new(datum: dict[str, Any], fund_rate_pm: int) -> dict[str, Any]:
    """Money of a settlement built from scratch: self-paid items out of scope, the pooled fund
    pays ``fund_rate_pm``‰ of the rest, the person the remainder in cash."""
    medfee = sum(int(ln["det_item_fee_sumamt"]) for ln in datum["fee_details"])
    ful = sum(int(ln["det_item_fee_sumamt"]) for ln in datum["fee_details"] if ln["hilist_code"] in _SELF_PAID)
    inscp = medfee - ful
    hifp = inscp * fund_rate_pm // 1000
    datum.update({
        "medfee_sumamt": medfee, "inscp_amt": inscp, "fulamt_ownpay_amt": ful, "overlmt_selfpay": 0,
        "preselfpay_amt": 0, "hifp_pay": hifp, "hifmi_pay": 0, "hifob_pay": 0, "maf_pay": 0,
        "fund_pay_sumamt": hifp, "acct_pay": 0, "psn_cash_pay": medfee - hifp,
    })
    return datum


def copy_settlement(datum: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to change: the generator keeps the emitted datum and its line list."""
    d = dict(datum)
    d["fee_details"] = [dict(ln) for ln in datum["fee_details"]]
    d["oprn_codes"] = list(datum.get("oprn_codes") or [])
    return d


def level_of(datum: Mapping[str, Any]) -> int:
    lv = str(datum["hosp_lv"])
    return int(lv) if lv.isdigit() else 9


# --- the rule base as the planters see it -------------------------------------------------------

class Catalogue:
    """Knowledge-table look-ups the planters need: prices, restrictions, drug classes, risks."""

    def __init__(self, k: Knowledge) -> None:
        self.k = k
        self.dup_codes = frozenset(c for p in k.duplicate_pairs for c in (p.primary, p.secondary))
        #: codes that can make a rule fire across settlements (repeat tests, day/6 h duplicate pairs,
        #: long-term drugs): never added to a settlement unless that is the anomaly
        self.cross_risk = frozenset(
            {*k.repeat_intervals,
             *(c for p in k.duplicate_pairs if p.scope != "visit" for c in (p.primary, p.secondary)),
             *(c for c, d in k.drugs.items() if d.long_term)})
        self.classes: dict[str, list[str]] = {}
        for code, d in sorted(k.drugs.items()):
            self.classes.setdefault(d.drug_class, []).append(code)
        #: classes for doctor shopping: no long-term generic, so excess prescribing cannot apply
        self.shop_classes = frozenset(c for c, codes in self.classes.items()
                                      if not any(k.drugs[x].long_term for x in codes))

    def name(self, code: str) -> str:
        return self.k.names.get(code, code)

    def cap(self, code: str, lv: int) -> int:
        caps = self.k.price_caps[code]
        return caps.get(lv, caps[3])

    def category(self, code: str) -> str:
        return self.k.categories.get(code, "other")

    def violations(self, code: str, gend: str, age: int, lv: int, inpatient: bool) -> set[str]:
        """Restriction kinds (sex, age, level, setting) a line of ``code`` breaks in this context."""
        r = self.k.restrictions.get(code)
        out: set[str] = set()
        if r is None:
            return out
        if r.sex and gend in ("MALE", "FEMALE") and r.sex != gend:
            out.add("sex")
        if (r.min_age is not None and age < r.min_age) or (r.max_age is not None and age > r.max_age):
            out.add("age")
        if r.min_hosp_lv and lv != 9 and lv < r.min_hosp_lv:
            out.add("level")
        if r.inpatient_only and not inpatient:
            out.add("setting")
        return out

    def days_x1000(self, code: str, cnt: int) -> int:
        """Days of supply of a drug line, as the excess-prescribing detector counts them."""
        d = self.k.drugs.get(code)
        if d is None or d.as_needed:
            return 0
        return int(cnt * d.days_per_unit * 1000 // CNT)

    def line(self, code: str, cnt: int, pric: int, t: int, dr: str | None, sn: int) -> dict[str, Any]:
        d = self.k.drugs.get(code)
        if d is not None:
            days: int | None = int(cnt * d.days_per_unit // CNT) or 1
        elif self.category(code) == "drug":
            days = 1
        else:
            days = None
        return {"feedetl_sn": f"{sn:04d}", "hilist_code": code, "hilist_name": self.name(code),
                "med_list_codg": code, "cnt": cnt, "pric": pric, "det_item_fee_sumamt": line_fee(cnt, pric),
                "fee_ocur_time": t, "bilg_dr_code": dr, "medc_days": days}


class Verifier:
    """Which settlement-stream rules hold on a set of settlements, by the rule base's own detectors.

    The settlements are replayed as one person's timeline (the engine's stateless kinds on each,
    then its person-history kinds on the timeline so far), so a planted anomaly is checked to make
    exactly its own rule fire.
    """

    def __init__(self, rules: Sequence[Rule], k: Knowledge, cat: Catalogue) -> None:
        self.k = k
        self.cat = cat
        enabled = [r for r in rules if r.enabled]
        self.stateless = [(r, KINDS[r.kind]) for r in enabled if KINDS[r.kind].stateless is not None]
        self.historic = [(r, KINDS[r.kind]) for r in enabled if KINDS[r.kind].historic is not None]
        self.excluded = frozenset(str(c)[:3] for r, _ in self.historic if r.kind == "split_stay"
                                  for c in r.param("exclude_diagnoses"))

    def fired(self, datums: Iterable[Mapping[str, Any]]) -> set[str]:
        out: set[str] = set()
        tl: list[dict[str, Any]] = []
        for s in sorted(datums, key=lambda d: int(d["setl_time"])):
            f = gather(dict(s), age_at(s["brdy"], s["setl_time"]), self.k, self.cat.dup_codes)
            xprov = s["insu_admdvs"][:2] != s["mdtrt_admdvs"][:2]
            for rule, kind in self.stateless:
                if (rule.applies_to(f.med_type, xprov) and kind.stateless is not None
                        and kind.stateless(rule, f, self.k)):
                    out.add(rule.id)
            entry = entry_of(f, self.excluded, self.k)
            bisect.insort(tl, entry, key=lambda e: int(e["t"]))
            for rule, kind in self.historic:
                if rule.applies_to(f.med_type, xprov) and kind.historic is not None \
                        and kind.historic(rule, entry, tl, self.k):
                    out.add(rule.id)
        return out


# --- planting -----------------------------------------------------------------------------------

@dataclass
class Anomaly:
    """Ground truth of one planted anomaly."""

    id: int
    rule_id: str
    setl_ids: list[str]
    event_ids: list[str]
    fixmedins_code: str
    note: str
    month: int | None = None
    reversed: bool = False
    #: business ids an alert names in its ``ref`` evidence (procurement: mov_id, dlv_id, cntr_id)
    refs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "setl_ids": list(self.setl_ids), "fixmedins_code": self.fixmedins_code,
                "month": self.month, "event_ids": list(self.event_ids), "note": self.note,
                "reversed": self.reversed, "refs": list(self.refs)}


@dataclass
class Plan:
    """What a planter proposes for one eligible settlement.

    ``now``: the settlement to emit instead of the original (a modified copy, or the original);
    ``later``: extra settlements to schedule; ``expect``: the rule ids that must hold, exactly, when
    the verifier replays ``now`` and ``later`` (default: the planter's own rule).
    """

    now: dict[str, Any]
    later: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    modified: bool = True
    expect: frozenset[str] | None = None


class Planter:
    """Base class: ``eligible`` is a cheap filter, ``plan`` builds the anomaly (or None)."""

    rule_id = ""

    def __init__(self, pl: Planting, rule: Rule) -> None:
        self.pl = pl
        self.rule = rule
        self.cat = pl.cat

    def record_hooks(self) -> dict[str, EventHook]:
        """Hooks on other records (procurement planters); settlement planters use ``plan``."""
        return {}

    def eligible(self, d: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        raise NotImplementedError

    # helpers
    def _add_line(self, d: dict[str, Any], code: str, cnt: int, pric: int, t: int, dr: str | None) -> None:
        d["fee_details"].append(self.cat.line(code, cnt, pric, t, dr, len(d["fee_details"]) + 1))

    @staticmethod
    def _doctor(d: Mapping[str, Any]) -> str | None:
        return next((ln["bilg_dr_code"] for ln in d["fee_details"] if ln.get("bilg_dr_code")), None)

    @staticmethod
    def _last_time(d: Mapping[str, Any]) -> int:
        return max(int(ln["fee_ocur_time"]) for ln in d["fee_details"])


class EventPlanter(Planter):
    """Base of the planters that work on one record type of the generated stream through an event
    hook (procurement, fund) instead of on settlements; their per-run state is reset when a
    generator run starts."""

    record = ""

    def __init__(self, pl: Planting, rule: Rule) -> None:
        super().__init__(pl, rule)
        self._ctx: HookContext | None = None

    def eligible(self, d: Mapping[str, Any]) -> bool:
        return False

    def plan(self, d: dict[str, Any], ctx: HookContext) -> Plan | None:
        return None

    def record_hooks(self) -> dict[str, EventHook]:
        return {self.record: self.hook}

    def hook(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        if ctx is not self._ctx:
            self.new_run(ctx)
        return self.on_event(event, ctx)

    def new_run(self, ctx: HookContext) -> None:
        self._ctx = ctx
        self.reset(ctx)

    def reset(self, ctx: HookContext) -> None:
        """Forget the previous run."""

    def on_event(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]:
        raise NotImplementedError

    def _rate(self) -> float:
        return float(self.pl.rate_of(self.rule_id))
