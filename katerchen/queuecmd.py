"""The ``katerchen queue`` commands: list, show, delete, hold and release the messages in the
spool, and flush (wake the running server); both the command line and the functions behind it.

Theory of operation.  The commands work on the spool directories themselves, with or without a
server running on them, so they must never break a file the server is using.  They never write
into a message or a relay state file: they read, rename and unlink, each of which is atomic.

* A queue id from the command line is checked with :func:`katerchen.spool.is_queue_id` before
  any path is built from it, and files are opened with ``O_NOFOLLOW``: an untrusted string never
  becomes anything but one file name in a spool directory.
* ``hold`` renames ``received/<id>`` to ``<hold>/received/<id>`` and ``relay/<id>`` (then its
  ``<id>.state``) to ``<hold>/relay/``; the subdirectory records where a held message came from,
  so ``release`` renames it back there.  Delivery and relay list only their own directories, so
  they never see a held message.  The relay message moves before its state and comes back after
  it: the relayer must never find a message without its state (it would take every recipient for
  pending and send again to those it has sent to).  A state the relayer wrote into ``relay/``
  after the hold (it was busy with the message at that moment) is newer than the held one, so
  ``release`` keeps it.
* ``delete`` unlinks; for ``relay/`` the message first, then its state (a state without its
  message is ignored by the relayer; the reverse would resend).
* A destination that exists is never replaced (a rename would silently do so).

A command that races the server can only be too late, never corrupt: a message the delivery has
already opened is delivered even if it is deleted or held at that moment (``hold`` may then hold
a message whose delivery had partly happened; releasing it completes it, and Maildir copies are
never made twice).  A relay attempt in flight at a ``hold`` or ``delete`` may be repeated after
``release``.

``flush`` sends SIGUSR1 to the pid in the server's pidfile: the server rescans ``received/`` and
``relay/`` and retries everything that waits.  Before it signals, it checks (where ``/proc``
exists) that the process started before the pidfile was written: a pid from a stale pidfile
that the system has since given to another process is refused (SIGUSR1 would kill most
programs).

Exit status of every command: 0 done, 1 not found (no such message, no pidfile, no such
process) or an I/O error, 2 usage and config errors (including an argument that is not a queue
id).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, Literal, TextIO

import attrs

from katerchen.config import Config, ConfigError, DirectoriesConfig
from katerchen.envelope import Envelope, EnvelopeError
from katerchen.spool import fsync_directory, is_queue_id

__all__ = [
    "JSON_FORMAT",
    "STATE_SUFFIX",
    "FlushError",
    "NotFound",
    "QueueEntry",
    "RecipientState",
    "add_parser",
    "delete",
    "entry_json",
    "find",
    "flush",
    "hold",
    "list_queue",
    "read_headers",
    "release",
    "run",
]

#: The relay state sidecar of ``relay/<id>`` is ``relay/<id>.state`` (= relay.STATE_SUFFIX, not
#: imported from there: the relayer's module is large and hold, release and delete need only
#: this name).
STATE_SUFFIX: Final = ".state"
#: What ``queue list --json`` and ``queue show --json`` say they are.
JSON_FORMAT: Final = "katerchen-queue"
JSON_VERSION: Final = 1

#: The most read while looking for the end of an envelope pre-header (delivery's own bound).
MAX_PRE_HEADER: Final = 16 * 1024 * 1024
#: The most of a message's header block ``show`` prints.
MAX_HEADER_BYTES: Final = 256 * 1024
#: The largest relay state file read (a state of 1000 recipients is about 250 KiB).
MAX_STATE_BYTES: Final = 16 * 1024 * 1024
_READ_CHUNK: Final = 64 * 1024

#: The spool directories a message can be in (besides the hold directory).
Origin = Literal["received", "relay"]
_ORIGINS: Final[tuple[Origin, ...]] = ("received", "relay")


class NotFound(Exception):
    """No message with that queue id where the command looked."""


class FlushError(Exception):
    """The server cannot be signalled: no pidfile, no such process, a stale pidfile."""


@attrs.frozen
class RecipientState:
    """One recipient of a queued message.  ``status`` is ``"pending"``, ``"sent"`` or
    ``"failed"`` for relay messages (from their state file; no file: all pending), ``"queued"``
    for messages waiting in ``received/``, ``"unknown"`` when the state file cannot be read."""

    to: str
    status: str
    attempts: int = 0
    next_attempt: float | None = None  # unix time
    last_attempt: float | None = None
    reply: str | None = None


@attrs.frozen
class QueueEntry:
    """One message file in the spool, as ``queue list`` shows it.

    ``queue`` is the directory it is in: ``"received"``, ``"relay"`` or ``"hold"``; ``origin`` is
    the queue it belongs to (for a held message, where ``release`` puts it back).  ``state``:

    - ``"received"``: in ``received/``, waiting for delivery;
    - ``"deferred?"``: in ``received/`` for longer than ``[delivery] scan_interval``, so a
      running server has tried it and deferred it (the delivery keeps its retry times in
      memory: a guess, hence the question mark);
    - ``"relay"``: in ``relay/``, not tried yet; ``"deferred"``: tried, some recipients still
      pending (``next_attempt`` is the earliest retry); ``"done"``: every recipient sent or
      failed, the relayer is removing it;
    - ``"held"``: in the hold directory;
    - ``"undecodable"``: the envelope does not decode (``error`` says why); the server leaves
      such a file alone, and so do these commands except ``delete``.

    ``size`` is the message's size in bytes (our Received header and what the client sent),
    or the file's size when it does not decode.  ``arrival`` and ``sender`` (``""`` for ``<>``)
    are None then.
    """

    queue_id: str
    queue: str
    origin: Origin
    path: Path
    state: str
    size: int
    arrival: float | None
    sender: str | None
    recipients: tuple[RecipientState, ...]
    next_attempt: float | None = None
    envelope: Envelope | None = attrs.field(default=None, repr=False)
    offset: int = 0  # where the message starts in the file
    error: str | None = None


# --- where the files are -------------------------------------------------------------------------


def _queue_dir(directories: DirectoriesConfig, origin: Origin, *, held: bool) -> Path:
    if held:
        return directories.hold / origin
    return directories.received if origin == "received" else directories.relay


def _check_id(queue_id: str) -> None:
    if not is_queue_id(queue_id):
        raise ValueError("not a queue id (1 to 64 letters and digits)")


def _is_file(path: Path) -> bool:
    """A regular file, not followed if it is a symbolic link.  Raises OSError but ENOENT."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _rename(source: Path, target: Path) -> None:
    """Rename *source* to *target*, never replacing a file there.  Raises OSError
    (FileExistsError when *target* exists, FileNotFoundError when *source* is gone)."""
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "already exists", str(target))
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise OSError(
                errno.EXDEV,
                "the hold directory must be on the file system of received/ and relay/",
                str(target),
            ) from None
        raise


