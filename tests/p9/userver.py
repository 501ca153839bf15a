"""A small scripted 9P2000.u server with xen-9pfsd's rules: the .u client's test peer.

It serves a directory the way issue 12 describes Xen's ``xen-9pfsd``
(``tools/9pfsd`` in the Xen tree, 4.19 and later), until the real-Xen tier
runs the real one:

* 9P2000.u only: a Tversion of anything else is answered ``"unknown"``;
* Tversion, Tattach, Twalk (at most 16 names), Topen, Tcreate, Tread,
  Twrite, Tclunk and Tstat; everything else (Tflush and Tremove included)
  gets Rerror ``EOPNOTSUPP``;
* removal is Topen or Tcreate with ``ORCLOSE``, then Tclunk;
* ``max_open_files`` (default 5) counts every fid, the attach root's too:
  one more gets Rerror ``EMFILE``;
* stats are written as xen-9pfsd writes them (Xen 4.19, 4.20, ``tools/9pfsd/io.c``):
  both size fields of an Rstat count 10 bytes more than the fields take,
  and each entry of a directory read carries the two size fields of an
  Rstat's body (``stats="spec"`` writes the 9P2000.u layout instead);
* a Tstat of the root fid is not answered usefully by xen-9pfsd: here it is
  recorded in :attr:`UServer.root_tstat_seen` and never answered (the client must
  never send one);
* Topen with ``ORCLOSE`` of a directory gets ``EINVAL`` (a directory opens
  with ``OREAD`` only), and a removal at Tclunk that fails is not reported;
* a Tcreate of a symbolic link or other special file gets ``EINVAL``.

``extra_ops`` adds what xen-9pfsd does not do (``"remove"``, ``"wstat"``,
``"symlink"``, ``"orclose_dirs"``) so the client's paths for richer .u
servers are tested too.  A *script*, as in :mod:`tests.p9.hostile`, may replace any
answer: ``script(request, honest) -> message | bytes | SILENCE | None``.

Reach it in-process with :meth:`UServer.transport` (records what was sent,
and the most fids the server held at once: :attr:`UServer.peak_fids`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as st
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client
from tests.p9.hostile import SILENCE

U = c.VERSION_9P2000_U
Answer = c.Message | bytes | None
Script = Callable[[c.Message, Callable[[], c.Message]], Answer]

__all__ = ["SILENCE", "U", "UServer", "UTransport", "serve_unix"]


@dataclass
class _Fid:
    path: str
    fd: int | None = None
    is_dir: bool = False
    orclose: bool = False
    opened: bool = False
    dirents: list[bytes] = field(default_factory=list)
    dir_offset: int = 0


@dataclass
class _Stats:
    peak_fids: int = 0
    refused: list[str] = field(default_factory=list)


class UServer:
    """A 9P2000.u server of *root* with xen-9pfsd's op set and fid limit."""

    def __init__(
        self,
        root: str | Path,
        script: Script | None = None,
        *,
        max_open_files: int = 5,
        extra_ops: frozenset[str] | set[str] = frozenset(),
        stats: str = "xen9pfsd",
        root_tstat_refused: bool = True,
    ) -> None:
        self.root = os.path.realpath(root)
        self.script = script
        self.max_open_files = max_open_files
        self.extra_ops = frozenset(extra_ops)
        self.fids: dict[int, _Fid] = {}
        self.sent: list[c.Message] = []
        self.stats = _Stats()
        self.msize = 0
        self.stats_layout = stats
        #: Whether a Tstat of the root was received (xen-9pfsd cannot answer it).
        self.root_tstat_seen = False
        self.root_tstat_refused = root_tstat_refused
        self._lock = threading.Lock()

    def _is_root_fid(self, fid: int) -> bool:
        f = self.fids.get(fid)
        return f is not None and f.path == self.root

    def _pack_stat(self, stat: c.Stat, *, entry: bool) -> bytes:
        """A stat's bytes in an Rstat body or a directory read, in the chosen layout."""
        raw = stat.pack()
        if self.stats_layout == "spec":
            return raw if entry else len(raw).to_bytes(2, "little") + raw
        size = len(raw) - 2 + c.XEN9PFSD_STAT_EXCESS
        return (size + 2).to_bytes(2, "little") + size.to_bytes(2, "little") + raw[2:]

    def _rstat(self, tag: int, stat: c.Stat) -> bytes:
        body = self._pack_stat(stat, entry=False)
        return (7 + len(body)).to_bytes(4, "little") + bytes([c.Rstat.TYPE]) + (
            tag.to_bytes(2, "little") + body
        )

    @property
    def peak_fids(self) -> int:
        """The most fids held at once."""
        return self.stats.peak_fids

    # --- plumbing ----------------------------------------------------------------

    def answer(self, request: bytes) -> bytes | None:
        """The reply bytes to *request*, or None for :data:`SILENCE`."""
        with self._lock:
            msg = c.decode(request, U)
            self.sent.append(msg)
            honest_reply: list[c.Message] = []
            raw_reply: list[bytes] = []

            def honest() -> c.Message:
                if not honest_reply:
                    answer = self._serve(msg)
                    if isinstance(answer, bytes):  # an Rstat in xen-9pfsd's layout
                        stat = self._stat(self.fids[msg.fid].path)  # type: ignore[attr-defined]
                        honest_reply.append(c.Rstat(msg.tag, stat))
                        raw_reply.append(answer)
                    else:
                        honest_reply.append(answer)
                return honest_reply[0]

            reply = self.script(msg, honest) if self.script is not None else None
            if reply is SILENCE:
                return None
            if (
                reply is None
                and self.root_tstat_refused
                and isinstance(msg, c.Tstat)
                and self._is_root_fid(msg.fid)
            ):
                self.root_tstat_seen = True
                return None
            if reply is None:
                reply = honest()
                if raw_reply:
                    return raw_reply[0]
            if isinstance(reply, bytes | bytearray):
                return bytes(reply)
            return c.encode(reply)

    def transport(self, msize: int = 64 * 1024) -> UTransport:
        """An in-process transport to this server."""
        return UTransport(self, msize)

    def client(self, **options: Any) -> Client:
        """A :class:`Client` over :meth:`transport` (``timeout`` 10 s unless given)."""
        options.setdefault("timeout", 10)
        return Client(self.transport(options.pop("msize_limit", 64 * 1024)), **options)

    def close(self) -> None:
        """Close every open file."""
        for f in self.fids.values():
            if f.fd is not None:
                os.close(f.fd)
        self.fids.clear()

    # --- the requests ------------------------------------------------------------

    def _error(self, tag: int, err: int) -> c.Rerror:
        return c.Rerror(tag, os.strerror(err), err)

    def _qid(self, path: str) -> c.Qid:
        s = os.lstat(path)
        qtype = c.QTDIR if st.S_ISDIR(s.st_mode) else c.QTSYMLINK if st.S_ISLNK(s.st_mode) else 0
        return c.Qid(qtype, 0, s.st_ino)

    def _stat(self, path: str) -> c.Stat:
        s = os.lstat(path)
        mode = s.st_mode & 0o777
        ext = ""
        if st.S_ISDIR(s.st_mode):
            mode |= c.DMDIR
        elif st.S_ISLNK(s.st_mode):
            mode |= c.DMSYMLINK
            ext = os.readlink(path)
        name = "/" if path == self.root else os.path.basename(path)
        return c.Stat(
            0, 0, self._qid(path), mode, int(s.st_atime), int(s.st_mtime), s.st_size,
            name, "root", "root", "", ext, s.st_uid, s.st_gid, c.NONUNAME,
        )  # fmt: skip

    def _new_fid(self, tag: int, fid: int, path: str) -> c.Rerror | None:
        if fid in self.fids:
            return self._error(tag, errno.EBADF)
        if len(self.fids) >= self.max_open_files:
            return self._error(tag, errno.EMFILE)
        self.fids[fid] = _Fid(path, is_dir=os.path.isdir(path) and not os.path.islink(path))
        self.stats.peak_fids = max(self.stats.peak_fids, len(self.fids))
        return None

    def _serve(self, m: c.Message) -> c.Message | bytes:
        try:
            return self._dispatch(m)
        except OSError as exc:
            return self._error(m.tag, exc.errno or errno.EIO)

    def _dispatch(self, m: c.Message) -> c.Message | bytes:
        if isinstance(m, c.Tversion):
            self.close()
            self.msize = min(m.msize, 64 * 1024)
            version = U if m.version.startswith(U) else c.VERSION_UNKNOWN
            return c.Rversion(m.tag, self.msize, version)
        if isinstance(m, c.Tattach):
            err = self._new_fid(m.tag, m.fid, self.root)
            return err or c.Rattach(m.tag, self._qid(self.root))
        if isinstance(m, c.Twalk):
            return self._walk(m)
        if isinstance(m, c.Tclunk):
            return self._clunk(m)
        f = self.fids.get(getattr(m, "fid", -1))
        if isinstance(m, c.Tstat) and f is not None:
            return self._rstat(m.tag, self._stat(f.path))
        if isinstance(m, c.Topen) and f is not None:
            return self._open(m, f)
        if isinstance(m, c.Tcreate) and f is not None:
            return self._create(m, f)
        if isinstance(m, c.Tread) and f is not None and f.opened:
            return self._read(m, f)
        if isinstance(m, c.Twrite) and f is not None and f.fd is not None:
            return c.Rwrite(m.tag, os.pwrite(f.fd, m.data, m.offset))
        if isinstance(m, c.Tremove) and "remove" in self.extra_ops and f is not None:
            del self.fids[m.fid]
            if f.fd is not None:
                os.close(f.fd)
            (os.rmdir if f.is_dir else os.unlink)(f.path)
            return c.Rremove(m.tag)
        if isinstance(m, c.Twstat) and "wstat" in self.extra_ops and f is not None:
            return self._wstat(m, f)
        if isinstance(m, c.Tstat | c.Topen | c.Tcreate | c.Tread | c.Twrite):
            return self._error(m.tag, errno.EBADF)
        self.stats.refused.append(type(m).__name__)
        return self._error(m.tag, errno.EOPNOTSUPP)

    def _walk(self, m: c.Twalk) -> c.Message:
        f = self.fids.get(m.fid)
        if f is None:
            return self._error(m.tag, errno.EBADF)
        if len(m.wnames) > c.MAXWELEM:
            return self._error(m.tag, errno.EINVAL)
        path = f.path
        qids = []
        for name in m.wnames:
            if "/" in name or name in ("", "."):
                break
            if name == "..":
                nxt = path if path == self.root else os.path.dirname(path)
            else:
                if not os.path.isdir(path) or os.path.islink(path):
                    break
                nxt = os.path.join(path, name)
                if not os.path.lexists(nxt):
                    break
            path = nxt
            qids.append(self._qid(path))
        if len(qids) < len(m.wnames):
            if not qids:
                return self._error(m.tag, errno.ENOENT)
            return c.Rwalk(m.tag, tuple(qids))
        if m.newfid != m.fid:
            err = self._new_fid(m.tag, m.newfid, path)
            if err is not None:
                return err
        else:
            f.path = path
        return c.Rwalk(m.tag, tuple(qids))

    def _clunk(self, m: c.Tclunk) -> c.Message:
        f = self.fids.pop(m.fid, None)
        if f is None:
            return self._error(m.tag, errno.EBADF)
        if f.fd is not None:
            os.close(f.fd)
        if f.orclose:
            try:
                (os.rmdir if f.is_dir else os.unlink)(f.path)
            except OSError:
                pass  # xen-9pfsd does not check unlinkat's result
        return c.Rclunk(m.tag)

    def _open(self, m: c.Topen, f: _Fid) -> c.Message:
        if f.opened:
            return self._error(m.tag, errno.EINVAL)
        acc = m.mode & 3
        if f.is_dir:
            if m.mode != c.OREAD and not (
                "orclose_dirs" in self.extra_ops and m.mode == c.OREAD | c.ORCLOSE
            ):
                return self._error(m.tag, errno.EINVAL)
            names = sorted(os.listdir(f.path))
            if self.stats_layout != "spec":
                names = [".", "..", *names]  # xen-9pfsd lists them (readdir(3))
            f.dirents = [
                self._pack_stat(self._stat(os.path.join(f.path, n)), entry=True) for n in names
            ]
        else:
            flags = {c.OREAD: os.O_RDONLY, c.OWRITE: os.O_WRONLY, c.ORDWR: os.O_RDWR}.get(
                acc, os.O_RDONLY
            )
            if m.mode & c.OTRUNC:
                flags |= os.O_TRUNC
            f.fd = os.open(f.path, flags | os.O_NOFOLLOW)
        f.opened = True
        f.orclose = bool(m.mode & c.ORCLOSE)
        return c.Ropen(m.tag, self._qid(f.path), 0)

    def _create(self, m: c.Tcreate, f: _Fid) -> c.Message:
        if not f.is_dir or f.opened:
            return self._error(m.tag, errno.ENOTDIR)
        if "/" in m.name or m.name in ("", ".", ".."):
            return self._error(m.tag, errno.EINVAL)
        path = os.path.join(f.path, m.name)
        if m.perm & c.DMSYMLINK:
            if "symlink" not in self.extra_ops:
                return self._error(m.tag, errno.EINVAL)
            os.symlink(m.extension, path)
            f.path, f.is_dir, f.opened = path, False, True
        elif m.perm & c.DMDIR:
            os.mkdir(path, m.perm & 0o777)
            f.path, f.opened = path, True
            f.dirents = []
        elif m.perm & ~0o7777:
            return self._error(m.tag, errno.EINVAL)
        else:
            acc = m.mode & 3
            flags = {c.OREAD: os.O_RDONLY, c.OWRITE: os.O_WRONLY}.get(acc, os.O_RDWR)
            f.fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, m.perm & 0o777)
            f.path, f.is_dir, f.opened = path, False, True
        f.orclose = bool(m.mode & c.ORCLOSE)
        return c.Rcreate(m.tag, self._qid(path), 0)

    def _read(self, m: c.Tread, f: _Fid) -> c.Message:
        count = min(m.count, self.msize - c.IOHDRSZ)
        if f.fd is not None:
            return c.Rread(m.tag, os.pread(f.fd, count, m.offset))
        # whole entries only, from the entry that starts at the offset;
        # xen-9pfsd counts each entry 8 bytes longer than it writes it, and
        # sends that many stale bytes per entry at the end of the data
        pad = c.XEN9PFSD_DIRREAD_EXCESS if self.stats_layout != "spec" else 0
        at, i = 0, 0
        while i < len(f.dirents) and at < m.offset:
            at += len(f.dirents[i]) + pad
            i += 1
        out, stale = b"", b""
        while i < len(f.dirents) and len(out) + len(stale) + len(f.dirents[i]) + pad <= count:
            out += f.dirents[i]
            stale += b"\xa5" * pad
            i += 1
        return c.Rread(m.tag, out + stale)

    def _wstat(self, m: c.Twstat, f: _Fid) -> c.Message:
        s = m.stat
        if s.name:
            os.rename(f.path, os.path.join(os.path.dirname(f.path), s.name))
            f.path = os.path.join(os.path.dirname(f.path), s.name)
        if s.mode != 0xFFFFFFFF:
            os.chmod(f.path, s.mode & 0o7777)
        if s.length != 0xFFFFFFFFFFFFFFFF:
            os.truncate(f.path, s.length)
        if s.atime != 0xFFFFFFFF or s.mtime != 0xFFFFFFFF:
            old = os.stat(f.path)
            os.utime(
                f.path,
                (
                    old.st_atime if s.atime == 0xFFFFFFFF else s.atime,
                    old.st_mtime if s.mtime == 0xFFFFFFFF else s.mtime,
                ),
            )
        return c.Rwstat(m.tag)


