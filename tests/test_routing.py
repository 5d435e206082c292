"""Recipient routing: the pure policy as tables over an in-memory view (no disk), the aliases
file parser, and DomainsTree over real directories."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from katerchen.address import Address, parse_forward_path
from katerchen.config import DeliveryConfig
from katerchen.routing import (
    MAX_ALIAS_DEPTH,
    DomainsTree,
    Mailbox,
    Resolution,
    Route,
    parse_aliases,
    resolve_recipient,
)

from .conftest import log_lines

EXAMPLE = Path(__file__).resolve().parent.parent / "katerchen.toml.example"


class View:
    """An in-memory routing view that records every question, to prove what was (not) asked."""

    def __init__(
        self,
        mailboxes: dict[str, set[str]],
        aliases: dict[str, dict[str, tuple[str, ...]]] | None = None,
    ) -> None:
        self.mailboxes = mailboxes
        self.alias_tables = aliases or {}
        self.asked: list[tuple[str, ...]] = []

    def domain_exists(self, domain: str) -> bool:
        self.asked.append((domain,))
        return domain in self.mailboxes

    def mailbox_exists(self, domain: str, mailbox: str) -> bool:
        self.asked.append((domain, mailbox))
        return mailbox in self.mailboxes[domain]

    def aliases(self, domain: str) -> Mapping[str, tuple[str, ...]]:
        self.asked.append(("aliases", domain))
        return self.alias_tables.get(domain, {})

    def served_domains(self) -> list[str]:
        self.asked.append(("served",))
        return list(self.mailboxes)


def tree(aliases: dict[str, dict[str, tuple[str, ...]]] | None = None) -> View:
    return View(
        {"example.test": {"alice", "bob", "alice+lists"}, "other.test": {"carol"}},
        aliases,
    )


def resolve(
    path: str,
    view: View | None = None,
    *,
    delimiter: str = "+",
    postmaster: str = "",
    hostname: str = "mx.example.test",
) -> Resolution:
    return resolve_recipient(
        parse_forward_path(path, utf8=True),
        view if view is not None else tree(),
        delimiter=delimiter,
        postmaster=postmaster,
        hostname=hostname,
    )


def to(*names: str) -> Resolution:
    """An accepted Resolution to local mailboxes given as "name@domain"."""
    boxes = []
    for name in names:
        local, _, domain = name.partition("@")
        boxes.append(Mailbox(domain, local))
    return Resolution(mailboxes=tuple(boxes))


REFUSED_UNKNOWN = Resolution(refusal=Route.UNKNOWN_MAILBOX)
RELAY_DENIED = Resolution(refusal=Route.RELAY_DENIED)
UNSAFE = Resolution(refusal=Route.UNSAFE)
LOOP = Resolution(refusal=Route.LOOP)


# --- mailboxes, domains, relay -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<alice@example.test>", to("alice@example.test")),
        ("<ALICE@Example.TEST>", to("alice@example.test")),
        ("<carol@other.test>", to("carol@other.test")),
        ("<nobody@example.test>", REFUSED_UNKNOWN),
        ("<carol@example.test>", REFUSED_UNKNOWN),
        ("<alice@elsewhere.example>", RELAY_DENIED),
        ("<postmaster@elsewhere.example>", RELAY_DENIED),
        ("<alice@[127.0.0.1]>", RELAY_DENIED),
        ("<postmaster@[127.0.0.1]>", RELAY_DENIED),
        ("<alice@[IPv6:::1]>", RELAY_DENIED),
        ("<alice@example.test.elsewhere.example>", RELAY_DENIED),
        # Relay tricks: our domain with an odd local part is just an unknown mailbox...
        ("<alice%elsewhere.example@example.test>", REFUSED_UNKNOWN),
        ('<"alice@elsewhere.example"@example.test>', REFUSED_UNKNOWN),
        ("<alice!elsewhere.example@example.test>", REFUSED_UNKNOWN),
        # ...and a source route is dropped, leaving the foreign mailbox.
        ("<@example.test:alice@elsewhere.example>", RELAY_DENIED),
    ],
)
def test_mailboxes_and_domains(path: str, expected: Resolution) -> None:
    assert resolve(path) == expected


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
        '<"../alice"@example.test>',
    ],
)
def test_unsafe_local_parts_refused_without_lookup(path: str) -> None:
    view = tree()
    resolution = resolve(path, view)
    assert resolution == UNSAFE
    assert not resolution.accepted
    assert view.asked == []  # no path was ever built from it


def test_unsafe_local_part_built_directly() -> None:
    # Characters the SMTP parser never lets through still cannot reach a lookup.
    view = tree()
    for local in ("a\x00b", "a\nb", "", "x" * 65):
        resolution = resolve_recipient(
            Address(local, "example.test"), view, delimiter="+", postmaster=""
        )
        assert resolution.refusal is Route.UNSAFE
    assert view.asked == []


def test_address_literal_never_looked_up() -> None:
    view = tree()
    assert resolve("<alice@[127.0.0.1]>", view) == RELAY_DENIED
    assert view.asked == []


def test_refusal_status_codes() -> None:
    assert {route: route.status for route in Route} == {
        Route.UNKNOWN_MAILBOX: "5.1.1",
        Route.RELAY_DENIED: "5.7.1",
        Route.UNSAFE: "5.1.3",
        Route.LOOP: "5.4.6",
    }
    assert all(route.description for route in Route)


def test_mailbox_address() -> None:
    assert Mailbox("example.test", "alice").address == "alice@example.test"


# --- sub-addressing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "delimiter", "expected"),
    [
        ("<alice+tag@example.test>", "+", to("alice@example.test")),
        ("<Alice+Tag@example.test>", "+", to("alice@example.test")),
        ("<alice+a+b@example.test>", "+", to("alice@example.test")),  # the first delimiter
        ("<alice+@example.test>", "+", to("alice@example.test")),
        # The whole local part is tried first: a mailbox by that name wins.
        ("<alice+lists@example.test>", "+", to("alice+lists@example.test")),
        ("<ALICE+LISTS@example.test>", "+", to("alice+lists@example.test")),
        # Nothing before the delimiter: no sub-address.
        ("<+alice@example.test>", "+", REFUSED_UNKNOWN),
        ("<nobody+tag@example.test>", "+", REFUSED_UNKNOWN),
        # Another delimiter, and none.
        ("<alice-tag@example.test>", "-", to("alice@example.test")),
        ("<alice+tag@example.test>", "-", REFUSED_UNKNOWN),
        ("<alice+tag@example.test>", "", REFUSED_UNKNOWN),
        ("<alice+lists@example.test>", "", to("alice+lists@example.test")),
    ],
)
def test_sub_addressing(path: str, delimiter: str, expected: Resolution) -> None:
    assert resolve(path, delimiter=delimiter) == expected


def test_sub_address_of_an_alias() -> None:
    view = tree({"example.test": {"sales": ("bob",), "sales+vip": ("alice",)}})
    assert resolve("<sales+x@example.test>", view) == to("bob@example.test")
    assert resolve("<sales+vip@example.test>", view) == to("alice@example.test")


# --- aliases -------------------------------------------------------------------------------------


ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "example.test": {
        "info": ("alice",),
        "sales": ("alice", "BOB"),
        "team": ("sales", "info", "bob@example.test"),  # duplicates: one copy each
        "forward": ("friend@elsewhere.example",),
        "mixed": ("alice", "Friend@Elsewhere.Example", "friend@elsewhere.example"),
        "cross": ("carol@other.test",),
        "crossalias": ("help@other.test",),
        "bob": ("bob", "bob@elsewhere.example"),  # itself: its own mailbox, plus a copy
        "self": ("self",),  # itself, without a mailbox
        "deadend": ("nobody",),
        "partial": ("nobody", "bob"),
        "tagged": ("bob+x",),
        "abuse": ("postmaster",),
        "literal": ("x@[192.0.2.1]",),
    },
    "other.test": {"help": ("carol", "info@example.test")},
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<info@example.test>", to("alice@example.test")),
        ("<INFO@EXAMPLE.TEST>", to("alice@example.test")),
        (
            "<sales@example.test>",
            Resolution(
                (Mailbox("example.test", "alice"), Mailbox("example.test", "bob")),
                ("bob@elsewhere.example",),
            ),
        ),
        (
            "<team@example.test>",
            Resolution(
                (Mailbox("example.test", "alice"), Mailbox("example.test", "bob")),
                ("bob@elsewhere.example",),
            ),
        ),
        ("<forward@example.test>", Resolution(remote=("friend@elsewhere.example",))),
        (
            "<mixed@example.test>",
            Resolution(
                (Mailbox("example.test", "alice"),),
                ("Friend@elsewhere.example", "friend@elsewhere.example"),
            ),
        ),
        ("<cross@example.test>", to("carol@other.test")),
        ("<crossalias@example.test>", to("carol@other.test", "alice@example.test")),
        (
            "<bob@example.test>",
            Resolution((Mailbox("example.test", "bob"),), ("bob@elsewhere.example",)),
        ),
        (
            "<BOB+tag@example.test>",
            Resolution((Mailbox("example.test", "bob"),), ("bob@elsewhere.example",)),
        ),
        (
            "<tagged@example.test>",
            Resolution((Mailbox("example.test", "bob"),), ("bob@elsewhere.example",)),
        ),
        ("<abuse@example.test>", to("postmaster@example.test")),
        ("<literal@example.test>", Resolution(remote=("x@[192.0.2.1]",))),
        (
            "<self@example.test>",
            Resolution(refusal=Route.UNKNOWN_MAILBOX, dropped=(("self", Route.UNKNOWN_MAILBOX),)),
        ),
        (
            "<deadend@example.test>",
            Resolution(refusal=Route.UNKNOWN_MAILBOX, dropped=(("nobody", Route.UNKNOWN_MAILBOX),)),
        ),
        # A target that leads nowhere is dropped; the rest is delivered.
        (
            "<partial@example.test>",
            Resolution(
                (Mailbox("example.test", "bob"),),
                ("bob@elsewhere.example",),
                dropped=(("nobody", Route.UNKNOWN_MAILBOX),),
            ),
        ),
    ],
)
def test_aliases(path: str, expected: Resolution) -> None:
    assert resolve(path, tree(ALIASES)) == expected


def test_alias_wins_over_a_mailbox_of_the_same_name() -> None:
    view = tree({"example.test": {"bob": ("alice",)}})
    assert resolve("<bob@example.test>", view) == to("alice@example.test")


def test_alias_targets_that_are_unsafe_are_dropped() -> None:
    # The file parser refuses these; a view that hands them over anyway gets nowhere with them.
    view = tree({"example.test": {"x": ("../../etc", '"a/b"@example.test', "bob", "<junk")}})
    assert resolve("<x@example.test>", view) == Resolution(
        (Mailbox("example.test", "bob"),),
        dropped=(
            ("../../etc", Route.UNSAFE),
            ('"a/b"@example.test', Route.UNSAFE),
            ("<junk", Route.UNSAFE),
        ),
    )
    assert ("example.test", "../../etc") not in view.asked
    assert all("/" not in part for question in view.asked for part in question[1:])


@pytest.mark.parametrize(
    "aliases",
    [
        {"a": ("a@other.test",)},  # a -> a@other.test -> (other.test) a@example.test
        {"a": ("b",), "b": ("a",)},
        {"a": ("b", "alice"), "b": ("c",), "c": ("a",)},
        {"a": ("alice", "b"), "b": ("a@example.test",)},
        {"a": ("b+x",), "b": ("a+y",)},  # through sub-addresses
    ],
)
def test_alias_loops(aliases: dict[str, tuple[str, ...]]) -> None:
    view = tree({"example.test": aliases, "other.test": {"a": ("a@example.test",)}})
    resolution = resolve("<a@example.test>", view)
    assert resolution.refusal is Route.LOOP
    assert resolution.mailboxes == () and resolution.remote == ()
    assert not resolution.accepted


def test_alias_depth_bound() -> None:
    def chain(length: int) -> dict[str, tuple[str, ...]]:
        # a0 -> a1 -> ... -> a<length-1> -> alice: <length> aliases deep
        table = {f"a{i}": (f"a{i + 1}",) for i in range(length - 1)}
        table[f"a{length - 1}"] = ("alice",)
        return table

    ok = tree({"example.test": chain(MAX_ALIAS_DEPTH)})
    assert resolve("<a0@example.test>", ok) == to("alice@example.test")
    deep = tree({"example.test": chain(MAX_ALIAS_DEPTH + 1)})
    assert resolve("<a0@example.test>", deep) == LOOP


def test_diamond_is_no_loop_and_expands_once() -> None:
    # a -> b, c; b -> d; c -> d: d is reached twice, gets one copy, and is expanded once.
    aliases = {"a": ("b", "c"), "b": ("d",), "c": ("d",), "d": ("alice", "bob")}
    view = tree({"example.test": aliases})
    assert resolve("<a@example.test>", view) == to("alice@example.test", "bob@example.test")
    assert view.asked.count(("example.test", "alice")) == 1


def test_wide_and_deep_alias_graph_stays_cheap() -> None:
    # 30 levels of two aliases each pointing at both of the next level: 2**30 paths, but
    # each alias is expanded once.
    aliases: dict[str, tuple[str, ...]] = {}
    for level in range(30):
        for side in "lr":
            aliases[f"{side}{level}"] = (f"l{level + 1}", f"r{level + 1}")
    aliases["l30"] = aliases["r30"] = ("alice",)
    view = tree({"example.test": aliases})
    # Deeper than MAX_ALIAS_DEPTH: refused, but quickly.
    assert resolve("<l0@example.test>", view) == LOOP
    assert len(view.asked) < 1000


# --- catch-all -----------------------------------------------------------------------------------


CATCH_ALL = {
    "example.test": {"*": ("alice",), "sales": ("bob", "nobody")},
    "other.test": {"*": ("help",), "help": ("carol", "x@elsewhere.example")},
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<nobody@example.test>", to("alice@example.test")),
        ("<anything+tag@example.test>", to("alice@example.test")),
        ('<"*"@example.test>', to("alice@example.test")),
        ("<bob@example.test>", to("bob@example.test")),  # known names are not caught
        ("<alice+tag@example.test>", to("alice@example.test")),
        # The catch-all is for the original recipient only: an alias target naming nobody is
        # dropped, not swept into the catch-all.
        (
            "<sales@example.test>",
            Resolution(
                (Mailbox("example.test", "bob"),), dropped=(("nobody", Route.UNKNOWN_MAILBOX),)
            ),
        ),
        (
            "<who@other.test>",
            Resolution((Mailbox("other.test", "carol"),), ("x@elsewhere.example",)),
        ),
        # postmaster is not swept into the catch-all either.
        ("<postmaster@example.test>", to("postmaster@example.test")),
    ],
)
def test_catch_all(path: str, expected: Resolution) -> None:
    assert resolve(path, tree(CATCH_ALL)) == expected


def test_no_catch_all_unless_configured() -> None:
    assert resolve("<nobody@example.test>", tree({"example.test": {"x": ("alice",)}})) == (
        REFUSED_UNKNOWN
    )


def test_catch_all_to_nobody_does_not_loop() -> None:
    view = tree({"example.test": {"*": ("nobody",)}})
    assert resolve("<x@example.test>", view) == Resolution(
        refusal=Route.UNKNOWN_MAILBOX, dropped=(("nobody", Route.UNKNOWN_MAILBOX),)
    )


# --- postmaster ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "view", "postmaster", "expected"),
    [
        # No mailbox, no alias, no [delivery] postmaster: <domain>/postmaster/.
        ("<postmaster@example.test>", tree(), "", to("postmaster@example.test")),
        ("<PostMaster@Other.TEST>", tree(), "", to("postmaster@other.test")),
        ("<postmaster+tag@example.test>", tree(), "", to("postmaster@example.test")),
        # [delivery] postmaster takes it when the domain has neither.
        ("<postmaster@example.test>", tree(), "alice@example.test", to("alice@example.test")),
        ("<postmaster@other.test>", tree(), "alice@example.test", to("alice@example.test")),
        ("<postmaster@other.test>", tree(), "ALICE+pm@Example.test", to("alice@example.test")),
        # ... through an alias, too.
        (
            "<postmaster@other.test>",
            tree({"example.test": {"admins": ("alice", "bob")}}),
            "admins@example.test",
            to("alice@example.test", "bob@example.test"),
        ),
        # A mailbox or alias of the domain's own wins.
        (
            "<postmaster@other.test>",
            View({"other.test": {"postmaster"}, "example.test": {"alice"}}),
            "alice@example.test",
            to("postmaster@other.test"),
        ),
        (
            "<postmaster@other.test>",
            tree({"other.test": {"postmaster": ("carol",)}}),
            "alice@example.test",
            to("carol@other.test"),
        ),
        # A [delivery] postmaster that leads nowhere (removed since the config check): the
        # domain's postmaster directory, never a refusal.
        ("<postmaster@other.test>", tree(), "gone@example.test", to("postmaster@other.test")),
        (
            "<postmaster@other.test>",
            tree({"example.test": {"pm": ("pm2",), "pm2": ("pm",)}}),
            "pm@example.test",
            to("postmaster@other.test"),
        ),
        # A [delivery] postmaster that is itself a postmaster without mailbox: its directory.
        (
            "<postmaster@other.test>",
            tree(),
            "postmaster@example.test",
            to("postmaster@example.test"),
        ),
        # ... and one that is an alias back to postmaster does not loop.
        (
            "<postmaster@other.test>",
            tree({"example.test": {"root": ("postmaster",)}}),
            "root@example.test",
            to("postmaster@example.test"),
        ),
        # Alias targets named postmaster follow the same rules.
        (
            "<abuse@example.test>",
            tree({"example.test": {"abuse": ("postmaster",)}}),
            "bob@example.test",
            to("bob@example.test"),
        ),
    ],
)
def test_postmaster(path: str, view: View, postmaster: str, expected: Resolution) -> None:
    resolution = resolve(path, view, postmaster=postmaster)
    assert (resolution.mailboxes, resolution.remote, resolution.refusal) == (
        expected.mailboxes,
        expected.remote,
        expected.refusal,
    )


def test_postmaster_of_a_domain_is_never_refused() -> None:
    for aliases in ({}, {"*": ("nobody",)}, {"postmaster": ("postmaster",)}):
        resolution = resolve("<postmaster@example.test>", tree({"example.test": aliases}))
        assert resolution.mailboxes == (Mailbox("example.test", "postmaster"),)


@pytest.mark.parametrize(
    ("hostname", "postmaster", "domains", "expected"),
    [
        # [delivery] postmaster first.
        ("mx.example.test", "bob@example.test", ["example.test"], "bob@example.test"),
        # Else the hostname's domain, or its closest served parent...
        ("mx.example.test", "", ["a.test", "example.test"], "postmaster@example.test"),
        ("example.test", "", ["a.test", "example.test"], "postmaster@example.test"),
        ("MX.Example.Test", "", ["a.test", "example.test"], "postmaster@example.test"),
        ("a.b.example.test", "", ["a.test", "example.test"], "postmaster@example.test"),
        ("localhost", "", ["a.test", "localhost"], "postmaster@localhost"),
        # ...never a bare top-level name...
        ("mx.test", "", ["b.test", "test"], "postmaster@b.test"),
        # ...else the first served domain, sorted.
        ("mx.elsewhere.example", "", ["z.test", "a.test"], "postmaster@a.test"),
        ("[192.0.2.1]", "", ["z.test", "a.test"], "postmaster@a.test"),
        ("", "", ["z.test", "a.test"], "postmaster@a.test"),
        # A [delivery] postmaster that leads nowhere falls back the same way.
        ("mx.example.test", "gone@example.test", ["example.test"], "postmaster@example.test"),
    ],
)
def test_bare_postmaster(hostname: str, postmaster: str, domains: list[str], expected: str) -> None:
    view = View({domain: {"bob"} for domain in domains})
    resolution = resolve("<Postmaster>", view, postmaster=postmaster, hostname=hostname)
    assert [m.address for m in resolution.mailboxes] == [expected]


def test_bare_postmaster_uses_the_domains_own_postmaster_alias() -> None:
    view = View({"example.test": {"bob"}}, {"example.test": {"postmaster": ("bob",)}})
    assert resolve("<postmaster>", view) == to("bob@example.test")


def test_bare_postmaster_with_nothing_served() -> None:
    assert resolve("<postmaster>", View({})) == REFUSED_UNKNOWN


def test_bare_postmaster_to_a_remote_postmaster() -> None:
    resolution = resolve("<postmaster>", tree(), postmaster="me@elsewhere.example")
    assert resolution == Resolution(remote=("me@elsewhere.example",))


def test_domainless_address_other_than_postmaster() -> None:
    # The parser never makes one; the policy still does not route it anywhere.
    resolution = resolve_recipient(Address("alice", None), tree(), delimiter="+", postmaster="")
    assert resolution == RELAY_DENIED


def test_postmaster_argument_forms() -> None:
    view = tree()
    for postmaster in ("alice@example.test", Address("alice", "example.test")):
        resolution = resolve_recipient(
            Address("postmaster", "other.test"), view, delimiter="+", postmaster=postmaster
        )
        assert resolution == to("alice@example.test")
    # None, "" and junk all mean "none".
    for postmaster in (None, "", "not an address", "postmaster"):
        resolution = resolve_recipient(
            Address("postmaster", "other.test"), view, delimiter="+", postmaster=postmaster
        )
        assert resolution == to("postmaster@other.test")


# --- the aliases file ----------------------------------------------------------------------------


def test_parse_aliases() -> None:
    text = """\
