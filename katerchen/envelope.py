"""The envelope of a received message, its pre-header in spool files, and its Received header.

Pure: no I/O. The pre-header format is documented in ``docs/spool-format.md``; in short::

    katerchen-envelope 1
    id 0619a4b1c2d3e4f5a6b7
    arrival 2024-05-01T12:34:56.123456Z
    client 192.0.2.7
    helo mail.example.net
    from <alice@example.net>
    to <bob@example.org>
    to <"carol smith"@example.org>
    body 8BITMIME
    smtputf8 no
    auth alice@example.net        (optional: only for an authenticated session)
    relay yes                     (optional: only when remote recipients were authorised)
    <empty line>

Every line is ``key SP value LF`` in this fixed order (``to`` once per forward path, at least
once; ``auth`` and ``relay`` only when set, so a file without them is exactly what earlier
versions wrote). Values are UTF-8 and never hold a control character, so a line cannot be
confused with another and the first empty line ends the pre-header. Paths keep their angle
brackets and run to the end of their line, so quoted local parts with spaces, quotes or ``>``
stay unambiguous.
"""

from __future__ import annotations

import datetime
import email.utils
import ipaddress
import re
from typing import Final

import attrs

from katerchen.address import AddressError, parse_forward_path, parse_reverse_path

__all__ = ["BODY_TYPES", "ENVELOPE_VERSION", "Envelope", "EnvelopeError", "received_header"]

ENVELOPE_VERSION: Final = 1
BODY_TYPES: Final = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})

_MAGIC: Final = b"katerchen-envelope "
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND: Final = datetime.timedelta(microseconds=1)

_QUEUE_ID_RE: Final = re.compile(r"[0-9A-Za-z]{1,64}")
_ARRIVAL_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
# Control characters (C0, DEL, C1) are refused in every value, so LF can delimit lines and no
# CR can ever reach a file or a header (the ValueError is the guard against header injection).
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
_PROTOCOL_RE: Final = re.compile(r"[A-Za-z0-9]{1,32}")
# A hostname ends up in a header: a name or address literal, without spaces or parentheses.
_HOSTNAME_RE: Final = re.compile(r"[^\s()\\\x00-\x1f\x7f-\x9f]{1,255}")
# What a client said in HELO is shown, but it must not break or inject into the header.
_HELO_UNSAFE_RE: Final = re.compile(r"[\s()\\\x00-\x1f\x7f-\x9f]")


class EnvelopeError(ValueError):
    """An envelope that cannot be encoded, or a pre-header that cannot be decoded."""


def _check_value(key: str, value: str) -> None:
    if _CONTROL_RE.search(value):
        raise EnvelopeError(f"envelope {key}: control character")


def _check_path(key: str, path: str, *, reverse: bool) -> None:
    """Refuse a path that the SMTP parser would not accept: decode() must get back what it gets."""
    _check_value(key, path)
    try:
        if reverse:
            parse_reverse_path(f"<{path}>", utf8=True)
        else:
            parse_forward_path(f"<{path}>", utf8=True)
    except AddressError as error:
        raise EnvelopeError(f"envelope {key}: {error}") from None


