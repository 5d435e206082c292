"""The client side of SMTP, sans-IO: operations in, commands out; replies in, results out.

Theory of operation
-------------------

:class:`ClientConnection` drives one SMTP session to a peer (a remote MX or a smarthost) and,
like the server side, never touches a socket or a clock. The I/O layer (the relayer) does three
things in a loop: call :meth:`~ClientConnection.next_event`, write whatever
:meth:`~ClientConnection.bytes_to_send` returns (replies make commands: EHLO after the greeting,
the next RCPT without PIPELINING...), and, when the event was ``NEED_DATA``, read from the
socket and hand the bytes to :meth:`~ClientConnection.receive_data` (``b""`` for EOF)::

    async def exchange(stream, client):
        while True:
            event = client.next_event()
            if out := client.bytes_to_send():
                await stream.send_all(out)
            if event is not NEED_DATA:
                return event
            client.receive_data(await stream.receive_some(65536))

Every *operation* ends with exactly one event. The session opens by itself: the greeting is
read and EHLO sent (HELO when EHLO gets a 5xx), ending in :class:`Ready` or :class:`Refused`.
From :class:`Ready` on, the I/O layer starts one operation at a time -- :meth:`starttls`,
:meth:`auth`, :meth:`start_transaction`, :meth:`quit` -- and reads its event: :class:`TlsReady`
(do the handshake, then call :meth:`tls_started`, which sends EHLO again and ends in
:class:`Ready`), :class:`Authenticated`, :class:`TransactionResult`, :class:`Closed`, or
:class:`Refused` for a session-level command the peer declined. With no operation in progress
``next_event`` returns ``PAUSED``.

A transaction is sent in as few round trips as the peer allows. With PIPELINING, RSET (on a
reused session), MAIL, every RCPT and DATA -- or ``BDAT n LAST`` with the whole message, for a
message of at most one chunk -- go out in one write and the replies are matched in order;
without it, one command at a time. The content goes out only after a recipient was accepted
(RFC 2920 3.1: a 354 that comes anyway gets a lone "." so nothing is delivered). Replies are
matched to commands through one queue, ``_expected``; one reader, ``_read_reply``, turns bytes
into :class:`~katerchen.protocol.replies.Reply` values (multi-line, enhanced codes split off).

Failures are values, never exceptions: a 421, EOF, a garbled reply or :meth:`abort` (a timeout)
close the session and end the operation in progress with that reply, so every recipient of a
transaction gets a final reply -- 2xx sent, 4xx deferred, 5xx failed. Exceptions
(:class:`LocalProtocolError`, ``ValueError``) only report a misuse of this API.
"""

from __future__ import annotations

import base64
import enum
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeAlias

import attrs

from katerchen.protocol.replies import Reply
from katerchen.protocol.server import NEED_DATA, PAUSED, LocalProtocolError, Sentinel

__all__ = [
    "Authenticated",
    "ClientConnection",
    "ClientEvent",
    "Closed",
    "Extensions",
    "Ready",
    "Refused",
    "TlsReady",
    "Transaction",
    "TransactionResult",
]

# --- the peer's extensions ---------------------------------------------------------------------


@attrs.frozen
class Extensions:
    """The service extensions of the peer's EHLO reply (RFC 5321 4.1.1.1); none after HELO.

    ``keywords`` maps each upper-cased keyword to its parameters (``{"SIZE": "10240000",
    "AUTH": "PLAIN LOGIN", "PIPELINING": ""}``); the properties read the ones katerchen uses.
    """

    keywords: dict[str, str] = attrs.Factory(dict)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Extensions:
        """The extensions listed in an EHLO reply (every line after the first)."""
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                keywords[keyword.upper()] = params.strip()
        return cls(keywords)

    @property
    def size(self) -> int | None:
        """RFC 1870: the peer's size limit; 0 for SIZE without a limit, None without SIZE."""
        value = self.keywords.get("SIZE")
        if value is None:
            return None
        word = value.split(" ", 1)[0]
        return int(word) if word.isascii() and word.isdigit() else 0

    @property
    def pipelining(self) -> bool:
        """RFC 2920."""
        return "PIPELINING" in self.keywords

    @property
    def eight_bit_mime(self) -> bool:
        """RFC 6152 (8BITMIME)."""
        return "8BITMIME" in self.keywords

    @property
    def chunking(self) -> bool:
        """RFC 3030 (CHUNKING: BDAT)."""
        return "CHUNKING" in self.keywords

    @property
    def binarymime(self) -> bool:
        """RFC 3030 (BINARYMIME; only usable with CHUNKING)."""
        return "BINARYMIME" in self.keywords

    @property
    def starttls(self) -> bool:
        """RFC 3207."""
        return "STARTTLS" in self.keywords

    @property
    def smtputf8(self) -> bool:
        """RFC 6531."""
        return "SMTPUTF8" in self.keywords

    @property
    def enhanced_status_codes(self) -> bool:
        """RFC 2034."""
        return "ENHANCEDSTATUSCODES" in self.keywords

    @property
    def auth(self) -> frozenset[str]:
        """RFC 4954: the SASL mechanisms offered, upper-cased; also the old ``AUTH=`` form."""
        mechanisms: set[str] = set()
        for keyword, params in self.keywords.items():
            if keyword == "AUTH":
                mechanisms.update(params.upper().split())
            elif keyword.startswith("AUTH="):
                mechanisms.add(keyword[5:])
                mechanisms.update(params.upper().split())
        mechanisms.discard("")
        return frozenset(mechanisms)


