"""A small authoritative DNS server for tests, on 127.0.0.1, over UDP and TCP on the same port.

Built on dnspython's message parsing; it answers from a :class:`Zone` the test fills (and may
change while the server runs)::

    zone = Zone({
        "example.test": {"MX": ["10 mx1.example.test.", "20 mx2.example.test."]},
        "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "nomail.test": {"MX": ["0 ."]},                      # RFC 7505 null MX
    })
    zone.set_rcode("broken.test", "SERVFAIL")                # or "REFUSED"
    zone.silence("slow.test")                                # never answered: a timeout
    host, port = await nursery.start(serve_dns, zone)

Anything else is NXDOMAIN, except a name with records beneath it (an empty non-terminal), which
exists without records.  CNAMEs are followed within the zone.  An answer too big for the
client's UDP payload size (512 without EDNS) is sent truncated, so the client repeats the query
over TCP.  Every question received is logged in :attr:`Zone.queries`.

Fixtures: :func:`start_dns_server` starts one in a nursery and returns a :class:`DnsServer`
(``.nameserver`` is the ``"127.0.0.1:port"`` for ``[dns] nameservers``), and the pytest fixture
:func:`dns_server` is one with an empty zone.  To use the fixture in a test module, import it
from this module in ``tests/conftest.py`` (``from tests.dnsserver import dns_server  # noqa:
F401``), or write a two-line fixture that calls :func:`start_dns_server`.
"""

from __future__ import annotations

import errno
import functools
import struct
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import NoReturn

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import trio

__all__ = ["DnsServer", "Zone", "dns_server", "serve_dns", "start_dns_server"]

#: The TTL of every record: 0, so no cache can hide a change a test makes to the zone.
TTL = 0
_MAX_CNAME_CHAIN = 8
_LENGTH = struct.Struct("!H")

Records = Mapping[str, Mapping[str, Sequence[str]]]
# A name and a record type; type None stands for every type.
_Key = tuple[dns.name.Name, dns.rdatatype.RdataType | None]


def _name(text: str) -> dns.name.Name:
    # Relative names are taken as absolute: "example.test" is "example.test.".
    return dns.name.from_text(text, origin=dns.name.root)


