"""Group "domu_xen9pfsd": pyxen9p inside a PV domU, on a share xen-9pfsd serves (Debian 13).

A guest whose configuration has
``p9=['type=xen_9pfsd,tag=share,security_model=none,path=...']``: libxl
starts Xen's own 9pfs backend, ``xen-9pfsd``, which publishes the device under
``backend/xen_9pfs/<domid>/<devid>``; pyxen9p in the guest finds it by tag
under its own ``device/9pfs``, negotiates 9P2000.u (the only dialect
xen-9pfsd speaks: the client falls back to it) and uses it through its file
API and its command line.

The domU's kernel loads no 9pfs driver at all, so pyxen9p is the device's only
frontend.  Its root is not a 9pfs share either (QEMU 10 serves none): it is
dom0's root filesystem image, from the lab VM's read-only second disk, which
the domU gets through blkback (:func:`xenlab.run_pv_domu` with
``root_disk=True``); the pyxen9p tree comes in the initramfs.  Everything the
domU writes is checked from dom0 on the exported directory (the large file by
sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import xenlab

RELEASES = ("trixie",)
pytestmark = pytest.mark.realxen

BIG_UP = 4 * 1024 * 1024 + 777  # written by the domU
BIG_DOWN = 3 * 1024 * 1024 + 5  # read by the domU
MANY = 12  # files made one after another: more than xen-9pfsd's default fid limit (5)

DOMU_PROBE = r"""
import errno, faulthandler, hashlib, json, os, stat, subprocess, sys, time

faulthandler.dump_traceback_later(400, exit=True)  # a hang shows where, on the console


def xen_fds():
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/xen/"):
            found.append(target)
    return sorted(found)


def evtchn_irqs():
    with open("/proc/interrupts") as f:
        return sum(1 for line in f if "evtchn:" in line)


