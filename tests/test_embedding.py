"""katerchen embedded in another project's test suite, written as that project would write it:
only the public API (``katerchen.serve``, ``katerchen.Config``) and the ``katerchen_server``
fixture that installing katerchen registers.  No helper from this repository's conftest.
"""

from __future__ import annotations

import email.message
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import katerchen
from katerchen.testing import KaterchenServer, sink_config

README = Path(__file__).resolve().parent.parent / "README.md"


def send(host: str, port: int, message: email.message.EmailMessage, **kwargs: object) -> None:
    with smtplib.SMTP(host, port, local_hostname="app.example.com", timeout=10) as smtp:
        smtp.send_message(message, **kwargs)  # type: ignore[arg-type]


def welcome_mail(to: str = "new.user@example.com") -> email.message.EmailMessage:
    message = email.message.EmailMessage()
    message["From"] = "Shop <noreply@shop.example>"
    message["To"] = to
    message["Subject"] = "Welcome, new user"
    message.set_content("Thanks for signing up.\n")
    return message


async def test_the_sink_receives_what_was_sent(katerchen_server: KaterchenServer) -> None:
    message = welcome_mail()
    message["Cc"] = "boss@other.example"
    message["Bcc"] = "audit@example.net"
    with trio.fail_after(10):
        await trio.to_thread.run_sync(send, katerchen_server.host, katerchen_server.port, message)
        (received,) = await katerchen_server.wait_for_messages(1)

    assert isinstance(received, email.message.EmailMessage)
    assert received["Subject"] == "Welcome, new user"
    assert received["To"] == "new.user@example.com"
    assert received.get_content() == "Thanks for signing up.\n"
    assert "Bcc" not in received  # smtplib leaves it out; the envelope has it
    envelope = received.envelope
    assert envelope.reverse_path == "noreply@shop.example"
    # smtplib sends to To, Bcc, Cc in that order.
    assert envelope.forward_paths == (
        "new.user@example.com",
        "audit@example.net",
        "boss@other.example",
    )
    assert envelope.helo == "app.example.com"
    assert envelope.client == "127.0.0.1"
    # The server's own trace header comes first, as a mailbox would show it.
    assert received["Received"].startswith("from app.example.com")
    assert received.raw.startswith(b"Received: ")


async def test_every_recipient_at_every_domain_is_accepted(
    katerchen_server: KaterchenServer,
) -> None:
    recipients = [
        "a@example.com",
        "B@Example.ORG",
        "x+tag@sub.example.net",
        "root@[192.0.2.1]",
        '"odd name"@example.com',
        "postmaster",
    ]

    def session() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(katerchen_server.host, katerchen_server.port, timeout=10) as smtp:
            return smtp.sendmail("", recipients, b"Subject: bounce-like\r\n\r\nbody\r\n")

    with trio.fail_after(10):
        refused = await trio.to_thread.run_sync(session)
        (received,) = await katerchen_server.wait_for_messages(1)
    assert refused == {}
    assert received.envelope.reverse_path == ""  # the null reverse-path <>
    assert received.envelope.forward_paths == tuple(recipients)


async def test_waiting_for_mail_sent_in_the_background(
    katerchen_server: KaterchenServer,
) -> None:
    async def send_later(n: int) -> None:
        await trio.sleep(0.05 * n)
        message = welcome_mail(f"user{n}@example.com")
        await trio.to_thread.run_sync(send, katerchen_server.host, katerchen_server.port, message)

    assert katerchen_server.messages() == []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(send_later, n)
            messages = await katerchen_server.wait_for_messages(3)
    assert sorted(m["To"] for m in messages) == [
        "user0@example.com",
        "user1@example.com",
        "user2@example.com",
    ]
    # Oldest first, and the list is stable.
    ids = [m.envelope.queue_id for m in messages]
    assert ids == sorted(ids)
    assert [m.envelope.queue_id for m in katerchen_server.messages()] == ids


@pytest.mark.parametrize(
    "katerchen_server", [{"limits": {"max_message_size": 2000}}], indirect=True
)
async def test_a_parametrized_server_applies_its_limits(
    katerchen_server: KaterchenServer,
) -> None:
    message = welcome_mail()
    message.set_content("x" * 5000 + "\n")
    with trio.fail_after(10), pytest.raises(smtplib.SMTPException) as info:
        await trio.to_thread.run_sync(send, katerchen_server.host, katerchen_server.port, message)
    assert "552" in str(info.value) or getattr(info.value, "smtp_code", None) == 552
    assert katerchen_server.messages() == []


class TestOwnConfig:
    """A project that needs a real domains tree overrides ``katerchen_config``."""

    @pytest.fixture
    def katerchen_config(self, tmp_path: Path) -> katerchen.Config:
        (tmp_path / "mail" / "domains" / "shop.example" / "orders").mkdir(parents=True)
        return katerchen.Config.from_mapping(
            {
                "server": {"hostname": "mx.shop.example", "listen": ["127.0.0.1:0"]},
                "directories": {"domains": "domains"},
            },
            base_dir=tmp_path / "mail",
        )

    async def test_only_served_mailboxes_are_accepted(
        self, katerchen_server: KaterchenServer
    ) -> None:
        def session() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP(katerchen_server.host, katerchen_server.port, timeout=10) as smtp:
                return smtp.sendmail(
                    "app@shop.example",
                    ["orders@shop.example", "nobody@shop.example", "x@elsewhere.example"],
                    b"Subject: order\r\n\r\n1 kitten\r\n",
                )

        with trio.fail_after(10):
            refused = await trio.to_thread.run_sync(session)
            (received,) = await katerchen_server.wait_for_messages(1)
        assert set(refused) == {"nobody@shop.example", "x@elsewhere.example"}
        assert refused["x@elsewhere.example"][0] == 550
        assert received.envelope.forward_paths == ("orders@shop.example",)


