"""A raw Xen 9pfs frontend for the fuzzer: no safety rules, every resource released.

:class:`RawFrontend` does exactly what it is told: it writes any XenStore
value, shares rings whose interface page says anything, moves its indices
wherever a step wants and publishes bytes that are not messages.  It is kept
apart from :mod:`pyxen9p.frontend`, whose checks it deliberately lacks; the
only rule it keeps is its own hygiene: every page it shared and every port
it bound is released by :meth:`RawFrontend.close`, on every path.

It is built on the :class:`~pyxen9p.interfaces.XenPlatform` handles (real or
simulated) and on :mod:`pyxen9p.ring`'s primitives.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from typing_extensions import Self

from pyxen9p.interfaces import (
    EventChannelLike,
    GrantSharerLike,
    SharedPagesLike,
    XenPlatform,
    XenStoreLike,
)
from pyxen9p.ring import MAX_REFS, XEN_PAGE_SIZE, ByteRing, Interface, ring_size

__all__ = ["RawFrontend", "RawRing"]

_MASK32 = 0xFFFFFFFF


@dataclass
class RawRing:
    """One ring the raw frontend shared.

    :ivar index: the ring number
    :ivar order: the real order (pages shared: ``1 << order``)
    :ivar size: bytes per direction
    :ivar out_prod: the private producer index of ``out``
    :ivar in_cons: the private consumer index of ``in``
    :ivar sent_tags: tags published on this ring and not answered yet
    """

    index: int
    order: int
    size: int
    interface_pages: SharedPagesLike
    data_pages: SharedPagesLike
    interface: Interface
    out_ring: ByteRing
    in_ring: ByteRing
    port: int
    out_prod: int = 0
    in_cons: int = 0
    sent_tags: list[int] = field(default_factory=list)

    def release_views(self) -> None:
        """Drop the views of the shared pages (before they are unshared)."""
        for view in (self.interface, self.out_ring, self.in_ring):
            with contextlib.suppress(ValueError, BufferError):
                view.release()


class RawFrontend:
    """The frontend end of one 9pfs device, driven step by step.

    :param platform: where the frontend's handles come from
    :param frontend: the frontend's XenStore directory
    :param backend: the backend's XenStore directory
    :param backend_domid: the backend's domain
    """

    def __init__(
        self, platform: XenPlatform, frontend: str, backend: str, backend_domid: int
    ) -> None:
        self.frontend = frontend.rstrip("/")
        self.backend = backend.rstrip("/")
        self.backend_domid = backend_domid
        self.rings: list[RawRing] = []
        self._all_rings: list[RawRing] = []
        self._shared: list[SharedPagesLike] = []
        self._ports: list[int] = []
        self.store: XenStoreLike = platform.open_xenstore()
        try:
            self.sharer: GrantSharerLike = platform.open_grant_sharer()
            try:
                self.evtchn: EventChannelLike = platform.open_event_channel()
            except BaseException:
                self.sharer.close()
                raise
        except BaseException:
            self.store.close()
            raise
        self._closed = False

    # -- XenStore ------------------------------------------------------------

    def write(self, key: str, value: str | bytes) -> None:
        """Write the frontend node *key* (any value)."""
        self.store.write(f"{self.frontend}/{key}", value)

    def rm(self, key: str) -> None:
        """Remove the frontend node *key* (a missing node is not an error)."""
        with contextlib.suppress(FileNotFoundError):
            self.store.rm(f"{self.frontend}/{key}" if key else self.frontend)

    def backend_state(self) -> bytes | None:
        """The backend's ``state`` as written, ``None`` if missing."""
        try:
            return self.store.read(f"{self.backend}/state")
        except FileNotFoundError:
            return None

    def backend_state_int(self) -> int | None:
        """The backend's state as an integer (``None``: missing or not a number)."""
        raw = self.backend_state()
        if raw is None or not raw.isdigit() or len(raw) > 10:
            return None
        return int(raw)

    # -- rings ------------------------------------------------------------------

    def share_ring(
        self, order: int, *, declared_order: int | None = None, refs: str = "ok"
    ) -> RawRing:
        """Share a ring of ``1 << order`` data pages and bind an unbound port.

        :param declared_order: what the interface page's ``ring_order`` says
            (default: *order*)
        :param refs: ``ok``; ``bogus`` (references that were never granted);
            ``zero``; ``interface`` (every data reference names the interface page)
        """
        size = ring_size(order)
        intf_pages = self.sharer.share_pages(self.backend_domid, 1)
        self._shared.append(intf_pages)
        data_pages = self.sharer.share_pages(self.backend_domid, 1 << order)
        self._shared.append(data_pages)
        port = self.evtchn.bind_unbound_port(self.backend_domid)
        self._ports.append(port)
        interface = Interface(intf_pages.buffer[:XEN_PAGE_SIZE])
        declared = order if declared_order is None else declared_order
        interface.ring_order = declared & _MASK32
        count = min(1 << min(max(declared, 0), 9), MAX_REFS) if declared <= 9 else 1 << order
        real = list(data_pages.refs)
        if refs == "bogus":
            listed = [(r + 0x7000) & _MASK32 for r in real]
        elif refs == "zero":
            listed = [0] * len(real)
        elif refs == "interface":
            listed = [intf_pages.refs[0]] * len(real)
        else:
            listed = real
        listed = (listed * (count // len(listed) + 1))[:count]
        interface.set_refs(listed)
        data = data_pages.buffer
        ring = RawRing(
            index=len(self.rings), order=order, size=size, interface_pages=intf_pages,
            data_pages=data_pages, interface=interface,
            in_ring=ByteRing(data[:size]), out_ring=ByteRing(data[size : 2 * size]), port=port,
        )  # fmt: skip
        self.rings.append(ring)
        self._all_rings.append(ring)
        return ring

    def put(self, ring: RawRing, data: bytes, publish: int | None = None) -> None:
        """Copy *data* at the private ``out_prod`` and publish *publish* bytes of it."""
        if data:
            ring.out_ring.write(ring.out_prod, data[: ring.size])
        self.publish(ring, len(data) if publish is None else publish)

    def publish(self, ring: RawRing, count: int) -> None:
        """Advance ``out_prod`` by *count* (any value) and notify."""
        ring.out_prod = (ring.out_prod + count) & _MASK32
        ring.interface.out_prod = ring.out_prod
        self.notify(ring)

    def notify(self, ring: RawRing, count: int = 1) -> None:
        """Notify the backend *count* times on *ring*'s port."""
        for _ in range(count):
            self.evtchn.notify(ring.port)

    # -- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Unbind every port, unshare every page, close the handles (idempotent).

        Call it after the backend left Connected when possible: pages the
        backend still maps are only freed by Xen when it unmaps them.
        """
        if self._closed:
            return
        self._closed = True
        for ring in self._all_rings:
            ring.release_views()
        self._all_rings.clear()
        for port in self._ports:
            with contextlib.suppress(OSError):
                self.evtchn.unbind(port)
        self._ports.clear()
        for pages in self._shared:
            with contextlib.suppress(OSError):
                pages.close()
        self._shared.clear()
        self.rings.clear()
        for handle in (self.evtchn, self.sharer, self.store):
            with contextlib.suppress(OSError):
                handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
