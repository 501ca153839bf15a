"""A scripted hostile 9P server: a real :class:`FileServer` whose answers a test may replace.

Every client feature that reads what a server sends is run against this.
A *script* sees each decoded request and decides the answer::

    def script(request: c.Message, honest: Callable[[], c.Message]) -> Answer:
        if isinstance(request, c.Treaddir):
            reply = honest()                    # what the real server answers
            return c.Rreaddir(request.tag, evil_entries(reply))
        return None                             # let the real server answer

The answer is a message (sent as is, so its tag is the script's choice),
raw ``bytes`` (sent verbatim: frames of any size or shape), :data:`SILENCE`
(never answered) or ``None`` (the real server's answer).  A script may also
raise an :class:`OSError` (the in-process transport passes it to the client,
as a transport would report a timeout).

Three ways to reach it, one script for all:

* :meth:`HostileServer.transport`: in-process, the client's requests go
  straight into the script (no thread, no socket; records what was sent);
* :meth:`HostileServer.client_over_socket`: a real
  :class:`~pyxen9p.p9.transport.StreamTransport` on a socket pair, served by
  a thread, so framing lies (sizes, garbage) reach the real read loop;
* :meth:`HostileServer.listen_unix`: a listening Unix socket, each
  connection served by a thread, for a client in another process (the FUSE
  mount's tests);
* :meth:`HostileServer.handle`: ``request bytes -> reply bytes``, the
  handler interface of :class:`~pyxen9p.sim.backend.Sim9pfsBackend`, so the
  same script can sit behind the simulated Xen transport.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client
from pyxen9p.p9.server import FileServer
from pyxen9p.p9.transport import StreamTransport

__all__ = ["SILENCE", "HostileServer", "Script", "ScriptedTransport", "on"]


class _Silence:
    def __repr__(self) -> str:
        return "SILENCE"


#: An answer that is never sent.
SILENCE: Any = _Silence()

Answer = c.Message | bytes | None
Script = Callable[[c.Message, Callable[[], c.Message]], Answer]


def on(kind: type[c.Message], answer: Callable[[Any, Callable[[], c.Message]], Answer]) -> Script:
    """A script that answers requests of type *kind* with *answer* and others honestly."""

    def script(request: c.Message, honest: Callable[[], c.Message]) -> Answer:
        return answer(request, honest) if isinstance(request, kind) else None

    return script


class HostileServer:
    """A :class:`FileServer` exporting *root*, with its answers chosen by *script*.

    :ivar sent: every request received, decoded, in order
    :ivar errors: exceptions a script raised in a socket's serving thread
        (the socket is then hung up, so the client sees the end at once)
    :ivar server: the real server behind the script
    """

    def __init__(self, root: str | Path, script: Script | None = None, **server_options: Any):
        self.server = FileServer(root, **server_options)
        self.session = self.server.session()
        self.script = script
        self.sent: list[c.Message] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.errors: list[BaseException] = []

    # --- the answer to one request -----------------------------------------

    def answer(self, request: bytes) -> bytes | None:
        """The bytes to send for *request*, or ``None`` for :data:`SILENCE`."""
        decoded = c.decode(request)
        with self._lock:
            self.sent.append(decoded)
        script = self.script
        if script is None:
            return self.session.handle(request)
        honest_reply: list[bytes] = []

        def honest() -> c.Message:
            if not honest_reply:
                honest_reply.append(self.session.handle(request))
            return c.decode(honest_reply[0])

        reply = script(decoded, honest)
        if reply is SILENCE:
            return None
        if reply is None:
            return honest_reply[0] if honest_reply else self.session.handle(request)
        if isinstance(reply, (bytes, bytearray)):
            return bytes(reply)
        return c.encode(reply)

    def handle(self, request: bytes) -> bytes:
        """``request -> reply`` for :class:`~pyxen9p.sim.backend.Sim9pfsBackend` (no silence)."""
        reply = self.answer(request)
        if reply is None:
            raise RuntimeError("SILENCE cannot be served through a backend handler")
        return reply

    # --- the ways to reach it ------------------------------------------------

    def transport(self, msize: int = 256 * 1024, *, owner: bool = False) -> ScriptedTransport:
        """An in-process transport to this server (a new one each call).

        :param owner: closing the transport closes this server
        """
        return ScriptedTransport(self, msize, owner=owner)

    def client(self, **options: Any) -> Client:
        """A :class:`Client` over :meth:`transport`."""
        options.setdefault("aname", self.server.root)
        options.setdefault("timeout", 10)
        return Client(self.transport(), **options)

    def client_over_socket(self, **options: Any) -> Client:
        """A :class:`Client` over a real stream transport on a socket pair."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sockets.append(theirs)
        thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        self._threads.append(thread)
        thread.start()
        options.setdefault("aname", self.server.root)
        options.setdefault("timeout", 10)
        return Client(StreamTransport.from_socket(ours), **options)

    def listen_unix(self, path: str | Path) -> None:
        """Serve each connection to the Unix socket *path* in a thread (until :meth:`close`).

        All connections share the one server session (its fids): enough for
        one client at a time, as a test's mount process is.
        """
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        self._sockets.append(listener)

        def accept() -> None:
            while True:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    return
                self._sockets.append(sock)
                thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
                self._threads.append(thread)
                thread.start()

        thread = threading.Thread(target=accept, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._serve_frames(sock)
        except OSError:
            pass
        except Exception as exc:
            self.errors.append(exc)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _serve_frames(self, sock: socket.socket) -> None:
        while True:
            head = _recv_exact(sock, 4)
            if head is None:
                return
            (size,) = struct.unpack("<I", head)
            body = _recv_exact(sock, size - 4) if size > 4 else b""
            if body is None:
                return
            reply = self.answer(head + body)
            if reply is not None:
                sock.sendall(reply)

    def close(self) -> None:
        """Hang up on every socket client, stop the threads, close the server."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        for sock in self._sockets:
            sock.close()
        self.session.close()
        self.server.close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class ScriptedTransport:
    """An in-process transport to a :class:`HostileServer` (the client's ``Transport``).

    A script's :class:`OSError` reaches the client as the transport's error;
    :data:`SILENCE` becomes a :class:`TimeoutError`, as a transport whose
    request timed out reports it.

    :ivar sent: every request, decoded (also in the server's ``sent``)
    :ivar flushed_tags: tags the client declared free with :meth:`flushed`
    :ivar delay: seconds to sleep before each answer
    :ivar max_in_flight: the most requests seen in flight at once
    """

    def __init__(
        self, server: HostileServer, msize: int = 256 * 1024, *, owner: bool = False
    ) -> None:
        self.server = server
        self._owner = owner
        self.msize = msize
        self.sent: list[c.Message] = []
        self.flushed_tags: list[int] = []
        self.closed = False
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    @property
    def intercept(self) -> Script | None:
        """The server's script (settable)."""
        return self.server.script

    @intercept.setter
    def intercept(self, script: Script | None) -> None:
        self.server.script = script

    def request(self, message: bytes, *, timeout: float | None = None) -> bytes:
        with self._lock:
            self.sent.append(c.decode(message))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            reply = self.server.answer(message)
            if reply is None:
                raise TimeoutError("the hostile server did not answer")
            return reply
        finally:
            with self._lock:
                self.in_flight -= 1

    def flushed(self, tag: int) -> None:
        self.flushed_tags.append(tag)

    def close(self) -> None:
        self.closed = True
        if self._owner:
            self.server.close()


@contextlib.contextmanager
def hostile(root: str | Path, script: Script | None = None, **options: Any) -> Iterator[Client]:
    """A :class:`Client` (in-process transport) on a :class:`HostileServer`, closed after."""
    with HostileServer(root, script) as server, server.client(**options) as client:
        yield client
