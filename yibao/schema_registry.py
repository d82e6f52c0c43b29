"""A Confluent-compatible Schema Registry API over the manifest (``schemas/registry.json``).

Why: yibao frames every Avro message with a schema id (0x00 | id | body), and the Kafka ecosystem
(confluent-kafka's ``AvroDeserializer``, Kafka Connect, ksqlDB, kafka-ui, ClickHouse's
``AvroConfluent``) resolves ids over this HTTP API. The manifest's ids are global, as Confluent's
are, so they are served unchanged. Subjects follow Confluent's TopicNameStrategy,
``<YIBAO_TOPIC_PREFIX><subject>-value``, for every topic yibao writes Avro to: the source topics
(``settlement``, ``procurement``, ``supervision``), ``deadletter`` and ``alerts``. The re-keyed
stays (``internal.stays-by-*``), the changelogs and the rule base are JSON: no subject.

Interface (``CONTENT_TYPE`` responses; request bodies are read as JSON whatever their type)::

    GET  /                                          {}
    GET  /schemas/ids/{id}[?subject=]               {"schema": "<text>"}  (no "schemaType": Avro only)
    GET  /schemas/ids/{id}/versions                 [{"subject": s, "version": v}]
    GET  /schemas/ids/{id}/subjects                 [s]
    GET  /schemas/types                             ["AVRO"]
    GET  /subjects                                  [s] sorted
    GET  /subjects/{s}/versions                     [v] ascending
    GET  /subjects/{s}/versions/{v|latest|-1}       {"subject", "id", "version", "schema"}
    GET  /subjects/{s}/versions/{v}/schema          the schema itself (its JSON text)
    POST /subjects/{s}              {"schema"}      lookup: the version of s whose schema is the same
                                                    (compared in Avro's parsed form), same body as GET
    POST /subjects/{s}/versions     {"schema", "id"?, "version"?}
                                                    register -> {"id": n}; see modes below
    POST /compatibility/subjects/{s}/versions[/{v|latest}][?verbose=true]  {"schema"}
                                                    {"is_compatible": bool} (+ "messages" if verbose):
                                                    schemas.registry.backward_incompatibilities
    GET  /config, /config/{s}[?defaultToGlobal=true]  {"compatibilityLevel": "BACKWARD"}
    GET  /mode                                      {"mode": "READONLY" | "READWRITE" | "IMPORT"}
    GET  /mode/{s}[?defaultToGlobal=true]           the subject's mode (40409 when it has none)
    PUT  /mode[?force=true], /mode/{s}[?force=true] {"mode": m} -> {"mode": m}   (writable only)
    DELETE /mode/{s}                                the subject follows the global mode again -> {"mode": its
                                                    former mode} (writable only; 40409 when it had none)

Modes. ``yibao registry serve`` is read-only (mode READONLY): the manifest is the only source of
schemas; registering a schema a subject already holds answers its id, anything else is refused
with 42205, as are mode changes. ``--writable`` (for tests: kept in memory, lost on exit) starts
in READWRITE, holding the manifest's subjects (or none with ``--empty``):

* READWRITE: a new schema gets ``max(id) + 1`` (or the id of the same schema under another
  subject) and the next version, after the BACKWARD gate (refused: 409, error_code 409); an
  explicit ``"id"`` is refused (42205, "not in import mode") unless it is the id the subject
  already holds for that schema.
* IMPORT (``PUT /mode`` or ``/mode/{s}``; refused with 42205 while matching subjects hold schemas,
  unless ``?force=true``): ``"id"`` is required (else 42205) and kept; ``"version"`` is kept
  (default: the subject's next); no compatibility check. An id that holds a different schema:
  42205 ("Overwrite new schema with id N is not permitted."); a schema the subject holds under
  another id: 42207; a version the subject holds with another schema: 42205. Re-sending what is
  there answers its id (idempotent).
* READONLY: writes refused with 42205.

Errors are Confluent's bodies, ``{"error_code": c, "message": m}``, with HTTP status ``c // 100``
for the five-digit codes: 40401 subject not found, 40402 version not found, 40403 schema not
found, 40408/40409 no subject-level config/mode, 42201 invalid schema, 42202 invalid version,
42204 invalid mode, 42205 operation not permitted, 42207 id does not match, 409 incompatible
schema, 400 unreadable body, 404/405 no such route/method, 50001 internal error.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from schemas.registry import (
    InvalidSchemaError,
    Registry,
    backward_incompatibilities,
    canonical_form,
    value_subject,
)

log = structlog.get_logger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
DEFAULT_HOST = "127.0.0.1"
#: Confluent's port: clients configured with the defaults find it.
DEFAULT_PORT = 8081
COMPATIBILITY = "BACKWARD"
MODES = ("READWRITE", "READONLY", "IMPORT")
INT32_MAX = 2**31 - 1


class ApiError(Exception):
    """A Confluent error answer: ``error_code`` (its HTTP status is the first three digits)."""

    def __init__(self, error_code: int, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message

    @property
    def status(self) -> int:
        code = self.error_code
        return code // 100 if code >= 10000 else code


def subject_not_found(subject: str) -> ApiError:
    return ApiError(40401, f"Subject '{subject}' not found.")


def version_not_found(version: int) -> ApiError:
    return ApiError(40402, f"Version {version} not found.")


def schema_not_found() -> ApiError:
    return ApiError(40403, "Schema not found")


def invalid_schema(detail: str) -> ApiError:
    return ApiError(42201, f"Invalid schema: {detail}")


@dataclass(frozen=True)
class Version:
    """One version of one subject: the schema text served, and its parsed form for comparisons."""

    subject: str
    version: int
    id: int
    schema: str
    canonical: str

    def body(self) -> dict[str, Any]:
        return {"subject": self.subject, "version": self.version, "id": self.id, "schema": self.schema}


@dataclass
class SchemaStore:
    """Subjects, versions and global ids; read-only unless ``writable`` (then kept in memory)."""

    writable: bool = False
    subjects: dict[str, dict[int, Version]] = field(default_factory=dict)
    schemas: dict[int, str] = field(default_factory=dict)
    _canonical: dict[int, str] = field(default_factory=dict)
    global_mode: str = "READONLY"
    subject_modes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.writable and self.global_mode == "READONLY":
            self.global_mode = "READWRITE"

    @classmethod
    def from_manifest(cls, registry: Registry | None = None, topic_prefix: str = "yibao.", *,
                      writable: bool = False, empty: bool = False) -> SchemaStore:
        """Every version of every manifest subject under its topic's ``-value`` subject, ids kept."""
        store = cls(writable=writable)
        if empty:
            return store
        reg = registry or Registry.load()
        for sv in reg.all_versions():
            text = json.dumps(sv.schema, separators=(",", ":"), ensure_ascii=False)
            store._put(Version(value_subject(sv.subject, topic_prefix), sv.version, sv.id, text,
                               canonical_form(sv.schema)))
        return store

    def _put(self, v: Version) -> None:
        self.subjects.setdefault(v.subject, {})[v.version] = v
        self.schemas[v.id] = v.schema
        self._canonical[v.id] = v.canonical

    # --- reads ---------------------------------------------------------------------------------
    def schema(self, schema_id: int) -> str:
        try:
            return self.schemas[schema_id]
        except KeyError:
            raise schema_not_found() from None

    def uses(self, schema_id: int) -> list[Version]:
        """Every (subject, version) holding ``schema_id``; 40403 when none does."""
        self.schema(schema_id)
        return [v for s in sorted(self.subjects) for v in self.versions(s) if v.id == schema_id]

    def versions(self, subject: str) -> list[Version]:
        held = self.subjects.get(subject)
        if not held:
            raise subject_not_found(subject)
        return [held[n] for n in sorted(held)]

    def version(self, subject: str, version: str) -> Version:
        """``version``: a number, ``latest`` or ``-1`` (42202 for anything else)."""
        n = parse_version(version)
        held = self.versions(subject)
        if n == -1:
            return held[-1]
        for v in held:
            if v.version == n:
                return v
        raise version_not_found(n)

    def lookup(self, subject: str, schema_text: str) -> Version:
        """The version of ``subject`` whose schema is ``schema_text`` in Avro's parsed form."""
        held = self.versions(subject)
        canonical = parse_schema(schema_text)
        for v in held:
            if v.canonical == canonical:
                return v
        raise schema_not_found()

    def incompatibilities(self, subject: str, version: str, schema_text: str) -> list[str]:
        """Why data written with the subject's ``version`` could not be read with ``schema_text``
        (BACKWARD, the project's own gate); empty when it can."""
        target = self.version(subject, version)
        parse_schema(schema_text)
        return backward_incompatibilities(reader=json.loads(schema_text), writer=json.loads(target.schema))

    # --- modes ---------------------------------------------------------------------------------
    def mode(self, subject: str | None = None, *, default_to_global: bool = False) -> str:
        if subject is None:
            return self.global_mode
        if subject in self.subject_modes:
            return self.subject_modes[subject]
        if default_to_global:
            return self.global_mode
        raise ApiError(40409, f"Subject '{subject}' does not have subject-level mode configured")

    def set_mode(self, mode: str, subject: str | None = None, *, force: bool = False) -> str:
        if not self.writable:
            raise ApiError(42205, "Mode changes are not allowed: this registry serves the yibao manifest "
                                  "read-only (`yibao registry serve --writable` keeps one in memory)")
        if mode not in MODES:
            raise ApiError(42204, f"Invalid mode {mode!r}: one of {', '.join(MODES)}")
        current = self.effective_mode(subject) if subject is not None else self.global_mode
        if mode == "IMPORT" and current != "IMPORT" and not force:
            holding = [s for s in self.subjects if subject is None or s == subject]
            if holding:
                raise ApiError(42205, "Cannot import since found existing subjects")
        if subject is None:
            self.global_mode = mode
        else:
            self.subject_modes[subject] = mode
        return mode

    def delete_mode(self, subject: str) -> str:
        if not self.writable:
            raise ApiError(42205, "Mode changes are not allowed: this registry serves the yibao manifest read-only")
        former = self.mode(subject)
        del self.subject_modes[subject]
        return former

    def effective_mode(self, subject: str) -> str:
        return self.subject_modes.get(subject, self.global_mode)

    # --- registration --------------------------------------------------------------------------
    def register(self, subject: str, schema_text: str, schema_id: int | None = None,
                 version: int | None = None) -> int:
        """Register ``schema_text`` under ``subject`` by the rules of its mode; returns its id."""
        canonical = parse_schema(schema_text)
        held = self.subjects.get(subject, {})
        same = next((v for n, v in sorted(held.items()) if v.canonical == canonical), None)
        mode = self.effective_mode(subject) if self.writable else "READONLY"
        if mode == "IMPORT":
            return self._import(subject, schema_text, canonical, same, schema_id, version)
        if same is not None and schema_id in (None, same.id):
            return same.id
        if mode == "READONLY":
            raise ApiError(42205, f"Subject {subject} is in read-only mode")
        if schema_id is not None:
            raise ApiError(42205, f"Subject {subject} is not in import mode")
        if held:
            latest = held[max(held)]
            problems = backward_incompatibilities(reader=json.loads(schema_text), writer=json.loads(latest.schema))
            if problems:
                raise ApiError(409, f"Schema being registered is incompatible with an earlier schema for subject "
                                    f"\"{subject}\", details: {'; '.join(problems)}")
        new_id = next((i for i, c in self._canonical.items() if c == canonical), None)
        if new_id is None:
            new_id = max(self.schemas, default=0) + 1
        self._put(Version(subject, max(held, default=0) + 1, new_id, schema_text, canonical))
        return new_id

    def _import(self, subject: str, schema_text: str, canonical: str, same: Version | None,
                schema_id: int | None, version: int | None) -> int:
        if schema_id is None:
            raise ApiError(42205, f"Subject {subject} is in import mode: a schema id is required")
        if not 1 <= schema_id <= INT32_MAX:
            raise ApiError(42205, f"Schema id {schema_id} is out of range [1, {INT32_MAX}]")
        if schema_id in self._canonical and self._canonical[schema_id] != canonical:
            raise ApiError(42205, f"Overwrite new schema with id {schema_id} is not permitted.")
        held = self.subjects.get(subject, {})
        if same is not None:
            if same.id != schema_id:
                raise ApiError(42207, f"Schema already registered with id {same.id} instead of input id {schema_id}")
            if version in (None, same.version):
                return same.id
        n = version if version is not None else max(held, default=0) + 1
        if not 1 <= n <= INT32_MAX:
            raise ApiError(42202, f"The specified version '{n}' is not a valid version id.")
        if n in held:
            raise ApiError(42205, f"Version {n} of subject {subject} already holds a different schema")
        self._put(Version(subject, n, schema_id, schema_text, canonical))
        return schema_id


