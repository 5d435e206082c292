"""The server side of SMTP, sans-IO: bytes in, events out; replies in, bytes out.

Theory of operation
-------------------

:class:`ServerConnection` never touches a socket or a clock (h11's model). The I/O layer feeds
it whatever it reads with :meth:`~ServerConnection.receive_data` and pulls
:meth:`~ServerConnection.next_event` until it returns ``NEED_DATA`` (read more) or ``PAUSED``.
Parsing is lazy: bytes are only looked at inside ``next_event``, so a pipelined batch of
commands is taken one command at a time, each seeing the state left by the replies before it.

Every event except :class:`DataChunk` and :class:`ConnectionClosed` needs exactly one reply,
and the connection is ``PAUSED`` until :meth:`~ServerConnection.send` gets it. The event
proposes a reply; the I/O layer sends that one, or one of its own (a rejection). ``send``
then moves the session along the ONE transition table, ``_TRANSITIONS`` below: a 2xx/3xx
reply accepts the command (the table's state is taken), a 4xx/5xx reply leaves the state as
it was -- except for the end of a message or a BDAT chunk, after which the transaction is over
whatever the reply said. A command the table refuses in the current state gets the 503 reply
the table holds, without any event of its own. NOOP, HELP, VRFY and EXPN are allowed in every
state and change nothing, so they are not in the table.

Three byte-level readers sit under the table:

- command lines (``_read_line``): up to LF, a CR before it dropped; bounded to the longest
  legal line, longer lines are skipped to their end and answered 500 5.5.6;
- DATA content (``_read_data``): scanned with ``bytes.find`` for CRLF "." CRLF, dot-unstuffed
  and bare-LF-normalized with ``bytes.replace``, never line by line. The CRLF before the dot is
  the previous line's own ending, so a "." line after a bare LF, or ending in one, never ends
  the message: the smuggling sequences stay inside it (and are normalized or refused);
- BDAT chunks (``_read_bdat``): exactly the announced octets, byte-exact.

The only other per-connection state is the transaction (sender parameters, recipient count,
message size), the error count that ends abusive sessions, whether the connection is TLS and
who authenticated.

STARTTLS and AUTH
-----------------

STARTTLS (RFC 3207) is a command whose accepting reply switches protocols, as an HTTP Upgrade
does in h11: once the 220 is sent the session enters ``TLS`` (in the table), every byte buffered
behind the STARTTLS line is thrown away, ``receive_data`` throws away whatever it is given and
``next_event`` says ``PAUSED`` until the I/O layer calls :meth:`ServerConnection.tls_started`
after its handshake. That is the whole defence against the command injection of CVE-2011-0411:
plaintext sent before the handshake can never be read as a command. ``tls_started`` forgets
everything the client said (RFC 3207 4.2) and starts over at ``GREETED``.

AUTH (RFC 4954) runs in ``READY``: a 334 challenge (:class:`AuthChallenge`) switches the reader to
one SASL response line (``_read_sasl``), which is never parsed as a command, and the completed
exchange becomes an :class:`AuthRequest` for the I/O layer to verify. Only PLAIN (RFC 4616) and
LOGIN exist here, neither with a security layer, so a success changes nothing but
:attr:`ServerConnection.authenticated`. Offering them is the settings' business (see
:class:`ServerSettings`); whether a command is offered is checked before the table is asked.
"""

from __future__ import annotations

import binascii
import enum
import re
from collections.abc import Callable
from typing import Final, TypeAlias

import attrs

from katerchen import address as _address
from katerchen.address import Address, AddressError
from katerchen.protocol import replies
from katerchen.protocol.replies import Reply

__all__ = [
    "AUTH_MECHANISMS",
    "NEED_DATA",
    "PAUSED",
    "AuthChallenge",
    "AuthRequest",
    "ChunkEnd",
    "ConnectionClosed",
    "DataChunk",
    "DataEnd",
    "DataStart",
    "Event",
    "Hello",
    "LocalProtocolError",
    "MailFrom",
    "Quit",
    "RcptTo",
    "Reset",
    "Respond",
    "Sentinel",
    "ServerConnection",
    "ServerSettings",
    "StartTLS",
    "received_with",
]


class LocalProtocolError(RuntimeError):
    """The I/O layer used the connection wrongly (a reply nobody asked for)."""


class Sentinel(enum.Enum):
    """The two non-event results of :meth:`ServerConnection.next_event`."""

    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value


#: More bytes are needed before the next event: read and call ``receive_data``.
NEED_DATA: Final = Sentinel.NEED_DATA
#: The last event still waits for its reply: call ``send`` first.
PAUSED: Final = Sentinel.PAUSED


#: The SASL mechanisms this side implements, in the order they are advertised.
AUTH_MECHANISMS: Final = ("PLAIN", "LOGIN")


def _mechanisms(value: tuple[str, ...]) -> tuple[str, ...]:
    wanted = {mechanism.upper() for mechanism in value}
    unknown = wanted - set(AUTH_MECHANISMS)
    if unknown:
        raise ValueError(f"unsupported SASL mechanisms: {sorted(unknown)}")
    return tuple(mechanism for mechanism in AUTH_MECHANISMS if mechanism in wanted)


@attrs.frozen
class ServerSettings:
    """What the server side needs to know. ``bare_newline`` is "normalize" or "reject".

    ``starttls``: offer STARTTLS (until the connection is TLS). ``auth_mechanisms``: the SASL
    mechanisms to offer, some of :data:`AUTH_MECHANISMS` (upper-cased and put in that order);
    empty means AUTH is not offered at all (502). ``tls``: the connection is TLS from its first
    byte (RFC 8314 implicit TLS). ``require_tls_for_auth``: AUTH is only advertised and accepted
    on a TLS connection (538 5.7.11 before). ``require_auth``: MAIL needs a successful AUTH
    first (530 5.7.0), as on a submission port (RFC 6409 4.3).
    """

    hostname: str
    max_message_size: int
    max_recipients: int
    bare_newline: str = attrs.field(
        default="normalize", validator=attrs.validators.in_(("normalize", "reject"))
    )
    max_errors: int = 10
    starttls: bool = False
    auth_mechanisms: tuple[str, ...] = attrs.field(default=(), converter=_mechanisms)
    tls: bool = False
    require_tls_for_auth: bool = True
    require_auth: bool = False


