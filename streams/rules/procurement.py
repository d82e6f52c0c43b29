"""Procurement-stream rules (药品和医用耗材招采): purchase-sale-inventory, traceability, volume, payment.

The procurement topic is keyed by ``fixmedins_code``, so everything one institution does (its
contracts, orders, deliveries, inventory movements and supplier payments) is on one partition. It
is not necessarily in event-time order: a movement or a payment may be reported late. Every rule
judges in **event time**, so that once all events are in, the alerts that stand (FIRED and not
RETRACTED) depend only on the events, not on their arrival order within the allowed lateness nor
on batch boundaries. A rule fires on what is known and re-publishes the alert as RETRACTED when a
later-arriving event disproves it (alert ids are ``uuid5(rule | institution | key)``: a firing,
its retraction and a re-firing are versions of one alert, ``detected_at`` increasing).

Watermark and lateness: the partition's watermark ``W`` is the latest event time seen on it (after
a restore, see "Exactly once" below); ``L`` is ``allowed_lateness_days``. An event older
than ``W - L`` is *late* (counted in ``EngineOutput.late``). Memory older than ``W - L`` is folded
or forgotten, which is exact for every event that is not late. What a late event does is said per
rule below.

* **YB-PSI-OVERSELL** (进销存): per institution and drug, the books in event-time order (mov_time,
  tie-break mov_id): the last STOCKTAKE at or before a movement sets the balance and the inflow;
  PURCHASE_IN / PURCHASE_RETURN move both, SALE_OUT / SALE_RETURN the balance. A SALE_OUT leaving
  the balance below ``-tolerance`` (``tolerance_pm`` of the inflow at that point) breaks the books;
  the first breaking sale of an episode (from a stock-take to the next) carries the alert, key
  ``drug|mov_id``. Before a drug's first stock-take nothing is judged. A movement arriving out of
  order re-books the stretch from it to the next stock-take and reconciles the episodes it touches
  (fire the first breaking sale, retract an alert on a sale that no longer is). Movements older
  than ``W - L`` are folded into a base. A late movement (older than ``W - L``): a STOCKTAKE is
  ignored (the movements after it are already folded); a movement older than the last folded
  stock-take is ignored (the count includes it); any other is booked right after the folded base,
  i.e. as if made at ``W - L`` (before every held movement): it moves the balances held and can
  break the open episode, but judgments of folded sales are final. A movement re-sent with the
  same mov_id and mov_time is booked once (only while held, not once folded).
* **YB-PSI-TRACE-DUP**: a SALE_OUT of a traceability code whose previous event for that code in
  event-time order is a SALE_OUT (not a SALE_RETURN) sold within ``retention_days`` (China days)
  before it, or a code listed twice in one sale, is a duplicate; the alert is keyed by that later
  sale's mov_id. The same mov_id is the same sale, never a duplicate of itself. A sale or return
  arriving out of order re-judges itself and the next sale of each of its codes. Codes are
  remembered ``retention_days + L`` days back from ``W``. A late movement is remembered (when its day
  still is) and judged itself, but the sales after it are not re-judged (final).
* **YB-PROC-VOLUME-LAG**: each contract is judged at each China midnight of its cycle after it was
  signed (up to the cycle's end), once the watermark reaches it: purchased = the orders counting
  towards it with ``ord_time`` before that midnight (an order names its contract, or counts towards
  the institution's contract for the product whose cycle contains it, the smallest cntr_id if
  several; orders before the contract's sign_time do not count), against the elapsed share of the
  cycle, when the volume behind is worth ``min_shortfall_yuan`` and is at least one whole unit. One
  alert per contract and month (key ``cntr_id|YYYYMM``, the month of the day that ended):
  it stands while a midnight of that month lags, and carries the first one. An order or contract
  arriving out of order re-judges the midnights it changes (an order only those after it). Orders
  older than ``W - L`` are folded into the contract's base. A late order counts towards the
  midnights not older than ``W - L`` (re-judged), not the earlier ones (final); a contract first
  seen late is ignored (the orders it would count are gone).
* **YB-PROC-PAY-OVERDUE**: a delivery's alert stands when ``W`` is past ``acpt_time + days`` and no
  payment with ``pay_time <= acpt_time + days`` is known (a payment after the deadline keeps or
  fires it); a timer fires it when the watermark passes the deadline, and a payment in time arriving
  later retracts it. A delivery is remembered until ``W`` passes ``acpt + days + L``; a payment
  arriving before its delivery is remembered until ``W`` passes ``pay_time + L``. A delivery
  arriving after ``acpt + days + L`` is ignored.

State. The ``procurement`` store keeps, per partition:

* key ``<fixmedins_code>`` (the institution): ``v`` (format, 2), ``o`` (last source offset applied),
  ``t`` (its latest event time), ``w`` (the partition's watermark after its last event; the region
  its alerts carry is its code's, :func:`region_of`), ``c`` (contracts: ``cntr_id → [drug,
  agreed_volume, cycle start ms, cycle end ms, sign_time, winning unit price, purchased by folded
  orders, last midnight judged]``), ``po``
  (orders held, by time: ``[ord_time, ord_id, drug, cntr_id or "", purc_cnt]``), ``d``
  (deliveries: ``dlv_id → [acpt_time, dlv_amt, splr_code, earliest pay_time known or null]``),
  ``py`` (payments whose delivery is not known yet: ``dlv_id → earliest pay_time``), ``td`` (the
  days with a trace bucket) and ``f`` (the trace, volume and payment alerts,
  streams/rules/alerts.py: latest datum, generation, expiry; a volume alert's entry also has
  ``at``, its first lagging midnight).
* key ``<fixmedins_code>#inv#<drug>`` (a drug's books): ``o``, ``b`` (the folded base: ``[balance or
  null before a stock-take, inflow, cmax, time of the last folded stock-take, episode]``), ``m``
  (movements held, by (mov_time, mov_id): ``[t, mov_id, kind, cnt, pric, setl_id, balance after,
  inflow after, crit, cmax, episode]``; a sale breaks the books for a tolerance_pm below its
  ``crit``, ``cmax`` is the running maximum of ``crit`` within the episode, so the first breaking
  sale for a tolerance is a bisection) and ``f`` (the drug's oversell alerts).
* key ``<fixmedins_code>#tr#<China day>`` (a day's traceability codes): ``o`` and ``m`` (``mov_id →
  [t, 0 sale / 1 return, codes, pric, setl_id, drug]``): a batch rewrites only the days it touched.

In memory, derived from the store: the trace index ``institution → code → [(t, mov_id, kind)]``
by time (by :meth:`ProcurementEngine.restored`), and at the partition's first event after a
restore the watermark and the timers (payment deadlines and expiries, contract midnights and
expiries, unmatched payments' expiries).

Exactly once: every key carries its own ``o`` and each part of an event is applied to a key only
when the event's offset is above it, so a crash that flushed some keys of a batch and not others
re-applies exactly the missing parts on redelivery. Alerts are reconciled against the remembered
ones, so re-deciding what was already published publishes the same versions again (same ids). The
watermark a redelivery starts from is the latest ``w`` among the institutions whose ``o`` is below
the first offset redelivered: never ahead of the events replayed, so none of them becomes late.
"""

