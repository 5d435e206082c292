"""Shared fixtures: a Config in tmp_path, a server running in the test's nursery, and clients.

Servers listen on 127.0.0.1 port 0 and write to real directories under tmp_path.  Clients are
smtplib (blocking, so it runs in a worker thread: :func:`in_thread`) and :class:`RawClient`, a
byte-exact socket client for dialogs written as transcripts (:meth:`RawClient.dialog`).
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trustme

from katerchen import app
from katerchen.config import Config
from katerchen.envelope import Envelope
from tests.fakepeer import FakePeer, Script

HOSTNAME = "mx.example.test"
DOMAIN = "example.test"
MAILBOXES = ("alice", "bob")
#: Upper bound for any single wait in a test: a hang fails fast instead of stalling the run.
TIMEOUT = 10.0

T = TypeVar("T")


# --- config ------------------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def config_toml(
    *, server: dict[str, object] | None = None, limits: dict[str, object] | None = None
) -> str:
    """The test config as TOML; *server* and *limits* override or add keys."""
    server_keys: dict[str, object] = {
        "hostname": HOSTNAME,
        "listen": ["127.0.0.1:0"],
        "shutdown_grace": 5,
    }
    server_keys.update(server or {})
    limit_keys: dict[str, object] = {
        "max_message_size": 1_000_000,
        "max_recipients": 5,
        "command_timeout": 10,
        "data_timeout": 10,
    }
    limit_keys.update(limits or {})
    lines = ["[server]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in server_keys.items()]
    lines += [
        "",
        "[directories]",
        'incoming = "spool/incoming"',
        'received = "spool/received"',
        'relay = "spool/relay"',
        'domains = "domains"',
        "",
        "[limits]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in limit_keys.items()]
    return "\n".join(lines) + "\n"


MakeConfig = Callable[..., Config]


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """``make_config(server={...}, limits={...})``: a Config rooted in tmp_path, with the domain
    example.test and the mailboxes alice and bob created as directories."""

    def make(
        *, server: dict[str, object] | None = None, limits: dict[str, object] | None = None
    ) -> Config:
        for mailbox in MAILBOXES:
            (tmp_path / "domains" / DOMAIN / mailbox).mkdir(parents=True, exist_ok=True)
        return Config.from_toml(config_toml(server=server, limits=limits), base_dir=tmp_path)

    return make


@pytest.fixture
def config(make_config: MakeConfig) -> Config:
    return make_config()


# --- logs --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def mail_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture katerchen's log lines; fail the test if a session crashed on a bug."""
    caplog.set_level(logging.INFO, logger="katerchen")
    yield caplog
    crashes = [r for r in caplog.records if r.getMessage().startswith("internal-error")]
    assert not crashes, crashes[0].exc_text or crashes[0].getMessage()


def log_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "katerchen" and r.getMessage().split(" ", 1)[0] == event
    ]


# --- the server --------------------------------------------------------------------------------


@attrs.frozen
class StoredMessage:
    """A spool file taken apart: pre-header, Received header, message bytes."""

    path: Path
    envelope: Envelope
    received: bytes  # the Received: header, folded, with its final CRLF
    content: bytes  # the message exactly as received

    @classmethod
    def read(cls, path: Path) -> StoredMessage:
        data = path.read_bytes()
        envelope, offset = Envelope.decode(data)
        assert data.startswith(b"Received: ", offset), data[offset : offset + 40]
        # The header ends at the first CRLF that is not followed by a folding tab.
        end = offset
        while True:
            end = data.index(b"\r\n", end) + 2
            if data[end : end + 1] not in (b"\t", b" "):
                break
        return cls(path, envelope, data[offset:end], data[end:])


@attrs.define
class Server:
    """A server running in the test's nursery."""

    config: Config
    running: app.RunningServer
    stopped: trio.Event

    @property
    def host(self) -> str:
        return self.running.addresses[0][0]

    @property
    def port(self) -> int:
        return self.running.addresses[0][1]

    def received(self) -> list[Path]:
        return sorted(self.config.directories.received.iterdir())

    def incoming(self) -> list[Path]:
        return sorted(self.config.directories.incoming.iterdir())

    def messages(self) -> list[StoredMessage]:
        return [StoredMessage.read(path) for path in self.received()]

    def message(self, queue_id: str) -> StoredMessage:
        return StoredMessage.read(self.config.directories.received / queue_id)

    async def stop(self) -> None:
        """Shut down and wait until run() has returned."""
        self.running.shutdown()
        with trio.fail_after(TIMEOUT):
            await self.stopped.wait()

    async def connect(self) -> RawClient:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream(self.host, self.port)
        return RawClient(stream)

    def smtp(self) -> smtplib.SMTP:
        """A connected smtplib client (BLOCKING: call inside :func:`in_thread`)."""
        return smtplib.SMTP(self.host, self.port, local_hostname="client.test", timeout=TIMEOUT)


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server(nursery: trio.Nursery) -> AsyncIterator[StartServer]:
    """``await start_server(config, handle_signals=False, deliver=False)``: run app.run(config)
    in the test's nursery; it is shut down (and must return) when the test ends.

    Without *deliver* no delivery task runs, so what the receiver wrote stays in received/ for
    the test to look at; tests of delivery pass ``deliver=True``."""
    servers: list[Server] = []

    async def start(
        config: Config, *, handle_signals: bool = False, deliver: bool = False
    ) -> Server:
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[app.RunningServer]) -> None:
            try:
                await app.run(
                    config,
                    handle_signals=handle_signals,
                    deliver=deliver,
                    task_status=task_status,
                )
            finally:
                stopped.set()

        with trio.fail_after(TIMEOUT):
            running: app.RunningServer = await nursery.start(run)
        server = Server(config, running, stopped)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(start_server: StartServer, config: Config) -> Server:
    return await start_server(config)


