"""A small client of the Confluent Schema Registry REST API (Confluent, Karapace, Apicurio's ccompat API).

Why a client of our own: the worker needs one call (a schema by id, once per id it has not seen),
and ``yibao schemas register`` a handful (versions, mode, registration with an explicit id in IMPORT
mode) that the general clients either lack (IMPORT registration keeping an id) or bring with a
native library. It speaks HTTP(S) with the standard library, so the schemas layer stays light.

It takes a :class:`RegistryClientConfig` and reads no environment (``yibao.settings`` builds the
config). Every failure is a :class:`RegistryClientError` (a ``RegistryError``, so the CLI prints it
as one line): :class:`RegistryUnavailable` when the registry cannot answer (connection, timeout,
TLS, 5xx) and :class:`RegistryRequestError` when it refused the request (a Confluent error body,
``{"error_code": 40403, "message": "Schema not found"}``).
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .codec import ResolveError, Resolver
from .registry import Registry, RegistryError, Schema, SchemaVersion

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
ACCEPT = f"{CONTENT_TYPE}, application/vnd.schemaregistry+json; q=0.9, application/json; q=0.5"

# Confluent's error codes that the callers here tell apart
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403
SUBJECT_MODE_NOT_CONFIGURED = 40409


@dataclass(frozen=True)
class RegistryClientConfig:
    """Where the registry is and how to authenticate to it.

    ``url`` may carry ``user:password@`` (as Confluent's clients accept); ``username``/``password``
    win over it. TLS: ``ca_file`` to trust a private CA, ``cert_file``/``key_file`` for a client
    certificate (mutual TLS).
    """

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_s: float = 5.0


class RegistryClientError(RegistryError):
    """A registry call that did not give an answer the caller can use."""

    def __init__(self, message: str, *, status: int | None = None, error_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class RegistryUnavailable(RegistryClientError):
    """The registry could not be reached or failed on its side (connection, timeout, TLS, HTTP 5xx)."""


class RegistryRequestError(RegistryClientError):
    """The registry refused the request (HTTP 4xx): ``error_code`` and the message are the registry's."""


@dataclass(frozen=True)
class RemoteSchema:
    """A schema as the registry holds it under a global id."""

    id: int
    schema_type: str
    #: the parsed JSON of an Avro schema; the raw text for other schema types
    schema: Schema | str
    text: str
    references: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class RemoteVersion:
    """One version of one subject."""

    subject: str
    version: int
    id: int
    schema: Schema | str
    text: str


class SchemaRegistryClient:
    """Blocking calls with a timeout each; safe to share between threads (it keeps no connection)."""

    def __init__(self, config: RegistryClientConfig) -> None:
        self.config = config
        parts = urllib.parse.urlsplit(config.url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryClientError(f"schema registry URL {config.url!r} is not http(s)://host[:port][/path]")
        user = config.username if config.username is not None else urllib.parse.unquote(parts.username or "")
        password = config.password if config.password is not None else urllib.parse.unquote(parts.password or "")
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        #: the URL without credentials: what messages show
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._auth = ("Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")) if user else None
        self._ssl = _ssl_context(config) if parts.scheme == "https" else None

    def ping(self) -> str:
        """``GET /config``, the global compatibility level: proves the URL, the credentials and TLS work,
        on any registry and whatever it holds."""
        body = self._call("GET", "/config")
        return str(body.get("compatibilityLevel") or body.get("compatibility") or "")

    # --- schemas ----------------------------------------------------------------------------------
    def schema_by_id(self, schema_id: int) -> RemoteSchema:
        """``GET /schemas/ids/{id}``; a missing id is a RegistryRequestError with error_code 40403."""
        body = self._call("GET", f"/schemas/ids/{int(schema_id)}")
        text = str(body.get("schema", ""))
        schema_type = str(body.get("schemaType") or "AVRO")
        return RemoteSchema(int(schema_id), schema_type, _parse(text) if schema_type == "AVRO" else text, text,
                            tuple(body.get("references") or ()))

    # --- subjects ---------------------------------------------------------------------------------
    def subject_versions(self, subject: str) -> list[int]:
        """``GET /subjects/{s}/versions``: the subject's version numbers, [] for a subject it does not hold."""
        try:
            out = self._call("GET", f"/subjects/{_q(subject)}/versions")
        except RegistryRequestError as exc:
            if exc.error_code == SUBJECT_NOT_FOUND or (exc.status == 404 and exc.error_code is None):
                return []
            raise
        return [int(v) for v in out]

    def subject_version(self, subject: str, version: int) -> RemoteVersion | None:
        """``GET /subjects/{s}/versions/{v}``; None when the subject or that version does not exist."""
        try:
            body = self._call("GET", f"/subjects/{_q(subject)}/versions/{int(version)}")
        except RegistryRequestError as exc:
            if exc.error_code in (SUBJECT_NOT_FOUND, VERSION_NOT_FOUND):
                return None
            raise
        text = str(body.get("schema", ""))
        typ = str(body.get("schemaType") or "AVRO")
        return RemoteVersion(subject, int(body["version"]), int(body["id"]),
                             _parse(text) if typ == "AVRO" else text, text)

    def register(self, subject: str, schema: Schema, *, schema_id: int | None = None,
                 version: int | None = None) -> int:
        """``POST /subjects/{s}/versions``; with ``schema_id`` (and ``version``) only in IMPORT mode.

        Returns the id the registry answered: a registry that ignores an explicit id (Karapace does)
        answers another one, which the caller must check.
        """
        payload: dict[str, Any] = {"schema": json.dumps(schema, separators=(",", ":"), ensure_ascii=False)}
        if schema_id is not None:
            payload["id"] = int(schema_id)
        if version is not None:
            payload["version"] = int(version)
        body = self._call("POST", f"/subjects/{_q(subject)}/versions", payload)
        return int(body["id"])

    # --- modes ------------------------------------------------------------------------------------
    def mode(self, subject: str | None = None) -> str | None:
        """``GET /mode`` or ``/mode/{s}``: the mode, or None when the subject has no mode of its own."""
        try:
            body = self._call("GET", "/mode" if subject is None else f"/mode/{_q(subject)}")
        except RegistryRequestError as exc:
            if subject is not None and exc.error_code in (SUBJECT_MODE_NOT_CONFIGURED, SUBJECT_NOT_FOUND):
                return None
            raise
        return str(body["mode"])

    def set_mode(self, mode: str, subject: str | None = None, *, force: bool = False) -> str:
        """``PUT /mode[/{s}]``; ``force`` lets IMPORT be set where schemas already exist (Confluent 7+)."""
        path = "/mode" if subject is None else f"/mode/{_q(subject)}"
        body = self._call("PUT", path + ("?force=true" if force else ""), {"mode": mode})
        return str(body.get("mode", mode))

    def delete_mode(self, subject: str) -> None:
        """``DELETE /mode/{s}``: the subject follows the global mode again."""
        self._call("DELETE", f"/mode/{_q(subject)}")

    # --- transport --------------------------------------------------------------------------------
    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Accept", ACCEPT)
        if data is not None:
            req.add_header("Content-Type", CONTENT_TYPE)
        if self._auth:
            req.add_header("Authorization", self._auth)
        where = f"schema registry at {self.base}"
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s, context=self._ssl) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(where, method, path, exc) from None
        except urllib.error.URLError as exc:
            raise RegistryUnavailable(f"{where} cannot be reached: {_reason(exc.reason)}") from None
        except (TimeoutError, OSError) as exc:
            raise RegistryUnavailable(f"{where} cannot be reached: {_reason(exc)}") from None
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise RegistryUnavailable(f"{where} answered {method} {path} with something that is not JSON: "
                                      f"{raw[:120]!r}") from None


