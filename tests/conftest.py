"""Shared test configuration.

Tests that need an external tool (a C compiler, tshark, diod, xenstore-utils,
the Debian Xen libraries) skip when it is missing, unless the environment
variable ``PYXEN9P_REQUIRE_PEERS`` is set (CI sets it): then a missing tool is
a failure, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_PEERS = bool(os.environ.get("PYXEN9P_REQUIRE_PEERS"))


def need(condition: bool, what: str) -> None:
    """Skip (or, with ``PYXEN9P_REQUIRE_PEERS``, fail) unless *condition* holds."""
    if condition:
        return
    if REQUIRE_PEERS:
        pytest.fail(f"required test peer missing: {what}")
    pytest.skip(f"{what} is not available")


def need_tool(name: str) -> str:
    """The path of the program *name*, or skip/fail as :func:`need` does."""
    path = shutil.which(name)
    need(path is not None, f"the program {name!r}")
    assert path is not None
    return path


def need_file(path: str | Path) -> Path:
    """*path* if it exists, or skip/fail as :func:`need` does."""
    p = Path(path)
    need(p.exists(), str(p))
    return p


@pytest.fixture
def switch_often() -> Iterator[None]:
    """A thread switch every few bytecodes (switch interval 1 µs) for the
    test: races between threads show up within it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
