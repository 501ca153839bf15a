"""A xenstored that serves a :class:`~pyxen9p.sim.xenstore.XenStoreTree` on a
Unix socket with the real wire protocol (``xen/io/xs_wire.h``).

The real ``libxenstore`` (hence :class:`pyxen9p.libs.xenstore.XenStore`) and
Debian's ``xenstore-*`` tools talk to it when ``XENSTORED_PATH`` names the
socket.  As with the real daemon's socket, every connection acts for domain
0 (privileged); a relative path is taken relative to ``/local/domain/0``.

Every message is a header ``struct xsd_sockmsg { uint32 type, req_id, tx_id,
len; }`` (native byte order) followed by ``len`` <= 4096 bytes of payload.
Replies echo ``req_id`` and ``tx_id``; failures are ``XS_ERROR`` replies
naming the errno (``"ENOENT\\0"``); watch events are ``XS_WATCH_EVENT``
messages with ``req_id`` 0 sent whenever they happen.  A client sending an
oversized payload gets an ``E2BIG`` error and is disconnected; other clients
are not affected.

Run it in the foreground with ``python -m pyxen9p.sim.xenstored --socket PATH``
(SIGTERM or SIGINT stop it), or in a thread::

    with XenStoreDaemon("/tmp/xs.sock") as daemon:
        ...  # XENSTORED_PATH=/tmp/xs.sock
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from enum import IntEnum
from types import FrameType

from typing_extensions import Self

from pyxen9p.sim.xenstore import (
    TreeTransaction,
    XenStoreTree,
    permission_from_string,
    permission_to_string,
)

__all__ = [
    "HEADER",
    "XENSTORE_PAYLOAD_MAX",
    "XenStoreDaemon",
    "XsType",
    "error_name",
    "main",
]

_log = logging.getLogger(__name__)

#: The message header: type, req_id, tx_id, len (native byte order).
HEADER = struct.Struct("=IIII")
#: Largest payload in either direction.
XENSTORE_PAYLOAD_MAX = 4096
# A client that does not read its replies and events is dropped past this.
_OUTPUT_LIMIT = 4 * 1024 * 1024


class XsType(IntEnum):
    """``enum xsd_sockmsg_type`` (Xen 4.17)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


# xsd_errors[] of xs_wire.h, in its order; any other errno is sent as EINVAL
_WIRE_ERRORS = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)
_ERROR_NAMES = {getattr(errno, name): name for name in _WIRE_ERRORS}


def error_name(code: int) -> str:
    """The name xenstored sends for errno *code* (``EINVAL`` if it has none)."""
    return _ERROR_NAMES.get(code, "EINVAL")


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _onearg(payload: bytes) -> str:
    """The single NUL-terminated string a request carries (else ``EINVAL``)."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise _fail(errno.EINVAL)
    return _text(payload[:-1])


def _strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of *payload* (bytes after the last NUL are ignored)."""
    return payload.split(b"\0")[:-1]


def _text(raw: bytes) -> str:
    """A path or number: ASCII only (xenstored's names are), else ``EINVAL``."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise _fail(errno.EINVAL) from None


def _number(raw: bytes | str, *, signed: bool = False) -> int:
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    body = text[1:] if signed and text.startswith("-") else text
    if not body.isdigit() or not body.isascii() or len(body) > 20:
        raise _fail(errno.EINVAL)
    return int(text)


class _Client:
    """One socket connection: its buffers, transactions and watches."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.inbuf = bytearray()
        self.out = bytearray()
        self.out_lock = threading.Lock()
        self.transactions: dict[int, TreeTransaction] = {}
        self.overflow = False
        self.closing = False  # stop reading; close once the output is sent
        self.events = selectors.EVENT_READ  # what the selector watches

    def queue(self, kind: int, req_id: int, tx_id: int, payload: bytes) -> None:
        with self.out_lock:
            if len(self.out) > _OUTPUT_LIMIT:
                self.overflow = True
                return
            self.out += HEADER.pack(kind, req_id, tx_id, len(payload))
            self.out += payload

    def flush(self) -> None:
        """Send what the socket takes now (non-blocking)."""
        with self.out_lock:
            while self.out:
                try:
                    sent = self.sock.send(self.out)
                except (BlockingIOError, InterruptedError):
                    return
                del self.out[:sent]

    def has_output(self) -> bool:
        with self.out_lock:
            return bool(self.out)


_Handler = Callable[[_Client, int, int, bytes], "bytes | None"]


