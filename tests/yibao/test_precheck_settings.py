"""YIBAO_PRECHECK_* settings: the callers file, what is refused before a worker starts (one line naming
the variable), the URL a worker advertises to the others, and the worker's preflight of the check."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yibao.settings import Settings, SettingsError, load_callers, load_settings
from yibao.worker import Problem, _check_precheck, preflight

KEY = "his-api-key-0123456789abcdef"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings from these tests' arguments alone: no YIBAO_* of the shell, no .env of the working directory."""
    for name in list(os.environ):
        if name.startswith("YIBAO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def callers_file(tmp_path: Path, text: str, name: str = "callers.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def good_callers(tmp_path: Path) -> Path:
    (tmp_path / "his-1.key").write_text(KEY + "\n")
    return callers_file(tmp_path, f"""
[[caller]]
id = "his-1"
fixmedins_codes = ["H33010200011"]
api_key_file = "{tmp_path / 'his-1.key'}"
rate_per_s = 20
burst = 40

[[caller]]
id = "his-2.mtls"
fixmedins_codes = ["H33010200012", "P33010200001"]
api_key_sha256 = ["{DIGEST.upper()}"]
cert_cn = "his-2.example"
""")


def precheck_settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"precheck_port": 18443, "precheck_host": "127.0.0.1",
                            "precheck_callers_file": good_callers(tmp_path)}
    return load_settings(**{**base, **kw})


def problem_lines(e: pytest.ExceptionInfo[SettingsError]) -> list[str]:
    """The problems a SettingsError lists, one a line (after its heading)."""
    head, *lines = str(e.value).splitlines()
    assert head == "invalid settings:"
    return [ln.strip() for ln in lines]


# --- the callers file --------------------------------------------------------------------------------------


def test_a_good_callers_file_gives_each_caller_its_institutions_keys_and_rate(tmp_path: Path) -> None:
    one, two = load_callers(good_callers(tmp_path))
    assert (one.id, one.fixmedins_codes, one.api_key_sha256, one.cert_cn) == (
        "his-1", frozenset({"H33010200011"}), frozenset({DIGEST}), None)  # the key file's key, stripped
    assert (one.rate_per_s, one.burst) == (20.0, 40)
    assert (two.id, two.fixmedins_codes, two.api_key_sha256, two.cert_cn) == (
        "his-2.mtls", frozenset({"H33010200012", "P33010200001"}), frozenset({DIGEST}), "his-2.example")
    assert (two.rate_per_s, two.burst) == (50.0, 100)  # the defaults
    assert KEY not in repr((one, two))


@pytest.mark.parametrize(("body", "needle"), [
    ('[[caller]]\nid = "a"\nfixmedins_codes = ["H1"]\ncert_cn = "a"\napi_key = "secret"\n',
     r"caller 1: unknown key\(s\) api_key"),
    ('[[caller]]\nid = "a"\nfixmedins_codes = ["H1"]\ncert_cn = "a"\n\n'
     '[[caller]]\nid = "a"\nfixmedins_codes = ["H2"]\ncert_cn = "b"\n', r"caller 2: id .*unique"),
    ('[[caller]]\nid = "a b"\nfixmedins_codes = ["H1"]\ncert_cn = "a"\n', r"caller 1: id must be"),
    ('[[caller]]\nid = "a"\nfixmedins_codes = ["H1"]\n',
     r"caller 1 \(a\): give api_key_file, api_key_sha256 or cert_cn"),
    ('[[caller]]\nid = "a"\nfixmedins_codes = []\ncert_cn = "a"\n', r"caller 1 \(a\): fixmedins_codes must list"),
    ('[[caller]]\nid = "a"\nfixmedins_codes = ["H1"]\napi_key_sha256 = ["abc123"]\n',
     r"caller 1 \(a\): api_key_sha256 entries are 64 hex digits"),
    ('[[caller]]\nid = "a"\nfixmedins_codes = ["H1"]\napi_key_sha256 = ["' + "g" * 64 + '"]\n',
     r"api_key_sha256 entries are 64 hex digits"),
    ('[[caller]]\nid = "a"\nfixmedins_codes = ["H1"]\ncert_cn = "a"\nrate_per_s = 0\n', r"rate_per_s must be > 0"),
    ("# nobody\n", r"names no \[\[caller\]\]"),
    ("[[caller]\nid = ", r"cannot read"),
])
def test_each_callers_file_problem_is_one_line_naming_the_setting_and_the_caller(
        tmp_path: Path, body: str, needle: str) -> None:
    f = callers_file(tmp_path, body)
    with pytest.raises(ValueError, match=needle):
        load_callers(f)
    with pytest.raises(SettingsError) as e:
        load_settings(precheck_port=18443, precheck_host="127.0.0.1", precheck_callers_file=f)
    [one] = problem_lines(e)
    assert one.startswith("YIBAO_PRECHECK_CALLERS_FILE: "), one


