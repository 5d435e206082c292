"""app.run: start-up (listeners, spool preparation, the "listening" line) and the shutdown
sequence (idle sessions 421 at once, busy ones after their transaction, the grace period)."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import trio

from katerchen import app
from tests.conftest import (
    TIMEOUT,
    MakeConfig,
    RawClient,
    Server,
    StartServer,
    log_lines,
    wait_until,
)
from tests.test_receiver import queue_id_of, send_one


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- start-up ---------------------------------------------------------------------------------


async def test_listening_line_and_bound_addresses(
    server: Server, mail_log: pytest.LogCaptureFixture
) -> None:
    ((host, port),) = server.running.addresses
    assert host == "127.0.0.1" and port != 0
    (line,) = log_lines(mail_log, "listening")
    assert f"addresses=127.0.0.1:{port}" in line
    client = await server.connect()
    await client.expect("220 mx.example.test ESMTP")


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
async def test_several_listeners(start_server: StartServer, make_config: MakeConfig) -> None:
    server = await start_server(make_config(server={"listen": ["127.0.0.1:0", "[::1]:0"]}))
    addresses = server.running.addresses
    assert [host for host, _ in addresses] == ["127.0.0.1", "::1"]
    for host, port in addresses:
        stream = await trio.open_tcp_stream(host, port)
        client = RawClient(stream)
        await client.expect("220")
        await client.command("EHLO client.test")
        queue_id = await send_one(client)
        assert server.message(queue_id).envelope.client == host
        await client.aclose()


async def test_spool_directories_are_created(server: Server) -> None:
    directories = server.config.directories
    for directory in (directories.incoming, directories.received, directories.relay):
        assert directory.is_dir()


async def test_leftovers_in_incoming_are_removed_at_start(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    config.directories.incoming.mkdir(parents=True)
    for name in ("0001", "0002"):
        (config.directories.incoming / name).write_bytes(b"never acknowledged")
    server = await start_server(config)
    assert server.incoming() == []
    (line,) = log_lines(mail_log, "spool-cleanup")
    assert "removed=2" in line and "ids=0001,0002" in line


async def test_address_in_use_fails_the_start(
    server: Server, start_server: StartServer, make_config: MakeConfig
) -> None:
    config = make_config(server={"listen": [f"127.0.0.1:{server.port}"]})
    with pytest.raises(OSError):
        await start_server(config)


# --- shutdown ---------------------------------------------------------------------------------


async def test_shutdown_idle_sessions_get_421_and_run_returns(server: Server) -> None:
    greeted = await server.connect()
    await greeted.expect("220")
    after_ehlo = await server.connect()
    await after_ehlo.dialog("""
        s: 220
        c: EHLO client.test
        s: 250
    """)
    half_a_line = await server.connect()
    await half_a_line.expect("220")
    await half_a_line.send("MAIL FRO")
    server.running.shutdown()
    for client in (greeted, after_ehlo, half_a_line):
        await client.dialog("""
            s: 421 4.3.2 mx.example.test
            closed
        """)
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()
    with pytest.raises(OSError):
        await trio.open_tcp_stream(server.host, server.port)  # not accepting any more


async def wait_for_drain(mail_log: pytest.LogCaptureFixture) -> None:
    """The "shutdown" line is logged right before the listeners close and sessions drain."""
    await wait_until(lambda: log_lines(mail_log, "shutdown"))


async def test_shutdown_lets_a_transaction_in_data_finish(
    server: Server, mail_log: pytest.LogCaptureFixture
) -> None:
    busy = await server.connect()
    await busy.dialog("""
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
    await busy.send("Subject: in flight\r\n\r\nfirst half, ")
    idle = await server.connect()
    await idle.expect("220")
    server.running.shutdown()
    await wait_for_drain(mail_log)
    await idle.dialog("""
        s: 421 4.3.2
        closed
    """)
    assert not server.stopped.is_set()
    # Pipelined after the message: the MAIL is not taken, the session is closed instead.
    await busy.send("second half\r\n.\r\nMAIL FROM:<again@client.test>\r\n")
    replies = await busy.dialog("""
        s: 250 2.0.0 Ok: queued as
        s: 421 4.3.2
        closed
    """)
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()
    stored = server.message(queue_id_of(replies[0]))
    assert stored.content == b"Subject: in flight\r\n\r\nfirst half, second half\r\n"


