"""Tests for katerchen.maildir on real directories: names, byte-exact delivery, repeats, cur/,
symbolic links, failures and large messages.

Sources are real spool files written by :class:`katerchen.spool.Spool`, read back by Python's
:class:`mailbox.Maildir` the way a mail reader would. Faults are real: a file size limit
(RLIMIT_FSIZE, which fails a write with EFBIG as a full disk fails it with ENOSPC), and symbolic
links planted where directories belong.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mailbox
import os
import re
import resource
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from katerchen import maildir
from katerchen.envelope import Envelope, received_header
from katerchen.maildir import deliver, delivery_name, ensure_maildir
from katerchen.spool import Spool, new_queue_id

HOST = "mx.example.test"
PREFIX = b"Return-Path: <sender@example.net>\r\nDelivered-To: alice@example.test\r\n"
# 8-bit bytes, dot lines as the reader must see them (after unstuffing), a NUL, a bare LF
# (possible with BDAT), CRLF everywhere else, and no final line end.
MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xff\xfe\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b".leading dot\r\n"
    b"nul \x00 and bare\nLF\r\n"
    b"end"
)


def spool_file(tmp_path: Path, message: bytes = MESSAGE) -> tuple[Path, int, Envelope]:
    """A message committed to received/ as the receiver does; its path and body offset."""
    spool = Spool(
        incoming=tmp_path / "spool" / "incoming",
        received=tmp_path / "spool" / "received",
        relay=tmp_path / "spool" / "relay",
    )
    spool.prepare()
    queue_id = new_queue_id()
    envelope = Envelope(
        queue_id=queue_id,
        arrival=1714567896.123456,
        client="192.0.2.7",
        helo="mail.example.net",
        reverse_path="sender@example.net",
        forward_paths=("alice@example.test", "bob@example.test"),
        body="8BITMIME",
        smtputf8=False,
    )
    incoming = spool.open_message(
        queue_id, envelope.encode() + received_header(envelope, hostname=HOST, protocol="ESMTP")
    )
    incoming.feed(message)
    path = incoming.commit()
    decoded, offset = Envelope.decode(path.read_bytes()[:4096])
    assert decoded == envelope
    return path, offset, envelope


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A fresh Maildir in an existing domain directory."""
    path = tmp_path / "domains" / "example.test" / "alice"
    path.parent.mkdir(parents=True)
    ensure_maildir(path)
    return path


def name_for(envelope: Envelope, recipient: str = "alice@example.test") -> str:
    return delivery_name(envelope.queue_id, recipient, envelope.arrival, HOST)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --- names ------------------------------------------------------------------------------------


def test_name_format() -> None:
    name = delivery_name("0619a4b1c2d3e4f5a6b7", "alice@example.test", 1714567896.9, HOST)
    digest = hashlib.sha256(b"alice@example.test").hexdigest()[:12]
    assert name == f"1714567896.K0619a4b1c2d3e4f5a6b7R{digest}.mx.example.test"


def test_names_are_deterministic_and_distinct() -> None:
    first = delivery_name("0619a4b1c2d3e4f5a6b7", "alice@example.test", 1714567896.5, HOST)
    assert first == delivery_name("0619a4b1c2d3e4f5a6b7", "alice@example.test", 1714567896.5, HOST)
    others = {
        delivery_name("0619a4b1c2d3e4f5a6b7", "bob@example.test", 1714567896.5, HOST),
        delivery_name("0619a4b1c2d3e4f5a6b7", "Alice@example.test", 1714567896.5, HOST),
        delivery_name("0619a4b1c2d3e4f5a6b8", "alice@example.test", 1714567896.5, HOST),
        delivery_name("0619a4b1c2d3e4f5a6b7", "jörg@example.test", 1714567896.5, HOST),
    }
    assert len(others) == 4
    assert first not in others


