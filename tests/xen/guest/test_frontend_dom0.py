"""Group "frontend_dom0": pyxen9p in dom0 against dom0's real QEMU 9pfs backend.

The whole transport-agnostic client suite of ``tests/p9/client_suite.py``
runs on a QEMU-served device whose frontend directory is outside ``device/``
(so dom0's kernel never claims it): one :class:`~pyxen9p.frontend.Frontend`
connected by its XenStore path (what ``pyxen9p.connect(path=...)`` does),
a fresh 9P session and an emptied export for each test.  Every operation is
checked against the directory QEMU exports (large files by sha256 there).
Then: the values negotiated with QEMU, other ring layouts, and the command
line (``ls``, ``cat``, ``info``, ``demo``) on the real share, including ``demo``
finding the device as this domain's only ``device/9pfs`` entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import xenlab
from xenlab import XenbusState

import pyxen9p
from pyxen9p.frontend import Frontend
from pyxen9p.p9.client import Client

SRC = Path(os.environ.get("PYXEN9P_SRC", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(SRC / "tests" / "p9"))

from client_suite import *  # noqa: E402, F403

#: QEMU serves these devices: Debian 12 only (QEMU 10 serves none, see test_qemu10.py).
RELEASES = ("bookworm",)
pytestmark = pytest.mark.realxen

EXPORT_BASE = Path("/srv/share/frontend-dom0")
#: gntalloc allows 1024 grants: 2 rings of order 8 (2 x 257 grants) is the default.
DEFAULT_RINGS, DEFAULT_ORDER = 2, 8


def fresh_export(name: str) -> Path:
    """An empty directory under :data:`EXPORT_BASE` for QEMU to export."""
    EXPORT_BASE.mkdir(parents=True, exist_ok=True)
    path = EXPORT_BASE / f"{name}-{os.getpid()}-{len(list(EXPORT_BASE.iterdir()))}"
    path.mkdir()
    os.chmod(path, 0o755)
    return path


class ModuleLab:
    """The devices this module created, and what to undo at its end.

    QEMU 7.2 cannot remove a device once a frontend connected to it (see
    :func:`xenlab.restart_dom0_qemu`), so devices stay (Closed) until the
    module ends; QEMU is then restarted without them, and 9pnet_xen is
    allowed (and loaded) again if a test kept it away.
    """

    def __init__(self) -> None:
        self.devices: list[xenlab.Dom0NinePDevice] = []
        self.exports: list[str] = []
        self.unblacklist = False
        self.reload_9pnet_xen = False

    def device(
        self, name: str, tag: str, export: Path | None = None, **kwargs: object
    ) -> xenlab.Dom0NinePDevice:
        """A new device in InitWait, served by a freshly started QEMU.

        Dom0's QEMU 7.2 served only the first connection after it started
        in these tests (a device whose frontend closed cannot be connected
        again, and a new device after that one stayed in InitWait), so each
        connection gets a new QEMU.

        :param export: the directory to export (default: a fresh one)
        """
        self.restart_qemu()
        path = export if export is not None else fresh_export(name)
        dev = xenlab.create_dom0_9pfs_device(path, tag, **kwargs)  # type: ignore[arg-type]
        self.devices.append(dev)
        return dev

    def restart_qemu(self) -> None:
        """Restart dom0's QEMU without the devices made so far (a fresh backend)."""
        devices, self.devices = self.devices, []
        self.exports += [dev.path for dev in devices if dev.path not in self.exports]
        xenlab.restart_dom0_qemu(devices)

    def finish(self) -> None:
        """Restart QEMU without our devices, remove the exports, restore 9pnet_xen."""
        try:
            if self.devices:
                self.restart_qemu()
        finally:
            for path in self.exports:
                shutil.rmtree(path, ignore_errors=True)
            if self.unblacklist:
                xenlab.unblacklist_9pnet_xen()
                if self.reload_9pnet_xen:
                    xenlab.load_9pnet_xen()


@pytest.fixture(scope="module")
def lab() -> Iterator[ModuleLab]:
    """This module's devices, cleaned up once at its end."""
    state = ModuleLab()
    yield state
    state.finish()


