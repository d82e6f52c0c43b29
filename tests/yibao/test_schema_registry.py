"""The Schema Registry API over the manifest, over HTTP in process: what Confluent clients rely on.

Subjects and ids come from the manifest; error answers carry Confluent's ``error_code``; the
compatibility answer is the project's BACKWARD gate; the writable mode (for tests of registry
clients) follows Confluent's READWRITE / IMPORT / READONLY rules.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas import Registry
from schemas.registry import canonical_form, value_subject
from yibao.schema_registry import CONTENT_TYPE, SchemaStore, create_app

PREFIX = "j1."
REG = Registry.load()


def call(store: SchemaStore, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    """(status, content type, parsed JSON body) of one request to an app serving ``store``."""

    async def go() -> tuple[int, str, Any]:
        async with TestClient(TestServer(create_app(store))) as client:
            data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
            resp = await client.request(method, path, data=data, headers=headers or {})
            return resp.status, resp.headers["Content-Type"].split(";")[0], json.loads(await resp.text())

    return asyncio.run(go())


def error(store: SchemaStore, method: str, path: str, body: Any = None) -> tuple[int, int]:
    status, _, got = call(store, method, path, body)
    assert set(got) == {"error_code", "message"} and got["message"], got
    return status, got["error_code"]


@pytest.fixture
def ro() -> SchemaStore:
    return SchemaStore.from_manifest(REG, PREFIX)


def alerts_schema() -> dict[str, Any]:
    schema = REG.latest("alerts").schema
    assert isinstance(schema, dict)
    return copy.deepcopy(schema)


def with_field(schema: dict[str, Any], field: dict[str, Any]) -> str:
    out = copy.deepcopy(schema)
    out["fields"].append(field)
    return json.dumps(out)


REQUIRED = {"name": "new_required", "type": "string"}
OPTIONAL = {"name": "new_optional", "type": ["null", "string"], "default": None}


# --- reads -----------------------------------------------------------------------------------------
def test_every_manifest_subject_is_served_as_its_topics_value_subject_with_its_ids(ro: SchemaStore) -> None:
    status, ctype, subjects = call(ro, "GET", "/subjects")
    assert (status, ctype) == (200, CONTENT_TYPE)
    assert subjects == sorted(value_subject(s, PREFIX) for s in REG.subjects())
    for logical in REG.subjects():
        subject = value_subject(logical, PREFIX)
        for sv in REG.versions(logical):
            _, _, got = call(ro, "GET", f"/subjects/{subject}/versions/{sv.version}")
            assert (got["subject"], got["version"], got["id"]) == (subject, sv.version, sv.id)
            assert canonical_form(got["schema"]) == canonical_form(sv.schema)
            _, _, by_id = call(ro, "GET", f"/schemas/ids/{sv.id}")
            assert by_id == {"schema": got["schema"]}  # no "schemaType": Avro, as Confluent answers
            _, _, uses = call(ro, "GET", f"/schemas/ids/{sv.id}/versions")
            assert uses == [{"subject": subject, "version": sv.version}]
            _, _, raw = call(ro, "GET", f"/subjects/{subject}/versions/{sv.version}/schema")
            assert raw == sv.schema
        latest = REG.latest(logical)
        _, _, got = call(ro, "GET", f"/subjects/{subject}/versions/latest")
        assert got["id"] == latest.id
        _, _, versions = call(ro, "GET", f"/subjects/{subject}/versions")
        assert versions == [v.version for v in REG.versions(logical)]


def test_only_the_topics_yibao_writes_avro_to_have_subjects(ro: SchemaStore) -> None:
    _, _, subjects = call(ro, "GET", "/subjects")
    assert {f"{PREFIX}{t}-value" for t in ("settlement", "procurement", "supervision", "deadletter", "alerts")} \
        == set(subjects)


def test_config_mode_and_root_answer_as_confluent_does(ro: SchemaStore) -> None:
    assert call(ro, "GET", "/")[2] == {}
    assert call(ro, "GET", "/config")[2] == {"compatibilityLevel": "BACKWARD"}
    assert call(ro, "GET", f"/config/{PREFIX}alerts-value")[2] == {"compatibilityLevel": "BACKWARD"}
    assert error(ro, "GET", "/config/other-value") == (404, 40408)
    assert call(ro, "GET", "/config/other-value?defaultToGlobal=true")[2] == {"compatibilityLevel": "BACKWARD"}
    assert call(ro, "GET", "/mode")[2] == {"mode": "READONLY"}
    assert call(ro, "GET", "/schemas/types")[2] == ["AVRO"]


def test_plain_json_is_answered_to_a_client_that_accepts_only_it(ro: SchemaStore) -> None:
    assert call(ro, "GET", "/subjects", headers={"Accept": "application/json"})[1] == "application/json"
    assert call(ro, "GET", "/subjects", headers={"Accept": "application/vnd.schemaregistry.v1+json, "
                                                           "application/json"})[1] == CONTENT_TYPE


def test_unknown_ids_subjects_versions_and_routes_get_confluent_error_bodies(ro: SchemaStore) -> None:
    unknown_id = max(sv.id for sv in REG.all_versions()) + 1
    assert error(ro, "GET", f"/schemas/ids/{unknown_id}") == (404, 40403)
    assert error(ro, "GET", f"/schemas/ids/{unknown_id}/versions") == (404, 40403)
    assert error(ro, "GET", "/schemas/ids/x") == (404, 40403)
    assert error(ro, "GET", "/subjects/yibao.settlement-value/versions") == (404, 40401)  # not this prefix
    assert error(ro, "GET", f"/subjects/{PREFIX}alerts-value/versions/99") == (404, 40402)
    for bad in ("0", "abc", "-2", str(2**31)):
        assert error(ro, "GET", f"/subjects/{PREFIX}alerts-value/versions/{bad}") == (422, 42202)
    assert error(ro, "GET", "/no/such/route") == (404, 404)
    assert error(ro, "DELETE", f"/subjects/{PREFIX}alerts-value") == (405, 405)


# --- lookup and compatibility ------------------------------------------------------------------------
def test_lookup_finds_the_version_whatever_the_texts_layout(ro: SchemaStore) -> None:
    schema = alerts_schema()
    reordered = json.dumps(dict(reversed(list(schema.items()))), indent=4)
    status, _, got = call(ro, "POST", f"/subjects/{PREFIX}alerts-value", {"schema": reordered})
    assert status == 200 and got["id"] == REG.latest("alerts").id and got["version"] == REG.latest("alerts").version
    changed = copy.deepcopy(schema)
    changed["fields"][0]["doc"] = "another doc: not the registered schema"
    assert error(ro, "POST", f"/subjects/{PREFIX}alerts-value", {"schema": json.dumps(changed)}) == (404, 40403)
    assert error(ro, "POST", "/subjects/other-value", {"schema": reordered}) == (404, 40401)
    assert error(ro, "POST", f"/subjects/{PREFIX}alerts-value", {"schema": '{"type": "nope"}'}) == (422, 42201)
    assert error(ro, "POST", f"/subjects/{PREFIX}alerts-value", {"no": "schema"}) == (422, 42201)
    assert error(ro, "POST", f"/subjects/{PREFIX}alerts-value", b"{not json") == (400, 400)


def test_compatibility_is_the_projects_backward_gate(ro: SchemaStore) -> None:
    path = f"/compatibility/subjects/{PREFIX}alerts-value/versions/latest"
    required = with_field(alerts_schema(), REQUIRED)
    assert call(ro, "POST", path, {"schema": required})[2] == {"is_compatible": False}
    verbose = call(ro, "POST", path + "?verbose=true", {"schema": required})[2]
    assert verbose["is_compatible"] is False and any("new_required" in m for m in verbose["messages"]), verbose
    assert call(ro, "POST", path, {"schema": with_field(alerts_schema(), OPTIONAL)})[2] == {"is_compatible": True}
    # a union subject: the new field on one of its records
    union = copy.deepcopy(REG.latest("settlement").schema)
    assert isinstance(union, list)
    union[0]["fields"].append(REQUIRED)
    answer = call(ro, "POST", f"/compatibility/subjects/{PREFIX}settlement-value/versions/1?verbose=true",
                  {"schema": json.dumps(union)})[2]
    assert answer["is_compatible"] is False and any("new_required" in m for m in answer["messages"]), answer
    assert error(ro, "POST", f"/compatibility/subjects/{PREFIX}alerts-value/versions/9", {"schema": required}) \
        == (404, 40402)
    assert error(ro, "POST", path, {"schema": "{"}) == (422, 42201)


# --- writes ------------------------------------------------------------------------------------------
def test_read_only_answers_a_schema_it_holds_and_refuses_everything_else(ro: SchemaStore) -> None:
    subject = f"{PREFIX}alerts-value"
    held = json.dumps(alerts_schema())
    assert call(ro, "POST", f"/subjects/{subject}/versions", {"schema": held})[2] == {"id": REG.latest("alerts").id}
    new = with_field(alerts_schema(), OPTIONAL)
    assert error(ro, "POST", f"/subjects/{subject}/versions", {"schema": new}) == (422, 42205)
    assert error(ro, "PUT", "/mode", {"mode": "IMPORT"}) == (422, 42205)
    assert error(ro, "PUT", f"/mode/{subject}", {"mode": "READWRITE"}) == (422, 42205)
    assert error(ro, "DELETE", f"/mode/{subject}") == (422, 42205)
    assert call(ro, "GET", f"/subjects/{subject}/versions")[2] == [1]


def test_writable_registers_compatible_versions_with_new_ids_and_refuses_the_rest() -> None:
    store = SchemaStore.from_manifest(REG, PREFIX, writable=True)
    subject = f"{PREFIX}alerts-value"
    top = max(sv.id for sv in REG.all_versions())
    assert call(store, "GET", "/mode")[2] == {"mode": "READWRITE"}
    status, _, body = call(store, "POST", f"/subjects/{subject}/versions",
                           {"schema": with_field(alerts_schema(), OPTIONAL)})
    assert (status, body) == (200, {"id": top + 1})
    assert call(store, "GET", f"/subjects/{subject}/versions")[2] == [1, 2]
    assert call(store, "GET", f"/subjects/{subject}/versions/latest")[2]["id"] == top + 1
    assert error(store, "POST", f"/subjects/{subject}/versions",
                 {"schema": with_field(alerts_schema(), REQUIRED)}) == (409, 409)
    assert error(store, "POST", "/subjects/new-value/versions", {"schema": '"string"', "id": 500}) == (422, 42205)
    # the same schema under another subject keeps its global id
    same = call(store, "POST", "/subjects/copy-value/versions", {"schema": json.dumps(alerts_schema())})[2]
    assert same == {"id": REG.latest("alerts").id}
    assert call(store, "GET", f"/schemas/ids/{REG.latest('alerts').id}/subjects")[2] == ["copy-value", subject]
    assert error(store, "PUT", "/mode", {"mode": "SOMETIMES"}) == (422, 42204)


def test_import_mode_keeps_the_given_ids_and_versions_and_refuses_conflicts() -> None:
    store = SchemaStore.from_manifest(REG, PREFIX, writable=True, empty=True)
    assert call(store, "GET", "/subjects")[2] == []
    alerts, deadletter = json.dumps(alerts_schema()), json.dumps(REG.latest("deadletter").schema)
    # without IMPORT an explicit id is refused
    assert error(store, "POST", "/subjects/a-value/versions", {"schema": alerts, "id": 4, "version": 1}) \
        == (422, 42205)
    assert call(store, "PUT", "/mode", {"mode": "IMPORT"})[2] == {"mode": "IMPORT"}
    assert call(store, "POST", "/subjects/a-value/versions", {"schema": alerts, "id": 4, "version": 1})[2] \
        == {"id": 4}
    assert call(store, "POST", "/subjects/a-value/versions", {"schema": alerts, "id": 4, "version": 1})[2] \
        == {"id": 4}  # idempotent
    got = call(store, "GET", "/subjects/a-value/versions/1")[2]
    assert (got["id"], got["version"]) == (4, 1)
    assert error(store, "POST", "/subjects/d-value/versions", {"schema": deadletter, "id": 4}) == (422, 42205)
    assert error(store, "POST", "/subjects/a-value/versions", {"schema": alerts, "id": 9}) == (422, 42207)
    assert error(store, "POST", "/subjects/d-value/versions", {"schema": deadletter}) == (422, 42205)
    assert error(store, "POST", "/subjects/a-value/versions", {"schema": deadletter, "id": 5, "version": 1}) \
        == (422, 42205)
    assert call(store, "POST", "/subjects/d-value/versions", {"schema": deadletter, "id": 70, "version": 3})[2] \
        == {"id": 70}
    assert call(store, "GET", "/subjects/d-value/versions")[2] == [3]
    assert call(store, "PUT", "/mode", {"mode": "READWRITE"})[2] == {"mode": "READWRITE"}
    new = call(store, "POST", "/subjects/a-value/versions", {"schema": with_field(alerts_schema(), OPTIONAL)})[2]
    assert new == {"id": 71}  # above every imported id


def test_import_mode_needs_force_where_subjects_hold_schemas() -> None:
    store = SchemaStore.from_manifest(REG, PREFIX, writable=True)
    subject = f"{PREFIX}alerts-value"
    assert error(store, "PUT", "/mode", {"mode": "IMPORT"}) == (422, 42205)
    assert error(store, "PUT", f"/mode/{subject}", {"mode": "IMPORT"}) == (422, 42205)
    assert error(store, "GET", f"/mode/{subject}") == (404, 40409)
    assert call(store, "GET", f"/mode/{subject}?defaultToGlobal=true")[2] == {"mode": "READWRITE"}
    # a subject of its own in IMPORT; the others stay READWRITE
    assert call(store, "PUT", "/mode/fresh-value", {"mode": "IMPORT"})[2] == {"mode": "IMPORT"}
    assert call(store, "GET", "/mode/fresh-value")[2] == {"mode": "IMPORT"}
    assert call(store, "POST", "/subjects/fresh-value/versions", {"schema": '"string"', "id": 900})[2] == {"id": 900}
    assert error(store, "POST", "/subjects/other-value/versions", {"schema": '"int"', "id": 901}) == (422, 42205)
    assert call(store, "PUT", f"/mode/{subject}?force=true", {"mode": "IMPORT"})[2] == {"mode": "IMPORT"}
    assert call(store, "DELETE", f"/mode/{subject}")[2] == {"mode": "IMPORT"}
    assert error(store, "DELETE", f"/mode/{subject}") == (404, 40409)
    assert call(store, "GET", f"/mode/{subject}?defaultToGlobal=true")[2] == {"mode": "READWRITE"}
    assert call(store, "PUT", "/mode", {"mode": "READONLY"})[2] == {"mode": "READONLY"}
    assert error(store, "POST", "/subjects/other-value/versions", {"schema": '"int"'}) == (422, 42205)
