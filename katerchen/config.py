"""Configuration: the frozen Config tree, loaded from TOML, with all validation and the defaults.

A config file is TOML with the tables ``[server]``, ``[directories]``, ``[limits]``,
``[delivery]``, ``[tls]``, ``[auth]``, ``[relay]`` and ``[dns]``; every key is optional.
Validation is strict and happens here, once: an unknown key, a wrong type or an impossible value
raises :class:`ConfigError` naming the key, so the rest of katerchen can trust every value it
reads from a :class:`Config`.  (That ``[delivery] postmaster`` reaches a mailbox needs the
domains tree: :func:`katerchen.routing.check_postmaster`.)

Relative directories are resolved against the directory holding the config file (``base_dir``)
and stored absolute, so the server behaves the same whatever its working directory.  So are the
``[tls]`` files, which are loaded once here (a certificate and key that do not make a pair are a
config error naming the key), and the ``[auth]`` users file, which may be missing.

The embedded default (bare ``katerchen``) is TOML text in this module, :data:`DEFAULT_TOML`, and
goes through the same loader as a file does.
"""

from __future__ import annotations

import contextlib
import difflib
import grp
import ipaddress
import math
import os
import pwd
import re
import socket
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path

import attrs

from katerchen.address import (
    AddressError,
    domain_component,
    mailbox_component,
    parse_forward_path,
)
from katerchen.tlsconfig import CertificateError, server_context

if sys.version_info >= (3, 11):  # noqa: UP036 - the tomli fallback pyproject.toml declares
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_TOML",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DirectoriesConfig",
    "DnsConfig",
    "LimitsConfig",
    "RelayConfig",
    "ServerConfig",
    "TlsConfig",
    "format_address",
]

#: Where bare ``katerchen`` keeps everything, relative to the working directory.
DEFAULT_DATA_DIR = "katerchen-data"

#: The embedded default: what bare ``katerchen`` runs.  Loaded by :meth:`Config.default` through
#: the same code path as a file; keys not given here take the per-key defaults below.
DEFAULT_TOML = """\
[server]
hostname = "localhost"
listen = ["127.0.0.1:2525"]
"""

BARE_NEWLINE_CHOICES = ("normalize", "reject")


