"""The sans-IO server side and STARTTLS (RFC 3207): offering, the protocol switch, the reset,
and the command injection of CVE-2011-0411; and the Received "with" keyword (RFC 3848).

Dialogs run three ways (the ``mode`` fixture), through :func:`tls_dialog`: a ``-- tls`` line in a
transcript is where the I/O layer, having sent the 220, does its handshake and calls
``tls_started()``. In the "pipelined" mode, commands are injected behind every STARTTLS that is
followed by a handshake (in the same write, and again while the handshake runs): they must never
be answered, and the dialog's replies must not change.
"""

from __future__ import annotations

import textwrap

import attrs
import pytest

from katerchen.protocol import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    DataChunk,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    Reply,
    Reset,
    Respond,
    ServerConnection,
    ServerSettings,
    StartTLS,
    received_with,
    replies,
)
from tests.protocol_dialog import MODES, Answer, parse

#: Port 25 or 587 with a certificate: STARTTLS offered, AUTH once TLS is up.
STARTTLS_SETTINGS = ServerSettings(
    hostname="mx.test",
    max_message_size=1000,
    max_recipients=3,
    starttls=True,
    auth_mechanisms=("PLAIN", "LOGIN"),
)
#: Port 465: TLS from the first byte, AUTH required before MAIL.
IMPLICIT_TLS_SETTINGS = attrs.evolve(STARTTLS_SETTINGS, starttls=False, tls=True, require_auth=True)

_EXTENSIONS = """
    s: 250-mx.test Hello client.test
    s: 250-SIZE 1000
    s: 250-8BITMIME
    s: 250-PIPELINING
    s: 250-CHUNKING
    s: 250-BINARYMIME
    s: 250-ENHANCEDSTATUSCODES
"""
#: EHLO on a plain connection that offers STARTTLS (and so no AUTH yet).
EHLO_PLAIN = (
    "\n    c: EHLO client.test"
    + _EXTENSIONS
    + """
    s: 250-SMTPUTF8
    s: 250 STARTTLS
"""
)
#: EHLO on a TLS connection with PLAIN and LOGIN: AUTH, no STARTTLS.
EHLO_TLS = (
    "\n    c: EHLO client.test"
    + _EXTENSIONS
    + """
    s: 250-SMTPUTF8
    s: 250 AUTH PLAIN LOGIN
"""
)
#: EHLO, STARTTLS, the handshake and EHLO again.
STARTTLS_DIALOG = (
    EHLO_PLAIN
    + """
    c: STARTTLS
    s: 220 2.0.0 Ready to start TLS
    -- tls
"""
    + EHLO_TLS
)

#: What an attacker injects behind STARTTLS (CVE-2011-0411).
INJECTION = b"RSET\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@mx.test>\r\n"


@attrs.define
class TlsPeer:
    """The I/O layer, in memory, with a TLS handshake that always works."""

    conn: ServerConnection
    answer: Answer | None = None
    out: bytearray = attrs.Factory(bytearray)
    events: list[Event] = attrs.Factory(list)
    closed: bool = False

    @classmethod
    def start(cls, settings: ServerSettings, answer: Answer | None = None) -> TlsPeer:
        return cls(ServerConnection(settings), answer)

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.drain()

    def drain(self) -> None:
        while not self.closed:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            if event is PAUSED:
                # Only the handshake can be waited for here: every event gets its reply.
                assert self.conn.awaiting_tls
                return
            assert not isinstance(event, type(NEED_DATA))
            self.events.append(event)
            if isinstance(event, ConnectionClosed):
                self.closed = True
                return
            if isinstance(event, DataChunk):
                continue
            assert self.conn.next_event() is PAUSED
            reply = (self.answer(event) if self.answer else None) or event.reply
            self.out += self.conn.send(reply)

    def handshake(self) -> None:
        assert self.conn.awaiting_tls
        assert self.conn.next_event() is PAUSED
        self.conn.tls_started()
        self.drain()

    @property
    def replies(self) -> list[str]:
        # A transcript cannot end a line in a space: the "334 " challenge becomes "334".
        return [line.rstrip(" ") for line in self.out.decode("utf-8").split("\r\n")[:-1]]


