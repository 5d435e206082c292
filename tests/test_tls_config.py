"""``[tls]``, ``[auth]`` and the submission listeners in the config (with real certificate files
from trustme), and katerchen.tlsconfig: the server context and its reloading."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from cryptography.hazmat.primitives import serialization

from katerchen import cli, tlsconfig
from katerchen.config import AuthConfig, Config, ConfigError, TlsConfig
from katerchen.tlsconfig import CertificateError, ServerTLS, server_context
from tests.conftest import TlsFiles, issue_tls_files, log_lines


def load(text: str, base_dir: Path) -> Config:
    return Config.from_toml(text, base_dir=base_dir)


def tls_text(certificate: str | Path, key: str | Path) -> str:
    return f'[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n'


# --- the config -----------------------------------------------------------------------------------


def test_tls_and_auth_are_off_by_default(tmp_path: Path) -> None:
    config = load("", tmp_path)
    assert config.tls is None
    assert config.auth == AuthConfig(users_file=tmp_path / "users")
    assert config.auth.allow_any_sender is False
    assert (config.auth.max_failures, config.auth.failure_window) == (5, 900)
    assert config.server.submission == config.server.submissions == ()


def test_a_full_tls_setup(tmp_path: Path, tls_files: TlsFiles) -> None:
    # Relative paths are relative to the config file's directory, as for the directories.
    text = tls_text("tls/server.crt", "tls/server.key") + (
        '[server]\nsubmission = ["0.0.0.0:587", "[::]:587"]\nsubmissions = ["127.0.0.1:465"]\n'
        '[auth]\nusers_file = "etc/users"\nallow_any_sender = true\n'
        "max_failures = 3\nfailure_window = 60.5\n"
    )
    config = load(text, tmp_path)
    assert config.tls == TlsConfig(certificate=tls_files.certificate, key=tls_files.key)
    assert config.server.submission == (("0.0.0.0", 587), ("::", 587))
    assert config.server.submissions == (("127.0.0.1", 465),)
    assert config.auth == AuthConfig(
        users_file=tmp_path / "etc" / "users",
        allow_any_sender=True,
        max_failures=3,
        failure_window=60.5,
    )
    again = Config.from_toml(config.to_toml(), base_dir=Path("/elsewhere"))
    assert again == config
    assert again.to_toml() == config.to_toml()


def test_certificate_and_key_in_one_file(tmp_path: Path, tls_files: TlsFiles) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(tls_files.certificate.read_bytes() + tls_files.key.read_bytes())
    assert load(tls_text(both, both), tmp_path).tls == TlsConfig(both, both)


def test_the_same_address_in_two_listener_lists_is_refused(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    text = tls_text(tls_files.certificate, tls_files.key)
    with pytest.raises(ConfigError) as info:
        load(text + '[server]\nlisten = ["[::]:465"]\nsubmissions = ["[::]:465"]', tmp_path)
    assert info.value.key == "[server] submissions"
    assert '"[::]:465" is in [server] listen too' in info.value.message
    # Port 0 is a different port each time: fine (the tests do it).
    config = load(
        text + '[server]\nlisten = ["127.0.0.1:0"]\nsubmission = ["127.0.0.1:0"]', tmp_path
    )
    assert config.server.submission == (("127.0.0.1", 0),)


@pytest.fixture
def broken(tmp_path: Path, tls_files: TlsFiles, tls_ca: trustme.CA) -> dict[str, Path]:
    """Files that do not make a usable pair with tls_files."""
    other = issue_tls_files(tls_ca, tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is no PEM file\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(tls_files.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return {"other key": other.key, "garbage": garbage, "encrypted": encrypted}


@pytest.mark.parametrize(
    ("certificate", "key", "blamed", "fragment"),
    [
        ("missing", "key", "certificate", "does not exist"),
        ("certificate", "missing", "key", "does not exist"),
        ("directory", "key", "certificate", "is a directory"),
        ("garbage", "key", "certificate", "holds no PEM certificate"),
        ("key", "key", "certificate", "holds no PEM certificate"),
        ("certificate", "garbage", "key", "no usable PEM private key"),
        ("certificate", "certificate", "key", "no usable PEM private key"),
        ("certificate", "other key", "key", "does not match the certificate"),
        # An encrypted key is refused at once, never asked for on the terminal.
        ("certificate", "encrypted", "key", "no usable PEM private key"),
    ],
)
def test_tls_files_that_do_not_load_name_the_key(
    tmp_path: Path,
    tls_files: TlsFiles,
    broken: dict[str, Path],
    certificate: str,
    key: str,
    blamed: str,
    fragment: str,
) -> None:
    files = {
        "certificate": tls_files.certificate,
        "key": tls_files.key,
        "missing": tmp_path / "missing.pem",
        "directory": tmp_path,
        **broken,
    }
    with pytest.raises(ConfigError) as info:
        load(tls_text(files[certificate], files[key]), tmp_path)
    assert info.value.key == f"[tls] {blamed}"
    assert fragment in info.value.message


def test_check_config_reports_a_bad_certificate(
    tmp_path: Path, tls_files: TlsFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.toml"
    path.write_text(tls_text(tls_files.certificate, tmp_path / "nope.key"))
    assert cli.main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("katerchen: config error: [tls] key: ")
    assert "does not exist" in err


# --- tlsconfig ------------------------------------------------------------------------------------


def test_server_context(tls_files: TlsFiles) -> None:
    context = server_context(tls_files.certificate, tls_files.key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE  # no client certificates asked for


def test_certificate_error() -> None:
    error = CertificateError("gone", which="key")
    assert (error.which, error.message, str(error)) == ("key", "gone", "key: gone")


def swap(files: TlsFiles, new: TlsFiles) -> None:
    os.replace(new.certificate, files.certificate)
    os.replace(new.key, files.key)


async def test_changes_are_noticed_at_most_every_check_interval(
    tls_files: TlsFiles, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    tls = ServerTLS.load(tls_files.certificate, tls_files.key)
    first = tls.context
    assert await tls.current() is first  # looked: unchanged
    swap(tls_files, issue_tls_files(tls_files.ca, tmp_path / "new"))
    assert await tls.current() is first  # not looked again yet
    mock_clock.jump(tlsconfig.CHECK_INTERVAL)
    second = await tls.current()
    assert second is not first
    assert tls.reloads == 1
    assert await tls.current() is second


async def test_reload_failure_keeps_the_old_context(
    tls_files: TlsFiles, tmp_path: Path, mail_log: pytest.LogCaptureFixture
) -> None:
    tls = ServerTLS.load(tls_files.certificate, tls_files.key)
    first = tls.context
    tls_files.key.write_text("half-written\n")
    assert await tls.reload() is False
    assert tls.context is first
    (line,) = log_lines(mail_log, "tls-reload-error")
    assert line.startswith('tls-reload-error reason=sighup key="[tls] key" error=')
    # An unchanged broken file is not tried (and logged) again on every new connection.
    tls._checked = float("-inf")
    assert await tls.current() is first
    assert len(log_lines(mail_log, "tls-reload-error")) == 1
    # Fixed: the next look loads it.
    swap(tls_files, issue_tls_files(tls_files.ca, tmp_path / "new"))
    tls._checked = float("-inf")
    assert await tls.current() is not first
    assert log_lines(mail_log, "tls-reloaded")[0].startswith("tls-reloaded reason=changed")


def test_load_raises_certificate_error(tmp_path: Path, tls_files: TlsFiles) -> None:
    with pytest.raises(CertificateError) as info:
        ServerTLS.load(tmp_path / "none.crt", tls_files.key)
    assert info.value.which == "certificate"
