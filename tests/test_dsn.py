"""Tests for katerchen.dsn: reports parsed back with the stdlib ``email`` package, field by field.

No clock and no disk: every report is built with a fixed ``now``, except the one test that
checks that the clock is read when ``now`` is None.
"""

from __future__ import annotations

import datetime
import email
import email.message
import email.policy
import email.utils
import re

import pytest

from katerchen import dsn
from katerchen.dsn import RecipientStatus, build_report, should_bounce
from katerchen.envelope import Envelope

MTA = "mx.example.test"
NOW = datetime.datetime(2024, 5, 2, 8, 30, 15, tzinfo=datetime.UTC)
ARRIVAL = 1714567896.123456  # 2024-05-01 12:51:36 UTC
HEADERS = (
    b"Received: from mail.example.net ([192.0.2.7])\r\n"
    b"\tby mx.example.test (katerchen) with ESMTP id 0619a4b1c2d3e4f5a6b7;\r\n"
    b"\tWed, 01 May 2024 12:51:36 +0000\r\n"
    b"From: Alice <alice@example.net>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: lunch?\r\n"
    b"Message-ID: <original@example.net>\r\n"
)
BODY = b"\r\nthe body, which a report never repeats\r\n"


def make_envelope(
    reverse_path: str = "alice@example.net",
    forward_paths: tuple[str, ...] = ("bob@example.test",),
    *,
    smtputf8: bool = False,
) -> Envelope:
    return Envelope(
        queue_id="0619a4b1c2d3e4f5a6b7",
        arrival=ARRIVAL,
        client="192.0.2.7",
        helo="mail.example.net",
        reverse_path=reverse_path,
        forward_paths=forward_paths,
        body="8BITMIME",
        smtputf8=smtputf8,
    )


FAILED = RecipientStatus(
    recipient="bob@example.test",
    action="failed",
    status="5.1.1",
    diagnostic="smtp; 550 5.1.1 <bob@example.test>: no such mailbox",
    remote_mta="mx2.example.test",
)
DELAYED = RecipientStatus(
    recipient="carol@example.org",
    action="delayed",
    status="4.4.1",
    diagnostic="x-katerchen; connection refused by mx.example.org",
)


def build(
    statuses: list[RecipientStatus],
    *,
    envelope: Envelope | None = None,
    headers: bytes = HEADERS + BODY,
) -> bytes:
    return build_report(
        envelope=envelope or make_envelope(),
        statuses=statuses,
        headers=headers,
        reporting_mta=MTA,
        now=NOW,
    )


