"""The README as a new user reads it: its two commands, its follow-up commands, its Commands table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import ROOT, User, ok

README = (ROOT / "README.md").read_text(encoding="utf-8")
JOURNEYS = Path(__file__).parent


def readme_commands() -> list[str]:
    """Each `yibao …` command of the README's Commands table, with its subcommands spelled out
    (`yibao dlq list|show|replay` → three)."""
    table = README.split("## Commands", 1)[1].split("\n## ", 1)[0].replace("\\|", "|")
    out = []
    for m in re.finditer(r"^\| `yibao ([a-z-]+)(?: ([a-z|-]+))?", table, re.M):
        top, subs = m.group(1), m.group(2)
        if subs and not subs.startswith("-"):
            out.extend(f"yibao {top} {s}" for s in subs.split("|"))
        else:
            out.append(f"yibao {top}")
    return out


def test_the_readme_table_lists_commands() -> None:
    cmds = readme_commands()
    assert len(cmds) >= 15, cmds
    assert "yibao alerts" in cmds and "yibao dlq replay" in cmds


@pytest.mark.parametrize("cmd", readme_commands())
def test_every_readme_command_has_help_and_a_journey(user: User, cmd: str) -> None:
    """`yibao X --help` works for every command the README names, and some journey runs it."""
    res = ok(user.run(f"{cmd} --help", timeout=60))
    assert "Usage:" in res.out
    pattern = re.compile(rf"""["'(]{re.escape(cmd)}(?:\s|["')])""")
    runs = [p.name for p in JOURNEYS.glob("test_*.py") if p.name != "test_readme.py"
            and pattern.search(p.read_text(encoding="utf-8"))]
    assert runs, f"no journey runs `{cmd}` (tests/journeys/test_*.py)"


def test_yibao_alone_shows_the_commands(user: User) -> None:
    res = user.run("yibao")
    assert "Traceback" not in res.out + res.err
    shown = res.out + res.err
    for cmd in readme_commands():
        assert cmd.split()[1] in shown, cmd


def test_make_demo_then_the_readme_follow_ups(user: User) -> None:
    """`make demo` on a set-up checkout, in a new user's home; then what the README says to do next.

    With 4,000 settlements instead of the default 20,000 (the same target and command; the suite is
    at its time budget): the full `make demo` is run from a clean clone before an issue is closed."""
    res = ok(user.run("make demo DEMO_EVENTS=4000", cwd=ROOT, timeout=900))
    assert "yibao demo --events 4000" in res.out, res
    assert "accounted" in res.out.lower() or "all accounted" in res.out.lower() or "landed" in res.out.lower(), res
    assert (user.data_dir / "chdb").is_dir(), f"the demo's data is not in {user.data_dir}"
    res = ok(user.run('yibao query "SELECT insutype, sum(hifp_pay) FROM settlements GROUP BY insutype"'))
    assert "310" in res.out and "390" in res.out, res
    res = ok(user.run("yibao report --out report.html", timeout=300))
    html = (user.cwd / "report.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") and "<svg" in html and "<script" not in html.lower()


def test_make_test_is_what_ci_runs() -> None:
    """`make test` is this suite itself, so it cannot run inside it; what it runs, and that `.ci/run`
    runs exactly it, can be read. (A clean-clone run of `.ci/run` is how it is checked end to end.)"""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^\s*(exec\s+)?make test\b", ci, re.M), ci
    import subprocess

    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    for step in ("system-deps.sh", "ruff check", "mypy", "lint-imports", "schemas check", "pytest"):
        assert step in dry.stdout, step


def test_landed_run_is_queryable(landed: User) -> None:
    """The shared pipeline run of every engine holds what was produced: a smoke test of the fixture
    through the command a user would use."""
    res = ok(landed.run('yibao query --format json "SELECT count() AS n FROM settlements"'))
    assert int(res.json_lines()[0]["n"]) > 0
    res = ok(landed.run('yibao query --format json "SELECT count() AS n FROM dead_letters"'))
    assert int(res.json_lines()[0]["n"]) >= landed.extra["broken"]
