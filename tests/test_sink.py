"""``[delivery] sink``, the test sink: every recipient is accepted and lands in one local
mailbox, and nothing is ever relayed -- the policy alone, then a real server delivering."""

from __future__ import annotations

import smtplib
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs
import pytest

from katerchen.address import Address, parse_forward_path
from katerchen.config import Config
from katerchen.routing import Mailbox, Resolution, resolve_recipient, sink_mailbox

from .conftest import StartServer, in_thread, wait_until

SINK = "sink@katerchen.test"


class View:
    """A domains tree that must never be asked: the sink decides alone."""

    def domain_exists(self, domain: str) -> bool:
        raise AssertionError("looked up a domain")

    def mailbox_exists(self, domain: str, mailbox: str) -> bool:
        raise AssertionError("looked up a mailbox")

    def aliases(self, domain: str) -> Mapping[str, tuple[str, ...]]:
        raise AssertionError("read aliases")

    def served_domains(self) -> Iterable[str]:
        raise AssertionError("listed domains")


def forward_path(text: str) -> Address:
    return parse_forward_path(f"<{text}>", utf8=True)


@pytest.mark.parametrize(
    "recipient",
    [
        "alice@example.org",
        "Bob@Remote.Example",
        "root@[192.0.2.1]",
        "root@[IPv6:2001:db8::1]",
        '".."@example.org',  # a local part that could never name a directory: no path built
        '"../etc"@example.org',
        "postmaster",
        "user%other@example.org",
    ],
)
def test_every_recipient_goes_to_the_sink(recipient: str) -> None:
    resolution = resolve_recipient(
        forward_path(recipient), View(), delimiter="+", postmaster="", sink=SINK
    )
    assert resolution == Resolution(mailboxes=(Mailbox("katerchen.test", "sink"),))
    assert resolution.remote == ()


def test_sink_mailbox() -> None:
    assert sink_mailbox("Sink@Katerchen.TEST") == Mailbox("katerchen.test", "sink")
    assert sink_mailbox("") is None
    assert sink_mailbox(None) is None
    assert sink_mailbox("postmaster") is None  # no domain
    assert sink_mailbox("x@[192.0.2.1]") is None  # no domain name
    assert sink_mailbox("not an address") is None


def sink_server_config(tmp_path: Path, **relay: object) -> Config:
    domains = tmp_path / "domains"
    (domains / "katerchen.test").mkdir(parents=True)
    # A served domain whose alias forwards off-site: in sink mode it must not.
    (domains / "example.test" / "alice").mkdir(parents=True)
    (domains / "example.test" / "aliases").write_text("alice: alice, alice@remote.example\n")
    return Config.from_mapping(
        {
            "server": {"hostname": "mx.example.test", "listen": ["127.0.0.1:0"]},
            "delivery": {"sink": SINK},
            "relay": relay,
        },
        base_dir=tmp_path,
    )


async def test_a_sink_server_delivers_everything_locally(
    tmp_path: Path, start_server: StartServer
) -> None:
    # Even a client the relay settings trust gets nothing relayed.
    config = sink_server_config(tmp_path, trusted_networks=["127.0.0.0/8"])
    server = await start_server(config, deliver=True)
    recipients = ["alice@example.test", "someone@remote.example", "x@[192.0.2.1]"]

    def send() -> dict[str, tuple[int, bytes]]:
        with server.smtp() as smtp:
            return smtp.sendmail("app@example.test", recipients, b"Subject: hi\r\n\r\nhi\r\n")

    assert await in_thread(send) == {}
    sink_new = tmp_path / "domains" / "katerchen.test" / "sink" / "new"
    await wait_until(lambda: sink_new.is_dir() and any(sink_new.iterdir()))
    await wait_until(lambda: not any(config.directories.received.iterdir()))
    (delivered,) = sink_new.iterdir()
    data = delivered.read_bytes()
    assert data.startswith(b"Return-Path: <app@example.test>\r\nDelivered-To: " + SINK.encode())
    assert data.endswith(b"\r\nSubject: hi\r\n\r\nhi\r\n")
    # One copy in the sink; nothing for alice's own Maildir, nothing to relay.
    assert not any((tmp_path / "domains" / "example.test" / "alice").rglob("*/*"))
    assert list(config.directories.relay.iterdir()) == []


async def test_without_sink_the_same_server_refuses_strangers(
    tmp_path: Path, start_server: StartServer
) -> None:
    config = sink_server_config(tmp_path)
    config = attrs.evolve(config, delivery=attrs.evolve(config.delivery, sink=""))
    server = await start_server(config)

    def send() -> None:
        with server.smtp() as smtp:
            smtp.sendmail("app@example.test", ["someone@remote.example"], b"\r\nhi\r\n")

    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await in_thread(send)
