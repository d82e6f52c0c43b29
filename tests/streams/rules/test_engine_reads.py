"""The settlement engine reads an event only through the fields it names in ``reads``.

On the columnar path its processor hands it dicts of those fields alone (streams.rows_columnar.
frame_dicts); a field read but not named would be missing there, a KeyError or, through ``get``,
a silent None that judges the settlement differently from the record path.
"""

from __future__ import annotations

from typing import Any

from streams.rules.engine import REVERSAL, SETTLEMENT, SettlementEngine
from streams.rules.events import EngineEvent
from streams.rules.state import Store
from yibao.sim.generator import SimConfig
from yibao.sim.planters import Planting

from .builders import KNOWLEDGE, PSEUDO, seed_book


class Spy(dict[str, Any]):
    """A datum that notes every field read from it (a list of records' as ``list.field``)."""

    def __init__(self, datum: dict[str, Any], read: set[str], prefix: str = "") -> None:
        super().__init__(datum)
        self.read, self.prefix = read, prefix

    def _noted(self, key: str, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return [Spy(v, self.read, f"{self.prefix}{key}.") for v in value]
        self.read.add(self.prefix + key)
        return value

    def __getitem__(self, key: str) -> Any:
        return self._noted(key, super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        return self._noted(key, super().get(key, default))


def test_every_field_the_engine_reads_is_one_it_names() -> None:
    engine = SettlementEngine(seed_book(), KNOWLEDGE, PSEUDO, Store("person", "changelog.person"))
    read: dict[str, set[str]] = {SETTLEMENT: set(), REVERSAL: set()}
    gen = Planting("all", rate=0.3).generator(SimConfig(seed=3, settlements=3000, reversal_rate=0.1))
    events = [EngineEvent(name, Spy(ev.datum, read[name]), 0, i)
              for i, ev in enumerate(gen.events()) if (name := ev.record.rsplit(".", 1)[-1]) in read]
    out = engine.process(events)
    assert out.alerts and out.emits, "nothing fired or re-keyed: too little of the engine ran"
    assert read[REVERSAL], "no reversal in the traffic"
    for record, names in read.items():
        assert names <= engine.reads[record], (record, sorted(names - engine.reads[record]))


def test_a_field_read_but_not_named_is_caught() -> None:
    """The spy sees a read through ``get`` (a silent None on the columnar path) as well."""
    read: set[str] = set()
    spy = Spy({"a": 1, "lines": [{"b": 2}]}, read)
    assert spy.get("c") is None
    assert [ln["b"] for ln in spy["lines"]] == [2]
    assert read == {"c", "lines.b"}
