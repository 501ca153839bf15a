"""The multiplexer over a 9P2000.u backend: the simulated xen-9pfsd (pyxen9p.sim.xen9pfsd)
with the 9P2000.u stand-in server (tests/p9/userver.py) behind it.

Several pyxen9p clients at once through it, a hostile client sending
malformed or out-of-place 9P2000.u messages, the fid limit shared by every
client, a client's Tflush when the backend has none, and the Tstat of the
share's root that the multiplexer answers itself (the backend never sees
it: ``root_tstat_seen`` stays False).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need

from pyxen9p.frontend import Frontend
from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client
from pyxen9p.p9.mux import FID_LIMIT_REACHED, ROOT_TSTAT_REFUSED, MultiplexerThread
from pyxen9p.p9.transport import StreamTransport
from pyxen9p.sim.platform import SimulatedXen
from pyxen9p.sim.xen9pfsd import SimXen9pfsd

from .muxing import RawClient, wait_for
from .userver import U, UServer

FE = 7


@contextlib.contextmanager
def sim_xen_9pfsd(root: Path, **server_options: Any) -> Iterator[tuple[Frontend, list[UServer]]]:
    """A frontend connected to a simulated xen-9pfsd serving *root*: ``(frontend, servers)``."""
    xen = SimulatedXen()
    dom0 = xen.domain(0)
    guest = xen.create_domain(FE, "guest")
    servers: list[UServer] = []
    limit = server_options.pop("max_open_files", None)

    def factory(default_limit: int) -> Any:
        server = UServer(root, max_open_files=limit or default_limit, **server_options)
        servers.append(server)
        return server.answer

    backend = SimXen9pfsd(dom0, FE, handler_factory=factory)
    backend.start()
    try:
        front = Frontend.connect(platform=guest, devid=0, timeout=5.0)
        try:
            yield front, servers
        finally:
            front.close()
        assert xen.resources(FE).clean, xen.resources(FE)
    finally:
        backend.stop()
        for server in servers:
            server.close()
        xen.close()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    (root / "sub").mkdir()
    return root


def client(path: str, **options: Any) -> Client:
    options.setdefault("timeout", 20)
    return Client(StreamTransport.unix(path), **options)


class URaw(RawClient):
    """Raw 9P2000.u frames over the multiplexer's socket."""

    def decode_frame(self, frame: bytes) -> c.Message:
        """A 9P2000.u frame (an Rstat in xen-9pfsd's layout first)."""
        if frame[4] == c.MessageType.RSTAT:
            with contextlib.suppress(c.ProtocolError):
                return c.decode_xen9pfsd_rstat(frame)
        return c.decode(frame, U)


def attached(path: str, fid: int = 1) -> URaw:
    raw = URaw(path)
    assert raw.rpc(c.Tversion(c.NOTAG, 65536, U)) == c.Rversion(c.NOTAG, 65536, U)
    reply = raw.rpc(c.Tattach(1, fid, c.NOFID, "root", "", 0))
    assert isinstance(reply, c.Rattach), reply
    return raw


def test_many_clients_through_the_mux_on_xen_9pfsd(share: Path, tmp_path: Path) -> None:
    with (
        sim_xen_9pfsd(share, max_open_files=64) as (front, servers),
        MultiplexerThread(front) as mux,
    ):
        assert mux.version == U and mux.mux.xen9pfsd
        path = mux.listen_unix(tmp_path / "mux.sock")
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                with client(path) as fs:
                    assert fs.version == U
                    assert fs.read_text("hello.txt") == "hello\n"
                    fs.mkdir(f"w{n}")
                    data = os.urandom(70_000 + n)
                    fs.write_bytes(f"w{n}/data", data)
                    assert fs.read_bytes(f"w{n}/data") == data
                    assert fs.stat(f"w{n}/data").st_size == len(data)
                    assert sorted(fs.listdir(f"w{n}")) == ["data"]
                    for i in range(6):
                        fs.write_text(f"w{n}/f{i}", str(i))
                    fs.remove(f"w{n}/data")  # through Topen(ORCLOSE) + Tclunk
                    assert sorted(fs.listdir(f"w{n}")) == [f"f{i}" for i in range(6)]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert sorted(os.listdir(share)) == ["hello.txt", "sub", "w0", "w1", "w2", "w3"]
        assert sorted(os.listdir(share / "w2")) == [f"f{i}" for i in range(6)]
        server = servers[-1]
        wait_for(lambda: not server.fids, what="every client's fids to be clunked")
        assert not mux.backend_fids()
        # no Tflush, no Tremove reached the backend more than once (then ORCLOSE)
        assert "Tflush" not in server.stats.refused
        assert not server.root_tstat_seen


