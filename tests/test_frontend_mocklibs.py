"""The whole stack through real ctypes calls: the backend in a second process.

* XenStore: the real libxenstore, through pyxen9p.libs.xenstore, talking to
  the simulated xenstored over its Unix socket (``XENSTORED_PATH``);
* grants and event channels: pyxen9p.libs over the mock C libraries, whose
  pages and ports really cross the process boundary;
* the backend (tests/mock_backend_peer.py) runs in its own process as domain
  0; the frontend, and a 9P client on it, in this process as domain 7.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_file
from mocklibs import (  # noqa: F401
    EVTCHN,
    GNTTAB,
    MockXen,
    domain,
    mock_env,
    mock_libs_fixture,
    mockxen_fixture,
    xen_dir_fixture,
)

from pyxen9p.frontend import Frontend
from pyxen9p.interfaces import Permission, PermissionFlag
from pyxen9p.libs import RealXen, XenStore
from pyxen9p.p9.client import Client
from pyxen9p.sim.xenstored import XenStoreDaemon

FE, BE = 7, 0
FE_PATH = f"/local/domain/{FE}/device/9pfs/0"
BE_PATH = f"/local/domain/{BE}/backend/9pfs/{FE}/0"
PEER = Path(__file__).parent / "mock_backend_peer.py"


def _toolstack(store: XenStore) -> None:
    """Write the nodes libxl writes for a 9pfs device."""
    for path, value in [
        (f"{FE_PATH}/backend", BE_PATH),
        (f"{FE_PATH}/backend-id", str(BE)),
        (f"{FE_PATH}/tag", "share"),
        (f"{FE_PATH}/state", "1"),
        (f"{BE_PATH}/frontend", FE_PATH),
        (f"{BE_PATH}/frontend-id", str(FE)),
        (f"{BE_PATH}/online", "1"),
        (f"{BE_PATH}/state", "1"),
    ]:
        store.write(path, value)
    store.set_permissions(
        FE_PATH, [Permission(FE, PermissionFlag.NONE), Permission(BE, PermissionFlag.READ)]
    )
    store.set_permissions(
        BE_PATH, [Permission(BE, PermissionFlag.NONE), Permission(FE, PermissionFlag.READ)]
    )


class Peer:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the backend process said nothing"
        return self.proc.stdout.readline().strip()

    def stop(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        last = self.line(20)
        assert self.proc.wait(20) == 0
        return last


@pytest.fixture
def stack(
    mock_libs: dict[str, Path],
    mockxen: MockXen,
    xen_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[RealXen, Path, Peer]]:
    need_file("/usr/lib/x86_64-linux-gnu/libxenstore.so.4")
    sock = tmp_path / "xenstored.sock"
    export = tmp_path / "export"
    export.mkdir()
    with XenStoreDaemon(str(sock)):
        monkeypatch.setenv("XENSTORED_PATH", str(sock))
        with XenStore() as store:
            _toolstack(store)
        env = dict(os.environ)
        env.update(mock_env(mock_libs, xen_dir, BE))
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")]
        )
        proc = subprocess.Popen(
            [sys.executable, str(PEER), str(FE), FE_PATH, str(export)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        peer = Peer(proc)
        try:
            assert peer.line(20) == "ready"
            platform = RealXen(gnttab_library=mock_libs[GNTTAB], evtchn_library=mock_libs[EVTCHN])
            yield platform, export, peer
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        mockxen.gc(xen_dir)


def test_client_through_frontend_through_mock_libraries(
    stack: tuple[RealXen, Path, Peer], mockxen: MockXen
) -> None:
    platform, export, peer = stack
    (export / "hello.txt").write_bytes(b"hello from the backend process\n")
    with domain(FE):
        frontend = Frontend.connect(
            path=FE_PATH, platform=platform, rings=2, ring_order=4, timeout=10
        )
    assert (frontend.num_rings, frontend.ring_order) == (2, 4)
    with Client(frontend, timeout=20) as fs:
        assert fs.listdir("/") == ["hello.txt"]
        assert fs.read_bytes("hello.txt") == b"hello from the backend process\n"
        data = os.urandom(300_000)  # several msize-sized Tread/Twrite each way
        fs.write_bytes("big.bin", data)
        assert (
            hashlib.sha256((export / "big.bin").read_bytes()).digest()
            == hashlib.sha256(data).digest()
        )
        assert fs.read_bytes("big.bin") == data
        fs.mkdir("dir")
        fs.rename("hello.txt", "dir/moved.txt")
        assert (export / "dir" / "moved.txt").exists()

        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for i in range(10):
                    name = f"dir/t{n}-{i}"
                    fs.write_bytes(name, f"{n}/{i}".encode())
                    assert fs.read_bytes(name) == f"{n}/{i}".encode()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(os.listdir(export / "dir")) == 61
    # the client closed the frontend: this process holds nothing any more
    assert mockxen.live() == {"grants": 0, "mappings": 0, "ports": 0, "handles": 0}
    last = peer.stop()
    assert last.startswith("stopped 1 []"), last
