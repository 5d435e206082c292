#!/usr/bin/env python3
"""Receive benchmark: messages per second that an SMTP server takes in and acknowledges.

Sends N messages of S bytes over C concurrent connections (one connection per message, like
Postfix's ``smtp-source`` without ``-d``) to a running server, and prints the rate. It uses
``smtp-source`` when it is installed (Debian package ``postfix``) and a built-in trio client
otherwise; ``--tool`` chooses explicitly.

    # against a server that is already running
    python scripts/bench_receive.py --port 2525 --to postmaster@localhost -n 2000 -c 10 -s 1024

    # start a throw-away katerchen in a temporary directory, measure, stop it
    python scripts/bench_receive.py --spawn -n 2000 -c 10 -s 1024

    # delivery latency: the time from each 250 to the message's file in the mailbox's new/
    python scripts/bench_receive.py --spawn --latency -n 1000 -c 1 -s 1024

``--latency`` uses the built-in client, which reads the queue id from each 250 reply, and a
watcher thread that lists the Maildir's ``new/`` every 0.5 ms and stamps the moment a file named
for that queue id (``...K<queue id>R...``, katerchen's Maildir names) first shows up; it then
moves the file to ``cur/`` as a mail reader would, which keeps each listing short.  It prints the
median and the 99th percentile.  Against a server that is already running, name the Maildir with
``--maildir``.

It is a measuring tool, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio


def make_body(size: int) -> bytes:
    """A plain RFC 5322 message of about ``size`` bytes, CRLF lines, no leading dots."""
    head = (
        b"From: bench@bench.example\r\nTo: bench\r\nSubject: katerchen receive benchmark\r\n"
        b"Message-ID: <bench@bench.example>\r\n\r\n"
    )
    line = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrs\r\n"
    n = max(0, size - len(head)) // len(line) + 1
    return head + line * n


class _Client:
    """A minimal pipelining SMTP client over one trio stream (enough for a benchmark)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def replies(self, count: int) -> list[tuple[int, bytes]]:
        """The next *count* replies: (code, last line) each."""
        replies: list[tuple[int, bytes]] = []
        while len(replies) < count:
            while b"\n" not in self.buf:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                self.buf += data
            line, _, self.buf = self.buf.partition(b"\n")
            if line[3:4] != b"-":
                replies.append((int(line[:3]), line))
        return replies


QUEUED_RE = re.compile(rb"queued as ([0-9A-Za-z]+)")


async def _send_one(
    host: str,
    port: int,
    sender: str,
    rcpt: str,
    payload: bytes,
    on_queued: Callable[[str], None] | None = None,
) -> None:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        client = _Client(stream)
        await client.replies(1)
        await stream.send_all(b"EHLO bench.example\r\n")
        await client.replies(1)
        await stream.send_all(
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
        )
        codes = [code for code, _ in await client.replies(3)]
        if codes != [250, 250, 354]:
            raise RuntimeError(f"server refused the transaction: {codes}")
        await stream.send_all(payload)
        ((code, line),) = await client.replies(1)
        if code != 250:
            raise RuntimeError(f"server refused the message: {code}")
        if on_queued is not None:
            match = QUEUED_RE.search(line)
            if match is None:
                raise RuntimeError(f"no queue id in {line!r}")
            on_queued(match.group(1).decode())
        await stream.send_all(b"QUIT\r\n")
        await client.replies(1)


