"""Guest-side helpers of the "kernel" group and of ``bench/bench_realxen.py``.

They put two frontends on the same directory of dom0, served by the same
backend type (dom0's QEMU, its Xen 9pfs backend):

* the dom0 kernel's own frontend (``9pnet_xen``), which takes a device under
  ``/local/domain/0/device/9pfs/<devid>`` and is mounted with
  ``mount -t 9p -o trans=xen,version=9p2000.L,cache=none``
  (:func:`kernel_mount`);
* pyxen9p, on a second device whose frontend directory is outside
  ``device/`` so that the kernel never sees it
  (:func:`xenlab.create_dom0_9pfs_device`, then ``pyxen9p.connect(path=...)``)
  (:func:`pyxen9p_client`).

:func:`side_by_side` sets up both on one directory.  It also describes
trees (:func:`snapshot_local`, :func:`snapshot_client`) so that what each
frontend sees can be compared entry by entry.  Standard library, ``xenlab``
and pyxen9p only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import xenlab
from xenlab import XenbusState

if TYPE_CHECKING:
    from pyxen9p.p9.client import Client

#: Where the kernel's 9pnet_xen looks for dom0's 9pfs frontends.
KERNEL_FRONTEND_BASE = "/local/domain/0/device/9pfs"
#: Mount options of the kernel's frontend: no page cache, no attribute cache.
KERNEL_MOUNT_OPTIONS = "trans=xen,version=9p2000.L,cache=none"

_tags = itertools.count(1)
#: The next device number :func:`fresh_devid` may hand out (``/run``: one boot).
DEVID_FILE = Path("/run/pyxen9p-kernel-helpers-devid")
FIRST_DEVID = 600


def fresh_devid() -> int:
    """A 9pfs device number that these helpers have not used before in this boot.

    With dom0's QEMU (7.2), a device created with the number of one removed
    earlier in the same boot was seen to export the *earlier* device's
    directory, not its own ``path``.  So numbers are never
    reused here; they start at :data:`FIRST_DEVID`, away from
    :func:`xenlab.free_devid`'s, and the counter is shared by every process
    (a file under ``/run``, locked).
    """
    with open(DEVID_FILE, "a+", encoding="ascii") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        devid = xenlab.free_devid(int(text) if text else FIRST_DEVID)
        f.seek(0)
        f.truncate()
        f.write(f"{devid + 1}\n")
    return devid


# --------------------------------------------------------------------------- kernel side


def load_kernel_9p(timeout: float = 120.0) -> list[str]:
    """Load ``9pnet_xen`` and ``9p`` (before any ``device/9pfs`` node exists).

    ``--ignore-install`` keeps a blacklist written by another group
    (:func:`xenlab.blacklist_9pnet_xen`) from turning the load into
    ``/bin/false``.

    :returns: the modules this call loaded (to unload them afterwards)
    :raises xenlab.LabError: if a module cannot be loaded
    """
    loaded = []
    for name in ("9pnet_xen", "9p"):
        if not xenlab.module_loaded(name):
            xenlab.sh(["modprobe", "--ignore-install", name], timeout=timeout)
            loaded.append(name)
    return loaded


def unload_modules(names: list[str], timeout: float = 60.0) -> None:
    """Unload the modules *names* (in reverse order); failures are ignored."""
    for name in reversed(names):
        if xenlab.module_loaded(name):
            xenlab.sh(["modprobe", "-r", name], timeout=timeout, check=False)


def mounted(mountpoint: str | os.PathLike[str]) -> dict[str, str] | None:
    """The ``/proc/mounts`` entry of *mountpoint* as a dict, or ``None``.

    :returns: ``{"source", "type", "options"}``
    """
    target = os.path.realpath(mountpoint)
    found = None
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == target:
            found = {"source": parts[0], "type": parts[2], "options": parts[3]}
    return found


def mount_option(mountpoint: str | os.PathLike[str], name: str) -> str | None:
    """The value of mount option *name* of *mountpoint* (``None``: not shown)."""
    entry = mounted(mountpoint)
    if entry is None:
        return None
    for option in entry["options"].split(","):
        key, _, value = option.partition("=")
        if key == name:
            return value
    return None


def sysfs_device(devid: int) -> Path:
    """The kernel's xenbus device of ``device/9pfs/<devid>`` in sysfs."""
    return Path(f"/sys/bus/xen/devices/9pfs-{devid}")


