"""Public helpers for projects that test their mail-sending code against a real katerchen in
pytest-trio suites: the ``katerchen_server`` fixture and what it is made of.

This module is a pytest plugin, registered under the ``pytest11`` entry point, so installing
katerchen makes the fixtures available to every test suite with nothing to import::

    async def test_signup_mail(katerchen_server):
        server = katerchen_server
        await trio.to_thread.run_sync(send_signup_mail, server.host, server.port)
        (message,) = await server.wait_for_messages(1)
        assert message.envelope.forward_paths == ("new.user@example.com",)
        assert message["Subject"] == "Welcome"

``katerchen_server`` is a full katerchen (receiver, spool, the same code as in production) on
127.0.0.1 with a port of its own, working in a temporary directory.  It is a *sink*: it accepts
every recipient at every domain (``[delivery] sink``) and delivers nothing -- no delivery task
runs, so every message stays in the spool exactly as it was accepted, with its SMTP envelope, and
nothing is ever relayed anywhere.  :meth:`KaterchenServer.messages` reads them back.

To change the server, override the ``katerchen_config`` fixture (return any
:class:`katerchen.Config`, e.g. :func:`sink_config` with overrides), or parametrize the fixture
indirectly with a Config or a mapping of overrides::

    @pytest.mark.parametrize(
        "katerchen_server", [{"limits": {"max_message_size": 10_000}}], indirect=True
    )
    async def test_large_mail_is_refused(katerchen_server): ...

A config without ``[delivery] sink`` accepts only what its domains tree routes, like any
katerchen.  Everything here is importable without pytest-trio; the fixture needs it (and
``trio_mode = true`` or ``@pytest.mark.trio`` on the test).
"""

from __future__ import annotations

import email.parser
import email.policy
import os
from collections.abc import AsyncIterator, Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import pytest

from katerchen.spool import is_queue_id

if TYPE_CHECKING:
    import trio

    from katerchen.app import RunningServer
    from katerchen.config import Config
    from katerchen.envelope import Envelope

__all__ = [
    "SINK_ADDRESS",
    "SINK_HOSTNAME",
    "KaterchenServer",
    "Message",
    "katerchen_config",
    "katerchen_server",
    "read_message",
    "sink_config",
    "sink_mapping",
]

#: The server's own name, and the mailbox a sink delivers to when delivery runs.  Both are in
#: the ``.test`` top-level domain (RFC 2606), which never exists on the Internet.
SINK_HOSTNAME: Final = "mx.katerchen.test"
SINK_ADDRESS: Final = "sink@katerchen.test"

#: How long the fixture's teardown waits for the server to stop before it fails the test.
STOP_TIMEOUT: Final = 10.0
#: How often :meth:`KaterchenServer.wait_for_messages` looks at the spool.
POLL_INTERVAL: Final = 0.01


def sink_mapping() -> dict[str, dict[str, object]]:
    """The sink's config, shaped like the TOML file (a new dict each time): listening on
    127.0.0.1 port 0, paths relative to its base directory, ``[delivery] sink`` set."""
    return {
        "server": {
            "hostname": SINK_HOSTNAME,
            "listen": ["127.0.0.1:0"],
            # Tests end with clients gone; a slow one must not hold the teardown for long.
            "shutdown_grace": 1,
        },
        "directories": {
            "incoming": "spool/incoming",
            "received": "spool/received",
            "relay": "spool/relay",
            "hold": "spool/hold",
            "domains": "domains",
        },
        "delivery": {"sink": SINK_ADDRESS},
    }


def sink_config(
    base_dir: Path, overrides: Mapping[str, Mapping[str, object]] | None = None
) -> Config:
    """The sink's config rooted at *base_dir*, with *overrides* merged in table by table
    (``{"limits": {"max_recipients": 2}}`` changes that one key).  Creates *base_dir* and the
    sink's domain directory.  Raises :class:`katerchen.ConfigError`."""
    from katerchen.config import Config, ConfigError

    data = sink_mapping()
    for table, values in (overrides or {}).items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"expected a table, got {type(values).__name__}", key=f"[{table}]")
        data.setdefault(table, {}).update(values)
    config = Config.from_mapping(data, base_dir=base_dir)
    config.directories.domains.mkdir(parents=True, exist_ok=True)
    if config.delivery.sink:
        domain = config.delivery.sink.rpartition("@")[2].lower()
        (config.directories.domains / domain).mkdir(exist_ok=True)
    return config


class Message(EmailMessage):
    """A message as katerchen accepted it: an :class:`email.message.EmailMessage` (parsed with
    ``email.policy.default``; the first header is katerchen's ``Received:``) with

    - ``envelope``: its :class:`katerchen.Envelope` -- ``reverse_path`` (``""`` for ``<>``),
      ``forward_paths`` (every recipient, as the client gave them, Bcc included), ``queue_id``,
      ``arrival``, ``client``, ``helo``, ``body``, ``smtputf8``, ``auth``;
    - ``raw``: the bytes it was parsed from, exactly: katerchen's Received header, then the
      message as the client sent it (after dot-unstuffing), with CRLF line endings.  (The
      parse itself reads them with the ``"\n"`` line endings of Python's email package, so
      ``get_content()`` gives ``"text\n"``.)

    Only the message itself has these, not its MIME parts.
    """

    envelope: Envelope
    raw: bytes


