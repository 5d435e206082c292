#!/usr/bin/env python3
"""Peer benchmark: katerchen against aiosmtpd (with a durable Maildir handler) and Postfix.

Each server gets a fresh temporary tree and one test mailbox, ``bench@bench.example``, delivered
into a Maildir.  Postfix's ``smtp-source`` sends N one-recipient messages of S bytes over C
concurrent connections, one connection per message; the rate is counted end to end, from the
start of ``smtp-source`` until the last message is a file in the Maildir's ``new/``.  The servers
take turns (katerchen, aiosmtpd, Postfix, katerchen, ...), ``--runs`` rounds per message size, and
the table shows the median of the runs, the CPU time the server's processes used per message
(user + system, all threads and child processes), and katerchen's ratio to each peer.

    # the table (defaults: 5000 messages, 10 connections, 1 KiB and 100 KiB, 3 rounds)
    python3 scripts/bench_peers.py

    # held idle connections: RSS per connection, and one transaction while they are held
    python3 scripts/bench_peers.py --idle 10000

The peers:

* **katerchen**: ``python -m katerchen serve`` from this checkout, on its default settings.
* **aiosmtpd**: installed with pip into a virtual environment of its own under
  ``~/.cache/katerchen-bench/`` (it is never a dependency of katerchen), running a Maildir
  handler that writes ``tmp/<name>``, fsyncs it, renames it into ``new/`` and fsyncs ``new/``,
  in a worker thread, before it answers 250 -- the promise katerchen keeps.
* **Postfix** (when ``/usr/sbin/postfix`` is installed; run as root): a private instance with
  its own ``config_directory``, ``queue_directory`` and ``data_directory`` under the temporary
  tree, listening on 127.0.0.1 on a free high port, delivering ``bench.example`` with
  ``virtual(8)`` into a Maildir, and sending nothing out (``relayhost`` empty,
  ``default_transport = error``).  It is stopped at the end (``postfix -c DIR stop``).

``--idle N`` opens N connections to each server (after the greeting and an EHLO they stay
idle), reports the growth of the server's resident memory divided by N, then times ordinary
transactions made while they are held.  The soft limit on open files is raised as far as the
hard limit allows.

A measuring tool, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOMAIN = "bench.example"
MAILBOX = "bench"
RECIPIENT = f"{MAILBOX}@{DOMAIN}"
SENDER = "sender@source.example"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "katerchen-bench"
POSTFIX = Path("/usr/sbin/postfix")

# --- the aiosmtpd server (runs in its own virtual environment) ------------------------------------

AIOSMTPD_SERVER = r"""
import asyncio, itertools, os, signal, socket, sys, time
from aiosmtpd.smtp import SMTP

maildir, port = sys.argv[1], int(sys.argv[2])
tmp, new = os.path.join(maildir, "tmp"), os.path.join(maildir, "new")
counter = itertools.count()
host = socket.gethostname()


def store(data):
    # The Maildir rules, durably: tmp/, fsync, rename into new/, fsync new/.
    name = f"{time.time_ns()}.P{os.getpid()}Q{next(counter)}.{host}"
    path = os.path.join(tmp, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(path, os.path.join(new, name))
    dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class MaildirHandler:
    async def handle_DATA(self, server, session, envelope):
        prefix = f"Return-Path: <{envelope.mail_from}>\r\n".encode()
        data = prefix + envelope.original_content
        await asyncio.get_running_loop().run_in_executor(None, store, data)
        return "250 2.0.0 Ok: queued"


async def main():
    loop = asyncio.get_running_loop()
    handler = MaildirHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench-aiosmtpd.example"),
        "127.0.0.1", port, backlog=4096,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


asyncio.run(main())
"""


def aiosmtpd_python() -> Path:
    """The interpreter of the benchmark's own virtual environment with aiosmtpd, made once."""
    venv = CACHE / "aiosmtpd-venv"
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import aiosmtpd"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing aiosmtpd into {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "aiosmtpd"], check=True)
    return python


# --- helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1)
            try:
                s.connect(("127.0.0.1", port))
                if s.recv(4).startswith(b"220"):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port}")


