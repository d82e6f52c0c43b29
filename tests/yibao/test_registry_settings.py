"""YIBAO_SCHEMA_REGISTRY_* settings: what reaches the registry client, what is refused (one line naming
the variable), what `config show` hides, and the worker's preflight of the registry."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas import Registry
from yibao import cli
from yibao.localinfra import free_port
from yibao.settings import SettingsError, load_settings
from yibao.worker import preflight

runner = CliRunner()


def test_unset_means_no_registry() -> None:
    assert load_settings().schema_registry() is None
    assert load_settings().worker().schema_registry is None


def test_the_client_config_carries_url_credentials_tls_and_timeout(tmp_path: Path) -> None:
    pw = tmp_path / "registry-password"
    pw.write_text("Pa55-from-file\n")
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    for f in (ca, cert, key):
        f.write_text("-")
    s = load_settings(schema_registry_url="https://sr.internal:8081", schema_registry_username="yibao",
                      schema_registry_password_file=pw, schema_registry_ca_file=ca, schema_registry_cert_file=cert,
                      schema_registry_key_file=key, schema_registry_timeout_s=2.5)
    cfg = s.schema_registry()
    assert cfg is not None
    assert (cfg.url, cfg.username, cfg.password) == ("https://sr.internal:8081", "yibao", "Pa55-from-file")
    assert (cfg.ca_file, cfg.cert_file, cfg.key_file, cfg.timeout_s) == (ca, cert, key, 2.5)
    assert s.worker().schema_registry == cfg
    assert "Pa55" not in repr(cfg)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"schema_registry_url": "registry:8081"}, "YIBAO_SCHEMA_REGISTRY_URL"),
    ({"schema_registry_url": "http://sr:80x1"}, "YIBAO_SCHEMA_REGISTRY_URL"),
    ({"schema_registry_url": "http://sr:8081", "schema_registry_password": "p"}, "YIBAO_SCHEMA_REGISTRY_USERNAME"),
    ({"schema_registry_username": "u"}, "YIBAO_SCHEMA_REGISTRY_URL"),
    ({"schema_registry_url": "https://sr", "schema_registry_ca_file": "/nonexistent/ca.pem"},
     "YIBAO_SCHEMA_REGISTRY_CA_FILE"),
    ({"schema_registry_url": "https://sr", "schema_registry_password_file": "/nonexistent/pw"},
     "YIBAO_SCHEMA_REGISTRY_PASSWORD_FILE"),
])
def test_bad_registry_settings_name_the_variable(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(SettingsError) as ei:
        load_settings(**kw)
    assert needle in str(ei.value)


def test_tls_files_need_https_and_a_key_needs_its_certificate(tmp_path: Path) -> None:
    f = tmp_path / "x.pem"
    f.write_text("-")
    with pytest.raises(SettingsError, match=r"YIBAO_SCHEMA_REGISTRY_CA_FILE.*https"):
        load_settings(schema_registry_url="http://sr:8081", schema_registry_ca_file=f)
    with pytest.raises(SettingsError, match="YIBAO_SCHEMA_REGISTRY_CERT_FILE is not"):
        load_settings(schema_registry_url="https://sr:8081", schema_registry_key_file=f)


def test_config_show_hides_the_registry_password_also_inside_the_url() -> None:
    res = runner.invoke(cli.app, ["config", "show"], env={
        "YIBAO_SCHEMA_REGISTRY_URL": "https://svc:url-Secret-9x@sr.internal:8081",
        "YIBAO_SCHEMA_REGISTRY_USERNAME": "svc", "YIBAO_SCHEMA_REGISTRY_PASSWORD": "env-Secret-4k"})
    assert res.exit_code == 0, res.output
    assert "sr.internal:8081" in res.output  # positive control: the setting is shown
    assert "url-Secret-9x" not in res.output and "env-Secret-4k" not in res.output


#: what the stand-in registry holds: schema id -> schema text
HELD: dict[int, str] = {}


class _Registry(BaseHTTPRequestHandler):
    """Answers GET /config and GET /schemas/ids/{id} from HELD, to requests with credentials."""

    def do_GET(self) -> None:
        status, body = 401, {"error_code": 401, "message": "Unauthorized"}
        if self.headers.get("Authorization") is not None:
            sid = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/schemas/ids/") else None
            if self.path == "/config":
                status, body = 200, {"compatibilityLevel": "BACKWARD"}
            elif sid in HELD:
                status, body = 200, {"schema": HELD[sid]}
            else:
                status, body = 404, {"error_code": 40403, "message": "Schema not found"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def registry_url() -> Iterator[str]:
    HELD.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _registry_problems(tmp_path: Path, **kw: Any) -> list[str]:
    s = load_settings(data_dir=tmp_path / "data", web_port=0, pseudo_key="ab" * 16, ch_backend="embedded",
                      kafka_bootstrap=f"127.0.0.1:{free_port()}", **kw)
    return [p.message for p in preflight(s, timeout_s=2) if "registry" in p.message]


def test_the_worker_preflight_checks_the_registry(tmp_path: Path, registry_url: str) -> None:
    auth = {"schema_registry_username": "u", "schema_registry_password": "p"}
    assert _registry_problems(tmp_path, schema_registry_url=registry_url, **auth) == []
    settlement = Registry.load().latest("settlement")
    HELD[settlement.id] = json.dumps(settlement.schema)  # yibao's own schema under its id: fine
    assert _registry_problems(tmp_path, schema_registry_url=registry_url, **auth) == []
    HELD[settlement.id] = '{"type":"record","name":"Invoice","fields":[{"name":"n","type":"long"}]}'
    (taken,) = _registry_problems(tmp_path, schema_registry_url=registry_url, **auth)
    assert f"schema id {settlement.id}" in taken and "another schema" in taken
    (unauthorized,) = _registry_problems(tmp_path, schema_registry_url=registry_url)
    assert "401" in unauthorized and registry_url in unauthorized
    closed = f"http://127.0.0.1:{free_port()}"
    (down,) = _registry_problems(tmp_path, schema_registry_url=closed)
    assert closed in down and "cannot be reached" in down
    assert _registry_problems(tmp_path) == []
