"""One error vocabulary: the same hostile reply raises the same class, with the
same errno, whatever transport carries it.

Each case is one script of the hostile server (:mod:`tests.p9.hostile`), run
over a real :class:`~pyxen9p.p9.transport.StreamTransport` on a socket and
over the simulated Xen (frontend -> rings -> ``Sim9pfsBackend`` whose handler
is the same script).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from frontend_helpers import FE_DOMID, machine

from pyxen9p.errors import (
    FramingError,
    ProtocolError,
    Pyxen9pError,
    TransportClosedError,
    TransportError,
)
from pyxen9p.p9 import codec as c
from pyxen9p.p9.client import Client

from .hostile import HostileServer, Script, on

WAYS = ["socket", "xen"]


@contextlib.contextmanager
def _connect(way: str, server: HostileServer, **options: Any) -> Iterator[Client]:
    options.setdefault("aname", str(server.server.root))
    options.setdefault("timeout", 10)
    if way == "socket":
        with server.client_over_socket(**options) as client:
            yield client
        return
    with machine(handler=server.handle) as m:
        with Client(m.connect(rings=2), **options) as client:
            yield client
        assert m.xen.resources(FE_DOMID).clean, m.xen.resources(FE_DOMID)


def _getattr(answer: Callable[[c.Tgetattr, Callable[[], c.Message]], Any]) -> Script:
    return on(c.Tgetattr, answer)


def _raw(mtype: int, size: int | None = None, body: bytes = b"") -> Script:
    """A Tgetattr answered with a frame of type *mtype* whose size field says *size*."""

    def answer(m: c.Tgetattr, _honest: Callable[[], c.Message]) -> bytes:
        n = c.HEADER_SIZE + len(body) if size is None else size
        return struct.pack("<IBH", n, mtype, m.tag) + body

    return _getattr(answer)


def _trailing(m: c.Tgetattr, honest: Callable[[], c.Message]) -> bytes:
    good = c.encode(honest()) + b"\0"
    return struct.pack("<I", len(good)) + good[4:]


def _wrong_tag(m: c.Tgetattr, honest: Callable[[], c.Message]) -> c.Message:
    return dataclasses.replace(honest(), tag=m.tag ^ 0x4000)


def _padded_rlerror(m: c.Tgetattr, _honest: Callable[[], c.Message]) -> bytes:
    body = struct.pack("<I", errno.EIO) + bytes(9000)  # larger than the msize of 8192
    return struct.pack("<IBH", c.HEADER_SIZE + len(body), c.Rlerror.TYPE, m.tag) + body


def _hang_up(_m: c.Tgetattr, _honest: Callable[[], c.Message]) -> c.Message:
    # the socket server hangs up; the simulated backend goes to Closing
    raise RuntimeError("the server gives up")


R_GETATTR = c.Rgetattr.TYPE

#: name -> (script, client options, expected class, expected errno, connection survives)
CASES: dict[str, tuple[Script, dict[str, Any], type[BaseException], int, bool]] = {
    "reply of the wrong type": (
        _getattr(lambda m, _h: c.Rstatfs(m.tag, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
        {},
        ProtocolError,
        errno.EPROTO,
        True,
    ),
    "Tread answered with Rwrite": (
        on(c.Tread, lambda m, _h: c.Rwrite(m.tag, 1)),
        {},
        ProtocolError,
        errno.EPROTO,
        True,
    ),
    "truncated reply body": (_raw(R_GETATTR, body=b"abc"), {}, ProtocolError, errno.EPROTO, True),
    "trailing bytes": (_getattr(_trailing), {}, ProtocolError, errno.EPROTO, True),
    "unknown reply type": (_raw(250, body=b"x"), {}, ProtocolError, errno.EPROTO, True),
    "reply larger than the negotiated msize": (
        _getattr(_padded_rlerror),
        {"msize": 8192},
        ProtocolError,
        errno.EPROTO,
        True,
    ),
    "Rlerror with error number 0": (
        _getattr(lambda m, _h: c.Rlerror(m.tag, 0)),
        {},
        ProtocolError,
        errno.EPROTO,
        True,
    ),
    "Rerror with error number 70000": (
        _getattr(lambda m, _h: c.Rerror(m.tag, "odd", 70000)),
        {},
        ProtocolError,
        errno.EPROTO,
        True,
    ),
    "frame size below the header": (
        _raw(R_GETATTR, size=3),
        {},
        FramingError,
        errno.EPROTO,
        False,
    ),
    "frame size above the msize": (
        _raw(R_GETATTR, size=0xFFFFFFFF),
        {},
        FramingError,
        errno.EMSGSIZE,
        False,
    ),
    "the server hangs up": (
        _getattr(_hang_up),
        {},
        TransportClosedError,
        errno.ECONNRESET,
        False,
    ),
    "reply with a tag nobody waits for": (
        _getattr(_wrong_tag),
        {"timeout": 0.5},
        TimeoutError,
        errno.ETIMEDOUT,
        True,
    ),
}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", list(CASES))
def test_the_same_hostile_reply_raises_the_same_error_on_every_transport(
    tmp_path: Path, way: str, case: str
) -> None:
    script, options, expected, code, survives = CASES[case]
    (tmp_path / "f").write_bytes(b"data")
    with HostileServer(tmp_path) as server, _connect(way, server, **options) as client:
        assert client.read_bytes("f") == b"data"
        server.script = script
        with pytest.raises(BaseException) as info:
            client.read_bytes("f") if case.startswith("Tread") else client.stat("f")
        exc = info.value
        assert type(exc) is expected, f"{way}: {type(exc).__mro__} {exc}"
        assert exc.errno == code  # type: ignore[attr-defined]
        assert isinstance(exc, OSError)
        if expected is not TimeoutError:
            assert isinstance(exc, Pyxen9pError)
        assert isinstance(exc, TransportError) == (not survives)
        server.script = None
        if survives:
            assert client.stat("f").st_size == 4
            assert client.fid_count == 1
        else:
            with pytest.raises(expected) as again:
                client.stat("f")
            assert again.value.errno == code  # type: ignore[attr-defined]
        if case.startswith("reply with a tag"):
            assert client.transport.dropped_replies == 1  # type: ignore[attr-defined]
