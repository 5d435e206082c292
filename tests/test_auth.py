"""Tests for katerchen.auth: scrypt hashes, the users file, the failure tracker and the sender
policy (against a real domains tree in tmp_path)."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from katerchen import auth
from katerchen.address import Address
from katerchen.auth import (
    FailureTracker,
    Users,
    UsersFile,
    canonical_address,
    hash_password,
    load_users,
    parse_users,
    sender_allowed,
    set_password,
    verify_password,
)
from katerchen.config import DeliveryConfig
from katerchen.routing import DomainsTree

#: A cheap cost for tests that hash many times (the default costs ~0.1 s per hash).
FAST = 4


def b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


# --- hashes --------------------------------------------------------------------------------------


def test_round_trip_at_the_default_cost() -> None:
    hashed = hash_password("correct horse battery staple")
    assert hashed.startswith(f"$scrypt$ln={auth.DEFAULT_LOG2_N},r=8,p=1$")
    assert auth.DEFAULT_LOG2_N >= 14
    assert verify_password("correct horse battery staple", hashed)
    assert not verify_password("correct horse battery stapl", hashed)


def test_wrong_passwords() -> None:
    hashed = hash_password("Geheimnis", log2_n=FAST)
    assert verify_password("Geheimnis", hashed)
    for wrong in ["geheimnis", "Geheimnis ", " Geheimnis", "Geheimni", "Geheimnis\n", "x"]:
        assert not verify_password(wrong, hashed), wrong
    assert not verify_password("", hashed)
    assert not verify_password(b"", hashed)


def test_parameters_and_salt_are_in_the_hash() -> None:
    hashed = hash_password("pässwörd", log2_n=5)
    empty, scheme, params, salt, key = hashed.split("$")
    assert (empty, scheme, params) == ("", "scrypt", "ln=5,r=8,p=1")
    assert len(b64(salt)) == 16
    assert len(b64(key)) == 32
    assert "=" not in salt + key and ":" not in hashed
    # An independent computation from the encoded parts gives the encoded key.
    expected = hashlib.scrypt("pässwörd".encode(), salt=b64(salt), n=2**5, r=8, p=1, dklen=32)
    assert b64(key) == expected
    # A fresh salt every time.
    assert hash_password("pässwörd", log2_n=5) != hashed


def test_parameters_are_read_from_the_hash() -> None:
    """A hash made with other parameters (an older default, or another tool such as passlib)
    still verifies: the parameters travel with it."""
    salt = b"0123456789abcdef0123"
    key = hashlib.scrypt(b"secret", salt=salt, n=2**6, r=4, p=2, dklen=40)
    salt_text = base64.b64encode(salt).decode().rstrip("=")
    key_text = base64.b64encode(key).decode().rstrip("=")
    hashed = f"$scrypt$ln=6,r=4,p=2${salt_text}${key_text}"
    assert verify_password("secret", hashed)
    assert verify_password(b"secret", hashed)
    assert not verify_password("secreT", hashed)


def test_bytes_and_text_passwords() -> None:
    hashed = hash_password("grüße", log2_n=FAST)
    assert verify_password("grüße".encode(), hashed)
    # Invalid UTF-8 decoded with surrogateescape checks as the original bytes.
    raw = b"\xff\xfe-raw"
    key = hashlib.scrypt(raw, salt=b"s" * 16, n=2**FAST, r=8, p=1, dklen=32)
    raw_hash = "$scrypt$ln=4,r=8,p=1${}${}".format(
        base64.b64encode(b"s" * 16).decode().rstrip("="),
        base64.b64encode(key).decode().rstrip("="),
    )
    assert verify_password(raw, raw_hash)
    assert verify_password(raw.decode("utf-8", "surrogateescape"), raw_hash)
    # A lone surrogate that stands for no byte is simply wrong.
    assert not verify_password("\ud800", hashed)


def _good() -> str:
    return hash_password("pw", log2_n=FAST)


SALT = "MDEyMzQ1Njc4OWFiY2RlZg"  # 16 bytes
KEY = "A" * 43  # 32 bytes


@pytest.mark.parametrize(
    "hashed",
    [
        "",
        "pw",  # a plain-text password
        "$",
        "$scrypt$",
        "scrypt$ln=4,r=8,p=1$" + SALT + "$" + KEY,  # no leading $
        "$argon2id$v=19$m=65536,t=3,p=4$" + SALT + "$" + KEY,
        "$scrypt$ln=4,r=8$" + SALT + "$" + KEY,  # a parameter missing
        "$scrypt$ln=4,r=8,p=1,x=2$" + SALT + "$" + KEY,  # one too many
        "$scrypt$r=8,ln=4,p=1$" + SALT + "$" + KEY,  # out of order
        "$scrypt$ln=0,r=8,p=1$" + SALT + "$" + KEY,
        "$scrypt$ln=04,r=8,p=1$" + SALT + "$" + KEY,  # leading zero
        "$scrypt$ln=-4,r=8,p=1$" + SALT + "$" + KEY,
        "$scrypt$ln=+4,r=8,p=1$" + SALT + "$" + KEY,
        "$scrypt$ln= 4,r=8,p=1$" + SALT + "$" + KEY,
        "$scrypt$ln=٤,r=8,p=1$" + SALT + "$" + KEY,  # a non-ASCII digit
        "$scrypt$ln=4,r=0,p=1$" + SALT + "$" + KEY,
        "$scrypt$ln=4,r=8,p=0$" + SALT + "$" + KEY,
        "$scrypt$ln=4,r=8,p=17$" + SALT + "$" + KEY,
        "$scrypt$ln=21,r=8,p=1$" + SALT + "$" + KEY,  # N too large
        "$scrypt$ln=20,r=32,p=1$" + SALT + "$" + KEY,  # 4 GiB: beyond MAX_SCRYPT_MEMORY
        "$scrypt$ln=99999,r=8,p=1$" + SALT + "$" + KEY,
        "$scrypt$ln=4,r=8,p=1$$" + KEY,  # no salt
        "$scrypt$ln=4,r=8,p=1$QUJD$" + KEY,  # a 3-byte salt
        "$scrypt$ln=4,r=8,p=1$" + SALT + "$",  # no key
        "$scrypt$ln=4,r=8,p=1$" + SALT + "$QUJDREVGR0g",  # an 8-byte key
        "$scrypt$ln=4,r=8,p=1$" + SALT + "$" + "A" * 200,  # a 150-byte key
        "$scrypt$ln=4,r=8,p=1$" + SALT + "$" + KEY[:-1] + "!",  # not base64
        "$scrypt$ln=4,r=8,p=1$" + SALT + "$" + KEY + "=",  # padding
        "$scrypt$ln=4,r=8,p=1$" + SALT + "$A",  # impossible base64 length
        "$scrypt$ln=4,r=8,p=1$" + SALT + "$" + KEY + "$",  # an extra field
        "$scrypt$ln=4,r=8,p=1$" + SALT + "$" + "ä" * 43,
        "\x00$scrypt$ln=4,r=8,p=1$" + SALT + "$" + KEY,
    ],
)
def test_malformed_hashes_never_verify_and_never_raise(hashed: str) -> None:
    assert not verify_password("pw", hashed)
    assert not verify_password(b"pw", hashed)
    users, problems = parse_users(f"alice@example.org:{hashed}\n")
    assert len(users) == 0
    assert len(problems) == 1


def test_a_well_formed_hash_of_another_password_is_not_malformed() -> None:
    hashed = "$scrypt$ln=4,r=8,p=1$" + SALT + "$" + KEY
    assert not verify_password("pw", hashed)
    assert len(parse_users(f"alice@example.org:{hashed}\n")[0]) == 1


def test_white_space_around_a_users_file_line_is_not_part_of_the_hash() -> None:
    hashed = hash_password("pw", log2_n=FAST)
    assert not verify_password("pw", hashed + " ")
    users, problems = parse_users(f"  alice@example.org:{hashed} \t\n")
    assert problems == []
    assert users.authenticate("alice@example.org", "pw") == "alice@example.org"


def test_hash_password_refuses() -> None:
    with pytest.raises(ValueError):
        hash_password("")
    for cost in [0, 21, -1]:
        with pytest.raises(ValueError):
            hash_password("pw", log2_n=cost)


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice@example.org", "alice@example.org"),
        ("Alice@Example.ORG", "alice@example.org"),
        ('"a b"@example.org', '"a b"@example.org'),
        ('"A:B"@Example.org', '"a:b"@example.org'),
        ('"alice"@example.org', "alice@example.org"),  # quoted needlessly
        ("jörg@bücher.example", "jörg@bücher.example"),
        ("alice@[127.0.0.1]", "alice@[127.0.0.1]"),
        ("alice", None),
        ("postmaster", None),
        ("<alice@example.org>", None),
        ("alice@example.org ", None),
        ("", None),
        ("a@b@c", None),
        ("alice@exa mple.org", None),
        ("alice@example.org\r\nRSET", None),
    ],
)
def test_canonical_address(text: str, expected: str | None) -> None:
    assert canonical_address(text) == expected


# --- the users file ------------------------------------------------------------------------------


def test_parse_users() -> None:
    h1, h2, h3 = _good(), _good(), _good()
    text = (
        "# users\n"
        "\n"
        f"Alice@Example.org:{h1}\n"
        f"   bob@example.org:{h2}   \r\n"
        '"c:d"@example.org:' + h3 + "\n"
        "  # indented comment\n"
    )
    users, problems = parse_users(text)
    assert problems == []
    assert dict(users.hashes) == {
        "alice@example.org": h1,
        "bob@example.org": h2,
        '"c:d"@example.org': h3,
    }
    assert "ALICE@example.org" in users
    assert "carol@example.org" not in users
    assert "not an address" not in users


def test_bad_lines_are_ignored_and_described_without_their_content() -> None:
    good = _good()
    text = (
        "alice@example.org:hunter2\n"  # a plain-text password
        "bob@example.org\n"  # no hash
        "carol@example.org:\n"  # empty hash
        f"not an address:{good}\n"
        f"dave@example.org:{good}\n"
        f"DAVE@example.org:{_good()}\n"  # again: the first counts
        "erin@example.org:geheim:42\n"  # a plain-text password with a colon
    )
    users, problems = parse_users(text)
    assert dict(users.hashes) == {"dave@example.org": good}
    assert [p.split(":")[0] for p in problems] == [
        "line 1",
        "line 2",
        "line 3",
        "line 4",
        "line 6",
        "line 7",
    ]
    joined = "\n".join(problems)
    for secret in ["hunter2", "geheim", good]:
        assert secret not in joined
    assert "plain-text password is never accepted" in problems[0]


def test_a_plain_text_password_is_never_accepted() -> None:
    users, _ = parse_users("alice@example.org:hunter2\n")
    assert users.authenticate("alice@example.org", "hunter2") is None
    # Even one that looks like half a hash.
    users, _ = parse_users("alice@example.org:$scrypt$hunter2\n")
    assert users.authenticate("alice@example.org", "$scrypt$hunter2") is None


def test_authenticate() -> None:
    users, _ = parse_users(f"alice@example.org:{hash_password('s3cret', log2_n=FAST)}\n")
    assert users.authenticate("alice@example.org", "s3cret") == "alice@example.org"
    assert users.authenticate("ALICE@Example.Org", "s3cret") == "alice@example.org"
    assert users.authenticate("alice@example.org", b"s3cret") == "alice@example.org"
    assert users.authenticate("alice@example.org", "S3cret") is None
    assert users.authenticate("alice@example.org", "") is None
    assert users.authenticate("bob@example.org", "s3cret") is None
    assert users.authenticate("alice", "s3cret") is None
    assert users.authenticate("", "") is None
    assert Users().authenticate("alice@example.org", "s3cret") is None


def test_unknown_users_cost_a_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    """No timing oracle: an unknown user (or a bad user name) runs scrypt all the same."""
    calls: list[str] = []
    real = auth.verify_password

    def counting(password: str | bytes, hashed: str) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(auth, "verify_password", counting)
    users = Users({"alice@example.org": _good()})
    for name in ["bob@example.org", "no address", ""]:
        assert users.authenticate(name, "pw") is None
    assert users.authenticate("alice@example.org", "") is None  # empty: no shortcut either
    assert calls == [auth._DUMMY_HASH] * 4
    assert auth._parse_hash(auth._DUMMY_HASH) is not None


def test_users_file_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="katerchen")
    users_file = UsersFile(tmp_path / "users")
    assert len(users_file.load()) == 0
    assert len(users_file.load()) == 0
    assert users_file.authenticate("alice@example.org", "pw") is None
    missing = [r for r in caplog.records if "users-file-missing" in r.getMessage()]
    assert len(missing) == 1  # once, not per AUTH


def test_users_file_reloads_after_edits(tmp_path: Path) -> None:
    path = tmp_path / "users"
    users_file = UsersFile(path)
    set_password(path, "alice@example.org", "one", log2_n=FAST)
    first = users_file.load()
    assert users_file.load() is first  # cached while unchanged
    assert users_file.authenticate("alice@example.org", "one") == "alice@example.org"

    # Changed by rename (a new inode).
    assert set_password(path, "alice@example.org", "two", log2_n=FAST) is False
    assert users_file.authenticate("alice@example.org", "one") is None
    assert users_file.authenticate("alice@example.org", "two") == "alice@example.org"

    # Changed in place by an editor, same inode.
    inode = path.stat().st_ino
    with path.open("a") as file:
        file.write(f"bob@example.org:{hash_password('three', log2_n=FAST)}\n")
    assert path.stat().st_ino == inode
    assert users_file.authenticate("bob@example.org", "three") == "bob@example.org"

    # Removed: nobody.
    path.unlink()
    assert users_file.authenticate("alice@example.org", "two") is None


def test_users_file_same_size_rewrite_in_place_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice@example.org:{hash_password('aaaa', log2_n=FAST)}\n")
    users_file = UsersFile(path)
    assert users_file.authenticate("alice@example.org", "aaaa")
    before = path.stat()
    path.write_text(f"alice@example.org:{hash_password('bbbb', log2_n=FAST)}\n")
    # Same size and inode: the mtime tells (forced apart, as a coarse clock might not).
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert path.stat().st_size == before.st_size
    assert users_file.authenticate("alice@example.org", "bbbb") == "alice@example.org"


def test_users_file_problems_are_logged_once_per_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="katerchen")
    path = tmp_path / "users"
    path.write_text("alice@example.org:hunter2\n")
    path.chmod(0o600)
    users_file = UsersFile(path)
    for _ in range(3):
        assert users_file.authenticate("alice@example.org", "hunter2") is None
    errors = [r.getMessage() for r in caplog.records if "users-file-error" in r.getMessage()]
    assert len(errors) == 1
    assert "line 1" in errors[0]
    assert "hunter2" not in caplog.text


def test_users_file_readable_by_others_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="katerchen")
    path = tmp_path / "users"
    path.write_text(f"alice@example.org:{_good()}\n")
    path.chmod(0o644)
    assert "alice@example.org" in UsersFile(path).load()
    assert "users-file-permissions" in caplog.text
    assert "mode=0644" in caplog.text


def test_users_file_that_is_a_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="katerchen")
    (tmp_path / "users").mkdir()
    assert len(UsersFile(tmp_path / "users").load()) == 0
    assert "not a regular file" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_users_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice@example.org:{_good()}\n")
    path.chmod(0)
    with pytest.raises(PermissionError):
        UsersFile(path).authenticate("alice@example.org", "pw")


def test_users_file_under_a_file_raises(tmp_path: Path) -> None:
    """An OSError other than "no such file" is the caller's temporary failure, not "no users"."""
    (tmp_path / "etc").write_text("a file where a directory should be")
    with pytest.raises(NotADirectoryError):
        UsersFile(tmp_path / "etc" / "users").load()


