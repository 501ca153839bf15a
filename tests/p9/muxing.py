"""Helpers of the multiplexer tests: backends, a running multiplexer, raw clients.

* :func:`file_server` serves a directory with pyxen9p's FileServer over a
  socketpair and gives the backend transport (and the server, whose sessions'
  fids a test can count with :func:`server_fids`);
* :func:`running_mux` runs a :class:`~pyxen9p.p9.mux.MultiplexerThread` on a
  transport, listening on a Unix socket;
* :class:`RawClient` speaks 9P bytes over the multiplexer's socket, for the
  hostile tests.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client
from pyxen9p.p9.mux import MultiplexerThread
from pyxen9p.p9.server import FileServer
from pyxen9p.p9.transport import StreamTransport


@contextlib.contextmanager
def file_server(root: Path, **options: Any) -> Iterator[tuple[FileServer, StreamTransport]]:
    """pyxen9p's FileServer exporting *root*, served in a thread over a socketpair."""
    server = FileServer(root, **options)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(target=server.serve_socket, args=(theirs,), daemon=True)
    thread.start()
    transport = StreamTransport.from_socket(ours)
    try:
        yield server, transport
    finally:
        transport.close()
        server.close()
        thread.join(10)
        theirs.close()
        assert not thread.is_alive()


def server_fids(server: FileServer) -> int:
    """Fids held in every session of *server* (the multiplexer has one)."""
    with server._lock:
        sessions = list(server._sessions)
    return sum(len(s._fids) for s in sessions)


@contextlib.contextmanager
def running_mux(
    transport: Any, sock_path: Path, **options: Any
) -> Iterator[tuple[MultiplexerThread, str]]:
    """A multiplexer on *transport* listening at *sock_path*."""
    with MultiplexerThread(transport, **options) as mux:
        yield mux, mux.listen_unix(sock_path)


def mux_client(path: str, root: Path, **options: Any) -> Client:
    """A pyxen9p Client through the multiplexer at *path*."""
    options.setdefault("timeout", 20)
    return Client(StreamTransport.unix(path), aname=str(root), **options)


