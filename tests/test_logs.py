"""The log as an operator reads it: one line per event, logfmt or ``--log-format json``, and
every line about a message carrying its queue id (``grep id=...`` follows it from the session
that brought it to its delivery or bounce), every line about a connection its session id."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from katerchen import cli, maillog
from tests.conftest import (
    DOMAIN,
    MakeConfig,
    StartServer,
    config_toml,
    in_thread,
    wait_until,
)
from tests.test_cli import DEADLINE, ServerProcess
from tests.test_receiver import queue_id_of

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The lines katerchen's own handler writes (what stderr gets), logfmt, level info."""
    logger = maillog.logger
    saved = (logger.level, list(logger.handlers))
    stream = io.StringIO()
    maillog.setup(level="info", stream=stream)
    try:
        yield stream
    finally:
        for handler in list(logger.handlers):
            if handler not in saved[1]:
                logger.removeHandler(handler)
        logger.setLevel(saved[0])


def events(stream: io.StringIO, name: str) -> list[str]:
    """The lines of event *name*, without timestamp and level."""
    found = []
    for line in stream.getvalue().splitlines():
        rest = line.split(" ", 2)[2]
        if rest.split(" ", 1)[0] == name:
            found.append(rest)
    return found


def field(line: str, key: str) -> str:
    match = re.search(rf"(?:^| ){re.escape(key)}=(\S+)", line)
    assert match, f"no {key}= in {line!r}"
    return match.group(1)


# --- JSON ---------------------------------------------------------------------------------------


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def json_output() -> Iterator[io.StringIO]:
    logger = maillog.logger
    saved = (logger.level, list(logger.handlers), logger.propagate)
    stream = io.StringIO()
    maillog.setup(level="debug", stream=stream, format="json")
    logger.propagate = False
    try:
        yield stream
    finally:
        for handler in list(logger.handlers):
            if handler not in saved[1]:
                logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[2]


def test_json_lines(json_output: io.StringIO) -> None:
    maillog.event(
        "queued",
        id="0661603f1048d13cbb36",
        size=1234,
        ok=True,
        nothing=None,
        ratio=0.5,
        path=Path("/x"),
        raw=b"\xff",
    )
    maillog.warning("odd", helo='evil\r\n{"level": "error"}', who="caf\u00e9\u2028")
    maillog.error("clash", ts="mine", level="mine", event="mine")
    (queued, odd, clash) = json_lines(json_output)
    fields = ["id", "size", "ok", "nothing", "ratio", "path", "raw"]
    assert list(queued) == ["ts", "level", "event", *fields]
    assert STAMP.match(str(queued["ts"]))
    assert queued["level"] == "info" and queued["event"] == "queued"
    assert queued["size"] == 1234 and queued["ok"] is True and queued["nothing"] is None
    assert queued["ratio"] == 0.5 and queued["path"] == "/x" and queued["raw"] == "\\xff"
    assert odd["level"] == "warning"
    assert odd["helo"] == 'evil\r\n{"level": "error"}'  # a value, however it looks
    assert odd["who"] == "caf\u00e9\u2028"
    # Every line is ASCII, so no character can break it in two for any reader.
    assert json_output.getvalue().isascii()
    assert len(json_output.getvalue().splitlines()) == 3
    assert clash["event"] == "clash"
    assert (clash["field_ts"], clash["field_level"], clash["field_event"]) == ("mine",) * 3


