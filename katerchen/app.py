"""The server process: the one root nursery with the listeners, the connection handlers, the
delivery task and the signal task, and the shutdown sequence.

Theory of operation.  :func:`run` prepares the spool (leftovers of an earlier run are removed
from ``incoming/``: they were never acknowledged), loads the ``[tls]`` certificate, binds every
``[server] listen``, ``submission`` and ``submissions`` address (each kind of listener hands its
connections to the receiver with its :class:`~katerchen.receiver.Listener`), starts the delivery
task (which has listed ``received/`` once when its start returns), logs
``listening`` and reports the bound addresses through ``task_status.started()``.  Connection
handlers run in a nursery of their own inside the root one, so that shutdown can drain them while
the rest of the server -- delivery and the relay -- goes on.

The delivery doorbell is a bounded memory channel: the receiver rings it with the queue id of
every message it commits, the relay with the id of every bounce or delay warning it queues,
SIGUSR1 with None (rescan ``received/`` and retry what was deferred).  The relay has a doorbell
of its own: delivery rings it with the id of every ``relay/<id>`` it writes, SIGUSR1 with None
(retry every deferred recipient now).  Ringing never blocks; a ring that does not fit is
dropped, which only delays that message until the next periodic scan (the directory, not the
channel, is the truth).

SIGHUP reloads the certificate (:meth:`~katerchen.tlsconfig.ServerTLS.reload`): new connections
get the new one, open ones keep theirs.

Shutdown -- on SIGTERM or SIGINT, or :meth:`RunningServer.shutdown` -- is a sequence:

1. stop accepting (the listeners are closed);
2. sessions idle between transactions get 421 4.3.2 and are closed; sessions inside a transaction
   may finish it, then get 421 4.3.2;
3. after ``[server] shutdown_grace`` seconds the sessions still running are cut: each discards
   its open message and says 421 4.3.2; then whatever still runs is cancelled, which is safe
   because nothing is acknowledged before it is durable in the spool;
4. the delivery and relay tasks, which went on meanwhile, are cancelled: a delivery in progress
   finishes its thread hop, whatever is left in ``received/`` waits for the next start, and a
   relay attempt cut short is made again after the next start (its state was not written);
5. :func:`run` returns.
"""

from __future__ import annotations

import contextlib
import functools
import signal
from collections.abc import Awaitable, Callable

import attrs
import trio
from trio import TaskStatus

from katerchen import maillog
from katerchen.config import Config, format_address
from katerchen.delivery import run_delivery
from katerchen.receiver import GOODBYE_TIMEOUT, Listener, Receiver
from katerchen.relay import run_relay
from katerchen.spool import Spool
from katerchen.tlsconfig import CertificateError, ServerTLS

__all__ = ["DOORBELL_SIZE", "RunningServer", "run"]

#: Rings the doorbell holds before it drops them.  The delivery task takes each ring at once
#: (it only queues the id), so this fills only if the task is starved for that many commits.
DOORBELL_SIZE = 1024


@attrs.define(eq=False)
class RunningServer:
    """What :func:`run` hands to ``nursery.start()``: the bound addresses and a way to stop."""

    addresses: list[tuple[str, int]]  # (host, port) per listener, the port resolved
    # The same for the [server] submission and submissions listeners.
    submission_addresses: list[tuple[str, int]] = attrs.field(factory=list)
    submissions_addresses: list[tuple[str, int]] = attrs.field(factory=list)
    tls: ServerTLS | None = None  # the certificate in use, when [tls] is set
    _shutdown_requested: trio.Event = attrs.field(init=False, factory=trio.Event, repr=False)

    def shutdown(self) -> None:
        """Start the shutdown sequence, as SIGTERM does.  Idempotent; returns at once (``run()``
        returns when the sequence is over)."""
        self._shutdown_requested.set()

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown_requested.is_set()

    async def wait_shutdown_requested(self) -> None:
        await self._shutdown_requested.wait()


