"""AnomalyAlert events: deterministic ids, so a replay or a second detection never duplicates."""

from __future__ import annotations

import uuid
from typing import Any

from .detectors import Finding

_NS = uuid.UUID("0b5f0f43-7a9e-4c55-8a55-3f3f0c1d2e71")
ALERT_RECORD = "cn.nhsa.yibao.pipeline.AnomalyAlert"


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


def alert_datum(f: Finding, subsystem: str, subject: str, psn_token: str | None, admdvs: str | None,
                generation: int = 0) -> dict[str, Any]:
    """Raw AnomalyAlert (money in fen, times in epoch ms) for a FIRED finding."""
    aid = alert_id(f.rule.id, subject, f.key)
    return {
        "event_id": alert_event_id(aid, "FIRED", generation),
        "alert_id": aid,
        "status": "FIRED",
        "rule_id": f.rule.id,
        "rule_version": f.rule.version,
        "result_type": f.rule.result_type.value,
        "severity": f.rule.severity.value,
        "subsystem": subsystem,
        "fixmedins_code": f.fixmedins_code or None,
        "psn_token": psn_token,
        "admdvs": admdvs,
        "setl_ids": list(f.setl_ids),
        "mdtrt_ids": list(f.mdtrt_ids),
        "window_start": f.window_start,
        "window_end": f.window_end,
        "amount_at_risk": max(0, int(f.amount_at_risk)),
        "evidence": {k: str(v) for k, v in f.evidence.items()},
        "detected_at": f.detected_at,
    }


def retraction(fired: dict[str, Any], at_ms: int, reason: str, generation: int = 0) -> dict[str, Any]:
    """The RETRACTED version of a fired alert (same alert id: the alerts table keeps the latest)."""
    out = dict(fired)
    out["event_id"] = alert_event_id(fired["alert_id"], "RETRACTED", generation)
    out["status"] = "RETRACTED"
    out["detected_at"] = max(at_ms, fired["detected_at"] + 1)
    out["evidence"] = {**fired["evidence"], "retracted_because": reason}
    out["amount_at_risk"] = 0
    return out


# --- what a store remembers of the alerts it fired --------------------------------------------------
# st["f"][alert_id] = {"d": latest alert datum, "g": generation, "ep": episode key or None,
#                      "exp": watermark after which the entry may be forgotten}


def fired_datum(st: dict[str, Any], aid: str) -> dict[str, Any] | None:
    """The latest datum of an alert that currently stands (FIRED), else None."""
    entry = st["f"].get(aid)
    if entry is None or entry["d"]["status"] != "FIRED":
        return None
    d: dict[str, Any] = entry["d"]
    return d


def next_generation(st: dict[str, Any], aid: str) -> int | None:
    """None while the alert stands; else the generation its next firing gets (0 the first time)."""
    entry = st["f"].get(aid)
    if entry is None:
        return 0
    if entry["d"]["status"] == "FIRED":
        return None
    return int(entry["g"]) + 1


def remember(st: dict[str, Any], datum: dict[str, Any], generation: int, expires: int,
             episode: str | None = None) -> None:
    st["f"][datum["alert_id"]] = {"d": datum, "g": generation, "ep": episode, "exp": expires}


def retract(st: dict[str, Any], aid: str, at_ms: int, reason: str) -> dict[str, Any]:
    """Record and return the RETRACTED datum of a standing alert; its episode is freed."""
    entry = st["f"][aid]
    datum = retraction(entry["d"], at_ms, reason, entry["g"])
    entry["d"] = datum
    if entry.get("ep"):
        st["ep"].pop(entry["ep"], None)
    return datum
