"""The settlement-stream detector engine: facts per settlement, a timeline per person, alerts once.

Called by the settlement ingestor with each batch's valid events, in partition order. Per person
(key: the pseudonymous ``psn_token``, never the clear ``psn_no``) the ``person`` store keeps the
recent timeline, the alerts already fired (so a rule, subject and window alert once) and ``o``,
the last source offset applied (so a redelivered event is not applied twice, see state.py).

Reversals retract: a full reversal removes its settlement from the timeline; every alert that
rested on it is re-evaluated without it and, when it no longer holds, re-published as RETRACTED.
Inpatient stays are also re-keyed to the hospital and DRG streams for the hospital-month rules.

A person's state is the changelog's value for their token; its keys are short because they are
written for every person on every batch, and they are the stored format (renaming one would make
a restarted worker misread the state an older one wrote):

| key | holds |
|---|---|
| ``o`` | the last source offset applied to this person |
| ``tl`` | the timeline: one entry per settlement within the rules' horizon, by event time |
|  | (its keys: :func:`~streams.rules.detectors.entry_of`) |
| ``f`` | the alerts fired, by alert id (keys: streams/rules/alerts.py) |
| ``ep`` | (no longer written) open episodes of an older version; pruned |
| ``rv`` | settlements fully reversed, by setl_id, with the reversal's time: a settlement that arrives |
|  | after its reversal (overtaken within the allowed lateness) is then not judged |
"""

from __future__ import annotations

import copy
import hashlib
from bisect import insort
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from schemas.calendar import DAY_MS, china_day

from ..privacy import Pseudonymizer
from ..settlement import age_at
from .alerts import alert_datum, alert_id, fired_datum, next_generation, remember, retract
from .detectors import GATHERED, INPATIENT, KINDS, Facts, Finding, entry_of, gather
from .events import EngineEvent, EngineOutput
from .knowledge import Knowledge
from .rulebook import RuleBook
from .state import Store

SETTLEMENT = "Settlement"
REVERSAL = "SettlementReversal"


#: Most settlements a person's timeline keeps within the rules' horizon (the oldest go first). A
#: chronic patient settles a few dozen times a month; a producer sending one person thousands of
#: settlements a day would otherwise make every event of that person cost a scan of all of them
#: and a rewrite of their whole state to the changelog.
MAX_TIMELINE = 2_000

#: Longest identifier a re-keyed record carries as it is. Validation keeps identifiers far shorter
#: (streams/data/fields.toml); should those limits be raised, a longer one travels as a digest, so
#: a re-keyed record (and its key) stays small whatever the producer sent.
MAX_ID_CHARS = 64

#: The source offset a previewed settlement is given: past any offset a person's state has applied.
PREVIEW_OFFSET = 2**62
#: A sweep in slices (a store on disk: it decodes each person it reads) reads at most this many
#: persons per event of the call, and at least :data:`SWEEP_MIN_PERSONS`, up to the store's
#: ``sweep_slice``: measured, 20,000 persons on disk take 0.65 s, 200 take 1.5 ms, so a slice of 32
#: events (while pre-settlement checks are served) or a small batch (alerts waiting on it) is not held
#: up by a pass over millions; a full batch still reads a whole slice.
SWEEP_PER_EVENT = 2
SWEEP_MIN_PERSONS = 200
#: the person store's one key that is not a person: the partition's watermark, so a restore
#: starts from the watermark the partition had, not from the newest settlement still held
WATERMARK_KEY = "#watermark"  # tokens are "<key id>.<base32>"


def bounded_id(v: str) -> str:
    return v if len(v) <= MAX_ID_CHARS else "~" + hashlib.blake2b(v.encode(), digest_size=16).hexdigest()


def stay_record(f: Facts, token: str, admdvs: str, rev: bool, setl_id: str | None = None) -> bytes:
    """Compact stay summary for the hospital/DRG streams (no personal data beyond the token)."""
    sev = f.drg[-1:] if f.drg else ""
    return orjson.dumps({
        "s": bounded_id(setl_id or f.setl_id), "m": bounded_id(f.mdtrt_id), "h": bounded_id(f.fixmedins_code),
        "drg": bounded_id(f.drg), "sev": sev, "amt": f.medfee, "t": f.setl_time, "tok": token, "r": admdvs,
        "rev": int(rev),
    })


