"""The 9P2000.u side of :class:`~pyxen9p.p9.client.Client`.

A client that negotiated 9P2000.u (xen-9pfsd, or ``version="9P2000.u"``)
holds one :class:`DotU`; the client's dialect-specific steps (attributes,
open, create, directory reads, removal, rename, links) go through it, and
everything else (walks, reads, writes, clunks, fids, tags) is shared.

The rules it keeps, those of xen-9pfsd's small op set:

* attributes come from Tstat and change through Twstat, whose "don't touch"
  fields (:meth:`~pyxen9p.p9.codec.Stat.wstat`) leave the rest alone;
* a directory is listed by reading it after a Topen: packed stat entries;
* a file or directory is removed with Tremove, or, once a server refused
  Tremove (xen-9pfsd answers ``EOPNOTSUPP``), by opening it with ``ORCLOSE``
  and clunking it;
* a rename is a Twstat of the name, within one directory;
* symbolic links are Tcreate with ``DMSYMLINK`` and the target as the
  extension, read back from the Rstat's extension;
* no Tflush (xen-9pfsd refuses it): a request that times out ends the session.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_module
import time
from typing import TYPE_CHECKING

from pyxen9p.p9 import codec as c

if TYPE_CHECKING:  # pragma: no cover
    from pyxen9p.p9.client import Client


def _is_server_error(exc: BaseException) -> bool:
    from pyxen9p.p9.client import _is_server_error as check

    return check(exc)

log = logging.getLogger(__name__)

#: errnos meaning "the server does not do this request at all".
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
#: The ``DM*`` bits that say what kind of file a stat describes.
_DM_TYPES = c.DMDIR | c.DMSYMLINK | c.DMLINK | c.DMDEVICE | c.DMNAMEDPIPE | c.DMSOCKET
_U32_MAX = 0xFFFFFFFF


def is_root(path: str) -> bool:
    """Whether the client path *path* names the share's root (``""``, ``/``, ``a/..``...)."""
    depth = 0
    for name in path.split("/"):
        if name == "..":
            depth = max(depth - 1, 0)
        elif name not in ("", "."):
            depth += 1
    return depth == 0


def _unsupported(what: str, path: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"the 9P2000.u server does not support {what}", path)


def open_mode(flags: int) -> int:
    """The Topen mode of ``L_O_*`` *flags*: access mode and ``OTRUNC``."""
    mode = {
        c.L_O_RDONLY: c.OREAD,
        c.L_O_WRONLY: c.OWRITE,
        c.L_O_RDWR: c.ORDWR,
    }.get(flags & c.L_O_ACCMODE, c.OREAD)
    if flags & c.L_O_TRUNC:
        mode |= c.OTRUNC
    return mode


def dm_mode(st_mode: int) -> int:
    """The 9P2000.u mode (``DM*`` bits and permissions) of a Unix ``st_mode``."""
    mode = st_mode & 0o777
    kind = stat_module.S_IFMT(st_mode)
    mode |= {
        stat_module.S_IFDIR: c.DMDIR,
        stat_module.S_IFLNK: c.DMSYMLINK,
        stat_module.S_IFSOCK: c.DMSOCKET,
        stat_module.S_IFIFO: c.DMNAMEDPIPE,
        stat_module.S_IFBLK: c.DMDEVICE,
        stat_module.S_IFCHR: c.DMDEVICE,
    }.get(kind, 0)
    if st_mode & stat_module.S_ISUID:
        mode |= c.DMSETUID
    if st_mode & stat_module.S_ISGID:
        mode |= c.DMSETGID
    if st_mode & stat_module.S_ISVTX:
        mode |= c.DMSETVTX
    return mode


