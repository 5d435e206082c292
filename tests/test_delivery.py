"""The delivery task against a real server and real directories: received/ -> Maildirs (read back
with Python's ``mailbox``), relay/, bounces; rings, SIGUSR1, scans; temporary and permanent
failures; exactly once across a repeated delivery.

Messages reach ``received/`` through the real receiver (smtplib, swaks) or are placed there by
hand, the way a crash or an administrator leaves them: written elsewhere, then renamed in.
Faults are real I/O, never mocks: a Maildir's ``new/`` or ``tmp/`` replaced by a regular file
fails the delivery with ENOTDIR exactly as a broken disk would, and works even as root.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import functools
import mailbox
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from katerchen import app
from katerchen.config import Config
from katerchen.delivery import Deliverer, bounce_id, retry_delay
from katerchen.envelope import Envelope, received_header
from katerchen.spool import Spool, new_queue_id
from tests.conftest import (
    DOMAIN,
    HOSTNAME,
    TIMEOUT,
    Server,
    config_toml,
    in_thread,
    log_lines,
    wait_until,
)
from tests.test_cli import ServerProcess, free_port
from tests.test_receiver_clients import run_swaks, swaks

# --- fixtures and helpers ------------------------------------------------------------------------

#: Fast retries, and no periodic scan unless a test asks for one: what gets delivered is then
#: what a ring, a signal or the start-up scan delivered.
FAST = {"scan_interval": 3600, "retry_initial": 0.05, "retry_max": 0.2}

MakeConfig = Callable[..., Config]


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """``make_config(scan_interval=..., ...)``: the test config with a ``[delivery]`` section
    (FAST, overridden by the keywords), and the mailboxes example.test/alice and bob."""

    def make(**delivery: object) -> Config:
        for name in ("alice", "bob"):
            (tmp_path / "domains" / DOMAIN / name).mkdir(parents=True, exist_ok=True)
        keys = {**FAST, **delivery}
        section = "\n[delivery]\n" + "".join(f"{k} = {v!r}\n" for k, v in keys.items())
        return Config.from_toml(config_toml() + section, base_dir=tmp_path)

    return make


@pytest.fixture
def config(make_config: MakeConfig) -> Config:
    return make_config()


Start = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start(nursery: trio.Nursery) -> AsyncIterator[Start]:
    """``await start(config, handle_signals=False)``: app.run with delivery, in the test's
    nursery; stopped (and it must return) when the test ends."""
    servers: list[Server] = []

    async def start(config: Config, *, handle_signals: bool = False) -> Server:
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[app.RunningServer]) -> None:
            try:
                # relay=False: these tests look at the relay copies delivery writes.
                await app.run(
                    config,
                    handle_signals=handle_signals,
                    deliver=True,
                    relay=False,
                    task_status=task_status,
                )
            finally:
                stopped.set()

        with trio.fail_after(TIMEOUT):
            running: app.RunningServer = await nursery.start(run)
        server = Server(config, running, stopped)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(start: Start, config: Config) -> Server:
    return await start(config)


def mailbox_dir(config: Config, name: str, domain: str = DOMAIN) -> Path:
    return config.directories.domains / domain / name


def read_maildir(path: Path) -> list[bytes]:
    """Every message of the Maildir *path* (new/ and cur/), through Python's mailbox module."""
    if not all((path / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return []
    box = mailbox.Maildir(path, factory=None, create=False)
    return [box.get_bytes(key) for key in sorted(box.keys())]


def maildir_files(path: Path) -> list[str]:
    return sorted(
        f"{sub}/{name}"
        for sub in ("new", "cur", "tmp")
        if (path / sub).is_dir()
        for name in os.listdir(path / sub)
    )


def place(
    config: Config,
    *,
    sender: str = "sender@client.test",
    recipients: tuple[str, ...] = ("alice@example.test",),
    content: bytes = b"Subject: placed by hand\r\n\r\nhello\r\n",
    queue_id: str | None = None,
    client: str = "192.0.2.7",
) -> str:
    """Put a message into received/ as the receiver would have left it; return its id.  Written
    next to the spool and renamed in, so a scan never sees half a file."""
    queue_id = queue_id or new_queue_id()
    envelope = Envelope(
        queue_id=queue_id,
        arrival=time.time(),
        client=client,
        helo="client.test",
        reverse_path=sender,
        forward_paths=recipients,
        body="8BITMIME",
        smtputf8=False,
    )
    data = envelope.encode() + received_header(envelope, hostname=HOSTNAME, protocol="ESMTP")
    received = config.directories.received
    received.mkdir(parents=True, exist_ok=True)
    temporary = received.parent / f"placing-{queue_id}"
    temporary.write_bytes(data + content)
    temporary.rename(received / queue_id)
    return queue_id


def received_ids(config: Config) -> list[str]:
    return sorted(os.listdir(config.directories.received))


def body_of(delivered: bytes) -> bytes:
    """The message after the delivery's Return-Path, Delivered-To and our Received header."""
    assert delivered.startswith(b"Return-Path: <"), delivered[:80]
    _, _, rest = delivered.partition(b"\r\nDelivered-To: ")
    _, _, rest = rest.partition(b"\r\n")
    assert rest.startswith(b"Received: from "), rest[:80]
    end = 0
    while True:
        end = rest.index(b"\r\n", end) + 2
        if rest[end : end + 1] not in (b"\t", b" "):
            return rest[end:]


async def wait_for_messages(path: Path, count: int = 1) -> list[bytes]:
    await wait_until(lambda: len(read_maildir(path)) >= count)
    messages = read_maildir(path)
    assert len(messages) == count, messages
    return messages


def send(server: Server, sender: str, recipients: list[str], message: bytes) -> None:
    """BLOCKING: one message with smtplib (run it through in_thread)."""
    with server.smtp() as client:
        refused = client.sendmail(sender, recipients, message)
        assert refused == {}


def parse_bounce(data: bytes) -> email.message.Message:
    report = email.message_from_bytes(data, policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    return report


def recipient_fields(report: email.message.Message) -> list[email.message.Message]:
    """The per-recipient field groups of the message/delivery-status part."""
    (status,) = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    groups = status.get_payload()
    assert isinstance(groups, list)
    # The first group holds the per-message fields.
    return [group for group in groups[1:] if isinstance(group, email.message.Message)]


# --- pure policy --------------------------------------------------------------------------------


def test_retry_delay_doubles_up_to_the_maximum() -> None:
    delays = []
    delay = None
    for _ in range(6):
        delay = retry_delay(delay, initial=60, maximum=300)
        delays.append(delay)
    assert delays == [60, 120, 240, 300, 300, 300]
    assert retry_delay(None, initial=60, maximum=10) == 10


def test_bounce_id_is_derived_and_valid() -> None:
    queue_id = new_queue_id()
    assert bounce_id(queue_id) == queue_id + "b"
    assert bounce_id(queue_id) == bounce_id(queue_id)
    assert sorted([bounce_id(queue_id), queue_id]) == [queue_id, bounce_id(queue_id)]
    longest = "A" * 64
    derived = bounce_id(longest)
    assert len(derived) == 64 and derived.isalnum() and derived != longest


# --- delivering through the real server ----------------------------------------------------------

EIGHT_BIT = (
    b"Subject: 8-bit and dots\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe, \xff\xfe raw bytes\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"  trailing spaces  \r\n"
)


async def test_smtplib_message_lands_in_the_maildir_byte_exact(
    server: Server, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    def session() -> None:
        with server.smtp() as client:
            client.ehlo()
            client.sendmail(
                "sender@client.test", ["alice@example.test"], EIGHT_BIT, ["BODY=8BITMIME"]
            )

    await in_thread(session)
    alice = mailbox_dir(config, "alice")
    (delivered,) = await wait_for_messages(alice)
    assert delivered.startswith(
        b"Return-Path: <sender@client.test>\r\nDelivered-To: alice@example.test\r\nReceived: "
    )
    assert body_of(delivered) == EIGHT_BIT
    await wait_until(lambda: received_ids(config) == [])
    (line,) = log_lines(mail_log, "delivered")
    assert "to=<alice@example.test> mailbox=example.test/alice delay=" in line
    (name,) = os.listdir(alice / "new")
    # Dovecot's size hint is the exact file size.
    assert name.endswith(f",S={len(delivered)}")
    assert maildir_files(alice) == [f"new/{name}"]  # nothing left in tmp/


@swaks
async def test_swaks_message_lands_in_the_maildir_byte_exact(
    server: Server, config: Config, tmp_path: Path
) -> None:
    data = tmp_path / "message.eml"
    # swaks ends the data with CRLF "." CRLF itself, so the file leaves out the last CRLF.
    data.write_bytes(EIGHT_BIT.removesuffix(b"\r\n"))
    result = await run_swaks(
        server, "--to", "alice@example.test", "--from", "x@y.test", "--data", str(data)
    )
    assert result.returncode == 0, result.stdout.decode()
    (delivered,) = await wait_for_messages(mailbox_dir(config, "alice"))
    assert delivered.startswith(b"Return-Path: <x@y.test>\r\nDelivered-To: alice@example.test\r\n")
    assert body_of(delivered) == EIGHT_BIT


async def test_several_recipients_and_duplicates_get_one_copy_each(
    server: Server, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    (config.directories.domains / DOMAIN / "aliases").write_text(
        "team: alice, bob\neveryone: team, alice@example.test\n"
    )
    recipients = [
        "alice@example.test",
        "team@example.test",
        "ALICE@example.test",
        "alice+news@example.test",
        "everyone@example.test",
    ]
    await in_thread(send, server, "sender@client.test", recipients, b"Subject: all\r\n\r\nx\r\n")
    (to_alice,) = await wait_for_messages(mailbox_dir(config, "alice"))
    (to_bob,) = await wait_for_messages(mailbox_dir(config, "bob"))
    assert b"\r\nDelivered-To: alice@example.test\r\n" in to_alice
    assert b"\r\nDelivered-To: bob@example.test\r\n" in to_bob
    await wait_until(lambda: received_ids(config) == [])
    lines = log_lines(mail_log, "delivered")
    assert len(lines) == 2
    assert "to=<alice@example.test> mailbox=example.test/alice" in lines[0]
    assert "to=<team@example.test> mailbox=example.test/bob" in lines[1]


async def test_forwarding_alias_writes_one_relay_copy(
    server: Server, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    (config.directories.domains / DOMAIN / "aliases").write_text(
        "fwd: carol@elsewhere.example, alice, Dave@Far.Example\n"
        "both: fwd, carol@elsewhere.example\n"
    )
    content = b"Subject: forwarded\r\n\r\nfor carol\r\n"
    await in_thread(
        send, server, "sender@client.test", ["both@example.test", "bob@example.test"], content
    )
    relay = config.directories.relay
    await wait_until(lambda: received_ids(config) == [])
    (queue_id,) = os.listdir(relay)
    data = (relay / queue_id).read_bytes()
    envelope, offset = Envelope.decode(data)
    assert envelope.queue_id == queue_id
    assert envelope.reverse_path == "sender@client.test"
    # Only the remote recipients, once each; the domain as the alias says, lowercased.
    assert envelope.forward_paths == ("carol@elsewhere.example", "Dave@far.example")
    (to_alice,) = read_maildir(mailbox_dir(config, "alice"))
    # The relay copy is the message as received, our Received header included.
    assert to_alice.endswith(data[offset:])
    assert data[offset:].startswith(b"Received: from ")
    assert data.endswith(content)
    assert len(read_maildir(mailbox_dir(config, "bob"))) == 1
    await wait_until(lambda: len(log_lines(mail_log, "relayed")) == 2)  # after the removal
    relayed = log_lines(mail_log, "relayed")
    assert len(relayed) == 2
    assert "to=<carol@elsewhere.example> orig_to=<both@example.test>" in relayed[0]
    assert os.listdir(config.directories.incoming) == []


async def test_leftovers_are_delivered_by_the_start_up_scan(start: Start, config: Config) -> None:
    ids = [place(config, content=b"Subject: %d\r\n\r\nleft\r\n" % i) for i in range(3)]
    await start(config)
    messages = await wait_for_messages(mailbox_dir(config, "alice"), 3)
    assert [body_of(m).split(b"\r\n")[0] for m in messages] == [
        b"Subject: 0",
        b"Subject: 1",
        b"Subject: 2",
    ]
    await wait_until(lambda: received_ids(config) == [])
    assert len(ids) == 3


async def test_sigusr1_delivers_a_placed_file_at_once(
    start: Start, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    # scan_interval is an hour: only the signal can find the file.
    await start(config, handle_signals=True)
    queue_id = place(config)
    os.kill(os.getpid(), signal.SIGUSR1)
    await wait_for_messages(mailbox_dir(config, "alice"))
    # Logged right after the file is in new/.
    await wait_until(lambda: any(f"id={queue_id}" in x for x in log_lines(mail_log, "delivered")))


async def test_periodic_scan_delivers_a_placed_file(start: Start, make_config: MakeConfig) -> None:
    config = make_config(scan_interval=0.05)
    await start(config)
    place(config)
    await wait_for_messages(mailbox_dir(config, "alice"))
    await wait_until(lambda: received_ids(config) == [])


def test_sigusr1_to_the_process_delivers_a_placed_file(tmp_path: Path) -> None:
    """The real thing: ``python -m katerchen serve`` and ``kill -USR1``."""
    (tmp_path / "domains" / DOMAIN / "alice").mkdir(parents=True)
    port = free_port()
    text = config_toml(server={"listen": [f"127.0.0.1:{port}"]}) + (
        "\n[delivery]\nscan_interval = 3600\n"
    )
    (tmp_path / "katerchen.toml").write_text(text)
    config = Config.from_toml(text, base_dir=tmp_path)
    process = ServerProcess(["serve", "--config", "katerchen.toml"], cwd=tmp_path)
    try:
        process.wait_for("listening")
        queue_id = place(config)
        process.proc.send_signal(signal.SIGUSR1)
        process.wait_for(f"delivered id={queue_id}")
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0, "\n".join(process.lines)
    (delivered,) = read_maildir(mailbox_dir(config, "alice"))
    assert body_of(delivered) == b"Subject: placed by hand\r\n\r\nhello\r\n"
    assert received_ids(config) == []


async def test_many_messages_rescans_and_signals_deliver_each_once(
    start: Start, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    config = make_config(scan_interval=0.01)
    server = await start(config, handle_signals=True)

    def client(number: int) -> None:
        with server.smtp() as smtp:
            for i in range(8):
                smtp.sendmail(
                    "sender@client.test",
                    ["alice@example.test", "bob@example.test"],
                    b"Subject: %d-%d\r\n\r\nx\r\n" % (number, i),
                )

    async with trio.open_nursery() as clients:
        for number in range(4):
            clients.start_soon(in_thread, client, number)
        for _ in range(5):
            os.kill(os.getpid(), signal.SIGUSR1)
            await trio.sleep(0)
    for name in ("alice", "bob"):
        messages = await wait_for_messages(mailbox_dir(config, name), 32)
        subjects = sorted(body_of(m).split(b"\r\n")[0] for m in messages)
        assert len(set(subjects)) == 32
    await wait_until(lambda: received_ids(config) == [])
    assert len(log_lines(mail_log, "delivered")) == 64
    assert not any("already" in line for line in log_lines(mail_log, "delivered"))


async def test_delivery_goes_on_while_connections_drain(
    server: Server, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    busy = await server.connect()
    await busy.dialog("""
        s: 220
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<bob@example.test>
        c: DATA
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 354
    """)
    server.running.shutdown()
    await wait_until(lambda: log_lines(mail_log, "shutdown"))
    # The server is draining; a message that arrives meanwhile (another client's, or one
    # placed by hand and found by a scan) is still delivered.
    await busy.send("Subject: in flight\r\n\r\ndone\r\n.\r\n")
    await busy.dialog("""
        s: 250 2.0.0 Ok: queued as
        s: 421 4.3.2
        closed
    """)
    with trio.fail_after(TIMEOUT):
        await server.stopped.wait()
    # Whether delivery got to it before the cancellation or not, it is in exactly one place.
    in_maildir = len(read_maildir(mailbox_dir(config, "bob")))
    assert in_maildir + len(received_ids(config)) == 1


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["new", "tmp"])
async def test_temporary_failure_is_retried_with_backoff(
    server: Server, config: Config, mail_log: pytest.LogCaptureFixture, broken: str
) -> None:
    alice = mailbox_dir(config, "alice")
    (alice / broken).write_bytes(b"")  # a file where a directory must be: ENOTDIR
    await in_thread(
        send, server, "sender@client.test", ["alice@example.test"], b"Subject: r\r\n\r\n"
    )
    await wait_until(lambda: len(log_lines(mail_log, "deferred")) >= 4)
    (queue_id,) = received_ids(config)  # kept, not lost
    deferred = log_lines(mail_log, "deferred")
    expected = f"deferred id={queue_id} to=<alice@example.test> mailbox=example.test/alice"
    assert deferred[0].startswith(expected)
    assert "reason=" in deferred[0]
    assert [line.rsplit("retry=", 1)[1] for line in deferred[:4]] == ["0.05", "0.1", "0.2", "0.2"]
    (alice / broken).unlink()  # repaired: the next retry delivers
    (delivered,) = await wait_for_messages(alice)
    assert body_of(delivered) == b"Subject: r\r\n\r\n"
    await wait_until(lambda: received_ids(config) == [])


async def test_sigusr1_retries_deferred_messages_now(
    start: Start, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    config = make_config(retry_initial=3600, retry_max=3600)
    server = await start(config, handle_signals=True)
    alice = mailbox_dir(config, "alice")
    (alice / "new").write_bytes(b"")
    await in_thread(
        send, server, "sender@client.test", ["alice@example.test"], b"Subject: s\r\n\r\n"
    )
    await wait_until(lambda: log_lines(mail_log, "deferred"))
    assert log_lines(mail_log, "deferred")[0].endswith("retry=3600")
    (alice / "new").unlink()
    os.kill(os.getpid(), signal.SIGUSR1)
    await wait_for_messages(alice)
    await wait_until(lambda: received_ids(config) == [])


async def test_one_failing_mailbox_does_not_hold_back_the_others(
    server: Server, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    alice = mailbox_dir(config, "alice")
    (alice / "new").write_bytes(b"")
    (config.directories.domains / DOMAIN / "aliases").write_text("fwd: carol@elsewhere.example\n")
    await in_thread(
        send,
        server,
        "sender@client.test",
        ["alice@example.test", "bob@example.test", "fwd@example.test"],
        b"Subject: partly\r\n\r\n",
    )
    # Bob gets his copy at once; the relay copy waits until alice's succeeds, so that a retry
    # cannot write it a second time after the relayer took it.
    await wait_for_messages(mailbox_dir(config, "bob"))
    await wait_until(lambda: len(log_lines(mail_log, "deferred")) >= 2)
    assert os.listdir(config.directories.relay) == []
    (alice / "new").unlink()
    await wait_for_messages(alice)
    await wait_until(lambda: received_ids(config) == [])
    assert len(os.listdir(config.directories.relay)) == 1
    assert len(read_maildir(mailbox_dir(config, "bob"))) == 1
    delivered = log_lines(mail_log, "delivered")
    assert len(delivered) == 2  # bob once (found there on the retries, not logged), then alice
    assert "mailbox=example.test/bob" in delivered[0]
    assert "mailbox=example.test/alice" in delivered[1]


async def test_mailbox_removed_after_acceptance_bounces_to_a_local_sender(
    server: Server, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    alice = mailbox_dir(config, "alice")
    (alice / "new").write_bytes(b"")  # hold the message in received/ ...
    content = b"Subject: to be bounced\r\nMessage-ID: <m1@client.test>\r\n\r\nbody\r\n"
    await in_thread(send, server, "bob@example.test", ["alice@example.test"], content)
    await wait_until(lambda: log_lines(mail_log, "deferred"))
    (queue_id,) = received_ids(config)
    shutil.rmtree(alice)  # ... and remove the mailbox: the retry finds no such recipient
    (delivered,) = await wait_for_messages(mailbox_dir(config, "bob"))
    await wait_until(lambda: received_ids(config) == [])
    assert delivered.startswith(b"Return-Path: <>\r\nDelivered-To: bob@example.test\r\n")
    report = parse_bounce(delivered)
    assert report["To"] == "<bob@example.test>"
    assert report["Auto-Submitted"] == "auto-replied"
    (fields,) = recipient_fields(report)
    assert fields["Final-Recipient"] == "rfc822; alice@example.test"
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.1.1"
    (headers,) = [p for p in report.walk() if p.get_content_type() == "text/rfc822-headers"]
    quoted = headers.get_payload(decode=True)
    assert isinstance(quoted, bytes)
    assert b"Message-ID: <m1@client.test>" in quoted and b"body" not in quoted
    (line,) = log_lines(mail_log, "bounced")
    assert f"bounced id={queue_id} to=<alice@example.test> status=5.1.1" in line
    assert f"dsn={bounce_id(queue_id)}" in line
    assert any(f"id={bounce_id(queue_id)}" in x for x in log_lines(mail_log, "delivered"))


async def test_alias_loop_at_delivery_time_bounces(start: Start, config: Config) -> None:
    # Accepted before the loop was configured (the receiver now refuses it with 550 5.4.6).
    queue_id = place(config, sender="bob@example.test", recipients=("ping@example.test",))
    (config.directories.domains / DOMAIN / "aliases").write_text("ping: pong\npong: ping\n")
    await start(config)
    (delivered,) = await wait_for_messages(mailbox_dir(config, "bob"))
    (fields,) = recipient_fields(parse_bounce(delivered))
    assert fields["Status"] == "5.4.6"
    assert fields["Final-Recipient"] == "rfc822; ping@example.test"
    await wait_until(lambda: received_ids(config) == [])
    assert queue_id


async def test_bounce_to_a_remote_sender_goes_to_relay(start: Start, config: Config) -> None:
    queue_id = place(
        config,
        sender="carol@elsewhere.example",
        recipients=("gone@example.test", "alice@example.test"),
    )
    await start(config)
    relay = config.directories.relay
    await wait_until(lambda: os.listdir(relay) == [bounce_id(queue_id)])
    await wait_until(lambda: received_ids(config) == [])
    data = (relay / bounce_id(queue_id)).read_bytes()
    envelope, offset = Envelope.decode(data)
    assert envelope.reverse_path == ""
    assert envelope.forward_paths == ("carol@elsewhere.example",)
    (fields,) = recipient_fields(parse_bounce(data[offset:]))
    assert fields["Final-Recipient"] == "rfc822; gone@example.test"
    assert len(read_maildir(mailbox_dir(config, "alice"))) == 1  # the other recipient got it


async def test_remote_recipients_are_relayed_only_for_local_mail(
    start: Start, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    # Made on this host (no client address): relayed.  From the network: the domain is not
    # (any more) served, so it bounces with 5.7.1, as RCPT would have refused it.
    local = place(config, client="", recipients=("carol@elsewhere.example",))
    network = place(config, sender="bob@example.test", recipients=("dave@elsewhere.example",))
    await start(config)
    relay = config.directories.relay
    await wait_until(lambda: os.listdir(relay) == [local])
    envelope, _ = Envelope.decode((relay / local).read_bytes())
    assert envelope.forward_paths == ("carol@elsewhere.example",)
    (bounce,) = await wait_for_messages(mailbox_dir(config, "bob"))
    (fields,) = recipient_fields(parse_bounce(bounce))
    assert fields["Final-Recipient"] == "rfc822; dave@elsewhere.example"
    assert fields["Status"] == "5.7.1"
    await wait_until(lambda: received_ids(config) == [])
    assert any(f"id={network}" in line for line in log_lines(mail_log, "bounced"))


async def test_null_sender_is_never_bounced(
    start: Start, config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    queue_id = place(config, sender="", recipients=("gone@example.test",))
    await start(config)
    await wait_until(lambda: log_lines(mail_log, "dropped"))  # logged after the removal
    assert received_ids(config) == []
    (line,) = log_lines(mail_log, "dropped")
    assert f"dropped id={queue_id} to=<gone@example.test> status=5.1.1" in line
    assert log_lines(mail_log, "bounced") == []
    assert os.listdir(config.directories.relay) == []
    for name in ("alice", "bob"):
        assert read_maildir(mailbox_dir(config, name)) == []


async def test_undecodable_file_is_left_and_logged_once(
    start: Start, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    config = make_config(scan_interval=0.02)
    received = config.directories.received
    received.mkdir(parents=True)
    corrupt = received / "0000000000000000dead"
    corrupt.write_bytes(b"katerchen-envelope 99\nid 0000000000000000dead\n\nwhatever\r\n")
    (received / ".editor-swap").write_bytes(b"not a queue id: never read")
    await start(config)
    # Three messages, each found by a later scan: the corrupt file is read by every scan.
    for i in range(3):
        place(config, content=b"Subject: %d\r\n\r\n" % i)
        await wait_for_messages(mailbox_dir(config, "alice"), i + 1)
    (line,) = log_lines(mail_log, "undecodable")
    assert "id=0000000000000000dead" in line and "unknown version" in line
    await wait_until(lambda: sorted(os.listdir(received)) == [".editor-swap", corrupt.name])
    # Once it decodes (say, a copy by hand that had not finished), it is delivered.
    corrupt.unlink()
    place(config, queue_id="0000000000000000dead", content=b"Subject: fixed\r\n\r\n")
    await wait_for_messages(mailbox_dir(config, "alice"), 4)
    await wait_until(lambda: os.listdir(received) == [".editor-swap"])


# --- exactly once, with the delivery run directly ------------------------------------------------


def test_repeated_delivery_after_a_crash_leaves_one_copy(config: Config) -> None:
    directories = config.directories
    spool = Spool(directories.incoming, directories.received, directories.relay)
    spool.prepare()
    (directories.domains / DOMAIN / "aliases").write_text("fwd: carol@elsewhere.example\n")
    deliverer = Deliverer(config, spool)
    queue_id = place(
        config,
        sender="bob@example.test",
        recipients=("alice@example.test", "fwd@example.test", "gone@example.test"),
    )
    original = (directories.received / queue_id).read_bytes()

    first = deliverer.deliver(queue_id, check_cur=False)
    assert first.outcome == "done" and first.bounce == bounce_id(queue_id)
    assert received_ids(config) == [bounce_id(queue_id)]
    relay_copy = (directories.relay / queue_id).read_bytes()
    bounce = (directories.received / bounce_id(queue_id)).read_bytes()

    # The crash: the removal from received/ never reached the disk, and meanwhile the reader
    # moved alice's message to cur/ and marked it seen.
    (directories.received / queue_id).write_bytes(original)
    alice = mailbox_dir(config, "alice")
    (name,) = os.listdir(alice / "new")
    os.rename(alice / "new" / name, alice / "cur" / f"{name}:2,S")

    again = deliverer.deliver(queue_id, check_cur=True)
    assert again.outcome == "done"
    assert maildir_files(alice) == [f"cur/{name}:2,S"]
    assert os.listdir(directories.relay) == [queue_id]
    assert (directories.relay / queue_id).read_bytes() == relay_copy
    assert received_ids(config) == [bounce_id(queue_id)]
    assert (directories.received / bounce_id(queue_id)).read_bytes() == bounce

    # The bounce itself, delivered twice the same way, is in bob's Maildir once.
    bob = mailbox_dir(config, "bob")
    assert deliverer.deliver(bounce_id(queue_id), check_cur=False).outcome == "done"
    (directories.received / bounce_id(queue_id)).write_bytes(bounce)
    assert deliverer.deliver(bounce_id(queue_id), check_cur=True).outcome == "done"
    assert len(read_maildir(bob)) == 1
    assert received_ids(config) == []
    assert os.listdir(directories.incoming) == []


def test_a_vanished_file_is_gone_not_an_error(config: Config) -> None:
    directories = config.directories
    spool = Spool(directories.incoming, directories.received, directories.relay)
    spool.prepare()
    attempt = Deliverer(config, spool).deliver(new_queue_id(), check_cur=True)
    assert attempt.outcome == "gone"


def test_envelope_id_must_match_the_file_name(config: Config) -> None:
    directories = config.directories
    spool = Spool(directories.incoming, directories.received, directories.relay)
    spool.prepare()
    queue_id = place(config)
    os.rename(directories.received / queue_id, directories.received / "renamed")
    attempt = Deliverer(config, spool).deliver("renamed", check_cur=True)
    assert attempt.outcome == "undecodable"
    assert "file name" in attempt.reason
    assert received_ids(config) == ["renamed"]


async def test_run_without_delivery_leaves_received_alone(
    nursery: trio.Nursery, config: Config
) -> None:
    # app.run(deliver=False): what tests of the receiving side use to look at spool files.
    running: app.RunningServer = await nursery.start(
        functools.partial(app.run, config, deliver=False)
    )
    server = Server(config, running, trio.Event())
    await in_thread(
        send, server, "sender@client.test", ["alice@example.test"], b"Subject: k\r\n\r\n"
    )
    running.shutdown()
    (queue_id,) = received_ids(config)
    assert read_maildir(mailbox_dir(config, "alice")) == []
    assert queue_id