from __future__ import annotations

import datetime as dt
import heapq
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from schemas.calendar import CHINA, DAY_MS, china_day, day_start_ms, month_bounds, month_of

from .alerts import alert_datum, alert_id, fired_datum, next_generation, remember, retract
from .detectors import Finding
from .events import EngineEvent, EngineOutput
from .model import Rule
from .rulebook import RuleBook
from .state import Store

SUBSYSTEM = "procurement"
FORMAT = 2  # the institution value's layout (an older one is reset on restore)
TRACE_SEP = "#tr#"
BOOK_SEP = "#inv#"
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

# movement kinds in a drug's books
STOCKTAKE, PURCHASE_IN, PURCHASE_RETURN, SALE_OUT, SALE_RETURN = range(5)
MOV_KIND = {"STOCKTAKE": STOCKTAKE, "PURCHASE_IN": PURCHASE_IN, "PURCHASE_RETURN": PURCHASE_RETURN,
            "SALE_OUT": SALE_OUT, "SALE_RETURN": SALE_RETURN}
# fields of a book entry
T, ID, KIND, QTY, PRIC, SETL, BAL, INFLOW, CRIT, CMAX, EPI = range(11)
# fields of the folded base
B_BAL, B_INFLOW, B_CMAX, B_COUNTED, B_EPI = range(5)
NEVER = 10**18  # crit of a sale no tolerance covers (no inflow to take a share of)
# fields of a contract
C_DRUG, C_VOLUME, C_BEGIN, C_END, C_SIGN, C_PRIC, C_BASE, C_JUDGED = range(8)
# timer kinds
TM_DELIVERY, TM_CONTRACT, TM_PAYMENT = "d", "c", "y"


def _pos(e: list[Any]) -> tuple[int, str]:
    return e[T], e[ID]


def _ep(e: list[Any]) -> tuple[int, int]:
    return e[EPI], e[CMAX]


