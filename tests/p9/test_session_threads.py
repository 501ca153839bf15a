"""The session's lock-free structures hammered from several threads.

:class:`~pyxen9p.p9.session.TagPool`, :class:`~pyxen9p.p9.session.FidPool`
and the background clunks of :class:`~pyxen9p.p9.session.ClientSession`
take no lock on the way of a request: they rely on single atomic operations
on builtins.  These tests run many threads against each with a tiny switch
interval (a thread switch every few bytecodes) and check what a lock would
guarantee: no number is ever held twice, none is lost or queued twice, a
quarantined tag or a lost fid never comes back, each background clunk is
settled exactly once, and no waiter misses its wake-up.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from pyxen9p.p9 import codec as c
from pyxen9p.p9.session import MAX_TAG, ClientSession, FidPool, TagPool

from .hostile import HostileServer

THREADS = 8


#: a thread switch every few bytecodes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("switch_often")


def run_threads(work: Callable[[int, random.Random], None], count: int = THREADS) -> list[str]:
    """*work(index, rng)* in *count* threads started together: the errors
    they raised (as text)."""
    errors: list[str] = []
    start = threading.Barrier(count)

    def body(index: int) -> None:
        rng = random.Random(index)
        try:
            start.wait()
            work(index, rng)
        except BaseException as exc:  # reported by the test
            errors.append(f"thread {index}: {exc!r}")

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a thread hung"
    return errors


class CountingCondition(threading.Condition):
    """A condition that counts the waits that ended by their timeout."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.timed_out = 0
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1  # (under the lock)
        woken = super().wait(timeout)
        if not woken:
            self.timed_out += 1
        return woken


