"""Settlement subsystem (结算): settlements with fee lines, reversals, cross-province filings.

Topic key: ``psn_no``. Person-history rules (repeat tests, excess prescribing, doctor shopping,
split hospitalization, ghost visits) are keyed by person, and visit/stay rules by ``mdtrt_id``,
which belongs to one person, so all of them see a person's events in order on one partition.
A reversal carries the same key, so it arrives after the settlement it reverses. Hospital-month
rules re-key by ``fixmedins_code``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from schemas.calendar import CHINA_OFFSET_MS, DAY_MS, china_day, ymd

from .base import (
    RecordSpec,
    RowContext,
    Subsystem,
    TableMapping,
    constant,
    from_parent,
    negated,
    parent_token,
    token_of,
    twinned,
)
from .checks_common import amount_matches, non_negative, not_blank, quantity, when
from .config import ValidationConfig
from .validation import (
    AtMost,
    BirthDate,
    Code,
    DateOrder,
    Each,
    EachString,
    Limits,
    LinesSumTo,
    OneOf,
    Region,
    SumsTo,
)

if TYPE_CHECKING:
    from .rows_columnar import FrameContext

NS = "cn.nhsa.yibao.settlement"

MONEY = ("medfee_sumamt", "inscp_amt", "fulamt_ownpay_amt", "overlmt_selfpay", "preselfpay_amt",
         "hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")
FUND_PARTS = ("hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay")
REVERSAL_MONEY = ("medfee_sumamt", "inscp_amt", "hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay",
                  "fund_pay_sumamt", "acct_pay", "psn_cash_pay")


def age_at(brdy_days: int, setl_ms: int) -> int:
    """Completed years at the settlement's China-time date."""
    by, bm, bd = ymd(brdy_days)
    sy, sm, sd = ymd(china_day(setl_ms))
    return max(0, sy - by - ((sm, sd) < (bm, bd)))


def _age_columnar(ctx: FrameContext) -> list[Any]:
    """:func:`age_at` on whole columns: epoch days read as polars dates give the same proleptic
    Gregorian calendar as ``datetime.date`` (years 1 to 9999, where ``age_at`` is defined)."""
    import polars as pl  # here, so that the record path never loads polars

    birth = pl.col("brdy").cast(pl.Date)
    day = ((pl.col("setl_time") + CHINA_OFFSET_MS) // DAY_MS).cast(pl.Date)

    def month_day(d: pl.Expr) -> pl.Expr:
        return d.dt.month().cast(pl.Int32) * 32 + d.dt.day().cast(pl.Int32)

    years = day.dt.year() - birth.dt.year() - (month_day(day) < month_day(birth)).cast(pl.Int32)
    return ctx.rows.select(years.clip(lower_bound=0)).to_series().to_list()


@twinned(_age_columnar)
def _age(ds: Sequence[dict[str, Any]], ctx: RowContext) -> list[Any]:
    return [age_at(d["brdy"], d["setl_time"]) for d in ds]


def _line_count_columnar(ctx: FrameContext) -> list[Any]:
    return ctx.column("fee_details").list.len().to_list()


@twinned(_line_count_columnar)
def _line_count(ds: Sequence[dict[str, Any]], ctx: RowContext) -> list[Any]:
    return [len(d["fee_details"]) for d in ds]


def build(validation: ValidationConfig, limits: Callable[[], Limits]) -> Subsystem:
    insutypes = validation.known_insutypes
    med_types = validation.known_med_types
    line_checks = (
        not_blank("feedetl_sn"),
        Code("hilist_code", "list_item"),
        Code("med_list_codg", "list_item"),
        Code("bilg_dr_code", "practitioner", optional=True),
        quantity("cnt"),
        non_negative("pric", "det_item_fee_sumamt"),
        amount_matches("det_item_fee_sumamt", "cnt", "pric"),
        when("fee_ocur_time", limits),
    )
    settlement = RecordSpec(
        record=f"{NS}.Settlement",
        checks=(
            not_blank("setl_id"), not_blank("mdtrt_id"), not_blank("psn_no"), not_blank("psn_cert_no"),
            Code("fixmedins_code", "institution"),
            Region("insu_admdvs"), Region("mdtrt_admdvs"),
            OneOf("insutype", insutypes), OneOf("med_type", med_types),
            when("setl_time", limits),
            BirthDate("brdy", "setl_time"),
            non_negative(*MONEY),
            SumsTo("medfee_sumamt", ("fund_pay_sumamt", "acct_pay", "psn_cash_pay")),
            SumsTo("fund_pay_sumamt", FUND_PARTS),
            AtMost("inscp_amt", "medfee_sumamt"),
            Code("dscg_maindiag_code", "icd10", optional=True),
            EachString("oprn_codes", "icd9cm3"),
            DateOrder("adm_date", "dscg_date"),
            DateOrder("dscg_date", "setl_time", later_is_date=False, slack_ms=DAY_MS),
            Each("fee_details", line_checks, min_items=1),
            LinesSumTo("fee_details", "det_item_fee_sumamt", "medfee_sumamt"),
        ),
        tables=(
            TableMapping("settlements", overrides={
                "psn_token": token_of("psn_no"),
                "age": _age,
                "line_count": _line_count,
            }),
            TableMapping("fee_details", lines="fee_details", overrides={
                "setl_id": from_parent("setl_id"),
                "mdtrt_id": from_parent("mdtrt_id"),
                "psn_token": parent_token("psn_no"),
                "fixmedins_code": from_parent("fixmedins_code"),
                "insu_admdvs": from_parent("insu_admdvs"),
                "med_type": from_parent("med_type"),
                "setl_time": from_parent("setl_time", ms_to_s=True),
            }),
        ),
    )
    reversal = RecordSpec(
        record=f"{NS}.SettlementReversal",
        checks=(
            not_blank("setl_id"), not_blank("init_setl_id"), not_blank("psn_no"),
            Code("fixmedins_code", "institution"),
            Region("insu_admdvs"), Region("mdtrt_admdvs"),
            OneOf("insutype", insutypes), OneOf("med_type", med_types),
            when("setl_time", limits), when("init_setl_time", limits),
            DateOrder("init_setl_time", "setl_time", earlier_is_date=False, later_is_date=False),
            non_negative(*REVERSAL_MONEY),
            SumsTo("medfee_sumamt", ("fund_pay_sumamt", "acct_pay", "psn_cash_pay")),
            SumsTo("fund_pay_sumamt", FUND_PARTS),
            AtMost("inscp_amt", "medfee_sumamt"),
        ),
        tables=(
            TableMapping("settlements", overrides={
                "psn_token": token_of("psn_no"),
                "refd_setl_flag": constant(1),
                **{m: negated(m) for m in REVERSAL_MONEY},
            }),
        ),
    )
    filing = RecordSpec(
        record=f"{NS}.CrossProvinceFiling",
        checks=(
            not_blank("trt_dcla_detl_sn"), not_blank("psn_no"), not_blank("psn_cert_no"),
            Region("insu_admdvs"), Region("mdtrt_area_admdvs"),
            Code("fixmedins_code", "institution", optional=True),
            when("dcla_time", limits),
            DateOrder("begndate", "enddate"),
        ),
        tables=(TableMapping("cross_province_filings", overrides={"psn_token": token_of("psn_no")}),),
    )
    return Subsystem(
        name="settlement",
        key_doc="psn_no: a person's settlements, reversals and filings stay in order on one partition",
        records=(settlement, reversal, filing),
    )
