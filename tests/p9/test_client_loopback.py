"""The client suite against pyxen9p's own :class:`~pyxen9p.p9.server.FileServer`.

The server runs in a thread and serves one end of a socketpair; the client
uses a :class:`~pyxen9p.p9.transport.StreamTransport` on the other end.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyxen9p.errors import TransportClosedError, TransportError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client
from pyxen9p.p9.server import FileServer
from pyxen9p.p9.transport import StreamTransport

from . import hostile
from .client_suite import *  # noqa: F403
from .hostile import HostileServer


@pytest.fixture
def root(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    return export


@pytest.fixture
def client(root: Path) -> Iterator[Client]:
    server = FileServer(root)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(target=server.serve_socket, args=(theirs,), daemon=True)
    thread.start()
    try:
        c = Client(StreamTransport.from_socket(ours), aname=str(root), timeout=20)
        try:
            yield c
        finally:
            c.close()
    finally:
        server.close()
        thread.join(10)
        theirs.close()
        assert not thread.is_alive()


def test_loopback_negotiation(client: Client) -> None:
    assert client.version == "9P2000.L"
    assert client.msize == 512 * 1024  # FileServer's default, below the transport's


# --------------------------------------------------------------------------
# Client behaviour against an in-process server whose answers a test can change


def ScriptedTransport(
    root: Path,
    intercept: Callable[[c.Message], c.Message | None] | None = None,
    msize: int = 256 * 1024,
) -> hostile.ScriptedTransport:
    """An in-process transport to a :class:`HostileServer` whose script is *intercept*.

    ``intercept(message)`` may return a reply to send instead, raise, or
    return ``None`` to let the server answer.  Every request is recorded.
    """
    script = None if intercept is None else (lambda m, _honest: intercept(m))
    return HostileServer(root, script).transport(msize, owner=True)


def _version_reply(version: str = "9P2000.L", msize: int | None = None) -> Callable[
    [c.Message], c.Message | None
]:
    def intercept(m: c.Message) -> c.Message | None:
        if isinstance(m, c.Tversion):
            return c.Rversion(m.tag, m.msize if msize is None else msize, version)
        return None

    return intercept


@pytest.mark.parametrize(
    ("intercept", "match"),
    [
        (_version_reply("9P2000.u"), "not '9P2000.L'"),
        (_version_reply("unknown"), "not '9P2000.L'"),
        (_version_reply(msize=1 << 30), "raised the msize"),
        (_version_reply(msize=1024), "below 4096"),
        (lambda m: c.Rlerror(m.tag, errno.EINVAL), "refused"),
        (lambda m: c.Rattach(m.tag, c.Qid(0x80, 0, 1)), "expected an Rversion"),
    ],
)
def test_version_negotiation_refusals(
    root: Path, intercept: Callable[[c.Message], c.Message | None], match: str
) -> None:
    transport = ScriptedTransport(root, intercept)
    with pytest.raises(c.ProtocolError, match=match):
        Client(transport, aname=str(root), version="9P2000.L")
    assert transport.closed  # owned by the client, closed on failure
    assert isinstance(transport.sent[0], c.Tversion)
    assert transport.sent[0].tag == c.NOTAG
    assert transport.sent[0].version == "9P2000.L"


def test_msize_is_bounded_by_transport_and_wish(root: Path) -> None:
    transport = ScriptedTransport(root, msize=100_000)
    with Client(transport, aname=str(root)) as client:
        assert client.msize == 100_000
        assert transport.sent[0] == c.Tversion(c.NOTAG, 100_000, "9P2000.L")
    transport = ScriptedTransport(root, msize=100_000)
    with Client(transport, aname=str(root), msize=8192) as client:
        assert client.msize == 8192
    with pytest.raises(ValueError):
        Client(ScriptedTransport(root), msize=1000)


def test_legacy_rerror_and_odd_errnos(root: Path) -> None:
    script: list[c.Message] = []

    def intercept(m: c.Message) -> c.Message | None:
        if isinstance(m, c.Tgetattr) and script:
            return dataclasses.replace(script.pop(), tag=m.tag)
        return None

    (root / "f").write_text("x")
    with Client(ScriptedTransport(root, intercept), aname=str(root)) as client:
        cases: list[tuple[c.Message, type[OSError], int, str]] = [
            (c.Rerror(0, "No such thing", errno.ENOENT), FileNotFoundError, errno.ENOENT,
             "No such thing"),
            (c.Rerror(0, "", errno.EACCES), PermissionError, errno.EACCES,
             os.strerror(errno.EACCES)),
            (c.Rlerror(0, 0), c.ProtocolError, errno.EPROTO, "invalid error number 0"),
            (c.Rlerror(0, 70000), c.ProtocolError, errno.EPROTO, "invalid error number 70000"),
            (c.Rlerror(0, errno.EROFS), OSError, errno.EROFS, os.strerror(errno.EROFS)),
        ]
        for reply, exc_type, code, text in cases:
            script.append(reply)
            with pytest.raises(exc_type) as info:
                client.stat("f")
            assert info.value.errno == code
            assert text in str(info.value)
            assert info.value.filename == "f"
        assert client.stat("f").st_size == 1
        assert client.fid_count == 1


def test_wrong_reply_type_and_tag(root: Path) -> None:
    mode: dict[str, str] = {}

    def intercept(m: c.Message) -> c.Message | None:
        if isinstance(m, c.Tgetattr):
            if mode.get("bad") == "type":
                return c.Rstatfs(m.tag, 0, 0, 0, 0, 0, 0, 0, 0, 0)
            if mode.get("bad") == "tag":
                return c.Rlerror((m.tag + 1) % 0xFFFF, errno.EIO)
        return None

    (root / "f").write_text("x")
    with Client(ScriptedTransport(root, intercept), aname=str(root)) as client:
        mode["bad"] = "type"
        with pytest.raises(c.ProtocolError, match="Rstatfs in reply to Tgetattr"):
            client.stat("f")
        mode["bad"] = "tag"
        with pytest.raises(c.ProtocolError, match="tagged"):
            client.stat("f")
        mode.clear()
        assert client.stat("f").st_size == 1
        assert client.fid_count == 1


def test_long_walks_are_split_in_place(root: Path) -> None:
    names = [f"n{i}" for i in range(40)]
    (root / "/".join(names)).mkdir(parents=True)
    transport = ScriptedTransport(root)
    with Client(transport, aname=str(root)) as client:
        transport.sent.clear()
        assert client.is_dir("/".join(names))
        walks = [m for m in transport.sent if isinstance(m, c.Twalk)]
        assert [len(w.wnames) for w in walks] == [16, 16, 8]
        first, second, third = walks
        assert first.fid == 0 and first.newfid != 0
        assert second.fid == second.newfid == first.newfid
        assert third.fid == third.newfid == first.newfid
        assert [n for w in walks for n in w.wnames] == names
        # a failure in the second Twalk: the fid bound by the first is clunked
        transport.sent.clear()
        assert not client.exists("/".join([*names[:20], "missing"]))
        clunks = [m for m in transport.sent if isinstance(m, c.Tclunk)]
        assert [m.fid for m in clunks] == [first.newfid]
        assert client.fid_count == 1


def test_partial_walk_with_unbound_newfid(root: Path) -> None:
    # FileServer follows the spec: after a partial walk newfid is not bound;
    # the client's Tclunk then fails, and the fid is recycled all the same.
    (root / "d").mkdir()
    transport = ScriptedTransport(root)
    with Client(transport, aname=str(root)) as client:
        with pytest.raises(FileNotFoundError):
            client.stat("d/missing")
        assert client.fid_count == 1
        walk = next(m for m in transport.sent if isinstance(m, c.Twalk) and m.wnames)
        clunk = next(m for m in transport.sent if isinstance(m, c.Tclunk))
        assert clunk.fid == walk.newfid
        assert client.stat("d").st_nlink >= 2
        reused = [m for m in transport.sent if isinstance(m, c.Twalk)][-1]
        assert reused.newfid == walk.newfid  # recycled


def test_tags_round_robin_and_wrap_without_notag(root: Path) -> None:
    transport = ScriptedTransport(root)
    with Client(transport, aname=str(root)) as client:
        client._tags._start_at(0xFFFC)
        transport.sent.clear()
        for _ in range(3):
            client.stat("")
        tags = [m.tag for m in transport.sent]
        assert tags == [0xFFFC, 0xFFFD, 0xFFFE, 0, 1, 2, 3, 4, 5]
        assert client.tags_in_use == 0


def test_tflush_unanswered_retires_both_tags_and_the_session(root: Path) -> None:
    """A server that answers neither a request nor its Tflush is dead: both
    tags are retired and every later call fails at once."""

    def intercept(m: c.Message) -> c.Message | None:
        if isinstance(m, (c.Tgetattr, c.Tflush)):
            raise TimeoutError(errno.ETIMEDOUT, "stuck server")
        return None

    transport = ScriptedTransport(root, intercept)
    with Client(transport, aname=str(root), flush_timeout=0.1) as client:
        transport.sent.clear()
        with pytest.raises(TimeoutError):
            client.stat("")
        stalled = next(m for m in transport.sent if isinstance(m, c.Tgetattr))
        flush = next(m for m in transport.sent if isinstance(m, c.Tflush))
        assert flush.oldtag == stalled.tag
        assert client.stuck_tags == {stalled.tag, flush.tag}
        assert transport.flushed_tags == []  # no Rflush: the tag is never freed
        transport.intercept = None
        transport.sent.clear()
        with pytest.raises(TransportError, match="unresponsive"):
            client.listdir("")
        assert transport.sent == []  # nothing more is sent to a dead server


def test_rflush_frees_the_tag_in_the_transport(root: Path) -> None:
    def intercept(m: c.Message) -> c.Message | None:
        if isinstance(m, c.Tstatfs):
            raise TimeoutError(errno.ETIMEDOUT, "slow")
        return None

    transport = ScriptedTransport(root, intercept)
    with Client(transport, aname=str(root)) as client:
        with pytest.raises(TimeoutError):
            client.statfs()
        stalled = next(m for m in transport.sent if isinstance(m, c.Tstatfs))
        assert transport.flushed_tags == [stalled.tag]
        assert client.flushes_sent == 1 and not client.stuck_tags


def test_large_transfers_keep_a_window_in_flight(root: Path) -> None:
    transport = ScriptedTransport(root, msize=16 * 1024)
    transport.delay = 0.002
    data = os.urandom(1024 * 1024)
    with Client(transport, aname=str(root), window=4) as client:
        client.write_bytes("big", data)
        assert transport.max_in_flight == 4
        transport.max_in_flight = 0
        assert client.read_bytes("big") == data
        assert transport.max_in_flight == 4
        transport.max_in_flight = 0
        out = root.parent / "copy"
        client.copy_out("big", out)
        assert out.read_bytes() == data
        assert transport.max_in_flight == 4
    transport = ScriptedTransport(root, msize=16 * 1024)
    with Client(transport, aname=str(root), window=1) as client:
        assert client.read_bytes("big") == data
        assert transport.max_in_flight == 1


def test_closed_client(root: Path) -> None:
    transport = ScriptedTransport(root)
    client = Client(transport, aname=str(root), close_transport=False)
    client.close()
    client.close()
    assert client.closed and not transport.closed
    assert isinstance(transport.sent[-1], c.Tclunk) and transport.sent[-1].fid == 0
    with pytest.raises(TransportClosedError):
        client.listdir("")
    transport.close()
    transport = ScriptedTransport(root)
    with Client(transport, aname=str(root)):
        pass
    assert transport.closed


def test_usable_until_closed_or_declared_dead(root: Path) -> None:
    def intercept(m: c.Message) -> c.Message | None:
        if isinstance(m, (c.Tstatfs, c.Tflush)):
            raise TimeoutError(errno.ETIMEDOUT, "stuck server")
        return None

    with Client(ScriptedTransport(root), aname=str(root)) as client:
        assert client.usable
    assert not client.usable  # closed
    with Client(ScriptedTransport(root, intercept), aname=str(root), flush_timeout=0.1) as client:
        assert client.usable
        with pytest.raises(TimeoutError):
            client.statfs()
        assert not client.usable  # its Tflush was not answered either
