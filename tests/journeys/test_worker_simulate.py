"""Starting the worker and sending traffic: a mistake is said in one line before anything joins a
group; a healthy worker says ClickHouse is up before its first write; a ClickHouse outage reads as
one line per back-off step; with YIBAO_LOG_FORMAT=json every line is one JSON object."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from yibao.localinfra import ClickHouseServer, KafkaEndpoint, free_port

from .conftest import ROOT, Result, User, assert_clear_error, ok, running_worker


# --- helpers (what an operator would look at: the broker's topics, the /metrics page, the log) ----
def _topics(bootstrap: str) -> set[str]:
    async def go() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(go())


def _created_by(u: User, topics: set[str]) -> set[str]:
    """Topics of this user's worker: its prefix, or its Faust group's (`<group>-worker-…`)."""
    prefix, group = u.env["YIBAO_TOPIC_PREFIX"], u.env["YIBAO_CONSUMER_GROUP"]
    return {t for t in topics if t.startswith(prefix) or t.startswith(f"{group}-worker")}


def _sink_up(port: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^yibao_sink_up ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def _wait(what: str, check: Callable[[], bool], timeout: float, tail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not seen within {timeout:.0f}s:\n{tail()}"
        time.sleep(0.25)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on (all interfaces, as a stray server would)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    yield int(sock.getsockname()[1])
    sock.close()


# --- simulate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["env", "flag"])
def test_simulate_to_a_wrong_bootstrap_says_so_in_one_line(user: User, how: str) -> None:
    if how == "env":
        res = user.run("yibao simulate --events 100", env={"YIBAO_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    else:
        res = user.run("yibao simulate --events 100 --bootstrap 127.0.0.1:1")
    assert_clear_error(res, "127.0.0.1:1", "broker")
    print(f"simulate, wrong bootstrap ({how}): error after {res.seconds:.2f}s")


def test_simulate_produces_to_the_broker(online_user: User, broker: KafkaEndpoint) -> None:
    res = ok(online_user.run("yibao simulate --events 100"))
    assert re.search(r"Settlement\s.*\b100\b", res.out), res
    assert f"{online_user.env['YIBAO_TOPIC_PREFIX']}settlement" in _topics(broker.bootstrap)


# --- worker: every bad setting, one line each, nothing joined or created ---------------------------
def _bad_settings(u: User, busy: int) -> dict[str, tuple[dict[str, str], tuple[str, ...]]]:
    short_key = u.cwd / "short.key"
    short_key.write_text("abcd\n")
    closed = free_port()
    return {
        "wrong broker": ({"YIBAO_KAFKA_BOOTSTRAP": f"127.0.0.1:{closed}"}, ("kafka", f"127.0.0.1:{closed}")),
        "missing rules file": ({"YIBAO_RULES_FILE": str(u.cwd / "missing.toml")}, ("YIBAO_RULES_FILE", "missing.toml")),
        "short key": ({"YIBAO_PSEUDO_KEY": "abcd"}, ("YIBAO_PSEUDO_KEY", "16 bytes")),
        "missing key file": ({"YIBAO_PSEUDO_KEY_FILE": str(u.cwd / "no.key")}, ("YIBAO_PSEUDO_KEY_FILE", "no.key")),
        "short key file": ({"YIBAO_PSEUDO_KEY_FILE": str(short_key)}, ("YIBAO_PSEUDO_KEY_FILE", "16 bytes")),
        "busy web port": ({"YIBAO_WEB_PORT": str(busy)}, ("YIBAO_WEB_PORT", str(busy))),
    }


CASES = ["wrong broker", "missing rules file", "short key", "missing key file", "short key file", "busy web port"]


@pytest.mark.parametrize("case", CASES)
def test_worker_with_a_bad_setting_says_which_before_joining(operator: User, broker: KafkaEndpoint, busy_port: int,
                                                            case: str) -> None:
    env, needles = _bad_settings(operator, busy_port)[case]
    res = operator.run("yibao worker", env=env, timeout=60)
    assert res.code == 2, res
    assert_clear_error(res, *needles)
    assert not _created_by(operator, _topics(broker.bootstrap)), f"topics were created before the refusal\n{res}"
    assert not (operator.data_dir / "faust").exists(), "the Faust app was set up before the refusal"
    print(f"worker, {case} ({operator.engine}): error after {res.seconds:.2f}s")


@pytest.mark.parametrize("case", ["held by another worker", "under a file"])
def test_worker_with_the_persons_on_disk_refuses_a_state_dir_it_cannot_have(operator: User, broker: KafkaEndpoint,
                                                                            case: str) -> None:
    """YIBAO_STATE_STORE=disk: RocksDB lets one process open a directory; a second worker pointed at
    the first one's would otherwise fail inside its first rebalance."""
    state = operator.cwd / "state"
    holder = None
    if case == "under a file":
        (operator.cwd / "a-file").write_text("x")
        state = operator.cwd / "a-file" / "state"
    else:
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                                   "from streams.rules.diskstore import DiskStore; "
                                   f"held = DiskStore('person', '', path=Path({str(state / 'person')!r})); "
                                   "print('held', flush=True); time.sleep(60)"],
                                  stdout=subprocess.PIPE, cwd=ROOT)
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    try:
        res = operator.run("yibao worker", env={"YIBAO_STATE_STORE": "disk", "YIBAO_STATE_DIR": str(state)},
                           timeout=60)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert res.code == 2, res
    assert_clear_error(res, "YIBAO_STATE_DIR", str(state))
    assert ("another worker process" in res.err) == (case == "held by another worker"), res
    assert not _created_by(operator, _topics(broker.bootstrap)), f"topics were created before the refusal\n{res}"


