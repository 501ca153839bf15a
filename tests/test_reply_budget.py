"""The frontend's reply budget: replies never fill a ring's ``in`` half exactly.

QEMU computes the room for a reply from the two ``in`` indices masked to
the ring, so an exactly full ring looks empty and the next reply is written
over the unread ones (seen on QEMU 7.2 in the real-Xen tier: two replies of
msize unread on a ring of 2 x msize, then a third, and the frontend saw
``prod - cons`` beyond the ring).  The simulated backend's
``qemu_full_ring=True`` does the same, so these tests fail if the frontend
lets the replies it may get add up to the ring's size.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest
from frontend_helpers import TREAD, Machine, frame, machine

from pyxen9p._requests import reply_bound
from pyxen9p.frontend import Frontend
from pyxen9p.ring import HEADER

TCLUNK = 120

_TREAD_BODY = struct.Struct("<IQI")  # fid, offset, count
_RREAD = 117


def full_reads(request: bytes) -> bytes:
    """Answer a Tread with every byte it asks for (the byte is the tag's);
    anything else with an empty reply of type + 1."""
    _size, mtype, tag = HEADER.unpack_from(request)
    if mtype != TREAD:
        return frame(mtype + 1, tag)
    (count,) = struct.unpack_from("<I", request, 19)
    return frame(_RREAD, tag, struct.pack("<I", count) + bytes([tag & 0xFF]) * count)


def tread(tag: int, count: int) -> bytes:
    return frame(TREAD, tag, _TREAD_BODY.pack(1, 0, count))


@pytest.fixture
def qemu_like() -> Iterator[Machine]:
    with machine(full_reads, qemu_full_ring=True) as m:
        yield m


def overruns(m: Machine) -> list[str]:
    return [w for w in m.backend.warnings if "written over unread replies" in w]


def check_reply(reply: bytes, tag: int, count: int) -> None:
    size, mtype, rtag = HEADER.unpack_from(reply)
    assert (size, mtype, rtag) == (11 + count, _RREAD, tag)
    assert reply[11:] == bytes([tag & 0xFF]) * count


def test_the_simulated_backend_overruns_an_exactly_full_ring_as_qemu_does() -> None:
    """The premise: without a budget, replies that fill ``in`` exactly are
    overrun.  Written straight on the ring (no frontend): two replies of
    half a ring, unread, then a third."""
    with machine(full_reads, qemu_full_ring=True) as m:
        fe = m.connect(rings=1, ring_order=2)
        try:
            ring = fe._rings[0]
            producer = ring.producer
            assert producer is not None
            count = fe.msize - 11  # a reply of msize: two fill the ring
            # the receiving role held here: nothing reads a reply meanwhile
            assert fe._rx_lock.acquire(timeout=5)
            try:
                for tag in range(3):
                    assert producer.put(tread(tag, count))
                fe._notify(ring)
                deadline = 50
                while not overruns(m) and deadline:
                    m.backend.wait_idle(0.1)
                    deadline -= 1
                assert overruns(m), m.backend.warnings
            finally:
                fe._rx_lock.release()
        finally:
            fe.close()
        m.assert_clean()


@pytest.mark.parametrize("how", ["batch", "one_by_one"])
def test_replies_never_fill_the_in_ring_exactly(qemu_like: Machine, how: str) -> None:
    """Four Treads whose replies are msize each, on one ring of 2 x msize,
    none received until all are sent (lazy): the third and fourth wait
    until replies are read, every reply arrives intact."""
    fe = qemu_like.connect(rings=1, ring_order=2)
    try:
        count = fe.msize - 11
        messages = [tread(tag, count) for tag in range(4)]
        if how == "batch":
            futures = fe.submit_many(messages, timeout=5, lazy=True)
        else:
            futures = [fe.submit(message, timeout=5, lazy=True) for message in messages]
        for tag, future in enumerate(futures):
            check_reply(future.result(timeout=5), tag, count)
        assert not overruns(qemu_like)
        assert fe._failure is None
        ring = fe._rings[0]
        assert ring.reply_room() == ring.reply_limit  # every bound handed back
    finally:
        fe.close()
    qemu_like.assert_clean()


def test_a_window_over_two_rings_keeps_each_ring_within_its_budget(qemu_like: Machine) -> None:
    """A window dealt out to two rings in one put (the multi-ring batch
    path): each ring's share stops at its budget, the rest goes one by one."""
    fe = qemu_like.connect(rings=2, ring_order=2)
    try:
        count = fe.msize - 11
        futures = fe.submit_many([tread(tag, count) for tag in range(8)], timeout=5, lazy=True)
        for tag, future in enumerate(futures):
            check_reply(future.result(timeout=5), tag, count)
        assert not overruns(qemu_like)
        for ring in fe._rings:
            assert ring.reply_room() == ring.reply_limit
    finally:
        fe.close()
    qemu_like.assert_clean()


def test_many_threads_reading_full_replies_on_one_ring(qemu_like: Machine) -> None:
    """Eight threads, each 20 Treads of msize replies on one small ring:
    senders wait for the budget, none forever, and nothing is overrun."""
    fe = qemu_like.connect(rings=1, ring_order=2)
    errors: list[BaseException] = []
    try:
        count = fe.msize - 11

        def work(first: int) -> None:
            try:
                for i in range(20):
                    tag = first + i
                    check_reply(fe.request(tread(tag, count), timeout=10), tag, count)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(100 * n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
        assert not errors, errors
        assert not overruns(qemu_like)
    finally:
        fe.close()
    qemu_like.assert_clean()


def test_a_flushed_request_hands_its_budget_back() -> None:
    """A request the server never answers, then flushed (Rflush came): its
    bound is free again, or the ring would lose that room for good."""
    answered = threading.Event()

    def silent(request: bytes) -> bytes:
        answered.set()
        return b""  # no reply

    with machine(silent) as m:
        fe = m.connect(rings=1, ring_order=2)
        try:
            ring = fe._rings[0]
            future = fe.submit(tread(5, fe.msize - 11), timeout=5, lazy=True)
            assert answered.wait(5)
            assert ring.reply_room() == ring.reply_limit - fe.msize
            fe.flushed(5)
            assert ring.reply_room() == ring.reply_limit
            with pytest.raises(InterruptedError):
                future.result(timeout=1)
        finally:
            fe.close()
        m.assert_clean()


def test_reply_bound() -> None:
    msize = 8192

    def views(message: bytes, split: int | None = None) -> list[memoryview]:
        if split is None:
            return [memoryview(message)]
        return [memoryview(message[:split]), memoryview(message[split:])]

    read = tread(1, 1000)
    assert reply_bound(views(read), TREAD, msize) == 1011
    assert reply_bound(views(read, 20), TREAD, msize) == 1011  # count across pieces
    assert reply_bound(views(tread(1, 5)), TREAD, msize) == 512  # room for an error
    assert reply_bound(views(tread(1, 1 << 30)), TREAD, msize) == msize  # never above
    treaddir = frame(40, 2, _TREAD_BODY.pack(1, 0, 4000))
    assert reply_bound(views(treaddir), 40, msize) == 4011
    # a Tread too short for a count: QEMU refuses it (an error at most)
    assert reply_bound(views(frame(TREAD, 3, b"\0" * 4)), TREAD, msize) == 512
    for small in (24, 110, 120, 76, 118, 100):  # getattr, walk, clunk, unlinkat, write, version
        assert reply_bound(views(frame(small, 4)), small, msize) == 512
    for named in (22, 124):  # readlink, stat (9P2000.u)
        assert reply_bound(views(frame(named, 4)), named, msize) == 8192
        assert reply_bound(views(frame(named, 4)), named, 4096) == 4096
    getlock = frame(54, 4, b"\0" * 100)
    assert reply_bound(views(getlock), 54, msize) == 512 + len(getlock)
    assert reply_bound(views(frame(250, 4)), 250, msize) == msize  # unknown


def test_the_default_ring_shape_still_keeps_two_reads_per_ring_in_flight() -> None:
    """The client's reads (count msize - 24, ``IOHDRSZ``) fit two to a ring
    of any shape (msize is half the ring): the budget costs them nothing."""
    for order in range(1, 10):
        ring_bytes = (4096 << order) // 2
        msize = ring_bytes // 2
        bound = reply_bound([memoryview(tread(1, msize - 24))], TREAD, msize)
        assert 2 * bound <= ring_bytes - 1


def _count_notifies(fe: Frontend) -> list[int]:
    """The ports the frontend notifies from now on (its event channel's notify, wrapped)."""
    evtchn = fe._evtchn
    assert evtchn is not None
    sent: list[int] = []
    notify = evtchn.notify

    def counting(port: int) -> None:
        sent.append(port)
        notify(port)

    evtchn.notify = counting  # type: ignore[method-assign]
    return sent


@pytest.mark.parametrize("oversize", [False, True], ids=["within", "over"])
def test_a_drain_notifies_only_when_a_reply_outgrew_its_budget(oversize: bool) -> None:
    """Two Rreads drained at once bring ``in``'s room under an msize while a
    Tclunk is still in flight: QEMU could have waited for room.  Replies
    within their budget cannot have made it wait (the budget keeps all the
    replies a ring may get below its size), so that drain notifies nobody;
    replies over their budget (a backend that answers a 100-byte Tread with
    3,500 bytes) still get the notification that lets it go on."""
    clunk_may_go = threading.Event()

    def handler(request: bytes) -> bytes:
        _size, mtype, tag = HEADER.unpack_from(request)
        if mtype == TCLUNK:
            clunk_may_go.wait(10)
            return frame(TCLUNK + 1, tag, b"")
        count = 3500 if oversize else struct.unpack_from("<I", request, 19)[0]
        return frame(TREAD + 1, tag, struct.pack("<I", count) + b"r" * count)

    with machine(handler=handler) as m:
        with m.connect(rings=1, ring_order=2) as fe:  # 8 KiB each way, msize 4 KiB
            count = 100 if oversize else 3000
            reads = [frame(TREAD, tag, struct.pack("<IQI", 1, 0, count)) for tag in (1, 2)]
            sent = _count_notifies(fe)
            size = 11 + (3500 if oversize else 3000)
            consumer = fe._rings[0].consumer
            assert consumer is not None
            # the receiving role held here: both Rreads are queued before one drain
            assert fe._rx_lock.acquire(timeout=5)
            try:
                futures = fe.submit_many([*reads, frame(TCLUNK, 3, struct.pack("<I", 1))],
                                         timeout=5, lazy=True)  # fmt: skip
                deadline = time.monotonic() + 5
                while consumer.available() < 2 * size:
                    assert time.monotonic() < deadline, consumer.available()
                    time.sleep(0.01)
            finally:
                fe._rx_lock.release()
            replies = [fe.result(f, timeout=5) for f in futures[:2]]
            assert [len(r) for r in replies] == [size] * 2
            want = 2 if oversize else 1  # the batch's notification, and the drain's
            while len(sent) < want and time.monotonic() < deadline:
                time.sleep(0.01)  # the drain notifies after it settled its replies
            time.sleep(0.1)
            assert not futures[2].done()  # the Tclunk was in flight during the drain
            assert len(sent) == want, sent
            clunk_may_go.set()
            assert fe.result(futures[2], timeout=5)[4] == TCLUNK + 1
        m.assert_clean()
