"""``poll(2)`` of one file descriptor, called through ctypes: no clock read.

CPython's :meth:`select.poll.poll` turns any timeout of 0 or more into a
deadline: it reads ``CLOCK_MONOTONIC`` first, a system call of its own in a
PV domain without vDSO (a trap through Xen).  A receiving caller polls the
event channel once for each notification it waits for, so it calls libc's
``poll`` directly: a foreign call (it releases the GIL as
:mod:`select` does) and one system call.

The caller passes whole milliseconds.  On ``-1`` it reads the reason with
:func:`ctypes.get_errno` (see :func:`poll_error`): ``EINTR`` is a poll that
found nothing (the signal's Python handler runs at the caller's next
bytecode, as after :meth:`select.poll.poll`), anything else is an
:class:`OSError`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import select
from collections.abc import Callable

__all__ = ["one_fd_poller", "poll_error"]


class _PollFd(ctypes.Structure):
    _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))


def _libc_poll() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # this process's libc (its own handle)
        poll = libc.poll
    except (OSError, AttributeError):
        return None
    poll.argtypes = (ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.c_int)
    poll.restype = ctypes.c_int
    return poll


def one_fd_poller(fd: int) -> Callable[[int], int]:
    """``poll(ms)``: wait at most *ms* milliseconds (an int, ``-1``: no
    limit) for *fd* to be readable (or in error, or hung up): the number of
    descriptors ready (0 or 1), or ``-1`` (see :func:`poll_error`).

    Without a libc ``poll`` reachable through ctypes: the same through
    :meth:`select.poll.poll`.

    Not for two threads at once: the descriptor's record is shared (the
    frontend polls only from the thread holding the receiving role).
    """
    poll = _libc_poll()
    if poll is None:  # FALLBACK: the standard library's (a clock read each)
        poller = select.poll()
        poller.register(fd, select.POLLIN)

        def fallback(ms: int) -> int:
            return len(poller.poll(ms))

        return fallback
    record = _PollFd(fd, select.POLLIN, 0)
    # byref keeps *record* alive as long as the partial lives
    return functools.partial(poll, ctypes.byref(record), 1)


def poll_error() -> OSError | None:
    """Why the last ``poll`` of :func:`one_fd_poller` gave ``-1``:
    ``None`` for an interruption by a signal (a poll that found nothing),
    else the error."""
    err = ctypes.get_errno()
    if err == errno.EINTR:
        return None
    return OSError(err or errno.EIO, os.strerror(err or errno.EIO))
