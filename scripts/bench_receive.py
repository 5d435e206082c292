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

It is a measuring tool, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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

    async def replies(self, count: int) -> list[int]:
        codes: list[int] = []
        while len(codes) < count:
            while b"\n" not in self.buf:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                self.buf += data
            line, _, self.buf = self.buf.partition(b"\n")
            if line[3:4] != b"-":
                codes.append(int(line[:3]))
        return codes


async def _send_one(host: str, port: int, sender: str, rcpt: str, payload: bytes) -> None:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        client = _Client(stream)
        await client.replies(1)
        await stream.send_all(b"EHLO bench.example\r\n")
        await client.replies(1)
        await stream.send_all(
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
        )
        codes = await client.replies(3)
        if codes != [250, 250, 354]:
            raise RuntimeError(f"server refused the transaction: {codes}")
        await stream.send_all(payload)
        (code,) = await client.replies(1)
        if code != 250:
            raise RuntimeError(f"server refused the message: {code}")
        await stream.send_all(b"QUIT\r\n")
        await client.replies(1)


async def _run_python(args: argparse.Namespace) -> float:
    payload = make_body(args.size) + b".\r\n"
    remaining = args.count
    errors: list[BaseException] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                await _send_one(args.host, args.port, args.sender, args.to, payload)
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
    args = parser.parse_args()
    if args.spawn and args.to == "postmaster@localhost":
        args.to = "bench@bench.example"

    tool = shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if os.access("/usr/sbin/smtp-source", os.X_OK) else None
    )
    if args.tool == "python" or (args.tool == "auto" and tool is None):
        tool = None
    elif tool is None:
        raise SystemExit("smtp-source is not installed (Debian: apt-get install postfix)")

    with tempfile.TemporaryDirectory(prefix="katerchen-bench-") as tmp:
        proc = _spawn(args, Path(tmp)) if args.spawn else None
        try:
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
        print(f"messages in received/: {received}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
