"""The receiver: one task per SMTP connection, carrying bytes between a trio stream and the sans-IO
protocol, routing recipients, streaming each message into the spool and committing it durably
before it answers 250.

Theory of operation.  :meth:`Receiver.handle_connection` runs one :class:`_Session` per client.
The session feeds what it reads into a :class:`~katerchen.protocol.ServerConnection` and answers
every event the protocol produces: it sends the protocol's proposed reply, or a rejection of its
own (free space at MAIL, routing at RCPT, a spool failure at the end of data).  Replies are
queued and written with one ``send_all`` just before the session blocks on a read (RFC 2920: a
pipelined batch gets its replies in one write) and before a commit, so a commit never holds back
a reply the client could already have.

The protocol pauses after each event until its reply is sent, and the reply to the end of a
message is sent only after the spool commit, so "250 queued" always means "on disk, fsynced".

Deadlines (RFC 5321 4.5.3.2): each command must arrive within ``command_timeout`` of the previous
reply; the whole of a message's data -- from the 354, or from the first BDAT -- within
``data_timeout``; between BDAT chunks both apply.  A missed deadline gets 421 4.4.2 and the
connection is closed.  Writes are bounded by ``command_timeout`` too, so a client that stops
reading cannot pin a task forever.

TLS (RFC 3207, RFC 8314).  Each connection comes from one kind of :class:`Listener`: the MX port
offers STARTTLS when ``[tls]`` is set and AUTH once TLS is up, never requiring either; the
submission port (587) requires STARTTLS before AUTH and AUTH before MAIL; the submissions port
(465) wraps the connection in TLS before the greeting and requires AUTH.  On STARTTLS the 220 is
written, and only then is the stream wrapped in a :class:`trio.SSLStream`: sending the 220 makes
the protocol drop whatever the client pipelined after STARTTLS (the CVE-2011-0411 injection), and
the receiver keeps no bytes of its own (every read goes straight into the protocol), so nothing
sent in the clear is ever executed inside the TLS session.  A handshake gets its own deadline,
``HANDSHAKE_TIMEOUT`` (or the command timeout when that is shorter); a failed one ends the
connection without a reply.  A session keeps the context it started with: a certificate reload
(:class:`~katerchen.tlsconfig.ServerTLS`) only affects new handshakes.

AUTH (RFC 4954).  The protocol runs the SASL exchange; the receiver checks the credentials
against the users file in a worker thread (scrypt is slow on purpose; ``AUTH_THREADS`` checks at
once bound the memory it takes) and counts failures per client IP: after ``[auth]
max_failures`` within ``failure_window`` the IP gets 421 4.7.0 for AUTH, without a check.  An
authenticated session may relay, and its MAIL FROM must be an address the user owns (553 5.7.1;
``[auth] allow_any_sender`` lifts that).  Neither passwords nor the failed usernames are logged.

Shutdown (:meth:`Receiver.drain`): a session idle between transactions gets 421 4.3.2 at once; a
session inside a transaction is left alone until the transaction ends, and then gets 421 4.3.2;
the app cancels whatever still runs when its grace period is over.  Cancellation is safe
anywhere: nothing is acknowledged before it is durable, and an open message is discarded in a
shielded, bounded ``finally``.

Sessions share no locks: a client that stalls only stalls its own task.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
import time
from collections.abc import Callable
from typing import NoReturn

import attrs
import trio

from katerchen import auth, maillog
from katerchen.address import Address
from katerchen.config import Config
from katerchen.envelope import Envelope, EnvelopeError, received_header
from katerchen.protocol import (
    AuthChallenge,
    AuthRequest,
    ChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Hello,
    MailFrom,
    Quit,
    RcptTo,
    Reply,
    Reset,
    Respond,
    Sentinel,
    ServerConnection,
    ServerSettings,
    StartTLS,
    replies,
)
from katerchen.routing import DomainsTree, Route
from katerchen.spool import IncomingMessage, Spool, new_queue_id
from katerchen.tlsconfig import ServerTLS, describe

__all__ = ["Listener", "Receiver"]

#: How much one read asks for.  64 KiB is trio's default and below malloc's mmap threshold.
RECEIVE_SIZE = 65536

#: MAIL is refused (452 4.3.1) while the spool has less free space than this many times the
#: message size limit.
FREE_SPACE_FACTOR = 1.5
#: How long a free-space figure is trusted before statvfs is asked again (seconds).
FREE_SPACE_TTL = 1.0

#: Bound on the cleanup (discarding an open message) that runs shielded from cancellation.
CLEANUP_TIMEOUT = 5.0
#: Bound on the 421 sent to a session cut off when the shutdown grace period is over.
GOODBYE_TIMEOUT = 1.0
#: Bound on a TLS handshake (the command timeout applies instead when it is shorter).
HANDSHAKE_TIMEOUT = 30.0
#: Password checks running at once; each scrypt takes some 32 MiB for a tenth of a second.
AUTH_THREADS = 4
#: The SASL mechanisms offered (over TLS only).
AUTH_MECHANISMS = ("PLAIN", "LOGIN")

#: RFC 4954 section 6 / RFC 3463 X.7.1: MAIL FROM an address the authenticated user does not own.
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Error: sender address not owned by the authenticated user")

#: RFC 5321 4.2.2 550 / RFC 3463 X.1.3 bad destination mailbox address syntax: a local part that
#: cannot name a mailbox directory.
UNSAFE_MAILBOX = Reply(550, "5.1.3", "Error: not a valid mailbox name")
#: RFC 3463 X.4.6 routing loop detected: the recipient's aliases loop (or nest too deep).  A
#: permanent refusal, so the sender hears of it now instead of through a bounce.
ALIAS_LOOP = Reply(550, "5.4.6", "Error: alias loop")

#: The RCPT refusal for each reason routing gives.
RCPT_REFUSALS: dict[Route, Reply] = {
    Route.UNKNOWN_MAILBOX: replies.UNKNOWN_MAILBOX,  # 550 5.1.1
    Route.RELAY_DENIED: replies.RELAY_DENIED,  # 550 5.7.1
    Route.UNSAFE: UNSAFE_MAILBOX,  # 550 5.1.3
    Route.LOOP: ALIAS_LOOP,  # 550 5.4.6
}

_AnsweredEvent = (
    Hello
    | MailFrom
    | RcptTo
    | DataStart
    | ChunkEnd
    | DataEnd
    | Reset
    | Quit
    | Respond
    | AuthChallenge
    | AuthRequest
)


class Listener(enum.Enum):
    """The kinds of port a connection can arrive on (``[server]`` listen, submission,
    submissions)."""

    MX = "listen"  # port 25: STARTTLS offered when [tls] is set; AUTH offered, never required
    SUBMISSION = "submission"  # port 587: STARTTLS before AUTH, AUTH before MAIL (RFC 6409)
    SUBMISSIONS = "submissions"  # port 465: TLS from the first byte, AUTH before MAIL (RFC 8314)


#: What may stand in the Received header's TLS comment (OpenSSL's names are all like this).
_TLS_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.+/-]")


def _first_line(reply: Reply) -> str:
    return reply.lines[0]


def _client_ip(host: str) -> str:
    """An IPv4-mapped IPv6 peer (``::ffff:192.0.2.1``) is the IPv4 client it stands for."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return host


