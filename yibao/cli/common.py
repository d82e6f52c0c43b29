"""What every `yibao` command shares: the consoles, the one-line error for a fixable problem, and
settings read with logging configured. Sub-command modules import this, never the CLI's main module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape

from ..settings import Settings, SettingsError, load_settings

# --- the options several commands take, declared once ----------------------------------------
Bootstrap = Annotated[str | None, typer.Option("--bootstrap", help="Kafka bootstrap servers [YIBAO_KAFKA_BOOTSTRAP]")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="embedded|server [YIBAO_CH_BACKEND]")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="chDB data and local state [YIBAO_DATA_DIR]")]
ChHost = Annotated[str | None, typer.Option("--ch-host", help="ClickHouse server host [YIBAO_CH_HOST]")]
ChPort = Annotated[int | None, typer.Option("--ch-port", help="ClickHouse native port [YIBAO_CH_PORT]")]
Database = Annotated[str | None, typer.Option("--database", help="ClickHouse database [YIBAO_CH_DATABASE]")]

#: Width of a console that writes to no terminal: wide enough that no id, value or error line is cut.
UNLIMITED_WIDTH = 1_000_000


class CliConsole(Console):
    """Rich's console, fitted to the terminal when it writes to one; unlimited otherwise.

    Rich sizes its output to whichever of stdin, stdout and stderr is a terminal, else 80 columns,
    so `yibao rules list | cat` cut ids short (`YB-DAY-…`) and an error line read by a script was
    wrapped. A pipe or a file gets every line whole; a terminal (or an explicit width) stays pretty.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # COLUMNS describes the terminal; a pipe is not bound by it (rich would take it as a width)
        self._fitted = kwargs.get("width") is not None

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if not self._fitted and not self.is_terminal:
            return ConsoleDimensions(UNLIMITED_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size
        self._fitted = True


console = CliConsole()
err = CliConsole(stderr=True)

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix; printed as one line plus a hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def fail(message: str, hint: str | None = None) -> NoReturn:
    raise UserError(message, hint)


def configure_logging(level: str, fmt: str = "console") -> None:
    """Structured, redacted logs to the current stderr at ``level``, ours and the libraries' (yibao.logs)."""
    from ..logs import configure

    configure(level, fmt)


def settings_from(**flags: Any) -> Settings:
    mapping = {
        "bootstrap": "kafka_bootstrap", "backend": "ch_backend", "data_dir": "data_dir",
        "ch_host": "ch_host", "ch_port": "ch_port", "database": "ch_database",
    }
    s = load_settings(**{mapping.get(k, k): v for k, v in flags.items()})
    configure_logging(s.log_level, s.log_format.value)
    return s


def require_broker(s: Settings, hint: str | None = None, timeout_s: float = 3.0) -> None:
    """Fail in one line, within seconds, when no bootstrap server accepts a connection.

    Kafka clients otherwise end in a traceback, or retry for their whole request timeout against a
    host that drops packets. A broker that accepts the connection but refuses the client (TLS, SASL)
    is left to the client's own error, which ``guard`` also turns into one line.
    """
    import socket

    reason = ""
    for address in s.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    fail(f"no Kafka broker answers at {s.kafka_bootstrap} ({reason})",
         hint or "start the broker, or point YIBAO_KAFKA_BOOTSTRAP (or --bootstrap) at one")


def _is_kafka_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("aiokafka", "kafka")


def _one_line(text: str) -> str:
    """A message on one line: a server's stack trace dropped, the other lines joined."""
    text = text.split("Stack trace:", 1)[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def say_error(message: str, hint: str | None = None) -> None:
    """``error: …`` (one line; markup in the message is shown as typed), then ``hint: …`` if any."""
    err.print(f"[red]error:[/red] {escape(_one_line(message))}", highlight=False)
    if hint:
        err.print(f"[dim]hint: {escape(_one_line(hint))}[/dim]", highlight=False)


def _say_settings(exc: SettingsError) -> None:
    """One ``error:`` line per bad setting (the message lists them under a heading ending in ':')."""
    head, *rest = str(exc).splitlines() or [""]
    problems = [r.strip() for r in rest if r.strip()]
    if head.endswith(":") and problems:
        for p in problems:
            say_error(f"{head} {p}")
    else:
        say_error(str(exc))


def guard(fn: Callable[[], T]) -> T:
    """Turn known, fixable failures into one clear line; let real bugs show their traceback."""
    from schemas import RegistryError
    from sinks.base import SinkError, SinkUnavailable
    from streams.privacy import PrivacyError
    from streams.rules import KnowledgeError, RuleError

    try:
        return fn()
    except UserError as exc:
        say_error(str(exc), exc.hint)
    except SettingsError as exc:
        _say_settings(exc)
    except SinkUnavailable as exc:
        say_error(f"ClickHouse is unreachable: {exc}", "check YIBAO_CH_HOST/YIBAO_CH_PORT, or use --backend embedded")
    except (SinkError, RegistryError, PrivacyError, RuleError, KnowledgeError) as exc:
        say_error(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:
        if not _is_kafka_error(exc):
            raise
        say_error(f"Kafka: {exc}",
                  "check YIBAO_KAFKA_BOOTSTRAP and the YIBAO_KAFKA_SECURITY_PROTOCOL/SASL/SSL settings")
    raise typer.Exit(2)
