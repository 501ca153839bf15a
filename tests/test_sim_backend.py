"""Tests of the simulated QEMU-like Xen 9pfs backend (pyxen9p.sim.backend).

The frontend is a minimal one written here, directly over pyxen9p.ring and
the simulated platform, so these tests check the backend on its own.
"""

from __future__ import annotations

import errno
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyxen9p.barrier import get_barriers
from pyxen9p.errors import RingProtocolError
from pyxen9p.interfaces import Permission, PermissionFlag, XenStoreLike
from pyxen9p.ring import (
    HEADER,
    HEADER_SIZE,
    ByteRing,
    Consumer,
    Interface,
    Producer,
    ring_size,
)
from pyxen9p.sim.backend import (
    NOTAG,
    MalformedRequestError,
    MinimalHandler,
    Sim9pfsBackend,
    XenbusState,
    echo_handler,
    rlerror,
)
from pyxen9p.sim.platform import SimDomain, SimSharedPages, SimulatedXen

FE = 1
BE = 0


def msg(mtype: int, tag: int, body: bytes = b"") -> bytes:
    """A 9P message with a correct header."""
    return HEADER.pack(HEADER_SIZE + len(body), mtype, tag) + body


def tversion(msize: int = 8192, version: bytes = b"9P2000.L") -> bytes:
    return msg(100, NOTAG, struct.pack("<IH", msize, len(version)) + version)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class FeRing:
    """One ring of the minimal frontend."""

    def __init__(
        self, domain: SimDomain, backend: int, order: int, start_index: int, port: int
    ) -> None:
        sharer = domain.open_grant_sharer()
        self.sharer = sharer
        self.intf_pages: SimSharedPages = sharer.share_pages(backend, 1)
        self.data_pages: SimSharedPages = sharer.share_pages(backend, 1 << order)
        self.intf = Interface(self.intf_pages.buffer)
        self.intf.ring_order = order
        self.intf.set_refs(self.data_pages.refs)
        for name in ("in_cons", "in_prod", "out_cons", "out_prod"):
            setattr(self.intf, name, start_index)
        self.size = ring_size(order)
        data = self.data_pages.buffer
        self.in_ring = ByteRing(data[: self.size])
        self.out_ring = ByteRing(data[self.size : 2 * self.size])
        barriers = get_barriers()
        intf = self.intf
        self.producer = Producer(
            self.out_ring,
            lambda: intf.out_cons,
            lambda v: setattr(intf, "out_prod", v),
            barriers,
            prod=start_index,
        )
        self.consumer = Consumer(
            self.in_ring,
            lambda: intf.in_prod,
            lambda v: setattr(intf, "in_cons", v),
            barriers,
            cons=start_index,
        )
        self.port = port

    def release(self) -> None:
        self.in_ring.release()
        self.out_ring.release()
        self.intf.release()
        self.sharer.close()


