"""AnomalyAlert events: deterministic ids, so a replay or a second detection never duplicates."""

from __future__ import annotations

from typing import Any

from schemas.alert_ids import GENERATIONS_SEARCHED, alert_event_id, alert_id, versions_until

from .detectors import Finding

ALERT_RECORD = "cn.nhsa.yibao.pipeline.AnomalyAlert"
__all__ = ["ALERT_RECORD", "GENERATIONS_SEARCHED", "alert_datum", "alert_event_id", "alert_id", "fired_datum",
           "next_generation", "remember", "retract", "retraction", "versions_until"]


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