def test_root_tstat_is_answered_by_the_mux_on_xen_9pfsd(share: Path, tmp_path: Path) -> None:
    with (
        sim_xen_9pfsd(share) as (front, servers),
        MultiplexerThread(front) as mux,
    ):
        path = mux.listen_unix(tmp_path / "mux.sock")
        with client(path) as fs:
            for root in ("", "/", "sub/.."):
                with pytest.raises(OSError) as info:
                    fs.stat(root)
                assert info.value.errno == errno.EOPNOTSUPP
                assert "does not answer a Tstat of the root usefully" in str(info.value)
            assert fs.is_dir("") and sorted(fs.listdir("")) == ["hello.txt", "sub"]
            assert fs.stat("sub").st_mode & 0o170000 == 0o040000
            assert fs.usable
        raw = attached(path)
        try:
            refused = c.Rerror(2, ROOT_TSTAT_REFUSED, errno.EOPNOTSUPP)
            assert raw.rpc(c.Tstat(2, 1)) == refused
            assert isinstance(raw.rpc(c.Twalk(3, 1, 2, [])), c.Rwalk)
            assert raw.rpc(c.Tstat(2, 2)) == refused
            assert isinstance(raw.rpc(c.Twalk(3, 1, 3, ["sub", ".."])), c.Rwalk)
            assert raw.rpc(c.Tstat(2, 3)) == refused
            assert isinstance(raw.rpc(c.Twalk(3, 1, 4, ["sub"])), c.Rwalk)
            assert isinstance(raw.rpc(c.Tstat(2, 4)), c.Rstat)
            # a walk in place back to the root: the fid is the root again
            assert isinstance(raw.rpc(c.Twalk(3, 4, 4, [".."])), c.Rwalk)
            assert raw.rpc(c.Tstat(2, 4)) == refused
            # a failed walk in place leaves the fid where it was
            assert isinstance(raw.rpc(c.Twalk(3, 3, 3, ["sub"])), c.Rwalk)
            assert isinstance(raw.rpc(c.Twalk(3, 3, 3, ["..", "missing"])), c.Rwalk | c.Rerror)
            assert isinstance(raw.rpc(c.Tstat(2, 3)), c.Rstat)
            # Tcreate moves the fid to the new file: no longer the root
            assert isinstance(raw.rpc(c.Tcreate(3, 2, "new.txt", 0o644, c.OWRITE, "")), c.Rcreate)
            assert isinstance(raw.rpc(c.Tstat(2, 2)), c.Rstat)
        finally:
            raw.close()
        assert mux.root_tstats_refused >= 7
        assert not any(s.root_tstat_seen for s in servers)
        assert (share / "new.txt").is_file()


