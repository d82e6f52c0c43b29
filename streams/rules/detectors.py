"""Detector kinds: the reusable shapes that rules instantiate with parameters.

A settlement is read once (``facts``): one pass over its fee lines collects everything any rule
needs (restricted lines, price excess, per-day quantities, tests, drugs, day categories). Each
rule kind then looks only at the facts and, for person-history kinds, at the person's timeline:
a compact, time-ordered list of recent settlements kept in the ``person`` store.

Windows are on event time (``setl_time`` / ``fee_ocur_time``, China calendar days):
tumbling (natural day), hopping/sliding (N days ending at each settlement), session (a gap
between discharge and the next admission), stay (one inpatient settlement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.calendar import CHINA_OFFSET_MS, DAY_MS, HOUR_MS, china_day, day_start_ms

from .knowledge import OTHER, Knowledge
from .model import Rule, RuleError

INPATIENT = frozenset({"21", "22", "52"})  # inpatient, and maternity stays (生育住院)
#: The institution of a finding about a person across institutions (doctor shopping, one card in
#: two provinces): none of them. Which one completed the pattern depends on arrival order, and the
#: behaviour is the person's; the institutions are in the evidence (``fixmedins_codes``).
PERSON_LEVEL = ""


@dataclass(frozen=True)
class Finding:
    """A rule that holds for a subject and window; the engine turns it into an alert once."""

    rule: Rule
    key: str  # distinguishes windows/items of one rule and subject (part of the alert id)
    fixmedins_code: str
    window_start: int
    window_end: int
    setl_ids: tuple[str, ...]
    mdtrt_ids: tuple[str, ...]
    amount_at_risk: int
    evidence: dict[str, str]
    detected_at: int
    episode: tuple[str, int] | None = None  # (episode key, until ms): one alert per episode


@dataclass
class Facts:
    """Everything the rules need from one settlement, gathered in one pass over its lines."""

    setl_id: str
    mdtrt_id: str
    setl_time: int
    day: int  # China calendar day of setl_time
    fixmedins_code: str
    hosp_lv: int
    med_type: str
    inpatient: bool
    age: int
    gend: str
    province: str
    insu_province: str
    adm: int | None
    dscg: int | None
    maindiag: str  # category (first three characters) of the main discharge diagnosis
    ops: int
    drg: str
    medfee: int
    restricted: list[tuple[str, str, int, str]] = field(default_factory=list)  # code, what, fee, detail
    price: list[tuple[str, int, int, int]] = field(default_factory=list)  # code, pric, cap, excess fen
    freq: dict[tuple[str, int], int] = field(default_factory=dict)  # (code, day) → Σcnt (scale 4)
    freq_fee: dict[tuple[str, int], int] = field(default_factory=dict)
    dup: list[tuple[str, int, int]] = field(default_factory=list)  # code, time, fee (pair codes only)
    tests: list[tuple[str, int, int]] = field(default_factory=list)  # code, time, fee (interval codes)
    drugs: list[tuple[str, str, int, int, int]] = field(default_factory=list)  # generic, class, days×1000, fee, lt
    day_cats: dict[int, set[str]] = field(default_factory=dict)  # inpatient only
    day_fee: dict[int, int] = field(default_factory=dict)  # inpatient only
    test_fee: int = 0  # inpatient only


#: Every field :func:`gather` reads from a settlement, a fee line's as ``fee_details.<field>``: the
#: columnar path hands the engine dicts of these alone (streams.rows_columnar.frame_dicts).
GATHERED = frozenset({
    "setl_id", "mdtrt_id", "setl_time", "fixmedins_code", "hosp_lv", "med_type", "gend", "mdtrt_admdvs",
    "insu_admdvs", "adm_date", "dscg_date", "dscg_maindiag_code", "oprn_codes", "drg_code", "medfee_sumamt",
    "fee_details.hilist_code", "fee_details.det_item_fee_sumamt", "fee_details.fee_ocur_time",
    "fee_details.pric", "fee_details.cnt",
})


def gather(s: dict[str, Any], age: int, k: Knowledge, dup_codes: frozenset[str],
           tolerance_pm: int = 0) -> Facts:
    """One pass over a settlement's lines (raw values)."""
    mt = s["med_type"]
    lv = int(s["hosp_lv"]) if s["hosp_lv"].isdigit() else 9
    f = Facts(
        setl_id=s["setl_id"], mdtrt_id=s["mdtrt_id"], setl_time=s["setl_time"], day=china_day(s["setl_time"]),
        fixmedins_code=s["fixmedins_code"], hosp_lv=lv, med_type=mt, inpatient=mt in INPATIENT, age=age, gend=s["gend"],
        province=s["mdtrt_admdvs"][:2], insu_province=s["insu_admdvs"][:2],
        adm=s.get("adm_date"), dscg=s.get("dscg_date"), maindiag=(s.get("dscg_maindiag_code") or "")[:3],
        ops=len(s.get("oprn_codes") or ()), drg=s.get("drg_code") or "", medfee=s["medfee_sumamt"],
    )
    info_of = k.line_info().get
    other = OTHER
    gend, inp = f.gend, f.inpatient
    day_cats, day_fee = f.day_cats, f.day_fee
    for ln in s["fee_details"]:
        code = ln["hilist_code"]
        fee = ln["det_item_fee_sumamt"]
        t = ln["fee_ocur_time"]
        day = (t + CHINA_OFFSET_MS) // DAY_MS  # china_day, inline: once per fee line
        info = info_of(code, other)
        if inp:  # per-day categories and test fees: only stay rules use them
            cat = info.category
            dc = day_cats.get(day)
            if dc is None:
                dc = day_cats[day] = set()
            dc.add(cat)
            day_fee[day] = day_fee.get(day, 0) + fee
            if cat == "test":
                f.test_fee += fee
        if info is other:
            continue
        r = info.restriction
        if r is not None:
            if r.sex and gend in ("MALE", "FEMALE") and r.sex != gend:
                f.restricted.append((code, "sex", fee, f"{r.name} is for {r.sex.lower()} patients only"))
            if (r.min_age is not None and age < r.min_age) or (r.max_age is not None and age > r.max_age):
                f.restricted.append((code, "age", fee, f"{r.name}: age {age} outside "
                                                       f"{r.min_age or 0}-{r.max_age or '∞'}"))
            if r.min_hosp_lv and lv != 9 and lv < r.min_hosp_lv:
                f.restricted.append((code, "level", fee, f"{r.name} needs a level-{r.min_hosp_lv} hospital"))
            if r.inpatient_only and not inp:
                f.restricted.append((code, "setting", fee, f"{r.name} is for inpatients only"))
        cap = info.caps
        if cap is not None:
            c = cap.get(lv, cap[3])
            p = ln["pric"]
            if p * 1000 > c * (1000 + tolerance_pm):
                excess = (p - c) * ln["cnt"] // 10**8
                f.price.append((code, p, c, excess))
        if info.freq_limit is not None:
            kd = (code, day)
            f.freq[kd] = f.freq.get(kd, 0) + ln["cnt"]
            f.freq_fee[kd] = f.freq_fee.get(kd, 0) + fee
        if info.dup:
            f.dup.append((code, t, fee))
        if info.interval_days is not None:
            f.tests.append((code, t, fee))
        d = info.drug
        if d is not None:
            f.drugs.append((d.generic, d.drug_class, ln["cnt"] * info.days_num // info.days_den, fee,
                            int(d.long_term)))
    return f


