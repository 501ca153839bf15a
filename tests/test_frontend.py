"""The 9pfs frontend against the simulated QEMU-like backend."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from pathlib import Path

import pytest
from frontend_helpers import FE_DOMID, TREAD, echo, frame, machine, tversion

import pyxen9p
from pyxen9p.errors import (
    BackendError,
    FramingError,
    ProtocolError,
    RingProtocolError,
    TransportClosedError,
)
from pyxen9p.frontend import (
    DeviceBusyError,
    DeviceNotFoundError,
    Frontend,
    ReconnectRefusedError,
)
from pyxen9p.interfaces import Permission, PermissionFlag
from pyxen9p.p9.server import FileServer
from pyxen9p.ring import HEADER, ring_size
from pyxen9p.sim.platform import SimulatedXen
from pyxen9p.xenbus import XenbusState

FE_PATH = f"/local/domain/{FE_DOMID}/device/9pfs/0"


def test_connect_negotiates_and_exchanges_messages() -> None:
    with machine() as m:
        with m.connect() as fe:
            assert fe.path == FE_PATH
            assert fe.backend_id == 0
            assert fe.tag == "share"
            assert fe.backend_versions == {1}
            assert (fe.backend_max_rings, fe.backend_max_ring_order) == (8, 9)
            assert (fe.num_rings, fe.ring_order) == (2, 8)
            assert fe.msize == ring_size(8) // 2
            store = m.dom0.open_xenstore()
            assert store.read(f"{FE_PATH}/state") == b"4"
            assert store.read(f"{FE_PATH}/version") == b"1"
            assert store.read(f"{FE_PATH}/num-rings") == b"2"
            for n in range(2):
                assert int(store.read(f"{FE_PATH}/ring-ref{n}")) >= 0
                assert int(store.read(f"{FE_PATH}/event-channel-{n}")) > 0
            store.close()
            reply = fe.request(tversion(), timeout=5)
            assert reply == echo(tversion())
            big = frame(TREAD, 3, bytes(range(256)) * ((fe.msize - 7) // 256))
            assert fe.request(big, timeout=5) == echo(big)
        assert m.backend.wait_for_state(XenbusState.CLOSED, timeout=5)
        m.assert_clean()


@pytest.mark.parametrize("how", ["devid", "tag", "path"])
def test_device_lookup(how: str) -> None:
    with machine() as m:
        kwargs = {"devid": {"devid": 0}, "tag": {"tag": "share"}, "path": {"path": FE_PATH}}[how]
        with Frontend.connect(platform=m.guest, timeout=5, **kwargs) as fe:  # type: ignore[arg-type]
            assert fe.path == FE_PATH
        m.assert_clean()


def test_device_outside_device_directory() -> None:
    path = f"/local/domain/{FE_DOMID}/data/9p-test"
    with machine(frontend_path=path) as m:
        with Frontend.connect(platform=m.guest, path=path, timeout=5) as fe:
            assert fe.request(tversion(), timeout=5) == echo(tversion())
        m.assert_clean()


def test_missing_devices_are_reported() -> None:
    with machine() as m:
        with pytest.raises(DeviceNotFoundError, match="no 9pfs device 3"):
            m.connect(devid=3)
        with pytest.raises(DeviceNotFoundError, match="tag 'nope'"):
            Frontend.connect(platform=m.guest, tag="nope", timeout=5)
        with pytest.raises(DeviceNotFoundError):
            Frontend.connect(platform=m.guest, path="/local/domain/7/none", timeout=5)
        with pytest.raises(ValueError, match="exactly one"):
            Frontend.connect(platform=m.guest, devid=0, tag="share")
        m.assert_clean()


def test_a_device_driven_by_another_frontend_is_refused() -> None:
    with machine() as m:
        with m.connect(), pytest.raises(DeviceBusyError, match="CONNECTED"):
            m.connect()
        # after a clean close the device can be taken again (if asked for)
        with m.connect(allow_reconnect=True) as fe:
            assert fe.request(tversion(), timeout=5)
        m.assert_clean()


def test_a_served_device_is_not_connected_again_unless_asked(tmp_path: Path) -> None:
    """After a connection ended the backend is Closed and the rings stay named:
    QEMU 7.2 would abort on a second connection, so it is refused before the
    frontend's state is touched; ``allow_reconnect=True`` connects."""
    (tmp_path / "f.txt").write_bytes(b"still here\n")
    with machine(handler=FileServer(tmp_path).handle) as m:
        with pyxen9p.connect(platform=m.guest, devid=0, timeout=5) as fs:
            assert fs.read_bytes("f.txt") == b"still here\n"
        store = m.guest.open_xenstore()
        try:
            fe_path = FE_PATH
            be_state = store.read(f"{fe_path}/backend").decode() + "/state"
            for attempt in (
                lambda: m.connect(),
                lambda: pyxen9p.connect(platform=m.guest, devid=0, timeout=5),
            ):
                with pytest.raises(ReconnectRefusedError) as info:
                    attempt()
                assert isinstance(info.value, OSError)
                assert info.value.errno == errno.ECONNREFUSED
                text = str(info.value)
                assert f"{be_state} is CLOSED" in text and "allow_reconnect=True" in text
                assert store.read(f"{fe_path}/state") == b"6"  # untouched
                assert store.read(be_state) == b"6"
                assert m.backend.connections == 1
        finally:
            store.close()
        m.assert_clean()
        with pyxen9p.connect(platform=m.guest, devid=0, timeout=5, allow_reconnect=True) as fs:
            assert fs.read_bytes("f.txt") == b"still here\n"
        assert m.backend.connections == 2
        m.assert_clean()