def scarce_pool(rings: int, free: int) -> tuple[TagPool, set[int]]:
    """A pool with only *free* tags left per ring (the others quarantined),
    so that threads must wait for each other's releases."""
    pool = TagPool(rings)
    every = [pool.acquire(None) for _ in range(MAX_TAG + 1)]
    keep = {t for t in every if t // rings < free}
    stuck = set(every) - keep
    for tag in stuck:
        pool.quarantine(tag)
    for tag in keep:
        pool.release(tag)
    assert pool.in_use == 0 and pool.stuck == frozenset(stuck)
    return pool, stuck


@pytest.mark.parametrize("rings", [1, 2, 3])
def test_tag_pool_hammered_never_hands_a_tag_out_twice(rings: int) -> None:
    """Single tags, groups of one ring and batches taken and released by 8
    threads at once over a pool with a few tags left per ring (so that they
    wait for each other), one quarantined on the way."""
    pool, stuck = scarce_pool(rings, {1: 8, 2: 5, 3: 4}[rings])
    budget = itertools.count()  # one quarantine at most: every ring keeps a group's 3
    cond = CountingCondition(pool._lock)
    pool._cond = cond
    owners: dict[int, int] = {}
    quarantined: set[int] = set()
    handed = [0]

    def take(me: int, tags: list[int]) -> None:
        for tag in tags:
            if not 0 <= tag <= MAX_TAG:
                raise AssertionError(f"tag {tag} out of range")
            if tag in stuck or tag in quarantined:
                raise AssertionError(f"quarantined tag {tag} handed out")
            holder = owners.setdefault(tag, me)  # atomic: see who holds it
            if holder != me:
                raise AssertionError(f"tag {tag} held by {holder} and {me}")
        handed[0] += len(tags)

    def give(tags: list[int]) -> None:
        for tag in tags:
            del owners[tag]

    def work(me: int, rng: random.Random) -> None:
        for _ in range(400):
            kind = rng.randrange(3)
            if kind == 0:
                tags = [pool.acquire(30)]
            elif kind == 1:
                tags = pool.acquire_group(3, rings, 30)
                if len({t % rings for t in tags}) != 1:
                    raise AssertionError(f"group {tags} spans rings")
            else:
                tags = pool.acquire_many(2, 30)
            take(me, tags)
            time.sleep(0)  # hold them while the others run: they must wait
            if rng.randrange(100) == 0 and next(budget) < 1:  # (next(count): atomic)
                victim = tags.pop()
                quarantined.add(victim)  # before: nobody else holds it until then
                del owners[victim]
                pool.quarantine(victim)
            give(tags)
            if rng.randrange(2):
                pool.release_many(tags)
            else:
                for tag in tags:
                    pool.release(tag)

    errors = run_threads(work)
    assert errors == []
    assert handed[0] > THREADS * 400
    assert pool.in_use == 0 and not owners
    assert pool.stuck == frozenset(stuck | quarantined)
    # every tag left is free exactly once: all of them can be taken, each once
    left = [pool.acquire(0) for _ in range(MAX_TAG + 1 - len(stuck) - len(quarantined))]
    assert len(set(left)) == len(left) and not set(left) & (stuck | quarantined)
    with pytest.raises(TimeoutError):
        pool.acquire(0)
    # the threads did wait for each other, and saw every release: none
    # waited out its full second
    assert cond.waits > 0 and cond.timed_out == 0


def test_a_waiter_is_woken_by_the_one_release() -> None:
    """One tag, held: a caller waiting for it is woken by its release
    however close the release comes to the start of the wait (no lost
    wake-up: the waiter would wait out a whole second)."""
    pool, _ = scarce_pool(1, 1)
    cond = CountingCondition(pool._lock)
    pool._cond = cond
    rng = random.Random(5)
    for _ in range(200):
        tag = pool.acquire(0)
        got: list[int] = []
        waiter = threading.Thread(target=lambda got=got: got.append(pool.acquire(10)))
        waiter.start()
        delay = rng.random() * 0.001
        if delay > 0.0002:
            threading.Event().wait(delay)
        pool.release(tag)
        waiter.join(20)
        assert got == [tag]
        pool.release(tag)
    assert cond.timed_out == 0


def test_tag_pool_groups_for_another_modulus_stay_congruent() -> None:
    """A group asked for a modulus the pool's rings are not a multiple of (a
    transport replaced by one with other rings) is still of one residue."""
    pool = TagPool(2)

    def work(me: int, rng: random.Random) -> None:
        for _ in range(200):
            tags = pool.acquire_group(3, 3, 30)
            if len(set(tags)) != 3 or len({t % 3 for t in tags}) != 1:
                raise AssertionError(f"group {tags}")
            pool.release_many(tags)

    assert run_threads(work, 4) == []
    assert pool.in_use == 0


def test_fid_pool_hammered_never_hands_a_fid_out_twice() -> None:
    """Fids taken, freed and lost by 8 threads at once: none held twice, a
    lost one never again, freed ones reused (most recently freed first)."""
    pool = FidPool()
    owners: dict[int, int] = {}
    lost: set[int] = set()

    def work(me: int, rng: random.Random) -> None:
        held: list[int] = []
        for _ in range(3000):
            if len(held) < 4 and (not held or rng.randrange(2)):
                fid = pool.acquire()
                if fid in lost:
                    raise AssertionError(f"lost fid {fid} handed out")
                holder = owners.setdefault(fid, me)
                if holder != me:
                    raise AssertionError(f"fid {fid} held by {holder} and {me}")
                held.append(fid)
                continue
            fid = held.pop(rng.randrange(len(held)))
            del owners[fid]
            if rng.randrange(100) == 0:
                lost.add(fid)
                pool.lose(fid)
                pool.release(fid)  # after lose: ignored
            else:
                pool.release(fid)
        for fid in held:
            del owners[fid]
            pool.release(fid)

    assert run_threads(work) == []
    assert pool.count == 0 and pool.lost == len(lost) and not owners
    # every free fid once: taking as many as were ever handed out gives no repeat
    again = [pool.acquire() for _ in range(len(pool._free))]
    assert len(set(again)) == len(again) and not set(again) & lost


def test_racing_releases_of_one_number_queue_it_once() -> None:
    """Two threads releasing (or one releasing, one giving up) the same fid
    or tag at once, as an answer and an expiry could: it is freed once."""
    fids, tags = FidPool(), TagPool(2)
    for round_ in range(300):
        fid, tag = fids.acquire(), tags.acquire(None)
        lose = round_ % 3 == 0

        def work(
            me: int, rng: random.Random, fid: int = fid, tag: int = tag, lose: bool = lose
        ) -> None:
            if me == 0 and lose:
                fids.lose(fid)
                tags.quarantine(tag)
            else:
                fids.release(fid)
                tags.release(tag)

        assert run_threads(work, 3) == []
        assert fids.count == 0 and tags.in_use == 0
        assert fids._free.count(fid) <= 1
        assert sum(q.count(tag) for q in tags._free) <= 1
        assert (fid in fids._free) != (fid in fids._lost)
    # everything free is free once
    assert len(set(fids._free)) == len(fids._free)
    for q in tags._free:
        assert len(set(q)) == len(q)


def test_fid_pool_reuses_the_most_recently_freed() -> None:
    pool = FidPool()
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.acquire() == b and pool.acquire() == a and pool.acquire() == 2


def _session(tmp_path: Path) -> ClientSession:
    session = ClientSession(
        HostileServer(tmp_path).transport(owner=True), timeout=10, flush_timeout=1
    )
    session.negotiate(None, c.VERSION_9P2000_L)
    session.attach("user", str(tmp_path), 0)
    return session


def test_background_clunks_settled_once_under_races(tmp_path: Path) -> None:
    """Replies to background clunks delivered by several threads while
    others give them up (as an expiry does): each clunk's fid is freed or
    lost exactly once and its tag released or quarantined exactly once;
    nothing stays in flight."""
    session = _session(tmp_path)
    session.dotu = True  # an expiry retires the tag (no Tflush round trip here)
    freed: list[int] = []
    lost: list[int] = []
    released: list[int] = []
    retired: list[int] = []
    fids, tags = session.fids, session.tags
    real = (fids.release, fids.lose, tags.release, tags.quarantine)

    def record(log: list[int], fn: Callable[[int], None]) -> Callable[[int], None]:
        def call(n: int) -> None:
            log.append(n)
            fn(n)

        return call

    fids.release, fids.lose = record(freed, real[0]), record(lost, real[1])  # type: ignore[method-assign]
    tags.release, tags.quarantine = record(released, real[2]), record(retired, real[3])  # type: ignore[method-assign]
    rounds, per_round = 30, 40
    try:
        for _ in range(rounds):
            for log in (freed, lost, released, retired):
                log.clear()
            entries: list[tuple[int, int, Future[bytes]]] = []
            for _ in range(per_round):
                fid, tag = fids.acquire(), tags.acquire(None)
                future: Future[bytes] = Future()
                session._background_clunk(fid, tag, future, None)
                entries.append((fid, tag, future))
            assert session.clunks_in_flight == per_round

            def work(me: int, rng: random.Random, entries: Any = entries) -> None:
                if me == 0:
                    session._expire_clunks(everything=True)
                    return
                for _fid, tag, future in entries[me - 1 :: THREADS - 1]:
                    future.set_result(c.encode(c.Rclunk(tag)))

            assert run_threads(work) == []
            assert session.clunks_in_flight == 0
            # each fid freed or lost once, each tag released or retired once,
            # and by the same side (an answer frees both, an expiry gives up both)
            assert sorted(freed + lost) == sorted(fid for fid, _, _ in entries)
            assert sorted(released + retired) == sorted(tag for _, tag, _ in entries)
            by_fid = {fid: tag for fid, tag, _ in entries}
            assert sorted(by_fid[f] for f in lost) == sorted(retired)
    finally:
        fids.release, fids.lose, tags.release, tags.quarantine = real  # type: ignore[method-assign]
    assert session.fids.count == 1  # the attach root
    assert session.tags.in_use == 0


def test_a_drain_waiting_on_the_delivering_thread_misses_no_wakeup(tmp_path: Path) -> None:
    """drain_clunks in a thread that may not receive (the transport's own
    receiving thread) waits on a condition: clunks answered by other
    threads wake it every time, however the threads interleave."""
    session = _session(tmp_path)
    cond = CountingCondition(session._lock)
    session._clunks_done = cond

    def cannot_receive(future: Future[bytes], timeout: float | None) -> bytes:
        raise RuntimeError("this thread delivers replies")

    session.wire.result = cannot_receive  # type: ignore[method-assign]
    for _ in range(20):
        entries: list[tuple[int, Future[bytes]]] = []
        for _ in range(30):
            tag = session.tags.acquire(None)
            future: Future[bytes] = Future()
            session._background_clunk(session.fids.acquire(), tag, future, None)
            entries.append((tag, future))

        def work(me: int, rng: random.Random, entries: Any = entries) -> None:
            if me == 0:
                session.drain_clunks(30)
                if session.clunks_in_flight:
                    raise AssertionError("drain_clunks returned with clunks in flight")
                return
            for tag, future in entries[me - 1 :: 3]:
                future.set_result(c.encode(c.Rclunk(tag)))

        assert run_threads(work, 4) == []
    assert cond.timed_out == 0
    assert session.fids.count == 1 and session.tags.in_use == 0 and session.fids.lost == 0
