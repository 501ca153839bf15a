"""The 9P2000.L multiplexer (:mod:`pyxen9p.p9.mux`): many clients, one backend session.

Clients are pyxen9p's own :class:`~pyxen9p.p9.client.Client` over the
multiplexer's Unix socket, and scripted raw clients (:class:`RawClient`) for
the hostile cases.  Backends: pyxen9p's FileServer over a socketpair, a
:class:`GatedBackend` that holds requests back (flush races, hang-ups), the
simulated Xen, and diod.  The backend's own fid table is counted to prove
that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_tool

from pyxen9p import SimulatedTransport
from pyxen9p.errors import ProtocolError, TransportError
from pyxen9p.frontend import Frontend
from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client
from pyxen9p.p9.mux import Limits, Multiplexer, MultiplexerThread, peer_credentials
from pyxen9p.p9.transport import StreamTransport
from pyxen9p.sim.share import SimulatedShare

from .muxing import (
    GatedBackend,
    RawClient,
    file_server,
    mux_client,
    mux_on_file_server,
    mux_on_gated,
    running_mux,
    server_fids,
    wait_for,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    (export / "a.txt").write_text("hello")
    (export / "sub").mkdir()
    return export


def attach(raw: RawClient, root: Path, fid: int = 1, tag: int = 1) -> c.Message | None:
    return raw.rpc(c.Tattach(tag, fid, c.NOFID, "root", str(root), 0))


def _worker(path: str, root: Path, n: int, errors: list[BaseException]) -> None:
    try:
        with mux_client(path, root, window=4) as fs:
            data = os.urandom(300_000 + n)
            fs.makedirs(f"w{n}/deep")
            fs.write_bytes(f"w{n}/deep/data", data)
            for _ in range(20):
                assert fs.read_text("a.txt") == "hello"
                assert fs.stat(f"w{n}/deep/data").st_size == len(data)
            assert fs.read_bytes(f"w{n}/deep/data") == data
            assert sorted(fs.listdir(f"w{n}")) == ["deep"]
            fs.remove(f"w{n}/deep/data")
    except BaseException as exc:
        errors.append(exc)


# --------------------------------------------------------------------------
# Many clients, one backend session


def test_many_clients_concurrently_over_one_backend_session(root: Path, tmp_path: Path) -> None:
    with mux_on_file_server(root, tmp_path / "mux.sock") as (server, mux, path):
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_worker, args=(path, root, n, errors)) for n in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        # one backend session served them all, and every fid went back
        assert len(server._sessions - {server._default}) == 1
        wait_for(lambda: mux.clients == 0, what="the clients' release")
        assert server_fids(server) == 0
        assert mux.backend_fids() == set()
        assert mux.backend_tags() == set()
        assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"] + [
            f"w{n}" for n in range(8)
        ]


def test_version_is_answered_locally_with_at_most_the_backend_msize(
    root: Path, tmp_path: Path
) -> None:
    with mux_on_file_server(root, tmp_path / "mux.sock") as (_server, mux, path):
        assert mux.msize == 512 * 1024  # FileServer's msize
        with RawClient(path) as raw:
            assert raw.version(8 * 1024 * 1024) == c.Rversion(c.NOTAG, mux.msize, "9P2000.L")
        with RawClient(path) as raw:
            assert raw.version(8192) == c.Rversion(c.NOTAG, 8192, "9P2000.L")
            # the client's msize now bounds its frames, and its reads
            (root / "big").write_bytes(b"b" * 20000)
            assert isinstance(attach(raw, root), c.Rattach)
            assert isinstance(raw.rpc(c.Twalk(2, 1, 2, ("big",))), c.Rwalk)
            assert isinstance(raw.rpc(c.Tlopen(2, 2, c.L_O_RDONLY)), c.Rlopen)
            reply = raw.rpc(c.Tread(3, 2, 0, 20000))
            assert isinstance(reply, c.Rread) and len(reply.data) == 8192 - 11
            raw.send(c.Twrite(4, 2, 0, b"x" * 8192))  # a frame beyond the msize
            assert raw.closed_by_peer()
        for version in ("9P2000.u", "9P2000", "9P2000.L.x"):
            with RawClient(path) as raw:
                reply = raw.rpc(c.Tversion(c.NOTAG, 65536, version))
                assert reply == c.Rversion(c.NOTAG, 65536, "unknown")
                raw.send(c.Tattach(1, 1, c.NOFID, "root", str(root), 0))
                assert raw.closed_by_peer()  # no session was agreed
        with RawClient(path) as raw:  # an msize too small for 9P2000.L
            assert raw.rpc(c.Tversion(c.NOTAG, 100, "9P2000.L")) == c.Rversion(
                c.NOTAG, 100, "unknown"
            )
        with mux_client(path, root, msize=16384) as fs:
            assert fs.msize == 16384
            assert fs.read_text("a.txt") == "hello"


def test_fids_and_tags_are_each_clients_own(root: Path, tmp_path: Path) -> None:
    with mux_on_file_server(root, tmp_path / "mux.sock") as (server, mux, path):
        with RawClient(path) as a, RawClient(path) as b:
            a.version()
            b.version()
            # the same fid number and tag in both clients: two backend fids
            assert isinstance(attach(a, root, fid=7, tag=3), c.Rattach)
            assert isinstance(attach(b, root, fid=7, tag=3), c.Rattach)
            assert server_fids(server) == 2
            assert len(mux.backend_fids()) == 2
            assert isinstance(a.rpc(c.Twalk(3, 7, 8, ("a.txt",))), c.Rwalk)
            # b cannot use a's fid 8, nor guess a backend fid
            for fid in (8, *mux.backend_fids(), 0, 1, 2, 9, c.NOFID):
                assert b.rpc(c.Tgetattr(5, fid, c.P9_GETATTR_BASIC)) == c.Rlerror(
                    5, errno.EBADF
                )
            assert b.rpc(c.Tclunk(5, 8)) == c.Rlerror(5, errno.EBADF)
            reply = a.rpc(c.Tgetattr(5, 8, c.P9_GETATTR_BASIC))
            assert isinstance(reply, c.Rgetattr) and reply.size == 5
            # a new fid must not be in use; NOFID is not a fid
            assert a.rpc(c.Twalk(6, 7, 8, ())) == c.Rlerror(6, errno.EBADF)
            assert a.rpc(c.Twalk(6, 7, c.NOFID, ())) == c.Rlerror(6, errno.EBADF)
            # a failed walk creates nothing
            assert isinstance(a.rpc(c.Twalk(6, 7, 9, ("nothing",))), c.Rlerror)
            assert a.rpc(c.Tclunk(6, 9)) == c.Rlerror(6, errno.EBADF)
            # a partial walk neither
            reply = a.rpc(c.Twalk(6, 7, 9, ("sub", "nothing")))
            assert isinstance(reply, c.Rwalk) and len(reply.wqids) == 1
            assert a.rpc(c.Tclunk(6, 9)) == c.Rlerror(6, errno.EBADF)
            assert server_fids(server) == 3
            assert a.rpc(c.Tclunk(6, 8)) == c.Rclunk(6)
            assert a.rpc(c.Tclunk(6, 8)) == c.Rlerror(6, errno.EBADF)
            assert server_fids(server) == 2
        wait_for(lambda: server_fids(server) == 0, what="the fids' clunk")


def test_each_clients_attach_is_forwarded_with_its_names(root: Path, tmp_path: Path) -> None:
    with (
        mux_on_gated(root, tmp_path / "mux.sock") as (backend, _mux, path),
        RawClient(path) as a,
        RawClient(path) as b,
    ):
        a.version()
        b.version()
        assert isinstance(a.rpc(c.Tattach(1, 5, c.NOFID, "alice", str(root), 1001)), c.Rattach)
        assert isinstance(b.rpc(c.Tattach(1, 5, c.NOFID, "bob", "/", 1002)), c.Rattach)
        attaches = [m for m in backend.received if isinstance(m, c.Tattach)]
        assert [(m.uname, m.aname, m.n_uname, m.afid) for m in attaches] == [
            ("alice", str(root), 1001, c.NOFID),
            ("bob", "/", 1002, c.NOFID),
        ]
        assert attaches[0].fid != attaches[1].fid


def test_tags_are_remapped_under_concurrency(root: Path, tmp_path: Path) -> None:
    """Many clients, each with many requests in flight on the same tags."""
    payload = os.urandom(2_000_000)
    (root / "big").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    with mux_on_file_server(root, tmp_path / "mux.sock") as (server, _mux, path):
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                with mux_client(path, root, window=16, msize=65536) as fs:
                    for _ in range(2):
                        assert hashlib.sha256(fs.read_bytes("big")).hexdigest() == digest
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        wait_for(lambda: server_fids(server) == 0, what="the fids' clunk")


def test_replies_out_of_order_reach_the_right_client_and_tag(root: Path, tmp_path: Path) -> None:
    for n in range(1, 6):
        (root / f"a{n}").write_bytes(b"a" * n)
        (root / f"b{n}").write_bytes(b"b" * (10 + n))

    def hold(m: c.Message) -> bool:
        return isinstance(m, c.Tgetattr)

    with (
        mux_on_gated(root, tmp_path / "mux.sock", hold=hold) as (backend, mux, path),
        RawClient(path) as a,
        RawClient(path) as b,
    ):
        for raw, prefix in ((a, "a"), (b, "b")):
            raw.version()
            attach(raw, root)
            for n in range(1, 6):
                assert isinstance(raw.rpc(c.Twalk(1, 1, 100 + n, (f"{prefix}{n}",))), c.Rwalk)
        for n in range(1, 6):  # the same tags and fid numbers in both clients
            a.send(c.Tgetattr(n, 100 + n, c.P9_GETATTR_BASIC))
            b.send(c.Tgetattr(n, 100 + n, c.P9_GETATTR_BASIC))
        wait_for(lambda: len(backend.held) == 10, what="ten requests on the backend")
        assert len(mux.backend_tags()) == 10
        backend.release(reverse=True)
        for raw, base in ((a, 0), (b, 10)):
            replies = [raw.recv() for _ in range(5)]
            assert [m.tag for m in replies if m is not None] == [5, 4, 3, 2, 1]
            for m in replies:
                assert isinstance(m, c.Rgetattr) and m.size == base + m.tag


# --------------------------------------------------------------------------
# Tflush


def _walk_held(m: c.Message) -> bool:
    return isinstance(m, c.Twalk) and m.wnames == ("a.txt",)


class _Rings:
    """A transport that says it has *num_rings* rings (as a Xen frontend does)."""

    def __init__(self, transport: StreamTransport, num_rings: int) -> None:
        self.transport = transport
        self.num_rings = num_rings

    def __getattr__(self, name: str) -> object:
        return getattr(self.transport, name)


@pytest.mark.parametrize("rings", [1, 3])
def test_flush_of_a_cancelled_request_gives_rflush_alone(
    root: Path, tmp_path: Path, rings: int
) -> None:
    with (
        GatedBackend(root, _walk_held, "cancel") as backend,
        running_mux(_Rings(backend.transport, rings), tmp_path / "mux.sock") as (mux, path),
        RawClient(path) as raw,
    ):
        raw.version()
        attach(raw, root)
        for n in range(4):
            assert isinstance(raw.rpc(c.Twalk(n, 1, 10 + n, ())), c.Rwalk)
        raw.send(c.Twalk(10, 1, 2, ("a.txt",)))
        wait_for(lambda: backend.held, what="the walk to reach the backend")
        (walk_tag,) = backend.held
        assert raw.rpc(c.Tflush(11, 10)) == c.Rflush(11)
        # the backend's Tflush went on the walk's ring (tag % num_rings)
        flush = backend.received[-1]
        assert isinstance(flush, c.Tflush) and flush.oldtag == walk_tag
        assert flush.tag % rings == walk_tag % rings and flush.tag != walk_tag
        # the walk never happened: fid 2 does not exist and is free again
        assert raw.rpc(c.Tclunk(12, 2)) == c.Rlerror(12, errno.EBADF)
        assert isinstance(raw.rpc(c.Twalk(10, 1, 2, ("sub",))), c.Rwalk)
        assert backend.fids() == 6
        raw.close()
        wait_for(lambda: backend.fids() == 0, what="the fids' clunk")
        assert mux.backend_tags() == set()


def test_flush_after_the_reply_gives_the_reply_then_rflush(root: Path, tmp_path: Path) -> None:
    with mux_on_gated(
        root, tmp_path / "mux.sock", hold=_walk_held, flush_mode="answer"
    ) as (backend, _mux, path):
        with RawClient(path) as raw:
            raw.version()
            attach(raw, root)
            raw.send(c.Twalk(10, 1, 2, ("a.txt",)))
            wait_for(lambda: backend.held, what="the walk to reach the backend")
            raw.send(c.Tflush(11, 10))
            first, second = raw.recv(), raw.recv()
            assert isinstance(first, c.Rwalk) and first.tag == 10
            assert second == c.Rflush(11)
            # the walk counted: fid 2 exists
            reply = raw.rpc(c.Tgetattr(12, 2, c.P9_GETATTR_BASIC))
            assert isinstance(reply, c.Rgetattr) and reply.size == 5
            assert backend.fids() == 2
        wait_for(lambda: backend.fids() == 0, what="the fids' clunk")


def test_flush_of_an_unknown_tag_and_repeated_flushes(root: Path, tmp_path: Path) -> None:
    with mux_on_gated(root, tmp_path / "mux.sock", hold=_walk_held) as (backend, mux, path):
        with RawClient(path) as raw:
            raw.version()
            attach(raw, root)
            assert raw.rpc(c.Tflush(5, 99)) == c.Rflush(5)
            raw.send(c.Twalk(10, 1, 2, ("a.txt",)))
            wait_for(lambda: backend.held, what="the walk to reach the backend")
            # three flushes of the same request: one backend Tflush, three Rflush
            sent_before = len(backend.received)
            backend.hold_flushes = True
            raw.send(c.Tflush(11, 10))
            raw.send(c.Tflush(12, 10))
            raw.send(c.Tflush(13, 11))  # a flush of a flush: answered with the others
            wait_for(lambda: backend.held_flushes, what="the backend Tflush")
            time.sleep(0.1)
            flushes = [m for m in backend.received[sent_before:] if isinstance(m, c.Tflush)]
            assert len(flushes) == 1
            backend.release_flushes()
            assert [raw.recv(), raw.recv(), raw.recv()] == [
                c.Rflush(11), c.Rflush(12), c.Rflush(13)
            ]
        wait_for(lambda: backend.fids() == 0, what="the fids' clunk")
        # the clunk's tag is freed when the mux has read its reply, just after
        wait_for(lambda: mux.backend_tags() == set(), what="every backend tag freed")


def test_flush_of_a_queued_request_never_reaches_the_backend(root: Path, tmp_path: Path) -> None:
    def hold(m: c.Message) -> bool:
        return isinstance(m, c.Tgetattr)

    limits = Limits(max_requests=1, max_queued=4)
    with (
        mux_on_gated(root, tmp_path / "mux.sock", limits=limits, hold=hold) as (backend, _, path),
        RawClient(path) as raw,
    ):
        raw.version()
        attach(raw, root)
        raw.send(c.Tgetattr(10, 1, c.P9_GETATTR_BASIC))
        wait_for(lambda: backend.held, what="the first request on the backend")
        raw.send(c.Twalk(11, 1, 2, ("sub",)))  # queued: the client's one slot is taken
        time.sleep(0.1)
        assert not any(isinstance(m, c.Twalk) for m in backend.received)
        assert raw.rpc(c.Tflush(12, 11)) == c.Rflush(12)
        backend.release()
        reply = raw.recv()
        assert isinstance(reply, c.Rgetattr) and reply.tag == 10
        assert raw.rpc(c.Tclunk(13, 2)) == c.Rlerror(13, errno.EBADF)
        assert not any(isinstance(m, c.Twalk) for m in backend.received)


# --------------------------------------------------------------------------
# Hanging up


def test_client_hanging_up_mid_request_leaves_no_fid(root: Path, tmp_path: Path) -> None:
    def hold(m: c.Message) -> bool:
        return isinstance(m, c.Tread)

    (root / "f").write_bytes(b"data")
    with (
        mux_on_gated(root, tmp_path / "mux.sock", hold=hold) as (backend, mux, path),
        RawClient(path) as other,
    ):
        other.version()
        attach(other, root, fid=1)
        with RawClient(path) as raw:
            raw.version()
            attach(raw, root)
            for fid in range(2, 12):
                assert isinstance(raw.rpc(c.Twalk(1, 1, fid, ("f",))), c.Rwalk)
            assert isinstance(raw.rpc(c.Tlopen(1, 2, c.L_O_RDONLY)), c.Rlopen)
            raw.send(c.Tread(5, 2, 0, 4))
            raw.send(c.Twalk(6, 1, 20, ("sub",)))  # in flight when it hangs up
            wait_for(lambda: backend.held, what="the read to reach the backend")
            wait_for(lambda: backend.fids() == 13, what="the walk")  # 11 + 1 + fid 20
        # the held read was flushed, every fid of that client clunked
        wait_for(lambda: backend.fids() == 1, what="the hung-up client's fids' clunk")
        assert any(isinstance(m, c.Tflush) for m in backend.received)
        wait_for(lambda: mux.clients == 1, what="the client's release")
        assert mux.backend_tags() == set()
        assert len(mux.backend_fids()) == 1
        # the other client was not disturbed
        reply = other.rpc(c.Tgetattr(2, 1, c.P9_GETATTR_BASIC))
        assert isinstance(reply, c.Rgetattr)


def test_a_late_reply_after_hangup_is_clunked(root: Path, tmp_path: Path) -> None:
    """The backend answers the hung-up client's walk before the flush: its fid is clunked."""
    with mux_on_gated(
        root, tmp_path / "mux.sock", hold=_walk_held, flush_mode="answer"
    ) as (backend, mux, path):
        with RawClient(path) as raw:
            raw.version()
            attach(raw, root)
            raw.send(c.Twalk(10, 1, 2, ("a.txt",)))
            wait_for(lambda: backend.held, what="the walk to reach the backend")
        wait_for(lambda: mux.clients == 0, what="the client's release")
        assert backend.fids() == 0
        assert mux.backend_fids() == set()