def _format_arrival(arrival: float) -> str:
    try:
        when = _EPOCH + datetime.timedelta(microseconds=round(arrival * 1_000_000))
    except (OverflowError, ValueError):
        raise EnvelopeError("envelope arrival: out of range") from None
    if when.year < 1000:
        raise EnvelopeError("envelope arrival: out of range")
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_arrival(text: str) -> float:
    if not _ARRIVAL_RE.fullmatch(text):
        raise EnvelopeError("envelope arrival: not RFC 3339 UTC with microseconds")
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise EnvelopeError("envelope arrival: invalid date") from None
    # Integer microseconds, so that encode(decode(x)) == x exactly.
    return ((when - _EPOCH) // _MICROSECOND) / 1_000_000


@attrs.frozen
class Envelope:
    """What SMTP said about a message besides its content.

    ``arrival`` is unix time (stored with microsecond precision). ``reverse_path`` is ``""`` for
    the null path ``<>``, else ``str(Address)``; ``forward_paths`` are ``str(Address)`` in the order
    the recipients were accepted (``"postmaster"`` for a bare ``<postmaster>``). ``body`` is the
    MAIL BODY= parameter (``"7BIT"``, ``"8BITMIME"``, ``"BINARYMIME"``) or None when absent.
    """

    queue_id: str
    arrival: float
    client: str
    helo: str
    reverse_path: str
    forward_paths: tuple[str, ...]
    body: str | None
    smtputf8: bool
    #: The user the session authenticated as (SMTP AUTH), or None.
    auth: str | None = attrs.field(default=None, kw_only=True)
    #: The receiver authorised this client to send to domains we do not serve (a trusted
    #: network, or AUTH): delivery relays the recipients outside the served domains.
    relay: bool = attrs.field(default=False, kw_only=True)

    def encode(self) -> bytes:
        """The pre-header: version line, one line per field, then an empty line.

        Raises :class:`EnvelopeError` (a ValueError) for anything that could not be decoded back
        to this same envelope: a control character (CR, LF, NUL...) in any field, a path the
        SMTP parser would refuse, no forward path, an unknown body type or an invalid queue id.
        """
        if not _QUEUE_ID_RE.fullmatch(self.queue_id):
            raise EnvelopeError("envelope id: must be 1 to 64 characters [0-9A-Za-z]")
        _check_value("client", self.client)
        _check_value("helo", self.helo)
        if self.reverse_path:
            _check_path("from", self.reverse_path, reverse=True)
        if not self.forward_paths:
            raise EnvelopeError("envelope to: at least one forward path is needed")
        for path in self.forward_paths:
            _check_path("to", path, reverse=False)
        if self.body is not None and self.body not in BODY_TYPES:
            raise EnvelopeError("envelope body: unknown body type")
        if self.auth is not None:
            if not self.auth:
                raise EnvelopeError("envelope auth: empty")
            _check_value("auth", self.auth)
        lines = [
            f"katerchen-envelope {ENVELOPE_VERSION}",
            f"id {self.queue_id}",
            f"arrival {_format_arrival(self.arrival)}",
            f"client {self.client}",
            f"helo {self.helo}",
            f"from <{self.reverse_path}>",
            *(f"to <{path}>" for path in self.forward_paths),
            f"body {self.body or '-'}",
            f"smtputf8 {'yes' if self.smtputf8 else 'no'}",
        ]
        if self.auth is not None:
            lines.append(f"auth {self.auth}")
        if self.relay:
            lines.append("relay yes")
        lines += ["", ""]
        return "\n".join(lines).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> tuple[Envelope, int]:
        """Read a pre-header from the start of ``data`` (e.g. a whole spool file).

        Returns the envelope and the offset of the first byte after the pre-header (where the
        Received header and the message start). ``data`` must hold the whole pre-header. Raises
        :class:`EnvelopeError` for an unknown version, a missing, repeated, unknown or misplaced
        key, a malformed value, invalid UTF-8, or a pre-header with no end.
        """
        if not data.startswith(_MAGIC):
            raise EnvelopeError("not a katerchen envelope")
        end = data.find(b"\n\n")
        if end < 0:
            raise EnvelopeError("envelope: no end (truncated?)")
        try:
            text = data[:end].decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("envelope: invalid UTF-8") from None
        lines = text.split("\n")
        version = lines[0][len("katerchen-envelope ") :]
        if version != str(ENVELOPE_VERSION):
            raise EnvelopeError(f"envelope: unknown version {version[:20]!r}")
        fields: list[tuple[str, str]] = []
        for line in lines[1:]:
            if _CONTROL_RE.search(line):
                raise EnvelopeError("envelope: control character")
            key, sep, value = line.partition(" ")
            if not sep:
                raise EnvelopeError("envelope: line without a value")
            fields.append((key, value))
        return cls._from_fields(fields), end + 2

    @classmethod
    def _from_fields(cls, fields: list[tuple[str, str]]) -> Envelope:
        position = 0

        def take(key: str) -> str:
            nonlocal position
            if position >= len(fields) or fields[position][0] != key:
                found = fields[position][0][:20] if position < len(fields) else "the end"
                raise EnvelopeError(f"envelope: expected {key!r}, found {found!r}")
            position += 1
            return fields[position - 1][1]

        def bracketed(key: str, value: str) -> str:
            if len(value) < 2 or value[0] != "<" or value[-1] != ">":
                raise EnvelopeError(f"envelope {key}: path without angle brackets")
            return value[1:-1]

        queue_id = take("id")
        if not _QUEUE_ID_RE.fullmatch(queue_id):
            raise EnvelopeError("envelope id: invalid queue id")
        arrival = _parse_arrival(take("arrival"))
        client = take("client")
        helo = take("helo")
        reverse_path = bracketed("from", take("from"))
        if reverse_path:
            _check_path("from", reverse_path, reverse=True)
        forward_paths = []
        while position < len(fields) and fields[position][0] == "to":
            path = bracketed("to", take("to"))
            _check_path("to", path, reverse=False)
            forward_paths.append(path)
        if not forward_paths:
            raise EnvelopeError("envelope: no forward path")
        body: str | None = take("body")
        if body == "-":
            body = None
        elif body not in BODY_TYPES:
            raise EnvelopeError("envelope body: unknown body type")
        smtputf8_text = take("smtputf8")
        if smtputf8_text not in ("yes", "no"):
            raise EnvelopeError("envelope smtputf8: must be yes or no")
        # The optional keys, in their order, each at most once.
        auth: str | None = None
        if position < len(fields) and fields[position][0] == "auth":
            auth = take("auth")
            if not auth:
                raise EnvelopeError("envelope auth: empty")
        relay = False
        if position < len(fields) and fields[position][0] == "relay":
            if take("relay") != "yes":
                raise EnvelopeError("envelope relay: must be yes (it is left out otherwise)")
            relay = True
        if position != len(fields):
            raise EnvelopeError(f"envelope: unexpected key {fields[position][0][:20]!r}")
        return cls(
            queue_id=queue_id,
            arrival=arrival,
            client=client,
            helo=helo,
            reverse_path=reverse_path,
            forward_paths=tuple(forward_paths),
            body=body,
            smtputf8=smtputf8_text == "yes",
            auth=auth,
            relay=relay,
        )


def _client_literal(client: str) -> str | None:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; show what they are.
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


_NON_ASCII_RE: Final = re.compile("[^\x00-\x7f]")


def _ascii_helo(helo: str) -> str:
    try:
        encoded = helo.encode("idna").decode("ascii")
    except UnicodeError:
        encoded = _NON_ASCII_RE.sub("_", helo)
    # The idna codec keeps some characters the header must not get (it maps, it does not check).
    return _HELO_UNSAFE_RE.sub("_", _NON_ASCII_RE.sub("_", encoded)) or "unknown"


def received_header(envelope: Envelope, *, hostname: str, protocol: str) -> bytes:
    """The RFC 5321 4.4 ``Received:`` trace header for ``envelope``, folded, ending in CRLF.

    ``protocol`` is the RFC 3848/6531 "with" keyword: ``"SMTP"`` after HELO, ``"ESMTP"`` after
    EHLO, ``"UTF8SMTP"`` for EHLO plus SMTPUTF8 (``"ESMTPS"`` and the like also pass). The
    ``for`` clause appears only with exactly one recipient, so a Bcc list is not disclosed. The
    date is the arrival in UTC. The result is UTF-8 (it can hold non-ASCII under SMTPUTF8).

    A HELO name that is not a single token (spaces, parentheses, control characters) is shown
    with those characters replaced by "_", so what a client says cannot break the header. Without
    SMTPUTF8 the header stays ASCII: a non-ASCII HELO name is shown as IDNA A-labels (or with
    "_" for what cannot be encoded).

    Raises :class:`EnvelopeError` (a ValueError) when the hostname, protocol, queue id or the
    recipient could break the header; :meth:`Envelope.encode` refuses those envelopes too.
    """
    if not _PROTOCOL_RE.fullmatch(protocol):
        raise EnvelopeError("received: protocol must be an atom")
    if not _HOSTNAME_RE.fullmatch(hostname):
        raise EnvelopeError("received: invalid hostname")
    if not _QUEUE_ID_RE.fullmatch(envelope.queue_id):
        raise EnvelopeError("received: invalid queue id")
    helo = _HELO_UNSAFE_RE.sub("_", envelope.helo[:255]) or "unknown"
    if not envelope.smtputf8 and not helo.isascii():
        # Without SMTPUTF8 the message's header must stay ASCII (RFC 6531 3.7.3 allows UTF-8
        # in trace fields only for SMTPUTF8 messages): show an IDN HELO name as its A-labels.
        helo = _ascii_helo(helo)
    literal = _client_literal(envelope.client)
    tcp_info = f" ({literal})" if literal else ""
    lines = [
        f"Received: from {helo}{tcp_info}",
        f"by {hostname} (katerchen) with {protocol} id {envelope.queue_id}",
    ]
    if len(envelope.forward_paths) == 1:
        (recipient,) = envelope.forward_paths
        _check_value("to", recipient)
        lines.append(f"for <{recipient}>")
    try:
        when = _EPOCH + datetime.timedelta(microseconds=round(envelope.arrival * 1_000_000))
    except (OverflowError, ValueError):
        raise EnvelopeError("received: arrival out of range") from None
    lines[-1] += "; " + email.utils.format_datetime(when)
    return ("\r\n\t".join(lines) + "\r\n").encode("utf-8")
