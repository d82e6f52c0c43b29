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
  by an earlier filing for that city), so a rule that fires on it is a false positive. Anomalies are
  planted later through :class:`EventHook` with their own RNG, so planting never shifts the base
  traffic and the planted event ids are the ground truth.
* Identifiers are deterministic and unique within a run; ``event_id`` is a UUID-4-formatted string
  drawn from the seeded RNG.

Formats chosen where the contracts leave room: supplier codes are valid 18-char unified social
credit codes (``91`` + 6-digit region + GB 11714 organization code + GB 32100 check char);
traceability codes are 7-digit product id + 9-digit unit serial + 4 check digits, one per
movement; filings name the treatment city as its pool code ``XXXX99``; contracts name the
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
from decimal import Decimal
from operator import mul as _mul
from pathlib import Path
from typing import Any, Protocol

from schemas import Codec
from schemas.calendar import CHINA, CHINA_OFFSET_MS, DAY_MS, EPOCH_ORDINAL, HOUR_MS, day_start_ms, ymd
from streams.records import RECORDS

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
_D0_GROWTH_CAP = 64  # a stock-out raises the daily demand estimate to at most 64× its start (or one request)
_PRIC = 1_000_000  # scale 6
_HALF = 50_000_000  # half a fen at scale 10 (cnt x pric)
_FEN = 100_000_000


# --- reference data ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Region:
    """A county-level district (GB/T 2260) with a rough population weight (hundreds of thousands)."""

    code: str
    name: str
    weight: float

    @property
    def province(self) -> str:
        return self.code[:2]

    @property
    def city(self) -> str:
        return self.code[:4]

    @property
    def pool(self) -> str:
        """City pooling region (统筹区) in the ``XXXX99`` convention."""
        return self.code[:4] + "99"


# Ordered so that any prefix spans several provinces (regions=2 already crosses a border).
REGIONS: tuple[Region, ...] = (
    Region("110105", "北京市朝阳区", 3.5),
    Region("440305", "深圳市南山区", 1.8),
    Region("310115", "上海市浦东新区", 5.7),
    Region("510107", "成都市武侯区", 1.2),
    Region("330106", "杭州市西湖区", 1.1),
    Region("450124", "南宁市马山县", 0.5),
    Region("230103", "哈尔滨市南岗区", 1.0),
    Region("460105", "海口市秀英区", 0.4),
    Region("430104", "长沙市岳麓区", 1.5),
    Region("420111", "武汉市洪山区", 1.7),
    Region("370102", "济南市历下区", 0.8),
    Region("610113", "西安市雁塔区", 1.4),
    Region("110108", "北京市海淀区", 3.1),
    Region("440106", "广州市天河区", 2.2),
    Region("310104", "上海市徐汇区", 1.1),
    Region("510104", "成都市锦江区", 0.9),
    Region("330102", "杭州市上城区", 1.3),
    Region("450102", "南宁市兴宁区", 0.5),
    Region("460202", "三亚市海棠区", 0.2),
    Region("430102", "长沙市芙蓉区", 0.6),
    Region("370202", "青岛市市南区", 0.5),
    Region("440304", "深圳市福田区", 1.6),
    Region("420106", "武汉市武昌区", 1.3),
    Region("230102", "哈尔滨市道里区", 0.8),
)

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


@dataclass(frozen=True, slots=True)
class CatalogueItem:
    """One entry of the national medical-insurance catalogue as the generator uses it.

    Quantities are in the item's catalogue unit (tablet, box, vial, day, hour, test); ``pric`` is
    the capped unit price at a level-3 hospital or a pharmacy (scale 6). ``cls`` is the insurance
    class: 0 甲类 (fully in scope), 1 乙类 (in scope after ``pre_pm``‰ paid first by the person),
    2 丙类/self-paid (全自费). ``overlmt`` is the part of the unit price above the payment standard.
    """

    key: str
    kind: str  # WEST, TCM, CONS, SERV
    code: str
    name: str
    pric: int
    role: str
    where: str = "OI"  # O outpatient, I inpatient, P pharmacy
    cnts: tuple[int, ...] = (1,)  # allowed quantities per outpatient/pharmacy line, in units
    days_num: int = 0  # days of supply per unit = days_num / days_den (drugs)
    days_den: int = 1
    cls: int = 0
    pre_pm: int = 0
    overlmt: int = 0
    min_level: int = 1
    sex: str = ""  # "MALE"/"FEMALE" when restricted
    min_age: int = 0
    max_age: int = 200
    base_pric: int = 0  # > 0: volume-based-procurement winner; baseline price before the tender
    vbp_ratio_pm: int = 0  # agreed volume = demand x ratio
    interval_days: int = 0  # minimum days between repeats for one person
    u100: float = 0.0  # units used per 100 settlements at a hospital stocking it (measured)
    u100p: float = 0.0  # the same at a pharmacy
    pack: int = 1  # order multiple, in units
    stocked: bool = True  # drugs and consumables are in the purchase-sale-inventory books
    chronic: bool = False  # long-term medication: refills at least 30 days apart


