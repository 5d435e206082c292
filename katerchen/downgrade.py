"""Downgrading an 8-bit MIME message to 7 bit, for a peer without 8BITMIME (RFC 6152 section 3).

Pure: bytes in, bytes out, no I/O. It parses with the stdlib ``email`` package, so it lives
outside ``katerchen.protocol`` (``email.utils`` imports ``socket``); the relayer calls it in a
worker thread, as it may parse a large message.

What changes: every leaf part whose content is 8-bit is re-encoded -- ``text/*`` as
quoted-printable (RFC 2045 6.7), anything else as base64 (RFC 2045 6.8) -- and gets the matching
Content-Transfer-Encoding; a text part without a charset gets ``utf-8`` when its bytes are UTF-8,
else ``unknown-8bit`` (RFC 1428); a multipart or message/* part labelled ``8bit``/``binary`` is
relabelled ``7bit`` (RFC 2045 6.4); MIME-Version is added when missing. What does not: the
content of 7-bit parts, the boundaries, the preamble and epilogue, and the headers, which are
written back as they were parsed (unfolded lines stay unfolded; only the space after the colon
is normalized to one).

What cannot be done: a header with 8-bit bytes (it would need SMTPUTF8, RFC 6531, or an RFC 2047
rewrite of someone else's header, which katerchen does not do), 8-bit preamble or epilogue,
8-bit message/partial or message/external-body content (RFC 2046 5.2: 7bit only), or a
Content-Transfer-Encoding katerchen does not know: :func:`to_7bit` returns None.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import io
import re
from email.generator import BytesGenerator
from email.message import Message
from email.policy import compat32
from typing import Final

__all__ = ["is_8bit", "to_7bit"]

# compat32 keeps header values as they were (folding included) and content as bytes behind
# surrogate escapes; the newer policies would re-fold and re-encode everything they touch.
_POLICY: Final = compat32.clone(linesep="\r\n")
# RFC 2045 6.1: the encodings a part can carry; quoted-printable and base64 are decoded first.
_IDENTITY_ENCODINGS: Final = frozenset({"7bit", "8bit", "binary"})
_KNOWN_ENCODINGS: Final = _IDENTITY_ENCODINGS | {"quoted-printable", "base64"}
# A CR that does not end a line: binascii.b2a_qp leaves it, a 7-bit transport must not see it.
_BARE_CR_RE: Final = re.compile(rb"\r(?!\n)")


def is_8bit(data: bytes) -> bool:
    """True when ``data`` holds a byte over 127 (RFC 6152: needs 8BITMIME)."""
    return not data.isascii()


def to_7bit(message: bytes) -> bytes | None:
    """``message`` converted to 7 bit, or None when that cannot be done (see the module doc).

    A message that is 7-bit already is returned as it is. The result is always ASCII.
    """
    if message.isascii():
        return message
    # The header section is checked first: 8-bit there ends the matter without parsing.
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    if not (message if end < 0 else message[:end]).isascii():
        return None
    parsed = email.parser.BytesParser(policy=_POLICY).parsebytes(message)
    if not _convert(parsed):
        return None
    if "MIME-Version" not in parsed:
        parsed["MIME-Version"] = "1.0"
    out = io.BytesIO()
    _HeaderKeepingGenerator(out, mangle_from_=False, policy=_POLICY).flatten(parsed)
    result = out.getvalue()
    return result if result.isascii() else None


class _HeaderKeepingGenerator(BytesGenerator):
    """A generator that writes headers as they were parsed instead of re-folding them (lines
    end with CRLF, as _POLICY says)."""

    def _write_headers(self, msg: Message) -> None:
        for name, value in msg.raw_items():
            self.write(f"{name}: {value}\r\n")
        self.write("\r\n")


def _convert(part: Message) -> bool:
    """Make ``part`` and everything in it 7-bit, in place; False when it cannot be done."""
    for name, value in part.raw_items():
        if not (name.isascii() and isinstance(value, str) and value.isascii()):
            return False
    encoding = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if part.is_multipart():  # multipart/*, and message/* parsed as a nested message
        for child in part.get_payload():
            assert isinstance(child, Message)
            if not _convert(child):
                return False
        for text in (part.preamble, part.epilogue):
            if text is not None and not text.isascii():
                return False
        if encoding != "7bit" and encoding in _IDENTITY_ENCODINGS:
            _set_encoding(part, "7bit")
        return True
    payload = part.get_payload()
    if payload is None or (isinstance(payload, str) and payload.isascii()):
        if encoding in ("8bit", "binary"):  # 7-bit content needs no 8-bit label
            _set_encoding(part, "7bit")
        return True
    if encoding not in _KNOWN_ENCODINGS:
        return False
    maintype = part.get_content_maintype()
    if maintype == "message" or maintype == "multipart":
        return False  # content that was not parsed as MIME parts cannot be re-encoded
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    if maintype == "text":
        if part.get_param("charset") is None:
            _set_charset(part, raw)
        encoded = binascii.b2a_qp(raw, quotetabs=False, istext=True, header=False)
        encoded = _BARE_CR_RE.sub(b"=0D", encoded)
        part.set_payload(encoded.decode("ascii"))
        _set_encoding(part, "quoted-printable")
    else:
        # No line break after the last line: the boundary delimiter brings its own CRLF.
        part.set_payload(base64.encodebytes(raw).decode("ascii").rstrip("\n"))
        _set_encoding(part, "base64")
    return True


def _set_encoding(part: Message, encoding: str) -> None:
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", encoding)
    else:
        part["Content-Transfer-Encoding"] = encoding


def _set_charset(part: Message, raw: bytes) -> None:
    """RFC 2046 4.1.2: the default charset is US-ASCII, which 8-bit text is not."""
    try:
        raw.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "unknown-8bit"  # RFC 1428
    if "Content-Type" in part:
        part.set_param("charset", charset, replace=True)
    else:
        part["Content-Type"] = f"text/plain; charset={charset}"
