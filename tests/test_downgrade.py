"""8-bit to 7-bit conversion for peers without 8BITMIME, checked by parsing the result back."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

import pytest

from katerchen.downgrade import is_8bit, to_7bit
from katerchen.protocol import ClientConnection, ServerConnection, Transaction
from tests.test_protocol_client import SETTINGS, Link

TEXT = (
    "Grüße aus Köln \u2013 ☃\r\n"
    ".a line with a leading dot\r\n"
    "From the start\r\n"
    "trailing space  \r\n"
)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def leaves(message: Message) -> list[Message]:
    return [part for part in message.walk() if not part.is_multipart()]


def converted(message: bytes) -> bytes:
    result = to_7bit(message)
    assert result is not None
    assert result.isascii()
    assert all(len(line) <= 998 for line in result.split(b"\r\n"))
    # Every line ends with CRLF: nothing bare is left for the SMTP client to fix.
    assert result.count(b"\n") == result.count(b"\r\n")
    assert result.count(b"\r") == result.count(b"\r\n")
    return result


def test_is_8bit() -> None:
    assert not is_8bit(b"")
    assert not is_8bit(b"plain ascii\r\n\x00\x7f")
    assert is_8bit(b"caf\xc3\xa9")
    assert is_8bit(b"\x80")


def test_7bit_message_is_returned_as_it_is() -> None:
    message = b"Subject: hi\r\n\r\nhello\r\n"
    assert to_7bit(message) is message


def test_8bit_text_body_becomes_quoted_printable() -> None:
    header = (
        b"From: Alice <alice@example.org>\r\n"
        b"Subject: a subject long enough that a folding generator would want to fold it"
        b" somewhere\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
    )
    message = header + b"\r\n" + TEXT.encode()
    result = converted(message)
    head, _, body = result.partition(b"\r\n\r\n")
    # The headers are as they were, but for the encoding.
    assert head + b"\r\n" == header.replace(b": 8bit", b": quoted-printable")
    assert b"Gr=C3=BC=C3=9Fe" in body
    assert b"\r\n.a line with a leading dot\r\n" in body
    assert b"trailing space =20\r\n" in body
    parsed = parse(result)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content() == TEXT


def test_message_without_mime_headers() -> None:
    message = b"Subject: plain\r\n\r\n" + TEXT.encode()
    parsed = parse(converted(message))
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert parsed.get_content() == TEXT


def test_text_that_is_not_utf8_gets_unknown_8bit() -> None:
    raw = "Grüße\r\n".encode("latin-1")
    parsed = parse(converted(b"Content-Type: text/plain\r\n\r\n" + raw))
    assert parsed.get_content_charset() == "unknown-8bit"
    assert parsed.get_payload(decode=True) == raw


def test_long_lines_get_soft_line_breaks() -> None:
    line = "ä" * 1500
    message = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + line.encode() + b"\r\n"
    result = converted(message)
    body = result.partition(b"\r\n\r\n")[2]
    assert max(len(row) for row in body.split(b"\r\n")) <= 76
    assert parse(result).get_content() == line + "\r\n"


def test_bare_cr_in_text_is_encoded() -> None:
    message = b"Content-Type: text/plain; charset=utf-8\r\n\r\nb\xc3\xa4re\rcr\r\n"
    assert parse(converted(message)).get_content() == "bäre\rcr\r\n"


MULTIPART = (
    b"From: alice@example.org\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"This is a MIME message.\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + TEXT.encode() + b"--b1\r\n"
    b"Content-Type: text/html; charset=us-ascii\r\n"
    b"\r\n"
    b"<p>seven bit,   kept   as it is</p>\r\n"
    b"--b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
    b"\r\n"
    b"\x00\x01\xfe\xff\r\n"
    b"--b1--\r\n"
    b"epilogue\r\n"
)
SEVEN_BIT_PART = (
    b"--b1\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n"
    b"<p>seven bit,   kept   as it is</p>\r\n--b1\r\n"
)


def test_multipart() -> None:
    result = converted(MULTIPART)
    assert SEVEN_BIT_PART in result  # byte-exact
    assert result.startswith(b"From: alice@example.org\r\n")
    assert b"\r\n\r\nThis is a MIME message.\r\n--b1\r\n" in result
    assert result.endswith(b"--b1--\r\nepilogue\r\n")
    parsed = parse(result)
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    text, html, binary = leaves(parsed)
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert isinstance(text, EmailMessage) and text.get_content() == TEXT.removesuffix("\r\n")
    assert html["Content-Transfer-Encoding"] is None
    assert binary["Content-Transfer-Encoding"] == "base64"
    assert binary.get_payload(decode=True) == b"\x00\x01\xfe\xff"


def test_nested_message() -> None:
    inner = b"Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + TEXT.encode()
    message = (
        b"Content-Type: multipart/mixed; boundary=b2\r\n\r\n"
        b"--b2\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + inner
        + b"--b2--\r\n"
    )
    parsed = parse(converted(message))
    (attached,) = [part for part in parsed.walk() if part.get_content_type() == "message/rfc822"]
    assert attached["Content-Transfer-Encoding"] == "7bit"
    (text,) = leaves(parsed)
    assert isinstance(text, EmailMessage)
    assert text.get_content() == TEXT.removesuffix("\r\n")
    # An 8-bit header inside the attached message cannot be downgraded.
    bad = message.replace(b"Subject: inner", "Subject: Grüße".encode())
    assert to_7bit(bad) is None


def test_8bit_headers_cannot_be_downgraded() -> None:
    assert to_7bit("Subject: Grüße\r\n\r\nhi\r\n".encode()) is None
    assert to_7bit("Subject: Grüße\r\n\r\nGrüße\r\n".encode()) is None
    in_a_part = MULTIPART.replace(
        b"Content-Type: application/octet-stream\r\n",
        'Content-Type: application/octet-stream; name="Grüße.bin"\r\n'.encode(),
    )
    assert to_7bit(in_a_part) is None


def test_what_cannot_be_converted() -> None:
    unknown_encoding = (
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-foo\r\n\r\n\xff\r\n"
    )
    assert to_7bit(unknown_encoding) is None
    eight_bit_preamble = MULTIPART.replace(b"This is a MIME message.", b"Pr\xc3\xa4ambel")
    assert to_7bit(eight_bit_preamble) is None


def test_7bit_content_labelled_8bit_is_relabelled() -> None:
    # The binary part holds ASCII only; the text part still makes the message 8-bit.
    message = MULTIPART.replace(b"\x00\x01\xfe\xff", b"ascii only")
    result = converted(message)
    assert b"Content-Transfer-Encoding: binary" not in result
    assert b"Content-Transfer-Encoding: 7bit\r\n\r\nascii only\r\n--b1--" in result
    binary = leaves(parse(result))[2]
    assert binary.get_payload(decode=True) == b"ascii only"


def test_quoted_printable_part_with_raw_8bit_is_repaired() -> None:
    message = (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"a=3Db \xc3\xa4\r\n"
    )
    assert parse(converted(message)).get_content() == "a=b ä\r\n"


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_downgraded_message_relays_to_a_peer_without_8bitmime(mode: str) -> None:
    """What the relayer does: the client refuses 8 bits, the converted message goes through."""
    link, _ = Link.open(mode, drop=frozenset({"8BITMIME", "CHUNKING"}))
    assert isinstance(link.client, ClientConnection)
    assert isinstance(link.server.conn, ServerConnection)
    original = b"Subject: hi\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + TEXT.encode()
    refused = link.send(Transaction("a@client.test", ["b@mx.test"], original))
    assert refused.local
    assert (refused.results[0].code, refused.results[0].enhanced) == (554, "5.6.3")
    body = to_7bit(original)
    assert body is not None
    result = link.send(Transaction("a@client.test", ["b@mx.test"], body))
    assert [reply.code for reply in result.results] == [250]
    assert link.server.mails[-1].body is None
    (delivered,) = link.server.messages
    assert parse(delivered).get_content() == TEXT
    assert SETTINGS.max_message_size >= len(delivered)


def test_lf_only_message() -> None:
    message = b"Subject: x\nContent-Type: text/plain; charset=utf-8\n\nGr\xc3\xbc\xc3\x9fe\n"
    assert parse(converted(message)).get_content() == "Grüße\r\n"
    assert to_7bit(message.replace(b"Subject: x", "Subject: ü".encode())) is None


def test_multipart_without_boundary_cannot_be_converted() -> None:
    # Without a boundary the content is not parsed as parts, and multipart cannot be encoded.
    assert to_7bit(b"Content-Type: multipart/mixed\r\n\r\n\xff\r\n") is None