class RawClient:
    """Raw 9P frames over a Unix socket (for scripted hostile clients)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def send(self, data: bytes | c.Message) -> None:
        """Send *data* (a message is encoded)."""
        self.sock.sendall(data if isinstance(data, bytes) else c.encode(data))

    def recv(self) -> c.Message | None:
        """The next message, or ``None`` at the end of the stream."""
        head = self._exact(4)
        if head is None:
            return None
        (size,) = struct.unpack("<I", head)
        body = self._exact(size - 4)
        assert body is not None, "stream ended inside a reply"
        return self.decode_frame(head + body)

    def decode_frame(self, frame: bytes) -> c.Message:
        """Decode one whole frame (9P2000.L; a subclass may speak another dialect)."""
        return c.decode(frame)

    def rpc(self, msg: c.Message) -> c.Message | None:
        """Send *msg*, return the next message."""
        self.send(msg)
        return self.recv()

    def version(self, msize: int = 65536) -> c.Message | None:
        """Negotiate 9P2000.L."""
        return self.rpc(c.Tversion(c.NOTAG, msize, c.VERSION_9P2000_L))

    def closed_by_peer(self) -> bool:
        """Whether the multiplexer hung up (end of stream or reset)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def _exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def close(self) -> None:
        """Hang up."""
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(condition: Any, timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll *condition* until it is true (fail after *timeout* seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class GatedBackend:
    """A FileServer session over a socketpair whose server can hold requests back.

    Requests for which ``hold(message)`` is true are kept (by backend tag in
    :attr:`held`) until :meth:`release` or a Tflush.  On a Tflush for a held
    request, *flush_mode* ``"cancel"`` drops it (Rflush alone: it never
    happened) and ``"answer"`` answers it first, then sends the Rflush.
    Every request received is recorded in :attr:`received`.

    :ivar transport: the backend transport for the multiplexer
    :ivar server: the FileServer; :attr:`session` its session (after Tversion)
    """

    def __init__(
        self, root: Path, hold: Any = None, flush_mode: str = "cancel"
    ) -> None:
        self.server = FileServer(root)
        self.session: Any = None
        self.hold = hold or (lambda m: False)
        self.flush_mode = flush_mode
        self.held: dict[int, bytes] = {}
        #: hold every Tflush too (until :meth:`release_flushes`)
        self.hold_flushes = False
        self.held_flushes: list[c.Tflush] = []
        self.received: list[c.Message] = []
        self._lock = threading.Lock()
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self.transport = StreamTransport.from_socket(self._ours)

    def fids(self) -> int:
        """Fids the backend session holds."""
        return 0 if self.session is None else len(self.session._fids)

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._theirs.sendall(data)

    def _serve(self) -> None:
        sock = self._theirs
        try:
            while True:
                head = _recv_exact(sock, 7)
                if head is None:
                    return
                size = struct.unpack_from("<I", head)[0]
                body = _recv_exact(sock, size - 7)
                if body is None:
                    return
                frame = head + body
                msg = c.decode(frame)
                self.received.append(msg)
                if isinstance(msg, c.Tversion):
                    self.session = self.server.session()
                    self._send(self.session.handle(frame))
                elif isinstance(msg, c.Tflush) and self.hold_flushes:
                    with self._lock:
                        self.held_flushes.append(msg)
                elif isinstance(msg, c.Tflush):
                    with self._lock:
                        old = self.held.pop(msg.oldtag, None)
                    if old is not None and self.flush_mode == "answer":
                        self._send(self.session.handle(old))
                    self._send(c.encode(c.Rflush(msg.tag)))
                elif self.hold(msg):
                    with self._lock:
                        self.held[msg.tag] = frame
                else:
                    self._send(self.session.handle(frame))
        except OSError:
            return

    def release(self, *, reverse: bool = False) -> None:
        """Answer every held request (in arrival order, or the *reverse*)."""
        with self._lock:
            frames = list(self.held.values())[:: -1 if reverse else 1]
            self.held.clear()
        for frame in frames:
            self._send(self.session.handle(frame))

    def release_flushes(self) -> None:
        """Answer the held Tflushes (cancelling the requests they flush)."""
        with self._lock:
            flushes = list(self.held_flushes)
            self.held_flushes.clear()
            for m in flushes:
                self.held.pop(m.oldtag, None)
        for m in flushes:
            self._send(c.encode(c.Rflush(m.tag)))

    def hang_up(self) -> None:
        """The backend dies: its end of the socket is shut down."""
        with contextlib.suppress(OSError):
            self._theirs.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop serving and release everything."""
        self.transport.close()
        self.hang_up()
        self._thread.join(10)
        self._theirs.close()
        self.server.close()

    def __enter__(self) -> GatedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


@contextlib.contextmanager
def mux_on_file_server(
    root: Path, sock_path: Path, **options: Any
) -> Iterator[tuple[FileServer, MultiplexerThread, str]]:
    """:func:`running_mux` on :func:`file_server`: the server, the multiplexer, its socket."""
    with file_server(root) as (server, transport), running_mux(
        transport, sock_path, **options
    ) as (mux, path):
        yield server, mux, path


@contextlib.contextmanager
def mux_on_gated(
    root: Path, sock_path: Path, *, hold: Any = None, flush_mode: str = "cancel", **options: Any
) -> Iterator[tuple[GatedBackend, MultiplexerThread, str]]:
    """:func:`running_mux` on a :class:`GatedBackend`: the backend, the multiplexer, its socket."""
    with GatedBackend(root, hold, flush_mode) as backend, running_mux(
        backend.transport, sock_path, **options
    ) as (mux, path):
        yield backend, mux, path
