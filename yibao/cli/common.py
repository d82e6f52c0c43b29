"""What every `yibao` command shares: the consoles, the one-line error for a fixable problem, and
settings read with logging configured. Sub-command modules import this, never the CLI's main module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from ..settings import Settings, SettingsError, load_settings

# --- the options several commands take, declared once ----------------------------------------
Bootstrap = Annotated[str | None, typer.Option("--bootstrap", help="Kafka bootstrap servers [YIBAO_KAFKA_BOOTSTRAP]")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="embedded|server [YIBAO_CH_BACKEND]")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="chDB data and local state [YIBAO_DATA_DIR]")]
ChHost = Annotated[str | None, typer.Option("--ch-host", help="ClickHouse server host [YIBAO_CH_HOST]")]
ChPort = Annotated[int | None, typer.Option("--ch-port", help="ClickHouse native port [YIBAO_CH_PORT]")]
Database = Annotated[str | None, typer.Option("--database", help="ClickHouse database [YIBAO_CH_DATABASE]")]

console = Console()
err = Console(stderr=True)

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


def guard(fn: Callable[[], T]) -> T:
    """Turn known, fixable failures into one clear line; let real bugs show their traceback."""
    from schemas import RegistryError
    from sinks.base import SinkError, SinkUnavailable
    from streams.privacy import PrivacyError
    from streams.rules import KnowledgeError, RuleError

    try:
        return fn()
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}")
        if exc.hint:
            err.print(f"[dim]hint: {exc.hint}[/dim]")
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}")
    except SinkUnavailable as exc:
        err.print(f"[red]error:[/red] ClickHouse is unreachable: {exc}")
        err.print("[dim]hint: check YIBAO_CH_HOST/YIBAO_CH_PORT, or use --backend embedded[/dim]")
    except (SinkError, RegistryError, PrivacyError, RuleError, KnowledgeError) as exc:
        err.print(f"[red]error:[/red] {exc}")
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    raise typer.Exit(2)
