"""The table of 9P requests in flight: one implementation for every transport.

Both :class:`~pyxen9p.frontend.Frontend` and
:class:`~pyxen9p.p9.transport.StreamTransport` keep their requests here, so
registering a tag, matching a reply to it, abandoning, flushing and failing
everything behave the same on every transport.

A :class:`Request` may carry an ``into`` buffer: a transport that sees an
Rread for it copies the payload straight into that buffer, and the request's
future then resolves to the reply's 11-byte header only
(:func:`rread_target`).
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    LOGGER,
    PENDING,
    RUNNING,
)
from typing import Any

from pyxen9p.errors import ProtocolError, TransportError

__all__ = [
    "RREAD",
    "RREAD_HEADER",
    "RREAD_HEADER_SIZE",
    "Checked",
    "Message",
    "NotSent",
    "Reply",
    "Request",
    "RequestTable",
    "as_pieces",
    "check_batch",
    "failed_future",
    "io_batch",
    "parse_header",
    "reply_bound",
    "rread_slice",
    "rread_target",
    "writable_target",
]

log = logging.getLogger(__name__)

#: The smallest msize worth negotiating, for every 9P layer and transport
#: here (Linux refuses less than 4 KiB too): a client accepts no less from
#: a server, a server and the multiplexer offer no less, and a ring's half
#: must hold a message of it.
MIN_MSIZE = 4096
_RLERROR = 7
_RERROR = 107
#: The 9P type of Rread.
RREAD = 117
#: ``size[4] type[1] tag[2] count[4]``: what precedes an Rread's data.
RREAD_HEADER = struct.Struct("<IBHI")
RREAD_HEADER_SIZE = RREAD_HEADER.size
_HEADER = struct.Struct("<IBH")

Piece = bytes | bytearray | memoryview
#: A 9P message: whole, or a tuple/list of pieces sent back to back.
Message = Piece | tuple[Piece, ...] | list[Piece]


def as_pieces(message: Message) -> tuple[list[memoryview], int]:
    """Byte views of a message given whole or as pieces, and its total length.

    Nothing is copied: each piece becomes a flat ``"B"`` view.

    :raises TypeError: if a piece is not bytes-like
    """
    if type(message) is bytes:  # the common case: a bytes view is flat already
        return [memoryview(message)], len(message)
    if isinstance(message, (tuple, list)):
        views = [_flat(piece) for piece in message]
    else:
        views = [_flat(message)]
    total = 0
    for view in views:
        total += view.nbytes
    return views, total


def _flat(piece: Piece) -> memoryview:
    view = piece if isinstance(piece, memoryview) else memoryview(piece)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def parse_header(views: list[memoryview], total: int, msize: int) -> tuple[int, int, int]:
    """Check the 9P header of a message given as *views*: ``(size, type, tag)``.

    :raises ValueError: shorter than a header, size field different from the
        pieces' total, or larger than *msize*
    """
    if total < _HEADER.size:
        raise ValueError(f"a 9P message needs at least {_HEADER.size} bytes")
    first = views[0]
    if first.nbytes >= _HEADER.size:
        size, mtype, tag = _HEADER.unpack_from(first)
    else:
        size, mtype, tag = _HEADER.unpack(b"".join(bytes(v) for v in views)[: _HEADER.size])
    if size != total:
        raise ValueError(f"header says {size} bytes, message has {total}")
    if size > msize:
        raise ValueError(f"{size}-byte message exceeds the transport's msize {msize}")
    return int(size), int(mtype), int(tag)


#: The most bytes of an error reply (Rlerror; 9P2000.u's Rerror carries
#: ``strerror`` text, QEMU's and xen-9pfsd's far shorter) and of the fixed
#: replies (Rgetattr, 160 bytes, is the largest; Rwalk of 16 qids, 217;
#: Rversion names a version).
_SMALL_REPLY = 512
#: Request types whose reply is one of those.
_SMALL_REPLY_TYPES = frozenset(
    (
        *(8, 12, 14, 16, 18, 20, 24, 26, 30, 32, 50, 52, 70, 72, 74, 76),  # 9P2000.L
        *(100, 102, 104, 108, 110, 112, 114, 118, 120, 122, 126),  # 9P2000 and .u
    )
)
#: Replies that carry a path or a file's names, each at most PATH_MAX
#: (4096) or NAME_MAX (255) bytes on QEMU's Linux host: Rreadlink, Rstat
#: (9P2000.u: name, uid, gid, muid and the symlink's target).
_NAMED_REPLY = 8192
_NAMED_REPLY_TYPES = frozenset((22, 124))
#: Tgetlock: its reply echoes the request's client id.
_TGETLOCK = 54
#: Where a Tread's or Treaddir's count is: size[4] type[1] tag[2] fid[4]
#: offset[8] count[4]
_COUNT_AT = 19
_U32 = struct.Struct("<I")


def reply_bound(views: list[memoryview], mtype: int, msize: int) -> int:
    """The most bytes the reply to a request (its pieces *views*, its type
    *mtype*) takes on the ring from a backend such as QEMU's, never more
    than *msize*: 11 + count for a Tread or Treaddir, :data:`_SMALL_REPLY`
    for the requests with a short reply (and for a Tread too short to hold
    a count, which QEMU refuses), :data:`_NAMED_REPLY` for a reply of
    names, the request's own size plus :data:`_SMALL_REPLY` for Tgetlock,
    *msize* for an unknown type.

    A frontend on QEMU's backend keeps the replies it may get on a ring
    below the ring's size with these (see ``Frontend``'s reply budget).
    """
    if mtype in _SMALL_REPLY_TYPES:
        return _SMALL_REPLY
    if mtype == 116 or mtype == 40:
        first = views[0]
        if first.nbytes >= _COUNT_AT + 4:
            count = _U32.unpack_from(first, _COUNT_AT)[0]
        else:
            head = b"".join(bytes(v) for v in views)[: _COUNT_AT + 4]
            if len(head) < _COUNT_AT + 4:
                return min(msize, _SMALL_REPLY)  # malformed: an error at most
            count = _U32.unpack(head[_COUNT_AT:])[0]
        return min(msize, max(_SMALL_REPLY, RREAD_HEADER_SIZE + int(count)))
    if mtype in _NAMED_REPLY_TYPES:
        return min(msize, _NAMED_REPLY)
    if mtype == _TGETLOCK:
        return min(msize, _SMALL_REPLY + sum(v.nbytes for v in views))
    return msize


def writable_target(into: memoryview | bytearray | None) -> memoryview | None:
    """*into* as a flat writable byte view (``None`` stays ``None``).

    :raises ValueError: if *into* is read-only
    """
    if into is None:
        return None
    view = into if isinstance(into, memoryview) else memoryview(into)
    if view.readonly:
        raise ValueError("into must be a writable buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


#: A message of a batch, checked: ``(views, total, type, tag, into)``
#: (see :func:`check_batch`).
Checked = tuple[list[memoryview], int, int, int, memoryview | None]


def check_batch(
    messages: Sequence[Message],
    into: Sequence[memoryview | None] | None,
    msize: int,
) -> list[Checked]:
    """Check every message of a batch before any is sent:
    ``(views, total, type, tag, into)`` for each.

    :raises ValueError: a malformed message, two with one tag, or an *into*
        list of another length than *messages*
    """
    if into is not None and len(into) != len(messages):
        raise ValueError(f"{len(into)} into buffers for {len(messages)} messages")
    checked = []
    seen: set[int] = set()
    for i, message in enumerate(messages):
        # the common cases, checked here (parse_header says what is wrong)
        head: Piece | None
        if type(message) is bytes and len(message) >= _HEADER.size:
            head = message
            views, total = [memoryview(message)], len(message)
        elif (
            type(message) is tuple
            and len(message) == 2
            and type(head := message[0]) is bytes
            and len(head) >= _HEADER.size
            and type(body := message[1]) is memoryview
            and body.ndim == 1
            and body.format == "B"
        ):  # a header and the caller's bytes (a Twrite)
            views, total = [memoryview(head), body], len(head) + body.nbytes
        else:
            views, total = as_pieces(message)
            head = None
        if head is None:
            _size, mtype, tag = parse_header(views, total, msize)
        else:
            size, mtype, tag = _HEADER.unpack_from(head)
            if size != total or size > msize:
                parse_header(views, total, msize)
        if tag in seen:
            raise ValueError(f"tag {tag} appears twice in one batch")
        seen.add(tag)
        target = into[i] if into else None
        if target is not None and (
            type(target) is not memoryview
            or target.readonly
            or target.ndim != 1
            or target.format != "B"
        ):
            target = writable_target(target)  # a view made, or why it cannot be
        checked.append((views, total, mtype, tag, target))
    return checked


#: Tread and Twrite: size[4] type[1] tag[2] fid[4] offset[8] count[4]
_IO_HEADER = struct.Struct("<IBHIQI")
_TREAD, _TWRITE = 116, 118


def io_batch(
    fid: int,
    spans: Sequence[tuple[int, memoryview]],
    tags: Sequence[int],
    write: bool,
    msize: int,
) -> tuple[list[Checked], list[int]]:
    """A window of Treads (or, if *write*, Twrites) on *fid*, one per tag
    of *tags* for the ``(offset, buffer)`` of *spans* at the same place,
    made and checked here (no message objects): what :func:`check_batch`
    returns for them (a read's buffer its *into*, a write's buffer its
    second piece), and the reply bound of each (see :func:`reply_bound`).

    :raises ValueError: fewer spans than tags, two equal tags, a buffer
        that is not a flat byte view (or, to read into, is read-only), a
        Twrite over *msize*, or a fid, offset or tag out of range
    """
    if len(spans) < len(tags):
        raise ValueError(f"{len(tags)} tags for {len(spans)} spans")
    if len(set(tags)) != len(tags):
        raise ValueError("a tag appears twice in one window")
    pack = _IO_HEADER.pack
    size = _IO_HEADER.size
    checked: list[Checked] = []
    bounds: list[int] = []
    small = min(msize, _SMALL_REPLY)
    try:
        for tag, (offset, mv) in zip(tags, spans, strict=False):
            if type(mv) is not memoryview or mv.ndim != 1 or mv.format != "B":
                raise ValueError("a window's buffers must be flat byte memoryviews")
            count = mv.nbytes
            if write:
                total = size + count
                if total > msize:
                    raise ValueError(f"Twrite of {total} bytes exceeds the msize {msize}")
                head = memoryview(pack(total, _TWRITE, tag, fid, offset, count))
                checked.append(([head, mv], total, _TWRITE, tag, None))
                bounds.append(small)
            else:
                if mv.readonly:
                    raise ValueError("into must be a writable buffer")
                head = memoryview(pack(size, _TREAD, tag, fid, offset, count))
                checked.append(([head], size, _TREAD, tag, mv))
                bounds.append(min(msize, max(_SMALL_REPLY, RREAD_HEADER_SIZE + count)))
    except struct.error as exc:
        raise ValueError(f"a fid, offset, count or tag out of range: {exc}") from None
    return checked, bounds


class NotSent(Future[bytes]):
    """The future of a message of a batch that was not sent: already failed
    with the reason (``submit_many`` returns these for the first message that
    could not be put and every one after it)."""


def failed_future(exc: BaseException | None) -> NotSent:
    """A future already failed with *exc* (a message of a batch not sent)."""
    future = NotSent()
    future.set_exception(exc if exc is not None else RuntimeError("not sent"))
    return future


#: Serialises the rare state changes of a :class:`Reply` that are not a
#: settle (cancel, set_running_or_notify_cancel) and the making of its
#: condition: never taken on the path of a reply.
_TRANSITION = threading.Lock()
_DONE = (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED)


class Reply(Future[bytes]):
    """The future of a request in flight: a :class:`concurrent.futures.Future`
    that costs no lock until someone must block on it.

    A plain ``Future`` builds a :class:`threading.Condition` (and its
    ``RLock``) for every request and takes it in every ``done()``,
    ``result()``, ``set_result()``: on the hot path of a stat that was
    about a quarter of the caller's function calls, and on CPython 3.11
    every lock acquisition reads the clock (a system call in a PV domain
    without vDSO).  Here settling and adding a callback take no lock:

    * who finishes the future (:meth:`settle`) or cancels it claims it by
      ``self._claim.pop()`` on a one-token list: one C-level operation,
      atomic under the GIL and on free-threaded builds, that exactly one
      caller wins (the others get :class:`IndexError`).  Only the winner
      writes the result and then the state, so the state is written once
      (``PENDING`` -> ``FINISHED`` or ``CANCELLED``).
    * ``RUNNING`` is kept in a flag of its own (``_running``), never
      written into the settled state: a ``set_running_or_notify_cancel``
      racing a settle cannot overwrite ``FINISHED``.  :attr:`_state`
      combines the two for the base class's methods.
    * each done-callback is kept in a one-element list, and whoever calls
      it pops it first (``entry.pop()``, atomic): the settler after the
      state is written, the adder if it sees the state done after
      appending.  A callback added while the future settles is called
      exactly once, by one of them.
    * the condition is made only for a thread that waits for a future not
      yet done (or :func:`concurrent.futures.wait`): the settler writes the
      state before it reads ``_cond``, the waiter publishes ``_cond``
      before it reads the state under that condition, so either the
      waiter sees the state done or the settler sees the condition and
      notifies under its lock.

    The behaviour (states, callbacks, ``wait``/``as_completed``,
    ``asyncio.wrap_future``) is the base class's.
    """

    def __init__(self, tag: int = -1) -> None:  # no super().__init__(): no condition yet
        #: the tag of its request (how the request table finds it)
        self.tag = tag
        self._settled = PENDING  # PENDING, FINISHED, CANCELLED or CANCELLED_AND_NOTIFIED
        self._running = False
        self._claim: list[None] = [None]
        self._result: bytes | None = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._callbacks: list[list[Callable[[Future[bytes]], object]]] = []
        self._cond: threading.Condition | None = None

    @property
    def _state(self) -> str:
        settled = self._settled
        if settled == PENDING and self._running:
            return RUNNING
        return settled

    @_state.setter
    def _state(self, value: str) -> None:  # only the base class's code, on paths overridden here
        if value == RUNNING:
            self._running = True
        else:
            self._settled = value

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _TRANSITION:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    @_condition.setter
    def _condition(self, value: threading.Condition) -> None:
        self._cond = value

    def done(self) -> bool:
        """Whether the future is finished or cancelled (no lock taken)."""
        return self._settled != PENDING

    def result(self, timeout: float | None = None) -> bytes:
        """The reply, or the failure raised; waits (at most *timeout*
        seconds) only if not done, as :meth:`concurrent.futures.Future.result`."""
        if self._settled == FINISHED:
            exc = self._exception
            if exc is None:
                return self._result  # type: ignore[return-value]
            try:
                raise exc
            finally:
                del exc
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The failure (``None`` for a reply); waits as :meth:`result` does."""
        if self._settled == FINISHED:
            return self._exception
        return super().exception(timeout)

    def settle(self, result: bytes | None, exc: BaseException | None) -> bool:
        """Finish with *result*, or *exc* if not ``None``; ``False`` (and
        nothing changed) if the future was done already (or is being
        finished or cancelled by another thread).  Takes no lock unless a
        thread waits on the future's condition."""
        try:
            self._claim.pop()  # atomic: exactly one settle or cancel wins
        except IndexError:
            return False
        if exc is None:
            self._result = result
        else:
            self._exception = exc
        self._settled = FINISHED  # after the result: a reader of the state sees it
        cond = self._cond  # read after the state is written (see the class)
        if cond is not None:
            with cond:
                for waiter in self._waiters:
                    if exc is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                cond.notify_all()
        if self._callbacks:
            self._invoke_callbacks()
        return True

    def set_result(self, result: bytes) -> None:
        """Finish with *result*.

        :raises concurrent.futures.InvalidStateError: done already
        """
        if not self.settle(result, None):
            raise InvalidStateError(f"{self._state}: {self!r}")

    def set_exception(self, exception: BaseException | None) -> None:
        """Finish with the failure *exception*.

        :raises concurrent.futures.InvalidStateError: done already
        """
        if not self.settle(None, exception if exception is not None else RuntimeError()):
            raise InvalidStateError(f"{self._state}: {self!r}")

    def cancel(self) -> bool:
        """Cancel unless running or finished: whether the future is cancelled."""
        with _TRANSITION:  # against set_running_or_notify_cancel (a settle claims)
            if self._settled in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            if self._running:
                return False
            try:
                self._claim.pop()
            except IndexError:
                return False  # finished, or being finished by a settle
            self._settled = CANCELLED
        cond = self._cond
        if cond is not None:
            with cond:
                cond.notify_all()
        self._invoke_callbacks()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """As :meth:`concurrent.futures.Future.set_running_or_notify_cancel`."""
        with _TRANSITION:  # against cancel; a settle only ever writes FINISHED
            settled = self._settled
            if settled == PENDING and not self._running:
                self._running = True
                return True
            if settled == CANCELLED:
                self._settled = CANCELLED_AND_NOTIFIED
        if settled != CANCELLED:
            LOGGER.critical("Future %s in unexpected state: %s", id(self), self._state)
            raise RuntimeError("Future in unexpected state")
        with self._condition:
            for waiter in self._waiters:
                waiter.add_cancelled(self)
        return False

    def add_done_callback(self, fn: Callable[[Future[bytes]], object]) -> None:
        """Call *fn* with the future once it is done (now, if it is)."""
        if self._settled == PENDING:
            entry = [fn]
            self._callbacks.append(entry)  # atomic
            if self._settled == PENDING:
                # not done after the append: the settler, which writes the
                # state before it looks at the list, finds the entry
                return
            # settled meanwhile: the settler may or may not have seen the
            # entry; whoever pops it calls it
            try:
                fn = entry.pop()
            except IndexError:
                return  # the settler called it
        try:
            fn(self)
        except Exception:
            LOGGER.exception("exception calling callback for %r", self)

    def _invoke_callbacks(self) -> None:
        """Call each callback not called yet, in the order added (each
        claimed by an atomic ``pop`` of its entry: never twice)."""
        for entry in self._callbacks:  # a list only appended to: no entry skipped
            try:
                fn = entry.pop()
            except IndexError:
                continue
            try:
                fn(self)
            except Exception:
                LOGGER.exception("exception calling callback for %r", self)


