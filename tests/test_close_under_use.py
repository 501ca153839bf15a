"""Handles closed while other threads use them.

* the stress runs of ``tests/close_stress.py`` (a subprocess each, so that a
  crash in C is a failed test): the real ``libxenstore`` over the simulated
  xenstored, and the bindings over the mock libraries; bounded in cycles and
  seconds (``PYXEN9P_CLOSE_STRESS_CYCLES`` raises the count);
* in-process checks of each rule of :class:`pyxen9p.libs._ctypeslib.CHandle`:
  close waits for a call in C, wakes the waits it can, leaves the release to
  the last caller when it cannot wait, and the callers get
  :class:`~pyxen9p.errors.HandleClosedError`;
* the frontend: a receiver that does not stop keeps what it can reach until
  it exits; a request from the receiver thread is refused at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from conftest import need_file
from frontend_helpers import FE_DOMID, TREAD, echo, frame, machine
from mocklibs import (  # noqa: F401
    EVTCHN,
    GNTTAB,
    MockXen,
    mock_env,
    mock_libs_fixture,
    mockxen_fixture,
    xen_dir_fixture,
)

from pyxen9p import frontend as frontend_module
from pyxen9p.errors import HandleClosedError
from pyxen9p.libs import EventChannel, GrantSharer
from pyxen9p.sim.xenstore import XenStoreTree
from pyxen9p.sim.xenstored import XenStoreDaemon

ROOT = Path(__file__).resolve().parent.parent
STRESS = Path(__file__).resolve().parent / "close_stress.py"
LIBXENSTORE = "/usr/lib/x86_64-linux-gnu/libxenstore.so.4"
#: cycles per stress run (CI's slice; a developer may raise it)
CYCLES = int(os.environ.get("PYXEN9P_CLOSE_STRESS_CYCLES", "150"))
#: seconds per stress run at most
SECONDS = float(os.environ.get("PYXEN9P_CLOSE_STRESS_SECONDS", "8"))


@pytest.fixture
def xenstored() -> Iterator[XenStoreDaemon]:
    need_file(LIBXENSTORE)
    path = tempfile.mkdtemp(prefix="xs-", dir="/tmp")  # AF_UNIX paths are short
    try:
        with XenStoreDaemon(os.path.join(path, "socket"), XenStoreTree()) as daemon:
            yield daemon
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _stress(mode: str, env: dict[str, str], *extra: str) -> dict[str, Any]:
    env = dict(env, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(STRESS), mode, "--cycles", str(CYCLES)]
    command += ["--seconds", str(SECONDS), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SECONDS + 60)
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        pytest.fail(f"the stress run crashed ({name}): {result.stderr[-2000:]}")
    lines = result.stdout.strip().splitlines()
    summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    assert result.returncode == 0, (summary, result.stderr[-2000:])
    assert summary["cycles"] > 0 and not summary["anomalies"] and not summary["hung"]
    return summary


@pytest.mark.parametrize("users", ["all", "watch.get", "check_watch,read", "read_watch"])
def test_xenstore_closed_under_use_never_crashes(xenstored: XenStoreDaemon, users: str) -> None:
    # the old close: watch.get alone crashed (SIGSEGV in xs_check_watch),
    # check_watch+read aborted (heap corruption), all threads deadlocked
    extra = () if users == "all" else ("--users", users)
    env = dict(os.environ, XENSTORED_PATH=xenstored.socket_path)
    _stress("xenstore", env, *extra)


def test_mock_handles_closed_under_use(mock_libs: dict[str, Path], xen_dir: Path) -> None:
    env = dict(os.environ, **mock_env(mock_libs, xen_dir, 0))
    summary = _stress("mock", env)
    assert summary["misuse"] == 0, "a C function was called with a closed handle"
    assert summary["live"] == {"grants": 0, "mappings": 0, "ports": 0, "handles": 0}


# --- the rules, one at a time (mock libraries) ------------------------------


def _gated(handle: Any, name: str) -> tuple[threading.Event, threading.Event, Callable[[], None]]:
    """Make C function *name* of *handle*'s private library stop inside the
    call (after entering) until the returned gate is set."""
    entered, gate = threading.Event(), threading.Event()
    original = getattr(handle._lib, name)

    def gated(*args: Any) -> Any:
        entered.set()
        assert gate.wait(10)
        return original(*args)

    setattr(handle._lib, name, gated)
    return entered, gate, lambda: setattr(handle._lib, name, original)


def _in_thread(body: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(body())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_close_waits_for_a_call_in_c(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    peer = EventChannel(library=mock_libs[EVTCHN])
    channel = EventChannel(library=mock_libs[EVTCHN])
    remote = peer.bind_unbound_port(0)
    local = channel.bind_interdomain(0, remote)
    entered, gate, _ = _gated(channel, "xenevtchn_notify")
    caller, called = _in_thread(lambda: channel.notify(local))
    assert entered.wait(5)
    closer, closed = _in_thread(channel.close)
    time.sleep(0.3)
    assert closer.is_alive(), "close returned while a call was in C"
    assert channel.closed  # new calls are refused at once
    with pytest.raises(HandleClosedError):
        channel.unmask(local)
    assert mockxen.live()["handles"] == 2  # not freed yet
    gate.set()
    caller.join(5)
    closer.join(5)
    assert called == [None] and closed == [None]
    assert mockxen.live()["handles"] == 1
    peer.close()
    assert mockxen.misuse() == 0


def test_close_that_cannot_wait_leaves_the_release_to_the_last_caller(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    sharer = GrantSharer(library=mock_libs[GNTTAB])
    sharer.close_timeout = 0.2
    pages = sharer.share_pages(1, 1)
    entered, gate, _ = _gated(sharer, "xengntshr_share_pages")
    caller, shared = _in_thread(lambda: sharer.share_pages(1, 2))
    assert entered.wait(5)
    started = time.monotonic()
    sharer.close()  # gives up waiting after close_timeout
    assert 0.15 < time.monotonic() - started < 3
    assert sharer.closed and not pages.closed
    assert mockxen.live()["handles"] == 1
    gate.set()
    caller.join(5)
    # the call completed and its pages were released with the handle by
    # the caller's thread as it left
    assert len(shared) == 1 and shared[0].closed and pages.closed
    assert mockxen.live() == {"grants": 0, "mappings": 0, "ports": 0, "handles": 0}


def test_close_wakes_a_wait_for_events(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    channel = EventChannel(library=mock_libs[EVTCHN])
    channel.bind_unbound_port(0)
    waiter, outcome = _in_thread(lambda: channel.wait(None))
    time.sleep(0.2)
    started = time.monotonic()
    channel.close()
    assert time.monotonic() - started < 2
    waiter.join(5)
    assert not waiter.is_alive() and isinstance(outcome[0], HandleClosedError)


def test_a_blocking_pending_keeps_the_handle_until_it_returns(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    peer = EventChannel(library=mock_libs[EVTCHN])
    channel = EventChannel(library=mock_libs[EVTCHN])
    channel.close_timeout = 0.2
    remote = peer.bind_unbound_port(0)
    local = channel.bind_interdomain(0, remote)
    while channel.wait(0.1) is not None:  # binding may leave an event queued
        channel.unmask(local)
    taker, taken = _in_thread(channel.pending)  # blocks in C: nothing can wake it
    time.sleep(0.2)
    channel.close()
    assert taker.is_alive() and mockxen.live()["handles"] == 2
    peer.notify(remote)
    taker.join(5)
    assert taken == [local]
    assert mockxen.live()["handles"] == 1  # released by the taker's thread
    peer.close()


def test_close_from_inside_a_call_is_done_when_the_call_returns(
    mock_libs: dict[str, Path], xen_dir: Path, mockxen: MockXen
) -> None:
    channel = EventChannel(library=mock_libs[EVTCHN])
    port = channel.bind_unbound_port(0)
    original = channel._lib.xenevtchn_unmask

    def closing(*args: Any) -> Any:
        channel.close()  # must not wait for itself, nor free under itself
        assert mockxen.live()["handles"] == 1
        return original(*args)

    channel._lib.xenevtchn_unmask = closing
    channel.unmask(port)
    assert channel.closed and mockxen.live()["handles"] == 0


# --- the real libxenstore over the simulated xenstored -----------------------


def test_close_wakes_watch_waiters(
    xenstored: XenStoreDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyxen9p.libs.xenstore import XenStore

    monkeypatch.setenv("XENSTORED_PATH", xenstored.socket_path)
    store = XenStore()
    watch = store.watch("/w")
    store.watch("/raw", token="raw")

    def get_until_none() -> int:
        events = 0
        while watch.get(None) is not None:
            events += 1
        return events  # an iterator of the watch simply ends

    def read_until_error() -> None:
        while True:  # takes the events of both watches (low level)
            store.read_watch()

    getter, got = _in_thread(get_until_none)
    reader, read = _in_thread(read_until_error)
    time.sleep(0.3)
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 2
    getter.join(5)
    reader.join(5)
    assert len(got) == 1 and isinstance(got[0], int)
    assert len(read) == 1 and isinstance(read[0], HandleClosedError)


# --- the frontend -----------------------------------------------------------


def slow_echo(request: bytes) -> bytes:
    """Answer after a while, so that a done-callback is attached before the
    reply comes (and so runs on the receiver thread)."""
    time.sleep(0.2)
    return echo(request)


def test_a_stalled_receiver_keeps_what_it_reaches_until_it_exits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(frontend_module, "_RECEIVER_STOP_TIMEOUT", 0.3, raising=False)
    with machine(handler=slow_echo) as m:
        fe = m.connect()
        receiver = fe._receiver
        assert receiver is not None
        entered, gate = threading.Event(), threading.Event()

        def stall(_: Future[bytes]) -> None:
            assert threading.current_thread() is receiver
            entered.set()
            gate.wait(30)

        fe.submit(frame(TREAD, 1, b"x")).add_done_callback(stall)
        assert entered.wait(5)
        fe.close()
        assert receiver.is_alive()
        # the protocol went on: the backend saw Closing, then Closed
        store = m.dom0.open_xenstore()
        assert store.read(f"/local/domain/{FE_DOMID}/device/9pfs/0/state") == b"6"
        store.close()
        # but nothing the receiver can reach was released under it
        counts = m.xen.resources(FE_DOMID)
        assert counts.grants and counts.ports and counts.handles, counts
        gate.set()
        receiver.join(5)
        assert not receiver.is_alive()
        m.assert_clean()  # released by the receiver as it left


def test_request_from_the_receiver_thread_is_refused_at_once() -> None:
    with machine(handler=slow_echo) as m:
        fe = m.connect()
        outcome: list[Any] = []
        done = threading.Event()

        def nested(_: Future[bytes]) -> None:
            assert threading.current_thread() is fe._receiver
            started = time.monotonic()
            try:
                fe.request(frame(TREAD, 2, b"y"), timeout=5)
            except BaseException as exc:
                outcome.append(exc)
            outcome.append(time.monotonic() - started)
            done.set()

        fe.submit(frame(TREAD, 1, b"x")).add_done_callback(nested)
        assert done.wait(10)
        assert isinstance(outcome[0], RuntimeError) and "receiver" in str(outcome[0])
        assert outcome[1] < 1
        assert fe.request(frame(TREAD, 3, b"z"), timeout=5)  # still usable
        fe.close()
        m.assert_clean()


def test_close_from_a_done_callback_releases_once_the_receiver_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with machine(handler=slow_echo) as m:
        fe = m.connect()
        receiver = fe._receiver
        assert receiver is not None
        closed = threading.Event()

        def close_now(_: Future[bytes]) -> None:
            assert threading.current_thread() is receiver
            fe.close()
            # still inside the receiver: its rings and handles are all alive
            counts = m.xen.resources(FE_DOMID)
            assert counts.grants and counts.ports and counts.handles, counts
            closed.set()

        # more requests in flight: their replies may come while it closes
        futures = [fe.submit(frame(TREAD, tag, b"x")) for tag in range(1, 6)]
        futures[0].add_done_callback(close_now)
        assert closed.wait(10)
        receiver.join(5)
        assert not receiver.is_alive()
        m.assert_clean()
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, [r.getMessage() for r in errors]
