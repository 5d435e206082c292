"""Never an open relay: with a ``[relay] trusted_networks`` that is not empty but does not contain
the client (127.0.0.1), every open-relay trick of the Receiver issue still gets 550 5.7.1 (or the
5.1.1 of a local part that is not ours), whether the client speaks raw SMTP, smtplib or swaks.
The same config with the client's network in it relays, so the refusals are the list's doing,
not a relay that never works.
"""

from __future__ import annotations

import smtplib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from katerchen.config import Config
from tests.conftest import HOSTNAME, RawClient, Server, in_thread, wait_until
from tests.fakepeer import FakePeer
from tests.test_receiver_clients import run_swaks, swaks
from tests.test_relay_peers import make_relay_config, route_to, spool_files

StartServer = Callable[..., Awaitable[Server]]

#: Networks near 127.0.0.1 that do not contain it, and the IPv6 loopback.
NOT_THE_CLIENT = ["10.0.0.0/8", "127.0.0.2/32", "127.0.1.0/24", "192.0.2.0/24", "::1/128"]

#: The Receiver issue's open-relay tricks (tests/test_receiver.py) and their refusals.
TRICKS = [
    ("<alice%elsewhere.example@example.test>", "550 5.1.1"),
    ('<"alice@elsewhere.example"@example.test>', "550 5.1.1"),
    ("<alice!elsewhere.example@example.test>", "550 5.1.1"),
    ("<@example.test:alice@elsewhere.example>", "550 5.7.1"),
    ("<@example.test,@mx.example.test:alice@elsewhere.example>", "550 5.7.1"),
    ("<alice@elsewhere.example>", "550 5.7.1"),
    ("<postmaster@elsewhere.example>", "550 5.7.1"),
    ("<alice@example.test.elsewhere.example>", "550 5.7.1"),
    ("<alice@[127.0.0.1]>", "550 5.7.1"),
    ("<alice@[IPv6:::1]>", "550 5.7.1"),
]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_relay_config(tmp_path, relay={"trusted_networks": NOT_THE_CLIENT})


@pytest.fixture
async def server(start_server: StartServer, config: Config) -> Server:
    # With delivery and the relay running: nothing may leave through either.
    return await start_server(config, deliver=True)


def test_the_config_really_has_trusted_networks(config: Config) -> None:
    assert len(config.relay.trusted_networks) == len(NOT_THE_CLIENT)
    assert not config.relay.trusts("127.0.0.1")
    assert config.relay.trusts("10.1.2.3")


@pytest.mark.parametrize(("path", "reply"), TRICKS)
async def test_open_relay_tricks_refused(server: Server, path: str, reply: str) -> None:
    client: RawClient = await server.connect()
    try:
        await client.dialog(f"""
            s: 220 {HOSTNAME}
            c: EHLO client.test
            c: MAIL FROM:<a@client.test>
            c: RCPT TO:{path}
            c: DATA
            s: 250
            s: 250 2.1.0
            s: {reply}
            s: 503 5.5.1
            c: QUIT
            s: 221
        """)
    finally:
        await client.aclose()
    assert server.received() == []
    assert server.incoming() == []
    assert spool_files(server.config) == []


async def test_smtplib_relay_refused(server: Server) -> None:
    def session() -> smtplib.SMTPRecipientsRefused:
        with server.smtp() as smtp:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
                smtp.sendmail("alice@example.test", ["victim@elsewhere.example"], b"S: x\r\n\r\n")
            return info.value

    refused = await in_thread(session)
    code, text = refused.recipients["victim@elsewhere.example"]
    assert code == 550 and text.startswith(b"5.7.1")
    assert server.received() == []


@swaks
async def test_swaks_relay_refused(server: Server) -> None:
    result = await run_swaks(server, "--to", "victim@elsewhere.example", "--from", "x@y.test")
    assert result.returncode != 0
    assert "550 5.7.1" in result.stdout.decode()
    assert server.received() == []


async def test_a_trusted_client_may_relay(
    start_server: StartServer, start_fake_peer: Callable[..., Awaitable[FakePeer]], tmp_path: Path
) -> None:
    # The positive control: the same list plus the client's own network.
    peer = await start_fake_peer()
    config = make_relay_config(
        tmp_path,
        relay={"trusted_networks": [*NOT_THE_CLIENT, "127.0.0.0/8"]},
        routes=route_to(peer, "elsewhere.example"),
    )
    server = await start_server(config, deliver=True)

    def session() -> dict[str, tuple[int, bytes]]:
        with server.smtp() as smtp:
            return smtp.sendmail(
                "alice@example.test", ["victim@elsewhere.example"], b"Subject: x\r\n\r\n"
            )

    assert await in_thread(session) == {}
    await peer.wait_for(lambda: peer.accepted)
    assert peer.delivered_to() == ["victim@elsewhere.example"]
    await wait_until(lambda: spool_files(config) == [])
