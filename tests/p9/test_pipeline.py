"""Pipelined compound operations (issue 11): chains written back to back on one ring.

A stat is walk + getattr + clunk on one ring, a small read_bytes walk +
getattr + open + read + clunk; the caller does not wait for the clunk.
Checked here: against the simulated Xen (two rings), over a socket, and
against the scripted hostile server behind a transport that has ``submit``
(the server runs each request in order, as QEMU does; the replies may come
back out of order, late or never): the first failing step's errno, no fid
leak (``fid_count`` back to 1), no hang.  Also the session's
transport adapter (:class:`~pyxen9p.p9.session.Wire`) against a transport
of today's contract (``submit(bytes)``) and one of the new contract
(message pieces, ``into``, ``submit_many``).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import queue
import stat as stat_module
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
from frontend_helpers import FE_DOMID, machine
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen9p.errors import TransportClosedError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client, CopyError
from pyxen9p.p9.server import FileServer
from pyxen9p.p9.session import TagAllocator, Wire

from .hostile import SILENCE, HostileServer, Script, on
from .userver import UServer

# --------------------------------------------------------------------------
# A transport with submit() to the hostile server


class AsyncTransport:
    """A transport of today's contract (``submit(bytes) -> Future``) to a
    :class:`HostileServer`, with rings.

    One thread runs the requests in the order submitted (as QEMU's backend
    runs a ring's); the replies are handed back in batches, reversed when
    *reorder* (a chain's replies out of order).  A script's SILENCE leaves
    the future pending until a Tflush frees the tag.
    """

    in_order = True

    def __init__(self, server: HostileServer, *, rings: int = 2, reorder: bool = False) -> None:
        self.server = server
        self.num_rings = rings
        self.msize = 256 * 1024
        self.reorder = reorder
        self.closed = False
        self.sent: list[c.Message] = []
        self.pieces_seen = 0
        self._pending: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, bytes, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _join(self, message: Any) -> bytes:
        return bytes(message)

    def submit(self, message: bytes, *, timeout: float | None = None) -> Future[bytes]:
        return self._submit(self._join(message), None)

    def _submit(self, data: bytes, into: memoryview | None) -> Future[bytes]:
        if self.closed:
            raise TransportClosedError(errno.ENOTCONN, "closed")
        tag = struct.unpack_from("<H", data, 5)[0]
        future: Future[bytes] = Future()
        with self._lock:
            if tag in self._pending:
                raise ValueError(f"tag {tag} is already in flight")
            self._pending[tag] = future
            try:
                self.sent.append(c.decode(data))
            except c.ProtocolError:
                self.sent.append(c.decode(data, c.VERSION_9P2000_U))
        self._queue.put((tag, data, into))
        return future

    def request(self, message: bytes, *, timeout: float | None = None) -> bytes:
        future = self.submit(message, timeout=timeout)
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise TimeoutError(errno.ETIMEDOUT, "no reply") from None

    def _deliver(self, tag: int, reply: bytes, into: memoryview | None) -> None:
        with self._lock:
            future = self._pending.pop(tag, None)
        if future is None:
            return
        if into is not None and reply[4] == 117:
            (count,) = struct.unpack_from("<I", reply, 7)
            into[:count] = reply[11 : 11 + count]
            reply = reply[:11]
        future.set_result(reply)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            time.sleep(0.002)  # let a chain arrive whole
            batch = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            answers = []
            for tag, data, into in batch:  # run in order
                reply = self.server.answer(data)
                if reply is not None:
                    answers.append((tag, reply, into))
            if self.reorder:
                answers.reverse()
            for answer in answers:
                self._deliver(*answer)

    def flushed(self, tag: int) -> None:
        with self._lock:
            future = self._pending.pop(tag, None)
        if future is not None and not future.done():
            future.set_exception(InterruptedError(errno.EINTR, f"tag {tag} was flushed"))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.put(None)
        self._thread.join(5)
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(TransportClosedError(errno.ENOTCONN, "closed"))


class NewAsyncTransport(AsyncTransport):
    """The new contract: message pieces, ``into``, ``submit_many``."""

    def _join(self, message: Any) -> bytes:
        if isinstance(message, tuple):
            self.pieces_seen += 1
            return b"".join(bytes(p) for p in message)
        return bytes(message)

    def submit(  # type: ignore[override]
        self, message: Any, *, timeout: float | None = None, into: memoryview | None = None
    ) -> Future[bytes]:
        return self._submit(self._join(message), into)

    def submit_many(
        self, messages: list[Any], *, timeout: float | None = None
    ) -> list[Future[bytes]]:
        return [self.submit(m, timeout=timeout) for m in messages]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(b"hello")
    (export / "d").mkdir()
    (export / "d" / "g").write_bytes(b"x" * 10)
    os.symlink("d/g", export / "link")
    return export


@pytest.fixture(params=["old", "new"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def scripted(
    root: Path, kind: str, script: Script | None = None, *, reorder: bool = True, **options: Any
) -> tuple[HostileServer, AsyncTransport, Client]:
    server = HostileServer(root, script)
    cls = NewAsyncTransport if kind == "new" else AsyncTransport
    transport = cls(server, reorder=reorder)
    options.setdefault("aname", str(root))
    options.setdefault("timeout", 5)
    client = Client(transport, **options)
    return server, transport, client


@pytest.fixture
def hostile_client(root: Path, kind: str) -> Iterator[tuple[HostileServer, AsyncTransport, Client]]:
    server, transport, client = scripted(root, kind)
    try:
        yield server, transport, client
    finally:
        client.close()
        server.close()


def sent_types(transport: AsyncTransport, start: int) -> list[str]:
    return [type(m).__name__ for m in transport.sent[start:]]


# --------------------------------------------------------------------------
# Pure parts


def test_a_group_of_tags_is_on_one_ring() -> None:
    tags = TagAllocator()
    for modulus in (1, 2, 3, 8):
        group = tags.acquire_group(4, modulus)
        assert group is not None and len(set(group)) == 4
        assert len({t % modulus for t in group}) == 1
    # the next group starts on the next ring
    a = tags.acquire_group(2, 2)
    b = tags.acquire_group(2, 2)
    assert a is not None and b is not None and a[0] % 2 != b[0] % 2
    full = TagAllocator()
    full.busy = set(range(0xFFFF)) - {0, 2}
    assert full.acquire_group(3, 2) is None and full.busy == set(range(0xFFFF)) - {0, 2}


def test_the_wire_detects_what_the_transport_offers(root: Path) -> None:
    class RequestOnly:
        msize = 8192

        def request(self, message: bytes, *, timeout: float | None = None) -> bytes:
            raise AssertionError

    wire = Wire(RequestOnly())
    assert (wire.asynchronous, wire.into, wire.batch, wire.ordered, wire.num_rings) == (
        False, False, False, False, 1,
    )  # fmt: skip
    with HostileServer(root) as server:
        old = AsyncTransport(server)
        new = NewAsyncTransport(server, rings=3)
        try:
            wire = Wire(old)
            assert (wire.asynchronous, wire.into, wire.batch, wire.ordered) == (
                True, False, False, True,
            )  # fmt: skip
            wire = Wire(new)
            assert (wire.into, wire.batch, wire.num_rings) == (True, True, 3)
            assert Wire(new, ordered=False).ordered is False
            new.in_order = None  # type: ignore[assignment]  # says nothing
            assert Wire(new).ordered is False  # rings alone do not say it
            new.ring_order = 8  # type: ignore[attr-defined]
            assert Wire(new).ordered is False  # nor a ring order: in_order must say it
            new.in_order = True
            assert Wire(new).ordered is True
        finally:
            old.close()
            new.close()


# --------------------------------------------------------------------------
# Against the hostile server


class LazyTransport(NewAsyncTransport):
    """The new contract with the Xen frontend's ``lazy``: ``submit`` and
    ``submit_many`` may take ``lazy=True`` (*takes_lazy*), and ``lazy(tag)``
    marks a request in flight as nobody's to wait for promptly."""

    def __init__(self, server: HostileServer, *, takes_lazy: bool) -> None:
        super().__init__(server)
        self.takes_lazy = takes_lazy
        self.lazy_sent: list[int] = []  # tags submitted with lazy=True
        self.marked: list[int] = []  # tags given to lazy()

    def _note(self, message: Any, lazy: bool) -> None:
        if lazy:
            data = message[0] if isinstance(message, tuple) else message
            self.lazy_sent.append(struct.unpack_from("<H", data, 5)[0])

    def submit_many(
        self, messages: list[Any], *, timeout: float | None = None, **lazy: bool
    ) -> list[Future[bytes]]:
        for m in messages:
            self._note(m, lazy.get("lazy", False))
        return super().submit_many(messages, timeout=timeout)

    def lazy(self, tag: int) -> None:
        self.marked.append(tag)


class LazyAtSubmit(LazyTransport):
    def submit(  # type: ignore[override]
        self,
        message: Any,
        *,
        timeout: float | None = None,
        into: memoryview | None = None,
        lazy: bool = False,
    ) -> Future[bytes]:
        self._note(message, lazy)
        return super().submit(message, timeout=timeout, into=into)


@pytest.mark.parametrize("takes_lazy", [True, False])
def test_the_background_clunk_is_lazy_from_its_submit(root: Path, takes_lazy: bool) -> None:
    """A stat's Tclunk, which nobody waits for, is lazy for the transport:
    sent with ``lazy=True`` where the transport takes it (then not marked
    again: a call and a lock less per operation), else marked with ``lazy``."""
    server = HostileServer(root)
    cls = LazyAtSubmit if takes_lazy else LazyTransport
    transport = cls(server, takes_lazy=takes_lazy)
    with server, Client(transport, aname=str(root), timeout=5) as client:
        assert client.session.wire.lazy_submit is takes_lazy
        start = len(transport.sent)
        for _ in range(3):
            assert client.stat("f").st_size == 5
        assert client.fid_count == 1
        clunks = [m.tag for m in transport.sent[start:] if isinstance(m, c.Tclunk)]
        assert len(clunks) == 3
        if takes_lazy:
            assert set(clunks) <= set(transport.lazy_sent) and transport.marked == []
        else:
            assert transport.lazy_sent == [] and transport.marked == clunks


def test_a_stat_reads_the_clock_once_in_the_session(
    hostile_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One deadline per operation: the session reads the clock once per
    stat (a system call in a PV dom0 without vDSO), for the chain's deadline
    and its clunk's; the wait for the replies is given the timeout itself."""
    import pyxen9p.p9.session as session_module

    _server, _transport, client = hostile_client
    reads: list[float] = []

    class Clock:
        def monotonic(self) -> float:
            reads.append(time.monotonic())
            return reads[-1]

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    client.stat("f")
    client.fid_count  # noqa: B018 - no clunk left in flight
    monkeypatch.setattr(session_module, "time", Clock())
    for _ in range(5):
        assert client.stat("f").st_size == 5
    assert len(reads) <= 5 + 1  # one a stat (and one for a clunk expiry check)
    assert len(reads) >= 5


@pytest.mark.parametrize(
    ("call", "step"),
    [(lambda client: client.stat("d/g").st_size == 10, "Tgetattr"),
     (lambda client: client.readlink("link") == "d/g", "Treadlink")],
    ids=["stat", "readlink"],
)  # fmt: skip
def test_a_step_is_one_chain_and_does_not_wait_for_the_clunk(
    hostile_client: Any, call: Callable[[Client], bool], step: str
) -> None:
    _server, transport, client = hostile_client
    assert client.pipelined
    start = len(transport.sent)
    assert call(client)
    assert sent_types(transport, start) == ["Twalk", step, "Tclunk"]
    walk, middle, clunk = transport.sent[start:]
    assert walk.tag % 2 == middle.tag % 2 == clunk.tag % 2  # one ring
    assert middle.fid == clunk.fid == walk.newfid
    assert client.fid_count == 1 and client.tags_in_use == 0


def test_a_failed_walk_gives_the_walks_errno(root: Path, kind: str) -> None:
    def script(request: c.Message, honest: Any) -> Any:
        if isinstance(request, c.Twalk) and request.wnames == ("f",):
            return c.Rlerror(request.tag, errno.EACCES)
        return None

    server, _transport, client = scripted(root, kind, script)
    with server, client:
        with pytest.raises(PermissionError) as info:
            client.stat("f")
        assert info.value.errno == errno.EACCES and info.value.filename == "f"
        with pytest.raises(FileNotFoundError):
            client.stat("missing")  # the real ENOENT of the walk
        assert not client.exists("missing") and not client.is_dir("missing")
        assert client.fid_count == 1 and client.lost_fids == 0


def test_readlink_errors_and_links_on_the_way(root: Path, kind: str) -> None:
    """The chain's errors are the sequential way's: the walk's ENOENT, the
    server's EINVAL for a file that is no link, ENOTDIR under a file; a
    link on the way, or more names than one Twalk takes, go the sequential
    way and still give the target."""
    os.symlink("d", root / "dl")
    os.symlink("g", root / "d" / "l2")
    deep = root.joinpath(*(f"p{i}" for i in range(20)))
    deep.mkdir(parents=True)
    os.symlink("far", deep / "l3")
    script = on(
        c.Treadlink, lambda r, h: c.Rlerror(r.tag, errno.EACCES) if r.fid == 4242 else None
    )
    server, _transport, client = scripted(root, kind, script)
    with server, client:
        with pytest.raises(FileNotFoundError):
            client.readlink("missing")
        with pytest.raises(OSError) as info:
            client.readlink("f")
        assert info.value.errno == errno.EINVAL
        with pytest.raises(NotADirectoryError):
            client.readlink("f/x")
        assert client.readlink("dl/l2") == "g"  # through the link dl
        assert client.readlink("/".join(f"p{i}" for i in range(20)) + "/l3") == "far"
        assert client.fid_count == 1 and client.lost_fids == 0 and client.tags_in_use == 0


def test_readlinks_of_a_listing_are_chains_in_flight_together(root: Path, kind: str) -> None:
    """``_readlink_many`` (``ls -l``): one chain per path, a batch at a time,
    each result in its path's place, an error where the path fails (the
    server's, or the walk's), the others unaffected."""
    (root / "links").mkdir()
    for i in range(9):
        os.symlink(f"t{i}", root / "links" / f"l{i}")
    server, transport, client = scripted(root, kind)
    # how many messages had been sent when the server ran each Treadlink
    sent_by_then: list[int] = []

    def record(request: c.Message, honest: Any) -> Any:
        if isinstance(request, c.Treadlink):
            sent_by_then.append(len(transport.sent))
        return None

    server.script = record
    with server, client:
        client.batch = 4
        paths = [f"links/l{i}" for i in range(9)] + ["links/missing", "f"]
        start = len(transport.sent)
        got = client._readlink_many(paths)
        assert got[:9] == [f"t{i}" for i in range(9)]
        assert isinstance(got[9], FileNotFoundError)
        assert isinstance(got[10], OSError) and got[10].errno == errno.EINVAL
        # three batches of at most four chains, each chain walk, readlink, clunk
        types = sent_types(transport, start)
        assert types == ["Twalk", "Treadlink", "Tclunk"] * 11
        # the chains of a batch in flight together: the server ran the first
        # readlink after the second chain was sent (one after another: after
        # the first's walk and readlink only, start + 2)
        assert sent_by_then[0] >= start + 4 and sent_by_then[4] >= start + 16, sent_by_then
        # a readlink that fails fails its own path only
        chains: list[int] = []

        def fail_the_third(request: c.Message, honest: Any) -> Any:
            if isinstance(request, c.Treadlink):
                chains.append(request.tag)
                if len(chains) == 3:
                    return c.Rlerror(request.tag, errno.EIO)
            return None

        server.script = fail_the_third
        got = client._readlink_many(paths[:5])
        assert [g if isinstance(g, str) else g.errno for g in got] == [
            "t0", "t1", errno.EIO, "t3", "t4"
        ]
        assert client.fid_count == 1 and client.lost_fids == 0 and client.tags_in_use == 0


def test_a_failed_getattr_gives_its_errno(root: Path, kind: str) -> None:
    script = on(c.Tgetattr, lambda r, h: c.Rlerror(r.tag, errno.EIO))
    server, _transport, client = scripted(root, kind, script)
    with server, client:
        with pytest.raises(OSError) as info:
            client.stat("f")
        assert info.value.errno == errno.EIO
        assert client.fid_count == 1


def test_a_short_walk_is_enoent(root: Path, kind: str) -> None:
    def script(request: c.Message, honest: Any) -> Any:
        if isinstance(request, c.Twalk) and request.wnames == ("d", "g"):
            reply = honest()
            return c.Rwalk(request.tag, reply.wqids[:1])
        return None

    server, _transport, client = scripted(root, kind, script)
    with server, client:
        with pytest.raises(FileNotFoundError) as info:
            client.stat("d/g")
        assert info.value.errno == errno.ENOENT and info.value.filename == "d/g"
        with pytest.raises(FileNotFoundError):
            client.read_bytes("d/g")
        assert client.fid_count == 1


def test_a_clunk_never_answered_gives_the_fid_up_without_a_hang(root: Path, kind: str) -> None:
    silenced: list[int] = []

    def script(request: c.Message, honest: Any) -> Any:
        if isinstance(request, c.Tclunk) and request.fid != 0 and not silenced:
            silenced.append(request.fid)
            return SILENCE
        return None

    server, transport, client = scripted(root, kind, script, timeout=0.5)
    with server, client:
        assert client.session.root_fid == 0
        started = time.monotonic()
        assert client.stat("f").st_size == 5  # returns without waiting for the clunk
        assert time.monotonic() - started < 0.4
        assert client.fid_count == 1  # given up after the timeout
        assert client.lost_fids == 1
        assert client.session.clunks_in_flight == 0
        assert len(silenced) == 1
        assert client.stat("f").st_size == 5  # the session goes on, with another fid
        assert transport.sent[-1].fid != silenced[0]  # the fid given up is not reused
        assert client.fid_count == 1


def test_an_error_reply_to_the_clunk_still_frees_the_fid(root: Path, kind: str) -> None:
    def script(request: c.Message, honest: Any) -> Any:
        if isinstance(request, c.Tclunk) and request.fid != 0:
            honest()
            return c.Rlerror(request.tag, errno.EIO)
        return None

    server, _transport, client = scripted(root, kind, script)
    with server, client:
        for _ in range(3):
            assert client.stat("f").st_size == 5
        assert client.fid_count == 1 and client.lost_fids == 0
        assert client.tags_in_use == 0


def test_a_walk_never_answered_times_out_and_leaks_nothing(root: Path, kind: str) -> None:
    script = on(c.Twalk, lambda r, h: SILENCE if r.wnames == ("f",) else None)
    server, _transport, client = scripted(root, kind, script, timeout=0.3)
    with server, client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.stat("f")
        assert time.monotonic() - started < 3
        assert client.fid_count == 1
        assert client.stat("d").st_mode & stat_module.S_IFDIR


def test_small_read_is_one_chain(hostile_client: Any, root: Path) -> None:
    _server, transport, client = hostile_client
    start = len(transport.sent)
    assert client.read_bytes("f") == b"hello"
    assert sent_types(transport, start) == ["Twalk", "Tgetattr", "Tlopen", "Tread", "Tclunk"]
    assert client.read_bytes("link") == b"x" * 10  # a link: the usual way
    big = os.urandom(client.default_iounit * 2 + 5)
    (root / "big").write_bytes(big)
    assert client.read_bytes("big") == big  # larger than one read: the usual way
    (root / "empty").write_bytes(b"")
    assert client.read_bytes("empty") == b""
    with pytest.raises(IsADirectoryError):
        client.read_bytes("d")
    with pytest.raises(FileNotFoundError):
        client.read_bytes("nothing")
    client.max_read = 3
    with pytest.raises(OSError) as info:
        client.read_bytes("f")
    assert info.value.errno == errno.EFBIG
    assert client.fid_count == 1


def test_small_read_maps_a_failed_open_to_its_errno(root: Path, kind: str) -> None:
    script = on(c.Tlopen, lambda r, h: c.Rlerror(r.tag, errno.EACCES))
    server, _transport, client = scripted(root, kind, script)
    with server, client:
        with pytest.raises(PermissionError):
            client.read_bytes("f")
        assert client.fid_count == 1


def test_reads_and_writes_use_the_new_contract(root: Path) -> None:
    server, transport, client = scripted(root, "new", reorder=False, window=4)
    with server, client:
        data = os.urandom(client.default_iounit * 5 + 123)
        client.write_bytes("w", data)
        assert transport.pieces_seen >= 6  # every Twrite went as (header, payload)
        assert (root / "w").read_bytes() == data
        buf = bytearray(len(data) + 10)
        with client.open("w", "rb", buffering=0) as f:
            got = 0
            while n := f.readinto(memoryview(buf)[got:]):
                got += n
        assert got == len(data) and bytes(buf[:got]) == data
        assert client.read_bytes("w") == data
        dst = root.parent / "out"
        client.copy_out("w", dst)
        assert dst.read_bytes() == data
        assert client.fid_count == 1


def test_a_small_download_sends_one_read(hostile_client: Any, root: Path, tmp_path: Path) -> None:
    _server, transport, client = hostile_client
    start = len(transport.sent)
    client.copy_out("f", tmp_path / "f-copy")
    assert (tmp_path / "f-copy").read_bytes() == b"hello"
    assert sent_types(transport, start).count("Tread") == 1


def _small_tree(top: Path, n: int) -> dict[str, bytes]:
    """*n* small files under *top* (each naming itself first), one large
    file and a subdirectory with two small ones: ``{relative path: data}``."""
    files = {f"s{i:02d}": f"s{i:02d}:".encode() + os.urandom(i * 37) for i in range(n)}
    files["big"] = os.urandom(300 * 1024)  # more than one read: the usual way
    files["sub/a"] = b"a:" + os.urandom(10)
    files["sub/b"] = b""
    (top / "sub").mkdir(parents=True)
    for rel, data in files.items():
        (top / rel).write_bytes(data)
        os.chmod(top / rel, 0o640)
    return files


def test_copy_out_reads_small_files_in_chains_in_flight_together(
    root: Path, kind: str, tmp_path: Path
) -> None:
    """A tree's small files come as walk + getattr + open + read + clunk
    chains, a batch in flight at once; what lands locally is each file's
    data with its mode and times, the large file too (the usual way)."""
    files = _small_tree(root / "tree", 20)
    server, transport, client = scripted(root, kind)
    # for each Tread the server ran: whether more was sent after it by then
    # (its chain's Tclunk; one file after another, the read is the last sent)
    followed: list[bool] = []

    def record(request: c.Message, honest: Any) -> Any:
        if isinstance(request, c.Tread):
            last = transport.sent[-1]
            followed.append(not (isinstance(last, c.Tread) and last.tag == request.tag))
        return None

    server.script = record
    with server, client:
        client.batch = 8
        done = client.copy_out("tree", tmp_path / "out")
        assert done == sum(len(d) for d in files.values())
        for rel, data in files.items():
            local = tmp_path / "out" / rel
            assert local.read_bytes() == data, rel
            assert local.stat().st_mode & 0o777 == 0o640
            assert local.stat().st_mtime_ns == (root / "tree" / rel).stat().st_mtime_ns
        # every small file's read ran with its chain sent whole
        assert sum(followed) >= 22, followed
        assert client.fid_count == 1 and client.tags_in_use == 0 and client.lost_fids == 0


def test_copy_out_falls_back_for_a_small_file_the_chain_could_not_read(
    root: Path, kind: str, tmp_path: Path
) -> None:
    """A small file whose first read comes short (it shrank, or the server
    says so) is read the usual way, to its end; one whose open fails is
    reported and the others are copied; with no_clobber an existing local
    file stays as it was."""
    files = _small_tree(root / "tree", 12)

    walked: dict[int, str] = {}  # fid -> the last name walked to it

    def script(request: c.Message, honest: Any) -> Any:
        if isinstance(request, c.Twalk) and request.wnames:
            walked[request.newfid] = request.wnames[-1]
        if isinstance(request, c.Tread) and request.offset == 0:
            reply = honest()
            if isinstance(reply, c.Rread) and reply.data.startswith(b"s03:"):
                return c.Rread(request.tag, reply.data[:-1])  # one byte short
        if isinstance(request, c.Tlopen) and walked.get(request.fid) == "s05":
            return c.Rlerror(request.tag, errno.EIO)  # in a chain or not
        return None

    server, _transport, client = scripted(root, kind, script)
    out = tmp_path / "out"
    out.mkdir()
    (out / "s07").write_bytes(b"mine")
    with server, client:
        errors: list[OSError | ValueError] = []
        client.copy_out("tree", out, no_clobber=True, on_error=errors.append)
        assert len(errors) == 1 and errors[0].errno == errno.EIO, errors
        assert (out / "s07").read_bytes() == b"mine"
        copied = {rel for rel in files if (out / rel).exists()}
        assert (out / "s03").read_bytes() == files["s03"]  # to its end, the usual way
        assert len(copied) == len(files) - 1  # all but the one whose open failed
        for rel in copied - {"s07"}:
            assert (out / rel).read_bytes() == files[rel], rel
        assert client.fid_count == 1 and client.tags_in_use == 0 and client.lost_fids == 0


def test_9p2000u_does_not_pipeline(root: Path, kind: str) -> None:
    server = UServer(root, max_open_files=50)
    transport = (NewAsyncTransport if kind == "new" else AsyncTransport)(server)  # type: ignore[arg-type]
    client = Client(transport, aname=str(root), timeout=5, version=c.VERSION_9P2000_U)
    with client:
        assert not client.pipelined
        assert client.stat("f").st_size == 5
        assert client.read_bytes("d/g") == b"x" * 10
        assert client.readlink("link") == "d/g"
        got = client._readlink_many(["link", "missing"])
        assert got[0] == "d/g" and isinstance(got[1], FileNotFoundError)
        with pytest.raises(FileNotFoundError):
            client.stat("missing")
        assert client.fid_count == 1


# --------------------------------------------------------------------------
# Many entries: attributes of a listing, removal and creation of trees


def _fill(directory: Path, n: int) -> None:
    directory.mkdir()
    for i in range(n):
        (directory / f"e{i:03d}").write_bytes(b"y" * i)


def test_listing_attributes_against_the_hostile_server(root: Path, kind: str) -> None:
    _fill(root / "many", 40)
    script = on(
        c.Twalk,
        lambda r, h: c.Rlerror(r.tag, errno.EACCES) if r.wnames[-1:] == ("e007",) else None,
    )
    server, _transport, client = scripted(root, kind, script)
    with server, client:
        client.batch = 8
        entries = sorted(client.scandir("many"), key=lambda e: e.name)
        for i, entry in enumerate(entries):
            if i == 7:
                with pytest.raises(PermissionError):
                    entry.stat()
            else:
                assert entry.stat().st_size == i
        assert client.fid_count == 1


def test_rmtree_tries_every_entry_and_reports_the_first_failure(root: Path, kind: str) -> None:
    _fill(root / "tree", 20)
    _fill(root / "tree" / "sub", 5)
    script = on(
        c.Tunlinkat,
        lambda r, h: c.Rlerror(r.tag, errno.EACCES) if r.name == "e003" else None,
    )
    server, _transport, client = scripted(root, kind, script)
    with server, client:
        with pytest.raises(PermissionError) as info:
            client.rmtree("tree")
        assert info.value.filename == "tree/e003"
        assert sorted(os.listdir(root / "tree")) == ["e003", "sub"]
        server.script = None
        client.rmtree("tree")
        assert not (root / "tree").exists()
        assert client.fid_count == 1


def test_copy_in_keeps_on_error_semantics(root: Path, kind: str, tmp_path: Path) -> None:
    local = tmp_path / "local"
    _fill(local, 30)
    (local / "bad").write_bytes(b"b")
    os.chmod(local / "e005", 0o600)
    script = on(
        c.Tlcreate,
        lambda r, h: c.Rlerror(r.tag, errno.EACCES) if r.name == "bad" else None,
    )
    server, _transport, client = scripted(root, kind, script)
    with server, client:
        errors: list[BaseException] = []
        client.copy_in(local, "copy", on_error=errors.append)
        assert [type(e) for e in errors] == [PermissionError]
        assert getattr(errors[0], "filename", "").endswith("bad")
        for i in range(30):
            got = root / "copy" / f"e{i:03d}"
            assert got.read_bytes() == b"y" * i
            assert got.stat().st_mtime_ns == (local / f"e{i:03d}").stat().st_mtime_ns
        assert stat_module.S_IMODE((root / "copy" / "e005").stat().st_mode) == 0o600
        with pytest.raises(CopyError) as info:
            client.copy_in(local, "copy2")
        assert len(info.value.errors) == 1
        # no_clobber: an existing file is left alone
        (root / "copy" / "e001").write_bytes(b"mine")
        server.script = None
        client.copy_in(local, "copy", no_clobber=True)
        assert (root / "copy" / "e001").read_bytes() == b"mine"
        assert (root / "copy" / "bad").read_bytes() == b"b"
        client.copy_in(local, "copy")
        assert (root / "copy" / "e001").read_bytes() == b"y"
        assert client.fid_count == 1


# --------------------------------------------------------------------------
# The simulated Xen (two rings) and a socket


@pytest.fixture(params=["simxen-1ring", "simxen-2rings", "socket"])
def any_client(root: Path, request: pytest.FixtureRequest) -> Iterator[Client]:
    if request.param == "socket":
        with HostileServer(root) as hostile, hostile.client_over_socket(pipeline=True) as client:
            yield client
        return
    server = FileServer(root)
    try:
        with machine(handler=server.handle) as m:
            fe = m.connect(rings=1 if request.param == "simxen-1ring" else 2)
            with Client(fe, aname=str(root), timeout=20) as client:
                yield client
            assert m.xen.resources(FE_DOMID).clean
    finally:
        server.close()


def test_pipelined_paths_end_to_end(any_client: Client, root: Path, tmp_path: Path) -> None:
    client = any_client
    assert client.pipelined
    assert client.stat("f").st_size == 5
    assert client.stat("link").st_size == 10
    assert stat_module.S_ISLNK(client.lstat("link").st_mode)
    assert client.exists("d/g") and not client.exists("d/nothing")
    assert client.is_dir("d") and not client.is_dir("f") and client.is_file("f")
    assert client.is_symlink("link") and not client.is_symlink("f")
    with pytest.raises(NotADirectoryError):
        client.stat("f/x")
    assert client.read_bytes("f") == b"hello"
    deep = "/".join(f"p{i}" for i in range(20))
    (root / deep).mkdir(parents=True)
    (root / deep / "z").write_bytes(b"deep")
    assert client.read_bytes(f"{deep}/z") == b"deep"  # more names than one Twalk
    _fill(root / "many", 300)
    rows = [(e.name, e.stat(follow_symlinks=False).st_size) for e in client.scandir("many")]
    assert sorted(rows) == [(f"e{i:03d}", i) for i in range(300)]
    local = tmp_path / "local"
    _fill(local, 50)
    (local / "big").write_bytes(os.urandom(3 * client.default_iounit + 7))
    client.copy_in(local, "copied")
    for name in os.listdir(local):
        assert (root / "copied" / name).read_bytes() == (local / name).read_bytes()
    client.copy_out("copied", tmp_path / "back")  # small files in chains, the big one not
    for name in os.listdir(local):
        assert (tmp_path / "back" / name).read_bytes() == (local / name).read_bytes()
    client.rmtree("copied")
    client.rmtree("many")
    assert not (root / "copied").exists() and not (root / "many").exists()
    with pytest.raises(OSError) as info:
        client.rmtree("/")
    assert info.value.errno == errno.EBUSY
    assert client.fid_count == 1 and client.tags_in_use == 0


# --------------------------------------------------------------------------
# A transport that refuses part of a chain


def test_a_batch_refused_as_a_whole_gives_up_its_fid_and_tags(root: Path) -> None:
    server, transport, client = scripted(root, "new")
    with server, client:
        real = transport.submit_many

        def refuse(messages: list[Any], *, timeout: float | None = None) -> list[Future[bytes]]:
            raise TimeoutError(errno.ETIMEDOUT, "no room on the ring")

        transport.submit_many = refuse  # type: ignore[method-assign]
        with pytest.raises(TimeoutError):
            client.stat("f")
        # it may have been sent in part: the fid and the tags are never reused
        assert client.lost_fids == 1 and client.fid_count == 1
        assert len(client.stuck_tags) == 3
        transport.submit_many = real  # type: ignore[method-assign]
        assert client.stat("f").st_size == 5
        assert client.fid_count == 1


def test_a_chain_sent_in_part_is_cleaned_up(root: Path) -> None:
    server, transport, client = scripted(root, "old")
    with server, client:
        real = transport.submit
        calls = []

        def second_fails(message: bytes, *, timeout: float | None = None) -> Future[bytes]:
            calls.append(message[4])
            if len(calls) == 2:
                raise TimeoutError(errno.ETIMEDOUT, "no room on the ring")
            return real(message, timeout=timeout)

        transport.submit = second_fails  # type: ignore[method-assign]
        with pytest.raises(TimeoutError):
            client.stat("f")  # the walk went out, the getattr did not
        transport.submit = real  # type: ignore[method-assign]
        # the Tclunk that was not sent with the chain was sent on its own
        assert client.fid_count == 1 and client.lost_fids == 0
        assert client.tags_in_use == 0 and not client.stuck_tags
        assert isinstance(transport.sent[-1], c.Tclunk)
        assert client.stat("f").st_size == 5


def test_an_interrupted_chain_gives_up_exactly_the_steps_not_settled(root: Path) -> None:
    """Chain.finish interrupted while settling a step: that step and those
    after it are given up (their tags freed), the ones before are not; the
    walked fid is still clunked."""
    server, _transport, client = scripted(root, "new")
    with server, client:

        def after(fid: int) -> Any:
            getattr_ = functools.partial(c.Tgetattr, fid=fid, request_mask=c.P9_GETATTR_BASIC)
            return ((getattr_, c.Rgetattr), (getattr_, c.Rgetattr))

        chain = client._start_walk_chain("f", ["f"], after)
        assert chain is not None
        settle, give_up = chain._settle, chain._give_up
        given_up: list[int] = []

        def settle_until_the_second(i: int) -> Any:
            if i == 1:
                raise KeyboardInterrupt
            return settle(i)

        def record(i: int) -> None:
            given_up.append(i)
            give_up(i)

        chain._settle = settle_until_the_second  # type: ignore[method-assign]
        chain._give_up = record  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            chain.finish()
        assert given_up == [1, 2]
        client._session.drain_clunks(5)
        assert client.tags_in_use == 0 and not client.stuck_tags
        assert client.fid_count == 1 and client.lost_fids == 0
        assert client.stat("f").st_size == 5


def test_a_batch_the_transport_sent_in_part_clunks_what_it_walked(root: Path) -> None:
    """The transports' contract: the messages of a batch that could not be
    put come back as NotSent futures; the walk that went out is clunked on
    its own, so its fid is neither lost nor reused while the server holds it."""
    from pyxen9p._requests import failed_future

    server, transport, client = scripted(root, "new")
    with server, client:
        real = transport.submit_many

        def all_but_the_clunk(
            messages: list[Any], *, timeout: float | None = None
        ) -> list[Future[bytes]]:
            sent = real(messages[:-1], timeout=timeout)
            return [*sent, failed_future(TimeoutError(errno.ETIMEDOUT, "no room on the ring"))]

        transport.submit_many = all_but_the_clunk  # type: ignore[method-assign]
        assert client.stat("f").st_size == 5  # walk and getattr were answered
        transport.submit_many = real  # type: ignore[method-assign]
        assert client.fid_count == 1 and client.lost_fids == 0
        assert client.tags_in_use == 0 and not client.stuck_tags
        assert isinstance(transport.sent[-1], c.Tclunk)
        assert client.stat("f").st_size == 5


@pytest.mark.parametrize("failure", ["error", "short", "overlong"])
def test_a_window_of_writes_from_one_thread_reports_the_first_failure(
    root: Path, failure: str
) -> None:
    """A write of several I/O units sends every Twrite from the caller's
    thread; the one the server fails (an error, a short count, a count
    larger than sent) decides the outcome, and every tag comes back."""
    seen: list[int] = []

    def second(request: Any, honest: Callable[[], c.Message]) -> Any:
        seen.append(request.offset)
        if request.offset == 0 or len(seen) != 2:
            return None
        if failure == "error":
            return c.Rlerror(request.tag, errno.ENOSPC)
        count = len(request.data) // 2 if failure == "short" else len(request.data) + 1
        honest()
        return c.Rwrite(request.tag, count)

    server, _transport, client = scripted(root, "new", on(c.Twrite, second), window=4)
    with server, client:
        iounit = client.default_iounit
        data = os.urandom(iounit * 3)
        with client.open("w", "wb", buffering=0) as f:
            if failure == "error":
                with pytest.raises(OSError) as info:
                    f.write(data)
                assert info.value.errno == errno.ENOSPC
            elif failure == "short":
                assert f.write(data) == iounit + iounit // 2
            else:
                with pytest.raises(c.ProtocolError):
                    f.write(data)
        assert len(seen) == 3  # all three went out together
        assert client.tags_in_use == 0 and client.fid_count == 1


def _rgetattr_bytes(request: Any, honest: Callable[[], c.Message]) -> bytes:
    return c.encode(honest())


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        # another tag
        (lambda r, h: c.encode(dataclasses.replace(h(), tag=(r.tag + 1) & 0xFFFF)), "tagged"),
        # another type (an Rclunk)
        (lambda r, h: struct.pack("<IBH", 7, c.Rclunk.TYPE, r.tag), "Rclunk in reply to Tgetattr"),
        # truncated, and a byte too many
        (lambda r, h: _resized(_rgetattr_bytes(r, h), -1), "truncated"),
        (lambda r, h: _resized(_rgetattr_bytes(r, h), +1), "trailing"),
        # an error reply with an impossible error number
        (lambda r, h: c.encode(c.Rlerror(r.tag, 70000)), "invalid error number"),
        # a well-formed Rgetattr with a time's nanoseconds out of range
        (
            lambda r, h: c.encode(dataclasses.replace(h(), mtime_nsec=10**9)),
            "mtime_nsec 1000000000 is not below",
        ),
    ],
    ids=["tag", "type", "short", "long", "errno", "nsec"],
)
def test_every_reply_of_a_chain_is_checked(
    root: Path, kind: str, answer: Callable[[Any, Callable[[], c.Message]], bytes], says: str
) -> None:
    """A chain's reply of another tag or type, or malformed, fails the
    operation with a ProtocolError naming it, and leaks no fid."""
    server, _transport, client = scripted(root, kind, on(c.Tgetattr, answer))
    with server, client:
        with pytest.raises(c.ProtocolError, match=says):
            client.stat("f")
        with pytest.raises(c.ProtocolError, match=says):
            client.read_bytes("f")
        assert client.fid_count == 1 and client.lost_fids == 0
        server.script = None
        assert client.stat("f").st_size == 5 and client.read_bytes("f") == b"hello"


def _resized(frame: bytes, delta: int) -> bytes:
    """*frame* one byte shorter or longer, its size field saying so."""
    body = frame[7:-1] if delta < 0 else frame[7:] + b"\0"
    return struct.pack("<I", 7 + len(body)) + frame[4:7] + body



_U64 = st.integers(0, 2**64 - 1)
_I64 = st.integers(-(2**63), 2**63 - 1)
_NSEC = st.one_of(st.integers(0, 999_999_999), st.just(10**9), _U64)
_STAT_FIELDS = (
    "st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
    "st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
    "st_blksize", "st_blocks", "st_rdev",
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    msg=st.builds(
        c.Rgetattr, st.integers(0, 0xFFFF), _U64,
        st.builds(c.Qid, st.integers(0, 0xFF), st.integers(0, 2**32 - 1), _U64),
        st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
        _U64, _U64, _U64, _U64, _U64,
        _I64, _NSEC, _I64, _NSEC, _I64, _NSEC, _I64, _NSEC, _U64, _U64,
    ),
    other_tag=st.booleans(),
    tail=st.binary(max_size=3),
)  # fmt: skip
def test_the_fast_stat_reader_is_the_generic_path(
    msg: c.Rgetattr, other_tag: bool, tail: bytes
) -> None:
    """The getattr step's fast reader gives, for a valid Rgetattr to its
    tag, the os.stat_result of the generic decoding in every field; for
    anything else (nanoseconds out of range, another tag, another size)
    ``None``: the generic check then judges the reply."""
    from pyxen9p.p9.client import _rgetattr_stat, _stat_result

    raw = c.encode(msg) + tail
    tag = (msg.tag + other_tag) & 0xFFFF
    fast = _rgetattr_stat(raw, tag)
    if tail or other_tag:
        assert fast is None
        return
    try:
        generic = _stat_result(c.decode(raw))  # type: ignore[arg-type]
    except c.ProtocolError:
        assert fast is None  # (out-of-range nanoseconds: the generic path says which)
        return
    assert fast is not None
    for name in _STAT_FIELDS:
        assert getattr(fast, name) == getattr(generic, name), name


def test_the_getattr_step_writes_what_encode_writes() -> None:
    """The getattr step's direct bytes are encode's of its message, and the
    walk of a chain is sent as encode would (seen by the server as such)."""
    from pyxen9p.p9.client import _getattr_step
    from pyxen9p.p9.session import Direct

    ((make, rtype),) = _getattr_step(7)
    assert isinstance(make, Direct) and rtype is c.Rgetattr
    for tag in (0, 1, 0xFFFE):
        assert make.raw(tag) == c.encode(make(tag))
        assert make(tag) == c.Tgetattr(tag, 7, c.P9_GETATTR_BASIC)
