"""Deliberately broken events, for the demo, the tests and the fuzz suite.

Each corruption returns the bytes to send and the dead-letter reason the worker must give, so a
run can check not only that bad input is caught but that it is caught for the right reason.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas import Codec

from ..producer import OutEvent

SETTLEMENT = "cn.nhsa.yibao.settlement.Settlement"


@dataclass(frozen=True)
class Corrupted:
    event: OutEvent
    expected_reason: str
    kind: str


def _frame(codec: Codec, ev: Any) -> bytes:
    return codec.encode(ev.record, ev.datum)


def truncated(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    b = _frame(codec, ev)
    return b[: rng.randint(6, max(6, len(b) - 2))], "BAD_AVRO|TRUNCATED_BODY"


def short_frame(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    return _frame(codec, ev)[: rng.randint(0, 4)], "TRUNCATED_FRAME"


def bad_magic(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    b = _frame(codec, ev)
    return bytes([rng.randint(1, 255)]) + b[1:], "BAD_MAGIC"


def unknown_schema(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    b = _frame(codec, ev)
    return b[:1] + rng.randint(10_000, 2**31 - 1).to_bytes(4, "big") + b[5:], "UNKNOWN_SCHEMA_ID"


def _mutated(codec: Codec, ev: Any, fn: Callable[[dict[str, Any]], None]) -> bytes:
    d = copy.deepcopy(ev.datum)
    fn(d)
    return codec.encode(ev.record, d)


def bad_institution(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    return _mutated(codec, ev, lambda d: d.__setitem__("fixmedins_code", "X" + d["fixmedins_code"][1:])), \
        "INVALID_CODE"


def amounts_off(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    return _mutated(codec, ev, lambda d: d.__setitem__("psn_cash_pay", d["psn_cash_pay"] + rng.randint(2, 5000))), \
        "AMOUNTS_DO_NOT_ADD_UP"


def negative_amount(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    return _mutated(codec, ev, lambda d: d.__setitem__("hifmi_pay", -rng.randint(1, 10_000))), "NEGATIVE_AMOUNT"


def future_time(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    return _mutated(codec, ev, lambda d: d.__setitem__("setl_time", 4_102_444_800_000)), "FUTURE_TIME"


def unknown_region(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    return _mutated(codec, ev, lambda d: d.__setitem__("insu_admdvs", "99" + d["insu_admdvs"][2:])), \
        "UNKNOWN_REGION"


def bad_item_code(codec: Codec, ev: Any, rng: random.Random) -> tuple[bytes, str]:
    def fn(d: dict[str, Any]) -> None:
        d["fee_details"][0]["hilist_code"] = "ABC123"
    return _mutated(codec, ev, fn), "INVALID_CODE"


FRAME_CORRUPTIONS = (truncated, short_frame, bad_magic, unknown_schema)
SETTLEMENT_CORRUPTIONS = (bad_institution, amounts_off, negative_amount, future_time, unknown_region,
                          bad_item_code)


def corrupt(codec: Codec, ev: Any, rng: random.Random) -> Corrupted:
    """A broken version of ``ev`` (a settlement gets schema-valid but wrong content half the time)."""
    if ev.record == SETTLEMENT and rng.random() < 0.6:
        fn = rng.choice(SETTLEMENT_CORRUPTIONS)
    else:
        fn = rng.choice(FRAME_CORRUPTIONS)
    value, reason = fn(codec, ev, rng)
    return Corrupted(OutEvent(ev.record, ev.key, None, value), reason, fn.__name__)
