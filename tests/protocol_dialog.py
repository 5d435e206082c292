r"""A driver for the sans-IO server side: dialog transcripts, fed three ways (h11 style).

A transcript is a list of lines::

    c: EHLO client.test     client sends "EHLO client.test\r\n"
    c~ a\n.\nb              client sends these bytes after Python escape decoding, no CRLF
    s: 250 2.0.0 Ok         server replies this line (CRLF added)

:class:`Peer` plays the I/O layer: it answers every event with its proposed reply (or with what
an ``answer`` callback returns instead), checks that the connection is PAUSED until it does, and
collects message content. :func:`dialog` runs a transcript whole, one byte at a time, or whole
with a trailing NOOP pipelined behind it, and then checks EOF handling.
"""

from __future__ import annotations

import codecs
import difflib
import textwrap
from collections.abc import Callable

import attrs

from katerchen.protocol import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    Event,
    Hello,
    MailFrom,
    Quit,
    Reply,
    Reset,
    ServerConnection,
    ServerSettings,
)

SETTINGS = ServerSettings(hostname="mx.test", max_message_size=1000, max_recipients=3)
MODES = ("whole", "bytewise", "pipelined")

#: The EHLO exchange most dialogs start with.
EHLO = """
    c: EHLO client.test
    s: 250-mx.test Hello client.test
    s: 250-SIZE 1000
    s: 250-8BITMIME
    s: 250-PIPELINING
    s: 250-CHUNKING
    s: 250-BINARYMIME
    s: 250-ENHANCEDSTATUSCODES
    s: 250 SMTPUTF8
"""

#: EHLO, MAIL and one RCPT, ready for DATA or BDAT.
TRANSACTION = (
    EHLO
    + """
    c: MAIL FROM:<sender@client.test>
    s: 250 2.1.0 Ok
    c: RCPT TO:<rcpt@mx.test>
    s: 250 2.1.5 Ok
"""
)

Answer = Callable[[Event], Reply | None]


@attrs.frozen
class Message:
    data: bytes
    end: DataEnd


@attrs.define
class Peer:
    """The I/O layer, in memory."""

    conn: ServerConnection
    answer: Answer | None = None
    out: bytearray = attrs.Factory(bytearray)
    events: list[Event] = attrs.Factory(list)
    messages: list[Message] = attrs.Factory(list)
    closed: bool = False
    _data: bytearray = attrs.Factory(bytearray)

    @classmethod
    def start(cls, settings: ServerSettings = SETTINGS, answer: Answer | None = None) -> Peer:
        return cls(ServerConnection(settings), answer)

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.drain()

    def drain(self) -> None:
        while not self.closed:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            assert event is not PAUSED, "the peer answers every event"
            assert not isinstance(event, type(NEED_DATA))
            self.events.append(event)
            if isinstance(event, ConnectionClosed):
                self.closed = True
                return
            if isinstance(event, DataChunk):
                assert event.data, "no empty chunks"
                self._data += event.data
                continue
            if isinstance(event, DataEnd):
                self.messages.append(Message(bytes(self._data), event))
            if isinstance(event, (DataEnd, Hello, MailFrom, Reset, Quit)):
                self._data.clear()  # a BDAT transaction with data is abandoned
            assert self.conn.next_event() is PAUSED
            reply = (self.answer(event) if self.answer else None) or event.reply
            self.out += self.conn.send(reply)

    @property
    def replies(self) -> list[str]:
        return self.out.decode("utf-8").split("\r\n")[:-1]


def parse(transcript: str) -> tuple[bytes, list[str]]:
    """The client's bytes and the server's reply lines of a transcript."""
    client = bytearray()
    server: list[str] = []
    for raw in textwrap.dedent(transcript).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tag, text = line[:2], line[3:]
        if tag == "c:":
            client += text.encode("utf-8") + b"\r\n"
        elif tag == "c~":
            client += codecs.escape_decode(text.encode("utf-8"))[0]
        elif tag == "s:":
            server.append(text)
        else:
            raise ValueError(f"bad transcript line: {raw!r}")
    return bytes(client), server


def feed(mode: str, client: bytes, settings: ServerSettings, answer: Answer | None) -> Peer:
    peer = Peer.start(settings, answer)
    if mode == "bytewise":
        for index in range(len(client)):
            peer.feed(client[index : index + 1])
    else:
        peer.feed(client)
    return peer


def _check_replies(peer: Peer, expected: list[str]) -> None:
    # This module is not a test module, so pytest does not rewrite its asserts: say it here.
    got = peer.replies
    if got != expected:
        diff = "\n".join(difflib.unified_diff(expected, got, "expected", "got", lineterm=""))
        raise AssertionError(f"the server said something else:\n{diff}")


def dialog(
    mode: str,
    transcript: str,
    *,
    settings: ServerSettings = SETTINGS,
    answer: Answer | None = None,
) -> Peer:
    """Run ``transcript`` fed as ``mode`` says; assert the server said exactly its lines."""
    client, expected = parse(transcript)
    if mode == "pipelined":
        # A command pipelined right behind the whole dialog is answered after it, unless the
        # dialog closed the connection, in which case it is never even looked at.
        peer = feed("whole", client + b"NOOP\r\n", settings, answer)
        if not peer.closed:
            expected = [*expected, "250 2.0.0 Ok"]
    else:
        peer = feed(mode, client, settings, answer)
    _check_replies(peer, expected)
    if not peer.closed:
        peer.feed(b"")
        assert peer.closed
        _check_replies(peer, expected)
    assert isinstance(peer.events[-1], ConnectionClosed)
    return peer
