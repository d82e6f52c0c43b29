"""Hospital-month and DRG-group rules, on the stay stream re-keyed by hospital and by DRG.

A person's settlements live on the settlement topic's partitions (key ``psn_no``); a hospital's or
a DRG group's stays are spread over all of them. The settlement engine therefore re-publishes each
inpatient stay (and each full reversal of one) to ``internal.stays-by-hospital`` (key
fixmedins_code) and ``internal.stays-by-drg`` (key drg_code): the Kafka way to re-partition.
These streams merge every settlement partition in whatever order its batches happen to be
produced, so the rules here judge in event time, never in arrival order: after all events are in,
the standing alerts (FIRED, not RETRACTED) depend only on the stays and reversals, not on arrival
order, partitioning, batch boundaries or records sent twice (within the allowed lateness L,
``allowed_lateness_days``).

* **YB-HOSP-UPCODE** (hospital stream): month m's CC/MCC share (CHS-DRG severity 1 or 3) against
  the months m − baseline_months … m − 1 that have at least ``min_cases`` stays (at least two of
  them), scored as a z value; m itself needs ``min_cases``. A change to month x re-judges months
  x … x + baseline_months: what holds now fires, a standing alert that no longer holds is retracted.
* **YB-HOSP-HIGHCOST** (DRG stream): the sample of a stay of month m is its group's other stays
  with setl_time in months m − sample_months + 1 … m; the stay is high-cost when
  amt × 1000 > median × median_multiple_pm with at least ``min_cases`` stays in that sample. A change
  to month x re-judges the stays of months x … x + sample_months − 1 (the high ones are a suffix of
  a month's sorted costs, so this is cheap) and reconciles: new ones fire, disproven ones retract.

Event time. Each group key keeps its watermark ``w``: the latest event time it has seen (a stay's
setl_time, a reversal's own time ``rt``); per key, not per partition, so what a group decides does
not depend on which other groups share its partition (a group whose stays stop keeps its last
months as they are: nothing moves its watermark). A month closes at ``month_end + L``: it counts its stays
and the reversals made by then. It stays *open* (every setl_id kept) until ``w`` passes
``month_end + 2L``, so that everything counting in it and arriving within the lateness is applied
whatever the order; then it is compacted to what later months need (hospital: the counts; DRG: the
sorted costs), and deleted once no open month uses it. Consequences, by design:

* a stay of a month no longer open is ignored (``late``): its group's figures are final;
* a reversal made after its month's close does not change the month's figures (share, sample), but
  a high-cost stay's own alert is still retracted, for a reversal made up to
  :data:`LATE_REVERSAL_DAYS` after the end of the stay's month (the month's alerts are kept that
  long); an UPCODE alert stands;
* a stay re-sent (a crash upstream) counts once (its setl_id is in the month); a reversal that
  overtakes its stay is remembered as ``null`` under the setl_id, so the stay is never counted.

State, in store ``hospital`` / ``drg``, per source partition (values plain JSON):

* ``<group>``: ``{"o": last source offset applied, "w": watermark (ms), "ms": months (YYYYMM)
  that have a bucket}``.
* ``<group>#m#<YYYYMM>``, one bucket per month of event time, so a batch rewrites only the months
  it touched: ``"o"`` (last offset applied to the bucket), ``"f"`` (the alerts of that month's
  window, streams/rules/alerts.py) and, while open, ``"s"``: setl_id → the stay (hospital
  ``[cc_mcc 0/1, amt]``; DRG ``[amt, setl_time, psn_token, mdtrt_id, fixmedins_code, admdvs]``,
  with a 7th element 1 once reversed after the close: in the sample, never alerted; ``0`` for such
  a reversal seen before its stay) or ``null`` (reversed); once compacted, ``"c"`` instead (hospital
  ``[cases, cc_mcc cases, cc_mcc amount]``; DRG the sorted costs, emptied once no open month needs
  them while its alerts are still kept). Values are bounded by a group's stays of a month.
* Derived, in memory only: per bucket its counts (hospital) or its sorted costs and alertable
  stays (DRG), and per open DRG month the sorted costs of its sample (the union of its months),
  kept up to date as costs come and go; built from the buckets when first needed (so after a
  restore, ``restored``, they are rebuilt from what was restored).

Exactly once: the group's ``o`` and each bucket's ``o`` guard redelivery (state.py); an event at
or below both is skipped. The buckets and the group record go out in the same changelog flush but
each holds what it needs: an event is applied to whichever of them has not seen its offset yet
(a crash between their writes), and alerts are reconciled with the month's state, so nothing
fires twice (alert events carry deterministic ids and generations).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from schemas.calendar import DAY_MS, month_bounds, month_of, prev_month

from .alerts import alert_datum, alert_id, fired_datum, next_generation, remember, retract
from .detectors import Finding
from .events import EngineEvent, EngineOutput
from .rulebook import RuleBook
from .state import Store

HIGH_SEVERITY = frozenset({"1", "3"})  # CHS-DRG: 1 with MCC, 3 with CC, 5 without, 9 not split
#: Separator of a group's month buckets in the store keys (never in a fixmedins_code or DRG code).
MONTH_SEP = "#m#"
#: How long after the end of a stay's month a (late) reversal still retracts its high-cost alert.
LATE_REVERSAL_DAYS = 180
#: Months a group rule looks back when its rule does not say (baseline_months, sample_months).
DEFAULT_SPAN = 3
_MISSING: Any = object()


def next_month(m: int) -> int:
    y, mo = divmod(m, 100)
    return (y + 1) * 100 + 1 if mo == 12 else y * 100 + mo + 1


@lru_cache(maxsize=4096)
def add_months(m: int, n: int) -> int:
    for _ in range(n):
        m = next_month(m)
    return m


@lru_cache(maxsize=4096)
def month_end(m: int) -> int:
    return month_bounds(m)[1]


def _span(rule: Any, name: str) -> int:
    return max(1, int(rule.params.get(name, DEFAULT_SPAN)))


class GroupedEngine:
    """``by`` is "hospital" or "drg": which re-keyed stream this instance consumes."""

    def __init__(self, book: RuleBook, store: Store, by: str, allowed_lateness_days: int = 35) -> None:
        self.book = book
        self.store = store
        self.stores = [store]
        self.reads: Mapping[str, frozenset[str]] = {}  # every record whole
        self.by = by
        self.kind = "drg_upcoding" if by == "hospital" else "high_cost"
        self.alert_kinds = frozenset({self.kind})
        self.lateness_ms = allowed_lateness_days * DAY_MS
        #: partition → bucket key → derived figures (see the module docstring)
        self._derived: dict[int, dict[str, Any]] = {}
        #: partition → DRG group → (month, sample_months) → sorted costs of that month's sample
        self._samples: dict[int, dict[str, dict[tuple[int, int], list[int]]]] = {}

    def restored(self, partition: int) -> None:
        """The derived figures are rebuilt from the restored buckets as they are needed."""
        self._derived.pop(partition, None)
        self._samples.pop(partition, None)

    def forget(self, partitions: Sequence[int]) -> None:
        self.store.forget(partitions)
        for p in partitions:
            self._derived.pop(p, None)
            self._samples.pop(p, None)

    def process(self, events: Sequence[EngineEvent]) -> EngineOutput:
        """Apply re-keyed stays (``record`` "Stay", the stay summary as ``datum``, keyed by hospital
        or DRG group in ``key``) and re-judge the months they change; a stay without a key has
        nothing to be grouped by."""
        out = EngineOutput()
        rules = self.book.current.enabled(self.kind)
        name = "baseline_months" if self.by == "hospital" else "sample_months"
        # months after a month whose judgement depends on it
        span = max((_span(r, name) for r in rules), default=DEFAULT_SPAN) - (self.by == "drg")
        for ev in events:
            if ev.key is not None:
                self._event(ev, ev.key, rules, span, out)
        return out

    # --- one event ----------------------------------------------------------------------------------
    def _event(self, ev: EngineEvent, k: str, rules: list[Any], span: int, out: EngineOutput) -> None:
        p, rec, offset = ev.partition, ev.datum, ev.offset
        rev = bool(rec["rev"])
        t = int(rec["t"])
        at = int(rec.get("rt", t)) if rev else t
        x = month_of(t)
        main = self.store.get(p, k) or {"o": -1, "w": 0, "ms": []}
        bkey = f"{k}{MONTH_SEP}{x}"
        bucket = self.store.get(p, bkey)
        # a bucket the group lists but the changelog lost (crash between writes) has seen nothing
        b_o = bucket["o"] if bucket is not None else -1 if x in main["ms"] else main["o"]
        if offset <= main["o"] and offset <= b_o:
            out.skipped += 1
            return
        if offset > main["o"]:
            main["o"] = offset
            if at > main["w"]:
                main["w"] = at
                self._housekeep(p, k, main, span)
            self.store.put(p, k, main)
        w = main["w"]
        end = month_end(x)
        if "s" not in bucket if bucket is not None else w > end + 2 * self.lateness_ms:
            # the month is no longer open: its figures are final
            if not rev:
                out.late += 1
            elif bucket is not None and self.by == "drg" and at <= end + LATE_REVERSAL_DAYS * DAY_MS:
                self._retract_stay(p, bkey, bucket, rec["s"], w, offset, out)
            return
        if bucket is None:
            bucket = {"o": -1, "s": {}, "f": {}}
            if x not in main["ms"]:
                main["ms"] = sorted([*main["ms"], x])
                self.store.put(p, k, main)
        if offset > bucket["o"]:
            bucket["o"] = offset
            if self.by == "hospital":
                self._count_hospital(p, bkey, bucket, rec, rev, at, end)
            else:
                self._count_drg(p, bkey, bucket, rec, rev, at, end)
            self.store.put(p, bkey, bucket)
        m = x
        for _ in range(span + 1):
            if m in main["ms"]:
                for rule in rules:
                    if self.by == "hospital":
                        self._judge_upcoding(rule, p, k, m, w, offset, out)
                    else:
                        self._judge_high_cost(rule, p, k, m, w, offset, out)
            m = next_month(m)

    def _housekeep(self, p: int, k: str, main: dict[str, Any], span: int) -> None:
        """Compact the months the watermark has closed; delete those no open month needs."""
        w, lateness = main["w"], self.lateness_ms
        keep = []
        for m in main["ms"]:
            bkey = f"{k}{MONTH_SEP}{m}"
            b = self.store.get(p, bkey)
            if b is None:
                continue
            end = month_end(m)
            changed = False
            if "s" in b and w > end + 2 * lateness:
                d = self._figures(p, bkey, b)
                b["c"] = list(d) if self.by == "hospital" else list(d[0])
                del b["s"]
                if self.by == "drg":
                    self._derived[p][bkey] = (b["c"], [])
                    self._forget_samples(p, k, m)  # a closed month is never judged again
                # nothing fires again in a closed month: its retracted alerts are done with
                b["f"] = {aid: e for aid, e in b["f"].items() if e["d"]["status"] == "FIRED"}
                changed = True
            if w > month_end(add_months(m, span)) + 2 * lateness:  # no open month uses its figures
                if self.by == "hospital" or not b["f"] or w > end + LATE_REVERSAL_DAYS * DAY_MS + lateness:
                    self.store.delete(p, bkey)
                    self._derived.get(p, {}).pop(bkey, None)
                    continue
                if b["c"]:  # the alerts stay for late reversals, the costs go
                    b["c"] = []
                    self._derived.get(p, {}).pop(bkey, None)
                    changed = True
            keep.append(m)
            if changed:
                self.store.put(p, bkey, b)
        main["ms"] = keep

    def _forget_samples(self, p: int, drg: str, m: int) -> None:
        cache = self._samples.get(p, {}).get(drg, {})
        for key in [key for key in cache if key[0] == m]:
            del cache[key]

    def _figures(self, p: int, bkey: str, b: dict[str, Any]) -> Any:
        """A bucket's derived figures: hospital ``[cases, cc_mcc, cc_mcc amount]``; DRG (sorted
        costs in the sample, sorted (cost, setl_id) of the stays that may alert)."""
        cache = self._derived.setdefault(p, {})
        d = cache.get(bkey)
        if d is not None:
            return d
        if self.by == "hospital":
            if "s" in b:
                live = [e for e in b["s"].values() if e is not None]
                d = [len(live), sum(e[0] for e in live), sum(e[1] for e in live if e[0])]
            else:
                d = list(b["c"])
        elif "s" in b:
            stays = [(e[0], s, len(e) == 6) for s, e in b["s"].items() if isinstance(e, list)]
            d = (sorted(a for a, _, _ in stays), sorted((a, s) for a, s, alertable in stays if alertable))
        else:
            d = (b["c"], [])
        cache[bkey] = d
        return d

    # --- DRG upcoding: a hospital's CC/MCC share this month against its own past months ----------
    def _count_hospital(self, p: int, bkey: str, b: dict[str, Any], rec: dict[str, Any], rev: bool, at: int,
                        end: int) -> None:
        s = rec["s"]
        stays = b["s"]
        d = self._figures(p, bkey, b)
        cur = stays.get(s, _MISSING)
        if not rev:
            if cur is _MISSING:
                high = int(rec["sev"] in HIGH_SEVERITY)
                stays[s] = [high, rec["amt"]]
                d[0] += 1
                d[1] += high
                d[2] += rec["amt"] if high else 0
        elif at <= end + self.lateness_ms:  # a reversal after the month's close leaves its figures
            stays[s] = None
            if cur is not _MISSING and cur is not None:
                d[0] -= 1
                d[1] -= cur[0]
                d[2] -= cur[1] if cur[0] else 0

    def _judge_upcoding(self, rule: Any, p: int, h: str, m: int, w: int, offset: int, out: EngineOutput) -> None:
        bkey = f"{h}{MONTH_SEP}{m}"
        bucket = self.store.get(p, bkey)
        if bucket is None or "s" not in bucket:
            return
        min_cases = int(rule.param("min_cases"))
        cur = self._figures(p, bkey, bucket)
        holds = False
        z = share = base_mean = 0.0
        if cur[0] >= min_cases:
            base: list[float] = []
            base_n = base_hi = 0
            pm = prev_month(m)
            for _ in range(int(rule.param("baseline_months"))):
                b = self.store.get(p, f"{h}{MONTH_SEP}{pm}")
                c = self._figures(p, f"{h}{MONTH_SEP}{pm}", b) if b is not None else None
                if c is not None and c[0] >= min_cases:
                    base.append(c[1] / c[0])
                    base_n += c[0]
                    base_hi += c[1]
                pm = prev_month(pm)
            if len(base) >= 2:
                share = cur[1] / cur[0]
                base_mean = math.fsum(base) / len(base)
                spread = math.sqrt(math.fsum((b - base_mean) ** 2 for b in base) / len(base))
                # a month of n cases varies by its binomial standard error even when nothing changed;
                # two or three baseline months alone underestimate that spread
                p0 = base_hi / base_n
                sd = max(spread, math.sqrt(p0 * (1 - p0) / cur[0]), 0.02)
                z = (share - base_mean) / sd
                # strictly above the threshold; the epsilon keeps float noise from deciding the boundary
                holds = z - int(rule.param("z_threshold_pm")) / 1000 > 1e-9
        standing = next((aid for aid, e in bucket["f"].items()
                         if e["d"]["status"] == "FIRED" and e["d"]["rule_id"] == rule.id), None)
        if holds and standing is None:
            aid = alert_id(rule.id, h, str(m))
            gen = next_generation(bucket, aid)
            assert gen is not None
            start, end = month_bounds(m)
            fd = Finding(rule, str(m), h, start, end, (), (), int(cur[2] * max(0.0, share - base_mean)
                                                                  / max(share, 1e-9)), {
                "month": str(m), "cases": str(cur[0]), "cc_mcc_share": f"{share:.3f}",
                "baseline_share": f"{base_mean:.3f}", "z": f"{z:.2f}",
            }, w)
            datum = alert_datum(fd, "settlement", h, None, None, gen)
            remember(bucket, datum, gen, end)
        elif not holds and standing is not None:
            datum = retract(bucket, standing, w, "later stays or reversals brought the share back within the baseline")
        else:
            return
        out.alerts.append((datum, p, offset))
        self.store.put(p, bkey, bucket)

    # --- abnormal high cost: a stay costing more than k × the median of its DRG group's sample -----
    def _count_drg(self, p: int, bkey: str, b: dict[str, Any], rec: dict[str, Any], rev: bool, at: int,
                   end: int) -> None:
        s = rec["s"]
        stays = b["s"]
        costs, alertable = self._figures(p, bkey, b)
        cur = stays.get(s, _MISSING)
        if not rev:
            if cur is _MISSING or cur == 0:
                amt = rec["amt"]
                stays[s] = [amt, rec["t"], rec["tok"], rec["m"], rec["h"], rec["r"]]
                insort(costs, amt)
                self._sampled(p, bkey, amt, +1)
                if cur == 0:
                    stays[s].append(1)  # reversed after the month's close: in the sample, never alerted
                else:
                    insort(alertable, (amt, s))
        elif at <= end + self.lateness_ms:
            stays[s] = None
            if isinstance(cur, list):
                costs.pop(bisect_left(costs, cur[0]))
                self._sampled(p, bkey, cur[0], -1)
                if len(cur) == 6:
                    alertable.pop(bisect_left(alertable, (cur[0], s)))
        elif at <= end + LATE_REVERSAL_DAYS * DAY_MS:
            if cur is _MISSING:
                stays[s] = 0
            elif isinstance(cur, list) and len(cur) == 6:
                cur.append(1)
                alertable.pop(bisect_left(alertable, (cur[0], s)))

    def _sampled(self, p: int, bkey: str, amt: int, sign: int) -> None:
        """A cost joins (+1) or leaves (-1) the month of ``bkey``: so it does the cached samples of
        the months whose sample includes it."""
        drg, m = bkey.rsplit(MONTH_SEP, 1)
        x = int(m)
        for (mm, months), xs in self._samples.get(p, {}).get(drg, {}).items():
            if x <= mm and add_months(x, months - 1) >= mm:
                if sign > 0:
                    insort(xs, amt)
                else:
                    xs.pop(bisect_left(xs, amt))

    def _sample(self, p: int, drg: str, m: int, months: int) -> list[int]:
        """Sorted costs of the stays in months m - months + 1 … m of the group (each stay's own
        included: a stay's sample is this without its cost)."""
        cache = self._samples.setdefault(p, {}).setdefault(drg, {})
        xs = cache.get((m, months))
        if xs is None:
            xs = []
            mm = m
            for _ in range(months):
                bkey = f"{drg}{MONTH_SEP}{mm}"
                b = self.store.get(p, bkey)
                if b is not None:
                    xs.extend(self._figures(p, bkey, b)[0])
                mm = prev_month(mm)
            xs.sort()
            cache[(m, months)] = xs
        return xs

    def _judge_high_cost(self, rule: Any, p: int, drg: str, m: int, w: int, offset: int,
                         out: EngineOutput) -> None:
        bkey = f"{drg}{MONTH_SEP}{m}"
        bucket = self.store.get(p, bkey)
        if bucket is None or "s" not in bucket:
            return
        multiple = int(rule.param("median_multiple_pm"))
        sample = self._sample(p, drg, m, _span(rule, "sample_months"))
        others = len(sample) - 1  # the sample of a stay leaves the stay out
        stays = bucket["s"]
        high: dict[str, int] = {}  # setl_id → the median it is judged against
        if others >= max(1, int(rule.param("min_cases"))):
            # the median of the others: the union's j-th cost, or the next one for a stay below it
            j = others // 2
            below, above = sample[j], sample[j + 1]
            for amt, s in reversed(self._figures(p, bkey, bucket)[1]):
                median = below if j < bisect_right(sample, amt) - 1 else above
                if amt * 1000 <= median * multiple:
                    break  # the high ones are a suffix of the month's sorted costs
                high[s] = median
        standing = {}
        for aid in bucket["f"]:
            fired = fired_datum(bucket, aid)
            if fired is not None and fired["rule_id"] == rule.id:
                standing[fired["setl_ids"][0]] = aid
        changed = False
        for s, aid in standing.items():
            if s in high:
                continue
            e = stays.get(s)
            reason = (f"settlement {s} fully reversed" if not isinstance(e, list) or len(e) > 6 else
                      f"no longer above {multiple / 1000:g} × the median of its DRG group's sample")
            out.alerts.append((retract(bucket, aid, w, reason), p, offset))
            changed = True
        for s, median in high.items():
            if s in standing:
                continue
            amt, t, tok, mdtrt, h, r = stays[s][:6]
            aid = alert_id(rule.id, tok, s)
            gen = next_generation(bucket, aid)
            if gen is None:
                continue
            fd = Finding(rule, s, h, t, t, (s,), (mdtrt,), amt - median, {
                "drg_code": drg, "cost": f"{amt / 100:.2f}", "group_median": f"{median / 100:.2f}",
                "group_cases": str(others),
            }, w)
            datum = alert_datum(fd, "settlement", tok, tok, r, gen)
            remember(bucket, datum, gen, t + LATE_REVERSAL_DAYS * DAY_MS)
            out.alerts.append((datum, p, offset))
            changed = True
        if changed:
            self.store.put(p, bkey, bucket)

    def _retract_stay(self, p: int, bkey: str, bucket: dict[str, Any], s: str, w: int, offset: int,
                      out: EngineOutput) -> None:
        """A reversal after its month closed: retract the stay's own alert, the figures stay."""
        for aid in list(bucket["f"]):
            fired = fired_datum(bucket, aid)
            if fired is not None and s in fired["setl_ids"]:
                out.alerts.append((retract(bucket, aid, w, f"settlement {s} fully reversed"), p, offset))
                self.store.put(p, bkey, bucket)
