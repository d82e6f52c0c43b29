"""`yibao report`: the page a person writes from a landed run, opens in a browser, and the mistakes
they make on the way (an --out that is a directory or lies in one that does not exist, --days 0, a
database nobody migrated)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ..conftest import require_infra
from ..yibao.test_report import png_pixels
from .conftest import User, assert_clear_error, ok

CHARTS = ("fund", "alerts", "flows", "procurement", "payments", "recoveries")


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        require_infra("Debian's chromium (apt-get install chromium; .ci/system-deps.sh installs it)")
    return found


def screenshot(page: Path, png: Path, profile: Path) -> None:
    """What a person does to look at the page without a desktop: headless Chromium, one tall shot."""
    res = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1400,4000",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and png.exists(), res.stderr[-2000:]


def test_report_of_a_landed_run_is_one_offline_page_that_a_browser_draws(landed: User, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    res = ok(landed.run(f"yibao report --out {out}", timeout=300))
    assert f"wrote {out}" in res.out.replace("\n", ""), res
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count("<html") == 1, page[:200]
    lowered = page.lower()
    for absent in ("<script", "<link", "<img", "http://", "https://", "@import", "url("):
        assert absent not in lowered, absent
    assert page.count("<svg") >= len(CHARTS)
    states = dict(re.findall(r'data-chart="(\w+)" data-state="(\w+)"', page))
    assert list(states) == list(CHARTS)
    # a landed run has funds, alerts, cross-province care, contracts and deliveries to draw
    assert all(states[k] == "ok" for k in ("fund", "alerts", "flows", "procurement", "payments")), states
    # every fund's capacity is written as it is: none pinned at an axis cap ("›"), the warning line drawn
    fund = page[page.index('id="chart-fund"'):page.index('id="chart-alerts"')]
    assert "3-month warning line" in fund and "›" not in fund
    # cross-province pairs have settlements and filings on one row (both are pooling regions)
    assert re.search(r"\d+ settlements, [^;]+; [1-9][\d,]* filings", page), "no pair with both settlements and filings"
    # the payments label never calls a hospital with overdue deliveries 100% on time
    assert not re.search(r"100% on time \([\d,]+ of [\d,]+\) · [1-9]", page)

    png = tmp_path / "r.png"
    screenshot(out, png, tmp_path / "chromium-profile")
    pixels = png_pixels(png.read_bytes())
    h, w, _ = pixels.shape
    assert (w, h) == (1400, 4000)
    gray = pixels[:, :, :3].astype(np.float64).mean(axis=2)
    assert gray.std() > 10, "the screenshot looks blank"
    colours = {tuple(int(v) for v in px) for px in pixels[::7, ::7, :3].reshape(-1, 3)}
    assert len(colours) > 50, f"only {len(colours)} colours drawn"


@pytest.mark.parametrize(("args", "needles"), [
    ("--days 0", ("--days",)),
    ("--out {cwd}", ("--out", "is a directory")),
    ("--out {cwd}/no/such/dir/r.html", ("--out", "does not exist")),
])
def test_report_refuses_what_it_cannot_do_in_one_line(user: User, args: str, needles: tuple[str, ...]) -> None:
    res = user.run(f"yibao report {args.format(cwd=user.cwd)}")
    assert_clear_error(res, *needles)
    assert not list(user.cwd.glob("*.html"))


def test_report_on_a_database_nobody_migrated_says_what_to_run(user: User) -> None:
    res = user.run("yibao report --out r.html")
    assert_clear_error(res, "does not exist")
    assert "yibao migrate" in res.err and not (user.cwd / "r.html").exists()
