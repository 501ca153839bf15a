"""The leading caller's poll of the event channel (pyxen9p.libs._poll)."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

from pyxen9p.libs import _poll


@pytest.fixture(params=["libc", "fallback"])
def poller_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        monkeypatch.setattr(_poll, "_libc_poll", lambda: None)
    else:
        assert _poll._libc_poll() is not None  # glibc has poll
    return str(request.param)


def test_one_fd_poller_waits_and_sees_data(poller_kind: str) -> None:
    r, w = os.pipe()
    try:
        poll = _poll.one_fd_poller(r)
        start = time.monotonic()
        assert poll(60) == 0  # nothing: waits its time
        assert time.monotonic() - start >= 0.05
        assert poll(0) == 0
        os.write(w, b"x")
        assert poll(1000) == 1 and poll(-1) == 1  # readable: at once
        os.read(r, 1)
        assert poll(0) == 0
        threading.Timer(0.05, os.write, (w, b"y")).start()
        start = time.monotonic()
        assert poll(5000) == 1  # woken by the write, not the limit
        assert time.monotonic() - start < 4
    finally:
        os.close(r)
        os.close(w)


def test_one_fd_poller_reports_a_hang_up_and_a_closed_descriptor(poller_kind: str) -> None:
    r, w = os.pipe()
    poll = _poll.one_fd_poller(r)
    os.close(w)
    assert poll(0) == 1  # hung up: ready (the reader then sees the end)
    os.close(r)
    assert poll(0) == 1  # not open: POLLNVAL, ready as select.poll says


def test_an_interrupted_poll_is_a_poll_that_found_nothing() -> None:
    r, w = os.pipe()
    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, _frame: fired.append(signum))
    try:
        poll = _poll.one_fd_poller(r)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        got = poll(2000)
        assert got == -1, got
        assert _poll.poll_error() is None  # EINTR
        assert fired == [signal.SIGALRM]  # the handler ran after the call
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(r)
        os.close(w)


def test_poll_error_names_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_poll.ctypes, "get_errno", lambda: errno.ENOMEM)
    failure = _poll.poll_error()
    assert isinstance(failure, OSError) and failure.errno == errno.ENOMEM
    monkeypatch.setattr(_poll.ctypes, "get_errno", lambda: 0)
    failure = _poll.poll_error()
    assert isinstance(failure, OSError) and failure.errno == errno.EIO