@dataclasses.dataclass
class KernelMount:
    """The kernel's frontend on a QEMU-served device, mounted.

    :ivar device: the device (frontend under ``device/9pfs``)
    :ivar mountpoint: where it is mounted
    """

    device: xenlab.Dom0NinePDevice
    mountpoint: Path

    @property
    def msize(self) -> int | None:
        """The msize the kernel negotiated (from ``/proc/mounts``)."""
        value = mount_option(self.mountpoint, "msize")
        return int(value) if value is not None else None


def drop_caches() -> None:
    """Write back and drop the kernel's page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def umount(mountpoint: Path, timeout: float = 60.0) -> None:
    """Unmount *mountpoint* (lazily if a plain unmount fails); no-op if not mounted.

    :raises xenlab.LabError: if it is still mounted afterwards
    """
    if mounted(mountpoint) is None:
        return
    res = xenlab.sh(["umount", str(mountpoint)], timeout=timeout, check=False)
    if res.returncode != 0:
        xenlab.sh(["umount", "-l", str(mountpoint)], timeout=timeout, check=False)
    if mounted(mountpoint) is not None:
        raise xenlab.LabError(f"{mountpoint} is still mounted: {res.stderr.strip()}")


def remove_kernel_device(device: xenlab.Dom0NinePDevice, timeout: float = 30.0) -> None:
    """Take the kernel's device away: both directories removed, sysfs device gone.

    :raises TimeoutError: if the kernel keeps the device
    """
    device.remove(timeout=10.0)
    xenlab.wait_until(
        lambda: not sysfs_device(device.devid).exists(),
        timeout,
        f"the kernel to drop {sysfs_device(device.devid)}",
    )


def kernel_device_report(device: xenlab.Dom0NinePDevice) -> str:
    """What the kernel and XenStore say about *device* (for a failed connection)."""
    sysfs = sysfs_device(device.devid)
    lines = [
        f"frontend state {device.frontend_state()}, backend state {device.backend_state()}",
        f"backend features {device.backend_features()}",
        f"{sysfs}: {'present' if sysfs.exists() else 'absent'}",
    ]
    with contextlib.suppress(OSError):
        lines.append(f"  driver: {os.readlink(sysfs / 'driver')}")
    with contextlib.suppress(OSError):
        lines.append(f"xen bus devices: {sorted(os.listdir('/sys/bus/xen/devices'))}")
    with contextlib.suppress(OSError):
        lines.append(f"9pfs driver binds: {sorted(os.listdir('/sys/bus/xen/drivers/9pfs'))}")
    lines.append(f"9pnet_xen loaded: {xenlab.module_loaded('9pnet_xen')}")
    for cmd in (["xenstore-ls", "-f", KERNEL_FRONTEND_BASE], ["xenstore-ls", "-f", device.backend]):
        res = xenlab.sh(cmd, check=False, timeout=30)
        lines.append(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    for cmd in (["dmesg"], ["xl", "dmesg"], ["tail", "-n", "40", str(xenlab.QEMU_LOG)]):
        res = xenlab.sh(cmd, check=False, timeout=30)
        lines.append(f"$ {' '.join(cmd)} (last 25 lines)")
        lines.extend(res.stdout.splitlines()[-25:])
    return "\n".join(lines)


def probe_kernel_rings(device: xenlab.Dom0NinePDevice) -> tuple[list[str], bool]:
    """Map what the kernel's frontend granted for *device*'s rings, page by page.

    Each ring's interface page (``ring-ref<i>``) names ``1 << ring_order``
    data grants.  Each is mapped alone (read-only): a grant whose frame is
    not the kernel's own fails, and a fresh ring's pages that map but are not
    all zeros are some other page of dom0.  (9pnet_xen grants the data pages
    as ``virt_to_gfn(first page) + i``, which assumes that the buffer is
    machine-contiguous; in a PV dom0 it need not be.)

    :returns: the findings, and whether some data grant is not the ring's
    """
    from pyxen9p.libs import GrantTable

    lines = []
    wrong = False
    try:
        rings = int(xenlab.xs_read(f"{device.frontend}/num-rings") or 0)
        with GrantTable() as gt:
            for i in range(rings):
                ref = int(xenlab.xs_read(f"{device.frontend}/ring-ref{i}") or -1)
                with gt.map_grant_ref(0, ref, writable=False) as intf:
                    order = int.from_bytes(intf.buffer[128:132], "little")
                    count = 1 << min(order, 9)
                    refs = [
                        int.from_bytes(intf.buffer[132 + 4 * j : 136 + 4 * j], "little")
                        for j in range(count)
                    ]
                failed, nonzero = [], []
                for j, data_ref in enumerate(refs):
                    try:
                        with gt.map_grant_ref(0, data_ref, writable=False) as page:
                            if any(page.buffer):
                                nonzero.append(j)
                    except OSError as exc:
                        failed.append((j, exc.errno))
                wrong = wrong or bool(failed or nonzero)
                lines.append(
                    f"ring {i}: interface ref {ref}, order {order}, {count} data grants:"
                    f" {len(failed)} do not map (first: {failed[:3]}),"
                    f" {len(nonzero)} map to non-zero pages (first: {nonzero[:5]})"
                )
    except (OSError, ValueError) as exc:
        lines.append(f"ring probe failed: {exc!r}")
    return lines, wrong


@contextlib.contextmanager
def kernel_mount(
    path: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    tag: str = "kside",
    *,
    options: str = KERNEL_MOUNT_OPTIONS,
    timeout: float = 60.0,
) -> Iterator[KernelMount]:
    """Export *path* on a ``device/9pfs`` device and mount it with the kernel's frontend.

    The modules must be loaded first (:func:`load_kernel_9p`).  On exit the
    mount is undone and the device removed.

    Before mounting, the ring pages the kernel granted are checked
    (:func:`probe_kernel_rings`): in a PV dom0, 9pnet_xen may grant frames
    that are not its ring's.  Such a device is kept aside (so the kernel does
    not get the same buffer again) and a new one is tried, up to
    :data:`KERNEL_CONNECT_ATTEMPTS` devices; each case is recorded.

    :param path: the dom0 directory QEMU exports
    :param mountpoint: an empty directory (created if missing)
    :param tag: the mount tag
    :param options: ``mount -o`` options
    :param timeout: seconds allowed for the connection
    :raises xenlab.LabError: if the module is not loaded or the mount fails
    :raises TimeoutError: if the kernel frontend does not connect
    """
    if not xenlab.module_loaded("9pnet_xen"):
        raise xenlab.LabError("load 9pnet_xen before creating a device/9pfs node")
    mnt = Path(mountpoint)
    mnt.mkdir(parents=True, exist_ok=True)
    parked: list[xenlab.Dom0NinePDevice] = []
    device = None
    try:
        for attempt in range(1, KERNEL_CONNECT_ATTEMPTS + 1):
            if xenlab.dom0_qemu_pid() is None:
                xenlab.restart_dom0_qemu()  # it may not survive a failed connect
            device = xenlab.create_dom0_9pfs_device(
                path, tag if attempt == 1 else f"{tag}-{attempt}", devid=fresh_devid(),
                frontend_base=KERNEL_FRONTEND_BASE, wait=False,
            )  # fmt: skip
            # a device that does not connect soon is probed then, not after the
            # whole timeout (the probe needs only the kernel's grants); a
            # connected one is probed too: its ring pages must be the
            # kernel's own, still empty, before use
            failure: str | None = None
            try:
                _wait_connected(device, min(timeout, KERNEL_PROBE_AFTER))
            except TimeoutError as exc:
                failure = str(exc)
            lines, wrong_frames = probe_kernel_rings(device)
            if failure is not None and not wrong_frames:
                try:
                    _wait_connected(device, max(timeout - KERNEL_PROBE_AFTER, 1.0))
                    failure = None
                except TimeoutError as exc:
                    failure = str(exc)
            if failure is None and not wrong_frames:
                break
            if failure is None:
                failure = "connected, but to frames that are not the kernel's ring"
            report = f"{failure}\n" + "\n".join(lines) + f"\n{kernel_device_report(device)}"
            if not wrong_frames or attempt == KERNEL_CONNECT_ATTEMPTS:
                raise TimeoutError(report)
            # the kernel granted frames that are not its ring's: keep that
            # device (and so its buffer) while the next one allocates anew
            _record_kernel_bug(device, attempt, report)
            parked.append(device)
            device = None
        assert device is not None
        xenlab.sh(["mount", "-t", "9p", "-o", options, device.tag, str(mnt)], timeout=timeout)
        try:
            yield KernelMount(device, mnt)
        finally:
            umount(mnt)
    finally:
        if device is not None:
            remove_kernel_device(device)
        if parked:
            # QEMU 7.2 must not see a device it failed to connect removed:
            # restart it without them (the kernel then frees their rings)
            xenlab.restart_dom0_qemu(parked)
            for dev in parked:
                xenlab.wait_until(
                    lambda dev=dev: not sysfs_device(dev.devid).exists(),  # type: ignore[misc]
                    30,
                    f"the kernel to drop {sysfs_device(dev.devid)}",
                )


def _wait_connected(device: xenlab.Dom0NinePDevice, timeout: float) -> None:
    device.wait_backend_state((XenbusState.CONNECTED,), timeout)
    xenlab.wait_until(
        lambda: device.frontend_state() == XenbusState.CONNECTED,
        timeout,
        "the kernel frontend to be Connected",
    )


#: Seconds :func:`kernel_mount` waits for a connection before it probes the grants.
KERNEL_PROBE_AFTER = 15.0

#: Devices tried by :func:`kernel_mount` before it gives up.
KERNEL_CONNECT_ATTEMPTS = 3


def _record_kernel_bug(device: xenlab.Dom0NinePDevice, attempt: int, report: str) -> None:
    """Say (stderr, and ``kernel-9pnet-xen-frames.txt`` in the results folder)
    that the kernel's frontend granted wrong frames for *device*."""
    text = (
        f"=== kernel 9pnet_xen, device {device.devid}, attempt {attempt}: the kernel granted"
        f" frames that are not its ring's (QEMU cannot map them, or maps other pages of"
        f" dom0); retrying on a new device\n{report}\n"
    )
    print(text, file=sys.stderr, flush=True)
    results = os.environ.get("PYXEN9P_RESULTS")
    if results:
        with open(Path(results, "kernel-9pnet-xen-frames.txt"), "a", encoding="utf-8") as f:
            f.write(text)


