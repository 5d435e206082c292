"""The relay's clock: the retry schedule (retry_initial doubling up to retry_max), the one delay
warning after ``delay_warning``, and expiry after ``max_age`` -- one bounce with Status 4.4.7 --
all timed on trio's MockClock against a fake peer that always says 4xx.  Days pass in a fraction
of a second, and no test sleeps.

The harness runs the delivery and relay tasks the way app.run does, but with the relay's wall
clock anchored to the mock one (``relay.anchored_clock()``), so that a message's age -- measured
from its arrival, a wall time -- advances with the virtual time.  The clock jumps to the next
deadline whenever every task is blocked and no worker thread runs (:func:`drive_clock`), so a
slow thread hop (a state file written on a loaded machine) is never jumped over.

SIGUSR1 ("retry everything now") is tested on the real clock with the whole server.
"""

from __future__ import annotations

import contextlib
import email.message
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from katerchen import relay
from katerchen.config import Config
from katerchen.delivery import run_delivery
from katerchen.spool import Spool
from tests.conftest import Server, log_lines, wait_until
from tests.fakepeer import FakePeer, Script
from tests.test_delivery import parse_bounce, read_maildir
from tests.test_relay_peers import (
    REMOTE,
    field,
    mailbox,
    make_relay_config,
    place,
    relay_lines,
    report_fields,
    route_to,
    spool_files,
)

StartServer = Callable[..., Awaitable[Server]]
StartPeer = Callable[..., Awaitable[FakePeer]]

#: Retry 300 s after the first failure, then 600, then every 1200; warn once a message is
#: 1000 s old; give up at 4000 s.
SCHEDULE = {
    "retry_initial": 300,
    "retry_max": 1200,
    "delay_warning": 1000,
    "max_age": 4000,
}
#: Virtual seconds a whole test may take (a hang still fails at once: with autojump, an idle
#: run jumps straight to this deadline).
WITHIN = 100_000.0
#: Slack for times measured on the mock clock (thread hops can cost a jump of the threshold).
SLACK = 2.0

ALWAYS_4XX = Script(replies={"MAIL": "451 4.7.1 Greylisted, try again later"})


@attrs.define(eq=False)
class Threads:
    """Worker threads running now (``trio.to_thread.run_sync`` calls in progress)."""

    busy: int = 0
    idle: trio.Event = attrs.field(factory=trio.Event)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # No autojump: :func:`drive_clock` moves it, and never while a worker thread runs.
    return trio.testing.MockClock()


