"""SMTP AUTH policy: password hashes, the users file, the per-IP failure count, and which
senders an authenticated user may use.

Nothing here does I/O on the network, and nothing here ever logs or returns a password.

**Password hashes** are scrypt (RFC 7914, stdlib :func:`hashlib.scrypt`) in the PHC string
format that passlib also writes, so the parameters travel with each hash and may be raised later
without invalidating the old ones::

    $scrypt$ln=15,r=8,p=1$<salt>$<key>

``ln`` is log2 of the cost N, ``r`` the block size, ``p`` the parallelism; salt (16 random
bytes) and key (32 bytes) are standard base64 without padding.  Verifying costs what hashing
cost: about 0.1 s of CPU and 32 MiB at the default parameters (N=2**15), so callers run it in a
worker thread (``trio.to_thread.run_sync``).  A hash that is malformed, or whose parameters ask
for more than :data:`MAX_SCRYPT_MEMORY`, never verifies (and never raises).

**The users file** (``[auth] users_file``) holds one user a line::

    # comments and blank lines are fine
    alice@example.org:$scrypt$ln=15,r=8,p=1$MTIzNDU2Nzg5MGFiY2RlZg$...

The address is everything before the LAST ``:`` (a quoted local part may hold a colon; a hash
never does).  Addresses are compared case-insensitively, the local part included: routing
matches local parts case-insensitively (``Alice@`` and ``alice@`` are one mailbox), so they are
one user too.  :func:`set_password` writes them lowercased.  A line whose address does not parse,
or whose hash is not a well-formed scrypt hash -- a missing hash, or a plain-text password put
there by hand -- is ignored and logged (``warning users-file-error``, with the line number only,
never the line, which may hold a password).  An address given twice counts the first time.

**Failed attempts** are counted per client IP by :class:`FailureTracker`, a pure object with the
clock passed in.  A success does not clear earlier failures: many users may share one IP (NAT),
and a known good account must not let an attacker reset the count while guessing another.

**Senders** (:func:`sender_allowed`): an authenticated user may use their own address, any
address that routing delivers to their mailbox (an alias, a sub-address), and the null
reverse-path ``<>`` (as Postfix allows: bounces, vacation replies and read receipts come from
mail clients with it).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import errno
import fcntl
import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import attrs

from katerchen import maillog
from katerchen.address import (
    Address,
    AddressError,
    domain_component,
    mailbox_component,
    parse_forward_path,
)
from katerchen.routing import DomainsTree, Mailbox

__all__ = [
    "DEFAULT_LOG2_N",
    "MAX_SCRYPT_MEMORY",
    "FailureTracker",
    "Users",
    "UsersFile",
    "canonical_address",
    "hash_password",
    "load_users",
    "parse_users",
    "sender_allowed",
    "set_password",
    "verify_password",
]

#: log2 of the scrypt cost N for new hashes: N=2**15, r=8 is 32 MiB and ~0.1 s per hash.
DEFAULT_LOG2_N: Final = 15
_R: Final = 8
_P: Final = 1
_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32
#: Verifying a hash that asks for more memory than this fails: a users file edited by mistake
#: (or by someone else) must not make every AUTH allocate gigabytes.
MAX_SCRYPT_MEMORY: Final = 256 * 1024 * 1024

_SCHEME: Final = "scrypt"

# A hash no password matches, at the default cost: verified against for unknown users so that
# the time an AUTH takes does not tell whether the user exists.
_DUMMY_HASH: Final = (
    f"${_SCHEME}$ln={DEFAULT_LOG2_N},r={_R},p={_P}$"
    + "A" * 22  # 16 zero bytes
    + "$"
    + "A" * 43  # 32 zero bytes
)


# --- hashes --------------------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes | None:
    # Unpadded, as PHC strings are: "=" or a length no encoding has is malformed.
    if not text.isascii() or "=" in text or len(text) % 4 == 1:
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _scrypt_memory(log2_n: int, r: int, p: int) -> int:
    """What OpenSSL allocates for these parameters (V: 128*r*(N+2), B: 128*r*p), plus slack."""
    return 128 * r * ((1 << log2_n) + 2 + p) + 1024 * 1024


def _scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password,
        salt=salt,
        n=1 << log2_n,
        r=r,
        p=p,
        maxmem=_scrypt_memory(log2_n, r, p),
        dklen=dklen,
    )


def hash_password(password: str, *, log2_n: int = DEFAULT_LOG2_N) -> str:
    """Hash *password* (its UTF-8 bytes) with scrypt and a fresh random salt.

    Returns the PHC string ``$scrypt$ln=<log2_n>,r=8,p=1$<salt>$<key>``.  *log2_n* exists for
    tests and for raising the cost later; it must be 1..20.  CPU-heavy (see the module
    docstring).  Raises ValueError for an empty password (it could never be meant) or a bad
    *log2_n*.
    """
    if not password:
        raise ValueError("the password is empty")
    if not 1 <= log2_n <= 20 or _scrypt_memory(log2_n, _R, _P) > MAX_SCRYPT_MEMORY:
        raise ValueError(f"log2_n out of range: {log2_n}")
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password.encode("utf-8"), salt, log2_n, _R, _P, _KEY_BYTES)
    return f"${_SCHEME}$ln={log2_n},r={_R},p={_P}${_b64encode(salt)}${_b64encode(key)}"


@attrs.frozen
class _Hash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _small_int(text: str) -> int | None:
    """A decimal 1..9999 without sign, leading zero or spaces; else None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 4 or text[0] == "0":
        return None
    return int(text)