def test_reconnect_after_close_many_times() -> None:
    """The simulated backend can serve a device again (QEMU 7.2 cannot)."""
    with machine() as m:
        for _ in range(3):
            with m.connect(allow_reconnect=True) as fe:
                assert fe.request(tversion(), timeout=5) == echo(tversion())
        assert m.backend.connections == 3
        m.assert_clean()


def test_caller_chosen_layout_is_capped_by_the_backend() -> None:
    with machine(max_rings=3, max_ring_page_order=4) as m:
        with m.connect(rings=8, ring_order=9) as fe:
            assert (fe.num_rings, fe.ring_order) == (3, 4)
            assert m.backend.num_rings == 3
            for tag in range(12):
                fe.request(frame(TREAD, tag, b"x"), timeout=5)
        rings = {(ring, tag) for ring, _type, tag in m.backend.requests}
        assert all(ring == tag % 3 for ring, tag in rings)
        assert {ring for ring, _ in rings} == {0, 1, 2}
        m.assert_clean()


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("versions", "2", "not 1"),
        ("versions", "1x", "versions"),
        ("versions", "", "versions"),
        ("versions", "1,,2", "versions"),
        ("max-rings", "0", "max-rings"),
        ("max-rings", "-1", "max-rings"),
        ("max-rings", "two", "max-rings"),
        ("max-ring-page-order", "0", "max-ring-page-order"),
        ("max-ring-page-order", "1", "msize"),
        ("max-ring-page-order", "9 ", "max-ring-page-order"),
        ("max-ring-page-order", "99999999999", "max-ring-page-order"),
    ],
)
def test_malformed_backend_features_are_refused(key: str, value: str, message: str) -> None:
    with machine(advertise={key: value}) as m:
        with pytest.raises(BackendError, match=message):
            m.connect()
        m.assert_clean()
        store = m.dom0.open_xenstore()
        assert store.read(f"{FE_PATH}/state") == b"6"  # Closed: the claim is undone
        store.close()


@pytest.mark.parametrize("key", ["versions", "max-rings", "max-ring-page-order"])
def test_missing_backend_features_are_errors(key: str) -> None:
    with machine() as m:
        assert m.backend.wait_for_state(XenbusState.INIT_WAIT, timeout=5)
        store = m.dom0.open_xenstore()
        store.rm(f"{m.backend.backend_path}/{key}")
        store.close()
        with pytest.raises(BackendError, match=f"{key}: missing"):
            m.connect()
        m.assert_clean()