def entry_of(f: Facts, excluded_dx: frozenset[str], k: Knowledge) -> dict[str, Any]:
    """The compact timeline entry kept for person-history rules (JSON-able, no personal data).

    Keys (short: the stored format, see streams/rules/engine.py): ``s`` setl_id, ``m`` mdtrt_id,
    ``t`` setl_time, ``h`` fixmedins_code, ``p`` province of treatment, ``mt`` med_type, ``a`` / ``d``
    admission / discharge date, ``dx`` main diagnosis category, ``ex`` 1 when that diagnosis is
    excluded from split-stay rules (chemo-, radio-, dialysis), ``drg``, ``amt`` medfee_sumamt, ``rx``
    drugs [generic, class, days x 1000, fee, long-term], ``tests`` [item, time, fee], ``dup``
    duplicate-pair items [item, time, fee], ``fq`` quantities of frequency-limited items per China day
    [item, day, Σcnt (scale 4), Σfee].
    """
    return {
        "s": f.setl_id, "m": f.mdtrt_id, "t": f.setl_time, "h": f.fixmedins_code, "p": f.province, "mt": f.med_type,
        "a": f.adm, "d": f.dscg, "dx": f.maindiag, "ex": int(f.maindiag in excluded_dx or any(
            f.maindiag.startswith(x) for x in excluded_dx)), "drg": f.drg, "amt": f.medfee,
        "rx": [[g, c, d, fee, lt] for g, c, d, fee, lt in f.drugs],
        "tests": [[c, t, fee] for c, t, fee in f.tests],
        "dup": [[c, t, fee] for c, t, fee in f.dup],
        "fq": [[c, day, cnt, f.freq_fee[(c, day)]] for (c, day), cnt in f.freq.items()],
    }


