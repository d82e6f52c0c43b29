"""Embedded backend: chDB, ClickHouse running inside this Python process.

For a single machine without a ClickHouse server: no port, no daemon, data persisted under one
directory. chDB allows one process per data directory (a second process fails with Code 36) and
one data directory per process at a time; within a process, several backends (on different
databases, say) may share that directory, and they share one engine.

Inserts go through chDB's ``Python()`` table function over a ``pyarrow.Table`` whose column
types come from the staging table, not over a pandas DataFrame: with pandas object columns
chDB 4.4 turns ``bytes`` into their ``repr`` (``"b'\\xff'"``) and lists into JSON text, and it
refuses pandas' Arrow-backed dtypes outright. Arrow carries binary strings and arrays intact and
is as fast: 10-column batches of 50k rows went in at 370-770k rows/s on this 2-core box
(depending on what else ran), the pandas path at ~520k.

Query results are decoded from ClickHouse's Native format with clickhouse-driver's own column
readers, so rows have exactly the Python types :class:`sinks.server.ServerBackend` returns.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import pyarrow as pa
from chdb.session import Session
from clickhouse_driver import Client
from clickhouse_driver.bufferedreader import BufferedReader
from clickhouse_driver.columns.service import read_column
from clickhouse_driver.connection import ServerInfo
from clickhouse_driver.context import Context
from clickhouse_driver.reader import read_binary_str
from clickhouse_driver.varint import read_varint

from .base import (
    STAGING_SUFFIX,
    Backend,
    QueryResult,
    SinkError,
    check_batch,
    check_identifier,
    reject_inline_insert,
)


class _Session(Protocol):
    def query(self, sql: str, fmt: str = ...) -> Any: ...

    def close(self) -> None: ...


_new_session = cast("Callable[[str], _Session]", Session)
_CODE = re.compile(r"Code:\s*(\d+)")
# Native output drops the timezone of a *top-level* DateTime column ("DateTime('Asia/Shanghai')"
# is written as "DateTime"), as ClickHouse does for clients too old to know timezones.
_BARE_DATETIME = re.compile(r"DateTime(64\(\d+\))?")
_SELECT_LIKE = re.compile(r"^\s*\(*\s*(SELECT|WITH)\b", re.I)

_INTS: dict[str, pa.DataType] = {
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
    "Bool": pa.bool_(),
}


def arrow_type(ch_type: str) -> pa.DataType | None:
    """Arrow type to ship a raw staging column as; ``None`` lets pyarrow infer it.

    Strings go as ``binary`` so non-UTF-8 payloads (dead letters) pass through untouched;
    pyarrow accepts ``str`` values there and encodes them as UTF-8.
    """
    for wrapper in ("Nullable(", "LowCardinality("):
        while ch_type.startswith(wrapper):
            ch_type = ch_type[len(wrapper) : -1]
    if ch_type in _INTS:
        return _INTS[ch_type]
    if ch_type == "String" or ch_type.startswith("FixedString("):
        return pa.binary()
    if ch_type.startswith("Array("):
        item = arrow_type(ch_type[len("Array(") : -1])
        return pa.list_(item) if item is not None else None
    return None


def to_arrow(values: Sequence[Any], target: pa.DataType | None) -> pa.Array:
    """Convert one raw column to Arrow, as strictly as clickhouse-driver would.

    pyarrow's typed conversion silently truncates ``Decimal('1.50')`` and ``1.5`` to ``1`` in an
    integer column, which would turn 1.50 CNY into 0.01. Inferring first and then casting with
    ``safe=True`` refuses those (and out-of-range ints), and is ~10x faster for scalar columns
    (2 ms instead of 18 ms per 50k values here). Arrays keep the typed path, which is faster there.
    """
    if target is None or pa.types.is_list(target):
        return pa.array(values, type=target)
    try:
        inferred = pa.array(values)
    except (OverflowError, pa.ArrowException):
        # Ints beyond Int64 (UInt64 offsets) or str mixed with bytes: only the typed path takes them.
        if pa.types.is_integer(target) and not all(type(v) is int or v is None for v in values):
            raise TypeError(f"expected raw ints for {target}") from None
        return pa.array(values, type=target)
    kind = inferred.type
    if kind == target:
        return inferred
    if pa.types.is_integer(target):
        ok = pa.types.is_integer(kind) or pa.types.is_boolean(kind)
    elif pa.types.is_binary(target):
        ok = pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_string(kind)
    else:
        ok = True
    if not ok and not pa.types.is_null(kind):
        raise TypeError(f"expected values for {target}, got {kind}")
    return inferred.cast(target, safe=True)


class _BytesReader(BufferedReader):  # type: ignore[misc]
    """clickhouse-driver's buffered reader over an in-memory Native-format result."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data
        super().__init__(max(len(data), 1))

    def read_into_buffer(self) -> None:
        if self._data is None:
            raise EOFError("unexpected end of chDB Native output")
        self.buffer = bytearray(self._data)
        self.current_buffer_size = len(self._data)
        self.position = 0
        self._data = None

    def exhausted(self) -> bool:
        return self._data is None and self.position >= self.current_buffer_size