class ConfigError(Exception):
    """A configuration problem: unreadable file, TOML syntax error, or a bad key.

    ``key`` names the offending key as ``"[section] name"`` (``None`` when the problem is not
    about one key, e.g. a syntax error); ``message`` says what is wrong with it.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message, key)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        if self.key is None:
            return f"config error: {self.message}"
        return f"config error: {self.key}: {self.message}"


@attrs.frozen
class ServerConfig:
    """``[server]``: the name the server gives itself and where it listens."""

    hostname: str
    listen: tuple[tuple[str, int], ...]  # (host, port); IPv6 hosts without brackets
    shutdown_grace: float  # seconds busy sessions get to finish after SIGTERM/SIGINT
    # RFC 6409 submission (STARTTLS, then AUTH, then MAIL) and RFC 8314 implicit-TLS
    # submission listeners; both need [tls].
    submission: tuple[tuple[str, int], ...] = ()
    submissions: tuple[tuple[str, int], ...] = ()
    # Written with the process id once the listeners are bound, removed at exit; None = none.
    pidfile: Path | None = None
    # Started as root, drop to this user (a name or number in the user database) once the
    # ports are bound, and to group (default: the user's own group); "" = stay as started.
    user: str = ""
    group: str = ""


@attrs.frozen
class DirectoriesConfig:
    """``[directories]``: the spool trees and the domains tree, all absolute paths."""

    incoming: Path
    received: Path
    relay: Path
    domains: Path
    # Messages put on hold by `katerchen queue hold` (hold/received/, hold/relay/): delivery and
    # relay never look here.  Same file system as received/ and relay/ (moves are renames).
    hold: Path


@attrs.frozen
class LimitsConfig:
    """``[limits]``: sizes, counts and timeouts (seconds)."""

    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    command_timeout: float
    data_timeout: float
    bare_newline: str  # "normalize" or "reject"


@attrs.frozen
class DeliveryConfig:
    """``[delivery]``: moving received mail into Maildirs, and how recipients are routed.

    The defaults here are the per-key defaults, so ``DeliveryConfig()`` is the default section.
    """

    scan_interval: float = 60.0  # seconds between rescans of received/ (besides every doorbell)
    # The address that gets postmaster@<domain> mail for a served domain with neither a postmaster
    # mailbox nor a postmaster alias; "" = none (then <domains>/<domain>/postmaster/ gets it).
    # Syntax is checked here; that it reaches a local mailbox is routing.check_postmaster's job,
    # since that needs the domains tree.
    postmaster: str = ""
    recipient_delimiter: str = "+"  # one character; alice+tag@dom reaches alice; "" = off
    retry_initial: float = 60.0  # seconds before the first retry after a temporary failure
    retry_max: float = 3600.0  # the retry delay doubles up to this many seconds
    # A test sink (katerchen.testing): when set, EVERY recipient at every domain is accepted and
    # delivered to this one local mailbox, without aliases and never relayed.  "" = off.
    sink: str = ""


@attrs.frozen
class TlsConfig:
    """``[tls]``: the server's PEM certificate chain and private key, absolute paths.  Both
    files existed and loaded as a pair when the config was read."""

    certificate: Path
    key: Path


@attrs.frozen
class AuthConfig:
    """``[auth]``: SMTP AUTH users and the policy for authenticated sessions."""

    # "address:hash" lines (katerchen.auth); absolute when loaded from TOML.
    users_file: Path = Path("users")
    allow_any_sender: bool = False  # an authenticated user may use any MAIL FROM
    max_failures: int = 5  # failed AUTH attempts per client IP within failure_window ...
    failure_window: float = 900.0  # ... seconds, after which that IP gets 421 4.7.0 for AUTH


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``[relay] smarthost_tls``: STARTTLS when offered with any certificate, or only with a
#: verified one (and never without TLS).
SMARTHOST_TLS_CHOICES = ("opportunistic", "required")


@attrs.frozen
class RelayConfig:
    """``[relay]`` and ``[relay.routes]``: who may relay, and how mail leaves for other servers.

    The defaults here are the per-key defaults, so ``RelayConfig()`` is the default section.
    Times are seconds.
    """

    # Clients that may send to domains we do not serve; empty = nobody (not even 127.0.0.1).
    trusted_networks: tuple[IPNetwork, ...] = ()
    smarthost: tuple[str, int] | None = None  # (host, port); None = DNS MX
    smarthost_user: str = ""  # with smarthost_password: AUTH PLAIN/LOGIN, only over TLS
    smarthost_password: str = attrs.field(default="", repr=False)
    smarthost_tls: str = "opportunistic"  # or "required" (a verified certificate)
    ca_file: Path | None = None  # CA bundle for verified TLS; None = the system store
    mx_port: int = 25  # the port of MX hosts (tests point it at their own listener)
    retry_initial: float = 300.0  # first retry after a temporary failure, then doubling ...
    retry_max: float = 3600.0  # ... up to this
    max_age: float = 432000.0  # give up (bounce) after this long since arrival: 5 days
    delay_warning: float = 14400.0  # one "delayed" notice at this age; 0 = never
    max_connections: int = 20  # outgoing connections at once, in all ...
    max_connections_per_destination: int = 4  # ... and per destination
    connect_timeout: float = 60.0  # TCP connect and TLS handshake, per address
    greeting_timeout: float = 300.0  # RFC 5321 4.5.3.2.1
    command_timeout: float = 300.0  # EHLO, MAIL, RCPT, ... (4.5.3.2.2, 4.5.3.2.3)
    data_start_timeout: float = 120.0  # the 354 after DATA (4.5.3.2.4)
    data_block_timeout: float = 180.0  # each block of the message written (4.5.3.2.5)
    data_end_timeout: float = 600.0  # the reply to the end of the message (4.5.3.2.6)
    # [relay.routes]: (lowercase domain or "*", (host, port)), sorted by domain.
    routes: tuple[tuple[str, tuple[str, int]], ...] = ()

    def trusts(self, ip: str) -> bool:
        """Whether a client at *ip* (as the socket reported it) is in ``trusted_networks``.

        An IPv4-mapped IPv6 address (``::ffff:192.0.2.7``, from a dual-stack socket) is the
        IPv4 client it stands for, and also matches a network written in the mapped form.
        Anything that is not an IP address (no client, a Unix socket) is never trusted.
        """
        if not self.trusted_networks:
            return False
        try:
            address = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        elif isinstance(address, ipaddress.IPv4Address):
            candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
        return any(
            candidate in network
            for network in self.trusted_networks
            for candidate in candidates
            if candidate.version == network.version
        )

    def route(self, domain: str) -> tuple[str, int] | None:
        """The ``[relay.routes]`` target for *domain*: its exact entry (case-insensitive), else
        ``"*"``, else None."""
        routes = dict(self.routes)
        return routes.get(domain.lower().rstrip(".")) or routes.get("*")


@attrs.frozen
class DnsConfig:
    """``[dns]``: which nameservers the relay asks (``"ip"``, ``"ip:port"``, ``"[v6]:port"``);
    empty = the system's (``/etc/resolv.conf``)."""

    nameservers: tuple[str, ...] = ()


