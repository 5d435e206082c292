"""RFC 5321/6531 paths, mailboxes and domains: parsing, and the only gate to path components.

Everything here is pure and runs once per MAIL or RCPT command, so the regular expressions are
compiled once at import and the common case (a short ASCII path) costs a handful of regex calls.

Grammar (RFC 5321 4.1.2, extended by RFC 6531 3.3 for SMTPUTF8)::

    Reverse-path  = Path / "<>"
    Forward-path  = Path / "<Postmaster>"          (case-insensitive, RFC 5321 4.5.1)
    Path          = "<" [ A-d-l ":" ] Mailbox ">"   (the source route A-d-l is parsed and dropped)
    Mailbox       = Local-part "@" ( Domain / address-literal )
    Local-part    = Dot-string / Quoted-string
    Domain        = sub-domain *("." sub-domain)    (LDH labels; U-labels under SMTPUTF8)

This module does not know about replies: an :class:`AddressError` carries a ``kind`` and the
protocol maps it to the reply (so imports keep flowing downward).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Final, Literal

import attrs

__all__ = [
    "Address",
    "AddressError",
    "AddressErrorKind",
    "domain_component",
    "mailbox_component",
    "parse_forward_path",
    "parse_reverse_path",
    "split_path",
]

AddressErrorKind = Literal["syntax", "utf8", "too_long"]

# RFC 5321 4.5.3.1.1-3, in octets of the UTF-8 form.
MAX_LOCAL_PART: Final = 64
MAX_DOMAIN: Final = 255
MAX_PATH: Final = 256  # including "<" and ">" and any source route
MAX_LABEL: Final = 63  # RFC 1035 2.3.4; for a U-label, the length of its A-label


class AddressError(ValueError):
    """A path that cannot be accepted.

    ``kind`` says why, and the protocol chooses the reply from it:

    - ``"syntax"``: not RFC 5321/6531 syntax (501 5.1.7 for MAIL, 501 5.1.3 for RCPT);
    - ``"utf8"``: non-ASCII without SMTPUTF8 (553 5.6.7, RFC 6531 3.6.1);
    - ``"too_long"``: over an RFC 5321 4.5.3.1 length limit (501 5.1.7 / 501 5.1.3, or 553 5.1.0).

    ``str(error)`` is a short human-readable explanation, safe to put in a reply (it never
    repeats the offending input).
    """

    kind: AddressErrorKind

    def __init__(self, kind: AddressErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- character classes ----------------------------------------------------------------------

# Any non-ASCII code point. RFC 6531 says UTF8-non-ascii; control characters (C1) and surrogates
# are refused beforehand by _BAD_CHARS_RE, so the classes below can stay simple.
_NON_ASCII = "\u0080-\U0010ffff"
# RFC 5322 atext, plus UTF8-non-ascii (RFC 6531 3.3).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~" + _NON_ASCII
_DOT_STRING = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
# qtextSMTP = %d32-33 / %d35-91 / %d93-126, plus UTF8-non-ascii; quoted-pairSMTP = "\" %d32-126.
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_NON_ASCII}]|\\[\x20-\x7e])*"'
# sub-domain = Let-dig [Ldh-str]; non-ASCII letters are let-digs here and U-labels are checked
# more closely in _check_labels (parsing gets there only with utf8=True, see _check_chars).
_LET_DIG = f"A-Za-z0-9{_NON_ASCII}"
_LABEL = rf"[{_LET_DIG}](?:[{_LET_DIG}\-]*[{_LET_DIG}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
# address-literal = "[" ( IPv4 / "IPv6:" IPv6 / Standardized-tag ":" 1*dcontent ) "]";
# dcontent = %d33-90 / %d94-126. The content is checked in _check_literal.
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"

_PATH_RE: Final = re.compile(
    rf"<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?"
    rf"(?:(?P<dot>{_DOT_STRING})|(?P<quoted>{_QUOTED_STRING}))"
    rf"@(?:(?P<domain>{_DOMAIN})|(?P<literal>{_LITERAL}))>"
)
_SOURCE_ROUTE_DOMAIN_RE: Final = re.compile(rf"@({_DOMAIN})[,:]")
_DOT_STRING_RE: Final = re.compile(_DOT_STRING)
_DOMAIN_RE: Final = re.compile(_DOMAIN)
_QUOTED_PAIR_RE: Final = re.compile(r"\\(.)")
_NEEDS_ESCAPE_RE: Final = re.compile(r'(["\\])')
# C0 controls, DEL, C1 controls and lone surrogates are never valid in a path (RFC 5321 has no
# place for them, RFC 6530 10.1 discourages C1, and surrogates cannot be encoded in UTF-8).
_BAD_CHARS_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# Loose shape of "<path>" followed by the MAIL/RCPT parameters, for split_path only: it must
# find the closing ">" even when a quoted local part or a general address literal holds one.
_SPLIT_RE: Final = re.compile(
    r' *(<(?:@[^:>]*:)?(?:"(?:[^"\\]|\\.)*"|[^@>" ]*)(?:@(?:\[[^\]]*\]|[^> ]*))?>)(?: +(.*))?',
    re.DOTALL,
)

_IPV4_RE: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_TAG_RE: Final = re.compile(r"ipv6:", re.IGNORECASE)
_IPV6_CHARS_RE: Final = re.compile(r"[0-9A-Fa-f:.]+")
_GENERAL_TAG_RE: Final = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:")

# Unicode general categories allowed in a U-label: letters, marks, numbers (a simplification of
# IDNA2008's PVALID set that keeps out spaces, punctuation, symbols and format characters).
_ULABEL_CATEGORIES: Final = frozenset(
    {"Ll", "Lu", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No"}
)


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# --- the value --------------------------------------------------------------------------------


@attrs.frozen
class Address:
    """A mailbox from a path.

    ``local_part`` is unquoted (quoted-pairs resolved) and keeps the case it was sent in.
    ``domain`` is as sent; an address literal keeps its brackets (``"[127.0.0.1]"``). ``domain``
    is None only for the special ``<postmaster>`` forward path.
    """

    local_part: str
    domain: str | None

    def __str__(self) -> str:
        """The canonical SMTP mailbox: the local part quoted only when it is not a Dot-string."""
        local = self.local_part
        if not _DOT_STRING_RE.fullmatch(local):
            local = '"' + _NEEDS_ESCAPE_RE.sub(r"\\\1", local) + '"'
        if self.domain is None:
            return local
        return f"{local}@{self.domain}"

    @property
    def is_utf8(self) -> bool:
        """True when the local part or the domain holds non-ASCII characters."""
        return not self.local_part.isascii() or (
            self.domain is not None and not self.domain.isascii()
        )


# --- parsing ----------------------------------------------------------------------------------


def split_path(arg: str) -> tuple[str, str]:
    """Split the argument of MAIL FROM: or RCPT TO: into ``("<path>", "params")``.

    ``arg`` is what follows the colon; spaces before the path are tolerated. The split is
    quote-aware: a quoted local part (``<"a> b"@example.org>``) or an address literal may hold
    ``>`` or spaces. ``params`` is the rest with the separating spaces removed ("" when there are
    none). The path itself is only delimited here, not validated: pass it to
    :func:`parse_reverse_path` or :func:`parse_forward_path`.

    Raises :class:`AddressError` (kind ``"syntax"``) when no ``<...>`` path starts the argument or
    something other than a space follows it.
    """
    match = _SPLIT_RE.fullmatch(arg)
    if match is None:
        if arg.strip(" ") == "":
            raise AddressError("syntax", "missing path")
        raise AddressError("syntax", "path syntax error")
    return match.group(1), (match.group(2) or "").rstrip(" ")


def _check_chars(path: str, *, utf8: bool) -> None:
    if _BAD_CHARS_RE.search(path):
        raise AddressError("syntax", "control character in path")
    if not utf8 and not path.isascii():
        raise AddressError("utf8", "non-ASCII address without SMTPUTF8")
    if _octets(path) > MAX_PATH:
        raise AddressError("too_long", "path too long")


def _check_labels(domain: str) -> None:
    for label in domain.split("."):
        if label.isascii():
            length = len(label)
        else:
            if not unicodedata.is_normalized("NFC", label):
                raise AddressError("syntax", "domain label not in NFC")
            if unicodedata.category(label[0]).startswith("M"):
                raise AddressError("syntax", "domain label starts with a combining mark")
            for char in label:
                if not char.isascii() and unicodedata.category(char) not in _ULABEL_CATEGORIES:
                    raise AddressError("syntax", "invalid character in domain")
            length = 4 + len(label.encode("punycode"))  # "xn--" + the punycode of the A-label
        if length > MAX_LABEL:
            raise AddressError("too_long", "domain label too long")


def _check_literal(literal: str) -> None:
    content = literal[1:-1]
    if _IPV4_RE.fullmatch(content):
        try:
            # ipaddress refuses leading zeros, which some resolvers would read as octal.
            ipaddress.IPv4Address(content)
        except ValueError:
            raise AddressError("syntax", "invalid IPv4 address literal") from None
        return
    if _IPV6_TAG_RE.match(content):
        ipv6 = content[5:]
        # The character check keeps out scope ids ("fe80::1%eth0"), which ipaddress accepts.
        if not _IPV6_CHARS_RE.fullmatch(ipv6):
            raise AddressError("syntax", "invalid IPv6 address literal")
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            raise AddressError("syntax", "invalid IPv6 address literal") from None
        return
    # General-address-literal = Standardized-tag ":" 1*dcontent; the characters were checked by
    # _LITERAL, and at least one follows the colon because the tag match cannot end the string.
    tag = _GENERAL_TAG_RE.match(content)
    if tag is None or tag.end() == len(content):
        raise AddressError("syntax", "invalid address literal")


def _parse_mailbox_path(path: str) -> Address:
    match = _PATH_RE.fullmatch(path)
    if match is None:
        raise AddressError("syntax", "path syntax error")
    dot, quoted, domain, literal = match.group("dot", "quoted", "domain", "literal")
    if dot is not None:
        local_part = dot
        raw_local = dot
    else:
        raw_local = quoted
        local_part = _QUOTED_PAIR_RE.sub(r"\1", quoted[1:-1])
    # RFC 5321 4.5.3.1.1 limits the Local-part as it appears in the path (quotes included).
    if _octets(raw_local) > MAX_LOCAL_PART:
        raise AddressError("too_long", "local part too long")
    if domain is not None:
        if _octets(domain) > MAX_DOMAIN:
            raise AddressError("too_long", "domain too long")
        _check_labels(domain)
    else:
        if len(literal) > MAX_DOMAIN:
            raise AddressError("too_long", "domain too long")
        _check_literal(literal)
        domain = literal
    if path[1] == "@":
        # The source route is accepted and ignored (RFC 5321 4.1.1.3, C.), but its domains must
        # still be well-formed.
        route = path[1 : path.index(":") + 1]
        for route_match in _SOURCE_ROUTE_DOMAIN_RE.finditer(route):
            _check_labels(route_match.group(1))
    return Address(local_part, domain)


def parse_reverse_path(path: str, *, utf8: bool) -> Address | None:
    """Parse a MAIL FROM path (with its angle brackets); ``"<>"`` gives None.

    ``utf8`` is whether the transaction has SMTPUTF8. Raises :class:`AddressError`.
    """
    if path == "<>":
        return None
    _check_chars(path, utf8=utf8)
    return _parse_mailbox_path(path)


def parse_forward_path(path: str, *, utf8: bool) -> Address:
    """Parse a RCPT TO path (with its angle brackets).

    ``<postmaster>`` in any case gives ``Address(<as sent>, None)`` (RFC 5321 4.5.1); ``<>`` is
    a syntax error here. ``utf8`` is whether the transaction has SMTPUTF8. Raises
    :class:`AddressError`.
    """
    if path.isascii() and path.lower() == "<postmaster>":
        return Address(path[1:-1], None)
    _check_chars(path, utf8=utf8)
    return _parse_mailbox_path(path)


# --- path components ----------------------------------------------------------------------------

# Characters never allowed in a path component made from a local part: path separators, and
# every control (Cc), format (Cf) and surrogate (Cs) code point.
_UNSAFE_COMPONENT_RE: Final = re.compile("[/\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def mailbox_component(local_part: str) -> str | None:
    """Turn a local part into a safe directory name: lowercased, or None when unsafe.

    Unsafe means: empty, ``.``/``..`` or any leading dot, a ``/`` or ``\\``, NUL or any control
    or format character, or more than 64 octets. This is the only way a local part may become
    part of a file system path.
    """
    component = local_part.lower()
    if not component or component[0] == "." or _UNSAFE_COMPONENT_RE.search(component):
        return None
    if _octets(component) > MAX_LOCAL_PART:
        return None
    if not component.isascii() and any(unicodedata.category(c) == "Cf" for c in component):
        return None
    return component


def domain_component(domain: str) -> str | None:
    """Turn a domain into a safe directory name: lowercased, or None.

    None unless ``domain`` is a syntactically valid domain name (LDH labels, or U-labels, no
    trailing dot, within the length limits). Address literals give None.
    """
    if not domain or _BAD_CHARS_RE.search(domain) or _octets(domain) > MAX_DOMAIN:
        return None
    if not _DOMAIN_RE.fullmatch(domain):
        return None
    try:
        _check_labels(domain)
    except AddressError:
        return None
    component = domain.lower()
    # Lowercasing letters gives letters, but a check on the result costs little.
    if not _DOMAIN_RE.fullmatch(component):
        return None
    return component
