"""The ids of AnomalyAlert events: deterministic, so a replay or a second detection never duplicates,
and ordered, so whoever holds one version of an alert knows which versions came before it.

They are part of the alerts contract: the engines make them (streams/rules), the sink reads them
back to tell a redelivered version from a new one (sinks/landed.py).
"""

from __future__ import annotations

import uuid

_NS = uuid.UUID("0b5f0f43-7a9e-4c55-8a55-3f3f0c1d2e71")


def alert_id(rule_id: str, subject: str, key: str) -> str:
    """Same rule, subject and window → same id, whatever the rule version or the worker."""
    return str(uuid.uuid5(_NS, f"{rule_id}|{subject}|{key}"))


def alert_event_id(aid: str, status: str, generation: int = 0) -> str:
    """Id of one alert event; a window that fires again after a retraction is a new generation."""
    return str(uuid.uuid5(_NS, f"{aid}|{status}" if not generation else f"{aid}|{status}|{generation}"))


#: Generations searched for when an event id's version must be told (an alert fired and retracted
#: more often than this is treated as a version of its own, never as an old one).
GENERATIONS_SEARCHED = 1024


def versions_until(aid: str, status: str, event_id: str) -> list[str]:
    """The event ids of this version of alert ``aid`` and of every version before it.

    Versions of one alert follow each other in one order: FIRED (generation 0), RETRACTED, FIRED
    (generation 1), RETRACTED, ... A version's event id names its status and generation, so
    whoever holds a later version knows that every earlier one was written before it.
    """
    for gen in range(GENERATIONS_SEARCHED):
        if alert_event_id(aid, status, gen) == event_id:
            break
    else:
        return [event_id]
    out = []
    for g in range(gen + 1):
        out.append(alert_event_id(aid, "FIRED", g))
        if g < gen or status == "RETRACTED":
            out.append(alert_event_id(aid, "RETRACTED", g))
    return out
