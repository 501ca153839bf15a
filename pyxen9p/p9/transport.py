"""Message transports for the 9P client: the :class:`Transport` protocol and stream sockets.

A transport carries complete 9P messages: :meth:`Transport.request` sends one
and returns its reply, matching replies to requests by tag, with many requests
in flight from many threads.  The Xen :class:`~pyxen9p.frontend.Frontend` is a
transport; :class:`StreamTransport` is another, over a connected stream socket
(TCP or Unix) or a pair of file descriptors (a pipe pair, an inherited
socketpair), as used by servers such as diod::

    from pyxen9p.p9.transport import StreamTransport
    from pyxen9p.p9.client import Client

    with Client(StreamTransport.unix("/run/diod.sock"), aname="/srv/export") as fs:
        print(fs.listdir(""))

The peer is not trusted: every frame is checked (``7 <= size <= msize``) and a
malformed frame, an end of stream or a read error fails the transport: every
waiter, and every later call, gets a :class:`~pyxen9p.errors.TransportError`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from typing_extensions import Self

from pyxen9p._requests import (
    RREAD,
    RREAD_HEADER_SIZE,
    Message,
    Request,
    RequestTable,
    as_pieces,
    check_batch,
    failed_future,
    parse_header,
    rread_target,
    writable_target,
)
from pyxen9p.errors import FramingError, ProtocolError, TransportClosedError, TransportError
from pyxen9p.p9.codec import HEADER_SIZE

__all__ = [
    "DEFAULT_STREAM_MSIZE",
    "FramingError",
    "StreamTransport",
    "Transport",
]

log = logging.getLogger(__name__)

#: The largest message a :class:`StreamTransport` carries unless told otherwise.
DEFAULT_STREAM_MSIZE = 1024 * 1024 + 4096

_HEADER = struct.Struct("<IBH")
_READ_CHUNK = 256 * 1024
_IOV_MAX = 1024


def _after(views: list[memoryview], skip: int) -> list[memoryview]:
    """The part of *views* after its first *skip* bytes (at most IOV_MAX views)."""
    if not skip:
        return views[:_IOV_MAX]
    out: list[memoryview] = []
    for view in views:
        if skip >= view.nbytes:
            skip -= view.nbytes
            continue
        out.append(view[skip:] if skip else view)
        skip = 0
        if len(out) == _IOV_MAX:
            break
    return out


@runtime_checkable
class Transport(Protocol):
    """What :class:`~pyxen9p.p9.client.Client` needs from a transport.

    :class:`~pyxen9p.frontend.Frontend` and :class:`StreamTransport` satisfy it.

    :ivar msize: the largest message, in bytes, the transport carries; the
        client negotiates an msize no larger than this

    Optional capabilities (both :class:`~pyxen9p.frontend.Frontend` and
    :class:`StreamTransport` have them; a client checks with ``getattr``
    before using them on another transport):

    ``num_rings: int``
        the tag *T* goes on ring ``T % num_rings`` (a stream has one ring)
    ``in_order: bool``
        ``True`` if the peer serves each ring's requests one after another,
        in the ring's order (both Xen 9pfs backends, QEMU's and xen-9pfsd,
        do): a client may then write dependent requests back to back
        (walk, getattr, clunk) without waiting for each reply.  A stream
        transport says ``False``: a server such as diod runs one
        connection's requests on several threads
    ``submit(message, *, timeout=None, into=None) -> Future[bytes]``
        send without waiting.  *message* may be bytes-like or a tuple/list
        of bytes-like pieces (sent back to back, copied once each, never
        joined first).  *into* is an optional writable byte buffer: an Rread
        reply's data goes straight into ``into[:count]`` and the future's
        result is the 11-byte Rread header; a count larger than *into* or
        than the frame fails that request with
        :class:`~pyxen9p.errors.ProtocolError` (the connection goes on);
        other replies come whole.  ``request`` takes the same two arguments
    ``submit_many(messages, *, timeout=None, into=None) -> list[Future[bytes]]``
        several messages in order, one notification (one system call) per
        ring touched; see :meth:`StreamTransport.submit_many` for what happens
        when one of them cannot be sent
    ``result(future, *, timeout=60.0) -> bytes``
        wait for a future from ``submit`` or ``submit_many`` as ``request``
        waits (a timeout raises :class:`TimeoutError` and leaves the tag
        reserved).  On the Xen frontend the waiting thread receives on the
        event channel itself while no other thread does, so a chain sent
        with ``submit_many`` and waited for with ``result`` costs no thread
        handoff for a lone caller
    ``abandon(future)``
        the caller stopped waiting (the tag stays reserved until the reply
        or :meth:`flushed`)
    """

    msize: int

    def request(self, message: bytes, *, timeout: float | None = ...) -> bytes:
        """Send one complete 9P message and return its complete reply.

        Thread-safe; many requests (with distinct tags) may be in flight.

        :param message: the encoded request, header included
        :param timeout: limit in seconds (``None``: as long as the transport lives)
        :returns: the encoded reply carrying the same tag
        :raises TimeoutError: no reply in time; the tag stays reserved in the
            transport until its reply arrives or :meth:`flushed` frees it
        :raises ~pyxen9p.errors.TransportError: the transport failed or was closed
        """
        ...

    def flushed(self, tag: int) -> None:
        """Free *tag*: the server answered a Tflush for it and will never reply."""
        ...

    def close(self) -> None:
        """Release the transport (idempotent); waiters get a ``TransportClosedError``."""
        ...


if TYPE_CHECKING:  # mypy checks that the Xen frontend is a Transport
    from pyxen9p.frontend import Frontend

    def _frontend_is_a_transport(frontend: Frontend) -> Transport:
        return frontend


class StreamTransport:
    """9P messages over a byte stream: a connected socket or a pair of fds.

    A reader thread splits the incoming stream into frames and hands each
    reply to the caller waiting for its tag.  Writers take turns so each
    message goes out whole.  Build one with :meth:`tcp`, :meth:`unix`,
    :meth:`from_socket` or :meth:`from_fds`.

    The file descriptors are switched to non-blocking mode (so that every
    write can time out).

    :param rfd: the descriptor replies are read from
    :param wfd: the descriptor requests are written to (may equal *rfd*)
    :param msize: the largest frame accepted or sent
    :param owned: objects to close with the transport (sockets, or fds as ints)
    :param name: a label for the reader thread and messages
    :ivar msize: the largest message carried, in bytes
    :ivar dropped_replies: replies received for tags nobody waits for
    """

    msize: int
    #: A stream is one ring: its messages are read by the peer in order.
    num_rings: int = 1
    #: A stream's server may run its requests concurrently (diod does).
    in_order: bool = False

    def __init__(
        self,
        rfd: int,
        wfd: int,
        *,
        msize: int = DEFAULT_STREAM_MSIZE,
        owned: tuple[socket.socket | int, ...] = (),
        name: str = "stream",
    ) -> None:
        if msize < HEADER_SIZE:
            raise ValueError(f"msize {msize} is smaller than a 9P header")
        self.msize = msize
        self.name = name
        self._table = RequestTable()
        self._rfd = rfd
        self._wfd = wfd
        self._owned = owned
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._failure: TransportError | None = None
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            os.set_blocking(rfd, False)
            os.set_blocking(wfd, False)
        except OSError:
            self._close_fds()
            raise
        self._reader = threading.Thread(
            target=self._read_loop, name=f"pyxen9p-9p-reader {name}", daemon=True
        )
        self._reader.start()

    # --- construction ----------------------------------------------------

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, msize: int = DEFAULT_STREAM_MSIZE, own: bool = True
    ) -> Self:
        """Use a connected stream socket.

        :param own: close *sock* with the transport
        """
        fd = sock.fileno()
        if fd < 0:
            raise ValueError("the socket is closed")
        try:
            name = repr(sock.getpeername()) if sock.family != socket.AF_UNIX else "unix"
        except OSError:
            name = f"fd {fd}"
        return cls(fd, fd, msize=msize, owned=(sock,) if own else (), name=name)

    @classmethod
    def from_fds(
        cls, rfd: int, wfd: int, *, msize: int = DEFAULT_STREAM_MSIZE, own: bool = True
    ) -> Self:
        """Use a pair of file descriptors (e.g. two pipes, or one socket fd twice).

        :param own: close the descriptors with the transport
        """
        owned: tuple[int, ...] = ()
        if own:
            owned = (rfd,) if rfd == wfd else (rfd, wfd)
        return cls(rfd, wfd, msize=msize, owned=owned, name=f"fds {rfd}/{wfd}")

    @classmethod
    def tcp(
        cls, host: str, port: int, *, timeout: float = 30.0, msize: int = DEFAULT_STREAM_MSIZE
    ) -> Self:
        """Connect to a 9P server over TCP.

        :param timeout: limit for establishing the connection
        """
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls.from_socket(sock, msize=msize)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def unix(
        cls, path: str | os.PathLike[str], *, timeout: float = 30.0,
        msize: int = DEFAULT_STREAM_MSIZE,
    ) -> Self:
        """Connect to a 9P server listening on a Unix stream socket at *path*.

        :param timeout: limit for establishing the connection
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            return cls.from_socket(sock, msize=msize)
        except BaseException:
            sock.close()
            raise

    # --- state -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether requests can still be sent (not closed and not failed)."""
        return not self._closed and self._failure is None

    @property
    def failure(self) -> TransportError | None:
        """Why the transport failed, or ``None``."""
        return self._failure

    def outstanding_tags(self) -> set[int]:
        """Tags sent and not yet answered (including those nobody waits for)."""
        return self._table.tags()

    @property
    def dropped_replies(self) -> int:
        """Replies received for tags nobody waits for."""
        return self._table.dropped_replies

    def _check_usable(self) -> None:
        if self._closed:
            raise TransportClosedError(errno.ENOTCONN, f"the transport ({self.name}) is closed")
        if self._failure is not None:
            raise self._failure

    # --- sending -----------------------------------------------------------

    def submit(
        self,
        message: Message,
        *,
        timeout: float | None = None,
        into: memoryview | None = None,
    ) -> Future[bytes]:
        """Send one complete message; return a future of its reply.

        :param message: whole, or a tuple/list of bytes-like pieces written
            with one ``writev`` (never joined first)
        :param timeout: limit for getting the message out (``None``: no limit
            while the transport lives)
        :param into: a writable byte buffer for an Rread's data (see
            :class:`Transport`); it must stay valid until the future is done
            or the tag flushed
        :raises ValueError: malformed message, too large, or its tag in flight
        :raises TimeoutError: the message could not be written in time (nothing
            was sent: if part of it was, the transport fails instead)
        :raises ~pyxen9p.errors.TransportError: the transport failed or is closed
        """
        views, total = as_pieces(message)
        _size, mtype, tag = parse_header(views, total, self.msize)
        target = writable_target(into)
        self._check_usable()
        pending = self._table.register(tag, mtype, target)
        try:
            self._send(views, total, timeout)
        except BaseException:
            self._table.unregister(pending)
            raise
        return pending.future

    def submit_many(
        self,
        messages: Sequence[Message],
        *,
        timeout: float | None = None,
        into: Sequence[memoryview | None] | None = None,
    ) -> list[Future[bytes]]:
        """Send several messages in order with as few ``writev`` calls as the
        kernel allows (one, usually); one future per message.

        Every message is checked before anything is sent: a malformed one,
        two with the same tag, or an *into* list of another length raise
        :class:`ValueError` and nothing is sent; a transport closed or failed
        by then raises its :class:`~pyxen9p.errors.TransportError`.

        A message whose tag is in flight is not sent, nor is any after it:
        their futures come back already failed with that
        :class:`ValueError`, their tags not reserved; the ones before it are
        sent.  A write that times out before the first byte sends nothing
        (every future fails with :class:`TimeoutError`); one that times out
        part way fails the transport, as :meth:`submit` does.

        :param timeout: limit for getting the messages out
        :param into: ``None``, or one entry per message (see :meth:`submit`)
        """
        checked = check_batch(messages, into, self.msize)
        self._check_usable()
        registered: list[Request] = []
        failure: BaseException | None = None
        for _views, _total, mtype, tag, target in checked:
            try:
                registered.append(self._table.register(tag, mtype, target))
            except (ValueError, TransportError) as exc:
                failure = exc
                break
        views = [v for entry in checked[: len(registered)] for v in entry[0]]
        total = sum(entry[1] for entry in checked[: len(registered)])
        if registered:
            try:
                self._send(views, total, timeout)
            except BaseException as exc:
                for request in registered:
                    self._table.unregister(request)
                if not isinstance(exc, (TimeoutError, TransportError)):
                    raise
                failure = exc
                registered = []
        futures: list[Future[bytes]] = [request.future for request in registered]
        while len(futures) < len(checked):
            futures.append(failed_future(failure))
        return futures

    def _send(self, views: list[memoryview], total: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout

        def slice_left() -> float:
            if deadline is None:
                return 1.0
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, f"could not send within {timeout:g}s")
            return min(left, 1.0)

        if not self._send_lock.acquire(blocking=False):
            while not self._send_lock.acquire(timeout=slice_left()):
                self._check_usable()
        sent = 0
        try:
            poller: select.poll | None = None
            while sent < total:
                self._check_usable()
                try:
                    sent += os.writev(self._wfd, _after(views, sent))
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    failure = TransportError(exc.errno or errno.EIO, f"write failed: {exc}")
                    self._fail(failure)
                    raise failure from exc
                try:
                    wait = slice_left()
                except TimeoutError:
                    if sent:
                        failure = TransportError(
                            errno.ETIMEDOUT,
                            f"timed out after writing {sent} of {total} bytes of a message",
                        )
                        self._fail(failure)
                        raise failure from None
                    raise
                if poller is None:
                    poller = select.poll()
                    poller.register(self._wfd, select.POLLOUT)
                poller.poll(wait * 1000)
        except BaseException as exc:
            if 0 < sent < total and not isinstance(exc, TransportError):
                # interrupted in the middle of a message: the stream is out of step
                self._fail(
                    TransportError(errno.EIO, f"interrupted after {sent} bytes of a message")
                )
            raise
        finally:
            self._send_lock.release()

    def request(
        self,
        message: Message,
        *,
        timeout: float | None = 60.0,
        into: memoryview | None = None,
    ) -> bytes:
        """Send one complete 9P message and return its complete reply.

        :param message: whole, or as pieces (see :meth:`submit`)
        :param timeout: overall limit in seconds (``None``: as long as the
            transport lives)
        :param into: where an Rread's data goes (see :meth:`submit`)
        :raises TimeoutError: no reply in time (the tag stays reserved until
            its reply arrives or :meth:`flushed` frees it)
        :raises ~pyxen9p.errors.TransportError: the transport failed or was closed
        :raises ~pyxen9p.errors.ProtocolError: the reply has the wrong type
        """
        if threading.current_thread() is self._reader:
            raise RuntimeError("a request from the transport's own reader thread would deadlock")
        start = time.monotonic()
        future = self.submit(message, timeout=timeout, into=into)
        left = None if timeout is None else max(timeout - (time.monotonic() - start), 0.0)
        try:
            return future.result(left)
        except FutureTimeout:
            self._abandon(future)
            raise TimeoutError(errno.ETIMEDOUT, f"no reply within {timeout:g}s") from None
        except BaseException:
            # interrupted (KeyboardInterrupt...): nobody waits for this reply any more
            if not future.done():
                self._abandon(future)
            raise

    def result(self, future: Future[bytes], *, timeout: float | None = 60.0) -> bytes:
        """Wait for the reply of a future from :meth:`submit` or :meth:`submit_many`.

        :raises TimeoutError: no reply in time (the tag stays reserved, as
            for :meth:`request`)
        :raises RuntimeError: called from the reader thread (a done-callback)
        :raises: whatever the future was failed with
        """
        if not future.done() and threading.current_thread() is self._reader:
            raise RuntimeError("waiting from the transport's own reader thread would deadlock")
        try:
            return future.result(timeout)
        except FutureTimeout:
            self._abandon(future)
            raise TimeoutError(errno.ETIMEDOUT, f"no reply within {timeout:g}s") from None

    def _abandon(self, future: Future[bytes]) -> None:
        self._table.abandon(future)

    def abandon(self, future: Future[bytes]) -> None:
        """The caller stopped waiting for *future*: its tag stays reserved
        until the reply comes or :meth:`flushed` frees it."""
        self._table.abandon(future)

    def flushed(self, tag: int) -> None:
        """Free *tag* after the server answered a Tflush for it.

        A waiter still attached gets :class:`InterruptedError`.
        """
        self._table.flushed(tag)

    # --- receiving ---------------------------------------------------------

    def _read_loop(self) -> None:
        # Small frames are cut out of a staging buffer; a frame larger than it
        # is read straight into a buffer of its own, and an Rread's data for
        # a request with an ``into`` buffer straight into that buffer.
        buf = bytearray(_READ_CHUNK)
        view = memoryview(buf)
        start = end = 0
        poller = select.poll()
        poller.register(self._rfd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._closed and self._failure is None:
                avail = end - start
                if avail >= HEADER_SIZE:
                    size = self._check_frame(view[start : start + HEADER_SIZE])
                    mtype = buf[start + 4]
                    if mtype == RREAD and avail >= RREAD_HEADER_SIZE <= size:
                        used = self._maybe_into(view, start, end, size, poller)
                        if used is None:
                            return
                        if used:
                            start += min(used, avail)
                            if start >= end:
                                start = end = 0
                            continue
                    if avail >= size:
                        frame = view[start : start + size].tobytes()
                        start += size
                        if start == end:
                            start = end = 0
                        self._deliver(frame)
                        continue
                    if size > len(buf) and (mtype != RREAD or avail >= RREAD_HEADER_SIZE):
                        big = bytearray(size)
                        big[:avail] = view[start:end]
                        start = end = 0
                        if not self._fill(memoryview(big), avail, poller):
                            return
                        self._deliver(bytes(big))
                        continue
                if (start and end == len(buf)) or start > len(buf) // 2:
                    buf[:avail] = view[start:end]  # make room at the end
                    start, end = 0, avail
                n = self._read_into(view[end:], poller)
                if n is None:
                    return
                if n == 0:
                    detail = f" in the middle of a message ({avail} bytes)" if avail else ""
                    raise TransportClosedError(
                        errno.ECONNRESET, f"the peer ({self.name}) closed the connection{detail}"
                    )
                end += n
        except TransportError as exc:
            self._fail(exc)
        except OSError as exc:
            if not self._closed:
                self._fail(TransportError(exc.errno or errno.EIO, f"read failed: {exc}"))
        except Exception as exc:  # never die silently with callers waiting
            log.exception("pyxen9p stream reader crashed")
            self._fail(TransportError(errno.EIO, f"reader crashed: {exc!r}"))

    def _maybe_into(
        self, view: memoryview, start: int, end: int, size: int, poller: select.poll
    ) -> int | None:
        """An Rread (its size checked, its 11-byte header staged at *start*):
        if its request has an ``into`` buffer, copy the data there, straight
        from the stream for what is not staged yet, and resolve it.

        :returns: 0 if the frame is to be delivered whole, else the frame's
            size (consumed: what was staged, and the rest from the stream);
            ``None`` if the transport closed meanwhile
        """
        tag, count = struct.unpack_from("<HI", view, start + 5)
        request = self._table.peek(tag)
        if request is None or request.into is None or request.wrong_reply(RREAD) is not None:
            return 0
        target = rread_target(request, RREAD, size, count)
        if target is None:
            return 0
        staged = min(end - start, size)
        if isinstance(target, ProtocolError):
            if not self._discard(size - staged, poller):
                return None
            request = self._table.take(tag)
            if request is not None:
                request.reject(target)
            return size
        head = view[start : start + RREAD_HEADER_SIZE].tobytes()
        have = staged - RREAD_HEADER_SIZE
        target[:have] = view[start + RREAD_HEADER_SIZE : start + staged]
        if have < count and not self._fill(target, have, poller):
            return None
        request = self._table.take(tag)
        if request is not None:
            request.resolve(RREAD, head)
        return size

    def _discard(self, n: int, poller: select.poll) -> bool:
        """Read and drop *n* bytes of the stream; False if the transport closed."""
        if n <= 0:
            return True
        scratch = memoryview(bytearray(min(n, _READ_CHUNK)))
        while n > 0:
            got = self._read_into(scratch[: min(n, scratch.nbytes)], poller)
            if got is None:
                return False
            if got == 0:
                raise TransportClosedError(
                    errno.ECONNRESET,
                    f"the peer ({self.name}) closed the connection in the middle of a message",
                )
            n -= got
        return True

    def _read_into(self, target: memoryview, poller: select.poll) -> int | None:
        """Read what is available into *target*: the byte count, 0 at EOF, None if closed."""
        while not self._closed and self._failure is None:
            try:
                return os.readv(self._rfd, [target])
            except (BlockingIOError, InterruptedError):
                poller.poll(1000)
        return None

    def _fill(self, frame: memoryview, got: int, poller: select.poll) -> bool:
        """Read the rest of a large frame into *frame*; False if the transport closed."""
        while got < frame.nbytes:
            n = self._read_into(frame[got:], poller)
            if n is None:
                return False
            if n == 0:
                raise TransportClosedError(
                    errno.ECONNRESET,
                    f"the peer ({self.name}) closed the connection in the middle of a"
                    f" message ({got} of {frame.nbytes} bytes)",
                )
            got += n
        return True

    def _check_frame(self, buf: memoryview) -> int:
        size, mtype, tag = _HEADER.unpack_from(buf)
        if size < HEADER_SIZE:
            raise FramingError(
                errno.EPROTO, f"frame size {size} is smaller than the 9P header (type {mtype})"
            )
        if size > self.msize:
            raise FramingError(
                errno.EMSGSIZE,
                f"frame of {size} bytes exceeds the msize {self.msize} (type {mtype}, tag {tag})",
            )
        return int(size)

    def _deliver(self, frame: bytes) -> None:
        _, mtype, tag = _HEADER.unpack_from(frame)
        pending = self._table.take(tag)
        if pending is None:
            log.warning(
                "%s: dropping a reply (type %d) for tag %d not in flight", self.name, mtype, tag
            )
            return
        if pending.abandoned:
            return
        if pending.into is not None and mtype == RREAD and pending.wrong_reply(mtype) is None:
            # an Rread with data for a buffer reaches here only if too short
            pending.reject(ProtocolError(f"Rread (tag {tag}) of only {len(frame)} bytes"))
            return
        pending.resolve(mtype, frame)

    def abort(self, exc: TransportError) -> None:
        """Fail every request in flight and every later one with *exc* at once
        (the peer is considered dead); :meth:`close` still releases everything."""
        self._fail(exc)

    def _fail(self, exc: TransportError) -> None:
        """Fail the transport: every waiter gets *exc*, later calls too."""
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._table.fail(exc)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # --- closing -----------------------------------------------------------

    def close(self) -> None:
        """Stop the reader, fail the waiters, close what the transport owns (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._fail(TransportClosedError(errno.ENOTCONN, f"the transport ({self.name}) was closed"))
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=10.0)
            if self._reader.is_alive():  # pragma: no cover - would be a bug
                log.error("%s: the reader thread did not stop", self.name)
        # take the write turn so no writer uses a closed descriptor
        got = self._send_lock.acquire(timeout=10.0)
        try:
            self._close_fds()
        finally:
            if got:
                self._send_lock.release()

    def _close_fds(self) -> None:
        for obj in self._owned:
            try:
                if isinstance(obj, int):
                    os.close(obj)
                else:
                    obj.close()
            except OSError:
                pass
        self._owned = ()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self.connected else "closed" if self._closed else "failed"
        return f"<StreamTransport {self.name} {state} msize={self.msize}>"
