"""Servers only the tests start: moto's S3 under a durable Tansu broker (the broker-restart tests) and
ZooKeeper for ClickHouse cluster mode (tests/system/test_cluster.py). They build on yibao.localinfra's
LocalServer like the broker and ClickHouse servers the demo and the benchmark use too.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from yibao.localinfra import LOCALHOST, InfraError, LocalServer, MissingBinaryError, free_port

_ZOO_CFG = """tickTime=500
initLimit=10
syncLimit=5
dataDir={data_dir}
clientPort={port}
clientPortAddress={host}
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=srvr
"""


def zookeeper_classpath() -> str:
    """Class path of Debian's ``zookeeper`` package (3.8 on bookworm).

    ClickHouse's ``ON CLUSTER`` DDL needs a coordination service, and ClickHouse 18.16 predates
    ClickHouse Keeper, so a cluster of local 18.16 servers needs a real ZooKeeper. The Debian jar's
    manifest names its dependencies, so the jar alone is the class path.
    """
    jar = Path("/usr/share/java/zookeeper.jar")
    java = shutil.which("java")
    if not jar.is_file() or java is None:
        raise MissingBinaryError(
            "ZooKeeper is not installed; on Debian bookworm run: "
            "apt-get install -y --no-install-recommends zookeeper (or .ci/system-deps.sh)"
        )
    # Without an SLF4J binding ZooKeeper logs nothing at all; the simple one writes to stderr,
    # which ends up in the server's log file.
    simple = Path("/usr/share/java/slf4j-simple.jar")
    return f"{jar}:{simple}" if simple.is_file() else str(jar)


class ZooKeeperServer(LocalServer):
    """A standalone ZooKeeper on 127.0.0.1 (Debian's package, run as a plain JVM process).

    For what ClickHouse servers need it for here: the distributed DDL queue of ``ON CLUSTER``
    statements. Data lives in ``workdir/data``; the JVM heap is capped small because the queue
    holds a handful of nodes.
    """

    name = "zookeeper"

    def __init__(self, *, workdir: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        super().__init__(workdir=workdir, env=env)
        self.classpath = zookeeper_classpath()
        self.port = port if port is not None else free_port()

    @property
    def config_path(self) -> Path:
        return self.workdir / "zoo.cfg"

    def config_xml(self) -> str:
        """The ``<zookeeper>`` section that points a ClickHouse server at this ZooKeeper."""
        return f"<zookeeper><node><host>{LOCALHOST}</host><port>{self.port}</port></node></zookeeper>"

    def _prepare(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            _ZOO_CFG.format(data_dir=data.resolve(), port=self.port, host=LOCALHOST), encoding="utf-8"
        )

    def _ports(self) -> tuple[int, ...]:
        return (self.port,)

    def _command(self) -> list[str]:
        return [
            shutil.which("java") or "java",
            "-Xms32m",
            "-Xmx128m",
            "-XX:+UseSerialGC",
            "-cp",
            self.classpath,
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(self.config_path.resolve()),
        ]

    def _probe(self) -> bool:
        # Not "ruok": it answers "imok" while the database is still loading, when sessions are
        # still refused. "srvr" reports the version only once the server serves requests.
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"srvr")
                return sock.recv(64).startswith(b"Zookeeper version")
        except OSError:
            return False


#: moto's S3 backend served by werkzeug one request at a time. moto checks a PUT's If-None-Match /
#: If-Match and then stores the object in two separate steps; served by threads (``moto_server``),
#: concurrent conditional PUTs of one key can all pass the check (seen with ~6 MB bodies: 5 of 20
#: rounds of 16 writers had several winners), the lost update Tansu's watermarks rely on
#: the server to refuse. One request at a time makes check-and-store atomic.
_MOTO_S3_SERVER = """
import logging, sys
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple
logging.getLogger("werkzeug").setLevel(logging.WARNING)
run_simple(sys.argv[1], int(sys.argv[2]), DomainDispatcherApplication(create_backend_app), threaded=False,
           request_handler=MotoRequestHandler)
"""

#: First moto release whose PutObject honours ``If-Match`` (``If-None-Match: *`` came in 5.0.15).
MOTO_MIN_VERSION = (5, 1, 5)
_MOTO_HINT = "pip install 'moto[server]>=5.1.5' (it is in the test extra: pip install -e '.[test]')"


def moto_server_version() -> str:
    """Version of the installed moto, checked to have its server extra and conditional PutObject.

    Tansu on ``s3://`` storage is only correct on an S3 server that refuses a PUT whose
    ``If-None-Match: *`` or ``If-Match: <etag>`` does not hold (see :class:`S3Server`); moto's
    S3 does so from 5.1.5 on. An older moto counts as missing, with the same install hint.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("moto")
    except PackageNotFoundError:
        raise MissingBinaryError(f"moto (the local S3 server for a durable Tansu) is missing; {_MOTO_HINT}") from None
    if importlib.util.find_spec("flask") is None or importlib.util.find_spec("werkzeug") is None:
        raise MissingBinaryError(f"moto {found} is installed without its server extra; {_MOTO_HINT}")
    numbers = tuple(int(part) for part in found.split(".")[:3] if part.isdigit())
    if numbers < MOTO_MIN_VERSION:
        raise MissingBinaryError(f"moto {found} ignores If-Match on PutObject; {_MOTO_HINT}")
    return found


class S3Server(LocalServer):
    """An S3 server on 127.0.0.1 (moto's) with one bucket, for Tansu's durable ``s3://`` storage.

    A Tansu broker on ``storage_url`` (with :meth:`aws_env` in its environment) keeps topics,
    records and committed group offsets across broker restarts, because they live here.

    Why moto and not npm's s3rver (used until 2026-12): a restarted Tansu starts each partition
    from an empty watermark and writes it with ``If-None-Match: *``, expecting 412 when it exists,
    and it advances watermarks with ``If-Match: <etag>``. s3rver 3.7.1 ignores both headers and
    overwrites, so after a restart a Produce that reaches a partition before any Fetch restarted
    its offsets at 0 over the old batches (5 of 5 runs), and four producers on one partition lost
    half or more of the acknowledged records even without a restart (5 of 5). moto honours both
    headers (0 of 5 in both cases), and :meth:`start` refuses a server that does not.

    The objects live in the server process's memory: they survive any number of broker
    restarts, but ``stop``/``kill``/``restart`` of this server empties it, so restart the broker,
    never the S3 server under it. moto accepts any credentials.
    """

    name = "moto-s3"
    ACCESS_KEY = "yibao-local"
    SECRET_KEY = "yibao-local"
    REGION = "us-east-1"

    def __init__(
        self, *, workdir: Path, port: int | None = None, bucket: str = "tansu", env: dict[str, str] | None = None
    ) -> None:
        super().__init__(workdir=workdir, env=env)
        self.version = moto_server_version()
        self.port = port if port is not None else free_port()
        self.bucket = bucket
        self._s3: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def storage_url(self) -> str:
        """Tansu's ``--storage-engine`` value for this server's bucket."""
        return f"s3://{self.bucket}/"

    def aws_env(self) -> dict[str, str]:
        """Environment a Tansu broker needs to use this server as its storage."""
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self) -> Any:
        """A boto3 S3 client of this server (boto3 comes with moto), failing fast instead of retrying."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.REGION,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            config=Config(connect_timeout=1, read_timeout=10, retries={"max_attempts": 1}),
        )

    def start(self, timeout: float = 30) -> None:
        """Start the server, create the bucket and prove that it refuses conditional writes that fail."""
        if self.running:
            return
        super().start(timeout)
        try:
            self._s3.create_bucket(Bucket=self.bucket)
            self._check_conditional_writes()
        except BaseException:
            self.kill()
            raise

    def _check_conditional_writes(self) -> None:
        """Raise unless a PUT is refused (412) when its ``If-None-Match: *`` or ``If-Match`` fails.

        Cheap (four requests), and it turns an S3 server that would silently let Tansu reuse
        offsets into a start-up error.
        """
        from botocore.exceptions import ClientError

        key = "yibao-localinfra/conditional-write-check"
        s3 = self._s3
        etag = s3.put_object(Bucket=self.bucket, Key=key, Body=b"first", IfNoneMatch="*")["ETag"]
        attempts = (
            ("If-None-Match: * on an existing object", {"IfNoneMatch": "*"}),
            ("If-Match with an outdated ETag", {"IfMatch": '"00000000000000000000000000000000"'}),
        )
        for what, condition in attempts:
            try:
                s3.put_object(Bucket=self.bucket, Key=key, Body=b"second", **condition)
            except ClientError as exc:
                if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412:
                    continue
                raise
            raise InfraError(
                f"{self.name} at {self.endpoint} accepted a PUT with {what}: Tansu on it would reuse offsets "
                f"and lose records (moto {self.version}; {_MOTO_HINT})"
            )
        s3.put_object(Bucket=self.bucket, Key=key, Body=b"third", IfMatch=etag)
        s3.delete_object(Bucket=self.bucket, Key=key)

    def _ports(self) -> tuple[int, ...]:
        return (self.port,)

    def _command(self) -> list[str]:
        return [sys.executable, "-c", _MOTO_S3_SERVER, LOCALHOST, str(self.port)]

    def _probe(self) -> bool:
        # A signed request: moto tells services apart by the signature's scope, and the first S3
        # request is also the one that loads moto's S3 backend.
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=0.5):
                pass
            if self._s3 is None:
                self._s3 = self.client()
            self._s3.list_buckets()
        except Exception:
            return False
        return True
