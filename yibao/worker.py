"""Running worker processes: one in-process Faust worker, or N supervised child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

import structlog

from .settings import ClickHouseBackend, Settings

log = structlog.get_logger(__name__)


def migrate_now(settings: Settings) -> None:
    from sinks import connect
    from sinks.migrate import migrate

    backend = connect(settings.clickhouse())
    try:
        migrate(backend, cluster=settings.ch_cluster)
    finally:
        backend.close()


def run_worker(settings: Settings, *, migrate_first: bool = True) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status (non-zero when an ingestor crashed)."""
    if settings.processes > 1 and settings.ch_backend is ClickHouseBackend.EMBEDDED:
        raise ValueError(
            "embedded chDB allows one process per data directory: use --processes 1, "
            "or YIBAO_CH_BACKEND=server for several processes"
        )
    if migrate_first:
        migrate_now(settings)
    if settings.processes == 1:
        return _run_one(settings)
    return _supervise(settings)


def _run_one(settings: Settings) -> int:
    import faust

    from streams.app import create_app

    from .logs import configure

    app, service = create_app(settings.worker())
    # Faust's own setup (mode's setup_logging) would replace the root handler with a colorlog one
    # that bypasses the redaction: ours stays, with the libraries at the worker's level as before.
    configure(settings.log_level, settings.log_format.value, libraries=settings.log_level)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True, redirect_stdouts=False,
                          override_logging=False)
    worker.spinner = None  # mode's setup dropped it below WARNING; above, it wrote terminal escapes to stdout
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
        return 1 if service.ingest_crashed else code
    return 1 if service.ingest_crashed else 0


def _supervise(settings: Settings) -> int:
    """Start N single-process workers (distinct web ports) and forward stop signals to them."""
    children: list[subprocess.Popen[bytes]] = []
    for i in range(settings.processes):
        env = dict(os.environ)
        env.update({
            "YIBAO_PROCESSES": "1",
            "YIBAO_WEB_PORT": str(settings.web_port + i if settings.web_port else 0),
            "YIBAO_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "YIBAO_CH_BACKEND": settings.ch_backend.value,
            "YIBAO_CH_HOST": settings.ch_host,
            "YIBAO_CH_PORT": str(settings.ch_port),
            "YIBAO_CH_DATABASE": settings.ch_database,
            "YIBAO_DATA_DIR": str(settings.data_dir),
        })
        children.append(subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate"], env=env))

    def forward(signum: int, frame: FrameType | None) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    deadline: float | None = None
    for c in children:
        while True:
            try:
                codes.append(c.wait(timeout=1))
                break
            except subprocess.TimeoutExpired:
                if any(x.poll() not in (None, 0) for x in children) and deadline is None:
                    log.error("a worker process failed; stopping the others")
                    forward(signal.SIGTERM, None)
                    deadline = time.monotonic() + settings.shutdown_deadline_s + 5
                if deadline is not None and time.monotonic() > deadline:
                    c.kill()
    return max(codes, default=0)