class MiniFrontend:
    """A hand-written frontend: just enough of the protocol to drive the backend."""

    def __init__(
        self, xen: SimulatedXen, domid: int = FE, backend: int = BE, devid: int = 0,
        path: str | None = None,
    ) -> None:
        self.domain = xen.domain(domid)
        self.backend = backend
        self.store: XenStoreLike = self.domain.open_xenstore()
        self.evtchn = self.domain.open_event_channel()
        self.path = path or f"/local/domain/{domid}/device/9pfs/{devid}"
        self.backend_path = f"/local/domain/{backend}/backend/9pfs/{domid}/{devid}"
        self.rings: list[FeRing] = []

    def backend_state(self) -> int:
        return int(self.store.read(f"{self.backend_path}/state"))

    def wait_backend(self, *states: int, timeout: float = 5.0) -> int:
        assert wait_until(lambda: self.backend_state() in states, timeout), (
            f"backend state {self.backend_state()} not in {states}"
        )
        return self.backend_state()

    def set_state(self, state: int) -> None:
        self.store.write(f"{self.path}/state", str(int(state)))

    def setup(
        self, num_rings: int = 2, order: int = 1, start_index: int = 0,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Allocate rings and write the keys, without changing state."""
        self.wait_backend(XenbusState.INIT_WAIT)
        for _ in range(num_rings):
            port = self.evtchn.bind_unbound_port(self.backend)
            self.rings.append(FeRing(self.domain, self.backend, order, start_index, port))
        keys = {"version": "1", "num-rings": str(num_rings)}
        for i, ring in enumerate(self.rings):
            keys[f"ring-ref{i}"] = str(ring.intf_pages.refs[0])
            keys[f"event-channel-{i}"] = str(ring.port)
        keys.update(extra or {})
        for txn in self.store.transaction():
            with txn:
                for key, value in keys.items():
                    txn.write(f"{self.path}/{key}", value)

    def connect(self, num_rings: int = 2, order: int = 1, start_index: int = 0) -> None:
        self.setup(num_rings, order, start_index)
        self.set_state(XenbusState.INITIALISED)
        self.wait_backend(XenbusState.CONNECTED)
        self.set_state(XenbusState.CONNECTED)

    def send(self, index: int, message: bytes, notify: bool = True) -> None:
        ring = self.rings[index]
        assert ring.producer.put(message)
        if notify:
            self.evtchn.notify(ring.port)

    def _drain_events(self, timeout: float) -> None:
        readable, _, _ = select.select([self.evtchn.fileno()], [], [], timeout)
        if readable:
            port = self.evtchn.pending(timeout=0)
            self.evtchn.unmask(port)

    def try_recv(self, index: int, notify: bool = True) -> bytes | None:
        ring = self.rings[index]
        header = ring.consumer.peek_header(ring.size)
        if header is None:
            return None
        data = ring.consumer.take(header[0])
        ring.consumer.publish()
        if notify:
            self.evtchn.notify(ring.port)
        return data

    def recv(self, index: int, timeout: float = 5.0, notify: bool = True) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            data = self.try_recv(index, notify)
            if data is not None:
                return data
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply on ring {index}")
            self._drain_events(0.01)

    def close(self) -> None:
        """The spec's shutdown: Closing, wait for the backend, free, Closed."""
        self.set_state(XenbusState.CLOSING)
        self.wait_backend(XenbusState.CLOSING, XenbusState.CLOSED)
        self.free()
        self.set_state(XenbusState.CLOSED)

    def free(self) -> None:
        for ring in self.rings:
            self.evtchn.unbind(ring.port)
            ring.release()
        self.rings = []

    def shutdown(self) -> None:
        self.free()
        self.evtchn.close()
        self.store.close()


@pytest.fixture
def xen() -> Iterator[SimulatedXen]:
    machine = SimulatedXen()
    machine.create_domain(FE, "guest")
    yield machine
    machine.close()


@pytest.fixture
def make_backend(xen: SimulatedXen) -> Iterator[Callable[..., Sim9pfsBackend]]:
    backends: list[Sim9pfsBackend] = []

    def make(**kwargs: object) -> Sim9pfsBackend:
        backend = Sim9pfsBackend(xen.domain(BE), FE, **kwargs)  # type: ignore[arg-type]
        backend.start()
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.stop()


@pytest.fixture
def frontend(xen: SimulatedXen) -> Iterator[MiniFrontend]:
    fe = MiniFrontend(xen)
    yield fe
    fe.shutdown()


# ---------------------------------------------------------------------------
# Handlers


def test_rlerror_and_echo_handler() -> None:
    assert rlerror(5, errno.ENOSYS) == struct.pack("<IBHI", 11, 7, 5, errno.ENOSYS)
    assert echo_handler(msg(24, 9, b"abc")) == msg(25, 9, b"abc")
    with pytest.raises(MalformedRequestError):
        echo_handler(b"\x07\0\0")


def test_minimal_handler() -> None:
    handler = MinimalHandler(max_msize=4096)
    reply = handler(tversion(65536))
    size, mtype, tag = HEADER.unpack_from(reply)
    assert (size, mtype, tag) == (len(reply), 101, NOTAG)
    assert struct.unpack_from("<IH", reply, 7) == (4096, 8)
    assert reply[13:] == b"9P2000.L"
    assert handler(tversion(1024, b"9P2000"))[13:] == b"unknown"
    assert handler(msg(24, 3, b"\0" * 12)) == rlerror(3, errno.EOPNOTSUPP)
    with pytest.raises(MalformedRequestError):
        handler(msg(100, NOTAG, b"\0\0\0\0\x09\0abc"))  # string overruns
    with pytest.raises(MalformedRequestError):
        handler(HEADER.pack(20, 24, 1))  # size disagrees with the length


# ---------------------------------------------------------------------------
# Setup and XenStore


def test_initwait_publishes_keys_with_toolstack_permissions(
    xen: SimulatedXen, make_backend: Callable[..., Sim9pfsBackend]
) -> None:
    backend = make_backend(tag="mytag", path="/export")
    assert backend.state == XenbusState.INIT_WAIT
    dom0 = xen.domain(0).open_xenstore()
    bdir = f"/local/domain/0/backend/9pfs/{FE}/0"
    fdir = f"/local/domain/{FE}/device/9pfs/0"
    expected_backend = {
        "frontend": fdir.encode(),
        "frontend-id": b"1",
        "online": b"1",
        "path": b"/export",
        "security_model": b"none",
        "versions": b"1",
        "max-rings": b"8",
        "max-ring-page-order": b"9",
        "state": b"2",
    }
    assert {k: dom0.read(f"{bdir}/{k}") for k in expected_backend} == expected_backend
    expected_frontend = {
        "backend": bdir.encode(),
        "backend-id": b"0",
        "state": b"1",
        "tag": b"mytag",
    }
    assert {k: dom0.read(f"{fdir}/{k}") for k in expected_frontend} == expected_frontend
    none, read = PermissionFlag.NONE, PermissionFlag.READ
    assert dom0.get_permissions(fdir) == [Permission(FE, none), Permission(0, read)]
    assert dom0.get_permissions(bdir) == [Permission(0, none), Permission(FE, read)]
    dom0.close()

    guest = xen.domain(FE).open_xenstore()
    assert guest.read(f"{bdir}/max-rings") == b"8"  # the frontend may read the backend
    with pytest.raises(PermissionError):
        guest.write(f"{bdir}/state", "4")  # but not write it
    guest.write("device/9pfs/0/version", "1")  # its own directory is writable
    guest.close()

    other = xen.create_domain(2)
    store = other.open_xenstore()
    with pytest.raises(PermissionError):
        store.read(f"{bdir}/state")
    store.close()


def test_explicit_frontend_path_outside_device(
    xen: SimulatedXen, make_backend: Callable[..., Sim9pfsBackend]
) -> None:
    path = f"/local/domain/{FE}/data/p9"
    backend = make_backend(frontend_path=path)
    fe = MiniFrontend(xen, path=path)
    try:
        fe.connect(num_rings=1)
        fe.send(0, msg(24, 0))
        assert fe.recv(0) == rlerror(0, errno.EOPNOTSUPP)
        assert backend.frontend_path == path
        fe.close()
        fe.wait_backend(XenbusState.CLOSED)
    finally:
        fe.shutdown()


def test_backend_follows_existing_nodes(xen: SimulatedXen) -> None:
    """With write_toolstack_nodes=False the backend reads ``frontend`` as QEMU does."""
    tree = xen.tree
    bdir = f"/local/domain/0/backend/9pfs/{FE}/3"
    fdir = "/local/domain/1/elsewhere"
    tree.write(0, f"{bdir}/frontend", fdir.encode())
    tree.write(0, f"{bdir}/state", b"1")
    tree.write(0, f"{fdir}/state", b"1")
    tree.write(0, f"{fdir}/tag", b"t")
    tree.set_permissions(0, fdir, [Permission(FE, PermissionFlag.NONE)])
    backend = Sim9pfsBackend(xen.domain(0), FE, 3, write_toolstack_nodes=False)
    backend.start()
    try:
        assert backend.frontend_path == fdir
        assert tree.read(0, f"{bdir}/state") == b"2"
        assert tree.read(0, f"{bdir}/max-rings") == b"8"
    finally:
        backend.stop()
    assert tree.read(0, f"{bdir}/state") == b"6"
    xen.assert_no_leaks()


def test_advertise_overrides(
    make_backend: Callable[..., Sim9pfsBackend], xen: SimulatedXen
) -> None:
    make_backend(advertise={"max-rings": "zz", "extra": b"\x00x"}, versions="1,2")
    bdir = f"/local/domain/0/backend/9pfs/{FE}/0"
    assert xen.tree.read(0, f"{bdir}/max-rings") == b"zz"
    assert xen.tree.read(0, f"{bdir}/extra") == b"\x00x"
    assert xen.tree.read(0, f"{bdir}/versions") == b"1,2"


# ---------------------------------------------------------------------------
# Connecting and serving


def test_connect_and_ring_choice(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend()
    frontend.connect(num_rings=2, order=1)
    assert backend.state == XenbusState.CONNECTED
    assert backend.num_rings == 2 and backend.frontend_tag == "share"
    frontend.send(NOTAG % 2, tversion(65536))  # Tversion's NOTAG selects ring 1
    reply = frontend.recv(1)
    assert HEADER.unpack_from(reply) == (len(reply), 101, NOTAG)
    frontend.send(0, msg(24, 4, b"\0" * 12))
    assert frontend.recv(0) == rlerror(4, errno.EOPNOTSUPP)
    frontend.send(1, msg(24, 7, b"\0" * 12))
    assert frontend.recv(1) == rlerror(7, errno.EOPNOTSUPP)
    assert backend.requests == [(1, 100, NOTAG), (0, 24, 4), (1, 24, 7)]
    raw = backend.raw_ring(0)
    assert (raw.order, raw.size, raw.remote_port) == (1, 4096, frontend.rings[0].port)
    assert backend.errors == []


def test_wraparound_of_free_running_indices(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    """Indices start just below 2**32 and wrap; messages wrap around the ring end."""
    make_backend(handler=echo_handler)
    frontend.connect(num_rings=1, order=1, start_index=0xFFFFF000 + 100)
    for i in range(40):
        body = bytes([i]) * (300 + 97 * i % 1500)
        frontend.send(0, msg(24, 0, body))
        assert frontend.recv(0) == msg(25, 0, body)
    assert frontend.rings[0].intf.out_prod < 0x10000  # wrapped


def test_one_request_per_ring_at_a_time(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    release = threading.Event()
    active: dict[int, int] = {}
    most = {"per_ring": 0, "total": 0}
    lock = threading.Lock()

    def handler(request: bytes) -> bytes:
        _size, _mtype, tag = HEADER.unpack_from(request)
        with lock:
            active[tag % 2] = active.get(tag % 2, 0) + 1
            most["per_ring"] = max(most["per_ring"], *active.values())
            most["total"] = max(most["total"], sum(active.values()))
        release.wait(5)
        with lock:
            active[tag % 2] -= 1
        return echo_handler(request)

    backend = make_backend(handler=handler)
    frontend.connect(num_rings=2)
    for tag in (0, 2, 4):
        frontend.send(0, msg(24, tag, b"x" * 10))
    frontend.send(1, msg(24, 1, b"y"))
    assert wait_until(lambda: len(backend.requests) == 2)
    time.sleep(0.1)
    assert sorted(backend.requests) == [(0, 24, 0), (1, 24, 1)]
    ring0 = frontend.rings[0].intf
    assert ring0.out_cons == 0  # not consumed until its reply is pushed
    release.set()
    tags = [HEADER.unpack_from(frontend.recv(0))[2] for _ in range(3)]
    assert tags == [0, 2, 4]
    assert HEADER.unpack_from(frontend.recv(1))[2] == 1
    assert most == {"per_ring": 1, "total": 2}
    assert ring0.out_cons == ring0.out_prod


def test_reply_waits_for_room_in_in(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    def big(request: bytes) -> bytes:
        _size, mtype, tag = HEADER.unpack_from(request)
        return msg(mtype + 1, tag, bytes([tag]) * 2993)  # 3000 bytes of a 4096-byte ring

    backend = make_backend(handler=big)
    frontend.connect(num_rings=1, order=1)
    ring = frontend.rings[0]
    frontend.send(0, msg(24, 1))
    frontend.send(0, msg(24, 2))
    assert wait_until(lambda: ring.intf.in_prod == 3000)
    assert wait_until(lambda: len(backend.requests) == 2)
    assert backend.wait_idle()  # no notification is still in flight
    assert ring.intf.in_prod == 3000  # the second reply does not fit yet
    assert ring.intf.out_cons == 7  # and its request is not consumed
    first = frontend.recv(0, notify=False)
    assert HEADER.unpack_from(first)[2] == 1
    time.sleep(0.15)
    assert ring.intf.in_prod == 3000  # room alone does not wake the backend
    frontend.evtchn.notify(ring.port)
    second = frontend.recv(0)
    assert HEADER.unpack_from(second)[2] == 2 and len(second) == 3000
    assert ring.intf.out_cons == 14


def test_notify_is_needed_for_requests(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend()
    frontend.connect(num_rings=1)
    assert backend.wait_idle()  # the event left pending by the bind is handled
    frontend.send(0, msg(24, 0), notify=False)
    time.sleep(0.15)
    assert backend.requests == []
    frontend.evtchn.notify(frontend.rings[0].port)
    assert frontend.recv(0) == rlerror(0, errno.EOPNOTSUPP)


def test_handler_may_return_anything(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    replies = iter([b"\xff" * 3, msg(99, 1234, b"junk"), None])

    def hostile(request: bytes) -> bytes | None:
        return next(replies)

    backend = make_backend(handler=hostile)
    frontend.connect(num_rings=1)
    frontend.send(0, msg(24, 0))
    ring = frontend.rings[0]
    assert wait_until(lambda: ring.intf.in_prod == 3)
    assert ring.in_ring.read(0, 3) == b"\xff" * 3
    ring.consumer.take(3)
    ring.consumer.publish()
    frontend.send(0, msg(24, 0))
    assert frontend.recv(0) == msg(99, 1234, b"junk")
    frontend.send(0, msg(24, 0))  # no reply at all, but the request is consumed
    assert wait_until(lambda: ring.intf.out_cons == 21)
    assert ring.intf.in_prod == 3 + 11
    assert backend.state == XenbusState.CONNECTED


def test_raw_ring_lets_tests_corrupt_indices(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend()
    frontend.connect(num_rings=1)
    raw = backend.raw_ring(0)
    raw.interface.in_prod = 0x12345678
    backend.notify_frontend(0)
    with pytest.raises(RingProtocolError):
        frontend.rings[0].consumer.available()
    with pytest.raises(LookupError):
        backend.raw_ring(1)


# ---------------------------------------------------------------------------
# Protocol errors send the backend to Closing


@pytest.mark.parametrize(
    "message",
    [
        HEADER.pack(3, 24, 0),  # size below the header
        HEADER.pack(0, 24, 0),
        HEADER.pack(4097, 24, 0) + b"\0" * 100,  # larger than the ring
        msg(24, 1),  # tag 1 belongs on ring 1
    ],
    ids=["size3", "size0", "too-big", "wrong-ring"],
)
def test_malformed_request_closes(
    xen: SimulatedXen,
    make_backend: Callable[..., Sim9pfsBackend],
    frontend: MiniFrontend,
    message: bytes,
) -> None:
    backend = make_backend()
    frontend.connect(num_rings=2, order=1)
    frontend.send(0, message)
    assert frontend.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
    assert backend.errors
    assert wait_until(lambda: xen.resources(BE).ports == 0)
    assert xen.resources(BE).mappings == 0
    frontend.send(0, msg(24, 0))  # ignored: the device is dead
    time.sleep(0.1)
    assert frontend.try_recv(0) is None
    frontend.close()
    frontend.wait_backend(XenbusState.CLOSED)


def test_handler_exception_and_oversized_reply_close(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    def bad(request: bytes) -> bytes:
        if HEADER.unpack_from(request)[1] == 24:
            raise MalformedRequestError("cannot decode")
        return b"\0" * 5000

    backend = make_backend(handler=bad)
    frontend.connect(num_rings=1)
    frontend.send(0, msg(24, 0))
    frontend.wait_backend(XenbusState.CLOSING)
    assert "cannot decode" in backend.errors[-1]
    frontend.close()
    frontend.wait_backend(XenbusState.CLOSED)
    # After Closed, a frontend back at Initialising gets a fresh InitWait.
    frontend.set_state(XenbusState.INITIALISING)
    frontend.wait_backend(XenbusState.INIT_WAIT)
    frontend.connect(num_rings=1)
    frontend.send(0, msg(26, 0))
    frontend.wait_backend(XenbusState.CLOSING)
    assert "cannot fit" in backend.errors[-1]


def test_partial_request_stalls_ring_like_qemu(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend()
    frontend.connect(num_rings=1)
    ring = frontend.rings[0]
    whole = msg(24, 0, b"z" * 20)
    ring.out_ring.write(0, whole)
    ring.intf.out_prod = 10  # header visible, body not
    frontend.evtchn.notify(ring.port)
    assert wait_until(lambda: backend.stalled_rings == (0,))
    ring.intf.out_prod = len(whole)
    frontend.evtchn.notify(ring.port)
    time.sleep(0.15)
    assert backend.requests == [] and ring.intf.in_prod == 0
    assert backend.warnings and backend.state == XenbusState.CONNECTED


def test_partial_request_waited_for_when_not_stalling(
    make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend(qemu_partial_stall=False)
    frontend.connect(num_rings=1)
    ring = frontend.rings[0]
    whole = msg(24, 0, b"z" * 20)
    ring.out_ring.write(0, whole)
    ring.intf.out_prod = 10
    frontend.evtchn.notify(ring.port)
    time.sleep(0.1)
    assert backend.requests == []
    ring.intf.out_prod = len(whole)
    frontend.evtchn.notify(ring.port)
    ring.producer.prod = len(whole)
    assert frontend.recv(0) == rlerror(0, errno.EOPNOTSUPP)
    assert backend.stalled_rings == ()


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"num-rings": "0"}, "num-rings"),
        ({"num-rings": "9"}, "num-rings"),
        ({"num-rings": "1x"}, "num-rings"),
        ({"num-rings": " 1"}, "num-rings"),
        ({"version": "2"}, "version"),
        ({"ring-ref0": "999999"}, "no grant reference"),
        ({"event-channel-0": "77"}, "no port"),
        ({"event-channel-0": "-1"}, "event-channel-0"),
    ],
)
def test_connect_rejects_bad_keys(
    xen: SimulatedXen,
    make_backend: Callable[..., Sim9pfsBackend],
    frontend: MiniFrontend,
    extra: dict[str, str],
    reason: str,
) -> None:
    backend = make_backend()
    frontend.setup(num_rings=1, order=1, extra=extra)
    frontend.set_state(XenbusState.INITIALISED)
    frontend.wait_backend(XenbusState.CLOSING)
    assert reason in backend.errors[-1]
    resources = xen.resources(BE)
    assert (resources.mappings, resources.ports) == (0, 0)


def test_connect_rejects_missing_key_and_bad_order(
    xen: SimulatedXen, make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend(max_ring_page_order=4)
    frontend.setup(num_rings=1, order=5)
    frontend.set_state(XenbusState.INITIALISED)
    frontend.wait_backend(XenbusState.CLOSING)
    assert "ring_order 5" in backend.errors[-1]
    assert xen.resources(BE).mappings == 0

    frontend.close()
    frontend.wait_backend(XenbusState.CLOSED)
    frontend.set_state(XenbusState.INITIALISING)
    frontend.setup(num_rings=1, order=1)
    frontend.store.rm(f"{frontend.path}/ring-ref0")
    frontend.set_state(XenbusState.INITIALISED)
    frontend.wait_backend(XenbusState.CLOSING)
    assert "ring-ref0 is missing" in backend.errors[-1]


def test_injected_map_failure_fails_connect_cleanly(
    xen: SimulatedXen, make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend()
    fault = xen.inject_failure("map_grant_refs", errno.ENOMEM, domid=BE, after=2)
    frontend.setup(num_rings=2)
    frontend.set_state(XenbusState.INITIALISED)
    frontend.wait_backend(XenbusState.CLOSING)
    assert fault.fired and "Cannot allocate memory" in backend.errors[-1]
    assert xen.resources(BE).mappings == 0 and xen.resources(BE).ports == 0


# ---------------------------------------------------------------------------
# Teardown


def test_orderly_teardown_leaves_nothing(
    xen: SimulatedXen, make_backend: Callable[..., Sim9pfsBackend]
) -> None:
    backend = make_backend(handler=echo_handler)
    fe = MiniFrontend(xen)
    fe.connect(num_rings=4, order=2)
    for tag in range(8):
        fe.send(tag % 4, msg(24, tag, b"q" * tag))
    for tag in range(8):
        assert fe.recv(tag % 4) == msg(25, tag, b"q" * tag)
    counts = xen.resources(BE)
    assert (counts.mappings, counts.mapped_pages, counts.ports) == (8, 4 * (1 + 4), 4)
    fe.set_state(XenbusState.CLOSING)
    assert fe.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
    counts = xen.resources(BE)
    assert (counts.mappings, counts.ports) == (0, 0)
    fe.free()
    fe.set_state(XenbusState.CLOSED)
    fe.wait_backend(XenbusState.CLOSED)
    assert xen.resources(FE).deferred_grants == 0
    fe.shutdown()
    xen.assert_no_leaks(FE)
    backend.stop()
    assert xen.tree.read(0, f"{backend.backend_path}/state") == b"6"
    xen.assert_no_leaks()


def test_reconnect_after_close(
    xen: SimulatedXen, make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend()
    for _ in range(3):
        frontend.connect(num_rings=1)
        frontend.send(0, msg(24, 0))
        assert frontend.recv(0) == rlerror(0, errno.EOPNOTSUPP)
        frontend.close()
        frontend.wait_backend(XenbusState.CLOSED)
        frontend.set_state(XenbusState.INITIALISING)
    assert backend.connections == 3
    assert frontend.wait_backend(XenbusState.INIT_WAIT)
    assert xen.resources(FE).grants == 0


def test_stop_while_connected_releases_everything(
    xen: SimulatedXen, frontend: MiniFrontend
) -> None:
    backend = Sim9pfsBackend(xen.domain(BE), FE)
    with backend:
        frontend.connect(num_rings=2)
        assert xen.resources(BE).mappings == 4
    assert backend.state == XenbusState.CLOSED
    assert frontend.backend_state() == XenbusState.CLOSED
    xen.assert_no_leaks(BE)
    # The frontend unshared while nothing maps its pages any more: no deferral.
    frontend.free()
    assert xen.resources(FE).deferred_grants == 0


def test_frontend_freeing_early_defers_its_grants(
    xen: SimulatedXen, make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    """A frontend that unshares before the backend unmapped leaks deferred grants
    until the backend lets go (the Linux 2025 bug)."""
    make_backend()
    frontend.connect(num_rings=1, order=1)
    for ring in frontend.rings:
        ring.release()
    assert xen.resources(FE).deferred_grants == 1 + 2
    frontend.set_state(XenbusState.CLOSING)
    frontend.wait_backend(XenbusState.CLOSING)
    assert wait_until(lambda: xen.resources(FE).deferred_grants == 0)
    for ring in frontend.rings:
        frontend.evtchn.unbind(ring.port)
    frontend.rings = []


def test_frontend_directory_removed_counts_as_closed(
    xen: SimulatedXen, make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend
) -> None:
    backend = make_backend()
    frontend.connect(num_rings=1)
    xen.tree.rm(0, frontend.path)
    assert backend.wait_for_state(XenbusState.CLOSED)
    assert xen.resources(BE).mappings == 0


def test_force_state(make_backend: Callable[..., Sim9pfsBackend], frontend: MiniFrontend) -> None:
    backend = make_backend()
    backend.force_state(XenbusState.CONNECTED)
    assert frontend.backend_state() == XenbusState.CONNECTED
    backend.force_state(77)
    assert frontend.backend_state() == 77
