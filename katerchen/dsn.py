"""Delivery status notifications (RFC 3464 bounces and delay notices), built as bytes. Pure.

:func:`build_report` returns a whole RFC 5322 message with CRLF line endings::

    multipart/report; report-type=delivery-status         (RFC 6522)
    ├── text/plain                the explanation for a human, one line per recipient
    ├── message/delivery-status   the same for a program (RFC 3464)
    └── text/rfc822-headers       the header block of the original message

Everything the server does not control is made safe before it reaches a header: control
characters (CR and LF above all) become spaces, so a remote server's reply or an odd address can
never start a field or a part of its own. The report is 7-bit wherever the standards let it be,
so it can be relayed to any server: non-ASCII recipients are written with the RFC 6533 ``utf-8``
address type in its 7-bit ``utf-8-addr-xtext`` form (``\\x{HEX}`` escapes), and the text and
header parts are quoted-printable when they need to be (RFC 6522 allows that for headers that
"require encoding"). The one exception is a reverse-path that is itself non-ASCII: the ``To:``
header then holds UTF-8 (RFC 6532), and the report must travel with SMTPUTF8, as the message
it answers did.

:func:`should_bounce` is the one rule about whether to send a report at all.
"""

from __future__ import annotations

import binascii
import datetime
import email.utils
import hashlib
import re
from collections.abc import Sequence
from typing import Final

import attrs

from katerchen.envelope import Envelope

__all__ = ["ACTIONS", "MAX_HEADER_BYTES", "RecipientStatus", "build_report", "should_bounce"]

#: The RFC 3464 actions a report can carry here: given up, or still being retried.
ACTIONS: Final = frozenset({"failed", "delayed"})
#: At most this much of the original header block is returned (whole lines); Postfix's
#: header_size_limit has the same default. A bounce of a bounce must stay small.
MAX_HEADER_BYTES: Final = 100 * 1024

