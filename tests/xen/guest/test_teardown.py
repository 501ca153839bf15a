"""Group "teardown": what pyxen9p leaves behind on the real Xen, and a backend dying.

* Several connect/close cycles on QEMU-served devices (a new device each
  time: QEMU 7.2 cannot serve a device again once its frontend closed): the
  XenBus states of both ends after each step, and that nothing stays held:
  pyxen9p's ``/dev/xen`` descriptors, its event channels (``/proc/interrupts``), and
  its grants (gntalloc allows 1024 grants in all: after the cycles a single
  1000-page share must still succeed).
* Dom0's QEMU killed (SIGKILL) while pyxen9p writes and reads large files:
  the callers get an :class:`OSError` (a timeout or a transport error)
  within a bounded number of request timeouts, never a hang, and
  ``close()`` returns in bounded time.  QEMU is started again afterwards
  with its own command line, and a new device is served and used, so the
  tests after this one are not affected (this group also runs last: groups run in name order).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xenlab
from xenlab import XenbusState

import pyxen9p
from pyxen9p.libs import GrantSharer

pytestmark = pytest.mark.realxen

EXPORT_BASE = Path("/srv/share/teardown")


@pytest.fixture
def export() -> Iterator[Path]:
    """A fresh exported directory, removed afterwards."""
    EXPORT_BASE.mkdir(parents=True, exist_ok=True)
    path = EXPORT_BASE / f"e{os.getpid()}-{len(list(EXPORT_BASE.iterdir()))}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def retired() -> Iterator[list[xenlab.Dom0NinePDevice]]:
    """Devices a frontend connected to.  QEMU 7.2 segfaults if they are removed
    (see :func:`xenlab.restart_dom0_qemu`): at the end of the module, QEMU is
    restarted without them if they are still there."""
    devices: list[xenlab.Dom0NinePDevice] = []
    yield devices
    if any(xenlab.xs_read(dev.backend) is not None for dev in devices):
        xenlab.restart_dom0_qemu(devices)


def snapshot() -> dict[str, object]:
    """What pyxen9p (this process) holds of Xen: descriptors and event channels."""
    return {
        "xen_fds": xenlab.open_xen_fds(),
        "evtchn_irqs": xenlab.evtchn_irqs("python3"),
    }


def fresh_device(
    export: Path, tag: str, retired: list[xenlab.Dom0NinePDevice]
) -> tuple[xenlab.Dom0NinePDevice, int]:
    """A new device on *export*, served by a freshly started dom0 QEMU.

    Dom0's QEMU 7.2 served only the first connection after it started in
    these tests (a device whose frontend closed cannot be connected again,
    and a new device after that stayed in InitWait), so each connection
    gets a new QEMU; the devices it served are dropped meanwhile.

    :returns: the device and the QEMU's PID
    """
    qemu = xenlab.restart_dom0_qemu(retired)
    retired.clear()
    dev = xenlab.create_dom0_9pfs_device(export, tag=tag)
    retired.append(dev)
    return dev, qemu


def test_connect_close_cycles_leave_nothing(
    export: Path, retired: list[xenlab.Dom0NinePDevice]
) -> None:
    with GrantSharer() as warm, warm.share_pages(0, 1):
        pass
    before = snapshot()
    qemu_pages = []
    qemu_irqs = []
    for cycle in range(4):
        dev, qemu = fresh_device(export, f"cycle{cycle}", retired)
        comm = Path(f"/proc/{qemu}/comm").read_text().strip()
        qemu_irqs.append(xenlab.evtchn_irqs(comm))
        assert dev.backend_state() == XenbusState.INIT_WAIT
        started = time.monotonic()
        fs = pyxen9p.connect(path=dev.frontend, timeout=30)
        connect_s = time.monotonic() - started
        try:
            assert dev.frontend_state() == XenbusState.CONNECTED
            assert dev.backend_state() == XenbusState.CONNECTED
            held = snapshot()
            assert held["evtchn_irqs"] == before["evtchn_irqs"] + 2  # type: ignore[operator]
            assert len(held["xen_fds"]) > len(before["xen_fds"])  # type: ignore[arg-type]
            data = os.urandom(200_000 + cycle)
            fs.write_bytes(f"c{cycle}.bin", data)
            assert hashlib.sha256((export / f"c{cycle}.bin").read_bytes()).digest() == (
                hashlib.sha256(data).digest()
            )
            assert fs.read_bytes(f"c{cycle}.bin") == data
            assert sorted(fs.listdir("")) == [f"c{i}.bin" for i in range(cycle + 1)]
            qemu_pages.append(xenlab.gntdev_mapped_pages(qemu))
            qemu_irqs.append(xenlab.evtchn_irqs(comm))
        finally:
            started = time.monotonic()
            fs.close()
            close_s = time.monotonic() - started
        print(f"cycle {cycle}: connect {connect_s:.2f}s close {close_s:.2f}s")
        assert dev.frontend_state() == XenbusState.CLOSED
        assert dev.backend_state() == XenbusState.CLOSED
        assert snapshot() == before, f"cycle {cycle}"
        assert xenlab.evtchn_irqs(comm) == qemu_irqs[-2], "QEMU kept an event channel"
        assert xenlab.dom0_qemu_pid() == qemu
        fs.close()  # idempotent
    print(f"QEMU's gntdev-mapped pages: {qemu_pages}; its event channels: {qemu_irqs}")
    # every grant pyxen9p shared is free again: almost all of gntalloc's 1024 fit
    with GrantSharer() as sharer, sharer.share_pages(0, 1000) as pages:
        assert len(pages.refs) == 1000
