"""Set-up helpers for the real-Xen lab's guest tests (they run in dom0).

These helpers deliberately use Xen's own command-line tools (``xenstore-*``,
``xl``) rather than pyxen9p, so that they stay an independent reference for
the code under test.  Standard library only.

What they provide:

* XenStore access through ``xenstore-read/-write/-list/-rm`` (:func:`xs_read`,
  :func:`xs_write`, ...), and :func:`wait_until` for every wait;
* a 9pfs device for dom0 served by dom0's own QEMU
  (:func:`create_dom0_9pfs_device`): the backend nodes go under
  ``/local/domain/0/backend/9pfs/0/<devid>`` and the frontend nodes under a
  path of our choosing, by default outside ``device/`` so that the dom0
  kernel never sees the device and a user-space frontend can drive it;
* control of the kernel's own 9pfs frontend module (:func:`load_9pnet_xen`,
  :func:`blacklist_9pnet_xen`);
* a PV domU booted from dom0's kernel and a small busybox initramfs
  (:func:`build_initramfs`, :func:`run_pv_domu`), optionally with a
  QEMU-served 9pfs share (``p9=[...]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Where :func:`create_dom0_9pfs_device` puts frontend nodes by default:
#: outside ``device/``, so the dom0 kernel's xenbus never probes them.
DOM0_FRONTEND_BASE = "/local/domain/0/data/pyxen9p/9pfs"
#: The dom0 QEMU backend directory for frontends in domain 0.
DOM0_BACKEND_BASE = "/local/domain/0/backend/9pfs/0"
#: Console logs of guests (xenconsoled runs with ``--log=guest`` in the lab image).
CONSOLE_LOG_DIR = Path("/var/log/xen/console")
DOMU_MARK = "PYXEN9P-DOMU:"

_counter = itertools.count(1)


class XenbusState(enum.IntEnum):
    """XenBus device states (``xen/include/public/io/xenbus.h``)."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class LabError(RuntimeError):
    """A lab set-up step failed (the message says which and why)."""


# --------------------------------------------------------------------------- commands


