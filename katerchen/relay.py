"""The relay task: it takes every message delivery put into ``relay/`` to the next server -- the
route the administrator configured, the smarthost, or the recipient domain's MX -- and keeps a
per-recipient state beside it until every recipient is sent or given up.

Theory of operation.  The directory is the truth.  ``relay/<id>`` is the message (the spool
format of ``received/``, with only the remote recipients), ``relay/<id>.state`` what has happened
to each recipient so far (:class:`RelayState`; no state file = nothing tried yet).
:func:`run_relay` lists ``relay/`` at start, on every ring of its doorbell (delivery rings it with
the id of each copy it writes; ``None`` is SIGUSR1: everything pending is tried at once), every
``[delivery] scan_interval`` seconds, and when a retry is due.

Each pending recipient whose next attempt is due is routed (:func:`choose_route`): the
``[relay.routes]`` entry of its domain, else the smarthost, else the domain's MX hosts.  The due
recipients of one message that share a route become one *job*: one SMTP transaction.  Jobs queue
per *destination* (:attr:`Route.destination`), and each destination has up to
``max_connections_per_destination`` workers, all of them together at most ``max_connections``;
a worker connects once and sends job after job over its connection (RSET between them) until
the destination's queue is empty, then says QUIT.  A recipient is in at most one job at a time.

After every job the recipients' results go into the state, and the state file is rewritten
(temporary file, fsync, rename, fsync of ``relay/``) before anything else happens: a crash repeats
at most the jobs that were in flight.  2xx: sent.  5xx: failed.  4xx and everything that went
wrong on the way (no DNS answer, no connection, a timeout, a dropped connection): deferred,
tried again after ``retry_initial`` seconds, then twice as long each time up to ``retry_max``
(:func:`retry_delay`), until ``max_age`` seconds after the message arrived: then it is failed
too (RFC 3463 4.4.7).  Once a message is still pending ``delay_warning`` seconds after it arrived,
its sender gets one "delayed" report.  When every recipient is sent or failed, the sender gets one
bounce (RFC 3464, :func:`katerchen.delivery.queue_bounce`) for all that failed -- never for the
null reverse-path -- and the message and its state leave ``relay/``.  Reports are written into
``received/`` under ids derived from the message (``<id>r``, ``<id>w``), so writing one again
after a crash finds the first.

Time.  Scheduling runs on trio's clock (``trio.current_time()``, so tests can use MockClock);
what is stored (next attempt, last attempt) and the ages are wall-clock time, from the
injectable *wall_clock*.

Logs, one line per recipient per attempt: ``relay id= to=<> via=host[ip]:port tls=yes|no
status=sent|deferred|bounced reply="..."``; and ``relay-dsn``, ``relay-done``,
``relay-undecodable``, ``relay-state-error``, ``relay-tls-fallback``.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import heapq
import ipaddress
import json
import math
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import trio

from katerchen import dsn, maillog
from katerchen.address import AddressError, parse_forward_path
from katerchen.config import Config, RelayConfig
from katerchen.delivery import bounce_id, queue_bounce
from katerchen.dns import (
    DnsError,
    MxHost,
    PermanentDnsError,
    Resolver,
    TemporaryDnsError,
    make_resolver,
    resolve_addresses,
    resolve_mx,
)
from katerchen.downgrade import is_8bit, to_7bit
from katerchen.envelope import Envelope, EnvelopeError
from katerchen.protocol import (
    NEED_DATA,
    PAUSED,
    ClientConnection,
    ClientEvent,
    LocalProtocolError,
    Ready,
    Refused,
    Reply,
    Sentinel,
    TlsReady,
    Transaction,
    TransactionResult,
)
from katerchen.spool import Spool, fsync_directory, is_queue_id

__all__ = [
    "DELAY_SUFFIX",
    "EXPIRED_STATUS",
    "FAILURE_SUFFIX",
    "MAX_ADDRESSES",
    "MAX_RECIPIENTS_PER_TRANSACTION",
    "STATE_SUFFIX",
    "TMP_SUFFIX",
    "Outcome",
    "RecipientState",
    "RelayState",
    "Result",
    "Route",
    "StateError",
    "anchored_clock",
    "choose_route",
    "classify",
    "delay_warning_due",
    "diagnostic",
    "dsn_status",
    "expired",
    "load_state",
    "mx_hosts_before_self",
    "next_attempt",
    "recipient_domain",
    "reply_result",
    "reply_text",
    "retry_delay",
    "run_relay",
    "save_state",
    "state_path",
]

#: ``relay/<id>.state`` holds the per-recipient state of ``relay/<id>``.
STATE_SUFFIX: Final = ".state"
#: ``relay/<id>.state.tmp`` is a state being written; one found at start is a crash's leftover.
TMP_SUFFIX: Final = ".state.tmp"
#: Recipients in one SMTP transaction (RFC 5321 4.5.3.1.8 makes servers take at least 100;
#: Postfix sends 50).  More recipients for one destination make several jobs.
MAX_RECIPIENTS_PER_TRANSACTION: Final = 50
#: The suffixes of the report ids (:func:`katerchen.delivery.bounce_id`).
FAILURE_SUFFIX: Final = "r"
DELAY_SUFFIX: Final = "w"

_STATE_FORMAT: Final = "katerchen-relay-state"
_STATE_VERSION: Final = 1
_STATUSES: Final = ("pending", "sent", "failed")
_MAX_PRE_HEADER: Final = 16 * 1024 * 1024
_READ_CHUNK: Final = 64 * 1024
#: Status of a recipient given up because it was retried for too long (RFC 3463: delivery time
#: expired).
EXPIRED_STATUS: Final = "4.4.7"
# An SMTP reply as stored: three digits, then a space, a hyphen or the end.
_REPLY_RE: Final = re.compile(r"[2-5][0-9][0-9](?:[ -]|\Z)")
_ENHANCED_RE: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")

Outcome = Literal["sent", "deferred", "failed"]


# --- pure policy ---------------------------------------------------------------------------------


def retry_delay(attempts: int, *, initial: float, maximum: float) -> float:
    """Seconds from the *attempts*-th failed attempt (1 for the first) to the next one:
    *initial*, then twice as long after each further attempt, never more than *maximum*."""
    if attempts <= 1:
        return min(initial, maximum)
    # 2**1100 would overflow a float; by then the maximum has long been reached.
    return min(initial * 2.0 ** min(attempts - 1, 1000), maximum)


def next_attempt(now: float, attempts: int, arrival: float, relay: RelayConfig) -> float:
    """When to try a recipient again after its *attempts*-th attempt failed at *now* (wall
    time): :func:`retry_delay` later, but no later than when the message expires, so that an
    expired recipient is reported on time."""
    delay = retry_delay(attempts, initial=relay.retry_initial, maximum=relay.retry_max)
    return max(now, min(now + delay, arrival + relay.max_age))


def expired(now: float, arrival: float, max_age: float) -> bool:
    """Whether a message that arrived at *arrival* is too old to be retried at *now*."""
    return now - arrival >= max_age


def classify(code: int) -> Outcome:
    """What a reply code means for the recipients it answers: 2xx sent, 5xx failed, and 4xx --
    or anything a server should not have said there -- deferred (try again later)."""
    if 200 <= code < 300:
        return "sent"
    if 500 <= code < 600:
        return "failed"
    return "deferred"


def dsn_status(code: int, enhanced: str | None) -> str:
    """The RFC 3463 status of a reply: its enhanced code when it has one of the reply's class,
    else the class with ".0.0" (a 4xx becomes 4.0.0)."""
    first = str(code)[:1]
    if enhanced is not None and _ENHANCED_RE.fullmatch(enhanced) and enhanced[0] == first:
        return enhanced
    return f"{first}.0.0" if first in "245" else "4.0.0"


def diagnostic(reply: str) -> str:
    """The RFC 3464 Diagnostic-Code for a stored reply: ``smtp; <reply>`` for what a server
    said, ``x-katerchen; <reason>`` for what went wrong here (those never start with a code)."""
    if _REPLY_RE.match(reply):
        return f"smtp; {reply}"
    return f"x-katerchen; {reply}"


@attrs.frozen
class Route:
    """Where the mail for one recipient goes.

    ``kind`` is ``"route"`` (a ``[relay.routes]`` entry), ``"smarthost"`` or ``"mx"``; for
    ``"mx"`` ``host`` is the recipient's domain (its MX hosts are looked up when a connection is
    opened), otherwise the server's name or address.  ``tls`` is ``"required"`` only for a
    smarthost so configured.  ``credentials`` (user, password) only for the smarthost.
    """

    kind: Literal["route", "smarthost", "mx"]
    host: str
    port: int
    tls: Literal["opportunistic", "required"] = "opportunistic"
    credentials: tuple[str, str] | None = attrs.field(default=None, repr=False)

    @property
    def destination(self) -> str:
        """The key connections are shared by: mail to one destination may go over one
        connection, and the per-destination connection cap counts these."""
        if self.kind == "mx":
            return f"mx:{self.host}"
        return f"{self.kind}:{self.host}:{self.port}"


def choose_route(domain: str, relay: RelayConfig) -> Route:
    """The route for a recipient in *domain*: its ``[relay.routes]`` entry (exact domain, any
    case, else ``"*"``), else the smarthost, else the domain's MX hosts on ``mx_port``."""
    target = relay.route(_ascii_domain(domain))
    if target is not None:
        return Route("route", target[0], target[1])
    if relay.smarthost is not None:
        credentials = None
        if relay.smarthost_user:
            credentials = (relay.smarthost_user, relay.smarthost_password)
        tls: Literal["opportunistic", "required"] = (
            "required" if relay.smarthost_tls == "required" else "opportunistic"
        )
        return Route(
            "smarthost", relay.smarthost[0], relay.smarthost[1], tls=tls, credentials=credentials
        )
    return Route("mx", domain.lower().rstrip("."), relay.mx_port)


