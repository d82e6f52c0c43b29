"""Mistyped commands: a misspelt option, a value of the wrong type, a missing argument are one
clear line and a hint naming the command's help, exit status 2; a command group alone shows its help."""

from __future__ import annotations

import pytest

from .conftest import User, assert_clear_error, ok


@pytest.mark.parametrize(("cmdline", "needle"), [
    ("yibao --bogus", "--bogus"),
    ("yibao dlq list --limit abc", "--limit"),
    ("yibao query", "sql"),
    ("yibao simulate --events many", "--events"),
    ("yibao worker --web-port", "--web-port"),
    ("yibao nosuchcommand", "nosuchcommand"),
])
def test_usage_errors_are_one_line(user: User, cmdline: str, needle: str) -> None:
    res = user.run(cmdline)
    assert_clear_error(res, needle)
    assert res.code == 2
    assert "--help" in res.err.splitlines()[-1]


@pytest.mark.parametrize("cmdline", ["yibao", "yibao rules", "yibao dlq", "yibao schemas", "yibao monitors"])
def test_a_group_alone_shows_its_commands(user: User, cmdline: str) -> None:
    res = ok(user.run(cmdline))
    assert "Usage:" in res.out and "Commands" in res.out, res


def test_simulating_into_the_future_is_refused_with_a_start_that_works(user: User) -> None:
    """The default traffic starts on a fixed day (a seed always gives the same traffic); a span that
    reaches past today would be dead-lettered as FUTURE_TIME by every worker, so it is refused, and
    the hint's --start is accepted."""
    res = user.run("yibao simulate --days 90 --events 200 --out ev.jsonl")
    assert_clear_error(res, "--days 90", "FUTURE_TIME")
    start = res.err.split("--start", 1)[1].split()[0]
    ok(user.run(f"yibao simulate --days 90 --events 200 --start {start} --out ev.jsonl"))
    assert (user.cwd / "ev.jsonl").stat().st_size > 0
    assert_clear_error(user.run("yibao simulate --start 2026-13-01 --out ev.jsonl"), "--start")


def test_monitors_run_without_a_broker_is_one_line(engine_user: User) -> None:
    ok(engine_user.run("yibao migrate", timeout=300))
    assert_clear_error(engine_user.run("yibao monitors run"), "broker")
    res = ok(engine_user.run("yibao monitors run --no-publish --json", timeout=300))
    assert res.json()["emitted"] == {}
