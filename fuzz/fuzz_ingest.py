"""Coverage-guided fuzzing of the worker's pure path: decode → validate → rows → rules → emit.

Run (atheris, libFuzzer options after the script)::

    .venv/bin/python fuzz/fuzz_ingest.py -max_total_time=600 -artifact_prefix=fuzz/crashers/ fuzz/corpus

Each input is read as a small program (:func:`messages`): which subsystem, then per message
either raw bytes, or a generated valid event with fields overwritten by fuzzed values (strings of
any length and character, integers of any size, nulls, lists) and re-encoded, so the fuzzer
reaches validation, row building and the rule engines, not only the decoder. A run fails on any
exception, and on any broken invariant of :func:`check`: every message accounted for exactly
once (landed or dead-lettered), every column as long as its table's others, every message the
worker would send within ``MESSAGE_BUDGET``, every changelog record within ``CHUNK_BYTES``.
A crasher found here becomes a regression test (tests/fuzz/test_fuzz_regressions.py replays
``fuzz/crashers/`` and ``tests/data/fuzz/``).
"""

from __future__ import annotations

import copy
import datetime as dt
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import atheris

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["streams", "schemas", "sinks"]):
    from schemas import SUBJECT_RECORDS, Codec
    from streams.checkpoint import Checkpoint
    from streams.messages import MESSAGE_BUDGET, Message, Outcome, headers_size
    from streams.privacy import Pseudonymizer, Sealer
    from streams.processors import BatchProcessor, GroupedProcessor
    from streams.rules import load_knowledge
    from streams.rules.engine import SettlementEngine
    from streams.rules.grouped import GroupedEngine
    from streams.rules.procurement import ProcurementEngine
    from streams.rules.state import CHUNK_BYTES, Store
    from streams.topology import MODULES, build_rulebook
    from streams.validation import Limits
    from yibao.settings import load_settings
    from yibao.sim.generator import SimConfig, TrafficGenerator

KEY = b"fuzz-key-of-thirty-two-bytes-000"
STREAMS = ("settlement", "procurement", "supervision")
CN = ZoneInfo("Asia/Shanghai")


class Rig:
    """Processors as the worker builds them (rules on), on one process's lifetime of state."""

    def __init__(self) -> None:
        settings = load_settings(data_dir=Path("/tmp/yibao-fuzz"))
        self.codec = Codec()
        config = SimConfig(seed=11, settlements=300, days=40, inspection_rate=0.05, tip_rate=0.05)
        self.limits = Limits(now_ms=config.end_ms + 86_400_000, max_future_skew_ms=300_000,
                             min_event_ms=int(dt.datetime(2018, 1, 1, tzinfo=CN).timestamp() * 1000))
        pseudo, sealer = Pseudonymizer(KEY, "f1"), Sealer(KEY, "f1")
        book = build_rulebook(settings.rules_file)
        self.engines: dict[str, SettlementEngine | ProcurementEngine] = {
            "settlement": SettlementEngine(book, load_knowledge(), pseudo, Store("person", "c.person")),
            "procurement": ProcurementEngine(book, Store("procurement", "c.procurement")),
        }
        self.processors = {
            name: BatchProcessor(MODULES[name].build(settings.validation(), self.lim), self.codec, pseudo, sealer,
                                 f"yibao.{name}", self.lim, engine=self.engines.get(name))
            for name in STREAMS
        }
        for proc in self.processors.values():  # compiled at run time: instrument them too
            proc._validators = {k: atheris.instrument_func(v) for k, v in proc._validators.items()}
        self.grouped = {by: GroupedProcessor(GroupedEngine(book, Store(by, f"c.{by}"), by), f"yibao.stays-{by}",
                                             self.codec, pseudo, sealer) for by in ("hospital", "drg")}
        self.events = {name: [e for e in TrafficGenerator(config).events() if e.record in SUBJECT_RECORDS[name]]
                       for name in STREAMS}
        self.offset = 0
        self.inputs = 0

    def lim(self) -> Limits:
        return self.limits

    def all_processors(self) -> list[BatchProcessor | GroupedProcessor]:
        return [*self.processors.values(), *self.grouped.values()]


@cache
def rig() -> Rig:
    return Rig()