def _ascii_domain(domain: str) -> str:
    """An internationalized domain as A-labels, as ``[relay.routes]`` keys are written."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def recipient_domain(recipient: str) -> str | None:
    """The domain of an envelope recipient as stored (``str(Address)``); None when it has none
    (the bare ``postmaster``) or does not parse."""
    try:
        address = parse_forward_path(f"<{recipient}>", utf8=True)
    except AddressError:
        return None
    return address.domain


# --- the per-recipient state ---------------------------------------------------------------------


class StateError(ValueError):
    """A state file that does not decode."""


RecipientStatusName = Literal["pending", "sent", "failed"]


@attrs.define
class RecipientState:
    """What has happened to one recipient of a message in ``relay/``.

    ``status``: ``pending`` (not yet, or to be retried), ``sent`` or ``failed`` (final).
    ``attempts`` counts the attempts made; ``next_attempt`` (wall time) is when a pending
    recipient is due again, None for "now".  ``reply`` is the last answer, as the server gave it
    (``"451 4.3.0 try later"``) or what went wrong here (``"connection refused"``);
    ``dsn_status`` its RFC 3463 code; ``remote_mta`` the host that gave it ("" when none did).
    """

    recipient: str
    status: RecipientStatusName = "pending"
    attempts: int = 0
    next_attempt: float | None = None
    last_attempt: float | None = None
    reply: str = ""
    dsn_status: str = ""
    remote_mta: str = ""

    @property
    def final(self) -> bool:
        return self.status != "pending"


@attrs.define
class RelayState:
    """The state of one message in ``relay/``: one :class:`RecipientState` per recipient, when
    the first attempt was made (wall time), and whether the delay warning went out."""

    queue_id: str
    recipients: list[RecipientState]
    first_attempt: float | None = None
    delay_warned: bool = False

    @classmethod
    def fresh(cls, envelope: Envelope) -> RelayState:
        """Every recipient of *envelope* pending, nothing tried (what no state file means)."""
        return cls(
            queue_id=envelope.queue_id,
            recipients=[RecipientState(r) for r in dict.fromkeys(envelope.forward_paths)],
        )

    def recipient(self, recipient: str) -> RecipientState:
        for state in self.recipients:
            if state.recipient == recipient:
                return state
        raise KeyError(recipient)

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == "pending"]

    @property
    def done(self) -> bool:
        """Every recipient is sent or failed."""
        return all(r.final for r in self.recipients)

    def merge(self, envelope: Envelope) -> RelayState:
        """This state made to fit *envelope*: the recipients of the envelope, in its order,
        with what this state knows about them (a recipient it does not know is fresh)."""
        known = {r.recipient: r for r in self.recipients}
        return attrs.evolve(
            self,
            queue_id=envelope.queue_id,
            recipients=[
                known.get(r, RecipientState(r)) for r in dict.fromkeys(envelope.forward_paths)
            ],
        )

    def encode(self) -> bytes:
        """The state file's content: UTF-8 JSON, one recipient per line (readable, diffable)."""
        head = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "id": self.queue_id,
            "first_attempt": self.first_attempt,
            "delay_warned": self.delay_warned,
        }
        lines = [json.dumps(head, ensure_ascii=False)[:-1] + ', "recipients": [']
        for index, r in enumerate(self.recipients):
            item = {
                "to": r.recipient,
                "status": r.status,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "last_attempt": r.last_attempt,
                "reply": r.reply,
                "dsn_status": r.dsn_status,
                "remote_mta": r.remote_mta,
            }
            comma = "," if index < len(self.recipients) - 1 else ""
            lines.append("  " + json.dumps(item, ensure_ascii=False) + comma)
        lines.append("]}")
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> RelayState:
        """Read a state file's content.  Raises :class:`StateError` for anything but what
        :meth:`encode` writes (wrong format or version, a missing or mistyped field)."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError(f"relay state: not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != _STATE_FORMAT:
            raise StateError("relay state: not a katerchen relay state")
        if raw.get("version") != _STATE_VERSION:
            raise StateError(f"relay state: unknown version {str(raw.get('version'))[:20]!r}")
        queue_id = _field(raw, "id", str)
        if not is_queue_id(queue_id):
            raise StateError("relay state: invalid id")
        recipients_raw = _field(raw, "recipients", list)
        recipients = [_recipient_state(item) for item in recipients_raw]
        if not recipients:
            raise StateError("relay state: no recipients")
        if len({r.recipient for r in recipients}) != len(recipients):
            raise StateError("relay state: a recipient twice")
        return cls(
            queue_id=queue_id,
            recipients=recipients,
            first_attempt=_time_field(raw, "first_attempt"),
            delay_warned=_field(raw, "delay_warned", bool),
        )


def _field(raw: dict[str, Any], name: str, kind: type[Any]) -> Any:
    value = raw.get(name)
    # bool is an int: "attempts": true is not a count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StateError(f"relay state: {name} missing or not a {kind.__name__}")
    return value


def _time_field(raw: dict[str, Any], name: str) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StateError(f"relay state: {name} not a time")
    return float(value)


def _recipient_state(item: object) -> RecipientState:
    if not isinstance(item, dict):
        raise StateError("relay state: a recipient is not an object")
    status = _field(item, "status", str)
    if status not in _STATUSES:
        raise StateError(f"relay state: unknown status {status[:20]!r}")
    attempts = _field(item, "attempts", int)
    if attempts < 0:
        raise StateError("relay state: negative attempts")
    return RecipientState(
        recipient=_field(item, "to", str),
        status=status,
        attempts=attempts,
        next_attempt=_time_field(item, "next_attempt"),
        last_attempt=_time_field(item, "last_attempt"),
        reply=_field(item, "reply", str),
        dsn_status=_field(item, "dsn_status", str),
        remote_mta=_field(item, "remote_mta", str),
    )


def state_path(relay_dir: Path, queue_id: str) -> Path:
    """``relay/<id>.state``."""
    return relay_dir / (queue_id + STATE_SUFFIX)


def save_state(relay_dir: Path, state: RelayState) -> None:
    """BLOCKING. Replace ``relay/<id>.state`` atomically and durably: write
    ``<id>.state.tmp``, fsync it, rename it over the state, fsync ``relay/``.  A crash leaves
    the old state or the new one, never a mix.  Raises OSError (the old state is then intact)."""
    _write_state(relay_dir, state.queue_id, state.encode())


def load_state(relay_dir: Path, envelope: Envelope) -> RelayState:
    """BLOCKING. The state of message *envelope* in *relay_dir*: its state file, made to fit the
    envelope's recipients (:meth:`RelayState.merge`), or a fresh state when there is none.

    Raises OSError when the file cannot be read, :class:`StateError` when it does not decode
    (the caller logs it and starts afresh rather than never sending the message).
    """
    try:
        data = state_path(relay_dir, envelope.queue_id).read_bytes()
    except FileNotFoundError:
        return RelayState.fresh(envelope)
    return RelayState.decode(data).merge(envelope)


def delay_warning_due(now: float, arrival: float, state: RelayState, relay: RelayConfig) -> bool:
    """Whether the message's sender is now owed its one delay warning: warnings are on, none
    was sent, some recipient is still pending and the message is ``delay_warning`` old."""
    return (
        relay.delay_warning > 0
        and not state.delay_warned
        and bool(state.pending)
        and now - arrival >= relay.delay_warning
    )


def anchored_clock() -> Callable[[], float]:
    """A wall clock that follows trio's clock: ``time.time()`` now, plus the trio time elapsed
    since.  Call it inside ``trio.run``; with MockClock, the relay's stored times and ages then
    advance with the mocked time.  Pass it as ``run_relay(..., wall_clock=anchored_clock())``."""
    wall, start = time.time(), trio.current_time()
    return lambda: wall + (trio.current_time() - start)


def mx_hosts_before_self(hosts: Sequence[MxHost], hostname: str) -> list[MxHost]:
    """The MX hosts to try when this server is *hostname*: RFC 5321 5.1 -- if we are one of a
    domain's MX hosts, only those more preferred than us may be tried (the others would send
    the mail back to us).  An empty result means the mail would loop."""
    own = [mx.preference for mx in hosts if mx.host.lower() == hostname.lower()]
    if not own:
        return list(hosts)
    return [mx for mx in hosts if mx.preference < min(own)]


# --- results -------------------------------------------------------------------------------------


@attrs.frozen
class Result:
    """What one attempt did for one recipient: ``outcome``, the ``reply`` as it will be stored
    and logged, its RFC 3463 ``status``, and the host that gave it (``remote_mta``)."""

    recipient: str
    outcome: Outcome
    reply: str
    status: str
    remote_mta: str = ""


def reply_text(reply: Reply) -> str:
    """A reply as stored and logged, one line: ``"550 5.1.1 No such user"`` (the lines of a
    multi-line reply joined by spaces)."""
    enhanced = f" {reply.enhanced}" if reply.enhanced else ""
    text = " ".join(line.strip() for line in reply.lines)
    return f"{reply.code}{enhanced} {text}".rstrip()


def reply_result(recipient: str, reply: Reply, remote_mta: str, *, local: bool = False) -> Result:
    """The :class:`Result` of a reply to one recipient.  A *local* reply (the client refused to
    send, e.g. the message is over the peer's SIZE) is stored as its text alone, so the report
    does not claim the peer said it."""
    text = " ".join(line.strip() for line in reply.lines) if local else reply_text(reply)
    return Result(
        recipient,
        classify(reply.code),
        text,
        dsn_status(reply.code, reply.enhanced),
        remote_mta,
    )


@attrs.frozen
class _Failure:
    """A connection that could not be opened: what it means for every recipient waiting."""

    outcome: Outcome
    reply: str
    status: str
    via: str = "none"
    remote_mta: str = ""

    def results(self, recipients: Iterable[str]) -> list[Result]:
        return [
            Result(r, self.outcome, self.reply, self.status, self.remote_mta) for r in recipients
        ]


# --- one SMTP session ----------------------------------------------------------------------------

#: How much one read asks for.
_RECEIVE_SIZE: Final = 65536
#: Writes are made in blocks of at most this, each within ``data_block_timeout``.
_WRITE_BLOCK: Final = 256 * 1024
#: At most this many addresses are tried for one connection (Postfix: smtp_mx_address_limit).
MAX_ADDRESSES: Final = 5
#: Bound on QUIT, and on closing a connection (best effort).
_QUIT_TIMEOUT: Final = 10.0


def _error_text(exc: BaseException) -> str:
    """A short reason for a network error, for the log and the state file."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # trio.open_tcp_stream: "all attempts to connect ... failed", the reason in a group.
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause) and not isinstance(cause, BaseExceptionGroup):
        text = f"{text}: {cause}"
    return text


