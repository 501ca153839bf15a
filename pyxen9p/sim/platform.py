"""A simulated Xen machine: domains, grant tables, event channels, XenStore.

:class:`SimulatedXen` is one machine.  Each :class:`SimDomain` implements
:class:`pyxen9p.interfaces.XenPlatform` for one domain, plus
:meth:`SimDomain.open_grant_table` (``xengnttab``: mapping other domains'
grants) for backends.  Everything is pure Python and thread-safe; domains are
simulated inside one process, typically one thread per side.

**Grants.**  Every :meth:`SimGrantSharer.share_pages` call allocates one
``memfd`` of ``count`` zeroed 4 KiB pages; the sharer gets one ``mmap`` of it
and every :meth:`SimGrantTable.map_grant_refs` call makes *another* ``mmap``
of the same file, so the memory is really shared, as with ``gntalloc`` and
``gntdev``.  The rules follow Xen:

* only the grantee domain can map a grant, and a read-only grant can only be
  mapped read-only (the mapping's ``buffer`` is then a read-only view);
  failures raise :class:`OSError` ``EINVAL``, as ``libxengnttab`` does;
* unsharing pages the grantee still maps is allowed, but each such grant is
  only released when the last mapping of it goes (the kernel *defers* it):
  :attr:`ResourceCounts.deferred_grants` counts them;
* closing a handle closes everything it shared or mapped.

Simulator limit: a multi-page mapping must name the consecutive pages of one
:meth:`~SimGrantSharer.share_pages` allocation, in order (the only contiguous
shared memory a pure-Python simulation can give).  A 9pfs frontend shares its
``1 << order`` data pages with one call, so this always holds for the rings;
anything else raises ``EINVAL`` saying so.

The ``memoryview`` objects handed out (``buffer``) are released by
``close()``.  Views *derived* from them (slices, casts) keep the memory
mapped: on real Xen it would be unmapped under them.  A mapping whose memory
cannot be unmapped because such views still exist is counted in
:attr:`ResourceCounts.exported_views` until they are dropped.

**Event channels.**  Ports are numbered per domain from 1.  Each
:class:`SimEventChannel` has a real pipe descriptor (:meth:`~SimEventChannel.fileno`),
readable exactly while at least one of its ports is pending, so it works with
``select``, ``poll`` and ``asyncio``.  Delivery follows Linux's
``/dev/xen/evtchn``: a delivered port is masked until :meth:`~SimEventChannel.unmask`;
notifications while it is masked are latched into one, delivered again at
unmask (coalescing).  As in Xen, ``bind_interdomain`` leaves the new local
port pending once, and when one end unbinds, the other end's port reverts to
*unbound* (its notifications are dropped; it may be bound again by the same
remote domain).

**Accounting and faults.**  :meth:`SimulatedXen.resources` counts live
grants, deferred grants, mappings, ports and open handles, per domain or in
total; :meth:`SimulatedXen.assert_no_leaks` fails a test that left anything
behind.  :meth:`SimulatedXen.inject_failure` makes a chosen call fail with a
chosen ``errno``.
"""

from __future__ import annotations

import errno as _errno
import gc
import itertools
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from typing_extensions import Self

from pyxen9p.errors import HandleClosedError, xen_error
from pyxen9p.interfaces import (
    Permission,
    RawEventCalls,
    TransactionLike,
    WatchLike,
)
from pyxen9p.sim.xenstore import SimTransaction, SimXenStore, XenStoreTree

__all__ = [
    "DOMID_FIRST_RESERVED",
    "FIRST_GRANT_REF",
    "OPERATIONS",
    "XEN_PAGE_SIZE",
    "GrantMappingLike",
    "GrantTableLike",
    "InjectedFault",
    "ResourceCounts",
    "SimDomain",
    "SimEventChannel",
    "SimGrantMapping",
    "SimGrantSharer",
    "SimGrantTable",
    "SimSharedPages",
    "SimStoreConnection",
    "SimulatedXen",
]

#: Size of a Xen page: grants are made of pages of this size.
XEN_PAGE_SIZE = 4096
#: ``DOMID_FIRST_RESERVED``: domain ids at or above it name no real domain.
DOMID_FIRST_RESERVED = 0x7FF0
#: Xen reserves grant references 0..7 (``GNTTAB_NR_RESERVED_ENTRIES``).
FIRST_GRANT_REF = 8

#: Operation names accepted by :meth:`SimulatedXen.inject_failure`, with the C
#: function each stands for (used in the raised error's message).
OPERATIONS: dict[str, str] = {
    "open_xenstore": "xs_open",
    "open_grant_sharer": "xengntshr_open",
    "open_grant_table": "xengnttab_open",
    "open_event_channel": "xenevtchn_open",
    "share_pages": "xengntshr_share_pages",
    "unshare": "xengntshr_unshare",
    "map_grant_refs": "xengnttab_map_grant_refs",
    "unmap": "xengnttab_unmap",
    "bind_unbound_port": "xenevtchn_bind_unbound_port",
    "bind_interdomain": "xenevtchn_bind_interdomain",
    "notify": "xenevtchn_notify",
    "pending": "xenevtchn_pending",
    "unmask": "xenevtchn_unmask",
    "unbind": "xenevtchn_unbind",
    "xenstore_read": "xs_read",
    "xenstore_write": "xs_write",
    "xenstore_mkdir": "xs_mkdir",
    "xenstore_rm": "xs_rm",
    "xenstore_directory": "xs_directory",
    "xenstore_get_permissions": "xs_get_permissions",
    "xenstore_set_permissions": "xs_set_permissions",
    "xenstore_watch": "xs_watch",
    "xenstore_transaction_start": "xs_transaction_start",
    "xenstore_transaction_end": "xs_transaction_end",
}


# ---------------------------------------------------------------------------
# Protocols of the backend-side grant table (not in pyxen9p.interfaces, which
# only covers what a frontend needs).


