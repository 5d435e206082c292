"""Init systems: readiness through NOTIFY_SOCKET, sockets passed through LISTEN_FDS, the pidfile,
and the files in scripts/ (systemd service and socket units, an OpenRC script).

The protocols are tested against real processes: ``python -m katerchen serve`` started the way
systemd starts it (the sockets at fd 3 and up, LISTEN_PID the server's own pid), talking SMTP
over the passed socket; and, where installed, under ``systemd-socket-activate`` itself."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from katerchen import app, daemon
from katerchen.daemon import Notifier, PassedSocket
from tests.conftest import (
    DOMAIN,
    HOSTNAME,
    TIMEOUT,
    MakeConfig,
    RawClient,
    StartServer,
    config_toml,
    log_lines,
)
from tests.test_cli import DEADLINE, ServerProcess, free_port, port_is_free
from tests.test_receiver import send_one

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

#: Puts the socket given as its first argument at fd 3, sets LISTEN_PID to its own pid (which
#: exec keeps) and execs the rest of its arguments: what systemd does before it starts a service.
LISTEN_WRAPPER = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def write_config(directory: Path, text: str) -> Path:
    (directory / "domains" / DOMAIN / "alice").mkdir(parents=True, exist_ok=True)
    path = directory / "katerchen.toml"
    path.write_text(text)
    return path


def bound_port(line: str) -> int:
    """The port in ``listening addresses=127.0.0.1:41234``."""
    match = re.search(r"addresses=127\.0\.0\.1:(\d+)", line)
    assert match, line
    return int(match.group(1))


def send(port: int, subject: str = "hello") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
        assert client.ehlo()[0] == 250
        client.sendmail("a@client.test", [f"alice@{DOMAIN}"], f"Subject: {subject}\r\n\r\nhi\r\n")


def delivered(directory: Path) -> list[Path]:
    new = directory / "domains" / DOMAIN / "alice" / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kn-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class NotifyListener:
    """The init system's side of NOTIFY_SOCKET: a bound Unix datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(DEADLINE)
        self.messages: list[str] = []

    def wait_for(self, assignment: str) -> list[str]:
        """Datagrams until one holds *assignment*; its lines."""
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                raise AssertionError(f"no {assignment!r}; got {self.messages}") from None
            self.messages.append(data.decode())
            lines = data.decode().split("\n")
            if assignment in lines:
                return lines

    def close(self) -> None:
        self.sock.close()


# --- NOTIFY_SOCKET ------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_reloading_stopping_through_notify_socket(short_dir: Path, abstract: bool) -> None:
    path = write_config(short_dir, config_toml())  # listen on port 0: STATUS= says which
    if abstract:
        name = f"katerchen-test-{os.getpid()}-{short_dir.name}"
        listener = NotifyListener("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name}
    else:
        listener = NotifyListener(str(short_dir / "notify"))
        env = {"NOTIFY_SOCKET": str(short_dir / "notify")}
    process = ServerProcess(["serve", "--config", str(path)], cwd=short_dir, env=env)
    try:
        ready = listener.wait_for("READY=1")
        # READY=1 means listening: the port answers right away, no log line waited for.
        (status_line,) = [line for line in ready if line.startswith("STATUS=")]
        assert status_line.startswith("STATUS=accepting mail on 127.0.0.1:")
        send(int(status_line.rsplit(":", 1)[1]))
        process.proc.send_signal(signal.SIGHUP)
        reloading = listener.wait_for("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        listener.wait_for("READY=1")
        process.proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING=1")
        status = process.proc.wait(timeout=DEADLINE)
    finally:
        process.kill()
        listener.close()
    assert status == 0


def test_notifier_from_environment() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier.from_environment(env) == Notifier("/run/systemd/notify")
    assert env == {}  # taken out, as sd_notify(unset_environment=1) does
    assert Notifier.from_environment({"NOTIFY_SOCKET": "@name"}) == Notifier("\0name")
    assert Notifier.from_environment({}) is None
    kept = {"NOTIFY_SOCKET": "/x"}
    assert Notifier.from_environment(kept, unset=False) == Notifier("/x")
    assert kept == {"NOTIFY_SOCKET": "/x"}
    with pytest.raises(ValueError, match="vsock"):
        Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})