def received_with(*, extended: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The "with" keyword of a Received header field for a message received this way.

    RFC 3848 registers ESMTPS (TLS), ESMTPA (AUTH) and ESMTPSA (both); RFC 6531 3.7.3 adds
    UTF8SMTP, UTF8SMTPS, UTF8SMTPA and UTF8SMTPSA for SMTPUTF8 transactions. A HELO session
    is plain "SMTP" (there is no keyword for TLS or AUTH without ESMTP).
    """
    if not extended:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


# --- events ----------------------------------------------------------------------------------


@attrs.frozen
class Hello:
    """EHLO (``extended``) or HELO with the client's ``name``; a new session, no transaction."""

    name: str
    extended: bool
    reply: Reply


@attrs.frozen
class MailFrom:
    """MAIL FROM: a transaction starts. ``reverse_path`` is None for the null path ``<>``.

    ``size`` is the declared SIZE (already checked against the limit), ``body`` the BODY value
    (``"7BIT"``, ``"8BITMIME"``, ``"BINARYMIME"``) or None, ``smtputf8`` whether SMTPUTF8 was
    given.
    """

    reverse_path: Address | None
    size: int | None
    body: str | None
    smtputf8: bool
    reply: Reply


@attrs.frozen
class RcptTo:
    """RCPT TO: one recipient. The I/O layer decides whether it exists (and may reject it)."""

    forward_path: Address
    reply: Reply


@attrs.frozen
class DataStart:
    """DATA: the proposed reply is 354; after a 354 the bytes are message content."""

    reply: Reply


@attrs.frozen
class DataChunk:
    """A piece of message content as it is stored (dot-unstuffed, normalized). No reply."""

    data: bytes


@attrs.frozen
class ChunkEnd:
    """A BDAT chunk that is not the last one was received completely (``size`` octets)."""

    size: int
    reply: Reply


@attrs.frozen
class DataEnd:
    """The message is complete (CRLF.CRLF after DATA, or BDAT ... LAST).

    ``accepted=False``: the message was refused while it was read (``reply`` says why: too big,
    or a bare LF under ``bare_newline="reject"``); discard whatever was written. ``accepted=True``:
    commit the message durably, then send ``replies.queued(id)`` (or ``replies.LOCAL_ERROR``).
    ``size`` is the number of stored octets; for a refused message it only approximates what
    was received.
    """

    accepted: bool
    size: int
    reply: Reply


@attrs.frozen
class StartTLS:
    """STARTTLS: the proposed reply is 220 2.0.0. Once a 2xx reply is sent, bytes buffered
    after the command are discarded and the connection waits (``PAUSED``) until the I/O layer
    has done the TLS handshake and calls :meth:`ServerConnection.tls_started`."""

    reply: Reply


@attrs.frozen
class AuthChallenge:
    """AUTH needs a (further) SASL response: the proposed reply is the 334 challenge.

    Sending it reads the next line as the client's response; any other reply (a lockout 421,
    a 454) ends the exchange.
    """

    mechanism: str
    reply: Reply


@attrs.frozen
class AuthRequest:
    """AUTH is complete: verify the credentials. The proposed reply is 235 2.7.0; once a 2xx
    is sent, :attr:`ServerConnection.authenticated` is ``username``. Refuse with 535 5.7.8
    (wrong credentials), 454 4.7.0 or 421 4.7.0.

    ``authzid`` is the PLAIN authorization identity, "" when none was given; one other than
    ``username`` (compared case-insensitively) is refused by the protocol, so the I/O layer
    never sees it. ``password`` is kept out of ``repr``.
    """

    mechanism: str
    authzid: str
    username: str
    password: str = attrs.field(repr=False)
    reply: Reply


@attrs.frozen
class Reset:
    """RSET: the transaction, if any, is abandoned."""

    reply: Reply


@attrs.frozen
class Quit:
    """QUIT: the proposed reply is 221 with ``close=True``."""

    reply: Reply


@attrs.frozen
class Respond:
    """A command the protocol answers alone: NOOP, HELP, VRFY, EXPN, and every syntax,
    sequence or limit error. ``verb`` is the upper-cased command word (for logs; at most 16
    characters, "" for an empty line)."""

    verb: str
    reply: Reply


@attrs.frozen
class ConnectionClosed:
    """The peer closed its side (or the connection was closed by a reply). No reply."""


Event: TypeAlias = (
    Hello
    | StartTLS
    | AuthChallenge
    | AuthRequest
    | MailFrom
    | RcptTo
    | DataStart
    | DataChunk
    | ChunkEnd
    | DataEnd
    | Reset
    | Quit
    | Respond
    | ConnectionClosed
)

# --- the transition table ----------------------------------------------------------------------


class _State(enum.Enum):
    # Members are singletons compared by identity; object.__hash__ spares the Python-level
    # Enum.__hash__ on every table lookup.
    __hash__ = object.__hash__

    GREETED = "greeted"  # connected, no EHLO/HELO yet
    READY = "ready"  # EHLO/HELO accepted, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # 354 sent: the bytes are message content
    BDAT = "bdat"  # at least one BDAT chunk accepted
    TLS = "tls"  # 220 to STARTTLS sent: nothing is read until tls_started()
    CLOSED = "closed"


class _Command(enum.Enum):
    __hash__ = object.__hash__

    HELLO = "EHLO/HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"  # a chunk: checked when the command arrives, taken when its reply is sent
    END = "END"  # end of message: CRLF.CRLF after DATA, or the BDAT ... LAST chunk
    RSET = "RSET"
    QUIT = "QUIT"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"  # taken when the AuthRequest gets its 2xx; the SASL exchange runs in READY


_S = _State
_C = _Command

# For each state, each command: the state after an accepting (2xx/3xx) reply, or the 503 reply
# when the command is out of sequence there. A refusing (4xx/5xx) reply keeps the state, except
# for the commands in _REFUSAL_ENDS_TRANSACTION.
_TRANSITIONS: Final[dict[_State, dict[_Command, _State | Reply]]] = {
    _S.GREETED: {
        _C.HELLO: _S.READY,
        _C.RSET: _S.GREETED,
        _C.QUIT: _S.CLOSED,
        _C.MAIL: replies.NEED_HELLO,
        _C.RCPT: replies.NEED_MAIL,
        _C.DATA: replies.NEED_RCPT,
        _C.BDAT: replies.NEED_RCPT,
        _C.STARTTLS: replies.NEED_HELLO,
        _C.AUTH: replies.NEED_HELLO,
    },
    _S.READY: {
        _C.HELLO: _S.READY,
        _C.RSET: _S.READY,
        _C.QUIT: _S.CLOSED,
        _C.MAIL: _S.MAIL,
        _C.RCPT: replies.NEED_MAIL,
        _C.DATA: replies.NEED_RCPT,
        _C.BDAT: replies.NEED_RCPT,
        _C.STARTTLS: _S.TLS,
        _C.AUTH: _S.READY,
    },
    _S.MAIL: {
        _C.HELLO: _S.READY,
        _C.RSET: _S.READY,
        _C.QUIT: _S.CLOSED,
        _C.MAIL: replies.NESTED_MAIL,
        _C.RCPT: _S.RCPT,
        _C.DATA: replies.NEED_RCPT,
        _C.BDAT: replies.NEED_RCPT,
        _C.STARTTLS: replies.TRANSACTION_IN_PROGRESS,
        _C.AUTH: replies.TRANSACTION_IN_PROGRESS,
    },
    _S.RCPT: {
        _C.HELLO: _S.READY,
        _C.RSET: _S.READY,
        _C.QUIT: _S.CLOSED,
        _C.MAIL: replies.NESTED_MAIL,
        _C.RCPT: _S.RCPT,
        _C.DATA: _S.DATA,
        _C.BDAT: _S.BDAT,
        _C.END: _S.READY,  # BDAT 0 LAST, or a first chunk that is also the last
        _C.STARTTLS: replies.TRANSACTION_IN_PROGRESS,
        _C.AUTH: replies.TRANSACTION_IN_PROGRESS,
    },
    _S.BDAT: {
        _C.HELLO: _S.READY,
        _C.RSET: _S.READY,
        _C.QUIT: _S.CLOSED,
        _C.MAIL: replies.NESTED_MAIL,
        _C.RCPT: replies.RCPT_AFTER_BDAT,
        _C.DATA: replies.DATA_AFTER_BDAT,
        _C.BDAT: _S.BDAT,
        _C.END: _S.READY,
        _C.STARTTLS: replies.TRANSACTION_IN_PROGRESS,
        _C.AUTH: replies.TRANSACTION_IN_PROGRESS,
    },
    # No commands are read in DATA: only the end of the content leaves it.
    _S.DATA: {_C.END: _S.READY},
    # Nor while the TLS handshake is under way: only tls_started() leaves TLS (for GREETED).
    _S.TLS: {},
    _S.CLOSED: {},
}

# RFC 5321 4.1.1.4: the transaction is over once the end of data is answered, whatever the
# answer; RFC 3030 section 2: after a refused BDAT chunk the transaction has failed.
_REFUSAL_ENDS_TRANSACTION: Final = frozenset({_C.BDAT, _C.END})

_COMMAND_OF_EVENT: Final[dict[type, _Command]] = {
    Hello: _C.HELLO,
    MailFrom: _C.MAIL,
    RcptTo: _C.RCPT,
    DataStart: _C.DATA,
    ChunkEnd: _C.BDAT,
    DataEnd: _C.END,
    Reset: _C.RSET,
    Quit: _C.QUIT,
    StartTLS: _C.STARTTLS,
    AuthRequest: _C.AUTH,
}

_NO_REPLY: Final = (DataChunk, ConnectionClosed)

# --- byte-level limits -------------------------------------------------------------------------

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF ...
_COMMAND_LINE_LIMIT: Final = 512
# ... and extensions may raise the limit for MAIL: RFC 1870 section 3 SIZE adds 26, RFC 6531
# 3.4 SMTPUTF8 adds 10, and " BODY=BINARYMIME" (RFC 1652/3030, no number given) is 16 octets.
# RCPT gets the same limit: its path may be as long as MAIL's.
_MAIL_LINE_LIMIT: Final = _COMMAND_LINE_LIMIT + 26 + 10 + 16
# RFC 4954 section 5: while AUTH is offered, MAIL may be 500 octets longer (its AUTH= parameter).
_AUTH_PARAMETER_EXTRA: Final = 500
# An LF at an index >= this ends a line that is too long for any command, so the reader stops
# buffering there and skips to the line's end.
_MAX_LINE_BUFFER: Final = _MAIL_LINE_LIMIT + _AUTH_PARAMETER_EXTRA
# RFC 4954 section 4: a SASL response line may be 12288 octets long (with its CRLF).
_AUTH_LINE_LIMIT: Final = 12288
# Enough of a skipped line to know its command word.
_PREFIX: Final = 16

_TERMINATOR: Final = b"\r\n.\r\n"
#: Verbs of RFC 5321 and its extensions that this server knows but does not offer (RFC 5321
#: 4.2.4: 502, not 500, so a client can tell "not here" from "garbled").
_KNOWN_UNOFFERED: Final = frozenset((b"TURN", b"ETRN", b"ATRN", b"SEND", b"SOML", b"SAML", b"VERB"))

_HTTP_VERBS: Final = frozenset(
    {b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE", b"PATCH", b"TRACE"}
)
_BODY_TYPES: Final = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})
# C0, DEL and C1 controls: never in a hostname, however sloppy.
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


