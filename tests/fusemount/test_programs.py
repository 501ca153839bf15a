"""Real programs on a FUSE mount of a simulated Xen share (issue 10 §2).

``cp -a``, ``diff -r``, ``tar``, ``rsync``, ``find``, ``git`` and ``sqlite3``
work on the mount, and what they write is what the share's directory holds.
The mount's life: served in the foreground until ``fusermount3 -u``,
SIGTERM or SIGINT (each unmounts cleanly, exit 0); in the background like
sshfs (the command returns once the mount is ready; a mount that fails
reports the error and a non-zero status).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import need_tool

from .conftest import env, is_mounted, need_fuse, serve_command, wait_for


def run(*command: str | Path, cwd: Path | None = None) -> str:
    """Run a program; its output (fails the test with its stderr when it fails)."""
    done = subprocess.run(
        [str(a) for a in command], cwd=cwd, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


def make_tree(root: Path) -> None:
    """A small tree with the kinds of entries programs meet."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "deeper" / "c").write_text("c" * 10)
    (root / "zero").write_bytes(b"")
    (root / "link").symlink_to("a.txt")
    (root / "dangling").symlink_to("nowhere")
    os.chmod(root / "sub" / "deeper" / "c", 0o640)
    os.utime(root / "a.txt", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))


@pytest.fixture
def share(tmp_path: Path, mounter: object) -> tuple[Path, Path]:
    """``(share_directory, mount_point)``: a simulated share mounted in the foreground."""
    directory = tmp_path / "share"
    directory.mkdir()
    m = mounter("--simulate", str(directory))  # type: ignore[operator]
    return directory, m.path


def test_cp_diff_find_tar(share: tuple[Path, Path], tmp_path: Path) -> None:
    directory, mnt = share
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    run("cp", "-a", f"{src}/.", mnt / "copy")
    run("diff", "-r", "--no-dereference", src, mnt / "copy")
    run("diff", "-r", "--no-dereference", src, directory / "copy")
    # times, modes and link targets survive cp -a
    st = os.stat(mnt / "copy" / "a.txt")
    assert st.st_mtime_ns == 1_500_000_000_987_654_321
    assert os.stat(mnt / "copy" / "sub" / "deeper" / "c").st_mode & 0o777 == 0o640
    assert os.readlink(mnt / "copy" / "dangling") == "nowhere"
    # find sees the same names, types, sizes and modes
    fmt = "%P %y %s %m\n"
    local = sorted(run("find", src, "-printf", fmt).splitlines())
    over = sorted(run("find", mnt / "copy", "-printf", fmt).splitlines())
    sizes = [line for line in local if " d " not in line]
    assert sizes == [line for line in over if " d " not in line]
    # tar out of the mount, into the mount
    run("tar", "-C", mnt / "copy", "-cf", tmp_path / "t.tar", ".")
    (mnt / "untar").mkdir()
    run("tar", "-C", mnt / "untar", "-xf", tmp_path / "t.tar")
    run("diff", "-r", "--no-dereference", src, mnt / "untar")
    # inode numbers are the server's, stable across lookups
    assert os.stat(mnt / "copy" / "a.txt").st_ino == os.stat(mnt / "copy" / "a.txt").st_ino
    assert os.stat(mnt / "copy" / "a.txt").st_ino != os.stat(mnt / "copy" / "zero").st_ino


def test_rsync(share: tuple[Path, Path], tmp_path: Path) -> None:
    need_tool("rsync")
    directory, mnt = share
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    run("rsync", "-a", f"{src}/", f"{mnt}/r/")
    run("rsync", "-a", "--delete", f"{mnt}/r/", f"{tmp_path}/back/")
    run("diff", "-r", "--no-dereference", src, tmp_path / "back")
    run("diff", "-r", "--no-dereference", src, directory / "r")
    # a second run finds nothing to do (sizes and times match)
    out = run("rsync", "-ai", f"{src}/", f"{mnt}/r/")
    assert out.strip() == ""


def test_git(share: tuple[Path, Path]) -> None:
    need_tool("git")
    directory, mnt = share
    repo = mnt / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=T", "-c", "user.email=t@example.org", "-c",
           "init.defaultBranch=main"]
    run(*git, "init", "-q", cwd=repo)
    (repo / "f.txt").write_text("one\n")
    run(*git, "add", "f.txt", cwd=repo)
    run(*git, "commit", "-q", "-m", "first", cwd=repo)
    (repo / "f.txt").write_text("two\n")
    run(*git, "commit", "-q", "-am", "second", cwd=repo)
    run(*git, "fsck", "--strict", cwd=repo)
    assert run(*git, "log", "--format=%s", cwd=repo).split() == ["second", "first"]
    # the share's directory holds a valid repository
    assert run(*git, "log", "--format=%s", cwd=directory / "repo").split() == [
        "second", "first"]


def test_sqlite(share: tuple[Path, Path]) -> None:
    need_tool("sqlite3")
    directory, mnt = share
    db = mnt / "db.sqlite"
    run("sqlite3", db, "create table t(x integer); "
        + " ".join(f"insert into t values({i});" for i in range(200)))
    assert run("sqlite3", db, "select sum(x) from t;").strip() == str(sum(range(200)))
    assert run("sqlite3", directory / "db.sqlite", "pragma integrity_check;").strip() == "ok"