@attrs.define(eq=False)
class _Session:
    """One open connection to one address of a destination, with its sans-IO client."""

    stream: trio.abc.Stream
    client: ClientConnection
    host: str
    ip: str
    port: int
    relay: RelayConfig

    @property
    def via(self) -> str:
        return _via(self.host, self.ip, self.port)

    @property
    def tls(self) -> bool:
        return self.client.tls

    @property
    def remote_mta(self) -> str:
        """The name of the peer for reports: the host name it was reached by, or -- when that
        is an address (a route to "127.0.0.1:2525") -- the name its greeting gives, if any."""
        if not _is_ip(self.host):
            return self.host
        greeting = self.client.greeting
        if greeting is not None:
            name = greeting.lines[0].split(" ", 1)[0]
            if _HOST_NAME_RE.fullmatch(name) and not _is_ip(name):
                return name.lower()
        return self.host

    def _timeout(self, waiting: str | None) -> float:
        relay = self.relay
        if waiting == "greeting":
            return relay.greeting_timeout
        if waiting == "DATA":
            return relay.data_start_timeout
        if waiting in ("END", "BDAT"):
            # BDAT chunks are answered after they are stored: the end-of-data wait applies.
            return relay.data_end_timeout
        return relay.command_timeout

    async def exchange(self) -> ClientEvent:
        """Write what the client has to say and read until the operation's event.  Network
        errors and timeouts abort the client, which then ends the operation by itself."""
        client = self.client
        while True:
            # next_event() first: reading a reply may produce the next command (EHLO after
            # the greeting, the content after 354).
            event = client.next_event()
            out = client.bytes_to_send()
            if out:
                await self._write(out)
            if event is not NEED_DATA:
                if event is PAUSED:  # pragma: no cover - every caller started an operation
                    raise RuntimeError("no operation in progress")
                assert not isinstance(event, Sentinel)
                return event
            if client.closed:
                continue  # the write failed: the client ends the operation by itself
            waiting = client.waiting_for
            try:
                with trio.fail_after(self._timeout(waiting)):
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
            except trio.TooSlowError:
                client.abort(f"Timed out waiting for the reply to {waiting}")
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                client.abort(f"Connection error: {_error_text(exc)}")
                continue
            client.receive_data(bytes(data))

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            for start in range(0, len(view), _WRITE_BLOCK):
                with trio.fail_after(self.relay.data_block_timeout):
                    await self.stream.send_all(view[start : start + _WRITE_BLOCK])
        except trio.TooSlowError:
            self.client.abort("Timed out writing to the peer")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.client.abort(f"Connection error: {_error_text(exc)}")

    async def handshake(self, context: ssl.SSLContext, server_hostname: str | None) -> str | None:
        """STARTTLS was accepted: wrap the stream in TLS.  None on success, else the reason."""
        tls_stream = trio.SSLStream(self.stream, context, server_hostname=server_hostname)
        try:
            with trio.fail_after(self.relay.connect_timeout):
                await tls_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return _error_text(exc)
        self.stream = tls_stream
        self.client.tls_started()
        return None

    async def close(self, *, polite: bool) -> None:
        """QUIT (when *polite* and the session is still open), then close; never raises."""
        with trio.move_on_after(min(_QUIT_TIMEOUT, self.relay.command_timeout)) as scope:
            scope.shield = True
            if polite and not self.client.closed:
                try:
                    self.client.quit()
                except LocalProtocolError:
                    pass
                else:
                    await self.exchange()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)


