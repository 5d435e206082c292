"""The sans-IO server side and SMTP AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN, with and
without initial responses, cancellation, malformed responses, the TLS requirement, submission's
AUTH-before-MAIL (RFC 6409) and MAIL's AUTH= parameter.

Dialogs run three ways (the ``mode`` fixture) through ``tls_dialog`` (see test_protocol_tls.py).
The test plays the I/O layer: its ``answer`` callback is the credential check.
"""

from __future__ import annotations

import base64

import attrs
import pytest

from katerchen.protocol import (
    AuthChallenge,
    AuthRequest,
    ConnectionClosed,
    Event,
    MailFrom,
    Reply,
    Respond,
    ServerConnection,
    replies,
)
from tests.protocol_dialog import MODES
from tests.test_protocol_tls import (
    EHLO_PLAIN,
    EHLO_TLS,
    IMPLICIT_TLS_SETTINGS,
    STARTTLS_SETTINGS,
    TlsPeer,
    tls_dialog,
)

#: The listener of port 465, but MAIL without AUTH allowed, to test AUTH on its own.
TLS_SETTINGS = attrs.evolve(IMPLICIT_TLS_SETTINGS, require_auth=False)

USER = "user@mx.test"
PASSWORD = "s3cret pässword"


def b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def plain(username: str = USER, password: str = PASSWORD, authzid: str = "") -> str:
    """PLAIN's message (RFC 4616 2), base64-encoded."""
    return b64(f"{authzid}\0{username}\0{password}")


PLAIN = plain()


def check_password(event: Event) -> Reply | None:
    """The I/O layer: USER with PASSWORD, nobody else."""
    if isinstance(event, AuthRequest) and (event.username, event.password) != (USER, PASSWORD):
        return replies.AUTH_FAILED
    return None


def auth_requests(peer: TlsPeer) -> list[AuthRequest]:
    return [event for event in peer.events if isinstance(event, AuthRequest)]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- PLAIN -------------------------------------------------------------------------------------


