"""The server process: the one root nursery with the listeners, the connection handlers, the
delivery and relay tasks, the signal task and the reloader; the start-up, reload and shutdown
sequences.

Theory of operation.  :func:`run` loads the ``[tls]`` certificate, takes the listening sockets
the init system passed (``LISTEN_FDS``, see :mod:`katerchen.daemon`) and binds every ``[server]
listen``, ``submission`` and ``submissions`` address of a kind that got no passed socket (each
kind of listener hands its connections to the receiver with its
:class:`~katerchen.receiver.Listener`).  With the ports bound it writes the pidfile and, when
started as root with ``[server] user``, makes the spool directories that user's and drops to it
for good -- before any mail is touched.  Only then does it prepare the spool (leftovers of an
earlier run are removed from ``incoming/``: they were never acknowledged), start the relay and
delivery tasks (which have listed their directories when their start returns) and the
listeners, log ``listening``, tell the init system ``READY=1`` and report the bound addresses
through ``task_status.started()``.  Connection handlers run in a nursery of their own inside the
root one, so that shutdown can drain them while the rest of the server -- delivery and the
relay -- goes on.  Each connection gets a session id, bound to its log lines as ``sid=``.

The delivery doorbell is a bounded memory channel: the receiver rings it with the queue id of
every message it commits, the relay with the id of every bounce or delay warning it queues,
SIGUSR1 with None (rescan ``received/`` and retry what was deferred).  The relay has a doorbell
of its own: delivery rings it with the id of every ``relay/<id>`` it writes, SIGUSR1 with None
(retry every deferred recipient now).  Ringing never blocks; a ring that does not fit is
dropped, which only delays that message until the next periodic scan (the directory, not the
channel, is the truth).

Reload -- on SIGHUP, or :meth:`RunningServer.reload` -- runs in one task, one reload at a time:

1. the config file is read again and validated completely (:meth:`Config.from_file`, which
   loads the ``[tls]`` pair too, and :func:`~katerchen.routing.check_postmaster` against the
   domains tree); on any error it is logged (``reload-failed``) and the old config stays;
2. keys that only a restart can change (``[directories]``, ``[server] user``, ``group`` and
   ``pidfile``) keep their old values, logged as ``reload-restart-needed``;
3. the certificate is loaded again (a new pair that does not load fails the reload);
4. listeners the new config adds are bound (a failure fails the reload, and what was bound is
   closed again); then, with nothing left that can fail, the new config takes effect at once:
   the receiver gives it to every new session (open sessions keep the settings and certificate
   they started with), listeners the new config dropped stop accepting (their open connections
   go on), the new ones start accepting;
5. the delivery and relay tasks, which read their settings once, are restarted when their part
   of the config changed: both are made to be cancelled anywhere (a relay attempt cut short is
   made again; its state was not written).

The domains tree, the aliases files and the users file need no reload: they are read again
whenever they change.  The init system hears ``RELOADING=1`` and then ``READY=1`` again.

Shutdown -- on SIGTERM or SIGINT, or :meth:`RunningServer.shutdown` -- is a sequence:

1. stop accepting (the listeners are closed; the init system hears ``STOPPING=1``);
2. sessions idle between transactions get 421 4.3.2 and are closed; sessions inside a transaction
   may finish it, then get 421 4.3.2;
3. after ``[server] shutdown_grace`` seconds the sessions still running are cut: each discards
   its open message and says 421 4.3.2; then whatever still runs is cancelled, which is safe
   because nothing is acknowledged before it is durable in the spool;
4. the delivery and relay tasks, which went on meanwhile, are cancelled: a delivery in progress
   finishes its thread hop, whatever is left in ``received/`` waits for the next start, and a
   relay attempt cut short is made again after the next start (its state was not written);
5. the pidfile is removed and :func:`run` returns.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import dns
import trio
from trio import TaskStatus

from katerchen import daemon, maillog, routing
from katerchen.config import Config, ConfigError, DirectoriesConfig, format_address
from katerchen.delivery import run_delivery
from katerchen.receiver import GOODBYE_TIMEOUT, Listener, Receiver
from katerchen.relay import run_relay
from katerchen.spool import Spool
from katerchen.tlsconfig import CertificateError, ServerTLS

__all__ = ["DOORBELL_SIZE", "RunningServer", "run"]

#: Rings the doorbell holds before it drops them.  The delivery task takes each ring at once
#: (it only queues the id), so this fills only if the task is starved for that many commits.
DOORBELL_SIZE = 1024
#: Reload requests waiting for the reloader; a SIGHUP beyond that is dropped (one that waits
#: reads the file anyway).
RELOAD_QUEUE = 4

#: The ``LISTEN_FDNAMES`` names of passed sockets that are not MX (port 25) listeners.
PASSED_KINDS = {"submission": Listener.SUBMISSION, "submissions": Listener.SUBMISSIONS}

_KINDS = (Listener.MX, Listener.SUBMISSION, Listener.SUBMISSIONS)


@attrs.define(eq=False)
class _ReloadRequest:
    config: Config | None  # None: read the config file again
    done: trio.Event = attrs.field(factory=trio.Event)
    ok: bool = False


@attrs.define(eq=False)
class RunningServer:
    """What :func:`run` hands to ``nursery.start()``: the bound addresses, the config in force,
    and ways to stop and to reload.  The address lists change when a reload adds or removes
    listeners."""

    addresses: list[tuple[str, int]]  # (host, port) per listener, the port resolved
    # The same for the [server] submission and submissions listeners.
    submission_addresses: list[tuple[str, int]] = attrs.field(factory=list)
    submissions_addresses: list[tuple[str, int]] = attrs.field(factory=list)
    tls: ServerTLS | None = None  # the certificate in use, when [tls] is set
    config: Config | None = None  # the config in force
    _shutdown_requested: trio.Event = attrs.field(init=False, factory=trio.Event, repr=False)
    _reloads: trio.MemorySendChannel[_ReloadRequest] | None = attrs.field(
        init=False, default=None, repr=False
    )

    def shutdown(self) -> None:
        """Start the shutdown sequence, as SIGTERM does.  Idempotent; returns at once (``run()``
        returns when the sequence is over)."""
        self._shutdown_requested.set()

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown_requested.is_set()

    async def wait_shutdown_requested(self) -> None:
        await self._shutdown_requested.wait()

    def request_reload(self) -> None:
        """Ask for a reload of the config file, as SIGHUP does; returns at once."""
        if self._reloads is not None:
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                self._reloads.send_nowait(_ReloadRequest(None))

    async def reload(self, config: Config | None = None) -> bool:
        """Reload as SIGHUP does (see the module docstring) and wait until it is done: with
        *config*, put that config in force instead of reading the config file again (a config
        without a file is validated again as it is).  True when the new config is in force;
        False when it was refused (the reason is logged) or the server is shutting down."""
        if self._reloads is None or self.shutdown_requested:
            return False
        request = _ReloadRequest(config)
        try:
            await self._reloads.send(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        await request.done.wait()
        return request.ok


@attrs.define(eq=False)
class _ListenerGroup:
    """The sockets of one configured address (a host name may give several), or those the
    init system passed for one kind, and the task accepting on them."""

    kind: Listener
    address: tuple[str, int] | None  # as configured; None for passed sockets
    listeners: list[trio.SocketListener]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    # The bound (host, port) of each listener, taken while the sockets are open.
    addresses: list[tuple[str, int]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.addresses = [_bound_address(listener) for listener in self.listeners]

    def close(self) -> None:
        for listener in self.listeners:
            listener.socket.close()


_Key = tuple[Listener, tuple[str, int] | None]


@attrs.define(eq=False)
class _Task:
    """A long-lived task that a reload may stop and start again."""

    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def run(
    config: Config,
    *,
    handle_signals: bool = False,
    deliver: bool = True,
    relay: bool = True,
    sockets: Sequence[daemon.PassedSocket] = (),
    notify: daemon.Notifier | None = None,
    pidfile: Path | None = None,
    task_status: TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server for *config* until it is shut down, then return.

    With *handle_signals* (the CLI; only possible in the main thread), SIGTERM and SIGINT start
    the shutdown, SIGUSR1 rings the delivery and relay doorbells and SIGHUP reloads.
    With ``deliver=False`` no delivery task runs and ``received/`` is left alone (for tests of
    the receiving side that look at the spool files); with ``relay=False`` no relay task runs
    and ``relay/`` is left alone (tests of delivery that look at relay copies).
    *sockets* are listening sockets passed by the init system (:func:`katerchen.daemon.listen_fds`):
    one named ``submission`` or ``submissions`` serves that kind, any other name port 25; a kind
    with passed sockets does not bind its configured addresses.  *notify* tells the init system
    about readiness, reloads and the shutdown.  *pidfile* overrides ``[server] pidfile``.
    Reports a :class:`RunningServer` through *task_status* once every listener is bound, the
    spool is ready and the delivery and the relay have listed their directories.  Raises
    OSError when the spool cannot be prepared, the ``[tls]`` files cannot be loaded, an address
    cannot be bound, a passed socket cannot be used, the pidfile cannot be written or the
    privileges cannot be dropped.
    """
    if pidfile is None:
        pidfile = config.server.pidfile
    groups: dict[_Key, _ListenerGroup] = {}
    server: RunningServer | None = None
    reloads, reload_requests = trio.open_memory_channel[_ReloadRequest](RELOAD_QUEUE)
    wrote_pidfile = False
    adopted = False
    try:
        identity = _identity(config)
        tls: ServerTLS | None = None
        if config.tls is not None:
            try:
                tls = await trio.to_thread.run_sync(
                    ServerTLS.load, config.tls.certificate, config.tls.key
                )
            except CertificateError as exc:  # changed since the config was checked
                raise OSError(f"[tls] {exc.which}: {exc.message}") from None
        passed = _adopt(sockets, tls)
        adopted = True  # the sockets are closed with the listener groups from now on
        for kind in _KINDS:
            if kind in passed:
                groups[(kind, None)] = _ListenerGroup(kind, None, passed[kind])
                _log_passed(kind, passed[kind], _configured(config, kind))
            else:
                for address in _configured(config, kind):
                    groups[(kind, address)] = _ListenerGroup(kind, address, await _bind(address))
        if pidfile is not None:
            await trio.to_thread.run_sync(daemon.write_pidfile, pidfile)
            wrote_pidfile = True
        if identity is not None:
            await _drop_privileges(config, identity)

        directories = config.directories
        spool = Spool(
            incoming=directories.incoming, received=directories.received, relay=directories.relay
        )
        removed = await trio.to_thread.run_sync(spool.prepare)
        if removed:
            # Never acknowledged, so nobody is owed these; say which, for the record.
            maillog.event("spool-cleanup", removed=len(removed), ids=",".join(removed))

        ring, doorbell = trio.open_memory_channel[str | None](DOORBELL_SIZE)
        relay_ring, relay_doorbell = trio.open_memory_channel[str | None](DOORBELL_SIZE)
        if not relay:
            relay_doorbell.close()  # rings are then dropped at once
        receiver = Receiver(config, spool, on_queued=functools.partial(_ring, ring), tls=tls)
        server = RunningServer([], tls=tls, config=config)
        server._reloads = reloads
        state = _State(
            config=config,
            server=server,
            receiver=receiver,
            spool=spool,
            tls=tls,
            groups=groups,
            passed=frozenset(passed),
            ring=ring,
            doorbell=doorbell,
            relay_ring=relay_ring,
            relay_doorbell=relay_doorbell,
            notifier=notify,
        )
        state.update_addresses()

        async with trio.open_nursery() as root:
            state.root = root
            if handle_signals:
                await root.start(_watch_signals, server, ring, relay_ring)
            if relay:
                state.relay_task = await state.start_relay(config)
            if deliver:
                state.delivery_task = await state.start_delivery(config)
            async with trio.open_nursery() as handlers:
                state.handlers = handlers
                for group in groups.values():
                    state.accept(group)
                root.start_soon(state.serve_reloads, reload_requests)
                maillog.event("listening", **state.listening())
                state.notify("READY=1", state.status())
                task_status.started(server)

                await server.wait_shutdown_requested()
                state.notify("STOPPING=1")
                maillog.event(
                    "shutdown",
                    connections=receiver.connections,
                    grace=state.config.server.shutdown_grace,
                )
                for group in groups.values():
                    group.scope.cancel()
                receiver.drain()
                with trio.move_on_after(state.config.server.shutdown_grace) as grace:
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
        for group in groups.values():
            group.close()
        if not adopted:  # the start failed before it took the passed sockets
            for passed_socket in sockets:
                passed_socket.socket.close()
        if server is not None:
            server._reloads = None
        reloads.close()
        _release_waiting(reload_requests)
        if wrote_pidfile and pidfile is not None:
            _remove_pidfile(pidfile)
    maillog.event("stopped")