class _Reader(enum.Enum):
    LINE = "line"
    LONG_LINE = "long line"  # skipping the rest of a line that is too long
    DATA = "data"
    BDAT = "bdat"
    SASL = "sasl"  # one SASL response line, after a 334


def _verb_name(verb: bytes) -> str:
    """``Respond.verb`` for a command word: the word if it is one this server knows, "" for an
    empty line, else "?". An unknown word is never echoed: it may be a SASL response (a base64
    password) that a client sent after its AUTH was refused, and Respond.verb gets logged."""
    if verb in _KNOWN_VERBS:
        return verb.decode("ascii")
    return "?" if verb else ""


def _decode_sasl(response: bytes) -> bytes | None:
    """A base64 SASL response (RFC 4954 section 4), "=" for an empty one; None if invalid."""
    if response == b"=":
        return b""
    try:
        return binascii.a2b_base64(response, strict_mode=True)
    except binascii.Error:
        return None


def _sasl_text(data: bytes, *, name: bool) -> str | None:
    """A decoded SASL field as text: UTF-8 without NUL (RFC 4616 UTF8SAFE); a ``name`` also
    without control characters (it reaches logs). None when it is neither."""
    if b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if name and _CONTROL_RE.search(text):
        return None
    return text


def _xtext_valid(value: str) -> bool:
    """RFC 3461 section 4: xtext is printable ASCII but "+" and "=", or "+" and two upper-case
    hex digits."""
    index = 0
    length = len(value)
    while index < length:
        char = value[index]
        if char == "+":
            hexchars = value[index + 1 : index + 3]
            if len(hexchars) != 2 or any(c not in "0123456789ABCDEF" for c in hexchars):
                return False
            index += 3
            continue
        if not ("!" <= char <= "~") or char == "=":
            return False
        index += 1
    return True


