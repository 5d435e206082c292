"""Where mail for a domain goes: MX, A and AAAA lookups through dnspython's async resolver on trio.

:func:`make_resolver` builds the resolver, from ``[dns] nameservers`` (``"127.0.0.1:5353"``, tests
run their own server on 127.0.0.1) or from the system's ``/etc/resolv.conf`` when that list is
empty.  :func:`resolve_mx` turns a domain into the hosts to try, in order (RFC 5321 5.1);
:func:`resolve_addresses` turns one of those hosts into the IP addresses to connect to.

Theory of operation: every failure is one of two exceptions, because the relay needs exactly one
decision from it -- bounce or retry later:

- :class:`PermanentDnsError` when the DNS *said* no: the name does not exist (NXDOMAIN), the domain
  has no MX and no address (the implicit MX of RFC 5321 5.1 is unusable), the domain publishes a
  null MX (RFC 7505), or the name cannot be a domain at all.
- :class:`TemporaryDnsError` when the DNS could not say: SERVFAIL, REFUSED, a timeout, a network
  error, a malformed answer.  Another try later may succeed.

Each carries an RFC 3463 ``status`` for the bounce or the log.  Names are looked up as given,
absolute: no search list, no ``/etc/hosts``.  A domain with U-labels is queried as A-labels.  An
address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) and, for :func:`resolve_addresses`, a bare
IP address (a route or smarthost like ``127.0.0.1:2525``) are answered without any query.

Every query goes through dnspython's trio backend, named explicitly: dnspython otherwise remembers
the first async library it saw for the whole process.
"""

from __future__ import annotations

import ipaddress
import random
import re
import unicodedata
from collections.abc import Sequence
from typing import Final

import attrs
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.resolver

__all__ = [
    "DEFAULT_LIFETIME",
    "DnsError",
    "MxHost",
    "PermanentDnsError",
    "Resolver",
    "TemporaryDnsError",
    "make_resolver",
    "parse_nameserver",
    "resolve_addresses",
    "resolve_mx",
]

#: The resolver type :func:`make_resolver` returns and the lookups take.
Resolver = dns.asyncresolver.Resolver

#: Seconds one lookup (one name, one record type, all retries) may take before it is a
#: :class:`TemporaryDnsError`.  dnspython retries a silent server every 2 s within it.
DEFAULT_LIFETIME: Final = 5.0
#: EDNS0 UDP payload size: the DNS Flag Day 2020 value, which avoids IP fragmentation; larger
#: answers come truncated and dnspython repeats the query over TCP.
_EDNS_PAYLOAD: Final = 1232

# RFC 3463 codes: X.1.2 "bad destination system address" (the recipient's domain does not exist,
# takes no mail, or is no domain at all), X.1.10 the null MX (RFC 7505 4.2), X.4.4 "unable to
# route" (an exchanger or route host that does not exist or has no address), X.4.3 "directory
# server failure" (the DNS failed).
_NO_ROUTE: Final = "5.4.4"
_DNS_FAILURE: Final = "4.4.3"
_NULL_MX: Final = "5.1.10"
_BAD_DOMAIN: Final = "5.1.2"

# IDNA2008 (RFC 3490 3.1, kept by UTS #46) also separates labels with these full stops.
_DOTS_RE: Final = re.compile("[\u3002\uff0e\uff61]")
_IPV6_TAG: Final = "ipv6:"

_default_rng: Final = random.Random()


# --- errors and values ----------------------------------------------------------------------


