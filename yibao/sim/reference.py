"""The generator's reference data, read from data files (``data/``): the districts people live in,
the national medical-insurance catalogue as the generator uses it, and the inpatient case types.
Their order fixes the generated traffic (the same seed gives the same events).
"""

from __future__ import annotations

import csv
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
_PRIC = 1_000_000  # prices at scale 6


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


def _scaled(yuan: str) -> int:
    """A price in yuan to the scale-6 unscaled int."""
    return int(Decimal(yuan) * _PRIC)


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    """A TOML table as dataclass keyword arguments: its arrays become the tuples the classes hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}


def _catalogue_item(row: dict[str, Any]) -> CatalogueItem:
    kw = _fields(row)
    kw["pric"] = _scaled(str(kw.pop("price")))
    for src, dst in (("base", "base_pric"), ("over", "overlmt")):
        if src in kw:
            kw[dst] = _scaled(str(kw.pop(src)))
    return CatalogueItem(**kw, stocked=kw["kind"] != "SERV", chronic=str(kw["role"]).startswith("chronic"))


def load_regions(path: Path = DATA / "regions.csv") -> tuple[Region, ...]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = csv.DictReader(line for line in fh if not line.startswith("#"))
        return tuple(Region(r["code"], r["name"], float(r["weight"])) for r in rows)


def load_catalogue(path: Path = DATA / "catalogue.toml") -> tuple[CatalogueItem, ...]:
    with path.open("rb") as fh:
        return tuple(_catalogue_item(row) for row in tomllib.load(fh)["item"])


def load_diagnoses(path: Path = DATA / "diagnoses.toml") -> tuple[DiagProfile, ...]:
    with path.open("rb") as fh:
        return tuple(DiagProfile(**_fields(row)) for row in tomllib.load(fh)["diagnosis"])


REGIONS = load_regions()
CATALOGUE = load_catalogue()
#: catalogue code → index in CATALOGUE
CATALOGUE_INDEX = {it.code: i for i, it in enumerate(CATALOGUE)}
DIAGNOSES = load_diagnoses()
