"""Hospital-month and DRG-group rules, on the stay stream re-keyed by hospital and by DRG.

A person's settlements live on the settlement topic's partitions (key ``psn_no``); a hospital's or
a DRG group's stays are spread over all of them. The settlement engine therefore re-publishes each
inpatient stay (and each reversal of one) to ``internal.stays-by-hospital`` (key fixmedins_code)
and ``internal.stays-by-drg`` (key drg_code): the Kafka way to re-partition. Here one store per
stream keeps, per hospital, cases and CC/MCC cases per natural month, and per DRG group a bounded
sample of costs. Records may arrive twice after a crash upstream; ``seen`` (by setl_id) makes
applying them idempotent, and ``o`` guards redelivery of this stream itself (see state.py).
"""

from __future__ import annotations

import math
import statistics
from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import Any

from schemas.calendar import month_bounds, month_of, prev_month

from .alerts import alert_datum, alert_id, fired_datum, next_generation, remember, retract
from .detectors import Finding
from .events import EngineEvent, EngineOutput
from .rulebook import RuleBook
from .state import Store

HIGH_SEVERITY = frozenset({"1", "3"})  # CHS-DRG: 1 with MCC, 3 with CC, 5 without, 9 not split
SAMPLE = 600


class GroupedEngine:
    """``by`` is "hospital" or "drg": which re-keyed stream this instance consumes."""

    def __init__(self, book: RuleBook, store: Store, by: str) -> None:
        self.book = book
        self.store = store
        self.stores = [store]
        self.by = by
        self.alert_kinds = frozenset({"drg_upcoding" if by == "hospital" else "high_cost"})

    def restored(self, partition: int) -> None:
        """Nothing derived to rebuild: the store holds everything."""

    def forget(self, partitions: Sequence[int]) -> None:
        self.store.forget(partitions)

    def process(self, events: Sequence[EngineEvent]) -> EngineOutput:
        """Apply re-keyed stays (``record`` "Stay", the stay summary as ``datum``, keyed by hospital
        or DRG group in ``key``) in order; a stay without a key has nothing to be grouped by."""
        out = EngineOutput()
        kind = "drg_upcoding" if self.by == "hospital" else "high_cost"
        rules = self.book.current.enabled(kind)
        for ev in events:
            k, rec, partition, offset = ev.key, ev.datum, ev.partition, ev.offset
            if k is None:
                continue
            st = self.store.get(partition, k) or {"o": -1, "seen": {}, "f": {}, "months": {}, "costs": []}
            if offset <= st["o"]:
                out.skipped += 1
                continue
            st["o"] = offset
            if self.by == "hospital":
                self._hospital(rec, st, rules, partition, offset, out)
            else:
                self._drg(rec, st, rules, partition, offset, out)
            self.store.put(partition, k, st)
        return out

    # --- DRG upcoding: a hospital's CC/MCC share this month against its own past months ----------
    def _hospital(self, rec: dict[str, Any], st: dict[str, Any], rules: list[Any], partition: int,
                  offset: int, out: EngineOutput) -> None:
        s = rec["s"]
        months = st["months"]
        if rec["rev"]:
            seen = st["seen"].pop(s, None)
            if seen is None:
                return
            m, high, amt = seen
            c = months.get(str(m))
            if c is not None:
                c[0] -= 1
                c[1] -= high
                c[2] -= amt if high else 0
            for rule in rules:
                self._upcoding(rule, rec["h"], m, st, partition, offset, out, retract_at=rec.get("rt", rec["t"]))
            return
        if s in st["seen"]:
            return
        m = month_of(rec["t"])
        high = int(rec["sev"] in HIGH_SEVERITY)
        st["seen"][s] = [m, high, rec["amt"]]
        c = months.setdefault(str(m), [0, 0, 0])
        c[0] += 1
        c[1] += high
        c[2] += rec["amt"] if high else 0
        keep = sorted(months, key=int)[-24:]
        st["months"] = {mm: months[mm] for mm in keep}
        if len(st["seen"]) > 20_000:
            oldest = sorted(st["seen"].items(), key=lambda kv: kv[1][0])[:5_000]
            for sid, _ in oldest:
                del st["seen"][sid]
        for rule in rules:
            self._upcoding(rule, rec["h"], m, st, partition, offset, out, detected_at=rec["t"])

    def _upcoding(self, rule: Any, h: str, m: int, st: dict[str, Any], partition: int, offset: int,
                  out: EngineOutput, detected_at: int | None = None, retract_at: int | None = None) -> None:
        min_cases = int(rule.param("min_cases"))
        months = st["months"]
        cur = months.get(str(m))
        holds = False
        z = 0.0
        share = base_mean = 0.0
        if cur is not None and cur[0] >= min_cases:
            base: list[float] = []
            base_n = base_hi = 0
            pm = prev_month(m)
            for _ in range(int(rule.param("baseline_months"))):
                c = months.get(str(pm))
                if c is not None and c[0] >= min_cases:
                    base.append(c[1] / c[0])
                    base_n += c[0]
                    base_hi += c[1]
                pm = prev_month(pm)
            if len(base) >= 2:
                share = cur[1] / cur[0]
                base_mean = statistics.fmean(base)
                # a month of n cases varies by its binomial standard error even when nothing changed;
                # two or three baseline months alone underestimate that spread
                p0 = base_hi / base_n
                sd = max(statistics.pstdev(base), math.sqrt(p0 * (1 - p0) / cur[0]), 0.02)
                z = (share - base_mean) / sd
                # strictly above the threshold; the epsilon keeps float noise from deciding the boundary
                holds = z - int(rule.param("z_threshold_pm")) / 1000 > 1e-9
        aid = alert_id(rule.id, h, str(m))
        gen = next_generation(st, aid)
        start, end = month_bounds(m)
        if holds and gen is not None and detected_at is not None:
            assert cur is not None
            fd = Finding(rule, str(m), h, start, end, (), (), int(cur[2] * max(0.0, share - base_mean)
                                                                  / max(share, 1e-9)), {
                "month": str(m), "cases": str(cur[0]), "cc_mcc_share": f"{share:.3f}",
                "baseline_share": f"{base_mean:.3f}", "z": f"{z:.2f}",
            }, detected_at)
            datum = alert_datum(fd, "settlement", h, None, None, gen)
            remember(st, datum, gen, end)
            out.alerts.append((datum, partition, offset))
        elif not holds and fired_datum(st, aid) is not None and retract_at is not None:
            datum = retract(st, aid, retract_at, "reversals brought the share back within the baseline")
            out.alerts.append((datum, partition, offset))

    # --- abnormal high cost: a stay costing more than k × its DRG group's median ---------------
    def _drg(self, rec: dict[str, Any], st: dict[str, Any], rules: list[Any], partition: int, offset: int,
             out: EngineOutput) -> None:
        s = rec["s"]
        costs: list[int] = st["costs"]
        if rec["rev"]:
            amt = st["seen"].pop(s, None)
            if amt is None:
                return
            i = bisect_left(costs, amt)
            if i < len(costs) and costs[i] == amt:
                costs.pop(i)
            for aid in list(st["f"]):
                fired = fired_datum(st, aid)
                if fired is not None and s in fired["setl_ids"]:
                    datum = retract(st, aid, rec.get("rt", rec["t"]), f"settlement {s} fully reversed")
                    out.alerts.append((datum, partition, offset))
            return
        if s in st["seen"]:
            return
        for rule in rules:
            if len(costs) >= int(rule.param("min_cases")):
                median = costs[len(costs) // 2]
                if rec["amt"] * 1000 > median * int(rule.param("median_multiple_pm")):
                    aid = alert_id(rule.id, rec["tok"], s)
                    gen = next_generation(st, aid)
                    if gen is not None:
                        fd = Finding(rule, s, rec["h"], rec["t"], rec["t"], (s,), (rec["m"],),
                                     rec["amt"] - median, {
                                         "drg_code": rec["drg"], "cost": f"{rec['amt'] / 100:.2f}",
                                         "group_median": f"{median / 100:.2f}", "group_cases": str(len(costs)),
                                     }, rec["t"])
                        datum = alert_datum(fd, "settlement", rec["tok"], rec["tok"], rec["r"], gen)
                        remember(st, datum, gen, rec["t"])
                        out.alerts.append((datum, partition, offset))
        st["seen"][s] = rec["amt"]
        insort(costs, rec["amt"])
        if len(costs) > SAMPLE:
            # keep the sample bounded without biasing it: drop the extremes alternately
            costs.pop(0 if len(costs) % 2 else -1)
        if len(st["seen"]) > 5_000:
            for sid in list(st["seen"])[:1_000]:
                del st["seen"][sid]
        if len(st["f"]) > 2_000:
            for aid in list(st["f"])[:500]:
                del st["f"][aid]