def _y(yuan: str) -> int:
    """Catalogue price in yuan (import time only) to the scale-6 unscaled int."""
    return int(Decimal(yuan) * _PRIC)


def _item(key: str, kind: str, code: str, name: str, price: str, role: str, **kw: Any) -> CatalogueItem:
    base = kw.pop("base", None)
    if base is not None:
        kw["base_pric"] = _y(base)
    if "over" in kw:
        kw["overlmt"] = _y(kw.pop("over"))
    return CatalogueItem(key=key, kind=kind, code=code, name=name, pric=_y(price), role=role,
                         stocked=kind != "SERV", chronic=role.startswith("chronic"), **kw)


W, Z, C, S = "WEST", "TCM", "CONS", "SERV"
CATALOGUE: tuple[CatalogueItem, ...] = (
    # --- Western drugs: volume-procurement winners are priced per tablet/capsule (6 decimals) ---
    _item("amlodipine", W, "XC08CAA133A001010100101", "苯磺酸氨氯地平片(5mg)", "0.150000", "chronic:1",
          where="OIP", cnts=(14, 28), days_num=1, base="1.000000", vbp_ratio_pm=700, u100=55, u100p=75, pack=28),
    _item("valsartan", W, "XC09CAX016B001010500541", "缬沙坦胶囊(80mg)", "0.250000", "chronic:1",
          where="OIP", cnts=(14, 28), days_num=1, cls=1, pre_pm=50, base="1.500000", vbp_ratio_pm=700,
          u100=55, u100p=62, pack=28),
    _item("nifedipine", W, "XC08CAN026A024010600651", "硝苯地平控释片(30mg)", "0.600000", "chronic:1",
          where="OIP", cnts=(14, 28), days_num=1, base="3.300000", vbp_ratio_pm=600, u100=52, u100p=48, pack=7),
    _item("irbesartan", W, "XC09CAE102A001010700761", "厄贝沙坦片(0.15g)", "0.200000", "chronic:1",
          where="OIP", cnts=(14, 28), days_num=1, cls=1, pre_pm=50, base="1.350000", vbp_ratio_pm=700,
          u100=52, u100p=65, pack=28),
    _item("metoprolol", W, "XC07ABM085A024010800871", "琥珀酸美托洛尔缓释片(47.5mg)", "1.600000",
          "chronic:1", where="OIP", cnts=(14, 28), days_num=1, cls=1, pre_pm=50, u100=42, u100p=46, pack=7),
    _item("metformin", W, "XA10BAE014A010010300321", "盐酸二甲双胍缓释片(0.5g)", "0.090000", "chronic:2",
          where="OIP", cnts=(30, 60), days_num=1, days_den=2, base="0.400000", vbp_ratio_pm=800, u100=62, u100p=74,
          pack=30),
    _item("acarbose", W, "XA10BFA010A001010400431", "阿卡波糖片(50mg)", "0.180000", "chronic:2",
          where="OIP", cnts=(30, 60, 90), days_num=1, days_den=3, cls=1, pre_pm=100, base="1.200000",
          vbp_ratio_pm=700, u100=76, u100p=71, pack=30),
    _item("glimepiride", W, "XA10BBG064A001010900981", "格列美脲片(2mg)", "0.120000", "chronic:2",
          where="OIP", cnts=(14, 28), days_num=1, cls=1, pre_pm=50, base="1.000000", vbp_ratio_pm=600,
          u100=25, u100p=21, pack=14),
    _item("insulin_glargine", W, "XA10AEG045B002011301421", "甘精胰岛素注射液(3ml:300单位)", "70.000000",
          "chronic:2", where="OIP", cnts=(1, 2), days_num=15, cls=1, pre_pm=100, min_level=2,
          base="180.000000", vbp_ratio_pm=800, u100=1.0, u100p=0.7, pack=1),
    _item("atorvastatin", W, "XC10AAA042A001010200211", "阿托伐他汀钙片(20mg)", "0.200000", "chronic:4",
          where="OIP", cnts=(14, 28), days_num=1, cls=1, pre_pm=50, base="1.600000", vbp_ratio_pm=700,
          u100=57, u100p=65, pack=7),
    _item("rosuvastatin", W, "XC10AAR143A001011101201", "瑞舒伐他汀钙片(10mg)", "0.200000", "chronic:4",
          where="OIP", cnts=(14, 28), days_num=1, cls=1, pre_pm=50, base="1.900000", vbp_ratio_pm=700,
          u100=50, u100p=53, pack=28),
    _item("clopidogrel", W, "XB01ACL123A001011001091", "硫酸氢氯吡格雷片(75mg)", "0.450000", "chronic:8",
          where="OIP", cnts=(14, 28), days_num=1, cls=1, pre_pm=50, base="3.400000", vbp_ratio_pm=700,
          u100=30, u100p=17, pack=7),
    _item("entecavir", W, "XJ05AFE019A009011201311", "恩替卡韦分散片(0.5mg)", "0.220000", "chronic:16",
          where="OIP", cnts=(14, 28), days_num=1, cls=1, pre_pm=100, min_level=2, base="2.000000",
          vbp_ratio_pm=800, u100=14, u100p=27, pack=28),
    _item("amoxicillin", W, "XJ01CAA040B001011401531", "阿莫西林胶囊(0.25g×24粒)", "8.500000", "acute",
          where="OIP", cnts=(1, 2), days_num=4, u100=30, u100p=30, pack=1),
    _item("cefuroxime", W, "XJ01DCT081A001011501641", "头孢呋辛酯片(0.25g×12片)", "9.800000", "acute",
          where="OIP", cnts=(1, 2), days_num=6, cls=1, pre_pm=50, base="32.000000", vbp_ratio_pm=600,
          u100=25, u100p=20, pack=1),
    _item("levofloxacin", W, "XJ01MAZ012A001011601751", "左氧氟沙星片(0.5g×6片)", "5.900000", "acute",
          where="OIP", cnts=(1,), days_num=6, min_age=18, base="25.000000", vbp_ratio_pm=600, u100=16,
          u100p=16, pack=1),
    _item("ibuprofen", W, "XM01AEB011B031011701861", "布洛芬缓释胶囊(0.3g×20粒)", "14.500000", "acute",
          where="OIP", cnts=(1, 2), days_num=10, u100=20, u100p=20, pack=1),
    _item("omeprazole", W, "XA02BCA013B001011801971", "奥美拉唑肠溶胶囊(20mg×14粒)", "3.200000", "acute",
          where="OIP", cnts=(1, 2), days_num=14, base="24.000000", vbp_ratio_pm=700, u100=10, u100p=10, pack=1),
    _item("montelukast", W, "XR03DCM061A001011902081", "孟鲁司特钠片(10mg×5片)", "35.000000", "acute",
          where="OIP", cnts=(1, 2), days_num=5, cls=1, pre_pm=100, u100=30, u100p=30, pack=1),
    _item("salbutamol", W, "XR03ACS030L021012002191", "硫酸沙丁胺醇吸入气雾剂(100μg×200揿)", "25.000000",
          "acute", where="OIP", cnts=(1,), days_num=20, u100=5, u100p=5, pack=1),
    _item("vitamin_c", W, "XA11GAV201A001012802971", "维生素C咀嚼片(100mg×60片)", "18.000000", "selfpay",
          where="P", cnts=(1, 2), days_num=30, cls=2, u100=0, u100p=10, pack=1),
    # --- injectables (inpatient, outpatient infusion) ---
    _item("ceftriaxone", W, "XJ01DDT082B062012102201", "注射用头孢曲松钠(1g)", "2.800000", "inj", where="OI",
          base="18.000000", vbp_ratio_pm=700, u100=25, u100p=0, pack=10),
    _item("cefoperazone", W, "XJ01DDT084B062012202311", "注射用头孢哌酮钠舒巴坦钠(1.5g)", "58.000000", "inj",
          where="I", cls=1, pre_pm=100, min_level=2, u100=13, u100p=0, pack=10),
    _item("meropenem", W, "XJ01DHM077B062012302421", "注射用美罗培南(0.5g)", "28.000000", "inj", where="I",
          cls=1, pre_pm=100, min_level=3, base="120.000000", vbp_ratio_pm=600, u100=13, u100p=0, pack=10),
    _item("omeprazole_inj", W, "XA02BCA013B062012402531", "注射用奥美拉唑钠(40mg)", "4.300000", "inj",
          where="I", cls=1, pre_pm=100, base="28.000000", vbp_ratio_pm=700, u100=3, u100p=0, pack=10),
    _item("albumin", W, "XB05AAR054B056012502641", "人血白蛋白(10g)", "380.000000", "inj", where="I",
          cls=1, pre_pm=200, min_level=2, u100=0.6, u100p=0, pack=1),
    _item("paclitaxel", W, "XL01CDZ011B062012602751", "注射用紫杉醇(30mg)", "420.000000", "inj", where="I",
          cls=1, pre_pm=100, min_level=3, u100=2, u100p=0, pack=6),
    _item("piperacillin", W, "XJ01CRP101B062013102201", "注射用哌拉西林钠他唑巴坦钠(4.5g)", "35.000000",
          "inj", where="I", cls=1, pre_pm=100, min_level=2, base="90.000000", vbp_ratio_pm=700, u100=8,
          u100p=0, pack=10),
    _item("edaravone", W, "XN07XXY099B002013002191", "依达拉奉注射液(20ml:30mg)", "45.000000", "inj",
          where="I", cls=1, pre_pm=100, min_level=2, u100=6, u100p=0, pack=10),
    _item("budesonide", W, "XR03BAB022L035012902081", "吸入用布地奈德混悬液(2ml:1mg)", "12.000000", "inj",
          where="I", cls=1, pre_pm=100, u100=6, u100p=0, pack=30),
    _item("ticagrelor", W, "XB01ACT203A001013202311", "替格瑞洛片(90mg)", "1.200000", "chronic:8",
          where="I", cnts=(14, 28), days_num=1, days_den=2, cls=1, pre_pm=100, min_level=2, base="7.000000",
          vbp_ratio_pm=700, u100=2, u100p=0, pack=14),
    _item("ambroxol", W, "XR05CBA105B002013502641", "盐酸氨溴索注射液(2ml:15mg)", "8.000000", "inj",
          where="I", u100=8, u100p=0, pack=10),
    _item("amino_acid", W, "XB05BAF071B056013402531", "复方氨基酸注射液(18AA)(250ml)", "38.000000", "inj",
          where="I", cls=1, pre_pm=100, u100=4, u100p=0, pack=10),
    _item("fat_emulsion", W, "XB05BAZ061B056013302421", "中/长链脂肪乳注射液(C8~24)(250ml)", "85.000000",
          "inj", where="I", cls=1, pre_pm=200, min_level=2, u100=3, u100p=0, pack=10),
    _item("saline", W, "XB05BBL051B056012702861", "0.9%氯化钠注射液(250ml)", "3.200000", "ns", where="OI",
          u100=13, u100p=0, pack=20),
    # --- Chinese patent medicines ---
    _item("lianhua", Z, "ZA01AAL0156010100175", "连花清瘟胶囊(0.35g×24粒)", "14.800000", "tcm", where="OP",
          cnts=(1, 2), days_num=2, cls=1, pre_pm=100, u100=6, u100p=15, pack=1),
    _item("danhong", Z, "ZA12BAD1021010900953", "丹红注射液(20ml)", "52.000000", "inj", where="I", cls=1,
          pre_pm=200, u100=15, u100p=0, pack=10),
    _item("danshen", Z, "ZA12BAF0291010200286", "复方丹参滴丸(27mg×180丸)", "26.000000", "chronic:8",
          where="OIP", cnts=(2, 3, 4), days_num=6, u100=4, u100p=3, pack=1),
    _item("yinxing", Z, "ZA12EAY0412010300397", "银杏叶片(×24片)", "30.000000", "tcm", where="OP",
          cnts=(1, 2), days_num=8, cls=1, pre_pm=100, u100=4, u100p=9, pack=1),
    _item("liuwei", Z, "ZA09AAL0533010400408", "六味地黄丸(浓缩丸×200丸)", "18.000000", "tcm", where="OP",
          cnts=(1, 2), days_num=8, cls=1, pre_pm=100, u100=4, u100p=8, pack=1),
    _item("banlangen", Z, "ZA01BAB0644010500519", "板蓝根颗粒(10g×20袋)", "12.000000", "tcm", where="OP",
          cnts=(1, 2), days_num=6, u100=4, u100p=11, pack=1),
    _item("xuesaitong", Z, "ZA12BAX0755010600620", "血塞通软胶囊(×24粒)", "38.000000", "tcm", where="O",
          cnts=(1, 2), days_num=8, cls=1, pre_pm=100, min_age=40, u100=2.5, u100p=0, pack=1),
    _item("pudilan", Z, "ZA01CAP0977010800842", "蒲地蓝消炎片(×48片)", "28.000000", "tcm", where="OP",
          cnts=(1, 2), days_num=4, cls=1, pre_pm=100, u100=5.5, u100p=15, pack=1),
    # --- consumables ---
    _item("infusion_set", C, "C14010100100000112340000001", "一次性使用输液器(带针)", "2.800000", "cons",
          where="OI", u100=6, u100p=0, pack=50),
    _item("cannula", C, "C14010200200000223450000002", "一次性使用静脉留置针", "12.000000", "cons", where="I",
          u100=5, u100p=0, pack=50),
    _item("gauze", C, "C1403010040000044567", "医用脱脂纱布敷料", "3.500000", "cons", where="I", u100=3, u100p=0,
          pack=50),
    _item("strips", C, "C0701020050000055678", "血糖试纸(50片/盒)", "65.000000", "strip", where="P",
          cnts=(1, 2), cls=2, u100=0, u100p=4, pack=1),
    _item("mask", C, "C1402050060000066789", "一次性使用医用口罩", "0.800000", "selfpay", where="P",
          cnts=(10, 20), cls=2, u100=0, u100p=320, pack=50),
    _item("stent", C, "C02010101000000662600000001", "冠状动脉药物洗脱支架系统", "700.000000", "implant",
          where="I", min_level=3, base="6500.000000", vbp_ratio_pm=800, u100=0.4, u100p=0, pack=1),
    _item("hip_joint", C, "C03120201000000773400000002", "人工髋关节假体(全髋)", "7000.000000", "implant",
          where="I", cls=1, pre_pm=200, min_level=2, base="35000.000000", vbp_ratio_pm=800, u100=0.3, u100p=0, pack=1),
    # --- medical service items (prices in whole 10 fen so level discounts stay whole fen) ---
    _item("consult", S, "001102000010000", "普通门诊诊查费", "10.000000", "consult", where="O"),
    _item("consult_assoc", S, "001102000020000", "副主任医师门诊诊查费", "25.000000", "consult", where="O",
          min_level=2),
    _item("consult_chief", S, "001102000030000", "主任医师门诊诊查费", "40.000000", "consult", where="O",
          min_level=3),
    _item("consult_vip", S, "001102000060000", "特需门诊诊查费", "300.000000", "consult", where="O", cls=2,
          min_level=3),
    _item("inp_consult", S, "001102000040000", "住院诊查费", "25.000000", "inp_consult", where="I"),
    _item("bed3", S, "001103000010001", "床位费(三人间)", "60.000000", "bed", where="I"),
    _item("bed2", S, "001103000010002", "床位费(双人间)", "80.000000", "bed", where="I", over="20.000000"),
    _item("bed1", S, "001103000010003", "床位费(单人间)", "150.000000", "bed", where="I", over="90.000000",
          min_level=2),
    _item("nursing1", S, "001201000010000", "Ⅰ级护理", "40.000000", "nursing", where="I"),
    _item("nursing2", S, "001201000020000", "Ⅱ级护理", "24.000000", "nursing", where="I"),
    _item("ecg_monitor", S, "001202000010000", "心电监测", "5.000000", "monitor", where="I"),
    _item("oxygen", S, "001204000010000", "氧气吸入", "3.000000", "monitor", where="I"),
    _item("nebulization", S, "001204000020000", "雾化吸入", "10.000000", "infusion", where="I"),
    _item("iv_drip", S, "001211000030000", "静脉输液", "8.000000", "infusion", where="OI"),
    _item("dressing", S, "001213000010000", "换药(中)", "30.000000", "dressing", where="I"),
    _item("biochem", S, "002503990010000", "血清生化全套检查", "240.000000", "test", where="I"),
    _item("coag", S, "002504000010000", "凝血功能四项", "80.000000", "test", where="I"),
    _item("culture", S, "002504010010000", "细菌培养鉴定及药敏试验", "120.000000", "test", where="I",
          min_level=2),
    _item("mri", S, "002103000010000", "磁共振(MR)平扫", "800.000000", "test", where="I", min_level=2),
    _item("cbc", S, "002501000010000", "血细胞分析(血常规)", "20.000000", "test"),
    _item("urine", S, "002502000010000", "尿液分析(尿常规)", "10.000000", "test"),
    _item("alt", S, "002503000040000", "丙氨酸氨基转移酶测定", "5.000000", "test"),
    _item("creatinine", S, "002503000250000", "肌酐测定", "5.000000", "test"),
    _item("cholesterol", S, "002503000330000", "血清总胆固醇测定", "6.000000", "test", min_age=18),
    _item("hba1c", S, "002503010030000", "糖化血红蛋白测定", "60.000000", "test", interval_days=15),
    _item("fructosamine", S, "002503010040000", "血清果糖胺测定", "15.000000", "test", interval_days=7),
    _item("crp", S, "002503070010000", "C反应蛋白测定", "30.000000", "test"),
    _item("pct", S, "002503070020000", "降钙素原测定", "150.000000", "test", where="I", min_level=2),
    _item("psa", S, "002505000320000", "前列腺特异性抗原测定", "80.000000", "test", sex="MALE", min_age=45,
          min_level=2),
    _item("cervical", S, "002703000010000", "宫颈细胞学检查", "60.000000", "test", sex="FEMALE", min_age=21,
          min_level=2),
    _item("blood_gas", S, "002503100010000", "血气分析", "60.000000", "test", where="I", min_level=2),
    _item("ecg", S, "003103000010000", "常规心电图检查", "25.000000", "test"),
    _item("dr_chest", S, "002101000010000", "数字化摄影(DR)胸部正位", "70.000000", "test"),
    _item("ct", S, "002102000010000", "X线计算机体层(CT)平扫", "260.000000", "test", min_level=2),
    _item("ultrasound", S, "002201000010000", "彩色多普勒超声常规检查(腹部)", "150.000000", "test",
          min_level=2),
    _item("anesthesia", S, "003301000010000", "全身麻醉", "1500.000000", "surgery", where="I", min_level=2),
    _item("angiography", S, "003310020040000", "冠状动脉造影术", "2000.000000", "surgery", where="I",
          min_level=3),
    _item("pci", S, "003310020070000", "经皮冠状动脉内支架置入术", "4500.000000", "surgery", where="I",
          min_level=3),
    _item("tha", S, "003315040030000", "人工全髋关节置换术", "3800.000000", "surgery", where="I", min_level=2),
    _item("appendectomy", S, "003314020080000", "腹腔镜阑尾切除术", "1800.000000", "surgery", where="I",
          min_level=2),
    _item("cholecystectomy", S, "003314060070000", "腹腔镜胆囊切除术", "2200.000000", "surgery", where="I",
          min_level=2),
    _item("delivery", S, "003315100010000", "单胎顺产接生", "800.000000", "surgery", where="I", sex="FEMALE",
          min_age=18, max_age=45),
)
#: catalogue code → index in CATALOGUE
CATALOGUE_INDEX = {it.code: i for i, it in enumerate(CATALOGUE)}


