"""Exactly-once delivery across crashes: SIGKILL the server at random moments while several
clients send and delivery runs, restart it on the same tree, again and again; when a last restart
has emptied received/, every message that got its 250 is in each of its Maildirs exactly once,
and nothing partial is in any new/.

The server is the real thing, ``python -m katerchen serve --config FILE``, in a subprocess; the
clients are threads with smtplib.  The moments are random but seeded, so a failure can be
replayed: the seed is in the assertion messages.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs

from tests.conftest import DOMAIN, TIMEOUT, config_toml

SEED = 3
ROUNDS = 3  # kill and restart this many times while mail flows
CLIENTS = 4
MAILBOXES = ("alice", "bob", "carol")
ALIASES = "# test aliases\nteam: alice, bob\nali: alice\n"
#: Recipient lists the clients cycle through, and the mailboxes each must reach: two
#: recipients; an alias that names a mailbox also given directly (one copy); an alias that
#: expands to two mailboxes plus a third; sub-addressing.
KINDS: tuple[tuple[tuple[str, ...], frozenset[str]], ...] = (
    (("alice",), frozenset({"alice"})),
    (("alice", "bob"), frozenset({"alice", "bob"})),
    (("ali", "alice"), frozenset({"alice"})),
    (("team", "carol"), frozenset({"alice", "bob", "carol"})),
    (("carol+news",), frozenset({"carol"})),
)
QUEUED_RE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)")
MESSAGE_ID_RE = re.compile(rb"\r\nMessage-ID: <([^>]+)>\r\n")


class ServerProcess:
    """``python -m katerchen serve`` with its stderr collected by a thread."""

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
        self._collected = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def port(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no listening line:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError("server exited before listening:\n" + "\n".join(self.lines))
            self.lines.append(line)
            match = re.search(r" listening addresses=127\.0\.0\.1:(\d+)", line)
            if match:
                return int(match.group(1))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT)
        self._collect()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=TIMEOUT)
        self._collect()
        return status

    def _collect(self) -> None:
        """After exit: the rest of the log, for the check that nothing crashed."""
        if self._collected:
            return
        self._reader.join(TIMEOUT)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        self._collected = True


@attrs.frozen
class Sent:
    content: bytes
    mailboxes: frozenset[str]


@attrs.define
class Ledger:
    """What the clients sent and what was acknowledged, shared by the client threads."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    attempted: dict[str, Sent] = attrs.field(factory=dict)  # Message-ID -> what was sent
    acknowledged: dict[str, str] = attrs.field(factory=dict)  # Message-ID -> queue id
    acks: int = 0
    kill_at: int = 0
    kill_now: threading.Event = attrs.field(factory=threading.Event)
    errors: list[BaseException] = attrs.field(factory=list)  # anything but the server vanishing

    def arm(self, acks_from_now: int) -> None:
        with self.lock:
            self.kill_at = self.acks + acks_from_now
            self.kill_now.clear()

    def attempt(self, message_id: str, sent: Sent) -> None:
        with self.lock:
            self.attempted[message_id] = sent

    def acknowledge(self, message_id: str, queue_id: str) -> None:
        with self.lock:
            self.acknowledged[message_id] = queue_id
            self.acks += 1
            if self.acks >= self.kill_at:
                self.kill_now.set()


def message(message_id: str, number: int) -> bytes:
    """A unique message; every ninth is large, so that the kill can land inside its copy."""
    lines = 20_000 if number % 9 == 4 else 3 + number % 40
    seed = hashlib.sha256(message_id.encode()).hexdigest().encode()
    head = b"Subject: delivery crash %s\r\nMessage-ID: <%s>\r\n\r\n" % (
        message_id.encode(),
        message_id.encode(),
    )
    return head + b"".join(b"%s %d\r\n" % (seed, i) for i in range(lines))