def fuzzed_value(fdp: atheris.FuzzedDataProvider, like: Any, borrowed: list[Any]) -> Any:
    """A value for a field that held ``like``: mostly of the same shape, sometimes anything, and
    often the same field's value in another event (valid, but in an unusual combination)."""
    kind = fdp.ConsumeIntInRange(0, 11)
    if kind >= 10 and borrowed:
        return copy.deepcopy(borrowed[fdp.ConsumeIntInRange(0, len(borrowed) - 1)])
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 16))  # any size: Avro longs decode to any int
    if kind == 2:  # a long run of one character, the poison-pill shape
        ch = chr(fdp.ConsumeIntInRange(0, 0x10FFFF))
        return (ch if not 0xD800 <= ord(ch) <= 0xDFFF else "x") * fdp.ConsumeIntInRange(0, 700_000)
    if kind == 3 and isinstance(like, list):
        return [fuzzed_value(fdp, like[0] if like else "", []) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if isinstance(like, bool):
        return fdp.ConsumeBool()
    if isinstance(like, int):
        return like + fdp.ConsumeIntInRange(-(10**6), 10**6) if kind < 7 else fdp.ConsumeInt(8)
    if isinstance(like, bytes):
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))


def mutated(fdp: atheris.FuzzedDataProvider, datum: dict[str, Any], pool: list[Any]) -> dict[str, Any]:
    d = copy.deepcopy(datum)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        target = d
        lines = [k for k, v in d.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        line_field = None
        if lines and fdp.ConsumeBool():
            line_field = fdp.PickValueInList(lines)
            items = d[line_field]
            target = items[fdp.ConsumeIntInRange(0, len(items) - 1)]
        name = fdp.PickValueInList(sorted(target))
        others = [e.datum for e in pool[:200] if e.record == pool[0].record or name in e.datum]
        if line_field is None:
            borrowed = [o[name] for o in others if name in o]
        else:
            borrowed = [ln[name] for o in others for ln in o.get(line_field) or () if name in ln]
        target[name] = fuzzed_value(fdp, target[name], borrowed[:50])
    return d


def messages(data: bytes) -> tuple[str, list[Message]]:
    fdp = atheris.FuzzedDataProvider(data)
    r = rig()
    stream = STREAMS[fdp.ConsumeIntInRange(0, len(STREAMS) - 1)]
    pool = r.events[stream]
    out: list[Message] = []
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        ev = pool[fdp.ConsumeIntInRange(0, len(pool) - 1)]
        key: bytes | None = ev.key.encode()
        if fdp.ConsumeIntInRange(0, 7) == 0:
            key = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300_000)) or None
        how = fdp.ConsumeIntInRange(0, 5)
        if how == 0:
            value: bytes | None = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000))
        elif how == 1:
            value = r.codec.encode(ev.record, ev.datum)
        else:
            try:
                value = r.codec.encode(ev.record, mutated(fdp, ev.datum, [e for e in pool if e.record == ev.record]))
            except Exception:  # the producer's own encoder refuses it: nothing to send
                value = r.codec.encode(ev.record, ev.datum)
        r.offset += 1
        out.append(Message(fdp.ConsumeIntInRange(0, 3), r.offset, key, value))
    return stream, out


def check(codec: Codec, out: Outcome, n: int, emitted: Callable[[], None] | None = None) -> None:
    assert out.events == n
    landed, dead = sum(out.landed.values()), sum(out.reasons.values())
    assert landed + dead == n, f"{n} messages, {landed} landed + {dead} dead-lettered"
    for table, cols in out.tables.items():
        assert len({len(v) for v in cols.values()}) == 1, f"{table}: columns of different lengths"
    # what the worker would send, record headers included (Checkpoint.messages raises EmitTooLarge too)
    sent = Checkpoint("fuzz", codec, None, None, None, [], "deadletter", str).messages(out)  # type: ignore[arg-type]
    sizes = [len(k or b"") + len(v) + headers_size(h) for _, k, v, h in sent]
    assert all(s <= MESSAGE_BUDGET for s in sizes), f"a message of {max(sizes):,} bytes"


#: Inputs after which the rig's rule state starts afresh: a worker's state is bounded by its
#: windows, a fuzzing run's would only grow (one person settling millions of times in a day).
RESET_EVERY = 5_000


def one_input(data: bytes) -> None:
    r = rig()
    r.inputs += 1
    if r.inputs % RESET_EVERY == 0:
        for proc in r.all_processors():
            proc.forget(range(4))
    stream, msgs = messages(data)
    out = r.processors[stream].process(msgs)
    check(r.codec, out, len(msgs))
    stays: dict[str, list[Message]] = {}
    for name, key, value in out.emits:
        by = name.rsplit("-", 1)[-1]
        r.offset += 1
        stays.setdefault(by, []).append(Message(0, r.offset, key, value))
    for by, ms in stays.items():
        r.grouped[by].process(ms)
    for proc in r.all_processors():
        for store in proc.stores:
            for _, k, v in store.drain():
                assert len(k) + len(v or b"") <= CHUNK_BYTES + 1_000, f"changelog record of {len(v or b''):,} bytes"


def main() -> None:
    rig()  # build before fuzzing starts: not part of any input's cost
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
