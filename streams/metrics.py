"""Prometheus metrics of a worker process (served on its web port at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_IN = Counter("yibao_events_in_total", "Events consumed", ["topic"], registry=REGISTRY)
EVENTS_LANDED = Counter(
    "yibao_events_landed_total", "Events written to their primary table", ["topic", "record"], registry=REGISTRY
)
DEAD_LETTERS = Counter(
    "yibao_dead_letters_total", "Events dead-lettered", ["topic", "reason"], registry=REGISTRY
)
DUPLICATES_SKIPPED = Counter(
    "yibao_redelivered_rows_skipped_total",
    "Rows not re-inserted because a redelivered event had already landed",
    ["table"],
    registry=REGISTRY,
)
DUPLICATES_RECOGNISED = Counter(
    "yibao_duplicates_recognised_total",
    "Re-sent events recognised by their event_id (same content, new offset): neither landed nor dead-lettered",
    ["topic", "event_type"],
    registry=REGISTRY,
)
IDENTITIES = Gauge(
    "yibao_identities_remembered",
    "Event identities held to recognise re-sends (about 60 bytes each), per topic",
    ["topic"],
    registry=REGISTRY,
)
ROWS_WRITTEN = Counter("yibao_rows_written_total", "Rows written to ClickHouse", ["table"], registry=REGISTRY)
SINK_SECONDS = Histogram(
    "yibao_sink_batch_seconds",
    "Time to make one batch durable in ClickHouse",
    ["topic"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
SINK_RETRIES = Counter(
    "yibao_sink_retries_total", "Sink attempts that failed and were retried", ["topic", "kind"], registry=REGISTRY
)
#: Whether ClickHouse is reachable as far as this worker knows: set by a probe at start-up, then by
#: every write and read of the ingest path (0 while it backs off). An idle worker keeps its last
#: known state, so the alert on it pages for an outage, not for a worker that has nothing to write.
SINK_UP = Gauge(
    "yibao_sink_up",
    "1 when ClickHouse is reachable as far as this worker knows (start-up probe, then the last write or read "
    "answered); 0 while it backs off",
    registry=REGISTRY,
)
BATCH_EVENTS = Histogram(
    "yibao_batch_events", "Events per flushed batch", ["topic"],
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 50000), registry=REGISTRY,
)
#: Seconds from the process's start (the kernel's record of it, so Python's own start-up counts) to the
#: first record fetched of a topic after its partitions were assigned: what start-up costs an
#: operator who restarts a worker with a backlog waiting. Set once per process and topic.
FIRST_FETCH = Gauge(
    "yibao_first_fetch_seconds",
    "Seconds from process start to the first record fetched of this topic (start-up, group join and restore)",
    ["topic"], registry=REGISTRY,
)
ASSIGNED_PARTITIONS = Gauge(
    "yibao_assigned_partitions", "Partitions assigned to this worker", ["topic"], registry=REGISTRY
)
#: Events of a partition the worker has not yet made durable: the high watermark of its latest fetch
#: response minus the first offset not yet committed (the oldest event it holds in a batch, else its
#: fetch position). Not from ListOffsets: Tansu answers that with the last batch's base offset + 1,
#: which is why kafka-consumer-groups and Burrow show negative lag on the dev broker (streams.ingest).
CONSUMER_LAG = Gauge(
    "yibao_consumer_lag",
    "Events not yet landed, per partition this worker holds: fetch high watermark minus the first offset not "
    "committed (never negative; frozen while fetching is paused for a ClickHouse outage)",
    ["topic", "partition"],
    registry=REGISTRY,
)
STAGE_SECONDS = Counter(
    "yibao_stage_seconds_total", "CPU-side time per pipeline stage", ["topic", "stage"], registry=REGISTRY
)
COLUMNAR_EVENTS = Counter(
    "yibao_columnar_events_total",
    "Events decoded and checked as columns; the others took the record path (a batch under 200 events of "
    "one record, another schema version, a row the mask cannot vouch for, the decoder starting or resting)",
    ["topic"],
    registry=REGISTRY,
)

# --- rule engine (incremented by streams/rules; declared here so dashboards and alerting rules
# can rely on the names before the first rule fires) --------------------------------------------
ALERTS = Counter(
    "yibao_alerts_total", "Anomaly alerts emitted, by rule and severity", ["rule_id", "severity"], registry=REGISTRY
)
BATCHES_SPLIT = Counter(
    "yibao_batches_split_total",
    "Batches (and parts of them) that failed because of a message in them, and were split to find it",
    ["topic", "reason"],
    registry=REGISTRY,
)
STATE_CAPPED = Counter(
    "yibao_state_capped_total",
    "Events after which a key's rule state was cut to its bound (a person settling thousands of times)",
    ["topic"],
    registry=REGISTRY,
)
STATE_EVICTED = Counter(
    "yibao_state_evicted_total",
    "Keys of rule state dropped because no rule's window or alert can need them any more (tombstoned in the changelog)",
    ["topic"],
    registry=REGISTRY,
)
STATE_RESTORE_FAILURES = Counter(
    "yibao_state_restore_failures_total",
    "Partition assignments whose rule state could not be restored from its changelog (rules restart empty)",
    ["store"],
    registry=REGISTRY,
)
WINDOW_STATE_KEYS = Gauge(
    "yibao_window_state_keys",
    "Keys held in a windowed rule state store (memory grows with it; watch it against the pod limit)",
    ["store"],
    registry=REGISTRY,
)

PRECHECKS = Counter(
    "yibao_precheck_requests_total",
    "Pre-settlement checks answered, by outcome (hits, clear, or the error code) and whether forwarded",
    ["outcome", "forwarded"],
    registry=REGISTRY,
)
PRECHECK_SECONDS = Histogram(
    "yibao_precheck_seconds",
    "Time to answer a pre-settlement check, from request to response (forwarding included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)


def process_age_s() -> float | None:
    """Seconds since this process started, from /proc (None where there is no /proc).

    The kernel counts a process's start in clock ticks since boot, so it is compared with the clock
    since boot (CLOCK_BOOTTIME), not with wall time: /proc/stat's boot time is a whole second, which
    put up to a second on every age (and NTP steps since boot more)."""
    import os
    import time

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the command's ")"
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(0.0, since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))
