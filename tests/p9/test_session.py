"""The 9P client's session layer (:mod:`pyxen9p.p9.session`): pools, reply checks, a session."""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

import pytest

from pyxen9p.errors import TransportClosedError
from pyxen9p.p9 import codec as c
from pyxen9p.p9.codec import ProtocolError
from pyxen9p.p9.session import (
    MAX_TAG,
    ClientSession,
    FidPool,
    IdPool,
    TagAllocator,
    TagPool,
    check_reply,
    server_error,
    version_answer,
)

from .hostile import HostileServer

# --------------------------------------------------------------------------
# IdPool (the multiplexer's backend tags and fids, the client's fids)


def test_id_pool_recycles_most_recently_freed_first() -> None:
    pool = IdPool(100)
    assert [pool.alloc() for _ in range(4)] == [0, 1, 2, 3]
    pool.free(1)
    pool.free(3)
    assert pool.alloc() == 3
    assert pool.alloc() == 1
    assert pool.alloc() == 4
    assert pool.used == {0, 1, 2, 3, 4}


def test_id_pool_free_of_unknown_and_double_free_are_ignored() -> None:
    pool = IdPool(10)
    n = pool.alloc()
    pool.free(n)
    pool.free(n)
    pool.free(7)
    assert pool.alloc() == n
    assert pool.alloc() == 1  # 7 was never handed out, so never recycled


def test_id_pool_congruent_allocation_keeps_the_ring() -> None:
    pool = IdPool(100)
    assert pool.alloc(5, 4) == 1  # 0 skipped into the free list
    assert pool.alloc(6, 4) == 2
    assert pool.alloc(3, 4) == 3
    assert pool.alloc() == 0  # the skipped one
    pool.free(2)
    pool.free(3)
    assert pool.alloc(10, 4) == 2  # a free one of the right ring, not the latest freed


def test_id_pool_exhaustion_raises_the_given_errno() -> None:
    pool = IdPool(3, errno.EMFILE, "out of things")
    assert [pool.alloc() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="out of things") as info:
        pool.alloc()
    assert info.value.errno == errno.EMFILE
    with pytest.raises(OSError):
        IdPool(3).alloc(3, 4)  # no number below 3 is congruent to 3 mod 4 but 3 itself


def test_id_pool_lost_numbers_are_never_reused() -> None:
    pool = IdPool(2)
    a = pool.alloc()
    pool.lose(a)
    pool.lose(a)
    assert pool.lost == 1
    assert pool.alloc() == 1
    with pytest.raises(OSError):
        pool.alloc()


# --------------------------------------------------------------------------
# Tags


def test_tags_wrap_around_without_notag() -> None:
    tags = TagAllocator()
    tags._next = MAX_TAG - 1
    got = [tags.acquire() for _ in range(4)]
    assert got == [MAX_TAG - 1, MAX_TAG, 0, 1]
    assert c.NOTAG not in got


def test_tags_skip_busy_ones_and_reuse_only_released() -> None:
    tags = TagAllocator()
    a, b, d = tags.acquire(), tags.acquire(), tags.acquire()
    assert (a, b, d) == (0, 1, 2)
    tags.release(b)
    assert tags.acquire() == 3  # round-robin: not straight back to the freed one
    tags._next = 0
    assert tags.acquire() == 1  # 0 is busy


def test_quarantine_survives_wrap_around() -> None:
    tags = TagAllocator()
    stuck = tags.acquire()
    tags.quarantine(stuck)
    assert tags.in_use == 0
    seen = set()
    for _ in range(MAX_TAG + 5):
        tag = tags.acquire()
        assert tag is not None
        seen.add(tag)
        tags.release(tag)
    assert stuck not in seen
    assert len(seen) == MAX_TAG  # every tag but the stuck one and NOTAG


def test_tag_exhaustion() -> None:
    tags = TagAllocator()
    for _ in range(MAX_TAG + 1):
        assert tags.acquire() is not None
    assert tags.full and tags.acquire() is None
    for rings in (1, 3):
        pool = TagPool(rings)
        got = [pool.acquire(None) for _ in range(MAX_TAG + 1)]
        assert sorted(got) == list(range(MAX_TAG + 1))  # every tag once, never NOTAG
        assert pool.in_use == MAX_TAG + 1
        with pytest.raises(TimeoutError) as info:
            pool.acquire(0.05)
        assert info.value.errno == errno.ETIMEDOUT
        with pytest.raises(TimeoutError):
            pool.acquire_group(1, rings, 0.05)
        with pytest.raises(TimeoutError):
            pool.acquire_many(1, 0)
        pool.release(7)
        assert pool.acquire(0.05) == 7


@pytest.mark.parametrize("rings", [1, 2, 3])
def test_tag_pool_batches_and_groups_spread_over_the_rings(rings: int) -> None:
    pool = TagPool(rings)
    for count in range(1, 10):
        tags = pool.acquire_many(count, 0)
        assert len(set(tags)) == count and pool.in_use == count
        # successive tags on successive rings
        assert [t % rings for t in tags] == [(tags[0] + i) % rings for i in range(count)]
        pool.release_many(tags)
        assert pool.in_use == 0
    firsts = [pool.acquire_group(3, rings, 0) for _ in range(rings)]
    assert all(len({t % rings for t in g}) == 1 for g in firsts)
    assert len({g[0] % rings for g in firsts}) == rings  # one group per ring
    for group in firsts:
        pool.release_many(group)
    assert pool.in_use == 0