def test_an_api_key_file_that_is_short_or_missing_is_refused_without_showing_the_key(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("tiny-key-15char\n")
    for key_file, needle in ((short, "at least 16 characters"), (tmp_path / "absent.key", "absent.key")):
        f = callers_file(tmp_path, f'[[caller]]\nid = "a"\nfixmedins_codes = ["H1"]\napi_key_file = "{key_file}"\n')
        with pytest.raises(SettingsError) as e:
            load_settings(precheck_port=18443, precheck_host="127.0.0.1", precheck_callers_file=f)
        [one] = problem_lines(e)
        assert one.startswith("YIBAO_PRECHECK_CALLERS_FILE: caller 1 (a): api_key_file") and needle in one, one
        assert "tiny-key-15char" not in one


# --- what cannot work is refused with the settings -----------------------------------------------------------


def test_a_port_without_a_callers_file_is_refused_naming_the_callers_file() -> None:
    with pytest.raises(SettingsError) as e:
        load_settings(precheck_port=18443, precheck_host="127.0.0.1")
    [one] = problem_lines(e)
    assert "YIBAO_PRECHECK_CALLERS_FILE" in one and "YIBAO_PRECHECK_PORT" in one
    assert load_settings().precheck() is None  # port 0: not served, nothing asked
    assert load_settings().worker().precheck is None


def test_a_callers_file_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as e:
        load_settings(precheck_port=18443, precheck_host="127.0.0.1", precheck_callers_file=tmp_path / "nope.toml")
    assert any(ln.startswith("YIBAO_PRECHECK_CALLERS_FILE") for ln in problem_lines(e)), str(e.value)


def test_plain_http_is_refused_off_loopback_unless_explicitly_allowed(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as e:
        precheck_settings(tmp_path, precheck_host="0.0.0.0")
    [one] = problem_lines(e)
    assert "YIBAO_PRECHECK_HOST=0.0.0.0 without TLS" in one and "YIBAO_PRECHECK_TLS_CERT_FILE" in one
    with pytest.raises(SettingsError):
        load_settings(precheck_port=18443, precheck_callers_file=good_callers(tmp_path))  # 0.0.0.0 is the default
    for host in ("127.0.0.1", "::1", "localhost"):
        assert precheck_settings(tmp_path, precheck_host=host).precheck() is not None
    allowed = precheck_settings(tmp_path, precheck_host="0.0.0.0", precheck_allow_plaintext=True).precheck()
    assert allowed is not None and allowed.advertised_url.startswith("http://")


def test_tls_needs_both_certificate_and_key_and_client_certificates_need_tls(tmp_path: Path) -> None:
    pem = tmp_path / "server.pem"
    pem.write_text("-")
    for kw in ({"precheck_tls_key_file": pem}, {"precheck_tls_cert_file": pem}):
        with pytest.raises(SettingsError) as e:
            precheck_settings(tmp_path, **kw)
        [one] = problem_lines(e)
        assert "YIBAO_PRECHECK_TLS_CERT_FILE and YIBAO_PRECHECK_TLS_KEY_FILE go together" in one, one
    with pytest.raises(SettingsError) as e:
        precheck_settings(tmp_path, precheck_client_ca_file=pem)
    [one] = problem_lines(e)
    assert one.startswith("YIBAO_PRECHECK_CLIENT_CA_FILE needs TLS"), one


# --- the server's configuration ------------------------------------------------------------------------------


def test_the_advertised_url_follows_tls_and_the_listening_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    plain = precheck_settings(tmp_path).precheck()
    assert plain is not None
    assert (plain.host, plain.port, plain.advertised_url) == ("127.0.0.1", 18443, "http://127.0.0.1:18443")
    assert [c.id for c in plain.callers] == ["his-1", "his-2.mtls"]
    pem = tmp_path / "server.pem"
    pem.write_text("-")
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "worker-7.yibao.internal")
    tls = precheck_settings(tmp_path, precheck_host="0.0.0.0", precheck_tls_cert_file=pem, precheck_tls_key_file=pem,
                            precheck_client_ca_file=pem, precheck_peer_ca_file=pem).precheck()
    assert tls is not None
    assert tls.advertised_url == "https://worker-7.yibao.internal:18443"
    assert (tls.tls_cert_file, tls.tls_key_file, tls.client_ca_file, tls.peer_ca_file) == (pem, pem, pem, pem)
    named = precheck_settings(tmp_path, precheck_host="0.0.0.0", precheck_tls_cert_file=pem, precheck_tls_key_file=pem,
                              precheck_advertised_host="w1.example").precheck()
    assert named is not None and named.advertised_url == "https://w1.example:18443"
    s = precheck_settings(tmp_path)
    assert s.worker().precheck == s.precheck()


# --- the worker's preflight ----------------------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def messages(problems: list[Problem]) -> list[str]:
    return [p.message for p in problems]


def test_preflight_accepts_a_free_port_with_the_rules_on(tmp_path: Path) -> None:
    assert _check_precheck(precheck_settings(tmp_path, precheck_port=_free_port(), web_port=0)) == []
    assert _check_precheck(load_settings()) == []  # not served: nothing to check


def test_preflight_refuses_the_check_without_the_rules(tmp_path: Path) -> None:
    said = messages(_check_precheck(precheck_settings(tmp_path, precheck_port=_free_port(), web_port=0,
                                                      rules_enabled=False)))
    assert len(said) == 1 and "YIBAO_RULES_ENABLED is false" in said[0], said


def test_preflight_refuses_a_port_another_program_holds(tmp_path: Path, busy_port: int) -> None:
    s = precheck_settings(tmp_path, precheck_port=busy_port, web_port=0)
    said = messages(_check_precheck(s))
    assert said == [f"YIBAO_PRECHECK_PORT: port {busy_port} for the pre-settlement check is in use by another program"]
    assert any(m == said[0] for m in messages(preflight(s, timeout_s=0.2)))  # and the worker's preflight says so


def test_preflight_refuses_a_port_that_is_a_metrics_port(tmp_path: Path) -> None:
    port = _free_port()
    said = messages(_check_precheck(precheck_settings(tmp_path, precheck_port=port, web_port=port)))
    assert said == [f"YIBAO_PRECHECK_PORT: port {port} is a metrics port"], said
    # with two processes, the second process's check port is the first's metrics port + 1
    said = messages(_check_precheck(precheck_settings(tmp_path, precheck_port=port + 1, web_port=port, processes=2)))
    assert f"YIBAO_PRECHECK_PORT: port {port + 1} is a metrics port" in said, said