class GrantMappingLike(Protocol):
    """Grants of another domain mapped into this one (``xengnttab_map_*``).

    ``buffer`` is one contiguous view of all mapped pages (read-only for a
    read-only mapping); it is released by ``close()`` (``xengnttab_unmap``).
    """

    @property
    def buffer(self) -> memoryview:
        """The mapped pages, contiguous."""
        ...

    def close(self) -> None:
        """Unmap (idempotent)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class GrantTableLike(Protocol):
    """A grant-mapping handle (``xengnttab_handle``)."""

    def map_grant_ref(self, domid: int, ref: int, *, writable: bool = True) -> GrantMappingLike:
        """Map one page granted by *domid*."""
        ...

    def map_grant_refs(
        self, domids: int | Sequence[int], refs: Sequence[int], *, writable: bool = True
    ) -> GrantMappingLike:
        """Map several pages as one contiguous region."""
        ...

    def close(self) -> None:
        """Unmap everything mapped through the handle and close it."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


# ---------------------------------------------------------------------------
# Accounting and fault injection


@dataclass(frozen=True)
class ResourceCounts:
    """Live simulated resources, for one domain or for the whole machine.

    :ivar grants: pages shared and not yet unshared (attributed to the
        granting domain)
    :ivar deferred_grants: pages unshared while still mapped by the grantee,
        released when it unmaps (attributed to the granting domain)
    :ivar mappings: open grant mappings (attributed to the mapping domain)
    :ivar mapped_pages: pages in those mappings
    :ivar ports: bound event-channel ports (attributed to the owning domain)
    :ivar handles: open handles of any kind (XenStore connections, grant
        sharers, grant tables, event channels)
    :ivar exported_views: closed regions whose memory is still held by views
        derived from a ``buffer`` (see the module documentation)
    """

    grants: int = 0
    deferred_grants: int = 0
    mappings: int = 0
    mapped_pages: int = 0
    ports: int = 0
    handles: int = 0
    exported_views: int = 0

    @property
    def clean(self) -> bool:
        """``True`` if nothing at all is live."""
        return not any(
            (
                self.grants,
                self.deferred_grants,
                self.mappings,
                self.mapped_pages,
                self.ports,
                self.handles,
                self.exported_views,
            )
        )


class InjectedFault:
    """A pending failure registered by :meth:`SimulatedXen.inject_failure`.

    :ivar operation: the operation name (a key of :data:`OPERATIONS`)
    :ivar errno: the errno raised
    :ivar domid: the calling domain it applies to, or ``None`` for any
    """

    def __init__(self, operation: str, err: int, domid: int | None, after: int) -> None:
        self.operation = operation
        self.errno = err
        self.domid = domid
        self._remaining = after
        self._fired = False
        self._cancelled = False

    @property
    def fired(self) -> bool:
        """``True`` once the failure has been raised."""
        return self._fired

    @property
    def active(self) -> bool:
        """``True`` while the failure is still waiting to fire."""
        return not (self._fired or self._cancelled)

    def cancel(self) -> None:
        """Withdraw the failure if it has not fired yet."""
        self._cancelled = True

    def __repr__(self) -> str:
        state = "fired" if self._fired else "cancelled" if self._cancelled else "pending"
        return (
            f"InjectedFault({self.operation!r}, errno={self.errno}, domid={self.domid},"
            f" {state})"
        )


# ---------------------------------------------------------------------------
# Grants


