"""Reading delivered mail with a real IMAP server: Dovecot (Debian's ``dovecot-imapd``), started by
the test on 127.0.0.1 with its mail location pointed at katerchen's domains tree, fetches the
delivered message with imaplib, byte-exact.

Dovecot runs in the foreground (``dovecot -F``) on a config of its own -- nothing from /etc/dovecot
is read -- with its sockets, state and log in the test's directory, and is stopped by the test.
Without Dovecot the test is skipped, except where KATERCHEN_REQUIRE_TOOLS is set (.ci/run sets
it): there a missing server is a failure, so CI cannot turn green by testing less.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from katerchen.config import Config
from tests.conftest import DOMAIN, HOSTNAME, MAILBOXES, TIMEOUT, StartServer, config_toml, in_thread


def _find_dovecot() -> str | None:
    # /usr/sbin is not on every user's PATH, and Debian installs it there.
    found = shutil.which("dovecot")
    if found is None and os.access("/usr/sbin/dovecot", os.X_OK):
        found = "/usr/sbin/dovecot"
    return found


DOVECOT = _find_dovecot()
PASSWORD = "katerchen-test-password"

pytestmark = pytest.mark.skipif(
    DOVECOT is None and not os.environ.get("KATERCHEN_REQUIRE_TOOLS"),
    reason="dovecot is not installed (Debian: apt-get install dovecot-imapd)",
)

#: 8-bit octets, a line that is a lone dot, lines that start with dots (SMTP dot-stuffs them on
#: the wire, katerchen must unstuff them exactly once) and a long header: all must reach the
#: IMAP client unchanged.
MESSAGE = (
    b"From: Sender <sender@client.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <imap-byte-exact@client.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln, caf\xc3\xa9 \xe2\x82\xac\r\n"
    b".\r\n"
    b"..\r\n"
    b".leading dot\r\n"
    b"\r\n"
    b"Latin-1 octets too: \xe4\xf6\xfc\xff\r\n"
    b"last line\r\n"
)


# --- Dovecot -----------------------------------------------------------------------------------


@attrs.frozen
class DovecotUsers:
    """Who Dovecot's processes run as.

    Dovecot never reads mail as root ("Mail access not allowed for root"), so as root (CI) its
    mail processes run as the ``dovecot`` system user and the test hands the delivered Maildirs to
    that user -- in a deployment katerchen and Dovecot share one mail user the same way.  As
    anybody else Dovecot runs "rootless": every process is the current user, who already owns
    the Maildirs.
    """

    internal_user: str
    internal_group: str
    login_user: str
    mail_owner: tuple[int, int] | None  # (uid, gid) the Maildirs must belong to; None: as they are

    @classmethod
    def for_this_process(cls) -> DovecotUsers:
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            group = grp.getgrgid(me.pw_gid).gr_name
            return cls(me.pw_name, group, me.pw_name, None)
        internal = _user_or_nobody("dovecot")
        login = _user_or_nobody("dovenull")
        group = grp.getgrgid(internal.pw_gid).gr_name
        return cls(internal.pw_name, group, login.pw_name, (internal.pw_uid, internal.pw_gid))

    def config_lines(self) -> list[str]:
        lines = [
            f"default_internal_user = {self.internal_user}",
            f"default_internal_group = {self.internal_group}",
            f"default_login_user = {self.login_user}",
        ]
        if self.mail_owner is not None:
            uid, gid = self.mail_owner
            lines += [f"mail_uid = {uid}", f"mail_gid = {gid}"]
            # The dovecot system user's uid/gid are below the defaults (500/1).
            lines += ["first_valid_uid = 1", "first_valid_gid = 1"]
        return lines

    def hand_over(self, tree: Path) -> None:
        """Give *tree* to the mail user (as root only)."""
        if self.mail_owner is None:
            return
        uid, gid = self.mail_owner
        os.chown(tree, uid, gid)
        for root, dirs, files in os.walk(tree):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _user_or_nobody(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return pwd.getpwnam("nobody")


def dovecot_config(workdir: Path, domains: Path, port: int, users: DovecotUsers) -> str:
    run = workdir / "dovecot"
    lines = [
        "# A throw-away Dovecot for katerchen's tests: IMAP only, plaintext on 127.0.0.1.",
        "protocols = imap",
        "listen = 127.0.0.1",
        f"base_dir = {run}/run",
        f"state_dir = {run}/state",
        f"log_path = {run}/dovecot.log",
        "ssl = no",
        "disable_plaintext_auth = no",
        "auth_mechanisms = plain login",
        *users.config_lines(),
        # The README's mail_location: %d is the domain part of the login name, %n the local part.
        f"mail_location = maildir:{domains}/%d/%n",
        "passdb {",
        "  driver = static",
        f"  args = password={PASSWORD}",
        "}",
        "userdb {",
        "  driver = static",
        "  args =",
        "}",
        "service imap-login {",
        "  chroot =",  # chroot needs root; a test gains nothing from it
        "  inet_listener imap {",
        "    address = 127.0.0.1",
        f"    port = {port}",
        "  }",
        "  inet_listener imaps {",
        "    port = 0",
        "  }",
        "}",
        "service anvil {",
        "  chroot =",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class Dovecot:
    port: int
    log: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"


@contextlib.asynccontextmanager
async def open_dovecot(workdir: Path, domains: Path) -> AsyncIterator[Dovecot]:
    """Run ``dovecot -F`` on a config of its own until the block ends; yields once it accepts
    connections on its IMAP port."""
    if DOVECOT is None:
        pytest.fail("KATERCHEN_REQUIRE_TOOLS is set but dovecot is not installed")
    users = DovecotUsers.for_this_process()
    (workdir / "dovecot").mkdir()
    port = _free_port()
    conf = workdir / "dovecot" / "dovecot.conf"
    conf.write_text(dovecot_config(workdir, domains, port, users))
    dovecot = Dovecot(port, workdir / "dovecot" / "dovecot.log")
    with (workdir / "dovecot" / "stderr").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [DOVECOT, "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    try:
        # Ready when the IMAP port accepts; Dovecot binds it in well under a second.
        with trio.fail_after(TIMEOUT):
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        f"dovecot exited with {process.returncode}:\n"
                        + (workdir / "dovecot" / "stderr").read_text(errors="replace")
                        + dovecot.log_text()
                    )
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.01)
                    continue
                await stream.aclose()
                break
        yield dovecot
    finally:
        # SIGTERM: the master stops its services and exits.
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(TIMEOUT):
                await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()


# --- the test ----------------------------------------------------------------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory for katerchen's data and Dovecot's run files.

    Not tmp_path: pytest makes its base directory 0700, which Dovecot's unprivileged processes
    (login, mail) could not enter as root; and a unix socket path must stay under 108 bytes,
    which Dovecot's deepest ones would not in tmp_path.
    """
    path = Path(tempfile.mkdtemp(prefix="katerchen-imap-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def imap_fetch_all(port: int, user: str) -> list[bytes]:
    """LOGIN as *user*, SELECT INBOX and FETCH every message as RFC822 (BLOCKING)."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT) as imap:
        imap.login(user, PASSWORD)
        typ, selected = imap.select("INBOX")
        assert typ == "OK", selected
        typ, fetched = imap.fetch("1:*", "(RFC822)")
        assert typ == "OK", fetched
        imap.logout()
    # Each message comes as a tuple (b'1 (FLAGS (...) RFC822 {size}', literal) and a b')'.
    return [item[1] for item in fetched if isinstance(item, tuple)]


def delivered(mailbox: Path) -> list[Path]:
    new = mailbox / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


async def wait_for_delivery(mailbox: Path) -> Path:
    with trio.fail_after(TIMEOUT):
        while not delivered(mailbox):
            await trio.sleep(0.01)
    (path,) = delivered(mailbox)
    return path


async def test_dovecot_fetches_a_delivered_message_byte_exact(
    workdir: Path, start_server: StartServer
) -> None:
    for name in MAILBOXES:
        (workdir / "domains" / DOMAIN / name).mkdir(parents=True)
    config = Config.from_toml(config_toml(), base_dir=workdir)
    server = await start_server(config, deliver=True)

    def send() -> str:
        with server.smtp() as smtp:
            smtp.ehlo()
            smtp.mail("sender@client.test", ["BODY=8BITMIME"])
            code, _ = smtp.rcpt("alice@example.test")
            assert code == 250
            code, reply = smtp.data(MESSAGE)  # smtplib dot-stuffs on the wire
            assert code == 250, reply
            match = re.search(rb"queued as ([0-9A-Za-z]+)", reply)
            assert match, reply
            return match.group(1).decode()

    queue_id = await in_thread(send)
    alice = workdir / "domains" / DOMAIN / "alice"
    path = await wait_for_delivery(alice)
    assert f"K{queue_id}" in path.name
    data = path.read_bytes()

    # The delivered file: Return-Path, Delivered-To, katerchen's Received, then the message as
    # sent, octet for octet.
    head = b"Return-Path: <sender@client.test>\r\nDelivered-To: alice@example.test\r\n"
    assert data.startswith(head + b"Received: from client.test "), data[:200]
    assert data.endswith(MESSAGE)
    received = data[len(head) : len(data) - len(MESSAGE)]
    assert f"by {HOSTNAME} (katerchen)".encode() in received
    assert f"id {queue_id}".encode() in received

    users = DovecotUsers.for_this_process()
    users.hand_over(workdir / "domains")
    async with open_dovecot(workdir, workdir / "domains") as dovecot:
        try:
            messages = await in_thread(imap_fetch_all, dovecot.port, "alice@example.test")
        except imaplib.IMAP4.error as exc:
            pytest.fail(f"IMAP failed: {exc}\n{dovecot.log_text()}")

    assert messages == [data], dovecot.log_text()
    # Dovecot took the message over as a reader does: out of new/ into cur/, the name kept.
    assert delivered(alice) == []
    (seen,) = (alice / "cur").iterdir()
    assert seen.name.split(":")[0] == path.name
    assert seen.read_bytes() == data