def sh(
    cmd: Sequence[str], *, timeout: float = 60.0, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run *cmd* (no shell), capture its output, enforce *timeout*.

    :param cmd: argv
    :param timeout: seconds before the command is killed
    :param check: raise :class:`LabError` on a non-zero exit
    :param stdin: text fed to the command's standard input
    :returns: the completed process
    :raises LabError: on a non-zero exit (with *check*) or a timeout
    """
    try:
        res = subprocess.run(
            list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{shlex.join(cmd)}: timed out after {timeout:.0f}s") from exc
    if check and res.returncode != 0:
        raise LabError(
            f"{shlex.join(cmd)}: exit {res.returncode}: {(res.stderr or res.stdout).strip()}"
        )
    return res


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll *predicate* until it returns something other than ``None``/``False``.

    :param predicate: called repeatedly; its first result that is neither
        ``None`` nor ``False`` is returned (so ``0`` or ``[]`` count as results)
    :param timeout: seconds before giving up
    :param what: what is awaited (for the error message)
    :param interval: seconds between polls
    :returns: the predicate's result
    :raises TimeoutError: when *timeout* passes first
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- xenstore (CLI)


def xs_read(path: str) -> str | None:
    """Return the value of *path* (``xenstore-read -R``: raw, not escaped), or ``None``
    if it does not exist."""
    res = sh(["xenstore-read", "-R", path], check=False, timeout=30)
    if res.returncode != 0:
        return None
    return res.stdout.rstrip("\n")


def xs_write(values: Mapping[str, str | int]) -> None:
    """Write every ``path: value`` of *values* in one transaction (``xenstore-write -R``:
    values are taken verbatim, not unescaped)."""
    argv = ["xenstore-write", "-R"]
    for path, value in values.items():
        argv += [path, str(value)]
    sh(argv, timeout=30)


def xs_list(path: str) -> list[str]:
    """Return the children of *path* (``xenstore-list``); empty if it does not exist."""
    res = sh(["xenstore-list", path], check=False, timeout=30)
    return res.stdout.split() if res.returncode == 0 else []


def xs_rm(path: str) -> None:
    """Remove *path* and its subtree (``xenstore-rm``); a missing path is not an error."""
    sh(["xenstore-rm", path], check=False, timeout=30)


def xs_int(path: str) -> int | None:
    """Read *path* as an integer; ``None`` if missing or not a number."""
    value = xs_read(path)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- Xen facts


def xl_info() -> dict[str, str]:
    """Return ``xl info`` as a dict (``xen_version``, ``total_memory``, ...)."""
    info: dict[str, str] = {}
    for line in sh(["xl", "info"], timeout=60).stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def release() -> str:
    """The Debian release of this dom0 (``bookworm``, ``trixie``): from the
    harness's request (``PYXEN9P_RELEASE``), else ``/etc/os-release``."""
    name = os.environ.get("PYXEN9P_RELEASE", "")
    if name:
        return name
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.partition("=")[2].strip().strip('"')
    return "unknown"


def is_dom0() -> bool:
    """True when running in Xen's control domain (``/proc/xen/capabilities``)."""
    try:
        return "control_d" in Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False


def module_loaded(name: str) -> bool:
    """True if kernel module *name* is loaded (or built in)."""
    return Path("/sys/module", name.replace("-", "_")).exists()


def ensure_modules(*names: str) -> None:
    """``modprobe`` each module in *names* (a no-op for loaded ones).

    :raises LabError: if one cannot be loaded
    """
    for name in names:
        if not module_loaded(name):
            sh(["modprobe", name], timeout=120)


def daemon_pids(name: str) -> list[int]:
    """PIDs of processes whose command name is *name* (``/proc/*/comm``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
    return sorted(pids)


def dom0_qemu_pid() -> int | None:
    """PID of dom0's own QEMU (``-xen-domid 0 -xen-attach``), if running."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-xen-attach" in args and b"-xen-domid" in args:
            index = args.index(b"-xen-domid") + 1
            if index < len(args) and args[index] == b"0":
                _QEMU_ARGV[:] = [arg.decode() for arg in args[:-1]]
                return int(entry.name)
    return None


#: The command line dom0's QEMU was last seen with (to start it again).
_QEMU_ARGV: list[str] = []


# --------------------------------------------------------------------------- 9pfs in dom0


@dataclasses.dataclass
class Dom0NinePDevice:
    """A 9pfs device of domain 0 served by dom0's QEMU.

    :ivar devid: the device number
    :ivar tag: the mount tag (frontend ``tag`` node)
    :ivar path: the directory QEMU exports
    :ivar backend: the backend directory in XenStore
    :ivar frontend: the frontend directory in XenStore
    """

    devid: int
    tag: str
    path: str
    backend: str
    frontend: str

    def backend_state(self) -> int | None:
        """The backend's ``state`` (``None`` if missing)."""
        return xs_int(f"{self.backend}/state")

    def frontend_state(self) -> int | None:
        """The frontend's ``state`` (``None`` if missing)."""
        return xs_int(f"{self.frontend}/state")

    def wait_backend_state(self, states: Iterable[int], timeout: float = 30.0) -> int:
        """Wait until the backend state is one of *states*; return it.

        :raises TimeoutError: if it does not get there in *timeout* seconds
        """
        wanted = set(states)
        try:
            return wait_until(
                lambda: (s if (s := self.backend_state()) in wanted else None),
                timeout,
                f"backend {self.backend} state in {sorted(wanted)}",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} (now {self.backend_state()})") from None

    def backend_features(self) -> dict[str, str | None]:
        """The nodes QEMU publishes: ``versions``, ``max-rings``, ``max-ring-page-order``."""
        return {
            name: xs_read(f"{self.backend}/{name}")
            for name in ("versions", "max-rings", "max-ring-page-order")
        }

    def remove(self, timeout: float = 10.0) -> None:
        """Tear the device down: frontend Closed, then remove both directories.

        Waits up to *timeout* seconds for the backend to leave its connected
        states, then removes the nodes whatever it did.
        """
        if xs_read(self.frontend) is not None:
            xs_write({f"{self.frontend}/state": int(XenbusState.CLOSED)})
            with contextlib.suppress(TimeoutError):
                self.wait_backend_state(
                    (XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.INIT_WAIT),
                    timeout,
                )
        xs_rm(self.backend)
        xs_rm(self.frontend)


def free_devid(start: int = 100) -> int:
    """A 9pfs device number not used under dom0's backend or our frontend base."""
    used = {int(n) for n in xs_list(DOM0_BACKEND_BASE) + xs_list(DOM0_FRONTEND_BASE) if n.isdigit()}
    used |= {int(n) for n in xs_list("/local/domain/0/device/9pfs") if n.isdigit()}
    devid = start
    while devid in used:
        devid += 1
    return devid


def create_dom0_9pfs_device(
    path: str | os.PathLike[str],
    tag: str = "pyxen9p",
    *,
    devid: int | None = None,
    frontend_base: str = DOM0_FRONTEND_BASE,
    security_model: str = "none",
    wait: bool = True,
    timeout: float = 30.0,
) -> Dom0NinePDevice:
    """Create a 9pfs device for domain 0 that dom0's QEMU serves.

    Writes, in one XenStore transaction, the frontend nodes (``backend``,
    ``backend-id``, ``state``, ``tag``) under ``<frontend_base>/<devid>`` and
    the backend nodes (``frontend``, ``frontend-id``, ``online``, ``state``,
    ``path``, ``security_model``) under
    ``/local/domain/0/backend/9pfs/0/<devid>``; QEMU then publishes its
    features and goes to InitWait.  With the default *frontend_base* the dom0
    kernel never sees the device; under ``/local/domain/0/device/9pfs`` the
    kernel's 9pnet_xen takes it (load it first: :func:`load_9pnet_xen`).

    :param path: the directory to export (created if missing)
    :param tag: the mount tag
    :param devid: the device number (default: :func:`free_devid`)
    :param frontend_base: the parent of the frontend directory
    :param security_model: the backend's ``security_model``
    :param wait: wait until QEMU reaches InitWait
    :param timeout: seconds allowed for that
    :returns: the device
    :raises LabError: if dom0's QEMU is not running
    :raises TimeoutError: if QEMU does not reach InitWait in time
    """
    if dom0_qemu_pid() is None:
        raise LabError("dom0's QEMU (-xen-domid 0 -xen-attach) is not running")
    if devid is None:
        devid = free_devid()
    return _publish_dom0_device(
        path, tag, f"{DOM0_BACKEND_BASE}/{devid}", f"{frontend_base.rstrip('/')}/{devid}",
        devid, {"security_model": security_model}, wait, timeout,
    )  # fmt: skip


def _publish_dom0_device(
    path: str | os.PathLike[str],
    tag: str,
    backend: str,
    frontend: str,
    devid: int,
    backend_nodes: Mapping[str, str | int],
    wait: bool,
    timeout: float,
) -> Dom0NinePDevice:
    """Write a dom0 9pfs device's frontend and backend nodes in one
    transaction (the backend's: the toolstack's usual ones and
    *backend_nodes*), and wait for its backend's InitWait if *wait* (the
    device removed again if it does not come)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    dev = Dom0NinePDevice(devid, tag, os.fspath(path), backend, frontend)
    nodes: dict[str, str | int] = {
        f"{frontend}/backend": backend,
        f"{frontend}/backend-id": 0,
        f"{frontend}/tag": tag,
        f"{frontend}/state": int(XenbusState.INITIALISING),
        f"{backend}/frontend": frontend,
        f"{backend}/frontend-id": 0,
        f"{backend}/online": 1,
        f"{backend}/path": os.fspath(path),
        f"{backend}/security_model": "none",
        f"{backend}/state": int(XenbusState.INITIALISING),
    }
    for key, value in backend_nodes.items():
        nodes[f"{backend}/{key}"] = value
    xs_write(nodes)
    if wait:
        try:
            dev.wait_backend_state((XenbusState.INIT_WAIT,), timeout)
        except TimeoutError:
            dev.remove(timeout=1.0)
            raise
    return dev


@contextlib.contextmanager
def dom0_9pfs_device(
    path: str | os.PathLike[str], tag: str = "pyxen9p", **kwargs: object
) -> Iterator[Dom0NinePDevice]:
    """Context manager around :func:`create_dom0_9pfs_device` that removes the device."""
    dev = create_dom0_9pfs_device(path, tag, **kwargs)  # type: ignore[arg-type]
    try:
        yield dev
    finally:
        dev.remove()


def load_9pnet_xen(timeout: float = 120.0) -> None:
    """Load the kernel's Xen 9p transport before any frontend node exists for it.

    (Loading it after a ``device/9pfs`` node appeared can block ``modprobe``
    for minutes.)
    """
    if not module_loaded("9pnet_xen"):
        sh(["modprobe", "9pnet_xen"], timeout=timeout)


BLACKLIST_FILE = Path("/etc/modprobe.d/pyxen9p-no-9pnet-xen.conf")


def blacklist_9pnet_xen() -> None:
    """Keep the kernel's 9pnet_xen away from dom0's ``device/9pfs`` nodes.

    Writes a modprobe blacklist (``install 9pnet_xen /bin/false``, so even
    udev's alias load fails), makes udevd re-read its module configuration
    (it caches it), and unloads the module if it was loaded.

    :raises LabError: if the module is loaded and cannot be removed
    """
    BLACKLIST_FILE.write_text("blacklist 9pnet_xen\ninstall 9pnet_xen /bin/false\n")
    sh(["udevadm", "control", "--reload"], timeout=30)
    if module_loaded("9pnet_xen"):
        sh(["modprobe", "-r", "9pnet_xen"], timeout=60)


def unblacklist_9pnet_xen() -> None:
    """Undo :func:`blacklist_9pnet_xen` (the module is not loaded again)."""
    with contextlib.suppress(FileNotFoundError):
        BLACKLIST_FILE.unlink()
    sh(["udevadm", "control", "--reload"], timeout=30)


# --------------------------------------------------------------------------- PV domU


def kernel_version() -> str:
    """The running kernel's release (dom0's kernel also boots the PV domU)."""
    return os.uname().release


def module_files(names: Sequence[str], kver: str | None = None) -> list[Path]:
    """The ``.ko`` files to ``insmod``, in order, to load *names* with their dependencies.

    :raises LabError: if ``modprobe --show-depends`` fails
    """
    kver = kver or kernel_version()
    files: list[Path] = []
    for name in names:
        # --ignore-install: a blacklisted module (install ... /bin/false) still
        # has its files listed
        res = sh(
            ["modprobe", "--show-depends", "--ignore-install", "--set-version", kver, name],
            timeout=30,
        )
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in files:
                    files.append(path)
    return files


def _cpio_entry(name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    blob = header + name.encode() + b"\0"
    blob += b"\0" * (-len(blob) % 4)
    blob += data + b"\0" * (-len(data) % 4)
    return blob


def write_cpio(entries: Mapping[str, tuple[int, bytes]], out: Path) -> None:
    """Write a ``newc`` cpio archive (the initramfs format) to *out*.

    :param entries: archive path -> (``st_mode``, contents); for a symlink the
        contents are the target; for a device node the contents are
        ``b"major:minor"``; parents must be listed before children
    """
    blob = bytearray()
    for ino, (name, (mode, data)) in enumerate(entries.items(), start=1):
        rdev = (0, 0)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            major, minor = data.split(b":")
            rdev, data = (int(major), int(minor)), b""
        blob += _cpio_entry(name, mode, data, ino, rdev)
    blob += _cpio_entry("TRAILER!!!", 0, b"", 0, (0, 0))
    blob += b"\0" * (-len(blob) % 512)
    out.write_bytes(bytes(blob))


DOMU_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /modules/order); do insmod /modules/$m || echo "insmod $m failed"; done
echo "{mark} ready"
(
{script}
)
echo "{mark} done rc=$?"
sync
poweroff -f
"""


#: The p9 tag under which :func:`run_pv_domu` (``dom0_root=True``) exports dom0's ``/``.
DOM0_ROOT_TAG = "dom0root"

DOM0_ROOT_WRAPPER = """mkdir -p /root
mount -t 9p -o trans=xen,version=9p2000.L,ro,msize=262144 {tag} /root || exit 90
mount -t proc proc /root/proc && mount -t sysfs sysfs /root/sys || exit 91
mount -t devtmpfs devtmpfs /root/dev || exit 91
mount -t tmpfs tmpfs /root/tmp && mount -t tmpfs tmpfs /root/run || exit 92
cp /domu/script.sh /root/tmp/domu-script.sh
chroot /root /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp \\
    PYTHONDONTWRITEBYTECODE=1 /bin/sh /tmp/domu-script.sh
rc=$?
umount /root/proc/xen 2>/dev/null
umount /root/run /root/tmp /root/dev /root/sys /root/proc
umount /root
exit $rc
"""


#: The serial of the read-only disk ``tests/xen/run.py`` gives the lab VM beside
#: dom0's root: the same image, never mounted in dom0, for a domU's root
#: (:func:`domu_root_disk`).
DOMU_ROOT_DISK_SERIAL = "pyxen9p-domu-root"

DOMU_DISK_ROOT_WRAPPER = """mkdir -p /root
i=0
until [ -b /dev/xvda ]; do
    i=$((i+1)); [ $i -lt 600 ] || { echo "no /dev/xvda"; exit 89; }; sleep 0.1
done
mount -t ext4 -o ro,noload /dev/xvda /root || exit 90
mount -t proc proc /root/proc && mount -t sysfs sysfs /root/sys || exit 91
mount -t devtmpfs devtmpfs /root/dev || exit 91
mount -t tmpfs tmpfs /root/tmp && mount -t tmpfs tmpfs /root/run || exit 92
cp -r /domu /root/tmp/domu || exit 93
chroot /root /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp \\
    PYTHONDONTWRITEBYTECODE=1 /bin/sh /tmp/domu/script.sh
rc=$?
umount /root/run /root/tmp /root/dev /root/sys /root/proc
umount /root
exit $rc
"""
#: Modules the domU loads for :data:`DOMU_DISK_ROOT_WRAPPER` (ext4 checks its
#: metadata with crc32c, asked of the crypto API: the generic one is loaded
#: first, as there is no udev or modprobe in the initramfs).
DOMU_DISK_ROOT_MODULES = ("xen-blkfront", "crc32c_generic", "ext4")


def domu_root_disk() -> str:
    """dom0's name of the read-only disk for a domU's root (``/dev/vdb``), found by
    its serial :data:`DOMU_ROOT_DISK_SERIAL`.

    :raises LabError: if the VM has no such disk, or dom0 mounted it
    """
    for node in sorted(Path("/sys/block").glob("*/serial")):
        with contextlib.suppress(OSError):
            if node.read_text().strip() == DOMU_ROOT_DISK_SERIAL:
                dev = f"/dev/{node.parent.name}"
                mounts = Path("/proc/mounts").read_text().split()
                if dev in mounts:
                    raise LabError(f"{dev} (the domU root disk) is mounted in dom0")
                return dev
    raise LabError(
        f"no disk with serial {DOMU_ROOT_DISK_SERIAL!r} (tests/xen/run.py gives the VM one)"
    )


def project_files(src: str | os.PathLike[str], prefix: str = "domu/src") -> dict[str, bytes]:
    """The ``pyxen9p`` package of the project tree *src* (its ``.py`` files and
    ``py.typed``), as initramfs files under *prefix*."""
    root = Path(src)
    files: dict[str, bytes] = {}
    for path in sorted((root / "pyxen9p").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and (
            path.suffix == ".py" or path.name == "py.typed"
        ):
            files[f"{prefix}/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    return files


def build_initramfs(
    out: Path,
    script: str,
    *,
    modules: Sequence[str] = ("9pnet_xen", "9p"),
    files: Mapping[str, bytes] | None = None,
    kver: str | None = None,
) -> Path:
    """Build a busybox initramfs whose ``/init`` runs *script*, then powers off.

    :param out: the archive to write
    :param script: shell (busybox ``sh``) run after the modules are loaded;
        its exit status is printed as ``PYXEN9P-DOMU: done rc=N``
    :param modules: kernel modules (with dependencies) loaded first, from
        dom0's ``/lib/modules/<kver>``
    :param files: extra files, archive path -> contents
    :param kver: kernel release of the modules (default: the running one)
    :returns: *out*
    :raises LabError: if busybox or a module is missing
    """
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).is_file():
        raise LabError("busybox is not installed (busybox-static)")
    entries: dict[str, tuple[int, bytes]] = {}
    for directory in ("bin", "dev", "proc", "sys", "tmp", "mnt", "modules"):
        entries[directory] = (stat.S_IFDIR | 0o755, b"")
    entries["dev/console"] = (stat.S_IFCHR | 0o600, b"5:1")  # init's stdio, before devtmpfs
    entries["bin/busybox"] = (stat.S_IFREG | 0o755, Path(busybox).read_bytes())
    entries["bin/sh"] = (stat.S_IFLNK | 0o777, b"busybox")
    order = []
    for path in module_files(modules, kver):
        data = path.read_bytes()
        name = path.name
        if name.endswith(".xz"):
            data = sh_bytes(["xz", "-dc", str(path)])
            name = name[:-3]
        elif name.endswith(".zst"):
            data = sh_bytes(["zstd", "-dc", str(path)])
            name = name[:-4]
        entries[f"modules/{name}"] = (stat.S_IFREG | 0o644, data)
        order.append(name)
    entries["modules/order"] = (stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode())
    for name, data in (files or {}).items():
        parts = Path(name.lstrip("/")).parts
        for depth in range(1, len(parts)):
            entries.setdefault("/".join(parts[:depth]), (stat.S_IFDIR | 0o755, b""))
        entries["/".join(parts)] = (stat.S_IFREG | 0o755, data)
    init = DOMU_INIT.format(mark=DOMU_MARK, script=script)
    entries["init"] = (stat.S_IFREG | 0o755, init.encode())
    write_cpio(entries, out)
    return out


def sh_bytes(cmd: Sequence[str], timeout: float = 60.0) -> bytes:
    """Run *cmd* and return its standard output as bytes.

    :raises LabError: on failure
    """
    try:
        res = subprocess.run(list(cmd), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{shlex.join(cmd)}: timed out") from exc
    if res.returncode != 0:
        raise LabError(f"{shlex.join(cmd)}: exit {res.returncode}: {res.stderr.decode()!r}")
    return res.stdout


@dataclasses.dataclass
class DomUResult:
    """What a PV domU run printed and how it ended.

    :ivar name: the domain name
    :ivar console: everything it printed on its console
    :ivar rc: the exit status of the script (``None`` if it never finished)
    :ivar seconds: from ``xl create`` until the domain was gone
    """

    name: str
    console: str
    rc: int | None
    seconds: float

    @property
    def output(self) -> str:
        """The console lines between the ``ready`` and ``done`` markers."""
        lines = self.console.replace("\r", "").splitlines()
        start = next((i for i, line in enumerate(lines) if f"{DOMU_MARK} ready" in line), None)
        if start is None:
            return ""
        body = []
        for line in lines[start + 1 :]:
            if f"{DOMU_MARK} done" in line:
                break
            body.append(line)
        return "\n".join(body)


def domain_exists(name: str) -> bool:
    """True if a domain called *name* exists (``xl domid``)."""
    return sh(["xl", "domid", name], check=False, timeout=30).returncode == 0


def xl_create(cfg: Path, log: Path, *, paused: bool = False, timeout: float = 120.0) -> None:
    """``xl create [-p] CFG``, its output going to the file *log*, not to pipes.

    The daemons libxl starts for a domain inherit xl's standard output and
    error (``xen-9pfsd`` for a ``type=xen_9pfsd`` share): with pipes, the
    wait for their end would last as long as the daemon.

    :raises LabError: on a non-zero exit (with xl's messages) or a timeout
    """
    argv = ["xl", "create", *(["-p"] if paused else []), str(cfg)]
    with log.open("w+") as out:
        try:
            res = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{shlex.join(argv)}: timed out after {timeout:.0f}s") from exc
        if res.returncode != 0:
            out.seek(0)
            raise LabError(f"{shlex.join(argv)}: exit {res.returncode}: {out.read().strip()}")


def run_pv_domu(
    script: str,
    *,
    p9: Sequence[str] = (),
    name: str | None = None,
    memory_mb: int = 256,
    modules: Sequence[str] = ("9pnet_xen", "9p"),
    timeout: float = 120.0,
    extra_cmdline: str = "",
    extra_config: Mapping[str, str] | None = None,
    dom0_root: bool = False,
    root_disk: bool = False,
    files: Mapping[str, bytes] | None = None,
    on_created: Callable[[str], object] | None = None,
) -> DomUResult:
    """Boot a PV domU running *script* in a busybox initramfs; wait until it is gone.

    The domU boots dom0's own kernel.  Its console is read from xenconsoled's
    guest log.  The domain is destroyed if it has not powered off after
    *timeout* seconds.

    :param script: busybox shell run in the domU (see :func:`build_initramfs`)
    :param p9: ``p9=[...]`` entries of the domain, e.g.
        ``"tag=share,security_model=none,path=/srv/share"``
    :param name: domain name (default: a unique ``pyxen9p-N-PID``)
    :param memory_mb: the domU's memory
    :param modules: modules loaded in the domU before *script*
    :param timeout: seconds allowed from creation to the domain's end
    :param extra_cmdline: appended to the domU kernel command line
    :param extra_config: more ``key = value`` lines for the xl config (values
        are written verbatim)
    :param dom0_root: run *script* (with ``/bin/sh``) chrooted into dom0's
        root filesystem, mounted read-only in the domU over a QEMU-served
        9pfs share (tag :data:`DOM0_ROOT_TAG`), with fresh ``/proc``,
        ``/sys``, ``/dev``, ``/tmp`` and ``/run``: dom0's Python, tools,
        kernel modules and the shared project tree are then usable in the
        domU (give it 512 MiB)
    :param root_disk: the same, without 9pfs: dom0's root filesystem as the
        image holds it (not as dom0 changed it since) comes from the VM's
        read-only disk (:func:`domu_root_disk`), which the domU gets from
        blkback as ``xvda`` and mounts read-only; *files* are copied to
        ``/tmp/domu`` in it (*script* runs from there); the domU's kernel
        needs no 9pfs driver for it
    :param files: extra initramfs files, archive path -> contents
    :returns: the console output and the script's status
    :raises LabError: if ``xl create`` fails
    :raises TimeoutError: if the domain had to be destroyed
    """
    name = name or f"pyxen9p-{next(_counter)}-{os.getpid()}"
    kver = kernel_version()
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    try:
        files = dict(files or {})
        config_disk = ""
        if dom0_root and root_disk:
            raise ValueError("dom0_root and root_disk exclude each other")
        if root_disk:
            disk = domu_root_disk()
            ensure_modules("xen-blkback")
            files["domu/script.sh"] = script.encode()
            script = DOMU_DISK_ROOT_WRAPPER
            extra = [m for m in modules if m not in DOMU_DISK_ROOT_MODULES]
            modules = [*DOMU_DISK_ROOT_MODULES, *extra]
            config_disk = f'["format=raw,vdev=xvda,access=ro,target={disk}"]'
        if dom0_root:
            files["domu/script.sh"] = script.encode()
            script = DOM0_ROOT_WRAPPER.format(tag=DOM0_ROOT_TAG)
            p9 = [*p9, f"tag={DOM0_ROOT_TAG},security_model=none,path=/"]
        initrd = build_initramfs(
            work / "initrd.cpio", script, modules=modules, kver=kver, files=files
        )
        config = {
            "type": '"pv"',
            "name": f'"{name}"',
            "kernel": f'"/boot/vmlinuz-{kver}"',
            "ramdisk": f'"{initrd}"',
            "extra": f'"console=hvc0 rdinit=/init loglevel=4 {extra_cmdline}"',
            "memory": str(memory_mb),
            "vcpus": "1",
            "on_poweroff": '"destroy"',
            "on_crash": '"destroy"',
            "on_reboot": '"destroy"',
        }
        if config_disk:
            config["disk"] = config_disk
        if p9:
            config["p9"] = "[" + ", ".join(f'"{entry}"' for entry in p9) + "]"
        config.update(extra_config or {})
        cfg = work / "domu.cfg"
        cfg.write_text("".join(f"{key} = {value}\n" for key, value in config.items()))
        console_log = CONSOLE_LOG_DIR / f"guest-{name}.log"
        with contextlib.suppress(FileNotFoundError):
            console_log.unlink()
        started = time.monotonic()
        if on_created is None:
            xl_create(cfg, work / "xl-create.log", timeout=min(timeout, 120.0))
        else:
            xl_create(cfg, work / "xl-create.log", paused=True, timeout=min(timeout, 120.0))
            on_created(name)
            sh(["xl", "unpause", name], timeout=60)
        try:
            wait_until(
                lambda: not domain_exists(name), timeout, f"domU {name} to power off", 0.5
            )
        except TimeoutError:
            sh(["xl", "destroy", name], check=False, timeout=60)
            console = console_log.read_text(errors="replace") if console_log.exists() else ""
            raise TimeoutError(
                f"domU {name} still running after {timeout:.0f}s; console:\n{console[-3000:]}"
            ) from None
        seconds = time.monotonic() - started
        time.sleep(0.3)  # let xenconsoled write the last bytes
        console = console_log.read_text(errors="replace") if console_log.exists() else ""
        rc = None
        for line in console.splitlines():
            if f"{DOMU_MARK} done rc=" in line:
                with contextlib.suppress(ValueError):
                    rc = int(line.rsplit("rc=", 1)[1].strip())
        return DomUResult(name, console, rc, seconds)
    finally:
        if domain_exists(name):
            sh(["xl", "destroy", name], check=False, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- resources


def gntdev_mapped_pages(pid: int) -> int:
    """Pages that process *pid* maps through ``/dev/xen/gntdev`` (grants of other
    domains or of dom0 itself), from ``/proc/<pid>/maps``.

    :raises FileNotFoundError: if the process does not exist
    """
    pages = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.rstrip().endswith("/dev/xen/gntdev"):
            start, _, end = line.split()[0].partition("-")
            pages += (int(end, 16) - int(start, 16)) // 4096
    return pages


def evtchn_irqs(owner: str) -> int:
    """Interrupt lines in ``/proc/interrupts`` bound through ``/dev/xen/evtchn``
    by processes whose name starts with *owner* (``evtchn:<name>``)."""
    text = Path("/proc/interrupts").read_text()
    return sum(1 for line in text.splitlines() if f"evtchn:{owner}" in line)


def open_xen_fds(pid: int | str = "self") -> list[str]:
    """The ``/dev/xen/*`` files process *pid* holds open."""
    found = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(entry)
            if target.startswith("/dev/xen/"):
                found.append(target)
    return sorted(found)


#: gntalloc's system-wide limit of grants (a module parameter root may change).
GNTALLOC_LIMIT = Path("/sys/module/xen_gntalloc/parameters/limit")


@contextlib.contextmanager
def gntalloc_limit(limit: int) -> Iterator[None]:
    """gntalloc's limit set to *limit* for the ``with`` block, then restored."""
    ensure_modules("xen-gntalloc")
    old = GNTALLOC_LIMIT.read_text().strip()
    GNTALLOC_LIMIT.write_text(f"{limit}\n")
    try:
        yield
    finally:
        GNTALLOC_LIMIT.write_text(f"{old}\n")


def process_argv(pid: int) -> list[str]:
    """The command line of process *pid*."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [arg.decode() for arg in raw.split(b"\0")[:-1]]


def kill_dom0_qemu(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL dom0's QEMU *pid* and wait until it is gone.

    :raises TimeoutError: if it is still there after *timeout* seconds
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout, f"QEMU {pid} to exit")


#: Where the dom0 QEMUs started by :func:`start_dom0_qemu` write their messages
#: (``/etc/init.d/xen``'s ``-daemonize`` sends them to ``/dev/null``).
QEMU_LOG = Path("/var/log/xen/qemu-dom0-pyxen9p.log")


def start_dom0_qemu(argv: Sequence[str], timeout: float = 60.0) -> int:
    """Start dom0's QEMU again with *argv* and return its new PID once it runs.

    It runs in the background as ``/etc/init.d/xen`` starts it, but without
    ``-daemonize``, so that its messages (a failed grant mapping, a backend
    that cannot connect) are appended to :data:`QEMU_LOG`; a shell in
    between exits at once, so the QEMU is not this process's child.

    :raises LabError: if it does not start
    """
    args = [arg for arg in argv if arg != "-daemonize"]
    QEMU_LOG.parent.mkdir(parents=True, exist_ok=True)
    with QEMU_LOG.open("a") as log:
        log.write(f"=== {time.strftime('%H:%M:%S')} {shlex.join(args)}\n")
    sh(
        ["setsid", "sh", "-c", 'log=$1; shift; exec "$@" </dev/null >>"$log" 2>&1 &', "sh",
         str(QEMU_LOG), *args],
        timeout=timeout,
    )  # fmt: skip
    return wait_until(dom0_qemu_pid, timeout, "dom0's QEMU to run")


def restart_dom0_qemu(drop: Iterable[Dom0NinePDevice] = (), timeout: float = 60.0) -> int:
    """Restart dom0's QEMU, removing the nodes of the devices in *drop* meanwhile.

    Debian's QEMU 7.2 cannot have a 9pfs device removed once a frontend
    connected to it: ``xen_9pfs_free`` then dereferences a NULL grant handle
    and QEMU segfaults (fixed upstream in QEMU 8.0 by "9pfs/xen: Fix segfault
    on shutdown").  Nor does it unmap a ring when the frontend disconnects,
    only in that free.  Such devices are therefore left in place (Closed)
    until this function kills QEMU (SIGKILL: the kernel then unmaps every
    grant it held), removes their nodes, and starts QEMU again with the
    command line it had (``/etc/init.d/xen`` starts it daemonized); a new
    QEMU only takes backends in state Initialising, so stale ones must go.

    If QEMU is already gone (it crashed), it is started with the command
    line it was last seen with.

    :returns: the new QEMU's PID
    :raises LabError: if QEMU was never seen, or cannot be started again
    """
    pid = dom0_qemu_pid()
    argv = list(_QEMU_ARGV)
    if not argv:
        raise LabError("dom0's QEMU (-xen-domid 0 -xen-attach) was never seen running")
    if pid is not None:
        kill_dom0_qemu(pid, timeout)
    for dev in drop:
        xs_rm(dev.backend)
        xs_rm(dev.frontend)
    return start_dom0_qemu(argv, timeout)


def _request() -> dict[str, Any]:
    """The harness's ``request.json`` (empty outside the harness)."""
    results = os.environ.get("PYXEN9P_RESULTS")
    if not results:
        return {}
    try:
        request = json.loads((Path(results) / "request.json").read_text())
    except (OSError, ValueError):
        return {}
    return request if isinstance(request, dict) else {}


def bench_requested() -> bool:
    """Whether the harness was run with ``--bench`` (its ``request.json`` says so)."""
    return bool(_request().get("bench"))


def bench_args() -> list[str]:
    """The harness's ``--bench-args``: more options for ``bench_realxen.py``."""
    args = _request().get("bench_args") or []
    return [str(arg) for arg in args] if isinstance(args, list) else []


# --------------------------------------------------------------------------- xen-9pfsd

#: Where Debian 13 installs Xen's own 9pfs backend daemon (Xen 4.19 and later).
XEN_9PFSD_GLOB = "/usr/lib/xen-*/bin/xen-9pfsd"
#: xen-9pfsd's backend directory for frontends in domain 0.
XEN_9PFSD_BACKEND_BASE = "/local/domain/0/backend/xen_9pfs/0"
#: xen-9pfsd ignores the backend's ``frontend`` node: a frontend of domain 0
#: must be here (with 9pnet_xen blacklisted, see :func:`blacklist_9pnet_xen`).
XEN_9PFSD_FRONTEND_BASE = "/local/domain/0/device/9pfs"
#: The node xen-9pfsd writes when it runs (one daemon serves every domain).
XEN_9PFSD_RUNNING = "/local/domain/0/libxl/xen-9pfs/state"


def xen_9pfsd_binary() -> Path:
    """The installed ``xen-9pfsd``.

    :raises LabError: if there is none (Xen older than 4.19)
    """
    found = sorted(Path("/").glob(XEN_9PFSD_GLOB.lstrip("/")))
    if not found:
        raise LabError(f"no xen-9pfsd ({XEN_9PFSD_GLOB})")
    return found[-1]


def ensure_xen_9pfsd(timeout: float = 30.0) -> int:
    """Start ``xen-9pfsd`` unless it runs already; return its pid.

    It runs in the foreground and has no options: started detached, as
    libxl does (``setsid``, no terminal).

    :raises LabError: if it does not start
    """
    pids = daemon_pids("xen-9pfsd")
    if pids and xs_read(XEN_9PFSD_RUNNING) is not None:
        return pids[0]
    if not pids:  # a killed daemon leaves its node: a new one would exit at once
        xs_rm(XEN_9PFSD_RUNNING)
    # detached from this process (reparented to init, reaped there when it dies)
    sh(["sh", "-c", f"setsid {shlex.quote(str(xen_9pfsd_binary()))} </dev/null >/dev/null 2>&1 &"])
    wait_until(
        lambda: xs_read(XEN_9PFSD_RUNNING) == "running" and daemon_pids("xen-9pfsd"),
        timeout,
        "xen-9pfsd to start",
    )
    return daemon_pids("xen-9pfsd")[0]


def free_xen_9pfsd_devid(start: int = 700) -> int:
    """A device number free under xen-9pfsd's dom0 backend and dom0's ``device/9pfs``."""
    used = {
        int(n)
        for n in xs_list(XEN_9PFSD_BACKEND_BASE) + xs_list(XEN_9PFSD_FRONTEND_BASE)
        if n.isdigit()
    }
    devid = start
    while devid in used:
        devid += 1
    return devid


def create_xen_9pfsd_device(
    path: str | os.PathLike[str],
    tag: str = "pyxen9p",
    *,
    devid: int | None = None,
    extra: Mapping[str, str | int] | None = None,
    wait: bool = True,
    timeout: float = 30.0,
) -> Dom0NinePDevice:
    """A 9pfs device of domain 0 that xen-9pfsd serves (it must run: :func:`ensure_xen_9pfsd`).

    One transaction writes the frontend nodes under
    ``/local/domain/0/device/9pfs/<devid>`` (``backend``, ``backend-id``,
    ``state``, ``tag``) and the backend nodes under
    ``/local/domain/0/backend/xen_9pfs/0/<devid>`` (``frontend``,
    ``frontend-id``, ``online``, ``state``, ``path``, ``security_model``, and
    *extra*: ``max-open-files``...); xen-9pfsd publishes its features and
    goes to InitWait.  Blacklist 9pnet_xen first (:func:`blacklist_9pnet_xen`).

    :param path: the directory to export (created if missing; absolute, no
        trailing ``/``, as xen-9pfsd requires)
    :raises TimeoutError: if xen-9pfsd does not reach InitWait in time
    """
    if devid is None:
        devid = free_xen_9pfsd_devid()
    return _publish_dom0_device(
        path, tag, f"{XEN_9PFSD_BACKEND_BASE}/{devid}", f"{XEN_9PFSD_FRONTEND_BASE}/{devid}",
        devid, extra or {}, wait, timeout,
    )  # fmt: skip


@contextlib.contextmanager
def xen_9pfsd_device(
    path: str | os.PathLike[str], tag: str = "pyxen9p", **kwargs: object
) -> Iterator[Dom0NinePDevice]:
    """Context manager around :func:`create_xen_9pfsd_device` that removes the device."""
    dev = create_xen_9pfsd_device(path, tag, **kwargs)  # type: ignore[arg-type]
    try:
        yield dev
    finally:
        dev.remove()
