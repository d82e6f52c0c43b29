"""The application: settings, the command line, the worker, the benchmarks and the report.

clickhouse-driver builds a table of every date from 1900 to 2299 when it is first imported (two dicts
of 146,097 entries: 120 ms and 22 MB per process, measured); this pipeline inserts dates as raw day
numbers, so its lazy table (filled on first use, the same values) is asked for before any import of it.
"""

import os

os.environ.setdefault("CLICKHOUSE_DRIVER_LASY_DATE_LUT", "1970-01-01:1970-01-01")
