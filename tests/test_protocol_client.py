"""The sans-IO client side, paired in memory with katerchen's own ServerConnection, and against
scripted peers for what katerchen's server never says (no EHLO, garbled replies, a 421...).

Paired tests run two ways (the ``mode`` fixture): bytes handed over whole, and one byte at a
time in both directions.
"""

from __future__ import annotations

import ast
import base64
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from katerchen.protocol import (
    NEED_DATA,
    PAUSED,
    Authenticated,
    AuthRequest,
    ClientConnection,
    ClientEvent,
    Closed,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    Event,
    Extensions,
    Hello,
    LocalProtocolError,
    MailFrom,
    RcptTo,
    Ready,
    Refused,
    Reply,
    Sentinel,
    ServerConnection,
    ServerSettings,
    TlsReady,
    Transaction,
    TransactionResult,
    replies,
)

MODES = ("whole", "bytewise")
SETTINGS = ServerSettings(
    hostname="mx.test",
    max_message_size=10_000,
    max_recipients=5,
    starttls=True,
    auth_mechanisms=("PLAIN", "LOGIN"),
)
BODY = b"From: a@client.test\r\nSubject: hi\r\n\r\nHello.\r\n"
USERS = {"user@mx.test": "secret"}


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- a katerchen server in memory ------------------------------------------------------------


@attrs.define
class Server:
    """The I/O layer of a katerchen server, in memory.

    Recipients whose local part is in ``refuse`` get 550 5.1.1, in ``defer`` 451 4.3.0; EHLO
    lines whose keyword is in ``drop`` are not advertised; AUTH checks ``USERS``.
    """

    conn: ServerConnection
    refuse: frozenset[str] = frozenset()
    defer: frozenset[str] = frozenset()
    drop: frozenset[str] = frozenset()
    refuse_ehlo: bool = False
    size_line: str | None = None
    data_reply: Reply | None = None
    out: bytearray = attrs.Factory(bytearray)
    received: bytearray = attrs.Factory(bytearray)
    events: list[Event] = attrs.Factory(list)
    messages: list[bytes] = attrs.Factory(list)
    closed: bool = False
    _data: bytearray = attrs.Factory(bytearray)

    def feed(self, data: bytes) -> None:
        self.received += data
        self.conn.receive_data(data)
        self.drain()

    def drain(self) -> None:
        while not self.closed:
            event = self.conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            assert not isinstance(event, Sentinel)
            self.events.append(event)
            if isinstance(event, ConnectionClosed):
                self.closed = True
                return
            if isinstance(event, DataChunk):
                self._data += event.data
                continue
            if isinstance(event, (Hello, MailFrom)):
                self._data.clear()
            self.out += self.conn.send(self.answer(event))

    def answer(self, event: Event) -> Reply:
        assert not isinstance(event, (DataChunk, ConnectionClosed))
        if isinstance(event, Hello) and event.extended:
            if self.refuse_ehlo:
                return replies.UNKNOWN_COMMAND
            lines = [line for line in event.reply.lines if line.split(" ")[0] not in self.drop]
            if self.size_line is not None:
                lines = [self.size_line if line.startswith("SIZE") else line for line in lines]
            return attrs.evolve(event.reply, text=tuple(lines))
        if isinstance(event, RcptTo):
            if event.forward_path.local_part in self.refuse:
                return replies.UNKNOWN_MAILBOX
            if event.forward_path.local_part in self.defer:
                return Reply(451, "4.3.0", "try again later")
        if isinstance(event, DataEnd):
            data = bytes(self._data)
            self._data.clear()
            if event.accepted and self.data_reply is None:
                self.messages.append(data)
            return self.data_reply or event.reply
        if isinstance(event, AuthRequest) and USERS.get(event.username) != event.password:
            return replies.AUTH_FAILED
        return event.reply

    @property
    def mails(self) -> list[MailFrom]:
        return [event for event in self.events if isinstance(event, MailFrom)]

    @property
    def recipients(self) -> list[str]:
        return [str(event.forward_path) for event in self.events if isinstance(event, RcptTo)]


@attrs.define
class Link:
    """A ClientConnection wired to a Server, driven as the relayer drives it."""

    client: ClientConnection
    server: Server
    bytewise: bool = False
    writes: list[bytes] = attrs.Factory(list)
    _delivered: int = 0

    @classmethod
    def open(
        cls,
        mode: str = "whole",
        *,
        settings: ServerSettings = SETTINGS,
        chunk_size: int = 1 << 20,
        **options: object,
    ) -> tuple[Link, ClientEvent]:
        server = Server(ServerConnection(settings), **options)  # type: ignore[arg-type]
        server.out += server.conn.send(server.conn.greeting())
        link = cls(
            ClientConnection("client.test", chunk_size=chunk_size), server, mode == "bytewise"
        )
        return link, link.exchange()

    def exchange(self) -> ClientEvent:
        """The relay loop: run until the operation in progress ends."""
        while True:
            event = self.client.next_event()
            out = self.client.bytes_to_send()
            if out:
                self.writes.append(out)
                self._hand(out, self.server.feed)
            if event is not NEED_DATA:
                assert not isinstance(event, Sentinel), "exchange() without an operation"
                assert self.client.bytes_to_send() == b""
                return event
            data = bytes(self.server.out[self._delivered :])
            self._delivered = len(self.server.out)
            if data:
                self._hand(data, self.client.receive_data)
            else:
                assert self.server.closed, "deadlock: both sides wait for the other"
                self.client.receive_data(b"")

    def _hand(self, data: bytes, to: object) -> None:
        assert callable(to)
        if self.bytewise:
            for index in range(len(data)):
                to(data[index : index + 1])
        else:
            to(data)

    def send(self, transaction: Transaction) -> TransactionResult:
        self.client.start_transaction(transaction)
        result = self.exchange()
        assert isinstance(result, TransactionResult)
        return result

    def handshake(self) -> None:
        """What the relayer and the receiver do around the TLS handshake."""
        self.server.conn.tls_started()
        self.client.tls_started()


def codes(result: TransactionResult) -> list[str]:
    return [f"{reply.code} {reply.enhanced}" for reply in result.results]


