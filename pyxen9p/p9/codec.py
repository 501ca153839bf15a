"""The 9P2000.L and 9P2000.u wire formats: a frozen dataclass per message, ``encode``, ``decode``.

Every message is ``size[4] type[1] tag[2]`` followed by a body, little-endian;
``size`` counts the whole message including itself.  The grammar follows
chaos/diod ``protocol.md`` (the canonical 9P2000.L description) and the type
numbers of Linux ``include/net/9p/9p.h``.

Each message type is a frozen dataclass whose first field is ``tag``, so
``decode(encode(m)) == m`` for every valid message ``m``::

    >>> from pyxen9p.p9 import codec
    >>> raw = codec.encode(codec.Tclunk(tag=1, fid=7))
    >>> raw.hex()
    '0b00000078010007000000'
    >>> codec.decode(raw)
    Tclunk(tag=1, fid=7)

Decoding is strict: a short or overlong message, a ``size`` field that does
not match the data, a count running past the end of the body, an unknown
message type, or any trailing byte raises
:class:`~pyxen9p.errors.ProtocolError` (an :class:`OSError` with ``EPROTO``,
and a :class:`ValueError`), never
:class:`IndexError` or :class:`struct.error`.  Encoding a message whose
fields do not fit the wire format (an integer out of range, a string longer
than 65535 bytes, more than 16 walk names...) raises
:class:`~pyxen9p.errors.ProtocolError` too.

Strings (``name[s]``) are byte strings on the wire.  They are exposed as
:class:`str`, decoded as UTF-8 with the ``surrogateescape`` error handler,
the convention Python's :mod:`os` module uses for file names: any byte
sequence, UTF-8 or not, round-trips through ``decode`` and ``encode``
unchanged.  Strings with lone surrogates that do not come from
``surrogateescape`` cannot be encoded (:class:`~pyxen9p.errors.ProtocolError`).

The error replies are :class:`Rlerror` (9P2000.L, a Linux errno) and the
legacy :class:`Rerror` (type 107): the 9P2000.u form ``ename[s] errno[4]``
is decoded, and so is the body made of a bare 4-byte errno that nfs-ganesha
sends; both decode to an :class:`Rerror`.

9P2000.u, the dialect of xen-9pfsd and of Linux's ``version=9p2000.u``,
shares the messages of 9P2000 (Tversion, Tauth, Tattach, Rerror, Tflush,
Twalk, Tread, Twrite, Tclunk, Tremove, same layouts) and adds Topen,
Tcreate, Tstat and Twstat with the extended :class:`Stat` structure.  The
dialects are chosen at decoding: ``decode(frame)`` knows 9P2000.L, and
``decode(frame, dialect=VERSION_9P2000_U)`` knows 9P2000.u (a 9P2000.L-only
type such as Tlopen is then unknown, and the other way round).  A .u
directory read (Rread on a directory open with Topen) carries packed
:class:`Stat` entries: :func:`parse_stats`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from enum import IntEnum
from operator import attrgetter
from typing import Any, ClassVar, TypeVar

from pyxen9p.errors import ProtocolError

__all__ = [
    "AT_REMOVEDIR",
    "DMAPPEND",
    "DMDEVICE",
    "DMDIR",
    "DMEXCL",
    "DMLINK",
    "DMNAMEDPIPE",
    "DMSETGID",
    "DMSETUID",
    "DMSETVTX",
    "DMSOCKET",
    "DMSYMLINK",
    "DMTMP",
    "DT_BLK",
    "DT_CHR",
    "DT_DIR",
    "DT_FIFO",
    "DT_LNK",
    "DT_REG",
    "DT_SOCK",
    "DT_UNKNOWN",
    "HEADER_SIZE",
    "IOHDRSZ",
    "L_O_ACCMODE",
    "L_O_APPEND",
    "L_O_CLOEXEC",
    "L_O_CREAT",
    "L_O_DIRECT",
    "L_O_DIRECTORY",
    "L_O_DSYNC",
    "L_O_EXCL",
    "L_O_FASYNC",
    "L_O_LARGEFILE",
    "L_O_NOACCESS",
    "L_O_NOATIME",
    "L_O_NOCTTY",
    "L_O_NOFOLLOW",
    "L_O_NONBLOCK",
    "L_O_RDONLY",
    "L_O_RDWR",
    "L_O_SYNC",
    "L_O_TRUNC",
    "L_O_WRONLY",
    "MAXWELEM",
    "NOFID",
    "NONUNAME",
    "NOTAG",
    "OAPPEND",
    "OEXCL",
    "OEXEC",
    "ORCLOSE",
    "ORDWR",
    "OREAD",
    "OTRUNC",
    "OWRITE",
    "P9_GETATTR_ALL",
    "P9_GETATTR_ATIME",
    "P9_GETATTR_BASIC",
    "P9_GETATTR_BLOCKS",
    "P9_GETATTR_BTIME",
    "P9_GETATTR_CTIME",
    "P9_GETATTR_DATA_VERSION",
    "P9_GETATTR_GEN",
    "P9_GETATTR_GID",
    "P9_GETATTR_INO",
    "P9_GETATTR_MODE",
    "P9_GETATTR_MTIME",
    "P9_GETATTR_NLINK",
    "P9_GETATTR_RDEV",
    "P9_GETATTR_SIZE",
    "P9_GETATTR_UID",
    "P9_LOCK_BLOCKED",
    "P9_LOCK_ERROR",
    "P9_LOCK_FLAGS_BLOCK",
    "P9_LOCK_FLAGS_RECLAIM",
    "P9_LOCK_GRACE",
    "P9_LOCK_SUCCESS",
    "P9_LOCK_TYPE_RDLCK",
    "P9_LOCK_TYPE_UNLCK",
    "P9_LOCK_TYPE_WRLCK",
    "P9_SETATTR_ATIME",
    "P9_SETATTR_ATIME_SET",
    "P9_SETATTR_CTIME",
    "P9_SETATTR_GID",
    "P9_SETATTR_MODE",
    "P9_SETATTR_MTIME",
    "P9_SETATTR_MTIME_SET",
    "P9_SETATTR_SIZE",
    "P9_SETATTR_UID",
    "QID_SIZE",
    "QTAPPEND",
    "QTAUTH",
    "QTDIR",
    "QTEXCL",
    "QTFILE",
    "QTLINK",
    "QTMOUNT",
    "QTSYMLINK",
    "QTTMP",
    "READDIRHDRSZ",
    "VERSION_9P2000_L",
    "VERSION_9P2000_U",
    "VERSION_UNKNOWN",
    "XEN9PFSD_STAT_EXCESS",
    "Dirent",
    "Message",
    "MessageType",
    "ProtocolError",
    "Qid",
    "Rattach",
    "Rauth",
    "Rclunk",
    "Rcreate",
    "Rerror",
    "Rflush",
    "Rfsync",
    "Rgetattr",
    "Rgetlock",
    "Rlcreate",
    "Rlerror",
    "Rlink",
    "Rlock",
    "Rlopen",
    "Rmkdir",
    "Rmknod",
    "Ropen",
    "Rread",
    "Rreaddir",
    "Rreadlink",
    "Rremove",
    "Rrename",
    "Rrenameat",
    "Rsetattr",
    "Rstat",
    "Rstatfs",
    "Rsymlink",
    "Runlinkat",
    "Rversion",
    "Rwalk",
    "Rwrite",
    "Rwstat",
    "Rxattrcreate",
    "Rxattrwalk",
    "Stat",
    "Tattach",
    "Tauth",
    "Tclunk",
    "Tcreate",
    "Tflush",
    "Tfsync",
    "Tgetattr",
    "Tgetlock",
    "Tlcreate",
    "Tlink",
    "Tlock",
    "Tlopen",
    "Tmkdir",
    "Tmknod",
    "Topen",
    "Tread",
    "Treaddir",
    "Treadlink",
    "Tremove",
    "Trename",
    "Trenameat",
    "Tsetattr",
    "Tstat",
    "Tstatfs",
    "Tsymlink",
    "Tunlinkat",
    "Tversion",
    "Twalk",
    "Twrite",
    "Twstat",
    "Txattrcreate",
    "Txattrwalk",
    "decode",
    "decode_xen9pfsd_rstat",
    "encode",
    "encode_tgetattr",
    "encode_twalk",
    "message_class",
    "message_classes",
    "pack_dirents",
    "pack_stats",
    "parse_dirents",
    "parse_stats",
    "parse_xen9pfsd_stats",
    "peek_header",
    "reply_type_for",
    "rgetattr_values",
]


# --------------------------------------------------------------------------
# Constants

#: Size of the ``size[4] type[1] tag[2]`` header.
HEADER_SIZE = 7
#: Size of an encoded :class:`Qid`.
QID_SIZE = 13
#: The tag of Tversion / Rversion.
NOTAG = 0xFFFF
#: "No fid" (e.g. ``afid`` of a Tattach without authentication).
NOFID = 0xFFFFFFFF
#: ``n_uname`` meaning "no numeric user, use ``uname``".
NONUNAME = 0xFFFFFFFF
#: Maximum number of names in one Twalk (and qids in one Rwalk).
MAXWELEM = 16
#: Bytes Linux reserves for the header of Tread/Twrite/Rread (I/O size = msize - IOHDRSZ).
IOHDRSZ = 24
#: Bytes Linux reserves for the header of Rreaddir.
READDIRHDRSZ = 24
#: The protocol version string of 9P2000.L.
VERSION_9P2000_L = "9P2000.L"
#: The protocol version string of 9P2000.u (Unix extensions to 9P2000).
VERSION_9P2000_U = "9P2000.u"
#: The version string of an Rversion refusing every offered version.
VERSION_UNKNOWN = "unknown"

# Qid types (the high byte of a 9P mode).
#: Qid type bit.
QTDIR = 0x80
#: Qid type bit.
QTAPPEND = 0x40
#: Qid type bit.
QTEXCL = 0x20
#: Qid type bit.
QTMOUNT = 0x10
#: Qid type bit.
QTAUTH = 0x08
#: Qid type bit.
QTTMP = 0x04
#: Qid type bit.
QTSYMLINK = 0x02
#: Qid type bit.
QTLINK = 0x01
#: Qid type bit.
QTFILE = 0x00

# 9P2000.u Stat.mode and Tcreate perm bits (the high bits of a 9P mode).
#: Stat mode bit (9P2000.u): a directory.
DMDIR = 0x80000000
#: Stat mode bit (9P2000.u): append only.
DMAPPEND = 0x40000000
#: Stat mode bit (9P2000.u): exclusive use.
DMEXCL = 0x20000000
#: Stat mode bit (9P2000.u): temporary.
DMTMP = 0x04000000
#: Stat mode bit (9P2000.u): a symbolic link (its target is the ``extension``).
DMSYMLINK = 0x02000000
#: Stat mode bit (9P2000.u): a hard link (legacy).
DMLINK = 0x01000000
#: Stat mode bit (9P2000.u): a device (``extension`` is ``"b|c major minor"``).
DMDEVICE = 0x00800000
#: Stat mode bit (9P2000.u): a named pipe.
DMNAMEDPIPE = 0x00200000
#: Stat mode bit (9P2000.u): a socket.
DMSOCKET = 0x00100000
#: Stat mode bit (9P2000.u): set-user-id.
DMSETUID = 0x00080000
#: Stat mode bit (9P2000.u): set-group-id.
DMSETGID = 0x00040000
#: Stat mode bit (9P2000.u): sticky.
DMSETVTX = 0x00010000

# Topen / Tcreate modes (9P2000 and 9P2000.u).
#: Topen/Tcreate mode: read.
OREAD = 0x00
#: Topen/Tcreate mode: write.
OWRITE = 0x01
#: Topen/Tcreate mode: read and write.
ORDWR = 0x02
#: Topen/Tcreate mode: execute.
OEXEC = 0x03
#: Topen/Tcreate mode bit: truncate.
OTRUNC = 0x10
#: Topen/Tcreate mode bit: remove the file when the fid is clunked.
ORCLOSE = 0x40
#: Topen/Tcreate mode bit (9P2000.u, Linux): append.
OAPPEND = 0x80
#: Topen/Tcreate mode bit (9P2000.u, Linux's ``P9_OEXCL``): exclusive create.
OEXCL = 0x1000

# Directory entry types of Rreaddir (Linux DT_* values).
#: Rreaddir entry type (the Linux ``DT_*`` value).
DT_UNKNOWN = 0
#: Rreaddir entry type (the Linux ``DT_*`` value).
DT_FIFO = 1
#: Rreaddir entry type (the Linux ``DT_*`` value).
DT_CHR = 2
#: Rreaddir entry type (the Linux ``DT_*`` value).
DT_DIR = 4
#: Rreaddir entry type (the Linux ``DT_*`` value).
DT_BLK = 6
#: Rreaddir entry type (the Linux ``DT_*`` value).
DT_REG = 8
#: Rreaddir entry type (the Linux ``DT_*`` value).
DT_LNK = 10
#: Rreaddir entry type (the Linux ``DT_*`` value).
DT_SOCK = 12

# Tlopen / Tlcreate flags: the generic Linux open(2) values, whatever the host
# architecture (P9_DOTL_* in Linux include/net/9p/9p.h).  A server translates
# them to the host's ``os.O_*`` values.
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_RDONLY = 0o0
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_WRONLY = 0o1
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_RDWR = 0o2
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_NOACCESS = 0o3
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_ACCMODE = 0o3
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_CREAT = 0o100
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_EXCL = 0o200
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_NOCTTY = 0o400
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_TRUNC = 0o1000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_APPEND = 0o2000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_NONBLOCK = 0o4000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_DSYNC = 0o10000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_FASYNC = 0o20000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_DIRECT = 0o40000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_LARGEFILE = 0o100000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_DIRECTORY = 0o200000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_NOFOLLOW = 0o400000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_NOATIME = 0o1000000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_CLOEXEC = 0o2000000
#: Tlopen/Tlcreate flag: the generic Linux ``O_*`` value, whatever the host.
L_O_SYNC = 0o4000000

#: Tunlinkat flag: remove a directory.
AT_REMOVEDIR = 0x200

# Tgetattr request_mask / Rgetattr valid bits.
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_MODE = 0x00000001
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_NLINK = 0x00000002
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_UID = 0x00000004
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_GID = 0x00000008
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_RDEV = 0x00000010
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_ATIME = 0x00000020
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_MTIME = 0x00000040
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_CTIME = 0x00000080
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_INO = 0x00000100
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_SIZE = 0x00000200
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_BLOCKS = 0x00000400
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_BTIME = 0x00000800
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_GEN = 0x00001000
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_DATA_VERSION = 0x00002000
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_BASIC = 0x000007FF
#: Tgetattr ``request_mask`` / Rgetattr ``valid`` bit.
P9_GETATTR_ALL = 0x00003FFF

# Tsetattr valid bits.
#: Tsetattr ``valid`` bit.
P9_SETATTR_MODE = 0x00000001
#: Tsetattr ``valid`` bit.
P9_SETATTR_UID = 0x00000002
#: Tsetattr ``valid`` bit.
P9_SETATTR_GID = 0x00000004
#: Tsetattr ``valid`` bit.
P9_SETATTR_SIZE = 0x00000008
#: Tsetattr ``valid`` bit.
P9_SETATTR_ATIME = 0x00000010
#: Tsetattr ``valid`` bit.
P9_SETATTR_MTIME = 0x00000020
#: Tsetattr ``valid`` bit.
P9_SETATTR_CTIME = 0x00000040
#: Tsetattr ``valid`` bit.
P9_SETATTR_ATIME_SET = 0x00000080
#: Tsetattr ``valid`` bit.
P9_SETATTR_MTIME_SET = 0x00000100

# Tlock / Tgetlock.
#: Tlock/Tgetlock/Rgetlock lock type.
P9_LOCK_TYPE_RDLCK = 0
#: Tlock/Tgetlock/Rgetlock lock type.
P9_LOCK_TYPE_WRLCK = 1
#: Tlock/Tgetlock/Rgetlock lock type.
P9_LOCK_TYPE_UNLCK = 2
#: Tlock flag.
P9_LOCK_FLAGS_BLOCK = 1
#: Tlock flag.
P9_LOCK_FLAGS_RECLAIM = 2
#: Rlock status.
P9_LOCK_SUCCESS = 0
#: Rlock status.
P9_LOCK_BLOCKED = 1
#: Rlock status.
P9_LOCK_ERROR = 2
#: Rlock status.
P9_LOCK_GRACE = 3


class MessageType(IntEnum):
    """The message type numbers (``type[1]`` of the header)."""

    RLERROR = 7
    TSTATFS = 8
    RSTATFS = 9
    TLOPEN = 12
    RLOPEN = 13
    TLCREATE = 14
    RLCREATE = 15
    TSYMLINK = 16
    RSYMLINK = 17
    TMKNOD = 18
    RMKNOD = 19
    TRENAME = 20
    RRENAME = 21
    TREADLINK = 22
    RREADLINK = 23
    TGETATTR = 24
    RGETATTR = 25
    TSETATTR = 26
    RSETATTR = 27
    TXATTRWALK = 30
    RXATTRWALK = 31
    TXATTRCREATE = 32
    RXATTRCREATE = 33
    TREADDIR = 40
    RREADDIR = 41
    TFSYNC = 50
    RFSYNC = 51
    TLOCK = 52
    RLOCK = 53
    TGETLOCK = 54
    RGETLOCK = 55
    TLINK = 70
    RLINK = 71
    TMKDIR = 72
    RMKDIR = 73
    TRENAMEAT = 74
    RRENAMEAT = 75
    TUNLINKAT = 76
    RUNLINKAT = 77
    TVERSION = 100
    RVERSION = 101
    TAUTH = 102
    RAUTH = 103
    TATTACH = 104
    RATTACH = 105
    RERROR = 107
    TFLUSH = 108
    RFLUSH = 109
    TWALK = 110
    RWALK = 111
    TOPEN = 112
    ROPEN = 113
    TCREATE = 114
    RCREATE = 115
    TREAD = 116
    RREAD = 117
    TWRITE = 118
    RWRITE = 119
    TCLUNK = 120
    RCLUNK = 121
    TREMOVE = 122
    RREMOVE = 123
    TSTAT = 124
    RSTAT = 125
    TWSTAT = 126
    RWSTAT = 127


# --------------------------------------------------------------------------
# Helper types

_HEADER = struct.Struct("<IBH")
_QID = struct.Struct("<BIQ")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_DIRENT_FIXED = struct.Struct("<BIQQB")  # qid, offset, type


@dataclass(frozen=True, slots=True)
class Qid:
    """A server's unique identification of a file: ``type[1] version[4] path[8]``.

    :ivar type: ``QT*`` bits (:data:`QTDIR`, :data:`QTSYMLINK`, ...)
    :ivar version: changes when the file changes (servers often send 0)
    :ivar path: unique per file on the server (usually the inode number)
    """

    type: int
    version: int
    path: int

    def pack(self) -> bytes:
        """Return the 13-byte wire form.

        :raises ProtocolError: a field is out of range
        """
        try:
            return _QID.pack(self.type, self.version, self.path)
        except struct.error as exc:
            raise ProtocolError(f"cannot encode {self!r}: {exc}") from None

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Qid:
        """Decode exactly 13 bytes.

        :raises ProtocolError: *data* is not 13 bytes long
        """
        mv = _as_bytes_view(data)
        if mv.nbytes != QID_SIZE:
            raise ProtocolError(f"a qid is {QID_SIZE} bytes, got {mv.nbytes}")
        return cls(*_QID.unpack(mv))


@dataclass(frozen=True, slots=True)
class Dirent:
    """One directory entry of an Rreaddir: ``qid[13] offset[8] type[1] name[s]``.

    :ivar qid: the entry's qid
    :ivar offset: the cookie to pass as ``offset`` in the next Treaddir to
        continue *after* this entry
    :ivar type: the ``DT_*`` type of the entry
    :ivar name: the entry's name
    """

    qid: Qid
    offset: int
    type: int
    name: str

    def pack(self) -> bytes:
        """Return the wire form of this entry.

        :raises ProtocolError: a field does not fit
        """
        try:
            fixed = _DIRENT_FIXED.pack(
                self.qid.type, self.qid.version, self.qid.path, self.offset, self.type
            )
        except (struct.error, AttributeError) as exc:
            raise ProtocolError(f"cannot encode {self!r}: {exc}") from None
        return fixed + _pack_str(self.name)

    @property
    def packed_size(self) -> int:
        """Length in bytes of :meth:`pack`'s result."""
        return _DIRENT_FIXED.size + 2 + len(_str_bytes(self.name))


