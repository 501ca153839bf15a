"""An fsspec file system for Xen 9pfs shares and 9P2000.L servers: protocol ``xen9p``.

Installed with the ``fsspec`` extra (``pip install 'pyxen9p[fsspec]'``), it is
registered through the ``fsspec.specs`` entry point, so every library that
speaks fsspec (pandas, dask, pyarrow, xarray...) reads and writes the share::

    import fsspec

    with fsspec.open("xen9p://share/data.csv", "rt") as f:   # the host is the tag
        print(f.readline())

    fs = fsspec.filesystem("xen9p", simulate="/srv/data")   # a simulated Xen
    fs.pipe_file("/hello.txt", b"hello")
    print(fs.ls("/", detail=True))

    fs = fsspec.filesystem("xen9p", server="unix:/run/pyxen9p/share.sock")  # any 9P server

The URL ``xen9p://TAG/PATH`` names the device by its tag and a path below the
share's root; paths inside the file system are absolute (``/data.csv``).
Storage options: the selectors of :func:`pyxen9p.connect` (``tag``,
``devid``, ``path``, ``simulate``), or ``server`` (``unix:PATH`` or
``tcp:HOST:PORT``: a 9P2000.L server, such as the agent of a device); the
other options of :func:`~pyxen9p.connect` and of
:class:`~pyxen9p.p9.client.Client` (``readonly``, ``timeout``,
``request_timeout``, ``msize``, ``aname``, ``window``, ``max_read``,
``max_entries``, ``umask``...); and ``auto_mkdir`` (default ``True``: writing
a file creates its missing parent directories, as fsspec's object stores do).

Connections.  fsspec caches file system instances by their arguments (and
thread); pyxen9p's :class:`~pyxen9p.p9.client.Client` is thread-safe, so all
instances of one process with the same connection arguments share one
connection (a device served by QEMU can be connected only once: a second
connection to the same device would be refused).  A connection that was
closed (:meth:`Xen9pFileSystem.close`) or whose transport failed is never
used again: the next operation connects anew.  After ``fork()``, the child
never touches the parent's connections (not even to close them, which would
disturb the parent's session): its first operation opens its own.  To reach
a real device from many processes, or to connect more than once, point
``server`` at the device's agent (``pyxen9p serve``).

There is no listing cache (files on a share change from the host side at any
time): every :meth:`~Xen9pFileSystem.ls` and :meth:`~Xen9pFileSystem.info`
asks the server.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import io
import os
import posixpath
import secrets
import shutil
import stat as stat_module
import threading
import time
from collections.abc import Callable, Iterator
from glob import has_magic
from typing import Any, ClassVar, cast

import fsspec
import fsspec.callbacks
import fsspec.utils

from pyxen9p.agent import parse_address
from pyxen9p.errors import ProtocolError, TransportClosedError, TransportError
from pyxen9p.p9 import _dotu
from pyxen9p.p9.client import Client, DirEntry

__all__ = ["PROTOCOL", "Xen9pFile", "Xen9pFileSystem"]

#: The protocol name: ``xen9p://TAG/PATH``.
PROTOCOL = "xen9p"

# Options consumed by this module (the others go to the connection).
_SELECTORS = ("tag", "devid", "path", "simulate", "server")


# --------------------------------------------------------------------------
# Connections


def _open_client(selectors: dict[str, Any], options: dict[str, Any]) -> Client:
    """Connect as the storage options say (a server address, or a device)."""
    import pyxen9p

    server = selectors.get("server")
    if server is not None:
        return pyxen9p.connect(server=server, **options)

    return pyxen9p.connect(
        tag=selectors.get("tag"),
        devid=selectors.get("devid"),
        path=selectors.get("path"),
        simulate=selectors.get("simulate"),
        **options,
    )


class _Connections:
    """The connections of this process, shared by the instances with the same arguments."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}
        # Connections inherited through fork(): kept referenced, never used or
        # closed (their finalizers would talk to the parent's peer).
        self._inherited: list[Client] = []

    def get(self, key: str, factory: Callable[[], Client]) -> Client:
        with self._lock:
            client = self._clients.get(key)
            if client is not None and client.usable:
                return client
            if client is not None:
                del self._clients[key]
                with contextlib.suppress(Exception):
                    client.close()
            client = factory()
            self._clients[key] = client
            return client

    def close(self, key: str) -> None:
        with self._lock:
            client = self._clients.pop(key, None)
        if client is not None:
            client.close()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._inherited.extend(self._clients.values())
        self._clients = {}