class UTransport:
    """An in-process transport to a :class:`UServer` (the client's ``Transport``).

    :ivar sent: every request, decoded
    :ivar flushed_tags: tags the client declared free
    :ivar backend_path: a xen-9pfsd backend directory, as a Frontend to it has
    """

    def __init__(self, server: UServer, msize: int) -> None:
        self.server = server
        self.msize = msize
        self.sent: list[c.Message] = []
        self.flushed_tags: list[int] = []
        self.closed = False
        self.backend_path = "/local/domain/0/backend/xen_9pfs/1/0"

    def request(self, message: bytes, *, timeout: float | None = None) -> bytes:
        self.sent.append(c.decode(message, U))
        reply = self.server.answer(message)
        if reply is None:
            raise TimeoutError("the .u test server did not answer")
        return reply

    def flushed(self, tag: int) -> None:
        self.flushed_tags.append(tag)

    def close(self) -> None:
        self.closed = True


def serve_unix(server: UServer, path: str | Path) -> Callable[[], None]:
    """Serve *server* on the Unix socket *path* (one connection at a time, in a thread).

    :returns: a function that stops it
    """
    import contextlib
    import socket
    import struct

    from tests.p9.hostile import _recv_exact

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    open_socks: list[socket.socket] = [listener]

    def serve(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                head = _recv_exact(sock, 4)
                if head is None:
                    return
                (size,) = struct.unpack("<I", head)
                body = _recv_exact(sock, size - 4) if size > 4 else b""
                if body is None:
                    return
                reply = server.answer(head + body)
                if reply is not None:
                    sock.sendall(reply)

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            open_socks.append(sock)
            serve(sock)
            sock.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    def stop() -> None:
        for sock in open_socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        thread.join(10)

    return stop


@contextlib.contextmanager
def mux_as_xen_9pfsd(root: Path, where: Path) -> Iterator[tuple[UServer, Any]]:
    """A :class:`UServer` of *root* behind pyxen9p's multiplexer, whose
    backend transport says it is xen-9pfsd (``backend/xen_9pfs``).

    Yields the server and the running :class:`~pyxen9p.p9.mux.MultiplexerThread`
    (listening at ``where/mux.sock``); on the way out,
    checks that the server was never asked for the root's attributes.
    """
    from pyxen9p.p9.mux import MultiplexerThread
    from pyxen9p.p9.transport import StreamTransport

    server = UServer(root)
    stop = serve_unix(server, where / "u.sock")
    transport = StreamTransport.unix(str(where / "u.sock"))
    transport.backend_path = "/local/domain/0/backend/xen_9pfs/1/0"  # type: ignore[attr-defined]
    try:
        with MultiplexerThread(transport) as mux:
            mux.listen_unix(where / "mux.sock")
            yield server, mux
    finally:
        transport.close()
        stop()
    assert not server.root_tstat_seen