@attrs.define(eq=False)
class _State:
    """What the running server is made of, for the reloader and the shutdown."""

    config: Config  # in force
    server: RunningServer
    receiver: Receiver
    spool: Spool
    tls: ServerTLS | None
    groups: dict[_Key, _ListenerGroup]  # the listeners accepting now, in config order
    passed: frozenset[Listener]  # kinds served by sockets from the init system
    ring: trio.MemorySendChannel[str | None]
    doorbell: trio.MemoryReceiveChannel[str | None]
    relay_ring: trio.MemorySendChannel[str | None]
    relay_doorbell: trio.MemoryReceiveChannel[str | None]
    notifier: daemon.Notifier | None
    root: trio.Nursery | None = None
    handlers: trio.Nursery | None = None
    delivery_task: _Task | None = None
    relay_task: _Task | None = None

    # --- connections ---

    def accept(self, group: _ListenerGroup) -> None:
        assert self.root is not None and self.handlers is not None
        handle = functools.partial(self.handle, group.kind)
        self.root.start_soon(_accept, group, handle, self.handlers)

    async def handle(self, kind: Listener, stream: trio.SocketStream) -> None:
        # Every line of this connection's task (and its worker threads) carries it.
        maillog.bind(sid=_session_id())
        try:
            peer = stream.socket.getpeername()
        except OSError:
            return  # already gone; serve_listeners closes the stream
        await self.receiver.handle_connection(stream, (str(peer[0]), int(peer[1])), kind)

    def update_addresses(self) -> None:
        server = self.server
        by_kind: dict[Listener, list[tuple[str, int]]] = {kind: [] for kind in _KINDS}
        for group in self.groups.values():
            by_kind[group.kind].extend(group.addresses)
        # In place: whoever holds the lists sees the change.
        server.addresses[:] = by_kind[Listener.MX]
        server.submission_addresses[:] = by_kind[Listener.SUBMISSION]
        server.submissions_addresses[:] = by_kind[Listener.SUBMISSIONS]

    def listening(self) -> dict[str, str]:
        server = self.server
        listening = {
            "addresses": server.addresses,
            "submission": server.submission_addresses,
            "submissions": server.submissions_addresses,
        }
        return {k: " ".join(map(format_address, v)) for k, v in listening.items() if v}

    def status(self) -> str:
        where = " ".join(map(format_address, self.server.addresses)) or "passed sockets"
        return f"STATUS=accepting mail on {where}"

    def notify(self, *assignments: str) -> None:
        if self.notifier is None:
            return
        try:
            self.notifier.notify(*assignments)
        except OSError as exc:
            maillog.warning("notify-failed", state=assignments[0], error=exc.strerror or exc)

    # --- delivery and relay ---

    async def start_delivery(self, config: Config) -> _Task:
        assert self.root is not None
        on_relay = functools.partial(_ring, self.relay_ring)
        task = functools.partial(run_delivery, config, self.spool, self.doorbell, on_relay=on_relay)
        return await _start_task(self.root, task)

    async def start_relay(self, config: Config) -> _Task:
        assert self.root is not None
        on_bounce = functools.partial(_ring, self.ring)
        task = functools.partial(
            run_relay, config, self.spool, self.relay_doorbell, on_bounce=on_bounce
        )
        return await _start_task(self.root, task)

    # --- reloads ---

    async def serve_reloads(self, requests: trio.MemoryReceiveChannel[_ReloadRequest]) -> None:
        async for request in requests:
            try:
                if not self.server.shutdown_requested:
                    request.ok = await self.reload(request.config)
            except Exception:
                # A bug: the server goes on with what is in force, the reload is refused.
                maillog.logger.exception("internal-error op=reload")
            finally:
                request.done.set()

    async def reload(self, replacement: Config | None) -> bool:
        source = self.config.source if replacement is None else None
        maillog.event("reload", config=source if source is not None else "in-memory")
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return await self._reload(replacement)
        finally:
            if not self.server.shutdown_requested:
                self.notify("READY=1", self.status())

    async def _reload(self, replacement: Config | None) -> bool:
        old = self.config
        try:
            new = await trio.to_thread.run_sync(_load_checked, old, replacement)
        except ConfigError as exc:
            _reload_failed(str(exc))
            return False
        except OSError as exc:  # the domains tree could not be read
            _reload_failed(f"{exc.strerror or exc} ({exc.filename})")
            return False
        new, fixed = _keep_fixed(old, new)
        if fixed:
            maillog.warning(
                "reload-restart-needed",
                keys=",".join(fixed),
                note="these keys change only with a restart: the old values stay",
            )
        if new.tls is None and self.passed - {Listener.MX}:
            _reload_failed("the init system passed submission sockets: [tls] is needed")
            return False

        tls = self.tls
        if new.tls is None:
            tls = None
        elif tls is not None and (tls.certificate, tls.key) == (new.tls.certificate, new.tls.key):
            await tls.reload("sighup")  # a pair that does not load keeps the old one (logged)
        else:
            try:
                tls = await trio.to_thread.run_sync(
                    ServerTLS.load, new.tls.certificate, new.tls.key
                )
            except CertificateError as exc:
                _reload_failed(f"[tls] {exc.which}: {exc.message}")
                return False

        wanted: list[_Key] = []
        for kind in _KINDS:
            if kind in self.passed:
                wanted.append((kind, None))
                if _configured(new, kind) != _configured(old, kind):
                    maillog.warning(
                        "reload-ignored",
                        key=f"[server] {kind.value}",
                        note="served by sockets from the init system: change the socket unit",
                    )
            else:
                wanted.extend((kind, address) for address in _configured(new, kind))
        added: dict[_Key, _ListenerGroup] = {}
        for key in wanted:
            kind, address = key
            if key in self.groups or address is None:
                continue
            try:
                added[key] = _ListenerGroup(kind, address, await _bind(address))
            except OSError as exc:
                for group in added.values():
                    group.close()
                reason = exc.strerror or str(exc)
                _reload_failed(f"cannot listen on {format_address(address)}: {reason}")
                return False
        if self.server.shutdown_requested:
            for group in added.values():
                group.close()
            return False

        # From here on nothing can fail: the new config takes effect.
        self.config = new
        self.tls = tls
        self.server.config = new
        self.server.tls = tls
        self.receiver.reconfigure(new, tls)
        removed = [group for key, group in self.groups.items() if key not in wanted]
        for group in removed:
            group.scope.cancel()  # its connections go on in the handlers nursery
        groups = {key: self.groups.get(key) or added[key] for key in wanted}
        self.groups.clear()
        self.groups.update(groups)
        for group in added.values():
            self.accept(group)
        self.update_addresses()
        for group in removed:
            await group.done.wait()  # closed: a connection attempt is refused from now on
            group.close()

        restarted = []
        if self.delivery_task is not None and _delivery_part(old) != _delivery_part(new):
            await self.delivery_task.stop()
            self.delivery_task = await self.start_delivery(new)
            restarted.append("delivery")
        if self.relay_task is not None and _relay_part(old) != _relay_part(new):
            await self.relay_task.stop()
            self.relay_task = await self.start_relay(new)
            restarted.append("relay")
        fields: dict[str, object] = dict(self.listening())
        if added:
            fields["opened"] = " ".join(
                format_address(a) for group in added.values() for a in group.addresses
            )
        if removed:
            fields["closed"] = " ".join(
                format_address(a) for group in removed for a in group.addresses
            )
        if restarted:
            fields["restarted"] = ",".join(restarted)
        maillog.event("reloaded", **fields)
        return True


