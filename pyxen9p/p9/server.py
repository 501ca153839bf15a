"""A pure-Python 9P2000.L file server exporting one local directory.

:class:`FileServer` answers 9P2000.L requests against a directory tree.  It
is used as the backend of the simulated Xen 9pfs device, and can serve any
byte stream (a socket, a pair of pipes)::

    server = FileServer("/srv/export", readonly=True)
    reply = server.handle(request_bytes)          # one request in, one reply out
    threading.Thread(target=server.serve_socket, args=(sock,)).start()

Sessions
    Fids live in a :class:`Session`.  :meth:`FileServer.handle` uses one
    default session shared by all its callers; :meth:`FileServer.session`
    makes an independent one (one per connection), and each call of
    :meth:`FileServer.serve_socket` / :meth:`FileServer.serve_fds` uses its
    own.  :meth:`Session.handle` is thread-safe: requests on different fids
    run concurrently, requests on the same fid one after the other.

Confinement
    Nothing outside the export root can be reached or changed through the
    server, whatever the client sends and however it races its own
    requests:

    * every fid holds an ``O_PATH | O_NOFOLLOW`` file descriptor of its
      file, obtained by walking one validated name at a time from the root
      with ``openat()``; every later operation uses that descriptor, or the
      descriptor of the directory it was found in plus one validated name,
      with ``*at()`` calls that never follow a symbolic link.  Renaming or
      replacing a path component after a walk cannot redirect a fid;
    * names sent by the client must be single path components: ``""``,
      ``"."``, ``".."`` and names containing ``"/"`` or NUL are refused with
      ``EINVAL`` (Twalk alone accepts ``"."`` and ``".."``; ``".."`` at the
      root stays at the root);
    * files are reopened for I/O through ``/proc/self/fd/N`` of the fid's
      own descriptor (never for symbolic links), so ``/proc`` must be
      mounted;
    * only regular files and FIFOs can be created by Tmknod (``EPERM``
      otherwise); device nodes and sockets are never opened: Tlopen answers
      ``EACCES`` for a device and ``ENXIO`` for a socket, and Tlcreate
      without ``O_EXCL`` on an existing entry that is not a regular file
      looks at it through an ``O_PATH`` descriptor only and answers
      ``EACCES`` (device), ``ENXIO`` (socket), ``EEXIST`` (FIFO), ``EISDIR``
      or ``ELOOP`` (symbolic link).  FIFOs are opened by Tlopen only, and
      non-blocking, so that no request can block the server;
    * symbolic links (``symlinks="confined"``, the default): call a link's
      target *confined* when it is relative and has no ``..`` component; a
      confined target names a path below the link's own directory wherever
      that directory is.  The server never gives a link with an unconfined
      target a new name outside the directory it is in: Tsymlink refuses
      such a target, Tlink refuses to hard-link such a link, Trename and
      Trenameat refuse to move one to another directory, and refuse to move
      a directory whose subtree holds one to another parent directory (all
      ``EPERM``).  Renaming within one directory is allowed: a link is
      resolved from its directory, which stays where it was, and a directory
      renamed within its parent keeps its depth.  So every link created or
      moved through the server has a target below its own directory, and a
      link with any other target (made on the host) keeps its directory, and
      every directory above it keeps its parent.  (Where such a host-made
      link leads also depends on the rest of the tree, which clients may
      change.)  Renames are serialized server-wide for this check; a
      directory moved to another parent is checked entry by entry, and one
      with more than :data:`MOVE_CHECK_ENTRIES` entries or
      :data:`MOVE_CHECK_DEPTH` levels is refused with ``EXDEV`` (``mv`` then
      copies it), one the server may not read with ``EACCES``.
      ``symlinks="none"`` also refuses every Tsymlink and every Tlink of a
      symbolic link; ``symlinks="any"`` checks none of this;
    * set-user-ID bits, and set-group-ID bits on non-directories, are
      removed from modes set by the client unless ``allow_setid=True``;
    * ``readonly=True`` refuses every modification with ``EROFS``.

    The gid in Tlcreate/Tmkdir/Tsymlink/Tmknod and the user names of
    Tattach are ignored: files are created with the server's credentials,
    and the kernel's permission checks apply to the server process (chown
    works only if the server process may do it).

Limits
    One session cannot deny service to another by holding descriptors,
    locks or memory; a request over a limit fails alone, with an errno:

    * a fid holds up to three descriptors (its file, the directory it was
      found in, its open file).  A session holds at most ``max_fids`` fids
      (Tattach / Twalk beyond: ``EMFILE``) and all sessions together at most
      ``max_total_fids`` (``ENFILE``).  By default ``max_total_fids`` is a
      quarter of the descriptors the process may still open when the server
      is made (the soft ``RLIMIT_NOFILE`` less the descriptors open then), so
      that fids use at most three quarters of them, and ``max_fids`` a
      quarter of that (at most 4096): one session at its limit leaves the
      others at least three quarters of the fids, and the rest of the
      process its own quarter of the descriptors;
    * lock ranges (after merging and splitting): at most ``max_locks`` (1024)
      per session and ``max_total_locks`` (65536) in all; a Tlock that would
      make more answers ``ENOLCK``, even an unlock that splits a range.  A
      Tlock or Tgetlock ``client_id`` longer than 255 bytes is refused
      (``EINVAL``).  Checking for a conflict takes a few binary searches in
      the file's own index, whatever the number of locks; Tgetlock that finds
      one looks at each other owner of the file at most once;
    * a session keeps the Treaddir snapshots of its 4 most recently listed
      directories; an older listing is read again when continued (offsets
      are stable, so nothing is lost or repeated);
    * a Twalk has at most 16 names and a request at most msize bytes (the
      codec); moving a directory to another parent looks at
      :data:`MOVE_CHECK_ENTRIES` entries at most (see *Confinement*).

    What remains proportional to the export: a Treaddir at offset 0 reads
    the whole directory, and a directory's snapshot is as large as the
    directory.

Other behaviour
    Tauth, Txattrwalk and Txattrcreate answer ``EOPNOTSUPP``.  Tlock and
    Tgetlock emulate POSIX record locks in the server (advisory, shared by
    all sessions of one :class:`FileServer`, released when a session ends;
    adjacent and overlapping ranges of one owner and type merge, as POSIX
    locks do); a conflicting lock request answers ``P9_LOCK_BLOCKED``.
    Treaddir offsets are stable cookies derived from entry names (``.`` is
    1, ``..`` is 2), so a listing can be resumed from any offset the server
    returned even if the directory changed meanwhile.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import logging
import os
import resource
import select
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Literal

from typing_extensions import Self

from pyxen9p._requests import MIN_MSIZE
from pyxen9p.p9 import codec as c

__all__ = [
    "DEFAULT_MSIZE",
    "MIN_MSIZE",
    "MOVE_CHECK_DEPTH",
    "MOVE_CHECK_ENTRIES",
    "FileServer",
    "Session",
]

_log = logging.getLogger(__name__)

#: The msize a :class:`FileServer` offers by default.
DEFAULT_MSIZE = 512 * 1024
#: f_type reported by Rstatfs (V9FS_MAGIC).
_V9FS_MAGIC = 0x01021997
_U64 = (1 << 64) - 1
_RREAD_OVERHEAD = c.HEADER_SIZE + 4  # size[4] type[1] tag[2] count[4]
_FLUSH_TIMEOUT = 30.0
_CLOSE_TIMEOUT = 30.0
#: Directory listings (Treaddir snapshots) one session keeps at most.
_MAX_LISTINGS = 4
#: The longest Tlock / Tgetlock client_id accepted, in bytes (Linux sends a host name).
_MAX_CLIENT_ID = 255

_O_PATH = getattr(os, "O_PATH", 0)
#: ``size[4] type[1] tag[2]``
_HEADER = struct.Struct("<IBH")
_S_ISDIR = stat.S_ISDIR
_S_ISLNK = stat.S_ISLNK
_allocate_lock = threading.Lock
_PATH_FLAGS = _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_PATH_FLAGS = _PATH_FLAGS | os.O_DIRECTORY

#: The most entries a directory's subtree may have to be moved to another directory
#: under the ``"confined"`` and ``"none"`` symlink policies (``EXDEV`` beyond).
MOVE_CHECK_ENTRIES = 10_000
#: The most levels a directory's subtree may have to be moved to another directory
#: under the ``"confined"`` and ``"none"`` symlink policies (``EXDEV`` beyond).
MOVE_CHECK_DEPTH = 128

#: The ``symlinks`` policies of :class:`FileServer`.
SymlinkPolicy = Literal["confined", "any", "none"]


class _Err(Exception):
    """Abort the current request with Rlerror(errno)."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _component(name: str) -> bytes:
    """Validate a client-supplied name as one path component; return its bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    if raw in (b"", b".", b"..") or b"/" in raw or b"\0" in raw:
        raise _Err(errno.EINVAL)
    return raw


def _confined(target: bytes) -> bool:
    """Whether a symbolic link target is relative and has no ``..`` component."""
    return not target.startswith(b"/") and b".." not in target.split(b"/")


def _qid_type(mode: int) -> int:
    if stat.S_ISDIR(mode):
        return c.QTDIR
    if stat.S_ISLNK(mode):
        return c.QTSYMLINK
    return c.QTFILE


def _dt_type(mode: int) -> int:
    fmt = stat.S_IFMT(mode)
    return {
        stat.S_IFDIR: c.DT_DIR,
        stat.S_IFREG: c.DT_REG,
        stat.S_IFLNK: c.DT_LNK,
        stat.S_IFIFO: c.DT_FIFO,
        stat.S_IFCHR: c.DT_CHR,
        stat.S_IFBLK: c.DT_BLK,
        stat.S_IFSOCK: c.DT_SOCK,
    }.get(fmt, c.DT_UNKNOWN)


def _cookie(name: bytes) -> int:
    """Stable readdir offset of entry *name*: never 0, 1 or 2, below 2**63."""
    h = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little")
    h &= (1 << 63) - 1
    return h if h > 2 else h + 3


def _close(fd: int) -> None:
    if fd >= 0:
        try:  # not contextlib.suppress: three frames less, four times per file created
            os.close(fd)
        except OSError:
            pass


@dataclass
class _Loc:
    """Where a fid points: its O_PATH fd, and the directory + name it was found under.

    ``parent`` is -1 for the root and for directories reached through
    ``..`` (their parent and name are then found again when needed).
    All fds are owned by the location.
    """

    fd: int
    parent: int
    name: bytes
    mode: int  # st_mode at walk time (the file type of an inode never changes)
    is_root: bool

    def close(self) -> None:
        _close(self.fd)
        _close(self.parent)
        self.fd = self.parent = -1

    def dup(self) -> _Loc:
        fd = os.dup(self.fd)
        try:
            parent = os.dup(self.parent) if self.parent >= 0 else -1
        except OSError:
            _close(fd)
            raise
        return _Loc(fd, parent, self.name, self.mode, self.is_root)


class _Using:
    """The context of :meth:`Session._using`: on entry, look the fids up and
    lock each once, in a fixed order (:class:`EBADF <_Err>` if one is unknown
    or closed meanwhile); on exit, unlock them.  A class rather than a
    generator: it is entered for almost every request."""

    __slots__ = ("_held", "_nums", "_session")

    def __init__(self, session: Session, nums: tuple[int, ...]) -> None:
        self._session = session
        self._nums = nums
        self._held: list[_Fid] = []

    def __enter__(self) -> list[_Fid]:
        session = self._session
        with session._lock:
            fids = []
            for n in self._nums:
                f = session._fids.get(n)
                if f is None:
                    raise _Err(errno.EBADF)
                fids.append(f)
        if len(fids) == 1:
            unique = fids
        else:
            unique = sorted({id(f): f for f in fids}.values(), key=lambda f: f.serial)
        held = self._held
        try:
            for f in unique:
                f.lock.acquire()
                held.append(f)
                if f.closed:
                    raise _Err(errno.EBADF)
        except BaseException:
            self._release()
            raise
        return fids

    def __exit__(self, *exc: object) -> None:
        held = self._held
        while held:
            held.pop().lock.release()

    def _release(self) -> None:
        held = self._held
        while held:
            held.pop().lock.release()


class _Fid:
    __slots__ = ("closed", "dirents", "loc", "lock", "open_fd", "open_write", "serial")

    def __init__(self, loc: _Loc, serial: int) -> None:
        self.loc = loc
        self.serial = serial
        self.lock = threading.Lock()
        self.open_fd = -1
        self.open_write = False
        self.dirents: tuple[list[int], list[bytes]] | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.loc.close()
        _close(self.open_fd)
        self.open_fd = -1
        self.dirents = None


_INF = 1 << 64
_RD = c.P9_LOCK_TYPE_RDLCK
_WR = c.P9_LOCK_TYPE_WRLCK
#: A lock owner: session serial, client_id, proc_id.
_Owner = tuple[int, str, int]


class _Lock:
    """One byte range [start, end) locked by one owner (end :data:`_INF`: to end of file)."""

    __slots__ = ("end", "start", "type")

    def __init__(self, type_: int, start: int, end: int) -> None:
        self.type = type_
        self.start = start
        self.end = end


def _start(lk: _Lock) -> int:
    return lk.start


def _end(lk: _Lock) -> int:
    return lk.end


def _overlap(locks: list[_Lock], start: int, end: int) -> tuple[int, int]:
    """The slice [i, j) of *locks* (sorted, disjoint) that overlaps [start, end)."""
    i = bisect.bisect_right(locks, start, key=_end)
    j = bisect.bisect_left(locks, end, key=_start)
    return i, max(i, j)


class _Ranges:
    """Sorted starts and sorted ends of a multiset of ranges (they may overlap)."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, lk: _Lock) -> None:
        bisect.insort(self.starts, lk.start)
        bisect.insort(self.ends, lk.end)

    def remove(self, lk: _Lock) -> None:
        del self.starts[bisect.bisect_left(self.starts, lk.start)]
        del self.ends[bisect.bisect_left(self.ends, lk.end)]

    def overlapping(self, start: int, end: int) -> int:
        """How many ranges overlap [start, end): those starting before *end*, less
        those ending at or before *start* (all of which start before *end*)."""
        return bisect.bisect_left(self.starts, end) - bisect.bisect_right(self.ends, start)


