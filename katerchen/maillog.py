"""Mail events as log lines: one logfmt line per event on the ``katerchen`` logger.

A line reads ``2024-05-01T12:00:00.123Z info queued id=0Ab3 size=1234 from=<a@b> nrcpt=1``:
a UTC timestamp, the level, the event name, then ``key=value`` fields.  Values that hold a
space, a quote, ``=``, a backslash or nothing at all are double-quoted, and every control or
other non-printable character is escaped (``\\r``, ``\\n``, ``\\x00``, ``\\u2028``), so a client
that puts CR LF into its HELO name cannot forge a second log line.

Never pass message bodies or passwords as fields.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

__all__ = ["LEVELS", "debug", "error", "event", "format_event", "log", "logger", "setup", "warning"]

logger = logging.getLogger("katerchen")

#: The level names ``setup()`` and ``--log-level`` accept.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_SIMPLE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(value: str) -> str:
    """A logfmt value: bare when that is unambiguous, else quoted with escapes."""
    if value and value.isprintable() and not any(c in value for c in ' "=\\'):
        return value
    out = []
    for ch in value:
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def format_event(name: str, fields: dict[str, object]) -> str:
    """The logfmt text of one event (without timestamp and level)."""
    parts = [_quote(name)]
    for key, value in fields.items():
        parts.append(f"{_quote(key)}={_quote(_text(value))}")
    return " ".join(parts)


def log(level: int, name: str, /, **fields: object) -> None:
    """Log event *name* with *fields* at *level*; nothing is formatted when it is disabled."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_event(name, fields))


def event(name: str, /, **fields: object) -> None:
    """Log a mail event at level info: ``event("queued", id=qid, size=1234, nrcpt=1)``."""
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s", format_event(name, fields))


def debug(name: str, /, **fields: object) -> None:
    """Like :func:`event`, at level debug."""
    log(logging.DEBUG, name, **fields)


def warning(name: str, /, **fields: object) -> None:
    """Like :func:`event`, at level warning."""
    log(logging.WARNING, name, **fields)


def error(name: str, /, **fields: object) -> None:
    """Like :func:`event`, at level error."""
    log(logging.ERROR, name, **fields)


class _Formatter(logging.Formatter):
    """``<UTC timestamp> <level> <message>``, one line.

    Messages logged around :func:`event` (a library's warning, a plain ``logger.info``) get their
    line breaks escaped too; only an exception's traceback may span lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.isprintable():
            message = _quote(message)[1:-1]
        seconds = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z"
        line = f"{stamp} {record.levelname.lower()} {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        return line


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, without an explicit stream, writes to whatever ``sys.stderr`` is
    at the time of each record (so it follows pytest's capture and redirections)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._explicit = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._explicit if self._explicit is not None else sys.stderr
        super().emit(record)


def setup(*, level: str = "info", stream: TextIO | None = None) -> None:
    """Send katerchen's log lines to *stream* (default: stderr) from *level* up.

    Idempotent: a second call replaces the level and stream instead of adding a handler.
    Raises ValueError for a level name not in :data:`LEVELS`.
    """
    try:
        number = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}") from None
    for handler in list(logger.handlers):
        if isinstance(handler, _Handler):
            logger.removeHandler(handler)
            handler.close()
    handler = _Handler(stream)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(number)
