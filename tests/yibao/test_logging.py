"""Logs never hold personal data (yibao/logs.py): the redactor on its own, then whole log lines from
our loggers, the libraries' stdlib loggers, Faust's worker and a crashing process, in both formats.

Every identifier below is what a consumer record holds in clear; a line that shows one, or shows a
traceback's local variables (the canary), is the defect of issue 10.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import pytest
import structlog

from yibao import logs
from yibao.logs import MASK, redact_text, redact_value
from yibao.settings import SettingsError, load_settings

PSN_NO = "33000000000000012345"  # the generator's shape: region[:2] + "0000" + 14 digits
CERT = "110101199003071234"
CERT_X = "11010119900307123X"
OLD_CERT = "110101900307123"
TEL = "13812345678"
NAME = "张三丰"
BRDY = "1990-03-07"
RPTR_NAME = "李四"
CLEAR = (PSN_NO, CERT, CERT_X, OLD_CERT, TEL, NAME, BRDY, RPTR_NAME)
#: Held by a local variable only: seen in a log line only if the traceback shows locals.
CANARY = "canary-held-by-a-local-only"
FORMATS = ("console", "json")


def assert_clean(text: str) -> None:
    for value in (*CLEAR, CANARY):
        assert value not in text, f"{value!r} in the log output:\n{text}"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test configures logging for the whole process; put back what was there."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hooks = sys.excepthook, threading.excepthook
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    structlog.configure(**config)


# --- the redactor -------------------------------------------------------------------------------
def test_personal_fields_are_masked_at_any_depth() -> None:
    record = {
        "setl_id": "S2024000001", "fixmedins_code": "H13012300011", "hilist_name": "阿莫西林胶囊",
        "psn_no": PSN_NO, "psn_cert_no": CERT, "psn_name": NAME, "tel": TEL, "brdy": BRDY,
        "tip": {"rptr_name": RPTR_NAME, "rptr_cert_no": CERT_X, "rptr_tel": TEL, "PSN_NAME": NAME},
        "persons": [{"cert_no": CERT}, ({"mobile": TEL, "patient_name": NAME},)],
        "psn_token": "k1.abcdefghijklmnopqrstuvwx",
    }
    out = redact_value(record)
    assert_clean(repr(out))
    assert out["psn_name"] == out["brdy"] == out["tip"]["rptr_name"] == out["persons"][1][0]["patient_name"] == MASK
    assert out["setl_id"] == "S2024000001" and out["hilist_name"] == "阿莫西林胶囊"
    assert out["fixmedins_code"] == "H13012300011", "an institution code is not a phone number"
    assert out["psn_token"] == "k1.abcdefghijklmnopqrstuvwx", "tokens are what logs may show"
    assert redact_value({"psn_name": None}) == {"psn_name": None}, "an absent value hides nothing"


@pytest.mark.parametrize("text", [
    f"person {PSN_NO} settled", f"cert={CERT}", f"reporter {CERT_X}.", f"old card {OLD_CERT}",
    f"call {TEL}", "call +86 138-1234-5678", "call 138 1234 5678", f"tel:{TEL}",
    f"trace code 8{'0' * 19}", f"key {CERT}{PSN_NO}",
])
def test_identifier_patterns_are_masked_in_every_string(text: str) -> None:
    out = redact_text(text)
    assert MASK in out
    assert not any(ch.isdigit() for ch in out.split(MASK)[-1][:4]), out
    for value in (PSN_NO, CERT, CERT_X, OLD_CERT, TEL, "1234-5678", "1234 5678"):
        assert value not in out


@pytest.mark.parametrize("kept", [
    "H13012300011", "D510105000123", "XA01ABD075A002010100483", "2024-03-07T12:00:00.123456Z",
    "offset 1718000000000", "amount 12345.67", "J18.900", "k1.abc2345", "batch of 5000 events in 1.2 s",
])
def test_codes_dates_and_counts_are_kept_beside_a_masked_identifier(kept: str) -> None:
    assert redact_text(f"{kept} for {CERT}") == f"{kept} for {MASK}"


def test_personal_values_after_their_key_are_masked_in_text() -> None:
    text = (f"bad record {{'psn_name': '{NAME}', 'setl_id': 'S1'}} psn_name={NAME} "
            f"\"rptr_name\": \"{RPTR_NAME}\" brdy={BRDY}, rptr_tel='{TEL}' a=PSN_NAME={NAME}")
    out = redact_text(text)
    assert_clean(out)
    assert "'setl_id': 'S1'" in out and "psn_name=" in out


def test_bytes_are_never_rendered() -> None:
    raw = f'{{"psn_name": "{NAME}", "psn_cert_no": "{CERT}"}}'.encode()
    assert redact_value(raw) == f"<{len(raw)} bytes>"
    assert redact_value({"key": bytearray(raw), "value": [memoryview(raw)]}) == {
        "key": f"<{len(raw)} bytes>", "value": [f"<{len(raw)} bytes>"]}
    assert_clean(redact_text(f"cannot decode {raw!r}"))


def test_objects_are_rendered_through_their_scrubbed_form() -> None:
    @dataclasses.dataclass
    class Row:
        setl_id: str
        psn_name: str
        value: bytes

    class Opaque:
        def __repr__(self) -> str:
            return f"<Opaque {CERT} psn_name={NAME!r}>"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError(CERT)

    Pair = namedtuple("Pair", "psn_no n")
    out = redact_value([Row("S1", NAME, b"\x00\x01"), Pair(PSN_NO, 3), Opaque(), Broken(), int(PSN_NO), {1, 2}])
    assert_clean(repr(out))
    assert out[0] == {"setl_id": "S1", "psn_name": MASK, "value": "<2 bytes>"}
    assert out[1] == {"psn_no": MASK, "n": 3}
    assert out[3] == "<unrepresentable Broken>" and out[4] == MASK


def test_exception_text_is_redacted() -> None:
    try:
        int(CERT + "a")
    except ValueError:
        ed = structlog.processors.format_exc_info(None, "error", {"event": "x", "exc_info": True})
    assert CERT in ed["exception"]
    out = logs.redact(None, "error", ed)
    assert_clean(out["exception"])
    assert "invalid literal for int()" in out["exception"]


def test_lines_below_the_level_are_not_redacted(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Filtering comes first: a disabled line costs no redaction."""
    calls: list[object] = []
    real = logs._redact_mapping
    monkeypatch.setattr(logs, "_redact_mapping", lambda m, d: calls.append(m) or real(m, d))
    logs.configure("INFO", "console")
    structlog.get_logger().debug("noise", psn_no=PSN_NO)
    logging.getLogger("aiokafka").info("noise %s", PSN_NO)
    assert calls == [] and capsys.readouterr().err == ""
    structlog.get_logger().info("seen", psn_no=PSN_NO)
    assert len(calls) == 1