def trace_code(prefix: int, serial: int) -> str:
    """20-digit drug traceability code: 7-digit product id, 9-digit unit serial, 4-digit check."""
    return f"{prefix:07d}{serial:09d}{(prefix * 31 + serial * 17) % 10_000:04d}"

del W, Z, C, S
_ITEM: dict[str, int] = {it.key: i for i, it in enumerate(CATALOGUE)}


@dataclass(frozen=True, slots=True)
class DiagProfile:
    """An inpatient case type: main diagnosis (ICD-10 insurance 2.0), CHS-DRG-style ADRG, stay shape."""

    icd: str
    name: str
    adrg: str
    los: tuple[int, int]
    min_level: int
    weights: tuple[float, float, float]  # child, adult, elderly
    inj: tuple[str, ...] = ()  # daily injectables in order of preference (highest level first)
    inj_days: float = 0.6  # share of the stay with daily injections
    oral: tuple[str, ...] = ()  # discharge medication
    tests: tuple[str, ...] = ()  # admission tests beyond the routine panel
    surgery: tuple[str, ...] = ()
    implant: str = ""
    implant_max: int = 1
    ops: tuple[str, ...] = ()  # ICD-9-CM-3
    monitor: str = ""  # ecg_monitor / oxygen for the first days
    nebulize: bool = False
    support: tuple[str, ...] = ()  # further daily infusions while injections run
    sex: str = ""
    age: tuple[int, int] = (0, 200)