def parse_dirents(data: bytes | bytearray | memoryview) -> list[Dirent]:
    """Split the ``data`` of an :class:`Rreaddir` into its entries.

    :param data: the concatenated entries
    :returns: the entries, in order
    :raises ProtocolError: an entry is truncated
    """
    mv = _as_bytes_view(data)
    end = mv.nbytes
    off = 0
    out: list[Dirent] = []
    while off < end:
        if end - off < _DIRENT_FIXED.size:
            raise ProtocolError(f"truncated directory entry at offset {off}")
        qtype, qvers, qpath, cookie, dtype = _DIRENT_FIXED.unpack_from(mv, off)
        off += _DIRENT_FIXED.size
        name, off = _read_str(mv, off, end)
        out.append(Dirent(Qid(qtype, qvers, qpath), cookie, dtype, name))
    return out


def pack_dirents(entries: Iterable[Dirent]) -> bytes:
    """Concatenate the wire forms of *entries* (the ``data`` of an :class:`Rreaddir`).

    :raises ProtocolError: an entry does not fit the wire format
    """
    return b"".join(e.pack() for e in entries)


_STAT_FIXED = struct.Struct("<HIBIQIIIQ")  # type dev qid mode atime mtime length
_STAT_TAIL = struct.Struct("<III")  # n_uid n_gid n_muid
#: The smallest 9P2000.u stat after its size field: fixed part, 5 empty strings, 3 ids.
_STAT_MIN = _STAT_FIXED.size + 5 * 2 + _STAT_TAIL.size