# --- start-up ---------------------------------------------------------------------------------


def _configured(config: Config, kind: Listener) -> tuple[tuple[str, int], ...]:
    server = config.server
    if kind is Listener.MX:
        return server.listen
    return server.submission if kind is Listener.SUBMISSION else server.submissions


async def _bind(address: tuple[str, int]) -> list[trio.SocketListener]:
    host, port = address
    return await trio.open_tcp_listeners(port, host=host)


def _adopt(
    sockets: Sequence[daemon.PassedSocket], tls: ServerTLS | None
) -> dict[Listener, list[trio.SocketListener]]:
    """The passed *sockets* as listeners, by kind.  Raises OSError for one that cannot serve
    (and closes them all: nobody else would)."""
    try:
        return _adopt_all(sockets, tls)
    except BaseException:
        for passed in sockets:
            passed.socket.close()
        raise


def _adopt_all(
    sockets: Sequence[daemon.PassedSocket], tls: ServerTLS | None
) -> dict[Listener, list[trio.SocketListener]]:
    adopted: dict[Listener, list[trio.SocketListener]] = {}
    for passed in sockets:
        kind = PASSED_KINDS.get(passed.name, Listener.MX)
        if kind is not Listener.MX and tls is None:
            raise OSError(
                errno.EINVAL,
                f"the init system passed a {passed.name} socket (fd {passed.fd}), "
                "but [tls] is not set",
            )
        try:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(passed.socket))
        except ValueError as exc:
            raise OSError(errno.EINVAL, f"passed socket fd {passed.fd}: {exc}") from None
        adopted.setdefault(kind, []).append(listener)
    return adopted


