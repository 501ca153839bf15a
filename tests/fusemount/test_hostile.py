"""The mount over a hostile 9P server (issue 10 §2): programs get errors, never a hang.

The server is the scripted :class:`~p9.hostile.HostileServer` on a Unix
socket; the mount process connects to it with 2-second timeouts.  Names with
``/``, reads longer than asked and errnos no system call returns all give
``EIO`` to the program and leave the mount serving; a server that stops
answering gives ``EIO`` after the timeout, then ``ENOTCONN`` at once, and the
mount still unmounts cleanly.  Programs run in child processes with a time
limit, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import dataclasses
import errno
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from p9.hostile import SILENCE, HostileServer, on

from pyxen9p.p9 import codec as c

from .conftest import is_mounted

#: The request timeout of the mount's client.
TIMEOUT = 2.0


def errno_of(path: Path, what: str = "stat") -> int:
    """The errno a separate process gets for *what* on *path* (0: success); 60 s at most."""
    code = {
        "stat": "os.stat(p)",
        "read": "open(p, 'rb').read()",
        "list": "os.listdir(p)",
    }[what]
    program = (
        "import os, sys\np = sys.argv[1]\n"
        f"try:\n    {code}\nexcept OSError as e:\n    sys.exit(e.errno)\n"
    )
    done = subprocess.run([sys.executable, "-c", program, str(path)], timeout=60, check=False)
    return done.returncode


@pytest.fixture
def hostile_mount(tmp_path: Path, mounter: Any) -> Any:
    """``(server, share_directory, mount)``: a mount of a :class:`HostileServer`."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"content")
    (root / "d").mkdir()
    (root / "d" / "x").write_text("x")
    with HostileServer(root) as server:
        sock = tmp_path / "9p.sock"
        server.listen_unix(sock)
        m = mounter("--unix", str(sock), "--aname", str(root), "--timeout", str(TIMEOUT))
        yield server, root, m
        m.close()


def test_a_name_with_a_slash_is_eio(hostile_mount: Any) -> None:
    server, _, m = hostile_mount

    def evil(request: c.Treaddir, honest: Any) -> c.Message:
        reply = honest()
        entries = [c.Dirent(e.qid, e.offset, e.type, "../../etc" if e.name == "x" else e.name)
                   for e in reply.entries()]
        return c.Rreaddir.from_entries(request.tag, entries)

    server.script = on(c.Treaddir, evil)
    assert errno_of(m.path / "d", "list") == errno.EIO
    server.script = None
    assert errno_of(m.path / "d", "list") == 0
    assert (m.path / "f").read_bytes() == b"content"


def test_a_read_longer_than_asked_is_eio(hostile_mount: Any) -> None:
    server, _, m = hostile_mount
    server.script = on(c.Tread, lambda r, h: c.Rread(r.tag, b"y" * (r.count + 1)))
    assert errno_of(m.path / "f", "read") == errno.EIO
    server.script = None
    assert errno_of(m.path / "f", "read") == 0


@pytest.mark.parametrize("ecode", [0, 512, 99999, 2**32 - 1])
def test_an_impossible_errno_is_eio(hostile_mount: Any, ecode: int) -> None:
    server, _, m = hostile_mount

    def evil(request: c.Twalk, honest: Any) -> c.Message | None:
        return c.Rlerror(request.tag, ecode) if "bad" in request.wnames else None

    server.script = on(c.Twalk, evil)
    assert errno_of(m.path / "bad") == errno.EIO
    # the server's own errnos pass through
    assert errno_of(m.path / "missing") == errno.ENOENT


def test_a_lie_about_the_size_ends_at_the_real_end(hostile_mount: Any) -> None:
    server, _, m = hostile_mount

    def evil(request: c.Tgetattr, honest: Any) -> c.Message:
        reply = honest()
        return reply if reply.mode & 0o40000 else dataclasses.replace(reply, size=1 << 40)

    server.script = on(c.Tgetattr, evil)
    start = time.monotonic()
    done = subprocess.run(["cat", str(m.path / "f")], capture_output=True, timeout=60,
                          check=False)
    assert done.stdout == b"content"
    assert time.monotonic() - start < 30
    assert not server.errors


def test_a_server_that_stops_answering(hostile_mount: Any) -> None:
    server, _, m = hostile_mount
    assert errno_of(m.path / "f") == 0
    server.script = lambda request, honest: SILENCE
    start = time.monotonic()
    # the request times out (EIO); its Tflush is not answered either: the session is dead
    assert errno_of(m.path / "new1") == errno.EIO
    assert time.monotonic() - start < 4 * TIMEOUT + 10
    start = time.monotonic()
    assert errno_of(m.path / "new2") == errno.ENOTCONN
    assert errno_of(m.path / "f", "read") in (errno.ENOTCONN, errno.EIO)
    assert time.monotonic() - start < 10
    # still unmounts cleanly, and the serving process ends
    assert m.unmount() == 0
    assert not is_mounted(m.path)


def test_requests_are_served_concurrently(hostile_mount: Any) -> None:
    """A read the server leaves unanswered does not hold up the others."""
    server, root, m = hostile_mount
    (root / "big").write_bytes(b"b" * (1 << 20))
    far = 1 << 19
    server.script = on(c.Tread, lambda r, h: SILENCE if r.offset == far else None)
    slow = subprocess.Popen([sys.executable, "-c", "import os, sys\ntry:\n"
                             f"    fd = os.open({str(m.path / 'big')!r}, os.O_RDONLY)\n"
                             f"    os.pread(fd, 4096, {far})\n"
                             "except OSError as e:\n    sys.exit(e.errno)"])
    try:
        time.sleep(0.5)
        assert slow.poll() is None  # waiting for its reply
        start = time.monotonic()
        for name in ("f", "d/x", "f", "d/x"):
            assert (m.path / name).read_bytes() in (b"content", b"x")
        assert time.monotonic() - start < TIMEOUT / 2
        assert slow.poll() is None
        # the slow request ends with EIO after the timeout (its Tflush is answered)
        assert slow.wait(30) == errno.EIO
        assert errno_of(m.path / "f", "read") == 0
    finally:
        if slow.poll() is None:
            slow.kill()