@dataclass(frozen=True, slots=True)
class Stat:
    """The 9P2000.u stat structure (Tstat/Rstat, Twstat, directory reads of Topen).

    On the wire: ``size[2] type[2] dev[4] qid[13] mode[4] atime[4] mtime[4]
    length[8] name[s] uid[s] gid[s] muid[s] extension[s] n_uid[4] n_gid[4]
    n_muid[4]``; ``size`` counts the bytes after itself and must match them
    exactly.  In a Twstat every integer field set to all ones and every
    string left empty means "don't touch" (:meth:`wstat`).

    :ivar mode: permission bits and ``DM*`` type bits (:data:`DMDIR`...)
    :ivar atime: last access, seconds since the epoch (unsigned 32 bits)
    :ivar mtime: last modification, seconds since the epoch
    :ivar length: size in bytes
    :ivar extension: a symbolic link's target, a device's ``"c 1 3"``...
    :ivar n_uid: numeric owner (``0xFFFFFFFF``: none given)
    """

    type: int
    dev: int
    qid: Qid
    mode: int
    atime: int
    mtime: int
    length: int
    name: str
    uid: str
    gid: str
    muid: str
    extension: str
    n_uid: int
    n_gid: int
    n_muid: int

    @classmethod
    def wstat(cls, **changes: Any) -> Stat:
        """A Twstat stat that changes only *changes* (every other field: "don't touch")."""
        base = cls(
            0xFFFF, 0xFFFFFFFF, Qid(0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF), 0xFFFFFFFF,
            0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, "", "", "", "", "",
            0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF,
        )  # fmt: skip
        return replace(base, **changes)

    def pack(self) -> bytes:
        """Return the wire form, its ``size[2]`` included.

        :raises ProtocolError: a field does not fit
        """
        try:
            q = self.qid
            fixed = _STAT_FIXED.pack(
                self.type, self.dev, q.type, q.version, q.path,
                self.mode, self.atime, self.mtime, self.length,
            )  # fmt: skip
            tail = _STAT_TAIL.pack(self.n_uid, self.n_gid, self.n_muid)
        except (struct.error, AttributeError) as exc:
            raise ProtocolError(f"cannot encode {self!r}: {exc}") from None
        body = b"".join(
            [fixed]
            + [_pack_str(v) for v in (self.name, self.uid, self.gid, self.muid, self.extension)]
            + [tail]
        )
        if len(body) > 0xFFFF:
            raise ProtocolError(f"a stat of {len(body)} bytes exceeds 65535")
        return _U16.pack(len(body)) + body

    @classmethod
    def unpack_from(
        cls, data: bytes | bytearray | memoryview, off: int, end: int
    ) -> tuple[Stat, int]:
        """Decode the stat at *off* (its ``size[2]`` first), within *end*.

        :returns: ``(stat, offset after it)``
        :raises ProtocolError: truncated, or its size does not match its fields
        """
        mv = _as_bytes_view(data)
        if end - off < 2:
            raise ProtocolError(f"truncated stat size at offset {off}")
        (size,) = _U16.unpack_from(mv, off)
        off += 2
        if size > end - off:
            raise ProtocolError(f"stat of {size} bytes at offset {off} runs past the end")
        if size < _STAT_MIN:
            raise ProtocolError(f"stat of {size} bytes is shorter than the {_STAT_MIN} minimum")
        stop = off + size
        stat, after = _stat_fields(mv, off, stop)
        if after != stop:
            raise ProtocolError(
                f"stat size {size} does not match its fields ({after - off} bytes)"
            )
        return stat, stop


def _stat_fields(mv: memoryview, off: int, end: int) -> tuple[Stat, int]:
    """The fields of a stat after its size, read one after another within *end*."""
    if end - off < _STAT_FIXED.size:
        raise ProtocolError(f"truncated stat at offset {off}")
    t, dev, qt, qv, qp, mode, atime, mtime, length = _STAT_FIXED.unpack_from(mv, off)
    off += _STAT_FIXED.size
    name, off = _read_str(mv, off, end)
    uid, off = _read_str(mv, off, end)
    gid, off = _read_str(mv, off, end)
    muid, off = _read_str(mv, off, end)
    extension, off = _read_str(mv, off, end)
    if end - off < _STAT_TAIL.size:
        raise ProtocolError(f"truncated stat ids at offset {off}")
    n_uid, n_gid, n_muid = _STAT_TAIL.unpack_from(mv, off)
    stat = Stat(
        t, dev, Qid(qt, qv, qp), mode, atime, mtime, length,
        name, uid, gid, muid, extension, n_uid, n_gid, n_muid,
    )  # fmt: skip
    return stat, off + _STAT_TAIL.size


#: How much xen-9pfsd's stat size exceeds its fields (Xen 4.19 and 4.20 count 71 + the
#: name's length for fields that take 61 + the name's length).
XEN9PFSD_STAT_EXCESS = 10
#: How many bytes per entry xen-9pfsd's directory read (Xen 4.19, 4.20) says more
#: than it wrote: it writes ``tlen[2] size[2]`` and the fields, but counts
#: ``size + 2`` per entry, so the Rread's data ends in that many stale bytes
#: per entry (seen on Debian 13's Xen 4.20).
XEN9PFSD_DIRREAD_EXCESS = 8


