"""The in-memory side of the exactly-once lookup: what the tables said they hold, per partition,
until the consumer has moved past it (the SQL is sinks.landed)."""

from __future__ import annotations

from collections.abc import Iterable

from schemas.alert_ids import versions_until
from sinks.tables import ALERTS_TABLE


class LandedIndex:
    """Events at or beyond the committed position that tables already hold, per partition.

    Filled when a partition is (re)assigned, from the tables themselves: for each table, source
    offset → identity of the event stored there. Emptied as the consumer moves past the highest
    such offset. Usually empty: it only matters after a crash between a write and its commit.
    """

    def __init__(self) -> None:
        self._seen: dict[int, dict[str, dict[int, set[str]]]] = {}
        self._horizon: dict[int, int] = {}
        #: per partition, the alert versions (event ids) held at any redelivered position, and every
        #: version before one held
        self._alerts: dict[int, set[str]] = {}

    def load(self, partition: int, per_table: dict[str, dict[int, set[str]]],
             alert_versions: Iterable[tuple[str, str, str]] = ()) -> None:
        """What the tables hold from the first redelivered offset on; ``alert_versions`` are the
        (alert_id, status, event_id) the alerts table holds there (sinks.landed.alert_versions_held).

        The alerts table keeps one version per alert once merged: a version that landed (FIRED) may
        have been replaced by a later one (its RETRACTED) before the redelivery looks. Re-inserting
        it would bring it back, and where both fall in the same second the merge keeps whichever
        was inserted last: a retracted alert would stand again. So a version counts as landed when
        it or any later version of its alert is held.
        """
        nonempty = {t: s for t, s in per_table.items() if s}
        if nonempty:
            self._seen[partition] = nonempty
            self._horizon[partition] = max(max(s) for s in nonempty.values())
            alerts: set[str] = set().union(*nonempty.get(ALERTS_TABLE, {}).values())
            for aid, status, event_id in alert_versions:
                alerts.update(versions_until(aid, status, event_id))
            self._alerts[partition] = alerts
        else:
            self.forget(partition)

    def forget(self, partition: int) -> None:
        self._seen.pop(partition, None)
        self._horizon.pop(partition, None)
        self._alerts.pop(partition, None)

    def active(self) -> bool:
        return bool(self._seen)

    def __call__(self, table: str, partition: int, offset: int, ident: str) -> bool:
        """Whether ``table`` holds the event ``ident`` at this position. An alert version (its
        deterministic event id) counts wherever in the redelivered range it was written: state
        restored from a changelog whose keys were written in part (a crash between them) can reach
        the same decision at another event of the batch, and it is still the same version. It also
        counts when a later version of its alert is held (see :meth:`load`)."""
        seen = self._seen.get(partition)
        if not seen:
            return False
        if table == ALERTS_TABLE:
            return ident in self._alerts.get(partition, ())
        idents = seen.get(table, {}).get(offset)
        return idents is not None and ident in idents

    def tables_at(self, partition: int, offset: int) -> list[str]:
        """Tables holding rows of whatever event was at this position."""
        return [t for t, by_offset in self._seen.get(partition, {}).items() if offset in by_offset]

    def advance(self, partition: int, last_offset: int) -> None:
        h = self._horizon.get(partition)
        if h is not None and last_offset >= h:
            self.forget(partition)
