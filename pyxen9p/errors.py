"""Exceptions raised by pyxen9p.

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

__all__ = [
    "BackendError",
    "HandleClosedError",
    "LibraryNotFoundError",
    "RingProtocolError",
    "TransactionConflictError",
    "TransportClosedError",
    "TransportError",
    "XenLibraryError",
    "xen_error",
]


class LibraryNotFoundError(OSError):
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


class HandleClosedError(ValueError):
    """A handle (or a mapping) was used after ``close()``."""


class XenLibraryError(OSError):
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


class TransportError(ConnectionError):
    """The 9pfs transport failed: the device is gone, closed or broken."""


class TransportClosedError(TransportError):
    """The transport was closed, or the backend left the Connected state."""


class BackendError(TransportError):
    """The backend broke the protocol (bad XenStore values, states or ring data)."""


class RingProtocolError(BackendError):
    """Shared-ring contents violate the protocol (indices, sizes, tags, types)."""
