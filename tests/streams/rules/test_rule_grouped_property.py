"""Property: the group rules' standing alerts depend on the stays and reversals, not on how they arrive.

Generated traffic (a few hospitals and DRG groups over several months, high-cost outliers,
hospital-months with a raised CC/MCC share, reversals, some of them after their month closed) is
fed to both grouped engines (a) in event-time order as one batch, and (b) shuffled within the
allowed lateness, over one to three partitions, in random batch sizes, with some records sent
twice (same content, later offset). The standing alerts (FIRED, not RETRACTED) must be equal.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.processors import STAY
from streams.rules.events import EngineEvent
from streams.rules.grouped import GroupedEngine
from streams.rules.state import Store

from .builders import month_ms, seed_book, stay_value

DAY = 86_400_000
LATENESS_DAYS = 35
LATENESS = LATENESS_DAYS * DAY
MONTHS = (202401, 202402, 202403, 202404, 202405, 202406)
BOOK = seed_book()


def traffic(seed: int, hospitals: int, months: int, raised: int, outlier_pm: int, reversal_pm: int
            ) -> list[tuple[int, bytes]]:
    """(event time, stay record) of generated stays and reversals."""
    rng = random.Random(seed)
    base = {"ES2": 500_000, "FM1": 1_200_000}
    hosp = [f"H1101050000{i}" for i in range(1, hospitals + 1)]
    hot = {(rng.choice(hosp), rng.choice(MONTHS[2:months])) for _ in range(raised)} if months > 2 else set()
    out: list[tuple[int, bytes]] = []
    n = 0
    for m in MONTHS[:months]:
        start = month_ms(m, 1, 0)
        days = (month_ms(m + 1 if m % 100 < 12 else m + 89, 1, 0) - start) // DAY
        for h in hosp:
            share = 0.6 if (h, m) in hot else 0.2
            for _ in range(rng.randint(28, 45)):
                n += 1
                group = rng.choice(sorted(base))
                sev = ("1" if rng.random() < 0.4 else "3") if rng.random() < share else "5"
                amt = int(base[group] * rng.uniform(0.8, 1.25))
                if rng.random() * 1000 < outlier_pm:
                    amt = int(base[group] * rng.uniform(3.2, 6))
                t = start + rng.randrange(days * DAY)
                s, tok = f"S{n}", f"tok{n % 97}"
                out.append((t, stay_value(s, t, h=h, drg=group + sev, amt=amt, tok=tok)))
                if rng.random() * 1000 < reversal_pm:
                    # most reversals within weeks; some after the stay's month closed
                    rt = t + (rng.randrange(20 * DAY) if rng.random() < 0.8 else rng.randrange(40 * DAY, 150 * DAY))
                    out.append((rt, stay_value(s, t, h=h, drg=group + sev, amt=amt, tok=tok, rev=True, rt=rt)))
    return out


def standing(by: str, batches: Sequence[Sequence[EngineEvent]]) -> set[str]:
    engine = GroupedEngine(BOOK, Store(by, "t"), by, allowed_lateness_days=LATENESS_DAYS)
    last: dict[str, str] = {}
    for batch in batches:
        for a, _, _ in engine.process(batch).alerts:
            last[a["alert_id"]] = a["status"]
    return {aid for aid, status in last.items() if status == "FIRED"}


def keyed(by: str, value: bytes) -> tuple[str, dict[str, Any]]:
    rec = json.loads(value)
    return str(rec["h"] if by == "hospital" else rec["drg"]), rec


def in_order(by: str, events: list[tuple[int, bytes]]) -> list[list[EngineEvent]]:
    ordered = sorted(events, key=lambda e: e[0])  # stable: a stay before its reversal at the same time
    return [[EngineEvent(STAY, rec, 0, i, key=k) for i, (_, v) in enumerate(ordered)
             for k, rec in [keyed(by, v)]]]


def shuffled(by: str, events: list[tuple[int, bytes]], rng: random.Random, partitions: int, dup_pm: int
             ) -> list[list[EngineEvent]]:
    """Each event delayed by up to the lateness (so it arrives before anything more than the
    lateness younger), some sent again later; keys spread over ``partitions``; random batches."""
    arrivals = [(t + rng.randrange(LATENESS), i, v) for i, (t, v) in enumerate(events)]
    arrivals += [(t + rng.randrange(LATENESS), len(events) + i, v) for i, (t, v) in enumerate(events)
                 if rng.random() * 1000 < dup_pm]
    arrivals.sort()
    offsets = [0] * partitions
    flat = []
    for _, _, v in arrivals:
        k, rec = keyed(by, v)
        p = zlib.crc32(k.encode()) % partitions
        flat.append(EngineEvent(STAY, rec, p, offsets[p], key=k))
        offsets[p] += 1
    batches = []
    while flat:
        n = rng.choice([1, 2, 7, 50, 300])
        batches.append(flat[:n])
        flat = flat[n:]
    return batches


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), hospitals=st.integers(1, 3), months=st.integers(3, len(MONTHS)),
       raised=st.integers(0, 3), outlier_pm=st.sampled_from([0, 20, 60]), reversal_pm=st.sampled_from([0, 30, 120]),
       partitions=st.integers(1, 3), dup_pm=st.sampled_from([0, 50, 300]), shuffle=st.randoms(use_true_random=False))
def test_standing_alerts_do_not_depend_on_arrival(seed: int, hospitals: int, months: int, raised: int,
                                                  outlier_pm: int, reversal_pm: int, partitions: int, dup_pm: int,
                                                  shuffle: random.Random) -> None:
    events = traffic(seed, hospitals, months, raised, outlier_pm, reversal_pm)
    for by in ("hospital", "drg"):
        want = standing(by, in_order(by, events))
        assert standing(by, shuffled(by, events, shuffle, partitions, dup_pm)) == want, by


def test_the_generated_traffic_raises_both_rules() -> None:
    """The property is not vacuous: such traffic raises (and reversals retract) alerts of both rules."""
    events = traffic(11, 3, 6, 3, 40, 120)
    up, high = standing("hospital", in_order("hospital", events)), standing("drg", in_order("drg", events))
    assert len(up) >= 2 and len(high) >= 10
    rng = random.Random(5)
    assert standing("hospital", shuffled("hospital", events, rng, 2, 300)) == up
    assert standing("drg", shuffled("drg", events, rng, 3, 300)) == high
