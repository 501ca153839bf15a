"""The hostile-server fixture itself: its three ways in answer as the script says."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest

from pyxen9p.p9 import codec as c

from .hostile import SILENCE, HostileServer, on


def _lie_about_size(request: c.Tgetattr, honest: object) -> c.Message:
    reply = honest()  # type: ignore[operator]
    assert isinstance(reply, c.Rgetattr)
    return dataclasses.replace(reply, size=12345)


@pytest.mark.parametrize("way", ["transport", "socket"])
def test_script_replaces_answers_and_honest_ones_pass(tmp_path: Path, way: str) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    with HostileServer(tmp_path, on(c.Tgetattr, _lie_about_size)) as server:
        client = server.client() if way == "transport" else server.client_over_socket()
        with client:
            assert client.stat("f").st_size == 12345
            assert client.read_bytes("f") == b"abc"
            server.script = on(c.Tstatfs, lambda m, _h: c.Rlerror(m.tag, errno.EXDEV))
            with pytest.raises(OSError) as info:
                client.statfs()
            assert info.value.errno == errno.EXDEV
        assert any(isinstance(m, c.Tclunk) for m in server.sent)


def test_silence_is_a_timeout_in_process(tmp_path: Path) -> None:
    with HostileServer(tmp_path) as server, server.client(flush_timeout=0.1) as client:
        server.script = on(c.Tstatfs, lambda _m, _h: SILENCE)
        with pytest.raises(TimeoutError):
            client.statfs()


def test_raw_bytes_reach_the_stream_reader(tmp_path: Path) -> None:
    with HostileServer(tmp_path) as server, server.client_over_socket() as client:
        server.script = on(c.Tstatfs, lambda _m, _h: b"\x05\x00\x00\x00\x00\x01\x00")
        with pytest.raises(OSError, match="smaller than the 9P header"):
            client.statfs()


def test_a_failing_script_hangs_up_and_is_recorded(tmp_path: Path) -> None:
    def broken(_m: c.Message, _h: object) -> c.Message:
        raise RuntimeError("script bug")

    with HostileServer(tmp_path) as server, server.client_over_socket() as client:
        server.script = on(c.Tstatfs, broken)
        with pytest.raises(OSError):
            client.statfs()
        assert [str(e) for e in server.errors] == ["script bug"]