def _parse_hash(text: str) -> _Hash | None:
    """The parts of a well-formed scrypt PHC string, within the limits; else None."""
    parts = text.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != _SCHEME:
        return None
    params = parts[2].split(",")
    if len(params) != 3:
        return None
    values: list[int] = []
    for param, name in zip(params, ("ln", "r", "p"), strict=True):
        label, eq, number = param.partition("=")
        value = _small_int(number)
        if label != name or not eq or value is None:
            return None
        values.append(value)
    log2_n, r, p = values
    if not 1 <= log2_n <= 20 or r > 32 or p > 16:
        return None
    if _scrypt_memory(log2_n, r, p) > MAX_SCRYPT_MEMORY:
        return None
    salt = _b64decode(parts[3])
    key = _b64decode(parts[4])
    if salt is None or key is None or not 8 <= len(salt) <= 64 or not 16 <= len(key) <= 64:
        return None
    return _Hash(log2_n, r, p, salt, key)


def verify_password(password: str | bytes, hashed: str) -> bool:
    """Whether *password* matches the scrypt hash string *hashed*.

    A str password is checked as its UTF-8 bytes (surrogate escapes map back to the bytes they
    stand for); bytes as they are.  The comparison is constant-time.  Returns False -- never
    raises -- for a malformed hash, parameters beyond the limits, or an empty password.
    CPU-heavy: run it in a worker thread.
    """
    if isinstance(password, str):
        try:
            password = password.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return False
    parsed = _parse_hash(hashed) if isinstance(hashed, str) else None
    if parsed is None or not password:
        return False
    try:
        key = _scrypt(password, parsed.salt, parsed.log2_n, parsed.r, parsed.p, len(parsed.key))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(key, parsed.key)


# --- addresses -----------------------------------------------------------------------------------


def canonical_address(text: str) -> str | None:
    """The form a user's address is stored and compared in: ``local@domain`` lowercased, the
    local part quoted only when needed.  *text* is an address without angle brackets (an AUTH
    user name, a users-file entry, the ``passwd`` argument).  None when it is not a mailbox
    with a domain (RFC 5321 syntax, UTF-8 allowed; ``postmaster`` alone is not a user).
    """
    if not text or text[0] == "<":
        return None
    try:
        address = parse_forward_path(f"<{text}>", utf8=True)
    except AddressError:
        return None
    if address.domain is None:
        return None
    return str(Address(address.local_part.lower(), address.domain.lower()))