def test_a_backend_that_never_reaches_initwait_times_out() -> None:
    """Toolstack nodes exist but no backend ever runs: a bounded, clear error."""
    xen = SimulatedXen()
    guest = xen.create_domain(FE_DOMID)
    store = xen.domain(0).open_xenstore()
    be = f"/local/domain/0/backend/9pfs/{FE_DOMID}/0"
    for path, value in [
        (f"{FE_PATH}/backend", be),
        (f"{FE_PATH}/backend-id", "0"),
        (f"{FE_PATH}/state", "1"),
        (f"{be}/state", "1"),
    ]:
        store.write(path, value)
    store.set_permissions(FE_PATH, [Permission(FE_DOMID, PermissionFlag.NONE)])
    store.set_permissions(be, [Permission(0, PermissionFlag.READ)])
    store.set_permissions(f"{be}/state", [Permission(0, PermissionFlag.READ)])
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"INIT_WAIT.*INITIALISING"):
        Frontend.connect(platform=guest, devid=0, timeout=0.5)
    assert time.monotonic() - start < 3
    assert xen.resources(FE_DOMID).clean
    assert store.read(f"{FE_PATH}/state") == b"6"
    store.close()
    xen.close()


def test_many_threads_each_get_their_own_reply() -> None:
    with machine() as m, m.connect(rings=4, ring_order=4) as fe:
        errors: list[BaseException] = []
        tags = iter(range(0xFFFF))
        lock = threading.Lock()

        def worker(n: int) -> None:
            try:
                for i in range(40):
                    with lock:
                        tag = next(tags)
                    body = f"thread {n} request {i} ".encode() * (1 + (i * 37 + n) % 50)
                    request = frame(TREAD, tag, body)
                    assert fe.request(request, timeout=10) == echo(request)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert len(m.backend.requests) == 16 * 40
        assert fe.outstanding_tags() == set()


def test_messages_larger_than_free_space_wait_for_room() -> None:
    """Requests bigger than half the ring, sent back to back, wait for room."""
    with machine() as m, m.connect(rings=1, ring_order=2) as fe:
        big = fe.msize - 7
        futures = [fe.submit(frame(TREAD, t, bytes([t]) * big), timeout=10) for t in range(6)]
        for t, fut in enumerate(futures):
            assert fut.result(10) == frame(TREAD + 1, t, bytes([t]) * big)


def test_request_async() -> None:
    async def main(fe: Frontend) -> list[bytes]:
        msgs = [frame(TREAD, t, b"async %d" % t) for t in range(20)]
        return await asyncio.gather(*(fe.request_async(x, timeout=5) for x in msgs))

    with machine() as m, m.connect() as fe:
        replies = asyncio.run(main(fe))
        assert replies == [echo(frame(TREAD, t, b"async %d" % t)) for t in range(20)]


def test_bad_requests_are_refused_before_sending() -> None:
    with machine() as m, m.connect() as fe:
        with pytest.raises(ValueError, match="header says"):
            fe.submit(HEADER.pack(20, TREAD, 1) + b"abc")
        with pytest.raises(ValueError, match="at least 7"):
            fe.submit(b"abc")
        with pytest.raises(ValueError, match="msize"):
            fe.submit(frame(TREAD, 1, bytes(fe.msize)))
        assert m.backend.requests == []


def test_a_tag_in_flight_cannot_be_reused_until_answered_or_flushed() -> None:
    release = threading.Event()

    def slow(request: bytes) -> bytes:
        release.wait(5)
        return echo(request)

    with machine(handler=slow) as m, m.connect() as fe:
        first = fe.submit(frame(TREAD, 5, b"a"))
        with pytest.raises(ValueError, match="tag 5 is already in flight"):
            fe.submit(frame(TREAD, 5, b"b"))
        with pytest.raises(TimeoutError):
            fe.request(frame(TREAD, 7, b"c"), timeout=0.2)
        assert fe.outstanding_tags() == {5, 7}  # the timed-out tag stays reserved
        release.set()
        assert first.result(5) == echo(frame(TREAD, 5, b"a"))
        deadline = time.monotonic() + 5
        while fe.outstanding_tags() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fe.outstanding_tags() == set()  # the late reply freed tag 7
        fe.flushed(9)  # unknown tags are ignored
        assert fe.request(frame(TREAD, 7, b"d"), timeout=5) == echo(frame(TREAD, 7, b"d"))


def test_flushed_releases_a_tag_whose_reply_never_comes() -> None:
    def swallow(request: bytes) -> bytes:
        return b""  # consumed, never answered (as after a Tflush)

    with machine(handler=swallow) as m, m.connect() as fe:
        fut = fe.submit(frame(TREAD, 3, b"x"))
        assert fe.outstanding_tags() == {3}
        fe.flushed(3)
        with pytest.raises(InterruptedError):
            fut.result(1)
        assert fe.outstanding_tags() == set()


