"""Deterministic, realistic synthetic traffic for the settlement, procurement and supervision streams.

Why: every later stage (workers, sinks, rules, benchmarks, demos) needs traffic that looks like a
pooling region's real data, is reproducible bit for bit (same seed and config, same bytes), and is
cheap enough to generate at benchmark rates. The datums are in the codec's **raw** representation
(unscaled ints for decimals, epoch milliseconds, epoch days, enum symbols), so they can be handed to
``schemas.Codec.encode`` without conversion, and the generator never builds a ``Decimal`` or a
``datetime`` per event.

How the traffic is shaped:

* Settlement times come from a minute-resolution intensity (China time: 08:00-12:00 and
  14:00-17:30 peaks, quiet nights, lighter weekends); the exact count asked for is produced.
* Everything else (reversals, filings, procurement chains, inspections, fund income) is scheduled
  on a time-ordered heap and emitted when the settlement clock passes it, so the output is in
  non-decreasing event-time order with the subsystems interleaved, as a stream consumer sees them.
* "Normal" traffic deliberately stays clear of the intelligent-monitoring rules of the domain
  reference (no same-day repeat visits, no visits during a stay, no readmission within 31 days,
  chronic refills at least 30 days apart, repeat tests respect their minimum interval,
  sex/age/level-restricted items only where allowed, prices never above the cap, one bed and one
  nursing charge per day, nothing sold that is not in stock, every cross-province settlement backed
  by an earlier filing for that city, purchases under a volume-based procurement contract kept at
  the pace of its cycle), so a rule that fires on it is a false positive. Anomalies are
  planted later through :class:`EventHook` with their own RNG, so planting never shifts the base
  traffic and the planted event ids are the ground truth.
* Identifiers are deterministic and unique within a run; ``event_id`` is a UUID-4-formatted string
  drawn from the seeded RNG.

Formats chosen where the contracts leave room: supplier codes are valid 18-char unified social
credit codes (``91`` + 6-digit region + GB 11714 organization code + GB 32100 check char);
traceability codes are 7-digit product id + 9-digit unit serial + 4 check digits, one per
movement; a filing names the insured person's and the treatment city's pooling regions (统筹区,
``XXXX99``: it is made with the insured's pooling agency), not their counties; contracts name the
provincial alliance ``XX0000``; line amounts are cnt x pric rounded half-up, and catalogue prices
are chosen so that no line is ever a half-fen tie (half-up and half-even agree).

China has observed no daylight-saving time since 1991, so local time is UTC+8 in integer arithmetic.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from operator import mul as _mul
from pathlib import Path
from typing import Any, Protocol

from schemas import Codec
from schemas.calendar import CHINA, CHINA_OFFSET_MS, DAY_MS, EPOCH_ORDINAL, HOUR_MS, day_start_ms, ymd
from streams.records import RECORDS

from .reference import CATALOGUE, DIAGNOSES, REGIONS, CatalogueItem, DiagProfile, Region

NS = "cn.nhsa.yibao"
SETTLEMENT = f"{NS}.settlement.Settlement"
REVERSAL = f"{NS}.settlement.SettlementReversal"
FILING = f"{NS}.settlement.CrossProvinceFiling"
CONTRACT = f"{NS}.procurement.ProcurementContract"
ORDER = f"{NS}.procurement.ProcurementOrder"
DELIVERY = f"{NS}.procurement.DeliveryAcceptance"
INVENTORY = f"{NS}.procurement.InventoryMovement"
PAYMENT = f"{NS}.procurement.SupplierPayment"
INSPECTION = f"{NS}.supervision.Inspection"
TIP = f"{NS}.supervision.Tip"
PENALTY = f"{NS}.supervision.Penalty"
RECOVERY = f"{NS}.supervision.FundRecovery"
INCOME = f"{NS}.supervision.FundIncome"

#: Field holding the event time of each record the generator produces (streams.records).
EVENT_TIME_FIELD: dict[str, str] = {r: f.event_time for r, f in RECORDS.items()}

DEFAULT_START = datetime(2026, 10, 1, tzinfo=CHINA)
AUTO = -1
"""Sentinel for the size fields of :class:`SimConfig`: scale from ``settlements``."""

_MIN = 60_000
_CNT = 10_000  # scale 4
MAX_TRACES = 100  # traceability codes listed per movement (one per unit, capped)
PACE_SLACK_PM = 60  # contract purchases may lag the elapsed share of the cycle by 6 points before a top-up
_D0_GROWTH_CAP = 64  # a stock-out raises the daily demand estimate to at most 64× its start (or one request)
_PRIC = 1_000_000  # scale 6
_HALF = 50_000_000  # half a fen at scale 10 (cnt x pric)
_FEN = 100_000_000


# --- reference data ------------------------------------------------------------------------------

# Where people who live and seek care in another province go (retirees to Hainan, workers to the
# Pearl River Delta, referrals to Beijing/Shanghai): multiplier on the destination's weight.
_DEST_PULL = {"11": 3.0, "31": 3.0, "44": 2.5, "46": 2.5, "33": 1.5}

_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)
_SURNAME_CUM = tuple(
    sum(1.0 / (i + 4) for i in range(k + 1)) for k in range(len(_SURNAMES))
)
# (sex, born before 1975) -> given names typical of the generation
_GIVEN: dict[tuple[bool, bool], tuple[str, ...]] = {
    (True, True): ("建国", "建华", "国强", "志强", "德华", "永刚", "伟", "强", "军", "勇", "明", "刚", "平", "海波",
                   "国庆", "建军", "振华", "卫东"),
    (True, False): ("伟", "磊", "杰", "涛", "斌", "超", "辉", "鹏", "飞", "鑫", "波", "宇", "浩", "子轩", "浩然",
                    "宇轩", "俊杰", "文博", "一鸣", "梓豪"),
    (False, True): ("秀英", "桂英", "秀兰", "玉兰", "桂兰", "淑珍", "丽华", "秀珍", "凤英", "玉梅", "红梅", "芳",
                    "敏", "静", "丽", "霞", "艳", "淑芬"),
    (False, False): ("芳", "娜", "敏", "静", "婷", "雪", "丹", "欣怡", "梓涵", "雨欣", "诗涵", "佳怡", "晓燕",
                     "海燕", "丽娟", "文静", "慧敏", "思雨", "一诺", "雨桐"),
}
_PHONE_PREFIX = (
    "130", "131", "132", "133", "135", "136", "137", "138", "139", "150", "151", "152", "155", "156", "157",
    "158", "159", "166", "176", "177", "180", "181", "182", "183", "185", "186", "187", "188", "189", "191",
    "198", "199",
)
# (lowest age, highest age, population share, relative visits per person)
_AGE_BANDS: tuple[tuple[int, int, float, float], ...] = (
    (0, 14, 0.18, 1.0),
    (15, 29, 0.17, 0.45),
    (30, 44, 0.22, 0.65),
    (45, 59, 0.24, 1.1),
    (60, 69, 0.105, 2.2),
    (70, 79, 0.06, 3.0),
    (80, 95, 0.025, 3.6),
)

# Settlement intensity by local hour; 17:00-17:29 and 17:30-17:59 differ (clinics close at 17:30).
_HOUR_W = (0.15, 0.10, 0.08, 0.07, 0.07, 0.10, 0.30, 0.90, 3.0, 4.2, 4.4, 3.6, 1.2, 1.4, 3.2, 3.4, 3.0, 0.0,
           0.8, 0.6, 0.5, 0.4, 0.3, 0.2)
_MINUTE_W: tuple[float, ...] = tuple(
    (2.6 if m % 60 < 30 else 0.9) if m // 60 == 17 else _HOUR_W[m // 60] for m in range(1440)
)
_WEEKDAY_W = (1.12, 1.05, 1.0, 1.0, 0.98, 0.62, 0.55)  # Monday first

# chronic conditions (bit flags)
HTN, DM, LIP, CHD, HBV = 1, 2, 4, 8, 16

_SUPPLIER_REGIONS = ("310115", "320506", "330110", "370112", "440305", "510108", "130102", "420111",
                     "120116", "350203")


def trace_code(prefix: int, serial: int) -> str:
    """20-digit drug traceability code: 7-digit product id, 9-digit unit serial, 4-digit check."""
    return f"{prefix:07d}{serial:09d}{(prefix * 31 + serial * 17) % 10_000:04d}"

_ITEM: dict[str, int] = {it.key: i for i, it in enumerate(CATALOGUE)}


# --- code helpers --------------------------------------------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


def id_check_char(body17: str) -> str:
    """ISO 7064 MOD 11-2 check character of an 18-char resident ID number (GB 11643)."""
    if len(body17) != 17 or not body17.isdigit():
        raise ValueError(f"ID body must be 17 digits, got {body17!r}")
    return _ID_CHECK[sum(int(c) * w for c, w in zip(body17, _ID_WEIGHTS, strict=True)) % 11]


def uscc_check_char(body17: str) -> str:
    """Check character of an 18-char unified social credit code (GB 32100-2015, MOD 31)."""
    try:
        s = sum(_USCC_CHARS.index(c) * w for c, w in zip(body17, _USCC_WEIGHTS, strict=True))
    except ValueError:
        raise ValueError(f"not a USCC body: {body17!r}") from None
    return _USCC_CHARS[(31 - s % 31) % 31]


def _org_code(body8: str) -> str:
    """Organization code (GB 11714): 8 digits plus MOD 11 check char, the USCC's 9th-17th chars."""
    c = 11 - sum(int(ch) * w for ch, w in zip(body8, _ORG_WEIGHTS, strict=True)) % 11
    return body8 + ("X" if c == 10 else "0" if c == 11 else str(c))


_UUID_KEEP = ~(0xF000 << 64) & ~(0xC000 << 48) & ((1 << 128) - 1)
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)


