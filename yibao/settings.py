"""All settings of the pipeline, typed and validated in one place.

Every setting is read from an environment variable ``YIBAO_<NAME>`` (or a ``.env`` file) and can be
overridden by a CLI flag. Secrets may instead be given as a path in ``YIBAO_<NAME>_FILE`` (the
Kubernetes/Docker secret-file convention); they are held as ``SecretStr`` so they never print.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.registry_client import RegistryClientConfig
from sinks.config import ClickHouseConfig
from streams.config import (
    KafkaConfig,
    PrecheckCaller,
    PrecheckConfig,
    PrivacyConfig,
    RulesConfig,
    ValidationConfig,
    WorkerConfig,
)


class ClickHouseBackend(StrEnum):
    EMBEDDED = "embedded"
    SERVER = "server"


class LogFormat(StrEnum):
    CONSOLE = "console"
    JSON = "json"


class SecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("yibao", appauthor=False))


class SettingsError(ValueError):
    """Raised with a message that names the setting and says how to fix it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="YIBAO_", env_file=".env", extra="ignore", validate_default=True
    )

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    kafka_security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    kafka_sasl_mechanism: SaslMechanism = SaslMechanism.PLAIN
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    topic_prefix: str = Field("yibao.", description="Prefix of every topic name")
    topic_partitions: int = Field(4, ge=1, le=1024)
    topic_replication: int = Field(1, ge=1, le=16)
    consumer_group: str = "yibao-ingest"
    session_timeout_ms: int = Field(
        6_000, ge=3_000, le=300_000,
        description="Consumer-group session: a worker that stops heartbeating is replaced after this long. 6 s is "
                    "the least a Kafka broker accepts by default (group.min.session.timeout.ms); Tansu completes a "
                    "group join after half of it, so it also sets half a worker's start-up")

    # --- ClickHouse --------------------------------------------------------------------------
    ch_backend: ClickHouseBackend = ClickHouseBackend.EMBEDDED
    ch_host: str = "127.0.0.1"
    ch_port: int = Field(9000, ge=1, le=65535)
    ch_database: str = "yibao"
    ch_user: str = "default"
    ch_password: SecretStr = SecretStr("")
    ch_password_file: Path | None = None
    ch_secure: bool = False
    ch_verify: bool = True
    ch_ca_certs: Path | None = None
    ch_cluster: str | None = Field(None, description="ClickHouse cluster name for ON CLUSTER DDL")
    data_dir: Path = Field(default_factory=default_data_dir, description="chDB data and local state")

    # --- Schema Registry (the shop's; optional) ----------------------------------------------
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible Schema Registry: ids outside the manifest are fetched from it, "
                          "and `yibao schemas register` publishes the manifest there")
    schema_registry_username: str | None = None
    schema_registry_password: SecretStr | None = None
    schema_registry_password_file: Path | None = None
    schema_registry_ca_file: Path | None = None
    schema_registry_cert_file: Path | None = None
    schema_registry_key_file: Path | None = None
    schema_registry_timeout_s: float = Field(5.0, gt=0, le=60, description="Timeout of one registry request")

    # --- Sink batching -----------------------------------------------------------------------
    batch_max_events: int = Field(5000, ge=1, le=1_000_000)
    batch_max_seconds: float = Field(1.0, gt=0, le=60)
    sink_retry_max_seconds: float = Field(30.0, gt=0, le=600, description="Cap of the sink back-off")
    columnar: bool = Field(True, description="Decode, check and build rows of large batches as columns")

    # --- Privacy -----------------------------------------------------------------------------
    pseudo_key: SecretStr | None = None
    pseudo_key_file: Path | None = None
    pseudo_key_id: str = Field("k1", pattern=r"^[A-Za-z0-9_-]{1,16}$")
    pseudo_old_keys_file: Path | None = Field(
        None, description="Retired keys, one `key_id=hex` per line: old sealed dead letters stay openable"
    )

    # --- Validation --------------------------------------------------------------------------
    max_future_skew_s: int = Field(300, ge=0, description="Event times further ahead than this are rejected")
    min_event_year: int = Field(2018, ge=1990, le=2100, description="Event times before this year are rejected")
    dedup_horizon_days: int = Field(
        7, ge=1, le=90,
        description="Days (of arrival) an event's identity is remembered: a re-send (same event_id) within them "
                    "is recognised and lands once; about 60 bytes of memory per event")
    known_insutypes: tuple[str, ...] = ("310", "320", "330", "340", "390", "391", "392", "510")
    known_med_types: tuple[str, ...] = ("11", "12", "13", "14", "15", "16", "21", "22", "41", "51", "52")

    # --- Rules (intelligent monitoring) --------------------------------------------------------
    rules_enabled: bool = Field(True, description="Run the monitoring rules on the settlement stream")
    rules_file: Path | None = Field(None, description="Seed rule base (default: the shipped rules.toml)")
    allowed_lateness_days: int = Field(35, ge=0, le=400, description="Events later than this skip windowed rules")
    state_store: str = Field(
        "memory", pattern=r"^(memory|disk)$",
        description="Where a worker keeps the persons' rule state: memory (about 3.5 kB a person, rebuilt from "
                    "the whole changelog at every start) or disk (RocksDB under YIBAO_STATE_DIR: memory bounded, "
                    "a restart reads only the changelog written since)")
    state_dir: Path | None = Field(None, description="The disk store's directory (default: <data_dir>/state); "
                                                     "one per worker process")
    monitor_interval_s: float = Field(
        300.0, ge=0, le=86_400,
        description="Seconds between runs of the ClickHouse monitors (fund, settled-over-sold, credit) in the "
                    "worker holding supervision partition 0; 0: off")

    # --- Worker ------------------------------------------------------------------------------
    web_port: int = Field(6066, ge=0, le=65535, description="Metrics/health port of the first worker process")
    processes: int = Field(1, ge=1, le=64, description="Worker processes started by `yibao worker`")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    log_format: LogFormat = Field(
        LogFormat.CONSOLE, description="console: lines for people; json: one JSON object per line, for log shippers")
    shutdown_deadline_s: float = Field(20.0, gt=0, le=600)

    # --- Pre-settlement check (事前提示) --------------------------------------------------------
    precheck_port: int = Field(
        0, ge=0, le=65535,
        description="Port of the pre-settlement check API of the first worker process (the next process +1, ...); "
                    "0: not served")
    precheck_host: str = Field("0.0.0.0", description="Address the pre-settlement check listens on")
    precheck_callers_file: Path | None = Field(
        None, description="TOML file of the institutions' systems allowed to call the check (format: "
                          "docs/operations.md)")
    precheck_tls_cert_file: Path | None = None
    precheck_tls_key_file: Path | None = None
    precheck_client_ca_file: Path | None = Field(
        None, description="CA of the callers' client certificates (mutual TLS); API keys work either way")
    precheck_peer_ca_file: Path | None = Field(
        None, description="CA of the other workers' certificates, for checks forwarded to the partition's holder")
    precheck_advertised_host: str | None = Field(
        None, description="Host name the other workers reach this one at (default: this machine's name, or "
                          "127.0.0.1 when listening on loopback)")
    precheck_allow_plaintext: bool = Field(
        False, description="Serve the check over plain HTTP on a non-loopback address (never in production)")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        for part in v.split(","):
            if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", part.strip()):
                raise ValueError(f"{part!r} is not host:port; e.g. YIBAO_KAFKA_BOOTSTRAP=kafka-1:9092")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]*", v):
            raise ValueError("topic prefix may only contain letters, digits, '.', '_' and '-'")
        return v

    @field_validator("ch_database")
    @classmethod
    def _db(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("database name must be an identifier (letters, digits, underscore)")
        return v

    @field_validator("schema_registry_url")
    @classmethod
    def _registry_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        import urllib.parse

        parts = urllib.parse.urlsplit(v.strip())
        try:
            _ = parts.port  # raises on a port that is not a number
        except ValueError:
            raise ValueError(f"{_without_password(v)!r} has a port that is not a number") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{_without_password(v)!r} is not http(s)://host[:port]; "
                             "e.g. YIBAO_SCHEMA_REGISTRY_URL=https://registry.internal:8081")
        return v.strip()

    @field_validator("kafka_sasl_password_file", "ch_password_file", "pseudo_key_file", "kafka_ssl_cafile",
                     "kafka_ssl_certfile", "kafka_ssl_keyfile", "ch_ca_certs", "schema_registry_password_file",
                     "schema_registry_ca_file", "schema_registry_cert_file", "schema_registry_key_file",
                     "precheck_callers_file", "precheck_tls_cert_file", "precheck_tls_key_file",
                     "precheck_client_ca_file", "precheck_peer_ca_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        """A secret or TLS file that cannot be read is reported with the other bad settings, naming its
        variable, rather than as a traceback when a client first opens it."""
        if v is not None:
            problem = unreadable(v)
            if problem:
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _secrets_from_files(self) -> Settings:
        for name in ("kafka_sasl_password", "ch_password", "pseudo_key", "schema_registry_password"):
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"YIBAO_{name.upper()}_FILE: cannot read {path}: {exc.strerror}") from exc
            object.__setattr__(self, name, SecretStr(value))
        if self.kafka_security_protocol.value.startswith("SASL") and not self.kafka_sasl_username:
            raise ValueError(
                "YIBAO_KAFKA_SECURITY_PROTOCOL is SASL_* but YIBAO_KAFKA_SASL_USERNAME is not set"
            )
        self._check_registry()
        self._check_precheck()
        return self

    def _check_precheck(self) -> None:
        """Pre-settlement check settings that cannot work, named before the worker starts."""
        if self.precheck_port == 0:
            return
        if self.precheck_callers_file is None:
            raise ValueError("YIBAO_PRECHECK_PORT is set but YIBAO_PRECHECK_CALLERS_FILE is not: no caller could "
                             "be authenticated (its format: docs/operations.md, Pre-settlement check)")
        if (self.precheck_tls_cert_file is None) != (self.precheck_tls_key_file is None):
            raise ValueError("YIBAO_PRECHECK_TLS_CERT_FILE and YIBAO_PRECHECK_TLS_KEY_FILE go together")
        if self.precheck_client_ca_file is not None and self.precheck_tls_cert_file is None:
            raise ValueError("YIBAO_PRECHECK_CLIENT_CA_FILE needs TLS: set YIBAO_PRECHECK_TLS_CERT_FILE and _KEY_FILE")
        if (self.precheck_tls_cert_file is None and not _loopback(self.precheck_host)
                and not self.precheck_allow_plaintext):
            raise ValueError(f"YIBAO_PRECHECK_HOST={self.precheck_host} without TLS: API keys would cross the "
                             "network in clear; set YIBAO_PRECHECK_TLS_CERT_FILE and _KEY_FILE (or listen on "
                             "127.0.0.1 behind a TLS proxy)")
        load_callers(self.precheck_callers_file)

    def _check_registry(self) -> None:
        """Registry settings that cannot work together, named before any request fails on them."""
        tls = [n for n in ("ca_file", "cert_file", "key_file") if getattr(self, f"schema_registry_{n}") is not None]
        auth = [n for n in ("username", "password") if getattr(self, f"schema_registry_{n}") is not None]
        if self.schema_registry_url is None:
            if tls or auth:
                raise ValueError(f"YIBAO_SCHEMA_REGISTRY_{(tls + auth)[0].upper()} is set but "
                                 "YIBAO_SCHEMA_REGISTRY_URL is not")
            return
        if tls and not self.schema_registry_url.lower().startswith("https://"):
            raise ValueError(f"YIBAO_SCHEMA_REGISTRY_{tls[0].upper()} is set but YIBAO_SCHEMA_REGISTRY_URL is not "
                             "https://: TLS files are only used over https")
        if self.schema_registry_key_file is not None and self.schema_registry_cert_file is None:
            raise ValueError("YIBAO_SCHEMA_REGISTRY_KEY_FILE is set but YIBAO_SCHEMA_REGISTRY_CERT_FILE is not")
        if self.schema_registry_password is not None and not self.schema_registry_username:
            raise ValueError("YIBAO_SCHEMA_REGISTRY_PASSWORD is set but YIBAO_SCHEMA_REGISTRY_USERNAME is not")

    # --- derived -----------------------------------------------------------------------------
    def topic(self, stream: str) -> str:
        """Full topic name of a logical stream (settlement, procurement, supervision, alerts, ...)."""
        return f"{self.topic_prefix}{stream}"

    @property
    def chdb_path(self) -> Path:
        return self.data_dir / "chdb"

    def kafka(self) -> KafkaConfig:
        return KafkaConfig(client=self.kafka_client_kwargs(), topic_prefix=self.topic_prefix,
                           partitions=self.topic_partitions, replication=self.topic_replication,
                           consumer_group=self.consumer_group, session_timeout_ms=self.session_timeout_ms)

    def validation(self) -> ValidationConfig:
        return ValidationConfig(known_insutypes=frozenset(self.known_insutypes),
                                known_med_types=frozenset(self.known_med_types),
                                max_future_skew_s=self.max_future_skew_s, min_event_year=self.min_event_year,
                                dedup_horizon_days=self.dedup_horizon_days)

    def rules(self) -> RulesConfig:
        return RulesConfig(enabled=self.rules_enabled, rules_file=self.rules_file,
                           allowed_lateness_days=self.allowed_lateness_days,
                           monitor_interval_s=self.monitor_interval_s,
                           state_dir=self.state_path() if self.state_store == "disk" else None)

    def state_path(self) -> Path:
        """The disk store's directory (YIBAO_STATE_DIR, else under the data directory)."""
        return self.state_dir or self.data_dir / "state"

    def privacy(self) -> PrivacyConfig:
        return PrivacyConfig(key=self.pseudo_key.get_secret_value() if self.pseudo_key else None,
                             key_file=self.pseudo_key_file, key_id=self.pseudo_key_id)

    def worker(self) -> WorkerConfig:
        """What a worker process runs with (streams.config): the one place settings become config."""
        return WorkerConfig(
            kafka=self.kafka(), clickhouse=self.clickhouse(), validation=self.validation(), rules=self.rules(),
            privacy=self.privacy(), data_dir=self.data_dir, batch_max_events=self.batch_max_events,
            batch_max_seconds=self.batch_max_seconds, sink_retry_max_seconds=self.sink_retry_max_seconds,
            web_port=self.web_port, shutdown_deadline_s=self.shutdown_deadline_s,
            schema_registry=self.schema_registry(), precheck=self.precheck(), columnar=self.columnar,
        )

    def precheck(self) -> PrecheckConfig | None:
        """The pre-settlement check's server of this process (None when not served)."""
        if self.precheck_port == 0 or self.precheck_callers_file is None:
            return None
        import socket

        tls = self.precheck_tls_cert_file is not None
        host = self.precheck_advertised_host or ("127.0.0.1" if _loopback(self.precheck_host)
                                                 else socket.getfqdn())
        return PrecheckConfig(
            host=self.precheck_host, port=self.precheck_port, callers=load_callers(self.precheck_callers_file),
            tls_cert_file=self.precheck_tls_cert_file, tls_key_file=self.precheck_tls_key_file,
            client_ca_file=self.precheck_client_ca_file, peer_ca_file=self.precheck_peer_ca_file,
            advertised_url=f"{'https' if tls else 'http'}://{host}:{self.precheck_port}",
        )

    def schema_registry(self) -> RegistryClientConfig | None:
        """How to reach the shop's Schema Registry (schemas.registry_client); None when none is set."""
        if self.schema_registry_url is None:
            return None
        return RegistryClientConfig(
            url=self.schema_registry_url, username=self.schema_registry_username,
            password=self.schema_registry_password.get_secret_value() if self.schema_registry_password else None,
            ca_file=self.schema_registry_ca_file, cert_file=self.schema_registry_cert_file,
            key_file=self.schema_registry_key_file, timeout_s=self.schema_registry_timeout_s,
        )

    def clickhouse(self) -> ClickHouseConfig:
        """How to reach ClickHouse, for :func:`sinks.connect`."""
        return ClickHouseConfig(
            backend=self.ch_backend.value, database=self.ch_database, chdb_path=self.chdb_path,
            host=self.ch_host, port=self.ch_port, user=self.ch_user, password=self.ch_password.get_secret_value(),
            secure=self.ch_secure, verify=self.ch_verify, ca_certs=self.ch_ca_certs, cluster=self.ch_cluster,
        )

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """Connection options shared by every aiokafka/kafka-python client."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol.value,
        }
        if self.kafka_security_protocol.value.startswith("SASL"):
            kw["sasl_mechanism"] = self.kafka_sasl_mechanism.value
            kw["sasl_plain_username"] = self.kafka_sasl_username
            kw["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
            )
        if self.kafka_security_protocol.value.endswith("SSL"):
            import ssl

            ctx = ssl.create_default_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
            )
            if self.kafka_ssl_certfile:
                ctx.load_cert_chain(
                    str(self.kafka_ssl_certfile),
                    str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
                )
            kw["ssl_context"] = ctx
        return kw

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with every secret replaced, for `yibao config show` and logs."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "**********" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, StrEnum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            if name == "schema_registry_url" and value:
                value = _without_password(value)
            out[name] = value
        return out


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags).

    Overrides that are ``None`` are ignored, so unset flags never mask the environment.
    Raises SettingsError with one line per problem, naming the environment variable.
    """
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            # a ValueError of ours says what is wrong in its own words; pydantic prefixes "Value error, "
            cause = (err.get("ctx") or {}).get("error")
            msg = str(cause) if err["type"] == "value_error" and cause is not None else err["msg"]
            lines.append(f"YIBAO_{loc.upper()}: {msg}" if loc else msg)
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


def _without_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part masked: for messages and `config show`."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:**********@{host}"))


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


