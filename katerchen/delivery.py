"""The delivery task: it takes every message out of ``received/`` and puts it where its
recipients read it -- the Maildir of each local mailbox, one copy in ``relay/`` for the remote
ones, a bounce to the sender for those that cannot be delivered -- and only then removes it.

Theory of operation.  The directory is the truth and the doorbell only a hint.  :func:`run_delivery`
lists ``received/`` at start (and reports ``started()`` after that first listing), every
``[delivery] scan_interval`` seconds, and on every ``None`` that comes through the doorbell
(SIGUSR1).  A queue id coming through the doorbell is a message the receiver has just committed:
it goes to the front of the queue.  A lost ring (the doorbell is a bounded channel) only delays a
message until the next scan.

A fixed set of :data:`WORKERS` tasks takes ids from the queue and delivers each message in a
single worker-thread hop (:meth:`Deliverer.deliver`), so several messages are delivered at once
and a slow mailbox holds up only its own message.  Each id is in at most one of the queue, the
workers, the retry timers: one message is never delivered by two workers at once.

Exactly once.  Everything a delivery writes is written under a name derived from the message, so
doing it again -- after a crash, or a retry -- finds it there instead of writing a second copy:

* a Maildir file is named by :func:`katerchen.maildir.delivery_name` (queue id, mailbox); a
  message found by a scan, or retried, may have been delivered before, so its delivery also
  looks in ``cur/`` (``check_cur``) where a reader may have moved it.  A message rung in fresh
  from the receiver cannot have been delivered before, and skips that directory scan;
* the relay copy is ``relay/<queue id>`` and a bounce is ``received/<bounce_id(queue id)>``,
  both written by :func:`katerchen.spool.write_file`, which never replaces an existing file.
  Those two are not idempotent once consumed (the relayer deletes what it has sent), so they are
  written only by the attempt that finishes the message, in the same thread hop that removes it
  from ``received/``: while a local mailbox still fails, the relay copy and the bounce wait.

The original leaves ``received/`` only when every recipient is done: delivered, relayed, bounced
(or, for the null reverse-path, dropped and logged).  Only a crash between writing the relay copy
or the bounce and that removal can repeat one of them, and only if it was consumed in between.

Failures.  An OSError anywhere (disk full, permissions, a broken Maildir) is temporary: the
message stays and is tried again after ``retry_initial`` seconds, then after twice that, up to
``retry_max`` (:func:`retry_delay`); SIGUSR1 retries everything at once.  A recipient that no
longer resolves (mailbox removed after the message was accepted, an alias loop) is a permanent
failure: one bounce (:mod:`katerchen.dsn`) per message, from ``<>`` to the reverse-path, queued as
a new message in ``received/`` and delivered like any other; never for a ``<>`` message.

A recipient outside the served domains is relayed only when the receiver authorised it (the
envelope's ``relay`` flag: a trusted network, or AUTH) or for mail made on this host (an empty
``client``: bounces, files placed by the administrator; :func:`may_relay`); other mail from the
network got there only for recipients that routed when it was accepted.  After writing a relay
copy, delivery rings the relayer (``on_relay``).  The relayer writes its own bounces with
:func:`queue_bounce`, the same way.

A file in ``received/`` that does not decode (corrupt, or written by a newer version) is left
where it is and logged once (``undecodable``) -- docs/spool-format.md forbids delivering or
deleting it, and a newer katerchen started again later must still find it.  It is read again at
each scan (cheap) and delivered once it decodes (e.g. a copy by hand that was still running).

Logs, one line per recipient: ``delivered id= to=<> mailbox=domain/name delay=``, ``relayed id=
to=<> orig_to=<>``, ``deferred id= to=<> reason= retry=``, ``bounced id= to=<> status= reason=
dsn=<bounce id>``, ``dropped id= to=<> status= reason=`` (null reverse-path).
"""

from __future__ import annotations

import collections
import datetime
import enum
import errno
import functools
import hashlib
import heapq
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, Literal

import attrs
import trio

from katerchen import dsn, maildir, maillog
from katerchen.config import Config
from katerchen.envelope import Envelope, EnvelopeError, received_header
from katerchen.routing import DomainsTree, Mailbox, Route
from katerchen.spool import Spool, is_queue_id, write_file

__all__ = [
    "WORKERS",
    "Attempt",
    "Deferral",
    "Deliverer",
    "bounce_id",
    "may_relay",
    "queue_bounce",
    "retry_delay",
    "run_delivery",
]