@pytest.fixture(scope="module")
def suite_device(lab: ModuleLab) -> xenlab.Dom0NinePDevice:
    """The device the client suite runs on (frontend outside ``device/``)."""
    return lab.device("suite", "fe-dom0")


class SuiteConnection:
    """The suite's one connection, opened on first use and closed before the
    tests that open their own (gntalloc allows 1024 grants in the whole
    domain: two default connections, 514 grants each, do not fit together).

    One connection, not one per test, because QEMU 7.2 cannot serve a device
    again once its frontend closed (see :func:`xenlab.restart_dom0_qemu`).
    """

    def __init__(self, device: xenlab.Dom0NinePDevice) -> None:
        self.device = device
        self.frontend: Frontend | None = None
        self.closed = False

    def get(self) -> Frontend:
        """The connection (made on first call)."""
        assert not self.closed, "the suite's connection was closed already"
        if self.frontend is None:
            self.frontend = Frontend.connect(path=self.device.frontend, timeout=30)
        return self.frontend

    def close(self) -> None:
        """Close it (once) and check both ends reached Closed."""
        if self.frontend is not None and not self.closed:
            self.closed = True
            self.frontend.close()
            assert self.device.frontend_state() == XenbusState.CLOSED
            assert self.device.backend_state() == XenbusState.CLOSED
        self.closed = True


@pytest.fixture(scope="module")
def connection(suite_device: xenlab.Dom0NinePDevice) -> Iterator[SuiteConnection]:
    """The suite's connection to dom0's QEMU (by XenStore path)."""
    conn = SuiteConnection(suite_device)
    yield conn
    conn.close()


@pytest.fixture
def root(request: pytest.FixtureRequest, suite_device: xenlab.Dom0NinePDevice) -> Path:
    """The directory dom0's QEMU exports (the suite's ``root``), emptied for each test."""
    path = Path(suite_device.path)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    os.chmod(path, 0o755)
    return path


#: Tests that open connections of their own.
OWN_CONNECTION = frozenset(
    {"test_other_ring_layouts", "test_replies_that_would_fill_a_ring_exactly_are_held_back",
     "test_cli_ls_cat_info_demo_by_path", "test_cli_demo_finds_the_only_device"}
)  # fmt: skip


class NoClient:
    """Stands for the suite's client in tests that open their own connections."""

    closed = True


@pytest.fixture
def client(
    request: pytest.FixtureRequest, connection: SuiteConnection, root: Path
) -> Iterator[Client | NoClient]:
    """A fresh 9P session (Tversion, Tattach) over the QEMU connection (the suite's
    ``client``); the tests of :data:`OWN_CONNECTION` get none, and the suite's
    connection is closed before them (they come last)."""
    if request.node.originalname in OWN_CONNECTION:
        connection.close()
        yield NoClient()
        return
    frontend = connection.get()
    fs = Client(frontend, timeout=60, close_transport=False)
    try:
        yield fs
    finally:
        fs.close()
    assert frontend.connected, "the 9P session broke the connection"


