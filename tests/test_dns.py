"""MX, A and AAAA lookups (katerchen.dns) against the test DNS server in tests/dnsserver.py.

Every query goes to that server on 127.0.0.1: each resolver here is made with its address.
"""

from __future__ import annotations

import random

import dns.nameserver
import pytest
import trio

from katerchen.dns import (
    DEFAULT_LIFETIME,
    MxHost,
    PermanentDnsError,
    Resolver,
    TemporaryDnsError,
    make_resolver,
    parse_nameserver,
    resolve_addresses,
    resolve_mx,
)
from tests.conftest import TIMEOUT
from tests.dnsserver import DnsServer, Zone, start_dns_server

#: Long enough for an answer from 127.0.0.1, short enough to wait out a silent server.
SHORT_LIFETIME = 0.3

RECORDS = {
    "example.test": {
        "MX": [
            "20 mx20.example.test.",
            "10 mx10a.example.test.",
            "10 mx10b.example.test.",
            "10 mx10c.example.test.",
            "10 mx10d.example.test.",
            "30 mx30.example.test.",
        ]
    },
    "mx10a.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "mx20.example.test": {"A": ["127.0.0.2", "127.0.0.3"]},
    "v6only.test": {"AAAA": ["2001:db8::25"]},
    "implicit.test": {"A": ["127.0.0.9"]},
    "implicit6.test": {"AAAA": ["2001:db8::9"]},
    "nothing.test": {"TXT": ['"v=spf1 -all"']},
    "nullmx.test": {"MX": ["0 ."]},
    "mixed.test": {"MX": ["0 .", "10 mx.mixed.test."]},
    "twice.test": {"MX": ["10 mx.twice.test.", "20 MX.Twice.TEST.", "30 other.twice.test."]},
    "alias.test": {"CNAME": ["mx10a.example.test."]},
    "big.test": {"A": [f"10.0.{i // 256}.{i % 256}" for i in range(200)]},
    # IDNA2008 A-labels of bücher.example and straße.example (IDNA2003 would ask strasse).
    "xn--bcher-kva.example": {"MX": ["10 mx.xn--bcher-kva.example."]},
    "xn--strae-oqa.example": {"MX": ["10 mx.xn--strae-oqa.example."]},
    "partial.test": {"A": ["127.0.0.4"]},
}


@pytest.fixture
async def server(nursery: trio.Nursery) -> DnsServer:
    zone = Zone(
        RECORDS,
        rcodes={"servfail.test": "SERVFAIL", "refused.test": "REFUSED"},
        silent=["silent.test"],
    )
    zone.set_rcode("partial.test", "SERVFAIL", "AAAA")
    with trio.fail_after(TIMEOUT):
        return await start_dns_server(nursery, zone)


@pytest.fixture
def resolver(server: DnsServer) -> Resolver:
    return make_resolver([server.nameserver], lifetime=SHORT_LIFETIME)


# --- the resolver -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("2001:DB8::53", ("2001:db8::53", 53)),
        ("[fe80::1%eth0]:53", ("fe80::1%eth0", 53)),  # link-local, as resolv.conf allows
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ns.example.test",  # a name would need DNS to be found
        "ns.example.test:53",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:x",
        "127.0.0.1:",
        "127.0.0.1:٥٣",  # Arabic-Indic digits pass str.isdigit()
        "[127.0.0.1]:53",
        "[::1",
        "[::1]53",
    ],
)
def test_parse_nameserver_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid nameserver"):
        parse_nameserver(text)


def test_make_resolver_uses_only_the_given_nameservers() -> None:
    resolver = make_resolver(["127.0.0.1:5353", "[::1]"])
    servers = [ns for ns in resolver.nameservers if isinstance(ns, dns.nameserver.Do53Nameserver)]
    assert len(servers) == len(resolver.nameservers) == 2
    assert [(ns.answer_nameserver(), ns.answer_port()) for ns in servers] == [
        ("127.0.0.1", 5353),
        ("::1", 53),
    ]
    assert resolver.lifetime == DEFAULT_LIFETIME
    assert resolver.search == []
    assert make_resolver(["127.0.0.1"], lifetime=0.5).lifetime == 0.5
    with pytest.raises(ValueError, match="invalid nameserver"):
        make_resolver(["localhost:53"])


# --- MX -----------------------------------------------------------------------------------------


async def test_mx_in_preference_order(resolver: Resolver) -> None:
    hosts = await resolve_mx("example.test", resolver=resolver, rng=random.Random(1))
    assert [h.preference for h in hosts] == [10, 10, 10, 10, 20, 30]
    assert {h.host for h in hosts[:4]} == {f"mx10{x}.example.test" for x in "abcd"}
    assert hosts[4:] == [MxHost(20, "mx20.example.test"), MxHost(30, "mx30.example.test")]