_SUBJECT_FAILED: Final = "Undelivered Mail Returned to Sender"
_SUBJECT_DELAYED: Final = "Delayed Mail (still being retried)"
_STATUS_RE: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# RFC 3464 2.3.6: diagnostic-type ";" *text, e.g. "smtp; 550 5.1.1 No such user".
_DIAGNOSTIC_RE: Final = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*)\s*;\s*(.*)", re.DOTALL)
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
_SPACES_RE: Final = re.compile(r"\s+")
_MTA_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[A-Za-z0-9.:]+\]")
# RFC 6533 3: QCHAR is printable ASCII except "+", "=" and "\"; everything else in a
# utf-8-addr-xtext is an EmbeddedUnicodeChar, "\x{HEX}".
_QCHAR: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - set("+=\\")
# Longest text kept from a diagnostic or an escaped address: with its field name it stays one
# word within RFC 5322's 998-character line limit (2.1.1), even where it cannot be folded.
_MAX_FIELD_TEXT: Final = 900
_FOLD_AT: Final = 78
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _status_valid(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _STATUS_RE.fullmatch(value):
        raise ValueError(f"status must be an RFC 3463 code like 5.1.1, not {value[:20]!r}")


def _action_valid(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ACTIONS:
        raise ValueError(f"action must be 'failed' or 'delayed', not {value[:20]!r}")


@attrs.frozen
class RecipientStatus:
    """What happened to one recipient.

    ``recipient`` is the original envelope recipient (``str(Address)``, as in the envelope).
    ``action`` is ``"failed"`` (given up) or ``"delayed"`` (still retried). ``status`` is the
    RFC 3463 code: ``5.x.x`` for a permanent failure, ``4.x.x`` for a delay (a message given up
    after retrying for too long is ``failed`` with a ``4.x.x`` status, as RFC 3464 2.3.4
    allows). ``diagnostic`` is ``"<type>; <text>"`` (``"smtp; 550 5.1.1 No such user"`` for a
    remote reply, ``"x-katerchen; alias loop"`` for our own reasons); a text without a type
    gets ``x-katerchen;``, an empty one leaves Diagnostic-Code out. ``remote_mta`` is the host
    that gave the reply, when there was one.

    Raises ValueError for an unknown action or a status that is not ``d.ddd.ddd``.
    """

    recipient: str
    action: str = attrs.field(validator=_action_valid)
    status: str = attrs.field(validator=_status_valid)
    diagnostic: str
    remote_mta: str | None = None


def should_bounce(envelope: Envelope) -> bool:
    """Whether a failure of ``envelope`` may be reported to its sender: not for ``<>``.

    The null reverse-path is what bounces and other notifications are sent from (RFC 5321
    4.5.5, RFC 3464 2), so that no report can ever answer a report: such a failure is logged and
    the message dropped. This is the only rule. A message marked ``Auto-Submitted`` with a real
    reverse-path still gets its bounce: RFC 3834 stops automatic *replies* to it, not delivery
    reports, and RFC 5321 4.4 wants the sender told about a failure.
    """
    return envelope.reverse_path != ""


# --- text helpers ---------------------------------------------------------------------------


def _clean(text: str) -> str:
    """One line of text: control characters and runs of white space become one space."""
    return _SPACES_RE.sub(" ", _CONTROL_RE.sub(" ", text)).strip()


def _ascii_escape(text: str) -> str:
    """Non-ASCII characters as RFC 6533 ``\\x{HEX}`` escapes, so a 7-bit field can show them."""
    if text.isascii():
        return text
    return "".join(c if c.isascii() else f"\\x{{{ord(c):02X}}}" for c in text)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_FIELD_TEXT else text[: _MAX_FIELD_TEXT - 3] + "..."


def _fold(name: str, value: str) -> str:
    """``name: value`` folded at spaces so lines stay near 78 characters, ending in CRLF."""
    line = f"{name}: {value}"
    if len(line) <= _FOLD_AT:
        return line + "\r\n"
    words = line.split(" ")
    lines: list[str] = []
    current = words[0]
    for word in words[1:]:
        # Only between two non-empty words: a run of spaces (in a quoted local part) survives.
        if current and word and len(current) + 1 + len(word) > _FOLD_AT:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}"
    lines.append(current)
    # The space that separated two words becomes the folding white space (RFC 5322 2.2.3).
    return "\r\n ".join(lines) + "\r\n"


def _address(address: str) -> str:
    """An envelope address for a header. Envelope.decode already refused control characters;
    removing them again costs nothing and keeps this module safe on its own. Spaces stay: a
    quoted local part may hold several in a row."""
    return _CONTROL_RE.sub("", address)


def _typed_address(address: str) -> str:
    """An address as a delivery-status field types it (RFC 3464 2.3.2, RFC 6533 3)."""
    address = _address(address)
    if address.isascii():
        return "rfc822; " + _cut(address)
    escaped = "".join(c if c in _QCHAR else f"\\x{{{ord(c):02X}}}" for c in address)
    return "utf-8; " + _cut(escaped)


def _diagnostic(diagnostic: str) -> tuple[str, str] | None:
    """``(type, text)`` of a diagnostic, cleaned; None when there is nothing to say."""
    text = _clean(diagnostic)
    if not text:
        return None
    match = _DIAGNOSTIC_RE.fullmatch(text)
    if match is None:
        return "x-katerchen", text
    return match.group(1).lower(), match.group(2)


def _remote_mta(name: str) -> str:
    """The host name of a Remote-MTA field; a "dns;" the caller may have written is dropped."""
    name = _clean(name)
    if name[:4].lower() == "dns;":
        name = name[4:]
    return _cut(_ascii_escape(name.replace(" ", "")))


def _date(when: datetime.datetime) -> str:
    return email.utils.format_datetime(when)


def _arrival(envelope: Envelope) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(microseconds=round(envelope.arrival * 1_000_000))


def _reporting_mta(name: str) -> str:
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("reporting_mta is not a valid host name") from None
    if not _MTA_RE.fullmatch(name):
        raise ValueError("reporting_mta must be a host name or an address literal")
    return name


# --- the parts ------------------------------------------------------------------------------


def _quoted_printable(lines: Sequence[bytes]) -> bytes:
    """Lines (without line ends) as quoted-printable with CRLF, every byte but TAB and
    printable ASCII escaped, long lines broken with soft line breaks (RFC 2045 6.7)."""
    encoded = (binascii.b2a_qp(line, istext=False).replace(b"=\n", b"=\r\n") for line in lines)
    return b"\r\n".join(encoded) + b"\r\n"


def _needs_encoding(lines: Sequence[bytes]) -> bool:
    for line in lines:
        if len(line) > 998 or not line.isascii():
            return True
        # Any control character but TAB (a bare CR, a NUL...) has no place in a 7-bit part.
        if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in line):
            return True
    return False


