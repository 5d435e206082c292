"""The relay against scripted fake peers (tests/fakepeer.py): what reaches the next server, and
what each recipient ends as -- sent, deferred and retried, or failed with exactly one RFC 3464
bounce in the local sender's Maildir -- for the ways a remote server misbehaves: 4xx then
success, 5xx for one recipient, a drop in the middle of DATA, silence (timeouts), no 8BITMIME,
a SIZE that is too small.

A message enters as a local one (``client`` empty in the envelope: the server made it, so
delivery relays its remote recipients) placed in ``received/``; the real server delivers it into
``relay/`` and the relay task sends it along ``[relay.routes]`` to the fake peer.  Timeouts and
retry delays are a fraction of a second; nothing leaves 127.0.0.1.

This module also holds the helpers the other relay tests share (configs with a ``[relay]``
section, placing messages, reading the relay's log and its bounces).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from katerchen.config import Config
from katerchen.envelope import Envelope, received_header
from katerchen.spool import new_queue_id
from tests.conftest import (
    DOMAIN,
    HOSTNAME,
    Server,
    _toml_value,
    config_toml,
    log_lines,
    wait_until,
)
from tests.fakepeer import DEFAULT_EXTENSIONS, FakePeer, Script
from tests.test_delivery import parse_bounce, read_maildir, recipient_fields

StartServer = Callable[..., Awaitable[Server]]
StartPeer = Callable[..., Awaitable[FakePeer]]

# --- helpers shared by the relay tests -----------------------------------------------------------

#: The remote domain the tests relay to.
REMOTE = "remote.test"
SENDER = f"alice@{DOMAIN}"

#: A nameserver nobody answers at (nothing listens on the discard port): a test that routes
#: everything never asks DNS, and if it did, the question would stay on 127.0.0.1.
NO_DNS = "127.0.0.1:9"

#: Fast retries and short RFC 5321 timeouts: a silent peer costs a fraction of a second.
FAST_RELAY: Mapping[str, object] = {
    "retry_initial": 0.05,
    "retry_max": 0.2,
    "connect_timeout": 2,
    "greeting_timeout": 2,
    "command_timeout": 2,
    "data_start_timeout": 2,
    "data_block_timeout": 2,
    "data_end_timeout": 2,
}
#: No periodic scans: what happens is what a ring, a retry or the start-up scan made happen.
FAST_DELIVERY: Mapping[str, object] = {
    "scan_interval": 3600,
    "retry_initial": 0.05,
    "retry_max": 0.2,
}


def _table(name: str, keys: Mapping[str, object]) -> str:
    lines = [f"[{name}]"]
    lines += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in keys.items()]
    return "\n" + "\n".join(lines) + "\n"


def relay_toml(
    *,
    relay: Mapping[str, object] | None = None,
    routes: Mapping[str, str] | None = None,
    nameservers: Sequence[str] = (NO_DNS,),
    delivery: Mapping[str, object] | None = None,
) -> str:
    """The ``[delivery]``, ``[relay]``, ``[relay.routes]`` and ``[dns]`` tables: FAST_RELAY and
    FAST_DELIVERY overridden by *relay* and *delivery*."""
    text = _table("delivery", {**FAST_DELIVERY, **(delivery or {})})
    text += _table("relay", {**FAST_RELAY, **(relay or {})})
    text += _table("relay.routes", routes or {})
    text += _table("dns", {"nameservers": list(nameservers)})
    return text


def make_relay_config(
    root: Path,
    *,
    hostname: str = HOSTNAME,
    domains: Mapping[str, Sequence[str]] | None = None,
    server: Mapping[str, object] | None = None,
    relay: Mapping[str, object] | None = None,
    routes: Mapping[str, str] | None = None,
    nameservers: Sequence[str] = (NO_DNS,),
    delivery: Mapping[str, object] | None = None,
    extra: str = "",
) -> Config:
    """A server rooted in *root* (written to ``root/katerchen.toml`` too, for a subprocess),
    serving *domains* (default: example.test with alice and bob).  Without *nameservers* the
    relay's DNS is :data:`NO_DNS`: never the system's resolver, whose packets would leave
    127.0.0.1."""
    for domain, mailboxes in (domains or {DOMAIN: ("alice", "bob")}).items():
        for mailbox in mailboxes:
            (root / "domains" / domain / mailbox).mkdir(parents=True, exist_ok=True)
    text = config_toml(server={"hostname": hostname, **(server or {})})
    text += relay_toml(relay=relay, routes=routes, nameservers=nameservers, delivery=delivery)
    text += extra
    (root / "katerchen.toml").write_text(text)
    return Config.from_toml(text, base_dir=root)


def route_to(peer: FakePeer | Server | int, domain: str = REMOTE) -> dict[str, str]:
    """``[relay.routes]`` sending *domain* to a fake peer, a server or a port on 127.0.0.1."""
    port = peer if isinstance(peer, int) else peer.port
    return {domain: f"127.0.0.1:{port}"}


def place(
    config: Config,
    *,
    sender: str = SENDER,
    recipients: Sequence[str] = (f"carol@{REMOTE}",),
    content: bytes = b"Subject: relayed\r\nMessage-ID: <m@example.test>\r\n\r\nhello\r\n",
    body: str | None = "8BITMIME",
    smtputf8: bool = False,
    arrival: float | None = None,
    where: str = "received",
) -> str:
    """Put a message made on this host (empty ``client``: delivery relays its remote
    recipients) into ``received/`` -- or, with ``where="relay"``, straight into ``relay/`` as
    delivery would have written it; return its queue id.  Renamed in, never seen half-written."""
    queue_id = new_queue_id()
    envelope = Envelope(
        queue_id=queue_id,
        arrival=time.time() if arrival is None else arrival,
        client="",
        helo="",
        reverse_path=sender,
        forward_paths=tuple(recipients),
        body=body,
        smtputf8=smtputf8,
    )
    data = envelope.encode() + received_header(envelope, hostname=HOSTNAME, protocol="LOCAL")
    directory = config.directories.received if where == "received" else config.directories.relay
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory.parent / f"placing-{queue_id}"
    temporary.write_bytes(data + content)
    temporary.rename(directory / queue_id)
    return queue_id


def spool_files(config: Config, which: str = "relay") -> list[str]:
    return sorted(os.listdir(getattr(config.directories, which)))


_FIELD_RE = re.compile(r'(?:^|\s)([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def fields_of(line: str) -> dict[str, str]:
    """The ``key=value`` fields of a logfmt line, quoted values unescaped."""
    result = {}
    for key, value in _FIELD_RE.findall(line):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), value[1:-1])
        result[key] = value
    return result


def field(line: str, key: str) -> str:
    return fields_of(line)[key]


def relay_lines(caplog: pytest.LogCaptureFixture, **wanted: str) -> list[str]:
    """The ``relay`` log lines (one per recipient per attempt) with every field of *wanted*."""
    return [
        line
        for line in log_lines(caplog, "relay")
        if all(fields_of(line).get(key) == value for key, value in wanted.items())
    ]


def mailbox(config: Config, name: str = "alice", domain: str = DOMAIN) -> Path:
    return config.directories.domains / domain / name


async def relay_finished(config: Config) -> None:
    """Wait until ``relay/`` and ``received/`` are empty: every recipient sent or failed, and
    the bounces (if any) delivered."""
    await wait_until(
        lambda: not spool_files(config, "relay") and not spool_files(config, "received")
    )


async def bounces(
    config: Config, count: int = 1, name: str = "alice"
) -> list[email.message.Message]:
    """Wait for *count* messages in the Maildir of *name*; each must parse as an RFC 3464
    report (multipart/report; report-type=delivery-status)."""
    path = mailbox(config, name)
    await wait_until(lambda: len(read_maildir(path)) >= count)
    messages = read_maildir(path)
    assert len(messages) == count, [m[:300] for m in messages]
    for message in messages:
        assert message.startswith(b"Return-Path: <>\r\n"), message[:80]
    return [parse_bounce(message) for message in messages]


def report_fields(report: email.message.Message) -> dict[str, dict[str, str]]:
    """Final-Recipient (without "rfc822; ") -> that recipient's fields."""
    result = {}
    for group in recipient_fields(report):
        recipient = str(group["Final-Recipient"]).split(";", 1)[1].strip()
        result[recipient] = {key: str(value) for key, value in group.items()}
    return result


