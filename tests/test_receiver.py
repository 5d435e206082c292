"""The receiver through real sockets, byte-exact: dialogs as transcripts, and what lands on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import (
    HOSTNAME,
    MakeConfig,
    RawClient,
    Server,
    StartServer,
    log_lines,
    wait_until,
)

MESSAGE = "Subject: test\r\nMessage-ID: <1@client.test>\r\n\r\nHello.\r\n"


def queue_id_of(reply: object) -> str:
    text = str(reply)
    assert text.startswith("250 2.0.0 Ok: queued as "), text
    return text.rsplit(" ", 1)[1]


async def send_one(client: RawClient, *, rcpt: str = "alice@example.test") -> str:
    """A whole transaction through DATA; returns the queue id."""
    replies = await client.dialog(f"""
        c: MAIL FROM:<sender@client.test>
        s: 250 2.1.0
        c: RCPT TO:<{rcpt}>
        s: 250 2.1.5
        c: DATA
        s: 354
    """)
    assert len(replies) == 3
    await client.send(MESSAGE + ".\r\n")
    return queue_id_of(await client.read_reply())


# --- greeting, EHLO, the command set ----------------------------------------------------------


async def test_ehlo_advertises_every_extension(client: RawClient) -> None:
    reply = await client.command("EHLO client.test")
    assert reply.code == 250
    assert reply.lines[0].startswith(HOSTNAME)
    keywords = {line.split(" ")[0].upper(): line for line in reply.lines[1:]}
    assert keywords["SIZE"] == "SIZE 1000000"
    for extension in [
        "8BITMIME",
        "PIPELINING",
        "CHUNKING",
        "BINARYMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
    ]:
        assert extension in keywords, reply.lines


async def test_ehlo_address_literal(client: RawClient) -> None:
    await client.dialog("""
        c: EHLO [127.0.0.1]
        s: 250 mx.example.test
        c: HELO [IPv6:::1]
        s: 250 mx.example.test
    """)


async def test_simple_commands(client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        s: 250
        c: NOOP
        s: 250 2.0.0
        c: noop
        s: 250 2.0.0
        c: RSET
        s: 250 2.0.0
        c: VRFY alice
        s: 252 2.
        c: HELP
        s: 214 2.0.0
    """)
    await client.dialog("""
        c: EXPN staff
        s: 502 5.5.1
        c: QUIT
        s: 221 2.0.0
        closed
    """)


async def test_mail_before_helo_is_out_of_sequence(client: RawClient) -> None:
    await client.dialog("""
        c: MAIL FROM:<a@client.test>
        s: 503 5.5.1
        c: RCPT TO:<alice@example.test>
        s: 503 5.5.1
        c: DATA
        s: 503 5.5.1
        c: HELO client.test
        s: 250
        c: DATA
        s: 503 5.5.1
    """)


async def test_transaction_stores_envelope_received_header_and_exact_bytes(
    server: Server, client: RawClient
) -> None:
    await client.command("EHLO client.test")
    content = (
        "Subject: exact\r\n\r\n..a line that started with a dot\r\ntrailing spaces   \r\n\r\n\r\n"
    )
    await client.dialog("""
        c: MAIL FROM:<Sender@Client.Test> BODY=8BITMIME
        s: 250 2.1.0
        c: RCPT TO:<Alice@Example.Test>
        s: 250 2.1.5
        c: DATA
        s: 354
    """)
    await client.send(content + ".\r\n")
    queue_id = queue_id_of(await client.read_reply())
    assert [p.name for p in server.received()] == [queue_id]
    assert server.incoming() == []
    stored = server.message(queue_id)
    envelope = stored.envelope
    assert envelope.queue_id == queue_id
    assert envelope.client == "127.0.0.1"
    assert envelope.helo == "client.test"
    assert envelope.reverse_path == "Sender@Client.Test"
    assert envelope.forward_paths == ("Alice@Example.Test",)
    assert envelope.body == "8BITMIME"
    assert envelope.smtputf8 is False
    received = stored.received.decode()
    assert received.startswith("Received: from client.test ([127.0.0.1])")
    assert f"by {HOSTNAME} (katerchen) with ESMTP id {queue_id}" in received
    assert "for <Alice@Example.Test>" in received
    # Dot-unstuffed, otherwise byte for byte.
    assert stored.content == content.replace("\r\n..a", "\r\n.a").encode()


