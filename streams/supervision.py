"""Supervision subsystem (智能监管 + 基金监管): inspections, tips, penalties, recoveries, fund income.

Topic key: ``fixmedins_code`` of the institution concerned (credit scores and outcomes are per
institution); region-level events without an institution (fund income, tips naming none) are keyed
by their region code. A tip reporter's identity is protected: only ``rptr_token`` leaves the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .base import RecordSpec, RowContext, Subsystem, TableMapping
from .checks_common import non_negative, not_blank, quantity, when
from .config import ValidationConfig
from .validation import Code, DateOrder, Limits, OneOf, Region

NS = "cn.nhsa.yibao.supervision"


def _reporter_token(ds: Sequence[dict[str, Any]], ctx: RowContext) -> list[Any]:
    """One token for the reporter, from the strongest identifier present (ID, phone, name)."""
    tok = ctx.pseudonymizer.token
    return [tok(d.get("rptr_cert_no") or d.get("rptr_tel") or d.get("rptr_name"), "rptr") for d in ds]


def build(validation: ValidationConfig, limits: Callable[[], Limits]) -> Subsystem:
    insutypes = validation.known_insutypes

    def inst() -> tuple[Code, Region]:
        return Code("fixmedins_code", "institution"), Region("admdvs")

    inspection = RecordSpec(
        record=f"{NS}.Inspection",
        checks=(not_blank("insp_id"), *inst(), non_negative("viol_amt"), DateOrder("begndate", "enddate"),
                when("insp_time", limits)),
        tables=(TableMapping("inspections"),),
    )
    tip = RecordSpec(
        record=f"{NS}.Tip",
        checks=(not_blank("tip_id"), Region("admdvs"), Code("fixmedins_code", "institution", optional=True),
                not_blank("tip_cat"), not_blank("rptr_name"), non_negative("inv_amt", "reward_amt"),
                when("recv_time", limits)),
        tables=(TableMapping("tips", overrides={"rptr_token": _reporter_token}),),
    )
    penalty = RecordSpec(
        record=f"{NS}.Penalty",
        checks=(not_blank("pnsh_id"), *inst(), non_negative("fine_amt"), when("pnsh_time", limits)),
        tables=(TableMapping("penalties"),),
    )
    recovery = RecordSpec(
        record=f"{NS}.FundRecovery",
        checks=(not_blank("rcvr_id"), *inst(), quantity("rcvr_amt"), when("rcvr_time", limits)),
        tables=(TableMapping("fund_recoveries"),),
    )
    income = RecordSpec(
        record=f"{NS}.FundIncome",
        checks=(not_blank("income_id"), Region("insu_admdvs"), OneOf("insutype", insutypes),
                non_negative("income_amt"), when("book_time", limits)),
        tables=(TableMapping("fund_income"),),
    )
    return Subsystem(
        name="supervision",
        key_doc="fixmedins_code of the institution concerned; the region code for region-level events",
        records=(inspection, tip, penalty, recovery, income),
    )

