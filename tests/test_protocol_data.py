"""The sans-IO server side: DATA content (smuggling, dot-unstuffing, bare LF, size) and BDAT.

Dialogs run three ways (whole, one byte at a time, with a pipelined command behind them), and a
hypothesis test checks the fast DATA scanner against a slow line-by-line reference under any
split of the input.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from katerchen.protocol import (
    PAUSED,
    ChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Event,
    Quit,
    Reply,
    ServerSettings,
    replies,
)
from tests.protocol_dialog import MODES, SETTINGS, TRANSACTION, Peer, dialog

REJECT = ServerSettings("mx.test", 1000, 3, bare_newline="reject")


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def data_dialog(mode: str, content: str, *, settings: ServerSettings = SETTINGS) -> Peer:
    """DATA with ``content`` (a "c~" escaped string, terminator included), accepted."""
    return dialog(
        mode,
        TRANSACTION
        + f"""
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c~ {content}
        s: 250 2.0.0 Ok
        c: QUIT
        s: 221 2.0.0 Bye
        """,
        settings=settings,
    )


def stored(peer: Peer) -> list[bytes]:
    assert all(m.end.accepted for m in peer.messages)
    assert all(m.end.size == len(m.data) for m in peer.messages)
    return [m.data for m in peer.messages]


# --- DATA --------------------------------------------------------------------------------------


def test_simple_message(mode: str) -> None:
    peer = data_dialog(mode, r"Subject: hi\r\n\r\nHello.\r\n.\r\n")
    assert stored(peer) == [b"Subject: hi\r\n\r\nHello.\r\n"]


def test_empty_message(mode: str) -> None:
    peer = data_dialog(mode, r".\r\n")
    assert stored(peer) == [b""]
    assert not any(isinstance(e, DataChunk) for e in peer.events)


def test_message_of_one_empty_line(mode: str) -> None:
    assert stored(data_dialog(mode, r"\r\n.\r\n")) == [b"\r\n"]


def test_dot_unstuffing(mode: str) -> None:
    peer = data_dialog(mode, r"..\r\n..leading\r\n...\r\nmid.dle.\r\n.x\r\n.\r\n")
    assert stored(peer) == [b".\r\n.leading\r\n..\r\nmid.dle.\r\nx\r\n"]


def test_first_line_dot_stuffed(mode: str) -> None:
    assert stored(data_dialog(mode, r"..\r\n.\r\n")) == [b".\r\n"]


def test_bare_cr_is_kept(mode: str) -> None:
    peer = data_dialog(mode, r"a\rb\r\nc\r\r\n\r\r\n.\r\n")
    assert stored(peer) == [b"a\rb\r\nc\r\r\n\r\r\n"]


def test_bare_lf_is_normalized(mode: str) -> None:
    # The "." after a bare LF does not end the message; the CRLF "." CRLF after it does.
    peer = data_dialog(mode, r"a\nb\r\nc\n.\r\n\r\n.\r\n")
    assert stored(peer) == [b"a\r\nb\r\nc\r\n\r\n\r\n"]


def test_bare_lf_is_rejected(mode: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + r"""
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c~ a\r\nb\nc\r\n.\r\n
        s: 550 5.6.0 Error: bare <LF> received; lines must end with <CR><LF>
        c: MAIL FROM:<again@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<rcpt@mx.test>
        s: 250 2.1.5 Ok
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c~ clean\r\n.\r\n
        s: 250 2.0.0 Ok
        """,
        settings=REJECT,
    )
    assert [m.end.accepted for m in peer.messages] == [False, True]
    assert peer.messages[0].end.reply == replies.BARE_LINEFEED
    assert peer.messages[1].data == b"clean\r\n"


SMUGGLED = r"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\nevil\r\n"


@pytest.mark.parametrize(
    ("smuggle", "normalized"),
    [
        (r"\n.\n", b"\r\n\r\n"),
        (r"\n.\r\n", b"\r\n\r\n"),
        (r"\r\n.\n", b"\r\n\r\n"),
        (r"\r.\r\n", b"\r.\r\n"),
        (r"\r\n\r.\r\n", b"\r\n\r.\r\n"),
        (r"\n..\n", b"\r\n.\r\n"),
        (r"\r\n.\r\r\n", b"\r\n\r\r\n"),
    ],
)
def test_smuggling_stays_in_one_message(mode: str, smuggle: str, normalized: bytes) -> None:
    peer = data_dialog(mode, rf"real{smuggle}{SMUGGLED}.\r\n")
    smuggled = SMUGGLED.encode().replace(b"\\r\\n", b"\r\n")
    assert stored(peer) == [b"real" + normalized + smuggled]
    assert sum(isinstance(e, DataEnd) for e in peer.events) == 1


@pytest.mark.parametrize("smuggle", [r"\n.\n", r"\n.\r\n", r"\r\n.\n"])
def test_smuggling_with_bare_newline_rejected(mode: str, smuggle: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + rf"""
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c~ real{smuggle}{SMUGGLED}.\r\n
        s: 550 5.6.0 Error: bare <LF> received; lines must end with <CR><LF>
        c: QUIT
        s: 221 2.0.0 Bye
        """,
        settings=REJECT,
    )
    assert [m.end.accepted for m in peer.messages] == [False]


def test_bare_cr_smuggling_is_accepted_when_rejecting_bare_lf(mode: str) -> None:
    peer = data_dialog(mode, rf"real\r.\r\n{SMUGGLED}.\r\n", settings=REJECT)
    assert len(stored(peer)) == 1


def test_message_size_limit(mode: str) -> None:
    line = "x" * 98  # 100 octets with CRLF
    exactly = rf"{line}\r\n" * 10
    peer = dialog(
        mode,
        TRANSACTION
        + rf"""
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c~ {exactly}.\r\n
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c~ {exactly}x\r\n{exactly}.\r\n
        s: 552 5.3.4 Error: message size exceeds fixed limit
        c: NOOP
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: DATA
        s: 354 End data with <CR><LF>.<CR><LF>
        c~ small\r\n.\r\n
        s: 250 2.0.0 Ok
        """,
    )
    assert [m.end.accepted for m in peer.messages] == [True, False, True]
    assert peer.messages[0].end.size == 1000
    assert peer.messages[1].end.reply == replies.MESSAGE_TOO_BIG
    assert peer.messages[2].data == b"small\r\n"


def test_size_counts_stored_octets(mode: str) -> None:
    # 1010 octets on the wire, 1000 once the ten stuffed dots are removed.
    line = "." + "x" * 97
    peer = data_dialog(mode, rf".{line}\r\n" * 10 + r".\r\n")
    assert [len(m) for m in stored(peer)] == [1000]


def test_eof_in_data_is_no_message() -> None:
    peer = Peer.start()
    peer.feed(b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nhalf\r\n.")
    peer.feed(b"")
    assert peer.closed
    assert peer.messages == []
    assert not any(isinstance(e, DataEnd) for e in peer.events)


def test_paused_after_data_end() -> None:
    peer = Peer.start()
    peer.feed(b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    conn = peer.conn
    conn.receive_data(b"DATA\r\n")
    start = conn.next_event()
    assert isinstance(start, DataStart)
    conn.send(start.reply)
    conn.receive_data(b"body\r\n.\r\nQUIT\r\n")
    assert conn.next_event() == DataChunk(b"body\r\n")
    end = conn.next_event()
    assert isinstance(end, DataEnd) and end.accepted
    assert conn.next_event() is PAUSED  # until the I/O layer has committed the message
    assert conn.send(replies.queued("Q1")) == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert not conn.in_transaction
    assert conn.next_event() == Quit(replies.BYE)


def test_long_line_is_streamed_in_pieces() -> None:
    big = ServerSettings("mx.test", 10_000_000, 3)
    peer = Peer.start(big)
    peer.feed(b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    for _ in range(50):
        peer.feed(b"y" * 65536)
        assert len(peer.conn._buf) <= 4
        assert sum(len(e.data) for e in peer.events if isinstance(e, DataChunk)) > 0
    peer.feed(b"\r\n.\r\n")
    assert [len(m.data) for m in peer.messages] == [50 * 65536 + 2]


def test_large_message_comes_in_large_chunks() -> None:
    big = ServerSettings("mx.test", 10_000_000, 3)
    peer = Peer.start(big)
    peer.feed(b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    body = b"".join(b"line %d of a message with some text\r\n" % n for n in range(20000))
    for start in range(0, len(body), 65536):
        peer.feed(body[start : start + 65536])
    peer.feed(b".\r\n")
    chunks = [e for e in peer.events if isinstance(e, DataChunk)]
    assert len(chunks) <= len(body) // 65536 + 2
    assert peer.messages[0].data == body


# --- the DATA scanner against a line-by-line reference -------------------------------------------


def reference(content: bytes, bare_newline: str) -> tuple[bytes | None, bytes] | None:
    """What the rules say, line by line: (stored content or None if refused, rest) or None."""
    out: list[bytes] = []
    previous_crlf = True  # the DATA command's own CRLF
    bare = False
    position = 0
    while True:
        newline = content.find(b"\n", position)
        if newline < 0:
            return None
        line = content[position : newline + 1]
        position = newline + 1
        crlf = line.endswith(b"\r\n")
        if line == b".\r\n" and previous_crlf:
            return (None if bare else b"".join(out)), content[position:]
        if line.startswith(b"."):
            line = line[1:]
        if not crlf:
            bare = bare or bare_newline == "reject"
            line = line[:-1] + b"\r\n"
        out.append(line)
        previous_crlf = crlf


def run_data(content: bytes, cuts: list[int], bare_newline: str) -> tuple[Peer, int]:
    settings = ServerSettings(
        "mx.test", 1_000_000, 3, bare_newline=bare_newline, max_errors=1_000_000
    )
    peer = Peer.start(settings)
    peer.feed(b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    before = len(peer.replies)
    stream = content + b"NOOP\r\n"
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    for start, stop in itertools.pairwise(points):
        peer.feed(stream[start:stop])
    return peer, before


@settings(max_examples=400, deadline=None)
@given(
    body=st.lists(
        st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.", b"..", b"x\r\n"]),
        max_size=40,
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    bare_newline=st.sampled_from(["normalize", "reject"]),
)
def test_data_scanner_matches_the_line_reference(
    body: bytes, cuts: list[int], bare_newline: str
) -> None:
    content = body + b"\r\n.\r\n"  # always ends, possibly earlier
    expected = reference(content, bare_newline)
    assert expected is not None
    message, rest = expected
    peer, before = run_data(content, cuts, bare_newline)
    ends = [e for e in peer.events if isinstance(e, DataEnd)]
    assert len(ends) == 1
    assert ends[0].accepted == (message is not None)
    if message is not None:
        assert peer.messages[0].data == message
        assert ends[0].size == len(message)
    # Whatever followed the end is read as commands (here: unknown ones and the NOOP).
    after = peer.replies[before + 1 :]
    assert after[-1] == "250 2.0.0 Ok"
    assert len(after) == (rest + b"NOOP\r\n").count(b"\n")


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"\r\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
)
def test_any_split_gives_the_same_content(body: bytes, cuts: list[int]) -> None:
    content = body + b"\r\n.\r\n"
    whole, _ = run_data(content, [], "normalize")
    split, _ = run_data(content, cuts, "normalize")
    assert split.messages == whole.messages
    assert split.replies == whole.replies


# --- BDAT ----------------------------------------------------------------------------------------


def test_bdat_in_several_chunks(mode: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + r"""
        c: BDAT 7
        c~ Subject
        s: 250 2.0.0 7 octets received
        c: BDAT 12
        c~ : hi\r\n\r\nbody
        s: 250 2.0.0 12 octets received
        c: BDAT 5 LAST
        c~ \r\nend
        s: 250 2.0.0 Ok
        c: QUIT
        s: 221 2.0.0 Bye
        """,
    )
    assert stored(peer) == [b"Subject: hi\r\n\r\nbody\r\nend"]
    chunk_ends = [e for e in peer.events if isinstance(e, ChunkEnd)]
    assert [e.size for e in chunk_ends] == [7, 12]


def test_bdat_is_byte_exact(mode: str) -> None:
    raw = r"a\n.\nb\r\n.\r\nMAIL FROM:<x@y>\r\n..c\r\x00\xff"
    size = len(raw.encode().decode("unicode_escape"))
    peer = dialog(
        mode,
        TRANSACTION
        + rf"""
        c: BDAT {size} LAST
        c~ {raw}
        s: 250 2.0.0 Ok
        """,
        settings=REJECT,
    )
    assert stored(peer) == [b"a\n.\nb\r\n.\r\nMAIL FROM:<x@y>\r\n..c\r\x00\xff"]


def test_bdat_0_last(mode: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + r"""
        c: BDAT 0 LAST
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: BDAT 3
        c~ abc
        s: 250 2.0.0 3 octets received
        c: bdat 0 last
        s: 250 2.0.0 Ok
        """,
    )
    assert stored(peer) == [b"", b"abc"]


def test_bdat_out_of_sequence_consumes_its_octets(mode: str) -> None:
    dialog(
        mode,
        r"""
        c: BDAT 6
        c~ QUIT\r\n
        s: 503 5.5.1 Error: need RCPT command
        c: EHLO client.test
        s: 250-mx.test Hello client.test
        s: 250-SIZE 1000
        s: 250-8BITMIME
        s: 250-PIPELINING
        s: 250-CHUNKING
        s: 250-BINARYMIME
        s: 250-ENHANCEDSTATUSCODES
        s: 250 SMTPUTF8
        c: BDAT 6 LAST
        c~ QUIT\r\n
        s: 503 5.5.1 Error: need RCPT command
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: BDAT 6
        c~ QUIT\r\n
        s: 503 5.5.1 Error: need RCPT command
        c: NOOP
        s: 250 2.0.0 Ok
        """,
    )


def test_bdat_syntax_errors(mode: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + r"""
        c: BDAT
        s: 501 5.5.4 Syntax: BDAT size [LAST]
        c: BDAT x
        s: 501 5.5.4 Syntax: BDAT size [LAST]
        c: BDAT -1
        s: 501 5.5.4 Syntax: BDAT size [LAST]
        c: BDAT 123456789012345678901
        s: 501 5.5.4 Syntax: BDAT size [LAST]
        c: BDAT 6 FIRST
        c~ QUIT\r\n
        s: 501 5.5.4 Syntax: BDAT size [LAST]
        c: BDAT 6 LAST now
        c~ QUIT\r\n
        s: 501 5.5.4 Syntax: BDAT size [LAST]
        c: BDAT 2 LAST
        c~ ok
        s: 250 2.0.0 Ok
        """,
    )
    assert stored(peer) == [b"ok"]


def test_data_after_bdat(mode: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + r"""
        c: BDAT 3
        c~ abc
        s: 250 2.0.0 3 octets received
        c: DATA
        s: 503 5.5.1 Error: DATA after BDAT
        c: RCPT TO:<late@mx.test>
        s: 503 5.5.1 Error: RCPT after BDAT
        c: MAIL FROM:<a@client.test>
        s: 503 5.5.1 Error: nested MAIL command
        c: NOOP
        s: 250 2.0.0 Ok
        c: BDAT 3 LAST
        c~ def
        s: 250 2.0.0 Ok
        """,
    )
    assert stored(peer) == [b"abcdef"]


BINARY_TRANSACTION = TRANSACTION.replace(
    "MAIL FROM:<sender@client.test>", "MAIL FROM:<sender@client.test> BODY=BINARYMIME"
)


def test_binarymime_needs_bdat(mode: str) -> None:
    peer = dialog(
        mode,
        BINARY_TRANSACTION
        + r"""
        c: DATA
        s: 503 5.5.1 Error: BODY=BINARYMIME needs BDAT
        c: BDAT 4 LAST
        c~ \x00\x01\n\xff
        s: 250 2.0.0 Ok
        """,
    )
    assert stored(peer) == [b"\x00\x01\n\xff"]


def test_bdat_over_the_size_limit(mode: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + rf"""
        c: BDAT 600
        c~ {"a" * 600}
        s: 250 2.0.0 600 octets received
        c: BDAT 600
        c~ {"b" * 600}
        s: 250 2.0.0 600 octets received
        c: BDAT 10
        c~ {"c" * 10}
        s: 250 2.0.0 10 octets received
        c: BDAT 0 LAST
        s: 552 5.3.4 Error: message size exceeds fixed limit
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: BDAT 1000 LAST
        c~ {"d" * 1000}
        s: 250 2.0.0 Ok
        """,
    )
    assert [m.end.accepted for m in peer.messages] == [False, True]
    assert peer.messages[1].data == b"d" * 1000
    # Nothing past the limit was handed out.
    sizes = [len(e.data) for e in peer.events if isinstance(e, DataChunk)]
    assert sum(sizes) == 600 + 1000


def test_refused_chunk_ends_the_transaction(mode: str) -> None:
    def disk_error(event: Event) -> Reply | None:
        return replies.LOCAL_ERROR if isinstance(event, ChunkEnd) else None

    dialog(
        mode,
        TRANSACTION
        + r"""
        c: BDAT 3
        c~ abc
        s: 451 4.3.0 Error: local error in processing
        c: BDAT 3 LAST
        c~ def
        s: 503 5.5.1 Error: need RCPT command
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        """,
        answer=disk_error,
    )


def test_rset_abandons_a_bdat_transaction(mode: str) -> None:
    peer = dialog(
        mode,
        TRANSACTION
        + r"""
        c: BDAT 3
        c~ abc
        s: 250 2.0.0 3 octets received
        c: RSET
        s: 250 2.0.0 Ok
        c: MAIL FROM:<a@client.test>
        s: 250 2.1.0 Ok
        c: RCPT TO:<b@mx.test>
        s: 250 2.1.5 Ok
        c: BDAT 3 LAST
        c~ xyz
        s: 250 2.0.0 Ok
        """,
    )
    assert stored(peer) == [b"xyz"]


def test_eof_in_bdat_is_no_message() -> None:
    peer = Peer.start()
    peer.feed(b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 10 LAST\r\nabc")
    assert peer.conn.receiving_data
    peer.feed(b"")
    assert peer.closed
    assert peer.messages == []
    assert isinstance(peer.events[-1], ConnectionClosed)
