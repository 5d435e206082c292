"""Two katerchen instances on 127.0.0.1: A accepts mail from a trusted network (127.0.0.0/8) for
a domain it does not serve and relays it -- along ``[relay.routes]``, or by the MX records a test
DNS server on 127.0.0.1 gives, or through B as a verified-TLS smarthost -- to B, which serves
that domain and delivers into its Maildir.  B has a trustme certificate, so the hop is STARTTLS.

Both run in the test's process (app.run in the test nursery), each in its own tree under
tmp_path, and both log into the same capture; only A relays, so every ``relay`` line is A's.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import re
import smtplib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from tests.conftest import DOMAIN, HOSTNAME, Server, in_thread, log_lines, wait_until
from tests.dnsserver import DnsServer, start_dns_server
from tests.fakepeer import FakePeer
from tests.test_delivery import read_maildir
from tests.test_relay_peers import (
    NO_DNS,
    REMOTE,
    SENDER,
    bounces,
    field,
    make_relay_config,
    relay_finished,
    relay_lines,
    report_fields,
    route_to,
    spool_files,
)

StartServer = Callable[..., Awaitable[Server]]
StartPeer = Callable[..., Awaitable[FakePeer]]

B_HOSTNAME = f"mx.{REMOTE}"
CONTENT = (
    b"Subject: from A to B\r\n"
    b"Message-ID: <two@example.test>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe\r\n"
    b".a dot line\r\n"
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_section(ca: trustme.CA, root: Path, *names: str) -> str:
    """A ``[tls]`` table with a trustme certificate for *names* written under *root*."""
    root.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert(*names)
    certificate = root / "cert.pem"
    certificate.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    key = root / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    return f'\n[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n'


async def start_b(
    start_server: StartServer, tmp_path: Path, ca: trustme.CA, *, tls: bool = True
) -> Server:
    """B: serves remote.test (carol, dave), with a certificate for mx.remote.test."""
    root = tmp_path / "b"
    config = make_relay_config(
        root,
        hostname=B_HOSTNAME,
        domains={REMOTE: ("carol", "dave")},
        extra=tls_section(ca, root, B_HOSTNAME) if tls else "",
    )
    return await start_server(config, deliver=True)


async def start_a(
    start_server: StartServer,
    tmp_path: Path,
    *,
    relay: Mapping[str, object] | None = None,
    routes: Mapping[str, str] | None = None,
    nameservers: Sequence[str] = (NO_DNS,),
) -> Server:
    """A: serves example.test and lets 127.0.0.0/8 relay (unless *relay* says otherwise)."""
    config = make_relay_config(
        tmp_path / "a",
        relay={"trusted_networks": ["127.0.0.0/8"], **(relay or {})},
        routes=routes,
        nameservers=nameservers,
    )
    return await start_server(config, deliver=True)


def send(server: Server, recipients: list[str], content: bytes = CONTENT) -> None:
    """BLOCKING: a client on 127.0.0.1 (trusted by A) sends one message with smtplib."""
    with server.smtp() as smtp:
        smtp.ehlo("client.test")
        refused = smtp.sendmail(SENDER, recipients, content, ["BODY=8BITMIME"])
        assert refused == {}


def mailbox(server: Server, name: str) -> Path:
    return server.config.directories.domains / REMOTE / name


async def delivered_at(server: Server, name: str, count: int = 1) -> list[bytes]:
    path = mailbox(server, name)
    await wait_until(lambda: len(read_maildir(path)) >= count)
    messages = read_maildir(path)
    assert len(messages) == count
    return messages


def received_headers(message: bytes) -> list[str]:
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    return [" ".join(str(value).split()) for value in parsed.get_all("Received", [])]


def check_delivered_at_b(message: bytes, recipient: str) -> None:
    assert message.startswith(
        b"Return-Path: <%s>\r\nDelivered-To: %s\r\n" % (SENDER.encode(), recipient.encode())
    )
    assert message.endswith(CONTENT)
    at_b, at_a = received_headers(message)[:2]
    assert at_b.startswith(f"from {HOSTNAME} ([127.0.0.1])")  # A's EHLO name, at B
    assert f"by {B_HOSTNAME} (katerchen)" in at_b
    assert at_a.startswith("from client.test")  # the client's hop at A


async def test_relay_along_a_route_with_starttls(
    start_server: StartServer, tmp_path: Path, ca: trustme.CA, mail_log: pytest.LogCaptureFixture
) -> None:
    b = await start_b(start_server, tmp_path, ca)
    a = await start_a(start_server, tmp_path, routes=route_to(b))
    await in_thread(send, a, [f"carol@{REMOTE}", f"dave@{REMOTE}"])
    for name in ("carol", "dave"):
        (message,) = await delivered_at(b, name)
        check_delivered_at_b(message, f"{name}@{REMOTE}")
        # TLS on the hop from A to B (RFC 3848: ESMTPS, plus the cipher in a comment).
        assert "ESMTPS" in received_headers(message)[0]
    await relay_finished(a.config)
    lines = relay_lines(mail_log, status="sent")
    assert len(lines) == 2
    for line in lines:
        assert field(line, "tls") == "yes"
        assert field(line, "via") == f"127.0.0.1[127.0.0.1]:{b.port}"
    # Nothing bounced back to alice, nothing left anywhere.  B removes its copy from
    # received/ only once it is in every mailbox: a moment after the last one showed it.
    assert read_maildir(a.config.directories.domains / DOMAIN / "alice") == []
    await relay_finished(b.config)
    assert spool_files(b.config, "received") == [] and spool_files(b.config) == []


@attrs.define(eq=False)
class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that records what clients send through it (in the clear: only
    useful without TLS), to see the commands one katerchen sends another."""

    target: int  # the port on 127.0.0.1 it forwards to
    port: int = 0
    sent: bytearray = attrs.field(factory=bytearray)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listener.socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, nursery.cancel_scope, True)
            nursery.start_soon(self._pump, server, client, nursery.cancel_scope, False)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        scope: trio.CancelScope,
        record: bool,
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some():
                if record:
                    self.sent += data
                await sink.send_all(data)
        scope.cancel()  # one side closed: so does the other


