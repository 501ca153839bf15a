"""A FUSE file system over a 9P2000.L :class:`~pyxen9p.p9.client.Client`: ``pyxen9p mount``.

The share appears as a directory to every program, as with sshfs:
:func:`mount` mounts it (in the background once the mount is ready, unless
*foreground*), :func:`umount` (or ``fusermount3 -u``) unmounts it, and
SIGTERM, SIGINT and SIGHUP unmount it cleanly.

It is built on `mfusepy <https://pypi.org/project/mfusepy/>`_ (ctypes over
libfuse 3's high-level API, pure Python), installed by the optional extra
``pyxen9p[mount]``; libfuse 3 itself comes from the system (Debian:
``fuse3``).  libfuse's multi-threaded loop serves requests concurrently: the
client keeps one 9P request in flight per FUSE request (and several for a large
read or write).

What programs see:

* every operation is one or a few 9P requests, nothing is cached by the file
  system itself (the kernel keeps attributes and names for one second, the
  usual FUSE default);
* inode numbers are the server's qid paths (``use_ino``), stable for the
  life of a file;
* an error is the server's errno; a request the server leaves unanswered
  ends after the client's timeout with ``EIO``, and once the session is dead
  (the server stopped answering even the Tflush, or the connection is gone)
  every request fails at once with ``ENOTCONN``, so a program never hangs;
  a reply that breaks the protocol (a name with ``/``, a read longer than
  asked...) gives ``EIO``, and so does an errno no system call can return;
* ``rename`` with flags (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``) is
  refused with ``EINVAL`` (9P has no such rename; programs such as ``mv``
  then fall back to a plain rename after their own check).

Over 9P2000.u (xen-9pfsd, directly or through the agent) the same operations
map onto that dialect (Topen, Tcreate, Tstat, directory reads of stats,
removal through ``ORCLOSE``), and what the server cannot do is said as FUSE
programs expect:

* the share's root has attributes made up here when the server does not give
  them (xen-9pfsd): a directory, mode ``0755``, owned by the user who mounted
  it, with the mount's start as its times;
* ``statfs`` (9P2000.u has no Tstatfs) answers zeros, with 4096-byte blocks
  and 255-byte names, as libfuse does for a file system without statfs;
* ``rmdir`` and ``rename`` a server cannot do (xen-9pfsd: no directory
  removal, no Twstat) give ``EPERM``, as rmdir(2) and rename(2) say for a file
  system that does not support them; ``chmod``, ``chown``, ``utimensat`` and
  a ``truncate`` to a size other than 0 give ``EOPNOTSUPP``; a truncation to
  0 (``open(O_TRUNC)``, ``truncate -s 0``) opens the file with ``OTRUNC``;
* ``fsync`` on a server without Twstat answers ``ENOSYS``, which FUSE takes
  as "nothing to do" (the data is written by each Twrite).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
import stat as stat_module
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyxen9p.errors import ProtocolError, Pyxen9pError, TransportError
from pyxen9p.p9 import _dotu
from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client

log = logging.getLogger(__name__)

__all__ = ["ClientOperations", "MountError", "errno_for", "mount", "umount"]

#: The nanoseconds field of a FUSE time that means "now" (``UTIME_NOW``).
_UTIME_NOW = (1 << 30) - 1
#: The nanoseconds field of a FUSE time that means "leave it" (``UTIME_OMIT``).
_UTIME_OMIT = (1 << 30) - 2
#: The largest errno the kernel's FUSE driver takes in a reply.
_MAX_ERRNO = 511

#: Linux open flags passed on in Tlopen / Tlcreate (their 9P2000.L values).
_OPEN_FLAGS = (
    (os.O_TRUNC, c.L_O_TRUNC),
    (os.O_APPEND, c.L_O_APPEND),
    (os.O_EXCL, c.L_O_EXCL),
    (os.O_CREAT, c.L_O_CREAT),
)


class MountError(Pyxen9pError, OSError):
    """The share could not be mounted (or unmounted).

    :ivar status: the exit status of the mount's process, when it ended
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(errno.EIO, message)
        self.status = status

    def __str__(self) -> str:
        return str(self.strerror)


def errno_for(exc: BaseException) -> int:
    """The errno a program gets for *exc*, raised by the client during a FUSE request.

    The server's errno when it is one a system call can return; ``ENOTCONN``
    when the session is gone; ``EIO`` for a timeout, a reply that breaks the
    protocol, or anything else.
    """
    if isinstance(exc, ProtocolError):
        return errno.EIO
    if isinstance(exc, TransportError):
        return errno.ENOTCONN
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        if exc.errno == errno.ETIMEDOUT or not 0 < exc.errno <= _MAX_ERRNO:
            return errno.EIO
        return exc.errno
    return errno.EIO