# --- whole lines --------------------------------------------------------------------------------
def _crash_with_personal_data(log: Any) -> None:
    """What an ingestor holds when it crashes: decoded records, raw bytes, an error naming a value."""
    record = {"psn_no": PSN_NO, "psn_cert_no": CERT, "psn_name": NAME, "tel": TEL, "brdy": BRDY}
    raw = json.dumps(record, ensure_ascii=False).encode()
    canary = CANARY
    try:
        try:
            int(record["psn_name"])
        except ValueError as exc:
            raise RuntimeError(f"cannot decode record {record}") from exc
    except RuntimeError:
        log.exception("ingestor crashed; stopping the worker", topic="yibao.settlement", key=raw,
                      psn_no=record["psn_no"], local=len(canary))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_crash_logs_no_identifier_and_no_locals(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", fmt)
    _crash_with_personal_data(structlog.get_logger("streams.app"))
    err = capsys.readouterr().err
    assert_clean(err)
    assert "ingestor crashed" in err and "ValueError raised in _crash_with_personal_data (test_logging.py:" in err
    assert "invalid literal" not in err  # the message of a conversion quotes the data: not kept
    if fmt == "json":
        [line] = [json.loads(x) for x in err.splitlines() if x.strip()]
        assert line["level"] == "error" and line["psn_no"] == MASK and line["key"].endswith(" bytes>")
        assert line["exception"].startswith("Traceback") and "RuntimeError: cannot decode record" in line["exception"]
    else:
        assert "Traceback (most recent call last):" in err and "locals" not in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_stdlib_loggers_go_through_the_redaction(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", fmt)
    logging.getLogger("aiokafka").error("fetch failed for key %r: cert %s, person %s",
                                        PSN_NO.encode(), CERT, {"psn_name": NAME, "tel": TEL})
    try:
        raise ValueError(f"invalid literal for int(): {CERT!r}")
    except ValueError:
        logging.getLogger("clickhouse_driver").exception("insert failed")
    err = capsys.readouterr().err
    assert_clean(err)
    assert "fetch failed for key" in err and "insert failed" in err and "Traceback" in err
    if fmt == "json":
        lines = [json.loads(x) for x in err.splitlines() if x.strip()]
        assert [x["logger"] for x in lines] == ["aiokafka", "clickhouse_driver"]
    else:
        assert "[aiokafka]" in err


def test_the_faust_worker_keeps_the_redacting_handler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``yibao worker`` builds a real faust.Worker; mode's own logging setup (which would swap our
    handler for a colorlog one on stdout) must not run, and Faust's lines stay readable."""
    import faust

    import streams.app
    from yibao.worker import _run_one

    app = faust.App("yibao-log-test", broker="kafka://127.0.0.1:9", autodiscover=False, store="memory://",
                    web_enabled=False, datadir=str(tmp_path / "faust"))
    monkeypatch.setattr(streams.app, "create_app", lambda settings: (app, SimpleNamespace(ingest_crashed=False)))

    def execute(self: Any) -> NoReturn:
        if self.override_logging:
            self._setup_logging()  # what mode.Worker does on its first start
        self.log.info("Stopping...")
        self.log.error("Crashed reason=%r", ValueError(f"invalid literal for int(): {CERT!r}"))
        raise SystemExit(0)

    monkeypatch.setattr(faust.Worker, "execute_from_commandline", execute)
    assert _run_one(load_settings(data_dir=tmp_path, log_level="INFO")) == 0
    out = capsys.readouterr()
    assert_clean(out.out + out.err)
    assert "[^Worker]: Stopping..." in out.err and "[faust.worker]" in out.err
    assert "Crashed reason=ValueError" in out.err


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_crashing_process_prints_no_identifier(fmt: str, tmp_path: Path) -> None:
    """A process set up as the CLI does (settings_from) crashes with personal data in scope: its
    logged traceback and its uncaught one hold no identifier and no local variable."""
    script = f"""
import json, structlog
from yibao.cli import settings_from
settings_from()
log = structlog.get_logger("streams.ingest")

def consume():
    records = [{{"psn_no": {PSN_NO!r}, "psn_cert_no": {CERT!r}, "psn_name": {NAME!r}, "tel": {TEL!r}}}]
    value = json.dumps(records[0], ensure_ascii=False).encode()
    canary = {CANARY!r}
    for record in records:
        try:
            int(record["psn_name"])
        except ValueError:
            log.exception("ingestor crashed", value=value, local=len(canary))
            raise RuntimeError(f"bad record {{record}}")

consume()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YIBAO_", "NO_COLOR", "FORCE_COLOR"))}
    env["YIBAO_LOG_FORMAT"] = fmt
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1, res.stderr
    assert_clean(res.stdout + res.stderr)
    assert "ingestor crashed" in res.stderr and "uncaught exception" in res.stderr
    assert "RuntimeError: bad record" in res.stderr and "ValueError raised in consume (<string>:" in res.stderr
    assert "invalid literal" not in res.stderr  # it would quote the name: no pattern recognises one
    if fmt == "json":
        lines = [json.loads(x) for x in res.stderr.splitlines() if x.strip()]
        assert [x["event"] for x in lines] == ["ingestor crashed", "uncaught exception"]


def test_log_format_setting() -> None:
    assert load_settings().log_format.value == "console"
    assert load_settings(log_format="json").log_format.value == "json"
    with pytest.raises(SettingsError, match="YIBAO_LOG_FORMAT"):
        load_settings(log_format="xml")


# --- an expected outage is one line, a bug keeps its traceback -------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_refused_clickhouse_connection_logs_no_traceback(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    """clickhouse-driver logs every failed connect with its traceback; the caller reports the outage
    (SinkUnavailable), so at INFO nothing of the driver's shows, and at DEBUG one line."""
    from sinks.base import SinkUnavailable
    from sinks.server import ServerBackend
    from yibao.localinfra import free_port

    port = free_port()
    for level, expected_lines in (("INFO", 0), ("DEBUG", 1)):
        logs.configure(level, fmt, libraries=level)
        backend = ServerBackend(port=port, connect_timeout=2)
        with pytest.raises(SinkUnavailable, match=f"127.0.0.1:{port}"):
            backend.query("SELECT 1")
        backend.close()
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        said = [ln for ln in err.splitlines() if "Failed to connect" in ln]
        assert len(said) == expected_lines, err
        if said:
            assert "ConnectionRefusedError" in said[0] and f"127.0.0.1:{port}" in said[0]
            assert ("debug" in said[0]) if fmt == "console" else json.loads(said[0])["level"] == "debug"


def test_a_driver_failure_that_is_no_outage_keeps_its_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "console")
    try:
        raise RuntimeError("a bug in the handshake")
    except RuntimeError:
        logging.getLogger(logs.CH_CONNECTION_LOGGER).warning("Failed to connect to %s:%s", "h", 1, exc_info=True)
    err = capsys.readouterr().err
    assert "Failed to connect to h:1" in err and "Traceback" in err and "a bug in the handshake" in err


