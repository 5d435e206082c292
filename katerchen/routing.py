"""Recipient routing: the one policy that decides where a recipient's mail goes, shared by the
receiver (RCPT is accepted exactly when this routes it somewhere) and the delivery (which resolves
again at delivery time, against the tree as it is then).

The policy is a pure function, :func:`resolve_recipient`, of an address and a small read-only
:class:`RoutingView` of the domains tree.  :class:`DomainsTree` is that view over the real
directories: its methods block on the file system and so run in a worker thread.

The domains tree::

    <domains>/<domain>/            a served domain
    <domains>/<domain>/<mailbox>/  a local mailbox (a Maildir)
    <domains>/<domain>/aliases     optional: "name: target, target" lines (see parse_aliases)

Theory of operation: :func:`resolve_recipient` asks, in this order,

0. With ``[delivery] sink`` set (a test sink, :mod:`katerchen.testing`), every recipient goes
   to that one mailbox, and nothing below is asked.
1. The bare ``<postmaster>`` (no domain; RFC 5321 4.5.1 says it must be accepted) goes to
   ``[delivery] postmaster`` when that is set and reaches somewhere; else to ``postmaster@D``
   where D is the server's hostname if served, else its closest served parent domain (``mx.``
   ``example.org`` -> ``example.org``; never a bare top-level name), else the first served domain
   in sorted order.  With no served domain at all it is refused (nothing could ever read it).
2. A local part that :func:`katerchen.address.mailbox_component` refuses (``..``, ``/``, NUL, a
   leading dot, control characters...) is UNSAFE before anything is looked up, so no path is
   ever built from it.
3. A domain that is not served -- an address literal, or a name without a directory -- is
   RELAY_DENIED.  Relay tricks (``user%other@ours``, ``"user@other"@ours``) are our domain with
   an odd local part and end as an unknown mailbox; a source route ``<@ours:user@other>``
   reaches us with the route dropped, as ``user@other``, and is refused here.
4. The local part, lowercased (local parts match case-insensitively), is looked up: first the
   whole of it, then -- when it holds the recipient delimiter after its first character -- the
   part before the first delimiter (``alice+tag`` -> ``alice``).  For each of those names, an
   alias wins over a mailbox directory of the same name (so ``alice: alice, bob`` keeps a copy
   and forwards one); the first name that is either decides.
5. ``postmaster`` (or ``postmaster+tag``) with neither alias nor mailbox goes to ``[delivery]
   postmaster`` when that is set and reaches somewhere, else to ``<domain>/postmaster/`` (the
   delivery creates it): postmaster of a served domain is never refused.
6. Otherwise the domain's catch-all alias ``*`` takes it, when the aliases file has one.
7. Otherwise UNKNOWN_MAILBOX.

Alias targets are resolved recursively with the same steps 4-5 (a bare name means that name in the
alias's own domain; an address in a served domain is resolved there; any other address is a
remote forward).  The catch-all (6) applies to the original recipient only: a target that names
nobody is a configuration mistake to report, not mail to sweep up (and ``*: nobody`` cannot then
loop).  Every target passes through :mod:`katerchen.address` parsing and
:func:`~katerchen.address.mailbox_component` before it may name a directory.

Expansion is a depth-first walk.  An alias reached again while it is being expanded is a loop --
except the alias that is expanding right now naming itself, which means "this address as if it
had no alias" (``alice: alice, bob``).  An alias reached again after it was expanded is a
duplicate and adds nothing, so a mailbox reached twice gets one copy.  A loop, or a chain deeper
than :data:`MAX_ALIAS_DEPTH`, refuses the whole recipient with LOOP: its expansion cannot be
trusted, and the sender hears about it (550 5.4.6, or a bounce).  A target that resolves nowhere
(an unknown name, an unsafe one) is dropped, recorded in :attr:`Resolution.dropped`; the recipient
is refused only when nothing at all is left.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, Protocol

import attrs

from katerchen import maillog
from katerchen.address import (
    Address,
    AddressError,
    domain_component,
    mailbox_component,
    parse_forward_path,
)
from katerchen.config import Config, ConfigError, DeliveryConfig

__all__ = [
    "ALIASES_FILE",
    "CATCH_ALL",
    "MAX_ALIAS_DEPTH",
    "DomainsTree",
    "Mailbox",
    "Resolution",
    "Route",
    "RoutingView",
    "check_postmaster",
    "parse_aliases",
    "resolve_recipient",
    "sink_mailbox",
]

#: The aliases file of a domain: ``<domains>/<domain>/aliases``.
ALIASES_FILE: Final = "aliases"
#: The alias name of a domain's catch-all.
CATCH_ALL: Final = "*"
#: The longest alias chain followed (sendmail's default is 10; Postfix's 1000 is for whole maps).
MAX_ALIAS_DEPTH: Final = 20

_POSTMASTER: Final = "postmaster"


class Route(enum.Enum):
    """Why a recipient is refused (:attr:`Resolution.refusal`)."""

    UNKNOWN_MAILBOX = "unknown-mailbox"  # served domain, no such mailbox or alias
    RELAY_DENIED = "relay-denied"  # not a served domain (address literals included)
    UNSAFE = "unsafe"  # the local part cannot name a mailbox directory
    LOOP = "loop"  # alias loop, or alias chain deeper than MAX_ALIAS_DEPTH

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced status code of this refusal (the receiver's 550 uses it too)."""
        return _STATUS[self]

    @property
    def description(self) -> str:
        """A short human-readable reason, for logs and bounces."""
        return _DESCRIPTION[self]


