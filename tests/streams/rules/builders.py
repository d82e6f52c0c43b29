"""Small builders for the rule-engine tests: raw datums, fee lines and a rig around the engines.

Raw values as on the wire: money in fen, ``cnt`` at scale 4, ``pric`` at scale 6, times in epoch
ms, dates in epoch days. Days are China calendar days (UTC+8) counted from ``BASE`` (2024-03-04),
so ``ms(0, 23, 59)`` and ``ms(1, 0, 0)`` are one minute apart but on different natural days.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from streams.privacy import Pseudonymizer
from streams.processors import STAY
from streams.rules import RULES_FILE, RuleBook, check_rule, load_knowledge, load_rules_file
from streams.rules.engine import SettlementEngine
from streams.rules.events import EngineEvent, EngineOutput
from streams.rules.grouped import GroupedEngine
from streams.rules.state import Store

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
CHINA = dt.timezone(dt.timedelta(hours=8))
BASE = dt.date(2024, 3, 4)
BASE_DAY = (BASE - dt.date(1970, 1, 1)).days  # epoch day of BASE

KNOWLEDGE = load_knowledge()
PSEUDO = Pseudonymizer(b"k" * 32, "k1")

# --- items from the knowledge tables (name, and why a test uses it) ---------------------------------
PSA = "002505000320000"  # 前列腺特异性抗原测定: male only, age ≥ 45, hospital level ≥ 2
CERVICAL = "002703000010000"  # 宫颈细胞学检查: female only, age ≥ 21, level ≥ 2
DELIVERY = "003315100010000"  # 单胎顺产接生: female, age 18-45, inpatient only
LEVOFLOXACIN = "XJ01MAZ012A001011601751"  # 左氧氟沙星片: age ≥ 18
ENTECAVIR = "XJ05AFE019A009011201311"  # 恩替卡韦分散片: level ≥ 2 (not inpatient only)
OMEPRAZOLE_INJ = "XA02BCA013B062012402531"  # 注射用奥美拉唑钠: inpatient only, any level
OUTPATIENT_CONSULT = "001102000010000"  # 普通门诊诊查费: cap 8 / 9 / 10 yuan by level, 1 per visit
INPATIENT_CONSULT = "001102000040000"  # 住院诊查费: consult, 1 per day
BED = "001103000010001"  # 床位费(三人间): bed, 1 per day, cap 48 / 54 / 60
BED_DOUBLE = "001103000010002"  # 床位费(双人间)
NURSING_1 = "001201000010000"  # Ⅰ级护理: primary of Ⅱ级护理 (same day)
NURSING_2 = "001201000020000"  # Ⅱ级护理
ECG_MONITOR = "001202000010000"  # 心电监测: ≤ 24 hours a day
IV_DRIP = "001211000030000"  # 静脉输液: treatment, no restriction
BIOCHEM_PANEL = "002503990010000"  # 血清生化全套检查: contains ALT (same visit), inpatient only
ALT = "002503000040000"  # 丙氨酸氨基转移酶测定: secondary of the panel
CBC = "002501000010000"  # 血常规: test, no restriction
URINE = "002502000010000"  # 尿常规: test, no restriction
HBA1C = "002503010030000"  # 糖化血红蛋白测定: 15 days between tests
FRUCTOSAMINE = "002503010040000"  # 血清果糖胺测定: 7 days between tests
AMLODIPINE = "XC08CAA133A001010100101"  # long-term, C08CA, 1 day per tablet
NIFEDIPINE = "XC08CAN026A024010600651"  # long-term, C08CA, 1 day per tablet
METFORMIN = "XA10BAE014A010010300321"  # long-term, A10BA, 1/2 day per tablet
AMOXICILLIN = "XJ01CAA040B001011401531"  # not long-term, J01CA, 4 days per box
SALBUTAMOL = "XR03ACS030L021012002191"  # as needed (no days of supply), R03AC

HOSP = "H11010500001"  # a level-3 hospital in Beijing (110105)
REGION = "110105"


def hospital(n: int, region: str = REGION) -> str:
    """The n-th designated hospital of ``region`` (``H`` + 6-digit region + 5 digits)."""
    return f"H{region}{n:05d}"


def pharmacy(n: int, region: str = REGION) -> str:
    return f"P{region}{n:05d}"


def ms(day: int, hour: int = 10, minute: int = 0) -> int:
    """Epoch ms of China time ``hour:minute`` on day ``day`` after BASE."""
    return int(dt.datetime.combine(BASE + dt.timedelta(days=day), dt.time(hour, minute), CHINA).timestamp() * 1000)


def date(day: int) -> int:
    """Epoch day of day ``day`` after BASE (adm_date / dscg_date / brdy)."""
    return BASE_DAY + day


def scaled(value: str | int | Decimal, scale: int) -> int:
    d = Decimal(str(value)).scaleb(scale)
    assert d == d.to_integral_value(), f"{value} has more than {scale} decimals"
    return int(d)


def line(code: str, cnt: str | int = 1, pric: str | None = None, t: int | None = None) -> dict[str, Any]:
    """One fee line of a knowledge-table item; the default price is its lowest cap (never over-priced)."""
    caps = KNOWLEDGE.price_caps.get(code)
    p = scaled(pric, 6) if pric is not None else min(caps.values()) if caps else 10_000_000
    c = scaled(cnt, 4)
    return {
        "feedetl_sn": "", "hilist_code": code, "hilist_name": KNOWLEDGE.names.get(code, code),
        "med_list_codg": code, "cnt": c, "pric": p, "det_item_fee_sumamt": c * p // 10**8,
        "fee_ocur_time": t, "bilg_dr_code": None, "medc_days": None,
    }


def settlement(setl_id: str, t: int, lines: Sequence[dict[str, Any]], *, psn: str = "PSN001",
               med_type: str = "11", h: str = HOSP, hosp_lv: str = "3", gend: str = "MALE", age: int = 50,
               brdy: int | None = None, insu: str = REGION, mdtrt: str | None = None,
               mdtrt_id: str | None = None, adm: int | None = None, dscg: int | None = None,
               dx: str | None = None, drg: str | None = None, ops: Sequence[str] = (),
               medfee: int | None = None) -> dict[str, Any]:
    """A raw Settlement; lines without a time happen an hour before settling; paid all in cash."""
    fee_lines = []
    for i, ln in enumerate(lines):
        ln = dict(ln, feedetl_sn=f"{setl_id}-{i + 1}")
        if ln["fee_ocur_time"] is None:
            ln["fee_ocur_time"] = t - HOUR_MS
        fee_lines.append(ln)
    total = sum(ln["det_item_fee_sumamt"] for ln in fee_lines) if medfee is None else medfee
    if brdy is None:  # the birthday is today: exactly ``age`` completed years
        today = dt.datetime.fromtimestamp(t / 1000, CHINA).date()
        brdy = (today.replace(year=today.year - age) - dt.date(1970, 1, 1)).days
    zero = {k: 0 for k in ("fulamt_ownpay_amt", "overlmt_selfpay", "preselfpay_amt", "hifp_pay", "hifmi_pay",
                           "hifob_pay", "maf_pay", "fund_pay_sumamt", "acct_pay")}
    return {
        "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"setl/{setl_id}")), "setl_id": setl_id,
        "mdtrt_id": mdtrt_id or f"M-{setl_id}", "psn_no": psn, "psn_cert_no": f"cert-{psn}", "psn_name": None,
        "gend": gend, "brdy": brdy, "insutype": "310", "med_type": med_type, "fixmedins_code": h,
        "hosp_lv": hosp_lv, "insu_admdvs": insu, "mdtrt_admdvs": mdtrt or insu, "setl_time": t,
        "medfee_sumamt": total, "inscp_amt": total, **zero, "psn_cash_pay": total, "clr_type": "11",
        "dscg_maindiag_code": dx, "adm_date": adm, "dscg_date": dscg, "drg_code": drg, "oprn_codes": list(ops),
        "fee_details": fee_lines,
    }


def stay(setl_id: str, t: int, adm_day: int, dscg_day: int, lines: Sequence[dict[str, Any]], *,
         dx: str = "J18.900", drg: str | None = "ES23", **kw: Any) -> dict[str, Any]:
    """An inpatient (med_type 21) settlement, settled on the discharge day."""
    return settlement(setl_id, t, lines, med_type="21", adm=date(adm_day), dscg=date(dscg_day), dx=dx, drg=drg,
                      **kw)


def reversal(s: dict[str, Any], *, full: bool = True, t: int | None = None) -> dict[str, Any]:
    """A raw SettlementReversal of settlement ``s`` (full: every amount back; partial: half)."""
    part = 1 if full else 2
    money = {k: s[k] // part for k in ("medfee_sumamt", "inscp_amt", "hifp_pay", "hifmi_pay", "hifob_pay",
                                          "maf_pay", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")}
    return {
        "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"rev/{s['setl_id']}/{full}")),
        "setl_id": f"R-{s['setl_id']}", "init_setl_id": s["setl_id"], "mdtrt_id": s["mdtrt_id"],
        "psn_no": s["psn_no"], "insutype": s["insutype"], "med_type": s["med_type"],
        "fixmedins_code": s["fixmedins_code"], "insu_admdvs": s["insu_admdvs"], "mdtrt_admdvs": s["mdtrt_admdvs"],
        "setl_time": t if t is not None else s["setl_time"] + DAY_MS, "init_setl_time": s["setl_time"],
        "refd_setl_flag": True, "full_reversal": full, **money, "rea": "退费",
    }


def token(psn: str = "PSN001") -> str:
    return PSEUDO.token(psn)


def seed_book() -> RuleBook:
    return RuleBook(load_rules_file(RULES_FILE, check_rule), check_rule)


def rule_update(book: RuleBook, rule_id: str, *, version: int | None = None, enabled: bool | None = None,
                **params: Any) -> Any:
    """Apply a rules-topic record changing ``rule_id`` (next version by default) as a worker would."""
    old = book.current.by_id(rule_id)
    assert old is not None
    d = old.to_dict()
    d["version"] = version if version is not None else old.version + 1
    if enabled is not None:
        d["enabled"] = enabled
    d["params"] = {**d["params"], **params}
    return book.apply(json.dumps(d).encode(), rule_id.encode())


class Rig:
    """A SettlementEngine over the seed rules with a fresh person store; offsets count per partition."""

    def __init__(self, lateness_days: int = 35, book: RuleBook | None = None) -> None:
        self.book = book or seed_book()
        self.store = Store("person", "t")
        self.engine = SettlementEngine(self.book, KNOWLEDGE, PSEUDO, self.store, allowed_lateness_days=lateness_days)
        self.next_offset: dict[int, int] = {}

    def send(self, *datums: dict[str, Any], partition: int = 0, offset: int | None = None) -> EngineOutput:
        """One batch of events (Settlement or SettlementReversal, told apart by their fields)."""
        events = []
        for d in datums:
            o = offset if offset is not None else self.next_offset.get(partition, 0)
            self.next_offset[partition] = max(self.next_offset.get(partition, 0), o + 1)
            record = "SettlementReversal" if "init_setl_id" in d else "Settlement"
            events.append(EngineEvent(record, d, partition, o))
        return self.engine.process(events)

    def alerts(self, *datums: dict[str, Any], rule: str | None = None, **kw: Any) -> list[dict[str, Any]]:
        """Send one batch; its alert datums (of ``rule`` only, when given)."""
        return only(self.send(*datums, **kw), rule)

    def each(self, datums: Iterable[dict[str, Any]], rule: str | None = None) -> list[dict[str, Any]]:
        """Send each datum as its own batch; all alert datums (of ``rule`` only, when given)."""
        out: list[dict[str, Any]] = []
        for d in datums:
            out += self.alerts(d, rule=rule)
        return out


def only(out: EngineOutput, rule: str | None) -> list[dict[str, Any]]:
    return [a for a, _, _ in out.alerts if rule is None or a["rule_id"] == rule]


# --- the re-keyed stay streams (what SettlementEngine emits for inpatient stays) -------------------

def stay_value(setl_id: str, t: int, *, h: str = HOSP, drg: str = "ES23", amt: int = 800_000, tok: str = "tok",
               rev: bool = False, rt: int | None = None) -> bytes:
    """One record of internal.stays-by-hospital / -by-drg, as streams.rules.engine writes it."""
    rec: dict[str, Any] = {"s": setl_id, "m": f"M-{setl_id}", "h": h, "drg": drg, "sev": drg[-1:], "amt": amt,
                           "t": t, "tok": tok, "r": REGION, "rev": int(rev)}
    if rt is not None:
        rec["rt"] = rt
    return json.dumps(rec, separators=(",", ":")).encode()


class GroupedRig:
    """A GroupedEngine (``by`` = "hospital" or "drg") over the seed rules; offsets count up."""

    def __init__(self, by: str, book: RuleBook | None = None) -> None:
        self.book = book or seed_book()
        self.store = Store(by, "t")
        self.engine = GroupedEngine(self.book, self.store, by)
        self.by = by
        self.offset = 0

    def send(self, *values: bytes, offset: int | None = None, partition: int = 0) -> EngineOutput:
        events = []
        for v in values:
            rec = json.loads(v)
            o = offset if offset is not None else self.offset
            self.offset = max(self.offset, o + 1)
            events.append(EngineEvent(STAY, rec, partition, o, key=rec["h"] if self.by == "hospital" else rec["drg"]))
        return self.engine.process(events)

    def alerts(self, *values: bytes, rule: str | None = None, **kw: Any) -> list[dict[str, Any]]:
        return only(self.send(*values, **kw), rule)


def month_ms(yyyymm: int, day: int = 10, hour: int = 10) -> int:
    y, m = divmod(yyyymm, 100)
    return int(dt.datetime(y, m, day, hour, tzinfo=CHINA).timestamp() * 1000)


def expect(a: dict[str, Any], rule_id: str, setl_ids: Sequence[str], *, window: tuple[int, int] | None = None,
           status: str = "FIRED", book: RuleBook | None = None) -> None:
    """``a`` is an alert of ``rule_id`` carrying the rule's current metadata, on exactly ``setl_ids``."""
    rule = (book or seed_book()).current.by_id(rule_id)
    assert rule is not None
    assert (a["rule_id"], a["status"]) == (rule_id, status)
    assert (a["rule_version"], a["result_type"], a["severity"]) == (
        rule.version, rule.result_type.value, rule.severity.value)
    assert a["setl_ids"] == sorted(setl_ids)
    if window is not None:
        assert (a["window_start"], a["window_end"]) == window
