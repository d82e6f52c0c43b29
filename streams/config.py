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
    #: the persons' rule state on disk here (streams.rules.diskstore); None: in memory
    state_dir: Path | None = None


@dataclass(frozen=True)
class PrivacyConfig:
    """Where the pseudonymization key comes from (a value, a file, or one generated under data_dir)."""

    key: str | None = field(repr=False)
    key_file: Path | None
    key_id: str


@dataclass(frozen=True)
class PrecheckCaller:
    """One institution's system allowed to call the pre-settlement check, and how it proves it."""

    id: str
    #: the institutions whose settlements it may check (its own ``fixmedins_code``)
    fixmedins_codes: frozenset[str]
    #: SHA-256 (hex) of each API key it may present as ``Authorization: Bearer <key>``
    api_key_sha256: frozenset[str] = frozenset()
    #: the subject CN of the client certificate it may present instead (mTLS)
    cert_cn: str | None = None
    rate_per_s: float = 50.0
    burst: int = 100


@dataclass(frozen=True)
class PrecheckConfig:
    """The pre-settlement check's HTTP server (streams/precheck): where, with what TLS, for whom."""

    host: str
    port: int
    callers: tuple[PrecheckCaller, ...]
    #: serve HTTPS with this certificate and key (plain HTTP without them: loopback only)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: verify client certificates against this CA (mTLS callers); API keys work either way
    client_ca_file: Path | None = None
    #: how the other workers reach this one (a check for a partition held here is forwarded to it)
    advertised_url: str = ""
    #: the CA other workers' certificates are checked against when a check is forwarded to them
    peer_ca_file: Path | None = None
    max_body_bytes: int = 262_144


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
    #: the pre-settlement check's server (None: not served by this worker)
    precheck: PrecheckConfig | None = None
    #: the columnar path (schemas.columnar_decode, a helper process) for batches it covers
    columnar: bool = True