class _FileLocks:
    """The locks on one file.

    Each owner's locks of one type are a sorted list of disjoint ranges;
    :attr:`all` counts every owner's ranges by type, so that whether another
    owner holds a conflicting lock is found with a few binary searches
    (overlapping ranges of all owners, less the requester's own).
    """

    __slots__ = ("all", "owners", "sessions")

    def __init__(self) -> None:
        self.all = {_RD: _Ranges(), _WR: _Ranges()}
        self.owners: dict[_Owner, dict[int, list[_Lock]]] = {}
        #: Locks held on this file per session serial.
        self.sessions: dict[int, int] = {}

    def conflicts(self, owner: _Owner, type_: int, start: int, end: int) -> bool:
        """Whether another owner holds a lock conflicting with *type_* on [start, end)."""
        own = self.owners.get(owner)
        for t in (_WR,) if type_ == _RD else (_RD, _WR):
            n = self.all[t].overlapping(start, end)
            if own is not None:
                i, j = _overlap(own[t], start, end)
                n -= j - i
            if n > 0:
                return True
        return False

    def conflicting(self, owner: _Owner, type_: int, start: int, end: int) -> tuple[
        _Owner, _Lock
    ] | None:
        """One lock of another owner conflicting with *type_* on [start, end), if any."""
        if not self.conflicts(owner, type_, start, end):
            return None
        for other, lists in self.owners.items():
            if other == owner:
                continue
            for t in (_WR,) if type_ == _RD else (_WR, _RD):
                i, j = _overlap(lists[t], start, end)
                if i < j:
                    return other, lists[t][i]
        return None  # pragma: no cover - the counts said there was one

    def plan(
        self, owner: _Owner, type_: int, start: int, end: int
    ) -> list[tuple[int, int, int, list[_Lock]]]:
        """How *owner*'s lists change for Tlock *type_* on [start, end).

        Returns (type, i, j, new): replace slice [i, j) of the owner's list
        of that type by *new*.  Ranges of other types are cut around
        [start, end); ranges of the same type that overlap or touch it are
        merged with it.
        """
        lists = self.owners.get(owner)
        changes = []
        for t in (_RD, _WR):
            locks = lists[t] if lists is not None else []
            i, j = _overlap(locks, start, end)
            if t == type_:
                lo, hi, s, e = i, j, start, end
                if i < j:
                    s, e = min(s, locks[i].start), max(e, locks[j - 1].end)
                if lo > 0 and locks[lo - 1].end == s:
                    lo -= 1
                    s = locks[lo].start
                if hi < len(locks) and locks[hi].start == e:
                    e = locks[hi].end
                    hi += 1
                changes.append((t, lo, hi, [_Lock(t, s, e)]))
            elif i < j:
                new = []
                if locks[i].start < start:
                    new.append(_Lock(t, locks[i].start, start))
                if locks[j - 1].end > end:
                    new.append(_Lock(t, end, locks[j - 1].end))
                changes.append((t, i, j, new))
        return changes

    def apply(self, owner: _Owner, changes: list[tuple[int, int, int, list[_Lock]]]) -> int:
        """Make the changes of :meth:`plan`; return the change in the number of locks."""
        lists = self.owners.get(owner)
        if lists is None:
            lists = self.owners[owner] = {_RD: [], _WR: []}
        delta = 0
        for t, i, j, new in changes:
            locks = lists[t]
            for lk in locks[i:j]:
                self.all[t].remove(lk)
            locks[i:j] = new
            for lk in new:
                self.all[t].add(lk)
            delta += len(new) - (j - i)
        if not lists[_RD] and not lists[_WR]:
            del self.owners[owner]
        return delta

    def drop_session(self, serial: int) -> int:
        """Remove every lock of session *serial*; return how many there were."""
        n = 0
        for owner in [o for o in self.owners if o[0] == serial]:
            for t, locks in self.owners.pop(owner).items():
                for lk in locks:
                    self.all[t].remove(lk)
                n += len(locks)
        self.sessions.pop(serial, None)
        return n


