"""``Frontend.exchange``: a lone caller's window sent and received in its own
thread (issue 11), on the simulated Xen, against a scripted hostile backend.

Whatever the backend does, each message ends in its reply's bytes, a future
(failed with a clear error, or handed to the shared request table when the
time ran out), or a not-sent future; the connection goes on or fails
cleanly, and nothing is left behind.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from frontend_helpers import FE_DOMID, TREAD, echo, frame, machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bench_floor import Hostile
from test_data_path import RREAD, _lying_rreads, pieces, rread, tread
from test_frontend_hostile import CLEAR, Script, actions

from pyxen9p._requests import NotSent, failed_future
from pyxen9p.errors import ProtocolError, TransportError
from pyxen9p.p9.client import Client
from pyxen9p.ring import HEADER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _common


def test_a_window_over_the_rings_comes_back_whole() -> None:
    with machine() as m:
        with m.connect(rings=3) as fe:
            datas = [b"data %d " % tag * (1 + tag) for tag in range(9)]
            buffers = [memoryview(bytearray(len(d))) for d in datas]
            messages = [pieces(tread(tag, d)) for tag, d in enumerate(datas)]
            outcome = fe.exchange(messages, timeout=5, into=buffers)
            assert outcome is not None
            for tag, (reply, data) in enumerate(zip(outcome, datas, strict=True)):
                assert reply == rread(tag, data)[:11]  # the header: the data went to the buffer
                assert bytes(buffers[tag]) == data
            # small replies (Tgetattr's budget: 512 bytes each) all fit at
            # once: one notification per ring
            notified: list[int] = []
            raw = fe._raw_events
            assert raw is not None

            def notify(port: int) -> int:
                notified.append(port)
                return raw.notify(port)

            fe._raw_events = raw._replace(notify=notify)
            getattrs = [frame(24, tag, b"g%d" % tag) for tag in range(9)]
            assert fe.exchange(getattrs, timeout=5) == [echo(g) for g in getattrs]
            assert sorted(notified) == sorted(ring.port for ring in fe._rings)
            fe._raw_events = raw
            # a reply that is not an Rread comes whole; without into too
            walk = frame(110, 1, b"walk body")
            assert fe.exchange([walk], timeout=5, into=[buffers[0]]) == [echo(walk)]
            assert fe.exchange([walk, frame(24, 2)], timeout=5) == [echo(walk), echo(frame(24, 2))]
            assert fe.outstanding_tags() == set()
        m.assert_clean()


def test_a_window_of_reads_or_writes_made_by_the_frontend_comes_back_as_counts() -> None:
    """exchange_io: the frontend makes the Treads (or Twrites) itself, an
    Rread's data lands in its buffer and a reply that went well is its
    count; any other reply comes as bytes (the caller decodes it); a bad
    window raises before anything is sent."""
    files: dict[int, bytearray] = {7: bytearray(os.urandom(5000))}
    seen: list[bytes] = []

    def server(request: bytes) -> bytes:
        seen.append(request)
        size, mtype, tag, fid, offset, count = struct.unpack_from("<IBHIQI", request)
        data = files[fid]
        if mtype == TREAD:
            if offset == 4000:  # a hostile count: more than the frame holds
                return frame(RREAD, tag, struct.pack("<I", 500) + bytes(data[offset : offset + 10]))
            chunk = bytes(data[offset : offset + count])
            return frame(RREAD, tag, struct.pack("<I", len(chunk)) + chunk)
        assert mtype == 118 and size == 23 + count
        if offset == 999:
            return frame(7, tag, struct.pack("<I", 28))  # Rlerror ENOSPC
        if offset == 998:
            return frame(119, tag, struct.pack("<I", count) + b"x")  # an Rwrite a byte long
        data[offset : offset + count] = request[23:size]
        return frame(119, tag, struct.pack("<I", count))

    with machine(handler=server) as m:
        with m.connect(rings=2) as fe:
            buffers = [memoryview(bytearray(1000)) for _ in range(6)]
            spans = [(o * 1000, b) for o, b in enumerate(buffers)]
            outcome = fe.exchange_io(7, spans, [10, 11, 12, 13, 14, 15], timeout=5)
            assert outcome is not None
            assert outcome[:4] == [1000, 1000, 1000, 1000] and outcome[5] == 0  # past the end
            assert isinstance(outcome[4], Future)  # the lying Rread
            with pytest.raises(ProtocolError, match="announces 500 bytes in a frame of 21"):
                outcome[4].result(0)
            assert b"".join(bytes(b) for b in buffers[:4]) == files[7][:4000]
            # a window of writes, from the caller's buffers
            payload = memoryview(os.urandom(3000))
            spans = [(100, payload[:1000]), (1100, payload[1000:2500]), (999, payload[:5]),
                     (998, payload[:7])]  # fmt: skip
            outcome = fe.exchange_io(7, spans, [20, 21, 22, 23], write=True, timeout=5)
            assert outcome is not None
            assert outcome[:2] == [1000, 1500]
            assert files[7][100:2600] == payload[:2500]
            assert outcome[2] == frame(7, 22, struct.pack("<I", 28))  # the error, whole
            assert outcome[3] == frame(119, 23, struct.pack("<I", 7) + b"x")
            # spans past the last tag are left
            outcome = fe.exchange_io(7, [(0, buffers[0]), (0, buffers[1])], [30], timeout=5)
            assert outcome == [1000]
            # a bad window sends nothing
            sent = len(seen)
            read_only = memoryview(b"x" * 10)
            with pytest.raises(ValueError, match="twice"):
                fe.exchange_io(7, [(0, buffers[0]), (0, buffers[1])], [1, 1], timeout=5)
            with pytest.raises(ValueError, match="writable"):
                fe.exchange_io(7, [(0, buffers[0]), (0, read_only)], [1, 2], timeout=5)
            with pytest.raises(ValueError, match="msize"):
                fe.exchange_io(7, [(0, memoryview(bytes(fe.msize)))], [1], write=True, timeout=5)
            with pytest.raises(ValueError, match="out of range"):
                fe.exchange_io(7, [(-1, buffers[0])], [1], timeout=5)
            with pytest.raises(ValueError, match="flat"):
                fe.exchange_io(7, [(0, memoryview(bytearray(8)).cast("I"))], [1], timeout=5)
            with pytest.raises(ValueError, match="spans"):
                fe.exchange_io(7, [(0, buffers[0])], [1, 2], timeout=5)
            assert len(seen) == sent
            assert fe.outstanding_tags() == set()
        m.assert_clean()


def test_the_requests_a_reply_made_room_for_go_out_before_its_port_is_unmasked() -> None:
    """A window larger than the reply budget: after each event, the
    requests put in the room its replies made are notified before its
    port is unmasked (the backend has them a system call sooner); every
    port taken is unmasked once, the last one too."""
    with machine() as m:
        with m.connect(rings=1, ring_order=2) as fe:
            raw = fe._raw_events
            assert raw is not None
            calls: list[tuple[str, int]] = []

            def logged(name: str, fn: Any) -> Any:
                def call(*args: int) -> int:
                    result = int(fn(*args))
                    calls.append((name, args[0] if args else result))
                    return result

                return call

            fe._raw_events = raw._replace(
                pending=logged("pending", raw.pending),
                unmask=logged("unmask", raw.unmask),
                notify=logged("notify", raw.notify),
            )
            datas = [bytes([65 + tag]) * 2000 for tag in range(12)]  # 4 replies fit at once
            buffers = [memoryview(bytearray(2000)) for _ in datas]
            try:
                outcome = fe.exchange([tread(t, d) for t, d in enumerate(datas)], timeout=5,
                                      into=buffers)  # fmt: skip
            finally:
                fe._raw_events = raw
            assert outcome is not None and all(isinstance(r, bytes) for r in outcome)
            assert [bytes(b) for b in buffers] == datas
            names = [name for name, _ in calls]
            assert names.count("pending") == names.count("unmask") >= 2
            taken = -1
            for i, (name, port) in enumerate(calls):
                if name == "pending":
                    assert taken < 0, calls  # the last one taken was unmasked first
                    taken = i
                elif name == "unmask":
                    assert taken >= 0 and port == calls[taken][1], calls
                    taken = -1
            assert taken < 0  # the last port taken is unmasked too
            # some event's replies made room: its notify came before its unmask
            assert any(
                name == "notify" and i > 0 and any(n == "pending" for n, _ in calls[:i])
                and calls[i + 1 :] and next(n for n, _ in calls[i + 1 :]) == "unmask"
                for i, (name, _) in enumerate(calls)
            ), calls  # fmt: skip
        m.assert_clean()


def test_not_alone_means_nothing_sent() -> None:
    """A request in flight, or another thread receiving: ``None``, and the
    shared path does the work."""
    release = threading.Event()

    def held(request: bytes) -> bytes:
        if HEADER.unpack_from(request)[2] == 9:
            release.wait(5)
        return echo(request)

    with machine(handler=held) as m:
        with m.connect() as fe:
            seen: list[bytes] = []
            original = m.backend.handler
            m.backend.handler = lambda r: (seen.append(r), original(r))[1]  # type: ignore[assignment,func-returns-value]
            future = fe.submit(frame(TREAD, 9, b"held"), timeout=5)
            assert fe.exchange([frame(TREAD, 1, b"x")], timeout=5) is None
            fe._rings[0].send_lock.token.pop()  # another sender, mid-put
            try:
                release.set()
                assert future.result(5) == echo(frame(TREAD, 9, b"held"))
                assert fe.exchange([frame(TREAD, 1, b"x")], timeout=5) is None
            finally:
                fe._rings[0].send_lock.release()
            assert [HEADER.unpack_from(r)[2] for r in seen] == [9]  # tag 1 never went out
            # alone again once the receiver thread, which delivered tag 9's
            # reply, has given the receiving role back (None meanwhile:
            # nothing sent, so trying again is safe)
            deadline = time.monotonic() + 5
            while (outcome := fe.exchange([frame(TREAD, 1, b"x")], timeout=5)) is None:
                assert time.monotonic() < deadline, "the receiving role was never free"
                time.sleep(0.01)
            assert outcome == [echo(frame(TREAD, 1, b"x"))]
            assert [HEADER.unpack_from(r)[2] for r in seen] == [9, 1]
        m.assert_clean()


def test_a_lying_rread_fails_only_its_own_entry() -> None:
    with machine(handler=_lying_rreads) as m:
        with m.connect(rings=2) as fe:
            buffers = [memoryview(bytearray(16)) for _ in range(7)]
            messages = [tread(tag, b"q" if tag < 6 else b"fine") for tag in range(1, 7)]
            outcome = fe.exchange(messages, timeout=5, into=buffers[1:])
            assert outcome is not None
            for entry, match in zip(
                outcome,
                ("more than the 16-byte", "announces 4096", "announces 2", "of only 9 bytes"),
                strict=False,
            ):
                assert isinstance(entry, Future) and entry.done()
                with pytest.raises(ProtocolError, match=match):
                    entry.result()
            assert bytes(buffers[1]) == bytes(16)  # refused: nothing copied
            assert outcome[4] == frame(7, 5, b"\x05\x00\x00\x00")
            assert outcome[5] == echo(tread(6, b"fine"))[:11] and bytes(buffers[6][:4]) == b"fine"
            assert fe.outstanding_tags() == set()
            # the framing is intact: the connection goes on
            assert fe.request(frame(TREAD, 8, b"next"), timeout=5) == echo(frame(TREAD, 8, b"next"))
        m.assert_clean()


def test_a_wrong_type_and_a_stray_tag() -> None:
    def handler(request: bytes) -> bytes:
        _size, mtype, tag = HEADER.unpack_from(request)
        if tag == 1:
            return frame(50, tag)  # the wrong type
        if tag == 2:  # a reply for a tag of another ring, then its own
            return frame(mtype + 1, 3, b"stray") + echo(request)
        return echo(request)

    with machine(handler=handler) as m:
        with m.connect(rings=2) as fe:
            dropped = fe.dropped_replies
            outcome = fe.exchange([frame(TREAD, t, b"m") for t in (1, 2)], timeout=5)
            assert outcome is not None
            assert isinstance(outcome[0], Future)
            with pytest.raises(ProtocolError, match="type 50 to a request of type 116"):
                outcome[0].result()
            assert outcome[1] == echo(frame(TREAD, 2, b"m"))
            assert fe.dropped_replies == dropped + 1
        m.assert_clean()


def test_unanswered_by_the_deadline_is_handed_to_the_shared_table() -> None:
    late = threading.Event()

    def slow(request: bytes) -> bytes:
        if HEADER.unpack_from(request)[2] == 1:
            late.wait(5)
        return echo(request)

    with machine(handler=slow) as m:
        with m.connect(rings=2) as fe:
            start = time.monotonic()
            outcome = fe.exchange([frame(TREAD, t, b"m") for t in (0, 1)], timeout=0.3)
            assert time.monotonic() - start < 2
            assert outcome is not None
            assert outcome[0] == echo(frame(TREAD, 0, b"m"))
            future = outcome[1]
            assert isinstance(future, Future) and not future.done()
            assert fe.outstanding_tags() == {1}  # reserved until its reply
            # not alone any more: the shared path
            assert fe.exchange([frame(TREAD, 2, b"m")], timeout=1) is None
            late.set()
            assert future.result(5) == echo(frame(TREAD, 1, b"m"))  # the receiver thread
            assert fe.outstanding_tags() == set()
            assert fe.exchange([frame(TREAD, 2, b"m")], timeout=5) == [echo(frame(TREAD, 2, b"m"))]
            # the reply budget came back: a window that fills the rings still goes
            body = b"r" * 1500
            outcome = fe.exchange([frame(TREAD, t, body) for t in range(20)], timeout=5)
            assert outcome == [echo(frame(TREAD, t, body)) for t in range(20)]
        m.assert_clean()


def test_more_than_the_rings_hold_waits_for_room() -> None:
    """Requests and replies that overfill the rings (replies over their
    budget, too): the exchange sends as replies make room, in order."""

    def big(request: bytes) -> bytes:
        _size, mtype, tag = HEADER.unpack_from(request)
        return frame(mtype + 1, tag, bytes([tag]) * int(request[7:]))

    with machine(handler=big) as m:
        with m.connect(rings=1, ring_order=2) as fe:  # 8 KiB each way, msize 4 KiB
            for size in (3000, 100, 4000, 2000):
                outcome = fe.exchange([frame(TREAD, t, b"%d" % size) for t in range(12)], timeout=5)
                assert outcome == [frame(TREAD + 1, t, bytes([t]) * size) for t in range(12)], size
        m.assert_clean()


def test_no_room_in_time_is_not_sent() -> None:
    stop = threading.Event()

    def stuck(request: bytes) -> bytes:
        stop.wait(5)
        return echo(request)

    with machine(handler=stuck) as m:
        with m.connect(rings=1, ring_order=2) as fe:  # 8 KiB each way
            body = b"w" * 3000
            outcome = fe.exchange([frame(TREAD, t, body) for t in range(4)], timeout=0.3)
            assert outcome is not None
            sent = [e for e in outcome if not isinstance(e, NotSent)]
            assert 1 <= len(sent) < 4
            assert all(isinstance(e, Future) and not e.done() for e in sent)
            for entry in outcome[len(sent) :]:  # never one sent after one not sent
                assert isinstance(entry, NotSent)
                with pytest.raises(TimeoutError, match="room"):
                    entry.result()
            assert fe.outstanding_tags() == set(range(len(sent)))
            stop.set()
            for tag, entry in enumerate(sent):
                assert isinstance(entry, Future)
                assert entry.result(5) == echo(frame(TREAD, tag, body))
        m.assert_clean()


def test_an_interruption_hands_what_is_on_the_rings_over() -> None:
    with machine() as m:
        with m.connect(rings=2) as fe:
            original = fe._take_mine

            def interrupted(*args: object) -> None:
                raise KeyboardInterrupt

            fe._take_mine = interrupted  # type: ignore[method-assign,assignment]
            messages = [frame(TREAD, t, b"m") for t in range(4)]
            with pytest.raises(KeyboardInterrupt):
                fe.exchange(messages, timeout=5)
            fe._take_mine = original  # type: ignore[method-assign]
            # each is the shared table's: the receiver thread takes the replies
            deadline = time.monotonic() + 5
            while fe.outstanding_tags() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert fe.outstanding_tags() == set()
            assert fe.exchange(messages, timeout=5) == [echo(x) for x in messages]
        m.assert_clean()


def test_the_receiver_threads_own_exchange_is_refused() -> None:
    def slow(request: bytes) -> bytes:
        time.sleep(0.2)  # the callback is added before the reply comes
        return echo(request)

    with machine(handler=slow) as m:
        with m.connect() as fe:
            caught: list[BaseException] = []

            def callback(_future: object) -> None:
                try:
                    fe.exchange([frame(TREAD, 5, b"x")], timeout=1)
                except RuntimeError as exc:
                    caught.append(exc)

            future = fe.submit(frame(TREAD, 4, b"x"), timeout=5)
            future.add_done_callback(callback)
            future.result(5)
            deadline = time.monotonic() + 5
            while not caught and time.monotonic() < deadline:
                time.sleep(0.01)
            assert caught and "deadlock" in str(caught[0])
        m.assert_clean()


def test_close_during_an_exchange_ends_it() -> None:
    stop = threading.Event()

    def stuck(request: bytes) -> bytes:
        stop.wait(5)
        return echo(request)

    with machine(handler=stuck) as m:
        fe = m.connect(rings=2)
        results: list[object] = []
        worker = threading.Thread(
            target=lambda: results.append(fe.exchange([frame(TREAD, 0, b"m")], timeout=None))
        )
        worker.start()
        time.sleep(0.2)
        start = time.monotonic()
        fe.close()
        worker.join(5)
        assert not worker.is_alive()
        assert time.monotonic() - start < 8
        stop.set()
        (outcome,) = results
        assert isinstance(outcome, list)
        with pytest.raises(TransportError):
            outcome[0].result(1)
        m.backend.stop()
        m.assert_clean()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=st.lists(actions, min_size=1, max_size=6), rings=st.integers(1, 3))
def test_a_hostile_backend_against_an_exchange(steps: list[tuple[object, ...]], rings: int) -> None:
    script = Script(steps)
    timeout = 0.4
    with machine(handler=script, poll_interval=0.01) as m:
        script.machine = m  # type: ignore[assignment]
        fe = m.connect(rings=rings, ring_order=2, timeout=3)
        datas = [b"data %d " % tag * (1 + tag) for tag in range(len(steps) + 1)]
        requests = [tread(tag, data) for tag, data in enumerate(datas)]
        buffers = [memoryview(bytearray(len(d))) for d in datas]
        start = time.monotonic()
        try:
            outcome = fe.exchange([pieces(r) for r in requests], timeout=timeout, into=buffers)
        except CLEAR:
            outcome = None  # failed before it began (the backend left Connected)
        # bounded: the whole exchange within its timeout and a poll
        assert time.monotonic() - start < timeout + 1
        if outcome is not None:
            assert len(outcome) == len(requests)
            for tag, entry in enumerate(outcome):
                if isinstance(entry, bytes):
                    rsize, rtype, rtag = HEADER.unpack_from(entry)
                    assert rtag == tag and rtype in (RREAD, 7, 107), entry
                    if rtype == RREAD and len(entry) == 11:
                        count = struct.unpack_from("<I", entry, 7)[0]
                        assert rsize == 11 + count and count <= len(buffers[tag])
                    else:
                        assert rsize == len(entry)
                    continue
                assert isinstance(entry, Future)
                if not entry.done():  # handed over: the shared table holds its tag
                    assert tag in fe.outstanding_tags() or entry.done()
                    continue
                failure = entry.exception()
                assert isinstance(failure, CLEAR) and str(failure), failure
        close_start = time.monotonic()
        fe.close()
        assert time.monotonic() - close_start < 8
        assert not [t for t in threading.enumerate() if t.name.startswith("pyxen9p-rx")]
        m.backend.stop()
        assert m.xen.resources(FE_DOMID).clean, m.xen.resources(FE_DOMID)


# --- the client's windows go through the exchange --------------------------------


@pytest.fixture
def client_setup(tmp_path: Path) -> Iterator[tuple[Client, Hostile, Path, list[object]]]:
    export = tmp_path / "export"
    export.mkdir()
    hostile = Hostile()
    with _common.simulated_client(export, rings=2, serve=hostile.serve) as client:
        wire = client._session.wire
        outcomes: list[object] = []
        # the frontend's: exchange (any batch) and exchange_io (a window)
        assert wire._exchange is not None and wire._exchange_io is not None

        def spy(real: Callable[..., Any]) -> Callable[..., Any]:
            def spied(*args: Any, **kwargs: Any) -> Any:
                outcome = real(*args, **kwargs)
                outcomes.append(outcome)
                return outcome

            return spied

        wire._exchange = spy(wire._exchange)
        wire._exchange_io = spy(wire._exchange_io)
        yield client, hostile, export, outcomes


def test_the_clients_reads_and_writes_are_exchanges(
    client_setup: tuple[Client, Hostile, Path, list[object]],
) -> None:
    client, _hostile, export, outcomes = client_setup
    data = os.urandom(client.default_iounit * 3 + 100)
    with client.open("f", "wb", buffering=0) as f:
        assert f.write(data) == len(data)
    assert export.joinpath("f").read_bytes() == data
    writes = [o for o in outcomes if isinstance(o, list) and len(o) > 1]
    assert writes, outcomes  # the window of Twrites went as one exchange
    outcomes.clear()
    buffer = bytearray(len(data) + 10)
    with client.open("f", "rb", buffering=0) as f:
        assert f.readinto(buffer) == len(data)
    assert bytes(buffer[: len(data)]) == data
    assert any(isinstance(o, list) and len(o) > 1 for o in outcomes), outcomes
    assert client.tags_in_use == 0


def test_a_hostile_rread_in_a_window_fails_the_read_not_the_client(
    client_setup: tuple[Client, Hostile, Path, list[object]],
) -> None:
    client, hostile, export, _outcomes = client_setup
    iounit = client.default_iounit
    export.joinpath("f").write_bytes(b"y" * (iounit * 2))

    def over(request: bytes, reply: bytes) -> bytes:
        if request[4] != TREAD or reply[4] != RREAD:
            return reply
        count = struct.unpack_from("<I", reply, 7)[0] + 1
        body = struct.pack("<I", count) + reply[11:] + b"!"
        return frame(RREAD, HEADER.unpack_from(reply)[2], body)

    buffer = bytearray(iounit * 2 + 64)
    with client.open("f", "rb", buffering=0) as f:
        hostile.rewrite = over
        try:
            with pytest.raises(ProtocolError):
                f.readinto(memoryview(buffer)[: iounit * 2])
        finally:
            hostile.rewrite = None
    assert bytes(buffer[iounit * 2 :]) == bytes(64)  # nothing past what was asked
    assert client.read_bytes("f") == b"y" * (iounit * 2)  # the client goes on
    assert client.tags_in_use == 0 and not client.stuck_tags


@pytest.mark.parametrize("lie", ["count", "tag", "size", "error"])
def test_a_hostile_rwrite_in_a_window_fails_the_write_not_the_client(
    client_setup: tuple[Client, Hostile, Path, list[object]], lie: str
) -> None:
    """An Rwrite read in place (no message objects) is still checked: a
    count over what was sent, another tag, a size other than the frame's;
    an Rlerror is the server's error."""
    client, hostile, export, _outcomes = client_setup
    iounit = client.default_iounit
    twrite, rwrite = 118, 119

    def lying(request: bytes, reply: bytes) -> bytes:
        if request[4] != twrite or reply[4] != rwrite:
            return reply
        tag = HEADER.unpack_from(reply)[2]
        count = struct.unpack_from("<I", reply, 7)[0]
        if lie == "count":
            return frame(rwrite, tag, struct.pack("<I", count + 1))
        if lie == "tag":
            return frame(rwrite, tag ^ 0x100, struct.pack("<I", count))
        if lie == "size":  # a byte more than an Rwrite has
            return frame(rwrite, tag, struct.pack("<I", count) + b"!")
        return frame(7, tag, struct.pack("<I", 28))  # Rlerror ENOSPC

    data = b"w" * (iounit * 2)
    client.timeout = 2  # a reply of another tag is dropped: its request times out
    with client.open("f", "wb", buffering=0) as f:
        hostile.rewrite = lying
        try:
            with pytest.raises(OSError) as failed:
                f.write(data)
        finally:
            hostile.rewrite = None
    if lie == "error":
        assert failed.value.errno == 28 and not isinstance(failed.value, ProtocolError)
    elif lie == "tag":
        assert isinstance(failed.value, TimeoutError)
    else:
        assert isinstance(failed.value, ProtocolError)
    client.write_bytes("g", data)  # the client goes on
    assert export.joinpath("g").read_bytes() == data
    assert client.tags_in_use == 0


