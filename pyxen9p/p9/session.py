"""The 9P client's session layer: tags, fids, one request and its reply, flushes.

Below the path API of :class:`~pyxen9p.p9.client.Client` (and the
multiplexer's backend side, :mod:`pyxen9p.p9.mux`) sits what every 9P caller
needs whatever it does with files:

* :class:`IdPool`: numbers (fids, or tags) handed out and recycled
  most-recently-freed first; pure, no locks, no I/O (the multiplexer uses it
  from its event loop for its backend tags and fids);
* :class:`TagPool`: the client's tags ``0..0xFFFE``, handed out round-robin
  (so consecutive requests spread over the rings of a Xen transport), never
  NOTAG, reused only once free, and *quarantined* for good when a reply may
  still come; thread-safe, built on the pure :class:`TagAllocator`;
* :class:`FidPool`: a thread-safe :class:`IdPool` of fids;
* :func:`check_reply`: a raw reply checked against its request (size, tag,
  type) and error replies mapped to :class:`OSError`; pure;
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

import enum
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from pyxen9p.errors import TransportClosedError, TransportError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.codec import ProtocolError
from pyxen9p.p9.transport import Transport

__all__ = [
    "MAX_TAG",
    "MIN_MSIZE",
    "ClientSession",
    "FidPool",
    "IdPool",
    "TagAllocator",
    "TagPool",
    "check_reply",
    "server_error",
    "version_answer",
]

log = logging.getLogger(__name__)

#: The smallest msize the client accepts from a server (Linux's limit too).
MIN_MSIZE = 4096
#: Highest tag given to requests (NOTAG, 0xFFFF, is Tversion's).
MAX_TAG = 0xFFFE
_NTAGS = MAX_TAG + 1
#: The dialects the client speaks.
_DIALECTS = (c.VERSION_9P2000_L, c.VERSION_9P2000_U)

_R = TypeVar("_R", bound=c.Message)


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
    """A thread-safe :class:`TagAllocator`: :meth:`acquire` waits for a free tag."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tags = TagAllocator()

    @property
    def _next(self) -> int:
        return self._tags._next

    @_next.setter
    def _next(self, value: int) -> None:
        self._tags._next = value

    def acquire(self, timeout: float | None) -> int:
        """A free tag, waiting at most *timeout* seconds (``None``: no limit).

        :raises TimeoutError: none became free in time
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            tag = self._tags.acquire()
            while tag is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(errno.ETIMEDOUT, "no free 9P tag")
                self._cond.wait(1.0 if left is None else min(left, 1.0))
                tag = self._tags.acquire()
            return tag

    def release(self, tag: int) -> None:
        """*tag* may be reused."""
        with self._cond:
            self._tags.busy.discard(tag)  # TagAllocator.release, inlined: every request
            self._cond.notify()

    def quarantine(self, tag: int) -> None:
        """Never reuse *tag*: its reply may still come."""
        with self._cond:
            self._tags.quarantine(tag)

    @property
    def in_use(self) -> int:
        """Tags in use, the quarantined ones excluded."""
        with self._cond:
            return self._tags.in_use

    @property
    def stuck(self) -> frozenset[int]:
        """The quarantined tags."""
        with self._cond:
            return frozenset(self._tags.stuck)


class FidPool:
    """Fids ``0..NOFID-1``, recycled most-recently-freed first; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = IdPool(c.NOFID, errno.EMFILE, "out of 9P fids")

    def acquire(self) -> int:
        """A free fid.

        :raises OSError: ``EMFILE``, every fid is in use
        """
        with self._lock:
            return self._pool.alloc()

    def release(self, fid: int) -> None:
        """*fid* may be reused (the server forgot it)."""
        with self._lock:
            self._pool.free(fid)

    def lose(self, fid: int) -> None:
        """Forget *fid* without reusing it: the server's state for it is unknown."""
        with self._lock:
            self._pool.lose(fid)

    @property
    def lost(self) -> int:
        """How many fids were given up with :meth:`lose`."""
        return self._pool.lost

    @property
    def count(self) -> int:
        """Fids in use."""
        with self._lock:
            return len(self._pool.used)


# --------------------------------------------------------------------------
# The session


class ClientSession:
    """One blocking 9P session over *transport*: the layer under the client's path API.

    :param transport: carries the messages
    :param timeout: limit in seconds for each request (``None``: no limit)
    :param flush_timeout: limit for the Rflush after a request timed out;
        without it the session is declared dead

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
        self, transport: Transport, *, timeout: float | None, flush_timeout: float
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.flush_timeout = flush_timeout
        self.flushes_sent = 0
        self.msize = 0
        self.version = ""
        self.dotu = False
        self.tags = TagPool()
        self.fids = FidPool()
        self.dead: TransportError | None = None
        self.closed = False
        self.closing = False
        self.decode: Callable[[bytes], c.Message] = c.decode
        self.root_fid = c.NOFID
        self._lock = threading.Lock()
        self._deferred: list[int] = []

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
                reusable = False
                if self.dotu:
                    # 9P2000.u servers such as xen-9pfsd refuse Tflush: the
                    # request may still be answered, so the session ends.
                    self.declare_dead(
                        f"no reply to tag {tag} within {tmo:g}s (9P2000.u: no Tflush)"
                    )
                else:
                    reusable = self.flush(tag)
                outcome = (
                    " (flushed)"
                    if self.dead is None
                    else ", nor to its Tflush: the 9P server is unresponsive"
                )
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"{type(message).__name__}: no reply within {tmo:g}s{outcome}",
                    path,
                ) from None
            except (TransportError, ValueError, InterruptedError, RuntimeError):
                raise  # the transport is done with this tag
            except BaseException:
                # interrupted while waiting (KeyboardInterrupt...): flush the request
                reusable = False
                if self.dotu:
                    self.declare_dead(f"the wait for tag {tag} was interrupted (no Tflush)")
                else:
                    reusable = self.flush(tag)
                raise
        finally:
            if reusable:
                self.tags.release(tag)
        return check_reply(raw, tag, message, rtype, path, self.msize, self.decode, dotu=self.dotu)

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
            self.clunk_quiet(self.root_fid)
        finally:
            self.closed = True
            if close_transport:
                self.transport.close()
