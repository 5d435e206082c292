"""Mail events as log lines: one line per event on the ``katerchen`` logger, logfmt or JSON.

A logfmt line (the default) reads
``2024-05-01T12:00:00.123Z info queued sid=5f0c2a9e81d4 id=0661603f1048d13cbb36 size=1234 ...``:
a UTC timestamp, the level, the event name, then ``key=value`` fields.  Values that hold a
space, a quote, ``=``, a backslash or nothing at all are double-quoted, and every control or
other non-printable character is escaped (``\\r``, ``\\n``, ``\\x00``, ``\\u2028``), so a client
that puts CR LF into its HELO name cannot forge a second log line.

A JSON line (``setup(format="json")``, ``--log-format json``) is one object with the same
content, flat: ``{"ts": "...", "level": "info", "event": "queued", "sid": "...", "id": "...",
"size": 1234, ...}``.  Numbers and booleans stay numbers and booleans, None is null, anything
else is a string; a field that would shadow ``ts``, ``level`` or ``event`` gets a ``field_``
prefix.  Non-ASCII characters are escaped, so a line is always one line of ASCII.

Context.  :func:`bind` attaches fields to every line logged afterwards from the same trio task
(and the worker threads it starts): the app binds a session id ``sid`` to each connection, the
receiver the queue id ``id`` once a transaction has one.  They are added when the line is
written, in front of the event's own fields (an event's own field of the same name wins), and
are not part of ``record.getMessage()``, which stays the event as logged.

Never pass message bodies or passwords as fields.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import sys
import time
from collections.abc import Mapping
from typing import TextIO

__all__ = [
    "FORMATS",
    "LEVELS",
    "bind",
    "bound",
    "debug",
    "error",
    "event",
    "format_event",
    "log",
    "logger",
    "setup",
    "unbind",
    "warning",
]

logger = logging.getLogger("katerchen")

#: The level names ``setup()`` and ``--log-level`` accept.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: The line formats ``setup()`` and ``--log-format`` accept.
FORMATS = ("logfmt", "json")

_SIMPLE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

# The fields bound to the current task (see bind()); a tuple, never mutated, so that a task or
# thread that inherited a copy of the context keeps what it inherited.
_context: contextvars.ContextVar[tuple[tuple[str, object], ...]] = contextvars.ContextVar(
    "katerchen.maillog.context", default=()
)
# The LogRecord attribute that carries them from the logging call to the formatter.
_CONTEXT_ATTRIBUTE = "katerchen_context"


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


def format_event(name: str, fields: Mapping[str, object]) -> str:
    """The logfmt text of one event (without timestamp and level)."""
    if not fields:
        return _quote(name)
    return f"{_quote(name)} {_format_fields(fields)}"


def _format_fields(fields: Mapping[str, object]) -> str:
    return " ".join(f"{_quote(key)}={_quote(_text(value))}" for key, value in fields.items())


class _Event:
    """A log record's message: the event, formatted only when a handler asks for its text."""

    __slots__ = ("fields", "name")

    def __init__(self, name: str, fields: dict[str, object]) -> None:
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        return format_event(self.name, self.fields)


def bind(**fields: object) -> None:
    """Add *fields* to every line logged from now on by the calling task (and by the threads and
    tasks it starts later), replacing bound fields of the same name: ``bind(sid="...")``."""
    current = dict(_context.get())
    current.update(fields)
    _context.set(tuple(current.items()))


def unbind(*names: str) -> None:
    """Stop adding the bound fields *names* (absent ones are ignored)."""
    current = _context.get()
    if any(key in names for key, _ in current):
        _context.set(tuple((key, value) for key, value in current if key not in names))


def bound() -> dict[str, object]:
    """The fields bound to the calling task."""
    return dict(_context.get())


def _attach_context(record: logging.LogRecord) -> bool:
    """A filter on the logger: runs in the thread of the logging call, so it sees that task's
    bound fields."""
    context = _context.get()
    if context:
        setattr(record, _CONTEXT_ATTRIBUTE, context)
    return True


logger.addFilter(_attach_context)


def log(level: int, name: str, /, **fields: object) -> None:
    """Log event *name* with *fields* at *level*; nothing is formatted when it is disabled."""
    if logger.isEnabledFor(level):
        logger.log(level, _Event(name, fields))


