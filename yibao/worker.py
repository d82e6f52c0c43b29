"""Running worker processes: one in-process Faust worker, or N supervised child processes.

Before anything joins a consumer group, :func:`preflight` checks every setting the worker will
need (files, keys, ports, the rule base, the broker, ClickHouse) and reports all that is wrong at
once, one problem each. Without it each mistake surfaced alone, seconds into start-up, after Faust
had joined its group and created topics, as a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import structlog

from .settings import ClickHouseBackend, Settings

log = structlog.get_logger(__name__)

#: Budget of the network probes (broker and ClickHouse run side by side): enough for a TLS and SASL
#: handshake across a data centre, short enough that an operator sees a wrong address at once.
PREFLIGHT_TIMEOUT_S = 4.0


@dataclass(frozen=True)
class Problem:
    """One thing that keeps the worker from starting: what is wrong, and what to do about it."""

    message: str
    hint: str | None = None


class WorkerRefused(Exception):
    """The preflight found problems; the worker did not start (nothing joined, nothing created)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def migrate_now(settings: Settings) -> None:
    from sinks import connect
    from sinks.migrate import migrate

    backend = connect(settings.clickhouse())
    try:
        migrate(backend, cluster=settings.ch_cluster)
    finally:
        backend.close()


def run_worker(settings: Settings, *, migrate_first: bool = True, preflight_first: bool = True) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status (non-zero when an ingestor crashed).

    Raises :class:`WorkerRefused` when the preflight finds problems. The children of a
    multi-process worker skip it (``preflight_first=False``): their parent checked once, for all.
    """
    if preflight_first:
        problems = preflight(settings)
        if problems:
            raise WorkerRefused(problems)
    if migrate_first:
        migrate_now(settings)
    if settings.processes == 1:
        return _run_one(settings)
    return _supervise(settings)


# --- preflight -----------------------------------------------------------------------------------
def preflight(settings: Settings, *, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> list[Problem]:
    """Every problem that would stop the worker, found before it joins a group or creates a topic.

    Local checks first (processes, rule base, key, data directory, web ports), then the broker and
    ClickHouse probed side by side within ``timeout_s``. A ClickHouse that answers sets
    ``yibao_sink_up`` to 1, so an idle worker does not look cut off from it.
    """
    problems = [*_check_processes(settings), *_check_rules(settings), *_check_key(settings),
                *_check_data_dir(settings), *_check_state_dir(settings), *_check_web_ports(settings),
                *_check_precheck(settings)]
    problems += _check_network(settings, timeout_s)
    problems += _check_schema_registry(settings, timeout_s)
    return problems


def _check_schema_registry(s: Settings, timeout_s: float) -> list[Problem]:
    """The shop's Schema Registry, when one is set, answers with these credentials and this TLS: a wrong
    one would otherwise turn every event framed with a producer's own schema id into a dead letter."""
    cfg = s.schema_registry()
    if cfg is None:
        return []
    from dataclasses import replace

    from schemas import Registry
    from schemas.registry_client import RegistryClientError, SchemaRegistryClient, conflicting_ids

    try:
        client = SchemaRegistryClient(replace(cfg, timeout_s=min(cfg.timeout_s, timeout_s)))
        client.ping()
        taken = conflicting_ids(client, Registry.load())
    except RegistryClientError as exc:
        return [Problem(str(exc), "check YIBAO_SCHEMA_REGISTRY_URL (and _USERNAME/_PASSWORD, _CA_FILE/_CERT_FILE); "
                                  "unset it to decode only the manifest's schema ids")]
    return [Problem(f"schema id {sv.id} in the schema registry at {client.base} is another schema than yibao's "
                    f"{sv.subject} v{sv.version}: events other producers frame with it would be misread",
                    "point YIBAO_SCHEMA_REGISTRY_URL at a registry holding yibao's ids (`yibao schemas register "
                    "--registry-url URL` publishes them)") for sv in taken]


