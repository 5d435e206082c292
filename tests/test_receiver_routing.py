"""RCPT routing through real sockets: aliases, catch-all, sub-addresses, postmaster and loops,
as a client sees them (the policy itself is tested as tables in test_routing.py)."""

from __future__ import annotations

import functools
from pathlib import Path

import attrs
import pytest
import trio

from katerchen.config import Config, DeliveryConfig
from katerchen.receiver import RCPT_REFUSALS, Receiver
from katerchen.routing import Route
from katerchen.spool import Spool

from .conftest import (
    DOMAIN,
    HOSTNAME,
    TIMEOUT,
    MakeConfig,
    RawClient,
    StartServer,
    StoredMessage,
    log_lines,
)

ALIASES = """\
# example.test's aliases
info: alice
Sales: alice, BOB
team: sales, info, bob@example.test   # alice and bob, once each
forward: friend@elsewhere.example
loop: loop2
loop2: loop
deep: loop, alice
partial: nobody, bob
dead: nobody
*: bob
"""


def test_every_refusal_has_its_reply() -> None:
    for route in Route:
        reply = RCPT_REFUSALS[route]
        assert (reply.code, reply.enhanced) == (550, route.status)


def aliases_path(config: Config, domain: str = DOMAIN) -> Path:
    return config.directories.domains / domain / "aliases"


@pytest.fixture
def routed_config(make_config: MakeConfig) -> Config:
    """The test config, with example.test's aliases file and a second domain."""
    config = make_config()
    aliases_path(config).write_text(ALIASES)
    (config.directories.domains / "other.test" / "carol").mkdir(parents=True)
    return config


async def rcpt_replies(client: RawClient, *paths: str) -> list[str]:
    """Send one transaction's RCPTs (pipelined) and return "code enhanced" per recipient."""
    lines = ["EHLO client.test", "MAIL FROM:<a@client.test>"]
    lines += [f"RCPT TO:{path}" for path in paths]
    await client.send("".join(line + "\r\n" for line in lines))
    await client.expect("250")
    await client.expect("250 2.1.0")
    replies = [await client.read_reply() for _ in paths]
    await client.dialog("""
        c: RSET
        s: 250 2.0.0
    """)
    return [f"{reply.code} {reply.enhanced}" for reply in replies]


async def connect(start_server: StartServer, config: Config) -> RawClient:
    server = await start_server(config)
    client = await server.connect()
    await client.expect(f"220 {HOSTNAME}")
    return client


@pytest.mark.parametrize(
    "path",
    [
        "<info@example.test>",
        "<INFO@Example.Test>",
        "<sales@example.test>",
        "<team@example.test>",
        "<forward@example.test>",  # a forward configured by the administrator: no open relay
        "<partial@example.test>",  # one target leads nowhere, the other is delivered
        "<nobody@example.test>",  # the catch-all
        "<whoever+tag@example.test>",
        "<alice+tag@example.test>",
        "<Alice+Tag@EXAMPLE.TEST>",
        "<info+tag@example.test>",  # sub-address of an alias
        "<postmaster@example.test>",
        "<postmaster+tag@example.test>",
        "<postmaster>",
        "<PostMaster>",
        "<carol@other.test>",
        "<postmaster@other.test>",
    ],
)
async def test_routed_recipients_accepted(
    start_server: StartServer, routed_config: Config, path: str
) -> None:
    client = await connect(start_server, routed_config)
    assert await rcpt_replies(client, path) == ["250 2.1.5"]


@pytest.mark.parametrize(
    ("path", "reply"),
    [
        ("<loop@example.test>", "550 5.4.6"),
        ("<LOOP2@example.test>", "550 5.4.6"),
        ("<deep@example.test>", "550 5.4.6"),  # a loop anywhere refuses the whole recipient
        ("<loop+tag@example.test>", "550 5.4.6"),
        ("<dead@example.test>", "550 5.1.1"),  # an alias that leads nowhere
        ("<nobody@other.test>", "550 5.1.1"),  # no catch-all there
        ("<friend@elsewhere.example>", "550 5.7.1"),  # the forward target itself is not ours
        ('<"../alice"@example.test>', "550 5.1.3"),
    ],
)
async def test_refusals(
    start_server: StartServer, routed_config: Config, path: str, reply: str
) -> None:
    client = await connect(start_server, routed_config)
    assert await rcpt_replies(client, path) == [reply]