def _log_passed(
    kind: Listener, listeners: list[trio.SocketListener], ignored: tuple[tuple[str, int], ...]
) -> None:
    fields: dict[str, object] = {
        "kind": kind.value,
        "addresses": " ".join(format_address(_bound_address(x)) for x in listeners),
        "fds": ",".join(str(x.socket.fileno()) for x in listeners),
    }
    if ignored:
        fields["ignored"] = " ".join(map(format_address, ignored))
        fields["note"] = f"[server] {kind.value} is not bound: the init system passed sockets"
    maillog.event("listen-passed", **fields)


def _identity(config: Config) -> daemon.Identity | None:
    """Whom to drop to after binding; None when there is nothing to drop.  Raises OSError when
    the user is gone, or the server runs as somebody else than root and that user."""
    user = config.server.user
    if not user:
        return None
    try:
        identity = daemon.lookup_identity(user, config.server.group)
    except LookupError as exc:
        raise OSError(errno.EINVAL, str(exc)) from None
    euid = os.geteuid()
    if euid == 0:
        return identity if identity.uid != 0 else None
    if euid == identity.uid:
        return None  # started as that user already (e.g. User= in a systemd unit)
    raise OSError(
        errno.EPERM,
        f"[server] user = {user!r}: only root can switch to it (running as uid {euid})",
    )