# --------------------------------------------------------------------------- pyxen9p side


@contextlib.contextmanager
def pyxen9p_client(
    path: str | os.PathLike[str], tag: str = "pside", **options: object
) -> Iterator[tuple[xenlab.Dom0NinePDevice, Client]]:
    """Export *path* on a device outside ``device/`` and connect pyxen9p to it.

    :param path: the dom0 directory QEMU exports
    :param tag: the device's tag
    :param options: passed to ``pyxen9p.connect``
    :returns: (the device, the connected client); both closed on exit
    """
    import pyxen9p

    with xenlab.dom0_9pfs_device(path, tag=tag, devid=fresh_devid()) as device:
        client = pyxen9p.connect(path=device.frontend, **options)
        try:
            yield device, client
        finally:
            client.close()


@dataclasses.dataclass
class SideBySide:
    """One dom0 directory seen by the kernel's frontend and by pyxen9p.

    :ivar share: the directory itself (dom0's view, what QEMU exports)
    :ivar mount: the kernel's mount
    :ivar client: pyxen9p's client
    :ivar device: pyxen9p's device
    """

    share: Path
    mount: KernelMount
    client: Client
    device: xenlab.Dom0NinePDevice

    @property
    def mnt(self) -> Path:
        """The kernel's mount point."""
        return self.mount.mountpoint