async def test_helo_session_says_smtp(server: Server, client: RawClient) -> None:
    await client.command("HELO old.client.test")
    queue_id = await send_one(client)
    stored = server.message(queue_id)
    assert b" with SMTP id " in stored.received
    assert stored.envelope.helo == "old.client.test"


async def test_smtputf8_session_says_utf8smtp(server: Server, client: RawClient) -> None:
    await client.command("EHLO client.test")
    await client.dialog("""
        c: MAIL FROM:<jörg@bücher.test> SMTPUTF8
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
    """)
    await client.send("Subject: Grüße\r\n\r\nÄpfel\r\n.\r\n")
    queue_id = queue_id_of(await client.read_reply())
    stored = server.message(queue_id)
    assert b" with UTF8SMTP id " in stored.received
    assert stored.envelope.smtputf8 is True
    assert stored.envelope.reverse_path == "jörg@bücher.test"
    assert stored.content == "Subject: Grüße\r\n\r\nÄpfel\r\n".encode()


async def test_null_reverse_path(server: Server, client: RawClient) -> None:
    await client.command("EHLO client.test")
    await client.dialog("""
        c: MAIL FROM:<>
        s: 250 2.1.0
        c: RCPT TO:<bob@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: Subject: bounce
        c:
        c: .
        s: 250 2.0.0 Ok: queued as
    """)
    (stored,) = server.messages()
    assert stored.envelope.reverse_path == ""
    assert stored.envelope.forward_paths == ("bob@example.test",)


async def test_rset_and_ehlo_abandon_the_transaction(server: Server, client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: RSET
        s: 250 2.0.0
        c: DATA
        s: 503 5.5.1
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: EHLO client.test
        s: 250
        c: DATA
        s: 503 5.5.1
    """)
    assert server.received() == []


async def test_several_transactions_in_one_session(server: Server, client: RawClient) -> None:
    await client.command("EHLO client.test")
    ids = [await send_one(client) for _ in range(3)]
    assert len(set(ids)) == 3
    assert [p.name for p in server.received()] == sorted(ids)
    assert ids == sorted(ids)  # queue ids sort by arrival


async def test_protocol_errors_through_the_socket(client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test> FROBNICATE=1
        s: 555 5.5.4
        c: MAIL FROM:<a@client.test> BODY=9BIT
        s: 501 5.5.4
        c: MAIL FROM:<not an address>
        s: 501 5.1.7
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0
        c: RCPT TO:<alice@@example.test>
        s: 501 5.1.3
        c: RCPT TO:<jörg@example.test>
        s: 553 5.6.7
    """)
    await client.send(b"NOOP \x00\r\n")
    await client.expect("501 5.5.2")
    await client.send(b"NOOP \xff\xfe\r\n")
    await client.expect("501 5.5.2")
    await client.dialog("""
        c: NOOP
        s: 250 2.0.0
    """)


async def test_long_command_line(client: RawClient) -> None:
    # The line's end and the next command arrive in the same read as the start of the line.
    await client.send("NOOP " + "x" * 600 + "\r\nNOOP\r\n")
    await client.expect("500 5.5.6")
    await client.expect("250 2.0.0")


# --- PIPELINING -------------------------------------------------------------------------------