_STATUS: Final = {
    Route.UNKNOWN_MAILBOX: "5.1.1",  # bad destination mailbox address
    Route.RELAY_DENIED: "5.7.1",  # delivery not authorized
    Route.UNSAFE: "5.1.3",  # bad destination mailbox address syntax
    Route.LOOP: "5.4.6",  # routing loop detected
}
_DESCRIPTION: Final = {
    Route.UNKNOWN_MAILBOX: "mailbox unavailable",
    Route.RELAY_DENIED: "relaying denied",
    Route.UNSAFE: "not a valid mailbox name",
    Route.LOOP: "alias loop or alias chain too deep",
}


@attrs.frozen
class Mailbox:
    """A local Maildir destination: ``<domains>/<domain>/<name>/``.

    Both fields are path components made by :mod:`katerchen.address` (lowercase, checked safe).
    """

    domain: str
    name: str

    @property
    def address(self) -> str:
        """``name@domain``, as the Delivered-To header shows it."""
        return f"{self.name}@{self.domain}"


@attrs.frozen
class Resolution:
    """Where one recipient goes.

    ``mailboxes`` and ``remote`` (forward targets, ``str(Address)``) are deduplicated, in the
    order first reached, and both empty when the recipient is refused.  ``refusal`` is None when
    the recipient routes somewhere, else why not.  ``dropped`` lists the alias targets that led
    nowhere and were left out (as written in the aliases file, with the reason), for the logs;
    it may be non-empty for an accepted recipient.
    """

    mailboxes: tuple[Mailbox, ...] = ()
    remote: tuple[str, ...] = ()
    refusal: Route | None = None
    dropped: tuple[tuple[str, Route], ...] = ()

    @property
    def accepted(self) -> bool:
        return self.refusal is None


class RoutingView(Protocol):
    """The read-only view of the domains tree the policy needs.

    Only ever called with domain and mailbox components made by :mod:`katerchen.address`.
    """

    def domain_exists(self, domain: str) -> bool:
        """Whether ``domain`` is served."""

    def mailbox_exists(self, domain: str, mailbox: str) -> bool:
        """Whether the mailbox directory exists in the (served) domain."""

    def aliases(self, domain: str) -> Mapping[str, tuple[str, ...]]:
        """The domain's aliases: lowercase name (or ``"*"``) -> targets as written."""

    def served_domains(self) -> Iterable[str]:
        """Every served domain (asked only to route the bare ``<postmaster>``)."""


# --- the policy ----------------------------------------------------------------------------------