def unix_mode(stat: c.Stat) -> int:
    """The Unix ``st_mode`` of a 9P2000.u stat."""
    dm = stat.mode
    mode = dm & 0o777
    if dm & c.DMDIR:
        mode |= stat_module.S_IFDIR
    elif dm & c.DMSYMLINK:
        mode |= stat_module.S_IFLNK
    elif dm & c.DMSOCKET:
        mode |= stat_module.S_IFSOCK
    elif dm & c.DMNAMEDPIPE:
        mode |= stat_module.S_IFIFO
    elif dm & c.DMDEVICE:
        block = stat.extension[:1] == "b"
        mode |= stat_module.S_IFBLK if block else stat_module.S_IFCHR
    else:
        mode |= stat_module.S_IFREG
    if dm & c.DMSETUID:
        mode |= stat_module.S_ISUID
    if dm & c.DMSETGID:
        mode |= stat_module.S_ISGID
    if dm & c.DMSETVTX:
        mode |= stat_module.S_ISVTX
    return mode


def dirent_type(stat: c.Stat) -> int:
    """The ``DT_*`` type of a 9P2000.u stat."""
    kind = stat_module.S_IFMT(unix_mode(stat))
    return {
        stat_module.S_IFDIR: c.DT_DIR,
        stat_module.S_IFLNK: c.DT_LNK,
        stat_module.S_IFSOCK: c.DT_SOCK,
        stat_module.S_IFIFO: c.DT_FIFO,
        stat_module.S_IFBLK: c.DT_BLK,
        stat_module.S_IFCHR: c.DT_CHR,
    }.get(kind, c.DT_REG)


def stat_result(stat: c.Stat) -> os.stat_result:
    """An :class:`os.stat_result` of a 9P2000.u stat (whole seconds; ``st_ctime`` is the mtime)."""
    uid = 0 if stat.n_uid == c.NONUNAME else stat.n_uid
    gid = 0 if stat.n_gid == c.NONUNAME else stat.n_gid
    return os.stat_result(
        (unix_mode(stat), stat.qid.path, 0, 1, uid, gid, stat.length,
         stat.atime, stat.mtime, stat.mtime),
        {
            "st_atime": float(stat.atime),
            "st_mtime": float(stat.mtime),
            "st_ctime": float(stat.mtime),
            "st_atime_ns": stat.atime * 1_000_000_000,
            "st_mtime_ns": stat.mtime * 1_000_000_000,
            "st_ctime_ns": stat.mtime * 1_000_000_000,
            "st_blksize": 4096,
            "st_blocks": (stat.length + 511) // 512,
            "st_rdev": 0,
        },
    )  # fmt: skip


def _u32_time(value: int, path: str) -> int:
    if not 0 <= value <= _U32_MAX:
        raise OverflowError(
            f"{path}: the time {value} s is outside the unsigned 32-bit seconds of 9P2000.u"
        )
    return value