# --- the kinds -----------------------------------------------------------------------------------

Stateless = Callable[[Rule, Facts, Knowledge], list[Finding]]
Historic = Callable[[Rule, dict[str, Any], list[dict[str, Any]], Knowledge], list[Finding]]


@dataclass(frozen=True)
class Kind:
    name: str
    params: dict[str, type | tuple[type, ...]]
    stateless: Stateless | None = None
    historic: Historic | None = None
    #: how far back in a person's history the kind looks (days), from its parameters
    horizon_days: Callable[[Rule], int] = lambda r: 0
    #: one alert per episode: the detector returns every window of the settlement's groups that
    #: holds and ends at or after it; the engine picks the episodes (streams/rules/engine.py)
    episodic: bool = False
    #: the episode groups (generic, drug class) a timeline entry touches, for an episodic kind
    groups: Callable[[Rule, dict[str, Any]], set[str]] = lambda r, e: set()
    #: its scope is one visit: a settlement later than the allowed lateness is still judged with
    #: the settlements of its visit already in the timeline
    visit: bool = False

    def check(self, rule: Rule) -> None:
        for name, typ in self.params.items():
            v = rule.param(name)
            if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
                raise RuleError(f"{rule.id}: parameter {name} must be {getattr(typ, '__name__', typ)}", name)


def _one(rule: Rule, f: Facts, key: str, amount: int, evidence: dict[str, str],
         start: int | None = None, end: int | None = None) -> Finding:
    return Finding(rule, key, f.fixmedins_code, f.setl_time if start is None else start,
                   f.setl_time if end is None else end, (f.setl_id,), (f.mdtrt_id,), amount, evidence, f.setl_time)


def item_restriction(rule: Rule, f: Facts, k: Knowledge) -> list[Finding]:
    what = rule.param("restriction")
    hits = [x for x in f.restricted if x[1] == what]
    if not hits:
        return []
    return [_one(rule, f, f.setl_id, sum(h[2] for h in hits), {
        "items": ",".join(sorted({h[0] for h in hits})), "detail": "; ".join(sorted({h[3] for h in hits})),
        "age": str(f.age), "gend": f.gend, "hosp_lv": str(f.hosp_lv), "med_type": f.med_type,
    })]


def over_price(rule: Rule, f: Facts, k: Knowledge) -> list[Finding]:
    tol = int(rule.param("tolerance_pm"))
    hits = [p for p in f.price if p[1] * 1000 > p[2] * (1000 + tol)]
    if not hits:
        return []
    return [_one(rule, f, f.setl_id, sum(max(0, h[3]) for h in hits), {
        "items": ",".join(sorted({h[0] for h in hits})),
        "detail": "; ".join(f"{h[0]} {h[1] / 1e6:.2f} > cap {h[2] / 1e6:.2f}" for h in hits[:5]),
    })]


