"""Logging of every yibao process: our structlog loggers and the stdlib ones (Faust, mode, aiokafka,
kafka-python, clickhouse_driver) through one processor chain that redacts personal data.

Logs are read by more people, and kept by more systems, than the ClickHouse tables; they must never
hold personal data, by construction rather than by every call site's care. A worker crash once
printed its traceback's local variables (rich's pretty tracebacks show them), consumer records
included: clear ``psn_no`` values by the hundred. Hence:

- tracebacks are plain ones (:func:`safe_traceback`): never local variables, and an exception that
  conversions of data raise (``ValueError``) is named with where it was raised, not its message;
- :func:`redact` runs on every line after the exception is rendered to text and before the line is
  rendered: values under personal field names are masked, every string (message, values, exception
  text) loses ID-card numbers, mobile numbers and any run of 15+ digits (person numbers are 20), and
  bytes (Kafka keys and values hold Avro strings in clear) become a length marker;
- uncaught exceptions go through the same chain (Python's hook would print their message raw);
- ``YIBAO_LOG_FORMAT=json`` gives one JSON object per line for log shippers, same redaction.

Levels filter before any processor runs, so disabled lines cost nothing here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Mapping
from decimal import Decimal
from pathlib import PurePath
from types import TracebackType
from typing import Any, Final
from uuid import UUID

import orjson
import structlog
from structlog.typing import EventDict, ExcInfo, Processor, WrappedLogger

from streams.privacy import REDACTED, safe_error, scrub

MASK: Final = REDACTED
LOG_FORMATS: Final = ("console", "json")

#: The platform's personal fields (schemas/avsc, docs/design.md "Privacy"); with the variants below
#: they are matched whole and case-insensitively on mapping keys and on ``key=value`` /
#: ``'key': value`` text.
PERSONAL_FIELDS: Final = frozenset({
    "psn_no", "psn_cert_no", "psn_name", "tel", "brdy", "rptr_name", "rptr_cert_no", "rptr_tel",
})
_VARIANTS: Final = (
    r"birthday", r"birth_?date", r"(?:psn|rptr|person|patient|insured|reporter)_?(?:name|no)",
    r"\w*cert_?no", r"\w*_tel", r"tel_?no", r"\w*mobile(?:_?no)?", r"\w*phone(?:_?no)?", r"\w*id_?card(?:_?no)?",
)
_FIELD: Final = "(?:" + "|".join([*sorted(PERSONAL_FIELDS, key=len, reverse=True), *_VARIANTS]) + ")"
_FIELD_RE: Final = re.compile(_FIELD, re.IGNORECASE)
#: ``psn_name='张三'``, ``"tel": "138…"``, ``rptr_cert_no=110…``: any ``key=value`` or ``'key': value``,
#: the value masked when :func:`is_personal` says so of the key (one pass, no per-field alternation).
_KEYED_RE: Final = re.compile(
    r"(?<![A-Za-z0-9_])(?P<key>[A-Za-z_][A-Za-z0-9_]*)(?P<sep>['\"]?[ \t]*[:=](?!=)[ \t]*)"
    r"(?P<value>b?'(?:[^'\\\n]|\\.)*'|b?\"(?:[^\"\\\n]|\\.)*\"|[^\s,;)}\]>]+)"
)
_BYTES_RE: Final = re.compile(r"\bb'(?:[^'\\\n]|\\.)*'|\bb\"(?:[^\"\\\n]|\\.)*\"")
_BIG_INT: Final = 10**14
_MAX_DEPTH: Final = 8
_JSON_FIRST: Final = ("timestamp", "level", "logger", "event")


class CurrentStderr:
    """Whatever ``sys.stderr`` is at write time, so a replaced stream (a test's capture, a
    daemon's redirect) never leaves loggers writing to a closed file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@functools.lru_cache(maxsize=4096)
def is_personal(key: str) -> bool:
    """Whether values under ``key`` are personal data (memoized: the same keys come again and again)."""
    return _FIELD_RE.fullmatch(key) is not None


def _mask_keyed(m: re.Match[str]) -> str:
    """The value after a personal key masked; any other value searched in turn (``a=psn_name=…``)."""
    key, sep, value = m.group("key", "sep", "value")
    if is_personal(key):
        return key + sep + MASK
    return key + sep + _KEYED_RE.sub(_mask_keyed, value)


def redact_text(text: str) -> str:
    """``text`` without personal values after personal keys, bytes literals, ID and phone numbers."""
    if "=" in text or ":" in text:
        text = _KEYED_RE.sub(_mask_keyed, text)
    if "b'" in text or 'b"' in text:
        text = _BYTES_RE.sub("<bytes>", text)
    return scrub(text)


@functools.lru_cache(maxsize=4096)
def _redact_key(key: str) -> str:
    return redact_text(key)


def redact_value(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` safe to render: JSON-able primitives, containers and scrubbed strings.

    Objects of other types become their scrubbed ``repr``, so no renderer ever calls a ``repr``
    that bypassed the redaction; dataclasses and named tuples become dicts so their personal
    fields are masked by name.
    """
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, int):
        return MASK if abs(value) >= _BIG_INT else value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, datetime.date | datetime.time | Decimal | UUID | PurePath):
        return redact_text(str(value))
    if depth >= _MAX_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping):
        return _redact_mapping(value, depth)
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return _redact_mapping(value._asdict(), depth)
    if isinstance(value, tuple):
        return tuple(redact_value(v, depth + 1) for v in value)
    if isinstance(value, list | set | frozenset):
        return [redact_value(v, depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _redact_mapping({f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}, depth)
    try:
        text = repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"
    return redact_text(text)


def _redact_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = k if isinstance(k, str) else str(redact_value(k, depth + 1))
        out[_redact_key(key)] = MASK if v is not None and is_personal(key) else redact_value(v, depth + 1)
    return out


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the whole event dict through :func:`redact_value`.

    Must run after the exception is rendered to text (so its message is scrubbed too) and before
    the renderer. A failure here drops the line's content rather than the process or the redaction.
    """
    try:
        return _redact_mapping(event_dict, 0)
    except Exception as exc:
        return {"event": "log line withheld: its redaction failed", "error": type(exc).__name__,
                "level": event_dict.get("level", method_name)}


#: Exceptions that conversions of data raise, with the data in their message (``int(psn_name)``):
#: their traceback line says what and where (:func:`streams.privacy.safe_error`), not the message.
_QUOTES_DATA: Final = (ValueError, AssertionError)


def safe_traceback(exc_info: ExcInfo) -> str:
    """A plain traceback (frames, never local variables) of the whole exception chain, in which
    an exception that may quote the data it failed on is named by :func:`safe_error` instead of
    its message; every other message is still scrubbed by :func:`redact` afterwards."""
    exc = exc_info[1]
    if exc is None:
        return ""
    chain: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    parts: list[str] = []
    for i, e in enumerate(reversed(chain)):
        if i:
            caused = chain[len(chain) - i].__cause__ is e
            parts.append("\nThe above exception was the direct cause of the following exception:\n\n" if caused
                         else "\nDuring handling of the above exception, another exception occurred:\n\n")
        if e.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(e.__traceback__))
        if isinstance(e, _QUOTES_DATA):
            parts.append(safe_error(e) + "\n")
        else:
            parts.extend(traceback.format_exception_only(e))
    return "".join(parts).rstrip("\n")


def _stack_info_to_stack(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """A stdlib record's ``stack_info`` is already text: the renderers expect it under ``stack``."""
    stack = event_dict.pop("stack_info", None)
    if isinstance(stack, str):
        event_dict["stack"] = stack
    return event_dict


def _json_dumps(obj: dict[str, Any], **kw: Any) -> str:
    first = {k: obj[k] for k in _JSON_FIRST if k in obj}
    return orjson.dumps(first | obj, default=kw.get("default")).decode()


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """An uncaught exception's traceback through the chain: Python's own hook prints its message raw."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    structlog.get_logger().critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    thread = args.thread.name if args.thread is not None else None
    structlog.get_logger().critical("uncaught exception in a thread", thread=thread,
                                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _colors() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _renderer(fmt: str) -> Processor:
    if fmt == "json":
        return structlog.processors.JSONRenderer(serializer=_json_dumps)
    return structlog.dev.ConsoleRenderer(colors=_colors(), exception_formatter=structlog.dev.plain_traceback)


class _Handler(logging.StreamHandler[CurrentStderr]):
    """The stdlib handler of our chain; a record that fails to format is reported without its
    message and arguments (the stdlib's default prints both raw), as a JSON object in that format."""

    def __init__(self, stream: CurrentStderr, fmt: str) -> None:
        super().__init__(stream)
        self.fmt = fmt

    def handleError(self, record: logging.LogRecord) -> None:
        if logging.raiseExceptions:
            error = sys.exc_info()[0]
            name = error.__name__ if error else "error"
            text = f"logging {name} in {record.name}: message and arguments withheld"
            with contextlib.suppress(Exception):
                if self.fmt == "json":
                    self.stream.write(orjson.dumps({"level": "error", "logger": record.name, "event": text}).decode()
                                      + "\n")
                else:
                    self.stream.write(f"--- {text} ---\n")


#: clickhouse-driver's logger of connection attempts (clickhouse_driver/connection.py).
CH_CONNECTION_LOGGER: Final = "clickhouse_driver.connection"


class _ExpectedConnectFailure(logging.Filter):
    """clickhouse-driver logs every failed connect as a WARNING with its full traceback: 18 of them
    (261 lines) in 25 s of back-off while ClickHouse was down. A refused or timed-out connection is
    an outage, not a bug, and the caller reports it already (the worker one line per back-off step,
    a command its one error line), so the driver's record is kept to one line at DEBUG; so are its
    warnings that a pooled connection it pings, or a socket it closes, is already gone (it then
    reconnects, or the caller reports the failure). Any other exception keeps its traceback."""

    #: the driver's message templates, said again by the caller when they matter
    QUIET: Final = ("Error on socket shutdown", "Error on %s ping", "Connection was closed, reconnecting")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        msg = str(record.msg)
        if isinstance(exc, OSError) and msg.startswith("Failed to connect"):
            record.msg = f"{msg}: %s: %s (the caller retries or reports it)"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()), type(exc).__name__, exc)
        elif exc is not None or not msg.startswith(self.QUIET):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return True


def _level(name: str) -> int:
    value = logging.getLevelName(name.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {name!r}")
    return value


def configure(level: str = "INFO", fmt: str = "console", *, libraries: str | None = None) -> None:
    """Route all logging through the redacting chain, to the current stderr, at ``level``.

    ``libraries`` is the level of the stdlib loggers (Faust, aiokafka, ...): by default WARNING or
    above, what Python printed of them before any configuration; the worker passes its own level,
    as Faust's logging setup used to. Uncaught exceptions (main thread and threads) are logged
    through the chain too. Safe to call again (the previous handler is replaced).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    own = _level(level)
    lib = max(own, logging.WARNING) if libraries is None else _level(libraries)
    if fmt == "json":
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    else:
        stamp = structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False)
    tail: list[Processor] = [structlog.processors.ExceptionRenderer(safe_traceback), redact, _renderer(fmt)]
    stream = CurrentStderr()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.StackInfoRenderer(),
            structlog.dev.set_exc_info,
            stamp,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(own),
        logger_factory=structlog.PrintLoggerFactory(stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    handler = _Handler(stream, fmt)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            _stack_info_to_stack,
            stamp,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lib)
    ch = logging.getLogger(CH_CONNECTION_LOGGER)
    if not any(isinstance(f, _ExpectedConnectFailure) for f in ch.filters):
        ch.addFilter(_ExpectedConnectFailure())
    # a library's warning is a log line like any other, not raw stderr text; off first, as a no-op
    # "on" would keep a hook that something (a test runner) has replaced since
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
