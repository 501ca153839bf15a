"""Group "domu": pyxen9p inside a PV domU, on a share that ``xl create`` set up.

The real use case: a guest whose configuration has
``p9=['tag=share,security_model=none,path=...']``; libxl starts a QEMU for
the domain, and pyxen9p in the guest finds the device under its own
``device/9pfs`` by tag (then by devid) and talks to that QEMU.

The domU runs dom0's Python over a second 9pfs device (its root, mounted by
the domU kernel's 9pnet_xen, see :func:`xenlab.run_pv_domu`).  Loading
9pnet_xen makes the kernel claim *every* 9pfs device of the domain, so the
share is hidden from it at boot (:class:`HideShareFromKernel`): the kernel
never connects to it, and pyxen9p is the device's first and only frontend
(QEMU 7.2 cannot serve a device again after a frontend closed it).  Everything pyxen9p writes is
checked from dom0 on the exported directory (the large file by sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import xenlab

#: QEMU serves these devices: Debian 12 only (QEMU 10 serves none, see test_qemu10.py).
RELEASES = ("bookworm",)
pytestmark = pytest.mark.realxen

BIG_UP = 4 * 1024 * 1024 + 777  # written by the domU
BIG_DOWN = 3 * 1024 * 1024 + 5  # read by the domU

DOMU_PROBE = r"""
import faulthandler, hashlib, json, os, stat, sys, time

faulthandler.dump_traceback_later(110, exit=True)  # a hang shows where, on the console

t0 = time.monotonic()
import pyxen9p
from pyxen9p.frontend import DeviceBusyError