def over_frequency(rule: Rule, cur: dict[str, Any], tl: list[dict[str, Any]], k: Knowledge) -> list[Finding]:
    """Σcnt of an item on one China day of one visit above its limit: summed over every settlement
    of the visit (a stay settled in parts, 中途结算), whichever part arrives first."""
    if not cur["fq"]:
        return []
    m, h, s = cur["m"], cur["h"], cur["s"]
    visit = [e for e in tl if e["m"] == m and e["h"] == h and e["fq"]]
    if not any(e["s"] == s for e in visit):
        visit.append(cur)
    totals = {(c, d): [0, 0] for c, d, _, _ in cur["fq"]}  # Σcnt, Σfee over the visit
    for e in visit:
        for c, d, cnt, fee in e["fq"]:
            acc = totals.get((c, d))
            if acc is not None:
                acc[0] += cnt
                acc[1] += fee
    limits = k.frequency_limits
    out = []
    for (code, day), (cnt, fee) in sorted(totals.items()):
        limit = limits[code] * 10**4
        if cnt > limit:
            parts = [(e, x) for e in visit for x in e["fq"] if x[0] == code and x[1] == day]
            excess = fee - fee * limit // cnt
            start, end = _day_window(day)
            out.append(Finding(rule, f"{cur['m']}|{code}|{day}", cur["h"], start, end,
                               tuple(sorted({e["s"] for e, _ in parts})), (cur["m"],), excess, {
                                   "item": code, "day": str(day), "quantity": f"{cnt / 10**4:g}",
                                   "limit_per_day": str(k.frequency_limits[code]),
                               }, max(e["t"] for e, _ in parts)))
    return out


def low_threshold(rule: Rule, f: Facts, k: Knowledge) -> list[Finding]:
    if not f.inpatient or f.adm is None or f.dscg is None or f.ops or f.medfee <= 0:
        return []
    los = f.dscg - f.adm
    share_pm = f.test_fee * 1000 // f.medfee
    if los <= int(rule.param("max_los_days")) and share_pm >= int(rule.param("min_test_share_pm")):
        return [_one(rule, f, f.setl_id, f.medfee, {
            "los_days": str(los), "test_share": f"{share_pm / 10:.1f}%", "operations": "0",
        }, start=day_start_ms(f.adm), end=f.setl_time)]
    return []


def bed_hanging(rule: Rule, f: Facts, k: Knowledge) -> list[Finding]:
    if not f.inpatient:
        return []
    only = frozenset(rule.param("idle_categories"))
    need = int(rule.param("min_days"))
    run = best = 0
    best_end = 0
    run_fee = idle_fee = 0
    prev = None
    for day in sorted(f.day_cats):
        if f.day_cats[day] <= only:
            if prev is None or day != prev + 1:  # idle days must be consecutive calendar days
                run = run_fee = 0
            run += 1
            run_fee += f.day_fee.get(day, 0)
            prev = day
            if run > best:
                best, best_end, idle_fee = run, day, run_fee
        else:
            run = run_fee = 0
            prev = day
    if best >= need:
        return [_one(rule, f, f.setl_id, idle_fee, {
            "idle_days": str(best), "last_idle_day": str(best_end),
            "categories": ",".join(sorted(only)),
        }, start=day_start_ms(f.adm or f.day), end=f.setl_time)]
    return []


def _day_window(day: int) -> tuple[int, int]:
    return day_start_ms(day), day_start_ms(day + 1) - 1


def _in_scope(scope: str, sec_e: dict[str, Any], sec_t: int, prim_e: dict[str, Any], prim_t: int) -> bool:
    if scope == "visit":
        return bool(sec_e["m"] == prim_e["m"])
    if scope == "day":
        return china_day(sec_t) == china_day(prim_t)
    return abs(sec_t - prim_t) <= 6 * HOUR_MS


def duplicate_charge(rule: Rule, cur: dict[str, Any], tl: list[dict[str, Any]], k: Knowledge) -> list[Finding]:
    """Secondary item billed with its primary in the same visit, natural day or 6 h (same hospital).

    The current settlement may hold either side (a late primary finds its earlier secondary); the
    alert is keyed by the secondary line, so finding it from both sides alerts once.
    """
    if not cur["dup"]:
        return []
    by_sec, by_prim = k.pairs_by_secondary(), k.pairs_by_primary()
    # line times decide the scope: a stay's settlement comes at discharge, its lines span the stay
    same_h = [e for e in tl if e["h"] == cur["h"] and e["dup"]]
    found: dict[str, Finding] = {}

    def add(pair: Any, sec_e: dict[str, Any], sec_t: int, fee: int, prim_e: dict[str, Any], prim_t: int) -> None:
        key = f"{sec_e['s']}|{pair.secondary}|{china_day(sec_t)}"
        if key not in found:
            found[key] = Finding(rule, key, cur["h"], min(sec_t, prim_t), max(sec_t, prim_t),
                                 tuple(sorted({sec_e["s"], prim_e["s"]})), tuple(sorted({sec_e["m"], prim_e["m"]})),
                                 fee, {"primary": pair.primary, "secondary": pair.secondary, "scope": pair.scope},
                                 max(sec_e["t"], prim_e["t"]))

    for code, t, fee in cur["dup"]:
        for pair in by_sec.get(code, ()):
            for e in same_h:
                for pcode, pt, _ in e["dup"]:
                    if pcode == pair.primary and _in_scope(pair.scope, cur, t, e, pt):
                        add(pair, cur, t, fee, e, pt)
        for pair in by_prim.get(code, ()):
            for e in same_h:
                for scode, st, sfee in e["dup"]:
                    if scode == pair.secondary and _in_scope(pair.scope, e, st, cur, t):
                        add(pair, e, st, sfee, cur, t)
    return list(found.values())


