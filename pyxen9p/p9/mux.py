"""A 9P2000.L multiplexer: one backend session shared by any number of local clients.

The Xen 9pfs backend serves a device's connection once, so the agent
(``pyxen9p serve``) holds that one connection and lets every local program
use it through a socket.  :class:`Multiplexer` is that socket's server: it
speaks 9P2000.L to each client and forwards their requests onto one 9P
session of the backend :class:`~pyxen9p.p9.transport.Transport` (a
:class:`~pyxen9p.frontend.Frontend`, a
:class:`~pyxen9p.p9.transport.StreamTransport`...).  plan9port's ``9pserve``
is the reference design::

    from pyxen9p.p9.mux import MultiplexerThread

    with MultiplexerThread(frontend) as mux:        # negotiates with the backend
        path = mux.listen_unix("/run/pyxen9p/share.sock")
        mux.wait()                                  # until stopped or the backend fails

or, inside an event loop, ``mux = Multiplexer(transport); await mux.start();
await mux.listen_unix(path); await mux.wait_stopped()``.

What a client sees
    * **Version.** Each client's Tversion is answered by the multiplexer:
      only the backend session's dialect is offered, ``9P2000.L`` or
      ``9P2000.u`` (any other version gets ``"unknown"``), and
      the msize is the smaller of the client's and the backend session's.  A
      client must start with a Tversion; a second Tversion once the client
      holds fids or has requests in flight ends that client (9P would have
      the server reset the session; a multiplexer's clients never need it).
    * **Tags and fids** are the client's own: they are remapped onto backend
      tags and fids that only the multiplexer knows, so a client can neither
      see nor guess another client's fids (a fid it did not create is
      ``EBADF``, answered locally and never forwarded).
    * **Tattach** is forwarded with the client's ``uname``, ``aname`` and
      ``n_uname``: the backend decides what each attach may see.
    * **Tflush** follows the 9P rules: a request still queued in the
      multiplexer is dropped and answered with Rflush at once; a request on
      the backend gets a backend Tflush, and the client's Rflush is sent when
      the backend's arrives, after the original's reply if the backend sent
      one first (its effects, such as a new fid, are then kept).  A request
      answered by Rflush alone never happened (its new fid is released).
      Over 9P2000.u the backend may have no Tflush (xen-9pfsd refuses it),
      so none is sent: a client's Tflush of a request on the backend is
      answered right after that request's reply, which counts (a Tflush
      then only frees the tag; it cannot cut a request short).
    * **Limits** (:class:`Limits`) keep one client from starving the others:
      requests beyond ``max_requests`` in flight wait in the multiplexer,
      beyond ``max_queued`` more the client is simply not read (it waits;
      a Tflush of a queued request is still answered); a request creating a
      fid beyond ``max_fids`` gets ``EMFILE``; a connection beyond
      ``max_clients`` is closed at once.  Tread and Treaddir counts are
      clamped so that a reply fits the client's msize.  A client that does
      not read its replies is not read either.
    * **Bad messages** end that client only: a frame smaller than a header or
      larger than the negotiated msize, a malformed body, a reply type, a
      duplicate tag, ``NOTAG`` outside Tversion, a message before Tversion.
      A request of a type the session's dialect does not have gets
      ``EOPNOTSUPP``; a fid the client does not hold ``EBADF``.  The backend
      session and the other clients are not affected.  Errors are ``Rlerror``
      over 9P2000.L and ``Rerror`` (with a text and the errno) over 9P2000.u.
    * **xen-9pfsd** (the transport's ``backend_path`` is under
      ``backend/xen_9pfs/``): a Tstat of a fid that has walked nowhere (the
      share's root: an attach fid, or one walked back there by name) is
      answered by the multiplexer with ``EOPNOTSUPP`` and never forwarded,
      since xen-9pfsd does not answer the root's attributes usefully.  Its
      fid limit (``max-open-files``, 5 by default, counting every fid) is
      shared by all the clients: a request creating a fid beyond it gets
      ``EMFILE`` with a text saying so.
    * **Hanging up** (or being ended): the client's queued requests are
      dropped, those on the backend flushed, and once they are all resolved
      every fid the client held (including one a late reply created) is
      clunked on the backend.

The backend
    :meth:`Multiplexer.start` sends the backend session's Tversion:
    9P2000.L, then 9P2000.u if the backend refuses it (``version="auto"``,
    as the client negotiates), or the one dialect asked for.  The
    backend's messages go out from one sender thread (so a slow backend never
    blocks the event loop) and replies come back through the transport's
    futures.  When the backend fails (a request fails with a
    :class:`~pyxen9p.errors.TransportError`, or the transport stops being
    ``connected``), every request in flight or queued gets an ``Rlerror``
    (``Rerror`` over 9P2000.u) with the failure's errno (``ECONNRESET``,
    ``EIO``...), every client is
    disconnected, new connections are refused, and :attr:`Multiplexer.failure`
    says why (:meth:`Multiplexer.wait_stopped` returns it).  The multiplexer
    never closes the transport: its owner does.

Listeners and who may connect
    :meth:`Multiplexer.listen_unix` creates a Unix stream socket with mode
    ``0600`` (``0660`` with a *group*), set before the socket listens, so no
    connection is possible with looser permissions; each connection's peer
    credentials (``SO_PEERCRED``) are checked against the allowed users
    (default: the multiplexer's own effective uid) and groups (default: the
    *group*, matched against the peer's primary and supplementary groups);
    others are refused and logged.  :meth:`Multiplexer.listen_tcp` binds a
    loopback address only, unless ``allow_remote=True``: TCP carries no
    credentials, so anyone who can reach the port (on loopback: every local
    user and every container sharing the network namespace) gets the share
    with whatever ``uname`` they claim.

Stopping
    :meth:`Multiplexer.stop` closes the listeners (removing the socket files
    it created), disconnects every client, flushes their requests and clunks
    their fids on the backend (within a time limit), and stops the sender
    thread.  The transport stays open for its owner to close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import grp
import ipaddress
import logging
import os
import pwd
import queue
import select
import socket
import stat
import struct
import threading
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from typing_extensions import Self

from pyxen9p._requests import MIN_MSIZE
from pyxen9p.errors import ProtocolError, Pyxen9pError, TransportClosedError, TransportError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.session import IdPool
from pyxen9p.p9.transport import Transport

__all__ = [
    "Limits",
    "Multiplexer",
    "MultiplexerThread",
    "PeerCredentials",
    "SubmittingTransport",
    "peer_credentials",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_HEADER = struct.Struct("<IBH")
_TAG = struct.Struct("<H")
_UCRED = struct.Struct("3i")


#: Seconds between checks for the hang-up of a client that is not being read.
_HANGUP_POLL = 0.25

#: Replies larger than this are passed on without copying them.
_COPY_LIMIT = 64 * 1024

#: Bytes of an Rread or Rreaddir before its data: ``size[4] type[1] tag[2] count[4]``.
_RDATA_HDR = 11

_FID_NAMES = ("fid", "afid", "dfid", "newfid", "olddirfid", "newdirfid", "dirfd")

#: For each request type (of either dialect), the fields that carry fids.
_FID_FIELDS: dict[type[c.Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.name in _FID_NAMES)
    for dialect in (c.VERSION_9P2000_L, c.VERSION_9P2000_U)
    for cls in c.message_classes(dialect).values()
}

#: The request types of each dialect.
_REQUEST_TYPES = {
    dialect: frozenset(t for t in c.message_classes(dialect) if t % 2 == 0)
    for dialect in (c.VERSION_9P2000_L, c.VERSION_9P2000_U)
}

#: The dialects the multiplexer may speak to its backend (and then to its clients).
VERSIONS = ("auto", c.VERSION_9P2000_L, c.VERSION_9P2000_U)

#: The text of the multiplexer's refusal of a Tstat of the share's root on xen-9pfsd.
ROOT_TSTAT_REFUSED = (
    "the attributes of the share's root are not asked of xen-9pfsd"
    " (it does not answer a Tstat of the root usefully)"
)

#: The text replacing a backend's fid-limit error (9P2000.u): the limit is shared.
FID_LIMIT_REACHED = (
    "the backend's fid limit is reached: it counts the fids of every client of"
    " this multiplexer (xen-9pfsd: max-open-files, 5 by default)"
)

#: Requests that create a fid, and the field naming it.
_CREATES: dict[type[c.Message], str] = {
    c.Tattach: "fid",
    c.Tauth: "afid",
    c.Twalk: "newfid",
    c.Txattrwalk: "newfid",
}

_OPEN, _PENDING, _CLOSING = "open", "pending", "closing"


class SubmittingTransport(Protocol):
    """A :class:`~pyxen9p.p9.transport.Transport` that can also send without waiting.

    :class:`~pyxen9p.frontend.Frontend` and
    :class:`~pyxen9p.p9.transport.StreamTransport` have :meth:`submit`; the
    multiplexer uses it when present (and ``request`` in a thread pool
    otherwise).
    """

    msize: int

    def submit(
        self, message: bytes | bytearray | memoryview, *, timeout: float | None = ...
    ) -> Future[bytes]:
        """Send one complete 9P message; return a future of its reply."""
        ...

    def flushed(self, tag: int) -> None:
        """Free *tag*: the server answered a Tflush for it."""
        ...


@dataclass(frozen=True)
class Limits:
    """What one client may hold at once, and how many clients there may be.

    :ivar max_clients: connected clients (including those whose requests and
        fids are still being released after they hung up); more connections
        are closed at once
    :ivar max_requests: one client's requests on the backend at once; more
        wait in the multiplexer
    :ivar max_queued: one client's requests waiting beyond *max_requests*;
        beyond that the client is not read until one completes
    :ivar max_fids: fids one client may hold; a request creating one more
        gets ``EMFILE``.  The backend's own limit applies to the sum over
        all clients (pyxen9p's FileServer: 4096 per session)
    :ivar stop_timeout: seconds :meth:`Multiplexer.stop` waits for the
        backend to answer the flushes and clunks of the clients it ends
    """

    max_clients: int = 64
    max_requests: int = 64
    max_queued: int = 64
    max_fids: int = 1024
    stop_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_clients", "max_requests", "max_queued", "max_fids"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        # every client may have max_requests requests and as many Tflushes on
        # the backend: all of them must fit in the 65535 backend tags
        if self.max_clients * self.max_requests * 2 + 16 > c.NOTAG:
            raise ValueError(
                f"max_clients * max_requests * 2 ({self.max_clients * self.max_requests * 2})"
                f" exceeds the 9P tag space"
            )


@dataclass(frozen=True)
class PeerCredentials:
    """The credentials of a Unix socket's peer (``SO_PEERCRED``).

    :ivar pid: its process id (when it connected)
    :ivar uid: its effective user id
    :ivar gid: its effective (primary) group id
    """

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The peer credentials of a connected Unix stream socket (Linux ``SO_PEERCRED``).

    :raises OSError: *sock* is not a connected Unix socket
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


#: The error of an exhausted backend tag or fid pool (Limits keep the pools large enough).
_OUT_OF_IDS = "the multiplexer ran out of backend identifiers"

#: What :meth:`Multiplexer._bind` returns for a refused Tstat of the root (not an errno).
_ROOT_TSTAT = -1


class _Violation(Pyxen9pError):
    """A client broke the protocol: it is disconnected."""


@dataclass(eq=False)
class _Fid:
    bfid: int
    state: str
    #: how far below the share's root the fid is, by the names walked (0: the root)
    depth: int = 0
    #: in-place walks of this fid in flight (its place is unknown meanwhile)
    moving: int = 0


def _unsupported(frame: bytes) -> bool:
    """Whether the error reply *frame* says the request is not supported at all."""
    try:
        _, mtype, _ = _HEADER.unpack_from(frame)
        if mtype == c.MessageType.RLERROR:
            code = struct.unpack_from("<I", frame, c.HEADER_SIZE)[0]
        elif mtype == c.MessageType.RERROR:
            code = struct.unpack_from("<I", frame, len(frame) - 4)[0]
        else:
            return False
    except struct.error:
        return False
    return code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTSUP)


def _walk_depth(depth: int, names: Iterable[str]) -> int:
    """The depth below the root after walking *names* from *depth* (``..`` stops at the root)."""
    for name in names:
        if name == "..":
            depth = max(depth - 1, 0)
        elif name not in ("", "."):
            depth += 1
    return depth


@dataclass(eq=False)
class _Request:
    """One client request, from its arrival to its reply (or cancellation)."""

    client: _Client
    ctag: int
    msg: c.Message
    out: c.Message | None = None  # the message as the backend sees it (tag set when sent)
    btag: int | None = None
    future: Future[bytes] | None = None
    sent: bool = False
    done: bool = False
    newfid: int | None = None  # the client fid this request creates
    closes: int | None = None  # the client fid this request clunks or removes
    flush_btag: int | None = None  # the backend Tflush sent for it
    flush_waiters: list[int] = dataclasses.field(default_factory=list)  # client Tflush tags
    target: _Request | None = None  # for a client Tflush: the request it flushes
    depth: int | None = None  # the depth its fid (new, walked or created) has if it succeeds
    unknown_remove: bool = False  # a Tremove the backend refused as unknown (fid kept there)


class _Client:
    """One connected client: its fids, its requests, its limits."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.name = name
        self.msize = 0  # 0: no Tversion yet
        self.fids: dict[int, _Fid] = {}
        self.requests: dict[int, _Request] = {}  # client tag -> request (Tflush tags included)
        self.queue: deque[_Request] = deque()
        self.inflight = 0
        self.closed = False
        self.room = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()

    def write(self, frame: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        try:
            self.writer.write(frame)
        except (OSError, RuntimeError):  # pragma: no cover - closing transport
            self.closed = True

    def hung_up(self) -> bool:
        """Whether the peer shut its side down (seen even with unread data pending)."""
        sock = self.writer.get_extra_info("socket")
        if sock is None:  # pragma: no cover - always a socket here
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _, ev in poller.poll(0))

    def close(self) -> None:
        self.closed = True
        try:
            self.writer.close()
        except (OSError, RuntimeError):  # pragma: no cover
            pass


class _Sender:
    """Submits backend messages from one thread, in order; replies come back on the loop."""

    def __init__(self, transport: Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._submit: Callable[..., Future[bytes]] | None = getattr(transport, "submit", None)
        self._pool: ThreadPoolExecutor | None = None
        if self._submit is None:
            self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="pyxen9p-mux-rq")
        self._queue: queue.SimpleQueue[
            tuple[bytes, Callable[[Future[bytes] | None, BaseException | None], None],
                  _Request | None] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pyxen9p-mux-sender", daemon=True)
        self._thread.start()

    def send(
        self,
        data: bytes,
        callback: Callable[[Future[bytes] | None, BaseException | None], None],
        req: _Request | None = None,
    ) -> None:
        self._queue.put((data, callback, req))

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _poster(
        self, callback: Callable[[Future[bytes] | None, BaseException | None], None]
    ) -> Callable[[Future[bytes]], None]:
        def post(future: Future[bytes]) -> None:
            self._post(callback, future, None)

        return post

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, callback, req = item
            try:
                if self._submit is not None:
                    future = self._submit(data, timeout=None)
                else:
                    assert self._pool is not None
                    future = self._pool.submit(self._transport.request, data, timeout=None)
            except BaseException as exc:
                self._post(callback, None, exc)
                continue
            if req is not None:
                req.future = future
            future.add_done_callback(self._poster(callback))

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(10.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class Multiplexer:
    """Serve 9P2000.L or 9P2000.u to many clients over one backend transport (asyncio).

    Create it on the event loop that will run it, then :meth:`start` it
    (negotiates the backend session) and add listeners.  See the module
    documentation for the rules it enforces.

    :param transport: the backend; the multiplexer sends its own Tversion and
        never closes it
    :param limits: per-client limits (default :class:`Limits()`)
    :param on_failure: called once (on the loop) with the backend's failure
    :param watch_interval: seconds between checks that the transport is
        still ``connected`` (a failure seen while idle)
    :param version: the dialect asked of the backend: ``"auto"`` (9P2000.L,
        else 9P2000.u, as the client negotiates), ``"9P2000.L"`` or
        ``"9P2000.u"``; clients are offered the one the backend speaks
    :ivar msize: the backend session's msize (after :meth:`start`)
    :ivar version: the backend session's dialect (after :meth:`start`)
    :ivar xen9pfsd: whether the backend is xen-9pfsd (its transport's
        ``backend_path`` is under ``backend/xen_9pfs/``)
    :ivar failure: why the backend failed, or ``None``
    """

    def __init__(
        self,
        transport: Transport,
        *,
        limits: Limits | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        watch_interval: float = 0.5,
        version: str = "auto",
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, not {version!r}")
        self.transport = transport
        self.limits = limits or Limits()
        self.msize = 0
        self._want_version = version
        self.version = ""
        self._dotu = False
        self._requests = _REQUEST_TYPES[c.VERSION_9P2000_L]
        self.xen9pfsd = "/xen_9pfs/" in str(getattr(transport, "backend_path", "") or "")
        #: Tstats of an attach fid (the share's root) answered by the multiplexer itself
        self.root_tstats_refused = 0
        self.failure: BaseException | None = None
        self._on_failure = on_failure
        self._watch_interval = watch_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: _Sender | None = None
        self._tags = IdPool(c.NOTAG, errno.EAGAIN, _OUT_OF_IDS)
        rings = getattr(transport, "num_rings", 1)
        self._rings = rings if isinstance(rings, int) and 1 <= rings <= 256 else 1
        self._fids = IdPool(c.NOFID, errno.EAGAIN, _OUT_OF_IDS)
        self._clients: dict[_Client, asyncio.Task[None]] = {}
        self._servers: list[tuple[asyncio.AbstractServer, str | None]] = []
        self._stopped = asyncio.Event()
        self._stopping = False
        self._watchdog: asyncio.Task[None] | None = None
        #: connections refused (peer credentials, client limit, stopped or failed)
        self.refused = 0

    # --- state -------------------------------------------------------------

    @property
    def clients(self) -> int:
        """Clients connected, or still being released on the backend."""
        return len(self._clients)

    def backend_fids(self) -> set[int]:
        """Backend fids in use (held by clients, or being created or clunked)."""
        return set(self._fids.used)

    def backend_tags(self) -> set[int]:
        """Backend tags in use (requests and flushes on the backend)."""
        return set(self._tags.used)

    # --- backend session ---------------------------------------------------

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start the sender and negotiate the backend session (Tversion).

        With ``version="auto"`` 9P2000.L is offered first and 9P2000.u when
        the backend refuses it (xen-9pfsd speaks only 9P2000.u).

        :raises ~pyxen9p.errors.ProtocolError: the backend speaks no dialect
            allowed, or offers an impossible msize
        :raises TimeoutError: no Rversion within *timeout*
        :raises ~pyxen9p.errors.TransportError: the transport failed
        """
        self._loop = asyncio.get_running_loop()
        self._sender = _Sender(self.transport, self._loop)
        want = int(self.transport.msize)
        offers = (
            [self._want_version]
            if self._want_version != "auto"
            else [c.VERSION_9P2000_L, c.VERSION_9P2000_U]
        )
        answers: list[str] = []
        try:
            for offer in offers:
                raw = await asyncio.wait_for(
                    self._call(c.Tversion(c.NOTAG, want, offer), tag=c.NOTAG), timeout
                )
                reply = c.decode(raw)
                if isinstance(reply, c.Rversion) and reply.version == offer:
                    break
                if not isinstance(reply, c.Rversion | c.Rerror | c.Rlerror):
                    raise ProtocolError(f"the backend answered Tversion with {reply!r}")
                answers.append(
                    repr(reply.version) if isinstance(reply, c.Rversion) else repr(reply)
                )
            else:
                if len(offers) == 1:
                    raise ProtocolError(
                        f"the backend does not speak {offers[0]} ({answers[0]})"
                    )
                raise ProtocolError(
                    f"the backend speaks neither 9P2000.L nor 9P2000.u"
                    f" (it answered {', '.join(answers)})"
                )
            if not MIN_MSIZE <= reply.msize <= want:
                raise ProtocolError(f"the backend's msize {reply.msize} is out of range")
        except BaseException:
            self._sender.stop()
            raise
        self.msize = reply.msize
        self.version = reply.version
        self._dotu = self.version == c.VERSION_9P2000_U
        self._requests = _REQUEST_TYPES[self.version]
        self._watchdog = asyncio.create_task(self._watch())
        log.info(
            "multiplexer: backend session %s, msize %d%s", self.version, self.msize,
            " (xen-9pfsd)" if self.xen9pfsd else "",
        )

    def _error(self, tag: int, code: int, text: str | None = None) -> bytes:
        """An error reply of the session's dialect: Rlerror, or 9P2000.u's Rerror."""
        if self._dotu:
            return c.encode(c.Rerror(tag, text or os.strerror(code), code))
        return c.encode(c.Rlerror(tag, code))

    def _call(self, msg: c.Message, *, tag: int | None = None) -> asyncio.Future[bytes]:
        """Send *msg* on the backend with a fresh tag; a future of its raw reply."""
        assert self._loop is not None and self._sender is not None
        result: asyncio.Future[bytes] = self._loop.create_future()
        btag = self._tags.alloc() if tag is None else tag

        def done(future: Future[bytes] | None, exc: BaseException | None) -> None:
            if tag is None:
                self._tags.free(btag)
            if exc is None and future is not None:
                try:
                    value = future.result()
                except BaseException as err:
                    exc = err
            if exc is not None:
                if isinstance(exc, TransportError):
                    self._fail(exc)
                if not result.done():
                    result.set_exception(exc)
            elif not result.done():
                result.set_result(value)

        self._sender.send(c.encode(dataclasses.replace(msg, tag=btag)), done)
        return result

    async def _watch(self) -> None:
        while self.failure is None and not self._stopping:
            await asyncio.sleep(self._watch_interval)
            if not getattr(self.transport, "connected", True) and self.failure is None:
                why = getattr(self.transport, "failure", None)
                if not isinstance(why, BaseException):
                    why = TransportClosedError(errno.ENOTCONN, "the backend transport is closed")
                self._fail(why)

    def _fail(self, exc: BaseException) -> None:
        """The backend failed: answer every request with an error, end every client."""
        if self.failure is not None:
            return
        self.failure = exc
        code = getattr(exc, "errno", None) or errno.EIO
        log.error("multiplexer: the backend failed: %s", exc)
        for server, path in self._servers:
            server.close()
            _unlink_socket(path)
        for client in list(self._clients):
            for ctag, req in list(client.requests.items()):
                if not req.done:
                    client.write(self._error(ctag, code, f"the backend failed: {exc}"))
                    req.done = True
            client.requests.clear()
            client.queue.clear()
            client.close()
            client.room.set()
            client.idle.set()  # a release waiting for the backend gives up
        self._stopped.set()
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:  # pragma: no cover - the owner's bug
                log.exception("multiplexer: on_failure raised")

    # --- listeners ---------------------------------------------------------

    async def listen_unix(
        self,
        path: str | os.PathLike[str],
        *,
        mode: int | None = None,
        group: str | int | None = None,
        allowed_uids: Collection[int] | None = None,
        allowed_gids: Collection[int] | None = None,
    ) -> str:
        """Listen on a Unix stream socket created at *path*.

        The socket file gets *mode* (default ``0600``, or ``0660`` with a
        *group*) and *group* before it listens.  A stale socket at *path*
        (nobody listening) is replaced; a live one or any other file is an
        error.  Each connection's ``SO_PEERCRED`` must show a uid in
        *allowed_uids* (default: this process's effective uid) or a
        group (primary or supplementary) in *allowed_gids* (default: *group*'s
        gid if given); other peers are refused and logged.

        :param group: a group name or gid for the socket file
        :returns: the path
        :raises FileExistsError: a server already listens at *path*, or
            *path* is not a socket
        """
        self._check_open()
        spath = os.fspath(path)
        gid = None if group is None else _group_id(group)
        if mode is None:
            mode = 0o600 if gid is None else 0o660
        uids = frozenset({os.geteuid()} if allowed_uids is None else allowed_uids)
        gids = frozenset(
            (set() if gid is None else {gid}) if allowed_gids is None else allowed_gids
        )
        _remove_stale_socket(spath)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(spath)
            # permissions before listen(): until then every connect() is refused
            os.chmod(spath, mode)
            if gid is not None:
                os.chown(spath, -1, gid)
            sock.listen(128)
            sock.setblocking(False)

            def check(conn: socket.socket) -> str | None:
                try:
                    cred = peer_credentials(conn)
                except OSError as exc:
                    return f"no peer credentials ({exc})"
                if cred.uid in uids or (gids and _in_groups(cred, gids)):
                    return None
                return f"uid {cred.uid} gid {cred.gid} pid {cred.pid} is not allowed"

            server = await asyncio.start_unix_server(
                lambda r, w: self._accept(r, w, check), sock=sock, limit=self._buffer_limit()
            )
        except BaseException:
            sock.close()
            _unlink_socket(spath)
            raise
        self._servers.append((server, spath))
        log.info("multiplexer: listening on unix:%s (mode %o)", spath, mode)
        return spath

    async def listen_tcp(
        self, host: str = "127.0.0.1", port: int = 0, *, allow_remote: bool = False
    ) -> tuple[str, int]:
        """Listen on TCP at *host*:*port* (port 0: any free port).

        :param allow_remote: allow a non-loopback *host*.  TCP has no peer
            credentials: whoever reaches the port gets the share
        :returns: the address actually bound
        :raises PermissionError: *host* is not a loopback address and
            *allow_remote* is false
        """
        self._check_open()
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not allow_remote:
            for info in infos:
                addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
                if not addr.is_loopback:
                    raise PermissionError(
                        errno.EACCES,
                        f"{host} is not a loopback address (allow_remote=True exposes the"
                        f" share to the network)",
                    )
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(128)
            sock.setblocking(False)
            server = await asyncio.start_server(
                lambda r, w: self._accept(r, w, lambda _conn: None),
                sock=sock,
                limit=self._buffer_limit(),
            )
        except BaseException:
            sock.close()
            raise
        self._servers.append((server, None))
        bound = sock.getsockname()
        log.info("multiplexer: listening on tcp:%s:%d", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    def _buffer_limit(self) -> int:
        """Bytes read ahead from a client: a whole message of the largest msize."""
        return max(self.msize, 64 * 1024)

    def _check_open(self) -> None:
        if self._sender is None:
            raise RuntimeError("start() the multiplexer first")
        if self.failure is not None:
            raise TransportClosedError(errno.ENOTCONN, f"the backend failed: {self.failure}")
        if self._stopping:
            raise RuntimeError("the multiplexer is stopped")

    def _accept(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        check: Callable[[socket.socket], str | None],
    ) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        name = f"client {peer!r}" if peer else f"client fd {sock.fileno() if sock else '?'}"
        why = None
        if self.failure is not None or self._stopping:
            why = "the multiplexer is stopping"
        elif len(self._clients) >= self.limits.max_clients:
            why = f"{self.limits.max_clients} clients already"
        elif sock is not None:
            why = check(sock)
        if why is not None:
            self.refused += 1
            log.warning("multiplexer: refused a connection: %s", why)
            writer.close()
            return
        if sock is not None and sock.family == socket.AF_UNIX:
            with _suppress_oserror():
                cred = peer_credentials(sock)
                name = f"client pid {cred.pid} uid {cred.uid}"
        client = _Client(reader, writer, name)
        self._clients[client] = asyncio.create_task(self._serve(client))
        log.debug("multiplexer: %s connected", name)

    # --- serving one client -----------------------------------------------

    async def _serve(self, client: _Client) -> None:
        try:
            while not client.closed:
                frame = await self._read_frame(client)
                if frame is None:
                    break
                await self._handle(client, frame)
                await client.writer.drain()
        except _Violation as exc:
            log.warning("multiplexer: %s broke the protocol, disconnecting it: %s",
                        client.name, exc)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            log.debug("multiplexer: %s: %s", client.name, exc)
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - a bug: end this client, keep the others
            log.exception("multiplexer: error serving %s", client.name)
        finally:
            await self._release(client)

    async def _read_frame(self, client: _Client) -> bytes | None:
        try:
            hdr = await client.reader.readexactly(c.HEADER_SIZE)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise _Violation("the stream ended inside a header") from None
            return None
        size, mtype, tag = _HEADER.unpack(hdr)
        limit = client.msize or self.msize
        if size < c.HEADER_SIZE or size > limit:
            raise _Violation(f"frame size {size} (type {mtype}, tag {tag}) outside 7..{limit}")
        try:
            body = await client.reader.readexactly(size - c.HEADER_SIZE)
        except asyncio.IncompleteReadError:
            raise _Violation("the stream ended inside a message") from None
        return hdr + body

    async def _handle(self, client: _Client, frame: bytes) -> None:
        _, mtype, tag = _HEADER.unpack_from(frame)
        if mtype == c.MessageType.TVERSION:
            self._version(client, frame)
            return
        if client.msize == 0:
            raise _Violation(f"message type {mtype} before Tversion")
        if tag == c.NOTAG:
            raise _Violation(f"NOTAG on message type {mtype}")
        if tag in client.requests:
            raise _Violation(f"tag {tag} is already in use")
        if mtype % 2 == 1:
            raise _Violation(f"a reply (type {mtype}) from a client")
        if mtype not in self._requests:
            client.write(self._error(tag, errno.EOPNOTSUPP))
            return
        try:
            msg = c.decode(frame, self.version)
        except ProtocolError as exc:
            raise _Violation(f"malformed message: {exc}") from None
        if isinstance(msg, c.Tflush):
            self._flush(client, msg)
            return
        req = _Request(client, tag, msg)
        err = self._bind(client, req)
        if err:
            text = ROOT_TSTAT_REFUSED if err == _ROOT_TSTAT else None
            client.write(self._error(tag, errno.EOPNOTSUPP if text else err, text))
            return
        client.requests[tag] = req
        if client.inflight < self.limits.max_requests:
            self._send(req)
            return
        client.queue.append(req)
        while len(client.queue) >= self.limits.max_queued and not client.closed:
            # not reading this client: watch for its hang-up meanwhile
            client.room.clear()
            try:
                await asyncio.wait_for(client.room.wait(), _HANGUP_POLL)
            except asyncio.TimeoutError:
                if client.hung_up():
                    raise ConnectionResetError(errno.ECONNRESET, "hung up") from None

    def _version(self, client: _Client, frame: bytes) -> None:
        if client.fids or client.requests:
            raise _Violation("Tversion in the middle of a session")
        try:
            msg = c.decode(frame)
        except ProtocolError as exc:
            raise _Violation(f"malformed Tversion: {exc}") from None
        assert isinstance(msg, c.Tversion)
        msize = min(msg.msize, self.msize)
        if msg.version != self.version or msize < MIN_MSIZE:
            client.msize = 0
            client.write(c.encode(c.Rversion(msg.tag, msize, c.VERSION_UNKNOWN)))
            return
        client.msize = msize
        client.write(c.encode(c.Rversion(msg.tag, msize, self.version)))

    def _bind(self, client: _Client, req: _Request) -> int:
        """Map the request's fids onto backend fids; an errno to answer instead, or 0."""
        m = req.msg
        cls = type(m)
        create = _CREATES.get(cls)
        newfid: int | None = getattr(m, create) if create else None
        if isinstance(m, (c.Twalk, c.Txattrwalk)) and m.newfid == m.fid:
            newfid = None
        changes: dict[str, int] = {}
        for name in _FID_FIELDS[cls]:
            if name == create and newfid is not None:
                continue
            cfid = getattr(m, name)
            if name == "afid" and cfid == c.NOFID:
                continue
            fid = client.fids.get(cfid)
            if fid is None or fid.state != _OPEN:
                return errno.EBADF
            changes[name] = fid.bfid
        if self.xen9pfsd and isinstance(m, c.Tstat):
            fid = client.fids[m.fid]
            if fid.depth == 0 or fid.moving:
                # the share's root (or a fid that may be there): never asked of xen-9pfsd
                self.root_tstats_refused += 1
                return _ROOT_TSTAT
        depth: int | None = None
        if isinstance(m, c.Twalk):
            depth = _walk_depth(client.fids[m.fid].depth, m.wnames)
        elif isinstance(m, c.Tcreate):
            depth = client.fids[m.fid].depth + 1
        if newfid is not None:
            assert create is not None
            if newfid == c.NOFID or newfid in client.fids:
                return errno.EBADF
            if len(client.fids) >= self.limits.max_fids:
                return errno.EMFILE
            bfid = self._fids.alloc()
            client.fids[newfid] = _Fid(bfid, _PENDING, depth or 0)
            req.newfid = newfid
            changes[create] = bfid
        elif depth is not None:  # a walk in place, or a Tcreate: the fid moves if it succeeds
            client.fids[m.fid].moving += 1  # type: ignore[attr-defined]
            req.depth = depth
        if isinstance(m, (c.Tclunk, c.Tremove)):
            client.fids[m.fid].state = _CLOSING
            req.closes = m.fid
        if isinstance(m, (c.Tread, c.Treaddir)):
            changes["count"] = min(m.count, client.msize - _RDATA_HDR)
        req.out = dataclasses.replace(m, **changes)
        return 0

    def _unbind(self, req: _Request, *, happened: bool, ok: bool) -> None:
        """Settle the request's fid effects: it *happened* (with *ok*) or was cancelled."""
        client = req.client
        if req.depth is not None:
            moved = client.fids.get(req.msg.fid)  # type: ignore[attr-defined]
            if moved is not None:
                moved.moving -= 1
                if happened and ok:
                    moved.depth = req.depth
            req.depth = None
        if req.newfid is not None:
            fid = client.fids.get(req.newfid)
            if fid is not None:
                if happened and ok:
                    fid.state = _OPEN
                else:
                    del client.fids[req.newfid]
                    self._fids.free(fid.bfid)
        if req.closes is not None:
            fid = client.fids.get(req.closes)
            if fid is not None:
                if happened:  # a Tclunk or Tremove frees the fid whatever the outcome
                    del client.fids[req.closes]
                    if req.unknown_remove:
                        self._clunk_backend(fid.bfid)
                    else:
                        self._fids.free(fid.bfid)
                else:
                    fid.state = _OPEN

    def _send(self, req: _Request) -> None:
        assert self._sender is not None and req.out is not None
        req.btag = self._tags.alloc()
        req.sent = True
        req.client.inflight += 1
        req.client.idle.clear()
        data = c.encode(dataclasses.replace(req.out, tag=req.btag))
        self._sender.send(data, lambda f, e: self._on_reply(req, f, e), req)

    def _on_reply(
        self, req: _Request, future: Future[bytes] | None, exc: BaseException | None
    ) -> None:
        if req.done:
            return
        if exc is None and future is not None:
            try:
                frame = future.result()
            except BaseException as err:
                exc = err
        if exc is not None:
            if isinstance(exc, InterruptedError):
                return  # flushed: settled by the Tflush's reply
            if isinstance(exc, TransportError):
                self._fail(exc)
                return
            # a wrong reply type (ProtocolError) or a refused message: this request only
            log.warning("multiplexer: backend error for %s: %s", type(req.msg).__name__, exc)
            code = getattr(exc, "errno", None) or errno.EIO
            frame = self._error(0, code, f"the backend failed this request: {exc}")
        self._complete(req, frame)

    def _complete(self, req: _Request, frame: bytes) -> None:
        """The backend answered *req* with *frame*: settle it and pass it on."""
        if req.done:
            return
        req.done = True
        client = req.client
        assert req.btag is not None
        self._tags.free(req.btag)
        _, mtype, _ = _HEADER.unpack_from(frame)
        ok = mtype == req.msg.TYPE + 1
        if ok and isinstance(req.msg, c.Twalk) and req.msg.wnames:
            ok = len(frame) >= 9 and _TAG.unpack_from(frame, 7)[0] == len(req.msg.wnames)
        if self._dotu and isinstance(req.msg, c.Tremove) and not ok:
            req.unknown_remove = _unsupported(frame)
        self._unbind(req, happened=True, ok=ok)
        if client.requests.get(req.ctag) is req:
            del client.requests[req.ctag]
        if self._dotu and req.newfid is not None and mtype == c.MessageType.RERROR:
            frame = self._fid_limit_error(frame)
        if len(frame) > _COPY_LIMIT:  # a large reply: not copied, its header sent apart
            client.write(frame[:5] + _TAG.pack(req.ctag))
            client.write(memoryview(frame)[c.HEADER_SIZE :])
        else:
            reply = bytearray(frame)
            _TAG.pack_into(reply, 5, req.ctag)
            client.write(reply)
        if self._dotu:
            # no backend Tflush over 9P2000.u: a client's Tflush is answered
            # after the reply to the request it names (which then counts)
            for ftag in req.flush_waiters:
                if ftag in client.requests:
                    del client.requests[ftag]
                client.write(c.encode(c.Rflush(ftag)))
            req.flush_waiters.clear()
        self._finished(client)

    def _clunk_backend(self, bfid: int) -> None:
        """Clunk *bfid* on the backend, then free it (a Tremove the backend did
        not know left it there, as xen-9pfsd does: 9P says the fid is gone)."""

        def done(future: asyncio.Future[bytes]) -> None:
            if self.failure is None:
                self._fids.free(bfid)

        self._call(c.Tclunk(0, bfid)).add_done_callback(done)

    def _fid_limit_error(self, frame: bytes) -> bytes:
        """A backend's ``EMFILE``/``ENFILE`` to a request creating a fid, said clearly."""
        try:
            reply = c.decode(frame, c.VERSION_9P2000_U)
        except ProtocolError:
            return frame
        if not isinstance(reply, c.Rerror) or reply.errno not in (errno.EMFILE, errno.ENFILE):
            return frame
        log.warning("multiplexer: %s", FID_LIMIT_REACHED)
        return c.encode(c.Rerror(reply.tag, FID_LIMIT_REACHED, reply.errno))

    def _finished(self, client: _Client) -> None:
        """One of *client*'s backend requests ended: send a queued one, wake the reader."""
        client.inflight -= 1
        while client.queue and client.inflight < self.limits.max_requests and not client.closed:
            self._send(client.queue.popleft())
        client.room.set()
        if client.inflight == 0:
            client.idle.set()

    # --- flush -------------------------------------------------------------

    def _flush(self, client: _Client, msg: c.Tflush) -> None:
        old = client.requests.get(msg.oldtag)
        if old is not None and old.target is not None:
            # a flush of a Tflush: answered right after that Tflush is
            old = old.target
        if old is None or old.done:
            client.write(c.encode(c.Rflush(msg.tag)))
            return
        if not old.sent:  # still queued here: it never reaches the backend
            client.queue.remove(old)
            del client.requests[msg.oldtag]
            old.done = True
            self._unbind(old, happened=False, ok=False)
            client.room.set()
            client.write(c.encode(c.Rflush(msg.tag)))
            return
        client.requests[msg.tag] = _Request(client, msg.tag, msg, sent=True, target=old)
        old.flush_waiters.append(msg.tag)
        self._flush_backend(old)

    def _flush_backend(self, old: _Request) -> None:
        """Send the backend Tflush for *old* (once; never over 9P2000.u, see :meth:`_complete`)."""
        if old.flush_btag is not None or old.done or self._dotu:
            return
        assert self._sender is not None and old.btag is not None
        # on the Xen transport the tag chooses the ring (tag % num_rings): the
        # Tflush goes on its request's ring, so that a reply to the request
        # cannot arrive after the Rflush
        old.flush_btag = self._tags.alloc(old.btag, self._rings)
        data = c.encode(c.Tflush(old.flush_btag, old.btag))
        self._sender.send(data, lambda f, e: self._on_flushed(old, f, e))

    def _on_flushed(
        self, old: _Request, future: Future[bytes] | None, exc: BaseException | None
    ) -> None:
        if exc is None and future is not None:
            exc = future.exception()
        if isinstance(exc, TransportError):
            self._fail(exc)
            return
        # any other answer (Rflush, or even an error) ends the flush
        assert old.flush_btag is not None and old.btag is not None
        self._tags.free(old.flush_btag)
        client = old.client
        if not old.done:
            f = old.future
            if f is not None and f.done() and not f.cancelled() and f.exception() is None:
                self._complete(old, f.result())  # its reply came first: it counts
            else:  # cancelled: it never happened
                old.done = True
                self.transport.flushed(old.btag)
                self._tags.free(old.btag)
                self._unbind(old, happened=False, ok=False)
                if client.requests.get(old.ctag) is old:
                    del client.requests[old.ctag]
                self._finished(client)
        for ftag in old.flush_waiters:
            if ftag in client.requests:
                del client.requests[ftag]
            client.write(c.encode(c.Rflush(ftag)))
        old.flush_waiters.clear()

    # --- releasing a client ------------------------------------------------

    async def _release(self, client: _Client) -> None:
        """The client is gone: flush its requests, then clunk its fids on the backend."""
        client.close()
        client.room.set()
        try:
            if self.failure is not None:
                return
            for req in client.queue:
                req.done = True
                self._unbind(req, happened=False, ok=False)
            client.queue.clear()
            for req in list(client.requests.values()):
                if req.sent and not req.done and req.target is None:
                    self._flush_backend(req)
            await client.idle.wait()
            if self.failure is not None:
                return
            fids = [f for f in client.fids.values() if f.state == _OPEN]
            client.fids.clear()
            window = self.limits.max_requests
            for start in range(0, len(fids), window):
                batch = fids[start : start + window]
                results = await asyncio.gather(
                    *(self._call(c.Tclunk(0, f.bfid)) for f in batch), return_exceptions=True
                )
                for f, result in zip(batch, results, strict=True):
                    if isinstance(result, TransportError):
                        return
                    self._fids.free(f.bfid)
            log.debug("multiplexer: %s released (%d fids clunked)", client.name, len(fids))
        except asyncio.CancelledError:
            pass
        finally:
            self._clients.pop(client, None)

    # --- stopping ----------------------------------------------------------

    async def stop(self) -> None:
        """Close the listeners and every client, release their fids on the backend.

        Waits at most :attr:`Limits.stop_timeout` for the backend's answers;
        the transport is left open.  Idempotent.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        for server, path in self._servers:
            server.close()
            _unlink_socket(path)
        self._servers.clear()
        tasks = list(self._clients.values())
        for client in list(self._clients):
            client.close()
            client.room.set()
            # wake the reader (it may be waiting for a frame)
            client.reader.feed_eof()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.limits.stop_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("multiplexer: %d clients not released in time", len(pending))
                await asyncio.wait(pending, timeout=1.0)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._sender is not None:
            sender = self._sender
            await asyncio.get_running_loop().run_in_executor(None, sender.stop)
        self._stopped.set()

    async def wait_stopped(self) -> BaseException | None:
        """Wait until :meth:`stop` is done or the backend failed; return the failure."""
        await self._stopped.wait()
        return self.failure


class MultiplexerThread:
    """A :class:`Multiplexer` running in an event loop of its own thread.

    For synchronous owners (the CLI, tests)::

        with MultiplexerThread(transport) as mux:
            path = mux.listen_unix("/tmp/share.sock")
            ...

    Construction starts the loop and negotiates the backend session
    (:meth:`Multiplexer.start`); leaving the ``with`` block (or
    :meth:`stop`) stops the multiplexer and the loop.  The transport stays
    open.

    :param transport: the backend
    :param options: passed to :class:`Multiplexer` (``limits``, ``on_failure``...)
    :ivar mux: the multiplexer (touch it only through this class's methods)
    """

    def __init__(self, transport: Transport, *, timeout: float = 30.0, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pyxen9p-mux", daemon=True
        )
        self._thread.start()
        self._closed = False

        async def make() -> Multiplexer:
            mux = Multiplexer(transport, **options)
            await mux.start(timeout=timeout)
            return mux

        try:
            self.mux: Multiplexer = self._run(make())
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def msize(self) -> int:
        """The backend session's msize."""
        return self.mux.msize

    @property
    def version(self) -> str:
        """The backend session's dialect (``"9P2000.L"`` or ``"9P2000.u"``)."""
        return self.mux.version

    @property
    def root_tstats_refused(self) -> int:
        """Tstats of the share's root answered by the multiplexer (xen-9pfsd)."""
        return self.mux.root_tstats_refused

    @property
    def failure(self) -> BaseException | None:
        """Why the backend failed, or ``None``."""
        return self.mux.failure

    @property
    def clients(self) -> int:
        """Clients connected or being released."""
        return self.mux.clients

    def backend_fids(self) -> set[int]:
        """:meth:`Multiplexer.backend_fids`."""
        return self._call_soon(self.mux.backend_fids)

    def backend_tags(self) -> set[int]:
        """:meth:`Multiplexer.backend_tags`."""
        return self._call_soon(self.mux.backend_tags)

    def _call_soon(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return self._run(call(), 10.0)

    def listen_unix(self, path: str | os.PathLike[str], **options: Any) -> str:
        """:meth:`Multiplexer.listen_unix`."""
        return str(self._run(self.mux.listen_unix(path, **options)))

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> tuple[str, int]:
        """:meth:`Multiplexer.listen_tcp`."""
        bound: tuple[str, int] = self._run(self.mux.listen_tcp(host, port, **options))
        return bound

    def wait(self, timeout: float | None = None) -> BaseException | None:
        """Wait until the multiplexer stops or its backend fails; return the failure.

        :raises TimeoutError: still running after *timeout* seconds
        """
        failure: BaseException | None = self._run(self.mux.wait_stopped(), timeout)
        return failure

    def stop(self) -> None:
        """Stop the multiplexer (see :meth:`Multiplexer.stop`) and its loop (idempotent)."""
        if self._closed:
            return
        try:
            self._run(self.mux.stop(), self.mux.limits.stop_timeout + 15.0)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- helpers ---------------------------------------------------------------


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, OSError)


def _group_id(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LookupError(f"no group named {group!r}") from None


def _in_groups(cred: PeerCredentials, gids: Iterable[int]) -> bool:
    wanted = set(gids)
    if cred.gid in wanted:
        return True
    try:
        name = pwd.getpwuid(cred.uid).pw_name
        return bool(wanted.intersection(os.getgrouplist(name, cred.gid)))
    except (KeyError, OSError):
        return False


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        _unlink_socket(path)  # stale: nobody listens
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"a server already listens at {path}")


def _unlink_socket(path: str | None) -> None:
    if path is None:
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
