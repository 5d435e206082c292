"""TLS for the server side: the :class:`ssl.SSLContext` that STARTTLS and the implicit-TLS
listeners hand to :class:`trio.SSLStream`, built from the ``[tls]`` certificate chain and key, and
replaced when those files change or on SIGHUP.

Theory of operation.  :func:`server_context` builds one context (TLS 1.2 at least; the default
ciphers of :func:`ssl.create_default_context`).  :class:`ServerTLS` holds the current one.  A new
connection asks :meth:`ServerTLS.current`, which at most every :data:`CHECK_INTERVAL` seconds
stats both files in a worker thread and, when either changed (mtime, size or inode: certbot and
friends replace files by renaming), loads them again.  SIGHUP calls :meth:`ServerTLS.reload`.
A session keeps the context it started with (an :class:`ssl.SSLObject` is bound to its context),
so a reload never disturbs an open connection.  A reload that fails -- a half-written file, a key
that does not match the new certificate yet -- keeps the old context and logs the error; the
next change or SIGHUP tries again.

Only this module and :mod:`katerchen.config` (which loads the files once to validate them) read
certificate files.  Blocking work (file reads, key parsing) runs in a worker thread.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Literal

import attrs
import trio

from katerchen import maillog

__all__ = [
    "CHECK_INTERVAL",
    "MINIMUM_VERSION",
    "CertificateError",
    "ServerTLS",
    "describe",
    "server_context",
]

#: The oldest protocol version offered: TLS 1.0 and 1.1 are deprecated (RFC 8996).
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
#: Seconds between two looks at the files' metadata (done on new connections only).
CHECK_INTERVAL = 5.0

_Which = Literal["certificate", "key"]
#: What identifies a version of a file: (device, inode, size, mtime in ns).
_Stamp = tuple[int, int, int, int]


class CertificateError(Exception):
    """The certificate chain or the key cannot be used.  ``which`` is ``"certificate"`` or
    ``"key"`` (the ``[tls]`` key to blame); ``message`` says what is wrong."""

    def __init__(self, message: str, *, which: _Which) -> None:
        super().__init__(message, which)
        self.message = message
        self.which: _Which = which

    def __str__(self) -> str:
        return f"{self.which}: {self.message}"


def _no_passphrase() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal for an encrypted key,
    # which would hang a server: an encrypted key simply fails to load instead.
    return b""


def server_context(certificate: Path, key: Path) -> ssl.SSLContext:
    """A server-side context for the PEM certificate chain *certificate* (leaf first) and the
    PEM private key *key* (which may also be in *certificate*).  Blocking: reads both files.

    Raises :class:`CertificateError` naming the file at fault: unreadable, no PEM certificate,
    or a key that is missing, encrypted or does not match the certificate.
    """
    files: tuple[tuple[Path, _Which], ...] = ((certificate, "certificate"), (key, "key"))
    for path, which in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CertificateError(f"{path} does not exist", which=which) from None
        except IsADirectoryError:
            raise CertificateError(f"{path} is a directory", which=which) from None
        except OSError as exc:
            raise CertificateError(
                f"cannot read {path}: {exc.strerror or exc}", which=which
            ) from None
        if which == "certificate":
            _check_certificates(path, data)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(certificate, key, password=_no_passphrase)
    except OSError as exc:  # ssl.SSLError is an OSError; so is a file that vanished just now
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            message = f"{key} does not match the certificate in {certificate}"
        else:
            message = f"{key}: no usable PEM private key (unencrypted) ({reason})"
        raise CertificateError(message, which="key") from None
    return context


def _check_certificates(path: Path, data: bytes) -> None:
    """Raise CertificateError unless *data* holds at least one PEM certificate."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, ssl.SSLError):
        raise CertificateError(f"{path} holds no PEM certificate", which="certificate") from None


def describe(stream: trio.SSLStream[trio.abc.Stream]) -> tuple[str, str]:
    """(version, cipher) of a stream whose handshake is done, e.g. ("TLSv1.3",
    "TLS_AES_256_GCM_SHA384"); ("unknown", "unknown") when the ssl module cannot say."""
    version = stream.version() or "unknown"
    cipher = stream.cipher()
    return version, cipher[0] if cipher else "unknown"


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _stamps(certificate: Path, key: Path) -> tuple[_Stamp | None, _Stamp | None]:
    return _stamp(certificate), _stamp(key)


def _load(
    certificate: Path, key: Path
) -> tuple[ssl.SSLContext | CertificateError, tuple[_Stamp | None, ...]]:
    """The new context (or why there is none) and the files' stamps.  The stamps are taken
    before the files are read: a change during the load then shows up at the next check instead
    of being missed, and a broken file is not retried until it changes."""
    stamps = _stamps(certificate, key)
    try:
        return server_context(certificate, key), stamps
    except CertificateError as exc:
        return exc, stamps


@attrs.define(eq=False)
class ServerTLS:
    """The current server context for one certificate/key pair, reloaded on change.

    Build it with :meth:`load`.  ``context`` is the context new connections get.
    """

    certificate: Path
    key: Path
    context: ssl.SSLContext
    _stamps: tuple[_Stamp | None, ...]
    _checked: float = attrs.field(default=float("-inf"))  # trio.current_time() of the last look
    _busy: bool = False  # a check or reload runs (others keep using the current context)
    _reloads: int = 0  # successful reloads, for tests and the log

    @classmethod
    def load(cls, certificate: Path, key: Path) -> ServerTLS:
        """Load the pair now (blocking).  Raises :class:`CertificateError`."""
        context, stamps = _load(certificate, key)
        if isinstance(context, CertificateError):
            raise context
        return cls(certificate, key, context, stamps)

    @property
    def reloads(self) -> int:
        """How many times a new context replaced the previous one."""
        return self._reloads

    async def current(self) -> ssl.SSLContext:
        """The context for a new connection.  Cheap: at most every :data:`CHECK_INTERVAL`
        seconds it looks at the files' metadata (in a worker thread) and reloads them when they
        changed.  Never raises for a bad file: the old context stays (the error is logged)."""
        now = trio.current_time()
        if not self._busy and now - self._checked >= CHECK_INTERVAL:
            self._checked = now
            self._busy = True
            try:
                stamps = await trio.to_thread.run_sync(_stamps, self.certificate, self.key)
                if stamps != self._stamps:
                    await self._reload("changed")
            finally:
                self._busy = False
        return self.context

    async def reload(self, reason: str = "sighup") -> bool:
        """Load the files again now (SIGHUP).  True when the new context is in place; False
        (logged) when loading failed and the old one stays."""
        self._busy = True
        try:
            return await self._reload(reason)
        finally:
            self._busy = False
            self._checked = trio.current_time()

    async def _reload(self, reason: str) -> bool:
        context, self._stamps = await trio.to_thread.run_sync(_load, self.certificate, self.key)
        if isinstance(context, CertificateError):
            maillog.error(
                "tls-reload-error",
                reason=reason,
                key=f"[tls] {context.which}",
                error=context.message,
            )
            return False
        self.context = context
        self._reloads += 1
        maillog.event("tls-reloaded", reason=reason, certificate=self.certificate)
        return True
