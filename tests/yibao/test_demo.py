"""`yibao demo` as a user runs it: a subprocess with its own broker and chDB, JSON summary last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_accounts_for_every_event(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "yibao.cli", "demo", "--events", "600", "--data-dir", str(tmp_path / "demo"),
         "--invalid-rate", "0.05", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["accounted"] is True
    produced = summary["events_produced"]
    assert produced > 600  # settlements plus the other subsystems' traffic
    landed = sum(n for t, n in summary["rows"].items() if t not in ("fee_details", "dead_letters"))
    assert summary["duplicates_recognised"] == 0  # the demo's producer sends each event once
    assert landed + summary["dead_letters"] + summary["duplicates_recognised"] == produced
    assert summary["dead_letters"] > 0 and sum(summary["dead_letters_by_reason"].values()) == summary["dead_letters"]
    assert summary["rows"]["fee_details"] > summary["rows"]["settlements"]
    assert summary["elapsed_s"] > 0 and summary["events_per_s"] > 0
    # the data stays for `yibao query --data-dir`
    q = subprocess.run(
        [sys.executable, "-m", "yibao.cli", "query", "--data-dir", str(tmp_path / "demo"), "--format", "json",
         "SELECT count() AS n FROM settlements"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout.strip().splitlines()[-1])["n"] == summary["rows"]["settlements"]