@attrs.frozen
class Config:
    """The whole validated configuration.  Build it with a named constructor, not directly."""

    server: ServerConfig
    directories: DirectoriesConfig
    limits: LimitsConfig
    delivery: DeliveryConfig = attrs.field(factory=DeliveryConfig)
    tls: TlsConfig | None = None  # None: no STARTTLS, no submission listeners
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    relay: RelayConfig = attrs.field(factory=RelayConfig)
    dns: DnsConfig = attrs.field(factory=DnsConfig)
    source: Path | None = None  # the file it came from; None for the embedded default or a string

    @classmethod
    def from_toml(cls, text: str, *, base_dir: Path, source: Path | None = None) -> Config:
        """Parse and validate TOML *text*.

        Relative directories resolve against *base_dir*.  *source* is only recorded (and named
        in syntax errors).  Raises :class:`ConfigError`.
        """
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # The message ends with "(at line N, column M)", or "(at end of document)", which
            # is made to name the line as well.
            message = str(exc).replace(
                "(at end of document)", f"(at line {text.count(chr(10)) + 1}, end of document)"
            )
            where = f"{source}: " if source is not None else ""
            raise ConfigError(f"{where}invalid TOML: {message}") from None
        return _build(data, base_dir=Path(os.path.abspath(base_dir)), source=source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, base_dir: Path | None = None) -> Config:
        """Build a config in code from *data*, a mapping shaped like the TOML file::

            Config.from_mapping(
                {"server": {"listen": ["127.0.0.1:0"]}, "directories": {"domains": "domains"}},
                base_dir=tmp_path,
            )

        Validation is that of :meth:`from_toml`, key for key.  Python values that TOML would
        spell differently are taken as TOML would read them: tuples as arrays, paths
        (``os.PathLike``) as strings.  Relative paths resolve against *base_dir*, else the
        current directory.  *data* is copied, never kept.  Raises :class:`ConfigError`.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping of tables, got a {type(data).__name__}")
        base = Path.cwd() if base_dir is None else Path(base_dir)
        plain = _plain(data, "")
        assert isinstance(plain, dict)
        return _build(plain, base_dir=Path(os.path.abspath(base)), source=None)

    @classmethod
    def from_file(cls, path: Path) -> Config:
        """Read and validate the config file at *path*; relative directories resolve against
        the file's own directory.  Raises :class:`ConfigError` (also for a missing file)."""
        path = Path(os.path.abspath(path))
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
        return cls.from_toml(text, base_dir=path.parent, source=path)

    @classmethod
    def default(cls, base_dir: Path | None = None) -> Config:
        """The embedded default (:data:`DEFAULT_TOML`): listen on 127.0.0.1:2525, hostname
        ``localhost``, everything under *base_dir*, which defaults to ``./katerchen-data``.

        Serving the domain ``localhost`` with the mailbox ``postmaster`` is the caller's part:
        the CLI creates ``<domains>/localhost/postmaster/`` before it starts.
        """
        if base_dir is None:
            base_dir = Path.cwd() / DEFAULT_DATA_DIR
        return cls.from_toml(DEFAULT_TOML, base_dir=base_dir)

    def to_toml(self) -> str:
        """The effective configuration as TOML, every key, absolute paths.

        ``Config.from_toml(c.to_toml(), base_dir=anything)`` gives back ``c`` (but for
        ``source``).
        """
        source = str(self.source) if self.source is not None else "the embedded default"
        s, d, lim, dlv = self.server, self.directories, self.limits, self.delivery
        listen = ", ".join(_toml_str(format_address(addr)) for addr in s.listen)
        lines = [
            f"# katerchen effective configuration, from {source}".replace("\n", " "),
            "",
            "[server]",
            f"hostname = {_toml_str(s.hostname)}",
            f"listen = [{listen}]",
            f"shutdown_grace = {_toml_number(s.shutdown_grace)}",
            f"submission = [{_toml_addresses(s.submission)}]",
            f"submissions = [{_toml_addresses(s.submissions)}]",
            f"pidfile = {_toml_str(str(s.pidfile) if s.pidfile else '')}",
            f"user = {_toml_str(s.user)}",
            f"group = {_toml_str(s.group)}",
            "",
            "[directories]",
            f"incoming = {_toml_str(str(d.incoming))}",
            f"received = {_toml_str(str(d.received))}",
            f"relay = {_toml_str(str(d.relay))}",
            f"domains = {_toml_str(str(d.domains))}",
            f"hold = {_toml_str(str(d.hold))}",
            "",
            "[limits]",
            f"max_message_size = {lim.max_message_size}",
            f"max_recipients = {lim.max_recipients}",
            f"max_connections = {lim.max_connections}",
            f"max_connections_per_ip = {lim.max_connections_per_ip}",
            f"command_timeout = {_toml_number(lim.command_timeout)}",
            f"data_timeout = {_toml_number(lim.data_timeout)}",
            f"bare_newline = {_toml_str(lim.bare_newline)}",
            "",
            "[delivery]",
            f"scan_interval = {_toml_number(dlv.scan_interval)}",
            f"postmaster = {_toml_str(dlv.postmaster)}",
            f"recipient_delimiter = {_toml_str(dlv.recipient_delimiter)}",
            f"retry_initial = {_toml_number(dlv.retry_initial)}",
            f"retry_max = {_toml_number(dlv.retry_max)}",
            f"sink = {_toml_str(dlv.sink)}",
            "",
            "[tls]",
            f"certificate = {_toml_str(str(self.tls.certificate) if self.tls else '')}",
            f"key = {_toml_str(str(self.tls.key) if self.tls else '')}",
            "",
            "[auth]",
            f"users_file = {_toml_str(str(self.auth.users_file))}",
            f"allow_any_sender = {'true' if self.auth.allow_any_sender else 'false'}",
            f"max_failures = {self.auth.max_failures}",
            f"failure_window = {_toml_number(self.auth.failure_window)}",
            *_relay_toml(self.relay),
            "",
            "[dns]",
            f"nameservers = [{', '.join(_toml_str(n) for n in self.dns.nameservers)}]",
        ]
        return "\n".join(lines) + "\n"


