"""Crash safety: SIGKILL the server while several clients send; every message that got 250 is in
received/ or already in its Maildir, intact, nothing partial is anywhere, and a restart clears
incoming/ and delivers the rest, each message once.

The server is the real thing, ``python -m katerchen serve --config FILE``, in a subprocess.
The test is synchronous: the clients are threads with blocking sockets.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs

from katerchen.envelope import Envelope
from tests.conftest import HOSTNAME, TIMEOUT, config_toml

CLIENTS = 4
#: SIGKILL once this many messages were acknowledged (clients keep sending meanwhile).
KILL_AFTER = 60
QUEUED_RE = re.compile(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)")


class ServerProcess:
    """``python -m katerchen serve`` with its stderr read by a thread, so that the test can
    wait for a log line with a deadline."""

    def __init__(self, config_file: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "KATERCHEN_CONFIG"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "katerchen", "serve", "--config", str(config_file)],
            cwd=config_file.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} in:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"server exited before {pattern!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def port(self) -> int:
        return int(self.wait_for(r" listening addresses=127\.0\.0\.1:(\d+)").group(1))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)


@attrs.define
class Ledger:
    """What the clients sent and what was acknowledged, shared by the client threads."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    attempted: set[bytes] = attrs.field(factory=set)  # every message content ever sent
    acknowledged: dict[str, bytes] = attrs.field(factory=dict)  # queue id -> content
    enough: threading.Event = attrs.field(factory=threading.Event)

    def attempt(self, content: bytes) -> None:
        with self.lock:
            self.attempted.add(content)

    def acknowledge(self, queue_id: str, content: bytes) -> None:
        with self.lock:
            assert queue_id not in self.acknowledged
            self.acknowledged[queue_id] = content
            if len(self.acknowledged) >= KILL_AFTER:
                self.enough.set()


def message(client: int, number: int) -> bytes:
    """A unique message; every seventh one is over the spool's 256 KiB memory threshold."""
    lines = 40_000 if number % 7 == 3 else 5 + number % 50
    seed = hashlib.sha256(b"%d/%d" % (client, number)).hexdigest().encode()
    head = b"Subject: crash %d/%d\r\nMessage-ID: <%d.%d@crash.test>\r\n\r\n" % (
        client,
        number,
        client,
        number,
    )
    return head + b"".join(b"%s %d\r\n" % (seed, i) for i in range(lines))


def smtplib_client(port: int, client: int, ledger: Ledger) -> None:
    number = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
            smtp.ehlo(f"client{client}.test")
            while True:
                content = message(client, number)
                number += 1
                smtp.mail(f"sender{client}@crash.test")
                smtp.rcpt("alice@example.test")
                ledger.attempt(content)
                code, text = smtp.data(content)
                assert code == 250, (code, text)
                match = QUEUED_RE.match(text)
                assert match, text
                ledger.acknowledge(match.group(1).decode(), content)
    except (OSError, smtplib.SMTPException):
        return  # the server is gone


