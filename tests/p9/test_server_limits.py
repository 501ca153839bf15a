"""One session of the file server must not deny service to another.

Fids (descriptors), lock ranges and directory listings are bounded per
session and per server; a session over a limit gets an errno for its own
request only, and the others go on.
"""

from __future__ import annotations

import errno
import os
import random
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyxen9p.p9 import codec as c
from pyxen9p.p9 import server as server_module
from pyxen9p.p9.server import FileServer, Session

from .test_server import ROOT, RW, Conn, open_fds

WR, RD, UN = c.P9_LOCK_TYPE_WRLCK, c.P9_LOCK_TYPE_RDLCK, c.P9_LOCK_TYPE_UNLCK
OK, BLOCKED = c.P9_LOCK_SUCCESS, c.P9_LOCK_BLOCKED


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    (root / "f").write_bytes(b"data")
    (root / "g").write_bytes(b"more")
    for i in range(20):
        (root / "sub" / f"e{i:02}").write_bytes(b"")
    return root


def well_behaved(conn: Conn) -> None:
    """What a normal client does: walk, open, read, create, list, lock, clunk."""
    fid = conn.open("f")
    assert conn.read_all(fid) == b"data"
    new = conn.create("new.txt", b"hello")
    d = conn.open("sub")
    assert len(conn.listdir(d)) == 22
    assert conn.ok(c.Tlock(conn.t(), new, WR, 0, 0, 0, 1, "good"), c.Rlock).status == OK
    for f in (fid, new, d):
        conn.clunk(f)
    conn.ok(c.Tunlinkat(conn.t(), ROOT, "new.txt", 0), c.Runlinkat)


def exhaust_fids(conn: Conn) -> tuple[list[int], int]:
    """Walk new fids until refused: (the fids got, errno of the refusal)."""
    got: list[int] = []
    while len(got) < 100_000:
        fid = conn.fid()
        r = conn.rpc(c.Twalk(conn.t(), ROOT, fid, ("sub",)))
        if isinstance(r, c.Rlerror):
            return got, r.ecode
        got.append(fid)
    raise AssertionError("never refused")


