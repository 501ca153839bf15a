"""A server that never ends an answer: every client call stays within its bound.

Each script keeps a runaway guard: past a number of requests far above the
bound, it fails the request, so a client without the bound gets that error
(and the test fails) instead of running until memory is gone.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_READ, Client, ProtocolError

from .hostile import HostileServer, Script

LIMIT = 256 * 1024  # the client's max_read in these tests


class Runaway(OSError):
    """The guard: the client asked far more than its bound allows."""


def endless_reads(guard: int = 2000) -> Script:
    """Every Tread is answered in full, at any offset: the file never ends."""
    calls = [0]

    def script(m: c.Message, _honest: Callable[[], c.Message]) -> c.Message | None:
        if not isinstance(m, c.Tread):
            return None
        calls[0] += 1
        if calls[0] > guard:
            raise Runaway("the client read on and on")
        return c.Rread(m.tag, b"x" * m.count)

    return script


def bounded(server: HostileServer, **options: Any) -> Client:
    """A client whose bounds are set as attributes (so an old client just ignores them)."""
    client = server.client(msize=64 * 1024)
    client.max_read = options.get("max_read", LIMIT)
    client.max_entries = options.get("max_entries", 1000)
    return client


def test_defaults_are_documented_constants(tmp_path: Path) -> None:
    with HostileServer(tmp_path) as server, server.client() as client:
        assert client.max_read == DEFAULT_MAX_READ == 1 << 30
        assert client.max_entries == DEFAULT_MAX_ENTRIES == 1_000_000
    with HostileServer(tmp_path) as server, server.client(max_read=5, max_entries=None) as client:
        assert (client.max_read, client.max_entries) == (5, None)


@pytest.mark.parametrize("call", ["read_bytes", "read_text", "read", "raw_readall"])
def test_an_endless_file_stops_at_max_read(tmp_path: Path, call: str) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")
    with HostileServer(tmp_path, endless_reads()) as server, bounded(server) as client:
        with pytest.raises(OSError) as info:
            if call == "read_bytes":
                client.read_bytes("f")
            elif call == "read_text":
                client.read_text("f")
            elif call == "read":
                with client.open("f", "rb") as f:
                    f.read()
            else:
                with client.open("f", "rb", buffering=0) as raw:
                    raw.readall()
        assert info.value.errno == errno.EFBIG, info.value
        assert "more than 262144 bytes (Client.max_read)" in str(info.value)
        assert info.value.filename == "f"
        reads = [m for m in server.sent if isinstance(m, c.Tread)]
        assert sum(m.count for m in reads) <= LIMIT + 1  # never asked past the bound
        assert client.fid_count == 1  # the root only


def test_a_file_larger_than_max_read_is_refused_before_reading(tmp_path: Path) -> None:
    (tmp_path / "exact").write_bytes(b"e" * LIMIT)
    (tmp_path / "over").write_bytes(b"o" * (LIMIT + 1))
    with HostileServer(tmp_path) as server, bounded(server) as client:
        assert client.read_bytes("exact") == b"e" * LIMIT
        server.sent.clear()
        with pytest.raises(OSError) as info:
            client.read_bytes("over")
        assert info.value.errno == errno.EFBIG
        assert "the file has 262145 bytes" in str(info.value)
        assert not any(isinstance(m, c.Tread) for m in server.sent)
        client.max_read = None  # no bound
        assert client.read_bytes("over") == b"o" * (LIMIT + 1)


def test_a_lying_size_is_refused_before_reading(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"small")

    def huge(m: c.Message, honest: Callable[[], c.Message]) -> c.Message | None:
        if isinstance(m, c.Tgetattr):
            return dataclasses.replace(honest(), size=1 << 62)  # type: ignore[type-var]
        return None

    with HostileServer(tmp_path, huge) as server, bounded(server) as client:
        with pytest.raises(OSError) as info:
            client.read_bytes("f")
        assert info.value.errno == errno.EFBIG
        assert not any(isinstance(m, c.Tread) for m in server.sent)


def test_a_file_that_grows_while_read_is_read_whole(tmp_path: Path) -> None:
    """The size Tgetattr gave is not the end: a file that grew is read on to EOF."""
    data = bytes(range(256)) * 600  # 150 KiB
    (tmp_path / "f").write_bytes(data)

    def stale(m: c.Message, honest: Callable[[], c.Message]) -> c.Message | None:
        if isinstance(m, c.Tgetattr):
            return dataclasses.replace(honest(), size=1000)  # type: ignore[type-var]
        return None

    with HostileServer(tmp_path, stale) as server, bounded(server) as client:
        assert client.read_bytes("f") == data
        with client.open("f", "rb") as f:
            f.seek(100)
            assert f.read() == data[100:]
        client.max_read = 100_000  # less than what the file grew to
        with pytest.raises(OSError) as info:
            client.read_bytes("f")
        assert info.value.errno == errno.EFBIG
        assert "the file grew to more than 100000 bytes" in str(info.value)


def test_a_download_stops_at_the_reported_size_plus_max_read(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(b"0123456789")
    out = tmp_path / "out"
    with HostileServer(export, endless_reads()) as server, bounded(server) as client:
        with pytest.raises(OSError) as info:
            client.copy_out("f", out)
        assert info.value.errno == errno.EFBIG, info.value
        assert "grew past its size (10) by more than 262144 bytes" in str(info.value)
        assert not out.exists()  # nothing under the final name
        assert list(tmp_path.iterdir()) == [export]  # no temporary file left
        assert client.fid_count == 1  # the root only


def test_a_download_of_a_growing_file_is_whole(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    data = bytes(range(256)) * 600
    (export / "f").write_bytes(data)

    def stale(m: c.Message, honest: Callable[[], c.Message]) -> c.Message | None:
        if isinstance(m, c.Tgetattr):
            return dataclasses.replace(honest(), size=1000)  # type: ignore[type-var]
        return None

    with HostileServer(export, stale) as server, bounded(server) as client:
        client.copy_out("f", tmp_path / "out", preserve=False)
        assert (tmp_path / "out").read_bytes() == data


def test_an_rread_longer_than_asked_is_a_protocol_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")

    def long(m: c.Message, _honest: Callable[[], c.Message]) -> c.Message | None:
        if isinstance(m, c.Tread):
            return c.Rread(m.tag, b"y" * (m.count + 1))
        return None

    with HostileServer(tmp_path, long) as server, bounded(server) as client:
        f = client.open("f", "rb", buffering=0)
        with f, pytest.raises(ProtocolError, match="Rread of 1001 bytes for a Tread of 1000"):
            f.read(1000)
        assert client.fid_count == 1  # the root only


# --------------------------------------------------------------------------
# Listings


def _entry(name: str, offset: int) -> c.Dirent:
    return c.Dirent(c.Qid(0, 0, 1000 + offset), offset, c.DT_REG, name)


def listing(next_offset: Callable[[int], int], guard: int = 20_000) -> Script:
    """Every Treaddir at offset *o* gets one entry whose cookie is ``next_offset(o)``."""
    calls = [0]

    def script(m: c.Message, _honest: Callable[[], c.Message]) -> c.Message | None:
        if not isinstance(m, c.Treaddir):
            return None
        calls[0] += 1
        if calls[0] > guard:
            raise Runaway("the client listed on and on")
        n = next_offset(m.offset)
        return c.Rreaddir.from_entries(m.tag, [_entry(f"e{n}", n)])

    return script


def test_an_endless_listing_stops_at_max_entries(tmp_path: Path) -> None:
    server = HostileServer(tmp_path, listing(lambda o: o + 1))
    with server, bounded(server, max_entries=1000) as client:
        with pytest.raises(OSError) as info:
            client.listdir("")
        assert info.value.errno == errno.EFBIG, info.value
        assert "more than 1000 entries (Client.max_entries)" in str(info.value)
        assert sum(isinstance(m, c.Treaddir) for m in server.sent) == 1003
        assert client.fid_count == 1  # the root only


def test_a_listing_whose_offsets_cycle_is_a_protocol_error(tmp_path: Path) -> None:
    # offsets 0 -> 5 -> 9 -> 5 -> ...: each one advances, but the cycle never ends
    cycle = {0: 5, 5: 9, 9: 5}
    server = HostileServer(tmp_path, listing(lambda o: cycle[o]))
    with server, bounded(server, max_entries=None) as client:
        with pytest.raises(ProtocolError, match="the offset 5 came back"):
            client.listdir("")
        assert sum(isinstance(m, c.Treaddir) for m in server.sent) == 3


def test_a_listing_that_does_not_advance_is_a_protocol_error(tmp_path: Path) -> None:
    server = HostileServer(tmp_path, listing(lambda o: 7))
    with server, bounded(server) as client, pytest.raises(ProtocolError, match="did not advance"):
        client.listdir("")


def test_a_large_honest_directory_is_listed_whole(tmp_path: Path) -> None:
    for i in range(300):
        (tmp_path / f"file-{i:04d}-{'x' * 100}").touch()
    with HostileServer(tmp_path) as server, bounded(server, max_entries=300) as client:
        assert len(client.listdir("")) == 300  # several Treaddirs; '.' and '..' not counted
        client.max_entries = 299
        with pytest.raises(OSError) as info:
            client.listdir("")
        assert info.value.errno == errno.EFBIG
