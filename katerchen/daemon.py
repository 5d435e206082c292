"""What katerchen does for the init system that runs it: readiness through systemd's
``NOTIFY_SOCKET``, listening sockets passed in through ``LISTEN_FDS`` (socket activation), the
pidfile, and dropping root privileges once the ports are bound.

Everything here is the standard library and blocking, but quick (a few system calls); the
ownership fix-up (:func:`prepare_ownership`) walks the spool and belongs in a worker thread.

The protocols, as systemd documents them (sd_notify(3), sd_listen_fds(3)):

- ``NOTIFY_SOCKET`` names a Unix datagram socket: a path, or an abstract name written with a
  leading ``@``.  Each datagram holds newline-separated ``KEY=value`` assignments: ``READY=1``
  once the server listens, ``RELOADING=1`` (with ``MONOTONIC_USEC``) while a SIGHUP reload runs,
  ``STOPPING=1`` when the shutdown begins, ``STATUS=...`` for ``systemctl status``.
- ``LISTEN_PID`` is the process the sockets are meant for (a mismatch means they were meant for
  a parent: ignored), ``LISTEN_FDS`` how many there are, from file descriptor 3 on, and
  ``LISTEN_FDNAMES`` their colon-separated names (``FileDescriptorName=`` of the socket unit).
  The variables are removed from the environment once read, as sd_listen_fds does.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
from collections.abc import MutableMapping
from pathlib import Path

import attrs

__all__ = [
    "LISTEN_FDS_START",
    "Identity",
    "Notifier",
    "PassedSocket",
    "drop_privileges",
    "listen_fds",
    "lookup_identity",
    "prepare_ownership",
    "remove_pidfile",
    "write_pidfile",
]

#: The first file descriptor of passed sockets (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: The name a passed socket has when LISTEN_FDNAMES does not say (as systemd's own default).
UNKNOWN_NAME = "unknown"
#: How long a notification may wait for room in the init system's socket (seconds).
NOTIFY_TIMEOUT = 1.0


# --- readiness ------------------------------------------------------------------------------


@attrs.frozen
class Notifier:
    """Sends state changes to the init system's notification socket (sd_notify)."""

    address: str  # a path, or "\\0name" for an abstract socket

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier | None:
        """The notifier ``NOTIFY_SOCKET`` asks for; None when it is not set.  With *unset* the
        variable is removed from *environ* (default: ``os.environ``).  Raises ValueError for an
        address that is neither a path nor an abstract name (such as systemd's ``vsock:``)."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        if not value:
            return None
        if value.startswith("@") and len(value) > 1:
            return cls("\0" + value[1:])
        if value.startswith("/"):
            return cls(value)
        raise ValueError(f"NOTIFY_SOCKET={value!r}: only a path or an @abstract name is supported")

    def notify(self, *assignments: str) -> None:
        """Send ``KEY=value`` *assignments* in one datagram.  Raises OSError when it cannot be
        sent (the caller logs it: a lost READY=1 shows as a start-up timeout)."""
        data = "\n".join(assignments).encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_TIMEOUT)
            sock.connect(self.address)
            sock.sendall(data)


# --- socket activation ----------------------------------------------------------------------


@attrs.frozen
class PassedSocket:
    """A listening socket the init system passed in, with its name from ``LISTEN_FDNAMES``."""

    name: str
    socket: socket.socket = attrs.field(eq=False)

    @property
    def fd(self) -> int:
        return self.socket.fileno()


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None, unset: bool = True
) -> list[PassedSocket]:
    """The listening TCP sockets passed to this process (*pid*, default ``os.getpid()``) through
    ``LISTEN_FDS``; [] when there are none or they are meant for another process.  With *unset*
    the three variables are removed from *environ* (default: ``os.environ``), and the sockets are
    close-on-exec.  Raises ValueError when the variables are malformed or a descriptor is not a
    listening TCP socket (the sockets already taken are closed then).
    """
    env = os.environ if environ is None else environ
    listen_pid = env.get("LISTEN_PID", "")
    count = env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not listen_pid or not count:
        return []
    if not listen_pid.isdigit() or int(listen_pid) != (os.getpid() if pid is None else pid):
        return []  # meant for another process (a parent that did not unset them)
    if not count.isdigit():
        raise ValueError(f"LISTEN_FDS={count!r} is not a number")
    n = int(count)
    labels = names.split(":") if names else [UNKNOWN_NAME] * n
    if len(labels) != n:
        raise ValueError(f"LISTEN_FDNAMES names {len(labels)} sockets, LISTEN_FDS says {n}")
    passed: list[PassedSocket] = []
    try:
        for offset, label in enumerate(labels):
            fd = LISTEN_FDS_START + offset
            passed.append(PassedSocket(label or UNKNOWN_NAME, _listening_socket(fd)))
    except BaseException:
        for item in passed:
            item.socket.close()
        raise
    return passed


def _listening_socket(fd: int) -> socket.socket:
    try:
        info = os.fstat(fd)
    except OSError:
        raise ValueError(f"LISTEN_FDS: file descriptor {fd} is not open") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ValueError(f"LISTEN_FDS: file descriptor {fd} is not a socket")
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)  # family and type come from the descriptor
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"LISTEN_FDS: socket {fd} is not an IPv4 or IPv6 socket")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"LISTEN_FDS: socket {fd} is not a stream (TCP) socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"LISTEN_FDS: socket {fd} is not listening")
    except BaseException:
        sock.detach()  # not ours to close: it was not a socket we can use
        raise
    return sock


# --- the pidfile ----------------------------------------------------------------------------


def write_pidfile(path: Path, pid: int | None = None) -> None:
    """Write *pid* (default: this process) to *path*, replacing it by rename so that a reader
    never sees half a number.  Raises OSError (e.g. the directory does not exist)."""
    pid = os.getpid() if pid is None else pid
    temporary = path.with_name(f".{path.name}.{pid}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(f"{pid}\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_pidfile(path: Path, pid: int | None = None) -> bool:
    """Remove *path* if it still holds *pid* (default: this process); True when it was removed,
    False when it holds another pid or is gone.  Raises OSError (e.g. no permission)."""
    pid = os.getpid() if pid is None else pid
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False
    if text.strip() != str(pid):
        return False  # another process's now: leave it alone
    path.unlink()
    return True


# --- privileges -----------------------------------------------------------------------------


@attrs.frozen
class Identity:
    """Whom the server runs as after :func:`drop_privileges`."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # the supplementary groups

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid}, gid {self.gid})"


