"""Topic layout and creation.

| topic (default prefix ``yibao.``) | key | carries |
|---|---|---|
| ``settlement`` | psn_no | Settlement, SettlementReversal, CrossProvinceFiling |
| ``procurement`` | fixmedins_code | contracts, orders, deliveries, inventory movements, payments |
| ``supervision`` | fixmedins_code (region if none) | inspections, tips, penalties, recoveries, fund income |
| ``deadletter`` | ``<source topic>/<partition>`` | DeadLetter (sealed original bytes + reason) |
| ``alerts`` | institution (or person token) | AnomalyAlert |
| ``internal.stays-by-hospital`` / ``-by-drg`` | fixmedins_code / drg_code | inpatient stays re-keyed (JSON) |
| ``changelog.person`` / ``.hospital`` / ``.drg`` | state key | detector state (compacted, JSON) |
| ``changelog.procurement`` | fixmedins_code; ``<code>#tr#<day>`` | procurement detector state, sold trace codes |
| ``changelog.identity.<subsystem>`` | ``<arrival day>:<first offset>`` | event identities seen (streams.identity) |
| ``rules`` | rule id | the rule base (compacted, one partition, JSON) |
"""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from .config import KafkaConfig

#: The three subsystem topics the worker ingests.
STREAMS = ("settlement", "procurement", "supervision")
PIPELINE_TOPICS = ("deadletter", "alerts", "internal.stays-by-hospital", "internal.stays-by-drg")
#: compacted: state changelogs (one partition per source partition) and the rule base
COMPACTED_TOPICS = ("changelog.person", "changelog.hospital", "changelog.drg", "changelog.procurement",
                    *(f"changelog.identity.{s}" for s in STREAMS))
RULES_TOPIC = "rules"


def all_topics(kafka: KafkaConfig) -> list[str]:
    return [kafka.topic(s) for s in (*STREAMS, *PIPELINE_TOPICS, *COMPACTED_TOPICS, RULES_TOPIC)]


def _spec(kafka: KafkaConfig, name: str) -> NewTopic:
    compact = {"cleanup.policy": "compact"}
    if name == kafka.topic(RULES_TOPIC):
        return NewTopic(name, 1, kafka.replication, topic_configs=compact)
    if any(name == kafka.topic(c) for c in COMPACTED_TOPICS):
        return NewTopic(name, kafka.partitions, kafka.replication, topic_configs=compact)
    return NewTopic(name, kafka.partitions, kafka.replication)


async def ensure_topics(kafka: KafkaConfig, timeout_s: float = 30) -> list[str]:
    """Create the pipeline's topics that do not exist yet; returns the ones created."""
    admin = AIOKafkaAdminClient(**kafka.client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in all_topics(kafka) if t not in existing]
        created = []
        for name in wanted:
            try:
                await admin.create_topics([_spec(kafka, name)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        if created:
            await asyncio.sleep(0.2)
        return created
    finally:
        await admin.close()