def test_plain_with_initial_response(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN {PLAIN}
        s: 235 2.7.0 Authentication successful
        c: MAIL FROM:<{USER}>
        s: 250 2.1.0 Ok
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert auth_requests(peer) == [AuthRequest("PLAIN", "", USER, PASSWORD, replies.AUTH_SUCCEEDED)]
    assert peer.conn.authenticated == USER


def test_plain_with_empty_challenge(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: auth plain
        s: 334
        c: {PLAIN}
        s: 235 2.7.0 Authentication successful
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert peer.conn.authenticated == USER
    challenge = peer.events[1]
    assert challenge == AuthChallenge("PLAIN", replies.PLAIN_CHALLENGE)
    assert b"\r\n334 \r\n235 " in peer.out  # RFC 4954 4: "334" SP, then the empty challenge


def test_plain_with_authzid(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN {plain(authzid=USER.upper())}
        s: 235 2.7.0 Authentication successful
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert auth_requests(peer)[0].authzid == USER.upper()


def test_plain_for_someone_else_is_refused(mode: str) -> None:
    # RFC 4616 2: acting as another identity needs an authorization nobody has here.
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN {plain(authzid="boss@mx.test")}
        s: 535 5.7.8 Error: authentication credentials invalid
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert auth_requests(peer) == []
    assert peer.conn.authenticated is None


@pytest.mark.parametrize(
    "response",
    [
        "=",  # the empty initial response: no NULs at all
        b64(f"{USER}\0{PASSWORD}"),  # one NUL
        b64(f"\0{USER}\0{PASSWORD}\0"),  # three
        b64(f"\0\0{PASSWORD}"),  # no user
        b64(f"\0{USER}\0"),  # no password
        b64(b"\0us\xffer\0pw"),  # not UTF-8
        b64(b"\0us\x1ber\0pw"),  # a control character in a name
        "not-base64!",
        "AHVzZXIAcGFzcw",  # padding missing
        "AHVzZXIAcGFzcw==AA==",  # data after the padding
    ],
)
def test_malformed_plain(mode: str, response: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN {response}
        s: 501 5.5.2 Error: cannot decode authentication response
        c: AUTH PLAIN
        s: 334
        c: {response}
        s: 501 5.5.2 Error: cannot decode authentication response
        c: AUTH PLAIN {PLAIN}
        s: 235 2.7.0 Authentication successful
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert len(auth_requests(peer)) == 1


def test_plain_password_may_hold_anything_but_nul(mode: str) -> None:
    password = "\x01 \t:\x7f€"
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN {plain(password=password)}
        s: 235 2.7.0 Authentication successful
        """,
        settings=TLS_SETTINGS,
    )
    assert auth_requests(peer)[0].password == password


def test_cancel(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + """
        c: AUTH PLAIN
        s: 334
        c: *
        s: 501 5.0.0 Error: authentication cancelled
        c: AUTH LOGIN
        s: 334 VXNlcm5hbWU6
        c: *
        s: 501 5.0.0 Error: authentication cancelled
        c: AUTH LOGIN
        s: 334 VXNlcm5hbWU6
        c: dXNlcg==
        s: 334 UGFzc3dvcmQ6
        c: *
        s: 501 5.0.0 Error: authentication cancelled
        c: NOOP
        s: 250 2.0.0 Ok
        """,
        settings=TLS_SETTINGS,
    )
    assert auth_requests(peer) == []
    assert peer.conn.authenticated is None


# --- LOGIN -------------------------------------------------------------------------------------


def test_login(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH LOGIN
        s: 334 VXNlcm5hbWU6
        c: {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: {b64(PASSWORD)}
        s: 235 2.7.0 Authentication successful
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert auth_requests(peer) == [AuthRequest("LOGIN", "", USER, PASSWORD, replies.AUTH_SUCCEEDED)]
    assert [event for event in peer.events if isinstance(event, AuthChallenge)] == [
        AuthChallenge("LOGIN", replies.LOGIN_USERNAME),
        AuthChallenge("LOGIN", replies.LOGIN_PASSWORD),
    ]
    assert peer.conn.authenticated == USER


def test_login_with_initial_response(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH LOGIN {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: {b64(PASSWORD)}
        s: 235 2.7.0 Authentication successful
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert peer.conn.authenticated == USER


def test_login_bad_responses(mode: str) -> None:
    b64_nul_user, b64_nul_password, b64_bad_utf8 = b64(b"us\0er"), b64(b"pa\0ss"), b64(b"p\xff")
    tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH LOGIN
        s: 334 VXNlcm5hbWU6
        c: dXNlcg
        s: 501 5.5.2 Error: cannot decode authentication response
        c: AUTH LOGIN {b64_nul_user}
        s: 501 5.5.2 Error: cannot decode authentication response
        c: AUTH LOGIN {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: {b64_bad_utf8}
        s: 501 5.5.2 Error: cannot decode authentication response
        c: AUTH LOGIN {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: {b64_nul_password}
        s: 501 5.5.2 Error: cannot decode authentication response
        """,
        settings=TLS_SETTINGS,
    )


def test_sasl_responses_are_not_commands(mode: str) -> None:
    # "QUIT" is valid base64: as a response it is a password, never a command.
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH LOGIN {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: QUIT
        s: 535 5.7.8 Error: authentication credentials invalid
        c: AUTH LOGIN
        s: 334 VXNlcm5hbWU6
        c: RSET
        s: 501 5.5.2 Error: cannot decode authentication response
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert auth_requests(peer)[0].password == base64.b64decode("QUIT").decode()
    assert not any(isinstance(event, (MailFrom, ConnectionClosed)) for event in peer.events[:-1])


# --- the I/O layer's answers -------------------------------------------------------------------


def test_wrong_credentials_then_right_ones(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN {plain(password="wrong")}
        s: 535 5.7.8 Error: authentication credentials invalid
        c: AUTH LOGIN {b64("nobody@mx.test")}
        s: 334 UGFzc3dvcmQ6
        c: {b64(PASSWORD)}
        s: 535 5.7.8 Error: authentication credentials invalid
        c: AUTH PLAIN {PLAIN}
        s: 235 2.7.0 Authentication successful
        c: AUTH PLAIN {PLAIN}
        s: 503 5.5.1 Error: already authenticated
        """,
        settings=TLS_SETTINGS,
        answer=check_password,
    )
    assert [event.username for event in auth_requests(peer)] == [USER, "nobody@mx.test", USER]
    assert peer.conn.authenticated == USER


def test_temporary_failure(mode: str) -> None:
    def unavailable(event: Event) -> Reply | None:
        return replies.AUTH_TEMPORARY_FAILURE if isinstance(event, AuthRequest) else None

    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN {PLAIN}
        s: 454 4.7.0 Error: temporary authentication failure
        """,
        settings=TLS_SETTINGS,
        answer=unavailable,
    )
    assert peer.conn.authenticated is None


def test_failed_attempts_count_as_errors(mode: str) -> None:
    settings = attrs.evolve(TLS_SETTINGS, max_errors=3)
    bad = plain(password="wrong")
    tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN {bad}
        s: 535 5.7.8 Error: authentication credentials invalid
        c: AUTH PLAIN {bad}
        s: 535 5.7.8 Error: authentication credentials invalid
        c: AUTH PLAIN
        s: 334
        c: *
        s: 501 5.0.0 Error: authentication cancelled
        c: AUTH PLAIN {PLAIN}
        s: 421 4.7.0 mx.test Error: too many errors
        """,
        settings=settings,
        answer=check_password,
    )


def test_lockout_on_the_request_and_on_the_challenge(mode: str) -> None:
    def locked(event: Event) -> Reply | None:
        if isinstance(event, (AuthRequest, AuthChallenge)):
            return replies.auth_locked_out("mx.test")
        return None

    for command in (f"AUTH PLAIN {PLAIN}", "AUTH LOGIN"):
        peer = tls_dialog(
            mode,
            EHLO_TLS
            + f"""
            c: {command}
            s: 421 4.7.0 mx.test Error: too many failed authentication attempts
            c: {PLAIN}
            """,
            settings=TLS_SETTINGS,
            answer=locked,
        )
        assert peer.closed


def test_refused_challenge_ends_the_exchange(mode: str) -> None:
    # The next line is a command again; an unknown word is reported without echoing it (it
    # may be a password), as "?".
    def busy(event: Event) -> Reply | None:
        return replies.AUTH_TEMPORARY_FAILURE if isinstance(event, AuthChallenge) else None

    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH LOGIN
        s: 454 4.7.0 Error: temporary authentication failure
        c: {b64(PASSWORD)}
        s: 500 5.5.2 Error: command not recognized
        c: NOOP
        s: 250 2.0.0 Ok
        """,
        settings=TLS_SETTINGS,
        answer=busy,
    )
    assert Respond("?", replies.UNKNOWN_COMMAND) in peer.events


# --- when AUTH is allowed ----------------------------------------------------------------------


def test_auth_before_tls_needs_encryption(mode: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_PLAIN
        + f"""
        c: AUTH PLAIN {PLAIN}
        s: 538 5.7.11 Error: encryption required for requested authentication mechanism
        c: AUTH LOGIN
        s: 538 5.7.11 Error: encryption required for requested authentication mechanism
        c: {b64(PASSWORD)}
        s: 500 5.5.2 Error: command not recognized
        c: STARTTLS
        s: 220 2.0.0 Ready to start TLS
        -- tls
        """
        + EHLO_TLS
        + f"""
        c: AUTH PLAIN {PLAIN}
        s: 235 2.7.0 Authentication successful
        """,
        answer=check_password,
    )
    assert len(auth_requests(peer)) == 1
    assert all(PASSWORD not in repr(event) for event in peer.events)


def test_auth_not_offered(mode: str) -> None:
    settings = attrs.evolve(TLS_SETTINGS, auth_mechanisms=())
    tls_dialog(
        mode,
        f"""
        c: AUTH PLAIN {PLAIN}
        s: 502 5.5.1 Error: command not implemented
        c: EHLO client.test
        s: 250-mx.test Hello client.test
        s: 250-SIZE 1000
        s: 250-8BITMIME
        s: 250-PIPELINING
        s: 250-CHUNKING
        s: 250-BINARYMIME
        s: 250-ENHANCEDSTATUSCODES
        s: 250 SMTPUTF8
        c: AUTH LOGIN
        s: 502 5.5.1 Error: command not implemented
        c: MAIL FROM:<a@client.test> AUTH=<>
        s: 555 5.5.4 Error: unsupported parameter
        """,
        settings=settings,
    )


def test_auth_without_tls_when_allowed(mode: str) -> None:
    # require_tls_for_auth=False (a test set-up, say): AUTH on a plain connection, and the
    # authentication is forgotten by STARTTLS (RFC 3207 4.2).
    settings = attrs.evolve(STARTTLS_SETTINGS, require_tls_for_auth=False)
    peer = tls_dialog(
        mode,
        """
        c: EHLO client.test
        """
        + EHLO_PLAIN.split("c: EHLO client.test", 1)[1].replace(
            "250 STARTTLS", "250-STARTTLS\n    s: 250 AUTH PLAIN LOGIN"
        )
        + f"""
        c: AUTH PLAIN {PLAIN}
        s: 235 2.7.0 Authentication successful
        c: STARTTLS
        s: 220 2.0.0 Ready to start TLS
        -- tls
        """
        + EHLO_TLS
        + """
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        """,
        settings=settings,
    )
    assert peer.conn.authenticated is None


def test_auth_sequence_and_syntax(mode: str) -> None:
    tls_dialog(
        mode,
        f"""
        c: AUTH PLAIN {PLAIN}
        s: 503 5.5.1 Error: send HELO/EHLO first
        """
        + EHLO_TLS
        + f"""
        c: AUTH
        s: 501 5.5.4 Syntax: AUTH mechanism [initial-response]
        c: AUTH PLAIN {PLAIN} more
        s: 501 5.5.4 Syntax: AUTH mechanism [initial-response]
        c: AUTH CRAM-MD5
        s: 504 5.5.4 Error: unsupported authentication mechanism
        c: AUTH GSSAPI {PLAIN}
        s: 504 5.5.4 Error: unsupported authentication mechanism
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: AUTH PLAIN {PLAIN}
        s: 503 5.5.1 Error: MAIL transaction in progress
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: AUTH PLAIN
        s: 503 5.5.1 Error: MAIL transaction in progress
        c: RSET
        s: 250 2.0.0 Ok
        c: HELO client.test
        s: 250 mx.test Hello client.test
        c: AUTH PLAIN {PLAIN}
        s: 235 2.7.0 Authentication successful
        c: EHLO client.test
        """
        + EHLO_TLS.split("c: EHLO client.test", 1)[1]
        + """
        c: AUTH LOGIN
        s: 503 5.5.1 Error: already authenticated
        """,
        settings=TLS_SETTINGS,
    )


def test_only_the_configured_mechanisms(mode: str) -> None:
    settings = attrs.evolve(TLS_SETTINGS, auth_mechanisms=("PLAIN",))
    tls_dialog(
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
        s: 250-SMTPUTF8
        s: 250 AUTH PLAIN
        c: AUTH LOGIN
        s: 504 5.5.4 Error: unsupported authentication mechanism
        """,
        settings=settings,
    )


# --- submission: AUTH before MAIL --------------------------------------------------------------


def test_submission_requires_auth(mode: str) -> None:
    settings = attrs.evolve(STARTTLS_SETTINGS, require_auth=True)
    peer = tls_dialog(
        mode,
        EHLO_PLAIN
        + """
        c: MAIL FROM:<a@client.test>
        s: 530 5.7.0 Error: authentication required
        c: STARTTLS
        s: 220 2.0.0 Ready to start TLS
        -- tls
        """
        + EHLO_TLS
        + f"""
        c: MAIL FROM:<{USER}>
        s: 530 5.7.0 Error: authentication required
        c: AUTH PLAIN {plain(password="wrong")}
        s: 535 5.7.8 Error: authentication credentials invalid
        c: MAIL FROM:<{USER}>
        s: 530 5.7.0 Error: authentication required
        c: AUTH PLAIN {PLAIN}
        s: 235 2.7.0 Authentication successful
        c: MAIL FROM:<{USER}> AUTH=<>
        s: 250 2.1.0 Ok
        c: RCPT TO:<friend@elsewhere.test>
        s: 250 2.1.5 Ok
        """,
        settings=settings,
        answer=check_password,
    )
    assert peer.conn.received_with(smtputf8=False) == "ESMTPSA"


def test_implicit_tls_submission(mode: str) -> None:
    tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: MAIL FROM:<{USER}>
        s: 530 5.7.0 Error: authentication required
        c: AUTH LOGIN
        s: 334 VXNlcm5hbWU6
        c: {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: {b64(PASSWORD)}
        s: 235 2.7.0 Authentication successful
        c: MAIL FROM:<{USER}>
        s: 250 2.1.0 Ok
        """,
        settings=IMPLICIT_TLS_SETTINGS,
        answer=check_password,
    )


def test_pipelined_mail_sees_the_auth_result() -> None:
    for answer, mail_reply in (
        (check_password, b"250 2.1.0 Ok"),
        (lambda event: replies.AUTH_FAILED if isinstance(event, AuthRequest) else None, b"530"),
    ):
        peer = TlsPeer.start(IMPLICIT_TLS_SETTINGS, answer)
        peer.feed(f"EHLO c.test\r\nAUTH PLAIN {PLAIN}\r\nMAIL FROM:<{USER}>\r\n".encode())
        assert peer.out.split(b"\r\n")[-2].startswith(mail_reply)


# --- MAIL AUTH= --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "<>",
        "user@mx.test",
        "user+2Bextra@mx.test",  # "+" itself is hex-encoded
        "",  # xtext may be empty
        "+3Cuser+3E@mx.test",
    ],
)
def test_mail_auth_parameter(mode: str, value: str) -> None:
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: MAIL FROM:<a@client.test> auth={value} SIZE=10
        s: 250 2.1.0 Ok
        """,
        settings=TLS_SETTINGS,
    )
    mail = peer.events[1]
    assert isinstance(mail, MailFrom) and mail.size == 10


def test_mail_auth_parameter_errors(mode: str) -> None:
    tls_dialog(
        mode,
        EHLO_TLS
        + """
        c: MAIL FROM:<a@client.test> AUTH
        s: 501 5.5.4 Error: bad AUTH value
        c: MAIL FROM:<a@client.test> AUTH=a=b
        s: 501 5.5.4 Error: bad AUTH value
        c: MAIL FROM:<a@client.test> AUTH=a+2
        s: 501 5.5.4 Error: bad AUTH value
        c: MAIL FROM:<a@client.test> AUTH=a+2b
        s: 501 5.5.4 Error: bad AUTH value
        c: MAIL FROM:<a@client.test> AUTH=é
        s: 501 5.5.4 Error: bad AUTH value
        c: MAIL FROM:<a@client.test> AUTH=<> AUTH=<>
        s: 555 5.5.4 Error: duplicate parameter
        """,
        settings=TLS_SETTINGS,
    )


def test_mail_auth_parameter_only_when_auth_is_offered(mode: str) -> None:
    tls_dialog(
        mode,
        EHLO_PLAIN
        + """
        c: MAIL FROM:<a@client.test> AUTH=<>
        s: 555 5.5.4 Error: unsupported parameter
        """,
    )


def test_mail_line_limit_with_auth(mode: str) -> None:
    # RFC 4954 5: 500 more octets for MAIL while AUTH is offered: 1064 with CRLF.
    start = "MAIL FROM:<a@client.test> AUTH="
    longest = start + "x" * (1064 - 2 - len(start))
    plain_longest = start + "x" * (564 - 2 - len(start))
    tls_dialog(
        mode,
        EHLO_PLAIN
        + f"""
        c: {plain_longest}
        s: 555 5.5.4 Error: unsupported parameter
        c: {plain_longest}x
        s: 500 5.5.6 Error: line too long
        c: STARTTLS
        s: 220 2.0.0 Ready to start TLS
        -- tls
        """
        + EHLO_TLS
        + f"""
        c: {longest}x
        s: 500 5.5.6 Error: line too long
        c: RCPT TO:<{"x" * 600}@mx.test>
        s: 500 5.5.6 Error: line too long
        c: {longest}
        s: 250 2.1.0 Ok
        """,
    )


# --- bounds and secrecy ------------------------------------------------------------------------


def test_sasl_line_limit(mode: str) -> None:
    # RFC 4954 4: a response line may be 12288 octets; longer ones get 500 5.5.6.
    def plain_of(password_length: int) -> str:
        return plain(password="p" * password_length)

    fits = 12288 - 2
    longest = max(n for n in range(9000, 9300) if len(plain_of(n)) <= fits)
    assert len(plain_of(longest)) > fits - 4
    too_long = plain_of(longest + 3)
    assert len(too_long) == len(plain_of(longest)) + 4
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH PLAIN
        s: 334
        c: {too_long}
        s: 500 5.5.6 Error: line too long
        c: AUTH PLAIN
        s: 334
        c: {"A" * 20000}
        s: 500 5.5.6 Error: line too long
        c: AUTH PLAIN
        s: 334
        c: {plain_of(longest)}
        s: 235 2.7.0 Authentication successful
        """,
        settings=TLS_SETTINGS,
    )
    assert len(auth_requests(peer)[0].password) == longest
    assert all(
        event.verb == "AUTH"
        for event in peer.events
        if isinstance(event, Respond) and event.reply == replies.LINE_TOO_LONG
    )