def _segments(transcript: str) -> list[str]:
    segments: list[list[str]] = [[]]
    for line in textwrap.dedent(transcript).splitlines():
        if line.strip() == "-- tls":
            segments.append([])
        else:
            segments[-1].append(line)
    return ["\n".join(lines) for lines in segments]


def tls_dialog(
    mode: str,
    transcript: str,
    *,
    settings: ServerSettings = STARTTLS_SETTINGS,
    answer: Answer | None = None,
) -> TlsPeer:
    """Run ``transcript`` (``-- tls`` lines: handshake) fed as ``mode`` says; assert the server
    said exactly its lines and that nothing injected before a handshake was ever answered."""
    peer = TlsPeer.start(settings, answer)
    segments = _segments(transcript)
    expected: list[str] = []
    for index, segment in enumerate(segments):
        client, server = parse(segment)
        expected += server
        last = index == len(segments) - 1
        if mode == "pipelined":
            client += b"NOOP\r\n" if last else INJECTION
        if mode == "bytewise":
            for at in range(len(client)):
                peer.feed(client[at : at + 1])
        else:
            peer.feed(client)
        if not last:
            assert isinstance(peer.events[-1], StartTLS), "-- tls follows an accepted STARTTLS"
            if mode == "pipelined":
                peer.feed(INJECTION)  # more plaintext, while the handshake runs
            assert peer.replies == expected
            peer.handshake()
    if mode == "pipelined" and not peer.closed:
        expected.append("250 2.0.0 Ok")
    assert peer.replies == expected
    if not peer.closed:
        peer.feed(b"")
        assert peer.closed
    assert peer.replies == expected
    assert isinstance(peer.events[-1], ConnectionClosed)
    # Whatever was injected never became an event (a dialog has no "evil" sender of its own).
    assert not any(
        isinstance(event, MailFrom) and "evil" in str(event.reverse_path) for event in peer.events
    )
    return peer


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- offering STARTTLS -----------------------------------------------------------------------


def test_starttls_is_offered_until_tls_and_auth_after(mode: str) -> None:
    peer = tls_dialog(mode, STARTTLS_DIALOG)
    assert [type(event) for event in peer.events][:3] == [Hello, StartTLS, Hello]
    assert peer.conn.tls


def test_starttls_not_offered(mode: str) -> None:
    settings = ServerSettings(hostname="mx.test", max_message_size=1000, max_recipients=3)
    peer = tls_dialog(
        mode,
        """
        c: EHLO client.test
        s: 250-mx.test Hello client.test
        s: 250-SIZE 1000
        s: 250-8BITMIME
        s: 250-PIPELINING
        s: 250-CHUNKING
        s: 250-BINARYMIME
        s: 250-ENHANCEDSTATUSCODES
        s: 250 SMTPUTF8
        c: STARTTLS
        s: 502 5.5.1 Error: command not implemented
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        """,
        settings=settings,
    )
    assert not peer.conn.tls


def test_implicit_tls_offers_auth_and_refuses_starttls(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + """
        c: STARTTLS
        s: 503 5.5.1 Error: TLS already active
        """,
        settings=IMPLICIT_TLS_SETTINGS,
    )
    assert peer.conn.tls and not peer.conn.awaiting_tls


def test_starttls_again_after_tls(mode: str) -> None:
    tls_dialog(
        mode,
        STARTTLS_DIALOG
        + """
        c: STARTTLS
        s: 503 5.5.1 Error: TLS already active
        c: STARTTLS now
        s: 503 5.5.1 Error: TLS already active
        """,
    )


def test_starttls_syntax_and_sequence(mode: str) -> None:
    tls_dialog(
        mode,
        """
        c: STARTTLS
        s: 503 5.5.1 Error: send HELO/EHLO first
        """
        + EHLO_PLAIN
        + """
        c: STARTTLS please
        s: 501 5.5.4 Syntax: STARTTLS
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: STARTTLS
        s: 503 5.5.1 Error: MAIL transaction in progress
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: STARTTLS
        s: 503 5.5.1 Error: MAIL transaction in progress
        c: BDAT 2
        c~ ab
        s: 250 2.0.0 2 octets received
        c: STARTTLS
        s: 503 5.5.1 Error: MAIL transaction in progress
        c: RSET
        s: 250 2.0.0 Ok
        c: starttls
        s: 220 2.0.0 Ready to start TLS
        -- tls
        c: NOOP
        s: 250 2.0.0 Ok
        """,
    )


