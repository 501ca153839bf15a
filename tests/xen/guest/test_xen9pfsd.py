"""Group "xen9pfsd": pyxen9p against Xen's own 9pfs backend, ``xen-9pfsd`` (Debian 13).

xen-9pfsd (Xen 4.19 and later; Debian 13 ships Xen 4.20) publishes its
devices under ``backend/xen_9pfs/<domid>/<devid>``, speaks 9P2000.u only, has
a small fid limit (``max-open-files``, default 5, counting every fid) and
takes a new connection from Closing or Closed without going back to InitWait.
It ignores the backend's ``frontend`` node, so a dom0 frontend is a node under
dom0's own ``device/9pfs/`` with the kernel's 9pnet_xen blacklisted.

These tests drive such a dom0 device with pyxen9p's frontend, client, files
API and command line, the agent (``pyxen9p serve``, 9P2000.u to its clients)
with the command line, a second client and a FUSE mount through it, and the
teardown and fault cases that apply to this backend: every grant released, a
reconnect without ``allow_reconnect``, the daemon killed under a session.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xenlab
from xenlab import XenbusState

import pyxen9p
from pyxen9p import agent
from pyxen9p.frontend import Frontend

RELEASES = ("trixie",)
pytestmark = pytest.mark.realxen

SRC = Path(os.environ.get("PYXEN9P_SRC", Path(__file__).resolve().parents[3]))


@pytest.fixture(scope="module", autouse=True)
def _xen_9pfsd() -> Iterator[None]:
    """9pnet_xen kept away from dom0's ``device/9pfs`` nodes, and xen-9pfsd running."""
    xenlab.blacklist_9pnet_xen()
    xenlab.ensure_xen_9pfsd()
    yield


@pytest.fixture
def dev(share_dir: Path) -> Iterator[xenlab.Dom0NinePDevice]:
    """A dom0 device served by xen-9pfsd, in InitWait, with its default fid limit."""
    os.chmod(share_dir, 0o777)
    with xenlab.xen_9pfsd_device(share_dir, tag="pyxen9p") as device:
        yield device


def connect(dev: xenlab.Dom0NinePDevice, **options: object) -> pyxen9p.Client:
    """A pyxen9p client of *dev* (never through an agent)."""
    return pyxen9p.connect(devid=dev.devid, agent="never", timeout=30.0, **options)  # type: ignore[arg-type]


def test_xen_9pfsd_publishes_its_features(dev: xenlab.Dom0NinePDevice) -> None:
    assert dev.backend.startswith("/local/domain/0/backend/xen_9pfs/0/")
    assert dev.backend_state() == XenbusState.INIT_WAIT
    assert dev.backend_features() == {
        "versions": "1",
        "max-rings": "4",
        "max-ring-page-order": "9",
    }
    assert xenlab.daemon_pids("xen-9pfsd")


def test_frontend_knows_the_backend_type_and_connects(dev: xenlab.Dom0NinePDevice) -> None:
    with Frontend.connect(devid=dev.devid) as front:
        assert front.backend_path == dev.backend
        assert front.backend_type.name == "xen_9pfs"
        assert front.backend_type.server == "xen-9pfsd"
        assert front.backend_type.reconnects
        assert front.backend_max_rings == 4
        assert 1 <= front.num_rings <= 4
        assert dev.backend_state() == XenbusState.CONNECTED
    assert dev.wait_backend_state((XenbusState.CLOSED,), 10) == XenbusState.CLOSED
    assert dev.frontend_state() == XenbusState.CLOSED


