"""Delivery as real producers do it (yibao/sim/delivery.py): out of event-time order within a
bound, and some events re-sent byte for byte; through `yibao simulate --shuffle-within
--resend-rate` as a user types it, and what `yibao evaluate --events` and the in-process
evaluation count of the re-sends (``duplicates_recognised``)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import Codec
from streams.records import RECORDS
from yibao.replay import LineError, read_jsonl
from yibao.sim.delivery import deliver
from yibao.sim.generator import SETTLEMENT, SimConfig, SimEvent, TrafficGenerator


@functools.cache
def traffic() -> list[SimEvent]:
    return list(TrafficGenerator(SimConfig(settlements=300, days=3, seed=11)).events())


def lateness_ms(times: list[int]) -> list[int]:
    """Per arrival: how far its event time is behind the latest event time that arrived before it."""
    out, latest = [], None
    for t in times:
        out.append(0 if latest is None else max(0, latest - t))
        latest = t if latest is None else max(latest, t)
    return out


# --- deliver() -----------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32),
       within=st.one_of(st.sampled_from([0.0, 0.0004, 0.001, 1.0, 4.35, 3600.0]), st.floats(0, 86_400)),
       rate=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)))
def test_deliver_keeps_the_bound_resends_whole_events_later_and_is_deterministic(
        seed: int, within: float, rate: float) -> None:
    events = traffic()
    got = deliver(iter(events), shuffle_within_s=within, resend_rate=rate, seed=seed)
    assert [id(e) for e in got] == [id(e) for e in deliver(events, shuffle_within_s=within, resend_rate=rate,
                                                            seed=seed)]
    # every arrival is behind an earlier one by at most the bound (whole ms of event time)
    assert max(lateness_ms([e.time_ms for e in got])) <= within * 1000
    # each event arrives once, or twice as the very same object; a re-send after its original
    seen = Counter(id(e) for e in got)
    assert set(seen) == {id(e) for e in events} and set(seen.values()) <= {1, 2}
    if rate == 0:
        assert len(got) == len(events)
    if rate == 1:
        assert len(got) == 2 * len(events)
    if within < 0.001:  # under a millisecond: no shuffle, re-sends right after their originals
        squeezed = [e for k, e in enumerate(got) if k == 0 or got[k - 1] is not e]
        assert [id(e) for e in squeezed] == [id(e) for e in events]
    if within == 0 and rate == 0:
        assert got == events
    # the same seed re-sends the same events whatever the shuffle, and shuffles the same at any rate
    again = deliver(events, shuffle_within_s=0, resend_rate=rate, seed=seed)
    assert {i for i, n in Counter(id(e) for e in again).items() if n == 2} == {i for i, n in seen.items() if n == 2}
    if within:
        firsts_got = list(dict.fromkeys(id(e) for e in got))
        plain = deliver(events, shuffle_within_s=within, resend_rate=0, seed=seed)
        assert firsts_got == [id(e) for e in plain]


def test_deliver_reorders_events_of_one_key_and_resends_after_the_original() -> None:
    events = traffic()
    got = deliver(events, shuffle_within_s=3600, resend_rate=0.05, seed=1)
    by_key: dict[str, list[int]] = {}
    for e in got:
        by_key.setdefault(e.key, []).append(e.time_ms)
    assert any(max(lateness_ms(ts)) > 0 for ts in by_key.values())  # a producer's retry reorders its own key
    assert max(lateness_ms([e.time_ms for e in got])) > 1_800_000  # the bound is used, not just kept
    first: dict[int, int] = {}
    for pos, e in enumerate(got):
        if id(e) in first:
            assert pos > first[id(e)]
        first.setdefault(id(e), pos)


def test_deliver_with_ties_and_no_shuffle_puts_a_resend_right_after_its_original() -> None:
    evs = [SimEvent(SETTLEMENT, "k", {"setl_time": 1_700_000_000_000, "event_id": str(i)}) for i in range(200)]
    got = deliver(evs, resend_rate=0.3, seed=3)
    assert 30 < len(got) - len(evs) < 90
    i = 0
    for e in evs:
        assert got[i] is e
        i += 1
        if i < len(got) and got[i] is e:
            i += 1
    assert i == len(got)


@pytest.mark.parametrize("kwargs", [{"shuffle_within_s": -1.0}, {"shuffle_within_s": float("inf")},
                                    {"shuffle_within_s": float("nan")}, {"resend_rate": -0.01},
                                    {"resend_rate": 1.01}, {"resend_rate": float("nan")}])
def test_deliver_refuses_values_out_of_range(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"shuffle_within_s|resend_rate"):
        deliver(traffic(), **kwargs)


# --- the commands, as a user runs them -----------------------------------------------------------

def yibao(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YIBAO_")}
    env["YIBAO_DATA_DIR"] = str(cwd / "data")
    return subprocess.run([sys.executable, "-m", "yibao.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def simulate(tmp: Path, name: str, *flags: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp / name
    res = yibao("simulate", "-n", "400", "--days", "3", "--seed", "9", "--out", str(out), *flags, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def resends_reported(res: subprocess.CompletedProcess[str]) -> int:
    line = next(x for x in res.stdout.splitlines() if x.startswith("delivery:"))
    return int(line.split()[1])


def test_simulate_with_delivery_flags_same_seed_same_bytes(tmp_path: Path) -> None:
    a, _ = simulate(tmp_path, "a.jsonl", "--shuffle-within", "3600", "--resend-rate", "0.05")
    b, _ = simulate(tmp_path, "b.jsonl", "--shuffle-within", "3600", "--resend-rate", "0.05")
    assert a.read_bytes() == b.read_bytes()
    plain, _ = simulate(tmp_path, "plain.jsonl")
    assert a.read_bytes() != plain.read_bytes()


def test_simulate_resend_rate_repeats_events_byte_for_byte(tmp_path: Path) -> None:
    plain, _ = simulate(tmp_path, "plain.jsonl")
    resent, res = simulate(tmp_path, "resent.jsonl", "--resend-rate", "0.05")
    lines = resent.read_text(encoding="utf-8").splitlines()
    first: dict[str, str] = {}
    repeats = 0
    for line in lines:
        eid = json.loads(line)["event_id"]
        if eid in first:
            assert line == first[eid]  # the same bytes as the first time
            repeats += 1
        else:
            first[eid] = line
    n = len(first)
    assert Counter(json.loads(x)["event_id"] for x in lines).most_common(1)[0][1] == 2
    assert 0.03 * n < repeats < 0.07 * n, (repeats, n)
    assert resends_reported(res) == repeats
    assert f"wrote {len(lines)} events" in res.stdout
    # without a shuffle, the file is the plain traffic with the re-sends added: drop them, get it back
    assert list(first.values()) == plain.read_text(encoding="utf-8").splitlines()
    errors: list[LineError] = []
    assert len(list(read_jsonl(resent, Codec(), errors))) == len(lines) and errors == []


def test_simulate_shuffle_within_keeps_the_bound_and_the_lines(tmp_path: Path) -> None:
    plain, _ = simulate(tmp_path, "plain.jsonl")
    shuffled, res = simulate(tmp_path, "shuffled.jsonl", "--shuffle-within", "3600")
    assert resends_reported(res) == 0 and "shuffled within 3,600 s of event time" in res.stdout
    got = shuffled.read_text(encoding="utf-8").splitlines()
    want = plain.read_text(encoding="utf-8").splitlines()
    assert Counter(got) == Counter(want) and got != want
    errors: list[LineError] = []
    times = [int((e.datum or {})[RECORDS[e.record].event_time]) for e in read_jsonl(shuffled, Codec(), errors)]
    assert errors == [] and len(times) == len(got)
    late = lateness_ms(times)
    assert max(late) <= 3_600_000  # no event arrives after one more than 3600 s of event time later
    assert max(late) > 600_000 and sum(1 for x in late if x) > len(late) // 10


@pytest.mark.parametrize(("flags", "says"), [
    (("--resend-rate", "1.5"), "--resend-rate"),
    (("--resend-rate", "-0.1"), "--resend-rate"),
    (("--resend-rate", "nan"), "--resend-rate"),
    (("--shuffle-within", "-5"), "--shuffle-within"),
    (("--shuffle-within", "inf"), "--shuffle-within"),
])
def test_simulate_refuses_bad_delivery_values_in_one_line(tmp_path: Path, flags: tuple[str, str], says: str) -> None:
    out = tmp_path / "never.jsonl"
    res = yibao("simulate", "-n", "50", "--out", str(out), *flags, cwd=tmp_path)
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not out.exists()


def evaluate_json(tmp: Path, truth: Path, events: Path) -> dict[str, Any]:
    res = yibao("evaluate", "--truth", str(truth), "--events", str(events), "--no-monitors", "--json", cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def test_evaluate_events_reports_duplicates_recognised(tmp_path: Path) -> None:
    events, truth = tmp_path / "ev.jsonl", tmp_path / "truth.jsonl"
    simulate(tmp_path, events.name, "--plant", "all", "--plant-rate", "0.03", "--truth", str(truth))
    out = evaluate_json(tmp_path, truth, events)
    assert isinstance(out["duplicates_recognised"], int) and out["duplicates_recognised"] >= 0
    res = yibao("evaluate", "--truth", str(truth), "--events", str(events), "--no-monitors", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-sent events recognised as duplicates" in res.stdout


def test_evaluate_recognises_every_resend(tmp_path: Path) -> None:
    """Each re-send `simulate` added is recognised by identity: counted, neither landed nor
    dead-lettered (streams/processors.py). The planted truth does not depend on delivery."""
    plain, plain_truth = tmp_path / "plain.jsonl", tmp_path / "plain-truth.jsonl"
    events, truth = tmp_path / "ev.jsonl", tmp_path / "truth.jsonl"
    simulate(tmp_path, plain.name, "--plant", "all", "--plant-rate", "0.03", "--truth", str(plain_truth))
    _, res = simulate(tmp_path, events.name, "--plant", "all", "--plant-rate", "0.03", "--truth", str(truth),
                      "--resend-rate", "0.05", "--shuffle-within", "600")
    assert truth.read_bytes() == plain_truth.read_bytes()
    resends = resends_reported(res)
    ids = Counter(json.loads(x)["event_id"] for x in events.read_text(encoding="utf-8").splitlines())
    assert resends > 0 and resends == sum(n - 1 for n in ids.values())
    assert evaluate_json(tmp_path, truth, events)["duplicates_recognised"] == resends


def test_evaluate_in_process_delivers_the_traffic_and_counts_the_resends() -> None:
    from yibao.sim.evaluate import evaluate_in_process

    kw: dict[str, Any] = {"n_settlements": 600, "days": 3, "seed": 5, "rate": 0.03, "monitors": False}
    plain = evaluate_in_process(**kw)
    assert plain["duplicates_recognised"] == 0
    got = evaluate_in_process(**kw, shuffle_within_s=600, resend_rate=0.05)
    resends = got["events"] - plain["events"]  # events consumed: the re-sends included
    assert resends > 0
    assert got["planted"] == plain["planted"]  # the truth comes from the planting, not the delivery
    assert got["duplicates_recognised"] == resends
    assert got["dead_letters"] == plain["dead_letters"] == 0


def test_demo_counts_the_recognised_resends_of_its_own_topics_from_the_worker_metric() -> None:
    """`yibao demo` accounts produced = landed + dead-lettered + duplicates recognised; the last
    term is read from the in-process workers' ``yibao_duplicates_recognised_total``, for the
    subsystem topics only (a re-keyed internal topic is not something the demo produced)."""
    from streams import metrics
    from yibao.demo import DUPLICATES_METRIC, duplicates_recognised

    mine = ["yibao-test-delivery.settlement", "yibao-test-delivery.supervision"]
    before = duplicates_recognised(mine)
    counter = metrics.DUPLICATES_RECOGNISED  # the metric the workers increment once a batch is durable
    counter.labels("yibao-test-delivery.settlement", "Settlement").inc(3)
    counter.labels("yibao-test-delivery.supervision", "Tip").inc()
    counter.labels("yibao-test-delivery.internal.stays-by-hospital", "Settlement").inc(5)
    assert duplicates_recognised(mine) - before == 4
    assert {s.name for f in counter.collect() for s in f.samples} >= {DUPLICATES_METRIC}