def test_starttls_after_helo(mode: str) -> None:
    tls_dialog(
        mode,
        """
        c: HELO client.test
        s: 250 mx.test Hello client.test
        c: STARTTLS
        s: 220 2.0.0 Ready to start TLS
        -- tls
        c: HELO client.test
        s: 250 mx.test Hello client.test
        """,
    )


def test_refused_starttls_keeps_the_plain_session(mode: str) -> None:
    # No certificate right now, say: 454, and the commands behind STARTTLS are ordinary ones.
    def no_tls(event: Event) -> Reply | None:
        return replies.TLS_UNAVAILABLE if isinstance(event, StartTLS) else None

    peer = tls_dialog(
        mode,
        EHLO_PLAIN
        + """
        c: STARTTLS
        s: 454 4.7.0 Error: TLS not available due to temporary reason
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        """,
        answer=no_tls,
    )
    assert not peer.conn.tls


# --- the switch: CVE-2011-0411 -----------------------------------------------------------------


@pytest.mark.parametrize(
    "injected",
    [
        b"RSET\r\n",
        b"MAIL FROM:<evil@attacker.test>\r\n",
        b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n",
        b"NOOP\r\nQUIT\r\n",
        b"NOOP",  # a partial line
    ],
)
def test_starttls_injection_is_discarded(injected: bytes) -> None:
    peer = TlsPeer.start(STARTTLS_SETTINGS)
    peer.feed(b"EHLO client.test\r\n")
    peer.out.clear()
    peer.feed(b"STARTTLS\r\n" + injected)  # one write
    assert peer.out == b"220 2.0.0 Ready to start TLS\r\n"  # exactly one reply
    assert isinstance(peer.events[-1], StartTLS)
    assert peer.conn.awaiting_tls
    # Nothing happens until the handshake, whatever else arrives in the clear.
    assert peer.conn.next_event() is PAUSED
    peer.feed(injected + b"\r\n" + injected)
    assert peer.conn.next_event() is PAUSED
    assert isinstance(peer.events[-1], StartTLS)
    assert peer.out == b"220 2.0.0 Ready to start TLS\r\n"
    # After it, the discarded bytes are gone: the first command read is the client's next one.
    peer.conn.tls_started()
    assert not peer.conn.awaiting_tls
    assert peer.conn.next_event() is NEED_DATA
    peer.feed(b"MAIL FROM:<a@client.test>\r\n")
    assert peer.out.endswith(b"\r\n503 5.5.1 Error: send HELO/EHLO first\r\n")
    assert peer.out.count(b"\r\n") == 2
    peer.feed(b"EHLO client.test\r\nRSET\r\n")
    assert [type(event) for event in peer.events] == [Hello, StartTLS, Respond, Hello, Reset]
    assert not any(isinstance(event, MailFrom) for event in peer.events)