async def test_loop_refused_with_its_reason(
    start_server: StartServer, routed_config: Config, mail_log: pytest.LogCaptureFixture
) -> None:
    client = await connect(start_server, routed_config)
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<loop@example.test>
        c: RCPT TO:<info@example.test>
        c: DATA
        s: 250
        s: 250 2.1.0
        s: 550 5.4.6 Error: alias loop
        s: 250 2.1.5
        s: 354
        c: Subject: hi
        c:
        c: .
        s: 250 2.0.0 Ok: queued as
    """)
    (reject,) = log_lines(mail_log, "reject")
    assert "verb=RCPT code=550" in reject
    assert "alias loop" in reject
    # (Only the receiver's line: it names the client.)
    (queued,) = [line for line in log_lines(mail_log, "queued") if "ip=127.0.0.1" in line]
    assert "nrcpt=1" in queued


async def test_alias_file_changes_are_picked_up(
    start_server: StartServer, routed_config: Config
) -> None:
    client = await connect(start_server, routed_config)
    assert await rcpt_replies(client, "<new@example.test>", "<info@example.test>") == [
        "250 2.1.5",  # the catch-all, for now
        "250 2.1.5",
    ]
    # No catch-all any more, a new alias, and info gone: the next transaction sees it all.
    # Replaced by rename, as editors and scripts do.
    aliases = aliases_path(routed_config)
    replacement = aliases.with_name("aliases.tmp")
    replacement.write_text("new: alice\nloop: alice\n")
    replacement.rename(aliases)
    replies = await rcpt_replies(
        client, "<new@example.test>", "<info@example.test>", "<loop@example.test>"
    )
    assert replies == ["250 2.1.5", "550 5.1.1", "250 2.1.5"]
    # And without an aliases file, only mailboxes (and postmaster) are left.
    aliases.unlink()
    replies = await rcpt_replies(client, "<new@example.test>", "<postmaster@example.test>")
    assert replies == ["550 5.1.1", "250 2.1.5"]


async def test_malformed_alias_lines_do_not_stop_the_domain(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    aliases_path(config).write_bytes(
        b"info: alice\nthis is not an alias\npipe: |/bin/sh\nbad: caf\xe9\nsales: bob\n"
    )
    client = await connect(start_server, config)
    for _ in range(2):
        replies = await rcpt_replies(
            client,
            "<info@example.test>",
            "<sales@example.test>",
            "<alice@example.test>",
            "<pipe@example.test>",
        )
        assert replies == ["250 2.1.5", "250 2.1.5", "250 2.1.5", "550 5.1.1"]
    # One warning per bad line, once for this version of the file.
    warnings = log_lines(mail_log, "aliases-error")
    assert len(warnings) == 3, warnings


async def test_unreadable_aliases_is_a_temporary_failure(
    start_server: StartServer, make_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    aliases = aliases_path(config)
    aliases.symlink_to(aliases)  # reading it fails with ELOOP, even for root
    client = await connect(start_server, config)
    assert await rcpt_replies(client, "<info@example.test>", "<alice@example.test>") == [
        "451 4.3.0",
        "451 4.3.0",
    ]
    errors = log_lines(mail_log, "routing-error")
    assert len(errors) == 2
    assert "ip=127.0.0.1" in errors[0]
    # Fixed: the same session goes on.
    aliases.unlink()
    aliases.write_text("info: alice\n")
    assert await rcpt_replies(client, "<info@example.test>") == ["250 2.1.5"]


def with_delivery(config: Config, **changes: object) -> Config:
    return attrs.evolve(config, delivery=attrs.evolve(DeliveryConfig(), **changes))


@pytest.mark.parametrize(
    ("changes", "path", "reply"),
    [
        ({"recipient_delimiter": "-"}, "<alice-tag@example.test>", "250 2.1.5"),
        ({"recipient_delimiter": "-"}, "<alice+tag@example.test>", "550 5.1.1"),
        ({"recipient_delimiter": ""}, "<alice+tag@example.test>", "550 5.1.1"),
        ({"postmaster": "alice@example.test"}, "<postmaster@example.test>", "250 2.1.5"),
        ({"postmaster": "alice@example.test"}, "<postmaster>", "250 2.1.5"),
        # Gone since the config check: postmaster is still accepted.
        ({"postmaster": "gone@example.test"}, "<postmaster@example.test>", "250 2.1.5"),
        ({"postmaster": "gone@example.test"}, "<postmaster>", "250 2.1.5"),
    ],
)
async def test_delivery_settings(
    start_server: StartServer,
    make_config: MakeConfig,
    changes: dict[str, object],
    path: str,
    reply: str,
) -> None:
    client = await connect(start_server, with_delivery(make_config(), **changes))
    assert await rcpt_replies(client, path) == [reply]


async def test_postmaster_accepted_without_any_mailbox_or_alias(
    start_server: StartServer, make_config: MakeConfig
) -> None:
    config = make_config()
    (config.directories.domains / "empty.test").mkdir()
    client = await connect(start_server, config)
    assert (
        await rcpt_replies(
            client, "<postmaster@empty.test>", "<postmaster@example.test>", "<postmaster>"
        )
        == ["250 2.1.5"] * 3
    )
    # Accepting creates nothing: delivery makes the postmaster Maildir when it needs it.
    assert not (config.directories.domains / "empty.test" / "postmaster").exists()


# --- what the receiver stores -------------------------------------------------------------------


@pytest.fixture
async def receiver_port(nursery: trio.Nursery, routed_config: Config) -> int:
    """A bare Receiver on a real socket (its port), without the app's delivery task: the spool
    files stay where the receiver put them, to be read.  pytest-trio's nursery fixture is
    cancelled when the test ends."""
    spool = Spool(
        incoming=routed_config.directories.incoming,
        received=routed_config.directories.received,
        relay=routed_config.directories.relay,
    )
    spool.prepare()
    receiver = Receiver(routed_config, spool)

    async def handle(stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        await receiver.handle_connection(stream, (str(peer[0]), int(peer[1])))

    listeners: list[trio.SocketListener] = await nursery.start(
        functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_envelope_keeps_the_original_recipients(
    receiver_port: int, routed_config: Config
) -> None:
    with trio.fail_after(TIMEOUT):
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", receiver_port))
    await client.expect(f"220 {HOSTNAME}")
    await client.dialog("""
        c: EHLO client.test
        c: MAIL FROM:<a@client.test>
        c: RCPT TO:<Info@Example.Test>
        c: RCPT TO:<alice+tag@example.test>
        c: RCPT TO:<nobody@example.test>
        c: RCPT TO:<PostMaster>
        c: RCPT TO:<loop@example.test>
        c: RCPT TO:<forward@example.test>
        c: DATA
        s: 250
        s: 250 2.1.0
        s: 250 2.1.5
        s: 250 2.1.5
        s: 250 2.1.5
        s: 250 2.1.5
        s: 550 5.4.6
        s: 250 2.1.5
        s: 354
        c: Subject: hi
        c:
        c: .
        s: 250 2.0.0 Ok: queued as
    """)
    await client.aclose()
    (path,) = sorted(routed_config.directories.received.iterdir())
    stored = StoredMessage.read(path)
    # As sent, not as routed: delivery resolves them again against the tree as it is then.
    assert stored.envelope.forward_paths == (
        "Info@Example.Test",
        "alice+tag@example.test",
        "nobody@example.test",
        "PostMaster",
        "forward@example.test",
    )
