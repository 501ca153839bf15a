"""Group "qemu10": what Debian 13's QEMU 10 does with Xen 9pfs devices.

On Debian 13 as packaged, QEMU 10's Xen 9pfs backend serves no device (see
``docs/compatibility.rst``): dom0's QEMU (``-xen-attach -M xenpv``) leaves a
hand-written dom0 device in Initialising, so pyxen9p's frontend times out
waiting for the backend's features; and the device model libxl starts for a
PV domU with ``p9=['type=qemu,...']`` fails at once (its log:
``declining to handle console type 'xenconsoled'``, ``Device 'xen-backend'
does not support hotplugging``), so the domU kernel's ``trans=xen`` mount
finds no connected channel.

These tests stand in for the client suite on QEMU 10: they pass while QEMU
cannot serve, and fail the day a Debian update makes it serve (then the
client suite should run there, as on Debian 12).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import xenlab
from xenlab import XenbusState

from pyxen9p.frontend import Frontend

RELEASES = ("trixie",)
pytestmark = pytest.mark.realxen

#: Seconds a backend is given to publish its features (QEMU 7.2 needs < 1 s).
GRACE = 20.0


def record(name: str, value: object) -> None:
    """Keep a finding in the results folder (``qemu10-<name>.json``)."""
    out = Path(os.environ.get("PYXEN9P_RESULTS", "/tmp")) / f"qemu10-{name}.json"
    out.write_text(json.dumps(value, indent=2) + "\n")


def test_dom0_qemu_10_does_not_serve_a_dom0_9pfs_device(share_dir: Path) -> None:
    qemu = xenlab.dom0_qemu_pid()
    assert qemu is not None, "dom0's QEMU (-xen-domid 0 -xen-attach) is not running"
    dev = xenlab.create_dom0_9pfs_device(share_dir, tag="qemu10", wait=False)
    try:
        deadline = time.monotonic() + GRACE
        states = set()
        while time.monotonic() < deadline:
            states.add(dev.backend_state())
            time.sleep(0.5)
        assert states == {XenbusState.INITIALISING}, (
            f"QEMU 10 moved the device through {states}: it may serve now;"
            " run the client suite on it"
        )
        assert xenlab.xs_read(f"{dev.backend}/versions") is None
        # pyxen9p says so: no features are ever published
        with pytest.raises(TimeoutError, match="has not published its features"):
            Frontend.connect(path=dev.frontend, timeout=5.0)
    finally:
        dev.remove(timeout=2.0)
        # what became of dom0's QEMU (it was seen to exit, logging nothing):
        # kept with the results
        log = Path("/var/log/xen/qemu-dm-dom0.log")
        record(
            "dom0-qemu",
            {
                "pid_before": qemu,
                "pid_after": xenlab.dom0_qemu_pid(),
                "log": log.read_text(errors="replace")[-3000:] if log.is_file() else None,
            },
        )


@pytest.mark.slow
def test_qemu_10_device_model_for_a_domu_fails(share_dir: Path) -> None:
    (share_dir / "hello.txt").write_text("hello\n")
    name = f"pyxen9p-qemu10-{share_dir.name}"
    log = Path(f"/var/log/xen/qemu-dm-{name}.log")
    try:
        result = xenlab.run_pv_domu(
            "mkdir -p /tmp/share\n"
            "if mount -t 9p -o trans=xen,version=9p2000.L share /tmp/share; then\n"
            "  echo MOUNTED; cat /tmp/share/hello.txt; umount /tmp/share\n"
            "else\n"
            "  echo MOUNT-FAILED\n"
            "fi\n",
            name=name,
            p9=[f"type=qemu,tag=share,security_model=none,path={share_dir}"],
            timeout=90,
        )
        created, console, finished = True, result.output, True
    except xenlab.LabError as exc:  # xl create itself may give up
        created, console, finished = False, str(exc), False
    except TimeoutError as exc:  # seen once: the domU never got to print anything
        created, console, finished = True, str(exc), False
    text = log.read_text(errors="replace") if log.is_file() else ""
    record(
        "domu",
        {"created": created, "finished": finished, "console": console[-2000:], "log": text[-3000:]},
    )
    assert "MOUNTED" not in console, "QEMU 10 served the domU's share: run the client suite on it"
    if finished:
        assert "MOUNT-FAILED" in console, console
    assert "does not support hotplugging" in text or "declining to handle console type" in text, (
        f"created={created}; console: {console[-2000:]}; {log}: {text[-2000:]}"
    )
