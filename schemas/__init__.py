"""Avro contracts of the platform's events, the Confluent-framed codec and the manifest registry."""

from .codec import Codec, ConversionError, Decoded, DecodeError
from .registry import IncompatibleSchemaError, Registry, RegistryError, SchemaDriftError

NS = "cn.nhsa.yibao"

#: Records carried by each subject (= logical topic), in union order. Appending is compatible;
#: reordering or removing is not.
SUBJECT_RECORDS: dict[str, list[str]] = {
    "settlement": [f"{NS}.settlement.Settlement", f"{NS}.settlement.SettlementReversal",
                   f"{NS}.settlement.CrossProvinceFiling"],
    "procurement": [f"{NS}.procurement.ProcurementContract", f"{NS}.procurement.ProcurementOrder",
                    f"{NS}.procurement.DeliveryAcceptance", f"{NS}.procurement.InventoryMovement",
                    f"{NS}.procurement.SupplierPayment"],
    "supervision": [f"{NS}.supervision.Inspection", f"{NS}.supervision.Tip", f"{NS}.supervision.Penalty",
                    f"{NS}.supervision.FundRecovery", f"{NS}.supervision.FundIncome"],
    "alerts": [f"{NS}.pipeline.AnomalyAlert"],
    "deadletter": [f"{NS}.pipeline.DeadLetter"],
}

__all__ = [
    "SUBJECT_RECORDS",
    "Codec",
    "ConversionError",
    "DecodeError",
    "Decoded",
    "IncompatibleSchemaError",
    "Registry",
    "RegistryError",
    "SchemaDriftError",
]
