"""The relay's pure policy: the retry schedule, expiry and delay warnings, what a reply means,
which route a recipient takes -- tested as functions of values, without clock, disk or network.
And who may relay at all: the receiver's trusted networks and the envelope's relay flag.
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from katerchen import delivery, relay
from katerchen.config import Config, RelayConfig
from katerchen.dns import MxHost
from katerchen.envelope import Envelope
from katerchen.protocol import Reply
from katerchen.relay import (
    RecipientState,
    RelayState,
    Result,
    Route,
    choose_route,
    classify,
    delay_warning_due,
    diagnostic,
    dsn_status,
    expired,
    mx_hosts_before_self,
    next_attempt,
    recipient_domain,
    reply_result,
    reply_text,
    retry_delay,
)
from tests.conftest import MakeConfig, StartServer, StoredMessage, config_toml

DEFAULTS = RelayConfig()


def relay_config(text: str) -> RelayConfig:
    return Config.from_toml(text, base_dir=Path("/srv/k")).relay


# --- the retry schedule --------------------------------------------------------------------------


def test_default_schedule_is_5_minutes_doubling_to_an_hour() -> None:
    delays = [
        retry_delay(n, initial=DEFAULTS.retry_initial, maximum=DEFAULTS.retry_max)
        for n in range(1, 9)
    ]
    assert delays == [300, 600, 1200, 2400, 3600, 3600, 3600, 3600]


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (10**9, 10.0)],
)
def test_retry_delay(attempts: int, expected: float) -> None:
    assert retry_delay(attempts, initial=1.0, maximum=10.0) == expected


def test_retry_delay_never_exceeds_a_maximum_below_the_initial() -> None:
    assert retry_delay(1, initial=5.0, maximum=2.0) == 2.0


def test_next_attempt_is_capped_at_expiry() -> None:
    arrival = 1_000_000.0
    # Early on: the plain backoff.
    assert next_attempt(arrival + 10, 1, arrival, DEFAULTS) == arrival + 10 + 300
    assert next_attempt(arrival + 10, 3, arrival, DEFAULTS) == arrival + 10 + 1200
    # Near the end the retry comes exactly when the message expires, not an hour later.
    late = arrival + DEFAULTS.max_age - 100
    assert next_attempt(late, 9, arrival, DEFAULTS) == arrival + DEFAULTS.max_age
    # Past it (a clock step): now, never in the past.
    past = arrival + DEFAULTS.max_age + 5
    assert next_attempt(past, 9, arrival, DEFAULTS) == past


def test_expired() -> None:
    assert not expired(99.0, 0.0, 100.0)
    assert expired(100.0, 0.0, 100.0)
    assert expired(1e9, 0.0, 100.0)
    assert not expired(-5.0, 0.0, 100.0)  # a clock that went back


def _state(*statuses: str, warned: bool = False) -> RelayState:
    recipients = [
        RecipientState(f"r{i}@example.net", status=status)  # type: ignore[arg-type]
        for i, status in enumerate(statuses)
    ]
    return RelayState("q1", recipients, delay_warned=warned)


@pytest.mark.parametrize(
    ("age", "state", "delay_warning", "due"),
    [
        (14399.0, _state("pending"), 14400.0, False),  # not yet
        (14400.0, _state("pending"), 14400.0, True),
        (14400.0, _state("pending", "sent"), 14400.0, True),
        (14400.0, _state("pending", warned=True), 14400.0, False),  # once only
        (14400.0, _state("sent", "failed"), 14400.0, False),  # nothing is delayed
        (1e9, _state("pending"), 0.0, False),  # 0 disables it
    ],
)
def test_delay_warning_due(age: float, state: RelayState, delay_warning: float, due: bool) -> None:
    config = attrs.evolve(DEFAULTS, delay_warning=delay_warning)
    assert delay_warning_due(1000.0 + age, 1000.0, state, config) is due


# --- what a reply means --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, "sent"),
        (251, "sent"),
        (221, "sent"),
        (421, "deferred"),
        (450, "deferred"),
        (452, "deferred"),
        (354, "deferred"),  # never a final answer to a recipient
        (550, "failed"),
        (552, "failed"),
        (554, "failed"),
        (199, "deferred"),
        (600, "deferred"),
    ],
)
def test_classify(code: int, outcome: str) -> None:
    assert classify(code) == outcome


@pytest.mark.parametrize(
    ("code", "enhanced", "status"),
    [
        (550, "5.1.1", "5.1.1"),
        (550, None, "5.0.0"),
        (451, "4.3.0", "4.3.0"),
        (421, None, "4.0.0"),
        (250, "2.1.5", "2.1.5"),
        (550, "4.1.1", "5.0.0"),  # a code of another class is not believed
        (550, "5.1", "5.0.0"),
        (354, None, "4.0.0"),
    ],
)
def test_dsn_status(code: int, enhanced: str | None, status: str) -> None:
    assert dsn_status(code, enhanced) == status


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("550 5.1.1 No such user", "smtp; 550 5.1.1 No such user"),
        ("421 Too busy", "smtp; 421 Too busy"),
        ("451", "smtp; 451"),
        (
            "connect to mx[192.0.2.1]:25: Connection refused",
            "x-katerchen; connect to mx[192.0.2.1]:25: Connection refused",
        ),
        (
            "The message is larger than the peer's limit of 10 octets",
            "x-katerchen; The message is larger than the peer's limit of 10 octets",
        ),
        ("4510 odd", "x-katerchen; 4510 odd"),
    ],
)
def test_diagnostic(reply: str, expected: str) -> None:
    assert diagnostic(reply) == expected


def test_reply_text_and_result() -> None:
    reply = Reply(550, "5.1.1", ("No such user", "  see the docs "))
    assert reply_text(reply) == "550 5.1.1 No such user see the docs"
    assert reply_text(Reply(250, None, "Ok")) == "250 Ok"
    assert reply_result("bob@example.net", reply, "mx.example.net") == Result(
        "bob@example.net",
        "failed",
        "550 5.1.1 No such user see the docs",
        "5.1.1",
        "mx.example.net",
    )
    # A refusal made up by the client (the peer's SIZE, 8BITMIME ...) is not the peer's word.
    local = Reply(552, "5.3.4", "The message is larger than the peer's limit of 10 octets")
    result = reply_result("bob@example.net", local, "mx.example.net", local=True)
    assert result.reply == "The message is larger than the peer's limit of 10 octets"
    assert (result.outcome, result.status) == ("failed", "5.3.4")
    assert diagnostic(result.reply).startswith("x-katerchen; ")


# --- routes --------------------------------------------------------------------------------------


def test_mx_by_default() -> None:
    route = choose_route("Example.NET", DEFAULTS)
    assert route == Route("mx", "example.net", 25)
    assert route.destination == "mx:example.net"
    assert route.credentials is None
    assert route.tls == "opportunistic"


def test_mx_port_is_configurable() -> None:
    assert choose_route("example.net", relay_config("[relay]\nmx_port = 2525")).port == 2525


def test_routes_then_star_then_smarthost_then_mx() -> None:
    config = relay_config(
        '[relay]\nsmarthost = "smart.example:587"\nsmarthost_user = "me"\n'
        'smarthost_password = "pw"\nsmarthost_tls = "required"\n'
        '[relay.routes]\n"example.net" = "10.0.0.1:2525"\n"sub.example.net" = "[::1]:25"\n'
    )
    assert choose_route("EXAMPLE.net", config) == Route("route", "10.0.0.1", 2525)
    # Exact domains only: a subdomain has its own entry or none.
    assert choose_route("sub.example.net", config) == Route("route", "::1", 25)
    smart = choose_route("other.example.net", config)
    assert smart == Route(
        "smarthost", "smart.example", 587, tls="required", credentials=("me", "pw")
    )
    assert "pw" not in repr(smart)
    star = relay_config('[relay.routes]\n"*" = "outbound.example"\n"a.example" = "a.internal:26"')
    assert choose_route("a.example", star) == Route("route", "a.internal", 26)
    assert choose_route("b.example", star) == Route("route", "outbound.example", 25)
    assert choose_route("b.example", star).destination == "route:outbound.example:25"


def test_routes_match_internationalized_domains_by_their_a_labels() -> None:
    config = relay_config('[relay.routes]\n"xn--bcher-kva.example" = "10.0.0.2:25"')
    assert choose_route("b\u00fccher.example", config) == Route("route", "10.0.0.2", 25)
    # Without a route, the MX lookup gets the domain as it is (dns.py makes the A-labels).
    assert choose_route("b\u00fccher.example", DEFAULTS).host == "b\u00fccher.example"


def test_route_and_smarthost_to_the_same_host_do_not_share_connections() -> None:
    # The smarthost session authenticates; a route's does not.
    assert Route("route", "h", 25).destination != Route("smarthost", "h", 25).destination


def test_address_literal_domains_go_to_the_address() -> None:
    assert choose_route("[192.0.2.1]", DEFAULTS) == Route("mx", "[192.0.2.1]", 25)


@pytest.mark.parametrize(
    ("recipient", "domain"),
    [
        ("bob@example.net", "example.net"),
        ('"bob smith"@Example.NET', "Example.NET"),
        ("bob@[192.0.2.1]", "[192.0.2.1]"),
        ("j\u00f6ran@b\u00fccher.de", "b\u00fccher.de"),
        ("postmaster", None),
        ("not an address", None),
    ],
)
def test_recipient_domain(recipient: str, domain: str | None) -> None:
    assert recipient_domain(recipient) == domain


def test_mx_hosts_before_self() -> None:
    hosts = [MxHost(10, "a.example"), MxHost(20, "MX.Example.TEST"), MxHost(20, "b.example")]
    hosts.append(MxHost(30, "c.example"))
    # Not one of them: all.
    assert mx_hosts_before_self(hosts, "elsewhere.example") == hosts
    # We are at 20: only the more preferred ones (RFC 5321 5.1), not our equals.
    assert mx_hosts_before_self(hosts, "mx.example.test") == [MxHost(10, "a.example")]
    # We are the best: nothing left, the mail would loop.
    assert mx_hosts_before_self(hosts, "a.example") == []


# --- the wall clock for MockClock tests ----------------------------------------------------------


async def test_anchored_clock_follows_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    wall = relay.anchored_clock()
    start = wall()
    await trio.sleep(3600)
    assert math.isclose(wall() - start, 3600)


# --- who may relay -------------------------------------------------------------------------------


def test_delivery_relays_what_the_receiver_authorised() -> None:
    envelope = Envelope(
        queue_id="q1",
        arrival=0.0,
        client="192.0.2.7",
        helo="client.example",
        reverse_path="alice@example.test",
        forward_paths=("bob@example.net",),
        body=None,
        smtputf8=False,
    )
    assert not delivery.may_relay(envelope)
    assert delivery.may_relay(attrs.evolve(envelope, relay=True))
    assert delivery.may_relay(attrs.evolve(envelope, client=""))  # made on this host


def test_report_ids() -> None:
    assert delivery.bounce_id("0619a4b1c2d3e4f5a6b7") == "0619a4b1c2d3e4f5a6b7b"
    assert delivery.bounce_id("0619a4b1c2d3e4f5a6b7", relay.FAILURE_SUFFIX).endswith("r")
    assert delivery.bounce_id("0619a4b1c2d3e4f5a6b7", relay.DELAY_SUFFIX).endswith("w")
    long_id = "a" * 64
    assert len(delivery.bounce_id(long_id, "r")) == 64
    assert delivery.bounce_id(long_id, "r") != delivery.bounce_id(long_id, "w")


@pytest.mark.parametrize(
    ("networks", "may_relay"),
    [
        ([], False),
        (["10.0.0.0/8", "127.0.0.2", "::1"], False),  # not empty, but not the client
        (["127.0.0.0/8"], True),
        (["::ffff:127.0.0.0/104"], True),  # written in the IPv4-mapped form
    ],
)
async def test_trusted_networks_at_rcpt(
    make_config: MakeConfig,
    start_server: StartServer,
    tmp_path: Path,
    networks: list[str],
    may_relay: bool,
) -> None:
    listed = ", ".join(f'"{n}"' for n in networks)
    text = config_toml() + f"\n[relay]\ntrusted_networks = [{listed}]\n"
    make_config()  # the domain example.test with its mailboxes
    config = Config.from_toml(text, base_dir=tmp_path)
    server = await start_server(config)
    client = await server.connect()
    try:
        await client.expect("220 ")
        await client.send("EHLO client.test\r\n")
        await client.expect("250")
        await client.send("MAIL FROM:<alice@example.test>\r\n")
        await client.expect("250")
        await client.send("RCPT TO:<carol@elsewhere.example>\r\n")
        if not may_relay:
            await client.expect("550 5.7.1")
            # A local recipient makes a transaction that carries no relay flag.
            await client.send("RCPT TO:<bob@example.test>\r\n")
            await client.expect("250")
        else:
            await client.expect("250")
        await client.send("DATA\r\n")
        await client.expect("354")
        await client.send("Subject: t\r\n\r\nhi\r\n.\r\n")
        await client.expect("250")
        await client.send("QUIT\r\n")
        await client.expect("221")
    finally:
        await client.aclose()
    (stored,) = [StoredMessage.read(path) for path in server.received()]
    assert stored.envelope.relay is may_relay
    expected = ("carol@elsewhere.example",) if may_relay else ("bob@example.test",)
    assert stored.envelope.forward_paths == expected