def test_close_wakes_every_waiter_and_releases_everything() -> None:
    def swallow(request: bytes) -> bytes:
        return b""

    with machine(handler=swallow) as m:
        fe = m.connect()
        futures = [fe.submit(frame(TREAD, t, b"x")) for t in range(5)]
        outcomes: list[BaseException] = []

        def waiter() -> None:
            try:
                fe.request(frame(TREAD, 99, b"y"), timeout=None)
            except BaseException as exc:
                outcomes.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.1)
        fe.close()
        t.join(5)
        assert not t.is_alive()
        assert len(outcomes) == 1 and isinstance(outcomes[0], TransportClosedError)
        for fut in futures:
            with pytest.raises(TransportClosedError):
                fut.result(1)
        with pytest.raises(TransportClosedError):
            fe.request(tversion(), timeout=1)
        fe.close()  # idempotent
        assert m.backend.wait_for_state(XenbusState.CLOSED, timeout=5)
        m.assert_clean()
        store = m.dom0.open_xenstore()
        assert store.read(f"{FE_PATH}/state") == b"6"
        store.close()


@pytest.mark.parametrize("state", [XenbusState.CLOSING, XenbusState.CLOSED, None])
def test_a_backend_leaving_connected_fails_pending_and_future_requests(
    state: XenbusState | None,
) -> None:
    def swallow(request: bytes) -> bytes:
        return b""

    with machine(handler=swallow) as m:
        fe = m.connect()
        fut = fe.submit(frame(TREAD, 1, b"x"))
        if state is None:
            store = m.dom0.open_xenstore()
            store.rm(f"{m.backend.backend_path}/state")
            store.close()
        else:
            m.backend.force_state(state)
        with pytest.raises(TransportClosedError, match="left Connected"):
            fut.result(5)
        with pytest.raises(TransportClosedError, match="left Connected"):
            fe.request(tversion(), timeout=1)
        assert not fe.connected
        fe.close()
        # a backend that claims Closed while it still maps the rings keeps the
        # pages until it unmaps (the grants are released late, never leaked)
        m.backend.stop()
        m.assert_clean()


def test_state_flip_to_closing_during_negotiation() -> None:
    with machine(advertise={}) as m:
        assert m.backend.wait_for_state(XenbusState.INIT_WAIT, timeout=5)
        # a backend that fails the connection goes to Closing: the waiting frontend
        # must stop at once with a clear error
        m.xen.inject_failure("map_grant_refs", errno.ENOMEM, domid=0)
        start = time.monotonic()
        with pytest.raises((TransportClosedError, TimeoutError)):
            m.connect(timeout=3)
        assert time.monotonic() - start < 3.5
        m.assert_clean()


@pytest.mark.parametrize(
    "operation", ["share_pages", "bind_unbound_port", "xenstore_write", "notify"]
)
def test_failures_of_the_platform_leave_nothing_behind(operation: str) -> None:
    for after in range(4):
        with machine() as m:
            fault = m.xen.inject_failure(operation, errno.ENOMEM, domid=FE_DOMID, after=after)
            try:
                with m.connect() as fe:
                    fe.request(tversion(), timeout=5)
            except OSError as exc:
                assert fault.fired
                assert exc.errno == errno.ENOMEM or isinstance(exc, TransportClosedError)
            m.assert_clean()


