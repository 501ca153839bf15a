"""Bindings of ``libxenevtchn`` (``xenevtchn.h``): event channels.

An :class:`EventChannel` is one handle on ``/dev/xen/evtchn``.  Ports bound
through it are plain ``int``\\ s; the handle remembers them and unbinds what is
left when it closes.  A pending port is reported by :meth:`EventChannel.pending`
*masked*: handle the event, then :meth:`EventChannel.unmask` it.

``pending()`` blocks while nothing is pending (even with a non-blocking
descriptor, warns the header), so wait for :meth:`EventChannel.fileno` to be
readable first: :meth:`EventChannel.wait` does exactly that, and the
descriptor also works with :mod:`select`, :mod:`selectors` and
:meth:`asyncio.loop.add_reader <asyncio.AbstractEventLoop.add_reader>`.
"""

from __future__ import annotations

import ctypes
import errno
import select
import time
from collections.abc import Callable
from ctypes import c_int, c_uint, c_uint16, c_uint32, c_void_p
from functools import partial

from pyxen9p._tokenlock import TokenLock
from pyxen9p.errors import xen_error
from pyxen9p.interfaces import RawEventCalls
from pyxen9p.libs._ctypeslib import (
    CHandle,
    LibraryArg,
    LibrarySpec,
    Signature,
    check_minus_one,
    check_null,
)

__all__ = ["LIBRARY", "XENEVTCHN_NO_CLOEXEC", "EventChannel"]

#: ``xenevtchn_open`` flag: keep the descriptor across ``exec``.
XENEVTCHN_NO_CLOEXEC = 1 << 0

_H = c_void_p

LIBRARY = LibrarySpec(
    name="libxenevtchn",
    sonames=("libxenevtchn.so.1",),
    env_var="PYXEN9P_LIBXENEVTCHN",
    package="libxenevtchn1",
    signatures={
        "xenevtchn_open": Signature((c_void_p, c_uint), c_void_p, check_null),
        "xenevtchn_fdopen": Signature((c_void_p, c_int, c_uint), c_void_p, check_null),
        "xenevtchn_close": Signature((_H,), c_int, check_minus_one),
        "xenevtchn_fd": Signature((_H,), c_int, check_minus_one),
        "xenevtchn_notify": Signature((_H, c_uint32), c_int, check_minus_one),
        "xenevtchn_bind_unbound_port": Signature((_H, c_uint32), c_int, check_minus_one),
        "xenevtchn_bind_interdomain": Signature((_H, c_uint32, c_uint32), c_int, check_minus_one),
        "xenevtchn_bind_virq": Signature((_H, c_uint), c_int, check_minus_one),
        "xenevtchn_unbind": Signature((_H, c_uint32), c_int, check_minus_one),
        "xenevtchn_pending": Signature((_H,), c_int, check_minus_one),
        "xenevtchn_unmask": Signature((_H, c_uint32), c_int, check_minus_one),
        "xenevtchn_restrict": Signature((_H, c_uint16), c_int, check_minus_one),
    },
)


