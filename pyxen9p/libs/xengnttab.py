"""Bindings of ``libxengnttab`` (``xengnttab.h``): grant tables.

Two handles live in this library:

* :class:`GrantTable` (``xengnttab_*``, the gntdev device) maps pages that
  *other* domains granted to this one, and copies through grant references;
* :class:`GrantSharer` (``xengntshr_*``, the gntalloc device) shares this
  domain's own pages with another domain.

A mapping (:class:`GrantMapping`) or a set of shared pages
(:class:`SharedPages`) is exposed as one contiguous :class:`memoryview`
(``.buffer``) that is released before the memory is unmapped; it keeps its
handle alive, and closing the handle unmaps or unshares whatever is left.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Sequence
from ctypes import POINTER, c_int, c_uint32, c_void_p
from dataclasses import dataclass

from typing_extensions import Self

from pyxen9p.errors import HandleClosedError
from pyxen9p.libs._ctypeslib import (
    CHandle,
    LibraryArg,
    LibrarySpec,
    SharedMemoryView,
    Signature,
    check_minus_one,
    check_null,
)

__all__ = [
    "GNTCOPY_DEST_GREF",
    "GNTCOPY_SOURCE_GREF",
    "GNTST_OKAY",
    "LIBRARY",
    "PAGE_SIZE",
    "ForeignPage",
    "GrantCopySegment",
    "GrantMapping",
    "GrantSharer",
    "GrantTable",
    "SharedPages",
]

#: Xen's page size: grants are always 4 KiB pages.
PAGE_SIZE = 4096
GNTCOPY_SOURCE_GREF = 1 << 0
GNTCOPY_DEST_GREF = 1 << 1
#: ``GNTST_okay``: the status of a successful grant-copy segment.
GNTST_OKAY = 0
_NO_NOTIFY = 0xFFFFFFFF


class _Foreign(ctypes.Structure):
    _fields_ = [("ref", ctypes.c_uint32), ("offset", ctypes.c_uint16), ("domid", ctypes.c_uint16)]


class _CopyPtr(ctypes.Union):
    _fields_ = [("virt", c_void_p), ("foreign", _Foreign)]


class _CopySegment(ctypes.Structure):
    _fields_ = [
        ("source", _CopyPtr),
        ("dest", _CopyPtr),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


_H = c_void_p
_U32P = POINTER(c_uint32)

LIBRARY = LibrarySpec(
    name="libxengnttab",
    sonames=("libxengnttab.so.1",),
    env_var="PYXEN9P_LIBXENGNTTAB",
    package="libxengnttab1",
    signatures={
        # gntdev: mapping foreign grants
        "xengnttab_open": Signature((c_void_p, ctypes.c_uint), c_void_p, check_null),
        "xengnttab_close": Signature((_H,), c_int, check_minus_one),
        "xengnttab_fd": Signature((_H,), c_int, check_minus_one),
        "xengnttab_map_grant_ref": Signature((_H, c_uint32, c_uint32, c_int), c_void_p, check_null),
        "xengnttab_map_grant_refs": Signature(
            (_H, c_uint32, _U32P, _U32P, c_int), c_void_p, check_null
        ),
        "xengnttab_map_domain_grant_refs": Signature(
            (_H, c_uint32, c_uint32, _U32P, c_int), c_void_p, check_null
        ),
        "xengnttab_map_grant_ref_notify": Signature(
            (_H, c_uint32, c_uint32, c_int, c_uint32, c_uint32), c_void_p, check_null
        ),
        "xengnttab_unmap": Signature((_H, c_void_p, c_uint32), c_int, check_minus_one),
        "xengnttab_set_max_grants": Signature((_H, c_uint32), c_int, check_minus_one),
        "xengnttab_grant_copy": Signature(
            (_H, c_uint32, POINTER(_CopySegment)), c_int, check_minus_one
        ),
        # gntalloc: sharing own pages
        "xengntshr_open": Signature((c_void_p, ctypes.c_uint), c_void_p, check_null),
        "xengntshr_close": Signature((_H,), c_int, check_minus_one),
        "xengntshr_fd": Signature((_H,), c_int, check_minus_one),
        "xengntshr_share_pages": Signature(
            (_H, c_uint32, c_int, _U32P, c_int), c_void_p, check_null
        ),
        "xengntshr_share_page_notify": Signature(
            (_H, c_uint32, _U32P, c_int, c_uint32, c_uint32), c_void_p, check_null
        ),
        "xengntshr_unshare": Signature((_H, c_void_p, c_uint32), c_int, check_minus_one),
    },
)


def _u32_array(values: Sequence[int]) -> ctypes.Array[c_uint32]:
    return (c_uint32 * len(values))(*values)


def _notify_args(offset: int | None, port: int | None, count: int) -> tuple[int, int]:
    if offset is not None and not 0 <= offset < count * PAGE_SIZE:
        raise ValueError(f"notify offset {offset} is outside the mapping")
    return (_NO_NOTIFY if offset is None else offset, _NO_NOTIFY if port is None else port)


class _Region:
    """Memory that a handle mapped: a view over it and how to give it back."""

    _owner: _RegionOwner
    _memory: SharedMemoryView | None

    def _setup(self, owner: _RegionOwner, address: int, count: int, readonly: bool) -> None:
        self._owner = owner
        self.address = address
        #: number of 4 KiB pages
        self.count = count
        self._memory = SharedMemoryView(address, count * PAGE_SIZE, readonly=readonly)
        owner._regions[address] = self

    @property
    def buffer(self) -> memoryview:
        """One contiguous view of all pages (released by :meth:`close`)."""
        if self._memory is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._memory.view

    @property
    def closed(self) -> bool:
        """Whether the memory was given back."""
        return self._owner._regions.get(self.address) is not self

    def close(self) -> None:
        """Release :attr:`buffer`, then unmap (idempotent).

        If the unmap fails the region stays registered with its handle, and
        calling :meth:`close` again (or closing the handle) retries it.  In a
        child process after ``fork()`` only the view is released: unmapping
        through the inherited descriptor would act on the parent's grants.

        :raises BufferError: if a view derived from :attr:`buffer` is still in
            use; the memory then stays mapped until this is called again
        """
        owner = self._owner
        if owner.forked:
            self._release_view()
            owner._regions.pop(self.address, None)
            return
        # one give-back at a time per handle, and never one that the
        # handle's own close also does (a double unmap could hit a newer
        # mapping at the same address)
        with owner._region_lock:
            self._release_view()
            if owner._regions.get(self.address) is not self:
                return  # already given back
            try:
                with owner._using() as handle:
                    owner._give_back(handle, self.address, self.count)
                    # forgotten within the call: a release that waits for
                    # it (or that it runs as the last call) skips it
                    del owner._regions[self.address]
            except HandleClosedError:
                if owner._ptr is None:
                    owner._regions.pop(self.address, None)
                # else the handle is closing on another thread: its
                # release gives the memory back

    def _release_view(self) -> None:
        memory = self._memory
        if memory is not None:
            memory.release()
            self._memory = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RegionOwner(CHandle):
    _regions: dict[int, _Region]
    _region_lock: threading.RLock

    def _give_back(self, handle: int, address: int, count: int) -> None:
        raise NotImplementedError

    def _release_regions(self) -> None:
        """Give back every region before the handle closes.

        The handle's close is the last chance to unmap, so a region whose
        unmap fails is tried once more; if it still fails (or a view of it is
        still in use) its memory stays mapped until the process exits, and the
        first error is raised after the others were released.
        """
        with self._region_lock:
            self._release_regions_locked()

    def _release_regions_locked(self) -> None:
        first_error: BaseException | None = None
        for region in list(self._regions.values()):
            for attempt in (1, 2):
                try:
                    region.close()
                    break
                except BufferError as exc:
                    # a view is still alive: leaving the memory mapped is the
                    # only safe choice
                    self._regions.pop(region.address, None)
                    first_error = first_error or exc
                    break
                except OSError as exc:
                    if attempt == 2:
                        self._regions.pop(region.address, None)
                        first_error = first_error or exc
        if first_error is not None:
            raise first_error


class GrantMapping(_Region):
    """Foreign pages mapped by :class:`GrantTable` (``xengnttab_unmap`` on close).

    :ivar address: the mapping's address
    :ivar count: the number of pages
    """

    def __init__(self, table: GrantTable, address: int, count: int, readonly: bool) -> None:
        self.table = table  # keeps the handle alive while the mapping exists
        self._setup(table, address, count, readonly)


class SharedPages(_Region):
    """This domain's pages shared by :class:`GrantSharer` (unshared on close).

    :ivar refs: the grant reference of each page, in order
    :ivar domid: the domain the pages are granted to
    """

    def __init__(
        self, sharer: GrantSharer, address: int, refs: tuple[int, ...], domid: int, writable: bool
    ) -> None:
        self.sharer = sharer  # keeps the handle alive while the pages exist
        self._refs = refs
        self.domid = domid
        self.writable = writable
        self._setup(sharer, address, len(refs), readonly=False)

    @property
    def refs(self) -> tuple[int, ...]:
        """The grant reference of each page, in order."""
        return self._refs


@dataclass(frozen=True)
class ForeignPage:
    """One side of a grant copy that is a page granted by another domain."""

    domid: int
    ref: int
    offset: int = 0


@dataclass
class GrantCopySegment:
    """One ``xengnttab_grant_copy_segment_t``.

    Each of *source* and *dest* is a :class:`ForeignPage` or a local buffer
    (*dest* must then be writable); at least one side is foreign, and
    ``offset + length`` stays within one page on a foreign side.

    :ivar status: ``GNTST_*`` after :meth:`GrantTable.grant_copy`
    """

    source: ForeignPage | bytes | bytearray | memoryview
    dest: ForeignPage | bytearray | memoryview
    length: int
    status: int | None = None


class GrantTable(_RegionOwner):
    """A gntdev handle (``xengnttab_open``): map grants of other domains.

    :param library: which ``libxengnttab`` to use
    :raises FileNotFoundError: without ``/dev/xen/gntdev``
    """

    def __init__(self, *, library: LibraryArg = None) -> None:
        self._lib = LIBRARY.load(library)
        self._regions = {}
        self._region_lock = threading.RLock()
        self._adopt(self._lib.xengnttab_open(None, 0))

    def _release(self, pointer: int) -> None:
        try:
            self._release_regions()
        finally:
            self._lib.xengnttab_close(pointer)

    def _give_back(self, handle: int, address: int, count: int) -> None:
        self._lib.xengnttab_unmap(handle, address, count)

    def fileno(self) -> int:
        """``xengnttab_fd``: the gntdev file descriptor."""
        return int(self._call(self._lib.xengnttab_fd))

    def set_max_grants(self, count: int) -> None:
        """``xengnttab_set_max_grants``: call right after opening."""
        self._call(self._lib.xengnttab_set_max_grants, count)

    @staticmethod
    def _prot(writable: bool) -> int:
        return mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)

    def map_grant_ref(
        self,
        domid: int,
        ref: int,
        *,
        writable: bool = True,
        notify_offset: int | None = None,
        notify_port: int | None = None,
    ) -> GrantMapping:
        """Map one page granted by *domid*.

        With *notify_offset* and/or *notify_port*, uses
        ``xengnttab_map_grant_ref_notify``: on unmap (or process death) the byte
        at *notify_offset* is cleared and *notify_port* signalled.
        """
        # the region is registered within the call, so a concurrent close
        # either refuses the call or unmaps the new region
        with self._using() as handle:
            if notify_offset is None and notify_port is None:
                address = self._lib.xengnttab_map_grant_ref(
                    handle, domid, ref, self._prot(writable)
                )
            else:
                offset, port = _notify_args(notify_offset, notify_port, 1)
                address = self._lib.xengnttab_map_grant_ref_notify(
                    handle, domid, ref, self._prot(writable), offset, port
                )
            return GrantMapping(self, address, 1, not writable)

    def map_grant_refs(
        self, domids: Sequence[int], refs: Sequence[int], *, writable: bool = True
    ) -> GrantMapping:
        """``xengnttab_map_grant_refs``: map ``refs[i]`` of ``domids[i]``, contiguously."""
        if len(domids) != len(refs) or not refs:
            raise ValueError("domids and refs must be non-empty and of equal length")
        with self._using() as handle:
            address = self._lib.xengnttab_map_grant_refs(
                handle, len(refs), _u32_array(domids), _u32_array(refs), self._prot(writable)
            )
            return GrantMapping(self, address, len(refs), not writable)

    def map_domain_grant_refs(
        self, domid: int, refs: Sequence[int], *, writable: bool = True
    ) -> GrantMapping:
        """``xengnttab_map_domain_grant_refs``: map *refs* of one domain, contiguously."""
        if not refs:
            raise ValueError("refs must not be empty")
        with self._using() as handle:
            address = self._lib.xengnttab_map_domain_grant_refs(
                handle, len(refs), domid, _u32_array(refs), self._prot(writable)
            )
            return GrantMapping(self, address, len(refs), not writable)

    def grant_copy(self, segments: Sequence[GrantCopySegment]) -> list[int]:
        """``xengnttab_grant_copy``: copy to/from grant references.

        :returns: each segment's ``GNTST_*`` status (also stored in
            ``segment.status``); a failed segment does not raise
        :raises OSError: if the whole call fails
        """
        array = (_CopySegment * len(segments))()
        keep: list[object] = []
        for seg, c_seg in zip(segments, array, strict=False):
            if seg.length <= 0 or seg.length > PAGE_SIZE:
                raise ValueError(f"segment length {seg.length} outside 1..{PAGE_SIZE}")
            flags = 0
            for side, c_side, flag in (
                (seg.source, c_seg.source, GNTCOPY_SOURCE_GREF),
                (seg.dest, c_seg.dest, GNTCOPY_DEST_GREF),
            ):
                if isinstance(side, ForeignPage):
                    if side.offset + seg.length > PAGE_SIZE:
                        raise ValueError("a foreign segment must stay within one page")
                    c_side.foreign.ref = side.ref
                    c_side.foreign.offset = side.offset
                    c_side.foreign.domid = side.domid
                    flags |= flag
                else:
                    if len(side) < seg.length:
                        raise ValueError("local buffer shorter than the segment")
                    if flag == GNTCOPY_DEST_GREF:
                        local = (ctypes.c_char * len(side)).from_buffer(side)
                    else:
                        local = ctypes.create_string_buffer(bytes(side), len(side))
                    keep.append(local)
                    c_side.virt = ctypes.addressof(local)
            if not flags:
                raise ValueError("a grant-copy segment needs a foreign side")
            c_seg.len = seg.length
            c_seg.flags = flags
        self._call(self._lib.xengnttab_grant_copy, len(segments), array)
        statuses = [int(c_seg.status) for c_seg in array]
        for seg, status in zip(segments, statuses, strict=False):
            seg.status = status
        del keep
        return statuses


class GrantSharer(_RegionOwner):
    """A gntalloc handle (``xengntshr_open``): share this domain's pages.

    :param library: which ``libxengnttab`` to use
    :raises FileNotFoundError: without ``/dev/xen/gntalloc``
    """

    def __init__(self, *, library: LibraryArg = None) -> None:
        self._lib = LIBRARY.load(library)
        self._regions = {}
        self._region_lock = threading.RLock()
        self._adopt(self._lib.xengntshr_open(None, 0))

    def _release(self, pointer: int) -> None:
        try:
            self._release_regions()
        finally:
            self._lib.xengntshr_close(pointer)

    def _give_back(self, handle: int, address: int, count: int) -> None:
        self._lib.xengntshr_unshare(handle, address, count)

    def fileno(self) -> int:
        """``xengntshr_fd``: the gntalloc file descriptor."""
        return int(self._call(self._lib.xengntshr_fd))

    def share_pages(self, domid: int, count: int, *, writable: bool = True) -> SharedPages:
        """``xengntshr_share_pages``: share *count* new zeroed pages with *domid*.

        The pages are one contiguous mapping; ``.refs`` lists their grants.
        """
        if count <= 0:
            raise ValueError("count must be positive")
        refs = (c_uint32 * count)()
        with self._using() as handle:
            address = self._lib.xengntshr_share_pages(handle, domid, count, refs, int(writable))
            return SharedPages(self, address, tuple(refs), domid, writable)

    def share_page_notify(
        self,
        domid: int,
        *,
        writable: bool = True,
        notify_offset: int | None = None,
        notify_port: int | None = None,
    ) -> SharedPages:
        """``xengntshr_share_page_notify``: share one page; on unshare (or
        process death) the byte at *notify_offset* is cleared and
        *notify_port* signalled."""
        offset, port = _notify_args(notify_offset, notify_port, 1)
        ref = c_uint32()
        with self._using() as handle:
            address = self._lib.xengntshr_share_page_notify(
                handle, domid, ctypes.byref(ref), int(writable), offset, port
            )
            return SharedPages(self, address, (ref.value,), domid, writable)