def client(port: int, round_: int, number: int, ledger: Ledger) -> None:
    sent = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
            smtp.ehlo(f"client{number}.test")
            while True:
                recipients, mailboxes = KINDS[(number + sent) % len(KINDS)]
                message_id = f"{round_}.{number}.{sent}@crash.test"
                content = message(message_id, sent)
                sent += 1
                smtp.mail(f"sender{number}@crash.test")
                for rcpt in recipients:
                    code, text = smtp.rcpt(f"{rcpt}@{DOMAIN}")
                    assert code == 250, (rcpt, code, text)
                ledger.attempt(message_id, Sent(content, mailboxes))
                code, text = smtp.data(content)
                assert code == 250, (code, text)
                match = QUEUED_RE.match(text.decode())
                assert match, text
                ledger.acknowledge(message_id, match.group(1))
    except (OSError, smtplib.SMTPServerDisconnected):
        return  # the server is gone
    except Exception as exc:  # a refusal: report it instead of a mere "too few messages"
        with ledger.lock:
            ledger.errors.append(exc)
        ledger.kill_now.set()


def mail_round(config_file: Path, round_: int, kill_after: int, ledger: Ledger) -> list[str]:
    """Start a server on the tree, let the clients send, SIGKILL it after *kill_after* more
    acknowledgements; returns its log."""
    server = ServerProcess(config_file)
    try:
        port = server.port()
        ledger.arm(kill_after)
        threads = [
            threading.Thread(target=client, args=(port, round_, number, ledger))
            for number in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        assert ledger.kill_now.wait(TIMEOUT), "the clients got too few messages through"
        server.kill()
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
        assert not ledger.errors, repr(ledger.errors[0])
    finally:
        server.kill()
    return server.lines


def test_sigkill_during_delivery_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    for name in MAILBOXES:
        (tmp_path / "domains" / DOMAIN / name).mkdir(parents=True)
    (tmp_path / "domains" / DOMAIN / "aliases").write_text(ALIASES)
    config_file = tmp_path / "katerchen.toml"
    config_file.write_text(config_toml(limits={"max_message_size": 10_000_000}))
    received = tmp_path / "spool" / "received"
    relay = tmp_path / "spool" / "relay"

    ledger = Ledger()
    logs: list[str] = []
    for round_ in range(ROUNDS):
        logs += mail_round(config_file, round_, rng.randint(5, 40), ledger)
    assert len(ledger.acknowledged) >= ROUNDS * 5

    # A last restart, with nobody sending, delivers whatever the kills left in received/.
    server = ServerProcess(config_file)
    try:
        server.port()
        deadline = time.monotonic() + TIMEOUT
        while any(received.iterdir()):
            assert time.monotonic() < deadline, f"received/ not emptied (seed {SEED})"
            time.sleep(0.01)
        assert server.stop() == 0
    finally:
        server.kill()
    logs += server.lines
    assert not [line for line in logs if "internal-error" in line]
    assert list(relay.iterdir()) == [], "nothing here is remote, so nothing may be relayed"

    # Every file in every new/ is one whole message that a client sent, for that mailbox.
    copies: dict[tuple[str, str], list[Path]] = {}
    for name in MAILBOXES:
        for path in sorted((tmp_path / "domains" / DOMAIN / name / "new").iterdir()):
            data = path.read_bytes()
            match = MESSAGE_ID_RE.search(data)
            assert match, f"{path.name}: no Message-ID (seed {SEED})"
            message_id = match.group(1).decode()
            sent = ledger.attempted[message_id]
            head = b"Return-Path: <sender%s@crash.test>\r\nDelivered-To: %s@%s\r\n" % (
                message_id.split(".")[1].encode(),
                name.encode(),
                DOMAIN.encode(),
            )
            assert data.startswith(head + b"Received: from "), path.name
            assert data.endswith(sent.content), f"{path.name}: partial (seed {SEED})"
            assert name in sent.mailboxes, f"{message_id} in {name} (seed {SEED})"
            copies.setdefault((message_id, name), []).append(path)

    # Nothing twice, acknowledged or not (a kill between commit and 250 may leave a message
    # delivered that its client never heard about: it is there once, never twice).
    duplicates = {key: paths for key, paths in copies.items() if len(paths) > 1}
    assert not duplicates, f"duplicated (seed {SEED}): {duplicates}"
    # Every acknowledged message reached each of its mailboxes, under its queue id's name.
    for message_id, queue_id in ledger.acknowledged.items():
        for name in ledger.attempted[message_id].mailboxes:
            paths = copies.get((message_id, name))
            assert paths, f"{message_id} (id {queue_id}) lost for {name} (seed {SEED})"
            assert f"K{queue_id}" in paths[0].name
