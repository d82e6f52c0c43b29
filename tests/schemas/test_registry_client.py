"""The Schema Registry client (schemas/registry_client.py): Confluent's REST API over HTTP(S), basic
auth, TLS, its error bodies, and publishing the manifest with its ids kept.

The registry here is yibao's own (`yibao registry serve --writable`, started as a user would): it
proves the client speaks the API as that server implements it, which is less than proof against
Confluent's. Auth, TLS and server failures are checked against a small HTTPS server in this file.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from schemas import Registry
from schemas.registry import canonical_form, value_subject
from schemas.registry_client import (
    RegistryClientConfig,
    RegistryConflict,
    RegistryRequestError,
    RegistryUnavailable,
    SchemaRegistryClient,
    publish_manifest,
)
from yibao.localinfra import free_port

YIBAO = Path(sys.executable).parent / "yibao"
MANIFEST = Registry.load()
IDS = {value_subject(sv.subject): sv.id for sv in MANIFEST.all_versions()}


# --- yibao's registry, as a subprocess ---------------------------------------------------------------
def start_registry(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = tmp_path / f"registry-{port}.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([str(YIBAO), "registry", "serve", "--port", str(port), *args],
                                stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={k: v for k, v in os.environ.items() if not k.startswith("YIBAO_")})
    deadline = time.monotonic() + 30
    while "schema registry (" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def empty_registry(tmp_path: Path) -> Iterator[SchemaRegistryClient]:
    """A new, empty registry that accepts registrations and modes (in memory)."""
    proc, url = start_registry(tmp_path, "--writable", "--empty")
    try:
        yield SchemaRegistryClient(RegistryClientConfig(url))
    finally:
        stop(proc)


def subjects(client: SchemaRegistryClient) -> list[str]:
    return list(client._call("GET", "/subjects"))


def test_publish_keeps_ids_and_versions_restores_modes_and_is_idempotent(empty_registry: SchemaRegistryClient) -> None:
    c = empty_registry
    first = publish_manifest(c, MANIFEST, "yibao.")
    assert {(p.subject, p.version, p.id) for p in first} == {
        (value_subject(sv.subject), sv.version, sv.id) for sv in MANIFEST.all_versions()}
    assert all(p.registered for p in first)
    for sv in MANIFEST.all_versions():
        there = c.subject_version(value_subject(sv.subject), sv.version)
        assert there is not None and there.id == sv.id
        assert canonical_form(c.schema_by_id(sv.id).text) == canonical_form(sv.schema)
        assert c.mode(value_subject(sv.subject)) in (None, "READWRITE")  # IMPORT was put back
    assert c.mode() == "READWRITE"

    again = publish_manifest(c, MANIFEST, "yibao.")
    assert [(p.subject, p.id, p.registered) for p in again] == [(p.subject, p.id, False) for p in first]
    assert all(c.subject_versions(s) == [1] for s in IDS)


def test_an_id_held_by_another_schema_stops_before_anything_is_written(empty_registry: SchemaRegistryClient) -> None:
    c = empty_registry
    taken = IDS["yibao.supervision-value"]
    c.set_mode("IMPORT", "billing-value")
    c.register("billing-value", {"type": "record", "name": "Invoice", "fields": [{"name": "n", "type": "long"}]},
               schema_id=taken, version=1)
    c.set_mode("READWRITE", "billing-value")

    with pytest.raises(RegistryConflict) as ei:
        publish_manifest(c, MANIFEST, "yibao.")
    assert f"schema id {taken} is taken" in str(ei.value)
    assert "yibao.supervision-value" in str(ei.value)
    assert ei.value.hint
    assert subjects(c) == ["billing-value"]  # not one of yibao's subjects was written
    assert all(c.mode(s) is None for s in IDS)


def test_a_version_held_under_another_id_is_a_conflict(empty_registry: SchemaRegistryClient) -> None:
    c = empty_registry
    alerts = MANIFEST.latest("alerts")
    c.set_mode("IMPORT", "yibao.alerts-value")
    c.register("yibao.alerts-value", alerts.schema, schema_id=777, version=alerts.version)
    c.set_mode("READWRITE", "yibao.alerts-value")
    with pytest.raises(RegistryConflict) as ei:
        publish_manifest(c, MANIFEST, "yibao.")
    assert "yibao.alerts-value version 1" in str(ei.value) and "777" in str(ei.value)
    assert subjects(c) == ["yibao.alerts-value"]


def test_a_registry_without_import_mode_is_refused_before_any_write(tmp_path: Path) -> None:
    proc, url = start_registry(tmp_path)  # read-only: mode changes refused, like a registry without IMPORT
    try:
        c = SchemaRegistryClient(RegistryClientConfig(url))
        # it serves the manifest already: nothing to do, nothing asked
        assert not any(p.registered for p in publish_manifest(c, MANIFEST, "yibao."))
        with pytest.raises(RegistryConflict) as ei:
            publish_manifest(c, MANIFEST, "other.")
        assert "cannot be put in IMPORT mode" in str(ei.value)
        assert not [s for s in subjects(c) if s.startswith("other.")]
    finally:
        stop(proc)


def test_missing_ids_and_subjects_carry_the_registry_error_code(empty_registry: SchemaRegistryClient) -> None:
    c = empty_registry
    with pytest.raises(RegistryRequestError) as ei:
        c.schema_by_id(424242)
    assert (ei.value.status, ei.value.error_code) == (404, 40403)
    assert c.base in str(ei.value) and "40403" in str(ei.value)
    assert c.subject_versions("nobody-value") == []
    assert c.subject_version("nobody-value", 1) is None


def test_a_closed_port_is_unavailable_and_says_where() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistryUnavailable) as ei:
        SchemaRegistryClient(RegistryClientConfig(url)).schema_by_id(1)
    assert url in str(ei.value)


def test_a_registry_that_never_answers_times_out() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as ei:
            SchemaRegistryClient(RegistryClientConfig(url, timeout_s=0.5)).schema_by_id(1)
        assert time.monotonic() - started < 5
        assert "timed out" in str(ei.value)


# --- auth, TLS and failures, against a small HTTPS server --------------------------------------------
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey | None, *, ca: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    data = cert.public_bytes(serialization.Encoding.PEM) if cert else b""
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, srv_key, cli_key = _key(), _key(), _key()
    ca = _cert("registry test CA", ca_key, None, None, ca=True)
    return {"ca": _pem(d / "ca.pem", ca),
            "server": _pem(d / "server.pem", _cert("127.0.0.1", srv_key, ca, ca_key), srv_key),
            "client_cert": _pem(d / "client.pem", _cert("yibao-worker", cli_key, ca, ca_key)),
            "client_key": _pem(d / "client.key", key=cli_key)}


Answer = Callable[[http.server.BaseHTTPRequestHandler], tuple[int, Any]]


class _Handler(http.server.BaseHTTPRequestHandler):
    answer: Answer
    seen: list[dict[str, str]]

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers))
        status, body = self.answer(self)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def https_registry(pki: dict[str, Path]) -> Iterator[Callable[[Answer], tuple[str, list[dict[str, str]]]]]:
    """Start an HTTPS server that requires a client certificate signed by the test CA and answers
    every GET with ``answer(request)``; returns its URL and the request headers it saw."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(answer: Answer) -> tuple[str, list[dict[str, str]]]:
        seen: list[dict[str, str]] = []
        handler = type("H", (_Handler,), {"answer": staticmethod(answer), "seen": seen})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(str(pki["server"]))
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"https://127.0.0.1:{srv.server_address[1]}", seen

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _basic_auth(user: str, password: str) -> Answer:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def answer(req: http.server.BaseHTTPRequestHandler) -> tuple[int, Any]:
        if req.headers.get("Authorization") != expected:
            return 401, {"error_code": 401, "message": "Unauthorized"}
        return 200, {"schema": '{"type":"string"}'}

    return answer