@pytest.mark.parametrize(
    ("hostname", "escaped"),
    [
        ("[IPv6:2001:db8::1]", "[IPv6\\0722001\\072db8\\072\\0721]"),
        ("a/b:c", "a\\057b\\072c"),
        ("a,S=1\\b", "a\\054S=1\\134b"),
        ("höst", "h\\303\\266st"),
        ("sp ace", "sp\\040ace"),
    ],
)
def test_hostname_is_escaped(hostname: str, escaped: str) -> None:
    name = delivery_name("abc", "r", 1.0, hostname)
    assert name.endswith("." + escaped)
    assert "/" not in name and ":" not in name
    assert name.isascii() and name.isprintable()


def test_long_hostname_is_cut() -> None:
    # The worst case, with every Maildir flag a reader could add, stays within NAME_MAX.
    name = delivery_name("a" * 64, "r", 1e10, "h" * 250, size=10**15)
    assert len(f"{name}:2,ABCDEFGHIJKLMNOPQRSTUVWXYZ") < 255


def test_size_suffix() -> None:
    name = delivery_name("abc", "r", 5.0, HOST, size=1234)
    assert name.endswith(".mx.example.test,S=1234")


@pytest.mark.parametrize(
    ("args", "size"),
    [
        (("", "r", 1.0, HOST), None),
        (("a/b", "r", 1.0, HOST), None),
        (("a" * 65, "r", 1.0, HOST), None),
        (("abc", "r", -1.0, HOST), None),
        (("abc", "r", float("nan"), HOST), None),
        (("abc", "r", float("inf"), HOST), None),
        (("abc", "r", 1.0, ""), None),
        (("abc", "r", 1.0, HOST), -1),
    ],
)
def test_name_refuses(args: tuple[str, str, float, str], size: int | None) -> None:
    with pytest.raises(ValueError):
        delivery_name(*args, size=size)


# --- ensure_maildir ---------------------------------------------------------------------------


def test_ensure_maildir_creates_private_directories(tmp_path: Path) -> None:
    path = tmp_path / "alice"
    ensure_maildir(path)
    assert listing(path) == ["cur", "new", "tmp"]
    for directory in (path, path / "cur", path / "new", path / "tmp"):
        assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0
    ensure_maildir(path)  # idempotent
    (path / "new").rmdir()
    ensure_maildir(path)  # repairs a missing one
    assert listing(path) == ["cur", "new", "tmp"]


def test_ensure_maildir_never_creates_the_parent(tmp_path: Path) -> None:
    # In the domains tree a directory is a served domain: creating one would change routing.
    with pytest.raises(FileNotFoundError):
        ensure_maildir(tmp_path / "no-such-domain" / "alice")
    assert listing(tmp_path) == []


# --- delivery ---------------------------------------------------------------------------------