def tx(*recipients: str, body: bytes = BODY, **options: bool) -> Transaction:
    return Transaction("sender@client.test", recipients or ("rcpt@mx.test",), body, **options)


# --- a scripted peer -------------------------------------------------------------------------


@attrs.define
class Script:
    """A peer whose replies the test writes line by line."""

    client: ClientConnection = attrs.Factory(lambda: ClientConnection("client.test"))
    events: list[ClientEvent] = attrs.Factory(list)
    bytewise: bool = False

    def say(self, *lines: str, raw: bytes = b"") -> None:
        data = "".join(line + "\r\n" for line in lines).encode() + raw
        if self.bytewise:
            for index in range(len(data)):
                self.client.receive_data(data[index : index + 1])
        else:
            self.client.receive_data(data)
        self.pump()

    def pump(self) -> None:
        while True:
            event = self.client.next_event()
            if isinstance(event, Sentinel):
                return
            self.events.append(event)

    def heard(self) -> list[str]:
        data = self.client.bytes_to_send()
        assert data.endswith(b"\r\n") or not data
        return data.decode("utf-8").split("\r\n")[:-1]

    def event(self) -> ClientEvent:
        self.pump()  # an operation may end at once (a local refusal, a closed session)
        assert len(self.events) == 1, self.events
        return self.events.pop()

    def ready(self, *extensions: str) -> Script:
        self.say("220 mx.test ESMTP")
        assert self.heard() == ["EHLO client.test"]
        lines = ["mx.test", *extensions]
        self.say(*(f"250{'-' if i < len(lines) - 1 else ' '}{t}" for i, t in enumerate(lines)))
        assert isinstance(self.event(), Ready)
        return self


# --- the package stays sans-IO -----------------------------------------------------------------

FORBIDDEN = {"trio", "socket", "ssl", "os", "time", "asyncio", "selectors", "email", "subprocess"}


def test_client_module_imports_no_io_modules() -> None:
    # os and time are loaded by every interpreter, so sys.modules cannot tell: read the source.
    source = Path(__file__).parent.parent / "katerchen" / "protocol" / "client.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported & FORBIDDEN == set()
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import katerchen.protocol.client\n"
        "new = set(sys.modules) - before\n"
        f"print(sorted(m for m in new if m.split('.')[0] in {sorted(FORBIDDEN)!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


# --- transactions with katerchen's server ------------------------------------------------------


def test_simple_transaction(mode: str) -> None:
    link, ready = Link.open(mode)
    assert isinstance(ready, Ready)
    ext = ready.extensions
    assert ext is link.client.extensions
    assert (ext.size, ext.pipelining, ext.chunking, ext.eight_bit_mime) == (
        10_000,
        True,
        True,
        True,
    )
    assert ext.starttls and ext.smtputf8 and ext.enhanced_status_codes and ext.binarymime
    assert ext.auth == frozenset()  # offered only after TLS
    assert link.client.greeting == Reply(220, None, "mx.test ESMTP katerchen")
    link.writes.clear()

    result = link.send(tx("rcpt@mx.test"))
    assert codes(result) == ["250 2.0.0"]
    assert result.mail_reply == replies.SENDER_OK
    assert result.rcpt_replies == (replies.RECIPIENT_OK,)
    assert result.data_reply == replies.MESSAGE_OK
    assert not result.local
    assert link.server.messages == [BODY]
    # PIPELINING and CHUNKING: the whole transaction is one write, one round trip.
    assert link.writes == [
        b"MAIL FROM:<sender@client.test> SIZE=%d\r\nRCPT TO:<rcpt@mx.test>\r\n"
        b"BDAT %d LAST\r\n" % (len(BODY), len(BODY)) + BODY
    ]
    (mail,) = link.server.mails
    assert (mail.size, mail.body, mail.smtputf8) == (len(BODY), None, False)

    link.client.quit()
    assert link.exchange() == Closed(replies.BYE)
    assert link.client.closed
    assert link.client.closing_reply == replies.BYE


def test_null_sender_and_reuse_with_rset(mode: str) -> None:
    link, _ = Link.open(mode)
    first = Transaction("", ["a@mx.test"], BODY)
    assert codes(link.send(first)) == ["250 2.0.0"]
    link.writes.clear()
    assert codes(link.send(tx("b@mx.test", "c@mx.test"))) == ["250 2.0.0", "250 2.0.0"]
    # RSET goes first on a reused session, in the same pipelined write.
    assert len(link.writes) == 1
    assert link.writes[0].startswith(b"RSET\r\nMAIL FROM:<sender@client.test>")
    assert link.server.mails[0].reverse_path is None
    assert link.server.messages == [BODY, BODY]
    assert link.server.recipients == ["a@mx.test", "b@mx.test", "c@mx.test"]


def test_pipelined_recipients_one_refused(mode: str) -> None:
    link, _ = Link.open(mode, drop=frozenset({"CHUNKING"}), refuse=frozenset({"nobody"}))
    link.writes.clear()
    result = link.send(tx("a@mx.test", "nobody@mx.test", "b@mx.test"))
    assert codes(result) == ["250 2.0.0", "550 5.1.1", "250 2.0.0"]
    assert result.rcpt_replies[1] == replies.UNKNOWN_MAILBOX
    assert link.server.messages == [BODY]
    assert link.server.recipients == ["a@mx.test", "nobody@mx.test", "b@mx.test"]
    # MAIL, every RCPT and DATA in one write; the content after the 354.
    assert link.writes == [
        b"MAIL FROM:<sender@client.test> SIZE=%d\r\n" % len(BODY)
        + b"RCPT TO:<a@mx.test>\r\nRCPT TO:<nobody@mx.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n",
        BODY + b".\r\n",
    ]


def test_deferred_and_refused_recipients_are_told_apart(mode: str) -> None:
    link, _ = Link.open(mode, refuse=frozenset({"gone"}), defer=frozenset({"later"}))
    result = link.send(tx("gone@mx.test", "later@mx.test", "ok@mx.test"))
    assert codes(result) == ["550 5.1.1", "451 4.3.0", "250 2.0.0"]


