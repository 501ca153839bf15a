"""The request future (:class:`pyxen9p._requests.Reply`): a Future without a
lock until someone blocks, that behaves as :class:`concurrent.futures.Future`."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time

import pytest

from pyxen9p._requests import Reply, Request


def test_result_set_before_and_after_a_waiter_blocks() -> None:
    done = Reply()
    done.set_result(b"early")
    assert done.done() and done.result(0) == b"early" and done.exception(0) is None

    late = Reply()
    got: list[bytes] = []
    waiter = threading.Thread(target=lambda: got.append(late.result(10)))
    waiter.start()
    time.sleep(0.05)  # the waiter blocks on the condition
    assert not late.done()
    late.set_result(b"late")
    waiter.join(10)
    assert got == [b"late"]


def test_exception_reaches_a_blocked_waiter_and_a_later_one() -> None:
    future = Reply()
    seen: list[BaseException] = []

    def wait() -> None:
        try:
            future.result(10)
        except OSError as exc:
            seen.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    future.set_exception(OSError(5, "boom"))
    waiter.join(10)
    assert len(seen) == 1 and seen[0].errno == 5
    with pytest.raises(OSError):
        future.result(0)
    assert isinstance(future.exception(0), OSError)


def test_timeout_when_nothing_comes() -> None:
    future = Reply()
    start = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        future.result(0.1)
    assert time.monotonic() - start >= 0.09
    with pytest.raises(cf.TimeoutError):
        future.exception(0.05)


def test_second_settle_is_refused() -> None:
    future = Reply()
    assert future.settle(b"a", None)
    assert not future.settle(b"b", None)
    assert not future.settle(None, OSError())
    assert future.result() == b"a"
    with pytest.raises(cf.InvalidStateError):
        future.set_result(b"c")
    with pytest.raises(cf.InvalidStateError):
        future.set_exception(OSError())


def test_callbacks_before_and_after_done() -> None:
    future = Reply()
    calls: list[str] = []
    future.add_done_callback(lambda f: calls.append("before:" + f.result().decode()))
    future.set_result(b"x")
    future.add_done_callback(lambda f: calls.append("after:" + f.result().decode()))
    assert calls == ["before:x", "after:x"]


def test_cancel_then_resolve_is_ignored() -> None:
    future = Reply()
    calls: list[bool] = []
    future.add_done_callback(lambda f: calls.append(f.cancelled()))
    assert future.cancel()
    assert future.cancelled() and future.done()
    assert calls == [True]
    request = Request(1, 100)
    request.future = future
    request.resolve(101, b"late")  # nobody waits: no error
    with pytest.raises(cf.CancelledError):
        future.result(0)
    assert Reply().set_running_or_notify_cancel() is True  # pending -> running


def test_wait_and_as_completed() -> None:
    futures = [Reply() for _ in range(4)]

    def settle() -> None:
        for i, future in enumerate(futures):
            time.sleep(0.01)
            future.set_result(bytes([i]))

    threading.Thread(target=settle).start()
    done, not_done = cf.wait(futures, timeout=10)
    assert len(done) == 4 and not not_done
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=10)) == [
        bytes([i]) for i in range(4)
    ]
    first = [Reply(), Reply()]
    threading.Timer(0.05, lambda: first[1].set_exception(OSError())).start()
    done, not_done = cf.wait(first, timeout=10, return_when=cf.FIRST_EXCEPTION)
    assert done == {first[1]} and not_done == {first[0]}


def test_asyncio_wrap_future() -> None:
    future = Reply()

    async def main() -> bytes:
        threading.Timer(0.02, lambda: future.set_result(b"async")).start()
        return await asyncio.wait_for(asyncio.wrap_future(future), 10)

    assert asyncio.run(main()) == b"async"


def test_many_waiters_and_settlers_race() -> None:
    def wait(future: Reply, results: list[object]) -> None:
        results.append(future.result(10))

    for _ in range(200):
        future = Reply()
        results: list[object] = []
        waiters = [threading.Thread(target=wait, args=(future, results)) for _ in range(3)]
        for w in waiters:
            w.start()
        settlers = [threading.Thread(target=future.settle, args=(b"r", None)) for _ in range(2)]
        for s in settlers:
            s.start()
        for t in waiters + settlers:
            t.join(10)
        assert results == [b"r"] * 3


def test_request_rejects_a_wrong_reply_type() -> None:
    request = Request(3, 110)  # Twalk: Rwalk is 111
    request.resolve(125, b"x")
    with pytest.raises(OSError, match="reply of type 125"):
        request.future.result(0)
    for ok in (111, 7, 107):
        other = Request(3, 110)
        other.resolve(ok, b"y")
        assert other.future.result(0) == b"y"
