"""ClickHouse sinks: one small interface, two real engines, versioned DDL.

``connect(ClickHouseConfig(backend="server", host=..., port=...))`` talks to a ClickHouse server
over the native protocol; ``connect(ClickHouseConfig(chdb_path=...))`` runs chDB inside the
process. Both take the same raw-value batches (:meth:`Backend.insert`) and the same SQL, and :func:`migrate` gives both
the same tables (:data:`TABLES`).
"""

from __future__ import annotations

from .base import Backend, QueryResult, SinkError, SinkUnavailable
from .config import BACKENDS, ClickHouseConfig, connect
from .migrate import MigrationError, migrate
from .server import ServerBackend
from .tables import TABLES, TableSpec

__all__ = [
    "BACKENDS",
    "TABLES",
    "Backend",
    "ClickHouseConfig",
    "MigrationError",
    "QueryResult",
    "ServerBackend",
    "SinkError",
    "SinkUnavailable",
    "TableSpec",
    "connect",
    "migrate",
]