def repeat_interval(rule: Rule, cur: dict[str, Any], tl: list[dict[str, Any]], k: Knowledge) -> list[Finding]:
    """The same test again before its minimum interval (either neighbour: late events count)."""
    out = []
    for code, t, fee in cur["tests"]:
        days = k.repeat_intervals[code]
        for e in tl:
            if e["s"] == cur["s"]:
                continue
            for c2, t2, fee2 in e["tests"]:
                if c2 != code or abs(t2 - t) >= days * DAY_MS:
                    continue
                later_s, later_fee = (cur["s"], fee) if t >= t2 else (e["s"], fee2)
                out.append(Finding(rule, f"{later_s}|{code}", cur["h"] if later_s == cur["s"] else e["h"],
                                   min(t, t2), max(t, t2), tuple(sorted({cur["s"], e["s"]})),
                                   tuple(sorted({cur["m"], e["m"]})), later_fee, {
                                       "item": code, "days_between": f"{abs(t - t2) / DAY_MS:.1f}",
                                       "min_interval_days": str(days),
                                   }, max(t, t2)))
    return out


def excess_supply(rule: Rule, cur: dict[str, Any], tl: list[dict[str, Any]], k: Knowledge) -> list[Finding]:
    """Σ days of supply of one generic in a sliding window exceeds window × factor: every such window
    ending at a dispense at or after the current one (the engine picks one alert per episode).

    Dispenses are those of outpatient and pharmacy settlements: what a ward gives a patient during a
    stay is administered, not supplied to take home, and a patient admitted a week after a 30-day
    refill has not been over-prescribed (clean generated traffic did exactly that)."""
    if cur["mt"] in INPATIENT:
        return []
    window = int(rule.param("window_days")) * DAY_MS
    limit_x1000 = int(rule.param("window_days")) * int(rule.param("factor_pm"))
    long_term_only = bool(rule.params.get("long_term_only", True))
    out = []
    for generic in sorted({x[0] for x in cur["rx"] if x[4] or not long_term_only}):
        disp = sorted((e["t"], x[2], x[3], e["s"], e["m"], e["h"]) for e in tl if e["mt"] not in INPATIENT
                      for x in e["rx"] if x[0] == generic)
        for i, (end_t, _, _, end_s, _, end_h) in enumerate(disp):
            if end_t < cur["t"]:
                continue
            inside = [x for x in disp[: i + 1] if x[0] > end_t - window]
            total = sum(x[1] for x in inside)
            if total > limit_x1000:
                out.append(Finding(rule, f"{generic}|{end_s}", end_h, end_t - window, end_t,
                                   tuple(sorted({x[3] for x in inside})), tuple(sorted({x[4] for x in inside})),
                                   sum(x[2] for x in inside) * (total - limit_x1000) // total, {
                                       "generic": generic, "days_supplied": f"{total / 1000:.1f}",
                                       "limit_days": f"{limit_x1000 / 1000:.1f}",
                                       "window_days": str(rule.param("window_days")),
                                   }, end_t, episode=(f"{generic}", end_t + window)))
    return out