def _xen9pfsd_stat(mv: memoryview, off: int, end: int) -> tuple[Stat, int]:
    """A stat as xen-9pfsd writes it: ``tlen[2] size[2]`` then the fields, where
    ``tlen == size + 2`` and ``size`` is the fields' length plus 10, exactly."""
    if end - off < 4:
        raise ProtocolError(f"truncated stat sizes at offset {off}")
    tlen, size = struct.unpack_from("<HH", mv, off)
    if tlen != size + 2:
        raise ProtocolError(f"stat sizes {tlen} and {size} do not differ by 2")
    stat, after = _stat_fields(mv, off + 4, end)
    if size != after - off - 4 + XEN9PFSD_STAT_EXCESS:
        raise ProtocolError(f"stat size {size} is not xen-9pfsd's count for its fields")
    return stat, after


def decode_xen9pfsd_rstat(data: bytes | bytearray | memoryview) -> Rstat:
    """Decode an Rstat laid out as xen-9pfsd (Xen 4.19, 4.20) sends it.

    Its two size fields count 10 bytes more than the stat's fields take
    (:data:`XEN9PFSD_STAT_EXCESS`); everything else is the 9P2000.u layout.
    The decoding is as strict as :func:`decode`'s, with exactly that excess.

    :raises ProtocolError: not such an Rstat
    """
    mv = _as_bytes_view(data)
    n = mv.nbytes
    size, mtype, tag = peek_header(mv)
    if size != n:
        raise ProtocolError(f"size field says {size} bytes but {n} were given")
    if mtype != MessageType.RSTAT:
        raise ProtocolError(f"type {mtype} is not an Rstat")
    stat, after = _xen9pfsd_stat(mv, HEADER_SIZE, n)
    if after != n:
        raise ProtocolError(f"Rstat: {n - after} trailing byte(s)")
    return Rstat(tag, stat)


def parse_xen9pfsd_stats(data: bytes | bytearray | memoryview) -> list[Stat]:
    """Split a directory read as xen-9pfsd (Xen 4.19, 4.20) sends it into its entries.

    Each entry carries two size fields, as an Rstat's body does
    (``tlen[2] size[2]`` then the fields, ``size`` 10 bytes over); see
    :func:`decode_xen9pfsd_rstat`.  The data may end in
    :data:`XEN9PFSD_DIRREAD_EXCESS` stale bytes per entry (exactly that many:
    they are dropped); anything else left over is an error.

    :raises ProtocolError: an entry is not laid out that way
    """
    mv = _as_bytes_view(data)
    end = mv.nbytes
    off = 0
    out: list[Stat] = []
    while off < end:
        if out and end - off == XEN9PFSD_DIRREAD_EXCESS * len(out):
            break  # what xen-9pfsd counted but did not write
        stat, off = _xen9pfsd_stat(mv, off, end)
        out.append(stat)
    return out


def parse_stats(data: bytes | bytearray | memoryview) -> list[Stat]:
    """Split the ``data`` of a 9P2000.u directory read (Rread) into its :class:`Stat` entries.

    :raises ProtocolError: an entry is truncated or its size lies
    """
    mv = _as_bytes_view(data)
    end = mv.nbytes
    off = 0
    out: list[Stat] = []
    while off < end:
        stat, off = Stat.unpack_from(mv, off, end)
        out.append(stat)
    return out


def pack_stats(entries: Iterable[Stat]) -> bytes:
    """Concatenate the wire forms of *entries* (a 9P2000.u directory read's data).

    :raises ProtocolError: an entry does not fit the wire format
    """
    return b"".join(e.pack() for e in entries)


# --------------------------------------------------------------------------
# Low-level helpers


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
    except TypeError:
        raise ProtocolError(f"expected a contiguous bytes-like object, got {data!r:.40}") from None
    return mv


def _str_bytes(value: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"expected a str, got {type(value).__name__}")
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"string cannot be encoded: {exc}") from None


def _pack_str(value: str) -> bytes:
    raw = _str_bytes(value)
    if len(raw) > 0xFFFF:
        raise ProtocolError(f"string of {len(raw)} bytes exceeds 65535")
    return _U16.pack(len(raw)) + raw


def _read_str(mv: memoryview, off: int, end: int) -> tuple[str, int]:
    if end - off < 2:
        raise ProtocolError(f"truncated string length at offset {off}")
    (n,) = _U16.unpack_from(mv, off)
    off += 2
    if n > end - off:
        raise ProtocolError(f"string of {n} bytes at offset {off} runs past the end")
    return str(mv[off : off + n], "utf-8", "surrogateescape"), off + n


# --------------------------------------------------------------------------
# Field codecs.  A message's wire spec is a string "name:kind name:kind ...";
# runs of fixed-size kinds are merged into one struct.

_FIXED_KINDS = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i64": "q", "qid": "BIQ"}
_VAR_KINDS = ("s", "strs", "qids", "data", "stat")

_Parts = list[bytes | bytearray | memoryview]


class _Op:
    def encode(self, msg: Any, parts: _Parts) -> None:
        raise NotImplementedError

    def decode(self, mv: memoryview, off: int, end: int, out: list[Any]) -> int:
        raise NotImplementedError


class _FixedOp(_Op):
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items
        self.struct = struct.Struct("<" + "".join(_FIXED_KINDS[k] for _, k in items))
        self.has_qid = any(k == "qid" for _, k in items)
        # where each qid's three values start among the unpacked values, last first
        starts, at = [], 0
        for _, kind in items:
            if kind == "qid":
                starts.append(at)
            at += 3 if kind == "qid" else 1
        self._qid_starts = tuple(reversed(starts))

    def encode(self, msg: Any, parts: _Parts) -> None:
        values: list[Any] = []
        for name, kind in self.items:
            v = getattr(msg, name)
            if kind == "qid":
                if not isinstance(v, Qid):
                    raise ProtocolError(f"{name}: expected a Qid, got {type(v).__name__}")
                values += (v.type, v.version, v.path)
            else:
                values.append(v)
        try:
            parts.append(self.struct.pack(*values))
        except struct.error as exc:
            raise ProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from None

    def decode(self, mv: memoryview, off: int, end: int, out: list[Any]) -> int:
        size = self.struct.size
        if end - off < size:
            raise ProtocolError(f"body truncated: need {size} bytes at offset {off}")
        values = self.struct.unpack_from(mv, off)
        if not self.has_qid:
            out.extend(values)
        else:
            merged = list(values)
            for i in self._qid_starts:
                merged[i : i + 3] = (Qid(values[i], values[i + 1], values[i + 2]),)
            out.extend(merged)
        return off + size


class _StrOp(_Op):
    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, msg: Any, parts: _Parts) -> None:
        parts.append(_pack_str(getattr(msg, self.name)))

    def decode(self, mv: memoryview, off: int, end: int, out: list[Any]) -> int:
        s, off = _read_str(mv, off, end)
        out.append(s)
        return off


class _StrsOp(_Op):
    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, msg: Any, parts: _Parts) -> None:
        names = getattr(msg, self.name)
        if type(names) is not tuple and (
            isinstance(names, (str, bytes)) or not isinstance(names, Sequence)
        ):
            raise ProtocolError(f"{self.name}: expected a sequence of str")
        if len(names) > MAXWELEM:
            raise ProtocolError(f"{self.name}: {len(names)} names exceed {MAXWELEM}")
        parts.append(_U16.pack(len(names)))
        parts.extend(_pack_str(n) for n in names)

    def decode(self, mv: memoryview, off: int, end: int, out: list[Any]) -> int:
        if end - off < 2:
            raise ProtocolError("truncated name count")
        (n,) = _U16.unpack_from(mv, off)
        off += 2
        if n > MAXWELEM:
            raise ProtocolError(f"{n} walk names exceed {MAXWELEM}")
        names = []
        for _ in range(n):
            s, off = _read_str(mv, off, end)
            names.append(s)
        out.append(tuple(names))
        return off


class _QidsOp(_Op):
    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, msg: Any, parts: _Parts) -> None:
        qids = getattr(msg, self.name)
        if not isinstance(qids, Sequence):
            raise ProtocolError(f"{self.name}: expected a sequence of Qid")
        if len(qids) > MAXWELEM:
            raise ProtocolError(f"{self.name}: {len(qids)} qids exceed {MAXWELEM}")
        parts.append(_U16.pack(len(qids)))
        for q in qids:
            if not isinstance(q, Qid):
                raise ProtocolError(f"{self.name}: expected Qid, got {type(q).__name__}")
            parts.append(q.pack())

    def decode(self, mv: memoryview, off: int, end: int, out: list[Any]) -> int:
        if end - off < 2:
            raise ProtocolError("truncated qid count")
        (n,) = _U16.unpack_from(mv, off)
        off += 2
        if n > MAXWELEM:
            raise ProtocolError(f"{n} qids exceed {MAXWELEM}")
        if n * QID_SIZE > end - off:
            raise ProtocolError(f"{n} qids run past the end of the message")
        qids = []
        for _ in range(n):
            qids.append(Qid(*_QID.unpack_from(mv, off)))
            off += QID_SIZE
        out.append(tuple(qids))
        return off