def test_load_users_is_cached_per_path(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "alice@example.org", "pw", log2_n=FAST)
    first = load_users(path)
    assert "alice@example.org" in first
    assert load_users(path) is first
    assert load_users(tmp_path / "." / "users") is first
    set_password(path, "bob@example.org", "pw", log2_n=FAST)
    assert "bob@example.org" in load_users(path)


# --- set_password --------------------------------------------------------------------------------


def test_set_password_creates_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "katerchen" / "users"
    old_umask = os.umask(0)
    try:
        assert set_password(path, "Alice@Example.org", "open sesame", log2_n=FAST) is True
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "open sesame" not in text
    assert text.startswith("alice@example.org:$scrypt$ln=4,r=8,p=1$")
    assert text.count("\n") == 1
    assert load_users(path).authenticate("alice@example.org", "open sesame")
    assert os.listdir(path.parent) == ["users"]  # no temporary file left behind


def test_set_password_keeps_every_other_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    bob = _good()
    original = (
        "# the users of example.org\n"
        "\n"
        f"bob@example.org:{bob}\n"
        "Alice@example.org:hunter2\n"  # malformed: replaced, since it is alice's line
        "broken line kept as it is\r\n"
        f"alice@example.org:{_good()}\n"  # a duplicate: dropped
        "carol@example.org:\xff\xfe"  # no newline at the end, and not UTF-8
    )
    path.write_bytes(original.encode("latin-1"))
    path.chmod(0o644)
    assert set_password(path, "alice@example.org", "new one", log2_n=FAST) is False
    lines = path.read_bytes().split(b"\n")
    assert lines[0] == b"# the users of example.org"
    assert lines[1] == b""
    assert lines[2] == f"bob@example.org:{bob}".encode()
    assert lines[3].startswith(b"alice@example.org:$scrypt$")
    assert lines[4] == b"broken line kept as it is\r"
    assert lines[5] == b"carol@example.org:\xff\xfe"  # still without a newline
    assert len(lines) == 6
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"new one" not in path.read_bytes()
    users = load_users(path)
    assert users.authenticate("alice@example.org", "new one") == "alice@example.org"
    assert users.hashes["bob@example.org"] == bob