# --- reading -------------------------------------------------------------------------------------


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)


def _read_head(path: Path) -> tuple[bytes, os.stat_result]:
    """The start of *path*, through the end of its pre-header when found within
    :data:`MAX_PRE_HEADER`, and its stat.  Raises OSError."""
    fd = _open(path)
    try:
        info = os.fstat(fd)
        data = bytearray()
        while len(data) < MAX_PRE_HEADER:
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                break
            start = max(0, len(data) - 1)
            data += chunk
            if data.find(b"\n\n", start) >= 0:
                break
    finally:
        os.close(fd)
    return bytes(data), info


def read_headers(entry: QueueEntry) -> bytes:
    """BLOCKING. The header block of *entry*'s message (our Received header first), without the
    empty line after it, at most :data:`MAX_HEADER_BYTES`.  Raises OSError."""
    fd = _open(entry.path)
    try:
        data = os.pread(fd, MAX_HEADER_BYTES + 4, entry.offset)
    finally:
        os.close(fd)
    for end in (b"\r\n\r\n", b"\n\n"):
        position = data.find(end)
        if position >= 0:
            return data[: position + len(end) // 2]
    return data[:MAX_HEADER_BYTES]


def _relay_recipients(envelope: Envelope, path: Path) -> tuple[RecipientState, ...]:
    """The recipients of relay message *envelope* with their state from the state file at
    *path*, read by the relayer's own decoder; no file: all pending.  Raises OSError and
    ValueError (a state file that does not decode)."""
    # Imported here: the relayer's module is large, and only these commands need it.
    from katerchen import relay

    try:
        fd = _open(path)
    except FileNotFoundError:
        state = relay.RelayState.fresh(envelope)
    else:
        try:
            data = os.read(fd, MAX_STATE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_STATE_BYTES:
            raise ValueError("state file too large")
        state = relay.RelayState.decode(data).merge(envelope)
    return tuple(
        RecipientState(
            r.recipient,
            r.status,
            r.attempts,
            r.next_attempt,
            r.last_attempt,
            r.reply or None,
        )
        for r in state.recipients
    )


def _entry(
    directory: Path,
    queue_id: str,
    origin: Origin,
    *,
    held: bool,
    now: float,
    scan_interval: float,
) -> QueueEntry | None:
    """BLOCKING. The entry of ``directory/<queue_id>``, None when it is not there (any more)."""
    path = directory / queue_id
    try:
        head, info = _read_head(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link: not ours, not followed
            return None
        raise
    if not stat.S_ISREG(info.st_mode):
        return None
    queue = "hold" if held else origin
    try:
        envelope, offset = Envelope.decode(head)
        if envelope.queue_id != queue_id:
            raise EnvelopeError(f"envelope id {envelope.queue_id} is not the file name")
    except EnvelopeError as exc:
        return QueueEntry(
            queue_id=queue_id,
            queue=queue,
            origin=origin,
            path=path,
            state="undecodable",
            size=info.st_size,
            arrival=None,
            sender=None,
            recipients=(),
            error=str(exc),
        )
    error: str | None = None
    next_attempt: float | None = None
    recipients: tuple[RecipientState, ...]
    if origin == "relay":
        try:
            recipients = _relay_recipients(envelope, directory / (queue_id + STATE_SUFFIX))
        except (OSError, ValueError) as exc:
            error = f"relay state unreadable: {exc}"
            recipients = tuple(RecipientState(to, "unknown") for to in envelope.forward_paths)
        pending = [r for r in recipients if r.status in ("pending", "unknown")]
        if held:
            state = "held"
        elif not pending:
            state = "done"
        elif any(r.attempts for r in pending):
            state = "deferred"
        else:
            state = "relay"
        times = [r.next_attempt for r in pending if r.next_attempt is not None]
        next_attempt = min(times) if times and not held else None
    else:
        recipients = tuple(RecipientState(to, "queued") for to in envelope.forward_paths)
        if held:
            state = "held"
        else:
            # ctime: when the file got here (commit or release rename), not when the client
            # sent it (a bounce carries its original's arrival).
            state = "deferred?" if now - info.st_ctime > scan_interval else "received"
    return QueueEntry(
        queue_id=queue_id,
        queue=queue,
        origin=origin,
        path=path,
        state=state,
        size=info.st_size - offset,
        arrival=envelope.arrival,
        sender=envelope.reverse_path,
        recipients=recipients,
        next_attempt=next_attempt,
        envelope=envelope,
        offset=offset,
        error=error,
    )


def _ids(directory: Path) -> list[str]:
    """The queue ids of the regular files in *directory* (none when it does not exist)."""
    try:
        with os.scandir(directory) as entries:
            return [
                entry.name
                for entry in entries
                if is_queue_id(entry.name) and entry.is_file(follow_symlinks=False)
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _places() -> Iterator[tuple[Origin, bool]]:
    for held in (False, True):
        for origin in _ORIGINS:
            yield origin, held


def list_queue(
    directories: DirectoriesConfig, *, now: float | None = None, scan_interval: float = 60.0
) -> list[QueueEntry]:
    """BLOCKING. Every message in ``received/``, ``relay/`` and the hold directory, sorted by
    queue id (= arrival), then received, relay, held.  Files that vanish while they are read
    (delivered meanwhile) are left out.  Raises OSError."""
    when = time.time() if now is None else now
    entries = []
    for origin, held in _places():
        directory = _queue_dir(directories, origin, held=held)
        for queue_id in _ids(directory):
            entry = _entry(
                directory, queue_id, origin, held=held, now=when, scan_interval=scan_interval
            )
            if entry is not None:
                entries.append(entry)
    order = {("received", False): 0, ("relay", False): 1, ("received", True): 2, ("relay", True): 3}
    entries.sort(key=lambda e: (e.queue_id, order[(e.origin, e.queue == "hold")]))
    return entries


def find(
    directories: DirectoriesConfig,
    queue_id: str,
    *,
    now: float | None = None,
    scan_interval: float = 60.0,
) -> list[QueueEntry]:
    """BLOCKING. The files of message *queue_id*, in the order of :func:`list_queue` (usually
    one; a message being handed from delivery to the relayer is briefly in both queues).
    Raises ValueError for a string that is not a queue id, :class:`NotFound`, OSError."""
    _check_id(queue_id)
    when = time.time() if now is None else now
    found = []
    for origin, held in _places():
        directory = _queue_dir(directories, origin, held=held)
        entry = _entry(
            directory, queue_id, origin, held=held, now=when, scan_interval=scan_interval
        )
        if entry is not None:
            found.append(entry)
    if not found:
        raise NotFound(f"no message {queue_id} in the queue")
    return found


# --- changing ------------------------------------------------------------------------------------


def delete(directories: DirectoriesConfig, queue_id: str) -> list[Path]:
    """BLOCKING. Remove message *queue_id* from every queue and the hold directory, relay state
    files included; return the message files removed.  Raises ValueError (not a queue id),
    :class:`NotFound`, OSError."""
    _check_id(queue_id)
    removed: list[Path] = []
    for origin, held in _places():
        directory = _queue_dir(directories, origin, held=held)
        names = [queue_id]
        if origin == "relay":
            names.append(queue_id + STATE_SUFFIX)  # after the message, never before
        touched = False
        for name in names:
            path = directory / name
            if not _is_file(path):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue  # delivered or relayed meanwhile
            touched = True
            if name == queue_id:
                removed.append(path)
        if touched:
            fsync_directory(directory)
    if not removed:
        raise NotFound(f"no message {queue_id} in the queue")
    return removed


def hold(directories: DirectoriesConfig, queue_id: str) -> list[Path]:
    """BLOCKING. Move message *queue_id* out of ``received/`` and ``relay/`` into the hold
    directory; return the new paths of the messages moved ([] when it was held already).
    Raises ValueError (not a queue id), :class:`NotFound`, OSError."""
    _check_id(queue_id)
    moved: list[Path] = []
    for origin in _ORIGINS:
        source = _queue_dir(directories, origin, held=False)
        if not _is_file(source / queue_id):
            continue
        target = _queue_dir(directories, origin, held=True)
        target.mkdir(parents=True, exist_ok=True, mode=0o750)
        try:
            _rename(source / queue_id, target / queue_id)
        except FileNotFoundError:
            continue  # done meanwhile: nothing left to hold
        moved.append(target / queue_id)
        if origin == "relay":
            state = queue_id + STATE_SUFFIX
            if _is_file(source / state):
                held_state = target / state
                if os.path.lexists(held_state):
                    os.unlink(held_state)  # left from an earlier hold: the live one is newer
                with contextlib.suppress(FileNotFoundError):
                    _rename(source / state, held_state)
        fsync_directory(target)
        fsync_directory(source)
    if not moved and not any(
        _is_file(_queue_dir(directories, origin, held=True) / queue_id) for origin in _ORIGINS
    ):
        raise NotFound(f"no message {queue_id} in received/ or relay/")
    return moved


def release(directories: DirectoriesConfig, queue_id: str) -> list[Path]:
    """BLOCKING. Move held message *queue_id* back to the queue it was held from; return its
    paths there.  Raises ValueError (not a queue id), :class:`NotFound`, FileExistsError (a
    message of that id is in the queue already: nothing is replaced), OSError."""
    _check_id(queue_id)
    moved: list[Path] = []
    for origin in _ORIGINS:
        source = _queue_dir(directories, origin, held=True)
        if not _is_file(source / queue_id):
            continue
        target = _queue_dir(directories, origin, held=False)
        if os.path.lexists(target / queue_id):
            raise FileExistsError(errno.EEXIST, "already in the queue", str(target / queue_id))
        if origin == "relay":
            # The state goes back first: the relayer must never see the message without it.
            state = queue_id + STATE_SUFFIX
            if _is_file(source / state):
                if os.path.lexists(target / state):
                    # Written by the relayer after the hold: newer than the held one.
                    os.unlink(source / state)
                else:
                    _rename(source / state, target / state)
        _rename(source / queue_id, target / queue_id)
        moved.append(target / queue_id)
        fsync_directory(target)
        fsync_directory(source)
    if not moved:
        raise NotFound(f"no held message {queue_id}")
    return moved


def flush(pidfile: Path) -> int:
    """Send SIGUSR1 to the server whose pid *pidfile* holds; return the pid.  Raises
    :class:`FlushError`."""
    try:
        info = os.stat(pidfile)
        with open(pidfile, "rb") as file:
            text = file.read(64)
    except FileNotFoundError:
        raise FlushError(f"no pidfile {pidfile}: is the server running?") from None
    except OSError as exc:
        raise FlushError(f"cannot read the pidfile {pidfile}: {exc.strerror or exc}") from None
    words = text.split()
    if len(words) != 1 or not words[0].isdigit() or int(words[0]) < 2:
        raise FlushError(f"the pidfile {pidfile} does not hold a process id")
    pid = int(words[0])
    started = _process_start(pid)
    # The server writes its pidfile after it starts; a process that started later (with a
    # second of slack for the clock's granularity) got a recycled pid.
    if started is not None and started > info.st_mtime + 2:
        raise FlushError(
            f"process {pid} started after the pidfile {pidfile} was written: "
            "a stale pidfile (is the server running?)"
        )
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise FlushError(f"no process {pid} (from {pidfile}): is the server running?") from None
    except PermissionError:
        raise FlushError(f"not allowed to signal process {pid} (from {pidfile})") from None
    return pid


def _process_start(pid: int) -> float | None:
    """When process *pid* started (unix time) according to ``/proc``; None where there is no
    ``/proc`` or it cannot be read.  Raises FlushError when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rpartition(b")")[2].split()
        with open("/proc/stat", "rb") as file:
            boot = next(int(line.split()[1]) for line in file if line.startswith(b"btime "))
        # The fields after "(comm)" start with the state (field 3); starttime is field 22.
        ticks = int(fields[22 - 3])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            raise FlushError(f"no process {pid}: is the server running?") from None
        return None
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# --- output --------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    """*text* with every control and other non-printable character escaped, so what a client
    put into a message cannot drive the terminal."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return "".join(out)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h{rest // 60}m" if rest >= 60 else f"{hours}h"
    days, rest = divmod(seconds, 86400)
    return f"{days}d{rest // 3600}h" if rest >= 3600 else f"{days}d"


def _size(size: int) -> str:
    """``512``, ``12.3K``, ``4.0M``, ``1.2G``."""
    if size < 1024:
        return str(size)
    value = size / 1024
    for unit in ("K", "M"):
        if value < 1024:
            return f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"


def _next(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    return "now" if when <= now else "in " + _duration(when - now)


def _time(when: float | None) -> str | None:
    if when is None:
        return None
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _recipient_text(recipient: RecipientState) -> str:
    text = f"<{recipient.to}>"
    if recipient.status not in ("pending", "queued"):
        text += f" ({recipient.status})"
    return text


def entry_json(entry: QueueEntry, now: float) -> dict[str, object]:
    """*entry* as ``queue list --json`` shows it (times are unix seconds, or null)."""
    return {
        "id": entry.queue_id,
        "queue": entry.queue,
        "held_from": entry.origin if entry.queue == "hold" else None,
        "state": entry.state,
        "arrival": entry.arrival,
        "age": None if entry.arrival is None else max(0.0, now - entry.arrival),
        "size": entry.size,
        "sender": entry.sender,
        "recipients": [
            {
                "to": r.to,
                "status": r.status,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "last_attempt": r.last_attempt,
                "reply": r.reply,
            }
            for r in entry.recipients
        ],
        "next_attempt": entry.next_attempt,
        "error": entry.error,
    }


def _write_json(out: TextIO, document: dict[str, object]) -> None:
    json.dump({"format": JSON_FORMAT, "version": JSON_VERSION, **document}, out, indent=2)
    out.write("\n")


def _write_table(out: TextIO, entries: Sequence[QueueEntry], now: float) -> None:
    if not entries:
        out.write("The queue is empty.\n")
        return
    header = ("ID", "QUEUE", "STATE", "AGE", "SIZE", "NEXT", "FROM", "TO")
    rows = []
    for entry in entries:
        queue = entry.queue if entry.queue != "hold" else f"hold/{entry.origin}"
        sender = "?" if entry.sender is None else f"<{entry.sender}>"
        recipients = ", ".join(_recipient_text(r) for r in entry.recipients)
        if entry.error is not None:
            recipients = (recipients + "  " if recipients else "") + f"[{entry.error}]"
        rows.append(
            (
                entry.queue_id,
                queue,
                entry.state,
                "?" if entry.arrival is None else _duration(now - entry.arrival),
                _size(entry.size),
                _next(entry.next_attempt, now),
                _printable(sender),
                _printable(recipients),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    right = {3, 4}  # numbers line up on the right
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row[:-1])
        ]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
    total = sum(entry.size for entry in entries)
    count = len(entries)
    out.write(f"-- {count} message{'s' if count != 1 else ''}, {_size(total)} in all\n")


def _header_fields(block: bytes) -> list[tuple[str, str]]:
    """Unfolded (name, value) pairs of a header block; lines that are no field are skipped."""
    fields: list[tuple[str, str]] = []
    for line in block.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
            continue
        name, colon, value = line.partition(":")
        if colon and name and " " not in name:
            fields.append((name, value.lstrip(" \t")))
    return fields


def _write_show(out: TextIO, entry: QueueEntry, headers: bytes, now: float) -> None:
    def line(key: str, value: str) -> None:
        out.write(f"{key + ':':<10} {_printable(value)}\n")

    queue = entry.queue if entry.queue != "hold" else f"hold (from {entry.origin})"
    line("id", entry.queue_id)
    line("queue", queue)
    line("state", entry.state)
    line("file", str(entry.path))
    line("size", f"{entry.size} bytes")
    if entry.error is not None:
        line("error", entry.error)
    envelope = entry.envelope
    if envelope is None:
        return
    line("arrival", f"{_time(envelope.arrival)} ({_duration(now - envelope.arrival)} ago)")
    line("client", envelope.client or "-")
    line("helo", envelope.helo or "-")
    line("from", f"<{envelope.reverse_path}>")
    for recipient in entry.recipients:
        details = [recipient.status]
        if recipient.attempts:
            plural = "s" if recipient.attempts != 1 else ""
            details.append(f"{recipient.attempts} attempt{plural}")
        if recipient.status == "pending" and recipient.next_attempt is not None:
            details.append(f"next {_next(recipient.next_attempt, now)}")
        if recipient.reply:
            details.append(f"last reply: {recipient.reply}")
        line("to", f"<{recipient.to}>  " + ", ".join(details))
    line("body", envelope.body or "-")
    line("smtputf8", "yes" if envelope.smtputf8 else "no")
    if envelope.auth is not None:
        line("auth", envelope.auth)
    if envelope.relay:
        line("relay", "yes")
    out.write("\n")
    block = headers.decode("utf-8", "replace").replace("\r\n", "\n").removesuffix("\n")
    for text in block.split("\n"):
        out.write(_printable(text.replace("\t", "    ")) + "\n")


# --- the command line ----------------------------------------------------------------------------

_QUEUE_DESCRIPTION = """\
Look at and manage the messages in the spool: received/ (waiting for delivery),
relay/ (waiting for the relayer) and the hold directory ([directories] hold).
The commands work with or without a running server and never change a file
the server is using: they only read, rename and unlink.

Exit status: 0 done, 1 not found (or an I/O error), 2 usage and config errors."""


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    add_common: Callable[[argparse.ArgumentParser], None],
    epilog: str,
) -> None:
    """Add ``queue`` and its subcommands to the command line's *commands*; *add_common* adds
    ``--config`` and ``--log-level`` to a parser."""
    raw = argparse.RawDescriptionHelpFormatter
    queue = commands.add_parser(
        "queue",
        help="list, show, delete, hold or release queued messages; flush the queue",
        description=_QUEUE_DESCRIPTION,
        epilog=epilog,
        formatter_class=raw,
    )
    add_common(queue)
    actions = queue.add_subparsers(
        dest="queue_command", title="queue commands", metavar="QUEUE-COMMAND"
    )

    def action(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(
            name, help=summary, description=description, epilog=epilog, formatter_class=raw
        )
        add_common(parser)
        return parser

    listing = action(
        "list",
        "list every queued and held message (a table, or --json)",
        "List every message in received/, relay/ and the hold directory: queue id, queue,\n"
        "state, age, size, next attempt, sender and recipients (relay recipients that are\n"
        "no longer pending show their state: sent, failed).  States: received (waiting for\n"
        "delivery), deferred? (in received/ longer than [delivery] scan_interval: a running\n"
        "server has deferred it), relay (not tried yet), deferred (tried, to be retried),\n"
        "done (being removed), held, undecodable (left alone by the server).",
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help='one JSON document for scripts: {"format": "katerchen-queue", "version": 1, '
        '"now": ..., "messages": [...]}; times are unix seconds',
    )
    show = action(
        "show",
        "show a message's envelope, delivery state and headers",
        "Show the envelope of message ID (client, HELO name, sender, each recipient with\n"
        "its state, body type), then the message's header block.  Characters that could\n"
        "drive the terminal are shown escaped.",
    )
    show.add_argument("queue_id", metavar="ID", help="the queue id (as queue list shows it)")
    show.add_argument("--json", action="store_true", help="one JSON document for scripts")
    flush_parser = action(
        "flush",
        "make the running server retry everything now (SIGUSR1)",
        "Send SIGUSR1 to the running server, found through its pidfile: it rescans\n"
        "received/ and relay/ and retries every deferred message and recipient at once.\n"
        "Exit status 1 when there is no pidfile or no such process (or it is stale).",
    )
    flush_parser.add_argument(
        "--pidfile",
        metavar="PATH",
        help="the server's pidfile (default: the config's [server] pidfile)",
    )
    for name, summary, description in (
        (
            "delete",
            "remove a message from the queue for good",
            "Remove message ID from received/, relay/ and the hold directory, with its relay\n"
            "state.  Nobody is told: no bounce is sent.  A message the server is delivering\n"
            "at that very moment may still reach its recipients.",
        ),
        (
            "hold",
            "keep a message from being delivered or relayed until release",
            "Move message ID from received/ or relay/ into the hold directory, where delivery\n"
            "and relay never look, until queue release ID.  Holding a held message does\n"
            "nothing.  A delivery or relay attempt already under way finishes.",
        ),
        (
            "release",
            "put a held message back into its queue",
            "Move held message ID back to the queue it was held from.  The server picks it up\n"
            "at its next scan ([delivery] scan_interval), or at once after queue flush.",
        ),
    ):
        parser = action(name, summary, description)
        parser.add_argument("queue_id", metavar="ID", help="the queue id (as queue list shows it)")
    queue.set_defaults(queue_parser=queue)


def run(
    args: argparse.Namespace,
    load: Callable[[], Config],
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the ``queue`` command *args* (parsed by the parser :func:`add_parser` built);
    *load* returns the config (raising ConfigError).  Returns the exit status."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    command: str | None = args.queue_command
    if command is None:
        args.queue_parser.print_usage(err)
        print("katerchen queue: a queue command is needed (see katerchen queue --help)", file=err)
        return 2
    prefix = f"katerchen: queue {command}:"
    queue_id: str | None = getattr(args, "queue_id", None)
    if queue_id is not None and not is_queue_id(queue_id):
        print(f"{prefix} {_printable(queue_id)!r} is not a queue id", file=err)
        return 2
    try:
        config = load()
    except ConfigError as exc:
        print(f"katerchen: {exc}", file=err)
        return 2
    directories = config.directories
    scan_interval = config.delivery.scan_interval
    now = time.time()
    try:
        if command == "list":
            entries = list_queue(directories, now=now, scan_interval=scan_interval)
            if args.json:
                messages = [entry_json(entry, now) for entry in entries]
                _write_json(out, {"now": now, "messages": messages})
            else:
                _write_table(out, entries, now)
            return 0
        if command == "flush":
            return _flush(args, config, prefix, out, err)
        assert queue_id is not None
        if command == "show":
            entries = find(directories, queue_id, now=now, scan_interval=scan_interval)
            shown = [(entry, read_headers(entry)) for entry in entries]
            if args.json:
                documents = []
                for entry, headers in shown:
                    document = entry_json(entry, now)
                    envelope = entry.envelope
                    if envelope is not None:
                        document["envelope"] = {
                            "client": envelope.client,
                            "helo": envelope.helo,
                            "body": envelope.body,
                            "smtputf8": envelope.smtputf8,
                            "auth": envelope.auth,
                            "relay": envelope.relay,
                        }
                        document["headers"] = [list(f) for f in _header_fields(headers)]
                    documents.append(document)
                _write_json(out, {"now": now, "messages": documents})
            else:
                for index, (entry, headers) in enumerate(shown):
                    if index:
                        out.write("\n")
                    _write_show(out, entry, headers if entry.envelope else b"", now)
            return 0
        if command == "delete":
            for path in delete(directories, queue_id):
                out.write(f"deleted {path}\n")
            return 0
        if command == "hold":
            moved = hold(directories, queue_id)
            for path in moved:
                out.write(f"held {queue_id}: {path}\n")
            if not moved:
                out.write(f"{queue_id} is held already\n")
            return 0
        if command == "release":
            for path in release(directories, queue_id):
                out.write(f"released {queue_id}: {path}\n")
            return 0
    except NotFound as exc:
        print(f"{prefix} {exc}", file=err)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prefix} {exc.strerror or exc}{where}", file=err)
        return 1
    raise AssertionError(f"unknown queue command {command!r}")


def _flush(args: argparse.Namespace, config: Config, prefix: str, out: TextIO, err: TextIO) -> int:
    pidfile: object = args.pidfile
    if not pidfile:
        # [server] pidfile comes with the init-system support; read it when it is there.
        pidfile = getattr(config.server, "pidfile", None)
    if not pidfile or not isinstance(pidfile, str | os.PathLike):
        print(
            f"{prefix} no pidfile: give --pidfile PATH, or set [server] pidfile in the config",
            file=err,
        )
        return 2
    try:
        pid = flush(Path(pidfile))
    except FlushError as exc:
        print(f"{prefix} {exc}", file=err)
        return 1
    out.write(f"signalled the server (pid {pid}): it retries every waiting message now\n")
    return 0