# the aliases of example.test
Info: alice

sales:alice,BOB ,  bob@Example.ORG   # trailing comment
team: alice, bob,
      carol,
   # a comment inside a continuation does not end it
      dave
*: alice
q: "a b"@example.org, "x,y#z"@example.org
hash: a#b
alice: alice, alice@example.net
x+tag: bob
\u00e9l\u00e8ve: alice
"""
    aliases, problems = parse_aliases(text, "example.test")
    assert problems == []
    assert aliases == {
        "info": ("alice",),
        "sales": ("alice", "BOB", "bob@Example.ORG"),
        "team": ("alice", "bob", "carol", "dave"),
        "*": ("alice",),
        "q": ('"a b"@example.org', '"x,y#z"@example.org'),
        "hash": ("a#b",),
        "alice": ("alice", "alice@example.net"),
        "x+tag": ("bob",),
        "\u00e9l\u00e8ve": ("alice",),
    }


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("no colon here", "expected 'name: target"),
        (": alice", "missing alias name"),
        ("bad name: alice", "not a valid local part"),
        ("a@b.test: alice", "plain local part"),
        ('"q": alice', "plain local part"),
        (".hidden: alice", "not a valid"),
        ("x:", "no targets"),
        ("x: ,", "empty target"),
        ("x: a,,b", "empty target"),
        ("x: a b", "not a valid address"),
        ("x: ../etc", "not a valid"),
        ('x: "a/b"', "not a valid mailbox name"),
        ("x: |/usr/bin/cmd", "pipes, files and :include:"),
        ("x: /var/mail/x", "pipes, files and :include:"),
        ("x: :include:/etc/list", "pipes, files and :include:"),
        ('x: "unterminated@example.org', "unterminated"),
        ("x: <a@example.org>", "not a valid address"),
        ("x: a@", "not a valid address"),
        ("x: *", "catch-all"),
        ("x: a\x00b", "not a valid address"),
    ],
)
def test_parse_aliases_skips_malformed_lines(line: str, problem: str) -> None:
    text = f"good: alice\n{line}\nalso: bob\n"
    aliases, problems = parse_aliases(text, "example.test")
    assert aliases == {"good": ("alice",), "also": ("bob",)}
    assert len(problems) == 1
    assert problems[0].startswith("line 2: ")
    assert problem in problems[0]


def test_parse_aliases_continuation_without_an_alias() -> None:
    aliases, problems = parse_aliases("  alice\nx: bob\n  , carol\n", "example.test")
    assert aliases == {"x": ("bob", "carol")}
    assert problems == ["line 1: continuation line without an alias before it"]


def test_parse_aliases_duplicate_name_keeps_the_first() -> None:
    aliases, problems = parse_aliases("x: alice\nX: bob\n", "example.test")
    assert aliases == {"x": ("alice",)}
    assert problems == ["line 2: alias 'X' given again (the first one counts)"]


def test_example_config_aliases_parse() -> None:
    # The aliases example in katerchen.toml.example is itself a valid aliases file.
    lines = EXAMPLE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "<domains>/<domain>/aliases (" in line)
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("#"):
            break
        block.append(line[1:])
    text = "\n".join(line[5:] for line in block if line.startswith("     "))
    aliases, problems = parse_aliases(text, "example.org")
    assert problems == []
    assert set(aliases) == {"info", "sales", "team", "alice", "*"}


# --- DomainsTree on real directories --------------------------------------------------------------


def make_tree(root: Path, **delivery: Any) -> DomainsTree:
    (root / "example.test" / "alice").mkdir(parents=True)
    (root / "example.test" / "bob").mkdir()
    (root / "other.test" / "carol").mkdir(parents=True)
    return DomainsTree(root, DeliveryConfig(**delivery), hostname="mx.example.test")


def write(path: Path, text: str) -> None:
    """Replace a file's contents and make sure its version key changes, as an edit a moment
    later would (file systems with a coarse clock may give two writes the same mtime)."""
    before = path.stat() if path.exists() else None
    path.write_text(text)
    if before is not None and path.stat().st_mtime_ns == before.st_mtime_ns:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))


def test_domains_tree(tmp_path: Path) -> None:
    root = tmp_path / "domains"
    tree = make_tree(root)
    (root / "example.test" / "file").touch()  # a file is not a mailbox
    (root / "notadomain.test").touch()
    (root / "linked.test").symlink_to(root / "other.test")
    assert tree.resolve(Address("Alice", "EXAMPLE.test")) == to("alice@example.test")
    assert tree.resolve(Address("file", "example.test")) == REFUSED_UNKNOWN
    assert tree.resolve(Address("nobody", "example.test")) == REFUSED_UNKNOWN
    assert tree.resolve(Address("alice", "notadomain.test")) == RELAY_DENIED
    assert tree.resolve(Address("alice", "missing.test")) == RELAY_DENIED
    assert tree.resolve(Address("carol", "linked.test")) == to("carol@linked.test")
    assert tree.resolve(Address("postmaster", "example.test")) == to("postmaster@example.test")
    assert tree.resolve(Address("..", "example.test")) == UNSAFE
    assert tree.resolve(Address("alice+tag", "example.test")) == to("alice@example.test")
    assert tree.served_domains() == ["example.test", "linked.test", "other.test"]


def test_domains_tree_resolves_envelope_strings(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    assert tree.resolve("alice@example.test") == to("alice@example.test")
    assert tree.resolve('"Alice"@Example.Test') == to("alice@example.test")
    assert tree.resolve("postmaster") == to("postmaster@example.test")
    assert tree.resolve("PostMaster") == to("postmaster@example.test")
    assert tree.resolve("\u00e9l\u00e8ve@example.test") == REFUSED_UNKNOWN
    assert tree.resolve("not an address") == UNSAFE
    assert tree.resolve("") == UNSAFE


def test_domains_tree_config(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, recipient_delimiter="-", postmaster="bob@example.test")
    assert tree.resolve("alice-x@example.test") == to("alice@example.test")
    assert tree.resolve("alice+x@example.test") == REFUSED_UNKNOWN
    assert tree.resolve("postmaster@other.test") == to("bob@example.test")
    assert tree.resolve("postmaster") == to("bob@example.test")


def test_domains_tree_without_a_root(tmp_path: Path) -> None:
    tree = DomainsTree(tmp_path / "missing", DeliveryConfig())
    assert tree.resolve("alice@example.test") == RELAY_DENIED
    assert tree.resolve("postmaster") == REFUSED_UNKNOWN
    assert tree.served_domains() == []


def test_domains_tree_aliases_and_their_changes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    aliases = tmp_path / "example.test" / "aliases"
    assert tree.resolve("info@example.test") == REFUSED_UNKNOWN
    write(aliases, "info: alice\n")
    assert tree.resolve("info@example.test") == to("alice@example.test")
    # Edited in place, same size: still picked up.
    write(aliases, "info: bob  \n")
    assert tree.resolve("info@example.test") == to("bob@example.test")
    # Replaced by rename, as editors do.
    new = tmp_path / "example.test" / "aliases.new"
    new.write_text("info: alice, bob\n*: carol@other.test\n")
    new.rename(aliases)
    assert tree.resolve("info@example.test") == to("alice@example.test", "bob@example.test")
    assert tree.resolve("x@example.test") == to("carol@other.test")
    # Removed.
    aliases.unlink()
    assert tree.resolve("info@example.test") == REFUSED_UNKNOWN
    assert tree.resolve("x@example.test") == REFUSED_UNKNOWN


def test_domains_tree_caches_the_parsed_file(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    write(tmp_path / "example.test" / "aliases", "info: alice\n")
    first = tree.aliases("example.test")
    assert tree.aliases("example.test") is first
    write(tmp_path / "example.test" / "aliases", "info: alice, bob\n")
    assert tree.aliases("example.test") is not first


def test_domains_tree_loop(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    write(tmp_path / "example.test" / "aliases", "a: b\nb: c@other.test\n")
    write(tmp_path / "other.test" / "aliases", "c: a@example.test\n")
    assert tree.resolve("a@example.test") == LOOP


def test_malformed_alias_lines_are_skipped_and_logged_once(
    tmp_path: Path, mail_log: pytest.LogCaptureFixture
) -> None:
    tree = make_tree(tmp_path)
    aliases = tmp_path / "example.test" / "aliases"
    aliases.write_bytes(b"info: alice\nbroken line\nbad: |cmd\nlatin: caf\xe9\nsales: bob\n")
    for _ in range(3):
        assert tree.resolve("info@example.test") == to("alice@example.test")
        assert tree.resolve("sales@example.test") == to("bob@example.test")
        assert tree.resolve("bad@example.test") == REFUSED_UNKNOWN
    warnings = log_lines(mail_log, "aliases-error")
    assert len(warnings) == 3, warnings
    assert all(str(aliases) in line for line in warnings)
    assert "line 2" in warnings[1] or "line 2" in warnings[0]
    assert any("line 4: not valid UTF-8" in line for line in warnings)
    assert {r.levelno for r in mail_log.records if "aliases-error" in r.getMessage()} == {
        logging.WARNING
    }
    # A new version of the file is checked (and reported) again.
    write(aliases, "broken again\ninfo: bob\n")
    assert tree.resolve("info@example.test") == to("bob@example.test")
    assert len(log_lines(mail_log, "aliases-error")) == 4


def test_aliases_that_is_not_a_file(tmp_path: Path, mail_log: pytest.LogCaptureFixture) -> None:
    tree = make_tree(tmp_path)
    (tmp_path / "example.test" / "aliases").mkdir()
    for _ in range(2):
        assert tree.resolve("alice@example.test") == to("alice@example.test")
        assert tree.resolve("info@example.test") == REFUSED_UNKNOWN
    assert len(log_lines(mail_log, "aliases-error")) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_aliases_is_a_temporary_error(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    aliases = tmp_path / "example.test" / "aliases"
    aliases.write_text("info: alice\n")
    aliases.chmod(0)
    with pytest.raises(PermissionError):
        tree.resolve("info@example.test")


def test_aliases_symlink_loop_is_a_temporary_error(tmp_path: Path) -> None:
    # Any error but "not there" is raised (the receiver answers 451, delivery retries): the
    # aliases may exist, and refusing their names for good would lose mail.
    tree = make_tree(tmp_path)
    aliases = tmp_path / "example.test" / "aliases"
    aliases.symlink_to(aliases)
    with pytest.raises(OSError, match="Too many levels"):
        tree.resolve("info@example.test")
    # A domain or mailbox that is a symlink loop is just not there (as for Path.is_dir).
    (tmp_path / "loop.test").symlink_to(tmp_path / "loop.test")
    (tmp_path / "other.test" / "loop").symlink_to(tmp_path / "other.test" / "loop")
    assert tree.resolve("x@loop.test") == RELAY_DENIED
    assert tree.resolve("loop@other.test") == REFUSED_UNKNOWN


def test_alias_targets_never_become_paths(tmp_path: Path) -> None:
    # Directories that a naively built path would find.
    tree = make_tree(tmp_path)
    (tmp_path / "example.test" / ".hidden").mkdir()
    (tmp_path / "etc").mkdir()
    write(
        tmp_path / "example.test" / "aliases",
        'a: ../etc\nb: "../etc"@Example.Test\nc: .hidden\nd: "a/../../etc"\ne: bob\n'
        'f: "../etc"@other.test\n',
    )
    for name in "abcdf":
        assert not tree.resolve(f"{name}@example.test").accepted
    # The other domain's target is only known to be local when it is resolved.
    assert set(tree.aliases("example.test")) == {"e", "f"}
    assert tree.resolve("f@example.test").dropped == (('"../etc"@other.test', Route.UNSAFE),)


def test_domains_tree_is_thread_safe(tmp_path: Path, mail_log: pytest.LogCaptureFixture) -> None:
    tree = make_tree(tmp_path)
    write(tmp_path / "example.test" / "aliases", "info: alice\nbroken\n")
    results: list[Resolution] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(50):
            results.append(tree.resolve("info@example.test"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [to("alice@example.test")] * 400
    assert len(log_lines(mail_log, "aliases-error")) == 1


def test_from_config(tmp_path: Path) -> None:
    from katerchen.config import Config

    config = Config.from_toml(
        '[server]\nhostname = "mx.other.test"\n[delivery]\nrecipient_delimiter = "-"\n',
        base_dir=tmp_path,
    )
    tree = DomainsTree.from_config(config)
    assert tree.root == tmp_path / "domains"
    assert tree.delivery == config.delivery
    make_tree(tmp_path / "domains")
    assert tree.resolve("postmaster") == to("postmaster@other.test")
    assert tree.resolve("carol-x@other.test") == to("carol@other.test")
