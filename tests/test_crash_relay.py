"""Crash safety of the relay: SIGKILL the relaying server in the middle of a batch, again and
again, restart it on the same tree; when a last run has emptied ``relay/``, every recipient of
every message reached the next server, none is lost, and a recipient got a second copy only
from an attempt that was in flight at a kill -- the last message of a connection still open then,
which the peer had taken but whose result the relay had not yet written down.

The relaying server is the real thing, ``python -m katerchen serve --config FILE``, in a
subprocess; the next server is a recording fake peer (tests/fakepeer.py) in the test's own trio
run, so that the test knows exactly which connection carried which copy, and kills the server
at the very moment the peer has acknowledged a message (the widest window for a duplicate).
The kill points are random but seeded: the seed is in the assertion messages.
"""

from __future__ import annotations

import json
import random
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from katerchen.config import Config
from tests.conftest import TIMEOUT, in_thread
from tests.fakepeer import DEFAULT_EXTENSIONS, FakePeer, Script, Session, Transaction
from tests.test_crash_delivery import ServerProcess
from tests.test_delivery import read_maildir
from tests.test_relay_peers import (
    REMOTE,
    mailbox,
    make_relay_config,
    place,
    spool_files,
)

StartPeer = Callable[..., Awaitable[FakePeer]]

SEED = 11
MESSAGES = 40
ROUNDS = 3
CONNECTIONS = 4  # max_connections_per_destination: at most this many attempts in flight
OTHER = "other.test"
MESSAGE_ID_RE = re.compile(rb"\r\nMessage-ID: <([^>]+)>\r\n")


def make_message(number: int, rng: random.Random) -> tuple[bytes, tuple[str, ...]]:
    recipients = [f"r{number}@{REMOTE}"]
    if number % 2:
        recipients.append(f"s{number}@{OTHER}")
    if number % 3 == 0:
        recipients.append(f"t{number}@{REMOTE}")
    lines = 5_000 if number % 7 == 3 else 2 + number  # some large ones: kills inside DATA
    body = b"".join(b"line %d of message %d\r\n" % (i, number) for i in range(lines))
    head = b"Subject: relay crash %d\r\nMessage-ID: <%d@crash.test>\r\n\r\n" % (number, number)
    rng.shuffle(recipients)
    return head + body, tuple(recipients)


