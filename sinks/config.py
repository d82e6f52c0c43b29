"""What the sinks need to reach ClickHouse, as one frozen value built by the settings layer.

The sinks read no environment and no settings object: whoever opens a backend (the worker, the
CLI's commands, the tests) passes a :class:`ClickHouseConfig` to :func:`connect`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .base import Backend

log = structlog.get_logger(__name__)

BACKENDS = ("server", "embedded")


@dataclass(frozen=True)
class ClickHouseConfig:
    """A ClickHouse server (``backend="server"``) or an embedded chDB data directory."""

    backend: str = "embedded"
    database: str = "yibao"
    chdb_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 9000
    user: str = "default"
    password: str = field(default="", repr=False)
    secure: bool = False
    verify: bool = True
    ca_certs: Path | None = None
    cluster: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown ClickHouse backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.backend == "embedded" and self.chdb_path is None:
            raise ValueError("an embedded ClickHouse (chDB) needs chdb_path, its data directory")


def connect(config: ClickHouseConfig) -> Backend:
    """The backend ``config`` names; chDB is imported only for an embedded one (a ~500 MB engine
    that a worker writing to a server should not load)."""
    if config.backend == "embedded":
        from .embedded import EmbeddedBackend

        assert config.chdb_path is not None
        be = EmbeddedBackend(Path(config.chdb_path), database=config.database)
        if be.unclean:
            from .migrate import rebuild_aggregates

            log.warning("the process that last used this chDB data path died with it open; rebuilding the BI "
                        "aggregates from the raw tables", path=str(config.chdb_path),
                        tables=rebuild_aggregates(be))
        return be
    from .server import ServerBackend

    return ServerBackend(
        host=config.host, port=config.port, database=config.database, user=config.user, password=config.password,
        secure=config.secure, verify=config.verify, ca_certs=str(config.ca_certs) if config.ca_certs else None,
        cluster=config.cluster,
    )
