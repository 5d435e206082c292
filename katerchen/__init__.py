"""katerchen: a personal mail server. SMTP in, Maildir out, a durable relay queue.

The public API, for running katerchen inside another program or test suite::

    config = katerchen.Config.from_mapping({"server": {"listen": ["127.0.0.1:0"]}}, base_dir=d)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(katerchen.serve, config)   # a RunningServer
        host, port = server.addresses[0]
        ...
        server.shutdown()          # graceful; or cancel the nursery to stop at once

The names are imported on first use, so ``import katerchen`` stays cheap (the command line's
``check-config`` never loads the server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Envelope",
    "RunningServer",
    "__version__",
    "serve",
]

if TYPE_CHECKING:
    from katerchen.app import RunningServer
    from katerchen.app import run as serve
    from katerchen.config import Config, ConfigError
    from katerchen.envelope import Envelope

# public name -> (module, attribute)
_LAZY = {
    "Config": ("katerchen.config", "Config"),
    "ConfigError": ("katerchen.config", "ConfigError"),
    "Envelope": ("katerchen.envelope", "Envelope"),
    "RunningServer": ("katerchen.app", "RunningServer"),
    # The server: ``await nursery.start(katerchen.serve, config)`` (see katerchen.app.run).
    "serve": ("katerchen.app", "run"),
}


def __getattr__(name: str) -> object:
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'katerchen' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