async def _drop_privileges(config: Config, identity: daemon.Identity) -> None:
    """As root, with the ports bound: give the spool to *identity*, then become it."""
    directories = config.directories
    prepare = functools.partial(
        daemon.prepare_ownership,
        identity,
        spool=[
            directories.incoming,
            directories.received,
            directories.relay,
            directories.hold,
        ],
        create=[directories.domains],
        files=[config.auth.users_file],
    )
    changed = await trio.to_thread.run_sync(prepare)
    if changed:
        shown = ",".join(str(path) for path in changed[:5])
        if len(changed) > 5:
            shown += f",+{len(changed) - 5}-more"
        maillog.event("ownership", user=identity.user, changed=len(changed), paths=shown)
    daemon.drop_privileges(identity)
    maillog.event(
        "privileges",
        user=identity.user,
        uid=identity.uid,
        gid=identity.gid,
        groups=",".join(map(str, identity.groups)),
    )
    # Modules imported later (dnspython loads DNS record types on first use) must be readable
    # by the user: a Python installed under root's home would fail only then, and obscurely.
    unreadable = [d for d in _module_directories() if not os.access(d, os.R_OK | os.X_OK)]
    if unreadable:
        maillog.warning(
            "python-not-readable",
            user=identity.user,
            paths=",".join(unreadable),
            note="modules loaded later will fail to import: install Python where the user "
            "can read it",
        )
    if not os.access(directories.domains, os.W_OK | os.X_OK):
        maillog.warning(
            "domains-not-writable",
            domains=directories.domains,
            user=identity.user,
            note="mailboxes must be writable by [server] user: deliveries will be deferred",
        )