def test_client_hanging_up_during_a_large_read(root: Path, tmp_path: Path) -> None:
    (root / "big").write_bytes(os.urandom(8_000_000))
    with mux_on_file_server(root, tmp_path / "mux.sock") as (server, mux, path):
        fs = mux_client(path, root, window=8)
        outcome: list[int | BaseException] = []

        def read() -> None:
            try:
                outcome.append(len(fs.read_bytes("big")))
            except TransportError as exc:  # the expected end: the socket went away
                outcome.append(exc)

        t = threading.Thread(target=read, daemon=True)
        try:
            t.start()
            time.sleep(0.05)
        finally:
            fs.transport.close()  # the socket goes away with requests in flight
        t.join(30)
        assert not t.is_alive(), "the read did not end when its transport closed"
        assert outcome == [8_000_000] or isinstance(outcome[0], TransportError), outcome
        wait_for(lambda: mux.clients == 0, what="the client's release")
        assert server_fids(server) == 0
        with mux_client(path, root) as again:
            assert again.read_text("a.txt") == "hello"


# --------------------------------------------------------------------------
# Hostile clients


def _hostile_cases(root: Path) -> list[tuple[str, list[bytes | c.Message]]]:
    good_attach = c.Tattach(1, 1, c.NOFID, "root", str(root), 0)
    return [
        ("size below the header", [b"\x03\x00\x00\x00\x64\xff\xff"]),
        ("size zero", [b"\x00\x00\x00\x00\x64\xff\xff"]),
        ("size beyond the msize", [b"\x00\x00\x10\x00\x64\xff\xff"]),
        ("truncated stream", [b"\x20\x00\x00\x00\x64\xff"]),
        ("garbage body", [b"\x10\x00\x00\x00\x6e\x01\x00" + b"\xff" * 9]),
        ("request before Tversion", [good_attach]),
        ("NOTAG on a request", [c.Tversion(c.NOTAG, 65536, "9P2000.L"),
                                c.Tattach(c.NOTAG, 1, c.NOFID, "root", str(root), 0)]),
        ("a reply from a client", [c.Tversion(c.NOTAG, 65536, "9P2000.L"), c.Rclunk(1)]),
        ("Tversion mid-session", [c.Tversion(c.NOTAG, 65536, "9P2000.L"), good_attach,
                                  c.Tversion(c.NOTAG, 65536, "9P2000.L")]),
        ("trailing bytes", [c.Tversion(c.NOTAG, 65536, "9P2000.L"),
                            struct.pack("<I", 11 + 4) + c.encode(c.Tclunk(1, 1))[4:] + bytes(4)]),
    ]  # fmt: skip