@pytest.fixture
async def driven(
    clock: trio.testing.MockClock, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jump *clock* to the next deadline whenever every task is blocked and no worker thread
    runs.  (MockClock's own autojump counts a task waiting for a thread as idle: a state file
    written slowly on a busy machine would let the clock skip a retry.)"""
    threads = Threads()
    original = trio.to_thread.run_sync

    async def counted(*args: Any, **kwargs: Any) -> Any:
        threads.busy += 1
        try:
            return await original(*args, **kwargs)
        finally:
            threads.busy -= 1
            if not threads.busy:
                threads.idle.set()
                threads.idle = trio.Event()

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    nursery.start_soon(drive_clock, clock, threads)


async def drive_clock(clock: trio.testing.MockClock, threads: Threads) -> None:
    while True:
        # 10 ms of real quiet: loopback I/O on a loaded 2-core CI machine can take longer than
        # 1 ms to come back, and a jump taken too early would fire a relay timeout instead.
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        if threads.busy:
            await threads.idle.wait()
            continue
        jump = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if 0 < jump < math.inf:
            clock.jump(jump)


@attrs.define
class Pipeline:
    """Delivery and relay of one config, with the times the relay queued its reports.

    :meth:`wait_for` wakes up on every report and every katerchen log line, never on time:
    polling would make the mock clock crawl in steps of the poll interval.
    """

    config: Config
    reports: list[tuple[str, float]] = attrs.field(factory=list)  # (dsn id, mock time)
    _changed: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    async def wait_for(self, condition: Callable[[], object]) -> None:
        with trio.fail_after(WITHIN):
            while not condition():
                await self._changed.park()

    def reported(self, dsn_id: str) -> None:
        self.reports.append((dsn_id, trio.current_time()))
        self._changed.unpark_all()

    @contextlib.contextmanager
    def woken_by_logs(self) -> Iterator[None]:
        """Wake :meth:`wait_for` on each log line (lines logged in worker threads too)."""
        token = trio.lowlevel.current_trio_token()
        pipeline = self

        class Wake(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(pipeline._changed.unpark_all)

        handler = Wake()
        logger = logging.getLogger("katerchen")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)


async def settle(condition: Callable[[], object]) -> None:
    """Poll for what follows at once from something already seen (a file removed after the
    line that announced it): a few quick steps of the mock clock, never a long wait."""
    with trio.fail_after(60):
        while not condition():
            await trio.sleep(0.01)


async def start_pipeline(nursery: trio.Nursery, config: Config) -> Pipeline:
    directories = config.directories
    spool = Spool(directories.incoming, directories.received, directories.relay)
    spool.prepare()
    pipeline = Pipeline(config)
    nursery.start_soon(_wake_on_logs, pipeline)
    to_delivery, delivery_bell = trio.open_memory_channel[str | None](1000)
    to_relay, relay_bell = trio.open_memory_channel[str | None](1000)

    def on_bounce(dsn_id: str) -> None:
        pipeline.reported(dsn_id)
        to_delivery.send_nowait(dsn_id)

    await nursery.start(
        functools.partial(run_delivery, config, spool, delivery_bell, on_relay=to_relay.send_nowait)
    )
    await nursery.start(
        functools.partial(
            relay.run_relay,
            config,
            spool,
            relay_bell,
            on_bounce=on_bounce,
            wall_clock=relay.anchored_clock(),
        )
    )
    return pipeline


async def _wake_on_logs(pipeline: Pipeline) -> None:
    with pipeline.woken_by_logs():
        await trio.sleep_forever()


def retry_config(tmp_path: Path, peer: FakePeer, **schedule: float) -> Config:
    return make_relay_config(tmp_path, relay={**SCHEDULE, **schedule}, routes=route_to(peer))


async def wait_for_reports(config: Config, count: int) -> list[email.message.Message]:
    """The reports in alice's Maildir once *count* are there (delivery runs on the mock clock
    too, so this waits on a few quick thread hops, not on time)."""
    path = mailbox(config)
    await settle(lambda: len(read_maildir(path)) >= count)
    messages = read_maildir(path)
    assert len(messages) == count
    return [parse_bounce(message) for message in messages]


def offsets(peer: FakePeer, start: float) -> list[float]:
    return [session.opened_at - start for session in peer.sessions]


def close_to(values: list[float], expected: list[float]) -> bool:
    return len(values) == len(expected) and all(
        abs(v - e) <= SLACK for v, e in zip(values, expected, strict=True)
    )


async def test_always_4xx_backs_off_warns_once_and_expires(
    clock: trio.testing.MockClock,
    driven: None,
    nursery: trio.Nursery,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    peer = await start_fake_peer(ALWAYS_4XX)
    config = retry_config(tmp_path, peer)
    recipients = (f"carol@{REMOTE}", f"dave@{REMOTE}")
    queue_id = place(config, recipients=recipients, where="relay")
    start = trio.current_time()
    pipeline = await start_pipeline(nursery, config)
    await pipeline.wait_for(lambda: len(pipeline.reports) == 2)
    await peer.wait_for(lambda: all(s.closed for s in peer.sessions), within=WITHIN)

    # Attempts at 0, then 300 later, 600 later, and 1200 later from then on -- and none after
    # the message is max_age old (one more exactly then is allowed: next_attempt never lies
    # beyond arrival + max_age).
    times = offsets(peer, start)
    assert close_to(times[:5], [0, 300, 900, 2100, 3300]), times
    assert len(times) in (5, 6), times
    if len(times) == 6:
        assert abs(times[5] - 4000) <= SLACK, times

    # One delay warning -- at the first deferral once 1000 s old: the attempt at 2100 --
    # then one failure report when the message expires at 4000 s.
    (warning_id, warned_at), (failure_id, failed_at) = pipeline.reports
    assert warning_id == f"{queue_id}w" and failure_id == f"{queue_id}r"
    assert 1000 - SLACK <= warned_at - start <= 2100 + SLACK
    assert abs(failed_at - start - 4000) <= SLACK

    warning, failure = await wait_for_reports(config, 2)
    if report_fields(warning)[recipients[0]]["Action"] == "failed":
        warning, failure = failure, warning
    for recipient in recipients:
        delayed = report_fields(warning)[recipient]
        assert delayed["Action"] == "delayed"
        assert delayed["Status"] == "4.7.1"
        failed = report_fields(failure)[recipient]
        assert failed["Action"] == "failed"
        assert failed["Status"] == "4.4.7"
        assert "451 4.7.1 Greylisted" in failed["Diagnostic-Code"]
    assert str(failure["Subject"]).startswith("Undelivered")
    assert str(warning["Subject"]).startswith("Delayed")

    await settle(lambda: spool_files(config) == [])
    lines = relay_lines(mail_log, to=f"<carol@{REMOTE}>")
    assert [field(x, "status") for x in lines] == ["deferred"] * (len(lines) - 1) + ["bounced"]
    assert [field(x, "retry") for x in lines[:4]] == ["300", "600", "1200", "1200"]
    kinds = [field(line, "kind") for line in log_lines(mail_log, "relay-dsn")]
    assert kinds == ["delayed", "failed"]


async def test_success_before_the_warning_sends_no_report(
    clock: trio.testing.MockClock,
    driven: None,
    nursery: trio.Nursery,
    start_fake_peer: StartPeer,
    tmp_path: Path,
) -> None:
    peer = await start_fake_peer(ALWAYS_4XX, ALWAYS_4XX, Script())
    config = retry_config(tmp_path, peer)
    place(config, where="relay")
    start = trio.current_time()
    pipeline = await start_pipeline(nursery, config)
    await peer.wait_for(lambda: peer.accepted, within=WITHIN)
    await settle(lambda: spool_files(config) == [])
    assert close_to(offsets(peer, start), [0, 300, 900])
    # Nothing more happens, however long we wait: no warning, no report, no attempt.
    await trio.sleep(10 * 4000)
    assert pipeline.reports == []
    assert read_maildir(mailbox(config)) == []
    assert len(peer.sessions) == 3


async def test_no_delay_warning_when_disabled(
    clock: trio.testing.MockClock,
    driven: None,
    nursery: trio.Nursery,
    start_fake_peer: StartPeer,
    tmp_path: Path,
) -> None:
    peer = await start_fake_peer(ALWAYS_4XX)
    config = retry_config(tmp_path, peer, delay_warning=0)
    queue_id = place(config, where="relay")
    pipeline = await start_pipeline(nursery, config)
    await pipeline.wait_for(lambda: pipeline.reports)
    await settle(lambda: spool_files(config) == [])
    assert [dsn_id for dsn_id, _ in pipeline.reports] == [f"{queue_id}r"]
    (report,) = await wait_for_reports(config, 1)
    assert report_fields(report)[f"carol@{REMOTE}"]["Status"] == "4.4.7"


async def test_null_sender_gets_neither_warning_nor_bounce(
    clock: trio.testing.MockClock,
    driven: None,
    nursery: trio.Nursery,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    peer = await start_fake_peer(ALWAYS_4XX)
    config = retry_config(tmp_path, peer)
    place(config, sender="", where="relay")
    pipeline = await start_pipeline(nursery, config)
    await pipeline.wait_for(lambda: relay_lines(mail_log, status="bounced"))
    await settle(lambda: spool_files(config) == [])
    await trio.sleep(100)
    assert pipeline.reports == []
    assert read_maildir(mailbox(config)) == []
    assert spool_files(config, "received") == []


async def test_a_message_older_than_max_age_is_tried_no_more(
    clock: trio.testing.MockClock,
    driven: None,
    nursery: trio.Nursery,
    start_fake_peer: StartPeer,
    tmp_path: Path,
) -> None:
    # Found at start-up already too old (the server was down for days): one report, and at
    # most the one attempt that finds out.
    peer = await start_fake_peer(ALWAYS_4XX)
    config = retry_config(tmp_path, peer)
    place(config, where="relay", arrival=time.time() - 5000)
    pipeline = await start_pipeline(nursery, config)
    await pipeline.wait_for(lambda: pipeline.reports)
    await settle(lambda: spool_files(config) == [])
    assert len(peer.sessions) <= 1
    (report,) = await wait_for_reports(config, 1)
    fields = report_fields(report)[f"carol@{REMOTE}"]
    assert fields["Action"] == "failed" and fields["Status"].startswith("4.")


# --- SIGUSR1, on the real clock ------------------------------------------------------------------


async def test_sigusr1_retries_deferred_recipients_now(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    peer = await start_fake_peer(ALWAYS_4XX, Script())
    config = make_relay_config(
        tmp_path, relay={"retry_initial": 3600, "retry_max": 3600}, routes=route_to(peer)
    )
    queue_id = place(config)
    await start_server(config, deliver=True, handle_signals=True)
    # The relay is done with the attempt once it logged the deferral: the line comes after
    # the state file is written (the file shows up at the rename, while the worker thread may
    # still be syncing the directory -- and a task waiting for a thread counts as blocked).
    await wait_until(lambda: relay_lines(mail_log, to=f"<carol@{REMOTE}>"))
    (line,) = relay_lines(mail_log, to=f"<carol@{REMOTE}>")
    assert field(line, "status") == "deferred" and field(line, "retry") == "3600"
    assert (config.directories.relay / f"{queue_id}.state").exists()
    os.kill(os.getpid(), signal.SIGUSR1)
    await peer.wait_for(lambda: peer.accepted)
    await wait_until(lambda: spool_files(config) == [])
    statuses = [field(x, "status") for x in relay_lines(mail_log, to=f"<carol@{REMOTE}>")]
    assert statuses == ["deferred", "sent"]


async def test_sigusr1_during_the_attempt_is_not_lost(
    start_server: StartServer,
    start_fake_peer: StartPeer,
    tmp_path: Path,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    # SIGUSR1 at the moment the deferral is logged -- the relay has yet to write the state
    # and let go of the message -- still means "retry it now", not in an hour.
    peer = await start_fake_peer(ALWAYS_4XX, Script())
    config = make_relay_config(
        tmp_path, relay={"retry_initial": 3600, "retry_max": 3600}, routes=route_to(peer)
    )
    place(config)

    class SignalOnDeferral(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if " status=deferred " in record.getMessage():
                os.kill(os.getpid(), signal.SIGUSR1)

    handler = SignalOnDeferral()
    logging.getLogger("katerchen").addHandler(handler)
    try:
        await start_server(config, deliver=True, handle_signals=True)
        await peer.wait_for(lambda: peer.accepted)
    finally:
        logging.getLogger("katerchen").removeHandler(handler)
    await wait_until(lambda: spool_files(config) == [])
    statuses = [field(x, "status") for x in relay_lines(mail_log, to=f"<carol@{REMOTE}>")]
    assert statuses == ["deferred", "sent"]
