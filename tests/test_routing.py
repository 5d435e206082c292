"""Recipient routing as pure policy: no disk, the lookups are sets; plus the real DomainsTree."""

from __future__ import annotations

from pathlib import Path

import pytest

from katerchen.address import Address, parse_forward_path
from katerchen.routing import Decision, DomainsTree, Route, route_recipient

DOMAINS = {"example.test", "other.test"}
MAILBOXES = {("example.test", "alice"), ("example.test", "bob"), ("other.test", "carol")}
UNKNOWN = Decision(Route.UNKNOWN_MAILBOX, "example.test")


class Lookups:
    """Set-backed lookups that record every question, to prove what was (not) looked at."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, ...]] = []

    def domain_exists(self, domain: str) -> bool:
        self.asked.append((domain,))
        return domain in DOMAINS

    def mailbox_exists(self, domain: str, mailbox: str) -> bool:
        self.asked.append((domain, mailbox))
        return (domain, mailbox) in MAILBOXES


def route(path: str, lookups: Lookups | None = None) -> Decision:
    lookups = lookups or Lookups()
    address = parse_forward_path(path, utf8=True)
    return route_recipient(
        address, domain_exists=lookups.domain_exists, mailbox_exists=lookups.mailbox_exists
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<alice@example.test>", Decision(Route.LOCAL, "example.test", "alice")),
        ("<ALICE@Example.TEST>", Decision(Route.LOCAL, "example.test", "alice")),
        ("<carol@other.test>", Decision(Route.LOCAL, "other.test", "carol")),
        ("<postmaster>", Decision(Route.POSTMASTER)),
        ("<PostMaster>", Decision(Route.POSTMASTER)),
        ("<postmaster@example.test>", Decision(Route.POSTMASTER, "example.test", "postmaster")),
        ("<POSTMASTER@other.test>", Decision(Route.POSTMASTER, "other.test", "postmaster")),
        ("<nobody@example.test>", UNKNOWN),
        ("<alice@elsewhere.example>", Decision(Route.RELAY_DENIED)),
        ("<postmaster@elsewhere.example>", Decision(Route.RELAY_DENIED)),
        ("<alice@[127.0.0.1]>", Decision(Route.RELAY_DENIED)),
        ("<postmaster@[127.0.0.1]>", Decision(Route.RELAY_DENIED)),
        ("<alice@[IPv6:::1]>", Decision(Route.RELAY_DENIED)),
        # Relay tricks: our domain with an odd local part is just an unknown mailbox...
        ("<alice%elsewhere.example@example.test>", UNKNOWN),
        ('<"alice@elsewhere.example"@example.test>', UNKNOWN),
        ("<alice!elsewhere.example@example.test>", UNKNOWN),
        # ...and a source route is dropped, leaving the foreign mailbox.
        ("<@example.test:alice@elsewhere.example>", Decision(Route.RELAY_DENIED)),
    ],
)
def test_decisions(path: str, expected: Decision) -> None:
    assert route(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        '<".."@example.test>',
        '<"."@example.test>',
        '<"a/b"@example.test>',
        '<"..\\\\x"@example.test>',
        '<".hidden"@example.test>',
        '<"../../etc"@example.test>',
        '<"a\\\\b"@example.test>',
    ],
)
def test_unsafe_local_parts_refused_without_lookup(path: str) -> None:
    lookups = Lookups()
    decision = route(path, lookups)
    assert decision == Decision(Route.UNSAFE)
    assert not decision.accepted
    assert lookups.asked == []  # no path was ever built from it


def test_unsafe_local_part_built_directly() -> None:
    # Characters the SMTP parser never lets through still cannot reach a lookup.
    lookups = Lookups()
    for local in ("a\x00b", "a\nb", "", "x" * 65):
        decision = route_recipient(
            Address(local, "example.test"),
            domain_exists=lookups.domain_exists,
            mailbox_exists=lookups.mailbox_exists,
        )
        assert decision.route is Route.UNSAFE
    assert lookups.asked == []


def test_address_literal_never_looked_up() -> None:
    lookups = Lookups()
    assert route("<alice@[127.0.0.1]>", lookups).route is Route.RELAY_DENIED
    assert lookups.asked == []


def test_postmaster_needs_no_mailbox_lookup() -> None:
    lookups = Lookups()
    assert route("<postmaster@example.test>", lookups).route is Route.POSTMASTER
    assert lookups.asked == [("example.test",)]


def test_accepted() -> None:
    assert route("<alice@example.test>").accepted
    assert route("<postmaster>").accepted
    assert route("<postmaster@example.test>").accepted
    assert not route("<nobody@example.test>").accepted
    assert not route("<x@elsewhere.example>").accepted
    assert not route('<".."@example.test>').accepted


def test_domains_tree(tmp_path: Path) -> None:
    (tmp_path / "example.test" / "alice").mkdir(parents=True)
    (tmp_path / "example.test" / "file").touch()  # a file is not a mailbox
    (tmp_path / "notadomain.test").touch()
    tree = DomainsTree(tmp_path)
    assert tree.route(Address("Alice", "EXAMPLE.test")) == Decision(
        Route.LOCAL, "example.test", "alice"
    )
    assert tree.route(Address("file", "example.test")).route is Route.UNKNOWN_MAILBOX
    assert tree.route(Address("bob", "example.test")).route is Route.UNKNOWN_MAILBOX
    assert tree.route(Address("alice", "notadomain.test")).route is Route.RELAY_DENIED
    assert tree.route(Address("postmaster", "example.test")).route is Route.POSTMASTER
    assert tree.route(Address("..", "example.test")).route is Route.UNSAFE
