"""`yibao query --format csv|tsv|json`: what a spreadsheet, a shell script and jq read back.

The journeys (tests/journeys/test_demo_query_access.py) run the command on both engines; here the
writer meets the values a query can return, byte for byte (line ends included, which a text-mode
pipe would hide).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

from yibao.cli import _write_rows

COLUMNS = ["setl_id", "note", "hifp_pay", "setl_time", "fee_codes", "refd", "nothing"]
ROWS: list[tuple[Any, ...]] = [
    ("S1", 'comma, "quote"\nand a newline', Decimal("12.50"), dt.datetime(2026, 1, 2, 3, 4, 5), ["a", "b"], True,
     None),
    ("S2", "tab\there \\ backslash\r", Decimal("0.01"), dt.date(2026, 1, 2), [], False, None),
]


def written(fmt: str) -> str:
    out = io.StringIO(newline="")
    _write_rows(out, fmt, COLUMNS, ROWS)
    return out.getvalue()


def test_csv_is_rfc_4180_with_a_header_row() -> None:
    text = written("csv")
    assert text.startswith(",".join(COLUMNS) + "\r\n")
    assert text.count("\r\n") == 1 + len(ROWS)  # the newline inside a value is quoted, not a record end
    assert list(csv.reader(io.StringIO(text, newline=""))) == [
        COLUMNS,
        ["S1", 'comma, "quote"\nand a newline', "12.50", "2026-01-02 03:04:05", '["a", "b"]', "true", ""],
        ["S2", "tab\there \\ backslash\r", "0.01", "2026-01-02", "[]", "false", ""],
    ]


def test_tsv_escapes_what_would_break_a_line_or_a_column() -> None:
    lines = written("tsv").split("\n")
    assert lines[-1] == "" and len(lines) == 2 + len(ROWS)
    assert lines[0].split("\t") == COLUMNS
    assert lines[1].split("\t") == ["S1", 'comma, "quote"\\nand a newline', "12.50", "2026-01-02 03:04:05",
                                    '["a", "b"]', "true", "\\N"]
    assert lines[2].split("\t") == ["S2", "tab\\there \\\\ backslash\\r", "0.01", "2026-01-02", "[]", "false", "\\N"]


def test_json_is_one_object_per_line() -> None:
    lines = written("json").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"setl_id": "S1", "note": 'comma, "quote"\nand a newline', "hifp_pay": "12.50",
         "setl_time": "2026-01-02 03:04:05", "fee_codes": ["a", "b"], "refd": True, "nothing": None},
        {"setl_id": "S2", "note": "tab\there \\ backslash\r", "hifp_pay": "0.01", "setl_time": "2026-01-02",
         "fee_codes": [], "refd": False, "nothing": None},
    ]


def test_an_empty_result_still_has_its_header() -> None:
    out = io.StringIO(newline="")
    _write_rows(out, "csv", ["n"], [])
    assert out.getvalue() == "n\r\n"
    out = io.StringIO()
    _write_rows(out, "json", ["n"], [])
    assert out.getvalue() == ""
