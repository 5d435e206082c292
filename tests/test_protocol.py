"""The sans-IO server side: commands, sequence, limits and the driving contract.

Every dialog runs three ways (the ``mode`` fixture): whole, one byte at a time, and whole with a
pipelined command behind it. DATA and BDAT content are in test_protocol_data.py.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from katerchen.address import Address
from katerchen.protocol import (
    NEED_DATA,
    PAUSED,
    ChunkEnd,
    ConnectionClosed,
    DataStart,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    RcptTo,
    Reply,
    Respond,
    ServerConnection,
    ServerSettings,
    replies,
)
from tests.protocol_dialog import EHLO, MODES, SETTINGS, TRANSACTION, Peer, dialog


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def reject_rcpt(event: Event) -> Reply | None:
    """An I/O layer that knows no mailbox called "nobody"."""
    if isinstance(event, RcptTo) and event.forward_path.local_part == "nobody":
        return replies.UNKNOWN_MAILBOX
    return None


# --- the package stays sans-IO -----------------------------------------------------------------


def test_importing_the_protocol_imports_no_io_modules() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import katerchen.protocol\n"
        "new = set(sys.modules) - before\n"
        "print(' '.join(sorted(m for m in new if m.split('.')[0] in "
        "{'trio', 'socket', 'ssl', 'selectors', 'asyncio', '_socket', '_ssl'})))\n"
        "print('ok' if 'katerchen.protocol.server' in new else 'missing')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    forbidden, loaded = result.stdout.splitlines()
    assert forbidden == ""
    assert loaded == "ok"


# --- replies ---------------------------------------------------------------------------------


def test_reply_bytes() -> None:
    assert Reply(250, "2.0.0", "Ok").to_bytes() == b"250 2.0.0 Ok\r\n"
    assert Reply(220, None, "mx ESMTP").to_bytes() == b"220 mx ESMTP\r\n"
    multi = Reply(250, "2.0.0", ("one", "two", "three"))
    assert multi.to_bytes() == b"250-2.0.0 one\r\n250-2.0.0 two\r\n250 2.0.0 three\r\n"
    # A line break inside a text cannot make a second reply line.
    assert Reply(250, "2.0.0", "a\r\n250 b").to_bytes() == b"250 2.0.0 a  250 b\r\n"
    assert Reply(250, "2.0.0", ()).to_bytes() == b"250 2.0.0 \r\n"


def test_greeting() -> None:
    conn = ServerConnection(SETTINGS)
    assert conn.send(conn.greeting()) == b"220 mx.test ESMTP katerchen\r\n"
    assert conn.next_event() is NEED_DATA


def test_every_reply_after_the_greeting_has_an_enhanced_code(mode: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + """
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c: .
        s: 250 2.0.0 Ok
        c: HELO client.test
        s: 250 mx.test Hello client.test
        c: NOOP
        s: 250 2.0.0 Ok
        c: FOO
        s: 500 5.5.2 Error: command not recognized
        c: MAIL FROM:<a@b> SIZE=1
        s: 555 5.5.4 Error: parameters need EHLO
        c: QUIT
        s: 221 2.0.0 Bye
        """,
    )
    for line in peer.replies:
        if line.startswith(("250-mx.test", "250-SIZE", "250 mx.test", "354 ")):
            continue  # EHLO/HELO (RFC 2034 3) and 354 (not a 2xx/4xx/5xx)
        if line.startswith("250-") or line == "250 SMTPUTF8":
            continue
        assert re.fullmatch(r"\d{3} [245]\.\d{1,3}\.\d{1,3} .*", line), line


# --- EHLO / HELO ----------------------------------------------------------------------------


def test_ehlo(mode: str) -> None:
    peer = dialog(mode, EHLO)
    hello = peer.events[0]
    assert isinstance(hello, Hello)
    assert hello.name == "client.test"
    assert hello.extended


def test_hello_properties() -> None:
    peer = Peer.start()
    assert peer.conn.hello_name is None
    assert not peer.conn.extended
    peer.feed(b"EHLO one.test\r\n")
    assert peer.conn.hello_name == "one.test"
    assert peer.conn.extended
    peer.feed(b"HELO two.test\r\n")
    assert peer.conn.hello_name == "two.test"
    assert not peer.conn.extended


def test_helo_has_no_extensions(mode: str) -> None:
    peer = dialog(
        mode,
        """
        c: HELO client.test
        s: 250 mx.test Hello client.test
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        """,
    )
    hello = peer.events[0]
    assert isinstance(hello, Hello)
    assert not hello.extended


@pytest.mark.parametrize(
    "name",
    [
        "[127.0.0.1]",
        "[IPv6:::1]",
        "[IPv6:2001:db8::1]",
        "mail.example.org",
        "UPPER.Example.ORG",
        "under_score.example",  # sloppy, tolerated as by Postfix
        "localhost",
        "192.0.2.1",
        "two words",
        "bücher.example",
    ],
)
def test_hello_names(mode: str, name: str) -> None:
    peer = dialog(
        mode,
        f"""
        c: HELO {name}
        s: 250 mx.test Hello {name}
        """,
    )
    assert peer.events[0] == Hello(name, False, replies.helo("mx.test", name))


def test_hello_commands_are_case_insensitive(mode: str) -> None:
    dialog(
        mode,
        """
        c: ehlo a.test
        s: 250-mx.test Hello a.test
        s: 250-SIZE 1000
        s: 250-8BITMIME
        s: 250-PIPELINING
        s: 250-CHUNKING
        s: 250-BINARYMIME
        s: 250-ENHANCEDSTATUSCODES
        s: 250 SMTPUTF8
        c: HeLo b.test
        s: 250 mx.test Hello b.test
        c: mail from:<a@b.test>
        s: 250 2.1.0 Ok
        c: rCpT tO:<c@d.test>
        s: 250 2.1.5 Ok
        c: rset
        s: 250 2.0.0 Ok
        c: noop
        s: 250 2.0.0 Ok
        c: Quit
        s: 221 2.0.0 Bye
        """,
    )


def test_hello_needs_a_name(mode: str) -> None:
    dialog(
        mode,
        """
        c: EHLO
        s: 501 5.5.4 Syntax: EHLO hostname
        c: HELO
        s: 501 5.5.4 Syntax: HELO hostname
        c~ EHLO   \\r\\n
        s: 501 5.5.4 Syntax: EHLO hostname
        c~ HELO a\\tb\\r\\n
        s: 501 5.5.4 Error: invalid hostname
        c~ EHLO a\\x1bb\\r\\n
        s: 501 5.5.4 Error: invalid hostname
        c: MAIL FROM:<a@b.test>
        s: 503 5.5.1 Error: send HELO/EHLO first
        """,
    )


def test_ehlo_resets_the_transaction(mode: str) -> None:
    dialog(
        mode,
        TRANSACTION
        + """
        c: HELO again.test
        s: 250 mx.test Hello again.test
        c: RCPT TO:<rcpt@mx.test>
        s: 503 5.5.1 Error: need MAIL command
        c: DATA
        s: 503 5.5.1 Error: need RCPT command
        """,
    )


# --- MAIL ------------------------------------------------------------------------------------


def test_mail_from(mode: str) -> None:
    peer = dialog(
        mode,
        EHLO
        + """
        c: MAIL FROM:<Sender@Client.Test>
        s: 250 2.1.0 Ok
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM: <spaced@client.test>
        s: 250 2.1.0 Ok
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<>
        s: 250 2.1.0 Ok
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<@relay.test,@other.test:routed@client.test>
        s: 250 2.1.0 Ok
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<"quoted >local"@[192.0.2.1]>
        s: 250 2.1.0 Ok
        """,
    )
    mails = [e for e in peer.events if isinstance(e, MailFrom)]
    assert [m.reverse_path for m in mails] == [
        Address("Sender", "Client.Test"),
        Address("spaced", "client.test"),
        None,
        Address("routed", "client.test"),
        Address("quoted >local", "[192.0.2.1]"),
    ]
    assert all(m.size is None and m.body is None and not m.smtputf8 for m in mails)


def test_mail_parameters(mode: str) -> None:
    peer = dialog(
        mode,
        EHLO
        + """
        c: MAIL FROM:<a@client.test> SIZE=1000 BODY=8BITMIME
        s: 250 2.1.0 Ok
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test> size=12  body=binarymime smtputf8
        s: 250 2.1.0 Ok
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test> BODY=7BIT
        s: 250 2.1.0 Ok
        """,
    )
    mails = [e for e in peer.events if isinstance(e, MailFrom)]
    assert [(m.size, m.body, m.smtputf8) for m in mails] == [
        (1000, "8BITMIME", False),
        (12, "BINARYMIME", True),
        (None, "7BIT", False),
    ]


def test_mail_parameter_errors(mode: str) -> None:
    dialog(
        mode,
        EHLO
        + """
        c: MAIL FROM:<a@client.test> SIZE=1001
        s: 552 5.3.4 Error: message size exceeds fixed limit
        c: MAIL FROM:<a@client.test> SIZE=12x
        s: 501 5.5.4 Error: bad SIZE value
        c: MAIL FROM:<a@client.test> SIZE=
        s: 501 5.5.4 Error: bad SIZE value
        c: MAIL FROM:<a@client.test> SIZE
        s: 501 5.5.4 Error: bad SIZE value
        c: MAIL FROM:<a@client.test> SIZE=123456789012345678901
        s: 501 5.5.4 Error: bad SIZE value
        c: MAIL FROM:<a@client.test> BODY=9BIT
        s: 501 5.5.4 Error: bad BODY value
        c: MAIL FROM:<a@client.test> SMTPUTF8=yes
        s: 501 5.5.4 Error: SMTPUTF8 takes no value
        c: MAIL FROM:<a@client.test> RET=HDRS
        s: 555 5.5.4 Error: unsupported parameter
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test> SIZE=1 size=2
        s: 555 5.5.4 Error: duplicate parameter
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        """,
    )


def test_mail_parameters_need_ehlo(mode: str) -> None:
    dialog(
        mode,
        """
        c: HELO client.test
        s: 250 mx.test Hello client.test
        c: MAIL FROM:<a@client.test> SIZE=10
        s: 555 5.5.4 Error: parameters need EHLO
        c: MAIL FROM:<a@client.test> BODY=8BITMIME
        s: 555 5.5.4 Error: parameters need EHLO
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        """,
    )


def test_mail_syntax_errors(mode: str) -> None:
    dialog(
        mode,
        EHLO
        + """
        c: MAIL
        s: 501 5.5.4 Syntax: MAIL FROM:<address>
        c: MAIL FROM:
        s: 501 5.5.4 Syntax: MAIL FROM:<address>
        c: MAIL TO:<a@client.test>
        s: 501 5.5.4 Syntax: MAIL FROM:<address>
        c: MAIL FROM:a@client.test
        s: 501 5.1.7 Error: bad sender address syntax (path syntax error)
        c: MAIL FROM:<a@client.test>junk
        s: 501 5.1.7 Error: bad sender address syntax (path syntax error)
        c: MAIL FROM:<a b@client.test>
        s: 501 5.1.7 Error: bad sender address syntax (path syntax error)
        c: MAIL FROM:<a@@client.test>
        s: 501 5.1.7 Error: bad sender address syntax (path syntax error)
        """,
    )


def test_non_ascii_addresses_need_smtputf8(mode: str) -> None:
    peer = dialog(
        mode,
        EHLO
        + """
        c: MAIL FROM:<jörg@bücher.example>
        s: 550 5.6.7 Error: non-ASCII address needs SMTPUTF8
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<jörg@mx.test>
        s: 553 5.6.7 Error: non-ASCII address needs SMTPUTF8
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<jörg@bücher.example> SMTPUTF8
        s: 250 2.1.0 Ok
        c: RCPT TO:<jörg@mx.test>
        s: 250 2.1.5 Ok
        """,
    )
    mail = [e for e in peer.events if isinstance(e, MailFrom)][-1]
    assert mail.smtputf8
    assert mail.reverse_path == Address("jörg", "bücher.example")


def test_nested_mail(mode: str) -> None:
    dialog(
        mode,
        TRANSACTION
        + """
        c: MAIL FROM:<other@client.test>
        s: 503 5.5.1 Error: nested MAIL command
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<other@client.test>
        s: 250 2.1.0 Ok
        c: MAIL FROM:<other@client.test>
        s: 503 5.5.1 Error: nested MAIL command
        """,
    )


def test_refused_mail_keeps_the_state(mode: str) -> None:
    def storage_full(event: Event) -> Reply | None:
        return replies.INSUFFICIENT_STORAGE if isinstance(event, MailFrom) else None

    peer = dialog(
        mode,
        EHLO
        + """
        c: MAIL FROM:<a@client.test>
        s: 452 4.3.1 Error: insufficient system storage
        c: RCPT TO:<rcpt@mx.test>
        s: 503 5.5.1 Error: need MAIL command
        """,
        answer=storage_full,
    )
    assert not peer.conn.in_transaction


# --- RCPT ------------------------------------------------------------------------------------


def test_rcpt_to(mode: str) -> None:
    peer = dialog(
        mode,
        EHLO
        + """
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: RCPT TO: <Postmaster>
        s: 250 2.1.5 Ok
        c: RCPT TO:<@hop.test:c@[IPv6:2001:db8::1]>
        s: 250 2.1.5 Ok
        """,
    )
    rcpts = [e.forward_path for e in peer.events if isinstance(e, RcptTo)]
    assert rcpts == [
        Address("b", "mx.test"),
        Address("Postmaster", None),
        Address("c", "[IPv6:2001:db8::1]"),
    ]


def test_rcpt_errors(mode: str) -> None:
    dialog(
        mode,
        EHLO
        + """
        c: RCPT TO:<b@mx.test>
        s: 503 5.5.1 Error: need MAIL command
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<b@mx.test> NOTIFY=NEVER
        s: 555 5.5.4 Error: unsupported parameter
        c: RCPT TO:b@mx.test
        s: 501 5.1.3 Error: bad recipient address syntax (path syntax error)
        c: RCPT TO:<>
        s: 501 5.1.3 Error: bad recipient address syntax (path syntax error)
        c: RCPT
        s: 501 5.5.4 Syntax: RCPT TO:<address>
        c: RCPT FROM:<b@mx.test>
        s: 501 5.5.4 Syntax: RCPT TO:<address>
        c: DATA
        s: 503 5.5.1 Error: need RCPT command
        """,
    )


def test_recipient_limit(mode: str) -> None:
    dialog(
        mode,
        EHLO
        + """
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<r1@mx.test>
        s: 250 2.1.5 Ok
        c: RCPT TO:<nobody@mx.test>
        s: 550 5.1.1 Error: mailbox unavailable
        c: RCPT TO:<r2@mx.test>
        s: 250 2.1.5 Ok
        c: RCPT TO:<r3@mx.test>
        s: 250 2.1.5 Ok
        c: RCPT TO:<r4@mx.test>
        s: 452 4.5.3 Error: too many recipients
        c: RCPT TO:<r5@mx.test>
        s: 452 4.5.3 Error: too many recipients
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<r4@mx.test>
        s: 250 2.1.5 Ok
        """,
        answer=reject_rcpt,
    )


def test_too_many_recipients_is_not_an_error(mode: str) -> None:
    settings = ServerSettings("mx.test", 1000, max_recipients=1, max_errors=1)
    dialog(
        mode,
        """
        c: HELO client.test
        s: 250 mx.test Hello client.test
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<r1@mx.test>
        s: 250 2.1.5 Ok
        c: RCPT TO:<r2@mx.test>
        s: 452 4.5.3 Error: too many recipients
        c: RCPT TO:<r3@mx.test>
        s: 452 4.5.3 Error: too many recipients
        c: NOOP
        s: 250 2.0.0 Ok
        c: FOO
        s: 500 5.5.2 Error: command not recognized
        c: NOOP
        s: 421 4.7.0 mx.test Error: too many errors
        """,
        settings=settings,
    )


def test_data_needs_an_accepted_recipient(mode: str) -> None:
    dialog(
        mode,
        EHLO
        + """
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<nobody@mx.test>
        s: 550 5.1.1 Error: mailbox unavailable
        c: DATA
        s: 503 5.5.1 Error: need RCPT command
        c: BDAT 3 LAST
        c~ abc
        s: 503 5.5.1 Error: need RCPT command
        c: RCPT TO:<somebody@mx.test>
        s: 250 2.1.5 Ok
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c: .
        s: 250 2.0.0 Ok
        """,
        answer=reject_rcpt,
    )


# --- the other commands ------------------------------------------------------------------------


def test_simple_commands_anywhere(mode: str) -> None:
    dialog(
        mode,
        """
        c: NOOP
        s: 250 2.0.0 Ok
        c: NOOP whatever you like
        s: 250 2.0.0 Ok
        c: HELP
        s: 214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP
        c: HELP MAIL
        s: 214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP
        c: VRFY postmaster
        s: 252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery
        c: VRFY
        s: 501 5.5.4 Syntax: VRFY address
        c: EXPN staff
        s: 502 5.5.1 Error: EXPN is not supported
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test>
        s: 503 5.5.1 Error: send HELO/EHLO first
        """,
    )


def test_rset_in_every_state(mode: str) -> None:
    peer = dialog(
        mode,
        """
        c: RSET
        s: 250 2.0.0 Ok
        c: EHLO client.test
        s: 250-mx.test Hello client.test
        s: 250-SIZE 1000
        s: 250-8BITMIME
        s: 250-PIPELINING
        s: 250-CHUNKING
        s: 250-BINARYMIME
        s: 250-ENHANCEDSTATUSCODES
        s: 250 SMTPUTF8
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: RSET
        s: 250 2.0.0 Ok
        c: RCPT TO:<b@mx.test>
        s: 503 5.5.1 Error: need MAIL command
        c: RSET now
        s: 501 5.5.4 Syntax: RSET
        c: QUIT now
        s: 501 5.5.4 Syntax: QUIT
        c: QUIT
        s: 221 2.0.0 Bye
        """,
    )
    assert peer.conn.hello_name == "client.test"


def test_quit_closes(mode: str) -> None:
    peer = dialog(
        mode,
        """
        c: QUIT
        s: 221 2.0.0 Bye
        c: NOOP
        """,
    )
    assert peer.events[-1] == ConnectionClosed()
    assert peer.conn.next_event() == ConnectionClosed()


def test_unknown_and_empty_commands(mode: str) -> None:
    dialog(
        mode,
        """
        c: FOO bar
        s: 500 5.5.2 Error: command not recognized
        c: STARTTLS
        s: 502 5.5.1 Error: command not implemented
        c: auth PLAIN AGFAYg==
        s: 502 5.5.1 Error: command not implemented
        c: ETRN example.test
        s: 502 5.5.1 Error: command not implemented
        c:
        s: 500 5.5.2 Error: bad syntax
        c~    \\r\\n
        s: 500 5.5.2 Error: bad syntax
        c~ NOOP\\n
        s: 250 2.0.0 Ok
        """,
    )


def test_hello_reply_lines_fit_the_reply_limit(mode: str) -> None:
    # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its code and CRLF, but EHLO
    # takes names up to the 512-octet command line: the echoed name is cut to fit.
    name = "é" * 252  # 504 octets: the longest EHLO line that fits the command limit
    room = 512 - len("250-") - len("\r\n")
    expected = ("mx.test Hello " + name).encode()[:room].decode("utf-8", "ignore")
    peer = dialog(
        mode,
        f"""
        c: EHLO {name}
        s: 250-{expected}
        s: 250-SIZE 1000
        s: 250-8BITMIME
        s: 250-PIPELINING
        s: 250-CHUNKING
        s: 250-BINARYMIME
        s: 250-ENHANCEDSTATUSCODES
        s: 250 SMTPUTF8
        c: HELO {name}
        s: 250 {expected}
        """,
    )
    assert isinstance(peer.events[0], Hello) and peer.events[0].name == name
    for reply in (replies.ehlo("mx.test", name, max_message_size=1), replies.helo("mx.test", name)):
        assert all(len(line) <= 512 for line in reply.to_bytes().split(b"\n"))


def test_nul_and_invalid_utf8(mode: str) -> None:
    dialog(
        mode,
        """
        c~ NOOP\\x00\\r\\n
        s: 501 5.5.2 Error: invalid character in command
        c~ EHLO a\\x00b\\r\\n
        s: 501 5.5.2 Error: invalid character in command
        c~ EHLO \\xff\\xfe\\r\\n
        s: 501 5.5.2 Error: invalid character in command
        c~ HELO caf\\xc3\\r\\n
        s: 501 5.5.2 Error: invalid character in command
        c~ \\xc3\\xa9\\r\\n
        s: 500 5.5.2 Error: command not recognized
        c~ HELO caf\\xc3\\xa9\\r\\n
        s: 250 mx.test Hello café
        c~ MAIL FROM:<\\xff@client.test>\\r\\n
        s: 501 5.5.2 Error: invalid character in command
        """,
    )


# --- line limits ---------------------------------------------------------------------------------


def test_command_line_limit(mode: str) -> None:
    noop_512 = "NOOP " + "x" * (512 - 2 - 5)  # 512 octets with CRLF: the limit
    noop_513 = "NOOP " + "x" * (512 - 2 - 4)
    dialog(
        mode,
        f"""
        c: {noop_512}
        s: 250 2.0.0 Ok
        c: {noop_513}
        s: 500 5.5.6 Error: line too long
        c~ {noop_512}\\n
        s: 250 2.0.0 Ok
        c~ {noop_513}\\n
        s: 500 5.5.6 Error: line too long
        c: NOOP
        s: 250 2.0.0 Ok
        """,
    )


def test_mail_and_rcpt_line_limit(mode: str) -> None:
    # 564 octets with CRLF: 512 + SIZE (26) + SMTPUTF8 (10) + " BODY=BINARYMIME" (16).
    # Such a long path is too long for RFC 5321 4.5.3.1.3, but not for the line reader.
    local = "a" * (564 - 2 - len("MAIL FROM:<@client.test>"))
    dialog(
        mode,
        EHLO
        + f"""
        c: MAIL FROM:<{local}@client.test>
        s: 501 5.1.7 Error: bad sender address syntax (path too long)
        c: MAIL FROM:<{local}x@client.test>
        s: 500 5.5.6 Error: line too long
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<{local}bb@client.test>
        s: 501 5.1.3 Error: bad recipient address syntax (path too long)
        c: RCPT TO:<{local}bbb@client.test>
        s: 500 5.5.6 Error: line too long
        c: VRFY {local}
        s: 500 5.5.6 Error: line too long
        """,
    )


def test_very_long_line_is_skipped_and_answered_once(mode: str) -> None:
    huge = "x" * 5000
    dialog(
        mode,
        f"""
        c: NOOP {huge}
        s: 500 5.5.6 Error: line too long
        c~ MAIL FROM:<{huge}\\n
        s: 500 5.5.6 Error: line too long
        c: NOOP
        s: 250 2.0.0 Ok
        """,
    )


def test_long_line_memory_is_bounded() -> None:
    peer = Peer.start()
    for _ in range(100):
        peer.feed(b"x" * 10_000)
        assert len(peer.conn._buf) < 600
    assert peer.replies == []
    peer.feed(b"\r\nNOOP\r\n")
    assert peer.replies == ["500 5.5.6 Error: line too long", "250 2.0.0 Ok"]


# --- robustness ------------------------------------------------------------------------------


def test_error_limit(mode: str) -> None:
    errors = "\n".join(f"c: FOO {n}\ns: 500 5.5.2 Error: command not recognized" for n in range(9))
    dialog(
        mode,
        EHLO
        + errors
        + """
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<nobody@mx.test>
        s: 550 5.1.1 Error: mailbox unavailable
        c: NOOP
        s: 421 4.7.0 mx.test Error: too many errors
        c: QUIT
        """,
        answer=reject_rcpt,
    )


@pytest.mark.parametrize(
    "request_line",
    [
        "GET / HTTP/1.1",
        "POST /submit HTTP/1.1",
        "HEAD / HTTP/1.0",
        "PUT /x HTTP/1.1",
        "CONNECT mx.test:25 HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "DELETE /x HTTP/1.1",
        "PATCH /x HTTP/1.1",
        "TRACE / HTTP/1.1",
        "get /lowercase",
        "GET",
    ],
)
def test_http_request_is_refused_and_closed(mode: str, request_line: str) -> None:
    verb = request_line.split(" ")[0].upper()
    peer = dialog(
        mode,
        f"""
        c: {request_line}
        s: 502 5.5.1 Error: this is an SMTP server, not HTTP
        c: Host: mx.test
        c:
        """,
    )
    assert peer.events[0] == Respond(verb, replies.HTTP_REQUEST)
    assert peer.events[1] == ConnectionClosed()


def test_http_request_after_ehlo_and_with_a_long_url(mode: str) -> None:
    dialog(
        mode,
        EHLO
        + f"""
        c: GET /{"a" * 2000} HTTP/1.1
        s: 502 5.5.1 Error: this is an SMTP server, not HTTP
        """,
    )


# --- the driving contract ------------------------------------------------------------------------


def test_paused_until_send() -> None:
    conn = ServerConnection(SETTINGS)
    conn.receive_data(b"EHLO a.test\r\nNOOP\r\n")
    event = conn.next_event()
    assert isinstance(event, Hello)
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    conn.send(event.reply)
    event = conn.next_event()
    assert event == Respond("NOOP", replies.OK)
    assert conn.next_event() is PAUSED
    conn.send(event.reply)
    assert conn.next_event() is NEED_DATA


def test_eof_is_connection_closed() -> None:
    conn = ServerConnection(SETTINGS)
    conn.receive_data(b"NOOP\r\nNOO")
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Respond)
    assert conn.next_event() is PAUSED  # buffered commands are still answered in order
    conn.send(event.reply)
    assert conn.next_event() == ConnectionClosed()  # the partial line is dropped
    assert conn.next_event() == ConnectionClosed()
    conn.receive_data(b"NOOP\r\n")  # ignored
    assert conn.next_event() == ConnectionClosed()


def test_send_without_event() -> None:
    conn = ServerConnection(SETTINGS)
    with pytest.raises(LocalProtocolError):
        conn.send(replies.OK)
    conn.receive_data(b"NOOP\r\n")
    event = conn.next_event()
    assert isinstance(event, Respond)
    conn.send(event.reply)
    with pytest.raises(LocalProtocolError):
        conn.send(event.reply)  # twice
    # A closing reply may always be sent: a timeout, a shutdown.
    assert conn.send(replies.timeout("mx.test")) == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert conn.next_event() == ConnectionClosed()


def test_closing_reply_instead_of_the_proposed_one() -> None:
    conn = ServerConnection(SETTINGS)
    conn.receive_data(b"EHLO a.test\r\nNOOP\r\n")
    event = conn.next_event()
    assert isinstance(event, Hello)
    conn.send(replies.shutting_down("mx.test"))
    assert conn.next_event() == ConnectionClosed()


def test_transaction_properties() -> None:
    peer = Peer.start()
    conn = peer.conn
    assert not conn.in_transaction and not conn.receiving_data
    peer.feed(b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\n")
    assert conn.in_transaction and not conn.receiving_data
    peer.feed(b"RCPT TO:<c@d.test>\r\nDATA\r\n")
    assert conn.in_transaction and conn.receiving_data
    peer.feed(b"text\r\n.\r\n")
    assert not conn.in_transaction and not conn.receiving_data
    peer.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 10\r\n12345")
    assert conn.in_transaction and conn.receiving_data
    peer.feed(b"67890")
    assert conn.in_transaction and not conn.receiving_data
    assert isinstance(peer.events[-1], ChunkEnd)
    peer.feed(b"RSET\r\n")
    assert not conn.in_transaction


def test_refused_data_start_keeps_the_transaction(mode: str) -> None:
    def no_data(event: Event) -> Reply | None:
        return replies.LOCAL_ERROR if isinstance(event, DataStart) else None

    peer = dialog(
        mode,
        TRANSACTION
        + """
        c: DATA
        s: 451 4.3.0 Error: local error in processing
        c: RCPT TO:<more@mx.test>
        s: 250 2.1.5 Ok
        """,
        answer=no_data,
    )
    assert peer.messages == []


def test_settings_validate_bare_newline() -> None:
    with pytest.raises(ValueError):
        ServerSettings("mx.test", 1, 1, bare_newline="maybe")
