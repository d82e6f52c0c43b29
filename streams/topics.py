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
| ``rules`` | rule id | the rule base (compacted, one partition, JSON) |
"""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from yibao.settings import STREAMS, Settings

PIPELINE_TOPICS = ("deadletter", "alerts", "internal.stays-by-hospital", "internal.stays-by-drg")
#: compacted: state changelogs (one partition per source partition) and the rule base
COMPACTED_TOPICS = ("changelog.person", "changelog.hospital", "changelog.drg", "changelog.procurement")
RULES_TOPIC = "rules"


def all_topics(settings: Settings) -> list[str]:
    return [settings.topic(s) for s in (*STREAMS, *PIPELINE_TOPICS, *COMPACTED_TOPICS, RULES_TOPIC)]


def _spec(settings: Settings, name: str) -> NewTopic:
    compact = {"cleanup.policy": "compact"}
    if name == settings.topic(RULES_TOPIC):
        return NewTopic(name, 1, settings.topic_replication, topic_configs=compact)
    if any(name == settings.topic(c) for c in COMPACTED_TOPICS):
        return NewTopic(name, settings.topic_partitions, settings.topic_replication, topic_configs=compact)
    return NewTopic(name, settings.topic_partitions, settings.topic_replication)


async def ensure_topics(settings: Settings, timeout_s: float = 30) -> list[str]:
    """Create the pipeline's topics that do not exist yet; returns the ones created."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in all_topics(settings) if t not in existing]
        created = []
        for name in wanted:
            try:
                await admin.create_topics([_spec(settings, name)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        if created:
            await asyncio.sleep(0.2)
        return created
    finally:
        await admin.close()
