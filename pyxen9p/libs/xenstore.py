"""Bindings of ``libxenstore`` (``xenstore.h``): the XenStore client library.

:class:`XenStore` is one connection (``struct xs_handle``).  Paths are
``str`` (a relative path is relative to the caller's ``/local/domain/<id>``);
values are ``bytes`` and may contain NUL bytes.  Every malloc'd result of the
library is copied and then freed exactly once.

Transactions retry on ``EAGAIN``::

    for txn in store.transaction():
        with txn:
            txn.write("device/x/state", b"3")

Watches are objects: ``with store.watch("backend") as w: event = w.get(5)``.
Events of all watches of a connection arrive on one descriptor
(:meth:`XenStore.fileno`) and are dispatched to the right :class:`Watch` by
token, so several watches (and threads) can wait at once.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from ctypes import POINTER, c_bool, c_char_p, c_int, c_uint, c_ulong, c_void_p
from types import TracebackType
from typing import TypeVar

from typing_extensions import Self

from pyxen9p._shared import Watch, retry_transactions, run_transaction
from pyxen9p.errors import (
    HandleClosedError,
    TransactionConflictError,
    XenLibraryError,
    xen_error,
)
from pyxen9p.interfaces import Permission, PermissionFlag, WatchEvent
from pyxen9p.libs._ctypeslib import (
    CHandle,
    LibraryArg,
    LibrarySpec,
    Signature,
    check_false,
    check_null,
    check_zero,
    free,
)

__all__ = [
    "LIBRARY",
    "XBT_NULL",
    "XS_OPEN_READONLY",
    "XS_OPEN_SOCKETONLY",
    "XS_UNWATCH_FILTER",
    "Transaction",
    "Watch",
    "XenStore",
    "daemon_rundir",
    "daemon_socket",
    "daemon_socket_ro",
    "path_is_subpath",
    "suspend_evtchn_port",
]

XBT_NULL = 0
#: Deprecated and ignored by the library since about Xen 4.15.
XS_OPEN_READONLY = 1 << 0
#: Deprecated and ignored by the library since about Xen 4.15.
XS_OPEN_SOCKETONLY = 1 << 1
#: After ``xs_unwatch`` no stale events arrive for that token and path.
XS_UNWATCH_FILTER = 1 << 2
_XS_WATCH_PATH, _XS_WATCH_TOKEN = 0, 1


class _XsPermissions(ctypes.Structure):
    _fields_ = [("id", c_uint), ("perms", c_uint)]


_H = c_void_p  # struct xs_handle *
_T = ctypes.c_uint32  # xs_transaction_t
_UINTP = POINTER(c_uint)

LIBRARY = LibrarySpec(
    name="libxenstore",
    sonames=("libxenstore.so.4", "libxenstore.so.3.0"),
    env_var="PYXEN9P_LIBXENSTORE",
    package="libxenstore4",
    signatures={
        # connections
        "xs_open": Signature((c_ulong,), c_void_p, check_null),
        "xs_close": Signature((_H,), None),
        "xs_daemon_destroy_postfork": Signature((_H,), None),
        "xs_fileno": Signature((_H,), c_int, None),
        "xs_restrict": Signature((_H, c_uint), c_bool, check_false),
        # nodes
        "xs_directory": Signature((_H, _T, c_char_p, _UINTP), c_void_p, check_null),
        "xs_read": Signature((_H, _T, c_char_p, _UINTP), c_void_p, check_null),
        "xs_write": Signature((_H, _T, c_char_p, c_void_p, c_uint), c_bool, check_false),
        "xs_mkdir": Signature((_H, _T, c_char_p), c_bool, check_false),
        "xs_rm": Signature((_H, _T, c_char_p), c_bool, check_false),
        "xs_get_permissions": Signature((_H, _T, c_char_p, _UINTP), c_void_p, check_null),
        "xs_set_permissions": Signature(
            (_H, _T, c_char_p, POINTER(_XsPermissions), c_uint), c_bool, check_false
        ),
        # watches: check_watch's NULL is "nothing pending" when errno is EAGAIN
        "xs_watch": Signature((_H, c_char_p, c_char_p), c_bool, check_false),
        "xs_unwatch": Signature((_H, c_char_p, c_char_p), c_bool, check_false),
        "xs_check_watch": Signature((_H,), c_void_p, None),
        "xs_read_watch": Signature((_H, _UINTP), c_void_p, check_null),
        # transactions: end's false+EAGAIN is a conflict, sorted out by the caller
        "xs_transaction_start": Signature((_H,), _T, check_zero),
        "xs_transaction_end": Signature((_H, _T, c_bool), c_bool, None),
        # domains
        "xs_introduce_domain": Signature((_H, c_uint, c_ulong, c_uint), c_bool, check_false),
        "xs_set_target": Signature((_H, c_uint, c_uint), c_bool, check_false),
        "xs_resume_domain": Signature((_H, c_uint), c_bool, check_false),
        "xs_release_domain": Signature((_H, c_uint), c_bool, check_false),
        "xs_get_domain_path": Signature((_H, c_uint), c_void_p, check_null),
        "xs_is_domain_introduced": Signature((_H, c_uint), c_bool, None),
        "xs_suspend_evtchn_port": Signature((c_int,), c_int, None),
        # control
        "xs_control_command": Signature((_H, c_char_p, c_void_p, c_uint), c_void_p, check_null),
        "xs_debug_command": Signature((_H, c_char_p, c_void_p, c_uint), c_void_p, check_null),
        # helpers without a handle; they return static strings (not owned)
        "xs_path_is_subpath": Signature((c_char_p, c_char_p), c_bool, None),
        "xs_daemon_rundir": Signature((), c_char_p, None),
        "xs_daemon_socket": Signature((), c_char_p, None),
        "xs_daemon_socket_ro": Signature((), c_char_p, None),
    },
)


def _readable(fd: int) -> bool:
    """Whether *fd* is readable now (a poll that does not wait)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _path(path: str) -> bytes:
    if not isinstance(path, str):
        raise TypeError(f"XenStore paths are str, not {type(path).__name__}")
    raw = path.encode("utf-8")
    if b"\0" in raw or not raw:
        raise ValueError(f"invalid XenStore path {path!r}")
    return raw


