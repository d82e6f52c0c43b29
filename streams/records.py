"""The facts of each input record, declared once: its topic, the field that is its Kafka key, the
field that is its event time, and the table holding one row per event of it (its primary table,
which is how ``events in = landed + dead-lettered`` is counted).

The subsystem modules (``streams.settlement``, ...) say how each record is checked and landed; the
record specs there read these facts from here, and so do replay, the generator, the demo and the
tests.
"""

from __future__ import annotations

from dataclasses import dataclass

NS = "cn.nhsa.yibao"


@dataclass(frozen=True)
class RecordFacts:
    record: str
    subsystem: str
    #: the Kafka key (streams/topics.py says why each topic is keyed so); supervision events
    #: without an institution fall back to their region
    key_field: str
    event_time: str
    primary_table: str

    @property
    def short_name(self) -> str:
        return self.record.rsplit(".", 1)[-1]


RECORDS: dict[str, RecordFacts] = {f.record: f for f in (
    RecordFacts(f"{NS}.settlement.Settlement", "settlement", "psn_no", "setl_time", "settlements"),
    RecordFacts(f"{NS}.settlement.SettlementReversal", "settlement", "psn_no", "setl_time", "settlements"),
    RecordFacts(f"{NS}.settlement.CrossProvinceFiling", "settlement", "psn_no", "dcla_time", "cross_province_filings"),
    RecordFacts(f"{NS}.procurement.ProcurementContract", "procurement", "fixmedins_code", "sign_time",
                "proc_contracts"),
    RecordFacts(f"{NS}.procurement.ProcurementOrder", "procurement", "fixmedins_code", "ord_time", "proc_orders"),
    RecordFacts(f"{NS}.procurement.DeliveryAcceptance", "procurement", "fixmedins_code", "acpt_time",
                "proc_deliveries"),
    RecordFacts(f"{NS}.procurement.InventoryMovement", "procurement", "fixmedins_code", "mov_time",
                "inventory_movements"),
    RecordFacts(f"{NS}.procurement.SupplierPayment", "procurement", "fixmedins_code", "pay_time", "supplier_payments"),
    RecordFacts(f"{NS}.supervision.Inspection", "supervision", "fixmedins_code", "insp_time", "inspections"),
    RecordFacts(f"{NS}.supervision.Tip", "supervision", "fixmedins_code", "recv_time", "tips"),
    RecordFacts(f"{NS}.supervision.Penalty", "supervision", "fixmedins_code", "pnsh_time", "penalties"),
    RecordFacts(f"{NS}.supervision.FundRecovery", "supervision", "fixmedins_code", "rcvr_time", "fund_recoveries"),
    RecordFacts(f"{NS}.supervision.FundIncome", "supervision", "insu_admdvs", "book_time", "fund_income"),
)}
#: Short record name -> its primary table.
PRIMARY_TABLE: dict[str, str] = {f.short_name: f.primary_table for f in RECORDS.values()}


def key_of(record: str, datum: dict[str, object]) -> str:
    """The Kafka key of an event: its key field, or its region where it has no institution."""
    key = datum.get(RECORDS[record].key_field) or datum.get("admdvs") or datum.get("insu_admdvs") or ""
    return str(key)