@contextlib.contextmanager
def side_by_side(share: Path, mountpoint: Path, **client_options: object) -> Iterator[SideBySide]:
    """Both frontends on *share*; everything is undone on exit (modules loaded here too).

    :param share: the directory both devices export
    :param mountpoint: where the kernel mounts it
    :param client_options: passed to ``pyxen9p.connect``
    """
    loaded = load_kernel_9p()
    n = next(_tags)  # a tag of its own: the kernel mounts the first device with the tag
    try:
        with kernel_mount(share, mountpoint, f"kside{n}") as km, pyxen9p_client(
            share, f"pside{n}", **client_options
        ) as (device, client):
            yield SideBySide(share, km, client, device)
    finally:
        unload_modules(loaded)


# --------------------------------------------------------------------------- trees


@dataclasses.dataclass(frozen=True)
class Entry:
    """What a frontend reports about one tree entry.

    :ivar kind: ``"dir"``, ``"file"`` or ``"link"``
    :ivar mode: ``st_mode`` (type and permission bits)
    :ivar size: ``st_size``
    :ivar mtime_ns: ``st_mtime_ns``
    :ivar content: sha256 of a file's bytes, a link's target, ``""`` for a directory
    """

    kind: str
    mode: int
    size: int
    mtime_ns: int
    content: str


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISREG(mode):
        return "file"
    raise ValueError(f"unexpected file type {stat.S_IFMT(mode):o}")


