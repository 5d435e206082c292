"""A scripted fake SMTP peer: the remote MX, relay target or smarthost of the relay tests, which
does exactly what a test tells it to and records everything it receives.

A :class:`FakePeer` listens on 127.0.0.1, port 0, once started with ``await
nursery.start(peer.serve)`` (which returns the port).  Each connection follows one
:class:`Script` -- the first connection the first script, the second the second, and so on, the
last one repeating -- so "4xx now, success on the next connection" is two scripts.  A script
chooses the greeting, the EHLO extensions (8BITMIME, SIZE, CHUNKING, PIPELINING, SMTPUTF8 ...;
STARTTLS is offered whenever the peer has an ssl context), a reply per command (a tuple gives
one reply per occurrence within the session, the last repeating), a reply per recipient, a
connection that never answers after a given command, and one that drops in the middle of the
message.

The peer behaves like a careful real server where the client can get things wrong: a ``BODY=``
or ``SMTPUTF8`` parameter that was not offered is refused (555 5.5.4), ``SIZE=`` over the
announced SIZE gets 552 5.3.4, and so does a message that turns out larger; a reply code 421
closes the connection.

Everything is recorded per connection (:class:`Session`): command lines, TLS, AUTH credentials,
and each transaction (:class:`Transaction`) with its envelope, its message bytes exactly as
received (dot-unstuffed, and raw), whether it came by DATA or BDAT and the final reply.  Tests
wait for what they expect with :meth:`FakePeer.wait_for`, which wakes up on every change.

Nothing here imports katerchen: the peer must not share the bugs of the code it tests.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import attrs
import trio

__all__ = [
    "DEFAULT_EXTENSIONS",
    "FakePeer",
    "Script",
    "Session",
    "Transaction",
]

#: What a modern MX offers (no STARTTLS: that comes with an ssl context).
DEFAULT_EXTENSIONS: Final = (
    "PIPELINING",
    "SIZE 10485760",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "SMTPUTF8",
)

#: Upper bound for any single wait (the same as tests.conftest.TIMEOUT).
TIMEOUT: Final = 10.0

_DEFAULT_REPLIES: Final[Mapping[str, str]] = {
    "GREETING": "220 fake.test ESMTP fakepeer",
    "HELO": "250 fake.test",
    "MAIL": "250 2.1.0 Ok",
    "RCPT": "250 2.1.5 Ok",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    "MESSAGE": "250 2.0.0 Ok: queued as FAKE",
    "RSET": "250 2.0.0 Ok",
    "NOOP": "250 2.0.0 Ok",
    "QUIT": "221 2.0.0 Bye",
    "STARTTLS": "220 2.0.0 Ready to start TLS",
    "AUTH": "235 2.7.0 Authentication successful",
    "BDAT": "250 2.0.0 Chunk received",
}
#: The most a command line may be before the peer gives up on the client (RFC 5321 4.5.3.1.4
#: says 512; AUTH lines may be longer).
_MAX_LINE: Final = 12288


@attrs.frozen
class Script:
    """What one connection does.

    *replies* overrides a reply by name: a command verb ("EHLO", "MAIL", "RCPT", "DATA", "BDAT"
    -- for the non-last chunks --, "RSET", "QUIT", "STARTTLS", "AUTH"), "GREETING", or
    "MESSAGE" (the reply to a whole message: after the final dot, or to ``BDAT ... LAST``).  A
    tuple gives the replies of the first, second ... occurrence in the session; the last repeats.
    An "EHLO" reply replaces the extension list (e.g. "502 5.5.1" for a peer that only knows
    HELO).  *rcpt* maps a (lowercased) recipient to its reply, ahead of "RCPT".

    *hang_after* names a command from which on the peer never answers again, that command
    included (it keeps reading and discarding until the client gives up); or "GREETING" for a
    peer that never greets, or "MESSAGE" for one that takes the whole message and then says
    nothing.  *drop_after* closes
    the connection, without a reply, once that many bytes of a message (DATA or BDAT) arrived.

    *auth* is a users-to-passwords map; with it the peer offers ``AUTH`` with *auth_mechanisms*
    (only after STARTTLS when *auth_requires_tls*).  *starttls* False keeps STARTTLS unoffered
    even when the peer has an ssl context.
    """

    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    replies: Mapping[str, str | tuple[str, ...]] = attrs.field(factory=dict)
    rcpt: Mapping[str, str] = attrs.field(factory=dict)
    hang_after: str | None = None
    drop_after: int | None = None
    auth: Mapping[str, str] = attrs.field(factory=dict)
    auth_requires_tls: bool = True
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    starttls: bool = True

    @property
    def size_limit(self) -> int | None:
        for extension in self.extensions:
            keyword, _, value = extension.partition(" ")
            if keyword.upper() == "SIZE" and value.strip().isdigit() and int(value) > 0:
                return int(value)
        return None

    def offers(self, keyword: str) -> bool:
        return any(e.split(" ", 1)[0].upper() == keyword for e in self.extensions)


@attrs.define
class Transaction:
    """One MAIL transaction as the peer saw it."""

    mail_from: str  # the reverse-path without its angle brackets ("" for <>)
    parameters: dict[str, str]  # MAIL parameters, keys uppercased ("BODY": "8BITMIME")
    recipients: list[str] = attrs.field(factory=list)  # accepted (2xx) RCPTs, as sent
    refused: list[tuple[str, str]] = attrs.field(factory=list)  # (recipient, reply)
    via: str = ""  # "DATA" or "BDAT" once the message started
    chunks: list[int] = attrs.field(factory=list)  # BDAT chunk sizes
    raw: bytearray = attrs.field(factory=bytearray)  # the message bytes as they came
    data: bytes | None = None  # the whole message, dot-unstuffed; None until it is complete
    reply: str = ""  # the reply to the whole message

    @property
    def accepted(self) -> bool:
        """The message was taken: its final reply was 2xx."""
        return self.data is not None and self.reply.startswith("2")


@attrs.define
class Session:
    """One connection."""

    number: int  # 0 for the first connection
    script: Script
    opened_at: float  # trio.current_time() when it was accepted (MockClock tests time retries)
    commands: list[str] = attrs.field(factory=list)  # every command line, in order
    helo: str = ""
    tls: bool = False
    tls_failed: bool = False  # the client started TLS, and the handshake failed
    auth: tuple[str, str, str] | None = None  # (mechanism, user, password) that succeeded
    transactions: list[Transaction] = attrs.field(factory=list)
    hung: bool = False  # the script's hang_after happened
    dropped: bool = False  # the script's drop_after happened
    closed: bool = False  # the connection is over

    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c in self.commands]


class _Closed(Exception):
    """The client went away, or the script ended the connection."""


@attrs.define(eq=False)
class FakePeer:
    """A scripted SMTP peer on 127.0.0.1 (see the module docstring)."""

    scripts: Sequence[Script] = (Script(),)
    ssl_context: ssl.SSLContext | None = None
    hostname: str = "fake.test"
    port: int = 0
    sessions: list[Session] = attrs.field(factory=list)
    active: int = 0  # connections open now
    max_active: int = 0  # the most that were ever open at once
    _changed: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    def __attrs_post_init__(self) -> None:
        if not self.scripts:
            raise ValueError("a FakePeer needs at least one Script")

    # --- what the tests look at ---

    @property
    def transactions(self) -> list[Transaction]:
        return [t for s in self.sessions for t in s.transactions]

    @property
    def accepted(self) -> list[Transaction]:
        """Every message the peer took (final reply 2xx), in order."""
        return [t for t in self.transactions if t.accepted]

    def delivered_to(self) -> list[str]:
        """Every recipient of every accepted message, in order (duplicates kept)."""
        return [r for t in self.accepted for r in t.recipients]

    async def wait_for(self, condition: Callable[[], object], *, within: float = TIMEOUT) -> None:
        """Wait until *condition* holds, re-checking on every change the peer records; fail
        after *within* seconds (of the trio clock: give MockClock tests a long bound)."""
        with trio.fail_after(within):
            while not condition():
                await self._changed.park()

    def _note(self) -> None:
        self._changed.unpark_all()

    # --- the server ---

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 port 0 and serve connections forever; ``started(port)``."""
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listener.socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        number = len(self.sessions)
        script = self.scripts[min(number, len(self.scripts) - 1)]
        session = Session(number, script, trio.current_time())
        self.sessions.append(session)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._note()
        connection = _Connection(self, session, stream)
        try:
            await connection.run()
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.active -= 1
            session.closed = True
            self._note()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(connection.stream)