DIAGNOSES: tuple[DiagProfile, ...] = (
    DiagProfile("J18.900", "肺炎", "ES2", (5, 10), 1, (0.30, 0.14, 0.22),
                inj=("meropenem", "piperacillin", "cefoperazone", "ceftriaxone"), inj_days=0.8,
                support=("ambroxol",), oral=("cefuroxime",),
                tests=("dr_chest", "crp", "pct", "culture", "blood_gas"), monitor="oxygen"),
    DiagProfile("J20.900", "急性支气管炎", "ES3", (3, 6), 1, (0.40, 0.05, 0.03), inj=("ceftriaxone",),
                support=("ambroxol",), oral=("montelukast", "cefuroxime"), tests=("dr_chest", "crp")),
    DiagProfile("J44.100", "慢性阻塞性肺病伴有急性加重", "ET2", (7, 12), 1, (0.0, 0.02, 0.12),
                inj=("piperacillin", "cefoperazone", "ceftriaxone"), inj_days=0.8, support=("ambroxol",),
                oral=("salbutamol",), tests=("dr_chest", "ct", "culture", "blood_gas"), monitor="oxygen",
                nebulize=True, age=(40, 200)),
    DiagProfile("I21.900", "急性心肌梗死", "FM1", (5, 9), 3, (0.0, 0.04, 0.07), inj=("omeprazole_inj",),
                support=("danhong",), oral=("ticagrelor", "atorvastatin"), tests=("ultrasound",),
                surgery=("angiography", "pci"), implant="stent", implant_max=2,
                ops=("88.5500", "00.6600", "36.0700"), monitor="ecg_monitor", age=(35, 200)),
    DiagProfile("I25.100", "动脉硬化性心脏病", "FR3", (5, 9), 2, (0.0, 0.04, 0.10), inj=("saline",),
                support=("danhong",), oral=("clopidogrel", "atorvastatin", "danshen"), tests=("ultrasound",),
                monitor="ecg_monitor", age=(40, 200)),
    DiagProfile("I63.900", "脑梗死", "BR2", (8, 14), 2, (0.0, 0.04, 0.12), inj=("edaravone", "omeprazole_inj"),
                support=("danhong",), oral=("atorvastatin", "clopidogrel"), tests=("ct", "mri"), age=(40, 200)),
    DiagProfile("I50.900", "心力衰竭", "FR2", (6, 11), 2, (0.0, 0.01, 0.08), inj=("albumin", "saline"),
                inj_days=0.5, support=("danhong",), oral=("metoprolol", "valsartan"),
                tests=("dr_chest", "ultrasound", "blood_gas"), monitor="ecg_monitor", age=(45, 200)),
    DiagProfile("E11.900", "2型糖尿病", "KS1", (6, 10), 1, (0.0, 0.04, 0.07), inj=("saline",), inj_days=0.3,
                oral=("metformin", "acarbose"), tests=("hba1c", "ultrasound"), age=(30, 200)),
    DiagProfile("K35.800", "急性阑尾炎", "GD1", (3, 6), 2, (0.08, 0.12, 0.02), inj=("ceftriaxone",),
                support=("amino_acid",), tests=("ultrasound", "crp"), surgery=("anesthesia", "appendectomy"),
                ops=("47.0100",), age=(6, 200)),
    DiagProfile("K80.200", "胆囊结石不伴有胆囊炎", "HC2", (3, 6), 2, (0.0, 0.10, 0.06), inj=("cefoperazone",),
                support=("amino_acid", "fat_emulsion"), tests=("ultrasound", "ct"),
                surgery=("anesthesia", "cholecystectomy"), ops=("51.2300",), age=(25, 200)),
    DiagProfile("M16.900", "髋关节病", "IC2", (9, 15), 2, (0.0, 0.02, 0.05), inj=("ceftriaxone",),
                inj_days=0.3, support=("amino_acid", "fat_emulsion"), tests=("dr_chest",),
                surgery=("anesthesia", "tha"), implant="hip_joint", ops=("81.5100",), age=(45, 200)),
    DiagProfile("S72.000", "股骨颈骨折", "IC2", (9, 15), 2, (0.0, 0.01, 0.05), inj=("ceftriaxone",),
                inj_days=0.3, support=("amino_acid", "fat_emulsion"), tests=("dr_chest", "ct"),
                surgery=("anesthesia", "tha"), implant="hip_joint", ops=("81.5200",), age=(50, 200)),
    DiagProfile("O80.000", "单胎顺产", "OF1", (2, 4), 1, (0.0, 0.10, 0.0), tests=("ultrasound",),
                surgery=("delivery",), ops=("73.5900",), sex="FEMALE", age=(20, 42)),
    DiagProfile("C34.900", "支气管和肺恶性肿瘤", "RE1", (3, 5), 3, (0.0, 0.03, 0.05), inj=("paclitaxel",),
                inj_days=0.01, support=("amino_acid", "fat_emulsion"), oral=("omeprazole",), tests=("ct",),
                ops=("99.2500",), age=(40, 200)),
    DiagProfile("N39.000", "泌尿道感染", "LU1", (4, 8), 1, (0.03, 0.04, 0.06), inj=("ceftriaxone",),
                oral=("levofloxacin",), tests=("urine", "ultrasound")),
)


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
    __slots__ = ("d0", "d_max", "level", "on_order", "rop", "used")

    def __init__(self, level: int, d0: int) -> None:
        self.level = level
        self.on_order = 0
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
# inpatient deductible (fen) and pooled-fund rate (‰) by [employee?][level]
_DEDUCT = {True: {1: 10_000, 2: 30_000, 3: 60_000}, False: {1: 10_000, 2: 30_000, 3: 60_000}}
_INP_RATE = {True: {1: 960, 2: 930, 3: 910}, False: {1: 920, 2: 850, 3: 800}}
# per-stay stand-ins for the annual thresholds of critical-illness insurance (residents, paying 60%
# above it) and large-amount supplementary payment (employees, 50%)
_HIFMI_FROM = 500_000
_HIFOB_FROM = 300_000
_OUT_RATE = {True: {1: 700, 2: 600, 3: 500}, False: {1: 600, 2: 500, 3: 400}}
_LEVEL_PRICE_PM = {1: 800, 2: 900, 3: 1000, 9: 1000}
# FundIncome components per insutype: (income_type, share of the day's contributions)
_INCOME_MIX = {"310": (("EMPLOYER", 0.69), ("INDIVIDUAL", 0.31)),
               "390": (("FISCAL_SUBSIDY", 0.66), ("INDIVIDUAL", 0.34))}
