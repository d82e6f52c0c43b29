"""Versioned DDL: apply ``sinks/ddl/NNNN_<name>.sql`` in order, then (re)build the staging tables.

Migration files
---------------
Statements end with ``;`` at the end of a line. Placeholders: ``{db}``, ``{on_cluster}`` ('' or
`` ON CLUSTER name``), ``{lc}`` (``LowCardinality(String)``, or ``String`` on 18.16), ``{all}``
(``_all`` in cluster mode, else ''; ``{db}.T{all}`` names what reads every shard's ``T``, like
:meth:`sinks.base.Backend.read_table`) and ``{cluster}`` (the cluster name, for a
``Distributed`` engine). A comment line ``-- min_version: 22.8`` right before a statement skips
that statement on older engines: the shared DDL stays within what 18.16 accepts and modern-only
features are opt-in. A comment line ``-- cluster_only`` right before a statement skips it unless
``migrate`` runs in cluster mode (the ``Distributed`` tables over tables a migration creates).
A skipped statement is not retried after an upgrade (the file counts as applied); write a new
migration for that. Every file is recorded in ``schema_migrations`` with the sha256 of its text,
and an applied file that has since changed is refused: edit nothing that ran, add a new file.
Use ``IF NOT EXISTS`` everywhere (``DROP ... IF EXISTS`` to replace a view) so that a run
interrupted half-way can simply be repeated (18.16 has no ``ADD COLUMN IF NOT EXISTS``, so an
ALTER there is the one exception).

Staging tables
--------------
For every raw table ``T`` in :data:`sinks.tables.TABLES`, ``migrate`` derives from ``T``'s
*actual* columns a staging table ``T_in`` (``ENGINE = Null``, raw types: see
:func:`sinks.tables.raw_type`) and a materialized view ``T_in_mv TO T`` that converts exactly:
``toDecimal64(x, 0) * toDecimal64('0.01', 2)`` multiplies the unscaled integer by one unit of
the last place, which is exact for every scale and for values near 10^16 (the tempting
``toDecimal64(x, 6) / 1000000`` overflows there: ``x`` is first scaled up to 10^22), and a
CAST via Float would lose cents. Dates and datetimes are ``CAST`` from their day/second
numbers. Columns with a ``DEFAULT`` are not in ``T_in`` and the view computes their default
(18.16 insists that a view supplies every column of its target). The generated SQL's sha256 is
stored in ``schema_staging``; whenever it changes (a migration altered ``T``, or this
generator changed) the pair is rebuilt. Migrations therefore only ever describe real tables.
The pairs are brought up to date before each pending migration too, so that a migration may hang
its own materialized views on ``T_in`` (18.16 does not cascade a view on ``T`` from ``T_in_mv``);
dropping and re-creating ``T_in`` later leaves such views attached (both engines resolve a
view's source by name).

Cluster mode
------------
With ``cluster`` (``YIBAO_CH_CLUSTER``, a cluster of the servers' ``remote_servers``), every
statement runs ``ON CLUSTER`` (ClickHouse's distributed DDL: the servers need ZooKeeper or
ClickHouse Keeper and ``<distributed_ddl>``), so each shard gets the same local tables ``T``,
staging twins ``T_in`` and views ``T_in_mv``; a shard converts and stores only its own rows.
On top of them, on every node: ``T_all``, a Distributed table over the shards' ``T`` (what
readers query, :meth:`sinks.base.Backend.read_table`), and ``T_in_all``, a Distributed table
over the shards' ``T_in`` with the table's :attr:`~sinks.tables.TableSpec.shard_key` (where the
server backend inserts). Both are part of the staging fingerprint, so they are rebuilt with the
staging pair whenever ``T`` changes. The bookkeeping rows are written on the node ``migrate``
talks to, but read from all of them (``cluster()`` table function), so the next run may talk
to any node.

Run ``migrate`` once per deployment, from one process, with the workers stopped: ClickHouse
has no transactional DDL, so concurrent runs can record a file twice, and an insert that
arrives while ``T_in_mv`` is being rebuilt can be lost (the rebuild drops ``T_in`` first so that
such inserts fail loudly instead, which leaves only the instant between creating ``T_in`` and
its view).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .base import DISTRIBUTED_SUFFIX, STAGING_SUFFIX, Backend, SinkError, check_identifier, literal
from .tables import DT, LC, TABLES, decimal_scale, low_cardinality_supported, raw_type, unwrap_nullable

DDL_DIR = Path(__file__).resolve().parent / "ddl"
MIGRATIONS_TABLE = "schema_migrations"
STAGING_TABLE = "schema_staging"
MV_SUFFIX = "_mv"
#: How the one line :func:`migrate` returns when it had nothing to do starts.
NOTHING_TO_DO = "nothing to do: "
# Part of every staging fingerprint: bump it when the SQL generated below changes, so that
# every deployment rebuilds its staging tables on the next migrate().
STAGING_GENERATOR = "2"

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_STATEMENT_END = re.compile(r";[ \t]*$", re.M)
_MIN_VERSION = re.compile(r"^\s*--\s*min_version:\s*([\d.]+)\s*$", re.M)
_CLUSTER_ONLY = re.compile(r"^\s*--\s*cluster_only\s*$", re.M)
_PLACEHOLDER = re.compile(r"\{(db|on_cluster|lc|all|cluster)\}")


class MigrationError(SinkError):
    """A migration cannot be applied; the message names the file and what to do."""


@dataclass(frozen=True)
class Statement:
    sql: str
    min_version: tuple[int, ...] | None = None
    cluster_only: bool = False


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    checksum: str

    @property
    def file(self) -> str:
        return self.path.name

    def statements(self) -> list[Statement]:
        return split_statements(self.path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str
    default_kind: str = ""
    default_expression: str = ""


def load_migrations(ddl_dir: Path = DDL_DIR) -> list[Migration]:
    """The migration files of ``ddl_dir`` in version order; refuses odd names and duplicates."""
    migrations: dict[int, Migration] = {}
    for path in sorted(ddl_dir.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files must be named NNNN_lowercase_name.sql")
        version = int(match.group(1))
        if version in migrations:
            raise MigrationError(f"{path.name} and {migrations[version].file} share version {version:04d}")
        checksum = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        migrations[version] = Migration(version, match.group(2), path, checksum)
    return [migrations[v] for v in sorted(migrations)]


def split_statements(text: str) -> list[Statement]:
    """Split a migration file into statements (``;`` at end of line), reading the gates."""
    statements = []
    for chunk in _STATEMENT_END.split(text):
        body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
        if not body:
            continue
        gate = _MIN_VERSION.search(chunk)
        min_version = tuple(int(p) for p in gate.group(1).split(".")) if gate else None
        statements.append(Statement(body, min_version, _CLUSTER_ONLY.search(chunk) is not None))
    return statements


def render(sql: str, db: str, on_cluster: str, lc: str, cluster: str = "") -> str:
    values = {
        "db": db,
        "on_cluster": on_cluster,
        "lc": lc,
        "all": DISTRIBUTED_SUFFIX if cluster else "",
        "cluster": cluster,
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], sql)


def migrate(
    backend: Backend,
    cluster: str | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    ddl_dir: Path | None = None,
) -> list[str]:
    """Bring ``backend.database`` up to date; return what was done, one line per action.

    Creates the database and the bookkeeping tables, applies pending migration files in order,
    then rebuilds the staging pair of every raw table whose columns changed. Safe to repeat: a
    run with nothing to do changes nothing and returns a single line saying so (starting with
    :data:`NOTHING_TO_DO`). ``progress`` is called with each action as it happens (for a CLI or a
    log), never with that line: a caller that saw no call knows the database was up to date.
    ``ddl_dir`` is for tests.
    """
    if cluster is None:
        cluster = backend.cluster
    elif backend.cluster is not None and backend.cluster != cluster:
        raise MigrationError(
            f"migrate(cluster={cluster!r}) on a backend for cluster {backend.cluster!r}: use one cluster name"
        )
    if cluster is not None:
        check_identifier(cluster, "cluster name")
        if backend.name == "embedded":
            raise MigrationError("ON CLUSTER makes no sense for the embedded chDB backend")
    run = _Run(backend, cluster, progress)
    return run.all(load_migrations(ddl_dir or DDL_DIR))


class _Run:
    """One migrate() call: the backend, the SQL dialect chosen for it, and the action log."""

    def __init__(self, backend: Backend, cluster: str | None, progress: Callable[[str], None] | None) -> None:
        self.backend = backend
        self.db = backend.database
        self.cluster = cluster
        self.on_cluster = f" ON CLUSTER {cluster}" if cluster else ""
        self.version = backend.version()
        self.lc = LC if low_cardinality_supported(self.version) else "String"
        self.progress = progress
        self.actions: list[str] = []

    def note(self, message: str) -> None:
        self.actions.append(message)
        if self.progress is not None:
            self.progress(message)

    def all(self, migrations: list[Migration]) -> list[str]:
        self.bookkeeping()
        applied = self.applied()
        self.verify(migrations, applied)
        for migration in migrations:
            if migration.version not in applied:
                # a migration may build on T_in (views feeding aggregates): it must exist and be current
                self.staging(TABLES)
                self.apply(migration)
        rebuilt = self.staging(TABLES)
        if not self.actions:
            latest = migrations[-1].file if migrations else "none"
            return [
                f"{NOTHING_TO_DO}{self.db} is at {latest} ({len(applied)} migrations applied) and the "
                f"staging tables of {rebuilt} raw tables are current"
            ]
        return self.actions

    def bookkeeping(self) -> None:
        exists = self.backend.query(f"SELECT count() FROM system.databases WHERE name = {literal(self.db)}")
        if not exists.scalar():
            self.backend.execute(f"CREATE DATABASE IF NOT EXISTS {self.db}{self.on_cluster}")
            self.note(f"created database {self.db}")
        tables = self.existing_tables()
        if MIGRATIONS_TABLE not in tables:
            self.backend.execute(
                f"CREATE TABLE IF NOT EXISTS {self.db}.{MIGRATIONS_TABLE}{self.on_cluster} "
                f"(version UInt32, name String, checksum String, applied_at {DT}) "
                "ENGINE = MergeTree() ORDER BY version"
            )
            self.note(f"created {self.db}.{MIGRATIONS_TABLE}")
        if STAGING_TABLE not in tables:
            self.backend.execute(
                f"CREATE TABLE IF NOT EXISTS {self.db}.{STAGING_TABLE}{self.on_cluster} "
                f"(table String, fingerprint String, built_at {DT}, seq UInt64) "
                "ENGINE = MergeTree() ORDER BY (table, seq)"
            )
            self.note(f"created {self.db}.{STAGING_TABLE}")

    def existing_tables(self) -> set[str]:
        result = self.backend.query(f"SELECT name FROM system.tables WHERE database = {literal(self.db)}")
        return {str(row[0]) for row in result.rows}

    def everywhere(self, table: str) -> str:
        """Where to read a bookkeeping table: this node's, or every node's in cluster mode."""
        if self.cluster:
            return f"cluster({literal(self.cluster)}, {self.db}, {table})"
        return f"{self.db}.{table}"

    def applied(self) -> dict[int, tuple[str, str]]:
        result = self.backend.query(
            f"SELECT DISTINCT version, name, checksum FROM {self.everywhere(MIGRATIONS_TABLE)}"
        )
        return {int(row[0]): (str(row[1]), str(row[2])) for row in result.rows}

    def verify(self, migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> None:
        files = {m.version: m for m in migrations}
        for version, (name, checksum) in sorted(applied.items()):
            migration = files.get(version)
            if migration is None:
                raise MigrationError(
                    f"{version:04d}_{name}.sql was applied to {self.db} but is missing here: this code is "
                    "older than the database; deploy the newer sinks/ddl"
                )
            if migration.checksum != checksum:
                raise MigrationError(
                    f"{migration.file} changed after it was applied to {self.db} "
                    f"(recorded {checksum}, file is {migration.checksum}): never edit an applied "
                    "migration; restore it and put the change in a new NNNN_*.sql file"
                )

    def apply(self, migration: Migration) -> None:
        skipped: list[tuple[int, ...]] = []
        single = 0
        statements = migration.statements()
        for number, statement in enumerate(statements, 1):
            if statement.min_version is not None and self.version < statement.min_version:
                skipped.append(statement.min_version)
                continue
            if statement.cluster_only and not self.cluster:
                single += 1
                continue
            sql = render(statement.sql, self.db, self.on_cluster, self.lc, self.cluster or "")
            try:
                self.backend.execute(sql)
            except SinkError as exc:
                raise MigrationError(
                    f"{migration.file}: statement {number} of {len(statements)} failed: {exc.message}\n{sql}",
                    exc.code,
                ) from exc
        self.backend.execute(
            f"INSERT INTO {self.db}.{MIGRATIONS_TABLE} (version, name, checksum, applied_at) "
            f"SELECT {migration.version}, {literal(migration.name)}, {literal(migration.checksum)}, now()"
        )
        detail = f"{len(statements) - len(skipped) - single} statements"
        if skipped:
            needed = ".".join(str(p) for p in min(skipped))
            engine = ".".join(str(p) for p in self.version)
            detail += f", {len(skipped)} skipped: they need ClickHouse >= {needed}, this is {engine}"
        if single:
            detail += f", {single} skipped: cluster mode only"
        self.note(f"applied {migration.file} ({detail})")

    def staging(self, names: Iterable[str]) -> int:
        """Rebuild ``T_in``/``T_in_mv`` where the fingerprint changed; return how many tables have one."""
        tables = self.existing_tables()
        stored = {
            str(row[0]): str(row[1])
            for row in self.backend.query(
                f"SELECT table, argMax(fingerprint, seq) FROM {self.everywhere(STAGING_TABLE)} GROUP BY table"
            ).rows
        }
        count = 0
        for name in names:
            if name not in tables:
                continue
            count += 1
            columns = self.describe(name)
            create_in, create_mv = staging_ddl(self.db, name, columns, self.on_cluster)
            parts = [STAGING_GENERATOR, create_in, create_mv]
            expected = [f"{name}{STAGING_SUFFIX}", f"{name}{STAGING_SUFFIX}{MV_SUFFIX}"]
            distributed: tuple[str, str] | None = None
            if self.cluster:
                distributed = distributed_ddl(self.db, TABLES[name].shard_key, name, self.cluster)
                parts.extend(distributed)
                expected += [f"{name}{DISTRIBUTED_SUFFIX}", f"{name}{STAGING_SUFFIX}{DISTRIBUTED_SUFFIX}"]
            fingerprint = "sha256:" + hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()
            complete = all(t in tables for t in expected)
            if complete and stored.get(name) == fingerprint:
                continue
            staging = f"{self.db}.{name}{STAGING_SUFFIX}"
            if self.cluster:
                # The Distributed tables copy the columns of what they cover: rebuilt with them.
                self.backend.execute(f"DROP TABLE IF EXISTS {staging}{DISTRIBUTED_SUFFIX}{self.on_cluster}")
                self.backend.execute(f"DROP TABLE IF EXISTS {self.db}.{name}{DISTRIBUTED_SUFFIX}{self.on_cluster}")
            self.backend.execute(f"DROP TABLE IF EXISTS {staging}{self.on_cluster}")
            self.backend.execute(f"DROP TABLE IF EXISTS {staging}{MV_SUFFIX}{self.on_cluster}")
            self.backend.execute(create_in)
            self.backend.execute(create_mv)
            if distributed is not None:
                for statement in distributed:
                    self.backend.execute(statement)
            self.backend.execute(
                f"INSERT INTO {self.db}.{STAGING_TABLE} (table, fingerprint, built_at, seq) "
                f"SELECT {literal(name)}, {literal(fingerprint)}, now(), {time.time_ns()}"
            )
            verb = "rebuilt" if name in stored else "built"
            raw = sum(1 for c in columns if c.default_kind == "")
            self.note(f"{verb} staging {name}{STAGING_SUFFIX} -> {name} ({raw} raw columns)")
        return count

    def describe(self, table: str) -> list[ColumnInfo]:
        result = self.backend.query(f"DESCRIBE TABLE {self.db}.{table}")
        return [ColumnInfo(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in result.rows]


def staging_ddl(db: str, table: str, columns: list[ColumnInfo], on_cluster: str = "") -> tuple[str, str]:
    """``CREATE`` statements of ``table``'s staging twin and of the view feeding ``table`` from it."""
    raw: list[str] = []
    select: list[str] = []
    for column in columns:
        if column.default_kind == "":
            try:
                raw_column_type = raw_type(column.type)
            except ValueError as exc:
                raise MigrationError(f"{db}.{table}.{column.name}: {exc}") from exc
            raw.append(f"{column.name} {raw_column_type}")
            select.append(to_target(column.name, column.type))
        elif column.default_kind == "DEFAULT":
            select.append(f"{column.default_expression} AS {column.name}")
        elif column.default_kind != "ALIAS":
            # 18.16 makes a view supply MATERIALIZED columns, 26.9 refuses them: no SQL fits both.
            raise MigrationError(
                f"{db}.{table}.{column.name} is {column.default_kind}: raw tables may only use DEFAULT"
            )
    staging = f"{db}.{table}{STAGING_SUFFIX}"
    create_in = f"CREATE TABLE IF NOT EXISTS {staging}{on_cluster} ({', '.join(raw)}) ENGINE = Null"
    create_mv = (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {staging}{MV_SUFFIX}{on_cluster} TO {db}.{table} "
        f"AS SELECT {', '.join(select)} FROM {staging}"
    )
    return create_in, create_mv


