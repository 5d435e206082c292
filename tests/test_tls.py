"""TLS in the receiver: STARTTLS (RFC 3207) on the MX and submission ports, implicit TLS (RFC
8314) on the submissions port, the CVE-2011-0411 injection, failed and slow handshakes, old
protocol versions, the Received header and the log, and certificate reloads (on change and on
SIGHUP, the latter in a real server process).  Clients: smtplib, swaks and raw sockets."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509

from katerchen import tlsconfig
from tests.conftest import (
    HOSTNAME,
    TIMEOUT,
    USERS,
    MakeConfig,
    RawClient,
    Server,
    StartServer,
    TlsFiles,
    config_toml,
    connect_tls,
    in_thread,
    issue_tls_files,
    log_lines,
    start_tls,
    submission_address,
    submissions_address,
    wait_until,
)

MESSAGE = b"Subject: over TLS\r\nMessage-ID: <tls@client.test>\r\n\r\nHello over TLS.\r\n"
ALICE = "alice@example.test"


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def serial_of_files(files: TlsFiles) -> int:
    return x509.load_pem_x509_certificate(files.certificate.read_bytes()).serial_number


def peer_serial(client: RawClient) -> int:
    stream = client.stream
    assert isinstance(stream, trio.SSLStream)
    der = stream.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(der)


async def plain(server: Server, address: tuple[str, int] | None = None) -> RawClient:
    """A raw client on the MX port (or *address*), the greeting read and EHLO said."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(*(address or (server.host, server.port)))
    raw = RawClient(stream)
    await raw.expect(f"220 {HOSTNAME}")
    await raw.dialog("c: EHLO client.test\ns: 250")
    return raw


async def starttls(raw: RawClient, files: TlsFiles) -> RawClient:
    await raw.dialog("c: STARTTLS\ns: 220 2.0.0")
    return await start_tls(raw, files.client_context())


# --- STARTTLS with smtplib ------------------------------------------------------------------------


async def test_smtplib_starttls_on_the_mx_port(
    tls_server: Server, tls_files: TlsFiles, mail_log: pytest.LogCaptureFixture
) -> None:
    context = tls_files.client_context()

    def session() -> tuple[dict[str, str], dict[str, str], dict[str, tuple[int, bytes]]]:
        with tls_server.smtp() as smtp:
            smtp.ehlo()
            before = dict(smtp.esmtp_features)
            smtp.starttls(context=context)
            smtp.ehlo()
            after = dict(smtp.esmtp_features)
            # AUTH is offered on port 25 over TLS, but not required.
            refused = smtp.sendmail("someone@client.test", [ALICE], MESSAGE)
            return before, after, refused

    before, after, refused = await in_thread(session)
    assert "starttls" in before
    assert "auth" not in before  # never before TLS
    assert "starttls" not in after  # RFC 3207 4.2
    assert after["auth"].split() == ["PLAIN", "LOGIN"]
    assert refused == {}
    (stored,) = tls_server.messages()
    assert stored.content == MESSAGE
    assert stored.envelope.auth is None
    # RFC 3848: ESMTPS, with the version and cipher in a comment, as Postfix writes it.
    lines = stored.received.split(b"\r\n\t")
    assert lines[0] == b"Received: from client.test ([127.0.0.1])"
    assert lines[1].startswith(b"(using TLSv1.3 with cipher TLS_")
    assert b" with ESMTPS id " in lines[2]
    (line,) = log_lines(mail_log, "tls")
    assert line.startswith("tls ip=127.0.0.1 version=TLSv1.3 cipher=TLS_")


async def test_without_tls_there_is_no_starttls(server: Server) -> None:
    raw = await server.connect()
    await raw.expect("220")
    (ehlo,) = await raw.dialog("c: EHLO client.test\ns: 250")
    assert "STARTTLS" not in ehlo.lines
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    await raw.dialog(
        """
        c: STARTTLS
        s: 502 5.5.1
        c: AUTH PLAIN AGFsaWNlAHNlY3JldA==
        s: 502 5.5.1
        """
    )
    await raw.aclose()


