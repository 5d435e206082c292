"""Recipient routing: the policy that decides whether this server takes a RCPT forward-path.

The decision is a pure function of the address and two lookups (:func:`route_recipient`); the
lookups against the real domains tree live apart in :class:`DomainsTree`, whose methods block on
the file system and so are called from a worker thread.  Aliases will slot in here later: they are
one more lookup and one more :class:`Route`.

Theory of operation, in the order :func:`route_recipient` asks its questions:

1. The bare ``<postmaster>`` (no domain) is always ours (RFC 5321 4.5.1).
2. A local part that :func:`katerchen.address.mailbox_component` refuses (``..``, ``/``, NUL,
   a leading dot, control characters...) is refused before anything else, so no lookup -- and no
   path -- is ever built from it.
3. A domain that is not a served one -- an address literal, or a name without a directory in the
   domains tree -- is somebody else's: we do not relay, 550 5.7.1.  Relay tricks such as
   ``user%other@ours`` or ``"user@other"@ours`` are *our* domain with an odd local part, and end
   at step 5 as an unknown mailbox; a source route ``<@ours:user@other>`` reaches us with the
   route already dropped, as ``user@other``, and ends here.
4. ``postmaster`` (any case) is accepted for every served domain, mailbox directory or not.
5. Otherwise the mailbox directory decides: it exists, ours; it does not, 550 5.1.1.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path

import attrs

from katerchen.address import Address, domain_component, mailbox_component

__all__ = [
    "Decision",
    "DomainsTree",
    "Route",
    "route_recipient",
]


class Route(enum.Enum):
    """Where a recipient goes, or why it is refused (the receiver turns a refusal into 550
    5.1.1, 5.7.1 or 5.1.3)."""

    LOCAL = "local"  # <domains>/<domain>/<mailbox>/ exists
    POSTMASTER = "postmaster"  # postmaster of a served domain, or the bare <postmaster>
    UNKNOWN_MAILBOX = "unknown-mailbox"  # served domain, no such mailbox
    RELAY_DENIED = "relay-denied"  # not a served domain (address literals included)
    UNSAFE = "unsafe"  # the local part cannot name a mailbox directory

    @property
    def accepted(self) -> bool:
        return self in (Route.LOCAL, Route.POSTMASTER)


@attrs.frozen
class Decision:
    """The routing of one recipient.

    ``domain`` and ``mailbox`` are the path components (lowercased, checked safe by
    :mod:`katerchen.address`) when they were computed, else None: ``domain`` is None for the bare
    ``<postmaster>`` and for refused domains, ``mailbox`` is None unless the route is LOCAL or
    POSTMASTER of a served domain.
    """

    route: Route
    domain: str | None = None
    mailbox: str | None = None

    @property
    def accepted(self) -> bool:
        return self.route.accepted


_POSTMASTER = "postmaster"


def route_recipient(
    address: Address,
    *,
    domain_exists: Callable[[str], bool],
    mailbox_exists: Callable[[str, str], bool],
) -> Decision:
    """Decide where the forward-path *address* goes.

    *domain_exists(domain)* says whether a domain component (lowercase, safe) is served;
    *mailbox_exists(domain, mailbox)* whether a mailbox component exists in it.  Both are only
    ever called with components produced by :mod:`katerchen.address`.  Pure apart from what the
    two callables do; never raises for any :class:`~katerchen.address.Address`.
    """
    local_part = address.local_part
    if address.domain is None:
        # The parser yields a domain-less address only for <postmaster>; anything else
        # domain-less has no served domain to belong to.
        if local_part.lower() == _POSTMASTER:
            return Decision(Route.POSTMASTER)
        return Decision(Route.RELAY_DENIED)
    mailbox = mailbox_component(local_part)
    if mailbox is None:
        return Decision(Route.UNSAFE)
    domain = domain_component(address.domain)
    if domain is None or not domain_exists(domain):
        return Decision(Route.RELAY_DENIED)
    if mailbox == _POSTMASTER:
        return Decision(Route.POSTMASTER, domain, mailbox)
    if mailbox_exists(domain, mailbox):
        return Decision(Route.LOCAL, domain, mailbox)
    return Decision(Route.UNKNOWN_MAILBOX, domain)


@attrs.frozen
class DomainsTree:
    """The real domains tree: ``<root>/<domain>/`` per served domain, ``<mailbox>/`` inside.

    Every method BLOCKS on the file system: call it through ``trio.to_thread.run_sync``.
    A symlinked directory counts as a directory (the administrator put it there).
    """

    root: Path

    def domain_exists(self, domain: str) -> bool:
        return (self.root / domain).is_dir()

    def mailbox_exists(self, domain: str, mailbox: str) -> bool:
        return (self.root / domain / mailbox).is_dir()

    def route(self, address: Address) -> Decision:
        """:func:`route_recipient` against this tree.  BLOCKING."""
        return route_recipient(
            address, domain_exists=self.domain_exists, mailbox_exists=self.mailbox_exists
        )
