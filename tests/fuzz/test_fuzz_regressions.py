"""The fuzz harness's inputs that once failed, replayed on every run, and a seeded smoke run of the
harness itself so that it cannot rot between fuzzing campaigns (fuzz/fuzz_ingest.py: what an input
means and which invariants it checks)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
CRASHERS = sorted([*(ROOT / "tests" / "data" / "fuzz").glob("*"), *(ROOT / "fuzz" / "crashers").glob("crash-*")])
SEED = 20261206


def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_ingest", ROOT / "fuzz" / "fuzz_ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_ingest"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    return harness()


def test_every_crasher_the_fuzzer_found_holds_every_invariant_now(fuzz: ModuleType) -> None:
    for path in CRASHERS:
        try:
            fuzz.one_input(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path.relative_to(ROOT)} fails again") from exc


def test_seeded_random_inputs_hold_every_invariant(fuzz: ModuleType) -> None:
    rng = random.Random(SEED)
    for i in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
        try:
            fuzz.one_input(data)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"seed {SEED}, input {i}: {data.hex()}") from exc