def test_files_api_over_9p2000u(dev: xenlab.Dom0NinePDevice, share_dir: Path) -> None:
    (share_dir / "from-dom0.txt").write_text("written by dom0\n")
    with connect(dev) as client:
        assert client.version == "9P2000.u"
        assert client.read_text("from-dom0.txt") == "written by dom0\n"
        client.mkdir("d")
        client.makedirs("d/e/f")
        client.write_bytes("d/e/f/deep.bin", bytes(range(256)) * 64)
        assert client.read_bytes("d/e/f/deep.bin") == bytes(range(256)) * 64
        assert (share_dir / "d/e/f/deep.bin").read_bytes() == bytes(range(256)) * 64
        with client.open("d/log.txt", "w") as out:
            out.write("one\n")
            out.write("two\n")
        with client.open("d/log.txt", "a") as out:
            out.write("three\n")
        assert client.read_text("d/log.txt") == "one\ntwo\nthree\n"
        assert sorted(client.listdir("d")) == ["e", "log.txt"]
        assert client.is_dir("d/e") and client.is_file("d/log.txt")
        assert client.stat("d/log.txt").st_size == len("one\ntwo\nthree\n")
        assert "from-dom0.txt" in client.listdir("")
        # more files, one after another, than xen-9pfsd's default fid limit (5)
        for i in range(25):
            client.write_text(f"d/many-{i}.txt", f"file {i}\n")
        for i in range(25):
            assert client.read_text(f"d/many-{i}.txt") == f"file {i}\n"
        assert len([n for n in client.listdir("d") if n.startswith("many-")]) == 25
        for i in range(25):
            client.remove(f"d/many-{i}.txt")
        assert sorted(os.listdir(share_dir / "d")) == ["e", "log.txt"]
        assert client.fid_count <= 2
        # removal through Topen(ORCLOSE) + Tclunk; xen-9pfsd opens a directory
        # with OREAD only, so it removes no directory: said clearly
        client.remove("d/e/f/deep.bin")
        assert not (share_dir / "d/e/f/deep.bin").exists()
        with pytest.raises(OSError) as info:
            client.rmdir("d/e/f")
        assert info.value.errno == errno.EOPNOTSUPP
        assert "cannot remove directories" in str(info.value)
        assert (share_dir / "d/e/f").is_dir()
        # no Twstat in xen-9pfsd: no rename, said clearly, nothing changed
        with pytest.raises(OSError) as info:
            client.rename("d/log.txt", "d/renamed.txt")
        assert info.value.errno == errno.EOPNOTSUPP
        assert (share_dir / "d/log.txt").is_file()
        assert not (share_dir / "d/renamed.txt").exists()
        client.remove("d/log.txt")
        assert sorted(os.listdir(share_dir / "d")) == ["e"]
        assert client.usable
    assert xenlab.daemon_pids("xen-9pfsd")


def test_fid_limit_counts_every_fid(dev: xenlab.Dom0NinePDevice, share_dir: Path) -> None:
    for i in range(6):
        (share_dir / f"f{i}").write_text(str(i))
    with connect(dev) as client:
        held = []
        with pytest.raises(OSError) as info:
            for i in range(6):
                held.append(client.open(f"f{i}", "rb"))
        # the attach fid counts: at most 4 files open at once with the default 5
        assert info.value.errno == errno.EMFILE
        assert len(held) <= 4
        for handle in held:
            handle.close()
        # the session goes on once the fids are given back
        assert client.read_text("f5") == "5"


