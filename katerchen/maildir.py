"""Maildir delivery: one message file per (queue id, recipient), written to the Maildir rules.

A Maildir (https://cr.yp.to/proto/maildir.html) is a directory with ``tmp/``, ``new/`` and
``cur/``. A message is written under a unique name in ``tmp/``, fsynced, hard-linked into
``new/`` (where readers pick it up), and unlinked from ``tmp/``; then ``new/`` is fsynced so the
new entry survives a crash. Readers move messages from ``new/`` to ``cur/<name>:2,<flags>``.

Theory of operation. The name of a delivery is a function of the queue id and the recipient
(:func:`delivery_name`), not of the moment it is written. So when the server crashes after a
delivery but before the message leaves ``received/``, the next attempt computes the same name and
finds it: ``link()`` into ``new/`` fails with EEXIST, and with ``check_cur=True`` a copy the
reader already moved to ``cur/`` is found as well. ``link()`` rather than ``rename()`` is what
makes that check atomic: a rename would silently replace an existing file.

Symbolic links. The mailbox directory itself may be a symbolic link: its path is built from
components that :mod:`katerchen.address` checked, so only the administrator can have put a link
there (to keep a mailbox on another disk, say), and the routing lookups follow it too. Inside
the Maildir nothing is followed: ``tmp/``, ``new/`` and ``cur/`` are opened with ``O_NOFOLLOW``
relative to one descriptor of the mailbox directory, and the message file is created with
``O_CREAT | O_EXCL | O_NOFOLLOW``, so a link planted by whoever can write into the Maildir (an
IMAP server's user, say) makes the delivery fail (a temporary failure) instead of writing through
it.

Everything here blocks on the file system and belongs in ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Final

__all__ = ["COPY_CHUNK", "deliver", "delivery_name", "ensure_maildir"]

#: Bytes per read/write when the kernel cannot copy file to file by itself.
COPY_CHUNK: Final = 1024 * 1024

# Mail is private: only the owner (the server, or the IMAP server running as the same user)
# reads it. Postfix's local(8) and Dovecot's LDA create the same modes by default.
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700

_QUEUE_ID_RE: Final = re.compile(r"[0-9A-Za-z]{1,64}")
# Dovecot reads the file size from ",S=<digits>" in the name, up to the next "," or the end
# (the ":2,<flags>" part never reaches us: readers add it in cur/).
_SIZE_RE: Final = re.compile(r",S=([0-9]+)(?=,|\Z)")
# Host name characters kept as they are: printable ASCII without "/" and ":" (which the Maildir
# spec says to write as \057 and \072), "," (Dovecot's separator for ",S=" and friends) and "\"
# (so the escapes stay unambiguous). Everything else is written as \ooo per UTF-8 byte.
_HOST_SAFE: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - set("/:,\\")
# The escaped host is cut here so that the whole name, with ",S=<size>" and a reader's
# ":2,<flags>", stays far below NAME_MAX (255): the time, queue id and digest already make it
# unique, the host only says who wrote it.
_MAX_HOST: Final = 100
# Errors after which the kernel's file-to-file copy is given up for read/write, not reported.
_NO_KERNEL_COPY: Final = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
)


def _escape_host(hostname: str) -> str:
    pieces = []
    length = 0
    for char in hostname:
        if char in _HOST_SAFE:
            piece = char
        else:
            piece = "".join(f"\\{byte:03o}" for byte in char.encode("utf-8", "surrogatepass"))
        length += len(piece)
        if length > _MAX_HOST:
            break
        pieces.append(piece)
    return "".join(pieces)


def delivery_name(
    queue_id: str, recipient: str, arrival: float, hostname: str, *, size: int | None = None
) -> str:
    """The Maildir file name of the delivery of message ``queue_id`` to ``recipient``.

    ``f"{int(arrival)}.K{queue_id}R{digest}.{host}"``: the arrival time in seconds (readers sort
    by it), the queue id (unique on this host, so the name is unique), the first 12 hex digits
    of SHA-256 of the recipient's UTF-8 (one name per recipient of a message), and the host
    name with ``/`` and ``:`` written as ``\\057`` and ``\\072`` as Courier and Dovecot do (also
    ``,`` and ``\\``, and anything outside printable ASCII, as ``\\ooo`` per byte; cut after 100
    characters). The result never holds ``/`` or ``:`` and never starts with a dot.

    The same arguments always give the same name: that is what lets a repeated delivery find
    the earlier one. ``recipient`` is hashed exactly as given, so the caller chooses what one
    copy means: pass the mailbox address (``Mailbox.address``) for one copy per mailbox.

    ``size``, when given, is appended as ``,S=<size>`` (Dovecot's convention, so an IMAP server
    need not stat the file); it must be the exact size of the file :func:`deliver` writes,
    ``len(prefix) + os.stat(source).st_size - offset``, which :func:`deliver` checks.

    Raises ValueError for a queue id that is not 1 to 64 characters ``[0-9A-Za-z]``, an
    arrival that is negative or not finite, a negative size or an empty host name.
    """
    if not _QUEUE_ID_RE.fullmatch(queue_id):
        raise ValueError("queue id must be 1 to 64 characters [0-9A-Za-z]")
    if not math.isfinite(arrival) or arrival < 0:
        raise ValueError("arrival must be a finite, non-negative unix time")
    if not hostname:
        raise ValueError("hostname must not be empty")
    digest = hashlib.sha256(recipient.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    name = f"{int(arrival)}.K{queue_id}R{digest}.{_escape_host(hostname)}"
    if size is not None:
        if size < 0:
            raise ValueError("size must not be negative")
        name += f",S={size}"
    return name


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_maildir(path: Path) -> None:
    """BLOCKING. Create the Maildir ``path`` and its ``tmp/``, ``new/``, ``cur/`` when missing.

    Only ``path`` itself is created, never its parent: in the domains tree a directory is a
    served domain, so creating one by accident would change routing. Every directory created
    is made durable (its parent is fsynced), so a delivery that follows cannot be lost with
    its directory in a crash. Costs four failed ``mkdir`` calls when all exist.

    Raises OSError: FileNotFoundError when the parent is missing, anything else the file
    system says (an existing non-directory shows up later, when :func:`deliver` opens it).
    """
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        pass
    else:
        _fsync_directory(path.parent)
    created = False
    for sub in ("tmp", "new", "cur"):
        try:
            os.mkdir(path / sub, _DIR_MODE)
        except FileExistsError:
            continue
        created = True
    if created:
        _fsync_directory(path)


def _open_subdir(mailbox_fd: int, sub: str) -> int:
    # O_NOFOLLOW: a symbolic link in place of tmp/, new/ or cur/ fails with ELOOP (or ENOTDIR)
    # instead of redirecting the delivery somewhere else.
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(sub, flags, dir_fd=mailbox_fd)


def _in_cur(cur_fd: int, name: str) -> bool:
    """Whether a reader has already moved the delivery ``name`` to ``cur/``.

    Readers rename ``new/<name>`` to ``cur/<name>:2,<flags>`` (Dovecot does exactly that), and a
    reader may add ``,<field>`` such as ``,W=<size>`` to the base name, so those count too.
    ``name`` holds the queue id and the recipient digest: no other delivery's name starts
    with it followed by ``:`` or ``,``.
    """
    with os.scandir(cur_fd) as entries:
        for entry in entries:
            found = entry.name
            if found.startswith(name) and (len(found) == len(name) or found[len(name)] in ":,"):
                return True
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy(source_fd: int, target_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes from ``source_fd`` at ``offset`` to ``target_fd``'s position.

    The kernel copies file to file when it can (``copy_file_range``, then ``sendfile``), so the
    body never passes through Python; otherwise 1 MiB reads and writes. Raises OSError (EIO)
    when the source ends early: it changed under us, and a short copy must never be delivered.
    """
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        while count > 0:
            try:
                copied = copy_file_range(source_fd, target_fd, count, offset_src=offset)
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY:
                    raise
                break
            if copied == 0:
                break  # EOF, or a file system that copies nothing: the loops below decide
            offset += copied
            count -= copied
    sendfile = getattr(os, "sendfile", None)
    if sendfile is not None:
        while count > 0:
            try:
                sent = sendfile(target_fd, source_fd, offset, min(count, 1 << 30))
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY:
                    raise
                break
            if sent == 0:
                break
            offset += sent
            count -= sent
    while count > 0:
        chunk = os.pread(source_fd, min(count, COPY_CHUNK), offset)
        if not chunk:
            raise OSError(errno.EIO, "the message file ended early (changed while delivered?)")
        _write_all(target_fd, chunk)
        offset += len(chunk)
        count -= len(chunk)