def relayed_content(data: bytes) -> bytes:
    """A message as a peer received it, without the Received headers the relay chain added."""
    while data.startswith(b"Received: "):
        end = 0
        while True:
            end = data.index(b"\r\n", end) + 2
            if data[end : end + 1] not in (b"\t", b" "):
                break
        data = data[end:]
    return data


def without(*names: str) -> tuple[str, ...]:
    """DEFAULT_EXTENSIONS without the keywords *names*."""
    return tuple(e for e in DEFAULT_EXTENSIONS if e.split(" ", 1)[0] not in names)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def relay_config(tmp_path: Path) -> Callable[..., Config]:
    """``relay_config(peer, relay={...}, ...)``: a config routing REMOTE to *peer*."""

    def make(
        peer: FakePeer | Server | int | None = None,
        *,
        relay: Mapping[str, object] | None = None,
        routes: Mapping[str, str] | None = None,
    ) -> Config:
        if routes is None and peer is not None:
            routes = route_to(peer)
        return make_relay_config(tmp_path, relay=relay, routes=routes)

    return make


async def start_relaying(start_server: StartServer, config: Config) -> Server:
    return await start_server(config, deliver=True)


# --- success -------------------------------------------------------------------------------------

DOTS = b"Subject: dots\r\nMessage-ID: <d@example.test>\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n"


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
async def test_message_reaches_the_route_byte_exact(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
    mail_log: pytest.LogCaptureFixture,
    chunking: bool,
) -> None:
    extensions = (*DEFAULT_EXTENSIONS, "CHUNKING") if chunking else DEFAULT_EXTENSIONS
    peer = await start_fake_peer(Script(extensions=extensions))
    config = relay_config(peer)
    recipients = (f"carol@{REMOTE}", f"dave@{REMOTE}")
    queue_id = place(config, recipients=recipients, content=DOTS)
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: peer.accepted)
    await relay_finished(config)

    (transaction,) = peer.accepted
    assert transaction.via == ("BDAT" if chunking else "DATA")
    assert transaction.mail_from == SENDER
    assert transaction.recipients == list(recipients)
    assert transaction.data is not None
    assert transaction.data.startswith(b"Received: ")
    assert relayed_content(transaction.data) == DOTS
    if not chunking:  # dot-stuffed on the wire, unstuffed by the peer
        assert b"\r\n...two\r\n" in transaction.raw
    assert peer.sessions[0].helo == HOSTNAME
    assert len(peer.sessions) == 1

    lines = relay_lines(mail_log, id=queue_id)
    assert len(lines) == 2
    for line, recipient in zip(lines, recipients, strict=True):
        assert f"to=<{recipient}>" in line
        assert f"via=127.0.0.1[127.0.0.1]:{peer.port}" in line
        assert " tls=no " in line
        assert " status=sent " in line
        assert 'reply="250 2.0.0 Ok: queued as FAKE"' in line
    # Logged once the files are gone, so maybe a moment after relay_finished saw that.
    await wait_until(
        lambda: any(f"id={queue_id}" in line for line in log_lines(mail_log, "relay-done"))
    )
    assert read_maildir(mailbox(config)) == []  # no bounce