class DnsError(Exception):
    """A lookup failed.  ``status`` is the RFC 3463 enhanced status code that fits the failure."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


class PermanentDnsError(DnsError):
    """The DNS answered that there is no way to reach the name (bounce, do not retry)."""


class TemporaryDnsError(DnsError):
    """The DNS did not answer usefully this time (retry later)."""


@attrs.frozen
class MxHost:
    """One mail exchanger: lower ``preference`` first; ``host`` is lowercase A-label text without
    the trailing dot, or an address literal as given (``"[192.0.2.1]"``)."""

    preference: int
    host: str


# --- the resolver ---------------------------------------------------------------------------


def parse_nameserver(text: str) -> tuple[str, int]:
    """Split ``"192.0.2.53:5353"``, ``"[2001:db8::53]:5353"``, ``"192.0.2.53"`` or
    ``"2001:db8::53"`` into ``(address, port)``; the port defaults to 53.

    Raises ValueError unless the address is an IP address (a nameserver named by a host name
    would need DNS to be found) and the port is 1 to 65535.
    """
    address, port_text = text, "53"
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
            raise ValueError(f"invalid nameserver {text!r}: expected [address]:port")
        address = text[1:end]
        if end + 1 < len(text):
            port_text = text[end + 2 :]
    elif text.count(":") == 1:
        address, port_text = text.split(":")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"invalid nameserver {text!r}: not an IP address") from None
    if isinstance(ip, ipaddress.IPv4Address) and text.startswith("["):
        raise ValueError(f"invalid nameserver {text!r}: brackets are for IPv6 addresses")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid nameserver {text!r}: port must be 1 to 65535")
    return str(ip), int(port_text)


def make_resolver(nameservers: Sequence[str], *, lifetime: float = DEFAULT_LIFETIME) -> Resolver:
    """A resolver that asks *nameservers* (see :func:`parse_nameserver`), in turn, or the system's
    nameservers (``/etc/resolv.conf``) when *nameservers* is empty.

    *lifetime* bounds each lookup, retries included.  Building it sends nothing.  Raises
    ValueError for a malformed nameserver, or when the system configuration cannot be read or
    names no nameserver.
    """
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(*parse_nameserver(text)) for text in nameservers
        ]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            raise ValueError(f"no system DNS configuration: {exc}") from None
        # Names are always queried absolute: no search list from resolv.conf.
        resolver.search = []
        resolver.use_search_by_default = False
    resolver.lifetime = lifetime
    resolver.timeout = min(resolver.timeout, lifetime)
    resolver.use_edns(0, 0, _EDNS_PAYLOAD)
    return resolver


# --- names ------------------------------------------------------------------------------------


def _literal_address(text: str) -> str | None:
    """The IP address in an RFC 5321 address literal; None when *text* is not one.

    Raises PermanentDnsError for a bracketed text that is no IPv4 or IPv6 literal."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    content = text[1:-1]
    # A scope id ("fe80::1%eth0", which ipaddress accepts) names an interface of whoever reads
    # it, never a remote destination.
    try:
        if "%" in content:
            raise ValueError(content)
        if content[: len(_IPV6_TAG)].lower() == _IPV6_TAG:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
                content[len(_IPV6_TAG) :]
            )
        else:
            ip = ipaddress.IPv4Address(content)
    except ValueError:
        raise PermanentDnsError(f"unusable address literal {text}", status=_BAD_DOMAIN) from None
    return str(ip)


def _a_label(label: str) -> str:
    # IDNA2008 (RFC 5891 4.4): the A-label is "xn--" and the Punycode of the U-label.  Lowercase
    # and NFC are the UTS #46 mapping a lookup applies first (uppercase is not PVALID).  Python's
    # "idna" codec is IDNA2003, which would turn "straße" into "strasse": a different domain.
    return "xn--" + unicodedata.normalize("NFC", label.lower()).encode("punycode").decode("ascii")


def _query_name(domain: str) -> dns.name.Name:
    """*domain* (LDH or U-labels, with or without the final dot) as an absolute A-label name."""
    text = domain
    if not text.isascii():
        text = ".".join(
            label if label.isascii() else _a_label(label)
            for label in _DOTS_RE.sub(".", text).split(".")
        )
    try:
        name = dns.name.from_text(text)
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise PermanentDnsError(f"invalid domain {domain!r}: {exc}", status=_BAD_DOMAIN) from None
    if name == dns.name.root:
        raise PermanentDnsError(f"invalid domain {domain!r}", status=_BAD_DOMAIN)
    return name


def _host_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


# --- lookups ------------------------------------------------------------------------------------


async def _lookup(
    resolver: Resolver, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, *, status: str
) -> dns.resolver.Answer | None:
    """The answer for (*name*, *rdtype*); None when the name exists without such records.

    *status* is the code of the PermanentDnsError when the name does not exist."""
    what = f"{_host_text(name)} {rdtype.name}"
    backend = dns.asyncbackend.get_backend("trio")
    try:
        return await resolver.resolve(name, rdtype, search=False, backend=backend)
    except dns.resolver.NoAnswer:
        return None
    except dns.resolver.NXDOMAIN:
        raise PermanentDnsError(f"{what}: no such domain", status=status) from None
    except dns.resolver.LifetimeTimeout:
        raise TemporaryDnsError(f"{what}: DNS timeout", status=_DNS_FAILURE) from None
    except dns.resolver.NoNameservers as exc:
        # Every nameserver failed: SERVFAIL, REFUSED, unreachable, or a malformed answer.
        raise TemporaryDnsError(f"{what}: DNS failure ({exc})", status=_DNS_FAILURE) from None
    except (dns.exception.DNSException, OSError) as exc:
        raise TemporaryDnsError(f"{what}: DNS error ({exc})", status=_DNS_FAILURE) from None