# --- the transaction ---------------------------------------------------------------------------


def _paths(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class Transaction:
    """One message for one session.

    ``reverse_path`` is ``""`` for the null path ``<>``, else a mailbox as ``str(Address)``
    (the envelope's form, without angle brackets); ``recipients`` likewise, at least one.
    ``body`` is the whole message (header and body) as stored. ``smtputf8``: the message was
    received with SMTPUTF8 (its header may hold UTF-8); non-ASCII paths need SMTPUTF8 whatever
    this says. ``binarymime``: the message was received as BODY=BINARYMIME and is sent byte-exact.
    """

    reverse_path: str
    recipients: tuple[str, ...] = attrs.field(converter=_paths)
    body: bytes = attrs.field(repr=lambda body: f"<{len(body)} octets>")
    smtputf8: bool = False
    binarymime: bool = False


@attrs.frozen
class TransactionResult:
    """How a transaction ended.

    ``results`` is THE answer: one final reply per recipient, in the order of
    ``Transaction.recipients`` -- 2xx sent, 4xx try again later, 5xx failed. It is the MAIL
    reply when MAIL was refused, the recipient's RCPT reply when that was refused, otherwise
    the reply to the content (or the refusal of DATA/BDAT); a connection lost or garbled, or
    :meth:`ClientConnection.abort`, stands in for replies that never came.

    The raw replies: ``mail_reply`` (None when MAIL was never answered), ``rcpt_replies``
    (None where unanswered), ``data_reply`` (None when no content was sent). ``local`` is True
    when the client refused the message before sending anything, because the peer lacks what
    it needs: SIZE too small (552 5.3.4), no 8BITMIME or BINARYMIME (554 5.6.3), no SMTPUTF8
    (553 5.6.7 for non-ASCII paths, 554 5.6.9 for a UTF-8 header).
    """

    results: tuple[Reply, ...]
    mail_reply: Reply | None
    rcpt_replies: tuple[Reply | None, ...]
    data_reply: Reply | None
    local: bool = False


# --- events ------------------------------------------------------------------------------------


@attrs.frozen
class Ready:
    """The session is open (EHLO or HELO accepted), after the greeting or after STARTTLS."""

    reply: Reply
    extensions: Extensions


@attrs.frozen
class TlsReady:
    """The peer said 220 to STARTTLS: do the TLS handshake now, then call ``tls_started()``."""

    reply: Reply


@attrs.frozen
class Authenticated:
    """AUTH succeeded (235)."""

    reply: Reply


@attrs.frozen
class Refused:
    """The peer refused a session command, or the session ended during one.

    ``command`` is ``"greeting"``, ``"EHLO"``, ``"HELO"`` (the session never opened: only
    :meth:`ClientConnection.quit` is left), ``"STARTTLS"`` or ``"AUTH"`` (the session goes on,
    without TLS or unauthenticated). ``ClientConnection.closed`` tells whether it is over.
    """

    command: str
    reply: Reply


@attrs.frozen
class Closed:
    """QUIT was answered (221), or the session ended while QUIT waited for its reply."""

    reply: Reply


ClientEvent: TypeAlias = Ready | TlsReady | Authenticated | Refused | TransactionResult | Closed

# --- replies the client makes up ---------------------------------------------------------------

# Made-up replies carry 421 ("closing transmission channel", RFC 5321 4.2.2) and an X.4.2 "bad
# connection" or X.5.0 "other protocol status" code (RFC 3463): retry later.


def _lost(reason: str) -> Reply:
    return Reply(421, "4.4.2", reason, close=True)


def _garbled(detail: str) -> Reply:
    return Reply(421, "4.5.0", f"Protocol error: {detail}", close=True)


_CONNECTION_LOST: Final = _lost("Connection lost before the peer's reply")
#: RFC 4954 / RFC 3463 X.7.0: credentials configured, but no mechanism katerchen speaks.
_NO_MECHANISM: Final = Reply(454, "4.7.0", "The peer offers no supported AUTH mechanism")
#: RFC 1870 section 6.1 / RFC 3463 X.3.4: more than the peer's declared SIZE.
_TOO_BIG: Final = "The message is larger than the peer's limit of {} octets"
#: RFC 6152 / RFC 3463 X.6.3 "conversion required but not supported".
_NEEDS_8BITMIME: Final = Reply(554, "5.6.3", "8-bit message, but the peer lacks 8BITMIME")
_NEEDS_BINARYMIME: Final = Reply(
    554, "5.6.3", "Binary message, but the peer lacks CHUNKING or BINARYMIME"
)
#: RFC 6531 3.2 and RFC 6533 3.1: X.6.7 for non-ASCII addresses, X.6.9 for a UTF-8 header.
_UTF8_ADDRESS: Final = Reply(553, "5.6.7", "Non-ASCII address, but the peer lacks SMTPUTF8")
_UTF8_HEADER: Final = Reply(554, "5.6.9", "UTF-8 header, but the peer lacks SMTPUTF8")

# --- reply parsing -----------------------------------------------------------------------------

# RFC 5321 4.5.3.1.5 limits a reply line to 512 octets; peers exceed it, so 16 times that is
# still read, and only beyond it is the peer taken to be garbling (it also bounds the buffer).
_MAX_REPLY_LINE: Final = 8192
_MAX_REPLY_LINES: Final = 256
# RFC 3463 section 2: class "." subject "." detail, at the start of the text (RFC 2034 3).
_ENHANCED_RE: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |$)")