# --- the embedding API itself ---------------------------------------------------------------------


async def test_serve_in_a_nursery_and_stop_by_cancelling(tmp_path: Path) -> None:
    (tmp_path / "domains" / "example.test").mkdir(parents=True)
    config = katerchen.Config.from_mapping(
        {"server": {"hostname": "mx.example.test", "listen": ["127.0.0.1:0"]}},
        base_dir=tmp_path,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(katerchen.serve, config)
            assert isinstance(server, katerchen.RunningServer)
            host, port = server.addresses[0]
            # A client in the middle of a message when the nursery is cancelled.
            stream = await trio.open_tcp_stream(host, port)
            assert (await stream.receive_some()).startswith(b"220 mx.example.test")
            await stream.send_all(
                b"HELO client.example\r\nMAIL FROM:<a@b.example>\r\n"
                b"RCPT TO:<postmaster@example.test>\r\nDATA\r\n"
            )
            received = b""
            while b"354 " not in received:
                received += await stream.receive_some()
            await stream.send_all(b"Subject: half a message\r\n")
            nursery.cancel_scope.cancel()
        # Stopped: the open connection is closed, the port no longer accepts...
        while True:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                break
            if not data:
                break
            received += data
        await stream.aclose()
        assert b"250 " not in received.rsplit(b"354", 1)[-1]  # no message acknowledged
        with pytest.raises(OSError):
            await trio.open_tcp_stream(host, port)
    # ...and the half-received message was never acknowledged, so it is not queued.
    assert list((tmp_path / "spool" / "received").iterdir()) == []


async def test_serve_handle_shuts_down_gracefully(tmp_path: Path) -> None:
    (tmp_path / "domains" / "example.test" / "alice").mkdir(parents=True)
    config = katerchen.Config.from_mapping(
        {
            "server": {"hostname": "mx.example.test", "listen": ("127.0.0.1:0",)},
            "directories": {"domains": tmp_path / "domains"},  # a Path is fine
        },
        base_dir=tmp_path,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(katerchen.serve, config)
            host, port = server.addresses[0]
            message = welcome_mail("alice@example.test")
            await trio.to_thread.run_sync(send, host, port, message)
            server.shutdown()  # returns at once; serve() returns when it is done
    # Delivered into alice's Maildir by the server's own delivery before it stopped, or
    # left in received/ for the next start: either way, nothing was lost.
    maildir = list((tmp_path / "domains" / "example.test" / "alice" / "new").glob("*"))
    waiting = list((tmp_path / "spool" / "received").iterdir())
    assert len(maildir) + len(waiting) == 1


def test_config_from_mapping_validates_like_the_file(tmp_path: Path) -> None:
    with pytest.raises(katerchen.ConfigError) as info:
        katerchen.Config.from_mapping({"limits": {"max_recipients": 0}}, base_dir=tmp_path)
    assert info.value.key == "[limits] max_recipients"
    with pytest.raises(katerchen.ConfigError) as info:
        katerchen.Config.from_mapping({"server": {"listen": "127.0.0.1:25"}})
    assert info.value.key == "[server] listen"
    with pytest.raises(katerchen.ConfigError) as info:
        katerchen.Config.from_mapping({"servre": {}})
    assert "did you mean [server]" in str(info.value)
    with pytest.raises(katerchen.ConfigError) as info:
        katerchen.Config.from_mapping({"relay": {"routes": {1: "x"}}})
    assert "keys must be strings, got 1 in [relay.routes]" in str(info.value)
    # The same config as the TOML file gives, and the caller's dict is not kept.
    data: dict[str, object] = {"limits": {"max_recipients": 7}}
    config = katerchen.Config.from_mapping(data, base_dir=tmp_path)
    assert config == katerchen.Config.from_toml("[limits]\nmax_recipients = 7", base_dir=tmp_path)
    data["limits"] = {}
    assert config.limits.max_recipients == 7


def test_sink_config_is_the_fixtures_config(tmp_path: Path) -> None:
    config = sink_config(tmp_path, {"limits": {"max_recipients": 2}})
    assert config.server.listen == (("127.0.0.1", 0),)
    assert config.limits.max_recipients == 2
    assert config.delivery.sink == "sink@katerchen.test"
    assert config.directories.received == tmp_path / "spool" / "received"
    assert (tmp_path / "domains" / "katerchen.test").is_dir()


# --- the README's example, run as an outside project runs it --------------------------------------


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Embedding in tests", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_example_passes_in_a_project_of_its_own(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[tool.pytest.ini_options]\ntrio_mode = true\n")
    (project / "tests" / "test_mail.py").write_text(readme_example())

    def run_pytest() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with trio.fail_after(90):
        result = await trio.to_thread.run_sync(run_pytest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