def test_hostile_messages_end_that_client_only(root: Path, tmp_path: Path) -> None:
    with (
        mux_on_file_server(root, tmp_path / "mux.sock") as (server, mux, path),
        mux_client(path, root) as good,
    ):
        for what, messages in _hostile_cases(root):
            with RawClient(path) as raw:
                for m in messages:
                    raw.send(m)
                if what == "truncated stream":
                    raw.sock.shutdown(socket.SHUT_WR)
                assert raw.closed_by_peer(), what
            assert good.read_text("a.txt") == "hello", what
        wait_for(lambda: mux.clients == 1, what="the hostile clients' release")
        assert server_fids(server) == 1
        assert len(server._sessions - {server._default}) == 1


def test_errors_9p_answers_keep_the_client(root: Path, tmp_path: Path) -> None:
    with (
        mux_on_file_server(root, tmp_path / "mux.sock") as (_server, _mux, path),
        RawClient(path) as raw,
    ):
        raw.version()
        attach(raw, root)
        # 9P2000 (not .L) Topen and an unknown type: EOPNOTSUPP
        raw.send(struct.pack("<IBHIB", 12, 112, 3, 1, 0))  # 9P2000 Topen
        assert raw.recv() == c.Rlerror(3, errno.EOPNOTSUPP)
        raw.send(b"\x07\x00\x00\x00\xc8\x04\x00")
        assert raw.recv() == c.Rlerror(4, errno.EOPNOTSUPP)
        assert raw.rpc(c.Tgetattr(5, 42, 0)) == c.Rlerror(5, errno.EBADF)
        assert isinstance(raw.rpc(c.Tgetattr(5, 1, 0)), c.Rgetattr)


