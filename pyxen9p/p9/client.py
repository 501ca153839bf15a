"""A 9P2000.L (and 9P2000.u) client with a Pythonic, path-based API.

:class:`Client` speaks 9P2000.L, or 9P2000.u to a server that only speaks
that (xen-9pfsd; see the ``version`` parameter), over any
:class:`~pyxen9p.p9.transport.Transport`:
the Xen :class:`~pyxen9p.frontend.Frontend`, or a
:class:`~pyxen9p.p9.transport.StreamTransport` over TCP, a Unix socket or a
pair of file descriptors::

    from pyxen9p.p9.client import Client

    with Client.unix("/run/diod.sock", aname="/srv/export") as fs:
        fs.makedirs("a/b", exist_ok=True)
        fs.write_text("a/b/hello.txt", "hello\\n")
        with fs.open("a/b/hello.txt") as f:      # a real io.TextIOWrapper
            print(f.read())
        for entry in fs.scandir("a/b"):
            print(entry.name, entry.is_file(), entry.stat().st_size)

Paths are ``str`` (or ``os.PathLike[str]``), ``/``-separated, relative to the
attach root; a leading ``/`` means the same root.  ``.`` and ``..`` are
resolved lexically and never climb above the root.  Symbolic links are
resolved by the client (at most 40 of them per lookup), so an absolute link
target also starts at the attach root, never at the server's own root.

Errors the server reports (Rlerror, or a legacy Rerror) become the matching
:class:`OSError` subclass (:class:`FileNotFoundError`,
:class:`PermissionError`, :class:`FileExistsError`, ...) carrying ``errno``
and the 9P path as ``filename``.  A reply that breaks the protocol (of the
wrong type, malformed, larger than the msize, or an error reply with an
impossible error number) raises :class:`~pyxen9p.errors.ProtocolError`; a
failed transport raises :class:`~pyxen9p.errors.TransportError` (a
:class:`ConnectionError`).  Both are :class:`OSError` subclasses, and the same
failure raises the same class over every transport.

Each request gets a tag, handed out round-robin over ``0..0xFFFE`` (so
consecutive requests spread over the rings of a Xen transport, whose ring is
``tag % num_rings``) and reused only once free.  When a request times out (or
the waiting thread is interrupted, e.g. by :class:`KeyboardInterrupt`) the
client sends a Tflush for it and waits for the Rflush before the tag can be
used again.  A server that does not even answer the Tflush within
``flush_timeout`` is considered dead (a Xen backend whose QEMU died looks
exactly like that): every request in flight and every later call then fails at
once with :class:`~pyxen9p.errors.TransportError`.  Fids are recycled, and
always clunked: after an error too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import getpass
import io
import logging
import os
import posixpath
import secrets
import stat as stat_module
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import IO, Any, BinaryIO, Literal, NamedTuple, TypeVar, cast, overload

from typing_extensions import Self

from pyxen9p._requests import MIN_MSIZE
from pyxen9p.errors import Pyxen9pError, TransportError
from pyxen9p.p9 import _dotu
from pyxen9p.p9 import codec as c
from pyxen9p.p9.codec import ProtocolError
from pyxen9p.p9.files import OpenMode, RemoteFileIO, parse_mode
from pyxen9p.p9.session import (
    _DEFAULT,
    Chain,
    ClientSession,
    Direct,
    Outcome,
    Step,
    _TimeoutArg,
)
from pyxen9p.p9.transport import StreamTransport, Transport

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_READ",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    "MAXSYMLINKS",
    "MIN_MSIZE",
    "VERSIONS",
    "Client",
    "CopyError",
    "DirEntry",
    "ScandirIterator",
    "StatFS",
]

log = logging.getLogger(__name__)

#: Most symbolic links followed in one lookup (Linux's ``MAXSYMLINKS``).
MAXSYMLINKS = 40
#: Default limit, in seconds, for each request.
DEFAULT_TIMEOUT = 60.0
#: Default number of Tread / Twrite requests kept in flight for large transfers.
DEFAULT_WINDOW = 8
#: Default :attr:`Client.max_read`: the most bytes one whole-file read returns
#: (1 GiB), and how far a download may run past the size the server reported.
DEFAULT_MAX_READ = 1 << 30
#: Default :attr:`Client.max_entries`: the most entries one directory listing takes.
DEFAULT_MAX_ENTRIES = 1_000_000
#: Default :attr:`Client.batch`: compound operations (a stat's walk + getattr
#: + clunk, an unlink) kept in flight by the operations on many entries
#: (attributes of a listing, removal of a tree).
DEFAULT_BATCH = 32
#: Default :attr:`Client.tree_workers`: files of a tree copied at once by :meth:`Client.copy_in`.
DEFAULT_TREE_WORKERS = 16
#: Entries of a listing whose attributes :meth:`DirEntry.stat` asks for together.
_PREFETCH = 256
_FALLBACK_ERRNOS = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
#: The ``version`` choices of :class:`Client`.
VERSIONS = ("auto", c.VERSION_9P2000_L, c.VERSION_9P2000_U)

_R = TypeVar("_R", bound=c.Message)
_T = TypeVar("_T")

#: A remote path: ``str`` or ``os.PathLike[str]``, ``/``-separated.
PathArg = str | os.PathLike[str]
#: :meth:`Client.open` modes giving an :class:`io.TextIOWrapper`.
OpenTextMode = Literal[
    "r", "w", "x", "a", "r+", "w+", "x+", "a+",
    "rt", "wt", "xt", "at", "r+t", "w+t", "x+t", "a+t", "rt+", "wt+", "xt+", "at+",
]  # fmt: skip
#: Binary modes giving an :class:`io.BufferedRandom`.
OpenBinaryModeUpdating = Literal["r+b", "w+b", "x+b", "a+b", "rb+", "wb+", "xb+", "ab+"]
#: Binary modes giving an :class:`io.BufferedWriter`.
OpenBinaryModeWriting = Literal["wb", "xb", "ab"]
#: Binary modes giving an :class:`io.BufferedReader`.
OpenBinaryModeReading = Literal["rb"]
#: Every binary mode.
OpenBinaryMode = OpenBinaryModeUpdating | OpenBinaryModeWriting | OpenBinaryModeReading
#: ``progress(bytes_done, bytes_total)`` of :meth:`Client.copy_in` / :meth:`Client.copy_out`.
ProgressCallback = Callable[[int, int], None]
#: ``on_error(exc)`` of :meth:`Client.copy_in` / :meth:`Client.copy_out`: one entry failed.
ErrorCallback = Callable[[OSError | ValueError], object]


class StatFS(NamedTuple):
    """File system statistics (Rstatfs), as ``statfs(2)`` returns them."""

    #: File system type (e.g. ``0x01021997``, V9FS_MAGIC, from diod).
    type: int
    #: Block size.
    bsize: int
    #: Total blocks.
    blocks: int
    #: Free blocks.
    bfree: int
    #: Blocks available to unprivileged users.
    bavail: int
    #: Total inodes.
    files: int
    #: Free inodes.
    ffree: int
    #: File system id.
    fsid: int
    #: Longest file name.
    namelen: int


# --------------------------------------------------------------------------
# Directory entries


class DirEntry:
    """One entry of :meth:`Client.scandir`, like :class:`os.DirEntry`.

    The type comes from the Rreaddir entry; :meth:`stat` (and the ``is_*``
    methods when the type is unknown, or a link must be followed) ask the
    server with Tgetattr and cache the answer.  Over a transport that
    pipelines (:attr:`Client.pipelined`), the first :meth:`stat` of an entry
    not yet known asks for the attributes of up to 256 entries of the same
    listing at once (each a walk + getattr + clunk on one ring, many in
    flight), as ``ls -l`` needs them.

    :ivar name: the entry's name
    :ivar path: the scanned directory's path joined with :attr:`name`
    :ivar d_type: the ``DT_*`` type the server gave
    :ivar qid: the entry's qid
    """

    __slots__ = (
        "_client", "_index", "_lstat", "_siblings", "_stat", "d_type", "name", "path", "qid",
    )  # fmt: skip

    def __init__(self, client: Client, directory: str, dirent: c.Dirent) -> None:
        self._client = client
        self.name = dirent.name
        self.path = posixpath.join(directory, dirent.name) if directory else dirent.name
        self.d_type = dirent.type
        self.qid = dirent.qid
        self._stat: os.stat_result | None = None
        self._lstat: os.stat_result | None = None
        self._siblings: list[DirEntry] | None = None
        self._index = 0

    def inode(self) -> int:
        """The inode number: the qid's path."""
        return self.qid.path

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        """The entry's attributes (cached)."""
        if follow_symlinks and not self.is_symlink():
            follow_symlinks = False
        if follow_symlinks:
            if self._stat is None:
                self._stat = self._client.stat(self.path)
            return self._stat
        if self._lstat is None and self._siblings is not None:
            self._client._prefetch_lstat(self._siblings, self._index)
        if self._lstat is None:
            self._lstat = self._client.lstat(self.path)
        return self._lstat

    def is_symlink(self) -> bool:
        """Whether the entry is a symbolic link."""
        if self.d_type != c.DT_UNKNOWN:
            return self.d_type == c.DT_LNK
        return stat_module.S_ISLNK(self.stat(follow_symlinks=False).st_mode)

    def _is(self, dt: int, test: Callable[[int], bool], follow_symlinks: bool) -> bool:
        if self.d_type != c.DT_UNKNOWN and not (follow_symlinks and self.d_type == c.DT_LNK):
            return self.d_type == dt
        try:
            return test(self.stat(follow_symlinks=follow_symlinks).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        """Whether the entry is a directory (or a link to one, if *follow_symlinks*)."""
        return self._is(c.DT_DIR, stat_module.S_ISDIR, follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        """Whether the entry is a regular file (or a link to one, if *follow_symlinks*)."""
        return self._is(c.DT_REG, stat_module.S_ISREG, follow_symlinks)

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"


class ScandirIterator(Iterator[DirEntry]):
    """What :meth:`Client.scandir` returns: an iterator of :class:`DirEntry`.

    The directory is read completely (and its fid clunked) before the first
    entry is returned, so abandoning the iteration leaks nothing; it is a
    context manager like :func:`os.scandir`'s iterator.
    """

    def __init__(self, entries: list[DirEntry]) -> None:
        self._entries = deque(entries)

    def __next__(self) -> DirEntry:
        if not self._entries:
            raise StopIteration
        return self._entries.popleft()

    def close(self) -> None:
        """Drop the remaining entries."""
        self._entries.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Progress:
    total: int
    callback: ProgressCallback | None
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self.lock:  # files of a tree are copied by several threads
            self.done += n
            if self.callback is not None:
                self.callback(self.done, self.total)


class CopyError(Pyxen9pError, OSError):
    """Entries of a tree that :meth:`Client.copy_in` or :meth:`Client.copy_out` did not copy.

    A tree copy goes on past an entry that fails, as ``cp -r`` does, and
    raises this at the end (unless an ``on_error`` callback took each
    failure).  The message names the first failures.

    :ivar errors: every failure, in order: an :class:`OSError` (whose
        ``filename`` names the entry) or a :class:`~pyxen9p.p9.codec.ProtocolError`
        (a listing the client refused)
    """

    def __init__(self, errors: Sequence[OSError | ValueError]) -> None:
        self.errors = list(errors)
        n = len(self.errors)
        shown = "; ".join(_one_line(e) for e in self.errors[:3])
        more = "; ..." if n > 3 else ""
        super().__init__(f"{n} {'entry' if n == 1 else 'entries'} not copied: {shown}{more}")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    return str(exc)


def _ns(value: float) -> tuple[int, int]:
    total = round(value * 1_000_000_000)
    return divmod(total, 1_000_000_000)


def _is_server_error(exc: BaseException) -> bool:
    """Whether *exc* is certainly an error reply (not a timeout, a broken
    transport or a reply that broke the protocol)."""
    return isinstance(exc, OSError) and not isinstance(
        exc, (TimeoutError, TransportError, InterruptedError, ProtocolError)
    )


# --------------------------------------------------------------------------
# The client


class Client:
    """A 9P session over *transport*: version negotiation, attach, and file operations.

    :param transport: carries the messages (:class:`~pyxen9p.frontend.Frontend`,
        :class:`~pyxen9p.p9.transport.StreamTransport`...)
    :param msize: the largest message wished (default and maximum:
        ``transport.msize``); the server may lower it
    :param uname: the user name of Tattach (default: the local user name)
    :param aname: the tree to attach (diod: the absolute exported path)
    :param n_uname: the numeric user of Tattach (default: the local uid)
    :param gid: the group given to created files (default: the local gid)
    :param timeout: limit in seconds for each request (``None``: no limit)
    :param flush_timeout: limit for the Rflush after a request timed out;
        without it the session is declared dead
    :param window: Tread / Twrite requests kept in flight by large transfers
    :param max_read: the most bytes a read to the end of a file takes
        (``read_bytes``, ``read_text``, ``f.read()`` with no size), and how
        many bytes a download (:meth:`copy_out`) may run past the size the
        server reported when the file was opened; more raises
        :class:`OSError` ``EFBIG``.  ``None``: no limit
    :param max_entries: the most entries one directory listing takes
        (:meth:`scandir`, :meth:`listdir`, :meth:`walk`, :meth:`copy_out`);
        more raises :class:`OSError` ``EFBIG``.  ``None``: no limit
    :param umask: bits cleared from the permissions of created files and
        directories (like the process umask for :func:`os.open`)
    :param close_transport: close *transport* with the client (also when the
        constructor fails)
    :param pipeline: write compound operations (walk + getattr + clunk for a
        :meth:`stat`, walk + getattr + open + read + clunk for a small
        :meth:`read_bytes`) back to back on one ring, waiting once.  Only
        for a server that runs each ring's requests in order (QEMU's
        backend, xen-9pfsd, pyxen9p's own server); ``None`` (default): as
        the transport says (yes for a Xen frontend, no for a stream, whose
        server may run a connection's requests on several threads).  Never
        over 9P2000.u
    :param version: the 9P dialect, as Linux's ``version=`` mount option:
        ``"9P2000.L"``, ``"9P2000.u"`` (xen-9pfsd's), or ``"auto"`` (default):
        9P2000.L, else 9P2000.u if the server refuses it.  Over 9P2000.u
        the file API works where the server allows (see the user guide);
        no Tflush is sent: a request that times out ends the session
    :raises ~pyxen9p.errors.ProtocolError: the server speaks none of the
        dialects allowed, or answered with an unusable msize
    :raises OSError: the server refused the attach

    :ivar root_qid: the qid of the attach root
    :ivar window: requests in flight for large transfers
    :ivar max_read: the bound of whole-file reads and of a download's growth
        (may be changed at any time)
    :ivar max_entries: the bound of one directory listing (may be changed at any time)
    """

    def __init__(
        self,
        transport: Transport,
        *,
        msize: int | None = None,
        uname: str | None = None,
        aname: str = "",
        n_uname: int | None = None,
        gid: int | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        flush_timeout: float = 10.0,
        window: int = DEFAULT_WINDOW,
        max_read: int | None = DEFAULT_MAX_READ,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        umask: int = 0o022,
        close_transport: bool = True,
        version: str = "auto",
        pipeline: bool | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, not {version!r}")
        self._session = ClientSession(
            transport, timeout=timeout, flush_timeout=flush_timeout, pipeline=pipeline
        )
        #: Compound operations kept in flight by operations on many entries.
        self.batch = DEFAULT_BATCH
        #: Files copied at once by a tree copy (:meth:`copy_in`).
        self.tree_workers = DEFAULT_TREE_WORKERS
        self._tree_executor: ThreadPoolExecutor | None = None
        self._close_transport = close_transport
        self.window = window
        self.max_read = max_read
        self.max_entries = max_entries
        self.umask = umask
        self.gid = os.getgid() if gid is None else gid
        self.uname = _default_user() if uname is None else uname
        self.aname = aname
        self.n_uname = os.getuid() if n_uname is None else n_uname
        self._has_unlinkat = True
        self._has_renameat = True
        self._tags = self._session.tags
        # the hot path: no forwarding frame per request (the method _rpc documents it)
        self._rpc = self._session.rpc  # type: ignore[method-assign]
        self._fids = self._session.fids
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        #: The 9P2000.u operations, once that dialect is negotiated.
        self._dotu: _dotu.DotU | None = None
        try:
            self._negotiate(msize, version)
            self.root_qid = self._session.attach(self.uname, self.aname, self.n_uname)
        except BaseException:
            self._session.closed = True
            if close_transport:
                transport.close()
            raise

    @classmethod
    def tcp(cls, host: str, port: int = 564, **kwargs: Any) -> Self:
        """Connect over TCP (a :class:`~pyxen9p.p9.transport.StreamTransport`).

        :param kwargs: passed to :class:`Client`
        """
        return cls(StreamTransport.tcp(host, port), **kwargs)

    @classmethod
    def unix(cls, path: str | os.PathLike[str], **kwargs: Any) -> Self:
        """Connect to a server's Unix socket at *path*.

        :param kwargs: passed to :class:`Client`
        """
        return cls(StreamTransport.unix(path), **kwargs)

    def _negotiate(self, msize: int | None, version: str = c.VERSION_9P2000_L) -> None:
        self._session.negotiate(msize, version)
        if self._session.dotu:
            self._dotu = _dotu.DotU(self)
            self._session.decode = self._dotu.decode

    # --- state ---------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The transport carrying the messages."""
        return self._session.transport

    @property
    def _transport(self) -> Transport:
        return self._session.transport

    @_transport.setter
    def _transport(self, value: Transport) -> None:
        self._session.transport = value

    @property
    def session(self) -> ClientSession:
        """The session layer under the path API (tags, fids, requests, flushes)."""
        return self._session

    @property
    def msize(self) -> int:
        """The negotiated msize."""
        return self._session.msize

    @property
    def version(self) -> str:
        """The negotiated version (``"9P2000.L"`` or ``"9P2000.u"``)."""
        return self._session.version

    @property
    def timeout(self) -> float | None:
        """Limit in seconds for each request (may be changed at any time)."""
        return self._session.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._session.timeout = value

    @property
    def flush_timeout(self) -> float:
        """Limit for each Rflush."""
        return self._session.flush_timeout

    @flush_timeout.setter
    def flush_timeout(self, value: float) -> None:
        self._session.flush_timeout = value

    @property
    def flushes_sent(self) -> int:
        """How many Tflush requests were sent."""
        return self._session.flushes_sent

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._session.closed

    @property
    def _closed(self) -> bool:
        return self._session.closed

    @property
    def _dead(self) -> TransportError | None:
        return self._session.dead

    @property
    def _root_fid(self) -> int:
        return self._session.root_fid

    @property
    def usable(self) -> bool:
        """Whether the client can still carry requests: not closed, the server
        not declared unresponsive, the transport (if it says) still connected."""
        return (
            not self._closed
            and self._dead is None
            and bool(getattr(self._transport, "connected", True))
        )

    @property
    def fid_count(self) -> int:
        """Fids currently in use, the attach root's included (1 when idle).

        Waits first for the Tclunks still in flight (those of pipelined
        operations, which return without waiting for them), giving up any
        not answered within :attr:`timeout`.
        """
        self._session.drain_clunks(self.timeout)
        return self._fids.count

    @property
    def pipelined(self) -> bool:
        """Whether compound operations are written back to back on one ring
        (see the ``pipeline`` parameter): :meth:`stat`, :meth:`lstat`,
        :meth:`exists`, :meth:`readlink`, :meth:`read_bytes` of a small
        file, the attributes of a listing's entries."""
        return self._session.pipelined

    @property
    def lost_fids(self) -> int:
        """Fids given up because a Tclunk timed out (the server may still hold them)."""
        return self._fids.lost

    @property
    def tags_in_use(self) -> int:
        """Requests currently in flight (stuck tags excluded)."""
        return self._tags.in_use

    @property
    def stuck_tags(self) -> frozenset[int]:
        """Tags never reused because not even their Tflush was answered in time."""
        return self._tags.stuck

    @property
    def default_iounit(self) -> int:
        """The I/O size used when a server announces none: ``msize - IOHDRSZ``."""
        return self.msize - c.IOHDRSZ

    def _check_open(self) -> None:
        self._session.check_open()

    def _declare_dead(self, reason: str) -> None:
        """The server answers nothing, not even a Tflush: fail everything now."""
        self._session.declare_dead(reason)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"msize={self.msize}"
        return f"<Client {self.aname or '/'!r} {state} fids={self._fids.count}>"

    def close(self) -> None:
        """Clunk every fid the client holds, close the transport if it owns it (idempotent)."""
        if not self._session.begin_close():
            return
        try:
            self._session.close(self._close_transport)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
            if self._tree_executor is not None:
                self._tree_executor.shutdown(wait=True, cancel_futures=True)
                self._tree_executor = None

    # --- requests --------------------------------------------------------------

    def rpc(self, message: c.Message, *, timeout: _TimeoutArg = _DEFAULT) -> c.Message:
        """Send any T-message and return its reply: the low-level entry point.

        The message's tag is replaced by a free one.  Fids in the message are
        the caller's business.

        :param timeout: limit in seconds (default: :attr:`timeout`)
        :returns: the successful reply
        :raises OSError: the server answered with an error
        :raises TimeoutError: no reply in time (the request was flushed; if
            not even the Tflush was answered, the message says the server is
            unresponsive, and the session is dead)
        """
        return self._rpc(
            lambda t: replace(message, tag=t), c.reply_type_for(message), None, timeout=timeout
        )

    def _rpc(
        self,
        make: Callable[[int], c.Message],
        rtype: type[_R],
        path: str | None = None,
        *,
        timeout: _TimeoutArg = _DEFAULT,
    ) -> _R:
        """``make(tag)`` sent, its reply checked: :meth:`ClientSession.rpc
        <pyxen9p.p9.session.ClientSession.rpc>` (bound to each instance by ``__init__``)."""
        return self._session.rpc(make, rtype, path, timeout=timeout)

    def _flush(self, oldtag: int) -> bool:
        """Flush *oldtag*; return whether it may be reused."""
        return self._session.flush(oldtag)

    # --- fids --------------------------------------------------------------------

    def _clunk_quiet(self, fid: int) -> None:
        """Clunk *fid* and forget it, whatever happens (errors are only logged)."""
        self._session.clunk_quiet(fid)

    def _defer_clunk(self, fid: int) -> None:
        self._session.defer_clunk(fid)

    def _process_deferred(self) -> None:
        self._session.process_deferred()

    def _walk(self, parts: Sequence[str], display: str) -> tuple[int | None, list[c.Qid]]:
        """Walk from the root through *parts* (any number) to a new fid.

        :returns: ``(fid, qids)``, or ``(None, qids)`` after a partial walk
            (``qids`` then holds the qids of the names walked)
        """
        newfid = self._fids.acquire()
        owned = True  # newfid still ours to dispose of
        bound = False
        qids: list[c.Qid] = []
        src = self._root_fid
        try:
            chunks = [tuple(parts[i : i + c.MAXWELEM]) for i in range(0, len(parts), c.MAXWELEM)]
            for names in chunks or [()]:
                make = functools.partial(c.Twalk, fid=src, newfid=newfid, wnames=names)
                reply = self._rpc(make, c.Rwalk, display)
                if len(reply.wqids) > len(names):
                    raise ProtocolError(
                        f"Rwalk has {len(reply.wqids)} qids for {len(names)} names"
                    )
                qids.extend(reply.wqids)
                if len(reply.wqids) < len(names):
                    # Partial walk.  A conforming server leaves newfid as it was
                    # (unbound after a first step); diod binds it anyway.  Clunk
                    # in every case, as Linux does.
                    owned = False
                    self._clunk_quiet(newfid)
                    return None, qids
                bound = True
                src = newfid
            owned = False
            return newfid, qids
        except BaseException as exc:
            if owned:
                owned = False
                if not bound and _is_server_error(exc):
                    self._fids.release(newfid)  # the walk failed: newfid was not bound
                else:
                    self._clunk_quiet(newfid)
            raise

    def _resolve(self, parts: list[str], display: str, follow: bool) -> tuple[int, c.Qid]:
        """Walk to *parts*, resolving symbolic links client-side; return ``(fid, qid)``."""
        for _ in range(MAXSYMLINKS + 1):
            fid, qids = self._walk(parts, display)
            limit = len(parts) if follow else len(parts) - 1
            link = next((i for i, q in enumerate(qids[:limit]) if q.type & c.QTSYMLINK), None)
            if link is None:
                if fid is None:
                    if qids and not qids[-1].type & c.QTDIR:
                        raise _local_error(errno.ENOTDIR, display)
                    raise _local_error(errno.ENOENT, display)
                return fid, (qids[-1] if qids else self.root_qid)
            if fid is not None:
                self._clunk_quiet(fid)
            target = self._readlink_parts(parts[: link + 1], display)
            base = [] if target.startswith("/") else parts[:link]
            parts = _normalize([*base, *target.split("/")]) + parts[link + 1 :]
        raise _local_error(errno.ELOOP, display)

    def _readlink_parts(self, parts: list[str], display: str) -> str:
        fid, _ = self._walk(parts, display)
        if fid is None:
            raise _local_error(errno.ENOENT, display)
        try:
            if self._dotu is not None:
                return self._dotu.readlink(fid, display)
            return self._rpc(lambda t: c.Treadlink(t, fid), c.Rreadlink, display).target
        finally:
            self._clunk_quiet(fid)

    def _lookup(self, path: PathArg, *, follow: bool = True) -> tuple[int, c.Qid, str]:
        """A new fid for *path*: ``(fid, qid, display_path)``."""
        self._check_open()
        self._process_deferred()
        display = _display(path)
        fid, qid = self._resolve(_normalize(display.split("/")), display, follow)
        return fid, qid, display

    def _lookup_parent(self, path: PathArg, root_errno: int) -> tuple[int, str, str]:
        """A new fid for the directory holding *path*: ``(dirfid, name, display_path)``."""
        self._check_open()
        self._process_deferred()
        display = _display(path)
        parts = _normalize(display.split("/"))
        if not parts:
            raise _local_error(root_errno, display)
        fid, qid = self._resolve(parts[:-1], display, True)
        if not qid.type & c.QTDIR:
            self._clunk_quiet(fid)
            raise _local_error(errno.ENOTDIR, display)
        return fid, parts[-1], display

    def _with_fid(
        self, path: PathArg, action: Callable[[int, c.Qid, str], _T], *, follow: bool = True
    ) -> _T:
        fid, qid, display = self._lookup(path, follow=follow)
        try:
            return action(fid, qid, display)
        finally:
            self._clunk_quiet(fid)

    def _with_parent(
        self, path: PathArg, root_errno: int, action: Callable[[int, str, str], _T]
    ) -> _T:
        dirfid, name, display = self._lookup_parent(path, root_errno)
        try:
            return action(dirfid, name, display)
        finally:
            self._clunk_quiet(dirfid)

    # --- pipelined compound operations ------------------------------------------

    def _start_walk_chain(
        self, display: str, parts: list[str], after: Callable[[int], Sequence[Step]]
    ) -> Chain | None:
        """Twalk from the root to a new fid, ``after(newfid)``'s steps, and a
        Tclunk of the new fid, back to back on one ring.

        :returns: the chain, or ``None`` when the path must be walked the
            sequential way (more names than one Twalk takes)
        """
        return self._start_walk_chains([(display, parts, after)])[0]

    def _start_walk_chains(
        self, items: Sequence[tuple[str, list[str], Callable[[int], Sequence[Step]]]]
    ) -> list[Chain | None]:
        """:meth:`_start_walk_chain` of each ``(display, parts, after)``, all
        sent to the transport in one batch."""
        specs: list[tuple[Sequence[Step], str | None, int | None]] = []
        fids: list[int] = []
        root_fid = self._session.root_fid
        try:
            for display, parts, after in items:  # loops, not comprehensions: no frames
                if len(parts) > c.MAXWELEM:
                    continue
                newfid = self._fids.acquire()
                fids.append(newfid)
                walk = _walk_step(root_fid, newfid, parts)
                specs.append(([walk, *after(newfid)], display, newfid))
            chains = iter(self._session.chain_many(specs) if specs else [])
        except BaseException:
            for fid in fids:
                self._fids.release(fid)  # nothing was sent
            raise
        started: list[Chain | None] = []
        for _, parts, _ in items:
            started.append(next(chains) if len(parts) <= c.MAXWELEM else None)
        return started

    def _finish_walk_chain(
        self, chain: Chain, display: str, parts: list[str], follow: bool
    ) -> tuple[list[c.Qid], list[Outcome]] | None:
        """The walk's qids and the later steps' outcomes of a chain of
        :meth:`_start_walk_chain`.

        A failure maps to the first failing step: the walk's own error, or
        ``ENOENT`` (``ENOTDIR``) for a walk that stopped short.

        :returns: ``None`` when a symbolic link is on the way (the client
            resolves links: the sequential way)
        """
        outcomes = chain.finish()
        walk = outcomes[0]
        if isinstance(walk, BaseException):
            raise walk
        assert isinstance(walk, c.Rwalk)
        qids = list(walk.wqids)
        if len(qids) > len(parts):
            raise ProtocolError(f"Rwalk has {len(qids)} qids for {len(parts)} names")
        limit = len(parts) if follow else len(parts) - 1
        for q in qids[:limit]:  # a loop, not any(): no generator frames
            if q.type & c.QTSYMLINK:
                return None
        if len(qids) < len(parts):
            if qids and not qids[-1].type & c.QTDIR:
                raise _local_error(errno.ENOTDIR, display)
            raise _local_error(errno.ENOENT, display)
        return qids, outcomes[1:]

    def _walk_chain(
        self, path: PathArg, follow: bool, after: Callable[[int], Sequence[Step]]
    ) -> tuple[str, list[c.Qid], list[Outcome]] | None:
        """:meth:`_start_walk_chain` and :meth:`_finish_walk_chain` of *path*.

        :returns: ``(display, qids, outcomes)``, or ``None``: the sequential way
        """
        session = self._session  # its methods called directly: fewer frames per operation
        session.process_deferred()  # (chain_many checks the session is open)
        display = _display(path)
        parts = _normalize(display.split("/"))
        if len(parts) > c.MAXWELEM:
            return None
        # _start_walk_chains of one path, inline (no lists of specs to go through)
        newfid = self._fids.acquire()
        try:
            walk = _walk_step(session.root_fid, newfid, parts)
            (chain,) = session.chain_many([([walk, *after(newfid)], display, newfid)])
        except BaseException:
            self._fids.release(newfid)  # nothing was sent
            raise
        got = self._finish_walk_chain(chain, display, parts, follow)
        return None if got is None else (display, *got)

    def _lookup_qid(self, path: PathArg, follow: bool) -> c.Qid:
        """The qid of *path* (a walk and a clunk, pipelined when possible)."""
        if self._session.pipelined:
            got = self._walk_chain(path, follow, lambda fid: ())
            if got is not None:
                _, qids, _ = got
                return qids[-1] if qids else self.root_qid
        fid, qid, _ = self._lookup(path, follow=follow)
        self._clunk_quiet(fid)
        return qid

    def _stat_chain(self, path: PathArg, follow: bool) -> os.stat_result | None:
        """Walk + getattr + clunk of *path* on one ring; ``None``: the sequential way."""
        got = self._walk_chain(path, follow, _getattr_step)
        if got is None:
            return None
        st: object = got[2][0]
        # the fast reader's result (the common case, no call), else _step_stat
        return st if type(st) is os.stat_result else _step_stat(st)

    def _stat_many(
        self, paths: Sequence[str], follow: bool
    ) -> list[os.stat_result | OSError | ValueError]:
        """The attributes of each of *paths* (or why not), in order.

        Pipelined: up to :attr:`batch` walk + getattr + clunk chains in
        flight, spread over the rings; otherwise one :meth:`stat` after
        another.  A failed transport is raised.
        """
        return self._each_chained(
            paths, follow, _getattr_step, _first_stat,
            lambda path: self.stat(path, follow_symlinks=follow),
        )  # fmt: skip

    def _readlink_many(self, paths: Sequence[str]) -> list[str | OSError | ValueError]:
        """The target of each of the symbolic links *paths* (or why not), in
        order: up to :attr:`batch` walk + readlink + clunk chains in flight
        when pipelined, otherwise one :meth:`readlink` after another.  A
        failed transport is raised."""
        return self._each_chained(paths, False, _readlink_step, _first_target, self.readlink)

    def _each_chained(
        self,
        paths: Sequence[str],
        follow: bool,
        after: Callable[[int], Sequence[Step]],
        result: Callable[[list[Outcome], str], _T],
        one: Callable[[str], _T],
    ) -> list[_T | OSError | ValueError]:
        """For each of *paths*, in order: ``result(outcomes, display)`` of a
        walk + ``after(fid)`` + clunk chain (the outcomes of the steps after
        the walk, the path as displayed), or why not.

        Pipelined: up to :attr:`batch` chains in flight, spread over the
        rings; a path the chain cannot take (too many names, a link on the
        way) and every path when not pipelined go through ``one(path)``.
        A failed transport is raised.
        """
        results: list[_T | OSError | ValueError] = []
        if not self._session.pipelined:
            return [_or_error(one, p) for p in paths]
        self._check_open()
        self._process_deferred()
        started: deque[tuple[str, list[str], Chain | None]] = deque()

        def settle() -> None:
            display, parts, chain = started.popleft()
            if chain is None:
                results.append(_or_error(one, display))
                return
            try:
                got = self._finish_walk_chain(chain, display, parts, follow)
                if got is None:
                    results.append(_or_error(one, display))
                    return
                results.append(result(got[1], display))
            except TransportError:
                raise
            except (OSError, ValueError) as exc:
                results.append(exc)

        batch = max(self.batch, 1)
        try:
            for at in range(0, len(paths), batch):
                items = []
                for path in paths[at : at + batch]:
                    display = _display(path)
                    items.append((display, _normalize(display.split("/")), after))
                chains = self._start_walk_chains(items)
                started.extend(
                    (display, parts, chain)
                    for (display, parts, _), chain in zip(items, chains, strict=True)
                )
                while started:
                    settle()
        finally:
            for _, _, chain in started:  # left after a failure: their fids and tags
                if chain is not None:
                    with contextlib.suppress(BaseException):
                        chain.finish()
        return results

    def _prefetch_lstat(self, entries: list[DirEntry], index: int) -> None:
        """Ask at once for the attributes of up to 256 entries of a listing
        from *index* on (wrapping around) not known yet (pipelined only)."""
        if not self._session.pipelined:
            return
        wanted: list[DirEntry] = []
        n = len(entries)
        for k in range(n):
            entry = entries[(index + k) % n]
            if entry._lstat is None:
                wanted.append(entry)
                if len(wanted) >= _PREFETCH:
                    break
        if len(wanted) < 2:
            return
        for entry, st in zip(wanted, self._stat_many([e.path for e in wanted], False), strict=True):
            if isinstance(st, os.stat_result):
                entry._lstat = st

    # --- attributes ------------------------------------------------------------

    def _getattr_fid(self, fid: int, path: str) -> os.stat_result:
        if self._dotu is not None:
            return self._dotu.getattr(fid, path)
        r = self._rpc(lambda t: c.Tgetattr(t, fid, c.P9_GETATTR_BASIC), c.Rgetattr, path)
        return _stat_result(r)

    def _fid_size(self, fid: int, path: str) -> int:
        return self._getattr_fid(fid, path).st_size

    def _setattr_fid(
        self,
        fid: int,
        path: str,
        valid: int,
        *,
        mode: int = 0,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        atime: tuple[int, int] = (0, 0),
        mtime: tuple[int, int] = (0, 0),
    ) -> None:
        for sec, _ in (atime, mtime):
            if not -(1 << 63) <= sec < 1 << 63:
                raise OverflowError(
                    f"{path}: the time {sec} s is outside the signed 64-bit seconds of 9P"
                )
        if self._dotu is not None:
            self._dotu.setattr(fid, path, valid, mode, uid, gid, size, atime, mtime)
            return
        self._rpc(
            lambda t: c.Tsetattr(t, fid, valid, mode, uid, gid, size, *atime, *mtime),
            c.Rsetattr,
            path,
        )

    def _fsync_fid(self, fid: int, path: str, datasync: bool) -> None:
        if self._dotu is not None:
            self._dotu.fsync(fid, path)
            return
        self._rpc(lambda t: c.Tfsync(t, fid, int(datasync)), c.Rfsync, path)

    def stat(self, path: PathArg = "", *, follow_symlinks: bool = True) -> os.stat_result:
        """Return the attributes of *path* as an :class:`os.stat_result`.

        ``st_ino`` is the qid path, ``st_dev`` is 0; times have nanoseconds
        (``st_mtime_ns``...), and ``st_blksize``, ``st_blocks``, ``st_rdev``
        are set.

        Pipelined (see :attr:`pipelined`): walk, getattr and clunk are
        written back to back on one ring and the call returns without
        waiting for the clunk.
        """
        if self._session.pipelined:
            st = self._stat_chain(path, follow_symlinks)
            if st is not None:
                return st
        return self._with_fid(
            path, lambda fid, _q, p: self._getattr_fid(fid, p), follow=follow_symlinks
        )

    def lstat(self, path: PathArg) -> os.stat_result:
        """:meth:`stat` without following a final symbolic link."""
        return self.stat(path, follow_symlinks=False)

    def exists(self, path: PathArg, *, follow_symlinks: bool = True) -> bool:
        """Whether *path* exists (a dangling link does not, unless not following)."""
        try:
            self._lookup_qid(path, follow_symlinks)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False
            raise
        return True

    def is_dir(self, path: PathArg) -> bool:
        """Whether *path* is a directory (following links)."""
        try:
            qid = self._lookup_qid(path, True)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return bool(qid.type & c.QTDIR)

    def is_file(self, path: PathArg) -> bool:
        """Whether *path* is a regular file (following links)."""
        try:
            return stat_module.S_ISREG(self.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def is_symlink(self, path: PathArg) -> bool:
        """Whether *path* is a symbolic link."""
        try:
            qid = self._lookup_qid(path, False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return bool(qid.type & c.QTSYMLINK)

    def chmod(self, path: PathArg, mode: int, *, follow_symlinks: bool = True) -> None:
        """Change the permission bits of *path* (``mode & 0o7777``)."""
        self._with_fid(
            path,
            lambda fid, _q, p: self._setattr_fid(fid, p, c.P9_SETATTR_MODE, mode=mode & 0o7777),
            follow=follow_symlinks,
        )

    def chown(self, path: PathArg, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """Change the owner and group of *path* (``-1`` leaves one unchanged)."""
        valid = (c.P9_SETATTR_UID if uid != -1 else 0) | (c.P9_SETATTR_GID if gid != -1 else 0)
        if not valid:
            return
        self._with_fid(
            path,
            lambda fid, _q, p: self._setattr_fid(
                fid, p, valid, uid=max(uid, 0), gid=max(gid, 0)
            ),
            follow=follow_symlinks,
        )

    def utime(
        self,
        path: PathArg,
        times: tuple[float, float] | None = None,
        *,
        ns: tuple[int, int] | None = None,
        follow_symlinks: bool = True,
    ) -> None:
        """Set the access and modification times of *path*, like :func:`os.utime`.

        With neither *times* nor *ns*, both become the server's current time.

        :param times: ``(atime, mtime)`` in seconds
        :param ns: ``(atime_ns, mtime_ns)`` in nanoseconds
        """
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        valid = c.P9_SETATTR_ATIME | c.P9_SETATTR_MTIME
        atime = mtime = (0, 0)
        if times is not None:
            atime, mtime = _ns(times[0]), _ns(times[1])
        elif ns is not None:
            atime, mtime = divmod(ns[0], 1_000_000_000), divmod(ns[1], 1_000_000_000)
        if times is not None or ns is not None:
            valid |= c.P9_SETATTR_ATIME_SET | c.P9_SETATTR_MTIME_SET
        self._with_fid(
            path,
            lambda fid, _q, p: self._setattr_fid(fid, p, valid, atime=atime, mtime=mtime),
            follow=follow_symlinks,
        )

    def truncate(self, path: PathArg, length: int) -> None:
        """Resize the file *path* to *length* bytes."""
        if length < 0:
            raise _local_error(errno.EINVAL, _display(path))
        self._with_fid(
            path, lambda fid, _q, p: self._setattr_fid(fid, p, c.P9_SETATTR_SIZE, size=length)
        )

    def statfs(self, path: PathArg = "") -> StatFS:
        """Statistics of the file system holding *path*."""

        def action(fid: int, _q: c.Qid, p: str) -> StatFS:
            if self._dotu is not None:
                raise _dotu.statfs_unsupported(p)
            r = self._rpc(lambda t: c.Tstatfs(t, fid), c.Rstatfs, p)
            return StatFS(
                r.type, r.bsize, r.blocks, r.bfree, r.bavail, r.files, r.ffree, r.fsid, r.namelen
            )

        return self._with_fid(path, action)

    # --- directories -----------------------------------------------------------

    def _readdir(self, fid: int, path: str) -> list[c.Dirent]:
        """Every entry of the directory open on *fid*, within :attr:`max_entries`.

        The offsets the server gives are opaque cookies: one that comes back
        (the same as the last, or any earlier one) would make the listing
        endless, and is a protocol error.
        """
        if self._dotu is not None:
            return self._dotu.readdir(fid, path)
        self._rpc(lambda t: c.Tlopen(t, fid, c.L_O_RDONLY), c.Rlopen, path)
        count = self.msize - c.READDIRHDRSZ
        limit = self.max_entries
        offset = 0
        seen = {offset}
        received = 0
        entries: list[c.Dirent] = []
        while True:
            make = functools.partial(c.Treaddir, fid=fid, offset=offset, count=count)
            reply = self._rpc(make, c.Rreaddir, path)
            batch = reply.entries()
            if not batch:
                return entries
            received += len(batch)
            if limit is not None and received > limit + 2:  # '.' and '..' are not counted
                raise OSError(
                    errno.EFBIG,
                    f"the directory lists more than {limit} entries (Client.max_entries)",
                    path,
                )
            if batch[-1].offset == offset:
                raise ProtocolError(f"Rreaddir for {path!r}: the offset {offset} did not advance")
            if batch[-1].offset in seen:
                raise ProtocolError(
                    f"Rreaddir for {path!r}: the offset {batch[-1].offset} came back"
                    " (the listing would never end)"
                )
            entries.extend(e for e in batch if e.name not in (".", ".."))
            offset = batch[-1].offset
            seen.add(offset)

    def scandir(self, path: PathArg = "") -> ScandirIterator:
        """Iterate over the entries of directory *path* (``.`` and ``..`` left out).

        A listing that holds a name no directory can hold (empty, ``.`` or
        ``..`` other than the two entries every listing has, or containing
        ``/`` or NUL), or the same name twice, is refused as a whole with
        :class:`~pyxen9p.p9.codec.ProtocolError` naming the entry: such a
        listing comes from a broken or hostile server, and a name like
        ``../x`` would lead a caller that joins it onto a path elsewhere.
        """

        def action(fid: int, qid: c.Qid, p: str) -> list[c.Dirent]:
            if not qid.type & c.QTDIR:
                raise _local_error(errno.ENOTDIR, p)
            return _checked_names(self._readdir(fid, p), p)

        fid, qid, display = self._lookup(path)
        try:
            dirents = action(fid, qid, display)
        finally:
            self._clunk_quiet(fid)
        entries = [DirEntry(self, display, d) for d in dirents]
        for i, entry in enumerate(entries):
            entry._siblings = entries
            entry._index = i
        return ScandirIterator(entries)

    def listdir(self, path: PathArg = "") -> list[str]:
        """The names in directory *path* (``.`` and ``..`` left out), in server order."""
        with self.scandir(path) as entries:
            return [e.name for e in entries]

    def mkdir(self, path: PathArg, mode: int = 0o777) -> None:
        """Create directory *path* (permissions ``mode & ~umask``)."""
        perm = mode & 0o7777 & ~self.umask
        if self._dotu is not None:
            dotu = self._dotu
            self._with_parent(
                path, errno.EEXIST, lambda dfid, name, p: dotu.mkdir(dfid, name, perm, p)
            )
            return
        self._with_parent(
            path,
            errno.EEXIST,
            lambda dfid, name, p: self._rpc(
                lambda t: c.Tmkdir(t, dfid, name, perm, self.gid), c.Rmkdir, p
            ),
        )

    def makedirs(self, path: PathArg, mode: int = 0o777, exist_ok: bool = False) -> None:
        """Create directory *path* and any missing parents, like :func:`os.makedirs`."""
        display = _display(path)
        parts = _normalize(display.split("/"))
        if not parts:
            if not exist_ok:
                raise _local_error(errno.EEXIST, display)
            return
        head = "/".join(parts[:-1])
        if head and not self.exists(head):
            try:
                self.makedirs(head, mode, exist_ok=True)
            except FileExistsError:
                pass  # created meanwhile
        try:
            self.mkdir("/".join(parts), mode)
        except OSError:
            if not exist_ok or not self.is_dir(display):
                raise

    def rmdir(self, path: PathArg) -> None:
        """Remove the empty directory *path* (Tunlinkat, or Tremove for servers without it)."""
        self._unlink(path, c.AT_REMOVEDIR)

    def remove(self, path: PathArg) -> None:
        """Remove the file (not directory) *path* (Tunlinkat, or Tremove for servers without it)."""
        self._unlink(path, 0)

    unlink = remove

    def _unlink(self, path: PathArg, flags: int) -> None:
        if self._has_unlinkat and self._dotu is None:

            def action(dfid: int, name: str, p: str) -> bool:
                try:
                    self._rpc(lambda t: c.Tunlinkat(t, dfid, name, flags), c.Runlinkat, p)
                except OSError as exc:
                    if exc.errno not in _FALLBACK_ERRNOS:
                        raise
                    self._has_unlinkat = False
                    return False
                return True

            if self._with_parent(path, errno.EBUSY, action):
                return
        fid, qid, display = self._lookup(path, follow=False)
        try:
            is_dir = bool(qid.type & c.QTDIR)
            if flags & c.AT_REMOVEDIR and not is_dir:
                raise _local_error(errno.ENOTDIR, display)
            if not flags & c.AT_REMOVEDIR and is_dir:
                raise _local_error(errno.EISDIR, display)
            if not _normalize(display.split("/")):
                raise _local_error(errno.EBUSY, display)
        except BaseException:
            self._clunk_quiet(fid)
            raise
        if self._dotu is not None:
            if self._dotu.has_remove:
                if self._dotu.remove(fid, display):
                    return
                # Tremove refused (xen-9pfsd): its fid is clunked; walk again
                fid, _, _ = self._lookup(path, follow=False)
            self._dotu.remove_orclose(fid, display, is_dir)
            return
        try:
            self._rpc(lambda t: c.Tremove(t, fid), c.Rremove, display)
        except (TimeoutError, TransportError):
            self._clunk_quiet(fid)
            raise
        except BaseException:
            self._fids.release(fid)  # Tremove clunks the fid even when it fails
            raise
        self._fids.release(fid)

    def rmtree(self, path: PathArg) -> None:
        """Remove the directory *path* and everything below it, like
        :func:`shutil.rmtree` (symbolic links are removed, never followed).

        The entries of each directory are removed together: one walk to the
        directory, then up to :attr:`batch` Tunlinkat requests in flight
        (spread over the rings), subdirectories first emptied the same way.
        Every entry of a directory is tried; the first failure is then raised.
        """
        display = _display(path)
        if not _normalize(display.split("/")):
            raise _local_error(errno.EBUSY, display)
        # (directory, its subdirectories' names once emptied, or None: to list)
        stack: list[tuple[str, list[str] | None]] = [(display, None)]
        while stack:
            here, subdirs = stack.pop()
            if subdirs is not None:
                self._unlink_names(here, subdirs, c.AT_REMOVEDIR)
                continue
            entries = list(self.scandir(here))
            dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
            subdir_names = set(dirs)
            others = [e.name for e in entries if e.name not in subdir_names]
            self._unlink_names(here, others, 0)
            stack.append((here, dirs))
            stack.extend((_join(here, name), None) for name in reversed(dirs))
        self.rmdir(display)

    def _unlink_names(self, directory: str, names: Sequence[str], flags: int) -> None:
        """Remove each of *names* from *directory* (Tunlinkat with *flags*),
        up to :attr:`batch` at once; every one is tried, then the first
        failure is raised."""
        if not names:
            return
        if not self._has_unlinkat or self._dotu is not None or not self._session.wire.asynchronous:
            self._each_then_raise([_join(directory, n) for n in names], flags)
            return
        dfid, qid, display = self._lookup(directory)
        failure: BaseException | None = None
        left = list(names)
        try:
            if not qid.type & c.QTDIR:
                raise _local_error(errno.ENOTDIR, display)
            started: deque[tuple[str, Chain]] = deque()

            def settle() -> None:
                nonlocal failure
                name, chain = started.popleft()
                (outcome,) = chain.finish()
                if isinstance(outcome, BaseException):
                    if isinstance(outcome, OSError) and outcome.errno in _FALLBACK_ERRNOS:
                        self._has_unlinkat = False
                        return  # left for the fallback
                    if isinstance(outcome, OSError):
                        outcome = OSError(outcome.errno, outcome.strerror, _join(display, name))
                    failure = failure or outcome
                left.remove(name)

            batch = max(self.batch, 1)
            try:
                for at in range(0, len(names), batch):
                    group = names[at : at + batch]
                    specs: list[tuple[Sequence[Step], str | None, int | None]] = [
                        ([(functools.partial(c.Tunlinkat, dirfd=dfid, name=name, flags=flags),
                           c.Runlinkat)], display, None)
                        for name in group
                    ]  # fmt: skip
                    started.extend(zip(group, self._session.chain_many(specs), strict=True))
                    while started:
                        settle()
            finally:
                for _, chain in started:
                    with contextlib.suppress(BaseException):
                        chain.finish()
        finally:
            self._clunk_quiet(dfid)
        if left and not self._has_unlinkat:
            try:
                self._each_then_raise([_join(directory, n) for n in left], flags)
            except (OSError, ValueError) as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _each_then_raise(self, paths: Sequence[str], flags: int) -> None:
        """:meth:`_unlink` each of *paths*; then raise the first failure."""
        failure: OSError | ValueError | None = None
        for p in paths:
            try:
                self._unlink(p, flags)
            except TransportError:
                raise
            except (OSError, ValueError) as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def rename(self, src: PathArg, dst: PathArg) -> None:
        """Rename *src* to *dst*, replacing *dst* if it exists (as :func:`os.rename` on POSIX).

        Uses Trenameat, or Trename for servers without it.  Over 9P2000.u
        a rename is a Twstat of the name: within one directory only
        (``EXDEV`` otherwise), and ``EOPNOTSUPP`` from a server without
        Twstat (xen-9pfsd).
        """
        if self._dotu is not None:
            dotu = self._dotu
            sparts = _normalize(_display(src).split("/"))
            dparts = _normalize(_display(dst).split("/"))
            if not sparts or not dparts:
                raise _local_error(errno.EBUSY, _display(src if not sparts else dst))
            self._with_fid(
                src, lambda fid, _q, p: dotu.rename(fid, sparts, dparts, p), follow=False
            )
            return

        def outer(odfid: int, oname: str, sp: str) -> None:
            def inner(ndfid: int, nname: str, dp: str) -> None:
                if self._has_renameat:
                    try:
                        self._rpc(
                            lambda t: c.Trenameat(t, odfid, oname, ndfid, nname), c.Rrenameat, sp
                        )
                        return
                    except OSError as exc:
                        if exc.errno not in _FALLBACK_ERRNOS:
                            raise
                        self._has_renameat = False
                self._with_fid(
                    sp,
                    lambda fid, _q, _p: self._rpc(
                        lambda t: c.Trename(t, fid, ndfid, nname), c.Rrename, sp
                    ),
                    follow=False,
                )

            self._with_parent(dst, errno.EBUSY, inner)

        self._with_parent(src, errno.EBUSY, outer)

    replace = rename

    def symlink(self, target: str, path: PathArg) -> None:
        """Create a symbolic link *path* pointing to *target* (stored as given)."""
        if self._dotu is not None:
            dotu = self._dotu
            self._with_parent(
                path, errno.EEXIST, lambda dfid, name, p: dotu.symlink(dfid, name, target, p)
            )
            return
        self._with_parent(
            path,
            errno.EEXIST,
            lambda dfid, name, p: self._rpc(
                lambda t: c.Tsymlink(t, dfid, name, target, self.gid), c.Rsymlink, p
            ),
        )

    def readlink(self, path: PathArg) -> str:
        """The target of the symbolic link *path*.

        Pipelined (see :attr:`pipelined`): walk, readlink and clunk are
        written back to back on one ring and the call returns without
        waiting for the clunk.
        """
        if self._dotu is None and self._session.pipelined:
            got = self._walk_chain(path, False, _readlink_step)
            if got is not None:
                return _step_target(got[2][0])
        if self._dotu is not None:
            dotu = self._dotu
            return self._with_fid(path, lambda fid, _q, p: dotu.readlink(fid, p), follow=False)
        return self._with_fid(
            path,
            lambda fid, _q, p: self._rpc(lambda t: c.Treadlink(t, fid), c.Rreadlink, p).target,
            follow=False,
        )

    def link(self, src: PathArg, dst: PathArg) -> None:
        """Create a hard link *dst* to the file *src* (a link *src* itself is not followed).

        9P2000.u has no hard links: ``EOPNOTSUPP``.
        """
        if self._dotu is not None:
            raise _dotu.link_unsupported(_display(dst))

        def outer(fid: int, _q: c.Qid, sp: str) -> None:
            self._with_parent(
                dst,
                errno.EEXIST,
                lambda dfid, name, p: self._rpc(lambda t: c.Tlink(t, dfid, fid, name), c.Rlink, p),
            )

        self._with_fid(src, outer, follow=False)

    def walk(
        self,
        top: PathArg = "",
        topdown: bool = True,
        onerror: Callable[[OSError], object] | None = None,
        followlinks: bool = False,
    ) -> Iterator[tuple[str, list[str], list[str]]]:
        """Walk the tree under *top* like :func:`os.walk`: ``(dirpath, dirnames, filenames)``.

        With *topdown*, the caller may prune *dirnames* in place.  A directory
        that cannot be listed is given to *onerror* (or skipped), as
        :func:`os.walk` does; a listing that breaks the protocol
        (:class:`~pyxen9p.errors.ProtocolError`) or a failed transport is
        raised, never skipped.
        """
        stack: list[str | tuple[str, list[str], list[str]]] = [_display(top)]
        while stack:
            item = stack.pop()
            if isinstance(item, tuple):
                yield item
                continue
            here = item
            try:
                entries = list(self.scandir(here))
            except (ProtocolError, TransportError):
                raise
            except OSError as exc:
                if onerror is not None:
                    onerror(exc)
                continue
            dirs: list[str] = []
            files: list[str] = []
            links: set[str] = set()
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    dirs.append(entry.name)
                    if entry.is_symlink():
                        links.add(entry.name)
                else:
                    files.append(entry.name)
            if topdown:
                yield here, dirs, files
            else:
                stack.append((here, dirs, files))
            known = {e.name for e in entries}
            for name in reversed(dirs):
                sub = _join(here, name)
                if followlinks:
                    stack.append(sub)
                elif name in known:
                    if name not in links:
                        stack.append(sub)
                elif not self.is_symlink(sub):
                    stack.append(sub)

    # --- files -----------------------------------------------------------------

    def _iounit(self, announced: int) -> int:
        limit = self.default_iounit
        return limit if announced == 0 or announced > limit else announced

    def _open_fid(self, path: PathArg, mode: OpenMode, perm: int) -> tuple[int, c.Qid, int, str]:
        """Open (or create) *path*: ``(fid, qid, iounit, display)``."""
        flags = mode.flags
        if mode.creating:
            return self._create(path, flags, perm)
        try:
            fid, qid, display = self._lookup(path)
        except FileNotFoundError:
            if not mode.may_create:
                raise
            return self._create(path, flags, perm)
        try:
            if qid.type & c.QTDIR:
                raise _local_error(errno.EISDIR, display)
            rqid, announced = self._open_existing(fid, flags, display)
        except BaseException:
            self._clunk_quiet(fid)
            raise
        return fid, rqid, self._iounit(announced), display

    def _open_existing(self, fid: int, flags: int, path: str) -> tuple[c.Qid, int]:
        """Open *fid* with the ``L_O_*`` *flags* (Tlopen, or Topen over 9P2000.u).

        :returns: ``(qid, iounit announced)``
        """
        if self._dotu is not None:
            return self._dotu.open(fid, flags, path)
        reply = self._rpc(
            lambda t: c.Tlopen(t, fid, flags & ~(c.L_O_CREAT | c.L_O_EXCL)), c.Rlopen, path
        )
        return reply.qid, reply.iounit

    def _create(self, path: PathArg, flags: int, perm: int) -> tuple[int, c.Qid, int, str]:
        dfid, name, display = self._lookup_parent(path, errno.EISDIR)
        try:
            if self._dotu is not None:
                qid, iounit = self._dotu.create(dfid, name, flags, perm, display)
                return dfid, qid, self._iounit(iounit), display  # dfid now is the file
            reply = self._rpc(
                lambda t: c.Tlcreate(t, dfid, name, flags, perm, self.gid), c.Rlcreate, display
            )
        except BaseException:
            self._clunk_quiet(dfid)
            raise
        return dfid, reply.qid, self._iounit(reply.iounit), display  # dfid now is the file

    @overload
    def open(
        self,
        path: PathArg,
        mode: OpenTextMode = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        *,
        perm: int = 0o666,
    ) -> io.TextIOWrapper: ...

    @overload
    def open(  # type: ignore[overload-overlap]
        self,
        path: PathArg,
        mode: OpenBinaryMode,
        buffering: Literal[0],
        encoding: None = None,
        errors: None = None,
        newline: None = None,
        *,
        perm: int = 0o666,
    ) -> RemoteFileIO: ...

    @overload
    def open(
        self,
        path: PathArg,
        mode: OpenBinaryModeUpdating,
        buffering: Literal[-1, 1] = -1,
        encoding: None = None,
        errors: None = None,
        newline: None = None,
        *,
        perm: int = 0o666,
    ) -> io.BufferedRandom: ...

    @overload
    def open(
        self,
        path: PathArg,
        mode: OpenBinaryModeWriting,
        buffering: Literal[-1, 1] = -1,
        encoding: None = None,
        errors: None = None,
        newline: None = None,
        *,
        perm: int = 0o666,
    ) -> io.BufferedWriter: ...

    @overload
    def open(
        self,
        path: PathArg,
        mode: OpenBinaryModeReading,
        buffering: Literal[-1, 1] = -1,
        encoding: None = None,
        errors: None = None,
        newline: None = None,
        *,
        perm: int = 0o666,
    ) -> io.BufferedReader: ...

    @overload
    def open(
        self,
        path: PathArg,
        mode: str,
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        *,
        perm: int = 0o666,
    ) -> IO[Any]: ...

    def open(
        self,
        path: PathArg,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        *,
        perm: int = 0o666,
    ) -> Any:
        """Open the file *path* like :func:`builtins.open`.

        Returns the same layers: a :class:`~pyxen9p.p9.files.RemoteFileIO`
        (``buffering=0``, binary only), wrapped in :class:`io.BufferedReader`,
        :class:`io.BufferedWriter` or :class:`io.BufferedRandom`, and in an
        :class:`io.TextIOWrapper` for text modes.  Modes ``r w x a + b t``.
        The default buffer size is the fid's I/O unit.

        :param perm: permissions of a created file (``perm & ~umask``)
        """
        parsed = parse_mode(mode)
        if parsed.binary:
            if encoding is not None:
                raise ValueError("binary mode doesn't take an encoding argument")
            if errors is not None:
                raise ValueError("binary mode doesn't take an errors argument")
            if newline is not None:
                raise ValueError("binary mode doesn't take a newline argument")
        if buffering == 0 and not parsed.binary:
            raise ValueError("can't have unbuffered text I/O")
        fid, qid, iounit, display = self._open_fid(
            path, parsed, perm & 0o7777 & ~self.umask
        )
        position = 0
        if parsed.appending:
            try:
                position = self._fid_size(fid, display)
            except BaseException:
                self._clunk_quiet(fid)
                raise
        raw = RemoteFileIO(
            self, fid, name=display, mode=parsed, iounit=iounit, qid=qid, position=position
        )
        try:
            line_buffering = buffering == 1
            if buffering == 1 or buffering < 0:
                buffering = max(iounit, io.DEFAULT_BUFFER_SIZE)
            if buffering == 0:
                return raw
            buffer: io.BufferedIOBase
            if parsed.updating:
                buffer = io.BufferedRandom(raw, buffering)
            elif parsed.writing:
                buffer = io.BufferedWriter(raw, buffering)
            else:
                buffer = io.BufferedReader(raw, buffering)
            if parsed.binary:
                return buffer
            text = io.TextIOWrapper(buffer, encoding, errors, newline, line_buffering)
            text.mode = mode  # type: ignore[misc]
            return text
        except BaseException:
            raw.close()
            raise

    def read_bytes(self, path: PathArg) -> bytes:
        """The whole content of file *path*.

        Pipelined (see :attr:`pipelined`), a small file costs one wait: walk,
        getattr, open, a read of one I/O unit and the clunk are written back
        to back on one ring (a file larger than the read is then read the
        usual way).

        :raises OSError: ``EFBIG``: more than :attr:`max_read` bytes
        """
        if self._session.pipelined:
            data = self._read_small(path)
            if data is not None:
                return data
        with self.open(path, "rb") as f:
            return f.read()

    def _read_small(self, path: PathArg) -> bytes | None:
        """The whole of *path* in one chain, or ``None`` (larger than one
        read, not a regular file, or links on the way: the usual way)."""
        count = self.default_iounit
        got = self._walk_chain(path, True, _small_steps(count))
        if got is None:
            return None
        display, qids, outcomes = got
        if (qids[-1] if qids else self.root_qid).type & c.QTDIR:
            raise _local_error(errno.EISDIR, display)
        small = self._small_file(outcomes, display)
        return None if small is None else small[1]

    def _small_file(
        self, outcomes: list[Outcome], display: str
    ) -> tuple[os.stat_result, bytes] | None:
        """The attributes and whole content of a chain of :func:`_small_steps`
        (its outcomes after the walk), or ``None`` when it did not read the
        whole of a regular file (larger than one read, or not a regular
        file: the usual way).

        :raises: the first failing step's error; :class:`ProtocolError` for
            an Rread longer than asked; ``EFBIG`` beyond :attr:`max_read`
        """
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        attr, _, read = outcomes
        assert isinstance(read, c.Rread)
        count = self.default_iounit
        if len(read.data) > count:
            raise ProtocolError(f"Rread of {len(read.data)} bytes for a Tread of {count}")
        st = _step_stat(attr)
        if self.max_read is not None and st.st_size > self.max_read:
            raise self._read_limit_error(
                display, self.max_read, f"the file has {st.st_size} bytes:"
            )
        if (
            not stat_module.S_ISREG(st.st_mode)
            or len(read.data) != st.st_size
            or len(read.data) == count  # a full read: the end is not proven
        ):
            return None
        return st, read.data

    def _read_small_many(
        self, paths: Sequence[str]
    ) -> list[tuple[os.stat_result, bytes] | OSError | ValueError | None]:
        """:meth:`_small_file` of each of *paths* (or why not), in order: up
        to :attr:`batch` chains in flight (pipelined only; else, and for a
        path with a link on the way or too many names, ``None``: the usual
        way).  A failed transport is raised."""
        return self._each_chained(
            paths, True, _small_steps(self.default_iounit), self._small_file, lambda _: None
        )

    def write_bytes(self, path: PathArg, data: bytes | bytearray | memoryview) -> int:
        """Create or truncate file *path* and write *data*; return its length."""
        with memoryview(data) as view, self.open(path, "wb") as f:
            f.write(view)
            return view.nbytes

    def read_text(
        self, path: PathArg, encoding: str | None = None, errors: str | None = None
    ) -> str:
        """The whole content of file *path*, decoded.

        :raises OSError: ``EFBIG``: more than :attr:`max_read` bytes
        """
        with self.open(path, "r", encoding=encoding, errors=errors) as f:
            return f.read()

    def write_text(
        self,
        path: PathArg,
        data: str,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> int:
        """Create or truncate file *path* and write the text *data*; return its length."""
        if not isinstance(data, str):
            raise TypeError(f"data must be str, not {type(data).__name__}")
        with self.open(path, "w", encoding=encoding, errors=errors, newline=newline) as f:
            return f.write(data)

    # --- data transfer ---------------------------------------------------------

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.window, thread_name_prefix="pyxen9p-io"
                )
            return self._executor

    def _parallel(self, tasks: Sequence[Callable[[], _T]], *, new_fids: bool = False) -> list[_T]:
        """Run *tasks* with up to :attr:`window` in flight; results in order.

        Waits for every task even when one fails (so none still uses a fid
        the caller is about to clunk), then raises the first failure.

        :param new_fids: each task walks to a fid of its own: over 9P2000.u
            (whose servers may count every fid against a small limit) they
            then run one after another
        """
        if len(tasks) == 1 or self.window == 1 or (new_fids and self._dotu is not None):
            return [task() for task in tasks]
        executor = self._get_executor()
        futures: list[Future[_T]] = [executor.submit(task) for task in tasks]
        try:
            wait_futures(futures)
        except BaseException:
            for future in futures:
                future.cancel()
            wait_futures(futures)
            raise
        return [future.result() for future in futures]

    def _read_limit_error(self, path: str, limit: int, what: str) -> OSError:
        """The error of a read that would take more than *limit* bytes."""
        return OSError(
            errno.EFBIG, f"{what} more than {limit} bytes (Client.max_read)", path
        )

    def _read_at(self, fid: int, offset: int, count: int, path: str) -> bytes:
        reply = self._rpc(lambda t: c.Tread(t, fid, offset, count), c.Rread, path)
        if len(reply.data) > count:
            raise ProtocolError(f"Rread of {len(reply.data)} bytes for a Tread of {count}")
        return reply.data

    def _write_at(self, fid: int, offset: int, data: memoryview, path: str) -> int:
        # header and payload go as two pieces: the payload is copied once,
        # into the ring (or the joined message, for a transport without pieces)
        return self._session.write_from(fid, offset, data, path)

    def _pread_chunks(
        self, fid: int, offset: int, n: int, iounit: int, path: str
    ) -> list[bytes]:
        """Read *n* bytes at *offset* in I/O-unit chunks kept in flight together.

        :returns: the chunks in order, up to and including the first short one
        """
        if n <= iounit:
            return [self._read_at(fid, offset, n, path)]
        spans = [(o, min(iounit, n - o)) for o in range(0, n, iounit)]
        results = self._parallel(
            [functools.partial(self._read_at, fid, offset + o, k, path) for o, k in spans]
        )
        chunks: list[bytes] = []
        for (_, k), data in zip(spans, results, strict=True):
            chunks.append(data)
            if len(data) < k:
                break
        return chunks

    def _pread_into(self, fid: int, offset: int, mv: memoryview, iounit: int, path: str) -> int:
        """Read into *mv* at *offset*; return the byte count (short at EOF).

        At most :attr:`window` I/O units are asked for at once (the caller
        reads on), all in flight together; each reply's data goes straight
        into its part of *mv* (see :meth:`ClientSession.read_many_into
        <pyxen9p.p9.session.ClientSession.read_many_into>`).
        """
        n = min(mv.nbytes, iounit * self.window)
        spans = [(o, min(iounit, n - o)) for o in range(0, n, iounit)]
        counts = self._read_spans(fid, [(offset + o, mv[o : o + k]) for o, k in spans], path)
        total = 0
        for (_, k), got in zip(spans, counts, strict=True):
            total += got
            if got < k:
                break
        return total

    def _read_spans(self, fid: int, spans: list[tuple[int, memoryview]], path: str) -> list[int]:
        """Tread into each ``(offset, buffer)`` of *spans*, all in flight: the byte counts."""
        if len(spans) > 1 and not self._session.wire.asynchronous:
            # FALLBACK (a transport with request() only): a thread per request in flight
            read = self._session.read_into
            return self._parallel([functools.partial(read, fid, o, mv, path) for o, mv in spans])
        return self._session.read_many_into(fid, spans, path)

    def _pwrite_from(
        self, fid: int, offset: int, mv: memoryview, iounit: int, path: str, *, parallel: bool
    ) -> int:
        """Write *mv* at *offset*; return the byte count (short if the server wrote less)."""
        n = mv.nbytes
        spans = [(o, min(iounit, n - o)) for o in range(0, n, iounit)]
        total = 0
        if not parallel or len(spans) == 1:
            for o, k in spans:
                w = self._write_at(fid, offset + o, mv[o : o + k], path)
                total += w
                if w < k:
                    break
            return total
        if self._session.wire.asynchronous:
            # all in flight from this thread, as reads are
            results = self._session.write_many_from(
                fid, [(offset + o, mv[o : o + k]) for o, k in spans], path
            )
        else:
            # FALLBACK (a transport with request() only): a thread per request in flight
            results = self._parallel(
                [functools.partial(self._write_at, fid, offset + o, mv[o : o + k], path)
                 for o, k in spans]
            )
        for (_, k), w in zip(spans, results, strict=True):
            total += w
            if w < k:
                break
        return total

    def _download(
        self,
        fid: int,
        iounit: int,
        path: str,
        out: BinaryIO,
        progress: _Progress,
        size: int | None = None,
    ) -> int:
        """Copy an open fid's data to *out* with a window of Treads in flight.

        :param size: the file's size, if known: a short read ending there is
            the end of the file (else only an empty read is); the data may run
            past it by at most :attr:`max_read` bytes (a file that grows while
            it is copied), else ``EFBIG``
        """
        limit = None if size is None or self.max_read is None else size + self.max_read
        depth = 2 * self.window
        # as many Treads at once as the size known needs (a small file: one),
        # at most 2 * window; their data put straight into one buffer
        chunks = depth if size is None else max(1, min(depth, -(-size // iounit)))
        buffer = memoryview(bytearray(iounit * chunks))
        offset = done = 0
        ahead = chunks
        crossed = False  # read past the size known: the file grew, or ends there
        while True:
            if size is not None and offset < size:
                ahead = max(1, min(chunks, -(-(size - offset) // iounit)))
            elif size is not None and not crossed:
                crossed, ahead = True, 1
            spans = [(offset + i * iounit, buffer[i * iounit : (i + 1) * iounit])
                     for i in range(ahead)]
            counts = self._read_spans(fid, spans, path)
            short = False
            for (at, view), got in zip(spans, counts, strict=True):
                if limit is not None and done + got > limit:
                    assert size is not None and self.max_read is not None
                    raise self._read_limit_error(
                        path, self.max_read, f"the file grew past its size ({size}) by"
                    )
                if got:
                    out.write(view[:got])
                    done += got
                    progress.add(got)
                offset = at + got
                if got < iounit:
                    # a short read is the end of the file only when a read returns
                    # nothing, or when it ends where the file was known to end;
                    # the reads sent past it are ignored (read on from its end)
                    if got == 0 or (size is not None and offset >= size):
                        return done
                    short = True
                    break
            ahead = 1 if short else min(2 * ahead, chunks)

    def _upload(
        self, fid: int, iounit: int, path: str, src: BinaryIO, progress: _Progress
    ) -> int:
        """Copy *src* to an open fid with a window of Twrites in flight."""
        executor = self._get_executor()
        depth = 2 * self.window
        inflight: deque[tuple[Future[int], int, memoryview]] = deque()
        offset = done = 0
        eof = False

        def settle(future: Future[int], at: int, chunk: memoryview) -> None:
            nonlocal done
            written = future.result()
            while written < chunk.nbytes:  # short write: send the rest in order
                more = self._write_at(fid, at + written, chunk[written:], path)
                if more == 0:
                    raise _local_error(errno.EIO, path)
                written += more
            done += chunk.nbytes
            progress.add(chunk.nbytes)

        try:
            while True:
                while not eof and len(inflight) < depth:
                    chunk = src.read(iounit)
                    if not chunk:
                        eof = True
                        break
                    view = memoryview(chunk)
                    inflight.append((executor.submit(self._write_at, fid, offset, view, path),
                                     offset, view))
                    offset += len(chunk)
                if not inflight:
                    return done
                settle(*inflight.popleft())
        except BaseException:
            for future, _, _ in inflight:
                future.cancel()
            wait_futures([f for f, _, _ in inflight])
            raise

    def copy_out(
        self,
        remote: PathArg,
        local: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
        preserve: bool = True,
        no_clobber: bool = False,
        on_error: ErrorCallback | None = None,
    ) -> int:
        """Copy the file or tree *remote* to the local path *local*.

        A directory is copied recursively (existing local directories are
        reused, files replaced, symbolic links recreated as links).  Large
        files keep :attr:`window` Treads in flight; when :attr:`pipelined`,
        a directory's files smaller than one read are read whole, up to
        :attr:`batch` walk + getattr + open + read + clunk chains in flight
        at once (one that did not read a whole regular file is copied the
        usual way).

        What the server lists is not trusted.  A listing with a name that no
        directory can hold, or with a name twice, is refused
        (:meth:`scandir`).  Everything below *local* is created through
        directory descriptors, one validated name at a time, and nothing
        written follows a symbolic link: a file is written under a temporary
        name in its directory (created exclusively, never through a link) and
        renamed over the final name once complete, so that an existing local
        link is replaced, not written through, and a failed or interrupted
        copy (:class:`KeyboardInterrupt` too) leaves the final name as it was;
        an existing local link where a directory goes is refused, not
        followed; links are created after the files and directories of their
        directory, and never replace a directory.  Fifos, sockets and device
        files are skipped with a warning (logged), never opened.

        :param progress: called as ``progress(bytes_done, bytes_total)`` after
            each chunk
        :param preserve: copy the permission bits and the times (a mode bit
            the local system does not keep, such as set-group-ID, is reported
            with a logged warning)
        :param no_clobber: never replace an existing local file or link (it is
            left as it is; checked again atomically when the copy is complete)
        :param on_error: a tree copy goes on after an entry that fails (as
            ``cp -r`` does) and passes each failure to ``on_error(exc)``;
            without it, :class:`CopyError` listing every failure is raised at
            the end.  A failed transport ends the copy at once.
        :returns: the number of bytes copied
        :raises CopyError: entries of a tree that could not be copied
        """
        rpath = _display(remote)
        lpath = os.fspath(local)
        top = self.stat(rpath)
        if not stat_module.S_ISDIR(top.st_mode):
            parent, name = os.path.split(lpath)
            if not name:  # "dir/": only a directory can be meant
                raise _local_error(
                    errno.EISDIR if os.path.isdir(lpath) else errno.ENOTDIR, lpath
                )
            state = _Progress(top.st_size, progress)
            try:
                dfd = os.open(parent or ".", _DIR_FLAGS)
            except OSError as exc:
                raise _relabel(exc, lpath) from None
            try:
                self._copy_file_out(rpath, dfd, name, lpath, state, preserve, no_clobber)
            finally:
                os.close(dfd)
            return state.done
        errors: list[OSError | ValueError] = []
        failed = _failure_handler(on_error, errors)
        tree, total = self._scan_remote(rpath, lpath, top if preserve else None, failed)
        state = _Progress(total, progress)
        os.makedirs(lpath, exist_ok=True)
        topfd = os.open(lpath, _DIR_FLAGS)
        self._write_tree_out(tree, topfd, state, preserve, no_clobber, failed)
        if progress is not None and total == 0:
            progress(0, 0)
        if errors:
            raise CopyError(errors)
        return state.done

    def _scan_remote(
        self,
        rpath: str,
        lpath: str,
        top: os.stat_result | None,
        failed: Callable[[OSError | ValueError], None],
    ) -> tuple[_CopyDir, int]:
        """The remote tree *rpath* (directory attributes only if *top* is given), bytes."""
        root = _CopyDir(rpath, lpath, "", top)
        total = 0
        stack = [root]
        while stack:
            here = stack.pop()
            try:
                entries = list(self.scandir(here.src))
            except (OSError, ValueError) as exc:
                failed(exc)
                continue
            for entry in entries:
                lsub = os.path.join(here.dst, entry.name)
                try:
                    if entry.is_symlink():
                        here.links.append((entry.name, entry.path, lsub))
                    elif entry.is_dir(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False) if top is not None else None
                        sub = _CopyDir(entry.path, lsub, entry.name, st)
                        here.subdirs.append(sub)
                        stack.append(sub)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        here.files.append((entry.name, entry.path, lsub, st))
                        total += st.st_size
                    else:
                        kind = _kind(entry.stat(follow_symlinks=False).st_mode)
                        log.warning("copy_out: skipping %s (%s)", entry.path, kind)
                except (OSError, ValueError) as exc:
                    failed(exc)
        return root, total

    def _write_tree_out(
        self,
        top: _CopyDir,
        topfd: int,
        progress: _Progress,
        preserve: bool,
        no_clobber: bool,
        failed: Callable[[OSError | ValueError], None],
    ) -> None:
        """Write the scanned tree *top* into the local directory *topfd* (closed after).

        Depth first, one directory descriptor open per level: a directory's
        files, then its subdirectories, then its links, then its attributes.
        """
        fds = [topfd]
        stack: list[tuple[str, _CopyDir, int]] = [("fill", top, topfd)]
        try:
            while stack:
                action, here, fd = stack.pop()
                if action == "open":
                    try:
                        fd = _local_subdir(fd, here.name, here.dst, preserve)
                    except OSError as exc:
                        failed(exc)
                        continue
                    fds.append(fd)
                    action = "fill"
                if action == "fill":
                    batch = max(self.batch, 1)
                    for at in range(0, len(here.files), batch):
                        files = here.files[at : at + batch]
                        # small files read whole, a batch of chains at once
                        small = self._prefetch_small(files, fd, no_clobber)
                        for name, rsub, lsub, _ in files:
                            try:
                                got = small.get(name)
                                if got is not None:
                                    self._write_local(
                                        fd, name, lsub, got[0], preserve, no_clobber,
                                        functools.partial(_write_data, got[1], progress),
                                    )  # fmt: skip
                                    continue
                                self._copy_file_out(
                                    rsub, fd, name, lsub, progress, preserve, no_clobber
                                )
                            except (OSError, ValueError) as exc:
                                failed(exc)
                    stack.append(("close", here, fd))
                    stack.extend(("open", sub, fd) for sub in reversed(here.subdirs))
                    continue
                for name, rsub, lsub in here.links:
                    try:
                        self._copy_link_out(rsub, fd, name, lsub, no_clobber)
                    except (OSError, ValueError) as exc:
                        failed(exc)
                if preserve and here.st is not None:
                    try:
                        _preserve_local(fd, here.st, here.dst)
                    except OSError as exc:
                        failed(exc)
                fds.remove(fd)
                os.close(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def _prefetch_small(
        self,
        files: list[tuple[str, str, str, os.stat_result]],
        dfd: int,
        no_clobber: bool,
    ) -> dict[str, tuple[os.stat_result, bytes]]:
        """The attributes and data of the files of *files* (scanned smaller
        than one read, and not kept by *no_clobber*) that a chain read whole,
        by name; the others, and those it could not read (an error, a size
        that changed, not a regular file any more), are left to
        :meth:`_copy_file_out`.  A failed transport is raised."""
        count = self.default_iounit
        wanted = [
            (name, rsub)
            for name, rsub, _, st in files
            if st.st_size < count and not (no_clobber and _local_exists(dfd, name))
        ]
        if not wanted or not self._session.pipelined:
            return {}
        read = self._read_small_many([rsub for _, rsub in wanted])
        return {
            name: got for (name, _), got in zip(wanted, read, strict=True)
            if isinstance(got, tuple)
        }  # fmt: skip

    def _write_local(
        self,
        dfd: int,
        name: str,
        lpath: str,
        st: os.stat_result,
        preserve: bool,
        no_clobber: bool,
        fill: Callable[[BinaryIO], object],
    ) -> None:
        """Write *name* in the local directory *dfd* (*lpath* in messages):
        ``fill(out)`` writes the data into a new temporary file, which gets
        *st*'s permission bits and times (*preserve*) and is renamed to
        *name* when complete (removed after a failure; with *no_clobber*,
        never over an existing name, checked atomically then)."""
        tmp, fd = _local_temporary(dfd, name, lpath, 0o600 if preserve else 0o666)
        try:
            with open(fd, "wb", closefd=True) as out:
                fill(cast(BinaryIO, out))
                out.flush()
                if preserve:
                    _preserve_local(fd, st, lpath)
            _local_commit(dfd, tmp, name, lpath, no_clobber)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise

    def _copy_file_out(
        self,
        rpath: str,
        dfd: int,
        name: str,
        lpath: str,
        progress: _Progress,
        preserve: bool,
        no_clobber: bool,
    ) -> None:
        """Copy the remote regular file *rpath* to *name* in the local directory *dfd*.

        The data goes to a new temporary file in *dfd*, renamed to *name*
        when complete (removed after a failure); *lpath* names the
        destination in messages.
        """
        fid, _, display = self._lookup(rpath)
        try:
            st = self._getattr_fid(fid, display)
            if not stat_module.S_ISREG(st.st_mode):  # checked before opening it
                log.warning("copy_out: skipping %s (%s)", display, _kind(st.st_mode))
                return
            if no_clobber and _local_exists(dfd, name):
                log.info("copy_out: not replacing %s", lpath)
                return
            _, announced = self._open_existing(fid, c.L_O_RDONLY, display)
            iounit = self._iounit(announced)
            self._write_local(
                dfd, name, lpath, st, preserve, no_clobber,
                lambda out: self._download(fid, iounit, display, out, progress, st.st_size),
            )  # fmt: skip
        finally:
            self._clunk_quiet(fid)

    def _copy_link_out(
        self, rpath: str, dfd: int, name: str, lpath: str, no_clobber: bool
    ) -> None:
        """Recreate the remote symbolic link *rpath* as *name* in the local directory *dfd*."""
        target = self.readlink(rpath)
        if not target or "\0" in target:
            raise ProtocolError(f"Rreadlink for {rpath!r}: the target {target!r} is not a path")
        try:
            old: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        if old is not None and no_clobber:
            log.info("copy_out: not replacing %s", lpath)
            return
        if old is not None and stat_module.S_ISDIR(old.st_mode):
            raise OSError(errno.EISDIR, "Is a directory (not replaced by a symbolic link)", lpath)
        if old is None:
            try:
                os.symlink(target, name, dir_fd=dfd)
                return
            except FileExistsError:
                if no_clobber:
                    log.info("copy_out: not replacing %s", lpath)
                    return
            except OSError as exc:
                raise _relabel(exc, lpath) from None
        tmp = _local_temporary_link(dfd, name, lpath, target)
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # never replaces a directory
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise _relabel(exc, lpath) from None

    def copy_in(
        self,
        local: str | os.PathLike[str],
        remote: PathArg,
        *,
        progress: ProgressCallback | None = None,
        preserve: bool = True,
        no_clobber: bool = False,
        on_error: ErrorCallback | None = None,
    ) -> int:
        """Copy the local file or tree *local* to *remote*.

        A directory is copied recursively (existing remote directories are
        reused, files overwritten, symbolic links recreated as links, after
        the files of their directory).  Fifos, sockets and device files are
        skipped with a logged warning, never opened (a file is opened without
        blocking, and copied only if it is a regular file).  Large files keep
        :attr:`window` Twrites in flight.

        :param progress: called as ``progress(bytes_done, bytes_total)`` after
            each chunk
        :param preserve: copy the permission bits and the times; when the
            bits include set-user-ID, set-group-ID or sticky, the result is
            read back and bits the server dropped (a confined server drops
            set-user-ID) are reported with a logged warning
        :param no_clobber: never replace an existing remote file or link
            (files are created with ``O_EXCL``)
        :param on_error: a tree copy goes on after an entry that fails and
            passes each failure to ``on_error(exc)``; without it,
            :class:`CopyError` listing every failure is raised at the end.  A
            failed transport ends the copy at once.
        :returns: the number of bytes copied
        :raises CopyError: entries of a tree that could not be copied
        """
        lpath = os.fspath(local)
        rpath = _display(remote)
        top = os.stat(lpath)
        if not stat_module.S_ISDIR(top.st_mode):
            if rpath.endswith("/"):  # "dir/": only a directory can be meant
                raise _local_error(errno.EISDIR if self.is_dir(rpath) else errno.ENOTDIR, rpath)
            state = _Progress(top.st_size, progress)
            self._copy_file_in(lpath, rpath, state, preserve, no_clobber, follow=True)
            return state.done
        errors: list[OSError | ValueError] = []
        failed = _failure_handler(on_error, errors)
        tree, total = _scan_local(lpath, rpath, top, failed)
        state = _Progress(total, progress)
        self.makedirs(rpath, exist_ok=True)
        stack: list[tuple[_CopyDir, bool]] = [(tree, True)]
        while stack:
            here, enter = stack.pop()
            if enter:
                if here is not tree:
                    try:
                        self.makedirs(here.dst, exist_ok=True)
                    except FileExistsError:  # and not a directory
                        why = "Not a directory (not replaced)"
                        failed(_local_error(errno.ENOTDIR, here.dst, why))
                        continue
                    except (OSError, ValueError) as exc:
                        failed(exc)
                        continue
                for failure in self._copy_files_in(here.files, state, preserve, no_clobber):
                    failed(failure)
                stack.append((here, False))
                stack.extend((sub, True) for sub in reversed(here.subdirs))
                continue
            for _, lsub, rsub in here.links:
                try:
                    self._copy_link_in(lsub, rsub, no_clobber)
                except (OSError, ValueError) as exc:
                    failed(exc)
            if preserve and here.st is not None:
                try:
                    self._with_fid(here.dst, functools.partial(self._set_preserved, st=here.st))
                except (OSError, ValueError) as exc:
                    failed(exc)
        if progress is not None and total == 0:
            progress(0, 0)
        if errors:
            raise CopyError(errors)
        return state.done

    def _copy_files_in(
        self,
        files: Sequence[tuple[str, str, str, os.stat_result]],
        progress: _Progress,
        preserve: bool,
        no_clobber: bool,
    ) -> list[OSError | ValueError]:
        """Copy the local *files* of one directory, up to :attr:`tree_workers`
        at once: the failures, in the files' order.

        Every copy started is waited for; an exception other than an
        :class:`OSError` or :class:`ValueError` is raised after that.
        """

        def one(lsub: str, rsub: str, clobber: bool = no_clobber) -> OSError | ValueError | None:
            try:
                self._copy_file_in(lsub, rsub, progress, preserve, clobber, follow=False)
            except (OSError, ValueError) as exc:
                return exc
            return None

        outcomes: list[OSError | ValueError | None] = [None] * len(files)
        todo = list(range(len(files)))
        if self._session.pipelined and len(files) > 1:
            todo = self._create_many_small(files, outcomes, progress, preserve, no_clobber)
        if not todo:
            pass
        elif len(todo) < 2 or self.tree_workers < 2 or self._dotu is not None:
            # one at a time: over 9P2000.u a server may count every fid
            for i in todo:
                outcomes[i] = one(files[i][1], files[i][2])
        else:
            with self._lock:
                self._check_open()
                if self._tree_executor is None:
                    self._tree_executor = ThreadPoolExecutor(
                        max_workers=self.tree_workers, thread_name_prefix="pyxen9p-tree"
                    )
                executor = self._tree_executor
            futures = [executor.submit(one, files[i][1], files[i][2]) for i in todo]
            try:
                wait_futures(futures)
            except BaseException:
                for future in futures:
                    future.cancel()
                wait_futures(futures)
                raise
            for i, future in zip(todo, futures, strict=True):
                outcomes[i] = future.result()
        return [exc for exc in outcomes if exc is not None]

    def _create_many_small(
        self,
        files: Sequence[tuple[str, str, str, os.stat_result]],
        outcomes: list[OSError | ValueError | None],
        progress: _Progress,
        preserve: bool,
        no_clobber: bool,
    ) -> list[int]:
        """Create the small new files of *files* with :meth:`_create_small`'s
        chains, up to :attr:`batch` sent at once, from this thread.

        :returns: the indices left to copy the usual way (failures are put in
            *outcomes*)
        """
        rest: list[int] = []
        small: list[tuple[int, bytes, tuple[str, list[str], Callable[[int], Sequence[Step]]]]] = []
        for i, (_, lsub, rsub, _) in enumerate(files):
            try:
                local = _read_local_small(lsub, self.default_iounit)
            except (OSError, ValueError) as exc:
                outcomes[i] = exc
                continue
            if local == "skip":
                continue
            if local is None:
                rest.append(i)
                continue
            st, data = local
            perm = stat_module.S_IMODE(st.st_mode) if preserve else 0o666 & ~self.umask
            plan = self._create_plan(rsub, data, perm, st if preserve else None)
            if plan is None:
                rest.append(i)
            else:
                small.append((i, data, plan))
        self._check_open()
        self._process_deferred()
        batch = max(self.batch, 1)
        again: list[int] = []
        for at in range(0, len(small), batch):
            group = small[at : at + batch]
            chains = self._start_walk_chains([plan for _, _, plan in group])
            finished = 0
            try:
                for (i, data, plan), chain in zip(group, chains, strict=True):
                    finished += 1
                    try:
                        done = (
                            None if chain is None
                            else self._create_outcome(chain, plan, data, no_clobber, progress)
                        )
                    except TransportError:
                        raise
                    except (OSError, ValueError) as exc:
                        outcomes[i] = exc
                        continue
                    if done == "overwrite":
                        again.append(i)
                    elif done is None:
                        rest.append(i)
            finally:
                for chain in chains[finished:]:  # after a failure: their fids and tags
                    if chain is not None:
                        with contextlib.suppress(BaseException):
                            chain.finish()
        for i in again:  # written short: the file just created, written again
            try:
                self._copy_file_in(files[i][1], files[i][2], progress, preserve, False,
                                   follow=False)
            except (OSError, ValueError) as exc:
                outcomes[i] = exc
        return sorted(rest)

    def _set_preserved(
        self, fid: int, _qid: c.Qid | None, path: str, *, st: os.stat_result
    ) -> None:
        """Give *fid* the permission bits and times of the local *st*.

        Set-user-ID, set-group-ID and sticky bits are checked afterwards: one
        the server dropped is reported with a logged warning.
        """
        mode = stat_module.S_IMODE(st.st_mode)
        try:
            self._setattr_fid(
                fid,
                path,
                c.P9_SETATTR_MODE
                | c.P9_SETATTR_ATIME
                | c.P9_SETATTR_MTIME
                | c.P9_SETATTR_ATIME_SET
                | c.P9_SETATTR_MTIME_SET,
                mode=mode,
                atime=divmod(st.st_atime_ns, 1_000_000_000),
                mtime=divmod(st.st_mtime_ns, 1_000_000_000),
            )
        except OSError as exc:
            if self._dotu is None or self._dotu.has_wstat or exc.errno != errno.EOPNOTSUPP:
                raise
            # 9P2000.u without Twstat (xen-9pfsd): files keep the permission
            # bits they were created with, and the server's times
            if not self._dotu.warned_preserve:
                self._dotu.warned_preserve = True
                log.warning("copy_in: %s: times not preserved (%s)", path, exc.strerror)
            return
        if mode & 0o7000:
            kept = stat_module.S_IMODE(self._getattr_fid(fid, path).st_mode)
            _report_dropped("copy_in", "the server", path, mode, kept)

    def _copy_file_in(
        self,
        lpath: str,
        rpath: str,
        progress: _Progress,
        preserve: bool,
        no_clobber: bool,
        *,
        follow: bool,
    ) -> None:
        """Copy the local regular file *lpath* to *rpath*; anything else is skipped.

        :param follow: follow *lpath* if it is a symbolic link
        """
        st = os.stat(lpath, follow_symlinks=follow)
        if not stat_module.S_ISREG(st.st_mode):  # a device is not even opened
            log.warning("copy_in: skipping %s (%s)", lpath, _kind(st.st_mode))
            return
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        fd = os.open(lpath, flags)  # never blocks, even on a fifo that replaced the file
        with open(fd, "rb", closefd=True) as src:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                log.warning("copy_in: skipping %s (%s)", lpath, _kind(st.st_mode))
                return
            os.set_blocking(fd, True)
            perm = stat_module.S_IMODE(st.st_mode) if preserve else 0o666 & ~self.umask
            if self._session.pipelined and st.st_size <= self.default_iounit:
                data = src.read(self.default_iounit + 1)
                done = None
                if len(data) <= self.default_iounit:
                    done = self._create_small(
                        rpath, data, perm, st if preserve else None, no_clobber, progress
                    )
                if done == "done":
                    return
                if done == "overwrite":
                    no_clobber = False  # the file is the one just created: write it again
                src.seek(0)
            try:
                fid, _, iounit, display = self._open_fid(
                    rpath, parse_mode("xb" if no_clobber else "wb"), perm
                )
            except FileExistsError:
                if not no_clobber:
                    raise
                log.info("copy_in: not replacing %s", rpath)
                return
            try:
                self._upload(fid, iounit, display, cast(BinaryIO, src), progress)
                if preserve:
                    self._set_preserved(fid, None, display, st=st)
            finally:
                self._clunk_quiet(fid)

    def _create_small(
        self,
        rpath: str,
        data: bytes,
        perm: int,
        st: os.stat_result | None,
        no_clobber: bool,
        progress: _Progress,
    ) -> Literal["done", "overwrite"] | None:
        """Create the new file *rpath* holding *data* in one chain: walk to the
        directory, Tlcreate (exclusive), Twrite, Tsetattr (with *st*: its
        permission bits and times), Tclunk, back to back on one ring.

        :returns: ``"done"``; ``None`` when the usual way must do it (the file
            exists and may be replaced, links on the way, set-ID bits to
            check); ``"overwrite"`` after a short write (the file created
            here is to be written again)
        """
        plan = self._create_plan(rpath, data, perm, st)
        if plan is None:
            return None
        self._check_open()
        self._process_deferred()
        (chain,) = self._start_walk_chains([plan])
        if chain is None:
            return None
        return self._create_outcome(chain, plan, data, no_clobber, progress)

    def _create_plan(
        self, rpath: str, data: bytes, perm: int, st: os.stat_result | None
    ) -> tuple[str, list[str], Callable[[int], Sequence[Step]]] | None:
        """The chain of :meth:`_create_small`: ``(display, parent's names,
        steps after the walk)``, or ``None`` (the usual way)."""
        if st is not None and stat_module.S_IMODE(st.st_mode) & 0o7000:
            return None  # the bits the server keeps are read back: the usual way
        display = _display(rpath)
        parts = _normalize(display.split("/"))
        if not parts or len(parts) > c.MAXWELEM + 1:
            return None
        name = parts[-1]
        flags = c.L_O_WRONLY | c.L_O_CREAT | c.L_O_EXCL
        gid = self.gid

        def after(fid: int) -> tuple[Step, ...]:
            steps: list[Step] = [
                (functools.partial(c.Tlcreate, fid=fid, name=name, flags=flags, mode=perm,
                                   gid=gid), c.Rlcreate),
            ]
            if data:
                steps.append((functools.partial(c.Twrite, fid=fid, offset=0, data=data), c.Rwrite))
            if st is not None:
                valid = (c.P9_SETATTR_MODE | c.P9_SETATTR_ATIME | c.P9_SETATTR_MTIME
                         | c.P9_SETATTR_ATIME_SET | c.P9_SETATTR_MTIME_SET)
                atime = divmod(st.st_atime_ns, 1_000_000_000)
                mtime = divmod(st.st_mtime_ns, 1_000_000_000)
                mode = stat_module.S_IMODE(st.st_mode)

                def setattr_(t: int) -> c.Message:
                    return c.Tsetattr(t, fid, valid, mode, 0, 0, 0, *atime, *mtime)

                steps.append((setattr_, c.Rsetattr))
            return tuple(steps)

        return display, parts[:-1], after

    def _create_outcome(
        self,
        chain: Chain,
        plan: tuple[str, list[str], Callable[[int], Sequence[Step]]],
        data: bytes,
        no_clobber: bool,
        progress: _Progress,
    ) -> Literal["done", "overwrite"] | None:
        """What the chain of :meth:`_create_plan` did (see :meth:`_create_small`)."""
        display, parent, _ = plan
        got = self._finish_walk_chain(chain, display, parent, True)
        if got is None:
            return None
        qids, outcomes = got
        if qids and not qids[-1].type & c.QTDIR:
            raise _local_error(errno.ENOTDIR, display)
        created = outcomes[0]
        if isinstance(created, FileExistsError):
            if no_clobber:
                log.info("copy_in: not replacing %s", display)
                return "done"
            return None
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if data:
            written = outcomes[1]
            assert isinstance(written, c.Rwrite)
            if written.count > len(data):
                raise ProtocolError(f"Rwrite of {written.count} bytes for a Twrite of {len(data)}")
            if written.count < len(data):
                return "overwrite"
        progress.add(len(data))
        return "done"

    def _copy_link_in(self, lpath: str, rpath: str, no_clobber: bool) -> None:
        """Recreate the local symbolic link *lpath* as *rpath*."""
        target = os.readlink(lpath)
        try:
            try:
                self.symlink(target, rpath)
            except FileExistsError:
                if no_clobber:
                    log.info("copy_in: not replacing %s", rpath)
                    return
                self.remove(rpath)  # a directory is not removed (EISDIR)
                self.symlink(target, rpath)
        except OSError as exc:
            if exc.errno != errno.EPERM:
                raise
            raise OSError(
                errno.EPERM,
                f"{os.strerror(errno.EPERM)}: the server refused a symbolic link to"
                f" {target!r} (its link policy; e.g. a confined server takes only relative"
                " targets that stay inside the share)",
                rpath,
            ) from None


# --------------------------------------------------------------------------
# Helpers


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return ""


def _display(path: PathArg) -> str:
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"9P paths are str, not {type(p).__name__}")
    if "\0" in p:
        raise ValueError("embedded null character in path")
    return p


def _normalize(names: Sequence[str]) -> list[str]:
    parts: list[str] = []
    for name in names:
        if name in ("", "."):
            continue
        if name == "..":
            if parts:
                parts.pop()
            continue
        parts.append(name)
    return parts


def _local_error(err: int, path: str, text: str | None = None) -> OSError:
    return OSError(err, text or os.strerror(err), path)


def _join(directory: str, name: str) -> str:
    return posixpath.join(directory, name) if directory else name


def _checked_names(entries: list[c.Dirent], path: str) -> list[c.Dirent]:
    """*entries* of the listing of *path*, once each name is known to be one unique name.

    ``.`` and ``..`` were left out by :meth:`Client._readdir`, so here they
    are refused like the other names that no directory entry can have.

    :raises ProtocolError: an empty name, ``.``, ``..``, a name with ``/`` or
        NUL, or a name listed twice
    """
    seen: set[str] = set()
    for entry in entries:
        name = entry.name
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise ProtocolError(f"Rreaddir for {path!r}: the entry name {name!r} is not a name")
        if name in seen:
            raise ProtocolError(f"Rreaddir for {path!r}: the entry name {name!r} is listed twice")
        seen.add(name)
    return entries


def _walk_step(fid: int, newfid: int, parts: list[str]) -> Step:
    """The Twalk step of a chain: *parts* from *fid* to *newfid* (at most
    :data:`~pyxen9p.p9.codec.MAXWELEM` names), written without a message object."""
    names = tuple(parts)
    return (
        Direct(
            (
                functools.partial(c.Twalk, fid=fid, newfid=newfid, wnames=names),
                functools.partial(c.encode_twalk, fid=fid, newfid=newfid, wnames=names),
                None,
            )
        ),
        c.Rwalk,
    )  # type: ignore[return-value]  # (mypy sees no __call__ on a tuple subclass)


def _getattr_step(fid: int) -> tuple[Step]:
    """The Tgetattr step of a chain on *fid* (basic attributes): its
    outcome is an :class:`os.stat_result` for a valid Rgetattr (read
    straight from the reply), else what the generic check gives (see
    :func:`_step_stat`)."""
    return (
        (
            Direct(
                (
                    functools.partial(c.Tgetattr, fid=fid, request_mask=c.P9_GETATTR_BASIC),
                    functools.partial(c.encode_tgetattr, fid=fid, request_mask=c.P9_GETATTR_BASIC),
                    _rgetattr_stat,
                )
            ),
            c.Rgetattr,
        ),
    )  # type: ignore[return-value]  # (mypy sees no __call__ on a tuple subclass)


def _small_steps(count: int) -> Callable[[int], tuple[Step, ...]]:
    """The steps after the walk of a chain that reads a small file whole:
    getattr, open for reading, one Tread of *count* bytes."""

    def after(fid: int) -> tuple[Step, ...]:
        return (
            *_getattr_step(fid),
            (functools.partial(c.Tlopen, fid=fid, flags=c.L_O_RDONLY), c.Rlopen),
            (functools.partial(c.Tread, fid=fid, offset=0, count=count), c.Rread),
        )

    return after


def _write_data(data: bytes, progress: _Progress, out: BinaryIO) -> None:
    """Write *data* to *out* and count it done."""
    out.write(data)
    progress.add(len(data))


def _first_stat(outcomes: list[Outcome], display: str) -> os.stat_result:
    """The :class:`os.stat_result` of a chain of one :func:`_getattr_step`."""
    outcome: object = outcomes[0]  # the fast reader's stat_result, usually
    return outcome if type(outcome) is os.stat_result else _step_stat(outcome)


def _first_target(outcomes: list[Outcome], display: str) -> str:
    """The target of a chain of one :func:`_readlink_step`."""
    return _step_target(outcomes[0])


def _readlink_step(fid: int) -> tuple[Step]:
    """The Treadlink step of a chain on *fid* (see :func:`_step_target`)."""
    return ((functools.partial(c.Treadlink, fid=fid), c.Rreadlink),)


def _step_target(outcome: object) -> str:
    """The target of a :func:`_readlink_step`'s outcome.

    :raises: the step's failure
    """
    if isinstance(outcome, BaseException):
        raise outcome
    assert isinstance(outcome, c.Rreadlink)
    return outcome.target


def _or_error(call: Callable[[str], _T], path: str) -> _T | OSError | ValueError:
    """``call(path)``, or the :class:`OSError` / :class:`ValueError` it
    raised (a failed transport is raised)."""
    try:
        return call(path)
    except TransportError:
        raise
    except (OSError, ValueError) as exc:
        return exc


def _step_stat(outcome: object) -> os.stat_result:
    """The :class:`os.stat_result` of a :func:`_getattr_step`'s outcome.

    :raises: the step's failure; :class:`ProtocolError` for an Rgetattr
        the fast reader refused (see :func:`_stat_result`)
    """
    if type(outcome) is os.stat_result:
        return outcome
    if isinstance(outcome, BaseException):
        raise outcome
    assert isinstance(outcome, c.Rgetattr)
    return _stat_result(outcome)


def _rgetattr_stat(raw: bytes, tag: int) -> os.stat_result | None:
    """The :class:`os.stat_result` of *raw* if it is a valid Rgetattr to
    *tag* (as :func:`_stat_result` of its decoding gives); ``None`` for
    anything else (the generic check decodes and judges it)."""
    v = c.rgetattr_values(raw, tag)
    if v is None or v[16] >= 1_000_000_000 or v[18] >= 1_000_000_000 or v[20] >= 1_000_000_000:
        return None
    # (size type tag valid qtype qversion) qpath mode uid gid nlink rdev size
    # blksize blocks atime_sec atime_nsec mtime_sec mtime_nsec ctime_sec ctime_nsec ...
    # (_make_stat's body, inline: a frame less per stat; the property test
    # tests/p9/test_pipeline.py compares every field with _stat_result's)
    asec, ansec, msec, mnsec, csec, cnsec = v[15:21]
    return os.stat_result(
        (v[7], v[6], 0, v[10], v[8], v[9], v[12], asec, msec, csec),
        {
            "st_atime": asec + ansec * 1e-9,
            "st_mtime": msec + mnsec * 1e-9,
            "st_ctime": csec + cnsec * 1e-9,
            "st_atime_ns": asec * 1_000_000_000 + ansec,
            "st_mtime_ns": msec * 1_000_000_000 + mnsec,
            "st_ctime_ns": csec * 1_000_000_000 + cnsec,
            "st_blksize": v[13],
            "st_blocks": v[14],
            "st_rdev": v[11],
        },
    )


def _stat_result(r: c.Rgetattr) -> os.stat_result:
    """An :class:`os.stat_result` of an Rgetattr; the times' seconds are signed.

    :raises ProtocolError: a nanosecond field is not below 10⁹
    """
    if (
        r.atime_nsec >= 1_000_000_000
        or r.mtime_nsec >= 1_000_000_000
        or r.ctime_nsec >= 1_000_000_000
    ):
        for name in ("atime_nsec", "mtime_nsec", "ctime_nsec"):
            if getattr(r, name) >= 1_000_000_000:
                raise ProtocolError(f"Rgetattr: {name} {getattr(r, name)} is not below 10^9")
    return _make_stat(
        r.mode, r.qid.path, r.nlink, r.uid, r.gid, r.size, r.atime_sec, r.atime_nsec,
        r.mtime_sec, r.mtime_nsec, r.ctime_sec, r.ctime_nsec, r.blksize, r.blocks, r.rdev,
    )


def _make_stat(
    mode: int, ino: int, nlink: int, uid: int, gid: int, size: int,
    atime_sec: int, atime_nsec: int, mtime_sec: int, mtime_nsec: int,
    ctime_sec: int, ctime_nsec: int, blksize: int, blocks: int, rdev: int,
) -> os.stat_result:  # fmt: skip
    """The :class:`os.stat_result` of checked attributes (nanoseconds below 10⁹)."""
    return os.stat_result(
        (mode, ino, 0, nlink, uid, gid, size, atime_sec, mtime_sec, ctime_sec),
        {
            "st_atime": atime_sec + atime_nsec * 1e-9,
            "st_mtime": mtime_sec + mtime_nsec * 1e-9,
            "st_ctime": ctime_sec + ctime_nsec * 1e-9,
            "st_atime_ns": atime_sec * 1_000_000_000 + atime_nsec,
            "st_mtime_ns": mtime_sec * 1_000_000_000 + mtime_nsec,
            "st_ctime_ns": ctime_sec * 1_000_000_000 + ctime_nsec,
            "st_blksize": blksize,
            "st_blocks": blocks,
            "st_rdev": rdev,
        },
    )


# --------------------------------------------------------------------------
# Copies: the local side

#: Flags that open a local directory to create entries in it.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: errnos of ``link()`` on a file system without hard links.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS,
                            errno.EMLINK, errno.EXDEV})


@dataclass
class _CopyDir:
    """One directory of a tree copy, as scanned before anything is written.

    ``files`` are ``(name, source, destination, attributes)``, ``links``
    ``(name, source, destination)``.
    """

    src: str
    dst: str
    name: str
    st: os.stat_result | None
    files: list[tuple[str, str, str, os.stat_result]] = field(default_factory=list)
    links: list[tuple[str, str, str]] = field(default_factory=list)
    subdirs: list[_CopyDir] = field(default_factory=list)


def _failure_handler(
    on_error: ErrorCallback | None, errors: list[OSError | ValueError]
) -> Callable[[OSError | ValueError], None]:
    """What a tree copy does with a failed entry: *on_error*, else collect it in *errors*.

    A failed transport is raised at once: nothing more can be copied.
    """

    def failed(exc: OSError | ValueError) -> None:
        if isinstance(exc, TransportError):
            raise exc
        log.debug("copy: %s", exc)
        if on_error is not None:
            on_error(exc)
        else:
            errors.append(exc)

    return failed


def _scan_local(
    lpath: str,
    rpath: str,
    top: os.stat_result,
    failed: Callable[[OSError | ValueError], None],
) -> tuple[_CopyDir, int]:
    """The local tree *lpath* (links not followed) and its regular files' bytes."""
    root = _CopyDir(lpath, rpath, "", top)
    total = 0
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here.src) as it:
                entries = list(it)
        except OSError as exc:
            failed(exc)
            continue
        for entry in entries:
            rsub = _join(here.dst, entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                failed(exc)
                continue
            if stat_module.S_ISLNK(st.st_mode):
                here.links.append((entry.name, entry.path, rsub))
            elif stat_module.S_ISDIR(st.st_mode):
                sub = _CopyDir(entry.path, rsub, entry.name, st)
                here.subdirs.append(sub)
                stack.append(sub)
            elif stat_module.S_ISREG(st.st_mode):
                here.files.append((entry.name, entry.path, rsub, st))
                total += st.st_size
            else:
                log.warning("copy_in: skipping %s (%s)", entry.path, _kind(st.st_mode))
    return root, total


def _read_local_small(
    lpath: str, limit: int
) -> tuple[os.stat_result, bytes] | Literal["skip"] | None:
    """The attributes and data of the local regular file *lpath* (a link is
    not followed) if it holds at most *limit* bytes; ``None`` if larger;
    ``"skip"`` (logged) if it is not a regular file."""
    st = os.stat(lpath, follow_symlinks=False)
    if not stat_module.S_ISREG(st.st_mode):
        log.warning("copy_in: skipping %s (%s)", lpath, _kind(st.st_mode))
        return "skip"
    if st.st_size > limit:
        return None
    fd = os.open(lpath, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat_module.S_ISREG(st.st_mode):
            log.warning("copy_in: skipping %s (%s)", lpath, _kind(st.st_mode))
            return "skip"
        os.set_blocking(fd, True)
        chunks = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, limit + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if got > limit:
        return None
    return st, b"".join(chunks)


def _kind(mode: int) -> str:
    """What a file of *mode* is, for a message about one that is not copied."""
    for test, name in (
        (stat_module.S_ISFIFO, "a fifo"),
        (stat_module.S_ISSOCK, "a socket"),
        (stat_module.S_ISCHR, "a character device"),
        (stat_module.S_ISBLK, "a block device"),
        (stat_module.S_ISDIR, "a directory"),
        (stat_module.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return f"{name}, not a regular file"
    return f"file type {stat_module.S_IFMT(mode):#o}, not a regular file"


def _relabel(exc: OSError, path: str) -> OSError:
    """*exc* again, naming *path* (the destination) instead of a temporary name."""
    return OSError(exc.errno, exc.strerror, path)


def _local_exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _temporary_name(name: str) -> str:
    return f".{name[:32]}.{secrets.token_hex(4)}.part"


def _local_temporary(dfd: int, name: str, lpath: str, perm: int) -> tuple[str, int]:
    """A new file for *name* in directory *dfd*, under a temporary name: ``(name, fd)``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = _temporary_name(name)
        try:
            return tmp, os.open(tmp, flags, perm, dir_fd=dfd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _relabel(exc, lpath) from None


def _local_temporary_link(dfd: int, name: str, lpath: str, target: str) -> str:
    """A new symbolic link to *target* in directory *dfd*, under a temporary name."""
    while True:
        tmp = _temporary_name(name)
        try:
            os.symlink(target, tmp, dir_fd=dfd)
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _relabel(exc, lpath) from None


def _local_commit(dfd: int, tmp: str, name: str, lpath: str, no_clobber: bool) -> None:
    """Give the complete temporary file *tmp* its final *name* (in directory *dfd*).

    A rename replaces an existing file or link (never following it, never a
    directory); with *no_clobber*, a hard link does, which fails if *name*
    exists (on a file system without hard links, checked just before a
    rename).
    """
    try:
        if not no_clobber:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            return
        try:
            os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except FileExistsError:
            log.info("copy_out: not replacing %s", lpath)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            if _local_exists(dfd, name):
                log.info("copy_out: not replacing %s", lpath)
            else:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                return
        os.unlink(tmp, dir_fd=dfd)
    except OSError as exc:
        raise _relabel(exc, lpath) from None


def _local_subdir(dfd: int, name: str, lpath: str, preserve: bool) -> int:
    """Create (or reuse) directory *name* in *dfd* and open it; a link there is refused."""
    try:
        os.mkdir(name, 0o700 if preserve else 0o777, dir_fd=dfd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _relabel(exc, lpath) from None
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise _relabel(exc, lpath) from None
        try:
            mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
        except OSError:
            mode = 0
        what = "a symbolic link, not followed" if stat_module.S_ISLNK(mode) else "not replaced"
        raise OSError(errno.ENOTDIR, f"Not a directory ({what})", lpath) from None


def _preserve_local(fd: int, st: os.stat_result, lpath: str) -> None:
    """Give the open local file *fd* the permission bits and times of *st*."""
    mode = stat_module.S_IMODE(st.st_mode)
    os.chmod(fd, mode)
    kept = stat_module.S_IMODE(os.fstat(fd).st_mode)
    _report_dropped("copy_out", "this system", lpath, mode, kept)
    try:
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OverflowError:
        raise OSError(errno.EOVERFLOW, "the times cannot be set here", lpath) from None


def _report_dropped(op: str, who: str, path: str, wanted: int, kept: int) -> None:
    """Warn if mode bits of *wanted* are not in *kept*."""
    dropped = wanted & ~kept
    if dropped:
        log.warning(
            "%s: %s: %s dropped the mode bits %04o (%04o asked, %04o kept)",
            op, path, who, dropped, wanted, kept,
        )
