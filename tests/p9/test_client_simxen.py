"""The client suite through the whole simulated stack.

client -> Frontend -> simulated rings, grants and event channels -> the
QEMU-like simulated backend -> pyxen9p's FileServer on the exported directory.
Every test also checks that the guest domain holds nothing once closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from frontend_helpers import FE_DOMID, machine

from pyxen9p.p9.client import Client
from pyxen9p.p9.server import FileServer
from pyxen9p.xenbus import XenbusState

from .client_suite import *  # noqa: F403


@pytest.fixture
def root(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    return export


@pytest.fixture
def client(root: Path) -> Iterator[Client]:
    server = FileServer(root)
    try:
        with machine(handler=server.handle) as m:
            fe = m.connect(rings=2)
            c = Client(fe, aname=str(root), timeout=20)
            try:
                yield c
            finally:
                c.close()
            assert m.xen.resources(FE_DOMID).clean, m.xen.resources(FE_DOMID)
    finally:
        server.close()


def test_the_transport_is_the_xen_frontend(client: Client) -> None:
    fe = client.transport
    assert type(fe).__name__ == "Frontend"
    assert client.msize <= fe.msize
    assert fe.num_rings == 2  # type: ignore[attr-defined]


def test_a_server_answering_nothing_fails_every_request_at_once(root: Path) -> None:
    """A backend that stops answering (its QEMU died, say) cannot be seen by
    the transport; when not even a Tflush is answered the client gives up on
    the whole session, so requests in flight do not each wait out their own
    timeouts."""
    import threading
    import time

    from pyxen9p.errors import TransportError

    server = FileServer(root)
    silent = threading.Event()

    def handler(request: bytes) -> bytes:
        return b"" if silent.is_set() else server.handle(request)

    (root / "f").write_bytes(b"x")
    try:
        with machine(handler=handler) as m:
            fe = m.connect(rings=2)
            with Client(fe, aname=str(root), timeout=30, flush_timeout=0.3) as c:
                assert c.read_bytes("f") == b"x"
                silent.set()
                outcome: list[BaseException] = []

                def long_request() -> None:
                    try:
                        c.stat("f")
                    except BaseException as exc:
                        outcome.append(exc)

                worker = threading.Thread(target=long_request)
                worker.start()  # in flight, with a 30 s timeout
                time.sleep(0.2)
                start = time.monotonic()
                c.timeout = 0.3
                with pytest.raises(TimeoutError):
                    c.listdir("/")
                worker.join(5)
                assert not worker.is_alive(), "a request in flight kept waiting"
                assert time.monotonic() - start < 3
                assert len(outcome) == 1 and isinstance(outcome[0], TransportError)
                assert "unresponsive" in str(outcome[0])
                with pytest.raises(TransportError, match="unresponsive"):
                    c.stat("f")  # every later call fails at once
            assert m.xen.resources(FE_DOMID).clean
    finally:
        server.close()


def test_backend_killed_mid_transfer(root: Path) -> None:
    """The backend dies as a SIGKILLed QEMU does (no state written, mappings
    and ports gone) while large transfers run on several threads: every
    caller gets an OSError within about one request timeout plus one flush
    timeout, and close() waits once, not twice, for a backend that is gone."""
    import os
    import threading
    import time

    server = FileServer(root)
    payload = os.urandom(3 << 20)
    (root / "big").write_bytes(payload)
    fe_timeout, request_timeout, flush_timeout = 3.0, 1.0, 0.5
    try:
        with machine(handler=server.handle) as m:
            fe = m.connect(rings=2, timeout=fe_timeout)
            c = Client(fe, aname=str(root), timeout=request_timeout, flush_timeout=flush_timeout)
            moved = [0, 0]
            errors: list[tuple[int, float, BaseException]] = []

            def transfer(n: int) -> None:
                try:
                    while True:
                        if n == 0:
                            c.write_bytes(f"w{n}", payload)
                        else:
                            assert c.read_bytes("big") == payload
                        moved[n] += len(payload)
                except BaseException as exc:  # recorded and checked
                    errors.append((n, time.monotonic(), exc))

            threads = [threading.Thread(target=transfer, args=(n,)) for n in (0, 1)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while min(moved) == 0 and not errors and time.monotonic() < deadline:
                time.sleep(0.01)
            assert min(moved) > 0 and not errors, (moved, errors)
            killed = time.monotonic()
            m.backend.kill()
            assert m.backend.state == XenbusState.CONNECTED  # nothing was written
            for t in threads:
                t.join(request_timeout + flush_timeout + 10)
            assert not any(t.is_alive() for t in threads), "a transfer still waits"
            assert sorted(n for n, _, _ in errors) == [0, 1]
            for _, when, exc in errors:
                assert isinstance(exc, OSError), repr(exc)
                assert "unresponsive" in str(exc), exc  # not a plain timeout
                assert when - killed < request_timeout + flush_timeout + 5
            with pytest.raises(OSError, match="unresponsive"):
                c.stat("big")
            started = time.monotonic()
            c.close()
            closing = time.monotonic() - started
            # one bounded wait for a backend that ignores Closing (before: two)
            assert fe_timeout - 0.5 < closing < 2 * fe_timeout - 0.5, closing
            assert c.closed
            m.assert_clean()
    finally:
        server.close()


@pytest.mark.parametrize("operation", ["stat", "read", "write"])
def test_no_room_on_a_dead_backends_ring_is_an_unresponsive_server(
    root: Path, operation: str
) -> None:
    """The backend dies with its ring full: a chain (stat) or a window of
    Treads or Twrites that cannot be put within the request timeout is
    handled as a request not answered (a Tflush, which cannot be put either:
    the server is declared unresponsive), not raised as a bare timeout."""
    import struct
    import time

    server = FileServer(root)
    (root / "f").write_bytes(b"x" * 20000)
    try:
        with machine(handler=server.handle) as m:
            fe = m.connect(rings=1, ring_order=2, timeout=3.0)  # 8 KiB each way
            c = Client(fe, aname=str(root), timeout=0.5, flush_timeout=0.3)
            f = c.open("f", "r+b", buffering=0)
            m.backend.kill()
            # fill the ring to the last byte with requests nobody will consume
            # (tags the session does not reach; Twrites: a short reply each,
            # within the ring's reply budget)
            for tag in (0x7000, 0x7001):
                body = b"z" * (fe.msize - 7)
                fe.submit(struct.pack("<IBH", fe.msize, 118, tag) + body, timeout=1, lazy=True)
            started = time.monotonic()
            with pytest.raises(OSError, match="unresponsive"):
                if operation == "stat":
                    c.stat("f")
                elif operation == "read":
                    f.read(8192)
                else:
                    f.write(b"y" * 8192)
            assert time.monotonic() - started < 5
            c.close()
    finally:
        server.close()