async def resolve_mx(
    domain: str, *, resolver: Resolver, rng: random.Random | None = None
) -> list[MxHost]:
    """The mail exchangers for *domain*, in the order to try them (RFC 5321 5.1).

    Lowest preference first; hosts of equal preference are shuffled with *rng* (a seeded
    ``random.Random`` makes it repeatable).  A domain without MX records but with an A or AAAA
    record is its own, implicit MX: ``[MxHost(0, domain)]``.  An address literal is its own MX,
    as given.  ``"."`` exchanges (RFC 7505 null MX) are not hosts: they are left out when the domain
    also names real ones (a misconfiguration RFC 7505 3 forbids), and alone they refuse mail.

    Raises PermanentDnsError (no such domain, null MX, no MX and no address, not a domain name)
    or TemporaryDnsError (the DNS failed).
    """
    if _literal_address(domain) is not None:
        return [MxHost(0, domain)]
    name = _query_name(domain)
    answer = await _lookup(resolver, name, dns.rdatatype.MX, status=_BAD_DOMAIN)
    if answer is None:
        # RFC 5321 5.1: no MX, so the domain itself is the exchanger -- if it has an address.
        await _addresses(resolver, name, status=_BAD_DOMAIN)
        return [MxHost(0, _host_text(name))]
    by_preference: dict[int, list[str]] = {}
    null_mx = False
    for rdata in answer:
        if not isinstance(rdata, dns.rdtypes.ANY.MX.MX):
            continue
        if rdata.exchange == dns.name.root:
            null_mx = True
            continue
        by_preference.setdefault(rdata.preference, []).append(_host_text(rdata.exchange))
    if not by_preference:
        if null_mx:
            raise PermanentDnsError(
                f"{_host_text(name)} does not accept mail (null MX)", status=_NULL_MX
            )
        raise TemporaryDnsError(f"{_host_text(name)} MX: malformed answer", status=_DNS_FAILURE)
    rng = rng if rng is not None else _default_rng
    hosts: list[MxHost] = []
    seen: set[str] = set()
    for preference in sorted(by_preference):
        group = sorted(by_preference[preference])  # sorted first, so a seeded rng is repeatable
        rng.shuffle(group)
        for host in group:
            if host not in seen:  # a host listed twice is tried at its best preference only
                seen.add(host)
                hosts.append(MxHost(preference, host))
    return hosts


async def resolve_addresses(host: str, *, resolver: Resolver) -> list[str]:
    """The IP addresses of *host*: IPv6 (AAAA) first, then IPv4 (A), as text.

    An address literal (``"[192.0.2.1]"``, ``"[IPv6:2001:db8::1]"``) or a bare IP address gives
    that address without a query.  When one record type fails temporarily but the other answers,
    the answer is used.

    Raises PermanentDnsError (no such name, no address records, not a host name) or
    TemporaryDnsError (the DNS failed).
    """
    literal = _literal_address(host)
    if literal is not None:
        return [literal]
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    return await _addresses(resolver, _query_name(host), status=_NO_ROUTE)


async def _addresses(resolver: Resolver, name: dns.name.Name, *, status: str) -> list[str]:
    addresses: list[str] = []
    failure: TemporaryDnsError | None = None
    # One after the other: nurseries live in app.py only (DESIGN rule 6), and two round trips
    # to the resolver cost little next to the SMTP session that follows.
    for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
        try:
            answer = await _lookup(resolver, name, rdtype, status=status)
        except TemporaryDnsError as exc:
            failure = exc
            continue
        if answer is not None:
            addresses.extend(rdata.to_text() for rdata in answer)
    if addresses:
        return addresses
    if failure is not None:
        raise failure
    raise PermanentDnsError(f"{_host_text(name)}: no address records", status=status)
