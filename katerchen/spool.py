"""The spool trees incoming/, received/ and relay/: queue ids, and writing a message durably.

A message is written to ``incoming/<id>`` and, once complete, fsynced and renamed into
``received/<id>``, and then ``received/`` itself is fsynced. A rename within one file system is
atomic, so ``received/`` only ever holds complete messages; the directory fsync makes the rename
survive a crash, so a message is in ``received/`` for good before the server answers 250.
``incoming/`` only holds messages that were never acknowledged, and :meth:`Spool.prepare`
removes them at start. The file layout is described in ``docs/spool-format.md``.

The delivery side lists ``received/`` (:meth:`Spool.list_received`), removes a message once it
is delivered (:meth:`Spool.remove_received`), and writes the files it creates -- relay copies,
bounces -- with :func:`write_file`: fsync, then a hard link under a deterministic name, so a
repeat of the same step after a crash finds the file there instead of making a second one.

Methods marked BLOCKING touch the disk and belong in ``trio.to_thread.run_sync``. Small messages
stay in memory until :meth:`IncomingMessage.commit`, so receiving one costs a single thread hop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs

__all__ = [
    "FLUSH_THRESHOLD",
    "QUEUE_ID_LENGTH",
    "IncomingMessage",
    "Spool",
    "fsync_directory",
    "is_queue_id",
    "new_queue_id",
    "write_file",
]

#: Bytes held in memory before :meth:`IncomingMessage.feed` asks for a flush to disk.
FLUSH_THRESHOLD: Final = 256 * 1024

#: Queue ids are 14 hex digits of microseconds since the epoch (enough until the year 4253)
#: and 6 random hex digits: 20 characters, all lowercase, so they sort the same everywhere and
#: stay distinct on case-insensitive file systems.
QUEUE_ID_LENGTH: Final = 20

_id_lock = threading.Lock()
_last_micros = 0
# Not a secret: the random part only separates ids of two processes in the same microsecond.
# A seeded PRNG costs no syscall per message, unlike os.urandom.
_rng = random.Random()

_FILE_MODE: Final = 0o640
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_MAX_QUEUE_ID: Final = 64  # the envelope's limit (docs/spool-format.md)


def new_queue_id() -> str:
    """A new queue id: unique across restarts, sorting by arrival, ``[0-9a-f]``, 20 characters.

    Within a process ids strictly increase even if the clock stands still or goes back (the
    time part is then the last one plus one microsecond).
    """
    global _last_micros
    with _id_lock:
        micros = time.time_ns() // 1000
        if micros <= _last_micros:
            micros = _last_micros + 1
        _last_micros = micros
        suffix = _rng.getrandbits(24)
    return f"{micros:014x}{suffix:06x}"


def is_queue_id(name: str) -> bool:
    """Whether *name* can be a queue id (and so a spool file name): 1 to 64 of ``[0-9A-Za-z]``.

    Anything else found in a spool directory (an editor's ``.swp``, a ``tmp`` file an
    administrator left) is not a message and is never read or removed.
    """
    return 0 < len(name) <= _MAX_QUEUE_ID and name.isascii() and name.isalnum()


def write_file(tmp_dir: Path, final_dir: Path, name: str, chunks: Iterable[bytes]) -> bool:
    """BLOCKING. Write a new file ``final_dir/<name>`` durably, under a deterministic name.

    The *chunks* are written to ``tmp_dir/<name>.<random>``, fsynced, and hard-linked to
    ``final_dir/<name>``; the temporary name is removed and ``final_dir`` fsynced.  A link,
    unlike a rename, never replaces an existing file: when ``final_dir/<name>`` exists already
    (an earlier attempt got that far before a crash), nothing changes and False is returned.
    True means the file was written now.

    *tmp_dir* must be on the file system of *final_dir* (``incoming/`` is: it is emptied at
    every start, so a temporary file left by a crash goes away).  Raises OSError (nothing is
    left in *tmp_dir* then); an error from *chunks* propagates the same way.
    """
    temporary = tmp_dir / f"{name}.{_rng.getrandbits(48):012x}"
    fd = os.open(temporary, _CREATE_FLAGS, _FILE_MODE)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, final_dir / name)
        except FileExistsError:
            return False
    finally:
        _unlink_quietly(temporary)
    fsync_directory(final_dir)
    return True


def fsync_directory(path: Path) -> None:
    """BLOCKING: make a rename or unlink in *path* durable (fsync of the directory itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define
class Spool:
    """The three spool directories. They must be on one file system (renames must be atomic)."""

    incoming: Path
    received: Path
    relay: Path

    def prepare(self) -> list[str]:
        """BLOCKING. Create the directories (and their parents) and empty ``incoming/``.

        Everything in ``incoming/`` that is not a directory is a message that was never
        acknowledged; it is removed and its name returned (sorted), for the log. Raises OSError
        when a directory cannot be created, or when ``incoming/`` and ``received/`` are on
        different file systems (EXDEV: the commit rename could never succeed).
        """
        for directory in (self.incoming, self.received, self.relay):
            directory.mkdir(parents=True, exist_ok=True)
        if os.stat(self.incoming).st_dev != os.stat(self.received).st_dev:
            raise OSError(
                errno.EXDEV,
                "the incoming and received spool directories must be on one file system",
            )
        removed = []
        with os.scandir(self.incoming) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    continue  # never created by katerchen: leave it to the administrator
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed.append(entry.name)
        return sorted(removed)

    def free_bytes(self) -> int:
        """BLOCKING. Bytes available to unprivileged users on the file system of ``received/``."""
        stat = os.statvfs(self.received)
        return stat.f_bavail * stat.f_frsize

    def list_received(self) -> list[str]:
        """BLOCKING. The queue ids of the messages in ``received/``, sorted (= arrival order).

        Only names that are queue ids (:func:`is_queue_id`) and not directories count.
        Raises OSError when ``received/`` cannot be listed.
        """
        with os.scandir(self.received) as entries:
            ids = [
                entry.name
                for entry in entries
                if is_queue_id(entry.name) and not entry.is_dir(follow_symlinks=False)
            ]
        ids.sort()
        return ids

    def remove_received(self, queue_id: str) -> None:
        """BLOCKING. Remove ``received/<id>`` -- its delivery is complete -- and fsync
        ``received/``, so a restart does not deliver it again.  A file that is gone already
        counts as removed.  Raises OSError; ValueError for a name that is not a queue id.
        """
        if not is_queue_id(queue_id):
            raise ValueError("not a queue id")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.received / queue_id)
        fsync_directory(self.received)

    def open_message(self, queue_id: str, header: bytes) -> IncomingMessage:
        """Start a message: ``header`` (pre-header and Received header) goes first in the file.

        Not blocking: nothing touches the disk until :meth:`IncomingMessage.flush` or
        :meth:`IncomingMessage.commit`. ``queue_id`` should come from :func:`new_queue_id`.
        """
        if not queue_id.isalnum() or not queue_id.isascii():
            raise ValueError("queue id must be [0-9A-Za-z]")
        message = IncomingMessage(
            queue_id=queue_id,
            incoming_path=self.incoming / queue_id,
            received_dir=self.received,
        )
        message.feed(header)
        return message