def lookup_identity(user: str, group: str = "") -> Identity:
    """The :class:`Identity` for ``[server] user`` and ``group`` (names or numbers; the group
    defaults to the user's own).  Raises LookupError naming what does not exist."""
    entry: pwd.struct_passwd | None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else None
        except (KeyError, OverflowError):
            entry = None
    if entry is None:
        raise LookupError(f"[server] user: no user {user!r} on this system")
    gid = entry.pw_gid
    if group:
        found = _group_id(group)
        if found is None:
            raise LookupError(f"[server] group: no group {group!r} on this system")
        gid = found
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    return Identity(entry.pw_name, entry.pw_uid, gid, groups)


def _group_id(group: str) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdigit() else None
    except (KeyError, OverflowError):
        return None


def drop_privileges(identity: Identity) -> None:
    """Become *identity* for good: supplementary groups, then the group, then the user (in that
    order: each step needs the privileges the next one gives up).  Raises OSError, also when
    root could be regained afterwards.  Affects every thread of the process."""
    os.setgroups(list(identity.groups))
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise OSError(errno.EPERM, f"could regain root after switching to {identity}")


def prepare_ownership(
    identity: Identity,
    *,
    spool: list[Path],
    create: list[Path],
    files: list[Path],
) -> list[Path]:
    """Before :func:`drop_privileges`, as root: make the *spool* directories (created when
    missing) and everything in them, and the existing *files*, belong to *identity*; create the
    missing directories of *create* for it (parents stay root's).  Symbolic links are changed,
    never followed.  Returns the paths whose owner changed; raises OSError."""
    changed: list[Path] = []

    def own(path: Path, info: os.stat_result) -> None:
        if (info.st_uid, info.st_gid) != (identity.uid, identity.gid):
            os.lchown(path, identity.uid, identity.gid)
            changed.append(path)

    for directory in spool:
        directory.mkdir(parents=True, exist_ok=True)
        own(directory, os.stat(directory))
        for root, dirs, names in os.walk(directory):
            for name in dirs + names:
                path = Path(root, name)
                with contextlib.suppress(FileNotFoundError):
                    own(path, os.lstat(path))
    for directory in create:
        if not directory.exists():
            directory.mkdir(parents=True, exist_ok=True)
            own(directory, os.stat(directory))
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            own(path, os.lstat(path))
    return changed