def _check_processes(s: Settings) -> list[Problem]:
    if s.processes > 1 and s.ch_backend is ClickHouseBackend.EMBEDDED:
        return [Problem(f"YIBAO_PROCESSES={s.processes}: embedded chDB allows one process per data directory",
                        "use --processes 1, or YIBAO_CH_BACKEND=server for several processes")]
    return []


def _check_rules(s: Settings) -> list[Problem]:
    """The seed rule base loads and every rule in it checks out, as the worker will load it."""
    if not s.rules_enabled:
        return []
    from streams.rules import KnowledgeError, RuleError
    from streams.topology import build_rulebook

    try:
        build_rulebook(s.rules_file)
    except (RuleError, KnowledgeError) as exc:
        where = "YIBAO_RULES_FILE: " if s.rules_file is not None else "the shipped rule base: "
        return [Problem(where + str(exc), "fix the file, unset YIBAO_RULES_FILE for the shipped rule base, "
                                          "or YIBAO_RULES_ENABLED=false")]
    return []


def _check_key(s: Settings) -> list[Problem]:
    """The pseudonymization key decodes to at least 16 bytes (a missing one is generated later, in the
    data directory, which :func:`_check_data_dir` checks)."""
    from streams.privacy import PrivacyError, load_key

    generated = s.data_dir / "pseudo.key"
    if s.pseudo_key_file is not None:
        where = f"YIBAO_PSEUDO_KEY_FILE ({s.pseudo_key_file})"
    elif s.pseudo_key is not None:
        where = "YIBAO_PSEUDO_KEY"
    elif generated.exists():
        where = f"the generated key {generated}"
    else:
        return []
    p = s.privacy()
    try:
        load_key(p.key, p.key_file, s.data_dir, create=False)
    except (PrivacyError, OSError) as exc:
        return [Problem(f"{where}: {exc}",
                        "a key is at least 16 random bytes, as hex: `openssl rand -hex 32 > key`, then "
                        "YIBAO_PSEUDO_KEY_FILE=key (every worker of a deployment uses the same key)")]
    return []


def _check_data_dir(s: Settings) -> list[Problem]:
    """The data directory can be written (Faust's state, a generated key, chDB), and an embedded
    store is not held by another live process (chDB would refuse it after the migration)."""
    d = s.data_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [Problem(f"YIBAO_DATA_DIR: cannot create {d}: {exc.strerror or exc}",
                        "point YIBAO_DATA_DIR (or --data-dir) at a directory this user can write")]
    if not os.access(d, os.W_OK | os.X_OK):
        return [Problem(f"YIBAO_DATA_DIR: {d} is not writable by this user",
                        "point YIBAO_DATA_DIR (or --data-dir) at a directory this user can write")]
    if s.ch_backend is ClickHouseBackend.EMBEDDED:
        owner = _embedded_owner(s)
        if owner is not None:
            return [Problem(f"the embedded ClickHouse data dir {s.chdb_path} is in use by process {owner}",
                            "chDB allows one process per data dir: stop that process, or use another "
                            "YIBAO_DATA_DIR")]
    return []


