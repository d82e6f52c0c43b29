"""ClickHouse server backend: clickhouse-driver over the native protocol.

The native protocol (not HTTP) because it is the one path that works against the Debian 18.16
server here (clickhouse-connect does not) and because columnar inserts of plain ints are the
fastest thing the driver does (~650-680k rows/s for 10 columns on this box).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from .base import (
    DISTRIBUTED_SUFFIX,
    STAGING_SUFFIX,
    Backend,
    QueryResult,
    SinkError,
    SinkUnavailable,
    check_batch,
    check_identifier,
    literal,
    reject_inline_insert,
)

T = TypeVar("T")

# Server error codes that mean "not now" rather than "never": the same statement is expected to
# succeed after a back-off, so they surface as SinkUnavailable like a dropped connection.
UNAVAILABLE_CODES = frozenset(
    {
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT (server side, e.g. to a shard)
        210,  # NETWORK_ERROR (server side)
        241,  # MEMORY_LIMIT_EXCEEDED: a 50k-row insert only hits it when the server is loaded
        242,  # TABLE_IS_READ_ONLY: a replica lost its ZooKeeper session
        252,  # TOO_MANY_PARTS: merges are behind; inserting again right away makes it worse
        279,  # ALL_CONNECTION_TRIES_FAILED
        319,  # UNKNOWN_STATUS_OF_INSERT
        999,  # KEEPER_EXCEPTION
    }
)

# Raised by the driver or the socket layer when the connection is gone or never came up.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ch_errors.NetworkError,
    ch_errors.SocketTimeoutError,
    ch_errors.UnexpectedPacketFromServerError,
    ch_errors.UnknownPacketFromServerError,
    EOFError,
    OSError,  # ConnectionError, TimeoutError, ssl.SSLError...
)

# Raised client-side while encoding a batch whose Python values do not fit the column types
# (with types_check=False the driver does not name the column).
_ENCODING_ERRORS: tuple[type[BaseException], ...] = (
    struct.error,
    TypeError,
    ValueError,
    OverflowError,
    AttributeError,
)


def server_message(exc: ch_errors.Error) -> str:
    """The useful part of a server exception: 18.16 appends a C++ stack trace to every message."""
    text = (exc.message or str(exc)).split("Stack trace:", 1)[0].strip()
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class ServerBackend(Backend):
    """A ClickHouse server reached over the native protocol (TCP 9000, or 9440 with TLS).

    Connects lazily on first use and reconnects on the next call after a connection loss, so
    a worker only has to retry the call that raised :class:`SinkUnavailable`.
    """

    name = "server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9000,
        database: str = "yibao",
        user: str = "default",
        password: str = "",
        secure: bool = False,
        verify: bool = True,
        ca_certs: str | Path | None = None,
        connect_timeout: float = 5,
        send_receive_timeout: float = 300,
        settings: Mapping[str, Any] | None = None,
        cluster: str | None = None,
    ) -> None:
        """``settings`` are sent with every query; their names are checked against the
        server's ``system.settings`` on first use, because clickhouse-driver silently drops
        names the server does not know (e.g. ``async_insert`` on 18.16) and a safety setting
        that is quietly ignored is worse than an error.

        ``cluster`` names a cluster of the server's ``remote_servers`` that the tables are
        sharded over (``migrate(..., cluster=...)`` built them): batches then go into the
        Distributed staging table ``T_in_all`` as synchronous inserts (see
        :meth:`_sync_insert_settings`), and :meth:`read_table` names the Distributed ``T_all``."""
        self._db = check_identifier(database, "database name")
        self._cluster = check_identifier(cluster, "cluster name") if cluster else None
        self._insert_settings: dict[str, Any] | None = None if self._cluster else {}
        self._host = host
        self._port = port
        self._settings = dict(settings or {})
        self._settings_checked = not self._settings
        self._lock = threading.Lock()
        # database="" lets the server pick the user's default: ours may not exist before migrate().
        self._client: Client | None = Client(
            host,
            port=port,
            database="",
            user=user,
            password=password,
            secure=secure,
            verify=verify,
            ca_certs=str(ca_certs) if ca_certs is not None else None,
            connect_timeout=connect_timeout,
            send_receive_timeout=send_receive_timeout,
            sync_request_timeout=connect_timeout,
            client_name="yibao",
            settings=dict(self._settings),
        )

    @property
    def database(self) -> str:
        return self._db

    @property
    def cluster(self) -> str | None:
        return self._cluster

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def execute(self, sql: str) -> None:
        reject_inline_insert(sql)
        self._call(lambda client: client.execute(sql))

    def query(self, sql: str) -> QueryResult:
        rows, columns = self._call(lambda client: client.execute(sql, with_column_types=True))
        return QueryResult(
            columns=[name for name, _ in columns],
            types=[type_ for _, type_ in columns],
            rows=[tuple(row) for row in rows],
        )

    def insert(self, table: str, columns: Mapping[str, Sequence[Any]]) -> int:
        n = check_batch(table, columns)
        if n == 0:
            return 0
        target = f"{self._db}.{table}{STAGING_SUFFIX}"
        if self._cluster is not None:
            target += DISTRIBUTED_SUFFIX
        sql = f"INSERT INTO {target} ({', '.join(columns)}) VALUES"
        data = list(columns.values())

        def send(client: Client) -> Any:
            extra = self._sync_insert_settings(client)
            try:
                return client.execute(sql, data, columnar=True, types_check=False, settings=extra)
            except (*_ENCODING_ERRORS, ch_errors.TypeMismatchError) as exc:
                client.disconnect()
                detail = exc.message if isinstance(exc, ch_errors.Error) else f"{type(exc).__name__}: {exc}"
                raise SinkError(
                    f"insert into {target}: a value does not fit its column ({detail}); "
                    "decimals, dates and datetimes must be raw ints (see sinks.base)", about_data=True,
                ) from exc

        written = self._call(send)
        return int(written) if isinstance(written, int) else n

    def reachable(self, timeout: float = 0.25) -> bool:
        """A TCP connect first (refused at once while the server is down, and it does not
        disturb the client), then ``SELECT 1`` on the client's own connection."""
        try:
            with socket.create_connection((self._host, self._port), timeout=timeout):
                pass
            self._call(lambda client: client.execute("SELECT 1"))
        except (OSError, SinkError):
            return False
        return True

    def use_database(self) -> None:
        def switch(client: Client) -> None:
            client.execute(f"SELECT 1 FROM system.databases WHERE name = {literal(self._db)}")
            client.disconnect()
            client.connection.database = self._db

        self._call(switch)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.disconnect()
                self._client = None

    def _call(self, fn: Callable[[Client], T]) -> T:
        with self._lock:
            client = self._client
            if client is None:
                raise SinkError("ServerBackend is closed")
            try:
                if not self._settings_checked:
                    self._check_settings(client)
                return fn(client)
            except ch_errors.ServerException as exc:
                message = f"ClickHouse at {self.address}: {server_message(exc)}"
                if exc.code in UNAVAILABLE_CODES:
                    raise SinkUnavailable(message, exc.code, overloaded=True) from exc
                raise SinkError(message, exc.code) from exc
            except _CONNECTION_ERRORS as exc:
                client.disconnect()
                # a timeout's own text is only its code and the address ("Code: 209. (host:port)")
                late = " (no answer in time)" if isinstance(exc, ch_errors.SocketTimeoutError | TimeoutError) else ""
                raise SinkUnavailable(
                    f"ClickHouse at {self.address} is unreachable: {type(exc).__name__}: {exc}{late}",
                    getattr(exc, "code", None),
                ) from exc
            except ch_errors.Error as exc:
                client.disconnect()
                raise SinkError(f"ClickHouse client error: {exc}", exc.code) from exc

    def _sync_insert_settings(self, client: Client) -> dict[str, Any]:
        """Settings that make an insert into a Distributed table synchronous (cluster mode).

        By default a Distributed table queues inserted rows on the receiving server's disk and
        sends them to the shards later; the worker would then commit Kafka offsets for rows no
        shard holds yet, and the exactly-once lookup after a crash would not find them. With the
        synchronous setting the INSERT returns only once every shard has written its part. The
        setting was renamed (``insert_distributed_sync`` up to 23.x, then
        ``distributed_foreground_insert``, the old name an alias that ``system.settings`` no
        longer lists), and the driver silently drops a name the server does not know, so the
        name is taken from the server itself once.
        """
        if self._insert_settings is None:
            names = {
                str(row[0])
                for row in client.execute(
                    "SELECT name FROM system.settings "
                    "WHERE name IN ('distributed_foreground_insert', 'insert_distributed_sync')"
                )
            }
            for name in ("distributed_foreground_insert", "insert_distributed_sync"):
                if name in names:
                    self._insert_settings = {name: 1}
                    break
            else:
                raise SinkError(
                    f"ClickHouse at {self.address} has no setting for synchronous Distributed inserts; "
                    "cluster mode cannot guarantee that a written batch is on its shards"
                )
        return self._insert_settings

    def _check_settings(self, client: Client) -> None:
        names = ", ".join(literal(name) for name in self._settings)
        known = {row[0] for row in client.execute(f"SELECT name FROM system.settings WHERE name IN ({names})")}
        unknown = sorted(set(self._settings) - known)
        if unknown:
            raise SinkError(
                f"ClickHouse at {self.address} does not know the setting(s) {', '.join(unknown)}; "
                "clickhouse-driver would silently drop them, so refusing to run without them"
            )
        self._settings_checked = True