def test_a_read_at_the_end_of_a_file_asks_for_one_io_unit_first(
    client_setup: tuple[Client, Hostile, Path, list[object]],
) -> None:
    """After a short read, the next read from there is one Tread (the
    kernel's way), not a window; a file that grew meanwhile is read on."""
    client, hostile, export, _outcomes = client_setup
    iounit = client.default_iounit
    path = export.joinpath("f")
    path.write_bytes(b"a" * (iounit * 2 + 5))
    treads: list[int] = []

    def count(request: bytes, reply: bytes) -> bytes:
        if request[4] == TREAD:
            treads.append(struct.unpack_from("<Q", request, 11)[0])
        return reply

    buffer = bytearray(iounit * 4)
    with client.open("f", "rb", buffering=0) as f:
        hostile.rewrite = count
        try:
            assert f.readinto(buffer) == iounit * 2 + 5  # short: the end, most likely
            assert len(treads) == 4
            treads.clear()
            assert f.readinto(buffer) == 0
            assert treads == [iounit * 2 + 5]  # one Tread, not four
            treads.clear()
            with path.open("ab") as grow:
                grow.write(b"b" * (iounit * 2))
            assert f.readinto(buffer) == iounit * 2
            assert bytes(buffer[: iounit * 2]) == b"b" * (iounit * 2)
            assert treads[0] == iounit * 2 + 5 and len(treads) == 4  # one, then the rest
            treads.clear()
            f.seek(0)
            assert f.readinto(buffer) == iounit * 4 and len(treads) == 4  # a window again
        finally:
            hostile.rewrite = None
    assert client.tags_in_use == 0