def deliver(
    path: Path, name: str, prefix: bytes, source: Path, offset: int, *, check_cur: bool
) -> bool:
    """BLOCKING. Deliver ``prefix`` + the bytes of ``source`` from ``offset`` on as ``name``.

    ``path`` is an existing Maildir (see :func:`ensure_maildir`), ``name`` a
    :func:`delivery_name`. The file is written to ``tmp/<name>`` (a leftover of an interrupted
    attempt is replaced), fsynced, hard-linked to ``new/<name>`` and unlinked from ``tmp/``, and
    then ``new/`` is fsynced. The body is copied by the kernel where possible.

    Returns True when the message was delivered now, False when it was already there: in
    ``new/`` (the link fails with EEXIST) or, with ``check_cur``, in ``cur/`` as ``<name>`` or
    ``<name>:2,<flags>``. ``check_cur`` costs one scan of ``cur/``; ask for it when this may
    be a repeated delivery (the message was left in ``received/`` by a crash or a failure).
    It checks ``new/`` before ``cur/``, and readers only ever move files from ``new/`` to
    ``cur/``, so a move in between cannot hide the earlier copy.

    Raises OSError for anything the file system refuses (a temporary failure: retry later),
    including a symbolic link in place of ``tmp/``, ``new/`` or ``cur/``, and a source that is
    shorter than ``offset`` or changes while it is copied. Nothing is left in ``tmp/`` then.
    (If only the final fsync of ``new/`` fails, the message is in ``new/`` and the error is
    raised; the retry finds it there.) Raises ValueError for a name that holds ``/`` or ``:``,
    starts with a dot or is empty, for a negative offset, and when ``name`` carries
    ``,S=<size>`` that differs from the size of the file to write.
    """
    if not name or name[0] == "." or "/" in name or ":" in name or "\0" in name:
        raise ValueError("a Maildir name must not be empty, start with '.' or hold '/' or ':'")
    if offset < 0:
        raise ValueError("offset must not be negative")
    mailbox_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds: list[int] = [mailbox_fd]
    try:
        tmp_fd = _open_subdir(mailbox_fd, "tmp")
        fds.append(tmp_fd)
        new_fd = _open_subdir(mailbox_fd, "new")
        fds.append(new_fd)
        if check_cur:
            # new/ first, then cur/: a reader moving the file in between is seen in cur/.
            try:
                os.stat(name, dir_fd=new_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                return False
            cur_fd = _open_subdir(mailbox_fd, "cur")
            fds.append(cur_fd)
            if _in_cur(cur_fd, name):
                return False
        source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        fds.append(source_fd)
        return _write_and_link(tmp_fd, new_fd, name, prefix, source_fd, offset)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_and_link(
    tmp_fd: int, new_fd: int, name: str, prefix: bytes, source_fd: int, offset: int
) -> bool:
    body = os.fstat(source_fd).st_size - offset
    if body < 0:
        raise OSError(errno.EIO, "the message file is shorter than its envelope")
    size = len(prefix) + body
    claimed = _SIZE_RE.search(name)
    if claimed is not None and int(claimed.group(1)) != size:
        raise ValueError(f"the name says S={claimed.group(1)}, the message has {size} bytes")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, _FILE_MODE, dir_fd=tmp_fd)
    except FileExistsError:
        # Left by an attempt that crashed: the same message never has two deliveries running,
        # so the name is ours. unlink() removes a symbolic link itself, never its target.
        os.unlink(name, dir_fd=tmp_fd)
        fd = os.open(name, flags, _FILE_MODE, dir_fd=tmp_fd)
    in_tmp = True
    try:
        try:
            _write_all(fd, prefix)
            _copy(source_fd, fd, offset, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd, follow_symlinks=False)
        except FileExistsError:
            return False
        finally:
            os.unlink(name, dir_fd=tmp_fd)
            in_tmp = False
    except BaseException:
        # BaseException too: an interrupted delivery must not leave a file behind in tmp/.
        if in_tmp:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=tmp_fd)
        raise
    os.fsync(new_fd)
    return True