async def wait_until(condition: Callable[[], object]) -> None:
    """Poll *condition* at trio checkpoints until it is true; fail after TIMEOUT."""
    with trio.fail_after(TIMEOUT):
        while not condition():
            await trio.sleep(0.01)


# --- clients -----------------------------------------------------------------------------------


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking client code (smtplib, a subprocess) in a worker thread."""
    with trio.fail_after(TIMEOUT * 3):
        return await trio.to_thread.run_sync(fn, *args)


@attrs.frozen
class RawReply:
    code: int
    lines: tuple[str, ...]  # text after "250-" / "250 ", one per line

    def __str__(self) -> str:
        return f"{self.code} {self.lines[0]}"

    @property
    def enhanced(self) -> str:
        return self.lines[-1].split(" ", 1)[0]


@attrs.define
class RawClient:
    """A byte-exact SMTP client over a real socket; every read fails after TIMEOUT."""

    stream: trio.SocketStream
    _buffer: bytearray = attrs.field(factory=bytearray)
    _eof: bool = False

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        with trio.fail_after(TIMEOUT):
            await self.stream.send_all(data)

    async def _fill(self) -> bool:
        with trio.fail_after(TIMEOUT):
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                data = b""  # a reset counts as closed
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    async def read_line(self) -> str:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line.decode("utf-8")
            if not await self._fill():
                raise EOFError(f"connection closed; unterminated: {bytes(self._buffer)!r}")

    async def read_reply(self) -> RawReply:
        lines = []
        code = None
        while True:
            line = await self.read_line()
            assert len(line) >= 4 and line[:3].isdigit() and line[3] in " -", line
            assert code is None or int(line[:3]) == code, line
            code = int(line[:3])
            lines.append(line[4:])
            if line[3] == " ":
                return RawReply(code, tuple(lines))

    async def expect(self, expected: str) -> RawReply:
        """Read one reply; ``str(reply)`` ("250 2.1.0 Ok") must start with *expected*."""
        reply = await self.read_reply()
        assert str(reply).startswith(expected), f"expected {expected!r}, got {reply}"
        return reply

    async def expect_closed(self) -> None:
        """The server closes the connection without sending anything more."""
        while not self._eof:
            await self._fill()
        assert not self._buffer, bytes(self._buffer)

    async def command(self, line: str) -> RawReply:
        await self.send(line + "\r\n")
        return await self.read_reply()

    async def dialog(self, script: str) -> list[RawReply]:
        """Play a transcript.  ``c: TEXT`` sends TEXT CRLF (consecutive c: lines go in one
        write: pipelining); ``s: PREFIX`` reads one reply whose "code first-line" starts with
        PREFIX; ``closed`` expects the server to close.  Returns the replies read."""
        replies = []
        pending: list[str] = []
        for raw in textwrap.dedent(script).strip("\n").splitlines():
            line = raw.strip()
            if line.startswith("c:"):
                pending.append(line[3:] if line.startswith("c: ") else line[2:])
                continue
            if pending:
                await self.send("".join(p + "\r\n" for p in pending))
                pending = []
            if line.startswith("s:"):
                replies.append(await self.expect(line[3:]))
            elif line == "closed":
                await self.expect_closed()
            elif line:
                raise ValueError(f"bad transcript line {line!r}")
        if pending:
            await self.send("".join(p + "\r\n" for p in pending))
        return replies

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[RawClient]:
    """A raw client connected to the default server, the greeting already read."""
    raw = await server.connect()
    await raw.expect(f"220 {HOSTNAME}")
    yield raw
    await raw.aclose()


# --- relay tests: scripted fake SMTP peers ------------------------------------------------------


@pytest.fixture
def start_fake_peer(nursery: trio.Nursery) -> Callable[..., Awaitable[FakePeer]]:
    """``await start_fake_peer(Script(...), ..., ssl_context=None)``: a :class:`FakePeer` on
    127.0.0.1 port 0 running in the test's nursery (``peer.port``); connection n follows the
    n-th script, the last one repeating."""

    async def start(*scripts: Script, ssl_context: ssl.SSLContext | None = None) -> FakePeer:
        peer = FakePeer(scripts or (Script(),), ssl_context=ssl_context)
        with trio.fail_after(TIMEOUT):
            await nursery.start(peer.serve)
        return peer

    return start


# --- TLS and AUTH: trustme certificates, a users file, TLS clients (tls-io) ----------------------

#: The users in make_tls_config's users file, address -> password.
USERS = {"alice@example.test": "alice's secret", "bob@example.test": "bob's secret"}


@attrs.frozen
class TlsFiles:
    """A server certificate (for HOSTNAME, localhost and 127.0.0.1) issued by a trustme CA,
    written as PEM files."""

    ca: trustme.CA
    cert: trustme.LeafCert
    certificate: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts the CA (and checks the host name)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def issue_tls_files(ca: trustme.CA, directory: Path, name: str = "server") -> TlsFiles:
    """Issue a server certificate from *ca* into *directory*/<name>.crt and <name>.key."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(HOSTNAME, "localhost", "127.0.0.1")
    certificate, key = directory / f"{name}.crt", directory / f"{name}.key"
    certificate.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return TlsFiles(ca, cert, certificate, key)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path: Path, tls_ca: trustme.CA) -> TlsFiles:
    return issue_tls_files(tls_ca, tmp_path / "tls")


