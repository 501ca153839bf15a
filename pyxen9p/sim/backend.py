"""A simulated Xen 9pfs backend that behaves like QEMU's (``xen-9p-backend.c``).

:class:`Sim9pfsBackend` runs in a backend :class:`~pyxen9p.sim.platform.SimDomain`
and serves one frontend device over the simulated grants, event channels and
XenStore, with QEMU's observable behaviour:

* **Setup.**  :meth:`~Sim9pfsBackend.start` writes what the toolstack
  (libxl) writes -- the backend directory
  ``/local/domain/<be>/backend/9pfs/<fe>/<devid>`` (``frontend``,
  ``frontend-id``, ``online``, ``path``, ``security_model``, ``state``) and
  the frontend directory (``backend``, ``backend-id``, ``state``, ``tag``),
  with the toolstack's permissions (each directory owned by its domain,
  readable by the other) -- then publishes ``versions``, ``max-rings`` and
  ``max-ring-page-order`` and goes to InitWait.  The frontend directory is
  ``/local/domain/<fe>/device/9pfs/<devid>`` unless another path is given (QEMU
  follows the backend's ``frontend`` node anywhere, e.g. outside
  ``device/``).  With ``write_toolstack_nodes=False`` the nodes must already
  exist and only the backend's own keys are written.
* **Connect** (frontend Initialised or Connected, backend InitWait): reads
  ``version``, ``num-rings`` (1..max-rings), ``ring-ref<N>``,
  ``event-channel-<N>`` and ``tag`` strictly (decimal, no garbage); per ring
  maps the interface page, reads ``ring_order`` **once** (0..max order, as
  QEMU), maps the ``1 << order`` data pages as one region (``in`` = first
  half, ``out`` = second half), binds the event channel and goes Connected.
  Deviation from QEMU: a connection failure (bad keys, failed map or bind)
  releases what was set up and goes to Closing, with the reason in
  :attr:`~Sim9pfsBackend.errors`; QEMU silently stays in InitWait.
* **Serving.**  One thread per ring, woken only by the frontend's
  notifications (and after each reply, as QEMU re-schedules itself).  One
  request per ring at a time: the whole request (its size from the header;
  ``size < 7`` or ``> ring size`` is a protocol error) is passed to the
  handler; the reply is pushed only when ``in`` has room for all of it
  (waiting for the frontend's notify otherwise); ``out_cons`` is advanced
  when the reply is pushed, then ``in_prod``, then the frontend is notified.
  A request whose tag does not select this ring (``tag % num_rings``) is a
  protocol error: QEMU would read its body from the other ring.  A request
  whose header is visible but whose body is not stalls the ring for good, as
  in QEMU (``qemu_partial_stall=False`` waits for the rest instead).
  The room for a reply is computed as QEMU's
  ``xen_9pfs_in_sg`` does, from the two indices masked to the ring (the
  default, as QEMU; ``qemu_full_ring=False`` waits for room instead): an
  ``in`` ring that is exactly full (masked indices equal) counts as empty,
  and the next reply is written over the unread ones.  A frontend must
  never let its replies fill ``in`` exactly (checked on QEMU 7.2: with two
  replies of msize unread on a ring of 2 x msize, a third overran them).
* **Errors.**  A malformed request, a reply that cannot fit even an empty
  ring, or a handler exception sends the backend to Closing and it stops
  serving (QEMU's "Failed to decode VirtFS request" path).
* **Teardown.**  On frontend Closing or Closed the backend stops the ring
  threads, unbinds and unmaps everything and takes the frontend's state
  (Closing, then Closed), as QEMU's legacy backend core does.  When a Closed
  backend then sees its frontend back at Initialising it resets: Initialising,
  features, InitWait, ready for a new connection.  A frontend directory that
  disappears while connected counts as Closed.

:meth:`~Sim9pfsBackend.stop` ends everything, releases every mapping and port
and writes state Closed.  For hostile-backend tests the handler may return
any bytes (wrong tag, type or size); :meth:`~Sim9pfsBackend.raw_ring` gives
the mapped interface page and data rings to corrupt, and
:meth:`~Sim9pfsBackend.notify_frontend` / :meth:`~Sim9pfsBackend.force_state`
send spurious events and states.

The handler is called from the ring threads, concurrently for different
rings: it must be thread-safe and must return (a blocked handler blocks its
ring and :meth:`~Sim9pfsBackend.stop`).
"""

