"""SMTP replies as values, and every canonical reply katerchen sends, with the RFC behind it.

A :class:`Reply` is a three-digit code, an RFC 3463 enhanced status code and a text. The server
side proposes these replies in its events; the I/O layer (the receiver) sends them, or one of the
receiver replies at the end of this module, through ``ServerConnection.send``.

RFC 2034 section 3 puts the enhanced code on every line of every 2xx, 4xx and 5xx reply except
the greeting and the EHLO/HELO reply; intermediate 3xx replies (354) carry none either.
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["Reply"]


@attrs.frozen
class Reply:
    """One SMTP reply.

    ``code`` is the RFC 5321 reply code, ``enhanced`` the RFC 3463 code (``"2.0.0"``) or None
    where RFC 2034 section 3 has none, ``text`` one line or a tuple of lines (a multi-line
    reply, RFC 5321 4.2.1), and ``close`` whether the server closes the connection after it.
    """

    code: int
    enhanced: str | None
    text: str | tuple[str, ...]
    close: bool = False

    @property
    def lines(self) -> tuple[str, ...]:
        """The text as a tuple of lines (at least one)."""
        if isinstance(self.text, str):
            return (self.text,)
        return self.text or ("",)

    def to_bytes(self) -> bytes:
        """The reply on the wire: ``"250-..."`` continuation lines, then ``"250 ..."``.

        CR and LF inside a line become spaces, so no text can inject a reply line.
        """
        lines = self.lines
        head = str(self.code)
        enhanced = "" if self.enhanced is None else self.enhanced + " "
        last = len(lines) - 1
        out = []
        for index, line in enumerate(lines):
            if "\r" in line or "\n" in line:
                line = line.replace("\r", " ").replace("\n", " ")
            out.append(f"{head}{' ' if index == last else '-'}{enhanced}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")


# --- session -------------------------------------------------------------------------------


# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including the code and CRLF.
_REPLY_LINE_LIMIT: Final = 512


def _hello_line(hostname: str, name: str) -> str:
    """The first line of the EHLO/HELO reply, with the client's name cut to fit the limit.

    The name is only echoed for the log-reader's benefit, so a name too long for one reply line
    (EHLO accepts up to the 512-octet command line) is shortened rather than sent in full.
    """
    line = f"{hostname} Hello {name}"
    room = _REPLY_LINE_LIMIT - len("250-") - len("\r\n")
    encoded = line.encode("utf-8", "replace")
    if len(encoded) <= room:
        return line
    return encoded[:room].decode("utf-8", "ignore")


def greeting(hostname: str) -> Reply:
    """RFC 5321 4.2 / 4.3.1: the 220 opening line; "ESMTP" invites EHLO (RFC 5321 3.1)."""
    return Reply(220, None, f"{hostname} ESMTP katerchen")


def ehlo(
    hostname: str,
    name: str,
    *,
    max_message_size: int,
    starttls: bool = False,
    auth: tuple[str, ...] = (),
) -> Reply:
    """RFC 5321 4.1.1.1: the EHLO reply and the extensions katerchen offers (RFC 5321 4.1.4).

    SIZE (RFC 1870), 8BITMIME (RFC 6152), PIPELINING (RFC 2920), CHUNKING and BINARYMIME
    (RFC 3030), ENHANCEDSTATUSCODES (RFC 2034), SMTPUTF8 (RFC 6531); STARTTLS (RFC 3207) when
    ``starttls``, and AUTH with the SASL mechanisms in ``auth`` (RFC 4954 section 3) when there
    are any. No enhanced code (RFC 2034 section 3).
    """
    lines = [
        _hello_line(hostname, name),
        f"SIZE {max_message_size}",
        "8BITMIME",
        "PIPELINING",
        "CHUNKING",
        "BINARYMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
    ]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH " + " ".join(auth))
    return Reply(250, None, tuple(lines))


def helo(hostname: str, name: str) -> Reply:
    """RFC 5321 4.1.1.1: the HELO reply, one line, no extensions and no enhanced code."""
    return Reply(250, None, _hello_line(hostname, name))


#: RFC 5321 4.1.1.5 (RSET) and 4.1.1.9 (NOOP).
OK: Final = Reply(250, "2.0.0", "Ok")
#: RFC 5321 4.1.1.2; RFC 3463 3.2 X.1.0 "other address status" for an accepted sender.
SENDER_OK: Final = Reply(250, "2.1.0", "Ok")
#: RFC 5321 4.1.1.3; RFC 3463 3.2 X.1.5 "destination address valid".
RECIPIENT_OK: Final = Reply(250, "2.1.5", "Ok")
#: RFC 5321 4.1.1.4: the intermediate reply to DATA (3xx: no enhanced code, RFC 2034 section 3).
START_DATA: Final = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
#: RFC 5321 4.1.1.4: the proposed reply to a complete message. The receiver replaces it with
#: :func:`queued` once the message is durable.
MESSAGE_OK: Final = Reply(250, "2.0.0", "Ok")
#: RFC 5321 4.1.1.10: QUIT; the server closes after it.
BYE: Final = Reply(221, "2.0.0", "Bye", close=True)
#: RFC 5321 4.1.1.8: HELP. The reply lists what this server understands.
HELP: Final = Reply(
    214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
)
#: RFC 5321 3.5.3 and 7.3: VRFY is answered without confirming or denying a mailbox.
CANNOT_VRFY: Final = Reply(
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
#: RFC 5321 3.5.2 and 7.3: EXPN reveals list members; sites may disable it (502: RFC 5321 4.2.4).
EXPN_DISABLED: Final = Reply(502, "5.5.1", "Error: EXPN is not supported")


def chunk_received(size: int) -> Reply:
    """RFC 3030 section 2 and 4: the reply to a BDAT chunk that is not the last one."""
    return Reply(250, "2.0.0", f"{size} octets received")


# --- command errors ------------------------------------------------------------------------

#: RFC 5321 4.2.4: the command word is not one this server knows.
UNKNOWN_COMMAND: Final = Reply(500, "5.5.2", "Error: command not recognized")
#: RFC 5321 4.2.4: 502 for a command that is known but not offered here (STARTTLS and AUTH when
#: the settings do not offer them, and the old or optional verbs).
NOT_IMPLEMENTED: Final = Reply(502, "5.5.1", "Error: command not implemented")
#: RFC 5321 4.2.4: an empty command line.
EMPTY_COMMAND: Final = Reply(500, "5.5.2", "Error: bad syntax")
#: RFC 5321 4.5.3.1.4 and 4.5.3.1.10 ("500 Line too long"); X.5.6 as in the IANA registry.
LINE_TOO_LONG: Final = Reply(500, "5.5.6", "Error: line too long")
#: RFC 5321 4.1.1 (commands are ASCII) / RFC 6531 3.3 (UTF-8 only in addresses): a NUL byte or
#: bytes that are not UTF-8.
BAD_CHARACTER: Final = Reply(501, "5.5.2", "Error: invalid character in command")
#: RFC 5321 4.1.1.1: EHLO/HELO with a name no domain or literal can be (control characters).
BAD_HELLO_NAME: Final = Reply(501, "5.5.4", "Error: invalid hostname")


def syntax(usage: str) -> Reply:
    """RFC 5321 4.2.4 / RFC 3463 X.5.4: arguments that do not fit the command."""
    return Reply(501, "5.5.4", f"Syntax: {usage}")


#: RFC 1870 section 6: a SIZE value that is not 1*20DIGIT.
BAD_SIZE: Final = Reply(501, "5.5.4", "Error: bad SIZE value")
#: RFC 6152 section 2 / RFC 3030 section 3: BODY takes 7BIT, 8BITMIME or BINARYMIME.
BAD_BODY: Final = Reply(501, "5.5.4", "Error: bad BODY value")
#: RFC 6531 3.4: the SMTPUTF8 parameter has no value.
BAD_SMTPUTF8: Final = Reply(501, "5.5.4", "Error: SMTPUTF8 takes no value")
#: RFC 5321 4.1.1.11 and 4.2.4: a MAIL or RCPT parameter this server does not implement.
UNKNOWN_PARAMETER: Final = Reply(555, "5.5.4", "Error: unsupported parameter")
#: RFC 5321 4.1.1.11 (each parameter at most once) with 555 as above.
DUPLICATE_PARAMETER: Final = Reply(555, "5.5.4", "Error: duplicate parameter")
#: RFC 5321 4.1.1.11 / RFC 1869: parameters are service extensions, which need EHLO.
PARAMETERS_NEED_EHLO: Final = Reply(555, "5.5.4", "Error: parameters need EHLO")


def bad_sender(reason: str) -> Reply:
    """RFC 5321 4.1.2 and 4.5.3.1 ("501 Path too long"); RFC 3463 X.1.7 bad sender syntax."""
    return Reply(501, "5.1.7", f"Error: bad sender address syntax ({reason})")


def bad_recipient(reason: str) -> Reply:
    """RFC 5321 4.1.2 and 4.5.3.1; RFC 3463 X.1.3 bad destination mailbox address syntax."""
    return Reply(501, "5.1.3", f"Error: bad recipient address syntax ({reason})")


#: RFC 6531 3.5: a non-ASCII MAIL path without SMTPUTF8 gets 550 ("mailbox unavailable")...
NON_ASCII_SENDER: Final = Reply(550, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
#: ... and a non-ASCII RCPT path 553 ("mailbox name not allowed"), both X.6.7 (RFC 5248).
NON_ASCII_RECIPIENT: Final = Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")

# --- sequence errors (from the transition table in server.py) ------------------------------

#: RFC 5321 4.1.4: MAIL needs a session opened with EHLO or HELO; 503 per RFC 5321 4.3.2.
NEED_HELLO: Final = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
#: RFC 5321 4.1.4 and 3.3: RCPT needs a transaction.
NEED_MAIL: Final = Reply(503, "5.5.1", "Error: need MAIL command")
#: RFC 5321 3.3 and 4.1.1.4 / RFC 3030 section 2: DATA and BDAT need an accepted recipient.
NEED_RCPT: Final = Reply(503, "5.5.1", "Error: need RCPT command")
#: RFC 5321 4.1.4: MAIL inside a transaction.
NESTED_MAIL: Final = Reply(503, "5.5.1", "Error: nested MAIL command")
#: RFC 3030 section 2: recipients come before the first chunk.
RCPT_AFTER_BDAT: Final = Reply(503, "5.5.1", "Error: RCPT after BDAT")
#: RFC 3030 section 2: DATA and BDAT cannot be mixed in one transaction.
DATA_AFTER_BDAT: Final = Reply(503, "5.5.1", "Error: DATA after BDAT")
#: RFC 3030 section 3: BODY=BINARYMIME content can only be sent with BDAT.
BINARYMIME_NEEDS_BDAT: Final = Reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT")

#: RFC 4954 section 4 ("AUTH command is not permitted during a mail transaction") and RFC 3207
#: (STARTTLS resets the session, so it is refused inside a transaction as Postfix does).
TRANSACTION_IN_PROGRESS: Final = Reply(503, "5.5.1", "Error: MAIL transaction in progress")

# --- STARTTLS (RFC 3207) ---------------------------------------------------------------------

#: RFC 3207 section 4: the go-ahead; the TLS handshake starts right after this line.
READY_FOR_TLS: Final = Reply(220, "2.0.0", "Ready to start TLS")
#: RFC 3207 section 4: 454 when TLS cannot be started now (e.g. no certificate loaded).
TLS_UNAVAILABLE: Final = Reply(454, "4.7.0", "Error: TLS not available due to temporary reason")
#: RFC 3207 section 4.2 stops offering STARTTLS once TLS is active; a STARTTLS anyway is out of
#: sequence, so 503 (RFC 5321 4.2.4) rather than Postfix's 554.
TLS_ALREADY_ACTIVE: Final = Reply(503, "5.5.1", "Error: TLS already active")

# --- AUTH (RFC 4954) -------------------------------------------------------------------------

#: RFC 4954 section 4: the empty challenge that asks for the PLAIN response (RFC 4616).
PLAIN_CHALLENGE: Final = Reply(334, None, "")
#: The LOGIN mechanism (draft-murchison-sasl-login): base64 "Username:" and "Password:".
LOGIN_USERNAME: Final = Reply(334, None, "VXNlcm5hbWU6")
LOGIN_PASSWORD: Final = Reply(334, None, "UGFzc3dvcmQ6")
#: RFC 4954 section 6: the credentials were accepted.
AUTH_SUCCEEDED: Final = Reply(235, "2.7.0", "Authentication successful")
#: RFC 4954 section 6: 535 5.7.8, the credentials were wrong.
AUTH_FAILED: Final = Reply(535, "5.7.8", "Error: authentication credentials invalid")
#: RFC 4954 section 6: 454 4.7.0, the credentials could not be checked now.
AUTH_TEMPORARY_FAILURE: Final = Reply(454, "4.7.0", "Error: temporary authentication failure")
#: RFC 4954 section 6: 538 5.7.11, AUTH before TLS.
ENCRYPTION_REQUIRED: Final = Reply(
    538, "5.7.11", "Error: encryption required for requested authentication mechanism"
)
#: RFC 4954 section 6: 530 5.7.0, MAIL before AUTH where policy requires it (RFC 6409 4.3).
AUTH_REQUIRED: Final = Reply(530, "5.7.0", "Error: authentication required")
#: RFC 4954 section 4: the client cancelled the exchange with "*".
AUTH_CANCELLED: Final = Reply(501, "5.0.0", "Error: authentication cancelled")
#: RFC 4954 section 4: a response that is not base64, or (RFC 4616) a malformed PLAIN message.
BAD_AUTH_RESPONSE: Final = Reply(501, "5.5.2", "Error: cannot decode authentication response")
#: RFC 4954 section 4: 504 5.5.4 for a mechanism the server does not offer.
UNSUPPORTED_MECHANISM: Final = Reply(504, "5.5.4", "Error: unsupported authentication mechanism")
#: RFC 4954 section 4: AUTH once a session is authenticated.
ALREADY_AUTHENTICATED: Final = Reply(503, "5.5.1", "Error: already authenticated")
#: RFC 4954 section 5: the MAIL AUTH= value is not xtext (RFC 3461 4).
BAD_AUTH_PARAMETER: Final = Reply(501, "5.5.4", "Error: bad AUTH value")


def auth_locked_out(hostname: str) -> Reply:
    """Too many failed AUTH attempts from this client: 421 4.7.0 (as RFC 4954 section 6
    suggests for temporary refusals) and the connection is closed (RFC 5321 3.8)."""
    return Reply(
        421, "4.7.0", f"{hostname} Error: too many failed authentication attempts", close=True
    )


# --- transaction limits --------------------------------------------------------------------

#: RFC 1870 section 6.1 / RFC 5321 4.5.3.1.10 ("552 Too much mail data"); RFC 3463 X.3.4.
MESSAGE_TOO_BIG: Final = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
#: RFC 5321 4.5.3.1.10 (452 for too many recipients, so the client retries the rest later);
#: RFC 3463 X.5.3. Not counted as an error.
TOO_MANY_RECIPIENTS: Final = Reply(452, "4.5.3", "Error: too many recipients")
#: Postfix smtpd_forbid_bare_newline = reject; RFC 5321 2.3.8 (lines end with CRLF) and
#: RFC 3463 X.6.0 "other or undefined media error".
BARE_LINEFEED: Final = Reply(
    550, "5.6.0", "Error: bare <LF> received; lines must end with <CR><LF>"
)


# --- closing -------------------------------------------------------------------------------


def too_many_errors(hostname: str) -> Reply:
    """RFC 5321 3.8 and 4.2.2 (421 closes the channel); RFC 3463 X.7.0."""
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors", close=True)


#: RFC 5321 4.2.4 (502 command not implemented) for an HTTP request: whatever is talking,
#: it is not an SMTP client, so the server hangs up (cf. Postfix smtpd_forbidden_commands).
HTTP_REQUEST: Final = Reply(502, "5.5.1", "Error: this is an SMTP server, not HTTP", close=True)


# --- replies the receiver sends (kept here so all replies live together) --------------------


def queued(queue_id: str) -> Reply:
    """RFC 5321 4.1.1.4: the message is durably stored and katerchen is responsible for it."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


