"""The Xen 9pfs transport frontend, in user space (what Linux's ``trans_xen.c`` does).

:class:`Frontend` finds a 9pfs device in XenStore, negotiates with its backend
(QEMU's or any other speaking the "Xen transport for 9pfs" version 1), shares
the rings, binds the event channels, walks the XenBus state machine, and then
carries complete 9P messages: :meth:`Frontend.request` sends one and returns
its reply.  Everything Xen comes from a :class:`~pyxen9p.interfaces.XenPlatform`:
the real C libraries by default, or the simulated Xen of :mod:`pyxen9p.sim`.

The backend is not trusted: every index, size, tag, type, state and XenStore
value it provides is checked, the frontend never reads back from shared memory
what it owns (``ring_order``, ``ref[]``, ``out_prod``, ``in_cons``), and every
wait has a timeout.  See the transport page of the documentation for the
layout, the state machine and the memory-ordering argument.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from typing_extensions import Self

from pyxen9p._requests import (
    _RERROR,
    _RLERROR,
    MIN_MSIZE,
    RREAD,
    RREAD_HEADER_SIZE,
    Checked,
    Message,
    Request,
    RequestTable,
    as_pieces,
    check_batch,
    failed_future,
    io_batch,
    parse_header,
    reply_bound,
    rread_slice,
    writable_target,
)
from pyxen9p._tokenlock import TokenLock
from pyxen9p.barrier import Barriers, get_barriers
from pyxen9p.errors import (
    BackendError,
    ProtocolError,
    RingProtocolError,
    TransportClosedError,
    TransportError,
)
from pyxen9p.interfaces import (
    EventChannelLike,
    GrantSharerLike,
    RawEventCalls,
    SharedPagesLike,
    WatchLike,
    XenPlatform,
    XenStoreLike,
    XenStoreOps,
)
from pyxen9p.libs._poll import one_fd_poller, poll_error
from pyxen9p.ring import (
    HEADER_SIZE,
    MAX_RING_ORDER,
    MIN_RING_ORDER,
    ByteRing,
    Consumer,
    Interface,
    Producer,
    ring_size,
)
from pyxen9p.xenbus import (
    XenbusState,
    parse_uint,
    parse_versions,
    read_state,
    read_uint,
    wait_for_state,
)

__all__ = [
    "BACKEND_TYPES",
    "DEFAULT_GRANT_LIMIT",
    "MIN_MSIZE",
    "PROTOCOL_VERSION",
    "BackendType",
    "DeviceBusyError",
    "DeviceNotFoundError",
    "Frontend",
    "ReconnectRefusedError",
    "backend_type",
    "choose_layout",
]

log = logging.getLogger(__name__)

#: The transport version this frontend speaks.
PROTOCOL_VERSION = 1
#: gntalloc's default system-wide limit of shared grants (``xen_gntalloc.limit``).
DEFAULT_GRANT_LIMIT = 1024
#: Default number of rings (Linux uses 2).
DEFAULT_RINGS = 2
#: Most rings a backend may offer that we accept to use (QEMU offers 8).
MAX_RINGS = 64
_FREE_STATES = (XenbusState.UNKNOWN, XenbusState.INITIALISING, XenbusState.CLOSED)
#: Seconds :meth:`Frontend.close` waits for the receiver thread to stop.
_RECEIVER_STOP_TIMEOUT = 10.0
#: Seconds a caller receiving its own reply polls the event channel at most
#: before looking whether the connection ended.
_LEAD_POLL = 0.05
_RWRITE = 119
#: An Rwrite: size[4] type[1] tag[2] count[4]; its count
_RWRITE_SIZE = 11
_RWRITE_COUNT = struct.Struct("<7xI")


class DeviceNotFoundError(TransportError):
    """No 9pfs device matches the device id, tag or path asked for."""


class DeviceBusyError(TransportError):
    """The device is already driven by another frontend (e.g. Linux's 9pnet_xen)."""


class ReconnectRefusedError(TransportError):
    """The device's backend has served a connection that ended (it is Closed,
    and the rings a frontend published are still named in XenStore).

    Connecting again is refused unless asked for (``allow_reconnect=True``)
    or the backend's type is known to reconnect (``xen_9pfs``): QEMU's Xen
    9pfs backend (7.2, Debian 12's) aborts when one device is connected a
    second time, taking down every device that QEMU serves.
    """


@dataclass(frozen=True)
class BackendType:
    """What a kind of 9pfs backend is known to do, by the ``<type>`` of its
    XenStore directory ``backend/<type>/<frontend domid>/<devid>``.

    The frontend directory is ``device/9pfs/<devid>`` for every type; only
    the backend's directory tells them apart.

    :ivar name: the type in the backend path (``9pfs``, ``xen_9pfs``)
    :ivar server: the program that serves it
    :ivar reconnects: a device whose connection ended can be connected again
        (no ``allow_reconnect`` needed)
    :ivar initwait_on_reconnect: the backend goes back to InitWait before it
        takes a new connection (else it takes one from Closing or Closed)
    :ivar dialects: the 9P dialects it speaks, best first (empty: unknown)
    """

    name: str
    server: str
    reconnects: bool
    initwait_on_reconnect: bool
    dialects: tuple[str, ...]


#: The backend types known, with their reconnect rules:
#:
#: * ``9pfs``, QEMU's Xen 9pfs backend (Debian 12's QEMU 7.2): it serves one
#:   connection per device; connecting a device again makes it abort
#:   (``Assertion `!s->transport' failed``), and every device it serves goes
#:   with it.  A second connection is refused unless ``allow_reconnect``.
#: * ``xen_9pfs``, Xen's own ``xen-9pfsd`` (Xen 4.19 and later): on the
#:   frontend's Closing (or Closed) it unmaps and frees the device's fids and
#:   takes the frontend's state; it does not go back to InitWait, and connects
#:   again whenever the frontend writes Initialised.  9P2000.u only.
BACKEND_TYPES: dict[str, BackendType] = {
    "9pfs": BackendType(
        "9pfs", "QEMU", reconnects=False, initwait_on_reconnect=True,
        dialects=("9P2000.L", "9P2000.u"),
    ),
    "xen_9pfs": BackendType(
        "xen_9pfs", "xen-9pfsd", reconnects=True, initwait_on_reconnect=False,
        dialects=("9P2000.u",),
    ),
}  # fmt: skip


def backend_type(backend_path: str) -> BackendType:
    """The :class:`BackendType` of the backend directory *backend_path*.

    A path that is not ``.../backend/<type>/<domid>/<devid>``, or a type not
    in :data:`BACKEND_TYPES`, gives an unknown type treated as QEMU's is
    (no reconnect without ``allow_reconnect``, InitWait awaited).
    """
    parts = backend_path.rstrip("/").split("/")
    name = parts[-3] if len(parts) >= 4 and parts[-4] == "backend" else "?"
    known = BACKEND_TYPES.get(name)
    if known is not None:
        return known
    return BackendType(name, "unknown", reconnects=False, initwait_on_reconnect=True, dialects=())


def _served_before(store: XenStoreOps, fe: str, be_state: str) -> bool:
    """Whether the backend is Closed after a frontend published rings on *fe*
    (``num-rings`` is left in place when a frontend closes): it has most
    likely connected this device once, which QEMU 7.2 cannot do twice.  A
    frontend that gave up before publishing (say, over gntalloc's limit)
    leaves no ``num-rings``, and QEMU never connected."""
    if read_state(store, be_state) != XenbusState.CLOSED:
        return False
    try:
        store.read(f"{fe}/num-rings")
    except FileNotFoundError:
        return False
    return True


def choose_layout(
    max_rings: int,
    max_order: int,
    *,
    rings: int | None = None,
    order: int | None = None,
    grant_limit: int | None = DEFAULT_GRANT_LIMIT,
) -> tuple[int, int]:
    """Choose ``(num_rings, ring_order)`` within the backend's limits.

    Explicit *rings* / *order* are wishes capped by the backend's maxima.  By
    default 2 rings (fewer if the backend offers fewer) and the largest order
    such that all grants (one interface page plus ``1 << order`` data pages
    per ring) stay within *grant_limit* (``None``: no limit).

    :raises ValueError: if the wishes or the limit leave no usable layout
    """
    num_rings = min(rings if rings is not None else DEFAULT_RINGS, max_rings)
    if num_rings < 1:
        raise ValueError(f"cannot use {num_rings} rings")
    if order is not None and not MIN_RING_ORDER <= order <= MAX_RING_ORDER:
        raise ValueError(f"ring order {order} outside {MIN_RING_ORDER}..{MAX_RING_ORDER}")
    top = min(order if order is not None else MAX_RING_ORDER, max_order)
    for candidate in range(top, MIN_RING_ORDER - 1, -1):
        if grant_limit is None or num_rings * (1 + (1 << candidate)) <= grant_limit:
            chosen = candidate
            break
    else:
        raise ValueError(f"{num_rings} rings do not fit within {grant_limit} grants")
    if ring_size(chosen) // 2 < MIN_MSIZE:
        raise ValueError(
            f"ring order {chosen} gives an msize below {MIN_MSIZE} bytes"
            f" (the backend allows order <= {max_order})"
        )
    return num_rings, chosen


def _polled(poll: Callable[[int], int], ms: float) -> bool:
    """One poll of the event channel for at most *ms* milliseconds (whole
    ones, rounded up as :meth:`select.poll.poll` does): whether it is
    readable.  libc's ``poll`` through :func:`~pyxen9p.libs._poll.one_fd_poller`,
    not :mod:`select`'s: no clock read for a deadline.  Interrupted by a
    signal, it found nothing (the handler runs at the next bytecode).

    :raises OSError: the poll failed otherwise
    """
    ready = poll(int(ms + 0.999))
    if ready < 0:
        failure = poll_error()
        if failure is not None:
            raise failure
        return False
    return ready > 0


def _bad_rread(consumer: Consumer, into: memoryview, tag: int, size: int) -> ProtocolError:
    """Why the Rread of *size* bytes at *consumer*'s index, for a request
    reading into *into*, was refused (:meth:`Consumer.take_rread` took
    nothing): too short, or a count of another frame or buffer."""
    if size < RREAD_HEADER_SIZE:
        return ProtocolError(f"Rread (tag {tag}) of only {size} bytes")
    why = rread_slice(into, tag, size, consumer.peek_u32(HEADER_SIZE))
    if isinstance(why, ProtocolError):
        return why
    raise AssertionError(f"an Rread of {size} bytes refused, yet it fits its frame and buffer")


class _Ring:
    """One shared ring: interface page, data pages, event channel, and queues."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.intf_pages: SharedPagesLike | None = None
        self.data_pages: SharedPagesLike | None = None
        self.port: int | None = None
        self.intf: Interface | None = None
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self.views: list[ByteRing] = []
        self.send_lock = TokenLock()
        self.space = threading.Condition()
        #: Senders waiting on :attr:`space` (none: a drain need not wake it).
        self.space_waiters = 0
        # The reply budget.  QEMU counts an exactly full `in` ring as empty
        # (it compares the masked indices) and writes the next reply over
        # unread ones, so the replies this ring may still get (the bound of
        # each request put and not answered, see reply_bound) are kept below
        # its size: they can never fill it.  `reserved` is changed only
        # under the send lock; the receiver and flushed() hand bounds back
        # through `returns` (deque appends are atomic: no lock, no clock).
        self.reply_limit = 0
        self.reserved = 0
        self.returns: deque[int] = deque()

    def setup(
        self,
        sharer: GrantSharerLike,
        evtchn: EventChannelLike,
        backend_id: int,
        order: int,
        barriers: Barriers,
    ) -> None:
        self.intf_pages = sharer.share_pages(backend_id, 1)
        self.data_pages = sharer.share_pages(backend_id, 1 << order)
        intf = Interface(self.intf_pages.buffer)
        self.intf = intf
        intf.ring_order = order
        intf.set_refs(self.data_pages.refs)
        size = ring_size(order)
        data = self.data_pages.buffer
        in_ring, out_ring = ByteRing(data[:size]), ByteRing(data[size : 2 * size])
        self.views = [in_ring, out_ring]
        self.reply_limit = size - 1

        # the frontend owns out_prod and in_cons: private copies start at 0
        # (each index is one aligned 32-bit load or store, made without a
        # Python frame)
        self.producer = Producer(
            out_ring, intf.loader("out_cons"), intf.storer("out_prod"), barriers
        )
        self.consumer = Consumer(in_ring, intf.loader("in_prod"), intf.storer("in_cons"), barriers)
        self.port = evtchn.bind_unbound_port(backend_id)

    def reply_room(self) -> int:
        """Bytes the replies to requests not yet put may take on ``in``
        (the send lock held)."""
        returns = self.returns
        while returns:
            self.reserved -= returns.popleft()
        return self.reply_limit - self.reserved

    def put(self, views: list[memoryview], total: int, bound: int) -> bool:
        """Put a message (its pieces *views*, *total* bytes) whose reply may
        take *bound* bytes on ``in``, if it has room on ``out`` and its reply
        within the budget; reserve *bound* (the send lock held).

        :returns: ``False`` (nothing put) if either does not fit
        :raises RingProtocolError: the backend's index is out of range
        """
        producer = self.producer
        if producer is None:
            return False
        returns = self.returns
        while returns:  # reply_room(), inline
            self.reserved -= returns.popleft()
        if bound > self.reply_limit - self.reserved:
            return False
        if not producer.put_pieces(views, total):
            return False
        self.reserved += bound
        return True

    @property
    def ref(self) -> int:
        assert self.intf_pages is not None
        return self.intf_pages.refs[0]

    def release(self, evtchn: EventChannelLike | None) -> None:
        """Give back everything (each step once, whatever failed before)."""
        if self.port is not None and evtchn is not None:
            port, self.port = self.port, None
            try:
                evtchn.unbind(port)
            except OSError as exc:
                log.warning("unbinding port %d failed: %s", port, exc)
        for view in self.views:
            view.release()
        self.views = []
        if self.intf is not None:
            self.intf.release()
            self.intf = None
        self.producer = self.consumer = None
        for attr in ("data_pages", "intf_pages"):
            pages: SharedPagesLike | None = getattr(self, attr)
            setattr(self, attr, None)
            if pages is not None:
                pages.close()


class Frontend:
    """A connected Xen 9pfs device.  Use :meth:`connect` to make one.

    :ivar path: the frontend's XenStore directory
    :ivar backend_path: the backend's XenStore directory
    :ivar backend_id: the backend's domain id
    :ivar tag: the device's mount tag (``None`` if the toolstack wrote none)
    :ivar num_rings: rings in use
    :ivar ring_order: the ring order in use (``1 << ring_order`` data pages)
    :ivar msize: the largest 9P message this transport carries: half a ring
    :ivar backend_type: what the backend is known to do (from its path)
    :ivar backend_versions: the versions the backend offered
    :ivar backend_max_rings: the backend's ``max-rings``
    :ivar backend_max_ring_order: the backend's ``max-ring-page-order``
    """

    path: str
    backend_path: str
    backend_id: int
    tag: str | None
    num_rings: int
    ring_order: int
    msize: int
    #: Both Xen 9pfs backends serve a ring's requests one at a time, in the
    #: ring's order (see :class:`~pyxen9p.p9.transport.Transport`).
    in_order: bool = True

    def __init__(self) -> None:
        raise TypeError("use Frontend.connect(...)")

    # --- connection ------------------------------------------------------

    @classmethod
    def connect(
        cls,
        *,
        devid: int | None = None,
        tag: str | None = None,
        path: str | None = None,
        platform: XenPlatform | None = None,
        rings: int | None = None,
        ring_order: int | None = None,
        grant_limit: int | None = DEFAULT_GRANT_LIMIT,
        timeout: float = 30.0,
        allow_reconnect: bool = False,
    ) -> Frontend:
        """Find a device and connect to its backend.

        Give exactly one of *devid* (``device/9pfs/<devid>`` of this domain),
        *tag* (the device whose ``tag`` node matches) or *path* (a frontend
        directory anywhere in XenStore, as QEMU also serves).

        :param platform: where the Xen objects come from (default: the real
            libraries, :class:`pyxen9p.libs.RealXen`)
        :param rings: wished number of rings (capped by the backend)
        :param ring_order: wished ring order (capped by the backend)
        :param grant_limit: keep all shared pages within this many grants
            (gntalloc counts the grants of the whole domain: see
            :func:`pyxen9p.connect`)
        :param timeout: limit for each step of the negotiation
        :param allow_reconnect: connect even when the backend has served a
            connection on this device that ended (it is Closed, and the
            rings that frontend published are still named in XenStore).
            Only for a backend known to support it: QEMU 7.2's Xen 9pfs
            backend aborts (``v9fs_device_realize_common: Assertion
            `!s->transport' failed``) when a device is connected a second
            time, and every device that QEMU process serves goes with it.
            A backend whose type is known to reconnect (``xen_9pfs``, see
            :data:`BACKEND_TYPES`) is connected again without it
        :raises DeviceNotFoundError: no such device
        :raises DeviceBusyError: another frontend drives it
        :raises ReconnectRefusedError: the backend is Closed, the rings of an
            earlier connection are still named, and *allow_reconnect* is false
        :raises BackendError: the backend published unusable values
        :raises TimeoutError: the backend did not follow the state machine
        """
        if sum(x is not None for x in (devid, tag, path)) != 1:
            raise ValueError("give exactly one of devid, tag or path")
        if platform is None:
            from pyxen9p.libs import RealXen

            platform = RealXen()
        self = cls.__new__(cls)
        self._init_state(platform, timeout)
        try:
            self._store = platform.open_xenstore()
            self.path = self._find_device(devid, tag, path)
            self._negotiate(rings, ring_order, grant_limit, allow_reconnect)
        except BaseException:
            self._teardown(orderly=False)
            raise
        return self

    def _init_state(self, platform: XenPlatform, timeout: float) -> None:
        self._platform = platform
        self._timeout = timeout
        self._store: XenStoreLike | None = None
        self._sharer: GrantSharerLike | None = None
        self._evtchn: EventChannelLike | None = None
        self._backend_watch: WatchLike | None = None
        self._rings: list[_Ring] = []
        self._by_port: dict[int, _Ring] = {}
        self._lock = threading.Lock()
        self._failure: TransportError | None = None
        self._closed = False
        self._connected = False
        self._claimed = False
        self._published = False
        self._backend_unresponsive = False
        self._receiver: threading.Thread | None = None
        # a receiver that outlived close(): what it can reach is released
        # by it when it exits (see _teardown)
        self._stalled: threading.Thread | None = None
        self._handover_lock = threading.Lock()
        self._handover: list[Callable[[], None]] | None = None
        self._receiver_exited = False
        # the receiving role: whoever holds _rx_lock (a TokenLock: no clock
        # read while free) polls the event channel and drains the rings (a
        # caller of request(), or the receiver thread)
        self._rx_lock = TokenLock()
        self._rx_owner: threading.Thread | None = None
        self._leader_inside = False  # a leader may still reach the rings after close
        #: a leading caller's poll of the event channel (no clock read; made once)
        self._lead_poll: Callable[[int], int] | None = None
        #: the event channel's pending and unmask (and notify, for an
        #: exchange), bare: used only by the receiving role's holder, whom
        #: the teardown waits for before it closes the event channel
        self._raw_events: RawEventCalls | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.tag = None
        self.backend_versions: frozenset[int] = frozenset()
        self.backend_max_rings = 0
        self.backend_max_ring_order = 0
        self._table = RequestTable()
        self.backend_type = backend_type("")

    def _find_device(self, devid: int | None, tag: str | None, path: str | None) -> str:
        store = self._require_store()
        if path is not None:
            if not path.startswith("/"):
                raise ValueError("a frontend path must be absolute")
            try:
                store.directory(path)
            except FileNotFoundError:
                raise DeviceNotFoundError(errno.ENODEV, f"no frontend directory {path}") from None
            return path.rstrip("/")
        own = parse_uint(store.read("domid"), "domid")
        base = f"{store.get_domain_path(own)}/device/9pfs"
        if devid is not None:
            candidate = f"{base}/{int(devid)}"
            try:
                store.directory(candidate)
            except FileNotFoundError:
                raise DeviceNotFoundError(
                    errno.ENODEV, f"no 9pfs device {devid} at {base}"
                ) from None
            return candidate
        try:
            ids = store.directory(base)
        except FileNotFoundError:
            ids = []
        matches = []
        for name in ids:
            try:
                if store.read(f"{base}/{name}/tag").decode("utf-8", "replace") == tag:
                    matches.append(f"{base}/{name}")
            except FileNotFoundError:
                continue
        if not matches:
            raise DeviceNotFoundError(errno.ENODEV, f"no 9pfs device with tag {tag!r} under {base}")
        if len(matches) > 1:
            raise DeviceNotFoundError(errno.ENODEV, f"tag {tag!r} names several devices: {matches}")
        return matches[0]

    def _negotiate(
        self, rings: int | None, order: int | None, grant_limit: int | None, allow_reconnect: bool
    ) -> None:
        store = self._require_store()
        fe = self.path
        backend_path = store.read(f"{fe}/backend").decode("utf-8", "strict")
        if not backend_path.startswith("/") or "\0" in backend_path:
            raise BackendError(f"{fe}/backend: {backend_path!r} is not an absolute path")
        self.backend_path = backend_path.rstrip("/")
        kind = self.backend_type = backend_type(self.backend_path)
        # xen-9pfsd takes a new connection from Closing or Closed
        takes_closed = kind.reconnects and not kind.initwait_on_reconnect
        self.backend_id = read_uint(store, f"{fe}/backend-id", 0, 0x7FEF)
        try:
            self.tag = store.read(f"{fe}/tag").decode("utf-8", "replace")
        except FileNotFoundError:
            self.tag = None

        be_state = f"{self.backend_path}/state"
        if not takes_closed and read_state(store, be_state) == XenbusState.CLOSING:
            # a previous connection is still being torn down: let it finish
            wait_for_state(
                store,
                be_state,
                tuple(s for s in XenbusState if s != XenbusState.CLOSING),
                timeout=self._timeout,
                fatal=(None,),
                describe=lambda: "the backend is still closing a previous connection",
            )

        # claim the device: only a frontend in a free state may be taken over
        for txn in store.transaction():
            with txn:
                mine = read_state(txn, f"{fe}/state")
                if mine is not None and mine not in _FREE_STATES:
                    raise DeviceBusyError(
                        errno.EBUSY,
                        f"{fe} is {mine.name}: another frontend (e.g. the kernel's"
                        " 9pnet_xen) drives this device",
                    )
                if not (allow_reconnect or kind.reconnects) and _served_before(txn, fe, be_state):
                    raise ReconnectRefusedError(
                        errno.ECONNREFUSED,
                        f"{be_state} is CLOSED and {fe} still holds the rings a frontend"
                        " published: the backend has served a connection on this device"
                        " that ended.  Not connecting again: QEMU's Xen 9pfs backend (7.2)"
                        " aborts when a device is connected a second time, and every device"
                        " it serves goes with it.  Use a new device, or pass"
                        " allow_reconnect=True (--allow-reconnect) for a backend that"
                        " supports reconnecting",
                    )
                txn.write(f"{fe}/state", str(int(XenbusState.INITIALISING)))
        self._claimed = True

        ready: tuple[XenbusState, ...] = (XenbusState.INIT_WAIT,)
        if takes_closed:
            ready += (XenbusState.CLOSING, XenbusState.CLOSED)
        start = wait_for_state(
            store,
            be_state,
            ready,
            timeout=self._timeout,
            describe=lambda: f"the backend ({kind.server}) has not published its features",
        )
        be = self.backend_path
        self.backend_versions = parse_versions(self._read_backend(f"{be}/versions"))
        if PROTOCOL_VERSION not in self.backend_versions:
            raise BackendError(
                f"{be}/versions offers {sorted(self.backend_versions)}, not {PROTOCOL_VERSION}"
            )
        self.backend_max_rings = read_uint(store, f"{be}/max-rings", 1, 0xFFFFFFFF)
        self.backend_max_ring_order = read_uint(store, f"{be}/max-ring-page-order", 1, 0xFFFFFFFF)
        try:
            self.num_rings, self.ring_order = choose_layout(
                min(self.backend_max_rings, MAX_RINGS),
                min(self.backend_max_ring_order, MAX_RING_ORDER),
                rings=rings,
                order=order,
                grant_limit=grant_limit,
            )
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        self.msize = ring_size(self.ring_order) // 2

        barriers = get_barriers()
        self._sharer = self._platform.open_grant_sharer()
        self._evtchn = self._platform.open_event_channel()
        self._raw_events = self._evtchn.raw_calls()
        for index in range(self.num_rings):
            ring = _Ring(index)
            self._rings.append(ring)
            ring.setup(self._sharer, self._evtchn, self.backend_id, self.ring_order, barriers)
            assert ring.port is not None
            self._by_port[ring.port] = ring

        for txn in store.transaction():
            with txn:
                txn.write(f"{fe}/version", str(PROTOCOL_VERSION))
                txn.write(f"{fe}/num-rings", str(self.num_rings))
                for ring in self._rings:
                    txn.write(f"{fe}/ring-ref{ring.index}", str(ring.ref))
                    txn.write(f"{fe}/event-channel-{ring.index}", str(ring.port))
                txn.write(f"{fe}/state", str(int(XenbusState.INITIALISED)))
        self._published = True

        # a reconnect from Closing/Closed: that state is where the backend
        # waits, only a change away from it is a refusal (xen-9pfsd refuses a
        # connection by writing Closed: from Closed, only the timeout tells)
        fatal = {None, XenbusState.CLOSING, XenbusState.CLOSED} - {start}
        wait_for_state(
            store,
            be_state,
            (XenbusState.CONNECTED,),
            timeout=self._timeout,
            fatal=fatal,
            describe=lambda: (
                f"the backend ({kind.server}) did not map the rings"
                + (
                    f"; it stayed {start.name}: it refused the connection?"
                    if start in (XenbusState.CLOSING, XenbusState.CLOSED)
                    else ""
                )
            ),
        )
        store.write(f"{fe}/state", str(int(XenbusState.CONNECTED)))
        self._backend_watch = store.watch(be_state)
        self._connected = True
        self._receiver = threading.Thread(
            target=self._receiver_main, name=f"pyxen9p-rx {fe}", daemon=True
        )
        self._receiver.start()

    def _read_backend(self, path: str) -> bytes:
        try:
            return self._require_store().read(path)
        except FileNotFoundError:
            raise BackendError(f"{path}: missing") from None

    def _require_store(self) -> XenStoreLike:
        if self._store is None:
            raise TransportClosedError(errno.ENOTCONN, "the frontend is closed")
        return self._store

    # --- public state ----------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether requests can be sent (connected, not failed, not closed)."""
        return self._connected and self._failure is None and not self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed" if self._closed else "failed"
        return (
            f"<Frontend {getattr(self, 'path', '?')} {state} rings={getattr(self, 'num_rings', 0)}"
            f" order={getattr(self, 'ring_order', 0)} msize={getattr(self, 'msize', 0)}>"
        )

    # --- sending ---------------------------------------------------------

    def submit(
        self,
        message: Message,
        *,
        timeout: float | None = None,
        into: memoryview | None = None,
        lazy: bool = False,
    ) -> Future[bytes]:
        """Put one complete 9P message on its ring; return a future of the reply.

        The ring is ``tag % num_rings``.  If the ring is full the call waits
        for room (up to *timeout*).  The tag stays reserved until its reply
        (or the connection's end) even if the caller stops waiting.

        :param message: the encoded message, whole or as a tuple/list of
            bytes-like pieces (say a Twrite's header and the caller's
            payload), each copied once, straight into the ring
        :param into: a writable byte buffer: if the reply is an Rread its
            data is copied from the ring straight into ``into[:count]`` and
            the future's result is the reply's 11-byte header only (a count
            larger than *into* or than the frame fails this request with
            :class:`~pyxen9p.errors.ProtocolError`); other replies come whole.
            It must stay valid until the future is done or the tag flushed
        :param lazy: the caller will wait for the reply with :meth:`result`
            (receiving it itself if nobody else receives), or does not need
            it promptly (see :meth:`lazy`): the receiver thread is not woken
            for it
        :raises ValueError: malformed message, or its tag already in flight
        :raises TransportClosedError: the transport is closed or failed
        :raises TimeoutError: no room on the ring within *timeout*
        """
        future, _ring = self._submit(message, timeout, into, lazy)
        if not lazy:
            self._ensure_receiver()
        return future

    def _submit(
        self, message: Message, timeout: float | None, into: memoryview | None, lazy: bool = False
    ) -> tuple[Future[bytes], _Ring]:
        views, total = as_pieces(message)
        _size, mtype, tag = parse_header(views, total, self.msize)
        target = writable_target(into)
        self._check_usable()
        ring = self._rings[tag % self.num_rings]
        request = self._send(ring, (views, total, mtype, tag, target), timeout, lazy)
        if request is None:
            raise ValueError(f"tag {tag} is already in flight")
        self._notify(ring)  # a failure fails the table: the request with it
        return request.future, ring

    def _ensure_receiver(self) -> None:
        """Requests are in flight that no caller waits on the event channel
        for: make sure the receiver thread takes the receiving role."""
        if not self._rx_lock.locked():
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def submit_many(
        self,
        messages: Sequence[Message],
        *,
        timeout: float | None = None,
        into: Sequence[memoryview | None] | None = None,
        lazy: bool = False,
    ) -> list[Future[bytes]]:
        """Put several messages on their rings, in order, and notify each ring
        touched once: a chain (walk, getattr, clunk) on one ring costs one
        notification.

        Every message is checked before anything is sent: a malformed one,
        two with the same tag, or an *into* list of another length raise
        :class:`ValueError` and nothing is sent; a transport closed or failed
        by then raises its :class:`~pyxen9p.errors.TransportError`.

        Otherwise one future per message is returned, in order.  If a message
        cannot be put (its tag is in flight: :class:`ValueError`; no room on
        its ring within *timeout*: :class:`TimeoutError`; the transport
        failed: its error), it and every message after it are **not sent**:
        their futures are returned already failed with that exception, and
        their tags are not reserved.  The messages before it were sent (their
        rings are notified) and their futures resolve as usual.

        :param timeout: limit for getting each message onto its ring
        :param into: ``None``, or one entry per message (see :meth:`submit`)
        :param lazy: as for :meth:`submit`, for every message
        """
        futures = self._submit_batch(messages, timeout, into, lazy)
        if not lazy:
            self._ensure_receiver()
        return futures

    def _submit_batch(
        self,
        messages: Sequence[Message],
        timeout: float | None,
        into: Sequence[memoryview | None] | None,
        lazy: bool = False,
    ) -> list[Future[bytes]]:
        checked = check_batch(messages, into, self.msize)
        self._check_usable()
        failure: BaseException | None = None
        rings, num_rings = self._rings, self.num_rings
        futures: list[Future[bytes]] = []
        touched: list[_Ring] = []
        at, count = 0, len(checked)
        if num_rings > 1 and count > 1:
            # a window's tags are dealt out to the rings in turn (runs of one
            # message): each ring's share in one put, as many as fit at once
            first = checked[0][3] % num_rings
            for entry in checked:
                if entry[3] % num_rings != first:
                    try:
                        for put in self._put_rings(checked, lazy, touched):
                            futures.append(put.future)
                    except BaseException:
                        for ring in touched:
                            self._notify(ring)
                        raise
                    at = len(futures)
                    break
        try:
            while at < count:
                # a run of messages for one ring goes on it in one put, and
                # is registered under the ring's send lock taken once, when
                # there is room for all (one index store); else one by one
                ring = rings[checked[at][3] % num_rings]
                end = at + 1
                while end < count and checked[end][3] % num_rings == ring.index:
                    end += 1
                if end - at > 1:
                    run = self._put_run(ring, checked[at:end], lazy)
                    if run is not None:
                        for sent in run:  # a loop: no generator frames
                            futures.append(sent.future)
                        if ring not in touched:
                            touched.append(ring)
                        at = end
                        continue
                for i in range(at, end):
                    try:
                        request = self._send(ring, checked[i], timeout, lazy, touched)
                    except (TimeoutError, TransportError) as exc:
                        request, failure = None, exc
                    if request is None:
                        # its tag in flight, no room in time, or the transport
                        # failed: this one and every one after it, not sent
                        if failure is None:
                            failure = ValueError(f"tag {checked[i][3]} is already in flight")
                        count = end = i
                        break
                    if ring not in touched:
                        touched.append(ring)
                    futures.append(request.future)
                at = end
            while len(futures) < len(checked):
                futures.append(failed_future(failure))
        finally:
            for ring in touched:
                self._notify(ring)
        return futures

    def _put_run(
        self,
        ring: _Ring,
        run: Sequence[Checked],
        lazy: bool,
    ) -> list[Request] | None:
        """Register the messages of *run* and put them on *ring* at once, if
        nobody else is sending there, none's tag is in flight and there is
        room for all: their requests (``None``: nothing done).  One lock
        acquisition: the ring's send lock, which also serialises the
        registration of the ring's tags (see :meth:`RequestTable.add`)."""
        producer = ring.producer
        if producer is None:
            return None
        try:
            ring.send_lock.token.pop()  # the send lock, if free (atomic: see TokenLock)
        except IndexError:
            return None
        table = self._table
        requests: list[Request] = []
        try:
            if self._closed or self._failure is not None:
                return None
            views = [view for entry in run for view in entry[0]]
            total = 0
            for entry in run:
                total += entry[1]
            if total > producer.ring.size:
                return None
            msize, bounds = self.msize, 0
            for pieces, _total, mtype, tag, target in run:
                request = table.add(tag, mtype, target, lazy)
                if request is None:  # in flight: one by one, up to it
                    break
                request.bound = bound = reply_bound(pieces, mtype, msize)
                bounds += bound
                requests.append(request)
            else:
                if ring.put(views, total, bounds):
                    return requests
            for request in requests:  # no room: one by one, waiting for it
                table.withdraw(request)
            return None
        except TransportError as exc:
            if isinstance(exc, RingProtocolError):
                self._fail(exc)
                raise
            for request in requests:  # one by one: the failing one says why
                table.withdraw(request)
            return None
        finally:
            ring.send_lock.release()

    def _put_rings(
        self,
        batch: Sequence[Checked],
        lazy: bool,
        touched: list[_Ring],
    ) -> list[Request]:
        """Register the first messages of *batch* (for several rings, in any
        order) that fit the room of their rings, and put each ring's share on
        it in one put, if nobody else is sending on any of those rings: their
        requests (the longest such beginning of *batch*; none if a ring is
        busy or a tag in flight), the rings put on appended to *touched*.
        The rest is for :meth:`_send`, one by one: a message not sent is
        never followed by one sent.  One send lock per ring, each a token
        (no clock read: see :class:`~pyxen9p._tokenlock.TokenLock`)."""
        rings, num_rings = self._rings, self.num_rings
        table = self._table
        held: dict[int, _Ring] = {}
        added: list[Request] = []  # withdrawn unless put
        try:
            for entry in batch:
                index = entry[3] % num_rings
                if index not in held:
                    ring = rings[index]
                    try:
                        ring.send_lock.token.pop()  # atomic: see TokenLock
                    except IndexError:
                        return []
                    held[index] = ring
            if self._closed or self._failure is not None:
                return []
            room: dict[int, int] = {}
            reply_room: dict[int, int] = {}
            for index, ring in held.items():
                producer = ring.producer
                if producer is None:
                    return []
                room[index] = producer.free()  # only grows while the lock is held
                reply_room[index] = ring.reply_room()  # likewise
            msize = self.msize
            # per ring: the pieces, [bytes, reply bounds]
            shares: dict[int, tuple[list[memoryview], list[int]]] = {}
            for views, total, mtype, tag, target in batch:
                index = tag % num_rings
                bound = reply_bound(views, mtype, msize)
                if total > room[index] or bound > reply_room[index]:
                    break
                request = table.add(tag, mtype, target, lazy)
                if request is None:  # in flight: one by one, up to it
                    break
                request.bound = bound
                added.append(request)
                room[index] -= total
                reply_room[index] -= bound
                share = shares.get(index)
                if share is None:
                    shares[index] = share = ([], [0, 0])
                share[0].extend(views)
                share[1][0] += total
                share[1][1] += bound
            for index, (views, sizes) in shares.items():
                ring = held[index]
                producer = ring.producer
                if producer is None or not producer.put_pieces(views, sizes[0]):
                    # the room seen above went away: the backend moved its
                    # index back (messages may be on other rings already)
                    raise RingProtocolError(f"the backend took back room on ring {index}")
                ring.reserved += sizes[1]
                touched.append(ring)
            requests, added = added, []
            return requests
        except TransportError as exc:
            if isinstance(exc, RingProtocolError):
                self._fail(exc)  # the connection is over: nothing sent will be answered
            return []  # one by one: the first (failing) one says why
        finally:
            for request in added:
                table.withdraw(request)
            for ring in held.values():
                ring.send_lock.release()

    def _send(
        self,
        ring: _Ring,
        entry: Checked,
        timeout: float | None,
        lazy: bool = False,
        unnotified: list[_Ring] | None = None,
    ) -> Request | None:
        """Register one checked message (*entry*, from :func:`check_batch`)
        and copy it onto *ring*, waiting for room; the caller notifies.

        The request is registered once the ring's send lock is held (that
        lock serialises the registration of the ring's tags: see
        :meth:`RequestTable.add`) and withdrawn, under it, if the message
        is not put.

        :returns: its request, or ``None`` if its tag is in flight (nothing sent)
        """
        views, total, mtype, tag, target = entry
        table = self._table
        producer = ring.producer
        bound = reply_bound(views, mtype, self.msize)
        try:
            ring.send_lock.token.pop()  # the send lock, if free (atomic: see TokenLock)
            free = True
        except IndexError:
            free = False
        if free:
            # the fast path: nobody else is sending on this ring, and there is room
            try:
                if producer is not None and not self._closed and self._failure is None:
                    request = table.add(tag, mtype, target, lazy)
                    if request is None:
                        return None
                    request.bound = bound
                    try:
                        if ring.put(views, total, bound):
                            return request
                    except RingProtocolError as exc:
                        self._fail(exc)
                        raise
                    table.withdraw(request)  # no room: registered again below
            finally:
                ring.send_lock.release()
        deadline = None if timeout is None else time.monotonic() + timeout
        if unnotified:
            # a batch about to wait (for room, or for another sender of this
            # ring): the backend must see what it put already, on every ring
            # (another sender may wait for room those messages fill)
            for touched in unnotified:
                self._notify(touched)
            unnotified.clear()

        # the time left as the clock said just now: the first remaining()
        # need not read it again (one system call less in a PV domain)
        fresh = [] if timeout is None else [timeout]

        def remaining() -> float:
            if deadline is None:
                return 1.0
            left = fresh.pop() if fresh else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, "timed out waiting for room on the ring")
            return min(left, 1.0)

        # one sender at a time per ring, in order: a large message waiting for
        # room is not overtaken by small ones (the token first: no clock read
        # when the lock is free)
        try:
            ring.send_lock.token.pop()  # atomic: see TokenLock
        except IndexError:
            while not ring.send_lock.acquire(timeout=remaining()):
                self._check_usable()
        registered: Request | None = None
        try:
            while True:
                self._check_usable()
                producer = ring.producer
                if producer is None:
                    raise TransportClosedError(errno.ENOTCONN, "the frontend is closed")
                if registered is None:
                    registered = table.add(tag, mtype, target, lazy)
                    if registered is None:
                        return None
                    registered.bound = bound
                try:
                    # room for the message, and for its reply among those
                    # the ring may still get (else: wait for replies)
                    published = ring.put(views, total, bound)
                except RingProtocolError as exc:
                    self._fail(exc)
                    raise
                if published:
                    request, registered = registered, None
                    return request
                # replies must be read for the backend to go on: by this
                # thread when nobody receives (no thread handoff), else by
                # the receiver thread or the caller that receives
                if self._receive_turn(min(remaining(), 0.05)):
                    continue
                self._ensure_receiver()
                with ring.space:
                    ring.space_waiters += 1
                    try:
                        ring.space.wait(min(remaining(), 0.05))
                    finally:
                        ring.space_waiters -= 1
        finally:
            if registered is not None:  # not put: its tag is not reserved
                table.withdraw(registered)
            ring.send_lock.release()

    def _notify(self, ring: _Ring) -> None:
        evtchn, port = self._evtchn, ring.port
        if evtchn is not None and port is not None:
            try:
                evtchn.notify(port)
            except OSError as exc:
                failure = TransportError(exc.errno or errno.EIO, f"notify failed: {exc}")
                self._fail(failure)
                raise failure from exc

    def request(
        self,
        message: Message,
        *,
        timeout: float | None = 60.0,
        into: memoryview | None = None,
    ) -> bytes:
        """Send one complete 9P message and return its complete reply.

        :param message: whole, or as pieces (see :meth:`submit`)
        :param timeout: overall limit in seconds (``None``: wait as long as the
            connection lives; a backend that leaves Connected ends it)
        :param into: where an Rread's data goes (see :meth:`submit`)
        :raises TimeoutError: no reply in time (the tag stays reserved until
            the reply arrives; a 9P client should send Tflush)
        :raises TransportClosedError: the connection ended first
        :raises ~pyxen9p.errors.ProtocolError: the reply has the wrong type
        :raises ~pyxen9p.errors.FramingError: a reply's size field is impossible
            (the connection fails)
        :raises ~pyxen9p.errors.RingProtocolError: the ring's indices are out of
            range (the connection fails)
        :raises RuntimeError: called from the frontend's receiver thread (a
            future's done-callback runs there): the reply could never be
            received while that thread waits for it
        """
        me = threading.current_thread()
        if me is self._receiver or me is self._rx_owner:
            raise RuntimeError("a request from the frontend's own receiver thread would deadlock")
        start = time.monotonic()
        future, ring = self._submit(message, timeout, into)
        return self._wait(future, ring, start, timeout, me)

    def result(
        self,
        future: Future[bytes],
        *,
        timeout: float | None = 60.0,
        deadline: float | None = None,
    ) -> bytes:
        """Wait for the reply of a future from :meth:`submit` or
        :meth:`submit_many`, receiving on the event channel in this thread
        while no other thread is (as :meth:`request` does): a chain sent with
        :meth:`submit_many` and waited for here costs no thread handoff when
        this caller is alone.

        :param timeout: limit in seconds (``None``: as long as the connection lives)
        :param deadline: the ``time.monotonic()`` at which *timeout* runs
            out, when the caller knows it (a chain sent with that timeout
            just before): no clock read then unless a poll ends empty (the
            first poll waits at most *timeout*, so the wait may end that
            long after *deadline* at most)
        :raises TimeoutError: no reply in time (the tag stays reserved, as
            for :meth:`request`)
        :raises RuntimeError: called from a thread that delivers replies (a
            done-callback)
        :raises: whatever the future was failed with
        """
        if future.done():
            return future.result()
        me = threading.current_thread()
        if me is self._receiver or me is self._rx_owner:
            raise RuntimeError("waiting from the frontend's own receiver thread would deadlock")
        if deadline is not None and timeout is not None:
            # the caller's deadline: no clock read (a system call each in a PV
            # domain without vDSO) when the reply is in by the first poll
            return self._wait(future, None, deadline - timeout, timeout, me, fresh=True)
        return self._wait(future, None, time.monotonic(), timeout, me, fresh=True)

    def _wait(
        self,
        future: Future[bytes],
        ring: _Ring | None,
        start: float,
        timeout: float | None,
        me: threading.Thread,
        fresh: bool = False,
    ) -> bytes:
        """Wait for *future* until *start* + *timeout* (*fresh*: *start* was
        read just now, the first poll need not read the clock again, and
        *future* was seen not done just before: it is not asked again)."""
        if fresh or not future.done():
            deadline = None if timeout is None else start + timeout
            budget = timeout if fresh else None
            if self._rx_lock.acquire(blocking=False):
                # nobody is receiving: wait on the event channel ourselves
                self._lead(future, ring, deadline, me, budget)
            elif self._table.mark_awaited(future) and self._rx_lock.acquire(blocking=False):
                # marked awaited first: a receiver leaving after this failed
                # acquire wakes the receiver thread for it; one that left
                # before it leaves the role free here
                self._lead(future, ring, deadline, me, budget)
            if future.done():  # the common case: no clock read
                return future.result()
        try:
            if timeout is None:
                return future.result()
            return future.result(max(timeout - (time.monotonic() - start), 0.0))
        except FutureTimeout:
            self._abandon(future)
            raise TimeoutError(errno.ETIMEDOUT, f"no reply within {timeout:g}s") from None

    def result_all(
        self, futures: Sequence[Future[bytes]], *, timeout: float | None = 60.0
    ) -> bool:
        """Wait until each of *futures* (from :meth:`submit` or
        :meth:`submit_many`) is done, in order, receiving in this thread
        while no other thread is (as :meth:`result` does): a window of
        requests waited for with one clock read while replies keep coming,
        not one per request.

        *timeout* bounds the time with no progress: the wait ends once a
        whole *timeout* passed with none of the futures done meanwhile
        (found at most two *timeouts* after the last one was; a few
        hundredths of a second late at worst, the clock being read only
        when the event channel is quiet).  The futures not done then are
        abandoned (their tags stay reserved, as for :meth:`result`).

        :returns: whether every future is done (``False``: the timeout)
        :raises RuntimeError: called from a thread that delivers replies
        """
        n = len(futures)
        i = 0
        while i < n and futures[i].done():
            i += 1
        if i == n:
            return True
        me = threading.current_thread()
        if me is self._receiver or me is self._rx_owner:
            raise RuntimeError("waiting from the frontend's own receiver thread would deadlock")
        start = time.monotonic()
        since = i  # the first future not done at *start*
        budget = timeout  # what is left, known without reading the clock
        while True:
            future = futures[i]
            deadline = None if timeout is None else start + timeout
            if self._rx_lock.acquire(blocking=False) or (
                self._table.mark_awaited(future) and self._rx_lock.acquire(blocking=False)
            ):
                # nobody is receiving: wait on the event channel ourselves
                # (budget: the first poll need not read the clock; a stale
                # one costs at most a poll's _LEAD_POLL past the deadline)
                self._lead(future, None, deadline, me, budget)
            elif not future.done():
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    future.exception(left)
                except (FutureTimeout, CancelledError):
                    pass
            while i < n and futures[i].done():
                i += 1
            if i == n:
                return True
            if future.done():  # progress: wait for the next one, same deadline
                budget = None if timeout is None else min(timeout, _LEAD_POLL)
                continue
            if timeout is None:
                # _lead returned for a connection that ended, which fails them
                try:
                    future.exception()
                except CancelledError:
                    pass
                continue
            now = time.monotonic()
            if now < start + timeout:
                budget = start + timeout - now
                continue
            if i > since:  # one was done meanwhile: a whole timeout from now
                start, since, budget = now, i, timeout
                continue
            for late in futures[i:]:
                if not late.done():
                    self._abandon(late)
            return False

    def exchange(
        self,
        messages: Sequence[Message],
        *,
        timeout: float | None = 60.0,
        into: Sequence[memoryview | None] | None = None,
    ) -> list[bytes | Future[bytes]] | None:
        """Send *messages* and receive their replies in this thread, if the
        caller is alone on the connection: ``None`` (nothing sent) if any
        request is in flight or another thread sends or receives; use
        :meth:`submit_many` and :meth:`result_all` then.

        Alone, the caller holds every ring's send lock and the receiving
        role while it puts the messages on their rings in order (as many
        as fit; the rest as replies make room), notifies each ring once
        per round and reads the replies on the event channel itself: no
        future, no request table entry and no thread handoff per message.
        A window of Treads into the caller's buffers (or Twrites of them)
        costs the ring's work and the checks of each reply only.

        Each reply is checked as the shared path checks it (its ring, its
        tag among the exchange's, its type, an Rread's count against its
        frame and its buffer); a reply for no request of the exchange is
        dropped, as there.

        :param timeout: how long the whole exchange may take (``None``: as
            long as the connection lives)
        :param into: ``None`` or one buffer (or ``None``) per message, as
            for :meth:`submit_many`: an Rread's data goes there and its
            entry is the reply's 11-byte header
        :returns: one entry per message, in order: the reply's bytes; or a
            future: failed with the :class:`~pyxen9p.errors.ProtocolError`
            of a wrong reply, or, for a request still unanswered when the
            *timeout* ran out, registered in the shared request table (its
            tag stays reserved: a 9P client flushes it), or failed with
            the connection's failure; or, for a message that could not be
            put in time (no room on its ring; no message after it is sent
            either), a :class:`~pyxen9p._requests.NotSent` future failed
            with :class:`TimeoutError`
        :raises ValueError: a malformed message, or two with one tag
            (nothing sent)
        :raises TransportClosedError: the transport is closed or failed
        :raises RuntimeError: called from a thread that delivers replies
        """
        return self._exchange(check_batch(messages, into, self.msize), None, timeout, False)

    def exchange_io(
        self,
        fid: int,
        spans: Sequence[tuple[int, memoryview]],
        tags: Sequence[int],
        *,
        write: bool = False,
        timeout: float | None = 60.0,
    ) -> list[int | bytes | Future[bytes]] | None:
        """:meth:`exchange` of a window of reads or writes on *fid*, made
        here: a Tread of ``buffer.nbytes`` bytes at each ``(offset,
        buffer)`` of *spans*, its data into the buffer (or, if *write*, a
        Twrite of the buffer, put from it), tagged with the tag at the same
        place of *tags* (one tag each; spans past the last tag are left).

        The same work as :meth:`exchange` without the message objects, and
        the reply that went well comes back as its count alone.

        :returns: ``None`` (nothing sent) as :meth:`exchange`; else one
            entry per tag, in order: the byte count (an ``int``) of an
            Rread whose data is in its buffer, or of an Rwrite (11 bytes,
            its count not checked against the buffer: the caller's part);
            or, as :meth:`exchange` returns them, the bytes of any other
            reply (an error, say) or a future
        :raises ValueError: see :func:`~pyxen9p._requests.io_batch` (nothing sent)
        :raises TransportClosedError: the transport is closed or failed
        :raises RuntimeError: called from a thread that delivers replies
        """
        checked, bounds = io_batch(fid, spans, tags, write, self.msize)
        return self._exchange(checked, bounds, timeout, True)  # type: ignore[return-value]  # ints when counted

    def _exchange(
        self,
        checked: list[Checked],
        bounds: list[int] | None,
        timeout: float | None,
        counted: bool,
    ) -> list[bytes | Future[bytes]] | None:
        """:meth:`exchange` and :meth:`exchange_io` once their messages
        are checked (*bounds*: the reply bound of each, else computed
        here; *counted*: a right Rread or Rwrite comes back as its count)."""
        self._check_usable()
        me = threading.current_thread()
        if me is self._receiver or me is self._rx_owner:
            raise RuntimeError("an exchange from the frontend's own receiver thread would deadlock")
        table = self._table
        if table.pending or not self._rx_lock.acquire(blocking=False):
            return None
        held: list[_Ring] = []
        try:
            for ring in self._rings:
                try:
                    ring.send_lock.token.pop()  # atomic: see TokenLock
                except IndexError:
                    return None
                held.append(ring)
            # requests are registered only under a send lock: with all of
            # them held, an empty table stays empty but for this exchange's
            evtchn, raw = self._evtchn, self._raw_events
            if (
                table.pending
                or evtchn is None
                or raw is None
                or self._closed
                or self._failure is not None
            ):
                return None
            self._rx_owner = me
            return self._exchange_alone(checked, bounds, timeout, evtchn, raw, counted)
        finally:
            for ring in held:
                ring.send_lock.release()
            self._leave_lead()  # wakes the receiver thread for requests handed over

    def _exchange_alone(
        self,
        checked: list[Checked],
        bounds: list[int] | None,
        timeout: float | None,
        evtchn: EventChannelLike,
        raw: RawEventCalls,
        counted: bool,
    ) -> list[bytes | Future[bytes]]:
        """:meth:`exchange`'s work, every send lock and the receiving role
        held (so the event channel's bare calls *raw* are safe to use)."""
        count = len(checked)
        results: list[bytes | Future[bytes] | int | None] = [None] * count
        # the requests on the rings: tag -> (index in checked, type, into, reply bound)
        mine: dict[int, tuple[int, int, memoryview | None, int]] = {}
        rings, num_rings, msize, by_port = self._rings, self.num_rings, self.msize, self._by_port
        poll = self._lead_poll or self._make_lead_poll(evtchn)
        pending, unmask, notify, error = raw
        deadline = None if timeout is None else time.monotonic() + timeout
        wait_ms = _LEAD_POLL * 1000 if timeout is None else min(_LEAD_POLL, timeout) * 1000
        at = events = 0
        bound = -1  # the reply bound of the message at *at*, once known
        # the port of the last event taken: unmasked once the requests that
        # its replies made room for are out (the backend has them one
        # system call sooner), and however the loop ends
        masked = -1
        try:
            try:
                while True:
                    if at < count:
                        # in order, as many as fit (a message that does not
                        # fit waits for replies, and every message after it)
                        touched: list[_Ring] = []
                        while at < count:
                            views, total, mtype, tag, target = checked[at]
                            ring = rings[tag % num_rings]
                            if bound < 0:
                                bound = (
                                    reply_bound(views, mtype, msize)
                                    if bounds is None
                                    else bounds[at]
                                )
                            if not ring.put(views, total, bound):
                                break
                            mine[tag] = (at, mtype, target, bound)
                            if ring not in touched:
                                touched.append(ring)
                            at += 1
                            bound = -1
                        for ring in touched:
                            if notify(ring.port) < 0:  # type: ignore[arg-type]  # set while connected
                                raise error("xenevtchn_notify")
                    elif not mine:
                        break
                    if masked >= 0:
                        port, masked = masked, -1
                        if unmask(port) < 0:
                            raise error("xenevtchn_unmask")
                    if self._closed or self._failure is not None:
                        break
                    ready = poll(int(wait_ms + 0.999))  # _polled(), inline
                    if ready < 0 and (failed := poll_error()) is not None:
                        raise failed
                    if ready > 0:
                        port = pending()
                        if port < 0:
                            raise error("xenevtchn_pending")
                        masked = port
                        signalled = by_port.get(port)
                        if signalled is not None:
                            self._take_mine(signalled, mine, results, counted)
                        events += 1
                        if events & 15 or deadline is None:
                            continue
                    else:  # quiet: a reply whose event was missed is read now
                        for ring in rings:
                            self._take_mine(ring, mine, results, counted)
                        if deadline is None:
                            continue
                    left = deadline - time.monotonic()  # quiet, or 16 events since
                    if left <= 0:
                        break
                    wait_ms = min(_LEAD_POLL, left) * 1000
            finally:  # an interruption, a failure or the end leaves the port usable
                if masked >= 0 and unmask(masked) < 0:
                    raise error("xenevtchn_unmask")
        except Exception as exc:  # the connection fails, as in any receiver
            self._receiving_failed(exc, "receiving", "in an exchange")
        except BaseException:  # interrupted: what is on the rings is the table's
            if self._hand_over(mine, results) is None:
                try:  # replies queued already: their events were consumed here
                    for ring in rings:
                        self._drain(ring)
                except Exception as exc:
                    self._receiving_failed(exc, "receiving", "in an exchange")
            raise
        failure = self._hand_over(mine, results)
        if at < count:  # not put: no room in time, or the connection failed
            why = failure or TimeoutError(errno.ETIMEDOUT, "timed out waiting for room on the ring")
            for i in range(at, count):
                results[i] = failed_future(why)
        return results  # type: ignore[return-value]  # every entry is set

    def _hand_over(
        self,
        mine: dict[int, tuple[int, int, memoryview | None, int]],
        results: list[bytes | Future[bytes] | int | None],
    ) -> TransportError | None:
        """Register an exchange's requests still unanswered (*mine*) in the
        shared request table, their futures put in *results* (failed
        instead if the connection failed): their replies, their reply
        budget and their tags are the shared path's from now on (every
        send lock held).  :returns: the connection's failure, if any"""
        failure = self._failure
        table = self._table
        for tag, (i, mtype, target, bound) in mine.items():
            request = None
            if failure is None:
                try:
                    request = table.add(tag, mtype, target)
                except TransportError as exc:
                    failure = exc
            if request is None:
                results[i] = failed_future(failure)
            else:
                request.bound = bound
                results[i] = request.future
        mine.clear()
        return failure

    def _take_mine(
        self,
        ring: _Ring,
        mine: dict[int, tuple[int, int, memoryview | None, int]],
        results: list[bytes | Future[bytes] | int | None],
        counted: bool = False,
    ) -> None:
        """Read every reply queued whole on *ring* into *results* (an
        exchange's, *mine* its requests on the rings): :meth:`_drain` for
        an exchange, the send lock of *ring* held.  *counted*: a right
        Rread (its data in its buffer) or Rwrite is put there as its count."""
        consumer = ring.consumer
        if consumer is None:
            return
        msize, num_rings, index = self.msize, self.num_rings, ring.index
        since = consumer.cons
        consumed = unbudgeted = False
        freed = 0
        try:
            avail = consumer.available()
            while (found := consumer.next_within(avail, msize)) is not None:
                size, mtype, tag, avail = found
                consumed = True
                entry = mine.pop(tag, None) if tag % num_rings == index else None
                if entry is None:  # a stray or late reply: room the budget did not count
                    self._table.dropped_replies += 1
                    unbudgeted = True
                    consumer.skip(size)
                    log.warning("dropping a reply for tag %d not in flight on ring %d", tag, index)
                    continue
                at, rtype, target, bound = entry
                freed += bound
                if size > bound:
                    unbudgeted = True
                if mtype != rtype + 1 and mtype != _RLERROR and mtype != _RERROR:
                    consumer.skip(size)
                    results[at] = failed_future(
                        ProtocolError(
                            f"reply of type {mtype} to a request of type {rtype} (tag {tag})"
                        )
                    )
                    continue
                if target is not None and mtype == RREAD:
                    head = consumer.take_rread(size, target) if size >= RREAD_HEADER_SIZE else None
                    if head is None:  # a count of another frame or buffer, or too short
                        results[at] = failed_future(_bad_rread(consumer, target, tag, size))
                        consumer.skip(size)
                        continue
                    results[at] = size - RREAD_HEADER_SIZE if counted else head
                    continue
                if counted and mtype == _RWRITE and size == _RWRITE_SIZE:
                    results[at] = _RWRITE_COUNT.unpack_from(consumer.take(size))[0]
                    continue
                results[at] = consumer.take(size)
        finally:
            if consumed:
                consumer.publish()
            if freed:  # the send lock is held: the budget is given back at once
                ring.reserved -= freed
            # the backend may wait for room to reply to a request still on
            # this ring (see _drain)
            if (
                consumed
                and unbudgeted
                and ring.port is not None
                and consumer.peer_may_wait(since, msize)
                and any(tag % num_rings == index for tag in mine)
            ):
                self._notify(ring)

    async def request_async(
        self,
        message: Message,
        *,
        timeout: float | None = None,
        into: memoryview | None = None,
    ) -> bytes:
        """:meth:`request` for asyncio: awaits the reply without blocking the loop."""
        loop = asyncio.get_running_loop()
        future = await loop.run_in_executor(
            None, lambda: self.submit(message, timeout=timeout, into=into)
        )
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            self._abandon(future)
            raise TimeoutError(errno.ETIMEDOUT, f"no reply within {timeout}s") from None

    def _abandon(self, future: Future[bytes]) -> None:
        self._table.abandon(future)

    def abandon(self, future: Future[bytes]) -> None:
        """The caller stopped waiting for *future*: its tag stays reserved
        until the reply comes or :meth:`flushed` frees it."""
        self._table.abandon(future)

    def lazy(self, tag: int) -> None:
        """Nobody waits promptly for the reply to *tag* (a Tclunk sent with a
        chain and settled by a callback, for one).

        A caller receiving its own replies (see :meth:`result`) then leaves
        the receiving role without waking the receiver thread for it: the
        reply is read by the next caller that receives, or by the receiver
        thread within its idle period (half a second).  This keeps a lone
        caller's operations free of thread handoffs.
        """
        self._table.mark_lazy(tag)

    def flushed(self, tag: int) -> None:
        """Free *tag* after the 9P server answered a Tflush for it.

        Until its reply arrives, a tag stays reserved even if the caller
        stopped waiting; after Rflush the server sends no reply for it, so the
        client hands the tag back here.  A waiter still attached gets
        :class:`InterruptedError`.
        """
        request = self._table.flushed(tag)
        rings = self._rings
        if request is not None and request.bound and rings:
            rings[tag % len(rings)].returns.append(request.bound)

    def outstanding_tags(self) -> set[int]:
        """Tags sent and not yet answered (including abandoned ones)."""
        return self._table.tags()

    @property
    def dropped_replies(self) -> int:
        """Replies received for tags not in flight on their ring."""
        return self._table.dropped_replies

    def _check_usable(self) -> None:
        if self._closed:
            raise TransportClosedError(errno.ENOTCONN, "the frontend is closed")
        if self._failure is not None:
            raise self._failure
        if not self._connected:
            raise TransportClosedError(errno.ENOTCONN, "the frontend is not connected")

    # --- receiving -------------------------------------------------------

    def _receiver_main(self) -> None:
        try:
            self._receive_loop()
        finally:
            with self._handover_lock:
                self._receiver_exited = True
                work = None
                if not self._leader_inside:
                    work, self._handover = self._handover, None
            if work is not None:
                log.info("the receiver thread stopped: releasing what it could reach")
                self._run_all(work)

    @staticmethod
    def _run_all(steps: list[Callable[[], None]]) -> None:
        """Run every step, whatever failed before; log the failures."""
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("releasing the frontend after its receiver stopped failed")

    def _receive_loop(self) -> None:
        """The receiver thread: watches the backend's state always, and takes
        the receiving role (the event channel) whenever requests are in
        flight and no caller of :meth:`request` has it."""
        evtchn, store = self._evtchn, self._store
        assert evtchn is not None and store is not None
        ev_fd, xs_fd = evtchn.fileno(), store.fileno()
        leading_poller = select.poll()
        idle_poller = select.poll()
        for poller in (leading_poller, idle_poller):
            poller.register(xs_fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
        leading_poller.register(ev_fd, select.POLLIN)
        me = threading.current_thread()
        rx = self._rx_lock
        try:
            # replies may already be queued: look at every ring once (unless
            # a caller receives already: never block on the role, close() may
            # be waiting for this thread from a done-callback that caller runs)
            if rx.acquire(blocking=False):
                try:
                    self._rx_owner = me
                    for ring in self._rings:
                        self._drain(ring)
                finally:
                    self._release_role()
            table = self._table
            while not self._closed and self._failure is None:
                # the role is taken for replies someone waits for; replies
                # nobody waits for promptly (lazy) are swept up without
                # keeping it, so that a caller can receive its own
                leading = table.awaited() and rx.acquire(blocking=False)
                if not leading and table.pending and rx.acquire(blocking=False):
                    try:
                        self._rx_owner = me
                        if any(fd == ev_fd for fd, _ in leading_poller.poll(0)):
                            self._on_event(evtchn)
                        for ring in self._rings:
                            self._drain(ring)
                    finally:
                        self._release_role()
                    if table.awaited():
                        # marked awaited by a caller that found the role
                        # taken by this sweep: receive for it
                        continue
                try:
                    if leading:
                        self._rx_owner = me
                    events = (leading_poller if leading else idle_poller).poll(500)
                    readable = {fd for fd, _ in events}
                    if self._wake_r in readable:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    if self._closed:
                        break
                    if leading and ev_fd in readable:
                        self._on_event(evtchn)
                    if xs_fd in readable or not events:
                        self._check_backend()
                finally:
                    if leading:
                        self._release_role()
        except Exception as exc:  # never die silently with callers waiting
            self._receiving_failed(exc, "receiver", "the receiver thread")

    def _on_event(self, evtchn: EventChannelLike) -> None:
        """The event channel is readable: drain the signalled ring, unmask
        (the bare C calls: the caller holds the receiving role)."""
        raw = self._raw_events
        if raw is None:  # torn down
            return
        port = raw.pending()
        if port < 0:
            raise raw.error("xenevtchn_pending")
        try:
            signalled = self._by_port.get(port)
            if signalled is not None:
                self._drain(signalled)
        finally:  # an interruption leaves the port usable
            if raw.unmask(port) < 0:
                raise raw.error("xenevtchn_unmask")

    def _lead(
        self,
        future: Future[bytes],
        ring: _Ring | None,
        deadline: float | None,
        me: threading.Thread | None = None,
        budget: float | None = None,
    ) -> None:
        """Hold the receiving role (``_rx_lock``, taken by the caller) until
        *future* is done, the deadline passes or the connection ends: poll
        the event channel and deliver every reply that comes, then hand the
        role back (to the receiver thread if requests are still in flight).

        A failure of the rings fails the connection, as in the receiver thread.
        """
        self._rx_owner = threading.current_thread() if me is None else me
        try:
            evtchn = self._evtchn
            if evtchn is None or self._closed or self._failure is not None:
                return
            poll = self._lead_poll or self._make_lead_poll(evtchn)
            # the reply may be there already
            if ring is not None:
                self._drain(ring)
            # the clock is read when a poll found nothing, and after every
            # 16 events (a backend notifying without end cannot stop the
            # deadline): one system call each in a PV domain without vDSO
            wait_ms = _LEAD_POLL * 1000
            events = 0
            check = deadline is not None
            if check and budget is not None and budget > 0:
                # the caller read the clock just before: *budget* is what is left
                wait_ms = min(_LEAD_POLL, budget) * 1000
                check = False
            while not future.done() and not self._closed and self._failure is None:
                if check:
                    assert deadline is not None
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    wait_ms = min(_LEAD_POLL, left) * 1000
                    check = False
                if _polled(poll, wait_ms):
                    self._on_event(evtchn)
                    events += 1
                    check = deadline is not None and not events & 15
                else:
                    check = deadline is not None
        except Exception as exc:  # never leave the other callers waiting
            self._receiving_failed(exc, "receiving", "in a caller")
        finally:
            self._leave_lead()

    def _receive_turn(self, seconds: float) -> bool:
        """Receive in this thread for at most *seconds* (one poll of the
        event channel) if no other thread is receiving: whether it did.

        A sender waiting for room on a ring uses it: the replies that make
        the room are read here instead of waking the receiver thread.
        """
        if not self._rx_lock.acquire(blocking=False):
            return False
        self._rx_owner = threading.current_thread()
        try:
            evtchn = self._evtchn
            if evtchn is None or self._closed or self._failure is not None:
                return True
            poll = self._lead_poll or self._make_lead_poll(evtchn)
            if _polled(poll, seconds * 1000):
                self._on_event(evtchn)
        except Exception as exc:  # never leave the other callers waiting
            self._receiving_failed(exc, "receiving", "in a sender")
        finally:
            self._leave_lead()
        return True

    def _make_lead_poll(self, evtchn: EventChannelLike) -> Callable[[int], int]:
        """The poll of the event channel that a receiving caller (or sender)
        uses, made once: libc's ``poll`` (see :func:`_polled`)."""
        poll = self._lead_poll = one_fd_poller(evtchn.fileno())
        return poll

    def _receiving_failed(self, exc: Exception, what: str, where: str) -> None:
        """Fail the connection for *exc*, raised while receiving (*where*:
        the receiver thread, in a caller, in a sender): a
        :class:`~pyxen9p.errors.TransportError` as it is, an :class:`OSError`
        as ``"<what> failed"``, anything else logged as a crash."""
        if isinstance(exc, TransportError):
            self._fail(exc)
        elif isinstance(exc, OSError):
            self._fail(TransportError(exc.errno or errno.EIO, f"{what} failed: {exc}"))
        else:
            log.error("pyxen9p receiving (%s) crashed", where, exc_info=exc)
            self._fail(TransportError(errno.EIO, f"{what} crashed: {exc!r}"))

    def _release_role(self) -> bool:
        """Give the receiving role up (every holder, the receiver thread
        too); run a teardown left to the leader: whether :meth:`_stop_leader`
        was waiting for the role (the connection is over).

        No lock beyond the role's unless :meth:`_stop_leader` found the role
        taken: it sets :attr:`_leader_inside` *before* it tries the role's
        lock, and a holder reads it *after* releasing that lock, so either
        the try succeeds (this holder was out) or this holder sees the flag
        (or a holder after it, who had the role when the try failed, does).
        """
        self._rx_owner = None
        self._rx_lock.release()
        if not self._leader_inside:
            return False
        work = None
        with self._handover_lock:
            # nobody is inside unless a later holder took the role, who sees
            # the flag as it leaves: whoever gets the role keeps it for good
            if self._leader_inside and self._rx_lock.acquire(blocking=False):
                self._leader_inside = False
                if self._receiver_exited:
                    work, self._handover = self._handover, None
        if work is not None:
            log.info("the receiving caller left: releasing what it could reach")
            self._run_all(work)
        return True

    def _leave_lead(self) -> None:
        """Give the receiving role up (a caller or sender); wake the receiver
        thread for requests still awaited."""
        if self._release_role():
            return
        if not self._closed and self._table.awaited():
            self._wake()  # the receiver thread takes over
        # replies nobody waits for promptly (lazy) are read by the next caller
        # that receives, or by the receiver thread within its idle period

    def _check_backend(self) -> None:
        watch, store = self._backend_watch, self._store
        if watch is None or store is None:
            return
        while watch.get(0) is not None:
            pass
        state = read_state(store, f"{self.backend_path}/state")
        if state != XenbusState.CONNECTED:
            what = "vanished" if state is None else state.name
            raise TransportClosedError(
                errno.ECONNRESET, f"the backend left Connected: it is {what}"
            )

    def _drain(self, ring: _Ring) -> None:
        """Read every reply queued whole on *ring*, once each, and hand it over.

        The backend's index is loaded once for the replies already queued
        (and once more when they are used up, for any that came meanwhile);
        the consumer index is published once, after the last.
        """
        consumer = ring.consumer
        if consumer is None:
            return
        consumed = False
        table = self._table
        msize, num_rings, index = self.msize, self.num_rings, ring.index
        # replies handed over once the index is published (a caller woken
        # by one finds the ring's room given back already)
        # (type -1: the request fails with the ProtocolError given)
        answered: list[tuple[Request, int, Any]] = []
        since = consumer.cons
        freed = 0  # the reply budget of the requests answered
        # a reply over its request's budget, or one of no request in flight
        # (a flushed request's, a stray one): room the budget did not count
        unbudgeted = False
        try:
            avail = consumer.available()
            while (found := consumer.next_within(avail, msize)) is not None:
                size, mtype, tag, avail = found
                consumed = True
                request = table.take(tag) if tag % num_rings == index else None
                if request is None:
                    if tag % num_rings != index:
                        table.dropped_replies += 1
                    unbudgeted = True
                    consumer.skip(size)
                    log.warning("dropping a reply for tag %d not in flight on ring %d", tag, index)
                    continue
                freed += request.bound
                if size > request.bound:
                    unbudgeted = True
                into = request.into
                if into is not None and mtype == RREAD and request.type + 1 == RREAD:
                    head = consumer.take_rread(size, into) if size >= RREAD_HEADER_SIZE else None
                    if head is None:  # a count of another frame or buffer, or too short
                        answered.append((request, -1, _bad_rread(consumer, into, tag, size)))
                        consumer.skip(size)
                        continue
                    answered.append((request, mtype, head))
                    continue
                answered.append((request, mtype, consumer.take(size)))
        finally:
            if consumed:
                consumer.publish()
            if freed:  # handed back once the backend can see the room
                ring.returns.append(freed)
            for request, mtype, reply in answered:
                if mtype < 0:
                    request.reject(reply)
                elif mtype == request.type + 1 or mtype in (_RLERROR, _RERROR):
                    request.future.settle(reply, None)  # resolve()'s common case, inline
                else:
                    request.resolve(mtype, reply)  # the wrong type's ProtocolError
            # a sender may wait for the room the backend's consuming made in `out`
            if ring.space_waiters:
                with ring.space:
                    ring.space.notify_all()
            # the backend may wait for room in `in` to reply to a request still
            # in flight on this ring (QEMU does; Linux notifies once the ring
            # is drained): with none in flight it has no reply to put, with
            # never less than an msize of room since the last drain it never
            # had to wait, and while every reply read kept to its request's
            # budget it never lacked room (the budget keeps the replies a
            # ring may still get below its size; see _Ring.put)
            if (
                consumed
                and unbudgeted
                and self._evtchn is not None
                and ring.port is not None
                and consumer.peer_may_wait(since, msize)
                and table.in_flight_on(index, num_rings)
            ):
                self._evtchn.notify(ring.port)

    def abort(self, exc: TransportError) -> None:
        """Give up on the backend: every request in flight and every later one
        fails with *exc* at once.  Nothing is released: :meth:`close` still
        does the teardown.  (A 9P client calls this when the server answers
        neither a request nor its Tflush: a backend that died cannot be seen
        otherwise, as its state node may still say Connected.)"""
        self._fail(exc)

    def _fail(self, exc: TransportError) -> None:
        """Fail the connection: every waiter gets *exc*, later calls too."""
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._table.fail(exc)
        for ring in self._rings:
            with ring.space:
                ring.space.notify_all()

    # --- closing ---------------------------------------------------------

    def close(self) -> None:
        """Disconnect and release everything (idempotent).

        Goes to Closing, waits (bounded) for the backend to unmap (Closing or
        Closed), stops the receiver, unbinds the ports, unshares the pages,
        closes the handles and goes to Closed.  Waiters get
        :class:`~pyxen9p.errors.TransportClosedError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._fail(TransportClosedError(errno.ENOTCONN, "the frontend was closed"))
        self._teardown(orderly=True)

    def _teardown(self, *, orderly: bool) -> None:
        """Release everything, in the protocol's order.

        Nothing that the receiver thread can reach (rings, shared pages,
        event channel, XenStore connection, wake pipe) is released while it
        runs: if it did not stop in time (stuck in a future's done-callback,
        say), the states still go to Closed, and the receiver releases the
        rest itself when it exits.
        """
        self._closed = True
        store = self._store
        rings, evtchn, sharer = list(self._rings), self._evtchn, self._sharer
        with ExitStack() as cleanup:
            cleanup.callback(self._release_reachable, store)
            if store is not None and self._claimed:
                if self._published:
                    cleanup.callback(self._wait_final_closed, store)
                cleanup.callback(self._write_state, XenbusState.CLOSED)
            cleanup.callback(self._release_rings, rings, evtchn, sharer)
            cleanup.callback(self._stop_receiver)
            if self._backend_watch is not None:
                cleanup.callback(self._backend_watch.close)
            # first of all: tell the backend, and let it unmap the rings
            if store is not None and self._claimed and self._rings:
                self._write_state(XenbusState.CLOSING)
                if self._published and not self._wait_backend_closed(store):
                    self._backend_unresponsive = True
        self._store = self._sharer = self._evtchn = None
        self._raw_events = None
        self._backend_watch = None
        self._rings = []
        self._by_port = {}

    def _release_rings(
        self,
        rings: list[_Ring],
        evtchn: EventChannelLike | None,
        sharer: GrantSharerLike | None,
    ) -> None:
        steps: list[Callable[[], None]] = [partial(ring.release, evtchn) for ring in rings]
        if evtchn is not None:
            steps.append(evtchn.close)
        if sharer is not None:
            steps.append(sharer.close)
        self._release_or_defer(steps)

    def _release_reachable(self, store: XenStoreLike | None) -> None:
        steps: list[Callable[[], None]] = []
        if store is not None:
            steps.append(store.close)
        steps.append(self._close_pipe)
        self._release_or_defer(steps)

    def _release_or_defer(self, steps: list[Callable[[], None]]) -> None:
        """Run the release *steps* (every one, even if some fail), or leave them
        to a stalled receiver thread that may still reach what they release."""
        if self._stalled is not None:
            self._defer(steps)
            return
        with ExitStack() as cleanup:
            for step in reversed(steps):
                cleanup.callback(step)

    def _defer(self, steps: list[Callable[[], None]]) -> None:
        """Leave *steps* to the stalled receiver, or run them if it has exited."""
        with self._handover_lock:
            if not self._receiver_exited or self._leader_inside:
                self._handover = (self._handover or []) + steps
                return
        self._run_all(steps)

    def _wait_final_closed(self, store: XenStoreLike) -> None:
        """After the frontend went Closed: wait (bounded) for the backend's
        Closed, unless it already ignored Closing (a dead backend, such as a
        killed QEMU, would only make :meth:`close` wait twice)."""
        if not self._backend_unresponsive:
            self._wait_backend_closed(store, final=True)

    def _wait_backend_closed(self, store: XenStoreLike, final: bool = False) -> bool:
        """Wait (bounded) for the backend to have released the rings: Closing,
        or once the frontend is Closed (*final*), Closed; a backend that went
        back to InitWait or Initialising (re-initialised) is done too.

        :returns: whether the backend got there in time
        """
        kind = self.backend_type
        if kind.reconnects and not kind.initwait_on_reconnect:
            # xen-9pfsd copies each state of ours, and acts on changes only: it
            # must have seen our Closing and Closed before a next frontend
            # writes Initialised (it may have been Closed already, having
            # refused the connection)
            done = {XenbusState.CLOSED if final else XenbusState.CLOSING, XenbusState.UNKNOWN}
        else:
            done = {
                XenbusState.CLOSED,
                XenbusState.INIT_WAIT,
                XenbusState.INITIALISING,
                XenbusState.UNKNOWN,
            }
            if not final:
                done.add(XenbusState.CLOSING)
        try:
            wait_for_state(
                store,
                f"{self.backend_path}/state",
                tuple(done),
                timeout=min(self._timeout, 10.0),
                fatal=(None,),
            )
        except TransportClosedError:
            pass  # the backend's node vanished: nothing maps the rings any more
        except (TimeoutError, OSError) as exc:
            log.warning("backend %s did not release the rings: %s", self.backend_path, exc)
            return False
        return True

    def _write_state(self, state: XenbusState) -> None:
        store = self._store
        if store is None:
            return
        try:
            store.write(f"{self.path}/state", str(int(state)))
        except OSError as exc:
            log.warning("cannot set %s/state to %s: %s", self.path, state.name, exc)

    def _stop_receiver(self) -> None:
        receiver = self._receiver
        if receiver is None:
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if receiver is threading.current_thread():
            # closed from a done-callback: the receiver itself is stuck in
            # this close until it returns; it releases what it reaches
            self._stalled = receiver
        else:
            receiver.join(timeout=_RECEIVER_STOP_TIMEOUT)
            if receiver.is_alive():
                log.error(
                    "the receiver thread did not stop within %gs: it releases the rings,"
                    " the event channel and the XenStore connection when it exits",
                    _RECEIVER_STOP_TIMEOUT,
                )
                self._stalled = receiver
        self._receiver = None
        self._stop_leader(receiver)

    def _stop_leader(self, receiver: threading.Thread) -> None:
        """Take the receiving role for good, so no caller reads the rings any
        more; a caller that keeps it (closing from a done-callback it runs,
        or stuck in one) releases what it can reach as it leaves.  (The
        receiver thread holding it is a stalled receiver, handled above.)"""
        me = threading.current_thread()
        if self._rx_owner is receiver:
            return
        if self._rx_owner is not me and self._rx_lock.acquire(timeout=_RECEIVER_STOP_TIMEOUT):
            return  # kept: the connection is over
        with self._handover_lock:
            owner = self._rx_owner
            if owner is receiver:
                return
            # set before the try: a leader reads it after releasing the role
            # (see _leave_lead), so one that leaves now is seen leaving
            self._leader_inside = True
            if owner is not me and self._rx_lock.acquire(blocking=False):
                self._leader_inside = False
                return
        if owner is not me:
            log.error(
                "a caller receiving replies did not stop within %gs: it releases the rings,"
                " the event channel and the XenStore connection when it leaves",
                _RECEIVER_STOP_TIMEOUT,
            )
        self._stalled = owner or me

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __del__(self) -> None:
        if getattr(self, "_closed", True) or sys.is_finalizing():
            return
        try:
            self.close()
        except Exception:
            pass