def test_worker_with_clickhouse_unreachable_refuses_to_start(online_user: User, broker: KafkaEndpoint) -> None:
    """Chosen: a worker refuses to start without ClickHouse (exit 2, one line) rather than wait:
    at start an unreachable ClickHouse is mostly a wrong address, and the supervisor's restart loop
    (systemd Restart=on-failure, compose restart, Kubernetes) is the wait."""
    closed = free_port()
    u = online_user.with_env(YIBAO_CH_BACKEND="server", YIBAO_CH_HOST="127.0.0.1", YIBAO_CH_PORT=str(closed))
    res = u.run("yibao worker", timeout=60)
    assert_clear_error(res, "ClickHouse", f"127.0.0.1:{closed}")
    assert "YIBAO_CH_HOST" in res.err  # the hint says what to check
    assert not _created_by(u, _topics(broker.bootstrap))


@pytest.mark.parametrize("engine", ["server"])
def test_worker_with_wrong_clickhouse_credentials_refuses_to_start(operator: User, broker: KafkaEndpoint) -> None:
    res = operator.run("yibao worker", env={"YIBAO_CH_USER": "nobody_here", "YIBAO_CH_PASSWORD": "x"}, timeout=60)
    assert_clear_error(res, "ClickHouse")
    assert "YIBAO_CH_USER" in res.err  # the hint names what to check
    assert not _created_by(operator, _topics(broker.bootstrap))


def test_worker_with_two_problems_says_both(online_user: User, broker: KafkaEndpoint) -> None:
    res = online_user.run("yibao worker", env={"YIBAO_RULES_FILE": str(online_user.cwd / "gone.toml"),
                                               "YIBAO_PSEUDO_KEY": "abcd"}, timeout=60)
    assert_clear_error(res, "YIBAO_RULES_FILE", "YIBAO_PSEUDO_KEY", problems=2)
    assert not _created_by(online_user, _topics(broker.bootstrap))


def test_new_user_worker_without_a_broker(user: User) -> None:
    """`yibao worker` with nothing configured: the default broker 127.0.0.1:9092 is not there."""
    res = user.run("yibao worker", timeout=60)
    assert_clear_error(res, "127.0.0.1:9092")
    print(f"worker, no broker (embedded default): error after {res.seconds:.2f}s")


def test_several_processes_on_embedded_chdb_are_refused(online_user: User) -> None:
    res = online_user.run("yibao worker --processes 2", timeout=60)
    assert_clear_error(res, "embedded", "YIBAO_PROCESSES")


