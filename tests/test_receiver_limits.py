"""Timeouts, connection limits, free space and real spool faults, through real sockets."""

from __future__ import annotations

import contextlib
import shutil
import socket
from pathlib import Path

import pytest
import trio

from tests.conftest import (
    TIMEOUT,
    MakeConfig,
    RawClient,
    Server,
    StartServer,
    log_lines,
    wait_until,
)
from tests.test_receiver import send_one

TRANSACTION = """
    c: EHLO client.test
    c: MAIL FROM:<a@client.test>
    c: RCPT TO:<alice@example.test>
    c: DATA
    s: 220
    s: 250
    s: 250 2.1.0
    s: 250 2.1.5
    s: 354
"""


async def connect_and_open_data(server: Server) -> RawClient:
    client = await server.connect()
    await client.dialog(TRANSACTION)
    return client


# --- timeouts ---------------------------------------------------------------------------------


async def test_command_timeout(start_server: StartServer, make_config: MakeConfig) -> None:
    server = await start_server(make_config(limits={"command_timeout": 0.2}))
    client = await server.connect()
    await client.dialog("""
        s: 220
        c: EHLO client.test
        s: 250
        s: 421 4.4.2 mx.example.test
        closed
    """)


async def test_command_deadline_is_not_renewed_by_a_trickle(
    start_server: StartServer, make_config: MakeConfig
) -> None:
    server = await start_server(make_config(limits={"command_timeout": 0.5}))
    client = await server.connect()
    await client.expect("220")
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        # A slowloris: one byte of a never-ending line every 50 ms (pacing, not waiting).
        for byte in b"NOOP " + b"x" * 200:
            await client.send(bytes([byte]))
            sent += 1
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        await client.expect("421 4.4.2")
        nursery.cancel_scope.cancel()
    assert sent < 60  # cut off after about 10 bytes, not renewed per read


async def test_data_timeout(start_server: StartServer, make_config: MakeConfig) -> None:
    server = await start_server(make_config(limits={"data_timeout": 0.3}))
    client = await connect_and_open_data(server)
    await client.send("Subject: slow\r\n\r\nand then nothing")
    await client.dialog("""
        s: 421 4.4.2
        closed
    """)
    assert server.received() == []
    assert server.incoming() == []


async def test_data_deadline_covers_the_whole_transfer(
    start_server: StartServer, make_config: MakeConfig
) -> None:
    # The command timeout is long; only the one DATA deadline can end this.
    server = await start_server(make_config(limits={"data_timeout": 0.5}))
    client = await connect_and_open_data(server)

    async def trickle() -> None:
        for _ in range(200):
            await client.send(b"line\r\n")
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        await client.expect("421 4.4.2")
        nursery.cancel_scope.cancel()
    assert server.received() == []


async def test_bdat_timeout_between_chunks(
    start_server: StartServer, make_config: MakeConfig
) -> None:
    server = await start_server(make_config(limits={"data_timeout": 0.3}))
    client = await server.connect()
    await client.dialog("""
        s: 220
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: BDAT 4
        c: ab
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 250 2.0.0
        s: 421 4.4.2
        closed
    """)
    assert server.received() == []
    assert server.incoming() == []


async def test_bdat_timeout_inside_a_chunk(
    start_server: StartServer, make_config: MakeConfig
) -> None:
    server = await start_server(make_config(limits={"data_timeout": 0.3}))
    client = await server.connect()
    await client.dialog("""
        s: 220
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: BDAT 300 LAST
        c: only a few bytes of 300
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 421 4.4.2
        closed
    """)
    assert server.received() == []


async def test_a_stalled_client_does_not_delay_others(server: Server) -> None:
    stalled_in_command = await server.connect()
    await stalled_in_command.dialog("""
        s: 220
        c: EHLO client.test
        s: 250
    """)
    await stalled_in_command.send("MAIL FROM:<half")  # and nothing more
    stalled_in_data = await connect_and_open_data(server)
    await stalled_in_data.send(b"Subject: stalled\r\n\r\n" + b"s" * 300_000)
    for _ in range(3):
        fast = await server.connect()
        await fast.expect("220")
        await fast.command("EHLO fast.client.test")
        await send_one(fast)
        await fast.aclose()
    assert len(server.received()) == 3


# --- connection limits ------------------------------------------------------------------------