def _q(subject: str) -> str:
    return urllib.parse.quote(subject, safe="")


def _parse(text: str) -> Schema:
    try:
        out: Schema = json.loads(text)
    except ValueError as exc:
        raise RegistryClientError(f"the registry sent an Avro schema that is not JSON: {exc}") from None
    if isinstance(out, str):  # a primitive schema, "string", given as a JSON string
        return {"type": out}
    return out


def _ssl_context(config: RegistryClientConfig) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        if config.cert_file:
            ctx.load_cert_chain(str(config.cert_file), str(config.key_file) if config.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise RegistryClientError(f"schema registry TLS files: {_reason(exc)}") from None
    return ctx


def _reason(exc: object) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _http_error(where: str, method: str, path: str, exc: urllib.error.HTTPError) -> RegistryClientError:
    """A Confluent error body (``error_code``, ``message``) as a typed exception."""
    try:
        raw = exc.read()
    except OSError:
        raw = b""
    code: int | None = None
    message = ""
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            code = int(body["error_code"]) if body.get("error_code") is not None else None
            message = str(body.get("message") or "")
        elif isinstance(body, str):
            message = body
    except (ValueError, TypeError):
        message = raw[:200].decode("utf-8", "replace").strip()
    message = message or exc.reason or f"HTTP {exc.code}"
    said = f"{where} answered {method} {path} with HTTP {exc.code}" + (f" (error {code})" if code else "")
    if exc.code in (401, 403):
        return RegistryRequestError(f"{said}: {message}; check the registry username and password",
                                    status=exc.code, error_code=code)
    cls = RegistryUnavailable if exc.code >= 500 else RegistryRequestError
    return cls(f"{said}: {message}", status=exc.code, error_code=code)


def schema_resolver(client: SchemaRegistryClient) -> Resolver:
    """The codec's hook (:class:`schemas.codec.Codec` ``resolver``) over ``GET /schemas/ids/{id}``.

    Maps what the registry says to dead-letter reasons: an id it does not hold stays
    ``UNKNOWN_SCHEMA_ID``; no answer (or a refusal such as bad credentials) is
    ``REGISTRY_UNAVAILABLE`` (asked again later); a schema the pipeline cannot use whatever happens
    (not Avro, or built from references) is ``INCOMPATIBLE_SCHEMA``, for good.
    """

    def resolve(schema_id: int) -> Schema:
        try:
            remote = client.schema_by_id(schema_id)
        except RegistryRequestError as exc:
            if exc.error_code == SCHEMA_NOT_FOUND or (exc.status == 404 and exc.error_code is None):
                raise ResolveError("UNKNOWN_SCHEMA_ID", f"schema id {schema_id} is neither in the manifest nor in "
                                   f"the schema registry at {client.base}") from None
            raise ResolveError("REGISTRY_UNAVAILABLE", str(exc), outage=True) from None
        except RegistryClientError as exc:
            raise ResolveError("REGISTRY_UNAVAILABLE", str(exc), outage=True) from None
        if remote.schema_type != "AVRO":
            raise ResolveError("INCOMPATIBLE_SCHEMA", f"schema id {schema_id} is a {remote.schema_type} schema; "
                               "the pipeline reads Avro", permanent=True)
        if remote.references:
            raise ResolveError("INCOMPATIBLE_SCHEMA", f"schema id {schema_id} is built from schema references, "
                               "which the pipeline does not resolve", permanent=True)
        assert not isinstance(remote.schema, str)
        return remote.schema

    return resolve


# --- publishing the manifest ------------------------------------------------------------------------
class RegistryConflict(RegistryClientError):
    """The registry holds something that contradicts the manifest (an id or version taken by another
    schema), or cannot keep the manifest's ids; ``hint`` says what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Published:
    """One manifest version in the registry: ``registered`` now, or ``already`` there."""

    subject: str
    version: int
    id: int
    registered: bool


def _same(text: str, schema: Schema) -> bool:
    from .registry import InvalidSchemaError, canonical_form

    try:
        return canonical_form(text) == canonical_form(schema)
    except InvalidSchemaError:
        return False


def _holder(client: SchemaRegistryClient, schema_id: int) -> RemoteSchema | None:
    try:
        return client.schema_by_id(schema_id)
    except RegistryRequestError as exc:
        if exc.error_code != SCHEMA_NOT_FOUND and exc.status != 404:
            raise
        return None


def conflicting_ids(client: SchemaRegistryClient, registry: Registry) -> list[SchemaVersion]:
    """The manifest versions whose id the registry gives to another schema: events framed with those
    ids by other producers would be read with yibao's schema, so a worker must not use that registry."""
    out = []
    for sv in registry.all_versions():
        holder = _holder(client, sv.id)
        if holder is not None and (holder.schema_type != "AVRO" or not _same(holder.text, sv.schema)):
            out.append(sv)
    return out


def publish_manifest(client: SchemaRegistryClient, registry: Registry, topic_prefix: str) -> list[Published]:
    """Put every version of every manifest subject in the registry under ``<topic>-value``, keeping its
    id and version number, so that the ids already framed in yibao's topics mean the same there.

    Everything is checked before anything is written: an id the registry gives to another schema,
    a version number it holds with another id, or the same schema under another id stops the run
    with nothing changed. Then each subject that needs writes is put in IMPORT mode (the only mode
    in which a registry accepts an explicit id), the versions are registered, and the subject's
    previous mode is restored, also on failure. A registry that cannot set a subject's mode is put
    in IMPORT mode as a whole for the writes (then restored). Re-running changes nothing.
    """
    from .registry import value_subject

    same = _same
    out: list[Published] = []
    todo: dict[str, list[SchemaVersion]] = {}
    held_by_subject: dict[str, list[RemoteVersion]] = {}
    for sv in registry.all_versions():
        subject = value_subject(sv.subject, topic_prefix)
        holder = _holder(client, sv.id)
        if holder is not None and (holder.schema_type != "AVRO" or not same(holder.text, sv.schema)):
            raise RegistryConflict(
                f"schema id {sv.id} is taken in the schema registry at {client.base} by another schema; "
                f"yibao frames {subject} v{sv.version} with that id",
                "yibao's ids cannot change (its topics already carry them): publish to a registry where ids "
                f"{', '.join(str(v.id) for v in registry.all_versions())} are free or hold yibao's schemas")
        if subject not in held_by_subject:
            held_by_subject[subject] = [v for n in client.subject_versions(subject)
                                        if (v := client.subject_version(subject, n)) is not None]
        held = held_by_subject[subject]
        at = next((v for v in held if v.version == sv.version), None)
        if at is not None and at.id == sv.id:
            out.append(Published(subject, sv.version, sv.id, registered=False))
            continue
        if at is not None:
            raise RegistryConflict(
                f"{subject} version {sv.version} in the schema registry at {client.base} holds schema id {at.id}, "
                f"not yibao's {sv.id}",
                "the subject was registered by someone else; delete it there (or publish with another "
                "YIBAO_TOPIC_PREFIX) so that yibao's versions can be imported")
        twin = next((v for v in held if v.id != sv.id and same(v.text, sv.schema)), None)
        if twin is not None:
            raise RegistryConflict(
                f"{subject} in the schema registry at {client.base} holds yibao's v{sv.version} schema as version "
                f"{twin.version} under schema id {twin.id}, not {sv.id}",
                "the subject was registered by someone else; delete it there so that yibao's ids can be imported")
        todo.setdefault(subject, []).append(sv)
    if not todo:
        return out
    with _ImportMode(client, list(todo)):
        for subject, versions in todo.items():
            for sv in versions:
                got = client.register(subject, sv.schema, schema_id=sv.id, version=sv.version)
                if got != sv.id:
                    raise RegistryConflict(
                        f"the schema registry at {client.base} registered {subject} v{sv.version} under schema id "
                        f"{got}, not {sv.id}: it does not keep explicit ids",
                        f"use a registry with IMPORT mode (Confluent 7+, or `yibao registry serve`); remove {subject} "
                        "there before trying again")
                out.append(Published(subject, sv.version, sv.id, registered=True))
    return sorted(out, key=lambda p: p.id)


class _ImportMode:
    """IMPORT mode on ``subjects`` (or the whole registry when it has no subject modes), restored on exit."""

    def __init__(self, client: SchemaRegistryClient, subjects: list[str]) -> None:
        self.client = client
        self.subjects = subjects
        self.restore: list[tuple[str | None, str | None]] = []

    def __enter__(self) -> None:
        c = self.client
        try:
            for s in self.subjects:
                before = c.mode(s)
                c.set_mode("IMPORT", s, force=True)
                self.restore.append((s, before))
        except RegistryClientError as exc:
            first = not self.restore
            self._undo()
            if not (first and exc.status in (404, 405) and exc.error_code is None):
                raise _no_import(c, exc) from None
            try:  # no subject-level modes: the registry as a whole, for as short as the writes take
                before = c.mode()
                c.set_mode("IMPORT", force=True)
                self.restore = [(None, before)]
            except RegistryClientError as exc2:
                raise _no_import(c, exc2) from None

    def __exit__(self, *exc: object) -> None:
        self._undo()

    def _undo(self) -> None:
        c = self.client
        while self.restore:
            subject, before = self.restore.pop()
            try:
                if subject is not None and before is None:
                    try:
                        c.delete_mode(subject)
                    except RegistryRequestError:  # no DELETE /mode/{s}: pin the mode the subject followed
                        c.set_mode(c.mode() or "READWRITE", subject)
                else:
                    c.set_mode(before or "READWRITE", subject)
            except RegistryClientError as exc:
                raise RegistryClientError(
                    f"{exc}; restore the mode of {subject or 'the registry'} to {before or 'the global mode'} "
                    "by hand") from None


def _no_import(client: SchemaRegistryClient, exc: RegistryClientError) -> RegistryConflict:
    return RegistryConflict(
        f"the schema registry at {client.base} cannot be put in IMPORT mode, so it cannot keep yibao's schema ids "
        f"({exc})",
        "use a registry with IMPORT mode (Confluent 7+, or `yibao registry serve --writable`; Karapace has none), "
        "or give yibao's user the right to change modes")
