"""Real-Xen targets: a backend in dom0 the fuzzer creates devices for, or one device.

:class:`Dom0Target` runs in dom0 and attacks a backend serving dom0 itself:

* ``qemu``: dom0's own QEMU (``-xen-domid 0 -xen-attach``, started by
  Debian's ``/etc/init.d/xen``); devices go under
  ``/local/domain/0/backend/9pfs/0/<devid>`` with their frontend outside
  ``device/`` (``/local/domain/0/data/pyxen9p-fuzz/<devid>``), where the
  dom0 kernel never sees them;
* ``xen-9pfsd``: Xen's own daemon (Xen >= 4.19); devices go under
  ``backend/xen_9pfs/0/<devid>`` and ``device/9pfs/<devid>`` (it ignores the
  ``frontend`` node), so the kernel's 9pnet_xen must be kept away.

Each case gets a new device.  The backend process is found by its command
line and watched by PID (a PID gone or reused is ``backend-gone``).  After a
finding, and every *recycle* devices (QEMU 7.2 never unmaps a ring until the
device is freed, and segfaults when a device it served is removed, so used
devices stay until then), the backend is killed, the used devices' nodes
removed, and the backend started again with the command line it had, its
output appended to :data:`LOG`.

:class:`DeviceTarget` attacks one existing device chosen like the other
commands choose (a guest's ``device/9pfs/N``): each case re-initialises it;
the backend's PID can be given for the ``backend-gone`` oracle.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from pyxen9p.fuzz.case import Finding
from pyxen9p.fuzz.target import Device, Target, TargetError

__all__ = ["BACKENDS", "LOG", "DeviceTarget", "Dom0Target"]

#: Where restarted backends write their output.
LOG = Path("/var/log/xen/pyxen9p-fuzz-backend.log")
#: Backend types and their XenStore directories (under ``/local/domain/0``).
BACKENDS = {"qemu": "backend/9pfs", "xen-9pfsd": "backend/xen_9pfs"}
#: The node a running xen-9pfsd writes (one daemon serves every domain).
XEN_9PFSD_RUNNING = "/local/domain/0/libxl/xen-9pfs/state"
_FRONTEND_BASE = {
    "qemu": "/local/domain/0/data/pyxen9p-fuzz",
    "xen-9pfsd": "/local/domain/0/device/9pfs",
}


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _pids() -> list[int]:
    return sorted(int(e) for e in os.listdir("/proc") if e.isdigit())


def find_backend(kind: str) -> tuple[int, list[str]] | None:
    """The PID and command line of dom0's *kind* backend, if running."""
    for pid in _pids():
        argv = _argv(pid)
        if not argv:
            continue
        if kind == "qemu":
            if "-xen-attach" in argv and "-xen-domid" in argv:
                i = argv.index("-xen-domid") + 1
                if i < len(argv) and argv[i] == "0":
                    return pid, argv
        elif os.path.basename(argv[0]) == "xen-9pfsd":
            return pid, argv
    return None


