"""Journeys: the `yibao` command as its users run it.

Every journey runs a command line exactly as a person types it (the venv's `yibao` console
script, split like a shell splits it) in a new user's shell: their own HOME, so the default data
directory is theirs and empty; an empty working directory; no YIBAO_* variable of the developer's
environment. It asserts what that person sees: the exit status, the lines or JSON fields, the
files written. Nothing here calls the code under test in process; fixtures may (to wait for a
worker, say), journeys may not.

``landed`` is a small run of the whole pipeline per ClickHouse engine, made the way an operator
makes one: `yibao simulate --out`, a `yibao worker`, `yibao replay`, then the worker stopped.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from yibao.localinfra import ClickHouseEndpoint, KafkaEndpoint, free_port

ROOT = Path(__file__).resolve().parents[2]
#: The console script a user runs: the one the install put next to this interpreter.
YIBAO = Path(sys.executable).parent / "yibao"
#: Environment variables that would point a new user's tools at the developer's directories.
_PERSONAL = ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "COLUMNS", "LINES")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.journey)
            item.add_marker(pytest.mark.integration)


@dataclass(frozen=True)
class Result:
    """What a person saw after running one command."""

    cmd: str
    code: int
    out: str
    err: str
    seconds: float

    def json(self) -> Any:
        """stdout as one JSON document."""
        try:
            return json.loads(self.out)
        except ValueError as exc:
            raise AssertionError(f"{self.cmd}: stdout is not one JSON document ({exc}):\n{self.out[:2000]}") from None

    def json_lines(self) -> list[Any]:
        """Each non-empty stdout line as JSON."""
        out = []
        for n, line in enumerate(self.out.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise AssertionError(f"{self.cmd}: stdout line {n} is not JSON: {line[:300]!r}") from None
        return out

    def __str__(self) -> str:
        return (f"$ {self.cmd}\n(exit {self.code}, {self.seconds:.1f}s)\n--- stdout ---\n{self.out[-6000:]}"
                f"\n--- stderr ---\n{self.err[-6000:]}")


@dataclass(frozen=True)
class User:
    """A person's shell: a home, a working directory and an environment of their own."""

    home: Path
    cwd: Path
    env: Mapping[str, str]
    engine: str = "embedded"
    truth: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def with_env(self, **more: str) -> User:
        return replace(self, env={**self.env, **more})

    def argv(self, cmdline: str) -> list[str]:
        words = shlex.split(cmdline)
        if words and words[0] == "yibao":
            words[0] = str(YIBAO)
        return words

    def run(self, cmdline: str, *, timeout: float = 120, stdin: str | None = None,
            env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Result:
        """Run ``cmdline`` as typed and wait for it; stdout and stderr are pipes, as in `cmd | less`."""
        started = time.monotonic()
        try:
            p = subprocess.run(self.argv(cmdline), cwd=cwd or self.cwd, env={**self.env, **(env or {})},
                               input=stdin, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            errs = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            raise AssertionError(f"$ {cmdline}: still running after {timeout:.0f}s\n--- stdout ---\n{out[-3000:]}"
                                 f"\n--- stderr ---\n{errs[-3000:]}") from None
        return Result(cmdline, p.returncode, p.stdout, p.stderr, time.monotonic() - started)

    def start(self, cmdline: str, log: Path, *, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running command (a worker) with its output in ``log``."""
        with log.open("ab") as f:
            return subprocess.Popen(self.argv(cmdline), cwd=self.cwd, env={**self.env, **(env or {})},
                                    stdout=f, stderr=subprocess.STDOUT)

    @property
    def data_dir(self) -> Path:
        """The default data directory of this user (platformdirs' user data dir under their HOME)."""
        return self.home / ".local" / "share" / "yibao"


def ok(res: Result) -> Result:
    """Assert the command succeeded and showed no traceback; returns it for chaining."""
    assert res.code == 0, str(res)
    assert "Traceback" not in res.out + res.err, str(res)
    return res


def assert_clear_error(res: Result, *needles: str, problems: int = 1) -> None:
    """A fixable mistake: non-zero exit, no traceback, ``problems`` lines of "error: …" on stderr naming
    every needle (case-insensitive), each optionally followed by one "hint: …" line, nothing else."""
    assert res.code != 0, str(res)
    assert "Traceback" not in res.out + res.err, str(res)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert lines and lines[0].startswith("error:"), str(res)
    assert len(errors) == problems, f"expected {problems} error line(s)\n{res}"
    others = [ln for ln in lines if not ln.startswith(("error:", "hint:"))]
    assert not others, f"stderr holds more than error and hint lines: {others}\n{res}"
    for a, b in itertools.pairwise(lines):
        assert not (a.startswith("hint:") and b.startswith("hint:")), f"two hints in a row\n{res}"
    said = " ".join(errors).lower()
    for n in needles:
        assert n.lower() in said, f"{n!r} not said on the error line(s)\n{res}"


def _new_user(root: Path) -> User:
    home = root / "home"
    cwd = root / "work"
    home.mkdir(parents=True)
    cwd.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("YIBAO_") and k not in _PERSONAL}
    env["HOME"] = str(home)
    env["PATH"] = f"{YIBAO.parent}{os.pathsep}{env.get('PATH', '')}"
    return User(home=home, cwd=cwd, env=env)


@pytest.fixture
def user(tmp_path: Path) -> User:
    """A new user: nothing configured (default broker 127.0.0.1:9092, where nothing listens; embedded chDB)."""
    return _new_user(tmp_path)


def _online(u: User, broker: KafkaEndpoint) -> User:
    tag = uuid.uuid4().hex[:8]
    return u.with_env(YIBAO_KAFKA_BOOTSTRAP=broker.bootstrap, YIBAO_TOPIC_PREFIX=f"j{tag}.",
                      YIBAO_CONSUMER_GROUP=f"j{tag}", YIBAO_SESSION_TIMEOUT_MS="6000")


def _on_engine(u: User, engine: str, ch: ClickHouseEndpoint | None) -> User:
    if engine == "embedded":
        return replace(u, engine=engine)
    assert ch is not None
    env = {"YIBAO_CH_BACKEND": "server", "YIBAO_CH_HOST": ch.host, "YIBAO_CH_PORT": str(ch.tcp_port),
           "YIBAO_CH_USER": ch.user, "YIBAO_CH_DATABASE": f"j_{uuid.uuid4().hex[:8]}"}
    if ch.password:
        env["YIBAO_CH_PASSWORD"] = ch.password
    return replace(u.with_env(**env), engine=engine)


@pytest.fixture
def online_user(user: User, broker: KafkaEndpoint) -> User:
    """A new user whose YIBAO_KAFKA_BOOTSTRAP points at the test broker (own topics and groups)."""
    return _online(user, broker)


@pytest.fixture
def operator(engine_user: User, broker: KafkaEndpoint) -> User:
    """A new user with a broker and an empty database on ``engine``: an operator setting up."""
    return _online(engine_user, broker)


@pytest.fixture(params=["embedded", "server"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine_user(user: User, engine: str, request: pytest.FixtureRequest) -> User:
    """A new user whose settings name an empty database on ``engine``."""
    ch = request.getfixturevalue("clickhouse_server") if engine == "server" else None
    return _on_engine(user, engine, ch)


# --- a small run of the pipeline, per engine ------------------------------------------------------
SETTLEMENTS = 3000
#: Settlements broken on purpose in the landed run: schema-valid, refused by validation.
BROKEN = 5


def _metrics(port: int) -> dict[str, float]:
    """The worker's Prometheus samples, summed by metric name and topic."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^(yibao_[a-z_]+)\{([^}]*)\} ([0-9.e+-]+)$', line)
        if m:
            topic = re.search(r'topic="([^"]*)"', m.group(2))
            key = f"{m.group(1)}|{topic.group(1) if topic else ''}"
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def _accounted(metrics: dict[str, float], prefix: str) -> tuple[float, float]:
    """(events landed + dead-lettered + recognised as re-sent on the source topics, alerts raised)."""
    sources = {f"{prefix}{t}" for t in ("settlement", "procurement", "supervision")}
    done = sum(v for k, v in metrics.items()
               if k.split("|")[0] in ("yibao_events_landed_total", "yibao_dead_letters_total",
                                      "yibao_duplicates_recognised_total") and k.split("|")[1] in sources)
    alerts = sum(v for k, v in metrics.items() if k.startswith("yibao_alerts_total|"))
    return done, alerts


def _break(events: Path, n: int) -> int:
    """Make ``n`` settlements schema-valid nonsense (a hospital code of no national shape)."""
    lines = events.read_text().splitlines()
    broken = 0
    for i, line in enumerate(lines):
        obj = json.loads(line)
        if broken < n and obj.get("event_type", "").endswith("Settlement") and i % 97 == 0:
            obj["fixmedins_code"] = "NOT-A-HOSPITAL"
            lines[i] = json.dumps(obj, ensure_ascii=False)
            broken += 1
    events.write_text("\n".join(lines) + "\n")
    return broken


@contextmanager
def running_worker(u: User, log: Path, **env: str) -> Iterator[Worker]:
    """`yibao worker` in the background, as an operator starts it, until the block ends (then SIGTERM)."""
    port = free_port()
    proc = u.start("yibao worker", log, env={"YIBAO_WEB_PORT": str(port), **env})
    w = Worker(proc, port, log, u.env.get("YIBAO_TOPIC_PREFIX", "yibao."))
    try:
        deadline = time.monotonic() + 120
        while "worker started" not in log.read_text(errors="replace"):
            w.check()
            assert time.monotonic() < deadline, f"the worker did not start:\n{w.tail()}"
            time.sleep(0.2)
        yield w
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Worker:
    """A running `yibao worker` and what its /metrics say."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    prefix: str

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def check(self) -> None:
        assert self.proc.poll() is None, f"the worker exited ({self.proc.returncode}):\n{self.tail()}"

    def accounted(self) -> tuple[float, float]:
        return _accounted(_metrics(self.port), self.prefix)

    def wait_accounted(self, produced: int, *, timeout: float = 300, quiet_s: float = 3.0) -> None:
        """Until the worker accounts for ``produced`` events in all (landed + dead-lettered + re-sends
        recognised) and its alert count has not moved for ``quiet_s`` (hospital and DRG rules run on a
        re-keyed stream, a little later)."""
        deadline = time.monotonic() + timeout
        last_alerts, quiet_since = -1.0, time.monotonic()
        while True:
            done, alerts = self.accounted()
            if alerts != last_alerts:
                last_alerts, quiet_since = alerts, time.monotonic()
            if done >= produced and time.monotonic() - quiet_since > quiet_s:
                return
            self.check()
            assert time.monotonic() < deadline, f"{done:.0f} of {produced} accounted for:\n{self.tail()}"
            time.sleep(0.5)


def produced(res: Result) -> int:
    """The count `yibao replay` / `yibao dlq replay` says it produced."""
    m = re.search(r"([\d,]+) events produced", res.out)
    assert m, str(res)
    return int(m.group(1).replace(",", ""))


def _land(u: User, log: Path) -> User:
    u = u.with_env(YIBAO_BATCH_MAX_SECONDS="0.3", YIBAO_MONITOR_INTERVAL_S="0")
    truth, events = u.cwd / "truth.jsonl", u.cwd / "events.jsonl"
    ok(u.run(f"yibao simulate --events {SETTLEMENTS} --plant all --plant-rate 0.01 --truth {truth} --out {events}",
             timeout=300))
    assert _break(events, BROKEN) == BROKEN
    with running_worker(u, log) as w:
        n = produced(ok(u.run(f"yibao replay {events}", timeout=300)))
        w.wait_accounted(n)
    ok(u.run("yibao monitors run --json", timeout=300))  # as an operator would after a backfill
    return replace(u, truth=truth, extra={"events": events, "produced": n, "broken": BROKEN})


@pytest.fixture(scope="session")
def _landed_runs() -> dict[str, User]:
    """The pipeline runs made so far in this test process, by engine."""
    return {}


@pytest.fixture(params=["embedded", "server"])
def landed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, broker: KafkaEndpoint,
           _landed_runs: dict[str, User]) -> User:
    """A user whose database holds one small pipeline run (planted anomalies, alerts, dead letters).

    Made once per engine and test process (a session-scoped parametrized fixture would be made
    again whenever the order of tests switches engines), shared by the journeys: read it, never
    write to its database or topics.
    """
    engine = str(request.param)
    if engine not in _landed_runs:
        ch = request.getfixturevalue("clickhouse_server") if engine == "server" else None
        root = tmp_path_factory.mktemp(f"landed-{engine}")
        u = _on_engine(_online(_new_user(root), broker), engine, ch)
        _landed_runs[engine] = _land(u, root / "worker.log")
    return _landed_runs[engine]