class _Garbled(Exception):
    pass


def _make_reply(code: int, texts: list[str]) -> Reply:
    enhanced: str | None = None
    lines = []
    for index, text in enumerate(texts):
        match = _ENHANCED_RE.match(text)
        if match is not None:
            if index == 0:
                enhanced = match.group()
            text = text[match.end() + 1 :]
        lines.append(text)
    # close mirrors the server side's replies: 221 and 421 end the session (RFC 5321 3.8).
    close = code in (221, 421)
    return Reply(code, enhanced, lines[0] if len(lines) == 1 else tuple(lines), close=close)


# --- the state machine -------------------------------------------------------------------------


class _State(enum.Enum):
    __hash__ = object.__hash__

    GREETING = "greeting"  # connected, the 220 not yet read
    HELLO = "hello"  # EHLO or HELO sent
    READY = "ready"  # the session is open and idle: an operation may start
    STARTTLS = "starttls"  # STARTTLS sent
    HANDSHAKE = "handshake"  # 220 to STARTTLS: the I/O layer does the TLS handshake
    AUTH = "auth"  # an AUTH exchange is under way
    TRANSACTION = "transaction"
    QUIT = "quit"  # QUIT sent
    REFUSED = "refused"  # the greeting or EHLO/HELO was refused: only QUIT is left
    CLOSED = "closed"


class _Op(enum.Enum):
    __hash__ = object.__hash__

    STARTTLS = "starttls"
    AUTH = "auth"
    TRANSACTION = "transaction"
    QUIT = "quit"


_ALL_OPS: Final = frozenset(_Op)

# Which operations the I/O layer may start in each state. In CLOSED every operation is allowed
# and ends at once with the reply that closed the session, so a relay loop needs no special
# case for a peer that went away between two messages.
_OPERATIONS: Final[dict[_State, frozenset[_Op]]] = {
    _State.READY: _ALL_OPS,
    _State.REFUSED: frozenset({_Op.QUIT}),
    _State.CLOSED: _ALL_OPS,
}


class _Cmd(enum.Enum):
    """A reply the client waits for; the value is what ``waiting_for`` reports."""

    __hash__ = object.__hash__

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    RSET = "RSET"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    END = "END"  # the final "." of DATA content
    BDAT = "BDAT"
    QUIT = "QUIT"


# The session command each setup state waits on, for a Refused event when the session ends.
_REFUSED_COMMAND: Final = {
    _Cmd.GREETING: "greeting",
    _Cmd.EHLO: "EHLO",
    _Cmd.HELO: "HELO",
    _Cmd.STARTTLS: "STARTTLS",
    _Cmd.AUTH: "AUTH",
}

# An expected reply: the command, and an argument (the recipient index for RCPT, 1 for the last
# BDAT chunk and for the "." that ends real content, else 0).
_Expect: TypeAlias = tuple[_Cmd, int]
# A command not yet sent (without PIPELINING): what to expect, and its bytes.
_Pending: TypeAlias = tuple[_Cmd, int, bytes]

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF (RFC 4954 4: an AUTH
# initial response that does not fit is sent after a 334 instead).
_COMMAND_LINE_LIMIT: Final = 512
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f]")
#: The chunk size for BDAT; one chunk (``BDAT n LAST``) for any message up to it.
DEFAULT_CHUNK_SIZE: Final = 1 << 20


def _is_2xx(reply: Reply | None) -> bool:
    return reply is not None and 200 <= reply.code < 300