class _Allocation:
    """The memory of one ``share_pages`` call: a memfd of ``pages`` pages."""

    def __init__(self, granter: int, pages: int) -> None:
        self.granter = granter
        self.pages = pages
        self.fd = os.memfd_create(f"pyxen9p-sim-grant-dom{granter}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, pages * XEN_PAGE_SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self.live = pages  # grant entries not yet released

    def release_one(self) -> None:
        self.live -= 1
        if self.live == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Grant:
    granter: int
    ref: int
    grantee: int
    writable: bool
    allocation: _Allocation
    page: int
    unshared: bool = False
    maps: int = 0


class _Region:
    """One ``mmap`` of part of an allocation and the view handed out."""

    def __init__(self, allocation: _Allocation, first: int, count: int, writable: bool) -> None:
        granularity = mmap.ALLOCATIONGRANULARITY
        start = first * XEN_PAGE_SIZE
        offset = start - start % granularity
        length = start + count * XEN_PAGE_SIZE - offset
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._mmap = mmap.mmap(
            allocation.fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=offset
        )
        self._base = memoryview(self._mmap)
        delta = start - offset
        if delta == 0 and length == count * XEN_PAGE_SIZE:
            self.view = self._base
        else:
            self.view = self._base[delta : delta + count * XEN_PAGE_SIZE]

    def close(self) -> bool:
        """Release the views and unmap; ``False`` if derived views remain."""
        self.view.release()
        self._base.release()
        return self.try_unmap()

    def try_unmap(self) -> bool:
        if self._mmap.closed:
            return True
        try:
            self._mmap.close()
        except BufferError:
            return False
        return True


# ---------------------------------------------------------------------------
# Event channels


@dataclass(eq=False)
class _Port:
    domid: int
    port: int
    handle: SimEventChannel
    remote_domid: int
    peer: _Port | None = None
    masked: bool = False
    latched: bool = False


class _Handle:
    """Common bookkeeping of every simulated handle."""

    kind = "handle"

    def __init__(self, xen: SimulatedXen, domid: int) -> None:
        self._xen = xen
        self._domid = domid
        self._closed = False
        xen._register_handle(self)

    @property
    def domid(self) -> int:
        """The domain that opened this handle."""
        return self._domid

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`close`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise HandleClosedError(
                f"simulated {self.kind} handle of domain {self._domid} is closed"
            )

    def close(self) -> None:
        """Close the handle (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimSharedPages:
    """Pages shared by :meth:`SimGrantSharer.share_pages`.

    Implements :class:`pyxen9p.interfaces.SharedPagesLike`.
    """

    def __init__(
        self,
        sharer: SimGrantSharer,
        grantee: int,
        refs: tuple[int, ...],
        region: _Region,
        writable: bool,
    ) -> None:
        self._sharer = sharer
        self._grantee = grantee
        self._refs = refs
        self._region = region
        self._writable = writable
        self._closed = False

    @property
    def refs(self) -> tuple[int, ...]:
        """The grant reference of each page, in order."""
        return self._refs

    @property
    def buffer(self) -> memoryview:
        """One contiguous writable view of all pages.

        :raises HandleClosedError: after :meth:`close`
        """
        if self._closed:
            raise HandleClosedError("the shared pages were unshared")
        return self._region.view

    @property
    def domid(self) -> int:
        """The grantee domain."""
        return self._grantee

    @property
    def writable(self) -> bool:
        """Whether the grantee may map the pages writable."""
        return self._writable

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Unshare the pages (``xengntshr_unshare``); idempotent.

        Pages the grantee still maps stay granted until it unmaps them (they
        count as deferred grants meanwhile).
        """
        self._sharer._unshare(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<SimSharedPages dom{self._sharer.domid}->dom{self._grantee}"
            f" refs={self._refs} {state}>"
        )


class SimGrantSharer(_Handle):
    """A grant-sharing handle (``xengntshr_handle``).

    Implements :class:`pyxen9p.interfaces.GrantSharerLike`.
    """

    kind = "grant sharer"

    def __init__(self, xen: SimulatedXen, domid: int) -> None:
        self._shared: list[SimSharedPages] = []
        super().__init__(xen, domid)

    def share_pages(self, domid: int, count: int, *, writable: bool = True) -> SimSharedPages:
        """Share *count* fresh zeroed pages with domain *domid*.

        :param domid: the grantee, the only domain that may map the pages
        :param count: number of pages (at least 1)
        :param writable: whether the grantee may map them writable
        :returns: the shared pages, contiguous in one buffer
        :raises OSError: ``EINVAL`` for a bad *domid* or *count*, ``ENOSPC``
            beyond the machine's per-domain grant limit, or an injected fault
        :raises HandleClosedError: if the handle is closed
        """
        xen = self._xen
        with xen._lock:
            self._check_open()
            xen._maybe_fail("share_pages", self._domid)
            if not 0 <= domid < DOMID_FIRST_RESERVED:
                raise xen_error(_errno.EINVAL, "xengntshr_share_pages", f"bad domid {domid}")
            if count < 1:
                raise xen_error(_errno.EINVAL, "xengntshr_share_pages", f"bad count {count}")
            limit = xen.gntalloc_limit
            used = xen._grant_usage(self._domid)
            if limit is not None and used + count > limit:
                raise xen_error(
                    _errno.ENOSPC,
                    "xengntshr_share_pages",
                    f"domain {self._domid} would hold {used + count} grants; gntalloc limit"
                    f" is {limit}",
                )
            allocation = _Allocation(self._domid, count)
            try:
                region = _Region(allocation, 0, count, True)
            except BaseException:
                os.close(allocation.fd)
                raise
            refs = []
            for page in range(count):
                ref = xen._next_ref(self._domid)
                xen._grants[(self._domid, ref)] = _Grant(
                    self._domid, ref, domid, writable, allocation, page
                )
                refs.append(ref)
            shared = SimSharedPages(self, domid, tuple(refs), region, writable)
            self._shared.append(shared)
            return shared

    def _unshare(self, shared: SimSharedPages) -> None:
        xen = self._xen
        with xen._lock:
            if shared._closed:
                return
            shared._closed = True
            if shared in self._shared:
                self._shared.remove(shared)
            for ref in shared._refs:
                grant = xen._grants[(self._domid, ref)]
                grant.unshared = True
                if grant.maps == 0:
                    xen._release_grant(grant)
            xen._close_region(shared._region)

    def close(self) -> None:
        """Unshare everything shared through this handle and close it."""
        xen = self._xen
        with xen._lock:
            if self._closed:
                return
            for shared in list(self._shared):
                self._unshare(shared)
            self._closed = True
            xen._unregister_handle(self)


class SimGrantMapping:
    """Grants of another domain mapped by :class:`SimGrantTable`.

    Implements :class:`GrantMappingLike`.
    """

    def __init__(
        self, table: SimGrantTable, grants: list[_Grant], region: _Region, writable: bool
    ) -> None:
        self._table = table
        self._grants = grants
        self._region = region
        self._writable = writable
        self._closed = False

    @property
    def buffer(self) -> memoryview:
        """One contiguous view of the mapped pages (read-only if mapped so).

        :raises HandleClosedError: after :meth:`close`
        """
        if self._closed:
            raise HandleClosedError("the grant mapping was unmapped")
        return self._region.view

    @property
    def refs(self) -> tuple[int, ...]:
        """The mapped grant references, in order."""
        return tuple(g.ref for g in self._grants)

    @property
    def domid(self) -> int:
        """The granting domain."""
        return self._grants[0].granter

    @property
    def writable(self) -> bool:
        """Whether the mapping is writable."""
        return self._writable

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Unmap (``xengnttab_unmap``); idempotent."""
        self._table._unmap(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SimGrantMapping of dom{self.domid} refs={self.refs} {state}>"


class SimGrantTable(_Handle):
    """A grant-mapping handle (``xengnttab_handle``), as backends use.

    Implements :class:`GrantTableLike`.
    """

    kind = "grant table"

    def __init__(self, xen: SimulatedXen, domid: int) -> None:
        self._mappings: list[SimGrantMapping] = []
        super().__init__(xen, domid)

    def map_grant_ref(self, domid: int, ref: int, *, writable: bool = True) -> SimGrantMapping:
        """Map the page *ref* granted by domain *domid*.

        :raises OSError: ``EINVAL`` as :meth:`map_grant_refs`
        """
        return self.map_grant_refs(domid, [ref], writable=writable)

    def map_grant_refs(
        self, domids: int | Sequence[int], refs: Sequence[int], *, writable: bool = True
    ) -> SimGrantMapping:
        """Map pages granted by other domains as one contiguous region.

        :param domids: the granting domain, or one per ref
        :param refs: the grant references, in mapping order
        :param writable: map writable (the grants must allow it)
        :raises OSError: ``EINVAL`` (as ``libxengnttab``) if a grant does not
            exist, is not granted to this domain, is read-only but a writable
            mapping was asked, or if the pages are not the consecutive pages
            of one shared allocation (a simulator limit); or an injected fault
        :raises HandleClosedError: if the handle is closed
        """
        xen = self._xen
        func = "xengnttab_map_grant_refs"
        refs = list(refs)
        domid_list = [domids] * len(refs) if isinstance(domids, int) else list(domids)
        with xen._lock:
            self._check_open()
            xen._maybe_fail("map_grant_refs", self._domid)
            if not refs or len(domid_list) != len(refs):
                raise xen_error(
                    _errno.EINVAL, func, f"{len(refs)} refs and {len(domid_list)} domids"
                )
            grants: list[_Grant] = []
            for granter, ref in zip(domid_list, refs, strict=True):
                grant = xen._grants.get((granter, ref))
                if grant is None or grant.unshared:
                    raise xen_error(
                        _errno.EINVAL, func, f"domain {granter} has no grant reference {ref}"
                    )
                if grant.grantee != self._domid:
                    raise xen_error(
                        _errno.EINVAL,
                        func,
                        f"grant {ref} of domain {granter} is for domain {grant.grantee},"
                        f" not {self._domid}",
                    )
                if writable and not grant.writable:
                    raise xen_error(
                        _errno.EINVAL,
                        func,
                        f"grant {ref} of domain {granter} is read-only; map it with"
                        " writable=False",
                    )
                grants.append(grant)
            first = grants[0]
            for i, grant in enumerate(grants):
                if grant.allocation is not first.allocation or grant.page != first.page + i:
                    raise xen_error(
                        _errno.EINVAL,
                        func,
                        "simulator limit: a multi-page mapping must name consecutive pages"
                        " of one share_pages() allocation, in order",
                    )
            region = _Region(first.allocation, first.page, len(grants), writable)
            for grant in grants:
                grant.maps += 1
            mapping = SimGrantMapping(self, grants, region, writable)
            self._mappings.append(mapping)
            return mapping

    def _unmap(self, mapping: SimGrantMapping) -> None:
        xen = self._xen
        with xen._lock:
            if mapping._closed:
                return
            mapping._closed = True
            if mapping in self._mappings:
                self._mappings.remove(mapping)
            xen._close_region(mapping._region)
            for grant in mapping._grants:
                grant.maps -= 1
                if grant.unshared and grant.maps == 0:
                    xen._release_grant(grant)

    def close(self) -> None:
        """Unmap everything mapped through this handle and close it."""
        xen = self._xen
        with xen._lock:
            if self._closed:
                return
            for mapping in list(self._mappings):
                self._unmap(mapping)
            self._closed = True
            xen._unregister_handle(self)


class SimEventChannel(_Handle):
    """An event-channel handle (``xenevtchn_handle``).

    Implements :class:`pyxen9p.interfaces.EventChannelLike`.  :meth:`fileno`
    is a pipe that is readable exactly while a port is pending.
    """

    kind = "event channel"

    def __init__(self, xen: SimulatedXen, domid: int) -> None:
        self._ports: dict[int, _Port] = {}
        self._queue: deque[int] = deque()
        self._cond = threading.Condition(xen._lock)
        #: Threads waiting in :meth:`pending` (no one to wake: no notify_all).
        self._waiters = 0
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        try:
            super().__init__(xen, domid)
        except BaseException:
            os.close(self._rfd)
            os.close(self._wfd)
            raise

    def fileno(self) -> int:
        """The descriptor to poll: readable while a port is pending."""
        self._check_open()
        return self._rfd

    # -- delivery (called with the machine lock held) ----------------------

    def _enqueue(self, port: int) -> None:
        if not self._queue:
            os.write(self._wfd, b"!")
        self._queue.append(port)
        if self._waiters:
            self._cond.notify_all()

    def _dequeue(self, port: int | None = None) -> int:
        if port is None:
            port = self._queue.popleft()
        else:
            self._queue.remove(port)
        if not self._queue:
            os.read(self._rfd, 1)
        return port

    @staticmethod
    def _deliver(target: _Port) -> None:
        if target.masked:
            target.latched = True
        else:
            target.masked = True
            target.handle._enqueue(target.port)

    # -- the EventChannelLike API -----------------------------------------

    def bind_unbound_port(self, domid: int) -> int:
        """Allocate a local port that domain *domid* may bind to.

        :returns: the new local port
        :raises OSError: ``ESRCH`` if *domid* does not exist, or an injected
            fault
        :raises HandleClosedError: if the handle is closed
        """
        xen = self._xen
        with xen._lock:
            self._check_open()
            xen._maybe_fail("bind_unbound_port", self._domid)
            if domid not in xen._domains:
                raise xen_error(
                    _errno.ESRCH, "xenevtchn_bind_unbound_port", f"no domain {domid}"
                )
            port = xen._alloc_port(self._domid, self, domid)
            return port.port

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to the unbound *remote_port* of domain *domid*.

        The new local port is left pending once (as Xen does).

        :returns: the new local port
        :raises OSError: ``ESRCH`` if *domid* does not exist; ``EINVAL`` if
            *remote_port* is not an unbound port offered to this domain; or
            an injected fault
        :raises HandleClosedError: if the handle is closed
        """
        xen = self._xen
        func = "xenevtchn_bind_interdomain"
        with xen._lock:
            self._check_open()
            xen._maybe_fail("bind_interdomain", self._domid)
            if domid not in xen._domains:
                raise xen_error(_errno.ESRCH, func, f"no domain {domid}")
            remote = xen._ports.get(domid, {}).get(remote_port)
            if remote is None:
                raise xen_error(_errno.EINVAL, func, f"domain {domid} has no port {remote_port}")
            if remote.peer is not None:
                raise xen_error(
                    _errno.EINVAL, func, f"port {remote_port} of domain {domid} is already bound"
                )
            if remote.remote_domid != self._domid:
                raise xen_error(
                    _errno.EINVAL,
                    func,
                    f"port {remote_port} of domain {domid} is offered to domain"
                    f" {remote.remote_domid}, not {self._domid}",
                )
            local = xen._alloc_port(self._domid, self, domid)
            local.peer = remote
            remote.peer = local
            self._deliver(local)
            return local.port

    def _port(self, port: int, func: str) -> _Port:
        entry = self._ports.get(port)
        if entry is None:
            raise xen_error(
                _errno.ENOTCONN, func, f"port {port} is not bound by this handle"
            )
        return entry

    def notify(self, port: int) -> None:
        """Signal the peer of local *port*.

        A notification on a port whose peer is gone (or not yet bound) is
        dropped, as in Xen.

        :raises OSError: ``ENOTCONN`` if *port* is not bound by this handle,
            or an injected fault
        :raises HandleClosedError: if the handle is closed
        """
        xen = self._xen
        with xen._lock:
            if self._closed:
                self._check_open()  # raises
            if xen._faults:
                xen._maybe_fail("notify", self._domid)
            entry = self._ports.get(port)
            if entry is None:
                entry = self._port(port, "xenevtchn_notify")  # raises
            xen._notifications += 1
            target = entry.peer
            if target is not None:  # _deliver, inline
                if target.masked:
                    target.latched = True
                else:
                    target.masked = True
                    target.handle._enqueue(target.port)

    def pending(self, timeout: float | None = None) -> int:
        """Return the next pending port; it stays masked until :meth:`unmask`.

        :param timeout: seconds to wait (the real library blocks forever;
            ``None`` does too)
        :raises TimeoutError: if nothing became pending within *timeout*
        :raises HandleClosedError: if the handle is (or gets) closed
        """
        xen = self._xen
        deadline = None if timeout is None else time.monotonic() + timeout
        with xen._lock:
            if self._closed:
                self._check_open()  # raises
            if xen._faults:
                xen._maybe_fail("pending", self._domid)
            while not self._queue:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no event-channel port pending after {timeout} s")
                self._waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiters -= 1
                self._check_open()
            return self._dequeue()

    def unmask(self, port: int) -> None:
        """Re-enable delivery on *port*; a notification latched while it was
        masked is delivered now.  Unknown ports are ignored, as by Linux.

        :raises OSError: an injected fault
        :raises HandleClosedError: if the handle is closed
        """
        xen = self._xen
        with xen._lock:
            if self._closed:
                self._check_open()  # raises
            if xen._faults:
                xen._maybe_fail("unmask", self._domid)
            entry = self._ports.get(port)
            if entry is None or not entry.masked or port in self._queue:
                return
            if entry.latched:
                entry.latched = False
                entry.handle._enqueue(port)
            else:
                entry.masked = False

    def unbind(self, port: int) -> None:
        """Release local *port*; the peer's end reverts to unbound.

        :raises OSError: ``ENOTCONN`` if *port* is not bound by this handle,
            or an injected fault
        :raises HandleClosedError: if the handle is closed
        """
        xen = self._xen
        with xen._lock:
            self._check_open()
            xen._maybe_fail("unbind", self._domid)
            xen._free_port(self._port(port, "xenevtchn_unbind"))

    def raw_calls(self) -> RawEventCalls:
        """:meth:`pending`, :meth:`unmask` and :meth:`notify` as
        :class:`~pyxen9p.interfaces.RawEventCalls`: the same methods (they
        raise rather than return a negative result), the last two returning 0.

        :raises HandleClosedError: if the handle is closed
        """
        with self._xen._lock:
            self._check_open()

        def unmask(port: int) -> int:
            self.unmask(port)
            return 0

        def notify(port: int) -> int:
            self.notify(port)
            return 0

        def error(name: str) -> OSError:  # never asked: nothing returns a negative result
            return xen_error(_errno.EIO, name, "the simulated call reported failure")

        return RawEventCalls(self.pending, unmask, notify, error)

    def port_info(self, port: int) -> tuple[str, int, int | None]:
        """Describe local *port* (for tests).

        :returns: ``(state, remote_domid, remote_port)`` where *state* is
            ``"unbound"`` or ``"interdomain"``; *remote_port* is ``None``
            while unbound
        :raises OSError: ``ENOTCONN`` if *port* is not bound by this handle
        """
        with self._xen._lock:
            self._check_open()
            entry = self._port(port, "port_info")
            if entry.peer is None:
                return ("unbound", entry.remote_domid, None)
            return ("interdomain", entry.remote_domid, entry.peer.port)

    @property
    def ports(self) -> tuple[int, ...]:
        """The local ports bound by this handle."""
        with self._xen._lock:
            return tuple(sorted(self._ports))

    def close(self) -> None:
        """Unbind every port, wake any :meth:`pending` caller, close the fd."""
        xen = self._xen
        with xen._lock:
            if self._closed:
                return
            for entry in list(self._ports.values()):
                xen._free_port(entry)
            self._queue.clear()
            self._closed = True
            self._cond.notify_all()
            os.close(self._rfd)
            os.close(self._wfd)
            xen._unregister_handle(self)


# ---------------------------------------------------------------------------
# XenStore connections (tracked, with fault injection)


class _FaultyTransaction:
    """A transaction attempt whose operations go through fault injection."""

    def __init__(self, store: SimStoreConnection, inner: SimTransaction) -> None:
        self._store = store
        self._inner = inner

    def _fail(self, operation: str) -> None:
        self._store._fail(operation)

    def read(self, path: str) -> bytes:
        """As :meth:`SimStoreConnection.read`, inside the transaction."""
        self._fail("xenstore_read")
        return self._inner.read(path)

    def write(self, path: str, value: bytes | str) -> None:
        """As :meth:`SimStoreConnection.write`, inside the transaction."""
        self._fail("xenstore_write")
        self._inner.write(path, value)

    def mkdir(self, path: str) -> None:
        """As :meth:`SimStoreConnection.mkdir`, inside the transaction."""
        self._fail("xenstore_mkdir")
        self._inner.mkdir(path)

    def rm(self, path: str) -> None:
        """As :meth:`SimStoreConnection.rm`, inside the transaction."""
        self._fail("xenstore_rm")
        self._inner.rm(path)

    def directory(self, path: str) -> list[str]:
        """As :meth:`SimStoreConnection.directory`, inside the transaction."""
        self._fail("xenstore_directory")
        return self._inner.directory(path)

    def get_permissions(self, path: str) -> list[Permission]:
        """As :meth:`SimStoreConnection.get_permissions`, inside the transaction."""
        self._fail("xenstore_get_permissions")
        return self._inner.get_permissions(path)

    def set_permissions(self, path: str, permissions: Sequence[Permission]) -> None:
        """As :meth:`SimStoreConnection.set_permissions`, inside the transaction."""
        self._fail("xenstore_set_permissions")
        self._inner.set_permissions(path, permissions)

    def __enter__(self) -> Self:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> bool:
        exc = exc_info[1] if len(exc_info) > 1 else None
        if exc is None:
            try:
                self._fail("xenstore_transaction_end")
            except OSError as injected:
                # Abort the attempt as a failed commit would; EAGAIN retries.
                if self._inner.__exit__(type(injected), injected, None):
                    return True
                raise
            return bool(self._inner.__exit__(None, None, None))
        if not isinstance(exc, BaseException):
            raise TypeError(f"__exit__ got {exc!r} as the exception")
        return bool(self._inner.__exit__(type(exc), exc, exc.__traceback__))


class SimStoreConnection(_Handle):
    """A domain's XenStore connection, from :meth:`SimDomain.open_xenstore`.

    Implements :class:`pyxen9p.interfaces.XenStoreLike` over a
    :class:`~pyxen9p.sim.xenstore.SimXenStore` of the domain, counted as a
    handle by the machine, with every operation (also inside transactions)
    subject to :meth:`SimulatedXen.inject_failure` (``xenstore_*``
    operations).  :attr:`inner` is the underlying connection, for its
    extra API (without fault injection).
    """

    kind = "xenstore"

    def __init__(self, xen: SimulatedXen, domid: int) -> None:
        self._inner = SimXenStore(xen.tree, domid)
        try:
            super().__init__(xen, domid)
        except BaseException:
            self._inner.close()
            raise

    @property
    def inner(self) -> SimXenStore:
        """The underlying :class:`~pyxen9p.sim.xenstore.SimXenStore`."""
        return self._inner

    def _fail(self, operation: str) -> None:
        with self._xen._lock:
            self._xen._maybe_fail(operation, self._domid)

    def read(self, path: str) -> bytes:
        """Return the value of *path* (``xs_read``).

        :raises FileNotFoundError: if it does not exist
        :raises OSError: ``EACCES`` and the like, or an injected fault
        """
        self._fail("xenstore_read")
        return self._inner.read(path)

    def write(self, path: str, value: bytes | str) -> None:
        """Create or replace *path* (``xs_write``).

        :raises OSError: ``EACCES`` and the like, or an injected fault
        """
        self._fail("xenstore_write")
        self._inner.write(path, value)

    def mkdir(self, path: str) -> None:
        """Create *path* if missing (``xs_mkdir``).

        :raises OSError: ``EACCES`` and the like, or an injected fault
        """
        self._fail("xenstore_mkdir")
        self._inner.mkdir(path)

    def rm(self, path: str) -> None:
        """Remove *path* and its subtree (``xs_rm``).

        :raises OSError: ``EACCES`` and the like, or an injected fault
        """
        self._fail("xenstore_rm")
        self._inner.rm(path)

    def directory(self, path: str) -> list[str]:
        """Return the children of *path* (``xs_directory``).

        :raises OSError: ``ENOENT``, ``EACCES`` and the like, or an injected
            fault
        """
        self._fail("xenstore_directory")
        return self._inner.directory(path)

    def get_permissions(self, path: str) -> list[Permission]:
        """Return the access list of *path* (``xs_get_permissions``).

        :raises OSError: as :meth:`read`
        """
        self._fail("xenstore_get_permissions")
        return self._inner.get_permissions(path)

    def set_permissions(self, path: str, permissions: Sequence[Permission]) -> None:
        """Replace the access list of *path* (``xs_set_permissions``).

        :raises OSError: as :meth:`write`
        """
        self._fail("xenstore_set_permissions")
        self._inner.set_permissions(path, permissions)

    def transaction(self, *, max_attempts: int = 16) -> Iterator[TransactionLike]:
        """Yield transaction attempts until one commits (see
        :meth:`pyxen9p.interfaces.XenStoreLike.transaction`).

        An injected ``xenstore_transaction_end`` fault with ``EAGAIN`` is a
        conflict and the attempt is repeated; any other errno is raised.

        :raises OSError: an injected fault
        """
        for txn in self._inner.transaction(max_attempts=max_attempts):
            self._fail("xenstore_transaction_start")
            yield _FaultyTransaction(self, txn)

    def watch(self, path: str, token: str | None = None) -> WatchLike:
        """Register a watch on *path* (``xs_watch``).

        :raises OSError: an injected fault
        """
        self._fail("xenstore_watch")
        return self._inner.watch(path, token)

    def get_domain_path(self, domid: int) -> str:
        """Return ``/local/domain/<domid>``."""
        return self._inner.get_domain_path(domid)

    def fileno(self) -> int:
        """A descriptor readable while watch events are queued."""
        return self._inner.fileno()

    def close(self) -> None:
        """Close the connection (idempotent); its watches go with it."""
        with self._xen._lock:
            if self._closed:
                return
            self._closed = True
            self._xen._unregister_handle(self)
        self._inner.close()


# ---------------------------------------------------------------------------
# Domains and the machine


class SimDomain:
    """One simulated domain: where its Xen handles come from.

    Implements :class:`pyxen9p.interfaces.XenPlatform`; backends also use
    :meth:`open_grant_table`.  Obtain it from :meth:`SimulatedXen.create_domain`.
    """

    def __init__(self, xen: SimulatedXen, domid: int, name: str) -> None:
        self._xen = xen
        self._domid = domid
        self._name = name

    @property
    def domid(self) -> int:
        """The domain id."""
        return self._domid

    @property
    def name(self) -> str:
        """The domain name (as written to XenStore)."""
        return self._name

    @property
    def xen(self) -> SimulatedXen:
        """The machine this domain runs on."""
        return self._xen

    @property
    def path(self) -> str:
        """``/local/domain/<domid>``."""
        return f"/local/domain/{self._domid}"

    def _opening(self, operation: str) -> None:
        with self._xen._lock:
            if self._domid not in self._xen._domains:
                raise xen_error(
                    _errno.ESRCH, OPERATIONS[operation], f"domain {self._domid} is gone"
                )
            self._xen._maybe_fail(operation, self._domid)

    def open_xenstore(self) -> SimStoreConnection:
        """Open a XenStore connection as this domain.

        :raises OSError: ``ESRCH`` if the domain was destroyed, or an
            injected fault
        """
        self._opening("open_xenstore")
        return SimStoreConnection(self._xen, self._domid)

    def open_grant_sharer(self) -> SimGrantSharer:
        """Open a grant-sharing handle (``xengntshr_open``).

        :raises OSError: ``ESRCH`` if the domain was destroyed, or an
            injected fault
        """
        self._opening("open_grant_sharer")
        return SimGrantSharer(self._xen, self._domid)

    def open_grant_table(self) -> SimGrantTable:
        """Open a grant-mapping handle (``xengnttab_open``).

        :raises OSError: ``ESRCH`` if the domain was destroyed, or an
            injected fault
        """
        self._opening("open_grant_table")
        return SimGrantTable(self._xen, self._domid)

    def open_event_channel(self) -> SimEventChannel:
        """Open an event-channel handle (``xenevtchn_open``).

        :raises OSError: ``ESRCH`` if the domain was destroyed, or an
            injected fault
        """
        self._opening("open_event_channel")
        return SimEventChannel(self._xen, self._domid)

    def resources(self) -> ResourceCounts:
        """This domain's live resources (see :meth:`SimulatedXen.resources`)."""
        return self._xen.resources(self._domid)

    def __repr__(self) -> str:
        return f"<SimDomain {self._domid} {self._name!r}>"


@dataclass
class _Counters:
    grants: int = 0
    deferred_grants: int = 0
    mappings: int = 0
    mapped_pages: int = 0
    ports: int = 0
    handles: int = 0
    exported_views: int = 0
    details: list[str] = field(default_factory=list)


class SimulatedXen:
    """One simulated Xen machine.

    :param dom0: create domain 0 (``"Domain-0"``) at once, as a booted host has
    :param gntalloc_limit: most pages one domain may have granted at once
        (live plus deferred), like the ``xen_gntalloc.limit`` module
        parameter (default 1024); ``None`` for no limit
    :param tree: the XenStore to use (a new :class:`XenStoreTree` by default)
    """

    def __init__(
        self,
        *,
        dom0: bool = True,
        gntalloc_limit: int | None = 1024,
        tree: XenStoreTree | None = None,
    ) -> None:
        self._lock = threading.RLock()
        #: The machine's XenStore (use ``domid`` 0 for toolstack writes).
        self.tree = tree if tree is not None else XenStoreTree()
        #: Per-domain limit of shared pages (see the constructor).
        self.gntalloc_limit = gntalloc_limit
        self._domains: dict[int, SimDomain] = {}
        self._grants: dict[tuple[int, int], _Grant] = {}
        self._ref_counters: dict[int, itertools.count[int]] = {}
        self._ports: dict[int, dict[int, _Port]] = {}
        self._handles: dict[int, _Handle] = {}
        self._lingering: list[tuple[int, _Region]] = []
        self._faults: list[InjectedFault] = []
        self._notifications = 0
        if dom0:
            self.create_domain(0, "Domain-0")

    # -- domains ------------------------------------------------------------

    def create_domain(self, domid: int, name: str | None = None) -> SimDomain:
        """Create domain *domid* and introduce it to XenStore.

        Writes ``/local/domain/<domid>/domid`` and ``name`` as the toolstack
        does.

        :param name: defaults to ``"dom<domid>"``
        :raises ValueError: if *domid* is out of range or already exists
        """
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domain id {domid} outside 0..{DOMID_FIRST_RESERVED - 1}")
        name = name if name is not None else f"dom{domid}"
        with self._lock:
            if domid in self._domains:
                raise ValueError(f"domain {domid} already exists")
            domain = SimDomain(self, domid, name)
            self._domains[domid] = domain
        self.tree.introduce_domain(domid)
        path = f"/local/domain/{domid}"
        self.tree.write(0, f"{path}/domid", str(domid).encode())
        self.tree.write(0, f"{path}/name", name.encode())
        return domain

    def domain(self, domid: int) -> SimDomain:
        """Return the existing domain *domid*.

        :raises KeyError: if there is no such domain
        """
        with self._lock:
            try:
                return self._domains[domid]
            except KeyError:
                raise KeyError(f"no simulated domain {domid}") from None

    @property
    def domains(self) -> tuple[SimDomain, ...]:
        """The existing domains, by id."""
        with self._lock:
            return tuple(self._domains[d] for d in sorted(self._domains))

    def destroy_domain(self, domid: int) -> None:
        """Destroy domain *domid*: close its handles (releasing its grants,
        mappings and ports) and release it from XenStore.

        :raises KeyError: if there is no such domain
        """
        with self._lock:
            self.domain(domid)
            handles = [h for h in self._handles.values() if h.domid == domid]
        for handle in handles:
            handle.close()
        with self._lock:
            del self._domains[domid]
        self.tree.release_domain(domid)

    def close(self) -> None:
        """Close every open handle of every domain."""
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            handle.close()

    # -- internals used by the handles (machine lock held) ----------------

    def _register_handle(self, handle: _Handle) -> None:
        with self._lock:
            self._handles[id(handle)] = handle

    def _unregister_handle(self, handle: _Handle) -> None:
        with self._lock:
            self._handles.pop(id(handle), None)

    def _next_ref(self, domid: int) -> int:
        counter = self._ref_counters.setdefault(domid, itertools.count(FIRST_GRANT_REF))
        return next(counter)

    def _grant_usage(self, domid: int) -> int:
        return sum(1 for (granter, _ref) in self._grants if granter == domid)

    def _release_grant(self, grant: _Grant) -> None:
        del self._grants[(grant.granter, grant.ref)]
        grant.allocation.release_one()

    def _close_region(self, region: _Region) -> None:
        if not region.close():
            self._lingering.append((id(region), region))

    def _alloc_port(self, domid: int, handle: SimEventChannel, remote_domid: int) -> _Port:
        table = self._ports.setdefault(domid, {})
        number = next(p for p in itertools.count(1) if p not in table)
        entry = _Port(domid, number, handle, remote_domid)
        table[number] = entry
        handle._ports[number] = entry
        return entry

    def _free_port(self, entry: _Port) -> None:
        peer = entry.peer
        if peer is not None:
            # The other end reverts to unbound, still offered to our domain.
            peer.peer = None
            entry.peer = None
        del self._ports[entry.domid][entry.port]
        handle = entry.handle
        del handle._ports[entry.port]
        if entry.port in handle._queue:
            handle._dequeue(entry.port)

    def _maybe_fail(self, operation: str, domid: int) -> None:
        if not self._faults:  # the hot path: no fault armed
            return
        hit: InjectedFault | None = None
        for fault in self._faults:
            if not fault.active or fault.operation != operation:
                continue
            if fault.domid is not None and fault.domid != domid:
                continue
            if fault._remaining == 0:
                if hit is None:
                    hit = fault
            else:
                fault._remaining -= 1
        self._faults = [f for f in self._faults if f.active and f is not hit]
        if hit is not None:
            hit._fired = True
            raise xen_error(hit.errno, OPERATIONS[operation], "injected failure")

    # -- fault injection ------------------------------------------------------

    def inject_failure(
        self, operation: str, errno: int, *, domid: int | None = None, after: int = 0
    ) -> InjectedFault:
        """Make the (*after* + 1)-th next call of *operation* fail.

        The call raises :class:`OSError` (a
        :class:`pyxen9p.errors.XenLibraryError`) with *errno* before changing
        anything.  Each injection fires once.

        :param operation: a key of :data:`OPERATIONS`, e.g. ``"share_pages"``,
            ``"map_grant_refs"`` (also used by ``map_grant_ref``),
            ``"bind_interdomain"``, ``"notify"``, ``"xenstore_write"``
        :param errno: the errno to raise
        :param domid: only count calls made by this domain (``None``: any)
        :param after: let this many matching calls succeed first
        :returns: a handle telling whether the failure fired
        :raises ValueError: for an unknown *operation* or negative *after*
        """
        if operation not in OPERATIONS:
            raise ValueError(
                f"unknown operation {operation!r}; known: {', '.join(sorted(OPERATIONS))}"
            )
        if after < 0:
            raise ValueError("after must be >= 0")
        fault = InjectedFault(operation, errno, domid, after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_failures(self) -> None:
        """Withdraw every injected failure that has not fired."""
        with self._lock:
            for fault in self._faults:
                fault.cancel()
            self._faults.clear()

    # -- accounting ---------------------------------------------------------

    @property
    def notifications(self) -> int:
        """Total event-channel notifications sent (for tests)."""
        with self._lock:
            return self._notifications

    def _count(self, domid: int | None) -> _Counters:
        c = _Counters()
        with self._lock:
            for grant in self._grants.values():
                if domid is not None and grant.granter != domid:
                    continue
                if grant.unshared:
                    c.deferred_grants += 1
                    c.details.append(
                        f"deferred grant dom{grant.granter} ref {grant.ref} (mapped by"
                        f" dom{grant.grantee})"
                    )
                else:
                    c.grants += 1
                    c.details.append(
                        f"grant dom{grant.granter} ref {grant.ref} -> dom{grant.grantee}"
                    )
            for handle in self._handles.values():
                if domid is not None and handle.domid != domid:
                    continue
                c.handles += 1
                c.details.append(f"open {handle.kind} handle of dom{handle.domid}")
                if isinstance(handle, SimGrantTable):
                    for mapping in handle._mappings:
                        c.mappings += 1
                        c.mapped_pages += len(mapping._grants)
                        c.details.append(f"mapping by dom{handle.domid}: {mapping!r}")
            for owner, table in self._ports.items():
                if domid is not None and owner != domid:
                    continue
                for entry in table.values():
                    c.ports += 1
                    c.details.append(f"port {entry.port} of dom{owner}")
            if self._lingering:
                gc.collect()
                self._lingering = [(k, r) for (k, r) in self._lingering if not r.try_unmap()]
            if domid is None:
                c.exported_views = len(self._lingering)
                if self._lingering:
                    c.details.append(f"{len(self._lingering)} closed regions still have views")
        return c

    def resources(self, domid: int | None = None) -> ResourceCounts:
        """Count live resources of domain *domid*, or of the whole machine.

        ``exported_views`` is only counted machine-wide.
        """
        c = self._count(domid)
        return ResourceCounts(
            grants=c.grants,
            deferred_grants=c.deferred_grants,
            mappings=c.mappings,
            mapped_pages=c.mapped_pages,
            ports=c.ports,
            handles=c.handles,
            exported_views=c.exported_views,
        )

    def assert_no_leaks(self, domid: int | None = None) -> None:
        """Fail if domain *domid* (or anything, if ``None``) holds a resource.

        :raises AssertionError: listing what is still live
        """
        c = self._count(domid)
        if c.details:
            who = "the machine" if domid is None else f"domain {domid}"
            raise AssertionError(f"{who} still holds: " + "; ".join(c.details))