def write_users(path: Path, users: dict[str, str]) -> None:
    """A users file with cheap scrypt hashes (the parameters are in each hash)."""
    from katerchen.auth import hash_password

    path.write_text("".join(f"{a}:{hash_password(p, log2_n=4)}\n" for a, p in users.items()))
    path.chmod(0o600)


@pytest.fixture
def make_tls_config(tmp_path: Path, tls_files: TlsFiles) -> MakeConfig:
    """``make_tls_config(server={...}, limits={...}, auth={...}, extra="")``: like make_config,
    plus [tls] with tls_files, one submission and one submissions listener on 127.0.0.1 port 0,
    [auth] with the users file tmp_path/users holding USERS, and *extra* TOML at the end."""

    def make(
        *,
        server: dict[str, object] | None = None,
        limits: dict[str, object] | None = None,
        auth: dict[str, object] | None = None,
        extra: str = "",
    ) -> Config:
        for mailbox in MAILBOXES:
            (tmp_path / "domains" / DOMAIN / mailbox).mkdir(parents=True, exist_ok=True)
        users = tmp_path / "users"
        if not users.exists():
            write_users(users, USERS)
        server_keys: dict[str, object] = {
            "submission": ["127.0.0.1:0"],
            "submissions": ["127.0.0.1:0"],
        }
        server_keys.update(server or {})
        auth_keys: dict[str, object] = {"users_file": "users"}
        auth_keys.update(auth or {})
        text = config_toml(server=server_keys, limits=limits)
        text += "\n[tls]\n"
        text += f"certificate = {_toml_value(str(tls_files.certificate))}\n"
        text += f"key = {_toml_value(str(tls_files.key))}\n"
        text += "\n[auth]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in auth_keys.items())
        return Config.from_toml(text + extra, base_dir=tmp_path)

    return make


@pytest.fixture
async def tls_server(start_server: StartServer, make_tls_config: MakeConfig) -> Server:
    """A server with [tls], a submission and a submissions listener, and USERS."""
    return await start_server(make_tls_config())


def submission_address(server: Server) -> tuple[str, int]:
    return server.running.submission_addresses[0]


def submissions_address(server: Server) -> tuple[str, int]:
    return server.running.submissions_addresses[0]


async def start_tls(
    raw: RawClient, context: ssl.SSLContext, server_hostname: str = HOSTNAME
) -> RawClient:
    """After the 220 to STARTTLS: the TLS handshake over *raw*'s stream, a RawClient over the
    TLS stream.  Fails when the server sent anything after the 220 (it would be a reply to a
    command pipelined after STARTTLS)."""
    assert not raw._buffer, f"bytes after the 220: {bytes(raw._buffer)!r}"
    stream = trio.SSLStream(raw.stream, context, server_hostname=server_hostname)
    with trio.fail_after(TIMEOUT):
        await stream.do_handshake()
    return RawClient(stream)  # type: ignore[arg-type]


async def connect_tls(
    address: tuple[str, int], context: ssl.SSLContext, server_hostname: str = HOSTNAME
) -> RawClient:
    """A RawClient over implicit TLS (port 465 style), the handshake done."""
    with trio.fail_after(TIMEOUT):
        tcp = await trio.open_tcp_stream(*address)
        stream = trio.SSLStream(tcp, context, server_hostname=server_hostname)
        await stream.do_handshake()
    return RawClient(stream)  # type: ignore[arg-type]