_HOST_NAME_RE: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _via(host: str, ip: str, port: int) -> str:
    return f"{host}[{ip}]:{port}"


# --- the relayer ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Message:
    """A message in ``relay/`` as the relayer holds it."""

    path: Path
    envelope: Envelope
    offset: int  # where the message (our Received header first) starts in the file
    state: RelayState
    busy: set[str] = attrs.field(factory=set)  # recipients in a job now
    # Recipients that were busy when SIGUSR1 came: due again as soon as their job ends.
    retry_now: set[str] = attrs.field(factory=set)
    lock: trio.Lock = attrs.field(factory=trio.Lock)  # one state write at a time
    due: float = math.inf  # trio time of the earliest timer set for it
    finishing: bool = False

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id


@attrs.frozen(eq=False)
class _Job:
    """Recipients of one message with one route: one SMTP transaction."""

    message: _Message
    route: Route
    recipients: tuple[str, ...]


@attrs.define(eq=False)
class _Destination:
    route: Route
    queue: deque[_Job] = attrs.field(factory=deque)
    workers: int = 0  # worker tasks for this destination
    active: int = 0  # ... of which hold a job (connecting or sending)


class _Silence(enum.Enum):
    TOKEN = enum.auto()


_SILENCE: Final = _Silence.TOKEN


