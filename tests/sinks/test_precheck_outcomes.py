"""``precheck_log`` and ``bi_precheck_outcomes`` (``sinks/ddl/0009_precheck.sql``) on both engines.

Rows go in as the worker writes them (``Backend.insert`` into the staging twins, raw values). A
hit's outcome depends on when the visit's settlement LANDED (``ingested_at``, the server's clock at
insert) relative to ``checked_at`` (the worker's clock, a value the test chooses): checks dated an
hour before the inserts see settlements that land after them, checks dated an hour later see
settlements that had landed before them. Each case has its own institution, so its rows of the view
are its own; ``setl_time`` is set on the wrong side of ``checked_at`` wherever event time would give
another answer than landing time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sinks import TABLES, Backend, ClickHouseConfig, SinkError, connect
from sinks.migrate import migrate
from yibao.localinfra import ClickHouseEndpoint

from .conftest import BACKEND_KINDS, fresh_database

pytestmark = pytest.mark.integration

CN = dt.timezone(dt.timedelta(hours=8))
HOUR = 3600
Row = dict[str, Any]
#: (month, fixmedins_code, rule_id) -> (checks, prompts, removed, settled_anyway, pending, items_removed)
Outcomes = dict[tuple[dt.date, str, str], tuple[int, int, int, int, int, int]]
COLUMNS = ["month", "fixmedins_code", "rule_id", "checks", "prompts", "removed", "settled_anyway", "pending",
           "items_removed"]


def ts(y: int, m: int, d: int, hh: int = 0) -> int:
    """Epoch seconds of a China wall-clock time."""
    return int(dt.datetime(y, m, d, hh, tzinfo=CN).timestamp())


def cn_month(epoch_s: int) -> dt.date:
    return dt.datetime.fromtimestamp(epoch_s, CN).date().replace(day=1)


def _default(raw_type: str) -> Any:
    if raw_type.startswith("Nullable"):
        return None
    if raw_type.startswith("Array"):
        return []
    if "String" in raw_type:
        return ""
    return 0


def insert(backend: Backend, table: str, rows: Sequence[Row]) -> None:
    """One INSERT of raw ``rows`` into ``table`` (columns not named take their type's default)."""
    raw = dict(TABLES[table].raw_columns)
    unknown = {k for r in rows for k in r} - set(raw)
    assert not unknown, f"{table} has no staging column {unknown}"
    columns = {name: [r.get(name, _default(t)) for r in rows] for name, t in raw.items()}
    assert backend.insert(table, columns) == len(rows)


def check(check_id: str, hospital: str, visit: str, psn: str, at: int, hits: Sequence[tuple[str, str]]) -> Row:
    """A precheck_log row: ``hits`` are (rule_id, comma-joined hilist_codes or '')."""
    return {
        "check_id": check_id, "checked_at": at, "caller": f"his-{hospital}", "fixmedins_code": hospital,
        "insu_admdvs": "330106", "med_type": "11", "psn_token": psn, "mdtrt_id": visit,
        "setl_id": f"PRECHECK-{check_id}", "medfee_sumamt": 10_000,
        "items": sorted({c for _, codes in hits for c in codes.split(",") if c}),
        "hit_rule_ids": [r for r, _ in hits], "hit_rule_versions": [1] * len(hits),
        "hit_severities": ["WARN"] * len(hits), "hit_items": [codes for _, codes in hits],
    }


def settlement(setl_id: str, hospital: str, visit: str, psn: str, setl_time: int, reversal: bool = False) -> Row:
    return {
        "event_id": f"e-{setl_id}", "setl_id": setl_id, "mdtrt_id": visit, "psn_token": psn,
        "fixmedins_code": hospital, "insu_admdvs": "330106", "mdtrt_admdvs": "330106", "med_type": "11",
        "insutype": "310", "setl_time": setl_time, "medfee_sumamt": -10_000 if reversal else 10_000,
        "refd_setl_flag": int(reversal), "init_setl_id": f"S-{setl_id}" if reversal else "",
        "full_reversal": int(reversal),
    }


def lines(setl_id: str, hospital: str, visit: str, psn: str, setl_time: int, codes: Sequence[str]) -> list[Row]:
    return [{
        "setl_id": setl_id, "mdtrt_id": visit, "psn_token": psn, "fixmedins_code": hospital,
        "insu_admdvs": "330106", "med_type": "11", "setl_time": setl_time, "feedetl_sn": f"{setl_id}-{i}",
        "hilist_code": code, "cnt": 10_000, "pric": 1_000_000, "det_item_fee_sumamt": 100,
        "fee_ocur_time": setl_time,
    } for i, code in enumerate(codes)]


@dataclass
class Dataset:
    checks: list[Row]
    settlements: list[Row]
    fee_lines: list[Row]
    expected: Outcomes


def dataset(now: int) -> Dataset:
    """The cases, one institution each (see the module docstring for the clocks)."""
    before, after = now - HOUR, now + HOUR  # checks answered before / after the inserts below
    checks: list[Row] = []
    setls: list[Row] = []
    fee: list[Row] = []
    exp: Outcomes = {}

    def settled(setl_id: str, hospital: str, visit: str, psn: str, at: int, codes: Sequence[str]) -> None:
        setls.append(settlement(setl_id, hospital, visit, psn, at))
        fee.extend(lines(setl_id, hospital, visit, psn, at, codes))

    # removed: the prompted item is gone from the settlement, which landed after the check (its
    # setl_time, two hours before the check, must not matter)
    checks.append(check("c-rm", "HRM", "V-rm", "p1", before, [("R-DUP", "X1")]))
    settled("S-rm", "HRM", "V-rm", "p1", before - 2 * HOUR, ["Y1", "Y2"])
    exp[cn_month(before), "HRM", "R-DUP"] = (1, 1, 1, 0, 0, 1)

    # settled anyway: the item is still billed
    checks.append(check("c-any", "HANY", "V-any", "p2", before, [("R-FREQ", "X3")]))
    settled("S-any", "HANY", "V-any", "p2", before, ["X3", "Y3"])
    exp[cn_month(before), "HANY", "R-FREQ"] = (1, 1, 0, 1, 0, 0)

    # pending: the visit has not settled; its items are not counted as removed
    checks.append(check("c-pend", "HPEND", "V-pend", "p3", before, [("R-AGE", "X4,X5")]))
    exp[cn_month(before), "HPEND", "R-AGE"] = (1, 1, 0, 0, 1, 0)

    # a settlement that landed BEFORE the check is not its outcome, though its setl_time is later
    checks.append(check("c-early", "HEARLY", "V-early", "p4", after, [("R-DUP", "X6")]))
    settled("S-early", "HEARLY", "V-early", "p4", after + HOUR, ["Y6"])
    exp[cn_month(after), "HEARLY", "R-DUP"] = (1, 1, 0, 0, 1, 0)

    # a reversal row is not a settlement (even with lines that lack the item)
    checks.append(check("c-rev", "HREV", "V-rev", "p5", before, [("R-DUP", "X7")]))
    setls.append(settlement("S-rev", "HREV", "V-rev", "p5", before, reversal=True))
    fee.extend(lines("S-rev", "HREV", "V-rev", "p5", before, ["Y7"]))
    exp[cn_month(before), "HREV", "R-DUP"] = (1, 1, 0, 0, 1, 0)

    # a hit naming no item (the visit as a whole): settled anyway once settled, else pending
    checks.append(check("c-whole1", "HWHOLE", "V-whole1", "p6", before, [("R-SHOP", "")]))
    settled("S-whole1", "HWHOLE", "V-whole1", "p6", before, ["Y8"])
    checks.append(check("c-whole2", "HWHOLE", "V-whole2", "p7", before, [("R-SHOP", "")]))
    exp[cn_month(before), "HWHOLE", "R-SHOP"] = (2, 2, 0, 1, 1, 0)

    # two checks of one visit: the first prompts X8 (R-A) and X9 (R-B); X8 is removed, the second
    # check prompts X9 again; the visit settles with X9. One check hits R-C on two lines, one kept.
    checks.append(check("c-two1", "HTWO", "V-two", "p8", before - HOUR, [("R-A", "X8"), ("R-B", "X9")]))
    checks.append(check("c-two2", "HTWO", "V-two", "p8", before, [("R-B", "X9"), ("R-C", "X10"), ("R-C", "X11")]))
    settled("S-two", "HTWO", "V-two", "p8", before, ["X9", "X11", "Y9"])
    exp[cn_month(before - HOUR), "HTWO", "R-A"] = (1, 1, 1, 0, 0, 1)
    if cn_month(before - HOUR) == cn_month(before):
        exp[cn_month(before), "HTWO", "R-B"] = (2, 2, 0, 2, 0, 0)
    else:  # the test runs in the first hours of a China month
        exp[cn_month(before - HOUR), "HTWO", "R-B"] = (1, 1, 0, 1, 0, 0)
        exp[cn_month(before), "HTWO", "R-B"] = (1, 1, 0, 1, 0, 0)
    exp[cn_month(before), "HTWO", "R-C"] = (1, 2, 1, 1, 0, 1)

    # a hit on two items, one removed: settled anyway, one item removed
    checks.append(check("c-part", "HPART", "V-part", "p9", before, [("R-DUP", "X12,X13")]))
    settled("S-part", "HPART", "V-part", "p9", before, ["X13"])
    exp[cn_month(before), "HPART", "R-DUP"] = (1, 1, 0, 1, 0, 1)

    # a settlement of the same institution and visit id but another person does not link
    checks.append(check("c-psn", "HPSN", "V-psn", "p10", before, [("R-DUP", "X14")]))
    settled("S-psn", "HPSN", "V-psn", "p10-other", before, ["Y14"])
    exp[cn_month(before), "HPSN", "R-DUP"] = (1, 1, 0, 0, 1, 0)

    # hit_items shorter than hit_rule_ids (a writer's bug): the missing ones count as '', and the
    # view still answers (an ARRAY JOIN of unequal arrays would fail every query of it)
    short = check("c-short", "HSHORT", "V-short", "p16", before, [("R-DUP", "X20"), ("R-SHOP", "")])
    short["hit_items"] = ["X20"]
    checks.append(short)
    settled("S-short", "HSHORT", "V-short", "p16", before, ["Y20"])
    exp[cn_month(before), "HSHORT", "R-DUP"] = (1, 1, 1, 0, 0, 1)
    exp[cn_month(before), "HSHORT", "R-SHOP"] = (1, 1, 0, 1, 0, 0)

    # grouping: China months of checked_at (2025-04-01 01:00 is still March in UTC), institutions
    # and rules; a check without hits is not a prompt
    checks.append(check("c-g1", "HGRP1", "V-g1", "p11", ts(2025, 3, 31, 23), [("R-DUP", "X15")]))
    checks.append(check("c-g2", "HGRP1", "V-g2", "p12", ts(2025, 3, 2), [("R-DUP", "X16"), ("R-AGE", "X16")]))
    checks.append(check("c-g3", "HGRP1", "V-g3", "p13", ts(2025, 4, 1, 1), [("R-DUP", "X17")]))
    checks.append(check("c-g4", "HGRP2", "V-g4", "p14", ts(2025, 3, 5), [("R-DUP", "X18")]))
    checks.append(check("c-g5", "HGRP2", "V-g5", "p15", ts(2025, 3, 6), []))
    settled("S-g2", "HGRP1", "V-g2", "p12", ts(2025, 3, 2), ["Y16"])
    march, april = dt.date(2025, 3, 1), dt.date(2025, 4, 1)
    exp[march, "HGRP1", "R-DUP"] = (2, 2, 1, 0, 1, 1)
    exp[march, "HGRP1", "R-AGE"] = (1, 1, 1, 0, 0, 1)
    exp[april, "HGRP1", "R-DUP"] = (1, 1, 0, 0, 1, 0)
    exp[march, "HGRP2", "R-DUP"] = (1, 1, 0, 0, 1, 0)
    return Dataset(checks, setls, fee, exp)


@dataclass
class Loaded:
    backend: Backend
    data: Dataset

    def outcomes(self, where: str = "1") -> Outcomes:
        rows = self.backend.query(
            f"SELECT {', '.join(COLUMNS)} FROM {self.backend.database}.bi_precheck_outcomes WHERE {where}").rows
        out: Outcomes = {}
        for r in rows:
            key = (r[0], str(r[1]), str(r[2]))
            assert key not in out, f"two rows for {key}"
            checks, prompts, removed, anyway, pending, items = (int(v) for v in r[3:])
            out[key] = (checks, prompts, removed, anyway, pending, items)
        return out

    def of(self, hospital: str) -> Outcomes:
        return self.outcomes(f"fixmedins_code = '{hospital}'")

    def expected(self, hospital: str) -> Outcomes:
        return {k: v for k, v in self.data.expected.items() if k[1] == hospital}


def _open(kind: str, request: pytest.FixtureRequest, chdb_path: Path, database: str) -> Backend:
    if kind == "server":
        server: ClickHouseEndpoint = request.getfixturevalue("clickhouse_server")
        return connect(ClickHouseConfig(backend="server", host=server.host, port=server.tcp_port, user=server.user,
                                        password=server.password, database=database))
    return connect(ClickHouseConfig(chdb_path=chdb_path, database=database))


@pytest.fixture(scope="module", params=BACKEND_KINDS)
def loaded(request: pytest.FixtureRequest, chdb_path: Path) -> Iterator[Loaded]:
    """A migrated database per engine holding every case, checks inserted first (landing order
    must not matter: only checked_at and the settlements' ingested_at do)."""
    database = fresh_database()
    backend = _open(request.param, request, chdb_path, database)
    try:
        migrate(backend)
        data = dataset(int(time.time()))
        insert(backend, "precheck_log", data.checks)
        insert(backend, "settlements", data.settlements)
        insert(backend, "fee_details", data.fee_lines)
        yield Loaded(backend, data)
    finally:
        sync = " SYNC" if request.param == "embedded" else ""
        with contextlib.suppress(SinkError):
            backend.execute(f"DROP DATABASE IF EXISTS {database}{sync}")
        backend.close()


def test_the_view_has_the_contracted_columns(loaded: Loaded) -> None:
    described = [(str(r[0]), str(r[1])) for r in loaded.backend.query(
        f"DESCRIBE TABLE {loaded.backend.database}.bi_precheck_outcomes").rows]
    assert described == [("month", "Date"), ("fixmedins_code", "String"), ("rule_id", "String"),
                         *((c, "UInt64") for c in COLUMNS[3:])]


def test_a_removed_item_counts_as_removed(loaded: Loaded) -> None:
    assert loaded.of("HRM") == loaded.expected("HRM")


def test_an_item_still_billed_counts_as_settled_anyway(loaded: Loaded) -> None:
    assert loaded.of("HANY") == loaded.expected("HANY")


def test_a_visit_not_settled_yet_is_pending(loaded: Loaded) -> None:
    assert loaded.of("HPEND") == loaded.expected("HPEND")


def test_a_settlement_that_landed_before_the_check_is_not_its_outcome(loaded: Loaded) -> None:
    assert loaded.of("HEARLY") == loaded.expected("HEARLY")


def test_a_reversal_row_is_not_a_settlement(loaded: Loaded) -> None:
    assert loaded.of("HREV") == loaded.expected("HREV")


def test_a_hit_without_items_counts_as_settled_anyway_once_settled(loaded: Loaded) -> None:
    assert loaded.of("HWHOLE") == loaded.expected("HWHOLE")


def test_two_checks_of_one_visit_are_linked_to_its_settlement(loaded: Loaded) -> None:
    assert loaded.of("HTWO") == loaded.expected("HTWO")


def test_a_hit_on_several_items_with_one_removed_counts_it(loaded: Loaded) -> None:
    assert loaded.of("HPART") == loaded.expected("HPART")


def test_a_settlement_of_another_person_does_not_link(loaded: Loaded) -> None:
    assert loaded.of("HPSN") == loaded.expected("HPSN")


def test_hit_items_shorter_than_the_hits_count_as_whole_visit_hits(loaded: Loaded) -> None:
    assert loaded.of("HSHORT") == loaded.expected("HSHORT")


def test_rows_are_per_china_month_institution_and_rule(loaded: Loaded) -> None:
    got = loaded.outcomes("fixmedins_code IN ('HGRP1', 'HGRP2')")
    assert got == {**loaded.expected("HGRP1"), **loaded.expected("HGRP2")}
    assert loaded.outcomes() == loaded.data.expected  # nothing else, and the outcomes add up
    for checks, prompts, removed, anyway, pending, _ in loaded.data.expected.values():
        assert removed + anyway + pending == prompts >= checks


def test_precheck_log_round_trips_its_columns(backend: Backend) -> None:
    """Arrays (of strings and Int32), the decimal at its extreme and the China-time DateTime come
    back as sent. Its own database: this check's hits would be rows of the shared view."""
    be = backend
    migrate(be)
    row: Row = {
        "check_id": "1b4e28ba-2fa1-41d2-883f-0016d3cca427", "checked_at": ts(2025, 7, 1, 1),
        "caller": "his-H33010600001", "fixmedins_code": "H33010600001", "insu_admdvs": "330106",
        "med_type": "21", "psn_token": "k2026a.ABCDEFGH", "mdtrt_id": "MD-医保-1", "setl_id": "",
        "medfee_sumamt": -(10**16 - 1), "items": ["XA01ABD075A002010100483", "001109000010100", "医保"],
        "hit_rule_ids": ["YB-DUP", "YB-SHOP"], "hit_rule_versions": [-(2**31), 2**31 - 1],
        "hit_severities": ["HIGH", "LOW"], "hit_items": ["XA01ABD075A002010100483,001109000010100", ""],
        "src_partition": 65535, "src_offset": 0,
    }
    insert(be, "precheck_log", [row])
    spec = TABLES["precheck_log"]
    got = be.query(f"SELECT {', '.join(spec.column_names)} FROM {be.database}.precheck_log "
                   f"WHERE check_id = '{row['check_id']}'").rows
    assert len(got) == 1
    stored = dict(zip(spec.column_names, got[0], strict=True))
    assert stored.pop("checked_at") == dt.datetime(2025, 7, 1, 1, tzinfo=CN)
    assert stored.pop("medfee_sumamt") == Decimal("-99999999999999.99")
    assert abs(stored.pop("ingested_at").timestamp() - time.time()) < 60
    for name, value in stored.items():
        assert (list(value) if isinstance(value, (list, tuple)) else value) == row[name], name
    # partitioned by China month: 2025-07-01 01:00 China time is still June in UTC
    partition = be.query(f"SELECT DISTINCT partition FROM system.parts WHERE database = '{be.database}' "
                         "AND table = 'precheck_log' AND active").scalar()
    assert str(partition) == "202507"