async def test_mx_equal_preferences_shuffled(resolver: Resolver) -> None:
    orders = []
    for seed in range(8):
        hosts = await resolve_mx("example.test", resolver=resolver, rng=random.Random(seed))
        again = await resolve_mx("example.test", resolver=resolver, rng=random.Random(seed))
        assert hosts == again  # a seed makes the order repeatable...
        orders.append(tuple(h.host for h in hosts[:4]))
    assert len(set(orders)) > 1  # ...and different seeds spread the load


async def test_mx_default_rng(resolver: Resolver) -> None:
    hosts = await resolve_mx("example.test", resolver=resolver)
    assert [h.preference for h in hosts] == [10, 10, 10, 10, 20, 30]


async def test_mx_hosts_lowercase_and_listed_once(resolver: Resolver) -> None:
    hosts = await resolve_mx("Twice.Test.", resolver=resolver)
    assert hosts == [MxHost(10, "mx.twice.test"), MxHost(30, "other.twice.test")]


@pytest.mark.parametrize(
    ("domain", "host"), [("implicit.test", "implicit.test"), ("implicit6.test", "implicit6.test")]
)
async def test_implicit_mx(resolver: Resolver, domain: str, host: str) -> None:
    # RFC 5321 5.1: no MX records, but an address: the domain is its own exchanger.
    assert await resolve_mx(domain, resolver=resolver) == [MxHost(0, host)]


async def test_no_mx_and_no_address_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(PermanentDnsError, match="no address records") as info:
        await resolve_mx("nothing.test", resolver=resolver)
    assert info.value.status == "5.1.2"  # the recipient's domain takes no mail


async def test_null_mx_is_permanent(server: DnsServer, resolver: Resolver) -> None:
    with pytest.raises(PermanentDnsError, match="null MX") as info:
        await resolve_mx("nullmx.test", resolver=resolver)
    assert info.value.status == "5.1.10"
    # No address lookup: the domain said it takes no mail.
    assert server.zone.queries == [("nullmx.test", "MX")]


async def test_null_mx_beside_real_hosts_is_ignored(resolver: Resolver) -> None:
    assert await resolve_mx("mixed.test", resolver=resolver) == [MxHost(10, "mx.mixed.test")]


async def test_nxdomain_is_permanent(server: DnsServer, resolver: Resolver) -> None:
    with pytest.raises(PermanentDnsError, match="no such domain") as info:
        await resolve_mx("nowhere.test", resolver=resolver)
    assert info.value.status == "5.1.2"
    assert server.zone.queries == [("nowhere.test", "MX")]


async def test_empty_non_terminal_is_not_nxdomain(resolver: Resolver) -> None:
    # "test" exists (names live below it) but has no records: no MX, no address.
    with pytest.raises(PermanentDnsError, match="no address records"):
        await resolve_mx("test", resolver=resolver)


@pytest.mark.parametrize("domain", ["servfail.test", "refused.test"])
async def test_server_failure_is_temporary(resolver: Resolver, domain: str) -> None:
    with pytest.raises(TemporaryDnsError, match="DNS failure") as info:
        await resolve_mx(domain, resolver=resolver)
    assert info.value.status == "4.4.3"
    with pytest.raises(TemporaryDnsError):
        await resolve_addresses(domain, resolver=resolver)


async def test_timeout_is_temporary(server: DnsServer, resolver: Resolver) -> None:
    start = trio.current_time()
    with trio.fail_after(TIMEOUT), pytest.raises(TemporaryDnsError, match="timeout") as info:
        await resolve_mx("silent.test", resolver=resolver)
    assert info.value.status == "4.4.3"
    assert trio.current_time() - start < SHORT_LIFETIME + 2  # the lifetime bounds the lookup
    assert server.zone.queries[0] == ("silent.test", "MX")


async def test_unreachable_nameserver_is_temporary() -> None:
    # A UDP port on 127.0.0.1 that nobody listens on: no reply ever comes (an unconnected UDP
    # socket gets no ICMP error), and the lifetime ends the lookup.
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    resolver = make_resolver([f"127.0.0.1:{port}"], lifetime=SHORT_LIFETIME)
    with trio.fail_after(TIMEOUT), pytest.raises(TemporaryDnsError):
        await resolve_mx("example.test", resolver=resolver)


@pytest.mark.parametrize(
    ("domain", "queried"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("bücher\u3002example", "xn--bcher-kva.example"),
        ("straße.example", "xn--strae-oqa.example"),
    ],
)
async def test_idna_domain_queried_as_a_labels(
    server: DnsServer, resolver: Resolver, domain: str, queried: str
) -> None:
    hosts = await resolve_mx(domain, resolver=resolver)
    assert hosts == [MxHost(10, f"mx.{queried}")]
    assert server.zone.queries == [(queried, "MX")]


