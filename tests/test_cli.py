"""Tests for katerchen.cli: in-process through cli.main([...]), and end to end as
``python -m katerchen`` in a subprocess talking SMTP over a real socket."""

from __future__ import annotations

import os
import queue
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from katerchen import cli, maillog
from katerchen.config import Config

# Generous: a slow CI machine starting Python; a hang still fails instead of stalling.
DEADLINE = 30.0


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """cli.main() configures the katerchen logger; put it back for the other tests."""
    logger = maillog.logger
    saved = (logger.level, list(logger.handlers))
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            if handler not in saved[1]:
                logger.removeHandler(handler)
        logger.setLevel(saved[0])


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.ENV_CONFIG, raising=False)


def write_config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "katerchen.toml"
    path.write_text(text)
    return path


# --- check-config --------------------------------------------------------------------------------


def test_check_config_prints_the_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, '[server]\nhostname = "mx.example.org"\n')
    assert cli.main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == Config.from_file(path).to_toml()
    assert f'domains = "{tmp_path / "domains"}"' in out
    # What it prints is a valid config.
    assert Config.from_toml(out, base_dir=Path("/")).server.hostname == "mx.example.org"


def test_check_config_error_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "[limits]\nmax_recipients = -3\n")
    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "katerchen: config error: [limits] max_recipients: expected a positive integer, got -3\n"
    )


def test_check_config_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "[server]\nhostname = \n")
    assert cli.main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("katerchen: config error: ")
    assert "line 2" in err
    assert err.count("\n") == 1


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert cli.main(["check-config", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"katerchen: config error: config file {missing} does not exist\n"


def test_check_config_without_a_config_shows_the_embedded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert 'listen = ["127.0.0.1:2525"]' in out
    assert f'domains = "{tmp_path / "katerchen-data" / "domains"}"' in out
    # Checking creates nothing.
    assert not (tmp_path / "katerchen-data").exists()


def test_env_var_stands_in_for_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, '[server]\nhostname = "from-env.example"\n')
    monkeypatch.setenv(cli.ENV_CONFIG, str(path))
    assert cli.main(["check-config"]) == 0
    assert 'hostname = "from-env.example"' in capsys.readouterr().out


def test_config_option_beats_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.ENV_CONFIG, str(tmp_path / "missing.toml"))
    path = write_config(tmp_path, '[server]\nhostname = "from-option.example"\n')
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert 'hostname = "from-option.example"' in capsys.readouterr().out


def test_config_option_on_the_top_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, '[server]\nhostname = "top.example"\n')
    assert cli.main(["--config", str(path), "check-config"]) == 0
    assert 'hostname = "top.example"' in capsys.readouterr().out


def test_help_lists_commands_env_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in [
        "serve",
        "check-config",
        "--config",
        "--log-level",
        "KATERCHEN_CONFIG",
        "127.0.0.1:2525",
        "katerchen-data",
        "localhost",
        "postmaster",
    ]:
        assert text in out, text


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out
    assert "KATERCHEN_CONFIG" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["serve", "--log-level", "loud"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("katerchen ")


# --- serve, in-process ---------------------------------------------------------------------------


def test_serve_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, '[server]\nlisten = ["nowhere"]\n')
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("katerchen: config error: [server] listen: ")
    assert "Traceback" not in err


def test_serve_missing_config_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.ENV_CONFIG, str(tmp_path / "nope.toml"))
    assert cli.main([]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bare_katerchen_prepares_and_announces_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[Config] = []

    async def fake_run(config: Config, *, handle_signals: bool = False, **options: object) -> None:
        assert handle_signals
        ran.append(config)

    monkeypatch.setattr("katerchen.app.run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 0
    data = tmp_path / "katerchen-data"
    assert (data / "domains" / "localhost" / "postmaster").is_dir()
    assert ran == [Config.default(data)]
    err = capsys.readouterr().err
    head = "\n".join(err.splitlines()[:5])
    for text in ["embedded", "127.0.0.1:2525", str(data), "localhost", "postmaster"]:
        assert text in head, text


def test_serve_announces_config_and_domains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fake_run(config: Config, *, handle_signals: bool = False, **options: object) -> None:
        pass

    monkeypatch.setattr("katerchen.app.run", fake_run)
    for mailbox in ["example.org/alice", "example.org/bob", "example.net/carol", ".hidden/x"]:
        (tmp_path / "domains" / mailbox).mkdir(parents=True)
    path = write_config(
        tmp_path, '[server]\nhostname = "mx.example.org"\nlisten = ["[::1]:2600", "127.0.0.1:26"]\n'
    )
    assert cli.main(["--log-level", "info", "serve", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    for text in [
        str(path),
        "hostname=mx.example.org",
        "listen=[::1]:2600,127.0.0.1:26",
        f"received={tmp_path / 'spool' / 'received'}",
        "domain name=example.net mailboxes=carol",
        "domain name=example.org mailboxes=alice,bob",
    ]:
        assert text in err, text
    assert ".hidden" not in err
    # Serving does not create the domains of a config file.
    assert not (tmp_path / "domains" / "localhost").exists()


def test_serve_warns_about_a_missing_domains_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fake_run(config: Config, *, handle_signals: bool = False, **options: object) -> None:
        pass

    monkeypatch.setattr("katerchen.app.run", fake_run)
    path = write_config(tmp_path)
    assert cli.main(["serve", "--config", str(path)]) == 0
    assert " warning no-domains " in capsys.readouterr().err


def test_serve_port_in_use_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, f'[server]\nlisten = ["127.0.0.1:{port}"]\n')
        assert cli.main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " error " in line]
    assert len(errors) == 1
    assert "cannot-start" in errors[0]
    assert f"127.0.0.1:{port}" in errors[0]


def test_serve_unusable_spool_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "spool").write_text("a file where the spool directory should be")
    path = write_config(tmp_path, '[server]\nlisten = ["127.0.0.1:0"]\n')
    assert cli.main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if " error " in line]) == 1