CALLERS_EXAMPLE = """\
# Who may call the pre-settlement check (YIBAO_PRECHECK_CALLERS_FILE). One [[caller]] per institution
# system. A caller may only check settlements of its own fixmedins_code(s). It proves who it is with an
# API key (Authorization: Bearer <key>): give the key's file (read at start) or its SHA-256; or with a
# client certificate (mutual TLS) whose subject CN is cert_cn.
[[caller]]
id = "his-H33010200011"                  # in logs and precheck_log; never a person
fixmedins_codes = ["H33010200011"]
api_key_file = "/run/secrets/precheck/his-H33010200011"
# api_key_sha256 = ["<hex of sha256(key)>"]
# cert_cn = "his.H33010200011.example"
rate_per_s = 50                          # sustained checks a second (per worker process)
burst = 100
"""


def load_callers(path: Path) -> tuple[PrecheckCaller, ...]:
    """The callers of a callers file (format: :data:`CALLERS_EXAMPLE`); ValueError names what is wrong."""
    import hashlib
    import tomllib

    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"YIBAO_PRECHECK_CALLERS_FILE: cannot read {path}: {exc}") from None
    out: list[PrecheckCaller] = []
    seen: set[str] = set()
    for i, c in enumerate(doc.get("caller", [])):
        where = f"YIBAO_PRECHECK_CALLERS_FILE: caller {i + 1}"
        if not isinstance(c, dict):
            raise ValueError(f"{where}: not a table")
        unknown = set(c) - {"id", "fixmedins_codes", "api_key_file", "api_key_sha256", "cert_cn", "rate_per_s",
                            "burst"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        cid = c.get("id")
        if not isinstance(cid, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", cid) or cid in seen:
            raise ValueError(f"{where}: id must be 1-64 letters, digits, '.', '_' or '-', unique")
        seen.add(cid)
        codes = c.get("fixmedins_codes")
        if not isinstance(codes, list) or not codes or not all(isinstance(x, str) and x for x in codes):
            raise ValueError(f"{where} ({cid}): fixmedins_codes must list its institution code(s)")
        digests = set()
        for h in c.get("api_key_sha256", []):
            if not isinstance(h, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", h):
                raise ValueError(f"{where} ({cid}): api_key_sha256 entries are 64 hex digits")
            digests.add(h.lower())
        if "api_key_file" in c:
            kf = Path(str(c["api_key_file"]))
            problem = unreadable(kf)
            key = "" if problem else kf.read_text(encoding="utf-8").strip()
            if problem or len(key) < 16:
                raise ValueError(f"{where} ({cid}): api_key_file: {problem or 'a key of at least 16 characters'}")
            digests.add(hashlib.sha256(key.encode()).hexdigest())
        cn = c.get("cert_cn")
        if not digests and not cn:
            raise ValueError(f"{where} ({cid}): give api_key_file, api_key_sha256 or cert_cn")
        rate, burst = c.get("rate_per_s", 50), c.get("burst", 100)
        if not isinstance(rate, (int, float)) or rate <= 0 or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"{where} ({cid}): rate_per_s must be > 0 and burst >= 1")
        out.append(PrecheckCaller(cid, frozenset(codes), frozenset(digests), str(cn) if cn else None,
                                  float(rate), burst))
    if not out:
        raise ValueError(f"YIBAO_PRECHECK_CALLERS_FILE: {path} names no [[caller]]")
    return tuple(out)


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (``None`` when it can), in words a person can act on."""
    if not path.exists():
        return f"cannot read {path}: no such file"
    if path.is_dir():
        return f"cannot read {path}: it is a directory"
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None