def test_a_window_unanswered_in_time_is_flushed(
    client_setup: tuple[Client, Hostile, Path, list[object]],
) -> None:
    client, hostile, export, outcomes = client_setup
    iounit = client.default_iounit
    export.joinpath("f").write_bytes(b"z" * (iounit * 3))
    late = threading.Event()

    def slow_second(request: bytes, reply: bytes) -> bytes:
        if request[4] == TREAD and struct.unpack_from("<Q", request, 11)[0] == iounit:
            late.wait(1)  # its ring's Tflush is answered after it
        return reply

    client.timeout = 0.3
    with client.open("f", "rb", buffering=0) as f:
        hostile.rewrite = slow_second
        try:
            with pytest.raises(TimeoutError):
                f.readinto(bytearray(iounit * 3))
        finally:
            late.set()
            hostile.rewrite = None
    assert any(isinstance(o, list) for o in outcomes)
    assert client.flushes_sent == 1  # the one late Tread, handed to the table and flushed
    client.timeout = 10
    assert client.read_bytes("f") == b"z" * (iounit * 3)
    assert client.tags_in_use == 0 and not client.stuck_tags


@pytest.mark.parametrize("failing", ["pending", "unmask", "notify"])
@pytest.mark.parametrize("path", ["exchange", "request"])
def test_a_failing_event_channel_call_fails_the_connection(failing: str, path: str) -> None:
    """The bare event-channel calls (an exchange's, and any receiver's
    pending and unmask): a negative result fails the connection with the
    call's errno (a reply taken before a failing unmask is delivered), and
    everything is still released."""
    import errno

    with machine() as m:
        fe = m.connect(rings=2)
        raw = fe._raw_events
        assert raw is not None

        def error(name: str) -> OSError:
            return OSError(errno.EFAULT, f"{name} failed")

        fe._raw_events = raw._replace(**{failing: lambda *args: -1}, error=error)
        message = frame(TREAD, 0, b"m")
        if path == "exchange":
            outcome = fe.exchange([message], timeout=5)
            assert outcome is not None
            if failing != "unmask":
                failed = outcome[0]
                assert isinstance(failed, Future)
                with pytest.raises(TransportError) as info:
                    failed.result(5)
                assert info.value.errno == errno.EFAULT
        elif failing != "notify":  # the shared path's notify is the checked one
            try:
                fe.request(message, timeout=5)
            except TransportError as exc:
                assert exc.errno == errno.EFAULT
        if path == "request" and failing == "notify":
            fe._raw_events = raw
            assert fe.request(message, timeout=5) == echo(message)
        else:
            with pytest.raises(TransportError) as info:
                fe.request(frame(TREAD, 1, b"m"), timeout=5)
            assert info.value.errno == errno.EFAULT and "failed" in str(info.value)
        fe._raw_events = raw
        fe.close()
        m.backend.stop()
        m.assert_clean()


def test_only_the_not_sent_at_the_end_of_an_exchange_are_not_sent() -> None:
    """The session's reading of an exchange's outcome: the NotSent futures
    at the end are the messages not put (why: the first one's failure); a
    NotSent before an entry that is not one (a reply refused) was sent, and
    stays that entry's outcome; an error raised means nothing was sent."""
    from pyxen9p.p9.session import _exchanged

    refused = failed_future(ProtocolError("Rread of 9 bytes for a Tread of 4"))
    late: Future[bytes] = Future()
    assert _exchanged(lambda: [5, refused, late]) == ([5, refused, late], None)
    no_room = TimeoutError(errno.ETIMEDOUT, "no room")
    outcome = _exchanged(lambda: [5, refused, 7, failed_future(no_room), failed_future(no_room)])
    assert outcome == ([5, refused, 7], no_room)
    assert _exchanged(lambda: [failed_future(no_room)]) == ([], no_room)
    assert _exchanged(lambda: [b"reply", 3]) == ([b"reply", 3], None)
    assert _exchanged(lambda: None) is None
    bad = ValueError("a tag appears twice in one window")

    def refuse() -> list[int]:
        raise bad

    assert _exchanged(refuse) == ([], bad)