async def test_shutdown_lets_a_transaction_before_data_finish(
    server: Server, mail_log: pytest.LogCaptureFixture
) -> None:
    busy = await server.connect()
    await busy.dialog("""
        s: 220
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        s: 250
        s: 250 2.1.0
    """)
    server.running.shutdown()
    await wait_for_drain(mail_log)
    await busy.dialog("""
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: BDAT 5 LAST
        c: abc
        s: 250 2.0.0 Ok: queued as
        s: 421 4.3.2
        closed
    """)
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()
    (stored,) = server.messages()
    assert stored.content == b"abc\r\n"


async def test_shutdown_rset_ends_the_wait(
    server: Server, mail_log: pytest.LogCaptureFixture
) -> None:
    busy = await server.connect()
    await busy.dialog("""
        s: 220
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        s: 250
        s: 250 2.1.0
    """)
    server.running.shutdown()
    await wait_for_drain(mail_log)
    await busy.dialog("""
        c: RSET
        s: 250 2.0.0
        s: 421 4.3.2
        closed
    """)
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()


async def test_shutdown_grace_expires(start_server: StartServer, make_config: MakeConfig) -> None:
    server = await start_server(make_config(server={"shutdown_grace": 0.2}))
    stalled = await server.connect()
    await stalled.dialog("""
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
    # Over the spool's memory threshold, so a file exists in incoming/ while it waits.
    await stalled.send(b"Subject: never finished\r\n\r\n" + (b"w" * 998 + b"\r\n") * 300)
    await wait_until(lambda: server.incoming() != [])
    server.running.shutdown()
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()
    # Cut off, but told so: 421 4.3.2 (the "answer 421 4.3.2 to the rest").
    await stalled.expect("421 4.3.2")
    await stalled.expect_closed()
    assert server.received() == []
    assert server.incoming() == []  # discarded on cancellation


async def test_shutdown_grace_zero(start_server: StartServer, make_config: MakeConfig) -> None:
    server = await start_server(make_config(server={"shutdown_grace": 0}))
    busy = await server.connect()
    await busy.dialog("""
        s: 220
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        s: 250
        s: 250 2.1.0
    """)
    server.running.shutdown()
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()
    await busy.expect("421 4.3.2")
    await busy.expect_closed()


async def test_shutdown_with_no_connections_is_immediate(server: Server) -> None:
    await server.stop()
    assert server.stopped.is_set()
    server.running.shutdown()  # idempotent


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signals(
    start_server: StartServer,
    make_config: MakeConfig,
    mail_log: pytest.LogCaptureFixture,
    signum: int,
) -> None:
    server = await start_server(make_config(), handle_signals=True)
    idle = await server.connect()
    await idle.expect("220")
    # SIGUSR1 is taken (it will ring the delivery doorbell) and changes nothing else.
    os.kill(os.getpid(), signal.SIGUSR1)
    await wait_until(lambda: log_lines(mail_log, "signal"))
    await idle.command("EHLO client.test")
    await send_one(idle)
    os.kill(os.getpid(), signum)
    await idle.dialog("""
        s: 421 4.3.2
        closed
    """)
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()
    names = [line.split("signal=")[1] for line in log_lines(mail_log, "signal")]
    assert names == ["SIGUSR1", signal.Signals(signum).name]


async def test_running_server_value() -> None:
    running = app.RunningServer([("127.0.0.1", 25)])
    assert not running.shutdown_requested
    running.shutdown()
    assert running.shutdown_requested