def test_all_recipients_refused_pipelined_data(mode: str) -> None:
    link, _ = Link.open(mode, drop=frozenset({"CHUNKING"}), refuse=frozenset({"x", "y"}))
    link.writes.clear()
    result = link.send(tx("x@mx.test", "y@mx.test"))
    assert codes(result) == ["550 5.1.1", "550 5.1.1"]
    assert result.data_reply == replies.NEED_RCPT  # the pipelined DATA was refused
    assert len(link.writes) == 1  # no content was sent
    assert link.server.messages == []
    # The session goes on: the next transaction starts with RSET.
    link.writes.clear()
    assert codes(link.send(tx("z@mx.test"))) == ["250 2.0.0"]
    assert link.writes[0].startswith(b"RSET\r\nMAIL ")
    assert link.server.messages == [BODY]


def test_all_recipients_refused_bdat_pipelined(mode: str) -> None:
    link, _ = Link.open(mode, refuse=frozenset({"x"}))
    result = link.send(tx("x@mx.test"))
    assert codes(result) == ["550 5.1.1"]
    assert result.data_reply == replies.NEED_RCPT
    assert link.server.messages == []
    assert codes(link.send(tx("z@mx.test"))) == ["250 2.0.0"]


def test_without_pipelining_one_command_at_a_time(mode: str) -> None:
    link, _ = Link.open(
        mode, drop=frozenset({"PIPELINING", "CHUNKING"}), refuse=frozenset({"nobody"})
    )
    link.writes.clear()
    result = link.send(tx("a@mx.test", "nobody@mx.test"))
    assert codes(result) == ["250 2.0.0", "550 5.1.1"]
    assert link.writes == [
        b"MAIL FROM:<sender@client.test> SIZE=%d\r\n" % len(BODY),
        b"RCPT TO:<a@mx.test>\r\n",
        b"RCPT TO:<nobody@mx.test>\r\n",
        b"DATA\r\n",
        BODY + b".\r\n",
    ]


def test_all_refused_without_pipelining_sends_no_data(mode: str) -> None:
    link, _ = Link.open(mode, drop=frozenset({"PIPELINING"}), refuse=frozenset({"x"}))
    link.writes.clear()
    result = link.send(tx("x@mx.test"))
    assert codes(result) == ["550 5.1.1"]
    assert result.data_reply is None
    assert link.writes == [b"MAIL FROM:<sender@client.test> SIZE=%d\r\n" % len(BODY),
                           b"RCPT TO:<x@mx.test>\r\n"]  # fmt: skip
    link.writes.clear()
    assert codes(link.send(tx("y@mx.test"))) == ["250 2.0.0"]
    assert link.writes[:2] == [
        b"RSET\r\n",
        b"MAIL FROM:<sender@client.test> SIZE=%d\r\n" % len(BODY),
    ]


@pytest.mark.parametrize("pipelining", [True, False])
def test_refused_mail_fails_every_recipient(mode: str, pipelining: bool) -> None:
    # The server advertises more than it takes, so it refuses SIZE= at MAIL.
    settings = attrs.evolve(SETTINGS, max_message_size=20)
    drop = frozenset() if pipelining else frozenset({"PIPELINING"})
    link, _ = Link.open(mode, settings=settings, drop=drop, size_line="SIZE 100000")
    link.writes.clear()
    result = link.send(tx("a@mx.test", "b@mx.test"))
    assert codes(result) == ["552 5.3.4", "552 5.3.4"]
    assert result.mail_reply == replies.MESSAGE_TOO_BIG
    assert link.server.messages == []
    if pipelining:  # the pipelined RCPTs and BDAT were answered, and ignored
        assert result.rcpt_replies == (replies.NEED_MAIL, replies.NEED_MAIL)
        assert len(link.writes) == 1
    else:  # no RCPT follows a refused MAIL
        assert result.rcpt_replies == (None, None)
        assert result.data_reply is None
        assert link.writes == [b"MAIL FROM:<sender@client.test> SIZE=%d\r\n" % len(BODY)]
    assert codes(link.send(tx(body=b"small\r\n"))) == ["250 2.0.0"]


def test_too_big_without_size_is_refused_at_the_end(mode: str) -> None:
    settings = attrs.evolve(SETTINGS, max_message_size=20)
    link, _ = Link.open(mode, settings=settings, drop=frozenset({"SIZE", "CHUNKING"}))
    link.writes.clear()
    result = link.send(tx("a@mx.test", "b@mx.test"))
    assert codes(result) == ["552 5.3.4", "552 5.3.4"]
    assert result.data_reply == replies.MESSAGE_TOO_BIG
    assert link.writes[0].startswith(b"MAIL FROM:<sender@client.test>\r\n")  # no SIZE=


def test_refused_mail_scripted() -> None:
    script = Script().ready("8BITMIME")
    script.client.start_transaction(tx("a@mx.test", "b@mx.test"))
    assert script.heard() == ["MAIL FROM:<sender@client.test>"]
    script.say("550 5.7.1 sender rejected")
    assert script.heard() == []
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert codes(result) == ["550 5.7.1", "550 5.7.1"]
    assert result.rcpt_replies == (None, None)
    assert result.data_reply is None


def test_refused_mail_pipelined_lone_dot() -> None:
    """RFC 2920 3.1: a 354 that comes although nothing was accepted gets only "."."""
    script = Script().ready("PIPELINING")
    script.client.start_transaction(tx("a@mx.test"))
    assert script.heard() == ["MAIL FROM:<sender@client.test>", "RCPT TO:<a@mx.test>", "DATA"]
    script.say("451 4.3.0 not now", "503 5.5.1 need MAIL", "354 go ahead")
    assert script.heard() == ["."]
    assert script.events == []
    script.say("554 5.5.1 no valid recipients")
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert codes(result) == ["451 4.3.0"]
    assert result.data_reply is None