class Zone:
    """The names the server answers for.  Names are ASCII (A-labels); comparison ignores case.

    *records* maps a name to ``{type: [rdata text, ...]}``; rdata names without the final dot
    are absolute too (``"10 mx.example.test"``).
    """

    def __init__(
        self,
        records: Records | None = None,
        *,
        rcodes: Mapping[str, str] | None = None,
        silent: Iterable[str] = (),
    ) -> None:
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._rcodes: dict[_Key, dns.rcode.Rcode] = {}
        self._silent: set[_Key] = set()
        #: Every question received, in order, as ``(name without final dot, type)``.
        self.queries: list[tuple[str, str]] = []
        for name, by_type in (records or {}).items():
            for rdtype, rdatas in by_type.items():
                self.add(name, rdtype, *rdatas)
        for name, rcode in (rcodes or {}).items():
            self.set_rcode(name, rcode)
        for name in silent:
            self.silence(name)

    def add(self, name: str, rdtype: str, *rdatas: str) -> None:
        """Add records of one type to *name* (``zone.add("a.test", "A", "127.0.0.1")``)."""
        owner = _name(name)
        kind = dns.rdatatype.from_text(rdtype)
        rrset = self._records.setdefault(owner, {}).setdefault(
            kind, dns.rrset.RRset(owner, dns.rdataclass.IN, kind)
        )
        for text in rdatas:
            rrset.add(
                dns.rdata.from_text(
                    dns.rdataclass.IN, kind, text, origin=dns.name.root, relativize=False
                ),
                TTL,
            )

    def remove(self, name: str) -> None:
        """Forget *name*: its records, its rcodes and its silences."""
        owner = _name(name)
        self._records.pop(owner, None)
        self._rcodes = {key: rcode for key, rcode in self._rcodes.items() if key[0] != owner}
        self._silent = {key for key in self._silent if key[0] != owner}

    def set_rcode(self, name: str, rcode: str, rdtype: str | None = None) -> None:
        """Answer questions about *name* (of type *rdtype*, default: any) with *rcode*
        (``"SERVFAIL"``, ``"REFUSED"``...)."""
        self._rcodes[_key(name, rdtype)] = dns.rcode.from_text(rcode)

    def silence(self, name: str, rdtype: str | None = None) -> None:
        """Never answer questions about *name* (of type *rdtype*, default: any): a timeout."""
        self._silent.add(_key(name, rdtype))

    @staticmethod
    def _match(
        keys: Container[_Key], name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> _Key | None:
        key: _Key
        for key in ((name, rdtype), (name, None)):
            if key in keys:
                return key
        return None

    def answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The response to the query *wire*, which came over UDP or TCP; None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None  # not DNS: a real server might answer FORMERR; silence does for tests
        if len(query.question) != 1:
            return None
        question = query.question[0]
        self.queries.append(
            (question.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(question.rdtype))
        )
        if self._match(self._silent, question.name, question.rdtype) is not None:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        self._resolve(response, question.name, question.rdtype)
        # UDP answers fit the client's payload size (RFC 6891 6.2.5; 512 without EDNS).
        limit = (max(512, query.payload) if query.edns >= 0 else 512) if udp else 65535
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA | dns.flags.TC
            return response.to_wire()

    def _resolve(
        self, response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        for _ in range(_MAX_CNAME_CHAIN):
            key = self._match(self._rcodes, name, rdtype)
            if key is not None:
                response.set_rcode(self._rcodes[key])
                return
            by_type = self._records.get(name)
            if by_type is None:
                if not any(owner.is_subdomain(name) for owner in self._records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return
            if rdtype in by_type:
                response.answer.append(by_type[rdtype])
                return
            cname = by_type.get(dns.rdatatype.CNAME)
            if cname is None:
                return  # the name exists, without records of this type
            response.answer.append(cname)
            target = cname[0].target
            assert isinstance(target, dns.name.Name)
            name = target
        response.set_rcode(dns.rcode.SERVFAIL)  # a CNAME loop


def _key(name: str, rdtype: str | None) -> _Key:
    return _name(name), None if rdtype is None else dns.rdatatype.from_text(rdtype)


def _as_zone(zone: Zone | Records | None) -> Zone:
    return zone if isinstance(zone, Zone) else Zone(zone)


async def _bind(host: str) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A UDP and a TCP socket bound to the same free port on *host*."""
    for _ in range(50):
        udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        tcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            await udp.bind((host, 0))
            port = udp.getsockname()[1]
            await tcp.bind((host, port))
        except OSError as exc:
            udp.close()
            tcp.close()
            if exc.errno == errno.EADDRINUSE:
                continue  # the port is free for UDP but taken for TCP: try another one
            raise
        return udp, tcp
    raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")


async def _serve_udp(sock: trio.socket.SocketType, zone: Zone) -> NoReturn:
    while True:
        try:
            wire, client = await sock.recvfrom(65535)
            data = zone.answer(wire, udp=True)
            if data is not None:
                await sock.sendto(data, client)
        except OSError:
            continue  # an ICMP error about an earlier client: not this server's problem


async def _serve_tcp(zone: Zone, stream: trio.SocketStream) -> None:
    # RFC 1035 4.2.2 / RFC 7766: each message is preceded by its two-byte length.
    buffer = b""
    while True:
        while len(buffer) >= 2 and len(buffer) >= 2 + _LENGTH.unpack_from(buffer)[0]:
            size = _LENGTH.unpack_from(buffer)[0]
            wire, buffer = buffer[2 : 2 + size], buffer[2 + size :]
            data = zone.answer(wire, udp=False)
            if data is not None:
                await stream.send_all(_LENGTH.pack(len(data)) + data)
        chunk = await stream.receive_some()
        if not chunk:
            await stream.aclose()
            return
        buffer += chunk


async def serve_dns(
    zone: Zone | Records,
    *,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Answer DNS queries from *zone* on *host*, UDP and TCP, until cancelled.

    Start it with ``host, port = await nursery.start(serve_dns, zone)``.
    """
    zone = _as_zone(zone)
    udp, tcp = await _bind(host)
    with udp, tcp:
        tcp.listen()
        port = udp.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_udp, udp, zone)
            await nursery.start(
                trio.serve_listeners,
                functools.partial(_serve_tcp, zone),
                [trio.SocketListener(tcp)],
            )
            task_status.started((host, port))
    raise AssertionError("unreachable: the servers never return")


@attrs.frozen
class DnsServer:
    """A running :func:`serve_dns`; change :attr:`zone` to change its answers."""

    host: str
    port: int
    zone: Zone

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:port"``, as ``[dns] nameservers`` and ``make_resolver`` take it."""
        return f"{self.host}:{self.port}"


async def start_dns_server(nursery: trio.Nursery, zone: Zone | Records | None = None) -> DnsServer:
    """Start a DNS server for *zone* (default: empty) in *nursery*."""
    zone = _as_zone(zone)
    host, port = await nursery.start(serve_dns, zone)
    return DnsServer(host, port, zone)


@pytest.fixture
async def dns_server(nursery: trio.Nursery) -> DnsServer:
    """A DNS server on 127.0.0.1 with an empty zone: fill ``dns_server.zone`` in the test."""
    return await start_dns_server(nursery)
