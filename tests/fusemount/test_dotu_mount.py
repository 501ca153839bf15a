"""The mount over 9P2000.u with xen-9pfsd's rules (tests/p9/userver.py stands in for it).

:class:`~pyxen9p.mount.ClientOperations` is driven directly on a client that
knows it talks to xen-9pfsd (no FUSE needed), and a real FUSE mount goes
through the multiplexer on a xen-9pfsd backend (the agent's configuration),
with programs in a child process: the root's attributes made up locally, reads,
writes, creation, truncation through ``O_TRUNC``, removal, and clean errnos for
what xen-9pfsd cannot do.  The backend is never asked for the root's attributes.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from p9.userver import UServer, mux_as_xen_9pfsd

from pyxen9p.mount import ClientOperations


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub").mkdir()
    return root


def errno_of(call: Any, *args: Any) -> int:
    try:
        call(*args)
    except OSError as exc:
        return int(exc.errno or 0)
    return 0


def test_operations_over_xen_9pfsd(share: Path) -> None:
    server = UServer(share)  # the client knows xen-9pfsd: its transport's backend_path
    client = server.client()
    try:
        ops = ClientOperations(client)
        root = ops.getattr("/")
        assert stat.S_ISDIR(root["st_mode"]) and stat.S_IMODE(root["st_mode"]) == 0o755
        assert (root["st_uid"], root["st_gid"]) == (os.getuid(), os.getgid())
        assert root["st_ino"] == client.root_qid.path and ops.local_root
        assert ops.getattr("/a.txt")["st_size"] == 6
        names = sorted(e if isinstance(e, str) else e[0] for e in ops.readdir("/", 0))
        assert names == [".", "..", "a.txt", "sub"]
        fh = ops.create("/sub/new.txt", 0o640, os.O_WRONLY | os.O_CREAT)
        assert ops.write("/sub/new.txt", b"hello", 0, fh) == 5
        assert errno_of(ops.fsync, "/sub/new.txt", 0, fh) == errno.ENOSYS  # FUSE: success
        ops.release("/sub/new.txt", fh)
        assert (share / "sub/new.txt").read_bytes() == b"hello"
        assert stat.S_IMODE((share / "sub/new.txt").stat().st_mode) == 0o640
        fh = ops.open("/sub/new.txt", os.O_RDONLY)
        assert ops.read("/sub/new.txt", 100, 0, fh) == b"hello"
        ops.release("/sub/new.txt", fh)
        ops.truncate("/sub/new.txt", 0)  # Topen with OTRUNC
        assert (share / "sub/new.txt").read_bytes() == b""
        fh = ops.open("/a.txt", os.O_WRONLY | os.O_TRUNC)
        assert ops.write("/a.txt", b"beta\n", 0, fh) == 5
        ops.release("/a.txt", fh)
        assert (share / "a.txt").read_bytes() == b"beta\n"
        ops.mkdir("/d", 0o755)
        assert (share / "d").is_dir()
        # what xen-9pfsd cannot do: EPERM for rmdir and rename, EOPNOTSUPP for the rest
        assert errno_of(ops.rmdir, "/d") == errno.EPERM
        assert errno_of(ops.rename, "/a.txt", "/b.txt") == errno.EPERM
        assert errno_of(ops.chmod, "/a.txt", 0o600) == errno.EOPNOTSUPP
        assert errno_of(ops.utimens, "/a.txt", None) == errno.EOPNOTSUPP
        assert errno_of(ops.truncate, "/a.txt", 2) == errno.EOPNOTSUPP
        assert errno_of(ops.symlink, "/l", "a.txt") == errno.EOPNOTSUPP
        assert ops.statfs("/")["f_namemax"] == 255
        ops.unlink("/sub/new.txt")  # Topen(ORCLOSE) + Tclunk
        assert not (share / "sub/new.txt").exists()
        assert (share / "d").is_dir() and (share / "a.txt").is_file()
        ops.destroy("/")
        assert client.usable
    finally:
        client.close()
        server.close()
    assert not server.root_tstat_seen
    assert server.peak_fids <= 5


#: The program run in the mount: each step's outcome (errno, or what it read).
_PROGRAM = r"""
import errno, json, os, stat, sys
m = sys.argv[1]
out = {}
def step(name, fn):
    try:
        out[name] = fn()
    except OSError as exc:
        out[name] = "errno %d" % exc.errno
st = os.stat(m)
out["root"] = [stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid == os.getuid()]
step("ls", lambda: sorted(os.listdir(m)))
step("cat", lambda: open(os.path.join(m, "a.txt")).read())
def write_new():
    with open(os.path.join(m, "sub", "new.txt"), "w") as f:
        f.write("written through FUSE\n")
        f.flush()
        os.fsync(f.fileno())
    return open(os.path.join(m, "sub", "new.txt")).read()
step("write", write_new)
def overwrite():
    with open(os.path.join(m, "a.txt"), "w") as f:  # O_TRUNC
        f.write("new\n")
    return open(os.path.join(m, "a.txt")).read()
step("overwrite", overwrite)
step("mkdir", lambda: os.mkdir(os.path.join(m, "d")))
step("rmdir", lambda: os.rmdir(os.path.join(m, "d")))
step("rename", lambda: os.rename(os.path.join(m, "a.txt"), os.path.join(m, "b.txt")))
step("chmod", lambda: os.chmod(os.path.join(m, "a.txt"), 0o600))
step("statvfs", lambda: os.statvfs(m).f_namemax)
step("rm", lambda: os.remove(os.path.join(m, "sub", "new.txt")))
step("ls-sub", lambda: os.listdir(os.path.join(m, "sub")))
print(json.dumps(out))
"""


def test_fuse_mount_through_the_mux_on_xen_9pfsd(
    share: Path, tmp_path: Path, mounter: Any
) -> None:
    with mux_as_xen_9pfsd(share, tmp_path) as (_, mux):
        m = mounter("--unix", str(tmp_path / "mux.sock"), "--timeout", "10")
        done = subprocess.run(
            [sys.executable, "-c", _PROGRAM, str(m.path)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["root"] == [True, 0o755, True]
        assert out["ls"] == ["a.txt", "sub"]
        assert out["cat"] == "alpha\n"
        assert out["write"] == "written through FUSE\n"
        assert out["overwrite"] == "new\n"
        assert out["mkdir"] is None
        assert out["rmdir"] == f"errno {errno.EPERM}"
        assert out["rename"] == f"errno {errno.EPERM}"
        assert out["chmod"] == f"errno {errno.EOPNOTSUPP}"
        assert out["statvfs"] == 255
        assert out["rm"] is None and out["ls-sub"] == []
        assert (share / "a.txt").read_text() == "new\n"
        assert (share / "d").is_dir() and not (share / "sub/new.txt").exists()
        assert m.unmount() == 0
        assert mux.root_tstats_refused >= 1