# --- BDAT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_bdat_in_chunks(mode: str, pipelining: bool) -> None:
    drop = frozenset() if pipelining else frozenset({"PIPELINING"})
    link, _ = Link.open(mode, chunk_size=10, drop=drop)
    body = b"Subject: chunks\r\n\r\n" + b"0123456789" * 3 + b"\r\n.\r\n"
    link.writes.clear()
    assert codes(link.send(tx(body=body))) == ["250 2.0.0"]
    assert link.server.messages == [body]
    wire = b"".join(link.writes)
    chunks = [body[i : i + 10] for i in range(0, len(body), 10)]
    expected = b"".join(
        (b"BDAT %d LAST\r\n" if i == len(chunks) - 1 else b"BDAT %d\r\n") % len(c) + c
        for i, c in enumerate(chunks)
    )
    assert wire.endswith(expected)
    if pipelining:  # the envelope, then every chunk in one write
        assert len(link.writes) == 2
    else:  # MAIL, RCPT, then each chunk waiting for its reply
        assert len(link.writes) == 2 + len(chunks)


def test_bdat_exact_multiple_and_empty(mode: str) -> None:
    link, _ = Link.open(mode, chunk_size=8)
    body = b"abcdef\r\n" * 2
    assert codes(link.send(tx(body=body))) == ["250 2.0.0"]
    assert link.writes[-1].endswith(b"BDAT 8\r\nabcdef\r\nBDAT 8 LAST\r\nabcdef\r\n")
    assert codes(link.send(tx(body=b""))) == ["250 2.0.0"]
    assert link.writes[-1].endswith(b"BDAT 0 LAST\r\n")
    assert link.server.messages == [body, b""]


def test_refused_bdat_chunk_ends_the_transaction() -> None:
    script = Script(client=ClientConnection("client.test", chunk_size=4)).ready("CHUNKING")
    script.client.start_transaction(tx(body=b"12345678\r\n"))
    script.heard()
    script.say("250 2.1.0 ok")
    script.heard()
    script.say("250 2.1.5 ok")
    assert script.client.bytes_to_send() == b"BDAT 4\r\n1234"
    script.say("552 5.3.4 too big")
    assert script.heard() == []  # no further chunk
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert codes(result) == ["552 5.3.4"]


# --- DATA content ---------------------------------------------------------------------------


def test_dot_stuffing_round_trip(mode: str) -> None:
    link, _ = Link.open(mode, drop=frozenset({"CHUNKING"}))
    body = b".leading dot\r\n..two dots\r\n.\r\nmiddle\r\n.\r\n\r\n.end without CRLF"
    link.writes.clear()
    assert codes(link.send(tx(body=body))) == ["250 2.0.0"]
    assert link.server.messages == [body + b"\r\n"]
    assert link.writes[1] == (
        b"..leading dot\r\n...two dots\r\n..\r\nmiddle\r\n..\r\n\r\n..end without CRLF\r\n.\r\n"
    )


def test_data_bare_lf_and_empty_message(mode: str) -> None:
    link, _ = Link.open(mode, drop=frozenset({"CHUNKING"}))
    assert codes(link.send(tx(body=b"a\nb\r\n.c\nd"))) == ["250 2.0.0"]
    assert codes(link.send(tx(body=b""))) == ["250 2.0.0"]
    assert link.server.messages == [b"a\r\nb\r\n.c\r\nd\r\n", b""]
    assert link.writes[-1] == b".\r\n"


def test_data_refused_at_the_end(mode: str) -> None:
    link, _ = Link.open(mode, data_reply=Reply(554, "5.7.1", "spam"))
    result = link.send(tx("a@mx.test", "b@mx.test"))
    assert codes(result) == ["554 5.7.1", "554 5.7.1"]
    assert result.rcpt_replies == (replies.RECIPIENT_OK, replies.RECIPIENT_OK)


# --- MAIL parameters ------------------------------------------------------------------------


def test_size_over_the_peers_limit_is_refused_locally(mode: str) -> None:
    link, _ = Link.open(mode)
    link.writes.clear()
    result = link.send(tx("a@mx.test", "b@mx.test", body=b"x" * 10_001))
    assert result.local
    assert codes(result) == ["552 5.3.4", "552 5.3.4"]
    assert result.results[0].text == "The message is larger than the peer's limit of 10000 octets"
    assert (result.mail_reply, result.rcpt_replies, result.data_reply) == (None, (None, None), None)
    assert link.writes == []
    # The session is still usable.
    assert codes(link.send(tx())) == ["250 2.0.0"]


def test_size_without_a_limit() -> None:
    script = Script().ready("SIZE")
    assert script.client.extensions == Extensions({"SIZE": ""})
    assert script.client.extensions.size == 0
    script.client.start_transaction(tx(body=b"x" * 100_000))
    assert script.heard()[0] == "MAIL FROM:<sender@client.test> SIZE=100002"


def test_8bitmime(mode: str) -> None:
    link, _ = Link.open(mode)
    body = "Subject: hi\r\n\r\nGrüße\r\n".encode()
    assert codes(link.send(tx(body=body))) == ["250 2.0.0"]
    assert link.server.mails[-1].body == "8BITMIME"
    assert b"BODY=8BITMIME" in link.writes[-1]
    assert link.server.messages == [body]
    assert codes(link.send(tx())) == ["250 2.0.0"]
    assert link.server.mails[-1].body is None


def test_8bit_body_to_a_peer_without_8bitmime_is_refused_locally(mode: str) -> None:
    link, _ = Link.open(mode, drop=frozenset({"8BITMIME"}))
    result = link.send(tx(body=b"Subject: x\r\n\r\n\xff\r\n"))
    assert result.local
    assert codes(result) == ["554 5.6.3"]


def test_smtputf8(mode: str) -> None:
    link, _ = Link.open(mode)
    result = link.send(Transaction("sender@client.test", ["jörg@mx.test"], BODY))
    assert codes(result) == ["250 2.0.0"]
    mail = link.server.mails[-1]
    assert mail.smtputf8 and mail.body is None
    assert link.server.recipients == ["jörg@mx.test"]
    # Received with SMTPUTF8 and a UTF-8 header: the parameter (and BODY=8BITMIME) go along.
    utf8_header = "Subject: Grüße\r\n\r\nhi\r\n".encode()
    assert codes(link.send(tx(body=utf8_header, smtputf8=True))) == ["250 2.0.0"]
    mail = link.server.mails[-1]
    assert mail.smtputf8 and mail.body == "8BITMIME"
    # Received with SMTPUTF8 but nothing needs it: not sent (RFC 6531 3.2).
    assert codes(link.send(tx(smtputf8=True))) == ["250 2.0.0"]
    assert not link.server.mails[-1].smtputf8