def bdat_client(port: int, ledger: Ledger) -> None:
    """Raw BDAT in chunks, the command and its chunk in one write."""
    number = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            reader = sock.makefile("rb")

            def reply() -> bytes:
                while True:
                    line = reader.readline()
                    if not line:
                        raise ConnectionError("closed")
                    if line[3:4] == b" ":
                        return line

            assert reply().startswith(b"220")
            sock.sendall(b"EHLO bdat.crash.test\r\n")
            assert reply().startswith(b"250")
            while True:
                content = message(99, number)
                number += 1
                sock.sendall(b"MAIL FROM:<bdat@crash.test>\r\nRCPT TO:<bob@example.test>\r\n")
                assert reply().startswith(b"250")
                assert reply().startswith(b"250")
                ledger.attempt(content)
                chunks = [content[i : i + 100_000] for i in range(0, len(content), 100_000)]
                for chunk in chunks[:-1]:
                    sock.sendall(b"BDAT %d\r\n" % len(chunk) + chunk)
                    assert reply().startswith(b"250")
                sock.sendall(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
                match = QUEUED_RE.search(reply())
                assert match
                ledger.acknowledge(match.group(1).decode(), content)
    except OSError:
        return


def stalled_client(
    port: int, in_flight: threading.Event, killed: threading.Event, ledger: Ledger
) -> None:
    """Sends most of a large message, then waits: certainly in flight at the kill."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
            smtp.ehlo("stalled.crash.test")
            smtp.mail("stalled@crash.test")
            smtp.rcpt("alice@example.test")
            code, _ = smtp.docmd("DATA")
            assert code == 354
            partial = b"Subject: stalled\r\n\r\n" + b"partial line\r\n" * 40_000
            ledger.attempt(partial)  # only to prove below that it is not there at all
            smtp.send(partial)
            in_flight.set()
            killed.wait(TIMEOUT)
            smtp.send(b".\r\n")
            smtp.getreply()
    except (OSError, smtplib.SMTPException):
        return


def test_sigkill_while_clients_send(tmp_path: Path) -> None:
    (tmp_path / "domains" / "example.test" / "alice").mkdir(parents=True)
    (tmp_path / "domains" / "example.test" / "bob").mkdir(parents=True)
    config_file = tmp_path / "katerchen.toml"
    config_file.write_text(config_toml(limits={"max_message_size": 10_000_000}))
    received = tmp_path / "spool" / "received"
    incoming = tmp_path / "spool" / "incoming"

    server = ServerProcess(config_file)
    try:
        port = server.port()
        ledger = Ledger()
        in_flight = threading.Event()
        killed = threading.Event()
        threads = [
            threading.Thread(target=smtplib_client, args=(port, i, ledger)) for i in range(CLIENTS)
        ]
        threads.append(threading.Thread(target=bdat_client, args=(port, ledger)))
        threads.append(
            threading.Thread(target=stalled_client, args=(port, in_flight, killed, ledger))
        )
        for thread in threads:
            thread.start()
        assert in_flight.wait(TIMEOUT)
        assert ledger.enough.wait(TIMEOUT), "the clients got too few messages through"
        server.proc.send_signal(signal.SIGKILL)
        server.kill()
        killed.set()
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
    finally:
        server.kill()

    stalled = b"Subject: stalled\r\n\r\n" + b"partial line\r\n" * 40_000
    maildirs = [tmp_path / "domains" / "example.test" / name for name in ("alice", "bob")]
    # Every acknowledged message is there, intact: still in received/, or already delivered.
    for queue_id, content in ledger.acknowledged.items():
        message = stored_message(received, maildirs, queue_id)
        assert message.endswith(content)
        assert message.startswith(b"Received: from ")
        assert f"by {HOSTNAME} (katerchen)".encode() in message[: len(message) - len(content)]
    # Nothing partial: every file decodes and holds one complete message that was sent.
    files = sorted(received.iterdir())
    delivered = [path for maildir in maildirs for path in maildir_files(maildir)]
    assert len(files) + len(delivered) >= len(ledger.acknowledged) >= KILL_AFTER
    for path in files:
        data = path.read_bytes()
        envelope, offset = Envelope.decode(data)
        assert envelope.queue_id == path.name
        check_complete(data[offset:], ledger, stalled, path.name)
    for path in delivered:
        check_complete(without_delivery_headers(path.read_bytes()), ledger, stalled, path.name)

    # A restart removes what was in flight from incoming/, and delivers what is in received/.
    restarted = ServerProcess(config_file)
    try:
        restarted.port()
        assert list(incoming.iterdir()) == []
        deadline = time.monotonic() + TIMEOUT
        while list(received.iterdir()):
            assert time.monotonic() < deadline, "received/ was not delivered after the restart"
            time.sleep(0.01)
        restarted.proc.send_signal(signal.SIGTERM)
        assert restarted.proc.wait(timeout=TIMEOUT) == 0
    finally:
        restarted.kill()
    for queue_id in ledger.acknowledged:
        copies = [p for m in maildirs for p in maildir_files(m) if f".K{queue_id}R" in p.name]
        assert len(copies) == 1, queue_id


def maildir_files(maildir: Path) -> list[Path]:
    return [
        path
        for sub in ("new", "cur")
        if (maildir / sub).is_dir()
        for path in (maildir / sub).iterdir()
    ]


def without_delivery_headers(data: bytes) -> bytes:
    """A delivered file without the Return-Path and Delivered-To lines delivery put on top."""
    assert data.startswith(b"Return-Path: <"), data[:40]
    return data.split(b"\r\n", 2)[2]


def stored_message(received: Path, maildirs: list[Path], queue_id: str) -> bytes:
    """The message (from the Received header on) with *queue_id*, wherever it is now."""
    path = received / queue_id
    if path.exists():
        data = path.read_bytes()
        envelope, offset = Envelope.decode(data)
        assert envelope.queue_id == queue_id
        return data[offset:]
    (copy,) = [p for m in maildirs for p in maildir_files(m) if f".K{queue_id}R" in p.name]
    return without_delivery_headers(copy.read_bytes())


def check_complete(message: bytes, ledger: Ledger, stalled: bytes, name: str) -> None:
    header_end = message.index(b"\r\n", message.index(b"; ")) + 2  # the Received date ends it
    content = message[header_end:]
    assert content in ledger.attempted, name
    assert content != stalled