async def test_tls_1_2_is_accepted(tls_server: Server, tls_files: TlsFiles) -> None:
    context = tls_files.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = await plain(tls_server)
    await raw.dialog("c: STARTTLS\ns: 220")
    tls = await start_tls(raw, context)
    assert isinstance(tls.stream, trio.SSLStream)
    assert tls.stream.version() == "TLSv1.2"
    await tls.dialog("c: EHLO client.test\ns: 250\nc: QUIT\ns: 221")
    await tls.expect_closed()


# --- the STARTTLS injection (CVE-2011-0411) ---------------------------------------------------


@pytest.mark.parametrize("injected", ["RSET", "MAIL FROM:<evil@client.test>", "QUIT"])
@pytest.mark.parametrize("port", ["mx", "submission"])
async def test_commands_pipelined_after_starttls_are_never_executed(
    tls_server: Server, tls_files: TlsFiles, injected: str, port: str
) -> None:
    address = submission_address(tls_server) if port == "submission" else None
    raw = await plain(tls_server, address)
    # One write: the plain-text command after STARTTLS arrives with it.
    await raw.send(f"STARTTLS\r\n{injected}\r\n")
    await raw.expect("220 2.0.0")
    # Exactly one reply before the handshake: anything more (a reply to the injected command)
    # would sit in the buffer or break the handshake, and start_tls checks both.
    tls = await start_tls(raw, tls_files.client_context())
    # After the handshake: the first reply is the EHLO's, not one to the injected command.
    (ehlo,) = await tls.dialog("c: EHLO client.test\ns: 250")
    assert ehlo.lines[0].startswith(HOSTNAME)
    assert "STARTTLS" not in ehlo.lines
    if port == "submission":
        user = "alice@example.test"
        token = _plain_token(user, USERS[user])
        await tls.dialog(f"c: AUTH PLAIN {token}\ns: 235 2.7.0")
    # A MAIL now is not "nested" (503): the injected MAIL never ran, in either session.
    await tls.dialog(
        f"""
        c: MAIL FROM:<{ALICE}>
        s: 250 2.1.0
        c: RCPT TO:<bob@example.test>
        s: 250 2.1.5
        c: RSET
        s: 250
        c: QUIT
        s: 221
        closed
        """
    )
    assert tls_server.messages() == []


async def test_plain_text_after_the_220_breaks_only_that_handshake(
    tls_server: Server, tls_files: TlsFiles, mail_log: pytest.LogCaptureFixture
) -> None:
    # Commands sent in a later segment, after the 220, are read as a (broken) TLS handshake:
    # the connection closes without a word, and no command ran.
    raw = await plain(tls_server)
    await raw.dialog("c: STARTTLS\ns: 220 2.0.0")
    await raw.send("MAIL FROM:<evil@client.test>\r\nRCPT TO:<alice@example.test>\r\n")
    await raw.expect_closed()
    await wait_until(lambda: log_lines(mail_log, "disconnect"))
    (failed,) = log_lines(mail_log, "tls-failed")
    assert failed.startswith("tls-failed ip=127.0.0.1 reason=")
    assert not [r for r in mail_log.records if r.exc_info]  # no traceback
    # The server goes on serving.
    other = await plain(tls_server)
    tls = await starttls(other, tls_files)
    await tls.dialog("c: EHLO again.test\ns: 250\nc: QUIT\ns: 221")


# --- failed handshakes --------------------------------------------------------------------------