def test_smtputf8_missing_at_the_peer(mode: str) -> None:
    link, _ = Link.open(mode, drop=frozenset({"SMTPUTF8"}))
    result = link.send(Transaction("sender@client.test", ["jörg@mx.test", "a@mx.test"], BODY))
    assert result.local
    assert codes(result) == ["553 5.6.7", "553 5.6.7"]
    utf8_header = "Subject: Grüße\r\n\r\nhi\r\n".encode()
    result = link.send(tx(body=utf8_header, smtputf8=True))
    assert result.local
    assert codes(result) == ["554 5.6.9"]
    # Received with SMTPUTF8, but an ASCII header and ASCII paths: sent without it.
    assert codes(link.send(tx(smtputf8=True, body=b"Subject: x\r\n\r\n\xc3\xa9\r\n"))) == [
        "250 2.0.0"
    ]


def test_binarymime(mode: str) -> None:
    link, _ = Link.open(mode)
    body = b"Content-Type: application/octet-stream\r\n\r\n\x00\xff\n\r.\r\n."
    assert codes(link.send(tx(body=body, binarymime=True))) == ["250 2.0.0"]
    assert link.server.mails[-1].body == "BINARYMIME"
    assert link.server.messages == [body]  # byte-exact: no normalizing, no CRLF added
    link, _ = Link.open(mode, drop=frozenset({"CHUNKING"}))
    result = link.send(tx(body=body, binarymime=True))
    assert result.local
    assert codes(result) == ["554 5.6.3"]


# --- session opening ---------------------------------------------------------------------------


def test_helo_fallback_paired(mode: str) -> None:
    link, ready = Link.open(mode, refuse_ehlo=True)
    assert isinstance(ready, Ready)
    assert ready.reply == Reply(250, None, "mx.test Hello client.test")
    assert ready.extensions == Extensions()
    assert not link.server.conn.extended
    link.writes.clear()
    # No extensions: no parameters, one command at a time, DATA.
    assert codes(link.send(tx())) == ["250 2.0.0"]
    assert link.writes[:2] == [b"MAIL FROM:<sender@client.test>\r\n", b"RCPT TO:<rcpt@mx.test>\r\n"]
    assert link.server.messages == [BODY]


@pytest.mark.parametrize("refusal", ["502 5.5.1 Error: command not implemented", "500 what?"])
def test_helo_fallback_scripted(refusal: str) -> None:
    script = Script()
    assert script.client.waiting_for == "greeting"
    script.say("220-mx.test ESMTP", "220 second greeting line")
    assert script.heard() == ["EHLO client.test"]
    assert script.client.waiting_for == "EHLO"
    script.say(refusal)
    assert script.heard() == ["HELO client.test"]
    assert script.client.waiting_for == "HELO"
    script.say("250 mx.test")
    event = script.event()
    assert event == Ready(Reply(250, None, "mx.test"), Extensions())
    assert script.client.waiting_for is None
    assert script.client.greeting == Reply(220, None, ("mx.test ESMTP", "second greeting line"))
    # An 8-bit message cannot go to a HELO-only peer.
    script.client.start_transaction(tx(body=b"\xff"))
    result = script.event()
    assert isinstance(result, TransactionResult) and result.local


def test_ehlo_temporary_failure_refuses_the_session() -> None:
    script = Script()
    script.say("220 mx.test")
    script.heard()
    script.say("451 4.3.0 try later")
    assert script.event() == Refused("EHLO", Reply(451, "4.3.0", "try later"))
    assert script.heard() == []
    assert not script.client.closed
    with pytest.raises(LocalProtocolError):
        script.client.start_transaction(tx())
    script.client.quit()
    assert script.heard() == ["QUIT"]
    script.say("221 2.0.0 bye")
    assert script.event() == Closed(Reply(221, "2.0.0", "bye", close=True))


def test_helo_refused() -> None:
    script = Script()
    script.say("220 mx.test")
    script.heard()
    script.say("500 no EHLO")
    assert script.heard() == ["HELO client.test"]
    script.say("550 5.7.1 go away")
    assert script.event() == Refused("HELO", Reply(550, "5.7.1", "go away"))


def test_greeting_refused() -> None:
    script = Script()
    script.say("554 5.7.1 no service for you")
    assert script.event() == Refused("greeting", Reply(554, "5.7.1", "no service for you"))
    assert script.heard() == []
    script.client.quit()
    assert script.heard() == ["QUIT"]


def test_greeting_421_closes() -> None:
    script = Script()
    script.say("421 4.3.2 busy")
    busy = Reply(421, "4.3.2", "busy", close=True)
    assert script.event() == Refused("greeting", busy)
    assert script.client.closed
    script.client.quit()  # nothing to say to a closed session: ends at once
    assert script.heard() == []
    script.pump()
    assert script.event() == Closed(busy)


# --- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_paired_then_auth(mode: str) -> None:
    link, ready = Link.open(mode)
    assert isinstance(ready, Ready) and ready.extensions.starttls
    link.client.starttls()
    assert link.client.waiting_for == "STARTTLS"
    event = link.exchange()
    assert event == TlsReady(replies.READY_FOR_TLS)
    assert link.client.next_event() is PAUSED
    link.handshake()
    assert link.client.extensions is None  # forgotten until the new EHLO is answered
    ready = link.exchange()
    assert isinstance(ready, Ready)
    assert link.client.tls and link.server.conn.tls
    assert not ready.extensions.starttls
    assert ready.extensions.auth == {"PLAIN", "LOGIN"}
    with pytest.raises(LocalProtocolError):
        link.client.starttls()

    link.client.auth("user@mx.test", "wrong")
    assert link.exchange() == Refused("AUTH", replies.AUTH_FAILED)
    assert not link.client.authenticated
    link.client.auth("user@mx.test", "secret")
    assert link.exchange() == Authenticated(replies.AUTH_SUCCEEDED)
    assert link.client.authenticated
    assert link.server.conn.authenticated == "user@mx.test"
    assert codes(link.send(tx())) == ["250 2.0.0"]