_PARSER: Final = email.parser.BytesParser(Message, policy=email.policy.default)


def read_message(path: Path) -> Message:
    """Read one spool file (envelope pre-header, then the message) as a :class:`Message`.
    Raises OSError, and :class:`katerchen.envelope.EnvelopeError` for a file that is not one."""
    from katerchen.envelope import Envelope

    data = path.read_bytes()
    envelope, offset = Envelope.decode(data)
    raw = data[offset:]
    # Python's email package works in "\n" line endings (policy.default.linesep): with the
    # SMTP CRLFs left in, every get_content() would end in "\r\n".  raw keeps them.
    message = _PARSER.parsebytes(raw.replace(b"\r\n", b"\n"))
    assert isinstance(message, Message)  # the parser's class
    message.envelope = envelope
    message.raw = raw
    return message


@attrs.define(eq=False)
class KaterchenServer:
    """A katerchen running in a test's nursery (what the ``katerchen_server`` fixture gives).

    ``host`` and ``port`` are where it listens (the first ``[server] listen`` address),
    ``addresses`` every bound (host, port), ``config`` its :class:`katerchen.Config` and
    ``running`` the :class:`katerchen.RunningServer` handle.
    """

    config: Config
    running: RunningServer
    _stopped: trio.Event = attrs.field(repr=False)

    @classmethod
    async def start(cls, nursery: trio.Nursery, config: Config) -> KaterchenServer:
        """Start a server for *config* in *nursery*, without delivery (messages stay in the
        spool as they were accepted), and return once it listens.  Raises OSError (cannot
        bind, cannot create the spool)."""
        import trio

        from katerchen.app import run

        stopped = trio.Event()

        async def serve(*, task_status: trio.TaskStatus[RunningServer]) -> None:
            try:
                await run(config, deliver=False, task_status=task_status)
            finally:
                stopped.set()

        running: RunningServer = await nursery.start(serve)
        return cls(config, running, stopped)

    @property
    def host(self) -> str:
        return self.running.addresses[0][0]

    @property
    def port(self) -> int:
        return self.running.addresses[0][1]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.running.addresses

    def _paths(self) -> list[Path]:
        directory = self.config.directories.received
        with os.scandir(directory) as entries:
            names = [
                e.name for e in entries if is_queue_id(e.name) and e.is_file(follow_symlinks=False)
            ]
        return [directory / name for name in sorted(names)]

    def messages(self) -> list[Message]:
        """Every message the server has accepted (answered 250 to) so far, oldest first (queue
        ids sort by arrival).  Each is in the spool before its 250 is sent, so a client that got
        its reply finds its message here at once."""
        return [read_message(path) for path in self._paths()]

    async def wait_for_messages(self, count: int = 1) -> list[Message]:
        """Wait until at least *count* messages have been accepted; return :meth:`messages`.

        Mail sent from another task or thread arrives when it arrives; this waits for it
        without a fixed sleep (it looks at the spool every few milliseconds).  It waits for as
        long as it takes: bound it with ``trio.fail_after``, as for any wait in trio.
        """
        import trio

        while len(self._paths()) < count:
            await trio.sleep(POLL_INTERVAL)
        return self.messages()

    async def stop(self) -> None:
        """Shut the server down gracefully (as SIGTERM does) and wait until it has stopped."""
        self.running.shutdown()
        await self._stopped.wait()


# --- the fixtures --------------------------------------------------------------------------------


@pytest.fixture
def katerchen_config(tmp_path: Path) -> Config:
    """The config ``katerchen_server`` runs: :func:`sink_config` in ``tmp_path / "katerchen"``.
    Override this fixture to run another config."""
    return sink_config(tmp_path / "katerchen")


@pytest.fixture
async def katerchen_server(
    request: pytest.FixtureRequest,
    nursery: trio.Nursery,
    katerchen_config: Config,
    tmp_path: Path,
) -> AsyncIterator[KaterchenServer]:
    """A running katerchen sink on 127.0.0.1 (see the module docstring): a
    :class:`KaterchenServer`.  Indirect parametrization may give a :class:`katerchen.Config`,
    or a mapping of overrides for :func:`sink_config`.  Stopped gracefully when the test ends."""
    import trio

    from katerchen.config import Config

    config = katerchen_config
    param = getattr(request, "param", None)
    if isinstance(param, Config):
        config = param
    elif isinstance(param, Mapping):
        config = sink_config(tmp_path / "katerchen-param", param)
    elif param is not None:
        raise TypeError(
            f"katerchen_server: indirect parameter must be a katerchen.Config or a mapping, "
            f"got {type(param).__name__}"
        )
    server = await KaterchenServer.start(nursery, config)
    yield server
    with trio.fail_after(STOP_TIMEOUT):
        await server.stop()
