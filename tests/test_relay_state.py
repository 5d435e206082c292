"""The relay's per-recipient state files (``relay/<id>.state``): the format's round trip and
strictness, the atomic rewrite, and what a crash can leave behind -- never a state that reads
as something it was not.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from katerchen import relay
from katerchen.config import Config
from katerchen.envelope import Envelope
from katerchen.relay import (
    STATE_SUFFIX,
    RecipientState,
    RelayState,
    StateError,
    load_state,
    run_relay,
    save_state,
    state_path,
)
from katerchen.spool import Spool
from tests.conftest import TIMEOUT, log_lines

QUEUE_ID = "0619a4b1c2d3e4f5a6b7"

ENVELOPE = Envelope(
    queue_id=QUEUE_ID,
    arrival=1714567896.123456,
    client="192.0.2.7",
    helo="mail.example.net",
    reverse_path="alice@example.test",
    forward_paths=("bob@example.net", "carol@example.org", "bob@example.net"),
    body=None,
    smtputf8=False,
    relay=True,
)

STATE = RelayState(
    queue_id=QUEUE_ID,
    recipients=[
        RecipientState(
            "bob@example.net",
            status="pending",
            attempts=2,
            next_attempt=1714568496.5,
            last_attempt=1714567896.25,
            reply="451 4.3.0 Try again later",
            dsn_status="4.3.0",
            remote_mta="mx.example.net",
        ),
        RecipientState(
            '"carol smith"@b\u00fccher.example',
            status="sent",
            attempts=1,
            last_attempt=1714567896.0,
            reply="250 2.0.0 Ok: queued as 12345",
            dsn_status="2.0.0",
            remote_mta="mx.b\u00fccher.example",
        ),
        RecipientState(
            "dave@example.org",
            status="failed",
            attempts=1,
            last_attempt=1714567897.0,
            reply="550 5.1.1 <dave@example.org>: no such user",
            dsn_status="5.1.1",
            remote_mta="mx.example.org",
        ),
    ],
    first_attempt=1714567896.0,
    delay_warned=True,
)


# --- the format ----------------------------------------------------------------------------------


def test_round_trip() -> None:
    data = STATE.encode()
    assert RelayState.decode(data) == STATE
    assert RelayState.decode(data).encode() == data


def test_format_is_readable_json_one_recipient_per_line() -> None:
    data = STATE.encode()
    raw = json.loads(data)
    assert raw["format"] == "katerchen-relay-state"
    assert raw["version"] == 1
    assert raw["id"] == QUEUE_ID
    assert raw["first_attempt"] == 1714567896.0
    assert raw["delay_warned"] is True
    assert raw["recipients"][0] == {
        "to": "bob@example.net",
        "status": "pending",
        "attempts": 2,
        "next_attempt": 1714568496.5,
        "last_attempt": 1714567896.25,
        "reply": "451 4.3.0 Try again later",
        "dsn_status": "4.3.0",
        "remote_mta": "mx.example.net",
    }
    lines = data.decode().splitlines()
    assert len(lines) == 2 + len(STATE.recipients)
    assert "b\u00fccher" in data.decode()  # UTF-8, not \u escapes
    assert data.endswith(b"]}\n")


def test_fresh_state_has_every_recipient_once_pending() -> None:
    state = RelayState.fresh(ENVELOPE)
    assert [r.recipient for r in state.recipients] == ["bob@example.net", "carol@example.org"]
    assert all(r.status == "pending" and r.attempts == 0 for r in state.recipients)
    assert state.first_attempt is None
    assert not state.delay_warned
    assert not state.done
    assert state.pending == state.recipients


def test_merge_keeps_what_is_known_and_follows_the_envelope() -> None:
    known = RelayState(
        QUEUE_ID,
        [
            RecipientState("carol@example.org", status="sent", attempts=1),
            RecipientState("zoe@example.net", status="failed", attempts=3),
        ],
        first_attempt=5.0,
        delay_warned=True,
    )
    merged = known.merge(ENVELOPE)
    assert [(r.recipient, r.status) for r in merged.recipients] == [
        ("bob@example.net", "pending"),
        ("carol@example.org", "sent"),
    ]
    assert (merged.first_attempt, merged.delay_warned) == (5.0, True)


def test_done_and_pending() -> None:
    state = attrs.evolve(STATE, recipients=[attrs.evolve(r) for r in STATE.recipients])
    assert not state.done
    assert [r.recipient for r in state.pending] == ["bob@example.net"]
    state.recipient("bob@example.net").status = "sent"
    assert state.done
    assert state.pending == []
    with pytest.raises(KeyError):
        state.recipient("nobody@example.net")


def _mutate(change: dict[str, object], recipient: dict[str, object] | None = None) -> bytes:
    raw = json.loads(STATE.encode())
    raw.update(change)
    if recipient is not None:
        raw["recipients"][0].update(recipient)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "not a katerchen relay state"),
        (_mutate({"format": "other"}), "not a katerchen relay state"),
        (_mutate({"version": 2}), "unknown version"),
        (_mutate({"version": "1"}), "unknown version"),
        (_mutate({"id": "../etc"}), "invalid id"),
        (_mutate({"id": 7}), "id"),
        (_mutate({"recipients": []}), "no recipients"),
        (_mutate({"recipients": {}}), "recipients"),
        (_mutate({"recipients": ["x"]}), "not an object"),
        (_mutate({"delay_warned": 1}), "delay_warned"),
        (_mutate({"first_attempt": "now"}), "first_attempt"),
        (_mutate({"first_attempt": True}), "first_attempt"),
        (_mutate({}, {"status": "delivered"}), "unknown status"),
        (_mutate({}, {"attempts": -1}), "negative"),
        (_mutate({}, {"attempts": True}), "attempts"),
        (_mutate({}, {"attempts": 1.5}), "attempts"),
        (_mutate({}, {"next_attempt": "soon"}), "next_attempt"),
        (_mutate({}, {"to": None}), "to"),
        (_mutate({}, {"reply": 451}), "reply"),
        (_mutate({}, {"to": '"carol smith"@b\u00fccher.example'}), "twice"),
    ],
)
def test_decode_is_strict(data: bytes, fragment: str) -> None:
    with pytest.raises(StateError, match="relay state") as info:
        RelayState.decode(data)
    assert fragment in str(info.value)


def test_nan_and_infinity_are_not_times() -> None:
    data = STATE.encode().replace(b'"first_attempt": 1714567896.0', b'"first_attempt": NaN')
    with pytest.raises(StateError, match="first_attempt"):
        RelayState.decode(data)


def test_every_prefix_of_a_state_file_is_refused() -> None:
    # A state is replaced by rename, so a torn file cannot be seen -- but were one ever read
    # (a copy by hand, a broken file system), it could not pass for a shorter state.
    data = STATE.encode()
    for end in range(len(data.rstrip())):
        with pytest.raises(StateError):
            RelayState.decode(data[:end])


recipient_states = st.builds(
    RecipientState,
    recipient=st.text(min_size=1, max_size=30),
    status=st.sampled_from(["pending", "sent", "failed"]),
    attempts=st.integers(min_value=0, max_value=10**6),
    next_attempt=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    last_attempt=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    reply=st.text(max_size=100),
    dsn_status=st.text(max_size=10),
    remote_mta=st.text(max_size=30),
)


@given(
    recipients=st.lists(recipient_states, min_size=1, max_size=5, unique_by=lambda r: r.recipient),
    first_attempt=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    delay_warned=st.booleans(),
)
def test_round_trip_of_any_state(
    recipients: list[RecipientState], first_attempt: float | None, delay_warned: bool
) -> None:
    state = RelayState(QUEUE_ID, recipients, first_attempt, delay_warned)
    decoded = RelayState.decode(state.encode())
    assert decoded == state


# --- on disk -------------------------------------------------------------------------------------


def test_save_and_load(tmp_path: Path) -> None:
    assert load_state(tmp_path, ENVELOPE) == RelayState.fresh(ENVELOPE)  # no file: fresh
    state = RelayState.fresh(ENVELOPE)
    state.recipients[0].attempts = 1
    save_state(tmp_path, state)
    assert sorted(os.listdir(tmp_path)) == [QUEUE_ID + STATE_SUFFIX]
    assert state_path(tmp_path, QUEUE_ID) == tmp_path / f"{QUEUE_ID}.state"
    assert load_state(tmp_path, ENVELOPE) == state
    state.recipients[0].status = "sent"
    save_state(tmp_path, state)  # replaces
    assert load_state(tmp_path, ENVELOPE) == state
    assert sorted(os.listdir(tmp_path)) == [QUEUE_ID + STATE_SUFFIX]


def test_load_refuses_a_broken_state(tmp_path: Path) -> None:
    state_path(tmp_path, QUEUE_ID).write_bytes(b'{"format": "katerchen-relay-state"')
    with pytest.raises(StateError):
        load_state(tmp_path, ENVELOPE)


def test_a_failed_save_keeps_the_old_state(tmp_path: Path) -> None:
    old = RelayState.fresh(ENVELOPE)
    save_state(tmp_path, old)
    # The temporary name is taken by a directory: the write fails before the rename.
    (tmp_path / f"{QUEUE_ID}.state.tmp").mkdir()
    new = RelayState.fresh(ENVELOPE)
    new.recipients[0].status = "sent"
    with pytest.raises(OSError):
        save_state(tmp_path, new)
    assert load_state(tmp_path, ENVELOPE) == old


def test_save_writes_the_new_state_through_a_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append(("replace", Path(dst).name))
        # At this moment the new state is complete in the temporary file, fsynced.
        assert RelayState.decode(Path(src).read_bytes()).recipients[0].status == "sent"
        real_replace(src, dst)

    def fsync(fd: int) -> None:
        calls.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    monkeypatch.setattr(relay.os, "replace", replace)
    monkeypatch.setattr(relay.os, "fsync", fsync)
    state = RelayState.fresh(ENVELOPE)
    state.recipients[0].status = "sent"
    save_state(tmp_path, state)
    assert calls == [("fsync", "file"), ("replace", f"{QUEUE_ID}.state"), ("fsync", "dir")]


# --- what a crash leaves behind ------------------------------------------------------------------


@pytest.fixture
def relay_config(tmp_path: Path) -> Config:
    return Config.from_toml(
        '[server]\nhostname = "mx.example.test"\nlisten = ["127.0.0.1:0"]\n'
        '[relay.routes]\n"*" = "127.0.0.1:9"\n',
        base_dir=tmp_path,
    )


def _spool(config: Config) -> Spool:
    d = config.directories
    spool = Spool(d.incoming, d.received, d.relay)
    spool.prepare()
    return spool


async def test_start_removes_leftovers_and_keeps_live_states(
    relay_config: Config, nursery: trio.Nursery, mail_log: pytest.LogCaptureFixture
) -> None:
    spool = _spool(relay_config)
    relay_dir = spool.relay
    # A message whose every recipient is final (a crash before it was removed) ...
    done_id = "0619a4b1c2d3e4f5a6c0"
    done = attrs.evolve(ENVELOPE, queue_id=done_id, forward_paths=("bob@example.net",))
    (relay_dir / done_id).write_bytes(done.encode() + b"Subject: x\r\n\r\nhi\r\n")
    final = RelayState.fresh(done)
    final.recipients[0].status = "sent"
    save_state(relay_dir, final)
    # ... a state whose message is gone (a crash between the two unlinks), a torn temporary
    # state, and files that are none of the relay's business.
    save_state(relay_dir, attrs.evolve(STATE, queue_id="0619a4b1c2d3e4f5a6c1"))
    (relay_dir / "0619a4b1c2d3e4f5a6c2.state.tmp").write_bytes(b'{"format": "katerch')
    (relay_dir / "notes.txt").write_text("the administrator's")
    (relay_dir / "subdir").mkdir()

    _send, receive = trio.open_memory_channel[str | None](10)
    with trio.fail_after(TIMEOUT):
        await nursery.start(run_relay, relay_config, spool, receive)
        # The finished message leaves relay/ with its state, without any connection.  The
        # message is unlinked first, then the state, then relay-done is logged: wait for the
        # line (the file being gone says only that the worker thread is half way).
        while not log_lines(mail_log, "relay-done"):
            await trio.sleep(0.01)
    assert sorted(os.listdir(relay_dir)) == ["notes.txt", "subdir"]
    (cleanup,) = log_lines(mail_log, "relay-cleanup")
    assert "0619a4b1c2d3e4f5a6c1.state" in cleanup
    assert "0619a4b1c2d3e4f5a6c2.state.tmp" in cleanup
    assert log_lines(mail_log, "relay-done") == [f"relay-done id={done_id} sent=1 failed=0"]
    nursery.cancel_scope.cancel()


async def test_a_broken_state_is_reported_and_started_afresh(
    relay_config: Config, nursery: trio.Nursery, mail_log: pytest.LogCaptureFixture
) -> None:
    spool = _spool(relay_config)
    relay_dir = spool.relay
    # Arrived now: not too old to be tried.
    envelope = attrs.evolve(ENVELOPE, forward_paths=("bob@example.net",), arrival=time.time())
    (relay_dir / QUEUE_ID).write_bytes(envelope.encode() + b"Subject: x\r\n\r\nhi\r\n")
    state_path(relay_dir, QUEUE_ID).write_bytes(b"garbage")
    _send, receive = trio.open_memory_channel[str | None](10)
    with trio.fail_after(TIMEOUT):
        await nursery.start(run_relay, relay_config, spool, receive)
        # Port 9 refuses: one deferred attempt, written down in a new, valid state.
        while not log_lines(mail_log, "relay"):
            await trio.sleep(0.01)
        while True:
            try:
                state = load_state(relay_dir, envelope)
            except StateError:
                await trio.sleep(0.01)
                continue
            if state.recipients[0].attempts:
                break
            await trio.sleep(0.01)
    (error,) = log_lines(mail_log, "relay-state-error")
    assert error.startswith(f"relay-state-error id={QUEUE_ID} ")
    assert "action=reset" in error
    assert state.recipients[0].status == "pending"
    (line,) = log_lines(mail_log, "relay")
    assert "via=127.0.0.1[127.0.0.1]:9 tls=no status=deferred" in line
    assert 'reply="connect to 127.0.0.1[127.0.0.1]:9: ' in line
    assert 'Connection refused" attempts=1 retry=300' in line
    nursery.cancel_scope.cancel()


async def test_an_undecodable_message_is_left_in_place(
    relay_config: Config, nursery: trio.Nursery, mail_log: pytest.LogCaptureFixture
) -> None:
    spool = _spool(relay_config)
    (spool.relay / QUEUE_ID).write_bytes(b"katerchen-envelope 99\nid x\n\n")
    send, receive = trio.open_memory_channel[str | None](10)
    with trio.fail_after(TIMEOUT):
        await nursery.start(run_relay, relay_config, spool, receive)
        await send.send(QUEUE_ID)  # a ring does not log it again
        await send.send(None)  # nor does a rescan
        # Both rings taken and handled: the task waits for the next one.
        while (
            receive.statistics().current_buffer_used
            or not receive.statistics().tasks_waiting_receive
        ):
            await trio.sleep(0.01)
    (line,) = log_lines(mail_log, "relay-undecodable")
    assert f"id={QUEUE_ID}" in line and "action=left" in line
    assert os.listdir(spool.relay) == [QUEUE_ID]
    nursery.cancel_scope.cancel()


def test_documented_example_decodes() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "spool-format.md").read_text("utf-8")
    block = doc.split("```json\n", 1)[1].split("```", 1)[0]
    state = RelayState.decode(block.encode())
    assert state.queue_id == QUEUE_ID
    assert [(r.recipient, r.status) for r in state.recipients] == [
        ("bob@example.net", "pending"),
        ("carol@example.org", "sent"),
    ]
