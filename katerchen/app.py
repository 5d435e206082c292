"""The server process: the one root nursery with the listeners, the connection handlers, the
delivery task and the signal task, and the shutdown sequence.

Theory of operation.  :func:`run` prepares the spool (leftovers of an earlier run are removed
from ``incoming/``: they were never acknowledged), binds every ``[server] listen`` address,
starts the delivery task (which has listed ``received/`` once when its start returns), logs
``listening`` and reports the bound addresses through ``task_status.started()``.  Connection
handlers run in a nursery of their own inside the root one, so that shutdown can drain them while
the rest of the server -- delivery, and the relay in a later issue -- goes on.

The delivery doorbell is a bounded memory channel: the receiver rings it with the queue id of
every message it commits, SIGUSR1 with None (rescan ``received/`` and retry what was deferred).
Ringing never blocks; a ring that does not fit is dropped, which only delays that message until
the delivery's next periodic scan (the directory, not the channel, is the truth).

Shutdown -- on SIGTERM or SIGINT, or :meth:`RunningServer.shutdown` -- is a sequence:

1. stop accepting (the listeners are closed);
2. sessions idle between transactions get 421 4.3.2 and are closed; sessions inside a transaction
   may finish it, then get 421 4.3.2;
3. after ``[server] shutdown_grace`` seconds the sessions still running are cut: each discards
   its open message and says 421 4.3.2; then whatever still runs is cancelled, which is safe
   because nothing is acknowledged before it is durable in the spool;
4. the delivery task, which went on delivering meanwhile, is cancelled: a delivery in progress
   finishes its thread hop, and whatever is left in ``received/`` waits for the next start;
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
from katerchen.receiver import GOODBYE_TIMEOUT, Receiver
from katerchen.spool import Spool

__all__ = ["DOORBELL_SIZE", "RunningServer", "run"]

#: Rings the doorbell holds before it drops them.  The delivery task takes each ring at once
#: (it only queues the id), so this fills only if the task is starved for that many commits.
DOORBELL_SIZE = 1024


@attrs.define(eq=False)
class RunningServer:
    """What :func:`run` hands to ``nursery.start()``: the bound addresses and a way to stop."""

    addresses: list[tuple[str, int]]  # (host, port) per listener, the port resolved
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
    task_status: TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server for *config* until it is shut down, then return.

    With *handle_signals* (the CLI; only possible in the main thread), SIGTERM and SIGINT start
    the shutdown and SIGUSR1 rings the delivery doorbell.  With ``deliver=False`` no delivery
    task runs and ``received/`` is left alone (for tests of the receiving side that look at the
    spool files).  Reports a :class:`RunningServer` through *task_status* once every listener is
    bound, the spool is ready and the delivery has listed ``received/``.  Raises OSError when
    the spool cannot be prepared or an address cannot be bound.
    """
    directories = config.directories
    spool = Spool(
        incoming=directories.incoming, received=directories.received, relay=directories.relay
    )
    removed = await trio.to_thread.run_sync(spool.prepare)
    if removed:
        # Never acknowledged, so nobody is owed these; say which, for the record.
        maillog.event("spool-cleanup", removed=len(removed), ids=",".join(removed))

    listeners: list[trio.SocketListener] = []
    try:
        for host, port in config.server.listen:
            listeners.extend(await trio.open_tcp_listeners(port, host=host))
        addresses = [_bound_address(listener) for listener in listeners]
        server = RunningServer(addresses)
        ring, doorbell = trio.open_memory_channel[str | None](DOORBELL_SIZE)
        receiver = Receiver(config, spool, on_queued=functools.partial(_ring, ring))

        async def handle(stream: trio.SocketStream) -> None:
            try:
                peer = stream.socket.getpeername()
            except OSError:
                return  # already gone; serve_listeners closes the stream
            await receiver.handle_connection(stream, (str(peer[0]), int(peer[1])))

        async with trio.open_nursery() as root:
            if handle_signals:
                await root.start(_watch_signals, server, ring)
            if deliver:
                await root.start(run_delivery, config, spool, doorbell)
            async with trio.open_nursery() as handlers:
                accept_scope = trio.CancelScope()
                root.start_soon(_accept, accept_scope, handle, listeners, handlers)
                maillog.event("listening", addresses=" ".join(format_address(a) for a in addresses))
                task_status.started(server)

                await server.wait_shutdown_requested()
                maillog.event(
                    "shutdown",
                    connections=receiver.connections,
                    grace=config.server.shutdown_grace,
                )
                accept_scope.cancel()
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
            # Delivery went on while the connections drained; now it stops too.
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
    *,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            maillog.event("signal", signal=name)
            if signum == signal.SIGUSR1:
                _ring(ring, None)  # rescan received/ now, retry what was deferred
                continue
            server.shutdown()


def _ring(ring: trio.MemorySendChannel[str | None], message: str | None) -> None:
    """Ring the delivery doorbell without ever blocking: the caller is a connection handler or
    the signal task.  A dropped ring (full, or no delivery task) is caught up by a scan."""
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        ring.send_nowait(message)


def _bound_address(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))