async def test_a_client_that_does_not_trust_the_certificate(
    tls_server: Server, mail_log: pytest.LogCaptureFixture
) -> None:
    raw = await plain(tls_server)
    await raw.dialog("c: STARTTLS\ns: 220")
    stranger = trustme.CA()  # the client trusts another CA: it aborts the handshake
    context = ssl.create_default_context()
    stranger.configure_trust(context)
    stream = trio.SSLStream(raw.stream, context, server_hostname=HOSTNAME)
    with trio.fail_after(TIMEOUT), pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()
    await trio.aclose_forcefully(stream)
    await wait_until(lambda: log_lines(mail_log, "disconnect"))
    assert log_lines(mail_log, "tls-failed")
    assert not log_lines(mail_log, "tls")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_1_1_is_refused(tls_server: Server, mail_log: pytest.LogCaptureFixture) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        # OpenSSL 3 refuses TLS 1.0/1.1 at its default security level, even as a client.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError) as exc:  # pragma: no cover - depends on the OpenSSL build
        pytest.skip(f"this OpenSSL cannot even try TLS 1.1: {exc}")
    address = submissions_address(tls_server)
    with trio.fail_after(TIMEOUT):
        tcp = await trio.open_tcp_stream(*address)
    stream = trio.SSLStream(tcp, context, server_hostname=HOSTNAME)
    with trio.fail_after(TIMEOUT), pytest.raises(trio.BrokenResourceError) as info:
        await stream.do_handshake()
    await trio.aclose_forcefully(stream)
    reason = str(info.value.__cause__)
    if "NO_PROTOCOLS_AVAILABLE" in reason or "no protocols available" in reason:
        pytest.skip(f"this OpenSSL cannot offer TLS 1.1: {reason}")  # pragma: no cover
    # The server got the TLS 1.1 ClientHello and refused it.
    await wait_until(lambda: log_lines(mail_log, "disconnect"))
    (failed,) = log_lines(mail_log, "tls-failed")
    assert failed == "tls-failed ip=127.0.0.1 reason=UNSUPPORTED_PROTOCOL"


async def test_plain_smtp_on_the_implicit_tls_port(
    tls_server: Server, mail_log: pytest.LogCaptureFixture
) -> None:
    # A client that speaks SMTP in the clear to port 465 waits for a greeting that never
    # comes; once it speaks, the handshake fails and the connection closes.
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(*submissions_address(tls_server))
    raw = RawClient(stream)
    await raw.send("EHLO client.test\r\n")
    await raw.expect_closed()
    await wait_until(lambda: log_lines(mail_log, "disconnect"))
    (failed,) = log_lines(mail_log, "tls-failed")
    assert "ip=127.0.0.1" in failed


async def test_a_client_that_hangs_up_in_the_handshake(
    tls_server: Server, mail_log: pytest.LogCaptureFixture
) -> None:
    raw = await plain(tls_server)
    await raw.dialog("c: STARTTLS\ns: 220")
    await raw.aclose()
    await wait_until(lambda: log_lines(mail_log, "disconnect"))
    assert log_lines(mail_log, "tls-failed")


async def test_the_handshake_has_its_own_deadline(
    start_server: StartServer, make_tls_config: MakeConfig, mail_log: pytest.LogCaptureFixture
) -> None:
    server = await start_server(make_tls_config(limits={"command_timeout": 1}))

    async def after_starttls() -> None:
        raw = await plain(server)
        await raw.dialog("c: STARTTLS\ns: 220")
        # The client never starts the handshake: the server gives up, without a plain 421.
        await raw.expect_closed()

    async def on_the_implicit_tls_port() -> None:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream(*submissions_address(server))
        await RawClient(stream).expect_closed()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(after_starttls)
        nursery.start_soon(on_the_implicit_tls_port)
    assert log_lines(mail_log, "timeout") == ["timeout ip=127.0.0.1 stage=tls"] * 2


# --- implicit TLS (port 465) ----------------------------------------------------------------------


async def test_smtplib_smtp_ssl(tls_server: Server, tls_files: TlsFiles) -> None:
    host, port = submissions_address(tls_server)
    context = tls_files.client_context()

    def session() -> dict[str, str]:
        with smtplib.SMTP_SSL(
            host, port, local_hostname="client.test", timeout=TIMEOUT, context=context
        ) as smtp:
            smtp.ehlo()
            features = dict(smtp.esmtp_features)
            smtp.login(ALICE, USERS[ALICE])
            smtp.sendmail(ALICE, ["bob@example.test"], MESSAGE)
            return features

    features = await in_thread(session)
    assert "starttls" not in features
    assert features["auth"].split() == ["PLAIN", "LOGIN"]
    (stored,) = tls_server.messages()
    assert stored.envelope.auth == ALICE
    assert b" with ESMTPSA id " in stored.received