def run_cli(dev: xenlab.Dom0NinePDevice, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python3 -m pyxen9p --devid N --direct ARGV`` in dom0."""
    return subprocess.run(
        [sys.executable, "-m", "pyxen9p", "--devid", str(dev.devid), "--direct", "-q", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(420)  # a Python start takes several seconds under TCG
def test_cli_over_xen_9pfsd(dev: xenlab.Dom0NinePDevice, share_dir: Path, tmp_path: Path) -> None:
    (share_dir / "a.txt").write_text("alpha\n")
    done = run_cli(dev, "ls")
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.split() == ["a.txt"]
    assert run_cli(dev, "cat", "a.txt").stdout == "alpha\n"
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(8):  # more files, one after another, than the fid limit
        (tree / f"n{i}").write_text(f"from the CLI {i}\n")
    done = run_cli(dev, "put", "-r", str(tree), "sub")
    assert done.returncode == 0, done
    assert sorted(os.listdir(share_dir / "sub")) == [f"n{i}" for i in range(8)]
    assert (share_dir / "sub/n5").read_text() == "from the CLI 5\n"
    done = run_cli(dev, "ls", "-l", "sub")
    assert done.returncode == 0, done
    assert len(done.stdout.splitlines()) >= 8
    done = run_cli(dev, "get", "sub/n3", str(tmp_path / "back.txt"))
    assert done.returncode == 0, done
    assert (tmp_path / "back.txt").read_text() == "from the CLI 3\n"
    done = run_cli(dev, "rm", *(f"sub/n{i}" for i in range(8)))
    assert (done.returncode, done.stderr) == (0, ""), done
    assert os.listdir(share_dir / "sub") == []
    assert run_cli(dev, "mkdir", "empty").returncode == 0
    assert (share_dir / "empty").is_dir()
    done = run_cli(dev, "rmdir", "empty", "sub")  # xen-9pfsd removes no directory
    assert done.returncode == 1 and "cannot remove directories" in done.stderr, done
    done = run_cli(dev, "mv", "a.txt", "b.txt")
    assert done.returncode == 1
    assert "Twstat" in done.stderr or "not supported" in done.stderr.lower(), done.stderr
    assert sorted(os.listdir(share_dir)) == ["a.txt", "empty", "sub"]
    # the daemon is still there after every session of the commands above
    assert xenlab.daemon_pids("xen-9pfsd")


def test_reconnects_without_allow_reconnect(dev: xenlab.Dom0NinePDevice, share_dir: Path) -> None:
    for round_ in range(3):
        with connect(dev) as client:
            client.write_text(f"round-{round_}", str(round_))
            assert sorted(client.listdir("")) == [f"round-{i}" for i in range(round_ + 1)]
        # xen-9pfsd stays Closed: it takes the next connection from there
        assert dev.wait_backend_state((XenbusState.CLOSED,), 10) == XenbusState.CLOSED
    assert xenlab.daemon_pids("xen-9pfsd")


def test_teardown_releases_every_grant_and_port(dev: xenlab.Dom0NinePDevice) -> None:
    daemon = xenlab.daemon_pids("xen-9pfsd")[0]
    before_fds = xenlab.open_xen_fds()
    mapped_before = xenlab.gntdev_mapped_pages(daemon)
    with connect(dev) as client:
        client.write_text("x", "x")
        assert xenlab.gntdev_mapped_pages(daemon) > mapped_before
    xenlab.wait_until(
        lambda: xenlab.gntdev_mapped_pages(daemon) == mapped_before,
        15,
        "xen-9pfsd to unmap the rings",
    )
    assert xenlab.open_xen_fds() == before_fds
    assert dev.frontend_state() == XenbusState.CLOSED


@pytest.mark.slow
def test_daemon_killed_under_a_session(dev: xenlab.Dom0NinePDevice) -> None:
    """xen-9pfsd SIGKILLed: the session ends on its request timeout (no Tflush is
    relied on), close() is bounded, and a restarted daemon serves the device again."""
    client = connect(dev, request_timeout=5.0)
    try:
        client.write_text("before", "1")
        for pid in xenlab.daemon_pids("xen-9pfsd"):
            os.kill(pid, signal.SIGKILL)
        xenlab.wait_until(lambda: not xenlab.daemon_pids("xen-9pfsd"), 10, "xen-9pfsd to die")
        started = time.monotonic()
        with pytest.raises(OSError):
            client.read_text("before")
        assert time.monotonic() - started < 30
    finally:
        started = time.monotonic()
        client.close()
        assert time.monotonic() - started < 60
        xenlab.ensure_xen_9pfsd()  # clears the node the killed one left
    dev.wait_backend_state((XenbusState.INIT_WAIT, XenbusState.CLOSED), 30)
    with connect(dev) as again:
        assert again.read_text("before") == "1"


def run_via_agent(dev: xenlab.Dom0NinePDevice, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python3 -m pyxen9p --devid N --via-agent ARGV`` in dom0 (through the running agent)."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop(agent.RUNTIME_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "pyxen9p", "--devid", str(dev.devid), "--via-agent", "-q", *argv],
        capture_output=True, text=True, timeout=120, check=False, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.timeout(900)  # several Python starts under TCG
def test_agent_on_xen_9pfsd(
    dev: xenlab.Dom0NinePDevice, share_dir: Path, tmp_path: Path
) -> None:
    """``pyxen9p serve`` on the xen-9pfsd device: it speaks 9P2000.u to its clients;
    the command line and a second client work through it, the fid limit they share
    is said clearly, the root's attributes are answered by the agent (xen-9pfsd is
    never asked), a FUSE mount through it lists, reads and writes; SIGTERM ends it
    and every grant and event channel is released."""
    (share_dir / "a.txt").write_text("alpha\n")
    daemon = xenlab.daemon_pids("xen-9pfsd")[0]
    mapped_before = xenlab.gntdev_mapped_pages(daemon)
    fds_before = xenlab.open_xen_fds()
    sock = agent.socket_path(agent.agent_name(devid=dev.devid))
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop(agent.RUNTIME_ENV, None)
    env.pop("NOTIFY_SOCKET", None)
    log = tmp_path / "agent.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyxen9p", "--devid", str(dev.devid), "serve"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
    try:
        xenlab.wait_until(
            lambda: os.path.exists(sock) or proc.poll() is not None, 120, "the agent's socket"
        )
        assert proc.poll() is None, log.read_text()
        assert "9P2000.u" in log.read_text()
        assert dev.backend_state() == XenbusState.CONNECTED
        # the command line through the agent
        done = run_via_agent(dev, "ls")  # ls starts with the root's attributes
        assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["a.txt"], ""), done
        assert run_via_agent(dev, "cat", "a.txt").stdout == "alpha\n"
        tree = tmp_path / "tree"
        tree.mkdir()
        for i in range(7):  # more files, one after another, than the fid limit
            (tree / f"n{i}").write_text(f"via the agent {i}\n")
        done = run_via_agent(dev, "put", "-r", str(tree), "sub")
        assert done.returncode == 0, done
        assert sorted(os.listdir(share_dir / "sub")) == [f"n{i}" for i in range(7)]
        done = run_via_agent(dev, "ls", "-l", "sub")
        assert done.returncode == 0 and len(done.stdout.splitlines()) >= 7, done
        done = run_via_agent(dev, "rm", *(f"sub/n{i}" for i in range(7)))
        assert (done.returncode, done.stderr) == (0, ""), done
        assert os.listdir(share_dir / "sub") == []
        done = run_via_agent(dev, "stat", "/")
        assert done.returncode == 1 and "root usefully" in done.stderr, done
        done = run_via_agent(dev, "rmdir", "sub")
        assert done.returncode == 1 and "cannot remove directories" in done.stderr, done
        # a second client at the same time, in this process
        with pyxen9p.connect(devid=dev.devid, agent="require", timeout=60.0) as client:
            assert client.version == "9P2000.u"
            client.write_text("sub/second.txt", "second client\n")
            assert (share_dir / "sub/second.txt").read_text() == "second client\n"
            assert run_via_agent(dev, "cat", "sub/second.txt").stdout == "second client\n"
            # the fid limit (5) is shared: 2 attach fids + 3 open files, then one more
            held = [client.open("a.txt", "rb") for _ in range(3)]
            try:
                done = run_via_agent(dev, "cat", "a.txt")
                assert done.returncode == 1 and "fid limit" in done.stderr, done
            finally:
                for handle in held:
                    handle.close()
            assert run_via_agent(dev, "cat", "a.txt").stdout == "alpha\n"
            client.remove("sub/second.txt")
            assert client.usable
        # a FUSE mount through the agent
        xenlab.ensure_modules("fuse")
        mnt = tmp_path / "fuse"
        mnt.mkdir()
        done = run_via_agent(dev, "mount", str(mnt))
        assert done.returncode == 0, done
        try:
            assert os.path.isdir(mnt) and sorted(os.listdir(mnt)) == ["a.txt", "sub"]
            assert (mnt / "a.txt").read_text() == "alpha\n"
            (mnt / "sub" / "fuse.txt").write_text("written through FUSE\n")
            assert (share_dir / "sub/fuse.txt").read_text() == "written through FUSE\n"
            with open(mnt / "a.txt", "w") as out:  # O_TRUNC: Topen with OTRUNC
                out.write("beta\n")
            assert (share_dir / "a.txt").read_text() == "beta\n"
            os.remove(mnt / "sub" / "fuse.txt")
            assert not (share_dir / "sub/fuse.txt").exists()
            with pytest.raises(PermissionError):  # xen-9pfsd removes no directory
                os.rmdir(mnt / "sub")
        finally:
            umount = run_via_agent(dev, "umount", str(mnt))
            if umount.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, timeout=60)
        assert umount.returncode == 0, umount
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(sock)
    assert dev.wait_backend_state((XenbusState.CLOSED,), 15) == XenbusState.CLOSED
    xenlab.wait_until(
        lambda: xenlab.gntdev_mapped_pages(daemon) == mapped_before,
        15,
        "xen-9pfsd to unmap the agent's rings",
    )
    assert xenlab.open_xen_fds() == fds_before
    assert xenlab.daemon_pids("xen-9pfsd") == [daemon]
