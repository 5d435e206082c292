"""Tests for katerchen.config: defaults, validation naming the key, paths, round trip."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import attrs
import pytest

from katerchen import cli, maillog, routing
from katerchen import config as config_module
from katerchen.config import (
    DEFAULT_DATA_DIR,
    Config,
    ConfigError,
    DeliveryConfig,
    DirectoriesConfig,
    DnsConfig,
    LimitsConfig,
    RelayConfig,
    format_address,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "katerchen.toml.example"


def load(text: str, base_dir: Path = Path("/srv/k")) -> Config:
    return Config.from_toml(text, base_dir=base_dir)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "mx.example.org")
    config = load("")
    assert config.server.hostname == "mx.example.org"
    assert config.server.listen == (("127.0.0.1", 2525),)
    assert config.server.shutdown_grace == 10
    assert config.directories == DirectoriesConfig(
        incoming=Path("/srv/k/spool/incoming"),
        received=Path("/srv/k/spool/received"),
        relay=Path("/srv/k/spool/relay"),
        domains=Path("/srv/k/domains"),
        hold=Path("/srv/k/spool/hold"),
    )
    assert config.limits == LimitsConfig(
        max_message_size=26214400,
        max_recipients=100,
        max_connections=200,
        max_connections_per_ip=50,
        command_timeout=300,
        data_timeout=600,
        bare_newline="normalize",
    )
    assert config.delivery == DeliveryConfig(
        scan_interval=60,
        postmaster="",
        recipient_delimiter="+",
        retry_initial=60,
        retry_max=3600,
    )
    # The class's own defaults are the same.
    assert config.delivery == DeliveryConfig()
    assert config.source is None


def test_default_hostname_falls_back_when_the_machine_name_is_unusable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "my_laptop")
    assert load("").server.hostname == "localhost"


def test_hostname_is_not_looked_up_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> str:
        raise AssertionError("getfqdn called")

    monkeypatch.setattr(socket, "getfqdn", fail)
    assert load('[server]\nhostname = "mx.example.org"').server.hostname == "mx.example.org"


def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.default()
    data = tmp_path / DEFAULT_DATA_DIR
    assert config.server.hostname == "localhost"
    assert config.server.listen == (("127.0.0.1", 2525),)
    assert config.directories.incoming == data / "spool" / "incoming"
    assert config.directories.domains == data / "domains"
    assert config.source is None
    # An explicit base_dir is the data directory itself.
    assert Config.default(tmp_path / "x").directories.domains == tmp_path / "x" / "domains"


def test_full_config() -> None:
    config = load(
        """
        [server]
        hostname = "mx.example.org"
        listen = ["0.0.0.0:25", "[::]:25", "[::1]:587", "localhost:2525"]
        shutdown_grace = 2.5

        [directories]
        incoming = "/var/spool/katerchen/incoming"
        received = "/var/spool/katerchen/received"
        relay = "/var/spool/katerchen/relay"
        domains = "/var/mail/domains"

        [limits]
        max_message_size = 1000
        max_recipients = 5
        max_connections = 10
        max_connections_per_ip = 20
        command_timeout = 30
        data_timeout = 0.5
        bare_newline = "reject"

        [delivery]
        scan_interval = 0.5
        postmaster = "Admin+pm@Example.ORG"
        recipient_delimiter = "-"
        retry_initial = 1
        retry_max = 1
        """
    )
    assert config.delivery == DeliveryConfig(
        scan_interval=0.5,
        postmaster="Admin+pm@Example.ORG",
        recipient_delimiter="-",
        retry_initial=1,
        retry_max=1,
    )
    assert config.server.listen == (
        ("0.0.0.0", 25),
        ("::", 25),
        ("::1", 587),
        ("localhost", 2525),
    )
    assert config.server.shutdown_grace == 2.5
    assert config.directories.domains == Path("/var/mail/domains")
    # A per-IP limit above the total is allowed (the total applies first).
    assert config.limits.max_connections_per_ip == 20
    assert config.limits.data_timeout == 0.5
    assert config.limits.bare_newline == "reject"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('listen = ["[::]:25"]', ("::", 25)),
        ('listen = ["[0:0::1]:25"]', ("::1", 25)),
        ('listen = ["127.0.0.1:0"]', ("127.0.0.1", 0)),
        ('listen = ["0.0.0.0:65535"]', ("0.0.0.0", 65535)),
        ('listen = ["Mail.Example.ORG:25"]', ("mail.example.org", 25)),
    ],
)
def test_listen_forms(text: str, expected: tuple[str, int]) -> None:
    assert load(f"[server]\n{text}").server.listen == (expected,)


def test_format_address() -> None:
    assert format_address(("::", 25)) == "[::]:25"
    assert format_address(("0.0.0.0", 25)) == "0.0.0.0:25"


@pytest.mark.parametrize(
    "hostname", ["mx.example.org", "localhost", "a-b.c0", "[192.0.2.1]", "[IPv6:2001:db8::1]"]
)
def test_good_hostnames(hostname: str) -> None:
    assert load(f'[server]\nhostname = "{hostname}"').server.hostname == hostname


# (TOML, the key the error must name, a fragment of its message)
BAD = [
    # [server]
    ("[server]\nhostname = 3", "[server] hostname", "expected a string"),
    ('[server]\nhostname = ""', "[server] hostname", "not a valid host name"),
    ('[server]\nhostname = "mx_1.example.org"', "[server] hostname", "not a valid host name"),
    ('[server]\nhostname = "-mx.example.org"', "[server] hostname", "not a valid host name"),
    ('[server]\nhostname = "mx..example.org"', "[server] hostname", "not a valid host name"),
    ('[server]\nhostname = "mx.example.org."', "[server] hostname", "not a valid host name"),
    ('[server]\nhostname = "mx example"', "[server] hostname", "not a valid host name"),
    ('[server]\nhostname = "m\u00fcller.de"', "[server] hostname", "ASCII only"),
    ('[server]\nhostname = "192.0.2.1"', "[server] hostname", "address literal"),
    ('[server]\nhostname = "[192.0.2.300]"', "[server] hostname", "address literal"),
    ('[server]\nhostname = "[IPv6:::g]"', "[server] hostname", "address literal"),
    ('[server]\nlisten = "0.0.0.0:25"', "[server] listen", "expected an array"),
    ("[server]\nlisten = [25]", "[server] listen", "expected an array"),
    ("[server]\nlisten = []", "[server] listen", "at least one"),
    ('[server]\nlisten = ["0.0.0.0"]', "[server] listen", '"host:port"'),
    ('[server]\nlisten = [":25"]', "[server] listen", '"host:port"'),
    ('[server]\nlisten = ["0.0.0.0:"]', "[server] listen", "port"),
    ('[server]\nlisten = ["0.0.0.0:65536"]', "[server] listen", "port"),
    ('[server]\nlisten = ["0.0.0.0:-1"]', "[server] listen", "port"),
    ('[server]\nlisten = ["0.0.0.0:2x"]', "[server] listen", "port"),
    ('[server]\nlisten = ["::1:25"]', "[server] listen", "brackets"),
    ('[server]\nlisten = ["[::1]25"]', "[server] listen", "[IPv6 address]:port"),
    ('[server]\nlisten = ["[192.0.2.1]:25"]', "[server] listen", "not an IPv6 address"),
    ('[server]\nlisten = ["bad_host:25"]', "[server] listen", "not an address or host name"),
    ('[server]\nlisten = ["1.2.3.4:25", "1.2.3.4:25"]', "[server] listen", "twice"),
    ('[server]\nlisten = ["[::]:25", "[0::0]:25"]', "[server] listen", "twice"),
    ("[server]\nshutdown_grace = -1", "[server] shutdown_grace", ">= 0"),
    ("[server]\nshutdown_grace = true", "[server] shutdown_grace", "boolean"),
    ('[server]\nshutdown_grace = "10"', "[server] shutdown_grace", "string"),
    ("[server]\nshutdown_grace = inf", "[server] shutdown_grace", "inf"),
    ("[server]\npidfile = 1", "[server] pidfile", "expected a file path"),
    ('[server]\npidfile = "a\\u0000b"', "[server] pidfile", "NUL"),
    ("[server]\nuser = 0", "[server] user", "expected a user name"),
    ('[server]\nuser = "no-such-user-katerchen"', "[server] user", "no user"),
    ('[server]\nuser = "99999999999999999999"', "[server] user", "no user"),
    ('[server]\nuser = "a:b"', "[server] user", "not a user name"),
    ('[server]\ngroup = "root"', "[server] group", "needs [server] user"),
    ('[server]\nuser = "root"\ngroup = "no-such-group-katerchen"', "[server] group", "no group"),
    ('[server]\nuser = "root"\ngroup = []', "[server] group", "expected a group name"),
    ('[server]\nsubmission = "0.0.0.0:587"', "[server] submission", "expected an array"),
    ('[server]\nsubmission = ["0.0.0.0"]', "[server] submission", '"host:port"'),
    ('[server]\nsubmission = ["0.0.0.0:587"]', "[server] submission", "needs [tls]"),
    ('[server]\nsubmissions = ["[::]:465"]', "[server] submissions", "needs [tls]"),
    ("[server]\nsubmissions = [465]", "[server] submissions", "expected an array"),
    (
        '[server]\nlisten = ["0.0.0.0:25"]\nsubmission = ["0.0.0.0:25"]',
        "[server] submission",
        '"0.0.0.0:25" is in [server] listen too',
    ),
    (
        '[server]\nsubmission = ["[::]:587"]\nsubmissions = ["[::]:587"]',
        "[server] submissions",
        "is in [server] submission too",
    ),
    # [directories]
    ("[directories]\nincoming = 1", "[directories] incoming", "directory path"),
    ('[directories]\nreceived = ""', "[directories] received", "empty"),
    ('[directories]\nrelay = ["a"]', "[directories] relay", "array"),
    ('[directories]\ndomains = "a\\u0000b"', "[directories] domains", "NUL"),
    ('[directories]\nreceived = "spool/incoming"', "[directories] received", "same directory"),
    ('[directories]\nincoming = "spool/received/tmp"', "[directories] incoming", "inside"),
    ('[directories]\nrelay = "domains/relay"', "[directories] relay", "inside"),
    ('[directories]\ndomains = "spool"', "[directories] incoming", "inside"),
    ("[directories]\nhold = 1", "[directories] hold", "directory path"),
    ('[directories]\nhold = "spool/relay"', "[directories] hold", "same directory"),
    ('[directories]\nhold = "spool/received/hold"', "[directories] hold", "inside"),
    # [limits]
    ("[limits]\nmax_recipients = -3", "[limits] max_recipients", "positive integer, got -3"),
    ("[limits]\nmax_recipients = 0", "[limits] max_recipients", "positive integer"),
    ("[limits]\nmax_recipients = true", "[limits] max_recipients", "got true (a boolean)"),
    ('[limits]\nmax_recipients = "100"', "[limits] max_recipients", '"100" (a string)'),
    ("[limits]\nmax_recipients = 1.5", "[limits] max_recipients", "1.5"),
    ("[limits]\nmax_message_size = 0", "[limits] max_message_size", "positive integer"),
    ("[limits]\nmax_message_size = false", "[limits] max_message_size", "boolean"),
    ("[limits]\nmax_connections = -1", "[limits] max_connections", "positive integer"),
    ("[limits]\nmax_connections_per_ip = 0", "[limits] max_connections_per_ip", "positive"),
    ("[limits]\ncommand_timeout = 0", "[limits] command_timeout", "positive number"),
    ("[limits]\ncommand_timeout = -5", "[limits] command_timeout", "positive number"),
    ("[limits]\ncommand_timeout = nan", "[limits] command_timeout", "nan"),
    ("[limits]\ndata_timeout = 0.0", "[limits] data_timeout", "positive number"),
    ("[limits]\ndata_timeout = [1]", "[limits] data_timeout", "array"),
    ('[limits]\nbare_newline = "strip"', "[limits] bare_newline", '"normalize" or "reject"'),
    ("[limits]\nbare_newline = 1", "[limits] bare_newline", '"normalize" or "reject"'),
    # [delivery]
    ("[delivery]\nscan_interval = 0", "[delivery] scan_interval", "positive number"),
    ('[delivery]\nscan_interval = "60"', "[delivery] scan_interval", "string"),
    ("[delivery]\nretry_initial = -1", "[delivery] retry_initial", "positive number"),
    ("[delivery]\nretry_initial = inf", "[delivery] retry_initial", "inf"),
    ("[delivery]\nretry_max = 0", "[delivery] retry_max", "positive number"),
    (
        "[delivery]\nretry_max = 59",
        "[delivery] retry_max",
        "at least [delivery] retry_initial (60)",
    ),
    (
        "[delivery]\nretry_initial = 10\nretry_max = 2.5",
        "[delivery] retry_max",
        "at least [delivery] retry_initial (10), got 2.5",
    ),
    ("[delivery]\npostmaster = 1", "[delivery] postmaster", "an address like"),
    ("[delivery]\nsink = true", "[delivery] sink", "an address like"),
    ('[delivery]\nsink = "postmaster"', "[delivery] sink", "with a domain"),
    ('[delivery]\nsink = "sink@[127.0.0.1]"', "[delivery] sink", "domain name"),
    ('[delivery]\nsink = "a b@example.test"', "[delivery] sink", "an address like"),
    ('[delivery]\nsink = "\\".x\\"@example.test"', "[delivery] sink", "mailbox directory"),
    ("[delivery]\npostmaster = ['a@b.c']", "[delivery] postmaster", "array"),
    ('[delivery]\npostmaster = "admin"', "[delivery] postmaster", "an address like"),
    ('[delivery]\npostmaster = "postmaster"', "[delivery] postmaster", "with a domain"),
    ('[delivery]\npostmaster = "<admin@example.org>"', "[delivery] postmaster", "address like"),
    ('[delivery]\npostmaster = "admin@[192.0.2.1]"', "[delivery] postmaster", "domain name"),
    ('[delivery]\npostmaster = " admin@example.org"', "[delivery] postmaster", "address like"),
    ('[delivery]\npostmaster = "a@b@example.org"', "[delivery] postmaster", "address like"),
    ('[delivery]\npostmaster = "a@example.org."', "[delivery] postmaster", "address like"),
    ("[delivery]\nrecipient_delimiter = 1", "[delivery] recipient_delimiter", "one character"),
    ('[delivery]\nrecipient_delimiter = "++"', "[delivery] recipient_delimiter", '"++"'),
    ('[delivery]\nrecipient_delimiter = "a"', "[delivery] recipient_delimiter", "one character"),
    ('[delivery]\nrecipient_delimiter = "/"', "[delivery] recipient_delimiter", "one character"),
    ('[delivery]\nrecipient_delimiter = "@"', "[delivery] recipient_delimiter", "one character"),
    ('[delivery]\nrecipient_delimiter = " "', "[delivery] recipient_delimiter", "one character"),
    ("[delivery]\nretries = 3", "[delivery] retries", "unknown key"),
    ("[delivery]\nscan_intervall = 3", "[delivery] scan_intervall", "did you mean"),
    # [tls] (files that do not load: tests/test_tls_config.py)
    ("[tls]\ncertificate = 1", "[tls] certificate", "PEM file path"),
    ('[tls]\ncertificate = "/nonexistent/cert.pem"', "[tls] key", "needed with"),
    ('[tls]\nkey = "/nonexistent/key.pem"', "[tls] certificate", "needed with"),
    ("[tls]\nkey = false", "[tls] key", "boolean"),
    (
        '[tls]\ncertificate = "/nonexistent/c.pem"\nkey = "/nonexistent/k.pem"',
        "[tls] certificate",
        "does not exist",
    ),
    # [auth]
    ("[auth]\nusers_file = 1", "[auth] users_file", "file path"),
    ('[auth]\nusers_file = ""', "[auth] users_file", "empty"),
    ('[auth]\nallow_any_sender = "yes"', "[auth] allow_any_sender", "true or false"),
    ("[auth]\nmax_failures = 0", "[auth] max_failures", "positive integer"),
    ("[auth]\nfailure_window = 0", "[auth] failure_window", "positive number"),
    ("[auth]\nfailure_window = true", "[auth] failure_window", "boolean"),
    # [relay], [relay.routes]
    ('[relay]\ntrusted_networks = "10.0.0.0/8"', "[relay] trusted_networks", "expected an array"),
    ('[relay]\ntrusted_networks = ["10.0.0.0/33"]', "[relay] trusted_networks", "not a network"),
    ('[relay]\ntrusted_networks = ["localhost"]', "[relay] trusted_networks", "not a network"),
    (
        '[relay]\ntrusted_networks = ["192.0.2.7/24"]',
        "[relay] trusted_networks",
        'host bits set (did you mean "192.0.2.0/24"?)',
    ),
    ("[relay]\nsmarthost = 25", "[relay] smarthost", "expected a string"),
    ('[relay]\nsmarthost = "bad_host:25"', "[relay] smarthost", "not an address or host name"),
    ('[relay]\nsmarthost = "mail.example.net:0"', "[relay] smarthost", "port"),
    ('[relay]\nsmarthost = "mail.example.net:x"', "[relay] smarthost", "port"),
    ('[relay]\nsmarthost_user = "u"', "[relay] smarthost_password", "needed with"),
    (
        '[relay]\nsmarthost = "mail.example.net"\nsmarthost_password = "p"',
        "[relay] smarthost_user",
        "needed with [relay] smarthost_password",
    ),
    ('[relay]\nsmarthost_user = "u"\nsmarthost_password = "p"', "[relay] smarthost_user", "needs"),
    ('[relay]\nsmarthost_password = "a\\nb"', "[relay] smarthost_password", "control"),
    ('[relay]\nsmarthost_tls = "verify"', "[relay] smarthost_tls", '"opportunistic" or "required"'),
    ("[relay]\nca_file = 1", "[relay] ca_file", "expected a string"),
    ('[relay]\nca_file = "/nonexistent/ca.pem"', "[relay] ca_file", "cannot load"),
    ("[relay]\nmx_port = 0", "[relay] mx_port", "positive integer"),
    ("[relay]\nmx_port = 65536", "[relay] mx_port", "1 to 65535"),
    ("[relay]\nretry_initial = 0", "[relay] retry_initial", "positive number"),
    ("[relay]\nretry_max = 299", "[relay] retry_max", "at least [relay] retry_initial (300)"),
    ("[relay]\nmax_age = -1", "[relay] max_age", "positive number"),
    ("[relay]\ndelay_warning = -1", "[relay] delay_warning", ">= 0"),
    ("[relay]\nmax_connections = 0", "[relay] max_connections", "positive integer"),
    (
        "[relay]\nmax_connections_per_destination = 1.5",
        "[relay] max_connections_per_destination",
        "positive integer",
    ),
    ("[relay]\nconnect_timeout = 0", "[relay] connect_timeout", "positive number"),
    ('[relay]\ngreeting_timeout = "5"', "[relay] greeting_timeout", "string"),
    ("[relay]\ncommand_timeout = inf", "[relay] command_timeout", "inf"),
    ("[relay]\ndata_start_timeout = 0", "[relay] data_start_timeout", "positive number"),
    ("[relay]\ndata_block_timeout = false", "[relay] data_block_timeout", "boolean"),
    ("[relay]\ndata_end_timeout = -1", "[relay] data_end_timeout", "positive number"),
    ("[relay]\nroutes = 1", "[relay] routes", "expected a table [relay.routes]"),
    ('[relay.routes]\n"exa_mple.net" = "h:25"', '[relay.routes] "exa_mple.net"', "domain name"),
    ('[relay.routes]\n"example.net" = 25', '[relay.routes] "example.net"', '"host:port"'),
    ('[relay.routes]\n"*" = "h:0"', '[relay.routes] "*"', "port"),
    (
        '[relay.routes]\n"a.example" = "h"\n"A.example" = "h"',
        '[relay.routes] "A.example"',
        "given twice",
    ),
    ("[relay]\ntrusted = []", "[relay] trusted", "unknown key"),
    # [dns]
    ('[dns]\nnameservers = "127.0.0.1"', "[dns] nameservers", "expected an array"),
    ('[dns]\nnameservers = ["ns.example.net"]', "[dns] nameservers", '"host:port"'),
    ('[dns]\nnameservers = ["ns.example.net:53"]', "[dns] nameservers", "IP address"),
    ('[dns]\nnameservers = ["127.0.0.1:0"]', "[dns] nameservers", "port"),
    # structure
    ("[server]\nhostnam = 'x'", "[server] hostnam", "did you mean 'hostname'"),
    ("[limits]\nmax_size = 1", "[limits] max_size", "unknown key"),
    ("[limit]\nmax_recipients = 1", "[limit]", "did you mean [limits]"),
    ("[tsl]\ncertificate = 'x'", "[tsl]", "did you mean [tls]"),
    ("[tls]\ncert = 'x'", "[tls] cert", "unknown key"),
    ("[dkim]\nkey = 'x'", "[dkim]", "unknown section"),
    ("hostname = 'x'", "hostname", "keys belong in a [server], [directories], [limits]"),
    ("[deliver]\nscan_interval = 1", "[deliver]", "did you mean [delivery]"),
    ("server = 1", "[server]", "expected a table"),
    ("[server.extra]\nx = 1", "[server] extra", "unknown key"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), BAD)
def test_bad_values_name_the_key(text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.key == key
    assert fragment in info.value.message
    assert str(info.value) == f"config error: {key}: {info.value.message}"
    assert "\n" not in str(info.value)


def test_every_key_has_a_validation_case() -> None:
    # Every key of the example file is exercised by BAD (so a new key needs a test).
    keys = {key for _, key, _ in BAD}
    for section, values in config_module._DEFAULTS.items():
        for name in values:
            assert f"[{section}] {name}" in keys


def test_error_message_format() -> None:
    with pytest.raises(ConfigError) as info:
        load("[limits]\nmax_recipients = -3")
    assert str(info.value) == (
        "config error: [limits] max_recipients: expected a positive integer, got -3"
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[server\nhostname = 'x'", 1),
        ("[server]\nhostname = 'x'\nlisten = [\n", 4),
        ("[server]\nhostname = = 'x'", 2),
        ("[server]\nhostname = 'a'\nhostname = 'b'", 3),
    ],
)
def test_toml_syntax_errors_give_the_line(text: str, line: int) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.key is None
    assert "invalid TOML" in str(info.value)
    assert f"line {line}" in str(info.value)


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (etc / "k.toml").write_text(
        '[directories]\nincoming = "../var/in"\nreceived = "r"\nrelay = "./a/../relay"\n'
        f'domains = "{tmp_path / "mail"}"\n'
    )
    # A relative path to the file itself, too.
    config = Config.from_file(Path("../etc/k.toml"))
    assert config.source == etc / "k.toml"
    assert config.directories.incoming == tmp_path / "var" / "in"
    assert config.directories.received == etc / "r"
    assert config.directories.relay == etc / "relay"
    assert config.directories.domains == tmp_path / "mail"
    for path in attrs.astuple(config.directories):
        assert path.is_absolute()


def test_home_directory_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load('[directories]\ndomains = "~/mail"')
    assert config.directories.domains == tmp_path / "mail"


def test_relative_base_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.from_toml("", base_dir=Path("data"))
    assert config.directories.domains == tmp_path / "data" / "domains"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_file(tmp_path / "nope.toml")
    assert "does not exist" in str(info.value)
    assert str(tmp_path / "nope.toml") in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        Config.from_file(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text("")
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_file(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_bytes(b'[server]\nhostname = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        Config.from_file(path)


def test_syntax_error_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text("[server]\nlisten = [\n")
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        '[server]\nhostname = "[IPv6:2001:db8::1]"\nlisten = ["[::]:25", "0.0.0.0:25"]\n'
        "shutdown_grace = 0.25\n[limits]\ndata_timeout = 1e9\nbare_newline = 'reject'",
        '[delivery]\nscan_interval = 0.001\npostmaster = "\\"a b\\\\\\"c\\"@example.org"\n'
        "recipient_delimiter = ''\nretry_initial = 1.5\nretry_max = 1e6",
        "[delivery]\npostmaster = 'j\u00fcrgen@b\u00fccher.example'\nrecipient_delimiter = '='",
        '[directories]\ndomains = "/tmp/we\\"ird\\\\dir \u00e9\\t"',
    ],
)
def test_to_toml_round_trip(text: str) -> None:
    config = load(text)
    again = Config.from_toml(config.to_toml(), base_dir=Path("/elsewhere"))
    assert again == config
    # And the output is stable.
    assert again.to_toml() == config.to_toml()


def test_to_toml_round_trip_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text('[server]\nhostname = "mx.example.org"\n')
    config = Config.from_file(path)
    assert str(path) in config.to_toml()
    again = Config.from_toml(config.to_toml(), base_dir=Path("/elsewhere"), source=path)
    assert again == config


def test_embedded_default_round_trip(tmp_path: Path) -> None:
    config = Config.default(tmp_path)
    assert Config.from_toml(config.to_toml(), base_dir=Path("/x")) == config


def test_example_file_loads_and_matches_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "mx.example.org")
    example = Config.from_file(EXAMPLE)
    defaults = Config.from_toml("", base_dir=EXAMPLE.parent)
    # The example shows every default; the production listen addresses are only a comment.
    assert attrs.evolve(example, source=None) == defaults


def test_example_file_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    for section, values in config_module._DEFAULTS.items():
        assert f"[{section}]" in text
        for name in values:
            assert f"\n{name} = " in text or f"\n#{name} = " in text, name


def test_example_postmaster_comment_is_valid() -> None:
    text = EXAMPLE.read_text()
    line = next(line for line in text.splitlines() if line.startswith("#postmaster = "))
    assert load(f"[delivery]\n{line[1:]}").delivery.postmaster == "you@example.org"


@pytest.mark.parametrize("delimiter", ["", "+", "-", "=", "_", ".", "~", "#", "%"])
def test_recipient_delimiters(delimiter: str) -> None:
    config = load(f"[delivery]\nrecipient_delimiter = '{delimiter}'")
    assert config.delivery.recipient_delimiter == delimiter


def test_example_production_listen_comment_is_valid() -> None:
    text = EXAMPLE.read_text()
    line = next(line for line in text.splitlines() if line.startswith("#listen = "))
    config = load(f"[server]\n{line[1:]}")
    assert config.server.listen == (("0.0.0.0", 25), ("::", 25))


def test_config_is_frozen() -> None:
    config = load("")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.limits.max_recipients = 5  # type: ignore[misc]


# --- [delivery] postmaster must reach a mailbox (routing.check_postmaster, and the CLI) -----------


def delivery_config(tmp_path: Path, postmaster: str, extra: str = "") -> Config:
    (tmp_path / "domains" / "example.org" / "alice").mkdir(parents=True, exist_ok=True)
    (tmp_path / "domains" / "other.org").mkdir(exist_ok=True)
    text = f'[server]\nhostname = "mx.example.org"\n[delivery]\npostmaster = "{postmaster}"\n'
    return Config.from_toml(text + extra, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("postmaster", "aliases"),
    [
        ("alice@example.org", ""),
        ("ALICE@Example.Org", ""),
        ("alice+admin@example.org", ""),  # sub-addressing applies
        ("admins@example.org", "admins: alice, someone@elsewhere.example\n"),
        ("root@example.org", "root: postmaster\npostmaster: alice\n"),
        # A postmaster without mailbox or alias is <domain>/postmaster/, which delivery creates.
        ("postmaster@example.org", ""),
        ("postmaster@other.org", ""),
    ],
)
def test_check_postmaster_accepts(tmp_path: Path, postmaster: str, aliases: str) -> None:
    config = delivery_config(tmp_path, postmaster)
    (tmp_path / "domains" / "example.org" / "aliases").write_text(aliases)
    routing.check_postmaster(config)


@pytest.mark.parametrize(
    ("postmaster", "aliases", "fragment"),
    [
        ("bob@example.org", "", "no mailbox or alias 'bob' in "),
        ("alice@elsewhere.example", "", "elsewhere.example is not a served domain"),
        ("loop@example.org", "loop: loop2\nloop2: loop\n", "alias loop"),
        ("fwd@example.org", "fwd: me@elsewhere.example\n", "only forwards to other servers"),
        ("dead@example.org", "dead: nobody\n", "reaches no mailbox (nobody: mailbox unavailable)"),
        # The catch-all is for mail from outside: it does not make up a postmaster.
        ("bob@example.org", "*: alice\n", "no mailbox or alias 'bob'"),
    ],
)
def test_check_postmaster_refuses(
    tmp_path: Path, postmaster: str, aliases: str, fragment: str
) -> None:
    config = delivery_config(tmp_path, postmaster)
    (tmp_path / "domains" / "example.org" / "aliases").write_text(aliases)
    with pytest.raises(ConfigError) as info:
        routing.check_postmaster(config)
    assert info.value.key == "[delivery] postmaster"
    assert fragment in info.value.message
    assert "\n" not in str(info.value)


def test_check_postmaster_unset_reads_nothing(tmp_path: Path) -> None:
    # Not set: nothing to check, not even a domains directory (check-config creates nothing).
    config = Config.from_toml("", base_dir=tmp_path / "missing")
    routing.check_postmaster(config)
    routing.check_postmaster(Config.default(tmp_path / "data"))
    assert not (tmp_path / "missing").exists()


def test_check_postmaster_without_a_domains_directory(tmp_path: Path) -> None:
    config = Config.from_toml('[delivery]\npostmaster = "a@example.org"', base_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a served domain"):
        routing.check_postmaster(config)


def test_check_postmaster_unreadable_tree(tmp_path: Path) -> None:
    config = delivery_config(tmp_path, "info@example.org")
    aliases = tmp_path / "domains" / "example.org" / "aliases"
    aliases.symlink_to(aliases)  # an error other than "missing", even for root
    with pytest.raises(ConfigError) as info:
        routing.check_postmaster(config)
    assert info.value.key == "[delivery] postmaster"
    assert "cannot check info@example.org" in info.value.message


def test_cli_check_config_checks_the_postmaster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "domains" / "example.org" / "alice").mkdir(parents=True)
    path = tmp_path / "k.toml"
    path.write_text('[delivery]\npostmaster = "bob@example.org"\n')
    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("katerchen: config error: [delivery] postmaster: ")
    assert err.count("\n") == 1
    path.write_text('[delivery]\npostmaster = "alice@example.org"\n')
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert 'postmaster = "alice@example.org"' in capsys.readouterr().out


def test_cli_serve_refuses_to_start_without_a_postmaster_mailbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cli.ENV_CONFIG, raising=False)
    path = tmp_path / "k.toml"
    # A TEST-NET address cannot be bound (exit 1) if the check did not stop it first.
    path.write_text(
        '[server]\nlisten = ["192.0.2.1:25"]\n[delivery]\npostmaster = "bob@example.org"\n'
    )
    saved = (maillog.logger.level, list(maillog.logger.handlers))
    try:
        assert cli.main(["serve", "--config", str(path)]) == 2
    finally:
        for handler in list(maillog.logger.handlers):
            if handler not in saved[1]:
                maillog.logger.removeHandler(handler)
        maillog.logger.setLevel(saved[0])
    err = capsys.readouterr().err
    assert "katerchen: config error: [delivery] postmaster: bob@example.org: " in err
    assert "example.org is not a served domain" in err


# --- [relay], [relay.routes], [dns] ------------------------------------------------------------


def test_relay_and_dns_defaults() -> None:
    config = load("")
    assert config.relay == RelayConfig()
    assert config.dns == DnsConfig()
    relay = config.relay
    assert relay.trusted_networks == ()
    assert relay.smarthost is None
    assert relay.smarthost_tls == "opportunistic"
    assert relay.ca_file is None
    assert relay.mx_port == 25
    assert (relay.retry_initial, relay.retry_max) == (300, 3600)
    assert (relay.max_age, relay.delay_warning) == (432000, 14400)
    assert (relay.max_connections, relay.max_connections_per_destination) == (20, 4)
    assert relay.connect_timeout == 60
    assert (relay.greeting_timeout, relay.command_timeout) == (300, 300)
    assert (relay.data_start_timeout, relay.data_block_timeout) == (120, 180)
    assert relay.data_end_timeout == 600
    assert relay.routes == ()
    assert config.dns.nameservers == ()


def test_relay_values(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme = pytest.importorskip("trustme")
    trustme.CA().cert_pem.write_to_path(str(ca))
    config = load(
        "[relay]\n"
        'trusted_networks = ["192.0.2.0/24", "2001:DB8::/32", "10.1.2.3", "10.1.2.3/32"]\n'
        'smarthost = "Smtp.Example.NET"\n'
        'smarthost_user = "me@example.org"\nsmarthost_password = "s3cret"\n'
        'smarthost_tls = "required"\nca_file = "ca.pem"\nmx_port = 2525\ndelay_warning = 0\n'
        "[relay.routes]\n"
        '"Example.NET" = "127.0.0.1:2526"\n"*" = "[::1]:25"\n"b.example" = "::1"\n'
        "[dns]\n"
        'nameservers = ["127.0.0.1:5353", "::1", "[::1]:53", "127.0.0.1:5353"]\n',
        base_dir=tmp_path,
    )
    relay = config.relay
    assert [str(n) for n in relay.trusted_networks] == [
        "192.0.2.0/24",
        "2001:db8::/32",
        "10.1.2.3/32",
    ]
    assert relay.smarthost == ("smtp.example.net", 25)
    assert relay.smarthost_password == "s3cret"
    assert "s3cret" not in repr(relay)
    assert relay.ca_file == ca
    assert relay.mx_port == 2525
    assert relay.delay_warning == 0
    assert relay.routes == (
        ("*", ("::1", 25)),
        ("b.example", ("::1", 25)),
        ("example.net", ("127.0.0.1", 2526)),
    )
    assert relay.route("EXAMPLE.net") == ("127.0.0.1", 2526)
    assert relay.route("example.net.") == ("127.0.0.1", 2526)
    assert relay.route("other.example") == ("::1", 25)
    assert RelayConfig().route("example.net") is None
    assert config.dns.nameservers == ("127.0.0.1:5353", "::1", "[::1]:53")
    assert Config.from_toml(config.to_toml(), base_dir=Path("/elsewhere")) == config


@pytest.mark.parametrize(
    ("networks", "ip", "trusted"),
    [
        ([], "127.0.0.1", False),  # nobody by default, not even localhost
        (["192.0.2.0/24"], "192.0.2.7", True),
        (["192.0.2.0/24"], "192.0.3.7", False),
        (["192.0.2.0/24"], "::ffff:192.0.2.7", True),  # IPv4-mapped, from a dual-stack socket
        (["::ffff:192.0.2.0/120"], "192.0.2.7", True),  # the mapped form written in the config
        (["192.0.2.0/24"], "2001:db8::7", False),
        (["2001:db8::/32"], "2001:db8::7", True),
        (["2001:db8::/32"], "fe80::1%eth0", False),
        (["127.0.0.1"], "127.0.0.1", True),
        (["127.0.0.1"], "127.0.0.2", False),
        (["0.0.0.0/0"], "", False),  # no client address (a Unix socket, a test): never
        (["0.0.0.0/0"], "not an address", False),
    ],
)
def test_relay_trusts(networks: list[str], ip: str, trusted: bool) -> None:
    listed = ", ".join(f'"{n}"' for n in networks)
    relay = load(f"[relay]\ntrusted_networks = [{listed}]").relay
    assert relay.trusts(ip) is trusted
