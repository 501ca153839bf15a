"""The 9P client's session layer: tags, fids, one request and its reply, flushes.

Below the path API of :class:`~pyxen9p.p9.client.Client` (and the
multiplexer's backend side, :mod:`pyxen9p.p9.mux`) sits what every 9P caller
needs whatever it does with files:

* :class:`IdPool`: numbers (fids, or tags) handed out and recycled
  most-recently-freed first; pure, no locks, no I/O (the multiplexer uses it
  from its event loop for its backend tags and fids);
* :class:`TagAllocator`: tags handed out round-robin; pure, no locks;
* :class:`TagPool`: the client's tags ``0..0xFFFE``, kept per ring
  (consecutive requests spread over the rings of a Xen transport), never
  NOTAG, reused only once free (the least recently released first), and
  *quarantined* for good when a reply may still come; thread-safe with no
  lock taken unless a caller must wait for a free tag;
* :class:`FidPool`: fids recycled most-recently-freed first, ``EMFILE``
  when none is left; thread-safe with no lock;
* :func:`check_reply`: a raw reply checked against its request (size, tag,
  type) and error replies mapped to :class:`OSError`; pure;
* :class:`Wire`: the session's view of the transport's sending side, which
  detects what the transport offers (rings, message pieces, reads straight
  into the caller's buffer, batches) and falls back where it does not;
* :class:`Chain`: requests written back to back on one ring (a compound
  operation such as walk + getattr + clunk), each reply checked;
* :class:`ClientSession`: one blocking 9P session over a
  :class:`~pyxen9p.p9.transport.Transport`: version negotiation, attach,
  :meth:`ClientSession.rpc` (a request and its checked reply), the Tflush of a
  request that timed out, declaring an unresponsive server dead, and eager or
  deferred clunks.

An asyncio caller can reuse the pure parts (:class:`IdPool`,
:class:`TagAllocator`, :func:`check_reply`, :func:`server_error`) with its
own I/O.
"""

from __future__ import annotations

import collections
import enum
import errno
import functools
import inspect
import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal, TypeVar

from pyxen9p._requests import MIN_MSIZE, NotSent
from pyxen9p.errors import TransportClosedError, TransportError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.codec import ProtocolError
from pyxen9p.p9.transport import Transport

__all__ = [
    "MAX_TAG",
    "MIN_MSIZE",
    "Chain",
    "ClientSession",
    "FidPool",
    "IdPool",
    "TagAllocator",
    "TagPool",
    "Wire",
    "check_reply",
    "server_error",
    "version_answer",
]

log = logging.getLogger(__name__)

#: Highest tag given to requests (NOTAG, 0xFFFF, is Tversion's).
MAX_TAG = 0xFFFE
_NTAGS = MAX_TAG + 1
#: The dialects the client speaks.
_DIALECTS = (c.VERSION_9P2000_L, c.VERSION_9P2000_U)

_R = TypeVar("_R", bound=c.Message)
_T = TypeVar("_T")

#: size type tag fid offset count: the fixed part of Tread (and Twrite's, data apart)
_TREAD = struct.Struct("<IBHIQI")
#: size type tag count: the fixed part of Rread
_RREAD = struct.Struct("<IBHI")
_TREAD_TYPE = int(c.MessageType.TREAD)
_RREAD_TYPE = int(c.MessageType.RREAD)
_TWRITE_TYPE = int(c.MessageType.TWRITE)
_RWRITE_TYPE = int(c.MessageType.RWRITE)
#: ``size[4] type[1] tag[2] count[4]``: an Rwrite, whole
_RWRITE = _RREAD
#: size type tag fid: Tclunk
_TCLUNK = struct.Struct("<IBHI")
_TCLUNK_TYPE = int(c.MessageType.TCLUNK)
#: The replies that may answer a Tclunk.
_CLUNK_ANSWERS = frozenset(
    int(t) for t in (c.MessageType.RCLUNK, c.MessageType.RLERROR, c.MessageType.RERROR)
)
#: A message as the wire takes it: whole, or pieces written one after another.
Pieces = bytes | tuple[bytes | bytearray | memoryview, ...]


class _Default(enum.Enum):
    TOKEN = 0


_DEFAULT = _Default.TOKEN
_TimeoutArg = float | None | Literal[_Default.TOKEN]


# --------------------------------------------------------------------------
# Pure parts


class IdPool:
    """Numbers ``0 .. limit-1`` handed out and recycled, most-recently-freed first.

    Pure (no lock, no I/O): a caller shared between threads locks around it
    (:class:`FidPool` does).

    :param limit: the first number never handed out (e.g. NOFID, NOTAG)
    :param errnum: the ``errno`` of the :class:`OSError` raised when exhausted
    :param message: its message

    :ivar used: the numbers handed out and not freed (nor lost)
    :ivar lost: how many numbers were given up with :meth:`lose`
    """

    def __init__(self, limit: int, errnum: int = errno.EAGAIN, message: str = "") -> None:
        self._limit = limit
        self._errnum = errnum
        self._message = message or f"all {limit} identifiers are in use"
        self._next = 0
        self._free: list[int] = []
        self.used: set[int] = set()
        self.lost = 0

    def alloc(self, like: int = 0, modulus: int = 1) -> int:
        """A free number congruent to *like* modulo *modulus*.

        :raises OSError: none left (the ``errnum`` given)
        """
        n = -1
        if modulus == 1:
            if self._free:
                n = self._free.pop()
        else:
            for i in range(len(self._free) - 1, -1, -1):
                if self._free[i] % modulus == like % modulus:
                    n = self._free.pop(i)
                    break
        if n < 0:
            while self._next < self._limit and self._next % modulus != like % modulus:
                self._free.append(self._next)
                self._next += 1
            if self._next >= self._limit:
                raise OSError(self._errnum, self._message)
            n = self._next
            self._next += 1
        self.used.add(n)
        return n

    def free(self, n: int) -> None:
        """Give *n* back for reuse (ignored if it is not in use)."""
        if n in self.used:
            self.used.remove(n)
            self._free.append(n)

    def lose(self, n: int) -> None:
        """Forget *n* without ever reusing it (its state on the peer is unknown)."""
        if n in self.used:
            self.used.remove(n)
            self.lost += 1


