"""A simulated Xen 9pfs backend that behaves like Xen's own ``xen-9pfsd``.

xen-9pfsd (``tools/9pfsd`` in the Xen tree, Xen 4.19 and later; Debian 13
ships it with Xen 4.20) is a second kind of backend beside QEMU's.
:class:`SimXen9pfsd` plays its observable behaviour on the simulated Xen, so
that host tests cover what the real-Xen tier sees:

* **Where.**  The backend directory is
  ``/local/domain/<be>/backend/xen_9pfs/<fe>/<devid>``; the frontend directory
  is always ``/local/domain/<fe>/device/9pfs/<devid>`` (the backend's
  ``frontend`` node is ignored).  The toolstack's nodes include xen-9pfsd's
  own: ``max-space``, ``max-files``, ``max-open-files``, ``auto-delete``.
* **Setup.**  A ``security_model`` other than ``none``, or a ``path`` that
  is not absolute, has ``//`` or ends in ``/``, is refused: the backend never
  publishes (it stays Initialising; the reason is in
  :attr:`~pyxen9p.sim.backend.Sim9pfsBackend.errors`).  Otherwise it
  publishes ``versions`` 1, ``max-rings`` 4, ``max-ring-page-order`` 9 and
  goes to InitWait.
* **State machine.**  It acts only when the frontend's state *changes*:
  Initialised connects (from whatever state the backend is in: InitWait,
  Closing or Closed; a refused connection writes Closed); Closing and Closed
  disconnect and are copied; a missing frontend state closes the device.  It
  never goes back to InitWait: after a connection ended, the next frontend
  writes Initialised and is connected from Closed.  ``tag`` is not read.
* **Serving.**  As :class:`~pyxen9p.sim.backend.Sim9pfsBackend` (one thread
  per ring, requests in ring order; a request published in parts is waited
  for, not stalled on).  The 9P answers come from the handler; give a
  *handler_factory* to get a fresh handler for every connection, told the
  device's fid limit (``max-open-files``, 0 or absent meaning 5), as
  xen-9pfsd frees every fid of a device when its connection ends.  9P2000.u
  only, and the fid limit counting every fid, are the handler's to enforce
  (the test suite's ``tests/p9/userver.py`` does both).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from pyxen9p.barrier import Barriers
from pyxen9p.ring import MAX_RING_ORDER
from pyxen9p.sim.backend import Handler, Sim9pfsBackend
from pyxen9p.sim.platform import SimDomain
from pyxen9p.xenbus import XenbusState

__all__ = ["DEFAULT_MAX_OPEN_FILES", "XEN_9PFSD_MAX_RINGS", "SimXen9pfsd"]

#: xen-9pfsd's fid limit when ``max-open-files`` is 0 or absent.
DEFAULT_MAX_OPEN_FILES = 5
#: xen-9pfsd's ``max-rings``.
XEN_9PFSD_MAX_RINGS = 4
_UINT = re.compile(r"[0-9]{1,10}")


class SimXen9pfsd(Sim9pfsBackend):
    """A xen-9pfsd-like Xen 9pfs backend for one frontend device.

    :param domain: the backend domain (usually domain 0)
    :param frontend_domid: the frontend's domain
    :param devid: the device number
    :param handler: answers each request (used when no *handler_factory*)
    :param handler_factory: ``factory(max_open_files) -> handler``, called at
        every connect: a fresh 9P server per connection
    :param tag: the mount tag the toolstack writes (xen-9pfsd's default: Xen)
    :param path: the ``path`` the toolstack writes
    :param security_model: the ``security_model`` the toolstack writes
    :param max_open_files: the ``max-open-files`` node (0: the default, 5)
    :param max_files: the ``max-files`` node
    :param max_space: the ``max-space`` node (MiB)
    :param auto_delete: the ``auto-delete`` node
    :param write_toolstack_nodes: write the toolstack's nodes at start
    :param max_rings: the advertised ``max-rings`` (xen-9pfsd: 4)
    :param max_ring_page_order: the advertised ``max-ring-page-order`` (9)
    :param advertise: extra or overriding backend keys written before
        InitWait, verbatim (for tests of hostile values)
    :param poll_interval: seconds between checks for :meth:`stop`
    :param join_timeout: seconds to wait for each thread when stopping
    :param barriers: memory barriers
    """

    _requires_tag = False
    _refused_state = XenbusState.CLOSED

    def __init__(
        self,
        domain: SimDomain,
        frontend_domid: int,
        devid: int = 0,
        *,
        handler: Handler | None = None,
        handler_factory: Callable[[int], Handler] | None = None,
        tag: str = "Xen",
        path: str = "/srv/share",
        security_model: str = "none",
        max_open_files: int = 0,
        max_files: int = 0,
        max_space: int = 0,
        auto_delete: int = 0,
        write_toolstack_nodes: bool = True,
        max_rings: int = XEN_9PFSD_MAX_RINGS,
        max_ring_page_order: int = MAX_RING_ORDER,
        advertise: Mapping[str, str | bytes] | None = None,
        poll_interval: float = 0.05,
        join_timeout: float = 5.0,
        barriers: Barriers | None = None,
    ) -> None:
        super().__init__(
            domain,
            frontend_domid,
            devid,
            handler=handler,
            tag=tag,
            path=path,
            security_model=security_model,
            write_toolstack_nodes=write_toolstack_nodes,
            versions="1",
            max_rings=max_rings,
            max_ring_page_order=max_ring_page_order,
            advertise=advertise,
            qemu_partial_stall=False,
            poll_interval=poll_interval,
            join_timeout=join_timeout,
            barriers=barriers,
        )
        self.backend_path = f"{domain.path}/backend/xen_9pfs/{frontend_domid}/{devid}"
        self.frontend_path = f"/local/domain/{frontend_domid}/device/9pfs/{devid}"
        self._handler_factory = handler_factory
        self._own_nodes = {
            "max-space": str(max_space),
            "max-files": str(max_files),
            "max-open-files": str(max_open_files),
            "auto-delete": str(auto_delete),
        }
        #: The fid limit read at start (``max-open-files``, 0 or absent: 5).
        self.max_open_files = DEFAULT_MAX_OPEN_FILES
        # the frontend state last acted on (xen-9pfsd starts from 0, Unknown)
        self._last_frontend: int | None = int(XenbusState.UNKNOWN)

    def _frontend_dir(self, node: str) -> str:
        # xen-9pfsd derives the frontend directory; the node is not read
        return f"/local/domain/{self.frontend_domid}/device/9pfs/{self.devid}"

    def _write_toolstack_nodes(self) -> None:
        super()._write_toolstack_nodes()
        tree = self._domain.xen.tree
        for key, value in self._own_nodes.items():
            tree.write(0, f"{self.backend_path}/{key}", value.encode())

    def _backend_node(self, key: str) -> str | None:
        try:
            return self._xs().read(f"{self.backend_path}/{key}").decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def _publish_features(self) -> None:
        model = self._backend_node("security_model")
        if model != "none":
            self._error(f"security model {model!r} invalid: the device is not served")
            return
        path = self._backend_node("path")
        if not path or not path.startswith("/") or "//" in path or path.endswith("/"):
            self._error(f"host path {path!r} invalid: the device is not served")
            return
        raw = self._backend_node("max-open-files")
        limit = int(raw) if raw is not None and _UINT.fullmatch(raw) else 0
        self.max_open_files = limit or DEFAULT_MAX_OPEN_FILES
        super()._publish_features()

    def _check_state(self) -> None:
        """React to a change of the frontend's state, as xen-9pfsd's ``frontend_changed``."""
        fe = self._frontend_state()
        if fe is None:
            self._disconnect()
            self._set_state(XenbusState.CLOSED)
            self._last_frontend = None
            return
        if fe < 0 or fe > max(XenbusState):
            self._warn(f"unknown frontend state {fe}")
            fe = int(XenbusState.UNKNOWN)
        if fe == self._last_frontend:
            return
        self._last_frontend = fe
        if fe == XenbusState.INITIALISED:
            self._disconnect()  # a frontend that connects twice (xen-9pfsd would leak)
            if self._handler_factory is not None:
                self.handler = self._handler_factory(self.max_open_files)
            self._connect()
        elif fe in (XenbusState.CLOSING, XenbusState.CLOSED):
            self._disconnect()
            self._set_state(fe)