def parse_version(text: str) -> int:
    """A version in a path: a number in [1, 2^31-1], or ``latest``/``-1`` (returned as -1)."""
    if text == "latest":
        return -1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n == -1 or 1 <= n <= INT32_MAX:
        return n
    raise ApiError(42202, f"The specified version '{text}' is not a valid version id. Allowed values are "
                          f"between [1, 2^31-1] and the string \"latest\"")


def parse_schema(text: str) -> str:
    """The parsed form of a schema text (42201 when it is no Avro schema)."""
    try:
        return canonical_form(text)
    except InvalidSchemaError as exc:
        raise invalid_schema(str(exc)) from None


# --- HTTP ------------------------------------------------------------------------------------------
STORE: web.AppKey[SchemaStore] = web.AppKey("store", SchemaStore)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _content_type(request: web.Request) -> str:
    """Confluent's type, unless the client accepts plain JSON only."""
    accept = request.headers.get("Accept", "")
    plain = "application/json" in accept and "schemaregistry" not in accept and "*/*" not in accept
    return "application/json" if plain else CONTENT_TYPE


def _json(request: web.Request, body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, ensure_ascii=False), status=status,
                        content_type=_content_type(request))


def _error(request: web.Request, error_code: int, message: str, status: int) -> web.Response:
    return _json(request, {"error_code": error_code, "message": message}, status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as Confluent's error body: clients read ``error_code``, not the status line."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(request, exc.error_code, exc.message, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(request, exc.status, f"HTTP {exc.status} {exc.reason}", exc.status)
    except Exception as exc:
        log.exception("schema registry request failed", path=request.path)
        return _error(request, 50001, f"Error in the backend data store: {type(exc).__name__}", 500)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Unrecognized request body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Unrecognized request body: a JSON object was expected")
    return body


async def _schema_in(request: web.Request) -> tuple[str, dict[str, Any]]:
    """The ``schema`` text of a request body, checked to be an Avro schema without references."""
    body = await _body(request)
    text = body.get("schema")
    if not isinstance(text, str) or not text.strip():
        raise invalid_schema("the body has no \"schema\" string")
    if body.get("schemaType", "AVRO") != "AVRO":
        raise invalid_schema(f"schemaType {body.get('schemaType')!r}: this registry holds Avro schemas only")
    if body.get("references"):
        raise invalid_schema("schema references are not supported")
    parse_schema(text)
    return text, body


def _int_or_none(value: Any, name: str) -> int | None:
    """An optional integer of a register body; -1 and 0 (Confluent's "not given") mean None."""
    if value is None or value in (-1, 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"Unrecognized request body: {name!r} must be an integer")
    return value


def _schema_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise schema_not_found() from None


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() == "true"


async def root(request: web.Request) -> web.Response:
    return _json(request, {})


async def schema_by_id(request: web.Request) -> web.Response:
    return _json(request, {"schema": request.app[STORE].schema(_schema_id(request))})


async def schema_versions(request: web.Request) -> web.Response:
    uses = request.app[STORE].uses(_schema_id(request))
    return _json(request, [{"subject": v.subject, "version": v.version} for v in uses])


async def schema_subjects(request: web.Request) -> web.Response:
    uses = request.app[STORE].uses(_schema_id(request))
    return _json(request, sorted({v.subject for v in uses}))


async def schema_types(request: web.Request) -> web.Response:
    return _json(request, ["AVRO"])


async def subjects(request: web.Request) -> web.Response:
    prefix = request.query.get("subjectPrefix", "")
    return _json(request, sorted(s for s, held in request.app[STORE].subjects.items() if held and s.startswith(prefix)))


async def subject_versions(request: web.Request) -> web.Response:
    return _json(request, [v.version for v in request.app[STORE].versions(request.match_info["subject"])])


async def subject_version(request: web.Request) -> web.Response:
    v = request.app[STORE].version(request.match_info["subject"], request.match_info["version"])
    return _json(request, v.body())


async def subject_version_schema(request: web.Request) -> web.Response:
    v = request.app[STORE].version(request.match_info["subject"], request.match_info["version"])
    return web.Response(text=v.schema, content_type=_content_type(request))


async def lookup(request: web.Request) -> web.Response:
    subject = request.match_info["subject"]
    store = request.app[STORE]
    store.versions(subject)  # 40401 before the body is read, as Confluent answers
    text, _ = await _schema_in(request)
    return _json(request, store.lookup(subject, text).body())


async def register(request: web.Request) -> web.Response:
    text, body = await _schema_in(request)
    schema_id, version = _int_or_none(body.get("id"), "id"), _int_or_none(body.get("version"), "version")
    new_id = request.app[STORE].register(request.match_info["subject"], text, schema_id, version)
    return _json(request, {"id": new_id})


async def compatibility(request: web.Request) -> web.Response:
    text, _ = await _schema_in(request)
    problems = request.app[STORE].incompatibilities(request.match_info["subject"],
                                                    request.match_info.get("version", "latest"), text)
    out: dict[str, Any] = {"is_compatible": not problems}
    if _flag(request, "verbose"):
        out["messages"] = problems
    return _json(request, out)


async def config(request: web.Request) -> web.Response:
    subject = request.match_info.get("subject")
    if subject is not None and subject not in request.app[STORE].subjects and not _flag(request, "defaultToGlobal"):
        raise ApiError(40408, f"Subject '{subject}' does not have subject-level compatibility configured")
    return _json(request, {"compatibilityLevel": COMPATIBILITY})


async def get_mode(request: web.Request) -> web.Response:
    mode = request.app[STORE].mode(request.match_info.get("subject"),
                                   default_to_global=_flag(request, "defaultToGlobal"))
    return _json(request, {"mode": mode})


async def put_mode(request: web.Request) -> web.Response:
    body = await _body(request)
    mode = body.get("mode")
    if not isinstance(mode, str):
        raise ApiError(42204, "Invalid mode: the body has no \"mode\" string")
    set_to = request.app[STORE].set_mode(mode.upper(), request.match_info.get("subject"), force=_flag(request, "force"))
    return _json(request, {"mode": set_to})


async def delete_mode(request: web.Request) -> web.Response:
    return _json(request, {"mode": request.app[STORE].delete_mode(request.match_info["subject"])})


def create_app(store: SchemaStore) -> web.Application:
    """The aiohttp application answering the Schema Registry API from ``store``."""
    app = web.Application(middlewares=[_errors])
    app[STORE] = store
    r = app.router
    r.add_get("/", root)
    r.add_get("/schemas/types", schema_types)
    r.add_get("/schemas/ids/{id}", schema_by_id)
    r.add_get("/schemas/ids/{id}/versions", schema_versions)
    r.add_get("/schemas/ids/{id}/subjects", schema_subjects)
    r.add_get("/subjects", subjects)
    r.add_post("/subjects/{subject}", lookup)
    r.add_get("/subjects/{subject}/versions", subject_versions)
    r.add_post("/subjects/{subject}/versions", register)
    r.add_get("/subjects/{subject}/versions/{version}", subject_version)
    r.add_get("/subjects/{subject}/versions/{version}/schema", subject_version_schema)
    r.add_post("/compatibility/subjects/{subject}/versions", compatibility)
    r.add_post("/compatibility/subjects/{subject}/versions/{version}", compatibility)
    r.add_get("/config", config)
    r.add_get("/config/{subject}", config)
    r.add_get("/mode", get_mode)
    r.add_put("/mode", put_mode)
    r.add_get("/mode/{subject}", get_mode)
    r.add_put("/mode/{subject}", put_mode)
    r.add_delete("/mode/{subject}", delete_mode)
    return app


class RegistryServer:
    """The API on a TCP port inside a running event loop (the demo's, or :func:`serve`'s)."""

    def __init__(self, store: SchemaStore, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.store = store
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> str:
        """Bind and serve; returns the URL (with the port the kernel chose for port 0).

        Raises OSError when the address cannot be bound (``errno.EADDRINUSE``: the port is taken).
        """
        runner = web.AppRunner(create_app(self.store), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def serve(store: SchemaStore, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT (Ctrl-C), then return; ``ready`` is told the URL once bound."""

    async def main() -> None:
        server = RegistryServer(store, host, port)
        url = await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            if ready is not None:
                ready(url)
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await server.stop()

    asyncio.run(main())