async def test_pipelining_one_write_replies_in_order(server: Server, client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: RCPT TO:<nobody@example.test>
        c: RCPT TO:<someone@elsewhere.example>
        c: RCPT TO:<bob@example.test>
        c: DATA
        s: 250 2.1.0
        s: 250 2.1.5
        s: 550 5.1.1
        s: 550 5.7.1
        s: 250 2.1.5
        s: 354
        c: Subject: pipelined
        c:
        c: body
        c: .
        c: MAIL FROM:<b@client.test>
        c: RCPT TO:<bob@example.test>
        c: DATA
        s: 250 2.0.0 Ok: queued as
        s: 250 2.1.0
        s: 250 2.1.5
        s: 354
        c: Subject: second
        c:
        c: .
        c: QUIT
        s: 250 2.0.0 Ok: queued as
        s: 221 2.0.0
        closed
    """)
    first, second = server.messages()
    assert first.envelope.forward_paths == ("alice@example.test", "bob@example.test")
    assert first.content == b"Subject: pipelined\r\n\r\nbody\r\n"
    assert second.envelope.reverse_path == "b@client.test"
    assert second.content == b"Subject: second\r\n\r\n"


async def test_whole_session_in_one_write(server: Server) -> None:
    client = await server.connect()
    await client.send(
        "EHLO client.test\r\n"
        "MAIL FROM:<a@client.test>\r\n"
        "RCPT TO:<alice@example.test>\r\n"
        "DATA\r\n"
        "Subject: all at once\r\n\r\nhi\r\n.\r\n"
        "QUIT\r\n"
    )
    await client.dialog("""
        s: 220
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 354
        s: 250 2.0.0 Ok: queued as
        s: 221 2.0.0
        closed
    """)
    (stored,) = server.messages()
    assert stored.content == b"Subject: all at once\r\n\r\nhi\r\n"


# --- BDAT (CHUNKING, BINARYMIME) ----------------------------------------------------------------


async def test_bdat_several_chunks_in_the_same_writes(server: Server, client: RawClient) -> None:
    chunks = [
        b"Subject: chunked\r\n\r\n",
        b".a leading dot stays\r\nbare LF stays\n",
        b"\r\n.\r\nnot an end\r\n",
        b"last\x00bytes\r\n",
    ]
    await client.dialog("""
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test> BODY=BINARYMIME
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.0
        s: 250 2.1.5
    """)
    # Command and chunk bytes in one write; two chunks in one write.
    await client.send(b"BDAT %d\r\n" % len(chunks[0]) + chunks[0])
    await client.expect("250 2.0.0")
    await client.send(
        b"BDAT %d\r\n" % len(chunks[1]) + chunks[1] + b"BDAT %d\r\n" % len(chunks[2]) + chunks[2]
    )
    await client.expect("250 2.0.0")
    await client.expect("250 2.0.0")
    await client.send(b"BDAT %d LAST\r\n" % len(chunks[3]) + chunks[3])
    queue_id = queue_id_of(await client.read_reply())
    stored = server.message(queue_id)
    assert stored.content == b"".join(chunks)  # byte-exact: no unstuffing, no normalizing
    assert stored.envelope.body == "BINARYMIME"


async def test_bdat_zero_last_ends_the_message(server: Server, client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
    """)
    await client.send(b"BDAT 6\r\nSubjecBDAT 5\r\nt: x\r")
    await client.expect("250 2.0.0")
    await client.expect("250 2.0.0")
    await client.send(b"BDAT 0 LAST\r\n")
    queue_id = queue_id_of(await client.read_reply())
    assert server.message(queue_id).content == b"Subject: x\r"


async def test_bdat_empty_message(server: Server, client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: BDAT 0 LAST
        c: QUIT
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 250 2.0.0 Ok: queued as
        s: 221
        closed
    """)
    (stored,) = server.messages()
    assert stored.content == b""


async def test_bdat_then_rset_discards(server: Server, client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: BDAT 5
        c: abc
        c: RSET
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 250 2.0.0
        s: 250 2.0.0
    """)
    await send_one(client)
    assert len(server.received()) == 1
    assert server.incoming() == []


# --- SMTP smuggling ---------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n"])
async def test_smuggling_sequences_stay_inside_the_one_message(
    server: Server, client: RawClient, ending: str
) -> None:
    smuggled = (
        "Subject: outer\r\n\r\nhello" + ending + "MAIL FROM:<ceo@example.test>\r\n"
        "RCPT TO:<bob@example.test>\r\n"
        "DATA\r\n"
        "Subject: smuggled\r\n\r\nsmuggled text\r\n"
    )
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: DATA
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 354
    """)
    await client.send(smuggled + ".\r\nQUIT\r\n")
    await client.dialog("""
        s: 250 2.0.0 Ok: queued as
        s: 221 2.0.0
        closed
    """)
    (stored,) = server.messages()  # one message, no second transaction
    assert stored.envelope.forward_paths == ("alice@example.test",)
    assert b"MAIL FROM:<ceo@example.test>\r\n" in stored.content
    assert b"smuggled text\r\n" in stored.content
    if "\r." not in ending:
        # Bare LFs were normalized to CRLF (Postfix's smtpd_forbid_bare_newline = normalize).
        assert b"\n" not in stored.content.replace(b"\r\n", b"")


async def test_bare_newline_reject_mode(start_server: StartServer, make_config: MakeConfig) -> None:
    server = await start_server(make_config(limits={"bare_newline": "reject"}))
    client = await server.connect()
    await client.dialog("""
        s: 220
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: DATA
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 354
    """)
    await client.send("Subject: sloppy\r\n\r\nhello\n.\nMAIL FROM:<x@y.test>\r\n.\r\n")
    await client.expect("550 5.6.0")
    assert server.received() == []
    assert server.incoming() == []
    await send_one(client)  # the session is still usable
    assert len(server.received()) == 1


# --- SIZE and recipient limits ----------------------------------------------------------------


async def test_mail_size_over_the_limit(server: Server, client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test> SIZE=1000001
        s: 552 5.3.4
        c: MAIL FROM:<a@client.test> SIZE=1000000
        s: 250 2.1.0
    """)


