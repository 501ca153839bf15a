"""Exceptions raised by pyxen9p.

Every exception class pyxen9p defines derives from :class:`Pyxen9pError`
(also exported as ``pyxen9p.Pyxen9pError``), and also from the builtin
exception a caller would expect: those that carry an ``errno`` are
:class:`OSError` subclasses.  The same failure raises the same class on
every transport (the Xen frontend and a stream socket alike); the user
guide's table of errors lists them all.

Failures of the Xen C libraries become :class:`XenLibraryError`, an
:class:`OSError` that keeps ``errno`` and names the C function.  Where Python
has a dedicated :class:`OSError` subclass for the errno (``ENOENT`` ->
:class:`FileNotFoundError`, ``EACCES`` -> :class:`PermissionError`, ...), the
raised exception is *also* an instance of that subclass, so both
``except XenLibraryError`` and ``except FileNotFoundError`` work.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import ClassVar

__all__ = [
    "BackendError",
    "FramingError",
    "HandleClosedError",
    "LibraryNotFoundError",
    "ProtocolError",
    "Pyxen9pError",
    "RingProtocolError",
    "TransactionConflictError",
    "TransportClosedError",
    "TransportError",
    "XenLibraryError",
    "xen_error",
]


class Pyxen9pError(Exception):
    """The base class of every exception pyxen9p defines.

    ``except Pyxen9pError`` catches the library's own errors and nothing
    else: errors the 9P server reports (an Rlerror) stay plain :class:`OSError`
    subclasses such as :class:`FileNotFoundError`, as :mod:`os` raises them,
    and so do timeouts (:class:`TimeoutError`).

    :cvar default_errno: for the :class:`OSError` subclasses, the ``errno``
        given when the exception is built from a message alone (``None``:
        no default)
    """

    default_errno: ClassVar[int | None] = None

    def __init__(self, *args: object) -> None:
        if self.default_errno is not None and len(args) == 1 and isinstance(self, OSError):
            args = (self.default_errno, args[0])
        super().__init__(*args)


class LibraryNotFoundError(Pyxen9pError, OSError):
    """A Xen C library could not be loaded.

    The message names the shared object that was tried and the Debian package
    that provides it.
    """

    def __init__(self, soname: str, package: str, detail: str) -> None:
        super().__init__(
            _errno.ENOENT,
            f"cannot load {soname}: {detail} (install the Debian package {package!r}"
            f" or set the override variable)",
        )
        self.soname = soname
        self.package = package


class HandleClosedError(Pyxen9pError, ValueError):
    """A handle (or a mapping) was used after ``close()``.

    A :class:`ValueError`, as for a closed Python file object.
    """


class XenLibraryError(Pyxen9pError, OSError):
    """A call into a Xen C library failed.

    :ivar errno: the C ``errno``
    :ivar function: the name of the failing C function, e.g. ``"xs_read"``
    """

    function: str

    def __init__(self, err: int, function: str, detail: str | None = None) -> None:
        message = f"{function}: {os.strerror(err) if err else 'failed without setting errno'}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(err, message)
        self.function = function

    def __reduce__(self) -> tuple[object, ...]:
        return (xen_error, (self.errno, self.function))


class TransactionConflictError(XenLibraryError, BlockingIOError):
    """``xs_transaction_end`` failed with ``EAGAIN``: the transaction must be retried."""


# errno -> builtin OSError subclass, as OSError itself maps them.
_BUILTIN: dict[int, type[OSError]] = {}
for _cls in (
    BlockingIOError,
    ChildProcessError,
    ConnectionAbortedError,
    ConnectionRefusedError,
    ConnectionResetError,
    BrokenPipeError,
    FileExistsError,
    FileNotFoundError,
    InterruptedError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ProcessLookupError,
    TimeoutError,
):
    for _e in range(1, 200):
        if type(OSError(_e, "")) is _cls:
            _BUILTIN.setdefault(_e, _cls)

_COMBINED: dict[type[OSError], type[XenLibraryError]] = {}


def _combined(builtin: type[OSError]) -> type[XenLibraryError]:
    cls = _COMBINED.get(builtin)
    if cls is None:
        cls = type(
            f"Xen{builtin.__name__}",
            (XenLibraryError, builtin),
            {"__module__": __name__, "__doc__": f"A {builtin.__name__} from a Xen C library."},
        )
        _COMBINED[builtin] = cls
    return cls


def xen_error(err: int, function: str, detail: str | None = None) -> XenLibraryError:
    """Build the exception for a failed C call: errno *err* in *function*."""
    builtin = _BUILTIN.get(err)
    cls = _combined(builtin) if builtin is not None else XenLibraryError
    return cls(err, function, detail)


class ProtocolError(Pyxen9pError, OSError, ValueError):
    """Malformed 9P data: a reply that breaks the protocol, or a message that
    cannot be put on the wire.

    Raised for any malformed input by :func:`~pyxen9p.p9.codec.decode`,
    :func:`~pyxen9p.p9.codec.peek_header` and
    :func:`~pyxen9p.p9.codec.parse_dirents`, for fields that do not fit the
    wire format by :func:`~pyxen9p.p9.codec.encode` and
    :func:`~pyxen9p.p9.codec.pack_dirents`, and by every transport and the
    client for a reply of the wrong type, a reply that does not fit the
    msize, or an error reply with an impossible error number.  The request
    it answers failed; the connection itself is still usable (unless the
    exception is also a :class:`TransportError`, as :class:`FramingError` is).

    An :class:`OSError` with ``errno`` ``EPROTO`` (unless given another),
    and a :class:`ValueError` as it always was (as
    :class:`io.UnsupportedOperation` is both).  Also importable as
    ``pyxen9p.p9.codec.ProtocolError``.
    """

    default_errno = _errno.EPROTO


class TransportError(Pyxen9pError, ConnectionError):
    """The 9pfs transport failed: the device is gone, closed or broken.

    Every request waiting on the transport, and every later one, gets it.
    """


class TransportClosedError(TransportError):
    """The transport was closed, or the backend left the Connected state."""


class FramingError(TransportError, ProtocolError):
    """The peer sent a malformed message frame: a 9P ``size`` field below 7
    (``errno`` ``EPROTO``) or above the transport's msize (``EMSGSIZE``),
    on a stream or on a Xen ring alike.

    It is both a :class:`TransportError` (a :class:`ConnectionError`: the
    byte stream cannot be resynchronised, so the transport has failed) and a
    :class:`ProtocolError`.  Also importable as
    ``pyxen9p.p9.transport.FramingError``.
    """


class BackendError(TransportError):
    """The Xen backend broke the protocol (bad XenStore values, states or ring data).

    ``errno`` is ``EPROTO`` unless given another.
    """

    default_errno = _errno.EPROTO


class RingProtocolError(BackendError):
    """Shared-ring contents violate the Xen ring protocol (indices out of range).

    9P-level failures that a ring carries are not ring errors: a malformed
    frame is a :class:`FramingError`, a reply of the wrong type a
    :class:`ProtocolError`, as on any transport.
    """
