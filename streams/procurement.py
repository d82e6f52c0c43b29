"""Procurement subsystem (药品和医用耗材招采管理): contracts, orders, deliveries, inventory, payments.

Topic key: ``fixmedins_code``. Inventory reconciliation (institution × drug), agreed-volume
completion (hospital × product × contract) and payment timeliness (hospital) are all per
institution, so one partition holds everything each of them needs.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import RecordSpec, Subsystem, TableMapping
from .checks_common import amount_matches, non_negative, not_blank, quantity, when
from .config import ValidationConfig
from .validation import Code, DateOrder, EachString, Limits, Region

NS = "cn.nhsa.yibao.procurement"


def build(validation: ValidationConfig, limits: Callable[[], Limits]) -> Subsystem:
    def inst() -> tuple[Code, Region]:
        return Code("fixmedins_code", "institution"), Region("admdvs")

    contract = RecordSpec(
        record=f"{NS}.ProcurementContract",
        checks=(
            not_blank("cntr_id"), *inst(), Code("med_list_codg", "product"), Code("splr_code", "credit_code"),
            quantity("agreed_volume", "win_pric", "base_pric"),
            DateOrder("cycle_begn_date", "cycle_end_date"), when("sign_time", limits),
        ),
        tables=(TableMapping("proc_contracts"),),
    )
    order = RecordSpec(
        record=f"{NS}.ProcurementOrder",
        checks=(
            not_blank("ord_id"), *inst(), Code("med_list_codg", "product"), Code("splr_code", "credit_code"),
            quantity("purc_cnt"), non_negative("purc_pric", "purc_amt"),
            amount_matches("purc_amt", "purc_cnt", "purc_pric"), when("ord_time", limits),
        ),
        tables=(TableMapping("proc_orders"),),
    )
    delivery = RecordSpec(
        record=f"{NS}.DeliveryAcceptance",
        checks=(
            not_blank("dlv_id"), not_blank("ord_id"), *inst(), Code("med_list_codg", "product"),
            Code("splr_code", "credit_code"), quantity("dlv_cnt"), non_negative("dlv_amt"), when("acpt_time", limits),
        ),
        tables=(TableMapping("proc_deliveries"),),
    )
    movement = RecordSpec(
        record=f"{NS}.InventoryMovement",
        checks=(
            not_blank("mov_id"), *inst(), Code("med_list_codg", "product"),
            EachString("drug_trac_codg", "trace_code"),
            non_negative("cnt", "pric"), when("mov_time", limits),
        ),
        tables=(TableMapping("inventory_movements"),),
    )
    payment = RecordSpec(
        record=f"{NS}.SupplierPayment",
        checks=(
            not_blank("pay_id"), not_blank("dlv_id"), *inst(), Code("splr_code", "credit_code"),
            quantity("pay_amt"), when("pay_time", limits),
        ),
        tables=(TableMapping("supplier_payments"),),
    )
    return Subsystem(
        name="procurement",
        key_doc="fixmedins_code: every procurement rule is per institution",
        records=(contract, order, delivery, movement, payment),
    )