async def test_over_the_limit_on_the_implicit_tls_port(
    start_server: StartServer,
    make_tls_config: MakeConfig,
    tls_files: TlsFiles,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    server = await start_server(make_tls_config(limits={"max_connections_per_ip": 1}))
    first = await connect_tls(submissions_address(server), tls_files.client_context())
    await first.expect(f"220 {HOSTNAME}")
    # No handshake is spent on a refused client, and no plain-text 421 garbles its TLS.
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(*submissions_address(server))
    await RawClient(stream).expect_closed()
    (reject,) = log_lines(mail_log, "reject")
    assert reject.startswith("reject ip=127.0.0.1 verb=CONNECT code=421")
    await first.dialog("c: QUIT\ns: 221\nclosed")


async def test_shutdown_says_goodbye_over_tls(tls_server: Server, tls_files: TlsFiles) -> None:
    client = await connect_tls(submissions_address(tls_server), tls_files.client_context())
    await client.expect(f"220 {HOSTNAME}")
    await client.dialog("c: EHLO client.test\ns: 250")
    await tls_server.stop()
    await client.expect("421 4.3.2")
    await client.expect_closed()


# --- swaks ---------------------------------------------------------------------------------------

swaks = pytest.mark.skipif(
    shutil.which("swaks") is None and not os.environ.get("KATERCHEN_REQUIRE_TOOLS"),
    reason="swaks is not installed",
)


async def run_swaks(address: tuple[str, int], *args: str) -> tuple[int, str]:
    command = [
        "swaks",
        "--server",
        address[0],
        "--port",
        str(address[1]),
        "--helo",
        "swaks.client.test",
        "--timeout",
        str(int(TIMEOUT)),
        *args,
    ]
    with trio.fail_after(TIMEOUT * 2):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    return result.returncode, result.stdout.decode() + result.stderr.decode()


@swaks
async def test_swaks_starttls_verified(
    tls_server: Server, tls_files: TlsFiles, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    tls_files.ca.cert_pem.write_to_path(str(ca))
    status, output = await run_swaks(
        (tls_server.host, tls_server.port),
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        str(ca),
        "--to",
        ALICE,
        "--from",
        "someone@client.test",
    )
    assert status == 0, output
    assert "TLS started" in output, output
    (stored,) = tls_server.messages()
    assert b" with ESMTPS id " in stored.received


@swaks
async def test_swaks_tls_on_connect_with_auth(tls_server: Server) -> None:
    status, output = await run_swaks(
        submissions_address(tls_server),
        "--tlsc",
        "--auth",
        "PLAIN",
        "--auth-user",
        ALICE,
        "--auth-password",
        USERS[ALICE],
        "--to",
        "bob@example.test",
        "--from",
        ALICE,
    )
    assert status == 0, output
    assert "235 2.7.0" in output, output
    (stored,) = tls_server.messages()
    assert stored.envelope.auth == ALICE


# --- certificate reload ---------------------------------------------------------------------------


def replace_certificate(files: TlsFiles, new: TlsFiles) -> None:
    """Put *new*'s certificate and key in *files*' place, each by an atomic rename."""
    os.replace(new.certificate, files.certificate)
    os.replace(new.key, files.key)


async def test_changed_files_are_seen_by_new_connections(
    tls_server: Server,
    tls_files: TlsFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tlsconfig, "CHECK_INTERVAL", 0.0)  # look at every new connection
    context = tls_files.client_context()
    first = await connect_tls(submissions_address(tls_server), context)
    await first.expect("220")
    assert peer_serial(first) == serial_of_files(tls_files)

    new = issue_tls_files(tls_files.ca, tmp_path / "new")
    new_serial = serial_of_files(new)
    replace_certificate(tls_files, new)
    second = await connect_tls(submissions_address(tls_server), context)
    await second.expect("220")
    assert peer_serial(second) == new_serial
    assert log_lines(mail_log, "tls-reloaded")[0].startswith("tls-reloaded reason=changed")
    # The first connection is undisturbed.
    await first.dialog("c: EHLO client.test\ns: 250\nc: NOOP\ns: 250\nc: QUIT\ns: 221")
    await second.dialog("c: QUIT\ns: 221")


async def test_a_broken_new_key_keeps_the_old_certificate(
    tls_server: Server,
    tls_files: TlsFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tlsconfig, "CHECK_INTERVAL", 0.0)
    old_serial = serial_of_files(tls_files)
    # A certificate whose key is not there yet (a renewal caught half-way).
    new = issue_tls_files(tls_files.ca, tmp_path / "new")
    os.replace(new.certificate, tls_files.certificate)
    client = await connect_tls(submissions_address(tls_server), tls_files.client_context())
    await client.expect("220")
    assert peer_serial(client) == old_serial
    (error,) = log_lines(mail_log, "tls-reload-error")
    assert 'key="[tls] key"' in error and "does not match" in error
    # The key arrives: the next connection gets the new pair.
    os.replace(new.key, tls_files.key)
    later = await connect_tls(submissions_address(tls_server), tls_files.client_context())
    await later.expect("220")
    assert peer_serial(later) == serial_of_files(tls_files)
    await client.dialog("c: QUIT\ns: 221")
    await later.dialog("c: QUIT\ns: 221")


@pytest.fixture
async def server_process(
    tmp_path: Path, tls_files: TlsFiles
) -> AsyncIterator[tuple[trio.Process, ProcessLog]]:
    """`python -m katerchen serve` with [tls] and a submissions listener, its log read as it
    comes."""
    (tmp_path / "domains" / "example.test" / "alice").mkdir(parents=True)
    text = config_toml(server={"submissions": ["127.0.0.1:0"]})
    text += f'\n[tls]\ncertificate = "{tls_files.certificate}"\nkey = "{tls_files.key}"\n'
    config = tmp_path / "katerchen.toml"
    config.write_text(text)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "katerchen", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log = ProcessLog()
    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(log.read, process.stderr)
            yield process, log
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(TIMEOUT):
                assert await process.wait() == 0, log.text
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class ProcessLog:
    """The stderr of a server process, gathered as it arrives."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = trio.Event()

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        while data := await stream.receive_some():
            self.text += data.decode("utf-8", "replace")
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, fragment: str, count: int = 1) -> str:
        """Wait until *fragment* has appeared *count* times; the line of the last one."""
        with trio.fail_after(TIMEOUT):
            while self.text.count(fragment) < count:
                await self._changed.wait()
        lines = [line for line in self.text.splitlines() if fragment in line]
        return lines[count - 1]


async def test_sighup_reloads_the_certificate(
    server_process: tuple[trio.Process, ProcessLog], tls_files: TlsFiles, tmp_path: Path
) -> None:
    process, log = server_process
    listening = await log.wait_for(" listening ")
    submissions = listening.split("submissions=", 1)[1].split()[0]
    host, _, port = submissions.rpartition(":")
    address = (host, int(port))
    context = tls_files.client_context()

    before = await connect_tls(address, context)
    await before.expect(f"220 {HOSTNAME}")
    await before.dialog("c: EHLO client.test\ns: 250")
    assert peer_serial(before) == serial_of_files(tls_files)

    new = issue_tls_files(tls_files.ca, tmp_path / "new")
    new_serial = serial_of_files(new)
    replace_certificate(tls_files, new)
    process.send_signal(signal.SIGHUP)
    await log.wait_for("tls-reloaded reason=sighup")

    after = await connect_tls(address, context)
    await after.expect(f"220 {HOSTNAME}")
    assert peer_serial(after) == new_serial
    # The connection opened before the reload goes on with its certificate.
    await before.dialog(
        """
        c: NOOP
        s: 250
        c: QUIT
        s: 221
        closed
        """
    )
    await after.dialog("c: QUIT\ns: 221\nclosed")
    assert "Traceback" not in log.text


def _plain_token(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()
