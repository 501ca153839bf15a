"""Strict XenStore parsing, XenBus states and memory barriers."""

from __future__ import annotations

import platform

import pytest

from pyxen9p.barrier import (
    ARM64_FENCE,
    X86_64_FENCE,
    UnsupportedArchitectureError,
    get_barriers,
)
from pyxen9p.errors import BackendError
from pyxen9p.frontend import DEFAULT_GRANT_LIMIT, choose_layout
from pyxen9p.ring import ring_size
from pyxen9p.xenbus import XenbusState, parse_uint, parse_versions


@pytest.mark.parametrize("raw,value", [(b"0", 0), (b"1", 1), (b"4294967295", 0xFFFFFFFF)])
def test_parse_uint_accepts_canonical_decimals(raw: bytes, value: int) -> None:
    assert parse_uint(raw, "n") == value


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" 1",
        b"1 ",
        b"+1",
        b"-1",
        b"01",
        b"0x10",
        b"1\0",
        b"1a",
        b"4294967296",
        b"\xff",
        b"1.0",
    ],
)
def test_parse_uint_refuses_garbage(raw: bytes) -> None:
    with pytest.raises(BackendError, match="n"):
        parse_uint(raw, "n")


def test_parse_uint_checks_the_range() -> None:
    assert parse_uint(b"9", "order", 1, 9) == 9
    with pytest.raises(BackendError, match=r"outside 1\.\.9"):
        parse_uint(b"10", "order", 1, 9)
    with pytest.raises(BackendError):
        parse_uint(b"0", "order", 1, 9)


def test_parse_versions_is_a_comma_list() -> None:
    assert parse_versions(b"1") == {1}
    assert parse_versions(b"1,2") == {1, 2}
    assert parse_versions(b"2,1,3") == {1, 2, 3}
    for bad in (b"", b"1,", b",1", b"1,,2", b"1;2", b"one", b"1, 2"):
        with pytest.raises(BackendError):
            parse_versions(bad)


def test_xenbus_state_values() -> None:
    assert [s.value for s in XenbusState] == list(range(9))
    assert XenbusState.INIT_WAIT == 2 and XenbusState.CONNECTED == 4


def test_choose_layout_default_fits_the_gntalloc_limit() -> None:
    rings, order = choose_layout(8, 9)
    assert rings == 2 and rings * (1 + (1 << order)) <= DEFAULT_GRANT_LIMIT
    assert order == 8  # 2 x (1 + 512) = 1026 grants would exceed 1024
    assert choose_layout(8, 9, grant_limit=None) == (2, 9)
    assert choose_layout(1, 9) == (1, 9)  # one ring of order 9 needs 513 grants
    assert choose_layout(8, 4, rings=4) == (4, 4)
    assert choose_layout(8, 9, rings=16, order=3) == (8, 3)
    with pytest.raises(ValueError, match="msize"):
        choose_layout(8, 1)  # a 4 KiB ring gives a 2 KiB msize
    with pytest.raises(ValueError):
        choose_layout(8, 9, order=0)
    with pytest.raises(ValueError, match="grants"):
        choose_layout(8, 9, rings=8, grant_limit=20)
    assert ring_size(order) // 2 >= 4096


def test_fence_encodings() -> None:
    assert bytes([0x0F, 0xAE, 0xF0, 0xC3]) == X86_64_FENCE  # mfence; ret
    assert bytes.fromhex("bf3f03d5c0035fd6") == ARM64_FENCE  # dmb sy; ret


def test_barriers_for_this_machine_run() -> None:
    machine = platform.machine()
    if machine not in ("x86_64", "aarch64"):
        with pytest.raises(UnsupportedArchitectureError):
            get_barriers()
        return
    barriers = get_barriers()
    for _ in range(1000):
        barriers.mb()
        barriers.rmb()
        barriers.wmb()
    assert get_barriers() is barriers


@pytest.mark.parametrize("machine", ["ppc64le", "riscv64", "s390x", "i686", "armv7l"])
def test_other_architectures_are_refused(machine: str) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=machine):
        get_barriers(machine)


def test_arm64_barriers_are_all_real_fences() -> None:
    barriers = get_barriers("aarch64")  # mapped, never called on x86
    assert barriers.machine == "aarch64"
    assert barriers.rmb is barriers.wmb is barriers.mb
