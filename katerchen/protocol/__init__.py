"""Sans-IO SMTP: the server side (``ServerConnection``), its events and its replies.

Nothing in this package does I/O or reads a clock; a test imports it in a subprocess and checks
that trio, socket, ssl, selectors and asyncio stay unimported.
"""

from katerchen.protocol import replies
from katerchen.protocol.replies import Reply
from katerchen.protocol.server import (
    NEED_DATA,
    PAUSED,
    ChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    Quit,
    RcptTo,
    Reset,
    Respond,
    Sentinel,
    ServerConnection,
    ServerSettings,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ChunkEnd",
    "ConnectionClosed",
    "DataChunk",
    "DataEnd",
    "DataStart",
    "Event",
    "Hello",
    "LocalProtocolError",
    "MailFrom",
    "Quit",
    "RcptTo",
    "Reply",
    "Reset",
    "Respond",
    "Sentinel",
    "ServerConnection",
    "ServerSettings",
    "replies",
]