_connections = _Connections()
os.register_at_fork(after_in_child=_connections.after_fork_in_child)


# --------------------------------------------------------------------------
# The file system


class Xen9pFileSystem(fsspec.AbstractFileSystem):  # type: ignore[misc]
    """fsspec's view of one 9P2000.L share: a Xen 9pfs device or a 9P server.

    Made by ``fsspec.filesystem("xen9p", ...)`` or from a ``xen9p://TAG/PATH``
    URL; the keyword arguments are the storage options of the module's
    description.  Errors are the :class:`OSError` subclasses the server's
    errno gives (:class:`FileNotFoundError`, :class:`FileExistsError`,
    :class:`IsADirectoryError`...); a broken server's
    :class:`~pyxen9p.errors.ProtocolError` and a failed transport's
    :class:`~pyxen9p.errors.TransportError` are raised as they are, never
    taken for a missing file.

    :param auto_mkdir: writing a file (:meth:`open` for writing,
        :meth:`pipe_file`, :meth:`put_file`, :meth:`touch`,
        :meth:`cp_file`) creates its missing parent directories
    :raises OSError: the share cannot be reached
    """

    protocol = PROTOCOL
    root_marker = "/"
    #: Paths starting with this are split by :meth:`_strip_protocol`.
    _prefix: ClassVar[str] = PROTOCOL + "://"

    def __init__(
        self,
        *,
        tag: str | None = None,
        devid: int | None = None,
        path: str | None = None,
        simulate: str | os.PathLike[str] | None = None,
        server: str | None = None,
        auto_mkdir: bool = True,
        **options: Any,
    ) -> None:
        fs_options = {
            k: options.pop(k)
            for k in ("use_listings_cache", "listings_expiry_time", "max_paths")
            if k in options
        }
        super().__init__(**fs_options)
        if server is not None:
            parse_address(server, connect=True)  # a wrong address fails here
            if devid is not None or path is not None or simulate is not None:
                raise ValueError("server= names the share: no devid, path or simulate with it")
        self.tag = tag
        self.auto_mkdir = auto_mkdir
        self._given: Client | None = options.pop("_client", None)
        self._selectors: dict[str, Any] = {
            "tag": tag,
            "devid": devid,
            "path": path,
            "simulate": None if simulate is None else os.fspath(simulate),
            "server": server,
        }
        self._options = options
        # with a server address, the tag only names the share in URLs
        used = {"server": server} if server is not None else self._selectors
        self._key = fsspec.utils.tokenize(sorted(used.items()), sorted(options.items()))
        self._pid = os.getpid()
        self._started = time.time()  # the times of a root without attributes (xen-9pfsd)
        self.client  # connect now: a wrong tag or address fails here  # noqa: B018

    @classmethod
    def from_client(cls, client: Client, **options: Any) -> Xen9pFileSystem:
        """A file system over an open *client* (never cached, never reconnected).

        Closing the file system closes the client.

        :param options: ``auto_mkdir``
        """
        return cls(_client=client, skip_instance_cache=True, **options)

    # --- the connection ----------------------------------------------------

    @property
    def client(self) -> Client:
        """The connection in use: a new one if the last was closed or failed, or after fork."""
        if self._given is not None:
            if os.getpid() != self._pid:
                raise TransportClosedError(
                    errno.ENOTCONN,
                    "a client given to Xen9pFileSystem.from_client is not usable after fork()",
                )
            return self._given
        return _connections.get(self._key, lambda: _open_client(self._selectors, self._options))

    def close(self) -> None:
        """Close the connection (every instance sharing it reconnects on its next use)."""
        if self._given is not None:
            self._given.close()
        else:
            _connections.close(self._key)

    # --- paths ---------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        """``xen9p://TAG/a/b/`` (or ``a/b``, ``/a/b``) -> ``/a/b``: absolute, no trailing ``/``.

        The text after the tag is taken as it is (``?`` and ``#`` are part of
        file names, not a query or fragment); ``.`` and ``..`` are resolved by
        the client, never above the share's root.
        """
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = fsspec.utils.stringify_path(path)
        if text.startswith(cls._prefix):
            text = text[len(cls._prefix) :]
            slash = text.find("/")
            text = "" if slash < 0 else text[slash:]
        parts = [p for p in text.split("/") if p]
        return "/" + "/".join(parts)

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        """The storage options a URL carries: ``{"tag": host}`` of ``xen9p://host/...``."""
        prefix = PROTOCOL + "://"
        if not path.startswith(prefix):
            return {}
        host = path[len(prefix) :].split("/", 1)[0]
        return {"tag": host} if host else {}

    def unstrip_protocol(self, name: str) -> str:
        """The URL of *name*: ``xen9p://TAG/name`` (no tag: ``xen9p:///name``)."""
        return f"{self._prefix}{self.tag or ''}{self._strip_protocol(name)}"

    # --- information -----------------------------------------------------------

    def _entry_info(self, name: str, lst: os.stat_result) -> dict[str, Any]:
        """The info dict of *name* whose own (not followed) attributes are *lst*.

        A symbolic link reads as its target when that is a regular file
        (``size`` and ``mode`` are the target's) and as ``"other"`` otherwise,
        so that walk, find, rm and copy never descend through a link (a link
        loop cannot make them endless); ``islink`` and ``destination`` tell.
        """
        st = lst
        islink = stat_module.S_ISLNK(lst.st_mode)
        destination = None
        if islink:
            client = self.client
            destination = client.readlink(name)
            try:
                target = client.stat(name)
            except (FileNotFoundError, NotADirectoryError):
                pass  # dangling
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
            else:
                if stat_module.S_ISREG(target.st_mode):
                    st = target
        if stat_module.S_ISDIR(st.st_mode):
            kind = "directory"
        elif stat_module.S_ISREG(st.st_mode):
            kind = "file"
        else:
            kind = "other"
        info: dict[str, Any] = {
            "name": name,
            "size": st.st_size,
            "type": kind,
            "mode": st.st_mode,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "nlink": st.st_nlink,
            "ino": st.st_ino,
            "mtime": st.st_mtime,
            "atime": st.st_atime,
            "ctime": st.st_ctime,
            "mtime_ns": st.st_mtime_ns,
            "created": st.st_ctime,
            "islink": islink,
        }
        if destination is not None:
            info["destination"] = destination
        return info

    def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
        """The info dict of *path*: ``name``, ``size``, ``type`` (``"file"``,
        ``"directory"``, ``"other"``), ``mode``, ``uid``, ``gid``, ``nlink``,
        ``ino`` (the qid path), ``mtime``, ``atime``, ``ctime`` (seconds),
        ``mtime_ns``, ``created`` (the change time: 9P2000.L carries no birth
        time to this client), ``islink`` and, for a link, ``destination``.
        """
        name = self._strip_protocol(path)
        client = self.client
        try:
            return self._entry_info(name, client.lstat(name))
        except OSError as exc:
            # xen-9pfsd gives no attributes for the share's root: a directory, made up here
            if exc.errno != errno.EOPNOTSUPP or name != self.root_marker or client._dotu is None:
                raise
            made_up = _dotu.local_root_stat(client.root_qid.path, self._started)
            return self._entry_info(name, made_up)

    def ls(self, path: Any, detail: bool = True, **kwargs: Any) -> list[Any]:
        """The entries of directory *path* (their info dicts, or names); a file lists itself.

        Each entry's attributes take one Tgetattr; up to the client's
        ``window`` of them are in flight at once.
        """
        name = self._strip_protocol(path)
        client = self.client
        try:
            with client.scandir(name) as it:
                entries = list(it)
        except NotADirectoryError:
            info = self.info(name)
            return [info] if detail else [info["name"]]
        names = [posixpath.join(name, e.name) for e in entries]
        if not detail:
            return names

        def entry_info(full: str, entry: DirEntry) -> Callable[[], dict[str, Any] | None]:
            def task() -> dict[str, Any] | None:
                try:
                    return self._entry_info(full, entry.stat(follow_symlinks=False))
                except FileNotFoundError:
                    return None  # removed meanwhile

            return task

        infos = client._parallel(
            [entry_info(n, e) for n, e in zip(names, entries, strict=True)], new_fids=True
        )
        return [i for i in infos if i is not None]

    def walk(
        self, path: Any, maxdepth: int | None = None, topdown: bool = True,
        on_error: Any = "omit", **kwargs: Any,
    ) -> Iterator[Any]:
        """fsspec's walk, except that a broken server is never taken for an unreadable directory.

        A listing that breaks the protocol (:class:`~pyxen9p.errors.ProtocolError`),
        a failed transport and a timeout are raised whatever *on_error* says
        (``"omit"``, the default, would otherwise leave that directory out of
        :meth:`find`, :meth:`glob`, :meth:`du`, ``rm(recursive=True)``... without
        a word).
        """

        def guarded(exc: OSError) -> None:
            if isinstance(exc, (ProtocolError, TransportError, TimeoutError)):
                raise exc
            if on_error == "raise":
                raise exc
            if callable(on_error):
                on_error(exc)

        yield from super().walk(path, maxdepth, topdown, on_error=guarded, **kwargs)

    def exists(self, path: Any, **kwargs: Any) -> bool:
        """Whether *path* exists (a dangling link does not; see :meth:`lexists`).

        Only a missing path answers ``False``: a failed transport or a broken
        reply is raised.
        """
        return self.client.exists(self._strip_protocol(path))

    def lexists(self, path: Any, **kwargs: Any) -> bool:
        """Whether *path* exists, a dangling link included."""
        return self.client.exists(self._strip_protocol(path), follow_symlinks=False)

    def _kind(self, path: Any) -> str | None:
        try:
            return cast(str, self.info(path)["type"])
        except (FileNotFoundError, NotADirectoryError):
            return None

    def isdir(self, path: Any) -> bool:
        """Whether *path* is a directory (errors other than a missing path are raised)."""
        return self._kind(path) == "directory"

    def isfile(self, path: Any) -> bool:
        """Whether *path* is a regular file (errors other than a missing path are raised)."""
        return self._kind(path) == "file"

    def _datetime(self, path: Any, field: str) -> datetime.datetime:
        info = self.info(path)
        try:
            return datetime.datetime.fromtimestamp(info[field], tz=datetime.timezone.utc)
        except (OverflowError, ValueError, OSError):
            raise OSError(
                errno.EOVERFLOW,
                f"the {field} {info[field]!r} is out of datetime's range",
                info["name"],
            ) from None

    def created(self, path: Any) -> datetime.datetime:
        """The change time of *path* (9P2000.L gives this client no birth time), in UTC.

        :raises OSError: ``EOVERFLOW``: a time no :class:`~datetime.datetime` holds
        """
        return self._datetime(path, "ctime")

    def modified(self, path: Any) -> datetime.datetime:
        """The modification time of *path*, in UTC.

        :raises OSError: ``EOVERFLOW``: a time no :class:`~datetime.datetime` holds
        """
        return self._datetime(path, "mtime")

    def ukey(self, path: Any) -> str:
        """A key that changes when the file does: its inode, size and mtime (one Tgetattr)."""
        info = self.info(path)
        text = f"{info['ino']}:{info['size']}:{info['mtime_ns']}:{info['mode']}"
        return hashlib.sha256(text.encode()).hexdigest()

    def checksum(self, path: Any) -> int:
        """:meth:`ukey` as an integer (not the access time, which reading changes)."""
        return int(self.ukey(path), 16)

    # --- directories -----------------------------------------------------------

    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        """Create directory *path* (``FileExistsError`` if it exists); ``mode=`` sets its bits."""
        name = self._strip_protocol(path)
        mode = kwargs.get("mode", 0o777)
        if create_parents:
            parent = self._parent(name)
            if parent != self.root_marker:
                self.client.makedirs(parent, mode, exist_ok=True)
        self.client.mkdir(name, mode)

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        """Create directory *path* and its missing parents."""
        self.client.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def rmdir(self, path: Any) -> None:
        """Remove the empty directory *path*."""
        self.client.rmdir(self._strip_protocol(path))

    def rm_file(self, path: Any) -> None:
        """Remove the file, link or empty directory *path* (a link is never followed)."""
        name = self._strip_protocol(path)
        client = self.client
        if stat_module.S_ISDIR(client.lstat(name).st_mode):
            client.rmdir(name)
        else:
            client.remove(name)

    def _rm(self, path: Any) -> None:
        self.rm_file(path)

    # --- reading and writing -------------------------------------------------------

    def _make_parent(self, name: str) -> None:
        if self.auto_mkdir:
            parent = self._parent(name)
            if parent != self.root_marker:
                self.client.makedirs(parent, exist_ok=True)

    def _open(
        self,
        path: Any,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Xen9pFile:
        name = self._strip_protocol(path)
        if set(mode) & set("wxa+"):
            self._make_parent(name)
        return Xen9pFile(self, name, mode, block_size=block_size, autocommit=autocommit)

    def cat_file(
        self, path: Any, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """The bytes of file *path* from *start* to *end* (negative: from the end).

        A range is read straight from the server, several Treads in flight;
        at most the client's ``max_read`` bytes are taken (``EFBIG`` beyond),
        whatever size the server claims.
        """
        name = self._strip_protocol(path)
        client = self.client
        with client.open(name, "rb", buffering=0) as raw:
            if start is None and end is None:
                return raw.readall()
            size = 0
            if (start is not None and start < 0) or (end is not None and end < 0):
                size = raw.stat().st_size
            first = 0 if start is None else start if start >= 0 else max(0, size + start)
            last = None if end is None else end if end >= 0 else max(0, size + end)
            raw.seek(first)
            if last is None:
                return raw.readall()
            want = last - first
            limit = client.max_read
            if limit is not None and want > limit:
                raise OSError(
                    errno.EFBIG, f"a range of more than {limit} bytes (Client.max_read)", name
                )
            chunks: list[bytes] = []
            step = raw.iounit * client.window
            while want > 0:
                chunk = raw.read(min(want, step))
                if not chunk:
                    break
                chunks.append(chunk)
                want -= len(chunk)
            return b"".join(chunks)

    def pipe_file(self, path: Any, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """Write *value* as the whole file *path*; ``mode="create"`` refuses an existing one.

        ``"create"`` is atomic (Tlcreate with ``O_EXCL``): :class:`FileExistsError`.
        """
        name = self._strip_protocol(path)
        self._make_parent(name)
        with self.client.open(name, "xb" if mode == "create" else "wb") as f:
            f.write(value)

    def touch(self, path: Any, truncate: bool = True, **kwargs: Any) -> None:
        """Create *path* empty, or (``truncate=False``) set an existing one's times to now."""
        name = self._strip_protocol(path)
        client = self.client
        if not truncate and client.exists(name):
            client.utime(name)
            return
        self._make_parent(name)
        with client.open(name, "wb"):
            pass

    def cp_file(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        """Copy the file *path1* to *path2* through the client (9P has no server-side copy).

        A directory is created, not copied (:meth:`copy` with ``recursive``
        copies its files).
        """
        src = self._strip_protocol(path1)
        dst = self._strip_protocol(path2)
        client = self.client
        if client.is_dir(src):
            client.makedirs(dst, exist_ok=True)
            return
        self._make_parent(dst)
        with client.open(src, "rb", buffering=0) as fin, client.open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, fin.iounit * client.window)

    def mv(
        self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Move *path1* to *path2* with one server-side rename (a whole tree at once).

        Into an existing directory *path2* when it is one (as ``mv`` does).
        Lists and glob patterns are moved one path at a time, as
        :meth:`copy` names them.
        """
        if isinstance(path1, list) or isinstance(path2, list) or has_magic(path1):
            if isinstance(path1, list) and isinstance(path2, list):
                pairs = list(zip(path1, path2, strict=True))
            else:
                sources = self.expand_path(path1, recursive=False, maxdepth=maxdepth)
                targets = fsspec.utils.other_paths(
                    sources, path2, exists=self.isdir(path2), flatten=not isinstance(path1, str)
                )
                pairs = list(zip(sources, targets, strict=True))
            for one, two in pairs:
                self.mv(one, two)
            return
        src = self._strip_protocol(path1)
        dst = self._strip_protocol(path2)
        if src == dst:
            return
        client = self.client
        if client.is_dir(dst) and not client.is_symlink(dst):
            dst = posixpath.join(dst, posixpath.basename(src))
        client.rename(src, dst)

    def put_file(
        self, lpath: Any, rpath: Any, callback: Any = None, mode: str = "overwrite",
        **kwargs: Any,
    ) -> None:
        """Upload the local file *lpath* with :meth:`~pyxen9p.p9.client.Client.copy_in`.

        ``mode="create"`` never replaces an existing file
        (:class:`FileExistsError`).  A local directory becomes a remote one.
        """
        name = self._strip_protocol(rpath)
        local = os.fspath(lpath)
        client = self.client
        if os.path.isdir(local):
            client.makedirs(name, exist_ok=True)
            return
        self._make_parent(name)
        if mode == "create" and client.exists(name):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), name)
        client.copy_in(
            local, name, preserve=False, no_clobber=mode == "create", progress=_progress(callback)
        )

    def get_file(
        self, rpath: Any, lpath: Any, callback: Any = None, outfile: Any = None,
        **kwargs: Any,
    ) -> None:
        """Download the file *rpath* with :meth:`~pyxen9p.p9.client.Client.copy_out`.

        The local file is written under a temporary name and renamed when
        complete; a remote directory becomes a local one; *lpath* may also
        be an open binary file.
        """
        name = self._strip_protocol(rpath)
        client = self.client
        if outfile is None and fsspec.utils.isfilelike(lpath):
            outfile = lpath
        if outfile is not None:
            with client.open(name, "rb", buffering=0) as fin:
                shutil.copyfileobj(fin, outfile, fin.iounit * client.window)
            return
        local = os.fspath(lpath)
        if client.is_dir(name):
            os.makedirs(local, exist_ok=True)
            return
        parent = os.path.dirname(local)
        if parent:
            os.makedirs(parent, exist_ok=True)
        client.copy_out(name, local, preserve=False, progress=_progress(callback))


def _progress(callback: Any) -> Callable[[int, int], None] | None:
    """A copy_in/copy_out progress function that reports to an fsspec *callback*."""
    if callback is None or callback is fsspec.callbacks.DEFAULT_CALLBACK:
        return None

    def progress(done: int, total: int) -> None:
        callback.set_size(total)
        callback.absolute_update(done)

    return progress


# --------------------------------------------------------------------------
# Open files


class Xen9pFile(io.BufferedIOBase):
    """An open file of :class:`Xen9pFileSystem`: the client's own buffered file, for fsspec.

    It wraps what :meth:`Client.open <pyxen9p.p9.client.Client.open>` returns
    (an :class:`io.BufferedReader`, :class:`io.BufferedWriter` or
    :class:`io.BufferedRandom` over a
    :class:`~pyxen9p.p9.files.RemoteFileIO`): every mode of
    :func:`open` (``r w x a`` and ``+``), ``x`` atomic, reads and writes at
    any offset with several requests in flight, errors at open time.  Within
    an fsspec transaction (``autocommit=False``), a file opened for writing
    is written under a temporary name in its directory and renamed over
    *path* by :meth:`commit`, removed by :meth:`discard`.

    :ivar fs: the file system
    :ivar path: the file's path in the file system
    :ivar mode: the mode it was opened with
    :ivar autocommit: whether the data lands at *path* as it is written
    """

    def __init__(
        self,
        fs: Xen9pFileSystem,
        path: str,
        mode: str = "rb",
        *,
        block_size: int | None = None,
        autocommit: bool = True,
    ) -> None:
        super().__init__()
        if "b" not in mode:
            mode += "b"
        self.fs = fs
        self.path = path
        self.mode = mode
        self.autocommit = autocommit
        self._client = fs.client
        self._target = path
        writing = bool(set(mode) & set("wxa+"))
        if not autocommit and writing:
            if "w" not in mode:
                raise ValueError(f"mode {mode!r} cannot be deferred to a commit (only 'w')")
            head, tail = posixpath.split(path)
            self._target = posixpath.join(head, f".{tail}.xen9p-{secrets.token_hex(6)}")
        buffering = block_size or -1
        self._f: Any = None
        self._f = self._client.open(self._target, mode, buffering)
        self._size: int | None = None

    # --- fsspec's file attributes ------------------------------------------

    @property
    def size(self) -> int:
        """The file's size (asked once, at the first use)."""
        if self._size is None:
            self._size = self._f.raw.stat().st_size
        return self._size

    def info(self) -> dict[str, Any]:
        """The file system's :meth:`~Xen9pFileSystem.info` of the file."""
        return self.fs.info(self._target)

    @property
    def details(self) -> dict[str, Any]:
        """Same as :meth:`info`."""
        return self.info()

    def commit(self) -> None:
        """Move the data written under the temporary name to *path* (transactions)."""
        if self.autocommit:
            raise RuntimeError("Can only commit if not already set to autocommit")
        self._f.close()
        self._client.rename(self._target, self.path)

    def discard(self) -> None:
        """Drop the data written under the temporary name (transactions)."""
        if self.autocommit:
            raise RuntimeError("Cannot discard if set to autocommit")
        self._f.close()
        self._client.remove(self._target)

    # --- io -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the file is closed."""
        return self._f is None or bool(self._f.closed)

    @property
    def name(self) -> str:
        """The file's path."""
        return self.path

    def readable(self) -> bool:
        """Whether the file was opened for reading."""
        return bool(self._f.readable())

    def writable(self) -> bool:
        """Whether the file was opened for writing."""
        return bool(self._f.writable())

    def seekable(self) -> bool:
        """Always true."""
        return bool(self._f.seekable())

    def read(self, size: int | None = -1) -> bytes:
        """Read up to *size* bytes (all, to the client's ``max_read``, with -1)."""
        return cast(bytes, self._f.read(size))

    def read1(self, size: int = -1) -> bytes:
        """Read up to *size* bytes with at most one call to the raw file."""
        return cast(bytes, self._f.read1(size))

    def readinto(self, buffer: Any) -> int:
        """Read into *buffer*; return the byte count."""
        return cast(int, self._f.readinto(buffer))

    def readinto1(self, buffer: Any) -> int:
        """Read into *buffer* with at most one call to the raw file."""
        return cast(int, self._f.readinto1(buffer))

    def readline(self, size: int | None = -1) -> bytes:
        """Read one line."""
        return cast(bytes, self._f.readline(size))

    def peek(self, size: int = 0) -> bytes:
        """Bytes ahead without moving (readable files)."""
        return cast(bytes, self._f.peek(size))

    def write(self, data: Any) -> int:
        """Write *data*; return its length."""
        return cast(int, self._f.write(data))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position; return the new one."""
        return cast(int, self._f.seek(offset, whence))

    def tell(self) -> int:
        """The current position."""
        return cast(int, self._f.tell())

    def truncate(self, size: int | None = None) -> int:
        """Resize the file to *size* (default: the position)."""
        return cast(int, self._f.truncate(size))

    def flush(self) -> None:
        """Write out what is buffered."""
        if not self.closed:
            self._f.flush()

    def fsync(self) -> None:
        """Flush, then ask the server to put the data on stable storage."""
        self._f.flush()
        self._f.raw.fsync()

    def fileno(self) -> int:
        """A 9P file has no local descriptor (:class:`io.UnsupportedOperation`)."""
        return cast(int, self._f.fileno())

    def close(self) -> None:
        """Flush and clunk the fid; in a transaction, the data waits for :meth:`commit`."""
        try:
            if self._f is not None:
                self._f.close()
        finally:
            super().close()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._f)

    def __repr__(self) -> str:
        return f"<Xen9pFile {self.fs.unstrip_protocol(self.path)!r} mode={self.mode!r}>"
