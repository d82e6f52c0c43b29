"""Eviction of persons whom no rule can need any more: the same alerts, far less state.

Generated traffic with planted anomalies over ten months (the rules' longest look back is about
three and a half), with persons who settle once and never again, chronic patients and reversals,
goes through the settlement stage twice, in event-time order and as producers deliver it
(shuffled within the lateness, re-sent), in batches: once as shipped and once with the eviction
sweep switched off. Every alert version must be the same, in the same order; the evicting run
must hold fewer persons, and write a tombstone for those it dropped (so a compacted changelog
frees them too).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import pytest

from schemas import Codec
from schemas.calendar import CHINA, DAY_MS
from streams.messages import Message
from streams.privacy import Pseudonymizer, Sealer
from streams.processors import BatchProcessor
from streams.rules.engine import SettlementEngine
from streams.topology import build_pipeline
from yibao.settings import load_settings
from yibao.sim.delivery import deliver
from yibao.sim.generator import SimConfig
from yibao.sim.planters import Planting

KEY = b"e" * 32
START = datetime(2025, 1, 1, tzinfo=CHINA)  # ten months that are all in the past (validation refuses the future)


def _engine(proc: Any) -> SettlementEngine:
    assert isinstance(proc, BatchProcessor) and isinstance(proc.engine, SettlementEngine)
    return proc.engine


def _run(msgs: list[Message], evict: bool, batch: int) -> tuple[list[dict[str, Any]], SettlementEngine, int, int]:
    s = load_settings(pseudo_key="00" * 32)
    rules = dataclasses.replace(s.rules(), enabled=True)
    pipeline = build_pipeline(validation=s.validation(), rules=rules, topic=s.topic, codec=Codec(),
                              pseudonymizer=Pseudonymizer(KEY, "k1"), sealer=Sealer(KEY, "k1"), streams=("settlement",))
    proc = pipeline.stages["settlement"].processor
    engine = _engine(proc)
    if not evict:
        engine._sweep = lambda *a, **k: 0  # type: ignore[method-assign]
    alerts: list[dict[str, Any]] = []
    evicted = tombstones = 0
    for i in range(0, len(msgs), batch):
        out = proc.process(msgs[i:i + batch])
        alerts += out.alerts
        evicted += out.state_evicted
        tombstones += sum(1 for _, _, v in engine.person.drain() if v is None)
    return alerts, engine, evicted, tombstones


@pytest.mark.parametrize("delivered", [False, True], ids=["event-time order", "as delivered"])
def test_eviction_changes_no_alert_and_bounds_the_state(delivered: bool) -> None:
    gen = Planting("all", rate=0.03).generator(SimConfig(seed=5, settlements=3500, days=300, persons=2500, start=START))
    codec = Codec()
    events = sorted((e for e in gen.events() if e.record.endswith(("Settlement", "SettlementReversal"))),
                    key=lambda e: e.time_ms)
    if delivered:
        events = deliver(events, shuffle_within_s=20 * DAY_MS / 1000, resend_rate=0.02, seed=3)
    msgs = [Message(0, i, e.key.encode(), codec.encode(e.record, e.datum)) for i, e in enumerate(events)]

    kept, kept_engine, none, _ = _run(msgs, evict=False, batch=400)
    got, engine, evicted, tombstones = _run(msgs, evict=True, batch=400)

    assert none == 0
    assert len(kept) > 50, "the traffic raises alerts"
    assert got == kept  # every version, in the same order
    persons, persons_kept = len(engine.person.part(0)), len(kept_engine.person.part(0))
    # a person dropped and back in the same batch is written once, as they are now
    assert 0 < tombstones <= evicted, (evicted, tombstones)
    assert persons < persons_kept * 0.8, (persons, persons_kept)
    assert all(kept_engine.person.get(0, tok) is not None for tok in engine.person.part(0))