# Expected fund spending (fen) of each insutype per settlement of a pool's insured (all insutypes
# together), measured on generated
# traffic (≈100-130 yuan; small pools vary more, their realised share of persons is noisy). Used
# only to size the opening balance, so an estimate off by 1.5× still leaves > 6 months of capacity.
_FUND_PER_SETTLEMENT = {"310": 11_000, "390": 13_000}
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
        self._spent = [[0, 0] for _ in self.pools]  # fund spending by pool, [employee, resident]
        self._income_marks = [[0, 0, 0, 0] for _ in self.pools]  # spending already matched by income
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
            hifp = base * (700 if emp else 600) // 1000
        elif mt == "11":
            if emp:
                if rand() < 0.35:
                    hifp = base * _OUT_RATE[True][lv] // 1000
            else:
                hifp = min(base * _OUT_RATE[False][lv] // 1000, 10_000)
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
            "insu_admdvs": self.regions[p.ins_region].code,
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
        demand = self._stock[inst_idx][it_idx].d0 * 365
        pack = it.pack * _CNT
        volume = max(pack, demand * it.vbp_ratio_pm // 1000 // pack * pack)
        self._n["cntr"] += 1
        cntr_id = f"CT{inst.admdvs}{self._n['cntr']:06d}"
        self._contracts[(inst_idx, it_idx)] = cntr_id
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
            "cycle_end_date": start_day + (729 if it.kind == "CONS" else 364),
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

    def _h_order(self, t: int, payload: tuple[int, int, int]) -> None:
        inst_idx, it_idx, qty = payload
        rand = self._rand
        inst = self.institutions[inst_idx]
        it = CATALOGUE[it_idx]
        pric = self._purchase_pric(inst, it)
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
        rand = self._rand
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
            "event_id": self._eid(),
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