def _held_back(buf: bytearray) -> int:
    """How many trailing bytes of ``buf`` could begin CRLF.CRLF (and must wait for more)."""
    if not buf or buf[-1] not in b"\r\n.":
        return 0
    tail = bytes(buf[-4:])
    for length in (4, 3, 2, 1):
        if tail.endswith(_TERMINATOR[:length]):
            return length
    return 0


class ServerConnection:
    """One SMTP session, server side (see the module docstring for how to drive it).

    Properties beyond the events: :attr:`in_transaction`, :attr:`receiving_data`,
    :attr:`hello_name`, :attr:`extended`, :attr:`tls`, :attr:`awaiting_tls` and
    :attr:`authenticated`.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self._buf = bytearray()
        self._eof = False
        self._state = _S.GREETED
        self._reader = _Reader.LINE
        self._pending: Event | None = None  # the event waiting for its reply
        self._queued: Event | None = None  # an event already parsed, to return next
        self._errors = 0
        self._hello_name: str | None = None
        self._extended = False
        self._tls = settings.tls
        self._authenticated: str | None = None
        # The SASL exchange: the mechanism whose 334 challenge is pending or sent, and the
        # LOGIN user name once given. Never a password.
        self._sasl_mechanism: str | None = None
        self._sasl_username: str | None = None
        self._long_line_prefix = b""
        # The transaction.
        self._rcpt_count = 0
        self._smtputf8 = False
        self._body: str | None = None
        self._size = 0  # stored octets so far (DATA) or announced octets so far (BDAT)
        self._failure: Reply | None = None  # why the message will be refused, once known
        # DATA content.
        self._data_fresh = True  # nothing of the content consumed yet
        self._line_start = True  # the consumed content ends at the start of a line
        # BDAT chunk.
        self._bdat_remaining = 0
        self._bdat_store = False
        self._bdat_done: Event | None = None

    # --- public API --------------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """True from an accepted MAIL until the transaction ends (message answered, RSET...)."""
        return self._state in (_S.MAIL, _S.RCPT, _S.DATA, _S.BDAT)

    @property
    def receiving_data(self) -> bool:
        """True while the bytes being read are DATA content or BDAT chunk octets."""
        return self._reader is _Reader.DATA or self._reader is _Reader.BDAT

    @property
    def hello_name(self) -> str | None:
        """The name from the last accepted EHLO/HELO, or None before one."""
        return self._hello_name

    @property
    def extended(self) -> bool:
        """True when the session was opened with EHLO (ESMTP), False for HELO or none."""
        return self._extended

    @property
    def tls(self) -> bool:
        """True when the connection is TLS: from the start (``settings.tls``) or since
        :meth:`tls_started`."""
        return self._tls

    @property
    def awaiting_tls(self) -> bool:
        """True from the accepting reply to STARTTLS until :meth:`tls_started`."""
        return self._state is _S.TLS

    @property
    def authenticated(self) -> str | None:
        """The user name of the accepted AUTH (``AuthRequest.username``), or None."""
        return self._authenticated

    def received_with(self, *, smtputf8: bool) -> str:
        """The Received "with" keyword for a message of this session (see
        :func:`received_with`); ``smtputf8`` is whether its MAIL had SMTPUTF8."""
        return received_with(
            extended=self._extended,
            tls=self._tls,
            authenticated=self._authenticated is not None,
            smtputf8=smtputf8,
        )

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: start the session over, as TLS.

        RFC 3207 4.2: everything learnt from the client before is forgotten (the EHLO name,
        any authentication); the client must send EHLO again. Raises
        :class:`LocalProtocolError` unless a 220 to STARTTLS was sent and this is the first
        call since.
        """
        if self._state is not _S.TLS:
            raise LocalProtocolError("tls_started() without an accepted STARTTLS")
        self._buf.clear()
        self._tls = True
        self._hello_name = None
        self._extended = False
        self._authenticated = None
        self._enter(_S.GREETED)

    def greeting(self) -> Reply:
        """The 220 greeting to send (through :meth:`send`) when the connection opens."""
        return replies.greeting(self._settings.hostname)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` means the peer closed its side (EOF).

        While :attr:`awaiting_tls`, bytes are discarded: they were sent in the clear before
        the handshake (RFC 3207 section 5, CVE-2011-0411).
        """
        if self._eof or self._state is _S.CLOSED:
            return
        if not data:
            self._eof = True
        elif self._state is not _S.TLS:
            self._buf += data

    def next_event(self) -> Event | Sentinel:
        """The next event, or ``NEED_DATA`` (read more), or ``PAUSED`` (send a reply first;
        or, while :attr:`awaiting_tls`, do the handshake and call :meth:`tls_started`)."""
        if self._pending is not None:
            return PAUSED
        event = self._queued
        if event is not None:
            self._queued = None
        elif self._state is _S.CLOSED:
            return ConnectionClosed()
        elif self._state is _S.TLS:
            if self._eof:
                self._close()
                return ConnectionClosed()
            return PAUSED
        else:
            event = self._read()
            if event is None:
                if self._eof:
                    # Whatever is left cannot complete: a partial line, a message cut short
                    # (no DataEnd for it), an unfinished BDAT chunk.
                    self._close()
                    return ConnectionClosed()
                return NEED_DATA
        if not isinstance(event, _NO_REPLY):
            self._pending = event
        return event

    def send(self, reply: Reply) -> bytes:
        """Answer the pending event with ``reply`` and return the bytes to write.

        A 2xx/3xx reply accepts the command and moves the session on; a 4xx/5xx reply leaves it
        where it was (the end of a message or of a BDAT chunk ends the transaction either way).
        ``close=True`` closes the session. Without a pending event only the greeting (220) or a
        closing reply may be sent (a timeout, a shutdown); anything else raises
        :class:`LocalProtocolError`.
        """
        event = self._pending
        if event is None:
            if not (reply.close or reply.code == 220):
                raise LocalProtocolError(f"no event is waiting for a reply ({reply.code})")
        else:
            self._pending = None
            self._apply(event, reply)
        # Errors end abusive sessions (see _early_refusal); running out of recipient slots is
        # the client's normal way of learning the limit, not an error.
        if reply.code >= 400 and not (reply.code == 452 and reply.enhanced == "4.5.3"):
            self._errors += 1
        if reply.close:
            self._close()
        return reply.to_bytes()

    # --- state changes -----------------------------------------------------------------------

    def _apply(self, event: Event, reply: Reply) -> None:
        if isinstance(event, AuthChallenge):
            if reply.code == 334:
                self._reader = _Reader.SASL
            else:  # refused (a lockout, say): the exchange is over
                self._end_sasl()
            return
        command = _COMMAND_OF_EVENT.get(type(event))
        if command is None:  # Respond: the protocol's own answer changes nothing
            return
        if reply.code >= 400:
            if command in _REFUSAL_ENDS_TRANSACTION:
                self._enter(_S.READY)
            return
        target = _TRANSITIONS[self._state][command]
        assert isinstance(target, _State), "an event is only made for an allowed command"
        if isinstance(event, Hello):
            self._hello_name = event.name
            self._extended = event.extended
        elif isinstance(event, MailFrom):
            self._reset_transaction()
            self._smtputf8 = event.smtputf8
            self._body = event.body
        elif isinstance(event, RcptTo):
            self._rcpt_count += 1
        elif isinstance(event, DataStart):
            self._reader = _Reader.DATA
            self._data_fresh = True
            self._line_start = True
        elif isinstance(event, StartTLS):
            # CVE-2011-0411: whatever the client sent behind STARTTLS was sent in the clear
            # and must never be executed after the handshake.
            self._buf.clear()
        elif isinstance(event, AuthRequest):
            self._authenticated = event.username
        self._enter(target)

    def _enter(self, state: _State) -> None:
        if state is _S.READY or state is _S.GREETED:
            self._reset_transaction()
        self._state = state

    def _reset_transaction(self) -> None:
        self._rcpt_count = 0
        self._smtputf8 = False
        self._body = None
        self._size = 0
        self._failure = None

    def _close(self) -> None:
        self._state = _S.CLOSED
        self._reader = _Reader.LINE
        self._queued = None
        self._buf.clear()
        self._end_sasl()

    def _end_sasl(self) -> None:
        self._sasl_mechanism = None
        self._sasl_username = None

    def _auth_offered(self) -> bool:
        """Whether AUTH is advertised now (and MAIL's AUTH= parameter accepted)."""
        settings = self._settings
        return bool(settings.auth_mechanisms) and (self._tls or not settings.require_tls_for_auth)

    def _check(self, command: _Command) -> Reply | None:
        """The 503 reply if the table refuses ``command`` now, else None."""
        # No command line is read in DATA, TLS or CLOSED, so every lookup here finds its entry.
        move = _TRANSITIONS[self._state].get(command, replies.NEED_HELLO)
        return move if isinstance(move, Reply) else None

    # --- readers -----------------------------------------------------------------------------

    def _read(self) -> Event | None:
        reader = self._reader
        if reader is _Reader.LINE:
            return self._read_line()
        if reader is _Reader.DATA:
            return self._read_data()
        if reader is _Reader.BDAT:
            return self._read_bdat()
        if reader is _Reader.SASL:
            return self._read_sasl()
        return self._read_long_line()

    def _read_line(self) -> Event | None:
        buf = self._buf
        end = buf.find(b"\n", 0, _MAX_LINE_BUFFER)
        if end < 0:
            if len(buf) < _MAX_LINE_BUFFER:
                return None
            # Too long for any command: skip it, keeping only its first word.
            self._long_line_prefix = bytes(buf[:_PREFIX])
            self._reader = _Reader.LONG_LINE
            return self._read_long_line()
        line = bytes(buf[:end])
        del buf[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return self._command(line)

    def _read_long_line(self) -> Event | None:
        buf = self._buf
        end = buf.find(b"\n")
        if end < 0:
            buf.clear()
            return None
        del buf[: end + 1]
        self._reader = _Reader.LINE
        verb = self._long_line_prefix.split(b" ", 1)[0].upper()
        return self._early_refusal(verb) or Respond(_verb_name(verb), replies.LINE_TOO_LONG)

    def _early_refusal(self, verb: bytes) -> Respond | None:
        """Refusals that come before any look at the command: the error limit, HTTP."""
        if self._errors >= self._settings.max_errors:
            return Respond(_verb_name(verb), replies.too_many_errors(self._settings.hostname))
        if verb in _HTTP_VERBS:
            return Respond(_verb_name(verb), replies.HTTP_REQUEST)
        return None

    def _command(self, line: bytes) -> Event | None:
        space = line.find(b" ")
        verb = (line if space < 0 else line[:space]).upper()
        refusal = self._early_refusal(verb)
        if refusal is not None:
            return refusal
        if verb == b"MAIL":
            limit = _MAIL_LINE_LIMIT
            if self._auth_offered():
                limit += _AUTH_PARAMETER_EXTRA
        elif verb == b"RCPT":
            limit = _MAIL_LINE_LIMIT
        else:
            limit = _COMMAND_LINE_LIMIT
        if len(line) + 2 > limit:
            return Respond(_verb_name(verb), replies.LINE_TOO_LONG)
        if b"\0" in line:
            return Respond(_verb_name(verb), replies.BAD_CHARACTER)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return Respond(_verb_name(verb), replies.BAD_CHARACTER)
        handler = _HANDLERS.get(verb)
        if handler is None:
            if not line.strip(b" "):
                return Respond("", replies.EMPTY_COMMAND)
            if verb in _KNOWN_UNOFFERED:
                return Respond(_verb_name(verb), replies.NOT_IMPLEMENTED)
            return Respond(_verb_name(verb), replies.UNKNOWN_COMMAND)
        # The verb matched, so it is ASCII and the byte index of the space is a str index too.
        arg = "" if space < 0 else text[space + 1 :].strip(" ")
        return handler(self, arg)

    # --- commands ----------------------------------------------------------------------------

    def _hello(self, arg: str, *, extended: bool) -> Event:
        verb = "EHLO" if extended else "HELO"
        refusal = self._check(_C.HELLO)
        if refusal is not None:
            return Respond(verb, refusal)
        if not arg:
            return Respond(verb, replies.syntax(f"{verb} hostname"))
        # Sloppy names (underscores, bare words, unbracketed IPs) are tolerated, as by Postfix;
        # only control characters are refused: they could forge log or trace-header lines.
        if _CONTROL_RE.search(arg):
            return Respond(verb, replies.BAD_HELLO_NAME)
        settings = self._settings
        if extended:
            reply = replies.ehlo(
                settings.hostname,
                arg,
                max_message_size=settings.max_message_size,
                starttls=settings.starttls and not self._tls,
                auth=settings.auth_mechanisms if self._auth_offered() else (),
            )
        else:
            reply = replies.helo(settings.hostname, arg)
        return Hello(arg, extended, reply)

    def _ehlo(self, arg: str) -> Event:
        return self._hello(arg, extended=True)

    def _helo(self, arg: str) -> Event:
        return self._hello(arg, extended=False)

    def _mail(self, arg: str) -> Event:
        refusal = self._check(_C.MAIL)
        if refusal is not None:
            return Respond("MAIL", refusal)
        if self._settings.require_auth and self._authenticated is None:
            return Respond("MAIL", replies.AUTH_REQUIRED)
        if arg[:5].upper() != "FROM:" or not arg[5:].strip(" "):
            return Respond("MAIL", replies.syntax("MAIL FROM:<address>"))
        try:
            path, params = _address.split_path(arg[5:])
        except AddressError as error:
            return Respond("MAIL", replies.bad_sender(str(error)))
        size: int | None = None
        body: str | None = None
        smtputf8 = False
        if params:
            if not self._extended:
                return Respond("MAIL", replies.PARAMETERS_NEED_EHLO)
            seen: set[str] = set()
            for param in params.split(" "):
                if not param:
                    continue
                keyword, equals, value = param.partition("=")
                keyword = keyword.upper()
                if keyword in seen:
                    return Respond("MAIL", replies.DUPLICATE_PARAMETER)
                seen.add(keyword)
                if keyword == "SIZE":
                    # RFC 1870: size-value = 1*20DIGIT
                    if not (value.isascii() and value.isdigit() and len(value) <= 20):
                        return Respond("MAIL", replies.BAD_SIZE)
                    size = int(value)
                elif keyword == "BODY":
                    body = value.upper()
                    if body not in _BODY_TYPES:
                        return Respond("MAIL", replies.BAD_BODY)
                elif keyword == "SMTPUTF8":
                    if equals:
                        return Respond("MAIL", replies.BAD_SMTPUTF8)
                    smtputf8 = True
                elif keyword == "AUTH" and self._auth_offered():
                    # RFC 4954 section 5: the original submitter, xtext-encoded, or <>. It
                    # vouches for nothing here, so it is checked and dropped.
                    if not equals or not _xtext_valid(value):
                        return Respond("MAIL", replies.BAD_AUTH_PARAMETER)
                else:
                    return Respond("MAIL", replies.UNKNOWN_PARAMETER)
            if size is not None and size > self._settings.max_message_size:
                return Respond("MAIL", replies.MESSAGE_TOO_BIG)
        try:
            reverse_path = _address.parse_reverse_path(path, utf8=smtputf8)
        except AddressError as error:
            if error.kind == "utf8":
                return Respond("MAIL", replies.NON_ASCII_SENDER)
            return Respond("MAIL", replies.bad_sender(str(error)))
        return MailFrom(reverse_path, size, body, smtputf8, replies.SENDER_OK)

    def _rcpt(self, arg: str) -> Event:
        refusal = self._check(_C.RCPT)
        if refusal is not None:
            return Respond("RCPT", refusal)
        if self._rcpt_count >= self._settings.max_recipients:
            return Respond("RCPT", replies.TOO_MANY_RECIPIENTS)
        if arg[:3].upper() != "TO:" or not arg[3:].strip(" "):
            return Respond("RCPT", replies.syntax("RCPT TO:<address>"))
        try:
            path, params = _address.split_path(arg[3:])
        except AddressError as error:
            return Respond("RCPT", replies.bad_recipient(str(error)))
        if params:  # no RCPT parameters are offered (no DSN)
            return Respond("RCPT", replies.UNKNOWN_PARAMETER)
        try:
            forward_path = _address.parse_forward_path(path, utf8=self._smtputf8)
        except AddressError as error:
            if error.kind == "utf8":
                return Respond("RCPT", replies.NON_ASCII_RECIPIENT)
            return Respond("RCPT", replies.bad_recipient(str(error)))
        return RcptTo(forward_path, replies.RECIPIENT_OK)

    def _data(self, arg: str) -> Event:
        refusal = self._check(_C.DATA)
        if refusal is not None:
            return Respond("DATA", refusal)
        if arg:
            return Respond("DATA", replies.syntax("DATA"))
        if self._body == "BINARYMIME":
            return Respond("DATA", replies.BINARYMIME_NEEDS_BDAT)
        return DataStart(replies.START_DATA)

    def _bdat(self, arg: str) -> Event | None:
        words = [word for word in arg.split(" ") if word]
        if not words or not (words[0].isascii() and words[0].isdigit() and len(words[0]) <= 20):
            # Without a size nobody knows where the chunk ends: answer now, read no octets.
            return Respond("BDAT", replies.syntax("BDAT size [LAST]"))
        size = int(words[0])
        last = len(words) == 2 and words[1].upper() == "LAST"
        # The chunk's octets are consumed whatever the answer, so that they are never read as
        # commands (RFC 3030 section 2: the server must read the chunk before replying).
        done: Event
        refusal = self._check(_C.BDAT)
        if refusal is not None:
            done = Respond("BDAT", refusal)
        elif len(words) > 2 or (len(words) == 2 and not last):
            done = Respond("BDAT", replies.syntax("BDAT size [LAST]"))
        else:
            if self._failure is None and self._size + size > self._settings.max_message_size:
                self._failure = replies.MESSAGE_TOO_BIG
            self._size += size
            if last:
                failure = self._failure
                done = DataEnd(
                    failure is None, self._size, replies.MESSAGE_OK if failure is None else failure
                )
            else:
                done = ChunkEnd(size, replies.chunk_received(size))
        self._reader = _Reader.BDAT
        self._bdat_remaining = size
        self._bdat_store = self._failure is None and not isinstance(done, Respond)
        self._bdat_done = done
        return self._read_bdat()

    def _rset(self, arg: str) -> Event:
        refusal = self._check(_C.RSET)
        if refusal is not None:
            return Respond("RSET", refusal)
        if arg:
            return Respond("RSET", replies.syntax("RSET"))
        return Reset(replies.OK)

    def _quit(self, arg: str) -> Event:
        refusal = self._check(_C.QUIT)
        if refusal is not None:
            return Respond("QUIT", refusal)
        if arg:
            return Respond("QUIT", replies.syntax("QUIT"))
        return Quit(replies.BYE)

    def _starttls(self, arg: str) -> Event:
        if self._tls:
            return Respond("STARTTLS", replies.TLS_ALREADY_ACTIVE)
        if not self._settings.starttls:
            return Respond("STARTTLS", replies.NOT_IMPLEMENTED)
        refusal = self._check(_C.STARTTLS)
        if refusal is not None:
            return Respond("STARTTLS", refusal)
        if arg:
            return Respond("STARTTLS", replies.syntax("STARTTLS"))
        return StartTLS(replies.READY_FOR_TLS)

    def _auth(self, arg: str) -> Event:
        settings = self._settings
        if not settings.auth_mechanisms:
            return Respond("AUTH", replies.NOT_IMPLEMENTED)
        refusal = self._check(_C.AUTH)
        if refusal is not None:
            return Respond("AUTH", refusal)
        if not self._auth_offered():
            return Respond("AUTH", replies.ENCRYPTION_REQUIRED)
        if self._authenticated is not None:
            return Respond("AUTH", replies.ALREADY_AUTHENTICATED)
        words = [word for word in arg.split(" ") if word]
        if not 1 <= len(words) <= 2:
            return Respond("AUTH", replies.syntax("AUTH mechanism [initial-response]"))
        mechanism = words[0].upper()
        if mechanism not in settings.auth_mechanisms:
            return Respond("AUTH", replies.UNSUPPORTED_MECHANISM)
        self._sasl_mechanism = mechanism
        self._sasl_username = None
        if len(words) == 1:
            if mechanism == "PLAIN":
                return AuthChallenge(mechanism, replies.PLAIN_CHALLENGE)
            return AuthChallenge(mechanism, replies.LOGIN_USERNAME)
        # RFC 4954 section 4: an initial response; "=" is the empty one.
        return self._sasl_step(words[1].encode("ascii", "replace"), initial=True)

    # --- the SASL exchange -------------------------------------------------------------------

    def _read_sasl(self) -> Event | None:
        buf = self._buf
        end = buf.find(b"\n", 0, _AUTH_LINE_LIMIT)
        if end < 0:
            if len(buf) < _AUTH_LINE_LIMIT:
                return None
            # RFC 4954 section 4: 500 5.5.6 for a response line that is too long. The
            # exchange is over; only the word AUTH is kept for the reply (never the line).
            self._end_sasl()
            self._long_line_prefix = b"AUTH"
            self._reader = _Reader.LONG_LINE
            return self._read_long_line()
        line = bytes(buf[:end])
        del buf[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        self._reader = _Reader.LINE
        if len(line) + 2 > _AUTH_LINE_LIMIT:
            self._end_sasl()
            return Respond("AUTH", replies.LINE_TOO_LONG)
        return self._sasl_step(line, initial=False)

    def _sasl_step(self, response: bytes, *, initial: bool) -> Event:
        """One client response of the exchange: the next challenge, the AuthRequest, or the
        refusal that ends the exchange."""
        mechanism = self._sasl_mechanism
        assert mechanism is not None, "a SASL response is only read during an exchange"
        if response == b"*" and not initial:
            self._end_sasl()
            return Respond("AUTH", replies.AUTH_CANCELLED)
        data = _decode_sasl(response)
        if data is None:
            self._end_sasl()
            return Respond("AUTH", replies.BAD_AUTH_RESPONSE)
        if mechanism == "PLAIN":
            self._end_sasl()
            return self._plain(data)
        if self._sasl_username is None:  # LOGIN: the user name; the password comes next
            username = _sasl_text(data, name=True)
            if username is None:
                self._end_sasl()
                return Respond("AUTH", replies.BAD_AUTH_RESPONSE)
            self._sasl_username = username
            return AuthChallenge(mechanism, replies.LOGIN_PASSWORD)
        username = self._sasl_username
        self._end_sasl()
        password = _sasl_text(data, name=False)
        if password is None:
            return Respond("AUTH", replies.BAD_AUTH_RESPONSE)
        return AuthRequest(mechanism, "", username, password, replies.AUTH_SUCCEEDED)

    def _plain(self, message: bytes) -> Event:
        """RFC 4616 section 2: ``[authzid] NUL authcid NUL passwd``, each UTF-8 without NUL,
        authcid and passwd not empty."""
        parts = message.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return Respond("AUTH", replies.BAD_AUTH_RESPONSE)
        authzid = _sasl_text(parts[0], name=True)
        username = _sasl_text(parts[1], name=True)
        password = _sasl_text(parts[2], name=False)
        if authzid is None or username is None or password is None:
            return Respond("AUTH", replies.BAD_AUTH_RESPONSE)
        if authzid and authzid.casefold() != username.casefold():
            # RFC 4616 section 2: acting for someone else needs authorization, and nobody has
            # it here; refused before any password is checked.
            return Respond("AUTH", replies.AUTH_FAILED)
        return AuthRequest("PLAIN", authzid, username, password, replies.AUTH_SUCCEEDED)

    def _noop(self, arg: str) -> Event:
        # RFC 5321 4.1.1.9: a NOOP argument is ignored.
        return Respond("NOOP", replies.OK)

    def _help(self, arg: str) -> Event:
        return Respond("HELP", replies.HELP)

    def _vrfy(self, arg: str) -> Event:
        if not arg:
            return Respond("VRFY", replies.syntax("VRFY address"))
        return Respond("VRFY", replies.CANNOT_VRFY)

    def _expn(self, arg: str) -> Event:
        return Respond("EXPN", replies.EXPN_DISABLED)

    # --- message content ---------------------------------------------------------------------

    def _read_data(self) -> Event | None:
        buf = self._buf
        if self._data_fresh:
            # The DATA command's CRLF counts as the CRLF before a first "." line.
            if len(buf) < 3:
                if b".\r\n".startswith(buf):
                    return None  # may still be the empty message
            elif buf.startswith(b".\r\n"):
                del buf[:3]
                return self._end_of_data()
            self._data_fresh = False
        end = buf.find(_TERMINATOR)
        if end >= 0:
            stop = end + 2  # the CRLF ends the last line and belongs to the content
            consumed = end + len(_TERMINATOR)
        else:
            stop = consumed = len(buf) - _held_back(buf)
            if stop == 0:
                return None
        chunk = bytes(buf[:stop])
        del buf[:consumed]
        event = self._store(chunk)
        if end < 0:
            return event
        end_event = self._end_of_data()
        if event is None:
            return end_event
        self._queued = end_event
        return event

    def _store(self, chunk: bytes) -> DataChunk | None:
        """Turn raw content into stored content; None when nothing is to be stored.

        ``chunk`` never ends in the middle of a CRLF (``_held_back`` keeps a trailing CR), so a
        CRLF is never split between two chunks and the counts below are exact.
        """
        at_line_start = self._line_start
        self._line_start = chunk.endswith(b"\n")
        if self._failure is not None:
            self._size += len(chunk)  # discarding: only count, roughly
            return None
        # RFC 5321 4.5.2: a leading "." of a line is removed. Any LF starts a line, also a bare
        # one, so the smuggled "\n.\n" and "\n.\r\n" are unstuffed like any other line.
        if at_line_start and chunk.startswith(b"."):
            chunk = chunk[1:]
        if b"\n." in chunk:
            chunk = chunk.replace(b"\n.", b"\n")
        if chunk.count(b"\n") != chunk.count(b"\r\n"):
            if self._settings.bare_newline == "reject":
                self._failure = replies.BARE_LINEFEED
                self._size += len(chunk)
                return None
            # Every bare LF becomes CRLF (Postfix smtpd_forbid_bare_newline = normalize); a
            # bare CR stays as it is, and "\r\r\n" stays "\r\r\n".
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._size += len(chunk)
        if self._size > self._settings.max_message_size:
            self._failure = replies.MESSAGE_TOO_BIG
            return None
        return DataChunk(chunk) if chunk else None

    def _end_of_data(self) -> DataEnd:
        self._reader = _Reader.LINE
        failure = self._failure
        if failure is None:
            return DataEnd(True, self._size, replies.MESSAGE_OK)
        return DataEnd(False, self._size, failure)

    def _read_bdat(self) -> Event | None:
        remaining = self._bdat_remaining
        piece: DataChunk | None = None
        if remaining:
            buf = self._buf
            if not buf:
                return None
            count = min(remaining, len(buf))
            if self._bdat_store:
                piece = DataChunk(bytes(buf[:count]))
            del buf[:count]
            remaining -= count
            self._bdat_remaining = remaining
            if remaining:
                return piece
        self._reader = _Reader.LINE
        done = self._bdat_done
        self._bdat_done = None
        if piece is None:
            return done
        self._queued = done
        return piece


_HANDLERS: Final[dict[bytes, Callable[[ServerConnection, str], Event | None]]] = {
    b"EHLO": ServerConnection._ehlo,
    b"HELO": ServerConnection._helo,
    b"MAIL": ServerConnection._mail,
    b"RCPT": ServerConnection._rcpt,
    b"DATA": ServerConnection._data,
    b"BDAT": ServerConnection._bdat,
    b"RSET": ServerConnection._rset,
    b"QUIT": ServerConnection._quit,
    b"NOOP": ServerConnection._noop,
    b"HELP": ServerConnection._help,
    b"VRFY": ServerConnection._vrfy,
    b"EXPN": ServerConnection._expn,
    b"STARTTLS": ServerConnection._starttls,
    b"AUTH": ServerConnection._auth,
}

# Command words that Respond.verb may carry (see _verb_name).
_KNOWN_VERBS: Final = frozenset(_HANDLERS) | _KNOWN_UNOFFERED | _HTTP_VERBS