@attrs.define(eq=False)
class _Connection:
    peer: FakePeer
    session: Session
    stream: trio.abc.Stream
    buffer: bytearray = attrs.field(factory=bytearray)
    counts: dict[str, int] = attrs.field(factory=dict)
    transaction: Transaction | None = None

    @property
    def script(self) -> Script:
        return self.session.script

    # --- bytes ---

    async def _fill(self) -> None:
        data = await self.stream.receive_some()
        if not data:
            raise _Closed
        self.buffer += data

    async def read_line(self) -> str:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end]).removesuffix(b"\r")
                del self.buffer[: end + 1]
                return line.decode("utf-8", "replace")
            if len(self.buffer) > _MAX_LINE:
                raise _Closed
            await self._fill()

    async def send(self, reply: str) -> None:
        lines = reply.split("\n")
        text = "".join(
            f"{line[:3]}-{line[4:]}\r\n" if i < len(lines) - 1 else f"{line}\r\n"
            for i, line in enumerate(lines)
        )
        await self.stream.send_all(text.encode("utf-8"))
        if reply.startswith("421"):
            raise _Closed

    def reply_for(self, name: str) -> str:
        """The script's reply for the n-th occurrence of *name* in this session."""
        n = self.counts.get(name, 0)
        self.counts[name] = n + 1
        reply = self.script.replies.get(name, _DEFAULT_REPLIES.get(name, "250 2.0.0 Ok"))
        if isinstance(reply, tuple):
            return reply[min(n, len(reply) - 1)]
        return reply

    async def hang(self) -> None:
        """Never answer again: read and discard until the client closes."""
        self.session.hung = True
        self.peer._note()
        self.buffer.clear()
        while True:
            await self._fill()
            self.buffer.clear()

    async def drop(self) -> None:
        self.session.dropped = True
        self.peer._note()
        raise _Closed

    # --- the dialogue ---

    async def run(self) -> None:
        if self.script.hang_after == "GREETING":
            await self.hang()
        await self.send(self.reply_for("GREETING").replace("fake.test", self.peer.hostname, 1))
        while True:
            line = await self.read_line()
            self.session.commands.append(line)
            self.peer._note()
            verb, _, argument = line.partition(" ")
            verb = verb.upper()
            handler = getattr(self, f"do_{verb.lower()}", None) if verb.isalpha() else None
            if handler is None:
                await self.send("500 5.5.2 Command not recognized")
                continue
            if verb == self.script.hang_after:
                await self.hang()
            await handler(argument)

    def extensions(self) -> list[str]:
        script = self.script
        extensions = list(script.extensions)
        if self.peer.ssl_context is not None and script.starttls and not self.session.tls:
            extensions.append("STARTTLS")
        if self.auth_offered():
            extensions.append(" ".join(("AUTH", *script.auth_mechanisms)))
        return extensions

    def auth_offered(self) -> bool:
        script = self.script
        return bool(script.auth) and (self.session.tls or not script.auth_requires_tls)

    async def do_ehlo(self, argument: str) -> None:
        if "EHLO" in self.script.replies:
            reply = self.reply_for("EHLO")
            if not reply.startswith("250"):
                await self.send(reply)
                return
        self.session.helo = argument.strip()
        self.transaction = None
        lines = [self.peer.hostname, *self.extensions()]
        await self.send("\n".join(f"250 {line}" for line in lines))

    async def do_helo(self, argument: str) -> None:
        reply = self.reply_for("HELO")
        if reply.startswith("2"):
            self.session.helo = argument.strip()
            self.transaction = None
        await self.send(reply)

    async def do_starttls(self, argument: str) -> None:
        context = self.peer.ssl_context
        if context is None or self.session.tls or not self.script.starttls:
            await self.send("502 5.5.1 STARTTLS not offered")
            return
        reply = self.reply_for("STARTTLS")
        await self.send(reply)
        if not reply.startswith("220"):
            return
        # Anything the client sent after STARTTLS, before the handshake, is discarded: a
        # careful server must not act on it (CVE-2011-0411).
        self.buffer.clear()
        tls = trio.SSLStream(self.stream, context, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            self.session.tls_failed = True
            self.peer._note()
            raise _Closed from None
        self.stream = tls
        self.session.tls = True
        self.session.helo = ""
        self.transaction = None
        self.peer._note()

    async def do_auth(self, argument: str) -> None:
        script = self.script
        if not self.auth_offered():
            await self.send("502 5.5.1 AUTH not offered")
            return
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in script.auth_mechanisms:
            await self.send("504 5.5.4 Unrecognized authentication type")
            return
        try:
            if mechanism == "PLAIN":
                if not initial:
                    await self.send("334 ")
                    initial = await self.read_line()
                _, user, password = base64.b64decode(initial, validate=True).decode().split("\0")
            elif mechanism == "LOGIN":
                if not initial:
                    await self.send("334 " + base64.b64encode(b"Username:").decode())
                    initial = await self.read_line()
                user = base64.b64decode(initial, validate=True).decode()
                await self.send("334 " + base64.b64encode(b"Password:").decode())
                password = base64.b64decode(await self.read_line(), validate=True).decode()
            else:
                await self.send("504 5.5.4 Unrecognized authentication type")
                return
        except ValueError:
            await self.send("501 5.5.2 Cannot decode")
            return
        if script.auth.get(user) == password:
            self.session.auth = (mechanism, user, password)
            self.peer._note()
            await self.send(self.reply_for("AUTH"))
        else:
            await self.send("535 5.7.8 Authentication credentials invalid")

    async def do_mail(self, argument: str) -> None:
        if not self.session.helo:
            await self.send("503 5.5.1 EHLO first")
            return
        if self.transaction is not None:
            await self.send("503 5.5.1 Nested MAIL command")
            return
        if not argument.upper().startswith("FROM:"):
            await self.send("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        path, parameters = _split_path(argument[5:])
        script = self.script
        body = parameters.get("BODY", "7BIT").upper()
        size = parameters.get("SIZE", "0")
        limit = script.size_limit
        if (body == "8BITMIME" and not script.offers("8BITMIME")) or (
            "SMTPUTF8" in parameters and not script.offers("SMTPUTF8")
        ):
            await self.send("555 5.5.4 Parameter not offered")
        elif body not in ("7BIT", "8BITMIME"):
            await self.send("501 5.5.4 Bad BODY")
        elif limit is not None and size.isdigit() and int(size) > limit:
            await self.send("552 5.3.4 Message size exceeds fixed limit")
        else:
            reply = self.reply_for("MAIL")
            if reply.startswith("2"):
                self.transaction = Transaction(path, parameters)
                self.session.transactions.append(self.transaction)
                self.peer._note()
            await self.send(reply)

    async def do_rcpt(self, argument: str) -> None:
        transaction = self.transaction
        if transaction is None:
            await self.send("503 5.5.1 MAIL first")
            return
        if not argument.upper().startswith("TO:"):
            await self.send("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        path, _ = _split_path(argument[3:])
        reply = self.script.rcpt.get(path.lower()) or self.reply_for("RCPT")
        if reply.startswith("2"):
            transaction.recipients.append(path)
        else:
            transaction.refused.append((path, reply))
        self.peer._note()
        await self.send(reply)

    async def do_data(self, argument: str) -> None:
        transaction = self.transaction
        if transaction is None or not transaction.recipients:
            await self.send("503 5.5.1 No valid recipients" if transaction else "503 MAIL first")
            return
        reply = self.reply_for("DATA")
        await self.send(reply)
        if not reply.startswith("354"):
            return
        transaction.via = "DATA"
        # The message ends at CRLF "." CRLF; the CRLF that ended the DATA line is the first.
        while True:
            transaction.raw += self.buffer
            self.buffer.clear()
            self.peer._note()
            drop_after = self.script.drop_after
            if drop_after is not None and len(transaction.raw) >= drop_after:
                await self.drop()
            end = (b"\r\n" + transaction.raw).find(b"\r\n.\r\n")
            if end >= 0:
                break
            await self._fill()
        self.buffer[:0] = transaction.raw[end + 3 :]
        del transaction.raw[end:]
        message = bytes(transaction.raw)
        if message.startswith(b"."):
            message = message[1:]
        await self._end_message(transaction, message.replace(b"\r\n.", b"\r\n"))

    async def do_bdat(self, argument: str) -> None:
        words = argument.split()
        if (
            not self.script.offers("CHUNKING")
            or not 1 <= len(words) <= 2
            or not words[0].isdigit()
            or (len(words) == 2 and words[1].upper() != "LAST")
        ):
            await self.send("501 5.5.4 Syntax: BDAT size [LAST]")  # the chunk is unreadable
            raise _Closed
        size = int(words[0])
        last = len(words) == 2
        transaction = self.transaction
        await self._read_exact(size, transaction)
        if transaction is None or not transaction.recipients:
            await self.send("503 5.5.1 No valid recipients")
            return
        transaction.via = "BDAT"
        transaction.chunks.append(size)
        self.peer._note()
        if last:
            await self._end_message(transaction, bytes(transaction.raw))
        else:
            await self.send(self.reply_for("BDAT"))

    async def _read_exact(self, size: int, transaction: Transaction | None) -> bytes:
        """The *size* octets of a BDAT chunk, added to the message as they come."""
        chunk = bytearray()
        drop_after = self.script.drop_after
        while True:
            take = self.buffer[: size - len(chunk)]
            del self.buffer[: len(take)]
            chunk += take
            if transaction is not None and take:
                transaction.raw += take
                self.peer._note()
                if drop_after is not None and len(transaction.raw) >= drop_after:
                    await self.drop()
            if len(chunk) == size:
                return bytes(chunk)
            await self._fill()

    async def _end_message(self, transaction: Transaction, message: bytes) -> None:
        if self.script.hang_after == "MESSAGE":
            transaction.data = message
            await self.hang()
        limit = self.script.size_limit
        if limit is not None and len(message) > limit:
            reply = "552 5.3.4 Message size exceeds fixed limit"
        else:
            reply = self.reply_for("MESSAGE")
        transaction.data = message
        transaction.reply = reply
        self.transaction = None
        self.peer._note()
        await self.send(reply)

    async def do_rset(self, argument: str) -> None:
        self.transaction = None
        await self.send(self.reply_for("RSET"))

    async def do_noop(self, argument: str) -> None:
        await self.send(self.reply_for("NOOP"))

    async def do_quit(self, argument: str) -> None:
        await self.send(self.reply_for("QUIT"))
        raise _Closed


def _split_path(text: str) -> tuple[str, dict[str, str]]:
    """``" <a@b> SIZE=10 BODY=8BITMIME"`` -> ("a@b", {"SIZE": "10", "BODY": "8BITMIME"})."""
    text = text.strip()
    if text.startswith("<"):
        path, _, rest = text[1:].partition(">")
    else:
        path, _, rest = text.partition(" ")
    parameters: dict[str, str] = {}
    for word in rest.split():
        key, _, value = word.partition("=")
        parameters[key.upper()] = value
    return path, parameters