@pytest.mark.parametrize("domain", ["", ".", "a..test", "x" * 64 + ".test"])
async def test_invalid_domain_is_permanent(
    server: DnsServer, resolver: Resolver, domain: str
) -> None:
    with pytest.raises(PermanentDnsError, match="invalid domain") as info:
        await resolve_mx(domain, resolver=resolver)
    assert info.value.status == "5.1.2"
    assert server.zone.queries == []


# --- addresses ----------------------------------------------------------------------------------


async def test_addresses_ipv6_then_ipv4(server: DnsServer, resolver: Resolver) -> None:
    addresses = await resolve_addresses("mx10a.example.test", resolver=resolver)
    assert addresses == ["::1", "127.0.0.1"]
    assert server.zone.queries == [("mx10a.example.test", "AAAA"), ("mx10a.example.test", "A")]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("mx20.example.test", ["127.0.0.2", "127.0.0.3"]),
        ("v6only.test", ["2001:db8::25"]),
        ("alias.test", ["::1", "127.0.0.1"]),  # a CNAME to mx10a
        ("MX10A.Example.Test.", ["::1", "127.0.0.1"]),
    ],
)
async def test_addresses(resolver: Resolver, host: str, expected: list[str]) -> None:
    assert sorted(await resolve_addresses(host, resolver=resolver)) == sorted(expected)


async def test_addresses_nxdomain_is_permanent(server: DnsServer, resolver: Resolver) -> None:
    with pytest.raises(PermanentDnsError, match="no such domain") as info:
        await resolve_addresses("nowhere.test", resolver=resolver)
    assert info.value.status == "5.4.4"  # an exchanger that does not exist: unable to route
    assert server.zone.queries == [("nowhere.test", "AAAA")]  # no A query after NXDOMAIN


async def test_addresses_none_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(PermanentDnsError, match="no address records") as info:
        await resolve_addresses("nothing.test", resolver=resolver)
    assert info.value.status == "5.4.4"


async def test_addresses_one_type_failing_uses_the_other(resolver: Resolver) -> None:
    assert await resolve_addresses("partial.test", resolver=resolver) == ["127.0.0.4"]


async def test_addresses_one_type_failing_other_empty_is_temporary(
    server: DnsServer, resolver: Resolver
) -> None:
    server.zone.set_rcode("implicit.test", "SERVFAIL", "A")  # and no AAAA records
    with pytest.raises(TemporaryDnsError):
        await resolve_addresses("implicit.test", resolver=resolver)
    with pytest.raises(TemporaryDnsError):
        await resolve_mx("implicit.test", resolver=resolver)


async def test_large_answer_retried_over_tcp(server: DnsServer, resolver: Resolver) -> None:
    addresses = await resolve_addresses("big.test", resolver=resolver)
    assert len(addresses) == 200
    # Truncated over UDP, asked again over TCP.
    assert server.zone.queries.count(("big.test", "A")) == 2


async def test_zone_changes_while_running(server: DnsServer, resolver: Resolver) -> None:
    server.zone.add("late.test", "MX", "5 mx.late.test")
    assert await resolve_mx("late.test", resolver=resolver) == [MxHost(5, "mx.late.test")]
    server.zone.remove("late.test")
    with pytest.raises(PermanentDnsError):
        await resolve_mx("late.test", resolver=resolver)


# --- address literals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("[ipv6:::1]", "::1"),
        ("192.0.2.1", "192.0.2.1"),  # a bare address, as routes and smarthosts give them
        ("2001:db8::1", "2001:db8::1"),
    ],
)
async def test_address_literal_needs_no_query(
    server: DnsServer, resolver: Resolver, host: str, address: str
) -> None:
    assert await resolve_addresses(host, resolver=resolver) == [address]
    if host.startswith("["):
        assert await resolve_mx(host, resolver=resolver) == [MxHost(0, host)]
    assert server.zone.queries == []


@pytest.mark.parametrize(
    "host", ["[300.0.0.1]", "[192.0.2.1.5]", "[IPv6:fe80::1%eth0]", "[x-tag:stuff]", "[]"]
)
async def test_unusable_address_literal_is_permanent(
    server: DnsServer, resolver: Resolver, host: str
) -> None:
    with pytest.raises(PermanentDnsError, match="address literal") as info:
        await resolve_addresses(host, resolver=resolver)
    assert info.value.status == "5.1.2"
    with pytest.raises(PermanentDnsError, match="address literal"):
        await resolve_mx(host, resolver=resolver)
    assert server.zone.queries == []