def test_errors_are_the_servers(share: tuple[Path, Path]) -> None:
    _, mnt = share
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_text("x")
    with pytest.raises(OSError) as info:
        os.rmdir(mnt / "d")
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(mnt / "d")
    with pytest.raises(NotADirectoryError):
        os.listdir(mnt / "d" / "f")
    # statfs answers
    assert os.statvfs(mnt).f_bsize > 0


def test_setattr_and_handles(share: tuple[Path, Path]) -> None:
    directory, mnt = share
    path = mnt / "f"
    with open(path, "w+b") as f:
        f.write(b"0123456789")
        f.flush()
        os.ftruncate(f.fileno(), 4)
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == b"0123"
        assert os.fstat(f.fileno()).st_size == 4
    os.chmod(path, 0o600)
    assert os.stat(directory / "f").st_mode & 0o777 == 0o600
    os.utime(path, ns=(-1_000_000_000, 2_000_000_000_000_000_001))
    st = os.stat(directory / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (-1_000_000_000, 2_000_000_000_000_000_001)
    # UTIME_OMIT: touch -m leaves the access time
    run("touch", "-m", "-d", "@1234567890", path)
    st = os.stat(directory / "f")
    assert st.st_atime_ns == -1_000_000_000
    assert st.st_mtime == 1234567890
    os.link(path, mnt / "hard")
    assert os.stat(mnt / "hard").st_ino == os.stat(path).st_ino
    assert os.stat(directory / "hard").st_nlink == 2
    # renameat2: RENAME_NOREPLACE never replaces, RENAME_EXCHANGE is refused
    (mnt / "other").write_text("keep")
    libc = ctypes.CDLL(None, use_errno=True)
    for flag, err in ((1, errno.EEXIST), (2, errno.EINVAL)):
        rc = libc.renameat2(-100, bytes(path), -100, bytes(mnt / "other"), flag)
        assert (rc, ctypes.get_errno()) == (-1, err)
        assert (directory / "other").read_text() == "keep"
        assert (directory / "f").exists()


def test_concurrent_readers(share: tuple[Path, Path], tmp_path: Path) -> None:
    """Requests are served concurrently: four readers at once all get their data."""
    directory, mnt = share
    for i in range(4):
        (directory / f"big{i}").write_bytes(bytes([i]) * 2_000_000)
    procs = [
        subprocess.Popen(["cmp", str(directory / f"big{i}"), str(mnt / f"big{i}")])
        for i in range(4)
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(mounter: object, tmp_path: Path, sig: int) -> None:
    directory = tmp_path / "share"
    directory.mkdir()
    m = mounter("--simulate", str(directory))  # type: ignore[operator]
    (m.path / "f").write_text("x")
    m.process.send_signal(sig)
    assert m.process.wait(20) == 0
    assert not is_mounted(m.path)
    assert (directory / "f").read_text() == "x"


def test_fusermount_unmounts(mounter: object, tmp_path: Path) -> None:
    directory = tmp_path / "share"
    directory.mkdir()
    m = mounter("--simulate", str(directory))  # type: ignore[operator]
    assert m.unmount() == 0
    assert not is_mounted(m.path)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_background_mount_like_sshfs(tmp_path: Path) -> None:
    """Without -f the command returns once mounted; umount() ends the daemon."""
    need_fuse()
    from pyxen9p.mount import umount

    directory = tmp_path / "share"
    directory.mkdir()
    (directory / "hello").write_text("hi")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pidfile = tmp_path / "pid"
    try:
        done = subprocess.run(
            serve_command(mnt, "--simulate", str(directory), "--pidfile", str(pidfile),
                          foreground=False),
            env=env(), capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        # mounted when the command returns
        assert is_mounted(mnt)
        assert (mnt / "hello").read_text() == "hi"
        pid = int(pidfile.read_text())
        assert pid != os.getpid() and _alive(pid)
        umount(mnt)
        assert not is_mounted(mnt)
        wait_for(lambda: not _alive(pid), 20, "the daemon to exit")
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_background_mount_reports_failure(tmp_path: Path) -> None:
    """A connection that fails in the daemon: the command says why and exits non-zero."""
    need_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    start = time.monotonic()
    done = subprocess.run(
        serve_command(mnt, "--unix", str(tmp_path / "no-such-socket"), foreground=False),
        env=env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode != 0
    assert "no-such-socket" in done.stderr or "No such file" in done.stderr
    assert not is_mounted(mnt)
    assert time.monotonic() - start < 30


def test_umount_of_nothing_is_an_error(tmp_path: Path) -> None:
    need_fuse()
    from pyxen9p.mount import MountError, umount

    with pytest.raises(MountError):
        umount(tmp_path)


def test_a_hard_link_shows_in_the_link_count_at_once(share: tuple[Path, Path]) -> None:
    """Found by the differential test: with FUSE's one-second attribute
    cache, the first name of a file still showed one link after ``ln``."""
    _directory, mnt = share
    (mnt / "b").write_bytes(b"")
    assert (mnt / "b").stat().st_nlink == 1
    os.link(mnt / "b", mnt / "a")
    assert (mnt / "b").stat().st_nlink == 2
    assert (mnt / "a").stat().st_nlink == 2
    (mnt / "a").unlink()
    assert (mnt / "b").stat().st_nlink == 1
