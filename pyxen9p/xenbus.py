"""XenBus conventions: device states, strict parsing of XenStore values, state waits.

Values written by the backend (or the toolstack) are untrusted: the parsers
here accept only canonical decimal numbers within a range and raise
:class:`~pyxen9p.errors.BackendError` naming the node otherwise.  A missing
node is an error too, never a silent zero.
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Callable, Container
from enum import IntEnum

from pyxen9p.errors import BackendError, TransportClosedError
from pyxen9p.interfaces import XenStoreLike, XenStoreOps

__all__ = [
    "XenbusState",
    "parse_uint",
    "parse_versions",
    "read_state",
    "read_uint",
    "wait_for_state",
]

_DECIMAL = re.compile(rb"(0|[1-9][0-9]{0,9})")


class XenbusState(IntEnum):
    """``enum xenbus_state`` (``xen/include/public/io/xenbus.h``)."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


def parse_uint(raw: bytes, name: str, low: int = 0, high: int = 0xFFFFFFFF) -> int:
    """Parse a canonical unsigned decimal in ``low..high``.

    Leading zeros, signs, spaces, trailing garbage and NUL bytes are refused.

    :param name: the node, for the error message
    :raises BackendError: if *raw* is not such a number
    """
    if _DECIMAL.fullmatch(raw) is None:
        raise BackendError(f"{name}: {raw!r} is not an unsigned decimal number")
    value = int(raw)
    if not low <= value <= high:
        raise BackendError(f"{name}: {value} is outside {low}..{high}")
    return value


def parse_versions(raw: bytes, name: str = "versions") -> frozenset[int]:
    """Parse a comma-separated list of protocol versions (``"1"``, ``"1,2"``).

    :raises BackendError: on an empty list, an empty item or garbage
    """
    items = raw.split(b",")
    return frozenset(parse_uint(item, name) for item in items)


def read_uint(store: XenStoreOps, path: str, low: int = 0, high: int = 0xFFFFFFFF) -> int:
    """Read and :func:`parse_uint` the node *path*.

    :raises BackendError: if the node is missing or malformed
    """
    try:
        raw = store.read(path)
    except FileNotFoundError:
        raise BackendError(f"{path}: missing") from None
    return parse_uint(raw, path, low, high)


def read_state(store: XenStoreOps, path: str) -> XenbusState | None:
    """The state in the node *path*, or ``None`` if the node does not exist.

    :raises BackendError: on a value that is not a known state
    """
    try:
        raw = store.read(path)
    except FileNotFoundError:
        return None
    return XenbusState(parse_uint(raw, path, 0, max(XenbusState)))


def wait_for_state(
    store: XenStoreLike,
    path: str,
    wanted: Container[XenbusState],
    *,
    timeout: float,
    fatal: Container[XenbusState | None] = (),
    describe: Callable[[], str] | None = None,
) -> XenbusState:
    """Wait until the state node *path* holds one of *wanted*.

    A watch on *path* is used (it fires once at once, so the current value is
    checked first); spurious events are harmless.

    :param fatal: states (``None`` for a vanished node) that end the wait
        with :class:`~pyxen9p.errors.TransportClosedError`
    :raises TimeoutError: if *timeout* seconds pass first; the message names
        the last state seen
    """
    deadline = time.monotonic() + timeout
    seen: XenbusState | None = None
    with store.watch(path) as watch:
        while True:
            seen = read_state(store, path)
            if seen is not None and seen in wanted:
                return seen
            if seen in fatal:
                state = "vanished" if seen is None else seen.name
                raise TransportClosedError(errno.ENOTCONN, f"{path} is {state}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                extra = f"; {describe()}" if describe else ""
                names = "/".join(s.name for s in XenbusState if s in wanted)
                last = "missing" if seen is None else seen.name
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"timed out after {timeout:g}s waiting for {path} to reach {names}"
                    f" (it is {last}){extra}",
                )
            watch.get(min(remaining, 1.0))
