"""The rule base's declarative unit: a rule is metadata plus parameters, validated on creation.

A rule names the *kind* of detector that evaluates it (a small, reusable shape: an item
restriction, a sliding sum, a session gap...) and gives it parameters and knowledge tables.
Changing a threshold, a window or an enable flag is data (a new rule version pushed to the rules
topic), not code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ResultType(StrEnum):
    DEFINITE = "DEFINITE"  # 明确违规
    SUSPICIOUS = "SUSPICIOUS"  # 可疑


class Severity(StrEnum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


class Scope(StrEnum):
    LINE = "line"  # one fee line
    VISIT = "visit"  # this visit / settlement
    STAY = "stay"  # this inpatient stay
    DAY = "day"  # natural day
    WINDOW = "window"  # a sliding or hopping window over a person's history
    MONTH = "month"  # natural month
    YEAR = "year"  # insurance year


class Stage(StrEnum):
    PRE = "pre"  # 事前提示
    IN_PROCESS = "in-process"  # 事中监控
    AFTER = "after"  # 事后审核


#: "procurement" and "supervision": rules of those streams (no med_type maps to them, so the
#: settlement engine never evaluates them)
SCENARIOS = frozenset({"outpatient", "inpatient", "pharmacy", "cross-province", "procurement", "supervision"})

#: med_type → scenario (a cross-province settlement is additionally "cross-province").
MED_TYPE_SCENARIO = {"11": "outpatient", "12": "outpatient", "13": "outpatient", "14": "outpatient",
                     "15": "outpatient", "16": "outpatient", "21": "inpatient", "22": "inpatient",
                     "41": "pharmacy", "51": "outpatient", "52": "inpatient"}


class RuleError(ValueError):
    """A rule that cannot be used; the message names the rule and the field (also in ``field``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Rule:
    id: str
    name_zh: str
    name_en: str
    version: int
    kind: str
    result_type: ResultType
    severity: Severity
    scope: Scope
    stage: Stage
    scenarios: frozenset[str]
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    enabled: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("-", "").replace("_", "").isalnum():
            raise RuleError(f"rule id {self.id!r}: letters, digits, '-' and '_' only")
        if self.version < 1:
            raise RuleError(f"{self.id}: version must be ≥ 1", "version")
        unknown = self.scenarios - SCENARIOS
        if unknown or not self.scenarios:
            raise RuleError(f"{self.id}: scenarios must be a non-empty subset of {sorted(SCENARIOS)}", "scenarios")

    def applies_to(self, med_type: str, cross_province: bool) -> bool:
        return MED_TYPE_SCENARIO.get(med_type) in self.scenarios or (
            cross_province and "cross-province" in self.scenarios)

    def param(self, name: str) -> Any:
        try:
            return self.params[name]
        except KeyError:
            raise RuleError(f"{self.id}: missing parameter {name!r}", name) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name_zh": self.name_zh, "name_en": self.name_en, "version": self.version,
            "kind": self.kind, "result_type": self.result_type.value, "severity": self.severity.value,
            "scope": self.scope.value, "stage": self.stage.value, "scenarios": sorted(self.scenarios),
            "params": self.params, "enabled": self.enabled, "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Rule:
        """Build from the rules file / rules topic representation; RuleError names the field."""
        if not isinstance(d, dict):
            raise RuleError(f"a rule must be an object (table), not {type(d).__name__}")
        rid = str(d.get("id", "?"))

        def field_(name: str, conv: Any, default: Any = ...) -> Any:
            if name not in d:
                if default is ...:
                    raise RuleError(f"{rid}: missing field {name!r}", name)
                return default
            try:
                return conv(d[name])
            except (TypeError, ValueError) as exc:
                raise RuleError(f"{rid}: {name}: {d[name]!r} is not valid ({exc})", name) from None

        def text(v: Any) -> str:
            if not isinstance(v, str):
                raise TypeError("expected a string")
            return v

        def integer(v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError("expected an integer")
            return v

        def strings(v: Any) -> frozenset[str]:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise TypeError("expected a list of strings")
            return frozenset(v)

        def table(v: Any) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise TypeError("expected a table of parameters")
            return dict(v)

        def flag(v: Any) -> bool:
            if not isinstance(v, bool):
                raise TypeError("expected true or false")
            return v

        return cls(
            id=field_("id", text), name_zh=field_("name_zh", text), name_en=field_("name_en", text),
            version=field_("version", integer), kind=field_("kind", text),
            result_type=field_("result_type", ResultType), severity=field_("severity", Severity),
            scope=field_("scope", Scope), stage=field_("stage", Stage),
            scenarios=field_("scenarios", strings), params=field_("params", table, {}),
            enabled=field_("enabled", flag, True), description=field_("description", text, ""),
        )