def _uuid4(bits: int) -> str:
    """UUID-4 text of 128 random bits; equals ``str(uuid.UUID(int=bits, version=4))``, faster."""
    h = "%032x" % (bits & _UUID_KEEP | _UUID_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _ymd(day: int) -> str:
    y, m, d = ymd(day)
    return f"{y:04d}{m:02d}{d:02d}"


# --- config and events ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """What traffic to generate. Size fields left at :data:`AUTO` are scaled from ``settlements``.

    Rates are per settlement unless named otherwise. ``filing_rate`` is the number of
    cross-province filings per settlement: filed persons are the only ones who settle across a
    provincial border, so ``cross_province_rate > 0`` needs ``filing_rate > 0``. Procurement volume
    follows consumption: an order covers about ``order_cover_days`` of the institution's demand.
    """

    settlements: int
    seed: int = 42
    start: datetime = DEFAULT_START
    days: int = 7
    regions: int = AUTO
    hospitals: int = AUTO
    pharmacies: int = AUTO
    persons: int = AUTO
    reversal_rate: float = 0.02
    cross_province_rate: float = 0.05
    filing_rate: float = 0.03
    order_cover_days: float = 14.0
    #: share of accepted deliveries paid more than 30 days later (回款超期: 4/5 within 31-60 days,
    #: the rest later). What YB-PROC-PAY-OVERDUE flags, so the default is 0: clean traffic breaks
    #: no rule, and overdue payments come from planting, where they are part of the ground truth
    late_payment_rate: float = 0.0
    inspection_rate: float = 0.002
    tip_rate: float = 0.001
    fund_income_per_region_day: int = 4
    income_spending_ratio: float = 1.25

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"SimConfig: {msg}")

        for name in ("settlements", "seed", "days", "regions", "hospitals", "pharmacies", "persons",
                     "fund_income_per_region_day"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(f"{name} must be an int, got {type(v).__name__}")
        if self.settlements < 1:
            bad(f"settlements must be >= 1, got {self.settlements}")
        if not isinstance(self.start, datetime) or self.start.tzinfo is None \
                or self.start.utcoffset() is None:
            bad("start must be a timezone-aware datetime, e.g. datetime(2026, 10, 1, tzinfo=schemas.calendar.CHINA)")
        if not 1 <= self.days <= 1830:
            bad(f"days must be in 1..1830, got {self.days}")
        n = self.settlements
        auto = {
            "regions": max(6, min(len(REGIONS), n // 1000)),
            "persons": max(200, n),
        }
        if self.regions == AUTO:
            object.__setattr__(self, "regions", auto["regions"])
        if not 1 <= self.regions <= len(REGIONS):
            bad(f"regions must be in 1..{len(REGIONS)} (the built-in county table), got {self.regions}")
        if self.hospitals == AUTO:
            object.__setattr__(self, "hospitals", max(self.regions, n // 250))
        if self.pharmacies == AUTO:
            object.__setattr__(self, "pharmacies", max(self.regions // 2, n // 500))
        if self.persons == AUTO:
            object.__setattr__(self, "persons", auto["persons"])
        if self.hospitals < self.regions:
            bad(f"hospitals ({self.hospitals}) must be >= regions ({self.regions}): every county needs one")
        if self.hospitals > 99_999 * self.regions:
            bad("too many hospitals for 5-digit institution serials")
        if self.pharmacies < 0:
            bad(f"pharmacies must be >= 0, got {self.pharmacies}")
        if self.persons < 10:
            bad(f"persons must be >= 10, got {self.persons}")
        for name, hi in (("reversal_rate", 0.5), ("cross_province_rate", 0.5), ("filing_rate", 0.5),
                         ("inspection_rate", 0.5), ("tip_rate", 0.5), ("late_payment_rate", 0.6)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi \
                    or math.isnan(v):
                bad(f"{name} must be a number in [0, {hi}], got {v!r}")
        if self.cross_province_rate > 0 and self.filing_rate == 0:
            bad("cross_province_rate > 0 needs filing_rate > 0 (cross-province care is backed by a filing)")
        if self.cross_province_rate > 0 and self.regions < 2:
            bad("cross_province_rate > 0 needs regions >= 2 (two provinces)")
        if not 1 <= self.order_cover_days <= 365:
            bad(f"order_cover_days must be in 1..365, got {self.order_cover_days}")
        if not 0 <= self.fund_income_per_region_day <= 50:
            bad(f"fund_income_per_region_day must be in 0..50, got {self.fund_income_per_region_day}")
        if not 0.5 <= self.income_spending_ratio <= 3:
            bad(f"income_spending_ratio must be in 0.5..3, got {self.income_spending_ratio}")

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.days * DAY_MS


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One generated event: Avro record full name, Kafka key, raw datum."""

    record: str
    key: str
    datum: dict[str, Any]

    @property
    def event_type(self) -> str:
        return self.record.rsplit(".", 1)[-1]

    @property
    def time_ms(self) -> int:
        return int(self.datum[EVENT_TIME_FIELD[self.record]])


@dataclass(frozen=True, slots=True)
class Planted:
    """Ground truth for one planted anomaly."""

    anomaly: str
    record: str
    event_id: str
    note: str = ""


class EventHook(Protocol):
    """Sees every event of the record kinds it is registered for, before it is emitted.

    Returns the events to emit instead: ``[event]`` to pass it through, a modified copy to plant an
    anomaly in it, extra events after it, or ``[]`` to drop it. Use ``ctx.rng`` (never the
    generator's RNG) so the base traffic is the same with and without hooks, and ``ctx.plant`` to
    record the ground truth.
    """

    def __call__(self, event: SimEvent, ctx: HookContext) -> Sequence[SimEvent]: ...


class HookContext:
    """What a hook may use: its own RNG, the generator (read-only by convention), ground truth."""

    def __init__(self, generator: TrafficGenerator) -> None:
        self.generator = generator
        self.rng = random.Random(f"{generator.config.seed}/anomalies")
        self.planted: list[Planted] = []

    @property
    def now(self) -> int:
        """Current event time (epoch ms)."""
        return self.generator._now

    def plant(self, anomaly: str, event: SimEvent, note: str = "") -> None:
        self.planted.append(Planted(anomaly, event.record, str(event.datum["event_id"]), note))

    def new_event_id(self) -> str:
        return _uuid4(self.rng.getrandbits(128))

    def schedule(self, time_ms: int, event: SimEvent) -> None:
        """Emit ``event`` later, in time order (dropped if beyond the span)."""
        self.generator._schedule(max(time_ms, self.now), _K_READY, event)


# --- runtime entities ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Institution:
    """A designated hospital (kind H, level 1-3) or pharmacy (kind P, level 9)."""

    index: int
    code: str
    kind: str
    level: int
    region: int
    admdvs: str
    weight: float
    doctors: tuple[str, ...]
    profile: int  # formulary profile: 0..2 hospital level 1..3, 3 pharmacy
    hosp_lv: str


@dataclass(frozen=True, slots=True)
class Supplier:
    code: str
    admdvs: str


class _Stock:
    __slots__ = ("d0", "d_max", "demand", "level", "on_order", "rop", "used")

    def __init__(self, level: int, d0: int) -> None:
        self.level = level
        self.on_order = 0
        self.demand = d0  # expected daily demand (what the institution reports for procurement)
        self.d0 = d0  # daily demand estimate, scale 4; raised on every stock-out
        self.d_max = d0 * _D0_GROWTH_CAP  # ...up to this: demand seen while an order is on its way
        self.rop = d0 * 7  # reorder point: delivery takes up to 5 days plus weekends
        self.used = 0


class _Cross:
    __slots__ = ("dcla_type", "referral", "treat_region", "until")

    def __init__(self, treat_region: int, dcla_type: str, referral: int) -> None:
        self.treat_region = treat_region
        self.dcla_type = dcla_type
        self.referral = referral
        self.until = 10**9  # last local day the filing covers


class _Person:
    __slots__ = ("activity", "age", "brdy", "cert", "conds", "cross", "emp", "gend", "group", "home_h",
                 "home_p", "ins_region", "insutype", "last_day", "last_dscg", "last_test", "loc_region",
                 "low_income", "name", "next_rx", "psn_no", "regimen", "retired", "tel")
    activity: float
    age: int
    brdy: int
    cert: str
    conds: int
    emp: bool
    gend: str
    group: int
    home_h: int
    home_p: int
    ins_region: int
    insutype: str
    loc_region: int
    low_income: bool
    name: str
    psn_no: str
    regimen: tuple[int, ...]
    retired: bool
    tel: str

    def __init__(self) -> None:
        self.last_day = -(10**9)
        self.last_dscg = -(10**15)
        self.next_rx = -(10**15)
        self.last_test: dict[int, int] | None = None
        self.cross: _Cross | None = None


_Cands = tuple[list[int], list[float], float]  # institution indexes, cumulative weights, total

# heap entry kinds
(_K_READY, _K_REVERSAL, _K_FILING, _K_CONTRACT, _K_ORDER, _K_DELIVERY, _K_PAYMENT, _K_RETURN,
 _K_STOCKTAKE, _K_DAY, _K_INCOME, _K_INSPECTION, _K_TIP, _K_PENALTY, _K_RECOVERY) = range(15)

_SN = tuple(f"{i:04d}" for i in range(1, 2000))
_MED_CLR = {"11": "11", "14": "11", "21": "21", "41": "41"}
_TIP_CATS = (("FAKE_VISIT", 0.25), ("CARD_LENDING", 0.15), ("UPCODING", 0.15), ("DRUG_RESALE", 0.15),
             ("OVER_TREATMENT", 0.15), ("OTHER", 0.15))
_INSP_TYPES = (("ROUTINE", 0.70), ("SPECIAL", 0.15), ("FLIGHT", 0.05), ("CROSS", 0.10))
_INSP_VIOL = {"ROUTINE": 0.35, "SPECIAL": 0.6, "FLIGHT": 0.8, "CROSS": 0.5}
_VIOL_MEDIAN_YUAN = {1: 8_000.0, 2: 40_000.0, 3: 150_000.0, 9: 5_000.0}
#: Credit-score points of a penalty, and of fines (one per 10,000 yuan, at most 100): the
#: ``bi_institution_credit`` view's (sinks/ddl/0004, 0007_credit_score_region.sql). The base traffic's penalties
#: take an institution at most PENALTY_ROOM points below 1000, so without rule hits no score falls
#: to grade D (below 600, YB-SUP-CREDIT-LOW): clean traffic breaks no rule.
PENALTY_POINTS = {"WARNING": 20, "FINE": 50, "SUSPEND_AGREEMENT": 200, "TERMINATE_AGREEMENT": 500}
FINE_FEN_PER_POINT = 1_000_000
MAX_FINE_POINTS = 100
PENALTY_ROOM = 400
# Pooled-fund (hifp) payment by the settlement's kind. Calibrated so that hifp_pay / inscp_amt over
# all settlements (bi_fund_health.policy_ratio) is about 80% for employees and 70% for residents
# (domain reference), with inpatient care at about 85% / 75% (national 2022: 84.4% / 68.3%;
# residents have critical-illness insurance on top). Measured at seeds 42 and 7: 0.80 / 0.69-0.71.
# inpatient deductible (fen) and pooled-fund rate (‰) by [employee?][level]
_DEDUCT = {True: {1: 5_000, 2: 15_000, 3: 30_000}, False: {1: 5_000, 2: 20_000, 3: 40_000}}
_INP_RATE = {True: {1: 960, 2: 940, 3: 920}, False: {1: 930, 2: 880, 3: 830}}
# per-stay stand-ins for the annual thresholds of critical-illness insurance (residents, paying 60%
# above it) and large-amount supplementary payment (employees, 50%)
_HIFMI_FROM = 500_000
_HIFOB_FROM = 300_000
# general outpatient (门诊共济 since the 2021 reform): employees' visits above the year's deductible
# (a share _EMP_OUT_POOLED of them) are pooled at _OUT_RATE, the others paid from the personal
# account; residents' are pooled at _OUT_RATE up to _RES_OUT_CAP fen a visit
_OUT_RATE = {True: {1: 850, 2: 750, 3: 650}, False: {1: 700, 2: 600, 3: 500}}
_EMP_OUT_POOLED = 0.85
_RES_OUT_CAP = 20_000
_CHRONIC_RATE = {True: 800, False: 650}  # chronic-disease outpatient (门诊慢特病)
_LEVEL_PRICE_PM = {1: 800, 2: 900, 3: 1000, 9: 1000}
# FundIncome components per insutype: (income_type, share of the day's contributions)
_INCOME_MIX = {"310": (("EMPLOYER", 0.69), ("INDIVIDUAL", 0.31)),
               "390": (("FISCAL_SUBSIDY", 0.66), ("INDIVIDUAL", 0.34))}
# Expected fund spending (fen) of each insutype per settlement of a pool's insured (all insutypes
# together), measured on generated
# traffic (≈115-150 yuan; small pools vary more, their realised share of persons is noisy). Used
# only to size the opening balance, so an estimate off by 1.5× still leaves > 6 months of capacity.
_FUND_PER_SETTLEMENT = {"310": 12_000, "390": 14_000}
#: Opening balance (carried-over fund balance, 累计结存) in months of expected spending: drawn in
#: [lo, hi] per pool × insutype. 6-9 months is normal, above 15 too much (domain reference).
OPENING_BALANCE_MONTHS = (9.0, 12.0)


class TrafficGenerator:
    """Deterministic synthetic traffic for the three subsystems; see the module docstring.

    ``events()`` can be called repeatedly: every call replays the same stream from the seed.
    ``hooks`` maps record names (full or short) to hooks applied, in order, to each such event.
    """

    def __init__(self, config: SimConfig, hooks: Mapping[str, Sequence[EventHook]] | None = None) -> None:
        self.config = config
        self._hooks: dict[str, tuple[EventHook, ...]] = {}
        for name, hs in (hooks or {}).items():
            full = name if "." in name else next(
                (r for r in EVENT_TIME_FIELD if r.rsplit(".", 1)[-1] == name), "")
            if full not in EVENT_TIME_FIELD:
                raise ValueError(f"hook registered for unknown record {name!r}")
            self._hooks[full] = tuple(hs)
        self.hook_context = HookContext(self)
        self._start = config.start_ms
        self._end = config.end_ms
        self._now = self._start
        self._build_world(random.Random(config.seed))

    # --- static world -------------------------------------------------------------------------
    def _build_world(self, rng: random.Random) -> None:
        """Regions, institutions, doctors, suppliers and formularies: fixed for a seed and config."""
        cfg = self.config
        self.regions: tuple[Region, ...] = REGIONS[: cfg.regions]
        regions = self.regions
        rw = [r.weight for r in regions]
        region_cum = list(_accumulate(rw))
        self._region_cum = region_cum
        self.pools: tuple[str, ...] = tuple(dict.fromkeys(r.pool for r in regions))
        self._pool_of_region = [self.pools.index(r.pool) for r in regions]

        def pick_region() -> int:
            return bisect.bisect_right(region_cum, rng.random() * region_cum[-1])

        serial = [0] * len(regions)
        dserial = [0] * len(regions)
        insts: list[Institution] = []
        levels = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3)  # 55% / 30% / 15%
        for i in range(cfg.hospitals + cfg.pharmacies):
            hosp = i < cfg.hospitals
            r = i if i < len(regions) else pick_region() if hosp else (
                i - cfg.hospitals if i - cfg.hospitals < len(regions) else pick_region())
            code_r = regions[r].code
            serial[r] += 1
            if hosp:
                level = levels[int(rng.random() * len(levels))]
                ndoc = {1: 3, 2: 8, 3: 20}[level]
                docs = []
                for _ in range(ndoc):
                    dserial[r] += 1
                    docs.append(f"D{code_r}{dserial[r]:06d}")
                insts.append(Institution(len(insts), f"H{code_r}{serial[r]:05d}", "H", level, r, code_r,
                                         {1: 1.0, 2: 3.5, 3: 9.0}[level] * (0.6 + 0.8 * rng.random()),
                                         tuple(docs), level - 1, str(level)))
            else:
                insts.append(Institution(len(insts), f"P{code_r}{serial[r]:05d}", "P", 9, r, code_r,
                                         0.6 + 0.8 * rng.random(), (), 3, "9"))
        self.institutions: tuple[Institution, ...] = tuple(insts)

        self.suppliers: tuple[Supplier, ...] = tuple(
            Supplier(self._uscc(rng, reg), reg) for reg in _SUPPLIER_REGIONS)
        self._item_supplier = [i % len(self.suppliers) for i in range(len(CATALOGUE))]

        # formularies per profile (hospital level 1..3, pharmacy)
        forms: list[list[int]] = [[], [], [], []]
        for idx, it in enumerate(CATALOGUE):
            for prof in range(3):
                if it.min_level <= prof + 1 and ("O" in it.where or "I" in it.where):
                    forms[prof].append(idx)
            if "P" in it.where:
                forms[3].append(idx)
        self._formulary = [tuple(f) for f in forms]
        self._stocked = [tuple(i for i in f if CATALOGUE[i].stocked) for f in forms]

        def role_list(prof: int, pred: Callable[[CatalogueItem], bool]) -> tuple[int, ...]:
            return tuple(i for i in self._formulary[prof] if pred(CATALOGUE[i]))

        self._acute = [role_list(p, lambda it: it.role == "acute" and ("O" in it.where or "P" in it.where))
                       for p in range(4)]
        self._tcm = [role_list(p, lambda it: it.role == "tcm") for p in range(4)]
        self._tests = [role_list(p, lambda it: it.role == "test" and "O" in it.where) for p in range(4)]
        self._selfpay = [role_list(p, lambda it: it.role == "selfpay") for p in range(4)]
        self._in_form = [frozenset(f) for f in self._formulary]
        self._opts: dict[int, tuple[int, ...]] = {}
        self._ymd_cache: dict[int, tuple[str, int]] = {}
        self._region_idsum: dict[str, int] = {}

        # candidate institutions per region: local / city / province, by kind
        def cands(kind: str, prefix: str, min_level: int = 1) -> _Cands | None:
            """Institutions of ``kind`` whose admdvs starts with ``prefix``, weighted by size."""
            idx = [x.index for x in insts
                   if x.kind == kind and x.admdvs.startswith(prefix) and (kind == "P" or x.level >= min_level)]
            if not idx:
                return None
            cum = list(_accumulate([insts[i].weight for i in idx]))
            return idx, cum, cum[-1]

        self._h_local = [cands("H", reg.code) for reg in regions]
        self._h_city = [cands("H", reg.city) for reg in regions]
        self._h_prov = [cands("H", reg.province) for reg in regions]
        self._p_local = [cands("P", reg.code) for reg in regions]
        self._p_city = [cands("P", reg.city) for reg in regions]
        self._p_prov = [cands("P", reg.province) for reg in regions]
        self._h_inp_prov = [[cands("H", reg.province, lv) for lv in (1, 2, 3)] for reg in regions]
        self._h_inp_city = [[cands("H", reg.city, lv) for lv in (1, 2, 3)] for reg in regions]

        # expected settlements per day at each institution (for stock, orders and contract volumes)
        n_day = cfg.settlements / cfg.days
        prov_share: dict[str, float] = {}
        for reg in regions:
            prov_share[reg.province] = prov_share.get(reg.province, 0.0) + reg.weight / region_cum[-1]
        kind_prov_w: dict[tuple[str, str], float] = {}
        for x in insts:
            kp = (x.kind, x.admdvs[:2])
            kind_prov_w[kp] = kind_prov_w.get(kp, 0.0) + x.weight
        self._inst_per_day = [
            n_day * (0.86 if x.kind == "H" else 0.14) * prov_share[x.admdvs[:2]] * x.weight
            / kind_prov_w[(x.kind, x.admdvs[:2])]
            for x in insts
        ]

        # persons: contiguous index ranges per age band; selection weight = share x activity
        p_total = cfg.persons
        bounds = [0]
        acc = 0.0
        for _lo, _hi, pop, _act in _AGE_BANDS:
            acc += pop
            bounds.append(round(acc / sum(b[2] for b in _AGE_BANDS) * p_total))
        self._band_bounds = bounds
        self._band_cum = list(_accumulate(
            [(bounds[i + 1] - bounds[i]) * _AGE_BANDS[i][3] for i in range(len(_AGE_BANDS))]))
        mult = 1 + 2 * rng.randrange(10**13)
        self._psn_mult = mult + 2 if mult % 5 == 0 else mult  # coprime with 10: a bijection mod 10^14
        self._psn_off = rng.randrange(10**14)
        self._trace_prefix = [8_000_000 + (i * 7919 + 104_729) % 1_000_000 for i in range(len(CATALOGUE))]
        self._trace_start = [rng.randrange(10**8) for _ in CATALOGUE]

    @staticmethod
    def _uscc(rng: random.Random, region: str) -> str:
        body = "91" + region + _org_code(f"{rng.randrange(10**8):08d}")
        return body + uscc_check_char(body)

    # --- run state ----------------------------------------------------------------------------
    def _reset(self) -> None:
        cfg = self.config
        self._rng = random.Random(f"{cfg.seed}/traffic")
        self._rand = self._rng.random
        self._bits = self._rng.getrandbits
        self._heap: list[tuple[int, int, int, Any]] = []
        self._seq = 0
        self._out: list[SimEvent] = []
        self._now = self._start
        self._persons: dict[int, _Person] = {}
        self._cross_idx: set[int] = set()
        self._certs: set[str] = set()
        self._cross_active: list[_Person] = []
        self._cross_cum: list[float] = []
        self._n_setl = 0
        self._n_mov = 0
        self._n = {"rev": 0, "ord": 0, "dlv": 0, "pay": 0, "insp": 0, "tip": 0, "pnsh": 0,
                   "rcvr": 0, "inc": 0, "dcla": 0, "cntr": 0}
        self._trace_next = list(self._trace_start)
        self._contracts: dict[tuple[int, int], str] = {}
        #: the generator's own books of each contract: [agreed volume, cycle start, cycle end (ms),
        #: bought under it, ordered to keep pace and not yet sent] (planting changes copies only)
        self._pace: dict[tuple[int, int], list[int]] = {}
        self._penalised: dict[int, tuple[int, int]] = {}  # institution → penalty points, fines (fen)
        self._spent = [[0, 0] for _ in self.pools]  # fund spending by pool, [employee, resident]
        self._income_marks = [[0, 0, 0, 0] for _ in self.pools]  # spending already matched by income
        # contributions have their own RNG: whether a booking happens (an amount > 0) depends on the
        # payment rates, and tuning those must not shift the rest of the traffic
        self._inc_rng = random.Random(f"{cfg.seed}/income")
        self.hook_context = HookContext(self)
        self._handlers: list[Callable[[int, Any], None]] = [
            self._h_ready, self._h_reversal, self._h_filing, self._h_contract, self._h_order,
            self._h_delivery, self._h_payment, self._h_return, self._h_stocktake, self._h_day,
            self._h_income, self._h_inspection, self._h_tip, self._h_penalty, self._h_recovery,
        ]
        # opening stock: counted at the start of the span (期初盘点), one STOCKTAKE per item stocked
        self._stock: list[dict[int, _Stock]] = []
        for x in self.institutions:
            books: dict[int, _Stock] = {}
            for it_idx in self._stocked[x.profile]:
                it = CATALOGUE[it_idx]
                rate = it.u100p if x.kind == "P" else it.u100
                d0 = max(1, int(self._inst_per_day[x.index] * rate / 100 * _CNT))
                pack = it.pack * _CNT
                cover = 7 + self._rand() * cfg.order_cover_days  # a random point of the cycle
                level = max(pack, -(-int(d0 * cover) // pack) * pack)
                books[it_idx] = _Stock(level, d0)
                self._emit(INVENTORY, x.code, self._movement(
                    x, it_idx, "STOCKTAKE", level, self._purchase_pric(x, it), [], None, self._start))
            self._stock.append(books)
        self._book_opening_balances()
        self._schedule_world_events()

    def _book_opening_balances(self) -> None:
        """Carried-over fund balance per pool × insutype, booked at the start (income_type OTHER).

        Why: a pooling fund does not start from zero; without it the cumulative balance is only
        the ~25% surplus of the span's own contributions, and months of payout capacity comes out
        below the 3-month warning line for every pool. Sized at 9-12 months of expected spending
        (pool share of the insured × settlements a day × :data:`_FUND_PER_SETTLEMENT`). Drawn from
        its own RNG, with its own event and income ids (``FI<pool>OB<insutype>``), so the rest of
        the traffic is bit for bit what it was without it.
        """
        cfg = self.config
        rng = random.Random(f"{cfg.seed}/opening-balance")
        share = [0.0] * len(self.pools)
        prev = 0.0
        for r, cum in enumerate(self._region_cum):
            share[self._pool_of_region[r]] += (cum - prev) / self._region_cum[-1]
            prev = cum
        per_day = cfg.settlements / cfg.days
        lo, hi = OPENING_BALANCE_MONTHS
        for pool, code in enumerate(self.pools):
            for insutype, fen in _FUND_PER_SETTLEMENT.items():
                months = lo + (hi - lo) * rng.random()
                amt = int(per_day * share[pool] * fen * 30.4 * months)
                if amt <= 0:
                    continue
                self._emit(INCOME, code, {
                    "event_id": _uuid4(rng.getrandbits(128)), "income_id": f"FI{code}OB{insutype}",
                    "insu_admdvs": code, "insutype": insutype, "income_type": "OTHER",
                    "income_amt": amt, "book_time": self._start,
                })

    def _schedule_world_events(self) -> None:
        cfg = self.config
        rand = self._rand
        start, end = self._start, self._end
        # daily ticks at local midnight (or at the start)
        d0 = (start + CHINA_OFFSET_MS) // DAY_MS
        d1 = (end - 1 + CHINA_OFFSET_MS) // DAY_MS
        for d in range(d0, d1 + 1):
            self._schedule(max(start, day_start_ms(d)), _K_DAY, d)
        weekday = [1.0 if (d + 3) % 7 < 5 else 0.25 for d in range(d0, d1 + 1)]
        self._insp_per_day = cfg.inspection_rate * cfg.settlements / sum(weekday)
        tipw = [1.0 if (d + 3) % 7 < 5 else 0.5 for d in range(d0, d1 + 1)]
        self._tip_per_day = cfg.tip_rate * cfg.settlements / sum(tipw)
        self._insp_carry = 0.0
        self._tip_carry = 0.0
        # volume-based-procurement contracts take effect at the start; signed the first working morning
        first = self._business(start)
        for x in self.institutions:
            if x.kind != "H":
                continue
            for it_idx in self._stocked[x.profile]:
                if CATALOGUE[it_idx].base_pric:
                    self._schedule(first + int(rand() * 2 * HOUR_MS), _K_CONTRACT, (x.index, it_idx))
        # cross-province filings: persons who live and seek care in another province
        k = 0
        if cfg.filing_rate > 0:
            k = max(1, min(round(cfg.filing_rate * cfg.settlements), cfg.persons // 5))
        span = end - start
        for idx in self._rng.sample(range(cfg.persons), k):
            self._cross_idx.add(idx)
            t = start + int(span * rand() ** 2.2)
            if (t + CHINA_OFFSET_MS) % DAY_MS < 7 * HOUR_MS:
                t += 7 * HOUR_MS
            self._schedule(min(t, end - 1), _K_FILING, idx)

    def _schedule(self, time: int, kind: int, payload: Any) -> None:
        if time < self._end:
            self._seq += 1
            heapq.heappush(self._heap, (time, self._seq, kind, payload))

    def _emit(self, record: str, key: str, datum: dict[str, Any]) -> None:
        ev = SimEvent(record, key, datum)
        hooks = self._hooks.get(record) if self._hooks else None
        if hooks is None:
            self._out.append(ev)
            return
        evs: Sequence[SimEvent] = (ev,)
        for h in hooks:
            evs = [x for e in evs for x in h(e, self.hook_context)]
        self._out.extend(evs)

    def _eid(self) -> str:
        return _uuid4(self._bits(128))

    # --- the stream ---------------------------------------------------------------------------
    def events(self) -> Iterator[SimEvent]:
        """The whole stream, in non-decreasing event-time order."""
        self._reset()
        out = self._out
        heap = self._heap
        handlers = self._handlers
        pop = heapq.heappop
        if out:
            yield from out
            out.clear()
        for t in self._settlement_times():
            while heap and heap[0][0] <= t:
                time, _, kind, payload = pop(heap)
                self._now = time
                handlers[kind](time, payload)
            self._now = t
            self._settle(t)
            yield from out
            out.clear()
        while heap:
            time, _, kind, payload = pop(heap)
            self._now = time
            handlers[kind](time, payload)
            if out:
                yield from out
                out.clear()

    def _settlement_times(self) -> Iterator[int]:
        """Exactly ``settlements`` times, sorted, following the daily and weekly rhythm."""
        rand = self._rand
        n = self.config.settlements
        start = self._start
        minutes = (self._end - start) // _MIN
        first = (start + CHINA_OFFSET_MS) // _MIN
        mw = _MINUTE_W
        dayf: dict[int, float] = {}
        total = 0.0
        for m in range(minutes):
            lm = first + m
            d = lm // 1440
            f = dayf.get(d)
            if f is None:
                f = dayf[d] = _WEEKDAY_W[(d + 3) % 7] * (0.92 + 0.16 * rand())
            total += mw[lm % 1440] * f
        scale = n / total
        carry = 0.0
        emitted = 0
        for m in range(minutes):
            lm = first + m
            carry += mw[lm % 1440] * dayf[lm // 1440] * scale
            k = int(carry)
            if rand() < carry - k:
                k += 1
            carry -= k
            if k > n - emitted or m == minutes - 1:
                k = n - emitted
            if k <= 0:
                continue
            base = start + m * _MIN
            emitted += k
            if k == 1:
                yield base + int(rand() * _MIN)
            else:
                yield from sorted([base + int(rand() * _MIN) for _ in range(k)])

    # --- persons ------------------------------------------------------------------------------
    def _pick_idx(self) -> int:
        b = bisect.bisect_right(self._band_cum, self._rand() * self._band_cum[-1])
        lo, hi = self._band_bounds[b], self._band_bounds[b + 1]
        return lo + int(self._rand() * (hi - lo))

    def _person(self, idx: int) -> _Person:
        p = self._persons.get(idx)
        if p is None:
            p = self._persons[idx] = self._make_person(idx)
        return p

    def _identity(self, region: str, age: int, male: bool) -> tuple[str, int, str, str]:
        """(ID number, birth date as epoch days, name, phone) of a plausible person."""
        rand = self._rand
        start_day = (self._start + CHINA_OFFSET_MS) // DAY_MS
        brdy = start_day - int(age * 365.2425) - int(rand() * 365)
        cached = self._ymd_cache.get(brdy)
        if cached is None:
            ymd = _ymd(brdy)
            cached = self._ymd_cache[brdy] = (ymd, sum(map(_mul, map(int, ymd), _ID_WEIGHTS[6:14])))
        ymd = cached[0]
        head = f"{region}{ymd}"
        rs = self._region_idsum.get(region)
        if rs is None:
            rs = self._region_idsum[region] = sum(map(_mul, map(int, region), _ID_WEIGHTS))
        s0 = rs + cached[1]
        while True:
            seq = int(rand() * 500) * 2 + (1 if male else 0)
            s = s0 + (seq // 100) * 8 + (seq // 10 % 10) * 4 + (seq % 10) * 2
            cert = f"{head}{seq:03d}{_ID_CHECK[s % 11]}"
            if cert not in self._certs:
                self._certs.add(cert)
                break
        s = bisect.bisect_right(_SURNAME_CUM, rand() * _SURNAME_CUM[-1])
        given = _GIVEN[(male, int(ymd[:4]) < 1975)]
        name = _SURNAMES[min(s, len(_SURNAMES) - 1)] + given[int(rand() * len(given))]
        tel = _PHONE_PREFIX[int(rand() * len(_PHONE_PREFIX))] + f"{int(rand() * 100_000_000):08d}"
        return cert, brdy, name, tel

    def _make_person(self, idx: int) -> _Person:
        rand = self._rand
        p = _Person()
        b = bisect.bisect_right(self._band_bounds, idx) - 1
        lo, hi, _pop, act = _AGE_BANDS[b]
        age = lo + int(rand() * (hi - lo + 1))
        p.age = age
        p.activity = act
        p.group = 0 if age < 15 else 2 if age >= 60 else 1
        male = rand() < (0.42 if age >= 80 else 0.5)
        p.gend = "MALE" if male else "FEMALE"
        r = bisect.bisect_right(self._region_cum, rand() * self._region_cum[-1])
        p.ins_region = p.loc_region = r
        region = self.regions[r].code
        p.cert, p.brdy, p.name, p.tel = self._identity(region, age, male)
        emp = age >= 18 and rand() < (0.55 if age < 60 else 0.40)
        p.emp = emp
        p.retired = emp and age >= 60
        p.insutype = "310" if emp else "390"
        p.low_income = not emp and rand() < (0.08 if age >= 60 else 0.03)
        num = (idx * self._psn_mult + self._psn_off) % 10**14
        p.psn_no = f"{region[:2]}0000{num:014d}"
        conds = 0
        for flag, prev in ((HTN, (0.0, 0.01, 0.08, 0.25, 0.45, 0.55)), (DM, (0.0, 0.005, 0.04, 0.10, 0.18, 0.22)),
                           (LIP, (0.0, 0.0, 0.05, 0.15, 0.25, 0.25)), (CHD, (0.0, 0.0, 0.0, 0.03, 0.08, 0.15)),
                           (HBV, (0.0, 0.03, 0.03, 0.03, 0.02, 0.02))):
            band = 0 if age < 18 else 1 if age < 35 else 2 if age < 45 else 3 if age < 60 else 4 if age < 70 else 5
            if rand() < prev[band]:
                conds |= flag
        p.conds = conds
        regimen: list[int] = []
        for flag, opts in ((HTN, ("amlodipine", "valsartan", "nifedipine", "irbesartan", "metoprolol")),
                           (DM, ("metformin", "acarbose", "glimepiride")), (LIP, ("atorvastatin", "rosuvastatin")),
                           (CHD, ("clopidogrel", "danshen")), (HBV, ("entecavir",))):
            if conds & flag:
                regimen.append(_ITEM[opts[int(rand() * len(opts))]])
                if flag == DM and rand() < 0.15:
                    regimen.append(_ITEM["insulin_glargine"])
                elif flag == HTN and rand() < 0.3:
                    regimen.append(_ITEM[opts[int(rand() * len(opts))]])
        p.regimen = tuple(dict.fromkeys(regimen))
        if idx in self._cross_idx:
            self._make_cross(p)
        p.home_h = self._wpick(self._h_local[p.loc_region] or self._h_city[p.loc_region])
        pc = self._p_local[p.loc_region] or self._p_city[p.loc_region]
        p.home_p = self._wpick(pc) if pc else -1
        return p

    def _make_cross(self, p: _Person) -> None:
        rand = self._rand
        home = self.regions[p.ins_region].province
        dests = [r for r, reg in enumerate(self.regions) if reg.province != home]
        w = []
        for r in dests:
            reg = self.regions[r]
            pull = _DEST_PULL.get(reg.province, 1.0)
            if reg.province == "46" and p.age >= 55:
                pull *= 3
            w.append(reg.weight * pull)
        cum = list(_accumulate(w))
        tr = dests[bisect.bisect_right(cum, rand() * cum[-1])]
        u = rand()
        kinds: tuple[tuple[str, float], ...]
        if p.age >= 60:
            kinds = ("RETIRED_RESETTLED", 0.65), ("LONG_TERM_RESIDENCE", 0.2), ("REFERRAL", 0.1), ("EMERGENCY", 0.05)
        elif p.emp:
            kinds = ("POSTED_WORK", 0.4), ("LONG_TERM_RESIDENCE", 0.3), ("REFERRAL", 0.15), \
                ("TEMPORARY_OTHER", 0.1), ("EMERGENCY", 0.05)
        else:
            kinds = ("LONG_TERM_RESIDENCE", 0.45), ("REFERRAL", 0.25), ("TEMPORARY_OTHER", 0.2), ("EMERGENCY", 0.1)
        dtype = kinds[-1][0]
        for name, share in kinds:
            if u < share:
                dtype = name
                break
            u -= share
        referral = -1
        if dtype == "REFERRAL":
            c = self._h_inp_city[tr][2] or self._h_inp_city[tr][1] or self._h_city[tr]
            assert c is not None
            referral = self._wpick(c)
        p.cross = _Cross(tr, dtype, referral)
        p.loc_region = tr

    def _wpick(self, cands: _Cands | None) -> int:
        assert cands is not None
        idx, cum, total = cands
        return idx[bisect.bisect_right(cum, self._rand() * total)]

    # --- settlements --------------------------------------------------------------------------
    def _settle(self, t: int) -> None:
        rand = self._rand
        day = (t + CHINA_OFFSET_MS) // DAY_MS
        hour = (t + CHINA_OFFSET_MS) // HOUR_MS % 24
        want_cross = bool(self._cross_active) and rand() < self.config.cross_province_rate
        p = (want_cross and self._pick_person(day, True)) or self._pick_local(day)
        night = hour < 7 or hour >= 20
        g = p.group
        u = rand()
        if g == 0:
            mt = "21" if u < 0.05 else "41" if u < 0.10 else "11"
        elif g == 1:
            mt = "21" if u < 0.06 else "14" if u < 0.13 else "41" if u < 0.31 else "11"
        else:
            mt = "21" if u < 0.11 else "14" if u < 0.33 else "41" if u < 0.49 else "11"
        if want_cross and mt == "11" and rand() < 0.2:
            mt = "21"
        if night and (mt == "14" or (mt == "21" and rand() < 0.85)):
            mt = "11"
        lines: list[dict[str, Any]] = []
        acc = [0, 0, 0, 0]  # medfee, fully self-paid, over limit, paid first (乙类 share)
        sold: dict[int, int] = {}
        inp: tuple[DiagProfile, int, int, int, str] | None = None
        if mt == "21":
            # someone admitted days ago must not have settled anywhere since: look for such a person
            for attempt in range(5):
                q = p if attempt == 0 else (want_cross and self._pick_person(day, True)) or self._pick_local(day)
                inp = self._inpatient(q, t, day, lines, acc, sold)
                if inp is not None:
                    p = q
                    break
            else:
                mt = "11"
        cross = p.cross is not None
        if mt == "14" and (not p.regimen or t < p.next_rx):
            mt = "11"
        lr = p.loc_region
        if mt == "41":
            if p.home_p >= 0 and rand() < 0.8:
                inst = self.institutions[p.home_p]
            else:
                pc = self._p_city[lr] if cross else \
                    (self._p_local[lr] if rand() < 0.6 else None) or self._p_prov[lr]
                if pc is None:
                    mt = "11"
                else:
                    inst = self.institutions[self._wpick(pc)]
            if mt == "41" and not self._pharmacy(p, inst, t, lines, acc, sold):
                mt = "11"
        if inp is not None:
            inst = self.institutions[inp[1]]
        elif mt in ("11", "14"):
            if cross and p.cross is not None and p.cross.referral >= 0 and rand() < 0.5:
                inst = self.institutions[p.cross.referral]
            elif rand() < 0.6:
                inst = self.institutions[p.home_h]
            else:
                hc = self._h_city[lr] if cross else (self._h_local[lr] if rand() < 0.6 else None) \
                    or self._h_prov[lr]
                inst = self.institutions[self._wpick(hc)]
            self._outpatient(p, inst, t, mt, lines, acc, sold)
        self._n_setl += 1
        seq = self._n_setl
        medfee, fulamt, overlmt, pre = acc
        inscp = medfee - fulamt - overlmt
        if pre > inscp:
            pre = inscp
        base = inscp - pre
        emp = p.emp
        lv = inst.level
        hifp = hifmi = hifob = maf = 0
        if mt == "21":
            rate = min(980, _INP_RATE[emp][lv] + (30 if p.retired else 0)) - (40 if cross else 0)
            hifp = max(0, base - _DEDUCT[emp][lv]) * rate // 1000
        elif mt == "14":
            hifp = base * _CHRONIC_RATE[emp] // 1000
        elif mt == "11":
            if emp:
                if rand() < _EMP_OUT_POOLED:
                    hifp = base * _OUT_RATE[True][lv] // 1000
            else:
                hifp = min(base * _OUT_RATE[False][lv] // 1000, _RES_OUT_CAP)
        elif rand() < (0.10 if emp else 0.05):
            hifp = base // 2
        if mt in ("21", "14"):
            burden = inscp - hifp
            if emp and burden > _HIFOB_FROM:
                hifob = (burden - _HIFOB_FROM) * 500 // 1000
            elif not emp and burden > _HIFMI_FROM:
                hifmi = (burden - _HIFMI_FROM) * 600 // 1000
            if p.low_income:
                maf = min((inscp - hifp - hifmi - hifob) * 700 // 1000, 3_000_000)
        fund = hifp + hifmi + hifob + maf
        rest = medfee - fund
        acct = 0
        if emp:
            u = rand()
            if mt == "21":
                if u < 0.3:
                    acct = rest * int(rand() * 1000) // 1000
            elif u < 0.7:
                acct = rest
            elif u < 0.85:
                acct = rest * int(rand() * 1000) // 1000
        region = self.regions[p.ins_region].code
        datum: dict[str, Any] = {
            "event_id": self._eid(),
            "setl_id": f"ST{inst.admdvs}{seq:010d}",
            "mdtrt_id": f"MD{inst.admdvs}{seq:010d}",
            "psn_no": p.psn_no,
            "psn_cert_no": p.cert,
            "psn_name": p.name,
            "gend": p.gend,
            "brdy": p.brdy,
            "insutype": p.insutype,
            "med_type": mt,
            "fixmedins_code": inst.code,
            "hosp_lv": inst.hosp_lv,
            "insu_admdvs": region,
            "mdtrt_admdvs": inst.admdvs,
            "setl_time": t,
            "medfee_sumamt": medfee,
            "inscp_amt": inscp,
            "fulamt_ownpay_amt": fulamt,
            "overlmt_selfpay": overlmt,
            "preselfpay_amt": pre,
            "hifp_pay": hifp,
            "hifmi_pay": hifmi,
            "hifob_pay": hifob,
            "maf_pay": maf,
            "fund_pay_sumamt": fund,
            "acct_pay": acct,
            "psn_cash_pay": rest - acct,
            "clr_type": _MED_CLR[mt],
            "dscg_maindiag_code": None,
            "adm_date": None,
            "dscg_date": None,
            "drg_code": None,
            "oprn_codes": [],
            "fee_details": lines,
        }
        if inp is not None:
            prof, _i, adm_day, sev, _dr = inp
            datum["dscg_maindiag_code"] = prof.icd
            datum["adm_date"] = adm_day
            datum["dscg_date"] = day
            datum["drg_code"] = f"{prof.adrg}{sev}"
            datum["oprn_codes"] = list(prof.ops)
            p.last_dscg = t
        p.last_day = day
        self._emit(SETTLEMENT, p.psn_no, datum)
        sales: list[tuple[int, int, list[str]]] = []
        if sold:
            for it_idx, cnt in sold.items():
                traces = [self._trace(it_idx) for _ in range(min(MAX_TRACES, max(1, cnt // _CNT)))]
                sales.append((it_idx, cnt, traces))
                self._emit(INVENTORY, inst.code, self._movement(
                    inst, it_idx, "SALE_OUT", cnt, self._sale_pric(inst, CATALOGUE[it_idx]), traces,
                    datum["setl_id"], t))
        self._spent[self._pool_of_region[p.ins_region]][0 if emp else 1] += fund
        if rand() < self.config.reversal_rate:
            u = rand()
            delay = (5 * _MIN + int(rand() * 115 * _MIN) if u < 0.6 else
                     DAY_MS + int(rand() * 2 * DAY_MS) if u < 0.85 else
                     3 * DAY_MS + int(rand() * 11 * DAY_MS) if u < 0.95 else
                     14 * DAY_MS + int(rand() * 31 * DAY_MS))
            room = self._end - t
            if delay >= room:
                delay = int(rand() * room)
            if delay > 0:
                self._schedule(t + delay, _K_REVERSAL, (datum, inst.index, sales, lines))

    def _pick_person(self, day: int, cross: bool) -> _Person | None:
        """A filed cross-province person (weighted by age activity) not yet seen today, if any."""
        active = self._cross_active
        cum = self._cross_cum
        for _ in range(4):
            c = active[bisect.bisect_right(cum, self._rand() * cum[-1])]
            if c.last_day < day and c.cross is not None and day <= c.cross.until:
                return c
        return None

    def _pick_local(self, day: int) -> _Person:
        """A person insured and living here, preferably one who has not settled today."""
        fallback: _Person | None = None
        for _ in range(8):
            idx = self._pick_idx()
            if idx in self._cross_idx:
                continue
            fallback = self._person(idx)
            if fallback.last_day < day:
                return fallback
        return fallback if fallback is not None else self._person(self._any_local())

    def _any_local(self) -> int:
        idx = 0
        while idx in self._cross_idx:
            idx += 1
        return idx

    def _line(self, lines: list[dict[str, Any]], acc: list[int], it: CatalogueItem, cnt: int, pric: int,
              t: int, dr: str | None, days: int | None) -> None:
        prod = cnt * pric
        fee = (prod + _HALF) // _FEN
        lines.append({
            "feedetl_sn": _SN[len(lines)],
            "hilist_code": it.code,
            "hilist_name": it.name,
            "med_list_codg": it.code,
            "cnt": cnt,
            "pric": pric,
            "det_item_fee_sumamt": fee,
            "fee_ocur_time": t,
            "bilg_dr_code": dr,
            "medc_days": days,
        })
        acc[0] += fee
        if it.cls == 2:
            acc[1] += fee
            return
        ol = 0
        if it.overlmt:
            ol = min(fee, (cnt * it.overlmt + _HALF) // _FEN)
            acc[2] += ol
        if it.pre_pm:
            acc[3] += (fee - ol) * it.pre_pm // 1000

    def _take(self, inst: Institution, it_idx: int, cnt: int, t: int, sold: dict[int, int]) -> bool:
        """Reserve ``cnt`` units from the institution's stock; False (nothing taken) if short."""
        st = self._stock[inst.index].get(it_idx)
        if st is None:
            return False
        if st.level < cnt:
            # every request while a delivery is on its way is a stock-out: unbounded, the estimate
            # grew ×1.5 each time, into orders of 10^13 units (beyond the quantity columns)
            st.d0 = min(st.d0 * 3 // 2 + cnt, max(st.d_max, _D0_GROWTH_CAP * cnt))
            if st.level + st.on_order < st.d0 * 7:
                self._reorder(inst, it_idx, st)
            return False
        st.level -= cnt
        st.used += cnt
        sold[it_idx] = sold.get(it_idx, 0) + cnt
        if st.level + st.on_order < st.rop:
            self._reorder(inst, it_idx, st)
        return True

    def _sale_pric(self, inst: Institution, it: CatalogueItem) -> int:
        """Services are priced by hospital level (level 3 at the cap); goods at the catalogue price."""
        return it.pric if it.stocked else it.pric * _LEVEL_PRICE_PM[inst.level] // 1000

    def _purchase_pric(self, inst: Institution, it: CatalogueItem) -> int:
        """Public hospitals sell drugs at cost (zero mark-up); pharmacies buy ~15% below retail."""
        if inst.kind == "P" and not it.base_pric:
            return it.pric * 85 // 100
        return it.pric

    def _drug_line(self, p: _Person, inst: Institution, it_idx: int, t: int, dr: str | None,
                   lines: list[dict[str, Any]], acc: list[int], sold: dict[int, int],
                   max_days: int = 30) -> bool:
        it = CATALOGUE[it_idx]
        if (it.sex and it.sex != p.gend) or not it.min_age <= p.age <= it.max_age:
            return False
        if it.chronic and t < p.next_rx:
            return False
        code = it.code
        for ln in lines:
            if ln["hilist_code"] == code:
                return False
        key = it_idx * 64 + max_days
        opts = self._opts.get(key)
        if opts is None:
            opts = tuple(c for c in it.cnts if not it.days_num or c * it.days_num // it.days_den <= max_days)
            if not opts and not it.chronic:
                opts = it.cnts[:1]  # one pack even if it lasts longer (an inhaler, a box of 14)
            self._opts[key] = opts
        if not opts:
            return False
        units = opts[-1] if it.chronic else opts[int(self._rand() * len(opts))]
        cnt = units * _CNT
        if not self._take(inst, it_idx, cnt, t, sold):
            if units == opts[0] or not self._take(inst, it_idx, opts[0] * _CNT, t, sold):
                return False
            units, cnt = opts[0], opts[0] * _CNT
        days = units * it.days_num // it.days_den if it.days_num else None
        self._line(lines, acc, it, cnt, it.pric, t, dr, days)
        return True

    def _test_ok(self, p: _Person, it: CatalogueItem, it_idx: int, t: int) -> bool:
        if (it.sex and it.sex != p.gend) or not it.min_age <= p.age <= it.max_age:
            return False
        if it.key in ("hba1c", "fructosamine") and not p.conds & DM:
            return False
        if it.interval_days:
            last = p.last_test.get(it_idx) if p.last_test is not None else None
            if last is not None and t - last < it.interval_days * DAY_MS:
                return False
            if p.last_test is None:
                p.last_test = {}
            p.last_test[it_idx] = t
        return True

    def _outpatient(self, p: _Person, inst: Institution, t: int, mt: str, lines: list[dict[str, Any]],
                    acc: list[int], sold: dict[int, int]) -> None:
        rand = self._rand
        dr = inst.doctors[int(rand() * len(inst.doctors))]
        prof = inst.profile
        lv = inst.level
        t0 = t - 15 * _MIN - int(rand() * 75 * _MIN)
        step = (t - t0) // 8
        u = rand()
        ck = "consult"
        if lv == 3:
            ck = "consult_vip" if u < 0.02 else "consult_chief" if u < 0.22 else "consult_assoc" if u < 0.6 \
                else "consult"
        elif lv == 2 and u < 0.4:
            ck = "consult_assoc"
        it = CATALOGUE[_ITEM[ck]]
        self._line(lines, acc, it, _CNT, self._sale_pric(inst, it), t0, dr, None)
        tt = t0 + step
        if mt == "14" or rand() < (0.35, 0.45, 0.6)[p.group]:
            tests = self._tests[prof]
            for _ in range(1 + int(rand() * 3)):
                ti = tests[int(rand() * len(tests))]
                it = CATALOGUE[ti]
                if any(ln["hilist_code"] == it.code for ln in lines) or not self._test_ok(p, it, ti, tt):
                    continue
                self._line(lines, acc, it, _CNT, self._sale_pric(inst, it), tt, dr, None)
                tt += step // 3
        td = t0 + 5 * step
        if mt == "14" or (p.regimen and t >= p.next_rx and rand() < 0.3):
            got = False
            for ri in p.regimen:
                if ri in self._in_form[prof]:
                    got = self._drug_line(p, inst, ri, td, dr, lines, acc, sold) or got
            if got:
                p.next_rx = t + 30 * DAY_MS
        if mt == "11":
            acute = self._acute[prof]
            for _ in range(int(rand() * 4)):
                self._drug_line(p, inst, acute[int(rand() * len(acute))], td, dr, lines, acc, sold, 14)
            if rand() < 0.25:
                tcm = self._tcm[prof]
                if tcm:
                    self._drug_line(p, inst, tcm[int(rand() * len(tcm))], td, dr, lines, acc, sold, 14)
            if lv < 3 and p.group and rand() < 0.08:
                ti = t0 + 6 * step
                if self._take(inst, _ITEM["ceftriaxone"], 2 * _CNT, ti, sold):
                    it = CATALOGUE[_ITEM["ceftriaxone"]]
                    self._line(lines, acc, it, 2 * _CNT, it.pric, ti, dr, 1)
                    for k in ("saline", "infusion_set"):
                        if self._take(inst, _ITEM[k], _CNT, ti, sold):
                            it = CATALOGUE[_ITEM[k]]
                            self._line(lines, acc, it, _CNT, it.pric, ti, dr, 1 if k == "saline" else None)
                    it = CATALOGUE[_ITEM["iv_drip"]]
                    self._line(lines, acc, it, _CNT, self._sale_pric(inst, it), ti, dr, None)

    def _pharmacy(self, p: _Person, inst: Institution, t: int, lines: list[dict[str, Any]],
                  acc: list[int], sold: dict[int, int]) -> bool:
        """A pharmacy purchase; False (nothing sold) when nothing suitable is in stock."""
        rand = self._rand
        t0 = t - 2 * _MIN - int(rand() * 8 * _MIN)
        prof = inst.profile
        if p.regimen and t >= p.next_rx and rand() < 0.4:
            got = False
            for ri in p.regimen:
                if ri in self._in_form[prof]:
                    got = self._drug_line(p, inst, ri, t0, None, lines, acc, sold) or got
            if got:
                p.next_rx = t + 30 * DAY_MS
        for _ in range(1 + int(rand() * 3)):
            u = rand()
            pool = self._acute[prof] if u < 0.55 else self._tcm[prof] if u < 0.85 else self._selfpay[prof]
            if pool:
                self._drug_line(p, inst, pool[int(rand() * len(pool))], t0, None, lines, acc, sold, 14)
        if p.conds & DM and rand() < 0.2:
            self._drug_line(p, inst, _ITEM["strips"], t0, None, lines, acc, sold)
        if not lines:
            self._drug_line(p, inst, _ITEM["mask"], t0, None, lines, acc, sold)
        return bool(lines)

    def _inpatient(self, p: _Person, t: int, day: int, lines: list[dict[str, Any]], acc: list[int],
                   sold: dict[int, int]) -> tuple[DiagProfile, int, int, int, str] | None:
        """A stay ending (discharge settlement) at ``t``; None, with nothing added, if this person
        cannot have been admitted (visited since, or discharged less than 31 days before)."""
        rand = self._rand
        g = p.group
        opts = [d for d in DIAGNOSES if d.weights[g] > 0 and (not d.sex or d.sex == p.gend)
                and d.age[0] <= p.age <= d.age[1]]
        if not opts:
            return None
        cum = list(_accumulate([d.weights[g] for d in opts]))
        prof = opts[bisect.bisect_right(cum, rand() * cum[-1])]
        los = prof.los[0] + int(rand() * (prof.los[1] - prof.los[0] + 1))
        adm_day = day - los
        if p.last_day >= adm_day or t - p.last_dscg < (los + 31) * DAY_MS:
            return None
        lr = p.loc_region
        cr = p.cross
        if cr is not None and cr.referral >= 0 and self.institutions[cr.referral].level >= prof.min_level:
            inst_idx = cr.referral
        else:
            c = (self._h_inp_city[lr] if cr is not None else self._h_inp_prov[lr])[prof.min_level - 1]
            if c is None:
                return None
            inst_idx = self._wpick(c)
        inst = self.institutions[inst_idx]
        form = self._in_form[inst.profile]
        docs = inst.doctors
        dr = docs[int(rand() * len(docs))]
        u = rand()
        sev = 1 if u < 0.10 else 3 if u < 0.35 else 5
        adm = day_start_ms(adm_day) + 8 * HOUR_MS + int(rand() * 12 * HOUR_MS)
        level = inst.level

        def svc(key: str, cnt: int, at: int, who: str | None = dr) -> None:
            i = _ITEM[key]
            if i in form:
                it = CATALOGUE[i]
                self._line(lines, acc, it, cnt, self._sale_pric(inst, it), at, who, None)

        def drug(key: str, cnt: int, at: int) -> bool:
            i = _ITEM[key]
            if i not in form or not self._take(inst, i, cnt, at, sold):
                return False
            it = CATALOGUE[i]
            self._line(lines, acc, it, cnt, it.pric, at, dr, None if it.kind == "CONS" else 1)
            return True

        at = adm + 20 * _MIN
        drug("cannula", _CNT, at)
        for key in dict.fromkeys(("cbc", "urine", "biochem", "coag", "ecg", *prof.tests)):
            i = _ITEM[key]
            if i in form and self._test_ok(p, CATALOGUE[i], i, at):
                svc(key, _CNT, at)
            at += 5 * _MIN
        bed = "bed1" if rand() < 0.05 and level >= 2 else "bed2" if rand() < 0.12 else "bed3"
        nursing = "nursing1" if prof.surgery or sev == 1 or p.age >= 80 else "nursing2"
        avail = [k for k in prof.inj if _ITEM[k] in form]
        inj = (avail[0] if sev == 1 or len(avail) == 1 else avail[1]) if avail else ""
        inj_days = max(1, round(los * prof.inj_days)) if inj else 0
        inj_cnt = {"ceftriaxone": 2, "cefoperazone": 2, "meropenem": 3, "piperacillin": 3, "edaravone": 2,
                   "paclitaxel": 6}.get(inj, 1) * _CNT
        surg_day = min(1, los - 1) if prof.surgery else -1
        oral = [k for k in prof.oral if _ITEM[k] in form]
        daily_oral = next((k for k in oral if CATALOGUE[_ITEM[k]].days_num == 1), "")
        for k in range(los):
            ds = day_start_ms(adm_day + k)
            base = adm if k == 0 else ds + 8 * HOUR_MS
            svc(bed, _CNT, ds + 7 * HOUR_MS if k else base)
            svc(nursing, _CNT, base + 30 * _MIN)
            svc("inp_consult", _CNT, base + 45 * _MIN)
            treated = False
            tk = base + 2 * HOUR_MS + int(rand() * 6 * HOUR_MS)
            if k < inj_days and drug(inj, inj_cnt, tk):
                svc("iv_drip", _CNT, tk)
                if inj != "saline" and k % 2 == 0:
                    drug("saline", _CNT, tk)
                for sup in prof.support:
                    drug(sup, (2 if sup in ("danhong", "ambroxol") else 1) * _CNT, tk)
                treated = True
            if prof.nebulize and drug("budesonide", 2 * _CNT, tk + HOUR_MS):
                svc("nebulization", 2 * _CNT, tk + HOUR_MS)
                treated = True
            if k == surg_day:
                surgeon = docs[int(rand() * len(docs))]
                ts = ds + 9 * HOUR_MS
                for op in prof.surgery:
                    svc(op, _CNT, ts, surgeon)
                if prof.implant:
                    drug(prof.implant, (1 + int(rand() * prof.implant_max)) * _CNT, ts)
                drug("gauze", 2 * _CNT, ts)
                treated = True
            if prof.monitor and k < 3:
                hours = 24 if prof.monitor == "ecg_monitor" else 8 + int(rand() * 17)
                if k == 0:
                    hours = min(hours, max(1, (ds + DAY_MS - adm) // HOUR_MS))
                svc(prof.monitor, hours * _CNT, base + HOUR_MS)
                treated = True
            if prof.surgery and k > surg_day >= 0 and k % 2 == 0:
                svc("dressing", _CNT, tk)
                treated = True
            if k == 3 and los > 5:
                svc("cbc", _CNT, base + HOUR_MS)
                svc("biochem", _CNT, base + HOUR_MS)
                treated = True
            if not treated and daily_oral:
                treated = drug(daily_oral, CATALOGUE[_ITEM[daily_oral]].days_den * _CNT, tk)
            if not treated:
                svc("crp" if k % 2 else "cbc", _CNT, tk)
        td = t - 10 * _MIN - int(rand() * 110 * _MIN)
        chronic = False
        for key in oral:
            got = self._drug_line(p, inst, _ITEM[key], td, dr, lines, acc, sold, 14)
            chronic = chronic or (got and CATALOGUE[_ITEM[key]].chronic)
        if chronic:
            p.next_rx = t + 30 * DAY_MS
        return prof, inst_idx, adm_day, sev, dr

    def _trace(self, it_idx: int) -> str:
        """The next traceability code of a catalogue item."""
        n = self._trace_next[it_idx]
        self._trace_next[it_idx] = n + 1
        return trace_code(self._trace_prefix[it_idx], n % 10**9)

    def _movement(self, inst: Institution, it_idx: int, mov_type: str, cnt: int, pric: int,
                  traces: list[str], setl_id: str | None, t: int) -> dict[str, Any]:
        self._n_mov += 1
        return {
            "event_id": _uuid4(self._bits(128)),
            "mov_id": f"MV{self._n_mov:012d}",
            "fixmedins_code": inst.code,
            "med_list_codg": CATALOGUE[it_idx].code,
            "admdvs": inst.admdvs,
            "mov_type": mov_type,
            "cnt": cnt,
            "pric": pric,
            "drug_trac_codg": traces,
            "setl_id": setl_id,
            "mov_time": t,
        }

    # --- heap handlers ------------------------------------------------------------------------
    def _h_ready(self, t: int, ev: SimEvent) -> None:
        self._out.append(ev)

    def _h_reversal(self, t: int, payload: tuple[dict[str, Any], int, list[tuple[int, int, list[str]]],
                                                 list[dict[str, Any]]]) -> None:
        orig, inst_idx, sales, lines = payload
        rand = self._rand
        inst = self.institutions[inst_idx]
        medfee = orig["medfee_sumamt"]
        full = len(lines) < 2 or rand() < 0.85
        returned = sales
        if full:
            part = medfee
            rea = ("BILLING_ERROR", "PATIENT_CANCEL", "INSURANCE_INFO_ERROR", "RESETTLEMENT")[int(rand() * 4)]
        else:
            if sales:
                returned = [sales[int(rand() * len(sales))]]
                code = CATALOGUE[returned[0][0]].code
                part = sum(ln["det_item_fee_sumamt"] for ln in lines if ln["hilist_code"] == code)
                rea = "DRUG_RETURN"
            else:
                returned = []
                part = lines[1 + int(rand() * (len(lines) - 1))]["det_item_fee_sumamt"]
                rea = "ITEM_CANCELLED"
            if part <= 0 or part >= medfee:
                full, part, returned = True, medfee, sales
        if full:
            amounts = {k: orig[k] for k in ("medfee_sumamt", "inscp_amt", "hifp_pay", "hifmi_pay", "hifob_pay",
                                            "maf_pay", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")}
        else:
            # pro rata, floored, and the few fen left over go where the original had room, so that
            # no reversed component exceeds what was paid
            keys = ("hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay", "acct_pay", "psn_cash_pay")
            comp = {k: orig[k] * part // medfee for k in keys}
            left = part - sum(comp.values())
            for k in reversed(keys):
                add = min(left, orig[k] - comp[k])
                comp[k] += add
                left -= add
            fund = comp["hifp_pay"] + comp["hifmi_pay"] + comp["hifob_pay"] + comp["maf_pay"]
            amounts = {"medfee_sumamt": part, "inscp_amt": orig["inscp_amt"] * part // medfee, **comp,
                       "fund_pay_sumamt": fund}
        self._n["rev"] += 1
        datum = {
            "event_id": self._eid(),
            "setl_id": f"RV{orig['mdtrt_admdvs']}{self._n['rev']:010d}",
            "init_setl_id": orig["setl_id"],
            "mdtrt_id": orig["mdtrt_id"],
            "psn_no": orig["psn_no"],
            "insutype": orig["insutype"],
            "med_type": orig["med_type"],
            "fixmedins_code": orig["fixmedins_code"],
            "insu_admdvs": orig["insu_admdvs"],
            "mdtrt_admdvs": orig["mdtrt_admdvs"],
            "setl_time": t,
            "init_setl_time": orig["setl_time"],
            "refd_setl_flag": True,
            "full_reversal": full,
            **amounts,
            "rea": rea,
        }
        self._emit(REVERSAL, orig["psn_no"], datum)
        pool = self._pool_of_region[next(i for i, r in enumerate(self.regions) if r.code == orig["insu_admdvs"])]
        self._spent[pool][0 if orig["insutype"] == "310" else 1] -= amounts["fund_pay_sumamt"]
        if orig["med_type"] in ("11", "41"):
            for it_idx, cnt, traces in returned:
                st = self._stock[inst_idx][it_idx]
                st.level += cnt
                st.used -= cnt
                self._emit(INVENTORY, inst.code, self._movement(
                    inst, it_idx, "SALE_RETURN", cnt, CATALOGUE[it_idx].pric, traces, orig["setl_id"], t))

    def _h_filing(self, t: int, idx: int) -> None:
        p = self._person(idx)
        cr = p.cross
        assert cr is not None
        rand = self._rand
        day = (t + CHINA_OFFSET_MS) // DAY_MS
        treat = self.regions[cr.treat_region]
        long_term = cr.dcla_type in ("RETIRED_RESETTLED", "LONG_TERM_RESIDENCE", "POSTED_WORK")
        if long_term:
            enddate = None if rand() < 0.6 else day + 365 * (1 + int(rand() * 3))
        else:
            enddate = day + (30 if cr.dcla_type == "EMERGENCY" else 180)
        if enddate is not None:
            cr.until = enddate
        self._n["dcla"] += 1
        datum = {
            "event_id": self._eid(),
            "trt_dcla_detl_sn": f"BA{self.regions[p.ins_region].code}{self._n['dcla']:08d}",
            "psn_no": p.psn_no,
            "psn_cert_no": p.cert,
            "psn_name": p.name if rand() < 0.95 else None,
            "tel": p.tel if rand() < 0.85 else None,
            "insu_admdvs": self.regions[p.ins_region].pool,
            "mdtrt_area_admdvs": treat.pool,
            "dcla_type": cr.dcla_type,
            "fixmedins_code": self.institutions[cr.referral].code if cr.referral >= 0 else None,
            "begndate": day,
            "enddate": enddate,
            "dcla_time": t,
        }
        self._emit(FILING, p.psn_no, datum)
        self._cross_active.append(p)
        self._cross_cum.append((self._cross_cum[-1] if self._cross_cum else 0.0) + p.activity)

    def _business(self, t: int) -> int:
        """``t`` moved into working hours (08:30-17:30 China time), same day or the next."""
        loc = t + CHINA_OFFSET_MS
        day, mod = divmod(loc, DAY_MS)
        if mod < 8 * HOUR_MS + 30 * _MIN:
            mod = 8 * HOUR_MS + 30 * _MIN + int(self._rand() * 2 * HOUR_MS)
        elif mod > 17 * HOUR_MS + 30 * _MIN:
            day += 1
            mod = 8 * HOUR_MS + 30 * _MIN + int(self._rand() * 3 * HOUR_MS)
        return max(t, day * DAY_MS + mod - CHINA_OFFSET_MS)

    def _h_contract(self, t: int, payload: tuple[int, int]) -> None:
        inst_idx, it_idx = payload
        inst = self.institutions[inst_idx]
        it = CATALOGUE[it_idx]
        start_day = (self._start + CHINA_OFFSET_MS) // DAY_MS
        # the reported demand (报量) is the expected one, not the estimate a stock-out raised in the
        # hours before signing (up to 64×: an agreed volume the institution then lags by far)
        demand = self._stock[inst_idx][it_idx].demand * 365
        pack = it.pack * _CNT
        volume = max(pack, demand * it.vbp_ratio_pm // 1000 // pack * pack)
        self._n["cntr"] += 1
        cntr_id = f"CT{inst.admdvs}{self._n['cntr']:06d}"
        self._contracts[(inst_idx, it_idx)] = cntr_id
        end_day = start_day + (729 if it.kind == "CONS" else 364)
        self._pace[(inst_idx, it_idx)] = [volume, day_start_ms(start_day), day_start_ms(end_day + 1), 0, 0]
        self._emit(CONTRACT, inst.code, {
            "event_id": self._eid(),
            "cntr_id": cntr_id,
            "fixmedins_code": inst.code,
            "med_list_codg": it.code,
            "splr_code": self.suppliers[self._item_supplier[it_idx]].code,
            "admdvs": inst.admdvs[:2] + "0000",
            "agreed_volume": volume,
            "win_pric": it.pric,
            "base_pric": it.base_pric,
            "cycle_begn_date": start_day,
            "cycle_end_date": end_day,
            "sign_time": t,
        })

    def _reorder(self, inst: Institution, it_idx: int, st: _Stock) -> None:
        t = self._now
        elapsed = max(t - self._start, DAY_MS)
        d = max(st.d0, st.used * DAY_MS // elapsed)
        st.rop = d * 7
        pack = CATALOGUE[it_idx].pack * _CNT
        want = st.rop + int(d * self.config.order_cover_days) - st.level - st.on_order
        qty = max(pack, -(-want // pack) * pack)
        st.on_order += qty
        when = self._business(t + 5 * _MIN + int(self._rand() * 3 * HOUR_MS))
        self._schedule(when, _K_ORDER, (inst.index, it_idx, qty))

    def _keep_pace(self, t: int, day: int) -> None:
        """A hospital is assessed on completing its agreed volumes (带量采购考核), so it keeps its
        purchases under a contract at the pace of the cycle: on a working day when they lag the
        share elapsed by tonight by more than :data:`PACE_SLACK_PM`, it orders what brings them
        to the share a week ahead. Without it a drug used less than reported (an inpatient
        injectable between two courses) lagged by more than YB-PROC-VOLUME-LAG's 10 points in clean
        traffic (seeds 1 and 2 of the evaluation's shape)."""
        tonight = day_start_ms(day + 1)
        for (inst_idx, it_idx), c in self._pace.items():
            volume, begin, end, bought, pending = c
            if not begin < tonight <= end:
                continue
            cycle = end - begin
            if (bought + pending) * 1000 >= volume * ((tonight - begin) * 1000 // cycle - PACE_SLACK_PM):
                continue
            target = volume * min(cycle, tonight - begin + 7 * DAY_MS) // cycle
            pack = CATALOGUE[it_idx].pack * _CNT
            qty = max(pack, -(-(target - bought - pending) // pack) * pack)
            c[4] += qty
            self._stock[inst_idx][it_idx].on_order += qty
            self._schedule(self._business(t + 9 * HOUR_MS + int(self._rand() * 6 * HOUR_MS)), _K_ORDER,
                           (inst_idx, it_idx, qty, True))

    def _h_order(self, t: int, payload: tuple[int, ...]) -> None:
        inst_idx, it_idx, qty = payload[:3]
        rand = self._rand
        inst = self.institutions[inst_idx]
        it = CATALOGUE[it_idx]
        pric = self._purchase_pric(inst, it)
        books = self._pace.get((inst_idx, it_idx))
        if books is not None:
            books[3] += qty
            if len(payload) > 3:
                books[4] -= qty
        self._n["ord"] += 1
        ord_id = f"PO{inst.admdvs}{self._n['ord']:08d}"
        splr = self.suppliers[self._item_supplier[it_idx]].code
        self._emit(ORDER, inst.code, {
            "event_id": self._eid(),
            "ord_id": ord_id,
            "fixmedins_code": inst.code,
            "splr_code": splr,
            "med_list_codg": it.code,
            "cntr_id": self._contracts.get((inst_idx, it_idx)),
            "admdvs": inst.admdvs,
            "purc_cnt": qty,
            "purc_pric": pric,
            "purc_amt": (qty * pric + _HALF) // _FEN,
            "ord_time": t,
        })
        pack = it.pack * _CNT
        first = qty
        if qty >= 2 * pack and rand() < 0.1:
            first = qty * 6 // 10 // pack * pack
        when = self._business(t + DAY_MS + int(rand() * 4 * DAY_MS))
        self._schedule(when, _K_DELIVERY, (inst_idx, it_idx, ord_id, splr, first, pric))
        if first < qty:
            self._schedule(self._business(when + DAY_MS + int(rand() * 2 * DAY_MS)), _K_DELIVERY,
                           (inst_idx, it_idx, ord_id, splr, qty - first, pric))

    def _h_delivery(self, t: int, payload: tuple[int, int, str, str, int, int]) -> None:
        inst_idx, it_idx, ord_id, splr, cnt, pric = payload
        rand = self._rand
        inst = self.institutions[inst_idx]
        self._n["dlv"] += 1
        dlv_id = f"DL{inst.admdvs}{self._n['dlv']:08d}"
        amt = (cnt * pric + _HALF) // _FEN
        self._emit(DELIVERY, inst.code, {
            "event_id": self._eid(),
            "dlv_id": dlv_id,
            "ord_id": ord_id,
            "fixmedins_code": inst.code,
            "splr_code": splr,
            "med_list_codg": CATALOGUE[it_idx].code,
            "admdvs": inst.admdvs,
            "dlv_cnt": cnt,
            "dlv_amt": amt,
            "acpt_time": t,
        })
        st = self._stock[inst_idx][it_idx]
        st.level += cnt
        st.on_order -= cnt
        self._emit(INVENTORY, inst.code, self._movement(inst, it_idx, "PURCHASE_IN", cnt, pric, [], None, t))
        u = rand()
        late = self.config.late_payment_rate  # the same draws whatever the rate: only payment times move
        days = (1 + int(rand() * 7) if u < 0.4 else 8 + int(rand() * 22) if u < 1 - late
                else 31 + int(rand() * 30) if u < 1 - late / 5 else 61 + int(rand() * 60))
        self._schedule(self._business(t + days * DAY_MS), _K_PAYMENT, (inst_idx, dlv_id, splr, amt))
        if rand() < 0.01:
            back = max(_CNT, cnt // 10 // _CNT * _CNT)
            self._schedule(self._business(t + DAY_MS + int(rand() * 6 * DAY_MS)), _K_RETURN,
                           (inst_idx, it_idx, back, pric))

    def _h_payment(self, t: int, payload: tuple[int, str, str, int]) -> None:
        inst_idx, dlv_id, splr, amt = payload
        inst = self.institutions[inst_idx]
        self._n["pay"] += 1
        self._emit(PAYMENT, inst.code, {
            "event_id": self._eid(),
            "pay_id": f"PY{inst.admdvs}{self._n['pay']:08d}",
            "dlv_id": dlv_id,
            "fixmedins_code": inst.code,
            "splr_code": splr,
            "admdvs": inst.admdvs,
            "pay_amt": amt,
            "pay_time": t,
        })

    def _h_return(self, t: int, payload: tuple[int, int, int, int]) -> None:
        inst_idx, it_idx, cnt, pric = payload
        st = self._stock[inst_idx][it_idx]
        cnt = min(cnt, st.level // _CNT * _CNT)
        if cnt <= 0:
            return
        st.level -= cnt
        inst = self.institutions[inst_idx]
        self._emit(INVENTORY, inst.code, self._movement(inst, it_idx, "PURCHASE_RETURN", cnt, pric, [], None, t))

    def _h_stocktake(self, t: int, payload: tuple[int, int]) -> None:
        inst_idx, it_idx = payload
        inst = self.institutions[inst_idx]
        st = self._stock[inst_idx][it_idx]
        self._emit(INVENTORY, inst.code, self._movement(
            inst, it_idx, "STOCKTAKE", st.level, self._purchase_pric(inst, CATALOGUE[it_idx]), [], None, t))

    def _h_day(self, t: int, day: int) -> None:
        """Schedule one local day's fund bookings, inspections, tips and stocktakes."""
        rand = self._rand
        cfg = self.config
        ds = day_start_ms(day)
        weekday = (day + 3) % 7 < 5

        def at(lo_h: float, span_h: float) -> int:
            return max(t, ds + int((lo_h + rand() * span_h) * HOUR_MS))

        d = date.fromordinal(EPOCH_ORDINAL + day)
        # contributions are booked in the afternoon of weekdays, and late on a month's last day
        # whatever day it is, so that a month's spending is matched within the month (a small pool's
        # large evening settlements otherwise carried into the next and a clean month showed a deficit)
        month_end = (d + timedelta(days=1)).day == 1
        if (weekday or month_end) and cfg.fund_income_per_region_day:
            for pool in range(len(self.pools)):
                for j in range(cfg.fund_income_per_region_day):
                    self._schedule(at(23.8, 0.15) if month_end else at(15, 3), _K_INCOME, (pool, j, day))
            if d.day == 21 and d.month in (3, 6, 9, 12):
                for pool in range(len(self.pools)):
                    self._schedule(at(10, 2), _K_INCOME, (pool, -1, day))
        self._insp_carry += self._insp_per_day * (1.0 if weekday else 0.25)
        n = int(self._insp_carry)
        if rand() < self._insp_carry - n:
            n += 1
        self._insp_carry -= n
        for _ in range(n):
            u = rand()
            kind = _INSP_TYPES[-1][0]
            for name, share in _INSP_TYPES:
                if u < share:
                    kind = name
                    break
                u -= share
            if kind == "FLIGHT":
                hc = [x.index for x in self.institutions if x.kind == "H" and x.level >= 2]
                target = hc[int(rand() * len(hc))] if hc else int(rand() * len(self.institutions))
            else:
                target = int(rand() * len(self.institutions))
            self._schedule(at(9, 8), _K_INSPECTION, (target, kind, False))
        self._tip_carry += self._tip_per_day * (1.0 if weekday else 0.5)
        n = int(self._tip_carry)
        if rand() < self._tip_carry - n:
            n += 1
        self._tip_carry -= n
        for _ in range(n):
            self._schedule(at(8, 14), _K_TIP, None)
        if weekday:
            self._keep_pace(t, day)
        for x in self.institutions:
            if rand() < 0.08:
                items = self._stocked[x.profile]
                for _ in range(3):
                    self._schedule(at(19, 2), _K_STOCKTAKE, (x.index, items[int(rand() * len(items))]))

    def _h_income(self, t: int, payload: tuple[int, int, int]) -> None:
        """Book contributions sized from the fund spending accrued since this component's last
        booking, times ``income_spending_ratio``: income tracks the scale of the generated
        settlements whatever the mix, so months of payout capacity stay plausible."""
        pool, j, _day = payload
        rand = self._inc_rng.random
        cfg = self.config
        if j < 0:  # quarterly interest on a balance of about nine months of spending
            elapsed = max(1.0, (t - self._start) / DAY_MS)
            for ins, insutype in ((0, "310"), (1, "390")):
                daily = self._spent[pool][ins] / elapsed
                self._income(pool, insutype, "INTEREST", int(daily * 270 * 0.015 / 4), t)
            return
        comps = [(ins, name, share) for ins, insutype in ((0, "310"), (1, "390"))
                 for name, share in _INCOME_MIX[insutype]]
        c = j % len(comps)
        ins, name, share = comps[c]
        marks = self._income_marks[pool]
        accrued = self._spent[pool][ins] - marks[c]
        marks[c] = self._spent[pool][ins]
        amt = int(accrued * cfg.income_spending_ratio * share * (0.85 + 0.3 * rand()))
        if rand() < 0.02:
            self._income(pool, ("310", "390")[ins], "OTHER", amt // 20, t)
        self._income(pool, ("310", "390")[ins], name, amt, t)

    def _income(self, pool: int, insutype: str, kind: str, amt: int, t: int) -> None:
        if amt <= 0:
            return
        self._n["inc"] += 1
        code = self.pools[pool]
        self._emit(INCOME, code, {
            "event_id": _uuid4(self._inc_rng.getrandbits(128)),
            "income_id": f"FI{code}{self._n['inc']:08d}",
            "insu_admdvs": code,
            "insutype": insutype,
            "income_type": kind,
            "income_amt": amt,
            "book_time": t,
        })

    def _h_inspection(self, t: int, payload: tuple[int, str, bool]) -> None:
        inst_idx, kind, tipped = payload
        rand = self._rand
        inst = self.institutions[inst_idx]
        day = (t + CHINA_OFFSET_MS) // DAY_MS
        viol = rand() < (0.6 if tipped else _INSP_VIOL[kind])
        amt = 0
        if viol:
            med = _VIOL_MEDIAN_YUAN[inst.level] * (2 if kind == "FLIGHT" else 1)
            amt = int(_lognormal(self._rng, med, 1.0) * 100)
        self._n["insp"] += 1
        insp_id = f"IN{inst.admdvs}{self._n['insp']:06d}"
        self._emit(INSPECTION, inst.code, {
            "event_id": self._eid(),
            "insp_id": insp_id,
            "insp_type": kind,
            "fixmedins_code": inst.code,
            "admdvs": inst.admdvs,
            "begndate": day - 1 - int(rand() * 10),
            "enddate": day if viol or rand() < 0.9 else None,
            "viol_flag": viol,
            "viol_amt": amt,
            "insp_time": t,
        })
        if viol:
            if rand() < 0.7:
                self._schedule(self._business(t + (3 + int(rand() * 27)) * DAY_MS), _K_PENALTY,
                               (inst_idx, insp_id, amt))
            elif rand() < 0.6:
                self._schedule(self._business(t + (5 + int(rand() * 25)) * DAY_MS), _K_RECOVERY,
                               (inst_idx, insp_id, None, amt))

    def _h_penalty(self, t: int, payload: tuple[int, str, int]) -> None:
        inst_idx, insp_id, viol_amt = payload
        rand = self._rand
        inst = self.institutions[inst_idx]
        u = rand()
        big = viol_amt > 10_000_000
        kind = ("WARNING" if u < (0.2 if big else 0.45) else "FINE" if u < (0.75 if big else 0.93)
                else "SUSPEND_AGREEMENT" if u < 0.98 else "TERMINATE_AGREEMENT")
        fine = 0
        if kind == "FINE" or (kind != "WARNING" and rand() < 0.5):
            fine = viol_amt * (1000 + int(rand() * 4000)) // 1000
        # milder when it would take the institution's credit score to grade D (PENALTY_ROOM): a
        # termination a suspension, else a warning without a fine; none when not even that fits
        points, fines = self._penalised.get(inst_idx, (0, 0))
        options = [(kind, fine), *([("SUSPEND_AGREEMENT", fine)] if kind == "TERMINATE_AGREEMENT" else []),
                   ("WARNING", 0)]
        kind, fine = next(((k, f) for k, f in options if points + PENALTY_POINTS[k]
                           + min(MAX_FINE_POINTS, (fines + f) // FINE_FEN_PER_POINT) <= PENALTY_ROOM), ("", 0))
        pnsh_id: str | None = None
        if kind:
            self._penalised[inst_idx] = (points + PENALTY_POINTS[kind], fines + fine)
            self._n["pnsh"] += 1
            pnsh_id = f"PN{inst.admdvs}{self._n['pnsh']:06d}"
            self._emit(PENALTY, inst.code, {
                "event_id": self._eid(),
                "pnsh_id": pnsh_id,
                "fixmedins_code": inst.code,
                "admdvs": inst.admdvs,
                "pnsh_type": kind,
                "fine_amt": fine,
                "insp_id": insp_id,
                "pnsh_time": t,
            })
        when = self._business(t + (5 + int(rand() * 15)) * DAY_MS)
        if rand() < 0.3 and viol_amt >= 200:
            half = viol_amt // 2
            self._schedule(when, _K_RECOVERY, (inst_idx, insp_id, pnsh_id, half))
            self._schedule(self._business(when + (20 + int(rand() * 20)) * DAY_MS), _K_RECOVERY,
                           (inst_idx, insp_id, pnsh_id, viol_amt - half))
        else:
            self._schedule(when, _K_RECOVERY, (inst_idx, insp_id, pnsh_id, viol_amt))

    def _h_recovery(self, t: int, payload: tuple[int, str, str | None, int]) -> None:
        inst_idx, insp_id, pnsh_id, amt = payload
        inst = self.institutions[inst_idx]
        self._n["rcvr"] += 1
        self._emit(RECOVERY, inst.code, {
            "event_id": self._eid(),
            "rcvr_id": f"RC{inst.admdvs}{self._n['rcvr']:06d}",
            "fixmedins_code": inst.code,
            "admdvs": inst.admdvs,
            "rcvr_amt": amt,
            "insp_id": insp_id,
            "pnsh_id": pnsh_id,
            "rcvr_time": t,
        })

    def _h_tip(self, t: int, _payload: None) -> None:
        rand = self._rand
        r = bisect.bisect_right(self._region_cum, rand() * self._region_cum[-1])
        region = self.regions[r].code
        inst: Institution | None = None
        if rand() < 0.85:
            c = self._h_local[r] if rand() < 0.7 else (self._p_local[r] or self._h_local[r])
            inst = self.institutions[self._wpick(c)]
        u = rand()
        cat = _TIP_CATS[-1][0]
        for name, share in _TIP_CATS:
            if u < share:
                cat = name
                break
            u -= share
        male = rand() < 0.5
        cert, _brdy, name_, tel = self._identity(region, 20 + int(rand() * 55), male)
        self._n["tip"] += 1
        self._emit(TIP, inst.code if inst else region, {
            "event_id": self._eid(),
            "tip_id": f"TP{region}{self._n['tip']:06d}",
            "admdvs": region,
            "fixmedins_code": inst.code if inst else None,
            "tip_cat": cat,
            "rptr_name": name_,
            "rptr_cert_no": cert if rand() < 0.7 else None,
            "rptr_tel": tel if rand() < 0.9 else None,
            "inv_amt": int(_lognormal(self._rng, 3000.0, 1.2) * 100) if rand() < 0.6 else None,
            "reward_amt": None,
            "recv_time": t,
        })
        if inst is not None and rand() < 0.35:
            self._schedule(self._business(t + (2 + int(rand() * 8)) * DAY_MS), _K_INSPECTION,
                           (inst.index, "SPECIAL", True))


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    """Log-normal draw by its median: money at risk is heavy-tailed."""
    return median * math.exp(sigma * rng.gauss(0.0, 1.0))


def _accumulate(values: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


def write_jsonl(events: Iterable[SimEvent], path: Path, codec: Codec) -> int:
    """Write events as JSON lines (``event_type`` plus the codec's JSON form); returns the count.

    The JSON form (ISO-8601 times in China time, decimals as strings) is what people and tools
    read; ``codec.from_json`` turns each line back into the identical raw datum.
    """
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for ev in events:
            obj = {"event_type": ev.event_type, **codec.to_json(ev.record, ev.datum)}
            fh.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
            fh.write("\n")
            n += 1
    return n