async def test_data_over_the_limit_is_read_and_discarded(server: Server, client: RawClient) -> None:
    await client.command("EHLO client.test")
    await client.dialog("""
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: DATA
        s: 250 2.1.0
        s: 250 2.1.5
        s: 354
    """)
    line = "x" * 998 + "\r\n"
    big = "Subject: big\r\n\r\n" + line * 1100  # about 1.1 MB, over 1 MB
    await client.send(big + "MAIL FROM:<in@data.test>\r\n.\r\n")
    await client.expect("552 5.3.4")
    assert server.received() == []
    assert server.incoming() == []
    await send_one(client)  # the session is still usable
    assert len(server.received()) == 1


async def test_bdat_over_the_limit_is_read_and_discarded(server: Server, client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
    """)
    chunk = b"y" * 600_000
    await client.send(b"BDAT %d\r\n" % len(chunk) + chunk)
    await client.expect("250")
    await client.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    await client.expect("552 5.3.4")
    assert server.received() == []
    assert server.incoming() == []
    await send_one(client)
    assert len(server.received()) == 1


async def test_recipient_limit(server: Server, client: RawClient) -> None:
    # max_recipients = 5 in the test config; refused recipients do not count.
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<nobody@example.test>
        c: RCPT TO:<alice@example.test>
        c: RCPT TO:<bob@example.test>
        c: RCPT TO:<postmaster@example.test>
        c: RCPT TO:<ALICE@example.test>
        c: RCPT TO:<postmaster>
        c: RCPT TO:<bob@example.test>
        c: DATA
        c: Subject: five
        c:
        c: .
        s: 250
        s: 250 2.1.0
        s: 550 5.1.1
        s: 250 2.1.5
        s: 250 2.1.5
        s: 250 2.1.5
        s: 250 2.1.5
        s: 250 2.1.5
        s: 452 4.5.3
        s: 354
        s: 250 2.0.0 Ok: queued as
    """)
    (stored,) = server.messages()
    assert len(stored.envelope.forward_paths) == 5


# --- routing: local, postmaster, unknown, relay, unsafe ----------------------------------------


