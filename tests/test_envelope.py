"""Tests for katerchen.envelope: the pre-header round trip, its strictness, the Received header."""

from __future__ import annotations

import contextlib
import email
import email.policy
import email.utils
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from katerchen.address import Address, parse_forward_path
from katerchen.envelope import Envelope, EnvelopeError, received_header

EXAMPLE = Envelope(
    queue_id="0619a4b1c2d3e4f5a6b7",
    arrival=1714567896.123456,
    client="192.0.2.7",
    helo="mail.example.net",
    reverse_path="alice@example.net",
    forward_paths=("bob@example.org", '"carol> smith"@example.org'),
    body="8BITMIME",
    smtputf8=False,
)

EXAMPLE_BYTES = (
    b"katerchen-envelope 1\n"
    b"id 0619a4b1c2d3e4f5a6b7\n"
    b"arrival 2024-05-01T12:51:36.123456Z\n"
    b"client 192.0.2.7\n"
    b"helo mail.example.net\n"
    b"from <alice@example.net>\n"
    b"to <bob@example.org>\n"
    b'to <"carol> smith"@example.org>\n'
    b"body 8BITMIME\n"
    b"smtputf8 no\n"
    b"\n"
)


def test_encode_example() -> None:
    # This exact text is also shown in docs/spool-format.md.
    assert EXAMPLE.encode() == EXAMPLE_BYTES


def test_documented_example_is_current() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "spool-format.md").read_text("utf-8")
    block = doc.split("```\nkaterchen-envelope 1\n", 1)[1].split("```", 1)[0]
    assert ("katerchen-envelope 1\n" + block).encode() == EXAMPLE_BYTES
    received = received_header(
        attrs.evolve(EXAMPLE, forward_paths=("bob@example.org",)),
        hostname="mx.example.org",
        protocol="ESMTP",
    )
    assert received.replace(b"\r\n", b"\n").decode() in doc


def test_decode_example_with_message() -> None:
    data = EXAMPLE_BYTES + b"Received: from x\r\n\r\nbody\r\n"
    envelope, offset = Envelope.decode(data)
    assert envelope == EXAMPLE
    assert data[offset:] == b"Received: from x\r\n\r\nbody\r\n"


def test_null_path_no_body_smtputf8() -> None:
    envelope = attrs.evolve(
        EXAMPLE,
        reverse_path="",
        forward_paths=("postmaster", "jöran@bücher.de"),
        body=None,
        smtputf8=True,
    )
    data = envelope.encode()
    assert b"\nfrom <>\n" in data
    assert b"\nto <postmaster>\n" in data
    assert "\nto <jöran@bücher.de>\n".encode() in data
    assert b"\nbody -\n" in data
    assert b"\nsmtputf8 yes\n" in data
    assert Envelope.decode(data) == (envelope, len(data))


def test_client_and_helo_may_be_empty() -> None:
    envelope = attrs.evolve(EXAMPLE, client="", helo="")
    assert Envelope.decode(envelope.encode())[0] == envelope


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00", "a\nb", "a\r\nto <x@y>", "\x1b", "\x85"])
@pytest.mark.parametrize("field", ["client", "helo", "reverse_path", "forward_paths"])
def test_encode_refuses_control_characters(bad: str, field: str) -> None:
    value: Any = f"a{bad}@example.org"
    if field == "forward_paths":
        value = (f"a{bad}@example.org",)
    with pytest.raises(ValueError):
        attrs.evolve(EXAMPLE, **{field: value}).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"queue_id": ""},
        {"queue_id": "a/b"},
        {"queue_id": "a b"},
        {"queue_id": "x" * 65},
        {"forward_paths": ()},
        {"forward_paths": ("not a path",)},
        {"forward_paths": ("<a@b>",)},
        {"forward_paths": ("a@b.",)},
        {"reverse_path": "postmaster"},  # bare postmaster is a forward path only
        {"reverse_path": "a b@c"},
        {"body": "8bitmime"},
        {"body": "QUOTED"},
        {"arrival": 1e300},
        {"arrival": -1e12},
    ],
)
def test_encode_refuses_what_decode_could_not_read(changes: dict[str, Any]) -> None:
    with pytest.raises(EnvelopeError):
        attrs.evolve(EXAMPLE, **changes).encode()


