#!/usr/bin/env python3
"""Benchmarks of the Xen 9pfs transport, each against a reference measured in the same run.

``ring_vs_memcpy_order<N>``
    Bytes pushed through one ring direction with :mod:`pyxen9p.ring`
    (:class:`~pyxen9p.ring.Producer` on one side, :class:`~pyxen9p.ring.Consumer`
    on the other, driven alternately in one thread over anonymous shared
    memory) in messages of msize (half a ring), against a plain copy of the
    same bytes, in the same chunks, into memory of the same size (every
    buffer on both sides starts on a page, as the ring does: see
    :func:`page_aligned`).  The data path of
    the frontend: each message is put as two pieces (its 11-byte header and
    a view of its payload in the source: ``put_pieces``) and taken out as
    its header plus its payload copied straight into the destination
    (``take_into``), so each byte is copied once into the ring and once out.
``ring_vs_two_memcpy_order<N>``
    Context for the line above: the same ring runs against the two copies
    any ring transfer makes of each byte (each chunk copied into a
    ring-sized staging buffer, then out of it into the destination).  The
    line above compares two copies per byte with one, which bounds its
    ratio well below 1 (how far below depends on the caches: the staging
    buffer stays in them); this line shows what the ring costs beyond its
    copies.
``rt_small_<N>thread(s)``
    Round trips of small 9P-shaped frames through :class:`pyxen9p.frontend.Frontend`
    on a :class:`~pyxen9p.sim.platform.SimulatedXen` with a
    :class:`~pyxen9p.sim.backend.Sim9pfsBackend` and the echo handler, from 1
    and from N caller threads, against the same frames and handler over a
    ``socketpair``: a minimal framed echo server thread, and a client with a
    receiver thread that hands replies to the callers by tag (the structure of
    the frontend, without the rings).
``rt_small_socket_mux_vs_direct``
    Context for the line above: that multiplexing socket client against a
    single caller doing blocking ``send``/``recv`` itself (no receiver thread).
``rt_large``
    Round trips of msize frames through the simulated backend against the
    socketpair.  The request is a Tread-shaped frame carrying
    ``count[4] data[count]``, so its echo is a well-formed Rread: the
    frontend sends it as two pieces (header, and a view of the payload) and
    receives the reply's data straight into a buffer (``into=``), the paths
    a client's write and read take; the socket side sends and receives
    whole frames.

Run ``python bench/bench_transport.py`` (about a minute), ``--quick`` for a
smoke run, ``--json PATH`` for machine-readable results, ``--profile`` for a
per-thread CPU profile of the small round trip instead of the benchmarks.
"""

from __future__ import annotations

import cProfile
import mmap
import os
import pstats
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from _common import (
    MB,
    Options,
    Result,
    Sample,
    base_parser,
    comment,
    environment,
    measure_pair,
    options_from,
    report,
    timed,
)

from pyxen9p.barrier import get_barriers
from pyxen9p.frontend import Frontend
from pyxen9p.ring import (
    HEADER,
    HEADER_SIZE,
    MAX_RING_ORDER,
    MIN_RING_ORDER,
    XEN_PAGE_SIZE,
    ByteRing,
    Consumer,
    Interface,
    Producer,
    ring_size,
)
from pyxen9p.sim.backend import Sim9pfsBackend, echo_handler
from pyxen9p.sim.platform import SimulatedXen

TREAD = 116
TWRITE = 118
#: ``size[4] type[1] tag[2] count[4]``: the header part of a Twrite or an Rread
RREAD_HEAD = 11
#: Body of the small frames: a Tread's ``fid[4] offset[8] count[4]``.
SMALL_BODY = bytes(range(16))
FE_DOMID = 7
#: Limit of every wait in the benchmarks (a hung peer fails the run, not hangs it).
WAIT = 60.0

Request = Callable[[bytes], bytes]
T = TypeVar("T")


def frame(mtype: int, tag: int, body: bytes) -> bytes:
    """A 9P-shaped frame: ``size[4] type[1] tag[2]`` then *body*."""
    return HEADER.pack(HEADER_SIZE + len(body), mtype, tag) + body