def _open_error(path: Path, exc: Exception) -> SinkError:
    text = str(exc)
    code_match = _CODE.search(text)
    code = int(code_match.group(1)) if code_match else None
    if "already initialized with path" in text:
        return SinkError(
            f"cannot open chDB data dir {path}: this process already has another chDB data dir open "
            f"(chDB allows one per process; close that backend first). chDB said: {text}",
            code,
        )
    if code == 36:
        return SinkError(
            f"cannot open chDB data dir {path}: another yibao process (worker, CLI or test) is using it; "
            f"chDB allows one process per data dir: stop it or use another data dir. chDB said: {text}",
            code,
        )
    return SinkError(f"cannot open chDB data dir {path}: {text}", code)


#: Marker file of a data path in use, holding the pid of the process using it; removed when the
#: last backend of that process on the path closes. Found at open with a pid that is gone: the
#: process died with the path open.
IN_USE = ".yibao-in-use"
_open_paths: dict[Path, int] = {}
_paths_lock = threading.Lock()


def _claim(path: Path) -> bool:
    """Mark ``path`` as used by this process; True when a process that is gone left it marked."""
    marker = path / IN_USE
    key = path.resolve()
    with _paths_lock:
        if _open_paths.get(key, 0) > 0:
            _open_paths[key] += 1
            return False
        unclean = False
        try:
            pid = int(marker.read_text(encoding="ascii").strip() or "0")
        except FileNotFoundError:
            pid = None
        except (OSError, ValueError):
            pid = 0
        if pid is not None and pid != os.getpid():
            unclean = not _alive(pid)
        marker.write_text(str(os.getpid()), encoding="ascii")
        _open_paths[key] = 1
        return unclean