#: Messages delivered at once (worker tasks, and threads of the delivery's own limiter, so
#: delivery never takes the threads the receiver's commits need).
WORKERS: Final = 8

#: The most of a file read while looking for the end of its envelope pre-header: far more than
#: any recipient limit makes, and a file without an end within it does not decode.
MAX_PRE_HEADER: Final = 16 * 1024 * 1024
#: Read sizes for the pre-header and the relay copy.
READ_CHUNK: Final = 64 * 1024
COPY_CHUNK: Final = 1024 * 1024

#: The "with" of the Received header of a bounce (RFC 3848 registers none for mail made by the
#: server itself; any atom is allowed).
BOUNCE_PROTOCOL: Final = "LOCAL"

_BOUNCE_SUFFIX: Final = "b"


# --- pure policy ---------------------------------------------------------------------------------


def retry_delay(previous: float | None, *, initial: float, maximum: float) -> float:
    """Seconds until the next attempt after a temporary failure: *initial* after the first,
    then double the *previous* delay each time, never more than *maximum*."""
    if previous is None:
        return min(initial, maximum)
    return min(previous * 2, maximum)


def may_relay(envelope: Envelope) -> bool:
    """Whether a recipient outside the served domains is relayed rather than refused.

    When the receiver authorised the client to relay (``envelope.relay``: a trusted network,
    or AUTH), and for mail made on this host, which is what an empty ``client`` says: bounces,
    and files an administrator put into ``received/``.  Other mail from the network reached
    ``received/`` only for recipients that routed when it was accepted, so one that no longer
    does (its domain was removed since) is a permanent failure, 5.7.1, as it would be at RCPT.
    Remote forward targets of aliases are relayed for everybody: the administrator wrote them.
    """
    return envelope.relay or envelope.client == ""


def bounce_id(queue_id: str, suffix: str = _BOUNCE_SUFFIX) -> str:
    """The queue id of the bounce for message *queue_id*: the same every time, so a bounce
    written again after a crash finds the first one; it sorts right after the original.

    Receiver ids are 20 lowercase hex digits, so ``<id>b`` can never be one of them.  An id
    that is already the longest allowed (64, only by hand) gets a digest of itself instead.
    *suffix* (one letter or digit) tells apart the reports about one message: ``b`` from
    delivery, ``r`` and ``w`` from the relayer (failure, delay warning).
    """
    if len(queue_id) < 64:
        return queue_id + suffix
    return hashlib.sha256(queue_id.encode("ascii")).hexdigest()[:63] + suffix


def _diagnostic(route: Route) -> str:
    """The Diagnostic-Code of a recipient refused by the routing at delivery time."""
    if route is Route.LOOP:
        return f"x-katerchen; {route.description}"
    return f"smtp; 550 {route.status} {route.description}"


def _reason(exc: OSError) -> str:
    """A short reason for the log: what failed, on which file."""
    text = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
    return f"{text} ({exc.filename})" if exc.filename else text


# --- one message, in a worker thread -------------------------------------------------------------


@attrs.frozen
class Deferral:
    """A recipient (or the whole message when ``recipient`` is None) that failed temporarily."""

    recipient: str | None
    reason: str
    mailbox: str | None = None  # "domain/name" when one Maildir failed


AttemptOutcome = Literal["done", "deferred", "gone", "undecodable"]


@attrs.frozen
class Attempt:
    """What one :meth:`Deliverer.deliver` did.

    ``done``: every recipient is done and the message left ``received/``; ``bounce`` is then the
    id of the bounce it queued, if any, and ``relayed`` whether it wrote ``relay/<id>``.
    ``deferred``: the message stays for a retry, ``deferrals`` say why.  ``gone``: there was
    no such file.  ``undecodable``: the file does not decode (``reason``); ``signature`` is
    its (size, mtime_ns), to log it once per version.
    """

    queue_id: str
    outcome: AttemptOutcome
    deferrals: tuple[Deferral, ...] = ()
    bounce: str | None = None
    reason: str = ""
    signature: tuple[int, int] | None = None
    relayed: bool = False


@attrs.frozen
class _Failed:
    recipient: str
    status: str
    diagnostic: str
    reason: str