@attrs.define
class IncomingMessage:
    """A message being received: buffered in memory, streamed to ``incoming/<id>`` when large.

    Life cycle: any number of :meth:`feed` (and :meth:`flush` when feed asks for it), then one
    :meth:`commit`, or :meth:`discard` at any time (idempotent, also after a commit).

    A failed :meth:`flush` re-raises its OSError after removing the file; the message is then
    *failed*: :meth:`feed` drops what it gets (so the caller can read the client's data to its
    end without special cases), :meth:`flush` does nothing, and :meth:`commit` raises the
    OSError again, which the server answers with 451. After any OSError nothing of the message
    is left on disk.
    """

    queue_id: str
    _incoming_path: Path
    _received_dir: Path
    _pieces: list[bytes] = attrs.field(factory=list)
    _buffered: int = 0
    _fd: int | None = None
    _created: bool = False
    _finished: bool = False
    _error: OSError | None = None

    @property
    def incoming_path(self) -> Path:
        """Where the message is written while it is received."""
        return self._incoming_path

    @property
    def received_path(self) -> Path:
        """Where :meth:`commit` puts the message."""
        return self._received_dir / self.queue_id

    def feed(self, data: bytes) -> bool:
        """Append ``data`` in memory (no syscall).

        Returns True when the buffer holds at least :data:`FLUSH_THRESHOLD` bytes: the caller
        should then run :meth:`flush` in a worker thread before feeding much more. Raises
        RuntimeError after :meth:`commit` or :meth:`discard`.
        """
        if self._finished:
            raise RuntimeError("message already committed or discarded")
        if data and self._error is None:
            self._pieces.append(data)
            self._buffered += len(data)
        return self._buffered >= FLUSH_THRESHOLD

    def flush(self) -> None:
        """BLOCKING. Create ``incoming/<id>`` (exclusively) if needed and write the buffer to it.

        On OSError the file is removed and the error re-raised; the message is failed (see the
        class docstring). Raises RuntimeError after :meth:`commit` or :meth:`discard`.
        """
        if self._finished:
            raise RuntimeError("message already committed or discarded")
        if self._error is not None:
            return
        try:
            self._write_buffer()
        except OSError as error:
            self._error = error
            self._cleanup()
            raise

    def _write_buffer(self) -> None:
        if self._fd is None:
            self._fd = os.open(self._incoming_path, _CREATE_FLAGS, _FILE_MODE)
            self._created = True
        if not self._pieces:
            return
        # One join and one write: os.writev would save the copy but is limited to IOV_MAX pieces.
        data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        self._buffered = 0
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def commit(self) -> Path:
        """BLOCKING, one thread hop: make the message durable in ``received/``; return its path.

        Writes what is buffered, fsyncs and closes the file, renames it into ``received/`` and
        fsyncs that directory. Only after this returns may the server answer 250.

        On OSError nothing of the message is left in ``incoming/`` or ``received/`` and the
        error is raised (the server answers 451); a message that failed in :meth:`flush` raises
        that error here. If only the final directory fsync failed, the renamed file is removed
        again: the message was not acknowledged, so the client will retry, and delivering it
        twice is better than keeping a file whose durability is unknown. Raises RuntimeError
        after a previous commit or :meth:`discard`.
        """
        if self._finished:
            raise RuntimeError("message already committed or discarded")
        if self._error is not None:
            self._finished = True
            raise self._error
        renamed = False
        try:
            self._write_buffer()
            assert self._fd is not None
            os.fsync(self._fd)
            fd, self._fd = self._fd, None
            os.close(fd)
            os.rename(self._incoming_path, self.received_path)
            renamed = True
            self._created = False  # incoming/<id> is gone; never unlink that name again
            fsync_directory(self._received_dir)
        except BaseException:
            # BaseException too: a KeyboardInterrupt here must not leave a half-committed file.
            self._cleanup()
            if renamed:
                _unlink_quietly(self.received_path)
            self._finished = True
            raise
        self._finished = True
        return self.received_path

    def discard(self) -> None:
        """BLOCKING (one unlink at most). Drop the message; idempotent, never raises OSError.

        After a successful :meth:`commit` it does nothing: the message in ``received/`` stays.
        """
        self._cleanup()
        self._finished = True

    def _cleanup(self) -> None:
        self._pieces.clear()
        self._buffered = 0
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._created:
            # Only a file this message created (O_EXCL) is ever removed, never one of the same
            # name that belongs to somebody else.
            self._created = False
            _unlink_quietly(self._incoming_path)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