def _tail(path: Path, since: int = 0, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(since, path.stat().st_size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _run(cmd: list[str], timeout: float = 30.0) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"[{shlex.join(cmd)} failed: {exc}]"
    return res.stdout + res.stderr


def xen_9pfsd_binary() -> str | None:
    """Where Xen installed ``xen-9pfsd`` (``/usr/lib/xen-<version>/bin``), if anywhere."""
    found = sorted(glob.glob("/usr/lib/xen-*/bin/xen-9pfsd")) or sorted(
        glob.glob("/usr/lib*/xen/bin/xen-9pfsd")
    )
    return found[-1] if found else shutil.which("xen-9pfsd")


class _RealTarget(Target):
    poll_interval = 0.02
    settle_time = 2.0
    connect_timeout = 15.0
    reply_timeout = 10.0
    close_timeout = 10.0

    def _open(self) -> None:
        from pyxen9p.libs import RealXen

        self.platform = RealXen()
        self.store = self.platform.open_xenstore()

    def _state(self, path: str) -> bytes | None:
        try:
            return self.store.read(f"{path}/state")
        except FileNotFoundError:
            return None

    def _wait_state(self, path: str, wanted: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._state(path) != wanted:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _xenstore_dump(self, path: str) -> str:
        lines = []
        try:
            for name in self.store.directory(path):
                with contextlib.suppress(OSError):
                    lines.append(f"{path}/{name} = {self.store.read(f'{path}/{name}')!r}")
        except OSError as exc:
            lines.append(f"{path}: {exc}")
        return "\n".join(lines)


class Dom0Target(_RealTarget):
    """A backend serving dom0, fed a new device per case (see the module doc).

    :param backend: ``qemu`` or ``xen-9pfsd``
    :param workdir: a directory of its own; ``export/`` in it is exported and
        its other entries are watched (``escape``)
    :param recycle: restart the backend after this many devices
    """

    def __init__(self, backend: str, workdir: str | os.PathLike[str], recycle: int = 12) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.kind = backend
        self.workdir = Path(workdir)
        self.export = self.workdir / "export"
        self.export.mkdir(parents=True, exist_ok=True)
        self.recycle = recycle
        self.backend_base = f"/local/domain/0/{BACKENDS[backend]}/0"
        self.frontend_base = _FRONTEND_BASE[backend]
        self._open()
        found = find_backend(backend)
        if found is None and backend == "xen-9pfsd":
            binary = xen_9pfsd_binary()
            if binary is not None:
                found = self._launch([binary])
        if found is None:
            self.store.close()
            raise TargetError(f"dom0's {backend} backend is not running")
        self.pid, self.argv = found
        self._used: list[Device] = []
        self._since_restart = 0
        self._log_start = LOG.stat().st_size if LOG.exists() else 0
        self._devid = 200
        self.restarts = 0

    def _free_devid(self) -> int:
        used: set[str] = set()
        for base in (self.backend_base, self.frontend_base):
            with contextlib.suppress(OSError):
                used.update(self.store.directory(base))
        while str(self._devid) in used:
            self._devid += 1
        self._devid += 1
        return self._devid - 1

    def new_device(self) -> Device:
        """A device in InitWait for the next case (see :meth:`Target.new_device`)."""
        if self.dead() is not None or self._since_restart >= self.recycle:
            self.restart()
        devid = self._free_devid()
        # a tag of its own: QEMU names the device's fsdev after its tag, and a
        # second device with a tag in use would fail (or crash) for that reason alone
        backend = f"{self.backend_base}/{devid}"
        frontend = f"{self.frontend_base}/{devid}"
        nodes = {
            f"{frontend}/backend": backend, f"{frontend}/backend-id": "0",
            f"{frontend}/tag": f"fuzz{devid}", f"{frontend}/state": "1",
            f"{backend}/frontend": frontend, f"{backend}/frontend-id": "0",
            f"{backend}/online": "1", f"{backend}/path": str(self.export),
            f"{backend}/security_model": "none", f"{backend}/state": "1",
        }  # fmt: skip
        for txn in self.store.transaction():
            with txn:
                for path, value in nodes.items():
                    txn.write(path, value)
        device = Device(frontend, backend, 0)
        self._used.append(device)
        self._since_restart += 1
        if not self._wait_state(backend, b"2", self.connect_timeout * 2):
            raise TargetError(f"{self.kind} did not take device {devid} (state"
                              f" {self._state(backend)!r})")  # fmt: skip
        return device

    def retire(self, device: Device) -> None:
        """The case is over (see :meth:`Target.retire`)."""
        pass  # removed at the next restart (QEMU 7.2 crashes if removed while it lives)

    def dead(self) -> str | None:
        """``None`` while the backend lives, else what happened to it."""
        argv = _argv(self.pid)
        if argv == self.argv:
            return None
        if not argv:
            return f"{self.kind} (pid {self.pid}) is gone"
        return f"{self.kind} (pid {self.pid}) was replaced by {shlex.join(argv)[:200]}"

    def evidence(self) -> dict[str, str]:
        """The backend's log and state, for a finding."""
        out = {"backend-log": _tail(LOG, self._log_start)}
        for path in sorted(glob.glob("/var/log/xen/qemu-dm-*.log"))[-3:]:
            out[f"log-{Path(path).name}"] = _tail(Path(path), limit=2000)
        dmesg = _run(["dmesg"]).splitlines()
        out["dmesg"] = "\n".join(line for line in dmesg if f"[{self.pid}]" in line)[-3000:]
        if shutil.which("xl"):
            out["xl-dmesg"] = "\n".join(_run(["xl", "dmesg"]).splitlines()[-30:])
        if self._used:
            last = self._used[-1]
            out["xenstore"] = (self._xenstore_dump(last.backend) + "\n"
                               + self._xenstore_dump(last.frontend))  # fmt: skip
        return out

    def signature(self, finding: Finding) -> str:
        """For a dead backend: its assertion, else its fault (``segfault at 30``)."""
        if finding.kind != "backend-gone":
            return finding.kind
        log = finding.evidence.get("backend-log", "")
        match = re.search(r"Assertion `[^']*' failed", log)
        if match:
            return match.group(0)
        match = re.search(r"(segfault at \w+)|(general protection fault)|(trap \w+)",
                          finding.evidence.get("dmesg", ""))  # fmt: skip
        if match:
            return match.group(0)
        match = re.search(r"(Aborted|Segmentation fault|terminate called[^\n]*)", log)
        return match.group(0) if match else "gone"

    def restart(self) -> None:
        """Start the backend afresh."""
        if find_backend(self.kind) == (self.pid, self.argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _argv(self.pid) == self.argv and time.monotonic() < deadline:
                time.sleep(0.05)
        for device in self._used:
            for path in (device.backend, device.frontend):
                with contextlib.suppress(FileNotFoundError):
                    self.store.rm(path)
        self._used.clear()
        self._since_restart = 0
        args = [a for a in self.argv if a != "-daemonize"]
        found = self._launch(args)
        if found is None:
            raise TargetError(f"{self.kind} did not start again: {shlex.join(args)}")
        self.pid, self.argv = found
        self.restarts += 1
        for name in os.listdir(self.workdir):
            if name != "export":
                shutil.rmtree(self.workdir / name, ignore_errors=True)

    def _launch(self, args: list[str]) -> tuple[int, list[str]] | None:
        """Start the backend in the background, its output appended to :data:`LOG`.

        xen-9pfsd exits at once if the node a killed one left says it runs:
        the node is removed first, and its ``running`` awaited.
        """
        if self.kind == "xen-9pfsd":
            with contextlib.suppress(FileNotFoundError):
                self.store.rm(XEN_9PFSD_RUNNING)
        LOG.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = LOG.stat().st_size if LOG.exists() else 0
        with LOG.open("a") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {shlex.join(args)}\n")
        subprocess.run(
            ["setsid", "sh", "-c", 'log=$1; shift; exec "$@" </dev/null >>"$log" 2>&1 &', "sh",
             str(LOG), *args], check=True, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = find_backend(self.kind)
            if found is not None and (self.kind != "xen-9pfsd" or self._running()):
                return found
            time.sleep(0.1)
        return None

    def _running(self) -> bool:
        try:
            return self.store.read(XEN_9PFSD_RUNNING) == b"running"
        except FileNotFoundError:
            return False

    def outside_export(self) -> frozenset[str]:
        """The names beside the exported directory."""
        return frozenset(n for n in os.listdir(self.workdir) if n != "export")

    def describe(self) -> dict[str, Any]:
        """JSON naming this kind of target (for reproducers)."""
        return {"kind": "dom0", "backend": self.kind}

    def close(self) -> None:
        """Release everything (idempotent)."""
        store = getattr(self, "store", None)
        if store is not None:
            store.close()


class DeviceTarget(_RealTarget):
    """One existing device (its frontend directory *path*), re-initialised per case.

    :param backend_pid: the backend's PID, for the ``backend-gone`` oracle
    """

    def __init__(self, path: str, backend_pid: int | None = None) -> None:
        self._open()
        self.path = path.rstrip("/")
        try:
            self.backend = self.store.read(f"{self.path}/backend").decode()
            self.backend_domid = int(self.store.read(f"{self.path}/backend-id"))
        except (OSError, ValueError) as exc:
            self.store.close()
            raise TargetError(f"{self.path} is not a 9pfs frontend directory: {exc}") from exc
        self.backend_pid = backend_pid
        self._argv = _argv(backend_pid) if backend_pid is not None else []

    def new_device(self) -> Device:
        """A device in InitWait for the next case (see :meth:`Target.new_device`)."""
        if self._state(self.backend) != b"2":
            self.store.write(f"{self.path}/state", "6")
            time.sleep(self.settle_time)
            self.store.write(f"{self.path}/state", "1")
            if not self._wait_state(self.backend, b"2", self.connect_timeout):
                raise TargetError(f"the backend of {self.path} does not go back to InitWait"
                                  f" (state {self._state(self.backend)!r})")  # fmt: skip
        return Device(self.path, self.backend, self.backend_domid)

    def retire(self, device: Device) -> None:
        """The case is over (see :meth:`Target.retire`)."""
        pass

    def dead(self) -> str | None:
        """``None`` while the backend lives, else what happened to it."""
        if self.backend_pid is not None and _argv(self.backend_pid) != self._argv:
            return f"backend pid {self.backend_pid} is gone"
        return None

    def evidence(self) -> dict[str, str]:
        """The backend's log and state, for a finding."""
        return {"xenstore": self._xenstore_dump(self.backend) + "\n"
                + self._xenstore_dump(self.path)}  # fmt: skip

    def restart(self) -> None:
        """Start the backend afresh."""
        pass  # not ours to restart

    def describe(self) -> dict[str, Any]:
        """JSON naming this kind of target (for reproducers)."""
        return {"kind": "device"}

    def close(self) -> None:
        """Release everything (idempotent)."""
        self.store.close()