async def run(
    config: Config,
    *,
    handle_signals: bool = False,
    deliver: bool = True,
    relay: bool = True,
    task_status: TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server for *config* until it is shut down, then return.

    With *handle_signals* (the CLI; only possible in the main thread), SIGTERM and SIGINT start
    the shutdown, SIGUSR1 rings the delivery and relay doorbells and SIGHUP reloads the TLS
    certificate.
    With ``deliver=False`` no delivery task runs and ``received/`` is left alone (for tests of
    the receiving side that look at the spool files); with ``relay=False`` no relay task runs
    and ``relay/`` is left alone (tests of delivery that look at relay copies).  Reports a
    :class:`RunningServer` through *task_status* once every listener is bound, the spool is
    ready and the delivery and the relay have listed their directories.  Raises OSError when
    the spool cannot be prepared, the ``[tls]`` files cannot be loaded or an address cannot be
    bound.
    """
    directories = config.directories
    spool = Spool(
        incoming=directories.incoming, received=directories.received, relay=directories.relay
    )
    removed = await trio.to_thread.run_sync(spool.prepare)
    if removed:
        # Never acknowledged, so nobody is owed these; say which, for the record.
        maillog.event("spool-cleanup", removed=len(removed), ids=",".join(removed))
    tls: ServerTLS | None = None
    if config.tls is not None:
        try:
            tls = await trio.to_thread.run_sync(
                ServerTLS.load, config.tls.certificate, config.tls.key
            )
        except CertificateError as exc:  # changed since the config was checked
            raise OSError(f"[tls] {exc.which}: {exc.message}") from None

    listeners: list[trio.SocketListener] = []
    by_kind: dict[Listener, list[trio.SocketListener]] = {}
    try:
        for kind, configured in (
            (Listener.MX, config.server.listen),
            (Listener.SUBMISSION, config.server.submission),
            (Listener.SUBMISSIONS, config.server.submissions),
        ):
            bound = by_kind[kind] = []
            for host, port in configured:
                bound.extend(await trio.open_tcp_listeners(port, host=host))
            listeners.extend(bound)
        addresses = [_bound_address(listener) for listener in by_kind[Listener.MX]]
        server = RunningServer(
            addresses,
            submission_addresses=[_bound_address(x) for x in by_kind[Listener.SUBMISSION]],
            submissions_addresses=[_bound_address(x) for x in by_kind[Listener.SUBMISSIONS]],
            tls=tls,
        )
        ring, doorbell = trio.open_memory_channel[str | None](DOORBELL_SIZE)
        relay_ring, relay_doorbell = trio.open_memory_channel[str | None](DOORBELL_SIZE)
        if not relay:
            relay_doorbell.close()  # rings are then dropped at once
        receiver = Receiver(config, spool, on_queued=functools.partial(_ring, ring), tls=tls)

        async def handle(kind: Listener, stream: trio.SocketStream) -> None:
            try:
                peer = stream.socket.getpeername()
            except OSError:
                return  # already gone; serve_listeners closes the stream
            await receiver.handle_connection(stream, (str(peer[0]), int(peer[1])), kind)

        async with trio.open_nursery() as root:
            if handle_signals:
                await root.start(_watch_signals, server, ring, tls, relay_ring)
            if relay:
                relay_task = functools.partial(run_relay, on_bounce=functools.partial(_ring, ring))
                await root.start(relay_task, config, spool, relay_doorbell)
            if deliver:
                on_relay = functools.partial(_ring, relay_ring)
                await root.start(
                    functools.partial(run_delivery, on_relay=on_relay), config, spool, doorbell
                )
            async with trio.open_nursery() as handlers:
                accept_scopes: list[trio.CancelScope] = []  # one per kind of listener
                for kind, bound in by_kind.items():
                    if bound:
                        accept_scopes.append(scope := trio.CancelScope())
                        kind_handle = functools.partial(handle, kind)
                        root.start_soon(_accept, scope, kind_handle, bound, handlers)
                listening = {
                    "addresses": server.addresses,
                    "submission": server.submission_addresses,
                    "submissions": server.submissions_addresses,
                }
                maillog.event(
                    "listening",
                    **{k: " ".join(map(format_address, v)) for k, v in listening.items() if v},
                )
                task_status.started(server)

                await server.wait_shutdown_requested()
                maillog.event(
                    "shutdown",
                    connections=receiver.connections,
                    grace=config.server.shutdown_grace,
                )
                for scope in accept_scopes:
                    scope.cancel()
                receiver.drain()
                with trio.move_on_after(config.server.shutdown_grace) as grace:
                    await receiver.wait_closed()
                if grace.cancelled_caught:
                    maillog.event("shutdown-cancel", connections=receiver.connections)
                    # Each cut session still says 421 4.3.2, within its own bound.
                    receiver.force_close()
                    with trio.move_on_after(2 * GOODBYE_TIMEOUT):
                        await receiver.wait_closed()
                handlers.cancel_scope.cancel()
            # Delivery and relay went on while the connections drained; now they stop too.
            root.cancel_scope.cancel()
    finally:
        # serve_listeners closes the listeners it ran; these are the ones it never got to.
        for listener in listeners:
            listener.socket.close()
    maillog.event("stopped")


async def _accept(
    scope: trio.CancelScope,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    listeners: list[trio.SocketListener],
    handlers: trio.Nursery,
) -> None:
    with scope:
        await trio.serve_listeners(handle, listeners, handler_nursery=handlers)


async def _watch_signals(
    server: RunningServer,
    ring: trio.MemorySendChannel[str | None],
    tls: ServerTLS | None,
    relay_ring: trio.MemorySendChannel[str | None],
    *,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
    with trio.open_signal_receiver(*watched) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            maillog.event("signal", signal=name)
            if signum == signal.SIGHUP:
                # New connections get the new certificate; open ones keep theirs.  (The users
                # file and the aliases are reread by themselves when they change.)
                if tls is not None:
                    await tls.reload("sighup")
                continue
            if signum == signal.SIGUSR1:
                _ring(ring, None)  # rescan received/ now, retry what was deferred
                _ring(relay_ring, None)  # and every deferred relay recipient
                continue
            server.shutdown()


def _ring(ring: trio.MemorySendChannel[str | None], message: str | None) -> None:
    """Ring a doorbell (delivery's or the relay's) without ever blocking: the caller is a
    connection handler, a task or the signal task.  A dropped ring (full, or no task) is caught
    up by a scan."""
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        ring.send_nowait(message)


def _bound_address(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))
