"""A local directory served to a guest over the simulated Xen: the whole stack, no Xen.

:class:`SimulatedShare` builds one simulated host: domain 0 runs the
QEMU-like 9pfs backend (:class:`~pyxen9p.sim.backend.Sim9pfsBackend`) whose
requests are answered by pyxen9p's 9P file server exporting a local directory;
a guest domain gets the device as ``device/9pfs/0`` with the share's tag.  A
:class:`~pyxen9p.frontend.Frontend` connected through :attr:`SimulatedShare.guest`
then goes through the real ring, grant, event-channel and XenStore code paths,
exactly as on Xen.

::

    with SimulatedShare("/srv/data") as share:
        client = pyxen9p.connect(tag="share", platform=share.guest)
"""

from __future__ import annotations

import os
import threading

from typing_extensions import Self

from pyxen9p.p9.server import FileServer, Session
from pyxen9p.ring import HEADER, HEADER_SIZE
from pyxen9p.sim.backend import Sim9pfsBackend
from pyxen9p.sim.platform import SimDomain, SimulatedXen

__all__ = ["GUEST_DOMID", "SimulatedShare"]

#: The guest's domain id in a simulated share.
GUEST_DOMID = 1
_TVERSION = 100


class _SessionPerConnection:
    """A backend handler giving each connection (each Tversion) a fresh 9P session."""

    def __init__(self, server: FileServer) -> None:
        self._server = server
        self._session: Session | None = None
        self._lock = threading.Lock()

    def __call__(self, request: bytes) -> bytes:
        session = self._session
        if len(request) >= HEADER_SIZE and HEADER.unpack_from(request)[1] == _TVERSION:
            with self._lock:
                if self._session is not None:
                    self._session.close()
                session = self._session = self._server.session()
        if session is None:
            with self._lock:
                session = self._session = self._session or self._server.session()
        return session.handle(request)


class SimulatedShare:
    """A simulated Xen host exporting *directory* to a guest over 9pfs.

    :param directory: the local directory to export
    :param readonly: refuse every modification (``EROFS``)
    :param tag: the device's mount tag
    :param max_rings: the backend's ``max-rings`` (QEMU: 8)
    :param max_ring_page_order: the backend's ``max-ring-page-order`` (QEMU: 9)

    :ivar xen: the :class:`~pyxen9p.sim.platform.SimulatedXen`
    :ivar guest: the guest domain: pass it as ``platform=`` to
        :func:`pyxen9p.connect` or :meth:`pyxen9p.frontend.Frontend.connect`
    :ivar backend: the simulated backend
    :ivar server: the 9P file server behind it
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        readonly: bool = False,
        tag: str = "share",
        max_rings: int = 8,
        max_ring_page_order: int = 9,
    ) -> None:
        self.server = FileServer(directory, readonly=readonly)
        self.xen = SimulatedXen()
        try:
            self.guest: SimDomain = self.xen.create_domain(GUEST_DOMID, "guest")
            self.backend = Sim9pfsBackend(
                self.xen.domain(0),
                GUEST_DOMID,
                handler=_SessionPerConnection(self.server),
                tag=tag,
                path=self.server.root,
                max_rings=max_rings,
                max_ring_page_order=max_ring_page_order,
            )
            self.backend.start()
        except BaseException:
            self.xen.close()
            self.server.close()
            raise
        self.tag = tag
        self._closed = False

    def close(self) -> None:
        """Stop the backend, the simulated machine and the server (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.backend.stop()
        finally:
            try:
                self.xen.close()
            finally:
                self.server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