def test_duplicate_tag_ends_the_client(root: Path, tmp_path: Path) -> None:
    def hold(m: c.Message) -> bool:
        return isinstance(m, c.Tgetattr)

    with mux_on_gated(root, tmp_path / "mux.sock", hold=hold) as (backend, mux, path):
        with RawClient(path) as raw:
            raw.version()
            attach(raw, root)
            raw.send(c.Tgetattr(10, 1, 0))
            wait_for(lambda: backend.held, what="the request on the backend")
            raw.send(c.Tgetattr(10, 1, 0))
            assert raw.closed_by_peer()
        wait_for(lambda: mux.clients == 0, what="the client's release")
        assert backend.fids() == 0
        assert not backend.held  # the held request was flushed


def test_a_flooding_client_does_not_starve_the_others(root: Path, tmp_path: Path) -> None:
    def hold(m: c.Message) -> bool:
        return isinstance(m, c.Tread) and m.count == 4

    (root / "f").write_bytes(b"data")
    limits = Limits(max_requests=4, max_queued=4, max_fids=16)
    with mux_on_gated(
        root, tmp_path / "mux.sock", limits=limits, hold=hold
    ) as (backend, mux, path):
        with RawClient(path, timeout=2.0) as flood, mux_client(path, root) as good:
            flood.version()
            attach(flood, root)
            assert isinstance(flood.rpc(c.Twalk(1, 1, 2, ("f",))), c.Rwalk)
            assert isinstance(flood.rpc(c.Tlopen(1, 2, c.L_O_RDONLY)), c.Rlopen)
            # fids: 16 at most; the 17th creation gets EMFILE
            replies = [flood.rpc(c.Twalk(1, 1, fid, ())) for fid in range(3, 20)]
            assert replies[:14] == [c.Rwalk(1, ())] * 14
            assert replies[14:] == [c.Rlerror(1, errno.EMFILE)] * 3
            # requests: 4 on the backend, 4 queued, the rest not even read
            flood.sock.setblocking(False)
            sent = 0
            try:
                for tag in range(100, 20000):
                    flood.send(c.Tread(tag, 2, 0, 4))
                    sent += 1
            except BlockingIOError:
                pass
            flood.sock.setblocking(True)
            wait_for(lambda: len(backend.held) == 4, what="four requests on the backend")
            time.sleep(0.2)
            assert len(backend.held) == 4
            # the good client is served meanwhile
            for _ in range(20):
                assert good.read_text("a.txt") == "hello"
                good.listdir("")
            assert len(mux.backend_tags()) == 4
        wait_for(lambda: mux.clients == 0, what="the clients' release")
        assert backend.fids() == 0
        assert mux.backend_fids() == set()