def _check_state_dir(s: Settings) -> list[Problem]:
    """With the persons on disk: each process's state directory opens (writable, not held by another
    worker process: RocksDB allows one)."""
    if s.state_store != "disk" or not s.rules_enabled:
        return []
    from streams.rules.diskstore import DiskStore

    base = s.state_path()
    dirs = [base] if s.processes == 1 else [base / f"process-{i}" for i in range(s.processes)]
    for d in dirs:
        try:
            DiskStore("person", "", path=d / "person").close()
        except (OSError, RuntimeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return [Problem(f"YIBAO_STATE_DIR: {d}: {reason}",
                            "point YIBAO_STATE_DIR at a directory this user can write, one per worker process "
                            "(or stop the worker using it)")]
    return []


def _embedded_owner(s: Settings) -> int | None:
    """The live process (other than this one) that marked the chDB data dir as in use, if any."""
    from sinks.embedded import IN_USE

    try:
        pid = int((s.chdb_path / IN_USE).read_text(encoding="ascii").strip() or "0")
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _check_web_ports(s: Settings) -> list[Problem]:
    """Each process's metrics/health port can be bound as Faust binds it (all interfaces, reuse)."""
    if s.web_port == 0:
        return []
    problems = []
    for i in range(s.processes):
        port = s.web_port + i
        which = "YIBAO_WEB_PORT" if i == 0 else f"YIBAO_WEB_PORT+{i} (process {i})"
        if port > 65535:
            problems.append(Problem(f"{which}: port {port} does not exist",
                                    "set YIBAO_WEB_PORT so that it plus the process count stays below 65536"))
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as exc:
                why = "is in use by another program" if exc.errno == errno.EADDRINUSE else \
                    f"cannot be opened ({exc.strerror or exc})"
                problems.append(Problem(
                    f"{which}: port {port} for the metrics and health page {why}",
                    "set YIBAO_WEB_PORT (or --web-port) to a free port, or 0 for no page"))
    return problems


def _check_precheck(s: Settings) -> list[Problem]:
    """The pre-settlement check needs the rules (it answers with their hits) and a port per process."""
    if s.precheck_port == 0:
        return []
    problems = []
    if not s.rules_enabled:
        problems.append(Problem("YIBAO_PRECHECK_PORT is set but YIBAO_RULES_ENABLED is false: the check answers "
                                "with the rules' hits", "enable the rules, or set YIBAO_PRECHECK_PORT=0"))
    for i in range(s.processes):
        port = s.precheck_port + i
        which = "YIBAO_PRECHECK_PORT" if i == 0 else f"YIBAO_PRECHECK_PORT+{i} (process {i})"
        clash = s.web_port and s.web_port <= port < s.web_port + s.processes
        if port > 65535 or clash:
            problems.append(Problem(f"{which}: port {port} " + ("is a metrics port" if clash else "does not exist"),
                                    "set YIBAO_PRECHECK_PORT apart from YIBAO_WEB_PORT, below 65536 with the "
                                    "process count"))
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((s.precheck_host, port))
            except OSError as exc:
                why = "is in use by another program" if exc.errno == errno.EADDRINUSE else \
                    f"cannot be opened ({exc.strerror or exc})"
                problems.append(Problem(f"{which}: port {port} for the pre-settlement check {why}",
                                        "set YIBAO_PRECHECK_PORT to a free port"))
    return problems


def _check_network(s: Settings, timeout_s: float) -> list[Problem]:
    """The broker and ClickHouse, probed at the same time so that two dead hosts cost one timeout."""
    ch: list[Problem] = []
    probe = threading.Thread(target=lambda: ch.extend(_check_clickhouse(s, timeout_s)),
                             name="preflight-clickhouse", daemon=True)  # a hung DNS lookup must not pin exit
    started = time.monotonic()
    probe.start()
    problems = _check_broker(s, timeout_s)
    probe.join(max(0.0, timeout_s + 1 - (time.monotonic() - started)))
    if probe.is_alive():
        return [*problems, Problem(f"ClickHouse at {s.ch_host}:{s.ch_port} did not answer within {timeout_s:g} s",
                                   _CH_HINT)]
    return [*problems, *ch]


_CH_HINT = ("check YIBAO_CH_HOST and YIBAO_CH_PORT (the native port, 9000 or 9440 with TLS); "
            "a worker does not start without ClickHouse, its supervisor restarts it")


def _check_clickhouse(s: Settings, timeout_s: float) -> list[Problem]:
    """ClickHouse answers ``SELECT 1`` as the configured user (reachability and credentials)."""
    if s.ch_backend is not ClickHouseBackend.SERVER:
        _sink_up(1)
        return []
    from sinks.base import SinkError, SinkUnavailable
    from sinks.server import ServerBackend

    c = s.clickhouse()
    try:
        backend = ServerBackend(host=c.host, port=c.port, database=c.database, user=c.user, password=c.password,
                                secure=c.secure, verify=c.verify, ca_certs=c.ca_certs, connect_timeout=timeout_s,
                                send_receive_timeout=timeout_s)
    except (ValueError, OSError) as exc:
        return [Problem(f"ClickHouse settings: {exc}", _CH_HINT)]
    try:
        backend.query("SELECT 1")
    except SinkUnavailable as exc:
        _sink_up(0)
        return [Problem(str(exc), _CH_HINT)]
    except SinkError as exc:
        if exc.code in _AUTH_CODES:
            return [Problem(str(exc), "check YIBAO_CH_USER and YIBAO_CH_PASSWORD (or YIBAO_CH_PASSWORD_FILE)")]
        return [Problem(str(exc))]
    finally:
        backend.close()
    _sink_up(1)
    return []


#: UNKNOWN_USER, WRONG_PASSWORD, REQUIRED_PASSWORD, AUTHENTICATION_FAILED
_AUTH_CODES = frozenset({192, 193, 194, 516})


def _sink_up(value: int) -> None:
    from streams import metrics

    metrics.SINK_UP.set(value)


def _check_broker(s: Settings, timeout_s: float) -> list[Problem]:
    """A bootstrap server answers a metadata request over the configured protocol (TLS, SASL)."""
    hint = "check YIBAO_KAFKA_BOOTSTRAP (or --bootstrap) and YIBAO_KAFKA_SECURITY_PROTOCOL / SASL / SSL settings"
    try:
        kwargs = s.kafka_client_kwargs()
    except (OSError, ValueError) as exc:  # a TLS file that is not a certificate or key
        return [Problem(f"Kafka TLS settings: {exc}", "check YIBAO_KAFKA_SSL_CAFILE / _CERTFILE / _KEYFILE")]
    with _captured("aiokafka", "aiokafka.conn") as said:
        try:
            asyncio.run(_bootstrap(kwargs, timeout_s))
        except TimeoutError:
            return [Problem(f"no Kafka broker answered at {s.kafka_bootstrap} within {timeout_s:g} s", hint)]
        except Exception as exc:
            if type(exc).__module__.split(".")[0] not in ("aiokafka", "kafka", "ssl") and not isinstance(exc, OSError):
                raise
            # aiokafka's own line per bootstrap server says why; the exception only that all failed
            reasons = [re.sub(r'^Unable connect to "([^"]*)": ', r"\1: ", m) for m in said]
            reason = "; ".join(dict.fromkeys(reasons)) or f"{type(exc).__name__}: {exc}"
            return [Problem(f"no Kafka broker answers at {s.kafka_bootstrap} ({reason})", hint)]
    return []


async def _bootstrap(kwargs: dict[str, object], timeout_s: float) -> None:
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(**kwargs, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
    finally:
        await client.close()


@contextmanager
def _captured(*names: str) -> Iterator[list[str]]:
    """The messages these loggers emit meanwhile, kept from the log: the probe reports them itself."""
    said: list[str] = []

    class Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno >= logging.WARNING:
                said.append(record.getMessage())
            return False

    keep = Keep()
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(keep)
    try:
        yield said
    finally:
        for lg in loggers:
            lg.removeFilter(keep)


# --- running ---------------------------------------------------------------------------------------
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
            "YIBAO_PRECHECK_PORT": str(settings.precheck_port + i if settings.precheck_port else 0),
            "YIBAO_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "YIBAO_CH_BACKEND": settings.ch_backend.value,
            "YIBAO_CH_HOST": settings.ch_host,
            "YIBAO_CH_PORT": str(settings.ch_port),
            "YIBAO_CH_DATABASE": settings.ch_database,
            "YIBAO_DATA_DIR": str(settings.data_dir),
            "YIBAO_STATE_DIR": str(settings.state_path() / f"process-{i}"),
        })
        children.append(subprocess.Popen([sys.executable, "-m", "yibao.cli", "worker", "--no-migrate",
                                          "--no-preflight"], env=env))

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
