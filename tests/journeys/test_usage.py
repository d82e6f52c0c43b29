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