class EventChannel(CHandle):
    """An event-channel handle (``xenevtchn_open``).

    :param cloexec: close the descriptor on ``exec`` (clear to hand it to a
        child, which can rebuild the handle with :meth:`fdopen`)
    :param library: which ``libxenevtchn`` to use
    :raises FileNotFoundError: without ``/dev/xen/evtchn``
    """

    def __init__(self, *, cloexec: bool = True, library: LibraryArg = None) -> None:
        self._lib = LIBRARY.load(library)
        self._ports: set[int] = set()
        # one pending() at a time (see wait); a TokenLock: taken for every
        # event, it must not read the clock (see pyxen9p._tokenlock)
        self._takers = TokenLock()
        self._adopt(self._lib.xenevtchn_open(None, 0 if cloexec else XENEVTCHN_NO_CLOEXEC))

    @classmethod
    def fdopen(cls, fd: int, *, library: LibraryArg = None) -> EventChannel:
        """``xenevtchn_fdopen``: a handle over an inherited evtchn descriptor."""
        self = cls.__new__(cls)
        self._lib = LIBRARY.load(library)
        self._ports = set()
        self._takers = TokenLock()
        self._adopt(self._lib.xenevtchn_fdopen(None, fd, 0))
        return self

    def _release(self, pointer: int) -> None:
        ports, self._ports = self._ports, set()
        if self.forked:
            # the descriptor is shared with the parent: unbinding would take
            # the parent's ports away; only free this process's handle
            ports = set()
        try:
            for port in sorted(ports):
                try:
                    self._lib.xenevtchn_unbind(pointer, port)
                except OSError:
                    pass  # closing the handle releases the port anyway
        finally:
            self._lib.xenevtchn_close(pointer)

    @property
    def bound_ports(self) -> frozenset[int]:
        """The local ports bound through this handle and not yet unbound."""
        return frozenset(self._ports)

    def fileno(self) -> int:
        """``xenevtchn_fd``: readable when a port is pending."""
        return int(self._call(self._lib.xenevtchn_fd))

    def _bind(self, function: Callable[..., int], *args: int) -> int:
        # recorded within the call, so a close waiting for it unbinds the port
        with self._using() as handle:
            port = int(function(handle, *args))
            self._ports.add(port)
            return port

    def bind_unbound_port(self, domid: int) -> int:
        """``xenevtchn_bind_unbound_port``: a new local port that *domid* may bind."""
        return self._bind(self._lib.xenevtchn_bind_unbound_port, domid)

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """``xenevtchn_bind_interdomain``: connect to *remote_port* of *domid*."""
        return self._bind(self._lib.xenevtchn_bind_interdomain, domid, remote_port)

    def bind_virq(self, virq: int) -> int:
        """``xenevtchn_bind_virq``: a local port for virtual IRQ *virq*."""
        return self._bind(self._lib.xenevtchn_bind_virq, virq)

    def unbind(self, port: int) -> None:
        """``xenevtchn_unbind``: release a local port of this handle."""
        with self._using() as handle:
            self._lib.xenevtchn_unbind(handle, port)
            self._ports.discard(port)

    def notify(self, port: int) -> None:
        """``xenevtchn_notify``: signal the peer of local *port*."""
        self._call(self._lib.xenevtchn_notify, port)

    def pending(self) -> int:
        """``xenevtchn_pending``: the next pending port, now masked.

        Blocks (in C) while nothing is pending, where :meth:`close` on
        another thread cannot wake it (close then leaves the release to this
        call's return): wait with :meth:`wait` instead.
        """
        # _enter/_leave, not the _using() context manager: a frontend calls
        # this for every event, and the generator costs five Python frames
        handle = self._enter()
        try:
            with self._takers:
                return int(self._lib.xenevtchn_pending(handle))
        finally:
            self._leave()

    def unmask(self, port: int) -> None:
        """``xenevtchn_unmask``: allow further events on *port*."""
        self._call(self._lib.xenevtchn_unmask, port)

    def raw_calls(self) -> RawEventCalls:
        """``xenevtchn_pending``, ``xenevtchn_unmask`` and
        ``xenevtchn_notify`` bound to this handle's pointer, bare: C function
        objects of their own (no ``errcheck``), each a :func:`functools.partial`
        of the pointer, so a call runs no Python frame.  A negative result is
        a failure; ``error(name)`` turns ``errno`` into the exception the
        checked call raises.

        Nothing keeps the handle open while they run, and ``pending`` here
        skips :meth:`pending`'s one-taker lock: see
        :class:`~pyxen9p.interfaces.RawEventCalls` for what the caller
        guarantees.  A call after :meth:`close` uses a freed handle.

        :raises HandleClosedError: the handle is closed
        """
        pointer = self._handle()
        cdll = self._lib.cdll

        def bare(name: str, *argtypes: type) -> Callable[..., int]:
            fn = cdll[name]  # a private function object: its own argtypes
            fn.argtypes = [_H, *argtypes]
            fn.restype = c_int
            return partial(fn, pointer)

        return RawEventCalls(
            bare("xenevtchn_pending"),
            bare("xenevtchn_unmask", c_uint32),
            bare("xenevtchn_notify", c_uint32),
            _raw_error,
        )

    def restrict(self, domid: int) -> None:
        """``xenevtchn_restrict``: limit this handle to ports of *domid*."""
        self._call(self._lib.xenevtchn_restrict, domid)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to *timeout* seconds for a pending port.

        The wait is a ``poll`` that :meth:`close` on another thread ends: it
        raises :class:`~pyxen9p.errors.HandleClosedError`.

        :returns: the port (masked, like :meth:`pending`), or ``None`` on timeout
        """
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        with self._using() as handle:
            fd = int(self._lib.xenevtchn_fd(handle))
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(self._wake_fd(), select.POLLIN)
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if not poller.poll(None if left is None else left * 1000):
                    return None
                if self._closing:
                    raise self._closed_error()
                with self._takers:
                    # pending() blocks while nothing is queued: take the port
                    # only if it is still there (another thread may have)
                    poller_now = select.poll()
                    poller_now.register(fd, select.POLLIN)
                    if poller_now.poll(0):
                        return int(self._lib.xenevtchn_pending(handle))
                if left == 0.0:
                    return None


def _raw_error(name: str) -> OSError:
    """The exception of the failed bare call *name* (see :meth:`EventChannel.raw_calls`)."""
    err = ctypes.get_errno()
    if err == 0:
        return xen_error(errno.EIO, name, "the C function reported failure without setting errno")
    return xen_error(err, name)