def _errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a FUSE operation; any exception becomes an :class:`OSError` with :func:`errno_for`."""

    def wrapper(*args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:
            raise OSError(errno_for(exc), os.strerror(errno_for(exc))) from exc

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _open_flags(flags: int) -> int:
    out = flags & os.O_ACCMODE  # the same values in Linux and 9P2000.L
    for local, wire in _OPEN_FLAGS:
        if flags & local:
            out |= wire
    return out


def _attrs(st: os.stat_result) -> dict[str, int]:
    return {
        "st_mode": st.st_mode,
        "st_ino": st.st_ino,
        "st_nlink": st.st_nlink,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_size": st.st_size,
        "st_rdev": st.st_rdev,
        "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


@dataclass
class _Handle:
    fid: int
    iounit: int
    path: str


class ClientOperations:
    """The FUSE operations (mfusepy's path-based interface) over *client*.

    Each method is called by libfuse in one of its threads with the path
    inside the mount (``"/a/b"``); they raise :class:`OSError` with the errno
    of :func:`errno_for`.  Open files and directories are 9P fids held in a
    table of handles until ``release``.

    :param on_ready: called once the kernel has sent FUSE_INIT (the mount is in place)
    """

    #: times are given to mfusepy in nanoseconds
    use_ns = True

    def __init__(self, client: Client, on_ready: Callable[[], None] | None = None) -> None:
        self.client = client
        self._on_ready = on_ready
        self._handles: dict[int, _Handle] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        #: the kernel has sent FUSE_INIT
        self.ready = False
        self._dotu = client._dotu
        self._started = time.time()
        #: the server gave no attributes for the share's root (xen-9pfsd): made up here
        self.local_root = False

    # --- life -------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        """FUSE_INIT: the mount is in place; report it."""
        if config is not None:
            config.use_ino = 1
        if conn is not None:
            log.debug("FUSE_INIT: capable %#x, wanted %#x", conn.capable, conn.want)
        self.ready = True
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        """The file system is unmounted: give back every fid still open."""
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            self.client._clunk_quiet(handle.fid)

    @property
    def open_handles(self) -> int:
        """How many files and directories are open."""
        return len(self._handles)

    def _add(self, fid: int, iounit: int, path: str) -> int:
        with self._lock:
            number = next(self._numbers)
            self._handles[number] = _Handle(fid, iounit, path)
        return number

    def _get(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "no such open file")
        return handle

    # --- attributes ---------------------------------------------------------------

    @_errors
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        """lookup / getattr: the attributes of *path* (a link itself is not followed)."""
        if fh:
            handle = self._get(fh)
            return _attrs(self.client._getattr_fid(handle.fid, handle.path))
        if self._dotu is not None and _dotu.is_root(path):
            if not self.local_root:
                try:
                    return _attrs(self.client.lstat(path))
                except OSError as exc:
                    if exc.errno != errno.EOPNOTSUPP:
                        raise
                    self.local_root = True
                    log.info("the server gives no attributes for the root: made up here")
            return _attrs(_dotu.local_root_stat(self.client.root_qid.path, self._started))
        return _attrs(self.client.lstat(path))

    @_errors
    def chmod(self, path: str, mode: int) -> None:
        """setattr: the permission bits."""
        self.client.chmod(path, mode, follow_symlinks=False)

    @_errors
    def chown(self, path: str, uid: int, gid: int) -> None:
        """setattr: the owner and group (``-1`` leaves one unchanged)."""
        self.client.chown(path, uid, gid, follow_symlinks=False)

    @_errors
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        """setattr: the size."""
        dotu = self._dotu
        if dotu is not None and length == 0:
            # 9P2000.u truncates to 0 with Topen(OTRUNC): servers without Twstat do that
            where = self._get(fh).path if fh else path
            self.client._with_fid(
                where,
                lambda fid, _q, p: dotu.open(fid, c.L_O_WRONLY | c.L_O_TRUNC, p),
                follow=True,
            )
        elif fh:
            handle = self._get(fh)
            self.client._setattr_fid(handle.fid, handle.path, c.P9_SETATTR_SIZE, size=length)
        else:
            self.client.truncate(path, length)

    @_errors
    def utimens(
        self, path: str, times: tuple[tuple[int, int], tuple[int, int]] | None = None
    ) -> None:
        """setattr: the access and modification times, each ``(seconds, nanoseconds)``.

        A nanoseconds field ``UTIME_NOW`` means the server's current time,
        ``UTIME_OMIT`` leaves that time; ``None``: both become the current time.
        """
        valid = 0
        stamps = [(0, 0), (0, 0)]
        for i, (flag, set_flag) in enumerate(
            ((c.P9_SETATTR_ATIME, c.P9_SETATTR_ATIME_SET),
             (c.P9_SETATTR_MTIME, c.P9_SETATTR_MTIME_SET))
        ):
            if times is None:
                valid |= flag
                continue
            sec, nsec = times[i]
            if nsec == _UTIME_OMIT:
                continue
            valid |= flag
            if nsec != _UTIME_NOW:
                if not 0 <= nsec < 1_000_000_000:
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
                valid |= set_flag
                stamps[i] = (sec, nsec)
        if valid:
            self.client._with_fid(
                path,
                lambda fid, _q, p: self.client._setattr_fid(
                    fid, p, valid, atime=stamps[0], mtime=stamps[1]
                ),
                follow=False,
            )

    @_errors
    def statfs(self, path: str) -> dict[str, int]:
        """statfs of the share (over 9P2000.u, which has none: zeros)."""
        if self._dotu is not None:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}
        s = self.client.statfs(path)
        return {
            "f_bsize": s.bsize,
            "f_frsize": s.bsize,
            "f_blocks": s.blocks,
            "f_bfree": s.bfree,
            "f_bavail": s.bavail,
            "f_files": s.files,
            "f_ffree": s.ffree,
            "f_favail": s.ffree,
            "f_namemax": s.namelen,
        }

    # --- names ------------------------------------------------------------------

    @_errors
    def readlink(self, path: str) -> str:
        """The target of the symbolic link *path*."""
        return self.client.readlink(path)

    @_errors
    def mkdir(self, path: str, mode: int) -> None:
        """Make directory *path* (the kernel has applied the umask)."""
        self.client.mkdir(path, mode)

    @_errors
    def unlink(self, path: str) -> None:
        """Remove the non-directory *path*."""
        self.client.remove(path)

    @_errors
    def rmdir(self, path: str) -> None:
        """Remove the empty directory *path* (``EPERM`` where the server cannot)."""
        with self._unsupported_is_eperm():
            self.client.rmdir(path)

    @contextlib.contextmanager
    def _unsupported_is_eperm(self) -> Any:
        """Over 9P2000.u, a server's "not supported" becomes ``EPERM``: what rmdir(2)
        and rename(2) give on a file system that does not support the operation."""
        try:
            yield
        except OSError as exc:
            if self._dotu is None or exc.errno != errno.EOPNOTSUPP:
                raise
            raise OSError(errno.EPERM, str(exc)) from exc

    @_errors
    def symlink(self, path: str, target: str) -> None:
        """Make the symbolic link *path* pointing to *target*."""
        self.client.symlink(target, path)

    @_errors
    def link(self, path: str, existing: str) -> None:
        """Make the hard link *path* to the file *existing*."""
        self.client.link(existing, path)

    @_errors
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """Rename *old* to *new*, replacing *new*; any *flags* are refused (``EINVAL``)."""
        if flags:
            raise OSError(errno.EINVAL, "rename flags are not supported over 9P")
        with self._unsupported_is_eperm():
            self.client.rename(old, new)

    # --- directories --------------------------------------------------------------

    @_errors
    def opendir(self, path: str) -> int:
        """Open directory *path* (its entries are read by :meth:`readdir`)."""
        if not self.client.is_dir(path):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return 0

    @_errors
    def readdir(self, path: str, fh: int) -> Iterable[str | tuple[str, dict[str, int], int]]:
        """The entries of directory *path*, with their inode numbers and types."""
        entries: list[str | tuple[str, dict[str, int], int]] = [".", ".."]
        with self.client.scandir(path) as it:
            for entry in it:
                entries.append(
                    (entry.name, {"st_ino": entry.inode(), "st_mode": entry.d_type << 12}, 0)
                )
        return entries

    @_errors
    def releasedir(self, path: str, fh: int) -> None:
        """Close a directory opened by :meth:`opendir` (nothing is held)."""

    @_errors
    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        """fsync of a directory: nothing is held, nothing to do."""

    # --- files ------------------------------------------------------------------

    @_errors
    def open(self, path: str, flags: int) -> int:
        """Open *path* with Tlopen: a new handle."""
        client = self.client
        fid, qid, display = client._lookup(path, follow=False)
        try:
            if qid.type & c.QTDIR:
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
            wire = _open_flags(flags) & ~(c.L_O_CREAT | c.L_O_EXCL)
            if self._dotu is not None:
                iounit = self._dotu.open(fid, wire, display)[1]
            else:
                iounit = client._rpc(lambda t: c.Tlopen(t, fid, wire), c.Rlopen, display).iounit
        except BaseException:
            client._clunk_quiet(fid)
            raise
        return self._add(fid, client._iounit(iounit), display)

    @_errors
    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        """Create and open *path* with Tlcreate: a new handle."""
        client = self.client
        dfid, name, display = client._lookup_parent(path, errno.EISDIR)
        wire = _open_flags(flags) | c.L_O_CREAT
        try:
            if self._dotu is not None:
                perm = _dotu.dm_mode(stat_module.S_IFREG | (mode & 0o7777))
                iounit = self._dotu.create(dfid, name, wire, perm, display)[1]
            else:
                iounit = client._rpc(
                    lambda t: c.Tlcreate(t, dfid, name, wire, mode & 0o7777, client.gid),
                    c.Rlcreate,
                    display,
                ).iounit
        except BaseException:
            client._clunk_quiet(dfid)
            raise
        return self._add(dfid, client._iounit(iounit), display)  # dfid now is the file

    @_errors
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        """Read up to *size* bytes at *offset* (short only at the end of the file)."""
        handle = self._get(fh)
        buffer = bytearray(size)
        view = memoryview(buffer)
        total = 0
        while total < size:
            n = self.client._pread_into(
                handle.fid, offset + total, view[total:], handle.iounit, handle.path
            )
            if n == 0:
                break
            total += n
        return bytes(view[:total])

    @_errors
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        """Write *data* at *offset*: the byte count the server took."""
        handle = self._get(fh)
        return self.client._pwrite_from(
            handle.fid, offset, memoryview(data), handle.iounit, handle.path, parallel=True
        )

    @_errors
    def flush(self, path: str, fh: int) -> None:
        """close() of one descriptor: writes are not buffered here, nothing to do."""

    @_errors
    def fsync(self, path: str, datasync: int, fh: int) -> None:
        """Tfsync of the open file (over 9P2000.u: a Twstat that changes nothing;
        ``ENOSYS``, which FUSE takes as nothing to do, where the server has none)."""
        handle = self._get(fh)
        try:
            self.client._fsync_fid(handle.fid, handle.path, bool(datasync))
        except OSError as exc:
            if self._dotu is None or exc.errno != errno.EOPNOTSUPP:
                raise
            raise OSError(errno.ENOSYS, "no Twstat: each Twrite is already written") from exc

    @_errors
    def release(self, path: str, fh: int) -> None:
        """The last descriptor of a handle is closed: clunk its fid."""
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            self.client._clunk_quiet(handle.fid)


def _fuse_class() -> Any:
    """mfusepy's ``FUSE``, with rename's flags passed on (mfusepy drops them), and the
    times of utimens as libfuse gives them (``UTIME_NOW`` and ``UTIME_OMIT`` kept apart)."""
    try:
        import mfusepy  # type: ignore[import-untyped]
    except (ImportError, OSError) as exc:
        raise MountError(
            f"the mount needs mfusepy and libfuse 3 (pip install 'pyxen9p[mount]', "
            f"apt install fuse3): {exc}"
        ) from exc

    class _FUSE(mfusepy.FUSE):  # type: ignore[misc]
        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            self.operations.rename(
                old.decode(self.encoding, self.errors),
                new.decode(self.encoding, self.errors),
                flags,
            )
            return 0

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            times = None
            if buf:
                a, m = buf.contents.actime, buf.contents.modtime
                times = ((a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec))
            self.operations.utimens(
                None if path is None else path.decode(self.encoding, self.errors), times
            )
            return 0

    return _FUSE


def _fuse_options(
    readonly: bool, allow_other: bool, options: Sequence[str], fsname: str
) -> dict[str, Any]:
    # attributes are asked for each time, as the kernel's 9p client does
    # without a cache: a hard link or the host's own change shows at once
    opts: dict[str, Any] = {
        "fsname": fsname, "subtype": "pyxen9p", "use_ino": True, "attr_timeout": "0",
    }
    if readonly:
        opts["ro"] = True
    if allow_other:
        opts["allow_other"] = True
    for option in options:
        for item in option.split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            opts[key] = value if sep else True
    return opts


def _serve(
    client: Client,
    mountpoint: str,
    opts: dict[str, Any],
    debug: bool,
    on_ready: Callable[[], None] | None,
) -> None:
    """Mount and serve until unmounted (libfuse's signal handlers unmount on a signal)."""
    fuse_class = _fuse_class()
    client.umask = 0  # the kernel has applied the caller's umask
    operations = ClientOperations(client, on_ready)
    try:
        fuse_class(operations, mountpoint, foreground=True, debug=debug, **opts)
    except RuntimeError as exc:
        # libfuse's status is the signal's number when a signal ended a mount
        # that was in place: a clean end; before the mount it is a failure
        if not operations.ready:
            raise MountError(f"{mountpoint}: mount failed (libfuse status {exc})") from exc
    finally:
        operations.destroy("/")


def mount(
    client: Client | Callable[[], Client],
    mountpoint: str | os.PathLike[str],
    *,
    foreground: bool = False,
    readonly: bool = False,
    allow_other: bool = False,
    options: Sequence[str] = (),
    fsname: str = "pyxen9p",
    debug: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount the share of *client* on *mountpoint* with FUSE, like sshfs.

    In the foreground, serve until the file system is unmounted
    (:func:`umount`, ``fusermount3 -u``, or SIGTERM / SIGINT / SIGHUP to this
    process), then close the client.  Otherwise fork: the child connects,
    mounts and serves, with its standard streams on ``/dev/null`` once the
    mount is ready; this call returns in the parent when the mount is ready,
    or raises the child's error.  Forking is only safe in a process with one
    thread, before any connection: daemonizing needs *client* to be a
    factory (a callable that connects, such as
    ``lambda: pyxen9p.connect(tag="share")``).

    :param client: a connected client, or a callable that connects one
    :param readonly: mount read-only (``-o ro``)
    :param allow_other: let other users in (``-o allow_other``; for a user
        other than root, ``/etc/fuse.conf`` must allow it)
    :param options: more ``-o`` options for libfuse and the kernel
        (``"default_permissions,max_read=65536"``...)
    :param fsname: the source shown by ``mount`` and ``df``
    :param debug: libfuse's debug output on stderr (implies the foreground)
    :param on_ready: called in the serving process once the mount is in place
    :raises MountError: the mount failed (in the parent: with the child's
        message and exit status)
    :raises OSError: the client could not connect
    """
    path = os.path.abspath(os.fspath(mountpoint))
    if not os.path.isdir(path):
        raise MountError(f"{path}: the mount point is not a directory")
    opts = _fuse_options(readonly, allow_other, options, fsname)
    _fuse_class()  # fail here, before any fork, when FUSE is not installed
    if foreground or debug:
        session = client if isinstance(client, Client) else client()
        try:
            _serve(session, path, opts, debug, on_ready)
        finally:
            session.close()
        return
    if isinstance(client, Client):
        raise ValueError("mount in the background needs a function that connects, not a client")
    _daemonize(client, path, opts, on_ready)


def _daemonize(
    factory: Callable[[], Client],
    path: str,
    opts: dict[str, Any],
    on_ready: Callable[[], None] | None,
) -> None:
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace")
        if message == "ready":
            return
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        text = message.removeprefix("error: ") or f"the mount process ended with status {code}"
        raise MountError(text, code if code > 0 else 1)
    # the child: never returns into the caller
    status = 1
    try:
        os.close(read_end)
        os.setsid()
        ready = threading.Event()

        def report_ready() -> None:
            if on_ready is not None:
                on_ready()
            ready.set()
            _detach_stdio()
            os.write(write_end, b"ready")
            os.close(write_end)

        try:
            session = factory()
        except Exception as exc:
            os.write(write_end, f"error: {exc}".encode())
            raise
        try:
            _serve(session, path, opts, False, report_ready)
        except Exception as exc:
            if not ready.is_set():
                os.write(write_end, f"error: {exc}".encode())
            raise
        finally:
            session.close()
        status = 0
    except BaseException:  # reported through the pipe, or after the mount: nobody to tell
        pass
    finally:
        os._exit(status)


def _detach_stdio() -> None:
    """Standard input, output and error on ``/dev/null`` (the daemon has no terminal)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)


def umount(mountpoint: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount the FUSE file system on *mountpoint* with ``fusermount3 -u``.

    The serving process then closes its client and exits.

    :param lazy: detach now, even if busy (``-z``)
    :raises MountError: it could not be unmounted (not mounted, busy...)
    """
    path = os.path.abspath(os.fspath(mountpoint))
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 not found (Debian: apt install fuse3)")
    command = [tool, "-u", *(["-z"] if lazy else []), path]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MountError(
            done.stderr.strip() or f"{path}: fusermount3 failed", done.returncode
        )