class XenStoreDaemon:
    """A xenstored serving *tree* on the Unix socket *socket_path*.

    One thread runs the server (a ``selectors`` loop over every client);
    :meth:`start` starts it and :meth:`stop` stops it, closes every
    connection and removes the socket file.  Use it as a context manager.

    :param socket_path: where to listen (an old socket file there is replaced)
    :param tree: the store to serve; a fresh :class:`XenStoreTree` if ``None``
    """

    def __init__(
        self, socket_path: str | os.PathLike[str], tree: XenStoreTree | None = None
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.tree = tree if tree is not None else XenStoreTree()
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._waker_r: socket.socket | None = None
        self._waker_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: dict[int, _Client] = {}
        self._client_numbers = 0
        self._lock = threading.Lock()
        self._handlers: dict[int, _Handler] = {
            XsType.CONTROL: self._control,
            XsType.DIRECTORY: self._directory,
            XsType.DIRECTORY_PART: self._directory_part,
            XsType.READ: self._read,
            XsType.GET_PERMS: self._get_perms,
            XsType.WATCH: self._watch,
            XsType.UNWATCH: self._unwatch,
            XsType.TRANSACTION_START: self._transaction_start,
            XsType.TRANSACTION_END: self._transaction_end,
            XsType.INTRODUCE: self._introduce,
            XsType.RELEASE: self._release,
            XsType.GET_DOMAIN_PATH: self._get_domain_path,
            XsType.WRITE: self._write,
            XsType.MKDIR: self._mkdir,
            XsType.RM: self._rm,
            XsType.SET_PERMS: self._set_perms,
            XsType.IS_DOMAIN_INTRODUCED: self._is_domain_introduced,
            XsType.RESUME: self._resume,
            XsType.SET_TARGET: self._set_target,
            XsType.RESET_WATCHES: self._reset_watches,
        }

    # --- life cycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Listen on the socket and start serving in a thread.

        :raises RuntimeError: if already started
        :raises OSError: if the socket cannot be created
        """
        if self._thread is not None:
            raise RuntimeError("the daemon was already started")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            info = os.stat(self.socket_path)
            self._socket_id = (info.st_dev, info.st_ino)
            listener.listen(64)
            listener.setblocking(False)
            self._waker_r, self._waker_w = socket.socketpair()
            self._waker_r.setblocking(False)
            self._waker_w.setblocking(False)
        except BaseException:
            listener.close()
            self._remove_socket_file()
            raise
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="sim-xenstored", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every connection and remove the socket file
        (idempotent).

        :param timeout: how long to wait for the server thread
        :raises TimeoutError: if the thread did not stop in time
        """
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError("the xenstored thread did not stop")
        self._thread = None
        for sock in (self._listener, self._waker_r, self._waker_w):
            if sock is not None:
                sock.close()
        self._listener = self._waker_r = self._waker_w = None
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        try:
            info = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._socket_id:
            os.unlink(self.socket_path)
        self._socket_id = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wake(self) -> None:
        waker = self._waker_w
        if waker is not None:
            with contextlib.suppress(OSError):
                waker.send(b"!")

    # --- the server loop ----------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None and self._waker_r is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        selector.register(self._waker_r, selectors.EVENT_READ, None)
        try:
            while not self._stopping.is_set():
                for client in list(self._clients.values()):
                    self._update_interest(selector, client)
                for key, mask in selector.select(timeout=1.0):
                    if key.fileobj is self._listener:
                        self._accept(selector)
                    elif key.fileobj is self._waker_r:
                        with contextlib.suppress(BlockingIOError):
                            while self._waker_r.recv(4096):
                                pass
                    else:
                        client = key.data
                        if mask & selectors.EVENT_READ:
                            self._on_readable(client)
                        if mask & selectors.EVENT_WRITE:
                            self._on_writable(client)
                        if client.number in self._clients:
                            self._after_io(selector, client)
        except Exception:
            _log.exception("xenstored loop failed")
        finally:
            for client in list(self._clients.values()):
                self._disconnect(client, selector)
            selector.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            with self._lock:
                self._client_numbers += 1
                client = _Client(sock, self._client_numbers)
                self._clients[client.number] = client
            selector.register(sock, selectors.EVENT_READ, client)
            _log.debug("client %d connected", client.number)

    def _update_interest(self, selector: selectors.BaseSelector, client: _Client) -> None:
        if client.overflow:
            _log.warning("client %d does not read its messages: disconnected", client.number)
            self._disconnect(client, selector)
            return
        events = 0 if client.closing else selectors.EVENT_READ
        if client.has_output():
            events |= selectors.EVENT_WRITE
        if not events:
            self._disconnect(client, selector)
        elif events != client.events:
            selector.modify(client.sock, events, client)
            client.events = events

    def _after_io(self, selector: selectors.BaseSelector, client: _Client) -> None:
        try:
            client.flush()
        except OSError:
            self._disconnect(client, selector)
            return
        if client.closing and not client.has_output():
            self._disconnect(client, selector)

    def _on_writable(self, client: _Client) -> None:
        try:
            client.flush()
        except OSError as exc:
            _log.debug("client %d: send failed: %s", client.number, exc)
            client.closing = True
            with client.out_lock:
                client.out.clear()

    def _on_readable(self, client: _Client) -> None:
        if client.closing:
            return
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            _log.debug("client %d: receive failed: %s", client.number, exc)
            data = b""
        if not data:
            client.closing = True
            with client.out_lock:
                client.out.clear()
            return
        client.inbuf += data
        while len(client.inbuf) >= HEADER.size and not client.closing:
            kind, req_id, tx_id, length = HEADER.unpack_from(client.inbuf)
            if length > XENSTORE_PAYLOAD_MAX:
                _log.warning(
                    "client %d sent a %d-byte payload (limit %d): disconnected",
                    client.number,
                    length,
                    XENSTORE_PAYLOAD_MAX,
                )
                client.queue(XsType.ERROR, req_id, tx_id, b"E2BIG\0")
                client.closing = True
                client.inbuf.clear()
                return
            if len(client.inbuf) < HEADER.size + length:
                return
            payload = bytes(client.inbuf[HEADER.size : HEADER.size + length])
            del client.inbuf[: HEADER.size + length]
            self._process(client, kind, req_id, tx_id, payload)

    def _disconnect(self, client: _Client, selector: selectors.BaseSelector) -> None:
        with self._lock:
            if self._clients.pop(client.number, None) is None:
                return
        self.tree.remove_watches(client)
        for txn in client.transactions.values():
            with contextlib.suppress(OSError):
                self.tree.transaction_end(txn, commit=False)
        client.transactions.clear()
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(client.sock)
        client.sock.close()
        _log.debug("client %d disconnected", client.number)

    # --- requests -----------------------------------------------------------

    def _process(self, client: _Client, kind: int, req_id: int, tx_id: int, payload: bytes) -> None:
        try:
            handler = self._handlers.get(kind)
            if handler is None:
                raise _fail(errno.ENOSYS)
            reply = handler(client, req_id, tx_id, payload)
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EIO
            client.queue(XsType.ERROR, req_id, tx_id, error_name(code).encode() + b"\0")
            return
        except Exception:
            _log.exception("request %d of client %d failed", kind, client.number)
            client.queue(XsType.ERROR, req_id, tx_id, b"EIO\0")
            return
        if reply is None:
            return  # the handler replied itself
        if len(reply) > XENSTORE_PAYLOAD_MAX:
            client.queue(XsType.ERROR, req_id, tx_id, b"E2BIG\0")
        else:
            client.queue(kind, req_id, tx_id, reply)

    @staticmethod
    def _txn(client: _Client, tx_id: int) -> TreeTransaction | None:
        if tx_id == 0:
            return None
        txn = client.transactions.get(tx_id)
        if txn is None:
            raise _fail(errno.ENOENT)
        return txn

    def _read(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        return self.tree.read(0, _onearg(payload), self._txn(client, tx_id))

    def _write(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        cut = payload.find(b"\0")
        if cut < 0:
            raise _fail(errno.EINVAL)
        path = _text(payload[:cut])
        self.tree.write(0, path, payload[cut + 1 :], self._txn(client, tx_id))
        return b"OK\0"

    def _mkdir(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        self.tree.mkdir(0, _onearg(payload), self._txn(client, tx_id))
        return b"OK\0"

    def _rm(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        self.tree.rm(0, _onearg(payload), self._txn(client, tx_id))
        return b"OK\0"

    def _directory(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        children = self.tree.directory(0, _onearg(payload), self._txn(client, tx_id))
        return b"".join(name.encode() + b"\0" for name in children)

    def _directory_part(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        args = _strings(payload)
        if len(args) != 2 or payload.count(b"\0") != 2:
            raise _fail(errno.EINVAL)
        offset = _number(args[1])
        gen, children = self.tree.directory_generation(0, _text(args[0]), self._txn(client, tx_id))
        listing = b"".join(name.encode() + b"\0" for name in children)
        head = str(gen).encode() + b"\0"
        if offset >= len(listing):
            return head + b"\0"
        room = XENSTORE_PAYLOAD_MAX - len(head) - 1
        end = offset
        while end < len(listing):
            stop = listing.index(b"\0", end) + 1
            if stop - offset > room:
                break
            end = stop
        chunk = listing[offset:end]
        return head + chunk + (b"\0" if end == len(listing) else b"")

    def _get_perms(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        perms = self.tree.get_permissions(0, _onearg(payload), self._txn(client, tx_id))
        return b"".join(permission_to_string(p).encode() + b"\0" for p in perms)

    def _set_perms(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        args = _strings(payload)
        if len(args) < 2:
            raise _fail(errno.EINVAL)
        perms = [permission_from_string(_text(raw)) for raw in args[1:]]
        self.tree.set_permissions(0, _text(args[0]), perms, self._txn(client, tx_id))
        return b"OK\0"

    def _watch_args(self, payload: bytes) -> tuple[str, str]:
        args = _strings(payload)
        if len(args) != 2:
            raise _fail(errno.EINVAL)
        # tokens are opaque bytes: latin-1 maps them one to one onto str
        return _text(args[0]), args[1].decode("latin-1")

    def _watch(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> None:
        path, token = self._watch_args(payload)

        def sink(event_path: str, event_token: str) -> None:
            client.queue(
                XsType.WATCH_EVENT,
                0,
                0,
                event_path.encode("latin-1") + b"\0" + event_token.encode("latin-1") + b"\0",
            )
            if threading.current_thread() is not self._thread:
                self._wake()

        def reply() -> None:
            client.queue(XsType.WATCH, req_id, tx_id, b"OK\0")

        self.tree.add_watch(0, path, token, sink, owner=client, before_initial=reply)
        return None

    def _unwatch(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        path, token = self._watch_args(payload)
        self.tree.unwatch(0, path, token, owner=client)
        return b"OK\0"

    def _reset_watches(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        self.tree.remove_watches(client)
        for txn in client.transactions.values():
            with contextlib.suppress(OSError):
                self.tree.transaction_end(txn, commit=False)
        client.transactions.clear()
        return b"OK\0"

    def _transaction_start(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        if tx_id != 0:
            # transactions do not nest
            raise _fail(errno.EBUSY if tx_id in client.transactions else errno.ENOENT)
        txn = self.tree.transaction_start(0)
        client.transactions[txn.id] = txn
        return f"{txn.id}\0".encode()

    def _transaction_end(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        arg = _onearg(payload)
        if arg not in ("T", "F"):
            raise _fail(errno.EINVAL)
        txn = client.transactions.pop(tx_id, None) if tx_id else None
        if txn is None:
            raise _fail(errno.ENOENT)
        self.tree.transaction_end(txn, commit=arg == "T")
        return b"OK\0"

    def _introduce(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        args = _strings(payload)
        if len(args) < 3:
            raise _fail(errno.EINVAL)
        domid = _number(args[0])
        mfn = _number(args[1], signed=True)
        port = _number(args[2])
        self.tree.introduce_domain(domid, mfn, port)
        return b"OK\0"

    def _release(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        self.tree.release_domain(_number(_onearg(payload)))
        return b"OK\0"

    def _resume(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        self.tree.resume_domain(_number(_onearg(payload)))
        return b"OK\0"

    def _set_target(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        args = _strings(payload)
        if len(args) != 2:
            raise _fail(errno.EINVAL)
        self.tree.set_target(_number(args[0]), _number(args[1]))
        return b"OK\0"

    def _is_domain_introduced(
        self, client: _Client, req_id: int, tx_id: int, payload: bytes
    ) -> bytes:
        domid = _number(_onearg(payload))
        return b"T\0" if self.tree.is_domain_introduced(domid) else b"F\0"

    def _get_domain_path(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        return self.tree.get_domain_path(_number(_onearg(payload))).encode() + b"\0"

    def _control(self, client: _Client, req_id: int, tx_id: int, payload: bytes) -> bytes:
        args = _strings(payload)
        if not args:
            raise _fail(errno.EINVAL)
        return self.tree.control(_text(args[0]), args[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pyxen9p.sim.xenstored``: serve in the
    foreground until SIGTERM or SIGINT.

    :param argv: the arguments (``sys.argv[1:]`` if ``None``)
    :returns: the exit status
    """
    parser = argparse.ArgumentParser(
        prog="python -m pyxen9p.sim.xenstored",
        description="A simulated xenstored speaking the real wire protocol on a Unix socket.",
    )
    parser.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    parser.add_argument(
        "--domain",
        type=int,
        action="append",
        default=[],
        metavar="DOMID",
        help="introduce this domain at start (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        tree = XenStoreTree()
        for domid in options.domain:
            tree.introduce_domain(domid)
        with XenStoreDaemon(options.socket, tree) as daemon:
            print(f"xenstored listening on {daemon.socket_path}", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                if not daemon.running:
                    return 1
    except OSError as exc:
        print(f"xenstored: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