@pytest.fixture
def low_nofile() -> Iterator[int]:
    """Lower the soft RLIMIT_NOFILE to 300 more than the descriptors open now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = open_fds() + 300
    if new > soft:
        pytest.skip("RLIMIT_NOFILE is already low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    try:
        yield new
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_default_fid_limits_fit_rlimit_nofile(tree: Path, low_nofile: int) -> None:
    budget = low_nofile - open_fds()
    with FileServer(tree) as srv:
        bad = Conn(srv.session())
        got, err = exhaust_fids(bad)
        assert err == errno.EMFILE
        # Open every fid the hostile session holds: three descriptors each.
        for fid in got:
            bad.ok(c.Tlopen(bad.t(), fid, c.L_O_RDONLY), c.Rlopen)
        # The other session, and the rest of the process, still work.
        good = Conn(srv.session())
        well_behaved(good)
        os.close(os.open("/dev/null", os.O_RDONLY))
        # A fid holds up to three descriptors: all fids together use at most 3/4.
        assert 3 * srv.max_total_fids <= budget * 3 // 4 + 3
        assert srv.max_total_fids >= budget // 4 - 2
        assert srv.max_fids == srv.max_total_fids // 4
        assert len(got) == srv.max_fids - 1  # the attach holds one
        # Even with three sessions at their limit.
        for _ in range(2):
            assert exhaust_fids(Conn(srv.session()))[1] == errno.EMFILE
        well_behaved(good)
        assert exhaust_fids(good)[1] in (errno.EMFILE, errno.ENFILE)


def test_fid_limits_per_session_and_per_server(tree: Path) -> None:
    with FileServer(tree, max_fids=5, max_total_fids=12) as srv:
        a, b, d = (Conn(srv.session()) for _ in range(3))  # three attaches
        got, err = exhaust_fids(a)
        assert (len(got), err) == (4, errno.EMFILE)
        assert len(exhaust_fids(b)[0]) == 4
        assert counts(exhaust_fids(d)) == (1, errno.ENFILE)  # 12 in all
        assert d.err(c.Tattach(1, 77, c.NOFID, "u", "", 0)) == errno.ENFILE
        a.clunk(got[0])
        a.clunk(got[1])
        d.walk()
        d.walk()  # 12 in all again
        assert d.err(c.Twalk(1, ROOT, 99, ())) == errno.ENFILE
        assert a.err(c.Twalk(1, ROOT, 99, ())) == errno.ENFILE
        # Tversion and closing a session give their fids back.
        a.ok(c.Tversion(c.NOTAG, 8192, "9P2000.L"), c.Rversion)
        assert isinstance(b.target, Session)
        b.target.close()
        a.ok(c.Tattach(1, ROOT, c.NOFID, "u", "", c.NONUNAME), c.Rattach)
        assert counts(exhaust_fids(a)) == (4, errno.EMFILE)  # 9 in all
        assert counts(exhaust_fids(d)) == (1, errno.EMFILE)  # 10 in all
    with pytest.raises(ValueError):
        FileServer(tree, max_total_fids=0)
    with pytest.raises(ValueError):
        FileServer(tree, max_locks=0)


def counts(result: tuple[list[int], int]) -> tuple[int, int]:
    return len(result[0]), result[1]


def lock(conn: Conn, fid: int, type_: int, start: int, length: int, proc: int = 1) -> int:
    r = conn.rpc(c.Tlock(conn.t(), fid, type_, 0, start, length, proc, "cid"))
    if isinstance(r, c.Rlerror):
        return -r.ecode
    assert isinstance(r, c.Rlock)
    return r.status


def test_lock_flood_is_bounded_per_session_and_per_server(tree: Path) -> None:
    with FileServer(tree, max_locks=50, max_total_locks=90) as srv:
        bad = Conn(srv.session())
        fid = bad.open("f", flags=RW)
        results = [lock(bad, fid, WR, 2 * i, 1, proc=i % 7) for i in range(60)]
        assert results == [OK] * 50 + [-errno.ENOLCK] * 10
        # Splitting a range makes one more: refused at the limit too.
        assert lock(bad, fid, UN, 0, 0, proc=3) == OK  # proc 3's 7 ranges: gone
        assert lock(bad, fid, WR, 1000, 10, proc=3) == OK
        assert lock(bad, fid, WR, 1020, 10, proc=3) == OK
        assert lock(bad, fid, WR, 1040, 10, proc=3) == OK
        assert lock(bad, fid, WR, 1060, 10, proc=3) == OK
        assert lock(bad, fid, WR, 1080, 10, proc=3) == OK
        assert lock(bad, fid, WR, 1100, 10, proc=3) == OK
        assert lock(bad, fid, WR, 1120, 10, proc=3) == OK  # 50 again
        assert lock(bad, fid, UN, 1002, 2, proc=3) == -errno.ENOLCK
        assert lock(bad, fid, UN, 1000, 2, proc=3) == OK  # a cut at an end: still one
        # Adjacent ranges of one owner and type merge (as POSIX locks do).
        assert lock(bad, fid, WR, 1010, 10, proc=3) == OK
        assert lock(bad, fid, WR, 1030, 10, proc=3) == OK
        # Another session is not affected, on the same file or another one.
        good = Conn(srv.session())
        gf = good.open("f", flags=RW)
        assert lock(good, gf, WR, 1, 1) == OK
        assert lock(good, gf, RD, 0, 1) == BLOCKED
        well_behaved(good)
        g = good.ok(c.Tgetlock(1, gf, RD, 0, 0, 9, "x"), c.Rgetlock)
        assert (g.type, g.start, g.length) == (WR, 0, 1)
        # The server-wide limit: a second hostile session gets the rest.
        bad2 = Conn(srv.session())
        fid2 = bad2.open("g", flags=RW)
        results = [lock(bad2, fid2, RD, 2 * i, 1) for i in range(60)]
        assert results == [OK] * (90 - 48 - 2) + [-errno.ENOLCK] * (60 - 40)
        assert lock(good, gf, WR, 3, 1) == -errno.ENOLCK
        # Ending the hostile session releases its ranges.
        assert isinstance(bad.target, Session)
        bad.target.close()
        assert lock(good, gf, RD, 0, 1) == OK
        assert lock(good, gf, WR, 3, 1) == OK
        # Client ids beyond 255 bytes are refused (each owner's id is kept).
        assert good.err(c.Tlock(1, gf, WR, 0, 5, 1, 1, "x" * 256)) == errno.EINVAL
        assert good.err(c.Tgetlock(1, gf, WR, 5, 1, 1, "x" * 256)) == errno.EINVAL
        assert lock(good, gf, WR, 5, 1) == OK


class Model:
    """Byte-by-byte POSIX record locks over bytes [0, END)."""

    END = 48

    def __init__(self) -> None:
        self.held: list[dict[tuple[int, int], int]] = [{} for _ in range(self.END)]

    def span(self, start: int, length: int) -> range:
        return range(start, self.END if length == 0 else start + length)

    def conflict(self, owner: tuple[int, int], type_: int, start: int, length: int) -> bool:
        return any(
            other != owner and (type_ == WR or t == WR)
            for b in self.span(start, length)
            for other, t in self.held[b].items()
        )

    def lock(self, owner: tuple[int, int], type_: int, start: int, length: int) -> int:
        if type_ != UN and self.conflict(owner, type_, start, length):
            return BLOCKED
        for b in self.span(start, length):
            if type_ == UN:
                self.held[b].pop(owner, None)
            else:
                self.held[b][owner] = type_
        return OK

    def runs(self, owner: tuple[int, int]) -> list[tuple[int, int, int]]:
        """The owner's maximal ranges of one type: (type, start, end)."""
        out: list[tuple[int, int, int]] = []
        for b in range(self.END):
            t = self.held[b].get(owner)
            if t is None:
                continue
            if out and out[-1][0] == t and out[-1][2] == b:
                out[-1] = (t, out[-1][1], b + 1)
            else:
                out.append((t, b, b + 1))
        return out