def _release(path: Path) -> None:
    key = path.resolve()
    with _paths_lock:
        n = _open_paths.get(key, 0) - 1
        if n > 0:
            _open_paths[key] = n
            return
        _open_paths.pop(key, None)
        (path / IN_USE).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedBackend(Backend):
    """chDB on a data directory, the same SQL as the server backend but in-process."""

    name = "embedded"

    def __init__(self, path: Path | str, database: str = "yibao") -> None:
        self._path = Path(path)
        self._db = check_identifier(database, "database name")
        if "?" in str(self._path):
            raise ValueError(f"chDB data dir {self._path} must not contain '?' (chDB reads it as options)")
        self._path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._staging: dict[str, dict[str, pa.DataType | None]] = {}
        try:
            self._session: _Session | None = _new_session(str(self._path))
        except RuntimeError as exc:
            raise _open_error(self._path, exc) from exc
        #: the process that last had this data path open did not close it (it was killed): what an
        #: insert in flight wrote to some of its materialized views' targets and not to others
        #: remains (see sinks.migrate.rebuild_aggregates, which sinks.connect then runs)
        self.unclean = _claim(self._path)
        self._context = self._native_context()

    @property
    def database(self) -> str:
        return self._db

    @property
    def path(self) -> Path:
        return self._path

    def execute(self, sql: str) -> None:
        reject_inline_insert(sql)
        with self._lock:
            self._staging.clear()
            self._run(sql, "Null")

    def query(self, sql: str) -> QueryResult:
        with self._lock:
            data = self._run(sql, "Native")
            columns, types, rows = self._decode(data)
            if not columns and _SELECT_LIKE.match(sql):
                # No block at all for an empty result; ask for the header instead.
                described = self._describe(sql)
                columns, types = [d[0] for d in described], [d[1] for d in described]
            elif any(_BARE_DATETIME.fullmatch(t) for t in types) and _SELECT_LIKE.match(sql):
                described = self._describe(sql)
                real = [d[1] for d in described]
                if len(real) == len(types) and real != types:
                    columns, types, rows = self._decode(data, real)
            return QueryResult(columns=columns, types=types, rows=rows)

    def insert(self, table: str, columns: Mapping[str, Sequence[Any]]) -> int:
        n = check_batch(table, columns)
        if n == 0:
            return 0
        target = f"{self._db}.{table}{STAGING_SUFFIX}"
        names = ", ".join(columns)
        with self._lock:
            schema = self._staging_schema(table)
            unknown = [name for name in columns if name not in schema]
            if unknown:
                raise SinkError(f"insert into {target}: no such column(s) {', '.join(unknown)}")
            arrays: dict[str, pa.Array] = {}
            for name, values in columns.items():
                try:
                    arrays[name] = to_arrow(values, schema[name])
                except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
                    raise SinkError(
                        f"insert into {target}: column {name} does not fit {schema[name]} ({exc}); "
                        "decimals, dates and datetimes must be raw ints (see sinks.base)", about_data=True,
                    ) from exc
            # chDB resolves Python(name) by looking the variable up in the calling frames.
            yibao_batch = pa.table(arrays)
            try:
                self._run(f"INSERT INTO {target} ({names}) SELECT {names} FROM Python(yibao_batch)", "Null")
            except SinkError:
                self._staging.pop(table, None)
                raise
            finally:
                del yibao_batch
        return n

    def use_database(self) -> None:
        self.execute(f"USE {self._db}")

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
                _release(self._path)

    def _run(self, sql: str, fmt: str) -> bytes:
        session = self._session
        if session is None:
            raise SinkError("EmbeddedBackend is closed")
        try:
            result = session.query(sql, fmt)
        except RuntimeError as exc:  # chdb.ChdbError subclasses RuntimeError
            text = str(exc).strip()
            match = _CODE.search(text)
            raise SinkError(f"chDB at {self._path}: {text}", int(match.group(1)) if match else None) from exc
        if result is None:
            return b""
        data: bytes = result.bytes()
        return data

    def _staging_schema(self, table: str) -> dict[str, pa.DataType | None]:
        schema = self._staging.get(table)
        if schema is None:
            staging = f"{self._db}.{table}{STAGING_SUFFIX}"
            _, _, rows = self._decode(self._run(f"DESCRIBE TABLE {staging}", "Native"))
            schema = {str(row[0]): arrow_type(str(row[1])) for row in rows}
            self._staging[table] = schema
        return schema

    def _describe(self, sql: str) -> list[tuple[str, str]]:
        try:
            _, _, rows = self._decode(self._run(f"DESCRIBE ({sql.strip().rstrip(';')})", "Native"))
        except SinkError:
            return []
        return [(str(row[0]), str(row[1])) for row in rows]

    def _native_context(self) -> Context:
        timezone = self._run("SELECT timezone()", "TabSeparated").decode().strip() or "UTC"
        context = Context()
        context.settings = {}
        # The defaults of a real Client, so the column readers behave exactly as on the server path.
        context.client_settings = dict(Client("localhost").client_settings)
        context.server_info = ServerInfo("chDB", 0, 0, 0, 0, timezone, "chDB", 0)
        return context

    def _decode(
        self, data: bytes, override_types: list[str] | None = None
    ) -> tuple[list[str], list[str], list[tuple[Any, ...]]]:
        """Parse Native-format blocks (no block info: chDB writes them for protocol revision 0)."""
        if not data:
            return [], [], []
        buf = _BytesReader(data)
        names: list[str] = []
        types: list[str] = []
        columns: list[list[Any]] = []
        while not buf.exhausted():
            first_block = not names
            n_columns = read_varint(buf)
            n_rows = read_varint(buf)
            for i in range(n_columns):
                name = read_binary_str(buf)
                type_ = read_binary_str(buf)
                if override_types is not None and i < len(override_types):
                    type_ = override_types[i]
                values = read_column(self._context, type_, n_rows, buf)
                if first_block:
                    names.append(name)
                    types.append(type_)
                    columns.append(list(values))
                else:
                    columns[i].extend(values)
        return names, types, list(zip(*columns, strict=True)) if columns else []
