"""The OpenAPI document of the pre-settlement check, served at ``/v1/openapi.json``.

The request schema is derived from the Settlement contract (its Avro schema in the registry), so the
document and the stream cannot disagree about a field: decimals are strings with the contract's
scale, times ISO-8601 date-times, dates ``YYYY-MM-DD``. ``event_id`` and ``setl_id`` may be left out
(a settlement being prepared has neither yet).
"""

from __future__ import annotations

from typing import Any

from schemas import Codec

from .check import DEFAULTED, SETTLEMENT_RECORD

ERROR_CODES = {
    400: ("MALFORMED_JSON, INVALID_SETTLEMENT (reason_code and field say what the stream would refuse it for)",),
    401: ("UNAUTHENTICATED: no API key or client certificate known to the service",),
    403: ("FORBIDDEN_INSTITUTION: fixmedins_code is not the caller's institution",),
    413: ("TOO_LARGE: the body is over the size limit",),
    415: ("UNSUPPORTED_MEDIA_TYPE: the body is not application/json",),
    429: ("RATE_LIMITED: over the caller's rate; Retry-After says when to try again",),
    503: ("STATE_UNAVAILABLE: the person's state is being restored or moving between workers; retry after "
          "Retry-After seconds (an answer now could wrongly say 'no hits')",),
}


def _schema(t: Any, named: dict[str, Any]) -> dict[str, Any]:
    if isinstance(t, list):
        branches = [b for b in t if b != "null"]
        s = _schema(branches[0], named) if len(branches) == 1 else {"oneOf": [_schema(b, named) for b in branches]}
        return {**s, "nullable": True} if "null" in t else s
    if isinstance(t, str):
        if t in named:
            return _schema(named[t], named)
        t = {"type": t}
    kind = t["type"]
    if isinstance(kind, (dict, list)):
        return _schema(kind, named)
    lt = t.get("logicalType")
    if lt == "decimal":
        whole, scale = int(t["precision"]) - int(t["scale"]), int(t["scale"])
        return {"type": "string", "pattern": rf"^-?\d{{1,{whole}}}(\.\d{{1,{scale}}})?$",
                "description": f"decimal({t['precision']},{scale}) as a string"}
    if lt == "timestamp-millis":
        return {"type": "string", "format": "date-time", "description": "ISO-8601 with its offset (China time: +08:00)"}
    if lt == "date":
        return {"type": "string", "format": "date"}
    if kind == "record":
        named[t["name"]] = t
        props = {f["name"]: _schema(f["type"], named) for f in t["fields"]}
        required = [f["name"] for f in t["fields"] if "default" not in f]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if kind == "array":
        return {"type": "array", "items": _schema(t["items"], named)}
    if kind == "enum":
        return {"type": "string", "enum": list(t["symbols"])}
    if kind == "int":
        return {"type": "integer", "format": "int32"}
    if kind == "long":
        return {"type": "integer", "format": "int64"}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind in ("float", "double"):
        return {"type": "number"}
    return {"type": "string"}


def settlement_schema() -> dict[str, Any]:
    s = _schema(Codec().record_schema(SETTLEMENT_RECORD), {})
    s["required"] = [f for f in s["required"] if f not in DEFAULTED]
    s["properties"]["event_type"] = {"type": "string",
                                     "description": "ignored (JSON lines of `yibao simulate --out` carry it)"}
    return s


def document() -> dict[str, Any]:
    error = {"$ref": "#/components/schemas/Error"}
    responses: dict[str, Any] = {
        "200": {"description": "The rule hits this settlement would raise now (none: an empty list).",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}},
    }
    for status, (text,) in ERROR_CODES.items():
        r: dict[str, Any] = {"description": text, "content": {"application/json": {"schema": error}}}
        if status in (429, 503):
            r["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        responses[str(status)] = r
    hit = {
        "type": "object",
        "required": ["rule_id", "rule_version", "result_type", "severity", "rule_name_zh", "rule_name_en", "scope",
                     "lines", "items", "message_zh", "message_en", "evidence", "amount_at_risk"],
        "properties": {
            "rule_id": {"type": "string"}, "rule_version": {"type": "integer"},
            "result_type": {"type": "string", "enum": ["DEFINITE", "SUSPICIOUS"]},
            "severity": {"type": "string", "enum": ["LOW", "MEDIUM", "HIGH", "CRITICAL"]},
            "rule_name_zh": {"type": "string"}, "rule_name_en": {"type": "string"}, "scope": {"type": "string"},
            "lines": {"type": "array", "items": {"type": "string"},
                      "description": "feedetl_sn of the lines concerned (empty: the settlement as a whole)"},
            "items": {"type": "array", "items": {"type": "string"}, "description": "their hilist_code"},
            "message_zh": {"type": "string"}, "message_en": {"type": "string"},
            "evidence": {"type": "object", "additionalProperties": {"type": "string"}},
            "amount_at_risk": {"type": "string", "description": "yuan, decimal as a string"},
        },
        "additionalProperties": False,
    }
    answer = {
        "type": "object",
        "required": ["check_id", "checked_at", "fixmedins_code", "mdtrt_id", "setl_id", "hits", "rules_checked"],
        "properties": {
            "check_id": {"type": "string", "format": "uuid"},
            "checked_at": {"type": "string", "format": "date-time"},
            "fixmedins_code": {"type": "string"}, "mdtrt_id": {"type": "string"}, "setl_id": {"type": "string"},
            "hits": {"type": "array", "items": {"$ref": "#/components/schemas/Hit"}},
            "rules_checked": {"type": "array", "items": {"type": "string"},
                              "description": "the enabled rules that judged this settlement"},
        },
        "additionalProperties": False,
    }
    err = {
        "type": "object",
        "required": ["code", "message", "field", "reason_code"],
        "properties": {
            "code": {"type": "string"}, "message": {"type": "string"},
            "field": {"type": "string", "nullable": True, "description": "the field at fault, as a path"},
            "reason_code": {"type": "string", "nullable": True,
                            "description": "the stream's reason (MISSING_FIELD, OUT_OF_RANGE, ...) "
                                           "for INVALID_SETTLEMENT"},
        },
        "additionalProperties": False,
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "yibao pre-settlement check (事前提示)", "version": "1",
                 "description": "Ask, before settling, which monitoring rules a settlement would trip. Nothing is "
                                "raised or landed; each check is logged pseudonymized."},
        "paths": {"/v1/precheck": {"post": {
            "operationId": "precheck",
            "summary": "Which rule hits would this settlement raise now?",
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Settlement"}}}},
            "responses": responses,
            "security": [{"apiKey": []}],
        }}},
        "components": {
            "schemas": {"Settlement": settlement_schema(), "Answer": answer, "Hit": hit, "Error": err},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "the caller's API key; or, instead, a TLS client certificate whose subject "
                                          "CN names the caller (mutual TLS: OpenAPI 3.0 has no scheme for it)"},
            },
        },
    }
