"""Property: the procurement alerts standing once every event is in depend only on the events.

Generated procurement traffic (contracts, orders, deliveries, payments, inventory movements with
stock-takes and traceability codes; some records re-sent upstream, a payment whose delivery never
comes) of one to three institutions on one partition is processed

(a) in event-time order, in one batch, and
(b) shuffled so that no event arrives more than the allowed lateness after an event with a later
    event time, in batches of random sizes, with crashes: a batch is redelivered at its offsets
    after its changelog reached the store whole, in part (some keys written, others not) or not at
    all, and restarts (the engine rebuilt from a JSON round trip of its store).

The alerts standing (latest version by ``detected_at``, FIRED) must be the same, region included
(a contract carries the province that procured, the other events the institution's district). Hypothesis prints
the falsifying example (and its seed with ``--hypothesis-seed``)."""

from __future__ import annotations

import random
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.rules.events import EngineEvent
from streams.rules.procurement import ProcurementEngine
from streams.rules.rulebook import RuleBook
from streams.rules.state import Store

from .builders import HOUR_MS, hospital, ms, rule_update, seed_book
from .test_rule_procurement import DRUG, contract, delivery, mov, order, payment, standing

LATENESS_DAYS = 3
LATENESS_MS = LATENESS_DAYS * 86_400_000
DRUGS = (DRUG, "XA10BAE014A010010300321")
INSTS = tuple(hospital(n) for n in (1, 2, 3))
CODES = ("A", "B", "C")
SPAN_H = 70 * 24  # events over 70 days from 2024-03-04: the month ends of April and May inside
PARAMS = {"YB-PSI-OVERSELL": {"tolerance_pm": 20}, "YB-PSI-TRACE-DUP": {"retention_days": 5},
          "YB-PROC-VOLUME-LAG": {"lag_points": 10, "min_shortfall_yuan": 0}, "YB-PROC-PAY-OVERDUE": {"days": 4}}
TIME_FIELD = {"InventoryMovement": "mov_time", "ProcurementContract": "sign_time", "ProcurementOrder": "ord_time",
              "DeliveryAcceptance": "acpt_time", "SupplierPayment": "pay_time"}

Event = tuple[str, dict[str, Any]]


def at(hours: int) -> int:
    return ms(0, 0) + hours * HOUR_MS


@st.composite
def traffic(draw: st.DrawFn) -> list[Event]:
    insts = INSTS[: draw(st.integers(1, 3))]
    events: list[Event] = []
    n = 0
    hour = st.integers(0, SPAN_H)
    for inst in insts:
        for c in range(draw(st.integers(0, 2))):
            begin = draw(st.integers(0, 20))
            sign = at(begin * 24 + draw(st.integers(-48, 48)))
            events.append(contract(draw(st.integers(5, 200)), begin, begin + draw(st.integers(20, 60)), f"C{c}",
                                   inst=inst, drug=draw(st.sampled_from(DRUGS)), sign=sign))
        for _ in range(draw(st.integers(0, 6))):
            events.append(order(draw(st.integers(1, 60)), at(draw(hour)), draw(st.sampled_from(["C0", "C1", None])),
                                inst=inst, drug=draw(st.sampled_from(DRUGS))))
        for k in range(draw(st.integers(0, 4))):
            acpt = draw(hour)
            events.append(delivery(f"D{k}", at(acpt), inst=inst))
            for _ in range(draw(st.integers(0, 2))):
                events.append(payment(f"D{k}", at(acpt + draw(st.integers(0, 10 * 24))), inst=inst))
        if draw(st.booleans()):  # a payment for a delivery never reported
            events.append(payment("DX", at(draw(hour)), inst=inst))
        for _ in range(draw(st.integers(0, 30))):
            kind = draw(st.sampled_from(["STOCKTAKE", "PURCHASE_IN", "PURCHASE_RETURN", "SALE_OUT", "SALE_OUT",
                                         "SALE_OUT", "SALE_RETURN"]))
            codes = (draw(st.lists(st.sampled_from(CODES), min_size=1, max_size=2))
                     if kind in ("SALE_OUT", "SALE_RETURN") and draw(st.booleans()) else [])
            n += 1
            events.append(mov(kind, draw(st.integers(0, 30)), at(draw(hour)), codes, draw(st.sampled_from(DRUGS)),
                              inst=inst, mov_id=f"MV{inst[-1]}{n:05d}"))
    if events:  # upstream re-sends: the same record again, at another offset
        events += draw(st.lists(st.sampled_from(events), max_size=3))
    return events