def parse(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def report_parts(
    message: email.message.EmailMessage,
) -> tuple[email.message.EmailMessage, list[email.message.Message], email.message.EmailMessage]:
    """The three parts of a report: human text, status blocks, original headers."""
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    assert [part.get_content_type() for part in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    human, status, original = parts
    assert isinstance(human, email.message.EmailMessage)
    assert isinstance(original, email.message.EmailMessage)
    payload = status.get_payload()
    assert isinstance(payload, list)
    blocks = [block for block in payload if isinstance(block, email.message.Message)]
    assert len(blocks) == len(payload)
    return human, blocks, original


def decode_xtext(value: str) -> str:
    """RFC 6533 utf-8-addr-xtext back to text."""
    return re.sub(r"\\x\{([0-9A-F]{2,6})\}", lambda m: chr(int(m.group(1), 16)), value)


def assert_well_formed(data: bytes) -> None:
    """CRLF only, no line over RFC 5322's 998 octets, and a parse without defects."""
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    for part in parse(data).walk():
        assert not part.defects, part.defects


# --- the failed report, field by field --------------------------------------------------------


def test_failed_report_top_level_headers() -> None:
    data = build([FAILED])
    assert_well_formed(data)
    assert data.isascii()
    message = parse(data)
    assert message["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert message["From"].addresses[0].display_name == "Mail Delivery System"
    assert message["To"].addresses[0].addr_spec == "alice@example.net"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"].datetime == NOW
    assert re.fullmatch(
        rf"<0619a4b1c2d3e4f5a6b7\.[0-9a-f]{{16}}\.dsn@{MTA}>", message["Message-ID"]
    )
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"


def test_failed_report_delivery_status() -> None:
    _, blocks, _ = report_parts(parse(build([FAILED])))
    assert len(blocks) == 2
    per_message, per_recipient = blocks
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    assert arrival == datetime.datetime(2024, 5, 1, 12, 51, 36, tzinfo=datetime.UTC)
    assert per_message["X-Katerchen-Queue-ID"] == "0619a4b1c2d3e4f5a6b7"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx2.example.test"
    assert per_recipient["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@example.test>: no such mailbox"
    )
    assert email.utils.parsedate_to_datetime(per_recipient["Last-Attempt-Date"]) == NOW
    # RFC 3464 2.3: the fields in their order.
    assert list(per_recipient.keys()) == [
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    ]


def test_failed_report_human_part() -> None:
    human, _, _ = report_parts(parse(build([FAILED])))
    text = human.get_content()
    assert MTA in text
    assert "<bob@example.test>" in text
    assert "550 5.1.1 <bob@example.test>: no such mailbox" in text
    assert "will not be retried" in text
    assert "0619a4b1c2d3e4f5a6b7" in text


def test_original_headers_without_the_body() -> None:
    _, _, original = report_parts(parse(build([FAILED])))
    assert original.get_payload(decode=True) == HEADERS
    assert original["Content-Transfer-Encoding"] == "7bit"
    assert b"the body" not in build([FAILED])


# --- delayed, several recipients --------------------------------------------------------------


def test_delayed_report() -> None:
    envelope = make_envelope(forward_paths=("carol@example.org",))
    message = parse(build([DELAYED], envelope=envelope))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    human, blocks, _ = report_parts(message)
    (recipient,) = blocks[1:]
    assert recipient["Final-Recipient"] == "rfc822; carol@example.org"
    assert recipient["Action"] == "delayed"
    assert recipient["Status"] == "4.4.1"
    assert recipient["Diagnostic-Code"] == "x-katerchen; connection refused by mx.example.org"
    assert recipient["Remote-MTA"] is None
    text = human.get_content()
    assert "keeps trying" in text
    assert "not been delivered yet" in text
    assert "will not be retried" not in text


def test_several_recipients_in_order() -> None:
    third = RecipientStatus("dave@example.test", "failed", "5.4.6", "x-katerchen; alias loop")
    message = parse(build([FAILED, DELAYED, third]))
    assert message["Subject"] == "Undelivered Mail Returned to Sender"  # any failure
    human, blocks, _ = report_parts(message)
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@example.test",
        "rfc822; carol@example.org",
        "rfc822; dave@example.test",
    ]
    assert [b["Action"] for b in blocks[1:]] == ["failed", "delayed", "failed"]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "4.4.1", "5.4.6"]
    text = human.get_content()
    for line in ("<bob@example.test>", "<carol@example.org>", "<dave@example.test>", "alias loop"):
        assert line in text


def test_failed_with_a_transient_status_after_retries() -> None:
    # Given up after retrying for too long: Action failed with a 4.x.x status (RFC 3464 2.3.4).
    expired = RecipientStatus("bob@example.test", "failed", "4.4.7", "x-katerchen; expired")
    message = parse(build([expired]))
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    _, blocks, _ = report_parts(message)
    assert blocks[1]["Status"] == "4.4.7"


# --- internationalized addresses and 8-bit headers ---------------------------------------------


def test_utf8_recipient_uses_the_utf8_address_type() -> None:
    status = RecipientStatus("jörg+x=y@bücher.example", "failed", "5.1.1", "smtp; 550 nope")
    envelope = make_envelope(forward_paths=("jörg+x=y@bücher.example",), smtputf8=True)
    data = build([status], envelope=envelope)
    assert_well_formed(data)
    assert data.isascii()  # the report itself needs no SMTPUTF8
    human, blocks, _ = report_parts(parse(data))
    final = blocks[1]["Final-Recipient"]
    kind, _, value = final.partition("; ")
    assert kind == "utf-8"
    assert value == "j\\x{F6}rg\\x{2B}x\\x{3D}y@b\\x{FC}cher.example"
    assert decode_xtext(value) == "jörg+x=y@bücher.example"
    assert "<jörg+x=y@bücher.example>" in human.get_content()
    assert human.get_content_charset() == "utf-8"


def test_utf8_reverse_path_is_the_to_header() -> None:
    envelope = make_envelope(reverse_path="jörg@bücher.example", smtputf8=True)
    data = build([FAILED], envelope=envelope)
    assert_well_formed(data)
    # RFC 6532: the header holds UTF-8 as is (the report must then travel with SMTPUTF8).
    assert "\r\nTo: <jörg@bücher.example>\r\n".encode() in data
    # email.message_from_bytes reads 8-bit headers as surrogates; parse the text instead.
    message = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    assert message["To"].addresses[0].addr_spec == "jörg@bücher.example"
    assert data.replace("jörg@bücher.example".encode(), b"").isascii()


def test_quoted_local_parts_keep_their_spaces() -> None:
    sender = '"alice  smith"@example.net'
    recipient = '"' + "a  b " * 20 + '"@example.test'  # long: its field must be folded
    envelope = make_envelope(reverse_path=sender, forward_paths=(recipient,))
    status = RecipientStatus(recipient, "failed", "5.1.1", "smtp; 550 no")
    data = build([status], envelope=envelope)
    assert_well_formed(data)
    message = parse(data)
    assert message["To"].addresses[0].addr_spec == sender
    human, blocks, _ = report_parts(message)
    assert blocks[1]["Final-Recipient"] == f"rfc822; {recipient}"
    assert f"<{recipient}>" in human.get_content()


def test_utf8_original_headers_are_encoded() -> None:
    headers = HEADERS + "Subject: Grüße aus Köln\r\n".encode() + BODY
    data = build([FAILED], headers=headers)
    assert_well_formed(data)
    assert data.isascii()
    _, _, original = report_parts(parse(data))
    assert original["Content-Transfer-Encoding"] == "quoted-printable"
    assert original.get_content_charset() == "utf-8"
    assert original.get_payload(decode=True) == headers[: headers.index(b"\r\n\r\n") + 2]
    assert "Grüße aus Köln" in original.get_content()


def test_raw_8bit_original_headers_keep_their_bytes() -> None:
    # Not UTF-8 (a legacy Latin-1 header): the bytes survive, without a false charset label.
    headers = b"Subject: Gr\xfc\xdfe\r\nX-Bad: nul\x00 and bare\rCR\r\n\r\nbody"
    data = build([FAILED], headers=headers)
    assert_well_formed(data)
    assert data.isascii()
    _, _, original = report_parts(parse(data))
    assert original.get_content_charset() is None
    assert original.get_payload(decode=True) == headers[: headers.index(b"\r\n\r\n") + 2]


def test_lf_only_headers_become_crlf() -> None:
    data = build([FAILED], headers=b"Subject: a\nFrom: b@c\n\nbody\n")
    assert_well_formed(data)
    _, _, original = report_parts(parse(data))
    assert original.get_payload(decode=True) == b"Subject: a\r\nFrom: b@c\r\n"


def test_header_block_is_bounded() -> None:
    line = b"X-Filler: " + b"y" * 90 + b"\r\n"
    headers = line * (2 * dsn.MAX_HEADER_BYTES // len(line))
    data = build([FAILED], headers=headers)
    _, _, original = report_parts(parse(data))
    kept = original.get_payload(decode=True)
    assert isinstance(kept, bytes)
    assert 0 < len(kept) <= dsn.MAX_HEADER_BYTES
    assert kept == line * (len(kept) // len(line))  # whole lines only


def test_no_headers_at_all() -> None:
    data = build([FAILED], headers=b"\r\nbody only\r\n")
    assert_well_formed(data)
    _, _, original = report_parts(parse(data))
    assert original.get_content() == ""


# --- what others control cannot break the report ----------------------------------------------


def test_diagnostic_cannot_inject_fields() -> None:
    status = RecipientStatus(
        "bob@example.test",
        "failed",
        "5.0.0",
        "smtp; 550 bad\r\nX-Injected: 1\r\n\r\nFinal-Recipient: rfc822; evil@example",
        remote_mta="mx.example.org\r\nX-Injected: 2",
    )
    data = build([status])
    assert_well_formed(data)
    _, blocks, _ = report_parts(parse(data))
    assert len(blocks) == 2
    assert blocks[1]["X-Injected"] is None
    assert blocks[1].get_all("Final-Recipient") == ["rfc822; bob@example.test"]
    assert "\r" not in blocks[1]["Diagnostic-Code"]
    assert b"\r\nX-Injected" not in data


def test_long_diagnostic_is_folded_and_bounded() -> None:
    text = " ".join(f"word{i}" for i in range(1000))
    status = RecipientStatus("bob@example.test", "failed", "5.0.0", f"smtp; 550 {text}")
    data = build([status])
    assert_well_formed(data)
    _, blocks, _ = report_parts(parse(data))
    value = blocks[1]["Diagnostic-Code"]
    assert value.startswith("smtp; 550 word0 word1 word2")
    assert value.endswith("...")
    assert len("Diagnostic-Code: " + value) <= 998


def test_non_ascii_diagnostic_stays_7bit() -> None:
    status = RecipientStatus("bob@example.test", "failed", "5.0.0", "smtp; 550 Postfach voll ö")
    data = build([status])
    assert data.isascii()
    human, blocks, _ = report_parts(parse(data))
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 Postfach voll \\x{F6}"
    assert "Postfach voll ö" in human.get_content()


def test_diagnostic_without_a_type_or_empty() -> None:
    untyped = RecipientStatus("a@example.test", "failed", "5.1.1", "mailbox removed")
    empty = RecipientStatus("b@example.test", "failed", "5.1.1", "")
    _, blocks, _ = report_parts(parse(build([untyped, empty])))
    assert blocks[1]["Diagnostic-Code"] == "x-katerchen; mailbox removed"
    assert blocks[2]["Diagnostic-Code"] is None


def test_boundary_never_occurs_in_a_part() -> None:
    first = build([FAILED])
    boundary = parse(first).get_boundary()
    assert boundary is not None
    trap = HEADERS + f"X-Trap: --{boundary}\r\n".encode() + BODY
    data = build([FAILED], headers=trap)
    message = parse(data)
    assert message.get_boundary() != boundary
    _, _, original = report_parts(message)
    assert f"X-Trap: --{boundary}" in original.get_content()


# --- determinism, the clock, refusals ---------------------------------------------------------


def test_same_input_same_report() -> None:
    assert build([FAILED, DELAYED]) == build([FAILED, DELAYED])
    later = build_report(
        envelope=make_envelope(),
        statuses=[FAILED],
        headers=HEADERS,
        reporting_mta=MTA,
        now=NOW + datetime.timedelta(seconds=1),
    )
    assert parse(later)["Message-ID"] != parse(build([FAILED]))["Message-ID"]


def test_clock_is_read_only_without_now() -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    data = build_report(
        envelope=make_envelope(), statuses=[FAILED], headers=HEADERS, reporting_mta=MTA
    )
    after = datetime.datetime.now(datetime.UTC)
    assert before <= parse(data)["Date"].datetime <= after


def test_address_literal_reporting_mta() -> None:
    data = build_report(
        envelope=make_envelope(), statuses=[FAILED], headers=HEADERS, reporting_mta="[192.0.2.1]"
    )
    message = parse(data)
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@[192.0.2.1]"
    _, blocks, _ = report_parts(message)
    assert blocks[0]["Reporting-MTA"] == "dns; [192.0.2.1]"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"statuses": []},
        {"envelope": make_envelope(reverse_path="")},
        {"now": datetime.datetime(2024, 5, 2, 8, 30)},  # naive
        {"reporting_mta": "bad host"},
        {"reporting_mta": ""},
        {"reporting_mta": "mx.example.test\r\nX-Injected: 1"},
    ],
)
def test_build_report_refuses(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {
        "envelope": make_envelope(),
        "statuses": [FAILED],
        "headers": HEADERS,
        "reporting_mta": MTA,
        "now": NOW,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError):
        build_report(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("action", "status"),
    [("delivered", "2.0.0"), ("FAILED", "5.1.1"), ("failed", "5.1"), ("failed", "6.1.1")],
)
def test_recipient_status_refuses(action: str, status: str) -> None:
    with pytest.raises(ValueError):
        RecipientStatus("bob@example.test", action, status, "")


# --- should_bounce ----------------------------------------------------------------------------


def test_never_bounce_the_null_reverse_path() -> None:
    assert should_bounce(make_envelope(reverse_path="")) is False


def test_bounce_any_other_reverse_path() -> None:
    assert should_bounce(make_envelope()) is True
    assert should_bounce(make_envelope(reverse_path="jörg@bücher.example", smtputf8=True))
