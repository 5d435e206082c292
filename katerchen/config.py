"""Configuration: the frozen Config tree, loaded from TOML, with all validation and the defaults.

A config file is TOML with four tables, ``[server]``, ``[directories]``, ``[limits]`` and
``[delivery]``; every key is optional.  Validation is strict and happens here, once: an unknown
key, a wrong type or an impossible value raises :class:`ConfigError` naming the key, so the rest
of katerchen can trust every value it reads from a :class:`Config`.  (That ``[delivery]
postmaster`` reaches a mailbox needs the domains tree: :func:`katerchen.routing.check_postmaster`.)

Relative directories are resolved against the directory holding the config file (``base_dir``)
and stored absolute, so the server behaves the same whatever its working directory.

The embedded default (bare ``katerchen``) is TOML text in this module, :data:`DEFAULT_TOML`, and
goes through the same loader as a file does.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import sys
from pathlib import Path

import attrs

from katerchen.address import AddressError, domain_component, parse_forward_path

if sys.version_info >= (3, 11):  # noqa: UP036 - the tomli fallback pyproject.toml declares
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_TOML",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DirectoriesConfig",
    "LimitsConfig",
    "ServerConfig",
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


@attrs.frozen
class DirectoriesConfig:
    """``[directories]``: the spool trees and the domains tree, all absolute paths."""

    incoming: Path
    received: Path
    relay: Path
    domains: Path


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


@attrs.frozen
class Config:
    """The whole validated configuration.  Build it with a named constructor, not directly."""

    server: ServerConfig
    directories: DirectoriesConfig
    limits: LimitsConfig
    delivery: DeliveryConfig = attrs.field(factory=DeliveryConfig)
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
            "",
            "[directories]",
            f"incoming = {_toml_str(str(d.incoming))}",
            f"received = {_toml_str(str(d.received))}",
            f"relay = {_toml_str(str(d.relay))}",
            f"domains = {_toml_str(str(d.domains))}",
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
        ]
        return "\n".join(lines) + "\n"


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
    },
    "directories": {
        "incoming": "spool/incoming",
        "received": "spool/received",
        "relay": "spool/relay",
        "domains": "domains",
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
    },
}


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
        server=_server(tables["server"]),
        directories=_directories(tables["directories"], base_dir),
        limits=_limits(tables["limits"]),
        delivery=_delivery(tables["delivery"]),
        source=source,
    )


def _server(t: _Table) -> ServerConfig:
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
    return ServerConfig(hostname=hostname, listen=listen, shutdown_grace=grace)


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
    )


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


def _path(value: object, key: str, base_dir: Path) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"expected a directory path, got {_describe(value)}", key=key)
    if not value:
        raise ConfigError("expected a directory path, got an empty string", key=key)
    if "\0" in value:
        raise ConfigError("a path cannot contain a NUL character", key=key)
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = base_dir / path
    return Path(os.path.normpath(path))


def _listen(value: object, key: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(
            f'expected an array of "host:port" strings, got {_describe(value)}', key=key
        )
    if not value:
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
