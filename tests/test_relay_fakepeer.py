"""The scripted fake peer of the relay tests, checked on its own with smtplib and raw sockets, so
that a relay test failing says something about the relay, not about its fake."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio
import trustme

from tests.conftest import TIMEOUT, RawClient, in_thread
from tests.fakepeer import FakePeer, Script

StartPeer = Callable[..., Awaitable[FakePeer]]


async def connect(peer: FakePeer) -> RawClient:
    with trio.fail_after(TIMEOUT):
        return RawClient(await trio.open_tcp_stream("127.0.0.1", peer.port))


async def test_plain_session_records_the_envelope_and_the_unstuffed_message(
    start_fake_peer: StartPeer,
) -> None:
    peer = await start_fake_peer()
    client = await connect(peer)
    await client.dialog("""
        s: 220 fake.test
        c: EHLO relay.test
        s: 250 fake.test
        c: MAIL FROM:<a@x.test> BODY=8BITMIME SIZE=30
        c: RCPT TO:<b@y.test>
        c: RCPT TO:<c@y.test>
        c: DATA
        s: 250 2.1.0
        s: 250 2.1.5
        s: 250 2.1.5
        s: 354
        c: Subject: s
        c:
        c: ..dot
        c: .
        s: 250 2.0.0
        c: QUIT
        s: 221
        closed
    """)
    (transaction,) = peer.accepted
    assert transaction.mail_from == "a@x.test"
    assert transaction.parameters == {"BODY": "8BITMIME", "SIZE": "30"}
    assert transaction.recipients == ["b@y.test", "c@y.test"]
    assert transaction.via == "DATA"
    assert transaction.data == b"Subject: s\r\n\r\n.dot\r\n"
    assert bytes(transaction.raw) == b"Subject: s\r\n\r\n..dot\r\n"
    (session,) = peer.sessions
    assert session.helo == "relay.test"
    assert session.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    await peer.wait_for(lambda: session.closed)


async def test_scripts_per_connection_and_per_recipient(start_fake_peer: StartPeer) -> None:
    peer = await start_fake_peer(
        Script(replies={"MESSAGE": "451 4.3.0 try later"}, rcpt={"no@y.test": "550 5.1.1 no"}),
        Script(extensions=("CHUNKING", "8BITMIME")),
    )

    def session(n: int) -> tuple[dict[str, tuple[int, bytes]], str]:
        with smtplib.SMTP("127.0.0.1", peer.port, timeout=TIMEOUT) as smtp:
            try:
                refused = smtp.sendmail("a@x.test", ["b@y.test", "no@y.test"], b"S: %d\r\n" % n)
                return refused, "ok"
            except smtplib.SMTPDataError as exc:
                return {}, str(exc.smtp_code)

    refused, outcome = await in_thread(session, 1)
    assert outcome == "451"
    refused, outcome = await in_thread(session, 2)
    assert outcome == "ok" and refused == {}
    assert [t.reply[:3] for t in peer.transactions] == ["451", "250"]
    assert peer.transactions[0].refused == [("no@y.test", "550 5.1.1 no")]
    assert peer.delivered_to() == ["b@y.test", "no@y.test"]
    assert "PIPELINING" not in peer.sessions[1].script.extensions


async def test_bdat_and_limits(start_fake_peer: StartPeer) -> None:
    peer = await start_fake_peer(Script(extensions=("CHUNKING", "SIZE 10")))
    client = await connect(peer)
    await client.dialog("""
        s: 220
        c: EHLO relay.test
        s: 250
        c: MAIL FROM:<a@x.test> BODY=8BITMIME
        s: 555 5.5.4
        c: MAIL FROM:<a@x.test> SIZE=11
        s: 552 5.3.4
        c: MAIL FROM:<a@x.test> SIZE=10
        s: 250
        c: RCPT TO:<b@y.test>
        s: 250
    """)
    await client.send(b"BDAT 4\r\n.\r\nxBDAT 3 LAST\r\nabc")
    await client.expect("250 2.0.0")
    await client.expect("250 2.0.0")
    (transaction,) = peer.accepted
    assert transaction.via == "BDAT" and transaction.chunks == [4, 3]
    assert transaction.data == b".\r\nxabc"
    await client.dialog("""
        c: MAIL FROM:<a@x.test>
        s: 250
        c: RCPT TO:<b@y.test>
        s: 250
        c: BDAT 11 LAST
    """)
    await client.send(b"x" * 11)
    await client.expect("552 5.3.4")
    await client.aclose()


@pytest.mark.parametrize("hang_after", ["GREETING", "RCPT", "MESSAGE"])
async def test_hang_never_answers(start_fake_peer: StartPeer, hang_after: str) -> None:
    peer = await start_fake_peer(Script(hang_after=hang_after))
    client = await connect(peer)
    script = ["s: 220", "c: EHLO r.test", "s: 250", "c: MAIL FROM:<a@x.test>", "s: 250"]
    script += ["c: RCPT TO:<b@y.test>", "s: 250", "c: DATA", "s: 354", "c: hi", "c: ."]
    cut = {"GREETING": 0, "RCPT": 6, "MESSAGE": 11}[hang_after]
    await client.dialog("\n".join(script[:cut]))
    await peer.wait_for(lambda: peer.sessions[0].hung)
    with trio.move_on_after(0.05) as nothing:
        await client.read_reply()
    assert nothing.cancelled_caught
    await client.aclose()
    await peer.wait_for(lambda: peer.sessions[0].closed)
    assert peer.accepted == []


async def test_drop_in_the_middle_of_data(start_fake_peer: StartPeer) -> None:
    peer = await start_fake_peer(Script(drop_after=100))
    client = await connect(peer)
    await client.dialog("""
        s: 220
        c: EHLO r.test
        c: MAIL FROM:<a@x.test>
        c: RCPT TO:<b@y.test>
        c: DATA
        s: 250
        s: 250
        s: 250
        s: 354
    """)
    await client.send(b"x" * 60 + b"\r\n")
    await client.send(b"y" * 60 + b"\r\n")
    await client.expect_closed()
    (session,) = peer.sessions
    assert session.dropped
    (transaction,) = session.transactions
    assert transaction.data is None and len(transaction.raw) >= 100


async def test_starttls_and_auth(start_fake_peer: StartPeer) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("fake.test", "127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    peer = await start_fake_peer(Script(auth={"u@x.test": "pw"}), ssl_context=server_context)

    def session() -> tuple[list[str], list[str]]:
        with smtplib.SMTP("127.0.0.1", peer.port, timeout=TIMEOUT) as smtp:
            smtp.ehlo("relay.test")
            before = sorted(smtp.esmtp_features)
            smtp.starttls(context=client_context)
            smtp.ehlo("relay.test")
            after = sorted(smtp.esmtp_features)
            smtp.login("u@x.test", "pw")
            smtp.sendmail("u@x.test", ["b@y.test"], b"Subject: t\r\n\r\n")
            return before, after

    before, after = await in_thread(session)
    assert "starttls" in before and "auth" not in before
    assert "starttls" not in after and "auth" in after
    (record,) = peer.sessions
    assert record.tls and record.auth is not None and record.auth[1:] == ("u@x.test", "pw")
    assert peer.accepted[0].recipients == ["b@y.test"]