class SettlementEngine:
    def __init__(self, book: RuleBook, knowledge: Knowledge, pseudonymizer: Pseudonymizer, person: Store,
                 allowed_lateness_days: int = 35) -> None:
        self.book = book
        self.k = knowledge
        self.pseudo = pseudonymizer
        self.person = person
        self.stores = [person]
        #: what :meth:`process` reads of each record: a settlement's facts, the person and their
        #: age, the scenario; a reversal's target and person
        self.reads: Mapping[str, frozenset[str]] = {
            SETTLEMENT: GATHERED | {"psn_no", "brdy"},
            REVERSAL: frozenset({"psn_no", "init_setl_id", "full_reversal", "setl_time", "insu_admdvs"}),
        }
        #: the kinds whose alerts this engine raises (the alerts table is shared by every stream)
        self.alert_kinds = frozenset(n for n, k in KINDS.items()
                                     if k.stateless is not None or k.historic is not None)
        self.lateness_ms = allowed_lateness_days * DAY_MS
        self.watermark: dict[int, int] = {}
        self._dup_codes = frozenset(c for p in knowledge.duplicate_pairs for c in (p.primary, p.secondary))
        self._excluded: dict[str, frozenset[str]] = {}
        #: per partition, the China day of the watermark at the last eviction sweep
        self._swept: dict[int, int] = {}
        #: per partition, the key a sweep in slices continues after
        self._sweeping: dict[int, str] = {}

    # --- state lifecycle ---------------------------------------------------------------------
    def restored(self, partition: int) -> None:
        held = self.person.get(partition, WATERMARK_KEY)
        if held is not None:
            self.watermark[partition] = held["w"]
            return
        wm = 0  # a changelog written before the watermark was kept: the newest settlement held
        for _, st in self.person.items(partition):
            for e in st.get("tl", ()):
                wm = max(wm, e["t"])
        self.watermark[partition] = wm

    def forget(self, partitions: Sequence[int]) -> None:
        self.person.forget(partitions)
        for p in partitions:
            self.watermark.pop(p, None)
            self._swept.pop(p, None)
            self._sweeping.pop(p, None)

    # --- a settlement not yet made ------------------------------------------------------------
    def preview(self, datum: dict[str, Any], partition: int) -> list[dict[str, Any]]:
        """The alerts ``datum`` would raise if it arrived now, leaving every state as it is.

        The pre-settlement check (streams/precheck) asks this of the worker that owns the person's
        partition. It runs :meth:`process` itself on a copy of the person's state and the
        partition's watermark, so a check answers exactly what the stream would raise for the same
        settlement at this point (the property tests/system/test_precheck.py holds it to).
        """
        token = self.pseudo.token(datum["psn_no"])
        scratch = Store("preview", "")
        st = self.person.get(partition, token)
        if st is not None:
            scratch.put(partition, token, orjson.loads(orjson.dumps(st)))
        twin = copy.copy(self)
        twin.person = scratch
        twin.stores = [scratch]
        twin.watermark = dict(self.watermark)
        twin._swept = {partition: 2**62}  # no eviction sweep on the scratch copy
        twin._sweeping = {}
        out = twin.process([EngineEvent(SETTLEMENT, datum, partition, PREVIEW_OFFSET)])
        return [d for d, _, _ in out.alerts if d["status"] == "FIRED"]

    # --- the batch -----------------------------------------------------------------------------
    def process(self, events: Sequence[EngineEvent]) -> EngineOutput:
        out = EngineOutput()
        rules = self.book.current
        stateless = [(r, KINDS[r.kind]) for r in rules.enabled() if KINDS[r.kind].stateless is not None]
        historic = [(r, KINDS[r.kind]) for r in rules.enabled() if KINDS[r.kind].historic is not None]
        horizon = (max((k.horizon_days(r) for r, k in historic), default=1) + 1) * DAY_MS
        excluded = self._excluded_dx(historic)
        first: dict[int, int] = {}
        for ev in events:
            first.setdefault(ev.partition, ev.offset)
        budget = max(SWEEP_MIN_PERSONS, SWEEP_PER_EVENT * len(events))
        for p, offset in first.items():
            out.evicted += self._sweep(p, offset, horizon, budget)
        by_scenario: dict[tuple[str, bool], tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]] = {}
        for ev in events:
            if ev.record == SETTLEMENT:
                d = ev.datum
                sc = (d["med_type"], d["insu_admdvs"][:2] != d["mdtrt_admdvs"][:2])
                lists = by_scenario.get(sc)
                if lists is None:
                    lists = by_scenario[sc] = ([(r, k) for r, k in stateless if r.applies_to(*sc)],
                                               [(r, k) for r, k in historic if r.applies_to(*sc)])
                self._settlement(ev, lists[0], lists[1], horizon, excluded, out)
            elif ev.record == REVERSAL:
                self._reversal(ev, stateless, historic, out)
        for p in first:
            wm = self.watermark.get(p, 0)
            held = self.person.get(p, WATERMARK_KEY)
            if wm and (held is None or held["w"] != wm):
                self.person.put(p, WATERMARK_KEY, {"o": -1, "w": wm})
        return out

    def _sweep(self, partition: int, before_offset: int, horizon: int, budget: int) -> int:
        """Once per China day of the partition's watermark ``W`` (once per ``sweep_every_days`` of the
        store: a sweep on disk reads every person back): drop the persons in whom nothing
        can matter to any rule any more, so memory and the changelog (a tombstone each, which
        compaction frees) are bounded by the rules' windows, not by everyone ever seen.

        A person goes when every settlement of their timeline is older than ``W`` minus the rules'
        horizon, every alert they hold has expired (no reversal or late event can retract it), and
        every reversal waiting for its settlement is older than the lateness: their next event
        would prune all of that anyway, so the state it finds is the empty one either way. Only
        persons last changed before ``before_offset`` (this batch's first event of the partition)
        go: a batch redelivered after a crash never meets a person whose state it had changed."""
        w = self.watermark.get(partition, 0)
        day = china_day(w) if w else 0
        cursor = self._sweeping.get(partition)
        if cursor is None:  # no pass under way
            if not w or self._swept.get(partition, day) > day - self.person.sweep_every_days:
                self._swept.setdefault(partition, day)
                return 0
            self._swept[partition] = day
            cursor = ""
        slice_ = self.person.sweep_slice
        if slice_ is not None:
            slice_ = min(slice_, budget)
        if slice_ is None:
            persons: Iterable[tuple[str, Any]] = self.person.items(partition)
            self._sweeping.pop(partition, None)
        else:
            persons, after = self.person.scan(partition, cursor, slice_)
            if after is None:
                self._sweeping.pop(partition, None)
            else:
                self._sweeping[partition] = after
        cut_tl, cut_rv = w - horizon, w - self.lateness_ms
        cut_ep = cut_rv - 60 * DAY_MS
        gone = [tok for tok, st in persons
                if tok != WATERMARK_KEY and st["o"] < before_offset
                and (not st["tl"] or st["tl"][-1]["t"] < cut_tl)
                and all(e["exp"] < w for e in st["f"].values())
                and all(t < cut_rv for t in st.get("rv", {}).values())
                and all(u < cut_ep for u in st.get("ep", {}).values())]
        for tok in gone:
            self.person.delete(partition, tok)
        return len(gone)

    def _excluded_dx(self, historic: list[tuple[Any, Any]]) -> frozenset[str]:
        codes: set[str] = set()
        for r, _ in historic:
            if r.kind == "split_stay":
                codes.update(str(c)[:3] for c in r.param("exclude_diagnoses"))
        return frozenset(codes)

    def _state(self, partition: int, token: str) -> dict[str, Any]:
        st: dict[str, Any] | None = self.person.get(partition, token)
        if st is None:
            st = {"o": -1, "tl": [], "f": {}, "ep": {}}
        st.setdefault("rv", {})
        return st

    def _settlement(self, ev: EngineEvent, stateless: list[tuple[Any, Any]], historic: list[tuple[Any, Any]],
                    horizon: int, excluded: frozenset[str], out: EngineOutput) -> None:
        s = ev.datum
        token = self.pseudo.token(s["psn_no"])
        st = self._state(ev.partition, token)
        if ev.offset <= st["o"]:
            out.skipped += 1
            return
        if s["setl_id"] in st["rv"] or any(e["s"] == s["setl_id"] for e in st["tl"]):
            # fully reversed before it arrived (the reversal overtook it), or the same settlement
            # again at a new offset under another event_id: nothing to judge, count it once
            st["o"] = ev.offset
            self.person.put(ev.partition, token, st)
            out.skipped += 1
            return
        age = ev.age if ev.age is not None else age_at(s["brdy"], s["setl_time"])
        f = gather(s, age, self.k, self._dup_codes)
        admdvs = s["insu_admdvs"]
        findings: list[Finding] = []
        for rule, kind in stateless:  # already filtered to this settlement's scenario
            findings.extend(kind.stateless(rule, f, self.k))
        wm = self.watermark.get(ev.partition, 0)
        late = f.setl_time < wm - self.lateness_ms
        entry = entry_of(f, excluded, self.k)
        tl: list[dict[str, Any]] = st["tl"]
        if late:
            out.late += 1
            for rule, kind in historic:  # judged alone, with the parts of its visit already known
                if kind.visit:
                    findings.extend(kind.historic(rule, entry, tl, self.k))
        else:
            insort(tl, entry, key=lambda e: e["t"])
            newest = max(wm, f.setl_time)
            self.watermark[ev.partition] = newest
            while tl and tl[0]["t"] < newest - horizon:
                tl.pop(0)
            if len(tl) > MAX_TIMELINE:
                del tl[: len(tl) - MAX_TIMELINE]
                out.capped += 1
            for rule, kind in historic:
                if kind.episodic:
                    self._episodes(rule, kind, entry, tl, token, admdvs, st, ev, out)
                else:
                    findings.extend(kind.historic(rule, entry, tl, self.k))
        for fd in findings:
            self._fire(fd, token, admdvs, st, ev, out)
        self._prune_fired(st, self.watermark.get(ev.partition, f.setl_time))
        st["o"] = ev.offset
        self.person.put(ev.partition, token, st)
        if f.inpatient and f.drg:
            rec = stay_record(f, token, admdvs, rev=False)
            out.emits.append(("internal.stays-by-hospital", bounded_id(f.fixmedins_code).encode(), rec))
            out.emits.append(("internal.stays-by-drg", bounded_id(f.drg).encode(), rec))
            out.emit_sources += [(ev.partition, ev.offset)] * 2

    def _fire(self, fd: Finding, token: str, admdvs: str, st: dict[str, Any], ev: EngineEvent,
              out: EngineOutput, ep_key: str | None = None) -> None:
        aid = alert_id(fd.rule.id, token, fd.key)
        gen = next_generation(st, aid)
        if gen is None:
            return
        datum = alert_datum(fd, "settlement", token, token, admdvs, gen)
        wm = self.watermark.get(ev.partition, fd.window_end)
        remember(st, datum, gen, max(wm, fd.window_end) + self.lateness_ms + 60 * DAY_MS, ep_key)
        out.alerts.append((datum, ev.partition, ev.offset))

    def _episodes(self, rule: Any, kind: Any, cur: dict[str, Any], tl: list[dict[str, Any]], token: str,
                  admdvs: str, st: dict[str, Any], ev: EngineEvent, out: EngineOutput,
                  because: str = "an earlier window of the same episode holds") -> None:
        """One alert per episode, the same whatever the arrival order.

        The episodes of a group (a generic, a drug class) are chosen greedily in event time: the
        earliest window that holds opens one, and it blocks every window ending before the episode
        ends. A settlement at time ``t`` changes only windows ending at or after ``t``, so the
        alerts standing before ``t`` are kept as they are (they block what follows them) and from
        ``t`` on the choice is made again from the timeline: new choices fire, standing alerts no
        longer chosen are retracted. Applied to every event in any order within the allowed
        lateness, this leaves the episodes a single pass in event-time order would have chosen.
        """
        since = cur["t"]
        found = kind.historic(rule, cur, tl, self.k)
        for group in sorted(kind.groups(rule, cur)):
            ep_key = f"{rule.id}|{group}"
            standing = {aid: d for aid, e in st["f"].items()
                        if e.get("ep") == ep_key and (d := fired_datum(st, aid)) is not None}
            blocked = max((d["window_end"] * 2 - d["window_start"] for d in standing.values()
                           if d["window_end"] < since), default=-1)
            chosen: dict[str, Finding] = {}
            for fd in sorted((fd for fd in found if fd.episode is not None and fd.episode[0] == group),
                             key=lambda fd: (fd.window_end, fd.key)):
                assert fd.episode is not None
                if fd.window_end >= blocked:
                    chosen[alert_id(rule.id, token, fd.key)] = fd
                    blocked = fd.episode[1]
            for aid, d in standing.items():
                if d["window_end"] >= since and aid not in chosen:
                    datum = retract(st, aid, max(since, ev.datum["setl_time"]), because)
                    out.alerts.append((datum, ev.partition, ev.offset))
            for aid, fd in chosen.items():
                if aid not in standing:
                    self._fire(fd, token, admdvs, st, ev, out, ep_key)

    def _prune_fired(self, st: dict[str, Any], now: int) -> None:
        """Forget alerts (and episodes, and reversals still waiting for their settlement) once no
        reversal or late event can concern them."""
        for aid in [a for a, e in st["f"].items() if e["exp"] < now]:
            del st["f"][aid]
        horizon = now - self.lateness_ms - 60 * DAY_MS
        for ek in [k for k, until in st["ep"].items() if until < horizon]:
            del st["ep"][ek]
        for sid in [s for s, t in st["rv"].items() if t < now - self.lateness_ms]:
            del st["rv"][sid]

    def _reversal(self, ev: EngineEvent, stateless: list[tuple[Any, Any]], historic: list[tuple[Any, Any]],
                  out: EngineOutput) -> None:
        r = ev.datum
        token = self.pseudo.token(r["psn_no"])
        st = self._state(ev.partition, token)
        if ev.offset <= st["o"]:
            out.skipped += 1
            return
        st["o"] = ev.offset
        target = r["init_setl_id"]
        removed = None
        if r["full_reversal"]:
            st["rv"][target] = r["setl_time"]  # should the settlement still come (it was overtaken)
            tl = st["tl"]
            for i, e in enumerate(tl):
                if e["s"] == target:
                    removed = tl.pop(i)
                    break
            self._retract(target, st, ev, historic, out)
            if removed is not None:
                for rule, kind in historic:
                    if kind.episodic:
                        self._episodes(rule, kind, removed, tl, token, r["insu_admdvs"], st, ev, out,
                                       f"settlement {target} fully reversed")
        self.person.put(ev.partition, token, st)
        if removed is not None and removed["mt"] in INPATIENT and removed["drg"]:
            rec = orjson.dumps({"s": bounded_id(target), "m": bounded_id(removed["m"]), "h": bounded_id(removed["h"]),
                                "drg": bounded_id(removed["drg"]), "sev": removed["drg"][-1:], "amt": removed["amt"],
                                "t": removed["t"], "tok": token, "r": r["insu_admdvs"], "rev": 1, "rt": r["setl_time"]})
            out.emits.append(("internal.stays-by-hospital", bounded_id(removed["h"]).encode(), rec))
            out.emits.append(("internal.stays-by-drg", bounded_id(removed["drg"]).encode(), rec))
            out.emit_sources += [(ev.partition, ev.offset)] * 2

    def _retract(self, setl_id: str, st: dict[str, Any], ev: EngineEvent, historic: list[tuple[Any, Any]],
                 out: EngineOutput) -> None:
        """Re-evaluate every standing alert that rests on the reversed settlement, without it."""
        by_id = {r.id: (r, k) for r, k in historic}
        tl = st["tl"]
        token = self.pseudo.token(ev.datum["psn_no"])
        for aid in list(st["f"]):
            fired = fired_datum(st, aid)
            if fired is None or setl_id not in fired["setl_ids"]:
                continue
            rk = by_id.get(fired["rule_id"])
            if rk is not None and rk[1].episodic:
                continue  # episodes are chosen again by _episodes
            refound: list[Finding] = []
            if rk is not None:
                rule, kind = rk
                for e in tl:
                    if e["s"] in fired["setl_ids"]:
                        refound.extend(kind.historic(rule, e, tl, self.k))
            same = [fd for fd in refound if alert_id(fd.rule.id, fired["psn_token"], fd.key) == aid]
            if same:
                # still holds without it: it now rests on the remaining settlements
                st["f"][aid]["d"] = {**fired, "setl_ids": list(same[0].setl_ids),
                                     "mdtrt_ids": list(same[0].mdtrt_ids)}
                continue
            datum = retract(st, aid, ev.datum["setl_time"], f"settlement {setl_id} fully reversed")
            out.alerts.append((datum, ev.partition, ev.offset))
            for fd in refound:  # a different window may still qualify
                self._fire(fd, token, fired["admdvs"] or "", st, ev, out)
