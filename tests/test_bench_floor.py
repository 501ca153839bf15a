"""``bench/_floor.py``, the leanest Python frontend, on the simulated Xen.

The floor is measured only on real Xen (``bench_realxen.py --floor``); here
it is run for what it does: data written lands in the file whole, data read
is the file's, a stat gives the file's size, the frontend goes on working
after the floor hands its rings back, and a hostile backend's reply (an
Rread longer than asked, a reply for no request, an error) is refused with a
clear error, never copied.  No speed is checked.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import _floor  # noqa: E402

from pyxen9p.p9.client import Client  # noqa: E402
from pyxen9p.p9.server import FileServer  # noqa: E402

FLOOR_FID = 0x7FFF0000


class Hostile:
    """The file server's replies, one of them replaced while :attr:`rewrite` is set."""

    def __init__(self) -> None:
        self.rewrite: Callable[[bytes, bytes], bytes] | None = None

    def serve(self, server: FileServer) -> Callable[[bytes], bytes]:
        """The backend's handler: *server*'s, through :attr:`rewrite`."""

        def handle(request: bytes) -> bytes:
            reply = server.handle(request)
            if self.rewrite is not None:
                return self.rewrite(request, reply)
            return reply

        return handle


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Client, Hostile, Path]]:
    export = tmp_path / "export"
    export.mkdir()
    hostile = Hostile()
    with _common.simulated_client(export, rings=2, serve=hostile.serve) as client:
        yield client, hostile, export


def test_the_floor_writes_reads_and_stats_what_the_file_holds(
    setup: tuple[Client, Hostile, Path],
) -> None:
    client, _, export = setup
    data = os.urandom(3 * (1 << 20) + 12345)  # a tail shorter than a message
    view = memoryview(data)
    with (
        client.open("big", "wb", buffering=0) as f,
        _floor.LeanRings(client.transport) as lean,  # type: ignore[arg-type]
    ):
        at = 0
        while at < len(data):
            part = view[at : at + (1 << 20)]
            assert _floor.write_file(lean, f.fid, at, part, f.iounit) == len(part)
            at += len(part)
    assert (export / "big").read_bytes() == data
    buf = bytearray(1 << 20)
    got = bytearray()
    with (
        client.open("big", "rb", buffering=0) as f,
        _floor.LeanRings(client.transport) as lean,  # type: ignore[arg-type]
    ):
        while n := _floor.read_file(lean, f.fid, len(got), memoryview(buf), f.iounit):
            got += buf[:n]
    assert bytes(got) == data
    (export / "small").write_bytes(b"x" * 4096)
    rings = client.transport.num_rings  # type: ignore[attr-defined]
    with _floor.LeanRings(client.transport) as lean:  # type: ignore[arg-type]
        sizes = {
            _floor.stat_file(lean, client._session.root_fid, b"small", FLOOR_FID + i % rings, i)[9]
            for i in range(7)
        }
    assert sizes == {4096}
    # the floor handed the rings back where it left them: the client goes on
    assert client.read_bytes("big") == data
    assert client.stat("small").st_size == 4096


def test_a_missing_file_is_the_backends_errno(setup: tuple[Client, Hostile, Path]) -> None:
    client, _, _ = setup
    with (
        _floor.LeanRings(client.transport) as lean,  # type: ignore[arg-type]
        pytest.raises(_floor.FloorError) as caught,
    ):
        _floor.stat_file(lean, client._session.root_fid, b"nothing", FLOOR_FID, 0)
    assert caught.value.errno == errno.ENOENT
    assert client.listdir("") == []


def _longer_rread(request: bytes, reply: bytes) -> bytes:
    """An Rread claiming (and carrying) 16 bytes more than the Tread asked."""
    if request[4] != 116:
        return reply
    count = struct.unpack_from("<I", request, 19)[0]
    body = reply[11:] + b"\0" * (count + 16 - (len(reply) - 11))
    return struct.pack("<IBHI", 11 + len(body), 117, struct.unpack_from("<H", request, 5)[0],
                       len(body)) + body  # fmt: skip


def _count_over(request: bytes, reply: bytes) -> bytes:
    """An Rread of the size asked whose count field claims 16 bytes more."""
    if request[4] != 116:
        return reply
    return reply[:7] + struct.pack("<I", struct.unpack_from("<I", reply, 7)[0] + 16) + reply[11:]


def _stray_tag(request: bytes, reply: bytes) -> bytes:
    """The reply under a tag no request has."""
    return reply[:5] + struct.pack("<H", 0xFFF0) + reply[7:]


@pytest.mark.parametrize(
    ("rewrite", "says"),
    [(_longer_rread, "a 4123-byte reply over its bound 4107"),
     (_count_over, "an Rread of 4112 bytes for 4096 asked"),
     (_stray_tag, "a reply for tag 65520, not in flight")],
)  # fmt: skip
def test_a_hostile_reply_is_refused_not_copied(
    setup: tuple[Client, Hostile, Path], rewrite: Callable[[bytes, bytes], bytes], says: str
) -> None:
    client, hostile, export = setup
    (export / "f").write_bytes(b"y" * 4096)
    target = bytearray(4096 + 64)
    with client.open("f", "rb", buffering=0) as f:
        hostile.rewrite = rewrite
        try:
            with (
                pytest.raises(_floor.FloorError, match=says) as caught,
                _floor.LeanRings(client.transport) as lean,  # type: ignore[arg-type]
            ):
                _floor.read_file(lean, f.fid, 0, memoryview(target)[:4096], 4096)
        finally:
            hostile.rewrite = None
    assert caught.value.errno == errno.EPROTO
    assert bytes(target[4096:]) == b"\0" * 64  # nothing written past what was asked
    if rewrite is _count_over:
        # framed right, so consumed and refused: the rings go on, the client too
        assert client.read_bytes("f") == b"y" * 4096
    else:
        # the stream cannot be trusted: the connection is failed, fast
        with pytest.raises(OSError, match="the floor's rings broke"):
            client.stat("f")