async def _run_python(
    args: argparse.Namespace, on_queued: Callable[[str], None] | None = None
) -> float:
    payload = make_body(args.size) + b".\r\n"
    remaining = args.count
    errors: list[BaseException] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                await _send_one(args.host, args.port, args.sender, args.to, payload, on_queued)
            except (OSError, RuntimeError, ConnectionError) as exc:
                errors.append(exc)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(args.concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    if errors:
        print(f"{len(errors)} messages failed, first: {errors[0]!r}", file=sys.stderr)
    return elapsed


def _run_smtp_source(args: argparse.Namespace, tool: str) -> float:
    cmd = [
        tool, "-s", str(args.concurrency), "-m", str(args.count), "-l", str(args.size),
        "-f", args.sender, "-t", args.to, "-M", "bench.example", f"{args.host}:{args.port}",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


#: katerchen's Maildir names: <arrival>.K<queue id>R<12 hex digits of the recipient hash>.<host>
MAILDIR_NAME_RE = re.compile(r"\.K([0-9A-Za-z]+?)R[0-9a-f]{12}\.")


class LatencyWatcher:
    """Stamps the 250 of each queue id and the moment its file first shows up in ``new/``."""

    def __init__(self, maildir: Path) -> None:
        self.new = maildir / "new"
        self.cur = maildir / "cur"
        self.acked: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def queued(self, queue_id: str) -> None:
        self.acked[queue_id] = time.perf_counter()

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                entries = list(os.scandir(self.new))
            except FileNotFoundError:
                entries = []  # delivery creates the Maildir with the first message
            now = time.perf_counter()
            for entry in entries:
                match = MAILDIR_NAME_RE.search(entry.name)
                if match:
                    self.seen.setdefault(match.group(1), now)
                # Read, as a mail reader would: new/ stays short, the listing cheap.
                with contextlib.suppress(FileNotFoundError):
                    os.rename(entry.path, self.cur / (entry.name + ":2,S"))
            time.sleep(0.0005)

    def wait_all(self, timeout: float) -> None:
        """Until every acknowledged message was seen, or *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while any(q not in self.seen for q in self.acked) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join()

    def report(self) -> str:
        latencies = sorted(
            (self.seen[q] - acked) * 1000 for q, acked in self.acked.items() if q in self.seen
        )
        missing = len(self.acked) - len(latencies)
        if len(latencies) < 2:
            return f"latency: too few messages delivered ({len(latencies)}, missing {missing})"
        p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
        # Negative: the file was in new/ before the client had read the 250 (delivery starts at
        # the commit, the reply is still on its way).
        return (
            f"250 -> new/: median {statistics.median(latencies):.2f} ms, "
            f"p99 {p99:.2f} ms, min {latencies[0]:.2f} ms, max {latencies[-1]:.2f} ms "
            f"({len(latencies)} messages, {missing} not delivered)"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: argparse.Namespace, workdir: Path) -> subprocess.Popen[bytes]:
    """Start katerchen on a fresh tree with the mailbox the benchmark sends to."""
    args.port = _free_port()
    local, _, domain = args.to.partition("@")
    (workdir / "domains" / domain / local).mkdir(parents=True)
    config = workdir / "katerchen.toml"
    config.write_text(
        f'[server]\nhostname = "bench.example"\nlisten = ["127.0.0.1:{args.port}"]\n'
        f"[limits]\nmax_connections = 10000\nmax_connections_per_ip = 10000\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "katerchen", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if b"listening" in line:
            break
    else:
        raise SystemExit("katerchen did not start")
    # Keep draining its log so the pipe never fills and stalls the server.
    subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("-n", "--count", type=int, default=2000, help="messages (N)")
    parser.add_argument("-c", "--concurrency", type=int, default=10, help="connections (C)")
    parser.add_argument("-s", "--size", type=int, default=1024, help="message bytes (S)")
    parser.add_argument("--from", dest="sender", default="bench@bench.example")
    parser.add_argument("--to", default="postmaster@localhost")
    parser.add_argument("--tool", choices=["auto", "smtp-source", "python"], default="auto")
    parser.add_argument(
        "--spawn", action="store_true", help="start a katerchen in a temporary directory"
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="measure the time from each 250 to the file in the mailbox's new/ (built-in client)",
    )
    parser.add_argument(
        "--maildir",
        type=Path,
        help="with --latency and no --spawn: the --to mailbox's Maildir (files move to cur/)",
    )
    args = parser.parse_args()
    if args.spawn and args.to == "postmaster@localhost":
        args.to = "bench@bench.example"
    if args.latency and not args.spawn and args.maildir is None:
        parser.error("--latency needs --spawn or --maildir")

    tool = shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if os.access("/usr/sbin/smtp-source", os.X_OK) else None
    )
    if args.latency or args.tool == "python" or (args.tool == "auto" and tool is None):
        tool = None  # only the built-in client sees the queue ids
    elif tool is None:
        raise SystemExit("smtp-source is not installed (Debian: apt-get install postfix)")

    watcher: LatencyWatcher | None = None
    with tempfile.TemporaryDirectory(prefix="katerchen-bench-") as tmp:
        proc = _spawn(args, Path(tmp)) if args.spawn else None
        try:
            if args.latency:
                local, _, domain = args.to.partition("@")
                maildir = args.maildir or Path(tmp) / "domains" / domain.lower() / local.lower()
                watcher = LatencyWatcher(maildir)
                watcher.cur.mkdir(parents=True, exist_ok=True)
                watcher.start()
                elapsed = trio.run(_run_python, args, watcher.queued)
                watcher.wait_all(timeout=60)
            else:
                elapsed = _run_smtp_source(args, tool) if tool else trio.run(_run_python, args)
            received = len(os.listdir(Path(tmp) / "spool" / "received")) if proc else None
        finally:
            if proc:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    name = "smtp-source" if tool else "python client"
    print(
        f"{args.count} messages of {args.size} bytes over {args.concurrency} connections "
        f"({name}): {elapsed:.2f} s, {args.count / elapsed:.0f} msg/s"
    )
    if received is not None:
        print(f"messages still in received/ at the end: {received}")
    if watcher is not None:
        print(watcher.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