def _module_directories() -> list[str]:
    """Where the standard library, katerchen and its dependencies were imported from."""
    modules = (os, daemon, trio, attrs, dns)
    return sorted(
        {os.path.dirname(os.path.dirname(os.path.abspath(m.__file__ or ""))) for m in modules}
    )


def _remove_pidfile(path: Path) -> None:
    try:
        daemon.remove_pidfile(path)
    except OSError as exc:
        # After dropping privileges the directory (e.g. /run) may be root's.
        maillog.warning(
            "pidfile-not-removed", pidfile=path, error=exc.strerror or exc, user=os.geteuid()
        )


# --- reloads ----------------------------------------------------------------------------------


def _load_checked(current: Config, replacement: Config | None) -> Config:
    """BLOCKING.  The config a reload puts in force, validated.  Raises ConfigError."""
    if replacement is not None:
        new = replacement
    elif current.source is not None:
        new = Config.from_file(current.source)
    else:
        new = current  # nothing to read: the domains tree and the certificate may have changed
    routing.check_postmaster(new)
    return new


def _keep_fixed(old: Config, new: Config) -> tuple[Config, list[str]]:
    """*new* with the keys only a restart can change set back to *old*'s, and those keys."""
    changed = [
        f"[directories] {name}"
        for name in attrs.fields_dict(DirectoriesConfig)
        if getattr(old.directories, name) != getattr(new.directories, name)
    ]
    changed += [
        f"[server] {name}"
        for name in ("user", "group", "pidfile")
        if getattr(old.server, name) != getattr(new.server, name)
    ]
    if changed:
        server = attrs.evolve(
            new.server, user=old.server.user, group=old.server.group, pidfile=old.server.pidfile
        )
        new = attrs.evolve(new, directories=old.directories, server=server)
    return new, changed


