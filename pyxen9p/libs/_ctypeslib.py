"""Shared ctypes machinery: declarative signatures, lazy loading, error checks, handles.

Each binding module declares a :class:`LibrarySpec`: the SONAMEs to try, the
override environment variable, the Debian package, and a table mapping every
bound C function to a :class:`Signature` (argument types, return type and the
function's error convention).  :meth:`LibrarySpec.load` opens the library on
first use and returns a :class:`BoundLibrary` whose attributes are the C
functions with their types and error checks installed.

Error conventions (one ``errcheck`` each):

* :func:`check_null`: a NULL pointer means failure, ``errno`` says why;
* :func:`check_minus_one`: ``-1`` (any negative value) means failure;
* :func:`check_false`: a false ``bool`` means failure;
* :func:`check_zero`: ``0`` means failure (``xs_transaction_start``);
* ``None``: the function cannot fail, or its caller interprets the result.

Every call clears ``errno`` first, so a failure that does not set it is
reported as ``EIO`` rather than with a stale value.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from typing_extensions import Self

from pyxen9p.errors import HandleClosedError, LibraryNotFoundError, xen_error

__all__ = [
    "BoundLibrary",
    "CHandle",
    "LibraryArg",
    "LibrarySpec",
    "SharedMemoryView",
    "Signature",
    "check_false",
    "check_minus_one",
    "check_null",
    "check_zero",
    "free",
]

#: What may be passed as ``library=``: ``None`` (environment variable, then
#: the SONAMEs), a path, or an already loaded :class:`ctypes.CDLL`.
LibraryArg: TypeAlias = "str | os.PathLike[str] | ctypes.CDLL | None"

ErrCheck = Callable[[Any, Any, tuple[Any, ...]], Any]
_T = TypeVar("_T")

log = logging.getLogger(__name__)


def _raise_errno(func: Any, detail: str | None = None) -> None:
    err = ctypes.get_errno()
    if err == 0:
        err = 5  # EIO: the library reported failure without errno
        detail = detail or "the C function reported failure without setting errno"
    raise xen_error(err, str(getattr(func, "__name__", func)), detail)


def check_null(result: Any, func: Any, args: tuple[Any, ...]) -> Any:
    """errcheck: a NULL (``None`` or ``0``) result is a failure."""
    if not result:
        _raise_errno(func)
    return result


def check_minus_one(result: Any, func: Any, args: tuple[Any, ...]) -> Any:
    """errcheck: a negative integer result is a failure."""
    if result < 0:
        _raise_errno(func)
    return result


def check_false(result: Any, func: Any, args: tuple[Any, ...]) -> Any:
    """errcheck: a false ``bool`` result is a failure."""
    if not result:
        _raise_errno(func)
    return result


def check_zero(result: Any, func: Any, args: tuple[Any, ...]) -> Any:
    """errcheck: a zero result is a failure."""
    if result == 0:
        _raise_errno(func)
    return result


@dataclass(frozen=True)
class Signature:
    """The C prototype of one function and its error convention."""

    argtypes: tuple[Any, ...]
    restype: Any
    errcheck: ErrCheck | None = None


_libc = ctypes.CDLL(None)
_libc_free = _libc.free
_libc_free.argtypes = [ctypes.c_void_p]
_libc_free.restype = None


def free(pointer: int | None) -> None:
    """``free()`` memory that a Xen library returned (``NULL`` is allowed)."""
    _libc_free(pointer)


class _Missing:
    """Stands in for a function this library version does not export."""

    def __init__(self, name: str, soname: str) -> None:
        self.__name__ = name
        self._soname = soname

    def __call__(self, *args: Any) -> Any:
        raise xen_error(38, self.__name__, f"not exported by {self._soname}")  # ENOSYS


class BoundLibrary:
    """A loaded library whose attributes are its typed, error-checked C functions."""

    def __init__(self, spec: LibrarySpec, cdll: ctypes.CDLL) -> None:
        self.spec = spec
        self.cdll = cdll
        self.name = str(getattr(cdll, "_name", spec.sonames[0]))
        self.missing: list[str] = []
        for fname, sig in spec.signatures.items():
            try:
                fn = cdll[fname]  # __getitem__ makes a private function object
            except AttributeError:
                self.missing.append(fname)
                setattr(self, fname, _Missing(fname, self.name))
                continue
            fn.argtypes = list(sig.argtypes)
            fn.restype = sig.restype
            if sig.errcheck is not None:
                fn.errcheck = sig.errcheck
            setattr(self, fname, _errno_cleared(fn))

    def __getattr__(self, name: str) -> Any:  # only reached for unknown names
        raise AttributeError(f"{self.spec.name} has no bound function {name!r}")


def _errno_cleared(fn: Any) -> Callable[..., Any]:
    set_errno = ctypes.set_errno

    def call(*args: Any) -> Any:
        set_errno(0)
        return fn(*args)

    call.__name__ = fn.__name__
    call.__doc__ = f"The C function ``{fn.__name__}``."
    return call


@dataclass
class LibrarySpec:
    """How to find, load and type one Xen C library.

    :ivar name: the library's name, e.g. ``"libxengnttab"``
    :ivar sonames: the exact SONAMEs to try, in order
    :ivar env_var: environment variable overriding the path
    :ivar package: the Debian package that ships the library
    :ivar signatures: the C function table
    """

    name: str
    sonames: tuple[str, ...]
    env_var: str
    package: str
    signatures: Mapping[str, Signature]
    _default: BoundLibrary | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self, library: str | os.PathLike[str] | ctypes.CDLL | None = None) -> BoundLibrary:
        """Return the bound library, loading it if needed.

        :param library: ``None`` loads (once, then cached) the path in
            :attr:`env_var` if set, else the first loadable SONAME; a path loads
            that file; a :class:`ctypes.CDLL` is used as it is (re-wrapped so
            that ``errno`` is captured)
        :raises LibraryNotFoundError: if the library cannot be loaded
        """
        if isinstance(library, ctypes.CDLL):
            handle = library._handle
            return BoundLibrary(
                self, ctypes.CDLL(getattr(library, "_name", None), handle=handle, use_errno=True)
            )
        if library is not None:
            return BoundLibrary(self, self._open((os.fspath(library),)))
        with self._lock:
            if self._default is None:
                override = os.environ.get(self.env_var)
                candidates = (override,) if override else self.sonames
                self._default = BoundLibrary(self, self._open(candidates))
            return self._default

    def reset(self) -> None:
        """Forget the cached default library (the next use loads it again)."""
        with self._lock:
            self._default = None

    def _open(self, candidates: tuple[str, ...]) -> ctypes.CDLL:
        errors = []
        for candidate in candidates:
            try:
                return ctypes.CDLL(candidate, use_errno=True)
            except OSError as exc:
                errors.append(str(exc))
        raise LibraryNotFoundError(" or ".join(candidates), self.package, "; ".join(errors))


# Incremented in a forked child: handles opened before the fork may then only
# be closed (the Xen libraries' rule).
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class CHandle:
    """Base of the objects that own a C handle.

    Subclasses call :meth:`_adopt` with the pointer and implement
    :meth:`_release` (free children, then the C close call).  Using a handle
    after :meth:`close` raises :class:`~pyxen9p.errors.HandleClosedError`
    instead of passing a dangling pointer to C; in a child process after
    ``fork()`` only :meth:`close` is allowed.

    Every C call on the handle goes through :meth:`_call` (or a
    :meth:`_using` block), which counts the calls in progress, as
    python-libusb1 does.  :meth:`close` never frees the handle under such a
    call: it refuses new calls, wakes the waits that can be woken (they poll
    :meth:`_wake_fd` with their descriptor), waits up to
    :attr:`close_timeout` for the calls in progress to return, and frees the
    handle.  A call still in C after that (a blocking C function that
    nothing can wake) keeps the handle: the thread that leaves the last
    call releases it.  The interrupted callers get
    :class:`~pyxen9p.errors.HandleClosedError`.
    """

    #: Seconds :meth:`close` waits for calls in progress on other threads
    #: before leaving the release to the last of them.
    close_timeout: float = 10.0

    _ptr: int | None = None
    _generation: int = 0
    _closing: bool = False
    _deferred: bool = False
    _guard_generation: int = -1  # no guard yet: _lock() makes one
    _releaser: int | None = None
    _wake_pipe: tuple[int, int] | None = None

    def _adopt(self, pointer: int) -> None:
        self._guard = threading.Condition(threading.Lock())
        self._guard_generation = _fork_generation
        #: the thread ids of the calls in progress, one entry per call
        self._callers: list[int] = []
        self._releaser: int | None = None
        self._wake_pipe: tuple[int, int] | None = None
        self._ptr = pointer
        self._generation = _fork_generation

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the handle never opened)."""
        return self._ptr is None or self._closing

    @property
    def forked(self) -> bool:
        """Whether this process is a fork child of the one that opened the handle."""
        return self._generation != _fork_generation

    def _lock(self) -> threading.Condition:
        """The condition guarding the call count (a fresh one in a fork child,
        where the parent's threads, their calls and their locks do not exist)."""
        if self._guard_generation != _fork_generation:
            self._guard = threading.Condition(threading.Lock())
            self._guard_generation = _fork_generation
            self._callers = []
            if self._wake_pipe is not None:
                for fd in self._wake_pipe:
                    with contextlib.suppress(OSError):
                        os.close(fd)  # the parent's: never wake its waiters
                self._wake_pipe = None
        return self._guard

    def _closed_error(self) -> HandleClosedError:
        return HandleClosedError(f"{type(self).__name__} is closed")

    def _handle(self) -> int:
        """The C pointer, or an exception if the handle may not be used.

        A check only: C calls go through :meth:`_call` / :meth:`_using`,
        which keep the pointer valid while the call runs.
        """
        ptr = self._ptr
        if ptr is None or (self._closing and self._releaser != threading.get_ident()):
            raise self._closed_error()
        if self._generation != _fork_generation:
            raise HandleClosedError(
                f"{type(self).__name__} was opened before fork(); the child may only close it"
            )
        return ptr

    def _enter(self) -> int:
        """Count a call in progress and return the pointer it may use.

        Takes no lock while the handle is open: on CPython 3.11 every lock
        acquisition reads the clock (a system call in a PV domain without
        vDSO), and a ring's event channel is called for every message.  The
        call is counted first, by ``list.append`` (one C-level operation,
        atomic under the GIL and on free-threaded builds), and the state read
        after: :meth:`close` sets ``_closing`` first and reads the count
        after, under its guard.  So either this call sees ``_closing`` (it
        leaves again and decides under the guard) or close sees it counted
        and waits for it.
        """
        me = threading.get_ident()
        ptr = self._ptr
        if ptr is not None:  # adopted (a closed handle keeps _closing set)
            self._callers.append(me)
            if not self._closing and self._generation == _fork_generation:
                return ptr
            # closing or forked: uncount, and decide under the guard
            self._leave()
        with self._lock():
            ptr = self._handle()
            self._callers.append(me)
            return ptr

    def _leave(self) -> None:
        """End a call counted by :meth:`_enter`; the last call out of a
        handle whose close gave up waiting releases it.

        No lock unless the handle is closing: the call is uncounted first
        (``list.remove``, atomic) and ``_closing`` read after, so a close
        that began meanwhile is woken under its guard (see :meth:`_enter`).
        """
        me = threading.get_ident()
        try:
            self._callers.remove(me)
        except ValueError:  # the count was reset in a fork child
            pass
        if not self._closing:
            return
        release: int | None = None
        guard = self._lock()
        with guard:
            if not self._callers:
                if self._deferred and self._releaser is None and self._ptr is not None:
                    self._releaser = me
                    release = self._ptr
                guard.notify_all()
        if release is not None:
            try:
                self._finish_close(release)
            except Exception:
                log.exception("releasing %s after its last call failed", type(self).__name__)

    @contextlib.contextmanager
    def _using(self) -> Iterator[int]:
        """A block during which the pointer stays valid (close waits for it)."""
        ptr = self._enter()
        try:
            yield ptr
        finally:
            self._leave()

    def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(pointer, *args)`` as a counted call."""
        ptr = self._enter()
        try:
            return function(ptr, *args)
        finally:
            self._leave()

    def _wake_fd(self) -> int:
        """A descriptor that becomes readable when :meth:`close` begins.

        A call that waits (``poll``) for the handle's descriptor waits for
        this one too, inside :meth:`_using`, so that close can wake it.
        """
        with self._lock():
            if self._wake_pipe is None:
                self._wake_pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                if self._closing:
                    os.write(self._wake_pipe[1], b"x")
            return self._wake_pipe[0]

    def _wake_callers(self) -> None:
        """Wake the waits that can be woken (subclasses add their own)."""
        with self._lock():
            if self._wake_pipe is not None:
                with contextlib.suppress(OSError):
                    os.write(self._wake_pipe[1], b"x")  # never drained: wakes all

    def close(self) -> None:
        """Release the handle and everything it still holds (idempotent).

        Calls in progress on other threads are woken where possible and
        waited for (see the class documentation); a second concurrent
        :meth:`close` waits for the first.
        """
        if self._ptr is None:
            return
        guard = self._lock()
        me = threading.get_ident()
        with guard:
            ptr = self._ptr
            if ptr is None:
                return
            if self._closing:
                if me not in self._callers and self._releaser != me:
                    guard.wait_for(lambda: self._ptr is None or self._deferred, self.close_timeout)
                return
            self._closing = True
        self._wake_callers()
        with guard:
            if me not in self._callers:
                guard.wait_for(lambda: not self._callers, self.close_timeout)
            if self._callers:
                self._deferred = True
                log.warning(
                    "%s closed while %d call(s) are still in C; it is released when they return",
                    type(self).__name__,
                    len(self._callers),
                )
                return
            self._releaser = me
        self._finish_close(ptr)

    def _finish_close(self, ptr: int) -> None:
        try:
            self._release(ptr)
        finally:
            guard = self._lock()
            with guard:
                self._ptr = None
                self._releaser = None
                self._deferred = False
                pipe, self._wake_pipe = self._wake_pipe, None
                guard.notify_all()
            for fd in pipe or ():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _release(self, pointer: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._handle()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._ptr is None or sys.is_finalizing():
            return  # never call into C while the interpreter shuts down
        warnings.warn(f"unclosed {type(self).__name__}", ResourceWarning, stacklevel=2)
        with contextlib.suppress(Exception):
            self.close()


class SharedMemoryView:
    """A :class:`memoryview` over C memory (a grant mapping or shared pages).

    :meth:`release` releases the view handed out and checks that no other
    view derived from it (a slice, a ``numpy`` array...) is still alive; only
    then may the memory be unmapped, since a surviving view would otherwise
    point at unmapped memory.

    :param address: start of the memory
    :param length: its size in bytes
    :param readonly: hand out a read-only view
    """

    def __init__(self, address: int, length: int, *, readonly: bool = False) -> None:
        self._array: ctypes.Array[ctypes.c_ubyte] | None = (ctypes.c_ubyte * length).from_address(
            address
        )
        self._baseline = sys.getrefcount(self._array)
        base = memoryview(self._array).cast("B")
        self.view: memoryview = base.toreadonly() if readonly else base
        self._views = [base, self.view]

    def release(self) -> None:
        """Release the view.

        :raises BufferError: if a view derived from it is still in use; the
            memory must then stay mapped (call again once it is released)
        """
        if self._array is None:
            return
        for view in self._views:
            view.release()  # raises BufferError if a buffer was exported from it
        if sys.getrefcount(self._array) > self._baseline:
            raise BufferError(
                "a view of the shared memory is still in use (a slice or an exported"
                " buffer); release it before unmapping"
            )
        self._array = None