async def test_queued_messages_share_connections_within_the_cap(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    # Five messages queued for one destination (found in relay/ at start), one connection
    # allowed to it: they all go through that one connection, one after the other.
    peer = await start_fake_peer()
    config = relay_config(peer, relay={"max_connections_per_destination": 1})
    contents = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(5)]
    for content in contents:
        place(config, content=content, where="relay")
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: len(peer.accepted) == 5)
    await relay_finished(config)
    assert sorted(relayed_content(t.data or b"") for t in peer.accepted) == sorted(contents)
    assert peer.max_active == 1
    (session,) = peer.sessions
    assert session.verbs().count("EHLO") == 1 and session.verbs().count("MAIL") == 5


async def test_connections_are_capped_in_total_and_per_destination(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    # Two destinations, four messages each; the peers take every message and then never
    # answer, so each connection stays busy with its first one.  At most two connections per
    # destination, three in all.
    first = await start_fake_peer(Script(hang_after="MESSAGE"))
    second = await start_fake_peer(Script(hang_after="MESSAGE"))
    config = relay_config(
        relay={"max_connections_per_destination": 2, "max_connections": 3, "data_end_timeout": 60},
        routes={**route_to(first, "one.test"), **route_to(second, "two.test")},
    )
    for i in range(4):
        place(config, recipients=(f"x{i}@one.test",), where="relay")
        place(config, recipients=(f"x{i}@two.test",), where="relay")
    await start_relaying(start_server, config)

    def hung() -> int:
        return sum(1 for peer in (first, second) for s in peer.sessions if s.hung)

    await wait_until(lambda: hung() == 3)
    # Quiet (every task waits: for a reply, or for a free connection), and no fourth one.
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    assert hung() == 3
    assert len(first.sessions) + len(second.sessions) == 3
    assert first.max_active <= 2 and second.max_active <= 2


# --- temporary failures: deferred, then sent -----------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        Script(replies={"MESSAGE": "451 4.3.0 Try again later"}),
        Script(replies={"MAIL": "451 4.7.1 Greylisted"}),
        Script(replies={"GREETING": "421 4.3.2 Too busy"}),
        Script(replies={"RCPT": "450 4.2.1 Mailbox busy"}),
    ],
    ids=["end-of-data", "MAIL", "greeting", "RCPT"],
)
async def test_4xx_then_success_on_the_next_connection(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
    mail_log: pytest.LogCaptureFixture,
    first: Script,
) -> None:
    peer = await start_fake_peer(first, Script())
    config = relay_config(peer)
    queue_id = place(config, recipients=(f"carol@{REMOTE}", f"dave@{REMOTE}"))
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: peer.accepted)
    await relay_finished(config)

    assert peer.delivered_to() == [f"carol@{REMOTE}", f"dave@{REMOTE}"]  # each exactly once
    assert len(peer.sessions) == 2
    for recipient in ("carol", "dave"):
        statuses = [
            field(line, "status") for line in relay_lines(mail_log, to=f"<{recipient}@{REMOTE}>")
        ]
        assert statuses == ["deferred", "sent"], statuses
    (deferred, _) = relay_lines(mail_log, to=f"<carol@{REMOTE}>")
    assert f"id={queue_id}" in deferred and " retry=" in deferred
    assert field(deferred, "reply").startswith("4")
    assert read_maildir(mailbox(config)) == []  # a delay is no bounce