def test_notify_without_a_listener_raises_oserror(short_dir: Path) -> None:
    with pytest.raises(OSError):
        Notifier(str(short_dir / "nobody-listens")).notify("READY=1")


async def test_a_lost_notification_is_logged_not_fatal(
    make_config: MakeConfig,
    short_dir: Path,
    nursery: trio.Nursery,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    config = make_config()

    async def run(*, task_status: trio.TaskStatus[app.RunningServer]) -> None:
        notifier = Notifier(str(short_dir / "nobody-listens"))
        await app.run(config, notify=notifier, task_status=task_status)

    with trio.fail_after(TIMEOUT):
        running: app.RunningServer = await nursery.start(run)
    client = RawClient(await trio.open_tcp_stream(*running.addresses[0]))
    await client.expect(f"220 {HOSTNAME}")
    (line,) = log_lines(mail_log, "notify-failed")
    assert line.startswith('notify-failed state="READY=1" error=')
    running.shutdown()


# --- LISTEN_FDS ---------------------------------------------------------------------------------


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_listen_fds_socket_passing(tmp_path: Path) -> None:
    """The test binds the socket, katerchen gets it as fd 3 and serves SMTP on it; the
    configured [server] listen address is not bound."""
    configured = free_port()
    path = write_config(
        tmp_path, config_toml(server={"listen": [f"127.0.0.1:{configured}"], "shutdown_grace": 1})
    )
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        fd = sock.fileno()
        process = ServerProcess(
            ["serve", "--config", str(path)],
            cwd=tmp_path,
            env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "listen"},
            pass_fds=(fd,),
            wrapper=[sys.executable, "-c", LISTEN_WRAPPER, str(fd)],
        )
    # Closed here: from now on only katerchen holds the socket.
    try:
        line = process.wait_for("listen-passed")
        assert f"addresses=127.0.0.1:{port}" in line and "fds=3" in line
        assert f"ignored=127.0.0.1:{configured}" in line
        process.wait_for(f"listening addresses=127.0.0.1:{port}")
        send(port, "over a passed socket")
        process.wait_for("delivered id=")
        assert port_is_free(configured)
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0, "\n".join(process.lines)
    assert len(delivered(tmp_path)) == 1


def test_listen_fds_for_another_process_are_ignored(tmp_path: Path) -> None:
    """LISTEN_PID names a parent: the sockets are not ours, the configured address is bound."""
    path = write_config(tmp_path, config_toml())
    process = ServerProcess(
        ["serve", "--config", str(path)],
        cwd=tmp_path,
        env={"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())},
    )
    try:
        send(bound_port(process.wait_for("listening addresses=127.0.0.1:")))
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0
    assert not any("listen-passed" in line for line in process.lines)


def test_an_unusable_passed_socket_fails_the_start(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_toml())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        fd = udp.fileno()
        process = ServerProcess(
            ["serve", "--config", str(path)],
            cwd=tmp_path,
            env={"LISTEN_FDS": "1"},
            pass_fds=(fd,),
            wrapper=[sys.executable, "-c", LISTEN_WRAPPER, str(fd)],
        )
    try:
        status = process.proc.wait(timeout=DEADLINE)
        process.stop()
    finally:
        process.kill()
    assert status == 1
    (line,) = [line for line in process.lines if " error " in line]
    assert "cannot-start" in line and "not a stream (TCP) socket" in line


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="no systemd")
def test_under_systemd_socket_activate(tmp_path: Path) -> None:
    """systemd's own socket activation tool binds the port and starts katerchen."""
    port = free_port()
    path = write_config(tmp_path, config_toml(server={"listen": ["127.0.0.1:0"]}))
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    process = ServerProcess(
        ["serve", "--config", str(path)],
        cwd=tmp_path,
        wrapper=[tool, "--listen", f"127.0.0.1:{port}", "--fdname=listen"],
    )
    try:
        process.wait_for(f"Listening on 127.0.0.1:{port}")
        # The tool starts katerchen at the first connection.
        send(port, "socket activated")
        process.wait_for("listen-passed kind=listen")
        process.wait_for("delivered id=")
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0, "\n".join(process.lines)
    assert len(delivered(tmp_path)) == 1


