"""The application asks clickhouse-driver for its lazy date table (yibao/__init__.py): a process that
imports the application does not build 146,097 dates at start-up, and dates read back are unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from yibao.localinfra import ClickHouseEndpoint

SCRIPT = """
import datetime, json, sys
import yibao.cli
from clickhouse_driver import Client
from clickhouse_driver.columns import datecolumn
before = len(datecolumn._date_lut)
host, port = sys.argv[1], int(sys.argv[2])
rows = Client(host, port=port).execute(
    "SELECT toDate('1970-01-01'), toDate('2024-02-29'), toDate('2105-12-31'), toDate(19000)")
print(json.dumps({"built_at_import": before, "dates": [d.isoformat() for d in rows[0]]}))
"""


@pytest.mark.integration
def test_the_worker_process_builds_no_date_table_and_reads_dates_unchanged(
        clickhouse_server: ClickHouseEndpoint) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CLICKHOUSE_DRIVER_LASY_DATE_LUT"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, clickhouse_server.host, str(clickhouse_server.tcp_port)],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["built_at_import"] <= 1, "the driver built its whole date table at import"
    assert got["dates"] == ["1970-01-01", "2024-02-29", "2105-12-31", "2022-01-08"]
