"""The relay's TLS and smarthost, against fake peers with trustme certificates: STARTTLS whenever
offered (opportunistic: any certificate), a smarthost with ``smarthost_tls = "required"`` that
verifies the certificate against ``ca_file`` and its host name, AUTH only inside TLS, and never
the message or the password in the clear when TLS is required.

The smarthost's host name comes from the test DNS server (tests/dnsserver.py), so that the
certificate is checked for a name, as it would be for a real one.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trustme

from katerchen.config import Config
from tests.conftest import Server, wait_until
from tests.dnsserver import DnsServer, start_dns_server
from tests.fakepeer import FakePeer, Script
from tests.test_relay_peers import (
    REMOTE,
    field,
    make_relay_config,
    place,
    relay_finished,
    relay_lines,
    relayed_content,
    route_to,
    spool_files,
)

StartServer = Callable[..., Awaitable[Server]]
StartPeer = Callable[..., Awaitable[FakePeer]]

SMARTHOST = "smarthost.test"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
async def dns(nursery: trio.Nursery) -> DnsServer:
    return await start_dns_server(nursery, {SMARTHOST: {"A": ["127.0.0.1"]}})


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


async def test_starttls_is_used_whenever_offered(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    ca: trustme.CA,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    # Opportunistic: the certificate is for some other name and from a CA nobody trusts.
    peer = await start_fake_peer(Script(), ssl_context=server_context(ca, "unrelated.example"))
    config = make_relay_config(tmp_path, routes=route_to(peer))
    content = b"Subject: secret\r\n\r\nover TLS\r\n"
    place(config, content=content)
    await start_server(config, deliver=True)
    await peer.wait_for(lambda: peer.accepted)
    await relay_finished(config)
    (session,) = peer.sessions
    assert session.tls
    assert session.verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert relayed_content(peer.accepted[0].data or b"") == content
    (line,) = relay_lines(mail_log, to=f"<carol@{REMOTE}>")
    assert field(line, "tls") == "yes" and field(line, "status") == "sent"


async def test_failed_opportunistic_handshake_falls_back_to_plaintext(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    # A server context without any certificate: every handshake fails (RFC 7435: then the
    # same server in the clear).
    broken = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    peer = await start_fake_peer(Script(), ssl_context=broken)
    config = make_relay_config(tmp_path, routes=route_to(peer))
    place(config)
    await start_server(config, deliver=True)
    await peer.wait_for(lambda: peer.accepted)
    await relay_finished(config)
    first, second = peer.sessions
    assert first.tls_failed and first.transactions == []
    assert not second.tls and peer.accepted[0] is second.transactions[-1]
    (line,) = relay_lines(mail_log, to=f"<carol@{REMOTE}>", status="sent")
    assert field(line, "tls") == "no"
    assert [x for x in mail_log.messages if x.startswith("relay-tls-fallback ")]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_smarthost_with_verified_tls_and_auth(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    ca: trustme.CA,
    dns: DnsServer,
    mail_log: pytest.LogCaptureFixture,
    mechanism: str,
) -> None:
    script = Script(auth={"relay@example.test": "s3cret pass"}, auth_mechanisms=(mechanism,))
    peer = await start_fake_peer(script, ssl_context=server_context(ca, SMARTHOST))
    config = make_relay_config(
        tmp_path,
        relay={
            "smarthost": f"{SMARTHOST}:{peer.port}",
            "smarthost_user": "relay@example.test",
            "smarthost_password": "s3cret pass",
            "smarthost_tls": "required",
            "ca_file": str(write_ca(ca, tmp_path / "ca.pem")),
        },
        nameservers=[dns.nameserver],
    )
    # Mail for any remote domain goes to the smarthost (no MX lookup for it).
    place(config, recipients=("someone@far.example", f"carol@{REMOTE}"))
    await start_server(config, deliver=True)
    await peer.wait_for(lambda: peer.accepted)
    await relay_finished(config)
    assert peer.delivered_to() == ["someone@far.example", f"carol@{REMOTE}"]
    (session,) = peer.sessions
    assert session.tls
    assert session.auth is not None
    assert session.auth == (mechanism, "relay@example.test", "s3cret pass")
    verbs = session.verbs()
    assert verbs.index("STARTTLS") < verbs.index("AUTH") < verbs.index("MAIL")
    assert (SMARTHOST, "MX") not in dns.zone.queries
    assert not [q for q in dns.zone.queries if q[0] in ("far.example", REMOTE)]
    for line in relay_lines(mail_log, status="sent"):
        assert field(line, "tls") == "yes"
        assert field(line, "via").startswith(f"{SMARTHOST}[127.0.0.1]:{peer.port}")
    assert not any("s3cret" in line for line in mail_log.messages)


async def test_required_tls_with_an_unverifiable_certificate_never_sends(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    ca: trustme.CA,
    dns: DnsServer,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    # Signed by a CA the relay does not trust: deferred, and not a byte of the message or
    # the password goes out, with or without TLS.
    stranger = trustme.CA()
    peer = await start_fake_peer(
        Script(auth={"relay@example.test": "pw"}),
        ssl_context=server_context(stranger, SMARTHOST),
    )
    config = make_relay_config(
        tmp_path,
        relay={
            "smarthost": f"{SMARTHOST}:{peer.port}",
            "smarthost_user": "relay@example.test",
            "smarthost_password": "pw",
            "smarthost_tls": "required",
            "ca_file": str(write_ca(ca, tmp_path / "ca.pem")),
            "retry_initial": 3600,
            "retry_max": 3600,
        },
        nameservers=[dns.nameserver],
    )
    queue_id = place(config)
    await start_server(config, deliver=True)
    await wait_until(lambda: relay_lines(mail_log, status="deferred"))
    assert all(session.auth is None for session in peer.sessions)
    assert all(verb != "MAIL" for session in peer.sessions for verb in session.verbs())
    assert peer.transactions == []
    assert queue_id in spool_files(config)


async def test_required_tls_without_starttls_never_sends(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    ca: trustme.CA,
    dns: DnsServer,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    peer = await start_fake_peer(Script(auth={"relay@example.test": "pw"}, auth_requires_tls=False))
    config = make_relay_config(
        tmp_path,
        relay={
            "smarthost": f"{SMARTHOST}:{peer.port}",
            "smarthost_user": "relay@example.test",
            "smarthost_password": "pw",
            "smarthost_tls": "required",
            "ca_file": str(write_ca(ca, tmp_path / "ca.pem")),
            "retry_initial": 3600,
            "retry_max": 3600,
        },
        nameservers=[dns.nameserver],
    )
    place(config)
    await start_server(config, deliver=True)
    await wait_until(lambda: relay_lines(mail_log, status="deferred"))
    line = relay_lines(mail_log, status="deferred")[0]
    assert field(line, "tls") == "no"
    assert all(session.auth is None for session in peer.sessions)
    assert peer.transactions == []


async def test_password_is_never_sent_in_the_clear(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    # Opportunistic smarthost without STARTTLS that offers AUTH in the clear: the relay does
    # not authenticate (credentials go only over TLS); this peer then takes the mail anyway.
    peer = await start_fake_peer(Script(auth={"relay@example.test": "pw"}, auth_requires_tls=False))
    config = make_relay_config(
        tmp_path,
        relay={
            "smarthost": f"127.0.0.1:{peer.port}",
            "smarthost_user": "relay@example.test",
            "smarthost_password": "pw",
        },
    )
    place(config)
    await start_server(config, deliver=True)
    await wait_until(lambda: relay_lines(mail_log))
    assert all("AUTH" not in session.verbs() for session in peer.sessions)
    assert all(session.auth is None for session in peer.sessions)


def test_config_has_the_tls_keys(tmp_path: Path, ca: trustme.CA) -> None:
    config: Config = make_relay_config(
        tmp_path,
        relay={
            "smarthost": f"{SMARTHOST}:2525",
            "smarthost_tls": "required",
            "ca_file": str(write_ca(ca, tmp_path / "ca.pem")),
        },
    )
    assert config.relay.smarthost == (SMARTHOST, 2525)
    assert config.relay.smarthost_tls == "required"
    assert config.relay.ca_file == tmp_path / "ca.pem"