class FileServer:
    """Serve the directory *root* over 9P2000.L.

    :param root: the directory to export (resolved once, at construction)
    :param readonly: refuse every modification with ``EROFS``
    :param msize: the largest message size the server offers (at least
        :data:`MIN_MSIZE`); a client's Tversion negotiates it down
    :param symlinks: policy for symbolic links: ``"confined"`` (new links
        need relative targets without ``..``, and links with other targets
        are not given names in other directories), ``"any"`` or ``"none"``
        (see *Confinement* in the module's description)
    :param allow_setid: keep set-user-ID / set-group-ID bits in modes set by
        clients
    :param max_fids: the most fids one session may hold (``EMFILE`` beyond);
        default: a quarter of *max_total_fids*, at most 4096
    :param max_total_fids: the most fids all sessions together may hold
        (``ENFILE`` beyond); default: a quarter of the descriptors the process
        may still open when the server is made (``RLIMIT_NOFILE``'s soft
        limit less the descriptors open then), as a fid holds up to three
    :param max_locks: the most lock ranges one session may hold (``ENOLCK``
        beyond)
    :param max_total_locks: the most lock ranges all sessions together may
        hold (``ENOLCK`` beyond)

    See *Limits* in the module's description.
    :raises NotADirectoryError: *root* is not a directory
    :raises ValueError: a parameter is out of range
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        readonly: bool = False,
        msize: int = DEFAULT_MSIZE,
        symlinks: SymlinkPolicy = "confined",
        allow_setid: bool = False,
        max_fids: int | None = None,
        max_total_fids: int | None = None,
        max_locks: int = 1024,
        max_total_locks: int = 65536,
    ) -> None:
        if not MIN_MSIZE <= msize <= 0xFFFFFFFF:
            raise ValueError(f"msize must be in [{MIN_MSIZE}, 2**32-1], got {msize}")
        if symlinks not in ("confined", "any", "none"):
            raise ValueError(f"symlinks must be 'confined', 'any' or 'none', got {symlinks!r}")
        if max_total_fids is None:
            max_total_fids = max(1, _descriptor_budget() // 4)
        if max_fids is None:
            max_fids = max(1, min(4096, max_total_fids // 4))
        for what, n in (
            ("max_fids", max_fids),
            ("max_total_fids", max_total_fids),
            ("max_locks", max_locks),
            ("max_total_locks", max_total_locks),
        ):
            if n < 1:
                raise ValueError(f"{what} must be positive, got {n}")
        if not _O_PATH:
            raise OSError(errno.ENOSYS, "O_PATH is needed (Linux only)")
        self._root_path = os.path.realpath(os.fspath(root))
        # Tattach anames naming the root (besides "" and "/").
        self._anames = (self._root_path, os.path.abspath(os.fspath(root)))
        self._root_fd = os.open(self._root_path, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self._root_fd)
        self._root_id = (st.st_dev, st.st_ino)
        #: Whether every modification is refused.
        self.readonly = readonly
        #: The largest msize offered.
        self.msize = msize
        #: The policy for new symbolic links.
        self.symlinks: SymlinkPolicy = symlinks
        #: Whether set-user-ID / set-group-ID bits are kept.
        self.allow_setid = allow_setid
        #: The most fids one session may hold.
        self.max_fids = max_fids
        #: The most fids all sessions together may hold.
        self.max_total_fids = max_total_fids
        #: The most lock ranges one session may hold.
        self.max_locks = max_locks
        #: The most lock ranges all sessions together may hold.
        self.max_total_locks = max_total_locks
        self._nfids = 0  # under _lock
        self._lock = threading.Lock()
        self._sessions: set[Session] = set()
        self._streams: set[socket.socket] = set()
        self._serial = 0
        self._devs: dict[int, int] = {st.st_dev: 0}
        self._locks: dict[tuple[int, int], _FileLocks] = {}
        self._nlocks = 0  # under _locks_mutex, as the tables
        self._locks_mutex = threading.Lock()
        self._moves = threading.Lock()
        self._closed = False
        self._default = self.session()

    # -- public API ----------------------------------------------------------

    @property
    def root(self) -> str:
        """The exported directory (an absolute, resolved path)."""
        return self._root_path

    def session(self) -> Session:
        """Return a new, independent session (its own fids and msize).

        :raises ValueError: the server is closed
        """
        with self._lock:
            if self._closed:
                raise ValueError("FileServer is closed")
            self._serial += 1
            s = Session(self, self._serial)
            self._sessions.add(s)
            return s

    def handle(self, request: bytes | bytearray | memoryview) -> bytes:
        """Answer one complete request with one complete reply, in the default session.

        Thread-safe; see :meth:`Session.handle`.
        """
        return self._default.handle(request)

    def serve_socket(self, sock: socket.socket, *, idle_timeout: float | None = None) -> None:
        """Serve a stream socket in a new session until the peer closes it.

        Requests are read and answered in order.  Returns at end of stream, on
        a framing error (a size field out of range), on a socket error, after
        *idle_timeout* seconds without a request, or when the server is
        closed (:meth:`close` shuts the socket down).  On return the socket
        is shut down in both directions, so the peer sees the end of the
        stream, but not closed.  Shut it down from another thread to stop
        serving.

        :param sock: a connected stream socket
        :param idle_timeout: seconds to wait for each request (``None``: no limit)
        """
        old_timeout = sock.gettimeout()
        sock.settimeout(idle_timeout)
        with self._lock:
            closed = self._closed
            self._streams.add(sock)

        def recv(n: int) -> bytes:
            return sock.recv(n)

        try:
            if not closed:
                self._serve(recv, sock.sendall)
        finally:
            with self._lock:
                self._streams.discard(sock)
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                sock.settimeout(old_timeout)

    def serve_fds(self, rfd: int, wfd: int, *, idle_timeout: float | None = None) -> None:
        """Serve requests read from file descriptor *rfd*, replies written to *wfd*.

        Same behaviour as :meth:`serve_socket` (:meth:`close` is noticed
        within half a second); the descriptors are neither shut down nor
        closed.

        :param rfd: readable end (a pipe, a socket...)
        :param wfd: writable end (may equal *rfd*)
        :param idle_timeout: seconds to wait for each request (``None``: no limit)
        """
        poller = select.poll()
        poller.register(rfd, select.POLLIN)

        def recv(n: int) -> bytes:
            deadline = None if idle_timeout is None else time.monotonic() + idle_timeout
            while not self._closed:
                wait = 0.5
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError("idle timeout")
                if poller.poll(wait * 1000):
                    return os.read(rfd, n)
            return b""

        def send(data: bytes) -> None:
            view = memoryview(data)
            while view:
                n = os.write(wfd, view)
                view = view[n:]

        self._serve(recv, send)

    def close(self) -> None:
        """Close every session (waiting for running requests) and the root.

        Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions)
            streams = list(self._streams)
        for sock in streams:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for s in sessions:
            s.close()
        _close(self._root_fd)
        self._root_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers used by sessions -------------------------------------------

    def _serve(self, recv: Callable[[int], bytes], send: Callable[[bytes], None]) -> None:
        try:
            session = self.session()
        except ValueError:
            return
        try:
            while not session.closed:
                hdr = _recv_exact(recv, c.HEADER_SIZE)
                if hdr is None:
                    return
                size, _, _ = c.peek_header(hdr)
                limit = session.msize if session.msize else self.msize
                if size > limit:
                    _log.warning("9P request of %d bytes exceeds msize %d: closing", size, limit)
                    return
                body = _recv_exact(recv, size - c.HEADER_SIZE)
                if body is None:
                    _log.warning("9P stream ended inside a message")
                    return
                send(session.handle(hdr + body))
        except c.ProtocolError as exc:
            _log.warning("9P framing error: %s", exc)
        except (OSError, TimeoutError) as exc:
            _log.debug("9P stream closed: %s", exc)
        finally:
            session.close()

    def _forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)
        with self._locks_mutex:
            for key in session._lock_keys:
                table = self._locks.get(key)
                if table is not None:
                    self._nlocks -= table.drop_session(session.serial)
                    if not table.owners:
                        del self._locks[key]
            session._lock_keys.clear()
            session._nlocks = 0

    def _qid(self, st: os.stat_result) -> c.Qid:
        mode = st.st_mode
        kind = c.QTDIR if _S_ISDIR(mode) else c.QTSYMLINK if _S_ISLNK(mode) else c.QTFILE
        index = self._devs.get(st.st_dev)
        if index == 0:  # _qid_type and _qid_path, inline for the export's own device
            return c.Qid(kind, 0, st.st_ino & _U64)
        return c.Qid(kind, 0, self._qid_path(st.st_dev, st.st_ino))

    def _qid_path(self, dev: int, ino: int) -> int:
        index = self._devs.get(dev)
        if index is None:
            with self._lock:
                index = self._devs.setdefault(dev, len(self._devs))
        if index == 0:
            return ino & _U64
        return ((index << 48) | (ino & ((1 << 48) - 1))) & _U64

    def _count_fids(self, n: int) -> bool:
        """Add *n* to the fids held; False (nothing added) if over :attr:`max_total_fids`."""
        with self._lock:
            if n > 0 and self._nfids + n > self.max_total_fids:
                return False
            self._nfids += n
            return True

    def _is_root(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == self._root_id


def _descriptor_budget() -> int:
    """Descriptors the process may still open (soft ``RLIMIT_NOFILE`` less those open)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    return max(0, soft - len(os.listdir("/proc/self/fd")))


def _recv_exact(recv: Callable[[int], bytes], n: int) -> bytes | None:
    """Read exactly *n* bytes; None at end of stream (even mid-way)."""
    chunks: list[bytes] = []
    left = n
    while left:
        chunk = recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Session:
    """One 9P session: a fid table and a negotiated msize.

    Obtain sessions from :meth:`FileServer.session`.  A session starts
    un-negotiated: every request but Tversion answers ``EPROTO`` until a
    Tversion offering "9P2000.L" succeeds.
    """

    def __init__(self, server: FileServer, serial: int) -> None:
        self._server = server
        #: A number identifying the session within its server.
        self.serial = serial
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._fids: dict[int, _Fid] = {}
        self._fid_serial = 0
        # A request being served, by tag: a lock taken when it starts and
        # released once when it ends (a Tflush of the tag waits for it).
        self._inflight: dict[int, threading.Lock] = {}
        self._active = 0
        self._listings: OrderedDict[int, _Fid] = OrderedDict()  # fids with a listing, LRU
        # Under the server's _locks_mutex: files this session holds locks on, and how many.
        self._lock_keys: set[tuple[int, int]] = set()
        self._nlocks = 0
        #: The negotiated msize (0 before a successful Tversion).
        self.msize = 0
        #: True once :meth:`close` has been called.
        self.closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- entry points --------------------------------------------------------

    def handle(self, request: bytes | bytearray | memoryview) -> bytes:
        """Answer one complete request message with one complete reply message.

        Safe to call from several threads at once.  A request that decodes
        but is invalid, or that fails, gets an :class:`~pyxen9p.p9.codec.Rlerror`
        (``EOPNOTSUPP`` for an unknown message type, ``EPROTO`` for a
        malformed body).

        :param request: exactly one message, header included
        :returns: the encoded reply
        :raises ~pyxen9p.errors.ProtocolError: *request* is not even a
            well-framed message (shorter than 7 bytes, or its size field
            differs from its length)
        """
        if type(request) is bytes and len(request) >= c.HEADER_SIZE:  # what rings give
            size, mtype, tag = _HEADER.unpack_from(request)  # c.peek_header, inline
            if size != len(request):
                if size < c.HEADER_SIZE:
                    raise c.ProtocolError(f"size field {size} is smaller than the header")
                raise c.ProtocolError(f"size field says {size} bytes but {len(request)} were given")
        else:
            size, mtype, tag = c.peek_header(request)
            if size != memoryview(request).nbytes:
                raise c.ProtocolError(
                    f"size field says {size} bytes but {memoryview(request).nbytes} were given"
                )
        with self._lock:
            if self.closed:
                return c.encode(c.Rlerror(tag, errno.EIO))
            self._active += 1
            event = _allocate_lock()
            event.acquire()
            self._inflight[tag] = event
        try:
            reply = self._dispatch(request, mtype, tag)
        finally:
            with self._lock:
                if self._inflight.get(tag) is event:
                    del self._inflight[tag]
                event.release()
                self._active -= 1
                if self._active == 0:
                    self._idle.notify_all()
        return reply

    def close(self) -> None:
        """Clunk every fid, release this session's locks, and refuse further requests.

        Waits (up to 30 s) for requests still running.  Idempotent.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            deadline = time.monotonic() + _CLOSE_TIMEOUT
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning("closing a 9P session with %d requests running", self._active)
                    break
                self._idle.wait(left)
        self._clunk_all()
        self._server._forget(self)

    # -- plumbing --------------------------------------------------------------

    def _dispatch(self, request: bytes | bytearray | memoryview, mtype: int, tag: int) -> bytes:
        try:
            msg = c.decode(request)
        except c.ProtocolError as exc:
            known = mtype in c.message_classes()
            _log.debug("bad 9P request (type %d): %s", mtype, exc)
            return c.encode(c.Rlerror(tag, errno.EPROTO if known else errno.EOPNOTSUPP))
        method = _HANDLERS.get(type(msg))
        if method is None:  # an R-message sent as a request
            return c.encode(c.Rlerror(tag, errno.EOPNOTSUPP))
        handler: Callable[[c.Message], c.Message] = getattr(self, method)
        if self.msize == 0 and not isinstance(msg, c.Tversion):
            return c.encode(c.Rlerror(tag, errno.EPROTO))
        try:
            reply = handler(msg)
        except _Err as exc:
            reply = c.Rlerror(tag, exc.errno)
        except OSError as exc:
            reply = c.Rlerror(tag, exc.errno or errno.EIO)
        except (ValueError, OverflowError) as exc:
            _log.debug("9P request %r: %s", msg, exc)
            reply = c.Rlerror(tag, errno.EINVAL)
        except Exception:
            _log.exception("9P request %r failed", msg)
            reply = c.Rlerror(tag, errno.EIO)
        try:
            raw = c.encode(reply)
        except c.ProtocolError:
            _log.exception("cannot encode the reply %r", reply)
            return c.encode(c.Rlerror(tag, errno.EIO))
        if self.msize and len(raw) > self.msize:
            return c.encode(c.Rlerror(tag, errno.EMSGSIZE))
        return raw

    def _clunk_all(self) -> None:
        with self._lock:
            fids = list(self._fids.values())
            self._fids.clear()
            self._listings.clear()
        self._server._count_fids(-len(fids))
        for f in fids:
            with f.lock:
                f.close()

    def _new_fid(self, num: int, loc: _Loc) -> _Fid:
        """Insert a fid for *loc* (ownership moves to the fid, even on failure)."""
        with self._lock:
            if num == c.NOFID:
                loc.close()
                raise _Err(errno.EINVAL)
            if num in self._fids:
                loc.close()
                raise _Err(errno.EBADF)
            if len(self._fids) >= self._server.max_fids:
                loc.close()
                raise _Err(errno.EMFILE)
            if not self._server._count_fids(1):
                loc.close()
                raise _Err(errno.ENFILE)
            self._fid_serial += 1
            fid = _Fid(loc, self._fid_serial)
            self._fids[num] = fid
            return fid

    def _pop(self, num: int) -> _Fid:
        with self._lock:
            fid = self._fids.pop(num, None)
        if fid is None:
            raise _Err(errno.EBADF)
        self._server._count_fids(-1)
        return fid

    def _using(self, *nums: int) -> _Using:
        """Lock the fids numbered *nums* (in a fixed order) for one operation:
        ``with self._using(a, b) as (fa, fb):``."""
        return _Using(self, nums)

    def _writable(self) -> None:
        if self._server.readonly:
            raise _Err(errno.EROFS)

    def _mode(self, mode: int, *, is_dir: bool) -> int:
        mode &= 0o7777
        if not self._server.allow_setid:
            mode &= ~stat.S_ISUID
            if not is_dir:
                mode &= ~stat.S_ISGID
        return mode

    @staticmethod
    def _dir(fid: _Fid) -> int:
        """The O_PATH fd of directory fid *fid* (ENOTDIR otherwise)."""
        if not stat.S_ISDIR(fid.loc.mode):
            raise _Err(errno.ENOTDIR)
        return fid.loc.fd

    def _locate(self, fid: _Fid) -> tuple[int, bytes]:
        """Return (parent dir fd, name) currently naming *fid*'s file (borrowed fd)."""
        if fid.loc.is_root:
            raise _Err(errno.EBUSY)
        st = os.fstat(fid.loc.fd)
        if self._server._is_root(st):
            raise _Err(errno.EBUSY)
        if fid.loc.parent < 0:
            # A directory reached through "..": find its parent and name again.
            parent = os.open(b"..", _DIR_PATH_FLAGS, dir_fd=fid.loc.fd)
            try:
                name = _find_name(parent, st)
            except BaseException:
                _close(parent)
                raise
            fid.loc.parent, fid.loc.name = parent, name
        try:
            cur = os.stat(fid.loc.name, dir_fd=fid.loc.parent, follow_symlinks=False)
        except FileNotFoundError:
            raise _Err(errno.ENOENT) from None
        if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
            raise _Err(errno.ENOENT)  # renamed or replaced since the walk
        return fid.loc.parent, fid.loc.name

    @contextmanager
    def _moving(self) -> Iterator[None]:
        """Serialize renames (server-wide) while the symlink policy checks them."""
        if self._server.symlinks == "any":
            yield
        else:
            with self._server._moves:
                yield

    def _may_move(self, parent: int, name: bytes, newdir: int) -> None:
        """Apply the symlink policy to moving entry *name* of *parent* into *newdir*.

        Moving within one directory is always allowed.  Otherwise (unless the
        policy is ``"any"``) a symbolic link with an unconfined target, or a
        directory whose subtree holds one, is refused with ``EPERM``; a
        subtree too large to check gets ``EXDEV``.  Call with :meth:`_moving` held.
        """
        if self._server.symlinks == "any":
            return
        if _ident(os.fstat(parent)) == _ident(os.fstat(newdir)):
            return
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            if not _confined(os.readlink(name, dir_fd=parent)):
                raise _Err(errno.EPERM)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_PATH_FLAGS, dir_fd=parent)
            try:
                if _ident(os.fstat(fd)) != _ident(st):
                    raise _Err(errno.ENOENT)  # replaced meanwhile
                _check_subtree(fd)
            finally:
                _close(fd)

    # -- operations --------------------------------------------------------------

    def _op_version(self, m: c.Tversion) -> c.Message:
        self._clunk_all()
        if m.version != c.VERSION_9P2000_L:
            self.msize = 0
            return c.Rversion(m.tag, min(m.msize, self._server.msize), c.VERSION_UNKNOWN)
        msize = min(m.msize, self._server.msize)
        if msize < MIN_MSIZE:
            self.msize = 0
            raise _Err(errno.EINVAL)
        self.msize = msize
        return c.Rversion(m.tag, msize, c.VERSION_9P2000_L)

    def _op_auth(self, m: c.Tauth) -> c.Message:
        raise _Err(errno.EOPNOTSUPP)

    def _op_attach(self, m: c.Tattach) -> c.Message:
        if m.afid != c.NOFID:
            raise _Err(errno.EINVAL)
        aname = os.path.normpath(m.aname) if m.aname.startswith("/") else m.aname
        if aname not in ("", "/", *self._server._anames):
            raise _Err(errno.ENOENT)
        fd = os.dup(self._server._root_fd)
        st = os.fstat(fd)
        self._new_fid(m.fid, _Loc(fd, -1, b"", st.st_mode, True))
        return c.Rattach(m.tag, self._server._qid(st))

    def _op_flush(self, m: c.Tflush) -> c.Message:
        with self._lock:
            event = self._inflight.get(m.oldtag)
            mine = self._inflight.get(m.tag)
        if event is not None and event is not mine and event.acquire(timeout=_FLUSH_TIMEOUT):
            event.release()
        return c.Rflush(m.tag)

    def _op_walk(self, m: c.Twalk) -> c.Message:
        with self._using(m.fid) as (fid,):
            if m.newfid == m.fid and m.wnames and fid.open_fd >= 0:
                raise _Err(errno.EBUSY)
            cur = fid.loc
            owned: _Loc | None = None
            qids: list[c.Qid] = []
            try:
                for i, name in enumerate(m.wnames):
                    try:
                        nxt, st = self._step(cur, name)
                    except (_Err, OSError, ValueError) as exc:
                        if i == 0:
                            raise
                        _log.debug("partial walk after %d names: %s", i, exc)
                        return c.Rwalk(m.tag, tuple(qids))
                    if owned is not None:
                        owned.close()
                    owned = cur = nxt
                    qids.append(self._server._qid(st))
                if owned is None:
                    owned = cur.dup()
                if m.newfid == m.fid:
                    old = fid.loc
                    fid.loc = owned
                    fid.dirents = None
                    owned = None
                    old.close()
                else:
                    new, owned = owned, None
                    self._new_fid(m.newfid, new)
                return c.Rwalk(m.tag, tuple(qids))
            finally:
                if owned is not None:
                    owned.close()

    def _step(self, cur: _Loc, name: str) -> tuple[_Loc, os.stat_result]:
        """Walk one name from *cur*; return a new location (owned by the
        caller) and the ``fstat`` of its descriptor."""
        if not stat.S_ISDIR(cur.mode):
            raise _Err(errno.ENOTDIR)
        srv = self._server
        if name == ".":
            loc = cur.dup()
        elif name == "..":
            if cur.is_root or srv._is_root(os.fstat(cur.fd)):
                loc = cur.dup() if cur.is_root else _root_loc(srv)
            else:
                fd = os.open(b"..", _DIR_PATH_FLAGS, dir_fd=cur.fd)
                try:
                    st = os.fstat(fd)
                except BaseException:
                    _close(fd)
                    raise
                return _Loc(fd, -1, b"", st.st_mode, srv._is_root(st)), st
        else:
            raw = _component(name)
            fd = os.open(raw, _PATH_FLAGS, dir_fd=cur.fd)
            try:
                st = os.fstat(fd)
                parent = os.dup(cur.fd)
            except BaseException:
                _close(fd)
                raise
            return _Loc(fd, parent, raw, st.st_mode, False), st
        try:
            return loc, os.fstat(loc.fd)
        except BaseException:
            loc.close()
            raise

    def _op_lopen(self, m: c.Tlopen) -> c.Message:
        with self._using(m.fid) as (fid,):
            if fid.open_fd >= 0:
                raise _Err(errno.EBADF)
            flags, writes = self._open_flags(m.flags)
            mode = fid.loc.mode
            if m.flags & c.L_O_DIRECTORY and not stat.S_ISDIR(mode):
                raise _Err(errno.ENOTDIR)
            if stat.S_ISDIR(mode):
                if writes:
                    raise _Err(errno.EISDIR)
                ofd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fid.loc.fd)
            elif stat.S_ISREG(mode):
                ofd = os.open(_proc(fid.loc.fd), flags)
            elif stat.S_ISFIFO(mode):
                ofd = os.open(_proc(fid.loc.fd), flags | os.O_NONBLOCK)
            elif stat.S_ISLNK(mode):
                raise _Err(errno.ELOOP)
            elif stat.S_ISSOCK(mode):
                raise _Err(errno.ENXIO)
            else:
                raise _Err(errno.EACCES)  # device nodes are never opened
            try:
                st = os.fstat(ofd)
                if (st.st_dev, st.st_ino) != _ident(os.fstat(fid.loc.fd)):
                    raise _Err(errno.ESTALE)
            except BaseException:
                _close(ofd)
                raise
            fid.open_fd = ofd
            fid.open_write = writes
            fid.dirents = None
            return c.Rlopen(m.tag, self._server._qid(st), self._iounit())

    def _iounit(self) -> int:
        return max(0, self.msize - c.IOHDRSZ)

    def _open_flags(self, lflags: int) -> tuple[int, bool]:
        """Translate ``L_O_*`` flags to host open flags; returns (flags, writes)."""
        acc = lflags & c.L_O_ACCMODE
        if acc == c.L_O_NOACCESS:
            raise _Err(errno.EINVAL)
        flags = {c.L_O_RDONLY: os.O_RDONLY, c.L_O_WRONLY: os.O_WRONLY, c.L_O_RDWR: os.O_RDWR}[acc]
        flags |= os.O_CLOEXEC
        if lflags & c.L_O_TRUNC:
            flags |= os.O_TRUNC
        if lflags & c.L_O_APPEND:
            flags |= os.O_APPEND
        if lflags & c.L_O_SYNC:
            flags |= os.O_SYNC
        elif lflags & c.L_O_DSYNC:
            flags |= os.O_DSYNC
        writes = acc != c.L_O_RDONLY or bool(lflags & c.L_O_TRUNC)
        if writes:
            self._writable()
        return flags, writes

    def _op_lcreate(self, m: c.Tlcreate) -> c.Message:
        self._writable()
        with self._using(m.fid) as (fid,):
            dfd = self._dir(fid)
            if fid.open_fd >= 0:
                raise _Err(errno.EBADF)
            name = _component(m.name)
            flags, _ = self._open_flags(m.flags)
            mode = self._mode(m.mode, is_dir=False)
            ofd = _create(dfd, name, flags, mode, exclusive=bool(m.flags & c.L_O_EXCL))
            try:
                st = os.fstat(ofd)
                pfd = os.open(_proc(ofd), _O_PATH | os.O_CLOEXEC)
            except BaseException:
                _close(ofd)
                raise
            old = fid.loc
            fid.loc = _Loc(pfd, old.fd, name, st.st_mode, False)
            _close(old.parent)
            fid.open_fd = ofd
            fid.open_write = True
            fid.dirents = None
            return c.Rlcreate(m.tag, self._server._qid(st), self._iounit())

    def _op_read(self, m: c.Tread) -> c.Message:
        with self._using(m.fid) as (fid,):
            if fid.open_fd < 0:
                raise _Err(errno.EBADF)
            count = min(m.count, self.msize - _RREAD_OVERHEAD)
            if stat.S_ISFIFO(fid.loc.mode):
                data = os.read(fid.open_fd, count)
            else:
                data = os.pread(fid.open_fd, count, m.offset)
            return c.Rread(m.tag, data)

    def _op_write(self, m: c.Twrite) -> c.Message:
        self._writable()
        with self._using(m.fid) as (fid,):
            if fid.open_fd < 0 or not fid.open_write:
                raise _Err(errno.EBADF)
            if stat.S_ISFIFO(fid.loc.mode):
                n = os.write(fid.open_fd, m.data)
            else:
                n = os.pwrite(fid.open_fd, m.data, m.offset)
            return c.Rwrite(m.tag, n)

    def _op_clunk(self, m: c.Tclunk) -> c.Message:
        fid = self._pop(m.fid)
        with fid.lock:
            fid.close()
        return c.Rclunk(m.tag)

    def _op_remove(self, m: c.Tremove) -> c.Message:
        fid = self._pop(m.fid)
        with fid.lock:
            try:
                self._writable()
                parent, name = self._locate(fid)
                if stat.S_ISDIR(fid.loc.mode):
                    os.rmdir(name, dir_fd=parent)
                else:
                    os.unlink(name, dir_fd=parent)
            finally:
                fid.close()
        return c.Rremove(m.tag)

    def _op_statfs(self, m: c.Tstatfs) -> c.Message:
        with self._using(m.fid) as (fid,):
            sv = os.fstatvfs(fid.loc.fd)
        return c.Rstatfs(
            m.tag,
            _V9FS_MAGIC,
            sv.f_bsize & 0xFFFFFFFF,
            sv.f_blocks,
            sv.f_bfree,
            sv.f_bavail,
            sv.f_files,
            sv.f_ffree,
            sv.f_fsid & _U64,
            sv.f_namemax & 0xFFFFFFFF,
        )

    def _op_symlink(self, m: c.Tsymlink) -> c.Message:
        self._writable()
        with self._using(m.fid) as (fid,):
            dfd = self._dir(fid)
            name = _component(m.name)
            target = m.symtgt.encode("utf-8", "surrogateescape")
            if not target or b"\0" in target:
                raise _Err(errno.EINVAL)
            policy = self._server.symlinks
            if policy == "none" or (policy == "confined" and not _confined(target)):
                raise _Err(errno.EPERM)
            os.symlink(target, name, dir_fd=dfd)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            return c.Rsymlink(m.tag, self._server._qid(st))

    def _op_mknod(self, m: c.Tmknod) -> c.Message:
        self._writable()
        with self._using(m.dfid) as (fid,):
            dfd = self._dir(fid)
            name = _component(m.name)
            kind = stat.S_IFMT(m.mode)
            if kind == 0:
                kind = stat.S_IFREG
            if kind not in (stat.S_IFREG, stat.S_IFIFO):
                raise _Err(errno.EPERM)
            os.mknod(name, kind | self._mode(m.mode, is_dir=False), 0, dir_fd=dfd)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            return c.Rmknod(m.tag, self._server._qid(st))

    def _op_rename(self, m: c.Trename) -> c.Message:
        self._writable()
        with self._using(m.fid, m.dfid) as (fid, dfid):
            newdir = self._dir(dfid)
            newname = _component(m.name)
            with self._moving():
                parent, name = self._locate(fid)
                self._may_move(parent, name, newdir)
                os.rename(name, newname, src_dir_fd=parent, dst_dir_fd=newdir)
            newparent = os.dup(newdir)
            _close(fid.loc.parent)
            fid.loc.parent, fid.loc.name = newparent, newname
            return c.Rrename(m.tag)

    def _op_readlink(self, m: c.Treadlink) -> c.Message:
        with self._using(m.fid) as (fid,):
            if not stat.S_ISLNK(fid.loc.mode):
                raise _Err(errno.EINVAL)
            target = os.readlink(b"", dir_fd=fid.loc.fd)
            return c.Rreadlink(m.tag, target.decode("utf-8", "surrogateescape"))

    def _op_getattr(self, m: c.Tgetattr) -> c.Message:
        with self._using(m.fid) as (fid,):
            st = os.fstat(fid.loc.fd)
        a_s, a_ns = divmod(st.st_atime_ns, 10**9)
        m_s, m_ns = divmod(st.st_mtime_ns, 10**9)
        c_s, c_ns = divmod(st.st_ctime_ns, 10**9)
        return c.Rgetattr(
            m.tag,
            c.P9_GETATTR_BASIC,
            self._server._qid(st),
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_nlink,
            st.st_rdev & _U64,
            st.st_size,
            st.st_blksize,
            st.st_blocks,
            a_s,
            a_ns,
            m_s,
            m_ns,
            c_s,
            c_ns,
            0,
            0,
            0,
            0,
        )

    def _op_setattr(self, m: c.Tsetattr) -> c.Message:
        v = m.valid
        if v & 0x1FF == 0:
            return c.Rsetattr(m.tag)
        self._writable()
        with self._using(m.fid) as (fid,):
            mode = fid.loc.mode
            link = stat.S_ISLNK(mode)
            where = _proc(fid.loc.fd)
            if v & c.P9_SETATTR_MODE:
                if link:
                    raise _Err(errno.EOPNOTSUPP)
                os.chmod(where, self._mode(m.mode, is_dir=stat.S_ISDIR(mode)))
            if v & (c.P9_SETATTR_UID | c.P9_SETATTR_GID):
                uid = m.uid if v & c.P9_SETATTR_UID else -1
                gid = m.gid if v & c.P9_SETATTR_GID else -1
                if link:
                    parent, name = self._locate(fid)
                    os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
                else:
                    os.chown(where, uid, gid)
            if v & c.P9_SETATTR_SIZE:
                if stat.S_ISDIR(mode):
                    raise _Err(errno.EISDIR)
                if not stat.S_ISREG(mode):
                    raise _Err(errno.EINVAL)
                if m.size >= 1 << 63:
                    raise _Err(errno.EFBIG)
                if fid.open_fd >= 0 and fid.open_write:
                    os.ftruncate(fid.open_fd, m.size)
                else:
                    os.truncate(where, m.size)
            if v & (c.P9_SETATTR_ATIME | c.P9_SETATTR_MTIME):
                st = os.fstat(fid.loc.fd)
                now = time.time_ns()
                atime = st.st_atime_ns
                mtime = st.st_mtime_ns
                if v & c.P9_SETATTR_ATIME:
                    atime = _ns(m.atime_sec, m.atime_nsec) if v & c.P9_SETATTR_ATIME_SET else now
                if v & c.P9_SETATTR_MTIME:
                    mtime = _ns(m.mtime_sec, m.mtime_nsec) if v & c.P9_SETATTR_MTIME_SET else now
                if link:
                    parent, name = self._locate(fid)
                    os.utime(name, ns=(atime, mtime), dir_fd=parent, follow_symlinks=False)
                else:
                    os.utime(where, ns=(atime, mtime))
        return c.Rsetattr(m.tag)

    def _op_xattrwalk(self, m: c.Txattrwalk) -> c.Message:
        with self._using(m.fid):
            raise _Err(errno.EOPNOTSUPP)

    def _op_xattrcreate(self, m: c.Txattrcreate) -> c.Message:
        self._writable()
        with self._using(m.fid):
            raise _Err(errno.EOPNOTSUPP)

    def _op_readdir(self, m: c.Treaddir) -> c.Message:
        with self._using(m.fid) as (fid,):
            if not stat.S_ISDIR(fid.loc.mode):
                raise _Err(errno.ENOTDIR)
            if fid.open_fd < 0:
                raise _Err(errno.EBADF)
            listing = fid.dirents
            if m.offset == 0 or listing is None:
                listing = fid.dirents = self._list(fid)
                self._keep_listing(fid)
            cookies, packed = listing
            count = min(m.count, self.msize - _RREAD_OVERHEAD)
            i = bisect.bisect_right(cookies, m.offset)
            out: list[bytes] = []
            used = 0
            while i < len(packed) and used + len(packed[i]) <= count:
                out.append(packed[i])
                used += len(packed[i])
                i += 1
            if not out and i < len(packed):
                raise _Err(errno.EINVAL)  # count too small for one entry
            return c.Rreaddir(m.tag, b"".join(out))

    def _keep_listing(self, fid: _Fid) -> None:
        """Note that *fid* holds a listing; drop the least recently made beyond
        :data:`_MAX_LISTINGS` (it is made again if needed: offsets are stable)."""
        with self._lock:
            self._listings[fid.serial] = fid
            self._listings.move_to_end(fid.serial)
            while len(self._listings) > _MAX_LISTINGS:
                _, old = self._listings.popitem(last=False)
                old.dirents = None

    def _list(self, fid: _Fid) -> tuple[list[int], list[bytes]]:
        """Snapshot a directory: entries sorted by cookie, each packed."""
        srv = self._server
        here = os.fstat(fid.loc.fd)
        if fid.loc.is_root or srv._is_root(here):
            up = here
        else:
            pfd = os.open(b"..", _DIR_PATH_FLAGS, dir_fd=fid.loc.fd)
            try:
                up = os.fstat(pfd)
            finally:
                _close(pfd)
        entries = [
            (1, c.Dirent(srv._qid(here), 1, c.DT_DIR, ".")),
            (2, c.Dirent(srv._qid(up), 2, c.DT_DIR, "..")),
        ]
        dfd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fid.loc.fd)
        try:
            with os.scandir(dfd) as it:
                for e in it:
                    raw = os.fsencode(e.name)
                    try:
                        if e.is_symlink():
                            dt = c.DT_LNK
                        elif e.is_dir(follow_symlinks=False):
                            dt = c.DT_DIR
                        elif e.is_file(follow_symlinks=False):
                            dt = c.DT_REG
                        else:
                            dt = _dt_type(e.stat(follow_symlinks=False).st_mode)
                    except OSError:
                        continue  # vanished meanwhile
                    qtype = {c.DT_DIR: c.QTDIR, c.DT_LNK: c.QTSYMLINK}.get(dt, c.QTFILE)
                    qid = c.Qid(qtype, 0, srv._qid_path(here.st_dev, e.inode()))
                    cookie = _cookie(raw)
                    name = raw.decode("utf-8", "surrogateescape")
                    entries.append((cookie, c.Dirent(qid, cookie, dt, name)))
        finally:
            _close(dfd)
        entries.sort(key=lambda t: (t[0], t[1].name))
        return [k for k, _ in entries], [d.pack() for _, d in entries]

    def _op_fsync(self, m: c.Tfsync) -> c.Message:
        with self._using(m.fid) as (fid,):
            if fid.open_fd < 0:
                raise _Err(errno.EBADF)
            if m.datasync:
                os.fdatasync(fid.open_fd)
            else:
                os.fsync(fid.open_fd)
        return c.Rfsync(m.tag)

    def _op_lock(self, m: c.Tlock) -> c.Message:
        with self._using(m.fid) as (fid,):
            key = _ident(os.fstat(fid.loc.fd))
        if m.type not in (c.P9_LOCK_TYPE_RDLCK, c.P9_LOCK_TYPE_WRLCK, c.P9_LOCK_TYPE_UNLCK):
            raise _Err(errno.EINVAL)
        start, end = _range(m.start, m.length)
        owner = self._owner(m.proc_id, m.client_id)
        srv = self._server
        with srv._locks_mutex:
            table = srv._locks.get(key)
            if table is None:
                if m.type == c.P9_LOCK_TYPE_UNLCK:
                    return c.Rlock(m.tag, c.P9_LOCK_SUCCESS)
                table = _FileLocks()
            if m.type != c.P9_LOCK_TYPE_UNLCK and table.conflicts(owner, m.type, start, end):
                return c.Rlock(m.tag, c.P9_LOCK_BLOCKED)
            changes = table.plan(owner, m.type, start, end)
            grow = sum(len(new) - (j - i) for _, i, j, new in changes)
            if grow > 0 and (
                self._nlocks + grow > srv.max_locks or srv._nlocks + grow > srv.max_total_locks
            ):
                raise _Err(errno.ENOLCK)
            delta = table.apply(owner, changes)
            srv._nlocks += delta
            self._nlocks += delta
            held = table.sessions.get(self.serial, 0) + delta
            if held:
                table.sessions[self.serial] = held
                self._lock_keys.add(key)
                srv._locks[key] = table
            else:
                table.sessions.pop(self.serial, None)
                self._lock_keys.discard(key)
                if not table.owners:
                    srv._locks.pop(key, None)
        return c.Rlock(m.tag, c.P9_LOCK_SUCCESS)

    def _op_getlock(self, m: c.Tgetlock) -> c.Message:
        with self._using(m.fid) as (fid,):
            key = _ident(os.fstat(fid.loc.fd))
        if m.type not in (c.P9_LOCK_TYPE_RDLCK, c.P9_LOCK_TYPE_WRLCK):
            raise _Err(errno.EINVAL)
        start, end = _range(m.start, m.length)
        owner = self._owner(m.proc_id, m.client_id)
        with self._server._locks_mutex:
            table = self._server._locks.get(key)
            found = None if table is None else table.conflicting(owner, m.type, start, end)
            if found is not None:
                (_, client_id, proc_id), lk = found
                length = 0 if lk.end == _INF else lk.end - lk.start
                return c.Rgetlock(m.tag, lk.type, lk.start, length, proc_id, client_id)
        return c.Rgetlock(m.tag, c.P9_LOCK_TYPE_UNLCK, m.start, m.length, m.proc_id, m.client_id)

    def _owner(self, proc_id: int, client_id: str) -> _Owner:
        if len(client_id.encode("utf-8", "surrogateescape")) > _MAX_CLIENT_ID:
            raise _Err(errno.EINVAL)
        return (self.serial, client_id, proc_id)

    def _op_link(self, m: c.Tlink) -> c.Message:
        self._writable()
        with self._using(m.dfid, m.fid) as (dfid, fid):
            dfd = self._dir(dfid)
            name = _component(m.name)
            mode = fid.loc.mode
            if stat.S_ISDIR(mode):
                raise _Err(errno.EPERM)
            if stat.S_ISLNK(mode):
                policy = self._server.symlinks
                target = os.readlink(b"", dir_fd=fid.loc.fd)
                if policy == "none" or (policy == "confined" and not _confined(target)):
                    raise _Err(errno.EPERM)  # a new name for a link that may lead outside
                parent, old = self._locate(fid)
                os.link(old, name, src_dir_fd=parent, dst_dir_fd=dfd, follow_symlinks=False)
            else:
                os.link(_proc(fid.loc.fd), name, dst_dir_fd=dfd, follow_symlinks=True)
        return c.Rlink(m.tag)

    def _op_mkdir(self, m: c.Tmkdir) -> c.Message:
        self._writable()
        with self._using(m.dfid) as (fid,):
            dfd = self._dir(fid)
            name = _component(m.name)
            os.mkdir(name, self._mode(m.mode, is_dir=True), dir_fd=dfd)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            return c.Rmkdir(m.tag, self._server._qid(st))

    def _op_renameat(self, m: c.Trenameat) -> c.Message:
        self._writable()
        with self._using(m.olddirfid, m.newdirfid) as (old, new):
            odfd = self._dir(old)
            ndfd = self._dir(new)
            oldname = _component(m.oldname)
            newname = _component(m.newname)
            with self._moving():
                self._may_move(odfd, oldname, ndfd)
                os.rename(oldname, newname, src_dir_fd=odfd, dst_dir_fd=ndfd)
        return c.Rrenameat(m.tag)

    def _op_unlinkat(self, m: c.Tunlinkat) -> c.Message:
        self._writable()
        with self._using(m.dirfd) as (fid,):
            dfd = self._dir(fid)
            name = _component(m.name)
            if m.flags & c.AT_REMOVEDIR:
                os.rmdir(name, dir_fd=dfd)
            else:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise _Err(errno.EISDIR)
                os.unlink(name, dir_fd=dfd)
        return c.Runlinkat(m.tag)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _ns(sec: int, nsec: int) -> int:
    # sec is signed: times before 1970 travel as two's complement (the codec's i64)
    if nsec >= 10**9:
        raise _Err(errno.EINVAL)
    return sec * 10**9 + nsec


