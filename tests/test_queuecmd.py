"""``katerchen queue``: every command against a real spool tree -- messages a real server took
in, relay files written the way delivery writes them -- in-process through ``cli.main``, with
and without a server running, and once end to end as ``python -m katerchen queue list --json``.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from katerchen import cli, maillog, queuecmd
from katerchen.config import Config
from katerchen.envelope import Envelope, received_header
from katerchen.relay import STATE_SUFFIX, RecipientState, RelayState, save_state
from katerchen.spool import new_queue_id, write_file

from .conftest import (
    DOMAIN,
    HOSTNAME,
    MAILBOXES,
    TIMEOUT,
    StartServer,
    config_toml,
    in_thread,
    wait_until,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """cli.main() may configure the katerchen logger; put it back for the other tests."""
    logger = maillog.logger
    saved = (logger.level, list(logger.handlers))
    yield
    for handler in list(logger.handlers):
        if handler not in saved[1]:
            logger.removeHandler(handler)
    logger.setLevel(saved[0])


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


Queue = Callable[..., Result]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """The test config (conftest's) as a file in tmp_path, with its mailboxes."""
    for mailbox in MAILBOXES:
        (tmp_path / "domains" / DOMAIN / mailbox).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "katerchen.toml"
    path.write_text(config_toml())
    return path


@pytest.fixture
def config(config_file: Path) -> Config:  # the same config the command line reads
    return Config.from_file(config_file)


@pytest.fixture
def queue(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Queue:
    """``queue("list", "--json")`` runs ``katerchen --config FILE queue list --json``."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = cli.main(["--config", str(config_file), "queue", *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def send(host: str, port: int, sender: str, recipients: list[str], body: bytes) -> None:
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=TIMEOUT) as smtp:
        smtp.sendmail(sender, recipients, body)


async def receive(
    start_server: StartServer, config: Config, *messages: tuple[str, list[str], bytes]
) -> list[str]:
    """Have a real server (without delivery) take *messages* in; return their queue ids."""
    server = await start_server(config)
    before = set(os.listdir(config.directories.received))
    for sender, recipients, body in messages:
        await in_thread(send, server.host, server.port, sender, recipients, body)
    await server.stop()
    return sorted(set(os.listdir(config.directories.received)) - before)


def write_relay(
    config: Config,
    recipients: tuple[str, ...],
    *,
    state: Sequence[RecipientState] | bytes | None = None,
    subject: str = "relayed",
) -> str:
    """A relay/<id> file as delivery writes it, and optionally its state file (as the relayer
    writes it, or the bytes given)."""
    queue_id = new_queue_id()
    envelope = Envelope(
        queue_id=queue_id,
        arrival=time.time() - 7200,
        client="",
        helo=HOSTNAME,
        reverse_path=f"alice@{DOMAIN}",
        forward_paths=recipients,
        body=None,
        smtputf8=False,
    )
    header = envelope.encode() + received_header(envelope, hostname=HOSTNAME, protocol="LOCAL")
    content = f"Subject: {subject}\r\n\r\nbody\r\n".encode()
    directories = config.directories
    directories.relay.mkdir(parents=True, exist_ok=True)
    directories.incoming.mkdir(parents=True, exist_ok=True)
    write_file(directories.incoming, directories.relay, queue_id, (header, content))
    if isinstance(state, bytes):
        (directories.relay / f"{queue_id}.state").write_bytes(state)
    elif state is not None:
        write_state(directories.relay, queue_id, *state)
    return queue_id


def write_state(relay_dir: Path, queue_id: str, *recipients: RecipientState) -> None:
    """``relay_dir/<id>.state`` written by the relayer's own code."""
    state = RelayState(queue_id, list(recipients), first_attempt=time.time() - 3600)
    save_state(relay_dir, state)


def listed(result: Result) -> list[dict[str, Any]]:
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["format"] == "katerchen-queue"
    assert document["version"] == 1
    messages = document["messages"]
    assert isinstance(messages, list)
    return messages


# --- list and show -------------------------------------------------------------------------------


def test_an_empty_queue(queue: Queue, config: Config) -> None:
    # No spool directory exists yet: the queue is simply empty.
    assert not config.directories.received.exists()
    result = queue("list")
    assert (result.code, result.out) == (0, "The queue is empty.\n")
    assert listed(queue("list", "--json")) == []


async def test_list_and_show_messages_a_server_took_in(
    queue: Queue, config: Config, start_server: StartServer
) -> None:
    first, second = await receive(
        start_server,
        config,
        (f"carol@{DOMAIN}", [f"alice@{DOMAIN}"], b"Subject: first\r\n\r\none\r\n"),
        ("", [f"alice@{DOMAIN}", f"bob@{DOMAIN}"], b"Subject: second\r\nX-A: b\r\n\r\ntwo\r\n"),
    )

    table = queue("list")
    assert table.code == 0
    lines = table.out.splitlines()
    assert lines[0].split() == ["ID", "QUEUE", "STATE", "AGE", "SIZE", "NEXT", "FROM", "TO"]
    assert lines[1].split()[:3] == [first, "received", "received"]
    assert lines[1].split()[-2:] == [f"<carol@{DOMAIN}>", f"<alice@{DOMAIN}>"]
    assert lines[2].split()[:3] == [second, "received", "received"]
    assert lines[2].split()[-3:] == ["<>", f"<alice@{DOMAIN}>,", f"<bob@{DOMAIN}>"]
    assert lines[3].startswith("-- 2 messages, ")

    one, two = listed(queue("list", "--json"))
    assert one["id"] == first
    assert (one["queue"], one["state"], one["held_from"]) == ("received", "received", None)
    assert one["sender"] == f"carol@{DOMAIN}"
    assert one["recipients"] == [
        {
            "to": f"alice@{DOMAIN}",
            "status": "queued",
            "attempts": 0,
            "next_attempt": None,
            "last_attempt": None,
            "reply": None,
        }
    ]
    assert one["next_attempt"] is None and one["error"] is None
    assert isinstance(one["age"], float) and 0 <= one["age"] < 60
    # The size of the message as it will be delivered: our Received header and the data.
    received = (config.directories.received / first).read_bytes()
    _, offset = Envelope.decode(received)
    assert one["size"] == len(received) - offset
    assert two["sender"] == ""

    shown = queue("show", second)
    assert shown.code == 0
    out = shown.out
    assert f"id:        {second}\n" in out
    assert "queue:     received\n" in out
    assert "client:    127.0.0.1\n" in out
    assert "helo:      client.test\n" in out
    assert "from:      <>\n" in out
    assert f"to:        <alice@{DOMAIN}>  queued\n" in out
    assert f"to:        <bob@{DOMAIN}>  queued\n" in out
    assert "\nReceived: from client.test ([127.0.0.1])\n" in out
    assert out.endswith("Subject: second\nX-A: b\n")
    assert "two" not in out  # headers only

    (document,) = listed(queue("show", second, "--json"))
    assert document["id"] == second
    assert document["envelope"] == {
        "client": "127.0.0.1",
        "helo": "client.test",
        "body": None,
        "smtputf8": False,
        "auth": None,
        "relay": False,
    }
    headers = document["headers"]
    assert isinstance(headers, list)
    assert headers[0][0] == "Received"
    assert f"by {HOSTNAME} (katerchen)" in headers[0][1]
    assert "\n" not in headers[0][1] and "\r" not in headers[0][1]
    assert headers[1:] == [["Subject", "second"], ["X-A", "b"]]


async def test_show_escapes_what_could_drive_the_terminal(
    queue: Queue, config: Config, start_server: StartServer
) -> None:
    (queue_id,) = await receive(
        start_server,
        config,
        (f"carol@{DOMAIN}", [f"alice@{DOMAIN}"], b"Subject: \x1b[2J\x1b]0;pwned\x07\r\n\r\nx\r\n"),
    )
    out = queue("show", queue_id).out
    assert "\x1b" not in out and "\x07" not in out
    assert "Subject: \\x1b[2J\\x1b]0;pwned\\x07\n" in out


def test_relay_messages_show_each_recipients_state(queue: Queue, config: Config) -> None:
    now = time.time()
    untried = write_relay(config, ("x@remote.example", "y@remote.example"))
    deferred = write_relay(
        config,
        ("bob@remote.example", "carol@remote.example"),
        state=[
            # Listed in another order than the envelope's: the envelope's order counts.
            RecipientState(
                "carol@remote.example",
                "sent",
                attempts=1,
                last_attempt=now - 3000,
                reply="250 2.0.0 ok",
                dsn_status="2.0.0",
                remote_mta="mx.remote.example",
            ),
            RecipientState(
                "bob@remote.example",
                "pending",
                attempts=2,
                next_attempt=now + 600,
                last_attempt=now - 60,
                reply="451 4.3.0 try later",
                dsn_status="4.3.0",
                remote_mta="mx.remote.example",
            ),
        ],
    )
    finished = write_relay(
        config,
        ("dave@remote.example",),
        state=[RecipientState("dave@remote.example", "failed", attempts=1)],
    )
    broken = write_relay(config, ("eve@remote.example",), state=b"{not json")

    by_id = {m["id"]: m for m in listed(queue("list", "--json"))}
    assert by_id[untried]["state"] == "relay"
    assert [r["status"] for r in by_id[untried]["recipients"]] == ["pending", "pending"]
    assert by_id[untried]["next_attempt"] is None
    assert by_id[untried]["sender"] == f"alice@{DOMAIN}"
    entry = by_id[deferred]
    assert (entry["queue"], entry["state"]) == ("relay", "deferred")
    assert entry["next_attempt"] == pytest.approx(now + 600)
    bob, carol = entry["recipients"]
    assert bob["status"] == "pending" and bob["attempts"] == 2
    assert bob["reply"] == "451 4.3.0 try later"
    assert carol["status"] == "sent" and carol["next_attempt"] is None
    assert by_id[finished]["state"] == "done"
    assert by_id[broken]["state"] == "relay"
    assert "relay state unreadable" in str(by_id[broken]["error"])

    table = queue("list").out
    row = next(line for line in table.splitlines() if line.startswith(deferred))
    assert "deferred" in row
    assert " in 9m " in row or " in 10m " in row
    assert row.endswith("<bob@remote.example>, <carol@remote.example> (sent)")

    shown = queue("show", deferred).out
    assert "to:        <bob@remote.example>  pending, 2 attempts, next in " in shown
    assert ", last reply: 451 4.3.0 try later\n" in shown
    assert "to:        <carol@remote.example>  sent, 1 attempt, last reply: 250 2.0.0 ok\n" in shown


def test_states_of_received_messages(config: Config) -> None:
    directories = config.directories
    directories.received.mkdir(parents=True)
    directories.incoming.mkdir(parents=True)
    queue_id = new_queue_id()
    envelope = Envelope(
        queue_id=queue_id,
        arrival=time.time(),
        client="192.0.2.7",
        helo="client.test",
        reverse_path="a@b.example",
        forward_paths=(f"alice@{DOMAIN}",),
        body="8BITMIME",
        smtputf8=False,
    )
    write_file(directories.incoming, directories.received, queue_id, (envelope.encode(), b"x"))
    (directories.received / "deadbeef").write_bytes(b"katerchen-envelope 9\nwhat\n\n")
    (directories.received / "not-a-queue-id.tmp").write_bytes(b"ignored")

    fresh, junk = queuecmd.list_queue(directories, scan_interval=60)
    assert (fresh.queue_id, fresh.state) == (queue_id, "received")
    assert (junk.queue_id, junk.state, junk.sender) == ("deadbeef", "undecodable", None)
    assert junk.size == len(b"katerchen-envelope 9\nwhat\n\n") and junk.error
    # In received/ for longer than a scan: a running server has tried it and deferred it.
    (later, _) = queuecmd.list_queue(directories, now=time.time() + 61, scan_interval=60)
    assert later.state == "deferred?"


# --- hold and release ----------------------------------------------------------------------------


async def test_hold_and_release_a_received_message(
    queue: Queue, config: Config, start_server: StartServer
) -> None:
    (queue_id,) = await receive(
        start_server, config, ("", [f"alice@{DOMAIN}"], b"Subject: wait\r\n\r\n.\r\n")
    )
    directories = config.directories
    held = directories.hold / "received" / queue_id
    before = (directories.received / queue_id).stat()

    result = queue("hold", queue_id)
    assert (result.code, result.out) == (0, f"held {queue_id}: {held}\n")
    assert not (directories.received / queue_id).exists()
    assert held.stat().st_ino == before.st_ino  # moved, not copied
    (entry,) = listed(queue("list", "--json"))
    assert (entry["queue"], entry["held_from"], entry["state"]) == ("hold", "received", "held")
    assert f"{queue_id}  hold/received  held" in queue("list").out
    assert "queue:     hold (from received)\n" in queue("show", queue_id).out

    again = queue("hold", queue_id)
    assert (again.code, again.out) == (0, f"{queue_id} is held already\n")

    result = queue("release", queue_id)
    assert (result.code, result.out) == (
        0,
        f"released {queue_id}: {directories.received / queue_id}\n",
    )
    assert (directories.received / queue_id).stat().st_ino == before.st_ino
    assert not held.exists()
    result = queue("release", queue_id)
    assert result.code == 1
    assert f"no held message {queue_id}" in result.err


def test_hold_and_release_a_relay_message_with_its_state(queue: Queue, config: Config) -> None:
    relay = config.directories.relay
    hold = config.directories.hold / "relay"
    queue_id = write_relay(
        config,
        ("bob@remote.example",),
        state=[RecipientState("bob@remote.example", attempts=1)],
    )
    assert queue("hold", queue_id).code == 0
    assert sorted(os.listdir(hold)) == [queue_id, f"{queue_id}.state"]
    assert os.listdir(relay) == []
    (entry,) = listed(queue("list", "--json"))
    assert (entry["queue"], entry["held_from"], entry["state"]) == ("hold", "relay", "held")
    assert entry["recipients"][0]["attempts"] == 1

    # The relayer was writing the state at the moment of the hold: the live one is newer.
    write_state(relay, queue_id, RecipientState("bob@remote.example", attempts=2))
    assert queue("release", queue_id).code == 0
    assert sorted(os.listdir(relay)) == [queue_id, f"{queue_id}.state"]
    assert os.listdir(hold) == []
    (entry,) = listed(queue("list", "--json"))
    assert entry["recipients"][0]["attempts"] == 2


def test_release_never_replaces_a_message_in_the_queue(queue: Queue, config: Config) -> None:
    queue_id = write_relay(config, ("bob@remote.example",))
    assert queue("hold", queue_id).code == 0
    impostor = config.directories.relay / queue_id
    impostor.write_bytes(b"another file of that name")
    result = queue("release", queue_id)
    assert result.code == 1
    assert "already in the queue" in result.err
    assert impostor.read_bytes() == b"another file of that name"
    assert (config.directories.hold / "relay" / queue_id).exists()


def test_hold_of_a_message_that_is_not_there(queue: Queue, config: Config) -> None:
    result = queue("hold", "0123456789abcdef0123")
    assert result.code == 1
    assert "no message 0123456789abcdef0123 in received/ or relay/" in result.err


async def test_a_held_message_waits_for_release_and_flush(
    queue: Queue, config: Config, start_server: StartServer, tmp_path: Path
) -> None:
    (queue_id,) = await receive(
        start_server, config, ("", [f"alice@{DOMAIN}"], b"Subject: held\r\n\r\nheld\r\n")
    )
    assert queue("hold", queue_id).code == 0
    # A server with delivery and signal handling (the way the command line runs it).
    server = await start_server(config, deliver=True, handle_signals=True)
    pidfile = tmp_path / "katerchen.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    new = tmp_path / "domains" / DOMAIN / "alice" / "new"

    # The delivery has scanned received/ (before its start returned): the held mail stayed.
    assert not new.exists() or list(new.iterdir()) == []
    assert (config.directories.hold / "received" / queue_id).exists()

    assert queue("release", queue_id).code == 0
    # scan_interval is a minute; the flush makes the delivery look now.
    flushed = queue("flush", "--pidfile", str(pidfile))
    assert flushed.code == 0, flushed.err
    assert f"signalled the server (pid {os.getpid()})" in flushed.out
    await wait_until(lambda: new.is_dir() and len(list(new.iterdir())) == 1)
    await wait_until(lambda: not (config.directories.received / queue_id).exists())
    await server.stop()


# --- delete --------------------------------------------------------------------------------------


async def test_delete_from_every_place(
    queue: Queue, config: Config, start_server: StartServer
) -> None:
    directories = config.directories
    received_id, held_id = await receive(
        start_server,
        config,
        ("", [f"alice@{DOMAIN}"], b"\r\n1\r\n"),
        ("", [f"bob@{DOMAIN}"], b"\r\n2\r\n"),
    )
    assert queue("hold", held_id).code == 0
    relay_id = write_relay(
        config, ("x@remote.example",), state=[RecipientState("x@remote.example")]
    )

    result = queue("delete", received_id)
    assert (result.code, result.out) == (0, f"deleted {directories.received / received_id}\n")
    result = queue("delete", relay_id)
    assert (result.code, result.out) == (0, f"deleted {directories.relay / relay_id}\n")
    assert os.listdir(directories.relay) == []  # the state went with it
    result = queue("delete", held_id)
    assert result.out == f"deleted {directories.hold / 'received' / held_id}\n"
    assert listed(queue("list", "--json")) == []

    result = queue("delete", received_id)
    assert result.code == 1
    assert f"no message {received_id} in the queue" in result.err


@pytest.mark.parametrize(
    "bad", ["../../secret", "a/b", "..", "", "x" * 65, "abc.state", "abc def", "ä"]
)
@pytest.mark.parametrize("command", ["show", "delete", "hold", "release"])
def test_a_string_that_is_not_a_queue_id_never_becomes_a_path(
    queue: Queue, config: Config, tmp_path: Path, command: str, bad: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("keep me")
    result = queue(command, bad)
    assert result.code == 2
    assert "is not a queue id" in result.err
    assert secret.read_text() == "keep me"


def test_symbolic_links_in_the_spool_are_not_followed(queue: Queue, config: Config) -> None:
    directories = config.directories
    directories.received.mkdir(parents=True)
    target = directories.received.parent / "outside"
    target.write_bytes(b"katerchen-envelope 1\n")
    (directories.received / "0123456789abcdef0123").symlink_to(target)
    assert listed(queue("list", "--json")) == []
    for command in ("show", "delete", "hold"):
        assert queue(command, "0123456789abcdef0123").code == 1
    assert target.read_bytes() == b"katerchen-envelope 1\n"
    assert (directories.received / "0123456789abcdef0123").is_symlink()


# --- flush ---------------------------------------------------------------------------------------


def test_flush_needs_a_pidfile(queue: Queue) -> None:
    result = queue("flush")
    assert result.code == 2
    assert "no pidfile: give --pidfile PATH, or set [server] pidfile" in result.err


def test_flush_without_a_server(queue: Queue, tmp_path: Path) -> None:
    pidfile = tmp_path / "katerchen.pid"
    result = queue("flush", "--pidfile", str(pidfile))
    assert result.code == 1
    assert f"no pidfile {pidfile}: is the server running?" in result.err

    pidfile.write_text("not a pid\n")
    result = queue("flush", "--pidfile", str(pidfile))
    assert result.code == 1
    assert "does not hold a process id" in result.err

    # A pid nobody has (pid_max is at most 2**22 on Linux).
    pidfile.write_text(f"{2**22 + 1}\n")
    result = queue("flush", "--pidfile", str(pidfile))
    assert result.code == 1
    assert "is the server running?" in result.err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_flush_refuses_a_stale_pidfile(queue: Queue, tmp_path: Path) -> None:
    # The pidfile is an hour older than the process that now has its pid: after a crash and
    # a reboot, SIGUSR1 would kill an innocent program.
    innocent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile = tmp_path / "katerchen.pid"
        pidfile.write_text(f"{innocent.pid}\n")
        an_hour_ago = time.time() - 3600
        os.utime(pidfile, (an_hour_ago, an_hour_ago))
        result = queue("flush", "--pidfile", str(pidfile))
        assert result.code == 1
        assert "stale pidfile" in result.err
        assert innocent.poll() is None  # not signalled
    finally:
        innocent.kill()
        innocent.wait()


# --- the command line ----------------------------------------------------------------------------


def test_help_of_every_queue_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "queue" in capsys.readouterr().out
    assert cli.main(["queue", "--help"]) == 0
    out = capsys.readouterr().out
    for command in ("list", "show", "flush", "delete", "hold", "release"):
        assert f"    {command} " in out, command
    assert "Exit status: 0 done, 1 not found" in out
    for command in ("list", "show", "flush", "delete", "hold", "release"):
        assert cli.main(["queue", command, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"usage: katerchen queue {command}" in out
        assert "--config" in out and "KATERCHEN_CONFIG" in out
    assert "--json" in (cli.main(["queue", "list", "--help"]), capsys.readouterr().out)[1]
    assert "--pidfile" in (cli.main(["queue", "flush", "--help"]), capsys.readouterr().out)[1]


def test_usage_and_config_errors_exit_2(
    queue: Queue, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["queue"]) == 2
    assert "a queue command is needed" in capsys.readouterr().err
    assert cli.main(["queue", "frobnicate"]) == 2
    assert cli.main(["queue", "show"]) == 2  # no ID
    capsys.readouterr()
    assert cli.main(["queue", "list", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[directories]\nhold = "spool/received"\n')
    assert cli.main(["queue", "list", "--config", str(bad)]) == 2
    assert "[directories] hold" in capsys.readouterr().err


async def test_queue_list_json_end_to_end(
    config_file: Path, config: Config, start_server: StartServer
) -> None:
    (queue_id,) = await receive(
        start_server, config, (f"carol@{DOMAIN}", [f"bob@{DOMAIN}"], b"Subject: e2e\r\n\r\n.\r\n")
    )

    def run() -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "KATERCHEN_CONFIG"}
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "katerchen",
                "queue",
                "list",
                "--json",
                "--config",
                str(config_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    with trio.fail_after(60):
        result = await trio.to_thread.run_sync(run)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)["messages"]
    assert entry["id"] == queue_id
    assert entry["recipients"][0]["to"] == f"bob@{DOMAIN}"


def test_the_state_file_name_is_the_relayers() -> None:
    assert queuecmd.STATE_SUFFIX == STATE_SUFFIX