def _relay_toml(r: RelayConfig) -> list[str]:
    networks = ", ".join(_toml_str(str(network)) for network in r.trusted_networks)
    lines = [
        "",
        "[relay]",
        f"trusted_networks = [{networks}]",
        f"smarthost = {_toml_str(format_address(r.smarthost) if r.smarthost else '')}",
        f"smarthost_user = {_toml_str(r.smarthost_user)}",
        f"smarthost_password = {_toml_str(r.smarthost_password)}",
        f"smarthost_tls = {_toml_str(r.smarthost_tls)}",
        f"ca_file = {_toml_str(str(r.ca_file) if r.ca_file else '')}",
        f"mx_port = {r.mx_port}",
    ]
    for name in _RELAY_SECONDS:
        lines.append(f"{name} = {_toml_number(getattr(r, name))}")
    lines += [
        f"max_connections = {r.max_connections}",
        f"max_connections_per_destination = {r.max_connections_per_destination}",
        "",
        "[relay.routes]",
    ]
    lines += [f"{_toml_str(domain)} = {_toml_str(format_address(t))}" for domain, t in r.routes]
    return lines


def _toml_addresses(addresses: tuple[tuple[str, int], ...]) -> str:
    return ", ".join(_toml_str(format_address(address)) for address in addresses)


