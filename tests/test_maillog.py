"""Tests for katerchen.maillog: logfmt lines, quoting, log injection, setup()."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from katerchen import maillog
from katerchen.maillog import format_event

LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warning|error) (.*)\Z")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """maillog set up on a StringIO; the logger's state is restored afterwards."""
    logger = maillog.logger
    saved = (logger.level, list(logger.handlers), logger.propagate)
    stream = io.StringIO()
    maillog.setup(level="debug", stream=stream)
    logger.propagate = False  # keep pytest's capture out of these lines
    try:
        yield stream
    finally:
        for handler in logger.handlers:
            if handler not in saved[1]:
                logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[2]


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def parse(message: str) -> list[tuple[str, str]]:
    """A logfmt parser, strict enough to tell a forged field from a real one."""
    fields = []
    pattern = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"=]*)(?: |\Z)')
    pos = 0
    while pos < len(message):
        m = pattern.match(message, pos)
        assert m, f"unparseable at {pos}: {message!r}"
        fields.append((m.group(1), m.group(2)))
        pos = m.end()
    return fields


def test_simple_fields() -> None:
    assert format_event("queued", {"id": "0Ab3", "size": 1234, "from": "<a@b>", "nrcpt": 1}) == (
        "queued id=0Ab3 size=1234 from=<a@b> nrcpt=1"
    )


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("", '""'),
        (None, '""'),
        (True, "true"),
        (False, "false"),
        (1.5, "1.5"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("back\\slash", '"back\\\\slash"'),
        ("tab\there", '"tab\\there"'),
        ("nul\x00", '"nul\\x00"'),
        ("del\x7f", '"del\\x7f"'),
        ("line\u2028sep", '"line\\u2028sep"'),
        ("caf\u00e9", "caf\u00e9"),
        (b"by\xfftes", '"by\\\\xfftes"'),
    ],
)
def test_value_quoting(value: object, rendered: str) -> None:
    assert format_event("e", {"k": value}) == f"e k={rendered}"


def test_crlf_in_a_client_string_cannot_forge_a_log_line(log_stream: io.StringIO) -> None:
    helo = "evil\r\n2024-01-01T00:00:00.000Z info queued id=FAKE size=1 from=<x@y> nrcpt=1"
    maillog.event("connect", client="192.0.2.1", helo=helo)
    maillog.event("disconnect", client="192.0.2.1")
    out = lines(log_stream)
    assert len(out) == 2
    m = LINE.match(out[0])
    assert m
    name, _, rest = m.group(2).partition(" ")
    assert name == "connect"
    fields = parse(rest)
    assert [key for key, _ in fields] == ["client", "helo"]
    assert "\\r\\n" in fields[1][1]
    assert "queued" not in out[1]


def test_quote_inside_a_value_cannot_forge_a_field() -> None:
    text = format_event("reject", {"reason": 'x" id=FAKE "'})
    assert [key for key, _ in parse(text.partition(" ")[2])] == ["reason"]


def test_line_format_and_levels(log_stream: io.StringIO) -> None:
    maillog.event("queued", id="A1", size=10)
    maillog.debug("detail", n=1)
    maillog.warning("odd", what="x")
    maillog.error("broken", what="y")
    out = lines(log_stream)
    assert [LINE.match(line).group(1) for line in out] == [  # type: ignore[union-attr]
        "info",
        "debug",
        "warning",
        "error",
    ]
    assert out[0].endswith(" info queued id=A1 size=10")


def test_plain_messages_are_kept_on_one_line(log_stream: io.StringIO) -> None:
    maillog.logger.info("plain %s", "a\nb")
    assert len(lines(log_stream)) == 1
    assert lines(log_stream)[0].endswith("plain a\\nb")


def test_disabled_level_formats_nothing(log_stream: io.StringIO) -> None:
    maillog.setup(level="warning", stream=log_stream)

    class Boom:
        def __str__(self) -> str:
            raise AssertionError("formatted although disabled")

    maillog.event("queued", id=Boom())
    maillog.debug("detail", x=Boom())
    assert log_stream.getvalue() == ""


def test_setup_is_idempotent(log_stream: io.StringIO) -> None:
    second = io.StringIO()
    maillog.setup(level="info", stream=second)
    maillog.setup(level="info", stream=second)
    ours = [h for h in maillog.logger.handlers if isinstance(h, maillog._Handler)]
    assert len(ours) == 1
    maillog.event("once")
    assert len(lines(second)) == 1
    assert log_stream.getvalue() == ""
    assert maillog.logger.level == logging.INFO


def test_setup_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        maillog.setup(level="loud")


def test_default_stream_follows_sys_stderr(
    capsys: pytest.CaptureFixture[str], log_stream: io.StringIO
) -> None:
    maillog.setup(level="info")
    maillog.event("hello", to="stderr")
    assert capsys.readouterr().err.endswith(" info hello to=stderr\n")