async def test_unknown_mailbox(server: Server, client: RawClient) -> None:
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<nobody@example.test>
        c: DATA
        s: 250
        s: 250 2.1.0
        s: 550 5.1.1
        s: 503 5.5.1
    """)
    assert server.received() == []


@pytest.mark.parametrize(
    "path",
    [
        "<postmaster>",
        "<POSTMASTER>",
        "<PostMaster>",
        "<postmaster@example.test>",
        "<PostMaster@EXAMPLE.TEST>",
    ],
)
async def test_postmaster_always_accepted(server: Server, client: RawClient, path: str) -> None:
    assert not (server.config.directories.domains / "example.test" / "postmaster").exists()
    await client.dialog(f"""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:{path}
        c: DATA
        c: Subject: hi
        c:
        c: .
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 354
        s: 250 2.0.0 Ok: queued as
    """)
    (stored,) = server.messages()
    assert stored.envelope.forward_paths == (path[1:-1],)


@pytest.mark.parametrize(
    ("path", "reply"),
    [
        ("<alice%elsewhere.example@example.test>", "550 5.1.1"),
        ('<"alice@elsewhere.example"@example.test>', "550 5.1.1"),
        ("<alice!elsewhere.example@example.test>", "550 5.1.1"),
        ("<@example.test:alice@elsewhere.example>", "550 5.7.1"),
        ("<@example.test,@mx.example.test:alice@elsewhere.example>", "550 5.7.1"),
        ("<alice@elsewhere.example>", "550 5.7.1"),
        ("<postmaster@elsewhere.example>", "550 5.7.1"),
        ("<alice@example.test.elsewhere.example>", "550 5.7.1"),
        ("<alice@[127.0.0.1]>", "550 5.7.1"),
        ("<alice@[IPv6:::1]>", "550 5.7.1"),
    ],
)
async def test_open_relay_tricks_refused(
    server: Server, client: RawClient, path: str, reply: str
) -> None:
    await client.dialog(f"""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:{path}
        c: DATA
        s: 250
        s: 250 2.1.0
        s: {reply}
        s: 503 5.5.1
    """)
    assert server.received() == []
    assert server.incoming() == []


@pytest.mark.parametrize(
    "path",
    [
        '<".."@example.test>',
        '<"."@example.test>',
        '<"a/b"@example.test>',
        '<"../../etc"@example.test>',
        '<".hidden"@example.test>',
        '<"a\\\\b"@example.test>',
    ],
)
async def test_unsafe_local_parts_refused(
    tmp_path: Path, server: Server, client: RawClient, path: str
) -> None:
    # Directories that a naively built path would find: refusing must not depend on them.
    domain = server.config.directories.domains / "example.test"
    (domain / ".hidden").mkdir()
    (domain / "a" / "b").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    await client.dialog(f"""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:{path}
        c: DATA
        s: 250
        s: 250 2.1.0
        s: 550 5.1.3
        s: 503 5.5.1
    """)
    assert server.received() == []


async def test_nul_and_control_characters_in_paths_refused(
    server: Server, client: RawClient
) -> None:
    await client.dialog("""
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0
    """)
    await client.send(b"RCPT TO:<al\x00ice@example.test>\r\n")
    await client.expect("501 5.5.2")
    await client.send(b'RCPT TO:<"al\x01ice"@example.test>\r\n')
    reply = await client.read_reply()
    assert reply.code == 501
    assert server.received() == []


# --- robustness -------------------------------------------------------------------------------


async def test_too_many_errors_closes(client: RawClient) -> None:
    await client.send("XYZZY\r\n" * 12)
    errors = 0
    while True:
        reply = await client.read_reply()
        if reply.code == 421:
            break
        assert reply.code == 500
        errors += 1
    assert reply.enhanced == "4.7.0"
    assert errors == 10  # the 11th command after 10 errors gets the 421
    await client.expect_closed()


@pytest.mark.parametrize(
    "request_line",
    ["GET / HTTP/1.1", "POST /login HTTP/1.1", "CONNECT mx.example.test:443 HTTP/1.1"],
)
async def test_http_verb_gets_502_and_close(client: RawClient, request_line: str) -> None:
    await client.send(f"{request_line}\r\nHost: mx.example.test\r\n\r\n")
    reply = await client.read_reply()
    assert reply.code == 502
    await client.expect_closed()


async def test_client_disconnect_mid_data_leaves_nothing(server: Server) -> None:
    client = await server.connect()
    await client.dialog("""
        s: 220
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: DATA
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 354
    """)
    await client.send(b"Subject: cut\r\n\r\n" + b"z" * 400_000)  # over the flush threshold
    await client.aclose()
    # The server notices EOF and discards; a new session shows it is done with the old one.
    other = await server.connect()
    await other.expect("220")
    await send_one_after_ehlo(other)
    await wait_until(lambda: server.incoming() == [])
    assert len(server.received()) == 1


async def send_one_after_ehlo(client: RawClient) -> str:
    await client.command("EHLO client.test")
    return await send_one(client)


async def test_log_lines(
    server: Server, client: RawClient, mail_log: pytest.LogCaptureFixture
) -> None:
    await client.command("EHLO client.test")
    queue_id = await send_one(client)
    await client.command("RCPT TO:<x@elsewhere.example>")
    await client.dialog("""
        c: QUIT
        s: 221
        closed
    """)
    await wait_until(lambda: log_lines(mail_log, "disconnect"))
    assert any("ip=127.0.0.1" in line for line in log_lines(mail_log, "connect"))
    (queued,) = log_lines(mail_log, "queued")
    assert f"id={queue_id}" in queued
    assert "from=<sender@client.test>" in queued
    assert "nrcpt=1" in queued
    assert f"size={len(MESSAGE)}" in queued
    rejects = log_lines(mail_log, "reject")
    assert any("verb=RCPT" in r and "code=503" in r for r in rejects), rejects
    # Never a body.
    assert not any("Hello." in r.getMessage() for r in mail_log.records)
