"""Group "lab": the real-Xen lab itself (Xen, dom0, QEMU's 9pfs backend, a PV domU).

These check the environment the other groups rely on and the set-up helpers
of :mod:`xenlab`; they use only Xen's own tools, not pyxen9p (except that
the kernel mount's helper maps the kernel's ring grants with pyxen9p's grant
table to check them, see :func:`kernel_helpers.probe_kernel_rings`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

import kernel_helpers
import pytest
import xenlab
from xenlab import XenbusState

pytestmark = pytest.mark.realxen


#: The Xen minor version of each release's hypervisor.
XEN_MINOR = {"bookworm": "17", "trixie": "20"}


def test_xen_of_the_release_with_dom0() -> None:
    info = xenlab.xl_info()
    assert info["xen_major"] == "4"
    assert info["xen_minor"] == XEN_MINOR[xenlab.release()]
    assert "xen-3.0-x86_64" in info["xen_caps"]
    assert xenlab.is_dom0()
    assert int(info["nr_cpus"]) >= 1


def test_toolstack_daemons_running() -> None:
    assert xenlab.daemon_pids("oxenstored") or xenlab.daemon_pids("xenstored")
    assert xenlab.daemon_pids("xenconsoled")
    assert xenlab.dom0_qemu_pid() is not None


@pytest.mark.parametrize("node", ["evtchn", "gntdev", "gntalloc", "xenbus", "privcmd"])
def test_xen_device_nodes(node: str) -> None:
    path = Path("/dev/xen") / node
    assert path.exists(), f"{path} missing"
    fd = os.open(path, os.O_RDWR)
    os.close(fd)


@pytest.mark.parametrize("soname", ["libxengnttab.so.1", "libxenevtchn.so.1", "libxenstore.so.4"])
def test_xen_libraries_load(soname: str) -> None:
    ctypes.CDLL(soname)


def test_shared_tree_read_only_and_results_writable() -> None:
    src = Path(os.environ["PYXEN9P_SRC"])
    assert (src / "pyproject.toml").is_file()
    assert (src / "pyxen9p" / "__init__.py").is_file()
    with pytest.raises(OSError) as info:
        (src / "tests" / "xen" / "guest" / "should-not-exist").write_text("x")
    assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    res = Path(os.environ["PYXEN9P_RESULTS"])
    probe = res / "write-probe"
    probe.write_text("ok")
    assert probe.read_text() == "ok"
    probe.unlink()


def test_xenstore_cli_roundtrip() -> None:
    base = f"/local/domain/0/data/pyxen9p/lab-{os.getpid()}"
    xenlab.xs_write({f"{base}/a": "1", f"{base}/b/c": "two words"})
    try:
        assert xenlab.xs_read(f"{base}/a") == "1"
        assert xenlab.xs_read(f"{base}/b/c") == "two words"
        assert sorted(xenlab.xs_list(base)) == ["a", "b"]
    finally:
        xenlab.xs_rm(base)
    assert xenlab.xs_read(f"{base}/a") is None


@pytest.mark.release("bookworm")
def test_dom0_qemu_serves_9pfs_device_outside_device_dir(share_dir: Path) -> None:
    qemu = xenlab.dom0_qemu_pid()
    dev = xenlab.create_dom0_9pfs_device(share_dir, tag="labtag")
    try:
        assert dev.frontend.startswith(xenlab.DOM0_FRONTEND_BASE)
        assert dev.backend_state() == XenbusState.INIT_WAIT
        features = dev.backend_features()
        assert features["versions"] is not None
        assert "1" in features["versions"].split(",")
        assert features["max-rings"] == "8"
        assert features["max-ring-page-order"] == "9"
        assert xenlab.xs_read(f"{dev.frontend}/tag") == "labtag"
        assert xenlab.xs_read(f"{dev.backend}/frontend") == dev.frontend
        # Nothing in dom0's kernel took the device.
        assert dev.frontend_state() == XenbusState.INITIALISING
    finally:
        dev.remove()
    assert xenlab.xs_read(dev.backend) is None
    assert xenlab.xs_read(dev.frontend) is None
    assert xenlab.dom0_qemu_pid() == qemu, "dom0's QEMU died or restarted"
    # The backend can be created again with the same number.
    again = xenlab.create_dom0_9pfs_device(share_dir, tag="labtag", devid=dev.devid)
    again.remove()


@pytest.mark.release("bookworm")
@pytest.mark.slow
def test_pv_domu_kernel_mounts_qemu_9pfs_and_runs_on_dom0_root(share_dir: Path) -> None:
    """One PV domU (the helpers for later groups): the domU kernel's ``trans=xen``
    mount of a QEMU-served share, and dom0's root filesystem (with its Python
    and the shared tree) mounted read-only over 9pfs as the domU's userland."""
    (share_dir / "hello.txt").write_text("hello from dom0\n")
    os.chmod(share_dir, 0o777)
    src = os.environ["PYXEN9P_SRC"]
    seen: dict[str, str | None] = {}
    stop = threading.Event()

    def watch_backend() -> None:
        # Record what QEMU publishes for the domU's share while it runs.
        while not stop.is_set() and "max-rings" not in seen:
            for domid in xenlab.xs_list("/local/domain/0/backend/9pfs"):
                if domid == "0":
                    continue
                for devid in xenlab.xs_list(f"/local/domain/0/backend/9pfs/{domid}"):
                    base = f"/local/domain/0/backend/9pfs/{domid}/{devid}"
                    if xenlab.xs_read(f"{base}/path") != str(share_dir):
                        continue
                    if xenlab.xs_int(f"{base}/state") == XenbusState.CONNECTED:
                        for node in ("versions", "max-rings", "max-ring-page-order", "path"):
                            seen[node] = xenlab.xs_read(f"{base}/{node}")
            stop.wait(0.2)

    watcher = threading.Thread(target=watch_backend, daemon=True)
    watcher.start()
    try:
        result = xenlab.run_pv_domu(
            "mkdir -p /tmp/share\n"
            "mount -t 9p -o trans=xen,version=9p2000.L share /tmp/share || exit 10\n"
            "cat /tmp/share/hello.txt || exit 11\n"
            "echo written by the domU > /tmp/share/from-domu.txt || exit 12\n"
            "sleep 1\n"
            "umount /tmp/share || exit 13\n"
            "echo DOMID=$(xenstore-read domid)\n"
            f"test -f {src}/pyproject.toml && echo TREE-OK\n"
            "python3 -S -c 'import sys; print(\"PY-OK\", sys.version_info[:2])'\n"
            "touch /probe-ro 2>/dev/null && echo ROOT-WRITABLE || echo ROOT-RO\n",
            p9=[f"tag=share,security_model=none,path={share_dir}"],
            dom0_root=True,
            memory_mb=512,
            timeout=240,
        )
    finally:
        stop.set()
        watcher.join(5)
    assert result.rc == 0, result.console[-4000:]
    out = result.output
    assert "hello from dom0" in out
    assert (share_dir / "from-domu.txt").read_text() == "written by the domU\n"
    assert seen.get("versions") == "1"
    assert seen.get("max-rings") == "8"
    assert seen.get("path") == str(share_dir)
    domid = next(line for line in out.splitlines() if line.startswith("DOMID=")).split("=")[1]
    assert int(domid) > 0
    assert "TREE-OK" in out
    assert "PY-OK (3, 11)" in out
    assert "ROOT-RO" in out
    assert not Path("/probe-ro").exists()


@pytest.mark.release("bookworm")
@pytest.mark.slow
def test_dom0_kernel_9pfs_side_by_side(share_dir: Path, tmp_path: Path) -> None:
    """The kernel's own frontend (9pnet_xen) in dom0 on a QEMU-served device/9pfs node.

    Mounted through :func:`kernel_helpers.kernel_mount`, which checks the
    ring pages the kernel granted and tries a new device when they are not
    the ring's (a 9pnet_xen bug in a PV dom0; see ``docs/realxen.rst``).
    """
    (share_dir / "k.txt").write_text("kernel side\n")
    loaded = kernel_helpers.load_kernel_9p()
    try:
        with kernel_helpers.kernel_mount(share_dir, tmp_path / "mnt", "ktag") as km:
            assert (km.mountpoint / "k.txt").read_text() == "kernel side\n"
            (km.mountpoint / "back.txt").write_text("from dom0 kernel\n")
            assert (share_dir / "back.txt").read_text() == "from dom0 kernel\n"
            device = km.device
        assert kernel_helpers.mounted(tmp_path / "mnt") is None
        assert not kernel_helpers.sysfs_device(device.devid).exists()
        assert xenlab.xs_read(device.frontend) is None
    finally:
        kernel_helpers.unload_modules(loaded)