@attrs.define(eq=False)
class _Relayer:
    """The relay task's state: messages, timers, destinations and their workers."""

    config: Config
    spool: Spool
    nursery: trio.Nursery
    wall: Callable[[], float]
    on_bounce: Callable[[str], None] | None
    opportunistic: ssl.SSLContext
    verified: ssl.SSLContext
    connections: trio.Semaphore
    messages: dict[str, _Message] = attrs.field(factory=dict)
    destinations: dict[str, _Destination] = attrs.field(factory=dict)
    _timers: list[tuple[float, str]] = attrs.field(factory=list)
    _undecodable: dict[str, tuple[int, int]] = attrs.field(factory=dict)
    _wait_scope: trio.CancelScope | None = None
    _resolver: Resolver | None = None

    @property
    def relay(self) -> RelayConfig:
        return self.config.relay

    @property
    def resolver(self) -> Resolver:
        """Made at the first lookup: routes and smarthosts given as addresses need no DNS, and
        a machine without a resolver configuration can still relay through them."""
        if self._resolver is None:
            try:
                self._resolver = make_resolver(self.config.dns.nameservers)
            except ValueError as exc:
                # Every lookup then fails temporarily (and is retried), each one logged.
                maillog.error("relay-error", op="dns-setup", error=str(exc))
                self._resolver = Resolver(configure=False)
        return self._resolver

    # --- the directory ---

    async def scan(self, *, start: bool = False) -> None:
        """List ``relay/``; take in new messages and schedule what is due.  At *start* also
        remove what a crash left: temporary state files, states whose message is gone."""
        try:
            ids = await trio.to_thread.run_sync(_list_relay, self.spool.relay, start)
        except OSError as exc:
            maillog.error("relay-error", op="scan", error=_error_text(exc))
            return
        present = set(ids)
        for queue_id in list(self._undecodable):
            if queue_id not in present:
                del self._undecodable[queue_id]
        for queue_id, message in list(self.messages.items()):
            # Removed by hand: forget it (a job in flight still finishes and writes its state).
            if queue_id not in present and not message.busy and not message.finishing:
                del self.messages[queue_id]
        for queue_id in ids:
            if queue_id not in self.messages:
                await self.take(queue_id)

    async def take(self, queue_id: str) -> None:
        """Load ``relay/<id>`` (when not known yet) and schedule its due recipients."""
        message = self.messages.get(queue_id)
        if message is None:
            try:
                loaded = await trio.to_thread.run_sync(_load, self.spool.relay, queue_id)
            except FileNotFoundError:
                return
            except OSError as exc:
                maillog.error("relay-error", id=queue_id, op="read", error=_error_text(exc))
                return
            if isinstance(loaded, _Undecodable):
                if self._undecodable.get(queue_id) != loaded.signature:
                    self._undecodable[queue_id] = loaded.signature
                    maillog.error(
                        "relay-undecodable", id=queue_id, reason=loaded.reason, action="left"
                    )
                return
            self._undecodable.pop(queue_id, None)
            if queue_id in self.messages:  # taken in meanwhile by another ring or scan
                return
            envelope, offset, state, state_error = loaded
            if state_error:
                maillog.error("relay-state-error", id=queue_id, error=state_error, action="reset")
            message = _Message(self.spool.relay / queue_id, envelope, offset, state)
            self.messages[queue_id] = message
        self.schedule(message)

    # --- scheduling ---

    def schedule(self, message: _Message, *, now_all: bool = False) -> None:
        """Start jobs for the recipients of *message* that are due (all pending ones with
        *now_all*), set a timer for the others; finish the message when nothing is left."""
        if message.finishing or self.messages.get(message.queue_id) is not message:
            return
        state = message.state
        if state.done:
            if not message.busy:
                message.finishing = True
                self.nursery.start_soon(self._finish, message)
            return
        wall_now, now = self.wall(), trio.current_time()
        due: dict[Route | None, list[str]] = {}
        next_due = math.inf
        for recipient in state.pending:
            name = recipient.recipient
            if name in message.busy:
                continue
            when = recipient.next_attempt
            if now_all or name in message.retry_now or when is None or when <= wall_now:
                message.retry_now.discard(name)
                domain = recipient_domain(name)
                route = choose_route(domain, self.relay) if domain is not None else None
                due.setdefault(route, []).append(name)
            else:
                next_due = min(next_due, now + (when - wall_now))
        if next_due < message.due:
            message.due = next_due
            heapq.heappush(self._timers, (next_due, message.queue_id))
            if self._wait_scope is not None:
                self._wait_scope.deadline = min(self._wait_scope.deadline, next_due)
        for route, names in due.items():
            message.busy.update(names)
            if route is None:
                # Nowhere to send it (no domain): a local, permanent failure.
                failure = _Failure("failed", "recipient has no domain to relay to", "5.1.3")
                self.nursery.start_soon(
                    self._record, message, failure.results(names), "none", False
                )
                continue
            for start in range(0, len(names), MAX_RECIPIENTS_PER_TRANSACTION):
                chunk = tuple(names[start : start + MAX_RECIPIENTS_PER_TRANSACTION])
                self._dispatch(_Job(message, route, chunk))

    def retry_all(self) -> None:
        """SIGUSR1: every pending recipient is due now."""
        self._timers.clear()
        for message in list(self.messages.values()):
            message.due = math.inf
            # A job in flight may be deferred a moment from now: that one is retried too.
            message.retry_now.update(message.busy)
            self.schedule(message, now_all=True)

    def _due_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            due, queue_id = heapq.heappop(timers)
            message = self.messages.get(queue_id)
            if message is not None and message.due == due:
                message.due = math.inf
                self.schedule(message)

    def _next_timer(self) -> float:
        timers = self._timers
        while timers:
            due, queue_id = timers[0]
            message = self.messages.get(queue_id)
            if message is not None and message.due == due:
                return due
            heapq.heappop(timers)  # superseded
        return math.inf

    # --- destinations and workers ---

    def _dispatch(self, job: _Job) -> None:
        key = job.route.destination
        destination = self.destinations.get(key)
        if destination is None:
            destination = self.destinations[key] = _Destination(job.route)
        destination.queue.append(job)
        waiting = destination.workers - destination.active  # workers about to take a job
        cap = self.relay.max_connections_per_destination
        if destination.workers < cap and len(destination.queue) > waiting:
            destination.workers += 1
            self.nursery.start_soon(self._worker, key, destination)

    async def _worker(self, key: str, destination: _Destination) -> None:
        """Send the destination's jobs over one connection (reconnecting when it breaks)."""
        session: _Session | None = None
        try:
            async with self.connections:
                while destination.queue:
                    job = destination.queue.popleft()
                    destination.active += 1
                    try:
                        session = await self._run_job(job, session)
                    finally:
                        destination.active -= 1
        finally:
            destination.workers -= 1
            idle = destination.workers == 0 and not destination.queue
            if idle and self.destinations.get(key) is destination:
                del self.destinations[key]
            if session is not None:
                # No QUIT when the relay is being cancelled (shutdown): it would only wait.
                cancelled = trio.current_effective_deadline() == -math.inf
                await session.close(polite=not cancelled)

    async def _run_job(self, job: _Job, session: _Session | None) -> _Session | None:
        """One job: connect if needed, send, record.  Returns the session to reuse (None when
        there is none).  Never raises but for cancellation."""
        try:
            if session is not None and session.client.closed:
                await session.close(polite=False)
                session = None
            if session is None:
                opened = await self._open(job)
                if isinstance(opened, _Failure):
                    # The same hosts would fail the same way now: the other jobs queued for
                    # this destination wait for their next attempt too.  Only those queued
                    # now: a job the records below queue (a retry already due, SIGUSR1) gets
                    # an attempt of its own.
                    destination = self.destinations.get(job.route.destination)
                    others = list(destination.queue) if destination is not None else []
                    if destination is not None:
                        destination.queue.clear()
                    await self._record(
                        job.message, opened.results(job.recipients), opened.via, False
                    )
                    for other in others:
                        results = opened.results(other.recipients)
                        await self._record(other.message, results, opened.via, False)
                    return None
                session = opened
            results = await self._send(job, session)
            await self._record(job.message, results, session.via, session.tls)
            return session
        except Exception:
            # A bug: the recipients stay pending and are retried later; the others go on.
            maillog.logger.exception("internal-error id=%s", job.message.queue_id)
            failure = _Failure("deferred", "internal error", "4.3.0")
            with contextlib.suppress(Exception):
                await self._record(job.message, failure.results(job.recipients), "none", False)
            job.message.busy.difference_update(job.recipients)  # even if that failed too
            if session is not None:
                await session.close(polite=False)
            return None

    # --- connecting ---

    async def _open(self, job: _Job) -> _Session | _Failure:
        """A session with the first host of the job's route that takes one."""
        route = job.route
        try:
            hosts = await self._hosts(route)
        except PermanentDnsError as exc:
            return _Failure("failed", str(exc), exc.status)
        except TemporaryDnsError as exc:
            return _Failure("deferred", str(exc), exc.status)
        last = _Failure("deferred", f"no address to connect to for {route.host}", "4.4.1")
        tried = 0
        for host in hosts:
            try:
                addresses = await resolve_addresses(host, resolver=self.resolver)
            except DnsError as exc:
                last = _Failure("deferred", str(exc), exc.status.replace("5.", "4.", 1))
                continue
            for ip in addresses:
                if tried >= MAX_ADDRESSES:
                    return last
                tried += 1
                result = await self._open_address(job, host, ip)
                if isinstance(result, _Session):
                    return result
                last = result
        return last

    async def _hosts(self, route: Route) -> list[str]:
        if route.kind != "mx":
            return [route.host]
        hosts = await resolve_mx(route.host, resolver=self.resolver)
        allowed = mx_hosts_before_self(hosts, self.config.server.hostname)
        if not allowed:
            raise PermanentDnsError(
                f"mail for {route.host} loops back to myself ({self.config.server.hostname})",
                status="5.4.6",
            )
        return [mx.host for mx in allowed]

    async def _open_address(
        self, job: _Job, host: str, ip: str, *, plaintext: bool = False
    ) -> _Session | _Failure:
        """Connect to *ip*, read the greeting, EHLO, STARTTLS and AUTH as the route wants."""
        route, relay = job.route, self.relay
        port = route.port
        via = _via(host, ip, port)
        try:
            with trio.fail_after(relay.connect_timeout):
                stream = await trio.open_tcp_stream(ip, port)
        except (OSError, trio.TooSlowError) as exc:
            return _Failure("deferred", f"connect to {via}: {_error_text(exc)}", "4.4.1", via)
        session = _Session(
            stream, ClientConnection(self.config.server.hostname), host, ip, port, relay
        )
        usable = False
        try:
            failure = await self._setup(job, session, plaintext=plaintext)
            if failure == "fallback":
                await session.close(polite=False)
                return await self._open_address(job, host, ip, plaintext=True)
            if failure is not None:
                return failure
            usable = True
            return session
        finally:
            if not usable:
                await session.close(polite=trio.current_effective_deadline() != -math.inf)

    async def _setup(
        self, job: _Job, session: _Session, *, plaintext: bool
    ) -> _Failure | Literal["fallback"] | None:
        route = job.route
        client = session.client
        via, host = session.via, session.host

        def refused(reply: Reply) -> _Failure:
            # Deferred whatever the code: a refusal before the transaction (a busy or
            # misconfigured host, AUTH trouble) says nothing about the recipients.
            status = dsn_status(reply.code, reply.enhanced)
            return _Failure("deferred", reply_text(reply), status, via, session.remote_mta)

        event = await session.exchange()
        if isinstance(event, Refused):
            return refused(event.reply)
        assert isinstance(event, Ready)
        if event.extensions.starttls and not plaintext:
            client.starttls()
            event = await session.exchange()
            if isinstance(event, TlsReady):
                context = self.verified if route.tls == "required" else self.opportunistic
                error = await session.handshake(context, host)
                if error is not None:
                    if route.tls == "opportunistic":
                        # RFC 7435: a failed handshake must not stop the mail; plaintext is
                        # what the peer would have got without STARTTLS.
                        maillog.event(
                            "relay-tls-fallback", id=job.message.queue_id, via=via, error=error
                        )
                        return "fallback"
                    return _Failure(
                        "deferred", f"TLS with {via} failed: {error}", "4.7.5", via, host
                    )
                event = await session.exchange()
            if isinstance(event, Refused):
                if event.command != "STARTTLS" or client.closed or route.tls == "required":
                    return refused(event.reply)
                # STARTTLS refused: go on in plaintext (opportunistic).
            else:
                assert isinstance(event, Ready)
        if route.tls == "required" and not client.tls:
            return _Failure(
                "deferred", f"TLS required, but {via} offers no STARTTLS", "4.7.4", via, host
            )
        if route.credentials is not None:
            if not client.tls:
                # Never send a password in the clear (RFC 4954 4; Postfix's noplaintext).
                return _Failure(
                    "deferred",
                    f"credentials are sent only over TLS, and {via} offers no TLS",
                    "4.7.4",
                    via,
                    host,
                )
            extensions = client.extensions
            if extensions is not None and extensions.auth:
                client.auth(*route.credentials)
                event = await session.exchange()
                if isinstance(event, Refused):
                    return refused(event.reply)
        if client.closed:
            reply = client.closing_reply
            return _Failure(
                "deferred",
                f"{via} closed the connection: {reply_text(reply) if reply else ''}",
                "4.4.2",
                via,
                host,
            )
        return None

    # --- sending ---

    async def _send(self, job: _Job, session: _Session) -> list[Result]:
        message = job.message
        envelope = message.envelope
        host = session.remote_mta
        try:
            body = await trio.to_thread.run_sync(_read_body, message.path, message.offset)
        except OSError as exc:
            failure = _Failure("deferred", f"cannot read the message: {_error_text(exc)}", "4.3.0")
            return failure.results(job.recipients)
        extensions = session.client.extensions
        assert extensions is not None
        binarymime = envelope.body == "BINARYMIME"
        needs_conversion = (
            not (extensions.binarymime and extensions.chunking)
            if binarymime
            else not extensions.eight_bit_mime and is_8bit(body)
        )
        if needs_conversion:
            # RFC 6152 / RFC 3030: the peer cannot take the message as it is: convert it to 7
            # bit if that can be done (else the client refuses it: 554 5.6.3, a bounce).
            converted = await trio.to_thread.run_sync(to_7bit, body)
            if converted is not None:
                body, binarymime = converted, False
        session.client.start_transaction(
            Transaction(
                envelope.reverse_path,
                job.recipients,
                body,
                smtputf8=envelope.smtputf8,
                binarymime=binarymime,
            )
        )
        event = await session.exchange()
        assert isinstance(event, TransactionResult)
        return [
            reply_result(recipient, reply, host, local=event.local)
            for recipient, reply in zip(job.recipients, event.results, strict=True)
        ]

    # --- recording ---

    async def _record(
        self, message: _Message, results: Sequence[Result], via: str, tls: bool
    ) -> None:
        """Put the results of one attempt into the message's state, write it, log, and go on:
        a delay warning when due, a timer for what is deferred, the end when all is final."""
        relay = self.relay
        state = message.state
        envelope = message.envelope
        now = self.wall()
        if state.first_attempt is None:
            state.first_attempt = now
        lines: list[dict[str, object]] = []
        for result in results:
            try:
                recipient = state.recipient(result.recipient)
            except KeyError:  # pragma: no cover - jobs are made from the state
                continue
            recipient.attempts += 1
            recipient.last_attempt = now
            recipient.reply = result.reply
            recipient.dsn_status = result.status
            recipient.remote_mta = result.remote_mta
            recipient.next_attempt = None
            extra: dict[str, object] = {"attempts": recipient.attempts}
            if result.outcome == "sent":
                recipient.status = "sent"
                status = "sent"
            elif result.outcome == "failed":
                recipient.status = "failed"
                status = "bounced"
            elif expired(now, envelope.arrival, relay.max_age):
                recipient.status = "failed"
                recipient.dsn_status = EXPIRED_STATUS
                status = "bounced"
                extra["note"] = "expired"
            else:
                recipient.next_attempt = next_attempt(
                    now, recipient.attempts, envelope.arrival, relay
                )
                status = "deferred"
                extra["retry"] = f"{recipient.next_attempt - now:.0f}"
            lines.append(
                {
                    "id": message.queue_id,
                    "to": f"<{result.recipient}>",
                    "via": via,
                    "tls": "yes" if tls else "no",
                    "status": status,
                    "reply": result.reply,
                    **extra,
                }
            )
        warning: str | None = None
        async with message.lock:
            if delay_warning_due(now, envelope.arrival, state, relay) and dsn.should_bounce(
                envelope
            ):
                warning = await self._warn(message, now)
            data = state.encode()
            try:
                await trio.to_thread.run_sync(
                    _write_state, self.spool.relay, message.queue_id, data
                )
            except OSError as exc:
                # The attempt is not lost from memory; after a crash it would be repeated.
                maillog.error(
                    "relay-error", id=message.queue_id, op="state", error=_error_text(exc)
                )
        message.busy.difference_update(result.recipient for result in results)
        # Logged once the state says so (and the recipients are free for SIGUSR1 again).
        for fields in lines:
            maillog.event("relay", **fields)
        if warning is not None and self.on_bounce is not None:
            self.on_bounce(warning)
        self.schedule(message)

    async def _warn(self, message: _Message, now: float) -> str | None:
        """Queue the delay warning for *message*; its id, or None when it could not be written."""
        state = message.state
        statuses = [
            dsn.RecipientStatus(
                recipient=r.recipient,
                action="delayed",
                status=_transient(r.dsn_status),
                diagnostic=diagnostic(r.reply) if r.reply else "",
                remote_mta=r.remote_mta or None,
            )
            for r in state.pending
        ]
        identifier = bounce_id(message.queue_id, DELAY_SUFFIX)
        try:
            await trio.to_thread.run_sync(self._queue_report, message, statuses, identifier, now)
        except OSError as exc:
            maillog.error("relay-error", id=message.queue_id, op="dsn", error=_error_text(exc))
            return None
        state.delay_warned = True
        maillog.event("relay-dsn", id=message.queue_id, dsn=identifier, kind="delayed")
        return identifier

    def _queue_report(
        self,
        message: _Message,
        statuses: Sequence[dsn.RecipientStatus],
        identifier: str,
        now: float,
    ) -> None:
        """BLOCKING."""
        queue_bounce(
            self.spool,
            envelope=message.envelope,
            statuses=statuses,
            source=message.path,
            offset=message.offset,
            hostname=self.config.server.hostname,
            identifier=identifier,
            now=datetime.datetime.fromtimestamp(now, tz=datetime.UTC),
        )

    async def _finish(self, message: _Message) -> None:
        """Every recipient is final: the bounce (if any failed), then the message and its state
        leave ``relay/``."""
        state = message.state
        envelope = message.envelope
        failed = [r for r in state.recipients if r.status == "failed"]
        bounce: str | None = None
        async with message.lock:
            try:
                if failed and dsn.should_bounce(envelope):
                    bounce = bounce_id(message.queue_id, FAILURE_SUFFIX)
                    statuses = [
                        dsn.RecipientStatus(
                            recipient=r.recipient,
                            action="failed",
                            status=r.dsn_status
                            if _ENHANCED_RE.fullmatch(r.dsn_status)
                            else "5.0.0",
                            diagnostic=diagnostic(r.reply) if r.reply else "",
                            remote_mta=r.remote_mta or None,
                        )
                        for r in failed
                    ]
                    await trio.to_thread.run_sync(
                        self._queue_report, message, statuses, bounce, self.wall()
                    )
                await trio.to_thread.run_sync(_remove, self.spool.relay, message.queue_id)
            except OSError as exc:
                maillog.error(
                    "relay-error", id=message.queue_id, op="finish", error=_error_text(exc)
                )
                message.finishing = False
                # Try again later (the bounce, if written, is found there and not repeated).
                due = trio.current_time() + self.relay.retry_initial
                message.due = min(message.due, due)
                heapq.heappush(self._timers, (message.due, message.queue_id))
                return
        if self.messages.get(message.queue_id) is message:
            del self.messages[message.queue_id]
        sent = sum(1 for r in state.recipients if r.status == "sent")
        if bounce is not None:
            maillog.event("relay-dsn", id=message.queue_id, dsn=bounce, kind="failed")
            if self.on_bounce is not None:
                self.on_bounce(bounce)
        maillog.event("relay-done", id=message.queue_id, sent=sent, failed=len(failed))

    # --- the doorbell and the clock ---

    async def listen(self, doorbell: trio.MemoryReceiveChannel[str | None]) -> None:
        """Forever: take rings, rescan on None (and retry everything) and every
        scan_interval, start what is due."""
        scan_interval = self.config.delivery.scan_interval
        next_scan = trio.current_time() + scan_interval
        open_ = True
        while True:
            item: str | _Silence | None = _SILENCE
            with trio.CancelScope(deadline=min(next_scan, self._next_timer())) as scope:
                self._wait_scope = scope
                if open_:
                    try:
                        item = await doorbell.receive()
                    except trio.EndOfChannel:
                        open_ = False
                else:
                    await trio.sleep_forever()
            self._wait_scope = None
            if item is None:
                await self.scan()
                self.retry_all()
                next_scan = trio.current_time() + scan_interval
            elif isinstance(item, str) and is_queue_id(item):
                await self.take(item)
            now = trio.current_time()
            if now >= next_scan:
                await self.scan()
                next_scan = trio.current_time() + scan_interval
            self._due_timers(now)