def _normalize(body: bytes) -> bytes:
    """Lines end with CRLF (RFC 5321 2.3.8): bare LFs become CRLF, and the last line ends."""
    if body.count(b"\n") != body.count(b"\r\n"):
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


def _dot_stuff(content: bytes) -> bytes:
    """RFC 5321 4.5.2: a "." is put before every line starting with "."; then the end "."."""
    if content.startswith(b"."):
        content = b"." + content
    if b"\r\n." in content:
        content = content.replace(b"\r\n.", b"\r\n..")
    return content + b".\r\n"


@attrs.define
class _Tx:
    """A transaction in flight."""

    tx: Transaction
    content: bytes  # normalized (or byte-exact for BINARYMIME); SIZE is its length
    chunking: bool
    rcpt_replies: list[Reply | None]
    mail_reply: Reply | None = None
    data_reply: Reply | None = None
    accepted: int = 0
    data_started: bool = False  # DATA or the first BDAT was sent (or pipelined)
    waiting: deque[_Pending] = attrs.Factory(deque)  # not yet sent (no PIPELINING)


class ClientConnection:
    """One SMTP session, client side (see the module docstring for how to drive it).

    ``hostname`` is the name sent in EHLO/HELO; ``chunk_size`` the largest BDAT chunk.
    Properties: :attr:`extensions` (None until the session is open, and again after STARTTLS
    until the new EHLO is answered), :attr:`greeting`, :attr:`tls`, :attr:`authenticated`,
    :attr:`closed`, :attr:`closing_reply` and :attr:`waiting_for`.
    """

    def __init__(self, hostname: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not hostname or " " in hostname or _CONTROL_RE.search(hostname):
            raise ValueError(f"not a hostname for EHLO: {hostname!r}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self._hostname = hostname
        self._chunk_size = chunk_size
        self._state = _State.GREETING
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for LF
        self._eof = False
        self._out: list[bytes] = []
        self._expected: deque[_Expect] = deque([(_Cmd.GREETING, 0)])
        self._events: deque[ClientEvent] = deque()
        self._reply_code = 0
        self._reply_lines: list[str] = []
        self._greeting: Reply | None = None
        self._extensions: Extensions | None = None
        self._tls = False
        self._authenticated = False
        self._closing: Reply | None = None
        self._auth_steps: deque[bytes] = deque()  # SASL responses still to send
        self._tx: _Tx | None = None
        self._transactions = 0  # transactions sent on this session (RSET before the next)

    # --- properties ------------------------------------------------------------------------

    @property
    def extensions(self) -> Extensions | None:
        """The peer's extensions from the last accepted EHLO (empty after HELO)."""
        return self._extensions

    @property
    def greeting(self) -> Reply | None:
        """The peer's 220 greeting, once read."""
        return self._greeting

    @property
    def tls(self) -> bool:
        """True once :meth:`tls_started` was called."""
        return self._tls

    @property
    def authenticated(self) -> bool:
        """True once AUTH succeeded."""
        return self._authenticated

    @property
    def closed(self) -> bool:
        """True when the session is over: QUIT answered, 421, EOF, garbled reply, abort."""
        return self._state is _State.CLOSED

    @property
    def closing_reply(self) -> Reply | None:
        """The reply that ended the session (the peer's, or a made-up 421), once closed."""
        return self._closing

    @property
    def waiting_for(self) -> str | None:
        """The command whose reply is read next, for the RFC 5321 4.5.3.2 timeouts.

        ``"greeting"``, ``"EHLO"``, ``"HELO"``, ``"STARTTLS"``, ``"AUTH"``, ``"RSET"``,
        ``"MAIL"``, ``"RCPT"``, ``"DATA"`` (the 354), ``"END"`` (the reply to the content's
        final "."), ``"BDAT"`` or ``"QUIT"``; None when no reply is awaited.
        """
        if not self._expected or self._state is _State.CLOSED:
            return None
        return self._expected[0][0].value

    # --- the I/O layer's calls -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` means the peer closed its side (EOF)."""
        if self._state is _State.CLOSED:
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def bytes_to_send(self) -> bytes:
        """Everything to write to the peer now (``b""`` when nothing)."""
        if not self._out:
            return b""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ClientEvent | Sentinel:
        """The event that ends the current operation, or ``NEED_DATA``, or ``PAUSED``.

        ``NEED_DATA``: write :meth:`bytes_to_send` (this call may have made commands), then read
        and call :meth:`receive_data`. ``PAUSED``: no operation is in progress; start one. When
        an event is returned, :meth:`bytes_to_send` is empty.
        """
        while True:
            if self._events:
                return self._events.popleft()
            if not self._expected or self._state is _State.HANDSHAKE:
                return PAUSED
            try:
                reply = self._read_reply()
            except _Garbled as error:
                self._lose(_garbled(str(error)))
                continue
            if reply is None:
                if self._eof:
                    self._lose(_CONNECTION_LOST)
                    continue
                return NEED_DATA
            self._handle(reply)

    def abort(self, reason: str) -> None:
        """The I/O layer gives up on the session (a timeout, a network error).

        The session closes; the operation in progress ends with ``421 4.4.2 <reason>`` for every
        reply that did not come, which :meth:`next_event` returns next. Nothing more is sent.
        """
        if self._state is not _State.CLOSED:
            self._lose(_lost(reason))

    def starttls(self) -> None:
        """Send STARTTLS (RFC 3207). Ends in :class:`TlsReady` or :class:`Refused`."""
        self._begin(_Op.STARTTLS)
        if self._state is _State.CLOSED:
            return self._finish_closed("STARTTLS")
        if self._tls:
            raise LocalProtocolError("STARTTLS on a session that is already TLS")
        self._state = _State.STARTTLS
        self._send(_Cmd.STARTTLS, 0, b"STARTTLS\r\n")

    def tls_started(self) -> None:
        """The TLS handshake after :class:`TlsReady` is done: forget the extensions, EHLO again.

        Anything the peer sent after its 220 and before the handshake is discarded: it came in
        the clear and could be an injected reply (RFC 3207 section 6, cf. CVE-2011-0411).
        Ends in :class:`Ready` or :class:`Refused`.
        """
        if self._state is not _State.HANDSHAKE:
            raise LocalProtocolError("tls_started() without a TlsReady before it")
        self._buf.clear()
        self._scanned = 0
        self._tls = True
        self._extensions = None
        self._authenticated = False
        self._state = _State.HELLO
        self._send(_Cmd.EHLO, 0, f"EHLO {self._hostname}\r\n".encode())

    def auth(
        self,
        username: str,
        password: str,
        *,
        mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
    ) -> None:
        """Authenticate (RFC 4954) with the first of ``mechanisms`` the peer offers.

        PLAIN (RFC 4616) goes with an initial response when the command fits in 512 octets;
        LOGIN answers two 334 prompts. Ends in :class:`Authenticated` or :class:`Refused` (the
        peer's 535, or a made-up 454 4.7.0 when it offers none of ``mechanisms``). Raises
        ValueError for a NUL, CR or LF in the credentials.
        """
        self._begin(_Op.AUTH)
        if self._state is _State.CLOSED:
            return self._finish_closed("AUTH")
        if self._authenticated:
            raise LocalProtocolError("AUTH on a session that is already authenticated")
        for value in (username, password):
            if "\0" in value or "\r" in value or "\n" in value:
                raise ValueError("credentials must not hold NUL, CR or LF")
        assert self._extensions is not None
        offered = self._extensions.auth
        mechanism = next((m.upper() for m in mechanisms if m.upper() in offered), None)
        if mechanism == "PLAIN":
            response = base64.b64encode(
                b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8")
            )
            line = b"AUTH PLAIN " + response + b"\r\n"
            if len(line) > _COMMAND_LINE_LIMIT:
                line = b"AUTH PLAIN\r\n"
                self._auth_steps = deque([response])
            else:
                self._auth_steps = deque()
        elif mechanism == "LOGIN":
            line = b"AUTH LOGIN\r\n"
            self._auth_steps = deque(
                [
                    base64.b64encode(username.encode("utf-8")),
                    base64.b64encode(password.encode("utf-8")),
                ]
            )
        else:
            self._events.append(Refused("AUTH", _NO_MECHANISM))
            return None
        self._state = _State.AUTH
        self._send(_Cmd.AUTH, 0, line)
        return None

    def start_transaction(self, transaction: Transaction) -> None:
        """Send one message; ends in :class:`TransactionResult`.

        Adds SIZE= when the peer offers SIZE, BODY=8BITMIME for an 8-bit message (BODY=
        BINARYMIME for ``binarymime``), SMTPUTF8 when a path is not ASCII or the message was
        received with SMTPUTF8 and its header is not ASCII. When the peer lacks what the message
        needs, nothing is sent and the result is ``local``. Raises ValueError for no recipients
        or a control character in a path.
        """
        self._begin(_Op.TRANSACTION)
        tx = transaction
        if not tx.recipients:
            raise ValueError("a transaction needs at least one recipient")
        for path in (tx.reverse_path, *tx.recipients):
            if _CONTROL_RE.search(path):
                raise ValueError(f"control character in path {path!r}")
        if self._state is _State.CLOSED:
            closing = self._closing or _CONNECTION_LOST
            self._events.append(
                TransactionResult(
                    (closing,) * len(tx.recipients), None, (None,) * len(tx.recipients), None
                )
            )
            return
        assert self._extensions is not None
        ext = self._extensions
        content = tx.body if tx.binarymime else _normalize(tx.body)
        params, refusal = self._mail_parameters(tx, content, ext)
        if refusal is not None:
            self._events.append(
                TransactionResult(
                    (refusal,) * len(tx.recipients),
                    None,
                    (None,) * len(tx.recipients),
                    None,
                    local=True,
                )
            )
            return
        state = _Tx(tx, content, ext.chunking, [None] * len(tx.recipients))
        self._tx = state
        self._state = _State.TRANSACTION
        commands: list[_Pending] = []
        if self._transactions:
            commands.append((_Cmd.RSET, 0, b"RSET\r\n"))
        self._transactions += 1
        commands.append((_Cmd.MAIL, 0, f"MAIL FROM:<{tx.reverse_path}>{params}\r\n".encode()))
        for index, recipient in enumerate(tx.recipients):
            commands.append((_Cmd.RCPT, index, f"RCPT TO:<{recipient}>\r\n".encode()))
        if ext.pipelining:
            # RFC 2920 3.1: DATA ends a group; RFC 3030 4.2 pipelines a BDAT with the envelope.
            if not state.chunking:
                commands.append((_Cmd.DATA, 0, b"DATA\r\n"))
                state.data_started = True
            elif len(content) <= self._chunk_size:
                commands.append((_Cmd.BDAT, 1, b"BDAT %d LAST\r\n" % len(content) + content))
                state.data_started = True
            for command, arg, data in commands:
                self._send(command, arg, data)
        else:
            state.waiting.extend(commands)
            self._send_next()

    def quit(self) -> None:
        """Send QUIT (RFC 5321 4.1.1.10); ends in :class:`Closed`."""
        self._begin(_Op.QUIT)
        if self._state is _State.CLOSED:
            self._events.append(Closed(self._closing or _CONNECTION_LOST))
            return
        self._state = _State.QUIT
        self._send(_Cmd.QUIT, 0, b"QUIT\r\n")

    # --- operations ------------------------------------------------------------------------

    def _begin(self, op: _Op) -> None:
        if self._events or op not in _OPERATIONS.get(self._state, ()):
            raise LocalProtocolError(f"cannot start {op.value} in state {self._state.value}")

    def _finish_closed(self, command: str) -> None:
        self._events.append(Refused(command, self._closing or _CONNECTION_LOST))

    def _send(self, command: _Cmd, arg: int, data: bytes) -> None:
        self._out.append(data)
        self._expected.append((command, arg))

    def _send_next(self) -> None:
        """Without PIPELINING: send the next waiting command."""
        assert self._tx is not None
        command, arg, data = self._tx.waiting.popleft()
        self._send(command, arg, data)

    def _mail_parameters(
        self, tx: Transaction, content: bytes, ext: Extensions
    ) -> tuple[str, Reply | None]:
        """The MAIL parameters, or the reply refusing the message for this peer."""
        params = []
        utf8_paths = not all(path.isascii() for path in (tx.reverse_path, *tx.recipients))
        smtputf8 = utf8_paths
        if tx.smtputf8 and not utf8_paths:
            # RFC 6531 3.2: SMTPUTF8 only when the message needs it, i.e. a UTF-8 header.
            end = content.find(b"\r\n\r\n")
            smtputf8 = not (content if end < 0 else content[:end]).isascii()
        if smtputf8 and not ext.smtputf8:
            return "", _UTF8_ADDRESS if utf8_paths else _UTF8_HEADER
        if ext.size is not None:
            if ext.size and len(content) > ext.size:
                return "", Reply(552, "5.3.4", _TOO_BIG.format(ext.size))
            params.append(f"SIZE={len(content)}")
        if tx.binarymime:
            if not (ext.binarymime and ext.chunking):
                return "", _NEEDS_BINARYMIME
            params.append("BODY=BINARYMIME")
        elif not content.isascii():
            if not ext.eight_bit_mime:
                return "", _NEEDS_8BITMIME
            params.append("BODY=8BITMIME")
        if smtputf8:
            params.append("SMTPUTF8")
        return "".join(" " + param for param in params), None

    # --- replies ---------------------------------------------------------------------------

    def _read_reply(self) -> Reply | None:
        """The next complete reply in the buffer, or None; raises _Garbled.

        THE reply parser: lines end with LF (a CR before it is dropped), each is three digits
        then " " (last line), "-" (more follow) or nothing, all lines of a reply share the code.
        """
        buf = self._buf
        while True:
            end = buf.find(b"\n", self._scanned)
            if end < 0:
                if len(buf) > _MAX_REPLY_LINE:
                    raise _Garbled("reply line too long")
                self._scanned = len(buf)
                return None
            line = bytes(buf[:end])
            del buf[: end + 1]
            self._scanned = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > _MAX_REPLY_LINE:
                raise _Garbled("reply line too long")
            code_bytes = line[:3]
            separator = line[3:4]
            if (
                len(code_bytes) < 3
                or not code_bytes.isdigit()
                or code_bytes[0] not in b"2345"
                or separator not in (b"", b" ", b"-")
            ):
                raise _Garbled(f"garbled reply {line[:64]!r}")
            code = int(code_bytes)
            if self._reply_lines and code != self._reply_code:
                raise _Garbled(f"reply code changed within a reply {line[:64]!r}")
            self._reply_code = code
            self._reply_lines.append(line[4:].decode("utf-8", "replace"))
            if separator == b"-":
                if len(self._reply_lines) >= _MAX_REPLY_LINES:
                    raise _Garbled("too many reply lines")
                continue
            texts = self._reply_lines
            self._reply_lines = []
            return _make_reply(code, texts)

    def _handle(self, reply: Reply) -> None:
        command, arg = self._expected.popleft()
        if reply.code == 421:
            # RFC 5321 3.8: the peer closes; no other reply will come. The 421 is still the
            # reply to this command, as the transaction's raw replies show.
            tx = self._tx
            if tx is not None:
                if command is _Cmd.MAIL:
                    tx.mail_reply = reply
                elif command is _Cmd.RCPT:
                    tx.rcpt_replies[arg] = reply
                elif command in (_Cmd.DATA, _Cmd.BDAT) or (command is _Cmd.END and arg):
                    tx.data_reply = reply
            self._lose(reply, command)
            return
        handler = _HANDLERS[command]
        handler(self, arg, reply)

    def _unexpected(self, command: _Cmd, reply: Reply) -> None:
        self._lose(_garbled(f"unexpected reply {reply.code} to {command.value}"), command)

    def _on_greeting(self, arg: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.GREETING, reply)
        if reply.code // 100 == 2:
            self._greeting = reply
            self._state = _State.HELLO
            self._send(_Cmd.EHLO, 0, f"EHLO {self._hostname}\r\n".encode())
        else:
            self._state = _State.REFUSED
            self._events.append(Refused("greeting", reply))
        return None

    def _on_ehlo(self, arg: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.EHLO, reply)
        if reply.code // 100 == 2:
            self._open(reply, Extensions.from_ehlo(reply))
        elif reply.code // 100 == 5:
            # RFC 5321 3.2: a server without EHLO answers 500/502/etc.; fall back to HELO.
            self._send(_Cmd.HELO, 0, f"HELO {self._hostname}\r\n".encode())
        else:
            self._state = _State.REFUSED
            self._events.append(Refused("EHLO", reply))
        return None

    def _on_helo(self, arg: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.HELO, reply)
        if reply.code // 100 == 2:
            self._open(reply, Extensions())
        else:
            self._state = _State.REFUSED
            self._events.append(Refused("HELO", reply))
        return None

    def _open(self, reply: Reply, extensions: Extensions) -> None:
        self._extensions = extensions
        self._state = _State.READY
        self._events.append(Ready(reply, extensions))

    def _on_starttls(self, arg: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.STARTTLS, reply)
        if reply.code // 100 == 2:
            self._state = _State.HANDSHAKE
            self._events.append(TlsReady(reply))
        else:
            self._state = _State.READY
            self._events.append(Refused("STARTTLS", reply))
        return None

    def _on_auth(self, arg: int, reply: Reply) -> None:
        if reply.code == 334:
            # The next SASL response; a challenge beyond what the mechanism needs is
            # cancelled with "*" (RFC 4954 4), and the peer's 501 then ends the exchange.
            step = self._auth_steps.popleft() if self._auth_steps else b"*"
            self._send(_Cmd.AUTH, 0, step + b"\r\n")
            return None
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.AUTH, reply)
        self._auth_steps.clear()
        self._state = _State.READY
        if reply.code // 100 == 2:
            self._authenticated = True
            self._events.append(Authenticated(reply))
        else:
            self._events.append(Refused("AUTH", reply))
        return None

    def _on_quit(self, arg: int, reply: Reply) -> None:
        self._close(reply)
        self._events.append(Closed(reply))

    # --- transaction replies ---------------------------------------------------------------

    def _on_rset(self, arg: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.RSET, reply)
        # A refused RSET changes nothing: the MAIL reply tells whether the peer goes on.
        return self._advance()

    def _on_mail(self, arg: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.MAIL, reply)
        tx = self._tx
        assert tx is not None
        tx.mail_reply = reply
        if not _is_2xx(reply):
            tx.waiting.clear()  # without PIPELINING, no RCPT follows a refused MAIL
        return self._advance()

    def _on_rcpt(self, index: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.RCPT, reply)
        tx = self._tx
        assert tx is not None
        tx.rcpt_replies[index] = reply
        if _is_2xx(reply) and _is_2xx(tx.mail_reply):
            tx.accepted += 1
        return self._advance()

    def _on_data(self, arg: int, reply: Reply) -> None:
        tx = self._tx
        assert tx is not None
        if reply.code == 354:
            if tx.accepted:
                self._send(_Cmd.END, 1, _dot_stuff(tx.content))
            else:
                # RFC 2920 3.1: DATA was pipelined and accepted although no recipient was:
                # send only the "." so that no message is delivered.
                self._send(_Cmd.END, 0, b".\r\n")
            return None
        if reply.code // 100 in (2, 3):
            return self._unexpected(_Cmd.DATA, reply)
        tx.data_reply = reply
        return self._advance()

    def _on_end(self, real: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.END, reply)
        tx = self._tx
        assert tx is not None
        if real:
            tx.data_reply = reply
        return self._advance()

    def _on_bdat(self, last: int, reply: Reply) -> None:
        if reply.code // 100 == 3:
            return self._unexpected(_Cmd.BDAT, reply)
        tx = self._tx
        assert tx is not None
        # RFC 3030 2: a refused chunk ends the transaction; the first refusal is the answer.
        first_refusal = tx.data_reply is None or _is_2xx(tx.data_reply)
        if first_refusal and (last or not _is_2xx(reply)):
            tx.data_reply = reply
        if not _is_2xx(reply):
            tx.waiting.clear()
        return self._advance()

    def _advance(self) -> None:
        """After a transaction reply: send what comes next, or end the transaction."""
        tx = self._tx
        assert tx is not None
        if self._expected:
            return  # more pipelined replies to come
        if tx.waiting:
            return self._send_next()
        if not tx.data_started and tx.accepted:
            tx.data_started = True
            if not tx.chunking:
                self._send(_Cmd.DATA, 0, b"DATA\r\n")
                return None
            content = tx.content
            size = self._chunk_size
            chunks: list[_Pending] = []
            for start in range(0, max(len(content), 1), size):
                chunk = content[start : start + size]
                last = start + size >= len(content)
                head = b"BDAT %d LAST\r\n" % len(chunk) if last else b"BDAT %d\r\n" % len(chunk)
                chunks.append((_Cmd.BDAT, int(last), head + chunk))
            assert self._extensions is not None
            if self._extensions.pipelining:
                for command, arg, data in chunks:
                    self._send(command, arg, data)
            else:
                tx.waiting.extend(chunks)
                self._send_next()
            return None
        self._finish_transaction()
        return None

    def _finish_transaction(self) -> None:
        tx = self._tx
        assert tx is not None
        self._tx = None
        missing = self._closing or _CONNECTION_LOST
        results = []
        for rcpt in tx.rcpt_replies:
            if tx.mail_reply is None:
                results.append(missing)
            elif not _is_2xx(tx.mail_reply):
                results.append(tx.mail_reply)
            elif rcpt is None:
                results.append(missing)
            elif not _is_2xx(rcpt):
                results.append(rcpt)
            else:
                results.append(tx.data_reply or missing)
        if self._state is not _State.CLOSED:
            self._state = _State.READY
        self._events.append(
            TransactionResult(tuple(results), tx.mail_reply, tuple(tx.rcpt_replies), tx.data_reply)
        )

    # --- the end ---------------------------------------------------------------------------

    def _close(self, reply: Reply) -> None:
        self._state = _State.CLOSED
        self._closing = reply
        self._expected.clear()
        self._out.clear()
        self._buf.clear()
        self._scanned = 0
        self._auth_steps.clear()

    def _lose(self, reply: Reply, command: _Cmd | None = None) -> None:
        """The session is over (421, EOF, garbled, abort): end the operation in progress.

        ``command`` is the one whose reply was just taken from ``_expected``, if any.
        """
        waiting = command or (self._expected[0][0] if self._expected else None)
        state = self._state
        self._close(reply)
        if state is _State.TRANSACTION and self._tx is not None:
            self._finish_transaction()
        elif state is _State.QUIT:
            self._events.append(Closed(reply))
        elif waiting in _REFUSED_COMMAND:
            assert waiting is not None
            self._events.append(Refused(_REFUSED_COMMAND[waiting], reply))


_HANDLERS: Final[dict[_Cmd, Callable[[ClientConnection, int, Reply], None]]] = {
    _Cmd.GREETING: ClientConnection._on_greeting,
    _Cmd.EHLO: ClientConnection._on_ehlo,
    _Cmd.HELO: ClientConnection._on_helo,
    _Cmd.STARTTLS: ClientConnection._on_starttls,
    _Cmd.AUTH: ClientConnection._on_auth,
    _Cmd.RSET: ClientConnection._on_rset,
    _Cmd.MAIL: ClientConnection._on_mail,
    _Cmd.RCPT: ClientConnection._on_rcpt,
    _Cmd.DATA: ClientConnection._on_data,
    _Cmd.END: ClientConnection._on_end,
    _Cmd.BDAT: ClientConnection._on_bdat,
    _Cmd.QUIT: ClientConnection._on_quit,
}