class _DataOp(_Op):
    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, msg: Any, parts: _Parts) -> None:
        data = getattr(msg, self.name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"{self.name}: expected bytes, got {type(data).__name__}")
        n = memoryview(data).nbytes
        if n > 0xFFFFFFFF:
            raise ProtocolError(f"{self.name}: {n} bytes exceed a 32-bit count")
        parts.append(_U32.pack(n))
        parts.append(data)

    def decode(self, mv: memoryview, off: int, end: int, out: list[Any]) -> int:
        if end - off < 4:
            raise ProtocolError("truncated data count")
        (n,) = _U32.unpack_from(mv, off)
        off += 4
        if n > end - off:
            raise ProtocolError(f"data count {n} exceeds the {end - off} bytes left")
        end_of_data: int = off + n
        out.append(bytes(mv[off:end_of_data]))
        return end_of_data


class _StatOp(_Op):
    """A :class:`Stat` wrapped in one more ``size[2]`` (Rstat, Twstat), as Linux and
    the Plan 9 manual have it; the outer size must be the stat's own plus 2."""

    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, msg: Any, parts: _Parts) -> None:
        stat = getattr(msg, self.name)
        if not isinstance(stat, Stat):
            raise ProtocolError(f"{self.name}: expected a Stat, got {type(stat).__name__}")
        raw = stat.pack()
        if len(raw) > 0xFFFF:
            raise ProtocolError(f"{self.name}: a stat of {len(raw)} bytes exceeds 65535")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)

    def decode(self, mv: memoryview, off: int, end: int, out: list[Any]) -> int:
        if end - off < 2:
            raise ProtocolError("truncated stat length")
        (n,) = _U16.unpack_from(mv, off)
        off += 2
        if n > end - off:
            raise ProtocolError(f"stat length {n} exceeds the {end - off} bytes left")
        stat, after = Stat.unpack_from(mv, off, off + n)
        if after != off + n:
            raise ProtocolError(f"stat length {n} does not match the stat's {after - off} bytes")
        out.append(stat)
        return after


def _compile(spec: str) -> tuple[list[str], list[_Op]]:
    names: list[str] = []
    ops: list[_Op] = []
    run: list[tuple[str, str]] = []
    for item in spec.split():
        name, _, kind = item.partition(":")
        names.append(name)
        if kind in _FIXED_KINDS:
            run.append((name, kind))
            continue
        if run:
            ops.append(_FixedOp(run))
            run = []
        if kind == "s":
            ops.append(_StrOp(name))
        elif kind == "strs":
            ops.append(_StrsOp(name))
        elif kind == "qids":
            ops.append(_QidsOp(name))
        elif kind == "data":
            ops.append(_DataOp(name))
        elif kind == "stat":
            ops.append(_StatOp(name))
        else:  # pragma: no cover - programming error in this module
            raise AssertionError(f"unknown field kind {kind!r}")
    if run:
        ops.append(_FixedOp(run))
    return names, ops


# --------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True, repr=False)
class Message:
    """Base class of every 9P message.

    :ivar tag: the request tag; a reply carries its request's tag
    :cvar TYPE: the message type number (:class:`MessageType`)
    """

    TYPE: ClassVar[int] = -1
    _WIRE: ClassVar[str] = ""
    _OPS: ClassVar[list[_Op]] = []
    #: For a message of fixed-size integer fields only: the struct of the
    #: whole message (header included) and the field names (the fast path
    #: of :func:`encode` and :func:`decode`).
    _FIXED: ClassVar[tuple[struct.Struct, tuple[str, ...]] | None] = None
    #: With :attr:`_FIXED`: the tag and the fields, as one tuple (``None``:
    #: the tag is the only field).
    _GET: ClassVar[Callable[[Any], tuple[Any, ...]] | None] = None
    #: For a message of fixed-size fields only, qids among them: the struct
    #: of the whole message and where each qid starts among its values, last
    #: first (the fast path of :func:`decode`).
    _DECODE: ClassVar[tuple[struct.Struct, tuple[int, ...]] | None] = None

    tag: int

    @property
    def is_request(self) -> bool:
        """True for T-messages, False for R-messages."""
        return self.TYPE % 2 == 0

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (bytes, bytearray, memoryview)) and len(v) > 32:
                text = f"<{len(v)} bytes {bytes(v[:16])!r}...>"
            else:
                text = repr(v)
            parts.append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"


_M = TypeVar("_M", bound=type[Message])
#: The 9P2000.L messages (9P2000's common ones included).
_BY_TYPE: dict[int, type[Message]] = {}
#: The 9P2000.u messages (the common ones are added after their definitions).
_BY_TYPE_U: dict[int, type[Message]] = {}


def _register(cls: _M, table: dict[int, type[Message]]) -> _M:
    names, ops = _compile(cls._WIRE)
    field_names = [f.name for f in fields(cls)]
    if field_names != ["tag", *names]:  # pragma: no cover - programming error
        raise AssertionError(f"{cls.__name__}: fields {field_names} != wire spec {names}")
    if cls.TYPE in _BY_TYPE or cls.TYPE in _BY_TYPE_U:  # pragma: no cover - programming error
        raise AssertionError(f"duplicate type {cls.TYPE}")
    cls._OPS = ops
    only = ops[0] if len(ops) == 1 else None
    if not ops or (isinstance(only, _FixedOp) and not only.has_qid):
        body = only.struct.format[1:] if isinstance(only, _FixedOp) else ""
        cls._FIXED = (struct.Struct("<IBH" + body), tuple(names))
        cls._GET = attrgetter("tag", *names) if names else None
    elif isinstance(only, _FixedOp):
        # the header's three values come first
        starts = tuple(start + 3 for start in only._qid_starts)
        cls._DECODE = (struct.Struct("<IBH" + only.struct.format[1:]), starts)
    table[cls.TYPE] = cls
    return cls


def _message(cls: _M) -> _M:
    """Register a 9P2000.L message class and compile its wire spec (``cls._WIRE``)."""
    return _register(cls, _BY_TYPE)