def make_maildir(path: Path, owner: tuple[int, int] | None = None) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for directory in (path.parent, path, path / "tmp", path / "new", path / "cur"):
            os.chown(directory, *owner)


def _proc_stat(pid: int) -> tuple[int, int, int, int, int, int] | None:
    """(ppid, utime, stime, cutime, cstime, rss pages) of *pid*, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5)
    return (
        int(fields[1]),
        int(fields[11]),
        int(fields[12]),
        int(fields[13]),
        int(fields[14]),
        int(fields[21]),
    )


def process_tree(root: int) -> dict[int, tuple[int, int, int, int, int, int]]:
    """*root* and every process descending from it, with their /proc stat figures."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _proc_stat(int(entry))
            if found is not None:
                stats[int(entry)] = found
    tree: dict[int, tuple[int, int, int, int, int, int]] = {}
    if root not in stats:
        return tree
    tree[root] = stats[root]
    grew = True
    while grew:
        grew = False
        for pid, info in stats.items():
            if pid not in tree and info[0] in tree:
                tree[pid] = info
                grew = True
    return tree


TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) of *root*'s process tree, including reaped children."""
    return sum(s[1] + s[2] + s[3] + s[4] for s in process_tree(root).values()) / TICK


def rss_bytes(root: int) -> int:
    return sum(s[5] for s in process_tree(root).values()) * PAGE


def clear_new(new: Path) -> None:
    """Empty ``new/`` between runs by moving its files away, not by deleting them.

    Deleting thousands of files would make the next run slower for whichever server comes
    next: on ext4 without a journal (this benchmark's VM) the inode allocator skips inodes
    freed in the last seconds to minutes, one by one, on every file it creates.
    """
    trash = new.parent.parent / f".bench-trash-{new.parent.name}"
    trash.mkdir(exist_ok=True)
    with os.scandir(new) as entries:
        for entry in entries:
            os.rename(entry.path, trash / entry.name)


def count_entries(path: Path) -> int:
    with os.scandir(path) as entries:
        return sum(1 for _ in entries)