def resolve_recipient(
    address: Address,
    view: RoutingView,
    *,
    delimiter: str,
    postmaster: str | Address | None,
    hostname: str = "",
    sink: str | Address | None = None,
) -> Resolution:
    """Resolve the forward-path *address* against *view* (see the module docstring for the rules).

    *delimiter* is ``[delivery] recipient_delimiter`` ("" = no sub-addressing); *postmaster* is
    ``[delivery] postmaster`` ("" or None = none; a string that does not parse counts as none);
    *hostname* is ``[server] hostname``, used only for the bare ``<postmaster>``.  *sink* is
    ``[delivery] sink``: when it names a mailbox (:func:`sink_mailbox`), every address resolves
    to that mailbox and nothing else is consulted -- no domain, alias or remote target.  Pure
    apart from what *view* does; never raises for any :class:`~katerchen.address.Address`
    (exceptions of the view propagate).
    """
    sink_box = sink_mailbox(sink)
    if sink_box is not None:
        # A test sink: whatever the client sent to, it lands in one local mailbox.  No path is
        # built from *address*, and no remote target can come out of here: a sink never relays.
        return Resolution(mailboxes=(sink_box,))
    global_postmaster = _as_address(postmaster)
    if address.domain is None:
        # The parser makes a domain-less address only of <postmaster>.
        if address.local_part.lower() != _POSTMASTER:
            return Resolution(refusal=Route.RELAY_DENIED)
        if global_postmaster is not None:
            found = _Walk(view, delimiter, None).resolve_target(global_postmaster)
            if found.accepted:
                return found
        domain = _postmaster_domain(view, hostname)
        if domain is None:
            return Resolution(refusal=Route.UNKNOWN_MAILBOX)
        return _Walk(view, delimiter, global_postmaster).resolve_original(domain, _POSTMASTER)
    name = mailbox_component(address.local_part)
    if name is None:
        return Resolution(refusal=Route.UNSAFE)
    domain = domain_component(address.domain)
    if domain is None or not view.domain_exists(domain):
        return Resolution(refusal=Route.RELAY_DENIED)
    return _Walk(view, delimiter, global_postmaster).resolve_original(domain, name)


def sink_mailbox(sink: str | Address | None) -> Mailbox | None:
    """The mailbox of the ``[delivery] sink`` address *sink*; None when it is unset ("" or None)
    or cannot name a mailbox (config.py refuses such a setting)."""
    address = _as_address(sink)
    if address is None or address.domain is None:
        return None
    domain = domain_component(address.domain)
    name = mailbox_component(address.local_part)
    if domain is None or name is None:
        return None
    return Mailbox(domain, name)


def _as_address(postmaster: str | Address | None) -> Address | None:
    if postmaster is None or isinstance(postmaster, Address):
        return postmaster
    if not postmaster:
        return None
    try:
        address = parse_forward_path(f"<{postmaster}>", utf8=True)
    except AddressError:
        return None  # config.py refuses this; a pure caller passing junk gets "none"
    return address if address.domain is not None else None


def _postmaster_domain(view: RoutingView, hostname: str) -> str | None:
    """The domain whose postmaster gets the bare ``<postmaster>``."""
    name = domain_component(hostname) if hostname else None
    if name is not None:
        labels = name.split(".")
        # The hostname itself, then its parents down to two labels: mx.example.org is most
        # likely example.org's server, but "org" is nobody's domain.
        candidates = [name] + [".".join(labels[i:]) for i in range(1, len(labels) - 1)]
        for candidate in candidates:
            if view.domain_exists(candidate):
                return candidate
    served = sorted(d for d in view.served_domains() if domain_component(d) == d)
    return served[0] if served else None