def test_basic_auth_and_mutual_tls(https_registry: Any, pki: dict[str, Path]) -> None:
    url, seen = https_registry(_basic_auth("yibao", "s3cret:pw"))
    tls = {"ca_file": pki["ca"], "cert_file": pki["client_cert"], "key_file": pki["client_key"]}
    got = SchemaRegistryClient(RegistryClientConfig(url, "yibao", "s3cret:pw", **tls)).schema_by_id(5)
    assert got.schema == {"type": "string"}
    assert seen[-1]["Accept"].startswith("application/vnd.schemaregistry.v1+json")

    # the credentials may ride in the URL, as Confluent's clients take them; messages never show them
    in_url = SchemaRegistryClient(RegistryClientConfig(url.replace("https://", "https://yibao:s3cret%3Apw@"), **tls))
    assert in_url.schema_by_id(5).schema == {"type": "string"}
    assert "s3cret" not in in_url.base

    with pytest.raises(RegistryRequestError) as ei:
        SchemaRegistryClient(RegistryClientConfig(url, "yibao", "wrong", **tls)).schema_by_id(5)
    assert ei.value.status == 401 and "username and password" in str(ei.value)
    assert "wrong" not in str(ei.value)


def test_tls_refuses_an_untrusted_server_and_a_missing_client_certificate(https_registry: Any,
                                                                        pki: dict[str, Path]) -> None:
    url, _ = https_registry(_basic_auth("u", "p"))
    with pytest.raises(RegistryUnavailable) as ei:
        SchemaRegistryClient(RegistryClientConfig(url, "u", "p", cert_file=pki["client_cert"],
                                                  key_file=pki["client_key"])).schema_by_id(1)
    assert "not trusted" in str(ei.value)
    with pytest.raises(RegistryUnavailable):
        SchemaRegistryClient(RegistryClientConfig(url, "u", "p", ca_file=pki["ca"])).schema_by_id(1)


def test_a_server_error_is_unavailable_with_its_error_code(https_registry: Any, pki: dict[str, Path]) -> None:
    url, _ = https_registry(lambda req: (500, {"error_code": 50001, "message": "Error in the backend data store"}))
    tls = {"ca_file": pki["ca"], "cert_file": pki["client_cert"], "key_file": pki["client_key"]}
    with pytest.raises(RegistryUnavailable) as ei:
        SchemaRegistryClient(RegistryClientConfig(url, **tls)).schema_by_id(1)
    assert (ei.value.status, ei.value.error_code) == (500, 50001)
    assert "backend data store" in str(ei.value)