def event(name: str, /, **fields: object) -> None:
    """Log a mail event at level info: ``event("queued", id=qid, size=1234, nrcpt=1)``."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(_Event(name, fields))


def debug(name: str, /, **fields: object) -> None:
    """Like :func:`event`, at level debug."""
    log(logging.DEBUG, name, **fields)


def warning(name: str, /, **fields: object) -> None:
    """Like :func:`event`, at level warning."""
    log(logging.WARNING, name, **fields)


def error(name: str, /, **fields: object) -> None:
    """Like :func:`event`, at level error."""
    log(logging.ERROR, name, **fields)


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z"


def _with_context(record: logging.LogRecord, fields: Mapping[str, object]) -> dict[str, object]:
    """The bound fields first, then the event's own (which win over bound ones of that name)."""
    merged: dict[str, object] = dict(getattr(record, _CONTEXT_ATTRIBUTE, ()))
    merged.update(fields)
    return merged


class _Formatter(logging.Formatter):
    """``<UTC timestamp> <level> <event> <fields>``, one line.

    Messages logged around :func:`event` (a library's warning, a plain ``logger.info``) get their
    line breaks escaped too, and the bound fields after their first word; only an exception's
    traceback may span lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.msg
        if isinstance(message, _Event):
            text = format_event(message.name, _with_context(record, message.fields))
        else:
            text = record.getMessage()
            if not text.isprintable():
                text = _quote(text)[1:-1]
            context = getattr(record, _CONTEXT_ATTRIBUTE, ())
            if context:
                first, _, rest = text.partition(" ")
                extra = _format_fields(dict(context))
                text = f"{first} {extra} {rest}" if rest else f"{first} {extra}"
        line = f"{_timestamp(record)} {record.levelname.lower()} {text}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        return line


_RESERVED = ("ts", "level", "event")
# "name key=value key=\"quoted value\" ..." as format_event writes it (see _parse_plain).
_PLAIN_NAME = re.compile(r"[a-z][a-z0-9_.-]*\Z")
_PLAIN_FIELD = re.compile(r'([^\s="]+)=("(?:[^"\\]|\\.)*"|[^\s"=]*)(?: |\Z)')


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return _text(value)


def _parse_plain(text: str) -> tuple[str, dict[str, object]] | None:
    """``internal-error id=...`` (a plain message written like an event) taken apart; None when
    it is not written like one."""
    name, _, rest = text.partition(" ")
    if not _PLAIN_NAME.match(name):
        return None
    fields: dict[str, object] = {}
    position = 0
    while position < len(rest):
        match = _PLAIN_FIELD.match(rest, position)
        if match is None:
            return None
        value = match.group(2)
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        fields[match.group(1)] = value
        position = match.end()
    return name, fields


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, then the fields (see the module docstring).
    A plain message that does not read like an event is ``"event": "message"`` with the text in
    ``"message"``; a traceback goes into ``"exception"``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.msg
        if isinstance(message, _Event):
            name, fields = message.name, _with_context(record, message.fields)
        else:
            text = record.getMessage()
            parsed = _parse_plain(text)
            name, own = parsed if parsed is not None else ("message", {"message": text})
            fields = _with_context(record, own)
        document: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "event": name,
        }
        for key, value in fields.items():
            while key in document:
                key = f"field_{key}"
            document[key] = _json_value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        return json.dumps(document, ensure_ascii=True, separators=(",", ":"))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, without an explicit stream, writes to whatever ``sys.stderr`` is
    at the time of each record (so it follows pytest's capture and redirections)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._explicit = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._explicit if self._explicit is not None else sys.stderr
        super().emit(record)


def setup(*, level: str = "info", stream: TextIO | None = None, format: str = "logfmt") -> None:
    """Send katerchen's log lines to *stream* (default: stderr) from *level* up, in *format*
    (one of :data:`FORMATS`).

    Idempotent: a second call replaces the level, format and stream instead of adding a handler.
    Raises ValueError for a level name not in :data:`LEVELS` or a format not in :data:`FORMATS`.
    """
    try:
        number = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}") from None
    if format not in FORMATS:
        raise ValueError(f"unknown log format {format!r}; use one of {', '.join(FORMATS)}")
    for handler in list(logger.handlers):
        if isinstance(handler, _Handler):
            logger.removeHandler(handler)
            handler.close()
    handler = _Handler(stream)
    handler.setFormatter(_JsonFormatter() if format == "json" else _Formatter())
    logger.addHandler(handler)
    logger.setLevel(number)
