"""The interfaces shared by the real Xen bindings and the simulated Xen.

The transport (:mod:`pyxen9p.frontend`) is written against these protocols
only.  :mod:`pyxen9p.libs` implements them over the real C libraries;
:mod:`pyxen9p.sim` implements them in pure Python.  A :class:`XenPlatform`
hands out the four kinds of handle for one domain.

Conventions shared by every implementation:

* XenStore paths are ``str``; a relative path is relative to the caller's own
  domain path (``/local/domain/<domid>``), as in libxenstore.  Values are
  ``bytes`` (they may contain NUL bytes); writers also accept ``str``, encoded
  as UTF-8.
* Failures raise :class:`OSError` subclasses carrying ``errno`` (for the real
  libraries, :class:`pyxen9p.errors.XenLibraryError`); a missing node raises
  :class:`FileNotFoundError`.
* Every handle and every shared/mapped region has an idempotent ``close()``
  and is a context manager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntFlag
from types import TracebackType
from typing import NamedTuple, Protocol, runtime_checkable

from typing_extensions import Self

__all__ = [
    "EventChannelLike",
    "GrantSharerLike",
    "Permission",
    "PermissionFlag",
    "RawEventCalls",
    "SharedPagesLike",
    "TransactionLike",
    "WatchEvent",
    "WatchLike",
    "XenPlatform",
    "XenStoreLike",
    "XenStoreOps",
]


class PermissionFlag(IntFlag):
    """XenStore access rights (``XS_PERM_*`` in ``xenstore_lib.h``)."""

    NONE = 0
    READ = 1
    WRITE = 2


@dataclass(frozen=True)
class Permission:
    """One entry of a node's access list (``struct xs_permissions``).

    The first entry of a list names the owner and gives the rights of every
    domain not listed; later entries grant rights to one domain each.
    """

    domid: int
    perms: PermissionFlag


@dataclass(frozen=True)
class WatchEvent:
    """A fired watch: the *path* that changed and the watch's *token*."""

    path: str
    token: str


class XenStoreOps(Protocol):
    """Node operations, available on a store and inside a transaction."""

    def read(self, path: str) -> bytes:
        """Return the value of *path*; :class:`FileNotFoundError` if missing."""
        ...

    def write(self, path: str, value: bytes | str) -> None:
        """Create or replace *path* with *value* (parents are created)."""
        ...

    def mkdir(self, path: str) -> None:
        """Create *path* with an empty value if it does not exist."""
        ...

    def rm(self, path: str) -> None:
        """Remove *path* and everything below it."""
        ...

    def directory(self, path: str) -> list[str]:
        """Return the names of the children of *path*."""
        ...

    def get_permissions(self, path: str) -> list[Permission]:
        """Return the access list of *path*."""
        ...

    def set_permissions(self, path: str, permissions: Sequence[Permission]) -> None:
        """Replace the access list of *path*."""
        ...