def distinct_institutions(rule: Rule, cur: dict[str, Any], tl: list[dict[str, Any]], k: Knowledge
                          ) -> list[Finding]:
    """≥ N institutions in one natural day (tumbling), outpatient and pharmacy visits."""
    if cur["mt"] in INPATIENT:
        return []
    day = china_day(cur["t"])
    same = [e for e in tl if china_day(e["t"]) == day and e["mt"] not in INPATIENT]
    hs = {e["h"] for e in same}
    if len(hs) < int(rule.param("min_institutions")):
        return []
    start, end = _day_window(day)
    return [Finding(rule, f"day|{day}", PERSON_LEVEL, start, end, tuple(sorted(e["s"] for e in same)),
                    tuple(sorted(e["m"] for e in same)), sum(e["amt"] for e in same), {
                        "institutions": str(len(hs)), "min_institutions": str(rule.param("min_institutions")),
                        "day": str(day), "fixmedins_codes": ",".join(sorted(hs)),
                    }, max(e["t"] for e in same))]


def distinct_institutions_class(rule: Rule, cur: dict[str, Any], tl: list[dict[str, Any]], k: Knowledge
                                ) -> list[Finding]:
    """≥ N institutions dispensing one drug class within a sliding window: every such window ending at
    a dispense at or after the current one (the engine picks one alert per episode)."""
    window = int(rule.param("window_days")) * DAY_MS
    need = int(rule.param("min_institutions"))
    out = []
    for cls in sorted({x[1] for x in cur["rx"]}):
        disp = sorted((e["t"], e["h"], e["s"], e["m"], x[3]) for e in tl for x in e["rx"] if x[1] == cls)
        for i, (end_t, _, end_s, _, _) in enumerate(disp):
            if end_t < cur["t"]:
                continue
            inside = [x for x in disp[: i + 1] if x[0] > end_t - window]
            hs = {x[1] for x in inside}
            if len(hs) >= need:
                out.append(Finding(rule, f"{cls}|{end_s}", PERSON_LEVEL, end_t - window, end_t,
                                   tuple(sorted({x[2] for x in inside})), tuple(sorted({x[3] for x in inside})),
                                   sum(x[4] for x in inside), {
                                       "drug_class": cls, "institutions": str(len(hs)), "min_institutions": str(need),
                                       "window_days": str(rule.param("window_days")),
                                       "fixmedins_codes": ",".join(sorted(hs)),
                                   }, end_t, episode=(cls, end_t + window)))
    return out


def split_stay(rule: Rule, cur: dict[str, Any], tl: list[dict[str, Any]], k: Knowledge) -> list[Finding]:
    """Readmission to the same hospital within N days of discharge, similar diagnosis, not excluded."""
    if cur["mt"] not in INPATIENT or cur["a"] is None or cur["ex"]:
        return []
    gap = int(rule.param("max_gap_days"))
    out = []
    stays = [e for e in tl if e["mt"] in INPATIENT and e["h"] == cur["h"] and e["s"] != cur["s"]
             and e["a"] is not None and e["d"] is not None and not e["ex"] and e["dx"] == cur["dx"]]
    for e in stays:
        first, second = (e, cur) if e["a"] < cur["a"] or (e["a"] == cur["a"] and e["t"] < cur["t"]) else (cur, e)
        if first["d"] is None or second["a"] is None:
            continue
        days = second["a"] - first["d"]
        if 0 <= days <= gap:
            out.append(Finding(rule, f"{second['s']}", cur["h"], day_start_ms(first["a"]), second["t"],
                               tuple(sorted({first["s"], second["s"]})), tuple(sorted({first["m"], second["m"]})),
                               second["amt"], {
                                   "days_after_discharge": str(days), "max_gap_days": str(gap),
                                   "diagnosis_category": cur["dx"],
                               }, second["t"]))
    return out


def far_apart_same_day(rule: Rule, cur: dict[str, Any], tl: list[dict[str, Any]], k: Knowledge) -> list[Finding]:
    """Settlements in ≥ N provinces on one natural day: one card, two places."""
    day = china_day(cur["t"])
    same = [e for e in tl if china_day(e["t"]) == day]
    provinces = {e["p"] for e in same}
    if len(provinces) < int(rule.param("min_provinces")):
        return []
    start, end = _day_window(day)
    return [Finding(rule, f"day|{day}", PERSON_LEVEL, start, end, tuple(sorted(e["s"] for e in same)),
                    tuple(sorted(e["m"] for e in same)), sum(e["amt"] for e in same), {
                        "provinces": ",".join(sorted(provinces)), "day": str(day),
                        "fixmedins_codes": ",".join(sorted({e["h"] for e in same})),
                    }, max(e["t"] for e in same))]