# --------------------------------------------------------------------------
# Backend failure and stopping


def test_backend_failure_is_reported_to_every_client_and_the_owner(
    root: Path, tmp_path: Path
) -> None:
    def hold(m: c.Message) -> bool:
        return isinstance(m, c.Tgetattr)

    failures: list[BaseException] = []
    with GatedBackend(root, hold=hold) as backend, running_mux(
        backend.transport, tmp_path / "mux.sock", on_failure=failures.append
    ) as (mux, path):
        with RawClient(path) as a, RawClient(path) as b:
            for raw in (a, b):
                raw.version()
                attach(raw, root)
            a.send(c.Tgetattr(10, 1, 0))
            wait_for(lambda: backend.held, what="the request on the backend")
            backend.hang_up()
            reply = a.recv()
            assert isinstance(reply, c.Rlerror) and reply.tag == 10
            assert reply.ecode in (errno.ECONNRESET, errno.EIO, errno.ENOTCONN)
            assert a.closed_by_peer()
            assert b.closed_by_peer()
        failure = mux.wait(10)
        assert isinstance(failure, ConnectionError)
        assert failures == [failure]
        assert not os.path.exists(path)  # no new client can come


def test_backend_failure_while_idle_is_noticed(root: Path, tmp_path: Path) -> None:
    with (
        mux_on_gated(root, tmp_path / "mux.sock") as (backend, mux, path),
        RawClient(path) as raw,
    ):
        raw.version()
        backend.hang_up()
        assert mux.wait(10) is not None
        assert raw.closed_by_peer()