# --- the servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    workdir: Path
    port: int = 0
    new: Path = Path()
    root_pid: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stop_hook: Callable[[], None] | None = None

    def stop(self) -> None:
        if self.stop_hook is not None:
            self.stop_hook()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_katerchen(workdir: Path, *, max_connections: int) -> Server:
    server = Server("katerchen", workdir, port=free_port())
    maildir = workdir / "domains" / DOMAIN / MAILBOX
    make_maildir(maildir)
    server.new = maildir / "new"
    config = workdir / "katerchen.toml"
    config.write_text(
        textwrap.dedent(f"""\
            [server]
            hostname = "bench-katerchen.example"
            listen = ["127.0.0.1:{server.port}"]
            [limits]
            max_connections = {max_connections}
            max_connections_per_ip = {max_connections}
            """)
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(workdir / "katerchen.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "katerchen", "serve", "--config", str(config)],
        stderr=log,
        stdout=subprocess.DEVNULL,
        cwd=workdir,
        env=env,
    )
    server.procs.append(proc)
    server.root_pid = proc.pid
    wait_port(server.port)
    return server


def start_aiosmtpd(workdir: Path) -> Server:
    python = aiosmtpd_python()
    server = Server("aiosmtpd", workdir, port=free_port())
    maildir = workdir / "Maildir"
    make_maildir(maildir)
    server.new = maildir / "new"
    script = workdir / "aiosmtpd_maildir.py"
    script.write_text(AIOSMTPD_SERVER)
    proc = subprocess.Popen(
        [str(python), str(script), str(maildir), str(server.port)],
        stdout=subprocess.PIPE,
        stderr=open(workdir / "aiosmtpd.log", "wb"),  # noqa: SIM115
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError("aiosmtpd did not start")
    server.procs.append(proc)
    server.root_pid = proc.pid
    wait_port(server.port)
    return server


POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def start_postfix(workdir: Path) -> Server:
    """A private Postfix: its own config, queue and data directories, no outbound mail."""
    if os.geteuid() != 0:
        raise RuntimeError("a private Postfix instance needs root (it runs as mail_owner)")
    server = Server("Postfix", workdir, port=free_port())
    etc, queue, data, mail = (workdir / d for d in ("etc", "queue", "data", "mail"))
    for directory in (etc, queue, data, mail):
        directory.mkdir()
    owner = pwd.getpwnam("postfix")
    ids = (owner.pw_uid, owner.pw_gid)
    os.chown(data, *ids)
    os.chown(mail, *ids)
    maildir = mail / DOMAIN / MAILBOX
    make_maildir(maildir, ids)
    server.new = maildir / "new"
    (etc / "vmailbox").write_text(f"{RECIPIENT} {DOMAIN}/{MAILBOX}/\n")
    setgid_group = "postdrop"
    grp.getgrnam(setgid_group)  # KeyError when Postfix is not set up
    (etc / "main.cf").write_text(
        textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {queue}
            data_directory = {data}
            meta_directory = /etc/postfix
            mail_owner = postfix
            setgid_group = {setgid_group}
            myhostname = bench-postfix.example
            mydomain = bench-postfix.example
            myorigin = $myhostname
            mydestination =
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            relayhost =
            default_transport = error:outbound mail is off in this benchmark
            relay_transport = error:outbound mail is off in this benchmark
            local_transport = error:no local delivery in this benchmark
            alias_maps =
            alias_database =
            local_recipient_maps =
            virtual_mailbox_domains = {DOMAIN}
            virtual_mailbox_base = {mail}
            virtual_mailbox_maps = texthash:{etc}/vmailbox
            virtual_uid_maps = static:{owner.pw_uid}
            virtual_gid_maps = static:{owner.pw_gid}
            virtual_minimum_uid = 1
            maillog_file = {workdir}/maillog
            maillog_file_prefixes = {workdir}
            biff = no
            """)
    )
    (etc / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=server.port))
    postfix = [str(POSTFIX), "-c", str(etc)]
    started = subprocess.run([*postfix, "start"], capture_output=True)
    if started.returncode != 0:
        # Postfix's command-line tools log to syslog (or maillog_file), not to a pipe.
        log = workdir / "maillog"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"postfix start failed:\n{tail}")
    pid_file = queue / "pid" / "master.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text().strip():
        if time.monotonic() > deadline:
            raise RuntimeError("Postfix did not start")
        time.sleep(0.05)
    server.root_pid = int(pid_file.read_text().split()[0])

    def stop() -> None:
        subprocess.run([*postfix, "stop"], capture_output=True)
        deadline = time.monotonic() + 30
        while _proc_stat(server.root_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    server.stop_hook = stop
    wait_port(server.port)
    return server


STARTERS: dict[str, Callable[[Path], Server]] = {
    "katerchen": lambda d: start_katerchen(d, max_connections=20000),
    "aiosmtpd": start_aiosmtpd,
    "postfix": start_postfix,
}


@contextlib.contextmanager
def running(
    name: str, base: Path, starter: Callable[[Path], Server] | None = None
) -> Iterator[Server]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    os.chmod(workdir, 0o755)
    server = (starter or STARTERS[name])(workdir)
    try:
        yield server
    finally:
        server.stop()


# --- the throughput run --------------------------------------------------------------------------


@dataclass
class Result:
    rate: float  # messages per second, end to end
    cpu_ms: float  # server CPU milliseconds per message
    delivered: int


def smtp_source() -> str:
    tool = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.access(tool, os.X_OK):
        raise SystemExit("smtp-source is not installed (Debian: apt-get install postfix)")
    return tool


def throughput(server: Server, count: int, concurrency: int, size: int, timeout: float) -> Result:
    clear_new(server.new)
    cmd = [
        smtp_source(),
        "-s",
        str(concurrency),
        "-m",
        str(count),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        "source.example",
        f"127.0.0.1:{server.port}",
    ]
    cpu_before = cpu_seconds(server.root_pid)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    delivered = count_entries(server.new)
    while delivered < count and time.monotonic() < deadline:
        time.sleep(0.001)
        delivered = count_entries(server.new)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(server.root_pid) - cpu_before
    if delivered < count:
        print(f"  {server.name}: only {delivered} of {count} delivered", file=sys.stderr)
    return Result(delivered / elapsed, cpu * 1000 / max(delivered, 1), delivered)


def table(
    results: dict[str, dict[int, list[Result]]], sizes: list[int], args: argparse.Namespace
) -> str:
    def label(size: int) -> str:
        return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"

    head = "| server | " + " | ".join(label(s) for s in sizes)
    head += f" | CPU ms per message ({label(sizes[0])}) |"
    lines = [head, "|---" * (len(sizes) + 2) + "|"]
    medians = {
        name: {s: statistics.median(r.rate for r in runs[s]) for s in sizes}
        for name, runs in results.items()
    }
    for name, runs in results.items():
        cells = []
        for s in sizes:
            rates = sorted(r.rate for r in runs[s])
            cells.append(f"{medians[name][s]:.0f} msg/s ({'/'.join(f'{x:.0f}' for x in rates)})")
        cpu = statistics.median(r.cpu_ms for r in runs[sizes[0]])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cpu:.2f} |")
    if "katerchen" in medians:
        for peer in medians:
            if peer == "katerchen":
                continue
            ratios = [medians["katerchen"][s] / medians[peer][s] for s in sizes]
            lines.append(
                f"| katerchen / {peer} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " | |"
            )
    return "\n".join(lines)


# --- idle connections ----------------------------------------------------------------------------


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
        lines = data.split(b"\r\n")
        for line in lines[:-1]:
            if line[3:4] == b" ":
                return line
    # unreachable


def transaction(port: int, timeout: float) -> float:
    """Seconds for one whole SMTP transaction (connect to QUIT); raises on failure."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        _read_reply(sock)
        sock.sendall(b"EHLO source.example\r\n")
        _read_reply(sock)
        for command in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", "DATA"):
            sock.sendall(command.encode() + b"\r\n")
            code = _read_reply(sock)[:3]
            if code not in (b"250", b"354"):
                raise RuntimeError(f"{command}: {code!r}")
        sock.sendall(b"Subject: idle test\r\n\r\nhello\r\n.\r\n")
        if _read_reply(sock)[:3] != b"250":
            raise RuntimeError("message refused")
        sock.sendall(b"QUIT\r\n")
        _read_reply(sock)
    return time.perf_counter() - start


def idle(server: Server, count: int, timeout: float) -> str:
    transaction(server.port, timeout)  # warm up
    time.sleep(0.5)
    rss_before = rss_bytes(server.root_pid)
    sockets: list[socket.socket] = []
    greeted = 0
    try:
        failures = 0
        while len(sockets) < count and failures < 3:
            try:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=3)
            except OSError:
                # A full accept queue drops the SYN (retried after 1 s, then 3 s); three misses
                # in a row: the server stopped accepting (Postfix: its process limit).
                failures += 1
                continue
            failures = 0
            sockets.append(sock)
        for sock in sockets:
            try:
                sock.settimeout(1 if greeted < len(sockets) else timeout)
                _read_reply(sock)
                sock.sendall(b"EHLO idle.example\r\n")
                _read_reply(sock)
                greeted += 1
            except (OSError, ConnectionError):
                pass
        time.sleep(1.0)
        rss_held = rss_bytes(server.root_pid)
        latencies = []
        failures = 0
        for _ in range(5):
            try:
                latencies.append(transaction(server.port, timeout) * 1000)
            except (OSError, ConnectionError, RuntimeError):
                failures += 1
    finally:
        for sock in sockets:
            sock.close()
    per = (rss_held - rss_before) / max(greeted, 1) / 1024
    served = (
        f"transaction while held: median {statistics.median(latencies):.1f} ms, "
        f"max {max(latencies):.1f} ms"
        if latencies
        else f"transaction while held: not served within {timeout:.0f} s"
    )
    if failures and latencies:
        served += f" ({failures} of 5 failed)"
    return (
        f"| {server.name} | {greeted} of {count} greeted ({len(sockets)} connected) | "
        f"{rss_before / 2**20:.1f} MiB -> "
        f"{rss_held / 2**20:.1f} MiB | {per:.1f} KiB | {served} |"
    )


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--count", type=int, default=5000, help="messages per run")
    parser.add_argument("-c", "--concurrency", type=int, default=10, help="connections")
    parser.add_argument(
        "-s", "--sizes", default="1024,102400", help="message sizes in bytes, comma-separated"
    )
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds per size")
    parser.add_argument(
        "--servers",
        default="katerchen,aiosmtpd,postfix",
        help="which servers (postfix is skipped when it is not installed)",
    )
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for new/")
    parser.add_argument("--idle", type=int, metavar="N", help="hold N idle connections instead")
    args = parser.parse_args()

    names = [n.strip().lower() for n in args.servers.split(",") if n.strip()]
    unknown = set(names) - set(STARTERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    if "postfix" in names and not (POSTFIX.exists() and os.geteuid() == 0):
        print("Postfix is skipped (not installed, or not root)", file=sys.stderr)
        names.remove("postfix")
    sizes = [int(s) for s in args.sizes.split(",")]

    base = Path(tempfile.mkdtemp(prefix="katerchen-peers-"))
    os.chmod(base, 0o755)
    try:
        if args.idle:
            limit = raise_nofile(args.idle + 1000)
            print(f"open files limit: {limit}", file=sys.stderr)
            rows = []
            for name in names:
                starter = STARTERS[name]
                if name == "katerchen":

                    def starter(d: Path) -> Server:
                        return start_katerchen(d, max_connections=args.idle + 100)

                with running(name, base, starter) as server:
                    rows.append(idle(server, args.idle, timeout=10))
                    print(rows[-1], file=sys.stderr)
            print(f"\n{args.idle} idle connections (after greeting and EHLO):\n")
            print("| server | idle connections | server RSS | RSS per connection | latency |")
            print("|---|---|---|---|---|")
            print("\n".join(rows))
            return 0

        results: dict[str, dict[int, list[Result]]] = {n: {s: [] for s in sizes} for n in names}
        with contextlib.ExitStack() as stack:
            servers = {n: stack.enter_context(running(n, base)) for n in names}
            for server in servers.values():  # warm-up: caches, first Maildir, imports
                throughput(server, min(200, args.count), args.concurrency, 1024, args.timeout)
            for round_ in range(args.runs):
                for size in sizes:
                    for name, server in servers.items():
                        result = throughput(
                            server, args.count, args.concurrency, size, args.timeout
                        )
                        results[name][size].append(result)
                        print(
                            f"round {round_ + 1} {size} B {name}: {result.rate:.0f} msg/s, "
                            f"{result.cpu_ms:.2f} CPU ms/msg",
                            file=sys.stderr,
                        )
        print(
            f"\n{args.count} messages per run, {args.concurrency} connections, one connection "
            f"per message, smtp-source; median of {args.runs} interleaved runs "
            f"(the runs in parentheses); {os.cpu_count()} CPUs\n"
        )
        print(table(results, sizes, args))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
