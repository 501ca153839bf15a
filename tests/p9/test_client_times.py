"""Times through the client: two's complement seconds both ways, clear errors past 64 bits."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import ProtocolError

from .hostile import HostileServer, on

DATED_1960 = -315_619_200  # 1960-01-01T00:00:00Z


def test_a_file_dated_1960_reads_and_writes_as_1960(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"")
    os.utime(tmp_path / "old", ns=(DATED_1960 * 10**9 + 1, DATED_1960 * 10**9 + 2))
    with HostileServer(tmp_path) as server, server.client() as client:
        st = client.stat("old")
        assert (st.st_atime_ns, st.st_mtime_ns) == (DATED_1960 * 10**9 + 1, DATED_1960 * 10**9 + 2)
        assert st.st_mtime == pytest.approx(DATED_1960) and int(st.st_mtime) == DATED_1960
        assert st[8] == DATED_1960  # the integer field, as os.stat gives it
        client.utime("old", ns=(-1, DATED_1960 * 10**9 - 1))  # just before 1970 and 1960
        local = (tmp_path / "old").stat()
        assert (local.st_atime_ns, local.st_mtime_ns) == (-1, DATED_1960 * 10**9 - 1)
        client.utime("old", times=(-0.5, -1.25))
        local = (tmp_path / "old").stat()
        assert (local.st_atime_ns, local.st_mtime_ns) == (-500_000_000, -1_250_000_000)
        setattrs = [m for m in server.sent if isinstance(m, c.Tsetattr)]
        assert (setattrs[0].atime_sec, setattrs[0].atime_nsec) == (-1, 999_999_999)


def test_a_server_sending_the_wire_form_of_1960(tmp_path: Path) -> None:
    """What Linux or QEMU sends for 1960: the u64 2**64 - 315619200."""
    (tmp_path / "f").write_bytes(b"")

    def wire_1960(m: c.Tgetattr, honest: Callable[[], c.Message]) -> bytes:
        raw = bytearray(c.encode(honest()))
        mtime_at = 7 + 8 + 13 + 4 * 3 + 8 * 5 + 16  # header valid qid mode uid gid 5*u64 atime
        raw[mtime_at : mtime_at + 8] = (2**64 + DATED_1960).to_bytes(8, "little")
        return bytes(raw)

    with HostileServer(tmp_path, on(c.Tgetattr, wire_1960)) as server, server.client() as client:
        assert client.stat("f").st_mtime_ns // 10**9 == DATED_1960


def test_times_outside_64_bits_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with HostileServer(tmp_path) as server, server.client() as client:
        with pytest.raises(OverflowError, match="outside the signed 64-bit seconds of 9P"):
            client.utime("f", ns=(0, 2**63 * 10**9))
        with pytest.raises(OverflowError):
            client.utime("f", times=(-(2.0**64), 0))
        assert not any(isinstance(m, c.Tsetattr) for m in server.sent)


def test_a_nanosecond_field_past_a_second_is_a_protocol_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")

    def bad(m: c.Tgetattr, honest: Callable[[], c.Message]) -> c.Message:
        return dataclasses.replace(honest(), ctime_nsec=2**64 - 1)  # type: ignore[type-var]

    server = HostileServer(tmp_path, on(c.Tgetattr, bad))
    with server, server.client() as client, pytest.raises(ProtocolError, match="ctime_nsec"):
        client.stat("f")