@pytest.mark.parametrize(
    ("mechanisms", "password"),
    [(("LOGIN",), "secret"), (("PLAIN",), "secret"), (("PLAIN",), "s" * 600)],
)
def test_auth_mechanisms_paired(mode: str, mechanisms: tuple[str, ...], password: str) -> None:
    USERS["long@mx.test"] = "s" * 600
    user = "user@mx.test" if password == "secret" else "long@mx.test"
    link, _ = Link.open(mode)
    link.client.starttls()
    link.exchange()
    link.handshake()
    link.exchange()
    link.writes.clear()
    link.client.auth(user, password, mechanisms=mechanisms)
    assert link.exchange() == Authenticated(replies.AUTH_SUCCEEDED)
    request = next(e for e in link.server.events if isinstance(e, AuthRequest))
    assert (request.mechanism, request.username) == (mechanisms[0], user)
    if len(password) > 100:  # no initial response: the command would be over 512 octets
        assert link.writes[0] == b"AUTH PLAIN\r\n"


def test_starttls_scripted_discards_injected_plaintext() -> None:
    script = Script().ready("STARTTLS", "PIPELINING")
    old = script.client.extensions
    script.client.starttls()
    assert script.heard() == ["STARTTLS"]
    # A man in the middle appends a forged EHLO reply to the 220, in the clear.
    script.say("220 2.0.0 Ready to start TLS", "250-evil", "250 AUTH PLAIN")
    assert script.event() == TlsReady(Reply(220, "2.0.0", "Ready to start TLS"))
    assert script.client.extensions == old
    assert script.client.next_event() is PAUSED
    script.client.tls_started()
    assert script.heard() == ["EHLO client.test"]
    assert script.client.extensions is None
    script.pump()
    assert script.events == []  # the forged reply is gone
    script.say("250-mx.test", "250 AUTH LOGIN")
    ready = script.event()
    assert isinstance(ready, Ready)
    assert ready.extensions.auth == {"LOGIN"}
    assert not ready.extensions.pipelining
    assert script.client.tls


def test_starttls_refused_keeps_the_session() -> None:
    script = Script().ready("STARTTLS")
    script.client.starttls()
    script.heard()
    script.say("454 4.7.0 TLS not available")
    assert script.event() == Refused("STARTTLS", Reply(454, "4.7.0", "TLS not available"))
    assert not script.client.tls
    with pytest.raises(LocalProtocolError):
        script.client.tls_started()
    script.client.start_transaction(tx())
    assert script.heard()[0] == "MAIL FROM:<sender@client.test>"


# --- AUTH, scripted -----------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auth_plain_scripted() -> None:
    script = Script().ready("AUTH PLAIN LOGIN")
    script.client.auth("user", "pw")
    assert script.heard() == ["AUTH PLAIN " + b64("\0user\0pw")]
    assert script.client.waiting_for == "AUTH"
    script.say("235 2.7.0 Authentication successful")
    assert script.event() == Authenticated(Reply(235, "2.7.0", "Authentication successful"))
    with pytest.raises(LocalProtocolError):
        script.client.auth("user", "pw")


def test_auth_plain_failure_scripted() -> None:
    script = Script().ready("AUTH PLAIN")
    script.client.auth("user", "pw")
    script.heard()
    script.say("535 5.7.8 Authentication credentials invalid")
    assert script.event() == Refused(
        "AUTH", Reply(535, "5.7.8", "Authentication credentials invalid")
    )
    assert not script.client.authenticated
    script.client.start_transaction(tx())  # the session goes on
    assert script.heard()


def test_auth_login_scripted() -> None:
    script = Script().ready("AUTH=LOGIN")  # the pre-RFC 4954 form
    assert script.client.extensions is not None
    assert script.client.extensions.auth == {"LOGIN"}
    script.client.auth("user", "pässword")
    assert script.heard() == ["AUTH LOGIN"]
    script.say("334 VXNlcm5hbWU6")
    assert script.heard() == [b64("user")]
    script.say("334 UGFzc3dvcmQ6")
    assert script.heard() == [b64("pässword")]
    script.say("235 2.7.0 ok")
    assert isinstance(script.event(), Authenticated)
    assert script.client.authenticated


def test_auth_unexpected_challenge_is_cancelled() -> None:
    script = Script().ready("AUTH PLAIN")
    script.client.auth("user", "pw")
    script.heard()
    script.say("334 ")
    assert script.heard() == ["*"]
    script.say("501 5.0.0 cancelled")
    assert script.event() == Refused("AUTH", Reply(501, "5.0.0", "cancelled"))


def test_auth_without_a_common_mechanism() -> None:
    script = Script().ready("AUTH CRAM-MD5")
    script.client.auth("user", "pw")
    assert script.heard() == []
    event = script.event()
    assert isinstance(event, Refused) and event.command == "AUTH"
    assert (event.reply.code, event.reply.enhanced) == (454, "4.7.0")
    with pytest.raises(ValueError):
        script.client.auth("us\0er", "pw")


# --- replies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_reply_parsing(bytewise: bool) -> None:
    script = Script(bytewise=bytewise)
    script.say(raw=b"220-mx.test ESMTP\n220 hello\r\n")  # a bare LF is tolerated
    assert script.heard() == ["EHLO client.test"]
    script.say(
        "250-mx.test greets you", "250-SIZE 1000", "250-pipelining", "250-AUTH plain", "250 X"
    )
    ready = script.event()
    assert isinstance(ready, Ready)
    assert ready.extensions.keywords == {"SIZE": "1000", "PIPELINING": "", "AUTH": "plain", "X": ""}
    assert ready.extensions.auth == {"PLAIN"}
    script.client.start_transaction(tx("a@mx.test", "b@mx.test", "c@mx.test", "d@mx.test"))
    script.heard()
    long_text = "x" * 1000  # longer than RFC 5321's 512 octets: tolerated
    script.say(
        "250-2.1.0 first",
        "250 2.1.0 second",
        "250",
        "550-5.1.1 no such",
        "550-5.1.1 user",
        "550 here",
        f"451 {long_text}",
        "250 2.1.5 2.5 million ok",
        "354 go on",
    )
    assert script.heard()[-1] == "."
    script.say("250 2.0.0 queued")
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert result.mail_reply == Reply(250, "2.1.0", ("first", "second"))
    assert result.rcpt_replies == (
        Reply(250, None, ""),
        Reply(550, "5.1.1", ("no such", "user", "here")),
        Reply(451, None, long_text),
        Reply(250, "2.1.5", "2.5 million ok"),
    )
    assert [r.code for r in result.results] == [250, 550, 451, 250]