# --- the users file ------------------------------------------------------------------------------


@attrs.frozen
class Users:
    """One version of the users file: canonical address -> scrypt hash string."""

    hashes: Mapping[str, str] = attrs.field(factory=dict)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and canonical_address(address) in self.hashes

    def __len__(self) -> int:
        return len(self.hashes)

    def authenticate(self, username: str, password: str | bytes) -> str | None:
        """The user's canonical address when *password* is theirs, else None.

        *username* is the AUTH authentication identity, an address compared case-insensitively.
        An unknown user costs the same scrypt work as a known one, so timing does not reveal
        which users exist.  CPU-heavy: run it in a worker thread.  Never raises.
        """
        user = canonical_address(username) if isinstance(username, str) else None
        hashed = self.hashes.get(user) if user is not None else None
        if hashed is None or not password:
            verify_password(b"x", _DUMMY_HASH)  # the same work as a real check
            return None
        return user if verify_password(password, hashed) else None


def _parse_entry(line: str) -> tuple[str | None, str | None]:
    """``(canonical address, hash)`` of an ``address:hash`` line; either may be None when that
    part is malformed.  Blank lines and comments give ``(None, None)`` and are not entries:
    callers tell them apart with :func:`_is_entry`."""
    address_text, colon, hashed = line.strip().rpartition(":")
    if not colon:
        return None, None
    return canonical_address(address_text), hashed if _parse_hash(hashed) is not None else None


def _is_entry(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def parse_users(text: str) -> tuple[Users, list[str]]:
    """Parse the text of a users file; return ``(users, problems)``.

    *problems* describe the ignored lines by number and reason, never by content (a bad line
    may hold a password).
    """
    hashes: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not _is_entry(line):
            continue
        address, hashed = _parse_entry(line)
        if ":" not in line:
            problems.append(f"line {number}: expected 'address:hash'")
        elif address is None:
            problems.append(f"line {number}: not a valid address before the last ':'")
        elif hashed is None:
            problems.append(
                f"line {number}: not a scrypt hash (set passwords with 'katerchen passwd'; "
                "a plain-text password is never accepted)"
            )
        elif address in hashes:
            problems.append(f"line {number}: {address} given again (the first one counts)")
        else:
            hashes[address] = hashed
    return Users(hashes), problems


_NO_USERS: Final = Users()
_MISSING: Final = (0, 0, 0)


@attrs.frozen
class _UsersVersion:
    key: tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino); _MISSING for no file
    users: Users