def _header_lines(data: bytes) -> list[bytes]:
    """The header block at the start of ``data``: its lines without line ends, up to the first
    empty line (or the end), at most :data:`MAX_HEADER_BYTES` in whole lines."""
    lines: list[bytes] = []
    total = 0
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        line = data[start:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            break
        total += len(line) + 2
        if total > MAX_HEADER_BYTES:
            break
        lines.append(line)
        start = end + 1
    return lines


def _text_part(
    envelope: Envelope, statuses: Sequence[RecipientStatus], reporting_mta: str
) -> tuple[bytes, bytes]:
    """The human part: (its MIME headers, its body)."""
    failed = [s for s in statuses if s.action == "failed"]
    delayed = [s for s in statuses if s.action == "delayed"]
    arrival = _date(_arrival(envelope))
    outcome = "could not be delivered" if failed else "has not been delivered yet"
    lines = [
        f"This is the mail server at {reporting_mta}.",
        "",
        f"Your message {outcome} to every recipient. The details",
        "for programs are in the attached report, followed by your message's headers.",
        "",
        f"    Arrived:   {arrival}",
        f"    Queue id:  {envelope.queue_id}",
    ]

    def describe(status: RecipientStatus) -> list[str]:
        diagnostic = _diagnostic(status.diagnostic)
        reason = _cut(diagnostic[1]) if diagnostic else f"status {status.status}"
        where = f" (reported by {_clean(status.remote_mta)})" if status.remote_mta else ""
        return [f"<{_address(status.recipient)}>:", f"    {reason}{where}"]

    if failed:
        lines += ["", "Delivery to these recipients failed for good; it will not be retried:", ""]
        for status in failed:
            lines += describe(status)
    if delayed:
        lines += [
            "",
            "Delivery to these recipients is delayed. The server keeps trying; you do not",
            "need to send the message again, and you will be told if it finally fails:",
            "",
        ]
        for status in delayed:
            lines += describe(status)
    encoded = [line.encode("utf-8") for line in lines]
    if _needs_encoding(encoded):
        charset = "utf-8" if any(not line.isascii() for line in encoded) else "us-ascii"
        headers = (
            f"Content-Type: text/plain; charset={charset}\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n"
        )
        body = _quoted_printable(encoded)
    else:
        headers = (
            "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        )
        body = b"\r\n".join(encoded) + b"\r\n"
    headers += "Content-Description: Notification\r\n"
    return headers.encode("ascii"), body


def _status_part(
    envelope: Envelope,
    statuses: Sequence[RecipientStatus],
    reporting_mta: str,
    now: datetime.datetime,
) -> tuple[bytes, bytes]:
    """The machine part, message/delivery-status (RFC 3464 2.2 and 2.3), all 7-bit."""
    fields = [
        _fold("Reporting-MTA", f"dns; {reporting_mta}"),
        _fold("X-Katerchen-Queue-ID", envelope.queue_id),
        _fold("Arrival-Date", _date(_arrival(envelope))),
    ]
    blocks = ["".join(fields)]
    for status in statuses:
        fields = [
            _fold("Final-Recipient", _typed_address(status.recipient)),
            _fold("Action", status.action),
            _fold("Status", status.status),
        ]
        if status.remote_mta:
            remote = _remote_mta(status.remote_mta)
            if remote:
                fields.append(_fold("Remote-MTA", f"dns; {remote}"))
        diagnostic = _diagnostic(status.diagnostic)
        if diagnostic is not None:
            kind, text = diagnostic
            fields.append(_fold("Diagnostic-Code", f"{kind}; {_cut(_ascii_escape(text))}"))
        fields.append(_fold("Last-Attempt-Date", _date(now)))
        blocks.append("".join(fields))
    headers = b"Content-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n"
    return headers, "\r\n".join(blocks).encode("ascii")


def _headers_part(headers: bytes) -> tuple[bytes, bytes]:
    """The original header block as text/rfc822-headers (RFC 6522 5)."""
    lines = _header_lines(headers)
    description = b"Content-Description: Undelivered Message Headers\r\n"
    if not _needs_encoding(lines):
        return (
            b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit\r\n"
            + description,
            b"".join(line + b"\r\n" for line in lines),
        )
    # 8-bit headers (RFC 6532 UTF-8, or raw legacy bytes) or broken ones: quoted-printable,
    # which RFC 6522 names for headers that "require encoding". Only valid UTF-8 is labelled so.
    try:
        b"\n".join(lines).decode("utf-8")
    except UnicodeDecodeError:
        content_type = b"Content-Type: text/rfc822-headers\r\n"
    else:
        content_type = b"Content-Type: text/rfc822-headers; charset=utf-8\r\n"
    return (
        content_type + b"Content-Transfer-Encoding: quoted-printable\r\n" + description,
        _quoted_printable(lines),
    )


def _boundary(seed: str, bodies: Sequence[bytes]) -> str:
    # "=_" cannot occur in quoted-printable text; the loop makes sure of the 7-bit parts too.
    counter = 0
    while True:
        digest = hashlib.sha256(f"{seed}/{counter}".encode()).hexdigest()[:24]
        boundary = f"=_katerchen_{digest}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in body for body in bodies):
            return boundary
        counter += 1


def build_report(
    *,
    envelope: Envelope,
    statuses: Sequence[RecipientStatus],
    headers: bytes,
    reporting_mta: str,
    now: datetime.datetime | None = None,
) -> bytes:
    """An RFC 3464 delivery status notification for ``envelope``, as message bytes (CRLF).

    ``statuses`` has one entry per recipient to report (at least one); the Subject says
    "Undelivered Mail Returned to Sender" when any of them failed, else "Delayed Mail (still
    being retried)". ``headers`` is the start of the original message as delivered (from the
    Received header on); only its header block is used: up to the first empty line, at most
    :data:`MAX_HEADER_BYTES`, so the caller may pass a bounded prefix of a large message.
    ``reporting_mta`` is this server's host name (``[server] hostname``): it appears in From
    (``MAILER-DAEMON@<reporting_mta>``), Message-ID and Reporting-MTA. ``now`` (timezone-aware)
    is the Date and Last-Attempt-Date; the clock is read only when it is None.

    The report is addressed to the envelope's reverse-path and carries ``Auto-Submitted:
    auto-replied`` (RFC 3834 5). Send it from the null reverse-path ``<>``, and only when
    :func:`should_bounce` says so; with SMTPUTF8 when the reverse-path is not ASCII. Its
    Message-ID is derived from the queue id, ``now`` and the statuses: the same report built
    twice is the same message.

    Raises ValueError when ``statuses`` is empty, the envelope has the null reverse-path,
    ``now`` is naive, or ``reporting_mta`` is not a host name or address literal.
    """
    if not statuses:
        raise ValueError("a report needs at least one recipient status")
    if not envelope.reverse_path:
        raise ValueError("never report to the null reverse-path")
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    elif now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    mta = _reporting_mta(reporting_mta)
    seed = "\n".join(
        [envelope.queue_id, now.isoformat(), mta]
        + [f"{s.recipient}\0{s.action}\0{s.status}" for s in statuses]
    )
    digest = hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest()
    parts = [
        _text_part(envelope, statuses, mta),
        _status_part(envelope, statuses, mta, now),
        _headers_part(headers),
    ]
    boundary = _boundary(digest, [body for _, body in parts])
    failed = any(s.action == "failed" for s in statuses)
    top = [
        _fold("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        # The reverse-path is a valid RFC 5321 mailbox, which is a valid RFC 5322 addr-spec;
        # its characters were checked when the envelope was decoded (no controls).
        f"To: <{_address(envelope.reverse_path)}>\r\n",
        _fold("Subject", _SUBJECT_FAILED if failed else _SUBJECT_DELAYED),
        _fold("Date", _date(now)),
        _fold("Message-ID", f"<{envelope.queue_id}.{digest[:16]}.dsn@{mta}>"),
        "Auto-Submitted: auto-replied\r\n",
        "MIME-Version: 1.0\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f' boundary="{boundary}"\r\n',
        "\r\n",
        "This is a MIME-encapsulated delivery status notification.\r\n",
    ]
    out = ["".join(top).encode("utf-8")]
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    for part_headers, body in parts:
        out += [delimiter, part_headers, b"\r\n", body]
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)