# --- serve, end to end ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # As the server binds: TIME_WAIT leftovers of an earlier run do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ServerProcess:
    """``python -m katerchen ...`` with its stderr read line by line by a thread, so that the
    test can wait for a log line with a deadline instead of sleeping."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        *,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        wrapper: list[str] | None = None,
    ) -> None:
        """*env* is added to the environment; *pass_fds* are inherited; *wrapper* is a command
        line the python command is appended to (e.g. ``["sh", "-c", '... exec "$@"', "sh"]``)."""
        environment = {k: v for k, v in os.environ.items() if k != cli.ENV_CONFIG}
        environment.update(env or {})
        command = [sys.executable, "-m", "katerchen", *args]
        self.proc = subprocess.Popen(
            [*(wrapper or []), *command],
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = DEADLINE) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {text!r} in the log:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"exited ({self.proc.wait()}) before {text!r}:\n" + "\n".join(self.lines)
                )
            self.lines.append(line)
            if text in line:
                return line

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        status = self.proc.wait(timeout=DEADLINE)
        self._thread.join(timeout=DEADLINE)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_serve_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "domains" / "example.org" / "alice").mkdir(parents=True)
    write_config(
        tmp_path,
        f'[server]\nhostname = "mx.example.org"\nlisten = ["127.0.0.1:{port}"]\n'
        "shutdown_grace = 1\n",
    )
    server = ServerProcess(["serve", "--config", "katerchen.toml"], cwd=tmp_path)
    try:
        server.wait_for("listening")
        assert any("domain name=example.org mailboxes=alice" in line for line in server.lines)
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            code, _ = client.ehlo("client.example")
            assert code == 250
            assert client.has_extn("size")
            assert client.noop()[0] == 250
            refused = client.sendmail(
                "bob@example.net",
                ["alice@example.org"],
                b"Subject: hello\r\n\r\nend to end\r\n",
            )
            assert refused == {}
        server.wait_for("delivered id=")
        status = server.stop(signal.SIGTERM)
    finally:
        server.kill()
    assert status == 0, "\n".join(server.lines)
    assert not any("Traceback" in line for line in server.lines)
    assert list((tmp_path / "spool" / "received").iterdir()) == []
    (delivered,) = (tmp_path / "domains" / "example.org" / "alice" / "new").iterdir()
    data = delivered.read_bytes()
    assert data.startswith(b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.org\r\n")
    assert data.endswith(b"Subject: hello\r\n\r\nend to end\r\n")


def test_bare_katerchen_end_to_end(tmp_path: Path) -> None:
    if not port_is_free(2525):
        pytest.skip("port 2525 is in use")
    server = ServerProcess([], cwd=tmp_path)
    try:
        server.wait_for("listening")
        data = tmp_path / "katerchen-data"
        assert (data / "domains" / "localhost" / "postmaster").is_dir()
        head = "\n".join(server.lines[:5])
        for text in ["127.0.0.1:2525", str(data), "localhost", "postmaster"]:
            assert text in head, text
        with smtplib.SMTP("127.0.0.1", 2525, timeout=DEADLINE) as client:
            assert client.ehlo()[0] == 250
            client.sendmail("", ["postmaster@localhost"], b"Subject: hi\r\n\r\nhi\r\n")
        server.wait_for("delivered id=")
        status = server.stop(signal.SIGINT)
    finally:
        server.kill()
    assert status == 0, "\n".join(server.lines)
    assert list((data / "spool" / "received").iterdir()) == []
    (delivered,) = (data / "domains" / "localhost" / "postmaster" / "new").iterdir()
    assert delivered.read_bytes().endswith(b"Subject: hi\r\n\r\nhi\r\n")