def _message_u(cls: _M) -> _M:
    """Register a 9P2000.u-only message class and compile its wire spec."""
    return _register(cls, _BY_TYPE_U)


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tversion(Message):
    """Negotiate the protocol version and maximum message size (tag is :data:`NOTAG`)."""

    TYPE: ClassVar[int] = MessageType.TVERSION
    _WIRE: ClassVar[str] = "msize:u32 version:s"
    msize: int
    version: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rversion(Message):
    """The server's msize (at most the client's) and version (or ``"unknown"``)."""

    TYPE: ClassVar[int] = MessageType.RVERSION
    _WIRE: ClassVar[str] = "msize:u32 version:s"
    msize: int
    version: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tauth(Message):
    """Start an authentication handshake on *afid*."""

    TYPE: ClassVar[int] = MessageType.TAUTH
    _WIRE: ClassVar[str] = "afid:u32 uname:s aname:s n_uname:u32"
    afid: int
    uname: str
    aname: str
    n_uname: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rauth(Message):
    """The qid of the authentication file."""

    TYPE: ClassVar[int] = MessageType.RAUTH
    _WIRE: ClassVar[str] = "aqid:qid"
    aqid: Qid


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tattach(Message):
    """Attach *fid* to the root of the tree *aname* as user *uname* / *n_uname*."""

    TYPE: ClassVar[int] = MessageType.TATTACH
    _WIRE: ClassVar[str] = "fid:u32 afid:u32 uname:s aname:s n_uname:u32"
    fid: int
    afid: int
    uname: str
    aname: str
    n_uname: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rattach(Message):
    """The qid of the attached root."""

    TYPE: ClassVar[int] = MessageType.RATTACH
    _WIRE: ClassVar[str] = "qid:qid"
    qid: Qid


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rerror(Message):
    """Legacy error reply (type 107).

    Encoded in the 9P2000.u form ``ename[s] errno[4]``.  Decoding also
    accepts a body made only of a 4-byte errno (nfs-ganesha), giving
    ``ename=""``.
    """

    TYPE: ClassVar[int] = MessageType.RERROR
    _WIRE: ClassVar[str] = "ename:s errno:u32"
    ename: str
    errno: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tflush(Message):
    """Abort the request tagged *oldtag*."""

    TYPE: ClassVar[int] = MessageType.TFLUSH
    _WIRE: ClassVar[str] = "oldtag:u16"
    oldtag: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rflush(Message):
    """The flushed request has been answered or will never be."""

    TYPE: ClassVar[int] = MessageType.RFLUSH


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Twalk(Message):
    """Walk from *fid* through *wnames* (at most 16) and bind the result to *newfid*."""

    TYPE: ClassVar[int] = MessageType.TWALK
    _WIRE: ClassVar[str] = "fid:u32 newfid:u32 wnames:strs"
    fid: int
    newfid: int
    wnames: tuple[str, ...]


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rwalk(Message):
    """The qids of the names walked; fewer than asked means a partial walk."""

    TYPE: ClassVar[int] = MessageType.RWALK
    _WIRE: ClassVar[str] = "wqids:qids"
    wqids: tuple[Qid, ...]


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tread(Message):
    """Read up to *count* bytes at *offset* of the open *fid*."""

    TYPE: ClassVar[int] = MessageType.TREAD
    _WIRE: ClassVar[str] = "fid:u32 offset:u64 count:u32"
    fid: int
    offset: int
    count: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rread(Message):
    """The bytes read (empty at end of file)."""

    TYPE: ClassVar[int] = MessageType.RREAD
    _WIRE: ClassVar[str] = "data:data"
    data: bytes


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Twrite(Message):
    """Write *data* at *offset* of the open *fid*."""

    TYPE: ClassVar[int] = MessageType.TWRITE
    _WIRE: ClassVar[str] = "fid:u32 offset:u64 data:data"
    fid: int
    offset: int
    data: bytes


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rwrite(Message):
    """The number of bytes written."""

    TYPE: ClassVar[int] = MessageType.RWRITE
    _WIRE: ClassVar[str] = "count:u32"
    count: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tclunk(Message):
    """Forget *fid*."""

    TYPE: ClassVar[int] = MessageType.TCLUNK
    _WIRE: ClassVar[str] = "fid:u32"
    fid: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rclunk(Message):
    """The fid is forgotten."""

    TYPE: ClassVar[int] = MessageType.RCLUNK


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tremove(Message):
    """Remove the file of *fid* and clunk *fid* (even if the removal fails)."""

    TYPE: ClassVar[int] = MessageType.TREMOVE
    _WIRE: ClassVar[str] = "fid:u32"
    fid: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rremove(Message):
    """The file is removed."""

    TYPE: ClassVar[int] = MessageType.RREMOVE


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rlerror(Message):
    """9P2000.L error reply: *ecode* is a Linux errno."""

    TYPE: ClassVar[int] = MessageType.RLERROR
    _WIRE: ClassVar[str] = "ecode:u32"
    ecode: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tstatfs(Message):
    """Ask for the statistics of the file system holding *fid*."""

    TYPE: ClassVar[int] = MessageType.TSTATFS
    _WIRE: ClassVar[str] = "fid:u32"
    fid: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rstatfs(Message):
    """File system statistics, as ``statfs(2)``."""

    TYPE: ClassVar[int] = MessageType.RSTATFS
    _WIRE: ClassVar[str] = (
        "type:u32 bsize:u32 blocks:u64 bfree:u64 bavail:u64 files:u64 ffree:u64"
        " fsid:u64 namelen:u32"
    )
    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: int
    namelen: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tlopen(Message):
    """Open *fid* for I/O; *flags* are ``L_O_*`` bits."""

    TYPE: ClassVar[int] = MessageType.TLOPEN
    _WIRE: ClassVar[str] = "fid:u32 flags:u32"
    fid: int
    flags: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rlopen(Message):
    """The opened file's qid and the I/O unit (0: use msize - :data:`IOHDRSZ`)."""

    TYPE: ClassVar[int] = MessageType.RLOPEN
    _WIRE: ClassVar[str] = "qid:qid iounit:u32"
    qid: Qid
    iounit: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tlcreate(Message):
    """Create and open regular file *name* in directory *fid*; *fid* then names the file."""

    TYPE: ClassVar[int] = MessageType.TLCREATE
    _WIRE: ClassVar[str] = "fid:u32 name:s flags:u32 mode:u32 gid:u32"
    fid: int
    name: str
    flags: int
    mode: int
    gid: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rlcreate(Message):
    """The created file's qid and the I/O unit."""

    TYPE: ClassVar[int] = MessageType.RLCREATE
    _WIRE: ClassVar[str] = "qid:qid iounit:u32"
    qid: Qid
    iounit: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tsymlink(Message):
    """Create symbolic link *name* -> *symtgt* in directory *fid*."""

    TYPE: ClassVar[int] = MessageType.TSYMLINK
    _WIRE: ClassVar[str] = "fid:u32 name:s symtgt:s gid:u32"
    fid: int
    name: str
    symtgt: str
    gid: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rsymlink(Message):
    """The new link's qid."""

    TYPE: ClassVar[int] = MessageType.RSYMLINK
    _WIRE: ClassVar[str] = "qid:qid"
    qid: Qid


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tmknod(Message):
    """Create node *name* (``mknod(2)`` *mode*, *major*, *minor*) in directory *dfid*."""

    TYPE: ClassVar[int] = MessageType.TMKNOD
    _WIRE: ClassVar[str] = "dfid:u32 name:s mode:u32 major:u32 minor:u32 gid:u32"
    dfid: int
    name: str
    mode: int
    major: int
    minor: int
    gid: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rmknod(Message):
    """The new node's qid."""

    TYPE: ClassVar[int] = MessageType.RMKNOD
    _WIRE: ClassVar[str] = "qid:qid"
    qid: Qid


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Trename(Message):
    """Rename the file of *fid* to *name* in directory *dfid*."""

    TYPE: ClassVar[int] = MessageType.TRENAME
    _WIRE: ClassVar[str] = "fid:u32 dfid:u32 name:s"
    fid: int
    dfid: int
    name: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rrename(Message):
    """The file is renamed."""

    TYPE: ClassVar[int] = MessageType.RRENAME


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Treadlink(Message):
    """Read the target of the symbolic link *fid*."""

    TYPE: ClassVar[int] = MessageType.TREADLINK
    _WIRE: ClassVar[str] = "fid:u32"
    fid: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rreadlink(Message):
    """The link's target."""

    TYPE: ClassVar[int] = MessageType.RREADLINK
    _WIRE: ClassVar[str] = "target:s"
    target: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tgetattr(Message):
    """Ask for the attributes of *fid* selected by *request_mask* (``P9_GETATTR_*``)."""

    TYPE: ClassVar[int] = MessageType.TGETATTR
    _WIRE: ClassVar[str] = "fid:u32 request_mask:u64"
    fid: int
    request_mask: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rgetattr(Message):
    """File attributes, as ``stat(2)``; *valid* (``P9_GETATTR_*``) says which are set.

    The inode number is ``qid.path``; times are seconds + nanoseconds.  The
    seconds are signed (``i64``): the wire's 8 bytes are two's complement, as
    Linux's v9fs (``time64_t``) and QEMU's 9pfs (``time_t``) write and read
    them, so a time before 1970 is negative.
    """

    TYPE: ClassVar[int] = MessageType.RGETATTR
    _WIRE: ClassVar[str] = (
        "valid:u64 qid:qid mode:u32 uid:u32 gid:u32 nlink:u64 rdev:u64 size:u64"
        " blksize:u64 blocks:u64 atime_sec:i64 atime_nsec:u64 mtime_sec:i64"
        " mtime_nsec:u64 ctime_sec:i64 ctime_nsec:u64 btime_sec:i64 btime_nsec:u64"
        " gen:u64 data_version:u64"
    )
    valid: int
    qid: Qid
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    ctime_sec: int
    ctime_nsec: int
    btime_sec: int
    btime_nsec: int
    gen: int
    data_version: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tsetattr(Message):
    """Set the attributes of *fid* selected by *valid* (``P9_SETATTR_*``).

    The seconds of the times are signed (``i64``, two's complement), as in
    :class:`Rgetattr`.
    """

    TYPE: ClassVar[int] = MessageType.TSETATTR
    _WIRE: ClassVar[str] = (
        "fid:u32 valid:u32 mode:u32 uid:u32 gid:u32 size:u64"
        " atime_sec:i64 atime_nsec:u64 mtime_sec:i64 mtime_nsec:u64"
    )
    fid: int
    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rsetattr(Message):
    """The attributes are set."""

    TYPE: ClassVar[int] = MessageType.RSETATTR


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Txattrwalk(Message):
    """Bind *newfid* to extended attribute *name* of *fid* (``""``: the list of names)."""

    TYPE: ClassVar[int] = MessageType.TXATTRWALK
    _WIRE: ClassVar[str] = "fid:u32 newfid:u32 name:s"
    fid: int
    newfid: int
    name: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rxattrwalk(Message):
    """The size of the attribute value (or of the name list)."""

    TYPE: ClassVar[int] = MessageType.RXATTRWALK
    _WIRE: ClassVar[str] = "size:u64"
    size: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Txattrcreate(Message):
    """Turn *fid* into a writer of extended attribute *name* (set at clunk)."""

    TYPE: ClassVar[int] = MessageType.TXATTRCREATE
    _WIRE: ClassVar[str] = "fid:u32 name:s attr_size:u64 flags:u32"
    fid: int
    name: str
    attr_size: int
    flags: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rxattrcreate(Message):
    """The fid is ready for writing the attribute value."""

    TYPE: ClassVar[int] = MessageType.RXATTRCREATE


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Treaddir(Message):
    """Read directory entries of the open directory *fid* after cookie *offset*."""

    TYPE: ClassVar[int] = MessageType.TREADDIR
    _WIRE: ClassVar[str] = "fid:u32 offset:u64 count:u32"
    fid: int
    offset: int
    count: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rreaddir(Message):
    """Packed :class:`Dirent` records (empty at the end of the directory)."""

    TYPE: ClassVar[int] = MessageType.RREADDIR
    _WIRE: ClassVar[str] = "data:data"
    data: bytes

    def entries(self) -> list[Dirent]:
        """Parse :attr:`data` into :class:`Dirent` records.

        :raises ProtocolError: the data is malformed
        """
        return parse_dirents(self.data)

    @classmethod
    def from_entries(cls, tag: int, entries: Iterable[Dirent]) -> Rreaddir:
        """Build an Rreaddir carrying *entries*."""
        return cls(tag, pack_dirents(entries))


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tfsync(Message):
    """Flush *fid*'s data to stable storage (*datasync* non-zero: data only)."""

    TYPE: ClassVar[int] = MessageType.TFSYNC
    _WIRE: ClassVar[str] = "fid:u32 datasync:u32"
    fid: int
    datasync: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rfsync(Message):
    """The data is on stable storage."""

    TYPE: ClassVar[int] = MessageType.RFSYNC


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tlock(Message):
    """Acquire or release a POSIX record lock (``P9_LOCK_TYPE_*``, ``P9_LOCK_FLAGS_*``)."""

    TYPE: ClassVar[int] = MessageType.TLOCK
    _WIRE: ClassVar[str] = (
        "fid:u32 type:u8 flags:u32 start:u64 length:u64 proc_id:u32 client_id:s"
    )
    fid: int
    type: int
    flags: int
    start: int
    length: int
    proc_id: int
    client_id: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rlock(Message):
    """The lock request's status (``P9_LOCK_SUCCESS``, ``P9_LOCK_BLOCKED``...)."""

    TYPE: ClassVar[int] = MessageType.RLOCK
    _WIRE: ClassVar[str] = "status:u8"
    status: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tgetlock(Message):
    """Test for a lock conflicting with the one described (``fcntl(F_GETLK)``)."""

    TYPE: ClassVar[int] = MessageType.TGETLOCK
    _WIRE: ClassVar[str] = "fid:u32 type:u8 start:u64 length:u64 proc_id:u32 client_id:s"
    fid: int
    type: int
    start: int
    length: int
    proc_id: int
    client_id: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rgetlock(Message):
    """A conflicting lock, or ``type == P9_LOCK_TYPE_UNLCK`` when there is none."""

    TYPE: ClassVar[int] = MessageType.RGETLOCK
    _WIRE: ClassVar[str] = "type:u8 start:u64 length:u64 proc_id:u32 client_id:s"
    type: int
    start: int
    length: int
    proc_id: int
    client_id: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tlink(Message):
    """Create hard link *name* in directory *dfid* to the file of *fid*."""

    TYPE: ClassVar[int] = MessageType.TLINK
    _WIRE: ClassVar[str] = "dfid:u32 fid:u32 name:s"
    dfid: int
    fid: int
    name: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rlink(Message):
    """The link is created."""

    TYPE: ClassVar[int] = MessageType.RLINK


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tmkdir(Message):
    """Create directory *name* in directory *dfid*."""

    TYPE: ClassVar[int] = MessageType.TMKDIR
    _WIRE: ClassVar[str] = "dfid:u32 name:s mode:u32 gid:u32"
    dfid: int
    name: str
    mode: int
    gid: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rmkdir(Message):
    """The new directory's qid."""

    TYPE: ClassVar[int] = MessageType.RMKDIR
    _WIRE: ClassVar[str] = "qid:qid"
    qid: Qid


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Trenameat(Message):
    """Rename *oldname* in *olddirfid* to *newname* in *newdirfid*."""

    TYPE: ClassVar[int] = MessageType.TRENAMEAT
    _WIRE: ClassVar[str] = "olddirfid:u32 oldname:s newdirfid:u32 newname:s"
    olddirfid: int
    oldname: str
    newdirfid: int
    newname: str


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Rrenameat(Message):
    """The file is renamed."""

    TYPE: ClassVar[int] = MessageType.RRENAMEAT


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Tunlinkat(Message):
    """Remove *name* from directory *dirfd* (*flags* may hold :data:`AT_REMOVEDIR`)."""

    TYPE: ClassVar[int] = MessageType.TUNLINKAT
    _WIRE: ClassVar[str] = "dirfd:u32 name:s flags:u32"
    dirfd: int
    name: str
    flags: int


