"""Fixtures shared by the real-Xen guest tests (run in dom0 by ``entry.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import xenlab


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the tests marked ``release(...)`` for another release.

    ``tests/xen/run.py`` counts the tests of a group the same way (statically),
    so a deselected test is not missed.
    """
    release = xenlab.release()
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("release")
        (drop if marker is not None and release not in marker.args else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def _in_dom0() -> None:
    """Every guest test needs Xen's control domain: fail (never skip) elsewhere."""
    if not xenlab.is_dom0():
        pytest.fail("the real-Xen guest tests run only in dom0 (use tests/xen/run.py)")


@pytest.fixture
def share_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh directory under ``/srv/share`` for a 9pfs backend to export."""
    base = Path("/srv/share")
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"t{os.getpid()}-{len(list(base.iterdir()))}"
    path.mkdir()
    yield path


@pytest.fixture
def dom0_9pfs(share_dir: Path) -> Iterator[xenlab.Dom0NinePDevice]:
    """A QEMU-served 9pfs device of dom0 in InitWait, frontend outside ``device/``."""
    with xenlab.dom0_9pfs_device(share_dir, tag="pyxen9p") as dev:
        yield dev


@pytest.fixture(scope="session", autouse=True)
def _dom0_qemu_seen(_in_dom0: None) -> None:
    """Record dom0's QEMU command line while it runs, to start it again later."""
    if xenlab.dom0_qemu_pid() is None and xenlab.release() == "bookworm":
        pytest.fail("dom0's QEMU (-xen-domid 0 -xen-attach) is not running at the start")


@pytest.fixture(scope="module", autouse=True)
def _fresh_dom0_qemu(_dom0_qemu_seen: None) -> None:
    """Every test module (group) starts on a freshly started dom0 QEMU.

    Debian 12's QEMU 7.2 segfaults when a 9pfs device it served is removed,
    and does not take a device again once its frontend closed; a group must
    not inherit the QEMU an earlier group used up (each group also passes on
    its own, on the QEMU the boot started).  (Debian 13's QEMU 10 serves no
    9pfs device: it is left as the boot started it.)
    """
    if xenlab.release() == "bookworm":
        xenlab.restart_dom0_qemu()