def test_json_format_keeps_warnings_and_broken_records_one_object_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A library's Python warning and a log call whose arguments do not fit its format are JSON lines too."""
    import warnings

    logs.configure("INFO", "json")
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logs._Handler)]  # pytest's raises on bad records
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library is unhappy", RuntimeWarning, stacklevel=1)
        logging.getLogger("faust.worker").warning("%d partitions", "many")
    finally:
        logging.captureWarnings(False)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert [x["logger"] for x in lines] == ["py.warnings", "faust.worker"], lines
    assert "a library is unhappy" in lines[0]["event"]
    assert "withheld" in lines[1]["event"] and "many" not in json.dumps(lines[1])


def test_the_drivers_reconnect_chatter_is_debug(capsys: pytest.CaptureFixture[str]) -> None:
    """A dropped pooled connection: the driver's ping and reconnect warnings precede the caller's own
    back-off line, which says it all; other driver warnings stay."""
    driver = logging.getLogger(logs.CH_CONNECTION_LOGGER)
    for level in ("INFO", "DEBUG"):
        logs.configure(level, "console", libraries=level)
        driver.warning("Error on %s ping: %s", "127.0.0.1:9000", EOFError("Unexpected EOF while reading bytes"))
        driver.warning("Connection was closed, reconnecting.")
        driver.warning("Error on socket shutdown: %s", OSError(107, "Transport endpoint is not connected"))
        driver.warning("Server timezone changed to %s", "UTC")
        err = capsys.readouterr().err
        quiet = [ln for ln in err.splitlines() if "ping" in ln or "reconnecting" in ln or "shutdown" in ln]
        assert len(quiet) == (0 if level == "INFO" else 3), err
        assert all("debug" in ln for ln in quiet), err
        assert "Server timezone changed to UTC" in err