class Request:
    """One 9P request sent and not yet answered.

    :ivar tag: its tag
    :ivar type: its message type (the reply must be ``type + 1`` or an error)
    :ivar future: resolved with the reply's bytes, or an exception
    :ivar abandoned: the caller stopped waiting (the tag stays reserved)
    :ivar into: where an Rread's payload goes (``None``: the reply is returned whole)
    :ivar lazy: nobody waits for the reply promptly (see ``Frontend.lazy``)
    :ivar bound: the ring bytes its reply may take, reserved while it is in
        flight (a transport that keeps such a budget; else 0)
    """

    __slots__ = ("abandoned", "bound", "future", "into", "lazy", "tag", "type")

    def __init__(self, tag: int, mtype: int, into: memoryview | None = None) -> None:
        self.tag = tag
        self.type = mtype
        self.future = Reply(tag)
        self.abandoned = False
        self.into = into
        self.lazy = False
        self.bound = 0

    def wrong_reply(self, mtype: int) -> ProtocolError | None:
        """The error for a reply of type *mtype* to this request, or ``None``
        if that type may answer it (``type + 1``, Rlerror or Rerror).

        Every transport raises this same :class:`~pyxen9p.errors.ProtocolError`.
        """
        if mtype in (self.type + 1, _RLERROR, _RERROR):
            return None
        return ProtocolError(
            f"reply of type {mtype} to a request of type {self.type} (tag {self.tag})"
        )

    def resolve(self, mtype: int, reply: bytes) -> None:
        """Resolve the future with *reply* (of type *mtype*), or with the
        :class:`~pyxen9p.errors.ProtocolError` of a wrong type."""
        if mtype == self.type + 1 or mtype in (_RLERROR, _RERROR):
            self.future.settle(reply, None)  # done already (cancelled): nobody waits
        else:
            self.future.settle(None, self.wrong_reply(mtype))

    def reject(self, exc: BaseException) -> None:
        """Fail the future with *exc* (unless it is done already)."""
        self.future.settle(None, exc)