@attrs.define
class _Walk:
    """The state of one resolution: a depth-first walk through the aliases."""

    view: RoutingView
    delimiter: str
    # [delivery] postmaster, or None; also None inside the walk that resolves it, so that
    # resolving it can never come back to it.
    global_postmaster: Address | None
    mailboxes: dict[Mailbox, None] = attrs.field(factory=dict)  # an ordered set
    remote: dict[str, None] = attrs.field(factory=dict)
    dropped: list[tuple[str, Route]] = attrs.field(factory=list)
    loop: bool = False
    stack: list[tuple[str, str]] = attrs.field(factory=list)  # aliases being expanded
    expanded: dict[tuple[str, str], bool] = attrs.field(factory=dict)  # done: reached anything?

    def resolve_original(self, domain: str, name: str) -> Resolution:
        routed = self._local(domain, name, original=True)
        return self._result(routed, Route.UNKNOWN_MAILBOX)

    def resolve_target(self, address: Address) -> Resolution:
        routed = self._address(address, str(address))
        return self._result(routed, Route.UNKNOWN_MAILBOX)

    def _result(self, routed: bool, default: Route) -> Resolution:
        dropped = tuple(self.dropped)
        if self.loop:
            return Resolution(refusal=Route.LOOP, dropped=dropped)
        if not routed:
            refusal = dropped[0][1] if dropped else default
            return Resolution(refusal=refusal, dropped=dropped)
        return Resolution(tuple(self.mailboxes), tuple(self.remote), None, dropped)

    def _local(self, domain: str, name: str, *, original: bool) -> bool:
        """Route the safe lowercase local part *name* of the served *domain*; True when it
        reaches at least one destination."""
        names = [name]
        if self.delimiter:
            cut = name.find(self.delimiter)
            if cut > 0:
                names.append(name[:cut])
        aliases = self.view.aliases(domain)
        current = self.stack[-1] if self.stack else None
        for candidate in names:
            node = (domain, candidate)
            # The alias expanding right now naming itself means its mailbox, not itself again.
            # "*" (a valid local part) is the catch-all only through the catch-all rule below.
            if candidate in aliases and node != current and candidate != CATCH_ALL:
                return self._alias(node, aliases[candidate])
            if self.view.mailbox_exists(domain, candidate):
                self.mailboxes[Mailbox(domain, candidate)] = None
                return True
        if _POSTMASTER in names:
            return self._postmaster(domain)
        if original and CATCH_ALL in aliases:
            return self._alias((domain, CATCH_ALL), aliases[CATCH_ALL])
        return False

    def _alias(self, node: tuple[str, str], targets: tuple[str, ...]) -> bool:
        if node in self.expanded:
            return self.expanded[node]  # reached before: a duplicate, nothing new
        if node in self.stack or len(self.stack) >= MAX_ALIAS_DEPTH:
            self.loop = True
            return False
        self.stack.append(node)
        routed = False
        for target in targets:
            if self.loop:
                break
            routed |= self._target(node[0], target)
        self.stack.pop()
        self.expanded[node] = routed
        return routed

    def _target(self, domain: str, target: str) -> bool:
        address = _parse_target(target, domain)
        if address is None:
            self.dropped.append((target, Route.UNSAFE))
            return False
        return self._address(address, target)

    def _address(self, address: Address, written: str) -> bool:
        """Route an alias target (or the configured postmaster) that is a whole address."""
        assert address.domain is not None
        domain = domain_component(address.domain)
        if domain is None or not self.view.domain_exists(domain):
            # Forwarding somewhere else: the administrator wrote it, so this is no open relay.
            self.remote[str(Address(address.local_part, address.domain.lower()))] = None
            return True
        name = mailbox_component(address.local_part)
        if name is None:
            self.dropped.append((written, Route.UNSAFE))
            return False
        if self._local(domain, name, original=False):
            return True
        if not self.loop:
            self.dropped.append((written, Route.UNKNOWN_MAILBOX))
        return False

    def _postmaster(self, domain: str) -> bool:
        """postmaster@*domain* with neither alias nor mailbox: never refused."""
        if self.global_postmaster is not None:
            # A walk of its own: if it fails (or loops) we fall back, and its half-results
            # must not leak into this one.
            found = _Walk(self.view, self.delimiter, None).resolve_target(self.global_postmaster)
            if found.accepted:
                self.mailboxes.update(dict.fromkeys(found.mailboxes))
                self.remote.update(dict.fromkeys(found.remote))
                self.dropped.extend(found.dropped)
                return True
        self.mailboxes[Mailbox(domain, _POSTMASTER)] = None
        return True