def _range(start: int, length: int) -> tuple[int, int]:
    if length == 0:
        return start, _INF
    return start, min(start + length, _INF)


def _root_loc(srv: FileServer) -> _Loc:
    fd = os.dup(srv._root_fd)
    return _Loc(fd, -1, b"", os.fstat(fd).st_mode, True)


#: Errors of Tlcreate on an existing entry that is not a regular file, by file type.
_NOT_REGULAR = {
    stat.S_IFLNK: errno.ELOOP,  # as O_NOFOLLOW
    stat.S_IFDIR: errno.EISDIR,
    stat.S_IFIFO: errno.EEXIST,
    stat.S_IFSOCK: errno.ENXIO,
}


def _create(dfd: int, name: bytes, flags: int, mode: int, *, exclusive: bool) -> int:
    """Open regular file *name* of directory *dfd* with *flags*, creating it if missing.

    Never opens anything but a regular file: an existing entry of another
    type is looked at through an ``O_PATH`` descriptor only, and refused
    (devices ``EACCES``, see :data:`_NOT_REGULAR` for the others).
    """
    for _ in range(8):
        try:
            return os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd)
        except FileExistsError:
            if exclusive:
                raise
        try:
            pfd = os.open(name, _PATH_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            continue  # removed meanwhile: create it
        try:
            kind = stat.S_IFMT(os.fstat(pfd).st_mode)
            if kind != stat.S_IFREG:
                raise _Err(_NOT_REGULAR.get(kind, errno.EACCES))  # devices are never opened
            return os.open(_proc(pfd), flags)
        finally:
            _close(pfd)
    raise _Err(errno.EAGAIN)  # created and removed by someone else, again and again


def _check_subtree(top: int) -> None:
    """Refuse (``EPERM``) if the tree under directory *top* holds an unconfined symbolic link.

    Looks at :data:`MOVE_CHECK_ENTRIES` entries at most, and
    :data:`MOVE_CHECK_DEPTH` levels (``EXDEV`` beyond); holds one descriptor
    per level.  Never follows a symbolic link.
    """
    budget = MOVE_CHECK_ENTRIES
    stack: list[tuple[int, list[bytes]]] = []
    fd = os.dup(top)
    try:
        while True:
            if fd >= 0:
                if len(stack) >= MOVE_CHECK_DEPTH:
                    raise _Err(errno.EXDEV)
                subdirs: list[bytes] = []
                lfd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                try:
                    with os.scandir(lfd) as it:
                        for e in it:
                            budget -= 1
                            if budget < 0:
                                raise _Err(errno.EXDEV)
                            raw = os.fsencode(e.name)
                            try:
                                if e.is_symlink():
                                    if not _confined(os.readlink(raw, dir_fd=fd)):
                                        raise _Err(errno.EPERM)
                                elif e.is_dir(follow_symlinks=False):
                                    subdirs.append(raw)
                            except FileNotFoundError:
                                continue  # removed meanwhile
                finally:
                    _close(lfd)
                stack.append((fd, subdirs))
                fd = -1
            if not stack:
                return
            parent, pending = stack[-1]
            if not pending:
                _close(parent)
                stack.pop()
                continue
            try:
                fd = os.open(pending.pop(), _DIR_PATH_FLAGS, dir_fd=parent)
            except (FileNotFoundError, NotADirectoryError):
                fd = -1  # removed, or replaced by a new (confined) link, meanwhile
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                fd = -1
    finally:
        _close(fd)
        for parent, _ in stack:
            _close(parent)


def _find_name(parent: int, st: os.stat_result) -> bytes:
    """Name of the entry of directory *parent* (O_PATH fd) that is *st*'s inode."""
    dfd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
    try:
        with os.scandir(dfd) as it:
            for e in it:
                if e.inode() == st.st_ino:
                    cand = os.fsencode(e.name)
                    est = os.stat(cand, dir_fd=parent, follow_symlinks=False)
                    if _ident(est) == _ident(st):
                        return cand
    finally:
        _close(dfd)
    raise _Err(errno.ENOENT)


# Request class -> name of the Session method serving it.
_HANDLERS: dict[type[c.Message], str] = {
    cls: "_op_" + cls.__name__[1:]
    for cls in (
        c.Tversion, c.Tauth, c.Tattach, c.Tflush, c.Twalk, c.Tlopen, c.Tlcreate, c.Tread,
        c.Twrite, c.Tclunk, c.Tremove, c.Tstatfs, c.Tsymlink, c.Tmknod, c.Trename,
        c.Treadlink, c.Tgetattr, c.Tsetattr, c.Txattrwalk, c.Txattrcreate, c.Treaddir,
        c.Tfsync, c.Tlock, c.Tgetlock, c.Tlink, c.Tmkdir, c.Trenameat, c.Tunlinkat,
    )
}  # fmt: skip