class TagAllocator:
    """Tags ``0..0xFFFE`` handed out round-robin, never NOTAG; pure (no lock, no I/O).

    A tag is reused only once released; a quarantined tag is never reused
    (its reply may still come).

    :ivar busy: tags in use, the quarantined ones included
    :ivar stuck: the quarantined tags
    """

    def __init__(self) -> None:
        self.busy: set[int] = set()
        self.stuck: set[int] = set()
        self._next = 0

    @property
    def full(self) -> bool:
        """Whether every tag is in use."""
        return len(self.busy) >= _NTAGS

    def acquire(self) -> int | None:
        """The next free tag after the last one given, or ``None`` if none is free."""
        if len(self.busy) >= _NTAGS:
            return None
        tag = self._next
        while tag in self.busy:
            tag = (tag + 1) % _NTAGS
        self.busy.add(tag)
        self._next = (tag + 1) % _NTAGS
        return tag

    def acquire_group(self, count: int, modulus: int) -> list[int] | None:
        """*count* free tags congruent modulo *modulus* (one ring's), or ``None``.

        The first is the next round-robin tag (so successive groups spread
        over the rings); the round-robin goes on after it.
        """
        if len(self.busy) + count > _NTAGS:
            return None
        first = self.acquire()
        if first is None:
            return None
        tags = [first]
        tag = first
        for _ in range(_NTAGS // max(modulus, 1) + 1):
            if len(tags) == count:
                break
            tag += modulus
            if tag >= _NTAGS:
                tag = first % modulus
            if tag not in self.busy:
                self.busy.add(tag)
                tags.append(tag)
        self._next = (first + 1) % _NTAGS
        if len(tags) < count:
            for t in tags:
                self.busy.discard(t)
            return None
        return tags

    def release(self, tag: int) -> None:
        """*tag* may be reused."""
        self.busy.discard(tag)

    def quarantine(self, tag: int) -> None:
        """Never reuse *tag*."""
        self.busy.add(tag)
        self.stuck.add(tag)

    @property
    def in_use(self) -> int:
        """Tags in use, the quarantined ones excluded."""
        return len(self.busy) - len(self.stuck)


def server_error(err: int, path: str | None, text: str | None = None) -> OSError:
    """The :class:`OSError` for the error number *err* a server sent about *path*.

    An impossible number (not in ``1..4095``) gives a
    :class:`~pyxen9p.errors.ProtocolError` (``EPROTO``).
    """
    if not 0 < err < 4096:
        message = f"{text or 'error'} (the server sent the invalid error number {err})"
        if path is not None:
            return ProtocolError(errno.EPROTO, message, path)
        return ProtocolError(errno.EPROTO, message)
    message = text or os.strerror(err)
    return OSError(err, message, path) if path is not None else OSError(err, message)


def check_reply(
    raw: bytes,
    tag: int,
    message: c.Message,
    rtype: type[_R],
    path: str | None,
    msize: int,
    decode: Callable[[bytes], c.Message] = c.decode,
    *,
    dotu: bool = False,
) -> _R:
    """Decode the reply *raw* to *message* (sent with *tag*) and check it.

    :param rtype: the reply type expected
    :param path: the path named in errors
    :param msize: the negotiated msize (a longer reply is refused)
    :param decode: the decoder of the dialect
    :param dotu: 9P2000.u: an Rerror with error number 0 means ``EIO``
        (xen-9pfsd may pass on a stale one)
    :raises OSError: an error reply (Rlerror, Rerror)
    :raises ~pyxen9p.errors.ProtocolError: too long, malformed, of another
        tag or another type
    """
    if len(raw) > msize:
        raise ProtocolError(f"reply of {len(raw)} bytes exceeds the msize {msize}")
    reply = decode(raw)
    if reply.tag != tag:
        raise ProtocolError(f"reply tagged {reply.tag} to a request tagged {tag}")
    if isinstance(reply, c.Rlerror):
        raise server_error(reply.ecode, path)
    if isinstance(reply, c.Rerror):
        if reply.errno == 0 and dotu:
            # xen-9pfsd may pass on a stale errno of 0 (a walk onto a symbolic link)
            raise server_error(
                errno.EIO, path, f"{reply.ename or 'error'} (the server sent error number 0)"
            )
        raise server_error(reply.errno, path, reply.ename)
    if type(reply) is not rtype:
        raise ProtocolError(
            f"{type(reply).__name__} in reply to {type(message).__name__}"
            f" (expected {rtype.__name__})"
        )
    return reply


def version_answer(reply: c.Rversion | c.Rlerror | c.Rerror) -> str:
    """What a server answered to a Tversion, for an error message."""
    if isinstance(reply, c.Rversion):
        return repr(reply.version)
    err = reply.ecode if isinstance(reply, c.Rlerror) else reply.errno
    return os.strerror(err) if 0 < err < 4096 else f"error {err}"


# --------------------------------------------------------------------------
# Thread-safe pools


class TagPool:
    """The client's tags ``0..0xFFFE`` (never NOTAG), thread-safe with no
    lock taken while a tag is free: :meth:`acquire` waits only when none is.

    The tags are kept per ring (tag modulo *rings*, the transport's rings):
    each ring's tags are handed out first in increasing order (never handed
    out yet), then the least recently released first.  A released tag thus
    comes back only after every other free tag of its ring was used (the
    round-robin of :class:`TagAllocator`), and successive requests (and
    groups) go to successive rings.  A *quarantined* tag (its reply may
    still come) is never handed out again.

    Why no lock is needed on the way of a request (every step is one
    C-level operation on a builtin: atomic under the GIL, and thread-safe on
    free-threaded builds too, which lock each such object around the call):

    * ``next()`` of an :func:`itertools.count` gives each value to one
      caller only (a ring's tags not handed out yet, and the ring turn);
    * ``deque.popleft()`` gives each released tag to one caller only;
      ``deque.append`` / ``appendleft`` put it back;
    * a tag handed out is in the ``busy`` dict; :meth:`release` and
      :meth:`quarantine` first ``pop`` it from there, and only the one call
      that got it back does the rest: a tag released twice (or released and
      quarantined) is never queued twice;
    * a caller owns a tag from its ``popleft`` (or ``next``) on: no other
      thread can see it until it is released, so the steps after that
      (``busy[tag] = True``) need no lock.

    The lock (and its condition) serves only a caller that found no tag
    free and must wait, and the rare paths (:meth:`_start_at`).  A waiter
    counts itself in ``_waiting`` (under the lock) *before* its last look at
    the free tags; :meth:`release` reads ``_waiting`` *after* queuing its
    tag.  So either the waiter's look sees the tag, or the releaser sees the
    waiter and notifies it (taking the lock, which the waiter holds until
    it waits): no wake-up is lost.

    :param rings: the transport's rings (tags of one ring: congruent
        modulo *rings*)
    """

    def __init__(self, rings: int = 1) -> None:
        self._rings = max(1, min(int(rings), _NTAGS))
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        #: per ring: the tags not handed out yet (from ``next``, up to ``_NTAGS``)
        self._fresh = [itertools.count(r, self._rings) for r in range(self._rings)]
        #: per ring: whether ``_fresh`` may have tags left (a stale True costs a ``next``)
        self._fresh_open = [True] * self._rings
        #: per ring: the released tags, least recently released first
        self._free: list[collections.deque[int]] = [
            collections.deque() for _ in range(self._rings)
        ]
        self._turn = itertools.count()
        self._busy: dict[int, bool] = {}
        self._stuck: set[int] = set()

    @property
    def rings(self) -> int:
        """The rings the tags are kept for."""
        return self._rings

    def _take_one(self, r: int) -> int | None:
        """A free tag of ring *r* (the caller's from now on), or ``None``."""
        if self._fresh_open[r]:
            tag = next(self._fresh[r])
            if tag < _NTAGS:
                return tag
            self._fresh_open[r] = False  # a plain store: a racing reader costs a next()
        free = self._free[r]
        while True:
            try:
                tag = free.popleft()
            except IndexError:
                return None
            if tag not in self._stuck:  # (only a tag released, then quarantined)
                return tag

    def _take(self, r: int, count: int) -> list[int] | None:
        """*count* free tags of ring *r* (the caller's from now on), or
        ``None`` (and none taken)."""
        tags: list[int] = []
        if self._fresh_open[r]:
            fresh = self._fresh[r]
            while len(tags) < count:
                tag = next(fresh)
                if tag >= _NTAGS:
                    self._fresh_open[r] = False
                    break
                tags.append(tag)
            if len(tags) == count:
                return tags
        free = self._free[r]
        while len(tags) < count:
            try:
                tag = free.popleft()
            except IndexError:
                self._give_back(tags)
                return None
            if tag not in self._stuck:
                tags.append(tag)
        return tags

    def _give_back(self, tags: list[int]) -> None:
        """Tags taken and not handed out (never marked busy): first in line again."""
        rings = self._rings
        for tag in reversed(tags):
            self._free[tag % rings].appendleft(tag)

    def _try_one(self) -> int | None:
        """A free tag (marked busy), from the next ring that has one, or ``None``."""
        rings = self._rings
        r = next(self._turn) % rings if rings > 1 else 0
        for _ in range(rings):
            tag = self._take_one(r)
            if tag is not None:
                self._busy[tag] = True
                return tag
            r = (r + 1) % rings
        return None

    def _try_group(self, count: int, modulus: int) -> list[int] | None:
        """*count* free tags (marked busy) congruent modulo *modulus*, or ``None``."""
        rings = self._rings
        tags: list[int] | None = None
        if modulus <= 1 or rings % modulus == 0:
            # every tag of one of our rings is congruent modulo *modulus*
            r = next(self._turn) % rings if rings > 1 else 0
            for _ in range(rings):
                tags = self._take(r, count)
                if tags is not None:
                    break
                r = (r + 1) % rings
        else:
            tags = self._take_congruent(count, modulus)
        if tags is not None:
            busy = self._busy
            for tag in tags:
                busy[tag] = True
        return tags

    def _take_congruent(self, count: int, modulus: int) -> list[int] | None:
        """*count* free tags congruent modulo a *modulus* that does not
        divide :attr:`rings` (a transport replaced by one with other rings),
        taken one at a time, the others given back; or ``None``."""
        rings = self._rings
        start = next(self._turn)
        for k in range(rings):
            first = self._take_one((start + k) % rings)
            if first is None:
                continue
            tags, others = [first], list[int]()
            for s in range(rings):
                r = (start + k + s) % rings
                while len(tags) < count:
                    tag = self._take_one(r)
                    if tag is None:
                        break
                    (tags if tag % modulus == first % modulus else others).append(tag)
            self._give_back(others)
            if len(tags) == count:
                return tags
            self._give_back(tags)
        return None

    def acquire(self, timeout: float | None) -> int:
        """A free tag, waiting at most *timeout* seconds (``None``: no limit).

        :raises TimeoutError: none became free in time
        """
        tag = self._try_one()
        if tag is None:
            return self._wait(self._try_one, timeout, "no free 9P tag")
        return tag

    def acquire_many(self, count: int, timeout: float | None) -> list[int]:
        """*count* free tags, successive ones on successive rings, waiting at
        most *timeout* seconds for each one not free.

        :raises TimeoutError: not enough became free in time (those got are
            released)
        """
        rings = self._rings
        busy = self._busy
        if count > 0:
            # the common case: each ring's share in one _take (a frame per
            # ring, not per tag), dealt out in turn from the next ring
            start = next(self._turn) % rings if rings > 1 else 0
            shares: list[list[int]] = []
            for k in range(min(rings, count)):
                share = self._take((start + k) % rings, (count - k + rings - 1) // rings)
                if share is None:
                    for taken in shares:
                        self._give_back(taken)
                    break
                shares.append(share)
            else:
                tags = [shares[i % rings][i // rings] for i in range(count)]
                for tag in tags:
                    busy[tag] = True
                return tags
        tags = []
        try:  # a ring short of tags: one at a time, waiting if need be
            for _ in range(count):
                got = self._try_one()
                tags.append(
                    self._wait(self._try_one, timeout, "no free 9P tag") if got is None else got
                )
        except BaseException:
            self.release_many(tags)
            raise
        return tags

    def acquire_group(self, count: int, modulus: int, timeout: float | None) -> list[int]:
        """*count* free tags of one ring (congruent modulo *modulus*), waiting
        at most *timeout* seconds; successive groups go to successive rings.

        :raises TimeoutError: not enough became free in time
        """
        rings = self._rings
        if modulus <= 1 or rings % modulus == 0:
            # _try_group's first try, inline (a frame less per group)
            tags = self._take(next(self._turn) % rings if rings > 1 else 0, count)
            if tags is not None:
                busy = self._busy
                for tag in tags:
                    busy[tag] = True
                return tags
        tags = self._try_group(count, modulus)
        if tags is None:
            return self._wait(lambda: self._try_group(count, modulus), timeout, "no free 9P tags")
        return tags

    def _wait(self, attempt: Callable[[], _T | None], timeout: float | None, what: str) -> _T:
        """``attempt()`` until it gives something, waiting for releases (at
        most *timeout* seconds in all)."""
        deadline = None
        with self._lock:
            self._waiting += 1  # before the look below: see the class
            try:
                while True:
                    got = attempt()
                    if got is not None:
                        return got
                    if timeout is not None:
                        now = time.monotonic()
                        if deadline is None:
                            deadline = now + timeout
                        left = deadline - now
                        if left <= 0:
                            raise TimeoutError(errno.ETIMEDOUT, what)
                        self._cond.wait(min(left, 1.0))
                    else:
                        self._cond.wait(1.0)
            finally:
                self._waiting -= 1

    def release(self, tag: int) -> None:
        """*tag* may be reused (ignored unless handed out and not released)."""
        if self._busy.pop(tag, False):  # the one release that wins (see the class)
            self._free[tag % self._rings].append(tag)
            if self._waiting:  # read after the append: see the class
                with self._lock:
                    self._cond.notify_all()

    def release_many(self, tags: Sequence[int]) -> None:
        """:meth:`release` of each of *tags*."""
        busy, free, rings = self._busy, self._free, self._rings
        for tag in tags:
            if busy.pop(tag, False):
                free[tag % rings].append(tag)
        if self._waiting:
            with self._lock:
                self._cond.notify_all()

    def quarantine(self, tag: int) -> None:
        """Never reuse *tag*: its reply may still come."""
        self._stuck.add(tag)  # first: a release racing with this call cannot requeue it...
        self._busy.pop(tag, False)  # ...once it is out of busy

    def _start_at(self, tag: int) -> None:
        """Hand out the free tags in increasing order from *tag* on, then
        from 0 (tests; call while no other thread uses the pool)."""
        with self._lock:
            rings = self._rings
            for r in range(rings):
                free = set(self._free[r])
                if self._fresh_open[r]:
                    first = next(self._fresh[r])
                    free.update(range(first, _NTAGS, rings))
                    self._fresh_open[r] = False
                free -= self._stuck
                ordered = sorted(free)
                self._free[r] = collections.deque(
                    [t for t in ordered if t >= tag] + [t for t in ordered if t < tag]
                )
            self._turn = itertools.count(tag % rings)

    @property
    def in_use(self) -> int:
        """Tags in use, the quarantined ones excluded."""
        return len(self._busy)

    @property
    def stuck(self) -> frozenset[int]:
        """The quarantined tags."""
        return frozenset(self._stuck)


class FidPool:
    """Fids ``0..NOFID-1``, recycled most-recently-freed first; thread-safe
    with no lock.

    Why no lock is needed (every step is one C-level operation on a builtin,
    atomic under the GIL and thread-safe on free-threaded builds):
    ``list.pop()`` gives each freed fid to one caller only, and ``next()`` of
    an :func:`itertools.count` each new one; the caller owns it from then on
    (``used[fid] = True`` needs no lock).  :meth:`release` and :meth:`lose`
    first ``pop`` the fid from ``used``: only the one call that got it back
    frees (or forgets) it, so a fid is never freed twice.
    """

    def __init__(self) -> None:
        self._free: list[int] = []
        self._fresh = itertools.count()
        self._used: dict[int, bool] = {}
        self._lost: list[int] = []

    def acquire(self) -> int:
        """A free fid.

        :raises OSError: ``EMFILE``, every fid is in use
        """
        try:
            fid = self._free.pop()
        except IndexError:
            fid = next(self._fresh)
            if fid >= c.NOFID:
                raise OSError(errno.EMFILE, "out of 9P fids") from None
        self._used[fid] = True
        return fid

    def release(self, fid: int) -> None:
        """*fid* may be reused (the server forgot it); ignored unless in use."""
        if self._used.pop(fid, False):
            self._free.append(fid)

    def lose(self, fid: int) -> None:
        """Forget *fid* without reusing it: the server's state for it is unknown."""
        if self._used.pop(fid, False):
            self._lost.append(fid)

    @property
    def lost(self) -> int:
        """How many fids were given up with :meth:`lose`."""
        return len(self._lost)

    @property
    def count(self) -> int:
        """Fids in use."""
        return len(self._used)


# --------------------------------------------------------------------------
# The wire: what the transport offers


def _accepts(method: Any, name: str) -> bool:
    """Whether *method* takes a keyword argument *name*."""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


class Wire:
    """The session's view of its transport's sending side (feature-detecting adapter).

    Every transport has ``request(bytes)``; the Xen frontend and the stream
    transport also have ``submit(bytes) -> Future``.  A transport may offer
    more, detected once here:

    * ``num_rings`` (the ring of a tag is ``tag % num_rings``; 1 when absent);
    * ``submit(message, *, timeout=None, into=None)`` whose *message* may be a
      tuple of bytes-like pieces (written one after another, never joined),
      and whose *into* is a writable memoryview that receives an Rread's data
      straight from the transport, the future's result then being only the
      11-byte Rread header (size, type, tag, count);  detected by ``into`` in
      its signature;
    * ``submit_many(messages, *, timeout=None) -> list[Future]`` (one
      notification per ring for the whole batch).

    Where a feature is missing the wire falls back (marked ``FALLBACK``): the
    pieces are joined, the reply's data is copied into the buffer from the
    reply, a batch is submitted one message at a time, a transport without
    ``submit`` is driven through ``request`` (the future is then already done).

    :param ordered: the server processes each ring's requests one after
        another in the ring's order (QEMU's backend, xen-9pfsd, pyxen9p's
        server on a stream); ``None``: the transport's ``in_order`` attribute
        (``True`` on the Xen frontend; a transport that does not say it is
        taken as unordered: diod, for one, runs a connection's requests on
        several threads)

    :ivar num_rings: the transport's rings
    :ivar into: the transport reads Rread data into the caller's buffer (and
        takes message pieces)
    :ivar batch: the transport has ``submit_many``
    :ivar asynchronous: the transport has ``submit``
    :ivar ordered: requests written back to back on one ring are processed
        in that order: compound operations are pipelined
    :ivar lazy_submit: every message goes out with ``lazy=True`` (the
        transport takes it, by :meth:`submit` and :meth:`submit_many`):
        :meth:`lazy` of a tag nobody waited for since is then needless
    """

    def __init__(self, transport: Any, *, ordered: bool | None = None) -> None:
        self.transport = transport
        rings = getattr(transport, "num_rings", None)
        self.num_rings = max(1, int(rings)) if isinstance(rings, int) else 1
        submit = getattr(transport, "submit", None)
        self.asynchronous = callable(submit)
        self.into = self.asynchronous and _accepts(submit, "into")
        #: the transport takes ``lazy=True`` (the session waits with ``result``)
        self._lazy_submit = self.asynchronous and _accepts(submit, "lazy")
        self.batch = self.asynchronous and callable(getattr(transport, "submit_many", None))
        #: the transport's submit_many takes into= too
        self._batch_into = self.batch and self.into and _accepts(transport.submit_many, "into")
        # submit passes lazy only with into; submit_many whenever _lazy_submit
        self.lazy_submit = self._lazy_submit and self.into
        if ordered is None:
            ordered = getattr(transport, "in_order", False) is True
        self.ordered = bool(ordered) and self.asynchronous
        waiter = getattr(transport, "result", None)
        self._result = waiter if callable(waiter) else None
        #: the transport's result takes the caller's deadline (no clock read)
        self._result_deadline = self._result is not None and _accepts(waiter, "deadline")
        lazy = getattr(transport, "lazy", None)
        self._lazy = lazy if callable(lazy) else None
        gather = getattr(transport, "result_all", None)
        self._result_all = gather if callable(gather) and self._result is not None else None
        exchange = getattr(transport, "exchange", None)
        #: the transport's ``exchange`` (see :meth:`exchange`), where it
        #: takes pieces and buffers as ``submit_many`` does
        self._exchange = exchange if callable(exchange) and self._batch_into else None
        exchange_io = getattr(transport, "exchange_io", None)
        #: the transport's ``exchange_io`` (see :meth:`exchange_io`)
        self._exchange_io = (
            exchange_io if callable(exchange_io) and self._exchange is not None else None
        )
        #: the transport makes a window of reads or writes itself (:meth:`exchange_io`)
        self.io = self._exchange_io is not None

    def submit(
        self,
        message: Pieces,
        *,
        timeout: float | None,
        into: memoryview | None = None,
    ) -> Future[bytes]:
        """Send *message*; a future of its reply (see the class for *into*)."""
        if self.into:
            # every reply is waited for with result() (or needs no prompt reading)
            extra = {"lazy": True} if self._lazy_submit else {}
            if into is None:
                return self.transport.submit(message, timeout=timeout, **extra)  # type: ignore[no-any-return]
            return self.transport.submit(message, timeout=timeout, into=into, **extra)  # type: ignore[no-any-return]
        # FALLBACK (a transport that takes whole messages only): join the pieces
        data = message if isinstance(message, bytes) else b"".join(message)
        if self.asynchronous:
            return self.transport.submit(data, timeout=timeout)  # type: ignore[no-any-return]
        # FALLBACK (request only): the exchange happens now; whatever ends it
        # (a timeout, an interruption) is the future's, as if while waiting
        future: Future[bytes] = Future()
        try:
            future.set_result(self.transport.request(data, timeout=timeout))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def result(self, future: Future[bytes], timeout: float | None) -> bytes:
        """Wait for *future*'s reply: through the transport's ``result``
        where it has one (on the Xen frontend a lone caller then receives
        its reply itself, with no thread handoff), else on the future.

        :raises concurrent.futures.TimeoutError: no reply in time (the
            built-in :class:`TimeoutError` from Python 3.11)
        """
        if self._result is not None and not future.done():
            try:
                return self._result(future, timeout=timeout)  # type: ignore[no-any-return]
            except TimeoutError as exc:  # one class for callers on Python 3.10 too
                raise FutureTimeout(*exc.args) from None
        return future.result(timeout)

    def result_pending(
        self, future: Future[bytes], timeout: float | None, deadline: float | None = None
    ) -> bytes:
        """:meth:`result` of a *future* the caller just saw not done (it is
        not asked again: a call less per wait).

        :param deadline: when *timeout* runs out (``time.monotonic()``), if
            the caller knows it: passed to a transport that takes it (the
            Xen frontend then reads no clock for a reply in by its first poll)
        """
        if self._result is not None:
            try:
                if deadline is not None and self._result_deadline:
                    return self._result(future, timeout=timeout, deadline=deadline)  # type: ignore[no-any-return]
                return self._result(future, timeout=timeout)  # type: ignore[no-any-return]
            except TimeoutError as exc:  # one class for callers on Python 3.10 too
                raise FutureTimeout(*exc.args) from None
        return future.result(timeout)

    def wait_all(self, futures: Sequence[Future[bytes]], timeout: float | None) -> bool:
        """Wait until each of *futures* is done, through the transport's
        ``result_all`` where it has one (one clock read for a window of
        replies, not one per reply; *timeout* bounds the time with none of
        them done): whether all are.  Without it, nothing is waited for
        here (``True``): :meth:`result` then waits for each."""
        if self._result_all is None:
            return True
        return self._result_all(futures, timeout=timeout)  # type: ignore[no-any-return]

    def lazy(self, tag: int) -> None:
        """Tell the transport, if it listens, that nobody waits promptly for
        *tag*'s reply (its ``lazy``)."""
        if self._lazy is not None:
            self._lazy(tag)

    def submit_many(
        self,
        messages: Sequence[Pieces],
        *,
        timeout: float | None,
        into: Sequence[memoryview | None] | None = None,
    ) -> tuple[list[Future[bytes]], BaseException | _Uncertain | None]:
        """Send *messages* in order: the futures of those sent, and why the
        rest were not (``None``: all were).

        *into*: ``None``, or one buffer (or ``None``) per message, used as
        :meth:`submit` does (where the transport reads Rread data into the
        caller's buffer; else the data stays in the reply).

        The transport's futures of the messages it did not send
        (:class:`~pyxen9p._requests.NotSent`: the first that could not be put
        and every one after it) are left out, their reason returned.  A
        transport that raised instead sent nothing by its contract, but one
        of another make may have sent part: its batch is reported as
        uncertain, and the caller gives up its tags (and fids) for good.
        """
        futures: list[Future[bytes]]
        if self.batch and len(messages) > 1 and (into is None or self._batch_into):
            extra: dict[str, Any] = {"lazy": True} if self._lazy_submit else {}
            if self.into:
                if into is not None:
                    extra["into"] = list(into)
                batch = list(messages)
            else:  # FALLBACK (whole messages only): join the pieces
                batch = [m if isinstance(m, bytes) else b"".join(m) for m in messages]
            try:
                futures = list(self.transport.submit_many(batch, timeout=timeout, **extra))
            except Exception as exc:
                return [], _Uncertain(exc)
            for i, future in enumerate(futures):
                if isinstance(future, NotSent):
                    return futures[:i], future.exception()
            return futures, None
        # FALLBACK: one message at a time, in order (on one ring, so in order there)
        futures = []
        for i, message in enumerate(messages):
            try:
                futures.append(
                    self.submit(message, timeout=timeout, into=None if into is None else into[i])
                )
            except Exception as exc:
                return futures, exc
        return futures, None

    def exchange(
        self,
        messages: Sequence[Pieces],
        *,
        timeout: float | None,
        into: Sequence[memoryview | None] | None = None,
    ) -> tuple[list[bytes | Future[bytes]], BaseException | None] | None:
        """Send *messages* and receive their replies in this thread, where
        the transport can while the caller is alone on the connection (the
        Xen frontend's ``exchange``: no future or thread handoff per
        message): ``None`` if it cannot (nothing sent: use
        :meth:`submit_many`).

        :returns: as :meth:`submit_many`: an entry for each message sent,
            the reply's bytes (an Rread's 11-byte header when its data went
            into its buffer) or a future (a reply refused, or none in time:
            its tag stays reserved), and why the rest were not sent
        """
        if self._exchange is None:
            return None
        return _exchanged(self._exchange, messages, timeout=timeout, into=into)

    def exchange_io(
        self,
        fid: int,
        spans: Sequence[tuple[int, memoryview]],
        tags: Sequence[int],
        *,
        write: bool,
        timeout: float | None,
    ) -> tuple[list[int | bytes | Future[bytes]], BaseException | None] | None:
        """:meth:`exchange` of a window of Treads into the buffers of
        *spans* (or Twrites of them) on *fid*, the messages made by the
        transport (the Xen frontend's ``exchange_io``; only where
        :attr:`io`): ``None`` if it cannot now (nothing sent).

        :returns: as :meth:`exchange`, but a reply that went well is its
            byte count (an ``int``; an Rwrite's not yet checked against
            its buffer)
        """
        assert self._exchange_io is not None, "exchange_io where the wire has no io"
        return _exchanged(self._exchange_io, fid, spans, tags, write=write, timeout=timeout)


def _exchanged(exchange: Callable[..., list[_T] | None], *args: Any, **kwargs: Any) -> (
    tuple[list[_T], BaseException | None] | None
):
    """Call the frontend's *exchange* (or ``exchange_io``): ``None`` as it
    returns; else the entries of the messages sent, and why the rest (the
    :class:`NotSent` futures at the end, or the error it raised before
    sending anything) were not.  A :class:`NotSent` before the last entry
    that is not one (a reply refused, or the connection's failure) stays
    that entry's outcome: its request was sent."""
    try:
        outcome = exchange(*args, **kwargs)
    except (ValueError, TransportError, RuntimeError) as exc:
        return [], exc  # nothing sent, by the frontend's contract
    if outcome is None:
        return None
    end = len(outcome)
    while end and isinstance(outcome[end - 1], NotSent):
        end -= 1
    if end < len(outcome):
        first = outcome[end]
        assert isinstance(first, NotSent)
        return outcome[:end], first.exception()
    return outcome, None


class _Uncertain:
    """Why a batch the transport refused was not sent: some of it may have been."""

    __slots__ = ("cause",)

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


#: One step of a :class:`Chain`: ``make(tag)`` and the reply type expected.
Step = tuple[Callable[[int], c.Message], type[c.Message]]
#: What a step of a chain gave: its checked reply, or why it has none (or,
#: for a :class:`Direct` step with a *fast* reader, what that reader made of
#: the reply).
Outcome = c.Message | BaseException


class Direct(
    tuple[
        Callable[[int], c.Message],
        Callable[[int], "bytes | None"],
        "Callable[[bytes, int], Any] | None",
    ]
):
    """A step's *make* (see :data:`Step`) that also writes its request
    straight to bytes, and may read the reply expected straight into what
    the caller wants: no message objects on the way of a step that goes well.

    ``Direct((make, raw, fast))``: a tuple (made without a Python frame),
    called as *make* is:

    * ``make(tag)``: the request as a message (made only where one is
      needed: an error to name);
    * ``raw(tag)``: what ``encode(make(tag))`` gives; or ``None`` when it
      cannot say (:func:`~pyxen9p.p9.codec.encode` of the message is used
      then);
    * ``fast(reply, tag)`` (or ``None``): the step's outcome for a reply it
      recognises whole (the type expected, *tag*, the exact size, every
      field valid); ``None`` for anything else, which the generic check then
      decodes and judges as for any step (an error reply, a wrong tag, type
      or size give the same outcome with or without it).  Used in 9P2000.L
      only.
    """

    __slots__ = ()

    @property
    def make(self) -> Callable[[int], c.Message]:
        """``make(tag)``: the request as a message."""
        return self[0]

    @property
    def raw(self) -> Callable[[int], bytes | None]:
        """``raw(tag)``: the request's bytes (``None``: ask :attr:`make`)."""
        return self[1]

    @property
    def fast(self) -> Callable[[bytes, int], Any] | None:
        """``fast(reply, tag)``: the outcome of a reply recognised, else ``None``."""
        return self[2]

    def __call__(self, tag: int) -> c.Message:
        return self[0](tag)


class _Clunk:
    """A Tclunk nobody waits for: the fid and tag are freed when its reply comes."""

    __slots__ = ("claim", "deadline", "fid", "future", "tag")

    def __init__(self, fid: int, tag: int, future: Future[bytes], deadline: float | None):
        self.fid = fid
        self.tag = tag
        self.future = future
        self.deadline = deadline
        #: one token: whoever pops it (list.pop, atomic) settles the clunk
        self.claim = [True]


class Chain:
    """Requests written back to back on one ring, each reply checked (see
    :meth:`ClientSession.chain`).

    :ivar sent: how many steps went out
    """

    def __init__(
        self,
        session: ClientSession,
        steps: Sequence[Step],
        messages: list[c.Message | None],
        tags: list[int],
        futures: list[Future[bytes]],
        failure: BaseException | _Uncertain | None,
        path: str | None,
        timeout: float | None,
        clunk: int | None,
        deadline: float | _Default | None = _DEFAULT,
    ) -> None:
        self._session = session
        self._steps = steps
        self._messages = messages
        self._tags = tags
        self._futures = futures
        self._failure = failure
        self._path = path
        self._timeout = timeout
        if deadline is _DEFAULT:
            deadline = None if timeout is None else time.monotonic() + timeout
        self._deadline = deadline
        self._clunk = clunk
        self._answered: list[int] = []
        self.sent = len(futures)

    def finish(self) -> list[Outcome]:
        """Wait for every step's reply: one outcome per step, in order.

        A step that timed out is flushed; a Tclunk that could not be sent
        with the chain is sent now, and waited for.
        """
        session = self._session
        outcomes: list[Outcome] = []
        steps = len(self._steps)
        # the tags of the steps answered: released together at the end (one
        # call, not one per step); only this thread uses the chain
        answered = self._answered = []
        try:
            if self._futures:
                # the ring is served in order: once the last step's reply is
                # in, so are the others; one wait (one receiving turn) for all
                last = self._futures[-1]
                if not last.done():
                    # the chain's own timeout, not what is left of its
                    # deadline: no clock read here (the transport, given the
                    # deadline, reads it only if its first poll ends empty).
                    # A chain is finished right after it
                    # is sent (or after the chains sent before it in a batch),
                    # so this wait ends at most that long after the deadline;
                    # the steps still unanswered then are settled against the
                    # deadline itself (_settle)
                    try:
                        session.wire.result_pending(last, self._timeout, self._deadline)
                    except Exception:
                        pass  # each step's outcome is settled below
            for i in range(steps):
                outcomes.append(self._settle(i))
        except BaseException:
            # interrupted while waiting: nobody will read the remaining replies
            # (the steps from the one being settled on: those before it are
            # in *outcomes*; one whose reply was in is only released)
            for i in range(len(outcomes), steps):
                if self._tags[i] not in answered:
                    self._give_up(i)
            raise
        finally:
            session.tags.release_many(answered)
            if self._clunk is not None and self.sent <= steps:
                if isinstance(self._failure, _Uncertain):
                    session.fids.lose(self._clunk)  # its Tclunk may be on the ring
                else:
                    session.clunk_quiet(self._clunk)  # its Tclunk was never sent
        return outcomes

    def _message(self, i: int) -> c.Message:
        """Step *i*'s request as a message (made now for a :class:`Direct` step)."""
        message = self._messages[i]
        if message is None:
            message = self._messages[i] = self._steps[i][0](self._tags[i])
        return message

    def _settle(self, i: int) -> Outcome:
        session = self._session
        tag = self._tags[i]
        if i >= len(self._futures):
            if isinstance(self._failure, TimeoutError) and i == len(self._futures):
                # no room on the ring in time: the server consumes nothing, as
                # when a reply does not come (rpc's way: a Tflush, and a server
                # that does not answer it either is declared dead)
                why = f"no room for tag {tag} within {self._timeout or 0:g}s"
                if session.give_up_wait(tag, why):
                    session.tags.release(tag)
                return session.timeout_error(
                    type(self._message(i)).__name__, self._timeout, self._path
                )
            if not isinstance(self._failure, _Uncertain):
                session.tags.release(tag)
            else:
                session.tags.quarantine(tag)
            assert self._failure is not None
            cause = self._failure
            return cause.cause if isinstance(cause, _Uncertain) else cause
        future = self._futures[i]
        try:
            if future.done():  # the common case: no clock read
                raw = future.result()
            else:
                left = (
                    None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)
                )
                raw = session.wire.result_pending(future, left)
        except FutureTimeout:
            if session.give_up_wait(tag, f"no reply to tag {tag} within {self._timeout:g}s"):
                session.tags.release(tag)
            return session.timeout_error(
                type(self._message(i)).__name__, self._timeout, self._path
            )
        except Exception as exc:
            session.tags.release(tag)  # the transport is done with this tag
            return exc
        self._answered.append(tag)  # released by finish
        make, rtype = self._steps[i]
        if type(make) is Direct and make[2] is not None and not session.dotu:
            value = make[2](raw, tag)  # fast
            if value is not None:  # recognised whole: no message object
                return value  # type: ignore[no-any-return]
            # anything else: judged below, as without the fast reader
        try:
            if len(raw) <= session.msize:
                # check_reply's success path, inline: the reply expected, with
                # our tag (anything else, an error reply included, is decoded
                # again by check_reply, which raises what is wrong)
                reply = session.decode(raw)
                if type(reply) is rtype and reply.tag == tag:
                    return reply
            return check_reply(
                raw, tag, self._message(i), rtype, self._path, session.msize, session.decode,
                dotu=session.dotu,
            )
        except (OSError, ValueError) as exc:
            return exc

    def _give_up(self, i: int) -> None:
        session = self._session
        tag = self._tags[i]
        if i >= len(self._futures):
            session.tags.release(tag)
        elif not self._futures[i].done():
            if not session.flush(tag):
                return
            session.tags.release(tag)
        else:
            session.tags.release(tag)


# --------------------------------------------------------------------------
# The session


class ClientSession:
    """One blocking 9P session over *transport*: the layer under the client's path API.

    :param transport: carries the messages
    :param timeout: limit in seconds for each request (``None``: no limit)
    :param flush_timeout: limit for the Rflush after a request timed out;
        without it the session is declared dead
    :param pipeline: write compound operations back to back on one ring
        (:class:`Wire`'s *ordered*; ``None``: as the transport says)

    :ivar wire: the transport's sending side, as detected
    :ivar msize: the negotiated msize (0 before :meth:`negotiate`)
    :ivar version: the negotiated version
    :ivar timeout: limit for each request (may be changed at any time)
    :ivar flush_timeout: limit for each Rflush
    :ivar flushes_sent: how many Tflush requests were sent
    :ivar tags: the tag pool
    :ivar fids: the fid pool
    :ivar dead: why the server was declared unresponsive, or ``None``
    :ivar closed: whether the session is closed
    :ivar dotu: whether the negotiated dialect is 9P2000.u (no Tflush)
    :ivar decode: the decoder of replies (the dialect's)
    :ivar root_fid: the fid of the attach root (after :meth:`attach`)
    """

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float | None,
        flush_timeout: float,
        pipeline: bool | None = None,
    ) -> None:
        self._pipeline = pipeline
        self.transport = transport
        self.timeout = timeout
        self.flush_timeout = flush_timeout
        self.flushes_sent = 0
        self.msize = 0
        self.version = ""
        self.dotu = False
        self.tags = TagPool(self.wire.num_rings)
        self.fids = FidPool()
        self.dead: TransportError | None = None
        self.closed = False
        self.closing = False
        self.decode: Callable[[bytes], c.Message] = c.decode
        self.root_fid = c.NOFID
        self._lock = threading.Lock()
        self._deferred: list[int] = []
        #: the background clunks in flight (a dict used as an ordered set)
        self._clunks: dict[_Clunk, bool] = {}
        self._clunks_done = threading.Condition(self._lock)
        self._clunk_waiters = 0  # threads waiting on _clunks_done (changed under _lock)

    @property
    def transport(self) -> Transport:
        """The transport (settable: its :attr:`wire` is detected again)."""
        return self._transport

    @transport.setter
    def transport(self, value: Transport) -> None:
        self._transport = value
        self.wire = Wire(value, ordered=self._pipeline)

    # --- negotiation ---------------------------------------------------------

    def negotiate(self, msize: int | None, version: str = c.VERSION_9P2000_L) -> None:
        """Tversion: agree on the msize and the dialect.

        :param msize: the largest message wished (at most ``transport.msize``)
        :param version: ``"9P2000.L"``, ``"9P2000.u"`` or ``"auto"`` (9P2000.L,
            else 9P2000.u)
        :raises ~pyxen9p.errors.ProtocolError: no dialect allowed is spoken,
            or the msize answered is unusable
        """
        limit = int(self.transport.msize)
        want = limit if msize is None else min(msize, limit)
        if want < MIN_MSIZE:
            raise ValueError(f"msize {want} is below the minimum {MIN_MSIZE}")
        offer = c.VERSION_9P2000_U if version == c.VERSION_9P2000_U else c.VERSION_9P2000_L
        reply = self._version_request(want, offer)
        if version == "auto" and not (isinstance(reply, c.Rversion) and reply.version in _DIALECTS):
            # 9P2000.L refused: offer 9P2000.u, as Linux's version=9p2000.u would
            first, offer = reply, c.VERSION_9P2000_U
            reply = self._version_request(want, offer)
            if not (isinstance(reply, c.Rversion) and reply.version == offer):
                answers = ", ".join(version_answer(r) for r in (first, reply))
                raise ProtocolError(
                    f"the server speaks neither {c.VERSION_9P2000_L} nor {offer}"
                    f" (it answered {answers})"
                )
        if not isinstance(reply, c.Rversion):
            raise ProtocolError(f"the server refused {offer}: {version_answer(reply)}")
        if version != "auto" and reply.version != offer:
            raise ProtocolError(f"the server speaks {reply.version!r}, not {offer!r}")
        if reply.msize > want:
            raise ProtocolError(f"the server raised the msize from {want} to {reply.msize}")
        if reply.msize < MIN_MSIZE:
            raise ProtocolError(f"the server's msize {reply.msize} is below {MIN_MSIZE}")
        self.msize = reply.msize
        self.version = reply.version
        self.dotu = reply.version == c.VERSION_9P2000_U

    def _version_request(self, want: int, offer: str) -> c.Rversion | c.Rlerror | c.Rerror:
        """One Tversion: its Rversion, or the error reply."""
        raw = self.transport.request(
            c.encode(c.Tversion(c.NOTAG, want, offer)), timeout=self.timeout
        )
        if len(raw) > want:
            raise ProtocolError(f"Rversion of {len(raw)} bytes exceeds the msize {want}")
        reply = c.decode(raw)  # Rversion, Rerror and Rlerror are all 9P2000.L types
        if isinstance(reply, c.Rlerror | c.Rerror):
            return reply
        if not isinstance(reply, c.Rversion) or reply.tag != c.NOTAG:
            raise ProtocolError(f"expected an Rversion with NOTAG, got {reply!r}")
        return reply

    def attach(self, uname: str, aname: str, n_uname: int) -> c.Qid:
        """Tattach *aname* to a new :attr:`root_fid`; its qid.

        :raises OSError: the server refused the attach
        """
        fid = self.fids.acquire()
        try:
            rattach = self.rpc(
                lambda t: c.Tattach(t, fid, c.NOFID, uname, aname, n_uname),
                c.Rattach,
                aname or "/",
            )
        except BaseException:
            self.fids.release(fid)
            raise
        self.root_fid = fid
        return rattach.qid

    # --- state -----------------------------------------------------------------

    def check_open(self) -> None:
        """Raise unless requests may be sent: closed, or the server declared dead."""
        if self.closed:
            raise TransportClosedError(errno.ENOTCONN, "the 9P client is closed")
        if self.dead is not None:
            raise self.dead

    def declare_dead(self, reason: str) -> None:
        """The server answers nothing, not even a Tflush: fail everything now.

        Requests in flight fail at once instead of each waiting for its own
        timeout (and its own Tflush); every later call fails too.
        """
        with self._lock:
            if self.dead is not None:
                return
            self.dead = TransportError(errno.ETIMEDOUT, f"the 9P server is unresponsive: {reason}")
        log.warning("%s", self.dead)
        abort = getattr(self.transport, "abort", None)
        if abort is not None:
            abort(self.dead)

    def begin_close(self) -> bool:
        """Mark the session closing; whether this call did (``False``: already)."""
        with self._lock:
            if self.closed or self.closing:
                return False
            self.closing = True
            return True

    # --- requests --------------------------------------------------------------

    def rpc(
        self,
        make: Callable[[int], c.Message],
        rtype: type[_R],
        path: str | None = None,
        *,
        timeout: _TimeoutArg = _DEFAULT,
    ) -> _R:
        """Send ``make(tag)`` with a free tag and return its checked reply.

        :param rtype: the reply type expected
        :param path: the path named in errors
        :param timeout: limit in seconds (default: :attr:`timeout`)
        :raises OSError: the server answered with an error
        :raises TimeoutError: no reply in time (the request was flushed; if
            not even the Tflush was answered, the session is dead)
        """
        self.check_open()
        tmo = self.timeout if timeout is _DEFAULT else timeout
        tag = self.tags.acquire(tmo)
        reusable = True
        try:
            message = make(tag)
            data = c.encode(message)
            if len(data) > self.msize:
                raise ProtocolError(
                    f"{type(message).__name__} of {len(data)} bytes exceeds the msize {self.msize}"
                )
            try:
                raw = self.transport.request(data, timeout=tmo)
            except TimeoutError:
                reusable = self.give_up_wait(tag, f"no reply to tag {tag} within {tmo:g}s")
                raise self.timeout_error(type(message).__name__, tmo, path) from None
            except (TransportError, ValueError, InterruptedError, RuntimeError):
                raise  # the transport is done with this tag
            except BaseException:
                # interrupted while waiting (KeyboardInterrupt...): flush the request
                reusable = self.give_up_wait(tag, f"the wait for tag {tag} was interrupted")
                raise
        finally:
            if reusable:
                self.tags.release(tag)
        return check_reply(raw, tag, message, rtype, path, self.msize, self.decode, dotu=self.dotu)

    def give_up_wait(self, tag: int, why: str) -> bool:
        """The wait for *tag*'s reply ended without it (*why*): flush the
        request; return whether the tag may be reused.

        9P2000.u servers such as xen-9pfsd refuse Tflush: the request may
        still be answered, so the session ends instead (the tag never is).
        """
        if self.dotu:
            self.declare_dead(f"{why} (9P2000.u: no Tflush)")
            return False
        return self.flush(tag)

    def timeout_error(self, name: str, tmo: float | None, path: str | None) -> TimeoutError:
        """The error of a request *name* not answered within *tmo* seconds,
        after :meth:`give_up_wait`."""
        outcome = (
            " (flushed)"
            if self.dead is None
            else ", nor to its Tflush: the 9P server is unresponsive"
        )
        return TimeoutError(
            errno.ETIMEDOUT, f"{name}: no reply within {tmo or 0:g}s{outcome}", path
        )

    def flush(self, oldtag: int) -> bool:
        """Flush *oldtag*; return whether it may be reused."""
        with self._lock:
            self.flushes_sent += 1
        try:
            ftag = self.tags.acquire(self.flush_timeout)
        except TimeoutError:
            self.tags.quarantine(oldtag)
            return False
        try:
            raw = self.transport.request(
                c.encode(c.Tflush(ftag, oldtag)), timeout=self.flush_timeout
            )
            reply = c.decode(raw)
        except TransportError:
            self.tags.release(ftag)
            return True  # the transport is gone: nothing will come for either tag
        except TimeoutError:
            self.tags.quarantine(ftag)
            self.tags.quarantine(oldtag)
            self.declare_dead(
                f"no reply to tag {oldtag}, nor to its Tflush within {self.flush_timeout:g}s"
            )
            return False
        except BaseException as exc:
            self.tags.quarantine(ftag)
            self.tags.quarantine(oldtag)
            log.warning("Tflush of tag %d failed (%s): both tags are retired", oldtag, exc)
            if isinstance(exc, Exception):
                return False
            raise
        self.tags.release(ftag)
        if not isinstance(reply, c.Rflush) or reply.tag != ftag:
            log.warning("unexpected reply to Tflush(%d): %r; the tag is retired", oldtag, reply)
            self.tags.quarantine(oldtag)
            return False
        self.transport.flushed(oldtag)
        return True

    @property
    def pipelined(self) -> bool:
        """Whether compound operations are written back to back on one ring:
        the transport has rings processed in order, and the dialect is 9P2000.L."""
        return self.wire.ordered and not self.dotu

    def chain(
        self,
        steps: Sequence[Step],
        path: str | None = None,
        *,
        clunk: int | None = None,
        timeout: _TimeoutArg = _DEFAULT,
    ) -> Chain:
        """Write the requests ``make(tag)`` of *steps* back to back on one ring.

        The server runs them in that order (see :attr:`pipelined`): a step
        may use a fid an earlier step creates.  :meth:`Chain.finish` waits
        for their replies.  With *clunk*, a Tclunk of that fid is written
        last on the same ring and nobody waits for it: the fid and its tag
        are freed when its reply comes (an error reply too: a Tclunk always
        forgets the fid), or given up for good when none comes within the
        timeout (see :meth:`drain_clunks`).

        :raises TimeoutError: no free tags in time (nothing was sent; the
            *clunk* fid is still the caller's)
        """
        return self.chain_many([(steps, path, clunk)], timeout=timeout)[0]

    def chain_many(
        self,
        specs: Sequence[tuple[Sequence[Step], str | None, int | None]],
        *,
        timeout: _TimeoutArg = _DEFAULT,
    ) -> list[Chain]:
        """Several :meth:`chain` calls at once: ``(steps, path, clunk)`` each.

        Each chain is on one ring (successive chains on successive rings);
        all their requests go to the transport in one batch
        (:meth:`Wire.submit_many`: one notification per ring).

        :raises TimeoutError: no free tags in time (nothing was sent; the
            *clunk* fids are still the caller's)
        """
        self.check_open()
        tmo = self.timeout if timeout is _DEFAULT else timeout
        # one clock read for the chains' deadlines and the clunks' expiry
        now = time.monotonic() if tmo is not None or self._clunks else 0.0
        if self._clunks:
            self._expire_clunks(now=now)
        deadline = None if tmo is None else now + tmo
        groups: list[list[int]] = []
        messages: list[list[c.Message | None]] = []
        datas: list[Pieces] = []
        try:
            for steps, _, clunk in specs:
                count = len(steps) + (clunk is not None)
                tags = self.tags.acquire_group(count, self.wire.num_rings, tmo)
                groups.append(tags)
                encoded: list[c.Message | None] = []
                for tag, (make, _) in zip(tags, steps, strict=False):
                    # a Direct step: its bytes without a message object
                    raw = make[1](tag) if type(make) is Direct else None
                    message: c.Message | None = None
                    if raw is None:
                        made = make(tag)
                        data, message = c.encode(made), made
                    else:
                        data = raw
                    if len(data) > self.msize:
                        raise ProtocolError(
                            f"{type(make(tag)).__name__} of {len(data)} bytes exceeds the"
                            f" msize {self.msize}"
                        )
                    encoded.append(message)
                    datas.append(data)
                if clunk is not None:
                    datas.append(_TCLUNK.pack(_TCLUNK.size, _TCLUNK_TYPE, tags[-1], clunk))
                messages.append(encoded)
        except BaseException:
            for tags in groups:
                for tag in tags:
                    self.tags.release(tag)
            raise
        futures, failure = self.wire.submit_many(datas, timeout=tmo)
        chains: list[Chain] = []
        at = 0
        for (steps, path, clunk), tags, encoded in zip(specs, groups, messages, strict=True):
            count = len(tags)
            mine = futures[at : at + count]
            at += count
            chain = Chain(
                self, steps, encoded, tags, mine[: len(steps)], failure, path, tmo, clunk,
                deadline,
            )
            chain.sent = len(mine)
            chains.append(chain)
            if clunk is not None:
                if len(mine) == count:
                    self._background_clunk(clunk, tags[-1], mine[-1], deadline)
                elif isinstance(failure, _Uncertain):
                    self.tags.quarantine(tags[-1])
                else:
                    self.tags.release(tags[-1])
        return chains

    def _background_clunk(
        self, fid: int, tag: int, future: Future[bytes], deadline: float | None
    ) -> None:
        entry = _Clunk(fid, tag, future, deadline)
        # no lock: one dict store (atomic); the entry is settled once, by
        # whoever claims it first (_clunk_answered or _expire_clunks)
        self._clunks[entry] = True
        if not self.wire.lazy_submit:
            # (a transport that takes lazy=True at submit had it with the chain,
            # and nobody has waited on this future since: no call is needed)
            self.wire.lazy(tag)
        future.add_done_callback(functools.partial(self._clunk_answered, entry))

    def _clunk_answered(self, entry: _Clunk, future: Future[bytes]) -> None:
        """The reply (or the end) of a background Tclunk: free its fid and tag.

        Runs on the thread that delivered the reply (the transport's
        receiving thread, or a caller receiving its own replies): never waits.
        """
        try:
            entry.claim.pop()  # atomic: exactly one of this and _expire_clunks gets it
        except IndexError:
            return  # given up already (timed out)
        exc: BaseException | None = None
        try:
            raw = future.result()  # done: no wait (one call, not exception() and result())
        except Exception as failure:  # what it failed with (a transport's errors are Exceptions)
            raw, exc = b"", failure
        if exc is None or isinstance(exc, TransportError):
            # an Rclunk, an error reply (the fid is clunked all the same), or a
            # transport that ended (nothing is left to clunk)
            self.fids.release(entry.fid)
        else:
            # not sent (no room in time, refused) after its walk was, or an
            # answer of the wrong type: the fid may live on in the server
            self.fids.lose(entry.fid)
        self.tags.release(entry.tag)
        # out of _clunks only now: whoever sees it gone (drain_clunks, and so
        # fid_count) sees its fid and tag freed
        del self._clunks[entry]  # only the claimer removes it: present
        if self._clunk_waiters:  # read after the removal: see drain_clunks
            with self._lock:
                self._clunks_done.notify_all()
        if exc is None and len(raw) >= c.HEADER_SIZE and raw[4] not in _CLUNK_ANSWERS:
            log.warning("reply of type %d to a Tclunk (fid %d)", raw[4], entry.fid)

    def _expire_clunks(self, *, everything: bool = False, now: float | None = None) -> None:
        """Give up the background clunks past their deadline (or all of
        them): their fids are never reused, their tags flushed (or retired).

        :param now: ``time.monotonic()`` read just before (else read here)
        """
        if now is None:
            now = time.monotonic()
        expired: list[_Clunk] = []
        # list(dict) is one C call (atomic): a snapshot, whatever other
        # threads add or remove meanwhile
        for entry in list(self._clunks):
            if everything or (entry.deadline is not None and entry.deadline <= now):
                try:
                    entry.claim.pop()  # atomic: see _clunk_answered
                except IndexError:
                    continue  # answered meanwhile: _clunk_answered frees it
                del self._clunks[entry]  # only the claimer removes it: present
                expired.append(entry)
        if expired and self._clunk_waiters:
            with self._lock:
                self._clunks_done.notify_all()
        for entry in expired:
            self.fids.lose(entry.fid)
            log.warning("Tclunk of fid %d timed out: the fid is given up", entry.fid)
            if self.dotu or self.dead is not None:
                self.tags.quarantine(entry.tag)
            elif self.flush(entry.tag):
                self.tags.release(entry.tag)

    def drain_clunks(self, timeout: float | None = None) -> None:
        """Wait until no background clunk is in flight, giving up (see
        :meth:`chain`) those whose reply does not come by their deadline, or
        all that remain after *timeout* seconds (``None``: their deadlines)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            entries = list(self._clunks)  # a snapshot (one C call)
            if not entries:
                return
            deadlines = [e.deadline for e in entries if e.deadline is not None]
            now = time.monotonic()
            limit = min(deadlines) if deadlines else None
            if end is not None and (limit is None or end < limit):
                limit = end
            wait = 1.0 if limit is None else max(limit - now, 0.0)
            if wait > 0:
                # receive: their replies are lazy, nobody else may be reading
                try:
                    self.wire.result(entries[0].future, min(wait, 1.0))
                except RuntimeError:  # this thread delivers replies: wait for them
                    with self._lock:
                        # counted before the look at _clunks: a clunk answered
                        # after the look sees the count and notifies (under
                        # the lock, so once this thread waits); one answered
                        # before it is out of _clunks already
                        self._clunk_waiters += 1
                        try:
                            if self._clunks:
                                self._clunks_done.wait(min(wait, 1.0))
                        finally:
                            self._clunk_waiters -= 1
                except Exception:  # a failed clunk is settled by its callback
                    pass
                continue
            if end is not None and time.monotonic() >= end:
                self._expire_clunks(everything=True)
                return
            self._expire_clunks()

    @property
    def clunks_in_flight(self) -> int:
        """Background Tclunks not yet answered."""
        return len(self._clunks)

    # --- data ------------------------------------------------------------------

    def read_into(
        self,
        fid: int,
        offset: int,
        mv: memoryview,
        path: str | None,
        *,
        timeout: _TimeoutArg = _DEFAULT,
    ) -> int:
        """Tread of ``mv.nbytes`` bytes at *offset* of *fid*, the data put in *mv*.

        The transport puts the data straight into *mv* when it can
        (:attr:`Wire.into`); else it is copied there once from the reply.

        :returns: the byte count read (0 at the end of the file)
        """
        return self.read_many_into(fid, [(offset, mv)], path, timeout=timeout)[0]

    def read_many_into(
        self,
        fid: int,
        spans: Sequence[tuple[int, memoryview]],
        path: str | None,
        *,
        timeout: _TimeoutArg = _DEFAULT,
    ) -> list[int]:
        """:meth:`read_into` of each ``(offset, buffer)`` of *spans*, all in
        flight together (no thread per request): the byte counts, in order.

        Every request sent is waited for, even after one failed; then the
        first failure is raised.
        """

        def make(tags: list[int]) -> list[Pieces]:
            pack, size = _TREAD.pack, _TREAD.size
            return [
                pack(size, _TREAD_TYPE, tag, fid, offset, mv.nbytes)
                for tag, (offset, mv) in zip(tags, spans, strict=False)
            ]

        # a partial, not a closure: no Python frame of its own per reply
        settle = functools.partial(self._rread, fid, path)
        tmo = self.timeout if timeout is _DEFAULT else timeout
        return self._in_flight(spans, make, settle, "Tread", path, tmo, into=True, io=(fid, False))

    def _in_flight(
        self,
        spans: Sequence[tuple[int, memoryview]],
        make: Callable[[list[int]], list[Pieces]],
        settle: Callable[[bytes, int, int, memoryview], int],
        name: str,
        path: str | None,
        tmo: float | None,
        *,
        into: bool = False,
        io: tuple[int, bool] | None = None,
    ) -> list[int]:
        """One request per ``(offset, buffer)`` of *spans* (``make(tags)``:
        the messages of the first ``len(tags)`` spans, with those tags), all
        sent from this thread in one batch (one notification per ring), then
        each reply awaited in order and turned into a count
        (``settle(raw, tag, offset, buffer)``); *into*: an Rread's data goes
        straight into the span's buffer where the transport can; *io*:
        ``(fid, write)`` of a window of Treads or Twrites the transport may
        make itself (:meth:`Wire.exchange_io`: a reply that went well is
        then its count, checked here against its buffer).  Every request
        sent is waited for, even after one failed; then the first failure
        is raised.  The tags answered are released together at the end
        (one call, not one per request)."""
        self.check_open()
        sent: list[tuple[int, int | bytes | Future[bytes] | BaseException]] = []
        failure: BaseException | None = None
        try:
            tags = self.tags.acquire_many(len(spans), tmo)  # all or none
        except BaseException as exc:
            failure, tags = exc, []
        alone = False  # exchanged alone: every reply is in, or never comes in time
        if tags:
            wire = self.wire
            messages = None
            buffers = [mv for _, mv in spans[: len(tags)]] if into and wire.into else None
            exchanged: tuple[Sequence[int | bytes | Future[bytes]], BaseException | None] | None
            try:
                if io is not None and wire.io:
                    exchanged = wire.exchange_io(io[0], spans, tags, write=io[1], timeout=tmo)
                else:
                    messages = make(tags)
                    exchanged = wire.exchange(messages, timeout=tmo, into=buffers)
            except BaseException:  # interrupted: the tags may be in flight
                for tag in tags:
                    self.tags.quarantine(tag)
                raise
            futures: Sequence[int | bytes | Future[bytes]]
            if exchanged is None:
                if messages is None:
                    messages = make(tags)
                futures, why = wire.submit_many(messages, timeout=tmo, into=buffers)
            else:
                (futures, why), alone = exchanged, True
            for i, tag in enumerate(tags):
                if i < len(futures):
                    sent.append((tag, futures[i]))
                    continue
                # not sent (or, of a transport of another make, maybe sent)
                if isinstance(why, _Uncertain):
                    self.tags.quarantine(tag)
                    sent.append((tag, why.cause))
                elif isinstance(why, TimeoutError) and i == len(futures):
                    # no room on the ring in time: the server consumes nothing,
                    # as when a reply does not come (rpc's way: a Tflush, and
                    # a server that does not answer it either is dead)
                    if self.give_up_wait(tag, f"no room for tag {tag} within {tmo or 0:g}s"):
                        self.tags.release(tag)
                    sent.append((tag, self.timeout_error(name, tmo, path)))
                else:
                    self.tags.release(tag)
                    sent.append((tag, why if why is not None else RuntimeError("not sent")))
        counts: list[int] = []
        answered: list[int] = []  # the tags to release (see _await)
        # the whole window waited for at once (one clock read while replies
        # keep coming); what ended the wait early is each late one's failure
        stopped: BaseException | None = None
        if alone:  # a request still unanswered was so when the time ran out
            stopped = TimeoutError(errno.ETIMEDOUT, "no reply")
        else:
            waited = [f for _, f in sent if isinstance(f, Future)]
            try:
                if not self.wire.wait_all(waited, tmo):
                    stopped = TimeoutError(errno.ETIMEDOUT, "no reply")
            except BaseException as exc:
                stopped = exc
        try:
            for (tag, future), (offset, mv) in zip(sent, spans, strict=False):
                try:
                    if isinstance(future, int):  # a reply that went well (exchange_io)
                        answered.append(tag)
                        if future > mv.nbytes:
                            raise ProtocolError(
                                f"R{name[1:]} of {future} bytes for a {name} of {mv.nbytes}"
                            )
                        counts.append(future)
                        continue
                    if isinstance(future, bytes):  # the reply, received by the exchange
                        answered.append(tag)
                        counts.append(settle(future, tag, offset, mv))
                        continue
                    raw = self._await(tag, future, name, path, tmo, answered, stopped)
                    counts.append(settle(raw, tag, offset, mv))
                except BaseException as exc:
                    if failure is None:
                        failure = exc
        finally:
            self.tags.release_many(answered)
        if failure is not None:
            raise failure
        return counts

    def _rread(
        self, fid: int, path: str | None, raw: bytes, tag: int, offset: int, mv: memoryview
    ) -> int:
        """The byte count of the reply *raw* to a Tread into *mv*, its data put there."""
        count = mv.nbytes
        if len(raw) >= _RREAD.size and raw[4] == _RREAD_TYPE:
            size, _, rtag, n = _RREAD.unpack_from(raw)
            if rtag != tag:
                raise ProtocolError(f"reply tagged {rtag} to a request tagged {tag}")
            if n > count:
                raise ProtocolError(f"Rread of {n} bytes for a Tread of {count}")
            if len(raw) == _RREAD.size and size == _RREAD.size + n and self.wire.into:
                return int(n)  # the transport put the data in mv
            if size != len(raw) or len(raw) != _RREAD.size + n:
                raise ProtocolError(f"Rread of {len(raw)} bytes says {size} and count {n}")
            mv[:n] = memoryview(raw)[_RREAD.size :]
            return int(n)
        message = c.Tread(tag, fid, offset, count)
        check_reply(raw, tag, message, c.Rread, path, self.msize, self.decode, dotu=self.dotu)
        raise ProtocolError(f"malformed Rread of {len(raw)} bytes")

    def write_from(
        self,
        fid: int,
        offset: int,
        mv: memoryview,
        path: str | None,
        *,
        timeout: _TimeoutArg = _DEFAULT,
    ) -> int:
        """Twrite of *mv* at *offset* of *fid*, sent as two pieces (header,
        the caller's bytes) when the transport takes pieces.

        :returns: the byte count written
        """
        return self.write_many_from(fid, [(offset, mv)], path, timeout=timeout)[0]

    def write_many_from(
        self,
        fid: int,
        spans: Sequence[tuple[int, memoryview]],
        path: str | None,
        *,
        timeout: _TimeoutArg = _DEFAULT,
    ) -> list[int]:
        """:meth:`write_from` of each ``(offset, buffer)`` of *spans*, all in
        flight together from this thread (no thread per request): the byte
        counts, in order.

        Every request sent is waited for, even after one failed; then the
        first failure is raised.
        """
        for _, mv in spans:
            size = _TREAD.size + mv.nbytes
            if size > self.msize:
                raise ProtocolError(f"Twrite of {size} bytes exceeds the msize {self.msize}")

        def make(tags: list[int]) -> list[Pieces]:
            pack, size = _TREAD.pack, _TREAD.size
            return [
                (pack(size + mv.nbytes, _TWRITE_TYPE, tag, fid, offset, mv.nbytes), mv)
                for tag, (offset, mv) in zip(tags, spans, strict=False)
            ]

        def settle(raw: bytes, tag: int, offset: int, mv: memoryview) -> int:
            if len(raw) == _RWRITE.size and raw[4] == _RWRITE_TYPE:
                # the common reply, read in place: no message objects
                size, _, rtag, count = _RWRITE.unpack(raw)
                if size == _RWRITE.size and rtag == tag and count <= mv.nbytes:
                    return int(count)
            message = c.Twrite(tag, fid, offset, b"")
            reply = check_reply(
                raw, tag, message, c.Rwrite, path, self.msize, self.decode, dotu=self.dotu
            )
            if reply.count > mv.nbytes:
                raise ProtocolError(f"Rwrite of {reply.count} bytes for a Twrite of {mv.nbytes}")
            return int(reply.count)

        tmo = self.timeout if timeout is _DEFAULT else timeout
        return self._in_flight(spans, make, settle, "Twrite", path, tmo, io=(fid, True))

    def _await(
        self,
        tag: int,
        future: Future[bytes] | BaseException,
        name: str,
        path: str | None,
        tmo: float | None,
        answered: list[int],
        stopped: BaseException | None = None,
    ) -> bytes:
        """The reply of a request :meth:`_in_flight` sent (or why it was
        not sent); the tag is flushed or retired here as :meth:`rpc` does,
        or, free to reuse, appended to *answered* (the caller releases them
        all at once).  *stopped*: what ended the window's wait
        (:meth:`Wire.wait_all`) before every reply came, raised for a
        request still not answered (a :class:`TimeoutError`: no reply in
        time) instead of waiting again."""
        if isinstance(future, BaseException):
            raise future
        reusable = True
        try:
            try:
                try:
                    if stopped is not None and not future.done():
                        if isinstance(stopped, TimeoutError):
                            raise TimeoutError(errno.ETIMEDOUT, "no reply")
                        raise stopped
                    return self.wire.result(future, tmo)
                except FutureTimeout:
                    raise TimeoutError(errno.ETIMEDOUT, "no reply") from None
            except TimeoutError:
                reusable = self.give_up_wait(tag, f"no reply to tag {tag} within {tmo:g}s")
                raise self.timeout_error(name, tmo, path) from None
            except (TransportError, ValueError, InterruptedError, RuntimeError):
                raise  # the transport is done with this tag
            except BaseException:
                reusable = self.give_up_wait(tag, f"the wait for tag {tag} was interrupted")
                raise
        finally:
            if reusable:
                answered.append(tag)

    # --- clunks ----------------------------------------------------------------

    def clunk_quiet(self, fid: int) -> None:
        """Clunk *fid* and forget it, whatever happens (errors are only logged)."""
        try:
            self.rpc(lambda t: c.Tclunk(t, fid), c.Rclunk)
        except TimeoutError:
            self.fids.lose(fid)
            log.warning("Tclunk of fid %d timed out: the fid is given up", fid)
        except (OSError, ValueError) as exc:
            # an error reply still clunks the fid; a dead transport leaves nothing to clunk
            log.debug("Tclunk of fid %d: %s", fid, exc)
            self.fids.release(fid)
        except BaseException:
            self.fids.lose(fid)
            raise
        else:
            self.fids.release(fid)

    def defer_clunk(self, fid: int) -> None:
        """Clunk *fid* later (:meth:`process_deferred`), e.g. from a finalizer."""
        with self._lock:
            self._deferred.append(fid)

    def process_deferred(self) -> None:
        """Clunk the fids :meth:`defer_clunk` left."""
        if not self._deferred:
            return
        with self._lock:
            fids, self._deferred = self._deferred, []
        for fid in fids:
            self.clunk_quiet(fid)

    def close(self, close_transport: bool = True) -> None:
        """Clunk the deferred fids and the root, then close the transport if *close_transport*.

        Call :meth:`begin_close` first (it says whether this close is the first).
        """
        try:
            self.process_deferred()
            self.drain_clunks(self.timeout)
            self.clunk_quiet(self.root_fid)
        finally:
            self.closed = True
            if close_transport:
                self.transport.close()
