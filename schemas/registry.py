"""Schema registry backed by a committed manifest: stable ids, no server.

Layout under ``schemas/``::

    avsc/<subsystem>/<Record>.avsc     the contracts developers edit
    registry.json                      subject -> record names, versions, ids, fingerprints
    history/<subject>/v<N>.avsc        the exact schema registered as version N

A *subject* is a logical stream (``settlement``, ``procurement``, ``supervision``, ``alerts``,
``deadletter``). Its schema is the union of its records (or the record itself when it has one), so
every message on a topic is framed with that subject's schema id: the Confluent TopicNameStrategy
way of carrying several event types on one topic. Ids are never reused; a new version gets
``max(id) + 1`` and is only accepted when BACKWARD compatible with the previous version (new
readers read old data), checked with the Apache ``avro`` library's checker.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
NAMESPACE = "cn.nhsa.yibao"


class RegistryError(Exception):
    """A schema cannot be found, loaded or registered; the message says which and why."""


class SchemaDriftError(RegistryError):
    """The .avsc files differ from the latest registered version of a subject."""


class IncompatibleSchemaError(RegistryError):
    """A proposed version cannot read data written with the previous one."""


class InvalidSchemaError(RegistryError):
    """A text that is not a valid Avro schema."""


Schema = dict[str, Any] | list[Any]


def fingerprint(schema: Schema) -> str:
    """sha256 of the schema's normalized JSON (docs and defaults included, unlike PCF)."""
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fullname(rec: dict[str, Any]) -> str:
    name = str(rec["name"])
    ns = rec.get("namespace")
    return name if "." in name or not ns else f"{ns}.{name}"


@dataclass(frozen=True)
class SchemaVersion:
    """One registered version of one subject."""

    subject: str
    version: int
    id: int
    schema: Schema
    records: tuple[str, ...]

    @property
    def is_union(self) -> bool:
        return isinstance(self.schema, list)