def _transient(status: str) -> str:
    """A delay report's status must be 4.x.x (RFC 3464 2.3.4)."""
    if _ENHANCED_RE.fullmatch(status):
        return "4" + status[1:]
    return "4.0.0"


# --- blocking helpers (worker threads) -----------------------------------------------------------


@attrs.frozen
class _Undecodable:
    reason: str
    signature: tuple[int, int]


def _list_relay(relay_dir: Path, cleanup: bool) -> list[str]:
    """BLOCKING. The queue ids in ``relay/`` (files only), sorted; with *cleanup*, remove
    temporary state files and states without a message first."""
    ids: list[str] = []
    states: list[str] = []
    leftovers: list[str] = []
    with os.scandir(relay_dir) as entries:
        for entry in entries:
            name = entry.name
            if is_queue_id(name):
                if not entry.is_dir(follow_symlinks=False):
                    ids.append(name)
            elif name.endswith(TMP_SUFFIX) and is_queue_id(name[: -len(TMP_SUFFIX)]):
                leftovers.append(name)
            elif name.endswith(STATE_SUFFIX) and is_queue_id(name[: -len(STATE_SUFFIX)]):
                states.append(name[: -len(STATE_SUFFIX)])
    if cleanup:
        present = set(ids)
        removed = leftovers + [s + STATE_SUFFIX for s in states if s not in present]
        for name in removed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(relay_dir / name)
        if removed:
            fsync_directory(relay_dir)
            maillog.event("relay-cleanup", removed=",".join(sorted(removed)))
    ids.sort()
    return ids