def test_sasl_memory_is_bounded() -> None:
    peer = TlsPeer.start(TLS_SETTINGS)
    peer.feed(b"EHLO c.test\r\nAUTH LOGIN\r\n")
    for _ in range(100):
        peer.feed(b"A" * 10_000)
        assert len(peer.conn._buf) <= 12288
    peer.feed(b"\r\nNOOP\r\n")
    assert peer.replies[-2:] == ["500 5.5.6 Error: line too long", "250 2.0.0 Ok"]


def test_the_password_is_in_no_repr() -> None:
    event = AuthRequest("PLAIN", "", USER, PASSWORD, replies.AUTH_SUCCEEDED)
    assert PASSWORD not in repr(event)
    assert PASSWORD not in str(event)
    assert USER in repr(event)


def test_responses_never_become_verbs(mode: str) -> None:
    # Whatever happens to a SASL exchange, Respond.verb (which the I/O layer logs) never holds
    # any of the client's response.
    secret = b64("hunter2hunter2")
    peer = tls_dialog(
        mode,
        EHLO_TLS
        + f"""
        c: AUTH LOGIN {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: *
        s: 501 5.0.0 Error: authentication cancelled
        c: {secret}
        s: 500 5.5.2 Error: command not recognized
        c: {secret} {secret}
        s: 500 5.5.2 Error: command not recognized
        c: {secret * 50}
        s: 500 5.5.6 Error: line too long
        c~ {secret}\\xff\\r\\n
        s: 501 5.5.2 Error: invalid character in command
        c~ {secret}\\x00\\r\\n
        s: 501 5.5.2 Error: invalid character in command
        """,
        settings=TLS_SETTINGS,
    )
    verbs = {event.verb for event in peer.events if isinstance(event, Respond)}
    assert verbs - {"NOOP"} == {"AUTH", "?"}


def test_a_connection_without_tls_settings_is_unchanged() -> None:
    # The defaults offer neither STARTTLS nor AUTH: the receiver of issue 2 sees no difference.
    conn = ServerConnection(attrs.evolve(TLS_SETTINGS, tls=False, auth_mechanisms=()))
    assert not conn.tls and conn.authenticated is None and not conn.awaiting_tls
