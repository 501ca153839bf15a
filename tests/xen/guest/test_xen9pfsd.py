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
teardown and fault cases that apply to this backend: connect/close cycles on
the same and on new devices leaving nothing held, reconnects without
``allow_reconnect``, two devices of one daemon open at once, the ring layouts
pyxen9p chooses within xen-9pfsd's offer, and the daemon killed in the middle
of large transfers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xenlab
from teardown_helpers import assert_grants_free, baseline, report, snapshot, transfers_until_killed
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
    options.setdefault("timeout", 30.0)
    return pyxen9p.connect(devid=dev.devid, agent="never", **options)  # type: ignore[arg-type]


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


def test_connect_close_cycles_leave_nothing(share_dir: Path) -> None:
    """Connect/close cycles, on the same device (xen-9pfsd takes each new
    connection from Closed, no ``allow_reconnect`` needed) and on fresh
    devices: after each, both ends Closed, the daemon unchanged with its
    rings unmapped and its event channels unbound, and nothing held by
    pyxen9p; afterwards gntalloc's grants are all free again."""
    os.chmod(share_dir, 0o777)
    daemon = xenlab.ensure_xen_9pfsd()
    before = baseline()
    daemon_before = (xenlab.gntdev_mapped_pages(daemon), xenlab.evtchn_irqs("xen-9pfsd"))
    same = xenlab.create_xen_9pfsd_device(share_dir, tag="same")
    devices = [same, same, same]
    try:
        for cycle in range(5):
            dev = devices[cycle] if cycle < 3 else xenlab.create_xen_9pfsd_device(share_dir)
            if cycle >= 3:
                devices.append(dev)
            started = time.monotonic()
            with connect(dev) as client:
                connect_s = time.monotonic() - started
                assert dev.frontend_state() == dev.backend_state() == XenbusState.CONNECTED
                rings = client.transport.num_rings  # type: ignore[attr-defined]
                assert snapshot()["evtchn_irqs"] == before["evtchn_irqs"] + rings  # type: ignore[operator]
                assert xenlab.evtchn_irqs("xen-9pfsd") == daemon_before[1] + rings
                assert xenlab.gntdev_mapped_pages(daemon) > daemon_before[0]
                data = os.urandom(300_000 + cycle)
                client.write_bytes(f"c{cycle}.bin", data)
                assert (share_dir / f"c{cycle}.bin").read_bytes() == data
                assert client.read_bytes(f"c{cycle}.bin") == data
                assert sorted(client.listdir("")) == [f"c{i}.bin" for i in range(cycle + 1)]
                started = time.monotonic()
            close_s = time.monotonic() - started
            report(
                f"xen-9pfsd cycle {cycle} ({'same' if cycle < 3 else 'new'} device {dev.devid}):"
                f" connect {connect_s:.2f}s close {close_s:.2f}s",
                "xen9pfsd.txt",
            )
            assert dev.frontend_state() == XenbusState.CLOSED
            # xen-9pfsd stays Closed: it takes the next connection from there
            assert dev.wait_backend_state((XenbusState.CLOSED,), 10) == XenbusState.CLOSED
            assert snapshot() == before, f"cycle {cycle}"
            xenlab.wait_until(
                lambda: (xenlab.gntdev_mapped_pages(daemon), xenlab.evtchn_irqs("xen-9pfsd"))
                == daemon_before,
                15,
                "xen-9pfsd to unmap the rings and unbind its ports",
            )
            assert xenlab.daemon_pids("xen-9pfsd") == [daemon]
    finally:
        for dev in devices[2:]:
            dev.remove()
    assert_grants_free()


def test_two_devices_open_at_once(share_dir: Path) -> None:
    """One xen-9pfsd serves every device (a thread per ring): two dom0 devices
    on the same export, connected together, each within half of gntalloc's
    grants, see each other's files; both close cleanly and the same daemon
    serves a new connection on the first afterwards."""
    os.chmod(share_dir, 0o777)
    daemon = xenlab.ensure_xen_9pfsd()
    before = baseline()
    with (
        xenlab.xen_9pfsd_device(share_dir, tag="first") as one,
        xenlab.xen_9pfsd_device(share_dir, tag="second") as two,
    ):
        with connect(one, grant_limit=512) as a, connect(two, grant_limit=512) as b:
            assert [one.backend_state(), two.backend_state()] == [XenbusState.CONNECTED] * 2
            data = os.urandom(500_000)
            a.write_bytes("from-a.bin", data)
            assert b.read_bytes("from-a.bin") == data
            b.write_text("from-b.txt", "b\n")
            assert a.read_text("from-b.txt") == "b\n"
            assert xenlab.daemon_pids("xen-9pfsd") == [daemon]
            assert xenlab.evtchn_irqs("xen-9pfsd") >= a.transport.num_rings + (  # type: ignore[attr-defined]
                b.transport.num_rings  # type: ignore[attr-defined]
            )
        for dev in (one, two):
            assert dev.wait_backend_state((XenbusState.CLOSED,), 10) == XenbusState.CLOSED
        assert snapshot() == before
        with connect(one) as again:
            assert sorted(again.listdir("")) == ["from-a.bin", "from-b.txt"]
    assert snapshot() == before
    assert xenlab.daemon_pids("xen-9pfsd") == [daemon]


#: gntalloc's limit while the largest layout is tried (4 rings of 513 grants).
BIG_GRANT_LIMIT = 2200


