"""Which worker owns which settlement partition: the routing table of the pre-settlement check.

A person's history lives in the worker that consumes the person's settlement partition, so a check
must be answered there. As Faust does for its table web views, the consumer group's own assignment
carries the map: every member announces the URL its check server answers at in its join metadata;
the group leader assigns partitions round-robin (as aiokafka's default does) and hands every member
the whole map ``partition → URL`` in the assignment's user data. Each member therefore learns, in the
same step that gives it its partitions, who holds all the others, and the map changes exactly when
ownership does.

Members that do not run this assignor (an older worker during a rolling upgrade) still join: the
consumer also offers aiokafka's ``roundrobin``, which the coordinator picks when not every member
offers ``yibao-owners``; the map is then empty and every check for a partition held elsewhere is
answered "state unavailable".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata


class Owners:
    """The latest ``topic → partition → URL`` map a rebalance delivered (empty until the first)."""

    def __init__(self) -> None:
        self.by_topic: dict[str, dict[int, str]] = {}
        self.generation = 0

    def update(self, mapping: Mapping[str, Mapping[int, str]]) -> None:
        self.by_topic = {t: dict(ps) for t, ps in mapping.items()}
        self.generation += 1

    def url(self, topic: str, partition: int) -> str | None:
        u = self.by_topic.get(topic, {}).get(partition)
        return u or None

    def partitions(self, topic: str) -> int:
        """How many partitions of ``topic`` the map covers (0 before the first assignment)."""
        return len(self.by_topic.get(topic, {}))


def owners_assignor(url: str, owners: Owners) -> type[RoundRobinPartitionAssignor]:
    """An assignor class for one consumer: it announces ``url`` and keeps ``owners`` up to date.

    aiokafka takes assignor *classes* and calls their class methods, so each consumer gets a class
    of its own carrying its URL and its map.
    """
    announce = url.encode("utf-8")

    class OwnersAssignor(RoundRobinPartitionAssignor):  # type: ignore[misc]
        name = "yibao-owners"
        version = 0

        @classmethod
        def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
            return ConsumerProtocolMemberMetadata(cls.version, list(topics), announce)

        @classmethod
        def assign(cls, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
                   ) -> dict[str, ConsumerProtocolMemberAssignment]:
            plain = super().assign(cluster, members)
            table: dict[str, dict[str, str]] = {}
            for member, a in plain.items():
                member_url = bytes(members[member].user_data or b"").decode("utf-8", "replace")
                for topic, parts in a.assignment:
                    for p in parts:
                        table.setdefault(topic, {})[str(p)] = member_url
            blob = orjson.dumps(table)
            return {m: ConsumerProtocolMemberAssignment(cls.version, a.assignment, blob) for m, a in plain.items()}

        @classmethod
        def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
            owners.update(decode_table(assignment.user_data))

    return OwnersAssignor


def decode_table(user_data: bytes | None) -> dict[str, dict[int, str]]:
    """The map in an assignment's user data; empty when there is none (the roundrobin fallback)."""
    if not user_data:
        return {}
    try:
        raw: Any = orjson.loads(user_data)
        return {str(t): {int(p): str(u) for p, u in ps.items()} for t, ps in raw.items()}
    except (orjson.JSONDecodeError, AttributeError, ValueError):
        return {}


def strategies(url: str | None, owners: Owners) -> tuple[Callable[..., Any] | type, ...]:
    """The consumer's ``partition_assignment_strategy``: the owners assignor first when this worker
    serves checks (or routes them), aiokafka's roundrobin always (so mixed groups still form)."""
    if url is None:
        return (RoundRobinPartitionAssignor,)
    return (owners_assignor(url, owners), RoundRobinPartitionAssignor)
