"""File objects over 9P fids: :class:`RemoteFileIO` and the ``open()`` machinery.

:meth:`pyxen9p.p9.client.Client.open` returns the same layers as
:func:`builtins.open`: a :class:`RemoteFileIO` (an :class:`io.RawIOBase` over an
open fid), wrapped in :class:`io.BufferedReader`, :class:`io.BufferedWriter` or
:class:`io.BufferedRandom`, and in :class:`io.TextIOWrapper` for text modes.
Reads and writes larger than the fid's I/O unit are split and keep several
Tread/Twrite requests in flight.
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyxen9p.p9 import codec as c

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typing-extensions 4.6; only for type checkers

    from pyxen9p.p9.client import Client

__all__ = ["OpenMode", "RemoteFileIO", "parse_mode"]


@dataclass(frozen=True)
class OpenMode:
    """A parsed :func:`open` mode string.

    :ivar reading: opened for reading
    :ivar writing: opened for writing
    :ivar creating: ``"x"``: create, fail if the file exists
    :ivar truncating: ``"w"``: create or truncate
    :ivar appending: ``"a"``: create, write at the end
    :ivar updating: ``"+"``: both reading and writing
    :ivar binary: ``"b"`` (else text)
    :ivar raw_mode: the mode of the raw object, as :class:`io.FileIO` spells it
    """

    reading: bool
    writing: bool
    creating: bool
    truncating: bool
    appending: bool
    updating: bool
    binary: bool
    raw_mode: str

    @property
    def flags(self) -> int:
        """The ``L_O_*`` flags of Tlopen / Tlcreate for this mode."""
        if self.updating:
            flags = c.L_O_RDWR
        elif self.reading:
            flags = c.L_O_RDONLY
        else:
            flags = c.L_O_WRONLY
        if self.creating:
            flags |= c.L_O_CREAT | c.L_O_EXCL
        elif self.truncating:
            flags |= c.L_O_CREAT | c.L_O_TRUNC
        elif self.appending:
            flags |= c.L_O_CREAT | c.L_O_APPEND
        return flags

    @property
    def may_create(self) -> bool:
        """Whether the file is created when missing."""
        return self.creating or self.truncating or self.appending


def parse_mode(mode: str) -> OpenMode:
    """Parse an :func:`open` mode string exactly as :func:`builtins.open` does.

    :raises ValueError: invalid mode
    """
    if not isinstance(mode, str):
        raise TypeError(f"open() argument 'mode' must be str, not {type(mode).__name__}")
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rwxabt+"):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = [k for k in "rwxa" if k in chars]
    if len(kinds) != 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    if "b" in chars and "t" in chars:
        raise ValueError("can't have text and binary mode at once")
    kind = kinds[0]
    updating = "+" in chars
    reading = kind == "r" or updating
    writing = kind != "r" or updating
    raw = {"r": "rb", "w": "wb", "x": "xb", "a": "ab"}[kind] + ("+" if updating else "")
    return OpenMode(
        reading=reading,
        writing=writing,
        creating=kind == "x",
        truncating=kind == "w",
        appending=kind == "a",
        updating=updating,
        binary="b" in chars,
        raw_mode=raw,
    )


class RemoteFileIO(io.RawIOBase):
    """An open 9P file: raw, unbuffered I/O at a file position, like :class:`io.FileIO`.

    Made by :meth:`pyxen9p.p9.client.Client.open`; closing it clunks the fid.
    It has no file descriptor: :meth:`fileno` raises
    :class:`io.UnsupportedOperation`.

    :ivar name: the 9P path it was opened with
    :ivar mode: the mode, as :class:`io.FileIO` spells it (``"rb"``, ``"wb+"``...)
    :ivar iounit: the largest data size of one Tread / Twrite on this fid
    :ivar qid: the file's qid
    """

    def __init__(
        self,
        client: Client,
        fid: int,
        *,
        name: str,
        mode: OpenMode,
        iounit: int,
        qid: c.Qid,
        position: int = 0,
    ) -> None:
        super().__init__()
        self._client = client
        self._fid = fid
        self._pos = position
        # where the last read came back short (the end of the file, most
        # likely): the next read from there asks for one I/O unit first
        self._short_at = -1
        self._mode = mode
        self.name = name
        self.mode = mode.raw_mode
        self.iounit = iounit
        self.qid = qid

    # --- capabilities --------------------------------------------------------

    def readable(self) -> bool:
        """Whether the file was opened for reading."""
        self._check_open()
        return self._mode.reading

    def writable(self) -> bool:
        """Whether the file was opened for writing."""
        self._check_open()
        return self._mode.writing

    def seekable(self) -> bool:
        """Always true (9P reads and writes carry an offset)."""
        self._check_open()
        return True

    def isatty(self) -> bool:
        """Always false."""
        self._check_open()
        return False

    def fileno(self) -> int:
        """A 9P file has no local descriptor.

        :raises io.UnsupportedOperation: always
        """
        raise io.UnsupportedOperation(f"{self.name}: a 9P file has no file descriptor")

    @property
    def fid(self) -> int:
        """The fid of the open file (``-1`` once closed)."""
        return -1 if self.closed else self._fid

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def _check_readable(self) -> None:
        self._check_open()
        if not self._mode.reading:
            raise io.UnsupportedOperation("File not open for reading")

    def _check_writable(self) -> None:
        self._check_open()
        if not self._mode.writing:
            raise io.UnsupportedOperation("File not open for writing")

    # --- reading ---------------------------------------------------------------

    def readinto(self, buffer: Buffer) -> int:
        """Read at the current position into *buffer*; return the byte count (0 at EOF).

        Reads larger than :attr:`iounit` keep several Treads in flight.
        A read from where the last one came back short (the end of the
        file, most likely) first asks for one I/O unit, as the kernel's
        client does at every read: the reply to it says whether the file
        grew, and a window of Treads at the end of a file costs only one.
        """
        self._check_readable()
        client, fid, pos, iounit = self._client, self._fid, self._pos, self.iounit
        with memoryview(buffer) as view, view.cast("B") as mv:
            n = mv.nbytes
            asked = min(n, iounit * client.window)
            if pos == self._short_at and n > iounit:
                got = client._pread_into(fid, pos, mv[:iounit], iounit, self.name)
                if got == iounit:  # it grew: the rest as usual
                    asked = iounit + min(n - iounit, iounit * client.window)
                    got += client._pread_into(fid, pos + got, mv[iounit:], iounit, self.name)
            else:
                got = client._pread_into(fid, pos, mv, iounit, self.name)
        self._pos = pos + got
        self._short_at = pos + got if got < asked else -1
        return got

    def readall(self) -> bytes:
        """Read from the current position to the end of the file.

        The size known from Tgetattr is read with several Treads in flight;
        a file that grew meanwhile (or a special file with no size) is read
        on to the end.  At most the client's
        :attr:`~pyxen9p.p9.client.Client.max_read` bytes are taken.

        :raises OSError: ``EFBIG``: the rest of the file is larger than
            ``max_read`` (nothing is returned, the position does not move)
        """
        self._check_readable()
        client = self._client
        limit = client.max_read
        size = client._fid_size(self._fid, self.name)
        if limit is not None and size - self._pos > limit:
            raise client._read_limit_error(self.name, limit, f"the file has {size} bytes:")
        chunks: list[bytes] = []
        pos = self._pos
        if size > pos:
            # the size known, read straight into one buffer, a window of Treads at a time
            buf = bytearray(size - pos)
            got = 0
            with memoryview(buf) as mv:
                while got < len(buf):
                    n = client._pread_into(self._fid, pos + got, mv[got:], self.iounit, self.name)
                    if not n:
                        break
                    got += n
            chunks.append(bytes(buf) if got == len(buf) else bytes(buf[:got]))
            pos += got
        # the file may have grown (or be a special file with no size): read to EOF
        while True:
            # ask for one byte past the limit, to tell "exactly the limit" from "more"
            count = self.iounit
            if limit is not None:
                count = min(count, limit - (pos - self._pos) + 1)
            chunk = client._read_at(self._fid, pos, count, self.name)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
            if limit is not None and pos - self._pos > limit:
                raise client._read_limit_error(self.name, limit, "the file grew to")
        self._pos = pos
        return b"".join(chunks)

    # --- writing ---------------------------------------------------------------

    def write(self, buffer: Buffer) -> int:
        """Write *buffer* at the current position; return the byte count written.

        Writes larger than :attr:`iounit` keep several Twrites in flight
        (except in append mode, where they go one by one, in order).
        """
        self._check_writable()
        with memoryview(buffer) as view, view.cast("B") as mv:
            if not mv.nbytes:
                return 0
            n = self._client._pwrite_from(
                self._fid,
                self._pos,
                mv,
                self.iounit,
                self.name,
                parallel=not self._mode.appending,
            )
        self._pos += n
        return n

    # --- positioning -----------------------------------------------------------

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        """Move the position: *whence* is ``SEEK_SET``, ``SEEK_CUR`` or ``SEEK_END``.

        :returns: the new absolute position
        :raises OSError: ``EINVAL`` for a negative result
        """
        self._check_open()
        pos = pos.__index__()
        if whence == os.SEEK_SET:
            new = pos
        elif whence == os.SEEK_CUR:
            new = self._pos + pos
        elif whence == os.SEEK_END:
            new = self._client._fid_size(self._fid, self.name) + pos
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if new < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), self.name)
        self._pos = new
        return new

    def tell(self) -> int:
        """The current position."""
        self._check_open()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        """Resize the file to *size* bytes (default: the current position).

        The position does not move.

        :returns: the new size
        """
        self._check_writable()
        size = self._pos if size is None else size.__index__()
        if size < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), self.name)
        self._client._setattr_fid(self._fid, self.name, c.P9_SETATTR_SIZE, size=size)
        return size

    # --- other -----------------------------------------------------------------

    def stat(self) -> os.stat_result:
        """The attributes of the open file (Tgetattr on its fid)."""
        self._check_open()
        return self._client._getattr_fid(self._fid, self.name)

    def fsync(self, datasync: bool = False) -> None:
        """Ask the server to put the file's data on stable storage (Tfsync)."""
        self._check_open()
        self._client._fsync_fid(self._fid, self.name, datasync)

    def close(self) -> None:
        """Clunk the fid (idempotent)."""
        if self.closed:
            return
        try:
            self._client._clunk_quiet(self._fid)
        finally:
            super().close()

    def __del__(self) -> None:
        # Never talk to the server from a finalizer (it may run on any thread,
        # even a transport's reader): hand the fid back to the client, which
        # clunks it with its next operation.
        if self.closed:
            return
        warnings.warn(f"unclosed 9P file {self.name!r}", ResourceWarning, stacklevel=2)
        self._client._defer_clunk(self._fid)
        try:
            super().close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fid={self._fid}"
        return f"<RemoteFileIO name={self.name!r} mode={self.mode!r} {state}>"