def test_json_for_plain_messages_and_tracebacks(json_output: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        maillog.logger.exception("internal-error id=%s ip=%s", "0661603f1048d13cbb36", "192.0.2.1")
    maillog.logger.warning("Something %s happened", "odd")
    crash, plain = json_lines(json_output)
    assert crash["event"] == "internal-error"
    assert crash["id"] == "0661603f1048d13cbb36" and crash["ip"] == "192.0.2.1"
    assert "RuntimeError: boom" in str(crash["exception"])
    assert plain["event"] == "message" and plain["message"] == "Something odd happened"


def test_json_carries_the_bound_fields(json_output: io.StringIO) -> None:
    async def session() -> None:
        maillog.bind(sid="5f0c2a9e81d4")
        maillog.event("connect", ip="192.0.2.1")
        maillog.bind(id="0661603f1048d13cbb36")
        maillog.event("queued", id="0661603f1048d13cbb36", size=1)
        maillog.unbind("id")
        maillog.event("disconnect", ip="192.0.2.1")

    trio.run(session)
    maillog.event("outside")
    connect, queued, disconnect, outside = json_lines(json_output)
    assert list(connect)[3:] == ["sid", "ip"]
    assert list(queued)[3:] == ["sid", "id", "size"]
    assert "id" not in disconnect and disconnect["sid"] == "5f0c2a9e81d4"
    assert list(outside) == ["ts", "level", "event"]


def test_setup_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        maillog.setup(format="xml")


def test_log_format_json_end_to_end(tmp_path: Path) -> None:
    """``--log-format json``: every line of a real run parses, and a message can be followed by
    its id from the session to the delivery."""
    (tmp_path / "domains" / DOMAIN / "alice").mkdir(parents=True)
    (tmp_path / "katerchen.toml").write_text(config_toml(server={"shutdown_grace": 1}))
    process = ServerProcess(
        ["--log-format", "json", "serve", "--config", "katerchen.toml"], cwd=tmp_path
    )
    try:
        listening = json.loads(process.wait_for('"event":"listening"'))
        port = int(str(listening["addresses"]).rsplit(":", 1)[1])
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            client.sendmail("a@client.test", [f"alice@{DOMAIN}"], b"Subject: json\r\n\r\nhi\r\n")
        process.wait_for('"event":"delivered"')
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0
    documents = [json.loads(line) for line in process.lines]
    for document in documents:
        assert list(document)[:3] == ["ts", "level", "event"], document
    (queued,) = [d for d in documents if d["event"] == "queued"]
    about = [d["event"] for d in documents if d.get("id") == queued["id"]]
    assert about == ["queued", "delivered"]
    session = [d["event"] for d in documents if d.get("sid") == queued["sid"]]
    assert session == ["connect", "queued", "disconnect"]


def test_log_format_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--log-format", "yaml"]) == 2
    assert "--log-format" in capsys.readouterr().err


# --- following a message ------------------------------------------------------------------------


async def test_grep_id_follows_a_message_and_sid_its_session(
    start_server: StartServer, make_config: MakeConfig, log_output: io.StringIO
) -> None:
    config = make_config()
    server = await start_server(config, deliver=True)

    def send() -> None:
        with server.smtp() as smtp:
            smtp.sendmail("a@client.test", ["alice@example.test"], b"Subject: one\r\n\r\n")
            smtp.sendmail("a@client.test", ["bob@example.test"], b"Subject: two\r\n\r\n")

    await in_thread(send)
    await wait_until(lambda: len(events(log_output, "delivered")) == 2)
    queued = events(log_output, "queued")
    assert len(queued) == 2
    sid = field(queued[0], "sid")
    assert field(queued[1], "sid") == sid
    (connect,) = events(log_output, "connect")
    assert field(connect, "sid") == sid
    (disconnect,) = events(log_output, "disconnect")
    assert field(disconnect, "sid") == sid and " id=" not in disconnect
    for line in queued:
        queue_id = field(line, "id")
        about = [x.split(" ", 1)[0] for x in _grep(log_output, f"id={queue_id}")]
        assert about == ["queued", "delivered"], about
    # The session's lines, and only those, carry its sid.
    session = [x.split(" ", 1)[0] for x in _grep(log_output, f"sid={sid}")]
    assert session == ["connect", "queued", "queued", "disconnect"]


def _grep(stream: io.StringIO, text: str) -> list[str]:
    return [line.split(" ", 2)[2] for line in stream.getvalue().splitlines() if text in line]


async def test_a_bounce_is_followed_by_the_same_grep(
    start_server: StartServer, make_config: MakeConfig, log_output: io.StringIO
) -> None:
    config = make_config()
    (config.directories.domains / DOMAIN / "aliases").write_text("list: bob\n")
    # Delivery is stopped until bob is gone: the RCPT was accepted, the delivery fails for
    # good and the sender gets a bounce.
    server = await start_server(config)
    client = await server.connect()
    replies = await client.dialog("""
        s: 220
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<alice@example.test>
        s: 250
        c: RCPT TO:<list@example.test>
        s: 250
        c: DATA
        s: 354
        c: Subject: to be bounced
        c:
        c: .
        s: 250
    """)
    queue_id = queue_id_of(replies[-1])
    (config.directories.domains / DOMAIN / "bob").rmdir()
    await start_server(config, deliver=True)  # a second server on the spool delivers
    await wait_until(lambda: events(log_output, "delivered"))
    lines = _grep(log_output, f"id={queue_id}")
    assert [x.split(" ", 1)[0] for x in lines] == ["queued", "bounced", "delivered"], lines
    # The bounce has an id of its own, the message's plus a letter, delivered to the sender.
    assert field(lines[1], "dsn") == field(lines[2], "id") == f"{queue_id}b"
    assert "to=<alice@example.test>" in lines[2]


async def test_lines_during_a_transaction_carry_its_id(
    start_server: StartServer, make_config: MakeConfig, log_output: io.StringIO
) -> None:
    server = await start_server(make_config(limits={"data_timeout": 0.3}))
    client = await server.connect()
    await client.dialog("""
        s: 220
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test>
        s: 250
        c: RCPT TO:<alice@example.test>
        s: 250
        c: DATA
        s: 354
    """)
    await client.send("Subject: never finished\r\n")
    await client.expect("421 4.4.2")
    await wait_until(lambda: events(log_output, "disconnect"))
    (timeout,) = events(log_output, "timeout")
    assert field(timeout, "id") and "stage=data" in timeout
    assert field(timeout, "sid") == field(events(log_output, "connect")[0], "sid")


def test_caplog_sees_the_events_as_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The bound fields are added by katerchen's formatter; other handlers get the event."""
    caplog.set_level(logging.INFO, logger="katerchen")

    async def session() -> None:
        maillog.bind(sid="abc")
        maillog.event("connect", ip="192.0.2.1")

    trio.run(session)
    assert [r.getMessage() for r in caplog.records] == ["connect ip=192.0.2.1"]