def _load(relay_dir: Path, queue_id: str) -> tuple[Envelope, int, RelayState, str] | _Undecodable:
    """BLOCKING. The envelope, message offset and state of ``relay/<id>`` (and the reason the
    state file was ignored, or ""); or why it does not decode.  Raises OSError."""
    path = relay_dir / queue_id
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        head = bytearray()
        while len(head) < _MAX_PRE_HEADER:
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                break
            start = max(0, len(head) - 1)
            head += chunk
            if head.find(b"\n\n", start) >= 0:
                break
    finally:
        os.close(fd)
    signature = (info.st_size, info.st_mtime_ns)
    try:
        envelope, offset = Envelope.decode(bytes(head))
        if envelope.queue_id != queue_id:
            raise EnvelopeError(f"envelope id {envelope.queue_id} is not the file name")
    except EnvelopeError as exc:
        return _Undecodable(str(exc), signature)
    try:
        state = load_state(relay_dir, envelope)
    except StateError as exc:
        return envelope, offset, RelayState.fresh(envelope), str(exc)
    return envelope, offset, state, ""


def _read_body(path: Path, offset: int) -> bytes:
    """BLOCKING. The message of a spool file: everything from *offset*.  Raises OSError."""
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read()


def _write_state(relay_dir: Path, queue_id: str, data: bytes) -> None:
    """BLOCKING: :func:`save_state` for a state already encoded."""
    final = state_path(relay_dir, queue_id)
    temporary = relay_dir / (queue_id + TMP_SUFFIX)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_directory(relay_dir)


