"""Memory barriers for rings shared with another domain.

The Xen 9pfs ring protocol orders data accesses against index updates with
three barriers (``xen-barrier.h``): ``rmb`` (load-load), ``wmb``
(store-store) and ``mb`` (full).  Python cannot emit fence instructions, so
this module maps one executable page holding a two-instruction function
(fence, return) and calls it through :mod:`ctypes`:

* **x86-64** is TSO: loads are not reordered with other loads, stores are not
  reordered with other stores, and stores are not reordered with older loads.
  ``rmb`` and ``wmb`` therefore only need to stop *compiler* reordering, which
  CPython cannot do across the separate C calls that copy ring data and store
  an index; they are no-ops here.  ``mb`` must also order a store before a
  later load, which TSO does not, so it executes ``mfence``.
* **arm64** is weakly ordered: all three execute ``dmb sy``, as Xen's own
  ``xen-barrier.h`` does.
* Any other architecture is refused with :class:`UnsupportedArchitectureError`
  when barriers are first requested: never silent corruption.

The code page is written into a ``memfd`` and then mapped ``PROT_READ |
PROT_EXEC`` (never writable and executable at once); mapping a freshly written
page executable makes the kernel synchronise the instruction cache on arm64.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyxen9p.errors import Pyxen9pError

__all__ = [
    "ARM64_FENCE",
    "X86_64_FENCE",
    "Barriers",
    "UnsupportedArchitectureError",
    "get_barriers",
]

#: ``mfence; ret``
X86_64_FENCE = bytes.fromhex("0faef0c3")
#: ``dmb sy; ret`` (little-endian A64 encodings 0xd5033fbf, 0xd65f03c0)
ARM64_FENCE = (0xD5033FBF).to_bytes(4, "little") + (0xD65F03C0).to_bytes(4, "little")


class UnsupportedArchitectureError(Pyxen9pError, RuntimeError):
    """No correct memory barrier is known for this CPU architecture."""


def _noop() -> None:
    """A barrier that the architecture's memory model makes unnecessary."""


@dataclass(frozen=True)
class Barriers:
    """The three ring barriers for the running CPU.

    :ivar rmb: orders earlier loads before later loads
    :ivar wmb: orders earlier stores before later stores
    :ivar mb: orders all earlier accesses before all later ones
    :ivar machine: the architecture name these barriers are for
    """

    rmb: Callable[[], None]
    wmb: Callable[[], None]
    mb: Callable[[], None]
    machine: str


_lock = threading.Lock()
_cached: Barriers | None = None
_keepalive: list[object] = []


def _fence_function(code: bytes) -> Callable[[], None]:
    """Map *code* executable and return it as a callable."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    fd = os.memfd_create("pyxen9p-barrier", os.MFD_CLOEXEC)
    try:
        os.write(fd, code.ljust(mmap.PAGESIZE, b"\0"))
        address = libc.mmap(
            None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_SHARED, fd, 0
        )
    finally:
        os.close(fd)
    if address in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise UnsupportedArchitectureError(
            f"cannot map the memory-barrier helper executable: {os.strerror(err)}"
        )
    function = ctypes.CFUNCTYPE(None)(address)
    _keepalive.append(function)  # the page stays mapped for the process lifetime
    return function


def get_barriers(machine: str | None = None) -> Barriers:
    """Return the barriers for this machine (built once, then cached).

    :param machine: override :func:`platform.machine` (for tests)
    :raises UnsupportedArchitectureError: on an architecture without a known
        correct barrier, or if the helper page cannot be made executable
    """
    global _cached
    arch = (machine or platform.machine()).lower()
    with _lock:
        if machine is None and _cached is not None:
            return _cached
        if arch in ("x86_64", "amd64"):
            fence = _fence_function(X86_64_FENCE)
            result = Barriers(rmb=_noop, wmb=_noop, mb=fence, machine="x86_64")
        elif arch in ("aarch64", "arm64"):
            fence = _fence_function(ARM64_FENCE)
            result = Barriers(rmb=fence, wmb=fence, mb=fence, machine="aarch64")
        else:
            raise UnsupportedArchitectureError(
                f"pyxen9p has no memory barrier for {arch!r}; the shared rings are"
                " supported on x86_64 and aarch64 only"
            )
        if machine is None:
            _cached = result
        return result
