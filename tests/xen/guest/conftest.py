"""Fixtures shared by the real-Xen guest tests (run in dom0 by ``entry.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import xenlab


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