def test_set_password_appends_a_new_user(tmp_path: Path) -> None:
    path = tmp_path / "users"
    bob = _good()
    path.write_text(f"bob@example.org:{bob}")  # no final newline
    assert set_password(path, "carol@example.org", "pw", log2_n=FAST) is True
    lines = path.read_text().splitlines()
    assert lines[0] == f"bob@example.org:{bob}"
    assert lines[1].startswith("carol@example.org:$scrypt$")


def test_set_password_refuses(tmp_path: Path) -> None:
    path = tmp_path / "users"
    with pytest.raises(ValueError):
        set_password(path, "not an address", "pw", log2_n=FAST)
    with pytest.raises(ValueError):
        set_password(path, "postmaster", "pw", log2_n=FAST)
    with pytest.raises(ValueError):
        set_password(path, "alice@example.org", "", log2_n=FAST)
    assert not path.exists()


def test_concurrent_set_password_loses_no_update(tmp_path: Path) -> None:
    path = tmp_path / "users"
    names = [f"user{i}@example.org" for i in range(8)]
    threads = [
        threading.Thread(target=set_password, args=(path, name, "pw"), kwargs={"log2_n": FAST})
        for name in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(load_users(path).hashes) == sorted(names)


# --- the failure tracker -------------------------------------------------------------------------


def test_lockout_after_max_failures_within_the_window() -> None:
    tracker = FailureTracker(max_failures=5, window=900)
    ip = "192.0.2.1"
    for t in [0, 100, 200, 300]:
        tracker.record_failure(ip, t)
        assert not tracker.locked(ip, t)
    assert tracker.failures(ip, 300) == 4
    tracker.record_failure(ip, 400)
    assert tracker.locked(ip, 400)
    assert tracker.locked(ip, 899.9)  # the first failure (t=0) is still within the window
    assert not tracker.locked(ip, 900)  # ... and now it is not: four left
    assert tracker.failures(ip, 900) == 4
    # Other clients are not affected.
    assert not tracker.locked("192.0.2.2", 400)


def test_failures_spread_out_never_lock() -> None:
    tracker = FailureTracker(max_failures=3, window=60)
    for t in range(0, 600, 31):  # at most two in any 60 s window
        tracker.record_failure("192.0.2.1", t)
        assert not tracker.locked("192.0.2.1", t)


def test_locked_until_the_window_passes_since_the_oldest_counted_failure() -> None:
    tracker = FailureTracker(max_failures=2, window=10)
    tracker.record_failure("192.0.2.1", 0)
    tracker.record_failure("192.0.2.1", 8)
    assert tracker.locked("192.0.2.1", 9.99)
    assert not tracker.locked("192.0.2.1", 10)
    tracker.record_failure("192.0.2.1", 11)  # 8 and 11 are within 10 s
    assert tracker.locked("192.0.2.1", 11)
    assert tracker.locked("192.0.2.1", 17.99)
    assert not tracker.locked("192.0.2.1", 18)


def test_ipv6_counts_per_slash_64_and_mapped_ipv4_as_ipv4() -> None:
    tracker = FailureTracker(max_failures=2, window=100)
    tracker.record_failure("2001:db8:1:2::1", 0)
    tracker.record_failure("2001:db8:1:2:ffff::9", 1)  # same /64
    assert tracker.locked("2001:db8:1:2::77", 2)
    assert not tracker.locked("2001:db8:1:3::1", 2)  # another /64
    tracker.record_failure("::ffff:192.0.2.7", 0)
    tracker.record_failure("192.0.2.7", 1)
    assert tracker.locked("192.0.2.7", 2)
    assert tracker.locked("::ffff:192.0.2.7", 2)
    # Not an IP (e.g. a Unix socket peer): counted as it is.
    tracker.record_failure("", 0)
    tracker.record_failure("", 1)
    assert tracker.locked("", 2)


def test_tracker_memory_is_bounded() -> None:
    tracker = FailureTracker(max_failures=3, window=10, max_clients=50)
    for i in range(1000):
        tracker.record_failure("192.0.2.1", i * 0.001)
    assert len(tracker._failures["192.0.2.1"]) == 3
    # Expired clients are pruned as new failures come.
    for i in range(40):
        tracker.record_failure(f"198.51.100.{i}", 1)
    assert len(tracker) == 41
    tracker.record_failure("203.0.113.1", 100)
    assert len(tracker) == 1
    # Beyond max_clients, the clients with the oldest last failure go first.
    for i in range(200):
        tracker.record_failure(f"10.0.{i // 256}.{i % 256}", 101 + i * 0.01)
    assert len(tracker) == 50
    assert "10.0.0.199" in tracker._failures
    assert "203.0.113.1" not in tracker._failures


def test_tracker_refuses_nonsense() -> None:
    for args in [(0, 10.0), (5, 0.0), (5, -1.0)]:
        with pytest.raises(ValueError):
            FailureTracker(*args)


# --- senders -------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> DomainsTree:
    root = tmp_path / "domains"
    for mailbox in ["example.org/alice", "example.org/bob", "example.net/carol"]:
        (root / mailbox).mkdir(parents=True)
    (root / "example.org" / "aliases").write_text(
        "team: alice, bob\n"
        "info: bob\n"
        "sales: alice@example.net\n"  # only a forward to a mailbox-less name
        "abroad: alice@remote.example\n"
        "me: alice\n"
    )
    (root / "example.net" / "aliases").write_text("al: alice@example.org\n*: alice@example.org\n")
    return DomainsTree(root, DeliveryConfig())


@pytest.mark.parametrize(
    ("sender", "allowed"),
    [
        (None, True),  # <>
        ("", True),
        ("alice@example.org", True),
        ("ALICE@Example.ORG", True),
        ("alice+lists@example.org", True),  # sub-address
        ("team@example.org", True),  # an alias that delivers to alice (and bob)
        ("me@example.org", True),
        ("al@example.net", True),  # an alias in another domain
        ("anything@example.net", True),  # the catch-all goes to alice
        ("carol@example.net", False),  # carol's own mailbox wins over the catch-all
        ("bob@example.org", False),
        ("info@example.org", False),
        ("sales@example.org", False),
        ("abroad@example.org", False),
        ("nobody@example.org", False),
        ("alice@remote.example", False),
        ("alice@[127.0.0.1]", False),
        ("not an address", False),
        ("<alice@example.org>", False),
    ],
)
def test_sender_allowed(tree: DomainsTree, sender: str | None, allowed: bool) -> None:
    assert sender_allowed("alice@example.org", sender, tree) is allowed


def test_sender_allowed_takes_parsed_addresses(tree: DomainsTree) -> None:
    assert sender_allowed("alice@example.org", Address("Alice", "example.org"), tree)
    assert sender_allowed("alice@example.org", Address("team", "EXAMPLE.org"), tree)
    assert not sender_allowed("alice@example.org", Address("bob", "example.org"), tree)
    assert not sender_allowed("alice@example.org", Address("postmaster", None), tree)


def test_sender_allowed_for_a_user_without_a_mailbox(tree: DomainsTree) -> None:
    """A user that is an alias, or has no mailbox at all, may send as itself only."""
    assert sender_allowed("team@example.org", "team@example.org", tree)
    assert sender_allowed("Team@example.org", "TEAM@example.org", tree)
    assert not sender_allowed("team@example.org", "alice@example.org", tree)
    assert not sender_allowed("team@example.org", "bob@example.org", tree)
    assert sender_allowed("dave@elsewhere.example", "dave@elsewhere.example", tree)
    assert not sender_allowed("dave@elsewhere.example", "alice@example.org", tree)
    assert not sender_allowed("not a user", "alice@example.org", tree)
    assert sender_allowed("not a user", None, tree)


def test_sender_allowed_follows_alias_edits(tree: DomainsTree) -> None:
    aliases = tree.root / "example.org" / "aliases"
    assert not sender_allowed("alice@example.org", "info@example.org", tree)
    aliases.write_text("info: bob, alice\n")
    assert sender_allowed("alice@example.org", "info@example.org", tree)
    assert not sender_allowed("alice@example.org", "team@example.org", tree)