def xs(path):
    done = subprocess.run(["xenstore-read", path], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def wait_state(path, want, seconds=20):
    end = time.monotonic() + seconds
    while xs(path) != want and time.monotonic() < end:
        time.sleep(0.1)
    return xs(path)


def mib_s(size, seconds):
    return round(size / 1048576 / max(seconds, 1e-6), 2)


def expect_error(call, *args):
    try:
        call(*args)
    except OSError as exc:
        return [exc.errno, str(exc)]
    return "no error"


t0 = time.monotonic()
import pyxen9p

out = {"import_s": round(time.monotonic() - t0, 1)}
print(f"pyxen9p imported in {out['import_s']}s", flush=True)
domid = int(xs("domid"))
out["kernel_9p"] = [m for m in ("9p", "9pnet", "9pnet_xen") if os.path.exists(f"/sys/module/{m}")]
fds_before, irqs_before = xen_fds(), evtchn_irqs()
t1 = time.monotonic()
with pyxen9p.connect(tag="share", agent="never", timeout=60, request_timeout=120) as fs:
    fe = fs.transport
    out["connect_s"] = round(time.monotonic() - t1, 1)
    print(f"connected in {out['connect_s']}s", flush=True)
    out["version"] = fs.version
    out["path"] = fe.path
    out["backend"] = fe.backend_path
    out["backend_id"] = fe.backend_id
    out["backend_type"] = [fe.backend_type.name, fe.backend_type.server, fe.backend_type.reconnects]
    out["layout"] = [fe.num_rings, fe.ring_order, fe.msize, fs.msize]
    out["offered"] = [sorted(fe.backend_versions), fe.backend_max_rings,
                      fe.backend_max_ring_order]
    out["frontend_state"] = xs(f"{fe.path}/state")
    out["backend_state"] = xs(f"{fe.backend_path}/state")
    out["irqs_open"] = evtchn_irqs() - irqs_before
    out["fds_open"] = len(xen_fds()) - len(fds_before)
    out["listing"] = sorted(fs.listdir("/"))
    st = fs.stat("hello.txt")
    out["hello_stat"] = [st.st_size, stat.S_IMODE(st.st_mode), stat.S_ISREG(st.st_mode)]
    out["hello"] = fs.read_text("hello.txt")
    t2 = time.monotonic()
    down = fs.read_bytes("down.bin")
    out["down_mib_s"] = mib_s(len(down), time.monotonic() - t2)
    out["down_sha"] = hashlib.sha256(down).hexdigest()
    fs.write_text("from-domu.txt", f"written by domain {domid}\n")
    block = hashlib.sha256(b"pyxen9p-domu-xen9pfsd").digest() * 4096
    big = (block * (BIG_UP // len(block) + 1))[:BIG_UP]
    t3 = time.monotonic()
    fs.write_bytes("up.bin", big)
    out["up_mib_s"] = mib_s(len(big), time.monotonic() - t3)
    out["up_sha"] = hashlib.sha256(big).hexdigest()
    out["up_size"] = fs.stat("up.bin").st_size
    fs.mkdir("made")
    with fs.open("made/created.bin", "xb") as f:
        f.write(b"\x00created\xff")
    for i in range(MANY):
        fs.write_text(f"made/f{i}.txt", f"file {i}\n")
    out["many_back"] = all(fs.read_text(f"made/f{i}.txt") == f"file {i}\n" for i in range(MANY))
    out["made_listing"] = sorted(fs.listdir("made"))
    for i in range(0, MANY, 2):
        fs.remove(f"made/f{i}.txt")
    fs.write_bytes("doomed.txt", b"x")
    fs.remove("doomed.txt")
    out["rename"] = expect_error(fs.rename, "from-domu.txt", "renamed.txt")
    out["rmdir"] = expect_error(fs.rmdir, "made")
    out["fid_count"] = fs.fid_count
    out["usable"] = fs.usable
out["closed"] = [wait_state(out["path"] + "/state", "6"),
                 wait_state(out["backend"] + "/state", "6")]
out["fds_left"] = len(xen_fds()) - len(fds_before)
out["irqs_left"] = evtchn_irqs() - irqs_before
# a second session on the same device, without allow_reconnect: xen-9pfsd takes it
t4 = time.monotonic()
with pyxen9p.connect(tag="share", agent="never", timeout=60, request_timeout=120) as fs:
    out["reconnect_s"] = round(time.monotonic() - t4, 1)
    out["again"] = [fs.version, fs.read_text("from-domu.txt"), sorted(fs.listdir("made"))]
    fs.write_text("second-session.txt", "again\n")
out["closed_again"] = [wait_state(out["path"] + "/state", "6"),
                       wait_state(out["backend"] + "/state", "6")]
out["fds_end"] = len(xen_fds()) - len(fds_before)
out["irqs_end"] = evtchn_irqs() - irqs_before
out["total_s"] = round(time.monotonic() - t0, 1)
print("RESULT " + json.dumps(out), flush=True)
""".replace("BIG_UP", str(BIG_UP)).replace("MANY", str(MANY))

DOMU_SCRIPT = r"""
set -e
share=
for d in $(xenstore-list device/9pfs); do
    t=$(xenstore-read device/9pfs/$d/tag)
    echo "device/9pfs/$d: tag $t state $(xenstore-read device/9pfs/$d/state)" \
        "backend $(xenstore-read device/9pfs/$d/backend)"
    if [ "$t" = share ]; then share=$d; fi
done
test -n "$share" || exit 30
test -d /sys/bus/xen/devices/9pfs-$share || exit 31
test ! -e /sys/bus/xen/devices/9pfs-$share/driver || exit 32  # no kernel driver took it
export PYTHONPATH=/tmp/domu/src
python3 -u /tmp/domu/probe.py
# the command line, twice: a listing, and a file fetched
t=$(date +%s)
python3 -m pyxen9p --tag share --direct -q ls -l made > /tmp/ls.out
echo "CLI ls took $(( $(date +%s) - t ))s"
sed 's/^/CLI-LS /' /tmp/ls.out
python3 -m pyxen9p --tag share --direct -q get hello.txt /tmp/hello.got
echo "CLI-GET $(sha256sum < /tmp/hello.got | cut -d' ' -f1)"
"""


def _diagnosis(console: str) -> str:
    """The domU console's tail and xen-9pfsd's log lines, for a failure message."""
    parts = [f"--- domU console (tail):\n{console[-5000:]}"]
    for log in sorted(Path("/var/log/xen").glob("*9pfs*")):
        text = log.read_text(errors="replace")
        parts.append(f"--- {log} (tail):\n{text[-3000:]}")
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pyxen9p_in_a_pv_domu_on_its_xen_9pfsd_share(
    share_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chmod(share_dir, 0o777)
    (share_dir / "hello.txt").write_text("hello from dom0\n")
    down = os.urandom(BIG_DOWN)
    (share_dir / "down.bin").write_bytes(down)
    files = xenlab.project_files(os.environ["PYXEN9P_SRC"], "domu/src")
    files["domu/probe.py"] = DOMU_PROBE.encode()
    result = xenlab.run_pv_domu(
        DOMU_SCRIPT,
        p9=[f"type=xen_9pfsd,tag=share,security_model=none,path={share_dir}"],
        root_disk=True,
        files=files,
        modules=("xen-evtchn", "xen-gntalloc"),  # and no 9pfs driver
        memory_mb=512,
        timeout=480,
    )
    diag = _diagnosis(result.console)
    assert result.rc == 0, diag
    line = next((x for x in result.output.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, diag
    got = json.loads(line.split(" ", 1)[1])
    figures = ("import_s", "connect_s", "down_mib_s", "up_mib_s", "reconnect_s", "total_s")
    with capsys.disabled():  # the figures in the log of a passing run too
        shown = [x for x in result.output.splitlines() if not x.startswith("RESULT ")]
        print("\n" + "\n".join(f"  domU| {x}" for x in shown))
        print(
            f"  domU on xen-9pfsd: lifetime {result.seconds:.1f}s, layout"
            f" {got['layout']} (rings, order, ring msize, 9P msize), "
            + ", ".join(f"{k} {got[k]}" for k in figures),
            flush=True,
        )
    domid = int((share_dir / "from-domu.txt").read_text().split()[-1])
    assert domid > 0
    assert got["kernel_9p"] == []  # the domU kernel never drove a 9pfs device
    # found in the domU's own device/9pfs, served by xen-9pfsd in dom0, in 9P2000.u
    assert got["path"].startswith(f"/local/domain/{domid}/device/9pfs/")
    assert got["backend"].startswith(f"/local/domain/0/backend/xen_9pfs/{domid}/")
    assert got["backend_id"] == 0
    assert got["backend_type"] == ["xen_9pfs", "xen-9pfsd", True]
    assert got["offered"] == [[1], 4, 9]
    assert got["version"] == "9P2000.u"
    rings, order, msize, p9_msize = got["layout"]
    assert 1 <= rings <= 4 and 1 <= order <= 9
    assert msize == (4096 << order) // 4 and 4096 <= p9_msize <= msize
    assert [got["frontend_state"], got["backend_state"]] == ["4", "4"]
    assert got["irqs_open"] == rings and got["fds_open"] >= 1
    # what the domU read
    assert got["listing"] == ["down.bin", "hello.txt"]
    assert got["hello_stat"] == [16, 0o644, True]
    assert got["hello"] == "hello from dom0\n"
    assert got["down_sha"] == hashlib.sha256(down).hexdigest()
    # what it wrote, checked on dom0's side
    up = share_dir / "up.bin"
    assert up.stat().st_size == BIG_UP == got["up_size"]
    assert hashlib.sha256(up.read_bytes()).hexdigest() == got["up_sha"]
    made = share_dir / "made"
    assert (made / "created.bin").read_bytes() == b"\x00created\xff"
    assert got["many_back"] is True
    assert got["made_listing"] == sorted(["created.bin", *(f"f{i}.txt" for i in range(MANY))])
    assert sorted(os.listdir(made)) == sorted(
        ["created.bin", *(f"f{i}.txt" for i in range(1, MANY, 2))]
    )
    assert (made / "f3.txt").read_text() == "file 3\n"
    assert not (share_dir / "doomed.txt").exists()
    # what xen-9pfsd cannot do, said clearly, and nothing changed
    assert got["rename"][0] == 95, got["rename"]  # EOPNOTSUPP
    assert not (share_dir / "renamed.txt").exists()
    assert got["rmdir"][0] == 95 and "cannot remove directories" in got["rmdir"][1], got["rmdir"]
    assert made.is_dir()
    assert got["fid_count"] <= 2 and got["usable"] is True
    # closed cleanly: both sides Closed, the domU's ports and device files given back
    assert got["closed"] == ["6", "6"]
    assert got["fds_left"] == 0 and got["irqs_left"] == 0
    # and connected again without allow_reconnect
    assert got["again"] == [
        "9P2000.u",
        f"written by domain {domid}\n",
        sorted(["created.bin", *(f"f{i}.txt" for i in range(1, MANY, 2))]),
    ]
    assert (share_dir / "second-session.txt").read_text() == "again\n"
    assert got["closed_again"] == ["6", "6"]
    assert got["fds_end"] == 0 and got["irqs_end"] == 0
    # the command line in the domU
    listed = [x.split(" ", 1)[1] for x in result.output.splitlines() if x.startswith("CLI-LS ")]
    assert len(listed) == len(os.listdir(made)), result.output
    assert all(any(x.endswith(" " + n) for x in listed) for n in os.listdir(made)), listed
    fetched = next(x for x in result.output.splitlines() if x.startswith("CLI-GET "))
    assert fetched.split()[1] == hashlib.sha256(b"hello from dom0\n").hexdigest()
    assert xenlab.daemon_pids("xen-9pfsd")
