"""The client suite against Debian's real diod, a 9P2000.L file server.

Each test starts its own diod serving a fresh export over an inherited
socketpair (``--rfdno/--wfdno``: no listener), attaches with the absolute
export path as aname, and reaps diod afterwards.  diod missing: skipped,
unless ``PYXEN9P_REQUIRE_PEERS`` is set (then a failure).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_tool

from pyxen9p.p9.client import Client
from pyxen9p.p9.transport import StreamTransport

from .client_suite import *  # noqa: F403


def _diod_command(diod: str, export: Path, *transport: str) -> list[str]:
    return [
        diod, "-f", "-n", "-N", "-c", "/dev/null", "-L", "stderr",
        "-e", str(export), *transport,
    ]  # fmt: skip


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Make sure *proc* is gone when the block ends (killed if it lingers)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            try:
                proc.wait(5)  # diod exits when its client hangs up
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def diod() -> str:
    return need_tool("diod")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    return export


@pytest.fixture
def client(diod: str, root: Path, tmp_path: Path) -> Iterator[Client]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log = tmp_path / "diod.log"
    fd = str(theirs.fileno())
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            _diod_command(diod, root, "--rfdno", fd, "--wfdno", fd),
            pass_fds=(theirs.fileno(),),
            cwd=tmp_path,  # a crashing diod leaves its core there
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
    theirs.close()
    with _reaped(proc):
        try:
            c = Client(StreamTransport.from_socket(ours), aname=str(root), timeout=20)
        except BaseException:
            ours.close()
            raise
        try:
            yield c
        finally:
            c.close()
        proc.wait(10)


# --------------------------------------------------------------------------
# diod-specific checks


def test_diod_negotiation(client: Client, root: Path) -> None:
    assert client.version == "9P2000.L"
    assert 4096 <= client.msize <= client.transport.msize
    assert client.msize == 65536  # diod's limit (Debian 1.0.24)
    assert client.root_qid.type & 0x80


def test_diod_unix_socket_listener(diod: str, root: Path, tmp_path: Path) -> None:
    sock_path = tmp_path / "diod.sock"
    log = tmp_path / "diod-unix.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            _diod_command(diod, root, "-l", str(sock_path)),
            cwd=tmp_path,  # a crashing diod leaves its core there
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
    with _reaped(proc):
        try:
            deadline = time.monotonic() + 10
            while True:  # until diod listens
                assert proc.poll() is None, log.read_text()
                try:
                    transport = StreamTransport.unix(sock_path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    assert time.monotonic() < deadline, "diod does not listen"
                    time.sleep(0.02)
            (root / "hello.txt").write_text("over a unix socket")
            with Client(transport, aname=str(root), timeout=20) as c:
                assert c.read_text("hello.txt") == "over a unix socket"
                c.write_text("back.txt", "written")
            assert (root / "back.txt").read_text() == "written"
        finally:
            proc.terminate()
            proc.wait(10)


def test_diod_wrong_aname_is_refused(diod: str, root: Path, tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    fd = str(theirs.fileno())
    proc = subprocess.Popen(
        _diod_command(diod, root, "--rfdno", fd, "--wfdno", fd),
        pass_fds=(theirs.fileno(),),
        cwd=tmp_path,  # a crashing diod leaves its core there
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    with _reaped(proc):
        transport = StreamTransport.from_socket(ours)
        with pytest.raises(OSError):
            Client(transport, aname=str(tmp_path / "not-exported"), timeout=20)
        assert not transport.connected  # the client closed the transport it owned
        proc.wait(10)
    assert os.path.isdir(root)


def test_diod_blocked_request_is_flushed(client: Client, root: Path) -> None:
    # diod opens a FIFO for reading with a blocking open(2): the Tlopen waits
    # in the server until a writer comes.  The client times out, sends
    # Tflush, and diod answers Rflush once the open is done; the opened fid
    # is clunked and the tag reused only then.
    fifo = root / "fifo"
    os.mkfifo(fifo)
    saved = client.timeout
    flushes = client.flushes_sent
    stop = threading.Event()

    def unblock() -> None:
        while not stop.wait(0.05):
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:  # ENXIO: the server has not opened it yet
                assert exc.errno == errno.ENXIO
                continue
            os.close(fd)  # a writer came: the server's open(2) returns
            return

    writer = threading.Timer(1.0, unblock)
    f = None
    try:
        client.timeout = 0.3
        writer.start()
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            f = client.open("fifo", "rb", buffering=0)
        assert info.value.errno == errno.ETIMEDOUT
        assert client.flushes_sent == flushes + 1
        assert 0.9 < time.monotonic() - start < 10  # Rflush came after the open
        assert client.tags_in_use == 0  # the Rflush came: the tag is free again
        assert not client.stuck_tags
    finally:
        client.timeout = saved
        stop.set()
        writer.join(10)
        if f is not None:
            f.close()
    # the session goes on
    assert client.listdir("") == ["fifo"]
    assert client.write_bytes("after", b"ok") == 2
    assert (root / "after").read_bytes() == b"ok"