@_message
@dataclass(frozen=True, slots=True, repr=False)
class Runlinkat(Message):
    """The name is removed."""

    TYPE: ClassVar[int] = MessageType.RUNLINKAT


# --------------------------------------------------------------------------
# 9P2000.u-only messages


@_message_u
@dataclass(frozen=True, slots=True, repr=False)
class Topen(Message):
    """9P2000.u: open *fid* for I/O; *mode*: :data:`OREAD`... | :data:`OTRUNC`, :data:`ORCLOSE`."""

    TYPE: ClassVar[int] = MessageType.TOPEN
    _WIRE: ClassVar[str] = "fid:u32 mode:u8"
    fid: int
    mode: int


@_message_u
@dataclass(frozen=True, slots=True, repr=False)
class Ropen(Message):
    """9P2000.u: the opened file's qid and I/O unit (0: none announced)."""

    TYPE: ClassVar[int] = MessageType.ROPEN
    _WIRE: ClassVar[str] = "qid:qid iounit:u32"
    qid: Qid
    iounit: int


@_message_u
@dataclass(frozen=True, slots=True, repr=False)
class Tcreate(Message):
    """9P2000.u: create *name* in directory *fid* and open it on *fid*.

    *perm* holds the permission bits and the ``DM*`` type (:data:`DMDIR`,
    :data:`DMSYMLINK`...); *extension* is a symbolic link's target or a
    device's ``"c major minor"``.
    """

    TYPE: ClassVar[int] = MessageType.TCREATE
    _WIRE: ClassVar[str] = "fid:u32 name:s perm:u32 mode:u8 extension:s"
    fid: int
    name: str
    perm: int
    mode: int
    extension: str


@_message_u
@dataclass(frozen=True, slots=True, repr=False)
class Rcreate(Message):
    """9P2000.u: the created file's qid and I/O unit."""

    TYPE: ClassVar[int] = MessageType.RCREATE
    _WIRE: ClassVar[str] = "qid:qid iounit:u32"
    qid: Qid
    iounit: int


@_message_u
@dataclass(frozen=True, slots=True, repr=False)
class Tstat(Message):
    """9P2000.u: ask for the :class:`Stat` of *fid*."""

    TYPE: ClassVar[int] = MessageType.TSTAT
    _WIRE: ClassVar[str] = "fid:u32"
    fid: int


@_message_u
@dataclass(frozen=True, slots=True, repr=False)
class Rstat(Message):
    """9P2000.u: the stat (``size[2]`` then the stat with its own ``size[2]``)."""

    TYPE: ClassVar[int] = MessageType.RSTAT
    _WIRE: ClassVar[str] = "stat:stat"
    stat: Stat


@_message_u
@dataclass(frozen=True, slots=True, repr=False)
class Twstat(Message):
    """9P2000.u: change the attributes of *fid* (see :meth:`Stat.wstat`)."""

    TYPE: ClassVar[int] = MessageType.TWSTAT
    _WIRE: ClassVar[str] = "fid:u32 stat:stat"
    fid: int
    stat: Stat


@_message_u
@dataclass(frozen=True, slots=True, repr=False)
class Rwstat(Message):
    """9P2000.u: the attributes are changed."""

    TYPE: ClassVar[int] = MessageType.RWSTAT


#: The messages 9P2000.u shares with 9P2000.L (same numbers, same layouts).
_BY_TYPE_U.update(
    (cls.TYPE, cls)
    for cls in (
        Tversion, Rversion, Tauth, Rauth, Tattach, Rattach, Rerror, Tflush, Rflush,
        Twalk, Rwalk, Tread, Rread, Twrite, Rwrite, Tclunk, Rclunk, Tremove, Rremove,
    )
)  # fmt: skip
_EVERY_TYPE: dict[int, type[Message]] = {**_BY_TYPE, **_BY_TYPE_U}
_DIALECTS: dict[str, dict[int, type[Message]]] = {
    VERSION_9P2000_L: _BY_TYPE,
    VERSION_9P2000_U: _BY_TYPE_U,
}


def _table(dialect: str) -> dict[int, type[Message]]:
    try:
        return _DIALECTS[dialect]
    except (KeyError, TypeError):
        raise ValueError(f"unknown 9P dialect {dialect!r}") from None


# --------------------------------------------------------------------------
# Encoding and decoding


def encode(msg: Message) -> bytes:
    """Return the wire form of *msg*, header included.

    Data-carrying messages (:class:`Twrite`, :class:`Rread`,
    :class:`Rreaddir`) copy their payload exactly once.

    :param msg: any message instance of this module
    :returns: the encoded message
    :raises ProtocolError: *msg* is not a message or a field does not fit
    """
    cls = type(msg)
    if not isinstance(msg, Message) or _EVERY_TYPE.get(cls.TYPE) is not cls:
        raise ProtocolError(f"not a 9P message: {msg!r}")
    if cls is Twalk:  # every path lookup: names packed without the generic ops
        data = _encode_twalk(msg)  # type: ignore[arg-type]
        if data is not None:
            return data
    fixed = cls._FIXED
    if fixed is not None:  # one struct for the whole message
        whole = fixed[0]
        get = cls._GET
        try:
            if get is None:
                return whole.pack(whole.size, cls.TYPE, msg.tag)
            return whole.pack(whole.size, cls.TYPE, *get(msg))
        except struct.error:
            pass  # the general path below names the field that does not fit
    parts: _Parts = [b""]
    for op in cls._OPS:
        op.encode(msg, parts)
    size = HEADER_SIZE + sum(memoryview(p).nbytes for p in parts)
    if size > 0xFFFFFFFF:
        raise ProtocolError(f"message of {size} bytes is too large")
    try:
        parts[0] = _HEADER.pack(size, cls.TYPE, msg.tag)
    except struct.error as exc:
        raise ProtocolError(f"cannot encode tag {msg.tag!r}: {exc}") from None
    return b"".join(parts)