@pytest.mark.parametrize(
    "reply",
    [
        replies.SENDER_OK,
        Reply(250, "2.0.0", ("one", "two", "three")),
        replies.ehlo("mx.test", "client.test", max_message_size=10),
        Reply(550, "5.1.1", "Grüße ünd ☃"),
        replies.too_many_errors("mx.test"),
        Reply(250, "2.0.0", ""),
    ],
)
def test_server_replies_parse_back_to_themselves(reply: Reply) -> None:
    for bytewise in (False, True):
        script = Script(bytewise=bytewise).ready("PIPELINING")
        script.client.start_transaction(tx())
        script.heard()
        script.say(raw=reply.to_bytes())
        if reply.code != 421:
            script.say("550 5.1.1 no", "503 5.5.1 need RCPT")
        result = script.event()
        assert isinstance(result, TransactionResult)
        assert result.mail_reply == reply


@pytest.mark.parametrize(
    "garbage",
    [
        b"25O ok\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
        b"250-ok\r\n251 changed code\r\n",
        b"150 not an SMTP code\r\n",
        b"250+ok\r\n",
        b"2\r\n",
        b"250-" + b"x" * 9000,
        b"354 data? for MAIL?\r\n",
    ],
    ids=["letter", "http", "code-change", "1xx", "separator", "short", "too-long", "354"],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_garbled_reply_is_a_temporary_failure(garbage: bytes, bytewise: bool) -> None:
    script = Script(bytewise=bytewise).ready("PIPELINING")
    script.client.start_transaction(tx("a@mx.test", "b@mx.test"))
    script.heard()
    script.say(raw=garbage)
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert [(r.code, r.enhanced) for r in result.results] == [(421, "4.5.0")] * 2
    assert result.results[0].text.startswith("Protocol error: ")  # type: ignore[union-attr]
    assert script.client.closed
    assert script.client.closing_reply == result.results[0]
    assert script.heard() == []
    # Everything after ends at once.
    script.client.start_transaction(tx())
    after = script.event()
    assert isinstance(after, TransactionResult)
    assert after.results == (result.results[0],)


def test_garbled_greeting() -> None:
    script = Script()
    script.say(raw=b"SSH-2.0-OpenSSH_9.2\r\n")
    event = script.event()
    assert isinstance(event, Refused) and event.command == "greeting"
    assert (event.reply.code, event.reply.enhanced) == (421, "4.5.0")


# --- losing the connection ------------------------------------------------------------------


def test_421_in_the_middle_of_a_transaction() -> None:
    script = Script().ready("PIPELINING")
    script.client.start_transaction(tx("a@mx.test", "b@mx.test"))
    script.heard()
    script.say("250 2.1.0 ok", "250 2.1.5 ok", "421 4.3.2 shutting down")
    result = script.event()
    assert isinstance(result, TransactionResult)
    bye = Reply(421, "4.3.2", "shutting down", close=True)
    assert result.results == (bye, bye)
    assert result.rcpt_replies == (Reply(250, "2.1.5", "ok"), bye)
    assert script.client.closed
    assert script.heard() == []


def test_eof_before_the_end_of_data_reply() -> None:
    script = Script().ready("PIPELINING", "CHUNKING")
    script.client.start_transaction(tx("a@mx.test", "nobody@mx.test"))
    script.heard()
    script.say("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 unknown")
    assert script.client.waiting_for == "BDAT"
    script.client.receive_data(b"")
    script.pump()
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert [(r.code, r.enhanced) for r in result.results] == [(421, "4.4.2"), (550, "5.1.1")]
    assert result.data_reply is None


def test_abort_on_timeout() -> None:
    script = Script().ready()
    script.client.start_transaction(tx("a@mx.test"))
    script.heard()
    script.say("250 2.1.0 ok")
    assert script.heard() == ["RCPT TO:<a@mx.test>"]
    script.say("250 2.1.5 ok")
    assert script.heard() == ["DATA"]
    script.say("354 go")
    script.heard()
    assert script.client.waiting_for == "END"
    script.client.abort("timeout waiting for the end of data reply")
    script.pump()
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert result.results == (
        Reply(421, "4.4.2", "timeout waiting for the end of data reply", close=True),
    )
    script.client.abort("again")  # idempotent
    script.client.quit()
    script.pump()
    assert script.event() == Closed(result.results[0])


def test_eof_during_quit_and_setup() -> None:
    script = Script().ready()
    script.client.quit()
    script.heard()
    script.client.receive_data(b"")
    script.pump()
    event = script.event()
    assert isinstance(event, Closed) and event.reply.code == 421
    script = Script()
    script.client.receive_data(b"220 mx")  # no line end before EOF
    script.client.receive_data(b"")
    script.pump()
    event = script.event()
    assert isinstance(event, Refused) and event.command == "greeting"
    script = Script().ready("STARTTLS", "AUTH PLAIN")
    script.client.starttls()
    script.client.abort("handshake timeout")
    script.pump()
    assert script.event() == Refused(
        "STARTTLS", Reply(421, "4.4.2", "handshake timeout", close=True)
    )
    script.client.auth("u", "p")
    script.pump()
    event = script.event()
    assert isinstance(event, Refused) and event.command == "AUTH"


# --- misuse ------------------------------------------------------------------------------------


def test_misuse_raises() -> None:
    with pytest.raises(ValueError):
        ClientConnection("bad name")
    with pytest.raises(ValueError):
        ClientConnection("ok", chunk_size=0)
    script = Script()
    assert script.client.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        script.client.start_transaction(tx())  # before Ready
    script.ready()
    assert script.client.next_event() is PAUSED
    with pytest.raises(ValueError):
        script.client.start_transaction(Transaction("a@b", [], BODY))
    with pytest.raises(ValueError):
        script.client.start_transaction(Transaction("a@b", ["x@y\r\nRCPT TO:<z@w>"], BODY))
    script.client.start_transaction(tx())
    with pytest.raises(LocalProtocolError):
        script.client.start_transaction(tx())  # one operation at a time
    with pytest.raises(LocalProtocolError):
        script.client.quit()


def test_failed_handshake() -> None:
    """The TLS handshake after TlsReady fails: the relayer aborts, and may still call quit()."""
    script = Script().ready("STARTTLS")
    script.client.starttls()
    script.heard()
    script.say("220 2.0.0 go ahead")
    assert isinstance(script.event(), TlsReady)
    with pytest.raises(LocalProtocolError):
        script.client.quit()  # nothing can be said before the handshake
    script.client.abort("TLS handshake failed")
    script.pump()
    assert script.events == []
    assert script.client.closed
    script.client.quit()
    assert script.heard() == []
    assert script.event() == Closed(Reply(421, "4.4.2", "TLS handshake failed", close=True))


def _at(stage: str) -> Script:
    """A scripted session waiting for the reply to ``stage``."""
    script = Script()
    if stage == "greeting":
        return script
    script.say("220 mx.test")
    script.heard()
    if stage == "EHLO":
        return script
    if stage == "HELO":
        script.say("502 5.5.1 no")
        script.heard()
        return script
    script.say("250-mx.test", "250-STARTTLS", "250 AUTH LOGIN")
    script.pump()
    script.events.clear()
    client = script.client
    if stage == "STARTTLS":
        client.starttls()
    elif stage == "AUTH":
        client.auth("user", "pw")
    else:
        if stage == "RSET":
            client.start_transaction(tx())
            script.heard()
            script.say("250 ok", "250 ok", "354 go", "250 queued")
            script.events.clear()
        client.start_transaction(tx())
        for expected, reply in [("MAIL", "250 ok"), ("RCPT", "250 ok"), ("DATA", "354 go")]:
            if client.waiting_for == stage:
                break
            assert client.waiting_for == expected
            script.say(reply)
    script.heard()
    assert client.waiting_for == stage
    return script


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("greeting", "354 what"),
        ("EHLO", "334 what"),
        ("HELO", "354 what"),
        ("STARTTLS", "354 what"),
        ("AUTH", "354 what"),
        ("RSET", "354 what"),
        ("MAIL", "354 what"),
        ("RCPT", "354 what"),
        ("DATA", "250 2.0.0 not a 354"),
        ("DATA", "334 what"),
        ("END", "354 what"),
    ],
)
def test_unexpected_reply_codes_are_garbled(stage: str, reply: str) -> None:
    script = _at(stage)
    script.say(reply)
    event = script.event()
    expected = f"Protocol error: unexpected reply {reply[:3]} to {stage}"
    if isinstance(event, TransactionResult):
        assert {r.text for r in event.results} == {expected}
    else:
        assert isinstance(event, Refused) and event.reply.text == expected
    assert script.client.closed