class TransactionLike(XenStoreOps, Protocol):
    """One attempt at a XenStore transaction, committed when its ``with`` ends."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool | None: ...


class WatchLike(Protocol):
    """A registered watch.  It fires once when registered, then on changes at
    or below its path; it may also fire spuriously."""

    path: str
    token: str

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """Wait up to *timeout* seconds (forever if ``None``) for the next
        event of this watch; ``None`` on timeout."""
        ...

    def __iter__(self) -> Iterator[WatchEvent]: ...

    def close(self) -> None:
        """Unregister the watch (idempotent)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class XenStoreLike(XenStoreOps, Protocol):
    """A XenStore connection (``struct xs_handle``)."""

    def transaction(self, *, max_attempts: int = ...) -> Iterator[TransactionLike]:
        """Yield transaction attempts until one commits.

        Use it as::

            for txn in store.transaction():
                with txn:
                    txn.write("a", b"1")

        A conflicting commit (``EAGAIN``) makes the loop run the body again.
        """
        ...

    def watch(self, path: str, token: str | None = None) -> WatchLike:
        """Register a watch on *path*."""
        ...

    def get_domain_path(self, domid: int) -> str:
        """Return ``/local/domain/<domid>`` as the store names it."""
        ...

    def fileno(self) -> int:
        """A file descriptor that becomes readable when a watch fires."""
        ...

    def close(self) -> None:
        """Release everything the object holds (idempotent)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class SharedPagesLike(Protocol):
    """Pages of this domain granted to another domain (``xengntshr_share_pages``).

    ``buffer`` is one contiguous writable view of all pages; it is released
    when the pages are unshared by ``close()``.
    """

    @property
    def refs(self) -> tuple[int, ...]:
        """The grant reference of each page, in order."""
        ...

    @property
    def buffer(self) -> memoryview:
        """One contiguous writable view of all the pages."""
        ...

    def close(self) -> None:
        """Release everything the object holds (idempotent)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class GrantSharerLike(Protocol):
    """A grant-sharing handle (``xengntshr_handle``)."""

    def share_pages(self, domid: int, count: int, *, writable: bool = True) -> SharedPagesLike:
        """Share *count* fresh zeroed pages with *domid*."""
        ...

    def close(self) -> None:
        """Release everything the object holds (idempotent)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class RawEventCalls(NamedTuple):
    """An event channel's per-event calls, bare (see ``raw_calls`` of
    :class:`EventChannelLike`): each returns the C function's result, a
    negative one meaning it failed, and ``error(name)`` then gives the
    :class:`OSError` of that failure (from ``errno``).  They may also raise
    (the simulated Xen's do, as its methods).

    No call is counted against a close and nothing is checked: only for a
    caller that keeps the handle open while it uses them (the frontend
    holding its receiving role and every ring's send lock, which its
    teardown waits for), that is the only one calling ``pending`` meanwhile,
    and that checks every result.
    """

    #: ``pending()``: the next pending port, masked (blocks while none is)
    pending: Callable[[], int]
    #: ``unmask(port)``
    unmask: Callable[[int], int]
    #: ``notify(port)``
    notify: Callable[[int], int]
    #: ``error(name)``: the :class:`OSError` of the failed call *name*
    error: Callable[[str], OSError]


class EventChannelLike(Protocol):
    """An event-channel handle (``xenevtchn_handle``)."""

    def fileno(self) -> int:
        """A file descriptor that becomes readable when a port is pending."""
        ...

    def bind_unbound_port(self, domid: int) -> int:
        """Allocate a local port that *domid* may bind to; return it."""
        ...

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to *remote_port* of *domid*; return the local port."""
        ...

    def notify(self, port: int) -> None:
        """Signal the peer of the local *port*."""
        ...

    def pending(self) -> int:
        """Return the next pending local port (it is then masked).

        Blocks if nothing is pending: poll :meth:`fileno` first."""
        ...

    def unmask(self, port: int) -> None:
        """Re-enable delivery on *port* after :meth:`pending` returned it."""
        ...

    def unbind(self, port: int) -> None:
        """Release the local *port*."""
        ...

    def raw_calls(self) -> RawEventCalls:
        """:meth:`pending`, :meth:`unmask` and :meth:`notify` without their
        Python layers, for a caller that handles an event per message (see
        :class:`RawEventCalls` for what it must guarantee)."""
        ...

    def close(self) -> None:
        """Release everything the object holds (idempotent)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class XenPlatform(Protocol):
    """Where a domain's Xen objects come from.

    :class:`pyxen9p.libs.RealXen` opens the real C libraries;
    :mod:`pyxen9p.sim` provides simulated domains with the same interface.
    """

    def open_xenstore(self) -> XenStoreLike:
        """Open a XenStore connection."""
        ...

    def open_grant_sharer(self) -> GrantSharerLike:
        """Open a grant-sharing handle."""
        ...

    def open_event_channel(self) -> EventChannelLike:
        """Open an event-channel handle."""
        ...