from __future__ import annotations

import errno as _errno
import re
import select
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from typing_extensions import Self

from pyxen9p.barrier import Barriers, get_barriers
from pyxen9p.errors import ProtocolError, RingProtocolError
from pyxen9p.interfaces import Permission, PermissionFlag, WatchLike, XenStoreLike
from pyxen9p.ring import (
    HEADER,
    HEADER_SIZE,
    MAX_RING_ORDER,
    ByteRing,
    Consumer,
    Interface,
    Producer,
    ring_size,
)
from pyxen9p.sim.platform import SimDomain, SimEventChannel, SimGrantMapping, SimGrantTable
from pyxen9p.xenbus import XenbusState

__all__ = [
    "NOTAG",
    "Handler",
    "MalformedRequestError",
    "MinimalHandler",
    "RawRing",
    "Sim9pfsBackend",
    "XenbusState",
    "echo_handler",
    "rlerror",
]

#: The tag of Tversion.
NOTAG = 0xFFFF
_RLERROR = 7
_TVERSION = 100
_RVERSION = 101

#: ``handler(request) -> reply``: *request* is one whole 9P message (header
#: included); the reply is pushed as is (``None`` or ``b""``: no reply).
Handler = Callable[[bytes], "bytes | bytearray | None"]


class MalformedRequestError(ProtocolError):
    """A request a handler cannot decode (sends the backend to Closing).

    A :class:`~pyxen9p.errors.ProtocolError` (so still a :class:`ValueError`).
    """


def rlerror(tag: int, ecode: int) -> bytes:
    """Build ``Rlerror``: ``size[4] 7 tag[2] ecode[4]``.

    :param tag: the request's tag
    :param ecode: a Linux errno
    """
    return HEADER.pack(HEADER_SIZE + 4, _RLERROR, tag) + struct.pack("<I", ecode)


def echo_handler(request: bytes) -> bytes:
    """Answer any request with its own body, type + 1 and the same tag.

    :raises MalformedRequestError: if *request* is shorter than a header
    """
    if len(request) < HEADER_SIZE:
        raise MalformedRequestError(f"{len(request)}-byte request")
    _size, mtype, tag = HEADER.unpack_from(request)
    body = request[HEADER_SIZE:]
    return HEADER.pack(HEADER_SIZE + len(body), (mtype + 1) & 0xFF, tag) + body


class MinimalHandler:
    """A tiny 9P2000.L responder: ``Tversion`` gets ``Rversion``, anything
    else ``Rlerror(EOPNOTSUPP)`` with the request's tag.

    :param max_msize: the largest msize granted in ``Rversion``
    """

    def __init__(self, max_msize: int = 65536) -> None:
        self.max_msize = max_msize

    def __call__(self, request: bytes) -> bytes:
        """Answer *request*.

        :raises MalformedRequestError: if the header's size is not the
            message's length, or a ``Tversion`` body is malformed
        """
        if len(request) < HEADER_SIZE:
            raise MalformedRequestError(f"{len(request)}-byte request")
        size, mtype, tag = HEADER.unpack_from(request)
        if size != len(request):
            raise MalformedRequestError(f"header says {size} bytes, message has {len(request)}")
        if mtype != _TVERSION:
            return rlerror(tag, _errno.EOPNOTSUPP)
        if size < HEADER_SIZE + 6:
            raise MalformedRequestError("short Tversion")
        msize, length = struct.unpack_from("<IH", request, HEADER_SIZE)
        if HEADER_SIZE + 6 + length != size:
            raise MalformedRequestError("Tversion string overruns the message")
        version = request[HEADER_SIZE + 6 :]
        answer = b"9P2000.L" if version == b"9P2000.L" else b"unknown"
        body = struct.pack("<IH", min(msize, self.max_msize), len(answer)) + answer
        return HEADER.pack(HEADER_SIZE + len(body), _RVERSION, tag) + body