def format_address(address: tuple[str, int]) -> str:
    """``("::", 25)`` -> ``"[::]:25"``; ``("0.0.0.0", 25)`` -> ``"0.0.0.0:25"``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- loading -------------------------------------------------------------------------------------


#: Every key with its default, in file order.  ``None`` for the hostname means socket.getfqdn(),
#: asked only when the key is absent since it may query DNS.  katerchen.toml.example mirrors this.
_DEFAULTS: dict[str, dict[str, object]] = {
    "server": {
        "hostname": None,
        "listen": ["127.0.0.1:2525"],
        "shutdown_grace": 10,
        "submission": [],
        "submissions": [],
        "pidfile": "",
        "user": "",
        "group": "",
    },
    "directories": {
        "incoming": "spool/incoming",
        "received": "spool/received",
        "relay": "spool/relay",
        "domains": "domains",
        "hold": "spool/hold",
    },
    "limits": {
        "max_message_size": 26214400,
        "max_recipients": 100,
        "max_connections": 200,
        "max_connections_per_ip": 50,
        "command_timeout": 300,
        "data_timeout": 600,
        "bare_newline": "normalize",
    },
    "delivery": {
        "scan_interval": 60,
        "postmaster": "",
        "recipient_delimiter": "+",
        "retry_initial": 60,
        "retry_max": 3600,
        "sink": "",
    },
    "tls": {
        "certificate": "",
        "key": "",
    },
    "auth": {
        "users_file": "users",
        "allow_any_sender": False,
        "max_failures": 5,
        "failure_window": 900,
    },
    "relay": {
        "trusted_networks": [],
        "smarthost": "",
        "smarthost_user": "",
        "smarthost_password": "",
        "smarthost_tls": "opportunistic",
        "ca_file": "",
        "mx_port": 25,
        "retry_initial": 300,
        "retry_max": 3600,
        "max_age": 432000,
        "delay_warning": 14400,
        "connect_timeout": 60,
        "greeting_timeout": 300,
        "command_timeout": 300,
        "data_start_timeout": 120,
        "data_block_timeout": 180,
        "data_end_timeout": 600,
        "max_connections": 20,
        "max_connections_per_destination": 4,
        "routes": {},
    },
    "dns": {
        "nameservers": [],
    },
}

#: The [relay] keys that are seconds (delay_warning may be 0), in file order.
_RELAY_SECONDS = (
    "retry_initial",
    "retry_max",
    "max_age",
    "delay_warning",
    "connect_timeout",
    "greeting_timeout",
    "command_timeout",
    "data_start_timeout",
    "data_block_timeout",
    "data_end_timeout",
)


class _Table:
    """One TOML table being read: rejects unknown keys up front, then hands out values with
    their defaults filled in."""

    def __init__(self, name: str, data: dict[str, object]) -> None:
        self.name = name
        self.data = data
        self.defaults = _DEFAULTS[name]
        for key in data:
            if key not in self.defaults:
                hint = difflib.get_close_matches(key, list(self.defaults), n=1)
                message = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                raise ConfigError(message, key=self.key(key))

    def key(self, name: str) -> str:
        return f"[{self.name}] {name}"

    def get(self, name: str) -> object:
        return self.data.get(name, self.defaults[name])


def _plain(value: object, where: str) -> object:
    """*value* (from :meth:`Config.from_mapping`) as tomllib would have given it: dicts with
    string keys, lists, strings for paths; anything else is left for validation to judge."""
    if isinstance(value, Mapping):
        plain: dict[str, object] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                at = f" in {where}" if where else ""
                raise ConfigError(f"keys must be strings, got {name!r}{at}")
            inner = f"[{name}]" if not where else f"{where[:-1]}.{name}]"
            plain[name] = _plain(item, inner)
        return plain
    if isinstance(value, list | tuple):
        return [_plain(item, where) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _build(data: dict[str, object], *, base_dir: Path, source: Path | None) -> Config:
    tables: dict[str, _Table] = {}
    for name, value in data.items():
        if name not in _DEFAULTS:
            if not isinstance(value, dict):
                names = [f"[{table}]" for table in _DEFAULTS]
                raise ConfigError(
                    f"keys belong in a {', '.join(names[:-1])} or {names[-1]} table", key=name
                )
            hint = difflib.get_close_matches(name, list(_DEFAULTS), n=1)
            raise ConfigError(
                "unknown section" + (f" (did you mean [{hint[0]}]?)" if hint else ""),
                key=f"[{name}]",
            )
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {_describe(value)}", key=f"[{name}]")
    for name in _DEFAULTS:
        value = data.get(name, {})
        assert isinstance(value, dict)
        tables[name] = _Table(name, value)
    return Config(
        server=_server(tables["server"], base_dir),
        directories=_directories(tables["directories"], base_dir),
        limits=_limits(tables["limits"]),
        delivery=_delivery(tables["delivery"]),
        tls=_tls(tables["tls"], tables["server"], base_dir),
        auth=_auth(tables["auth"], base_dir),
        relay=_relay(tables["relay"], base_dir),
        dns=_dns(tables["dns"]),
        source=source,
    )


def _server(t: _Table, base_dir: Path) -> ServerConfig:
    hostname = t.get("hostname")
    if hostname is None:
        hostname = _default_hostname()
    key = t.key("hostname")
    if not isinstance(hostname, str):
        raise ConfigError(f"expected a string, got {_describe(hostname)}", key=key)
    problem = _hostname_problem(hostname)
    if problem:
        raise ConfigError(problem, key=key)

    listen = _listen(t.get("listen"), t.key("listen"))
    grace = _seconds(t.get("shutdown_grace"), t.key("shutdown_grace"), zero_ok=True)
    submission = _listen(t.get("submission"), t.key("submission"), empty_ok=True)
    submissions = _listen(t.get("submissions"), t.key("submissions"), empty_ok=True)
    # An address in two lists could never be bound twice (port 0 is a fresh port each time).
    owner: dict[tuple[str, int], str] = {}
    lists = (("listen", listen), ("submission", submission), ("submissions", submissions))
    for name, addresses in lists:
        for address in addresses:
            if address[1] and owner.setdefault(address, name) != name:
                raise ConfigError(
                    f"{_toml_str(format_address(address))} is in {t.key(owner[address])} too",
                    key=t.key(name),
                )
    pidfile = t.get("pidfile")
    if not isinstance(pidfile, str):
        raise ConfigError(
            f'expected a file path, or "", got {_describe(pidfile)}', key=t.key("pidfile")
        )
    user = _account(t.get("user"), t.key("user"), group=False)
    group = _account(t.get("group"), t.key("group"), group=True)
    if group and not user:
        raise ConfigError(f"needs {t.key('user')}", key=t.key("group"))
    return ServerConfig(
        hostname=hostname,
        listen=listen,
        shutdown_grace=grace,
        submission=submission,
        submissions=submissions,
        pidfile=_path(pidfile, t.key("pidfile"), base_dir, what="a file path") if pidfile else None,
        user=user,
        group=group,
    )


def _account(value: object, key: str, *, group: bool) -> str:
    """``[server] user`` or ``group``: "" or the name (or number) of an existing one."""
    what = "group" if group else "user"
    if not isinstance(value, str):
        raise ConfigError(f'expected a {what} name, or "", got {_describe(value)}', key=key)
    if not value:
        return ""
    if _CONTROL_CHARS.search(value) or ":" in value:
        raise ConfigError(f"{_toml_str(value)} is not a {what} name", key=key)
    try:
        if group:
            grp.getgrnam(value)
        else:
            pwd.getpwnam(value)
    except KeyError:
        try:
            if not value.isdigit():
                raise KeyError(value) from None
            if group:
                grp.getgrgid(int(value))
            else:
                pwd.getpwuid(int(value))
        except (KeyError, OverflowError):
            raise ConfigError(f"no {what} {_toml_str(value)} on this system", key=key) from None
    return value


def _directories(t: _Table, base_dir: Path) -> DirectoriesConfig:
    names = list(_DEFAULTS["directories"])
    paths = {name: _path(t.get(name), t.key(name), base_dir) for name in names}
    # No directory may be, or lie inside, another: startup empties incoming/, so incoming ==
    # received would delete acknowledged mail, and a spool inside domains/ would look like a
    # served domain.
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pa, pb = paths[a], paths[b]
            if pa == pb:
                raise ConfigError(f"same directory as {t.key(a)} ({pa})", key=t.key(b))
            if pa in pb.parents:
                raise ConfigError(f"{pb} is inside {t.key(a)} ({pa})", key=t.key(b))
            if pb in pa.parents:
                raise ConfigError(f"{pa} is inside {t.key(b)} ({pb})", key=t.key(a))
    return DirectoriesConfig(
        incoming=paths["incoming"],
        received=paths["received"],
        relay=paths["relay"],
        domains=paths["domains"],
        hold=paths["hold"],
    )


def _limits(t: _Table) -> LimitsConfig:
    max_connections = _positive_int(t.get("max_connections"), t.key("max_connections"))
    per_ip = _positive_int(t.get("max_connections_per_ip"), t.key("max_connections_per_ip"))
    bare_newline = t.get("bare_newline")
    if bare_newline not in BARE_NEWLINE_CHOICES:
        raise ConfigError(
            'expected "normalize" or "reject", got '
            + _describe(bare_newline, string_expected=True),
            key=t.key("bare_newline"),
        )
    assert isinstance(bare_newline, str)
    return LimitsConfig(
        max_message_size=_positive_int(t.get("max_message_size"), t.key("max_message_size")),
        max_recipients=_positive_int(t.get("max_recipients"), t.key("max_recipients")),
        max_connections=max_connections,
        # A per-IP limit above the total is harmless: the total applies first.
        max_connections_per_ip=per_ip,
        command_timeout=_seconds(t.get("command_timeout"), t.key("command_timeout")),
        data_timeout=_seconds(t.get("data_timeout"), t.key("data_timeout")),
        bare_newline=bare_newline,
    )


#: Characters that may separate a sub-address: RFC 5322 atext punctuation (so that the delimiter
#: can appear in a Dot-string local part), without "/" (never in a mailbox name).
_DELIMITER_CHARS = frozenset("!#$%&'*+-=?^_`{|}~.")


def _delivery(t: _Table) -> DeliveryConfig:
    postmaster = t.get("postmaster")
    key = t.key("postmaster")
    if not isinstance(postmaster, str):
        raise ConfigError(
            f'expected an address like "admin@example.org", got {_describe(postmaster)}', key=key
        )
    if postmaster:
        problem = _postmaster_problem(postmaster)
        if problem:
            raise ConfigError(problem, key=key)

    delimiter = t.get("recipient_delimiter")
    key = t.key("recipient_delimiter")
    if not isinstance(delimiter, str):
        raise ConfigError(
            f'expected one character such as "+", or "", got {_describe(delimiter)}', key=key
        )
    if len(delimiter) > 1 or (delimiter and delimiter not in _DELIMITER_CHARS):
        choices = "".join(sorted(_DELIMITER_CHARS))
        got = _describe(delimiter, string_expected=True)
        raise ConfigError(f'expected one character of {choices} (or ""), got {got}', key=key)

    retry_initial = _seconds(t.get("retry_initial"), t.key("retry_initial"))
    retry_max = _seconds(t.get("retry_max"), t.key("retry_max"))
    if retry_max < retry_initial:
        raise ConfigError(
            f"must be at least {t.key('retry_initial')} ({_toml_number(retry_initial)}), "
            f"got {_toml_number(retry_max)}",
            key=t.key("retry_max"),
        )
    return DeliveryConfig(
        scan_interval=_seconds(t.get("scan_interval"), t.key("scan_interval")),
        postmaster=postmaster,
        recipient_delimiter=delimiter,
        retry_initial=retry_initial,
        retry_max=retry_max,
        sink=_sink(t.get("sink"), t.key("sink")),
    )


def _sink(value: object, key: str) -> str:
    """``[delivery] sink``: "" or an address whose parts can name a local mailbox."""
    example = 'expected an address like "sink@example.test", or ""'
    if not isinstance(value, str):
        raise ConfigError(f"{example}, got {_describe(value)}", key=key)
    if not value:
        return ""
    problem = _postmaster_problem(value)
    if problem is not None:
        raise ConfigError(problem.replace("admin@example.org", "sink@example.test"), key=key)
    address = parse_forward_path(f"<{value}>", utf8=True)
    if mailbox_component(address.local_part) is None:
        raise ConfigError(
            f"{_toml_str(value)}: the local part cannot name a mailbox directory", key=key
        )
    return value


def _tls(t: _Table, server: _Table, base_dir: Path) -> TlsConfig | None:
    values: dict[str, Path | None] = {}
    for name in ("certificate", "key"):
        value = t.get(name)
        if not isinstance(value, str):
            raise ConfigError(
                f'expected a PEM file path, or "", got {_describe(value)}', key=t.key(name)
            )
        values[name] = (
            _path(value, t.key(name), base_dir, what="a PEM file path") if value else None
        )
    certificate, key = values["certificate"], values["key"]
    if certificate is None or key is None:
        if certificate is not None:
            raise ConfigError(f"needed with {t.key('certificate')}", key=t.key("key"))
        if key is not None:
            raise ConfigError(f"needed with {t.key('key')}", key=t.key("certificate"))
        # Submission without TLS would send passwords in the clear.
        for name in ("submission", "submissions"):
            if server.get(name):
                raise ConfigError(
                    "needs [tls] certificate and key (AUTH is offered only over TLS)",
                    key=server.key(name),
                )
        return None
    try:
        server_context(certificate, key)
    except CertificateError as exc:
        raise ConfigError(exc.message, key=t.key(exc.which)) from None
    return TlsConfig(certificate=certificate, key=key)


def _auth(t: _Table, base_dir: Path) -> AuthConfig:
    users_file = t.get("users_file")
    key = t.key("users_file")
    if not isinstance(users_file, str):
        raise ConfigError(f"expected a file path, got {_describe(users_file)}", key=key)
    path = _path(users_file, key, base_dir, what="a file path")
    allow_any_sender = t.get("allow_any_sender")
    if not isinstance(allow_any_sender, bool):
        raise ConfigError(
            f"expected true or false, got {_describe(allow_any_sender)}",
            key=t.key("allow_any_sender"),
        )
    return AuthConfig(
        users_file=path,
        allow_any_sender=allow_any_sender,
        max_failures=_positive_int(t.get("max_failures"), t.key("max_failures")),
        failure_window=_seconds(t.get("failure_window"), t.key("failure_window")),
    )


def _relay(t: _Table, base_dir: Path) -> RelayConfig:
    networks = _networks(t.get("trusted_networks"), t.key("trusted_networks"))

    strings: dict[str, str] = {}
    for name in ("smarthost", "smarthost_user", "smarthost_password", "smarthost_tls", "ca_file"):
        value = t.get(name)
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_describe(value)}", key=t.key(name))
        if _CONTROL_CHARS.search(value):
            raise ConfigError("control characters are not allowed", key=t.key(name))
        strings[name] = value
    smarthost = None
    if strings["smarthost"]:
        smarthost = _destination(strings["smarthost"], t.key("smarthost"))
    user, password = strings["smarthost_user"], strings["smarthost_password"]
    if bool(user) != bool(password):
        given = "smarthost_user" if user else "smarthost_password"
        missing = "smarthost_password" if user else "smarthost_user"
        raise ConfigError(f"needed with {t.key(given)}", key=t.key(missing))
    if user and smarthost is None:
        raise ConfigError(f"needs {t.key('smarthost')}", key=t.key("smarthost_user"))
    tls = strings["smarthost_tls"]
    if tls not in SMARTHOST_TLS_CHOICES:
        raise ConfigError(
            f'expected "opportunistic" or "required", got {_describe(tls, string_expected=True)}',
            key=t.key("smarthost_tls"),
        )
    ca_file = None
    if strings["ca_file"]:
        ca_file = _path(strings["ca_file"], t.key("ca_file"), base_dir, what="a PEM file path")
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"cannot load {ca_file}: {reason}", key=t.key("ca_file")) from None

    seconds = {
        name: _seconds(t.get(name), t.key(name), zero_ok=name == "delay_warning")
        for name in _RELAY_SECONDS
    }
    if seconds["retry_max"] < seconds["retry_initial"]:
        raise ConfigError(
            f"must be at least {t.key('retry_initial')} ({_toml_number(seconds['retry_initial'])})"
            f", got {_toml_number(seconds['retry_max'])}",
            key=t.key("retry_max"),
        )
    mx_port = _positive_int(t.get("mx_port"), t.key("mx_port"))
    if mx_port > 65535:
        raise ConfigError(f"expected a port from 1 to 65535, got {mx_port}", key=t.key("mx_port"))
    return RelayConfig(
        trusted_networks=networks,
        smarthost=smarthost,
        smarthost_user=user,
        smarthost_password=password,
        smarthost_tls=tls,
        ca_file=ca_file,
        mx_port=mx_port,
        max_connections=_positive_int(t.get("max_connections"), t.key("max_connections")),
        max_connections_per_destination=_positive_int(
            t.get("max_connections_per_destination"), t.key("max_connections_per_destination")
        ),
        routes=_routes(t.get("routes"), t.key("routes")),
        **seconds,
    )


_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")


def _networks(value: object, key: str) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(
            f'expected an array of networks like "192.0.2.0/24", got {_describe(value)}', key=key
        )
    networks: list[IPNetwork] = []
    for item in value:
        assert isinstance(item, str)
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                f'{_toml_str(item)} is not a network like "192.0.2.0/24" or "2001:db8::/32"',
                key=key,
            ) from None
        # "192.0.2.7/24" is probably a typo for one address or a slip in the prefix: make the
        # administrator say which, rather than trusting 256 addresses by surprise.
        try:
            ipaddress.ip_network(item, strict=True)
        except ValueError:
            raise ConfigError(
                f"{_toml_str(item)} has host bits set (did you mean {_toml_str(str(network))}?)",
                key=key,
            ) from None
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def _destination(item: str, key: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or a bare host (port 25) of a server to send to."""
    text = item
    if not item.startswith("["):
        if item.count(":") > 1:
            text = f"[{item}]:25"  # a bare IPv6 address (validated below)
        elif ":" not in item:
            text = f"{item}:25"
    host, port = _parse_listen(text, key)
    if port == 0:
        raise ConfigError(f"{_toml_str(item)}: the port must be from 1 to 65535", key=key)
    return host, port