class Deliverer:
    """Delivers one message at a time, completely, in the calling thread (BLOCKING).

    Safe to use from several threads at once for different queue ids; never for the same id.
    """

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.domains = DomainsTree.from_config(config)
        self.hostname = config.server.hostname

    def deliver(self, queue_id: str, *, check_cur: bool) -> Attempt:
        """BLOCKING. Try to finish message *queue_id* of ``received/``; see :class:`Attempt`.

        *check_cur* says the message may have been delivered before (it was found by a scan, or
        is retried): every Maildir delivery then also looks in ``cur/``.  Never raises OSError
        (that is a ``deferred`` attempt); anything else is a bug.
        """
        source = self.spool.received / queue_id
        try:
            head, signature = _read_pre_header(source)
        except FileNotFoundError:
            return Attempt(queue_id, "gone")
        except OSError as exc:
            return Attempt(queue_id, "deferred", (Deferral(None, _reason(exc)),))
        try:
            envelope, offset = Envelope.decode(head)
            if envelope.queue_id != queue_id:
                raise EnvelopeError(f"envelope id {envelope.queue_id} is not the file name")
        except EnvelopeError as exc:
            return Attempt(queue_id, "undecodable", reason=str(exc), signature=signature)
        size = signature[0]
        return _Message(self, envelope, source, offset, size, check_cur).run()


@attrs.define
class _Message:
    """One attempt at one message (the state of :meth:`Deliverer.deliver`)."""

    deliverer: Deliverer
    envelope: Envelope
    source: Path
    offset: int
    size: int
    check_cur: bool
    deferrals: list[Deferral] = attrs.field(factory=list)
    failed: list[_Failed] = attrs.field(factory=list)
    # remote target -> the original recipient that led to it (the first, when several did)
    remote: dict[str, str] = attrs.field(factory=dict)
    reached: set[Mailbox] = attrs.field(factory=set)

    def run(self) -> Attempt:
        envelope = self.envelope
        domains = self.deliverer.domains
        # A recipient given twice in the envelope is one recipient.
        for recipient in dict.fromkeys(envelope.forward_paths):
            try:
                resolution = domains.resolve(recipient)
            except OSError as exc:
                self.deferrals.append(Deferral(recipient, _reason(exc)))
                continue
            if resolution.refusal is Route.RELAY_DENIED and may_relay(envelope):
                self.remote.setdefault(recipient, recipient)
                continue
            if resolution.refusal is not None:
                route = resolution.refusal
                self.failed.append(
                    _Failed(recipient, route.status, _diagnostic(route), route.description)
                )
                continue
            for mailbox in resolution.mailboxes:
                if mailbox not in self.reached:  # reached before through another recipient
                    self.reached.add(mailbox)
                    self._to_mailbox(recipient, mailbox)
            for target in resolution.remote:
                self.remote.setdefault(target, recipient)
        if self.deferrals:
            # The relay copy and the bounce wait for the attempt that finishes the message:
            # written now, a retry could write them a second time after they were consumed.
            return Attempt(envelope.queue_id, "deferred", tuple(self.deferrals))
        return self._finish()

    def _to_mailbox(self, recipient: str, mailbox: Mailbox) -> None:
        envelope = self.envelope
        deliverer = self.deliverer
        path = deliverer.domains.root / mailbox.domain / mailbox.name
        where = f"{mailbox.domain}/{mailbox.name}"
        # Return-Path and Delivered-To (RFC 5321 4.4; the usual local-delivery headers) come
        # from the envelope and the mailbox components, which hold no control characters.
        prefix = (
            f"Return-Path: <{envelope.reverse_path}>\r\nDelivered-To: {mailbox.address}\r\n"
        ).encode()
        name = maildir.delivery_name(
            envelope.queue_id,
            mailbox.address,
            envelope.arrival,
            deliverer.hostname,
            size=len(prefix) + self.size - self.offset,
        )
        try:
            maildir.ensure_maildir(path)
            fresh = maildir.deliver(
                path, name, prefix, self.source, self.offset, check_cur=self.check_cur
            )
        except OSError as exc:
            self.deferrals.append(Deferral(recipient, _reason(exc), where))
            return
        except ValueError as exc:
            # The size in the name no longer matches the file: somebody is still writing it
            # (a copy into received/ that was not done by rename).  Try again later.
            self.deferrals.append(Deferral(recipient, f"message file changed: {exc}", where))
            return
        fields: dict[str, object] = {
            "id": envelope.queue_id,
            "to": f"<{recipient}>",
            "mailbox": where,
            "delay": f"{max(0.0, time.time() - envelope.arrival):.3f}",
        }
        if fresh:
            maillog.event("delivered", **fields)
        else:
            # Found there from an earlier attempt (a crash, or a retry for another mailbox of
            # this message): it was logged when it was written.
            maillog.debug("delivered", **fields, note="already delivered")

    def _finish(self) -> Attempt:
        """Every recipient is delivered or failed for good: bounce, relay, remove."""
        envelope = self.envelope
        deliverer = self.deliverer
        spool = deliverer.spool
        queue_id = envelope.queue_id
        bounce: str | None = None
        try:
            # The bounce before the relay copy: if the relay copy then fails, the retry
            # repeats the bounce (harmless while it waits in received/) rather than the mail.
            if self.failed and dsn.should_bounce(envelope):
                bounce = self._queue_bounce()
            if self.remote:
                copy = attrs.evolve(envelope, forward_paths=tuple(self.remote))
                write_file(
                    spool.incoming,
                    spool.relay,
                    queue_id,
                    _file_chunks(self.source, copy.encode(), self.offset),
                )
            spool.remove_received(queue_id)
        except OSError as exc:
            return Attempt(queue_id, "deferred", (Deferral(None, _reason(exc)),))
        for target, recipient in self.remote.items():
            fields: dict[str, object] = {"id": queue_id, "to": f"<{target}>"}
            if target != recipient:
                fields["orig_to"] = f"<{recipient}>"
            maillog.event("relayed", **fields)
        for failure in self.failed:
            name = "bounced" if bounce is not None else "dropped"
            maillog.event(
                name,
                id=queue_id,
                to=f"<{failure.recipient}>",
                status=failure.status,
                reason=failure.reason,
                **({"dsn": bounce} if bounce is not None else {"note": "null reverse-path"}),
            )
        return Attempt(queue_id, "done", bounce=bounce, relayed=bool(self.remote))

    def _queue_bounce(self) -> str:
        """Write the bounce of this message into ``received/``; return its id.  Raises OSError."""
        statuses = [
            dsn.RecipientStatus(
                recipient=failure.recipient,
                action="failed",
                status=failure.status,
                diagnostic=failure.diagnostic,
            )
            for failure in self.failed
        ]
        identifier = bounce_id(self.envelope.queue_id)
        queue_bounce(
            self.deliverer.spool,
            envelope=self.envelope,
            statuses=statuses,
            source=self.source,
            offset=self.offset,
            hostname=self.deliverer.hostname,
            identifier=identifier,
        )
        return identifier