def test_unexpected_reply_to_bdat_is_garbled() -> None:
    script = Script().ready("CHUNKING")
    script.client.start_transaction(tx())
    script.heard()
    script.say("250 ok", "250 ok")
    assert script.client.waiting_for == "BDAT"
    script.say("354 what")
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert result.results[0].text == "Protocol error: unexpected reply 354 to BDAT"


@pytest.mark.parametrize("stage", ["DATA", "END"])
def test_421_to_data_is_its_reply(stage: str) -> None:
    script = _at(stage)
    script.say("421 4.4.2 bye")
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert result.data_reply == Reply(421, "4.4.2", "bye", close=True)
    assert result.results == (result.data_reply,)


def test_reply_size_bounds() -> None:
    script = Script()
    script.say(raw=b"220 " + b"x" * 9000 + b"\r\n")  # too long, though complete
    event = script.event()
    assert isinstance(event, Refused) and event.reply.text == "Protocol error: reply line too long"
    script = Script()
    script.say(*["220-line"] * 300)
    event = script.event()
    assert isinstance(event, Refused) and event.reply.text == "Protocol error: too many reply lines"
    script = Script()
    script.say(*["220-line"] * 200, "220 " + "y" * 8000)  # long, but within the bounds
    assert script.heard() == ["EHLO client.test"]
    assert script.events == []


def test_operations_on_a_closed_session_end_at_once() -> None:
    script = Script().ready()
    script.say("421 4.3.2 bye")  # unsolicited: read with the next operation's replies
    script.client.starttls()
    script.heard()
    bye = Reply(421, "4.3.2", "bye", close=True)
    assert script.event() == Refused("STARTTLS", bye)
    script.client.starttls()
    assert script.event() == Refused("STARTTLS", bye)
    script.client.receive_data(b"250 late\r\n")  # ignored once closed
    assert script.client.next_event() is PAUSED


def test_connection_lost_before_the_mail_reply() -> None:
    script = Script().ready("PIPELINING")
    script.client.start_transaction(tx("a@mx.test", "b@mx.test"))
    script.heard()
    script.client.receive_data(b"")
    result = script.event()
    assert isinstance(result, TransactionResult)
    assert result.mail_reply is None
    assert {(r.code, r.enhanced) for r in result.results} == {(421, "4.4.2")}


def test_extensions_from_an_odd_ehlo_reply() -> None:
    ext = Extensions.from_ehlo(Reply(250, None, ("mx", "", "  size  1000 ", "AUTH=PLAIN LOGIN")))
    assert ext.keywords == {"SIZE": "1000", "AUTH=PLAIN": "LOGIN"}
    assert ext.size == 1000
    assert ext.auth == {"PLAIN", "LOGIN"}
    assert Extensions.from_ehlo(Reply(250, None, ("mx", "SIZE lots"))).size == 0
    assert Extensions().size is None
