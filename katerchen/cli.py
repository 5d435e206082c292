"""The command line: parse arguments, load the config, and run the server, check the config,
set a user's password or manage the queue.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), a valid config or a password set, 1 when
the server cannot start (e.g. the port is taken), 2 for usage and config errors (and any error of
``passwd``).  No traceback is shown for any of those; ``--log-level debug`` adds one to the log
for a failed start.

``serve`` takes what an init system hands over from the environment (:mod:`katerchen.daemon`):
listening sockets (``LISTEN_FDS``) and the readiness socket (``NOTIFY_SOCKET``), and removes
those variables once read.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from katerchen import __version__, auth, daemon, maillog, queuecmd, routing
from katerchen.config import DEFAULT_DATA_DIR, Config, ConfigError, format_address

__all__ = ["ENV_CONFIG", "build_parser", "main", "main_entry"]

#: The environment variable that stands in for ``--config``.
ENV_CONFIG = "KATERCHEN_CONFIG"

# What bare `katerchen` serves, on top of Config.default(): created at start when missing.
DEFAULT_DOMAIN = "localhost"
DEFAULT_MAILBOX = "postmaster"

_DESCRIPTION = f"""\
katerchen: a personal mail server. SMTP in, Maildir out.

Without a command, katerchen runs "serve".  Without --config (or {ENV_CONFIG}), serve
uses the embedded default: it listens on 127.0.0.1:2525, keeps everything under
./{DEFAULT_DATA_DIR}, and serves the domain "localhost" with the mailbox "postmaster"
(both created when missing).
"""

_EPILOG = f"""\
environment:
  {ENV_CONFIG}  config file to use when --config is not given

See katerchen.toml.example for every config key and its default."""

_QUEUE_EPILOG = f"""\
environment:
  {ENV_CONFIG}  config file to use when --config is not given

exit status: 0 done, 1 not found (no such message; no server for flush) or an
I/O error, 2 usage and config errors.

See katerchen.toml.example for every config key and its default."""

_TOP_EPILOG = f"""\
signals (serve): SIGTERM/SIGINT shut down gracefully, SIGHUP reloads the config,
SIGUSR1 retries every waiting message now; see "katerchen serve --help".

environment:
  {ENV_CONFIG}  config file to use when --config is not given

exit status:
  0  done (serve: a clean shutdown)
  1  serve: the server could not start; queue: no such message or server
  2  usage or config error

"katerchen COMMAND --help" shows a command's own options and details.
See katerchen.toml.example for every config key and its default."""

_SERVE_DESCRIPTION = """\
Run the SMTP server in the foreground, logging to stderr, one line per event.

signals:
  SIGTERM, SIGINT  stop accepting, let transactions in progress finish within
                   [server] shutdown_grace seconds, answer 421 to the rest, exit 0
  SIGHUP           reload the config file, the certificate, the domains tree, the
                   aliases and the users file; a config with an error is refused
                   (logged as reload-failed) and the old one stays in force;
                   listeners added or removed are opened or closed, open
                   connections go on
  SIGUSR1          rescan the spool and retry every deferred message now
                   (what "katerchen queue flush" sends)

