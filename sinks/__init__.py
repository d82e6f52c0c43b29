"""ClickHouse sinks: one small interface, two real engines, versioned DDL.

``open_backend("server", host=..., port=...)`` talks to a ClickHouse server over the native
protocol; ``open_backend("embedded", path=...)`` runs chDB inside the process. Both take the
same raw-value batches (:meth:`Backend.insert`) and the same SQL, and :func:`migrate` gives both
the same tables (:data:`TABLES`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Backend, QueryResult, SinkError, SinkUnavailable
from .migrate import MigrationError, migrate
from .server import ServerBackend
from .tables import TABLES, TableSpec

BACKENDS = ("server", "embedded")


def open_backend(kind: str, **kw: Any) -> Backend:
    """Build a backend by name: ``"server"`` takes :class:`ServerBackend`'s keyword arguments,
    ``"embedded"`` takes ``path`` and ``database``.

    chDB is imported only for ``"embedded"``: it is a ~500 MB engine that a worker writing to a
    server should not load.
    """
    if kind == "server":
        return ServerBackend(**kw)
    if kind == "embedded":
        from .embedded import EmbeddedBackend

        path = kw.pop("path", None)
        if path is None:
            raise ValueError("open_backend('embedded') needs path=<chDB data dir>")
        return EmbeddedBackend(Path(path), **kw)
    raise ValueError(f"unknown ClickHouse backend {kind!r}; expected one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "TABLES",
    "Backend",
    "MigrationError",
    "QueryResult",
    "ServerBackend",
    "SinkError",
    "SinkUnavailable",
    "TableSpec",
    "migrate",
    "open_backend",
]