async def test_sigkill_during_a_relay_batch_loses_nothing(
    start_fake_peer: StartPeer, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    peer = await start_fake_peer(Script(extensions=(*DEFAULT_EXTENSIONS, "CHUNKING")))
    route = f"127.0.0.1:{peer.port}"
    config = make_relay_config(
        tmp_path,
        routes={REMOTE: route, OTHER: route},
        relay={"max_connections_per_destination": CONNECTIONS, "max_connections": CONNECTIONS},
        delivery={"scan_interval": 0.5},
    )
    config_file = tmp_path / "katerchen.toml"
    sent: dict[str, tuple[bytes, tuple[str, ...]]] = {}  # Message-ID -> content, recipients
    queue_ids: dict[str, str] = {}  # Message-ID -> queue id
    for number in range(MESSAGES):
        content, recipients = make_message(number, rng)
        message_id = f"{number}@crash.test"
        queue_ids[message_id] = place(config, recipients=recipients, content=content)
        sent[message_id] = (content, recipients)
    total = sum(len(recipients) for _, recipients in sent.values())

    # The copies a kill may duplicate: taken by the peer on a connection still open at the
    # kill, and not yet written down by the relay (its state file, read once the server is
    # dead, does not say "sent").  Transactions by identity.
    in_flight: set[int] = set()
    logs: list[str] = []
    for round_ in range(ROUNDS):
        target = len(peer.accepted) + rng.randint(3, 10)
        server = ServerProcess(config_file)
        try:

            def reached(target: int = target) -> bool:
                return len(peer.accepted) >= target

            await peer.wait_for(reached, within=TIMEOUT * 3)
            server.proc.send_signal(signal.SIGKILL)  # at once: no checkpoint in between
            open_at_kill = [session for session in peer.sessions if not session.closed]
        finally:
            await in_thread(server.kill)
        logs += server.lines

        def over(sessions: list[Session] = open_at_kill) -> bool:
            return all(session.closed for session in sessions)

        # What the relay wrote before it died may still wait, unread, in the peer's socket
        # buffers -- a whole pipelined transaction (RSET, MAIL, RCPT, BDAT n LAST and the
        # message), or the end of one: the peer takes it after the kill.  Only once the peer
        # has read each of those connections to its end is it known what they carried.
        await peer.wait_for(over)
        for session in open_at_kill:
            unrecorded = [
                transaction
                for transaction in session.transactions
                if transaction.accepted and not recorded(config, transaction, queue_ids)
            ]
            # The relay writes a result down before it starts the next transaction on the
            # connection: only the last one can be taken but not written down.
            assert all(t is session.transactions[-1] for t in unrecorded), (
                f"round {round_}: session {session.number} has taken transactions the relay "
                f"did not write down before going on (seed {SEED})"
            )
            in_flight.update(id(transaction) for transaction in unrecorded)
        assert len(delivered(peer)) < total, (
            f"round {round_}: everything went out before the kill (seed {SEED})"
        )

    # A last run, with nobody killing it, finishes the queue.
    server = ServerProcess(config_file)
    try:
        await wait_until_empty(config)
        assert await in_thread(server.stop) == 0
    finally:
        await in_thread(server.kill)
    logs += server.lines
    assert not [line for line in logs if "internal-error" in line], logs

    copies: dict[tuple[str, str], list[Transaction]] = {}
    for transaction in peer.accepted:
        assert transaction.data is not None
        message_id = message_id_of(transaction)
        content, recipients = sent[message_id]
        assert transaction.data.endswith(content), f"{message_id}: altered (seed {SEED})"
        assert transaction.mail_from == "alice@example.test"
        for recipient in transaction.recipients:
            assert recipient in recipients, f"{message_id} to {recipient} (seed {SEED})"
            copies.setdefault((message_id, recipient), []).append(transaction)

    # None lost: every recipient of every message got it.
    lost = [
        (message_id, recipient)
        for message_id, (_, recipients) in sent.items()
        for recipient in recipients
        if (message_id, recipient) not in copies
    ]
    assert not lost, f"lost (seed {SEED}): {lost}"
    # Duplicates only from attempts in flight at a kill: every copy but the last was one.
    for key, transactions in copies.items():
        for earlier in transactions[:-1]:
            assert id(earlier) in in_flight, f"{key} duplicated, not in flight (seed {SEED})"
    extra = sum(len(t) - 1 for t in copies.values())
    assert extra <= ROUNDS * CONNECTIONS * 3, extra  # at most one message per connection
    # Nothing bounced (every peer reply was 250), nothing left behind.
    assert read_maildir(mailbox(config)) == []
    assert spool_files(config) == [] and spool_files(config, "received") == []


def message_id_of(transaction: Transaction) -> str:
    match = MESSAGE_ID_RE.search(transaction.data or b"")
    assert match, (transaction.data or b"")[:200]
    return match.group(1).decode()


def delivered(peer: FakePeer) -> set[tuple[str, str]]:
    """(Message-ID, recipient) of every copy the peer took."""
    return {(message_id_of(t), r) for t in peer.accepted for r in t.recipients}


def recorded(config: Config, transaction: Transaction, queue_ids: dict[str, str]) -> bool:
    """Whether the relay's files say the recipients of *transaction* were sent: the message
    left relay/, or its state file marks each of them "sent"."""
    queue_id = queue_ids[message_id_of(transaction)]
    relay_dir = config.directories.relay
    if not (relay_dir / queue_id).exists():
        return True
    try:
        state = json.loads((relay_dir / f"{queue_id}.state").read_text())
    except FileNotFoundError:
        return False
    status = {r["to"]: r["status"] for r in state["recipients"]}
    return all(status.get(recipient) == "sent" for recipient in transaction.recipients)


async def wait_until_empty(config: Config) -> None:
    """Until relay/ and received/ are empty (the restarted server finished the queue)."""
    with trio.fail_after(TIMEOUT * 3):
        while spool_files(config) or spool_files(config, "received"):
            await trio.sleep(0.02)
