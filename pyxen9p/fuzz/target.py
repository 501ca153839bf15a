"""What the fuzzer attacks: a backend that hands out devices and can be watched.

A :class:`Target` gives a fresh device for each case
(:meth:`~Target.new_device`), says whether its backend died
(:meth:`~Target.dead`), lists what lies beside the exported directory
(:meth:`~Target.outside_export`), collects evidence after a finding
(:meth:`~Target.evidence`) and restarts the backend (:meth:`~Target.restart`).

:class:`SimTarget` is the simulated Xen: each device is a fresh simulated
host whose QEMU-like backend (:class:`~pyxen9p.sim.backend.Sim9pfsBackend`)
serves a directory with pyxen9p's 9P file server.  With *bugs* it becomes
:class:`BuggySimBackend`, a backend with deliberate faults, one per oracle
family, that the fuzzer must find and shrink:

``reconnect-abort``
    dies (as QEMU 7.2 aborts on ``Assertion `!s->transport' failed``) when
    a frontend connects the device a second time;
``mkdir-escape``
    a Tmkdir whose name holds ``..`` creates the directory relative to the
    export, outside it;
``stray-reply``
    answers Tclunk with another tag;
``hang``
    never answers Tstatfs.

The real-Xen targets live in :mod:`pyxen9p.fuzz.dom0`.
"""

from __future__ import annotations

import abc
import os
import re
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyxen9p.errors import Pyxen9pError
from pyxen9p.fuzz.case import Finding
from pyxen9p.interfaces import XenPlatform
from pyxen9p.ring import HEADER, HEADER_SIZE

__all__ = ["BUGS", "BuggySimBackend", "Device", "SimTarget", "Target", "TargetError"]

#: The deliberate faults of :class:`BuggySimBackend`.
BUGS = ("reconnect-abort", "mkdir-escape", "stray-reply", "hang")


class TargetError(Pyxen9pError, RuntimeError):
    """The fuzzer's target cannot give a device (the backend does not take it,
    or cannot be found or started again)."""


@dataclass(frozen=True)
class Device:
    """One 9pfs device of a target.

    :ivar frontend: the frontend's XenStore directory
    :ivar backend: the backend's XenStore directory
    :ivar backend_domid: the backend's domain
    """

    frontend: str
    backend: str
    backend_domid: int