def test_the_reply_to_starttls_and_the_injection_in_one_write() -> None:
    # The I/O layer's view of the attack: one read holds STARTTLS and the injected commands.
    conn = ServerConnection(STARTTLS_SETTINGS)
    conn.receive_data(b"EHLO client.test\r\n")
    hello = conn.next_event()
    assert isinstance(hello, Hello)
    conn.send(hello.reply)
    conn.receive_data(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@attacker.test>\r\n")
    event = conn.next_event()
    assert event == StartTLS(replies.READY_FOR_TLS)
    assert conn.next_event() is PAUSED  # the reply first
    assert conn.send(event.reply) == b"220 2.0.0 Ready to start TLS\r\n"
    assert conn.next_event() is PAUSED  # then the handshake
    assert conn.next_event() is PAUSED
    conn.tls_started()
    assert conn.next_event() is NEED_DATA


def test_state_is_reset_after_tls() -> None:
    peer = TlsPeer.start(STARTTLS_SETTINGS)
    conn = peer.conn
    assert not conn.tls and conn.hello_name is None
    peer.feed(b"EHLO client.test\r\nSTARTTLS\r\n")
    assert conn.hello_name == "client.test" and conn.extended
    peer.handshake()
    assert conn.tls
    assert conn.hello_name is None
    assert not conn.extended
    assert conn.authenticated is None
    assert not conn.in_transaction
    peer.feed(b"HELO other.test\r\n")
    assert conn.hello_name == "other.test"


def test_tls_started_needs_an_accepted_starttls() -> None:
    conn = ServerConnection(STARTTLS_SETTINGS)
    with pytest.raises(LocalProtocolError):
        conn.tls_started()
    peer = TlsPeer.start(STARTTLS_SETTINGS)
    peer.feed(b"EHLO client.test\r\nSTARTTLS\r\n")
    peer.conn.tls_started()
    with pytest.raises(LocalProtocolError):
        peer.conn.tls_started()  # twice
    # STARTTLS refused: no switch, nothing to start.
    peer = TlsPeer.start(STARTTLS_SETTINGS, lambda event: replies.TLS_UNAVAILABLE)
    peer.feed(b"EHLO client.test\r\nSTARTTLS\r\n")
    with pytest.raises(LocalProtocolError):
        peer.conn.tls_started()


def test_eof_while_waiting_for_the_handshake() -> None:
    peer = TlsPeer.start(STARTTLS_SETTINGS)
    peer.feed(b"EHLO client.test\r\nSTARTTLS\r\nNOOP\r\n")
    assert peer.conn.awaiting_tls
    peer.feed(b"")
    assert peer.closed
    assert peer.conn.next_event() == ConnectionClosed()
    assert not peer.conn.awaiting_tls
    with pytest.raises(LocalProtocolError):
        peer.conn.tls_started()


def test_a_failed_handshake_may_still_be_answered_with_a_closing_reply() -> None:
    peer = TlsPeer.start(STARTTLS_SETTINGS)
    peer.feed(b"EHLO client.test\r\nSTARTTLS\r\n")
    # (An I/O layer would rather just close; a closing reply is allowed at any time.)
    assert peer.conn.send(replies.timeout("mx.test")).startswith(b"421 4.4.2 ")
    assert peer.conn.next_event() == ConnectionClosed()


# --- the Received "with" keyword ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extended", "tls", "authenticated", "smtputf8", "keyword"),
    [
        (False, False, False, False, "SMTP"),
        (False, True, True, False, "SMTP"),  # no keyword for TLS or AUTH after HELO
        (True, False, False, False, "ESMTP"),
        (True, True, False, False, "ESMTPS"),
        (True, False, True, False, "ESMTPA"),
        (True, True, True, False, "ESMTPSA"),
        (True, False, False, True, "UTF8SMTP"),
        (True, True, False, True, "UTF8SMTPS"),
        (True, False, True, True, "UTF8SMTPA"),
        (True, True, True, True, "UTF8SMTPSA"),
    ],
)
def test_received_with(
    extended: bool, tls: bool, authenticated: bool, smtputf8: bool, keyword: str
) -> None:
    assert (
        received_with(extended=extended, tls=tls, authenticated=authenticated, smtputf8=smtputf8)
        == keyword
    )


def test_received_with_of_a_session() -> None:
    peer = TlsPeer.start(STARTTLS_SETTINGS)
    conn = peer.conn
    assert conn.received_with(smtputf8=False) == "SMTP"
    peer.feed(b"EHLO client.test\r\n")
    assert conn.received_with(smtputf8=False) == "ESMTP"
    assert conn.received_with(smtputf8=True) == "UTF8SMTP"
    peer.feed(b"STARTTLS\r\n")
    peer.handshake()
    peer.feed(b"EHLO client.test\r\n")
    assert conn.received_with(smtputf8=False) == "ESMTPS"
    peer.feed(b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n")  # \0user\0pass
    assert conn.authenticated == "user"
    assert conn.received_with(smtputf8=False) == "ESMTPSA"
    assert conn.received_with(smtputf8=True) == "UTF8SMTPSA"


# --- settings ----------------------------------------------------------------------------------


def test_settings_mechanisms_are_normalized_and_checked() -> None:
    settings = attrs.evolve(STARTTLS_SETTINGS, auth_mechanisms=("login", "PLAIN", "LOGIN"))
    assert settings.auth_mechanisms == ("PLAIN", "LOGIN")
    assert ServerSettings("mx.test", 1, 1).auth_mechanisms == ()
    with pytest.raises(ValueError, match="CRAM-MD5"):
        ServerSettings("mx.test", 1, 1, auth_mechanisms=("PLAIN", "CRAM-MD5"))