# ---------------------------------------------------------------------------
# 1. Large messages through one ring, against a memory copy


def make_messages(total: int, msize: int) -> bytearray:
    """*total* bytes (rounded down to whole messages, at least one) of msize
    Twrite-shaped messages with random bodies."""
    count = max(1, total // msize)
    buffer = bytearray(os.urandom(msize) * count)
    for i in range(count):
        HEADER.pack_into(buffer, i * msize, msize, TWRITE, i & 0xFFFF)
    return buffer


class RingPair:
    """Both ends of one ring direction (``out``: frontend to backend).

    The interface page and the data pages are anonymous shared mappings; the
    producer and the consumer each get their own :class:`Interface` and
    :class:`ByteRing` views, as two domains mapping the same grants would.

    :param order: the ring order (``1 << order`` data pages)
    """

    def __init__(self, order: int) -> None:
        self.order = order
        self.size = ring_size(order)
        self.msize = self.size // 2
        self._intf_map = mmap.mmap(-1, XEN_PAGE_SIZE)
        self._data_map = mmap.mmap(-1, 2 * self.size)
        self._views: list[memoryview] = []
        barriers = get_barriers()

        def view(buffer: mmap.mmap) -> memoryview:
            v = memoryview(buffer)
            self._views.append(v)
            return v

        self._fe = Interface(view(self._intf_map))
        self._be = Interface(view(self._intf_map))
        fe, be = self._fe, self._be
        self._out_fe = ByteRing(view(self._data_map)[self.size :])
        self._out_be = ByteRing(view(self._data_map)[self.size :])

        # the index loads and stores the frontend uses (no Python frame each)
        self.producer = Producer(
            self._out_fe, fe.loader("out_cons"), fe.storer("out_prod"), barriers
        )
        self.consumer = Consumer(
            self._out_be, be.loader("out_prod"), be.storer("out_cons"), barriers
        )
        #: where the payloads taken out go (set by the benchmark)
        self.target = memoryview(bytearray(0))

    def transfer(self, source: memoryview, check: bool = False) -> int:
        """Push *source* (whole msize messages) through the ring and take every
        message out on the other side.

        :param check: compare every message taken with what was put
        :returns: the bytes received
        :raises RuntimeError: if the ring stops making progress, or (with
            *check*) a message came out different
        """
        producer, consumer, msize = self.producer, self.consumer, self.msize
        total = len(source)
        target = self.target
        sent = received = 0
        while received < total:
            before = received
            while sent < total and producer.put_pieces(
                (source[sent : sent + RREAD_HEAD], source[sent + RREAD_HEAD : sent + msize]), msize
            ):
                sent += msize
            while (header := consumer.peek_header(msize)) is not None:
                size = header[0]
                head = consumer.take(RREAD_HEAD)
                consumer.take_into(target[received + RREAD_HEAD : received + size])
                consumer.publish()
                if check and (
                    head != source[received : received + RREAD_HEAD]
                    or target[received + RREAD_HEAD : received + size]
                    != source[received + RREAD_HEAD : received + size]
                ):
                    raise RuntimeError(f"message at offset {received} came out corrupted")
                received += size
            if received == before:
                raise RuntimeError(f"ring stalled at {received} of {total} bytes")
        return received

    def close(self) -> None:
        """Release every view and unmap the memory."""
        for ring in (self._out_fe, self._out_be):
            ring.release()
        self._fe.release()
        self._be.release()
        for v in self._views:
            v.release()
        self._views.clear()
        self._intf_map.close()
        self._data_map.close()


def memcpy(source: memoryview, destination: memoryview, chunk: int) -> None:
    """Copy *source* into *destination* in *chunk*-byte slices."""
    for offset in range(0, len(source), chunk):
        destination[offset : offset + chunk] = source[offset : offset + chunk]


def two_memcpy(
    source: memoryview, staging: memoryview, destination: memoryview, chunk: int
) -> None:
    """Copy *source* into *destination* in *chunk*-byte slices, each through
    *staging* (a ring-sized buffer, used round): two copies of each byte."""
    size = len(staging)
    for offset in range(0, len(source), chunk):
        at = offset % size
        n = min(chunk, len(source) - offset)
        staging[at : at + n] = source[offset : offset + n]
        destination[offset : offset + n] = staging[at : at + n]


def page_aligned(n: int) -> mmap.mmap:
    """*n* zero bytes of anonymous memory starting on a page boundary, as
    the ring's own pages do.

    Every buffer of the ring benchmark is page-aligned, on both sides: on
    x86 a copy whose destination lies 1 to 63 bytes past its source, modulo
    4 KiB, runs about a fifth slower (4K aliasing: its stores seem to
    overlap the loads just ahead).  A ``bytearray`` this large starts 16
    bytes into a page, so with ``bytearray`` buffers the ring's copy out
    (from offset 11 of a page-aligned ring into offset 16 + 11) always hit
    that case while both references, copying between ``bytearray``s, never
    did.
    """
    return mmap.mmap(-1, n)


def bench_ring(order: int, total: int, options: Options, out: TextIO) -> list[Result]:
    """Ring transfer of *total* bytes in msize messages against a memory copy,
    and against two copies (the runs of the ring are the same for both lines).

    The first (warm-up) pass checks every message.
    """
    pair = RingPair(order)
    buffers: list[mmap.mmap] = []
    try:
        made = make_messages(total, pair.msize)
        messages, destination, destination2, received, staged = buffers = [
            page_aligned(n) for n in (len(made), len(made), len(made), len(made), pair.size)
        ]
        messages[:] = made
        del made
        with (
            memoryview(messages) as source,
            memoryview(destination) as target,
            memoryview(destination2) as target2,
            memoryview(staged) as staging,
            memoryview(received) as ring_target,
        ):
            pair.target = ring_target
            moved = len(source)
            comment(
                f"ring order {order}: ring {pair.size} B per direction, msize {pair.msize} B,"
                f" {moved} B per repetition",
                out,
            )
            pair.transfer(source, check=True)

            def subject() -> Sample:
                with timed(moved / MB) as t:
                    pair.transfer(source)
                return t.sample

            def reference() -> Sample:
                with timed(moved / MB) as t:
                    memcpy(source, target, pair.msize)
                return t.sample

            def reference2() -> Sample:
                with timed(moved / MB) as t:
                    two_memcpy(source, staging, target2, pair.msize)
                return t.sample

            # alternate the three sides: ring, one copy, ring, two copies, ...
            runs = measure_pair(subject, reference, options)
            runs2 = measure_pair(subject, reference2, options)
            if target != source or target2 != source:
                raise RuntimeError("a reference copy is wrong")
            pair.target = memoryview(bytearray(0))
    finally:
        pair.close()
        for buffer in buffers:
            buffer.close()
    params = {"order": order, "msize": pair.msize, "bytes": moved}
    return [
        Result(f"ring_vs_memcpy_order{order}", "ring", "memcpy", "MB", *runs, params=params),
        Result(
            f"ring_vs_two_memcpy_order{order}", "ring", "two_memcpy", "MB", *runs2, params=params
        ),
    ]


# ---------------------------------------------------------------------------
# 2 and 3. Round trips: simulated Xen against a socketpair


@contextmanager
def simulated_frontend(**connect: Any) -> Iterator[Frontend]:
    """A simulated machine (echo backend in domain 0) and a connected frontend.

    Everything is closed and checked for leaks on exit.
    """
    xen = SimulatedXen()
    try:
        guest = xen.create_domain(FE_DOMID, "bench-guest")
        backend = Sim9pfsBackend(xen.domain(0), FE_DOMID, handler=echo_handler)
        backend.start()
        try:
            frontend = Frontend.connect(devid=0, platform=guest, timeout=10.0, **connect)
            try:
                yield frontend
            finally:
                frontend.close()
        finally:
            backend.stop()
        if backend.errors:
            raise RuntimeError(f"the simulated backend failed: {backend.errors}")
        xen.assert_no_leaks(FE_DOMID)
    finally:
        xen.close()


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Read exactly *n* bytes; ``None`` on a clean end of stream before any.

    :raises ConnectionError: if the stream ends inside the *n* bytes
    """
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) == n:
        return data
    if not data:
        return None
    parts = [data]
    got = len(data)
    while got < n:
        more = sock.recv(n - got)
        if not more:
            raise ConnectionError(f"stream ended after {got} of {n} bytes")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def recv_frame(sock: socket.socket) -> bytes | None:
    """Read one size-prefixed 9P frame; ``None`` at a clean end of stream.

    :raises ConnectionError: on a truncated or malformed frame
    """
    head = recv_exact(sock, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "little")
    if size < HEADER_SIZE:
        raise ConnectionError(f"frame announces {size} bytes")
    rest = recv_exact(sock, size - 4)
    if rest is None:
        raise ConnectionError("stream ended inside a frame")
    return head + rest


class SocketEcho:
    """A socketpair with a minimal framed echo server thread on one end and a
    multiplexing client on the other.

    The client is what a concurrent 9P client over a socket is: callers send
    under a lock and wait on a future; a receiver thread reads replies and
    completes the future of their tag.  :meth:`direct` is the single-caller
    alternative (blocking send and receive, no receiver thread).

    :param handler: ``request -> reply`` (the same echo as the backend's)
    """

    def __init__(self, handler: Callable[[bytes], bytes]) -> None:
        self._handler = handler
        self._client, self._server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._pending: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._mux = False
        self.failure: BaseException | None = None
        self._serve_thread = threading.Thread(target=self._serve, name="bench-echo", daemon=True)
        self._serve_thread.start()
        self._receiver: threading.Thread | None = None

    def _serve(self) -> None:
        try:
            while (request := recv_frame(self._server)) is not None:
                self._server.sendall(self._handler(request))
        except OSError as exc:  # the client end went away mid-frame
            self.failure = exc

    def start_mux(self) -> None:
        """Start the receiver thread (before the first :meth:`request`)."""
        self._mux = True
        self._receiver = threading.Thread(target=self._receive, name="bench-rx", daemon=True)
        self._receiver.start()

    def _receive(self) -> None:
        error: BaseException = ConnectionError("the socket closed")
        try:
            while (reply := recv_frame(self._client)) is not None:
                tag = int.from_bytes(reply[5:7], "little")
                with self._lock:
                    future = self._pending.pop(tag, None)
                if future is None:
                    raise ConnectionError(f"reply for tag {tag} not in flight")
                future.set_result(reply)
        except OSError as exc:
            error = exc
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(error)

    def request(self, message: bytes) -> bytes:
        """Send *message* and wait for the reply with its tag (multiplexed).

        :raises ValueError: if the tag is already in flight
        :raises TimeoutError: no reply within the benchmark's wait limit
        """
        tag = int.from_bytes(message[5:7], "little")
        future: Future[bytes] = Future()
        with self._lock:
            if tag in self._pending:
                raise ValueError(f"tag {tag} already in flight")
            self._pending[tag] = future
        with self._send_lock:
            self._client.sendall(message)
        return future.result(WAIT)

    def direct(self, message: bytes) -> bytes:
        """Send *message* and read the reply in the calling thread.

        Only valid while no receiver thread runs.

        :raises ConnectionError: if the server closed the stream
        """
        assert not self._mux, "direct() while the receiver thread runs"
        self._client.sendall(message)
        reply = recv_frame(self._client)
        if reply is None:
            raise ConnectionError("the echo server closed the stream")
        return reply

    def close(self) -> None:
        """End the stream, join both threads (bounded) and close both ends."""
        try:
            self._client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for thread in (self._receiver, self._serve_thread):
            if thread is not None:
                thread.join(WAIT)
                if thread.is_alive():
                    raise RuntimeError(f"thread {thread.name} did not stop")
        self._client.close()
        self._server.close()
        if self.failure is not None:
            raise RuntimeError(f"the echo server failed: {self.failure!r}")


@contextmanager
def socket_echo(mux: bool = True) -> Iterator[SocketEcho]:
    """A :class:`SocketEcho` with the backend's echo handler, closed on exit."""
    echo = SocketEcho(echo_handler)
    try:
        if mux:
            echo.start_mux()
        yield echo
    finally:
        echo.close()


def run_clients(
    request: Request,
    messages: Sequence[bytes],
    count: int,
    units: float | None = None,
    reply_size: Callable[[bytes], int] = len,
) -> Sample:
    """Send ``messages[i]`` *count* times from thread *i*, each waiting for
    its reply before the next.

    :param units: what the sample counts (default: the round trips)
    :param reply_size: the size of the reply a request returned (its length;
        its header's size field when the data went elsewhere)

    One message means the calling thread does the work itself.

    :raises RuntimeError: a wrong-sized reply, or a caller thread that failed
        or did not finish within the wait limit
    """

    def work(message: bytes) -> None:
        expected = len(message)
        for _ in range(count):
            if reply_size(request(message)) != expected:
                raise RuntimeError("reply of the wrong size")

    done = count * len(messages) if units is None else units
    if len(messages) == 1:
        with timed(done) as t:
            work(messages[0])
        return t.sample

    errors: list[BaseException] = []
    barrier = threading.Barrier(len(messages) + 1, timeout=WAIT)
    finished = threading.Barrier(len(messages) + 1, timeout=WAIT * 2)
    # the callers live on until the sample is taken: their CPU is read per thread
    release = threading.Event()

    def thread_main(message: bytes) -> None:
        try:
            barrier.wait()
            work(message)
        except BaseException as exc:
            errors.append(exc)
        try:
            finished.wait()
        except threading.BrokenBarrierError:
            pass
        release.wait(WAIT)

    threads = [
        threading.Thread(target=thread_main, args=(m,), name=f"bench-caller{i}", daemon=True)
        for i, m in enumerate(messages)
    ]
    for thread in threads:
        thread.start()
    try:
        with timed(done) as t:
            barrier.wait()
            try:
                finished.wait()
            except threading.BrokenBarrierError:
                pass
    finally:
        release.set()
    deadline = time.monotonic() + WAIT * 2
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("caller threads did not finish in time")
    if errors:
        raise RuntimeError(f"a caller failed: {errors[0]!r}") from errors[0]
    return t.sample


def check_echo(request: Request, message: bytes) -> None:
    """Send *message* once and check that the reply is its echo.

    :raises RuntimeError: if it is not
    """
    reply = request(message)
    if reply != echo_handler(message):
        raise RuntimeError("the reply is not the echo of the request")


def sim_request(frontend: Frontend) -> Request:
    """``message -> reply`` through *frontend*, with the benchmark's wait limit."""

    def request(message: bytes) -> bytes:
        return frontend.request(message, timeout=WAIT)

    return request


def bench_small(threads: int, count: int, options: Options, out: TextIO) -> Result:
    """Small-frame round trips: simulated Xen against the socketpair."""
    messages = [frame(TREAD, tag, SMALL_BODY) for tag in range(threads)]
    name = f"rt_small_{threads}thread" + ("s" if threads > 1 else "")
    comment(
        f"{name}: {len(messages[0])}-byte frames, {threads} caller thread(s) x {count}"
        " round trips per repetition",
        out,
    )
    with simulated_frontend() as frontend, socket_echo() as echo:
        comment(
            f"{name}: frontend rings={frontend.num_rings} order={frontend.ring_order}", out
        )
        check_echo(sim_request(frontend), messages[0])
        check_echo(echo.request, messages[0])
        runs = measure_pair(
            lambda: run_clients(sim_request(frontend), messages, count),
            lambda: run_clients(echo.request, messages, count),
            options,
        )
    return Result(
        name,
        "sim",
        "socket",
        "rt",
        *runs,
        params={"threads": threads, "count": count, "frame": len(messages[0])},
    )


def bench_socket_mux(count: int, options: Options, out: TextIO) -> Result:
    """The multiplexing socket client against blocking send/recv in one thread."""
    message = frame(TREAD, 0, SMALL_BODY)
    comment(f"rt_small_socket_mux_vs_direct: 1 caller x {count} round trips", out)
    with socket_echo(mux=False) as direct, socket_echo() as mux:
        check_echo(direct.direct, message)
        runs = measure_pair(
            lambda: run_clients(mux.request, [message], count),
            lambda: run_clients(direct.direct, [message], count),
            options,
        )
    return Result(
        "rt_small_socket_mux_vs_direct",
        "mux",
        "direct",
        "rt",
        *runs,
        params={"threads": 1, "count": count, "frame": len(message)},
    )


def sim_read_into(frontend: Frontend, buffer: memoryview) -> Request:
    """``message -> Rread header`` through *frontend*: the message goes as two
    pieces (header, payload view), the reply's data into *buffer*."""

    def request(message: bytes) -> bytes:
        view = memoryview(message)
        head = frontend.request(
            (view[:RREAD_HEAD], view[RREAD_HEAD:]), timeout=WAIT, into=buffer
        )
        if len(head) != RREAD_HEAD:
            raise RuntimeError("the Rread's data did not go into the buffer")
        return head

    return request


def frame_size(reply: bytes) -> int:
    """The size field of a reply's header."""
    return int.from_bytes(reply[:4], "little")


def bench_large(count: int, options: Options, out: TextIO) -> Result:
    """msize round trips (request and reply both msize bytes): MB/s of requests."""
    with simulated_frontend() as frontend, socket_echo() as echo:
        msize = frontend.msize
        payload = os.urandom(msize - RREAD_HEAD)
        message = frame(TREAD, 1, len(payload).to_bytes(4, "little") + payload)
        comment(
            f"rt_large: rings={frontend.num_rings} order={frontend.ring_order}"
            f" msize={msize} B, {count} round trips per repetition (MB/s of requests;"
            " each is echoed back as an Rread: pieces out, into= back on the frontend)",
            out,
        )
        buffer = memoryview(bytearray(msize))
        sim = sim_read_into(frontend, buffer)
        check_echo(sim_request(frontend), message)
        expected = echo_handler(message)[:RREAD_HEAD]
        if sim(message) != expected or buffer[: len(payload)] != payload:
            raise RuntimeError("the Rread's data did not arrive whole in the buffer")
        check_echo(echo.request, message)
        moved = count * msize / MB
        runs = measure_pair(
            lambda: run_clients(sim, [message], count, moved, frame_size),
            lambda: run_clients(echo.request, [message], count, moved),
            options,
        )
    return Result(
        "rt_large",
        "sim",
        "socket",
        "MB",
        *runs,
        params={"msize": msize, "count": count},
    )


# ---------------------------------------------------------------------------
# Profiling


#: Whether every thread can have its own profiler: from Python 3.12 on,
#: :mod:`cProfile` is one process-wide ``sys.monitoring`` tool that mixes the
#: threads' call stacks, so ``--profile`` is refused there.
PER_THREAD_PROFILES = sys.version_info < (3, 12)


class ThreadProfiler:
    """CPU-time profile of a call and of every thread started meanwhile.

    Python's profilers work per thread, so while :meth:`run` runs,
    :meth:`threading.Thread.run` is wrapped to run each new thread's body
    under that thread's own :class:`cProfile.Profile`, timed with
    :func:`time.thread_time` (a thread blocked in ``poll`` costs nothing).
    Collect with :meth:`stats` after those threads have ended.  Python 3.11
    and older only (see :data:`PER_THREAD_PROFILES`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: ``(thread name, profiler)`` of the caller and each thread started.
        self.profiles: list[tuple[str, cProfile.Profile]] = []

    def run(self, func: Callable[[], T]) -> T:
        """Call *func* under the profiler, and every thread it starts.

        :raises RuntimeError: on Python 3.12 or later
        """
        if not PER_THREAD_PROFILES:
            raise RuntimeError(
                "profiling threads separately needs Python <= 3.11"
                f" (this is {sys.version.split()[0]})"
            )
        original = threading.Thread.run
        profiles, lock = self.profiles, self._lock

        def run(thread: threading.Thread) -> None:
            profiler = cProfile.Profile(time.thread_time)
            with lock:
                profiles.append((thread.name, profiler))
            profiler.runcall(original, thread)

        main = cProfile.Profile(time.thread_time)
        profiles.append((threading.current_thread().name, main))
        setattr(threading.Thread, "run", run)  # noqa: B010 - a method, patched
        try:
            result: T = main.runcall(func)
        finally:
            setattr(threading.Thread, "run", original)  # noqa: B010
        return result

    def stats(self, out: TextIO) -> pstats.Stats:
        """All threads' profiles merged (after printing each one's CPU total)."""
        merged: pstats.Stats | None = None
        for name, profiler in self.profiles:
            one = pstats.Stats(profiler, stream=out)
            total = getattr(one, "total_tt", 0.0)
            comment(f"thread {name}: {total:.3f} s CPU", out)
            if merged is None:
                merged = one
            else:
                merged.add(one)
        assert merged is not None
        return merged


def profile_small(threads: int, count: int, out: TextIO, top: int = 30) -> None:
    """Profile the small round trip through the simulated backend."""
    messages = [frame(TREAD, tag, SMALL_BODY) for tag in range(threads)]
    def work() -> Sample:
        with simulated_frontend() as frontend:
            run_clients(sim_request(frontend), messages, max(count // 10, 1))  # warm-up
            return run_clients(sim_request(frontend), messages, count)

    profiler = ThreadProfiler()
    sample = profiler.run(work)
    comment(
        f"profile: {threads} caller(s) x {count} small round trips, {sample.rate:.1f} rt/s under"
        f" the profiler ({sample.wall:.2f} s); CPU time per thread, then the top {top} functions",
        out,
    )
    profiler.stats(out).sort_stats("tottime").print_stats(top)
    out.flush()


# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the transport benchmarks; print one ratio line each.

    :returns: the process exit status
    """
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "transport benchmarks")
    parser.add_argument(
        "--only",
        action="append",
        choices=("ring", "small", "large"),
        help="run only these benchmarks (repeatable; default all)",
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="caller threads of the N-thread run (default 4)"
    )
    parser.add_argument(
        "--ring-orders",
        type=int,
        nargs="+",
        default=[8, 9],
        help="ring orders of the ring benchmark (default 8 9)",
    )
    parser.add_argument(
        "--ring-mib",
        type=int,
        default=None,
        help="MiB per repetition of the ring benchmark (default 64; 1 with --quick)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the small round trip (1 caller, or --threads with --only small)"
        " instead of benchmarking",
    )
    args = parser.parse_args(argv)
    options = options_from(args)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if not all(MIN_RING_ORDER <= order <= MAX_RING_ORDER for order in args.ring_orders):
        parser.error(f"--ring-orders must be in {MIN_RING_ORDER}..{MAX_RING_ORDER}")
    if args.ring_mib is not None and args.ring_mib < 1:
        parser.error("--ring-mib must be >= 1")
    out = sys.stderr if args.json == "-" else sys.stdout
    quick = options.quick
    small_count = 40 if quick else 3000
    threaded_count = 20 if quick else 1000
    large_count = 4 if quick else 150
    ring_bytes = (args.ring_mib if args.ring_mib is not None else (1 if quick else 64)) << 20

    if args.profile:
        if not PER_THREAD_PROFILES:
            parser.error(
                "--profile needs Python 3.11 or older (cProfile cannot profile"
                " threads separately from 3.12 on)"
            )
        threads = args.threads if args.only == ["small"] else 1
        profile_small(threads, 200 if quick else 5000, out)
        return 0

    selected = set(args.only or ("ring", "small", "large"))
    env = environment()
    comment(
        f"python {env['python']} on {env['machine']}, {env['cpus']} CPUs;"
        f" {options.warmup} warm-up + {options.repeat} timed repetitions, medians",
        out,
    )
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        result.print_lines(out)

    if "ring" in selected:
        for order in args.ring_orders:
            for result in bench_ring(order, ring_bytes, options, out):
                emit(result)
    if "small" in selected:
        emit(bench_small(1, small_count, options, out))
        if args.threads > 1:
            emit(bench_small(args.threads, threaded_count, options, out))
        emit(bench_socket_mux(small_count, options, out))
    if "large" in selected:
        emit(bench_large(large_count, options, out))
    report(results, args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