logs: every line about a message carries its queue id (id=...), every line about
a connection its session id (sid=...; the "queued" line has both), so that
  grep id=QUEUE-ID      follows a message from its arrival to its delivery, relay
                        or bounce (the bounce's own id is the id plus a letter)
  grep sid=SESSION-ID   shows the whole SMTP session it came in
--log-format json writes one JSON object per line instead (ts, level, event and
the fields as keys) for log shippers.

init systems: readiness is sent as READY=1 to $NOTIFY_SOCKET (systemd
Type=notify), with RELOADING=1 during a reload and STOPPING=1 at shutdown.
Listening sockets passed by the init system (LISTEN_FDS, LISTEN_PID, from fd 3;
systemd socket units) are used instead of binding: a socket named "submission" or
"submissions" in LISTEN_FDNAMES (FileDescriptorName=) serves that port, any
other name port 25 ([server] listen); a kind of port that got a socket does not
bind its configured addresses. --pidfile (or [server] pidfile) writes the
process id once the ports are bound and removes it at exit. Started as root
with [server] user set, katerchen drops to that user (and [server] group) right
after binding, before it touches any mail. See scripts/ for a systemd service and
socket unit and an OpenRC script.
"""

_SERVE_EPILOG = f"""\
environment:
  {ENV_CONFIG}  config file to use when --config is not given
  NOTIFY_SOCKET     where to send READY=1, RELOADING=1, STOPPING=1 (systemd)
  LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES
                    listening sockets passed by the init system (socket activation)

exit status:
  0  clean shutdown after SIGTERM or SIGINT
  1  the server could not start (port taken, spool unusable, pidfile not
     writable, privileges not droppable, an unusable passed socket)
  2  usage or config error

See katerchen.toml.example for every config key and its default."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (public so that documentation tools can render it)."""

    def add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
        # On a subcommand these default to SUPPRESS, so `katerchen --config X serve` keeps X.
        default = None if top else argparse.SUPPRESS
        parser.add_argument(
            "--config",
            metavar="FILE",
            default=default,
            help=f"TOML config file (default: ${ENV_CONFIG}, else the embedded default)",
        )
        parser.add_argument(
            "--log-level",
            metavar="LEVEL",
            type=str.lower,
            choices=list(maillog.LEVELS),
            default=default,
            help=f"log from this level up: {', '.join(maillog.LEVELS)} (default: info)",
        )

    def add_serve_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
        # On the top level too: bare `katerchen` is `katerchen serve`.
        default = None if top else argparse.SUPPRESS
        parser.add_argument(
            "--log-format",
            metavar="FORMAT",
            type=str.lower,
            choices=list(maillog.FORMATS),
            default=default,
            help="serve: logfmt (key=value, the default) or json (one object per line)",
        )
        parser.add_argument(
            "--pidfile",
            metavar="FILE",
            default=default,
            help="serve: write the process id to FILE once the ports are bound, remove it at "
            "exit (default: [server] pidfile)",
        )

    parser = argparse.ArgumentParser(
        prog="katerchen",
        description=_DESCRIPTION,
        epilog=_TOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"katerchen {__version__}")
    add_common(parser, top=True)
    add_serve_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the SMTP server in the foreground until SIGTERM/SIGINT (the default)",
        description=_SERVE_DESCRIPTION + "\n" + _DESCRIPTION.partition("\n\n")[2],
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(serve, top=False)
    add_serve_options(serve, top=False)
    check = commands.add_parser(
        "check-config",
        help="validate the config and print the effective config (exit status 2 on an error)",
        description="Validate the config and print the effective config, every key with\n"
        "absolute paths, as TOML on stdout (exit status 0).  The checks are those of\n"
        "serve and of a SIGHUP reload, the certificate and the domains tree included.\n"
        "On an error, print one line naming the key on stderr and exit with status 2.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(check, top=False)
    passwd = commands.add_parser(
        "passwd",
        help="add a user for SMTP AUTH, or change their password",
        description="Add the user ADDRESS to the config's [auth] users_file, or change their\n"
        "password (the file and its directory are created when missing, mode 0600).\n\n"
        "The password is read from the terminal, twice; when standard input is not a\n"
        "terminal, its first line is the password (without the line break), e.g.\n"
        "  printf '%s\\n' \"$PASSWORD\" | katerchen passwd --config FILE alice@example.org\n"
        "Only a scrypt hash of it is stored.  The running server picks the change up at\n"
        "the next AUTH; no restart needed.  Run as root for a config with [server] user,\n"
        "the file is given to that user, who must read it.  Exit status 0, or 2 on any\n"
        "error.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(passwd, top=False)
    passwd.add_argument(
        "address", metavar="ADDRESS", help="the user: an address like alice@example.org"
    )
    queuecmd.add_parser(
        commands, add_common=functools.partial(add_common, top=False), epilog=_QUEUE_EPILOG
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line *argv* (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed already
        return exc.code if isinstance(exc.code, int) else 2
    config_file: str | None = args.config or os.environ.get(ENV_CONFIG) or None
    if args.command == "check-config":
        return _check_config(config_file)
    if args.command == "passwd":
        return _passwd(config_file, args.address)
    if args.command == "queue":
        return queuecmd.run(args, functools.partial(_load, config_file))
    return _serve(
        config_file,
        log_level=args.log_level or "info",
        log_format=args.log_format or "logfmt",
        pidfile=args.pidfile or None,
    )


def main_entry() -> None:
    """The ``katerchen`` console script."""
    sys.exit(main())


def _load(config_file: str | None) -> Config:
    if config_file is None:
        return Config.default()
    return Config.from_file(Path(config_file))


def _check_config(config_file: str | None) -> int:
    try:
        config = _load(config_file)
        # [delivery] postmaster must reach a mailbox, which only the domains tree can tell.
        routing.check_postmaster(config)
    except ConfigError as exc:
        print(f"katerchen: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(config.to_toml())
    return 0


def _passwd(config_file: str | None, address: str) -> int:
    # The argument is not echoed in errors: it might be a password typed in the wrong place.
    user = auth.canonical_address(address)
    if user is None:
        print(
            "katerchen: passwd: ADDRESS is not a valid address (expected e.g. alice@example.org)",
            file=sys.stderr,
        )
        return 2
    try:
        config = _load(config_file)
    except ConfigError as exc:
        print(f"katerchen: {exc}", file=sys.stderr)
        return 2
    try:
        password = _read_password(user)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError, EOFError) as exc:
        print(f"katerchen: passwd: {str(exc) or 'no password given'}", file=sys.stderr)
        return 2
    path = config.auth.users_file
    try:
        added = auth.set_password(path, user, password)
        _give_to_server_user(config, path)
    except OSError as exc:
        print(f"katerchen: passwd: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    done = "added the user" if added else "changed the password of"
    print(f"katerchen: {done} {user} in {path}")
    return 0


def _give_to_server_user(config: Config, path: Path) -> None:
    """Run as root for a server that drops to ``[server] user``: the users file is written
    anew (by rename), so it is root's now; give it back to the user that has to read it."""
    if not config.server.user or os.geteuid() != 0:
        return
    try:
        identity = daemon.lookup_identity(config.server.user, config.server.group)
    except LookupError:
        return  # the server will say so when it starts
    os.chown(path, identity.uid, identity.gid)


def _read_password(user: str) -> str:
    """The new password: from the terminal (asked twice), else the first line of stdin.
    Raises ValueError (the message says why; it never holds the password), OSError, EOFError."""
    stdin = sys.stdin
    if stdin is None:
        raise ValueError("no standard input to read the password from")
    if stdin.isatty():
        first = getpass.getpass(f"New password for {user}: ")
        if not first:
            raise ValueError("the password is empty")
        if getpass.getpass("Retype the new password: ") != first:
            raise ValueError("the passwords do not match; nothing changed")
        return first
    try:
        line = stdin.readline()
    except UnicodeDecodeError:
        raise ValueError("the password on standard input is not valid text (UTF-8)") from None
    # Only the line break goes: spaces may be part of the password.
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    if not line:
        raise ValueError("no password: the first line of standard input is empty")
    return line


def _serve(config_file: str | None, *, log_level: str, log_format: str, pidfile: str | None) -> int:
    maillog.setup(level=log_level, format=log_format)
    try:
        config = _load(config_file)
    except ConfigError as exc:
        print(f"katerchen: {exc}", file=sys.stderr)
        return 2

    if config_file is None:
        mailbox = config.directories.domains / DEFAULT_DOMAIN / DEFAULT_MAILBOX
        try:
            mailbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            maillog.error("cannot-start", reason=f"cannot create {mailbox}: {exc.strerror}")
            return 1
    try:
        routing.check_postmaster(config)
    except ConfigError as exc:
        print(f"katerchen: {exc}", file=sys.stderr)
        return 2
    _log_summary(config)
    if config.delivery.sink:
        # Meant for test suites; on a reachable server it takes mail for anybody.
        maillog.warning(
            "sink-mode",
            sink=config.delivery.sink,
            note="[delivery] sink is set: every recipient at every domain is accepted",
        )

    # What the init system passed: taken (and removed from the environment) at once.
    try:
        sockets = daemon.listen_fds()
    except ValueError as exc:
        maillog.error("cannot-start", reason=str(exc))
        return 1
    try:
        notifier = daemon.Notifier.from_environment()
    except ValueError as exc:
        maillog.warning("notify-unsupported", error=str(exc), note="no readiness notification")
        notifier = None

    # Imported here so that check-config does not pay for the server's imports.
    from katerchen import app

    run = functools.partial(
        app.run,
        config,
        handle_signals=True,
        sockets=sockets,
        notify=notifier,
        pidfile=Path(os.path.abspath(pidfile)) if pidfile else None,
    )
    try:
        trio.run(run)
    except BaseException as exc:
        leaves = list(_leaves(exc))
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            # A SIGINT before the server took over signal handling.
            maillog.event("stopped", reason="interrupted")
            return 130
        if not all(isinstance(leaf, OSError) for leaf in leaves):
            raise  # a bug: the traceback is the useful output
        # Cannot bind (port taken, no permission), cannot create the spool directories, ...
        maillog.logger.debug("start failed", exc_info=exc)
        maillog.error(
            "cannot-start",
            reason=str(leaves[0]),
            listen=",".join(format_address(a) for a in config.server.listen),
        )
        return 1
    return 0  # app.run has logged "stopped"


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (possibly nested) exception groups; *exc* itself if not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _log_summary(config: Config) -> None:
    """The first log lines: what runs, from which config, where it listens and keeps data."""
    if config.source is None:
        maillog.event(
            "starting",
            version=__version__,
            config="embedded-default",
            note=f"no --config and no {ENV_CONFIG}: using the embedded default",
        )
    else:
        maillog.event("starting", version=__version__, config=config.source)
    server, dirs = config.server, config.directories
    fields: dict[str, object] = {
        "hostname": server.hostname,
        "listen": ",".join(format_address(a) for a in server.listen),
    }
    if config.source is None:
        fields["data"] = dirs.domains.parent
    maillog.event("config", **fields)
    maillog.event(
        "directories",
        incoming=dirs.incoming,
        received=dirs.received,
        relay=dirs.relay,
        domains=dirs.domains,
    )
    try:
        domains = _subdirectories(dirs.domains)
    except OSError as exc:
        maillog.warning(
            "no-domains",
            domains=dirs.domains,
            reason=f"{exc.strerror}: every recipient will be refused",
        )
        return
    if not domains:
        maillog.warning(
            "no-domains", domains=dirs.domains, reason="empty: every recipient will be refused"
        )
    for domain in domains:
        try:
            mailboxes = _subdirectories(dirs.domains / domain)
        except OSError:
            mailboxes = []
        shown = mailboxes[:10]
        if len(mailboxes) > len(shown):
            shown.append(f"+{len(mailboxes) - len(shown)}-more")
        maillog.event("domain", name=domain, mailboxes=",".join(shown) or "postmaster-only")


def _subdirectories(path: Path) -> list[str]:
    """Names of the non-hidden subdirectories of *path*, sorted.  Raises OSError."""
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