@pytest.mark.parametrize(
    ("rings", "order", "chosen"),
    [(1, 2, (1, 2)), (3, 5, (3, 5)), (4, None, (4, 7)), (4, 9, (4, 9))],
)
def test_ring_layouts(
    dev: xenlab.Dom0NinePDevice, rings: int, order: int | None, chosen: tuple[int, int]
) -> None:
    """The layouts pyxen9p uses within xen-9pfsd's offer (max-rings 4,
    max-ring-page-order 9): the smallest it accepts (1 ring of order 2: order
    0 is outside the spec and order 1 gives an msize under 4 KiB, refused
    before the rings are published), a middle one, 4 rings of the largest order
    that fits gntalloc's default 1024 grants (7), and 4 rings of order 9
    (2052 grants: with gntalloc's limit raised)."""
    export = Path(dev.path)
    if rings == 1:
        for bad in (0, 1):
            with pytest.raises((OSError, ValueError), match=r"ring order|msize"):
                connect(dev, rings=1, ring_order=bad)
        assert xenlab.xs_read(f"{dev.frontend}/num-rings") is None  # nothing published
    daemon = xenlab.ensure_xen_9pfsd()
    before = baseline()
    options: dict[str, object] = {"rings": rings, "ring_order": order}
    with contextlib.ExitStack() as stack:
        if order == 9:
            stack.enter_context(xenlab.gntalloc_limit(BIG_GRANT_LIMIT))
            options["grant_limit"] = None
        data = os.urandom(1024 * 1024 + 333)
        with connect(dev, **options) as fs:
            fe = fs.transport
            assert (fe.num_rings, fe.ring_order) == chosen  # type: ignore[attr-defined]
            assert fe.msize == (4096 << chosen[1]) // 4  # type: ignore[attr-defined]
            assert xenlab.xs_read(f"{dev.frontend}/num-rings") == str(chosen[0])
            assert xenlab.gntdev_mapped_pages(daemon) >= chosen[0] * (1 + (1 << chosen[1]))
            assert fs.version == "9P2000.u" and 4096 <= fs.msize <= fe.msize  # type: ignore[attr-defined]
            fs.write_bytes("big.bin", data)
            assert hashlib.sha256((export / "big.bin").read_bytes()).digest() == (
                hashlib.sha256(data).digest()
            )
            assert fs.read_bytes("big.bin") == data
            fs.mkdir("d")
            fs.write_bytes("d/small", b"s")
            assert fs.listdir("d") == ["small"]
            fs.remove("d/small")
            assert not (export / "d" / "small").exists()
            report(
                f"xen-9pfsd layout {chosen}: transport msize {fe.msize}"  # type: ignore[attr-defined]
                f" 9P msize {fs.msize}",
                "xen9pfsd.txt",
            )
        assert dev.frontend_state() == XenbusState.CLOSED
        assert dev.wait_backend_state((XenbusState.CLOSED,), 10) == XenbusState.CLOSED
    assert snapshot() == before
    assert_grants_free()


@pytest.mark.slow
def test_daemon_killed_mid_transfer(share_dir: Path) -> None:
    """xen-9pfsd SIGKILLed while one thread writes and one reads large files.

    xen-9pfsd has no Tflush: a request not answered within the request
    timeout ends the session (the other caller fails at once with it), so
    each caller gets an OSError within a request timeout, never a hang;
    ``close()`` returns after one bounded wait for the dead backend; nothing
    stays held; and a freshly started xen-9pfsd serves the device again, and
    a new device.
    """
    os.chmod(share_dir, 0o777)
    payload = os.urandom(8 << 20)
    (share_dir / "big.bin").write_bytes(payload)
    request_timeout, fe_timeout, slack = 5.0, 10.0, 20.0  # slack: TCG on a busy machine
    xenlab.ensure_xen_9pfsd()
    before = baseline()
    # two transfers at once need more fids than xen-9pfsd's default 5
    dev = xenlab.create_xen_9pfsd_device(share_dir, extra={"max-open-files": 16})
    try:
        client = connect(dev, timeout=fe_timeout, request_timeout=request_timeout)

        def kill() -> None:
            assert dev.backend_state() == XenbusState.CONNECTED
            for pid in xenlab.daemon_pids("xen-9pfsd"):
                os.kill(pid, signal.SIGKILL)
            xenlab.wait_until(lambda: not xenlab.daemon_pids("xen-9pfsd"), 10, "xen-9pfsd to die")

        try:
            killed = transfers_until_killed(client, payload, kill, request_timeout + slack)
            killed.check(request_timeout + slack, "unresponsive", "xen-9pfsd", "xen9pfsd.txt")
            with pytest.raises(OSError, match="unresponsive"):
                client.stat("big.bin")
            assert dev.backend_state() == XenbusState.CONNECTED  # nobody wrote it since
        finally:
            started = time.monotonic()
            client.close()
            close_s = time.monotonic() - started
        report(
            f"xen-9pfsd killed: moved {killed.moved}; close() took {close_s:.1f}s",
            "xen9pfsd.txt",
        )
        assert close_s < fe_timeout + slack, "close() waited more than once for a dead backend"
        assert dev.frontend_state() == XenbusState.CLOSED
        assert snapshot() == before
        assert (share_dir / "big.bin").read_bytes() == payload
        xenlab.ensure_xen_9pfsd()  # clears the node the killed one left
        dev.wait_backend_state((XenbusState.INIT_WAIT, XenbusState.CLOSED), 30)
        with connect(dev) as again:
            assert again.read_bytes("big.bin") == payload
            again.write_text("after.txt", "alive\n")
    finally:
        dev.remove()
    with xenlab.xen_9pfsd_device(share_dir, tag="new") as fresh, connect(fresh) as new:
        assert new.read_text("after.txt") == "alive\n"
    assert snapshot() == before
    assert_grants_free()


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