async def test_4xx_for_one_recipient_retries_only_that_one(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
    mail_log: pytest.LogCaptureFixture,
) -> None:
    busy = f"dave@{REMOTE}"
    peer = await start_fake_peer(Script(rcpt={busy: "452 4.2.2 Mailbox full"}), Script())
    config = relay_config(peer)
    place(config, recipients=(f"carol@{REMOTE}", busy, f"erin@{REMOTE}"))
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: len(peer.accepted) == 2)
    await relay_finished(config)
    first, second = peer.accepted
    assert first.recipients == [f"carol@{REMOTE}", f"erin@{REMOTE}"]
    assert second.recipients == [busy]  # the retry is for dave alone
    assert [field(x, "status") for x in relay_lines(mail_log, to=f"<{busy}>")] == [
        "deferred",
        "sent",
    ]
    assert [field(x, "status") for x in relay_lines(mail_log, to=f"<carol@{REMOTE}>")] == ["sent"]
    assert read_maildir(mailbox(config)) == []


async def test_state_file_records_the_deferral(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    # A long retry delay keeps the message deferred, so its state can be read.
    peer = await start_fake_peer(Script(rcpt={f"dave@{REMOTE}": "451 4.3.0 Later"}))
    config = relay_config(peer, relay={"retry_initial": 3600, "retry_max": 3600})
    queue_id = place(config, recipients=(f"carol@{REMOTE}", f"dave@{REMOTE}"))
    before = time.time()
    await start_relaying(start_server, config)
    state_file = config.directories.relay / f"{queue_id}.state"
    await peer.wait_for(lambda: peer.accepted)
    await wait_until(state_file.exists)

    def read_state() -> dict[str, dict[str, object]]:
        state = json.loads(state_file.read_text())
        assert state["format"] == "katerchen-relay-state" and state["id"] == queue_id
        return {r["to"]: r for r in state["recipients"]}

    await wait_until(lambda: read_state()[f"dave@{REMOTE}"]["attempts"] == 1)
    recipients = read_state()
    carol, dave = recipients[f"carol@{REMOTE}"], recipients[f"dave@{REMOTE}"]
    assert carol["status"] == "sent" and carol["attempts"] == 1
    assert dave["status"] == "pending"
    assert dave["reply"] == "451 4.3.0 Later" and dave["dsn_status"] == "4.3.0"
    next_attempt = dave["next_attempt"]
    assert isinstance(next_attempt, float | int)
    assert before + 3600 <= next_attempt <= time.time() + 3600
    assert spool_files(config) == [queue_id, f"{queue_id}.state"]


# --- permanent failures: one bounce --------------------------------------------------------------


async def test_5xx_for_one_recipient_bounces_that_one(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
    mail_log: pytest.LogCaptureFixture,
) -> None:
    gone = f"gone@{REMOTE}"
    peer = await start_fake_peer(Script(rcpt={gone: "550 5.1.1 No such user here"}))
    config = relay_config(peer)
    queue_id = place(config, recipients=(f"carol@{REMOTE}", gone, f"dave@{REMOTE}"))
    await start_relaying(start_server, config)
    (report,) = await bounces(config)
    await relay_finished(config)

    (transaction,) = peer.accepted
    assert transaction.recipients == [f"carol@{REMOTE}", f"dave@{REMOTE}"]
    assert len(peer.sessions) == 1  # a 5xx is not retried
    assert report["To"] == f"<{SENDER}>"
    fields = report_fields(report)
    assert list(fields) == [gone]
    assert fields[gone]["Action"] == "failed"
    assert fields[gone]["Status"] == "5.1.1"
    assert "550 5.1.1 No such user here" in fields[gone]["Diagnostic-Code"]
    (line,) = relay_lines(mail_log, to=f"<{gone}>")
    assert field(line, "status") == "bounced" and f"id={queue_id}" in line
    assert [field(x, "status") for x in relay_lines(mail_log, id=queue_id)].count("sent") == 2
    (dsn_line,) = log_lines(mail_log, "relay-dsn")
    assert f"id={queue_id}" in dsn_line and "kind=failed" in dsn_line


async def test_5xx_to_mail_bounces_every_recipient_in_one_report(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    peer = await start_fake_peer(Script(replies={"MAIL": "550 5.7.1 Sender rejected"}))
    config = relay_config(peer)
    recipients = (f"carol@{REMOTE}", f"dave@{REMOTE}")
    place(config, recipients=recipients)
    await start_relaying(start_server, config)
    (report,) = await bounces(config)
    await relay_finished(config)
    fields = report_fields(report)
    assert sorted(fields) == sorted(recipients)
    for recipient in recipients:
        assert fields[recipient]["Action"] == "failed"
        assert fields[recipient]["Status"] == "5.7.1"
    assert peer.accepted == []


async def test_5xx_after_data_bounces_the_accepted_recipients(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    gone = f"gone@{REMOTE}"
    peer = await start_fake_peer(
        Script(rcpt={gone: "550 5.1.1 No"}, replies={"MESSAGE": "554 5.6.0 Content rejected"})
    )
    config = relay_config(peer)
    place(config, recipients=(f"carol@{REMOTE}", gone))
    await start_relaying(start_server, config)
    (report,) = await bounces(config)
    await relay_finished(config)
    fields = report_fields(report)
    assert fields[gone]["Status"] == "5.1.1"
    assert fields[f"carol@{REMOTE}"]["Status"] == "5.6.0"
    assert len(peer.sessions) == 1


async def test_null_sender_is_never_bounced(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
    mail_log: pytest.LogCaptureFixture,
) -> None:
    peer = await start_fake_peer(Script(rcpt={f"carol@{REMOTE}": "550 5.1.1 No"}))
    config = relay_config(peer)
    queue_id = place(config, sender="")
    await start_relaying(start_server, config)
    await wait_until(lambda: relay_lines(mail_log, status="bounced"))
    await relay_finished(config)
    assert peer.sessions[0].transactions[0].mail_from == ""
    assert log_lines(mail_log, "relay-dsn") == []
    for name in ("alice", "bob"):
        assert read_maildir(mailbox(config, name)) == []
    # Logged once the files are gone, so maybe a moment after relay_finished saw that.
    await wait_until(
        lambda: any(f"id={queue_id}" in line for line in log_lines(mail_log, "relay-done"))
    )


# --- broken connections: deferred, then sent -----------------------------------------------------

LARGE = b"Subject: large\r\nMessage-ID: <l@example.test>\r\n\r\n" + b"0123456789" * 10 + b"\r\n"
LARGE = LARGE + (b"x" * 998 + b"\r\n") * 200  # ~200 KB: the drop lands well inside it


async def test_drop_in_the_middle_of_data_is_retried(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
    mail_log: pytest.LogCaptureFixture,
) -> None:
    peer = await start_fake_peer(Script(drop_after=50_000), Script())
    config = relay_config(peer)
    place(config, content=LARGE)
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: peer.accepted)
    await relay_finished(config)
    first, _ = peer.sessions
    assert first.dropped and first.transactions[0].data is None
    (transaction,) = peer.accepted
    assert relayed_content(transaction.data or b"") == LARGE
    statuses = [field(x, "status") for x in relay_lines(mail_log, to=f"<carol@{REMOTE}>")]
    assert statuses == ["deferred", "sent"]
    assert read_maildir(mailbox(config)) == []


@pytest.mark.parametrize("hang_after", ["GREETING", "EHLO", "MAIL", "DATA", "MESSAGE"])
async def test_peer_that_never_answers_times_out_and_is_retried(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
    mail_log: pytest.LogCaptureFixture,
    hang_after: str,
) -> None:
    timeouts = {
        "greeting_timeout": 0.3,
        "command_timeout": 0.3,
        "data_start_timeout": 0.3,
        "data_block_timeout": 0.3,
        "data_end_timeout": 0.3,
    }
    peer = await start_fake_peer(Script(hang_after=hang_after), Script())
    config = relay_config(peer, relay=timeouts)
    place(config)
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: peer.accepted)
    await relay_finished(config)
    first = peer.sessions[0]
    assert first.hung
    await peer.wait_for(lambda: first.closed)  # the relay gave up on it and closed it
    statuses = [field(x, "status") for x in relay_lines(mail_log, to=f"<carol@{REMOTE}>")]
    assert statuses == ["deferred", "sent"]
    assert len(peer.accepted) == 1
    assert read_maildir(mailbox(config)) == []


# --- what the peer cannot take -------------------------------------------------------------------

EIGHT_BIT_BODY = (
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <8@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    b".a line with a dot\r\n"
)


async def test_8bit_body_to_a_peer_without_8bitmime_goes_as_quoted_printable(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    peer = await start_fake_peer(Script(extensions=without("8BITMIME")))
    config = relay_config(peer)
    place(config, content=EIGHT_BIT_BODY, body="8BITMIME")
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: peer.accepted)
    await relay_finished(config)
    (transaction,) = peer.accepted
    assert transaction.parameters.get("BODY", "7BIT").upper() == "7BIT"
    data = transaction.data
    assert data is not None and data.isascii()
    converted = email.message_from_bytes(relayed_content(data), policy=email.policy.default)
    assert converted["Content-Transfer-Encoding"].lower() == "quoted-printable"
    assert converted["Message-ID"] == "<8@example.test>"
    payload = converted.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.replace(b"\n", b"\r\n").replace(b"\r\r", b"\r") == (
        b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n.a line with a dot\r\n"
    )
    assert read_maildir(mailbox(config)) == []


async def test_8bit_body_to_a_peer_with_8bitmime_goes_unchanged(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    peer = await start_fake_peer()
    config = relay_config(peer)
    place(config, content=EIGHT_BIT_BODY, body="8BITMIME")
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: peer.accepted)
    (transaction,) = peer.accepted
    assert transaction.parameters["BODY"].upper() == "8BITMIME"
    assert relayed_content(transaction.data or b"") == EIGHT_BIT_BODY


async def test_8bit_headers_to_a_peer_without_8bitmime_bounce(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    # Raw UTF-8 in a header cannot be made 7-bit by the body's transfer encoding: it would
    # need SMTPUTF8, which this peer (an old one: no 8BITMIME either) lacks.
    peer = await start_fake_peer(Script(extensions=without("8BITMIME", "SMTPUTF8")))
    config = relay_config(peer)
    content = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nMessage-ID: <h@example.test>\r\n\r\nhi \xc3\xa4\r\n"
    place(config, content=content, body="8BITMIME")
    await start_relaying(start_server, config)
    (report,) = await bounces(config)
    await relay_finished(config)
    fields = report_fields(report)
    assert fields[f"carol@{REMOTE}"]["Action"] == "failed"
    assert fields[f"carol@{REMOTE}"]["Status"] == "5.6.3"
    assert peer.accepted == []
    assert all(t.data is None for t in peer.transactions)


async def test_smtputf8_message_to_a_peer_without_smtputf8_bounces(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    peer = await start_fake_peer(Script(extensions=without("SMTPUTF8")))
    config = relay_config(peer)
    recipient = f"j\u00f6rg@{REMOTE}"
    place(config, recipients=(recipient,), smtputf8=True, body="8BITMIME")
    await start_relaying(start_server, config)
    (report,) = await bounces(config)
    await relay_finished(config)
    (fields,) = report_fields(report).values()
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.6.7"
    assert peer.accepted == []


async def test_message_larger_than_the_peers_size_bounces(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
    mail_log: pytest.LogCaptureFixture,
) -> None:
    peer = await start_fake_peer(Script(extensions=(*without("SIZE"), "SIZE 10000")))
    config = relay_config(peer)
    recipients = (f"carol@{REMOTE}", f"dave@{REMOTE}")
    queue_id = place(config, recipients=recipients, content=LARGE)
    await start_relaying(start_server, config)
    (report,) = await bounces(config)
    await relay_finished(config)
    fields = report_fields(report)
    assert sorted(fields) == sorted(recipients)
    for recipient in recipients:
        assert fields[recipient]["Action"] == "failed"
        assert fields[recipient]["Status"] == "5.3.4"
    # Not retried, and the message itself never went out.
    assert len(peer.sessions) == 1
    assert all(t.data is None and not t.raw for t in peer.transactions)
    assert [field(x, "status") for x in relay_lines(mail_log, id=queue_id)] == ["bounced"] * 2


async def test_size_parameter_states_the_message_size(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    relay_config: Callable[..., Config],
) -> None:
    peer = await start_fake_peer()
    config = relay_config(peer)
    place(config, content=LARGE)
    await start_relaying(start_server, config)
    await peer.wait_for(lambda: peer.accepted)
    (transaction,) = peer.accepted
    size = int(transaction.parameters["SIZE"])
    assert transaction.data is not None
    # SIZE= is an estimate (RFC 1870 allows a little slack), never smaller than the message.
    assert len(transaction.data) <= size <= len(transaction.data) + 1024