def test_a_hostile_client_ends_alone(share: Path, tmp_path: Path) -> None:
    with (
        sim_xen_9pfsd(share) as (front, servers),
        MultiplexerThread(front) as mux,
    ):
        path = mux.listen_unix(tmp_path / "mux.sock")
        with client(path) as good:
            # the other dialect is "unknown", as 9P says
            raw = URaw(path)
            assert raw.rpc(c.Tversion(c.NOTAG, 65536, c.VERSION_9P2000_L)) == c.Rversion(
                c.NOTAG, 65536, c.VERSION_UNKNOWN
            )
            raw.close()
            raw = attached(path)
            # a 9P2000.L request is not 9P2000.u: EOPNOTSUPP, never forwarded
            assert raw.rpc(c.Tlopen(5, 1, 0)) == c.Rerror(
                5, os.strerror(errno.EOPNOTSUPP), errno.EOPNOTSUPP
            )
            # a fid it does not hold, in every message carrying one
            for msg in (
                c.Topen(5, 9, c.OREAD), c.Tcreate(5, 9, "x", 0o644, c.OWRITE, ""),
                c.Tread(5, 9, 0, 10), c.Twrite(5, 9, 0, b"x"), c.Tclunk(5, 9),
                c.Tremove(5, 9), c.Tstat(5, 9), c.Twstat(5, 9, c.Stat.wstat(name="y")),
                c.Twalk(5, 9, 10, []), c.Tattach(5, 10, 9, "u", "", 0),
            ):
                assert raw.rpc(msg) == c.Rerror(5, os.strerror(errno.EBADF), errno.EBADF), msg
            assert raw.rpc(c.Twalk(5, 1, 1, [])) is not None  # still served
            assert good.read_text("hello.txt") == "hello\n"
            raw.close()
            received = len(servers[-1].sent)
            bad_frames = [
                c.encode(c.Topen(5, 1, c.OREAD)) + b"",  # fine, then a truncated one:
                (12).to_bytes(4, "little") + bytes([c.Topen.TYPE]) + b"\x05\x00\x01\x00\x00",
                c.encode(c.Topen(6, 1, c.OREAD))[:-1] + b"",  # body one byte short
                c.encode(c.Twstat(6, 1, c.Stat.wstat()))[:-3],  # a stat cut short
                c.encode(c.Rstat(6, c.Stat.wstat())),  # a reply type
                c.encode(c.Tclunk(c.NOTAG, 1)),  # NOTAG outside Tversion
            ]
            for frame in bad_frames[1:]:
                size = len(frame)
                fixed = size.to_bytes(4, "little") + frame[4:]
                raw = attached(path)
                raw.send(fixed)
                assert raw.closed_by_peer(), frame
                raw.close()
            # a second Topen of one tag while the first is pending: a duplicate tag
            raw = attached(path)
            raw.send(c.encode(c.Twalk(6, 1, 2, ["sub"])) + c.encode(c.Tclunk(6, 1)))
            reply = raw.recv()
            assert reply is None or isinstance(reply, c.Rwalk | c.Rclunk)
            raw.close()
            assert good.read_text("hello.txt") == "hello\n" and good.usable
            assert len(servers[-1].sent) > received
        server = servers[-1]
        wait_for(lambda: not server.fids, what="the hostile clients' fids to be clunked")
        assert not mux.backend_fids() and not server.root_tstat_seen


def test_the_fid_limit_is_shared_and_said_clearly(share: Path, tmp_path: Path) -> None:
    for i in range(4):
        (share / f"f{i}").write_text(str(i))
    with (
        sim_xen_9pfsd(share) as (front, servers),  # xen-9pfsd's default: 5 fids
        MultiplexerThread(front) as mux,
    ):
        path = mux.listen_unix(tmp_path / "mux.sock")
        with client(path) as first, client(path) as second:
            held = [first.open(f"f{i}", "rb") for i in range(3)]  # 2 attach + 3: the limit
            with pytest.raises(OSError) as info:
                second.read_text("hello.txt")
            assert info.value.errno == errno.EMFILE
            assert FID_LIMIT_REACHED in str(info.value)
            assert "every client" in str(info.value)
            for handle in held:
                handle.close()
            assert second.read_text("hello.txt") == "hello\n"
            assert first.read_text("f3") == "3"
        assert servers[-1].peak_fids == 5


def test_a_tflush_is_answered_after_the_reply_without_a_backend_tflush(
    share: Path, tmp_path: Path
) -> None:
    gate = threading.Event()
    seen = threading.Event()

    def script(m: c.Message, honest: Any) -> Any:
        if isinstance(m, c.Twalk) and tuple(m.wnames) == ("sub",):
            seen.set()
            gate.wait(10)  # the backend is slow with this one
        return None

    with (
        sim_xen_9pfsd(share, script=script) as (front, servers),
        MultiplexerThread(front) as mux,
    ):
        path = mux.listen_unix(tmp_path / "mux.sock")
        raw = attached(path)
        try:
            raw.send(c.Twalk(7, 1, 2, ["sub"]))
            assert seen.wait(10)
            raw.send(c.Tflush(8, 7))
            gate.set()
            first, second = raw.recv(), raw.recv()
            assert isinstance(first, c.Rwalk) and first.tag == 7  # the reply counts...
            assert second == c.Rflush(8)  # ...then the Rflush
            assert isinstance(raw.rpc(c.Tstat(9, 2)), c.Rstat)  # fid 2 exists
            # a Tflush of nothing in flight: Rflush at once
            assert raw.rpc(c.Tflush(9, 77)) == c.Rflush(9)
        finally:
            raw.close()
        assert not any(isinstance(m, c.Tflush) for m in servers[-1].sent)
        server = servers[-1]
        wait_for(lambda: not server.fids, what="the fids to be clunked")