def rread_target(
    request: Request, mtype: int, size: int, count: int
) -> memoryview | ProtocolError | None:
    """Where the payload of a reply goes for an ``into`` request.

    :returns: ``None`` if the reply is delivered whole (no ``into``, or not
        an Rread), the slice of ``into`` to fill, or the
        :class:`~pyxen9p.errors.ProtocolError` for a count larger than the
        frame or than the buffer (that request fails; the framing is intact)
    """
    into = request.into
    if into is None or mtype != RREAD or size < RREAD_HEADER_SIZE:
        return None
    return rread_slice(into, request.tag, size, count)


def rread_slice(into: memoryview, tag: int, size: int, count: int) -> memoryview | ProtocolError:
    """The slice of *into* that an Rread of *size* bytes (at least its
    11-byte header) announcing *count* bytes of data fills, or the
    :class:`~pyxen9p.errors.ProtocolError` for a count other than the
    frame's or larger than *into* (see :func:`rread_target`)."""
    if count != size - RREAD_HEADER_SIZE:
        return ProtocolError(
            f"Rread (tag {tag}) announces {count} bytes in a frame of {size} bytes"
        )
    if count > into.nbytes:
        return ProtocolError(
            f"Rread (tag {tag}) carries {count} bytes, more than the"
            f" {into.nbytes}-byte buffer given"
        )
    return into[:count]