def _parse_target(target: str, domain: str) -> Address | None:
    """An alias target as an address: ``name`` is ``name@<domain>``.  None when it is not a
    valid mailbox (RFC 5321 syntax, UTF-8 allowed)."""
    path = f"<{target}>" if _has_domain(target) else f"<{target}@{domain}>"
    try:
        address = parse_forward_path(path, utf8=True)
    except AddressError:
        return None
    return address if address.domain is not None else None


def _has_domain(target: str) -> bool:
    """Whether *target* has an ``@`` outside a quoted local part."""
    if target.startswith('"'):
        end = _closing_quote(target)
        return end is not None and "@" in target[end:]
    return "@" in target


def _closing_quote(text: str) -> int | None:
    """The index after the quoted string that opens *text*, or None when it is unterminated."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return None


# --- the aliases file ----------------------------------------------------------------------------


def parse_aliases(text: str, domain: str) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Parse the aliases file of the served *domain*; return ``(aliases, problems)``.

    Format, one alias per line::

        # a comment; blank lines are fine
        name: target, target     # a comment may follow after a space
        team: alice, bob,
              carol              # a line starting with white space continues the one before
        *: alice                 # the catch-all (only when present)

    Names and bare-name targets are local parts of *domain*, matched case-insensitively (names
    are stored lowercase); a target may also be a whole address (``bob@example.org``, or a
    quoted local part ``"a b"@example.org``).  Pipes (``|cmd``), files (``/path``) and
    ``:include:`` are not supported.  A malformed line -- no colon, a bad name or target, no
    targets, a name given twice -- is left out and described in *problems* (``"line N: why"``);
    the rest of the file still counts.
    """
    aliases: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    for number, line in _logical_lines(text, problems):
        name_part, colon, rest = line.partition(":")
        name = name_part.strip()
        if not colon:
            problems.append(f"line {number}: expected 'name: target, target'")
            continue
        problem = _name_problem(name, domain)
        if problem is None and name.lower() in aliases:
            problem = f"alias {name!r} given again (the first one counts)"
        targets, target_problem = _split_targets(rest)
        problem = problem or target_problem
        if problem is None:
            for target in targets:
                problem = _target_problem(target, domain)
                if problem is not None:
                    break
        if problem is not None:
            problems.append(f"line {number}: {problem}")
            continue
        aliases[name.lower()] = tuple(targets)
    return aliases, problems


def _logical_lines(text: str, problems: list[str]) -> Iterable[tuple[int, str]]:
    """(first line number, text) of each entry: comments and blank lines dropped, continuation
    lines joined to the line they continue."""
    entry: tuple[int, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line.strip():
            continue
        if line[0] in " \t":
            if entry is None:
                problems.append(f"line {number}: continuation line without an alias before it")
            else:
                entry = (entry[0], f"{entry[1]} {line.strip()}")
            continue
        if entry is not None:
            yield entry
        entry = (number, line)
    if entry is not None:
        yield entry


def _strip_comment(line: str) -> str:
    """*line* without a ``#`` comment: one that starts the line or follows white space, outside
    a quoted string (``#`` is a valid local-part character elsewhere)."""
    quoted = False
    i = 0
    while i < len(line):
        char = line[i]
        if quoted and char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def _split_targets(text: str) -> tuple[list[str], str | None]:
    """Split at commas outside quoted strings; white space around targets is dropped."""
    targets: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        char = text[i]
        if quoted and char == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            targets.append("".join(current).strip())
            current = []
        else:
            current.append(char)
        i += 1
    if quoted:
        return [], "unterminated quoted string"
    targets.append("".join(current).strip())
    if targets and not targets[-1]:
        targets.pop()  # a trailing comma (e.g. before a continuation line) is fine
    if not targets:
        return [], "no targets"
    if not all(targets):
        return [], "empty target between commas"
    return targets, None


def _name_problem(name: str, domain: str) -> str | None:
    if name == CATCH_ALL:
        return None
    if not name:
        return "missing alias name before ':'"
    if "@" in name or '"' in name:
        return f"alias name {name!r} must be a plain local part (the domain is {domain})"
    try:
        parse_forward_path(f"<{name}@{domain}>", utf8=True)
    except AddressError as exc:
        return f"alias name {name!r} is not a valid local part ({exc})"
    if mailbox_component(name) is None:
        return f"alias name {name!r} is not a valid mailbox name"
    return None


def _target_problem(target: str, domain: str) -> str | None:
    if target.startswith("|") or target.startswith("/") or target.lower().startswith(":include:"):
        return f"target {target!r}: pipes, files and :include: are not supported"
    if target == CATCH_ALL:
        return "'*' is the catch-all's name, not a target"
    address = _parse_target(target, domain)
    if address is None:
        return f"target {target!r} is not a valid address"
    # A local target must be able to name a mailbox directory.  (One in another served domain
    # is caught when it is resolved: which domains are served can change after this parse.)
    assert address.domain is not None
    if address.domain.lower() == domain and mailbox_component(address.local_part) is None:
        return f"target {target!r} is not a valid mailbox name"
    return None


# --- the real tree -------------------------------------------------------------------------------


@attrs.frozen
class _AliasesVersion:
    key: tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino) of the file it was read from
    aliases: Mapping[str, tuple[str, ...]]


