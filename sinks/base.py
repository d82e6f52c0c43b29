"""The one small interface every ClickHouse backend implements, and the errors it raises.

Two real engines sit behind it: a ClickHouse server over the native protocol
(:class:`sinks.server.ServerBackend`) and chDB in-process (:class:`sinks.embedded.EmbeddedBackend`).
Callers (stream workers, migrations, reports, tests) only ever see :class:`Backend`, so the same
code and the same SQL run against both; that is also why the SQL must stay within what
ClickHouse 18.16 understands unless it is gated on :meth:`Backend.version`.

Raw values
----------
:meth:`Backend.insert` takes *raw* values, never ``Decimal``/``datetime`` objects: decimals as
unscaled integers, ``DateTime`` as int epoch seconds, ``Date`` as int days since 1970-01-01,
booleans as 0/1, arrays as lists, NULL as ``None``. Building those objects is what makes a Python
pipeline slow: measured on this box, clickhouse-driver encodes a ``Decimal(16, 2)`` column
about 10× slower than an ``Int64`` column (~1.1 M vs ~11-16 M values/s; the lead measured ~7×
earlier), and every ``datetime`` costs a pytz ``astimezone``. So rows go into a staging twin
``<table>_in`` whose columns have the raw types, and a materialized view converts them exactly
inside ClickHouse (see :mod:`sinks.migrate`).

Text may come as ``str`` or as its UTF-8 ``bytes``; both backends write the same bytes either way.
The row builders send copied text as bytes: clickhouse-driver writes a ``bytes`` value in about a
third of the time it takes to encode a ``str`` (32–52 against 109–157 ns here), and a String
column is most of what a settlement's fee lines send.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STAGING_SUFFIX = "_in"
# Cluster mode: ``T_all`` is the Distributed table over every shard's ``T`` (reads), ``T_in_all``
# the Distributed table over every shard's ``T_in`` (inserts, routed by the table's shard key).
DISTRIBUTED_SUFFIX = "_all"

# An INSERT whose data is inside the statement (VALUES (...) or FORMAT ...) rather than in a
# following SELECT. Over the native protocol an 18.16 server answers such a statement by waiting
# for data blocks the client never sends, so the call hangs until the socket times out.
_INLINE_INSERT = re.compile(r"^\s*INSERT\s+INTO\b(?:(?!\bSELECT\b).)*\b(?:VALUES|FORMAT)\b", re.I | re.S)


#: ClickHouse error codes that say a value cannot go into its column (parse, conversion, range,
#: overflow, NULL, size): the rows are at fault, not the server or the schema.
DATA_ERROR_CODES = frozenset({6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 349, 407})


class SinkError(Exception):
    """ClickHouse refused a statement (bad SQL, missing table, wrong value...).

    Retrying the same call will fail the same way, so the worker must not loop on it.
    ``code`` is ClickHouse's error code when the server gave one. ``about_data``: the refusal is
    about the values sent (a code of :data:`DATA_ERROR_CODES`, or a value the client could not
    encode for its column), so a worker may look for the event they came from and set it aside;
    any other refusal (a missing table or column, no rights) concerns every event alike.
    """

    def __init__(self, message: str, code: int | None = None, *, about_data: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.about_data = code in DATA_ERROR_CODES if about_data is None else about_data


class SinkUnavailable(SinkError):
    """ClickHouse cannot be reached, or is overloaded: back off and retry the same call.

    A subclass of :class:`SinkError` so ``except SinkError`` still catches every sink failure;
    a worker that wants to retry must therefore catch ``SinkUnavailable`` *first*. An insert that
    failed this way may or may not have been written (the connection can drop after the server
    committed): the exactly-once machinery must look the batch up before re-sending it.

    ``overloaded``: the server answered, but "not now" (too many parts, memory): a caller must
    wait out its back-off rather than retry as soon as the server is reachable again.
    """

    def __init__(self, message: str, code: int | None = None, *, overloaded: bool = False) -> None:
        super().__init__(message, code)
        self.overloaded = overloaded


@dataclass(frozen=True)
class QueryResult:
    """Rows of a query, identical in shape and Python types on both backends.

    Values are what clickhouse-driver returns: ``Decimal`` for decimals, timezone-aware
    ``datetime`` for ``DateTime('tz')``, ``date``, lists, ``None`` for NULL, ``str`` for strings
    (``bytes`` when a string is not valid UTF-8).
    """

    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]] = field(default_factory=list)

    def scalar(self) -> Any:
        """First column of the first row, or ``None`` when there is no row."""
        return self.rows[0][0] if self.rows and self.rows[0] else None

    def dicts(self) -> list[dict[str, Any]]:
        """Rows as dicts keyed by column name, for callers that prefer names to positions."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


