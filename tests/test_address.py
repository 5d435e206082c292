"""Tests for katerchen.address: path syntax, limits, relay tricks and safe path components."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from katerchen.address import (
    Address,
    AddressError,
    domain_component,
    mailbox_component,
    parse_forward_path,
    parse_reverse_path,
    split_path,
)

# --- valid paths ------------------------------------------------------------------------------

VALID = [
    # (path, utf8, local_part, domain, canonical str)
    ("<user@example.org>", False, "user", "example.org", "user@example.org"),
    ("<User.Name+tag@Example.ORG>", False, "User.Name+tag", "Example.ORG", None),
    ("<a!#$%&'*+-/=?^_`{|}~z@x.y>", False, "a!#$%&'*+-/=?^_`{|}~z", "x.y", None),
    ("<a@b>", False, "a", "b", None),
    ("<a@1.2.3.4>", False, "a", "1.2.3.4", None),  # all-digit labels are still a Domain
    ("<a@a-b.c0>", False, "a", "a-b.c0", None),
    ("<a@xn--bcher-kva.de>", False, "a", "xn--bcher-kva.de", None),
    # quoted local parts: quoted-pairs resolved, re-quoted on output only when needed
    ('<"a b"@example.org>', False, "a b", "example.org", '"a b"@example.org'),
    ('<"a>b"@example.org>', False, "a>b", "example.org", '"a>b"@example.org'),
    ('<"a\\"b"@example.org>', False, 'a"b', "example.org", '"a\\"b"@example.org'),
    ('<"a\\\\b"@example.org>', False, "a\\b", "example.org", '"a\\\\b"@example.org'),
    ('<"\\a"@example.org>', False, "a", "example.org", "a@example.org"),
    ('<"plain"@example.org>', False, "plain", "example.org", "plain@example.org"),
    ('<""@example.org>', False, "", "example.org", '""@example.org'),
    ('<"a..b"@example.org>', False, "a..b", "example.org", '"a..b"@example.org'),
    ('<".a"@example.org>', False, ".a", "example.org", '".a"@example.org'),
    # address literals, kept with brackets
    ("<a@[127.0.0.1]>", False, "a", "[127.0.0.1]", None),
    ("<a@[255.255.255.255]>", False, "a", "[255.255.255.255]", None),
    ("<a@[IPv6:2001:db8::1]>", False, "a", "[IPv6:2001:db8::1]", None),
    ("<a@[ipv6:::1]>", False, "a", "[ipv6:::1]", None),
    ("<a@[IPv6:::ffff:192.0.2.1]>", False, "a", "[IPv6:::ffff:192.0.2.1]", None),
    ('<a@[x-tag:any>thing"]>', False, "a", '[x-tag:any>thing"]', None),
    # source routes are accepted and dropped
    ("<@a.example,@b.example:user@c.example>", False, "user", "c.example", None),
    ("<@a.example:user@c.example>", False, "user", "c.example", None),
    # RFC 6531 under SMTPUTF8
    ("<jöran@bücher.de>", True, "jöran", "bücher.de", None),
    ("<用户@例子.广告>", True, "用户", "例子.广告", None),
    ('<"ü x"@example.org>', True, "ü x", "example.org", '"ü x"@example.org'),
    ("<a@xn--bcher-kva.de>", True, "a", "xn--bcher-kva.de", None),
]


@pytest.mark.parametrize(("path", "utf8", "local", "domain", "canonical"), VALID)
def test_valid_forward_and_reverse(
    path: str, utf8: bool, local: str, domain: str, canonical: str | None
) -> None:
    expected = Address(local, domain)
    assert parse_forward_path(path, utf8=utf8) == expected
    assert parse_reverse_path(path, utf8=utf8) == expected
    assert str(expected) == (canonical or f"{local}@{domain}")
    # The canonical form parses back to the same address.
    assert parse_forward_path(f"<{expected}>", utf8=utf8) == expected


def test_null_and_postmaster() -> None:
    assert parse_reverse_path("<>", utf8=False) is None
    for path in ("<postmaster>", "<Postmaster>", "<POSTMASTER>"):
        address = parse_forward_path(path, utf8=False)
        assert address == Address(path[1:-1], None)
        assert str(address) == path[1:-1]
        assert mailbox_component(address.local_part) == "postmaster"
    assert parse_forward_path("<postmaster@example.org>", utf8=False) == Address(
        "postmaster", "example.org"
    )
    with pytest.raises(AddressError) as info:
        parse_forward_path("<>", utf8=False)
    assert info.value.kind == "syntax"
    with pytest.raises(AddressError):
        parse_reverse_path("<postmaster>", utf8=False)


def test_relay_tricks_are_inert() -> None:
    assert parse_forward_path("<user%other@dom>", utf8=False) == Address("user%other", "dom")
    assert parse_forward_path('<"user@other"@dom>', utf8=False) == Address("user@other", "dom")
    assert parse_forward_path("<@dom:user@other>", utf8=False) == Address("user", "other")
    assert parse_forward_path("<user!other@dom>", utf8=False) == Address("user!other", "dom")
    for trick in ("user%other", "user@other", "user!other"):
        component = mailbox_component(trick)
        assert component is not None
        assert "/" not in component


# --- invalid paths ----------------------------------------------------------------------------

INVALID_SYNTAX = [
    "",
    "<",
    ">",
    "user@example.org",  # no angle brackets
    "<user@example.org",
    "<user>",
    "<@example.org>",
    "<user@>",
    "< user@example.org>",
    "<user@example.org >",
    "<us er@example.org>",
    "<user@@example.org>",
    "<.user@example.org>",
    "<user.@example.org>",
    "<us..er@example.org>",
    "<us(er@example.org>",
    '<us"er@example.org>',
    "<us\\er@example.org>",
    '<"unterminated@example.org>',
    '<"a\\',
    '<"a"b@example.org>',
    "<a@example.org.>",  # trailing dot
    "<a@.example.org>",
    "<a@exa..mple.org>",
    "<a@-example.org>",
    "<a@example-.org>",
    "<a@exa_mple.org>",
    "<a@[127.0.0.1>",
    "<a@[]>",
    "<a@[1.2.3]>",
    "<a@[1.2.3.256]>",
    "<a@[01.2.3.4]>",  # leading zeros could be read as octal
    "<a@[IPv6:1.2.3.4]>",
    "<a@[IPv6:::1::2]>",
    "<a@[IPv6:fe80::1%eth0]>",  # no scope ids
    "<a@[IPv6:]>",
    "<a@[tag:]>",
    "<a@[tag-:x]>",
    "<a@[foo]>",
    "<a@[a b:c]>",
    "<a@[a:b[c]>",
    "<@:user@example.org>",
    "<@a.example user@example.org>",
    "<@a.example,user@example.org>",
    "<@a..example:user@example.org>",
    "<@[1.2.3.4]:user@example.org>",  # A-d-l takes domains only
    "<user@example.org>x",
    "<<user@example.org>>",
    "<a\x00@example.org>",
    "<a@exam\x00ple.org>",
    "<a\r\n@example.org>",
    '<"a\tb"@example.org>',
    '<"a\x7fb"@example.org>',
    "<a@ex\x7fample.org>",
    '<"a\\\x00"@example.org>',
]


@pytest.mark.parametrize("path", INVALID_SYNTAX)
def test_invalid_syntax(path: str) -> None:
    for parse in (parse_forward_path, parse_reverse_path):
        for utf8 in (False, True):
            with pytest.raises(AddressError) as info:
                parse(path, utf8=utf8)
            assert info.value.kind == "syntax", path


INVALID_UTF8_ONLY = [
    "<a@bü.de>",
    "<ü@example.org>",
    '<"ü"@example.org>',
    "<@bü.de:a@example.org>",
]


@pytest.mark.parametrize("path", INVALID_UTF8_ONLY)
def test_non_ascii_needs_smtputf8(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_forward_path(path, utf8=False)
    assert info.value.kind == "utf8"
    parse_forward_path(path, utf8=True)


INVALID_EVEN_WITH_UTF8 = [
    "<a\u0085b@example.org>",  # C1 control (NEL)
    "<a@b\u00a0c.de>",  # no-break space in a domain
    "<a@b\u200dc.de>",  # zero-width joiner (format character) in a domain
    "<a@bü!.de>",
    "<a@u\u0308ber.de>",  # not NFC
    "<a@\u0308x.de>",  # starts with a combining mark
    '<"\\ü"@example.org>',  # quoted-pairSMTP is ASCII only
    "<a@[1.2.3.\u0664]>",  # no non-ASCII in literals
    "<a\ud800@example.org>",  # lone surrogate
]


@pytest.mark.parametrize("path", INVALID_EVEN_WITH_UTF8)
def test_invalid_non_ascii(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_forward_path(path, utf8=True)
    assert info.value.kind == "syntax"


def test_is_utf8() -> None:
    assert not Address("a", "b").is_utf8
    assert not Address("postmaster", None).is_utf8
    assert Address("ü", "b").is_utf8
    assert Address("a", "bü").is_utf8


# --- length limits (RFC 5321 4.5.3.1) --------------------------------------------------------


def _domain_of_length(n: int) -> str:
    labels = []
    while n > 0:
        take = min(63, n)
        if n - take == 1:  # avoid a one-character remainder that would need a dot
            take -= 1
        labels.append("d" * take)
        n -= take + 1
    domain = ".".join(labels)
    return domain


def test_local_part_limit() -> None:
    assert parse_forward_path(f"<{'a' * 64}@x.org>", utf8=False).local_part == "a" * 64
    with pytest.raises(AddressError) as info:
        parse_forward_path(f"<{'a' * 65}@x.org>", utf8=False)
    assert info.value.kind == "too_long"
    # Quotes count: the limit is on the Local-part as sent.
    parse_forward_path(f'<"{"a" * 62}"@x.org>', utf8=False)
    with pytest.raises(AddressError):
        parse_forward_path(f'<"{"a" * 63}"@x.org>', utf8=False)
    # Octets, not characters: 32 two-octet characters fit, 33 do not.
    parse_forward_path(f"<{'ü' * 32}@x.org>", utf8=True)
    with pytest.raises(AddressError) as info:
        parse_forward_path(f"<{'ü' * 33}@x.org>", utf8=True)
    assert info.value.kind == "too_long"


def test_path_limit() -> None:
    # 256 octets including the brackets are allowed, 257 are not.
    local = "a" * 60
    domain = _domain_of_length(256 - 2 - len(local) - 1)
    path = f"<{local}@{domain}>"
    assert len(path) == 256
    assert parse_forward_path(path, utf8=False).domain == domain
    longer = f"<{local}@d{domain}>"
    with pytest.raises(AddressError) as info:
        parse_forward_path(longer, utf8=False)
    assert info.value.kind == "too_long"
    # The source route counts too.
    with pytest.raises(AddressError) as info:
        parse_forward_path(f"<@{'r' * 60}:{path[1:]}", utf8=False)
    assert info.value.kind == "too_long"
    # Octets, not characters.
    utf8_path = f"<{'ü' * 30}@{_domain_of_length(256 - 2 - 60 - 1)}>"
    assert len(utf8_path.encode()) == 256
    parse_forward_path(utf8_path, utf8=True)
    with pytest.raises(AddressError):
        parse_forward_path(utf8_path.replace("@", "ü@"), utf8=True)


def test_label_limit() -> None:
    parse_forward_path(f"<a@{'l' * 63}.org>", utf8=False)
    with pytest.raises(AddressError) as info:
        parse_forward_path(f"<a@{'l' * 64}.org>", utf8=False)
    assert info.value.kind == "too_long"
    # A U-label is measured by its A-label ("xn--" + punycode), not by its UTF-8 octets.
    assert len(("ü" * 40).encode()) == 80
    parse_forward_path(f"<a@{'ü' * 40}.org>", utf8=True)
    with pytest.raises(AddressError) as info:
        parse_forward_path(f"<a@{'ü' * 70}.org>", utf8=True)
    assert info.value.kind == "too_long"
    assert domain_component("l" * 64 + ".org") is None


# --- split_path -------------------------------------------------------------------------------

SPLITS = [
    ("<a@b>", ("<a@b>", "")),
    ("<>", ("<>", "")),
    ("<> SIZE=10", ("<>", "SIZE=10")),
    ("  <a@b>", ("<a@b>", "")),
    ("<a@b> SIZE=10 BODY=8BITMIME", ("<a@b>", "SIZE=10 BODY=8BITMIME")),
    ("<a@b>   SIZE=10  ", ("<a@b>", "SIZE=10")),
    ("<a@b> ", ("<a@b>", "")),
    ('<"a> b"@x.org> SIZE=1', ('<"a> b"@x.org>', "SIZE=1")),
    ('<"a\\"> b"@x.org>', ('<"a\\"> b"@x.org>', "")),
    ("<a@[x:y>z]> P", ("<a@[x:y>z]>", "P")),
    ('<a@[x:"]> P', ('<a@[x:"]>', "P")),
    ("<@r.example:a@b> P", ("<@r.example:a@b>", "P")),
    ("<PostMaster> NOTIFY=NEVER", ("<PostMaster>", "NOTIFY=NEVER")),
]


@pytest.mark.parametrize(("arg", "expected"), SPLITS)
def test_split_path(arg: str, expected: tuple[str, str]) -> None:
    assert split_path(arg) == expected


@pytest.mark.parametrize(
    "arg", ["", "   ", "a@b", "<a@b", "<a@b>x", "<a b@c>", "x<a@b>", '<"a@b>', "<a@b>\tX"]
)
def test_split_path_errors(arg: str) -> None:
    with pytest.raises(AddressError) as info:
        split_path(arg)
    assert info.value.kind == "syntax"


def test_error_message_does_not_echo_input() -> None:
    with pytest.raises(AddressError) as info:
        parse_forward_path("<secret\x00@example.org>", utf8=False)
    assert "secret" not in str(info.value)


# --- path components --------------------------------------------------------------------------

SAFE_MAILBOXES = [
    ("user", "user"),
    ("User.Name", "user.name"),
    ("PostMaster", "postmaster"),
    ("a..b", "a..b"),
    ("a.", "a."),
    ("user@other", "user@other"),
    ("user%other", "user%other"),
    ("a b", "a b"),
    ("JÖRAN", "jöran"),
    ("a" * 64, "a" * 64),
]


@pytest.mark.parametrize(("local", "component"), SAFE_MAILBOXES)
def test_mailbox_component_safe(local: str, component: str) -> None:
    assert mailbox_component(local) == component


UNSAFE_MAILBOXES = [
    "",
    ".",
    "..",
    ".hidden",
    "a/b",
    "/",
    "../etc",
    "a\\b",
    "a\x00b",
    "\x00",
    "a\nb",
    "a\rb",
    "a\tb",
    "a\x1bb",
    "a\x7fb",
    "a\x85b",
    "a\u200eb",  # left-to-right mark (format)
    "a\ud800",
    "a" * 65,
    "ü" * 33,
]


@pytest.mark.parametrize("local", UNSAFE_MAILBOXES)
def test_mailbox_component_unsafe(local: str) -> None:
    assert mailbox_component(local) is None


@given(st.text(max_size=80))
def test_mailbox_component_never_escapes(local: str) -> None:
    component = mailbox_component(local)
    if component is not None:
        assert component not in ("", ".", "..")
        assert not component.startswith(".")
        assert "/" not in component and "\x00" not in component and "\\" not in component
        assert len(component.encode("utf-8")) <= 64
        assert component == component.lower()


@pytest.mark.parametrize(
    ("domain", "component"),
    [
        ("example.org", "example.org"),
        ("Example.ORG", "example.org"),
        ("a", "a"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("Bücher.DE", "bücher.de"),
        ("", None),
        (".", None),
        ("..", None),
        ("example.org.", None),
        (".example.org", None),
        ("a/b", None),
        ("a\\b", None),
        ("a b", None),
        ("a\x00b", None),
        ("-a.org", None),
        ("[127.0.0.1]", None),
        ("[IPv6:::1]", None),
        ("a_b.org", None),
        ("a" * 64, None),
        (_domain_of_length(256), None),
    ],
)
def test_domain_component(domain: str, component: str | None) -> None:
    assert domain_component(domain) == component


def test_domain_component_limit() -> None:
    domain = _domain_of_length(255)
    assert len(domain) == 255
    assert domain_component(domain) == domain


# --- properties -------------------------------------------------------------------------------

_ATEXT = "abcXYZ019!#$%&'*+-/=?^_`{|}~"


@st.composite
def addresses(draw: st.DrawFn) -> Address:
    """Arbitrary valid addresses, quoted local parts and UTF-8 included."""
    if draw(st.booleans()):
        atoms = draw(
            st.lists(
                st.text(alphabet=st.sampled_from([*_ATEXT, "é", "用"]), min_size=1, max_size=8),
                min_size=1,
                max_size=3,
            )
        )
        local = ".".join(atoms)
    else:
        local = draw(
            st.text(
                alphabet=st.sampled_from([*_ATEXT, " ", '"', "\\", ">", "<", "@", ".", ",", "ü"]),
                max_size=20,
            )
        )
    labels = draw(
        st.lists(
            st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?|bücher", fullmatch=True),
            min_size=1,
            max_size=4,
        )
    )
    domain = ".".join(labels)
    if draw(st.booleans()):
        domain = draw(st.sampled_from(["[192.0.2.1]", "[IPv6:2001:db8::7]", "[x-y:a>b]"]))
    return Address(local, domain)


@given(addresses())
def test_str_round_trips(address: Address) -> None:
    path = f"<{address}>"
    assert parse_forward_path(path, utf8=True) == address
    assert parse_reverse_path(path, utf8=True) == address
    assert split_path(f" {path} X=1") == (path, "X=1")
    if address.is_utf8:
        with pytest.raises(AddressError):
            parse_forward_path(path, utf8=False)
    else:
        assert parse_forward_path(path, utf8=False) == address


@given(st.text(max_size=300))
def test_parsers_only_raise_address_error(text: str) -> None:
    for utf8 in (False, True):
        for candidate in (text, f"<{text}>"):
            for parse in (parse_forward_path, parse_reverse_path):
                try:
                    address = parse(candidate, utf8=utf8)
                except AddressError:
                    continue
                if address is not None:
                    assert "\x00" not in str(address) and "\r" not in str(address)
            with contextlib.suppress(AddressError):
                split_path(candidate)
