"""The processing topology, built in one place for the worker, the in-process evaluation and the
benchmark: which processor consumes which topic, the state stores its engine keeps, and where the
records it emits go (the re-keyed stays feed the hospital and DRG processors).

```
 every subsystem stage first asks its Identities (store identity.<subsystem>) whether an event is a re-send
 settlement ──► BatchProcessor + SettlementEngine (store person) ──emits──► internal.stays-by-hospital
                                                                 └──emits──► internal.stays-by-drg
 procurement ─► BatchProcessor + ProcurementEngine (store procurement)
 supervision ─► BatchProcessor
 internal.stays-by-hospital ─► GroupedProcessor + GroupedEngine (store hospital)
 internal.stays-by-drg ──────► GroupedProcessor + GroupedEngine (store drg)
```
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas import Codec
from schemas.columnar_decode import ArrowDecoder

from . import procurement, settlement, supervision
from .base import Subsystem
from .config import RulesConfig, ValidationConfig
from .identity import Identities
from .privacy import Pseudonymizer, Sealer
from .processors import BatchProcessor, GroupedProcessor
from .rules import RULES_FILE, RuleBook, check_rule, load_knowledge, load_rules_file
from .rules.diskstore import DiskStore
from .rules.engine import SettlementEngine
from .rules.grouped import GroupedEngine
from .rules.procurement import ProcurementEngine
from .rules.state import Store
from .topics import STREAMS
from .validation import Limits

MODULES = {"settlement": settlement, "procurement": procurement, "supervision": supervision}
#: The re-keyed streams the settlement engine emits, and the grouped processor consuming each.
STAY_STREAMS = {"internal.stays-by-hospital": "hospital", "internal.stays-by-drg": "drg"}


class LimitsClock:
    """Validation limits that follow the wall clock, recomputed at most once a second."""

    def __init__(self, validation: ValidationConfig) -> None:
        self._validation = validation
        self._at = 0.0
        self._limits = self._compute()

    def _compute(self) -> Limits:
        return Limits.from_settings(self._validation.max_future_skew_s, self._validation.min_event_year)

    def __call__(self) -> Limits:
        now = time.monotonic()
        if now - self._at > 1.0:
            self._limits = self._compute()
            self._at = now
        return self._limits


def build_subsystems(validation: ValidationConfig, limits: Callable[[], Limits] | None = None
                     ) -> dict[str, Subsystem]:
    clock = limits or LimitsClock(validation)
    return {name: MODULES[name].build(validation, clock) for name in STREAMS}


def build_rulebook(rules_file: Path | None = None) -> RuleBook:
    """The seed rule base (file), to which the rules topic then applies updates."""
    return RuleBook(load_rules_file(rules_file or RULES_FILE, check_rule), check_rule)


@dataclass(frozen=True)
class Stage:
    """One processor and the topic it consumes; ``name`` names its consumer group too."""

    name: str
    topic: str
    processor: BatchProcessor | GroupedProcessor


@dataclass(frozen=True)
class Pipeline:
    stages: Mapping[str, Stage]
    #: emitted stream (logical name) -> the stage that consumes it
    routes: Mapping[str, str]
    rulebook: RuleBook | None

    def consumer_of(self, stream: str) -> Stage | None:
        name = self.routes.get(stream)
        return self.stages[name] if name is not None else None


def build_pipeline(*, validation: ValidationConfig, rules: RulesConfig, topic: Callable[[str], str], codec: Codec,
                   pseudonymizer: Pseudonymizer, sealer: Sealer, limits: Callable[[], Limits] | None = None,
                   streams: tuple[str, ...] = STREAMS, rulebook: RuleBook | None = None,
                   decoder: ArrowDecoder | None = None) -> Pipeline:
    """The stages for ``streams`` (and, with rules on and the settlement stream among them, the
    hospital and DRG stages fed by its emits). ``topic`` names every topic the pipeline reads or
    writes from its logical name (``settlement``, ``changelog.person``, ...). With a ``decoder`` the
    subsystem stages take the columnar path where it applies (its owner closes it)."""
    subsystems = build_subsystems(validation, limits)
    book = (rulebook or build_rulebook(rules.rules_file)) if rules.enabled else None
    engines: dict[str, SettlementEngine | ProcurementEngine] = {}
    if book is not None:
        person = (DiskStore("person", topic("changelog.person"), path=rules.state_dir / "person")
                  if rules.state_dir is not None else Store("person", topic("changelog.person")))
        engines["settlement"] = SettlementEngine(book, load_knowledge(), pseudonymizer, person,
                                                 rules.allowed_lateness_days)
        engines["procurement"] = ProcurementEngine(book, Store("procurement", topic("changelog.procurement")),
                                                   rules.allowed_lateness_days)
    clock = limits or LimitsClock(validation)
    stages: dict[str, Stage] = {}
    for name in streams:
        identities = Identities(Store(f"identity.{name}", topic(f"changelog.identity.{name}")),
                                validation.dedup_horizon_days)
        stages[name] = Stage(name, topic(name), BatchProcessor(subsystems[name], codec, pseudonymizer, sealer,
                                                               topic(name), clock, engine=engines.get(name),
                                                               identities=identities, decoder=decoder))
    routes: dict[str, str] = {}
    if book is not None and "settlement" in streams:
        for stream, by in STAY_STREAMS.items():
            grouped = GroupedEngine(book, Store(by, topic(f"changelog.{by}")), by, rules.allowed_lateness_days)
            stages[f"rules-{by}"] = Stage(f"rules-{by}", topic(stream),
                                          GroupedProcessor(grouped, topic(stream), codec, pseudonymizer, sealer))
            routes[stream] = f"rules-{by}"
    return Pipeline(stages, routes, book)
