"""``pyxen9p mount`` and ``pyxen9p umount`` as real programs (issue 10 §2)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import env, force_unmount, is_mounted, need_fuse, wait_for


def pyxen9p(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``pyxen9p`` command."""
    return subprocess.run(
        [sys.executable, "-m", "pyxen9p", *map(str, args)], env=env(), capture_output=True,
        text=True, timeout=timeout, check=False,
    )


@pytest.fixture
def dirs(tmp_path: Path) -> object:
    """``(share, mountpoint)``, the mount point unmounted at the end whatever happens."""
    need_fuse()
    share, mnt = tmp_path / "share", tmp_path / "mnt"
    share.mkdir()
    mnt.mkdir()
    (share / "hello").write_text("hi\n")
    yield share, mnt
    force_unmount(mnt)


def test_mount_daemonizes_and_umount_unmounts(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    done = pyxen9p("--simulate", share, "mount", mnt)
    assert done.returncode == 0, done.stderr
    # mounted when the command returns, served by a process in the background
    assert is_mounted(mnt)
    assert (mnt / "hello").read_text() == "hi\n"
    (mnt / "new").write_text("x")
    assert (share / "new").read_text() == "x"
    with open("/proc/self/mounts") as mounts:
        line = next(m for m in mounts if m.split()[1] == str(mnt))
    assert line.split()[0] == f"pyxen9p:{share}"
    assert line.split()[2] == "fuse.pyxen9p"
    done = pyxen9p("umount", mnt)
    assert done.returncode == 0, done.stderr
    assert not is_mounted(mnt)


def test_mount_read_only(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    assert pyxen9p("--simulate", share, "mount", mnt, "-o", "ro").returncode == 0
    assert (mnt / "hello").read_text() == "hi\n"
    with pytest.raises(OSError) as info:
        (mnt / "new").write_text("x")
    assert info.value.errno == 30  # EROFS
    assert pyxen9p("umount", mnt).returncode == 0


def test_mount_failures_are_reported(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    share, mnt = dirs
    done = pyxen9p("--simulate", tmp_path / "missing", "mount", mnt)
    assert done.returncode == 1
    assert "cannot connect" in done.stderr
    assert not is_mounted(mnt)
    done = pyxen9p("--simulate", share, "mount", tmp_path / "nodir")
    assert done.returncode == 1
    assert "not a directory" in done.stderr
    done = pyxen9p("--simulate", share, "mount", mnt, "-o", "no_such_option")
    assert done.returncode == 1
    assert "mount failed" in done.stderr
    assert not is_mounted(mnt)
    done = pyxen9p("umount", mnt)
    assert done.returncode == 1
    assert "pyxen9p: umount:" in done.stderr


def test_mount_in_the_foreground_ends_on_ctrl_c(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    process = subprocess.Popen(
        [sys.executable, "-m", "pyxen9p", "--simulate", str(share), "mount", "-f", str(mnt)],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: is_mounted(mnt), 30, "the mount")
        assert (mnt / "hello").read_text() == "hi\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        assert not is_mounted(mnt)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_mount_through_the_agent(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """``pyxen9p --server unix:SOCKET mount``: the mount is one more client of the agent."""
    share, mnt = dirs
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        [sys.executable, "-m", "pyxen9p", "--simulate", str(share), "serve",
         "--listen", f"unix:{sock}"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(sock.exists, 30, "the agent's socket")
        done = pyxen9p("--server", f"unix:{sock}", "mount", mnt)
        assert done.returncode == 0, done.stderr
        assert (mnt / "hello").read_text() == "hi\n"
        (mnt / "via-agent").write_text("y")
        assert (share / "via-agent").read_text() == "y"
        # another client of the same agent sees it at once
        assert pyxen9p("--server", f"unix:{sock}", "cat", "via-agent").stdout == "y"
        assert pyxen9p("umount", mnt).returncode == 0
    finally:
        force_unmount(mnt)
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