def _delivery_part(config: Config) -> object:
    """What the delivery task reads from the config (it reads it once, at its start)."""
    return (config.delivery, config.server.hostname)


def _relay_part(config: Config) -> object:
    """What the relay task reads from the config (it reads it once, at its start)."""
    return (config.relay, config.dns, config.server.hostname, config.delivery.scan_interval)


def _reload_failed(error: str) -> None:
    maillog.error("reload-failed", error=error, note="the old config stays in force")


def _release_waiting(requests: trio.MemoryReceiveChannel[_ReloadRequest]) -> None:
    """At the end: nobody is left to answer the reload requests still queued."""
    while True:
        try:
            request = requests.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        request.done.set()


# --- tasks ------------------------------------------------------------------------------------


async def _start_task(nursery: trio.Nursery, start: Callable[..., Awaitable[None]]) -> _Task:
    """``nursery.start(start)``, in a cancel scope of its own that :meth:`_Task.stop` uses."""
    handle = _Task()

    async def task(*, task_status: TaskStatus[None]) -> None:
        try:
            with handle.scope:
                await start(task_status=task_status)
        finally:
            handle.done.set()

    await nursery.start(task)
    return handle


async def _accept(
    group: _ListenerGroup,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    handlers: trio.Nursery,
) -> None:
    try:
        with group.scope:
            await trio.serve_listeners(handle, group.listeners, handler_nursery=handlers)
    finally:
        group.done.set()


async def _watch_signals(
    server: RunningServer,
    ring: trio.MemorySendChannel[str | None],
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
                server.request_reload()
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


_session_ids = random.Random()


def _session_id() -> str:
    """A session id for the log: 12 hex digits, random (no system call per connection)."""
    return f"{_session_ids.getrandbits(48):012x}"
