"""What every detector engine takes and gives: one input type, one output type, one protocol.

Three engines run the rule base: the settlement engine (per person, on the settlement stream),
the procurement engine (per institution) and the grouped engine (per hospital or DRG group, on
the stays the settlement engine re-keys). Their processor (streams.processors) hands each
batch's valid events to :meth:`Engine.process` in partition order and sends what comes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .rulebook import RuleBook
from .state import Store


@dataclass(frozen=True)
class EngineEvent:
    """One valid event at its source position; ``record`` is the short record name (``Stay`` for
    a re-keyed stay), ``key`` the Kafka key where the engine keys by it, ``age`` when known."""

    record: str
    datum: dict[str, Any]
    partition: int
    offset: int
    key: str | None = None
    age: int | None = None


@dataclass
class EngineOutput:
    """Alert data with the position of the event that raised them, records to re-key, counts."""

    alerts: list[tuple[dict[str, Any], int, int]] = field(default_factory=list)  # datum, partition, offset
    emits: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # stream, key, value
    #: (partition, offset) of the event each emit derives from (same order as ``emits``)
    emit_sources: list[tuple[int, int]] = field(default_factory=list)
    late: int = 0  # events too late for the windowed rules (line rules still applied)
    skipped: int = 0  # events already applied (a redelivery: at or below the key's offset)
    capped: int = 0  # events after which a key's state was cut to its bound
    evicted: int = 0  # keys dropped because nothing in them can matter to any rule any more


class Engine(Protocol):
    """A detector engine and the keyed state it keeps, per source partition.

    The worker calls :meth:`restored` after it read a newly assigned partition's changelog into
    :attr:`stores`, :meth:`forget` when a partition is revoked (or a failed batch is rolled
    back), and :meth:`process` with each batch's valid events, in partition order.
    """

    book: RuleBook
    stores: list[Store]
    #: the rule kinds whose alerts this engine raises (the alerts table is shared by every stream)
    alert_kinds: frozenset[str]
    #: the fields of a record (by short name) the engine reads, a nested list's as ``list.field``:
    #: its processor may hand it dicts of these alone. A record not named is handed whole.
    reads: Mapping[str, frozenset[str]]

    def restored(self, partition: int) -> None: ...

    def forget(self, partitions: Sequence[int]) -> None: ...

    def process(self, events: Sequence[EngineEvent]) -> EngineOutput: ...