def test_unknown_tags_and_wrong_types_from_the_backend() -> None:
    def hostile(request: bytes) -> bytes:
        size, mtype, tag = HEADER.unpack_from(request)
        body = request[7:size]
        if body == b"unknown":
            # a reply for a tag nobody waits for, then the real one
            return frame(mtype + 1, tag + 2, b"junk") + echo(request)
        if body == b"wrongtype":
            return frame(mtype + 3, tag, b"")
        if body == b"dup":
            return echo(request) + echo(request)
        if body == b"rlerror":
            return frame(7, tag, b"\x02\x00\x00\x00")
        return echo(request)

    with machine(handler=hostile) as m, m.connect(rings=1) as fe:
        assert fe.request(frame(TREAD, 1, b"unknown"), timeout=5) == echo(
            frame(TREAD, 1, b"unknown")
        )
        assert fe.dropped_replies == 1
        with pytest.raises(ProtocolError, match="type 119") as wrong:
            fe.request(frame(TREAD, 2, b"wrongtype"), timeout=5)
        assert wrong.value.errno == errno.EPROTO  # as over a stream transport
        assert fe.request(frame(TREAD, 4, b"dup"), timeout=5) == echo(frame(TREAD, 4, b"dup"))
        assert fe.request(frame(TREAD, 5, b"rlerror"), timeout=5) == frame(7, 5, b"\x02\0\0\0")
        # the duplicate was dropped, the connection still works
        assert fe.request(frame(TREAD, 4, b"again"), timeout=5) == echo(frame(TREAD, 4, b"again"))
        assert fe.dropped_replies == 2
        assert fe.connected


@pytest.mark.parametrize(
    "reply,match,code",
    [
        (HEADER.pack(3, 117, 1), "announces 3 bytes", errno.EPROTO),
        (HEADER.pack(0, 117, 1), "announces 0 bytes", errno.EPROTO),
        (HEADER.pack(1 << 30, 117, 1), "announces", errno.EMSGSIZE),
    ],
)
def test_impossible_reply_sizes_fail_the_connection(reply: bytes, match: str, code: int) -> None:
    """The same FramingError, with the same errno, as a stream transport raises."""
    with machine(handler=lambda request: reply) as m, m.connect() as fe:
        with pytest.raises(FramingError, match=match) as info:
            fe.request(frame(TREAD, 1, b"x"), timeout=5)
        assert info.value.errno == code
        with pytest.raises(FramingError):
            fe.request(frame(TREAD, 2, b"x"), timeout=1)
    m.assert_clean()


def test_a_partial_reply_is_not_consumed_until_whole() -> None:
    with machine(handler=lambda request: b"") as m, m.connect(rings=1) as fe:
        fut = fe.submit(frame(TREAD, 1, b"x"))
        time.sleep(0.1)
        raw = m.backend.raw_ring(0)
        whole = frame(TREAD + 1, 1, b"0123456789")
        start = raw.interface.in_prod
        raw.in_ring.write(start, whole[:9])
        raw.interface.in_prod = start + 9
        m.backend.notify_frontend(0)
        time.sleep(0.2)
        assert not fut.done()
        assert raw.interface.in_cons == start  # nothing consumed
        raw.in_ring.write(start + 9, whole[9:])
        raw.interface.in_prod = start + len(whole)
        m.backend.notify_frontend(0)
        assert fut.result(5) == whole
        assert raw.interface.in_cons == start + len(whole)


def test_indices_beyond_the_ring_fail_the_connection() -> None:
    with machine(handler=lambda request: b"") as m, m.connect(rings=1) as fe:
        fut = fe.submit(frame(TREAD, 1, b"x"))
        raw = m.backend.raw_ring(0)
        raw.interface.in_prod = raw.interface.in_cons + raw.size + 1
        m.backend.notify_frontend(0)
        with pytest.raises(RingProtocolError, match="out of range"):
            fut.result(5)
    m.assert_clean()


def test_the_frontend_never_reads_back_what_it_owns() -> None:
    """Corrupting in_cons, ring_order and ref[] in the shared page changes
    neither the frontend's reading of replies nor what it releases at close."""
    with machine() as m, m.connect(rings=1) as fe:
        order, msize = fe.ring_order, fe.msize
        assert fe.request(frame(TREAD, 1, b"a"), timeout=5)
        raw = m.backend.raw_ring(0)
        for tag in range(2, 40):
            # before each request the backend scribbles over frontend-owned fields
            raw.interface.ring_order = tag % 3
            raw.interface.set_refs([0xDEAD] * 8)
            raw.interface.in_cons = raw.interface.in_cons - 1  # re-reading it would misparse
            request = frame(TREAD, tag, bytes([tag]) * 100)
            assert fe.request(request, timeout=5) == echo(request)
        assert (fe.ring_order, fe.msize) == (order, msize)
    # the pages shared are the ones unshared, whatever ref[] says now
    m.assert_clean()