def test_tag_pool_batch_with_a_ring_short_of_tags() -> None:
    """A batch whose share of one ring is not free takes what the other
    rings have, one tag at a time."""
    pool = TagPool(2)
    every = [pool.acquire(None) for _ in range(MAX_TAG + 1)]
    keep = [t for t in every if t in (0, 1, 3, 5, 7)]  # one tag of ring 0, four of ring 1
    for tag in every:
        if tag not in keep:
            pool.quarantine(tag)
    pool.release_many(keep)
    tags = pool.acquire_many(4, 0)
    assert sorted(tags) != sorted(keep) and set(tags) <= set(keep) and len(set(tags)) == 4
    assert pool.acquire_many(1, 0)[0] in set(keep) - set(tags)
    with pytest.raises(TimeoutError):
        pool.acquire_many(1, 0)
    assert pool.in_use == 5


def test_tag_pool_counts_stuck_apart() -> None:
    pool = TagPool()
    a = pool.acquire(None)
    pool.acquire(None)
    pool.quarantine(a)
    assert pool.in_use == 1
    assert pool.stuck == frozenset({a})


def test_fid_pool_exhaustion_is_emfile_and_lost_counts() -> None:
    fids = FidPool()
    fids._fresh = itertools.count(c.NOFID - 1)
    last = fids.acquire()
    assert last == c.NOFID - 1
    with pytest.raises(OSError) as info:
        fids.acquire()
    assert info.value.errno == errno.EMFILE
    fids.lose(last)
    assert fids.lost == 1 and fids.count == 0


# --------------------------------------------------------------------------
# Reply checking


def _raw(message: c.Message) -> bytes:
    return c.encode(message)


def test_check_reply_accepts_the_expected_reply() -> None:
    request = c.Tclunk(5, 1)
    reply = check_reply(_raw(c.Rclunk(5)), 5, request, c.Rclunk, "p", 8192)
    assert reply == c.Rclunk(5)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (c.Rclunk(6), "tagged 6 to a request tagged 5"),
        (c.Rflush(5), "Rflush in reply to Tclunk"),
    ],
)
def test_check_reply_refuses_other_tags_and_types(reply: c.Message, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        check_reply(_raw(reply), 5, c.Tclunk(5, 1), c.Rclunk, None, 8192)


def test_check_reply_refuses_replies_over_the_msize() -> None:
    raw = _raw(c.Rerror(5, "x" * 100, errno.EIO))
    with pytest.raises(ProtocolError, match="exceeds the msize 50"):
        check_reply(raw, 5, c.Tclunk(5, 1), c.Rclunk, None, 50)


def test_check_reply_maps_error_replies() -> None:
    with pytest.raises(FileNotFoundError) as info:
        check_reply(_raw(c.Rlerror(5, errno.ENOENT)), 5, c.Tclunk(5, 1), c.Rclunk, "a/b", 8192)
    assert info.value.filename == "a/b"
    with pytest.raises(PermissionError, match="go away"):
        check_reply(
            _raw(c.Rerror(5, "go away", errno.EACCES)), 5, c.Tclunk(5, 1), c.Rclunk, None, 8192
        )
    with pytest.raises(ProtocolError, match="invalid error number 0"):
        check_reply(_raw(c.Rlerror(5, 0)), 5, c.Tclunk(5, 1), c.Rclunk, None, 8192)
    # 9P2000.u: xen-9pfsd's stale errno 0 is an EIO, not a protocol violation
    with pytest.raises(OSError, match="error number 0") as eio:
        check_reply(
            _raw(c.Rerror(5, "walk", 0)), 5, c.Tclunk(5, 1), c.Rclunk, "l", 8192, dotu=True
        )
    assert eio.value.errno == errno.EIO and not isinstance(eio.value, ProtocolError)


def test_server_error_and_version_answer() -> None:
    assert isinstance(server_error(errno.EEXIST, "f"), FileExistsError)
    bad = server_error(5000, None, "odd")
    assert isinstance(bad, ProtocolError) and bad.errno == errno.EPROTO
    assert version_answer(c.Rversion(c.NOTAG, 8192, "9P2000")) == "'9P2000'"
    assert version_answer(c.Rlerror(c.NOTAG, 99999)) == "error 99999"


# --------------------------------------------------------------------------
# A session without the path API


def test_session_alone_negotiates_attaches_and_clunks(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("abc")
    session = ClientSession(
        HostileServer(tmp_path).transport(owner=True), timeout=10, flush_timeout=1
    )
    session.negotiate(None, "auto")
    assert session.version == c.VERSION_9P2000_L and not session.dotu
    session.attach("user", str(tmp_path), 0)
    fid = session.fids.acquire()
    session.rpc(lambda t: c.Twalk(t, session.root_fid, fid, ["f"]), c.Rwalk, "f")
    reply = session.rpc(lambda t: c.Tgetattr(t, fid, c.P9_GETATTR_BASIC), c.Rgetattr, "f")
    assert reply.size == 3
    session.defer_clunk(fid)
    assert session.fids.count == 2
    assert session.begin_close() and not session.begin_close()
    session.close()
    assert session.closed and session.fids.count == 0 and session.tags.in_use == 0
    with pytest.raises(TransportClosedError):
        session.rpc(lambda t: c.Tclunk(t, 0), c.Rclunk)