def test_lock_table_matches_a_byte_model(tree: Path) -> None:
    """Random Tlock / Tgetlock sequences of three sessions (two owners each)."""
    rng = random.Random(9)
    with FileServer(tree) as srv:
        conns = [Conn(srv.session()) for _ in range(3)]
        fids = [conn.open("f", flags=RW) for conn in conns]
        model = Model()
        key = (os.stat(tree / "f").st_dev, os.stat(tree / "f").st_ino)
        for step in range(3000):
            s = rng.randrange(3)
            proc = rng.randrange(2)
            owner = (s, proc)
            start = rng.randrange(40)
            length = rng.choice([0, 1, 1, 2, 3, 5, 8])
            if step % 4 == 3:
                type_ = rng.choice([RD, WR])
                g = conns[s].ok(
                    c.Tgetlock(1, fids[s], type_, start, length, proc, "cid"), c.Rgetlock
                )
                if not model.conflict(owner, type_, start, length):
                    assert g.type == UN, step
                    continue
                assert g.type != UN, step
                # The lock reported is one that conflicts, of another owner.
                other = next(o for o in ((i, p) for i in range(3) for p in range(2))
                             if o != owner and o[1] == g.proc_id
                             and all(model.held[b].get(o) == g.type
                                     for b in model.span(g.start, g.length)))  # fmt: skip
                assert g.type == WR or type_ == WR, step
                assert set(model.span(g.start, g.length)) & set(model.span(start, length))
                assert other != owner
                continue
            type_ = rng.choice([RD, WR, UN])
            want = model.lock(owner, type_, start, length)
            assert lock(conns[s], fids[s], type_, start, length, proc) == want, step
        # Each owner's ranges are exactly the model's maximal runs (merged, split).
        table = srv._locks[key]
        for s, conn in enumerate(conns):
            assert isinstance(conn.target, Session)
            for proc in range(2):
                lists = table.owners.get((conn.target.serial, "cid", proc), {RD: [], WR: []})
                got = sorted(
                    (lk.type, lk.start, min(lk.end, Model.END))
                    for t in (RD, WR)
                    for lk in lists[t]
                )
                assert got == sorted(model.runs((s, proc)))


