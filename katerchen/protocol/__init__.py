"""Sans-IO SMTP: the server side (``ServerConnection``), its events and its replies, and the
client side (``ClientConnection``) the relayer drives.

Nothing in this package does I/O or reads a clock; a test imports it in a subprocess and checks
that trio, socket, ssl, selectors and asyncio stay unimported.
"""

from katerchen.protocol import replies
from katerchen.protocol.client import (
    Authenticated,
    ClientConnection,
    ClientEvent,
    Closed,
    Extensions,
    Ready,
    Refused,
    TlsReady,
    Transaction,
    TransactionResult,
)
from katerchen.protocol.replies import Reply
from katerchen.protocol.server import (
    AUTH_MECHANISMS,
    NEED_DATA,
    PAUSED,
    AuthChallenge,
    AuthRequest,
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
    StartTLS,
    received_with,
)

__all__ = [
    "AUTH_MECHANISMS",
    "NEED_DATA",
    "PAUSED",
    "AuthChallenge",
    "AuthRequest",
    "Authenticated",
    "ChunkEnd",
    "ClientConnection",
    "ClientEvent",
    "Closed",
    "ConnectionClosed",
    "DataChunk",
    "DataEnd",
    "DataStart",
    "Event",
    "Extensions",
    "Hello",
    "LocalProtocolError",
    "MailFrom",
    "Quit",
    "RcptTo",
    "Ready",
    "Refused",
    "Reply",
    "Reset",
    "Respond",
    "Sentinel",
    "ServerConnection",
    "ServerSettings",
    "StartTLS",
    "TlsReady",
    "Transaction",
    "TransactionResult",
    "received_with",
    "replies",
]