class UsersFile:
    """The users file at *path*, read again only when its (mtime_ns, size, inode) changes, so
    an edit -- in place or by rename, e.g. by ``katerchen passwd`` -- counts from the next AUTH
    without a restart.

    Every method BLOCKS on the file system: call it through ``trio.to_thread.run_sync``.  Safe
    to call from several threads at once.  A missing file means no users (logged once, as
    ``warning users-file-missing``); any other OSError (e.g. EACCES) is raised, which the
    receiver answers with 454 4.7.0 (temporary authentication failure).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cached: _UsersVersion | None = None
        self._lock = threading.Lock()

    def load(self) -> Users:
        """The users as the file holds them now.  Raises OSError as the class says."""
        try:
            info = os.stat(self.path)
            key = (info.st_mtime_ns, info.st_size, info.st_ino)
        except FileNotFoundError:
            key = _MISSING
        with self._lock:
            cached = self._cached
        if cached is not None and cached.key == key:
            return cached.users
        users, problems, key, mode = _read_users(self.path)
        with self._lock:
            cached = self._cached
            if cached is not None and cached.key == key:
                return cached.users  # another thread read this version first (and warned)
            self._cached = _UsersVersion(key, users)
        if key == _MISSING:
            maillog.warning("users-file-missing", file=self.path, note="nobody can authenticate")
        for problem in problems:
            maillog.warning("users-file-error", file=self.path, problem=problem)
        if mode & 0o077:
            maillog.warning(
                "users-file-permissions",
                file=self.path,
                mode=f"{mode & 0o777:04o}",
                note="readable by others; chmod 600 it",
            )
        return users

    def authenticate(self, username: str, password: str | bytes) -> str | None:
        """:meth:`load`, then :meth:`Users.authenticate`: the user's canonical address, or
        None.  BLOCKING and CPU-heavy: one ``trio.to_thread.run_sync`` call for both.  Raises
        OSError as the class says (the password is never in the exception)."""
        return self.load().authenticate(username, password)


def _read_users(path: Path) -> tuple[Users, list[str], tuple[int, int, int], int]:
    """Read and parse the users file: ``(users, problems, key, mode)``.  The key comes from
    the open file, so it describes the very bytes that were read.  Raises OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return _NO_USERS, [], _MISSING, 0
    try:
        info = os.fstat(fd)
        key = (info.st_mtime_ns, info.st_size, info.st_ino)
        if not stat.S_ISREG(info.st_mode):
            return _NO_USERS, ["not a regular file; nobody can authenticate"], key, 0
        with open(fd, "rb", closefd=False) as file:
            data = file.read()
    finally:
        os.close(fd)
    users, problems = parse_users(data.decode("utf-8", "surrogateescape"))
    return users, problems, key, info.st_mode


_files: dict[Path, UsersFile] = {}
_files_lock = threading.Lock()


def load_users(path: Path) -> Users:
    """:meth:`UsersFile.load` of the process-wide :class:`UsersFile` for *path* (so repeated
    calls re-read the file only when it changed).  BLOCKING; raises OSError as
    :class:`UsersFile` says."""
    key = Path(os.path.abspath(path))
    with _files_lock:
        users_file = _files.get(key)
        if users_file is None:
            users_file = _files[key] = UsersFile(key)
    return users_file.load()


def set_password(path: Path, address: str, password: str, *, log2_n: int = DEFAULT_LOG2_N) -> bool:
    """Add the user *address* to the users file at *path*, or change their password.

    The file is rewritten atomically (a temporary file in the same directory, fsync, rename,
    directory fsync) with mode 0600, every other line kept as it was; the user's line is
    replaced in place (later duplicates of it, which were ignored, are dropped) or appended.
    The file is created when missing (its directory too).  Concurrent calls on one file are
    serialised with a lock on the directory.  Returns True when the user was added, False when
    changed.  Raises ValueError for an invalid address or an empty password, OSError when the
    file cannot be written.  CPU-heavy (hashes) and BLOCKING.
    """
    user = canonical_address(address)
    if user is None:
        raise ValueError(f"not a valid address: {address!r}")
    hashed = hash_password(password, log2_n=log2_n)
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked_directory(path.parent):
        try:
            text = path.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            text = ""
        lines = text.splitlines(keepends=True)
        out: list[str] = []
        added = True
        for line in lines:
            if _is_entry(line) and _parse_entry(line)[0] == user:
                if added:
                    out.append(f"{user}:{hashed}\n")
                    added = False
                continue
            out.append(line)
        if added:
            if out and not out[-1].endswith("\n"):
                out[-1] += "\n"
            out.append(f"{user}:{hashed}\n")
        _write_atomically(path, "".join(out).encode("utf-8", "surrogateescape"))
    return added


