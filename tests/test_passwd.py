"""Tests for ``katerchen passwd``: in-process through cli.main([...]) with a fake stdin, and end
to end as ``python -m katerchen passwd`` with the password piped in."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from katerchen import cli
from katerchen.auth import load_users

# Generous: a slow CI machine starting Python; a hang still fails instead of stalling.
DEADLINE = 30.0
PASSWORD = " Tr0ub4dor & 3 x "  # with spaces, also at the ends: all part of it


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.ENV_CONFIG, raising=False)


class FakeStdin(io.StringIO):
    """Standard input as a pipe (isatty False) or as a terminal."""

    def __init__(self, text: str = "", *, tty: bool = False) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def write_config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "katerchen.toml"
    path.write_text(text)
    return path


def passwd(monkeypatch: pytest.MonkeyPatch, config: Path | None, address: str, stdin: str) -> int:
    monkeypatch.setattr(sys, "stdin", FakeStdin(stdin))
    args = ["passwd", *(["--config", str(config)] if config else []), address]
    return cli.main(args)


def test_passwd_adds_a_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert passwd(monkeypatch, config, "Alice@Example.org", PASSWORD + "\n") == 0
    out, err = capsys.readouterr()
    users_file = tmp_path / "users"  # the default, relative to the config file's directory
    assert out == f"katerchen: added the user alice@example.org in {users_file}\n"
    assert err == ""
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    data = users_file.read_bytes()
    assert PASSWORD.encode() not in data
    assert data.startswith(b"alice@example.org:$scrypt$ln=")
    users = load_users(users_file)
    assert users.authenticate("alice@example.org", PASSWORD) == "alice@example.org"
    assert users.authenticate("alice@example.org", PASSWORD.strip()) is None


def test_passwd_changes_a_password_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert passwd(monkeypatch, config, "bob@example.org", "bobs password\n") == 0
    assert passwd(monkeypatch, config, "alice@example.org", "old password\n") == 0
    capsys.readouterr()
    assert passwd(monkeypatch, config, "alice@example.org", "new password\n") == 0
    out = capsys.readouterr().out
    assert out == f"katerchen: changed the password of alice@example.org in {tmp_path / 'users'}\n"
    text = (tmp_path / "users").read_text()
    for secret in ["bobs password", "old password", "new password"]:
        assert secret not in text
    assert [line.split(":")[0] for line in text.splitlines()] == [
        "bob@example.org",
        "alice@example.org",
    ]
    users = load_users(tmp_path / "users")
    assert users.authenticate("alice@example.org", "new password")
    assert not users.authenticate("alice@example.org", "old password")
    assert users.authenticate("bob@example.org", "bobs password")


def test_passwd_uses_the_configured_users_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, '[auth]\nusers_file = "etc/katerchen/users"\n')
    monkeypatch.chdir(tmp_path.parent)  # relative to the config file, not the working directory
    assert passwd(monkeypatch, config, "alice@example.org", "pw\n") == 0
    assert "alice@example.org" in load_users(tmp_path / "etc" / "katerchen" / "users")


def test_passwd_env_config_and_embedded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, '[auth]\nusers_file = "from-env"\n')
    monkeypatch.setenv(cli.ENV_CONFIG, str(config))
    assert passwd(monkeypatch, None, "alice@example.org", "pw\n") == 0
    assert (tmp_path / "from-env").exists()
    monkeypatch.delenv(cli.ENV_CONFIG)
    monkeypatch.chdir(tmp_path)
    assert passwd(monkeypatch, None, "alice@example.org", "pw\n") == 0
    assert "alice@example.org" in load_users(tmp_path / "katerchen-data" / "users")


@pytest.mark.parametrize(
    ("stdin", "password"),
    [
        ("pw\n", "pw"),
        ("pw", "pw"),  # no newline at all
        ("pw\r\n", "pw"),
        ("  pw  \n", "  pw  "),  # only the line break is taken away
        ("first\nsecond\n", "first"),  # the first line only
        ("grüße\n", "grüße"),
    ],
)
def test_passwd_reads_the_first_line_of_a_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdin: str, password: str
) -> None:
    config = write_config(tmp_path)
    assert passwd(monkeypatch, config, "alice@example.org", stdin) == 0
    users = load_users(tmp_path / "users")
    assert users.authenticate("alice@example.org", password) == "alice@example.org"


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n", "\nsecond line\n"])
def test_passwd_refuses_an_empty_password(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stdin: str,
) -> None:
    config = write_config(tmp_path)
    assert passwd(monkeypatch, config, "alice@example.org", stdin) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("katerchen: passwd: ")
    assert "empty" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "users").exists()


@pytest.mark.parametrize(
    "address", ["alice", "postmaster", "hunter2", "a b@example.org", "<alice@example.org>", ""]
)
def test_passwd_refuses_a_bad_address_without_echoing_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    address: str,
) -> None:
    config = write_config(tmp_path)
    assert passwd(monkeypatch, config, address, "pw\n") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "katerchen: passwd: ADDRESS is not a valid address (expected e.g. alice@example.org)\n"
    )
    assert not (tmp_path / "users").exists()


def test_passwd_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "[auth]\nusers_file = 7\n")
    assert passwd(monkeypatch, config, "alice@example.org", "pw\n") == 2
    err = capsys.readouterr().err
    assert err.startswith("katerchen: config error: [auth] users_file: ")
    assert err.count("\n") == 1
    assert passwd(monkeypatch, tmp_path / "missing.toml", "alice@example.org", "pw\n") == 2
    assert "does not exist" in capsys.readouterr().err


def test_passwd_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "etc").write_text("a file where the directory should be")
    config = write_config(tmp_path, '[auth]\nusers_file = "etc/users"\n')
    assert passwd(monkeypatch, config, "alice@example.org", "s3cret-pw\n") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"katerchen: passwd: cannot write {tmp_path / 'etc' / 'users'}: ")
    assert err.count("\n") == 1
    assert "s3cret-pw" not in err


# --- from a terminal -----------------------------------------------------------------------------


def fake_terminal(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    """stdin is a terminal; getpass answers from *answers*; returns the prompts shown."""
    prompts: list[str] = []

    def getpass(prompt: str = "Password: ", stream: object = None) -> str:
        prompts.append(prompt)
        if not answers:
            raise EOFError
        return answers.pop(0)

    monkeypatch.setattr(sys, "stdin", FakeStdin("never read\n", tty=True))
    monkeypatch.setattr("getpass.getpass", getpass)
    return prompts


def test_passwd_from_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    prompts = fake_terminal(monkeypatch, [PASSWORD, PASSWORD])
    assert cli.main(["passwd", "--config", str(config), "alice@example.org"]) == 0
    assert prompts == ["New password for alice@example.org: ", "Retype the new password: "]
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    assert load_users(tmp_path / "users").authenticate("alice@example.org", PASSWORD)


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ([PASSWORD, PASSWORD + "x"], "do not match"),
        (["", ""], "empty"),
        ([], "no password given"),  # EOF (Ctrl-D) at the prompt
        ([PASSWORD], "no password given"),  # EOF at the second prompt
    ],
)
def test_passwd_from_the_terminal_refuses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answers: list[str],
    message: str,
) -> None:
    config = write_config(tmp_path)
    fake_terminal(monkeypatch, answers)
    assert cli.main(["passwd", "--config", str(config), "alice@example.org"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
    assert err.count("\n") == 1
    assert PASSWORD not in err
    assert not (tmp_path / "users").exists()


def test_passwd_interrupted_at_the_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(prompt: str = "", stream: object = None) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", FakeStdin(tty=True))
    monkeypatch.setattr("getpass.getpass", interrupted)
    config = write_config(tmp_path)
    assert cli.main(["passwd", "--config", str(config), "alice@example.org"]) == 130
    assert not (tmp_path / "users").exists()


# --- help ----------------------------------------------------------------------------------------


def test_passwd_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "passwd" in capsys.readouterr().out
    assert cli.main(["passwd", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ["ADDRESS", "--config", "users_file", "terminal", "first line", cli.ENV_CONFIG]:
        assert text in out, text


def test_passwd_without_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["passwd"]) == 2
    assert "usage:" in capsys.readouterr().err


# --- end to end ----------------------------------------------------------------------------------


def run_katerchen(args: list[str], stdin: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != cli.ENV_CONFIG}
    return subprocess.run(
        [sys.executable, "-m", "katerchen", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=DEADLINE,
        check=False,
    )


def test_passwd_end_to_end(tmp_path: Path) -> None:
    write_config(tmp_path, '[auth]\nusers_file = "users"\n')
    done = run_katerchen(
        ["passwd", "--config", "katerchen.toml", "alice@example.org"], PASSWORD + "\n", tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"katerchen: added the user alice@example.org in {tmp_path / 'users'}\n"
    assert done.stderr == ""
    users_file = tmp_path / "users"
    assert PASSWORD not in users_file.read_text()
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert load_users(users_file).authenticate("alice@example.org", PASSWORD)

    refused = run_katerchen(
        ["passwd", "--config", "katerchen.toml", "alice@example.org"], "\n", tmp_path
    )
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "Traceback" not in refused.stderr
    assert load_users(users_file).authenticate("alice@example.org", PASSWORD)
