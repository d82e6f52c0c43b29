"""What the stream processing needs to know, as small frozen values.

The settings layer (``yibao.settings``) reads the environment and builds these; ``streams`` reads
nothing else, so the worker, the in-process evaluation, the benchmark and the tests configure it
the same way, and a default lives in one place (the settings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.registry_client import RegistryClientConfig
from sinks.config import ClickHouseConfig


@dataclass(frozen=True)
class KafkaConfig:
    """How to reach the brokers, and the names and shapes of the pipeline's topics and groups."""

    #: keyword arguments every aiokafka / kafka-python client takes (bootstrap, TLS, SASL)
    client: Mapping[str, Any] = field(repr=False)
    topic_prefix: str
    partitions: int
    replication: int
    consumer_group: str
    session_timeout_ms: int

    def topic(self, stream: str) -> str:
        """Full topic name of a logical stream (settlement, procurement, supervision, alerts, ...)."""
        return f"{self.topic_prefix}{stream}"

    def client_kwargs(self) -> dict[str, Any]:
        return dict(self.client)


@dataclass(frozen=True)
class ValidationConfig:
    """The code lists and time limits events are checked against, and how long an event's identity
    is remembered to recognise a re-send (streams.identity)."""

    known_insutypes: frozenset[str]
    known_med_types: frozenset[str]
    max_future_skew_s: int
    min_event_year: int
    dedup_horizon_days: int = 7


@dataclass(frozen=True)
class RulesConfig:
    """The monitoring rules: whether they run, the seed rule base, lateness, monitor cadence."""

    enabled: bool
    rules_file: Path | None
    allowed_lateness_days: int
    monitor_interval_s: float


@dataclass(frozen=True)
class PrivacyConfig:
    """Where the pseudonymization key comes from (a value, a file, or one generated under data_dir)."""

    key: str | None = field(repr=False)
    key_file: Path | None
    key_id: str


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process runs with."""

    kafka: KafkaConfig
    clickhouse: ClickHouseConfig
    validation: ValidationConfig
    rules: RulesConfig
    privacy: PrivacyConfig
    data_dir: Path
    batch_max_events: int
    batch_max_seconds: float
    sink_retry_max_seconds: float
    web_port: int
    shutdown_deadline_s: float
    #: the shop's Schema Registry: events framed with ids outside the manifest are decoded through it
    schema_registry: RegistryClientConfig | None = None
