"""The worker's preflight (yibao/worker.py): every problem found before anything joins a group, one
each, in bounded time; a ClickHouse that answers sets yibao_sink_up."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streams import metrics
from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint, free_port
from yibao.settings import Settings, SettingsError, load_settings
from yibao.worker import Problem, WorkerRefused, preflight, run_worker

GOOD_KEY = "ab" * 16


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"data_dir": tmp_path / "data", "web_port": 0, "pseudo_key": GOOD_KEY,
                            "kafka_bootstrap": f"127.0.0.1:{free_port()}", "ch_backend": "embedded"}
    base.update(kw)
    return load_settings(**base)


def _offline(problems: list[Problem]) -> list[Problem]:
    """The problems other than the (deliberately absent) broker's."""
    return [p for p in problems if "Kafka broker" not in p.message]


@pytest.fixture
def listener() -> Iterator[int]:
    """A port that accepts connections and never says a word (a hung server, a wrong service)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield int(sock.getsockname()[1])
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    sock.close()


def test_a_good_local_setup_has_no_local_problem(tmp_path: Path) -> None:
    problems = preflight(_settings(tmp_path))
    assert _offline(problems) == []
    assert len(problems) == 1 and "Kafka broker" in problems[0].message  # nothing listens there


def test_every_problem_is_reported_once_and_named(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        s = _settings(tmp_path, rules_file=tmp_path / "missing.toml", pseudo_key="abcd", web_port=port)
        problems = preflight(s)
    finally:
        busy.close()
    said = [p.message for p in problems]
    assert len(said) == 4, said
    assert said[0].startswith("YIBAO_RULES_FILE: ") and "missing.toml" in said[0]
    assert said[1].startswith("YIBAO_PSEUDO_KEY: ") and "16 bytes" in said[1]
    assert said[2].startswith("YIBAO_WEB_PORT: ") and str(port) in said[2] and "in use" in said[2]
    assert "Kafka broker" in said[3] and s.kafka_bootstrap in said[3]
    assert all(p.hint for p in problems)


def test_a_short_key_file_and_the_generated_key_are_checked(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("abcd\n")
    s = _settings(tmp_path, pseudo_key=None, pseudo_key_file=key)
    said = [p.message for p in _offline(preflight(s))]
    assert len(said) == 1 and said[0].startswith("YIBAO_PSEUDO_KEY_FILE") and str(key) in said[0], said
    generated = tmp_path / "data" / "pseudo.key"
    generated.parent.mkdir(parents=True, exist_ok=True)
    generated.write_text("00\n")
    said = [p.message for p in _offline(preflight(_settings(tmp_path, pseudo_key=None)))]
    assert len(said) == 1 and str(generated) in said[0], said


def test_no_key_at_all_is_no_problem_while_the_data_dir_is_writable(tmp_path: Path) -> None:
    """The worker generates one there (and says so), as before."""
    assert _offline(preflight(_settings(tmp_path, pseudo_key=None))) == []


def test_a_missing_key_file_is_a_bad_setting_naming_its_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        _settings(tmp_path, pseudo_key=None, pseudo_key_file=tmp_path / "nope.key",
                  ch_password_file=tmp_path / "nope.pw")
    lines = str(info.value).splitlines()[1:]
    assert [ln.split(":")[0].strip() for ln in lines] == ["YIBAO_CH_PASSWORD_FILE", "YIBAO_PSEUDO_KEY_FILE"], lines
    assert all("no such file" in ln for ln in lines)


def test_a_data_dir_that_cannot_be_written_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"  # a directory cannot be made under a file, not even by root
    blocker.write_text("x")
    said = [p.message for p in _offline(preflight(_settings(tmp_path, data_dir=blocker / "data")))]
    assert len(said) == 1 and said[0].startswith("YIBAO_DATA_DIR"), said


def test_an_embedded_store_held_by_a_live_process_is_reported(tmp_path: Path) -> None:
    from sinks.embedded import IN_USE

    s = _settings(tmp_path)
    s.chdb_path.mkdir(parents=True)
    (s.chdb_path / IN_USE).write_text(str(os.getppid()))  # alive, and not us
    said = [p.message for p in _offline(preflight(s))]
    assert len(said) == 1 and str(os.getppid()) in said[0] and "in use" in said[0], said
    (s.chdb_path / IN_USE).write_text("999999999")  # gone: a crashed owner, which chDB recovers from
    assert _offline(preflight(s)) == []


def test_several_processes_need_a_server_and_free_consecutive_ports(tmp_path: Path) -> None:
    said = [p.message for p in _offline(preflight(_settings(tmp_path, processes=2)))]
    assert len(said) == 1 and "YIBAO_PROCESSES=2" in said[0], said
    said = [p.message for p in _offline(preflight(_settings(tmp_path, processes=3, web_port=65534)))]
    assert any("65536" in m for m in said), said


def test_a_hung_broker_and_clickhouse_cost_one_timeout_not_two(tmp_path: Path, listener: int) -> None:
    s = _settings(tmp_path, kafka_bootstrap=f"127.0.0.1:{listener}", ch_backend="server", ch_port=listener)
    t0 = time.monotonic()
    problems = preflight(s, timeout_s=1.0)
    took = time.monotonic() - t0
    said = [p.message for p in problems]
    assert len(said) == 2, said
    assert "within 1 s" in said[0] and f"127.0.0.1:{listener}" in said[0]
    assert said[1].startswith(f"ClickHouse at 127.0.0.1:{listener}")
    assert took < 1.0 * 2, f"the probes ran one after the other ({took:.1f}s)"


def test_run_worker_refuses_before_migrating(tmp_path: Path) -> None:
    s = _settings(tmp_path, rules_file=tmp_path / "missing.toml")
    with pytest.raises(WorkerRefused) as info:
        run_worker(s)
    assert len(info.value.problems) == 2  # the rule base and the broker
    assert not s.chdb_path.exists(), "the embedded store was migrated although the worker refused"


@pytest.mark.integration
def test_reachable_services_pass_and_set_sink_up(tmp_path: Path, broker: KafkaEndpoint,
                                                  clickhouse_server: ClickHouseEndpoint) -> None:
    ch = clickhouse_server
    s = _settings(tmp_path, kafka_bootstrap=broker.bootstrap, ch_backend="server", ch_host=ch.host,
                  ch_port=ch.tcp_port, ch_user=ch.user, ch_password=ch.password)
    metrics.SINK_UP.set(0)
    assert preflight(s) == []
    assert metrics.REGISTRY.get_sample_value("yibao_sink_up") == 1.0
    wrong = _settings(tmp_path, kafka_bootstrap=broker.bootstrap, ch_backend="server", ch_host=ch.host,
                      ch_port=ch.tcp_port, ch_user="nobody_here", ch_password="x")
    said = preflight(wrong)
    assert len(said) == 1 and said[0].message.startswith(f"ClickHouse at {ch.host}:{ch.tcp_port}"), said
    assert said[0].hint is not None and "YIBAO_CH_USER" in said[0].hint
    closed = _settings(tmp_path, kafka_bootstrap=broker.bootstrap, ch_backend="server", ch_port=free_port())
    said = preflight(closed)
    assert len(said) == 1 and "unreachable" in said[0].message, said
    assert metrics.REGISTRY.get_sample_value("yibao_sink_up") == 0.0