def test_version_choice_and_refusal(share: Path, tmp_path: Path) -> None:
    with sim_xen_9pfsd(share) as (front, _servers):
        with pytest.raises(c.ProtocolError) as info:
            MultiplexerThread(front, version=c.VERSION_9P2000_L)
        assert "does not speak 9P2000.L" in str(info.value)
        with MultiplexerThread(front, version=U) as mux:
            assert mux.version == U
            path = mux.listen_unix(tmp_path / "mux.sock")
            with pytest.raises(c.ProtocolError):
                client(path, version=c.VERSION_9P2000_L)
            with client(path, version=U) as fs:
                assert fs.read_text("hello.txt") == "hello\n"
    with pytest.raises(ValueError):
        MultiplexerThread(object(), version="9P2000")  # type: ignore[arg-type]


def test_p9fs_a_real_client_over_9p2000u_through_the_mux(share: Path, tmp_path: Path) -> None:
    """PyPI's p9fs (an independent 9P2000.u client) through the multiplexer on the
    simulated xen-9pfsd: it reads and writes; its request for the root's attributes
    gets the multiplexer's clear error, never reaching the backend."""
    try:
        import p9fs  # type: ignore[import-untyped]
    except ImportError:
        p9fs = None
    need(p9fs is not None, "the p9fs package (pip install p9fs)")
    # py9p reads stats as 9P2000.u lays them out
    with (
        sim_xen_9pfsd(share, max_open_files=32, stats="spec") as (front, servers),
        MultiplexerThread(front) as mux,
    ):
        host, port = mux.listen_tcp("127.0.0.1", 0)
        fs = p9fs.P9FileSystem(host=host, port=port, username="root", version="9P2000.u",
                               skip_instance_cache=True)
        assert fs.cat_file("hello.txt") == b"hello\n"
        with fs.open("sub/from-p9fs.txt", "wb") as out:
            out.write(b"written by p9fs\n")
        assert (share / "sub/from-p9fs.txt").read_bytes() == b"written by p9fs\n"
        assert "sub/from-p9fs.txt" in [e.lstrip("/") for e in fs.ls("sub", detail=False)]
        with pytest.raises(Exception) as info:  # p9fs wraps errors its own way
            fs.info("")
        assert "does not answer a Tstat of the root usefully" in str(info.value)  # py9p's RpcError
        assert not any(s.root_tstat_seen for s in servers)
        assert mux.root_tstats_refused >= 1


def test_a_tstat_racing_a_walk_in_place_is_not_forwarded(share: Path, tmp_path: Path) -> None:
    """While a fid is walked in place its place is unknown: a Tstat of it then is
    answered by the multiplexer (the walk may be taking it back to the root)."""
    gate = threading.Event()
    seen = threading.Event()

    def script(m: c.Message, honest: Any) -> Any:
        if isinstance(m, c.Twalk) and tuple(m.wnames) == ("..",):
            seen.set()
            gate.wait(10)
        return None

    with (
        sim_xen_9pfsd(share, script=script) as (front, servers),
        MultiplexerThread(front) as mux,
    ):
        path = mux.listen_unix(tmp_path / "mux.sock")
        raw = attached(path)
        try:
            assert isinstance(raw.rpc(c.Twalk(2, 1, 2, ["sub"])), c.Rwalk)
            assert isinstance(raw.rpc(c.Tstat(2, 2)), c.Rstat)
            raw.send(c.Twalk(3, 2, 2, [".."]))  # back to the root, held by the backend
            assert seen.wait(10)
            assert raw.rpc(c.Tstat(4, 2)) == c.Rerror(4, ROOT_TSTAT_REFUSED, errno.EOPNOTSUPP)
            gate.set()
            assert isinstance(raw.recv(), c.Rwalk)
            assert raw.rpc(c.Tstat(4, 2)) == c.Rerror(4, ROOT_TSTAT_REFUSED, errno.EOPNOTSUPP)
        finally:
            gate.set()
            raw.close()
        assert mux.root_tstats_refused == 2
        assert not any(s.root_tstat_seen for s in servers)