def test_lock_checks_do_not_scan_the_table(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Tlock looks at a few lock records, however many the file has (no timing).

    Every read of an attribute of a lock record is counted; with n ranges on
    the file, a request may look at O(log n) of them, never all.
    """
    reads = [0]

    class CountingLock(server_module._Lock):
        def __getattribute__(self, name: str) -> Any:
            reads[0] += 1
            return super().__getattribute__(name)

    monkeypatch.setattr(server_module, "_Lock", CountingLock)

    def cost(conn: Conn, msg: c.Message) -> tuple[c.Message, int]:
        reads[0] = 0
        reply = conn.rpc(msg)
        return reply, reads[0]

    with FileServer(tree) as srv:
        costs: dict[int, list[int]] = {}
        for n in (30, 1000):
            a = Conn(srv.session())
            b = Conn(srv.session())
            fa = a.open("f", flags=RW)
            fb = b.open("f", flags=RW)
            for i in range(n):  # n separate ranges of one owner
                assert lock(a, fa, WR, 2 * i, 1) == OK
            far = 10 * n
            row = []
            for conn, msg, want in (
                (b, c.Tlock(1, fb, WR, 0, far, 1, 9, "b"), OK),  # no conflict, other owner
                (b, c.Tlock(1, fb, RD, 0, 0, 0, 9, "b"), BLOCKED),  # conflicts with all n
                (b, c.Tlock(1, fb, WR, 0, 2 * n - 2, 1, 9, "b"), BLOCKED),  # with the last
                (a, c.Tlock(1, fa, WR, 0, 2 * n + 1, 1, 1, "cid"), OK),  # a's own: add one
                (a, c.Tlock(1, fa, RD, 0, n, 1, 1, "cid"), OK),  # a's own: change one
            ):
                reply, k = cost(conn, msg)
                assert isinstance(reply, c.Rlock) and reply.status == want, (msg, reply)
                row.append(k)
            reply, k = cost(b, c.Tgetlock(1, fb, WR, 2 * n - 2, 1, 9, "b"))
            assert isinstance(reply, c.Rgetlock) and reply.start == 2 * n - 2
            row.append(k)
            costs[n] = row
            for conn in (a, b):
                assert isinstance(conn.target, Session)
                conn.target.close()
        # Logarithmic: 33 times the ranges cost a few more reads, not 33 times more.
        for small, large in zip(costs[30], costs[1000], strict=True):
            assert large <= small + 30 and large < 80, costs


def test_directory_listings_kept_per_session_are_bounded(tree: Path) -> None:
    for i in range(10):
        d = tree / f"d{i}"
        d.mkdir()
        for j in range(30):
            (d / f"entry-{j:02}").write_bytes(b"")
    with FileServer(tree) as srv:
        session = srv.session()
        conn = Conn(session)
        fids = [conn.open(f"d{i}") for i in range(10)]
        got: dict[int, list[str]] = {f: [] for f in fids}
        offsets = dict.fromkeys(fids, 0)
        # Interleaved listings, a few entries at a time, all ten at once.
        while True:
            progress = False
            for f in fids:
                r = conn.ok(c.Treaddir(conn.t(), f, offsets[f], 100), c.Rreaddir)
                entries = r.entries()
                if entries:
                    progress = True
                    got[f] += [e.name for e in entries]
                    offsets[f] = entries[-1].offset
            held = sum(1 for fid in session._fids.values() if fid.dirents is not None)
            assert held <= 4  # _MAX_LISTINGS
            if not progress:
                break
        for f in fids:
            assert sorted(got[f]) == sorted([".", ".."] + [f"entry-{j:02}" for j in range(30)])