@dataclass
class Registry:
    """The manifest plus the contracts, loaded from a directory (the package by default)."""

    root: Path = ROOT
    manifest: dict[str, Any] = field(default_factory=dict)
    _by_id: dict[int, SchemaVersion] = field(default_factory=dict)
    _records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path | None = None) -> Registry:
        reg = cls(root=root or ROOT)
        path = reg.root / "registry.json"
        try:
            reg.manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            reg.manifest = {"subjects": {}}
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
        reg._records = reg._load_records()
        for subject, entry in reg.manifest["subjects"].items():
            for v in entry["versions"]:
                snap = reg.root / "history" / subject / f"v{v['version']}.avsc"
                try:
                    schema = json.loads(snap.read_text(encoding="utf-8"))
                except OSError as exc:
                    raise RegistryError(f"{snap}: missing snapshot of {subject} v{v['version']}") from exc
                if fingerprint(schema) != v["fingerprint"]:
                    raise RegistryError(f"{snap}: snapshot was edited; registered versions are immutable")
                sv = SchemaVersion(subject, v["version"], v["id"], schema, tuple(v["records"]))
                if sv.id in reg._by_id:
                    raise RegistryError(f"registry.json: schema id {sv.id} used twice")
                reg._by_id[sv.id] = sv
        return reg

    # --- contracts on disk -----------------------------------------------------------------
    def _load_records(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        for path in sorted((self.root / "avsc").rglob("*.avsc")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise RegistryError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
            if not isinstance(rec, dict) or rec.get("type") != "record":
                raise RegistryError(f"{path}: top level must be an Avro record")
            records[_fullname(rec)] = rec
        return records

    def record_names(self) -> list[str]:
        return sorted(self._records)

    def compose(self, records: list[str] | tuple[str, ...]) -> Schema:
        """The subject schema built from the current .avsc files."""
        missing = [r for r in records if r not in self._records]
        if missing:
            raise RegistryError(f"no .avsc file defines {', '.join(missing)}")
        parts = [copy.deepcopy(self._records[r]) for r in records]
        return parts[0] if len(parts) == 1 else parts

    # --- lookups ---------------------------------------------------------------------------
    def subjects(self) -> list[str]:
        return list(self.manifest["subjects"])

    def by_id(self, schema_id: int) -> SchemaVersion:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise RegistryError(f"unknown schema id {schema_id}") from None

    def latest(self, subject: str) -> SchemaVersion:
        entry = self.manifest["subjects"].get(subject)
        if not entry or not entry["versions"]:
            raise RegistryError(f"unknown subject {subject!r}; known: {', '.join(self.subjects())}")
        return self._by_id[entry["versions"][-1]["id"]]

    def versions(self, subject: str) -> list[SchemaVersion]:
        entry = self.manifest["subjects"].get(subject)
        if not entry:
            raise RegistryError(f"unknown subject {subject!r}")
        return [self._by_id[v["id"]] for v in entry["versions"]]

    def by_subject(self, subject: str, topic_prefix: str = "yibao.", version: int | None = None) -> SchemaVersion:
        """Look up by Confluent TopicNameStrategy subject, e.g. ``yibao.settlement-value``."""
        if not subject.endswith("-value"):
            raise RegistryError(f"{subject!r}: only value subjects (<topic>-value) are registered")
        topic = subject[: -len("-value")]
        if not topic.startswith(topic_prefix):
            raise RegistryError(f"{subject!r}: topic does not start with the prefix {topic_prefix!r}")
        logical = topic[len(topic_prefix) :]
        if version is None:
            return self.latest(logical)
        for sv in self.versions(logical):
            if sv.version == version:
                return sv
        raise RegistryError(f"{subject!r} has no version {version}")

    def all_versions(self) -> Iterator[SchemaVersion]:
        yield from sorted(self._by_id.values(), key=lambda s: s.id)

    # --- drift and registration -----------------------------------------------------------
    def drift(self) -> list[str]:
        """Subjects whose current .avsc composition differs from their latest version."""
        out = []
        for subject, entry in self.manifest["subjects"].items():
            current = self.compose(entry["records"])
            if fingerprint(current) != entry["versions"][-1]["fingerprint"]:
                out.append(subject)
        return out

    def register(self, subject: str, records: list[str] | None = None) -> SchemaVersion | None:
        """Register the current contracts of ``subject`` as a new version if they changed.

        Returns the new version, or None when nothing changed. Raises IncompatibleSchemaError
        (listing every incompatibility) when old data could not be read with the new schema.
        """
        entry = self.manifest["subjects"].get(subject)
        recs = records or (entry["records"] if entry else None)
        if not recs:
            raise RegistryError(f"new subject {subject!r} needs its record names")
        schema = self.compose(recs)
        fp = fingerprint(schema)
        if entry and entry["versions"][-1]["fingerprint"] == fp and list(recs) == entry["records"]:
            return None
        if entry:
            prev = self.latest(subject)
            problems = backward_incompatibilities(reader=schema, writer=prev.schema)
            if problems:
                raise IncompatibleSchemaError(
                    f"{subject}: not BACKWARD compatible with v{prev.version} (id {prev.id}):\n  "
                    + "\n  ".join(problems)
                )
        new_id = max(self._by_id, default=0) + 1
        version = (entry["versions"][-1]["version"] + 1) if entry else 1
        sv = SchemaVersion(subject, version, new_id, schema, tuple(recs))
        snap = self.root / "history" / subject / f"v{version}.avsc"
        snap.parent.mkdir(parents=True, exist_ok=True)
        snap.write_text(json.dumps(schema, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        entry = entry or {"records": list(recs), "versions": []}
        entry["records"] = list(recs)
        entry["versions"].append(
            {"version": version, "id": new_id, "fingerprint": fp, "records": list(recs)}
        )
        self.manifest["subjects"][subject] = entry
        self._by_id[new_id] = sv
        (self.root / "registry.json").write_text(
            json.dumps(self.manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        return sv


def value_subject(subject: str, topic_prefix: str = "yibao.") -> str:
    """The Confluent TopicNameStrategy subject of a manifest subject's topic: ``yibao.settlement-value``.

    The inverse of :meth:`Registry.by_subject`; Schema Registry clients look schemas up by this name.
    """
    return f"{topic_prefix}{subject}-value"


def canonical_form(schema: Schema | str) -> str:
    """The schema as Avro parses it, as sorted compact JSON; raises InvalidSchemaError.

    Two texts that say the same (key order, whitespace, a name given short or full) have one form,
    so a schema sent back by a client is recognised; docs and defaults count, unlike Avro's Parsing
    Canonical Form, because a registry must not call a changed default the same schema.
    """
    import avro.errors
    import avro.schema

    try:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        parsed = avro.schema.parse(text)
    except (avro.errors.AvroException, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise InvalidSchemaError(f"not a valid Avro schema: {exc}") from None
    return json.dumps(parsed.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def backward_incompatibilities(reader: Schema, writer: Schema) -> list[str]:
    """Why data written with ``writer`` cannot be read with ``reader`` (empty when it can).

    For a union subject the checker's own message only says a branch is lacking, so each writer
    record is also checked against the reader record of the same name, to name the field.
    """
    problems = _check(reader, writer)
    if problems and isinstance(reader, list) and isinstance(writer, list):
        by_name = {_fullname(r): r for r in reader if isinstance(r, dict)}
        detail: list[str] = []
        for w in writer:
            if not isinstance(w, dict):
                continue
            r = by_name.get(_fullname(w))
            if r is None:
                detail.append(f"{_fullname(w)}: removed from the union")
            else:
                detail.extend(f"{_fullname(w)}{p}" for p in _check(r, w))
        return detail or problems
    return problems


def _check(reader: Schema, writer: Schema) -> list[str]:
    import avro.compatibility as compat
    import avro.schema

    r = avro.schema.parse(json.dumps(reader))
    w = avro.schema.parse(json.dumps(writer))
    result = compat.ReaderWriterCompatibilityChecker().get_compatibility(r, w)  # type: ignore[no-untyped-call]
    if result.compatibility is compat.SchemaCompatibilityType.compatible:
        return []
    return [
        f"{loc or '/'}: {msg}"
        for msg, loc in zip(result.messages, result.locations, strict=False)
    ] or ["incompatible"]