def distributed_ddl(db: str, shard_key: str, table: str, cluster: str) -> tuple[str, str]:
    """``CREATE`` statements of ``table``'s Distributed tables in cluster mode.

    ``T_all`` covers every shard's ``T`` for reads (no sharding key: nothing is inserted into
    it); ``T_in_all`` covers every shard's staging twin and routes each inserted row by
    ``shard_key``, so the conversion view runs on the shard that stores the row.
    """
    on_cluster = f" ON CLUSTER {cluster}"
    staging = f"{table}{STAGING_SUFFIX}"
    read = (
        f"CREATE TABLE IF NOT EXISTS {db}.{table}{DISTRIBUTED_SUFFIX}{on_cluster} AS {db}.{table} "
        f"ENGINE = Distributed({cluster}, {db}, {table})"
    )
    write = (
        f"CREATE TABLE IF NOT EXISTS {db}.{staging}{DISTRIBUTED_SUFFIX}{on_cluster} AS {db}.{staging} "
        f"ENGINE = Distributed({cluster}, {db}, {staging}, {shard_key})"
    )
    return read, write


def to_target(name: str, ch_type: str) -> str:
    """Expression turning raw column ``name`` back into ``ch_type``, exactly."""
    inner, _ = unwrap_nullable(ch_type)
    scale = decimal_scale(inner)
    if scale is not None:
        if scale == 0:
            return f"CAST({name} AS {ch_type}) AS {name}"
        unit = "0." + "0" * (scale - 1) + "1"
        return f"CAST(toDecimal64({name}, 0) * toDecimal64('{unit}', {scale}) AS {ch_type}) AS {name}"
    if inner == "Date" or inner == "DateTime" or inner.startswith("DateTime("):
        return f"CAST({name} AS {ch_type}) AS {name}"
    return name


