"""SMTP AUTH (RFC 4954) and mail submission (RFC 6409, RFC 8314) through the receiver: AUTH only
over TLS, wrong passwords, the per-IP lockout, AUTH before MAIL on the submission ports, the
sender policy for authenticated users, and relaying.  Clients: smtplib, swaks, raw sockets."""

from __future__ import annotations

import base64
import functools
import os
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from katerchen import auth
from tests.conftest import (
    HOSTNAME,
    TIMEOUT,
    USERS,
    MakeConfig,
    RawClient,
    Server,
    StartServer,
    TlsFiles,
    connect_tls,
    in_thread,
    log_lines,
    start_tls,
    submission_address,
    submissions_address,
)

ALICE = "alice@example.test"
BOB = "bob@example.test"
WRONG = "not the password"
MESSAGE = b"Subject: submitted\r\nMessage-ID: <sub@client.test>\r\n\r\nHello.\r\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain_token(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


@pytest.fixture(autouse=True)
def no_secrets_in_the_log(mail_log: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test does, no password and no AUTH payload reaches the log."""
    yield
    secrets = [*USERS.values(), WRONG]
    secrets += [b64(s) for s in secrets]
    secrets += [plain_token(user, p) for user in USERS for p in (*USERS.values(), WRONG)]
    for record in mail_log.records:
        message = record.getMessage()
        for secret in secrets:
            assert secret not in message, message


async def connect(
    address: tuple[str, int], *, local_address: str | None = None, ehlo: bool = True
) -> RawClient:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(*address, local_address=local_address)
    raw = RawClient(stream)
    await raw.expect(f"220 {HOSTNAME}")
    if ehlo:
        await raw.dialog("c: EHLO client.test\ns: 250")
    return raw


async def tls_session(
    server: Server,
    files: TlsFiles,
    *,
    port: str = "submission",
    local_address: str | None = None,
) -> RawClient:
    """A TLS session after EHLO, not authenticated: STARTTLS on "mx" or "submission", or
    implicit TLS on "submissions"."""
    context = files.client_context()
    if port == "submissions":
        raw = await connect_tls(submissions_address(server), context)
        await raw.expect(f"220 {HOSTNAME}")
    else:
        address = (server.host, server.port) if port == "mx" else submission_address(server)
        plain = await connect(address, local_address=local_address)
        await plain.dialog("c: STARTTLS\ns: 220 2.0.0")
        raw = await start_tls(plain, context)
    (ehlo,) = await raw.dialog("c: EHLO client.test\ns: 250")
    assert "AUTH PLAIN LOGIN" in ehlo.lines
    return raw


async def logged_in(server: Server, files: TlsFiles, user: str = ALICE, **kw: str) -> RawClient:
    raw = await tls_session(server, files, **kw)
    await raw.dialog(f"c: AUTH PLAIN {plain_token(user, USERS[user])}\ns: 235 2.7.0")
    return raw


# --- AUTH only over TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["mx", "submission"])
async def test_auth_is_refused_before_tls(tls_server: Server, port: str) -> None:
    address = (tls_server.host, tls_server.port) if port == "mx" else submission_address(tls_server)
    raw = await connect(address, ehlo=False)
    (ehlo,) = await raw.dialog("c: EHLO client.test\ns: 250")
    assert "STARTTLS" in ehlo.lines
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    await raw.dialog(
        f"""
        c: AUTH PLAIN {plain_token(ALICE, USERS[ALICE])}
        s: 538 5.7.11
        c: AUTH LOGIN
        s: 538 5.7.11
        c: QUIT
        s: 221
        """
    )


async def test_submission_refuses_mail_without_auth(
    tls_server: Server, tls_files: TlsFiles
) -> None:
    # Before TLS ...
    raw = await connect(submission_address(tls_server))
    await raw.dialog(f"c: MAIL FROM:<{ALICE}>\ns: 530 5.7.0")
    await raw.aclose()
    # ... after it, on both submission ports ...
    for port in ("submission", "submissions"):
        tls = await tls_session(tls_server, tls_files, port=port)
        await tls.dialog(
            f"""
            c: MAIL FROM:<{ALICE}>
            s: 530 5.7.0
            c: RCPT TO:<{BOB}>
            s: 503
            c: AUTH PLAIN {plain_token(ALICE, USERS[ALICE])}
            s: 235 2.7.0
            c: MAIL FROM:<{ALICE}> AUTH=<>
            s: 250 2.1.0
            c: RCPT TO:<{BOB}>
            s: 250 2.1.5
            c: QUIT
            s: 221
            """
        )
    # ... while the MX port needs no AUTH (over TLS too), for its own domains.
    mx = await tls_session(tls_server, tls_files, port="mx")
    await mx.dialog(
        f"""
        c: MAIL FROM:<someone@client.test>
        s: 250 2.1.0
        c: RCPT TO:<{BOB}>
        s: 250 2.1.5
        c: RCPT TO:<someone@remote.test>
        s: 550 5.7.1
        c: QUIT
        s: 221
        """
    )


# --- passwords ----------------------------------------------------------------------------------


async def test_wrong_passwords_get_535(
    tls_server: Server, tls_files: TlsFiles, mail_log: pytest.LogCaptureFixture
) -> None:
    raw = await tls_session(tls_server, tls_files)
    await raw.dialog(
        f"""
        c: AUTH PLAIN {plain_token(ALICE, WRONG)}
        s: 535 5.7.8
        c: AUTH PLAIN {plain_token("nobody@example.test", WRONG)}
        s: 535 5.7.8
        c: AUTH PLAIN {plain_token(ALICE, USERS[BOB])}
        s: 535 5.7.8
        c: MAIL FROM:<{ALICE}>
        s: 530 5.7.0
        c: AUTH LOGIN
        s: 334 VXNlcm5hbWU6
        c: {b64(ALICE)}
        s: 334 UGFzc3dvcmQ6
        c: {b64(USERS[ALICE])}
        s: 235 2.7.0
        c: AUTH PLAIN {plain_token(ALICE, USERS[ALICE])}
        s: 503 5.5.1
        """
    )
    failed = log_lines(mail_log, "auth-failed")
    assert failed == [f"auth-failed ip=127.0.0.1 mechanism=PLAIN failures={n}" for n in (1, 2, 3)]
    # The usernames of failed attempts are not logged (people type passwords there); the
    # user of a success is.
    assert log_lines(mail_log, "auth") == [f"auth ip=127.0.0.1 mechanism=LOGIN user={ALICE}"]


async def test_auth_login_cancelled(tls_server: Server, tls_files: TlsFiles) -> None:
    raw = await tls_session(tls_server, tls_files)
    await raw.dialog(
        f"""
        c: AUTH LOGIN {b64(ALICE)}
        s: 334 UGFzc3dvcmQ6
        c: *
        s: 501 5.0.0
        c: AUTH PLAIN
        s: 334
        c: {plain_token(ALICE, USERS[ALICE])}
        s: 235 2.7.0
        """
    )


async def test_usernames_are_matched_case_insensitively(
    tls_server: Server, tls_files: TlsFiles
) -> None:
    raw = await tls_session(tls_server, tls_files)
    await raw.dialog(f"c: AUTH PLAIN {plain_token('Alice@Example.TEST', USERS[ALICE])}\ns: 235")
    await raw.dialog(f"c: MAIL FROM:<{ALICE}>\ns: 250\nc: QUIT\ns: 221")


async def test_an_unreadable_users_file_is_a_temporary_failure(
    tls_server: Server, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(self: auth.UsersFile, username: str, password: str | bytes) -> str | None:
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(auth.UsersFile, "authenticate", unreadable)
    raw = await tls_session(tls_server, tls_files)
    await raw.dialog(f"c: AUTH PLAIN {plain_token(ALICE, USERS[ALICE])}\ns: 454 4.7.0")


async def test_a_changed_users_file_counts_at_once(
    tls_server: Server, tls_files: TlsFiles, tmp_path: Path
) -> None:
    carol = "carol@example.test"
    await in_thread(
        functools.partial(auth.set_password, log2_n=4), tmp_path / "users", carol, WRONG
    )
    raw = await tls_session(tls_server, tls_files)
    await raw.dialog(f"c: AUTH PLAIN {plain_token(carol, WRONG)}\ns: 235")


# --- the lockout ---------------------------------------------------------------------------------


async def test_lockout_after_max_failures(
    start_server: StartServer, make_tls_config: MakeConfig, tls_files: TlsFiles
) -> None:
    server = await start_server(make_tls_config(auth={"max_failures": 3}))
    raw = await tls_session(server, tls_files)
    for _ in range(3):
        await raw.dialog(f"c: AUTH PLAIN {plain_token(ALICE, WRONG)}\ns: 535 5.7.8")
    # Locked out: even the right password is not checked, and the connection is closed.
    await raw.dialog(f"c: AUTH PLAIN {plain_token(ALICE, USERS[ALICE])}\ns: 421 4.7.0\nclosed")

    # A new connection from the same IP: locked out at the first step of any mechanism.
    again = await tls_session(server, tls_files, port="submissions")
    await again.dialog("c: AUTH LOGIN\ns: 421 4.7.0\nclosed")
    # Sending mail to local users is still fine on port 25.
    mx = await tls_session(server, tls_files, port="mx")
    await mx.dialog(f"c: MAIL FROM:<x@client.test>\ns: 250\nc: RCPT TO:<{BOB}>\ns: 250\nc: QUIT")

    # Another IP is not locked out.
    other = await logged_in(server, tls_files, local_address="127.0.0.2")
    await other.dialog(f"c: MAIL FROM:<{ALICE}>\ns: 250\nc: QUIT\ns: 221")


async def test_lockout_ends_when_the_window_has_passed(
    start_server: StartServer, make_tls_config: MakeConfig, tls_files: TlsFiles
) -> None:
    server = await start_server(make_tls_config(auth={"max_failures": 1, "failure_window": 0.3}))
    raw = await tls_session(server, tls_files)
    await raw.dialog(f"c: AUTH PLAIN {plain_token(ALICE, WRONG)}\ns: 535 5.7.8")
    locked_at = trio.current_time()
    await raw.dialog(f"c: AUTH PLAIN {plain_token(ALICE, USERS[ALICE])}\ns: 421 4.7.0\nclosed")
    # Poll (bounded) until the window has passed; then the right password works again.
    with trio.fail_after(TIMEOUT):
        while True:
            again = await tls_session(server, tls_files)
            reply = await again.command(f"AUTH PLAIN {plain_token(ALICE, USERS[ALICE])}")
            if reply.code == 235:
                break
            assert reply.code == 421
            await again.aclose()
            await trio.sleep(0.05)
    assert trio.current_time() - locked_at >= 0.3


# --- the sender policy ---------------------------------------------------------------------------


@pytest.fixture
async def alias_server(
    start_server: StartServer, make_tls_config: MakeConfig, tmp_path: Path
) -> Server:
    config = make_tls_config()
    aliases = "info: alice\nteam: alice, bob\nelsewhere: alice@remote.test\n"
    (tmp_path / "domains" / "example.test" / "aliases").write_text(aliases)
    return await start_server(config)


async def test_a_sender_the_user_does_not_own_is_refused(
    alias_server: Server, tls_files: TlsFiles
) -> None:
    raw = await logged_in(alias_server, tls_files, port="submissions")
    await raw.dialog(
        f"""
        c: MAIL FROM:<{BOB}>
        s: 553 5.7.1
        c: MAIL FROM:<someone@remote.test>
        s: 553 5.7.1
        c: MAIL FROM:<elsewhere@example.test>
        s: 553 5.7.1
        c: MAIL FROM:<{ALICE}>
        s: 250
        c: RSET
        s: 250
        c: MAIL FROM:<Alice@EXAMPLE.test>
        s: 250
        c: RSET
        s: 250
        c: MAIL FROM:<alice+lists@example.test>
        s: 250
        c: RSET
        s: 250
        c: MAIL FROM:<info@example.test>
        s: 250
        c: RSET
        s: 250
        c: MAIL FROM:<team@example.test>
        s: 250
        c: RSET
        s: 250
        c: MAIL FROM:<>
        s: 250
        c: QUIT
        s: 221
        """
    )


async def test_allow_any_sender(
    start_server: StartServer, make_tls_config: MakeConfig, tls_files: TlsFiles
) -> None:
    server = await start_server(make_tls_config(auth={"allow_any_sender": True}))
    raw = await logged_in(server, tls_files)
    await raw.dialog(f"c: MAIL FROM:<{BOB}>\ns: 250\nc: RSET\ns: 250")
    await raw.dialog("c: MAIL FROM:<someone@remote.test>\ns: 250\nc: QUIT\ns: 221")


# --- relaying (end to end: tests/test_submission_relay.py) ----------------------------------------


async def test_an_authenticated_user_may_relay(tls_server: Server, tls_files: TlsFiles) -> None:
    host, port = submission_address(tls_server)
    context = tls_files.client_context()

    def session() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(host, port, local_hostname="client.test", timeout=TIMEOUT) as smtp:
            smtp.starttls(context=context)
            smtp.login(ALICE, USERS[ALICE])
            return smtp.sendmail(ALICE, ["friend@remote.test", BOB], MESSAGE)

    assert await in_thread(session) == {}
    (stored,) = tls_server.messages()
    assert stored.envelope.auth == ALICE
    assert stored.envelope.relay  # delivery sends the remote recipient to relay/
    assert stored.envelope.forward_paths == ("friend@remote.test", BOB)
    assert b" with ESMTPSA id " in stored.received


async def test_without_auth_there_is_no_relaying(tls_server: Server, tls_files: TlsFiles) -> None:
    raw = await tls_session(tls_server, tls_files, port="mx")
    await raw.dialog(
        f"""
        c: MAIL FROM:<{ALICE}>
        s: 250
        c: RCPT TO:<friend@remote.test>
        s: 550 5.7.1
        c: QUIT
        s: 221
        """
    )


# --- swaks ---------------------------------------------------------------------------------------

swaks = pytest.mark.skipif(
    shutil.which("swaks") is None and not os.environ.get("KATERCHEN_REQUIRE_TOOLS"),
    reason="swaks is not installed",
)


async def run_swaks(address: tuple[str, int], *args: str) -> tuple[int, str]:
    command = ["swaks", "--server", address[0], "--port", str(address[1])]
    command += ["--helo", "swaks.client.test", "--timeout", str(int(TIMEOUT)), *args]
    with trio.fail_after(TIMEOUT * 2):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    return result.returncode, result.stdout.decode() + result.stderr.decode()


@swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_submission(tls_server: Server, mechanism: str) -> None:
    status, output = await run_swaks(
        submission_address(tls_server),
        "--tls",
        "--auth",
        mechanism,
        "--auth-user",
        BOB,
        "--auth-password",
        USERS[BOB],
        "--from",
        BOB,
        "--to",
        ALICE,
    )
    assert status == 0, output
    assert "235 2.7.0" in output, output
    (stored,) = tls_server.messages()
    assert stored.envelope.auth == BOB


@swaks
async def test_swaks_wrong_password(tls_server: Server) -> None:
    status, output = await run_swaks(
        submission_address(tls_server),
        "--tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        BOB,
        "--auth-password",
        WRONG,
        "--to",
        ALICE,
    )
    assert status != 0
    assert "535 5.7.8" in output, output
    assert tls_server.messages() == []
