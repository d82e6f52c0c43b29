"""What every `yibao` command shares (yibao.cli.common): consoles that cut nothing when they do not
write to a terminal, the one-line error, and the quick broker check."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import typer
from rich.table import Table

from yibao.cli.common import CliConsole, fail, guard, require_broker
from yibao.localinfra import free_port
from yibao.settings import SettingsError, load_settings

LONG_ID = "YB-DAY-FREQ-" + "X" * 90


def _table() -> Table:
    t = Table("rule", "params")
    t.add_row(LONG_ID, '{"limit": 1}')
    return t


def test_a_console_that_writes_to_no_terminal_cuts_and_wraps_nothing() -> None:
    out = io.StringIO()
    c = CliConsole(file=out)
    assert not c.is_terminal
    c.print(_table())
    line = "error: " + " ".join(["word"] * 60)
    c.print(line)
    text = out.getvalue()
    assert LONG_ID in text
    assert "…" not in text
    assert line in text.splitlines()
    assert "\x1b[" not in text  # no colour codes in a pipe


def test_a_terminal_keeps_rich_fitted_output() -> None:
    out = io.StringIO()
    c = CliConsole(file=out, force_terminal=True, width=60)
    c.print(_table())
    lines = out.getvalue().splitlines()
    assert max(len(_plain(ln)) for ln in lines) <= 60
    assert LONG_ID not in out.getvalue()


def test_an_explicit_width_is_kept_when_not_a_terminal() -> None:
    out = io.StringIO()
    c = CliConsole(file=out, width=40)
    c.print(_table())
    assert max(len(ln) for ln in out.getvalue().splitlines()) <= 40


def _plain(line: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", line)


@pytest.fixture
def err_buffer(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The shared error console, writing to a buffer (not a terminal)."""
    from yibao.cli import common

    buf = io.StringIO()
    monkeypatch.setattr(common, "err", CliConsole(file=buf))
    yield buf


def _exit_code(fn: Callable[[], None]) -> int:
    with pytest.raises(typer.Exit) as info:
        guard(fn)
    return int(info.value.exit_code)


def test_guard_prints_one_error_line_and_one_hint_as_typed(err_buffer: io.StringIO) -> None:
    message = "rule [bold]YB-X[/bold] at " + "/very/long/path" * 10

    def run() -> None:
        fail(message, "use [red] brackets freely")

    assert _exit_code(run) == 2
    assert err_buffer.getvalue().splitlines() == [f"error: {message}", "hint: use [red] brackets freely"]


def test_guard_puts_each_bad_setting_on_its_own_error_line(err_buffer: io.StringIO) -> None:
    def run() -> None:
        raise SettingsError("invalid settings:\n  YIBAO_A: bad\n  YIBAO_B: worse")

    assert _exit_code(run) == 2
    assert err_buffer.getvalue().splitlines() == ["error: invalid settings: YIBAO_A: bad",
                                                  "error: invalid settings: YIBAO_B: worse"]


def test_guard_turns_a_kafka_client_error_into_one_line(err_buffer: io.StringIO) -> None:
    from aiokafka.errors import KafkaConnectionError

    def run() -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('10.0.0.1', 9092)]")

    assert _exit_code(run) == 2
    lines = err_buffer.getvalue().splitlines()
    assert lines[0] == "error: Kafka: KafkaConnectionError: Unable to bootstrap from [('10.0.0.1', 9092)]"
    assert len(lines) == 2 and lines[1].startswith("hint: ")


def test_guard_lets_a_bug_show_its_traceback() -> None:
    def run() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        guard(run)


def test_require_broker_fails_fast_where_nothing_listens() -> None:
    from yibao.cli.common import UserError

    s = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        require_broker(s, "try --seed")
    assert time.monotonic() - started < 3
    assert str(info.value).startswith(f"no Kafka broker answers at {s.kafka_bootstrap}")
    assert info.value.hint == "try --seed"


def test_require_broker_passes_when_one_of_the_servers_listens() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        s = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()},127.0.0.1:{port}")
        require_broker(s)