class _Hangup(Exception):
    """The session is over: the connection is to be closed without another word."""


@attrs.define(eq=False)
class Receiver:
    """What all sessions of one server share: the config, the spool, the domains tree, the
    connection counts and the shutdown flag.

    *on_queued(queue_id)* is called after every successful commit; it is the delivery doorbell
    and must not block (e.g. a memory channel's ``send_nowait``, ignoring ``WouldBlock``).
    """

    config: Config
    spool: Spool
    on_queued: Callable[[str], None] = attrs.field(default=lambda queue_id: None)
    #: The server certificate; None without [tls] (then no STARTTLS, and no submission).
    tls: ServerTLS | None = None
    domains: DomainsTree = attrs.field(init=False)
    settings: ServerSettings = attrs.field(init=False)  # the MX listener's
    users: auth.UsersFile = attrs.field(init=False)
    failures: auth.FailureTracker = attrs.field(init=False)  # failed AUTH attempts per IP
    _settings: dict[Listener, ServerSettings] = attrs.field(init=False)
    _auth_limiter: trio.CapacityLimiter = attrs.field(init=False)
    _sessions: set[_Session] = attrs.field(init=False, factory=set)
    _per_ip: dict[str, int] = attrs.field(init=False, factory=dict)
    _draining: bool = attrs.field(init=False, default=False)
    _all_closed: trio.Event = attrs.field(init=False, factory=trio.Event)
    _free_bytes: int = attrs.field(init=False, default=0)
    _free_checked: float = attrs.field(init=False, default=float("-inf"))

    def __attrs_post_init__(self) -> None:
        self._configure(offer_tls=self.tls is not None)
        self.failures = auth.FailureTracker(
            self.config.auth.max_failures, self.config.auth.failure_window
        )
        self._auth_limiter = trio.CapacityLimiter(AUTH_THREADS)

    def reconfigure(self, config: Config, tls: ServerTLS | None) -> None:
        """A reload (SIGHUP): sessions that start from now on get *config* and *tls*.  Open
        sessions keep the protocol settings they started with (greeting name, size limit,
        extensions) and their TLS context; what they look up per command (routing, users,
        timeouts, relay permission) comes from the new config.  Connection counts, the shutdown
        state and the AUTH failures seen so far carry over (the failures only while ``[auth]
        max_failures`` and ``failure_window`` stay the same)."""
        old = self.config.auth
        self.config = config
        if tls is not None:
            self.tls = tls  # without [tls] the old one stays, for sessions offered STARTTLS
        self._configure(offer_tls=tls is not None)
        if (config.auth.max_failures, config.auth.failure_window) != (
            old.max_failures,
            old.failure_window,
        ):
            self.failures = auth.FailureTracker(
                config.auth.max_failures, config.auth.failure_window
            )

    def _configure(self, *, offer_tls: bool) -> None:
        # The same construction as the delivery's, so that RCPT accepts exactly what delivery
        # can route.
        self.domains = DomainsTree.from_config(self.config)
        limits = self.config.limits
        tls = offer_tls
        mechanisms = AUTH_MECHANISMS if tls else ()
        self.settings = ServerSettings(
            hostname=self.config.server.hostname,
            max_message_size=limits.max_message_size,
            max_recipients=limits.max_recipients,
            bare_newline=limits.bare_newline,
            starttls=tls,
            auth_mechanisms=mechanisms,  # offered only once the connection is TLS
        )
        self._settings = {
            Listener.MX: self.settings,
            Listener.SUBMISSION: attrs.evolve(self.settings, require_auth=True),
            Listener.SUBMISSIONS: attrs.evolve(
                self.settings, starttls=False, tls=True, require_auth=True
            ),
        }
        self.users = auth.UsersFile(self.config.auth.users_file)

    @property
    def connections(self) -> int:
        """How many sessions are open (refused connections never count)."""
        return len(self._sessions)

    @property
    def draining(self) -> bool:
        return self._draining

    async def handle_connection(
        self, stream: trio.abc.Stream, peer: tuple[str, int], listener: Listener = Listener.MX
    ) -> None:
        """Serve one SMTP client on *stream* until it quits, times out or is shut down; *peer*
        is its (host, port), *listener* the kind of port it came to (a TLS one needs
        :attr:`tls`).  Closes *stream*.  Raises nothing but cancellation: a bug in one session
        is logged (``internal-error``) and ends that session only."""
        ip = _client_ip(peer[0])
        port = peer[1]
        limits = self.config.limits
        hostname = self.settings.hostname
        session: _Session | None = None
        try:
            if listener is Listener.MX:
                maillog.event("connect", ip=ip, port=port)
            else:
                maillog.event("connect", ip=ip, port=port, listener=listener.value)
            if listener is not Listener.MX and self.tls is None:
                raise RuntimeError(f"a {listener.value} connection without [tls]")
            refusal: Reply | None = None
            if self._draining:
                refusal = replies.shutting_down(hostname)
            elif (
                len(self._sessions) >= limits.max_connections
                or self._per_ip.get(ip, 0) >= limits.max_connections_per_ip
            ):
                refusal = replies.too_many_connections(hostname)
                maillog.event(
                    "reject", ip=ip, verb="CONNECT", code=421, reason=_first_line(refusal)
                )
            if refusal is not None:
                # On the implicit-TLS port a reply would need a handshake first: a refused
                # client is not worth the CPU, so it is only disconnected.
                if listener is not Listener.SUBMISSIONS:
                    await _refuse(stream, refusal, limits.command_timeout)
                return
            settings = self._settings[listener]
            session = _Session(self, stream, ip, ServerConnection(settings), listener)
            self._sessions.add(session)
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            try:
                await session.run()
            finally:
                self._sessions.discard(session)
                left = self._per_ip[ip] - 1
                if left:
                    self._per_ip[ip] = left
                else:
                    del self._per_ip[ip]
                if self._draining and not self._sessions:
                    self._all_closed.set()
                maillog.event("disconnect", ip=ip, port=port, queued=session.queued)
        except Exception:
            maillog.logger.exception("internal-error ip=%s port=%s", ip, port)
        finally:
            with trio.CancelScope(shield=True):
                if session is not None and session.stream is not stream:
                    await session.close_tls()
                await trio.aclose_forcefully(stream)

    def drain(self) -> None:
        """Begin the shutdown: idle sessions get 421 4.3.2 now, busy ones when their transaction
        ends, new connections at once.  Idempotent."""
        self._draining = True
        for session in list(self._sessions):
            session.interrupt_if_idle()
        if not self._sessions:
            self._all_closed.set()

    def force_close(self) -> None:
        """After :meth:`drain` and the grace period: cut every session still running; each
        says 421 4.3.2 (bounded by ``GOODBYE_TIMEOUT``) and ends."""
        for session in list(self._sessions):
            session.force_close()

    async def wait_closed(self) -> None:
        """After :meth:`drain`: block until every session has ended."""
        if not self._draining:
            raise RuntimeError("wait_closed() before drain()")
        await self._all_closed.wait()

    async def free_bytes(self) -> int:
        """Free space in the spool, from a statvfs (in a worker thread) at most
        ``FREE_SPACE_TTL`` seconds old.  Raises OSError."""
        now = trio.current_time()
        if now - self._free_checked >= FREE_SPACE_TTL:
            self._free_bytes = await trio.to_thread.run_sync(self.spool.free_bytes)
            self._free_checked = now
        return self._free_bytes


