"""The exactly-once lookup, in SQL: which rows of a redelivered range a table already holds.

Rows carry their source position (``src_partition``, ``src_offset``) and the identity of the event
they came from (:func:`identity_column`). After a crash, rebalance or an insert of unknown
outcome, a worker asks the tables which events at or beyond a position they hold, and sends only
the others (docs/design.md, the state tables). Offsets alone are not trusted: a recreated topic
reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from schemas.alert_ids import versions_until

from .base import Backend, literal
from .tables import ALERTS_TABLE, DEAD_LETTER_TABLE

log = structlog.get_logger(__name__)
Columns = dict[str, list[Any]]

#: The column identifying an event's rows in each table (default ``event_id``). Offsets alone are not
#: enough: a recreated topic reuses them, and a different event at a reused offset must still land.
IDENTITY = {"fee_details": "setl_id", DEAD_LETTER_TABLE: "payload_digest"}


def identity_column(table: str) -> str:
    return IDENTITY.get(table, "event_id")


def existing_rows(backend: Backend, table: str, partition: int, from_offset: int,
                  topic: str | None = None, rule_ids: Sequence[str] | None = None) -> dict[int, set[str]]:
    """Source offset → event identities that ``table`` already holds, for offsets ≥ ``from_offset``.

    Tables that several source topics share name theirs: dead letters by ``topic``, alerts by the
    ``rule_ids`` that only this stream's engine raises (another stream's alert at the same
    partition and offset is not a redelivery of this one).
    """
    where = f"src_partition = {int(partition)} AND src_offset >= {int(from_offset)}"
    if topic is not None:
        where += " AND source_topic = '" + topic.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if rule_ids is not None:
        where += " AND rule_id IN (" + (", ".join(literal(r) for r in rule_ids) or "''") + ")"
    ident = identity_column(table)
    res = backend.query(
        # read_table: in ClickHouse cluster mode, the Distributed table over every shard
        f"SELECT DISTINCT src_offset, {ident} FROM {backend.read_table(table)} WHERE {where}"
    )
    out: dict[int, set[str]] = {}
    for off, idv in res.rows:
        out.setdefault(int(off), set()).add(str(idv))
    return out


def alert_versions_held(backend: Backend, partition: int, from_offset: int,
                        rule_ids: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(alert_id, status, event_id) of the alert versions the alerts table holds at offsets ≥
    ``from_offset`` of ``partition``, for these rules (None: every rule).

    The table is a ReplacingMergeTree by ``alert_id``: a background merge keeps one version of an
    alert and drops the others, so a version that landed may no longer be there to be found; the
    version that is there says which ones it replaced (streams/landed.py).
    """
    if rule_ids is not None and not rule_ids:
        return []
    where = f"src_partition = {int(partition)} AND src_offset >= {int(from_offset)}"
    if rule_ids is not None:
        where += f" AND rule_id IN ({', '.join(literal(r) for r in rule_ids)})"
    res = backend.query(f"SELECT DISTINCT alert_id, status, event_id FROM {backend.read_table(ALERTS_TABLE)} "
                        f"WHERE {where}")
    return [(str(a), str(s), str(e)) for a, s, e in res.rows]


def without_existing(backend: Backend, table: str, cols: Columns, topic: str) -> Columns:
    """``cols`` minus the rows ``table`` already holds, by (src_partition, src_offset, identity).

    Used before re-sending an insert whose outcome is unknown (see ``Ingestor._insert_once``).
    Dead letters of several source topics share one table, so their lookup names the topic. An
    alert version counts as held when a later version of its alert is (a merge keeps one).
    """
    parts, offs = cols["src_partition"], cols["src_offset"]
    idents = cols[identity_column(table)]
    first: dict[int, int] = {}
    for p, o in zip(parts, offs, strict=True):
        if o < first.get(p, o + 1):
            first[p] = o
    held = {
        (p, o, ident)
        for p, start in first.items()
        for o, ids in existing_rows(backend, table, p, start,
                                    topic if table == DEAD_LETTER_TABLE else None).items()
        for ident in ids
    }
    superseded: set[tuple[int, str]] = set()
    if table == ALERTS_TABLE:  # a merge may already have replaced a version that landed (streams/landed.py)
        superseded = {(p, v) for p, start in first.items() for aid, status, event_id in
                      alert_versions_held(backend, p, start) for v in versions_until(aid, status, event_id)}
    if not held and not superseded:
        return cols
    keep = [i for i, key in enumerate(zip(parts, offs, idents, strict=True))
            if (key[0], key[1], str(key[2])) not in held and (key[0], str(key[2])) not in superseded]
    log.warning("an insert of unknown outcome had landed; re-sending only the missing rows",
                table=table, landed=len(parts) - len(keep), missing=len(keep))
    return {name: [values[i] for i in keep] for name, values in cols.items()}
