"""The standing alerts depend only on the events: the fast form of the property, on the engines alone.

Traffic with every stream rule planted runs through the in-process pipeline (the topology the
worker uses: identity, validation, the settlement, procurement and hospital/DRG engines, the
re-keyed stays routed as the topics route them) twice: once in event-time order, once as a
producer fleet delivers it (shuffled within the allowed lateness, about 3 % re-sent as the same
bytes, in other batch sizes). After all events are in, the alerts standing (latest version not
RETRACTED) must be the same, and every re-send must have been recognised. The system test
(tests/system/test_event_identity.py) proves the same on the real broker and both ClickHouse
engines, with two worker processes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.calendar import DAY_MS
from yibao.settings import Settings
from yibao.sim.delivery import deliver
from yibao.sim.evaluate import latest_alerts, run_events
from yibao.sim.generator import SimConfig, SimEvent
from yibao.sim.planters import Planting

from ..harness import default_settings


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with default_settings(tmp_path_factory.mktemp("cwd")) as s:
        yield s


@pytest.fixture(scope="module")
def traffic() -> list[SimEvent]:
    """Four months of two small regions, every stream rule planted (the hospital rules need months
    and DRG groups with cases; the repeat-test and high-cost planters find few eligible stays)."""
    config = SimConfig(settlements=10_000, days=125, seed=11, regions=2, hospitals=2, pharmacies=6,
                       late_payment_rate=0.0)
    rates = {"YB-HOSP-HIGHCOST": 0.3, "YB-PSN-RETEST": 0.3}
    return list(Planting("all", rate=0.02, rates=rates).generator(config).events())


def standing(alerts: list[dict[str, Any]]) -> dict[str, str]:
    return {a["alert_id"]: a["rule_id"] for a in latest_alerts(alerts) if a["status"] != "RETRACTED"}


@pytest.fixture(scope="module")
def in_order(traffic: list[SimEvent], env: Settings) -> dict[str, str]:
    return standing(run_events(traffic, env).alerts)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), batch=st.sampled_from([97, 700, 2500]))
def test_standing_alerts_do_not_depend_on_arrival_order_resends_or_batches(
        traffic: list[SimEvent], in_order: dict[str, str], env: Settings, seed: int, batch: int) -> None:
    within_s = (env.allowed_lateness_days * DAY_MS - DAY_MS) / 1000
    arrived = deliver(traffic, shuffle_within_s=within_s, resend_rate=0.03, seed=seed)
    run = run_events(arrived, env, batch=batch)
    got = standing(run.alerts)
    differ = Counter(in_order.get(a) or got[a] for a in set(got) ^ set(in_order))
    assert not differ, (f"shuffle seed {seed}, batch {batch}: standing alerts differ by rule "
                        f"(only in order: {len(set(in_order) - set(got))}, only shuffled: "
                        f"{len(set(got) - set(in_order))}): {dict(differ)}")
    assert sum(run.duplicates.values()) == len(arrived) - len(traffic), f"shuffle seed {seed}"



def test_the_traffic_raises_every_stream_rule(in_order: dict[str, str]) -> None:
    """Otherwise the property above would hold vacuously for the rules it misses."""
    from streams.rules.detectors import KINDS
    from streams.topology import build_rulebook

    monitor_kinds = {"fund_capacity", "fund_negative", "settled_over_sold", "credit_low"}
    stream_rules = {r.id for r in build_rulebook().current.enabled() if r.kind in KINDS
                    and r.kind not in monitor_kinds}
    assert stream_rules - set(in_order.values()) == set()