@dataclass
class RawRing:
    """Raw access to one connected ring, for hostile-backend tests.

    The views are the backend's own and are released when the ring is torn
    down; tests must not keep views derived from them.

    :ivar index: the ring number
    :ivar order: the ring order read from the interface page at connect
    :ivar size: bytes per direction
    :ivar interface: the mapped interface page (write ``in_prod`` etc.)
    :ivar in_ring: the ``in`` half (backend to frontend)
    :ivar out_ring: the ``out`` half (frontend to backend)
    :ivar ref: the grant reference of the interface page
    :ivar local_port: the backend's event-channel port
    :ivar remote_port: the frontend's port
    """

    index: int
    order: int
    size: int
    interface: Interface
    in_ring: ByteRing
    out_ring: ByteRing
    ref: int
    local_port: int
    remote_port: int


class _Fatal(Exception):
    """A protocol violation that closes the device."""


class _Ring:
    """Everything the backend holds for one connected ring."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.intf_map: SimGrantMapping | None = None
        self.data_map: SimGrantMapping | None = None
        self.evtchn: SimEventChannel | None = None
        self.local_port: int | None = None
        self.remote_port = 0
        self.ref = 0
        self.order = 0
        self.size = 0
        self.interface: Interface | None = None
        self.in_ring: ByteRing | None = None
        self.out_ring: ByteRing | None = None
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.idle = threading.Event()
        self.num_rings = 1
        self.reply: bytes | None = None
        self.stalled = False
        self.served = 0

    def release(self) -> None:
        """Unbind, unmap and close what was set up (idempotent)."""
        if self.evtchn is not None:
            if self.local_port is not None:
                try:
                    self.evtchn.unbind(self.local_port)
                except OSError:
                    pass
                self.local_port = None
            self.evtchn.close()
            self.evtchn = None
        for ring in (self.in_ring, self.out_ring):
            if ring is not None:
                ring.release()
        self.in_ring = self.out_ring = None
        self.producer = self.consumer = None
        if self.data_map is not None:
            self.data_map.close()
            self.data_map = None
        if self.interface is not None:
            self.interface.release()
            self.interface = None
        if self.intf_map is not None:
            self.intf_map.close()
            self.intf_map = None


_UINT = re.compile(rb"[0-9]{1,10}")


class Sim9pfsBackend:
    """A QEMU-like Xen 9pfs backend for one frontend device.

    :param domain: the backend domain (usually domain 0)
    :param frontend_domid: the frontend's domain
    :param devid: the device number
    :param handler: answers each request (default: :class:`MinimalHandler`)
    :param tag: the mount tag the toolstack writes for the frontend
    :param path: the ``path`` the toolstack writes for the backend
    :param security_model: the ``security_model`` the toolstack writes
    :param frontend_path: the frontend directory (default
        ``/local/domain/<fe>/device/9pfs/<devid>``)
    :param write_toolstack_nodes: write the toolstack's nodes at start
    :param versions: the advertised ``versions`` list (also what is accepted)
    :param max_rings: the advertised ``max-rings`` (QEMU: 8)
    :param max_ring_page_order: the advertised ``max-ring-page-order`` (QEMU: 9)
    :param advertise: extra or overriding backend keys written before
        InitWait, verbatim (for tests of hostile values)
    :param qemu_partial_stall: stall a ring whose request is only partly
        published, as QEMU does
    :param qemu_full_ring: count an exactly full ``in`` ring as empty, as
        QEMU does (``False``: wait for room then too)
    :param poll_interval: seconds between checks for :meth:`stop`
    :param join_timeout: seconds to wait for each thread when stopping
    :param barriers: memory barriers (default: :func:`pyxen9p.barrier.get_barriers`)
    """

    def __init__(
        self,
        domain: SimDomain,
        frontend_domid: int,
        devid: int = 0,
        *,
        handler: Handler | None = None,
        tag: str = "share",
        path: str = "/srv/share",
        security_model: str = "none",
        frontend_path: str | None = None,
        write_toolstack_nodes: bool = True,
        versions: str = "1",
        max_rings: int = 8,
        max_ring_page_order: int = MAX_RING_ORDER,
        advertise: Mapping[str, str | bytes] | None = None,
        qemu_partial_stall: bool = True,
        qemu_full_ring: bool = True,
        poll_interval: float = 0.05,
        join_timeout: float = 5.0,
        barriers: Barriers | None = None,
    ) -> None:
        if max_rings < 1:
            raise ValueError("max_rings must be at least 1")
        if not 0 <= max_ring_page_order <= MAX_RING_ORDER:
            raise ValueError(f"max_ring_page_order must be 0..{MAX_RING_ORDER}")
        self._domain = domain
        self.frontend_domid = frontend_domid
        self.devid = devid
        self.handler: Handler = handler if handler is not None else MinimalHandler()
        self._tag = tag
        self._path = path
        self._security_model = security_model
        self.backend_path = f"{domain.path}/backend/9pfs/{frontend_domid}/{devid}"
        self.frontend_path = (
            frontend_path
            if frontend_path is not None
            else f"/local/domain/{frontend_domid}/device/9pfs/{devid}"
        )
        self._write_toolstack = write_toolstack_nodes
        self.versions = versions
        self._accepted_versions = {int(v) for v in versions.split(",") if v.strip().isdigit()}
        self.max_rings = max_rings
        self.max_ring_page_order = max_ring_page_order
        self._advertise = dict(advertise or {})
        self._partial_stall = qemu_partial_stall
        self._full_ring_as_empty = qemu_full_ring
        self._poll = poll_interval
        self._join_timeout = join_timeout
        self._barriers = barriers if barriers is not None else get_barriers()

        self._store: XenStoreLike | None = None
        self._gnttab: SimGrantTable | None = None
        self._control: threading.Thread | None = None
        self._stop = threading.Event()
        self._fatal = threading.Event()
        self._lock = threading.Lock()  # state, errors, log
        self._state_cond = threading.Condition(self._lock)
        self._state = XenbusState.UNKNOWN
        self._rings: list[_Ring] = []
        self._started = False
        self._stopped = False
        #: Fatal errors, newest last (protocol violations, failed connects).
        self.errors: list[str] = []
        #: Non-fatal oddities (stalled rings, stray events).
        self.warnings: list[str] = []
        #: ``(ring, type, tag)`` of every request handed to the handler.
        self.requests: list[tuple[int, int, int]] = []
        #: How many times the backend reached Connected.
        self.connections = 0
        #: The frontend's ``tag`` read at the last connect.
        self.frontend_tag: str | None = None

    # -- public state ---------------------------------------------------------

    @property
    def state(self) -> XenbusState:
        """The backend state last written."""
        with self._lock:
            return self._state

    @property
    def num_rings(self) -> int:
        """Rings of the current connection (0 when not connected)."""
        with self._lock:
            return len(self._rings)

    @property
    def stalled_rings(self) -> tuple[int, ...]:
        """Rings stalled by a partly published request."""
        with self._lock:
            return tuple(r.index for r in self._rings if r.stalled)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until every ring thread waits for an event and none is pending.

        For tests that must know no earlier notification is still being
        handled before they act.  It takes at least one poll interval.

        :returns: ``False`` on timeout (or if not connected)
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                rings = list(self._rings)
            if rings and all(self._ring_idle(r) for r in rings):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self._poll / 4)

    @staticmethod
    def _ring_idle(ring: _Ring) -> bool:
        evtchn = ring.evtchn
        if evtchn is None or not ring.idle.is_set():
            return False
        try:
            return not select.select([evtchn.fileno()], [], [], 0)[0]
        except (ValueError, OSError):
            return False

    def wait_for_state(self, *states: int, timeout: float = 5.0) -> bool:
        """Wait until the backend state is one of *states*.

        :returns: ``False`` on timeout
        """
        with self._state_cond:
            return self._state_cond.wait_for(lambda: self._state in states, timeout)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Write the XenStore nodes, go to InitWait and start serving.

        :raises RuntimeError: if already started
        :raises OSError: if XenStore or a handle cannot be opened; nothing is
            left behind then
        """
        if self._started:
            raise RuntimeError("the backend was already started")
        self._started = True
        try:
            self._store = self._domain.open_xenstore()
            self._gnttab = self._domain.open_grant_table()
            if self._write_toolstack:
                self._write_toolstack_nodes()
            frontend = self._store.read(f"{self.backend_path}/frontend").decode("utf-8")
            self.frontend_path = self._frontend_dir(frontend)
            self._set_state(XenbusState.INITIALISING)
            self._publish_features()
            self._control = threading.Thread(
                target=self._control_loop,
                name=f"sim9pfs-be-{self.frontend_domid}-{self.devid}",
                daemon=True,
            )
            self._control.start()
        except BaseException:
            self._release_handles()
            raise

    def stop(self) -> None:
        """Stop every thread, release every mapping and port, write Closed
        (idempotent)."""
        self._shut_down(write_closed=True)

    def kill(self) -> None:
        """Die as a SIGKILLed QEMU does: stop serving at once, release every
        mapping and port (as the kernel does for a dead process), but write
        nothing: XenStore keeps saying whatever state the backend was in, and
        the frontend's notifications go nowhere (idempotent; :meth:`stop`
        afterwards does nothing)."""
        self._shut_down(write_closed=False)

    def _shut_down(self, *, write_closed: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._control is not None:
            self._control.join(self._join_timeout)
            if self._control.is_alive():
                self._error("the control thread did not stop")
        self._disconnect()
        if write_closed and self._store is not None:
            try:
                self._set_state(XenbusState.CLOSED)
            except OSError as err:
                self._warn(f"cannot write state Closed at stop: {err}")
        self._release_handles()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _release_handles(self) -> None:
        if self._gnttab is not None:
            self._gnttab.close()
            self._gnttab = None
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- hooks for hostile tests ---------------------------------------------

    def raw_ring(self, index: int) -> RawRing:
        """Raw access to connected ring *index* (see :class:`RawRing`).

        :raises LookupError: if not connected or no such ring
        """
        with self._lock:
            if not 0 <= index < len(self._rings):
                raise LookupError(f"no connected ring {index}")
            ring = self._rings[index]
            assert ring.interface is not None and ring.in_ring is not None
            assert ring.out_ring is not None and ring.local_port is not None
            return RawRing(
                index=ring.index,
                order=ring.order,
                size=ring.size,
                interface=ring.interface,
                in_ring=ring.in_ring,
                out_ring=ring.out_ring,
                ref=ring.ref,
                local_port=ring.local_port,
                remote_port=ring.remote_port,
            )

    def notify_frontend(self, index: int) -> None:
        """Send a (possibly spurious) notification on ring *index*.

        :raises LookupError: if not connected or no such ring
        """
        with self._lock:
            if not 0 <= index < len(self._rings):
                raise LookupError(f"no connected ring {index}")
            ring = self._rings[index]
            if ring.evtchn is None or ring.local_port is None:
                raise LookupError(f"ring {index} has no event channel")
            ring.evtchn.notify(ring.local_port)

    def force_state(self, state: int) -> None:
        """Write *state* as the backend state without acting on it."""
        self._set_state(state)

    # -- XenStore helpers --------------------------------------------------------

    #: The frontend's ``tag`` must be there at connect (QEMU reads it).
    _requires_tag = True
    #: The state a refused connection leaves the backend in (this deviation
    #: from QEMU, which stays in InitWait, is documented above).
    _refused_state = XenbusState.CLOSING

    def _frontend_dir(self, node: str) -> str:
        """The frontend directory, given the backend's ``frontend`` node
        (QEMU follows it anywhere)."""
        return node

    def _xs(self) -> XenStoreLike:
        store = self._store
        if store is None:
            raise RuntimeError("the backend is not started")
        return store

    def _set_state(self, state: int) -> None:
        self._xs().write(f"{self.backend_path}/state", str(int(state)))
        with self._state_cond:
            try:
                self._state = XenbusState(state)
            except ValueError:
                self._state = XenbusState.UNKNOWN
            self._state_cond.notify_all()

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def _warn(self, message: str) -> None:
        with self._lock:
            self.warnings.append(message)

    def _write_toolstack_nodes(self) -> None:
        """Write the nodes libxl writes for a 9pfs device, as domain 0."""
        tree = self._domain.xen.tree
        be, fe = self._domain.domid, self.frontend_domid
        none, read = PermissionFlag.NONE, PermissionFlag.READ
        bdir, fdir = self.backend_path, self.frontend_path
        for txn_dir, perms in (
            (bdir, [Permission(be, none), Permission(fe, read)]),
            (fdir, [Permission(fe, none), Permission(be, read)]),
        ):
            try:
                tree.rm(0, txn_dir)  # libxl removes stale device directories first
            except FileNotFoundError:
                pass
            tree.mkdir(0, txn_dir)
            tree.set_permissions(0, txn_dir, perms)
        for key, value in (
            ("frontend", fdir),
            ("frontend-id", str(fe)),
            ("online", "1"),
            ("state", str(int(XenbusState.INITIALISING))),
            ("path", self._path),
            ("security_model", self._security_model),
        ):
            tree.write(0, f"{bdir}/{key}", value.encode())
        for key, value in (
            ("backend", bdir),
            ("backend-id", str(be)),
            ("state", str(int(XenbusState.INITIALISING))),
            ("tag", self._tag),
        ):
            tree.write(0, f"{fdir}/{key}", value.encode())

    def _publish_features(self) -> None:
        store = self._xs()
        keys: dict[str, str | bytes] = {
            "versions": self.versions,
            "max-rings": str(self.max_rings),
            "max-ring-page-order": str(self.max_ring_page_order),
        }
        keys.update(self._advertise)
        for key, value in keys.items():
            store.write(f"{self.backend_path}/{key}", value)
        self._set_state(XenbusState.INIT_WAIT)

    def _frontend_state(self) -> int | None:
        try:
            raw = self._xs().read(f"{self.frontend_path}/state")
        except FileNotFoundError:
            return None
        if not _UINT.fullmatch(raw):
            self._warn(f"frontend state {raw!r} is not a number; ignored")
            return -1
        return int(raw)

    def _read_uint(self, key: str, low: int, high: int) -> int:
        path = f"{self.frontend_path}/{key}"
        try:
            raw = self._xs().read(path)
        except FileNotFoundError:
            raise _Fatal(f"frontend key {key} is missing") from None
        if not _UINT.fullmatch(raw) or not low <= int(raw) <= high:
            raise _Fatal(f"frontend key {key}={raw!r} is not a number in {low}..{high}")
        return int(raw)

    # -- the state machine -------------------------------------------------------

    def _control_loop(self) -> None:
        watch: WatchLike | None = None
        try:
            watch = self._xs().watch(
                f"{self.frontend_path}/state", f"sim9pfs-be-{self.frontend_domid}-{self.devid}"
            )
            while not self._stop.is_set():
                changed = watch.get(timeout=self._poll) is not None
                if self._stop.is_set():
                    break
                if self._fatal.is_set():
                    self._fatal.clear()
                    self._disconnect()
                    changed = True
                if changed:
                    self._check_state()
        except Exception as err:  # keep the reason; stop() still cleans up
            self._error(f"control thread failed: {err!r}")
        finally:
            if watch is not None:
                watch.close()

    def _check_state(self) -> None:
        """React to the frontend's state, like QEMU's ``xen_be_check_state``."""
        fe = self._frontend_state()
        state = self.state
        if fe is None:
            if self._rings:
                self._disconnect()
                self._set_state(XenbusState.CLOSED)
            return
        if fe in (XenbusState.CLOSING, XenbusState.CLOSED):
            self._disconnect()
            if state != fe:
                self._set_state(fe)
            return
        while True:
            state = self.state
            if state == XenbusState.INIT_WAIT and fe in (
                XenbusState.INITIALISED,
                XenbusState.CONNECTED,
            ):
                self._connect()
                return
            if state == XenbusState.CLOSED and fe == XenbusState.INITIALISING:
                self._set_state(XenbusState.INITIALISING)
                continue
            if state == XenbusState.INITIALISING:
                self._publish_features()
                continue
            return

    def _connect(self) -> None:
        rings: list[_Ring] = []
        try:
            version = self._read_uint("version", 0, 0xFFFFFFFF)
            if version not in self._accepted_versions:
                raise _Fatal(f"frontend version {version} not in {self.versions!r}")
            count = self._read_uint("num-rings", 1, self.max_rings)
            for i in range(count):
                ring = _Ring(i)
                ring.num_rings = count
                rings.append(ring)
                ring.ref = self._read_uint(f"ring-ref{i}", 0, 0xFFFFFFFF)
                ring.remote_port = self._read_uint(f"event-channel-{i}", 0, 0xFFFFFFFF)
            try:
                self.frontend_tag = self._xs().read(f"{self.frontend_path}/tag").decode("utf-8")
            except FileNotFoundError:
                if self._requires_tag:
                    raise _Fatal("frontend key tag is missing") from None
            except UnicodeDecodeError:
                if self._requires_tag:
                    raise _Fatal("frontend key tag is not UTF-8") from None
            for ring in rings:
                self._map_ring(ring)
        except (_Fatal, OSError) as err:
            for ring in rings:
                ring.release()
            self._error(f"connect failed: {err}")
            self._set_state(self._refused_state)
            return
        with self._lock:
            self._rings = rings
            self.connections += 1
        for ring in rings:
            ring.thread = threading.Thread(
                target=self._serve,
                args=(ring,),
                name=f"sim9pfs-ring{ring.index}-{self.frontend_domid}-{self.devid}",
                daemon=True,
            )
            ring.thread.start()
        self._set_state(XenbusState.CONNECTED)

    def _map_ring(self, ring: _Ring) -> None:
        gnttab = self._gnttab
        assert gnttab is not None
        fe = self.frontend_domid
        ring.intf_map = gnttab.map_grant_ref(fe, ring.ref, writable=True)
        ring.interface = Interface(ring.intf_map.buffer)
        order = ring.interface.ring_order  # read once; private from now on
        if not 0 <= order <= self.max_ring_page_order:
            raise _Fatal(f"ring {ring.index}: ring_order {order} above {self.max_ring_page_order}")
        ring.order = order
        ring.size = ring_size(order)
        refs = [ring.interface.ref(j) for j in range(1 << order)]
        ring.data_map = gnttab.map_grant_refs(fe, refs, writable=True)
        data = ring.data_map.buffer
        ring.in_ring = ByteRing(data[: ring.size])
        ring.out_ring = ByteRing(data[ring.size : 2 * ring.size])
        intf = ring.interface
        # one aligned 32-bit load or store per index access, as QEMU's
        # (Interface.loader/storer: no Python frame each)
        ring.producer = Producer(
            ring.in_ring,
            intf.loader("in_cons"),
            intf.storer("in_prod"),
            self._barriers,
            prod=intf.in_prod,
        )
        ring.consumer = Consumer(
            ring.out_ring,
            intf.loader("out_prod"),
            intf.storer("out_cons"),
            self._barriers,
            cons=intf.out_cons,
        )
        ring.evtchn = self._domain.open_event_channel()
        ring.local_port = ring.evtchn.bind_interdomain(fe, ring.remote_port)

    def _disconnect(self) -> None:
        """Stop the ring threads, then unbind and unmap (idempotent)."""
        with self._lock:
            rings, self._rings = self._rings, []
        for ring in rings:
            ring.stop.set()
        for ring in rings:
            if ring.thread is not None and ring.thread is not threading.current_thread():
                ring.thread.join(self._join_timeout)
                if ring.thread.is_alive():
                    self._error(f"ring {ring.index} thread did not stop (handler blocked?)")
            ring.release()

    # -- serving ----------------------------------------------------------------

    def _serve(self, ring: _Ring) -> None:
        evtchn = ring.evtchn
        assert evtchn is not None
        fd = evtchn.fileno()
        try:
            while not ring.stop.is_set():
                readable, _, _ = select.select([fd], [], [], self._poll)
                if ring.stop.is_set():
                    break
                if not readable:
                    ring.idle.set()
                    continue
                ring.idle.clear()
                try:
                    port = evtchn.pending(timeout=0)
                except TimeoutError:
                    continue
                evtchn.unmask(port)
                self._process(ring)
        except (_Fatal, RingProtocolError) as err:
            if not ring.stop.is_set():
                prefix = f"ring {ring.index}: " if isinstance(err, RingProtocolError) else ""
                self._fail(ring, f"{prefix}{err}")
        except Exception as err:
            if not ring.stop.is_set():
                self._fail(ring, f"ring {ring.index} failed: {err!r}")

    def _fail(self, ring: _Ring, reason: str) -> None:
        """QEMU's decode-failure path: Closing at once, then disconnect."""
        self._error(reason)
        ring.stop.set()
        try:
            self._set_state(XenbusState.CLOSING)
        except (OSError, RuntimeError) as err:
            self._warn(f"cannot write state Closing: {err}")
        self._fatal.set()

    def _overrun(self, ring: _Ring, reply: bytes) -> bool:
        """QEMU's room for *reply* (``xen_9pfs_in_sg``): from the indices
        masked to the ring, so an exactly full ``in`` looks empty.  If that
        room is enough, *reply* is written there and published, over unread
        replies (``True``)."""
        producer, in_ring, intf = ring.producer, ring.in_ring, ring.interface
        assert producer is not None and in_ring is not None and intf is not None
        size = ring.size
        masked_prod = producer.prod & (size - 1)
        masked_cons = intf.in_cons & (size - 1)
        if masked_prod < masked_cons:
            room = masked_cons - masked_prod
        else:
            room = size - masked_prod + masked_cons
        if room < len(reply):
            return False
        in_ring.write(producer.prod, reply)
        producer.prod = (producer.prod + len(reply)) & 0xFFFFFFFF
        intf.in_prod = producer.prod
        with self._lock:
            self.warnings.append(
                f"ring {ring.index}: {len(reply)}-byte reply written over unread replies"
                " (the ring was exactly full: QEMU counts that as empty)"
            )
        return True

    def _process(self, ring: _Ring) -> None:
        """Serve requests until the ring is empty or a reply must wait for room."""
        consumer, producer, evtchn = ring.consumer, ring.producer, ring.evtchn
        assert consumer is not None and producer is not None and evtchn is not None
        assert ring.local_port is not None and ring.out_ring is not None
        num_rings = ring.num_rings
        while not ring.stop.is_set():
            if ring.reply is None:
                if ring.stalled:
                    return
                avail = consumer.available()
                if avail < HEADER_SIZE:
                    return
                start = consumer.cons & (ring.size - 1)
                if start + HEADER_SIZE <= ring.size:  # read in place, each byte once
                    size, mtype, tag = HEADER.unpack_from(ring.out_ring.buffer, start)
                else:
                    size, mtype, tag = HEADER.unpack(ring.out_ring.read(consumer.cons, HEADER_SIZE))
                if not HEADER_SIZE <= size <= ring.size:
                    raise _Fatal(
                        f"ring {ring.index}: request header announces {size} bytes; allowed"
                        f" {HEADER_SIZE}..{ring.size}"
                    )
                if avail < size:
                    if self._partial_stall:
                        ring.stalled = True
                        self._warn(
                            f"ring {ring.index}: request tag {tag} published partly ({avail} of"
                            f" {size} bytes); ring stalled as QEMU does"
                        )
                    return
                if tag % num_rings != ring.index:
                    raise _Fatal(
                        f"request tag {tag} arrived on ring {ring.index}; with {num_rings} rings"
                        f" it belongs on ring {tag % num_rings}"
                    )
                request = consumer.take(size)
                with self._lock:
                    self.requests.append((ring.index, mtype, tag))
                try:
                    reply = self.handler(request)
                except Exception as err:
                    raise _Fatal(
                        f"ring {ring.index}: handler failed on tag {tag}: {err!r}"
                    ) from err
                if not reply:
                    consumer.publish()
                    ring.served += 1
                    continue
                if len(reply) > ring.size:
                    raise _Fatal(
                        f"ring {ring.index}: {len(reply)}-byte reply to tag {tag} cannot fit"
                        f" a {ring.size}-byte ring"
                    )
                ring.reply = bytes(reply)
            if producer.free() < len(ring.reply):
                if not (self._full_ring_as_empty and self._overrun(ring, ring.reply)):
                    return  # wait for the frontend to consume and notify
                consumer.publish()
                ring.reply = None
                ring.served += 1
                evtchn.notify(ring.local_port)
                continue
            consumer.publish()
            if not producer.put(ring.reply):  # pragma: no cover - only we add to `in`
                raise _Fatal(f"ring {ring.index}: room vanished")
            ring.reply = None
            ring.served += 1
            evtchn.notify(ring.local_port)