def _remove(relay_dir: Path, queue_id: str) -> None:
    """BLOCKING. Remove the message, then its state (a crash between the two leaves a state
    without a message, removed at the next start), then make it durable."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(relay_dir / queue_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(relay_dir, queue_id))
    fsync_directory(relay_dir)


# --- the task ------------------------------------------------------------------------------------


def _contexts(relay: RelayConfig) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(opportunistic, verified) client contexts.  Opportunistic TLS takes any certificate
    (RFC 7435: encryption without authentication beats plaintext); verified TLS checks the
    chain (system store, or ``ca_file``) and the host name."""
    opportunistic = ssl.create_default_context()
    opportunistic.check_hostname = False
    opportunistic.verify_mode = ssl.CERT_NONE
    cafile = str(relay.ca_file) if relay.ca_file is not None else None
    verified = ssl.create_default_context(cafile=cafile)
    return opportunistic, verified


async def run_relay(
    config: Config,
    spool: Spool,
    doorbell: trio.MemoryReceiveChannel[str | None],
    *,
    on_bounce: Callable[[str], None] | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay what is in ``relay/``, forever (see the module docstring).

    *doorbell* carries the ids of new ``relay/<id>`` files (try now), and None for SIGUSR1
    (rescan, and try every pending recipient now).  *on_bounce* is called, without blocking,
    with the id of every bounce or delay warning written into ``received/``.  *wall_clock*
    gives the time stored in the state files and the ages of messages (tests with MockClock:
    :func:`anchored_clock`).  Reports ``started()`` once ``relay/`` was listed and what is due
    was started.  Cancelling it is safe at any point: what was in flight is tried again.
    """
    opportunistic, verified = _contexts(config.relay)
    async with trio.open_nursery() as nursery:
        relayer = _Relayer(
            config=config,
            spool=spool,
            nursery=nursery,
            wall=wall_clock,
            on_bounce=on_bounce,
            opportunistic=opportunistic,
            verified=verified,
            connections=trio.Semaphore(config.relay.max_connections),
        )
        await relayer.scan(start=True)
        task_status.started()
        await relayer.listen(doorbell)