async def test_passed_sockets_by_name(
    make_tls_config: MakeConfig,
    nursery: trio.Nursery,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    """In-process: "submission" serves the submission port, other names port 25; a kind that got
    a socket does not bind its configured addresses, the others do."""
    config = make_tls_config()
    mx, submission = listening_socket(), listening_socket()
    passed = [PassedSocket("submission", submission), PassedSocket("smtp", mx)]

    async def run(*, task_status: trio.TaskStatus[app.RunningServer]) -> None:
        await app.run(config, sockets=passed, deliver=False, task_status=task_status)

    with trio.fail_after(TIMEOUT):
        running: app.RunningServer = await nursery.start(run)
    assert running.addresses == [mx.getsockname()]
    assert running.submission_addresses == [submission.getsockname()]
    assert len(running.submissions_addresses) == 1  # configured, bound by katerchen
    client = RawClient(await trio.open_tcp_stream(*running.submission_addresses[0]))
    await client.expect("220")
    await client.command("EHLO client.test")
    # The submission port: AUTH first.
    assert (await client.command("MAIL FROM:<a@client.test>")).code == 530
    smtp = RawClient(await trio.open_tcp_stream(*running.addresses[0]))
    await smtp.expect("220")
    await smtp.command("EHLO client.test")
    await send_one(smtp)
    lines = log_lines(mail_log, "listen-passed")
    assert [line.split()[1] for line in lines] == ["kind=listen", "kind=submission"]
    # Reloads leave passed sockets alone.
    assert await running.reload(make_tls_config(server={"hostname": "new.example.test"}))
    assert running.addresses == [mx.getsockname()]
    running.shutdown()


async def test_a_passed_submission_socket_needs_tls(
    make_config: MakeConfig, nursery: trio.Nursery
) -> None:
    sock = listening_socket()
    with pytest.raises(OSError, match="passed a submissions socket"):
        await app.run(make_config(), sockets=[PassedSocket("submissions", sock)])
    assert sock.fileno() == -1  # closed


def test_listen_fds_environment() -> None:
    pid = 4242
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert daemon.listen_fds(env, pid=pid) == []
    assert env == {}  # unset, whoever they were for
    assert daemon.listen_fds({}, pid=pid) == []
    assert daemon.listen_fds({"LISTEN_FDS": "1"}, pid=pid) == []  # no LISTEN_PID: not ours
    with pytest.raises(ValueError, match="not a number"):
        daemon.listen_fds({"LISTEN_PID": str(pid), "LISTEN_FDS": "x"}, pid=pid)
    with pytest.raises(ValueError, match="names 1 sockets"):
        daemon.listen_fds(
            {"LISTEN_PID": str(pid), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}, pid=pid
        )
    kept = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    daemon.listen_fds(kept, pid=pid, unset=False)
    assert kept == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


def test_what_a_passed_descriptor_must_be() -> None:
    read, write = os.pipe()
    try:
        with pytest.raises(ValueError, match="not a socket"):
            daemon._listening_socket(read)
    finally:
        os.close(read)
        os.close(write)
    for sock, error in [
        (socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "not a stream"),
        (socket.socket(), "not listening"),
        (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "not an IPv4 or IPv6"),
    ]:
        with sock, pytest.raises(ValueError, match=error):
            daemon._listening_socket(sock.fileno())
        # Left open for its owner: the check never closes a descriptor it refuses.
    with listening_socket() as sock:
        passed = daemon._listening_socket(os.dup(sock.fileno()))
        assert passed.getsockname() == sock.getsockname()
        assert not os.get_inheritable(passed.fileno())
        passed.close()


# --- the pidfile --------------------------------------------------------------------------------


def test_pidfile_option(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_toml())
    pidfile = tmp_path / "run" / "katerchen.pid"
    pidfile.parent.mkdir()
    process = ServerProcess(
        ["serve", "--config", str(path), "--pidfile", "run/katerchen.pid"], cwd=tmp_path
    )
    try:
        process.wait_for("listening")
        # Written before "listening" (after the ports were bound).
        assert pidfile.read_text() == f"{process.proc.pid}\n"
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0
    assert not pidfile.exists()


def test_pidfile_key_and_queue_flush(tmp_path: Path) -> None:
    """[server] pidfile, and ``katerchen queue flush`` finding the server through it."""
    text = config_toml(server={"pidfile": "katerchen.pid"})
    path = write_config(tmp_path, text)
    process = ServerProcess(["serve", "--config", str(path)], cwd=tmp_path)
    try:
        process.wait_for("listening")
        assert (tmp_path / "katerchen.pid").read_text().strip() == str(process.proc.pid)
        flush = subprocess.run(
            [sys.executable, "-m", "katerchen", "queue", "flush", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert flush.returncode == 0, flush.stderr
        assert f"pid {process.proc.pid}" in flush.stdout
        process.wait_for("signal signal=SIGUSR1")
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0
    assert not (tmp_path / "katerchen.pid").exists()


def test_a_pidfile_that_cannot_be_written_fails_the_start(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_toml(server={"pidfile": "no/such/dir/k.pid"}))
    process = ServerProcess(["serve", "--config", str(path)], cwd=tmp_path)
    try:
        status = process.proc.wait(timeout=DEADLINE)
        process.stop()
    finally:
        process.kill()
    assert status == 1
    assert any("cannot-start" in line and "k.pid" in line for line in process.lines)


async def test_pidfile_in_process(
    start_server: StartServer, make_config: MakeConfig, tmp_path: Path
) -> None:
    pidfile = tmp_path / "k.pid"
    server = await start_server(make_config(server={"pidfile": str(pidfile)}))
    assert pidfile.read_text() == f"{os.getpid()}\n"
    await server.stop()
    assert not pidfile.exists()


def test_remove_pidfile_leaves_another_process_s(tmp_path: Path) -> None:
    pidfile = tmp_path / "k.pid"
    daemon.write_pidfile(pidfile, 12345)
    assert not daemon.remove_pidfile(pidfile, 54321)
    assert pidfile.read_text() == "12345\n"
    assert daemon.remove_pidfile(pidfile, 12345)
    assert not daemon.remove_pidfile(pidfile, 12345)
    assert list(tmp_path.iterdir()) == []  # no temporary file left


# --- scripts/ -----------------------------------------------------------------------------------


def unit(name: str) -> dict[str, list[str]]:
    """A unit file's ``Key=value`` lines, values by key (comments left out)."""
    keys: dict[str, list[str]] = {}
    for line in (SCRIPTS / name).read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def test_systemd_service_unit() -> None:
    service = unit("katerchen.service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    (start,) = service["ExecStart"]
    assert start.split()[1:3] == ["serve", "--config"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(service["TimeoutStopSec"][0]) > 10  # above the default shutdown_grace
    socket_unit = unit("katerchen.socket")
    assert socket_unit["ListenStream"] == ["25"]
    assert socket_unit["FileDescriptorName"] == ["listen"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts both units (ExecStart pointed at this Python)."""
    for name in ("katerchen.service", "katerchen.socket"):
        text = (SCRIPTS / name).read_text()
        text = text.replace("/usr/local/bin/katerchen", f"{sys.executable} -m katerchen")
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "katerchen.socket")],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_openrc_script() -> None:
    script = SCRIPTS / "katerchen.openrc"
    assert script.read_text().startswith("#!/sbin/openrc-run\n")
    assert os.access(script, os.X_OK)
    # openrc-run scripts are POSIX sh with a few functions: at least the syntax must hold.
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    for needed in ['command_background="yes"', "pidfile=", "--signal HUP", "--signal USR1"]:
        assert needed in text, needed