def _generics(rule: Rule, e: dict[str, Any]) -> set[str]:
    if e["mt"] in INPATIENT:
        return set()
    long_term_only = bool(rule.params.get("long_term_only", True))
    return {x[0] for x in e["rx"] if x[4] or not long_term_only}


def _classes(rule: Rule, e: dict[str, Any]) -> set[str]:
    return {x[1] for x in e["rx"]}


def _days(name: str, extra: int = 0) -> Callable[[Rule], int]:
    return lambda r: int(r.param(name)) + extra


KINDS: dict[str, Kind] = {
    "item_restriction": Kind("item_restriction", {"restriction": str}, stateless=item_restriction),
    "over_price": Kind("over_price", {"tolerance_pm": int}, stateless=over_price),
    "over_frequency": Kind("over_frequency", {}, historic=over_frequency, horizon_days=lambda r: 60, visit=True),
    "low_threshold": Kind("low_threshold", {"max_los_days": int, "min_test_share_pm": int},
                          stateless=low_threshold),
    "bed_hanging": Kind("bed_hanging", {"min_days": int, "idle_categories": list}, stateless=bed_hanging),
    "duplicate_charge": Kind("duplicate_charge", {}, historic=duplicate_charge, horizon_days=lambda r: 2),
    "repeat_interval": Kind("repeat_interval", {"horizon_days": int}, historic=repeat_interval,
                            horizon_days=_days("horizon_days")),
    "excess_supply": Kind("excess_supply", {"window_days": int, "factor_pm": int}, historic=excess_supply,
                          horizon_days=_days("window_days", 1), episodic=True, groups=_generics),
    "distinct_institutions": Kind("distinct_institutions", {"min_institutions": int},
                                  historic=distinct_institutions, horizon_days=lambda r: 1),
    "distinct_institutions_class": Kind("distinct_institutions_class",
                                        {"min_institutions": int, "window_days": int},
                                        historic=distinct_institutions_class, horizon_days=_days("window_days", 1),
                                        episodic=True, groups=_classes),
    "split_stay": Kind("split_stay", {"max_gap_days": int, "exclude_diagnoses": list}, historic=split_stay,
                       horizon_days=lambda r: int(r.param("max_gap_days")) + 90),
    "far_apart_same_day": Kind("far_apart_same_day", {"min_provinces": int}, historic=far_apart_same_day,
                               horizon_days=lambda r: 1),
    # evaluated by the hospital/DRG engine on the re-keyed stay stream (streams/rules/grouped.py)
    "drg_upcoding": Kind("drg_upcoding", {"z_threshold_pm": int, "min_cases": int, "baseline_months": int}),
    "high_cost": Kind("high_cost", {"median_multiple_pm": int, "min_cases": int}),
    # evaluated by the procurement engine on the procurement stream (streams/rules/procurement.py)
    "psi_oversell": Kind("psi_oversell", {"tolerance_pm": int}),
    "trace_duplicate": Kind("trace_duplicate", {"retention_days": int}),
    "volume_lag": Kind("volume_lag", {"lag_points": int, "min_shortfall_yuan": int}),
    "payment_overdue": Kind("payment_overdue", {"days": int}),
    # evaluated periodically from ClickHouse, per closed month, by the monitors (streams/monitors.py)
    "fund_capacity": Kind("fund_capacity", {"min_months_pm": int, "pool_prefix_len": int, "pool_suffix": str}),
    "fund_negative": Kind("fund_negative", {"tolerance_pm": int, "pool_prefix_len": int, "pool_suffix": str}),
    "settled_over_sold": Kind("settled_over_sold", {"tolerance_pm": int, "min_excess_units": int}),
    "credit_low": Kind("credit_low", {"max_score": int}),
}


def check_rule(rule: Rule) -> None:
    """Raise RuleError unless the rule's kind exists and its parameters have the right types."""
    kind = KINDS.get(rule.kind)
    if kind is None:
        raise RuleError(f"{rule.id}: unknown kind {rule.kind!r}; known: {', '.join(sorted(KINDS))}", "kind")
    kind.check(rule)
    if rule.kind == "item_restriction" and rule.param("restriction") not in ("sex", "age", "level", "setting"):
        raise RuleError(f"{rule.id}: parameter restriction must be sex, age, level or setting", "restriction")
