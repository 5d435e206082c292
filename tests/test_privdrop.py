"""Dropping privileges: started as root with ``[server] user``, katerchen binds its ports, makes
the spool that user's and becomes it before it touches any mail.

The real thing needs root (CI runs the suite as root): ``python -m katerchen serve`` as root
with ``user = "nobody"``, its uid and gid read from /proc, then mail received and delivered into
directories that user owns.  The config keys and the refusals run anywhere."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from katerchen import app, cli, daemon
from katerchen.config import Config, ConfigError
from tests.conftest import DOMAIN, MakeConfig, config_toml
from tests.test_cli import DEADLINE, ServerProcess

USER = "nobody"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to drop privileges (CI runs the suite as root)"
)


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} on this system")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path lies under a root-only 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="katerchen-privdrop-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def proc_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, filesystem) and Groups of every thread of *pid*."""
    ids: dict[str, list[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # a worker thread that ended meanwhile
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                numbers = [int(n) for n in value.split()]
                assert ids.setdefault(key, numbers) == numbers, f"thread {task.name} differs"
    return ids


@needs_root
def test_root_drops_to_the_user_and_still_receives_and_delivers(open_dir: Path) -> None:
    entry = nobody()
    uid, gid = entry.pw_uid, entry.pw_gid
    # As an administrator would set it up: the mailboxes belong to the mail user. The spool is
    # left as a run as root left it.
    mailbox = open_dir / "domains" / DOMAIN / "alice"
    mailbox.mkdir(parents=True)
    for path in (open_dir / "domains", open_dir / "domains" / DOMAIN, mailbox):
        os.chown(path, uid, gid)
    left = open_dir / "spool" / "received"
    left.mkdir(parents=True)
    (open_dir / "run").mkdir()
    os.chown(open_dir / "run", uid, gid)
    text = config_toml(server={"user": USER, "pidfile": "run/k.pid"})  # listen on port 0
    (open_dir / "katerchen.toml").write_text(text)
    process = ServerProcess(["serve", "--config", "katerchen.toml"], cwd=open_dir)
    try:
        listening = process.wait_for("listening")
        port = int(listening.rsplit(":", 1)[1])
        ids = proc_ids(process.proc.pid)
        assert ids["Uid"] == [uid] * 4, ids
        assert ids["Gid"] == [gid] * 4, ids
        assert set(ids["Groups"]) <= set(os.getgrouplist(USER, gid))
        assert 0 not in ids["Groups"]
        privileges = next(line for line in process.lines if " privileges " in line)
        assert f"user={USER} uid={uid} gid={gid}" in privileges
        # Bound as root, before the drop; the pidfile too.
        assert (open_dir / "run" / "k.pid").read_text().strip() == str(process.proc.pid)

        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            client.sendmail("a@client.test", [f"alice@{DOMAIN}"], b"Subject: dropped\r\n\r\nhi\r\n")
        process.wait_for("delivered id=")
        # A reload reads the config as the user; a new port below 1024 cannot be bound any more.
        privileged = free_privileged_port()
        if privileged is not None:
            (open_dir / "katerchen.toml").write_text(
                text.replace('"127.0.0.1:0"', f'"127.0.0.1:0", "127.0.0.1:{privileged}"')
            )
            process.proc.send_signal(signal.SIGHUP)
            failed = process.wait_for("reload-failed")
            assert f"cannot listen on 127.0.0.1:{privileged}: Permission denied" in failed
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            client.sendmail("b@client.test", [f"alice@{DOMAIN}"], b"Subject: after\r\n\r\nhi\r\n")
        process.wait_for("delivered id=")
        status = process.stop(signal.SIGTERM)
    finally:
        process.kill()
    assert status == 0, "\n".join(process.lines)
    assert not any("Traceback" in line for line in process.lines)
    messages = list((mailbox / "new").iterdir())
    assert len(messages) == 2
    for path in [mailbox / "new", *messages]:
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (uid, gid), path
    for name in ("incoming", "received", "relay", "hold"):
        info = (open_dir / "spool" / name).stat()
        assert (info.st_uid, info.st_gid) == (uid, gid), name
    assert not (open_dir / "run" / "k.pid").exists()  # removed at exit, as the user


def free_privileged_port() -> int | None:
    """A free port that only root may bind (None when unprivileged users may bind it)."""
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        start = 1024
    for port in range(min(start, 1024) - 24, min(start, 1024)):
        if port < 1:
            return None
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


@needs_root
def test_prepare_ownership(tmp_path: Path) -> None:
    nobody()
    identity = daemon.lookup_identity(USER)
    spool = tmp_path / "spool" / "received"
    spool.mkdir(parents=True)
    (spool / "0661603f1048d13cbb36").write_bytes(b"left by root")
    (spool / "link").symlink_to("/etc/passwd")
    users = tmp_path / "users"
    users.write_text("")
    domains = tmp_path / "domains"
    existing = tmp_path / "existing"
    existing.mkdir()
    changed = daemon.prepare_ownership(
        identity,
        spool=[spool, tmp_path / "spool" / "relay"],
        create=[domains, existing],
        files=[users, tmp_path / "no-such-file"],
    )
    owner = (identity.uid, identity.gid)
    for path in [spool, spool / "0661603f1048d13cbb36", tmp_path / "spool" / "relay", domains]:
        assert (path.stat().st_uid, path.stat().st_gid) == owner, path
    assert (users.stat().st_uid, users.stat().st_gid) == owner
    assert os.lstat(spool / "link").st_uid == identity.uid  # the link itself ...
    assert Path("/etc/passwd").stat().st_uid == 0  # ... never what it points to
    assert existing.stat().st_uid == 0  # existing directories of "create" are left alone
    assert stat.S_ISDIR(domains.stat().st_mode)
    assert set(changed) == {
        spool,
        spool / "0661603f1048d13cbb36",
        spool / "link",
        tmp_path / "spool" / "relay",
        domains,
        users,
    }
    # Nothing to do the second time.
    assert daemon.prepare_ownership(identity, spool=[spool], create=[domains], files=[users]) == []


@needs_root
def test_passwd_as_root_gives_the_users_file_to_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = nobody()
    config = tmp_path / "katerchen.toml"
    config.write_text(f'[server]\nuser = "{USER}"\n[auth]\nusers_file = "users"\n')
    monkeypatch.setattr("sys.stdin", _Lines("secret password\n"))
    monkeypatch.delenv(cli.ENV_CONFIG, raising=False)
    assert cli.main(["passwd", "--config", str(config), "alice@example.org"]) == 0
    info = (tmp_path / "users").stat()
    assert (info.st_uid, info.st_gid) == (entry.pw_uid, entry.pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o600


class _Lines:
    """A stdin that is not a terminal."""

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines(keepends=True)

    def isatty(self) -> bool:
        return False

    def readline(self) -> str:
        return self._lines.pop(0) if self._lines else ""


# --- anywhere -------------------------------------------------------------------------------------


def test_user_and_group_keys(tmp_path: Path) -> None:
    root = pwd.getpwuid(0).pw_name
    config = Config.from_toml(f'[server]\nuser = "{root}"\n', base_dir=tmp_path)
    assert (config.server.user, config.server.group) == (root, "")
    group = grp.getgrgid(0).gr_name
    config = Config.from_toml(f'[server]\nuser = "0"\ngroup = "{group}"\n', base_dir=tmp_path)
    assert (config.server.user, config.server.group) == ("0", group)
    assert f'user = "0"\ngroup = "{group}"' in config.to_toml()
    config = Config.from_toml('[server]\npidfile = "run/k.pid"\n', base_dir=tmp_path)
    assert config.server.pidfile == tmp_path / "run" / "k.pid"
    assert Config.from_toml("", base_dir=tmp_path).server.pidfile is None
    with pytest.raises(ConfigError, match="no user"):
        Config.from_mapping({"server": {"user": "no-such-user-here"}})


def test_lookup_identity() -> None:
    identity = daemon.lookup_identity("0")
    assert (identity.uid, identity.gid) == (0, pwd.getpwuid(0).pw_gid)
    assert 0 in identity.groups or identity.gid in identity.groups
    assert daemon.lookup_identity("0", "0").gid == 0
    with pytest.raises(LookupError, match="no user"):
        daemon.lookup_identity("no-such-user-here")
    with pytest.raises(LookupError, match="no group"):
        daemon.lookup_identity("0", "no-such-group-here")


async def test_switching_users_needs_root(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started as somebody else than root and than [server] user: refused, not ignored."""
    config = make_config(server={"user": pwd.getpwuid(0).pw_name})
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    with pytest.raises(OSError, match="only root can switch"):
        await app.run(config)


async def test_already_the_user_is_fine(make_config: MakeConfig) -> None:
    """Run as [server] user already (User= in a systemd unit): nothing to drop."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert app._identity(make_config(server={"user": me})) is None
    assert app._identity(make_config()) is None