#: size type tag fid newfid nwname: the fixed part of Twalk
_TWALK_HEAD = struct.Struct("<IBHIIH")


def _encode_twalk(msg: Twalk) -> bytes | None:
    """The common Twalk (a tuple of at most 16 str names) encoded directly;
    ``None`` for anything else, left to the generic path (which says what
    does not fit)."""
    return encode_twalk(msg.tag, msg.fid, msg.newfid, msg.wnames)


def encode_twalk(tag: int, fid: int, newfid: int, wnames: Sequence[str]) -> bytes | None:
    """``encode(Twalk(tag, fid, newfid, wnames))`` without the message
    object, for the common case: a tuple of at most :data:`MAXWELEM` str
    names, every field in range; ``None`` for anything else (:func:`encode`
    then says what does not fit)."""
    names = wnames
    if type(names) is not tuple or len(names) > MAXWELEM:
        return None
    parts = [b""]
    size = _TWALK_HEAD.size
    for name in names:
        if type(name) is not str:
            return None
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return None
        n = len(raw)
        if n > 0xFFFF:
            return None
        parts.append(_U16.pack(n))
        parts.append(raw)
        size += 2 + n
    try:
        parts[0] = _TWALK_HEAD.pack(size, Twalk.TYPE, tag, fid, newfid, len(names))
    except struct.error:
        return None
    return b"".join(parts)


#: size type tag fid request_mask: a whole Tgetattr
_TGETATTR = struct.Struct("<IBHIQ")


def encode_tgetattr(tag: int, fid: int, request_mask: int) -> bytes:
    """``encode(Tgetattr(tag, fid, request_mask))`` without the message object.

    :raises ProtocolError: a field does not fit
    """
    try:
        return _TGETATTR.pack(_TGETATTR.size, MessageType.TGETATTR, tag, fid, request_mask)
    except struct.error:
        return encode(Tgetattr(tag, fid, request_mask))  # says which field


#: A whole Rgetattr: size type tag valid qid(type version path) mode uid gid
#: nlink rdev size blksize blocks, then (sec nsec) of atime mtime ctime btime
#: (the seconds signed), gen, data_version
_RGETATTR = struct.Struct("<IBHQBIQIIIQQQQQqQqQqQqQQQ")


def rgetattr_values(raw: bytes | memoryview, tag: int) -> tuple[int, ...] | None:
    """The fields of *raw* if it is exactly an :class:`Rgetattr` to *tag*
    (its size field right, nothing more or less): ``(size, type, tag,
    valid, qid.type, qid.version, qid.path, mode, ...)``, the wire's order
    (see :class:`Rgetattr`); ``None`` for anything else (:func:`decode`
    then says what it is, or what is wrong).

    No message object is made: a caller that needs a few fields of the
    common reply reads them straight from the tuple.
    """
    if len(raw) != _RGETATTR.size:
        return None
    values = _RGETATTR.unpack_from(raw)
    if values[0] != _RGETATTR.size or values[1] != MessageType.RGETATTR or values[2] != tag:
        return None
    return values


#: size type tag nwqid: the fixed part of Rwalk
_RWALK_HEAD = struct.Struct("<IBHH")


def peek_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Read the header of a message whose body may not have arrived yet.

    :param data: at least the first 7 bytes of a message
    :returns: ``(size, type, tag)``; ``size`` counts the whole message
    :raises ProtocolError: fewer than 7 bytes, or ``size`` smaller than 7
    """
    mv = _as_bytes_view(data)
    if mv.nbytes < HEADER_SIZE:
        raise ProtocolError(f"a 9P header is {HEADER_SIZE} bytes, got {mv.nbytes}")
    size, mtype, tag = _HEADER.unpack_from(mv, 0)
    if size < HEADER_SIZE:
        raise ProtocolError(f"size field {size} is smaller than the header")
    return size, mtype, tag


def decode(data: bytes | bytearray | memoryview, dialect: str = VERSION_9P2000_L) -> Message:
    """Decode exactly one complete message.

    :param data: the message, header included, and nothing else
    :param dialect: :data:`VERSION_9P2000_L` (default) or :data:`VERSION_9P2000_U`:
        the message types known (the other dialect's own types are unknown)
    :returns: the message object
    :raises ProtocolError: the data is malformed in any way (see the module
        documentation)
    :raises ValueError: *dialect* is neither
    """
    table = _DIALECTS.get(dialect) if type(dialect) is str else None
    if table is None:
        table = _table(dialect)
    mv = memoryview(data) if type(data) is bytes else _as_bytes_view(data)
    n = mv.nbytes
    if n < HEADER_SIZE:
        raise ProtocolError(f"a 9P header is {HEADER_SIZE} bytes, got {n}")
    size, mtype, tag = _HEADER.unpack_from(mv, 0)
    if size < HEADER_SIZE:
        raise ProtocolError(f"size field {size} is smaller than the header")
    if size != n:
        raise ProtocolError(f"size field says {size} bytes but {n} were given")
    cls = table.get(mtype)
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype}")
    if cls is Rerror:
        return _decode_rerror(mv, tag)
    if cls is Rwalk and n >= _RWALK_HEAD.size:  # every path lookup: no generic field ops
        (count,) = _U16.unpack_from(mv, HEADER_SIZE)
        if count <= MAXWELEM and n == _RWALK_HEAD.size + count * QID_SIZE:
            off = _RWALK_HEAD.size
            qids = []
            for _ in range(count):
                qids.append(Qid(*_QID.unpack_from(mv, off)))
                off += QID_SIZE
            return Rwalk(tag, tuple(qids))
        # anything else: the generic path below says what is wrong
    fixed = cls._FIXED
    if fixed is not None and fixed[0].size == n:  # one struct for the whole message
        return cls(*fixed[0].unpack_from(mv, 0)[2:])
    whole = cls._DECODE
    if whole is not None and whole[0].size == n:  # one struct, qids among the values
        raw = whole[0].unpack_from(mv, 0)
        merged = list(raw)
        for i in whole[1]:
            merged[i : i + 3] = (Qid(raw[i], raw[i + 1], raw[i + 2]),)
        return cls(*merged[2:])
    values: list[Any] = [tag]
    off = HEADER_SIZE
    for op in cls._OPS:
        off = op.decode(mv, off, n, values)
    if off != n:
        raise ProtocolError(f"{cls.__name__}: {n - off} trailing byte(s)")
    return cls(*values)


def _decode_rerror(mv: memoryview, tag: int) -> Rerror:
    n = mv.nbytes
    body = n - HEADER_SIZE
    if body == 4:
        # nfs-ganesha: a bare errno (a 9P2000.u body is at least 6 bytes).
        (err,) = _U32.unpack_from(mv, HEADER_SIZE)
        return Rerror(tag, "", err)
    ename, off = _read_str(mv, HEADER_SIZE, n)
    if n - off != 4:
        raise ProtocolError(f"Rerror: expected a 4-byte errno after ename, got {n - off} bytes")
    (err,) = _U32.unpack_from(mv, off)
    return Rerror(tag, ename, err)


def message_class(mtype: int, dialect: str = VERSION_9P2000_L) -> type[Message]:
    """Return the class of message type number *mtype* in *dialect* (default 9P2000.L).

    :raises ProtocolError: no such message type in *dialect*
    """
    cls = _table(dialect).get(mtype)
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype!r}")
    return cls


def message_classes(dialect: str = VERSION_9P2000_L) -> dict[int, type[Message]]:
    """Return a new mapping of every type number of *dialect* (default 9P2000.L) to its class."""
    return dict(_table(dialect))


def reply_type_for(request: Message | type[Message] | int) -> type[Message]:
    """Return the class of the successful reply to *request*.

    The reply to a T-message of type ``t`` has type ``t + 1``; an error
    reply (:class:`Rlerror` or :class:`Rerror`) is acceptable for any
    request.

    :param request: a T-message, its class, or its type number
    :raises ProtocolError: *request* is not a T-message type
    """
    if isinstance(request, int):
        mtype = request
    elif isinstance(request, Message) or (
        isinstance(request, type) and issubclass(request, Message)
    ):
        mtype = request.TYPE
    else:
        raise ProtocolError(f"not a 9P message: {request!r}")
    cls = _EVERY_TYPE.get(mtype)
    if cls is None or mtype % 2 != 0:
        raise ProtocolError(f"{mtype!r} is not a request type")
    return _EVERY_TYPE[mtype + 1]