def sha256_file(path: Path) -> str:
    """sha256 of a file read in dom0, in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- negotiation


def test_negotiated_with_qemu(client: Client, suite_device: xenlab.Dom0NinePDevice) -> None:
    fe = client.transport
    assert type(fe).__name__ == "Frontend"
    # what QEMU offered, as pyxen9p read it and as XenStore holds it
    assert fe.backend_versions == frozenset({1})  # type: ignore[attr-defined]
    assert fe.backend_max_rings == 8  # type: ignore[attr-defined]
    assert fe.backend_max_ring_order == 9  # type: ignore[attr-defined]
    assert suite_device.backend_features() == {
        "versions": "1", "max-rings": "8", "max-ring-page-order": "9",
    }  # fmt: skip
    # what pyxen9p chose: 2 rings, the largest order within gntalloc's 1024 grants
    assert (fe.num_rings, fe.ring_order) == (DEFAULT_RINGS, DEFAULT_ORDER)  # type: ignore[attr-defined]
    assert fe.msize == (4096 << DEFAULT_ORDER) // 2 // 2  # half of each direction's ring
    assert fe.backend_id == 0 and fe.tag == "fe-dom0"  # type: ignore[attr-defined]
    assert fe.backend_path == suite_device.backend  # type: ignore[attr-defined]
    # what it published for QEMU
    fe_nodes = {n: xenlab.xs_read(f"{suite_device.frontend}/{n}") for n in ("version", "num-rings")}
    assert fe_nodes == {"version": "1", "num-rings": str(DEFAULT_RINGS)}
    fe_dir = suite_device.frontend
    refs = {xenlab.xs_read(f"{fe_dir}/ring-ref{i}") for i in range(DEFAULT_RINGS)}
    ports = {xenlab.xs_read(f"{fe_dir}/event-channel-{i}") for i in range(DEFAULT_RINGS)}
    assert len(refs) == len(ports) == DEFAULT_RINGS and None not in refs | ports
    assert xenlab.xs_read(f"{suite_device.frontend}/ring-ref{DEFAULT_RINGS}") is None
    assert suite_device.frontend_state() == XenbusState.CONNECTED
    assert suite_device.backend_state() == XenbusState.CONNECTED
    # QEMU maps every page shared: 1 interface page + 2^order data pages per ring
    qemu = xenlab.dom0_qemu_pid()
    assert qemu is not None
    assert xenlab.gntdev_mapped_pages(qemu) >= DEFAULT_RINGS * (1 + (1 << DEFAULT_ORDER))
    # 9P2000.L with QEMU, msize no larger than the transport carries
    assert client.version == "9P2000.L"
    assert 4096 <= client.msize <= fe.msize
    print(f"negotiated: rings={fe.num_rings} order={fe.ring_order}"  # type: ignore[attr-defined]
          f" transport msize={fe.msize} 9P msize={client.msize}")  # fmt: skip


@pytest.mark.parametrize(("rings", "order"), [(1, 9), (1, 7), (3, 2), (8, 5)])
def test_other_ring_layouts(lab: ModuleLab, rings: int, order: int) -> None:
    dev = lab.device(f"layout{rings}x{order}", "layout")
    export = Path(dev.path)
    data = os.urandom(1024 * 1024 + 333)
    with pyxen9p.connect(path=dev.frontend, rings=rings, ring_order=order, timeout=30) as fs:
        fe = fs.transport
        assert (fe.num_rings, fe.ring_order) == (rings, order)  # type: ignore[attr-defined]
        assert fe.msize == (4096 << order) // 4
        assert xenlab.xs_read(f"{dev.frontend}/num-rings") == str(rings)
        assert fs.msize <= fe.msize
        fs.write_bytes("big.bin", data)
        assert sha256_file(export / "big.bin") == hashlib.sha256(data).hexdigest()
        assert fs.read_bytes("big.bin") == data
        fs.mkdir("d")
        fs.rename("big.bin", "d/moved.bin")
        assert fs.listdir("d") == ["moved.bin"]
        fs.remove("d/moved.bin")
        assert not (export / "d" / "moved.bin").exists()
    assert dev.frontend_state() == XenbusState.CLOSED
    assert dev.backend_state() == XenbusState.CLOSED


def test_replies_that_would_fill_a_ring_exactly_are_held_back(lab: ModuleLab) -> None:
    """QEMU counts an exactly full ``in`` ring as empty and writes the next
    reply over the unread ones.  Four Treads of msize - 11 bytes on one ring
    of 2 x msize, nobody receiving until all are sent: without the
    frontend's reply budget the third reply overran the first two (the
    connection failed with "ring indices out of range"); with it the third
    and fourth wait for room and every byte arrives."""
    dev = lab.device("fullring", "fullring")
    data = os.urandom(4 << 19)
    (Path(dev.path) / "f").write_bytes(data)
    with pyxen9p.connect(path=dev.frontend, rings=1, ring_order=7, timeout=30) as fs:
        fe = fs.transport
        assert fs.msize == fe.msize  # two full Rreads fill the ring exactly
        count = fs.msize - 11
        buffer = bytearray(4 * count)
        view = memoryview(buffer)
        with fs.open("f", "rb", buffering=0) as f:
            fid = f._fid  # type: ignore[attr-defined]
            tags = [60000 + i for i in range(4)]
            messages = [
                struct.pack("<IBHIQI", 23, 116, tag, fid, i * count, count)
                for i, tag in enumerate(tags)
            ]
            intos = [view[i * count : (i + 1) * count] for i in range(4)]
            futures = fe.submit_many(messages, timeout=30, into=intos, lazy=True)  # type: ignore[attr-defined]
            for future in futures:
                head = future.result(timeout=30)
                assert head[4] == 117 and int.from_bytes(head[7:11], "little") == count
        assert bytes(buffer) == data[: 4 * count]
        assert fe.connected  # type: ignore[attr-defined]
    assert dev.frontend_state() == XenbusState.CLOSED


# --------------------------------------------------------------------------- command line


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``python3 -m pyxen9p.cli ARGS`` with the shared tree on ``PYTHONPATH``."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.run(
        [sys.executable, "-m", "pyxen9p.cli", *args], capture_output=True, text=True,
        timeout=timeout, env=env, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_cli_ls_cat_info_demo_by_path(lab: ModuleLab) -> None:
    export = fresh_export("cli")
    (export / "hello.txt").write_text("hello over QEMU's 9pfs\n")
    (export / "sub").mkdir()
    dev = lab.device("cli", "clitag", export)
    res = run_cli("--path", dev.frontend, "ls", "-l", "/")
    assert res.returncode == 0, res.stderr
    assert "hello.txt" in res.stdout and "sub" in res.stdout
    assert dev.backend_state() == XenbusState.CLOSED
    dev = lab.device("cli", "clitag", export)
    res = run_cli("--path", dev.frontend, "cat", "hello.txt")
    assert res.returncode == 0 and res.stdout == "hello over QEMU's 9pfs\n", res.stderr
    dev = lab.device("cli", "clitag", export)
    res = run_cli("--path", dev.frontend, "info", "--json", "--require-device")
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    json.loads(text)
    assert dev.backend in text and dev.frontend in text
    dev = lab.device("cli", "clitag", export)
    res = run_cli("--path", dev.frontend, "demo")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "a real Xen 9pfs share" in res.stdout
    assert "hello.txt" in res.stdout and "demo passed on real Xen" in res.stdout
    assert dev.frontend_state() == XenbusState.CLOSED
    assert dev.backend_state() == XenbusState.CLOSED


def test_cli_demo_finds_the_only_device(lab: ModuleLab) -> None:
    """``pyxen9p demo`` with no option uses this domain's only ``device/9pfs`` device.

    The device is put under dom0's own ``device/9pfs``; dom0's kernel must not
    take it, so 9pnet_xen is unloaded and blacklisted (restored at the end of
    the module, once the device is gone).
    """
    existing = xenlab.xs_list("/local/domain/0/device/9pfs")
    assert not existing, f"dom0 already has device/9pfs nodes: {existing}"
    lab.reload_9pnet_xen = xenlab.module_loaded("9pnet_xen")
    lab.unblacklist = True
    xenlab.blacklist_9pnet_xen()
    assert not xenlab.module_loaded("9pnet_xen")
    export = fresh_export("demo")
    payload = os.urandom(300_000)
    (export / "payload.bin").write_bytes(payload)
    dev = lab.device("demo", "demotag", export, frontend_base="/local/domain/0/device/9pfs")
    assert dev.frontend_state() == XenbusState.INITIALISING  # nobody took it
    res = run_cli("demo")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"frontend {dev.frontend}" in res.stdout, res.stdout
    digest = hashlib.sha256(payload).hexdigest()[:16]
    assert "payload.bin: " in res.stdout and f"sha256 {digest}" in res.stdout, res.stdout
    assert "demo passed on real Xen" in res.stdout
    assert dev.frontend_state() == XenbusState.CLOSED
    assert dev.backend_state() == XenbusState.CLOSED
    print(res.stdout)