@pytest.mark.parametrize("engine", ["server"])
def test_several_processes_are_checked_once_before_forking(operator: User, broker: KafkaEndpoint) -> None:
    """The second process's port (YIBAO_WEB_PORT + 1) is checked by the parent, which says so once and
    starts no child."""
    with _busy_above_a_free_port() as free:
        res = operator.run(f"yibao worker --processes 2 --web-port {free}", timeout=60)
    assert_clear_error(res, str(free + 1), "process 1")
    assert not _created_by(operator, _topics(broker.bootstrap))


@contextmanager
def _busy_above_a_free_port() -> Iterator[int]:
    """A free port whose next port another program listens on."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("0.0.0.0", 0))
            free = int(probe.getsockname()[1])
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("0.0.0.0", free + 1))
        except OSError:
            busy.close()
            continue
        busy.listen()
        try:
            yield free
        finally:
            busy.close()
        return
    raise AssertionError("no free port with a bindable next port")


# --- a good worker ---------------------------------------------------------------------------------
def test_worker_says_clickhouse_is_up_before_any_event_and_logs_json(operator: User, engine: str,
                                                                     tmp_path: Path) -> None:
    """yibao_sink_up is 1 as soon as the worker has started, with no event ever sent (the shipped alert
    pages on 0 for 2 minutes); with YIBAO_LOG_FORMAT=json every line of its output is one JSON object,
    from start-up to shutdown."""
    log = tmp_path / "worker.log"
    with running_worker(operator, log, YIBAO_LOG_FORMAT="json") as w:
        assert _sink_up(w.port) == 1.0, w.tail()
        w.check()
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    bad = []
    for ln in lines:
        try:
            obj = json.loads(ln)
        except ValueError:
            bad.append(ln)
            continue
        if not isinstance(obj, dict) or "event" not in obj or "level" not in obj:
            bad.append(ln)
    assert not bad, f"{len(bad)} of {len(lines)} lines are not JSON log objects: {bad[:5]}"
    events = [json.loads(ln)["event"] for ln in lines]
    assert "worker started" in events and "ingest stopped" in events, events[-20:]


# --- a ClickHouse outage, as the operator reads it ---------------------------------------------------


def test_clickhouse_outage_reads_as_one_line_per_back_off_step(online_user: User, own_clickhouse: ClickHouseServer,
                                                               tmp_path: Path) -> None:
    ch = own_clickhouse
    address = f"127.0.0.1:{ch.tcp_port}"
    u = online_user.with_env(YIBAO_CH_BACKEND="server", YIBAO_CH_HOST="127.0.0.1", YIBAO_CH_PORT=str(ch.tcp_port),
                             YIBAO_CH_DATABASE="outage", YIBAO_BATCH_MAX_SECONDS="0.3",
                             YIBAO_MONITOR_INTERVAL_S="0", YIBAO_SINK_RETRY_MAX_SECONDS="4")
    log = tmp_path / "worker.log"
    with running_worker(u, log) as w:
        assert _sink_up(w.port) == 1.0, w.tail()
        ch.stop()
        ok(u.run("yibao simulate --events 200"))
        _wait("yibao_sink_up 0", lambda: _sink_up(w.port) == 0.0, 60, w.tail)
        time.sleep(8)  # several back-off steps
        during = log.read_text(errors="replace")
        ch.start()
        _wait("yibao_sink_up 1 again", lambda: _sink_up(w.port) == 1.0, 60, w.tail)
        w.check()
    steps = [ln for ln in during.splitlines() if "ClickHouse unavailable" in ln]
    assert len(steps) >= 3, during[-3000:]
    for ln in steps:
        assert address in ln and "retry_in_s=" in ln and "Error" in ln, ln
    assert "Traceback" not in during, during[-4000:]
    assert "Failed to connect" not in during, "the driver's own line repeats the back-off line"
    print(f"outage: {len(steps)} back-off lines, no traceback")


def test_worker_help_hides_the_internal_flag(user: User) -> None:
    res: Result = ok(user.run("yibao worker --help"))
    assert "--processes" in res.out and "--web-port" in res.out
    assert "--no-preflight" not in res.out  # for the children of --processes N, not for people