def _crit(balance: int, inflow: int) -> int:
    """The least tolerance_pm for which ``balance`` is not beyond the tolerance: breaking ⇔ pm < crit."""
    if balance >= 0:
        return 0
    if inflow <= 0:
        return NEVER
    return -(-1000 * -balance // inflow)


def region_of(inst: str) -> str:
    """The region an institution's alerts carry: the six digits its code holds (``H``/``P`` + region +
    5 digits, the national coding standard; validation refuses any other code).

    Not an event's ``admdvs``: a contract carries the province that procured, the institution's other
    events its own district, so the region of the event seen last changed with arrival order (a
    shuffled run filed one oversell alert under 440000 instead of 440305)."""
    return inst[1:7]


class ProcurementEngine:
    """Per-institution procurement rules over one partition's events (see the module docstring)."""

    def __init__(self, book: RuleBook, store: Store, allowed_lateness_days: int = 35) -> None:
        self.book = book
        self.store = store
        self.stores = [store]
        self.reads: Mapping[str, frozenset[str]] = {}  # every record whole
        self.alert_kinds = frozenset(PROCUREMENT_KINDS)
        self.lateness_days = allowed_lateness_days
        self.lateness_ms = allowed_lateness_days * DAY_MS
        self.watermark: dict[int, int] = {}
        #: (due ms, institution, timer kind, id) per partition; an entry whose due is no longer
        #: the one in ``_due`` is stale and skipped
        self._timers: dict[int, list[tuple[int, str, str, str]]] = {}
        self._due: dict[int, dict[tuple[str, str, str], int]] = {}
        #: institution → trace code → [(t, mov_id, 0 sale / 1 return)] by time, per partition
        self._trace: dict[int, dict[str, dict[str, list[tuple[int, str, int]]]]] = {}
        #: partitions restored whose watermark and timers wait for the first event
        self._resuming: set[int] = set()
        self._aids: dict[tuple[str, str, str], str] = {}  # a memo of alert_id (uuid5)

    # --- state lifecycle ---------------------------------------------------------------------
    def restored(self, partition: int) -> None:
        """Rebuild what is derived from the store: the trace index and each institution's ``td``
        (and reset an institution value of an older layout, dropping trace buckets of the older
        layout). The watermark and the timers are rebuilt at the partition's first event (see
        :meth:`_resume`)."""
        part = self.store.part(partition)
        index: dict[str, dict[str, list[tuple[int, str, int]]]] = {}
        self._trace[partition] = index
        days: dict[str, list[int]] = {}
        insts: list[str] = []
        for key, st in list(part.items()):
            if TRACE_SEP in key:
                if "m" not in st:
                    self.store.delete(partition, key)
                    continue
                inst, _, day = key.partition(TRACE_SEP)
                days.setdefault(inst, []).append(int(day))
                for mid, (t, k, codes, *_rest) in st["m"].items():
                    for code in set(codes):
                        index.setdefault(inst, {}).setdefault(code, []).append((int(t), mid, int(k)))
            elif BOOK_SEP not in key:
                insts.append(key)
        for codes_of in index.values():
            for lst in codes_of.values():
                lst.sort()
        for inst in sorted(set(insts) | set(days)):
            st = self._state(partition, inst)
            td = sorted(days.get(inst, []))
            if self.store.get(partition, inst) is not st or st["td"] != td:
                st["td"] = td  # the buckets present (a crash may have written a prune in part)
                self.store.put(partition, inst, st)
        self.watermark[partition] = max((int(part[k].get("t", 0)) for k in insts), default=0)
        self._timers[partition] = []
        self._due[partition] = {}
        self._resuming.add(partition)

    def _resume(self, partition: int, offset: int) -> None:
        """At the first event after a restore (``offset``, where the source resumes): the watermark
        as of the event before it, and the timers. A crash may have written some keys of the last
        batch and not others: the watermark is the latest ``w`` of the institutions whose state is
        older than ``offset`` (never ahead of the replayed events, so none of them turns late)."""
        self._resuming.discard(partition)
        part = self.store.part(partition)
        insts = [k for k in part if TRACE_SEP not in k and BOOK_SEP not in k]
        self.watermark[partition] = max((int(part[k].get("w", 0)) for k in insts if part[k]["o"] < offset),
                                        default=0)
        self._timers[partition] = []
        self._due[partition] = {}
        pay_rules = self.book.current.enabled(KIND_PAYMENT)
        for inst in insts:
            st = part[inst]
            for dlv_id in st["d"]:
                self._schedule_delivery(partition, inst, st, dlv_id, pay_rules)
            for cid in st["c"]:
                self._schedule_contract(partition, inst, st, cid)
            for dlv_id, pay in st["py"].items():
                self._schedule(partition, int(pay) + self.lateness_ms + 1, inst, TM_PAYMENT, dlv_id)

    def forget(self, partitions: Sequence[int]) -> None:
        self.store.forget(partitions)
        for p in partitions:
            self.watermark.pop(p, None)
            self._timers.pop(p, None)
            self._due.pop(p, None)
            self._trace.pop(p, None)
            self._resuming.discard(p)

    # --- the batch -----------------------------------------------------------------------------
    def process(self, events: Sequence[EngineEvent]) -> EngineOutput:
        """Apply ``events`` in arrival order (emits nothing: procurement state is keyed like its stream)."""
        out = EngineOutput()
        rules = self.book.current
        by_kind = {k: rules.enabled(k) for k in PROCUREMENT_KINDS}
        for ev in events:
            d = ev.datum
            inst = d.get("fixmedins_code")
            if not inst:
                continue
            p = ev.partition
            if p in self._resuming:
                self._resume(p, ev.offset)
            t = self._event_time(ev.record, d)
            w_old = self.watermark.get(p, 0)
            late = t is not None and t < w_old - self.lateness_ms
            w = max(w_old, t) if t is not None else w_old
            self.watermark[p] = w
            st = self._state(p, inst)
            fresh = ev.offset > st["o"]
            if not fresh:
                out.skipped += 1
            elif late:
                out.late += 1
            if ev.record == MOVEMENT:
                self._movement(ev, inst, st, fresh, late, by_kind, w, out)
            elif fresh:
                if ev.record == CONTRACT:
                    self._contract(ev, inst, st, late, by_kind[KIND_VOLUME], w, out)
                elif ev.record == ORDER:
                    self._order(ev, inst, st, by_kind[KIND_VOLUME], w, out)
                elif ev.record == DELIVERY:
                    self._delivery(ev, inst, st, by_kind[KIND_PAYMENT], w, out)
                elif ev.record == PAYMENT:
                    self._payment(ev, inst, st, by_kind[KIND_PAYMENT], w, out)
            if fresh:
                st["o"] = ev.offset
                st["w"] = w
                if t is not None:
                    st["t"] = max(int(st.get("t", 0)), t)
                self.store.put(p, inst, st)
            self._fire_timers(ev, by_kind, out)
            if fresh:
                self._tidy(p, inst, st, by_kind, w)
                self.store.put(p, inst, st)
        return out

    @staticmethod
    def _event_time(record: str, d: dict[str, Any]) -> int | None:
        f = {CONTRACT: "sign_time", ORDER: "ord_time", DELIVERY: "acpt_time", MOVEMENT: "mov_time",
             PAYMENT: "pay_time"}.get(record)
        return int(d[f]) if f is not None and d.get(f) is not None else None

    def _state(self, partition: int, inst: str) -> dict[str, Any]:
        st: dict[str, Any] | None = self.store.get(partition, inst)
        if st is None or st.get("v") != FORMAT:
            old = st or {}
            st = {"v": FORMAT, "o": old.get("o", -1), "t": old.get("t", 0), "w": old.get("t", 0),
                  "c": {},
                  "po": [], "d": {}, "py": {}, "td": [], "f": {}}
        return st

    def _tidy(self, p: int, inst: str, st: dict[str, Any], by_kind: dict[str, list[Rule]], w: int) -> None:
        """Fold what no event within the lateness can change any more: orders into their contract's
        base, trace buckets past the memory, alerts past their expiry."""
        cut = w - self.lateness_ms
        po: list[list[Any]] = st["po"]
        n = bisect_left(po, cut, key=lambda o: o[0])
        for o in po[:n]:
            cid = self._counts_towards(st, o)
            if cid is not None:
                st["c"][cid][C_BASE] += o[4]
        del po[:n]
        if by_kind[KIND_TRACE]:
            self._prune_traces(p, inst, st, china_day(w) - self._trace_keep_days(by_kind[KIND_TRACE]))
        for aid in [a for a, e in st["f"].items() if e["exp"] < w]:
            del st["f"][aid]

    def _fire(self, holder: dict[str, Any], fd: Finding, inst: str, region: str | None, expires: int,
              ev: EngineEvent, out: EngineOutput) -> None:
        """Publish ``fd`` unless its alert stands already (a new generation after a retraction)."""
        aid = self._aid(fd.rule.id, inst, fd.key)
        gen = next_generation(holder, aid)
        if gen is None:
            return
        datum = alert_datum(fd, SUBSYSTEM, inst, None, region or None, gen)
        prev = holder["f"].get(aid)
        if prev is not None:  # later than the retraction it supersedes
            datum["detected_at"] = max(datum["detected_at"], int(prev["d"]["detected_at"]) + 1)
        remember(holder, datum, gen, expires)
        out.alerts.append((datum, ev.partition, ev.offset))

    def _aid(self, rule_id: str, inst: str, key: str) -> str:
        aid = self._aids.get((rule_id, inst, key))
        if aid is None:
            if len(self._aids) > 100_000:
                self._aids.clear()
            aid = self._aids[(rule_id, inst, key)] = alert_id(rule_id, inst, key)
        return aid

    @staticmethod
    def _retract(holder: dict[str, Any], aid: str, at: int, reason: str, ev: EngineEvent, out: EngineOutput) -> None:
        if fired_datum(holder, aid) is not None:
            out.alerts.append((retract(holder, aid, at, reason), ev.partition, ev.offset))

    # --- timers ----------------------------------------------------------------------------------
    def _schedule(self, p: int, due: int, inst: str, kind: str, ident: str) -> None:
        due_map = self._due.setdefault(p, {})
        k = (inst, kind, ident)
        if due_map.get(k) == due:
            return
        due_map[k] = due
        heapq.heappush(self._timers.setdefault(p, []), (due, inst, kind, ident))

    def _unschedule(self, p: int, inst: str, kind: str, ident: str) -> None:
        self._due.get(p, {}).pop((inst, kind, ident), None)

    def _fire_timers(self, ev: EngineEvent, by_kind: dict[str, list[Rule]], out: EngineOutput) -> None:
        """Everything due once the partition's watermark reached it: payment deadlines, contract
        checkpoints, and the expiry of deliveries, contracts and unmatched payments."""
        p = ev.partition
        timers = self._timers.get(p)
        if not timers:
            return
        due_map = self._due.setdefault(p, {})
        w = self.watermark.get(p, 0)
        while timers and timers[0][0] <= w:
            due, inst, kind, ident = heapq.heappop(timers)
            if due_map.get((inst, kind, ident)) != due:
                continue  # stale: rescheduled or dropped since
            del due_map[(inst, kind, ident)]
            st = self.store.get(p, inst)
            if st is None or st.get("v") != FORMAT:
                continue
            if kind == TM_DELIVERY:
                self._delivery_due(ev, inst, st, ident, by_kind[KIND_PAYMENT], w, out)
            elif kind == TM_CONTRACT:
                self._contract_due(ev, inst, st, ident, by_kind[KIND_VOLUME], w, out)
            elif kind == TM_PAYMENT:
                pay = st["py"].get(ident)
                if pay is not None and int(pay) + self.lateness_ms < w:
                    del st["py"][ident]
                elif pay is not None:
                    self._schedule(p, int(pay) + self.lateness_ms + 1, inst, TM_PAYMENT, ident)
            self.store.put(p, inst, st)

    # --- 进销存: the books of each drug, in event time ------------------------------------------
    def _movement(self, ev: EngineEvent, inst: str, st: dict[str, Any], fresh: bool, late: bool,
                  by_kind: dict[str, list[Rule]], w: int, out: EngineOutput) -> None:
        d = ev.datum
        p = ev.partition
        kind = MOV_KIND.get(d["mov_type"])
        if kind is None:
            return
        key = f"{inst}{BOOK_SEP}{d['med_list_codg']}"
        dk = self.store.get(p, key) or {"o": -1, "b": [None, 0, 0, None, 0], "m": [], "f": {}}
        if ev.offset > dk["o"]:
            dk["o"] = ev.offset
            self._book(ev, inst, st, dk, kind, late, by_kind[KIND_OVERSELL], w, out)
            self.store.put(p, key, dk)
        if by_kind[KIND_TRACE] and kind in (SALE_OUT, SALE_RETURN) and d.get("drug_trac_codg"):
            self._traces(ev, inst, st, fresh, late, by_kind[KIND_TRACE], w, out)

    def _book(self, ev: EngineEvent, inst: str, st: dict[str, Any], dk: dict[str, Any], kind: int, late: bool,
              rules: list[Rule], w: int, out: EngineOutput) -> None:
        d = ev.datum
        self._fold_book(dk, w)
        m: list[list[Any]] = dk["m"]
        b: list[Any] = dk["b"]
        t = int(d["mov_time"])
        mid = d["mov_id"]
        if late and (kind == STOCKTAKE or (b[B_COUNTED] is not None and t < b[B_COUNTED])):
            return  # see the module docstring: nothing to re-baseline from, or counted already
        i = bisect_left(m, (t, mid), key=_pos)
        if i < len(m) and m[i][T] == t and m[i][ID] == mid:
            return  # the same movement re-sent: booked once
        epi = (m[i - 1][EPI] if i else b[B_EPI]) + (kind == STOCKTAKE)
        m.insert(i, [t, mid, kind, int(d["cnt"]), int(d.get("pric") or 0), d.get("setl_id"), None, 0, 0, 0, epi])
        if kind == STOCKTAKE:
            for e in m[i + 1:]:
                e[EPI] += 1
        self._rebook(b, m, i)
        if rules:
            for ep in ((epi - 1, epi) if kind == STOCKTAKE else (epi,)):
                self._reconcile_oversell(ev, inst, st, dk, ep, rules, w, out)

    @staticmethod
    def _rebook(b: list[Any], m: list[list[Any]], i: int) -> None:
        """Running balance, inflow and crit from entry ``i`` up to the next stock-take after it."""
        if i:
            bal, inflow, cmax = m[i - 1][BAL], m[i - 1][INFLOW], m[i - 1][CMAX]
        else:
            bal, inflow, cmax = b[B_BAL], b[B_INFLOW], b[B_CMAX]
        for j in range(i, len(m)):
            e = m[j]
            k, c = e[KIND], e[QTY]
            crit = 0
            if k == STOCKTAKE:
                if j > i:
                    break
                bal, inflow, cmax = c, c, 0
            elif bal is not None:
                if k == PURCHASE_IN:
                    bal += c
                    inflow += c
                elif k == PURCHASE_RETURN:
                    bal -= c
                    inflow -= c
                elif k == SALE_OUT:
                    bal -= c
                    crit = _crit(bal, inflow)
                else:
                    bal += c
                cmax = max(cmax, crit)
            e[BAL], e[INFLOW], e[CRIT], e[CMAX] = bal, inflow, crit, cmax

    def _fold_book(self, dk: dict[str, Any], w: int) -> None:
        """Fold the movements older than ``w - L`` into the base; their sales' alerts are final."""
        cut = w - self.lateness_ms
        m = dk["m"]
        n = bisect_left(m, cut, key=lambda e: e[T])
        if n:
            counted = dk["b"][B_COUNTED]
            for e in reversed(m[:n]):
                if e[KIND] == STOCKTAKE:
                    counted = e[T]
                    break
            last = m[n - 1]
            dk["b"] = [last[BAL], last[INFLOW], last[CMAX], counted, last[EPI]]
            del m[:n]
        for aid in [a for a, e in dk["f"].items() if e["exp"] < w]:
            del dk["f"][aid]

    def _reconcile_oversell(self, ev: EngineEvent, inst: str, st: dict[str, Any], dk: dict[str, Any], epi: int,
                            rules: list[Rule], w: int, out: EngineOutput) -> None:
        """Make the standing alerts of episode ``epi`` its first breaking sale, per rule."""
        m: list[list[Any]] = dk["m"]
        b = dk["b"]
        lo = bisect_left(m, (epi, -1), key=_ep)
        hi = bisect_left(m, (epi + 1, -1), key=_ep)
        from_base = lo == 0 and b[B_EPI] == epi
        for rule in rules:
            pm = int(rule.param("tolerance_pm"))
            want: list[Any] | None = None
            if not (from_base and b[B_CMAX] > pm):  # else it broke in the folded part: final
                k = bisect_right(m, (epi, pm), lo, hi, key=_ep)
                if k < hi:
                    want = m[k]
            for aid, entry in list(dk["f"].items()):
                fd = entry["d"]
                if fd["status"] != "FIRED" or fd["rule_id"] != rule.id:
                    continue
                j = bisect_left(m, (int(fd["window_start"]), fd["evidence"]["ref"]), key=_pos)
                if j >= len(m) or m[j][ID] != fd["evidence"]["ref"] or not lo <= j < hi:
                    continue
                if want is None or m[j] is not want:
                    why = ("the books no longer break beyond the tolerance in this episode" if want is None
                           else f"an earlier sale ({want[ID]}) breaks this episode first")
                    self._retract(dk, aid, w, why, ev, out)
            if want is not None:
                self._oversell_alert(ev, inst, st, dk, want, rule, pm, w, out)

    def _oversell_alert(self, ev: EngineEvent, inst: str, st: dict[str, Any], dk: dict[str, Any], e: list[Any],
                        rule: Rule, pm: int, w: int, out: EngineOutput) -> None:
        drug = ev.datum["med_list_codg"]
        tolerance = max(0, e[INFLOW]) * pm // 1000
        excess = -e[BAL]
        fd = Finding(rule, f"{drug}|{e[ID]}", inst, e[T], e[T], (e[SETL],) if e[SETL] else (), (),
                     excess * e[PRIC] // PRICE_TO_FEN, {
                         "ref": e[ID], "med_list_codg": drug,
                         "oversold_cnt": f"{excess / CNT:g}", "tolerance_cnt": f"{tolerance / CNT:g}",
                         "opening_plus_purchases_cnt": f"{e[INFLOW] / CNT:g}",
                     }, w)
        self._fire(dk, fd, inst, region_of(inst), e[T] + self.lateness_ms, ev, out)

    # --- traceability codes ---------------------------------------------------------------------
    def _trace_keep_days(self, rules: list[Rule]) -> int:
        return max(int(r.param("retention_days")) for r in rules) + self.lateness_days

    def _traces(self, ev: EngineEvent, inst: str, st: dict[str, Any], fresh: bool, late: bool,
                rules: list[Rule], w: int, out: EngineOutput) -> None:
        """Remember the movement in its day bucket and the index; re-judge it and what follows it."""
        d = ev.datum
        p = ev.partition
        mid = d["mov_id"]
        t = int(d["mov_time"])
        day = china_day(t)
        if day < china_day(w) - self._trace_keep_days(rules):
            return  # older than the memory: nothing to compare with, nothing to keep
        bkey = f"{inst}{TRACE_SEP}{day}"
        bucket = self.store.get(p, bkey) or {"o": -1, "m": {}}
        index = self._trace.setdefault(p, {}).setdefault(inst, {})
        if ev.offset > bucket["o"]:
            bucket["o"] = ev.offset
            if mid not in bucket["m"]:
                k = 0 if d["mov_type"] == "SALE_OUT" else 1
                codes = [str(c) for c in d["drug_trac_codg"]]
                bucket["m"][mid] = [t, k, codes, int(d.get("pric") or 0), d.get("setl_id"), d["med_list_codg"]]
                item = (t, mid, k)
                for code in set(codes):
                    lst = index.get(code)
                    if lst is None:
                        index[code] = [item]
                    else:
                        insort(lst, item)
            self.store.put(p, bkey, bucket)
        td = st["td"]
        i = bisect_left(td, day)
        if i == len(td) or td[i] != day:  # (also when only the bucket reached the changelog before a crash)
            td.insert(i, day)
            self.store.put(p, inst, st)
        if not fresh:
            return
        entry = bucket["m"].get(mid)
        if entry is None:
            return
        if entry[1] == 0:
            self._judge_sale(ev, inst, st, mid, entry, rules, w, out)
        if late:
            return  # the sales after a late movement are final
        t = int(entry[0])
        seen = {mid}
        for code in set(entry[2]):
            lst = index.get(code, [])
            if len(lst) < 2:
                continue  # only this movement
            q = bisect_right(lst, (t, mid, 9))
            while q < len(lst) and lst[q][1] == mid:
                q += 1
            if q == len(lst) or lst[q][2] != 0 or lst[q][1] in seen:
                continue
            nt, nid, _ = lst[q]
            seen.add(nid)
            nb = self.store.get(p, f"{inst}{TRACE_SEP}{china_day(nt)}")
            nxt = nb["m"].get(nid) if nb else None
            if nxt is not None:
                self._judge_sale(ev, inst, st, nid, nxt, rules, w, out)

    def _judge_sale(self, ev: EngineEvent, inst: str, st: dict[str, Any], mid: str, entry: list[Any],
                    rules: list[Rule], w: int, out: EngineOutput) -> None:
        """A sale is a duplicate when a code of it was last sold (not returned) within the retention
        before it, or is listed twice in it."""
        t, _k, codes, pric, setl_id, drug = entry
        t = int(t)
        index = self._trace.get(ev.partition, {}).get(inst, {})
        for rule in rules:
            oldest_day = china_day(t) - int(rule.param("retention_days"))
            dups: list[tuple[str, int]] = []
            here: set[str] = set()
            for code in codes:
                if code in here:
                    dups.append((code, t))
                    continue
                here.add(code)
                lst = index.get(code, [])
                q = bisect_left(lst, (t, mid)) - 1
                while q >= 0 and lst[q][1] == mid:
                    q -= 1
                if q >= 0 and lst[q][2] == 0 and china_day(lst[q][0]) >= oldest_day:
                    dups.append((code, lst[q][0]))
            if not dups:
                if st["f"]:
                    self._retract(st, self._aid(rule.id, inst, mid), w, "in event time, the codes' previous sales "
                                  "were returned (or are not within the retention)", ev, out)
                continue
            first = min(x[1] for x in dups)
            first_day = china_day(first)
            fd = Finding(rule, mid, inst, day_start_ms(first_day), t, (setl_id,) if setl_id else (), (),
                         len(dups) * CNT * int(pric) // PRICE_TO_FEN, {
                             "ref": mid, "med_list_codg": drug,
                             "codes": ",".join(sorted({c for c, _ in dups})[:10]), "duplicates": str(len(dups)),
                             "first_sold_day": dt.date.fromordinal(719_163 + first_day).isoformat(),
                         }, w)
            self._fire(st, fd, inst, region_of(inst), t + self.lateness_ms, ev, out)

    def _prune_traces(self, p: int, inst: str, st: dict[str, Any], cutoff: int) -> None:
        days: list[int] = st["td"]
        index = self._trace.get(p, {}).get(inst, {})
        while days and days[0] < cutoff:
            day = days.pop(0)
            key = f"{inst}{TRACE_SEP}{day}"
            bucket = self.store.get(p, key)
            for mid, (t, k, codes, *_rest) in (bucket or {}).get("m", {}).items():
                for code in set(codes):
                    lst = index.get(code)
                    if lst is None:
                        continue
                    item = (int(t), mid, int(k))
                    i = bisect_left(lst, item)
                    if i < len(lst) and lst[i] == item:
                        del lst[i]
                    if not lst:
                        del index[code]
            self.store.delete(p, key)

    # --- agreed volume (带量采购): judged at each China midnight, one alert per month ----------------
    def _contract(self, ev: EngineEvent, inst: str, st: dict[str, Any], late: bool, rules: list[Rule], w: int,
                  out: EngineOutput) -> None:
        d = ev.datum
        cid = d["cntr_id"]
        old = st["c"].get(cid)
        if old is None and late:
            return  # first seen too late: the orders it would count are folded without it
        row = [d["med_list_codg"], int(d["agreed_volume"]), day_start_ms(int(d["cycle_begn_date"])),
               day_start_ms(int(d["cycle_end_date"]) + 1), int(d["sign_time"]), int(d["win_pric"]),
               old[C_BASE] if old else 0, old[C_JUDGED] if old else 0]
        st["c"][cid] = row
        # the passed checkpoints of every contract of the product (an unnamed order may move to it)
        for other, c in sorted(st["c"].items()):
            if c[C_DRUG] != row[C_DRUG] and other != cid:
                continue
            self._judge_contract(ev, inst, st, other, w - self.lateness_ms - 1, w, rules, w, out)
            c[C_JUDGED] = max(c[C_JUDGED], self._last_checkpoint(c, w))
        self._schedule_contract(ev.partition, inst, st, cid)

    def _order(self, ev: EngineEvent, inst: str, st: dict[str, Any], rules: list[Rule], w: int,
               out: EngineOutput) -> None:
        d = ev.datum
        t = int(d["ord_time"])
        o = [t, d["ord_id"], d["med_list_codg"], d.get("cntr_id") or "", int(d["purc_cnt"])]
        po = st["po"]
        i = bisect_left(po, (t, o[1]), key=lambda x: (x[0], x[1]))
        if i < len(po) and po[i][0] == t and po[i][1] == o[1]:
            return  # the same order re-sent
        po.insert(i, o)
        # re-judge the checkpoints it changes: judged already, after it, not final
        since = max(t, w - self.lateness_ms - 1)
        for cid, c in sorted(st["c"].items()):
            if cid == o[3] or c[C_DRUG] == o[2]:
                self._judge_contract(ev, inst, st, cid, since, c[C_JUDGED], rules, w, out)

    @staticmethod
    def _checkpoints(c: list[Any], after: int) -> Iterator[int]:
        """The contract's checkpoints after ``after``: the China midnights in its cycle (counted from the
        later of its start and its signature) up to and including the cycle's end."""
        e = day_start_ms(china_day(max(after, c[C_BEGIN], c[C_SIGN])) + 1)
        while e <= c[C_END]:
            yield e
            e += DAY_MS

    @staticmethod
    def _last_checkpoint(c: list[Any], w: int) -> int:
        """The contract's latest checkpoint at or before ``w`` (0 if none)."""
        e = min(day_start_ms(china_day(w)), c[C_END])
        return e if e > max(c[C_BEGIN], c[C_SIGN]) else 0

    @staticmethod
    def _counts_towards(st: dict[str, Any], o: list[Any]) -> str | None:
        """The contract an order counts towards: the one it names, or the institution's contract for
        the product whose cycle contains it (the smallest cntr_id if several); never one signed after it."""
        t = o[0]
        if o[3]:
            c = st["c"].get(o[3])
            return o[3] if c is not None and c[C_SIGN] <= t else None
        ids = [cid for cid, c in st["c"].items()
               if c[C_DRUG] == o[2] and c[C_BEGIN] <= t < c[C_END] and c[C_SIGN] <= t]
        return min(ids) if ids else None

    def _judge_contract(self, ev: EngineEvent, inst: str, st: dict[str, Any], cid: str, after: int, upto: int,
                        rules: list[Rule], w: int, out: EngineOutput) -> None:
        """Judge the contract's checkpoints in (after, upto]; a month's alert stands while a checkpoint
        of that month lags (the first one, ``at`` of its entry in ``f``). The checkpoints up to
        ``after`` are unchanged: a month whose first lagging checkpoint is one of them still stands,
        the others had none before ``after``."""
        c = st["c"][cid]
        drug, volume, begin, end, _sign, pric = c[:C_BASE]
        if not rules or volume <= 0 or end <= begin:
            return
        days: list[int] = []
        for e in self._checkpoints(c, after):
            if e > upto:
                break
            days.append(e)
        if not days:
            return
        bought: list[int] = []  # purchased before each checkpoint: one sweep over the held orders
        total = int(c[C_BASE])
        po = st["po"]
        i = 0
        for e in days:
            while i < len(po) and po[i][0] < e:
                o = po[i]
                if (o[3] == cid or (not o[3] and o[2] == drug)) and self._counts_towards(st, o) == cid:
                    total += o[4]
                i += 1
            bought.append(total)
        by_month: dict[int, list[int]] = {}
        for j, e in enumerate(days):
            by_month.setdefault(month_of(e - 1), []).append(j)
        for month, js in by_month.items():
            key = f"{cid}|{month}"
            start, stop = month_bounds(month)
            for rule in rules:
                aid = self._aid(rule.id, inst, key)
                stands = fired_datum(st, aid) is not None
                if stands and int(st["f"][aid].get("at", 0)) <= after:
                    continue
                lag = int(rule.param("lag_points"))
                floor = int(rule.param("min_shortfall_yuan")) * 100
                for j in js:
                    elapsed_pm = (days[j] - begin) * 1000 // (end - begin)
                    done_pm = bought[j] * 1000 // volume
                    owed = volume * elapsed_pm // 1000 - bought[j]
                    value = owed * pric // PRICE_TO_FEN
                    # behind by less than one unit is no lag: a contract of a few units of a dear
                    # consumable is points behind until its next one is bought
                    if elapsed_pm - done_pm > lag * 10 and value >= floor and owed >= CNT:
                        break
                else:
                    if stands:
                        self._retract(st, aid, w, "orders reported late bring completion within the elapsed "
                                      "share", ev, out)
                    continue
                if not stands:
                    fd = Finding(rule, key, inst, start, stop, (), (), value, {
                        "ref": cid, "month": str(month), "med_list_codg": drug,
                        "completion": f"{done_pm / 10:.1f}%", "elapsed": f"{elapsed_pm / 10:.1f}%",
                        "lag_points": f"{(elapsed_pm - done_pm) / 10:.1f}", "max_lag_points": str(lag),
                        "behind_cnt": f"{owed / CNT:g}", "behind_value": f"{value / 100:.2f}",
                        "judged_at": dt.datetime.fromtimestamp(days[j] / 1000, CHINA).isoformat(),
                    }, w)
                    self._fire(st, fd, inst, region_of(inst), min(stop + 1, end) + self.lateness_ms, ev, out)
                st["f"][aid]["at"] = days[j]

    def _contract_due(self, ev: EngineEvent, inst: str, st: dict[str, Any], cid: str, rules: list[Rule], w: int,
                      out: EngineOutput) -> None:
        c = st["c"].get(cid)
        if c is None:
            return
        self._judge_contract(ev, inst, st, cid, c[C_JUDGED], w, rules, w, out)
        c[C_JUDGED] = max(c[C_JUDGED], self._last_checkpoint(c, w))
        if c[C_END] + self.lateness_ms < w:
            del st["c"][cid]  # every checkpoint is final
            return
        self._schedule_contract(ev.partition, inst, st, cid)

    def _schedule_contract(self, p: int, inst: str, st: dict[str, Any], cid: str) -> None:
        c = st["c"][cid]
        nxt = next(self._checkpoints(c, c[C_JUDGED]), None)
        self._schedule(p, nxt if nxt is not None else c[C_END] + self.lateness_ms + 1, inst, TM_CONTRACT, cid)

    # --- 回款: payment within N days of accepted delivery ----------------------------------------
    @staticmethod
    def _days(rules: list[Rule]) -> list[int]:
        return [int(r.param("days")) for r in rules] or [0]

    def _delivery(self, ev: EngineEvent, inst: str, st: dict[str, Any], rules: list[Rule], w: int,
                  out: EngineOutput) -> None:
        d = ev.datum
        dlv_id = d["dlv_id"]
        acpt = int(d["acpt_time"])
        if acpt + max(self._days(rules)) * DAY_MS + self.lateness_ms < w:
            return  # beyond the memory: its deadline and the lateness after it have passed
        old = st["d"].get(dlv_id)
        paid = old[3] if old is not None else st["py"].pop(dlv_id, None)
        if old is None:
            self._unschedule(ev.partition, inst, TM_PAYMENT, dlv_id)
        st["d"][dlv_id] = [acpt, int(d["dlv_amt"]), d["splr_code"], paid]
        self._judge_delivery(ev, inst, st, dlv_id, rules, w, out)
        self._schedule_delivery(ev.partition, inst, st, dlv_id, rules)

    def _payment(self, ev: EngineEvent, inst: str, st: dict[str, Any], rules: list[Rule], w: int,
                 out: EngineOutput) -> None:
        d = ev.datum
        dlv_id = d["dlv_id"]
        pay = int(d["pay_time"])
        row = st["d"].get(dlv_id)
        if row is not None:
            row[3] = pay if row[3] is None else min(int(row[3]), pay)
            self._judge_delivery(ev, inst, st, dlv_id, rules, w, out)
            return
        if pay + self.lateness_ms < w:
            return  # its delivery is unknown and will not come within the lateness
        prev = st["py"].get(dlv_id)
        st["py"][dlv_id] = pay if prev is None else min(int(prev), pay)
        self._schedule(ev.partition, int(st["py"][dlv_id]) + self.lateness_ms + 1, inst, TM_PAYMENT, dlv_id)

    def _judge_delivery(self, ev: EngineEvent, inst: str, st: dict[str, Any], dlv_id: str, rules: list[Rule],
                        w: int, out: EngineOutput) -> None:
        acpt, amt, splr, paid = st["d"][dlv_id]
        for rule in rules:
            days = int(rule.param("days"))
            deadline = acpt + days * DAY_MS
            aid = self._aid(rule.id, inst, dlv_id)
            if paid is not None and paid <= deadline:
                self._retract(st, aid, w, "paid within the limit (the payment was reported late)", ev, out)
                continue
            if w <= deadline:
                continue
            at = paid if paid is not None else w
            fd = Finding(rule, dlv_id, inst, acpt, at, (), (), amt, {
                "ref": dlv_id, "splr_code": splr,
                "accepted": dt.datetime.fromtimestamp(acpt / 1000, CHINA).isoformat(),
                "paid": "yes" if paid is not None else "no (event time passed the deadline)",
                "days_since_acceptance": f"{(at - acpt) / DAY_MS:.1f}", "max_days": str(days),
            }, w)
            self._fire(st, fd, inst, region_of(inst), deadline + self.lateness_ms, ev, out)

    def _delivery_due(self, ev: EngineEvent, inst: str, st: dict[str, Any], dlv_id: str, rules: list[Rule],
                      w: int, out: EngineOutput) -> None:
        row = st["d"].get(dlv_id)
        if row is None:
            return
        self._judge_delivery(ev, inst, st, dlv_id, rules, w, out)
        if row[0] + max(self._days(rules)) * DAY_MS + self.lateness_ms < w:
            del st["d"][dlv_id]  # no payment within the lateness can change it any more
            return
        self._schedule_delivery(ev.partition, inst, st, dlv_id, rules)

    def _schedule_delivery(self, p: int, inst: str, st: dict[str, Any], dlv_id: str, rules: list[Rule]) -> None:
        """Next due: the first deadline the watermark has not passed, else the delivery's expiry."""
        acpt = int(st["d"][dlv_id][0])
        w = self.watermark.get(p, 0)
        days = self._days(rules)
        due = min([acpt + x * DAY_MS + 1 for x in days if acpt + x * DAY_MS >= w],
                  default=acpt + max(days) * DAY_MS + self.lateness_ms + 1)
        self._schedule(p, due, inst, TM_DELIVERY, dlv_id)


__all__ = ["PROCUREMENT_KINDS", "ProcurementEngine"]
