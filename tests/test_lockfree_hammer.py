"""The lock-free structures of the transport's hot path, hammered from many
threads (issue 11: each lock acquisition reads the clock on CPython 3.11):

* :class:`~pyxen9p._requests.Reply`: settled and cancelled by claiming a
  one-token list, done-callbacks claimed one by one;
* :class:`~pyxen9p._requests.RequestTable`: ``add``/``withdraw`` under a lock
  per tag's ring, ``take``/``mark_lazy``/``mark_awaited``/``flushed``/``fail``
  without any;
* the frontend's receiving role: a one-token list, left without the
  hand-over lock, racing ``close``;
* a ring's send lock: a one-token list taken without waiting, with a
  condition only for the senders that wait.

The switch interval is made tiny so that threads interleave between almost
every bytecode.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from functools import partial

import pytest
from frontend_helpers import TREAD, echo, frame, machine

from pyxen9p._requests import Reply, Request, RequestTable
from pyxen9p._tokenlock import TokenLock
from pyxen9p.errors import HandleClosedError, TransportClosedError, TransportError
from pyxen9p.libs._ctypeslib import CHandle

#: a thread switch every few bytecodes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("switch_often")


def _run(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a hammering thread hung"


# --- Reply ---------------------------------------------------------------------


class _YieldingList(list):  # type: ignore[type-arg]
    """A callback list that lets other threads run right after each append:
    under the GIL a thread is not switched between the append and the next
    few bytecodes, so the window the claiming protects is widened here."""

    def append(self, item: object) -> None:
        super().append(item)
        time.sleep(0)


def test_reply_one_winner_among_settles_and_cancels_every_callback_once() -> None:
    for round_ in range(300):
        _one_winner_round(round_)


def _count_call(calls: Counter[int], i: int, _future: Future[bytes]) -> None:
    calls.update([i])


def _one_winner_round(round_: int) -> None:
    future = Reply()
    if round_ % 3 == 0:
        future._callbacks = _YieldingList()
    start = threading.Barrier(6)
    wins: list[str] = []
    calls: Counter[int] = Counter()
    seen: list[object] = []

    def settler(name: str, value: bytes) -> None:
        start.wait()
        if future.settle(value, None):
            wins.append(name)

    def failer() -> None:
        start.wait()
        if future.settle(None, OSError(5, "failed")):
            wins.append("fail")

    def canceller() -> None:
        start.wait()
        if future.cancel():
            wins.append("cancel")

    def adder(base: int) -> None:
        start.wait()
        for i in range(base, base + 20):
            future.add_done_callback(partial(_count_call, calls, i))

    def waiter() -> None:
        start.wait()
        try:
            seen.append(future.result(10))
        except CancelledError:
            seen.append("cancelled")
        except OSError as exc:
            seen.append(exc.errno)

    _run(
        [
            threading.Thread(target=settler, args=("a", b"a")),
            threading.Thread(target=settler, args=("b", b"b")),
            threading.Thread(target=failer),
            threading.Thread(target=canceller if round_ % 2 else waiter),
            threading.Thread(target=adder, args=(0,)),
            threading.Thread(target=adder, args=(100,)),
        ]
    )
    # cancel() reports True again on a cancelled future: one state, one winner
    assert len(set(wins)) == 1 and (len(wins) == 1 or wins == ["cancel"] * len(wins))
    assert future.done()
    assert sorted(calls) == list(range(20)) + list(range(100, 120))
    assert set(calls.values()) == {1}, "a callback ran twice"
    winner = wins[0]
    if winner == "cancel":
        assert future.cancelled() and future._state == "CANCELLED"
    elif winner == "fail":
        assert isinstance(future.exception(0), OSError) and future._state == "FINISHED"
    else:
        assert future.result(0) == winner.encode() and future._state == "FINISHED"
    if seen:
        expected = {"a": b"a", "b": b"b", "fail": 5, "cancel": "cancelled"}[winner]
        assert seen == [expected]


def test_reply_running_never_overwrites_a_settled_state() -> None:
    for _ in range(500):
        _running_round()


def _running_round() -> None:
    future = Reply()
    start = threading.Barrier(2)
    outcome: list[object] = []

    def run() -> None:
        start.wait()
        try:
            outcome.append(future.set_running_or_notify_cancel())
        except RuntimeError:
            outcome.append("finished first")

    def settle() -> None:
        start.wait()
        future.settle(b"r", None)

    _run([threading.Thread(target=run), threading.Thread(target=settle)])
    assert future._state == "FINISHED" and future.result(0) == b"r"
    assert not future.running()
    assert outcome in ([True], ["finished first"])


# --- RequestTable ----------------------------------------------------------------


RINGS = 4
TAGS = 32


def test_table_add_take_mark_and_withdraw_race_leaves_nothing_behind() -> None:
    table = RequestTable()
    ring_locks = [threading.Lock() for _ in range(RINGS)]
    stop = threading.Event()
    added: list[Request] = []
    withdrawn: list[Request] = []
    taken: list[Request] = []
    errors: list[BaseException] = []

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        return run

    def sender(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            tag = rng.randrange(TAGS)
            with ring_locks[tag % RINGS]:
                request = table.add(tag, TREAD, None, lazy=rng.random() < 0.3)
                if request is None:  # in flight
                    continue
                if rng.random() < 0.2:  # not sent after all
                    table.withdraw(request)
                    withdrawn.append(request)
                else:
                    added.append(request)

    def receiver() -> None:  # one receiving thread, as in a transport
        rng = random.Random(7)
        while not stop.is_set():
            request = table.take(rng.randrange(TAGS))
            if request is not None:
                assert request.future.settle(b"reply", None), "a request taken twice"
                taken.append(request)

    def marker(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            request = table.peek(rng.randrange(TAGS))
            if request is None:
                continue
            if rng.random() < 0.5:
                table.mark_lazy(request.tag)
            else:
                table.mark_awaited(request.future)
            table.in_flight_on(rng.randrange(RINGS), RINGS)
            table.awaited()

    threads = [threading.Thread(target=guard(partial(sender, s))) for s in range(4)]
    threads += [threading.Thread(target=guard(receiver))]
    threads += [threading.Thread(target=guard(partial(marker, s))) for s in (11, 12)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert len(taken) > 100 and len(added) > 100
    # whatever is left in flight is taken now: then nothing may remain anywhere
    for tag in range(TAGS):
        request = table.take(tag)
        if request is not None:
            assert request.future.settle(b"late", None)
            taken.append(request)
    assert not table.pending and not table.awaited() and not table._awaited
    times_taken = Counter(map(id, taken))
    assert set(times_taken.values()) == {1}, "a request taken twice"
    assert all(times_taken[id(r)] == 1 for r in added), "a request sent and never taken"
    # the receiver took at random: a request withdrawn may have been taken
    # first (a hostile reply to a tag not sent yet), never one added
    withdrawn_ids = {id(r) for r in withdrawn}
    assert all(i in withdrawn_ids for i in set(times_taken) - {id(r) for r in added})
    assert not any(r.future.done() for r in withdrawn if id(r) not in times_taken)


def test_table_fail_racing_with_adds_fails_every_request_once() -> None:
    for round_ in range(30):
        _fail_round(round_)


def _fail_round(round_: int) -> None:
    table = RequestTable()
    ring_locks = [threading.Lock() for _ in range(RINGS)]
    accepted: list[Request] = []
    refused: list[BaseException] = []
    failure = TransportClosedError(107, f"gone {round_}")
    start = threading.Barrier(RINGS + 2)

    def sender(ring: int) -> None:
        start.wait()
        for tag in range(ring, 4 * TAGS, RINGS):  # this ring's tags only
            with ring_locks[ring]:
                try:
                    request = table.add(tag, TREAD)
                except TransportError as exc:
                    refused.append(exc)
                    continue
                assert request is not None  # each tag once
                accepted.append(request)

    def failer() -> None:
        start.wait()
        time.sleep(random.random() * 0.002)
        assert table.fail(failure) is failure

    def taker() -> None:  # replies keep coming meanwhile
        start.wait()
        for tag in range(4 * TAGS):
            request = table.take(tag)
            if request is not None:
                request.future.settle(b"reply", None)

    _run(
        [threading.Thread(target=sender, args=(r,)) for r in range(RINGS)]
        + [threading.Thread(target=failer), threading.Thread(target=taker)]
    )
    assert all(exc is failure for exc in refused)
    assert len(accepted) + len(refused) == 4 * TAGS
    for request in accepted:  # answered, or failed: never left pending
        assert request.future.done()
        exc = request.future.exception(0)
        assert exc is None or exc is failure
    assert not table.pending and not table._awaited
    with pytest.raises(TransportClosedError):
        table.add(0, TREAD)


def test_table_flushed_and_taken_at_once_settle_once() -> None:
    for _ in range(200):
        _flush_round()


def _flush_round() -> None:
    table = RequestTable()
    requests = [table.register(tag, TREAD) for tag in range(TAGS)]
    start = threading.Barrier(3)
    outcomes: list[int] = []

    def flusher() -> None:
        start.wait()
        for tag in range(TAGS):
            table.flushed(tag)

    def taker() -> None:
        start.wait()
        for tag in range(TAGS):
            request = table.take(tag)
            if request is not None:
                outcomes.append(int(request.future.settle(b"x", None)))

    def marker() -> None:
        start.wait()
        for request in requests:
            table.mark_awaited(request.future)

    _run([threading.Thread(target=f) for f in (flusher, taker, marker)])
    assert all(r.future.done() for r in requests) and all(outcomes)
    assert not table.pending and not table._awaited


# --- Frontend: the receiving role ---------------------------------------------


def test_many_callers_receive_and_close_races_their_leaving() -> None:
    """Callers take and leave the receiving role (no hand-over lock unless
    close waits for it) while the frontend closes: nobody hangs, every
    request ends, and close releases everything."""
    for _ in range(8):
        _close_round()


def _close_round() -> None:
    with machine(echo) as m:
        fe = m.connect()
        errors: list[BaseException] = []
        start = threading.Barrier(7)

        def caller(base: int) -> None:
            start.wait()
            for i in range(400):
                tag = base + i % 50
                try:
                    reply = fe.request(frame(TREAD, tag, b"x" * 8), timeout=10)
                    assert reply[5:7] == tag.to_bytes(2, "little")
                except TransportError:
                    return  # closed under it
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=caller, args=(b * 100,)) for b in range(6)]
        for thread in threads:
            thread.start()
        start.wait()
        time.sleep(random.random() * 0.05)
        fe.close()
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
        assert not errors, errors
        assert not fe.outstanding_tags()
        m.assert_clean()


# --- the token lock (each ring's send lock, the receiving role, the event channel's pending) ---


def test_token_lock_has_one_holder_and_wakes_every_waiter() -> None:
    lock = TokenLock()
    inside: list[int] = []
    most: list[int] = [0]
    taken = Counter[str]()
    start = threading.Barrier(8)

    def contender(name: str, how: str) -> None:
        start.wait()
        for _ in range(2000 if how == "try" else 300):
            if how == "token":  # the frontend's fast path: a pop of the token
                try:
                    lock.token.pop()
                except IndexError:
                    continue
            elif not lock.acquire(blocking=how != "try", timeout=-1 if how == "wait" else 10):
                continue
            inside.append(1)
            most[0] = max(most[0], len(inside))
            time.sleep(0)  # let the others try while it is held
            inside.pop()
            taken.update([name])
            lock.release()

    _run(
        [threading.Thread(target=contender, args=(f"try{i}", "try")) for i in range(2)]
        + [threading.Thread(target=contender, args=(f"token{i}", "token")) for i in range(2)]
        + [threading.Thread(target=contender, args=(f"wait{i}", "wait")) for i in range(2)]
        + [threading.Thread(target=contender, args=(f"timed{i}", "timed")) for i in range(2)]
    )
    assert most[0] == 1, "two threads held the lock at once"
    # a waiting sender is never left asleep with the lock free (no lost wake-up)
    assert taken["wait0"] == taken["wait1"] == taken["timed0"] == taken["timed1"] == 300
    assert not lock.locked() and lock._waiting == 0
    with pytest.raises(RuntimeError):
        lock.release()


def test_token_lock_wait_is_bounded_and_sees_a_release() -> None:
    lock = TokenLock()
    assert lock.acquire(blocking=False) and lock.locked()
    assert not lock.acquire(blocking=False)
    began = time.monotonic()
    assert not lock.acquire(timeout=0.1)
    assert 0.09 <= time.monotonic() - began < 5
    threading.Timer(0.05, lock.release).start()
    assert lock.acquire(timeout=5)  # given back meanwhile: taken (woken, not polling)
    lock.release()
    assert not lock.locked()


class _Counted(CHandle):
    """A C handle whose "C calls" check that the handle is not released
    under them, and whose release is recorded."""

    def __init__(self) -> None:
        self.released: list[int] = []
        self.errors: list[str] = []
        self._adopt(0x1000)

    def use(self) -> None:
        with self._using() as ptr:
            if self.released:
                self.errors.append("a call ran on a released handle")
            time.sleep(0)  # let close (and others) in while "in C"
            if self.released:
                self.errors.append("the handle was released under a call")
            if ptr != 0x1000:
                self.errors.append(f"wrong pointer {ptr:#x}")

    def _release(self, pointer: int) -> None:
        self.released.append(pointer)


@pytest.mark.parametrize("round_", range(50))
def test_handle_calls_take_no_lock_yet_close_never_frees_under_them(round_: int) -> None:
    """CHandle counts its calls without a lock (on CPython 3.11 a lock is a
    clock read): callers racing close either run on the live handle or get
    HandleClosedError, close releases exactly once, after the last call."""
    handle = _Counted()
    ran: list[None] = []
    refused: list[None] = []  # list.append: atomic (a Counter's += is not)
    start = threading.Barrier(5)

    def caller() -> None:
        rng = random.Random()
        start.wait()
        while True:  # until close refuses it: close always races calls
            sum(range(rng.randrange(30)))  # outside a call most of the time
            try:
                handle.use()
                ran.append(None)
            except HandleClosedError:
                refused.append(None)
                return

    def closer() -> None:
        start.wait()
        time.sleep(random.random() / 1000)
        handle.close()

    _run([threading.Thread(target=caller) for _ in range(4)] + [threading.Thread(target=closer)])
    assert handle.errors == []
    assert handle.released == [0x1000]
    assert handle.closed and not handle._callers
    assert len(refused) == 4