async def test_bdat_between_instances(
    start_server: StartServer, nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    # katerchen offers CHUNKING, so A sends the message with BDAT (no TLS on this hop, so
    # that the proxy can read the commands).
    b = await start_b(start_server, tmp_path, ca, tls=False)
    proxy = RecordingProxy(b.port)
    await nursery.start(proxy.serve)
    a = await start_a(start_server, tmp_path, routes=route_to(proxy.port))
    await in_thread(send, a, [f"carol@{REMOTE}"])
    (message,) = await delivered_at(b, "carol")
    check_delivered_at_b(message, f"carol@{REMOTE}")
    await relay_finished(a.config)
    commands = bytes(proxy.sent)
    assert re.search(rb"\r\nBDAT \d+ LAST\r\n", commands), commands[:500]
    assert b"\r\nDATA\r\n" not in commands
    assert b"BODY=8BITMIME" in commands


async def test_relay_by_mx_from_the_test_dns_server(
    start_server: StartServer,
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: trustme.CA,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    b = await start_b(start_server, tmp_path, ca)
    dns: DnsServer = await start_dns_server(
        nursery,
        {
            # The preferred MX has no address at all: the relay goes on to the next one.
            REMOTE: {"MX": [f"10 gone.{REMOTE}.", f"20 {B_HOSTNAME}."]},
            B_HOSTNAME: {"A": ["127.0.0.1"]},
        },
    )
    a = await start_a(
        start_server, tmp_path, relay={"mx_port": b.port}, nameservers=[dns.nameserver]
    )
    await in_thread(send, a, [f"carol@{REMOTE}"])
    (message,) = await delivered_at(b, "carol")
    check_delivered_at_b(message, f"carol@{REMOTE}")
    await relay_finished(a.config)
    assert (REMOTE, "MX") in dns.zone.queries
    assert (B_HOSTNAME, "A") in dns.zone.queries
    (line,) = relay_lines(mail_log, to=f"<carol@{REMOTE}>")
    assert field(line, "status") == "sent"
    assert field(line, "via") == f"{B_HOSTNAME}[127.0.0.1]:{b.port}"
    assert field(line, "tls") == "yes"


async def test_implicit_mx_from_an_a_record(
    start_server: StartServer, nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    b = await start_b(start_server, tmp_path, ca, tls=False)
    dns = await start_dns_server(nursery, {REMOTE: {"A": ["127.0.0.1"]}})
    a = await start_a(
        start_server, tmp_path, relay={"mx_port": b.port}, nameservers=[dns.nameserver]
    )
    await in_thread(send, a, [f"dave@{REMOTE}"])
    (message,) = await delivered_at(b, "dave")
    check_delivered_at_b(message, f"dave@{REMOTE}")
    assert "ESMTPS" not in received_headers(message)[0]  # B had no certificate
    await relay_finished(a.config)


@pytest.mark.parametrize(
    ("records", "status"),
    [
        ({REMOTE: {"MX": ["0 ."]}}, "5.1.10"),  # RFC 7505 null MX
        ({}, "5.1.2"),  # NXDOMAIN
    ],
    ids=["null-MX", "NXDOMAIN"],
)
async def test_domain_without_mail_bounces(
    start_server: StartServer,
    nursery: trio.Nursery,
    tmp_path: Path,
    mail_log: pytest.LogCaptureFixture,
    records: dict[str, dict[str, list[str]]],
    status: str,
) -> None:
    dns = await start_dns_server(nursery, records)
    a = await start_a(start_server, tmp_path, nameservers=[dns.nameserver])
    await in_thread(send, a, [f"carol@{REMOTE}"])
    (report,) = await bounces(a.config)
    await relay_finished(a.config)
    fields = report_fields(report)[f"carol@{REMOTE}"]
    assert fields["Action"] == "failed"
    assert fields["Status"].startswith("5.1."), fields["Status"]
    (line,) = relay_lines(mail_log, to=f"<carol@{REMOTE}>")
    assert field(line, "status") == "bounced" and field(line, "via") == "none"
    assert status  # the status dns.py gives; any 5.1.x is a correct RFC 3463 code here


async def test_dns_failure_defers(
    start_server: StartServer,
    nursery: trio.Nursery,
    tmp_path: Path,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    dns = await start_dns_server(nursery)
    dns.zone.set_rcode(REMOTE, "SERVFAIL")
    a = await start_a(
        start_server,
        tmp_path,
        relay={"retry_initial": 3600, "retry_max": 3600},
        nameservers=[dns.nameserver],
    )
    await in_thread(send, a, [f"carol@{REMOTE}"])
    await wait_until(lambda: relay_lines(mail_log, status="deferred"))
    (line,) = relay_lines(mail_log, to=f"<carol@{REMOTE}>")
    assert field(line, "via") == "none"
    assert read_maildir(a.config.directories.domains / DOMAIN / "alice") == []


async def test_relay_through_b_as_verified_smarthost(
    start_server: StartServer,
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: trustme.CA,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    b = await start_b(start_server, tmp_path, ca)
    dns = await start_dns_server(nursery, {B_HOSTNAME: {"A": ["127.0.0.1"]}})
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    a = await start_a(
        start_server,
        tmp_path,
        relay={
            "smarthost": f"{B_HOSTNAME}:{b.port}",
            "smarthost_tls": "required",
            "ca_file": str(ca_file),
        },
        nameservers=[dns.nameserver],
    )
    await in_thread(send, a, [f"carol@{REMOTE}"])
    (message,) = await delivered_at(b, "carol")
    check_delivered_at_b(message, f"carol@{REMOTE}")
    await relay_finished(a.config)
    (line,) = relay_lines(mail_log, to=f"<carol@{REMOTE}>")
    assert field(line, "tls") == "yes" and field(line, "status") == "sent"


async def test_untrusted_client_cannot_use_a_as_relay(
    start_server: StartServer, tmp_path: Path, ca: trustme.CA
) -> None:
    # A trusts only a network the client is not in: B never hears of the message.
    b = await start_b(start_server, tmp_path, ca)
    a = await start_a(
        start_server, tmp_path, relay={"trusted_networks": ["10.0.0.0/8"]}, routes=route_to(b)
    )

    def refused() -> int:
        with a.smtp() as smtp, pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            smtp.sendmail(SENDER, [f"carol@{REMOTE}"], CONTENT, ["BODY=8BITMIME"])
        return info.value.recipients[f"carol@{REMOTE}"][0]

    assert await in_thread(refused) == 550
    assert spool_files(a.config, "received") == [] and spool_files(a.config) == []
    with trio.move_on_after(0.2):
        await wait_until(lambda: read_maildir(mailbox(b, "carol")))
    assert read_maildir(mailbox(b, "carol")) == []


async def test_bounce_from_b_comes_back_to_alice(
    start_server: StartServer, tmp_path: Path, ca: trustme.CA, mail_log: pytest.LogCaptureFixture
) -> None:
    # B refuses an unknown mailbox at RCPT (550 5.1.1); A bounces it to its local sender.
    b = await start_b(start_server, tmp_path, ca)
    a = await start_a(start_server, tmp_path, routes=route_to(b))
    await in_thread(send, a, [f"carol@{REMOTE}", f"nobody@{REMOTE}"])
    await delivered_at(b, "carol")
    (report,) = await bounces(a.config)
    await relay_finished(a.config)
    fields = report_fields(report)
    assert list(fields) == [f"nobody@{REMOTE}"]
    assert fields[f"nobody@{REMOTE}"]["Status"] == "5.1.1"
    assert fields[f"nobody@{REMOTE}"]["Action"] == "failed"
    assert B_HOSTNAME in fields[f"nobody@{REMOTE}"].get("Remote-MTA", B_HOSTNAME)
    assert len(log_lines(mail_log, "relay-dsn")) == 1