def _replace(old: bytes, new: bytes) -> bytes:
    assert old in EXAMPLE_BYTES
    return EXAMPLE_BYTES.replace(old, new, 1)


MALFORMED = [
    b"",
    b"\n\n",
    b"katerchen-envelope 1\n",  # no end
    EXAMPLE_BYTES[:-1],  # no empty line: truncated
    EXAMPLE_BYTES[:40],
    _replace(b"katerchen-envelope 1", b"katerchen-envelope 2"),
    _replace(b"katerchen-envelope 1", b"katerchen-envelope 01"),
    _replace(b"katerchen-envelope 1", b"katerchen-envelope 1 "),
    _replace(b"katerchen-envelope 1", b"Katerchen-envelope 1"),
    _replace(b"katerchen-envelope 1\n", b"From nobody\n"),
    _replace(b"id 0619a4b1c2d3e4f5a6b7\n", b""),
    _replace(b"id 0619a4b1c2d3e4f5a6b7", b"id ../../etc"),
    _replace(b"id 0619a4b1c2d3e4f5a6b7", b"id"),
    _replace(b"arrival 2024-05-01T12:51:36.123456Z", b"arrival 1714567896.123456"),
    _replace(b"arrival 2024-05-01T12:51:36.123456Z", b"arrival 2024-05-01T12:51:36Z"),
    _replace(b"arrival 2024-05-01T12:51:36.123456Z", b"arrival 2024-13-01T12:51:36.123456Z"),
    _replace(b"arrival 2024-05-01T12:51:36.123456Z", b"arrival 2024-05-01T12:51:36.123456+00:00"),
    _replace(b"from <alice@example.net>", b"from alice@example.net"),
    _replace(b"from <alice@example.net>", b"from <alice@example.net"),
    _replace(b"from <alice@example.net>", b"from <"),
    _replace(b"from <alice@example.net>", b"from <alice>"),
    _replace(b"from <alice@example.net>\n", b""),
    _replace(b"to <bob@example.org>", b"to bob@example.org"),
    _replace(b"to <bob@example.org>", b"to <bob@example.org> "),
    _replace(b"to <bob@example.org>", b"to <b\rob@example.org>"),
    _replace(b"to <bob@example.org>", b"to <>"),
    _replace(b"to <bob@example.org>", b"to <bob@exam\xffple.org>"),  # invalid UTF-8
    _replace(b"to <bob@example.org>\n", b""),  # still one "to": valid, see below
    _replace(b"to <bob@example.org>\n", b"to <bob@example.org>\nhelo x\n"),  # misplaced key
    _replace(b'to <"carol> smith"@example.org>\n', b"x-future value\n"),  # unknown key
    _replace(b"body 8BITMIME", b"body 8bitmime"),
    _replace(b"body 8BITMIME", b"body"),
    _replace(b"body 8BITMIME", b"body "),
    _replace(b"body 8BITMIME\n", b""),
    _replace(b"smtputf8 no", b"smtputf8 No"),
    _replace(b"smtputf8 no", b"smtputf8 yes\nsmtputf8 no"),  # repeated key
    _replace(b"smtputf8 no\n", b"smtputf8 no\nextra 1\n"),
    _replace(b"client 192.0.2.7", b"client 192.0.2.7\x00"),
    _replace(b"client 192.0.2.7", b"client 192.0.2.7\t"),
    _replace(b"client 192.0.2.7\n", b"client 192.0.2.7\r\n"),
    EXAMPLE_BYTES.replace(b"\n", b"\r\n"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_decode_rejects_malformed(data: bytes) -> None:
    if data == _replace(b"to <bob@example.org>\n", b""):
        # Dropping one of two recipients leaves a valid envelope: the decoder cannot know.
        assert Envelope.decode(data)[0].forward_paths == ('"carol> smith"@example.org',)
        return
    with pytest.raises(EnvelopeError):
        Envelope.decode(data)


def test_decode_stops_at_first_empty_line() -> None:
    # Whatever follows the pre-header (a message that itself looks like a pre-header) is not read.
    data = EXAMPLE_BYTES + EXAMPLE_BYTES
    assert Envelope.decode(data) == (EXAMPLE, len(EXAMPLE_BYTES))


# --- round trips ------------------------------------------------------------------------------

_ATEXT = "abcXYZ019!#$%&'*+-/=?^_`{|}~"


@st.composite
def addresses(draw: st.DrawFn) -> Address:
    """Arbitrary valid addresses: quoted local parts with spaces, quotes, '>' and UTF-8."""
    if draw(st.booleans()):
        atoms = st.text(alphabet=st.sampled_from([*_ATEXT, "é", "用"]), min_size=1, max_size=8)
        local = ".".join(draw(st.lists(atoms, min_size=1, max_size=3)))
    else:
        specials = [" ", '"', "\\", ">", "<", "@", ".", ",", ":", "ü", "用"]
        local = draw(st.text(alphabet=st.sampled_from([*_ATEXT, *specials]), max_size=20))
    label = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?|bücher|例子", fullmatch=True)
    domain = ".".join(draw(st.lists(label, min_size=1, max_size=4)))
    if draw(st.booleans()):
        domain = draw(st.sampled_from(["[192.0.2.1]", "[IPv6:2001:db8::7]", "[x-y:a>b]"]))
    return Address(local, domain)


hostnames = st.from_regex(
    r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?(?:\.[a-z]{2,6}){0,3}", fullmatch=True
)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    micros = draw(st.integers(min_value=0, max_value=2**53 // 8))
    forward = draw(st.lists(addresses(), min_size=1, max_size=5))
    if draw(st.booleans()):
        forward.append(Address(draw(st.sampled_from(["postmaster", "PostMaster"])), None))
    reverse = draw(st.one_of(st.none(), addresses()))
    return Envelope(
        queue_id=draw(st.from_regex(r"[0-9A-Za-z]{1,64}", fullmatch=True)),
        arrival=micros / 1_000_000,
        client=draw(st.sampled_from(["192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7", "", "x"])),
        helo=draw(st.one_of(hostnames, st.sampled_from(["[127.0.0.1]", "bad name", "ü.de"]))),
        reverse_path="" if reverse is None else str(reverse),
        forward_paths=tuple(str(address) for address in forward),
        body=draw(st.sampled_from([None, "7BIT", "8BITMIME", "BINARYMIME"])),
        smtputf8=draw(st.booleans()),
    )


@given(envelopes(), st.binary(max_size=50))
def test_round_trip(envelope: Envelope, message: bytes) -> None:
    data = envelope.encode()
    assert data.endswith(b"\n\n")
    decoded, offset = Envelope.decode(data + message)
    assert decoded == envelope
    assert offset == len(data)
    # Paths come back as strings the SMTP parser turns into the same addresses.
    for path in decoded.forward_paths:
        parse_forward_path(f"<{path}>", utf8=True)


@given(envelopes())
def test_every_prefix_is_rejected(envelope: Envelope) -> None:
    data = envelope.encode()
    for end in range(0, len(data) - 1, max(1, len(data) // 20)):
        with pytest.raises(EnvelopeError):
            Envelope.decode(data[:end])


@given(st.binary(max_size=400))
def test_decode_only_raises_envelope_error(data: bytes) -> None:
    for candidate in (data, b"katerchen-envelope 1\n" + data):
        with contextlib.suppress(EnvelopeError):
            Envelope.decode(candidate)


# --- Received header --------------------------------------------------------------------------


def test_received_header_one_recipient() -> None:
    envelope = attrs.evolve(EXAMPLE, forward_paths=("bob@example.org",))
    header = received_header(envelope, hostname="mx.example.org", protocol="ESMTP")
    assert header == (
        b"Received: from mail.example.net ([192.0.2.7])\r\n"
        b"\tby mx.example.org (katerchen) with ESMTP id 0619a4b1c2d3e4f5a6b7\r\n"
        b"\tfor <bob@example.org>; Wed, 01 May 2024 12:51:36 +0000\r\n"
    )


def test_received_header_several_recipients_has_no_for() -> None:
    header = received_header(EXAMPLE, hostname="mx.example.org", protocol="SMTP")
    assert b" for " not in header and b"\tfor " not in header
    assert header == (
        b"Received: from mail.example.net ([192.0.2.7])\r\n"
        b"\tby mx.example.org (katerchen) with SMTP id 0619a4b1c2d3e4f5a6b7;"
        b" Wed, 01 May 2024 12:51:36 +0000\r\n"
    )


@pytest.mark.parametrize(
    ("client", "literal"),
    [
        ("192.0.2.7", b"([192.0.2.7])"),
        ("2001:db8:0:0::1", b"([IPv6:2001:db8::1])"),
        ("::ffff:192.0.2.7", b"([192.0.2.7])"),
    ],
)
def test_received_header_client_literal(client: str, literal: bytes) -> None:
    header = received_header(
        attrs.evolve(EXAMPLE, client=client), hostname="mx.example.org", protocol="ESMTP"
    )
    assert header.startswith(b"Received: from mail.example.net " + literal + b"\r\n")


def test_received_header_without_client_address() -> None:
    header = received_header(
        attrs.evolve(EXAMPLE, client="unix"), hostname="mx.example.org", protocol="ESMTP"
    )
    assert header.startswith(b"Received: from mail.example.net\r\n\tby ")


def test_received_header_utf8() -> None:
    envelope = attrs.evolve(EXAMPLE, forward_paths=("jöran@bücher.de",), smtputf8=True)
    header = received_header(envelope, hostname="mx.example.org", protocol="UTF8SMTP")
    assert b"with UTF8SMTP id" in header
    assert "\tfor <jöran@bücher.de>; ".encode() in header


@pytest.mark.parametrize(
    ("helo", "smtputf8", "shown"),
    [
        ("bücher.example", False, b"xn--bcher-kva.example"),
        ("bücher.example", True, "bücher.example".encode()),
        ("\u00e9" * 70, False, b"_" * 70),  # no valid IDN (label too long): "_" instead
        ("caf\u00e9 (x)", False, None),  # sanitized first, then encoded: only ASCII is checked
    ],
)
def test_received_header_is_ascii_without_smtputf8(
    helo: str, smtputf8: bool, shown: bytes | None
) -> None:
    # A HELO name in UTF-8 must not make the header of a non-SMTPUTF8 message 8-bit.
    envelope = attrs.evolve(EXAMPLE, helo=helo, smtputf8=smtputf8)
    header = received_header(envelope, hostname="mx.example.org", protocol="ESMTP")
    first = header.split(b"\r\n")[0]
    if not smtputf8:
        assert header.isascii()
        assert all(c not in first[len(b"Received: from ") :].split(b" ")[0] for c in b"()\\ ")
    if shown is not None:
        assert first.startswith(b"Received: from " + shown + b" ")


@pytest.mark.parametrize("helo", ["evil\r\nX-Injected: 1", "a (b) c", "x\\y", "", "tab\there"])
def test_received_header_sanitizes_helo(helo: str) -> None:
    header = received_header(
        attrs.evolve(EXAMPLE, helo=helo), hostname="mx.example.org", protocol="ESMTP"
    )
    first = header.split(b"\r\n")[0]
    assert first.startswith(b"Received: from ")
    name = first[len(b"Received: from ") :].split(b" ")[0]
    assert name and all(c not in name for c in b"()\\ \t\r\n")
    assert header.count(b"\r\n") == 2 and b"\n" not in header.replace(b"\r\n", b"")


@pytest.mark.parametrize(
    ("hostname", "protocol"),
    [("mx.example.org", "E SMTP"), ("mx.example.org", "ESMTP\r\n"), ("mx\r\n.org", "ESMTP")],
)
def test_received_header_refuses_injection(hostname: str, protocol: str) -> None:
    with pytest.raises(ValueError):
        received_header(EXAMPLE, hostname=hostname, protocol=protocol)


@given(envelopes())
def test_received_header_parses(envelope: Envelope) -> None:
    header = received_header(envelope, hostname="mx.example.org", protocol="ESMTP")
    assert header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    assert all(line.startswith(b"\t") for line in lines[1:])
    assert all(len(line) <= 998 for line in lines)
    message = email.message_from_bytes(header + b"\r\nbody\r\n", policy=email.policy.SMTPUTF8)
    value = str(message["Received"])
    assert f"id {envelope.queue_id}" in value
    date = email.utils.parsedate_to_datetime(value.rsplit(";", 1)[1].strip())
    assert date.timestamp() == int(envelope.arrival)
    assert ("for <" in value) == (len(envelope.forward_paths) == 1)


# --- the optional keys auth and relay ----------------------------------------------------------


def test_auth_and_relay_are_written_only_when_set() -> None:
    assert EXAMPLE.auth is None and EXAMPLE.relay is False
    assert EXAMPLE.encode() == EXAMPLE_BYTES  # unchanged: what earlier versions wrote
    both = attrs.evolve(EXAMPLE, auth="alice@example.net", relay=True)
    assert both.encode() == EXAMPLE_BYTES[:-1] + b"auth alice@example.net\nrelay yes\n\n"
    assert attrs.evolve(EXAMPLE, relay=True).encode() == EXAMPLE_BYTES[:-1] + b"relay yes\n\n"
    assert (
        attrs.evolve(EXAMPLE, auth="j\u00f6ran").encode()
        == EXAMPLE_BYTES[:-1] + "auth j\u00f6ran\n\n".encode()
    )


@pytest.mark.parametrize(
    "changes", [{"auth": "alice@example.net"}, {"relay": True}, {"auth": "a b", "relay": True}]
)
def test_auth_and_relay_round_trip(changes: dict[str, Any]) -> None:
    envelope = attrs.evolve(EXAMPLE, **changes)
    data = envelope.encode() + b"Received: x\r\n\r\nbody\r\n"
    decoded, offset = Envelope.decode(data)
    assert decoded == envelope
    assert data[offset:] == b"Received: x\r\n\r\nbody\r\n"


def test_old_files_decode_without_auth_and_relay() -> None:
    envelope, _ = Envelope.decode(EXAMPLE_BYTES)
    assert envelope.auth is None
    assert envelope.relay is False


@pytest.mark.parametrize(
    "tail",
    [
        b"relay no\n",  # left out instead
        b"relay YES\n",
        b"relay \n",
        b"auth \n",  # empty
        b"relay yes\nauth alice@example.net\n",  # order
        b"auth a\nauth b\n",  # twice
        b"relay yes\nrelay yes\n",
        b"auth a\x7fb\n",
        b"trusted yes\n",
    ],
)
def test_decode_refuses_malformed_optional_keys(tail: bytes) -> None:
    with pytest.raises(EnvelopeError):
        Envelope.decode(EXAMPLE_BYTES[:-1] + tail + b"\n")


@pytest.mark.parametrize("auth", ["", "a\nrelay yes", "a\rb", "a\x00b"])
def test_encode_refuses_a_bad_auth(auth: str) -> None:
    with pytest.raises(EnvelopeError, match="auth"):
        attrs.evolve(EXAMPLE, auth=auth).encode()


def test_auth_and_relay_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Envelope("q", 0.0, "", "", "", ("a@b.c",), None, False, "user")  # type: ignore[misc]
