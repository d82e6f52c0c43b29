"""What the benchmarks share: the worker processes they start and stop, their errors and progress."""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .producer import OutEvent
from .settings import Settings

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"
#: Share of eligible settlements given a planted anomaly: alerts at a rate the rules' output costs.
PLANT_RATE = 0.02

Progress = Callable[[str, int, int | None], None]
"""``progress(phase, done, total)``: a phase has advanced (``total`` None: nothing to count)."""


def _silent(phase: str, done: int, total: int | None) -> None:
    """The default progress: none."""


class BenchError(RuntimeError):
    """The run could not be measured (a worker died, or did not land everything in time); ``log``
    is where the workers wrote what happened."""

    def __init__(self, message: str, log: Path) -> None:
        super().__init__(message)
        self.log = log


def worker_env(s: Settings, rules: bool) -> dict[str, str]:
    """The environment of a bench's ``yibao worker``: this run's own servers and settings, none of
    the caller's ``YIBAO_*``."""
    own = {k: v for k, v in os.environ.items() if not k.startswith("YIBAO_")}
    return dict(own, YIBAO_KAFKA_BOOTSTRAP=s.kafka_bootstrap, YIBAO_CH_BACKEND="server",
                YIBAO_CH_HOST=s.ch_host, YIBAO_CH_PORT=str(s.ch_port), YIBAO_CH_DATABASE=s.ch_database,
                YIBAO_CH_USER=s.ch_user, YIBAO_CH_PASSWORD=s.ch_password.get_secret_value(),
                YIBAO_TOPIC_PREFIX=s.topic_prefix, YIBAO_TOPIC_PARTITIONS=str(s.topic_partitions),
                YIBAO_CONSUMER_GROUP=s.consumer_group, YIBAO_SESSION_TIMEOUT_MS=str(s.session_timeout_ms),
                YIBAO_RULES_ENABLED=str(rules).lower(), YIBAO_DATA_DIR=str(s.data_dir),
                YIBAO_BATCH_MAX_EVENTS=str(s.batch_max_events), YIBAO_BATCH_MAX_SECONDS=str(s.batch_max_seconds),
                YIBAO_MONITOR_INTERVAL_S="0", YIBAO_PSEUDO_KEY="00" * 32, YIBAO_LOG_LEVEL="WARNING",
                YIBAO_PROCESSES="1", YIBAO_COLUMNAR=str(s.columnar).lower(),
                **({"YIBAO_RULES_FILE": str(s.rules_file)} if s.rules_file else {}))


def workers_rss_mb(procs: list[subprocess.Popen[bytes]]) -> list[float | None]:
    """Resident memory (MB) of each worker process now, from /proc (None where it cannot be read)."""
    out: list[float | None] = []
    for p in procs:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
            kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            out.append(round(kb / 1024, 1))
        except (OSError, StopIteration, ValueError):
            out.append(None)
    return out


def metrics_text(port: int, timeout: float = 2.0) -> str:
    """The /metrics page of the worker serving it on ``port`` (raises OSError when it cannot be read)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return str(resp.read().decode("utf-8", "replace"))


def metrics_pages(ports: list[int]) -> list[str | None]:
    """Each worker's /metrics page, None where it cannot be read."""
    out: list[str | None] = []
    for port in ports:
        try:
            out.append(metrics_text(port))
        except OSError:
            out.append(None)
    return out


def metric_sample(text: str | None, name: str, topic: str) -> float | None:
    """The ``name{topic="..."}`` sample of a /metrics page (None without the page or the sample)."""
    if text is None:
        return None
    m = re.search("^" + re.escape(name) + r'\{topic="' + re.escape(topic) + r'"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker process, then wait for each (SIGKILL after 30 s): all stop at once."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of ``xs`` (None when empty)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class TimedProducer(threading.Thread):
    """Sends pre-encoded settlements at a fixed rate from its own event loop; ``sent_at[setl_id]``
    is the wall-clock time (s) each was handed to the client."""

    def __init__(self, settings: Settings, events: list[tuple[str, OutEvent]], rate: float, seconds: float) -> None:
        super().__init__(daemon=True, name="bench-producer")
        self.settings, self.events, self.rate, self.seconds = settings, events, rate, seconds
        self.sent_at: dict[str, float] = {}
        self.error: BaseException | None = None
        self.behind_s = 0.0  # how far the producer fell behind its schedule at worst

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by the caller
            self.error = exc

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        topic = self.settings.topic("settlement")
        producer = AIOKafkaProducer(**self.settings.kafka_client_kwargs(), acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = []
            t0 = time.monotonic()
            for i, (setl_id, e) in enumerate(self.events):
                due = t0 + i / self.rate
                if due - t0 > self.seconds:
                    break
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    self.behind_s = max(self.behind_s, now - due)
                self.sent_at[setl_id] = time.time()
                futures.append(await producer.send(topic, e.value, key=e.key.encode()))
                if len(futures) >= 500:
                    await asyncio.gather(*futures)
                    futures = []
            await asyncio.gather(*futures)
        finally:
            await producer.stop()


def land_history(settings: Settings, backend: Any, history: list[OutEvent], procs: list[subprocess.Popen[bytes]],
                 log: Path, phase: str, timeout_s: float, progress: Progress = _silent) -> None:
    """Produce ``history`` and wait until the workers ``procs`` have landed all of it (so the persons
    have state before a measured window); a worker dying or the time running out is a BenchError."""
    from schemas import Codec

    from .producer import produce

    progress(phase, 0, len(history))
    asyncio.run(produce(settings, history, Codec()))
    db = settings.ch_database
    deadline = time.monotonic() + timeout_s
    while (n := int(backend.query(f"SELECT count() FROM {db}.settlements").rows[0][0])) < len(history):
        progress(phase, n, len(history))
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise BenchError(f"the workers did not land the history ({phase})", log)
        time.sleep(0.2)