def queue_bounce(
    spool: Spool,
    *,
    envelope: Envelope,
    statuses: Sequence[dsn.RecipientStatus],
    source: Path,
    offset: int,
    hostname: str,
    identifier: str,
    now: datetime.datetime | None = None,
) -> bool:
    """BLOCKING. Queue a report about *envelope* (a bounce, or a delay warning when every status
    is ``delayed``) as the new message ``received/<identifier>``, from ``<>`` to its sender.

    The original's header block is read from *source* at *offset* (a spool file: the message
    starts there).  *identifier* comes from :func:`bounce_id`, so that a report written again
    after a crash finds the first one (False is returned then: it was there already).  *now*
    is the report's date (default: now).  The caller checks :func:`katerchen.dsn.should_bounce`
    first.  Raises OSError.
    """
    report = dsn.build_report(
        envelope=envelope,
        statuses=statuses,
        headers=_read_headers(source, offset),
        reporting_mta=hostname,
        now=now,
    )
    bounce = Envelope(
        queue_id=identifier,
        # The original's arrival, not now: the Maildir name of the bounce derives from it,
        # so a bounce made again after a crash gets the name of the first one.
        arrival=envelope.arrival,
        client="",
        helo=hostname,
        reverse_path="",
        forward_paths=(envelope.reverse_path,),
        body="8BITMIME" if not report.isascii() else None,
        # dsn.py keeps the report 7-bit except for a non-ASCII reverse-path in its To:.
        smtputf8=not envelope.reverse_path.isascii(),
    )
    header = bounce.encode() + received_header(bounce, hostname=hostname, protocol=BOUNCE_PROTOCOL)
    return write_file(spool.incoming, spool.received, identifier, (header, report))


