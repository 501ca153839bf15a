"""Fixtures of the FUSE mount tests: mounts served by a real process, always unmounted.

Every mount is served by ``python -m fusemount.serve`` (a real program
around :func:`pyxen9p.mount.mount`) and unmounted at the test's end, even on
failure: ``fusermount3 -u``, then ``-u -z`` if it is busy, then the process is
killed if it does not end.  Without FUSE (``/dev/fuse``, ``fusermount3``,
mfusepy) the tests skip, or fail under ``PYXEN9P_REQUIRE_PEERS``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need, need_tool

ROOT = Path(__file__).resolve().parents[2]


def need_fuse() -> None:
    """Skip (or fail) unless a FUSE file system can be mounted here."""
    need_tool("fusermount3")
    need(os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse")
    try:
        import mfusepy  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError):
        need(False, "mfusepy (pip install 'pyxen9p[mount]') and libfuse 3")


def env() -> dict[str, str]:
    """The environment of a mount process: this tree's pyxen9p and tests importable."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH")])
    )
    return e


def is_mounted(path: Path) -> bool:
    """Whether *path* is a mount point (``/proc/self/mounts``; never touches the mount)."""
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def wait_for(condition: object, seconds: float, what: str) -> None:
    """Wait until ``condition()`` is true, or fail naming *what*."""
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def force_unmount(path: Path) -> None:
    """Unmount *path* whatever its state (``-u``, then lazily)."""
    if not is_mounted(path):
        return
    done = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, check=False)
    if done.returncode != 0 and is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


class Mount:
    """A mount served in the foreground by a child process.

    :ivar path: the mount point
    :ivar process: the serving process
    """

    def __init__(self, path: Path, process: subprocess.Popen[str]) -> None:
        self.path = path
        self.process = process

    def unmount(self) -> int:
        """Unmount with ``fusermount3 -u``; the serving process's exit status."""
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True, capture_output=True)
        return self.process.wait(20)

    def close(self) -> None:
        """Unmount whatever happens and reap the process."""
        force_unmount(self.path)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        force_unmount(self.path)


def serve_command(mountpoint: Path, *args: str, foreground: bool = True) -> list[str]:
    """The command line of a mount process."""
    return [sys.executable, "-m", "fusemount.serve", *(["-f"] if foreground else []),
            *args, str(mountpoint)]


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[object]:
    """``mounter(*serve_args) -> Mount``: mounts unmounted at the end, even on failure."""
    need_fuse()
    mounts: list[Mount] = []

    def start(*args: str, mountpoint: Path | None = None) -> Mount:
        path = mountpoint or tmp_path / f"mnt{len(mounts)}"
        path.mkdir(exist_ok=True)
        process = subprocess.Popen(
            serve_command(path, *args), env=env(), cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        m = Mount(path, process)
        mounts.append(m)
        deadline = time.monotonic() + 30
        while not is_mounted(path):
            if process.poll() is not None:
                pytest.fail(f"the mount process ended: {process.communicate()[1]}")
            if time.monotonic() > deadline:
                pytest.fail("timed out waiting for the mount")
            time.sleep(0.05)
        return m

    yield start
    for m in mounts:
        with contextlib.suppress(Exception):
            if m.process.poll() is None:
                m.process.send_signal(signal.SIGCONT)
        m.close()
    for m in mounts:
        assert not is_mounted(m.path)