def test_gntalloc_limit_is_shared_by_the_domains_connections() -> None:
    """gntalloc's limit (1024) counts every grant of the domain: a second
    default connection (514 grants each) is refused with a clear error and
    leaves nothing behind; two connections with ``grant_limit=512`` fit."""
    from pyxen9p.sim.backend import Sim9pfsBackend

    with machine() as m:
        second = Sim9pfsBackend(m.dom0, FE_DOMID, devid=1, handler=echo)
        second.start()
        try:
            with m.connect() as first:
                assert (first.num_rings, first.ring_order) == (2, 8)
                with pytest.raises(OSError, match="gntalloc limit"):
                    m.connect(devid=1)
                assert m.xen.resources(FE_DOMID).grants == 2 * 257
            m.assert_clean()
            # the refused frontend wrote Closed; the backend followed it
            assert second.wait_for_state(XenbusState.CLOSED)
            # device 0 served "first" already (the simulated backend reconnects);
            # device 1's frontend gave up before publishing rings: not a reconnect
            with (
                m.connect(grant_limit=512, allow_reconnect=True) as a,
                m.connect(devid=1, grant_limit=512) as b,
            ):
                assert (a.num_rings, a.ring_order) == (b.num_rings, b.ring_order) == (2, 7)
                assert a.request(tversion()) == b.request(tversion())
        finally:
            second.stop()
        m.assert_clean()


def test_result_all_waits_for_a_window_while_replies_keep_coming() -> None:
    # each reply takes 0.15 s, one after another on one ring: 0.6 s for the
    # four, more than the timeout, but never a whole timeout without one
    def slow(request: bytes) -> bytes:
        time.sleep(0.15)
        return echo(request)

    with machine(handler=slow) as m, m.connect() as fe:
        tags = [fe.num_rings * k for k in range(4)]  # all on ring 0
        futures = fe.submit_many([frame(TREAD, t, b"w") for t in tags], lazy=True)
        began = time.monotonic()
        assert fe.result_all(futures, timeout=0.4) is True
        assert time.monotonic() - began >= 0.5
        assert [f.result(0) for f in futures] == [echo(frame(TREAD, t, b"w")) for t in tags]
        assert fe.outstanding_tags() == set()
        assert fe.result_all([], timeout=0.1) is True
        assert fe.result_all(futures, timeout=0) is True  # all done: no wait


def test_result_all_gives_up_after_a_timeout_with_no_reply() -> None:
    # the second request of the ring is never answered: the first is done,
    # the wait ends a timeout later, the rest stay in flight (abandoned)
    def answer_first(request: bytes) -> bytes:
        _size, _mtype, tag = HEADER.unpack_from(request)
        return echo(request) if tag == 0 else b""

    with machine(handler=answer_first) as m, m.connect() as fe:
        tags = [fe.num_rings * k for k in range(3)]
        futures = fe.submit_many([frame(TREAD, t, b"x") for t in tags], lazy=True)
        began = time.monotonic()
        assert fe.result_all(futures, timeout=0.3) is False
        waited = time.monotonic() - began
        assert 0.25 <= waited < 2.0
        assert futures[0].result(0) == echo(frame(TREAD, 0, b"x"))
        assert not futures[1].done() and not futures[2].done()
        assert fe.outstanding_tags() == set(tags[1:])  # the tags stay reserved
        for tag in tags[1:]:
            fe.flushed(tag)
        assert fe.outstanding_tags() == set()


def test_result_all_from_a_reply_callback_is_refused() -> None:
    def swallow_two(request: bytes) -> bytes:
        _size, _mtype, tag = HEADER.unpack_from(request)
        if tag == 1:
            time.sleep(0.2)  # the callback is added before the reply comes
        return b"" if tag == 2 else echo(request)

    with machine(handler=swallow_two) as m, m.connect() as fe:
        errors: list[BaseException] = []
        never = fe.submit(frame(TREAD, 2, b"z"))

        def callback(_f: object) -> None:
            # run by the thread that delivers replies: it would wait forever
            try:
                fe.result_all([never], timeout=1)
            except BaseException as exc:  # recorded, asserted below
                errors.append(exc)

        first = fe.submit(frame(TREAD, 1, b"y"))
        first.add_done_callback(callback)
        assert fe.result(first, timeout=5) == echo(frame(TREAD, 1, b"y"))
        deadline = time.monotonic() + 5
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
        fe.flushed(2)