def _routes(value: object, key: str) -> tuple[tuple[str, tuple[str, int]], ...]:
    if not isinstance(value, dict):
        raise ConfigError(
            f'expected a table [relay.routes] of "domain" = "host:port", got {_describe(value)}',
            key=key,
        )
    routes: dict[str, tuple[str, int]] = {}
    for domain, target in value.items():
        entry = f"[relay.routes] {_toml_str(domain)}"
        name = domain.lower().rstrip(".")
        if name != "*" and not _is_domain_name(name):
            raise ConfigError('expected a domain name (ASCII; xn-- for IDNs) or "*"', key=entry)
        if name in routes:
            raise ConfigError("given twice (domains match in any case)", key=entry)
        if not isinstance(target, str):
            raise ConfigError(f'expected "host:port", got {_describe(target)}', key=entry)
        routes[name] = _destination(target, entry)
    return tuple(sorted(routes.items()))


def _dns(t: _Table) -> DnsConfig:
    value = t.get("nameservers")
    key = t.key("nameservers")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(
            f'expected an array of "address" or "address:port" strings, got {_describe(value)}',
            key=key,
        )
    servers: list[str] = []
    for item in value:
        assert isinstance(item, str)
        text = _nameserver(item, key)
        if text not in servers:
            servers.append(text)
    return DnsConfig(nameservers=tuple(servers))