async def test_connection_limit_per_ip(start_server: StartServer, make_config: MakeConfig) -> None:
    server = await start_server(make_config(limits={"max_connections_per_ip": 1}))
    first = await server.connect()
    await first.expect("220")
    second = await server.connect()
    await second.dialog("""
        s: 421 4.7.0 mx.example.test
        closed
    """)
    await first.dialog("""
        c: QUIT
        s: 221
        closed
    """)
    third = await server.connect()  # the first one's slot is free again
    await third.expect("220")
    await third.command("EHLO client.test")
    await send_one(third)


async def test_connection_limit_total(start_server: StartServer, make_config: MakeConfig) -> None:
    server = await start_server(make_config(limits={"max_connections": 2}))
    clients = [await server.connect() for _ in range(2)]
    for client in clients:
        await client.expect("220")
    refused = await server.connect()
    await refused.dialog("""
        s: 421 4.7.0
        closed
    """)
    await clients[0].dialog("""
        c: QUIT
        s: 221
        closed
    """)
    again = await server.connect()
    await again.expect("220")


# --- spool space and spool faults -------------------------------------------------------------


async def test_free_space_below_one_and_a_half_max_size(
    start_server: StartServer, make_config: MakeConfig
) -> None:
    free = shutil.disk_usage(make_config().directories.domains).free
    # The test's disk cannot hold 1.5 x this size limit.
    server = await start_server(make_config(limits={"max_message_size": free}))
    client = await server.connect()
    await client.dialog("""
        s: 220
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test>
        s: 452 4.3.1
        c: RCPT TO:<alice@example.test>
        s: 503 5.5.1
    """)
    assert server.received() == []


def make_unwritable(directory: Path) -> None:
    """Replace a spool directory with a regular file: every write into it fails (ENOTDIR),
    even for root."""
    directory.rmdir()
    directory.write_bytes(b"not a directory\n")


def restore(directory: Path) -> None:
    directory.unlink()
    directory.mkdir()


async def test_commit_failure_answers_451_and_leaves_nothing(
    server: Server, client: RawClient
) -> None:
    received = server.config.directories.received
    make_unwritable(received)
    await client.command("EHLO client.test")
    for _ in range(2):
        await client.dialog("""
            c: MAIL FROM:<a@client.test>
            c: RCPT TO:<alice@example.test>
            c: DATA
            s: 250 2.1.0
            s: 250 2.1.5
            s: 354
            c: Subject: doomed
            c:
            c: never acknowledged
            c: .
            s: 451 4.3.0
        """)
    assert received.read_bytes() == b"not a directory\n"
    assert server.incoming() == []
    restore(received)
    queue_id = await send_one(client)  # the session and the spool recover
    assert [p.name for p in server.received()] == [queue_id]


async def test_write_failure_of_a_large_message_answers_451(
    server: Server, client: RawClient
) -> None:
    incoming = server.config.directories.incoming
    make_unwritable(incoming)
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
    # Over the spool's in-memory threshold, so the write happens while data still arrives.
    await client.send(b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 600 + b".\r\n")
    await client.expect("451 4.3.0")
    restore(incoming)
    assert server.received() == []
    assert server.incoming() == []
    await send_one(client)
    assert len(server.received()) == 1


async def test_write_failure_during_bdat_answers_the_chunk(
    server: Server, client: RawClient
) -> None:
    incoming = server.config.directories.incoming
    make_unwritable(incoming)
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
    """)
    chunk = b"c" * 300_000
    await client.send(b"BDAT %d\r\n" % len(chunk) + chunk)
    await client.expect("451 4.3.0")
    await client.send(b"BDAT 3 LAST\r\nabc")
    await client.expect("503 5.5.1")  # the failed chunk ended the transaction
    restore(incoming)
    assert server.received() == server.incoming() == []


async def test_a_client_that_does_not_read_is_dropped(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    server = await start_server(make_config(limits={"command_timeout": 0.3}))
    sock = trio.socket.socket()
    # A small receive window, so that unread replies back up into the server quickly.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((server.host, server.port))
    stream = trio.SocketStream(sock)

    async def flood() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(100):
                await stream.send_all(b"NOOP\r\n" * 10_000)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await wait_until(lambda: log_lines(mail_log, "timeout"))
            nursery.cancel_scope.cancel()
    (line,) = log_lines(mail_log, "timeout")
    assert "stage=write" in line
    await stream.aclose()
