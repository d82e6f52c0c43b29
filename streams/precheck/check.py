"""The pre-settlement check (事前提示): what a prospective settlement would raise, without raising it.

A hospital's system sends the settlement it is about to make, as JSON (the Settlement contract's
fields, decimals as strings, times ISO-8601). :class:`Prechecker` turns it into the raw datum the
stream would decode from Avro (``Codec.from_json``), checks it with the stream's own compiled checks
(:meth:`~streams.processors.BatchProcessor.validate`) and asks the settlement engine for the alerts it
would raise now against the person's current state (:meth:`~streams.rules.engine.SettlementEngine.preview`).
Nothing here does I/O or changes state: the HTTP layer (streams/precheck/server.py) authenticates,
routes to the partition's owner and logs.

What an answer tells a hospital about the person's care elsewhere is limited to counts: evidence
naming other institutions (``fixmedins_codes``) or provinces is left out (a province count stays),
the ids of other settlements are never given, and a hit resting on settlements elsewhere answers
with this settlement's part of the amount at risk.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiokafka.partitioner import murmur2

from schemas import Codec, ConversionError

from ..processors import BatchProcessor
from ..rules.detectors import KINDS
from ..rules.engine import SettlementEngine
from ..rules.knowledge import Knowledge

SETTLEMENT_RECORD = "cn.nhsa.yibao.settlement.Settlement"
#: Evidence an answer never carries: the other institutions a person visited.
PRIVATE_EVIDENCE = frozenset({"fixmedins_codes", "provinces"})
#: Fields a prospective settlement may leave out: it has no event yet, and a hospital may check before
#: the platform gave the settlement its id.
DEFAULTED = ("event_id", "setl_id")

#: Readable prompts per detector kind, in Chinese and English, filled from a finding's evidence.
MESSAGES: dict[str, tuple[str, str]] = {
    "item_restriction": ("{name_zh}：{detail}", "{name_en}: {detail}"),
    "over_price": ("超过限价收费：{detail}", "Priced above the cap: {detail}"),
    "over_frequency": ("{item} 当日数量 {quantity}，每日限 {limit_per_day}",
                       "{item}: {quantity} on one day; limit {limit_per_day} per day"),
    "low_threshold": ("住院 {los_days} 天，检查费占 {test_share}，无手术",
                      "{los_days}-day stay, tests {test_share} of the fees, no operation"),
    "bed_hanging": ("连续 {idle_days} 天仅有床位、护理费用",
                    "{idle_days} consecutive days with only bed or nursing fees"),
    "duplicate_charge": ("{secondary} 与 {primary} 在同一{scope}内重复收费",
                         "{secondary} billed with {primary} within the same {scope}"),
    "repeat_interval": ("{item} 距上次收费 {days_between} 天；最短间隔 {min_interval_days} 天",
                        "{item} last billed {days_between} days ago; minimum interval {min_interval_days} days"),
    "excess_supply": ("{generic}：{window_days} 天内累计供药 {days_supplied} 天，上限 {limit_days} 天",
                      "{generic}: {days_supplied} days supplied within {window_days} days; limit {limit_days}"),
    "distinct_institutions": ("当日已在 {institutions} 家机构就诊（阈值 {min_institutions} 家）",
                              "{institutions} institutions on this day (threshold {min_institutions})"),
    "distinct_institutions_class": ("{window_days} 天内 {institutions} 家机构开具 {drug_class} 类药品"
                                    "（阈值 {min_institutions} 家）",
                                    "{institutions} institutions dispensed drug class {drug_class} within "
                                    "{window_days} days (threshold {min_institutions})"),
    "split_stay": ("出院 {days_after_discharge} 天后再次入院（{max_gap_days} 天内），诊断类别 {diagnosis_category}",
                   "Readmitted {days_after_discharge} days after discharge (within {max_gap_days}), "
                   "diagnosis category {diagnosis_category}"),
    "far_apart_same_day": ("同一天在 {province_count} 个省份结算", "Settled in {province_count} provinces on one day"),
}


@dataclass(frozen=True)
class Invalid:
    """Why a request is not a settlement the stream would accept (answered 400)."""

    reason_code: str
    field: str
    detail: str


@dataclass(frozen=True)
class Prepared:
    """A prospective settlement as the stream would see it (raw datum), before it is judged."""

    datum: dict[str, Any]
    check_id: str

    @property
    def key(self) -> bytes:
        """The Kafka key its real settlement will carry (the settlement topic is keyed by ``psn_no``)."""
        return str(self.datum["psn_no"]).encode("utf-8")

    def partition(self, partitions: int) -> int:
        """The settlement topic partition the person's events (and state) are on, as the producer's
        default partitioner (murmur2 of the key, Kafka's) puts them."""
        return int(murmur2(self.key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Hit:
    """One alert the settlement would raise, as a hospital's system shows it."""

    rule_id: str
    rule_version: int
    result_type: str
    severity: str
    name_zh: str
    name_en: str
    scope: str
    lines: tuple[str, ...]
    items: tuple[str, ...]
    message_zh: str
    message_en: str
    evidence: dict[str, str]
    amount_at_risk: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id, "rule_version": self.rule_version, "result_type": self.result_type,
            "severity": self.severity, "rule_name_zh": self.name_zh, "rule_name_en": self.name_en,
            "scope": self.scope, "lines": list(self.lines), "items": list(self.items),
            "message_zh": self.message_zh, "message_en": self.message_en, "evidence": self.evidence,
            "amount_at_risk": self.amount_at_risk,
        }


@dataclass(frozen=True)
class Answer:
    """The answer to one check: its hits and the rules it covered."""

    check_id: str
    checked_at_ms: int
    partition: int
    hits: tuple[Hit, ...]
    rules_checked: tuple[str, ...]
    datum: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        d = self.datum
        return {
            "check_id": self.check_id,
            "checked_at": _iso(self.checked_at_ms),
            "fixmedins_code": d["fixmedins_code"],
            "mdtrt_id": d["mdtrt_id"],
            "setl_id": d["setl_id"],
            "hits": [h.to_json() for h in self.hits],
            "rules_checked": list(self.rules_checked),
        }


def _iso(ms: int) -> str:
    import datetime as dt

    from schemas.calendar import CHINA

    return dt.datetime.fromtimestamp(ms / 1000, tz=CHINA).isoformat(timespec="milliseconds")


class Prechecker:
    """Judges prospective settlements against the settlement engine's current state (no I/O)."""

    def __init__(self, codec: Codec, processor: BatchProcessor, engine: SettlementEngine) -> None:
        self.codec = codec
        self.processor = processor
        self.engine = engine
        self.knowledge: Knowledge = engine.k

    def prepare(self, body: Any, check_id: str | None = None) -> Prepared | Invalid:
        """The raw datum of a request body, or why it is not a valid settlement (the field and the
        reason, from the codec's conversion or the stream's own checks)."""
        cid = check_id or str(uuid.uuid4())
        if not isinstance(body, dict):
            return Invalid("MALFORMED_EVENT", "", "the body must be a JSON object: one settlement")
        obj = {k: v for k, v in body.items() if k != "event_type"}
        obj.setdefault("event_id", cid)
        obj.setdefault("setl_id", f"PRECHECK-{cid}")
        try:
            datum = self.codec.from_json(SETTLEMENT_RECORD, obj)
        except ConversionError as exc:
            path = exc.path.removeprefix(SETTLEMENT_RECORD).lstrip(".")
            reason = "MISSING_FIELD" if str(exc).endswith("missing required field") else "MALFORMED_EVENT"
            return Invalid(reason, path, str(exc).removeprefix(exc.path + ": ")[:500])
        v = self.processor.validate(SETTLEMENT_RECORD, datum)
        if v is not None:
            return Invalid(v.reason_code, v.field or "", v.detail[:500])
        return Prepared(datum, cid)

    def rules_checked(self, datum: dict[str, Any]) -> tuple[str, ...]:
        """Ids of the enabled rules the engine judges a settlement of this scenario by."""
        sc = (datum["med_type"], datum["insu_admdvs"][:2] != datum["mdtrt_admdvs"][:2])
        return tuple(sorted(r.id for r in self.engine.book.current.enabled()
                            if r.kind in self.engine.alert_kinds and r.applies_to(*sc)))

    def judge(self, p: Prepared, partition: int) -> Answer:
        """What ``p`` would raise now on ``partition``'s state (the caller holds that partition)."""
        alerts = self.engine.preview(p.datum, partition)
        rules = {r.id: r for r in self.engine.book.current.rules}
        hits = tuple(self._hit(a, rules[a["rule_id"]], p.datum) for a in alerts if a["rule_id"] in rules)
        return Answer(p.check_id, int(time.time() * 1000), partition, hits, self.rules_checked(p.datum), p.datum)

    def _hit(self, alert: dict[str, Any], rule: Any, datum: dict[str, Any]) -> Hit:
        ev = {k: v for k, v in alert["evidence"].items() if k not in PRIVATE_EVIDENCE}
        if "provinces" in alert["evidence"]:  # where else the person settled: only how many places
            ev["province_count"] = str(len({p for p in alert["evidence"]["provinces"].split(",") if p}))
        lines, items = self._lines(rule.kind, ev, datum)
        own = {datum["setl_id"]}
        if set(alert["setl_ids"]) <= own:
            amount = int(alert["amount_at_risk"])
        else:  # the alert's amount counts the person's settlements elsewhere: answer with this one's part
            picked = [ln for ln in datum["fee_details"] if ln["feedetl_sn"] in lines]
            amount = sum(ln["det_item_fee_sumamt"] for ln in picked) if picked else datum["medfee_sumamt"]
        zh, en = MESSAGES.get(rule.kind, ("{name_zh}", "{name_en}"))
        fill = defaultdict(str, ev, name_zh=rule.name_zh, name_en=rule.name_en)
        names = {ln["hilist_code"]: ln["hilist_name"] for ln in datum["fee_details"] if ln.get("hilist_name")}
        for k in ("item", "primary", "secondary"):
            code = ev.get(k, "")
            if code in names:  # a prompt a clinician reads: the item's name, then its code
                fill[k] = f"{names[code]} ({code})"
        return Hit(
            rule_id=rule.id, rule_version=int(alert["rule_version"]), result_type=alert["result_type"],
            severity=alert["severity"], name_zh=rule.name_zh, name_en=rule.name_en, scope=rule.scope.value,
            lines=lines, items=items, message_zh=zh.format_map(fill), message_en=en.format_map(fill),
            evidence=ev, amount_at_risk=str(Decimal(amount).scaleb(-2)),
        )

    def _lines(self, kind: str, ev: dict[str, str], datum: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The fee lines of this settlement a hit concerns (their ``feedetl_sn``), and their items;
        none for a hit about the settlement or the person as a whole."""
        codes = {c for k in ("items", "item", "secondary") for c in ev.get(k, "").split(",") if c}
        if kind == "duplicate_charge" and not any(ln["hilist_code"] in codes for ln in datum["fee_details"]):
            codes = {ev.get("primary", "")}  # the settlement holds the primary of an earlier secondary
        info = self.knowledge.line_info()
        generic, drug_class = ev.get("generic"), ev.get("drug_class")
        picked = []
        for ln in datum["fee_details"]:
            code = ln["hilist_code"]
            drug = getattr(info.get(code), "drug", None)
            if code in codes or (drug is not None and (drug.generic == generic or drug.drug_class == drug_class)):
                picked.append(ln)
        if kind in KINDS and not picked:
            return (), ()
        return tuple(ln["feedetl_sn"] for ln in picked), tuple(sorted({ln["hilist_code"] for ln in picked}))