def _nameserver(item: str, key: str) -> str:
    """``"ip"``, ``"ip:port"``, ``"[v6]:port"`` or a bare IPv6 address, normalized."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(item))
    host, port = _parse_listen(item, key)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{_toml_str(item)}: a nameserver must be an IP address", key=key
        ) from None
    if port == 0:
        raise ConfigError(f"{_toml_str(item)}: the port must be from 1 to 65535", key=key)
    return format_address((host, port))


def _postmaster_problem(value: str) -> str | None:
    """None when *value* is an address with a domain name, as the postmaster setting needs."""
    example = 'expected an address like "admin@example.org"'
    try:
        address = parse_forward_path(f"<{value}>", utf8=True)
    except AddressError as exc:
        return f"{example}, got {_toml_str(value)} ({exc})"
    if address.domain is None:
        return f"{example} (with a domain), got {_toml_str(value)}"
    if domain_component(address.domain) is None:
        return f"{example}: the domain must be a domain name, got {_toml_str(value)}"
    return None


# --- value checks --------------------------------------------------------------------------------


def _positive_int(value: object, key: str) -> int:
    # bool is a subclass of int in Python; `true` is not a count.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"expected a positive integer, got {_describe(value)}", key=key)
    return value


def _seconds(value: object, key: str, *, zero_ok: bool = False) -> float:
    what = "a number of seconds >= 0" if zero_ok else "a positive number of seconds"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"expected {what}, got {_describe(value)}", key=key)
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        raise ConfigError(f"expected {what}, got {_describe(value)}", key=key)
    return number


def _path(value: object, key: str, base_dir: Path, *, what: str = "a directory path") -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"expected {what}, got {_describe(value)}", key=key)
    if not value:
        raise ConfigError(f"expected {what}, got an empty string", key=key)
    if "\0" in value:
        raise ConfigError("a path cannot contain a NUL character", key=key)
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = base_dir / path
    return Path(os.path.normpath(path))


def _listen(value: object, key: str, *, empty_ok: bool = False) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(
            f'expected an array of "host:port" strings, got {_describe(value)}', key=key
        )
    if not value and not empty_ok:
        raise ConfigError("at least one address is needed", key=key)
    result: list[tuple[str, int]] = []
    for item in value:
        assert isinstance(item, str)
        address = _parse_listen(item, key)
        if address in result:
            raise ConfigError(f"{_toml_str(item)} is listed twice", key=key)
        result.append(address)
    return tuple(result)


def _parse_listen(item: str, key: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); host a literal or a host name."""
    if item.startswith("["):
        host, sep, port_text = item[1:].partition("]:")
        if not sep:
            raise ConfigError(f'{_toml_str(item)}: expected "[IPv6 address]:port"', key=key)
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise ConfigError(
                f"{_toml_str(item)}: {_toml_str(host)} is not an IPv6 address", key=key
            ) from None
    else:
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise ConfigError(f'{_toml_str(item)}: expected "host:port"', key=key)
        if ":" in host:
            raise ConfigError(
                f'{_toml_str(item)}: an IPv6 address goes in brackets, e.g. "[::1]:25"', key=key
            )
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if not _is_domain_name(host):
                raise ConfigError(
                    f"{_toml_str(item)}: {_toml_str(host)} is not an address or host name", key=key
                ) from None
            host = host.lower()
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ConfigError(f"{_toml_str(item)}: the port must be a number from 0 to 65535", key=key)
    return host, int(port_text)


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def _is_domain_name(name: str) -> bool:
    if not name or len(name) > 253 or not name.isascii():
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def _hostname_problem(name: str) -> str | None:
    """None when *name* may stand in the greeting: a domain name or an address literal."""
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            return f'{name!r} is not an address literal like "[192.0.2.1]" or "[IPv6:2001:db8::1]"'
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return f'an IP address must be written as an address literal, e.g. "[{name}]"'
    if not _is_domain_name(name):
        return f"{name!r} is not a valid host name (letters, digits, '-' and '.'; ASCII only)"
    return None


def _default_hostname() -> str:
    name = socket.getfqdn()
    # A machine may call itself something no SMTP peer would accept (e.g. with '_').
    return name if _hostname_problem(name) is None else "localhost"


def _describe(value: object, *, string_expected: bool = False) -> str:
    """A value as the error message shows it, in TOML's terms, with its type when that is
    likely the mistake (``"100"`` quoted where a number belongs)."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return _toml_str(value) if string_expected else f"{_toml_str(value)} (a string)"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


# --- writing -------------------------------------------------------------------------------------


def _toml_str(text: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_number(number: float) -> str:
    # 10.0 reads better as 10; both load back as the same float.
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