def test_backend_failure_while_a_client_is_being_released(root: Path, tmp_path: Path) -> None:
    def hold(m: c.Message) -> bool:
        return isinstance(m, c.Tgetattr)

    with mux_on_gated(root, tmp_path / "mux.sock", hold=hold) as (backend, mux, path):
        backend.hold_flushes = True
        with RawClient(path) as raw:
            raw.version()
            attach(raw, root)
            raw.send(c.Tgetattr(10, 1, 0))
            wait_for(lambda: backend.held, what="the request on the backend")
        wait_for(lambda: backend.held_flushes, what="the hung-up client's flush")
        assert mux.clients == 1  # still being released: its flush is not answered
        backend.hang_up()
        assert mux.wait(10) is not None
        wait_for(lambda: mux.clients == 0, timeout=3, what="the release to give up")
        started = time.monotonic()
        mux.stop()
        assert time.monotonic() - started < 3


def test_stop_tells_clients_and_releases_their_fids(root: Path, tmp_path: Path) -> None:
    with file_server(root) as (server, transport):
        mux = MultiplexerThread(transport)
        path = mux.listen_unix(tmp_path / "mux.sock")
        clients = [mux_client(path, root) for _ in range(3)]
        files = [fs.open("a.txt", "rb") for fs in clients]
        assert server_fids(server) == 6
        mux.stop()
        assert server_fids(server) == 0
        assert not os.path.exists(path)
        assert transport.connected  # the transport is the owner's
        with pytest.raises(OSError):
            clients[0].read_text("a.txt")
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
        for fs in clients:
            fs.close()
        mux.stop()  # idempotent