class RequestTable:
    """The requests in flight on one transport, by tag.

    Thread-safe.  Once :meth:`fail` was called, every later :meth:`register`
    (or :meth:`add`) raises the failure.

    Taking a reply's request, marking one lazy or awaited, flushing and
    failing take no lock (on CPython 3.11 each lock acquisition reads the
    clock: a system call in a PV domain without vDSO).  The rules that make
    that safe:

    * :attr:`pending` is changed only by single C-level dict operations,
      each atomic under the GIL and on free-threaded builds: removals are
      ``pop``/``popitem`` (whoever pops a request owns it: never two), an
      insertion is ``setdefault`` (which tells whether the tag was free).
    * Inserting a tag and removing an unsent request by identity (a
      ``get`` then a ``pop``: two steps) are serialised per tag by one
      lock: :attr:`lock` for :meth:`register`/:meth:`unregister`, the
      caller's own for :meth:`add`/:meth:`withdraw` (a frontend's ring send
      lock: a tag belongs to one ring).  So between the ``get`` and the
      ``pop`` the tag may only lose its request (a reply, a flush, a
      failure), never gain another.
    * The requests someone waits for promptly are also keys of
      :attr:`_awaited` (by identity, not tag: a tag used again cannot be
      confused).  A request enters it before :attr:`pending` and leaves it
      after; :meth:`mark_awaited` puts it back then checks that it is still
      pending, removing it if not: a request taken meanwhile never stays.
    * :meth:`fail` records the failure under :attr:`lock`, then pops every
      request; :meth:`add` inserts, then reads the failure: either the
      failure's pops find the request, or :meth:`add` sees the failure and
      withdraws it (and raises).
    * :attr:`dropped_replies` is counted only by the thread receiving the
      transport's replies (one at a time).

    :ivar dropped_replies: replies that answered no request in flight
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[int, Request] = {}
        self.failure: TransportError | None = None
        self.dropped_replies = 0
        #: the requests in :attr:`pending` not :meth:`marked lazy <mark_lazy>`
        self._awaited: dict[Request, None] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def register(
        self, tag: int, mtype: int, into: memoryview | None = None, lazy: bool = False
    ) -> Request:
        """Reserve *tag* for a request of type *mtype* (*lazy*: see :attr:`Request.lazy`).

        :raises ValueError: the tag is in flight
        :raises ~pyxen9p.errors.TransportError: the table failed (closed transport)
        """
        with self.lock:
            if self.failure is not None:
                raise self.failure
            request = self._insert(tag, mtype, into, lazy)
        if request is None:
            raise ValueError(f"tag {tag} is already in flight")
        return request

    def add(
        self, tag: int, mtype: int, into: memoryview | None = None, lazy: bool = False
    ) -> Request | None:
        """:meth:`register` without the table's lock: the caller holds a lock
        of its own that serialises every :meth:`add` and :meth:`withdraw`
        of *tag* (and never mixes them with :meth:`register` for it).

        :returns: the request, or ``None`` if the tag is in flight
        :raises ~pyxen9p.errors.TransportError: the table failed (closed transport)
        """
        request = self._insert(tag, mtype, into, lazy)
        if request is None:
            return None
        failure = self.failure  # read after the insertion (see the class)
        if failure is not None:
            self.withdraw(request)
            request.reject(failure)
            raise failure
        return request

    def _insert(
        self, tag: int, mtype: int, into: memoryview | None, lazy: bool
    ) -> Request | None:
        """A request for *tag* put in the table (``None``: the tag is in flight)."""
        request = Request(tag, mtype, into)
        if lazy:
            request.lazy = True
        else:
            self._awaited[request] = None  # before it can be taken (see the class)
        if self.pending.setdefault(tag, request) is not request:  # atomic
            self._awaited.pop(request, None)
            return None
        return request

    def withdraw(self, request: Request) -> None:
        """Forget *request*, never sent (the caller holds the lock it used
        for :meth:`add`: no other request can come under its tag meanwhile)."""
        if self.pending.get(request.tag) is request:
            self.pending.pop(request.tag, None)  # or taken meanwhile: gone either way
        self._awaited.pop(request, None)

    def unregister(self, request: Request) -> None:
        """Forget *request* (it was never sent) registered with :meth:`register`."""
        with self.lock:
            self.withdraw(request)

    def take(self, tag: int) -> Request | None:
        """Remove and return the request for *tag*, or count a dropped reply.

        Only the thread receiving the transport's replies calls it.
        """
        request = self.pending.pop(tag, None)  # atomic: the request is ours alone
        if request is None:
            self.dropped_replies += 1  # one receiving thread at a time
            return None
        self._awaited.pop(request, None)  # after the pending pop (see the class)
        return request

    def in_flight_on(self, index: int, modulus: int) -> bool:
        """Whether a request is in flight (abandoned ones included) whose
        tag is *index* modulo *modulus*: on that ring of a multi-ring transport."""
        if modulus == 1:
            return bool(self.pending)
        # one atomic copy: never changed while iterated; a loop, not any():
        # no generator frames
        for tag in self.pending.copy():  # noqa: SIM110
            if tag % modulus == index:
                return True
        return False

    def mark_lazy(self, tag: int) -> None:
        """Nobody waits promptly for the reply to *tag* (if still in flight)."""
        request = self.pending.get(tag)
        if request is not None:
            request.lazy = True
            self._awaited.pop(request, None)  # atomic; gone already if taken

    def mark_awaited(self, future: Future[bytes]) -> bool:
        """Someone waits for *future*'s reply after all: it is no longer lazy.

        :returns: whether its request is still in flight
        """
        request = self._find(future)
        if request is None:
            return False
        request.lazy = False
        self._awaited[request] = None
        # taken (or flushed, failed) meanwhile: its taker's pop of _awaited
        # may have come before the insertion above, so look again
        if self.pending.get(request.tag) is not request:
            self._awaited.pop(request, None)
            return False
        return True

    def _find(self, future: Future[bytes]) -> Request | None:
        """The request in flight whose future is *future*."""
        tag = getattr(future, "tag", None)
        if tag is not None:  # a Reply: its request is under its tag, if in flight
            request = self.pending.get(tag)
            return request if request is not None and request.future is future else None
        for request in self.pending.copy().values():  # a future of another make: look
            if request.future is future:
                return request
        return None

    def awaited(self) -> bool:
        """Whether a request is in flight whose reply someone waits for
        promptly (not :meth:`marked lazy <mark_lazy>`)."""
        return bool(self._awaited)

    def peek(self, tag: int) -> Request | None:
        """The request for *tag*, left in place."""
        return self.pending.get(tag)

    def abandon(self, future: Future[bytes]) -> None:
        """The caller stopped waiting for *future*: its tag stays reserved."""
        request = self._find(future)
        if request is not None:
            request.abandoned = True

    def flushed(self, tag: int) -> Request | None:
        """Free *tag* (Rflush came: no reply will); a waiter gets
        ``InterruptedError``.  :returns: the request forgotten, if any"""
        request = self.pending.pop(tag, None)  # atomic
        if request is not None:
            self._awaited.pop(request, None)
            request.reject(InterruptedError(errno.EINTR, f"tag {tag} was flushed"))
        return request

    def fail(self, exc: TransportError) -> TransportError:
        """Fail every request in flight, and every later registration, with
        the first failure recorded; return it."""
        with self.lock:  # the first failure wins; a register after it sees it
            if self.failure is None:
                self.failure = exc
            failure = self.failure
        pending, awaited = self.pending, self._awaited
        while True:
            try:
                _tag, request = pending.popitem()  # atomic: each request failed once
            except KeyError:
                break
            awaited.pop(request, None)
            request.reject(failure)
        return failure

    def tags(self) -> set[int]:
        """Tags in flight (including abandoned ones)."""
        return set(self.pending.copy())