@contextlib.contextmanager
def _locked_directory(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(dir_fd)


# --- failed attempts -----------------------------------------------------------------------------


def _client_key(ip: str) -> str:
    """What failures are counted by: the IPv4 address, or the /64 of an IPv6 address (one
    end site gets at least a /64, so counting single IPv6 addresses would count nothing).
    An IPv4-mapped IPv6 address counts as its IPv4 address.  Anything else is used as is."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@attrs.define
class FailureTracker:
    """Failed AUTH attempts per client IP: after *max_failures* failures within *window*
    seconds, :meth:`locked` is True until the oldest of them is *window* seconds old.

    Pure: the caller passes the time (any monotonic clock, e.g. ``trio.current_time()``).
    A success does not clear failures (see the module docstring).  IPv6 clients count per /64.
    Memory is bounded: each client keeps at most *max_failures* times, clients whose failures
    have all expired are pruned as new ones come, and beyond *max_clients* the clients with
    the oldest last failure are forgotten first.  Not thread-safe: use it from the trio thread.
    """

    max_failures: int
    window: float
    max_clients: int = 100_000
    _failures: collections.OrderedDict[str, collections.deque[float]] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _next_prune: float = attrs.field(init=False, default=float("-inf"))

    def __attrs_post_init__(self) -> None:
        if self.max_failures < 1 or not self.window > 0 or self.max_clients < 1:
            raise ValueError("max_failures, window and max_clients must be positive")

    def record_failure(self, ip: str, now: float) -> None:
        """Count one failed attempt from *ip* at time *now*."""
        self._prune(now)
        key = _client_key(ip)
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = collections.deque(maxlen=self.max_failures)
        else:
            self._failures.move_to_end(key)
        times.append(now)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def locked(self, ip: str, now: float) -> bool:
        """Whether AUTH from *ip* is refused at time *now* (421 4.7.0)."""
        times = self._failures.get(_client_key(ip))
        return (
            times is not None and len(times) >= self.max_failures and now - times[0] < self.window
        )

    def failures(self, ip: str, now: float) -> int:
        """How many failures of *ip* lie within the window before *now* (for the logs)."""
        times = self._failures.get(_client_key(ip), ())
        return sum(1 for t in times if now - t < self.window)

    def __len__(self) -> int:
        """The number of clients remembered."""
        return len(self._failures)

    def _prune(self, now: float) -> None:
        # At most once per window: the clients are in the order of their last failure, so the
        # expired ones are at the front.
        if now < self._next_prune:
            return
        self._next_prune = now + self.window
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if now - times[-1] < self.window:
                break
            del self._failures[key]


# --- senders -------------------------------------------------------------------------------------


def sender_allowed(
    user: str, reverse_path: Address | str | None, domains_tree: DomainsTree
) -> bool:
    """Whether the authenticated *user* may use *reverse_path* in MAIL FROM.

    *user* is the address :meth:`Users.authenticate` returned.  *reverse_path* is the parsed
    MAIL FROM address (None for ``<>``), or a string without angle brackets.  Allowed: ``<>``;
    the user's own address (compared case-insensitively); an address that *domains_tree*
    routes to the user's mailbox ``<domains>/<domain>/<local part>/`` -- an alias such as
    ``team: alice, bob`` (both may send as team), a sub-address (``alice+tag``), a catch-all
    whose target is the user.  Everything else (a remote address, someone else's mailbox, an
    alias that reaches the user only as a remote forward) is refused.  BLOCKING (routing reads
    the domains tree); OSError from it propagates (a temporary failure: 451 4.3.0).
    """
    if reverse_path is None:
        return True
    own = canonical_address(user)
    if own is None:
        return False
    if isinstance(reverse_path, Address):
        if reverse_path.domain is None:
            return False
        sender = str(Address(reverse_path.local_part.lower(), reverse_path.domain.lower()))
    else:
        if reverse_path == "":
            return True
        found = canonical_address(reverse_path)
        if found is None:
            return False
        sender = found
    if sender == own:
        return True
    own_address = parse_forward_path(f"<{own}>", utf8=True)
    assert own_address.domain is not None
    domain = domain_component(own_address.domain)
    name = mailbox_component(own_address.local_part)
    if domain is None or name is None:
        return False
    resolution = domains_tree.resolve(sender)
    return resolution.accepted and Mailbox(domain, name) in resolution.mailboxes