def test_backend_that_is_not_9p2000l_is_refused(root: Path) -> None:
    """Asked for 9P2000.L only, a backend answering 9P2000.u is refused; in the
    default ``auto`` a backend that speaks neither dialect is refused."""
    from .hostile import HostileServer

    for answer, options in (("9P2000.u", {"version": "9P2000.L"}), ("9P2000", {})):

        def script(m: c.Message, honest: object, answer: str = answer) -> c.Message | None:
            if isinstance(m, c.Tversion):
                return c.Rversion(m.tag, m.msize, answer)
            return None

        with HostileServer(root, script) as hs:
            transport = hs.transport(65536, owner=True)
            with pytest.raises(ProtocolError) as info:
                MultiplexerThread(transport, **options)
            assert "does not speak 9P2000.L" in str(info.value) or "neither" in str(info.value)
            transport.close()


# --------------------------------------------------------------------------
# Listeners and who may connect


def test_unix_socket_mode_and_stale_socket(root: Path, tmp_path: Path) -> None:
    sock_path = tmp_path / "mux.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()  # a socket file nobody listens on
    (tmp_path / "plain").write_text("not a socket")
    with file_server(root) as (_server, transport):
        with MultiplexerThread(transport) as mux:
            path = mux.listen_unix(sock_path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            with pytest.raises(FileExistsError):
                mux.listen_unix(sock_path)  # a live server there
            with pytest.raises(FileExistsError):
                mux.listen_unix(tmp_path / "plain")
            assert (tmp_path / "plain").read_text() == "not a socket"
            gpath = mux.listen_unix(tmp_path / "group.sock", group=os.getgid())
            st = os.stat(gpath)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
            with pytest.raises(LookupError):
                mux.listen_unix(tmp_path / "x.sock", group="no-such-group-pyxen9p")
            with mux_client(gpath, root) as fs:
                assert fs.read_text("a.txt") == "hello"
        assert not sock_path.exists() and not os.path.exists(gpath)


def _connect_as(uid: int, gid: int, path: str) -> int:
    """In a child with *uid*/*gid*: connect and negotiate; the child's exit status.

    0: served; 1: connection closed without an answer; 2: connect() refused
    (permission); 3: other error.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                raw = RawClient(path, timeout=5)
            except PermissionError:
                os._exit(2)
            try:
                raw.send(c.Tversion(c.NOTAG, 65536, "9P2000.L"))
                code = 0 if isinstance(raw.recv(), c.Rversion) else 1
            except OSError:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_peer_credentials_are_checked(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nobody = 65534
    tmp_path = Path(tempfile.mkdtemp(prefix="pyxen9p-mux-", dir="/tmp"))
    os.chmod(tmp_path, 0o755)
    with contextlib.ExitStack() as cleanup, file_server(root) as (_server, transport):
        cleanup.callback(shutil.rmtree, tmp_path, True)
        with MultiplexerThread(transport) as mux:
            private = mux.listen_unix(tmp_path / "private.sock")
            # mode 0600: another user cannot even connect
            assert _connect_as(nobody, nobody, private) == 2
            # the file system lets everyone in: SO_PEERCRED still refuses
            with caplog.at_level(logging.WARNING, logger="pyxen9p.p9.mux"):
                open_path = mux.listen_unix(tmp_path / "open.sock", mode=0o666)
                assert _connect_as(nobody, nobody, open_path) == 1
            assert mux.mux.refused == 1
            assert "uid 65534 gid 65534" in caplog.text and "not allowed" in caplog.text
            assert _connect_as(0, 0, open_path) == 0  # root: this process's uid
            # allowed by uid, or by group
            by_uid = mux.listen_unix(tmp_path / "uid.sock", mode=0o666, allowed_uids={nobody})
            assert _connect_as(nobody, nobody, by_uid) == 0
            by_gid = mux.listen_unix(tmp_path / "gid.sock", group=nobody)
            assert stat.S_IMODE(os.stat(by_gid).st_mode) == 0o660
            assert _connect_as(12345, nobody, by_gid) == 0
            assert _connect_as(12345, 12345, by_gid) == 2  # not in the group: no access
            assert mux.mux.refused == 1


def test_peer_credentials_of_a_socket_pair() -> None:
    a, b = socket.socketpair()
    with a, b:
        cred = peer_credentials(a)
        assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_tcp_listener_is_loopback_only_unless_allowed(root: Path) -> None:
    with file_server(root) as (_server, transport), MultiplexerThread(transport) as mux:
        host, port = mux.listen_tcp("127.0.0.1", 0)
        with Client.tcp(host, port, aname=str(root), timeout=20) as fs:
            assert fs.read_text("a.txt") == "hello"
        for remote in ("0.0.0.0", "192.0.2.1"):
            with pytest.raises(PermissionError):
                mux.listen_tcp(remote, 0)
        host, port = mux.listen_tcp("0.0.0.0", 0, allow_remote=True)
        with Client.tcp("127.0.0.1", port, aname=str(root), timeout=20) as fs:
            assert fs.listdir("sub") == []


def test_client_limit(root: Path, tmp_path: Path) -> None:
    with file_server(root) as (_server, transport):
        limits = Limits(max_clients=2)
        with running_mux(transport, tmp_path / "mux.sock", limits=limits) as (mux, path):
            with mux_client(path, root) as a, mux_client(path, root) as b:
                with RawClient(path) as third:
                    assert third.closed_by_peer()
                assert a.read_text("a.txt") == b.read_text("a.txt") == "hello"
            assert mux.mux.refused == 1


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        Limits(max_requests=0)
    with pytest.raises(ValueError):
        Limits(max_clients=1000, max_requests=1000)


# --------------------------------------------------------------------------
# Other backends: the simulated Xen, diod


@pytest.fixture
def sim_transport(root: Path) -> Iterator[SimulatedTransport]:
    share = SimulatedShare(root)
    try:
        frontend = Frontend.connect(platform=share.guest, devid=0, timeout=30)
    except BaseException:
        share.close()
        raise
    transport = SimulatedTransport(frontend, share)
    try:
        yield transport
    finally:
        transport.close()


def test_many_clients_over_the_simulated_xen(
    root: Path, tmp_path: Path, sim_transport: SimulatedTransport
) -> None:
    with running_mux(sim_transport, tmp_path / "mux.sock") as (mux, path):
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_worker, args=(path, root, n, errors)) for n in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        wait_for(lambda: mux.clients == 0, what="the clients' release")
        assert server_fids(sim_transport.share.server) == 0
        assert sim_transport.frontend.outstanding_tags() == set()


def test_diod_as_the_backend(root: Path, tmp_path: Path) -> None:
    diod = need_tool("diod")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = str(theirs.fileno())
    command = [diod, "-f", "-n", "-N", "-c", "/dev/null", "-L", "stderr", "-e", str(root),
               "--rfdno", fd, "--wfdno", fd]  # fmt: skip
    with open(tmp_path / "diod.log", "wb") as logf:
        proc = subprocess.Popen(
            command, pass_fds=(theirs.fileno(),), cwd=tmp_path,
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
        )  # fmt: skip
    theirs.close()
    transport = StreamTransport.from_socket(ours)
    try:
        with running_mux(transport, tmp_path / "mux.sock") as (mux, path):
            assert mux.msize == 65536  # diod's
            errors: list[BaseException] = []
            threads = [
                threading.Thread(target=_worker, args=(path, root, n, errors)) for n in range(3)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            wait_for(lambda: mux.clients == 0, what="the clients' release")
            assert mux.backend_fids() == set()
    finally:
        transport.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_multiplexer_on_a_running_loop(root: Path, tmp_path: Path) -> None:
    """The asyncio API itself, without the thread wrapper."""
    import asyncio

    async def main(transport: StreamTransport) -> str:
        mux = Multiplexer(transport)
        with pytest.raises(RuntimeError):
            await mux.listen_unix(tmp_path / "early.sock")
        await mux.start()
        path = await mux.listen_unix(tmp_path / "mux.sock")
        loop = asyncio.get_running_loop()

        def read() -> str:
            with mux_client(path, root) as fs:
                return fs.read_text("a.txt")

        text = await loop.run_in_executor(None, read)
        await mux.stop()
        assert await mux.wait_stopped() is None
        with pytest.raises(RuntimeError):
            await mux.listen_unix(tmp_path / "late.sock")
        return text

    with file_server(root) as (_server, transport):
        assert asyncio.run(main(transport)) == "hello"
