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
        return c.decode(head + body)

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
