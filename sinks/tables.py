"""The raw tables, as Python: what the worker's row builders may rely on.

Written by hand rather than parsed from the DDL so that importing it needs no engine. A test
migrates both engines and checks the tables there have exactly these columns, so this registry
and ``sinks/ddl`` cannot drift apart silently.

Mapping from an Avro record to its table: every top-level field becomes a column of the same
name; string -> ``String`` (``LowCardinality(String)`` for region, type and enum codes: an enum
is never ``Enum8``, so a new symbol never breaks ingestion); ``["null","string"]`` -> ``String``
('' when null); ``decimal(p,s)`` -> ``Decimal(p,s)``; timestamp-millis ->
``DateTime('Asia/Shanghai')`` (months and natural days are China time); date -> ``Date``;
nullable date -> ``Nullable(Date)``; int -> ``Int32``; long -> ``Int64``; boolean -> ``UInt8``;
array<string> -> ``Array(String)``. Privacy exceptions: the worker pseudonymizes before writing,
so ``psn_no`` becomes ``psn_token``, ``psn_cert_no``/``psn_name``/``tel`` are not stored, a tip's
three reporter fields become one ``rptr_token``, and a settlement's birth date becomes ``age``
(an 18.16 ``Date`` cannot hold birth dates before 1970 anyway).

``LowCardinality(String)`` is experimental on ClickHouse 18.16, where the DDL uses plain
``String`` instead (the ``{lc}`` placeholder); :meth:`TableSpec.columns_for` gives the types a
given engine version ends up with.

Cluster mode (``YIBAO_CH_CLUSTER``): every shard holds its part of each table, and rows are
routed by :attr:`TableSpec.shard_key`, a hash of stable columns of the row itself (never
``rand()``, so a re-sent row goes where its first copy went):

- by the insured region (``insu_admdvs``, ``admdvs`` for procurement and supervision): a region
  lives on one shard, so the per-region aggregates the decision subsystem asks for (fund
  balance and months of payout capacity per pooling region, procurement completion per region)
  run shard-locally and a region filter touches one shard; a settlement, its reversals (which
  carry the same ``insu_admdvs``) and its fee lines are co-located, so joins by ``setl_id`` stay
  local (``distributed_product_mode = 'local'``). The price is skew: a very large region makes
  its shard hotter. With hundreds of regions and a handful of shards the hash spreads well;
  when one region outgrows a shard, add ``psn_token`` to its key in a new migration.
- ``alerts`` by ``alert_id``: ReplacingMergeTree collapses versions of an alert only within a
  shard, so all versions of one alert must land on the same shard.
- ``dead_letters`` by ``payload_digest``: a dead letter may have no readable region at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.calendar import CHINA_TZ_NAME

LC = "LowCardinality(String)"
#: Tables several source topics share (each row names its source).
DEAD_LETTER_TABLE = "dead_letters"
ALERTS_TABLE = "alerts"
TZ = CHINA_TZ_NAME
DT = f"DateTime('{TZ}')"
MONEY = "Decimal(16, 2)"
QTY = "Decimal(16, 4)"
PRICE = "Decimal(16, 6)"
LC_MIN_VERSION = (19,)

Column = tuple[str, str]

_DECIMAL = re.compile(r"Decimal\(\s*(\d+)\s*,\s*(\d+)\s*\)|Decimal(32|64)\(\s*(\d+)\s*\)")


@dataclass(frozen=True)
class TableSpec:
    """One raw table: its columns in DDL order and how it is laid out.

    ``time_column`` is the event time; the table is partitioned by its China-time month
    unless ``partition_column`` says otherwise (alerts, see there). ``defaulted`` columns are
    filled by ClickHouse (``DEFAULT`` expressions) and never sent by the worker.
    """

    name: str
    time_column: str
    columns: tuple[Column, ...]
    order_by: tuple[str, ...]
    engine: str = "MergeTree()"
    partition_column: str = ""
    defaulted: tuple[str, ...] = ("ingested_at",)
    shard_by: tuple[str, ...] = ()

    @property
    def shard_key(self) -> str:
        """Sharding expression of the Distributed insert table in cluster mode (module docstring)."""
        return f"cityHash64({', '.join(self.shard_by)})"

    @property
    def partition_by(self) -> str:
        return f"toYYYYMM({self.partition_column or self.time_column})"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def insert_columns(self) -> tuple[str, ...]:
        """Columns of the staging table ``<name>_in``: what ``Backend.insert`` accepts."""
        return tuple(name for name, _ in self.columns if name not in self.defaulted)

    @property
    def raw_columns(self) -> tuple[Column, ...]:
        """Staging columns with the raw type each value must have (see :func:`raw_type`)."""
        return tuple((name, raw_type(t)) for name, t in self.columns if name not in self.defaulted)

    def type_of(self, column: str) -> str:
        for name, ch_type in self.columns:
            if name == column:
                return ch_type
        raise KeyError(f"{self.name} has no column {column!r}")

    def columns_for(self, version: tuple[int, ...]) -> tuple[Column, ...]:
        """Column types as an engine of ``version`` reports them after migration."""
        if low_cardinality_supported(version):
            return self.columns
        return tuple((name, t.replace(LC, "String")) for name, t in self.columns)


def low_cardinality_supported(version: tuple[int, ...]) -> bool:
    """``LowCardinality`` is usable from 19.x (and in chDB); on 18.16 it is experimental."""
    return version >= LC_MIN_VERSION


def decimal_scale(ch_type: str) -> int | None:
    """Scale of a (possibly Nullable) decimal type, or ``None`` if it is not a decimal."""
    match = _DECIMAL.search(ch_type)
    if match is None:
        return None
    return int(match.group(2) if match.group(2) is not None else match.group(4))


def decimal_precision(ch_type: str) -> int | None:
    match = _DECIMAL.search(ch_type)
    if match is None:
        return None
    if match.group(1) is not None:
        return int(match.group(1))
    return 9 if match.group(3) == "32" else 18


def unwrap_nullable(ch_type: str) -> tuple[str, bool]:
    if ch_type.startswith("Nullable(") and ch_type.endswith(")"):
        return ch_type[len("Nullable(") : -1], True
    return ch_type, False


def raw_type(ch_type: str) -> str:
    """Type of the staging column that carries a value of ``ch_type`` in raw form.

    ``Decimal(P,S)`` -> ``Int64`` (the unscaled integer), ``Date`` -> ``UInt16`` (days since
    1970-01-01), ``DateTime[(tz)]`` -> ``UInt32`` (epoch seconds), Nullable kept; every other
    type is already cheap to encode and stays as it is. Raises ``ValueError`` for types that
    have no exact raw form here (``DateTime64``, decimals wider than 18 digits, arrays of
    decimals or dates): those would need a different staging conversion.
    """
    inner, nullable = unwrap_nullable(ch_type)
    if inner.startswith(("Decimal", "DateTime64")) or inner in ("Date", "DateTime") or inner.startswith("DateTime("):
        if inner.startswith("DateTime64"):
            raise ValueError(f"{ch_type}: DateTime64 has no raw staging form (and 18.16 lacks it)")
        if inner.startswith("Decimal"):
            precision = decimal_precision(inner)
            if precision is None or precision > 18:
                raise ValueError(f"{ch_type}: only decimals of up to 18 digits fit an Int64 raw value")
            raw = "Int64"
        elif inner == "Date":
            raw = "UInt16"
        else:
            raw = "UInt32"
        return f"Nullable({raw})" if nullable else raw
    if re.search(r"Array\(.*(Decimal|Date)", inner):
        raise ValueError(f"{ch_type}: arrays of decimals or dates have no raw staging form")
    return ch_type


_SRC: tuple[Column, ...] = (
    ("src_partition", "UInt16"),
    ("src_offset", "UInt64"),
    ("ingested_at", DT),
)


def _table(
    name: str,
    time_column: str,
    columns: tuple[Column, ...],
    order_by: tuple[str, ...],
    engine: str = "MergeTree()",
    partition_column: str = "",
    shard_by: tuple[str, ...] = (),
) -> TableSpec:
    names = {name for name, _ in columns}
    if not shard_by:
        shard_by = ("insu_admdvs",) if "insu_admdvs" in names else ("admdvs",)
    return TableSpec(
        name=name,
        time_column=time_column,
        columns=columns + _SRC,
        order_by=order_by,
        engine=engine,
        partition_column=partition_column,
        shard_by=shard_by,
    )


_SETTLEMENT_AMOUNTS: tuple[Column, ...] = tuple(
    (name, MONEY)
    for name in (
        "medfee_sumamt",
        "inscp_amt",
        "fulamt_ownpay_amt",
        "overlmt_selfpay",
        "preselfpay_amt",
        "hifp_pay",
        "hifmi_pay",
        "hifob_pay",
        "maf_pay",
        "fund_pay_sumamt",
        "acct_pay",
        "psn_cash_pay",
    )
)

SETTLEMENTS = _table(
    "settlements",
    "setl_time",
    (
        ("event_id", "String"),
        ("setl_id", "String"),
        ("mdtrt_id", "String"),
        ("psn_token", "String"),
        ("gend", LC),
        ("age", "UInt8"),
        ("insutype", LC),
        ("med_type", LC),
        ("fixmedins_code", "String"),
        ("hosp_lv", LC),
        ("insu_admdvs", LC),
        ("mdtrt_admdvs", LC),
        ("setl_time", DT),
        *_SETTLEMENT_AMOUNTS,
        ("clr_type", LC),
        ("dscg_maindiag_code", "String"),
        ("adm_date", "Nullable(Date)"),
        ("dscg_date", "Nullable(Date)"),
        ("drg_code", LC),
        ("oprn_codes", "Array(String)"),
        ("refd_setl_flag", "UInt8"),
        ("init_setl_id", "String"),
        ("full_reversal", "UInt8"),
        ("rea", "String"),
        ("line_count", "UInt16"),
    ),
    ("insu_admdvs", "fixmedins_code", "setl_time"),
)

FEE_DETAILS = _table(
    "fee_details",
    "setl_time",
    (
        ("setl_id", "String"),
        ("mdtrt_id", "String"),
        ("psn_token", "String"),
        ("fixmedins_code", "String"),
        ("insu_admdvs", LC),
        ("med_type", LC),
        ("setl_time", DT),
        ("feedetl_sn", "String"),
        ("hilist_code", "String"),
        ("hilist_name", "String"),
        ("med_list_codg", "String"),
        ("cnt", QTY),
        ("pric", PRICE),
        ("det_item_fee_sumamt", MONEY),
        ("fee_ocur_time", DT),
        ("bilg_dr_code", "String"),
        ("medc_days", "Nullable(Int32)"),
    ),
    ("insu_admdvs", "fixmedins_code", "setl_time"),
)

CROSS_PROVINCE_FILINGS = _table(
    "cross_province_filings",
    "dcla_time",
    (
        ("event_id", "String"),
        ("trt_dcla_detl_sn", "String"),
        ("psn_token", "String"),
        ("insu_admdvs", LC),
        ("mdtrt_area_admdvs", LC),
        ("dcla_type", LC),
        ("fixmedins_code", "String"),
        ("begndate", "Date"),
        ("enddate", "Nullable(Date)"),
        ("dcla_time", DT),
    ),
    ("insu_admdvs", "mdtrt_area_admdvs", "dcla_time"),
)

PROC_CONTRACTS = _table(
    "proc_contracts",
    "sign_time",
    (
        ("event_id", "String"),
        ("cntr_id", "String"),
        ("fixmedins_code", "String"),
        ("med_list_codg", "String"),
        ("splr_code", "String"),
        ("admdvs", LC),
        ("agreed_volume", QTY),
        ("win_pric", PRICE),
        ("base_pric", PRICE),
        ("cycle_begn_date", "Date"),
        ("cycle_end_date", "Date"),
        ("sign_time", DT),
    ),
    ("admdvs", "fixmedins_code", "sign_time"),
)

PROC_ORDERS = _table(
    "proc_orders",
    "ord_time",
    (
        ("event_id", "String"),
        ("ord_id", "String"),
        ("fixmedins_code", "String"),
        ("splr_code", "String"),
        ("med_list_codg", "String"),
        ("cntr_id", "String"),
        ("admdvs", LC),
        ("purc_cnt", QTY),
        ("purc_pric", PRICE),
        ("purc_amt", MONEY),
        ("ord_time", DT),
    ),
    ("admdvs", "fixmedins_code", "ord_time"),
)

PROC_DELIVERIES = _table(
    "proc_deliveries",
    "acpt_time",
    (
        ("event_id", "String"),
        ("dlv_id", "String"),
        ("ord_id", "String"),
        ("fixmedins_code", "String"),
        ("splr_code", "String"),
        ("med_list_codg", "String"),
        ("admdvs", LC),
        ("dlv_cnt", QTY),
        ("dlv_amt", MONEY),
        ("acpt_time", DT),
    ),
    ("admdvs", "fixmedins_code", "acpt_time"),
)

INVENTORY_MOVEMENTS = _table(
    "inventory_movements",
    "mov_time",
    (
        ("event_id", "String"),
        ("mov_id", "String"),
        ("fixmedins_code", "String"),
        ("med_list_codg", "String"),
        ("admdvs", LC),
        ("mov_type", LC),
        ("cnt", QTY),
        ("pric", PRICE),
        ("drug_trac_codg", "Array(String)"),
        ("setl_id", "String"),
        ("mov_time", DT),
    ),
    ("admdvs", "fixmedins_code", "med_list_codg", "mov_time"),
)

SUPPLIER_PAYMENTS = _table(
    "supplier_payments",
    "pay_time",
    (
        ("event_id", "String"),
        ("pay_id", "String"),
        ("dlv_id", "String"),
        ("fixmedins_code", "String"),
        ("splr_code", "String"),
        ("admdvs", LC),
        ("pay_amt", MONEY),
        ("pay_time", DT),
    ),
    ("admdvs", "fixmedins_code", "pay_time"),
)

INSPECTIONS = _table(
    "inspections",
    "insp_time",
    (
        ("event_id", "String"),
        ("insp_id", "String"),
        ("insp_type", LC),
        ("fixmedins_code", "String"),
        ("admdvs", LC),
        ("begndate", "Date"),
        ("enddate", "Nullable(Date)"),
        ("viol_flag", "UInt8"),
        ("viol_amt", MONEY),
        ("insp_time", DT),
    ),
    ("admdvs", "fixmedins_code", "insp_time"),
)

TIPS = _table(
    "tips",
    "recv_time",
    (
        ("event_id", "String"),
        ("tip_id", "String"),
        ("admdvs", LC),
        ("fixmedins_code", "String"),
        ("tip_cat", LC),
        ("rptr_token", "String"),
        ("inv_amt", f"Nullable({MONEY})"),
        ("reward_amt", f"Nullable({MONEY})"),
        ("recv_time", DT),
    ),
    ("admdvs", "fixmedins_code", "recv_time"),
)

PENALTIES = _table(
    "penalties",
    "pnsh_time",
    (
        ("event_id", "String"),
        ("pnsh_id", "String"),
        ("fixmedins_code", "String"),
        ("admdvs", LC),
        ("pnsh_type", LC),
        ("fine_amt", MONEY),
        ("insp_id", "String"),
        ("pnsh_time", DT),
    ),
    ("admdvs", "fixmedins_code", "pnsh_time"),
)

FUND_RECOVERIES = _table(
    "fund_recoveries",
    "rcvr_time",
    (
        ("event_id", "String"),
        ("rcvr_id", "String"),
        ("fixmedins_code", "String"),
        ("admdvs", LC),
        ("rcvr_amt", MONEY),
        ("insp_id", "String"),
        ("pnsh_id", "String"),
        ("rcvr_time", DT),
    ),
    ("admdvs", "fixmedins_code", "rcvr_time"),
)

FUND_INCOME = _table(
    "fund_income",
    "book_time",
    (
        ("event_id", "String"),
        ("income_id", "String"),
        ("insu_admdvs", LC),
        ("insutype", LC),
        ("income_type", LC),
        ("income_amt", MONEY),
        ("book_time", DT),
    ),
    ("insu_admdvs", "insutype", "book_time"),
)

DEAD_LETTERS = _table(
    "dead_letters",
    "failed_at",
    (
        ("event_id", "String"),
        ("reason_code", LC),
        ("reason_detail", "String"),
        ("field", "String"),
        ("source_topic", LC),
        ("source_partition", "Int32"),
        ("source_offset", "Int64"),
        ("source_key", "String"),
        ("schema_id", "Nullable(UInt32)"),
        ("event_type", LC),
        ("payload", "String"),
        ("payload_digest", "String"),
        ("failed_at", DT),
    ),
    ("source_topic", "source_partition", "source_offset"),
    shard_by=("payload_digest",),
)

# Partitioned by window_start, not detected_at: alert_id is derived from rule, subject and
# window, so every version of an alert (FIRED, a re-delivery, a later RETRACTED) lands in the
# same partition, where ReplacingMergeTree(detected_at) keeps the latest one.
ALERTS = _table(
    "alerts",
    "detected_at",
    (
        ("event_id", "String"),
        ("alert_id", "String"),
        ("status", LC),
        ("rule_id", LC),
        ("rule_version", "Int32"),
        ("result_type", LC),
        ("severity", LC),
        ("subsystem", LC),
        ("fixmedins_code", "String"),
        ("psn_token", "String"),
        ("admdvs", LC),
        ("setl_ids", "Array(String)"),
        ("mdtrt_ids", "Array(String)"),
        ("window_start", DT),
        ("window_end", DT),
        ("amount_at_risk", MONEY),
        ("evidence_keys", "Array(String)"),
        ("evidence_values", "Array(String)"),
        ("detected_at", DT),
    ),
    ("alert_id",),
    engine="ReplacingMergeTree(detected_at)",
    partition_column="window_start",
    shard_by=("alert_id",),
)

# Not an Avro event: one row per answered pre-settlement check (streams/precheck), written by the
# worker's HTTP side through precheck_log_in. src_partition is the settlement partition the person
# maps to and src_offset 0, so no processor may look this table up for what landed (it never does:
# a processor's tables come from its subsystem's records). The hit_* arrays are parallel, one element
# per rule hit; hit_items[i] is the comma-joined hilist_codes of the lines hit i concerns ('' when
# it concerns the settlement as a whole). bi_precheck_outcomes (0009) links them to the real settlement.
PRECHECK_LOG = _table(
    "precheck_log",
    "checked_at",
    (
        ("check_id", "String"),
        ("checked_at", DT),
        ("caller", LC),
        ("fixmedins_code", "String"),
        ("insu_admdvs", LC),
        ("med_type", LC),
        ("psn_token", "String"),
        ("mdtrt_id", "String"),
        ("setl_id", "String"),
        ("medfee_sumamt", MONEY),
        ("items", "Array(String)"),
        ("hit_rule_ids", "Array(String)"),
        ("hit_rule_versions", "Array(Int32)"),
        ("hit_severities", "Array(String)"),
        ("hit_items", "Array(String)"),
    ),
    ("fixmedins_code", "mdtrt_id", "checked_at"),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        SETTLEMENTS,
        FEE_DETAILS,
        CROSS_PROVINCE_FILINGS,
        PROC_CONTRACTS,
        PROC_ORDERS,
        PROC_DELIVERIES,
        INVENTORY_MOVEMENTS,
        SUPPLIER_PAYMENTS,
        INSPECTIONS,
        TIPS,
        PENALTIES,
        FUND_RECOVERIES,
        FUND_INCOME,
        DEAD_LETTERS,
        ALERTS,
        PRECHECK_LOG,
    )
}