def test_delivery_is_byte_exact(tmp_path: Path, box: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    name = name_for(envelope)
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    expected = PREFIX + source.read_bytes()[offset:]
    assert expected.endswith(MESSAGE)
    assert expected[len(PREFIX) :].startswith(b"Received: from mail.example.net")
    assert listing(box / "new") == [name]
    assert listing(box / "tmp") == []
    assert listing(box / "cur") == []
    delivered = box / "new" / name
    assert delivered.read_bytes() == expected
    assert stat.S_IMODE(delivered.stat().st_mode) == 0o600
    # A mail reader finds it, byte-exact.
    reader = mailbox.Maildir(box, factory=None, create=False)
    assert list(reader.keys()) == [name]
    assert reader.get_bytes(name) == expected
    assert reader[name]["Delivered-To"] == "alice@example.test"


def test_repeated_delivery_finds_the_first(tmp_path: Path, box: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    name = name_for(envelope)
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is False
    assert deliver(box, name, PREFIX, source, offset, check_cur=True) is False
    assert listing(box / "new") == [name]
    assert listing(box / "tmp") == []
    assert len(mailbox.Maildir(box, factory=None, create=False)) == 1


def test_recipients_get_one_file_each(tmp_path: Path, box: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    names = [name_for(envelope, recipient) for recipient in envelope.forward_paths]
    for name in names:
        assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    assert listing(box / "new") == sorted(names)


@pytest.mark.parametrize("moved", ["{name}:2,S", "{name}:2,", "{name}", "{name},W=9:2,RS"])
def test_check_cur_finds_a_message_the_reader_moved(tmp_path: Path, box: Path, moved: str) -> None:
    source, offset, envelope = spool_file(tmp_path)
    name = name_for(envelope)
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    # What a reader does when it shows the message: rename new/<name> to cur/<name>:2,<flags>.
    os.rename(box / "new" / name, box / "cur" / moved.format(name=name))
    assert deliver(box, name, PREFIX, source, offset, check_cur=True) is False
    assert listing(box / "new") == []
    assert listing(box / "tmp") == []
    assert len(mailbox.Maildir(box, factory=None, create=False)) == 1


def test_without_check_cur_a_moved_message_is_delivered_again(tmp_path: Path, box: Path) -> None:
    # check_cur is what makes a repeated delivery safe once a reader has seen the message.
    source, offset, envelope = spool_file(tmp_path)
    name = name_for(envelope)
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    os.rename(box / "new" / name, box / "cur" / f"{name}:2,S")
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    assert listing(box / "new") == [name]


def test_check_cur_ignores_other_messages(tmp_path: Path, box: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    name = name_for(envelope)
    other = name_for(envelope, "bob@example.test")
    (box / "cur" / f"{other}:2,S").write_bytes(b"x")
    (box / "cur" / f"{name}x:2,S").write_bytes(b"x")  # shares the prefix, not the name
    assert deliver(box, name, PREFIX, source, offset, check_cur=True) is True
    assert listing(box / "new") == [name]


def test_size_in_the_name_is_the_file_size(tmp_path: Path, box: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    size = len(PREFIX) + source.stat().st_size - offset
    name = delivery_name(envelope.queue_id, "alice@example.test", envelope.arrival, HOST, size=size)
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    delivered = box / "new" / name
    claimed = re.search(r",S=([0-9]+)", name)
    assert claimed is not None
    assert int(claimed.group(1)) == delivered.stat().st_size == size


def test_wrong_size_in_the_name_is_refused(tmp_path: Path, box: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    size = len(PREFIX) + source.stat().st_size - offset
    name = delivery_name(envelope.queue_id, "a", envelope.arrival, HOST, size=size + 1)
    with pytest.raises(ValueError, match="S="):
        deliver(box, name, PREFIX, source, offset, check_cur=False)
    assert listing(box / "new") == listing(box / "tmp") == []


def test_empty_body_and_empty_prefix(tmp_path: Path, box: Path) -> None:
    source, _, _ = spool_file(tmp_path, b"")
    end = source.stat().st_size
    assert deliver(box, "empty", b"", source, end, check_cur=False) is True
    assert (box / "new" / "empty").read_bytes() == b""


@pytest.mark.parametrize("copier", ["copy_file_range", "sendfile", "read/write"])
def test_large_message_is_copied_intact(
    tmp_path: Path, box: Path, copier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each way of copying is exercised by taking away the ones tried before it, as a system
    # without them would.
    if copier != "copy_file_range":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    if copier == "read/write":
        monkeypatch.delattr(os, "sendfile", raising=False)
    elif not hasattr(os, copier):
        pytest.skip(f"no os.{copier} here")
    body = os.urandom(3 * maildir.COPY_CHUNK + 12345)
    source, offset, envelope = spool_file(tmp_path, b"Subject: big\r\n\r\n" + body)
    name = name_for(envelope)
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    assert (box / "new" / name).read_bytes() == PREFIX + source.read_bytes()[offset:]


def test_a_leftover_in_tmp_is_replaced(tmp_path: Path, box: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    name = name_for(envelope)
    (box / "tmp" / name).write_bytes(b"half a message from a crashed attempt")
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    assert (box / "new" / name).read_bytes() == PREFIX + source.read_bytes()[offset:]
    assert listing(box / "tmp") == []


def test_a_symlink_in_tmp_is_not_followed(tmp_path: Path, box: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    name = name_for(envelope)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (box / "tmp" / name).symlink_to(victim)
    assert deliver(box, name, PREFIX, source, offset, check_cur=False) is True
    assert victim.read_bytes() == b"precious"
    assert not (box / "new" / name).is_symlink()
    assert listing(box / "tmp") == []


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_symlinked_maildir_directories_are_refused(tmp_path: Path, box: Path, sub: str) -> None:
    source, offset, envelope = spool_file(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (box / sub).rmdir()
    (box / sub).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError) as caught:
        deliver(box, name_for(envelope), PREFIX, source, offset, check_cur=True)
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert listing(elsewhere) == []
    for other in {"tmp", "new", "cur"} - {sub}:
        assert listing(box / other) == []


def test_a_symlinked_mailbox_directory_is_followed(tmp_path: Path, box: Path) -> None:
    # The administrator's choice (a mailbox kept on another disk): routing follows it too.
    source, offset, envelope = spool_file(tmp_path)
    real = tmp_path / "disk2" / "bob"
    real.parent.mkdir()
    ensure_maildir(real)
    link = box.parent / "bob"
    link.symlink_to(real, target_is_directory=True)
    name = name_for(envelope, "bob@example.test")
    assert deliver(link, name, PREFIX, source, offset, check_cur=True) is True
    assert listing(real / "new") == [name]


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG, as they would with ENOSPC on a full disk.

    SIGXFSZ is ignored meanwhile, or the kernel would kill the test process instead.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("copier", ["copy_file_range", "sendfile", "read/write"])
def test_a_failed_write_leaves_nothing(
    tmp_path: Path, box: Path, copier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if copier != "copy_file_range":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    if copier == "read/write":
        monkeypatch.delattr(os, "sendfile", raising=False)
    source, offset, envelope = spool_file(tmp_path, b"\r\n" + b"x" * (2 * 1024 * 1024))
    name = name_for(envelope)
    with file_size_limit(1024 * 1024), pytest.raises(OSError) as caught:
        deliver(box, name, PREFIX, source, offset, check_cur=False)
    assert caught.value.errno == errno.EFBIG
    assert listing(box / "tmp") == []
    assert listing(box / "new") == []
    # Once the cause is gone, the retry delivers it.
    assert deliver(box, name, PREFIX, source, offset, check_cur=True) is True
    assert (box / "new" / name).read_bytes() == PREFIX + source.read_bytes()[offset:]


def test_a_source_shorter_than_its_offset_fails(tmp_path: Path, box: Path) -> None:
    source, _, envelope = spool_file(tmp_path)
    too_far = source.stat().st_size + 1
    with pytest.raises(OSError):
        deliver(box, name_for(envelope), PREFIX, source, too_far, check_cur=False)
    assert listing(box / "tmp") == listing(box / "new") == []


def test_a_missing_maildir_fails(tmp_path: Path) -> None:
    source, offset, envelope = spool_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        deliver(tmp_path / "nobody", name_for(envelope), PREFIX, source, offset, check_cur=False)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a:2,S", "a\0b"])
def test_bad_names_are_refused(tmp_path: Path, box: Path, name: str) -> None:
    source, offset, _ = spool_file(tmp_path)
    with pytest.raises(ValueError):
        deliver(box, name, PREFIX, source, offset, check_cur=False)


def test_negative_offset_is_refused(tmp_path: Path, box: Path) -> None:
    source, _, envelope = spool_file(tmp_path)
    with pytest.raises(ValueError):
        deliver(box, name_for(envelope), PREFIX, source, -1, check_cur=False)