class Target(abc.ABC):
    """A backend under test.  Timing attributes are in seconds."""

    #: what the frontend opens its handles from
    platform: XenPlatform
    #: seconds between oracle checks while waiting
    poll_interval = 0.01
    #: how long a state write waits for the backend to react
    settle_time = 0.5
    #: how long a handshake waits for Connected
    connect_timeout = 3.0
    #: how long a watched request waits for its reply
    reply_timeout = 2.0
    #: how long the backend may stay Connected after the frontend closed
    close_timeout = 3.0

    @abc.abstractmethod
    def new_device(self) -> Device:
        """A device in InitWait, for one case.

        :raises TargetError: the backend does not offer one
        """

    @abc.abstractmethod
    def retire(self, device: Device) -> None:
        """The case is over: the target may drop the device."""

    @abc.abstractmethod
    def dead(self) -> str | None:
        """``None`` while the backend lives, else what happened to it."""

    def outside_export(self) -> frozenset[str]:
        """The names beside the exported directory (empty when unknown)."""
        return frozenset()

    @abc.abstractmethod
    def evidence(self) -> dict[str, str]:
        """What helps to understand a finding: logs, states (name -> text)."""

    def signature(self, finding: Finding) -> str:
        """What tells *finding* (its evidence collected) from others of its kind.

        The default is its kind; targets that see how a backend died say more.
        """
        return finding.kind

    @abc.abstractmethod
    def restart(self) -> None:
        """Start the backend afresh (after a finding)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON that lets a reproducer build the same kind of target."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release everything (idempotent)."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- simulated

_TMKDIR, _TCLUNK, _TSTATFS = 72, 120, 8


def _buggy_handler(handler: Any, bugs: frozenset[str], export: Path) -> Any:
    def handle(request: bytes) -> bytes | None:
        if len(request) >= HEADER_SIZE:
            _size, mtype, tag = HEADER.unpack_from(request)
            if "hang" in bugs and mtype == _TSTATFS:
                return None
            if "mkdir-escape" in bugs and mtype == _TMKDIR and len(request) >= 13:
                (length,) = struct.unpack_from("<H", request, 11)
                name = request[13 : 13 + length].decode("utf-8", "replace")
                where = os.path.normpath(os.path.join(export, name))
                # the fault: ".." is honoured (but never beyond the target's own workdir)
                if ".." in name and "\x00" not in name and where.startswith(
                    str(export.parent.parent) + os.sep
                ):
                    os.makedirs(where, exist_ok=True)
            reply = handler(request)
            if "stray-reply" in bugs and mtype == _TCLUNK and reply:
                raw = bytearray(reply)
                struct.pack_into("<H", raw, 5, tag ^ 0x4000)
                return bytes(raw)
            return reply  # type: ignore[no-any-return]
        return handler(request)  # type: ignore[no-any-return]

    return handle


def _sim_classes() -> tuple[Any, Any]:
    from pyxen9p.sim.backend import Sim9pfsBackend

    class _Buggy(Sim9pfsBackend):
        """See :class:`BuggySimBackend`."""

        def __init__(self, *args: Any, bugs: frozenset[str] = frozenset(), **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.bugs = bugs
            self.crashed: str | None = None

        def _connect(self) -> None:
            if "reconnect-abort" in self.bugs and self.connections >= 1:
                self.crashed = (
                    "v9fs_device_realize_common: Assertion `!s->transport' failed"
                    " (simulated QEMU 7.2 abort)"
                )
                self._error(self.crashed)
                threading.Thread(target=self.kill, daemon=True).start()
                return
            super()._connect()

    return Sim9pfsBackend, _Buggy


def BuggySimBackend(*args: Any, bugs: frozenset[str] = frozenset(), **kw: Any) -> Any:
    """A :class:`~pyxen9p.sim.backend.Sim9pfsBackend` with the faults in *bugs*
    (see :data:`BUGS` and this module's documentation)."""
    return _sim_classes()[1](*args, bugs=bugs, **kw)


class SimTarget(Target):
    """The simulated Xen: a fresh simulated host per device.

    :param bugs: faults of the backend (:data:`BUGS`); none: a healthy backend
    :param workdir: where the export (``export/``) and its neighbours live
        (default: a temporary directory removed by :meth:`close`)
    """

    poll_interval = 0.005
    settle_time = 0.3
    connect_timeout = 2.0
    reply_timeout = 1.0
    close_timeout = 2.0

    def __init__(self, bugs: frozenset[str] | set[str] = frozenset(), workdir: str | None = None):
        unknown = set(bugs) - set(BUGS)
        if unknown:
            raise ValueError(f"unknown simulated bugs {sorted(unknown)}; known: {', '.join(BUGS)}")
        self.bugs = frozenset(bugs)
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="fuzz-")
        self.workdir = Path(workdir if workdir is not None else self._tmp.name)  # type: ignore[union-attr]
        #: served; ``workdir/jail/*`` and ``workdir/*`` are watched
        self.export = self.workdir / "jail" / "export"
        self.export.mkdir(parents=True, exist_ok=True)
        self._host: Any = None
        self._backend: Any = None
        self._server: Any = None
        self._log: list[str] = []
        self.devices = 0

    def new_device(self) -> Device:
        """A device in InitWait for the next case (see :meth:`Target.new_device`)."""
        from pyxen9p.p9.server import FileServer
        from pyxen9p.sim.platform import SimulatedXen
        from pyxen9p.sim.share import _SessionPerConnection

        self._drop()
        self._server = FileServer(self.export)
        self._host = SimulatedXen()
        guest = self._host.create_domain(1, "guest")
        handler = _buggy_handler(_SessionPerConnection(self._server), self.bugs, self.export)
        self._backend = BuggySimBackend(
            self._host.domain(0), 1, handler=handler, path=str(self.export), bugs=self.bugs,
            poll_interval=0.01, join_timeout=2.0,
        )  # fmt: skip
        self._backend.start()
        self.platform = guest
        self.devices += 1
        return Device(self._backend.frontend_path, self._backend.backend_path, 0)

    def retire(self, device: Device) -> None:
        """The case is over (see :meth:`Target.retire`)."""
        backend = self._backend
        if backend is not None:
            self._log = [*backend.errors, *backend.warnings][-50:]

    def _drop(self) -> None:
        if self._backend is not None:
            self._backend.stop()
            self._backend = None
        if self._host is not None:
            self._host.close()
            self._host = None
        if self._server is not None:
            self._server.close()
            self._server = None

    def dead(self) -> str | None:
        """``None`` while the backend lives, else what happened to it."""
        backend = self._backend
        if backend is None:
            return None
        if backend.crashed:
            return f"simulated backend died: {backend.crashed}"
        control = backend._control
        if control is not None and not control.is_alive() and not backend._stopped:
            return "simulated backend's control thread ended"
        return None

    def outside_export(self) -> frozenset[str]:
        """The names beside the exported directory."""
        jail = self.export.parent
        names = {n for n in os.listdir(self.workdir) if n != jail.name}
        names |= {f"{jail.name}/{n}" for n in os.listdir(jail) if n != self.export.name}
        return frozenset(names)

    def evidence(self) -> dict[str, str]:
        """The backend's log and state, for a finding."""
        backend = self._backend
        lines = [*backend.errors, *backend.warnings] if backend is not None else self._log
        return {"backend-log": "\n".join(lines[-50:])}

    def signature(self, finding: Finding) -> str:
        """For a dead backend: its assertion, else how it died."""
        if finding.kind == "backend-gone":
            log = finding.evidence.get("backend-log", "")
            match = re.search(r"Assertion `[^']*' failed", log)
            return match.group(0) if match else "died"
        return finding.kind

    def restart(self) -> None:
        """Start the backend afresh."""
        self._drop()
        self.clean_outside()

    def describe(self) -> dict[str, Any]:
        """JSON naming this kind of target (for reproducers)."""
        return {"kind": "sim", "bugs": sorted(self.bugs)}

    def clean_outside(self) -> None:
        """Remove what a finding left beside the export (to find it again)."""
        import shutil

        for name in self.outside_export():
            path = self.workdir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release everything (idempotent)."""
        self._drop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
