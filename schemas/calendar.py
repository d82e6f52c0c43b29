"""Time and the China calendar: the one home of both, for every layer.

Event times travel as epoch milliseconds and dates as epoch days (see schemas.codec). The
platform's natural days and months are China's: UTC+8, without daylight saving since 1991, so a
day or a month is computed with the fixed offset, never with the machine's time zone.
ClickHouse columns carry the zone by its IANA name (``DateTime('Asia/Shanghai')``).
"""

from __future__ import annotations

import datetime as dt
import functools

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
CHINA_OFFSET_MS = 8 * HOUR_MS
CHINA = dt.timezone(dt.timedelta(hours=8))
CHINA_TZ_NAME = "Asia/Shanghai"
EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def china_day(ms: int) -> int:
    """Epoch day of the China calendar date at ``ms``."""
    return (ms + CHINA_OFFSET_MS) // DAY_MS


def day_start_ms(day: int) -> int:
    """China midnight starting the epoch day ``day`` (an Avro date: days since 1970-01-01)."""
    return day * DAY_MS - CHINA_OFFSET_MS


@functools.lru_cache(maxsize=100_000)
def ymd(day: int) -> tuple[int, int, int]:
    """(year, month, day) of an epoch day; cached: a stream's dates repeat."""
    d = dt.date.fromordinal(EPOCH_ORDINAL + day)
    return d.year, d.month, d.day


def month_of(ms: int) -> int:
    """The China month of ``ms`` as YYYYMM."""
    d = dt.datetime.fromtimestamp(ms / 1000, CHINA)
    return d.year * 100 + d.month


def month_bounds(m: int) -> tuple[int, int]:
    """First and last millisecond of the China month YYYYMM."""
    y, mo = divmod(m, 100)
    start = dt.datetime(y, mo, 1, tzinfo=CHINA)
    end = dt.datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=CHINA)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000) - 1


def prev_month(m: int) -> int:
    y, mo = divmod(m, 100)
    return (y - 1) * 100 + 12 if mo == 1 else y * 100 + mo - 1