_NO_ALIASES: Final[Mapping[str, tuple[str, ...]]] = {}


class DomainsTree:
    """The routing view over the real domains tree at *root*, and :meth:`resolve` against it.

    Every method BLOCKS on the file system: call it through ``trio.to_thread.run_sync``.  It is
    safe to call from several threads at once.  Missing directories and files are answers ("not
    served", "no aliases"); any other OSError (e.g. EACCES) is raised, and is a temporary
    failure for the caller.  A symlinked directory counts as a directory (the administrator put
    it there).

    Each domain's aliases file is parsed again only when its (mtime_ns, size, inode) changes, so
    an edit -- in place or by rename -- is picked up on the next lookup.  Malformed lines are
    skipped and logged (``warning aliases-error``) once per version of the file.
    """

    def __init__(self, root: Path, delivery: DeliveryConfig, *, hostname: str = "") -> None:
        self.root = root
        self.delivery = delivery
        self.hostname = hostname
        self._aliases: dict[str, _AliasesVersion] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> DomainsTree:
        """The tree of *config*: its domains directory, ``[delivery]`` and hostname."""
        return cls(config.directories.domains, config.delivery, hostname=config.server.hostname)

    # --- RoutingView ---

    def domain_exists(self, domain: str) -> bool:
        return _is_dir(self.root / domain)

    def mailbox_exists(self, domain: str, mailbox: str) -> bool:
        return _is_dir(self.root / domain / mailbox)

    def served_domains(self) -> list[str]:
        try:
            with os.scandir(self.root) as entries:
                return sorted(e.name for e in entries if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def aliases(self, domain: str) -> Mapping[str, tuple[str, ...]]:
        path = self.root / domain / ALIASES_FILE
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            with self._lock:
                self._aliases.pop(domain, None)
            return _NO_ALIASES
        key = (info.st_mtime_ns, info.st_size, info.st_ino)
        with self._lock:
            cached = self._aliases.get(domain)
        if cached is not None and cached.key == key:
            return cached.aliases
        aliases, problems, key = _read_aliases(path, domain)
        with self._lock:
            cached = self._aliases.get(domain)
            if cached is not None and cached.key == key:
                return cached.aliases  # another thread read this version first (and warned)
            self._aliases[domain] = _AliasesVersion(key, aliases)
        for problem in problems:
            maillog.warning("aliases-error", file=path, problem=problem)
        return aliases

    # --- resolving ---

    def resolve(self, address: Address | str) -> Resolution:
        """Resolve a recipient (see :func:`resolve_recipient`).  A string is a forward-path as
        the envelope stores it (``"postmaster"`` alone being the bare ``<postmaster>``); one that
        does not parse is UNSAFE.  BLOCKING; raises OSError (temporary) as the class says."""
        if isinstance(address, str):
            try:
                address = parse_forward_path(f"<{address}>", utf8=True)
            except AddressError:
                return Resolution(refusal=Route.UNSAFE)
        return resolve_recipient(
            address,
            self,
            delimiter=self.delivery.recipient_delimiter,
            postmaster=self.delivery.postmaster,
            hostname=self.hostname,
            sink=self.delivery.sink,
        )


def _is_dir(path: Path) -> bool:
    """Like Path.is_dir (which also takes a symlink loop for "no"), but any other OSError is
    raised: a directory we may not look into is a temporary problem, not a missing mailbox."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return False
        raise
    except ValueError:  # e.g. a NUL: address.py never makes one, but a view must not crash
        return False


def _read_aliases(
    path: Path, domain: str
) -> tuple[Mapping[str, tuple[str, ...]], list[str], tuple[int, int, int]]:
    """Read and parse one aliases file.  The key comes from the open file, so it describes the
    very bytes that were read even if the file is replaced meanwhile.  Raises OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return _NO_ALIASES, [], (0, 0, 0)
    try:
        info = os.fstat(fd)
        key = (info.st_mtime_ns, info.st_size, info.st_ino)
        if not stat.S_ISREG(info.st_mode):
            # A directory or a FIFO by that name: a mistake to report, not a reason to stop
            # routing the domain.
            return _NO_ALIASES, ["not a regular file; no aliases used"], key
        with open(fd, "rb", closefd=False) as file:
            data = file.read()
    finally:
        os.close(fd)
    problems: list[str] = []
    lines: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            problems.append(f"line {number}: not valid UTF-8")
            lines.append("")  # keeps the numbering of the lines after it
    aliases, parse_problems = parse_aliases("\n".join(lines), domain)
    return aliases, problems + parse_problems, key


# --- the config check ----------------------------------------------------------------------------


def check_postmaster(config: Config) -> None:
    """Refuse a ``[delivery] postmaster`` that reaches no local mailbox (then postmaster mail
    would fall back to ``<domain>/postmaster/`` without anybody meaning it to).  Nothing to check
    when it is not set.  BLOCKING (reads the domains tree).  Raises :class:`ConfigError` naming
    ``[delivery] postmaster``.
    """
    value = config.delivery.postmaster
    if not value:
        return
    key = "[delivery] postmaster"
    address = _as_address(value)
    if address is None:  # pragma: no cover - config.py refused it already
        raise ConfigError(f"{value!r} is not an address", key=key)
    tree = DomainsTree.from_config(config)
    try:
        found = _Walk(tree, config.delivery.recipient_delimiter, None).resolve_target(address)
    except OSError as exc:
        raise ConfigError(
            f"cannot check {value}: {exc.strerror or exc} ({exc.filename})", key=key
        ) from None
    assert address.domain is not None
    domain = domain_component(address.domain)
    where = config.directories.domains
    if found.refusal is Route.LOOP:
        raise ConfigError(f"{value} leads into an alias loop (or too deep)", key=key)
    if found.remote and not found.mailboxes and domain is not None and tree.domain_exists(domain):
        raise ConfigError(
            f"{value} only forwards to other servers ({', '.join(found.remote)}); "
            "it must reach a local mailbox",
            key=key,
        )
    if not found.mailboxes:
        if domain is None or not tree.domain_exists(domain):
            # (Checked first: the walk took an unserved domain for a remote forward.)
            raise ConfigError(
                f"{value}: {address.domain} is not a served domain (no directory {where}/"
                f"{domain or address.domain})",
                key=key,
            )
        inner = [f"{target}: {route.description}" for target, route in found.dropped[:-1]]
        if inner:  # an alias whose targets lead nowhere
            raise ConfigError(f"{value} reaches no mailbox ({'; '.join(inner)})", key=key)
        raise ConfigError(
            f"{value}: no mailbox or alias {address.local_part!r} in {where / domain}", key=key
        )