class DotU:
    """The 9P2000.u operations of one :class:`~pyxen9p.p9.client.Client`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        #: False once the server refused Tremove: removal goes through ORCLOSE.
        self.has_remove = True
        #: False once the server refused Twstat: attribute changes fail at once.
        self.has_wstat = True
        #: Whether copy_in already warned that it cannot preserve attributes.
        self.warned_preserve = False
        #: Whether the server was seen writing stats as xen-9pfsd does.
        self.xen9pfsd_stats = False
        #: Whether the server is known to be xen-9pfsd (its backend directory is
        #: ``backend/xen_9pfs/...``, or its stats say so): no Tstat of the root then.
        self.xen9pfsd = "/xen_9pfs/" in str(getattr(client.transport, "backend_path", ""))

    # --- replies ---------------------------------------------------------------

    def decode(self, raw: bytes) -> c.Message:
        """Decode a 9P2000.u reply; an Rstat may also have xen-9pfsd's stat sizes.

        xen-9pfsd (Xen 4.19, 4.20) counts 10 bytes too many in a stat's size
        fields: such an Rstat is accepted with exactly that excess
        (:func:`~pyxen9p.p9.codec.decode_xen9pfsd_rstat`), and nothing else is.
        """
        try:
            return c.decode(raw, c.VERSION_9P2000_U)
        except c.ProtocolError:
            if len(raw) < c.HEADER_SIZE or raw[4] != c.MessageType.RSTAT:
                raise
            try:
                reply = c.decode_xen9pfsd_rstat(raw)
            except c.ProtocolError:
                pass
            else:
                self._note_xen9pfsd()
                return reply
            raise

    def parse_stats(self, data: bytes, path: str) -> list[c.Stat]:
        """The entries of a directory read: 9P2000.u's layout, or xen-9pfsd's."""
        try:
            return c.parse_stats(data)
        except c.ProtocolError as exc:
            try:
                stats = c.parse_xen9pfsd_stats(data)
            except c.ProtocolError:
                raise c.ProtocolError(
                    errno.EPROTO, f"a directory read of {path!r}: {exc.strerror}"
                ) from None
            self._note_xen9pfsd()
            return stats

    def _note_xen9pfsd(self) -> None:
        if not self.xen9pfsd_stats:
            self.xen9pfsd_stats = self.xen9pfsd = True
            log.info("the server writes stats as xen-9pfsd does (sizes 10 bytes over)")

    # --- attributes ------------------------------------------------------------

    def stat_fid(self, fid: int, path: str) -> c.Stat:
        """The Rstat of *fid* (at *path*; never xen-9pfsd's root, see :func:`is_root`)."""
        if self.xen9pfsd and is_root(path):
            raise OSError(
                errno.EOPNOTSUPP,
                "the attributes of the share's root are not asked of xen-9pfsd"
                " (it does not answer a Tstat of the root usefully)",
                path,
            )
        return self.client._rpc(lambda t: c.Tstat(t, fid), c.Rstat, path).stat

    def getattr(self, fid: int, path: str) -> os.stat_result:
        """Tstat, as an :class:`os.stat_result`."""
        return stat_result(self.stat_fid(fid, path))

    def wstat(self, fid: int, path: str, stat: c.Stat, what: str) -> None:
        """Twstat; a server without it gives a clear ``EOPNOTSUPP``."""
        if not self.has_wstat:
            raise _unsupported(f"Twstat: cannot {what}", path)
        try:
            self.client._rpc(lambda t: c.Twstat(t, fid, stat), c.Rwstat, path)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED and _is_server_error(exc):
                self.has_wstat = False
                raise _unsupported(f"Twstat: cannot {what}", path) from None
            raise

    def setattr(
        self,
        fid: int,
        path: str,
        valid: int,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        atime: tuple[int, int],
        mtime: tuple[int, int],
    ) -> None:
        """The ``P9_SETATTR_*`` request *valid* as one Twstat."""
        if not self.has_wstat:
            raise _unsupported("Twstat: cannot change attributes", path)
        changes: dict[str, object] = {}
        if valid & c.P9_SETATTR_MODE:
            kind = self.stat_fid(fid, path).mode & _DM_TYPES
            changes["mode"] = kind | (dm_mode(mode) & ~_DM_TYPES)
        if valid & c.P9_SETATTR_UID:
            changes["n_uid"] = uid
        if valid & c.P9_SETATTR_GID:
            changes["n_gid"] = gid
        if valid & c.P9_SETATTR_SIZE:
            changes["length"] = size
        now = int(time.time())
        if valid & c.P9_SETATTR_ATIME:
            sec = atime[0] if valid & c.P9_SETATTR_ATIME_SET else now
            changes["atime"] = _u32_time(sec, path)
        if valid & c.P9_SETATTR_MTIME:
            sec = mtime[0] if valid & c.P9_SETATTR_MTIME_SET else now
            changes["mtime"] = _u32_time(sec, path)
        if not changes:
            return
        self.wstat(fid, path, c.Stat.wstat(**changes), "change attributes")

    def fsync(self, fid: int, path: str) -> None:
        """A Twstat that changes nothing: 9P's request to commit the file."""
        self.wstat(fid, path, c.Stat.wstat(), "sync a file")

    # --- open, create, directories --------------------------------------------

    def open(self, fid: int, flags: int, path: str) -> tuple[c.Qid, int]:
        """Topen *fid* with the mode of ``L_O_*`` *flags*: ``(qid, iounit)``."""
        reply = self.client._rpc(lambda t: c.Topen(t, fid, open_mode(flags)), c.Ropen, path)
        return reply.qid, reply.iounit

    def create(
        self, dfid: int, name: str, flags: int, perm: int, path: str, *, extension: str = ""
    ) -> tuple[c.Qid, int]:
        """Tcreate *name* in *dfid* (which becomes the new file): ``(qid, iounit)``."""
        mode = open_mode(flags) & ~c.OTRUNC
        reply = self.client._rpc(
            lambda t: c.Tcreate(t, dfid, name, perm, mode, extension), c.Rcreate, path
        )
        return reply.qid, reply.iounit

    def mkdir(self, dfid: int, name: str, perm: int, path: str) -> None:
        """Tcreate with ``DMDIR`` (the fid, now the directory, is the caller's to clunk)."""
        self.create(dfid, name, c.L_O_RDONLY, c.DMDIR | perm, path)

    def symlink(self, dfid: int, name: str, target: str, path: str) -> None:
        """Tcreate with ``DMSYMLINK`` and the target as the extension."""
        try:
            self.create(dfid, name, c.L_O_RDONLY, c.DMSYMLINK | 0o777, path, extension=target)
        except OSError as exc:
            # xen-9pfsd answers EINVAL to a Tcreate of any special file
            if _is_server_error(exc) and exc.errno in _UNSUPPORTED | {errno.EINVAL}:
                raise _unsupported("symbolic links", path) from None
            raise

    def readlink(self, fid: int, path: str) -> str:
        """The target of the symbolic link *fid*: its Rstat's extension."""
        stat = self.stat_fid(fid, path)
        if not stat.mode & c.DMSYMLINK:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return stat.extension

    def readdir(self, fid: int, path: str) -> list[c.Dirent]:
        """Every entry of directory *fid*: Topen, then Treads of packed stats.

        The Dirent offsets are the byte offsets of the directory reads;
        :attr:`~pyxen9p.p9.client.Client.max_entries` bounds the listing.
        """
        client = self.client
        client._rpc(lambda t: c.Topen(t, fid, c.OREAD), c.Ropen, path)
        count = client.default_iounit
        limit = client.max_entries
        offset = 0
        received = 0
        entries: list[c.Dirent] = []
        while True:
            data = client._read_at(fid, offset, count, path)
            if not data:
                return entries
            stats = self.parse_stats(data, path)
            received += len(stats)
            if limit is not None and received > limit + 2:  # '.' and '..' are not counted
                raise OSError(
                    errno.EFBIG,
                    f"the directory lists more than {limit} entries (Client.max_entries)",
                    path,
                )
            offset += len(data)
            entries.extend(
                c.Dirent(s.qid, offset, dirent_type(s), s.name)
                for s in stats
                if s.name not in (".", "..")
            )

    # --- removal and renames -----------------------------------------------------

    def remove(self, fid: int, path: str) -> bool:
        """Tremove *fid* (which is clunked whatever happens).

        :returns: False when the server refused Tremove as unsupported (the
            fid is then clunked, and removal goes through :meth:`remove_orclose`
            from now on)
        """
        client = self.client
        try:
            client._rpc(lambda t: c.Tremove(t, fid), c.Rremove, path)
        except BaseException as exc:
            if not _is_server_error(exc):
                client._clunk_quiet(fid)
                raise
            if exc.errno not in _UNSUPPORTED:  # type: ignore[attr-defined]
                client._fids.release(fid)  # Tremove clunks the fid even when it fails
                raise
            # A server that does not know Tremove may not have clunked the fid
            # as Tremove does: clunk it (an error reply to that is fine).
            self.has_remove = False
            client._clunk_quiet(fid)
            return False
        client._fids.release(fid)
        return True

    def remove_orclose(self, fid: int, path: str, is_dir: bool) -> None:
        """Topen *fid* with ``ORCLOSE``, then Tclunk it: the server removes the file.

        xen-9pfsd reports no error of that removal (and refuses ``ORCLOSE``
        on a directory): the path is looked up afterwards, and a file still
        there is an error.
        """
        client = self.client
        try:
            client._rpc(lambda t: c.Topen(t, fid, c.OREAD | c.ORCLOSE), c.Ropen, path)
        except OSError as exc:
            client._clunk_quiet(fid)
            if is_dir and _is_server_error(exc) and exc.errno == errno.EINVAL:
                raise OSError(
                    errno.EOPNOTSUPP,
                    "the 9P2000.u server cannot remove directories (it refused Topen"
                    " with ORCLOSE on a directory, as xen-9pfsd does)",
                    path,
                ) from None
            raise
        except BaseException:
            client._clunk_quiet(fid)
            raise
        try:
            client._rpc(lambda t: c.Tclunk(t, fid), c.Rclunk, path)
        except TimeoutError:
            client._fids.lose(fid)
            raise
        except OSError as exc:
            if _is_server_error(exc):
                client._fids.release(fid)  # an error reply still clunks the fid
            else:
                client._fids.lose(fid)
            raise
        except BaseException:
            client._fids.lose(fid)
            raise
        client._fids.release(fid)
        if client.exists(path, follow_symlinks=False):
            raise OSError(
                errno.ENOTEMPTY if is_dir else errno.EIO,
                ("directory not empty, or " if is_dir else "")
                + "the server did not remove it (Tclunk with ORCLOSE reports no error)",
                path,
            )

    def rename(self, fid: int, src: list[str], dst: list[str], path: str) -> None:
        """Rename the file of *fid* (at *src*) to *dst*: a Twstat of its name.

        9P2000.u renames only within a directory: another directory is
        ``EXDEV``; a server without Twstat (xen-9pfsd) gives ``EOPNOTSUPP``.
        """
        if src[:-1] != dst[:-1]:
            raise OSError(
                errno.EXDEV,
                "9P2000.u renames only within one directory (Twstat of the name)",
                path,
            )
        if src == dst:
            return
        self.wstat(fid, path, c.Stat.wstat(name=dst[-1]), "rename")


def statfs_unsupported(path: str) -> OSError:
    """The error of statfs over 9P2000.u, which has no Tstatfs."""
    return _unsupported("statfs (no Tstatfs in 9P2000.u)", path)


def link_unsupported(path: str) -> OSError:
    """The error of a hard link over 9P2000.u, which has no Tlink."""
    return _unsupported("hard links (no Tlink in 9P2000.u)", path)



def local_root_stat(qid_path: int, when: float) -> os.stat_result:
    """Attributes made up here for the share's root, whose own a server such as
    xen-9pfsd does not give: a directory, mode ``0755``, owned by this process's
    user and group, its times *when* (a mount's or file system's start), its inode
    number the root's qid path."""
    sec = int(when)
    ns = int(when * 1_000_000_000)
    return os.stat_result(
        (stat_module.S_IFDIR | 0o755, qid_path, 0, 2, os.getuid(), os.getgid(), 0,
         sec, sec, sec),
        {
            "st_atime": float(when), "st_mtime": float(when), "st_ctime": float(when),
            "st_atime_ns": ns, "st_mtime_ns": ns, "st_ctime_ns": ns,
            "st_blksize": 4096, "st_blocks": 0, "st_rdev": 0,
        },
    )  # fmt: skip