def _read_pre_header(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The start of the file, up to and including the end of the pre-header when it has one
    within :data:`MAX_PRE_HEADER`, and the file's (size, mtime_ns).  Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        data = bytearray()
        while len(data) < MAX_PRE_HEADER:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                break
            # The end may straddle two reads: look from one byte before the new chunk.
            start = max(0, len(data) - 1)
            data += chunk
            if data.find(b"\n\n", start) >= 0:
                break
    finally:
        os.close(fd)
    return bytes(data), (info.st_size, info.st_mtime_ns)


def _read_headers(path: Path, offset: int) -> bytes:
    """The start of the message at *offset* in *path* (our Received header first): enough for
    :func:`katerchen.dsn.build_report` to find the whole header block it quotes.  Raises
    OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # The end of the header block may be up to CRLF CRLF past dsn's limit.
        return os.pread(fd, dsn.MAX_HEADER_BYTES + 4, offset)
    finally:
        os.close(fd)


def _file_chunks(path: Path, first: bytes, offset: int) -> Iterator[bytes]:
    """*first*, then the bytes of *path* from *offset* on, in large chunks."""
    yield first
    with open(path, "rb", buffering=0) as file:
        file.seek(offset)
        while chunk := file.read(COPY_CHUNK):
            yield chunk


class _Silence(enum.Enum):
    """No ring: the wait ended by its deadline."""

    TOKEN = enum.auto()


_SILENCE: Final = _Silence.TOKEN


# --- the task ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Scheduler:
    """Which message is delivered when: the queue, the workers, the retry timers."""

    deliverer: Deliverer
    spool: Spool
    scan_interval: float
    retry_initial: float
    retry_max: float
    # Told the id of every relay/<id> written (app.py rings the relayer's doorbell with it).
    on_relay: Callable[[str], None] | None = None
    # Ids waiting for a worker -> check_cur.  Fresh rings go to the front.
    _queue: collections.OrderedDict[str, bool] = attrs.field(factory=collections.OrderedDict)
    _active: set[str] = attrs.field(factory=set)
    _due: dict[str, float] = attrs.field(factory=dict)  # deferred id -> when to retry
    _timers: list[tuple[float, str]] = attrs.field(factory=list)  # heap over _due, lazy
    _delays: dict[str, float] = attrs.field(factory=dict)  # deferred id -> its last delay
    _undecodable: dict[str, tuple[int, int]] = attrs.field(factory=dict)  # id -> logged version
    _idle: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(WORKERS))
    _wait_scope: trio.CancelScope | None = None

    # --- the queue ---

    def _enqueue(self, queue_id: str, *, check_cur: bool, first: bool = False) -> None:
        if queue_id in self._queue:
            if first:
                self._queue.move_to_end(queue_id, last=False)
            return
        if queue_id in self._active or queue_id in self._due:
            return  # a worker has it, or its retry timer does
        self._queue[queue_id] = check_cur
        if first:
            self._queue.move_to_end(queue_id, last=False)
        self._idle.unpark()

    def ring(self, queue_id: str) -> None:
        """The receiver committed *queue_id*: deliver it next.  Nobody can have delivered it
        before, so no ``cur/`` check -- unless a scan found it first and queued it with one."""
        if is_queue_id(queue_id):
            self._enqueue(queue_id, check_cur=False, first=True)

    async def scan(self) -> None:
        """List ``received/`` and queue every message not queued, in work or waiting."""
        try:
            ids = await trio.to_thread.run_sync(self.spool.list_received)
        except OSError as exc:
            maillog.error("delivery-error", op="scan", error=_reason(exc))
            return
        present = set(ids)
        for queue_id in list(self._undecodable):
            if queue_id not in present:
                del self._undecodable[queue_id]
        for queue_id in ids:
            self._enqueue(queue_id, check_cur=True)

    def retry_all(self) -> None:
        """SIGUSR1: every deferred message is due now."""
        for queue_id in list(self._due):
            del self._due[queue_id]
            self._enqueue(queue_id, check_cur=True)
        self._timers.clear()

    def _retry_due(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            due, queue_id = heapq.heappop(timers)
            if self._due.get(queue_id) == due:
                del self._due[queue_id]
                self._enqueue(queue_id, check_cur=True)

    def _next_retry(self) -> float:
        timers = self._timers
        while timers and self._due.get(timers[0][1]) != timers[0][0]:
            heapq.heappop(timers)  # superseded (retried early, or done)
        return timers[0][0] if timers else math.inf

    # --- the workers ---

    async def work(self) -> None:
        """One worker: deliver queued messages, one at a time, forever."""
        while True:
            while not self._queue:
                await self._idle.park()
            queue_id, check_cur = self._queue.popitem(last=False)
            self._active.add(queue_id)
            try:
                attempt = await self._attempt(queue_id, check_cur)
            finally:
                self._active.discard(queue_id)
            self._record(attempt)

    async def _attempt(self, queue_id: str, check_cur: bool) -> Attempt:
        deliver = functools.partial(self.deliverer.deliver, queue_id, check_cur=check_cur)
        try:
            return await trio.to_thread.run_sync(deliver, limiter=self._limiter)
        except Exception:
            # A bug; the message stays and is retried with backoff, the others go on.
            maillog.logger.exception("internal-error id=%s", queue_id)
            return Attempt(queue_id, "deferred", (Deferral(None, "internal error"),))

    def _record(self, attempt: Attempt) -> None:
        queue_id = attempt.queue_id
        if attempt.outcome == "deferred":
            delay = retry_delay(
                self._delays.get(queue_id), initial=self.retry_initial, maximum=self.retry_max
            )
            self._delays[queue_id] = delay
            due = trio.current_time() + delay
            self._due[queue_id] = due
            heapq.heappush(self._timers, (due, queue_id))
            if self._wait_scope is not None:
                self._wait_scope.deadline = min(self._wait_scope.deadline, due)
            for deferral in attempt.deferrals:
                fields: dict[str, object] = {"id": queue_id}
                if deferral.recipient is not None:
                    fields["to"] = f"<{deferral.recipient}>"
                if deferral.mailbox is not None:
                    fields["mailbox"] = deferral.mailbox
                fields["reason"] = deferral.reason
                fields["retry"] = f"{delay:g}"
                maillog.event("deferred", **fields)
            return
        self._delays.pop(queue_id, None)
        if attempt.outcome == "undecodable":
            assert attempt.signature is not None
            if self._undecodable.get(queue_id) != attempt.signature:
                self._undecodable[queue_id] = attempt.signature
                maillog.error("undecodable", id=queue_id, reason=attempt.reason, action="left")
            return
        self._undecodable.pop(queue_id, None)
        if attempt.relayed and self.on_relay is not None:
            self.on_relay(queue_id)
        if attempt.bounce is not None:
            # Queued like any message; the cur/ check because an earlier attempt (before a
            # crash) may have written and delivered the same bounce already.
            self._enqueue(attempt.bounce, check_cur=True, first=True)

    # --- the doorbell and the clock ---

    async def listen(self, doorbell: trio.MemoryReceiveChannel[str | None]) -> None:
        """Forever: take rings, rescan on None and every scan_interval, start due retries."""
        next_scan = trio.current_time() + self.scan_interval
        open_ = True
        while True:
            item: str | _Silence | None = _SILENCE
            with trio.CancelScope(deadline=min(next_scan, self._next_retry())) as scope:
                # Handled after the scope: a scan must never be cut short by the deadline.
                self._wait_scope = scope
                if open_:
                    try:
                        item = await doorbell.receive()
                    except trio.EndOfChannel:
                        open_ = False  # nobody will ring again; scans and timers go on
                else:
                    await trio.sleep_forever()
            self._wait_scope = None
            if item is None:
                await self.scan()
                self.retry_all()
                next_scan = trio.current_time() + self.scan_interval
            elif isinstance(item, str):
                self.ring(item)
            now = trio.current_time()
            if now >= next_scan:
                await self.scan()
                next_scan = trio.current_time() + self.scan_interval
            self._retry_due(now)


async def run_delivery(
    config: Config,
    spool: Spool,
    doorbell: trio.MemoryReceiveChannel[str | None],
    *,
    on_relay: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver what arrives in ``received/``, forever (see the module docstring).

    *doorbell* carries queue ids of freshly committed messages, and None for "rescan now and
    retry everything deferred" (SIGUSR1).  *on_relay* is called (without blocking) with the id
    of every ``relay/<id>`` written.  Reports ``started()`` once the first listing of
    ``received/`` is done and its messages are queued.  Cancelling it is safe at any point:
    a delivery running in a worker thread finishes first, and whatever is not finished stays in
    ``received/`` for the next start.
    """
    delivery = config.delivery
    scheduler = _Scheduler(
        deliverer=Deliverer(config, spool),
        spool=spool,
        scan_interval=delivery.scan_interval,
        retry_initial=delivery.retry_initial,
        retry_max=delivery.retry_max,
        on_relay=on_relay,
    )
    # The delivery's own worker pool, inside the task app.py started (like serve_listeners'
    # handlers): cancelling the task cancels every worker with it.
    async with trio.open_nursery() as workers:
        for _ in range(WORKERS):
            workers.start_soon(scheduler.work)
        await scheduler.scan()
        task_status.started()
        await scheduler.listen(doorbell)