def _value(value: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def _strings(vector: int, count: int) -> list[str]:
    """Decode ``count`` C strings from a ``char **`` (the caller frees it)."""
    array = ctypes.cast(vector, POINTER(c_char_p))
    return [(array[i] or b"").decode("utf-8", "surrogateescape") for i in range(count)]


def path_is_subpath(parent: str, child: str, *, library: LibraryArg = None) -> bool:
    """``xs_path_is_subpath``: whether *child* is *parent* or below it (string test)."""
    return bool(LIBRARY.load(library).xs_path_is_subpath(_path(parent), _path(child)))


def _static_string(name: str, library: LibraryArg) -> str:
    raw = getattr(LIBRARY.load(library), name)()
    return raw.decode() if raw else ""


def daemon_rundir(*, library: LibraryArg = None) -> str:
    """``xs_daemon_rundir``: the directory of xenstored's socket."""
    return _static_string("xs_daemon_rundir", library)


def daemon_socket(*, library: LibraryArg = None) -> str:
    """``xs_daemon_socket``: the path of xenstored's socket the library uses."""
    return _static_string("xs_daemon_socket", library)


def daemon_socket_ro(*, library: LibraryArg = None) -> str:
    """``xs_daemon_socket_ro``: the (deprecated) read-only socket path."""
    return _static_string("xs_daemon_socket_ro", library)


def suspend_evtchn_port(domid: int, *, library: LibraryArg = None) -> int:
    """``xs_suspend_evtchn_port``: a domain's suspend event channel, or -1."""
    return int(LIBRARY.load(library).xs_suspend_evtchn_port(domid))


_R = TypeVar("_R")


class _NodeOps:
    """Node operations parametrised by a transaction id (``XBT_NULL`` outside one)."""

    _store: XenStore

    def _txid(self) -> int:
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        """``xs_read``: the value of *path*.

        :raises FileNotFoundError: (a :class:`~pyxen9p.errors.XenLibraryError`)
            if the node does not exist
        """
        store = self._store
        length = c_uint()
        pointer = store._call(store._lib.xs_read, self._txid(), _path(path), ctypes.byref(length))
        try:
            return ctypes.string_at(pointer, length.value)
        finally:
            free(pointer)

    def exists(self, path: str) -> bool:
        """Whether *path* exists (a read that fails with ``ENOENT`` means no)."""
        try:
            self.read(path)
        except FileNotFoundError:
            return False
        return True

    def write(self, path: str, value: bytes | bytearray | memoryview | str) -> None:
        """``xs_write``: create or replace *path*; a ``str`` is UTF-8 encoded."""
        store = self._store
        data = _value(value)
        store._call(store._lib.xs_write, self._txid(), _path(path), data, len(data))

    def mkdir(self, path: str) -> None:
        """``xs_mkdir``: create *path* (with an empty value) if it is missing."""
        store = self._store
        store._call(store._lib.xs_mkdir, self._txid(), _path(path))

    def rm(self, path: str) -> None:
        """``xs_rm``: remove *path* and its subtree."""
        store = self._store
        store._call(store._lib.xs_rm, self._txid(), _path(path))

    def directory(self, path: str) -> list[str]:
        """``xs_directory``: the names of the children of *path*."""
        store = self._store
        count = c_uint()
        vector = store._call(
            store._lib.xs_directory, self._txid(), _path(path), ctypes.byref(count)
        )
        try:
            return _strings(vector, count.value)
        finally:
            free(vector)

    def get_permissions(self, path: str) -> list[Permission]:
        """``xs_get_permissions``: the access list of *path* (owner first)."""
        store = self._store
        count = c_uint()
        pointer = store._call(
            store._lib.xs_get_permissions, self._txid(), _path(path), ctypes.byref(count)
        )
        try:
            array = ctypes.cast(pointer, POINTER(_XsPermissions))
            return [
                Permission(int(array[i].id), PermissionFlag(array[i].perms & 3))
                for i in range(count.value)
            ]
        finally:
            free(pointer)

    def set_permissions(self, path: str, permissions: Sequence[Permission]) -> None:
        """``xs_set_permissions``: replace the access list of *path*."""
        if not permissions:
            raise ValueError("an access list needs at least the owner entry")
        array = (_XsPermissions * len(permissions))(
            *[_XsPermissions(p.domid, int(p.perms)) for p in permissions]
        )
        store = self._store
        store._call(
            store._lib.xs_set_permissions, self._txid(), _path(path), array, len(permissions)
        )


class Transaction(_NodeOps):
    """One attempt at a transaction (``xs_transaction_start`` at ``with``
    entry, ``xs_transaction_end`` at exit: commit, or abort if the body raised).

    Made by :meth:`XenStore.transaction` (which retries conflicts) or
    :meth:`XenStore.begin` (which raises
    :class:`~pyxen9p.errors.TransactionConflictError` on a conflict).
    """

    def __init__(self, store: XenStore, *, retrying: bool = False) -> None:
        self._store = store
        self._retrying = retrying
        self.id: int | None = None
        #: True once the transaction committed
        self.committed = False
        #: True if the commit failed with EAGAIN (the attempt must be repeated)
        self.conflicted = False

    def _txid(self) -> int:
        if self.id is None:
            raise RuntimeError("use the transaction inside its with block")
        return self.id

    def __enter__(self) -> Self:
        if self.id is not None or self.committed or self.conflicted:
            raise RuntimeError("a transaction attempt can be entered once")
        self.id = self._store.transaction_start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool:
        txid = self._txid()
        self.id = None
        if exc is not None:
            try:
                self._store.transaction_end(txid, abort=True)
            except XenLibraryError:
                pass  # the original exception matters more
            if self._retrying and isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
                self.conflicted = True
                return True
            return False
        try:
            self._store.transaction_end(txid)
        except TransactionConflictError:
            if not self._retrying:
                raise
            self.conflicted = True
            return False
        self.committed = True
        return False


class XenStore(CHandle, _NodeOps):
    """A connection to XenStore (``xs_open``).

    :param flags: ``xs_open`` flags (:data:`XS_UNWATCH_FILTER`; the others are
        ignored by current libraries)
    :param library: which ``libxenstore`` to use (see
        :meth:`~pyxen9p.libs._ctypeslib.LibrarySpec.load`)
    :raises FileNotFoundError: without a xenstored socket or ``/dev/xen/xenbus``
    """

    _token_counter = itertools.count(1)

    def __init__(self, flags: int = 0, *, library: LibraryArg = None) -> None:
        self._lib = LIBRARY.load(library)
        self._store = self
        self._adopt(self._lib.xs_open(flags))
        self._watches: dict[str, Watch] = {}
        self._queues: dict[str, deque[WatchEvent]] = {}
        self._events = threading.Condition()
        self._reading = False
        # one taker of watch events at a time: a poll that found the
        # descriptor readable then finds an event queued (xs_read_watch
        # must not block in C, where close could not wake it)
        self._takers = threading.Lock()

    def _txid(self) -> int:
        return XBT_NULL

    def _wake_callers(self) -> None:
        with self._events:
            self._events.notify_all()  # waiters on another thread's pump
        super()._wake_callers()

    def _release(self, pointer: int) -> None:
        with self._events:
            self._watches.clear()
            self._queues.clear()
            self._events.notify_all()
        if self.forked:
            self._lib.xs_daemon_destroy_postfork(pointer)
        else:
            self._lib.xs_close(pointer)

    def fileno(self) -> int:
        """``xs_fileno``: readable when watch events are waiting."""
        return self._call(self._xs_fileno)

    # --- transactions -------------------------------------------------------

    def transaction_start(self) -> int:
        """``xs_transaction_start``: a new transaction id (low level)."""
        return int(self._call(self._lib.xs_transaction_start))

    def transaction_end(self, txid: int, abort: bool = False) -> None:
        """``xs_transaction_end`` (low level).

        :raises TransactionConflictError: on ``EAGAIN``: retry the whole
            transaction
        """
        if not self._call(self._lib.xs_transaction_end, txid, abort):
            err = ctypes.get_errno() or errno.EIO
            if err == errno.EAGAIN:
                raise TransactionConflictError(err, "xs_transaction_end")
            raise xen_error(err, "xs_transaction_end")

    def begin(self) -> Transaction:
        """A single transaction attempt; a conflict raises
        :class:`~pyxen9p.errors.TransactionConflictError`."""
        return Transaction(self)

    def transaction(self, *, max_attempts: int = 32) -> Iterator[Transaction]:
        """Yield transaction attempts until one commits (see the module docs).

        A commit that fails with ``EAGAIN`` (or an ``EAGAIN`` raised by the
        body) aborts the attempt and yields a new one, after a short backoff.

        :raises TransactionConflictError: after *max_attempts* conflicts
        """
        yield from retry_transactions(
            lambda: Transaction(self, retrying=True), max_attempts, "xs_transaction_end"
        )

    def transact(self, body: Callable[[Transaction], _R], *, max_attempts: int = 32) -> _R:
        """Run ``body(txn)`` in a transaction, retrying on conflicts; return its result."""
        return run_transaction(self.transaction(max_attempts=max_attempts), body)

    # --- watches ------------------------------------------------------------

    def watch(self, path: str, token: str | None = None) -> Watch:
        """``xs_watch``: watch *path* (token generated if not given)."""
        if token is None:
            token = f"pyxen9p-{next(self._token_counter)}"
        raw_token = _path(token)
        with self._events:
            if token in self._watches:
                raise ValueError(f"token {token!r} is already used by a watch")
            watch = Watch(self, path, token)
            self._watches[token] = watch
            self._queues[token] = deque()
        try:
            self._call(self._lib.xs_watch, _path(path), raw_token)
        except BaseException:
            with self._events:
                self._watches.pop(token, None)
                self._queues.pop(token, None)
            raise
        return watch

    def _unwatch(self, watch: Watch) -> None:
        with self._events:
            if watch.closed:
                return
            watch.closed = True
            registered = self._watches.pop(watch.token, None) is watch
            self._queues.pop(watch.token, None)
            self._events.notify_all()
        if registered and not self.closed:
            try:
                self._call(self._lib.xs_unwatch, _path(watch.path), _path(watch.token))
            except HandleClosedError:
                pass  # closed meanwhile: closing the connection removes its watches

    def check_watch(self) -> WatchEvent | None:
        """``xs_check_watch``: one fired watch without blocking, or ``None``.

        Low level: this bypasses the per-watch queues of :meth:`Watch.get`.
        """
        with self._using() as handle, self._takers:
            return self._check_watch(handle)

    def _check_watch(self, handle: int) -> WatchEvent | None:
        vector = self._lib.xs_check_watch(handle)
        if not vector:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, 0):
                return None
            raise xen_error(err, "xs_check_watch")
        try:
            path, token = _strings(vector, 2)
        finally:
            free(vector)
        return WatchEvent(path, token)

    def read_watch(self) -> WatchEvent:
        """``xs_read_watch``: block until a watch fires (low level).

        The wait is a ``poll`` of :meth:`fileno` (``xs_read_watch`` is only
        called once an event is queued), so :meth:`close` on another thread
        ends it: it raises :class:`~pyxen9p.errors.HandleClosedError`.
        """
        with self._using() as handle:
            poller = self._poller(handle)
            fd = self._xs_fileno(handle)
            while True:
                poller.poll()
                if self._closing:
                    raise self._closed_error()
                with self._takers:
                    if not _readable(fd):
                        continue  # another thread took the event
                    count = c_uint()
                    vector = self._lib.xs_read_watch(handle, ctypes.byref(count))
                try:
                    if count.value < 2:
                        raise xen_error(errno.EPROTO, "xs_read_watch", "short watch event")
                    path, token = _strings(vector, 2)
                finally:
                    free(vector)
                return WatchEvent(path, token)

    def _xs_fileno(self, handle: int) -> int:
        fd = int(self._lib.xs_fileno(handle))
        if fd < 0:
            raise xen_error(ctypes.get_errno() or errno.EIO, "xs_fileno")
        return fd

    def _poller(self, handle: int) -> select.poll:
        """A poll of the watch descriptor and of the close wake-up."""
        poller = select.poll()
        poller.register(self._xs_fileno(handle), select.POLLIN)
        poller.register(self._wake_fd(), select.POLLIN)
        return poller

    def _next_event(self, watch: Watch, timeout: float | None) -> WatchEvent | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pumped = False
        with self._events:
            while True:
                queue = self._queues.get(watch.token)
                if watch.closed or queue is None or self.closed:
                    return None
                if queue:
                    return queue.popleft()
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if remaining == 0.0 and pumped:
                    return None
                if self._reading:  # another thread reads the descriptor for us
                    self._events.wait(remaining)
                    pumped = True
                    continue
                self._reading = True
                try:
                    self._events.release()
                    try:
                        self._pump(remaining)
                    except HandleClosedError:
                        pass  # closed meanwhile: the loop returns None
                    finally:
                        self._events.acquire()
                finally:
                    self._reading = False
                    self._events.notify_all()
                pumped = True

    def _pump(self, timeout: float | None) -> None:
        """Wait for the descriptor, then dispatch every pending event.

        The whole wait is one call on the handle: :meth:`close` wakes it
        (through the wake descriptor) and frees the handle after it left.
        """
        with self._using() as handle:
            poller = self._poller(handle)
            # wake up regularly so a closed watch is noticed
            wait = 0.2 if timeout is None else min(timeout, 0.2)
            if not poller.poll(max(wait, 0) * 1000) or self._closing:
                return
            while not self._closing:
                with self._takers:
                    event = self._check_watch(handle)
                if event is None:
                    return
                with self._events:
                    queue = self._queues.get(event.token)
                    if queue is not None:  # events of removed watches are dropped
                        queue.append(event)

    # --- domains and control ----------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        """``xs_get_domain_path``: ``/local/domain/<domid>``."""
        pointer = self._call(self._lib.xs_get_domain_path, domid)
        try:
            return ctypes.string_at(pointer).decode()
        finally:
            free(pointer)

    def introduce_domain(self, domid: int, mfn: int, eventchn: int) -> None:
        """``xs_introduce_domain`` (toolstack use)."""
        self._call(self._lib.xs_introduce_domain, domid, mfn, eventchn)

    def release_domain(self, domid: int) -> None:
        """``xs_release_domain`` (toolstack use)."""
        self._call(self._lib.xs_release_domain, domid)

    def resume_domain(self, domid: int) -> None:
        """``xs_resume_domain`` (toolstack use)."""
        self._call(self._lib.xs_resume_domain, domid)

    def set_target(self, domid: int, target: int) -> None:
        """``xs_set_target``: let *domid* manage *target* (toolstack use)."""
        self._call(self._lib.xs_set_target, domid, target)

    def is_domain_introduced(self, domid: int) -> bool:
        """``xs_is_domain_introduced``."""
        return bool(self._call(self._lib.xs_is_domain_introduced, domid))

    def restrict(self, domid: int) -> None:
        """``xs_restrict``: act with the rights of *domid* from now on."""
        self._call(self._lib.xs_restrict, domid)

    def control_command(self, command: str, data: bytes = b"") -> bytes:
        """``xs_control_command``: a xenstored control request; returns its answer."""
        pointer = self._call(
            self._lib.xs_control_command, command.encode(), data or None, len(data)
        )
        try:
            return ctypes.string_at(pointer)
        finally:
            free(pointer)

    def debug_command(self, command: str, data: bytes = b"") -> bytes:
        """``xs_debug_command`` (deprecated alias of :meth:`control_command`)."""
        pointer = self._call(self._lib.xs_debug_command, command.encode(), data or None, len(data))
        try:
            return ctypes.string_at(pointer)
        finally:
            free(pointer)

    def own_domid(self) -> int:
        """This domain's id, read from the relative node ``domid``."""
        return int(self.read("domid").decode("ascii"))