out = {"import_s": round(time.monotonic() - t0, 1)}
print(f"pyxen9p imported in {out['import_s']}s", flush=True)
domid = int(open("/tmp/domid").read())
t1 = time.monotonic()
with pyxen9p.connect(tag="share", timeout=60, request_timeout=120) as fs:
    fe = fs.transport
    out["connect_s"] = round(time.monotonic() - t1, 1)
    print(f"connected in {out['connect_s']}s", flush=True)
    out["path"] = fe.path
    out["backend"] = fe.backend_path
    out["backend_id"] = fe.backend_id
    out["layout"] = [fe.num_rings, fe.ring_order, fe.msize, fs.msize]
    out["offered"] = [sorted(fe.backend_versions), fe.backend_max_rings,
                      fe.backend_max_ring_order]
    out["listing"] = sorted(fs.listdir("/"))
    st = fs.stat("hello.txt")
    out["hello_stat"] = [st.st_size, stat.S_IMODE(st.st_mode), stat.S_ISREG(st.st_mode)]
    out["hello"] = fs.read_text("hello.txt")
    down = fs.read_bytes("down.bin")
    out["down_sha"] = hashlib.sha256(down).hexdigest()
    fs.write_text("from-domu.txt", f"written by domain {domid}\n")
    with fs.open("created.bin", "xb") as f:
        f.write(b"\x00created\xff")
    fs.mkdir("dir")
    fs.rename("created.bin", "dir/renamed.bin")
    fs.write_bytes("doomed.txt", b"x")
    fs.remove("doomed.txt")
    block = hashlib.sha256(b"pyxen9p-domu").digest() * 4096
    big = (block * (BIG_UP // len(block) + 1))[:BIG_UP]
    t2 = time.monotonic()
    fs.write_bytes("up.bin", big)
    out["up_s"] = round(time.monotonic() - t2, 2)
    out["up_sha"] = hashlib.sha256(big).hexdigest()
    out["up_size"] = fs.stat("up.bin").st_size
devid = out["path"].rsplit("/", 1)[1]
out["closed_state"] = os.popen(f"xenstore-read device/9pfs/{devid}/state").read().strip()
# the kernel still drives the root device: pyxen9p must refuse it
root_devid = int(open("/tmp/root_devid").read())
try:
    pyxen9p.connect(devid=root_devid, timeout=10).close()
    out["busy"] = "connected!"
except DeviceBusyError as exc:
    out["busy"] = f"DeviceBusyError: {exc}"
out["total_s"] = round(time.monotonic() - t0, 1)
print("RESULT " + json.dumps(out), flush=True)
""".replace("BIG_UP", str(BIG_UP))

DOMU_SCRIPT = r"""
set -e
xenstore-read domid > /tmp/domid
share=
root_devid=
for d in $(xenstore-list device/9pfs); do
    t=$(xenstore-read device/9pfs/$d/tag)
    echo "device/9pfs/$d: tag $t state $(xenstore-read device/9pfs/$d/state)"
    if [ "$t" = share ]; then share=$d; fi
    if [ "$t" = dom0root ]; then root_devid=$d; fi
done
echo $root_devid > /tmp/root_devid
test -n "$share" || exit 30
test -d /sys/bus/xen/devices/9pfs-$share || exit 31
test ! -e /sys/bus/xen/devices/9pfs-$share/driver || exit 32  # the kernel did not take it
i=0
until xenstore-read device/9pfs/$share/backend >/dev/null 2>&1; do
    i=$((i+1)); [ $i -lt 600 ] || exit 33; sleep 0.1
done
# the kernel's failed probe left the frontend Closing: Closed makes it free again
xenstore-write device/9pfs/$share/state 6
be=$(xenstore-read device/9pfs/$share/backend)
i=0
until [ "$(xenstore-read $be/state)" = 6 ]; do
    i=$((i+1)); [ $i -lt 300 ] || exit 34; sleep 0.1
done
echo "share device $share: not driven by the kernel; frontend and backend Closed"
cat > /tmp/probe.py <<'PYEOF'
PROBE
PYEOF
PYTHONPATH=SRC python3 -u /tmp/probe.py
"""


class HideShareFromKernel:
    """Keep the domU kernel's 9pnet_xen off the share's device.

    The domU needs 9pnet_xen for its root (the ``dom0root`` device), and the
    driver takes every 9pfs device when it loads.  While the domain is
    paused, the share's frontend ``backend`` node is removed, so the
    driver's probe of that device fails (the kernel then marks it Closing
    and never probes it again); once the root device is Connected (the
    driver has loaded and probed), the node is written back.  The script in
    the domU then sets the frontend Closed, and pyxen9p takes it from there.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def __call__(self, name: str) -> None:
        domid = int(xenlab.sh(["xl", "domid", name]).stdout)
        base = f"/local/domain/{domid}/device/9pfs"
        devs = {xenlab.xs_read(f"{base}/{d}/tag"): d for d in xenlab.xs_list(base)}
        share, root = f"{base}/{devs['share']}", f"{base}/{devs['dom0root']}"
        backend = xenlab.xs_read(f"{share}/backend")
        assert backend is not None
        xenlab.xs_rm(f"{share}/backend")

        def restore() -> None:
            try:
                xenlab.wait_until(
                    lambda: self.stop.is_set()
                    or xenlab.xs_int(f"{root}/state") == xenlab.XenbusState.CONNECTED,
                    150, "the domU's root device to be Connected", 0.2,
                )  # fmt: skip
            except BaseException as exc:
                self.error = exc
            finally:
                xenlab.xs_write({f"{share}/backend": backend})

        self.thread = threading.Thread(target=restore, daemon=True)
        self.thread.start()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pyxen9p_in_a_pv_domu_on_its_xl_share(share_dir: Path) -> None:
    os.chmod(share_dir, 0o777)
    (share_dir / "hello.txt").write_text("hello from dom0\n")
    down = os.urandom(BIG_DOWN)
    (share_dir / "down.bin").write_bytes(down)
    src = os.environ["PYXEN9P_SRC"]
    script = DOMU_SCRIPT.replace("PROBE", DOMU_PROBE).replace("SRC", src)
    hide = HideShareFromKernel()
    try:
        result = xenlab.run_pv_domu(
            script,
            p9=[f"tag=share,security_model=none,path={share_dir}"],
            dom0_root=True,
            modules=("9pnet_xen", "9p", "xen-evtchn", "xen-gntalloc"),
            memory_mb=512,
            timeout=200,
            on_created=hide,
        )
    finally:
        hide.stop.set()
        if hide.thread is not None:
            hide.thread.join(10)
    assert hide.error is None, hide.error
    print(result.output)
    print(f"domU lifetime {result.seconds:.1f}s")
    assert result.rc == 0, result.console[-4000:]
    line = next(x for x in result.output.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.split(" ", 1)[1])
    domid = int((share_dir / "from-domu.txt").read_text().split()[-1])
    assert domid > 0
    # the device was found in the domU's own device/9pfs, served by its QEMU in dom0
    assert got["path"].startswith(f"/local/domain/{domid}/device/9pfs/")
    assert got["backend"].startswith(f"/local/domain/0/backend/9pfs/{domid}/")
    assert got["backend_id"] == 0
    assert got["offered"] == [[1], 8, 9]
    rings, order, msize, p9_msize = got["layout"]
    assert (rings, order) == (2, 8)
    assert msize == (4096 << order) // 4 and 4096 <= p9_msize <= msize
    # what the domU read
    assert got["listing"] == ["down.bin", "hello.txt"]
    assert got["hello_stat"] == [16, 0o644, True]
    assert got["hello"] == "hello from dom0\n"
    assert got["down_sha"] == hashlib.sha256(down).hexdigest()
    # what it wrote, checked on dom0's side
    assert (share_dir / "from-domu.txt").read_text() == f"written by domain {domid}\n"
    assert (share_dir / "dir" / "renamed.bin").read_bytes() == b"\x00created\xff"
    assert not (share_dir / "created.bin").exists()
    assert not (share_dir / "doomed.txt").exists()
    up = share_dir / "up.bin"
    assert up.stat().st_size == BIG_UP == got["up_size"]
    assert hashlib.sha256(up.read_bytes()).hexdigest() == got["up_sha"]
    assert got["closed_state"] == "6"
    assert got["busy"].startswith("DeviceBusyError")
    print(json.dumps({k: got[k] for k in ("import_s", "connect_s", "up_s", "total_s")}))
