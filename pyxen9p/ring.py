"""The Xen 9pfs data rings (``xen/include/public/io/9pfs.h`` and ``ring.h``).

One 9pfs *ring* is an interface page plus ``1 << order`` data pages.  The data
pages hold two byte rings of ``ring_size(order)`` bytes each: ``in`` (backend
to frontend) first, then ``out`` (frontend to backend).  Indices are
free-running 32-bit counters; a position in the buffer is ``index & (size-1)``.

Interface page layout (``struct xen_9pfs_data_intf``; the offsets of the C
struct, not of the spec's diagram)::

    0   in_cons     4   in_prod     8  pad
    64  out_cons    68  out_prod    72 pad
    128 ring_order  132 ref[1 << ring_order]

Everything read from shared memory is untrusted.  :class:`Producer` and
:class:`Consumer` keep *private* copies of the indices their side owns and
never read them back from the shared page; every index the peer owns is
checked (``(prod - cons) mod 2**32 <= ring size``) before use, and a violation
raises :class:`~pyxen9p.errors.RingProtocolError`; a message whose size field
is impossible raises :class:`~pyxen9p.errors.FramingError`, as on a stream.
Barriers follow the spec's "Ring Usage" order (see :mod:`pyxen9p.barrier`).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from functools import partial

from pyxen9p.barrier import Barriers, _noop
from pyxen9p.errors import FramingError, RingProtocolError

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "INTF_SIZE",
    "MAX_REFS",
    "MAX_RING_ORDER",
    "MIN_RING_ORDER",
    "XEN_PAGE_SIZE",
    "ByteRing",
    "Consumer",
    "Interface",
    "Producer",
    "queued",
    "ring_size",
]

XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT
#: ``size[4] id[1] tag[2]``, little-endian; size includes the header
HEADER = struct.Struct("<IBH")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct("<I")
#: ``size[4] type[1] tag[2] count[4]``: what precedes an Rread's data
RREAD_HEADER_SIZE = 11
#: Smallest order the spec allows ("must be at least 1").
MIN_RING_ORDER = 1
#: Largest order whose ``ref[]`` fits the interface page as a power of two.
MAX_RING_ORDER = 9
#: Bytes of the fixed part of ``struct xen_9pfs_data_intf``.
INTF_SIZE = 132
#: Grant references that fit in the interface page.
MAX_REFS = (XEN_PAGE_SIZE - INTF_SIZE) // 4

_IN_CONS, _IN_PROD, _OUT_CONS, _OUT_PROD, _RING_ORDER = 0, 1, 16, 17, 32
_REF0 = INTF_SIZE // 4
_INDICES = {"in_cons": _IN_CONS, "in_prod": _IN_PROD, "out_cons": _OUT_CONS, "out_prod": _OUT_PROD}
_MASK32 = 0xFFFFFFFF


def ring_size(order: int) -> int:
    """``XEN_FLEX_RING_SIZE(order)``: bytes in each direction of a ring.

    :raises ValueError: if *order* is outside ``0..MAX_RING_ORDER``
    """
    if not 0 <= order <= MAX_RING_ORDER:
        raise ValueError(f"ring order {order} outside 0..{MAX_RING_ORDER}")
    return 1 << (order + XEN_PAGE_SHIFT - 1)


def queued(prod: int, cons: int, size: int) -> int:
    """Bytes between *cons* and *prod* in a ring of *size* bytes.

    Stricter than ``ring.h``'s ``_queued``: a distance larger than the ring
    is a protocol violation, not a value to be masked.

    :raises RingProtocolError: if ``(prod - cons) mod 2**32 > size``
    """
    distance = (prod - cons) & _MASK32
    if distance > size:
        raise RingProtocolError(
            f"ring indices out of range: prod={prod:#x} cons={cons:#x} for a ring of {size} bytes"
        )
    return distance


class Interface:
    """Typed access to a shared interface page.

    Each index is one aligned 32-bit load or store (``memoryview`` of format
    ``I``), never split.

    :param page: a writable view of exactly one page
    """

    def __init__(self, page: memoryview) -> None:
        if page.nbytes != XEN_PAGE_SIZE:
            raise ValueError(f"interface page must be {XEN_PAGE_SIZE} bytes, got {page.nbytes}")
        self._u32 = page.cast("B").cast("I")

    def release(self) -> None:
        """Drop the view of the page (before the page is unshared)."""
        self._u32.release()

    @property
    def in_cons(self) -> int:
        """``in_cons`` (frontend-owned)."""
        return int(self._u32[_IN_CONS])

    @in_cons.setter
    def in_cons(self, value: int) -> None:
        self._u32[_IN_CONS] = value & _MASK32

    @property
    def in_prod(self) -> int:
        """``in_prod`` (backend-owned)."""
        return int(self._u32[_IN_PROD])

    @in_prod.setter
    def in_prod(self, value: int) -> None:
        self._u32[_IN_PROD] = value & _MASK32

    @property
    def out_cons(self) -> int:
        """``out_cons`` (backend-owned)."""
        return int(self._u32[_OUT_CONS])

    @out_cons.setter
    def out_cons(self, value: int) -> None:
        self._u32[_OUT_CONS] = value & _MASK32

    @property
    def out_prod(self) -> int:
        """``out_prod`` (frontend-owned)."""
        return int(self._u32[_OUT_PROD])

    @out_prod.setter
    def out_prod(self, value: int) -> None:
        self._u32[_OUT_PROD] = value & _MASK32

    @property
    def ring_order(self) -> int:
        """``ring_order`` as currently stored (untrusted when read by a peer)."""
        return int(self._u32[_RING_ORDER])

    @ring_order.setter
    def ring_order(self, value: int) -> None:
        self._u32[_RING_ORDER] = value

    def loader(self, name: str) -> Callable[[], int]:
        """A call that loads the index *name* (``in_cons``, ``in_prod``,
        ``out_cons``, ``out_prod``): one aligned 32-bit load, no Python frame."""
        return partial(self._u32.__getitem__, _INDICES[name])

    def storer(self, name: str) -> Callable[[int], None]:
        """A call that stores a 32-bit value (already masked) into the index *name*."""
        return partial(self._u32.__setitem__, _INDICES[name])

    def ref(self, index: int) -> int:
        """Read ``ref[index]`` (a backend reads the frontend's grant list)."""
        if not 0 <= index < MAX_REFS:
            raise IndexError(f"ref index {index} outside 0..{MAX_REFS - 1}")
        return int(self._u32[_REF0 + index])

    def set_refs(self, refs: tuple[int, ...] | list[int]) -> None:
        """Write ``ref[0..len(refs)-1]``."""
        if len(refs) > MAX_REFS:
            raise ValueError(f"{len(refs)} refs do not fit the interface page")
        for i, ref in enumerate(refs):
            self._u32[_REF0 + i] = ref


class ByteRing:
    """One direction of a flex ring: a power-of-two byte buffer.

    :param buffer: a view whose length is a power of two (it may be the
        ``in`` or ``out`` half of the shared data pages)
    """

    def __init__(self, buffer: memoryview) -> None:
        size = buffer.nbytes
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size {size} is not a power of two")
        self.buffer = buffer.cast("B") if buffer.format != "B" else buffer
        self.size = size

    def write(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Copy *data* into the ring starting at *index*, wrapping once."""
        n = len(data)
        if n > self.size:
            raise ValueError(f"{n} bytes do not fit a ring of {self.size}")
        start = index & (self.size - 1)
        first = min(n, self.size - start)
        self.buffer[start : start + first] = data[:first]
        if first < n:
            self.buffer[: n - first] = data[first:]

    def read(self, index: int, n: int) -> bytes:
        """Copy *n* bytes out of the ring starting at *index*, wrapping once
        (one copy per byte, also across the wrap)."""
        if not 0 <= n <= self.size:
            raise ValueError(f"cannot read {n} bytes from a ring of {self.size}")
        start = index & (self.size - 1)
        first = min(n, self.size - start)
        if first == n:
            return self.buffer[start : start + n].tobytes()
        return b"".join((self.buffer[start:], self.buffer[: n - first]))

    def readinto(self, index: int, target: memoryview) -> None:
        """Copy ``target.nbytes`` bytes from *index* straight into *target*."""
        n = target.nbytes
        if n > self.size:
            raise ValueError(f"cannot read {n} bytes from a ring of {self.size}")
        start = index & (self.size - 1)
        first = min(n, self.size - start)
        target[:first] = self.buffer[start : start + first]
        if first < n:
            target[first:] = self.buffer[: n - first]

    def u32(self, index: int) -> int:
        """The little-endian 32-bit value at *index* (it may wrap)."""
        return int.from_bytes(self.read(index, 4), "little")

    def release(self) -> None:
        """Drop the view of the shared buffer."""
        self.buffer.release()


class Producer:
    """The writing side of one :class:`ByteRing`.

    :param ring: the byte ring written
    :param load_cons: reads the peer's consumer index (untrusted)
    :param store_prod: publishes this side's producer index
    :param barriers: memory barriers for this CPU
    :param prod: the initial private producer index
    """

    def __init__(
        self,
        ring: ByteRing,
        load_cons: Callable[[], int],
        store_prod: Callable[[int], None],
        barriers: Barriers,
        prod: int = 0,
    ) -> None:
        self.ring = ring
        self._load_cons = load_cons
        self._store_prod = store_prod
        self._barriers = barriers
        self._mb = barriers.mb
        # a barrier the architecture makes unnecessary is not called at all
        self._wmb = None if barriers.wmb is _noop else barriers.wmb
        self.prod = prod & _MASK32
        # a ByteRing is written in place (a wrapper of a ring, say a test's
        # guard, is written through its write())
        self._buffer: memoryview | None = ring.buffer if type(ring) is ByteRing else None

    def free(self) -> int:
        """Bytes that can be written now (validated against the peer's cons)."""
        cons = self._load_cons()
        self._mb()
        size = self.ring.size
        used = (self.prod - cons) & _MASK32
        if used > size:
            queued(self.prod, cons, size)  # raises RingProtocolError
        return size - used

    def put(self, message: bytes | bytearray | memoryview) -> bool:
        """Write *message* whole and publish it with one index store.

        :returns: ``False`` (writing nothing) if there is not enough room
        """
        return self.put_pieces((message,), len(message))

    def put_pieces(
        self,
        pieces: list[memoryview] | tuple[memoryview | bytes | bytearray, ...],
        total: int,
    ) -> bool:
        """:meth:`put` for a message given as *pieces* (flat byte views whose
        lengths add up to *total*), copied straight from each piece: one copy
        of each byte, two slice assignments for a piece that wraps.

        :returns: ``False`` (writing nothing) if there is not enough room
        """
        ring = self.ring
        size = ring.size
        if total > size:
            raise ValueError(f"a {total}-byte message can never fit a {size}-byte ring")
        cons = self._load_cons()
        self._mb()
        prod = self.prod
        used = (prod - cons) & _MASK32
        if used > size:
            queued(prod, cons, size)  # raises RingProtocolError
        if size - used < total:
            return False
        buffer = self._buffer
        if buffer is None:  # a ring-like without a ByteRing's buffer (a test's guard)
            index = prod
            for piece in pieces:
                if piece:
                    ring.write(index, piece)
                    index += len(piece)
        else:
            start = prod & (size - 1)
            for piece in pieces:
                end = start + len(piece)
                if end <= size:
                    buffer[start:end] = piece
                    start = end & (size - 1)
                else:  # the piece wraps: its head at the end, its tail at the start
                    first = size - start
                    buffer[start:] = piece[:first]
                    start = end - size
                    buffer[:start] = piece[first:]
        if self._wmb is not None:
            self._wmb()
        self.prod = prod = (prod + total) & _MASK32
        self._store_prod(prod)
        return True


def _copy_out(buffer: memoryview, size: int, start: int, target: memoryview, n: int) -> None:
    """Copy the *n* bytes at *start* of a ring's *buffer* (of *size*
    bytes; they may wrap to its start) into *target* (of *n* bytes)."""
    end = start + n
    if end <= size:
        target[:] = buffer[start:end]
    else:  # the head at the end of the ring, the tail at its start
        first = size - start
        target[:first] = buffer[start:]
        target[first:] = buffer[: end - size]


class Consumer:
    """The reading side of one :class:`ByteRing`.

    :param ring: the byte ring read
    :param load_prod: reads the peer's producer index (untrusted)
    :param store_cons: publishes this side's consumer index
    :param barriers: memory barriers for this CPU
    :param cons: the initial private consumer index
    """

    def __init__(
        self,
        ring: ByteRing,
        load_prod: Callable[[], int],
        store_cons: Callable[[int], None],
        barriers: Barriers,
        cons: int = 0,
    ) -> None:
        self.ring = ring
        self._load_prod = load_prod
        self._store_cons = store_cons
        self._barriers = barriers
        self._mb = barriers.mb
        self._rmb = None if barriers.rmb is _noop else barriers.rmb
        self.cons = cons & _MASK32
        self._readinto: Callable[[int, memoryview], None] | None = getattr(ring, "readinto", None)
        # a ByteRing's header is read in place where it does not wrap (a
        # wrapper of a ring, say a test's guard, is read through its read())
        self._buffer: memoryview | None = ring.buffer if type(ring) is ByteRing else None
        self._size = ring.size
        self._mask = ring.size - 1

    def available(self) -> int:
        """Bytes the peer has published and this side has not consumed."""
        prod = self._load_prod()
        if self._rmb is not None:
            self._rmb()
        distance = (prod - self.cons) & _MASK32
        if distance > self._size:
            queued(prod, self.cons, self._size)  # raises RingProtocolError
        return distance

    def peek_header(self, max_size: int) -> tuple[int, int, int] | None:
        """Return ``(size, type, tag)`` of the next message once it is queued whole.

        :param max_size: the largest acceptable message (the negotiated msize)
        :returns: ``None`` while fewer bytes than the header or than the whole
            message are available
        :raises FramingError: if the header's size is below 7 (``EPROTO``) or
            above *max_size* or the ring (``EMSGSIZE``): the stream cannot be
            resynchronised (the same failure as on a stream transport)
        :raises RingProtocolError: if the peer's index is out of range
        """
        prod = self._load_prod()  # available(), inline
        if self._rmb is not None:
            self._rmb()
        avail = (prod - self.cons) & _MASK32
        if avail > self._size:
            queued(prod, self.cons, self._size)  # raises RingProtocolError
        return self.header_within(avail, max_size)

    def header_within(self, avail: int, max_size: int) -> tuple[int, int, int] | None:
        """:meth:`peek_header` when *avail* bytes are known to be queued (a
        value :meth:`available` returned, less what was taken since): the
        peer's index is not loaded again."""
        if avail < HEADER_SIZE:
            return None
        ring_size = self._size
        start = self.cons & self._mask
        if self._buffer is not None and start + HEADER_SIZE <= ring_size:
            size, mtype, tag = HEADER.unpack_from(self._buffer, start)  # one read of each byte
        else:
            size, mtype, tag = HEADER.unpack(self.ring.read(self.cons, HEADER_SIZE))
        if HEADER_SIZE <= size <= max_size and size <= ring_size:
            return (size, mtype, tag) if avail >= size else None
        if size < HEADER_SIZE:
            raise FramingError(
                errno.EPROTO,
                f"message header announces {size} bytes, less than the 9P header"
                f" (type {mtype}, tag {tag})",
            )
        raise FramingError(
            errno.EMSGSIZE,
            f"message header announces {size} bytes, more than the limit"
            f" {min(max_size, ring_size)} (type {mtype}, tag {tag})",
        )

    def next_within(self, avail: int, max_size: int) -> tuple[int, int, int, int] | None:
        """The next message queued whole, when *avail* bytes were queued
        (a value :meth:`available` returned, less the messages found since):
        ``(size, type, tag, avail - size)``, or ``None`` when none is, the
        peer's index then loaded once more for messages that came meanwhile.

        A drain's loop: ``avail = available()``, then ``while (found :=
        next_within(avail, msize)) is not None: size, mtype, tag, avail =
        found`` and take or skip ``size`` bytes.

        :raises FramingError: as :meth:`header_within`
        :raises RingProtocolError: the peer's index is out of range
        """
        if avail < HEADER_SIZE:  # used up (the common end of a drain): load the index again
            fresh = self.available()
            if fresh == avail:
                return None
            avail = fresh
        ring_size = self._size
        start = self.cons & self._mask
        if avail >= HEADER_SIZE and self._buffer is not None and start + HEADER_SIZE <= ring_size:
            # header_within's common case, inline (one frame per message)
            size, mtype, tag = HEADER.unpack_from(self._buffer, start)
            if HEADER_SIZE <= size <= max_size and size <= ring_size and avail >= size:
                return size, mtype, tag, avail - size
        header = self.header_within(avail, max_size)  # raises for an impossible size
        if header is None:
            fresh = self.available()
            if fresh == avail:
                return None
            avail = fresh
            header = self.header_within(avail, max_size)
            if header is None:
                return None
        size, mtype, tag = header
        return size, mtype, tag, avail - size

    def take(self, n: int) -> bytes:
        """Read *n* already-validated bytes and advance the private index.

        The new index is published by :meth:`publish`.
        """
        buffer = self._buffer
        cons = self.cons
        start = cons & self._mask
        self.cons = (cons + n) & _MASK32
        if buffer is not None and start + n <= self._size:
            return buffer[start : start + n].tobytes()  # ByteRing.read's own copy, inline
        return self.ring.read(cons, n)

    def take_into(self, target: memoryview) -> None:
        """Copy ``target.nbytes`` already-validated bytes into *target* and
        advance the private index (published by :meth:`publish`)."""
        buffer = self._buffer
        cons = self.cons
        n = target.nbytes
        if buffer is not None:
            _copy_out(buffer, self._size, cons & self._mask, target, n)
        elif self._readinto is not None:
            self._readinto(cons, target)
        else:  # a ring-like with only read() (a test's guard, say)
            target[:] = self.ring.read(cons, n)
        self.cons = (cons + n) & _MASK32

    def take_rread(self, size: int, target: memoryview) -> bytes | None:
        """Take the Rread of *size* bytes at the private index (queued whole,
        at least its 11-byte header): its data copied to the start of
        *target*, its header returned as bytes.  ``None``, and nothing
        taken, if the count it announces is not ``size - 11`` or is more
        than *target* holds.  (:meth:`peek_u32`, :meth:`take` and
        :meth:`take_into` in one frame.)"""
        buffer = self._buffer
        cons = self.cons
        ring_size = self._size
        start = cons & self._mask
        if buffer is None or start + RREAD_HEADER_SIZE > ring_size:
            count = self.peek_u32(HEADER_SIZE)
            if count != size - RREAD_HEADER_SIZE or count > target.nbytes:
                return None
            head = self.take(RREAD_HEADER_SIZE)
            self.take_into(target[:count])
            return head
        count = _U32.unpack_from(buffer, start + HEADER_SIZE)[0]
        if count != size - RREAD_HEADER_SIZE or count > target.nbytes:
            return None
        head = buffer[start : start + RREAD_HEADER_SIZE].tobytes()
        start += RREAD_HEADER_SIZE
        end = start + count
        if end <= ring_size:
            target[:count] = buffer[start:end]
        else:
            _copy_out(buffer, ring_size, start & self._mask, target[:count], count)
        self.cons = (cons + size) & _MASK32
        return head

    def skip(self, n: int) -> None:
        """Pass over *n* already-validated bytes without reading them."""
        self.cons = (self.cons + n) & _MASK32

    def peek_u32(self, offset: int) -> int:
        """The little-endian 32-bit value *offset* bytes past the private
        index (inside a message already validated as queued whole)."""
        ring_size = self._size
        start = (self.cons + offset) & self._mask
        if self._buffer is not None and start + 4 <= ring_size:
            return int(_U32.unpack_from(self._buffer, start)[0])  # one read of each byte
        return self.ring.u32(self.cons + offset)

    def peer_may_wait(self, since: int, need: int) -> bool:
        """After :meth:`publish`: whether the peer may have found less than
        *need* bytes of room at some time since this side's index was
        *since* (and so may wait for a notification to go on).

        The peer found that little room only if more than ``size - need``
        bytes were queued from *since* then; what it has produced by now,
        loaded after the index was published, bounds that.  A peer's index
        out of range answers ``True``.
        """
        self._mb()  # the published index before the peer's is loaded again
        prod = self._load_prod()
        return ((prod - since) & _MASK32) > self.ring.size - need

    def publish(self) -> None:
        """Publish the private consumer index, after the data was read."""
        self._mb()
        self._store_cons(self.cons)
