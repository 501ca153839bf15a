"""Group "teardown": what pyxen9p leaves behind on the real Xen, and a backend dying.

* Several connect/close cycles on QEMU-served devices (a new device and a
  new QEMU each time: QEMU 7.2 cannot serve a device again once its
  frontend closed): the
  XenBus states of both ends after each step, and that nothing stays held:
  pyxen9p's ``/dev/xen`` descriptors, its event channels (``/proc/interrupts``), and
  its grants (gntalloc allows 1024 grants in all: after the cycles a single
  1000-page share must still succeed).
* New devices on the same QEMU after ``close()``: one right after a closed
  one, and two open at once.
* The same device connected again after ``close()``: refused at once by
  default (QEMU untouched); with ``allow_reconnect=True`` a new handshake
  starts, QEMU 7.2 aborts on it, and pyxen9p gives a clear, bounded error
  and holds nothing.
* Dom0's QEMU killed (SIGKILL) while pyxen9p writes and reads large files:
  the callers get an :class:`OSError` within a request timeout plus a flush
  timeout, never a hang, ``close()`` returns after one bounded wait, nothing
  stays held, and a freshly started QEMU serves a new device afterwards.
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
from teardown_helpers import assert_grants_free, baseline, report, snapshot, transfers_until_killed
from xenlab import XenbusState

import pyxen9p
from pyxen9p.frontend import ReconnectRefusedError

#: QEMU serves these devices: Debian 12 only (QEMU 10 serves none, see test_qemu10.py).
RELEASES = ("bookworm",)
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


def fresh_device(
    export: Path, tag: str, retired: list[xenlab.Dom0NinePDevice]
) -> tuple[xenlab.Dom0NinePDevice, int]:
    """A new device on *export*, served by a freshly started dom0 QEMU.

    Each test starts from a QEMU of its own: dom0's QEMU 7.2 cannot have a
    served device removed (it segfaults), and it aborts when a device is
    connected a second time, so the devices the previous QEMU served are
    dropped while it is restarted.

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
    before = baseline()
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
        report(f"cycle {cycle}: connect {connect_s:.2f}s close {close_s:.2f}s")
        assert dev.frontend_state() == XenbusState.CLOSED
        assert dev.backend_state() == XenbusState.CLOSED
        assert snapshot() == before, f"cycle {cycle}"
        assert xenlab.evtchn_irqs(comm) == qemu_irqs[-2], "QEMU kept an event channel"
        assert xenlab.dom0_qemu_pid() == qemu
        fs.close()  # idempotent
    print(f"QEMU's gntdev-mapped pages: {qemu_pages}; its event channels: {qemu_irqs}")
    assert_grants_free()


def test_new_devices_on_the_same_qemu_after_close(
    export: Path, retired: list[xenlab.Dom0NinePDevice]
) -> None:
    """After ``close()`` the same QEMU serves new connections: a new device
    right after a closed one, and two devices open at once (each within half
    of gntalloc's 1024 grants), all without QEMU restarting."""
    before = baseline()
    first, qemu = fresh_device(export, "first", retired)
    with pyxen9p.connect(path=first.frontend, timeout=30) as fs:
        fs.write_bytes("one.txt", b"first device\n")
    assert first.backend_state() == XenbusState.CLOSED
    devices = []
    for tag in ("second", "third"):
        devices.append(xenlab.create_dom0_9pfs_device(export, tag=tag))
        retired.append(devices[-1])
    started = time.monotonic()
    with (
        pyxen9p.connect(path=devices[0].frontend, timeout=30, grant_limit=512) as a,
        pyxen9p.connect(path=devices[1].frontend, timeout=30, grant_limit=512) as b,
    ):
        connect_s = time.monotonic() - started
        assert a.read_bytes("one.txt") == b"first device\n"
        data = os.urandom(300_000)
        a.write_bytes("two.bin", data)
        assert b.read_bytes("two.bin") == data
        assert [dev.backend_state() for dev in devices] == [XenbusState.CONNECTED] * 2
    report(f"same QEMU after close: two new devices connected together in {connect_s:.2f}s")
    assert [dev.backend_state() for dev in devices] == [XenbusState.CLOSED] * 2
    assert xenlab.dom0_qemu_pid() == qemu
    assert snapshot() == before


