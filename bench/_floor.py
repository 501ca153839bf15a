"""The floor under pyxen9p's data path: the leanest Python frontend on the same rings.

``bench_realxen.py --floor`` measures, next to pyxen9p and the kernel, how
fast *any* frontend written in Python could do the same work over the same
connection: the rings, event channel and msize that pyxen9p negotiated, the
same 9P messages (the same counts per message as pyxen9p and the kernel), and
only what the protocol cannot do without:

* one copy of each byte between the ring and the caller's buffer (a Twrite's
  header and payload put as two pieces, a Rread's data copied out once);
* one ``xenevtchn_notify`` per ring per batch put, and per event
  ``poll`` + ``xenevtchn_pending`` + ``xenevtchn_unmask``, called as raw
  ctypes functions (no error-check wrapper, no handle lock);
* the ring indices loaded and stored with the barriers this CPU needs, every
  length and index from the backend checked (a hostile backend still gets
  a clear error here, never a read outside the ring);
* the reply budget: the replies a ring may still get stay below its size
  (QEMU counts an exactly full ``in`` ring as empty).

Nothing else: no threads, locks, futures, request table, tag allocator,
codec objects, timeouts per request or flushes.  It is not a frontend: it
serves one caller at a time on a connection nobody else uses meanwhile
(:class:`LeanRings` takes the frontend's receiving role and every ring's
send lock for as long as it runs), and it trusts the fids it is given.

What it shows: the part of pyxen9p's time that its own layers add (the
difference between pyxen9p and the floor), and whether a goal is within
reach of a Python frontend at all under this emulation (if the floor
misses it, no Python frontend meets it).
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable
from typing import Any

from pyxen9p.barrier import _noop
from pyxen9p.errors import TransportError
from pyxen9p.frontend import Frontend
from pyxen9p.libs._poll import one_fd_poller, poll_error

__all__ = ["LeanRings", "read_file", "stat_file", "write_file"]

_MASK32 = 0xFFFFFFFF
_HEADER = struct.Struct("<IBH")  # size, type, tag
_IO = struct.Struct("<IBHIQI")  # Tread / Twrite: size type tag fid offset count
_U32 = struct.Struct("<I")
_TWALK1 = struct.Struct("<IBHIIHH")  # one name: size type tag fid newfid nwname len
_TGETATTR = struct.Struct("<IBHIQ")
_TCLUNK = struct.Struct("<IBHI")
# Rgetattr after its header: valid, qid (type, version, path), mode, uid, gid,
# nlink, rdev, size, blksize, blocks, atime, mtime, ctime, btime (s, ns each),
# gen, data_version
_RGETATTR = struct.Struct("<QBIQIIIQQQQQQQQQQQQQQQ")
_RLERROR, _TGETATTR_T, _TWALK_T, _TREAD_T, _TWRITE_T, _TCLUNK_T = 7, 24, 110, 116, 118, 120
_GETATTR_BASIC = 0x7FF
_HEADER_SIZE = 7
_RREAD_HEADER = 11

#: ``handler(ring, cons, size, mtype)``: takes one reply queued whole at *cons*.
Handler = Callable[["_LeanRing", int, int, int], None]


class FloorError(OSError):
    """A reply the floor cannot use (a backend's error, or a malformed reply)."""


class _LeanRing:
    """One ring's buffers, indices and reply budget, as plain attributes."""

    __slots__ = (
        "cons",
        "handlers",
        "inb",
        "index",
        "load_in_prod",
        "load_out_cons",
        "mask",
        "out",
        "owner",
        "port",
        "prod",
        "queue",
        "room",
        "size",
        "store_in_cons",
        "store_out_prod",
    )  # fmt: skip

    def __init__(self, ring: Any) -> None:
        producer, consumer = ring.producer, ring.consumer
        self.owner = ring
        self.index = ring.index
        self.out = producer.ring.buffer
        self.inb = consumer.ring.buffer
        self.size = consumer.ring.size
        if producer.ring.size != self.size:
            raise ValueError("the floor expects both directions of a ring the same size")
        self.mask = self.size - 1
        self.load_out_cons = producer._load_cons
        self.store_out_prod = producer._store_prod
        self.load_in_prod = consumer._load_prod
        self.store_in_cons = consumer._store_cons
        self.port = ring.port
        self.prod = producer.prod
        self.cons = consumer.cons
        # the reply budget: below the ring's size (never exactly full)
        self.room = self.size - 1
        #: tag -> (handler, bound, awaited)
        self.handlers: dict[int, tuple[Handler, int, bool]] = {}
        #: sends waiting for room: (pieces, total, tag, bound, handler, awaited)
        self.queue: list[tuple[tuple[Any, ...], int, int, int, Handler, bool]] = []


class LeanRings:
    """The floor's whole frontend: a connected :class:`~pyxen9p.frontend.Frontend`'s
    rings, taken over while nothing else uses them::

        with LeanRings(client.transport) as lean:
            read_file(lean, fid, 0, view, 1 << 20, client.msize - 24)

    :param frontend: connected, with no request in flight
    :param timeout: seconds without an event before a wait gives up
    :raises RuntimeError: requests are in flight, or the rings stay taken
    """

    def __init__(self, frontend: Frontend, timeout: float = 20.0) -> None:
        self._fe = frontend
        self._timeout_ms = int(timeout * 1000)
        self.msize = frontend.msize
        self.awaiting = 0
        self._held: list[Any] = []
        #: what broke the rings (a framing error, a lost wait): they are not used again
        self.broken: OSError | None = None
        # the first reply refused in a wait (the rings are fine: it was consumed)
        self._refused: OSError | None = None

    def __enter__(self) -> LeanRings:
        fe = self._fe
        try:
            for lock in (fe._rx_lock, *(ring.send_lock for ring in fe._rings)):
                if not lock.acquire(timeout=10.0):
                    raise RuntimeError("the frontend's rings stay in use")
                self._held.append(lock)
            if fe._table.pending:
                raise RuntimeError("requests are in flight on the frontend")
            evtchn = fe._evtchn
            if evtchn is None:
                raise RuntimeError("the frontend is not connected")
            self._evtchn = evtchn
            self._notify, self._pending, self._unmask = self._event_functions(evtchn)
            self._poll = one_fd_poller(evtchn.fileno())
            barriers = fe._rings[0].producer._barriers
            self._mb = barriers.mb
            # a barrier this CPU does not need is not called (as in pyxen9p's ring)
            self._wmb = None if barriers.wmb is _noop else barriers.wmb
            self._rmb = None if barriers.rmb is _noop else barriers.rmb
            self.rings = [_LeanRing(ring) for ring in fe._rings]
            self._by_port = {ring.port: ring for ring in self.rings}
        except BaseException:
            self._release()
            raise
        return self

    def _event_functions(self, evtchn: Any) -> list[Callable[..., int]]:
        """notify, pending and unmask as ``f(handle, ...) -> int`` (negative:
        failed): the C functions themselves for libxenevtchn's bindings, the
        handle's own methods for the simulated Xen's (host tests)."""
        library = getattr(evtchn, "_lib", None)
        if library is None or not hasattr(library, "cdll"):
            self._handle = None
            return [lambda _, port: evtchn.notify(port) or 0,
                    lambda _: evtchn.pending(),
                    lambda _, port: evtchn.unmask(port) or 0]  # fmt: skip
        self._handle = evtchn._enter()
        functions = []
        handle, port = ctypes.c_void_p, ctypes.c_uint32
        for name, argtypes in (("xenevtchn_notify", (handle, port)),
                               ("xenevtchn_pending", (handle,)),
                               ("xenevtchn_unmask", (handle, port))):  # fmt: skip
            fn = library.cdll[name]  # a private function object: no errcheck
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            functions.append(fn)
        return functions

    def __exit__(self, *exc: object) -> None:
        try:
            if self.broken is None:
                self.finish()
        finally:
            self._release()

    def _release(self) -> None:
        if hasattr(self, "rings"):
            for ring in self.rings:  # the frontend goes on from where the floor left
                ring.owner.producer.prod = ring.prod
                ring.owner.consumer.cons = ring.cons
        if getattr(self, "_handle", None) is not None:
            self._evtchn._leave()
        self._handle = None
        for lock in reversed(self._held):
            lock.release()
        self._held = []
        if self.broken is not None:  # the rings' state is unknown: no more use of them
            self._fe.abort(TransportError(errno.EPROTO, f"the floor's rings broke: {self.broken}"))

    def finish(self) -> None:
        """Wait for every reply still due (the ones nobody awaited, a clunk's),
        the backend's errors for them ignored; the rings are broken if that fails."""
        for ring in self.rings:
            for tag, (handler, bound, awaited) in list(ring.handlers.items()):
                if not awaited:
                    ring.handlers[tag] = (handler, bound, True)
                    self.awaiting += 1
        try:
            self.wait(raise_failures=False)
        except OSError as exc:
            if self.broken is None:
                self.broken = exc

    # --- sending ---------------------------------------------------------------

    def send(
        self, ring: _LeanRing, pieces: tuple[Any, ...], total: int, tag: int, bound: int,
        handler: Handler, awaited: bool = True,
    ) -> bool:
        """Put one message on *ring* (or queue it until the replies make room):
        whether it was put (the caller notifies the ring once per batch)."""
        ring.handlers[tag] = (handler, bound, awaited)
        if awaited:
            self.awaiting += 1
        if ring.queue or not self._put(ring, pieces, total, bound):
            ring.queue.append((pieces, total, tag, bound, handler, awaited))
            return False
        return True

    def _put(self, ring: _LeanRing, pieces: tuple[Any, ...], total: int, bound: int) -> bool:
        if bound > ring.room:
            return False
        cons = ring.load_out_cons()
        self._mb()
        size = ring.size
        prod = ring.prod
        used = (prod - cons) & _MASK32
        if used > size:
            raise FloorError(errno.EPROTO, f"out_cons {cons} is {used} bytes behind prod {prod}")
        if size - used < total:
            return False
        out = ring.out
        start = prod & ring.mask
        for piece in pieces:
            end = start + len(piece)
            if end <= size:
                out[start:end] = piece
                start = end & ring.mask
            else:
                first = size - start
                out[start:] = piece[:first]
                start = end - size
                out[:start] = piece[first:]
        if self._wmb is not None:
            self._wmb()
        ring.prod = prod = (prod + total) & _MASK32
        ring.store_out_prod(prod)
        ring.room -= bound
        return True

    def notify(self, ring: _LeanRing) -> None:
        """``xenevtchn_notify`` the ring's port."""
        if self._notify(self._handle, ring.port) < 0:
            raise OSError(ctypes.get_errno(), "xenevtchn_notify failed")

    # --- receiving -------------------------------------------------------------

    def wait(self, raise_failures: bool = True) -> None:
        """Receive until every awaited reply came; then raise the first reply
        refused meanwhile (an error, a malformed reply), if *raise_failures*.

        :raises FloorError: the rings broke (see :attr:`broken`) or a reply was refused
        :raises TimeoutError: no event for the timeout (the rings are broken)
        """
        if self.broken is not None:
            raise self.broken
        poll, pending, unmask, handle = self._poll, self._pending, self._unmask, self._handle
        self._refused = None
        try:
            while self.awaiting:
                ready = poll(self._timeout_ms)
                if ready <= 0:
                    failure = poll_error() if ready < 0 else None
                    if failure is not None:
                        raise failure
                    if ready == 0:
                        raise TimeoutError(errno.ETIMEDOUT, "no event from the backend")
                    continue
                port = pending(handle)
                if port < 0:
                    raise OSError(ctypes.get_errno(), "xenevtchn_pending failed")
                try:
                    ring = self._by_port.get(port)
                    if ring is not None:
                        self._drain(ring)
                finally:
                    if unmask(handle, port) < 0:
                        raise OSError(ctypes.get_errno(), "xenevtchn_unmask failed")
        except OSError as exc:
            self.broken = exc
            raise
        if raise_failures and self._refused is not None:
            raise self._refused

    def _drain(self, ring: _LeanRing) -> None:
        prod = ring.load_in_prod()
        if self._rmb is not None:
            self._rmb()
        cons = ring.cons
        avail = (prod - cons) & _MASK32
        size, mask, inb, msize = ring.size, ring.mask, ring.inb, self.msize
        if avail > size:
            raise FloorError(errno.EPROTO, f"in_prod {prod} is {avail} bytes past cons {cons}")
        handlers = ring.handlers
        took = False
        try:
            while avail >= _HEADER_SIZE:
                start = cons & mask
                if start + _HEADER_SIZE <= size:
                    length, mtype, tag = _HEADER.unpack_from(inb, start)
                else:
                    length, mtype, tag = _HEADER.unpack(_copy(ring, cons, _HEADER_SIZE))
                if not _HEADER_SIZE <= length <= msize:
                    raise FloorError(errno.EPROTO, f"a reply of {length} bytes (msize {msize})")
                if avail < length:
                    break
                entry = handlers.pop(tag, None)
                if entry is None:
                    raise FloorError(errno.EPROTO, f"a reply for tag {tag}, not in flight")
                handler, bound, awaited = entry
                if length > bound:
                    raise FloorError(errno.EPROTO, f"a {length}-byte reply over its bound {bound}")
                try:
                    handler(ring, cons, length, mtype)
                except FloorError as exc:  # framed and consumed: the rings go on
                    if self._refused is None:
                        self._refused = exc
                cons = (cons + length) & _MASK32
                avail -= length
                ring.room += bound
                took = True
                if awaited:
                    self.awaiting -= 1
        finally:
            if took:
                ring.cons = cons
                self._mb()
                ring.store_in_cons(cons)
        if took and ring.queue:
            put = False
            while ring.queue:
                pieces, total, _, bound, _, _ = ring.queue[0]
                if not self._put(ring, pieces, total, bound):
                    break
                ring.queue.pop(0)
                put = True
            if put:
                self.notify(ring)


def _copy(ring: _LeanRing, cons: int, n: int) -> bytes:
    """*n* bytes at *cons* (they may wrap)."""
    start = cons & ring.mask
    end = start + n
    if end <= ring.size:
        return ring.inb[start:end].tobytes()
    return ring.inb[start:].tobytes() + ring.inb[: end - ring.size].tobytes()


def _failure(ring: _LeanRing, cons: int, length: int, mtype: int, what: str) -> FloorError:
    if mtype == _RLERROR and length >= _HEADER_SIZE + 4:
        code = _U32.unpack(_copy(ring, cons + _HEADER_SIZE, 4))[0]
        return FloorError(code, f"{what}: Rlerror")
    return FloorError(errno.EPROTO, f"{what}: a reply of type {mtype}, {length} bytes")


def _window(lean: LeanRings, sends: list[tuple[int, tuple[Any, ...], int, int, Handler]]) -> None:
    """Put each ``(tag, pieces, total, bound, handler)`` on the ring its tag
    selects (``tag % rings``, as QEMU requires), notify each ring put on
    once, and wait for every reply."""
    rings = lean.rings
    touched = set()
    for tag, pieces, total, bound, handler in sends:
        ring = rings[tag % len(rings)]
        if lean.send(ring, pieces, total, tag, bound, handler):
            touched.add(ring.port)
    for ring in rings:
        if ring.port in touched:
            lean.notify(ring)
    lean.wait()


def read_file(lean: LeanRings, fid: int, offset: int, view: memoryview, count: int) -> int:
    """One read call: Treads of *count* bytes for all of *view*, spread over
    the rings, one notify per ring, the data copied once into *view*: the
    bytes read (short at the end of the file)."""
    n = view.nbytes
    got = [0]

    def into(target: memoryview, asked: int) -> Handler:
        def handler(ring: _LeanRing, cons: int, length: int, mtype: int) -> None:
            if mtype != _TREAD_T + 1 or length < _RREAD_HEADER:
                raise _failure(ring, cons, length, mtype, "Tread")
            start = (cons + _HEADER_SIZE) & ring.mask
            if start + 4 <= ring.size:
                k = _U32.unpack_from(ring.inb, start)[0]
            else:
                k = _U32.unpack(_copy(ring, cons + _HEADER_SIZE, 4))[0]
            if k > asked or _RREAD_HEADER + k != length:
                raise FloorError(errno.EPROTO, f"an Rread of {k} bytes for {asked} asked")
            data = (cons + _RREAD_HEADER) & ring.mask
            end = data + k
            if end <= ring.size:
                target[:k] = ring.inb[data:end]
            else:
                first = ring.size - data
                target[:first] = ring.inb[data:]
                target[first:k] = ring.inb[: end - ring.size]
            got[0] += k

        return handler

    _window(
        lean,
        [(i, (_IO.pack(23, _TREAD_T, i, fid, offset + at, k),), 23, _RREAD_HEADER + k,
          into(view[at : at + k], k))
         for i, at in enumerate(range(0, n, count)) for k in (min(count, n - at),)],
    )  # fmt: skip
    return got[0]


def write_file(lean: LeanRings, fid: int, offset: int, data: memoryview, count: int) -> int:
    """One write call: Twrites of *count* bytes (header and payload put as
    two pieces, no copy before the ring), spread over the rings: the bytes
    written."""
    n = data.nbytes
    done = [0]

    def checked(asked: int) -> Handler:
        def handler(ring: _LeanRing, cons: int, length: int, mtype: int) -> None:
            if mtype != _TWRITE_T + 1 or length != _RREAD_HEADER:
                raise _failure(ring, cons, length, mtype, "Twrite")
            k = _U32.unpack(_copy(ring, cons + _HEADER_SIZE, 4))[0]
            if k > asked:
                raise FloorError(errno.EPROTO, f"an Rwrite of {k} bytes for {asked} sent")
            done[0] += k

        return handler

    _window(
        lean,
        [(i, (_IO.pack(23 + k, _TWRITE_T, i, fid, offset + at, k), data[at : at + k]), 23 + k,
          _RREAD_HEADER, checked(k))
         for i, at in enumerate(range(0, n, count)) for k in (min(count, n - at),)],
    )  # fmt: skip
    return done[0]


def stat_file(lean: LeanRings, root_fid: int, name: bytes, fid: int, turn: int) -> tuple[Any, ...]:
    """One ``stat``: Twalk + Tgetattr + Tclunk written back to back on one
    ring (ring *turn* modulo their number; *fid* must be free, and used by
    this ring's stats only: its clunk is not waited for, the next walk to it
    comes after it on the same ring), one notify, waiting for the Rgetattr
    only: its fields, unpacked."""
    rings = len(lean.rings)
    ring = lean.rings[turn % rings]
    # a request's tag selects its ring (tag % rings): QEMU reads it from that one
    base = ((turn // rings) % 2000) * 3 * rings + ring.index
    result: list[tuple[Any, ...]] = []

    def walked(ring: _LeanRing, cons: int, length: int, mtype: int) -> None:
        if mtype != _TWALK_T + 1 or length != _HEADER_SIZE + 2 + 13:
            raise _failure(ring, cons, length, mtype, "Twalk")

    def got(ring: _LeanRing, cons: int, length: int, mtype: int) -> None:
        if mtype != _TGETATTR_T + 1 or length != _HEADER_SIZE + _RGETATTR.size:
            raise _failure(ring, cons, length, mtype, "Tgetattr")
        result.append(_RGETATTR.unpack(_copy(ring, cons + _HEADER_SIZE, _RGETATTR.size)))

    def clunked(ring: _LeanRing, cons: int, length: int, mtype: int) -> None:
        if mtype != _TCLUNK_T + 1 or length != _HEADER_SIZE:
            raise _failure(ring, cons, length, mtype, "Tclunk")

    walk = _TWALK1.pack(_TWALK1.size + len(name), _TWALK_T, base, root_fid, fid, 1, len(name))
    walk += name
    getattr_ = _TGETATTR.pack(_TGETATTR.size, _TGETATTR_T, base + rings, fid, _GETATTR_BASIC)
    clunk = _TCLUNK.pack(_TCLUNK.size, _TCLUNK_T, base + 2 * rings, fid)
    put = lean.send(ring, (walk,), len(walk), base, _HEADER_SIZE + 2 + 13, walked)
    put = lean.send(ring, (getattr_,), len(getattr_), base + rings,
                    _HEADER_SIZE + _RGETATTR.size, got) or put  # fmt: skip
    put = lean.send(ring, (clunk,), len(clunk), base + 2 * rings, _HEADER_SIZE + 4, clunked,
                    awaited=False) or put  # fmt: skip
    if put:
        lean.notify(ring)
    lean.wait()
    return result[0]