def _entry(
    st: os.stat_result, read_bytes: Callable[[], bytes], readlink: Callable[[], str]
) -> Entry:
    """The :class:`Entry` of a file whose ``lstat`` is *st*; its content is
    read through *read_bytes* (a file) or *readlink* (a link) if needed."""
    kind = _kind(st.st_mode)
    if kind == "file":
        content = hashlib.sha256(read_bytes()).hexdigest()
    elif kind == "link":
        content = readlink()
    else:
        content = ""
    return Entry(kind, st.st_mode, st.st_size, st.st_mtime_ns, content)


def snapshot_local(root: Path) -> dict[str, Entry]:
    """Describe every entry under *root* through the local file system (``os``).

    :returns: relative path -> :class:`Entry` (the root itself is ``"."``)
    """
    result: dict[str, Entry] = {}
    for here, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            full = Path(here) if name == "." else Path(here, name)
            rel = os.path.relpath(full, root)
            if name == "." and rel != ".":
                continue
            result[rel] = _entry(os.lstat(full), full.read_bytes, partial(os.readlink, full))
    return result


def snapshot_client(client: Client, root: str) -> dict[str, Entry]:
    """Describe every entry under *root* through a pyxen9p client.

    :param root: the directory on the share (``""``: the share's root)
    :returns: relative path -> :class:`Entry` (the root itself is ``"."``)
    """
    result: dict[str, Entry] = {}
    for here, dirs, files in client.walk(root):
        for name in [".", *dirs, *files]:
            full = here if name == "." else f"{here.rstrip('/')}/{name}"
            rel = os.path.relpath("/" + full.lstrip("/"), "/" + root.lstrip("/"))
            if name == "." and rel != ".":
                continue
            result[rel] = _entry(
                client.lstat(full), partial(client.read_bytes, full), partial(client.readlink, full)
            )
    return result


def differences(a: dict[str, Entry], b: dict[str, Entry]) -> list[str]:
    """Human-readable differences between two snapshots (empty: the same)."""
    problems = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            problems.append(f"{name}: only in {'first' if name in a else 'second'}")
        elif a[name] != b[name]:
            problems.append(f"{name}: {a[name]} != {b[name]}")
    return problems


def run_python(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python3`` with *argv* in dom0 (the guest's ``PYTHONPATH``), bounded by *timeout*."""
    started = time.monotonic()
    res = subprocess.run(
        ["python3", *argv], capture_output=True, text=True, timeout=timeout, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    res.args = [*res.args, f"({time.monotonic() - started:.1f}s)"]
    return res
