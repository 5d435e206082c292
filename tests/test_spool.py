"""Tests for katerchen.spool on real directories: commit, discard, faults, prepare, queue ids.

Faults are injected with real I/O, never mocks: ``break_received`` replaces ``received/`` with a
regular file, so the commit's rename fails with ENOTDIR exactly as a broken disk would make it
fail, and works even as root (unlike a read-only directory). The receiver's 451 test can do the
same against a running server::

    received.rmdir(); received.write_bytes(b"")      # break
    received.unlink(); received.mkdir()              # repair
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from katerchen import spool as spool_module
from katerchen.envelope import Envelope, received_header
from katerchen.spool import FLUSH_THRESHOLD, QUEUE_ID_LENGTH, Spool, new_queue_id

HEADER = b"katerchen-envelope 1\nid x\n\nReceived: from a\r\n\tby b; date\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(
        incoming=tmp_path / "spool" / "incoming",
        received=tmp_path / "spool" / "received",
        relay=tmp_path / "spool" / "relay",
    )
    assert spool.prepare() == []
    return spool


def break_received(spool: Spool) -> None:
    """A real fault: received/ becomes a regular file, so renaming into it fails (ENOTDIR)."""
    spool.received.rmdir()
    spool.received.write_bytes(b"")


def repair_received(spool: Spool) -> None:
    spool.received.unlink()
    spool.received.mkdir()


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --- commit and discard -----------------------------------------------------------------------


def test_small_message_stays_in_memory_until_commit(spool: Spool) -> None:
    queue_id = new_queue_id()
    message = spool.open_message(queue_id, HEADER)
    assert message.queue_id == queue_id
    assert message.feed(b"Subject: hi\r\n\r\n") is False
    assert message.feed(b"hello\r\n") is False
    assert listing(spool.incoming) == []  # no file, no syscall, before commit
    path = message.commit()
    assert path == spool.received / queue_id
    assert path.read_bytes() == HEADER + b"Subject: hi\r\n\r\nhello\r\n"
    assert listing(spool.incoming) == []
    assert listing(spool.received) == [queue_id]
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o007 == 0  # not readable by others


def test_file_layout(spool: Spool) -> None:
    # The layout of docs/spool-format.md: pre-header, Received header, message bytes.
    queue_id = new_queue_id()
    envelope = Envelope(
        queue_id=queue_id,
        arrival=1714567896.123456,
        client="192.0.2.7",
        helo="mail.example.net",
        reverse_path="",
        forward_paths=('"a b"@example.org',),
        body="BINARYMIME",
        smtputf8=False,
    )
    received = received_header(envelope, hostname="mx.example.org", protocol="ESMTP")
    message = spool.open_message(queue_id, envelope.encode() + received)
    data = b"Subject: x\r\n\r\n\x00\xff bare\nLF\r\n"
    message.feed(data)
    content = message.commit().read_bytes()
    decoded, offset = Envelope.decode(content)
    assert decoded == envelope
    assert content[offset:] == received + data


def test_empty_message(spool: Spool) -> None:
    message = spool.open_message(new_queue_id(), HEADER)
    assert message.commit().read_bytes() == HEADER


def test_large_message_streams_through_flush(spool: Spool) -> None:
    queue_id = new_queue_id()
    message = spool.open_message(queue_id, HEADER)
    chunk = bytes(range(256)) * 256  # 64 KiB
    expected = bytearray(HEADER)
    flushes = 0
    for _ in range(10):
        if message.feed(chunk):
            message.flush()
            flushes += 1
            # The file exists in incoming/ and holds everything fed so far.
            assert (spool.incoming / queue_id).read_bytes() == bytes(expected) + chunk
        expected += chunk
    assert flushes == 10 * len(chunk) // FLUSH_THRESHOLD
    assert listing(spool.received) == []
    path = message.commit()
    assert path.read_bytes() == bytes(expected)
    assert listing(spool.incoming) == []
    assert listing(spool.received) == [queue_id]


def test_feed_reports_threshold(spool: Spool) -> None:
    message = spool.open_message(new_queue_id(), b"h")
    assert message.feed(b"x" * (FLUSH_THRESHOLD - 2)) is False
    assert message.feed(b"x") is True
    message.flush()
    assert message.feed(b"x") is False  # the buffer is empty again
    message.discard()


def test_many_small_pieces(spool: Spool) -> None:
    # More pieces than IOV_MAX (1024) must still be written in one go.
    message = spool.open_message(new_queue_id(), b"")
    for i in range(5000):
        message.feed(b"%d\n" % i)
    expected = b"".join(b"%d\n" % i for i in range(5000))
    assert message.commit().read_bytes() == expected


def test_discard_before_and_after_flush(spool: Spool) -> None:
    message = spool.open_message(new_queue_id(), HEADER)
    message.feed(b"data")
    message.discard()
    message.discard()  # idempotent
    assert listing(spool.incoming) == []

    message = spool.open_message(new_queue_id(), HEADER)
    message.feed(b"data")
    message.flush()
    assert len(listing(spool.incoming)) == 1
    message.discard()
    message.discard()
    assert listing(spool.incoming) == []
    assert listing(spool.received) == []
    with pytest.raises(RuntimeError):
        message.feed(b"more")
    with pytest.raises(RuntimeError):
        message.commit()


def test_discard_after_commit_keeps_the_message(spool: Spool) -> None:
    message = spool.open_message(new_queue_id(), HEADER)
    path = message.commit()
    message.discard()
    assert path.read_bytes() == HEADER


def test_concurrent_messages_do_not_mix(spool: Spool) -> None:
    messages = [spool.open_message(new_queue_id(), b"%d:" % i) for i in range(5)]
    for round_ in range(3):
        for i, message in enumerate(messages):
            message.feed(b"%d-%d," % (i, round_))
            message.flush()
    messages[2].discard()
    for i, message in enumerate(messages):
        if i != 2:
            assert message.commit().read_bytes() == b"%d:%d-0,%d-1,%d-2," % (i, i, i, i)
    assert len(listing(spool.received)) == 4
    assert listing(spool.incoming) == []


def test_open_message_refuses_unsafe_queue_id(spool: Spool) -> None:
    for bad in ("", "../x", "a/b", ".", "a b", "ä"):
        with pytest.raises(ValueError):
            spool.open_message(bad, b"")


def test_existing_incoming_file_is_not_clobbered(spool: Spool) -> None:
    # O_EXCL: a queue id collision fails instead of mixing two messages, and the other file stays.
    queue_id = new_queue_id()
    (spool.incoming / queue_id).write_bytes(b"someone else")
    message = spool.open_message(queue_id, HEADER)
    with pytest.raises(FileExistsError):
        message.commit()
    assert (spool.incoming / queue_id).read_bytes() == b"someone else"
    assert listing(spool.received) == []
    message.discard()
    assert (spool.incoming / queue_id).read_bytes() == b"someone else"


# --- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flushed", [False, True])
def test_commit_fault_leaves_nothing(spool: Spool, flushed: bool) -> None:
    message = spool.open_message(new_queue_id(), HEADER)
    message.feed(b"data\r\n")
    if flushed:
        message.flush()
    break_received(spool)
    with pytest.raises(OSError) as info:
        message.commit()
    assert info.value.errno == errno.ENOTDIR
    assert listing(spool.incoming) == []
    assert spool.received.is_file() and spool.received.read_bytes() == b""
    message.discard()  # still fine after a failed commit
    repair_received(spool)
    assert listing(spool.received) == []
    # The spool works again for the next message.
    assert spool.open_message(new_queue_id(), HEADER).commit().read_bytes() == HEADER


def test_flush_fault_leaves_nothing(spool: Spool) -> None:
    message = spool.open_message(new_queue_id(), HEADER)
    message.feed(b"x" * FLUSH_THRESHOLD)
    spool.incoming.rmdir()  # a real fault: the directory is gone, open() fails with ENOENT
    with pytest.raises(FileNotFoundError):
        message.flush()
    spool.incoming.mkdir()
    # The message is failed: the rest of the client's data is dropped, commit raises again.
    assert message.feed(b"y" * FLUSH_THRESHOLD) is False
    message.flush()
    with pytest.raises(FileNotFoundError):
        message.commit()
    message.discard()
    assert listing(spool.incoming) == []
    assert listing(spool.received) == []
    with pytest.raises(RuntimeError):
        message.commit()


def test_write_fault_midway_leaves_nothing(spool: Spool) -> None:
    # A real fault after part of the message is on disk: the incoming file is removed behind
    # the spool's back. Writes to the open descriptor still succeed, but the rename finds no
    # source and fails with ENOENT, and nothing reaches received/.
    message = spool.open_message(new_queue_id(), HEADER)
    message.feed(b"x")
    message.flush()
    message.incoming_path.unlink()
    message.feed(b"y")
    with pytest.raises(FileNotFoundError):
        message.commit()
    assert listing(spool.incoming) == []
    assert listing(spool.received) == []


def test_directory_fsync_fault_removes_the_renamed_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The only fault that cannot be made with real I/O on a healthy disk: fsync of received/
    # failing after the rename. The fake raises the OSError a dying disk would (EIO).
    def failing_fsync(path: Path) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(spool_module, "fsync_directory", failing_fsync)
    message = spool.open_message(new_queue_id(), HEADER)
    with pytest.raises(OSError):
        message.commit()
    assert listing(spool.received) == []
    assert listing(spool.incoming) == []


# --- prepare and free space -------------------------------------------------------------------


def test_prepare_creates_directories(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a" / "in", tmp_path / "b" / "rcv", tmp_path / "c" / "d" / "relay")
    assert spool.prepare() == []
    assert spool.incoming.is_dir() and spool.received.is_dir() and spool.relay.is_dir()
    assert spool.prepare() == []  # idempotent


def test_prepare_removes_leftovers(spool: Spool) -> None:
    # A message that was being received when the server died.
    unfinished = spool.open_message(new_queue_id(), HEADER)
    unfinished.feed(b"x" * FLUSH_THRESHOLD)
    unfinished.flush()
    done = spool.open_message(new_queue_id(), HEADER).commit()
    (spool.incoming / "stray").write_bytes(b"")
    os.symlink(done, spool.incoming / "link")
    (spool.incoming / "subdir").mkdir()

    removed = spool.prepare()
    assert removed == sorted([unfinished.queue_id, "stray", "link"])
    assert listing(spool.incoming) == ["subdir"]
    assert done.read_bytes() == HEADER  # received/ is never touched, not even through a link


def test_free_bytes(spool: Spool) -> None:
    free = spool.free_bytes()
    assert isinstance(free, int)
    assert free > 0
    vfs = os.statvfs(spool.received)
    # Other processes write to this disk meanwhile, so the two readings may differ a little;
    # the reserved blocks (f_bfree vs f_bavail) or the total size would differ by far more.
    assert abs(free - vfs.f_bavail * vfs.f_frsize) <= 64 * 2**20


# --- queue ids --------------------------------------------------------------------------------


def test_queue_ids_unique_sorted_fixed_width() -> None:
    ids = [new_queue_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for queue_id in ids[:100]:
        assert len(queue_id) == QUEUE_ID_LENGTH
        assert queue_id.isascii() and queue_id.isalnum() and queue_id == queue_id.lower()


def test_queue_ids_survive_a_clock_going_back(monkeypatch: pytest.MonkeyPatch) -> None:
    before = new_queue_id()
    monkeypatch.setattr(time, "time_ns", lambda: 1_000_000_000)
    after = [new_queue_id() for _ in range(3)]
    assert [before, *after] == sorted([before, *after])
    assert len({before, *after}) == 4


def test_queue_id_time_part_is_arrival(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh process (no previous id) takes the clock's microseconds as the prefix.
    monkeypatch.setattr(spool_module, "_last_micros", 0)
    monkeypatch.setattr(time, "time_ns", lambda: 1_714_567_896_123_456_789)
    assert new_queue_id()[:14] == f"{1_714_567_896_123_456:014x}"


# --- what delivery adds: write_file, list_received, remove_received --------------------------


def test_write_file_is_durable_and_never_replaces(spool: Spool) -> None:
    assert spool_module.write_file(spool.incoming, spool.relay, "abc", [b"one ", b"two"]) is True
    assert (spool.relay / "abc").read_bytes() == b"one two"
    assert stat.S_IMODE((spool.relay / "abc").stat().st_mode) & 0o007 == 0
    # Written again under the same name (a repeat after a crash): the first one stays.
    assert spool_module.write_file(spool.incoming, spool.relay, "abc", [b"other"]) is False
    assert (spool.relay / "abc").read_bytes() == b"one two"
    assert listing(spool.incoming) == []  # no temporary file left either way


def test_write_file_failure_leaves_nothing(spool: Spool) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"part"
        raise OSError(errno.EIO, "the source broke")

    with pytest.raises(OSError):
        spool_module.write_file(spool.incoming, spool.relay, "abc", chunks())
    assert listing(spool.incoming) == []
    assert listing(spool.relay) == []
    # A final directory that is not one: the link fails, the temporary file goes.
    spool.relay.rmdir()
    spool.relay.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        spool_module.write_file(spool.incoming, spool.relay, "abc", [b"x"])
    assert listing(spool.incoming) == []


def test_list_received_sorted_queue_ids_only(spool: Spool) -> None:
    ids = [new_queue_id() for _ in range(3)]
    for queue_id in reversed(ids):
        (spool.received / queue_id).write_bytes(b"m")
    (spool.received / ".hidden").write_bytes(b"")
    (spool.received / "a.tmp").write_bytes(b"")
    (spool.received / "subdir").mkdir()
    assert spool.list_received() == ids
    assert spool_module.is_queue_id(ids[0])
    assert not spool_module.is_queue_id("a.tmp") and not spool_module.is_queue_id("x" * 65)


def test_remove_received_is_idempotent(spool: Spool) -> None:
    queue_id = new_queue_id()
    (spool.received / queue_id).write_bytes(b"m")
    spool.remove_received(queue_id)
    assert listing(spool.received) == []
    spool.remove_received(queue_id)  # gone already: fine
    with pytest.raises(ValueError):
        spool.remove_received("../escape")
    break_received(spool)
    with pytest.raises(OSError):
        spool.list_received()