class Backend(ABC):
    """A ClickHouse engine the pipeline writes to and reads from.

    One instance per process and data store. Every method is thread-safe (each implementation
    serializes calls with a lock, because neither clickhouse-driver's ``Client`` nor a chDB
    session may be used from two threads at once), blocks until ClickHouse has answered, and
    raises :class:`SinkUnavailable` or :class:`SinkError`, never a driver exception.
    """

    name: ClassVar[str]
    _version_cache: tuple[int, ...] | None = None

    @property
    @abstractmethod
    def database(self) -> str:
        """Database holding the pipeline's tables. Every statement names it explicitly
        (``db.table``) because the database may not exist before :func:`sinks.migrate.migrate`."""

    @property
    def cluster(self) -> str | None:
        """Name of the ClickHouse cluster (``remote_servers``) the tables are sharded over, or
        ``None`` for a single server or chDB. In cluster mode every shard holds its own part of
        each table, so whole-table reads must go through :meth:`read_table`."""
        return None

    def read_table(self, table: str) -> str:
        """Qualified name to read all of ``table`` from: ``db.table`` on a single engine,
        ``db.table_all`` (the Distributed table over every shard) in cluster mode.

        Callers that must see every row, above all the exactly-once lookup of already-landed
        offsets, use this instead of formatting ``db.table`` themselves: reading one shard's
        local table would miss the rows that landed on the others and re-insert them.
        """
        check_identifier(table, "table name")
        suffix = DISTRIBUTED_SUFFIX if self.cluster else ""
        return f"{self.database}.{table}{suffix}"

    @abstractmethod
    def execute(self, sql: str) -> None:
        """Run a statement that returns nothing (DDL, ``INSERT ... SELECT``, ``ALTER``...).

        Called by migrations and maintenance tasks, never on the hot path. Inline-data INSERTs
        (``VALUES``/``FORMAT``) are rejected with ``ValueError`` on every backend, because the
        18.16 server cannot take them over the native protocol: use :meth:`insert` or
        ``INSERT ... SELECT``.
        """

    @abstractmethod
    def query(self, sql: str) -> QueryResult:
        """Run a ``SELECT``-like statement and return all its rows in memory.

        Called at worker start-up and on partition assignment (the exactly-once lookup of
        already-written Kafka offsets), by migrations, reports and tests. Not for large exports.
        """

    @abstractmethod
    def insert(self, table: str, columns: Mapping[str, Sequence[Any]]) -> int:
        """Append one batch of raw values to ``<database>.<table>_in``; return the row count.

        Called by a stream worker each time it flushes a batch (5k-50k rows: small batches
        multiply ClickHouse's merge work), as exactly one INSERT, so the batch lands whole or
        not at all. ``columns`` maps column names of the staging table to equally long lists of
        raw values (see the module docstring). A staging column left out takes its type's
        default (0, '', []), not the target table's DEFAULT; only columns that are absent from
        the staging table (such as ``ingested_at``) take the target's DEFAULT.
        """

    def reachable(self) -> bool:
        """Whether the engine answers right now; never raises.

        Called by a worker every quarter second while it backs off after
        :class:`SinkUnavailable`, so that it resumes as soon as ClickHouse is back rather than
        when the back-off ends (up to ``sink_retry_max_seconds`` later). Must be cheap. An
        embedded engine lives in the process: always reachable.
        """
        return True

    @abstractmethod
    def use_database(self) -> None:
        """Resolve unqualified table names in this backend's database from now on.

        Called by ad-hoc tools (``yibao query``) once the database exists, so that people can
        write ``FROM settlements``; pipeline code keeps qualifying every name.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the connection or session. Called once at shutdown; calling it twice is
        harmless, and every other method raises :class:`SinkError` afterwards."""

    def version(self) -> tuple[int, ...]:
        """Engine version as integers, e.g. ``(18, 16, 1)``; migrations gate features on it.

        Called by migrations when choosing SQL. Cached: an engine does not change version
        under a running process without dropping its connection.
        """
        cached = self._version_cache
        if cached is None:
            text = str(self.query("SELECT version()").scalar())
            cached = tuple(int(part) for part in re.findall(r"\d+", text))
            if not cached:
                raise SinkError(f"cannot parse ClickHouse version {text!r}")
            self._version_cache = cached
        return cached

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} database={self.database}>"


def check_identifier(name: str, what: str = "identifier") -> str:
    """Return ``name`` if it is a plain SQL identifier, else raise ``ValueError``.

    Table and column names are interpolated into SQL (ClickHouse 18.16 has no server-side
    parameters), so anything that is not a bare identifier is refused rather than quoted.
    """
    if not IDENTIFIER.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a plain identifier (letters, digits, underscore)")
    return name


def check_batch(table: str, columns: Mapping[str, Sequence[Any]]) -> int:
    """Validate an insert batch's names and shape; return its row count.

    Done before touching the engine so a caller bug (ragged columns, odd names) is a
    ``ValueError`` naming the column, not an opaque driver failure half-way through a send.
    """
    check_identifier(table, "table name")
    if not columns:
        raise ValueError(f"insert into {table}: no columns given")
    lengths = {name: len(values) for name, values in columns.items()}
    for name in lengths:
        check_identifier(name, "column name")
    n = next(iter(lengths.values()))
    ragged = {name: length for name, length in lengths.items() if length != n}
    if ragged:
        raise ValueError(f"insert into {table}: columns differ in length: {lengths}")
    return n


def reject_inline_insert(sql: str) -> None:
    """Refuse ``INSERT ... VALUES``/``FORMAT`` passed to :meth:`Backend.execute` (see there)."""
    if _INLINE_INSERT.match(sql):
        raise ValueError(
            "execute() cannot send an INSERT with inline data: a ClickHouse 18.16 server waits for "
            "native data blocks and the call hangs; use Backend.insert() or INSERT ... SELECT"
        )


def literal(value: str) -> str:
    """Quote a Python string as a ClickHouse string literal (for names and checksums in
    bookkeeping statements; never for bulk data)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