async def _refuse(stream: trio.abc.Stream, reply: Reply, timeout: float) -> None:
    """Send a closing reply to a connection that gets no session."""
    with (
        trio.move_on_after(timeout),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(reply.to_bytes())


@attrs.define(eq=False)
class _Session:
    """One connection: the protocol state plus the transaction being received."""

    receiver: Receiver
    stream: trio.abc.Stream  # the TCP stream, or the SSLStream over it once TLS is up
    ip: str
    conn: ServerConnection
    listener: Listener = Listener.MX
    queued: int = 0  # messages committed in this session
    _tls: tuple[str, str] | None = None  # (version, cipher) once TLS is up
    _handshaking: bool = False  # inside a TLS handshake: no plain-text 421 may be written
    _user: str | None = None  # the authenticated user (canonical address)
    _out: list[bytes] = attrs.field(factory=list)  # replies not yet written
    _read_scope: trio.CancelScope | None = None  # set while blocked on a read
    _drain_interrupted: bool = False
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)  # the whole session
    _forced: bool = False  # force_close() was called
    _writing: bool = False  # inside send_all (a cut there leaves a partial reply behind)
    # The open transaction, as far as the spool needs it.
    _reverse_path: str = ""
    _body: str | None = None
    _smtputf8: bool = False
    _recipients: list[str] = attrs.field(factory=list)
    _message: IncomingMessage | None = None
    _spool_failed: bool = False  # the message could not be written: its end gets 451
    _data_verb: str = "BDAT"  # for the log: "DATA" once a DataStart was seen
    _data_deadline: float | None = None
    _relay: bool = False  # the transaction has a remote recipient (allowed by _may_relay)

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        conn = self.conn
        receiver = self.receiver
        command_timeout = receiver.config.limits.command_timeout
        with self._scope:
            if self.listener is Listener.SUBMISSIONS and not await self._start_tls():
                return
            self._out.append(conn.send(conn.greeting()))
            command_deadline = trio.current_time() + command_timeout
            await self._serve(command_deadline)
        if self._forced:
            await self._say_goodbye()

    async def _start_tls(self) -> bool:
        """The server side of a TLS handshake on :attr:`stream`, within its own deadline.  On
        success the stream becomes the :class:`trio.SSLStream` and the version and cipher are
        logged; on failure (logged, no traceback) the caller ends the session."""
        tls = self.receiver.tls
        assert tls is not None
        context = await tls.current()
        stream = trio.SSLStream(self.stream, context, server_side=True)
        timeout = min(HANDSHAKE_TIMEOUT, self.receiver.config.limits.command_timeout)
        self._handshaking = True
        with trio.move_on_after(timeout):
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                # The client hung up, or spoke no (acceptable) TLS: say why, briefly.
                cause = exc.__cause__
                reason = getattr(cause, "reason", None) or str(cause or exc) or "connection lost"
                maillog.event("tls-failed", ip=self.ip, reason=reason)
                return False
            self._handshaking = False
            self.stream = stream
            self._tls = describe(stream)
            maillog.event("tls", ip=self.ip, version=self._tls[0], cipher=self._tls[1])
            return True
        maillog.event("timeout", ip=self.ip, stage="tls")
        return False

    async def close_tls(self) -> None:
        """Say goodbye on the TLS layer (close_notify), bounded; :meth:`Receiver.handle_connection`
        closes the TCP stream after it.  Never raises."""
        if self._handshaking:
            return
        with (
            trio.CancelScope(shield=True, deadline=trio.current_time() + GOODBYE_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.stream.aclose()

    async def _serve(self, command_deadline: float) -> None:
        conn = self.conn
        receiver = self.receiver
        command_timeout = receiver.config.limits.command_timeout
        try:
            while True:
                if receiver.draining and not conn.in_transaction:
                    await self._close_with(replies.shutting_down(receiver.settings.hostname))
                event = conn.next_event()
                if isinstance(event, Sentinel):
                    if event is not Sentinel.NEED_DATA:  # pragma: no cover - always answered
                        raise RuntimeError("protocol paused with no reply pending")
                    await self._flush()
                    conn.receive_data(await self._receive(command_deadline))
                    continue
                if isinstance(event, DataChunk):
                    await self._data(event.data)
                    continue
                if isinstance(event, ConnectionClosed):
                    await self._flush()  # a half-closed peer may still read its replies
                    return
                if isinstance(event, StartTLS):
                    await self._starttls(event)
                    command_deadline = trio.current_time() + command_timeout
                    continue
                reply = await self._answer(event)
                self._out.append(conn.send(reply))
                if reply.close:
                    await self._flush()
                    return
                command_deadline = trio.current_time() + command_timeout
        except _Hangup:
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away
        finally:
            if self._message is not None:
                message, self._message = self._message, None
                # Shielded: this runs when the session is cancelled too.  discard() is one
                # unlink at most, and never raises OSError.
                with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                    await trio.to_thread.run_sync(message.discard)

    def force_close(self) -> None:
        """Shutdown, grace period over: stop whatever the session does, discard its open
        message, and tell the client 421 4.3.2 (it will retry what was not acknowledged)."""
        self._forced = True
        self._scope.cancel()

    async def _say_goodbye(self) -> None:
        """The 421 after :meth:`force_close`, behind any reply already due (a 250 for a message
        committed just before the cut must still reach the client).  Skipped when a write was
        cut in the middle, or a TLS handshake: more bytes would only garble the stream."""
        if self._writing or self._handshaking:
            return
        self._out.append(self.conn.send(replies.shutting_down(self.receiver.settings.hostname)))
        data = b"".join(self._out)
        self._out.clear()
        with (
            trio.CancelScope(shield=True, deadline=trio.current_time() + GOODBYE_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.stream.send_all(data)

    def interrupt_if_idle(self) -> None:
        """Shutdown: cut short a read that waits for a command outside any transaction."""
        if self._read_scope is not None and not self.conn.in_transaction:
            self._drain_interrupted = True
            self._read_scope.cancel()

    async def _flush(self) -> None:
        """Write the queued replies in one send; a client that does not take them within the
        command timeout is dropped."""
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        with trio.move_on_after(self.receiver.config.limits.command_timeout):
            self._writing = True
            await self.stream.send_all(data)
            self._writing = False
            return
        maillog.event("timeout", ip=self.ip, stage="write")
        raise _Hangup

    async def _receive(self, command_deadline: float) -> bytes:
        """The next bytes from the client (b"" at EOF) within the deadline that applies.  On
        timeout or shutdown sends the 421 and raises _Hangup."""
        receiver = self.receiver
        if self.conn.receiving_data:
            deadline = self._start_data_clock()
        elif self._data_deadline is not None:
            deadline = min(command_deadline, self._data_deadline)  # between BDAT chunks
        else:
            deadline = command_deadline
        # Checked again here, after the last await before the read: drain() may have run.
        if receiver.draining and not self.conn.in_transaction:
            await self._close_with(replies.shutting_down(receiver.settings.hostname))
        with trio.CancelScope(deadline=deadline) as scope:
            self._read_scope = scope
            try:
                # trio types this bytes | bytearray; sockets give bytes, which bytes()
                # returns as it is (no copy).
                return bytes(await self.stream.receive_some(RECEIVE_SIZE))
            finally:
                self._read_scope = None
        if self._drain_interrupted:
            await self._close_with(replies.shutting_down(receiver.settings.hostname))
        stage = "data" if self._data_deadline is not None else "command"
        maillog.event("timeout", ip=self.ip, stage=stage)
        await self._close_with(replies.timeout(receiver.settings.hostname))

    def _start_data_clock(self) -> float:
        """The message's data deadline, set by whatever first shows that data is flowing: the
        354, the first BDAT chunk's bytes or end, or a read inside chunk octets."""
        if self._data_deadline is None:
            limits = self.receiver.config.limits
            self._data_deadline = trio.current_time() + limits.data_timeout
        return self._data_deadline

    async def _close_with(self, reply: Reply) -> NoReturn:
        """Send the closing *reply* after whatever is queued, then end the session (raises
        _Hangup).  Only called with no event waiting for its reply."""
        self._out.append(self.conn.send(reply))
        await self._flush()
        raise _Hangup

    # --- events -------------------------------------------------------------------------------

    async def _starttls(self, event: StartTLS) -> None:
        """RFC 3207: write the 220 (with any replies still queued), then the handshake; on
        failure the session ends without another word (raises _Hangup)."""
        conn = self.conn
        # Sending the 220 makes the protocol discard every byte that followed STARTTLS.
        self._out.append(conn.send(event.reply))
        if event.reply.code != 220:  # pragma: no cover - the protocol proposes only 220
            return
        await self._flush()
        if not await self._start_tls():
            raise _Hangup
        conn.tls_started()

    async def _answer(self, event: _AnsweredEvent) -> Reply:
        """The reply to one event: the protocol's proposal, or a rejection of our own."""
        reply = event.reply
        verb: str
        if isinstance(event, RcptTo):
            verb = "RCPT"
            if reply.code < 400:
                reply = await self._rcpt(event.forward_path, reply)
        elif isinstance(event, MailFrom):
            verb = "MAIL"
            await self._abandon()  # MAIL after a failed BDAT transaction
            self._end_transaction()
            if reply.code < 400:
                reply = await self._mail(event, reply)
        elif isinstance(event, DataStart):
            verb = self._data_verb = "DATA"
            if reply.code == 354:
                if self._open_message():
                    self._start_data_clock()
                else:
                    reply = replies.LOCAL_ERROR
        elif isinstance(event, ChunkEnd):
            verb = "BDAT"
            self._start_data_clock()
            if self._spool_failed:
                # Tell the client now rather than after the rest of its chunks; a refused
                # chunk ends the transaction (RFC 3030 section 2).
                reply = replies.LOCAL_ERROR
                self._end_transaction()
        elif isinstance(event, DataEnd):
            verb = self._data_verb
            if event.accepted:
                reply = await self._commit(event.size)
            else:
                await self._abandon()
            self._end_transaction()
        elif isinstance(event, Respond):
            verb = event.verb
        elif isinstance(event, AuthChallenge):
            verb = "AUTH"
            if self.receiver.failures.locked(self.ip, trio.current_time()):
                reply = replies.auth_locked_out(self.receiver.settings.hostname)
        elif isinstance(event, AuthRequest):
            verb = "AUTH"
            reply = await self._authenticate(event)
        elif isinstance(event, Hello):
            verb = "EHLO" if event.extended else "HELO"
            await self._abandon()
            self._end_transaction()
        elif isinstance(event, Reset):
            verb = "RSET"
            await self._abandon()
            self._end_transaction()
        else:
            verb = "QUIT"
            await self._abandon()
        if reply.code >= 400:
            maillog.event(
                "reject", ip=self.ip, verb=verb, code=reply.code, reason=_first_line(reply)
            )
        return reply

    async def _mail(self, event: MailFrom, reply: Reply) -> Reply:
        limits = self.receiver.config.limits
        try:
            free = await self.receiver.free_bytes()
        except OSError as exc:
            maillog.error("spool-error", ip=self.ip, op="statvfs", error=exc)
            return replies.LOCAL_ERROR
        if free < FREE_SPACE_FACTOR * limits.max_message_size:
            return replies.INSUFFICIENT_STORAGE
        if self._user is not None and not self.receiver.config.auth.allow_any_sender:
            try:
                allowed = await trio.to_thread.run_sync(
                    auth.sender_allowed, self._user, event.reverse_path, self.receiver.domains
                )
            except OSError as exc:
                maillog.error("routing-error", ip=self.ip, error=exc)
                return replies.LOCAL_ERROR
            if not allowed:
                return SENDER_NOT_OWNED
        self._reverse_path = "" if event.reverse_path is None else str(event.reverse_path)
        self._body = event.body
        self._smtputf8 = event.smtputf8
        return reply

    async def _rcpt(self, address: Address, reply: Reply) -> Reply:
        try:
            resolution = await trio.to_thread.run_sync(self.receiver.domains.resolve, address)
        except OSError as exc:
            # The domains tree cannot be read (e.g. a permission problem): try again later.
            maillog.error("routing-error", ip=self.ip, error=exc)
            return replies.LOCAL_ERROR
        if resolution.refusal is not None:
            if resolution.refusal is not Route.RELAY_DENIED or not self._may_relay():
                return RCPT_REFUSALS[resolution.refusal]
            self._relay = True  # a remote recipient this client may send to
        # The envelope keeps the recipient as sent: delivery resolves it again when it runs.
        self._recipients.append(str(address))
        return reply

    def _may_relay(self) -> bool:
        """Whether this client may send to domains we do not serve: only from a trusted network
        (``[relay] trusted_networks``, empty by default) or after AUTH.  Never an open relay."""
        return self._user is not None or self.receiver.config.relay.trusts(self.ip)

    async def _authenticate(self, event: AuthRequest) -> Reply:
        """Check the credentials of a complete SASL exchange: 235, 535 5.7.8, 454 4.7.0 (the
        users file cannot be read) or 421 4.7.0 (this IP is locked out; nothing is checked)."""
        receiver = self.receiver
        failures = receiver.failures
        if failures.locked(self.ip, trio.current_time()):
            return replies.auth_locked_out(receiver.settings.hostname)
        try:
            async with receiver._auth_limiter:
                user = await trio.to_thread.run_sync(
                    receiver.users.authenticate, event.username, event.password
                )
        except OSError as exc:
            maillog.error("auth-error", ip=self.ip, file=receiver.users.path, error=exc.strerror)
            return replies.AUTH_TEMPORARY_FAILURE
        if user is None:
            now = trio.current_time()
            failures.record_failure(self.ip, now)
            # Neither the password nor the username: users do type passwords into the
            # username field.
            maillog.event(
                "auth-failed",
                ip=self.ip,
                mechanism=event.mechanism,
                failures=failures.failures(self.ip, now),
            )
            return replies.AUTH_FAILED
        self._user = user
        maillog.event("auth", ip=self.ip, mechanism=event.mechanism, user=user)
        return event.reply

    def _open_message(self) -> bool:
        """Start the spool file in memory: pre-header and Received header.  False (logged) when
        the envelope cannot be encoded; the message then gets 451."""
        receiver = self.receiver
        self._spool_failed = False
        queue_id = new_queue_id()
        maillog.bind(id=queue_id)  # on every line of this transaction from now on
        envelope = Envelope(
            queue_id=queue_id,
            arrival=time.time(),
            client=self.ip,
            helo=self.conn.hello_name or "",
            reverse_path=self._reverse_path,
            forward_paths=tuple(self._recipients),
            body=self._body,
            smtputf8=self._smtputf8,
            auth=self._user,
            relay=self._relay,
        )
        # RFC 3848 / RFC 6531 3.7.3: the "with" keyword of the Received header (ESMTPSA ...).
        protocol = self.conn.received_with(smtputf8=self._smtputf8)
        try:
            received = received_header(
                envelope, hostname=receiver.settings.hostname, protocol=protocol
            )
            if self._tls is not None:
                received = _with_tls_comment(received, *self._tls)
            header = envelope.encode() + received
        except EnvelopeError as exc:
            # The protocol only lets through what an envelope can hold, so this is a bug:
            # refuse the message, not the whole session.
            maillog.error("envelope-error", ip=self.ip, id=queue_id, error=exc)
            self._spool_failed = True
            return False
        self._message = receiver.spool.open_message(queue_id, header)
        return True

    async def _data(self, data: bytes) -> None:
        message = self._message
        if message is None:
            if self._spool_failed:
                return  # the rest of the message is read and dropped
            # BDAT has no DataStart: its first chunk opens the message.
            self._start_data_clock()
            if not self._open_message():
                return
            message = self._message
            assert message is not None
        if message.feed(data):
            try:
                await trio.to_thread.run_sync(message.flush)
            except OSError as exc:
                # flush() cleaned up after itself.
                maillog.error("spool-error", ip=self.ip, id=message.queue_id, op="write", error=exc)
                self._message = None
                self._spool_failed = True

    async def _commit(self, size: int) -> Reply:
        if self._spool_failed:
            return replies.LOCAL_ERROR
        if self._message is None and not self._open_message():  # "BDAT 0 LAST" alone
            return replies.LOCAL_ERROR
        message = self._message
        assert message is not None
        # A pipelining client may be waiting for earlier replies: give them before the disk.
        await self._flush()
        try:
            await trio.to_thread.run_sync(message.commit)
        except OSError as exc:
            # commit() cleaned up after itself: nothing is in incoming/ or received/.
            self._message = None
            maillog.error("spool-error", ip=self.ip, id=message.queue_id, op="commit", error=exc)
            return replies.LOCAL_ERROR
        self._message = None
        self.queued += 1
        maillog.event(
            "queued",
            id=message.queue_id,
            size=size,
            ip=self.ip,
            **{"from": f"<{self._reverse_path}>"},
            nrcpt=len(self._recipients),
        )
        self.receiver.on_queued(message.queue_id)
        return replies.queued(message.queue_id)

    async def _abandon(self) -> None:
        """Drop the open message, if any (its incoming/ file is removed)."""
        message, self._message = self._message, None
        if message is not None:
            await trio.to_thread.run_sync(message.discard)

    def _end_transaction(self) -> None:
        maillog.unbind("id")
        self._reverse_path = ""
        self._body = None
        self._smtputf8 = False
        self._recipients = []
        self._relay = False
        self._spool_failed = False
        self._data_deadline = None
        self._data_verb = "BDAT"


def _with_tls_comment(received: bytes, version: str, cipher: str) -> bytes:
    """*received* (a folded Received header) with ``(using TLSv1.3 with cipher ...)`` as its
    second line, where Postfix and others put it (RFC 3848 section 1 leaves the detail to a
    comment)."""
    version = _TLS_NAME_UNSAFE.sub("_", version)
    cipher = _TLS_NAME_UNSAFE.sub("_", cipher)
    first, sep, rest = received.partition(b"\r\n")
    comment = f"(using {version} with cipher {cipher})".encode("ascii")
    return first + sep + b"\t" + comment + b"\r\n" + rest