def _book() -> RuleBook:
    book = seed_book()
    for rid, p in PARAMS.items():
        rule_update(book, rid, **p)
    return book


BOOK = _book()


def engine(store: Store | None = None) -> ProcurementEngine:
    eng = ProcurementEngine(BOOK, store or Store("procurement", "t"), allowed_lateness_days=LATENESS_DAYS)
    if store is not None:
        eng.restored(0)
    return eng


def copied(part: dict[str, Any]) -> Store:
    """A store holding ``part`` after a JSON round trip (what the changelog gives back)."""
    s = Store("procurement", "t")
    s.part(0).update({k: orjson.loads(orjson.dumps(v)) for k, v in part.items()})
    return s


def in_order(events: list[Event]) -> dict[str, dict[str, Any]]:
    evs = sorted(events, key=lambda e: e[1][TIME_FIELD[e[0]]])
    out = engine().process([EngineEvent(r, d, 0, i) for i, (r, d) in enumerate(evs)])
    return standing([a for a, _, _ in out.alerts])


def shuffled(events: list[Event], delays: list[int], rng: random.Random) -> dict[str, dict[str, Any]]:
    """Arrival by event time plus a delay of at most the lateness (so no event arrives more than
    the lateness after a later one), in random batches, with crashes and restarts."""
    keyed = sorted(range(len(events)), key=lambda i: (events[i][1][TIME_FIELD[events[i][0]]] + delays[i], i))
    arrivals = [EngineEvent(events[i][0], events[i][1], 0, off) for off, i in enumerate(keyed)]
    eng = engine()
    seen: list[dict[str, Any]] = []
    pos = 0
    while pos < len(arrivals):
        batch = arrivals[pos: pos + rng.randint(1, 8)]
        before = copied(eng.store.part(0)).part(0)
        seen += [a for a, _, _ in eng.process(batch).alerts]
        after = eng.store.part(0)
        what = rng.random()
        if what < 0.15:  # redelivered, the changelog written whole: every event is skipped
            assert not eng.process(batch).alerts
        elif what < 0.45:  # crash: the changelog has some of the batch's keys (or none), then redelivery
            mixed = {}
            share = rng.choice([0.0, 0.5, 1.0])
            for k in sorted(set(before) | set(after)):
                v = after.get(k) if rng.random() < share else before.get(k)
                if v is not None:
                    mixed[k] = v
            eng = engine(copied(mixed))
            cut = rng.randint(0, len(batch))
            for part in (batch[:cut], batch[cut:]):
                seen += [a for a, _, _ in eng.process(part).alerts]
        elif what < 0.6:  # restart from the changelog
            eng = engine(copied(after))
        pos += len(batch)
    return standing(seen)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(traffic(), st.data(), st.integers(0, 2**32 - 1))
def test_standing_alerts_depend_only_on_the_events(events: list[Event], data: st.DataObject, seed: int) -> None:
    delays = data.draw(st.lists(st.integers(0, LATENESS_MS), min_size=len(events), max_size=len(events)))
    expected = in_order(events)
    got = shuffled(events, delays, random.Random(seed))
    assert {k: (a["rule_id"], a["evidence"].get("ref"), a["admdvs"]) for k, a in got.items()} == \
        {k: (a["rule_id"], a["evidence"].get("ref"), a["admdvs"]) for k, a in expected.items()}
