"""Reloading (SIGHUP, RunningServer.reload): a valid config takes effect for new sessions, a
broken one is refused and the old one stays, listeners come and go without dropping the other
connections, restart-only keys stay, delivery picks up its new settings.  In-process through
app.run, and once end to end with SIGHUP to ``python -m katerchen serve``."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from katerchen import app
from katerchen.config import Config
from tests.conftest import (
    DOMAIN,
    HOSTNAME,
    TIMEOUT,
    MakeConfig,
    RawClient,
    Server,
    StartServer,
    config_toml,
    in_thread,
    log_lines,
    wait_until,
)
from tests.fakepeer import FakePeer, Script
from tests.test_cli import DEADLINE, ServerProcess, free_port
from tests.test_receiver import send_one


def write_config(
    tmp_path: Path,
    *,
    server: dict[str, object] | None = None,
    limits: dict[str, object] | None = None,
    extra: str = "",
) -> Config:
    """The test config (conftest.config_toml, then *extra* TOML) as the file
    tmp_path/katerchen.toml, loaded from it, so that a reload reads the file again."""
    text = config_toml(server=server, limits=limits) + extra
    for mailbox in ("alice", "bob"):
        (tmp_path / "domains" / DOMAIN / mailbox).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "katerchen.toml"
    path.write_text(text)
    return Config.from_file(path)


async def greeting(host: str, port: int) -> str:
    """Connect, read the greeting, EHLO; the name the EHLO reply gives."""
    with trio.fail_after(TIMEOUT):
        client = RawClient(await trio.open_tcp_stream(host, port))
    await client.expect("220")
    reply = await client.command("EHLO client.test")
    await client.command("QUIT")
    await client.aclose()
    return reply.lines[0].split()[0]


def bound_port(line: str, host: str = "127.0.0.1") -> int:
    """The port of *host* in a log line (``listening addresses=127.0.0.1:41234``)."""
    match = re.search(rf"{re.escape(host)}:(\d+)", line)
    assert match, line
    return int(match.group(1))


async def refused(host: str, port: int) -> bool:
    try:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


# --- the config file ------------------------------------------------------------------------------


async def test_sighup_puts_a_valid_config_in_force_for_new_sessions(
    start_server: StartServer, tmp_path: Path, mail_log: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path)
    server = await start_server(config, handle_signals=True)
    before = await server.connect()
    await before.expect(f"220 {HOSTNAME}")

    write_config(tmp_path, server={"hostname": "mx2.example.test"}, limits={"max_recipients": 1})
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_until(lambda: log_lines(mail_log, "reloaded"))
    assert log_lines(mail_log, "reload") == [f"reload config={config.source}"]
    assert server.running.config is not None
    assert server.running.config.server.hostname == "mx2.example.test"

    # New sessions get the new config ...
    assert await greeting(server.host, server.port) == "mx2.example.test"
    after = await server.connect()
    await after.dialog("""
        s: 220 mx2.example.test
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: RCPT TO:<bob@example.test>
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 452 4.5.3
    """)
    # ... the session opened before goes on with the settings it started with.
    reply = await before.command("EHLO client.test")
    assert reply.lines[0].split()[0] == HOSTNAME
    replies = await before.dialog("""
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<alice@example.test>
        c: RCPT TO:<bob@example.test>
        c: DATA
        s: 250 2.1.0
        s: 250 2.1.5
        s: 250 2.1.5
        s: 354
        c: Subject: two recipients, as the old limit allows
        c:
        c: .
        s: 250 2.0.0
    """)
    queue_id = replies[-1].lines[-1].rsplit(" ", 1)[1]
    assert server.message(queue_id).envelope.forward_paths == (
        "alice@example.test",
        "bob@example.test",
    )


async def test_a_broken_config_is_refused_and_the_old_one_stays(
    start_server: StartServer, tmp_path: Path, mail_log: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path)
    server = await start_server(config, handle_signals=True)
    assert config.source is not None
    config.source.write_text("[server]\nlisten = [\n")  # a syntax error
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_until(lambda: log_lines(mail_log, "reload-failed"))
    (line,) = log_lines(mail_log, "reload-failed")
    assert "invalid TOML" in line and 'note="the old config stays in force"' in line
    assert [r.levelname for r in mail_log.records if "reload-failed" in r.getMessage()] == ["ERROR"]
    assert server.running.config == config
    # Still serving, on the old config.
    client = await server.connect()
    await client.expect(f"220 {HOSTNAME}")
    await client.command("EHLO client.test")
    await send_one(client)
    # A key error is refused the same way, naming the key.
    config.source.write_text(config_toml(limits={"max_recipients": -1}))
    assert not await server.running.reload()
    assert "[limits] max_recipients" in log_lines(mail_log, "reload-failed")[-1]
    assert not log_lines(mail_log, "reloaded")
    assert await greeting(server.host, server.port) == HOSTNAME


async def test_a_postmaster_that_reaches_no_mailbox_is_refused(
    start_server: StartServer, tmp_path: Path, mail_log: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path)
    server = await start_server(config)
    write_config(tmp_path, extra='\n[delivery]\npostmaster = "nobody@example.test"\n')
    assert not await server.running.reload()
    assert "[delivery] postmaster" in log_lines(mail_log, "reload-failed")[0]
    assert server.running.config == config


async def test_reload_with_a_config_object(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    """The embedding API: reload(config) puts that config in force."""
    server = await start_server(make_config())
    new = make_config(server={"hostname": "other.example.test"})
    assert await server.running.reload(new)
    assert log_lines(mail_log, "reload") == ["reload config=in-memory"]
    assert await greeting(server.host, server.port) == "other.example.test"
    # Without a file, a reload validates the config in force again.
    assert await server.running.reload()
    assert server.running.config == new


async def test_keys_that_need_a_restart_keep_their_old_values(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    server = await start_server(config)
    new = Config.from_mapping(
        {
            "server": {"hostname": "new.example.test", "listen": ["127.0.0.1:0"]},
            "directories": {
                "incoming": "spool/incoming",
                "received": "spool/received",
                "relay": "spool/relay",
                "domains": "other-domains",
            },
        },
        base_dir=config.directories.domains.parent,
    )
    assert await server.running.reload(new)
    (line,) = log_lines(mail_log, "reload-restart-needed")
    assert 'keys="[directories] domains"' in line
    in_force = server.running.config
    assert in_force is not None
    assert in_force.directories == config.directories
    assert in_force.server.hostname == "new.example.test"
    # Still routing with the old domains tree.
    client = await server.connect()
    await client.expect("220 new.example.test")
    await client.command("EHLO client.test")
    await send_one(client)


async def test_reload_while_shutting_down_is_refused(server: Server) -> None:
    server.running.shutdown()
    assert not await server.running.reload()


# --- listeners ------------------------------------------------------------------------------------


async def test_a_listener_added_by_reload_accepts_at_once(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    server = await start_server(make_config())
    first = server.running.addresses[0]
    open_session = await server.connect()
    await open_session.expect("220")
    # (127.0.0.2 is loopback too: another address, so another listener, with port 0.)
    new = make_config(server={"listen": ["127.0.0.1:0", "127.0.0.2:0"]})
    assert await server.running.reload(new)
    # The port-0 listener stayed what it was; the new one is open.
    assert server.running.addresses[0] == first
    host, port = server.running.addresses[1]
    assert host == "127.0.0.2"
    (line,) = log_lines(mail_log, "reloaded")
    assert f"opened=127.0.0.2:{port}" in line
    assert await greeting(host, port) == HOSTNAME
    with trio.fail_after(TIMEOUT):
        client = RawClient(await trio.open_tcp_stream(host, port))
    await client.expect("220")
    await client.command("EHLO client.test")
    await send_one(client)
    # The connection from before the reload was not disturbed.
    await open_session.command("EHLO client.test")
    await send_one(open_session)


async def test_a_removed_listener_stops_accepting_but_its_connections_go_on(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    server = await start_server(make_config(server={"listen": ["127.0.0.1:0", "127.0.0.2:0"]}))
    ((_, zero_port), kept) = server.running.addresses
    port = kept[1]
    on_removed = RawClient(await trio.open_tcp_stream("127.0.0.1", zero_port))
    await on_removed.dialog("""
        s: 220
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test>
        s: 250
    """)
    assert await server.running.reload(make_config(server={"listen": ["127.0.0.2:0"]}))
    assert server.running.addresses == [kept]
    assert f"closed=127.0.0.1:{zero_port}" in log_lines(mail_log, "reloaded")[0]
    assert await refused("127.0.0.1", zero_port)
    assert await greeting("127.0.0.2", port) == HOSTNAME
    # The session on the closed listener finishes its transaction, and another one.
    await on_removed.dialog("""
        c: RCPT TO:<alice@example.test>
        s: 250
        c: DATA
        s: 354
        c: Subject: across a reload
        c:
        c: body
        c: .
        s: 250 2.0.0 Ok: queued as
    """)
    await send_one(on_removed)
    assert len(server.received()) == 2


async def test_a_listener_that_cannot_be_bound_fails_the_whole_reload(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    server = await start_server(make_config())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        free = free_port()
        new = make_config(
            server={
                "hostname": "new.example.test",
                "listen": ["127.0.0.1:0", f"127.0.0.1:{free}", f"127.0.0.1:{busy}"],
            }
        )
        assert not await server.running.reload(new)
    (line,) = log_lines(mail_log, "reload-failed")
    assert f"cannot listen on 127.0.0.1:{busy}" in line
    # Nothing changed: not the config, not the listeners (the one bound first was let go).
    assert await greeting(server.host, server.port) == HOSTNAME
    assert len(server.running.addresses) == 1
    assert await refused("127.0.0.1", free)


async def test_submission_listeners_come_with_tls(
    start_server: StartServer,
    make_config: MakeConfig,
    make_tls_config: MakeConfig,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    server = await start_server(make_config())
    assert server.running.tls is None
    tls_config = make_tls_config(server={"submission": ["127.0.0.1:0"], "submissions": []})
    assert await server.running.reload(tls_config)
    ((_, port),) = server.running.submission_addresses
    assert server.running.tls is not None
    with trio.fail_after(TIMEOUT):
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
    await client.expect("220")
    ehlo = await client.command("EHLO client.test")
    assert "STARTTLS" in ehlo.lines
    # Port 25 offers STARTTLS from now on too.
    assert (
        "STARTTLS"
        in (
            await (await server.connect()).dialog("""
        s: 220
        c: EHLO client.test
        s: 250
    """)
        )[1].lines
    )
    # And back: without [tls] the submission listener goes.
    assert await server.running.reload(make_config())
    assert server.running.submission_addresses == []
    assert await refused("127.0.0.1", port)


# --- what is read again anyway, and delivery ------------------------------------------------------


async def test_mailboxes_aliases_and_users_need_no_reload(
    start_server: StartServer, make_config: MakeConfig
) -> None:
    config = make_config()
    server = await start_server(config)
    client = await server.connect()
    await client.dialog("""
        s: 220
        c: EHLO client.test
        s: 250
        c: MAIL FROM:<a@client.test>
        s: 250
        c: RCPT TO:<carol@example.test>
        s: 550 5.1.1
        c: RCPT TO:<info@example.test>
        s: 550 5.1.1
    """)
    (config.directories.domains / DOMAIN / "carol").mkdir()
    (config.directories.domains / DOMAIN / "aliases").write_text("info: alice\n")
    await client.dialog("""
        c: RCPT TO:<carol@example.test>
        s: 250 2.1.5
        c: RCPT TO:<info@example.test>
        s: 250 2.1.5
    """)


async def test_changed_delivery_settings_restart_the_delivery(
    start_server: StartServer, tmp_path: Path, mail_log: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path)
    server = await start_server(config, deliver=True)
    # Only a listener change: delivery goes on as it is.
    assert await server.running.reload()
    assert "restarted" not in log_lines(mail_log, "reloaded")[0]
    write_config(tmp_path, extra='\n[delivery]\nrecipient_delimiter = "-"\n')
    assert await server.running.reload()
    assert "restarted=delivery,relay" not in log_lines(mail_log, "reloaded")[1]
    assert "restarted=delivery" in log_lines(mail_log, "reloaded")[1]
    # The new delivery routes alice-tag to alice.
    client = await server.connect()
    await client.expect("220")
    await client.command("EHLO client.test")
    await client.command("MAIL FROM:<a@client.test>")
    assert (await client.command("RCPT TO:<alice-news@example.test>")).code == 250
    await client.command("DATA")
    await client.send("Subject: tagged\r\n\r\nhello\r\n.\r\n")
    await client.expect("250 2.0.0")
    new = config.directories.domains / DOMAIN / "alice" / "new"
    await wait_until(lambda: new.is_dir() and any(new.iterdir()))


# --- end to end -----------------------------------------------------------------------------------


def test_sighup_to_the_process(tmp_path: Path) -> None:
    """``kill -HUP``: a listener added (connect to it), a broken config (still serving), a
    listener removed (refused; the other one serves)."""
    (tmp_path / "domains" / DOMAIN / "alice").mkdir(parents=True)
    path = tmp_path / "katerchen.toml"

    def write(listen: list[str]) -> None:
        path.write_text(config_toml(server={"listen": listen, "shutdown_grace": 1}))

    def send(host: str, port: int, subject: str) -> None:
        with smtplib.SMTP(host, port, timeout=DEADLINE) as client:
            client.sendmail("a@client.test", [f"alice@{DOMAIN}"], f"Subject: {subject}\r\n\r\n")

    # Port 0 everywhere (the bound ports come from the log): no race for a free port.
    write(["127.0.0.1:0"])
    process = ServerProcess(["serve", "--config", str(path)], cwd=tmp_path)
    try:
        first = bound_port(process.wait_for("listening"))
        write(["127.0.0.1:0", "127.0.0.2:0"])
        process.proc.send_signal(signal.SIGHUP)
        reloaded = process.wait_for("reloaded")
        assert f'addresses="127.0.0.1:{first} 127.0.0.2:' in reloaded
        second = bound_port(reloaded.split("opened=")[1], "127.0.0.2")
        send("127.0.0.2", second, "to the new port")
        process.wait_for("delivered id=")

        path.write_text("[server\n")
        process.proc.send_signal(signal.SIGHUP)
        process.wait_for("reload-failed")
        send("127.0.0.1", first, "after a broken config")
        send("127.0.0.2", second, "after a broken config")

        write(["127.0.0.2:0"])
        process.proc.send_signal(signal.SIGHUP)
        process.wait_for(f"closed=127.0.0.1:{first}")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", first), timeout=DEADLINE).close()
        send("127.0.0.2", second, "after the removal")
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0, "\n".join(process.lines)
    assert not any("Traceback" in line for line in process.lines)
    new = tmp_path / "domains" / DOMAIN / "alice" / "new"
    assert len(list(new.iterdir())) == 4


async def test_reload_waits_for_nothing_when_not_running() -> None:
    assert not await app.RunningServer([]).reload()
    app.RunningServer([]).request_reload()  # no server: nothing happens


async def test_smtplib_through_a_reload(start_server: StartServer, make_config: MakeConfig) -> None:
    """Many reloads while a client sends: nothing is lost, nothing breaks."""
    server = await start_server(make_config())

    def client() -> None:
        with server.smtp() as smtp:
            for i in range(20):
                smtp.sendmail("a@client.test", ["alice@example.test"], f"Subject: {i}\r\n\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, client)
        for _ in range(10):
            assert await server.running.reload(make_config())
            await trio.sleep(0)
    assert len(server.received()) == 20


# --- SIGUSR1, end to end --------------------------------------------------------------------------


async def test_queue_flush_wakes_the_relayer_of_the_process(
    tmp_path: Path, start_fake_peer: Callable[..., Awaitable[FakePeer]]
) -> None:
    """A deferred relay recipient (the next try an hour away) goes out at once after ``katerchen
    queue flush``, which sends SIGUSR1 to the process through its pidfile."""
    peer = await start_fake_peer(Script(replies={"RCPT": "451 4.3.0 try again later"}), Script())
    (tmp_path / "domains" / DOMAIN / "alice").mkdir(parents=True)
    path = tmp_path / "katerchen.toml"
    path.write_text(
        config_toml(server={"pidfile": "k.pid", "shutdown_grace": 1})
        + '\n[relay]\ntrusted_networks = ["127.0.0.1/32"]\nretry_initial = 3600\n'
        + f'retry_max = 3600\n\n[relay.routes]\n"*" = "127.0.0.1:{peer.port}"\n'
    )
    process = ServerProcess(["serve", "--config", str(path)], cwd=tmp_path)

    def send(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            client.sendmail("alice@example.test", ["carol@remote.test"], b"Subject: out\r\n\r\n")

    try:
        port = bound_port(await in_thread(process.wait_for, "listening"))
        await in_thread(send, port)
        deferred = await in_thread(process.wait_for, "relay id=")
        assert "status=deferred" in deferred and "retry=3600" in deferred
        flush = await trio.run_process(
            [sys.executable, "-m", "katerchen", "queue", "flush", "--config", str(path)],
            capture_stdout=True,
        )
        assert b"signalled the server" in flush.stdout
        await in_thread(process.wait_for, "signal signal=SIGUSR1")
        sent = await in_thread(process.wait_for, "relay id=")
        assert "status=sent" in sent
        await peer.wait_for(lambda: peer.accepted)
        status = await in_thread(process.stop, signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0