def test_same_device_again_after_close(
    export: Path, retired: list[xenlab.Dom0NinePDevice]
) -> None:
    """After ``close()`` the backend is Closed.  A second ``connect()`` on the
    same device is refused at once, before anything is written, and QEMU
    keeps running; with ``allow_reconnect=True`` a new handshake starts.
    Debian 12's QEMU 7.2 then aborts (``v9fs_device_realize_common:
    Assertion `!s->transport' failed``, in its log), which is why pyxen9p
    refuses by default; pyxen9p reports the dead backend within its timeout
    and leaves nothing behind.  (A QEMU that can reconnect must serve the
    first connection's file.)"""
    baseline()
    dev, qemu = fresh_device(export, "again", retired)
    with pyxen9p.connect(path=dev.frontend, timeout=30) as fs:
        fs.write_bytes("first.txt", b"first connection\n")
    assert dev.frontend_state() == XenbusState.CLOSED
    assert dev.backend_state() == XenbusState.CLOSED
    before = snapshot()

    started = time.monotonic()
    with pytest.raises(ReconnectRefusedError, match="allow_reconnect=True") as refused:
        pyxen9p.connect(path=dev.frontend, timeout=30)
    report(f"same device, default connect refused after {time.monotonic() - started:.2f}s")
    assert "is CLOSED" in str(refused.value)
    assert dev.frontend_state() == XenbusState.CLOSED  # nothing written
    assert dev.backend_state() == XenbusState.CLOSED
    assert xenlab.dom0_qemu_pid() == qemu
    assert snapshot() == before

    log_size = xenlab.QEMU_LOG.stat().st_size if xenlab.QEMU_LOG.exists() else 0
    timeout = 15.0
    started = time.monotonic()
    try:
        again = pyxen9p.connect(path=dev.frontend, timeout=timeout, allow_reconnect=True)
    except TimeoutError as exc:
        elapsed = time.monotonic() - started
        # the backend restarted the handshake (InitWait), then never connected
        assert "did not map the rings" in str(exc) and "(it is INIT_WAIT)" in str(exc), exc
        assert elapsed < 3 * timeout + 10, "connect() was not bounded by its timeout"
        assert dev.frontend_state() == XenbusState.CLOSED
        qemu_now = xenlab.dom0_qemu_pid()
        with open(xenlab.QEMU_LOG, "rb") as log:
            log.seek(log_size)
            said = log.read().decode(errors="replace").strip()
        report(
            f"same device, allow_reconnect=True: failed after {elapsed:.1f}s: {exc};"
            f" QEMU {'gone' if qemu_now is None else f'pid {qemu_now}'}; its log: {said!r}"
        )
        assert qemu_now is None, "QEMU 7.2 survived a second connection: refuse less?"
        assert "Assertion" in said and "transport" in said, said
    else:
        with again:
            assert again.read_bytes("first.txt") == b"first connection\n"
        report("same device, allow_reconnect=True: this QEMU reconnects")
    assert snapshot() == before


def test_qemu_killed_mid_transfer(export: Path, retired: list[xenlab.Dom0NinePDevice]) -> None:
    """SIGKILL dom0's QEMU while one thread writes and one reads large files.

    Each caller gets an OSError within a request timeout plus a flush
    timeout (the client declares the session dead when not even a Tflush is
    answered, so requests in flight fail together); ``close()`` returns after
    one bounded wait for a backend that ignores Closing; nothing stays held;
    and a fresh QEMU then serves a new device to a new connection.
    """
    before = baseline()
    payload = os.urandom(8 << 20)
    (export / "big.bin").write_bytes(payload)
    request_timeout, flush_timeout, fe_timeout = 5.0, 3.0, 10.0
    slack = 20.0  # TCG on a busy machine
    dev, qemu = fresh_device(export, "killed", retired)
    fs = pyxen9p.connect(
        path=dev.frontend, timeout=fe_timeout, request_timeout=request_timeout,
        flush_timeout=flush_timeout,
    )  # fmt: skip
    try:
        assert dev.backend_state() == XenbusState.CONNECTED
        killed = transfers_until_killed(
            fs, payload, lambda: xenlab.kill_dom0_qemu(qemu),
            request_timeout + flush_timeout + slack,
        )  # fmt: skip
        killed.check(request_timeout + flush_timeout + slack, "unresponsive", "QEMU")
        with pytest.raises(OSError, match="unresponsive"):
            fs.stat("big.bin")
        # XenStore still says Connected: nobody wrote the dead backend's state
        assert dev.backend_state() == XenbusState.CONNECTED
    finally:
        started = time.monotonic()
        fs.close()
        close_s = time.monotonic() - started
    moved = killed.moved
    report(f"QEMU killed: moved before the kill {moved}; close() took {close_s:.1f}s")
    assert close_s < fe_timeout + slack, "close() waited twice for a dead backend"
    assert dev.frontend_state() == XenbusState.CLOSED
    assert snapshot() == before
    assert (export / "big.bin").read_bytes() == payload

    # a fresh QEMU (the killed one's devices dropped) serves a new device
    dev2, _ = fresh_device(export, "after-kill", retired)
    with pyxen9p.connect(path=dev2.frontend, timeout=30) as fs2:
        assert fs2.read_bytes("big.bin") == payload
        fs2.write_bytes("after.txt", b"alive\n")
    assert (export / "after.txt").read_bytes() == b"alive\n"
    assert snapshot() == before
    assert_grants_free()
