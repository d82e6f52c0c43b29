"""The demo's own evaluation (yibao/demo.py ``_evaluation``) on the demo's own traffic path
(``_events``: planted traffic with a share of events broken on purpose), in process.

The demo leaves out of the truth every anomaly one of whose events it broke (dead-lettered, so no
detector saw it). A planted visit that bills a stocked drug comes with a PURCHASE_IN and a
SALE_OUT (the planters' "Dispensed" guarantee); the settlement rules never read them, so breaking
one must not take the anomaly out of the truth: its alert still fires, and it would be counted as
an alert without a planted case (the demo's 3 YB-PSN-SHOP-1D and 2 YB-PSN-SHOP-7D at seed 42).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from schemas import Codec
from yibao import demo
from yibao.settings import load_settings
from yibao.sim import evaluate
from yibao.sim.evaluate import latest_alerts, run_events
from yibao.sim.planters import Planting

SHOP = ("YB-PSN-SHOP-1D", "YB-PSN-SHOP-7D")


def test_a_broken_dispensing_movement_leaves_the_planted_shopping_in_the_truth(
        monkeypatch: pytest.MonkeyPatch) -> None:
    planting = Planting(",".join(SHOP), rate=0.02)
    broken: set[str] = set()
    reasons: Counter[str] = Counter()
    events = demo._events(load_settings(), Codec(), 4_000, None, 5, 0.05, reasons, [], planting, broken)
    # a broken event is dead-lettered by the worker: the rules never see it
    run = run_events(ev for ev in events if ev.datum is not None)
    assert broken & planting.dispensed_ids  # the case at hand: some planted visit's movement is broken
    truth = planting.truth()

    monkeypatch.setattr(evaluate, "alerts_from_backend", lambda backend: run.alerts)
    result: dict[str, Any] = demo._evaluation(None, planting, broken)
    for rid in SHOP:
        r = result["rules"][rid]
        assert r["planted"] >= 5 and (r["precision"], r["recall"]) == (1.0, 1.0), (rid, r)
    # and every fired SHOP alert is one of the planted cases kept in the truth
    kept = {s for t in truth if t["rule_id"] in SHOP and not broken & set(t["event_ids"]) for s in t["setl_ids"]}
    fired = [a for a in latest_alerts(run.alerts) if a["rule_id"] in SHOP and a["status"] == "FIRED"]
    assert fired and all(kept & set(a["setl_ids"]) for a in fired)
    # the movements are the planting's, not the anomalies' events
    assert not planting.dispensed_ids & {i for t in truth for i in t["event_ids"]}