_AGGREGATE = re.compile(r"^CREATE TABLE IF NOT EXISTS \{db\}\.(agg_\w+)\{on_cluster\}\s.*?\bAS\s+(SELECT\b.*)$", re.S)


def aggregate_backfills(ddl_dir: Path = DDL_DIR) -> dict[str, str]:
    """Each aggregate table the migrations create (``CREATE TABLE … AS SELECT`` over a raw table),
    with the SELECT that fills it from the raw tables (placeholders not yet rendered)."""
    out: dict[str, str] = {}
    for m in load_migrations(ddl_dir):
        for st in split_statements(m.path.read_text(encoding="utf-8")):
            match = _AGGREGATE.match(st.sql)
            if match and not st.cluster_only:
                out[match.group(1)] = match.group(2)
    return out


def rebuild_aggregates(backend: Backend, ddl_dir: Path = DDL_DIR) -> list[str]:
    """Refill every aggregate table of ``backend.database`` from the raw tables; returns their names.

    Why: an INSERT into a staging table ``T_in`` reaches ``T`` and each aggregate through its own
    materialized view, one after the other, and nothing makes that atomic. A ClickHouse server
    finishes pushing a block to every view once it started, but an embedded chDB dies with the
    worker process: SIGKILLed in the middle, it can leave a block in an aggregate and not in ``T``.
    The redelivered batch then lands in ``T`` (which lacks it) and in the aggregate again: counted
    twice (tests/system/test_event_identity.py found it). ``T`` is exact (redelivery is
    deduplicated against it), so the aggregates are made again from it before anything reads them:
    ``sinks.connect`` calls this when an embedded data path was left open by a process that died.
    """
    db = backend.database
    existing = {str(r[0]) for r in backend.query(
        f"SELECT name FROM system.tables WHERE database = {literal(db)}").rows}
    lc = LC if low_cardinality_supported(backend.version()) else "String"
    done = []
    for name, select in aggregate_backfills(ddl_dir).items():
        if name not in existing:
            continue
        backend.execute(f"TRUNCATE TABLE {db}.{name}")
        backend.execute(f"INSERT INTO {db}.{name} {render(select, db, '', lc)}")
        done.append(name)
    return done