#: RFC 5321 4.2.2 451 / RFC 3463 X.3.0: the spool could not store the message.
LOCAL_ERROR: Final = Reply(451, "4.3.0", "Error: local error in processing")
#: RFC 5321 4.2.2 452 / RFC 3463 X.3.1: not enough free space for another message.
INSUFFICIENT_STORAGE: Final = Reply(452, "4.3.1", "Error: insufficient system storage")
#: RFC 5321 4.2.2 550 / RFC 3463 X.1.1: no such mailbox at a served domain.
UNKNOWN_MAILBOX: Final = Reply(550, "5.1.1", "Error: mailbox unavailable")
#: RFC 5321 3.6.2 and 7.1 / RFC 3463 X.7.1: katerchen is not an open relay.
RELAY_DENIED: Final = Reply(550, "5.7.1", "Error: relaying denied")


def shutting_down(hostname: str) -> Reply:
    """RFC 5321 3.8: 421 when the server shuts down; RFC 3463 X.3.2 system not accepting."""
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, closing connection", close=True)


def timeout(hostname: str) -> Reply:
    """RFC 5321 4.5.3.2: the client was too slow; RFC 3463 X.4.2 bad connection."""
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded", close=True)


def too_many_connections(hostname: str) -> Reply:
    """RFC 5321 3.8 / 4.2.2: connection limits; RFC 3463 X.7.0 (as Postfix's anvil limits)."""
    return Reply(421, "4.7.0", f"{hostname} Error: too many connections", close=True)
